//! Failure accrual: an endpoint that fails stream after stream is ejected
//! for a backoff, then probed with one stream; a success brings it back.
//!
//! After linkerd2-proxy's failure accrual (consecutive failures, then an
//! exponential backoff, then one probe) and Envoy's outlier detection
//! (`consecutive_5xx` / `consecutive_gateway_failure`, and
//! `max_ejection_percent` so that it never ejects everything):
//!
//! | setting | here (default) | linkerd2-proxy | Envoy |
//! |---|---|---|---|
//! | failures to eject | 5 consecutive | 7 consecutive | 5 (`consecutive_5xx`) |
//! | first backoff | 1 s | 1 s | 30 s (`base_ejection_time`) |
//! | longest backoff | 60 s | 60 s | 300 s (`max_ejection_time`) |
//! | most ejected | 50% of a service, never the last | (none) | 10% (`max_ejection_percent`) |
//!
//! What counts as a failure is the core's to judge (see [`Failure`]); this
//! module keeps the state per endpoint and answers, per pick, whether an
//! endpoint may take a stream.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The settings, the same for every endpoint of the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Consecutive failures that eject an endpoint; 0 turns accrual off.
    pub consecutive: u32,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// At most this share (percent) of a service's endpoints is ejected at
    /// once, and never the last one.
    pub max_ejected_percent: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            consecutive: 5,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_ejected_percent: 50,
        }
    }
}

/// Why a stream counted as a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Failure {
    /// No connection to the pod (TCP or its HTTP/2 handshake).
    Connect = 1,
    /// The pod reset the stream (not REFUSED_STREAM) before it answered.
    Reset = 2,
    /// `:status` 5xx.
    Status5xx = 3,
    /// A gRPC Trailers-Only answer with grpc-status UNAVAILABLE, INTERNAL,
    /// UNKNOWN or DEADLINE_EXCEEDED.
    Grpc = 4,
    /// The pod's connection died with the stream unanswered.
    ConnectionLost = 5,
}

impl Failure {
    /// Every kind, in value order.
    pub const ALL: [Self; 5] = [
        Self::Connect,
        Self::Reset,
        Self::Status5xx,
        Self::Grpc,
        Self::ConnectionLost,
    ];

    /// Ejections it caused since start.
    pub fn ejections(self) -> u64 {
        EJECTIONS[self as usize].load(Ordering::Relaxed)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Reset => "reset",
            Self::Status5xx => "5xx",
            Self::Grpc => "grpc",
            Self::ConnectionLost => "connection-lost",
        }
    }

    const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Connect),
            2 => Some(Self::Reset),
            3 => Some(Self::Status5xx),
            4 => Some(Self::Grpc),
            5 => Some(Self::ConnectionLost),
            _ => None,
        }
    }

    /// The failure a response's first header block shows, if any: a 5xx,
    /// or a gRPC Trailers-Only answer with a status that says the pod, not
    /// the request, is at fault.
    pub fn of_response(
        status: Option<u16>,
        grpc_status: Option<u32>,
        end_stream: bool,
    ) -> Option<Self> {
        if status.is_some_and(|s| (500..600).contains(&s)) {
            return Some(Self::Status5xx);
        }
        // UNKNOWN 2, DEADLINE_EXCEEDED 4, INTERNAL 13, UNAVAILABLE 14.
        if end_stream && matches!(grpc_status, Some(2 | 4 | 13 | 14)) {
            return Some(Self::Grpc);
        }
        None
    }
}

/// Milliseconds since the first use: one clock for every endpoint, in an
/// atomic.
fn now_ms(now: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| now.checked_sub(Duration::from_secs(1)).unwrap_or(now));
    now.saturating_duration_since(epoch).as_millis() as u64
}

/// An endpoint's standing, for a pick at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Healthy,
    /// Ejected until the given clock (ms); no stream.
    Ejected(u64),
    /// Its backoff is over: one probe stream may go.
    ProbeDue,
    /// A probe stream is in flight: no other.
    Probing,
}

/// Failure accrual state of one endpoint.
#[derive(Debug, Default)]
pub struct Accrual {
    /// The router's policy, handed in where the endpoint is made
    /// (`Endpoint::with_policy`), not read from a process-wide static.
    policy: Policy,
    consecutive: AtomicU32,
    /// 0: not ejected; else the clock (ms) its ejection ends.
    until_ms: AtomicU64,
    /// The current backoff (ms); doubles per failed probe.
    backoff_ms: AtomicU64,
    probing: AtomicBool,
    /// The last [`Failure`] that ejected it.
    reason: AtomicU8,
    pub ejections: AtomicU64,
}

impl Accrual {
    /// An endpoint's accrual under `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            consecutive: AtomicU32::new(0),
            until_ms: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            reason: AtomicU8::new(0),
            ejections: AtomicU64::new(0),
        }
    }
}

/// Ejections since start, by the [`Failure`] that caused them (indexed by
/// its value; 0 is unused).
pub static EJECTIONS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

impl Accrual {
    /// Not ejected (nor probing): the check a pick makes first, without
    /// reading the clock.
    pub fn is_healthy(&self) -> bool {
        self.until_ms.load(Ordering::Relaxed) == 0
    }

    pub fn standing(&self, now: Instant) -> Standing {
        let until = self.until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return Standing::Healthy;
        }
        if self.probing.load(Ordering::Relaxed) {
            return Standing::Probing;
        }
        if now_ms(now) < until {
            Standing::Ejected(until)
        } else {
            Standing::ProbeDue
        }
    }

    /// Claim the probe of an endpoint whose backoff is over; true for the
    /// one caller that gets it.
    pub fn claim_probe(&self) -> bool {
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// A stream the endpoint answered well: it is healthy (again).
    pub fn success(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        if self.until_ms.swap(0, Ordering::AcqRel) != 0 {
            self.backoff_ms.store(0, Ordering::Relaxed);
            tracing::debug!("endpoint answered well: back in service");
        }
        self.probing.store(false, Ordering::Release);
    }

    /// A failed stream: eject after `consecutive` of them, or again, for
    /// twice as long, after a failed probe. Returns true if it ejected.
    pub fn failure(&self, why: Failure, now: Instant) -> bool {
        let p = self.policy;
        if p.consecutive == 0 {
            return false;
        }
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let ejected = self.until_ms.load(Ordering::Acquire) != 0;
        let backoff = if ejected {
            // Only a failed probe re-ejects; failures of streams sent
            // before the ejection do not extend it.
            if !self.probing.swap(false, Ordering::AcqRel) {
                return false;
            }
            (self.backoff_ms.load(Ordering::Relaxed) * 2).min(p.max_backoff.as_millis() as u64)
        } else if n >= p.consecutive {
            p.min_backoff.as_millis() as u64
        } else {
            return false;
        };
        let backoff = backoff.max(1);
        self.backoff_ms.store(backoff, Ordering::Relaxed);
        self.reason.store(why as u8, Ordering::Relaxed);
        self.until_ms
            .store(now_ms(now) + backoff, Ordering::Release);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        EJECTIONS[why as usize].fetch_add(1, Ordering::Relaxed);
        true
    }

    /// For the operator: ejected now or probing, why, and for how long
    /// still (ms).
    pub fn view(&self, now: Instant) -> Option<(Failure, u64)> {
        let until = self.until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return None;
        }
        let why = Failure::from_u8(self.reason.load(Ordering::Relaxed)).unwrap_or(Failure::Reset);
        Some((why, until.saturating_sub(now_ms(now))))
    }

    pub fn consecutive(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    /// A probe stream ended without an answer either way (the client
    /// cancelled it): let another go.
    pub fn release_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }
}

/// How many of `n` endpoints may be ejected at once under `p`.
pub fn max_ejected(p: &Policy, n: usize) -> usize {
    (n * p.max_ejected_percent as usize / 100).min(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_consecutive_failures_and_a_success_resets_the_count() {
        let a = Accrual::default();
        let t = Instant::now();
        for _ in 0..4 {
            assert!(!a.failure(Failure::Status5xx, t));
        }
        a.success();
        for _ in 0..4 {
            assert!(!a.failure(Failure::Status5xx, t));
        }
        assert_eq!(a.standing(t), Standing::Healthy);
        assert!(a.failure(Failure::Grpc, t), "the fifth in a row");
        assert!(matches!(a.standing(t), Standing::Ejected(_)));
        assert_eq!(a.view(t).map(|v| v.0), Some(Failure::Grpc));
        // Failures of streams already in flight do not extend it.
        assert!(!a.failure(Failure::Grpc, t));
        a.success();
    }

    #[test]
    fn one_probe_after_the_backoff_which_doubles_when_it_fails() {
        let a = Accrual::default();
        let t = Instant::now();
        for _ in 0..5 {
            a.failure(Failure::Reset, t);
        }
        let later = t + Duration::from_millis(1100);
        assert_eq!(a.standing(later), Standing::ProbeDue);
        assert!(a.claim_probe());
        assert!(!a.claim_probe(), "one probe at a time");
        assert_eq!(a.standing(later), Standing::Probing);
        assert!(a.failure(Failure::Reset, later), "a failed probe re-ejects");
        assert_eq!(a.view(later).map(|v| v.1), Some(2000), "for twice as long");
        assert!(matches!(
            a.standing(later + Duration::from_millis(1500)),
            Standing::Ejected(_)
        ));
        let due = later + Duration::from_millis(2100);
        assert_eq!(a.standing(due), Standing::ProbeDue);
        assert!(a.claim_probe());
        a.success();
        assert_eq!(a.standing(due), Standing::Healthy);
        // Back to the first backoff next time.
        for _ in 0..5 {
            a.failure(Failure::Reset, due);
        }
        assert_eq!(a.view(due).map(|v| v.1), Some(1000));
        a.success();
    }

    #[test]
    fn the_cap_never_ejects_the_last_endpoint() {
        let p = Policy::default();
        assert_eq!(max_ejected(&p, 1), 0);
        assert_eq!(max_ejected(&p, 2), 1);
        assert_eq!(max_ejected(&p, 4), 2);
        assert_eq!(max_ejected(&p, 5), 2);
        let all = Policy {
            max_ejected_percent: 100,
            ..p
        };
        assert_eq!(max_ejected(&all, 4), 3);
    }

    #[test]
    fn responses_that_count_as_failures() {
        assert_eq!(
            Failure::of_response(Some(503), None, false),
            Some(Failure::Status5xx)
        );
        assert_eq!(
            Failure::of_response(Some(200), Some(14), true),
            Some(Failure::Grpc)
        );
        assert_eq!(
            Failure::of_response(Some(200), Some(2), true),
            Some(Failure::Grpc)
        );
        // The request's fault, not the pod's.
        assert_eq!(Failure::of_response(Some(200), Some(9), true), None);
        assert_eq!(Failure::of_response(Some(404), None, true), None);
        // Not Trailers-Only: the status arrives later, in trailers.
        assert_eq!(Failure::of_response(Some(200), None, false), None);
    }
}
