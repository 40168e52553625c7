//! The Kubernetes source against a fake apiserver that speaks the real
//! list/watch protocol: sync, slices split and deleted, bookmarks, a 410
//! Gone relist that must not flap the data path, a malformed object, and
//! the apiserver going away.

use std::time::Duration;

use balancer_tests::{
    agent::Agent,
    fakeapi::{FakeApi, Kind},
    peers::{hold_connections, short_connections},
    topology::Topology,
};
use serde_json::{Value, json};

const VIP: &str = "198.19.0.80";

fn service() -> Value {
    json!({"metadata": {"name": "web", "namespace": "default"},
           "spec": {"type": "ClusterIP", "clusterIP": VIP, "clusterIPs": [VIP],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}})
}

fn slice(name: &str, addrs: &[String]) -> Value {
    let eps: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({"metadata": {"name": name, "namespace": "default",
                        "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": eps})
}

fn endpoint_addrs(agent: &Agent) -> Vec<String> {
    let v = agent.endpoints_json().unwrap_or_default();
    let mut out: Vec<String> = v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "default/web")
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["address"].as_str().map(String::from))
        .collect();
    out.sort();
    out
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[test]
fn kubernetes_source_syncs_survives_relists_bad_objects_and_an_apiserver_outage() {
    let t = Topology::new("kube", 3, &[8080]).expect("topology");
    let dir = std::env::temp_dir().join(format!("{}-api", t.prefix));
    let mut api = FakeApi::start(&dir).expect("fake apiserver");
    let ips: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    api.apply(Kind::Service, service());
    // The service's endpoints split over two slices.
    api.apply(Kind::EndpointSlice, slice("web-a", &ips[..2]));
    api.apply(Kind::EndpointSlice, slice("web-b", &ips[2..]));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let agent = Agent::start_kube(
        &t.prefix,
        &t.cgroup.path,
        &api.kubeconfig,
        &["--metrics-addr", &metrics],
    )
    .expect("agent");
    Topology::wait_for("the first sync", Duration::from_secs(20), || {
        Ok(endpoint_addrs(&agent) == ips)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    assert!(scrape(&metrics).contains("balancer_apiserver_up 1"));
    let status = agent.status_json().expect("status");
    assert_eq!(status["source"]["kind"], "kubernetes");
    assert_eq!(status["apiserver"]["state"], "synced", "{status}");

    // Named targetPort resolved from the slices; exact spread.
    let held = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        6,
    )
    .expect("client");
    assert!(held.result.errors.is_empty(), "{:?}", held.result.errors);
    for p in &t.pods {
        assert_eq!(held.result.count(&p.name), 2, "{:?}", held.result.pods);
    }
    held.close().expect("close");

    // A slice deleted: its endpoint leaves.
    api.delete(Kind::EndpointSlice, "default", "web-b");
    Topology::wait_for("slice removal", Duration::from_secs(10), || {
        Ok(endpoint_addrs(&agent) == ips[..2])
    })
    .expect("removal");
    let r = short_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        20,
    )
    .expect("client");
    assert_eq!(r.count("pod2"), 0, "{r:?}");
    api.bookmark(Kind::Service);
    api.bookmark(Kind::EndpointSlice);

    // 410 Gone: watches are cut and must relist. While they do, nothing
    // is emptied: connections keep working throughout.
    let before = agent.status_json().expect("status")["last_reload"]["applied"]
        .as_u64()
        .unwrap_or(0);
    api.compact();
    for _ in 0..20 {
        let r = short_connections(
            &t.client.name,
            Some(&t.cgroup.path),
            &format!("{VIP}:80"),
            5,
        )
        .expect("client");
        assert!(r.errors.is_empty(), "a relist flapped the data path: {r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Topology::wait_for("a relist", Duration::from_secs(15), || {
        let lists = api
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/services"))
            .count();
        Ok(lists >= 3)
    })
    .expect("relist");
    assert_eq!(endpoint_addrs(&agent), ips[..2]);
    let status = agent.status_json().expect("status");
    assert_eq!(status["counters"]["no_backend"], 0, "{status}");
    let _ = before;

    // A malformed Service is skipped, named in the log; others still apply.
    api.apply(
        Kind::Service,
        json!({"metadata": {"name": "broken", "namespace": "default"},
        "spec": {"clusterIP": "198.19.0.300", "ports": [{"port": 80}]}}),
    );
    api.apply(Kind::EndpointSlice, slice("web-b", &ips[2..]));
    Topology::wait_for("web-b back", Duration::from_secs(10), || {
        Ok(endpoint_addrs(&agent) == ips)
    })
    .expect("re-add");
    // The two objects come on two watches: wait for the Service's too.
    Topology::wait_for(
        "the bad Service to be named",
        Duration::from_secs(10),
        || Ok(agent.log().contains("service default/broken")),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    assert_eq!(
        endpoint_addrs(&agent),
        ips,
        "the bad Service changed nothing else"
    );

    // The apiserver goes away: the last state keeps serving.
    api.stop();
    Topology::wait_for("the outage to show", Duration::from_secs(15), || {
        Ok(agent.status_json()?["apiserver"]["state"] == "unreachable")
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            agent
                .status_json()
                .map(|v| v.to_string())
                .unwrap_or_default()
        )
    });
    let r = short_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        9,
    )
    .expect("client");
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.pods.len(), 3, "{r:?}");
    let m = scrape(&metrics);
    assert!(m.contains("balancer_apiserver_up 0"), "{m}");
    assert!(!m.contains("balancer_apiserver_errors_total 0\n"), "{m}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn session_affinity_client_ip_keeps_each_client_on_one_pod() {
    let t = Topology::new("affinity", 3, &[8080]).expect("topology");
    let dir = std::env::temp_dir().join(format!("{}-api", t.prefix));
    let api = FakeApi::start(&dir).expect("fake apiserver");
    let ips: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let mut svc = service();
    svc["spec"]["sessionAffinity"] = json!("ClientIP");
    svc["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 60}});
    api.apply(Kind::Service, svc);
    api.apply(Kind::EndpointSlice, slice("web-a", &ips));
    let agent = Agent::start_kube(&t.prefix, &t.cgroup.path, &api.kubeconfig, &[]).expect("agent");
    Topology::wait_for("the first sync", Duration::from_secs(20), || {
        Ok(endpoint_addrs(&agent) == ips)
    })
    .expect("sync");
    // Two clients (two pods: two network namespaces), 12 connections each.
    let other = t
        .extra_client("c2", "198.18.202.1", "fd00:18::ca:1")
        .expect("client 2");
    for ns in [&t.client.name, &other.name] {
        let r =
            short_connections(ns, Some(&t.cgroup.path), &format!("{VIP}:80"), 12).expect("client");
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(r.pods.len(), 1, "one client, one pod: {r:?}");
    }
    let status = agent.status_json().expect("status");
    assert!(
        status["counters"]["affinity_hit"].as_u64().unwrap_or(0) >= 22,
        "{status}"
    );
    drop(agent);
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
}

fn node(zone: &str) -> Value {
    json!({"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": zone}}})
}

#[test]
fn a_relabelled_node_zone_changes_which_endpoints_hints_pick() {
    let t = Topology::new("kubezone", 3, &[8080]).expect("topology");
    let dir = std::env::temp_dir().join(format!("{}-api", t.prefix));
    let api = FakeApi::start(&dir).expect("fake apiserver");
    let ips: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    api.apply(Kind::Node, node("a"));
    let mut svc = service();
    svc["spec"]["trafficDistribution"] = json!("PreferClose");
    api.apply(Kind::Service, svc);
    // pod0 and pod1 in zone a, pod2 in zone b, each hinted for its zone.
    let mut sl = slice("web-a", &ips);
    for (i, e) in sl["endpoints"]
        .as_array_mut()
        .expect("endpoints")
        .iter_mut()
        .enumerate()
    {
        let zone = if i < 2 { "a" } else { "b" };
        e["zone"] = json!(zone);
        e["hints"] = json!({"forZones": [{"name": zone}]});
    }
    api.apply(Kind::EndpointSlice, sl);
    let agent = Agent::start_kube(
        &t.prefix,
        &t.cgroup.path,
        &api.kubeconfig,
        &["--node-name", "n1"],
    )
    .expect("agent");
    Topology::wait_for("zone a's endpoints", Duration::from_secs(20), || {
        Ok(endpoint_addrs(&agent) == ips[..2])
    })
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    assert_eq!(
        agent.status_json().expect("status")["apiserver"]["node_zone"],
        "a"
    );
    // The node moves to zone b: no restart, the hints follow.
    api.apply(Kind::Node, node("b"));
    Topology::wait_for("zone b's endpoints", Duration::from_secs(10), || {
        Ok(endpoint_addrs(&agent) == ips[2..])
    })
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    assert_eq!(
        agent.status_json().expect("status")["apiserver"]["node_zone"],
        "b"
    );
    let r = short_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        6,
    )
    .expect("client");
    assert_eq!(r.count("pod2"), 6, "{r:?}");
    // Its label removed: hints off, every endpoint.
    api.apply(
        Kind::Node,
        json!({"metadata": {"name": "n1", "labels": {}}}),
    );
    Topology::wait_for("every endpoint", Duration::from_secs(10), || {
        Ok(endpoint_addrs(&agent) == ips)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
}
