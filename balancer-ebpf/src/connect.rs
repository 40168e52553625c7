//! The cgroup sock_addr programs: `connect4`/`connect6` balance a connect()
//! to a service VIP (rewrite it to a backend, steer it to the router, or
//! refuse it), and `getpeername4`/`getpeername6` give the application the
//! VIP back.

use core::{num::NonZeroU32, ptr};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns,
        generated::{bpf_get_netns_cookie, bpf_set_retval},
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use balancer_common::{
    AffinityKey, Algorithm, Backend, Counter, H2_NOT, H2_UNKNOWN, Identity, Mode, PROTO_TCP,
    ROUTER_STALE_NS, SOCK_STEERED, ServiceKey, SockState,
    addr::{is_v4_mapped, v4_mapped, v4_word},
    select::{FULL_SCAN_MAX, avoid_marked, marked, pick_least_conn, pick_random, pick_round_robin},
};

use crate::{
    helpers::{
        affinity_get, affinity_put, backend, backend_failed_at, backend_load, config, count,
        load_user_ip6, netns_served, next_cursor, router_addr, router_listeners, service,
        slot_backend, store_user_ip6,
    },
    maps::{SERVICE_STATE, SOCK_STATE},
};

// Not in `aya_ebpf::bindings`, which has no socket types, protocols or
// errno values.
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const ECONNREFUSED: i32 = 111;
/// Return values of cgroup sock_addr programs (no binding names them).
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn balancer_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    let key = unsafe {
        ServiceKey {
            addr: v4_mapped((*sa).user_ip4),
            port: (*sa).user_port as u16,
            proto: PROTO_TCP,
            _pad: 0,
        }
    };
    match balance(&ctx, &key) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
        Verdict::Steer(addr, port) => {
            unsafe {
                (*sa).user_ip4 = addr[3];
                (*sa).user_port = u32::from(port);
            }
            ALLOW
        }
        Verdict::Rewrite(backend) => {
            let Some(v4) = v4_word(&backend.addr) else {
                count(Counter::FamilyMismatch);
                return refuse();
            };
            unsafe {
                (*sa).user_ip4 = v4;
                (*sa).user_port = u32::from(backend.port);
            }
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn balancer_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    let key = ServiceKey {
        addr: load_user_ip6(sa),
        port: unsafe { (*sa).user_port } as u16,
        proto: PROTO_TCP,
        _pad: 0,
    };
    match balance(&ctx, &key) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
        Verdict::Steer(addr, port) => {
            // router_for() picked the router of the VIP's family, so an
            // IPv4-mapped VIP gets the IPv4-mapped router address.
            store_user_ip6(sa, addr);
            unsafe { (*sa).user_port = u32::from(port) };
            ALLOW
        }
        Verdict::Rewrite(backend) => {
            if is_v4_mapped(&key.addr) != backend.is_v4() {
                count(Counter::FamilyMismatch);
                return refuse();
            }
            // An IPv4 backend behind an IPv4-mapped VIP stays IPv4-mapped:
            // the IPv6 socket connects to ::ffff:pod.
            store_user_ip6(sa, backend.addr);
            unsafe { (*sa).user_port = u32::from(backend.port) };
            ALLOW
        }
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn balancer_getpeername4(ctx: SockAddrContext) -> i32 {
    let st = unsafe { SOCK_STATE.get_ptr_mut(&ctx) };
    if st.is_null() {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    unsafe {
        (*sa).user_ip4 = (*st).vip_addr[3];
        (*sa).user_port = u32::from((*st).vip_port);
    }
    count(Counter::PeerRewritten);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn balancer_getpeername6(ctx: SockAddrContext) -> i32 {
    let st = unsafe { SOCK_STATE.get_ptr_mut(&ctx) };
    if st.is_null() {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    store_user_ip6(sa, unsafe { (*st).vip_addr });
    unsafe { (*sa).user_port = u32::from((*st).vip_port) };
    count(Counter::PeerRewritten);
    ALLOW
}

/// No slot chosen (see `balance`).
const NO_SLOT: u32 = u32::MAX;

enum Verdict {
    /// Not a service: leave the connect() alone.
    Pass,
    /// Rewrite the destination to this backend.
    Rewrite(Backend),
    /// An http2 port: send the connection to the router (address words and
    /// port, network order).
    Steer([u32; 4], u16),
    /// A service without a usable backend: fail with ECONNREFUSED, as
    /// kube-proxy's REJECT rule does.
    Refuse,
}

/// Pick a backend for a connect() to `key`, and record the choice in the
/// socket's storage for `sock_ops` and `getpeername`.
#[inline(always)]
fn balance(ctx: &SockAddrContext, key: &ServiceKey) -> Verdict {
    let Some(svc) = service(key) else {
        return Verdict::Pass;
    };
    let Some(n) = NonZeroU32::new(svc.backend_count) else {
        count(Counter::NoBackend);
        return Verdict::Refuse;
    };
    // Affinity pins a client to one backend, which per-stream routing
    // would undo: such ports stay at L4.
    if svc.mode == Mode::Http2 as u8
        && svc.affinity_timeout_s == 0
        && let Some(router) = router_for(ctx, key)
    {
        if record(ctx, key, SOCK_STEERED, 0, H2_NOT) {
            count(Counter::Steered);
            return Verdict::Steer(router.0, router.1);
        }
        // Without storage the router could not learn the VIP: balance this
        // connection at L4 instead.
    }
    let cursor = match SERVICE_STATE.get_ptr_mut(svc.id) {
        Some(state) => next_cursor(unsafe { ptr::addr_of_mut!((*state).cursor) }),
        None => 0,
    };
    let rand = unsafe { bpf_get_prandom_u32() };
    let affinity = if svc.affinity_timeout_s > 0 {
        Some(AffinityKey {
            netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
            service_id: svc.id,
            _pad: 0,
        })
    } else {
        None
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // A client pinned to a backend that refuses now is better served by
    // another, as kube-proxy would after the endpoint left.
    if let Some(akey) = &affinity
        && let Some(a) = affinity_get(akey)
        && now.saturating_sub(a.last_ns) < u64::from(svc.affinity_timeout_s) * 1_000_000_000
        && !backend_failed_at(a.backend_id).is_some_and(|t| marked(t, now))
        && let Some(backend) = backend(a.backend_id)
    {
        let backend_id = a.backend_id;
        affinity_put(akey, backend_id, now);
        count(Counter::AffinityHit);
        return finish(ctx, key, backend_id, backend);
    }
    // A backend whose connect failed under a second ago is passed over
    // (unless all are): sock_ops marks it the moment its SYN is refused or
    // times out, long before the agent's accrual could eject it, and an
    // established connect clears the mark.
    let is_marked = |slot: u32| {
        slot_backend(svc.id, slot)
            .and_then(backend_failed_at)
            .is_some_and(|t| marked(t, now))
    };
    // The choice as a plain u32, NO_SLOT for none: an `Option<u32>` whose
    // None leaves its payload undefined is copied as a register the
    // verifier sees as never written (`R7 !read_ok`), which one compiler
    // emitted here (Debian's rustc 1.96, the image's) and another did not.
    let mut passed_over = false;
    let slot: u32 = match Algorithm::from_u8(svc.algorithm) {
        Some(Algorithm::Random) => {
            count(Counter::SelectRandom);
            let first = pick_random(n, rand);
            let slot = avoid_marked(n, first, is_marked);
            passed_over = slot != first;
            slot
        }
        Some(Algorithm::RoundRobin) => {
            count(Counter::SelectRoundRobin);
            let first = pick_round_robin(n, cursor);
            let slot = avoid_marked(n, first, is_marked);
            passed_over = slot != first;
            slot
        }
        Some(Algorithm::LeastConn | Algorithm::LeastRequest) | None => {
            count(Counter::SelectLeastConn);
            // A marked backend weighs as if full: it wins only when every
            // candidate is marked.
            let pick = pick_least_conn(n, cursor, rand, |slot| {
                let (active, failed_at) = backend_load(slot_backend(svc.id, slot)?)?;
                Some(if marked(failed_at, now) {
                    passed_over = true;
                    u64::MAX
                } else {
                    active
                })
            })
            .unwrap_or(NO_SLOT);
            // P2C looks at two slots only: past FULL_SCAN_MAX, look on.
            if pick != NO_SLOT && n.get() > FULL_SCAN_MAX {
                avoid_marked(n, pick, is_marked)
            } else {
                pick
            }
        }
    };
    if passed_over {
        count(Counter::SteeredFromFailed);
    }
    if slot == NO_SLOT {
        count(Counter::LookupMiss);
        return Verdict::Refuse;
    }
    let Some(backend_id) = slot_backend(svc.id, slot) else {
        count(Counter::LookupMiss);
        return Verdict::Refuse;
    };
    let Some(backend) = backend(backend_id) else {
        count(Counter::LookupMiss);
        return Verdict::Refuse;
    };
    if let Some(akey) = &affinity {
        affinity_put(akey, backend_id, now);
    }
    finish(ctx, key, backend_id, backend)
}

/// Record the choice in the socket's storage (for sock_ops and
/// getpeername) and rewrite.
#[inline(always)]
fn finish(ctx: &SockAddrContext, key: &ServiceKey, backend_id: u32, backend: Backend) -> Verdict {
    // Balancing matters more than accounting: without storage, connect
    // anyway, uncounted.
    record(ctx, key, 0, backend_id, H2_UNKNOWN);
    count(Counter::Balanced);
    Verdict::Rewrite(backend)
}

/// Write the socket's storage: the VIP, how it was handled, its backend.
/// Returns false (and counts `StorageFull`) when there is no storage.
///
/// An existing entry (a socket that connects again after a failed attempt)
/// is repointed; its `counted` flag is left alone so a counted socket is
/// still uncounted exactly once.
#[inline(always)]
fn record(ctx: &SockAddrContext, key: &ServiceKey, flags: u8, backend_id: u32, h2: u8) -> bool {
    let mut fresh = SockState {
        vip_addr: key.addr,
        vip_port: key.port,
        counted: 0,
        flags,
        backend_id,
        h2,
        splice: 0,
        _pad: [0; 2],
        last_stream: 0,
    };
    let st = unsafe { SOCK_STATE.get_or_insert_ptr_mut(ctx, Some(&mut fresh)) };
    if st.is_null() {
        count(Counter::StorageFull);
        return false;
    }
    unsafe {
        (*st).vip_addr = key.addr;
        (*st).vip_port = key.port;
        (*st).flags = flags;
        (*st).backend_id = backend_id;
    }
    true
}

/// The router for a VIP's family, if one is configured, alive, and able
/// to serve this client's network namespace.
#[inline(always)]
fn router_for(ctx: &SockAddrContext, key: &ServiceKey) -> Option<([u32; 4], u16)> {
    let cfg = config()?;
    if cfg.router_port == 0 {
        return None;
    }
    // The router refreshes the heartbeat while it runs; a stale one
    // means the router is gone (crash, kill -9, upgrade gap): balance at L4.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(cfg.heartbeat_ns) > ROUTER_STALE_NS {
        count(Counter::RouterDown);
        return None;
    }
    // No router listening (it died, or drained with no successor): L4 now.
    if cfg.track_listeners != 0 && router_listeners().is_none_or(|n| unsafe { *n } == 0) {
        count(Counter::RouterDown);
        return None;
    }
    // Fail safe, never open: the router opens a client's pod connections
    // from the client's own network namespace, so a pod sees the client's
    // address (NetworkPolicy, source checks, logs). A namespace it has no
    // handle on (not yet discovered, or outside its namespace directory)
    // would reach pods from the node's address: balance it at L4 instead,
    // where connect() is rewritten in place and the address is kept.
    if cfg.identity == Identity::Pod as u8
        && !netns_served(unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) })
    {
        count(Counter::RouterUnserved);
        return None;
    }
    let addr = router_addr(cfg, &key.addr);
    if addr == [0; 4] {
        return None;
    }
    Some((addr, cfg.router_port))
}

#[inline(always)]
fn refuse() -> i32 {
    // A cgroup program that returns 0 fails the syscall with EPERM unless it
    // set another error first; ECONNREFUSED is what a client of a Service
    // without endpoints gets from kube-proxy, and what it retries on.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

#[inline(always)]
fn is_tcp(sa: *const bpf_sock_addr) -> bool {
    unsafe { (*sa).type_ == SOCK_STREAM && (*sa).protocol == IPPROTO_TCP }
}
