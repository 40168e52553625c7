//! Failure accrual for L4 ports: a backend whose connects keep failing
//! (refused, unreachable, timed out; counted per backend by sock_ops,
//! `BackendStats::connect_failures`) leaves its services' slots for a
//! backoff, then the agent probes it with a real connect and puts it back
//! when one succeeds. The same policy as the router's per-stream accrual
//! (`balancer_router::accrual`): consecutive failures, a backoff doubling
//! from `min_backoff` to `max_backoff`, and at most a share of a service's
//! backends out at once, never the last. kube-proxy cannot do this: it
//! never sees a connection fail.
//!
//! Only `tcp` ports: http2 ports are the router's, which judges streams.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use balancer_common::{BackendStats, Mode};
use balancer_router::accrual::{Policy, max_ejected};

use crate::state::Frontend;

/// What the kernel's counts said last, per backend.
#[derive(Debug, Clone, Copy)]
struct Seen {
    failures: u64,
    established: u64,
    /// Failed connects since the last one that established.
    consecutive: u64,
}

/// An ejected backend.
#[derive(Debug, Clone, Copy)]
struct Out {
    since: Instant,
    until: Instant,
    backoff: Duration,
    probing: bool,
}

#[derive(Debug, Default)]
pub struct L4Accrual {
    pub policy: Policy,
    seen: HashMap<SocketAddr, Seen>,
    out: HashMap<SocketAddr, Out>,
    pub ejections: u64,
}

impl L4Accrual {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// The kernel's counts of `addr` now; true if it was ejected.
    pub fn observe(&mut self, addr: SocketAddr, st: &BackendStats, now: Instant) -> bool {
        // First look: everything since the backend's counts began.
        let prev = *self.seen.entry(addr).or_insert(Seen {
            failures: 0,
            established: 0,
            consecutive: 0,
        });
        let failed = st.connect_failures.saturating_sub(prev.failures);
        let established = st.total.saturating_sub(prev.established);
        // Within one look the order is unknown: one connect that
        // established means the backend takes connections.
        let consecutive = if established > 0 {
            0
        } else {
            prev.consecutive + failed
        };
        let mut seen = Seen {
            failures: st.connect_failures,
            established: st.total,
            consecutive,
        };
        let eject = self.policy.consecutive > 0
            && consecutive >= u64::from(self.policy.consecutive)
            && !self.out.contains_key(&addr);
        if eject {
            let backoff = self.policy.min_backoff;
            self.out.insert(
                addr,
                Out {
                    since: now,
                    until: now + backoff,
                    backoff,
                    probing: false,
                },
            );
            self.ejections += 1;
            seen.consecutive = 0;
            tracing::warn!(%addr, failures = consecutive, ?backoff, "backend ejected: its connects fail");
        }
        self.seen.insert(addr, seen);
        eject
    }

    /// Ejected backends whose backoff is over and that no probe is trying:
    /// they are marked as probing.
    pub fn due_probes(&mut self, now: Instant) -> Vec<SocketAddr> {
        let mut due = Vec::new();
        for (addr, o) in &mut self.out {
            if !o.probing && now >= o.until {
                o.probing = true;
                due.push(*addr);
            }
        }
        due
    }

    /// A probe's result; true if `addr` is back.
    pub fn probe_result(&mut self, addr: SocketAddr, ok: bool, now: Instant) -> bool {
        if ok {
            if self.out.remove(&addr).is_some() {
                tracing::info!(%addr, "backend answered its probe: back in its services");
                return true;
            }
            return false;
        }
        if let Some(o) = self.out.get_mut(&addr) {
            o.backoff = (o.backoff * 2).min(self.policy.max_backoff);
            o.until = now + o.backoff;
            o.probing = false;
            tracing::debug!(%addr, backoff = ?o.backoff, "probe failed: ejected for longer");
        }
        false
    }

    /// Take ejected backends out of the `tcp` frontends, at most the
    /// policy's share of each (those ejected first), never the last.
    pub fn filter(&self, frontends: &mut [Frontend]) {
        if self.out.is_empty() {
            return;
        }
        for f in frontends.iter_mut().filter(|f| f.mode == Mode::Tcp) {
            let mut ejected: Vec<(Instant, SocketAddr)> = f
                .backends
                .iter()
                .filter_map(|b| self.out.get(b).map(|o| (o.since, *b)))
                .collect();
            if ejected.is_empty() {
                continue;
            }
            ejected.sort();
            let cap = max_ejected(&self.policy, f.backends.len());
            let gone: Vec<SocketAddr> = ejected.into_iter().take(cap).map(|(_, b)| b).collect();
            f.backends.retain(|b| !gone.contains(b));
        }
    }

    /// Forget backends no longer in any service.
    pub fn retain(&mut self, live: &std::collections::HashSet<SocketAddr>) {
        self.seen.retain(|a, _| live.contains(a));
        self.out.retain(|a, _| live.contains(a));
    }

    /// Ejected now: for how long still (ms; 0 while its probe runs).
    pub fn view(&self, addr: &SocketAddr, now: Instant) -> Option<u64> {
        self.out
            .get(addr)
            .map(|o| o.until.saturating_duration_since(now).as_millis() as u64)
    }

    pub fn ejected(&self) -> usize {
        self.out.len()
    }
}

/// Probe an ejected tcp backend with a real connect from the node (it is
/// back when it accepts one), and send the outcome to `tx`.
pub async fn probe(
    addr: std::net::SocketAddr,
    tx: tokio::sync::mpsc::Sender<(std::net::SocketAddr, bool)>,
) {
    let ok = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let _ = tx.send((addr, ok)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Algorithm;

    fn stats(failures: u64, total: u64) -> BackendStats {
        BackendStats {
            connect_failures: failures,
            total,
            ..BackendStats::default()
        }
    }

    fn frontend(n: u8) -> Frontend {
        Frontend {
            vip: "198.19.0.1:80".parse().expect("vip"),
            algorithm: Algorithm::LeastConn,
            mode: Mode::Tcp,
            affinity_timeout_s: 0,
            backends: (0..n)
                .map(|i| format!("198.18.1.{}:8080", 10 + i).parse().expect("addr"))
                .collect(),
        }
    }

    #[test]
    fn consecutive_failed_connects_eject_and_a_probe_brings_it_back() {
        let mut a = L4Accrual::new(Policy::default());
        let b: SocketAddr = "198.18.1.10:8080".parse().expect("addr");
        let t = Instant::now();
        assert!(!a.observe(b, &stats(0, 10), t));
        // Failures interleaved with successes: not ejected.
        assert!(!a.observe(b, &stats(3, 11), t));
        assert!(!a.observe(b, &stats(6, 12), t));
        // Five in a row.
        assert!(!a.observe(b, &stats(9, 12), t));
        assert!(a.observe(b, &stats(11, 12), t));
        assert_eq!(a.view(&b, t), Some(1000));
        assert!(a.due_probes(t).is_empty());
        let later = t + Duration::from_millis(1000);
        assert_eq!(a.due_probes(later), vec![b]);
        assert!(a.due_probes(later).is_empty(), "one probe at a time");
        assert!(!a.probe_result(b, false, later));
        assert_eq!(a.view(&b, later), Some(2000), "twice as long");
        let again = later + Duration::from_millis(2000);
        assert_eq!(a.due_probes(again), vec![b]);
        assert!(a.probe_result(b, true, again));
        assert_eq!(a.view(&b, again), None);
    }

    #[test]
    fn at_most_half_of_a_service_is_taken_out_and_never_the_last() {
        let mut a = L4Accrual::new(Policy::default());
        let t = Instant::now();
        let f = frontend(4);
        for (i, b) in f.backends.iter().take(3).enumerate() {
            a.observe(*b, &stats(0, 0), t);
            a.observe(*b, &stats(5, 0), t + Duration::from_millis(i as u64));
        }
        let mut fs = vec![f.clone()];
        a.filter(&mut fs);
        // The two ejected first are out; the third stays with the good one.
        assert_eq!(fs[0].backends, vec![f.backends[2], f.backends[3]]);
        let mut one = vec![frontend(1)];
        a.observe(one[0].backends[0], &stats(0, 0), t);
        a.observe(one[0].backends[0], &stats(9, 0), t);
        a.filter(&mut one);
        assert_eq!(one[0].backends.len(), 1, "never the last");
        // http2 ports are the router's.
        let mut h2 = vec![Frontend {
            mode: Mode::Http2,
            ..f.clone()
        }];
        a.filter(&mut h2);
        assert_eq!(h2[0].backends.len(), 4);
    }
}
