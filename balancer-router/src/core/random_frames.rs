//! The router core on random but mostly well-framed HTTP/2 traffic, on a
//! client hop and on its backend connections at once: valid 9-byte frame
//! headers of every type (and unknown ones) with realistic flags, stream
//! ids from a small set, lengths right for the type most of the time,
//! payloads that are sometimes real header blocks; backends answer the
//! router's streams. Deterministic: every run is a fixed seed.
//!
//! Beyond "no panic", what must hold whatever the peers send:
//! - every `take_out` is whole frames, each within the size rules and the
//!   peer's SETTINGS_MAX_FRAME_SIZE (16,384 unless it raised it); backend
//!   output starts with the preface, each hop's first frame is SETTINGS;
//!   the router sends no frame type it has no business sending;
//! - header blocks are contiguous (RFC 9113 6.10) and decode on their own
//!   with no dynamic table, Huffman included (RFC 7541), whatever the
//!   sender's block was;
//! - stream ids: a client sees only odd streams it opened (or named in
//!   PRIORITY); a backend sees new streams 1, 3, 5... in order; after the
//!   router's RST_STREAM only more RST_STREAM; no DATA or HEADERS after its
//!   END_STREAM;
//! - flow control: the router's DATA stays within the peer's connection
//!   and stream windows (as of the SETTINGS and WINDOW_UPDATEs the core
//!   had read), and its WINDOW_UPDATEs never take a peer's window past
//!   2^31-1; SETTINGS ACKs and PING ACKs answer only what the peer sent;
//! - counts: no client above MAX_CLIENT_STREAMS, no endpoint with more
//!   streams in flight than clients have open; and once every connection
//!   is forgotten nothing is left: `take_out` knows no id, no client
//!   streams, no pending I/O, no stream counted in flight.
//!
//! On a failure the seed is played again with every frame traced, and the
//! last 200 are printed.
//!
//! `cargo fuzz` (fuzz/fuzz_targets/h2router.rs) goes further on arbitrary
//! bytes.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use balancer_common::h2frame::{FrameHeader, HEADER_LEN};
use bytes::BytesMut;

use super::{ConnId, Core, DRAIN_PING, Io, MAX_CLIENT_STREAMS};
use crate::endpoint::{Algorithm, Endpoint, Pool};

/// Frame types, flags and sizes (RFC 9113 4.1, 6), spelled out here so
/// that the test reads only the core's public API.
mod frame {
    pub use balancer_common::h2frame::{
        CONTINUATION, DATA, DEFAULT_MAX_FRAME_SIZE, FLAG_ACK, FLAG_END_STREAM, GOAWAY, HEADERS,
        PING, PREFACE, PRIORITY, PUSH_PROMISE, RST_STREAM, SETTINGS, WINDOW_UPDATE,
    };
    pub const FLAG_END_HEADERS: u8 = 0x4;
    pub const FLAG_PADDED: u8 = 0x8;
    pub const FLAG_PRIORITY: u8 = 0x20;
    pub const DEFAULT_WINDOW: i64 = 65_535;
    pub const MAX_WINDOW: i64 = 0x7fff_ffff;
}

/// Settings identifiers (RFC 9113 6.5.2).
mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

const REFUSED_STREAM: u32 = 0x7;

const VIP: &str = "198.19.0.50:80";

const REQ_PLAIN: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
/// A request that adds its authority to the dynamic table (RFC 7541 C.3.1).
const REQ_INDEXING: &[u8] = &[
    0x82, 0x86, 0x84, 0x41, 0x0f, b'w', b'w', b'w', b'.', b'e', b'x', b'a', b'm', b'p', b'l', b'e',
    b'.', b'c', b'o', b'm',
];
/// Refers to dynamic entry 62: valid only before the ACK, after the above.
const REQ_DYNAMIC: &[u8] = &[0x82, 0x86, 0x84, 0xbe];
/// The same with a Huffman-coded authority (RFC 7541 C.4.1).
const REQ_HUFFMAN: &[u8] = &[
    0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4,
    0xff,
];
/// A Huffman-coded authority whose padding is not EOS's prefix: only a
/// Huffman decoder tells it is broken (RFC 7541 5.2).
const REQ_BAD_HUFFMAN: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x81, 0x00];
/// POST https /index.html after a table size update to 0.
const REQ_POST: &[u8] = &[0x20, 0x83, 0x87, 0x85, 0x01, 0x01, b'b'];
/// `grpc-status: 0`, never indexed, new name.
const TRAILER_GRPC: &[u8] = &[
    0x10, 0x0b, b'g', b'r', b'p', b'c', b'-', b's', b't', b'a', b't', b'u', b's', 0x01, b'0',
];
/// `x: y`, without indexing.
const TRAILER_XY: &[u8] = &[0x00, 0x01, b'x', 0x01, b'y'];
const RESP_200: &[u8] = &[0x88];
/// `:status 200`, `content-length: 2` with incremental indexing.
const RESP_200_LEN: &[u8] = &[0x88, 0x5c, 0x01, b'2'];
const RESP_404: &[u8] = &[0x8d];

const REQUESTS: &[&[u8]] = &[REQ_PLAIN, REQ_PLAIN, REQ_INDEXING, REQ_HUFFMAN, REQ_POST];
const TRAILERS: &[&[u8]] = &[TRAILER_GRPC, TRAILER_XY];
const RESPONSES: &[&[u8]] = &[RESP_200, RESP_200, RESP_200_LEN, RESP_404];
/// Every block above, and broken ones: a late size update, a truncated
/// literal, index 0, a size update to 4,096, empty.
const BLOCKS: &[&[u8]] = &[
    REQ_PLAIN,
    REQ_INDEXING,
    REQ_DYNAMIC,
    REQ_POST,
    REQ_HUFFMAN,
    REQ_BAD_HUFFMAN,
    TRAILER_GRPC,
    TRAILER_XY,
    RESP_200,
    RESP_200_LEN,
    RESP_404,
    &[0x88, 0x20],
    &[0x82, 0x01, 0x05, b'a'],
    &[0x80],
    &[0x3f, 0xe1, 0x1f, 0x82],
    &[],
];

/// Stream ids drawn besides the live ones: zero, odd, even, the largest.
const FIXED_IDS: [u32; 8] = [0, 1, 2, 3, 4, 5, 7, 0x7fff_ffff];

/// How much of each the peers do.
#[derive(Debug, Clone, Copy)]
struct Mix {
    /// Percent of steps where a client sends frames, and where a backend
    /// does; the rest feeds, delivers and calls the other entry points.
    client: u8,
    backend: u8,
    /// Percent of backends that answer like a server (ACKs, credit,
    /// responses) besides their random frames.
    polite: u8,
    /// Percent of the other steps that forget a random connection.
    forget: u8,
    /// Percent of the frames clients and backends send that may be
    /// anything (the rest are valid where the peer is).
    client_wild: u8,
    backend_wild: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Client,
    Backend,
}

/// One peer of the core as the test plays it: what it sent, what the
/// router wrote to it, the bytes not yet handed over.
struct Peer {
    id: ConnId,
    hop: Hop,
    polite: bool,
    /// Generated, not yet handed to the core.
    pending: Vec<u8>,
    /// Bytes generated, and handed over, since the start.
    generated: usize,
    delivered: usize,
    /// Frames generated but not yet consumed by the core: where each ends
    /// in the byte stream.
    unread: VecDeque<(usize, FrameHeader, Vec<u8>)>,
    /// Handed over, not yet consumed (the I/O layer's read buffer).
    inbox: BytesMut,
    connected: bool,
    /// The client closed its side (it sends nothing more).
    eof: bool,
    /// The core forgot it (or we did).
    gone: bool,
    // ---- what the peer sent, as far as the core read it
    /// Clients: the next new stream id, ids used lately, the highest used.
    next_sid: u32,
    recent: Vec<u32>,
    max_sid: u32,
    /// The largest SETTINGS_MAX_FRAME_SIZE it advertised (at least 16,384).
    max_frame: u32,
    /// Its SETTINGS_INITIAL_WINDOW_SIZE as the core last read it, and the
    /// largest since the last `take_out`: the DATA in a take was written
    /// under one of those.
    init_now: i64,
    init_hi: i64,
    /// 65,535 plus its WINDOW_UPDATE increments, on the connection and per
    /// stream (increments only).
    window_conn: i64,
    window_stream: BTreeMap<u32, i64>,
    /// DATA it sent (frame lengths), on the connection and per stream.
    fed_conn: i64,
    fed_stream: BTreeMap<u32, i64>,
    settings_sent: usize,
    pings_sent: BTreeSet<[u8; 8]>,
    // ---- what the router wrote to it
    started: bool,
    /// Backends: the highest stream id the router opened.
    opened: u32,
    local_end: BTreeSet<u32>,
    reset: BTreeSet<u32>,
    /// Streams it answered (backends: response HEADERS sent) and ended.
    answered: BTreeSet<u32>,
    sent_end: BTreeSet<u32>,
    /// Clients: it sent a SETTINGS ACK; a block that added a table entry;
    /// PRIORITY on streams while they were idle (a RST_STREAM on those may
    /// come before the client opens them: it does not close them).
    acked: bool,
    indexed: bool,
    idle_priority: BTreeSet<u32>,
    data_conn: i64,
    data_stream: BTreeMap<u32, i64>,
    /// Its WINDOW_UPDATE increments, on the connection and per stream.
    grants_conn: i64,
    grants_stream: BTreeMap<u32, i64>,
    /// The largest SETTINGS_INITIAL_WINDOW_SIZE it advertised.
    router_init: i64,
    acks: usize,
}

impl Peer {
    fn new(id: ConnId, hop: Hop, polite: bool) -> Self {
        Self {
            id,
            hop,
            polite,
            pending: Vec::new(),
            generated: 0,
            delivered: 0,
            unread: VecDeque::new(),
            inbox: BytesMut::new(),
            connected: hop == Hop::Client,
            eof: false,
            gone: false,
            next_sid: 1,
            recent: Vec::new(),
            max_sid: 0,
            max_frame: frame::DEFAULT_MAX_FRAME_SIZE,
            init_now: frame::DEFAULT_WINDOW,
            init_hi: frame::DEFAULT_WINDOW,
            window_conn: frame::DEFAULT_WINDOW,
            window_stream: BTreeMap::new(),
            fed_conn: 0,
            fed_stream: BTreeMap::new(),
            settings_sent: 0,
            pings_sent: BTreeSet::new(),
            started: false,
            opened: 0,
            local_end: BTreeSet::new(),
            reset: BTreeSet::new(),
            answered: BTreeSet::new(),
            sent_end: BTreeSet::new(),
            acked: false,
            indexed: false,
            idle_priority: BTreeSet::new(),
            data_conn: 0,
            data_stream: BTreeMap::new(),
            grants_conn: 0,
            grants_stream: BTreeMap::new(),
            router_init: frame::DEFAULT_WINDOW,
            acks: 0,
        }
    }

    /// Queue frames this peer sends, noting what they tell the router.
    fn send(&mut self, bytes: Vec<u8>) {
        let mut b = &bytes[..];
        if b.starts_with(frame::PREFACE) {
            b = &b[frame::PREFACE.len()..];
            self.generated += frame::PREFACE.len();
        }
        while b.len() >= HEADER_LEN {
            let h = FrameHeader::parse(b[..HEADER_LEN].try_into().expect("9 bytes"));
            let end = HEADER_LEN + h.length as usize;
            let p = &b[HEADER_LEN..end];
            self.note_generated(h, p);
            self.generated += end;
            self.unread.push_back((self.generated, h, p.to_vec()));
            b = &b[end..];
        }
        assert!(b.is_empty(), "the generator writes whole frames");
        self.pending.extend_from_slice(&bytes);
    }

    /// What the generator itself goes by.
    fn note_generated(&mut self, h: FrameHeader, p: &[u8]) {
        let ends = matches!(h.kind, frame::DATA | frame::HEADERS);
        if ends && h.flags & frame::FLAG_END_STREAM != 0 {
            self.sent_end.insert(h.stream);
        }
        match (h.kind, self.hop) {
            (frame::HEADERS, Hop::Backend) => {
                self.answered.insert(h.stream);
            }
            (frame::HEADERS, Hop::Client) => {
                self.indexed |= p == REQ_INDEXING;
                if h.stream % 2 == 1 && h.stream >= self.next_sid {
                    self.next_sid = h.stream.saturating_add(2).min(0x7fff_ffff);
                }
                if !self.recent.contains(&h.stream) {
                    self.recent.push(h.stream);
                    if self.recent.len() > 8 {
                        self.recent.remove(0);
                    }
                }
            }
            (frame::SETTINGS, _) if h.flags & frame::FLAG_ACK != 0 => self.acked = true,
            (frame::PRIORITY, Hop::Client)
                if h.stream >= self.next_sid || h.stream.is_multiple_of(2) =>
            {
                self.idle_priority.insert(h.stream);
            }
            _ => {}
        }
    }

    /// The core consumed the first `consumed` bytes this peer handed over:
    /// what those frames told it.
    fn consumed(&mut self, consumed: usize) {
        while let Some((end, h, p)) = self.unread.pop_front() {
            if end > consumed {
                self.unread.push_front((end, h, p));
                return;
            }
            self.note_read(h, &p);
        }
    }

    fn note_read(&mut self, h: FrameHeader, p: &[u8]) {
        trace(|| format!("{:?} {} -> core: {}", self.hop, self.id, show(h, p)));
        match h.kind {
            frame::DATA => {
                self.fed_conn += i64::from(h.length);
                *self.fed_stream.entry(h.stream).or_default() += i64::from(h.length);
            }
            // PRIORITY may name an idle stream, and a self-dependency is
            // answered with RST_STREAM on it (RFC 9113 5.3.1).
            frame::HEADERS | frame::PRIORITY => self.max_sid = self.max_sid.max(h.stream),
            frame::SETTINGS if h.flags & frame::FLAG_ACK == 0 => {
                self.settings_sent += 1;
                for s in p.chunks_exact(6) {
                    let ident = u16::from_be_bytes([s[0], s[1]]);
                    let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                    match ident {
                        setting::MAX_FRAME_SIZE if v <= 0xff_ffff => {
                            self.max_frame = self.max_frame.max(v);
                        }
                        setting::INITIAL_WINDOW_SIZE if i64::from(v) <= frame::MAX_WINDOW => {
                            self.init_now = i64::from(v);
                            self.init_hi = self.init_hi.max(self.init_now);
                        }
                        _ => {}
                    }
                }
            }
            frame::PING if h.flags & frame::FLAG_ACK == 0 && p.len() == 8 => {
                self.pings_sent
                    .insert(p.try_into().expect("8 bytes of PING"));
            }
            frame::WINDOW_UPDATE if p.len() == 4 => {
                let inc = i64::from(u32_at(p, 0) & 0x7fff_ffff);
                if h.stream == 0 {
                    self.window_conn += inc;
                } else {
                    *self.window_stream.entry(h.stream).or_default() += inc;
                }
            }
            _ => {}
        }
    }

    /// Check what the router wrote to this peer in one `take_out`; a polite
    /// backend answers it. Returns the answer.
    fn check_out(&mut self, rng: &mut fastrand::Rng, bytes: &[u8]) -> Vec<u8> {
        let mut answer = Vec::new();
        let mut b = bytes;
        if !self.started && !b.is_empty() {
            if self.hop == Hop::Backend {
                assert!(
                    b.starts_with(frame::PREFACE),
                    "backend output without the preface"
                );
                b = &b[frame::PREFACE.len()..];
                if self.polite {
                    backend_settings(rng, &mut answer);
                }
            }
            assert!(
                b.len() >= HEADER_LEN && b[3] == frame::SETTINGS && b[4] & frame::FLAG_ACK == 0,
                "the first frame is not SETTINGS"
            );
            self.started = true;
        }
        // A header block in progress: it must end within this take.
        let mut block: Option<(u32, Vec<u8>)> = None;
        while !b.is_empty() {
            assert!(b.len() >= HEADER_LEN, "a partial frame header: {b:?}");
            let h = FrameHeader::parse(b[..HEADER_LEN].try_into().expect("9 bytes"));
            let end = HEADER_LEN + h.length as usize;
            assert!(
                b.len() >= end,
                "a partial frame: {h:?} with {} bytes",
                b.len()
            );
            let p = &b[HEADER_LEN..end];
            b = &b[end..];
            assert_eq!(
                h.check(self.max_frame),
                Ok(()),
                "{h:?} breaks the size rules for a peer allowing {}",
                self.max_frame
            );
            self.check_frame(h, p, &mut block);
            if self.polite {
                self.answer(rng, h, p, &mut answer);
            }
        }
        assert!(block.is_none(), "a header block cut at the end of a take");
        self.init_hi = self.init_now;
        answer
    }

    fn check_frame(&mut self, h: FrameHeader, p: &[u8], block: &mut Option<(u32, Vec<u8>)>) {
        trace(|| format!("{:?} {} <- core: {}", self.hop, self.id, show(h, p)));
        let s = h.stream;
        match block {
            Some((bs, _)) => assert!(
                h.kind == frame::CONTINUATION && s == *bs,
                "{h:?} inside a header block on {bs}"
            ),
            None => assert_ne!(h.kind, frame::CONTINUATION, "CONTINUATION without HEADERS"),
        }
        let on_stream = matches!(
            h.kind,
            frame::DATA | frame::HEADERS | frame::CONTINUATION | frame::RST_STREAM
        );
        let on_conn = matches!(h.kind, frame::SETTINGS | frame::PING | frame::GOAWAY);
        assert!(
            on_stream || on_conn || h.kind == frame::WINDOW_UPDATE,
            "the router sent frame type {}",
            h.kind
        );
        if on_conn {
            assert_eq!(s, 0, "{h:?} on a stream");
        }
        if on_stream {
            assert_ne!(s, 0, "{h:?} on stream 0");
        }
        if s != 0 {
            // RST_STREAM is the last frame on a stream; more of them are
            // allowed for frames that keep coming (RFC 9113 5.4.2).
            assert!(
                !self.reset.contains(&s) || h.kind == frame::RST_STREAM,
                "{h:?} after RST_STREAM"
            );
            let idle_rst = h.kind == frame::RST_STREAM && self.idle_priority.contains(&s);
            assert!(s % 2 == 1 || idle_rst, "{h:?}: even stream id");
            match self.hop {
                Hop::Client => assert!(
                    s <= self.max_sid,
                    "{h:?} on a stream the client did not open (highest {})",
                    self.max_sid
                ),
                Hop::Backend => {
                    if h.kind == frame::HEADERS && s > self.opened {
                        let next = if self.opened == 0 { 1 } else { self.opened + 2 };
                        assert_eq!(s, next, "backend stream ids skip or go back");
                        self.opened = s;
                    }
                    assert!(s <= self.opened, "{h:?} on a stream not opened yet");
                }
            }
        }
        match h.kind {
            frame::DATA => {
                assert!(!self.local_end.contains(&s), "DATA after END_STREAM on {s}");
                let len = i64::from(h.length);
                self.data_conn += len;
                let on_s = self.data_stream.entry(s).or_default();
                *on_s += len;
                assert!(
                    self.data_conn <= self.window_conn,
                    "{} DATA bytes in a connection window of {}",
                    self.data_conn,
                    self.window_conn
                );
                let allowed = self.init_hi + self.window_stream.get(&s).copied().unwrap_or(0);
                assert!(
                    *on_s <= allowed,
                    "{on_s} DATA bytes on {s}, allowed {allowed}"
                );
                if h.flags & frame::FLAG_END_STREAM != 0 {
                    self.local_end.insert(s);
                }
            }
            frame::HEADERS => {
                assert!(
                    !self.local_end.contains(&s),
                    "HEADERS after END_STREAM on {s}"
                );
                assert_eq!(
                    h.flags & !(frame::FLAG_END_STREAM | frame::FLAG_END_HEADERS),
                    0,
                    "no padding or priority"
                );
                if h.flags & frame::FLAG_END_STREAM != 0 {
                    self.local_end.insert(s);
                }
                *block = Some((s, p.to_vec()));
            }
            frame::CONTINUATION => {
                if let Some((_, buf)) = block {
                    buf.extend_from_slice(p);
                }
            }
            frame::RST_STREAM if !self.idle_priority.contains(&s) => {
                self.reset.insert(s);
            }
            frame::SETTINGS if h.flags & frame::FLAG_ACK != 0 => {
                self.acks += 1;
                assert!(
                    self.acks <= self.settings_sent,
                    "{} SETTINGS ACKs for {} SETTINGS",
                    self.acks,
                    self.settings_sent
                );
            }
            frame::PING if h.flags & frame::FLAG_ACK != 0 => {
                let payload: [u8; 8] = p.try_into().expect("8 bytes");
                assert!(
                    self.pings_sent.contains(&payload),
                    "ACK of a PING never sent"
                );
            }
            frame::SETTINGS => {
                for e in p.chunks_exact(6) {
                    if u16::from_be_bytes([e[0], e[1]]) == setting::INITIAL_WINDOW_SIZE {
                        let v = i64::from(u32_at(e, 2));
                        assert!(v <= frame::MAX_WINDOW, "INITIAL_WINDOW_SIZE {v}");
                        self.router_init = self.router_init.max(v);
                    }
                }
            }
            frame::WINDOW_UPDATE => {
                // The peer's send windows stay within 2^31-1 (RFC 9113
                // 6.9.1), counting every DATA it sent as read.
                let inc = i64::from(u32_at(p, 0) & 0x7fff_ffff);
                assert!(inc > 0, "WINDOW_UPDATE of 0");
                if s == 0 {
                    self.grants_conn += inc;
                    let window = frame::DEFAULT_WINDOW + self.grants_conn - self.fed_conn;
                    assert!(window <= frame::MAX_WINDOW, "connection window {window}");
                } else {
                    let g = self.grants_stream.entry(s).or_default();
                    *g += inc;
                    let fed = self.fed_stream.get(&s).copied().unwrap_or(0);
                    let window = self.router_init + *g - fed;
                    assert!(window <= frame::MAX_WINDOW, "window {window} of stream {s}");
                }
            }
            _ => {}
        }
        if (h.kind == frame::HEADERS || h.kind == frame::CONTINUATION)
            && h.flags & frame::FLAG_END_HEADERS != 0
        {
            let (_, buf) = block.take().expect("a block in progress");
            // It decodes on its own, with no dynamic table: whatever the
            // peer's decoder holds (RFC 7541 2.3, 4.2). A block that is
            // only a table size update to 0 is fine.
            let mut fresh = loona_hpack::Decoder::new();
            fresh.set_max_allowed_table_size(0);
            fresh.set_max_table_size(0);
            match fresh.decode(&buf) {
                Ok(_) | Err(loona_hpack::decoder::DecoderError::SizeUpdateAtEnd) => {}
                Err(e) => {
                    panic!("the router sent a block a peer cannot decode ({e:?}): {buf:?}")
                }
            }
        }
    }

    /// A polite backend's answer to one frame of the router.
    fn answer(&mut self, rng: &mut fastrand::Rng, h: FrameHeader, p: &[u8], out: &mut Vec<u8>) {
        let s = h.stream;
        match h.kind {
            frame::SETTINGS if h.flags & frame::FLAG_ACK == 0 => {
                put(out, frame::SETTINGS, frame::FLAG_ACK, 0, &[]);
            }
            frame::PING if h.flags & frame::FLAG_ACK == 0 => {
                put(out, frame::PING, frame::FLAG_ACK, 0, p);
            }
            frame::DATA if h.length > 0 => {
                put(out, frame::WINDOW_UPDATE, 0, 0, &h.length.to_be_bytes());
                if !self.local_end.contains(&s) || rng.bool() {
                    put(out, frame::WINDOW_UPDATE, 0, s, &h.length.to_be_bytes());
                }
            }
            _ => {}
        }
        let ended =
            matches!(h.kind, frame::DATA | frame::HEADERS) && h.flags & frame::FLAG_END_STREAM != 0;
        if ended && !self.answered.contains(&s) {
            match rng.u8(..100) {
                0..80 => response(rng, s, out),
                80..88 => put(out, frame::RST_STREAM, 0, s, &REFUSED_STREAM.to_be_bytes()),
                _ => {}
            }
        }
    }
}

fn u32_at(p: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(p[i..i + 4].try_into().expect("4 bytes"))
}

/// A frame with a valid header for its payload (the reserved bit of the
/// stream id set sometimes by the caller).
fn put(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("a small payload");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn pick<T: Copy>(rng: &mut fastrand::Rng, xs: &[T]) -> T {
    xs[rng.usize(..xs.len())]
}

fn random_bytes(rng: &mut fastrand::Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    rng.fill(&mut v);
    v
}

/// An HPACK integer (RFC 7541 5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u8, mut v: usize) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A header block: mostly one of [`BLOCKS`], sometimes random bytes, and
/// sometimes a request with one large literal (up to 40 KiB, so that it
/// takes CONTINUATION frames).
fn random_block(rng: &mut fastrand::Rng) -> Vec<u8> {
    match rng.u8(..100) {
        0..82 => pick(rng, BLOCKS).to_vec(),
        82..95 => {
            let n = rng.usize(..24);
            random_bytes(rng, n)
        }
        _ => {
            let mut b = REQ_PLAIN.to_vec();
            b.extend_from_slice(&[0x00, 0x01, b'v']);
            let n = pick(rng, &[100, 5000, 16_384, 20_000, 40_000]);
            hpack_int(&mut b, 0, 7, n);
            b.extend(std::iter::repeat_n(b'v', n));
            b
        }
    }
}

/// Padding (and for HEADERS the priority fields) around a payload, as the
/// flags say; sometimes a pad length that does not fit.
fn wrap(rng: &mut fastrand::Rng, flags: u8, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    let pad = if flags & frame::FLAG_PADDED != 0 {
        let pad = if rng.u8(..100) < 3 {
            body.len() + 6 + rng.usize(..4)
        } else {
            rng.usize(..12)
        };
        p.push(u8::try_from(pad.min(255)).expect("fits"));
        pad
    } else {
        0
    };
    if kind == frame::HEADERS && flags & frame::FLAG_PRIORITY != 0 {
        p.extend_from_slice(&[0, 0, 0, pick(rng, &[0, 1, 3]), 15]);
    }
    p.extend_from_slice(body);
    if rng.u8(..100) < 97 {
        p.extend(std::iter::repeat_n(0, pad.min(255)));
    }
    p
}

/// A stream id: for clients mostly a new one (HEADERS) or a recent one,
/// for backends one the router opened; else from [`FIXED_IDS`]. The
/// reserved bit is set now and then.
fn stream_id(rng: &mut fastrand::Rng, p: &Peer, new: bool) -> u32 {
    let r = rng.u8(..100);
    let id = match p.hop {
        Hop::Client if (new && r < 65) || (!new && r < 6) || (p.recent.is_empty() && r < 80) => {
            p.next_sid
        }
        Hop::Client if r < 88 && !p.recent.is_empty() => pick(rng, &p.recent),
        Hop::Backend if r < 82 && p.opened > 0 => {
            let lo = p.opened.saturating_sub(12).max(1);
            lo + 2 * rng.u32(..=(p.opened - lo) / 2)
        }
        _ => pick(rng, &FIXED_IDS),
    };
    if rng.u8(..100) < 2 {
        id | 0x8000_0000
    } else {
        id
    }
}

fn settings_payload(rng: &mut fastrand::Rng, valid: bool) -> Vec<u8> {
    let mut p = Vec::new();
    for _ in 0..rng.usize(..=4) {
        let (ident, v): (u16, u32) = match rng.u8(..7) {
            0 => (setting::HEADER_TABLE_SIZE, pick(rng, &[0, 100, 4096])),
            1 => (setting::ENABLE_PUSH, if valid { rng.u32(..=1) } else { 2 }),
            2 => (
                setting::MAX_CONCURRENT_STREAMS,
                pick(rng, &[0, 1, 2, 100, u32::MAX]),
            ),
            3 => (
                setting::INITIAL_WINDOW_SIZE,
                if valid {
                    pick(rng, &[0, 1, 10, 65_535, 1 << 20, 0x7fff_ffff])
                } else {
                    0x8000_0000
                },
            ),
            4 => (
                setting::MAX_FRAME_SIZE,
                if valid {
                    pick(rng, &[16_384, 16_385, 1 << 20, 0xff_ffff])
                } else {
                    pick(rng, &[100, 0x100_0000])
                },
            ),
            5 => (setting::MAX_HEADER_LIST_SIZE, rng.u32(..)),
            _ => (0x99, rng.u32(..)),
        };
        p.extend_from_slice(&ident.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    p
}

/// What a backend says first: SETTINGS, sometimes a larger connection
/// window.
fn backend_settings(rng: &mut fastrand::Rng, out: &mut Vec<u8>) {
    let mut p = Vec::new();
    if rng.bool() {
        p.extend_from_slice(&setting::MAX_CONCURRENT_STREAMS.to_be_bytes());
        p.extend_from_slice(&pick(rng, &[1u32, 2, 100, 1000]).to_be_bytes());
    }
    if rng.bool() {
        p.extend_from_slice(&setting::INITIAL_WINDOW_SIZE.to_be_bytes());
        p.extend_from_slice(&pick(rng, &[10u32, 65_535, 1 << 20]).to_be_bytes());
    }
    if rng.u8(..4) == 0 {
        p.extend_from_slice(&setting::MAX_FRAME_SIZE.to_be_bytes());
        p.extend_from_slice(&(1u32 << 20).to_be_bytes());
    }
    put(out, frame::SETTINGS, 0, 0, &p);
    if rng.bool() {
        put(out, frame::WINDOW_UPDATE, 0, 0, &(1u32 << 24).to_be_bytes());
    }
}

/// A well-formed request on a new stream: HEADERS, maybe a body, maybe
/// trailers.
fn request(rng: &mut fastrand::Rng, p: &Peer, out: &mut Vec<u8>) {
    let s = p.next_sid;
    let body = rng.u8(..100) < 55;
    let mut flags = frame::FLAG_END_HEADERS;
    if !body {
        flags |= frame::FLAG_END_STREAM;
    }
    // The one that refers to the dynamic table only where it is valid:
    // before the ACK, after the block that added its entry.
    let block = if p.indexed && !p.acked && rng.bool() {
        REQ_DYNAMIC
    } else {
        pick(rng, REQUESTS)
    };
    put(out, frame::HEADERS, flags, s, block);
    if body {
        let n = rng.usize(1..=3);
        for i in 0..n {
            let len = pick(rng, &[0, 5, 64, 1000, 16_384]);
            let last = i + 1 == n;
            let trailers = last && rng.u8(..4) == 0;
            let flags = if last && !trailers {
                frame::FLAG_END_STREAM
            } else {
                0
            };
            put(out, frame::DATA, flags, s, &random_bytes(rng, len));
            if trailers {
                let flags = frame::FLAG_END_HEADERS | frame::FLAG_END_STREAM;
                put(out, frame::HEADERS, flags, s, pick(rng, TRAILERS));
            }
        }
    }
}

/// A backend's response on stream `s`: HEADERS, maybe a body, maybe
/// trailers.
fn response(rng: &mut fastrand::Rng, s: u32, out: &mut Vec<u8>) {
    if rng.u8(..10) == 0 {
        put(out, frame::HEADERS, 0x5, s, RESP_404);
        return;
    }
    put(
        out,
        frame::HEADERS,
        frame::FLAG_END_HEADERS,
        s,
        pick(rng, RESPONSES),
    );
    let n = rng.usize(..=2);
    for i in 0..n {
        let last = i + 1 == n;
        let len = pick(rng, &[0, 2, 100, 16_384]);
        let flags = if last && rng.bool() {
            frame::FLAG_END_STREAM
        } else {
            0
        };
        put(out, frame::DATA, flags, s, &random_bytes(rng, len));
        if last && flags == 0 {
            let flags = frame::FLAG_END_HEADERS | frame::FLAG_END_STREAM;
            put(out, frame::HEADERS, flags, s, pick(rng, TRAILERS));
        }
    }
    if n == 0 {
        put(out, frame::DATA, frame::FLAG_END_STREAM, s, &[]);
    }
}

/// What a peer sends next: mostly frames valid where the stream and the
/// connection are (as far as the peer knows), and now and then
/// ([`Mix::wild`] percent) anything.
fn frames(rng: &mut fastrand::Rng, p: &mut Peer, wild_percent: u8, out: &mut Vec<u8>) {
    if rng.u8(..100) < wild_percent {
        wild(rng, p, out);
    } else {
        valid(rng, p, out);
    }
}

/// Streams a peer may still send on: clients, those it opened and did not
/// end; backends, those the router opened and it did not end.
fn sendable(p: &Peer) -> Vec<u32> {
    let mine: Vec<u32> = match p.hop {
        Hop::Client => p.recent.clone(),
        Hop::Backend => (p.opened.saturating_sub(20).max(1)..=p.opened)
            .step_by(2)
            .collect(),
    };
    mine.into_iter()
        .filter(|s| *s != 0 && !p.sent_end.contains(s) && !p.reset.contains(s))
        .collect()
}

/// A frame that is valid where the peer is: a request on a new stream,
/// DATA or trailers on an open one, a response to a request, a header
/// block over CONTINUATION frames, or a connection frame.
fn valid(rng: &mut fastrand::Rng, p: &mut Peer, out: &mut Vec<u8>) {
    let open = sendable(p);
    let on_open = |rng: &mut fastrand::Rng| (!open.is_empty()).then(|| pick(rng, &open));
    let any = |rng: &mut fastrand::Rng| {
        let known: Vec<u32> = match p.hop {
            Hop::Client => p.recent.clone(),
            Hop::Backend => (1..=p.opened).rev().step_by(2).take(20).collect(),
        };
        (!known.is_empty()).then(|| pick(rng, &known))
    };
    let r = rng.u8(..100);
    match (r, p.hop) {
        (0..30, Hop::Client) => request(rng, p, out),
        (0..30, Hop::Backend) => {
            // Mostly to requests that ended, sometimes before.
            let ended: Vec<u32> = open
                .iter()
                .copied()
                .filter(|s| p.local_end.contains(s) && !p.answered.contains(s))
                .collect();
            let fresh: Vec<u32> = open
                .iter()
                .copied()
                .filter(|s| !p.answered.contains(s))
                .collect();
            if !ended.is_empty() && rng.u8(..100) < 85 {
                let s = pick(rng, &ended);
                response(rng, s, out);
            } else if !fresh.is_empty() {
                let s = pick(rng, &fresh);
                response(rng, s, out);
            }
        }
        (30..48, _) => {
            let Some(s) = on_open(rng) else {
                return;
            };
            if p.hop == Hop::Backend && !p.answered.contains(&s) {
                return;
            }
            let len = match rng.u8(..100) {
                0..60 => rng.usize(..64),
                60..90 => rng.usize(64..4000),
                _ => 16_000,
            };
            let end = rng.u8(..100) < 40;
            let mut flags = if end { frame::FLAG_END_STREAM } else { 0 };
            if rng.u8(..100) < 15 {
                flags |= frame::FLAG_PADDED;
            }
            let body = random_bytes(rng, len);
            let mut payload = Vec::new();
            if flags & frame::FLAG_PADDED != 0 {
                let pad = rng.usize(..40);
                payload.push(u8::try_from(pad).expect("small"));
                payload.extend_from_slice(&body);
                payload.extend(std::iter::repeat_n(0, pad));
            } else {
                payload = body;
            }
            put(out, frame::DATA, flags, s, &payload);
        }
        (48..53, _) => {
            // Trailers.
            let Some(s) = on_open(rng) else {
                return;
            };
            if p.hop == Hop::Backend && !p.answered.contains(&s) {
                return;
            }
            let flags = frame::FLAG_END_HEADERS | frame::FLAG_END_STREAM;
            put(out, frame::HEADERS, flags, s, pick(rng, TRAILERS));
        }
        (53..60, _) => {
            // A header block over HEADERS and CONTINUATION frames: a new
            // request, or a backend's response.
            let s = match p.hop {
                Hop::Client => p.next_sid,
                Hop::Backend => {
                    let fresh: Vec<u32> = open
                        .iter()
                        .copied()
                        .filter(|s| !p.answered.contains(s))
                        .collect();
                    if fresh.is_empty() {
                        return;
                    }
                    pick(rng, &fresh)
                }
            };
            let mut block = match p.hop {
                Hop::Client => REQ_PLAIN.to_vec(),
                Hop::Backend => RESP_200.to_vec(),
            };
            block.extend_from_slice(&[0x00, 0x01, b'v']);
            let n = pick(rng, &[3, 100, 5000, 20_000]);
            hpack_int(&mut block, 0, 7, n);
            block.extend(std::iter::repeat_n(b'v', n));
            let mut cuts: Vec<usize> = (0..rng.usize(1..=3))
                .map(|_| rng.usize(..=block.len()))
                .collect();
            cuts.push(0);
            cuts.push(block.len());
            cuts.sort_unstable();
            let parts: Vec<&[u8]> = cuts
                .windows(2)
                .flat_map(|w| block[w[0]..w[1]].chunks(16_384).collect::<Vec<_>>())
                .collect();
            let end = if rng.bool() {
                frame::FLAG_END_STREAM
            } else {
                0
            };
            for (i, part) in parts.iter().enumerate() {
                let flags = if i + 1 == parts.len() {
                    frame::FLAG_END_HEADERS
                } else {
                    0
                };
                let kind = if i == 0 {
                    frame::HEADERS
                } else {
                    frame::CONTINUATION
                };
                put(out, kind, flags | if i == 0 { end } else { 0 }, s, part);
            }
        }
        (60..66, _) => {
            put(out, frame::SETTINGS, 0, 0, &settings_payload(rng, true));
        }
        (66..68, _) => put(out, frame::SETTINGS, frame::FLAG_ACK, 0, &[]),
        (68..73, _) => {
            let ack = rng.u8(..100) < 30;
            let payload = if ack && rng.bool() {
                DRAIN_PING.to_vec()
            } else {
                random_bytes(rng, 8)
            };
            let flags = if ack { frame::FLAG_ACK } else { 0 };
            put(out, frame::PING, flags, 0, &payload);
        }
        (73..83, _) => {
            let s = if rng.bool() { 0 } else { any(rng).unwrap_or(0) };
            let inc: u32 = pick(rng, &[1, 100, 16_384, 65_535, 1 << 20]);
            put(out, frame::WINDOW_UPDATE, 0, s, &inc.to_be_bytes());
        }
        (83..90, _) => {
            let Some(s) = any(rng) else {
                return;
            };
            let reason: u32 = match p.hop {
                Hop::Client => pick(rng, &[0x0, 0x8, 0x8, 0x2]),
                Hop::Backend => pick(rng, &[0x0, 0x7, 0x7, 0x8, 0x2]),
            };
            put(out, frame::RST_STREAM, 0, s, &reason.to_be_bytes());
        }
        (90..94, _) => {
            let s = any(rng).unwrap_or(1);
            let dep = pick(rng, &[0u32, 1, 3, 0x8000_0001]);
            let mut payload = dep.to_be_bytes().to_vec();
            payload.push(rng.u8(..));
            put(out, frame::PRIORITY, 0, s, &payload);
        }
        (94..96, _) => {
            let last = match p.hop {
                Hop::Client => p.max_sid,
                Hop::Backend => {
                    let back = 2 * rng.u32(..3);
                    p.opened.saturating_sub(back)
                }
            };
            let reason: u32 = pick(rng, &[0x0, 0x0, 0x2, 0xb]);
            let mut payload = last.to_be_bytes().to_vec();
            payload.extend_from_slice(&reason.to_be_bytes());
            put(out, frame::GOAWAY, 0, 0, &payload);
        }
        _ => {
            // Unknown frame types are ignored (RFC 9113 4.1).
            let kind = pick(rng, &[0x0a, 0x0b, 0x10, 0xf0, 0xff]);
            let n = rng.usize(..16);
            put(out, kind, rng.u8(..), 0, &random_bytes(rng, n));
        }
    }
}

/// One to a few frames of any kind: a whole request or response, or one
/// frame of any type (or a header block over CONTINUATION frames), with
/// ids from anywhere, valid for its type most of the time.
fn wild(rng: &mut fastrand::Rng, p: &mut Peer, out: &mut Vec<u8>) {
    let wrong = rng.u8(..100) < 3;
    match rng.u8(..100) {
        0..18 => match p.hop {
            Hop::Client => request(rng, p, out),
            Hop::Backend => {
                let open: Vec<u32> = p
                    .local_end
                    .iter()
                    .copied()
                    .filter(|s| !p.answered.contains(s) && !p.reset.contains(s))
                    .collect();
                let s = if open.is_empty() {
                    stream_id(rng, p, false)
                } else {
                    pick(rng, &open)
                };
                response(rng, s, out);
            }
        },
        18..30 => {
            let s = stream_id(rng, p, true);
            let any = rng.u8(..);
            let flags = pick(
                rng,
                &[
                    frame::FLAG_END_HEADERS,
                    frame::FLAG_END_HEADERS | frame::FLAG_END_STREAM,
                    frame::FLAG_END_HEADERS | frame::FLAG_PRIORITY,
                    frame::FLAG_END_HEADERS | frame::FLAG_PADDED | frame::FLAG_END_STREAM,
                    frame::FLAG_END_STREAM,
                    any,
                ],
            );
            let block = random_block(rng);
            let block = &block[..block.len().min(16_000)];
            put(
                out,
                frame::HEADERS,
                flags,
                s,
                &wrap(rng, flags, frame::HEADERS, block),
            );
        }
        30..43 => {
            let s = stream_id(rng, p, false);
            let flags = pick(
                rng,
                &[
                    0,
                    0,
                    frame::FLAG_END_STREAM,
                    frame::FLAG_PADDED,
                    frame::FLAG_PADDED | frame::FLAG_END_STREAM,
                ],
            );
            let len = match rng.u8(..100) {
                0..70 => rng.usize(..64),
                70..90 => rng.usize(64..2000),
                90..98 => 16_000,
                _ => 16_385,
            };
            let body = random_bytes(rng, len);
            let mut payload = wrap(rng, flags, frame::DATA, &body);
            if payload.len() > 16_384 && len != 16_385 {
                payload.truncate(16_384);
            }
            put(out, frame::DATA, flags, s, &payload);
        }
        43..50 => {
            // A header block over HEADERS and CONTINUATION frames.
            let s = stream_id(rng, p, true);
            let block = random_block(rng);
            let pieces = rng.usize(2..=4);
            let mut cuts: Vec<usize> = (0..pieces - 1).map(|_| rng.usize(..=block.len())).collect();
            cuts.push(0);
            cuts.push(block.len());
            cuts.sort_unstable();
            let parts: Vec<&[u8]> = cuts
                .windows(2)
                .flat_map(|w| block[w[0]..w[1]].chunks(16_384).collect::<Vec<_>>())
                .collect();
            let end = if rng.bool() {
                frame::FLAG_END_STREAM
            } else {
                0
            };
            let flaw = rng.u8(..100);
            for (i, part) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                let flags = if last && flaw < 95 {
                    frame::FLAG_END_HEADERS
                } else {
                    0
                };
                if i == 0 {
                    put(out, frame::HEADERS, flags | end, s, part);
                } else {
                    let on = if flaw >= 97 { s + 2 } else { s };
                    put(out, frame::CONTINUATION, flags, on, part);
                }
                if i == 0 && (95..97).contains(&flaw) {
                    put(out, frame::PING, 0, 0, &[0; 8]);
                }
            }
            if parts.len() == 1 {
                put(out, frame::CONTINUATION, frame::FLAG_END_HEADERS, s, &[]);
            }
        }
        50..53 => {
            let s = stream_id(rng, p, false);
            let flags = pick(rng, &[0, frame::FLAG_END_HEADERS]);
            put(out, frame::CONTINUATION, flags, s, &random_block(rng)[..]);
        }
        53..61 => {
            let ack = rng.u8(..100) < 15;
            let s = if rng.u8(..100) < 97 { 0 } else { 1 };
            let mut payload = if ack {
                Vec::new()
            } else {
                let valid = rng.u8(..100) >= 3;
                settings_payload(rng, valid)
            };
            if wrong {
                let n = rng.usize(1..6);
                payload.extend(random_bytes(rng, n));
            }
            let flags = if ack { frame::FLAG_ACK } else { 0 };
            put(out, frame::SETTINGS, flags, s, &payload);
        }
        61..67 => {
            let ack = rng.u8(..100) < 30;
            let mut payload = if rng.u8(..100) < 20 {
                DRAIN_PING.to_vec()
            } else {
                random_bytes(rng, 8)
            };
            if wrong {
                payload.resize(pick(rng, &[0, 7, 9]), 0);
            }
            let s = if rng.u8(..100) < 97 { 0 } else { 1 };
            let flags = if ack { frame::FLAG_ACK } else { 0 };
            put(out, frame::PING, flags, s, &payload);
        }
        67..77 => {
            let s = if rng.bool() {
                0
            } else {
                stream_id(rng, p, false)
            };
            let inc: u32 = if rng.u8(..100) < 3 {
                0
            } else {
                pick(
                    rng,
                    &[1, 100, 16_384, 65_535, 1 << 20, 1 << 20, 0x7fff_ffff],
                )
            };
            let mut payload = inc.to_be_bytes().to_vec();
            if wrong {
                payload.push(0);
            }
            put(out, frame::WINDOW_UPDATE, 0, s, &payload);
        }
        77..85 => {
            let s = stream_id(rng, p, false);
            let reason: u32 = pick(rng, &[0, 1, 2, 5, 7, 7, 8, 0xff]);
            let mut payload = reason.to_be_bytes().to_vec();
            if wrong {
                payload.pop();
            }
            put(out, frame::RST_STREAM, 0, s, &payload);
        }
        85..90 => {
            let s = stream_id(rng, p, false);
            let mut payload = vec![0, 0, 0, pick(rng, &[0, 1, 3]), 15];
            if wrong {
                payload.push(0);
            }
            put(out, frame::PRIORITY, 0, s, &payload);
        }
        90..92 => {
            let last: u32 = match p.hop {
                Hop::Client => pick(rng, &[0, 1, 0x7fff_ffff]),
                Hop::Backend => pick(
                    rng,
                    &[0, 1, p.opened.saturating_sub(2), p.opened, 0x7fff_ffff],
                ),
            };
            let reason: u32 = pick(rng, &[0, 1, 2, 0xb]);
            let mut payload = last.to_be_bytes().to_vec();
            payload.extend_from_slice(&reason.to_be_bytes());
            let n = rng.usize(..8);
            payload.extend(random_bytes(rng, n));
            if wrong {
                payload.truncate(7);
            }
            let s = if rng.u8(..100) < 97 { 0 } else { 1 };
            put(out, frame::GOAWAY, 0, s, &payload);
        }
        92..94 => {
            let s = stream_id(rng, p, false);
            let mut payload = pick(rng, &[2u32, 4, 3]).to_be_bytes().to_vec();
            payload.extend_from_slice(pick(rng, BLOCKS));
            put(
                out,
                frame::PUSH_PROMISE,
                frame::FLAG_END_HEADERS,
                s,
                &payload,
            );
        }
        _ => {
            let kind = pick(rng, &[0x0a, 0x0b, 0x10, 0xf0, 0xff]);
            let s = stream_id(rng, p, false);
            let n = rng.usize(..16);
            let payload = random_bytes(rng, n);
            put(out, kind, rng.u8(..), s, &payload);
        }
    }
}

struct World {
    core: Core,
    eps: Vec<Arc<Endpoint>>,
    peers: Vec<Peer>,
    rng: fastrand::Rng,
    mix: Mix,
}

impl World {
    fn new(seed: u64, mix: Mix) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        // Algorithm::Random draws from the thread's generator.
        fastrand::seed(seed);
        let n = rng.usize(1..=3);
        let eps: Vec<Arc<Endpoint>> = (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("198.18.1.{}:8080", 10 + i).parse().expect("addr");
                Arc::new(Endpoint::new(addr))
            })
            .collect();
        let algorithm = if rng.bool() {
            Algorithm::RoundRobin
        } else {
            Algorithm::Random
        };
        let pool = Pool::new(algorithm, eps.clone());
        let core = Core::new(Box::new(move |_vip, tried| pool.pick(tried)));
        let mut w = Self {
            core,
            eps,
            peers: Vec::new(),
            rng,
            mix,
        };
        for _ in 0..w.rng.usize(1..=2) {
            w.add_client();
        }
        w
    }

    fn add_client(&mut self) {
        let id = self.core.add_client(VIP.parse().expect("vip"));
        let mut p = Peer::new(id, Hop::Client, false);
        let mut hello = frame::PREFACE.to_vec();
        put(
            &mut hello,
            frame::SETTINGS,
            0,
            0,
            &settings_payload(&mut self.rng, true),
        );
        if self.rng.u8(..100) < 75 {
            put(&mut hello, frame::SETTINGS, frame::FLAG_ACK, 0, &[]);
        }
        p.send(hello);
        self.peers.push(p);
    }

    /// Carry out the core's connect requests: most connect at once.
    fn io(&mut self) {
        for io in self.core.take_io() {
            if let Io::Connect { id, .. } = io {
                let polite = self.rng.u8(..100) < self.mix.polite;
                let mut p = Peer::new(id, Hop::Backend, polite);
                if self.rng.u8(..100) < 85 {
                    self.core.backend_connected(id);
                    p.connected = true;
                }
                self.peers.push(p);
            }
        }
    }

    fn live(&mut self, hop: Hop) -> Option<usize> {
        let ids: Vec<usize> = (0..self.peers.len())
            .filter(|i| {
                let p = &self.peers[*i];
                p.hop == hop && !p.gone && !p.eof && p.connected
            })
            .collect();
        (!ids.is_empty()).then(|| pick(&mut self.rng, &ids))
    }

    /// Hand some (or all) of a peer's pending bytes to the core.
    fn feed(&mut self, i: usize, all: bool) {
        let p = &mut self.peers[i];
        if p.pending.is_empty() || !p.connected || p.gone || p.eof {
            return;
        }
        let n = if all {
            p.pending.len()
        } else {
            self.rng.usize(1..=p.pending.len())
        };
        p.inbox.extend_from_slice(&p.pending[..n]);
        p.pending.drain(..n);
        p.delivered += n;
        match p.hop {
            Hop::Client => self.core.client_read(p.id, &mut p.inbox),
            Hop::Backend => self.core.backend_read(p.id, &mut p.inbox),
        }
        p.consumed(p.delivered - p.inbox.len());
        self.io();
    }

    /// Take and check what the core wrote to a peer; the writer put it
    /// all on the wire. A connection to close is forgotten, mostly at once.
    fn deliver(&mut self, i: usize) -> bool {
        let p = &mut self.peers[i];
        if p.gone {
            return false;
        }
        if !p.connected && self.rng.u8(..100) < 50 {
            p.connected = true;
            self.core.backend_connected(p.id);
        }
        let mut buf = BytesMut::new();
        let Some(closing) = self.core.take_out(p.id, &mut buf) else {
            p.gone = true;
            return false;
        };
        let answer = p.check_out(&mut self.rng, &buf);
        if !answer.is_empty() {
            p.send(answer);
        }
        self.core.written(p.id);
        if closing && self.rng.u8(..100) < 80 {
            self.core.forget(p.id);
            p.gone = true;
        }
        self.io();
        !buf.is_empty()
    }

    fn step(&mut self) {
        let r = self.rng.u8(..100);
        let client = self.mix.client;
        let backend = client + self.mix.backend;
        if r < client {
            if let Some(i) = self.live(Hop::Client) {
                for _ in 0..self.rng.usize(1..=3) {
                    let mut out = Vec::new();
                    let wild = self.mix.client_wild;
                    frames(&mut self.rng, &mut self.peers[i], wild, &mut out);
                    self.peers[i].send(out);
                }
            }
        } else if r < backend {
            if let Some(i) = self.live(Hop::Backend) {
                for _ in 0..self.rng.usize(1..=2) {
                    let mut out = Vec::new();
                    let wild = self.mix.backend_wild;
                    frames(&mut self.rng, &mut self.peers[i], wild, &mut out);
                    self.peers[i].send(out);
                }
            }
        } else if self.rng.u8(..100) < self.mix.forget {
            let i = self.rng.usize(..self.peers.len());
            if !self.peers[i].gone {
                self.core.forget(self.peers[i].id);
                self.peers[i].gone = true;
                self.io();
            }
        } else {
            let i = self.rng.usize(..self.peers.len());
            let id = self.peers[i].id;
            let hop = self.peers[i].hop;
            match (self.rng.u8(..100), hop) {
                (0..45, _) => {
                    let all = self.rng.bool();
                    self.feed(i, all);
                }
                (45..85, _) => {
                    for j in 0..self.peers.len() {
                        self.deliver(j);
                    }
                }
                (85..88, Hop::Client) => {
                    self.core.client_eof(id);
                    self.peers[i].eof = true;
                }
                (88..90, Hop::Client) => self.core.client_drain(id),
                (90..92, Hop::Client) => self.core.drain_final(id),
                (92..93, Hop::Client) => self.core.client_gone(id),
                (93..95, Hop::Client) if self.peers.len() < 6 => self.add_client(),
                (85..88, Hop::Backend) if !self.peers[i].connected => {
                    self.core.backend_connect_failed(id);
                }
                (88..90, Hop::Backend) => {
                    self.core.backend_eof(id);
                    self.peers[i].gone = true;
                }
                (90..93, Hop::Backend) => {
                    let ep = &self.eps[self.rng.usize(..self.eps.len())];
                    ep.draining.store(self.rng.bool(), Ordering::Relaxed);
                    self.core.sweep();
                }
                _ => self.feed(i, true),
            }
            self.io();
        }
        self.check_counts();
    }

    /// What the core says of itself agrees: no client holds more streams
    /// than allowed, and no endpoint counts more streams in flight than
    /// the clients have.
    fn check_counts(&self) {
        let mut streams = 0;
        for p in &self.peers {
            if p.hop == Hop::Client {
                let n = self.core.client_streams(p.id);
                assert!(
                    n <= MAX_CLIENT_STREAMS as usize,
                    "{n} streams on one client"
                );
                if p.gone {
                    assert_eq!(n, 0, "a forgotten client has streams");
                }
                streams += n as u64;
            }
        }
        let outstanding: u64 = self
            .eps
            .iter()
            .map(|ep| ep.outstanding.load(Ordering::Relaxed))
            .sum();
        assert!(
            outstanding <= streams,
            "{outstanding} streams in flight for {streams} client streams"
        );
    }

    /// Everything pending goes in and out until the peers are quiet (or
    /// for a bounded time), then every connection is forgotten.
    fn finish(&mut self) {
        for _ in 0..64 {
            let mut busy = false;
            for i in 0..self.peers.len() {
                busy |= !self.peers[i].pending.is_empty() && self.peers[i].connected;
                self.feed(i, true);
            }
            for i in 0..self.peers.len() {
                busy |= self.deliver(i);
            }
            self.check_counts();
            if !busy {
                break;
            }
        }
        let mut ids: Vec<(Hop, ConnId)> = self.peers.iter().map(|p| (p.hop, p.id)).collect();
        // Clients first: a backend forgotten first would retry its streams.
        ids.sort_unstable_by_key(|(hop, id)| (*hop == Hop::Backend, *id));
        let mut highest = 0;
        while !ids.is_empty() {
            for (_, id) in ids.drain(..) {
                self.core.forget(id);
                highest = highest.max(id);
            }
            // Forgetting may have opened connections for streams that
            // moved: forget those too.
            for io in self.core.take_io() {
                if let Io::Connect { id, .. } = io {
                    ids.push((Hop::Backend, id));
                }
            }
        }
        for id in 1..=highest + 2 {
            let mut buf = BytesMut::new();
            assert_eq!(
                self.core.take_out(id, &mut buf),
                None,
                "connection {id} left"
            );
            assert_eq!(self.core.client_streams(id), 0, "streams of {id} left");
            assert!(!self.core.client_reading(id) && !self.core.backend_reading(id));
        }
        assert_eq!(self.core.take_io(), vec![], "I/O requests left");
        for ep in &self.eps {
            assert_eq!(
                ep.outstanding.load(Ordering::Relaxed),
                0,
                "streams in flight left on {}",
                ep.addr
            );
        }
    }
}

std::thread_local! {
    /// The frames of a failing run, replayed with tracing on.
    static TRACE: std::cell::RefCell<Option<VecDeque<String>>> =
        const { std::cell::RefCell::new(None) };
}

fn trace(line: impl FnOnce() -> String) {
    TRACE.with_borrow_mut(|t| {
        if let Some(t) = t {
            if t.len() == 200 {
                t.pop_front();
            }
            t.push_back(line());
        }
    });
}

fn show(h: FrameHeader, p: &[u8]) -> String {
    let shown = &p[..p.len().min(24)];
    format!(
        "type {} flags {:#x} stream {} len {} {shown:02x?}",
        h.kind, h.flags, h.stream, h.length
    )
}

fn play(seed: u64, mix: Mix) {
    let mut w = World::new(seed, mix);
    let steps = w.rng.usize(10..80);
    for _ in 0..steps {
        w.step();
    }
    w.finish();
}

fn run(seeds: std::ops::Range<u64>, mix: Mix) {
    for seed in seeds {
        if let Err(e) = std::panic::catch_unwind(|| play(seed, mix)) {
            // The same run again, with the frames of each hop traced.
            TRACE.with_borrow_mut(|t| *t = Some(VecDeque::new()));
            let again = std::panic::catch_unwind(|| play(seed, mix));
            let lines = TRACE.with_borrow_mut(Option::take).unwrap_or_default();
            eprintln!("the last frames before the failure:");
            for line in lines {
                eprintln!("  {line}");
            }
            eprintln!("failed with seed {seed} and {mix:?}");
            std::panic::resume_unwind(again.err().unwrap_or(e));
        }
    }
}

#[test]
fn random_valid_frames_never_panic_and_output_whole_frames() {
    // Clients send most of the frames; backends mostly answer like servers.
    let mix = Mix {
        client: 40,
        backend: 12,
        polite: 85,
        forget: 0,
        client_wild: 6,
        backend_wild: 2,
    };
    run(0..900, mix);
}

#[test]
fn random_backend_frames_never_panic_and_respect_frame_limits() {
    // Clients send mostly requests; backends send anything.
    let mix = Mix {
        client: 25,
        backend: 35,
        polite: 40,
        forget: 0,
        client_wild: 1,
        backend_wild: 8,
    };
    run(10_000..10_700, mix);
}

#[test]
fn forgetting_connections_amid_random_frames_leaves_nothing_behind() {
    let mix = Mix {
        client: 35,
        backend: 25,
        polite: 70,
        forget: 8,
        client_wild: 3,
        backend_wild: 3,
    };
    run(20_000..20_600, mix);
}
