//! The HTTP/2 router's core on arbitrary bytes from a client and from its
//! backends, fed in arbitrary chunks.
//!
//! Properties:
//! - it never panics (the agent must not, on input from the network);
//! - how the byte streams are split into reads never changes what the
//!   router sends to anyone (it sees TCP reads of any size);
//! - isolation: whatever client A sends, a well-formed client B that
//!   shares the router (and so its pooled backend connections) with A
//!   receives byte for byte what it receives without A. The backends are
//!   small conformant HTTP/2 servers ([`Server`]) that answer every
//!   request the same way, whichever endpoint they are (A's streams shift
//!   the round-robin choice of B's).
//!
//! Input: a first byte, then data. The first byte's low nibble cuts the
//! data into a client part and a backend part; its high nibble is the read
//! size of the split property. In the isolation property the client part
//! is A's bytes (after the preface) and the backend part weighs how much of
//! A's bytes go in before each of B's frames.
#![no_main]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, OnceLock},
};

use balancer_router::{
    core::{ConnId, Core, Io},
    endpoint::{Algorithm, Endpoint, Pool},
    frame::PREFACE,
};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

// Frame types, flags and settings (RFC 9113 6), as the servers see them.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
const COMPRESSION_ERROR: u32 = 0x9;
const MAX_FRAME_SIZE: usize = 16_384;

fn router(endpoints: usize) -> Core {
    let eps: Vec<Arc<Endpoint>> = (0..endpoints)
        .map(|i| {
            Arc::new(Endpoint::new(
                format!("198.18.1.{}:80", 10 + i).parse().expect("addr"),
            ))
        })
        .collect();
    let pool = Pool::new(Algorithm::RoundRobin, eps);
    Core::new(Box::new(move |_, tried| pool.pick(tried)))
}

fn vip() -> std::net::SocketAddr {
    "198.19.0.1:80".parse().expect("vip")
}

// ---- property 2: splits -------------------------------------------------

fn connect_all(core: &mut Core, backends: &mut Vec<ConnId>) {
    for io in core.take_io() {
        if let Io::Connect { id, .. } = io {
            backends.push(id);
            core.backend_connected(id);
        }
    }
}

/// Everything the router wrote, per connection, in the order of ids.
fn run(client: &[u8], backend: &[u8], step: usize) -> Vec<(ConnId, Vec<u8>)> {
    let mut core = router(2);
    let c = core.add_client(vip());
    let mut backends = Vec::new();
    let mut buf = BytesMut::new();
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(client);
    for chunk in input.chunks(step) {
        buf.extend_from_slice(chunk);
        core.client_read(c, &mut buf);
        connect_all(&mut core, &mut backends);
    }
    // Each backend connection sends the same bytes back.
    let first: Vec<ConnId> = backends.clone();
    for b in first {
        let mut buf = BytesMut::new();
        for chunk in backend.chunks(step) {
            buf.extend_from_slice(chunk);
            core.backend_read(b, &mut buf);
            connect_all(&mut core, &mut backends);
        }
    }
    let mut out = Vec::new();
    for id in std::iter::once(c).chain(backends) {
        let mut buf = BytesMut::new();
        if core.take_out(id, &mut buf).is_some() {
            out.push((id, buf.to_vec()));
        }
    }
    out
}

// ---- property 3: isolation ----------------------------------------------

fn put(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("small");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn u32_at(p: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(p[i..i + 4].try_into().expect("4 bytes"))
}

/// A well-behaved HTTP/2 server on one backend connection, without I/O:
/// SETTINGS and a large connection window after the router's preface,
/// ACKs of SETTINGS and PING, every DATA credited back at once, every
/// request that ended answered `:status 200` with a two-byte body.
/// It decodes every header block with its own HPACK decoder, as any
/// server must: a block it cannot decode is a connection error
/// (COMPRESSION_ERROR, RFC 9113 4.3): GOAWAY, then it closes.
///
/// It also holds the router to what a server may expect on any
/// connection: the preface, frames within the default
/// SETTINGS_MAX_FRAME_SIZE, header blocks contiguous, new stream ids odd
/// and increasing (a violation panics: the router's own bug).
struct Server {
    input: Vec<u8>,
    preface: bool,
    decoder: loona_hpack::Decoder<'static>,
    /// A header block in progress: stream, END_STREAM, bytes.
    block: Option<(u32, bool, Vec<u8>)>,
    last_stream: u32,
    /// Streams answered or reset: nothing more is sent on them.
    done: BTreeSet<u32>,
    out: Vec<u8>,
    closed: bool,
}

impl Server {
    fn new() -> Self {
        Self {
            input: Vec::new(),
            preface: false,
            decoder: loona_hpack::Decoder::new(),
            block: None,
            last_stream: 0,
            done: BTreeSet::new(),
            out: Vec::new(),
            closed: false,
        }
    }

    fn read(&mut self, bytes: &[u8]) {
        if self.closed {
            return;
        }
        self.input.extend_from_slice(bytes);
        if !self.preface {
            let n = self.input.len().min(PREFACE.len());
            assert_eq!(&self.input[..n], &PREFACE[..n], "the router's preface");
            if n < PREFACE.len() {
                return;
            }
            self.input.drain(..PREFACE.len());
            self.preface = true;
            put(&mut self.out, SETTINGS, 0, 0, &[]);
            put(
                &mut self.out,
                WINDOW_UPDATE,
                0,
                0,
                &(1u32 << 30).to_be_bytes(),
            );
        }
        while self.input.len() >= 9 && !self.closed {
            let len = usize::from(self.input[0]) << 16
                | usize::from(self.input[1]) << 8
                | usize::from(self.input[2]);
            assert!(len <= MAX_FRAME_SIZE, "the router sent a {len}-byte frame");
            if self.input.len() < 9 + len {
                return;
            }
            let (kind, flags) = (self.input[3], self.input[4]);
            let stream = u32_at(&self.input, 5) & 0x7fff_ffff;
            let payload = self.input[9..9 + len].to_vec();
            self.input.drain(..9 + len);
            self.frame(kind, flags, stream, &payload);
        }
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, p: &[u8]) {
        if let Some((s, ..)) = &self.block {
            assert!(
                kind == CONTINUATION && stream == *s,
                "frame type {kind} on {stream} inside a header block on {s}"
            );
        }
        match kind {
            SETTINGS if flags & FLAG_ACK == 0 => put(&mut self.out, SETTINGS, FLAG_ACK, 0, &[]),
            PING if flags & FLAG_ACK == 0 => put(&mut self.out, PING, FLAG_ACK, 0, p),
            HEADERS => {
                let mut start = 0;
                let mut end = p.len();
                if flags & FLAG_PADDED != 0 {
                    start = 1;
                    end = end.checked_sub(usize::from(p[0])).expect("padding fits");
                }
                if flags & FLAG_PRIORITY != 0 {
                    start += 5;
                }
                let end_stream = flags & FLAG_END_STREAM != 0;
                self.block = Some((stream, end_stream, p[start..end].to_vec()));
                if flags & FLAG_END_HEADERS != 0 {
                    self.end_block();
                }
            }
            CONTINUATION => {
                let (_, _, buf) = self.block.as_mut().expect("CONTINUATION without HEADERS");
                buf.extend_from_slice(p);
                if flags & FLAG_END_HEADERS != 0 {
                    self.end_block();
                }
            }
            DATA => {
                if !p.is_empty() {
                    let n = u32::try_from(p.len()).expect("small").to_be_bytes();
                    put(&mut self.out, WINDOW_UPDATE, 0, 0, &n);
                    if !self.done.contains(&stream) {
                        put(&mut self.out, WINDOW_UPDATE, 0, stream, &n);
                    }
                }
                if flags & FLAG_END_STREAM != 0 {
                    self.answer(stream);
                }
            }
            RST_STREAM => {
                self.done.insert(stream);
            }
            _ => {}
        }
    }

    fn end_block(&mut self) {
        let (stream, end_stream, block) = self.block.take().expect("a block");
        if self.decoder.decode(&block).is_err() {
            let mut goaway = self.last_stream.to_be_bytes().to_vec();
            goaway.extend_from_slice(&COMPRESSION_ERROR.to_be_bytes());
            put(&mut self.out, GOAWAY, 0, 0, &goaway);
            self.closed = true;
            return;
        }
        if stream > self.last_stream {
            assert_eq!(stream % 2, 1, "the router opened an even stream");
            self.last_stream = stream;
        } else {
            assert!(
                !self.done.contains(&stream),
                "a header block on stream {stream}, answered or reset"
            );
        }
        if end_stream {
            self.answer(stream);
        }
    }

    fn answer(&mut self, stream: u32) {
        if self.done.insert(stream) {
            put(&mut self.out, HEADERS, FLAG_END_HEADERS, stream, &[0x88]);
            put(&mut self.out, DATA, FLAG_END_STREAM, stream, b"ok");
        }
    }
}

/// A router with two endpoints, its clients, and a [`Server`] on each of
/// its backend connections.
struct Net {
    core: Core,
    servers: BTreeMap<ConnId, Server>,
    /// Client connections: id, what they received, forgotten.
    clients: Vec<(ConnId, Vec<u8>, bool)>,
    /// Their read buffers (what the router has not consumed yet).
    inboxes: Vec<BytesMut>,
}

impl Net {
    fn new() -> Self {
        Self {
            core: router(2),
            servers: BTreeMap::new(),
            clients: Vec::new(),
            inboxes: Vec::new(),
        }
    }

    fn add_client(&mut self) -> usize {
        let id = self.core.add_client(vip());
        self.clients.push((id, Vec::new(), false));
        self.inboxes.push(BytesMut::new());
        self.clients.len() - 1
    }

    fn send(&mut self, client: usize, bytes: &[u8]) {
        let (id, _, gone) = self.clients[client];
        if gone || bytes.is_empty() {
            return;
        }
        let buf = &mut self.inboxes[client];
        buf.extend_from_slice(bytes);
        self.core.client_read(id, buf);
        self.settle();
    }

    /// Deliver everything each side has for the other until nobody has
    /// anything left (a connection the router closes is forgotten once its
    /// output went; one a server closes ends with its GOAWAY).
    fn settle(&mut self) {
        for _ in 0..100_000 {
            let mut moved = false;
            for io in self.core.take_io() {
                if let Io::Connect { id, .. } = io {
                    self.servers.insert(id, Server::new());
                    self.core.backend_connected(id);
                    moved = true;
                }
            }
            for (id, received, gone) in &mut self.clients {
                if *gone {
                    continue;
                }
                let mut buf = BytesMut::new();
                let Some(closing) = self.core.take_out(*id, &mut buf) else {
                    *gone = true;
                    continue;
                };
                moved |= !buf.is_empty();
                received.extend_from_slice(&buf);
                self.core.written(*id);
                if closing {
                    self.core.forget(*id);
                    *gone = true;
                    moved = true;
                }
            }
            let ids: Vec<ConnId> = self.servers.keys().copied().collect();
            for b in ids {
                let mut buf = BytesMut::new();
                let Some(closing) = self.core.take_out(b, &mut buf) else {
                    self.servers.remove(&b);
                    continue;
                };
                let server = self.servers.get_mut(&b).expect("server");
                moved |= !buf.is_empty();
                server.read(&buf);
                self.core.written(b);
                let answer = std::mem::take(&mut server.out);
                let closed = server.closed;
                if !answer.is_empty() {
                    moved = true;
                    self.core.backend_read(b, &mut BytesMut::from(&answer[..]));
                }
                if closed {
                    self.core.backend_eof(b);
                }
                if closed || closing {
                    self.core.forget(b);
                    self.servers.remove(&b);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the exchange does not settle");
    }
}

const REQ: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
const POST: &[u8] = &[0x83, 0x86, 0x84, 0x01, 0x01, b'a'];
const TRAILERS: &[u8] = &[0x00, 0x01, b'x', 0x01, b'y'];
/// B's streams; each is answered once.
const B_STREAMS: [u32; 6] = [1, 3, 5, 7, 9, 11];

/// Client B's exchange, one read at a time: preface and SETTINGS, the ACK
/// of the router's, requests with and without bodies, trailers, a block
/// over CONTINUATION, a PING, a WINDOW_UPDATE.
fn b_script() -> Vec<Vec<u8>> {
    let f = |kind, flags, stream, payload: &[u8]| {
        let mut v = Vec::new();
        put(&mut v, kind, flags, stream, payload);
        v
    };
    let mut hello = PREFACE.to_vec();
    put(&mut hello, SETTINGS, 0, 0, &[]);
    let eh = FLAG_END_HEADERS;
    let es = FLAG_END_STREAM;
    vec![
        hello,
        f(SETTINGS, FLAG_ACK, 0, &[]),
        f(HEADERS, eh | es, 1, REQ),
        f(HEADERS, eh, 3, REQ),
        f(DATA, es, 3, b"hello"),
        f(HEADERS, eh, 5, POST),
        f(DATA, 0, 5, b"abc"),
        f(HEADERS, eh | es, 5, TRAILERS),
        f(HEADERS, es, 7, &REQ[..2]),
        f(CONTINUATION, eh, 7, &REQ[2..]),
        f(PING, 0, 0, b"12345678"),
        f(HEADERS, eh, 9, POST),
        f(DATA, 0, 9, &[7; 100]),
        f(DATA, es, 9, &[8; 100]),
        f(WINDOW_UPDATE, 0, 0, &1000u32.to_be_bytes()),
        f(HEADERS, eh | es, 11, REQ),
    ]
}

/// What B receives, with A sending `a` (if any) cut before B's reads by
/// the weights.
fn isolation_run(a: Option<&[u8]>, weights: &[u8]) -> Vec<u8> {
    let script = b_script();
    let mut net = Net::new();
    let a_client = a.map(|_| net.add_client());
    let b_client = net.add_client();
    let mut a_bytes = PREFACE.to_vec();
    a_bytes.extend_from_slice(a.unwrap_or_default());
    // Where A's bytes are cut: before each of B's reads and after the last.
    let parts = script.len() + 1;
    let w: Vec<usize> = (0..parts)
        .map(|i| {
            if weights.is_empty() {
                1
            } else {
                usize::from(weights[i % weights.len()])
            }
        })
        .collect();
    let total: usize = w.iter().sum::<usize>().max(1);
    let mut cuts = vec![0];
    let mut acc = 0;
    for wi in &w {
        acc += wi;
        cuts.push(a_bytes.len() * acc / total);
    }
    *cuts.last_mut().expect("cuts") = a_bytes.len();
    for (i, step) in script.iter().enumerate() {
        if let Some(a_client) = a_client {
            net.send(a_client, &a_bytes[cuts[i]..cuts[i + 1]]);
        }
        net.send(b_client, step);
    }
    if let Some(a_client) = a_client {
        net.send(a_client, &a_bytes[cuts[parts - 1]..]);
    }
    net.settle();
    std::mem::take(&mut net.clients[b_client].1)
}

/// B's exchange alone, checked once: every one of its streams answered,
/// nothing reset, no GOAWAY. (If not, the harness is wrong, not the
/// router's isolation.)
fn baseline() -> &'static [u8] {
    static BASELINE: OnceLock<Vec<u8>> = OnceLock::new();
    BASELINE.get_or_init(|| {
        let out = isolation_run(None, &[]);
        let mut answered = BTreeSet::new();
        let mut b = &out[..];
        while b.len() >= 9 {
            let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
            let (kind, flags, stream) = (b[3], b[4], u32_at(b, 5));
            let p = &b[9..9 + len];
            assert!(kind != RST_STREAM && kind != GOAWAY, "B alone got {kind}");
            if kind == HEADERS {
                assert_eq!(p, [0x88], "B's response on {stream}");
            }
            if kind == DATA && flags & FLAG_END_STREAM != 0 && p == b"ok" {
                answered.insert(stream);
            }
            b = &b[9 + len..];
        }
        assert!(b.is_empty(), "B got a partial frame");
        assert_eq!(answered, BTreeSet::from(B_STREAMS), "B alone is answered");
        out
    })
}

/// Frames as `TYPE(flags,stream)payload`, for the failure message.
fn show(mut b: &[u8]) -> String {
    const NAMES: [&str; 10] = [
        "DATA",
        "HEADERS",
        "PRIORITY",
        "RST_STREAM",
        "SETTINGS",
        "PUSH",
        "PING",
        "GOAWAY",
        "WINDOW_UPDATE",
        "CONTINUATION",
    ];
    let mut s = String::new();
    while b.len() >= 9 {
        let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
        let end = (9 + len).min(b.len());
        let name = NAMES.get(usize::from(b[3])).copied().unwrap_or("?");
        let p = &b[9..end];
        s += &format!("{name}({:#x},{}){p:02x?} ", b[4], u32_at(b, 5));
        b = &b[end..];
    }
    s
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    // The first part is the client's, the rest the backends'.
    let cut = data.len() * usize::from(seed & 0x0f) / 16;
    let (client, backend) = data.split_at(cut);
    let whole = run(client, backend, usize::MAX);
    let step = usize::from(seed >> 4).max(1);
    assert_eq!(run(client, backend, step), whole);
    // Isolation: A's bytes do not change what B receives.
    let with_a = isolation_run(Some(client), backend);
    assert!(
        with_a == baseline(),
        "client A's bytes changed what client B received:\n without A: {}\n with A:    {}",
        show(baseline()),
        show(&with_a)
    );
});
