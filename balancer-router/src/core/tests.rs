//! The router core driven byte by byte, without sockets: what each hop
//! sees, frame by frame. The integration tests (tests/tests/http2.rs,
//! grpc_interop.rs) run the same logic against real peers.

use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;

use super::*;
use crate::{
    endpoint::{Algorithm, Pool},
    frame::{FrameHeader, HEADER_LEN, Reason},
    hpack,
};

mod attacks;
mod bounds;
mod h2spec;
mod lost;
mod metadata;
mod origins;
mod probes;

#[derive(Debug, Clone, PartialEq, Eq)]
struct F {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn parse(mut b: &[u8]) -> Vec<F> {
    let mut v = Vec::new();
    if b.starts_with(frame::PREFACE) {
        b = &b[frame::PREFACE.len()..];
    }
    while b.len() >= HEADER_LEN {
        let h = FrameHeader::parse(b[..HEADER_LEN].try_into().expect("9"));
        let end = HEADER_LEN + h.length as usize;
        v.push(F {
            kind: h.kind,
            flags: h.flags,
            stream: h.stream,
            payload: b[HEADER_LEN..end].to_vec(),
        });
        b = &b[end..];
    }
    v
}

fn u32_at(p: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(p[i..i + 4].try_into().expect("4"))
}

const VIP: &str = "198.19.0.50:80";

struct H {
    core: Core,
    eps: Vec<Arc<Endpoint>>,
    /// Backend connection id -> endpoint address.
    conns: Vec<(ConnId, SocketAddr)>,
    /// Backend connection id -> the origin it was opened for.
    origins: Vec<(ConnId, Origin)>,
    /// This endpoint accepts connections but sends nothing (not even its
    /// SETTINGS).
    silent: Option<SocketAddr>,
}

impl H {
    fn new(n: usize, algorithm: Algorithm) -> Self {
        Self::with_limits(n, algorithm, Limits::default())
    }

    fn with_limits(n: usize, algorithm: Algorithm, limits: Limits) -> Self {
        let eps: Vec<Arc<Endpoint>> = (0..n)
            .map(|i| {
                Arc::new(Endpoint::new(
                    format!("198.18.1.{}:8080", 10 + i).parse().expect("addr"),
                ))
            })
            .collect();
        let pool = Arc::new(Pool::new(algorithm, eps.clone()));
        let core = Core::with_limits(Box::new(move |_vip, tried| pool.pick(tried)), limits);
        Self {
            core,
            eps,
            conns: Vec::new(),
            origins: Vec::new(),
            silent: None,
        }
    }

    /// A client that sent its preface and (empty) SETTINGS.
    fn client(&mut self) -> ConnId {
        self.client_from(Origin::NODE)
    }

    /// A client of `origin` that sent its preface and (empty) SETTINGS.
    fn client_from(&mut self, origin: Origin) -> ConnId {
        let id = self.core.add_client_from(VIP.parse().expect("vip"), origin);
        let mut b = BytesMut::new();
        b.extend_from_slice(frame::PREFACE);
        frame::settings(&mut b, &[]);
        self.feed(id, b);
        let out = self.out(id);
        // Our SETTINGS (table size 0 first), the window, the ACK.
        assert_eq!(out[0].kind, frame::SETTINGS);
        assert_eq!(&out[0].payload[..6], &[0, 1, 0, 0, 0, 0]);
        assert!(
            out.iter()
                .any(|f| f.kind == frame::SETTINGS && f.flags == 1)
        );
        id
    }

    fn feed(&mut self, id: ConnId, mut b: BytesMut) {
        self.core.client_read(id, &mut b);
        self.pump_io();
    }

    fn feed_backend(&mut self, id: ConnId, mut b: BytesMut) {
        self.core.backend_read(id, &mut b);
        self.pump_io();
    }

    /// Carry out connect requests at once (as if every connect succeeded
    /// and every backend sent its SETTINGS).
    fn pump_io(&mut self) {
        loop {
            let mut any = false;
            for io in self.core.take_io() {
                if let Io::Connect { id, addr, origin } = io {
                    any = true;
                    self.conns.push((id, addr));
                    self.origins.push((id, origin));
                    self.core.backend_connected(id);
                    if self.silent != Some(addr) {
                        let mut s = BytesMut::new();
                        frame::settings(&mut s, &[]);
                        self.core.backend_read(id, &mut s);
                    }
                }
            }
            if !any {
                break;
            }
        }
    }

    fn out(&mut self, id: ConnId) -> Vec<F> {
        let mut buf = BytesMut::new();
        self.core.take_out(id, &mut buf);
        let v = parse(&buf);
        self.core.written(id);
        self.pump_io();
        v
    }

    fn backend(&self, addr: SocketAddr) -> ConnId {
        self.conns
            .iter()
            .rev()
            .find(|(_, a)| *a == addr)
            .map(|(id, _)| *id)
            .expect("a connection to that endpoint")
    }
}

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    frame::head(&mut b, payload.len(), kind, flags, stream);
    b.extend_from_slice(payload);
    b
}

/// `:method GET`, `:scheme http`, `:path /`, and `:authority` added to the
/// dynamic table (RFC 7541 C.3.1).
const REQ_INDEXING: &[u8] = &[
    0x82, 0x86, 0x84, 0x41, 0x0f, b'w', b'w', b'w', b'.', b'e', b'x', b'a', b'm', b'p', b'l', b'e',
    b'.', b'c', b'o', b'm',
];
/// The same request referring to the dynamic entry (C.3.2 without the
/// cache-control field).
const REQ_DYNAMIC: &[u8] = &[0x82, 0x86, 0x84, 0xbe];
/// A self-contained request: GET http / with a literal authority.
const REQ_PLAIN: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
/// `:status 200`.
const RESP_200: &[u8] = &[0x88];

fn headers(stream: u32, block: &[u8], end: bool) -> BytesMut {
    let mut b = BytesMut::new();
    frame::headers(&mut b, stream, block, end, 16_384);
    b
}

#[test]
fn blocks_before_the_ack_are_decoded_and_after_it_pass_through() {
    let mut h = H::new(2, Algorithm::RoundRobin);
    let c = h.client();
    // Before the ACK: the second block refers to the first's table entry.
    h.feed(c, headers(1, REQ_INDEXING, true));
    h.feed(c, headers(3, REQ_DYNAMIC, true));
    let mut seen = Vec::new();
    for ep in h.eps.clone() {
        let b = h.backend(ep.addr);
        for f in h.out(b).into_iter().filter(|f| f.kind == frame::HEADERS) {
            hpack::check_self_contained(&f.payload).expect("re-encoded without the table");
            let list = loona_hpack::Decoder::new()
                .decode(&f.payload)
                .expect("decodes");
            seen.push(list);
        }
    }
    assert_eq!(seen.len(), 2);
    for list in &seen {
        assert!(
            list.contains(&(b":authority".to_vec(), b"www.example.com".to_vec())),
            "{list:?}"
        );
    }
    // The ACK: from now on blocks are forwarded byte for byte...
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(c, headers(5, REQ_PLAIN, true));
    let fwd: Vec<F> = h
        .eps
        .clone()
        .iter()
        .flat_map(|ep| {
            let b = h.backend(ep.addr);
            h.out(b)
        })
        .filter(|f| f.kind == frame::HEADERS)
        .collect();
    assert_eq!(fwd.len(), 1);
    assert_eq!(fwd[0].payload, REQ_PLAIN);
    // ...and one that still refers to the table is a connection error.
    h.feed(c, headers(7, REQ_DYNAMIC, true));
    let out = h.out(c);
    let goaway = out
        .iter()
        .find(|f| f.kind == frame::GOAWAY)
        .expect("GOAWAY");
    assert_eq!(u32_at(&goaway.payload, 4), Reason::COMPRESSION_ERROR.code());
}

#[test]
fn backend_stream_ids_grow_in_order_under_max_concurrent_streams() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = h.client();
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(c, headers(1, REQ_PLAIN, true));
    let b = h.backend(h.eps[0].addr);
    // The backend allows 2 streams at a time.
    let mut s = BytesMut::new();
    frame::settings(&mut s, &[(setting::MAX_CONCURRENT_STREAMS, 2)]);
    h.feed_backend(b, s);
    for sid in [3, 5, 7, 9] {
        h.feed(c, headers(sid, REQ_PLAIN, true));
    }
    // Two fit on the first connection; the others open another one to the
    // same pod rather than wait behind streams that may never end.
    let ids: Vec<u32> = h
        .out(b)
        .iter()
        .filter(|f| f.kind == frame::HEADERS)
        .map(|f| f.stream)
        .collect();
    assert_eq!(ids, vec![1, 3]);
    let conns: Vec<ConnId> = h.conns.iter().map(|(id, _)| *id).collect();
    assert_eq!(conns.len(), 2, "{conns:?}");
    let b2 = conns[1];
    let ids2: Vec<u32> = h
        .out(b2)
        .iter()
        .filter(|f| f.kind == frame::HEADERS)
        .map(|f| f.stream)
        .collect();
    assert_eq!(
        ids2,
        vec![1, 3, 5],
        "ids start again and grow on each connection"
    );
    for (bk, bid) in [(b, 1), (b, 3), (b2, 1), (b2, 3), (b2, 5)] {
        h.feed_backend(bk, headers(bid, RESP_200, true));
    }
    // Every response reached the client on its own stream.
    let mut got: Vec<u32> = h
        .out(c)
        .iter()
        .filter(|f| f.kind == frame::HEADERS)
        .map(|f| f.stream)
        .collect();
    got.sort_unstable();
    assert_eq!(got, vec![1, 3, 5, 7, 9]);
    assert_eq!(h.core.client_streams(c), 0);
    assert_eq!(
        h.eps[0]
            .outstanding
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // The extra connection closes once idle; the first stays pooled.
    h.core.sweep();
    assert!(h.core.backend_reading(b));
    let mut buf = BytesMut::new();
    assert_eq!(h.core.take_out(b2, &mut buf), Some(true), "to be closed");
}

#[test]
fn one_client_holding_every_slot_of_a_pod_connection_does_not_stall_another() {
    // The fuzzer's isolation_stream_slots: A's streams never end.
    let mut h = H::new(1, Algorithm::RoundRobin);
    let a = h.client();
    h.feed(a, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(a, headers(1, REQ_PLAIN, false));
    let b = h.backend(h.eps[0].addr);
    let mut s = BytesMut::new();
    frame::settings(&mut s, &[(setting::MAX_CONCURRENT_STREAMS, 100)]);
    h.feed_backend(b, s);
    for i in 1..MAX_CLIENT_STREAMS {
        h.feed(a, headers(1 + 2 * i, REQ_PLAIN, false));
    }
    let c = h.client();
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(c, headers(1, REQ_PLAIN, true));
    let conns: Vec<ConnId> = h.conns.iter().map(|(id, _)| *id).collect();
    let mut answered = false;
    for bk in conns {
        let mut hs: Vec<u32> = Vec::new();
        for f in h.out(bk) {
            if f.kind == frame::HEADERS && f.flags & frame::FLAG_END_STREAM != 0 {
                hs.push(f.stream);
            }
        }
        for bid in hs {
            h.feed_backend(bk, headers(bid, RESP_200, true));
            answered = true;
        }
    }
    assert!(answered, "B's request reached a pod");
    assert!(
        h.out(c)
            .iter()
            .any(|f| f.kind == frame::HEADERS && f.stream == 1 && f.payload == RESP_200)
    );
}

#[test]
fn a_refused_stream_is_replayed_on_another_endpoint() {
    let mut h = H::new(2, Algorithm::RoundRobin);
    let c = h.client();
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(c, headers(1, REQ_PLAIN, false));
    h.feed(
        c,
        frame_bytes(frame::DATA, frame::FLAG_END_STREAM, 1, b"hello"),
    );
    let first = h
        .eps
        .iter()
        .map(|e| e.addr)
        .find(|a| h.conns.iter().any(|(_, x)| x == a))
        .expect("one endpoint got it");
    let b1 = h.backend(first);
    let sent = h.out(b1);
    assert!(
        sent.iter()
            .any(|f| f.kind == frame::DATA && f.payload == b"hello")
    );
    // Refused: it goes, whole, to the other endpoint; the client sees nothing.
    h.feed_backend(
        b1,
        frame_bytes(
            frame::RST_STREAM,
            0,
            1,
            &Reason::REFUSED_STREAM.code().to_be_bytes(),
        ),
    );
    let other = h
        .eps
        .iter()
        .map(|e| e.addr)
        .find(|a| *a != first)
        .expect("second");
    let b2 = h.backend(other);
    let again = h.out(b2);
    let kinds: Vec<(u8, Vec<u8>)> = again
        .iter()
        .filter(|f| f.stream == 1)
        .map(|f| (f.kind, f.payload.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (frame::HEADERS, REQ_PLAIN.to_vec()),
            (frame::DATA, b"hello".to_vec())
        ]
    );
    assert!(h.out(c).iter().all(|f| f.kind != frame::RST_STREAM));
    // Its answer reaches the client.
    h.feed_backend(b2, headers(1, RESP_200, true));
    assert!(
        h.out(c)
            .iter()
            .any(|f| f.kind == frame::HEADERS && f.stream == 1 && f.payload == RESP_200)
    );
}

/// Two endpoints, round-robin: client streams 1 and 5 go to the first
/// (backend ids 1 and 3, whose HEADERS are written), 3 to the second.
/// Returns the harness, the client, and the first endpoint's connection.
fn streams_1_3_5_over_two() -> (H, ConnId, ConnId) {
    let mut h = H::new(2, Algorithm::RoundRobin);
    let c = h.client();
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    for sid in [1, 3, 5] {
        h.feed(c, headers(sid, REQ_PLAIN, true));
    }
    let ba = h.backend(h.eps[0].addr);
    let first: Vec<u32> = h
        .out(ba)
        .iter()
        .filter(|f| f.kind == frame::HEADERS)
        .map(|f| f.stream)
        .collect();
    assert_eq!(first, vec![1, 3]);
    (h, c, ba)
}

#[test]
fn goaway_retries_only_the_streams_above_its_last_id() {
    let (mut h, c, ba) = streams_1_3_5_over_two();
    let mut g = BytesMut::new();
    frame::goaway(&mut g, 1, Reason::NO_ERROR);
    h.feed_backend(ba, g);
    // Backend stream 3 was not processed: it moved to the other endpoint.
    let bb = h.backend(h.eps[1].addr);
    let moved = h
        .out(bb)
        .iter()
        .filter(|f| f.kind == frame::HEADERS)
        .count();
    assert_eq!(moved, 2, "its own stream plus the retried one");
    // Stream 1 is still served by the endpoint that sent GOAWAY.
    h.feed_backend(ba, headers(1, RESP_200, true));
    let out = h.out(c);
    assert!(
        out.iter()
            .any(|f| f.kind == frame::HEADERS && f.stream == 1)
    );
    assert!(out.iter().all(|f| f.kind != frame::RST_STREAM));
}

/// A backend that shuts down gracefully can close its socket with our
/// newer HEADERS unread; its kernel then resets the connection, and our
/// next write fails before our reader has seen the GOAWAY that says those
/// streams were never processed. They must be retried, not reset.
#[test]
fn a_failed_write_to_a_backend_still_reads_its_goaway_and_retries() {
    let (mut h, c, ba) = streams_1_3_5_over_two();
    // The write after that fails (EPIPE): the backend is gone for writes.
    h.core.write_failed(ba);
    h.pump_io();
    // A new stream does not go to it.
    h.feed(c, headers(7, REQ_PLAIN, true));
    h.feed(c, headers(9, REQ_PLAIN, true));
    assert!(
        h.core
            .backends
            .get(&ba)
            .is_some_and(|be| be.streams.len() == 2 && be.queue.is_empty()),
        "a stream went to the connection whose write failed"
    );
    // What it had sent before is still read: GOAWAY(last 1), then the
    // response to backend stream 1.
    let mut g = BytesMut::new();
    frame::goaway(&mut g, 1, Reason::NO_ERROR);
    h.feed_backend(ba, g);
    h.feed_backend(ba, headers(1, RESP_200, true));
    h.core.backend_eof(ba);
    h.pump_io();
    let out = h.out(c);
    assert!(
        out.iter()
            .any(|f| f.kind == frame::HEADERS && f.stream == 1),
        "{out:?}"
    );
    assert!(
        out.iter().all(|f| f.kind != frame::RST_STREAM),
        "a stream the backend never processed was reset: {out:?}"
    );
    // Client stream 5 (backend stream 3, above the GOAWAY) went out again
    // on another connection.
    let retried = h
        .conns
        .iter()
        .filter(|(id, _)| *id != ba)
        .map(|(id, _)| {
            h.core
                .backends
                .get(id)
                .map_or(0, |be| be.streams.values().filter(|bs| bs.sid == 5).count())
        })
        .sum::<usize>();
    assert_eq!(
        retried, 1,
        "client stream 5 is open on exactly one other backend"
    );
}

#[test]
fn request_bytes_are_credited_back_only_once_the_backend_took_them() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = h.client();
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(c, headers(1, REQ_PLAIN, false));
    let b = h.backend(h.eps[0].addr);
    // The backend's stream window is 10 bytes.
    let mut s = BytesMut::new();
    frame::settings(&mut s, &[(setting::INITIAL_WINDOW_SIZE, 10)]);
    h.feed_backend(b, s);
    let _ = h.out(b);
    let body = vec![b'x'; 600 * 1024];
    for chunk in body.chunks(16_384) {
        h.feed(c, frame_bytes(frame::DATA, 0, 1, chunk));
    }
    let sent: usize = h
        .out(b)
        .iter()
        .filter(|f| f.kind == frame::DATA)
        .map(|f| f.payload.len())
        .sum();
    assert_eq!(sent, 10, "only the backend's window");
    // No stream credit for the client yet (only 10 bytes went on).
    assert!(
        h.out(c)
            .iter()
            .all(|f| !(f.kind == frame::WINDOW_UPDATE && f.stream == 1))
    );
    // The backend opens the stream's window: the connection's (65,535 by
    // default) limits next.
    h.feed_backend(
        b,
        frame_bytes(frame::WINDOW_UPDATE, 0, 1, &(1u32 << 20).to_be_bytes()),
    );
    let sent: usize = h
        .out(b)
        .iter()
        .filter(|f| f.kind == frame::DATA)
        .map(|f| f.payload.len())
        .sum();
    assert_eq!(sent, 65_535 - 10);
    // Then the connection's: the rest flows, and the client gets its
    // window back.
    h.feed_backend(
        b,
        frame_bytes(frame::WINDOW_UPDATE, 0, 0, &(1u32 << 20).to_be_bytes()),
    );
    // The output is taken in turns of at most SOFT_OUT_LIMIT.
    let mut sent = 0;
    loop {
        let n: usize = h
            .out(b)
            .iter()
            .filter(|f| f.kind == frame::DATA)
            .map(|f| f.payload.len())
            .sum();
        if n == 0 {
            break;
        }
        assert!(n <= SOFT_OUT_LIMIT + 16_384, "{n}");
        sent += n;
    }
    assert_eq!(sent, body.len() - 65_535);
    assert!(
        h.out(c)
            .iter()
            .any(|f| f.kind == frame::WINDOW_UPDATE && f.stream == 1)
    );
}

#[test]
fn protocol_errors_are_connection_errors_with_the_right_code() {
    let cases: [(&str, BytesMut, u32); 5] = [
        (
            "DATA on stream 0",
            frame_bytes(frame::DATA, 0, 0, b"x"),
            Reason::PROTOCOL_ERROR.code(),
        ),
        (
            "even stream id",
            headers(2, REQ_PLAIN, true),
            Reason::PROTOCOL_ERROR.code(),
        ),
        (
            "PING of 4 bytes",
            frame_bytes(frame::PING, 0, 0, &[0; 4]),
            Reason::FRAME_SIZE_ERROR.code(),
        ),
        (
            "WINDOW_UPDATE of 0",
            frame_bytes(frame::WINDOW_UPDATE, 0, 0, &[0; 4]),
            Reason::PROTOCOL_ERROR.code(),
        ),
        (
            "CONTINUATION without HEADERS",
            frame_bytes(frame::CONTINUATION, 4, 1, &[0x82]),
            Reason::PROTOCOL_ERROR.code(),
        ),
    ];
    for (name, bytes, want) in cases {
        let mut h = H::new(1, Algorithm::RoundRobin);
        let c = h.client();
        h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
        h.feed(c, bytes);
        let out = h.out(c);
        let g = out
            .iter()
            .find(|f| f.kind == frame::GOAWAY)
            .unwrap_or_else(|| panic!("{name}: no GOAWAY in {out:?}"));
        assert_eq!(u32_at(&g.payload, 4), want, "{name}");
        assert!(!h.core.client_reading(c), "{name}: still reading");
    }
}

#[test]
fn a_client_that_does_not_read_does_not_stall_others_on_the_backend() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    // Client A: stream windows of 0, so nothing of its responses can go out.
    let a = h.client();
    let mut s = BytesMut::new();
    frame::settings(&mut s, &[(setting::INITIAL_WINDOW_SIZE, 0)]);
    s.extend_from_slice(&frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(a, s);
    let streams: Vec<u32> = (0..MAX_CLIENT_STREAMS).map(|i| 1 + 2 * i).collect();
    for sid in &streams {
        h.feed(a, headers(*sid, REQ_PLAIN, true));
    }
    let b = h.backend(h.eps[0].addr);
    let mut s = BytesMut::new();
    frame::settings(&mut s, &[(setting::MAX_CONCURRENT_STREAMS, 1000)]);
    h.feed_backend(b, s);
    let mut granted: i64 = 0;
    let mut count_grants = |fs: &[F]| {
        for f in fs {
            if f.kind == frame::WINDOW_UPDATE && f.stream == 0 {
                granted += i64::from(u32_at(&f.payload, 0));
            }
        }
    };
    count_grants(&h.out(b));
    // The backend answers each of A's streams with the window it has (the
    // floor: A's budget is spent), 256 x 16 KiB in all.
    let mut sent: i64 = 0;
    // Backend stream ids follow the order the HEADERS went out: 1, 3, 5...
    for bid in streams {
        h.feed_backend(b, headers(bid, RESP_200, false));
        h.feed_backend(
            b,
            frame_bytes(frame::DATA, 0, bid, &[7; BACKEND_INITIAL_WINDOW as usize]),
        );
        sent += BACKEND_INITIAL_WINDOW;
        count_grants(&h.out(b));
    }
    // Every byte was credited to the connection on arrival (the backend
    // could go on sending), though A read none of it.
    assert!(
        granted - (BACKEND_CONN_WINDOW - frame::DEFAULT_WINDOW) >= sent - BACKEND_CONN_WINDOW / 4,
        "granted {granted}, sent {sent}"
    );
    // What A makes the router hold: its streams' floors.
    assert_eq!(h.core.client_held(a), sent);
    // Client B's stream on the same backend connection is answered.
    let c = h.client();
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(c, headers(1, REQ_PLAIN, true));
    let bid = h
        .out(b)
        .iter()
        .find(|f| f.kind == frame::HEADERS)
        .map(|f| f.stream)
        .expect("B's request went to the backend");
    h.feed_backend(b, headers(bid, RESP_200, false));
    h.feed_backend(
        b,
        frame_bytes(frame::DATA, frame::FLAG_END_STREAM, bid, b"for B"),
    );
    let got = h.out(c);
    assert!(
        got.iter()
            .any(|f| f.kind == frame::DATA && f.stream == 1 && f.payload == b"for B"),
        "{got:?}"
    );
    // And A got its response headers, but no data (its windows are 0).
    assert!(h.out(a).iter().all(|f| f.kind != frame::DATA));
    // Once A is gone, nothing of it is held.
    h.core.client_gone(a);
    h.core.forget(a);
    assert_eq!(h.core.held(), 0);
}

#[test]
fn an_idle_connection_to_a_removed_endpoint_is_closed() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = h.client();
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(c, headers(1, REQ_PLAIN, true));
    let b = h.backend(h.eps[0].addr);
    h.feed_backend(b, headers(1, RESP_200, true));
    let _ = h.out(b);
    // Still pooled while the endpoint is in a service.
    h.core.sweep();
    assert!(h.core.backend_reading(b));
    // It left every service: the next sweep says GOAWAY and closes.
    h.eps[0]
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    h.core.sweep();
    let mut buf = BytesMut::new();
    assert_eq!(h.core.take_out(b, &mut buf), Some(true), "to be closed");
    assert!(parse(&buf).iter().any(|f| f.kind == frame::GOAWAY));
}
