//! `balancer_h2_streams`, on SOCKS: the HTTP/2 streams each balanced
//! client opens, per backend.

use core::ptr;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, sk_msg_md},
    helpers::generated::{bpf_msg_apply_bytes, bpf_msg_cork_bytes, bpf_msg_pull_data},
    macros::sk_msg,
    programs::SkMsgContext,
};
use balancer_common::{
    Counter, H2_ACTIVE, H2_NOT, H2_UNKNOWN, SockState,
    h2frame::{FrameHeader, HEADER_LEN, HEADERS, PREFACE},
};

use super::{msg_sk, pass_for_good, starts_with_preface};
use crate::helpers::{atomic_add, backend_stats, count, sock_storage};

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
    let sk = msg_sk(msg);
    if sk.is_null() {
        return SK_PASS;
    }
    let st = sock_storage(sk);
    if st.is_null() {
        pass_for_good(msg);
        return SK_PASS;
    }
    match unsafe { (*st).h2 } {
        H2_UNKNOWN => on_preface(msg, st),
        H2_ACTIVE => on_frame(msg, st),
        _ => pass_for_good(msg),
    }
    SK_PASS
}

/// The socket's first bytes: the client preface, or not HTTP/2.
#[inline(always)]
fn on_preface(msg: *mut sk_msg_md, st: *mut SockState) {
    if unsafe { (*msg).size } < PREFACE.len() as u32 {
        // Wait for the whole preface if this may be its start.
        if unsafe { bpf_msg_pull_data(msg, 0, 1, 0) } == 0 {
            let data = unsafe { (*msg).__bindgen_anon_1.data } as usize;
            let end = unsafe { (*msg).__bindgen_anon_2.data_end } as usize;
            if data + 1 <= end && unsafe { *(data as *const u8) } == PREFACE[0] {
                let _ = unsafe { bpf_msg_cork_bytes(msg, PREFACE.len() as u32) };
                return;
            }
        }
        not_h2(msg, st);
        return;
    }
    if !starts_with_preface(msg) {
        not_h2(msg, st);
        return;
    }
    unsafe { (*st).h2 = H2_ACTIVE };
    let _ = unsafe { bpf_msg_apply_bytes(msg, PREFACE.len() as u32) };
}

/// One frame of an HTTP/2 client: count it if it opens a stream, and
/// skip to the next frame's header.
#[inline(always)]
fn on_frame(msg: *mut sk_msg_md, st: *mut SockState) {
    if unsafe { (*msg).size } < HEADER_LEN as u32 {
        let _ = unsafe { bpf_msg_cork_bytes(msg, HEADER_LEN as u32) };
        return;
    }
    let Some(h) = frame_header(msg) else {
        return;
    };
    // A client opens a stream with HEADERS on a new, odd, higher id.
    if h.kind == HEADERS && h.stream & 1 == 1 && h.stream > unsafe { (*st).last_stream } {
        unsafe { (*st).last_stream = h.stream };
        let backend_id = unsafe { (*st).backend_id };
        if let Some(stats) = backend_stats(backend_id) {
            atomic_add(unsafe { ptr::addr_of_mut!((*stats).streams) }, 1);
        }
        count(Counter::H2Streams);
    }
    let _ = unsafe { bpf_msg_apply_bytes(msg, HEADER_LEN as u32 + h.length) };
}

/// The frame header `msg` starts with, pulled into its linear data and
/// read byte by byte (each load checked against `data_end`, as the
/// verifier wants), then parsed by the router's own parser.
#[inline(always)]
fn frame_header(msg: *mut sk_msg_md) -> Option<FrameHeader> {
    if unsafe { bpf_msg_pull_data(msg, 0, HEADER_LEN as u32, 0) } != 0 {
        return None;
    }
    let data = unsafe { (*msg).__bindgen_anon_1.data } as usize;
    let end = unsafe { (*msg).__bindgen_anon_2.data_end } as usize;
    if data + HEADER_LEN > end {
        return None;
    }
    let b = |i: usize| unsafe { *((data + i) as *const u8) };
    Some(FrameHeader::parse(&[
        b(0),
        b(1),
        b(2),
        b(3),
        b(4),
        b(5),
        b(6),
        b(7),
        b(8),
    ]))
}

#[inline(always)]
fn not_h2(msg: *mut sk_msg_md, st: *mut SockState) {
    unsafe { (*st).h2 = H2_NOT };
    pass_for_good(msg);
}
