//! A real gRPC stack (Python grpcio, client and servers) through the
//! router: one channel, unary, server-streaming, client-streaming and bidi
//! RPCs, and a failing RPC, over 4 pods.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

use balancer_tests::{
    agent::Agent,
    process::require_root,
    topology::{ROUTER_ADDR, Topology},
};
use serde_json::Value;

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grpc/peer.py");
const PORT: u16 = 50052;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn grpc_server(ns: &str, name: &str) -> Killed {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "python3",
            PEER,
            "serve",
            name,
            &PORT.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 grpc server (cargo xtask setup installs grpcio)");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "listening", "grpc server did not start");
    Killed(child)
}

/// The gRPC service on every pod, in http2 mode.
fn grpc_yaml(t: &Topology) -> String {
    let mut yaml = format!(
        "services:\n  - name: default/grpc\n    addresses: [198.19.0.70]\n    ports:\n      - name: grpc\n        port: 80\n        targetPort: {PORT}\n        protocol: http2\n    endpoints:\n"
    );
    for p in &t.pods {
        yaml += &format!("      - address: {}\n", p.v4);
    }
    yaml
}

#[test]
fn grpcio_one_channel_unary_and_streaming_rpcs_spread_over_all_pods() {
    require_root();
    let t = Topology::new("grpcio", 4, &[]).expect("topology");
    let _servers: Vec<Killed> = t
        .pods
        .iter()
        .map(|p| grpc_server(&p.ns.name, &p.name))
        .collect();
    let yaml = grpc_yaml(&t);
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &yaml,
        Some(&t.node.name),
        &["--proxy-addr", ROUTER_ADDR],
    )
    .expect("agent");
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 {PEER} client 198.19.0.70:80 400",
        t.cgroup.path.display(),
        t.client.name
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).expect("json");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["intact"], true, "{v}");
    for p in &t.pods {
        let n = v["unary"][&p.name].as_u64().unwrap_or(0);
        assert!(
            (90..=110).contains(&n),
            "{} got {n} of 400 unary RPCs: {v}",
            p.name
        );
    }
    for kind in ["server_stream", "client_stream", "bidi"] {
        let pods = v[kind].as_object().map_or(0, |o| o.len());
        assert!(pods >= 3, "{kind} RPCs reached only {pods} pods: {v}");
    }
    assert_eq!(v["fail_status"], "StatusCode.FAILED_PRECONDITION", "{v}");
    assert!(
        v["fail_details"]
            .as_str()
            .is_some_and(|d| d.ends_with("refuses")),
        "{v}"
    );
    let e = agent.endpoints_json().expect("json");
    let total: u64 = e["services"][0]["endpoints"]
        .as_array()
        .expect("eps")
        .iter()
        .map(|x| x["streams_total"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 400 + 3 * 16 + 1, "every RPC is one stream: {e}");
}

#[test]
fn rolling_upgrade_under_grpc_load_fails_no_rpc() {
    require_root();
    let t = Topology::new("grpcupg", 4, &[]).expect("topology");
    let _servers: Vec<Killed> = t
        .pods
        .iter()
        .map(|p| grpc_server(&p.ns.name, &p.name))
        .collect();
    let yaml = grpc_yaml(&t);
    let pin_dir = balancer_tests::agent::PinDir::new(&t.prefix);
    let pins = pin_dir.path.clone();
    let args = [
        "--proxy-addr",
        ROUTER_ADDR,
        "--pin",
        "--bpffs",
        pins.as_str(),
    ];
    let mut old = Agent::start_with(&t.prefix, &t.cgroup.path, &yaml, Some(&t.node.name), &args)
        .expect("old agent");
    // A real gRPC client on one channel, busy the whole time.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 {PEER} client 198.19.0.70:80 2000",
        t.cgroup.path.display(),
        t.client.name
    );
    let client = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("client");
    std::thread::sleep(std::time::Duration::from_millis(800));
    // The new agent adopts the pinned data path and listens beside the old
    // one (SO_REUSEPORT); then the old one drains and exits.
    let new = Agent::start_with(
        &format!("{}-new", t.prefix),
        &t.cgroup.path,
        &yaml,
        Some(&t.node.name),
        &args,
    )
    .expect("new agent");
    assert!(
        new.log().contains("adopted the pinned data path"),
        "{}",
        new.log()
    );
    let status = old.stop().expect("stop old");
    assert!(status.success(), "{}", old.log());
    let out = client.wait_with_output().expect("client");
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).expect("json");
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(0),
        "failed RPCs during the upgrade: {v}"
    );
    let unary: u64 = v["unary"]
        .as_object()
        .expect("unary")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(unary, 2000, "{v}");
    assert_eq!(v["intact"], true, "{v}");
    // The new agent served the rest.
    let e = new.endpoints_json().expect("json");
    let served: u64 = e["services"][0]["endpoints"]
        .as_array()
        .expect("eps")
        .iter()
        .map(|x| x["streams_total"].as_u64().unwrap_or(0))
        .sum();
    assert!(served > 0, "the new agent took over: {e}");
}
