//! Large metadata (issue 18): gRPC metadata of up to Envoy's 60 KiB list
//! reaches the pod intact; a list over our limit, or over the limit its
//! pod advertised, is refused on its stream alone as a gRPC server would
//! (Trailers-Only `grpc-status: 8`, or 431 for other requests), and the
//! connection goes on; a bomb still ends the connection.

use super::{
    h2spec::{backend_frames, goaway_code, ready, rst_code},
    *,
};
use crate::core::client::{HEADER_LIST_BOMB, UNSETTLED_HEADER_LIST};

/// An HPACK integer with an `n`-bit prefix, first byte `flags | ...`.
fn int(out: &mut Vec<u8>, flags: u8, n: u8, mut v: usize) {
    let mask = (1usize << n) - 1;
    if v < mask {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | mask as u8);
    v -= mask;
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A string literal, Huffman-coded or not.
fn string(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
    if huffman {
        let mut h = Vec::new();
        crate::huffman::encode(s, &mut h);
        int(out, 0x80, 7, h.len());
        out.extend_from_slice(&h);
    } else {
        int(out, 0, 7, s.len());
        out.extend_from_slice(s);
    }
}

/// A literal field without indexing, with a literal name.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8], huffman: bool) {
    out.push(0x00);
    string(out, name, huffman);
    string(out, value, huffman);
}

/// A token of `len` base64-like bytes (what JWTs and baggage look like).
fn token(len: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = fastrand::Rng::with_seed(len as u64);
    (0..len)
        .map(|_| ALPHABET[rng.usize(..ALPHABET.len())])
        .collect()
}

/// A request (POST for gRPC, with its content-type) carrying one
/// `x-token` field of `value`.
fn request(grpc: bool, value: &[u8], huffman: bool) -> Vec<u8> {
    // :method POST, :scheme http, :path /, :authority a.
    let mut b = vec![0x83, 0x86, 0x84, 0x01, 0x01, b'a'];
    if grpc {
        // content-type (static name 31): application/grpc.
        b.extend_from_slice(&[0x0f, 0x10]);
        string(&mut b, b"application/grpc", huffman);
        field(&mut b, b"te", b"trailers", huffman);
    }
    field(&mut b, b"x-token", value, huffman);
    b
}

/// The decoded list of a block the router wrote.
fn decode(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    hpack::check_self_contained(block).expect("self-contained");
    loona_hpack::Decoder::new().decode(block).expect("decodes")
}

/// The header blocks in `frames`, by stream: HEADERS and its
/// CONTINUATIONs put together.
fn blocks(frames: &[F]) -> Vec<(u32, u8, Vec<u8>)> {
    let mut out: Vec<(u32, u8, Vec<u8>)> = Vec::new();
    for f in frames {
        match f.kind {
            frame::HEADERS => out.push((f.stream, f.flags, f.payload.clone())),
            frame::CONTINUATION => {
                let last = out.last_mut().expect("CONTINUATION after HEADERS");
                assert_eq!(last.0, f.stream);
                last.2.extend_from_slice(&f.payload);
            }
            _ => {}
        }
    }
    out
}

fn str_pairs(list: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    list.iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// The router's answer on `sid` is a whole refusal: one header block with
/// END_STREAM, `grpc-status: 8` (Trailers-Only) or `:status 431`.
fn assert_refused(out: &[F], sid: u32, grpc: bool) {
    let answers: Vec<_> = blocks(out)
        .into_iter()
        .filter(|(s, _, _)| *s == sid)
        .collect();
    assert_eq!(answers.len(), 1, "{out:?}");
    let (_, flags, block) = &answers[0];
    assert_ne!(
        flags & frame::FLAG_END_STREAM,
        0,
        "the answer ends the stream"
    );
    let list = decode(block);
    if grpc {
        assert_eq!(
            list[..3],
            str_pairs(&[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "8"),
            ])[..],
            "{list:?}"
        );
        assert_eq!(list.len(), 4);
        assert_eq!(list[3].0, b"grpc-message");
        let message = String::from_utf8(list[3].1.clone()).expect("text");
        assert!(
            message
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'%'),
            "grpc-message needs no percent-encoding: {message}"
        );
    } else {
        assert_eq!(list, str_pairs(&[(":status", "431")]));
    }
    assert_eq!(goaway_code(out), None, "the connection stays up");
}

/// A small request on `sid` is served on the same connection.
fn served(h: &mut H, c: ConnId, sid: u32) {
    h.feed(c, headers(sid, REQ_PLAIN, true));
    let sent = h
        .conns
        .clone()
        .into_iter()
        .find_map(|(b, _)| {
            blocks(&h.out(b))
                .first()
                .map(|(bid, _, block)| (b, *bid, block.clone()))
        })
        .expect("the request reached a pod");
    // (Re-encoded as literals if the client has not ACKed our SETTINGS.)
    assert_eq!(decode(&sent.2), decode(REQ_PLAIN));
    h.feed_backend(sent.0, headers(sent.1, RESP_200, true));
    let out = h.out(c);
    assert!(
        out.iter()
            .any(|f| f.kind == frame::HEADERS && f.stream == sid && f.payload == RESP_200),
        "{out:?}"
    );
    assert!(h.core.client_reading(c));
}

#[test]
fn we_advertise_a_header_list_of_at_least_envoys_60_kib() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = h.core.add_client(VIP.parse().expect("vip"));
    let out = h.out(c);
    let settings = &out[0].payload;
    let advertised = settings
        .chunks_exact(6)
        .find(|s| u16::from_be_bytes([s[0], s[1]]) == setting::MAX_HEADER_LIST_SIZE)
        .map(|s| u32_at(s, 2) as usize);
    assert_eq!(advertised, Some(MAX_HEADER_LIST));
    const { assert!(MAX_HEADER_LIST >= 60 * 1024) };
}

#[test]
fn metadata_of_1_9_40_and_60_kib_reaches_the_pod_intact() {
    for kib in [1, 9, 40, 60] {
        // The value leaves room for the rest of the list within 60 KiB.
        let value = token(kib * 1024 - 512);
        // Before the client's ACK of our SETTINGS (where a gRPC client
        // sends its first request, re-encoded by the router) and after
        // (forwarded as it is); Huffman-coded, as clients send it, or not.
        for (acked, huffman) in [(true, false), (true, true), (false, false), (false, true)] {
            let name = format!("{kib} KiB, acked {acked}, huffman {huffman}");
            let mut h = H::new(1, Algorithm::RoundRobin);
            let c = if acked {
                ready(&mut h)
            } else {
                let c = h.client();
                let _ = h.out(c);
                c
            };
            let block = request(true, &value, huffman);
            h.feed(c, headers(1, &block, false));
            h.feed(
                c,
                frame_bytes(frame::DATA, frame::FLAG_END_STREAM, 1, b"\0\0\0\0\0"),
            );
            let b = h.backend(h.eps[0].addr);
            let sent = h.out(b);
            let got = blocks(&sent);
            assert_eq!(got.len(), 1, "{name}");
            if acked {
                assert_eq!(got[0].2, block, "{name}: forwarded as it is");
            }
            let list = decode(&got[0].2);
            assert!(
                list.contains(&(b"x-token".to_vec(), value.clone())),
                "{name}: the token arrived whole"
            );
            assert!(
                sent.iter()
                    .any(|f| f.kind == frame::DATA && f.flags & frame::FLAG_END_STREAM != 0),
                "{name}"
            );
            // The pod's answer reaches the client.
            h.feed_backend(b, headers(1, RESP_200, true));
            let out = h.out(c);
            assert!(
                out.iter()
                    .any(|f| f.kind == frame::HEADERS && f.stream == 1 && f.payload == RESP_200),
                "{name}: {out:?}"
            );
            assert_eq!(goaway_code(&out), None, "{name}");
            assert_eq!(rst_code(&out, 1), None, "{name}");
        }
    }
}

#[test]
fn a_70_kib_list_is_refused_on_its_stream_and_the_connection_serves_the_next() {
    let value = token(70 * 1024);
    for grpc in [true, false] {
        for acked in [true, false] {
            for end in [true, false] {
                let name = format!("grpc {grpc}, acked {acked}, END_STREAM {end}");
                let mut h = H::new(1, Algorithm::RoundRobin);
                let c = if acked {
                    ready(&mut h)
                } else {
                    let c = h.client();
                    let _ = h.out(c);
                    c
                };
                h.feed(c, headers(1, &request(grpc, &value, false), end));
                let out = h.out(c);
                assert_refused(&out, 1, grpc);
                // A request the client had not ended is reset with
                // NO_ERROR after the answer (RFC 9113 8.1).
                assert_eq!(
                    rst_code(&out, 1),
                    (!end).then_some(Reason::NO_ERROR.code()),
                    "{name}"
                );
                assert_eq!(
                    backend_frames(&mut h),
                    vec![],
                    "{name}: nothing reached a pod"
                );
                if !end {
                    // The rest of the request is dropped quietly.
                    h.feed(
                        c,
                        frame_bytes(frame::DATA, frame::FLAG_END_STREAM, 1, b"rest"),
                    );
                    let out = h.out(c);
                    assert_eq!(goaway_code(&out), None, "{name}");
                    assert_eq!(rst_code(&out, 1), None, "{name}");
                }
                served(&mut h, c, 3);
            }
        }
    }
}

#[test]
fn request_trailers_over_our_limit_reset_only_their_stream() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    h.feed(c, headers(1, &request(true, b"small", false), false));
    let _ = backend_frames(&mut h);
    let mut trailers = Vec::new();
    field(&mut trailers, b"x-trailer", &token(70 * 1024), false);
    h.feed(c, headers(1, &trailers, true));
    let out = h.out(c);
    assert_eq!(
        rst_code(&out, 1),
        Some(Reason::ENHANCE_YOUR_CALM.code()),
        "{out:?}"
    );
    assert_eq!(goaway_code(&out), None);
    let sent = backend_frames(&mut h);
    assert!(sent.iter().all(|f| f.kind != frame::HEADERS), "{sent:?}");
    served(&mut h, c, 3);
}

/// A pod whose SETTINGS are fed by hand: `limit` as its
/// SETTINGS_MAX_HEADER_LIST_SIZE.
fn pod_settings(h: &mut H, b: ConnId, limit: u32) {
    let mut s = BytesMut::new();
    frame::settings(&mut s, &[(setting::MAX_HEADER_LIST_SIZE, limit)]);
    h.feed_backend(b, s);
}

#[test]
fn a_pod_that_advertises_16_kib_never_receives_a_20_kib_list() {
    let big = token(20 * 1024);
    for grpc in [true, false] {
        let mut h = H::new(1, Algorithm::RoundRobin);
        // The pod's SETTINGS come only when the test says.
        h.silent = Some(h.eps[0].addr);
        let c = ready(&mut h);
        // Before its SETTINGS: the small request goes at once, the big one
        // waits for them.
        h.feed(c, headers(1, &request(grpc, &big, false), true));
        h.feed(c, headers(3, REQ_PLAIN, true));
        let b = h.backend(h.eps[0].addr);
        let sent = blocks(&h.out(b));
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].2, REQ_PLAIN);
        assert!(h.out(c).iter().all(|f| f.stream != 1));
        // It says 16 KiB: the big request is answered by the router.
        pod_settings(&mut h, b, 16_384);
        assert_refused(&h.out(c), 1, grpc);
        let sent = h.out(b);
        assert!(sent.iter().all(|f| f.kind != frame::HEADERS), "{sent:?}");
        // Once its limit is known, a big request is refused at once.
        h.feed(c, headers(5, &request(grpc, &big, false), false));
        let out = h.out(c);
        assert_refused(&out, 5, grpc);
        assert_eq!(rst_code(&out, 5), Some(Reason::NO_ERROR.code()));
        let sent = h.out(b);
        assert!(sent.iter().all(|f| f.kind != frame::HEADERS), "{sent:?}");
        // The small request is answered on the same connection, and the
        // next one too.
        h.feed_backend(b, headers(1, RESP_200, true));
        let out = h.out(c);
        assert!(
            out.iter()
                .any(|f| f.kind == frame::HEADERS && f.stream == 3 && f.payload == RESP_200),
            "{out:?}"
        );
        served(&mut h, c, 7);
        // Refusals are not the pod's failures, and hold nothing.
        assert_eq!(
            h.eps[0]
                .outstanding
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert_eq!(h.core.client_streams(c), 0);
        assert_eq!(h.core.held(), 0);
    }
}

#[test]
fn a_big_request_waits_for_the_pods_settings_and_goes_within_its_limit() {
    let big = token(20 * 1024);
    assert!(big.len() > UNSETTLED_HEADER_LIST);
    let mut h = H::new(1, Algorithm::RoundRobin);
    h.silent = Some(h.eps[0].addr);
    let c = ready(&mut h);
    h.feed(c, headers(1, &request(true, &big, false), true));
    let b = h.backend(h.eps[0].addr);
    assert_eq!(blocks(&h.out(b)), vec![]);
    // 32 KiB: it fits.
    pod_settings(&mut h, b, 32_768);
    let sent = blocks(&h.out(b));
    assert_eq!(sent.len(), 1);
    assert!(decode(&sent[0].2).contains(&(b"x-token".to_vec(), big.clone())));
    // A pod that names no limit takes every list we take.
    let mut h = H::new(1, Algorithm::RoundRobin);
    h.silent = Some(h.eps[0].addr);
    let c = ready(&mut h);
    h.feed(
        c,
        headers(1, &request(false, &token(60 * 1024), false), true),
    );
    let b = h.backend(h.eps[0].addr);
    assert_eq!(blocks(&h.out(b)), vec![]);
    h.feed_backend(b, {
        let mut s = BytesMut::new();
        frame::settings(&mut s, &[]);
        s
    });
    assert_eq!(blocks(&h.out(b)).len(), 1);
    assert!(h.out(c).iter().all(|f| f.stream != 1));
}

#[test]
fn an_hpack_bomb_still_ends_the_connection() {
    // Static references: one byte of block for 60 bytes of list
    // (accept-encoding: gzip, deflate), just over our limit from 1.1 KiB,
    // and one frame's worth (16 KiB for almost 1 MiB).
    for n in [MAX_HEADER_LIST / 60 + 1, 16_000] {
        let mut h = H::new(1, Algorithm::RoundRobin);
        let c = ready(&mut h);
        let mut block = REQ_PLAIN.to_vec();
        block.extend(std::iter::repeat_n(0x90, n));
        h.feed(c, headers(1, &block, true));
        let out = h.out(c);
        assert_eq!(
            goaway_code(&out),
            Some(Reason::ENHANCE_YOUR_CALM.code()),
            "{n}: {out:?}"
        );
        assert!(!h.core.client_reading(c));
        assert_eq!(backend_frames(&mut h), vec![]);
    }
    // Literals (no expansion) beyond twice our limit.
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    let block = request(true, &token(HEADER_LIST_BOMB), false);
    h.feed(c, headers(1, &block, true));
    assert_eq!(
        goaway_code(&h.out(c)),
        Some(Reason::ENHANCE_YOUR_CALM.code())
    );
}
