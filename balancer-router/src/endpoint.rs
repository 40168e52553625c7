//! Per-stream endpoint choice for the HTTP/2 router.
//!
//! `least-request` is P2C over a peak-biased latency EWMA, after linkerd's
//! PeakEWMA: sample two endpoints, take the one with the lower cost
//! `ewma_rtt * (outstanding + 1)`. The estimate rises towards slower samples
//! ten times faster ([`RISE`]) than it falls towards faster ones
//! ([`DECAY`]), so a pod that turns slow is avoided within about a second
//! and trusted again slowly. New endpoints are seeded with a default
//! estimate so they are tried, not flooded.
//!
//! Why not linkerd's pure peak (jump to any slower sample at once): on a
//! busy node a single scheduling hiccup then sets a pod's cost for the next
//! ten seconds, and equal pods end up uneven. Measured here, 10,000 RPCs
//! over 4 equal pods: 1,967 to 3,069 per pod with the pure peak, and still
//! 2,282 to 2,654 with this estimate and plain P2C, because scheduling noise
//! on a 2-core node makes equal pods briefly unequal. So the first candidate
//! rotates (round-robin) and the random second one wins only when it is
//! clearly cheaper (`CLEARLY_CHEAPER`, a cost 1.5x lower).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Seed of a new endpoint's latency estimate.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Time constant of the estimate's decay towards faster samples.
pub const DECAY: Duration = Duration::from_secs(10);
/// Time constant of its rise towards slower samples.
pub const RISE: Duration = Duration::from_secs(1);
/// The random candidate must cost less than the rotating one by this
/// factor to be taken (hysteresis against noise).
const CLEARLY_CHEAPER: f64 = 1.5;

#[derive(Debug)]
struct Ewma {
    /// Nanoseconds.
    estimate: f64,
    at: Instant,
    /// Samples seen; the first is not trusted (see [`Endpoint::observe`]).
    samples: u64,
}

/// One backend of the router, shared by every service that uses it; its
/// counters outlive service updates while streams are in flight.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub outstanding: AtomicU64,
    pub streams_total: AtomicU64,
    /// Streams that failed (see [`crate::accrual::Failure`]).
    pub failures: AtomicU64,
    /// Set when the endpoint left every service: no new streams.
    pub draining: AtomicBool,
    /// Pod connections open to it now, of every origin and worker.
    pub connections: AtomicU64,
    /// Failure accrual: ejected after consecutive failures.
    pub accrual: crate::accrual::Accrual,
    ewma: Mutex<Ewma>,
    /// The estimate's f64 bits, for picks that read it without the lock.
    estimate_bits: AtomicU64,
}

impl Endpoint {
    /// An endpoint under the default accrual policy (tests, fuzzing).
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_policy(addr, crate::accrual::Policy::default())
    }

    /// An endpoint under the router's accrual `policy`.
    pub fn with_policy(addr: SocketAddr, policy: crate::accrual::Policy) -> Self {
        Self {
            addr,
            outstanding: AtomicU64::new(0),
            streams_total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            accrual: crate::accrual::Accrual::new(policy),
            ewma: Mutex::new(Ewma {
                estimate: DEFAULT_RTT.as_nanos() as f64,
                at: Instant::now(),
                samples: 0,
            }),
            estimate_bits: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
        }
    }

    /// The latency estimate as of its last sample (it moves only when a
    /// sample comes; no decay is applied between samples).
    pub fn ewma(&self) -> Duration {
        let e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        Duration::from_nanos(e.estimate as u64)
    }

    /// Record a stream's time to response headers.
    ///
    /// The first response of an endpoint is not counted: it carries the
    /// pod's warm-up (first request on a fresh process, thread pools,
    /// lazy init). Counted, it set the estimate whole (the seed is old by
    /// then) and made that pod look slow for the next ten seconds; measured
    /// here with sequential gRPC calls, one pod took half of them.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let mut e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        e.samples += 1;
        if e.samples == 1 {
            e.at = now;
            return;
        }
        let sample = rtt.as_nanos() as f64;
        let tau = if sample > e.estimate { RISE } else { DECAY };
        let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
        let w = (-elapsed / tau.as_secs_f64()).exp();
        e.estimate = e.estimate * w + sample * (1.0 - w);
        e.at = now;
        self.estimate_bits
            .store(e.estimate.to_bits(), Ordering::Relaxed);
    }

    fn estimate_ns(&self) -> f64 {
        f64::from_bits(self.estimate_bits.load(Ordering::Relaxed))
    }

    /// Start a stream on this endpoint; the guard ends it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.streams_total.fetch_add(1, Ordering::Relaxed);
        InFlight {
            ep: self.clone(),
            started: Mutex::new(Instant::now()),
            judged: AtomicBool::new(false),
        }
    }

    /// A failure of the endpoint itself (not of one stream): a connect.
    pub fn failed(&self, why: crate::accrual::Failure, now: Instant) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if self.accrual.failure(why, now) {
            tracing::warn!(endpoint = %self.addr, reason = why.as_str(), "endpoint ejected");
        }
    }
}

/// A stream in flight on an endpoint.
#[derive(Debug)]
pub struct InFlight {
    pub ep: Arc<Endpoint>,
    started: Mutex<Instant>,
    /// Its outcome was recorded (success or failure).
    judged: AtomicBool,
}

impl InFlight {
    /// The request went out on an established backend connection: the
    /// latency sample starts here, so our own connection setup (TCP and
    /// HTTP/2 handshakes, waiting for a stream slot) is not charged to the
    /// endpoint.
    pub fn sent(&self) {
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// The pod answered this stream well (its response headers): the
    /// endpoint is healthy.
    pub fn succeeded(&self) {
        if !self.judged.swap(true, Ordering::Relaxed) {
            self.ep.accrual.success();
        }
    }

    /// The pod failed this stream.
    pub fn failed(&self, why: crate::accrual::Failure, now: Instant) {
        if !self.judged.swap(true, Ordering::Relaxed) {
            self.ep.failed(why, now);
        }
    }

    /// Response headers arrived: feed the latency estimate.
    pub fn responded(&self) {
        let now = Instant::now();
        let started = *self.started.lock().unwrap_or_else(|p| p.into_inner());
        self.ep.observe(now - started, now);
        crate::stats::LATENCY.observe(now - started);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ep.outstanding.fetch_sub(1, Ordering::Relaxed);
        if !self.judged.load(Ordering::Relaxed)
            && self.ep.accrual.standing(Instant::now()) == crate::accrual::Standing::Probing
        {
            // Maybe the probe, cancelled unanswered: let another go.
            self.ep.accrual.release_probe();
        }
    }
}

/// Latency counts only once one endpoint is clearly slower than the other.
const SLOWER: f64 = 2.0;

/// Costs of two candidates: `(outstanding + 1) * latency factor`, where the
/// factor is the ratio of the two latency estimates when it exceeds
/// [`SLOWER`], else 1. Equal pods so compare on outstanding streams alone
/// (latency noise on a busy node moved 20% of the load between equal pods
/// in the benchmark), and a pod twice as slow or worse is weighted by how
/// much slower it is.
fn costs(a: &Endpoint, b: &Endpoint) -> (f64, f64) {
    let (ea, eb) = (a.estimate_ns().max(1.0), b.estimate_ns().max(1.0));
    let fa = if ea > SLOWER * eb { ea / eb } else { 1.0 };
    let fb = if eb > SLOWER * ea { eb / ea } else { 1.0 };
    let oa = a.outstanding.load(Ordering::Relaxed) as f64 + 1.0;
    let ob = b.outstanding.load(Ordering::Relaxed) as f64 + 1.0;
    (oa * fa, ob * fb)
}

/// How a pool chooses an endpoint for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Random = 0,
    RoundRobin = 1,
    /// P2C over outstanding streams and latency (see the module docs).
    LeastRequest = 2,
}

impl Algorithm {
    /// Every algorithm, in index order (the order of
    /// [`crate::stats::Selections`]).
    pub const ALL: [Self; 3] = [Self::Random, Self::RoundRobin, Self::LeastRequest];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::RoundRobin => "round-robin",
            Self::LeastRequest => "least-request",
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < Algorithm::ALL.len() {
        assert!(Algorithm::ALL[i] as usize == i);
        i += 1;
    }
};

/// A port's algorithm in the maps, as the router applies it per stream:
/// least-conn (the kernel's default, for L4) means least outstanding
/// streams here. The agent's desired-state `Algorithm` converts to and
/// from the maps' beside its definition (balancer-agent's `state.rs`); this
/// one lives here because only this crate may implement it.
impl From<balancer_common::Algorithm> for Algorithm {
    fn from(a: balancer_common::Algorithm) -> Self {
        match a {
            balancer_common::Algorithm::Random => Self::Random,
            balancer_common::Algorithm::RoundRobin => Self::RoundRobin,
            balancer_common::Algorithm::LeastConn | balancer_common::Algorithm::LeastRequest => {
                Self::LeastRequest
            }
        }
    }
}

/// The endpoints of one http2 frontend.
#[derive(Debug)]
pub struct Pool {
    pub algorithm: Algorithm,
    pub endpoints: Vec<Arc<Endpoint>>,
    cursor: AtomicU64,
    /// Its share of endpoints that may be ejected at once
    /// (`max_ejected_percent`) comes from here.
    policy: crate::accrual::Policy,
}

impl Pool {
    /// A pool under the default accrual policy (tests, fuzzing).
    pub fn new(algorithm: Algorithm, endpoints: Vec<Arc<Endpoint>>) -> Self {
        Self::with_policy(algorithm, endpoints, crate::accrual::Policy::default())
    }

    /// A pool under the router's accrual `policy`.
    pub fn with_policy(
        algorithm: Algorithm,
        endpoints: Vec<Arc<Endpoint>>,
        policy: crate::accrual::Policy,
    ) -> Self {
        Self {
            algorithm,
            endpoints,
            cursor: AtomicU64::new(0),
            policy,
        }
    }

    /// The endpoints that may take a stream now: the healthy ones, and
    /// ejected ones beyond the cap (those whose ejection ends first), so
    /// that at most [`max_ejected`](crate::accrual::max_ejected) are out;
    /// or, as the first choice, an ejected one whose backoff is over (its
    /// probe).
    fn serving(&self, now: Instant) -> Result<Vec<&Arc<Endpoint>>, Arc<Endpoint>> {
        use crate::accrual::Standing;
        let mut healthy = Vec::with_capacity(self.endpoints.len());
        let mut out: Vec<(u64, &Arc<Endpoint>)> = Vec::new();
        for e in &self.endpoints {
            match e.accrual.standing(now) {
                Standing::Healthy => healthy.push(e),
                Standing::ProbeDue if e.accrual.claim_probe() => return Err(e.clone()),
                Standing::Ejected(until) => out.push((until, e)),
                Standing::ProbeDue | Standing::Probing => out.push((0, e)),
            }
        }
        let cap = crate::accrual::max_ejected(&self.policy, self.endpoints.len());
        if out.len() > cap {
            out.sort_by_key(|(until, _)| *until);
            let back = out.len() - cap;
            healthy.extend(out.into_iter().take(back).map(|(_, e)| e));
        }
        Ok(healthy)
    }

    /// The endpoints ejected in this pool now, after the cap: those that
    /// get no stream but a probe.
    pub fn ejected(&self, now: Instant) -> Vec<SocketAddr> {
        let mut out: Vec<(u64, SocketAddr)> = self
            .endpoints
            .iter()
            .filter_map(|e| match e.accrual.standing(now) {
                crate::accrual::Standing::Healthy => None,
                crate::accrual::Standing::Ejected(until) => Some((until, e.addr)),
                _ => Some((0, e.addr)),
            })
            .collect();
        let cap = crate::accrual::max_ejected(&self.policy, self.endpoints.len());
        out.sort_by_key(|(until, _)| *until);
        // The cap lets in those whose ejection ends first.
        let back = out.len().saturating_sub(cap);
        out.into_iter().skip(back).map(|(_, a)| a).collect()
    }

    /// Choose an endpoint, skipping ejected ones (see `Pool::serving`)
    /// and those in `exclude` (already tried for this stream) when others
    /// remain.
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        // The common case, once per stream: nothing ejected, nothing tried
        // yet. Choose over the pool as it is, without collecting it.
        if exclude.is_empty() && self.endpoints.iter().all(|e| e.accrual.is_healthy()) {
            let i = self.choose(&self.endpoints)?;
            return Some(self.endpoints[i].clone());
        }
        let serving = match self.serving(Instant::now()) {
            Ok(s) => s,
            Err(probe) if !exclude.contains(&probe.addr) => return Some(probe),
            Err(probe) => {
                probe.accrual.release_probe();
                self.endpoints.iter().collect()
            }
        };
        let candidates: Vec<&Arc<Endpoint>> = {
            let fresh: Vec<_> = serving
                .iter()
                .copied()
                .filter(|e| !exclude.contains(&e.addr))
                .collect();
            if fresh.is_empty() { serving } else { fresh }
        };
        let i = self.choose(&candidates)?;
        Some(candidates[i].clone())
    }

    /// The algorithm's choice among `candidates` (an index), None if there
    /// are none.
    fn choose<E: AsRef<Endpoint>>(&self, candidates: &[E]) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        crate::stats::SELECTIONS.count(self.algorithm);
        let rotate = || (self.cursor.fetch_add(1, Ordering::Relaxed) % n as u64) as usize;
        Some(match self.algorithm {
            _ if n == 1 => 0,
            Algorithm::Random => fastrand::usize(..n),
            Algorithm::RoundRobin => rotate(),
            Algorithm::LeastRequest => {
                // The first choice rotates, the second is random; the
                // second wins only when clearly cheaper. Equal pods so
                // get a round-robin spread instead of P2C's random one,
                // and a busy or slow pod is still avoided.
                let a = rotate();
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (ca, cb) = costs(candidates[a].as_ref(), candidates[b].as_ref());
                if cb * CLEARLY_CHEAPER < ca { b } else { a }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                Arc::new(Endpoint::new(
                    format!("198.18.1.{}:80", 10 + i).parse().expect("sa"),
                ))
            })
            .collect()
    }

    #[test]
    fn estimate_rises_fast_and_falls_slowly() {
        let e = Endpoint::new("198.18.1.1:80".parse().expect("sa"));
        let t0 = Instant::now();
        // A pod turns slow: 50 ms answers, one per 10 ms, for 2 s.
        for i in 1..=200 {
            e.observe(
                Duration::from_millis(50),
                t0 + Duration::from_millis(10 * i),
            );
        }
        let slow = e.ewma().as_secs_f64() * 1000.0;
        assert!(slow > 40.0, "after 2 s of 50 ms answers: {slow} ms");
        // It recovers: 1 ms answers for 2 s bring it down only part way.
        let t1 = t0 + Duration::from_secs(2);
        for i in 1..=200 {
            e.observe(Duration::from_millis(1), t1 + Duration::from_millis(10 * i));
        }
        let after = e.ewma().as_secs_f64() * 1000.0;
        assert!(
            (30.0..45.0).contains(&after),
            "2 s into recovery: {after} ms"
        );
        // A single hiccup barely moves a settled estimate.
        let f = Endpoint::new("198.18.1.2:80".parse().expect("sa"));
        for i in 1..=100 {
            f.observe(Duration::from_millis(1), t0 + Duration::from_millis(i));
        }
        f.observe(Duration::from_millis(20), t0 + Duration::from_millis(101));
        assert!(f.ewma() < Duration::from_micros(1100), "{:?}", f.ewma());
    }

    #[test]
    fn a_slow_first_answer_is_warm_up_not_a_slow_pod() {
        let e = Endpoint::new("198.18.1.1:80".parse().expect("sa"));
        let t0 = Instant::now() + Duration::from_secs(3);
        e.observe(Duration::from_millis(40), t0);
        assert_eq!(e.ewma(), DEFAULT_RTT);
        // Then it answers in 1 ms: the estimate stays there.
        for i in 1..=50 {
            e.observe(Duration::from_millis(1), t0 + Duration::from_millis(4 * i));
        }
        assert!(e.ewma() < Duration::from_micros(1100), "{:?}", e.ewma());
    }

    #[test]
    fn least_request_avoids_busy_and_slow_endpoints() {
        let e = eps(4);
        let pool = Pool::new(Algorithm::LeastRequest, e.clone());
        let _busy: Vec<InFlight> = (0..50).map(|_| e[0].start()).collect();
        // A warm-up answer, then five seconds later a 100 ms one.
        let t0 = Instant::now();
        e[1].observe(Duration::from_millis(1), t0);
        e[1].observe(Duration::from_millis(100), t0 + Duration::from_secs(5));
        let mut hits = [0; 4];
        for _ in 0..2000 {
            let p = pool.pick(&[]).expect("pick");
            hits[e.iter().position(|x| x.addr == p.addr).expect("known")] += 1;
        }
        // With two choices, the pair {busy, slow} still yields the less bad
        // of the two (one pick in six); everything else avoids both.
        assert!(hits[0] + hits[1] < 400 && hits[1] < 100, "{hits:?}");
        assert!(hits[2] > 800 && hits[3] > 800, "{hits:?}");
    }

    #[test]
    fn least_request_spreads_evenly_under_equal_load() {
        let e = eps(4);
        let pool = Pool::new(Algorithm::LeastRequest, e.clone());
        let mut held = Vec::new();
        for _ in 0..400 {
            held.push(pool.pick(&[]).expect("pick").start());
        }
        for ep in &e {
            let n = ep.outstanding.load(Ordering::Relaxed);
            assert!((90..=110).contains(&n), "{n}");
        }
        drop(held);
        assert!(
            e.iter()
                .all(|ep| ep.outstanding.load(Ordering::Relaxed) == 0)
        );
        assert_eq!(
            e.iter()
                .map(|ep| ep.streams_total.load(Ordering::Relaxed))
                .sum::<u64>(),
            400
        );
    }

    #[test]
    fn round_robin_and_exclusion() {
        let e = eps(3);
        let pool = Pool::new(Algorithm::RoundRobin, e.clone());
        let order: Vec<SocketAddr> = (0..6).map(|_| pool.pick(&[]).expect("p").addr).collect();
        assert_eq!(order[0..3], order[3..6]);
        let p = pool.pick(&[e[0].addr, e[1].addr]).expect("p");
        assert_eq!(p.addr, e[2].addr);
        // Everything excluded: still answer (a retry may reuse one).
        assert!(pool.pick(&[e[0].addr, e[1].addr, e[2].addr]).is_some());
        assert!(Pool::new(Algorithm::Random, vec![]).pick(&[]).is_none());
    }
}
