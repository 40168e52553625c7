//! Flow control as types (RFC 9113 5.2, 6.9): the window a peer may still
//! fill on our side ([`RecvWindow`]), and the window we may still fill on
//! its side ([`SendWindow`]). Each hop has its own, on every connection and
//! every stream.

/// The largest window (and stream id) HTTP/2 allows: 2^31 - 1.
pub const MAX_WINDOW: i64 = 0x7fff_ffff;

/// What the peer may still send us, and the credit we owe it: bytes it
/// sent that we are done with and have not yet handed back in a
/// WINDOW_UPDATE.
#[derive(Debug, Clone, Copy)]
pub struct RecvWindow {
    window: i64,
    credit: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the peer sent {sent} bytes into a window of {window}")]
pub struct Exceeded {
    pub sent: i64,
    pub window: i64,
}

impl RecvWindow {
    pub fn new(size: i64) -> Self {
        Self {
            window: size,
            credit: 0,
        }
    }

    /// What the peer may still send.
    pub fn available(&self) -> i64 {
        self.window
    }

    /// The peer sent `n` flow-controlled bytes.
    pub fn consume(&mut self, n: i64) -> Result<(), Exceeded> {
        if n > self.window {
            return Err(Exceeded {
                sent: n,
                window: self.window,
            });
        }
        self.window -= n;
        Ok(())
    }

    /// We are done with `n` bytes: once the credit reaches `threshold`, the
    /// increment to send the peer (fewer WINDOW_UPDATEs than one per DATA).
    pub fn release(&mut self, n: i64, threshold: i64) -> Option<u32> {
        self.credit += n;
        if n == 0 || self.credit < threshold {
            return None;
        }
        let inc = std::mem::take(&mut self.credit);
        self.window += inc;
        Some(inc as u32)
    }

    /// Open the window by `n` bytes at once (a grant, not a return): the
    /// increment to send.
    pub fn grant(&mut self, n: i64) -> u32 {
        self.window += n;
        n as u32
    }
}

/// What we may still send the peer. May go negative when the peer lowers
/// SETTINGS_INITIAL_WINDOW_SIZE (RFC 9113 6.9.2).
#[derive(Debug, Clone, Copy)]
pub struct SendWindow(i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("window raised above 2^31-1")]
pub struct Overflow;

impl SendWindow {
    pub fn new(size: i64) -> Self {
        Self(size)
    }

    pub fn get(&self) -> i64 {
        self.0
    }

    /// A WINDOW_UPDATE, or a change of the initial window (`delta` may be
    /// negative): a window above 2^31-1 is the peer's flow-control error.
    pub fn adjust(&mut self, delta: i64) -> Result<(), Overflow> {
        let w = self.0 + delta;
        if w > MAX_WINDOW {
            return Err(Overflow);
        }
        self.0 = w;
        Ok(())
    }

    /// A connection-level WINDOW_UPDATE of `inc`: 0 is a PROTOCOL_ERROR and
    /// an overflow a FLOW_CONTROL_ERROR, both of the connection (RFC 9113
    /// 6.9, 6.9.1).
    pub fn connection_update(&mut self, inc: i64) -> Result<(), crate::error::Error> {
        use crate::{error::Error, frame::Reason};
        if inc == 0 {
            return Err(Error::conn(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
        }
        self.adjust(inc)
            .map_err(|_| Error::conn(Reason::FLOW_CONTROL_ERROR, "connection window overflow"))
    }

    /// We sent `n` bytes (never more than [`Self::get`]; an empty frame
    /// may go out while the window is negative).
    pub fn consume(&mut self, n: i64) {
        debug_assert!(n == 0 || n <= self.0);
        self.0 -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_window_refuses_more_than_it_allows_and_batches_credit() {
        let mut w = RecvWindow::new(100);
        assert_eq!(w.consume(60), Ok(()));
        assert_eq!(
            w.consume(41),
            Err(Exceeded {
                sent: 41,
                window: 40
            })
        );
        assert_eq!(w.release(30, 50), None);
        assert_eq!(w.release(30, 50), Some(60));
        assert_eq!(w.available(), 100);
        assert_eq!(w.grant(5), 5);
        assert_eq!(w.available(), 105);
    }

    #[test]
    fn a_send_window_may_go_negative_but_not_above_the_maximum() {
        let mut w = SendWindow::new(10);
        w.consume(10);
        assert_eq!(w.adjust(-20), Ok(()));
        assert_eq!(w.get(), -20);
        assert_eq!(w.adjust(MAX_WINDOW + 20), Ok(()));
        assert_eq!(w.adjust(1), Err(Overflow));
        assert_eq!(w.get(), MAX_WINDOW);
    }
}
