//! Bounds in time and memory: idle streams, silent backends, and what a
//! client that does not read can make the router hold.

use std::collections::HashMap;

use super::{
    h2spec::{backend_frames, goaway_code, ready, rst_code},
    *,
};

#[test]
fn a_stream_idle_for_the_timeout_is_reset_on_both_hops() {
    let timeout = Duration::from_secs(300);
    let mut h = H::with_limits(
        1,
        Algorithm::RoundRobin,
        Limits {
            stream_idle_timeout: timeout,
            ..Limits::default()
        },
    );
    let c = ready(&mut h);
    // A request the pod never answers.
    h.feed(c, headers(1, REQ_PLAIN, true));
    // A streaming call that keeps exchanging messages.
    h.feed(c, headers(3, REQ_PLAIN, false));
    let b = h.backend(h.eps[0].addr);
    let _ = h.out(b);
    let t0 = Instant::now();
    let mut now = t0;
    for _ in 0..8 {
        now += timeout / 4;
        // One message each way on stream 3 (backend stream 3).
        h.feed(c, frame_bytes(frame::DATA, 0, 3, b"ping"));
        if now == t0 + timeout / 4 {
            h.feed_backend(b, headers(3, RESP_200, false));
        } else {
            h.feed_backend(b, frame_bytes(frame::DATA, 0, 3, b"pong"));
        }
        h.core.tick(now);
        let out = h.out(c);
        assert_eq!(rst_code(&out, 3), None, "the streaming call lives");
        if now - t0 < timeout {
            assert_eq!(rst_code(&out, 1), None, "not idle long enough yet");
        } else if rst_code(&out, 1).is_some() {
            assert_eq!(rst_code(&out, 1), Some(Reason::CANCEL.code()));
            let sent = h.out(b);
            assert_eq!(
                rst_code(&sent, 1),
                Some(Reason::CANCEL.code()),
                "the pod is told"
            );
            assert_eq!(h.core.client_streams(c), 1);
            return;
        }
    }
    panic!("the idle stream was never reset");
}

#[test]
fn a_backend_that_never_sends_settings_is_given_up_and_its_streams_retried() {
    let mut h = H::new(2, Algorithm::RoundRobin);
    h.silent = Some(h.eps[0].addr);
    let c = ready(&mut h);
    h.feed(c, headers(1, REQ_PLAIN, true));
    let silent = h.backend(h.eps[0].addr);
    assert!(
        h.out(silent).iter().any(|f| f.kind == frame::HEADERS),
        "it went to the silent pod first"
    );
    let limits = Limits::default();
    h.core.tick(Instant::now() + limits.connect_timeout / 2);
    h.pump_io();
    assert!(h.core.backend_reading(silent), "not yet");
    h.core
        .tick(Instant::now() + limits.connect_timeout + Duration::from_millis(1));
    h.pump_io();
    assert!(!h.core.backend_reading(silent), "given up");
    let other = h.backend(h.eps[1].addr);
    let sent = h.out(other);
    let hd = sent
        .iter()
        .find(|f| f.kind == frame::HEADERS)
        .expect("retried on the other pod");
    h.feed_backend(other, headers(hd.stream, RESP_200, true));
    let out = h.out(c);
    assert!(
        out.iter()
            .any(|f| f.kind == frame::HEADERS && f.stream == 1)
    );
    assert_eq!(rst_code(&out, 1), None);
}

/// A pod that sends as much as the router lets it on every stream it was
/// given: DATA within each stream's window and the connection's.
struct GreedyPod {
    b: ConnId,
    windows: HashMap<u32, i64>,
    conn: i64,
    sent: i64,
}

impl GreedyPod {
    fn new(b: ConnId) -> Self {
        Self {
            b,
            windows: HashMap::new(),
            conn: BACKEND_CONN_WINDOW,
            sent: 0,
        }
    }

    /// Read what the router wrote, then fill every window.
    fn fill(&mut self, h: &mut H) {
        for f in h.out(self.b) {
            match f.kind {
                frame::HEADERS => {
                    self.windows.insert(f.stream, BACKEND_INITIAL_WINDOW);
                    h.feed_backend(self.b, headers(f.stream, RESP_200, false));
                }
                frame::WINDOW_UPDATE => {
                    let inc = i64::from(u32_at(&f.payload, 0));
                    if f.stream == 0 {
                        self.conn += inc;
                    } else if let Some(w) = self.windows.get_mut(&f.stream) {
                        *w += inc;
                    }
                }
                frame::RST_STREAM => {
                    self.windows.remove(&f.stream);
                }
                _ => {}
            }
        }
        let ids: Vec<u32> = self.windows.keys().copied().collect();
        for sid in ids {
            loop {
                let w = self.windows[&sid];
                let n = w.min(self.conn).min(16_384);
                if n <= 0 {
                    break;
                }
                h.feed_backend(
                    self.b,
                    frame_bytes(frame::DATA, 0, sid, &vec![9; n as usize]),
                );
                *self.windows.get_mut(&sid).expect("open") -= n;
                self.conn -= n;
                self.sent += n;
            }
        }
    }
}

/// A client that asks for `streams` endless downloads, opens its windows
/// wide, and never reads.
fn non_reader(h: &mut H, streams: u32) -> ConnId {
    let c = ready(h);
    let mut s = BytesMut::new();
    frame::settings(&mut s, &[(setting::INITIAL_WINDOW_SIZE, 0x7fff_ffff)]);
    s.extend_from_slice(&frame_bytes(
        frame::WINDOW_UPDATE,
        0,
        0,
        &0x7fff_0000u32.to_be_bytes(),
    ));
    h.feed(c, s);
    for i in 0..streams {
        h.feed(c, headers(1 + 2 * i, REQ_PLAIN, true));
    }
    c
}

#[test]
fn a_client_that_never_reads_holds_at_most_its_budget() {
    let limits = Limits::default();
    let mut h = H::with_limits(1, Algorithm::RoundRobin, limits.clone());
    let streams = 32;
    let c = non_reader(&mut h, streams);
    let mut pod = GreedyPod::new(h.backend(h.eps[0].addr));
    // It reads for a while (every stream's window grows to the full
    // 256 KiB, 8 MiB in all), then stops: its socket is full.
    for _ in 0..20 {
        pod.fill(&mut h);
        let _ = h.out(c);
    }
    for _ in 0..50 {
        pod.fill(&mut h);
    }
    let bound = limits.client_buffer as i64 + i64::from(streams) * BACKEND_INITIAL_WINDOW;
    assert!(
        h.core.client_held(c) <= bound,
        "held {} > {bound}",
        h.core.client_held(c)
    );
    assert!(
        h.core.client_held(c) >= limits.client_buffer as i64 / 2,
        "the budget was used: {}",
        h.core.client_held(c)
    );
    assert_eq!(h.core.held(), h.core.client_held(c));
    // It starts reading: the bytes flow again.
    let before = pod.sent;
    h.core.written(c);
    for _ in 0..200 {
        let _ = h.out(c);
        pod.fill(&mut h);
    }
    assert!(
        pod.sent > before + limits.client_buffer as i64,
        "{} then {}",
        before,
        pod.sent
    );
    // And when it goes, the budget is whole again.
    h.core.client_gone(c);
    h.core.forget(c);
    assert_eq!(h.core.held(), 0);
}

#[test]
fn clients_that_never_read_together_hold_at_most_the_node_limit() {
    let limits = Limits {
        buffer_limit: 2 << 20,
        ..Limits::default()
    };
    let mut h = H::with_limits(1, Algorithm::RoundRobin, limits.clone());
    let (clients, streams) = (8, 4);
    let cs: Vec<ConnId> = (0..clients).map(|_| non_reader(&mut h, streams)).collect();
    let mut pod = GreedyPod::new(h.backend(h.eps[0].addr));
    for _ in 0..50 {
        pod.fill(&mut h);
    }
    let floors = i64::from(clients * streams) * BACKEND_INITIAL_WINDOW;
    let bound = limits.buffer_limit as i64 + floors;
    assert!(h.core.held() <= bound, "held {} > {bound}", h.core.held());
    assert!(pod.sent <= bound);
    // A reading client beside them is still served, at least at the floor.
    let good = ready(&mut h);
    h.feed(good, headers(1, REQ_PLAIN, true));
    pod.fill(&mut h);
    let got = h.out(good);
    assert!(got.iter().any(|f| f.kind == frame::DATA && f.stream == 1));
    assert_eq!(goaway_code(&got), None);
    for c in cs {
        h.core.client_gone(c);
        h.core.forget(c);
    }
    h.core.client_gone(good);
    h.core.forget(good);
    let _ = backend_frames(&mut h);
    assert_eq!(h.core.held(), 0);
}

#[test]
fn an_empty_data_frame_may_end_a_stream_whose_window_went_negative() {
    // The client lowers its initial window below what is in flight: the
    // stream's window is negative when the pod's empty END_STREAM comes.
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    h.feed(c, headers(1, REQ_PLAIN, true));
    let b = h.backend(h.eps[0].addr);
    let _ = h.out(b);
    let mut r = headers(1, RESP_200, false);
    r.extend_from_slice(&frame_bytes(frame::DATA, 0, 1, &[7; 16_384]));
    h.feed_backend(b, r);
    let _ = h.out(c);
    let mut s = BytesMut::new();
    frame::settings(&mut s, &[(setting::INITIAL_WINDOW_SIZE, 0)]);
    h.feed(c, s);
    h.feed_backend(b, frame_bytes(frame::DATA, frame::FLAG_END_STREAM, 1, &[]));
    let out = h.out(c);
    assert!(
        out.iter()
            .any(|f| f.kind == frame::DATA && f.flags & frame::FLAG_END_STREAM != 0),
        "{out:?}"
    );
}

#[test]
fn one_byte_data_frames_join_the_chunk_they_wait_behind() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    h.feed(c, headers(1, REQ_PLAIN, false));
    let b = h.backend(h.eps[0].addr);
    let _ = h.out(b);
    // The pod's stream window (65,535) used up by full frames...
    let mut buf = BytesMut::new();
    for _ in 0..4 {
        buf.extend_from_slice(&frame_bytes(frame::DATA, 0, 1, &[1; 16_384]));
    }
    h.feed(c, buf);
    // ...then 200,000 one-byte frames wait.
    let n = 200_000;
    let mut buf = BytesMut::new();
    for _ in 0..n {
        buf.extend_from_slice(&frame_bytes(frame::DATA, 0, 1, &[2]));
    }
    h.feed(c, buf);
    assert!(h.core.client_reading(c));
    let queued = h.core.clients[&c].streams[&1].to_up.len();
    assert!(queued <= n / 1024 + 2, "{queued} chunks queued");
    assert!(h.core.backends[&b].blocked.len() <= 1);
    // The pod opens its windows: every byte goes, in order, in full frames.
    let mut sent: Vec<u8> = Vec::new();
    let mut wu = frame_bytes(frame::WINDOW_UPDATE, 0, 1, &(1u32 << 30).to_be_bytes());
    wu.extend_from_slice(&frame_bytes(
        frame::WINDOW_UPDATE,
        0,
        0,
        &(1u32 << 30).to_be_bytes(),
    ));
    h.feed_backend(b, wu);
    loop {
        let fs = h.out(b);
        if fs.is_empty() {
            break;
        }
        for f in fs.iter().filter(|f| f.kind == frame::DATA) {
            assert!(f.payload.len() <= 16_384);
            sent.extend_from_slice(&f.payload);
        }
    }
    assert_eq!(sent.len(), 4 * 16_384 + n);
    assert!(sent[4 * 16_384..].iter().all(|b| *b == 2));
}

#[test]
fn a_retired_pod_connection_hands_its_queue_on_and_closes() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    h.feed(c, headers(1, REQ_PLAIN, false));
    let b = h.backend(h.eps[0].addr);
    // One stream at a time on this connection; one more waits on it.
    let mut s = BytesMut::new();
    frame::settings(&mut s, &[(setting::MAX_CONCURRENT_STREAMS, 1)]);
    h.feed_backend(b, s);
    h.core
        .backends
        .get_mut(&b)
        .expect("b")
        .queue
        .push_back((c, 3));
    h.feed(c, headers(3, REQ_PLAIN, false));
    let _ = h.out(b);
    // Its reset budget is spent by the next cancel.
    h.core.backends.get_mut(&b).expect("b").resets = BACKEND_RESET_BUDGET;
    h.feed(
        c,
        frame_bytes(
            frame::RST_STREAM,
            0,
            1,
            &Reason::CANCEL.code().to_be_bytes(),
        ),
    );
    // It takes nothing new and closes; stream 3 went to a fresh one.
    let mut buf = BytesMut::new();
    assert_eq!(h.core.take_out(b, &mut buf), Some(true), "closing");
    let fresh = h.conns.iter().map(|(id, _)| *id).find(|id| *id != b);
    let fresh = fresh.expect("a fresh connection");
    assert!(h.out(fresh).iter().any(|f| f.kind == frame::HEADERS));
}
