//! Raw HTTP/2 on the wire, for test peers that must send what no
//! well-behaved library would: frames (RFC 9113 4.1, 6) built byte by byte,
//! header blocks as HPACK literals (RFC 7541 6.2: no Huffman, no table, so
//! every byte is known), and the hostile cases `lbt-h2 hostile` sends. The
//! expected answers live in the tests (`tests/h2_hostile.rs`), not here.

use std::collections::BTreeMap;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 6).
pub mod kind {
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
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// Error codes (RFC 9113 7).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const INTERNAL_ERROR: u32 = 0x2;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const SETTINGS_TIMEOUT: u32 = 0x4;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const CONNECT_ERROR: u32 = 0xa;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn name(code: u32) -> &'static str {
        match code {
            NO_ERROR => "NO_ERROR",
            PROTOCOL_ERROR => "PROTOCOL_ERROR",
            INTERNAL_ERROR => "INTERNAL_ERROR",
            FLOW_CONTROL_ERROR => "FLOW_CONTROL_ERROR",
            SETTINGS_TIMEOUT => "SETTINGS_TIMEOUT",
            STREAM_CLOSED => "STREAM_CLOSED",
            FRAME_SIZE_ERROR => "FRAME_SIZE_ERROR",
            REFUSED_STREAM => "REFUSED_STREAM",
            CANCEL => "CANCEL",
            COMPRESSION_ERROR => "COMPRESSION_ERROR",
            CONNECT_ERROR => "CONNECT_ERROR",
            ENHANCE_YOUR_CALM => "ENHANCE_YOUR_CALM",
            _ => "other",
        }
    }
}

/// Settings identifiers (RFC 9113 6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// The largest window HTTP/2 allows: 2^31 - 1.
pub const MAX_WINDOW: u32 = 0x7fff_ffff;
pub const DEFAULT_WINDOW: u32 = 65_535;
pub const DEFAULT_MAX_FRAME: usize = 16_384;

/// One frame: the 9-byte header (length from the payload), then the payload.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    assert!(len < 1 << 24, "frame payload of {len} bytes");
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

pub fn settings(out: &mut Vec<u8>, values: &[(u16, u32)]) {
    let mut p = Vec::with_capacity(values.len() * 6);
    for (id, v) in values {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(out, kind::SETTINGS, 0, 0, &p);
}

pub fn settings_ack(out: &mut Vec<u8>) {
    frame(out, kind::SETTINGS, flag::ACK, 0, &[]);
}

pub fn ping(out: &mut Vec<u8>, ack: bool, payload: [u8; 8]) {
    frame(
        out,
        kind::PING,
        if ack { flag::ACK } else { 0 },
        0,
        &payload,
    );
}

pub fn window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    frame(
        out,
        kind::WINDOW_UPDATE,
        0,
        stream,
        &increment.to_be_bytes(),
    );
}

pub fn rst(out: &mut Vec<u8>, stream: u32, code: u32) {
    frame(out, kind::RST_STREAM, 0, stream, &code.to_be_bytes());
}

pub fn data(out: &mut Vec<u8>, stream: u32, flags: u8, payload: &[u8]) {
    frame(out, kind::DATA, flags, stream, payload);
}

pub fn headers(out: &mut Vec<u8>, stream: u32, flags: u8, block: &[u8]) {
    frame(out, kind::HEADERS, flags, stream, block);
}

pub fn continuation(out: &mut Vec<u8>, stream: u32, flags: u8, fragment: &[u8]) {
    frame(out, kind::CONTINUATION, flags, stream, fragment);
}

/// PRIORITY (RFC 9113 6.3): exclusive bit, stream dependency, weight.
pub fn priority(out: &mut Vec<u8>, stream: u32, depends_on: u32, weight: u8) {
    let mut p = depends_on.to_be_bytes().to_vec();
    p.push(weight);
    frame(out, kind::PRIORITY, 0, stream, &p);
}

/// A header block as HEADERS plus CONTINUATION frames of at most
/// `max_frame` bytes each (END_HEADERS on the last).
pub fn header_block(
    out: &mut Vec<u8>,
    stream: u32,
    end_stream: bool,
    block: &[u8],
    max_frame: usize,
) {
    let mut chunks = block.chunks(max_frame.max(1)).peekable();
    let first = chunks.next().unwrap_or(&[]);
    let es = if end_stream { flag::END_STREAM } else { 0 };
    let eh = if chunks.peek().is_none() {
        flag::END_HEADERS
    } else {
        0
    };
    headers(out, stream, es | eh, first);
    while let Some(c) = chunks.next() {
        let eh = if chunks.peek().is_none() {
            flag::END_HEADERS
        } else {
            0
        };
        continuation(out, stream, eh, c);
    }
}

// ---- HPACK, literals only (RFC 7541) ------------------------------------

/// An integer with an `n`-bit prefix; `first` holds the pattern bits above it.
pub fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut value: u64) {
    let max = (1u64 << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A string literal, not Huffman coded.
pub fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len() as u64);
    out.extend_from_slice(s);
}

/// A string literal marked Huffman coded, with `coded` as its bytes (which
/// may be invalid on purpose).
pub fn hpack_huffman(out: &mut Vec<u8>, coded: &[u8]) {
    hpack_int(out, 0x80, 7, coded.len() as u64);
    out.extend_from_slice(coded);
}

/// A literal field without indexing, with a new name (RFC 7541 6.2.2).
pub fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_str(out, name);
    hpack_str(out, value);
}

/// A literal field without indexing whose name is static table entry `idx`.
pub fn literal_indexed_name(out: &mut Vec<u8>, idx: u64, value: &[u8]) {
    hpack_int(out, 0x00, 4, idx);
    hpack_str(out, value);
}

/// Static table entries used here (RFC 7541 Appendix A).
pub mod static_index {
    pub const AUTHORITY: u64 = 1;
    pub const METHOD_GET: u64 = 2;
    pub const METHOD_POST: u64 = 3;
    pub const PATH: u64 = 4;
    pub const SCHEME_HTTP: u64 = 6;
    /// `accept-encoding: gzip, deflate`: 60 bytes of header list (RFC 9113
    /// 6.5.2: name + value + 32) for one byte of block.
    pub const ACCEPT_ENCODING_GZIP_DEFLATE: u64 = 16;
    pub const CONTENT_LENGTH: u64 = 28;
    pub const CONTENT_TYPE: u64 = 31;
}

/// The pseudo-header fields of a request, for `method` (GET or POST from
/// the static table, anything else as a literal).
pub fn request_pseudo(out: &mut Vec<u8>, method: &str, path: &str, authority: &str) {
    match method {
        "GET" => hpack_int(out, 0x80, 7, static_index::METHOD_GET),
        "POST" => hpack_int(out, 0x80, 7, static_index::METHOD_POST),
        m => literal_indexed_name(out, static_index::METHOD_GET, m.as_bytes()),
    }
    hpack_int(out, 0x80, 7, static_index::SCHEME_HTTP);
    literal_indexed_name(out, static_index::PATH, path.as_bytes());
    literal_indexed_name(out, static_index::AUTHORITY, authority.as_bytes());
}

/// A whole request header block: pseudo-headers, then `extra` fields.
pub fn request(method: &str, path: &str, authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    request_pseudo(&mut b, method, path, authority);
    for (n, v) in extra {
        literal(&mut b, n.as_bytes(), v.as_bytes());
    }
    b
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- parsing what a peer sent -----------------------------------------

#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM, or of a GOAWAY.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            kind::RST_STREAM => 0,
            kind::GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(b.try_into().ok()?))
    }

    /// The values of a SETTINGS frame (not an ACK).
    pub fn settings(&self) -> Option<BTreeMap<u16, u32>> {
        if self.kind != kind::SETTINGS || self.flags & flag::ACK != 0 {
            return None;
        }
        Some(
            self.payload
                .chunks_exact(6)
                .map(|s| {
                    (
                        u16::from_be_bytes([s[0], s[1]]),
                        u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                    )
                })
                .collect(),
        )
    }
}

/// Take every complete frame off the front of `buf`.
pub fn take_frames(buf: &mut Vec<u8>) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 9 {
        let h = &buf[at..at + 9];
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        if buf.len() - at < 9 + len {
            break;
        }
        frames.push(Frame {
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
            payload: buf[at + 9..at + 9 + len].to_vec(),
        });
        at += 9 + len;
    }
    buf.drain(..at);
    frames
}

// ---- the hostile cases -------------------------------------------------

/// What a case is, for the report (the tests hold what each must get).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// A malformed header block (RFC 7541 decoding error).
    Hpack,
    /// A malformed frame or a frame in the wrong state (RFC 9113 4-6).
    Frame,
    /// A well-formed block that is a malformed request (RFC 9113 8.1.1, 8.2).
    Request,
    /// A known attack: many frames that are each legal or cheap.
    Attack,
    /// Odd but valid: must be served normally.
    Control,
}

/// What the router told us in its SETTINGS, and the request to send.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub path: String,
    pub authority: String,
    pub max_frame: usize,
    pub init_window: u32,
    pub max_header_list: Option<u32>,
}

impl Ctx {
    pub fn new(path: &str, authority: &str, settings: &BTreeMap<u16, u32>) -> Self {
        Self {
            path: path.into(),
            authority: authority.into(),
            max_frame: settings
                .get(&setting::MAX_FRAME_SIZE)
                .map_or(DEFAULT_MAX_FRAME, |v| *v as usize),
            init_window: settings
                .get(&setting::INITIAL_WINDOW_SIZE)
                .copied()
                .unwrap_or(DEFAULT_WINDOW),
            max_header_list: settings.get(&setting::MAX_HEADER_LIST_SIZE).copied(),
        }
    }

    /// The request block of a plain GET.
    fn get_block(&self) -> Vec<u8> {
        request("GET", &self.path, &self.authority, &[])
    }

    /// The request's pseudo-headers then `tail` (raw HPACK bytes).
    fn block_with(&self, tail: &[u8]) -> Vec<u8> {
        let mut b = self.get_block();
        b.extend_from_slice(tail);
        b
    }

    /// A valid GET block of exactly `len` bytes (one padding field).
    fn block_of_len(&self, len: usize) -> Vec<u8> {
        let base = self.get_block();
        let mut v = len.saturating_sub(base.len() + 12);
        for _ in 0..8 {
            let mut b = base.clone();
            literal(&mut b, b"x-pad", &vec![b'p'; v]);
            match b.len().cmp(&len) {
                std::cmp::Ordering::Equal => return b,
                std::cmp::Ordering::Less => v += len - b.len(),
                std::cmp::Ordering::Greater => v -= (b.len() - len).min(v),
            }
        }
        panic!("no block of {len} bytes");
    }

    /// HEADERS opening `stream` with a GET, END_STREAM if `end`.
    fn open(&self, out: &mut Vec<u8>, stream: u32, end: bool) {
        let es = if end { flag::END_STREAM } else { 0 };
        headers(out, stream, es | flag::END_HEADERS, &self.get_block());
    }

    /// The advertised header list limit, or 64 KiB when none was
    /// advertised (RFC 9113 says unlimited then; the tests check that the
    /// router advertises one).
    fn header_list_limit(&self) -> usize {
        self.max_header_list.map_or(64 << 10, |v| v as usize)
    }
}

pub type Build = fn(&Ctx) -> Vec<Vec<u8>>;

pub struct Case {
    pub name: &'static str,
    pub group: Group,
    /// Send our SETTINGS ACK before the case: the router then forwards
    /// header blocks as they are (once a client acknowledged our header
    /// table size of 0, its blocks can refer to no dynamic table entry),
    /// the path to be proven safe.
    /// Without it the router still decodes our blocks.
    pub ack: bool,
    /// The bytes to send after the handshake, in chunks (a flood stops
    /// once the router answered).
    pub build: Build,
}

fn one(f: impl FnOnce(&mut Vec<u8>)) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    f(&mut out);
    vec![out]
}

/// `n` repetitions of what `f` writes for index `i`, in ~64 KiB chunks.
fn repeat(n: usize, mut f: impl FnMut(&mut Vec<u8>, usize)) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut out = Vec::new();
    for i in 0..n {
        f(&mut out, i);
        if out.len() >= 64 << 10 {
            chunks.push(std::mem::take(&mut out));
        }
    }
    if !out.is_empty() {
        chunks.push(out);
    }
    chunks
}

/// Client stream id number `i` (1, 3, 5, ...).
fn sid(i: usize) -> u32 {
    (2 * i + 1) as u32
}

/// A header block carrying one field whose value is `coded`, marked
/// Huffman coded.
fn huffman_value(c: &Ctx, coded: &[u8]) -> Vec<u8> {
    let mut tail = vec![0x00];
    hpack_str(&mut tail, b"x-huffman");
    hpack_huffman(&mut tail, coded);
    c.block_with(&tail)
}

fn hpack_case(block: Vec<u8>) -> Vec<Vec<u8>> {
    one(|o| headers(o, 1, flag::END_STREAM | flag::END_HEADERS, &block))
}

/// How many times each repeated attack sends its frames: far above what
/// any real client does in a burst, small enough to send in a second.
pub const FLOOD: usize = 100_000;
/// Streams of the reset attacks ("thousands of times").
pub const RESETS: usize = 10_000;

pub fn cases() -> Vec<Case> {
    use Group::*;
    vec![
        // ---- controls: odd but valid, served normally --------------------
        Case {
            name: "control-plain-request",
            group: Control,
            ack: true,
            build: |c| one(|o| c.open(o, 1, true)),
        },
        Case {
            name: "control-plain-request-pre-ack",
            group: Control,
            ack: false,
            build: |c| one(|o| c.open(o, 1, true)),
        },
        Case {
            // "ace": 00011 00100 00101, padded with one 1 bit.
            name: "control-valid-huffman",
            group: Control,
            ack: true,
            build: |c| hpack_case(huffman_value(c, &[0x19, 0x0b])),
        },
        Case {
            name: "control-unknown-frame-type-and-setting",
            group: Control,
            ack: true,
            build: |c| {
                one(|o| {
                    frame(o, 0xfa, 0, 0, b"ignore me");
                    settings(o, &[(0x7777, 1)]);
                    c.open(o, 1, true);
                })
            },
        },
        Case {
            name: "control-split-header-block",
            group: Control,
            ack: true,
            build: |c| one(|o| header_block(o, 1, true, &c.get_block(), 5)),
        },
        // ---- malformed header blocks: COMPRESSION_ERROR ------------------
        Case {
            // 'a' (00011) and 11 bits of padding: more than 7 (RFC 7541 5.2).
            name: "hpack-huffman-padding-too-long",
            group: Hpack,
            ack: true,
            build: |c| hpack_case(huffman_value(c, &[0x1f, 0xff])),
        },
        Case {
            name: "hpack-huffman-padding-too-long-pre-ack",
            group: Hpack,
            ack: false,
            build: |c| hpack_case(huffman_value(c, &[0x1f, 0xff])),
        },
        Case {
            // 'a' then padding 000: not the most significant bits of EOS.
            name: "hpack-huffman-padding-not-ones",
            group: Hpack,
            ack: true,
            build: |c| hpack_case(huffman_value(c, &[0x18])),
        },
        Case {
            // 30 one bits: the EOS symbol inside the string.
            name: "hpack-huffman-eos",
            group: Hpack,
            ack: true,
            build: |c| hpack_case(huffman_value(c, &[0xff, 0xff, 0xff, 0xff])),
        },
        Case {
            name: "hpack-huffman-eos-pre-ack",
            group: Hpack,
            ack: false,
            build: |c| hpack_case(huffman_value(c, &[0xff, 0xff, 0xff, 0xff])),
        },
        Case {
            // The bad padding in a header *name*.
            name: "hpack-huffman-bad-name",
            group: Hpack,
            ack: true,
            build: |c| {
                let mut tail = vec![0x00];
                hpack_huffman(&mut tail, &[0x18]);
                hpack_str(&mut tail, b"v");
                hpack_case(c.block_with(&tail))
            },
        },
        Case {
            // Index 62: the first dynamic entry, of a table that is empty.
            name: "hpack-dynamic-table-index",
            group: Hpack,
            ack: true,
            build: |c| hpack_case(c.block_with(&[0xbe])),
        },
        Case {
            name: "hpack-dynamic-table-index-pre-ack",
            group: Hpack,
            ack: false,
            build: |c| hpack_case(c.block_with(&[0xbe])),
        },
        Case {
            // A literal whose name is dynamic entry 62.
            name: "hpack-dynamic-table-name",
            group: Hpack,
            ack: true,
            build: |c| {
                let mut tail = Vec::new();
                literal_indexed_name(&mut tail, 62, b"v");
                hpack_case(c.block_with(&tail))
            },
        },
        Case {
            name: "hpack-index-zero",
            group: Hpack,
            ack: true,
            build: |c| hpack_case(c.block_with(&[0x80])),
        },
        Case {
            // Size update to 4096 after the router's 0 was ACKed (RFC 7541 6.3).
            name: "hpack-table-size-update-above-zero",
            group: Hpack,
            ack: true,
            build: |c| {
                let mut b = vec![0x3f, 0xe1, 0x1f];
                b.extend_from_slice(&c.get_block());
                hpack_case(b)
            },
        },
        Case {
            // A size update (to 0) after a field (RFC 7541 4.2).
            name: "hpack-table-size-update-after-field",
            group: Hpack,
            ack: true,
            build: |c| hpack_case(c.block_with(&[0x20])),
        },
        Case {
            // A name length integer of 80 bits.
            name: "hpack-integer-overflow",
            group: Hpack,
            ack: true,
            build: |c| {
                let mut tail = vec![0x00, 0x7f];
                tail.extend_from_slice(&[0xff; 10]);
                tail.push(0x01);
                hpack_case(c.block_with(&tail))
            },
        },
        Case {
            // A literal that claims 5 bytes and has 2.
            name: "hpack-truncated-literal",
            group: Hpack,
            ack: true,
            build: |c| hpack_case(c.block_with(&[0x00, 0x05, b'a', b'b'])),
        },
        // ---- malformed frames --------------------------------------------
        Case {
            name: "data-on-stream-0",
            group: Frame,
            ack: true,
            build: |_| one(|o| data(o, 0, 0, b"hello")),
        },
        Case {
            name: "headers-on-stream-0",
            group: Frame,
            ack: true,
            build: |c| one(|o| headers(o, 0, flag::END_STREAM | flag::END_HEADERS, &c.get_block())),
        },
        Case {
            name: "headers-even-stream-id",
            group: Frame,
            ack: true,
            build: |c| one(|o| c.open(o, 2, true)),
        },
        Case {
            name: "headers-lower-stream-id",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 5, true);
                    c.open(o, 3, true);
                })
            },
        },
        Case {
            // Pad length 255 in a frame far shorter (RFC 9113 6.2).
            name: "headers-padding-too-long",
            group: Frame,
            ack: true,
            build: |c| {
                let mut p = vec![255];
                p.extend_from_slice(&c.get_block());
                one(|o| {
                    headers(
                        o,
                        1,
                        flag::END_STREAM | flag::END_HEADERS | flag::PADDED,
                        &p,
                    )
                })
            },
        },
        Case {
            name: "data-padding-too-long",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, false);
                    data(o, 1, flag::PADDED, &[10, 1, 2, 3]);
                })
            },
        },
        Case {
            name: "headers-larger-than-max-frame-size",
            group: Frame,
            ack: true,
            build: |c| {
                let b = c.block_of_len(c.max_frame + 1);
                one(|o| headers(o, 1, flag::END_STREAM | flag::END_HEADERS, &b))
            },
        },
        Case {
            name: "data-larger-than-max-frame-size",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, false);
                    data(o, 1, 0, &vec![0u8; c.max_frame + 1]);
                })
            },
        },
        Case {
            name: "ping-length-not-8",
            group: Frame,
            ack: true,
            build: |_| one(|o| frame(o, kind::PING, 0, 0, &[1, 2, 3, 4])),
        },
        Case {
            name: "settings-length-not-multiple-of-6",
            group: Frame,
            ack: true,
            build: |_| one(|o| frame(o, kind::SETTINGS, 0, 0, &[0, 4, 0, 0, 1, 0, 0])),
        },
        Case {
            name: "settings-ack-with-payload",
            group: Frame,
            ack: true,
            build: |_| one(|o| frame(o, kind::SETTINGS, flag::ACK, 0, &[0, 4, 0, 0, 1, 0])),
        },
        Case {
            name: "settings-on-a-stream",
            group: Frame,
            ack: true,
            build: |_| one(|o| frame(o, kind::SETTINGS, 0, 1, &[])),
        },
        Case {
            name: "settings-enable-push-2",
            group: Frame,
            ack: true,
            build: |_| one(|o| settings(o, &[(setting::ENABLE_PUSH, 2)])),
        },
        Case {
            name: "settings-initial-window-above-max",
            group: Frame,
            ack: true,
            build: |_| one(|o| settings(o, &[(setting::INITIAL_WINDOW_SIZE, MAX_WINDOW + 1)])),
        },
        Case {
            name: "settings-max-frame-size-too-small",
            group: Frame,
            ack: true,
            build: |_| one(|o| settings(o, &[(setting::MAX_FRAME_SIZE, 16_383)])),
        },
        Case {
            name: "rst-stream-length-not-4",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, false);
                    frame(o, kind::RST_STREAM, 0, 1, &[0, 0, 8]);
                })
            },
        },
        Case {
            name: "rst-stream-on-idle-stream",
            group: Frame,
            ack: true,
            build: |_| one(|o| rst(o, 1, code::CANCEL)),
        },
        Case {
            name: "window-update-length-not-4",
            group: Frame,
            ack: true,
            build: |_| one(|o| frame(o, kind::WINDOW_UPDATE, 0, 0, &[0, 0, 1])),
        },
        Case {
            name: "window-update-zero-on-connection",
            group: Frame,
            ack: true,
            build: |_| one(|o| window_update(o, 0, 0)),
        },
        Case {
            name: "window-update-zero-on-stream",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, false);
                    window_update(o, 1, 0);
                })
            },
        },
        Case {
            name: "window-update-on-idle-stream",
            group: Frame,
            ack: true,
            build: |_| one(|o| window_update(o, 1, 100)),
        },
        Case {
            name: "connection-window-overflow",
            group: Frame,
            ack: true,
            build: |_| one(|o| window_update(o, 0, MAX_WINDOW)),
        },
        Case {
            name: "stream-window-overflow",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, false);
                    window_update(o, 1, MAX_WINDOW);
                })
            },
        },
        Case {
            name: "priority-length-not-5",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, false);
                    frame(o, kind::PRIORITY, 0, 1, &[0, 0, 0, 0]);
                })
            },
        },
        Case {
            name: "priority-depends-on-itself",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, false);
                    priority(o, 1, 1, 16);
                })
            },
        },
        Case {
            name: "headers-priority-depends-on-itself",
            group: Frame,
            ack: true,
            build: |c| {
                let mut p = 1u32.to_be_bytes().to_vec();
                p.push(16);
                p.extend_from_slice(&c.get_block());
                one(|o| {
                    headers(
                        o,
                        1,
                        flag::END_STREAM | flag::END_HEADERS | flag::PRIORITY,
                        &p,
                    )
                })
            },
        },
        Case {
            name: "continuation-on-another-stream",
            group: Frame,
            ack: true,
            build: |c| {
                let b = c.get_block();
                let (a, rest) = b.split_at(4);
                one(|o| {
                    headers(o, 1, flag::END_STREAM, a);
                    continuation(o, 3, flag::END_HEADERS, rest);
                })
            },
        },
        Case {
            name: "continuation-without-headers",
            group: Frame,
            ack: true,
            build: |c| one(|o| continuation(o, 1, flag::END_HEADERS, &c.get_block())),
        },
        Case {
            name: "continuation-after-end-headers",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, false);
                    continuation(o, 1, flag::END_HEADERS, &[0x90]);
                })
            },
        },
        Case {
            name: "frame-inside-a-header-block",
            group: Frame,
            ack: true,
            build: |c| {
                let b = c.get_block();
                let (a, rest) = b.split_at(4);
                one(|o| {
                    headers(o, 1, flag::END_STREAM, a);
                    ping(o, false, *b"inblock!");
                    continuation(o, 1, flag::END_HEADERS, rest);
                })
            },
        },
        Case {
            name: "data-on-idle-stream",
            group: Frame,
            ack: true,
            build: |_| one(|o| data(o, 1, 0, b"hello")),
        },
        Case {
            // Half-closed (remote) after END_STREAM (RFC 9113 5.1).
            name: "data-after-end-stream",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, true);
                    data(o, 1, 0, b"late");
                })
            },
        },
        Case {
            // A second HEADERS on a half-closed (remote) stream.
            name: "headers-after-end-stream",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, true);
                    headers(o, 1, flag::END_STREAM | flag::END_HEADERS, &[0x90]);
                })
            },
        },
        Case {
            // Closed by our own RST_STREAM, then DATA (RFC 9113 5.1 closed).
            name: "data-after-rst-stream",
            group: Frame,
            ack: true,
            build: |c| {
                one(|o| {
                    c.open(o, 1, false);
                    rst(o, 1, code::CANCEL);
                    data(o, 1, 0, b"late");
                })
            },
        },
        Case {
            name: "push-promise-from-a-client",
            group: Frame,
            ack: true,
            build: |c| {
                let mut p = 2u32.to_be_bytes().to_vec();
                p.extend_from_slice(&c.get_block());
                one(|o| {
                    c.open(o, 1, false);
                    frame(o, kind::PUSH_PROMISE, flag::END_HEADERS, 1, &p);
                })
            },
        },
        // ---- malformed requests: a stream error (RFC 9113 8.1.1) ---------
        Case {
            name: "request-uppercase-header-name",
            group: Request,
            ack: true,
            build: |c| hpack_case(request("GET", &c.path, &c.authority, &[("X-Upper", "1")])),
        },
        Case {
            name: "request-connection-header",
            group: Request,
            ack: true,
            build: |c| {
                hpack_case(request(
                    "GET",
                    &c.path,
                    &c.authority,
                    &[("connection", "keep-alive")],
                ))
            },
        },
        Case {
            name: "request-te-gzip",
            group: Request,
            ack: true,
            build: |c| hpack_case(request("GET", &c.path, &c.authority, &[("te", "gzip")])),
        },
        Case {
            name: "request-missing-path",
            group: Request,
            ack: true,
            build: |c| {
                let mut b = Vec::new();
                hpack_int(&mut b, 0x80, 7, static_index::METHOD_GET);
                hpack_int(&mut b, 0x80, 7, static_index::SCHEME_HTTP);
                literal_indexed_name(&mut b, static_index::AUTHORITY, c.authority.as_bytes());
                hpack_case(b)
            },
        },
        Case {
            name: "request-empty-path",
            group: Request,
            ack: true,
            build: |c| hpack_case(request("GET", "", &c.authority, &[])),
        },
        Case {
            name: "request-duplicate-path",
            group: Request,
            ack: true,
            build: |c| {
                let mut b = c.get_block();
                literal_indexed_name(&mut b, static_index::PATH, c.path.as_bytes());
                hpack_case(b)
            },
        },
        Case {
            name: "request-pseudo-header-after-regular",
            group: Request,
            ack: true,
            build: |c| {
                let mut b = Vec::new();
                hpack_int(&mut b, 0x80, 7, static_index::METHOD_GET);
                hpack_int(&mut b, 0x80, 7, static_index::SCHEME_HTTP);
                literal(&mut b, b"x-regular", b"1");
                literal_indexed_name(&mut b, static_index::PATH, c.path.as_bytes());
                literal_indexed_name(&mut b, static_index::AUTHORITY, c.authority.as_bytes());
                hpack_case(b)
            },
        },
        Case {
            name: "request-unknown-pseudo-header",
            group: Request,
            ack: true,
            build: |c| hpack_case(request("GET", &c.path, &c.authority, &[(":bogus", "1")])),
        },
        Case {
            name: "request-response-pseudo-header",
            group: Request,
            ack: true,
            build: |c| hpack_case(request("GET", &c.path, &c.authority, &[(":status", "200")])),
        },
        Case {
            name: "request-content-length-mismatch",
            group: Request,
            ack: true,
            build: |c| {
                let mut b = Vec::new();
                request_pseudo(&mut b, "POST", &c.path, &c.authority);
                literal_indexed_name(&mut b, static_index::CONTENT_LENGTH, b"10");
                one(|o| {
                    headers(o, 1, flag::END_HEADERS, &b);
                    data(o, 1, flag::END_STREAM, b"12345");
                })
            },
        },
        // ---- attacks: ENHANCE_YOUR_CALM ----------------------------------
        Case {
            // CVE-2023-44487.
            name: "attack-rapid-reset",
            group: Attack,
            ack: true,
            build: |c| {
                let block = c.get_block();
                repeat(RESETS, |o, i| {
                    headers(o, sid(i), flag::END_STREAM | flag::END_HEADERS, &block);
                    rst(o, sid(i), code::CANCEL);
                })
            },
        },
        Case {
            // Full-size CONTINUATION frames, never END_HEADERS (32 MiB).
            name: "attack-continuation-flood",
            group: Attack,
            ack: true,
            build: |c| {
                let mut first = Vec::new();
                headers(&mut first, 1, flag::END_STREAM, &c.get_block());
                let mut field = Vec::new();
                literal(&mut field, b"x-flood", &vec![b'f'; c.max_frame - 16]);
                let mut chunks = vec![first];
                chunks.extend(repeat(2048, |o, _| continuation(o, 1, 0, &field)));
                chunks
            },
        },
        Case {
            // Empty CONTINUATION frames: a block that never grows or ends.
            name: "attack-continuation-flood-tiny",
            group: Attack,
            ack: true,
            build: |c| {
                let mut first = Vec::new();
                headers(&mut first, 1, flag::END_STREAM, &c.get_block());
                let mut chunks = vec![first];
                chunks.extend(repeat(5 * FLOOD, |o, _| continuation(o, 1, 0, &[])));
                chunks
            },
        },
        Case {
            name: "attack-settings-flood",
            group: Attack,
            ack: true,
            build: |_| repeat(FLOOD, |o, _| settings(o, &[])),
        },
        Case {
            name: "attack-ping-flood",
            group: Attack,
            ack: true,
            build: |_| repeat(FLOOD, |o, i| ping(o, false, (i as u64).to_be_bytes())),
        },
        Case {
            name: "attack-empty-data-flood",
            group: Attack,
            ack: true,
            build: |c| {
                let mut first = Vec::new();
                c.open(&mut first, 1, false);
                let mut chunks = vec![first];
                chunks.extend(repeat(FLOOD, |o, _| data(o, 1, 0, &[])));
                chunks
            },
        },
        Case {
            name: "attack-window-update-flood",
            group: Attack,
            ack: true,
            build: |_| repeat(FLOOD, |o, _| window_update(o, 0, 1)),
        },
        Case {
            name: "attack-priority-flood",
            group: Attack,
            ack: true,
            build: |_| repeat(FLOOD, |o, i| priority(o, sid(i), 0, 16)),
        },
        Case {
            // Literal fields of 1000 bytes up to twice the advertised
            // SETTINGS_MAX_HEADER_LIST_SIZE, over HEADERS + CONTINUATION.
            name: "attack-header-list-bomb-literal",
            group: Attack,
            ack: true,
            build: |c| {
                let mut b = c.get_block();
                let mut i = 0;
                while b.len() < 2 * c.header_list_limit() {
                    literal(&mut b, format!("x-bomb-{i}").as_bytes(), &[b'b'; 1000]);
                    i += 1;
                }
                one(|o| header_block(o, 1, true, &b, c.max_frame))
            },
        },
        Case {
            // One byte of block for 60 bytes of header list (HPACK bomb).
            name: "attack-header-list-bomb-indexed",
            group: Attack,
            ack: true,
            build: |c| {
                let mut b = c.get_block();
                let n = 2 * c.header_list_limit() / 60 + 1;
                b.extend(std::iter::repeat_n(
                    0x80 | static_index::ACCEPT_ENCODING_GZIP_DEFLATE as u8,
                    n,
                ));
                one(|o| header_block(o, 1, true, &b, c.max_frame))
            },
        },
        Case {
            // CVE-2025-8671 (MadeYouReset): the server resets each stream.
            name: "attack-made-you-reset-window-overflow",
            group: Attack,
            ack: true,
            build: |c| {
                let block = c.get_block();
                repeat(RESETS, |o, i| {
                    headers(o, sid(i), flag::END_STREAM | flag::END_HEADERS, &block);
                    window_update(o, sid(i), MAX_WINDOW);
                })
            },
        },
        Case {
            name: "attack-made-you-reset-data-after-end-stream",
            group: Attack,
            ack: true,
            build: |c| {
                let block = c.get_block();
                repeat(RESETS, |o, i| {
                    headers(o, sid(i), flag::END_STREAM | flag::END_HEADERS, &block);
                    data(o, sid(i), 0, b"x");
                })
            },
        },
        Case {
            name: "attack-made-you-reset-window-update-zero",
            group: Attack,
            ack: true,
            build: |c| {
                let block = c.get_block();
                repeat(RESETS, |o, i| {
                    headers(o, sid(i), flag::END_STREAM | flag::END_HEADERS, &block);
                    window_update(o, sid(i), 0);
                })
            },
        },
    ]
}
