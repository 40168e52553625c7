//! The router's counters, read by the agent's metrics endpoint (which
//! encodes them with prometheus-client; this crate only counts).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::endpoint::Algorithm;

/// Upper bounds of the router latency histogram, seconds.
pub const BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A fixed-bucket histogram updated without locks.
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub const fn new() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// The counts now: per bucket (not cumulative), as `(upper bound in
    /// seconds, count)`, the last bound `+Inf`.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [(f64::INFINITY, 0); BUCKETS.len() + 1];
        for (i, (bound, count)) in buckets.iter_mut().enumerate() {
            if let Some(b) = BUCKETS.get(i) {
                *bound = *b;
            }
            *count = self.counts[i].load(Ordering::Relaxed);
        }
        HistogramSnapshot {
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }
}

/// A [`Histogram`] read at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistogramSnapshot {
    pub sum_seconds: f64,
    pub count: u64,
    /// `(upper bound, observations in this bucket only)`, ascending.
    pub buckets: [(f64, u64); BUCKETS.len() + 1],
}

/// Router backend choices, one counter per [`Algorithm`].
pub struct Selections([AtomicU64; Algorithm::ALL.len()]);

impl Selections {
    const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; Algorithm::ALL.len()])
    }

    pub fn count(&self, a: Algorithm) {
        self.0[a as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, a: Algorithm) -> u64 {
        self.0[a as usize].load(Ordering::Relaxed)
    }
}

/// Time from a stream's request to its response headers, per backend hop.
pub static LATENCY: Histogram = Histogram::new();
/// Router backend choices by algorithm.
pub static SELECTIONS: Selections = Selections::new();

/// Pod connections lost because they did not answer a liveness probe.
pub static POD_PROBE_TIMEOUTS: AtomicU64 = AtomicU64::new(0);
/// Streams reset on both hops after `--stream-idle-timeout` without a frame.
pub static STREAM_IDLE_TIMEOUTS: AtomicU64 = AtomicU64::new(0);
/// Streams a backend may have processed, reset because its connection
/// failed (those it did not process are retried instead).
pub static BACKEND_CONN_RESETS: AtomicU64 = AtomicU64::new(0);
/// Pod connections retired (no new streams; a fresh one opened) because
/// the router sent many resets on them.
pub static BACKEND_RESET_RETIREMENTS: AtomicU64 = AtomicU64::new(0);
/// Backend connections given up because no SETTINGS came in time.
pub static BACKEND_SETTINGS_TIMEOUTS: AtomicU64 = AtomicU64::new(0);

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_each_observation_in_its_bucket() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let s = h.snapshot();
        let count = |bound: f64| s.buckets.iter().find(|(b, _)| *b == bound).map(|(_, n)| *n);
        assert_eq!(count(0.000_1), Some(1));
        assert_eq!(count(0.005), Some(1));
        assert_eq!(count(5.0), Some(0));
        assert_eq!(count(f64::INFINITY), Some(1));
        assert_eq!(s.count, 3);
        assert!((s.sum_seconds - 10.003_05).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn selections_count_by_algorithm() {
        let s = Selections::new();
        s.count(Algorithm::RoundRobin);
        s.count(Algorithm::RoundRobin);
        s.count(Algorithm::LeastRequest);
        let got = Algorithm::ALL.map(|a| s.get(a));
        assert_eq!(got, [0, 2, 1]);
    }
}
