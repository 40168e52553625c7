//! HTTP/2 frame headers (RFC 9113 4.1): parsing, and the size rules a
//! receiver must enforce as connection errors (FRAME_SIZE_ERROR).
//!
//! Shared by the router (`balancer-router`) and the kernel's sk_msg frame
//! accounting. `no_std`, no allocation, no panics on any input.

/// The client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE until a peer raises it.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const FLAG_ACK: u8 = 0x1;
pub const FLAG_END_STREAM: u8 = 0x1;

/// Error code (RFC 9113 7).
pub const FRAME_SIZE_ERROR: u32 = 0x6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub length: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHeader {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            length: (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// The size rules whose violation is a connection error of type
    /// FRAME_SIZE_ERROR (RFC 9113 4.2, 6.3-6.9). Returns the error code.
    pub fn check(&self, max_frame_size: u32) -> Result<(), u32> {
        if self.length > max_frame_size {
            return Err(FRAME_SIZE_ERROR);
        }
        let ok = match self.kind {
            SETTINGS if self.flags & FLAG_ACK != 0 => self.length == 0,
            SETTINGS => self.length.is_multiple_of(6),
            PING => self.length == 8,
            RST_STREAM | WINDOW_UPDATE => self.length == 4,
            GOAWAY => self.length >= 8,
            _ => true,
        };
        if ok { Ok(()) } else { Err(FRAME_SIZE_ERROR) }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = std::vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn headers_parse_and_size_rules_are_frame_size_errors() {
        let f = frame(HEADERS, 5, 0x8000_0003, &[0x82; 10]);
        let h = FrameHeader::parse(f[..HEADER_LEN].try_into().expect("9"));
        // The reserved bit is ignored.
        assert_eq!((h.length, h.kind, h.flags, h.stream), (10, HEADERS, 5, 3));
        assert_eq!(h.check(DEFAULT_MAX_FRAME_SIZE), Ok(()));
        let cases: [(u8, u8, usize); 7] = [
            (DATA, 0, 16_385),
            (SETTINGS, 0, 5),
            (SETTINGS, FLAG_ACK, 6),
            (PING, 0, 7),
            (RST_STREAM, 0, 5),
            (WINDOW_UPDATE, 0, 3),
            (GOAWAY, 0, 4),
        ];
        for (kind, flags, len) in cases {
            let f = frame(kind, flags, 1, &std::vec![0; len]);
            let h = FrameHeader::parse(f[..HEADER_LEN].try_into().expect("9"));
            assert_eq!(
                h.check(DEFAULT_MAX_FRAME_SIZE),
                Err(FRAME_SIZE_ERROR),
                "kind {kind} len {len}"
            );
        }
    }
}
