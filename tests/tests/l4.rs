//! Connection-level balancing, end to end: real servers in pod namespaces, a
//! real client in the agent's cgroup, the agent as a real process, and
//! kube-proxy's real iptables rule shape as the baseline.

use std::{collections::BTreeMap, time::Duration};

use balancer_tests::{
    agent::Agent,
    bpfquery,
    kube_proxy::{install_kube_proxy, kube_proxy_rules},
    peers::{hold_connections, short_connections},
    process::require_root,
    topology::Topology,
    yaml::endpoints_yaml,
};

const SVC: &str = "default/echo";
const VIP: &str = "198.19.0.10";

fn v4_endpoints(t: &Topology) -> Vec<String> {
    t.pods.iter().map(|p| p.v4.to_string()).collect()
}

/// Agent counts and server counts agree, pod by pod.
fn assert_counts_agree(t: &Topology, agent: &Agent, expect_each: Option<u64>) {
    let agent_counts = agent.active_by_endpoint(SVC).expect("agent endpoints");
    for p in &t.pods {
        let server = p.server.as_ref().expect("server").active();
        let a = agent_counts.get(&p.v4.to_string()).copied().unwrap_or(0);
        assert_eq!(
            a, server,
            "{}: agent says {a} active, server says {server}",
            p.name
        );
        if let Some(e) = expect_each {
            assert_eq!(server, e, "{} holds {server} connections", p.name);
        }
    }
}

fn wait_all_zero(t: &Topology, agent: &Agent) {
    Topology::wait_for("every counter back to 0", Duration::from_secs(10), || {
        let a = agent.active_by_endpoint(SVC)?;
        Ok(a.values().all(|&n| n == 0) && t.server_active().values().all(|&n| n == 0))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: agent {:?}, servers {:?}",
            agent.active_by_endpoint(SVC).ok(),
            t.server_active()
        )
    });
}

fn max_over_mean(counts: &BTreeMap<String, u64>, pods: usize) -> f64 {
    let total: u64 = counts.values().sum();
    let max = counts.values().copied().max().unwrap_or(0);
    max as f64 / (total as f64 / pods as f64)
}

#[test]
fn least_conn_spreads_64_connections_exactly_and_counts_return_to_zero() {
    let t = Topology::new("lc64", 4, &[8080]).expect("topology");
    let agent = Agent::start(
        &t.prefix,
        &t.cgroup.path,
        &endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &v4_endpoints(&t)),
    )
    .expect("agent");

    let client = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        64,
    )
    .expect("client");
    assert!(
        client.result.errors.is_empty(),
        "{:?}",
        client.result.errors
    );
    for p in &t.pods {
        assert_eq!(client.result.count(&p.name), 16, "{:?}", client.result.pods);
    }
    Topology::wait_for(
        "servers to see 64 connections",
        Duration::from_secs(5),
        || Ok(t.server_active().values().sum::<u64>() == 64),
    )
    .expect("servers");
    assert_counts_agree(&t, &agent, Some(16));
    let v = agent.endpoints_json().expect("json");
    for e in v["services"][0]["endpoints"].as_array().expect("endpoints") {
        assert_eq!(e["connections_total"], 16, "{e}");
        assert_eq!(e["port"], 8080);
        assert_eq!(e["ready"], true);
    }

    // The same 64 connections through kube-proxy's rules, for comparison.
    let kp = t.kube_proxy_client().expect("kube-proxy client");
    let backends: Vec<(String, u16)> = t.pods.iter().map(|p| (p.v4.to_string(), 8080)).collect();
    install_kube_proxy(&kp, &kube_proxy_rules(VIP, 80, &backends)).expect("iptables");
    let kp_client = hold_connections(&kp.name, None, &format!("{VIP}:80"), 64).expect("kp client");
    let kp_ratio = max_over_mean(&kp_client.result.pods, 4);
    eprintln!(
        "64 connections over 4 pods: least-conn {:?} (max/mean 1.00), kube-proxy {:?} (max/mean {kp_ratio:.2})",
        client.result.pods, kp_client.result.pods
    );
    assert_eq!(kp_client.result.pods.values().sum::<u64>(), 64);
    kp_client.close().expect("close kp");

    client.close().expect("close");
    wait_all_zero(&t, &agent);
    let v = agent.endpoints_json().expect("json");
    for e in v["services"][0]["endpoints"].as_array().expect("endpoints") {
        assert_eq!(e["connections_total"], 16, "{e}");
    }
}

#[test]
fn ten_thousand_short_connections_leave_every_counter_at_zero() {
    let t = Topology::new("short10k", 4, &[8080]).expect("topology");
    let agent = Agent::start(
        &t.prefix,
        &t.cgroup.path,
        &endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &v4_endpoints(&t)),
    )
    .expect("agent");
    let r = short_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        10_000,
    )
    .expect("client");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.pods.values().sum::<u64>(), 10_000);
    wait_all_zero(&t, &agent);
    let v = agent.endpoints_json().expect("json");
    let totals: u64 = v["services"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["connections_total"].as_u64().expect("total"))
        .sum();
    assert_eq!(totals, 10_000, "every connection counted once");
    let server_totals: u64 = t
        .pods
        .iter()
        .map(|p| p.server.as_ref().expect("s").total())
        .sum();
    assert_eq!(server_totals, 10_000);
    let status = agent.status_json().expect("status");
    assert_eq!(
        status["counters"]["established"],
        status["counters"]["closed"]
    );
}

#[test]
fn round_robin_cycles_and_random_behaves_like_kube_proxy() {
    let t = Topology::new("rrrand", 4, &[8080]).expect("topology");
    let eps = v4_endpoints(&t);
    let yaml = format!(
        "{}{}",
        endpoints_yaml(SVC, &[VIP], 80, 8080, "round-robin", &eps),
        endpoints_yaml("default/rand", &["198.19.0.11"], 80, 8080, "random", &eps)
            .trim_start_matches("services:\n")
    );
    let _agent = Agent::start(&t.prefix, &t.cgroup.path, &yaml).expect("agent");

    // Round-robin: every window of 4 consecutive connections hits all 4 pods,
    // and the sequence repeats with period 4.
    let rr = short_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        40,
    )
    .expect("rr");
    assert!(rr.errors.is_empty());
    for w in rr.order.windows(4) {
        let mut s = w.to_vec();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 4, "round-robin window {w:?} in {:?}", rr.order);
    }
    for i in 4..rr.order.len() {
        assert_eq!(rr.order[i], rr.order[i - 4]);
    }

    // Random: uniform like kube-proxy's statistic chain (chi-square, 3
    // degrees of freedom, p > 0.0001), and not a cycle.
    let n = 800;
    let random = short_connections(&t.client.name, Some(&t.cgroup.path), "198.19.0.11:80", n)
        .expect("random");
    let kp = t.kube_proxy_client().expect("kube-proxy client");
    let backends: Vec<(String, u16)> = t.pods.iter().map(|p| (p.v4.to_string(), 8080)).collect();
    install_kube_proxy(&kp, &kube_proxy_rules("198.19.0.11", 80, &backends)).expect("iptables");
    let kube = short_connections(&kp.name, None, "198.19.0.11:80", n).expect("kube-proxy");
    for (what, r) in [("random", &random), ("kube-proxy", &kube)] {
        assert!(r.errors.is_empty(), "{what}: {:?}", r.errors);
        let expected = n as f64 / 4.0;
        let chi2: f64 = t
            .pods
            .iter()
            .map(|p| {
                let o = r.count(&p.name) as f64;
                (o - expected).powi(2) / expected
            })
            .sum();
        eprintln!("{what}: {:?} chi2={chi2:.2}", r.pods);
        assert!(
            chi2 < 16.27,
            "{what} is not uniform: {:?} chi2 {chi2}",
            r.pods
        );
    }
    let cyclic = (4..random.order.len()).all(|i| random.order[i] == random.order[i - 4]);
    assert!(!cyclic, "random must not cycle");
}

#[test]
fn removed_endpoint_gets_no_new_connections_and_added_one_does() {
    let t = Topology::new("addremove", 4, &[8080]).expect("topology");
    let first3: Vec<String> = t.pods[..3].iter().map(|p| p.v4.to_string()).collect();
    let agent = Agent::start(
        &t.prefix,
        &t.cgroup.path,
        &endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &first3),
    )
    .expect("agent");
    let batch1 = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        30,
    )
    .expect("batch1");
    assert_eq!(batch1.result.count("pod0"), 10);
    assert_eq!(batch1.result.count("pod3"), 0);

    // pod0 terminating (it takes no new connection; its open ones drain),
    // pod3 added.
    let all: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let pod0 = format!("      - address: '{}'\n", all[0]);
    let terminating = endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &all).replace(
        &pod0,
        &format!("{pod0}        ready: false\n        serving: true\n        terminating: true\n"),
    );
    let status = agent.reload(&terminating).expect("reload");
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    let batch2 = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        16,
    )
    .expect("batch2");
    assert!(batch2.result.errors.is_empty());
    assert_eq!(batch2.result.count("pod0"), 0, "{:?}", batch2.result.pods);
    // least-conn fills the new pod first (pod1 and pod2 hold 10 each, pod3
    // none), then spreads evenly: 16 new connections end at 12/12/12.
    assert_eq!(batch2.result.count("pod3"), 12, "{:?}", batch2.result.pods);
    assert_eq!(batch2.result.count("pod1"), 2);
    assert_eq!(batch2.result.count("pod2"), 2);

    // pod0's open connections are still counted, as draining.
    let v = agent.endpoints_json().expect("json");
    let draining = v["draining"].as_array().expect("draining");
    assert_eq!(draining.len(), 1, "{v}");
    assert_eq!(draining[0]["address"], t.pods[0].v4.to_string());
    assert_eq!(draining[0]["active_connections"], 10);

    // Then removed for good: the agent ends its 10 connections (issue 19
    // section 2; removed.rs sees what their owners get), and the backend
    // is forgotten once they closed.
    let last3: Vec<String> = t.pods[1..].iter().map(|p| p.v4.to_string()).collect();
    let status = agent
        .reload(&endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &last3))
        .expect("reload");
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    Topology::wait_for(
        "the removed backend's connections to end",
        Duration::from_secs(5),
        || {
            Ok(agent.endpoints_json()?["draining"]
                .as_array()
                .is_some_and(Vec::is_empty))
        },
    )
    .expect("ended");
    let status = agent.status_json().expect("status");
    assert_eq!(
        status["removed_connections"]["services"][SVC]["ended"], 10,
        "{status}"
    );

    batch1.close().expect("close1");
    batch2.close().expect("close2");
    wait_all_zero(&t, &agent);
    Topology::wait_for(
        "the drained backend to be forgotten",
        Duration::from_secs(5),
        || {
            Ok(agent.endpoints_json()?["draining"]
                .as_array()
                .is_some_and(Vec::is_empty))
        },
    )
    .expect("drained");
}

#[test]
fn service_without_usable_endpoints_refuses_with_econnrefused() {
    let t = Topology::new("refused", 2, &[8080]).expect("topology");
    let yaml = format!(
        "services:\n  - name: default/empty\n    addresses: [198.19.0.20]\n    ports: [{{port: 80}}]\n    endpoints: []\n  - name: default/notready\n    addresses: [198.19.0.21]\n    ports: [{{port: 80, targetPort: 8080}}]\n    endpoints:\n      - {{address: {}, ready: false, serving: false, terminating: true}}\n  - name: default/terminating\n    addresses: [198.19.0.22]\n    ports: [{{port: 80, targetPort: 8080}}]\n    endpoints:\n      - {{address: {}, ready: false, serving: true, terminating: true}}\n      - {{address: {}, ready: false, serving: false, terminating: false}}\n",
        t.pods[0].v4, t.pods[0].v4, t.pods[1].v4
    );
    let agent = Agent::start(&t.prefix, &t.cgroup.path, &yaml).expect("agent");
    let ns = &t.client.name;
    let cg = Some(t.cgroup.path.as_path());
    let r = short_connections(ns, cg, "198.19.0.20:80", 5).expect("empty");
    assert_eq!(r.errors.get("ECONNREFUSED"), Some(&5), "{r:?}");
    let r = short_connections(ns, cg, "198.19.0.21:80", 5).expect("notready");
    assert_eq!(r.errors.get("ECONNREFUSED"), Some(&5), "{r:?}");
    // No ready endpoint: kube-proxy's fallback to serving+terminating ones.
    let r = short_connections(ns, cg, "198.19.0.22:80", 6).expect("terminating");
    assert_eq!(r.count("pod0"), 6, "{r:?}");
    // A VIP nobody configured is not touched: no route, ENETUNREACH.
    let r = short_connections(ns, cg, "198.19.0.99:80", 1).expect("unknown vip");
    assert_eq!(r.errors.get("ENETUNREACH"), Some(&1), "{r:?}");
    let status = agent.status_json().expect("status");
    assert_eq!(status["counters"]["no_backend"], 10);
}

#[test]
fn ipv6_and_ipv4_mapped_vips_are_balanced_and_getpeername_returns_the_vip() {
    let t = Topology::new("ipv6", 4, &[8080]).expect("topology");
    let v6_eps: Vec<String> = t.pods.iter().map(|p| p.v6.to_string()).collect();
    let v4_eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let mut all = v4_eps.clone();
    all.extend(v6_eps);
    let agent = Agent::start(
        &t.prefix,
        &t.cgroup.path,
        &endpoints_yaml(SVC, &[VIP, "fd00:19::10"], 80, 8080, "least-conn", &all),
    )
    .expect("agent");
    let ns = &t.client.name;
    let cg = Some(t.cgroup.path.as_path());

    let v6 = hold_connections(ns, cg, "[fd00:19::10]:80", 8).expect("v6");
    assert!(v6.result.errors.is_empty(), "{:?}", v6.result.errors);
    for p in &t.pods {
        assert_eq!(v6.result.count(&p.name), 2, "{:?}", v6.result.pods);
    }
    assert_eq!(
        v6.result.peers.keys().collect::<Vec<_>>(),
        vec!["[fd00:19::10]:80"],
        "getpeername must return the VIP"
    );
    // Counted per IPv6 endpoint.
    let v = agent.endpoints_json().expect("json");
    let v6_active: u64 = v["services"][0]["endpoints"]
        .as_array()
        .expect("eps")
        .iter()
        .filter(|e| e["address"].as_str().is_some_and(|a| a.contains(':')))
        .map(|e| e["active_connections"].as_u64().expect("n"))
        .sum();
    assert_eq!(v6_active, 8);

    let v4 = hold_connections(ns, cg, &format!("{VIP}:80"), 4).expect("v4");
    assert_eq!(
        v4.result.peers.keys().collect::<Vec<_>>(),
        vec!["198.19.0.10:80"]
    );
    assert_eq!(v4.result.pods.len(), 4);

    // An IPv6 socket connecting to the IPv4-mapped VIP reaches IPv4 pods.
    let mapped = hold_connections(ns, cg, "[::ffff:198.19.0.10]:80", 4).expect("mapped");
    assert!(
        mapped.result.errors.is_empty(),
        "{:?}",
        mapped.result.errors
    );
    assert_eq!(mapped.result.pods.len(), 4, "{:?}", mapped.result.pods);
    assert_eq!(
        mapped.result.peers.keys().collect::<Vec<_>>(),
        vec!["[::ffff:198.19.0.10]:80"]
    );
    v6.close().expect("close");
    v4.close().expect("close");
    mapped.close().expect("close");
    Topology::wait_for("all counts 0", Duration::from_secs(10), || {
        Ok(agent.active_by_endpoint(SVC)?.values().all(|&n| n == 0))
    })
    .expect("zero");
}

#[test]
fn sigterm_detaches_everything_and_exits_zero() {
    require_root();
    let t = Topology::new("sigterm", 2, &[8080]).expect("topology");
    let mut agent = Agent::start(
        &t.prefix,
        &t.cgroup.path,
        &endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &v4_endpoints(&t)),
    )
    .expect("agent");
    for (name, n) in bpfquery::attachments(&t.cgroup.path).expect("query") {
        assert_eq!(n, 1, "{name} attached while running");
    }
    let held = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        4,
    )
    .expect("client");
    let status = agent.stop().expect("stop");
    assert!(status.success(), "exit status {status}: {}", agent.log());
    for (name, n) in bpfquery::attachments(&t.cgroup.path).expect("query") {
        assert_eq!(n, 0, "{name} still attached after SIGTERM");
    }
    assert!(!agent.admin_socket.exists(), "admin socket removed");
    // Established connections are untouched by the agent going away.
    held.close().expect("close");
    // And a new connect to the VIP is no longer rewritten.
    let r = short_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        1,
    )
    .expect("after");
    assert_eq!(r.errors.get("ENETUNREACH"), Some(&1), "{r:?}");
}
