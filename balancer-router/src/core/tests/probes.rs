//! The client's liveness check carried to its pods: a client's PING
//! probes the pod connections that carry its open streams, at its pace; a
//! pod connection that does not answer is lost, and its streams end as
//! they would at L4. An idle stream on a live connection is kept.

use super::{lost::REQ_GRPC, *};

fn ping(payload: [u8; 8]) -> BytesMut {
    frame_bytes(frame::PING, 0, 0, &payload)
}

fn probes(out: &[F]) -> usize {
    out.iter()
        .filter(|f| f.kind == frame::PING && f.flags == 0 && f.payload == PROBE_PING)
        .count()
}

/// Stream 1 of `out` ends with trailers carrying grpc-status 14
/// (UNAVAILABLE), as a lost pod connection ends a gRPC stream.
fn ends_unavailable(out: &[F]) {
    let trailers = out
        .iter()
        .find(|f| f.kind == frame::HEADERS && f.stream == 1)
        .unwrap_or_else(|| panic!("the stream ends: {out:?}"));
    let list = loona_hpack::Decoder::new()
        .decode(&trailers.payload)
        .expect("decodes");
    assert!(
        list.contains(&(b"grpc-status".to_vec(), b"14".to_vec())),
        "{list:?}"
    );
}

/// A client with a gRPC stream open on the pod's connection, at `t0`.
fn streaming(h: &mut H, t0: Instant) -> (ConnId, ConnId) {
    h.core.tick(t0);
    let c = h.client();
    h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(c, headers(1, REQ_GRPC, false));
    let b = h.backend(h.eps[0].addr);
    let _ = h.out(b);
    h.feed_backend(b, headers(1, RESP_200, false));
    let _ = h.out(c);
    (c, b)
}

#[test]
fn a_client_ping_probes_its_pods_at_its_own_pace() {
    let mut h = H::new(2, Algorithm::RoundRobin);
    let t0 = Instant::now();
    let (c, b) = streaming(&mut h, t0);
    // Another client's stream on the other pod: not this client's to probe.
    let other = h.client();
    h.feed(other, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    h.feed(other, headers(1, REQ_PLAIN, false));
    let b_other = h.backend(h.eps[1].addr);
    let _ = h.out(b_other);
    h.feed(c, ping([1; 8]));
    let out = h.out(c);
    assert!(
        out.iter()
            .any(|f| f.kind == frame::PING && f.flags == frame::FLAG_ACK),
        "the client's PING is answered at once: {out:?}"
    );
    assert_eq!(probes(&h.out(b)), 1, "its pod is probed");
    assert_eq!(probes(&h.out(b_other)), 0, "not a pod it has no stream on");
    h.feed_backend(b, frame_bytes(frame::PING, frame::FLAG_ACK, 0, &PROBE_PING));
    // A client pinging every second, in 500 ms ticks: one probe a second.
    let mut sent = 0;
    for i in 1..=8u32 {
        h.core.tick(t0 + Duration::from_millis(500) * i);
        if i % 2 == 0 {
            h.feed(c, ping([1; 8]));
        }
        let n = probes(&h.out(b));
        sent += n;
        if n > 0 {
            h.feed_backend(b, frame_bytes(frame::PING, frame::FLAG_ACK, 0, &PROBE_PING));
        }
    }
    assert_eq!(sent, 4, "as often as the client pings, no more");
    // The pod answered every probe: the stream lives.
    let out = h.out(c);
    assert!(
        !out.iter()
            .any(|f| f.kind == frame::RST_STREAM || f.kind == frame::HEADERS),
        "{out:?}"
    );
}

#[test]
fn a_pod_connection_that_does_not_answer_its_probe_is_lost_and_grpc_streams_end_unavailable() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let t0 = Instant::now();
    let (c, b) = streaming(&mut h, t0);
    // Its first PING: the pod is probed, and the client's pace is not
    // known yet (the probe may take up to Limits::probe_timeout).
    h.feed(c, ping([1; 8]));
    assert_eq!(probes(&h.out(b)), 1);
    // No answer (the pod's node is gone). The client pings again a second
    // later: its pace is known, and the probe is awaited no longer than
    // that (at least MIN_PROBE_TIMEOUT).
    h.core.tick(t0 + Duration::from_secs(1));
    h.feed(c, ping([1; 8]));
    assert_eq!(probes(&h.out(b)), 0, "one probe at a time");
    h.core.tick(t0 + Duration::from_millis(1500));
    let mut buf = BytesMut::new();
    assert!(h.core.take_out(b, &mut buf).is_some(), "not yet");
    // Lost after it.
    h.core
        .tick(t0 + MIN_PROBE_TIMEOUT + Duration::from_millis(500));
    h.pump_io();
    let mut buf = BytesMut::new();
    assert_eq!(
        h.core.take_out(b, &mut buf),
        None,
        "the pod connection is forgotten"
    );
    ends_unavailable(&h.out(c));
}

#[test]
fn a_removed_endpoints_connection_with_streams_is_probed_at_once() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let t0 = Instant::now();
    let (_c, b) = streaming(&mut h, t0);
    h.eps[0].draining.store(true, Ordering::Relaxed);
    h.core.tick(t0 + Duration::from_millis(500));
    assert_eq!(probes(&h.out(b)), 1, "probed when its endpoint left");
    h.feed_backend(b, frame_bytes(frame::PING, frame::FLAG_ACK, 0, &PROBE_PING));
    for i in 2..10u32 {
        h.core.tick(t0 + Duration::from_millis(500) * i);
    }
    assert_eq!(probes(&h.out(b)), 0, "once: the pod sees no ping flood");
}

#[test]
fn an_idle_stream_on_a_live_connection_is_kept_by_default() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let t0 = Instant::now();
    let (c, b) = streaming(&mut h, t0);
    // An hour of silence (a watch waiting for its next event), in 10 s
    // ticks: the router checks the silent pod connection itself, every
    // SILENT_PROBE_INTERVAL (5 minutes: what gRPC servers accept by
    // default from a peer they send nothing to), and the pod answers.
    let mut sent = 0;
    for i in 1..=360u32 {
        h.core.tick(t0 + Duration::from_secs(10) * i);
        let n = probes(&h.out(b));
        sent += n;
        if n > 0 {
            h.feed_backend(b, frame_bytes(frame::PING, frame::FLAG_ACK, 0, &PROBE_PING));
        }
    }
    assert_eq!(sent, 12, "one probe per 5 minutes of silence");
    let out = h.out(c);
    assert!(!out.iter().any(|f| f.kind == frame::RST_STREAM), "{out:?}");
    assert!(!h.out(b).iter().any(|f| f.kind == frame::RST_STREAM));
    // And it still works.
    h.feed_backend(b, frame_bytes(frame::DATA, 0, 1, b"\0\0\0\0\x01e"));
    assert!(h.out(c).iter().any(|f| f.kind == frame::DATA));
}

#[test]
fn a_silent_pod_connection_is_probed_even_when_no_client_pings_and_lost_if_it_never_answers() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let t0 = Instant::now();
    let (c, b) = streaming(&mut h, t0);
    // The pod sends something now and then: no probe while it does.
    for i in 1..=10u32 {
        h.core.tick(t0 + Duration::from_secs(60) * i);
        h.feed_backend(b, frame_bytes(frame::DATA, 0, 1, b"\0\0\0\0\x01e"));
        assert_eq!(probes(&h.out(b)), 0, "it is heard from");
    }
    let _ = h.out(c);
    // Then its node dies: silence. The client never pings (its own
    // connection stays busy through other pods).
    let quiet = t0 + Duration::from_secs(600);
    h.core
        .tick(quiet + SILENT_PROBE_INTERVAL - Duration::from_secs(1));
    assert_eq!(probes(&h.out(b)), 0, "not before 5 minutes of silence");
    h.core.tick(quiet + SILENT_PROBE_INTERVAL);
    assert_eq!(probes(&h.out(b)), 1, "probed after 5 minutes of silence");
    h.core
        .tick(quiet + SILENT_PROBE_INTERVAL + Limits::default().probe_timeout);
    h.pump_io();
    ends_unavailable(&h.out(c));
}
