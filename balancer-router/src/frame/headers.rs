//! HEADERS and CONTINUATION (RFC 9113 6.2, 6.10): a header block is read
//! as one unit however many frames carry it, and written as HEADERS plus
//! as many CONTINUATION frames as the peer's frame size needs.

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    CONTINUATION, DEFAULT_MAX_FRAME_SIZE, FLAG_END_HEADERS, FLAG_END_STREAM, FLAG_PRIORITY,
    FrameHeader, HEADERS, Priority, Reason, head, unpadded,
};
use crate::error::Error;

/// A header block (HEADERS + CONTINUATION) larger than this is refused.
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// CONTINUATION frames one block may take. An encoder splits a block at
/// the frame size (16 KiB at least), so [`MAX_HEADER_BLOCK`] needs 16; many
/// more are a CONTINUATION flood of small or empty frames
/// (CVE-2024-27316 and its family), which never grows the block.
pub const MAX_CONTINUATIONS: usize = 64;

/// One complete header block.
pub struct Block {
    pub stream: u32,
    pub end_stream: bool,
    /// The HEADERS frame's priority fields, if it had them.
    pub priority: Option<Priority>,
    /// A slice of the HEADERS frame (no copy); copied only when
    /// CONTINUATION frames extend it.
    pub buf: Bytes,
}

/// The block being assembled on one connection.
#[derive(Default)]
pub struct Fragments {
    pending: Option<Block>,
    continuations: usize,
}

impl Fragments {
    /// Whether a block is in progress: then only CONTINUATION may follow.
    pub fn in_progress(&self) -> bool {
        self.pending.is_some()
    }

    /// A HEADERS or CONTINUATION frame: the header block it completes
    /// (END_HEADERS), if any.
    pub fn push(&mut self, h: FrameHeader, p: Bytes) -> Result<Option<Block>, Error> {
        let block = if h.kind == HEADERS {
            if h.stream == 0 {
                return Err(Error::conn(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
            }
            let (s, e) = unpadded(h.kind, h.flags, &p)
                .ok_or(Error::conn(Reason::PROTOCOL_ERROR, "HEADERS padding"))?;
            let priority = (h.flags & FLAG_PRIORITY != 0).then(|| Priority::parse(&p[s - 5..s]));
            self.continuations = 0;
            Block {
                stream: h.stream,
                end_stream: h.flags & FLAG_END_STREAM != 0,
                priority,
                buf: p.slice(s..e),
            }
        } else {
            debug_assert_eq!(h.kind, CONTINUATION);
            let Some(mut block) = self.pending.take() else {
                return Err(Error::conn(
                    Reason::PROTOCOL_ERROR,
                    "CONTINUATION without HEADERS",
                ));
            };
            if block.stream != h.stream {
                return Err(Error::conn(
                    Reason::PROTOCOL_ERROR,
                    "CONTINUATION on another stream",
                ));
            }
            self.continuations += 1;
            if self.continuations > MAX_CONTINUATIONS {
                return Err(Error::conn(Reason::ENHANCE_YOUR_CALM, "CONTINUATION flood"));
            }
            let mut b = BytesMut::with_capacity(block.buf.len() + p.len());
            b.extend_from_slice(&block.buf);
            b.extend_from_slice(&p);
            block.buf = b.freeze();
            block
        };
        if block.buf.len() > MAX_HEADER_BLOCK {
            return Err(Error::conn(
                Reason::ENHANCE_YOUR_CALM,
                "header block too large",
            ));
        }
        if h.flags & FLAG_END_HEADERS == 0 {
            self.pending = Some(block);
            return Ok(None);
        }
        Ok(Some(block))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::HEADER_LEN;

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
    fn a_continuation_flood_of_empty_frames_is_refused() {
        let mut f = Fragments::default();
        let h = |kind, flags, len| FrameHeader {
            length: len,
            kind,
            flags,
            stream: 1,
        };
        assert!(
            f.push(h(HEADERS, 0, 1), Bytes::from_static(&[0x82]))
                .expect("ok")
                .is_none()
        );
        for _ in 0..MAX_CONTINUATIONS {
            assert!(
                f.push(h(CONTINUATION, 0, 0), Bytes::new())
                    .expect("ok")
                    .is_none()
            );
        }
        let e = f
            .push(h(CONTINUATION, 0, 0), Bytes::new())
            .err()
            .expect("flood");
        assert!(matches!(e, Error::Conn { reason, .. } if reason == Reason::ENHANCE_YOUR_CALM));
    }
}
