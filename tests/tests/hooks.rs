//! Sharing the hooks: another program on the agent's cgroup hooks (here a
//! second agent's, attached after the first) is listed by `status`, and
//! the agent that runs second is told plainly that a program runs before
//! its connect4/6: a VIP that program rewrites (a CNI's socket load
//! balancer) never reaches it.

use balancer_tests::{
    agent::Agent, process::require_root, topology::Topology, yaml::endpoints_yaml,
};
use serde_json::Value;

fn program<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {status}"))
}

#[test]
fn status_lists_other_programs_on_our_hooks_and_says_which_run_first() {
    require_root();
    let t = Topology::new("hooks", 1, &[8080]).expect("topology");
    let yaml = endpoints_yaml(
        "default/web",
        &["198.19.0.79"],
        80,
        8080,
        "least-conn",
        &[t.pods[0].v4.to_string()],
    );
    let first = Agent::start(&format!("{}-a", t.prefix), &t.cgroup.path, &yaml).expect("first");
    let second = Agent::start(&format!("{}-b", t.prefix), &t.cgroup.path, &yaml).expect("second");
    let (a, b) = (
        first.status_json().expect("status"),
        second.status_json().expect("status"),
    );
    for name in [
        "balancer_connect4",
        "balancer_connect6",
        "balancer_sock_ops",
    ] {
        let (pa, pb) = (program(&a, name), program(&b, name));
        for p in [pa, pb] {
            assert_eq!(p["attached"], true, "{p}");
            assert_eq!(
                p["ids"].as_array().map(Vec::len),
                Some(1),
                "its own only: {p}"
            );
        }
        assert_ne!(pa["ids"], pb["ids"], "two programs");
        // The first agent's program runs first; the second's after it.
        let others_a = pa["others"].as_array().expect("others");
        assert_eq!(others_a.len(), 1, "{pa}");
        assert_eq!(others_a[0]["id"], pb["ids"][0], "{pa} {pb}");
        assert_eq!(others_a[0]["before"], false, "{pa}");
        let others_b = pb["others"].as_array().expect("others");
        assert_eq!(others_b.len(), 1, "{pb}");
        assert_eq!(others_b[0]["id"], pa["ids"][0]);
        assert_eq!(others_b[0]["before"], true, "{pb}");
        assert!(
            others_b[0]["name"]
                .as_str()
                .is_some_and(|n| !n.is_empty() && name.starts_with(n)),
            "named: {pb}"
        );
    }
    let text = second.cli(&["status"]).expect("status");
    assert!(
        text.lines()
            .any(|l| l.starts_with("connect4:") && l.contains("BEFORE ours")),
        "{text}"
    );
    let text = first.cli(&["status"]).expect("status");
    assert!(!text.contains("BEFORE ours"), "{text}");
    drop(second);
    // Once the other is gone, nothing else is listed.
    let a = first.status_json().expect("status");
    assert_eq!(
        program(&a, "balancer_connect4")["others"]
            .as_array()
            .map(Vec::len),
        Some(0),
        "{a}"
    );
}
