//! `balancer_splice`, on SPLICE: a client socket and the router's socket
//! for it exchange bytes without TCP/IP (`run --splice`).

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS, sk_msg_md},
    macros::sk_msg,
    programs::SkMsgContext,
};
use balancer_common::{Counter, SPLICE_OFF, SPLICE_ON, SockKey, SpliceKey};

use super::{msg_sk, pass_for_good, starts_with_preface};
use crate::{
    helpers::{count, family_addr, net_port, sock_storage},
    maps::SPLICE,
};

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
    let sk = msg_sk(msg);
    if sk.is_null() {
        return SK_PASS;
    }
    let mut key = peer_key(msg);
    let st = sock_storage(sk);
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
    pass_for_good(msg);
    SK_PASS
}

/// The SPLICE key of the peer of the socket sending `msg`: its own key with
/// the halves swapped.
#[inline(always)]
fn peer_key(msg: *const sk_msg_md) -> SpliceKey {
    // Every field loaded unconditionally, as in `sockops::local_key`.
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
    SpliceKey {
        local: SockKey {
            addr: family_addr(family, r4, r6),
            port: net_port(rport),
            _pad: [0; 2],
        },
        remote: SockKey {
            addr: family_addr(family, l4, l6),
            // local_port is in host order.
            port: (lport as u16).to_be(),
            _pad: [0; 2],
        },
    }
}
