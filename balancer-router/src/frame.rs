//! Writing HTTP/2 frames (RFC 9113 4.1, 6) into a connection's output
//! buffer. Parsing lives with the connection logic in [`super::core`];
//! the 9-byte header and its size rules come from `balancer_common::h2frame`.

use bytes::{BufMut, BytesMut};

pub use balancer_common::h2frame::{
    CONTINUATION, DATA, DEFAULT_MAX_FRAME_SIZE, FLAG_ACK, FLAG_END_STREAM, FrameHeader, GOAWAY,
    HEADER_LEN, HEADERS, PING, PREFACE, PRIORITY, PUSH_PROMISE, RST_STREAM, SETTINGS,
    WINDOW_UPDATE,
};

pub const FLAG_END_HEADERS: u8 = 0x4;
pub const FLAG_PADDED: u8 = 0x8;
pub const FLAG_PRIORITY: u8 = 0x20;

/// Error codes (RFC 9113 7).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const INTERNAL_ERROR: u32 = 0x2;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// Settings identifiers (RFC 9113 6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
}

/// The largest window (and stream id) HTTP/2 allows: 2^31 - 1.
pub const MAX_WINDOW: i64 = 0x7fff_ffff;
/// The default initial window, per stream and per connection.
pub const DEFAULT_WINDOW: i64 = 65_535;

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

/// A header block as HEADERS plus as many CONTINUATION frames as the peer's
/// SETTINGS_MAX_FRAME_SIZE needs; written at once, so the frames of one
/// block are contiguous on the connection (RFC 9113 6.10).
pub fn headers(out: &mut BytesMut, stream: u32, block: &[u8], end: bool, max_frame: usize) {
    let max_frame = max_frame.max(DEFAULT_MAX_FRAME_SIZE as usize);
    let mut chunks = block.chunks(max_frame).peekable();
    let first = chunks.next().unwrap_or(&[]);
    let mut flags = if end { FLAG_END_STREAM } else { 0 };
    if chunks.peek().is_none() {
        flags |= FLAG_END_HEADERS;
    }
    head(out, first.len(), HEADERS, flags, stream);
    out.put_slice(first);
    while let Some(c) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            FLAG_END_HEADERS
        } else {
            0
        };
        head(out, c.len(), CONTINUATION, flags, stream);
        out.put_slice(c);
    }
}

pub fn rst(out: &mut BytesMut, stream: u32, code: u32) {
    head(out, 4, RST_STREAM, 0, stream);
    out.put_u32(code);
}

pub fn window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    head(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment & 0x7fff_ffff);
}

pub fn settings(out: &mut BytesMut, values: &[(u16, u32)]) {
    head(out, values.len() * 6, SETTINGS, 0, 0);
    for (id, v) in values {
        out.put_u16(*id);
        out.put_u32(*v);
    }
}

pub fn settings_ack(out: &mut BytesMut) {
    head(out, 0, SETTINGS, FLAG_ACK, 0);
}

pub fn ping(out: &mut BytesMut, ack: bool, payload: [u8; 8]) {
    head(out, 8, PING, if ack { FLAG_ACK } else { 0 }, 0);
    out.put_slice(&payload);
}

pub fn goaway(out: &mut BytesMut, last_stream: u32, code: u32) {
    head(out, 8, GOAWAY, 0, 0);
    out.put_u32(last_stream & 0x7fff_ffff);
    out.put_u32(code);
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
    fn a_large_header_block_is_split_into_continuations() {
        let mut out = BytesMut::new();
        let block = vec![7u8; 40_000];
        headers(&mut out, 5, &block, true, 16_384);
        let mut at = 0;
        let mut kinds = Vec::new();
        let mut total = 0;
        while at < out.len() {
            let h = FrameHeader::parse(out[at..at + HEADER_LEN].try_into().expect("9"));
            kinds.push((h.kind, h.flags));
            assert_eq!(h.stream, 5);
            total += h.length as usize;
            at += HEADER_LEN + h.length as usize;
        }
        assert_eq!(total, 40_000);
        assert_eq!(
            kinds,
            vec![
                (HEADERS, FLAG_END_STREAM),
                (CONTINUATION, 0),
                (CONTINUATION, FLAG_END_HEADERS)
            ]
        );
    }

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
