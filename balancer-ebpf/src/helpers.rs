//! What every program shares: the atomics, the named map lookups, the
//! socket-storage accessor, the IPv4-mapped form of socket addresses, and
//! the word-by-word `user_ip6` load and store.

use core::{
    ffi::c_void,
    intrinsics::AtomicOrdering,
    ptr::{self, read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::generated::bpf_sk_storage_get,
};
use balancer_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, Config, Counter, ServiceKey, ServiceValue,
    SlotKey, SockState,
    addr::{is_v4_mapped, v4_mapped},
};

use crate::maps::{
    AFFINITY, BACKEND_STATS, BACKENDS, CONFIG, COUNTERS, ROUTER_LISTENERS, SERVED_NETNS, SERVICES,
    SLOTS, SOCK_STATE,
};

/// `AF_INET`, as sock_ops and sk_msg report a socket's family;
/// `aya_ebpf::bindings` has no socket families.
pub const AF_INET: u32 = 2;

/// Atomic add whose result is not used: BPF's `lock xadd`.
///
/// `AtomicU64::fetch_add` does not lower to BPF's atomic add with this
/// toolchain; the intrinsic does. Its fetching form is refused by LLVM for
/// BPF CPUs below v3 ("Invalid usage of the XADD return value"), and rustc
/// always passes bpf-linker `--cpu generic` (aya-build owns RUSTFLAGS), so
/// nothing reads the result; see [`next_cursor`] for a fetch.
#[inline(always)]
pub fn atomic_add(p: *mut u64, v: u64) {
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
pub fn next_cursor(p: *mut u64) -> u64 {
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
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // Per-CPU slot: a plain add cannot race with another CPU.
        unsafe { *p += 1 };
    }
}

/// The service at a VIP:port, if it is one.
#[inline(always)]
pub fn service(key: &ServiceKey) -> Option<ServiceValue> {
    unsafe { SERVICES.get(key) }.copied()
}

/// The backend id in a service's slot.
#[inline(always)]
pub fn slot_backend(service_id: u32, slot: u32) -> Option<u32> {
    unsafe { SLOTS.get(SlotKey { service_id, slot }) }.copied()
}

/// A backend's address and port.
#[inline(always)]
pub fn backend(backend_id: u32) -> Option<Backend> {
    unsafe { BACKENDS.get(backend_id) }.copied()
}

/// A backend's counters, for atomic adds.
#[inline(always)]
pub fn backend_stats(backend_id: u32) -> Option<*mut BackendStats> {
    BACKEND_STATS.get_ptr_mut(backend_id)
}

/// A backend's open connections, as least-conn compares them, and when
/// its last connect failed (see `select::marked`): one lookup for both.
#[inline(always)]
pub fn backend_load(backend_id: u32) -> Option<(u64, u64)> {
    unsafe { BACKEND_STATS.get(backend_id) }.map(|s| (s.active, s.failed_at_ns))
}

/// When a backend's last connect failed (0: none since one established).
#[inline(always)]
pub fn backend_failed_at(backend_id: u32) -> Option<u64> {
    unsafe { BACKEND_STATS.get(backend_id) }.map(|s| s.failed_at_ns)
}

/// The backend a client last used for a service, and when.
#[inline(always)]
pub fn affinity_get(key: &AffinityKey) -> Option<AffinityValue> {
    unsafe { AFFINITY.get(key) }.copied()
}

/// Record that a client used `backend_id` for a service at `now_ns`.
/// Best effort: a full LRU map evicts, and a failed insert only loses the
/// pin for the client's next connect.
#[inline(always)]
pub fn affinity_put(key: &AffinityKey, backend_id: u32, now_ns: u64) {
    let _ = AFFINITY.insert(
        key,
        AffinityValue {
            backend_id,
            _pad: 0,
            last_ns: now_ns,
        },
        0,
    );
}

/// The router process's CONFIG entry.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// Whether the router can serve clients of network namespace `cookie`
/// (it put the cookie in `SERVED_NETNS`).
#[inline(always)]
pub fn netns_served(cookie: u64) -> bool {
    unsafe { SERVED_NETNS.get(&cookie) }.is_some()
}

/// The count of the router's open listeners, for atomic adds.
#[inline(always)]
pub fn router_listeners() -> Option<*mut u64> {
    ROUTER_LISTENERS.get_ptr_mut(0)
}

/// The router's address for a socket address's family: `router4` for an
/// IPv4-mapped address, `router6` otherwise.
#[inline(always)]
pub fn router_addr(cfg: &Config, addr: &[u32; 4]) -> [u32; 4] {
    if is_v4_mapped(addr) {
        cfg.router4
    } else {
        cfg.router6
    }
}

/// A socket's storage (`SOCK_STATE`) from sock_ops or sk_msg, never
/// created here: only connect() creates it, for the sockets it balanced or
/// steered. Null when the socket has none, or `sk` is null.
#[inline(always)]
pub fn sock_storage(sk: *mut bpf_sock) -> *mut SockState {
    if sk.is_null() {
        return ptr::null_mut();
    }
    let map = ptr::from_ref(&SOCK_STATE).cast_mut().cast::<c_void>();
    unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0) }.cast()
}

/// A socket address as the maps hold it, from the family and both address
/// fields of a sock_ops or sk_msg context. The caller loads both fields
/// unconditionally (see `sockops::local_key`); this only chooses.
#[inline(always)]
pub fn family_addr(family: u32, v4: u32, v6: [u32; 4]) -> [u32; 4] {
    if family == AF_INET { v4_mapped(v4) } else { v6 }
}

/// A port from `remote_port` of sock_ops or sk_msg as a raw network-order
/// `u16`: the kernel puts the 16-bit network-order port in the upper half
/// of the word on little-endian machines (and in the lower half on others).
#[inline(always)]
pub fn net_port(p: u32) -> u16 {
    if p >> 16 != 0 {
        (p >> 16) as u16
    } else {
        p as u16
    }
}

/// The destination of a connect6 (or the peer of a getpeername6).
///
/// One 32-bit load per word: the verifier only allows narrow or aligned
/// access to user_ip6, and the compiler must not merge them.
#[inline(always)]
pub fn load_user_ip6(sa: *const bpf_sock_addr) -> [u32; 4] {
    unsafe {
        [
            read_volatile(&raw const (*sa).user_ip6[0]),
            read_volatile(&raw const (*sa).user_ip6[1]),
            read_volatile(&raw const (*sa).user_ip6[2]),
            read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    }
}

/// Rewrite `user_ip6`, one 32-bit store per word (as [`load_user_ip6`]).
#[inline(always)]
pub fn store_user_ip6(sa: *mut bpf_sock_addr, addr: [u32; 4]) {
    unsafe {
        write_volatile(&raw mut (*sa).user_ip6[0], addr[0]);
        write_volatile(&raw mut (*sa).user_ip6[1], addr[1]);
        write_volatile(&raw mut (*sa).user_ip6[2], addr[2]);
        write_volatile(&raw mut (*sa).user_ip6[3], addr[3]);
    }
}
