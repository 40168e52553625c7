//! The router's routing table: VIP:port -> the pool of its endpoints,
//! replaced whole on every generation, and the registry of every endpoint
//! the router knows, so that an endpoint's counters, latency estimate and
//! accrual survive updates, and one that left drains.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
};

use super::{
    endpoint::{Endpoint, Pool},
    table::Route,
};
use crate::api::EndpointStats;

#[derive(Default)]
pub struct RouteTable {
    /// Failure accrual for every endpoint and pool it makes (`--accrual-*`).
    policy: balancer_router::accrual::Policy,
    /// VIP:port -> endpoints of that http2 frontend. Replaced whole.
    table: RwLock<Arc<HashMap<SocketAddr, Arc<Pool>>>>,
    /// Every endpoint the router knows, so counters survive updates.
    registry: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
}

impl RouteTable {
    pub fn new(policy: balancer_router::accrual::Policy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Publish the http2 routes: build the new table, then swap it in.
    /// Endpoints that left drain: their streams finish, and no new one is
    /// sent to them.
    pub fn update(&self, routes: &[Route]) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut table = HashMap::new();
        let mut live = std::collections::HashSet::new();
        for f in routes {
            let eps: Vec<Arc<Endpoint>> = f
                .backends
                .iter()
                .map(|b| {
                    live.insert(*b);
                    let ep = registry
                        .entry(*b)
                        .or_insert_with(|| Arc::new(Endpoint::with_policy(*b, self.policy)))
                        .clone();
                    ep.draining
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    ep
                })
                .collect();
            table.insert(
                f.vip,
                Arc::new(Pool::with_policy(f.algorithm, eps, self.policy)),
            );
        }
        registry.retain(|addr, ep| {
            if live.contains(addr) {
                return true;
            }
            // Its pooled connection closes once its last stream ends.
            ep.draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            ep.outstanding.load(std::sync::atomic::Ordering::Relaxed) > 0
        });
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    pub fn pool(&self, vip: SocketAddr) -> Option<Arc<Pool>> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vip)
            .cloned()
    }

    pub fn pick(&self, vip: SocketAddr, exclude: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        self.pool(vip)?.pick(exclude)
    }

    /// Every endpoint the router knows (routed to, or draining with
    /// streams in flight), with its counters.
    pub fn endpoint_stats(&self) -> Vec<(SocketAddr, EndpointStats)> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::Instant::now();
        // Ejected where it counts: out of a service's pool after the cap.
        let out: std::collections::HashSet<SocketAddr> = self
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|pool| pool.ejected(now))
            .collect();
        let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = reg
            .iter()
            .map(|(addr, e)| {
                let ejected = e.accrual.view(now).filter(|_| out.contains(addr));
                (
                    *addr,
                    EndpointStats {
                        active_streams: e.outstanding.load(Relaxed),
                        streams_total: e.streams_total.load(Relaxed),
                        ewma_us: e.ewma().as_micros() as u64,
                        failures: e.failures.load(Relaxed),
                        consecutive_failures: e.accrual.consecutive(),
                        ejections: e.accrual.ejections.load(Relaxed),
                        ejected: ejected.map(|(why, _)| why.as_str().to_owned()),
                        ejected_for_ms: ejected.map_or(0, |(_, ms)| ms),
                        pod_connections: e.connections.load(Relaxed),
                    },
                )
            })
            .collect();
        v.sort_by_key(|(a, _)| *a);
        v
    }

    /// The number of http2 service ports in the table.
    pub fn len(&self) -> usize {
        self.table.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;
    use crate::router::endpoint::Algorithm;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 1, 10 + i], 8080))
    }

    fn vip() -> SocketAddr {
        "198.19.0.20:80".parse().expect("vip")
    }

    fn route(eps: &[u8]) -> Route {
        Route {
            vip: vip(),
            algorithm: Algorithm::RoundRobin,
            backends: eps.iter().map(|i| addr(*i)).collect(),
        }
    }

    fn picks(t: &RouteTable, n: usize) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = (0..n)
            .filter_map(|_| t.pick(vip(), &[]).map(|e| e.addr))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The router's accrual policy reaches every endpoint and pool the
    /// table makes (it is handed in, not read from a static): with
    /// `consecutive` 1 and up to 100% ejected, one failed stream ejects a
    /// pod and the pool stops picking it; under the default policy (5 in
    /// a row) one failure ejects nothing.
    #[test]
    fn the_tables_accrual_policy_is_the_one_it_was_given() {
        use balancer_router::accrual::{Failure, Policy};
        let now = std::time::Instant::now();
        let strict = RouteTable::new(Policy {
            consecutive: 1,
            max_ejected_percent: 100,
            ..Policy::default()
        });
        strict.update(&[route(&[0, 1])]);
        let pool = strict.pool(vip()).expect("pool");
        pool.endpoints[0].failed(Failure::Reset, now);
        assert!(pool.endpoints[0].accrual.view(now).is_some(), "ejected");
        assert_eq!(picks(&strict, 8), vec![addr(1)]);

        let lenient = RouteTable::default();
        lenient.update(&[route(&[0, 1])]);
        let pool = lenient.pool(vip()).expect("pool");
        pool.endpoints[0].failed(Failure::Reset, now);
        assert!(pool.endpoints[0].accrual.view(now).is_none());
        assert_eq!(picks(&lenient, 8), vec![addr(0), addr(1)]);
    }

    #[test]
    fn streams_go_only_to_the_endpoints_of_the_current_table() {
        let t = RouteTable::default();
        assert!(t.pick(vip(), &[]).is_none(), "no table yet: no endpoint");
        t.update(&[route(&[0, 1])]);
        assert_eq!(t.len(), 1);
        assert_eq!(picks(&t, 8), vec![addr(0), addr(1)]);
        t.update(&[route(&[1, 2])]);
        assert_eq!(picks(&t, 8), vec![addr(1), addr(2)]);
        t.update(&[]);
        assert_eq!(t.len(), 0);
        assert!(t.pick(vip(), &[]).is_none());
    }

    #[test]
    fn a_removed_endpoint_with_streams_drains_and_one_without_is_forgotten() {
        let t = RouteTable::default();
        t.update(&[route(&[0, 1, 2])]);
        let busy = t.pool(vip()).expect("pool").endpoints[0].clone();
        assert_eq!(busy.addr, addr(0));
        let inflight = busy.start();
        t.update(&[route(&[2])]);
        // addr(0) has a stream in flight: kept, draining, never picked;
        // addr(1) had none: gone.
        let known: Vec<SocketAddr> = t.endpoint_stats().iter().map(|(a, _)| *a).collect();
        assert_eq!(known, vec![addr(0), addr(2)]);
        assert!(busy.draining.load(Relaxed));
        assert_eq!(picks(&t, 8), vec![addr(2)]);
        assert_eq!(t.endpoint_stats()[0].1.active_streams, 1);
        // Its last stream ends: the next update lets it go.
        drop(inflight);
        t.update(&[route(&[2])]);
        let known: Vec<SocketAddr> = t.endpoint_stats().iter().map(|(a, _)| *a).collect();
        assert_eq!(known, vec![addr(2)]);
    }

    #[test]
    fn an_endpoint_that_comes_back_keeps_its_counters_and_stops_draining() {
        let t = RouteTable::default();
        t.update(&[route(&[0, 1])]);
        let ep = t.pool(vip()).expect("pool").endpoints[0].clone();
        let inflight = ep.start();
        t.update(&[route(&[1])]);
        assert!(ep.draining.load(Relaxed));
        t.update(&[route(&[0, 1])]);
        assert!(!ep.draining.load(Relaxed), "routed again");
        let again = t.pool(vip()).expect("pool").endpoints[0].clone();
        assert!(
            Arc::ptr_eq(&ep, &again),
            "the same endpoint, with its counters"
        );
        assert_eq!(again.outstanding.load(Relaxed), 1);
        drop(inflight);
        assert_eq!(picks(&t, 8), vec![addr(0), addr(1)]);
    }
}
