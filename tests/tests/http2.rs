//! Stream-level balancing of HTTP/2 (h2c) through the agent's router, with
//! real `h2` clients and servers in pod namespaces.

mod common;

use std::time::Duration;

use balancer_tests::{
    peers::{h2_client_spawn, h2_client_wait, h2_raw},
    topology::Topology,
};
use common::{VIP, http2_yaml, no_errors, pods_of, setup};
use serde_json::Value;

#[test]
fn ten_mib_each_way_streams_intact_with_trailers_and_grpc_status() {
    let s = setup("h2stream", 4);
    let mib10 = (10 * 1024 * 1024).to_string();
    // Bidi: 10 MiB up, echoed back, checked byte by byte.
    let v = s.client(&[
        "--path",
        "/echo",
        "--requests",
        "2",
        "--concurrency",
        "2",
        "--upload",
        &mib10,
    ]);
    no_errors(&v);
    assert_eq!(v["echo_ok"], true, "{v}");
    assert_eq!(v["bytes_received"], 2 * 10 * 1024 * 1024);
    // Server streaming: 10 MiB down.
    let v = s.client(&[
        "--path",
        &format!("/download?bytes={mib10}"),
        "--requests",
        "1",
    ]);
    no_errors(&v);
    assert_eq!(v["bytes_received"], 10 * 1024 * 1024);
    // Client streaming: 10 MiB up, the server reports what it got.
    let v = s.client(&["--path", "/upload", "--requests", "1", "--upload", &mib10]);
    no_errors(&v);
    assert_eq!(v["echo_ok"], true, "server saw every byte: {v}");
    // Trailers: grpc-status OK, and a failing one with its message.
    let v = s.client(&["--path", "/unary", "--requests", "4"]);
    assert_eq!(v["statuses"]["0"], 4, "{v}");
    let v = s.client(&["--path", "/status?code=7", "--requests", "3"]);
    no_errors(&v);
    assert_eq!(v["statuses"]["7"], 3, "{v}");
    assert_eq!(v["messages"][0], "failed on purpose");
}

#[test]
fn client_cancel_reaches_the_backend() {
    let s = setup("h2cancel", 2);
    let v = s.client(&[
        "--path",
        "/slow?ms=5000",
        "--requests",
        "4",
        "--concurrency",
        "4",
        "--cancel-after-ms",
        "300",
    ]);
    assert_eq!(v["errors"]["cancelled"], 4, "{v}");
    Topology::wait_for(
        "the servers to see the resets",
        Duration::from_secs(3),
        || {
            let resets: usize =
                s.t.pods
                    .iter()
                    .map(|p| p.h2.as_ref().expect("h2").count("reset /slow"))
                    .sum();
            Ok(resets == 4)
        },
    )
    .expect("resets");
}

#[test]
fn backend_killed_mid_stream_fails_fast_and_others_keep_serving() {
    let mut s = setup("h2kill", 4);
    let child = h2_client_spawn(
        &s.t.client.name,
        Some(&s.t.cgroup.path),
        VIP,
        &[
            "--path",
            "/slow?ms=3000",
            "--requests",
            "8",
            "--concurrency",
            "8",
        ],
    )
    .expect("client");
    std::thread::sleep(Duration::from_millis(700));
    s.t.pods[0].h2.as_mut().expect("h2").kill();
    let v = h2_client_wait(child).expect("client");
    // As at L4, where the client's connection to the pod would die: its
    // gRPC streams end UNAVAILABLE (14), which retry policies retry, not
    // with a bare reset (INTERNAL).
    assert_eq!(v["statuses"]["14"], 2, "pod0's two streams fail: {v}");
    assert!(v["errors"].as_object().expect("errors").is_empty(), "{v}");
    let latencies = v["status_latency_ms"].as_array().expect("latencies");
    assert_eq!(latencies.len(), 2, "{v}");
    for ms in latencies {
        // Killed at ~700 ms: the client knows well within a second.
        assert!(ms.as_u64().expect("ms") < 1700, "{v}");
    }
    assert_eq!(v["statuses"]["0"], 6, "{v}");
    // New streams avoid the dead pod (connect refused: retried elsewhere).
    let v = s.client(&[
        "--path",
        "/unary",
        "--requests",
        "200",
        "--concurrency",
        "8",
    ]);
    no_errors(&v);
    assert!(pods_of(&v).iter().all(|(p, _)| p != "pod0"), "{v}");
}

#[test]
fn backend_goaway_is_invisible_to_the_client() {
    let s = setup("h2goaway", 4);
    // Every backend connection is closed with GOAWAY after one request.
    let v = s.client(&[
        "--path",
        "/goaway",
        "--requests",
        "2000",
        "--concurrency",
        "16",
    ]);
    no_errors(&v);
    assert_eq!(pods_of(&v).iter().map(|(_, n)| n).sum::<u64>(), 2000, "{v}");
}

#[test]
fn endpoint_removed_under_load_fails_no_rpc() {
    let s = setup("h2remove", 4);
    let child = h2_client_spawn(
        &s.t.client.name,
        Some(&s.t.cgroup.path),
        VIP,
        &[
            "--path",
            "/unary",
            "--requests",
            "8000",
            "--concurrency",
            "16",
        ],
    )
    .expect("client");
    std::thread::sleep(Duration::from_millis(800));
    let status = s
        .agent
        .reload(&http2_yaml(&s.t, &[1, 2, 3]))
        .expect("reload");
    assert_eq!(status["last_reload"]["ok"], true);
    let before = s.t.pods[0].h2.as_ref().expect("h2").count("req /unary");
    let v = h2_client_wait(child).expect("client");
    no_errors(&v);
    assert_eq!(pods_of(&v).iter().map(|(_, n)| n).sum::<u64>(), 8000, "{v}");
    let after = s.t.pods[0].h2.as_ref().expect("h2").count("req /unary");
    assert!(
        after - before < 32,
        "pod0 got {} streams after its removal",
        after - before
    );
}

#[test]
fn unfinished_preface_is_closed_after_a_timeout() {
    let s = setup("h2preface", 2);
    // "PRI * HTTP/2.0\r\n", then nothing.
    let v = h2_raw(
        &s.t.client.name,
        Some(&s.t.cgroup.path),
        VIP,
        "505249202a20485454502f322e300d0a",
        12,
    )
    .expect("raw");
    assert_eq!(v["closed"], true, "{v}");
    let after = v["closed_after_s"].as_f64().expect("s");
    assert!((4.0..9.0).contains(&after), "closed after {after} s");
}

const PREFACE_HEX: &str = "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a";
const EMPTY_SETTINGS: &str = "000000040000000000";

fn goaway_code(v: &Value) -> Option<u32> {
    v["frames"]
        .as_array()?
        .iter()
        .find(|f| f["type"] == 7)
        .and_then(|f| {
            let p = f["payload"].as_str()?;
            u32::from_str_radix(p.get(8..16)?, 16).ok()
        })
}

#[test]
fn malformed_and_oversized_frames_get_connection_errors_and_hurt_no_one_else() {
    let s = setup("h2malformed", 2);
    let ns = &s.t.client.name;
    let cg = Some(s.t.cgroup.path.as_path());
    // A healthy connection in flight the whole time.
    let healthy = h2_client_spawn(
        ns,
        cg,
        VIP,
        &[
            "--path",
            "/slow?ms=2000",
            "--requests",
            "4",
            "--concurrency",
            "4",
        ],
    )
    .expect("client");
    // Each malformed connection gets a GOAWAY with the code RFC 9113 names.
    let cases: [(&str, String, u32); 4] = [
        (
            "DATA on stream 0: PROTOCOL_ERROR (6.1)",
            format!("{PREFACE_HEX}{EMPTY_SETTINGS}000004000100000000deadbeef"),
            1,
        ),
        (
            "a 65,536-byte frame against the default 16,384: FRAME_SIZE_ERROR (4.2)",
            format!("{PREFACE_HEX}{EMPTY_SETTINGS}010000000000000001"),
            6,
        ),
        (
            "a PING that is not 8 bytes: FRAME_SIZE_ERROR (6.7)",
            format!("{PREFACE_HEX}{EMPTY_SETTINGS}000004060000000000aabbccdd"),
            6,
        ),
        (
            "SETTINGS whose length is not a multiple of 6: FRAME_SIZE_ERROR (6.5)",
            format!("{PREFACE_HEX}000005040000000000aabbccddee"),
            6,
        ),
    ];
    for (what, bytes, code) in &cases {
        let v = h2_raw(ns, cg, VIP, bytes, 3).expect("raw");
        assert_eq!(goaway_code(&v), Some(*code), "{what}: {v}");
    }
    let v = h2_client_wait(healthy).expect("healthy");
    no_errors(&v);
    assert_eq!(pods_of(&v).iter().map(|(_, n)| n).sum::<u64>(), 4);
}

#[test]
fn a_client_that_does_not_speak_http2_is_passed_through() {
    let s = setup("h2plain", 2);
    // Client speaks first, not HTTP/2: passed through at once; the plain
    // server answers with its name and echoes.
    let v = h2_raw(
        &s.t.client.name,
        Some(&s.t.cgroup.path),
        "198.19.0.51:80",
        "68656c6c6f0a",
        2,
    )
    .expect("raw");
    let text = v["text"].as_str().expect("text");
    assert!(text.starts_with("pod") && text.ends_with("hello\n"), "{v}");
    // Server speaks first (the client sends nothing): passed through after
    // a short wait.
    let r = balancer_tests::peers::short_connections(
        &s.t.client.name,
        Some(&s.t.cgroup.path),
        "198.19.0.51:80",
        2,
    )
    .expect("plain client");
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.pods.values().sum::<u64>(), 2);
}

/// Clients that do not speak HTTP/2 on an http2 port are picked for by
/// the port's own pool, over live counts (each passed-through connection
/// is one in flight while it lasts): 40 held connections over 4 pods land
/// as least-conn lands them at L4, 10 each (a throwaway pool per
/// connection, whose rotation always started at the first pod, gave
/// 14/9/9/8).
#[test]
fn passed_through_connections_spread_as_the_ports_algorithm_spreads_them() {
    let s = setup("h2plainspread", 4);
    let held = balancer_tests::peers::hold_connections(
        &s.t.client.name,
        Some(&s.t.cgroup.path),
        "198.19.0.51:80",
        40,
    )
    .expect("plain client");
    let r = &held.result;
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.pods.values().sum::<u64>(), 40, "{r:?}");
    assert_eq!(r.pods.len(), 4, "every pod: {r:?}");
    assert!(
        r.pods.values().all(|n| (9..=11).contains(n)),
        "10 each, as least-conn at L4: {r:?}"
    );
    eprintln!("40 passed-through connections: {:?}", r.pods);
    held.close().expect("close");
}

#[test]
fn agent_shutdown_drains_http2_clients_without_failing_a_stream() {
    let mut s = setup("h2drain", 2);
    let child = h2_client_spawn(
        &s.t.client.name,
        Some(&s.t.cgroup.path),
        VIP,
        &[
            "--path",
            "/slow?ms=1500",
            "--requests",
            "4",
            "--concurrency",
            "4",
        ],
    )
    .expect("client");
    std::thread::sleep(Duration::from_millis(400));
    let started = std::time::Instant::now();
    let status = s.agent.stop().expect("stop");
    assert!(status.success(), "{}", s.agent.log());
    // The agent waited for the streams (about 1.1 s more), not longer.
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_millis(800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let v = h2_client_wait(child).expect("client");
    no_errors(&v);
    assert_eq!(pods_of(&v).iter().map(|(_, n)| n).sum::<u64>(), 4, "{v}");
}

#[test]
fn sk_msg_counts_streams_on_l4_connections_making_pinning_visible() {
    let s = setup("h2skmsg", 4);
    let v = balancer_tests::peers::h2_client(
        &s.t.client.name,
        Some(&s.t.cgroup.path),
        "198.19.0.52:80",
        &[
            "--path",
            "/unary",
            "--requests",
            "300",
            "--concurrency",
            "4",
        ],
    )
    .expect("client");
    no_errors(&v);
    // A tcp port: the one connection, and so every RPC, is on one pod.
    let pods = pods_of(&v);
    assert_eq!(pods.len(), 1, "{v}");
    let e = s.agent.endpoints_json().expect("json");
    let svc = e["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|x| x["name"] == "default/grpc-l4")
        .expect("service")
        .clone();
    let streams: Vec<u64> = svc["endpoints"]
        .as_array()
        .expect("eps")
        .iter()
        .map(|x| x["streams_total"].as_u64().expect("streams_total"))
        .collect();
    assert_eq!(streams.iter().sum::<u64>(), 300, "{svc}");
    assert_eq!(
        streams.iter().copied().max(),
        Some(300),
        "all on one pod: {svc}"
    );
    let status = s.agent.status_json().expect("status");
    assert_eq!(status["counters"]["h2_streams"], 300, "{status}");
    // The frames were only looked at: the payloads arrived intact.
    let v = balancer_tests::peers::h2_client(
        &s.t.client.name,
        Some(&s.t.cgroup.path),
        "198.19.0.52:80",
        &[
            "--path",
            "/echo",
            "--requests",
            "2",
            "--concurrency",
            "2",
            "--upload",
            "1048576",
        ],
    )
    .expect("client");
    no_errors(&v);
    assert_eq!(v["echo_ok"], true, "{v}");
}

#[test]
fn a_dead_router_falls_back_to_l4_within_a_second() {
    let mut s = setup("h2down", 4);
    let v = s.client(&["--path", "/unary", "--requests", "40", "--concurrency", "4"]);
    no_errors(&v);
    assert_eq!(pods_of(&v).len(), 4, "through the router: {v}");
    s.agent.kill_router().expect("kill -9 the router");
    std::thread::sleep(Duration::from_millis(1200));
    // No router: the same client still works, balanced per connection.
    let v = s.client(&["--path", "/unary", "--requests", "40", "--concurrency", "4"]);
    no_errors(&v);
    assert_eq!(pods_of(&v).len(), 1, "one L4 connection, one pod: {v}");
    assert_eq!(v["peer"], VIP, "getpeername still gives the VIP: {v}");
    // A router again: steered to it, spread per stream.
    s.agent.start_router().expect("router back");
    let v = s.client(&["--path", "/unary", "--requests", "40", "--concurrency", "4"]);
    no_errors(&v);
    assert_eq!(pods_of(&v).len(), 4, "through the new router: {v}");
}

#[test]
fn the_router_serves_on_while_the_control_plane_is_dead() {
    let mut s = setup("h2cpdead", 4);
    s.agent.kill_agent().expect("kill -9 the agent");
    std::thread::sleep(Duration::from_millis(1500));
    // New connections are still steered to the router (its heartbeat is
    // its own), which still has the table: every stream spread.
    let v = s.client(&["--path", "/unary", "--requests", "80", "--concurrency", "8"]);
    no_errors(&v);
    assert_eq!(pods_of(&v).len(), 4, "spread with no control plane: {v}");
}

#[test]
fn spliced_client_and_router_sockets_keep_every_byte_in_order() {
    // The agent in a cgroup below the balanced one, as on a node where it
    // attaches to the root cgroup: sock_ops sees the router's sockets too,
    // so both directions of each client connection can be spliced.
    let mut t = Topology::new("h2splice", 4, &[8080]).expect("topology");
    t.start_h2().expect("h2 servers");
    let agent_cg = t.agent_cgroup().expect("agent cgroup");
    let all: Vec<usize> = (0..4).collect();
    let agent = balancer_tests::agent::Agent::start_in_cgroup(
        &t.prefix,
        &t.cgroup.path,
        &http2_yaml(&t, &all),
        Some(&t.node.name),
        &[
            "--proxy-addr",
            balancer_tests::topology::ROUTER_ADDR,
            "--splice",
        ],
        &agent_cg,
    )
    .expect("agent");
    let client = |extra: &[&str]| {
        balancer_tests::peers::h2_client(&t.client.name, Some(&t.cgroup.path), VIP, extra)
            .expect("client")
    };
    let mib10 = (10 * 1024 * 1024).to_string();
    // 10 MiB up and echoed back, on 2 streams at once, byte for byte.
    let v = client(&[
        "--path",
        "/echo",
        "--requests",
        "2",
        "--concurrency",
        "2",
        "--upload",
        &mib10,
    ]);
    no_errors(&v);
    assert_eq!(v["echo_ok"], true, "{v}");
    let v = client(&[
        "--path",
        &format!("/download?bytes={mib10}"),
        "--requests",
        "1",
    ]);
    no_errors(&v);
    assert_eq!(v["bytes_received"], 10 * 1024 * 1024);
    // Many small RPCs on one connection, spread over every pod.
    let v = client(&[
        "--path",
        "/unary",
        "--requests",
        "400",
        "--concurrency",
        "16",
    ]);
    no_errors(&v);
    assert_eq!(v["statuses"]["0"], 400, "{v}");
    assert_eq!(pods_of(&v).len(), 4, "{v}");
    // A client that is not HTTP/2 is not spliced, and still works.
    let v = h2_raw(
        &t.client.name,
        Some(&t.cgroup.path),
        "198.19.0.51:80",
        "68656c6c6f0a",
        2,
    )
    .expect("raw");
    assert!(
        v["text"].as_str().is_some_and(|x| x.ends_with("hello\n")),
        "{v}"
    );
    // Three HTTP/2 client connections, two directions each: spliced. The
    // plain one stayed on TCP.
    let status = agent.status_json().expect("status");
    let on = status["counters"]["splice_on"].as_u64().unwrap_or(0);
    let off = status["counters"]["splice_off"].as_u64().unwrap_or(0);
    assert!(on >= 3, "client directions spliced: {status}");
    assert!(off >= 1, "the plain client stayed on TCP: {status}");
    assert_eq!(status["counters"]["splice_full"], 0, "{status}");
}

/// CPU ticks (user + system) of each of the router's worker threads
/// (`router-0`, `router-1`, ...), by name.
fn worker_ticks(pid: u32) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("router tasks")
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            (name.starts_with("router-") && name != "router-accept").then_some((name, ticks))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn two_client_connections_on_two_router_threads_use_both() {
    let s = common::setup_with("h2threads", 4, &["--router-threads", "2"]);
    let pid = s.agent.router_pid().expect("router pid");
    let before = worker_ticks(pid);
    assert_eq!(before.len(), 2, "two workers: {before:?}");
    // Two connections at once, each with many streams.
    let clients: Vec<_> = (0..2)
        .map(|_| {
            h2_client_spawn(
                &s.t.client.name,
                Some(&s.t.cgroup.path),
                VIP,
                &[
                    "--path",
                    "/unary",
                    "--requests",
                    "6000",
                    "--concurrency",
                    "16",
                ],
            )
            .expect("client")
        })
        .collect();
    for c in clients {
        let v = h2_client_wait(c).expect("client result");
        no_errors(&v);
        assert_eq!(v["statuses"]["0"], 6000, "{v}");
        let pods = pods_of(&v);
        assert_eq!(pods.len(), 4, "each connection spread over all pods: {v}");
    }
    let after = worker_ticks(pid);
    let used: Vec<u64> = after
        .iter()
        .zip(&before)
        .map(|((_, a), (_, b))| a - b)
        .collect();
    let total: u64 = used.iter().sum();
    assert!(total > 0, "{after:?}");
    // One connection per worker (the acceptor gives each to the one with
    // fewer), so each did about half the work.
    for u in &used {
        assert!(
            *u * 10 >= total * 3,
            "each worker did at least 30% of the work: {used:?} ticks"
        );
    }
}
