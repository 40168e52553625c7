//! Stream-level balancing of HTTP/2 (h2c) through the agent's router, with
//! real `h2` clients and servers in pod namespaces.

use std::time::Duration;

use balancer_tests::{
    Agent, H2_PORT, ROUTER_ADDR, Topology, h2_client, h2_client_spawn, h2_client_wait, h2_raw,
};
use serde_json::Value;

const SVC: &str = "default/grpc";
const VIP: &str = "198.19.0.50:80";

fn http2_yaml(t: &Topology, pods: &[usize]) -> String {
    let mut y = format!(
        "services:\n  - name: {SVC}\n    addresses: [198.19.0.50]\n    ports:\n      - port: 80\n        targetPort: {H2_PORT}\n        protocol: http2\n    endpoints:\n"
    );
    for &i in pods {
        y += &format!("      - address: {}\n", t.pods[i].v4);
    }
    y
}

struct Setup {
    t: Topology,
    agent: Agent,
}

fn setup(tag: &str, pods: usize) -> Setup {
    let mut t = Topology::new(tag, pods, &[]).expect("topology");
    t.start_h2().expect("h2 servers");
    let all: Vec<usize> = (0..pods).collect();
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &http2_yaml(&t, &all),
        Some(&t.node.name),
        &["--proxy-addr", ROUTER_ADDR],
    )
    .expect("agent");
    Setup { t, agent }
}

impl Setup {
    fn client(&self, extra: &[&str]) -> Value {
        h2_client(&self.t.client.name, Some(&self.t.cgroup.path), VIP, extra).expect("client")
    }
}

fn pods_of(v: &Value) -> Vec<(String, u64)> {
    v["pods"]
        .as_object()
        .map(|o| o.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

fn no_errors(v: &Value) {
    assert!(v["errors"].as_object().is_none_or(|e| e.is_empty()), "errors: {v}");
}

#[test]
fn one_connection_10k_unary_rpcs_spread_within_5_percent() {
    let s = setup("h2spread", 4);
    let v = s.client(&["--path", "/unary", "--requests", "10000", "--concurrency", "32"]);
    no_errors(&v);
    let pods = pods_of(&v);
    assert_eq!(pods.len(), 4, "{v}");
    for (pod, n) in &pods {
        assert!((2375..=2625).contains(n), "{pod} got {n} of 10000: {v}");
    }
    assert_eq!(v["peer"], VIP, "getpeername on the steered connection returns the VIP");
    // The agent's view: streams per endpoint, and a latency estimate.
    let e = s.agent.endpoints_json().expect("json");
    let eps = e["services"][0]["endpoints"].as_array().expect("eps");
    let total: u64 = eps.iter().map(|e| e["streams_total"].as_u64().expect("streams_total")).sum();
    assert_eq!(total, 10000, "{e}");
    assert!(eps.iter().all(|e| e["ewma_us"].as_u64().expect("ewma") > 0));
    assert_eq!(s.agent.status_json().expect("status")["counters"]["steered"], 1);
}
