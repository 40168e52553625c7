//! Endpoint churn under load: every 100 ms for 60 s an endpoint goes
//! terminating, the one that was terminating goes away, and another comes,
//! while a grpcio channel (16 unary RPCs in flight) and h2load (2
//! connections x 16 streams) run through the router. Pods terminate
//! gracefully (they keep serving what they were sent), so not one request
//! may fail; at the end every count is back to 0. Once with the endpoints
//! file, once with the Kubernetes source (fake apiserver).

use std::time::{Duration, Instant};

use balancer_tests::{
    agent::Agent,
    fakeapi::{FakeApi, Kind},
    grpc::{self, Killed, Load},
    nghttp2::{h2load_spawn, h2load_wait},
    process::require_root,
    topology::{ROUTER_ADDR, Topology},
};
use serde_json::{Value, json};

const GRPC_PORT: u16 = 50054;
const H2_PORT: u16 = 8081;
const VIP: &str = "198.19.0.90";
const PODS: usize = 8;
/// Ready endpoints at any time (one more is terminating).
const READY: usize = 4;
const STEP: Duration = Duration::from_millis(100);
const CHURN: Duration = Duration::from_secs(60);

/// The endpoints at churn step `k`: pods `k+1..=k+READY` ready, pod `k`
/// terminating (serving), the others absent. Each step one endpoint goes
/// terminating, the terminating one goes away, and one comes.
fn step(k: usize) -> Vec<(usize, bool)> {
    let mut v = vec![(k % PODS, false)];
    v.extend((1..=READY).map(|i| ((k + i) % PODS, true)));
    v
}

fn file_yaml(t: &Topology, k: usize) -> String {
    let mut y = format!(
        "services:\n  - name: default/churn\n    addresses: [{VIP}]\n    ports:\n      - name: grpc\n        port: 80\n        targetPort: {GRPC_PORT}\n        protocol: http2\n      - name: h2\n        port: 81\n        targetPort: {H2_PORT}\n        protocol: http2\n    endpoints:\n"
    );
    for (i, ready) in step(k) {
        y += &format!(
            "      - address: {}\n        ready: {ready}\n        serving: true\n        terminating: {}\n",
            t.pods[i].v4, !ready
        );
    }
    y
}

fn service() -> Value {
    json!({"metadata": {"name": "churn", "namespace": "default"},
           "spec": {"type": "ClusterIP", "clusterIP": VIP, "clusterIPs": [VIP],
                    "ports": [
                        {"name": "grpc", "port": 80, "protocol": "TCP", "targetPort": GRPC_PORT,
                         "appProtocol": "kubernetes.io/h2c"},
                        {"name": "h2", "port": 81, "protocol": "TCP", "targetPort": H2_PORT,
                         "appProtocol": "kubernetes.io/h2c"}]}})
}

fn slice(t: &Topology, k: usize) -> Value {
    let eps: Vec<Value> = step(k)
        .into_iter()
        .map(|(i, ready)| {
            json!({"addresses": [t.pods[i].v4.to_string()],
                   "conditions": {"ready": ready, "serving": true, "terminating": !ready}})
        })
        .collect();
    json!({"metadata": {"name": "churn-a", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": "churn"}},
           "addressType": "IPv4",
           "ports": [{"name": "grpc", "port": GRPC_PORT, "protocol": "TCP"},
                     {"name": "h2", "port": H2_PORT, "protocol": "TCP"}],
           "endpoints": eps})
}

/// Servers on every pod: grpcio and nghttpd.
fn servers(t: &Topology) -> (Vec<Killed>, balancer_tests::nghttp2::Nghttpd) {
    let g = t
        .pods
        .iter()
        .map(|p| grpc::server(&p.ns.name, &p.name, GRPC_PORT).expect("grpc server"))
        .collect();
    (g, t.start_nghttpd(H2_PORT).expect("nghttpd"))
}

/// Run the churn with `apply(k)` for step `k` under both loads, then check
/// that nothing failed and that every count went back to 0.
fn churn_under_load(t: &Topology, agent: &Agent, mut apply: impl FnMut(usize)) {
    let load = Load::start(
        &t.client.name,
        &t.cgroup.path,
        &format!("{VIP}:80"),
        CHURN.as_secs_f64(),
        16,
    )
    .expect("grpc load");
    let url = format!("http://{VIP}:81/index");
    let secs = CHURN.as_secs().to_string();
    let h2load = h2load_spawn(
        &t.client.name,
        Some(&t.cgroup.path),
        &["-D", &secs, "-c", "2", "-m", "16", &url],
    )
    .expect("h2load");
    let start = Instant::now();
    let mut k = 1;
    while start.elapsed() < CHURN {
        apply(k);
        let next = start + STEP * k as u32;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        k += 1;
    }
    let r = load.wait().expect("grpc load report");
    let h = h2load_wait(h2load).expect("h2load");
    let status = agent.status_json().expect("status");
    eprintln!(
        "{k} churn steps in {:?}: grpcio {} RPCs ok, {} failed, over {} pods; h2load {}; reloads {}",
        start.elapsed(),
        r.ok,
        r.failures.len(),
        r.pods_after(0).len(),
        h.summary(),
        status["last_reload"]
    );
    assert!(r.failures.is_empty(), "failed RPCs: {:?}", r.failures);
    assert!(r.ok > 10_000, "the grpc load ran: {}", r.ok);
    assert_eq!(r.pods_after(0).len(), PODS, "every pod served in turn");
    assert!(
        h.done > 10_000 && h.failed == 0 && h.errored == 0 && h.timeout == 0,
        "h2load: {}",
        h.summary()
    );
    assert_eq!(h.status_2xx, h.done, "h2load: {}", h.summary());
    // Every count back to 0 once the clients are gone.
    Topology::wait_for("counts back to 0", Duration::from_secs(10), || {
        let v = agent.endpoints_json()?;
        let s = agent.status_json()?;
        let busy = v["services"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .any(|e| e["active_connections"] != 0 || e["active_streams"] != 0);
        let draining = v["draining"].as_array().is_some_and(|d| !d.is_empty());
        let clients = s["router"]["process"]["client_connections"].as_u64();
        Ok(!busy && !draining && clients == Some(0))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            agent.endpoints_json().unwrap_or_default(),
            agent.status_json().unwrap_or_default()
        )
    });
}

#[test]
fn endpoint_churn_every_100ms_from_the_file_fails_no_request() {
    require_root();
    let t = Topology::new("churnf", PODS, &[]).expect("topology");
    let _servers = servers(&t);
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &file_yaml(&t, 0),
        Some(&t.node.name),
        &["--proxy-addr", ROUTER_ADDR],
    )
    .expect("agent");
    let (tmp, file) = (agent.dir.join("churn.tmp"), agent.endpoints_file.clone());
    churn_under_load(&t, &agent, |k| {
        // Write-then-rename, as a ConfigMap update does.
        std::fs::write(&tmp, file_yaml(&t, k)).expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
    });
}

#[test]
fn endpoint_churn_every_100ms_from_the_apiserver_fails_no_request() {
    require_root();
    let t = Topology::new("churnk", PODS, &[]).expect("topology");
    let _servers = servers(&t);
    let dir = std::env::temp_dir().join(format!("{}-api", t.prefix));
    let api = FakeApi::start(&dir).expect("fake apiserver");
    api.apply(Kind::Service, service());
    api.apply(Kind::EndpointSlice, slice(&t, 0));
    let agent = Agent::start_kube(
        &t.prefix,
        &t.cgroup.path,
        &api.kubeconfig,
        &["--proxy-addr", ROUTER_ADDR, "--router-netns", &t.node.name],
    )
    .expect("agent");
    Topology::wait_for("the first sync", Duration::from_secs(20), || {
        Ok(agent.router_synced()? && agent.status_json()?["router"]["process"]["routes"] == 2)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    churn_under_load(&t, &agent, |k| api.apply(Kind::EndpointSlice, slice(&t, k)));
}
