//! Turning a desired set of frontends into ordered map writes.
//!
//! The kernel reads the maps while the agent writes them, one element at a
//! time. The order below guarantees a connect() never sees a half-updated
//! service (the same order Cilium uses):
//!
//! 1. new backends: stats entry first (so least-conn can read it), then the
//!    backend itself;
//! 2. the service's slots `0..n`, overwritten in place; a reader still using
//!    the old count sees either the old or the new backend in each slot, both
//!    of which exist;
//! 3. the service entry with the new count: the publication point;
//! 4. slots `n..old_n`, no longer reachable;
//! 5. removed services: the service entry first, then its slots;
//! 6. backends no longer referenced by any slot.
//!
//! Every operation is idempotent, so after a failed apply the next apply
//! from the same recorded state simply redoes what is needed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use balancer_common::{
    Backend, MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE, MAX_SERVICES, MAX_SLOTS, PROTO_TCP,
    ServiceKey, ServiceValue, SlotKey,
};

use crate::state::{Algorithm, Frontend};

/// One map write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert a zeroed stats entry unless one exists (a backend that comes
    /// back while its old connections are still open keeps its counts).
    EnsureStats(u32),
    PutBackend(u32, Backend),
    PutSlot(SlotKey, u32),
    PutService(ServiceKey, ServiceValue),
    DeleteSlot(SlotKey),
    DeleteService(ServiceKey),
    DeleteBackend(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{what}: {count} needed but the map holds at most {max}")]
    Capacity {
        what: &'static str,
        count: usize,
        max: u32,
    },
    #[error("frontend {vip} has {count} backends; at most {max} per service port")]
    TooManyBackends {
        vip: SocketAddr,
        count: usize,
        max: u32,
    },
    #[error("frontend {vip}: backend {backend} is not of the VIP's address family")]
    Family {
        vip: SocketAddr,
        backend: SocketAddr,
    },
}

pub use balancer_common::addr::{addr_words, words_addr};

/// The router's address as CONFIG holds it (`router4` or `router6`, and
/// the port in network order).
pub fn config_router_addr(cfg: &balancer_common::Config) -> SocketAddr {
    let words = if cfg.router4 != [0; 4] {
        cfg.router4
    } else {
        cfg.router6
    };
    SocketAddr::new(words_addr(words), u16::from_be(cfg.router_port))
}

/// Write `addr` into CONFIG's router address (the inverse of
/// [`config_router_addr`]).
pub fn set_config_router_addr(cfg: &mut balancer_common::Config, addr: SocketAddr) {
    cfg.router_port = addr.port().to_be();
    if addr.is_ipv4() {
        cfg.router4 = addr_words(addr.ip());
    } else {
        cfg.router6 = addr_words(addr.ip());
    }
}

pub fn service_key(vip: SocketAddr) -> ServiceKey {
    ServiceKey {
        addr: addr_words(vip.ip()),
        port: vip.port().to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    }
}

pub fn backend_value(addr: SocketAddr) -> Backend {
    Backend {
        addr: addr_words(addr.ip()),
        port: addr.port().to_be(),
        _pad: [0; 2],
    }
}

/// What the agent has programmed for one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programmed {
    pub id: u32,
    pub algorithm: Algorithm,
    pub mode: balancer_common::Mode,
    pub affinity_timeout_s: u32,
    pub backends: Vec<u32>,
}

/// The agent's record of what is in the maps, and the id allocators.
#[derive(Debug, Default)]
pub struct Programmer {
    pub services: BTreeMap<SocketAddr, Programmed>,
    pub backend_ids: HashMap<SocketAddr, u32>,
    next_backend_id: u32,
    /// Backends removed from every service whose stats entry is kept until
    /// their last connection closes: id -> address.
    pub draining: BTreeMap<u32, SocketAddr>,
}

impl Programmer {
    pub fn backend_id(&self, addr: &SocketAddr) -> Option<u32> {
        self.backend_ids.get(addr).copied()
    }

    /// The lowest free id at or above `from` (callers advance `from`, so a
    /// whole sync allocates in linear time).
    fn alloc_service_id(used: &BTreeSet<u32>, from: u32) -> Option<u32> {
        (from..MAX_SERVICES).find(|id| !used.contains(id))
    }

    fn alloc_backend_id(&mut self, taken: &dyn Fn(u32) -> bool) -> u32 {
        loop {
            self.next_backend_id = self.next_backend_id.wrapping_add(1);
            let id = self.next_backend_id;
            if id != 0 && !taken(id) {
                return id;
            }
        }
    }

    /// Rebuild the record from maps an earlier agent filled (adoption after
    /// a restart). Backends with stats but no longer in BACKENDS were
    /// draining; their addresses are gone with them, so they are kept under
    /// an unspecified address until their connections close.
    pub fn from_maps(
        services: &[(ServiceKey, ServiceValue)],
        slots: &[(SlotKey, u32)],
        backends: &[(u32, Backend)],
        stats: &[u32],
    ) -> Self {
        let addr_of = |b: &Backend| SocketAddr::new(words_addr(b.addr), u16::from_be(b.port));
        let by_id: HashMap<u32, SocketAddr> =
            backends.iter().map(|(id, b)| (*id, addr_of(b))).collect();
        let slot_of: HashMap<SlotKey, u32> = slots.iter().copied().collect();
        let mut p = Programmer::default();
        for (key, v) in services {
            let vip = SocketAddr::new(words_addr(key.addr), u16::from_be(key.port));
            let ids: Vec<u32> = (0..v.backend_count)
                .filter_map(|slot| {
                    slot_of
                        .get(&SlotKey {
                            service_id: v.id,
                            slot,
                        })
                        .copied()
                })
                .collect();
            let algorithm = balancer_common::Algorithm::from_u8(v.algorithm)
                .map_or(Algorithm::LeastConn, Algorithm::from);
            let mode = if v.mode == balancer_common::Mode::Http2 as u8 {
                balancer_common::Mode::Http2
            } else {
                balancer_common::Mode::Tcp
            };
            p.services.insert(
                vip,
                Programmed {
                    id: v.id,
                    algorithm,
                    mode,
                    affinity_timeout_s: v.affinity_timeout_s,
                    backends: ids,
                },
            );
        }
        for (id, addr) in &by_id {
            p.backend_ids.insert(*addr, *id);
        }
        for id in stats {
            if !by_id.contains_key(id) {
                p.draining.insert(*id, SocketAddr::from(([0, 0, 0, 0], 0)));
            }
        }
        p.next_backend_id = backends
            .iter()
            .map(|(id, _)| *id)
            .chain(stats.iter().copied())
            .max()
            .unwrap_or(0);
        p
    }

    /// Compute the ordered writes that move the maps from the recorded state
    /// to `target`, and the state to record once they are applied.
    pub fn plan(&mut self, target: &[Frontend]) -> Result<(Vec<Op>, PlanState), PlanError> {
        check_capacity(target)?;
        let mut ops = Vec::new();

        // Backend ids: keep existing ones, revive draining ones, allocate
        // the rest.
        let wanted: BTreeSet<SocketAddr> = target
            .iter()
            .flat_map(|f| f.backends.iter().copied())
            .collect();
        let mut ids = HashMap::new();
        let mut new_ids = Vec::new();
        // Built once: per-address lookups below must stay O(1), a sync of
        // 100,000 endpoints would otherwise be quadratic.
        let mut in_use: std::collections::HashSet<u32> = self
            .backend_ids
            .values()
            .chain(self.draining.keys())
            .copied()
            .collect();
        let draining_by_addr: HashMap<SocketAddr, u32> =
            self.draining.iter().map(|(id, a)| (*a, *id)).collect();
        for addr in &wanted {
            let id = match self.backend_ids.get(addr) {
                Some(id) => *id,
                None => match draining_by_addr.get(addr) {
                    Some(id) => *id,
                    None => {
                        let id = self.alloc_backend_id(&|id| in_use.contains(&id));
                        in_use.insert(id);
                        id
                    }
                },
            };
            if !self.backend_ids.contains_key(addr) {
                new_ids.push((id, *addr));
            }
            ids.insert(*addr, id);
        }
        for (id, addr) in &new_ids {
            ops.push(Op::EnsureStats(*id));
            ops.push(Op::PutBackend(*id, backend_value(*addr)));
        }

        // Services: changed and new ones.
        let mut used_service_ids: BTreeSet<u32> = self.services.values().map(|p| p.id).collect();
        let mut next_service_id = 0;
        let mut services = BTreeMap::new();
        for f in target {
            for b in &f.backends {
                if b.is_ipv4() != f.vip.is_ipv4() {
                    return Err(PlanError::Family {
                        vip: f.vip,
                        backend: *b,
                    });
                }
            }
            let backends: Vec<u32> = f.backends.iter().map(|b| ids[b]).collect();
            let old = self.services.get(&f.vip);
            let id = match old {
                Some(p) => p.id,
                None => {
                    let id = Self::alloc_service_id(&used_service_ids, next_service_id).ok_or(
                        PlanError::Capacity {
                            what: "service ids",
                            count: target.len(),
                            max: MAX_SERVICES,
                        },
                    )?;
                    used_service_ids.insert(id);
                    next_service_id = id + 1;
                    id
                }
            };
            let new = Programmed {
                id,
                algorithm: f.algorithm,
                mode: f.mode,
                affinity_timeout_s: f.affinity_timeout_s,
                backends,
            };
            if old != Some(&new) {
                let old_backends: &[u32] = old.map_or(&[], |p| &p.backends);
                for (slot, backend) in new.backends.iter().enumerate() {
                    if old_backends.get(slot) != Some(backend) {
                        ops.push(Op::PutSlot(slot_key(id, slot), *backend));
                    }
                }
                ops.push(Op::PutService(
                    service_key(f.vip),
                    ServiceValue {
                        id,
                        backend_count: new.backends.len() as u32,
                        algorithm: balancer_common::Algorithm::from(f.algorithm) as u8,
                        mode: f.mode as u8,
                        _pad: [0; 2],
                        affinity_timeout_s: f.affinity_timeout_s,
                    },
                ));
                for slot in new.backends.len()..old_backends.len() {
                    ops.push(Op::DeleteSlot(slot_key(id, slot)));
                }
            }
            services.insert(f.vip, new);
        }

        // Removed services.
        for (vip, old) in &self.services {
            if services.contains_key(vip) {
                continue;
            }
            ops.push(Op::DeleteService(service_key(*vip)));
            for slot in 0..old.backends.len() {
                ops.push(Op::DeleteSlot(slot_key(old.id, slot)));
            }
        }

        // Unreferenced backends: the backend goes, its stats stay while it
        // drains.
        let mut draining = self.draining.clone();
        draining.retain(|_, addr| !wanted.contains(addr));
        for (addr, id) in &self.backend_ids {
            if !wanted.contains(addr) {
                ops.push(Op::DeleteBackend(*id));
                draining.insert(*id, *addr);
            }
        }
        Ok((
            ops,
            PlanState {
                services,
                backend_ids: ids,
                draining,
            },
        ))
    }

    /// Record a plan's state once its operations were applied.
    pub fn commit(&mut self, state: PlanState) {
        self.services = state.services;
        self.backend_ids = state.backend_ids;
        self.draining = state.draining;
    }

    /// Forget a draining backend whose last connection closed; returns true
    /// when the caller should delete its stats entry.
    pub fn finish_draining(&mut self, id: u32) -> bool {
        self.draining.remove(&id).is_some()
    }

    /// Entries of SERVICES, SLOTS, BACKENDS and BACKEND_STATS, from the
    /// record of what was written (no map walk): every service has slots
    /// `0..n`, every referenced backend an entry and stats, every draining
    /// one its stats.
    pub fn fill(&self) -> Fill {
        Fill {
            services: self.services.len(),
            slots: self.services.values().map(|s| s.backends.len()).sum(),
            backends: self.backend_ids.len(),
            stats: self.backend_ids.len() + self.draining.len(),
        }
    }
}

/// Map entries, as [`Programmer::fill`] counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub services: usize,
    pub slots: usize,
    pub backends: usize,
    pub stats: usize,
}

/// The recorded state a plan leads to.
#[derive(Debug)]
pub struct PlanState {
    services: BTreeMap<SocketAddr, Programmed>,
    backend_ids: HashMap<SocketAddr, u32>,
    draining: BTreeMap<u32, SocketAddr>,
}

fn slot_key(service_id: u32, slot: usize) -> SlotKey {
    SlotKey {
        service_id,
        slot: slot as u32,
    }
}

fn check_capacity(target: &[Frontend]) -> Result<(), PlanError> {
    if target.len() > MAX_SERVICES as usize {
        return Err(PlanError::Capacity {
            what: "service ports (VIP:port pairs)",
            count: target.len(),
            max: MAX_SERVICES,
        });
    }
    let mut slots = 0usize;
    let mut backends = BTreeSet::new();
    for f in target {
        if f.backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
            return Err(PlanError::TooManyBackends {
                vip: f.vip,
                count: f.backends.len(),
                max: MAX_BACKENDS_PER_SERVICE,
            });
        }
        slots += f.backends.len();
        backends.extend(f.backends.iter().copied());
    }
    if slots > MAX_SLOTS as usize {
        return Err(PlanError::Capacity {
            what: "backend slots",
            count: slots,
            max: MAX_SLOTS,
        });
    }
    // Leave room for backends that are still draining.
    if backends.len() > MAX_BACKENDS as usize / 2 {
        return Err(PlanError::Capacity {
            what: "backends (pod address:port pairs)",
            count: backends.len(),
            max: MAX_BACKENDS / 2,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap as Map, HashSet};

    /// An in-memory copy of the kernel maps that checks, after every single
    /// write, what a concurrent connect() could observe.
    #[derive(Default, Debug)]
    struct Maps {
        services: Map<ServiceKey, ServiceValue>,
        slots: Map<SlotKey, u32>,
        backends: Map<u32, Backend>,
        stats: Map<u32, u64>,
    }

    impl Maps {
        fn apply(&mut self, op: &Op) {
            match op {
                Op::EnsureStats(id) => {
                    self.stats.entry(*id).or_insert(0);
                }
                Op::PutBackend(id, b) => {
                    self.backends.insert(*id, *b);
                }
                Op::PutSlot(k, v) => {
                    self.slots.insert(*k, *v);
                }
                Op::PutService(k, v) => {
                    self.services.insert(*k, *v);
                }
                Op::DeleteSlot(k) => {
                    self.slots.remove(k);
                }
                Op::DeleteService(k) => {
                    self.services.remove(k);
                }
                Op::DeleteBackend(id) => {
                    self.backends.remove(id);
                }
            }
        }

        /// What a connect() can see: every slot below a service's count
        /// leads to a backend with a stats entry. `allowed` holds, per
        /// service, the backends that may legitimately appear mid-update.
        fn assert_consistent(&self, allowed: &Map<ServiceKey, HashSet<Backend>>, step: &str) {
            for (key, svc) in &self.services {
                for slot in 0..svc.backend_count {
                    let k = SlotKey {
                        service_id: svc.id,
                        slot,
                    };
                    let id = self
                        .slots
                        .get(&k)
                        .unwrap_or_else(|| panic!("{step}: slot {slot} of {key:?} missing"));
                    let b = self
                        .backends
                        .get(id)
                        .unwrap_or_else(|| panic!("{step}: backend {id} missing"));
                    assert!(self.stats.contains_key(id), "{step}: stats {id} missing");
                    if let Some(ok) = allowed.get(key) {
                        assert!(
                            ok.contains(b),
                            "{step}: {key:?} reaches foreign backend {b:?}"
                        );
                    }
                }
            }
        }

        fn backends_of(&self, vip: &str) -> Vec<Backend> {
            let key = service_key(vip.parse().expect("vip"));
            let Some(svc) = self.services.get(&key) else {
                return vec![];
            };
            (0..svc.backend_count)
                .map(|slot| {
                    self.backends[&self.slots[&SlotKey {
                        service_id: svc.id,
                        slot,
                    }]]
                })
                .collect()
        }
    }

    fn fe(vip: &str, backends: &[&str]) -> Frontend {
        Frontend {
            vip: vip.parse().expect("vip"),
            algorithm: Algorithm::LeastConn,
            mode: balancer_common::Mode::Tcp,
            affinity_timeout_s: 0,
            backends: backends
                .iter()
                .map(|b| b.parse().expect("backend"))
                .collect(),
        }
    }

    fn be(addr: &str) -> Backend {
        backend_value(addr.parse().expect("backend"))
    }

    /// Apply `target` op by op, checking consistency after each.
    fn step(p: &mut Programmer, maps: &mut Maps, target: &[Frontend]) -> Vec<Op> {
        // A service may show old or new backends during the update.
        let mut allowed: Map<ServiceKey, HashSet<Backend>> = Map::new();
        for f in target {
            let key = service_key(f.vip);
            let set = allowed.entry(key).or_default();
            set.extend(f.backends.iter().map(|b| backend_value(*b)));
            set.extend(maps.backends_of(&f.vip.to_string()));
        }
        let (ops, state) = p.plan(target).expect("plan");
        for (i, op) in ops.iter().enumerate() {
            maps.apply(op);
            maps.assert_consistent(&allowed, &format!("op {i} {op:?}"));
        }
        p.commit(state);
        // What the agent counts without walking the maps is what is there.
        assert_eq!(
            p.fill(),
            Fill {
                services: maps.services.len(),
                slots: maps.slots.len(),
                backends: maps.backends.len(),
                stats: maps.stats.len(),
            },
            "after {ops:?}"
        );
        ops
    }

    #[test]
    fn update_order_never_exposes_a_half_updated_service() {
        let mut p = Programmer::default();
        let mut m = Maps::default();
        let a = "198.19.0.1:80";
        step(
            &mut p,
            &mut m,
            &[fe(
                a,
                &["198.18.0.1:8080", "198.18.0.2:8080", "198.18.0.3:8080"],
            )],
        );
        assert_eq!(m.backends_of(a).len(), 3);
        // Shrink, swap, grow, add a service, remove one.
        step(&mut p, &mut m, &[fe(a, &["198.18.0.2:8080"])]);
        assert_eq!(m.backends_of(a), vec![be("198.18.0.2:8080")]);
        step(
            &mut p,
            &mut m,
            &[fe(a, &["198.18.0.4:8080", "198.18.0.5:8080"])],
        );
        assert_eq!(
            m.backends_of(a),
            vec![be("198.18.0.4:8080"), be("198.18.0.5:8080")]
        );
        let b = "[fd00:19::1]:443";
        step(
            &mut p,
            &mut m,
            &[
                fe(
                    a,
                    &["198.18.0.4:8080", "198.18.0.5:8080", "198.18.0.6:8080"],
                ),
                fe(b, &["[fd00:18::1]:443"]),
            ],
        );
        assert_eq!(m.backends_of(a).len(), 3);
        assert_eq!(m.backends_of(b), vec![be("[fd00:18::1]:443")]);
        step(&mut p, &mut m, &[fe(b, &["[fd00:18::1]:443"])]);
        assert!(m.backends_of(a).is_empty());
        assert!(
            !m.services
                .contains_key(&service_key(a.parse().expect("vip")))
        );
        // Nothing leaks: one service, one slot, one live backend.
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.slots.len(), 1);
        assert_eq!(m.backends.len(), 1);
    }

    #[test]
    fn service_entry_is_written_after_its_slots_and_before_stale_slot_deletes() {
        let mut p = Programmer::default();
        let mut m = Maps::default();
        let a = "198.19.0.1:80";
        step(
            &mut p,
            &mut m,
            &[fe(a, &["198.18.0.1:80", "198.18.0.2:80", "198.18.0.3:80"])],
        );
        let ops = step(&mut p, &mut m, &[fe(a, &["198.18.0.9:80"])]);
        let pos = |pred: &dyn Fn(&Op) -> bool| ops.iter().position(pred).expect("op");
        let put_backend = pos(&|o| matches!(o, Op::PutBackend(..)));
        let put_slot = pos(&|o| matches!(o, Op::PutSlot(..)));
        let put_service = pos(&|o| matches!(o, Op::PutService(..)));
        let del_slot = pos(&|o| matches!(o, Op::DeleteSlot(..)));
        let del_backend = pos(&|o| matches!(o, Op::DeleteBackend(..)));
        assert!(put_backend < put_slot && put_slot < put_service);
        assert!(put_service < del_slot && del_slot < del_backend);
    }

    #[test]
    fn unchanged_state_writes_nothing_and_ids_are_stable() {
        let mut p = Programmer::default();
        let mut m = Maps::default();
        let t = [fe("198.19.0.1:80", &["198.18.0.1:80", "198.18.0.2:80"])];
        step(&mut p, &mut m, &t);
        let ids: Vec<u32> = p.services.values().map(|s| s.id).collect();
        assert!(step(&mut p, &mut m, &t).is_empty());
        assert_eq!(ids, p.services.values().map(|s| s.id).collect::<Vec<_>>());
    }

    #[test]
    fn removed_backend_drains_and_comes_back_with_its_id() {
        let mut p = Programmer::default();
        let mut m = Maps::default();
        let a = "198.19.0.1:80";
        step(
            &mut p,
            &mut m,
            &[fe(a, &["198.18.0.1:80", "198.18.0.2:80"])],
        );
        let id2 = p
            .backend_id(&"198.18.0.2:80".parse().expect("sa"))
            .expect("id");
        m.stats.insert(id2, 5); // live connections
        step(&mut p, &mut m, &[fe(a, &["198.18.0.1:80"])]);
        assert_eq!(
            p.draining.get(&id2).map(|a| a.to_string()).as_deref(),
            Some("198.18.0.2:80")
        );
        assert_eq!(m.stats[&id2], 5, "stats survive while draining");
        step(
            &mut p,
            &mut m,
            &[fe(a, &["198.18.0.1:80", "198.18.0.2:80"])],
        );
        assert_eq!(
            p.backend_id(&"198.18.0.2:80".parse().expect("sa")),
            Some(id2)
        );
        assert!(p.draining.is_empty());
        assert_eq!(m.stats[&id2], 5, "a revived backend keeps counting");
    }

    #[test]
    fn empty_service_is_published_with_zero_backends() {
        let mut p = Programmer::default();
        let mut m = Maps::default();
        step(&mut p, &mut m, &[fe("198.19.0.1:80", &[])]);
        let svc = m.services[&service_key("198.19.0.1:80".parse().expect("vip"))];
        assert_eq!(svc.backend_count, 0);
    }

    #[test]
    fn capacity_and_family_are_checked_before_any_write() {
        let mut p = Programmer::default();
        let too_many: Vec<String> = (0..=MAX_BACKENDS_PER_SERVICE)
            .map(|i| format!("198.18.{}.{}:80", i / 250, i % 250 + 1))
            .collect();
        let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
        let e = p.plan(&[fe("198.19.0.1:80", &refs)]).expect_err("too many");
        assert!(e.to_string().contains("per service port"), "{e}");
        let e = p
            .plan(&[fe("198.19.0.1:80", &["[fd00:18::1]:80"])])
            .expect_err("family");
        assert!(e.to_string().contains("address family"), "{e}");
        assert!(p.services.is_empty());
    }

    #[test]
    fn record_rebuilt_from_maps_makes_the_next_update_a_diff() {
        let mut p = Programmer::default();
        let mut m = Maps::default();
        let mut http2 = fe("198.19.0.2:80", &["198.18.0.3:8080"]);
        http2.algorithm = Algorithm::LeastRequest;
        http2.mode = balancer_common::Mode::Http2;
        let mut rr = fe("198.19.0.3:80", &["198.18.0.3:8080"]);
        rr.algorithm = Algorithm::RoundRobin;
        let t = [
            fe("198.19.0.1:80", &["198.18.0.1:8080", "198.18.0.2:8080"]),
            fe("[fd00:19::1]:443", &["[fd00:18::1]:443"]),
            // Every algorithm reads back as written (least-request too).
            http2,
            rr,
        ];
        step(&mut p, &mut m, &t);
        let services: Vec<_> = m.services.iter().map(|(k, v)| (*k, *v)).collect();
        let slots: Vec<_> = m.slots.iter().map(|(k, v)| (*k, *v)).collect();
        let backends: Vec<_> = m.backends.iter().map(|(k, v)| (*k, *v)).collect();
        let stats: Vec<_> = m.stats.keys().copied().collect();
        let mut adopted = Programmer::from_maps(&services, &slots, &backends, &stats);
        assert_eq!(adopted.services, p.services);
        assert_eq!(adopted.backend_ids, p.backend_ids);
        let (ops, _) = adopted.plan(&t).expect("plan");
        assert!(
            ops.is_empty(),
            "adoption then the same state writes nothing: {ops:?}"
        );
    }

    #[test]
    fn key_encoding_matches_the_kernel_view() {
        let k = service_key("198.19.0.10:80".parse().expect("vip"));
        assert_eq!(k.addr[3].to_ne_bytes(), [198, 19, 0, 10]);
        assert_eq!(k.addr[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        let b = backend_value("[fd00:18::1]:8080".parse().expect("sa"));
        assert_eq!(b.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0x18]);
        assert!(!b.is_v4());
        assert!(backend_value("1.2.3.4:1".parse().expect("sa")).is_v4());
    }
}
