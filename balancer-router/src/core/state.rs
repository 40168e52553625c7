//! Stream lifecycle (RFC 9113 5.1), as one enum per hop, and what a client
//! connection remembers of the streams it closed.

/// One hop of a stream, as RFC 9113 5.1 names its states, seen from the
/// router: "remote" is the peer of that hop (the client, or the backend),
/// "local" the router. Idle and reserved streams are never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Open,
    /// The peer sent END_STREAM: it sends nothing more on the stream.
    HalfClosedRemote,
    /// We sent END_STREAM.
    HalfClosedLocal,
    Closed,
}

impl State {
    /// The peer ended its side.
    pub fn recv_end(&mut self) {
        *self = match self {
            State::Open => State::HalfClosedRemote,
            _ => State::Closed,
        };
    }

    /// We ended our side.
    pub fn send_end(&mut self) {
        *self = match self {
            State::Open => State::HalfClosedLocal,
            _ => State::Closed,
        };
    }

    /// The peer ended its side (so more DATA or HEADERS from it is an error).
    pub fn recv_closed(self) -> bool {
        matches!(self, State::HalfClosedRemote | State::Closed)
    }

    /// We ended our side.
    pub fn send_closed(self) -> bool {
        matches!(self, State::HalfClosedLocal | State::Closed)
    }
}

/// How a client stream that is gone was closed; decides what a late frame
/// on it means (RFC 9113 5.1, "closed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// We reset it: frames the client sent before it saw our RST_STREAM
    /// are in flight, and ignored.
    ByUs,
    /// The client reset it: a later frame is a stream error STREAM_CLOSED.
    ByPeer,
    /// The client ended it with END_STREAM: later DATA or HEADERS are a
    /// connection error STREAM_CLOSED.
    Ended,
}

/// Streams recently closed on a connection, the last [`Recent::CAPACITY`]
/// (oldest forgotten first). A frame on an older closed stream is ignored,
/// the safe answer for a well-behaved client whose frames were in flight.
/// A ring: every finished stream is written here, while lookups happen
/// only for frames on closed streams, so writing is one store and looking
/// up a scan.
pub struct Recent {
    ring: Box<[(u32, Closed); Recent::CAPACITY]>,
    next: usize,
}

impl Default for Recent {
    fn default() -> Self {
        // Stream 0 is never a client stream: an empty slot.
        Self {
            ring: Box::new([(0, Closed::ByUs); Recent::CAPACITY]),
            next: 0,
        }
    }
}

impl Recent {
    pub const CAPACITY: usize = 256;

    /// Record how `sid` closed; a later record for the same stream wins.
    pub fn insert(&mut self, sid: u32, how: Closed) {
        self.ring[self.next] = (sid, how);
        self.next = (self.next + 1) % Self::CAPACITY;
    }

    pub fn get(&self, sid: u32) -> Option<Closed> {
        if sid == 0 {
            return None;
        }
        // Newest first, so the latest record of a stream wins.
        (1..=Self::CAPACITY)
            .map(|back| self.ring[(self.next + Self::CAPACITY - back) % Self::CAPACITY])
            .find(|(s, _)| *s == sid)
            .map(|(_, how)| how)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_closes_once_both_sides_ended() {
        let mut s = State::Open;
        s.recv_end();
        assert_eq!(s, State::HalfClosedRemote);
        assert!(s.recv_closed() && !s.send_closed());
        s.send_end();
        assert_eq!(s, State::Closed);
        let mut s = State::Open;
        s.send_end();
        assert_eq!(s, State::HalfClosedLocal);
        s.recv_end();
        assert_eq!(s, State::Closed);
    }

    #[test]
    fn recent_closed_streams_are_bounded() {
        let mut r = Recent::default();
        for sid in 0..(Recent::CAPACITY as u32 + 10) {
            r.insert(2 * sid + 1, Closed::ByUs);
        }
        assert_eq!(r.get(1), None, "the oldest is forgotten");
        assert_eq!(r.get(2 * 20 + 1), Some(Closed::ByUs));
        assert_eq!(r.get(0), None);
        r.insert(41, Closed::Ended);
        assert_eq!(r.get(41), Some(Closed::Ended), "the latest record wins");
    }
}
