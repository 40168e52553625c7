//! `balancer-agent endpoints` shows what each port really does: streams,
//! latency and failures (through the router) for `http2` ports,
//! connections for `tcp` ports, both with `-o wide`, and the JSON as it
//! was (issue 20 §2).

use std::time::Duration;

use balancer_tests::{
    agent::Agent,
    peers::{H2_PORT, SINK_PORT, h2_client, h2_client_spawn, h2_client_wait, hold_connections},
    process::require_root,
    topology::{ROUTER_ADDR, Topology},
};
use serde_json::Value;

const GRPC: &str = "default/ep-grpc";
const GRPC_VIP: &str = "198.19.0.110";
const TCP: &str = "default/ep-tcp";
const TCP_VIP: &str = "198.19.0.111";
/// One http2 port and one tcp port, to other target ports.
const MIXED: &str = "default/ep-mixed";
const MIXED_VIP: &str = "198.19.0.112";

/// `tcp_pods` are the tcp service's endpoints; every pod is the http2
/// and the mixed service's.
fn yaml(t: &Topology, tcp_pods: &[usize]) -> String {
    let all = |pods: &mut dyn Iterator<Item = usize>| -> String {
        pods.map(|i| format!("      - address: {}\n", t.pods[i].v4))
            .collect()
    };
    let n = t.pods.len();
    format!(
        "services:\n\
         \x20 - name: {GRPC}\n    addresses: [{GRPC_VIP}]\n    ports:\n\
         \x20     - port: 80\n        targetPort: {H2_PORT}\n        protocol: http2\n\
         \x20   endpoints:\n{}\
         \x20 - name: {TCP}\n    addresses: [{TCP_VIP}]\n    ports:\n\
         \x20     - port: 80\n        targetPort: 8080\n\
         \x20   endpoints:\n{}\
         \x20 - name: {MIXED}\n    addresses: [{MIXED_VIP}]\n    ports:\n\
         \x20     - name: grpc\n        port: 80\n        targetPort: {H2_PORT}\n        protocol: http2\n\
         \x20     - name: sink\n        port: 81\n        targetPort: {SINK_PORT}\n\
         \x20   endpoints:\n{}",
        all(&mut (0..n)),
        all(&mut tcp_pods.iter().copied()),
        all(&mut (0..n)),
    )
}

/// Two pods with TCP servers on 8080 and HTTP/2 servers, and the agent
/// with its router.
fn setup(tag: &str, extra: &[&str]) -> (Topology, Agent) {
    let mut t = Topology::new(tag, 2, &[8080]).expect("topology");
    t.start_h2().expect("h2 servers");
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &yaml(&t, &[0, 1]),
        Some(&t.node.name),
        &[&["--proxy-addr", ROUTER_ADDR][..], extra].concat(),
    )
    .expect("agent");
    (t, agent)
}

/// One table of the output: its header and its rows, cells split on
/// whitespace (only the last column, EJECTED, has spaces in it).
#[derive(Debug)]
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn col(&self, name: &str) -> usize {
        self.header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", self.header))
    }

    /// The rows of `service`.
    fn rows_of(&self, service: &str) -> Vec<&Vec<String>> {
        self.rows.iter().filter(|r| r[0] == service).collect()
    }

    fn cell<'a>(&self, row: &'a [String], name: &str) -> &'a str {
        &row[self.col(name)]
    }

    fn num(&self, row: &[String], name: &str) -> u64 {
        let c = self.cell(row, name);
        c.parse()
            .unwrap_or_else(|_| panic!("{name} = {c:?} is not a number: {row:?}"))
    }
}

/// The tables of a CLI output: blocks separated by a blank line.
fn tables(out: &str) -> Vec<Table> {
    out.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let mut lines = b
                .lines()
                .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
            Table {
                header: lines.next().expect("header"),
                rows: lines.collect(),
            }
        })
        .collect()
}

const FIRST: [&str; 5] = ["SERVICE", "ENDPOINT", "STATE", "USABLE", "ZONE"];

fn header(cols: &[&str]) -> Vec<String> {
    FIRST.iter().chain(cols).map(|s| (*s).to_owned()).collect()
}

/// A latency with its unit: `850µs`, `20.3ms`, `1.25s`.
fn is_latency(c: &str) -> bool {
    ["µs", "ms", "s"]
        .iter()
        .any(|u| c.strip_suffix(u).is_some_and(|n| n.parse::<f64>().is_ok()))
}

/// The endpoints of `service` in the JSON view, by "address:port".
fn json_endpoints(v: &Value, service: &str) -> Vec<Value> {
    v["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == service)
        .unwrap_or_else(|| panic!("no {service} in {v}"))["endpoints"]
        .as_array()
        .expect("endpoints")
        .clone()
}

#[test]
fn endpoints_shows_streams_for_http2_ports_and_connections_for_tcp_ports() {
    require_root();
    let (t, agent) = setup("epcli", &[]);
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let grpc = format!("{GRPC_VIP}:80");

    // Streams in flight: four slow ones, spread by least-request.
    let slow = h2_client_spawn(
        &t.client.name,
        Some(&t.cgroup.path),
        &grpc,
        &[
            "--path",
            "/slow?ms=4000",
            "--requests",
            "4",
            "--concurrency",
            "4",
        ],
    )
    .expect("slow client");
    Topology::wait_for("4 streams in flight", Duration::from_secs(5), || {
        let v = agent.endpoints_json()?;
        Ok(json_endpoints(&v, GRPC)
            .iter()
            .map(|e| e["active_streams"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 4)
    })
    .expect("in flight");
    let out = agent.cli(&["endpoints"]).expect("endpoints");
    let ts = tables(&out);
    let streams = ts
        .iter()
        .find(|t| t.header.contains(&"STREAMS".to_owned()))
        .unwrap_or_else(|| panic!("no streams table:\n{out}"));
    let rows = streams.rows_of(GRPC);
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(
        rows.iter().map(|r| streams.num(r, "STREAMS")).sum::<u64>(),
        4,
        "{out}"
    );
    let v = h2_client_wait(slow).expect("slow client");
    assert_eq!(v["statuses"]["0"], 4, "{v}");

    // Then finished streams, and held TCP connections.
    let v = h2_client(
        &t.client.name,
        Some(&t.cgroup.path),
        &grpc,
        &[
            "--path",
            "/slow?ms=20",
            "--requests",
            "40",
            "--concurrency",
            "4",
        ],
    )
    .expect("client");
    assert_eq!(v["statuses"]["0"], 40, "{v}");
    let held = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{TCP_VIP}:80"),
        6,
    )
    .expect("hold");
    Topology::wait_for("6 connections counted", Duration::from_secs(5), || {
        Ok(agent.active_by_endpoint(TCP)?.values().sum::<u64>() == 6)
    })
    .expect("counts");
    Topology::wait_for("no stream in flight", Duration::from_secs(5), || {
        let v = agent.endpoints_json()?;
        Ok(json_endpoints(&v, GRPC)
            .iter()
            .all(|e| e["active_streams"] == 0))
    })
    .expect("streams done");

    // The default table: one table per kind of port.
    let out = agent.cli(&["endpoints"]).expect("endpoints");
    println!("endpoints:\n{out}");
    let ts = tables(&out);
    assert_eq!(ts.len(), 2, "a connections and a streams table:\n{out}");
    let (conns, streams) = (&ts[0], &ts[1]);
    assert_eq!(
        conns.header,
        header(&["ACTIVE", "TOTAL", "EJECTED"]),
        "the tcp table as it was:\n{out}"
    );
    assert_eq!(
        streams.header,
        header(&["STREAMS", "STREAMS-TOTAL", "LATENCY", "FAILURES", "EJECTED"]),
        "{out}"
    );
    // tcp: the held connections, 3 and 3 (least-conn); no stream columns.
    let rows = conns.rows_of(TCP);
    assert_eq!(rows.len(), 2, "{out}");
    for (r, ep) in rows.iter().zip(&eps) {
        assert_eq!(conns.cell(r, "ENDPOINT"), format!("{ep}:8080"), "{out}");
        assert_eq!(conns.cell(r, "STATE"), "ready", "{out}");
        assert_eq!(conns.num(r, "ACTIVE"), 3, "{out}");
        assert_eq!(conns.num(r, "TOTAL"), 3, "{out}");
        assert_eq!(conns.cell(r, "EJECTED"), "-", "{out}");
    }
    assert!(streams.rows_of(TCP).is_empty(), "{out}");
    // http2: 44 streams over both pods, a latency, no failure; no
    // connection columns (its connections went to the router).
    let rows = streams.rows_of(GRPC);
    assert_eq!(rows.len(), 2, "{out}");
    let mut total = 0;
    for (r, ep) in rows.iter().zip(&eps) {
        assert_eq!(
            streams.cell(r, "ENDPOINT"),
            format!("{ep}:{H2_PORT}"),
            "{out}"
        );
        assert_eq!(streams.num(r, "STREAMS"), 0, "{out}");
        let n = streams.num(r, "STREAMS-TOTAL");
        assert!(n > 0, "every pod served streams:\n{out}");
        total += n;
        assert!(is_latency(streams.cell(r, "LATENCY")), "{out}");
        assert_eq!(streams.num(r, "FAILURES"), 0, "{out}");
        assert_eq!(streams.cell(r, "EJECTED"), "-", "{out}");
    }
    assert_eq!(total, 44, "{out}");
    assert!(conns.rows_of(GRPC).is_empty(), "{out}");
    // Both kinds of port: each endpoint row where its port belongs.
    let c: Vec<&str> = conns
        .rows_of(MIXED)
        .iter()
        .map(|r| conns.cell(r, "ENDPOINT"))
        .collect();
    let s: Vec<&str> = streams
        .rows_of(MIXED)
        .iter()
        .map(|r| streams.cell(r, "ENDPOINT"))
        .collect();
    assert_eq!(
        c,
        eps.iter()
            .map(|e| format!("{e}:{SINK_PORT}"))
            .collect::<Vec<_>>(),
        "{out}"
    );
    assert_eq!(
        s,
        eps.iter()
            .map(|e| format!("{e}:{H2_PORT}"))
            .collect::<Vec<_>>(),
        "{out}"
    );

    // -o wide: every column for every endpoint, in one table.
    let out = agent.cli(&["endpoints", "-o", "wide"]).expect("wide");
    println!("endpoints -o wide:\n{out}");
    let ts = tables(&out);
    assert_eq!(ts.len(), 1, "{out}");
    let w = &ts[0];
    for h in [
        "PROTOCOL",
        "ACTIVE",
        "TOTAL",
        "STREAMS",
        "STREAMS-TOTAL",
        "LATENCY",
        "FAILURES",
        "EJECTIONS",
        "EJECTED",
    ] {
        assert!(w.header.contains(&h.to_owned()), "no {h}:\n{out}");
    }
    assert_eq!(w.rows.len(), 8, "{out}");
    for r in w.rows_of(TCP) {
        assert_eq!(w.cell(r, "PROTOCOL"), "tcp", "{out}");
        assert_eq!(w.num(r, "ACTIVE"), 3, "{out}");
        assert_eq!(w.num(r, "STREAMS-TOTAL"), 0, "{out}");
    }
    let rows = w.rows_of(GRPC);
    assert_eq!(rows.len(), 2, "{out}");
    for r in rows {
        assert_eq!(w.cell(r, "PROTOCOL"), "http2", "{out}");
        assert_eq!(w.num(r, "ACTIVE"), 0, "{out}");
        assert!(w.num(r, "STREAMS-TOTAL") > 0, "{out}");
        assert!(is_latency(w.cell(r, "LATENCY")), "{out}");
    }
    let protocols: Vec<&str> = w
        .rows_of(MIXED)
        .iter()
        .map(|r| w.cell(r, "PROTOCOL"))
        .collect();
    assert_eq!(protocols, ["tcp", "http2", "tcp", "http2"], "{out}");

    // -o json: the same view as before, every field still there.
    let out = agent.cli(&["endpoints", "-o", "json"]).expect("json");
    let v: Value = serde_json::from_str(&out).expect("json parses");
    assert!(v["draining"].is_array(), "{v}");
    for s in v["services"].as_array().expect("services") {
        for k in ["name", "addresses", "ports", "endpoints"] {
            assert!(s.get(k).is_some(), "service lacks {k}: {s}");
        }
        for p in s["ports"].as_array().expect("ports") {
            for k in ["name", "port", "target_port", "protocol", "algorithm"] {
                assert!(p.get(k).is_some(), "port lacks {k}: {p}");
            }
        }
    }
    for svc in [GRPC, TCP, MIXED] {
        for e in json_endpoints(&v, svc) {
            for k in [
                "address",
                "port",
                "zone",
                "ready",
                "serving",
                "terminating",
                "usable",
                "active_connections",
                "connections_total",
                "active_streams",
                "streams_total",
                "ewma_us",
                "failures",
                "ejections",
                "ejected_for_ms",
            ] {
                assert!(e.get(k).is_some(), "{svc} endpoint lacks {k}: {e}");
            }
        }
    }
    let tcp = json_endpoints(&v, TCP);
    assert!(tcp.iter().all(|e| e["active_connections"] == 3), "{v}");
    let grpc = json_endpoints(&v, GRPC);
    assert_eq!(
        grpc.iter()
            .map(|e| e["streams_total"].as_u64().expect("streams_total"))
            .sum::<u64>(),
        44,
        "{v}"
    );
    assert!(
        grpc.iter().all(|e| e["ewma_us"].as_u64() > Some(0)
            && e["active_connections"] == 0
            && e["connections_total"] == 0),
        "{v}"
    );
    held.close().expect("close");
}

#[test]
fn endpoints_keeps_draining_backends_in_the_connections_table() {
    require_root();
    // Connections of a removed endpoint left to TCP: it drains.
    let (t, agent) = setup("epdrain", &["--end-removed-connections", "false"]);
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let held = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{TCP_VIP}:80"),
        4,
    )
    .expect("hold");
    Topology::wait_for("4 connections counted", Duration::from_secs(5), || {
        Ok(agent.active_by_endpoint(TCP)?.values().sum::<u64>() == 4)
    })
    .expect("counts");
    // pod1:8080 leaves its only service.
    let status = agent.reload(&yaml(&t, &[0])).expect("reload");
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    let gone = format!("{}:8080", eps[1]);

    let out = agent.cli(&["endpoints"]).expect("endpoints");
    println!("endpoints:\n{out}");
    let ts = tables(&out);
    assert_eq!(ts.len(), 2, "{out}");
    let conns = &ts[0];
    assert_eq!(
        conns.header,
        header(&["ACTIVE", "TOTAL", "EJECTED"]),
        "{out}"
    );
    let rows = conns.rows_of("(removed)");
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(conns.cell(rows[0], "ENDPOINT"), gone, "{out}");
    assert_eq!(conns.cell(rows[0], "STATE"), "draining", "{out}");
    assert_eq!(conns.num(rows[0], "ACTIVE"), 2, "{out}");
    assert!(ts[1].rows_of("(removed)").is_empty(), "{out}");
    // No stream yet: no latency (the router's starting guess is not shown).
    let grpc = ts[1].rows_of(GRPC);
    assert_eq!(grpc.len(), 2, "{out}");
    for r in grpc {
        assert_eq!(ts[1].cell(r, "LATENCY"), "-", "{out}");
    }

    let out = agent.cli(&["endpoints", "-o", "wide"]).expect("wide");
    println!("endpoints -o wide:\n{out}");
    let w = &tables(&out)[0];
    let rows = w.rows_of("(removed)");
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(w.cell(rows[0], "STATE"), "draining", "{out}");
    assert_eq!(w.num(rows[0], "ACTIVE"), 2, "{out}");
    assert_eq!(w.cell(rows[0], "STREAMS"), "-", "{out}");

    let v = agent.endpoints_json().expect("json");
    let d = &v["draining"][0];
    assert_eq!(
        (&d["address"], &d["port"], &d["active_connections"]),
        (
            &Value::from(eps[1].as_str()),
            &Value::from(8080),
            &Value::from(2)
        ),
        "{v}"
    );
    held.close().expect("close");
    Topology::wait_for("the drained backend to go", Duration::from_secs(5), || {
        Ok(agent.endpoints_json()?["draining"]
            .as_array()
            .is_some_and(Vec::is_empty))
    })
    .expect("drained");
    let out = agent.cli(&["endpoints"]).expect("endpoints");
    assert!(!out.contains("(removed)"), "{out}");
}
