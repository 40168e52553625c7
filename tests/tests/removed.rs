//! Long-lived L4 connections to an endpoint that is removed end at once
//! (issue 19 §2): the agent ends the client sockets the kernel balanced to
//! it, each in its own network namespace, and touches nothing else.
//!
//! The case is a dead node: pod0's interface goes down (its packets
//! vanish, nothing answers), and a second later its endpoint is removed,
//! as the EndpointSlice controller does once the node is declared dead.
//! Without the agent, its connections would wait on TCP retransmissions
//! for about 15 minutes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use balancer_tests::{
    agent::Agent,
    peers::{EchoClient, EchoReport},
    process::{require_root, sh},
    topology::Topology,
};

const VIP_IP: &str = "198.19.0.74";
const VIP: &str = "198.19.0.74:80";

/// The service over `pods` (name, address, terminating).
fn yaml(pods: &[(&str, bool)]) -> String {
    let mut y = format!(
        "services:\n  - name: default/db\n    addresses: ['{VIP_IP}']\n    ports:\n      - port: 80\n        targetPort: 8080\n        algorithm: least-conn\n    endpoints:\n"
    );
    for (addr, terminating) in pods {
        y += &format!("      - address: '{addr}'\n");
        if *terminating {
            y += "        ready: false\n        serving: true\n        terminating: true\n";
        }
    }
    y
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Batches of short connections a loader made: when each started and
/// ended (unix ms), and what it got.
type Batches = Vec<(u64, u64, balancer_tests::peers::ClientResult)>;

/// Pods 0..4 of the service, pod0's node dies (interface down), and a
/// second later its endpoint is removed while pod1 turns terminating.
/// With `load`, a third client namespace makes short connections in
/// batches of 10 the whole time. Returns the topology and the agent (in the
/// order they must drop), the echo reports of the pod client and the
/// hostNetwork one, the time of the removal, and the loader's batches.
fn pod0_dies(
    tag: &str,
    extra: &[&str],
    load: bool,
) -> (
    Topology,
    Agent,
    Vec<EchoReport>,
    Vec<EchoReport>,
    u64,
    Batches,
) {
    require_root();
    let t = Topology::new(tag, 4, &[8080]).expect("topology");
    let addrs: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let all: Vec<(&str, bool)> = addrs.iter().map(|a| (a.as_str(), false)).collect();
    // The agent in the node's namespace: hostNetwork clients share it.
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &yaml(&all),
        Some(&t.node.name),
        extra,
    )
    .expect("agent");
    let cg = Some(t.cgroup.path.as_path());
    let pods = EchoClient::start(&t.client.name, cg, VIP, 8).expect("pod client");
    let host = EchoClient::start(&t.node.name, cg, VIP, 4).expect("hostNetwork client");
    let per_pod = |c: &EchoClient| {
        (0..4)
            .map(|i| c.result.count(&format!("pod{i}")))
            .collect::<Vec<_>>()
    };
    assert_eq!(per_pod(&pods), [2, 2, 2, 2], "{:?}", pods.result);
    assert_eq!(per_pod(&host), [1, 1, 1, 1], "{:?}", host.result);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = load.then(|| {
        let ns = t
            .extra_client("load", "198.18.201.1", "fd00:18::c9:1")
            .expect("load namespace");
        let cg = t.cgroup.path.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut batches = Batches::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = now_ms();
                let r = balancer_tests::peers::short_connections(&ns.name, Some(&cg), VIP, 10)
                    .expect("load client");
                batches.push((started, now_ms(), r));
            }
            batches
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    sh(
        "ip",
        &["-n", &t.pods[0].ns.name, "link", "set", "eth0", "down"],
    )
    .expect("pod0 down");
    std::thread::sleep(Duration::from_secs(1));
    let removed_at = now_ms();
    agent
        .reload(&yaml(&[
            (addrs[1].as_str(), true),
            (addrs[2].as_str(), false),
            (addrs[3].as_str(), false),
        ]))
        .expect("reload");
    std::thread::sleep(Duration::from_millis(2500));
    let pods = pods.report().expect("pod client report");
    let host = host.report().expect("hostNetwork client report");
    eprintln!("pod client: {pods:?}\nhostNetwork client: {host:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches = loader
        .map(|l| l.join().expect("loader"))
        .unwrap_or_default();
    (t, agent, pods, host, removed_at, batches)
}

#[test]
fn connections_to_a_removed_endpoint_end_within_2s_and_no_other_is_touched() {
    let (_t, agent, pods, host, removed_at, _) = pod0_dies("rmend", &[], false);
    for c in pods.iter().chain(&host) {
        if c.pod == "pod0" {
            let (err, at) = c.error.clone().unwrap_or_else(|| {
                panic!(
                    "a connection to the removed pod saw no error: {c:?}\n{}",
                    agent.log()
                )
            });
            assert_eq!(err, "ECONNABORTED", "{c:?}\n{}", agent.log());
            let after = at.saturating_sub(removed_at);
            eprintln!("a connection to the removed pod ended {after} ms after the removal");
            assert!(
                after <= 2000,
                "ended only {after} ms after the removal: {c:?}"
            );
        } else {
            // pod1 is terminating: it drains, as Kubernetes intends.
            assert_eq!(
                c.error, None,
                "a connection to a live pod was touched: {c:?}"
            );
            assert!(c.echoes >= 25, "it kept echoing: {c:?}");
        }
    }
    let status = agent.status_json().expect("status");
    let removed = &status["removed_connections"];
    assert_eq!(removed["enters_namespaces"], true, "{status}");
    assert_eq!(removed["services"]["default/db"]["ended"], 3, "{status}");
    assert_eq!(
        removed["services"]["default/db"]["unreachable"], 0,
        "{status}"
    );
}

#[test]
fn with_end_removed_connections_false_they_are_left_to_tcp() {
    let (_t, agent, pods, host, _, _) =
        pod0_dies("rmkeep", &["--end-removed-connections", "false"], false);
    for c in pods.iter().chain(&host) {
        assert_eq!(c.error, None, "{c:?}");
    }
    let to_pod0 = pods.iter().chain(&host).filter(|c| c.pod == "pod0").count();
    assert_eq!(to_pod0, 3);
    let status = agent.status_json().expect("status");
    assert!(status["removed_connections"].is_null(), "{status}");
}

/// An endpoint removed while no agent runs (it was killed; the data path,
/// pinned, went on balancing): the next agent adopts the pins and, once it
/// has the whole state, ends the connections of endpoints their Service no
/// longer lists. Those of a Service it still has and still lists are kept.
#[test]
fn connections_to_an_endpoint_removed_while_no_agent_ran_end_when_the_next_one_adopts() {
    require_root();
    let t = Topology::new("rmadopt", 4, &[8080]).expect("topology");
    let addrs: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let all: Vec<(&str, bool)> = addrs.iter().map(|a| (a.as_str(), false)).collect();
    let pins = balancer_tests::agent::PinDir::new(&t.prefix);
    let args = ["--pin", "--bpffs", pins.path.as_str()];
    let mut agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &yaml(&all),
        Some(&t.node.name),
        &args,
    )
    .expect("agent");
    let cg = Some(t.cgroup.path.as_path());
    let pods = EchoClient::start(&t.client.name, cg, VIP, 8).expect("pod client");
    std::thread::sleep(Duration::from_millis(300));
    agent.kill_agent().expect("kill -9 the agent");
    // While no agent runs: pod0's endpoint is removed from the file.
    let rest: Vec<(&str, bool)> = all[1..].to_vec();
    let tmp = agent.dir.join("endpoints.yaml.tmp");
    std::fs::write(&tmp, yaml(&rest)).expect("write");
    std::fs::rename(&tmp, &agent.endpoints_file).expect("rename");
    std::thread::sleep(Duration::from_millis(500));
    let restarted = now_ms();
    agent.start_agent().expect("the next agent");
    std::thread::sleep(Duration::from_millis(1500));
    let report = pods.report().expect("report");
    eprintln!("{report:?}");
    for c in &report {
        if c.pod == "pod0" {
            let (err, at) = c.error.clone().unwrap_or_else(|| {
                panic!("pod0's connection saw no error: {c:?}\n{}", agent.log())
            });
            assert_eq!(err, "ECONNABORTED", "{c:?}");
            eprintln!(
                "ended {} ms after the new agent was started",
                at.saturating_sub(restarted)
            );
        } else {
            assert_eq!(c.error, None, "{c:?}");
        }
    }
    let status = agent.status_json().expect("status");
    assert_eq!(status["adopted"], true, "{status}");
    assert_eq!(
        status["removed_connections"]["services"]["default/db"]["ended"], 2,
        "{status}"
    );
}

/// The same under load: a third client makes short connections the whole
/// time. The echo connections fare as without load; every connection made
/// after the removal succeeds and none goes to pod0 (before it, while
/// pod0 is dead but listed, a connect to it waits for its SYN until the
/// client gives up, as at L4, and the kernel then passes it over).
#[test]
fn under_load_a_removed_endpoints_connections_end_and_new_ones_all_succeed_elsewhere() {
    let (_t, agent, pods, host, removed_at, batches) = pod0_dies("rmload", &[], true);
    for c in pods.iter().chain(&host) {
        if c.pod == "pod0" {
            let (err, at) = c.error.clone().expect("pod0's connection ended");
            assert_eq!(err, "ECONNABORTED", "{c:?}");
            assert!(at.saturating_sub(removed_at) <= 2000, "{c:?}");
        } else {
            assert_eq!(c.error, None, "{c:?}\n{}", agent.log());
        }
    }
    let after: Vec<_> = batches
        .iter()
        .filter(|(started, _, _)| *started >= removed_at + 100)
        .collect();
    let made: u64 = after
        .iter()
        .map(|(_, _, r)| r.pods.values().sum::<u64>())
        .sum();
    eprintln!(
        "{} batches of 10 in all, {} after the removal: {made} connections, none failed",
        batches.len(),
        after.len()
    );
    assert!(made >= 50, "the load ran on: {batches:?}");
    for (_, _, r) in &after {
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(r.count("pod0"), 0, "{r:?}");
    }
}
