//! The sock_ops program: connection accounting per backend, the router's
//! listeners, the original destination of steered connections, and the
//! sockets that enter SOCKS (for `balancer_h2_streams`) and SPLICE (for
//! `balancer_splice`).

use core::ptr::{self, read_volatile};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_TCP_CLOSE, BPF_TCP_LISTEN, BPF_TCP_SYN_SENT,
    },
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_delete_elem},
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use balancer_common::{
    BalancedSock, Counter, H2_NOT, H2_UNKNOWN, OrigDst, SOCK_STEERED, SockKey, SockState, SpliceKey,
};

use crate::{
    helpers::{
        atomic_add, backend_stats, config, count, family_addr, net_port, router_addr,
        router_listeners, sock_storage,
    },
    maps::{BALANCED, ORIG_DST, SOCKS, SPLICE},
};

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
        BPF_SOCK_OPS_RTT_CB => on_rtt(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == BPF_TCP_LISTEN && ctx.arg(1) == BPF_TCP_CLOSE => {
            on_listener_close();
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == BPF_TCP_SYN_SENT && ctx.arg(1) == BPF_TCP_CLOSE => {
            on_connect_failed(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

/// The socket storage of a sock_ops socket, if connect() balanced it.
#[inline(always)]
fn sock_state(ctx: &SockOpsContext) -> *mut SockState {
    sock_storage(unsafe { (*ctx.ops).__bindgen_anon_2.sk })
}

/// Ask for the socket's state changes: STATE_CB only fires for sockets
/// that ask for it.
#[inline(always)]
fn want_state_cb(ctx: &SockOpsContext) -> Result<(), i32> {
    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
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
    SockKey {
        addr: family_addr(family, v4, v6),
        // local_port is in host order.
        port: (ctx.local_port() as u16).to_be(),
        _pad: [0; 2],
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
            addr: family_addr(family, v4, v6),
            port: net_port(port),
            _pad: [0; 2],
        },
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let st = sock_state(ctx);
    if st.is_null() {
        return;
    }
    if unsafe { (*st).flags } & SOCK_STEERED != 0 {
        // Tell the router which VIP this connection was for, and from
        // which network namespace (it opens the pod connections for this
        // client's streams there). The router accepts only after the
        // client's handshake completes, so the entry is there before it
        // looks.
        let orig = unsafe {
            OrigDst {
                addr: (*st).vip_addr,
                port: (*st).vip_port,
                _pad: [0; 2],
                _pad2: 0,
                netns_cookie: bpf_get_netns_cookie(ctx.ops.cast()),
            }
        };
        if ORIG_DST.insert(local_key(ctx), orig, 0).is_err() {
            count(Counter::OrigDstFull);
        }
        if config().is_some_and(|c| c.splice != 0)
            && SPLICE
                .update(&mut splice_key(ctx), unsafe { &mut *ctx.ops }, 0)
                .is_err()
        {
            count(Counter::SpliceFull);
        }
        let _ = want_state_cb(ctx);
        return;
    }
    if unsafe { (*st).counted } != 0 {
        return;
    }
    let backend_id = unsafe { (*st).backend_id };
    let Some(stats) = backend_stats(backend_id) else {
        return;
    };
    atomic_add(unsafe { ptr::addr_of_mut!((*stats).active) }, 1);
    atomic_add(unsafe { ptr::addr_of_mut!((*stats).total) }, 1);
    // It accepts connections again: connect4/6 may choose it at once.
    if unsafe { (*stats).failed_at_ns } != 0 {
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*stats).failed_at_ns), 0) };
    }
    unsafe { (*st).counted = 1 };
    count(Counter::Established);
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // Known by its namespace and both ends, so the agent can end it if
    // its endpoint is removed.
    let ends = splice_key(ctx);
    let balanced = BalancedSock {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        local: ends.local,
        remote: ends.remote,
        vip: SockKey {
            addr: unsafe { (*st).vip_addr },
            port: unsafe { (*st).vip_port },
            _pad: [0; 2],
        },
        _pad: 0,
    };
    if BALANCED.insert(cookie, balanced, 0).is_err() {
        count(Counter::BalancedFull);
    }
    // Let sk_msg follow the HTTP/2 framing of what the client sends.
    if SOCKS
        .update(&mut cookie, unsafe { &mut *ctx.ops }, 0)
        .is_err()
    {
        count(Counter::SockmapFull);
        let _ = want_state_cb(ctx);
        return;
    }
    // And RTT samples (an ACK of what it sent) until sk_msg has decided
    // whether it speaks HTTP/2: see `on_rtt`.
    let _ = ctx.set_cb_flags(
        (ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG) as i32,
    );
}

/// An ACK of what a balanced client sent (RTT sample), asked for until
/// sk_msg decided on its first send whether it speaks HTTP/2. One that
/// does not leaves SOCKS now. Why: a socket in a sockmap runs the
/// kernel's tcp_bpf receive path, and there a read blocked when the
/// connection is reset or aborted wakes with EAGAIN, not with the error
/// (tcp_bpf_recvmsg after tcp_msg_wait_data, Linux 6.18); the error only
/// comes at the next call. A blocking database or broker client must see
/// what it would at L4, so only HTTP/2 clients, whose streams are
/// counted, stay in. sk_msg programs may not delete from a sockhash;
/// sock_ops may.
#[inline(always)]
fn on_rtt(ctx: &SockOpsContext) {
    let st = sock_state(ctx);
    if st.is_null() {
        return;
    }
    let h2 = unsafe { (*st).h2 };
    if h2 == H2_UNKNOWN {
        return;
    }
    if h2 == H2_NOT {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        let map = core::ptr::from_ref(&SOCKS).cast_mut().cast();
        let _ = unsafe { bpf_map_delete_elem(map, (&raw const cookie).cast()) };
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
}

/// listen() on the router's address: count the listener, and ask for its
/// state changes to see it close. Why here and not a heartbeat alone: a
/// `kill -9`ed router's heartbeat stays fresh for up to a second, and
/// every connect in that second would be refused (nobody listens) and
/// fail the client's RPCs; its listener closes with the process.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let Some(cfg) = config() else {
        return;
    };
    if cfg.router_port == 0 {
        return;
    }
    let key = local_key(ctx);
    if key.port != cfg.router_port || key.addr != router_addr(cfg, &key.addr) {
        return;
    }
    let Some(n) = router_listeners() else {
        return;
    };
    // Only a listener we counted asks for STATE_CB from TCP_LISTEN.
    if want_state_cb(ctx).is_ok() {
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
    let _ = want_state_cb(ctx);
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
    if let Some(stats) = backend_stats(backend_id) {
        atomic_add(unsafe { ptr::addr_of_mut!((*stats).connect_failures) }, 1);
        // Marked now: connect4/6 pass it over for a second (a plain
        // store; the latest failure wins, which is all that matters).
        let now = unsafe { bpf_ktime_get_ns() }.max(1);
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*stats).failed_at_ns), now) };
    }
    count(Counter::ConnectFailed);
}

/// A counted router listener closed (the process exited or drains).
#[inline(always)]
fn on_listener_close() {
    if let Some(n) = router_listeners() {
        atomic_add(n, u64::MAX);
    }
}

/// A socket of the router's listener is established: with `--splice`, it
/// enters SPLICE now, before its client's first send in nearly every case
/// (the client's ACK that establishes it is processed in the same softirq
/// run that woke the client's connect()). When it is not there in time the
/// client's bytes simply stay on TCP: see `balancer_splice`. This needs the
/// router in the attached cgroup (the node's root cgroup in Kubernetes);
/// otherwise the router adds its sockets itself after accept.
#[inline(always)]
fn on_passive(ctx: &SockOpsContext) {
    let Some(cfg) = config() else {
        return;
    };
    if cfg.splice == 0 || cfg.router_port == 0 {
        return;
    }
    let key = splice_key(ctx);
    if key.local.port != cfg.router_port || key.local.addr != router_addr(cfg, &key.local.addr) {
        return;
    }
    if SPLICE
        .update(&mut { key }, unsafe { &mut *ctx.ops }, 0)
        .is_err()
    {
        count(Counter::SpliceFull);
    }
}

/// The socket closed (TCP_CLOSE): forget a steered socket's original
/// destination, or uncount a counted one, exactly once.
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
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let _ = BALANCED.remove(cookie);
    let backend_id = unsafe { (*st).backend_id };
    if let Some(stats) = backend_stats(backend_id) {
        atomic_add(unsafe { ptr::addr_of_mut!((*stats).active) }, u64::MAX);
    }
    count(Counter::Closed);
}
