//! One test per h2spec 2.6.0 case that failed through the router while it
//! passed against nghttpd (issue 8), named after the case, so CI guards
//! what h2spec (run by hand, not part of the repository) found.

use super::*;

/// A client that ACKed our SETTINGS (as h2spec does before its cases).
pub(super) fn ready(h: &mut H) -> ConnId {
    let c = h.client();
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    let _ = h.out(c);
    c
}

/// The code of the RST_STREAM on `sid`, if any.
pub(super) fn rst_code(out: &[F], sid: u32) -> Option<u32> {
    out.iter()
        .find(|f| f.kind == frame::RST_STREAM && f.stream == sid)
        .map(|f| u32_at(&f.payload, 0))
}

/// The code of the GOAWAY, if any.
pub(super) fn goaway_code(out: &[F]) -> Option<u32> {
    out.iter()
        .find(|f| f.kind == frame::GOAWAY)
        .map(|f| u32_at(&f.payload, 4))
}

/// h2spec accepts a stream error or a connection error of `code`.
fn stream_or_conn_error(out: &[F], sid: u32, code: Reason) {
    let got = rst_code(out, sid).or_else(|| goaway_code(out));
    assert_eq!(got, Some(code.code()), "{out:?}");
}

/// Frames written to every backend connection so far.
pub(super) fn backend_frames(h: &mut H) -> Vec<F> {
    let ids: Vec<ConnId> = h.conns.iter().map(|(id, _)| *id).collect();
    ids.into_iter().flat_map(|b| h.out(b)).collect()
}

/// The pod connection and stream id of the next request the router sent
/// to a pod (reading every pod connection's output).
pub(super) fn next_request(h: &mut H) -> (ConnId, u32) {
    h.conns
        .clone()
        .into_iter()
        .find_map(|(b, _)| {
            h.out(b)
                .into_iter()
                .find(|f| f.kind == frame::HEADERS)
                .map(|f| (b, f.stream))
        })
        .expect("the request reached a pod")
}

/// A request on `sid` answered whole by the backend.
fn answered(h: &mut H, c: ConnId, sid: u32, end_request: bool) -> ConnId {
    h.feed(c, headers(sid, REQ_PLAIN, end_request));
    let (b, bid) = next_request(h);
    h.feed_backend(b, headers(bid, RESP_200, false));
    h.feed_backend(
        b,
        frame_bytes(frame::DATA, frame::FLAG_END_STREAM, bid, b"ok"),
    );
    b
}

#[test]
fn http2_5_1_5_data_on_a_half_closed_remote_stream_before_the_response() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    h.feed(c, headers(1, REQ_PLAIN, true));
    h.feed(c, frame_bytes(frame::DATA, 0, 1, b"late"));
    stream_or_conn_error(&h.out(c), 1, Reason::STREAM_CLOSED);
    // Nothing of it reached the backend, which only saw the cancel.
    let sent = backend_frames(&mut h);
    assert!(sent.iter().all(|f| f.kind != frame::DATA), "{sent:?}");
}

#[test]
fn http2_5_1_5_data_on_a_half_closed_remote_stream_after_the_response() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    answered(&mut h, c, 1, true);
    let _ = h.out(c);
    assert_eq!(h.core.client_streams(c), 0, "the stream is over");
    h.feed(c, frame_bytes(frame::DATA, 0, 1, b"late"));
    stream_or_conn_error(&h.out(c), 1, Reason::STREAM_CLOSED);
}

#[test]
fn http2_5_1_8_data_after_the_clients_own_rst_stream() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    h.feed(c, headers(1, REQ_PLAIN, false));
    h.feed(
        c,
        frame_bytes(
            frame::RST_STREAM,
            0,
            1,
            &Reason::CANCEL.code().to_be_bytes(),
        ),
    );
    h.feed(c, frame_bytes(frame::DATA, 0, 1, b"after reset"));
    stream_or_conn_error(&h.out(c), 1, Reason::STREAM_CLOSED);
}

#[test]
fn http2_5_1_11_data_on_a_closed_stream() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    answered(&mut h, c, 1, true);
    let _ = h.out(c);
    h.feed(c, frame_bytes(frame::DATA, frame::FLAG_END_STREAM, 1, b"x"));
    stream_or_conn_error(&h.out(c), 1, Reason::STREAM_CLOSED);
}

#[test]
fn http2_5_1_12_headers_on_a_closed_stream() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    answered(&mut h, c, 1, true);
    let _ = h.out(c);
    h.feed(c, headers(1, REQ_PLAIN, true));
    assert_eq!(goaway_code(&h.out(c)), Some(Reason::STREAM_CLOSED.code()));
    // It was not served again.
    assert!(
        backend_frames(&mut h)
            .iter()
            .all(|f| f.kind != frame::HEADERS)
    );
}

#[test]
fn a_late_frame_on_a_stream_the_router_reset_is_ignored() {
    // The other side of 5.1: frames in flight when our RST_STREAM left are
    // not errors (here: the request had no endpoint, so it was refused).
    let mut h = H::new(0, Algorithm::RoundRobin);
    let c = ready(&mut h);
    h.feed(c, headers(1, REQ_PLAIN, false));
    assert_eq!(rst_code(&h.out(c), 1), Some(Reason::REFUSED_STREAM.code()));
    h.feed(c, frame_bytes(frame::DATA, frame::FLAG_END_STREAM, 1, b"x"));
    let out = h.out(c);
    assert!(out.is_empty() || goaway_code(&out).is_none(), "{out:?}");
    assert!(h.core.client_reading(c));
}

#[test]
fn http2_5_3_1_1_headers_that_depend_on_their_own_stream() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    // HEADERS with PRIORITY: stream 1 depends on stream 1.
    let mut p = vec![0, 0, 0, 1, 16];
    p.extend_from_slice(REQ_PLAIN);
    h.feed(
        c,
        frame_bytes(
            frame::HEADERS,
            frame::FLAG_END_HEADERS | frame::FLAG_END_STREAM | frame::FLAG_PRIORITY,
            1,
            &p,
        ),
    );
    stream_or_conn_error(&h.out(c), 1, Reason::PROTOCOL_ERROR);
    assert!(
        backend_frames(&mut h)
            .iter()
            .all(|f| f.kind != frame::HEADERS)
    );
    // The connection goes on: the next stream is served.
    h.feed(c, headers(3, REQ_PLAIN, true));
    assert!(
        backend_frames(&mut h)
            .iter()
            .any(|f| f.kind == frame::HEADERS)
    );
}

#[test]
fn http2_5_3_1_2_priority_that_depends_on_its_own_stream() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    h.feed(c, frame_bytes(frame::PRIORITY, 0, 1, &[0, 0, 0, 1, 16]));
    stream_or_conn_error(&h.out(c), 1, Reason::PROTOCOL_ERROR);
    // And on an open stream: that stream alone is reset.
    h.feed(c, headers(3, REQ_PLAIN, false));
    h.feed(c, frame_bytes(frame::PRIORITY, 0, 3, &[0, 0, 0, 3, 16]));
    let out = h.out(c);
    assert_eq!(
        rst_code(&out, 3),
        Some(Reason::PROTOCOL_ERROR.code()),
        "{out:?}"
    );
    assert_eq!(goaway_code(&out), None);
}

#[test]
fn http2_6_9_1_3_a_stream_window_raised_above_the_maximum_resets_that_stream_only() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    h.feed(c, headers(1, REQ_PLAIN, true));
    h.feed(c, headers(3, REQ_PLAIN, true));
    let _ = backend_frames(&mut h);
    h.feed(
        c,
        frame_bytes(frame::WINDOW_UPDATE, 0, 1, &0x7fff_ffffu32.to_be_bytes()),
    );
    let out = h.out(c);
    assert_eq!(
        rst_code(&out, 1),
        Some(Reason::FLOW_CONTROL_ERROR.code()),
        "{out:?}"
    );
    assert_eq!(goaway_code(&out), None, "the other streams live on");
    assert_eq!(h.core.client_streams(c), 1);
    // The backend was told to stop the reset stream.
    let sent = backend_frames(&mut h);
    assert!(sent.iter().any(|f| f.kind == frame::RST_STREAM), "{sent:?}");
}

/// A request with one more field, `x`, whose value is `huffman` as sent
/// (Huffman-coded, RFC 7541 5.2).
pub(super) fn request_with_huffman_value(huffman: &[u8]) -> Vec<u8> {
    let mut b = REQ_PLAIN.to_vec();
    b.extend_from_slice(&[0x00, 0x01, b'x', 0x80 | huffman.len() as u8]);
    b.extend_from_slice(huffman);
    b
}

fn a_bad_huffman_string_is_a_compression_error(case: &str, huffman: &[u8]) {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let other = ready(&mut h);
    // Another client's stream is open on the pod's connection.
    h.feed(other, headers(1, REQ_PLAIN, true));
    let _ = backend_frames(&mut h);
    let c = ready(&mut h);
    h.feed(c, headers(1, &request_with_huffman_value(huffman), true));
    assert_eq!(
        goaway_code(&h.out(c)),
        Some(Reason::COMPRESSION_ERROR.code()),
        "{case}"
    );
    // Not a byte of it reached the shared connection.
    assert_eq!(backend_frames(&mut h), vec![], "{case}");
    assert_eq!(h.core.client_streams(other), 1, "{case}");
}

#[test]
fn hpack_5_2_1_huffman_padding_longer_than_7_bits() {
    // "a" (00011) and 11 bits of padding.
    a_bad_huffman_string_is_a_compression_error("5.2/1", &[0x1f, 0xff]);
}

#[test]
fn hpack_5_2_2_huffman_padding_not_all_ones() {
    // "a" (00011) padded with 000.
    a_bad_huffman_string_is_a_compression_error("5.2/2", &[0x18]);
}

#[test]
fn hpack_5_2_3_huffman_string_containing_eos() {
    // EOS (30 ones), then 2 bits of padding.
    a_bad_huffman_string_is_a_compression_error("5.2/3", &[0xff, 0xff, 0xff, 0xff]);
}

#[test]
fn malformed_requests_are_stream_errors_that_never_reach_a_pod() {
    // RFC 9113 8.2-8.3, as h2spec's http2/8.1.2 cases send them.
    let cases: [(&str, Vec<u8>); 6] = [
        ("uppercase field name", {
            let mut b = REQ_PLAIN.to_vec();
            b.extend_from_slice(&[0x00, 0x01, b'X', 0x01, b'y']);
            b
        }),
        ("connection-specific field", {
            let mut b = REQ_PLAIN.to_vec();
            b.extend_from_slice(&[0x00, 0x0a]);
            b.extend_from_slice(b"connection");
            b.extend_from_slice(&[0x05]);
            b.extend_from_slice(b"close");
            b
        }),
        ("te other than trailers", {
            let mut b = REQ_PLAIN.to_vec();
            b.extend_from_slice(&[0x00, 0x02, b't', b'e', 0x04]);
            b.extend_from_slice(b"gzip");
            b
        }),
        ("no :path", vec![0x82, 0x86, 0x01, 0x01, b'a']),
        ("pseudo-header after a regular field", {
            let mut b = vec![0x82, 0x86, 0x00, 0x01, b'x', 0x01, b'y'];
            b.push(0x84);
            b
        }),
        ("response pseudo-header in a request", {
            let mut b = REQ_PLAIN.to_vec();
            b.push(0x88);
            b
        }),
    ];
    for (name, block) in cases {
        let mut h = H::new(1, Algorithm::RoundRobin);
        let c = ready(&mut h);
        h.feed(c, headers(1, &block, true));
        let out = h.out(c);
        assert_eq!(
            rst_code(&out, 1),
            Some(Reason::PROTOCOL_ERROR.code()),
            "{name}: {out:?}"
        );
        assert_eq!(goaway_code(&out), None, "{name}");
        assert_eq!(backend_frames(&mut h), vec![], "{name}");
        // The connection serves the next request.
        h.feed(c, headers(3, REQ_PLAIN, true));
        assert!(
            backend_frames(&mut h)
                .iter()
                .any(|f| f.kind == frame::HEADERS),
            "{name}"
        );
    }
}

#[test]
fn a_field_over_our_list_limit_is_refused_with_431_on_that_stream() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    // One 70 KiB value, over our list limit (a 9 KiB one, beyond nginx's
    // field limit, was refused too while pod connections were shared).
    // 71,680 = 127 + 71,553: the HPACK integer 0x7f, 0x81, 0xaf, 0x04.
    let mut block = REQ_PLAIN.to_vec();
    block.extend_from_slice(&[0x00, 0x01, b'x', 0x7f, 0x81, 0xaf, 0x04]);
    block.extend(std::iter::repeat_n(b'v', 70 * 1024));
    h.feed(c, headers(1, &block, true));
    let out = h.out(c);
    let resp = out
        .iter()
        .find(|f| f.kind == frame::HEADERS && f.stream == 1)
        .expect("an answer");
    assert_eq!(resp.payload, [0x08, 0x03, b'4', b'3', b'1']);
    assert_eq!(goaway_code(&out), None);
    assert_eq!(backend_frames(&mut h), vec![]);
    h.feed(c, headers(3, REQ_PLAIN, true));
    assert!(
        backend_frames(&mut h)
            .iter()
            .any(|f| f.kind == frame::HEADERS)
    );
}
