//! A pod connection lost after a stream reached its pod: what the client
//! sees must be what it would see at L4 when its connection dies. gRPC
//! clients see UNAVAILABLE (retryable), not INTERNAL.

use super::*;

/// POST /svc/M, a literal authority, `content-type: application/grpc`,
/// `te: trailers`.
pub(super) const REQ_GRPC: &[u8] = &[
    0x83, 0x86, 0x04, 0x06, b'/', b's', b'v', b'c', b'/', b'M', 0x01, 0x01, b'a', 0x0f, 0x10, 16,
    b'a', b'p', b'p', b'l', b'i', b'c', b'a', b't', b'i', b'o', b'n', b'/', b'g', b'r', b'p', b'c',
    0x00, 0x02, b't', b'e', 0x08, b't', b'r', b'a', b'i', b'l', b'e', b'r', b's',
];

fn decoded(f: &F) -> Vec<(Vec<u8>, Vec<u8>)> {
    loona_hpack::Decoder::new()
        .decode(&f.payload)
        .expect("the router's block decodes")
}

fn field<'a>(list: &'a [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    list.iter()
        .find(|(n, _)| n == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

/// A client with one request on a pod connection; returns the client and
/// the pod connection.
fn one_stream(h: &mut H, block: &[u8], end: bool) -> (ConnId, ConnId) {
    let c = h.client();
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(c, headers(1, block, end));
    let b = h.backend(h.eps[0].addr);
    let sent = h.out(b);
    assert!(sent.iter().any(|f| f.kind == frame::HEADERS), "{sent:?}");
    (c, b)
}

#[test]
fn a_grpc_stream_whose_pod_connection_dies_before_its_response_ends_unavailable() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let (c, b) = one_stream(&mut h, REQ_GRPC, true);
    h.core.backend_eof(b);
    h.pump_io();
    let out = h.out(c);
    let end = out
        .iter()
        .find(|f| f.kind == frame::HEADERS && f.stream == 1)
        .unwrap_or_else(|| panic!("a Trailers-Only answer: {out:?}"));
    assert_ne!(end.flags & frame::FLAG_END_STREAM, 0, "it ends the stream");
    let list = decoded(end);
    assert_eq!(field(&list, ":status"), Some(&b"200"[..]), "{list:?}");
    assert_eq!(field(&list, "content-type"), Some(&b"application/grpc"[..]));
    assert_eq!(field(&list, "grpc-status"), Some(&b"14"[..]), "UNAVAILABLE");
    assert!(
        !out.iter().any(|f| f.kind == frame::RST_STREAM),
        "its request had ended: no reset after the answer: {out:?}"
    );
}

#[test]
fn a_grpc_stream_whose_pod_connection_dies_mid_response_gets_unavailable_trailers_after_its_data() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    // A bidi stream: the request is still open.
    let (c, b) = one_stream(&mut h, REQ_GRPC, false);
    h.feed_backend(b, headers(1, RESP_200, false));
    h.feed_backend(b, frame_bytes(frame::DATA, 0, 1, b"\0\0\0\0\x02hi"));
    h.core.backend_eof(b);
    h.pump_io();
    let out = h.out(c);
    let kinds: Vec<(u8, u8)> = out
        .iter()
        .filter(|f| f.stream == 1)
        .map(|f| (f.kind, f.flags & frame::FLAG_END_STREAM))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (frame::HEADERS, 0),
            (frame::DATA, 0),
            (frame::HEADERS, frame::FLAG_END_STREAM),
            (frame::RST_STREAM, 0),
        ],
        "the response, then trailers, then NO_ERROR for the unfinished request: {out:?}"
    );
    let trailers = decoded(
        &out.iter()
            .filter(|f| f.kind == frame::HEADERS)
            .nth(1)
            .expect("trailers")
            .clone(),
    );
    assert_eq!(field(&trailers, "grpc-status"), Some(&b"14"[..]));
    assert_eq!(
        field(&trailers, ":status"),
        None,
        "trailers carry no status"
    );
    let rst = out
        .iter()
        .find(|f| f.kind == frame::RST_STREAM)
        .expect("rst");
    assert_eq!(u32_at(&rst.payload, 0), Reason::NO_ERROR.code());
}

#[test]
fn a_plain_http2_stream_whose_pod_connection_dies_is_reset() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let (c, b) = one_stream(&mut h, REQ_PLAIN, true);
    h.core.backend_eof(b);
    h.pump_io();
    let out = h.out(c);
    let rst = out
        .iter()
        .find(|f| f.kind == frame::RST_STREAM && f.stream == 1)
        .unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(u32_at(&rst.payload, 0), Reason::INTERNAL_ERROR.code());
}
