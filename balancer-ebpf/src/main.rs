//! Kernel half of the balancer: socket-level load balancing for TCP services.
//!
//! One module per attach point, each program a thin entry point over named
//! helpers:
//!
//! * `connect`: `cgroup/connect4` and `cgroup/connect6`
//!   (`balancer_connect4/6`) rewrite a connect() to a service VIP:port into
//!   a backend pod's address:targetPort, chosen by the service port's
//!   algorithm, or steer it to the HTTP/2 router. After that the socket
//!   talks to the pod directly: no per-packet NAT, no conntrack entry.
//!   `cgroup/getpeername4/6` (`balancer_getpeername4/6`) give the
//!   application the VIP back.
//! * `sockops`: `sock_ops` (`balancer_sock_ops`) counts live connections
//!   and failed connects per backend, counts the router's listeners,
//!   records where steered connections were going (ORIG_DST), and puts
//!   sockets into SOCKS and SPLICE for the sk_msg programs.
//! * `sk_msg`: `sk_msg` on SOCKS (`balancer_h2_streams`) counts the
//!   HTTP/2 streams balanced clients open, per backend; `sk_msg` on SPLICE
//!   (`balancer_splice`) splices a client and the router's socket for it
//!   with `run --splice`.
//!
//! `maps` defines every map and its capacity; `helpers` holds what the
//! programs share (atomics, named map lookups, the socket-storage accessor,
//! address loads and stores). The decisions are in `connect::balance` and
//! the selection functions of `balancer_common::select`, which the agent's
//! unit tests run.
#![cfg_attr(
    target_arch = "bpf",
    no_std,
    no_main,
    feature(core_intrinsics),
    expect(
        internal_features,
        reason = "atomic_xadd is the one way to get BPF atomic adds"
    )
)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod helpers;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sk_msg;
#[cfg(target_arch = "bpf")]
mod sockops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists only
    // because `no_std` requires it.
    loop {}
}
