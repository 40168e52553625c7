//! Kernel half of the balancer: socket-level load balancing for TCP services.
//!
//! * `cgroup/connect4` and `cgroup/connect6` rewrite a connect() to a service
//!   VIP:port into a backend pod's address:targetPort, chosen by the service
//!   port's algorithm. After that the socket talks to the pod directly: no
//!   per-packet NAT, no conntrack entry.
//! * `cgroup/getpeername4/6` give the application the VIP back.
//! * `sock_ops` counts live connections per backend.
//!
//! Entry points are thin; the decisions are in [`balance`] and the selection
//! functions of `balancer_common::select`, which the agent's unit tests run.
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
mod programs;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists only
    // because `no_std` requires it.
    loop {}
}
