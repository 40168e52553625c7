//! Stream lifecycle (RFC 9113 5.1), as one enum per hop, and what a client
//! connection remembers of the streams it closed.

use std::collections::VecDeque;

use super::Map;

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

/// Streams recently closed on a connection, at most [`Recent::CAPACITY`]
/// (oldest forgotten first). A frame on an older closed stream is ignored,
/// the safe answer for a well-behaved client whose frames were in flight.
#[derive(Default)]
pub struct Recent {
    how: Map<u32, Closed>,
    order: VecDeque<u32>,
}

impl Recent {
    pub const CAPACITY: usize = 256;

    pub fn insert(&mut self, sid: u32, how: Closed) {
        if self.how.insert(sid, how).is_none() {
            self.order.push_back(sid);
            if self.order.len() > Self::CAPACITY
                && let Some(old) = self.order.pop_front()
            {
                self.how.remove(&old);
            }
        }
    }

    pub fn get(&self, sid: u32) -> Option<Closed> {
        self.how.get(&sid).copied()
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
        assert_eq!(r.how.len(), Recent::CAPACITY);
    }
}
