//! Failure accrual in the router, with real gRPC pods (grpcio): a pod that
//! fails every call is ejected and gets almost nothing, comes back within
//! a backoff once it recovers, never more than half of a service is
//! ejected, and a slow pod that answers well is not ejected.

use std::time::Duration;

use balancer_tests::{
    agent::Agent,
    grpc::{self, Killed, Load},
    process::require_root,
    topology::Topology,
};
use serde_json::Value;

const PORT: u16 = 50055;
const VIP_IP: &str = "198.19.0.72";
const VIP: &str = "198.19.0.72:80";
const INFLIGHT: usize = 16;

/// Four grpcio pods, pod `i` in `modes[i]` (`peer.py serve` modes).
fn setup(tag: &str, modes: [&str; 4]) -> (Topology, Vec<Killed>, Agent) {
    grpc::setup(tag, VIP_IP, PORT, &modes, &[])
}

/// The endpoints of the service, from `endpoints -o json`.
fn endpoints(agent: &Agent) -> Vec<Value> {
    agent.endpoints_json().expect("endpoints")["services"][0]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_pod_that_fails_every_rpc_is_ejected_and_gets_almost_nothing() {
    let (t, _s, agent) = setup("acbroken", ["broken", "", "", ""]);
    let load = Load::start(&t.client.name, &t.cgroup.path, VIP, 4.0, INFLIGHT).expect("load");
    std::thread::sleep(Duration::from_millis(2000));
    let eps = endpoints(&agent);
    let r = load.wait().expect("report");
    let failed = r.failures.len() as f64;
    let all = r.ok as f64 + failed;
    let late: f64 = r.failures.iter().filter(|f| f.0 >= 1000).count() as f64;
    let late_all: f64 = r
        .buckets
        .iter()
        .filter(|b| b.0 >= 1000)
        .map(|b| b.1.values().sum::<u64>() + b.2)
        .sum::<u64>() as f64;
    eprintln!(
        "one pod of 4 failing every RPC: {failed} of {all} RPCs failed ({:.2}%); after the first \
         second {late} of {late_all} ({:.2}%); per pod {:?}",
        100.0 * failed / all,
        100.0 * late / late_all,
        r.pods_after(0)
    );
    assert!(failed / all < 0.02, "client failures {failed} of {all}");
    assert!(
        late / late_all < 0.02,
        "the broken pod's share after 1 s: {late} of {late_all}"
    );
    assert_eq!(r.pods_after(0).len(), 3, "the three good pods served");
    let broken = eps
        .iter()
        .find(|e| e["address"] == t.pods[0].v4.to_string())
        .expect("pod0");
    assert_eq!(broken["ejected"], "grpc", "{broken}");
    assert!(broken["failures"].as_u64() >= Some(5), "{broken}");
}

#[test]
fn a_pod_that_recovers_is_back_within_one_backoff() {
    // Broken for its first 2 s of calls: ejected at once (backoff 1 s),
    // its probe at about 1 s fails (backoff 2 s), the next at about 3 s
    // finds it well.
    let (t, _s, _agent) = setup("acheal", ["broken-for=2", "", "", ""]);
    let load = Load::start(&t.client.name, &t.cgroup.path, VIP, 6.0, INFLIGHT).expect("load");
    let r = load.wait().expect("report");
    let back = r
        .buckets
        .iter()
        .find(|b| b.0 >= 2000 && b.1.contains_key(&t.pods[0].name))
        .map(|b| b.0);
    eprintln!(
        "a pod broken for 2 s: {} RPCs failed, back from {back:?} ms",
        r.failures.len()
    );
    let back = back.expect("the pod came back");
    // Recovered at 2 s; its backoff then is at most 2 s.
    assert!(back <= 4500, "back only at {back} ms");
    assert!(
        r.failures.len() < 40,
        "failures: {} (5 to eject, a probe per backoff)",
        r.failures.len()
    );
    assert_eq!(r.pods_after(5000).len(), 4, "{:?}", r.raw);
}

#[test]
fn with_three_of_four_pods_broken_at_most_half_are_ejected() {
    let (t, _s, agent) = setup("accap", ["broken", "broken", "broken", ""]);
    let load = Load::start(&t.client.name, &t.cgroup.path, VIP, 4.0, INFLIGHT).expect("load");
    let mut most = 0;
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        let ejected = endpoints(&agent)
            .iter()
            .filter(|e| e["ejected"].is_string())
            .count();
        most = most.max(ejected);
    }
    let r = load.wait().expect("report");
    let all = r.ok + r.failures.len() as u64;
    eprintln!(
        "3 of 4 pods broken: at most {most} ejected at once; {} of {all} RPCs ok, all on {:?}",
        r.ok,
        r.pods_after(0)
    );
    assert!(most >= 1, "failure accrual ejected nothing");
    assert!(most <= 2, "{most} of 4 ejected: the cap is half");
    // The rest of the load still reaches the good pod, and the broken pod
    // the cap keeps in (one of two candidates).
    assert_eq!(r.pods_after(0).len(), 1);
    assert!(r.ok as f64 > all as f64 * 0.25, "{} of {all}", r.ok);
}

#[test]
fn a_slow_pod_that_answers_well_is_not_ejected() {
    let (t, _s, agent) = setup("acslow", ["slow=20", "", "", ""]);
    let load = Load::start(&t.client.name, &t.cgroup.path, VIP, 3.0, INFLIGHT).expect("load");
    let r = load.wait().expect("report");
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.pods_after(0).len(), 4, "the slow pod still serves");
    for e in endpoints(&agent) {
        assert_eq!(e["ejections"], 0, "{e}");
    }
}

/// A pod whose process died (its port refuses) while its address stays
/// listed, as before its readiness probe notices: a pool that refills 40
/// connections one after another loses at most 2 of them (the kernel
/// passes over a backend for a second after a connect to it failed;
/// without that, least-conn sent 31 to 37 of 40 there, since a refused
/// connection never counts as live); the agent's accrual still ejects it
/// as connects keep failing; and once its server is back it takes its
/// share again.
#[test]
fn a_pod_that_refuses_connections_stops_getting_l4_connections() {
    require_root();
    let mut t = Topology::new("acrefuse", 4, &[8080]).expect("topology");
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let agent = Agent::start(
        &t.prefix,
        &t.cgroup.path,
        &balancer_tests::yaml::endpoints_yaml(
            "default/web",
            &["198.19.0.73"],
            80,
            8080,
            "least-conn",
            &eps,
        ),
    )
    .expect("agent");
    let vip = "198.19.0.73:80";
    let cg = Some(t.cgroup.path.as_path());
    drop(t.pods[0].server.take());
    let first =
        balancer_tests::peers::short_connections(&t.client.name, cg, vip, 40).expect("client");
    let refused: u64 = first.errors.values().sum();
    eprintln!("a pod refusing connections: {refused} of a burst of 40 connects failed");
    assert!(refused <= 2, "{first:?}");
    assert_eq!(
        (1..4).map(|p| first.count(&format!("pod{p}"))).sum::<u64>(),
        40 - refused,
        "{first:?}"
    );
    let status = agent.status_json().expect("status");
    assert!(
        status["counters"]["steered_from_failed"].as_u64() >= Some(30),
        "{status}"
    );
    // Connects keep coming: one a second still tries pod0 and fails, and
    // the agent's accrual ejects it after 5 in a row.
    balancer_tests::topology::Topology::wait_for("pod0 ejected", Duration::from_secs(15), || {
        balancer_tests::peers::short_connections(&t.client.name, cg, vip, 10)?;
        Ok(endpoints(&agent)
            .iter()
            .any(|e| e["address"] == eps[0] && e["ejected"] == "connect"))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    let after =
        balancer_tests::peers::short_connections(&t.client.name, cg, vip, 60).expect("client");
    assert!(after.errors.is_empty(), "{after:?}");
    assert_eq!(after.count("pod0"), 0, "{after:?}");
    // Short connections close while others open, so least-conn is even
    // here only to a connection or two (exactness is l4.rs's, with held
    // connections): the three others share all 60.
    for p in 1..4 {
        assert!(after.count(&format!("pod{p}")) >= 15, "{after:?}");
    }
    let status = agent.status_json().expect("status");
    assert_eq!(status["l4_ejected"], 1, "{status}");
    // Its server comes back: a probe finds it, and it takes connections.
    t.pods[0].server = Some(
        balancer_tests::peers::Server::start(&t.pods[0].ns.name, &t.pods[0].name, &[8080])
            .expect("server"),
    );
    balancer_tests::topology::Topology::wait_for("pod0 back", Duration::from_secs(20), || {
        Ok(endpoints(&agent)
            .iter()
            .any(|e| e["address"] == eps[0] && e["ejected"].is_null()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    let back =
        balancer_tests::peers::short_connections(&t.client.name, cg, vip, 40).expect("client");
    assert!(back.errors.is_empty(), "{back:?}");
    assert!(
        back.count("pod0") >= 7,
        "it takes its share again: {back:?}"
    );
}

/// The mark alone, without the agent's accrual (`--failure-accrual 0`): a
/// refusing pod is tried about once a second, and a pod whose server
/// comes back takes connections again within a second.
#[test]
fn a_refusing_pod_is_passed_over_for_a_second_and_used_again_once_back() {
    require_root();
    let mut t = Topology::new("acmark", 4, &[8080]).expect("topology");
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let _agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &balancer_tests::yaml::endpoints_yaml(
            "default/web",
            &["198.19.0.74"],
            80,
            8080,
            "round-robin",
            &eps,
        ),
        None,
        &["--failure-accrual", "0"],
    )
    .expect("agent");
    let vip = "198.19.0.74:80";
    let cg = Some(t.cgroup.path.as_path());
    drop(t.pods[0].server.take());
    let burst =
        balancer_tests::peers::short_connections(&t.client.name, cg, vip, 40).expect("client");
    let refused: u64 = burst.errors.values().sum();
    assert!(refused <= 2, "round-robin passes over it too: {burst:?}");
    t.pods[0].server = Some(
        balancer_tests::peers::Server::start(&t.pods[0].ns.name, &t.pods[0].name, &[8080])
            .expect("server"),
    );
    // Within a second of its return the mark has lapsed and a connect
    // establishes there, which clears it.
    std::thread::sleep(Duration::from_millis(1100));
    let back =
        balancer_tests::peers::short_connections(&t.client.name, cg, vip, 40).expect("client");
    assert!(back.errors.is_empty(), "{back:?}");
    assert!(
        back.count("pod0") >= 9,
        "round-robin gives it its quarter: {back:?}"
    );
}
