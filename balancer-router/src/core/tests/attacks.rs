//! Known HTTP/2 attacks, each from one client beside a well-behaved one on
//! the same pods: the attacker gets GOAWAY ENHANCE_YOUR_CALM, the other
//! client's stream on the shared backend connection is answered, and a
//! busy real client never reaches a limit.

use super::{
    h2spec::{goaway_code, next_request, ready},
    *,
};
use crate::core::calm::{CONTROL_LIMIT, RESET_LIMIT};

/// Feed `frames` in batches, reading the output like a client that
/// reads, until the router closes the connection; everything it wrote.
fn feed_all(h: &mut H, c: ConnId, frames: impl IntoIterator<Item = BytesMut>) -> Vec<F> {
    let mut all = Vec::new();
    let mut batch = BytesMut::new();
    for (i, f) in frames.into_iter().enumerate() {
        batch.extend_from_slice(&f);
        if i % 64 == 63 {
            h.feed(c, std::mem::take(&mut batch));
            all.extend(h.out(c));
            if !h.core.client_reading(c) {
                return all;
            }
        }
    }
    h.feed(c, batch);
    all.extend(h.out(c));
    all
}

/// `attack` against a router that serves another client, whose stream is
/// open on one of the pods when the attack starts and answered after it.
fn attack(name: &str, attack: impl FnOnce(&mut H, ConnId) -> Vec<F>) {
    let mut h = H::new(2, Algorithm::RoundRobin);
    let good = ready(&mut h);
    h.feed(good, headers(1, REQ_PLAIN, true));
    let (b, bid) = next_request(&mut h);
    let bad = ready(&mut h);
    let out = attack(&mut h, bad);
    assert_eq!(
        goaway_code(&out),
        Some(Reason::ENHANCE_YOUR_CALM.code()),
        "{name}: {:?}",
        out.iter().rev().take(3).collect::<Vec<_>>()
    );
    assert!(!h.core.client_reading(bad), "{name}: still served");
    // The good client is served on the same pod connection.
    h.feed_backend(b, headers(bid, RESP_200, false));
    h.feed_backend(
        b,
        frame_bytes(frame::DATA, frame::FLAG_END_STREAM, bid, b"ok"),
    );
    let got = h.out(good);
    assert!(
        got.iter()
            .any(|f| f.kind == frame::DATA && f.stream == 1 && f.payload == b"ok"),
        "{name}: {got:?}"
    );
    assert_eq!(goaway_code(&got), None, "{name}");
    // No pod connection was sent more resets than pods take.
    for (bk, _) in h.conns.clone() {
        let resets = h
            .out(bk)
            .iter()
            .filter(|f| f.kind == frame::RST_STREAM)
            .count();
        assert!(
            resets <= BACKEND_RESET_BUDGET as usize + 1,
            "{name}: {resets} resets on one pod connection"
        );
    }
}

fn rst(sid: u32, reason: Reason) -> BytesMut {
    frame_bytes(frame::RST_STREAM, 0, sid, &reason.code().to_be_bytes())
}

#[test]
fn rapid_reset_cve_2023_44487() {
    attack("rapid reset", |h, c| {
        feed_all(
            h,
            c,
            (0..4 * RESET_LIMIT).flat_map(|i| {
                let sid = 1 + 2 * i;
                [headers(sid, REQ_PLAIN, true), rst(sid, Reason::CANCEL)]
            }),
        )
    });
}

#[test]
fn continuation_flood_of_empty_frames() {
    attack("continuation flood", |h, c| {
        let first = frame_bytes(frame::HEADERS, frame::FLAG_END_STREAM, 1, REQ_PLAIN);
        feed_all(
            h,
            c,
            std::iter::once(first)
                .chain((0..1000).map(|_| frame_bytes(frame::CONTINUATION, 0, 1, &[]))),
        )
    });
}

#[test]
fn continuation_flood_that_never_ends_the_block() {
    attack("continuation bytes", |h, c| {
        let first = frame_bytes(frame::HEADERS, frame::FLAG_END_STREAM, 1, REQ_PLAIN);
        feed_all(
            h,
            c,
            std::iter::once(first)
                .chain((0..100).map(|_| frame_bytes(frame::CONTINUATION, 0, 1, &[0x82; 16_384]))),
        )
    });
}

#[test]
fn settings_flood() {
    attack("settings flood", |h, c| {
        feed_all(
            h,
            c,
            (0..CONTROL_LIMIT).map(|_| {
                let mut b = BytesMut::new();
                frame::settings(&mut b, &[(setting::INITIAL_WINDOW_SIZE, 70_000)]);
                b
            }),
        )
    });
}

#[test]
fn ping_flood() {
    attack("ping flood", |h, c| {
        feed_all(
            h,
            c,
            (0..2 * CONTROL_LIMIT).map(|_| frame_bytes(frame::PING, 0, 0, &[1; 8])),
        )
    });
}

#[test]
fn ping_flood_slow_enough_for_the_meter_but_never_read() {
    // Under the rate limit (time pays it back), but the answers pile up
    // unread: the output bound cuts it off.
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = ready(&mut h);
    let mut now = Instant::now();
    for _ in 0..20_000 {
        let mut b = BytesMut::new();
        for _ in 0..40 {
            b.extend_from_slice(&frame_bytes(frame::PING, 0, 0, &[2; 8]));
        }
        h.feed(c, b);
        if !h.core.client_reading(c) {
            break;
        }
        now += Duration::from_millis(500);
        h.core.tick(now);
    }
    assert!(!h.core.client_reading(c));
    let mut buf = BytesMut::new();
    h.core.take_out(c, &mut buf);
    let out = parse(&buf);
    assert_eq!(goaway_code(&out), Some(Reason::ENHANCE_YOUR_CALM.code()));
}

#[test]
fn empty_data_flood() {
    attack("empty DATA", |h, c| {
        let first = headers(1, REQ_PLAIN, false);
        feed_all(
            h,
            c,
            std::iter::once(first)
                .chain((0..2 * CONTROL_LIMIT).map(|_| frame_bytes(frame::DATA, 0, 1, &[]))),
        )
    });
}

#[test]
fn window_update_flood() {
    attack("WINDOW_UPDATE flood", |h, c| {
        feed_all(
            h,
            c,
            (0..2 * CONTROL_LIMIT)
                .map(|_| frame_bytes(frame::WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes())),
        )
    });
}

#[test]
fn priority_flood() {
    attack("PRIORITY flood", |h, c| {
        feed_all(
            h,
            c,
            (0..2 * CONTROL_LIMIT)
                .map(|i| frame_bytes(frame::PRIORITY, 0, 1 + 2 * (i % 100), &[0, 0, 0, 0, 16])),
        )
    });
}

#[test]
fn header_list_bomb_over_the_advertised_limit() {
    attack("header list bomb", |h, c| {
        // Fields of 7 KiB past twice our SETTINGS_MAX_HEADER_LIST_SIZE
        // (a list just over it is refused on its stream alone: see
        // `metadata.rs`).
        let mut block = REQ_PLAIN.to_vec();
        for _ in 0..crate::core::client::HEADER_LIST_BOMB / (7 * 1024) + 1 {
            block.extend_from_slice(&[0x00, 0x01, b'x', 0x7f]);
            let mut len = BytesMut::new();
            crate::frame::head(&mut len, 0, 0, 0, 0);
            // 7,168 = 127 + 7,041: the HPACK integer 0x7f, 0x81, 0x37.
            block.extend_from_slice(&[0x81, 0x37]);
            block.extend(std::iter::repeat_n(b'v', 7 * 1024));
        }
        feed_all(h, c, [headers(1, &block, true)])
    });
}

#[test]
fn header_list_bomb_through_the_dynamic_table_before_the_ack() {
    // Before its ACK a client may use a table: one 4 KiB entry referred to
    // a hundred times is a 400 KiB list from a 100-byte block.
    let mut h = H::new(1, Algorithm::RoundRobin);
    let c = h.client();
    let mut entry = vec![0x82, 0x86, 0x84, 0x40, 0x01, b'x', 0x7f];
    // 4,000 = 127 + 3,873: 0x7f, 0xa1, 0x1e.
    entry.extend_from_slice(&[0xa1, 0x1e]);
    entry.extend(std::iter::repeat_n(b'v', 4000));
    h.feed(c, headers(1, &entry, true));
    let mut bomb = vec![0x82, 0x86, 0x84];
    bomb.extend_from_slice(&[0xbe; 100]);
    h.feed(c, headers(3, &bomb, true));
    assert_eq!(
        goaway_code(&h.out(c)),
        Some(Reason::ENHANCE_YOUR_CALM.code())
    );
}

#[test]
fn resets_provoked_from_the_server_side_cve_2025_8671() {
    // Each stream opened, then made to be reset by us (a window overflow):
    // the reset is ours, the cost the same as a rapid reset's.
    attack("MadeYouReset: window overflow", |h, c| {
        feed_all(
            h,
            c,
            (0..4 * RESET_LIMIT).flat_map(|i| {
                let sid = 1 + 2 * i;
                [
                    headers(sid, REQ_PLAIN, true),
                    frame_bytes(frame::WINDOW_UPDATE, 0, sid, &0x7fff_ffffu32.to_be_bytes()),
                ]
            }),
        )
    });
    attack("MadeYouReset: DATA after END_STREAM", |h, c| {
        feed_all(
            h,
            c,
            (0..4 * RESET_LIMIT).flat_map(|i| {
                let sid = 1 + 2 * i;
                [
                    headers(sid, REQ_PLAIN, true),
                    frame_bytes(frame::DATA, 0, sid, b"x"),
                ]
            }),
        )
    });
    attack("MadeYouReset: malformed requests", |h, c| {
        feed_all(
            h,
            c,
            (0..4 * RESET_LIMIT).map(|i| headers(1 + 2 * i, &[0x82, 0x86], true)),
        )
    });
}

#[test]
fn a_busy_well_behaved_client_never_reaches_a_limit() {
    // 10,000 streams: each response read with a WINDOW_UPDATE for the
    // connection and a PING (gRPC's BDP probe) per response, a third of
    // the streams cancelled before their answer (deadlines), SETTINGS now
    // and then, PRIORITY as old browsers send it.
    let mut h = H::new(2, Algorithm::RoundRobin);
    let c = ready(&mut h);
    for i in 0..10_000u32 {
        let sid = 1 + 2 * i;
        let mut b = BytesMut::new();
        b.extend_from_slice(&frame_bytes(frame::PRIORITY, 0, sid, &[0, 0, 0, 0, 16]));
        b.extend_from_slice(&headers(sid, REQ_PLAIN, true));
        if i % 500 == 0 {
            frame::settings(&mut b, &[(setting::INITIAL_WINDOW_SIZE, 1 << 20)]);
        }
        h.feed(c, b);
        let (bk, bid) = next_request(&mut h);
        if i % 3 == 0 {
            h.feed(c, rst(sid, Reason::CANCEL));
            continue;
        }
        h.feed_backend(bk, headers(bid, RESP_200, false));
        h.feed_backend(
            bk,
            frame_bytes(frame::DATA, frame::FLAG_END_STREAM, bid, &[1; 100]),
        );
        let out = h.out(c);
        assert_eq!(goaway_code(&out), None, "stream {sid}");
        let mut b = frame_bytes(frame::WINDOW_UPDATE, 0, 0, &100u32.to_be_bytes());
        b.extend_from_slice(&frame_bytes(frame::PING, 0, 0, &[3; 8]));
        h.feed(c, b);
    }
    assert!(h.core.client_reading(c));
    assert_eq!(goaway_code(&h.out(c)), None);
}

#[test]
fn many_clients_cancels_never_reach_a_pod_connection_as_a_rapid_reset() {
    // Each client stays within its own reset limit, but together they
    // cancel thousands of streams on one pod's shared connection: the
    // router moves to a fresh connection long before nghttp2's 1,000.
    let mut h = H::new(1, Algorithm::RoundRobin);
    let clients: Vec<ConnId> = (0..6).map(|_| ready(&mut h)).collect();
    for c in &clients {
        for i in 0..(RESET_LIMIT / 2) {
            let sid = 1 + 2 * i;
            let mut b = headers(sid, REQ_PLAIN, true);
            b.extend_from_slice(&rst(sid, Reason::CANCEL));
            h.feed(*c, b);
        }
        assert!(h.core.client_reading(*c));
    }
    let mut per_conn = Vec::new();
    for (b, _) in h.conns.clone() {
        let resets = h
            .out(b)
            .iter()
            .filter(|f| f.kind == frame::RST_STREAM)
            .count();
        per_conn.push(resets);
    }
    let total: usize = per_conn.iter().sum();
    assert_eq!(
        total,
        6 * RESET_LIMIT as usize / 2,
        "every cancel reached the pod"
    );
    assert!(per_conn.len() > 1, "{per_conn:?}");
    for n in per_conn {
        assert!(
            n <= BACKEND_RESET_BUDGET as usize + 1,
            "{n} resets on one connection"
        );
    }
}

#[test]
fn data_on_closed_streams_does_not_pay_for_a_control_flood() {
    // SETTINGS (each walks every stream), PING, and DATA on a stream that
    // is gone: the DATA must not count as useful work.
    attack("DATA on closed streams", |h, c| {
        // Stream 3 was skipped: DATA on it is ignored, as on a stream
        // the router reset.
        let first = headers(5, REQ_PLAIN, true);
        feed_all(
            h,
            c,
            std::iter::once(first).chain((0..20_000u32).flat_map(|i| {
                let mut s = BytesMut::new();
                frame::settings(&mut s, &[(setting::INITIAL_WINDOW_SIZE, 65_535 + i % 2)]);
                [
                    s,
                    frame_bytes(frame::PING, 0, 0, &[1; 8]),
                    frame_bytes(frame::DATA, 0, 3, &[0]),
                    frame_bytes(frame::DATA, 0, 3, &[0]),
                    frame_bytes(frame::DATA, 0, 3, &[0]),
                ]
            })),
        )
    });
}
