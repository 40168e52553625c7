//! Flood detection: the frames and resets a client can make the router
//! work for without doing any work of its own (RFC 9113 10.5; the attacks
//! behind CVE-2019-9512/9515/9518 (ping, settings, empty frames),
//! CVE-2023-44487 (rapid reset), CVE-2025-8671 (resets provoked from the
//! server side)). A client over a limit gets GOAWAY ENHANCE_YOUR_CALM; only
//! its own connection pays.
//!
//! Each meter is a level: a cheap event raises it, useful work (a stream
//! opened, a DATA frame with payload either way, a stream completed) and
//! time (the router's tick) lower it. Real clients stay far below the
//! limits: gRPC sends a PING per data burst at most (BDP estimation) and a
//! WINDOW_UPDATE or two per DATA frame it reads, both paid back by the
//! DATA; its cancels are paid back by the streams that complete, and by
//! time.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{error::Error, frame::Reason};

/// What a client flooded, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    /// SETTINGS, PING, WINDOW_UPDATE, PRIORITY, empty DATA, unknown
    /// frames, frames on closed streams.
    Control,
    /// Streams reset before their response (by the client: rapid reset;
    /// or by us because of the client's error: provoked resets), and
    /// streams refused over the concurrency limit.
    Resets,
    /// Frames that make us answer (PING, SETTINGS) while the client does
    /// not read what we send.
    Unread,
}

impl Flood {
    pub const ALL: [Flood; 3] = [Flood::Control, Flood::Resets, Flood::Unread];

    pub fn name(self) -> &'static str {
        match self {
            Flood::Control => "control_frames",
            Flood::Resets => "stream_resets",
            Flood::Unread => "unread_output",
        }
    }
}

/// Connections closed with ENHANCE_YOUR_CALM, by [`Flood`].
pub static FLOODS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Net cheap frames a client may send before it is cut off.
pub const CONTROL_LIMIT: u32 = 5_000;
/// Cost of one SETTINGS frame (each makes us write an ACK and scan the
/// client's streams when the window changes).
pub const SETTINGS_COST: u32 = 10;
/// What one useful event pays back.
pub const USEFUL_REFUND: u32 = 4;
/// Net premature resets a client may cause before it is cut off.
pub const RESET_LIMIT: u32 = 1_000;
/// What the router's tick (every 500 ms) pays back: 100 cheap frames and
/// 100 resets a second, whatever else the client does.
pub const TICK_REFUND: u32 = 50;

#[derive(Debug, Default)]
pub struct Calm {
    control: u32,
    resets: u32,
}

fn flood(kind: Flood) -> Error {
    FLOODS[kind as usize].fetch_add(1, Ordering::Relaxed);
    Error::conn(
        Reason::ENHANCE_YOUR_CALM,
        match kind {
            Flood::Control => "control frame flood",
            Flood::Resets => "stream reset flood",
            Flood::Unread => "client does not read our answers",
        },
    )
}

impl Calm {
    pub fn control(&mut self, cost: u32) -> Result<(), Error> {
        self.control = self.control.saturating_add(cost);
        if self.control > CONTROL_LIMIT {
            return Err(flood(Flood::Control));
        }
        Ok(())
    }

    pub fn reset(&mut self) -> Result<(), Error> {
        self.resets = self.resets.saturating_add(1);
        if self.resets > RESET_LIMIT {
            return Err(flood(Flood::Resets));
        }
        Ok(())
    }

    /// The client did useful work (opened a stream, sent or received DATA).
    pub fn useful(&mut self) {
        self.control = self.control.saturating_sub(USEFUL_REFUND);
    }

    /// `n` useful events at once (DATA frames sent in one pump).
    pub fn useful_times(&mut self, n: u32) {
        self.control = self.control.saturating_sub(USEFUL_REFUND.saturating_mul(n));
    }

    /// A stream's response reached the client whole.
    pub fn completed(&mut self) {
        self.resets = self.resets.saturating_sub(1);
    }

    pub fn tick(&mut self) {
        self.control = self.control.saturating_sub(TICK_REFUND);
        self.resets = self.resets.saturating_sub(TICK_REFUND);
    }

    pub fn unread() -> Error {
        flood(Flood::Unread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cheap_frames_trip_the_limit_unless_paid_back() {
        let mut c = Calm::default();
        for _ in 0..CONTROL_LIMIT {
            c.control(1).expect("under the limit");
        }
        assert!(c.control(1).is_err());
        // Two WINDOW_UPDATEs per DATA frame, forever: paid back.
        let mut c = Calm::default();
        for _ in 0..100 * CONTROL_LIMIT {
            c.control(1).expect("paid back");
            c.control(1).expect("paid back");
            c.useful();
        }
    }

    #[test]
    fn resets_are_paid_back_by_completed_streams_and_time() {
        let mut c = Calm::default();
        for _ in 0..10 * RESET_LIMIT {
            c.reset().expect("half the streams cancelled");
            c.completed();
        }
        for _ in 0..RESET_LIMIT {
            c.reset().expect("under the limit");
        }
        assert!(c.reset().is_err());
        c.tick();
        for _ in 0..TICK_REFUND - 1 {
            c.reset().expect("time paid some back");
        }
    }
}
