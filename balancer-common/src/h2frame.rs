//! HTTP/2 frame headers (RFC 9113 4.1): parsing, the size rules a receiver
//! must enforce as connection errors, and a byte-stream tracker that finds
//! frame boundaries without buffering payloads.
//!
//! Used by the router in front of its HTTP/2 server so that oversized or
//! wrongly sized frames get `FRAME_SIZE_ERROR` as RFC 9113 requires, and
//! shaped so the kernel's sk_msg frame accounting can share it. `no_std`,
//! no allocation, no panics on any input (there is a fuzz target).

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

/// Error codes (RFC 9113 7).
pub const PROTOCOL_ERROR: u32 = 0x1;
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

/// A GOAWAY frame: last stream id and error code, no debug data.
pub fn goaway(last_stream: u32, code: u32) -> [u8; HEADER_LEN + 8] {
    let mut f = [0u8; HEADER_LEN + 8];
    f[2] = 8;
    f[3] = GOAWAY;
    f[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    f[13..17].copy_from_slice(&code.to_be_bytes());
    f
}

/// Where a tracker is in the byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Inside the client preface (bytes of it seen so far).
    Preface(usize),
    /// Collecting a frame header (bytes collected).
    Header(usize),
    /// Skipping a payload (bytes left).
    Payload(u32),
    /// A violation was found; nothing more is accepted.
    Failed(u32),
}

/// Follows an HTTP/2 byte stream chunk by chunk and checks every frame
/// header as it completes.
#[derive(Clone, Debug)]
pub struct Tracker {
    state: State,
    header: [u8; HEADER_LEN],
    max_frame_size: u32,
    /// Highest stream id the peer opened with HEADERS.
    pub last_stream: u32,
    /// Frames seen, by type (0..=9; others counted in slot 10).
    pub frames: [u64; 11],
    /// Streams opened (HEADERS on a new, higher stream id).
    pub streams_opened: u64,
    /// Bytes fed so far that are at a frame boundary: everything up to the
    /// end of the last complete frame (or of the preface).
    pub at_boundary: bool,
}

impl Tracker {
    /// `expect_preface`: true for the client side of a connection.
    pub fn new(expect_preface: bool, max_frame_size: u32) -> Self {
        Self {
            state: if expect_preface {
                State::Preface(0)
            } else {
                State::Header(0)
            },
            header: [0; HEADER_LEN],
            max_frame_size,
            last_stream: 0,
            frames: [0; 11],
            streams_opened: 0,
            at_boundary: true,
        }
    }

    /// The error code of the first violation, if any.
    pub fn failed(&self) -> Option<u32> {
        match self.state {
            State::Failed(code) => Some(code),
            _ => None,
        }
    }

    /// Feed the next bytes of the stream. Returns how many of them are
    /// acceptable: all of them, or, once a rule is broken, those before the
    /// byte that broke it (the last byte of a bad frame header, the first
    /// wrong byte of the preface); the error code is then in
    /// [`Tracker::failed`].
    pub fn feed(&mut self, mut data: &[u8]) -> usize {
        let total = data.len();
        while !data.is_empty() {
            match self.state {
                State::Failed(_) => return total - data.len(),
                State::Preface(seen) => {
                    let want = PREFACE.len() - seen;
                    let n = want.min(data.len());
                    if let Some(bad) = (0..n).find(|&i| data[i] != PREFACE[seen + i]) {
                        self.state = State::Failed(PROTOCOL_ERROR);
                        return total - data.len() + bad;
                    }
                    data = &data[n..];
                    self.state = if seen + n == PREFACE.len() {
                        self.at_boundary = true;
                        State::Header(0)
                    } else {
                        self.at_boundary = false;
                        State::Preface(seen + n)
                    };
                }
                State::Header(have) => {
                    let n = (HEADER_LEN - have).min(data.len());
                    self.header[have..have + n].copy_from_slice(&data[..n]);
                    self.at_boundary = false;
                    if have + n < HEADER_LEN {
                        data = &data[n..];
                        self.state = State::Header(have + n);
                        continue;
                    }
                    let h = FrameHeader::parse(&self.header);
                    if let Err(code) = h.check(self.max_frame_size) {
                        self.state = State::Failed(code);
                        // Everything but the header's last byte: however the
                        // stream was split, the same bytes are accepted, and
                        // a complete bad header never is.
                        return total - data.len() + n - 1;
                    }
                    data = &data[n..];
                    self.frames[usize::from(h.kind.min(10))] += 1;
                    if h.kind == HEADERS && h.stream > self.last_stream {
                        self.last_stream = h.stream;
                        self.streams_opened += 1;
                    }
                    if h.length == 0 {
                        self.at_boundary = true;
                        self.state = State::Header(0);
                    } else {
                        self.state = State::Payload(h.length);
                    }
                }
                State::Payload(left) => {
                    let n = (left as usize).min(data.len());
                    data = &data[n..];
                    let left = left - n as u32;
                    if left == 0 {
                        self.at_boundary = true;
                        self.state = State::Header(0);
                    } else {
                        self.state = State::Payload(left);
                    }
                }
            }
        }
        total
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
    fn follows_frames_split_anywhere() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        bytes.extend(frame(HEADERS, 4, 1, &[0x82; 10]));
        bytes.extend(frame(DATA, 1, 1, &[7; 100]));
        bytes.extend(frame(HEADERS, 5, 3, &[0x82; 3]));
        bytes.extend(frame(PING, 0, 0, &[0; 8]));
        for split in 1..bytes.len() {
            let mut t = Tracker::new(true, DEFAULT_MAX_FRAME_SIZE);
            assert_eq!(t.feed(&bytes[..split]), split);
            assert_eq!(t.feed(&bytes[split..]), bytes.len() - split);
            assert_eq!(t.failed(), None);
            assert!(t.at_boundary);
            assert_eq!(t.last_stream, 3);
            assert_eq!(t.streams_opened, 2);
            assert_eq!(t.frames[usize::from(DATA)], 1);
        }
    }

    #[test]
    fn size_rules_are_frame_size_errors() {
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
            let mut bytes = PREFACE.to_vec();
            let good = frame(SETTINGS, 0, 0, &[]);
            bytes.extend(&good);
            let before = bytes.len();
            bytes.extend(frame(kind, flags, 1, &std::vec![0; len]));
            let mut t = Tracker::new(true, DEFAULT_MAX_FRAME_SIZE);
            assert_eq!(
                t.feed(&bytes),
                before + HEADER_LEN - 1,
                "kind {kind} len {len}"
            );
            assert_eq!(t.failed(), Some(FRAME_SIZE_ERROR), "kind {kind} len {len}");
        }
    }

    #[test]
    fn a_wrong_preface_is_a_protocol_error() {
        let mut t = Tracker::new(true, DEFAULT_MAX_FRAME_SIZE);
        assert_eq!(t.feed(b"GET / HTTP/1.1\r\n"), 0);
        assert_eq!(t.failed(), Some(PROTOCOL_ERROR));
        let mut t = Tracker::new(true, DEFAULT_MAX_FRAME_SIZE);
        assert_eq!(
            t.feed(b"PRI * HTTP/1.1\r\n"),
            11,
            "up to the first wrong byte"
        );
    }

    #[test]
    fn goaway_encodes_id_and_code() {
        let g = goaway(7, FRAME_SIZE_ERROR);
        let h = FrameHeader::parse(g[..9].try_into().expect("9"));
        assert_eq!((h.length, h.kind, h.stream), (8, GOAWAY, 0));
        assert_eq!(&g[9..], &[0, 0, 0, 7, 0, 0, 0, 6]);
    }
}
