//! Shared setup of the HTTP/2 tests: an agent with its router in the node
//! namespace, `lbt-h2` servers in every pod.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use balancer_tests::{
    agent::Agent,
    peers::{H2_PORT, h2_client},
    topology::{ROUTER_ADDR, Topology},
};
use serde_json::Value;

pub const SVC: &str = "default/grpc";
pub const VIP: &str = "198.19.0.50:80";

pub fn http2_yaml(t: &Topology, pods: &[usize]) -> String {
    let mut y = format!(
        "services:\n  - name: {SVC}\n    addresses: [198.19.0.50]\n    ports:\n      - port: 80\n        targetPort: {H2_PORT}\n        protocol: http2\n    endpoints:\n"
    );
    for &i in pods {
        y += &format!("      - address: {}\n", t.pods[i].v4);
    }
    // The same pods' plain TCP servers behind an http2 port, to check that
    // a client that does not speak HTTP/2 is passed through.
    y += "  - name: default/plain\n    addresses: [198.19.0.51]\n    ports:\n      - port: 80\n        targetPort: 8080\n        protocol: http2\n    endpoints:\n";
    for &i in pods {
        y += &format!("      - address: {}\n", t.pods[i].v4);
    }
    // The HTTP/2 servers behind a plain tcp port: balanced per connection,
    // with sk_msg counting the streams.
    y += &format!(
        "  - name: default/grpc-l4\n    addresses: [198.19.0.52]\n    ports:\n      - port: 80\n        targetPort: {H2_PORT}\n    endpoints:\n"
    );
    for &i in pods {
        y += &format!("      - address: {}\n", t.pods[i].v4);
    }
    y
}

pub struct Setup {
    pub t: Topology,
    pub agent: Agent,
}

pub fn setup(tag: &str, pods: usize) -> Setup {
    setup_with(tag, pods, &[])
}

/// As [`setup`], with more agent arguments.
pub fn setup_with(tag: &str, pods: usize, extra: &[&str]) -> Setup {
    // Plain TCP servers on 8080 too, for the non-HTTP/2 pass-through.
    let mut t = Topology::new(tag, pods, &[8080]).expect("topology");
    t.start_h2().expect("h2 servers");
    let all: Vec<usize> = (0..pods).collect();
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &http2_yaml(&t, &all),
        Some(&t.node.name),
        &[&["--proxy-addr", ROUTER_ADDR][..], extra].concat(),
    )
    .expect("agent");
    Setup { t, agent }
}

impl Setup {
    pub fn client(&self, extra: &[&str]) -> Value {
        h2_client(&self.t.client.name, Some(&self.t.cgroup.path), VIP, extra).expect("client")
    }
}

pub fn pods_of(v: &Value) -> Vec<(String, u64)> {
    v["pods"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

pub fn no_errors(v: &Value) {
    assert!(
        v["errors"].as_object().is_none_or(|e| e.is_empty()),
        "errors: {v}"
    );
}
