//! The sk_msg programs, which see what a socket sends before TCP does:
//! `balancer_h2_streams` ([`streams`]) on SOCKS counts the HTTP/2 streams
//! a balanced client opens; `balancer_splice` ([`splice`]) on SPLICE moves
//! what a client and the router send each other straight into the peer's
//! receive queue.

pub mod splice;
pub mod streams;

use aya_ebpf::{
    bindings::{bpf_sock, sk_msg_md},
    helpers::generated::{bpf_msg_apply_bytes, bpf_msg_pull_data},
};
use balancer_common::h2frame::PREFACE;

/// The socket sending `msg` (null only if the kernel gives none).
#[inline(always)]
fn msg_sk(msg: *mut sk_msg_md) -> *mut bpf_sock {
    unsafe { (*msg).__bindgen_anon_3.sk }
}

/// Let everything the socket sends from here on pass without running the
/// program again.
#[inline(always)]
fn pass_for_good(msg: *mut sk_msg_md) {
    let _ = unsafe { bpf_msg_apply_bytes(msg, u32::MAX) };
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
