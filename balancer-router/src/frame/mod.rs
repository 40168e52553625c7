//! HTTP/2 frames (RFC 9113 4.1, 6): reading them off a connection's input
//! and writing them into its output buffer, one file per frame type where
//! there is more than a header to it. The 9-byte header and its size rules
//! come from `balancer_common::h2frame` (the kernel's sk_msg uses them too).

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use balancer_common::h2frame::{
    CONTINUATION, DATA, DEFAULT_MAX_FRAME_SIZE, FLAG_ACK, FLAG_END_STREAM, FrameHeader, GOAWAY,
    HEADER_LEN, HEADERS, PING, PREFACE, PRIORITY, PUSH_PROMISE, RST_STREAM, SETTINGS,
    WINDOW_UPDATE,
};

use crate::error::Error;

mod headers;
mod priority;
mod reason;
mod settings;

pub use crate::flow::MAX_WINDOW;
pub use headers::{Block, Fragments, headers};
pub use priority::Priority;
pub use reason::Reason;
pub use settings::{DEFAULT_WINDOW, PeerSettings, settings, settings_ack};

pub const FLAG_END_HEADERS: u8 = 0x4;
pub const FLAG_PADDED: u8 = 0x8;
pub const FLAG_PRIORITY: u8 = 0x20;

/// Settings identifiers (RFC 9113 6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

pub fn head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len < 1 << 24);
    out.reserve(HEADER_LEN + len);
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream & 0x7fff_ffff);
}

pub fn data(out: &mut BytesMut, stream: u32, payload: &[u8], end: bool) {
    head(
        out,
        payload.len(),
        DATA,
        if end { FLAG_END_STREAM } else { 0 },
        stream,
    );
    out.put_slice(payload);
}

pub fn rst(out: &mut BytesMut, stream: u32, reason: Reason) {
    head(out, 4, RST_STREAM, 0, stream);
    out.put_u32(reason.code());
}

pub fn window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    head(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment & 0x7fff_ffff);
}

pub fn ping(out: &mut BytesMut, ack: bool, payload: [u8; 8]) {
    head(out, 8, PING, if ack { FLAG_ACK } else { 0 }, 0);
    out.put_slice(&payload);
}

pub fn goaway(out: &mut BytesMut, last_stream: u32, reason: Reason) {
    head(out, 8, GOAWAY, 0, 0);
    out.put_u32(last_stream & 0x7fff_ffff);
    out.put_u32(reason.code());
}

/// Take the next whole frame (header and payload) off `buf`, checking the
/// size rules against our SETTINGS_MAX_FRAME_SIZE (the default: we never
/// raise it); None while it is incomplete (room is reserved for it).
pub fn next_frame(buf: &mut BytesMut) -> Result<Option<(FrameHeader, Bytes)>, Error> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let h = FrameHeader::parse(buf[..HEADER_LEN].try_into().expect("9 bytes"));
    h.check(DEFAULT_MAX_FRAME_SIZE)
        .map_err(|_| Error::conn(Reason::FRAME_SIZE_ERROR, "frame size"))?;
    let total = HEADER_LEN + h.length as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut f = buf.split_to(total).freeze();
    f.advance(HEADER_LEN);
    Ok(Some((h, f)))
}

/// The order rules every frame of a peer must follow, on either hop: its
/// first frame is SETTINGS (its preface, RFC 9113 3.4), and nothing but
/// CONTINUATION comes inside a header block (6.10).
pub fn check_order(h: &FrameHeader, settings_seen: &mut bool, in_block: bool) -> Result<(), Error> {
    if !*settings_seen {
        if h.kind != SETTINGS || h.flags & FLAG_ACK != 0 {
            return Err(Error::conn(
                Reason::PROTOCOL_ERROR,
                "first frame is not SETTINGS",
            ));
        }
        *settings_seen = true;
    }
    if in_block && h.kind != CONTINUATION {
        return Err(Error::conn(
            Reason::PROTOCOL_ERROR,
            "frame inside a header block",
        ));
    }
    Ok(())
}

/// The 31-bit value of a WINDOW_UPDATE, RST_STREAM or GOAWAY field.
pub fn u31(p: &[u8]) -> u32 {
    u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff
}

/// The 32-bit error code of a RST_STREAM (at 0) or GOAWAY (at 4).
pub fn reason_at(p: &[u8], at: usize) -> Reason {
    Reason::from_code(u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]))
}

/// The payload of a DATA or HEADERS frame without its padding (and, for
/// HEADERS, without the priority fields): `(start, end)` within the
/// payload, or None if the padding does not fit (PROTOCOL_ERROR, 6.1).
pub fn unpadded(kind: u8, flags: u8, payload: &[u8]) -> Option<(usize, usize)> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let pad = usize::from(*payload.first()?);
        start = 1;
        end = end.checked_sub(pad)?;
    }
    if kind == HEADERS && flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    (start <= end).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_and_priority_are_stripped() {
        // Pad length 2, 3 bytes of data, 2 of padding.
        assert_eq!(
            unpadded(DATA, FLAG_PADDED, &[2, 1, 2, 3, 0, 0]),
            Some((1, 4))
        );
        // Padding longer than the frame.
        assert_eq!(unpadded(DATA, FLAG_PADDED, &[9, 1]), None);
        assert_eq!(unpadded(DATA, FLAG_PADDED, &[]), None);
        // Priority: 5 bytes before the block.
        assert_eq!(
            unpadded(HEADERS, FLAG_PRIORITY, &[0, 0, 0, 1, 16, 0x82]),
            Some((5, 6))
        );
        assert_eq!(unpadded(HEADERS, FLAG_PRIORITY, &[0, 0]), None);
    }
}
