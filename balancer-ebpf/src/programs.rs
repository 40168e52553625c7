use core::{
    ffi::c_void,
    intrinsics::AtomicOrdering,
    num::NonZeroU32,
    ptr::{self, read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, sk_msg_md,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SkStorage, SockHash},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns,
        generated::{
            bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_msg_apply_bytes, bpf_msg_cork_bytes,
            bpf_msg_pull_data, bpf_set_retval, bpf_sk_storage_get,
        },
    },
    macros::{btf_map, cgroup_sock_addr, sk_msg, sock_ops},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
};
use balancer_common::{
    AffinityKey, AffinityValue, Algorithm, Backend, BackendStats, COUNTER_COUNT, Config, Counter,
    H2_ACTIVE, H2_NOT, H2_UNKNOWN, MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS, Mode, OrigDst, PROTO_TCP,
    ROUTER_STALE_NS, SOCK_STEERED, SPLICE_OFF, SPLICE_ON, ServiceKey, ServiceState, ServiceValue,
    SlotKey, SockKey, SockState, SpliceKey,
    addr::{is_v4_mapped, v4_mapped, v4_word},
    h2frame::{HEADERS, PREFACE},
    select::{pick_least_conn, pick_random, pick_round_robin},
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const ECONNREFUSED: i32 = 111;
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;
/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const MAX_SERVICES_USIZE: usize = MAX_SERVICES as usize;

#[btf_map]
static SERVICES: HashMap<ServiceKey, ServiceValue, MAX_SERVICES_USIZE> = HashMap::new();
#[btf_map]
static SLOTS: HashMap<SlotKey, u32, { MAX_SLOTS as usize }> = HashMap::new();
#[btf_map]
static BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }> = HashMap::new();
#[btf_map]
static BACKEND_STATS: HashMap<u32, BackendStats, { MAX_BACKENDS as usize }> = HashMap::new();
#[btf_map]
static SERVICE_STATE: Array<ServiceState, MAX_SERVICES_USIZE> = Array::new();
#[btf_map]
static COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();
#[btf_map]
static SOCK_STATE: SkStorage<SockState> = SkStorage::new();
/// Written by the router process (`balancer-agent router`): where it
/// listens, and its heartbeat.
#[btf_map]
static CONFIG: Array<Config, 1> = Array::new();
/// The routing table's generation, a seqlock that no program reads: the
/// agent makes it odd before it writes SERVICES, SLOTS and BACKENDS and
/// even after; the router process re-reads the table when it changes.
#[btf_map]
static GENERATION: Array<u64, 1> = Array::new();
/// The router's listening sockets open now (on CONFIG's address), counted
/// by sock_ops from listen() to close: the kernel learns that a router
/// died the moment its process does (see `Config::track_listeners`).
#[btf_map]
static ROUTER_LISTENERS: Array<u64, 1> = Array::new();
/// Original destination of connections steered to the router, keyed by the
/// client's address as the router sees it. Entries are deleted when the
/// client socket closes; LRU only as a backstop.
#[btf_map]
static ORIG_DST: LruHashMap<SockKey, OrigDst, 65_536> = LruHashMap::new();

/// Balanced client sockets, so the sk_msg program sees what they send.
/// Keyed by socket cookie; the kernel removes a socket when it closes.
#[btf_map]
static SOCKS: SockHash<u64, 65_536> = SockHash::new();

/// Client sockets steered to the router and the router's sockets for them
/// (`run --splice`), keyed by their own end and their peer's. The
/// `balancer_splice` sk_msg program moves what one sends straight into the
/// other's receive queue, skipping TCP/IP (and the veth) for that hop.
#[btf_map]
static SPLICE: SockHash<SpliceKey, 65_536> = SockHash::new();

/// sessionAffinity ClientIP: the backend each client last used per service.
#[btf_map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue, 65_536> = LruHashMap::new();

const AF_INET: u32 = 2;
const SK_PASS: u32 = 1;

/// Atomic add whose result is not used: BPF's `lock xadd`.
///
/// `AtomicU64::fetch_add` does not lower to BPF's atomic add with this
/// toolchain; the intrinsic does. Its fetching form is refused by LLVM for
/// BPF CPUs below v3 ("Invalid usage of the XADD return value"), and rustc
/// always passes bpf-linker `--cpu generic` (aya-build owns RUSTFLAGS), so
/// nothing reads the result; see [`next_cursor`] for a fetch.
#[inline(always)]
fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: `p` points into a map value the kernel keeps alive for the
    // duration of the program.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Take the next value of a cursor: compare-and-swap (BPF_CMPXCHG, which
/// LLVM emits for any CPU and the kernel runs since 5.12), retried a bounded
/// number of times. Concurrent connects on different CPUs so get distinct
/// cursors, and a burst that sees equal counts is spread round-robin rather
/// than piled onto one backend. If every retry loses (a storm of connects),
/// the last value read is used: one duplicate tie-break, never an error.
#[inline(always)]
fn next_cursor(p: *mut u64) -> u64 {
    let mut cur = unsafe { read_volatile(p) };
    let mut tries = 0;
    while tries < 4 {
        let (prev, ok) = unsafe {
            core::intrinsics::atomic_cxchg::<
                u64,
                { AtomicOrdering::Relaxed },
                { AtomicOrdering::Relaxed },
            >(p, cur, cur.wrapping_add(1))
        };
        if ok {
            return cur;
        }
        cur = prev;
        tries += 1;
    }
    cur
}

#[inline(always)]
fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // Per-CPU slot: a plain add cannot race with another CPU.
        unsafe { *p += 1 };
    }
}

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
    let Some(svc) = (unsafe { SERVICES.get(key) }) else {
        return Verdict::Pass;
    };
    let svc = *svc;
    let Some(n) = NonZeroU32::new(svc.backend_count) else {
        count(Counter::NoBackend);
        return Verdict::Refuse;
    };
    // Affinity pins a client to one backend, which per-stream routing
    // would undo: such ports stay at L4.
    if svc.mode == Mode::Http2 as u8
        && svc.affinity_timeout_s == 0
        && let Some(router) = router_for(key)
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
    if let Some(akey) = &affinity
        && let Some(a) = unsafe { AFFINITY.get(akey) }
        && now.saturating_sub(a.last_ns) < u64::from(svc.affinity_timeout_s) * 1_000_000_000
        && let Some(&backend) = unsafe { BACKENDS.get(a.backend_id) }
    {
        let backend_id = a.backend_id;
        let _ = AFFINITY.insert(
            akey,
            AffinityValue {
                backend_id,
                _pad: 0,
                last_ns: now,
            },
            0,
        );
        count(Counter::AffinityHit);
        return finish(ctx, key, backend_id, backend);
    }
    let slot = match Algorithm::from_u8(svc.algorithm) {
        Some(Algorithm::Random) => {
            count(Counter::SelectRandom);
            Some(pick_random(n, rand))
        }
        Some(Algorithm::RoundRobin) => {
            count(Counter::SelectRoundRobin);
            Some(pick_round_robin(n, cursor))
        }
        Some(Algorithm::LeastConn | Algorithm::LeastRequest) | None => {
            count(Counter::SelectLeastConn);
            pick_least_conn(n, cursor, rand, |slot| {
                let id = unsafe {
                    SLOTS.get(SlotKey {
                        service_id: svc.id,
                        slot,
                    })
                }?;
                let stats = unsafe { BACKEND_STATS.get(*id) }?;
                Some(stats.active)
            })
        }
    };
    let Some(slot) = slot else {
        count(Counter::LookupMiss);
        return Verdict::Refuse;
    };
    let Some(&backend_id) = (unsafe {
        SLOTS.get(SlotKey {
            service_id: svc.id,
            slot,
        })
    }) else {
        count(Counter::LookupMiss);
        return Verdict::Refuse;
    };
    let Some(&backend) = (unsafe { BACKENDS.get(backend_id) }) else {
        count(Counter::LookupMiss);
        return Verdict::Refuse;
    };
    if let Some(akey) = &affinity {
        let _ = AFFINITY.insert(
            akey,
            AffinityValue {
                backend_id,
                _pad: 0,
                last_ns: now,
            },
            0,
        );
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

/// The router for a VIP's family, if one is configured.
#[inline(always)]
fn router_for(key: &ServiceKey) -> Option<([u32; 4], u16)> {
    let cfg = CONFIG.get(0)?;
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
    if cfg.track_listeners != 0 && ROUTER_LISTENERS.get(0).is_none_or(|n| *n == 0) {
        count(Counter::RouterDown);
        return None;
    }
    let addr = if is_v4_mapped(&key.addr) {
        cfg.router4
    } else {
        cfg.router6
    };
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
fn is_tcp(sa: *const aya_ebpf::bindings::bpf_sock_addr) -> bool {
    unsafe { (*sa).type_ == SOCK_STREAM && (*sa).protocol == IPPROTO_TCP }
}

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
    // One 32-bit load per word: the verifier only allows narrow or aligned
    // access to user_ip6, and the compiler must not merge them.
    let key = unsafe {
        ServiceKey {
            addr: [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            port: (*sa).user_port as u16,
            proto: PROTO_TCP,
            _pad: 0,
        }
    };
    match balance(&ctx, &key) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
        Verdict::Steer(addr, port) => {
            // router_for() picked the router of the VIP's family, so an
            // IPv4-mapped VIP gets the IPv4-mapped router address.
            unsafe {
                write_volatile(&raw mut (*sa).user_ip6[0], addr[0]);
                write_volatile(&raw mut (*sa).user_ip6[1], addr[1]);
                write_volatile(&raw mut (*sa).user_ip6[2], addr[2]);
                write_volatile(&raw mut (*sa).user_ip6[3], addr[3]);
                (*sa).user_port = u32::from(port);
            }
            ALLOW
        }
        Verdict::Rewrite(backend) => {
            if is_v4_mapped(&key.addr) != backend.is_v4() {
                count(Counter::FamilyMismatch);
                return refuse();
            }
            // An IPv4 backend behind an IPv4-mapped VIP stays IPv4-mapped:
            // the IPv6 socket connects to ::ffff:pod.
            unsafe {
                write_volatile(&raw mut (*sa).user_ip6[0], backend.addr[0]);
                write_volatile(&raw mut (*sa).user_ip6[1], backend.addr[1]);
                write_volatile(&raw mut (*sa).user_ip6[2], backend.addr[2]);
                write_volatile(&raw mut (*sa).user_ip6[3], backend.addr[3]);
                (*sa).user_port = u32::from(backend.port);
            }
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
    unsafe {
        let vip = (*st).vip_addr;
        write_volatile(&raw mut (*sa).user_ip6[0], vip[0]);
        write_volatile(&raw mut (*sa).user_ip6[1], vip[1]);
        write_volatile(&raw mut (*sa).user_ip6[2], vip[2]);
        write_volatile(&raw mut (*sa).user_ip6[3], vip[3]);
        (*sa).user_port = u32::from((*st).vip_port);
    }
    count(Counter::PeerRewritten);
    ALLOW
}

/// The socket storage of a sock_ops socket, if connect() balanced it.
#[inline(always)]
fn sock_state(ctx: &SockOpsContext) -> *mut SockState {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return ptr::null_mut();
    }
    let map = ptr::from_ref(&SOCK_STATE).cast_mut().cast::<c_void>();
    unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0) }.cast()
}

/// Connection accounting.
///
/// +1 on ACTIVE_ESTABLISHED, -1 when the socket reaches TCP_CLOSE (which a
/// client socket reaches on entering TIME_WAIT, after LAST_ACK, or on a
/// reset). Only sockets connect() balanced have storage, and the `counted`
/// flag in it makes the pair exact: a socket is uncounted only if it was
/// counted, and only once, so the counts return to exactly 0 however
/// connections end.
#[sock_ops]
pub fn balancer_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == TCP_LISTEN && ctx.arg(1) == TCP_CLOSE => {
            on_listener_close();
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == TCP_SYN_SENT && ctx.arg(1) == TCP_CLOSE => {
            on_connect_failed(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

/// The client end of a socket, as its peer sees it.
#[inline(always)]
fn local_key(ctx: &SockOpsContext) -> SockKey {
    let ops = ctx.ops;
    // Load every field unconditionally, then choose: a load whose context
    // offset depends on the family is rejected by the verifier
    // ("dereference of modified ctx ptr").
    let (family, v4, v6) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ],
        )
    };
    let addr = if family == AF_INET { v4_mapped(v4) } else { v6 };
    SockKey {
        addr,
        // local_port is in host order.
        port: (ctx.local_port() as u16).to_be(),
        _pad: [0; 2],
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let st = sock_state(ctx);
    if st.is_null() {
        return;
    }
    if unsafe { (*st).flags } & SOCK_STEERED != 0 {
        // Tell the router which VIP this connection was for. The router
        // accepts only after the client's handshake completes, so the entry
        // is there before it looks.
        let orig = unsafe {
            OrigDst {
                addr: (*st).vip_addr,
                port: (*st).vip_port,
                _pad: [0; 2],
            }
        };
        if ORIG_DST.insert(local_key(ctx), orig, 0).is_err() {
            count(Counter::OrigDstFull);
        }
        if CONFIG.get(0).is_some_and(|c| c.splice != 0)
            && SPLICE
                .update(&mut splice_key(ctx), unsafe { &mut *ctx.ops }, 0)
                .is_err()
        {
            count(Counter::SpliceFull);
        }
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        return;
    }
    if unsafe { (*st).counted } != 0 {
        return;
    }
    let backend_id = unsafe { (*st).backend_id };
    let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) else {
        return;
    };
    atomic_add(unsafe { ptr::addr_of_mut!((*stats).active) }, 1);
    atomic_add(unsafe { ptr::addr_of_mut!((*stats).total) }, 1);
    unsafe { (*st).counted = 1 };
    count(Counter::Established);
    // Let sk_msg follow the HTTP/2 framing of what the client sends.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if SOCKS
        .update(&mut cookie, unsafe { &mut *ctx.ops }, 0)
        .is_err()
    {
        count(Counter::SockmapFull);
    }
    // STATE_CB only fires for sockets that ask for it.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// A socket of the router's listener is established: with `--splice`, it
/// enters SPLICE now, before its client's first send in nearly every case
/// (the client's ACK that establishes it is processed in the same softirq
/// run that woke the client's connect()). When it is not there in time the
/// client's bytes simply stay on TCP: see `balancer_splice`. This needs the
/// router in the attached cgroup (the node's root cgroup in Kubernetes);
/// otherwise the router adds its sockets itself after accept.
/// listen() on the router's address: count the listener, and ask for its
/// state changes to see it close. Why here and not a heartbeat alone: a
/// `kill -9`ed router's heartbeat stays fresh for up to a second, and
/// every connect in that second would be refused (nobody listens) and
/// fail the client's RPCs; its listener closes with the process.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    if cfg.router_port == 0 {
        return;
    }
    let key = local_key(ctx);
    let router = if is_v4_mapped(&key.addr) {
        cfg.router4
    } else {
        cfg.router6
    };
    if key.port != cfg.router_port || key.addr != router {
        return;
    }
    let Some(n) = ROUTER_LISTENERS.get_ptr_mut(0) else {
        return;
    };
    // Only a listener we counted asks for STATE_CB from TCP_LISTEN.
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_ok()
    {
        atomic_add(n, 1);
    }
}

/// The SYN of a balanced (not steered) connect is sent: ask for its state
/// changes, to see it fail (SYN_SENT to CLOSE) as well as establish.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let st = sock_state(ctx);
    if st.is_null() || unsafe { (*st).flags } & SOCK_STEERED != 0 {
        return;
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// A balanced connect that never established: refused (RST to the SYN),
/// unreachable or timed out. Counted per backend, for the agent's
/// failure accrual on L4 ports: kube-proxy never sees this.
#[inline(always)]
fn on_connect_failed(ctx: &SockOpsContext) {
    let st = sock_state(ctx);
    if st.is_null() || unsafe { (*st).flags } & SOCK_STEERED != 0 {
        return;
    }
    let backend_id = unsafe { (*st).backend_id };
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        atomic_add(unsafe { ptr::addr_of_mut!((*stats).connect_failures) }, 1);
    }
    count(Counter::ConnectFailed);
}

/// A counted router listener closed (the process exited or drains).
#[inline(always)]
fn on_listener_close() {
    if let Some(n) = ROUTER_LISTENERS.get_ptr_mut(0) {
        atomic_add(n, u64::MAX);
    }
}

#[inline(always)]
fn on_passive(ctx: &SockOpsContext) {
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    if cfg.splice == 0 || cfg.router_port == 0 {
        return;
    }
    let key = splice_key(ctx);
    let router = if is_v4_mapped(&key.local.addr) {
        cfg.router4
    } else {
        cfg.router6
    };
    if key.local.port != cfg.router_port || key.local.addr != router {
        return;
    }
    if SPLICE
        .update(&mut { key }, unsafe { &mut *ctx.ops }, 0)
        .is_err()
    {
        count(Counter::SpliceFull);
    }
}

/// A port from `remote_port` of sock_ops or sk_msg as a raw network-order
/// `u16`: the kernel puts the 16-bit network-order port in the upper half
/// of the word on little-endian machines (and in the lower half on others).
#[inline(always)]
fn net_port(p: u32) -> u16 {
    if p >> 16 != 0 {
        (p >> 16) as u16
    } else {
        p as u16
    }
}

/// A socket's SPLICE key in sock_ops: its own end, then its peer's.
#[inline(always)]
fn splice_key(ctx: &SockOpsContext) -> SpliceKey {
    let ops = ctx.ops;
    let (family, v4, v6, port) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).remote_ip4),
            [
                read_volatile(&raw const (*ops).remote_ip6[0]),
                read_volatile(&raw const (*ops).remote_ip6[1]),
                read_volatile(&raw const (*ops).remote_ip6[2]),
                read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
            read_volatile(&raw const (*ops).remote_port),
        )
    };
    SpliceKey {
        local: local_key(ctx),
        remote: SockKey {
            addr: if family == AF_INET { v4_mapped(v4) } else { v6 },
            port: net_port(port),
            _pad: [0; 2],
        },
    }
}

/// The SPLICE key of the peer of the socket sending `msg`: its own key with
/// the halves swapped.
#[inline(always)]
fn peer_key(msg: *const sk_msg_md) -> SpliceKey {
    // Every field loaded unconditionally, as in `local_key`.
    let (family, l4, r4, l6, r6, lport, rport) = unsafe {
        (
            read_volatile(&raw const (*msg).family),
            read_volatile(&raw const (*msg).local_ip4),
            read_volatile(&raw const (*msg).remote_ip4),
            [
                read_volatile(&raw const (*msg).local_ip6[0]),
                read_volatile(&raw const (*msg).local_ip6[1]),
                read_volatile(&raw const (*msg).local_ip6[2]),
                read_volatile(&raw const (*msg).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*msg).remote_ip6[0]),
                read_volatile(&raw const (*msg).remote_ip6[1]),
                read_volatile(&raw const (*msg).remote_ip6[2]),
                read_volatile(&raw const (*msg).remote_ip6[3]),
            ],
            read_volatile(&raw const (*msg).local_port),
            read_volatile(&raw const (*msg).remote_port),
        )
    };
    let v4 = family == AF_INET;
    SpliceKey {
        local: SockKey {
            addr: if v4 { v4_mapped(r4) } else { r6 },
            port: net_port(rport),
            _pad: [0; 2],
        },
        remote: SockKey {
            addr: if v4 { v4_mapped(l4) } else { l6 },
            // local_port is in host order.
            port: (lport as u16).to_be(),
            _pad: [0; 2],
        },
    }
}

/// Whether `msg` starts with the HTTP/2 client preface.
#[inline(always)]
fn starts_with_preface(msg: *mut sk_msg_md) -> bool {
    if unsafe { (*msg).size } < PREFACE.len() as u32 {
        return false;
    }
    if unsafe { bpf_msg_pull_data(msg, 0, PREFACE.len() as u32, 0) } != 0 {
        return false;
    }
    let data = unsafe { (*msg).__bindgen_anon_1.data } as usize;
    let end = unsafe { (*msg).__bindgen_anon_2.data_end } as usize;
    if data + PREFACE.len() > end {
        return false;
    }
    let mut i = 0;
    while i < PREFACE.len() {
        if unsafe { *((data + i) as *const u8) } != PREFACE[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Splice a client socket and the router's socket for it (`run --splice`):
/// what one sends goes straight into the other's receive queue
/// (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), and the verdict holds
/// for everything after (`apply_bytes(u32::MAX)`), so this runs about once
/// per direction.
///
/// Why each direction decides once, at its first send, and for good: the
/// receiving socket reads spliced bytes before what waits in its TCP queue,
/// so a direction that sent anything over TCP must stay there or bytes
/// would be reordered. The client's direction splices only if the router's
/// socket is already in SPLICE and the client speaks HTTP/2 (a plain TCP
/// pass-through has no flow control to bound what queues up unread; the
/// router also takes its socket out of SPLICE for those). The router's
/// direction always finds the client's socket there: it entered at
/// ACTIVE_ESTABLISHED, before the router could accept.
#[sk_msg]
pub fn balancer_splice(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    let sk = unsafe { (*msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return SK_PASS;
    }
    let mut key = peer_key(msg);
    let map = ptr::from_ref(&SOCK_STATE).cast_mut().cast::<c_void>();
    let st: *mut SockState =
        unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0) }.cast();
    if st.is_null() {
        // The router's socket (connect4 gave it no storage).
        let _ = SPLICE.redirect_msg(&ctx, &mut key, u64::from(BPF_F_INGRESS));
    } else {
        match unsafe { (*st).splice } {
            SPLICE_ON => {
                let _ = SPLICE.redirect_msg(&ctx, &mut key, u64::from(BPF_F_INGRESS));
            }
            SPLICE_OFF => {}
            _ => {
                if starts_with_preface(msg)
                    && SPLICE.redirect_msg(&ctx, &mut key, u64::from(BPF_F_INGRESS))
                        == i64::from(SK_PASS)
                {
                    unsafe { (*st).splice = SPLICE_ON };
                    count(Counter::SpliceOn);
                } else {
                    unsafe { (*st).splice = SPLICE_OFF };
                    count(Counter::SpliceOff);
                }
            }
        }
    }
    let _ = unsafe { bpf_msg_apply_bytes(msg, u32::MAX) };
    SK_PASS
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let st = sock_state(ctx);
    if st.is_null() {
        return;
    }
    if unsafe { (*st).flags } & SOCK_STEERED != 0 {
        let _ = ORIG_DST.remove(local_key(ctx));
        return;
    }
    if unsafe { (*st).counted } == 0 {
        return;
    }
    unsafe { (*st).counted = 0 };
    let backend_id = unsafe { (*st).backend_id };
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        atomic_add(unsafe { ptr::addr_of_mut!((*stats).active) }, u64::MAX);
    }
    count(Counter::Closed);
}

/// The HTTP/2 framing of balanced client sockets: counts the streams a
/// client opens, per backend, so kube-proxy-style pinning is visible at
/// stream level even on `tcp` ports.
///
/// One verdict covers exactly one frame: `cork_bytes(9)` until a header is
/// there, `pull_data(0, 9)` to read it, `apply_bytes(9 + length)` so the
/// program runs next at the following frame. The client preface (24 bytes)
/// is recognised first; a socket that does not start with it is left alone
/// for good (`apply_bytes(u32::MAX)`, no cork). Every verdict is SK_PASS:
/// the data is never changed, and held back only to complete a header.
#[sk_msg]
pub fn balancer_h2_streams(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    let sk = unsafe { (*msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return SK_PASS;
    }
    let map = ptr::from_ref(&SOCK_STATE).cast_mut().cast::<c_void>();
    let st: *mut SockState =
        unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0) }.cast();
    if st.is_null() {
        let _ = unsafe { bpf_msg_apply_bytes(msg, u32::MAX) };
        return SK_PASS;
    }
    let size = unsafe { (*msg).size };
    match unsafe { (*st).h2 } {
        H2_UNKNOWN => {
            if size < PREFACE.len() as u32 {
                // Wait for the whole preface if this may be its start.
                if unsafe { bpf_msg_pull_data(msg, 0, 1, 0) } == 0 {
                    let data = unsafe { (*msg).__bindgen_anon_1.data } as usize;
                    let end = unsafe { (*msg).__bindgen_anon_2.data_end } as usize;
                    if data + 1 <= end && unsafe { *(data as *const u8) } == PREFACE[0] {
                        let _ = unsafe { bpf_msg_cork_bytes(msg, PREFACE.len() as u32) };
                        return SK_PASS;
                    }
                }
                not_h2(msg, st);
                return SK_PASS;
            }
            if unsafe { bpf_msg_pull_data(msg, 0, PREFACE.len() as u32, 0) } != 0 {
                not_h2(msg, st);
                return SK_PASS;
            }
            let data = unsafe { (*msg).__bindgen_anon_1.data } as usize;
            let end = unsafe { (*msg).__bindgen_anon_2.data_end } as usize;
            if data + PREFACE.len() > end {
                not_h2(msg, st);
                return SK_PASS;
            }
            let mut i = 0;
            while i < PREFACE.len() {
                if unsafe { *((data + i) as *const u8) } != PREFACE[i] {
                    not_h2(msg, st);
                    return SK_PASS;
                }
                i += 1;
            }
            unsafe { (*st).h2 = H2_ACTIVE };
            let _ = unsafe { bpf_msg_apply_bytes(msg, PREFACE.len() as u32) };
        }
        H2_ACTIVE => {
            if size < 9 {
                let _ = unsafe { bpf_msg_cork_bytes(msg, 9) };
                return SK_PASS;
            }
            if unsafe { bpf_msg_pull_data(msg, 0, 9, 0) } != 0 {
                return SK_PASS;
            }
            let data = unsafe { (*msg).__bindgen_anon_1.data } as usize;
            let end = unsafe { (*msg).__bindgen_anon_2.data_end } as usize;
            if data + 9 > end {
                return SK_PASS;
            }
            let b = |i: usize| u32::from(unsafe { *((data + i) as *const u8) });
            let len = (b(0) << 16) | (b(1) << 8) | b(2);
            let kind = b(3) as u8;
            let stream = ((b(5) << 24) | (b(6) << 16) | (b(7) << 8) | b(8)) & 0x7fff_ffff;
            // A client opens a stream with HEADERS on a new, odd, higher id.
            if kind == HEADERS && stream & 1 == 1 && stream > unsafe { (*st).last_stream } {
                unsafe { (*st).last_stream = stream };
                let backend_id = unsafe { (*st).backend_id };
                if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
                    atomic_add(unsafe { ptr::addr_of_mut!((*stats).streams) }, 1);
                }
                count(Counter::H2Streams);
            }
            let _ = unsafe { bpf_msg_apply_bytes(msg, 9 + len) };
        }
        _ => {
            let _ = unsafe { bpf_msg_apply_bytes(msg, u32::MAX) };
        }
    }
    SK_PASS
}

#[inline(always)]
fn not_h2(msg: *mut aya_ebpf::bindings::sk_msg_md, st: *mut SockState) {
    unsafe { (*st).h2 = H2_NOT };
    let _ = unsafe { bpf_msg_apply_bytes(msg, u32::MAX) };
}
