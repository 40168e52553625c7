//! Pools per client origin (network namespace): a client's streams go to
//! pods only over connections opened for its own origin, so a pod sees
//! each client by its own address; an origin's pools close when its
//! namespace goes, or once idle after its last client left.

use super::*;

const A: Origin = Origin(0xa);
const B: Origin = Origin(0xb);

/// The origin each backend connection was opened for.
fn origin_of(h: &H, b: ConnId) -> Origin {
    h.origins
        .iter()
        .find(|(id, _)| *id == b)
        .map(|(_, o)| *o)
        .expect("a connection the core asked for")
}

/// Stream ids of HEADERS each backend connection received, by connection.
fn headers_by_conn(h: &mut H) -> Vec<(ConnId, Vec<u32>)> {
    let conns: Vec<ConnId> = h.conns.iter().map(|(id, _)| *id).collect();
    conns
        .into_iter()
        .map(|b| {
            let ids = h
                .out(b)
                .iter()
                .filter(|f| f.kind == frame::HEADERS)
                .map(|f| f.stream)
                .collect();
            (b, ids)
        })
        .collect()
}

#[test]
fn each_origin_has_its_own_pod_connections_and_never_uses_anothers() {
    let mut h = H::new(2, Algorithm::RoundRobin);
    let a = h.client_from(A);
    let b = h.client_from(B);
    let n = h.client();
    for c in [a, b, n] {
        h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
    }
    // Four streams each, round-robin over two pods.
    for sid in [1, 3, 5, 7] {
        for c in [a, b, n] {
            h.feed(c, headers(sid, REQ_PLAIN, true));
        }
    }
    let mut by_origin: std::collections::BTreeMap<Origin, Vec<(SocketAddr, usize)>> =
        std::collections::BTreeMap::new();
    for (conn, ids) in headers_by_conn(&mut h) {
        let addr = h.conns.iter().find(|(id, _)| *id == conn).expect("conn").1;
        by_origin
            .entry(origin_of(&h, conn))
            .or_default()
            .push((addr, ids.len()));
    }
    // Every origin has one connection to each pod, with its own 4 streams
    // spread 2/2: 6 pod connections, none shared.
    assert_eq!(by_origin.len(), 3, "{by_origin:?}");
    for (origin, conns) in &by_origin {
        let mut pods: Vec<SocketAddr> = conns.iter().map(|(a, _)| *a).collect();
        pods.sort();
        assert_eq!(
            pods,
            vec![h.eps[0].addr, h.eps[1].addr],
            "{origin}: {conns:?}"
        );
        assert_eq!(
            conns.iter().map(|(_, n)| n).sum::<usize>(),
            4,
            "{origin}: {conns:?}"
        );
    }
    let g = h.core.gauges();
    assert_eq!(g.backend_connections, 6);
    assert_eq!(g.origin_pools, 2, "the node's pool is not a namespace's");
    assert_eq!(g.origin_connections, 4);
    assert_eq!(g.client_connections, 3);
    assert_eq!(h.core.origins(), vec![A, B]);
}

#[test]
fn a_gone_namespace_closes_its_pods_connections_after_their_streams() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let a = h.client_from(A);
    let b = h.client_from(B);
    for c in [a, b] {
        h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
        // One stream each, waiting for its response.
        h.feed(c, headers(1, REQ_PLAIN, true));
    }
    let conns = headers_by_conn(&mut h);
    assert_eq!(conns.len(), 2);
    let conn_a = conns
        .iter()
        .find(|(c, _)| origin_of(&h, *c) == A)
        .expect("A's")
        .0;
    h.core.close_origin(A);
    // A's stream still runs on it: it ends normally, then the connection
    // closes; B's connection is untouched.
    let mut reply = headers(1, RESP_200, true);
    h.feed_backend(conn_a, reply.split());
    let out = h.out(a);
    assert!(
        out.iter().any(|f| f.kind == frame::HEADERS
            && f.stream == 1
            && f.flags & frame::FLAG_END_STREAM != 0),
        "A's open stream finishes: {out:?}"
    );
    let mut buf = BytesMut::new();
    assert_eq!(
        h.core.take_out(conn_a, &mut buf),
        Some(true),
        "A's pod connection closes"
    );
    // A new stream of A (its client still open) gets a new connection
    // attempt for A, never B's connection.
    h.feed(a, headers(3, REQ_PLAIN, true));
    assert!(
        h.origins.iter().filter(|(_, o)| *o == A).count() == 2,
        "{:?}",
        h.origins
    );
    let g = h.core.gauges();
    assert_eq!(g.client_connections, 2);
    let conn_b = conns
        .iter()
        .find(|(c, _)| origin_of(&h, *c) == B)
        .expect("B's")
        .0;
    let mut buf = BytesMut::new();
    assert_eq!(h.core.take_out(conn_b, &mut buf), Some(false), "B's stays");
}

#[test]
fn an_origins_idle_pool_closes_after_its_last_client_left_and_the_nodes_stays() {
    let mut h = H::new(1, Algorithm::RoundRobin);
    let a = h.client_from(A);
    let n = h.client();
    for c in [a, n] {
        h.feed(c, frame_bytes(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
        h.feed(c, headers(1, REQ_PLAIN, true));
    }
    let conns = headers_by_conn(&mut h);
    for (conn, _) in &conns {
        let mut reply = headers(1, RESP_200, true);
        h.feed_backend(*conn, reply.split());
    }
    let conn_a = conns
        .iter()
        .find(|(c, _)| origin_of(&h, *c) == A)
        .expect("A's")
        .0;
    let conn_n = conns
        .iter()
        .find(|(c, _)| origin_of(&h, *c) == Origin::NODE)
        .expect("the node's")
        .0;
    let start = Instant::now();
    // A's client is still connected: its idle pool stays.
    h.core.tick(start + ORIGIN_POOL_IDLE * 2);
    let mut buf = BytesMut::new();
    assert_eq!(h.core.take_out(conn_a, &mut buf), Some(false));
    // Both clients leave.
    h.core.forget(a);
    h.core.forget(n);
    // Its last stream opened more than ORIGIN_POOL_IDLE ago.
    h.core
        .tick(start + ORIGIN_POOL_IDLE * 2 + Duration::from_millis(500));
    let mut buf = BytesMut::new();
    assert_eq!(
        h.core.take_out(conn_a, &mut buf),
        Some(true),
        "A's pool closes"
    );
    assert_eq!(
        h.core.take_out(conn_n, &mut buf),
        Some(false),
        "the node's pool stays for the next client"
    );
}
