//! Client identity through the router (issue 18): the router opens the pod
//! connections that carry a client's streams from inside that client's own
//! network namespace, so pods (their NetworkPolicy, source checks, logs)
//! see the client's address, not the node's.
//!
//! Every pod runs `lbt-h2 serve --report-peer`: it prints the address it
//! accepted each connection from and answers each request with it
//! (`x-peer`), so each test checks what the pods saw, per connection and
//! per request. The router discovers client namespaces from files in its
//! `--netns-dir` (default `/var/run/netns`, where `ip netns add` puts
//! them); a client whose namespace it does not know is balanced at L4 by
//! the kernel (counter `router_unserved`), never sent through the router.

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use balancer_tests::{
    agent::Agent,
    netns::{Netns, NetnsDir, UnnamedNetns},
    peers::{H2_PORT, h2_client_spawn, h2_client_wait_timeout},
    process::sh,
    topology::{ROUTER_ADDR, Topology},
};
use common::{VIP, http2_yaml, pods_of};
use serde_json::Value;

/// The node's address: where the router listens, and what pods see for
/// streams the router carries from the node's own namespace.
const NODE: &str = "198.18.0.1";
/// The router's metrics, in the node namespace.
const METRICS: &str = "198.18.0.1:9465";
/// The agent's metrics, in the node namespace.
const AGENT_METRICS: &str = "198.18.0.1:9464";
/// The admitted client of the NetworkPolicy emulation, and the refused one.
const A: (&str, &str) = ("198.18.2.10", "fd00:18::2:10");
const B: (&str, &str) = ("198.18.3.10", "fd00:18::3:10");

struct Setup {
    t: Topology,
    agent: Agent,
}

/// Four pods with `lbt-h2 serve --report-peer` behind the http2 service
/// at [`VIP`], the agent and its router in the node namespace (with
/// metrics at [`METRICS`]) and `router_args` for the router.
fn setup(tag: &str, router_args: &[&str]) -> Setup {
    let mut t = Topology::new(tag, 4, &[]).expect("topology");
    t.start_h2_with(&["--report-peer"]).expect("h2 servers");
    let all: Vec<usize> = (0..4).collect();
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &http2_yaml(&t, &all),
        Some(&t.node.name),
        &[
            &[
                "--proxy-addr",
                ROUTER_ADDR,
                "--router-metrics-addr",
                METRICS,
                "--metrics-addr",
                AGENT_METRICS,
            ][..],
            router_args,
        ]
        .concat(),
    )
    .expect("agent");
    Setup { t, agent }
}

/// `lbt-h2 client` from namespace `ns` (a name in /run/netns or a path)
/// to `addr`: `requests` unary RPCs, `concurrency` at once, on one
/// connection; each request fails as `timeout` after `timeout`, and the
/// whole run must end within `timeout` + 30 s.
fn client(
    ns: &str,
    cgroup: Option<&Path>,
    addr: &str,
    requests: usize,
    concurrency: usize,
    timeout: Duration,
) -> Value {
    let child = h2_client_spawn(
        ns,
        cgroup,
        addr,
        &[
            "--path",
            "/unary",
            "--requests",
            &requests.to_string(),
            "--concurrency",
            &concurrency.to_string(),
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ],
    )
    .expect("lbt-h2 client");
    h2_client_wait_timeout(child, timeout + Duration::from_secs(30)).expect("client summary")
}

/// The same through the balanced cgroup to the service.
fn balanced(s: &Setup, ns: &str, requests: usize, concurrency: usize) -> Value {
    client(
        ns,
        Some(&s.t.cgroup.path),
        VIP,
        requests,
        concurrency,
        Duration::from_secs(20),
    )
}

/// A map of a client summary (`seen_as`, `errors`, `pods`) as counts.
fn counts(v: &Value, key: &str) -> BTreeMap<String, u64> {
    v[key]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Requests a pod answered (an `x-pod` header with a pod's name; a
/// response the router made itself has none).
fn served(v: &Value) -> u64 {
    pods_of(v)
        .iter()
        .filter(|(p, _)| p != "?")
        .map(|(_, n)| n)
        .sum()
}

/// Connections each pod accepted, by the address it saw.
fn accepted(t: &Topology) -> BTreeMap<String, BTreeMap<String, u64>> {
    t.pods
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.h2.as_ref().expect("h2 server").accepted_from(),
            )
        })
        .collect()
}

/// What the pods accepted since `before`, by pod and address (only the
/// non-zero differences).
fn accepted_since(
    t: &Topology,
    before: &BTreeMap<String, BTreeMap<String, u64>>,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    accepted(t)
        .into_iter()
        .map(|(pod, now)| {
            let was = before.get(&pod).cloned().unwrap_or_default();
            let diff: BTreeMap<String, u64> = now
                .into_iter()
                .filter_map(|(ip, n)| {
                    let d = n - was.get(&ip).copied().unwrap_or(0);
                    (d > 0).then_some((ip, d))
                })
                .collect();
            (pod, diff)
        })
        .filter(|(_, d)| !d.is_empty())
        .collect()
}

/// Requests the pods' servers received so far (`req /unary` lines).
fn requests_received(t: &Topology) -> usize {
    t.pods
        .iter()
        .map(|p| p.h2.as_ref().expect("h2 server").count("req /unary"))
        .sum()
}

/// The peers of the established connections to each pod's HTTP/2 port,
/// as `ss` shows them in the pod's namespace (independent of the server's
/// own report).
fn established_peers(t: &Topology) -> BTreeMap<String, Vec<String>> {
    t.pods
        .iter()
        .map(|p| {
            let out =
                p.ns.exec(
                    "ss",
                    &[
                        "-Htn",
                        "state",
                        "established",
                        &format!("( sport = :{H2_PORT} )"),
                    ],
                )
                .expect("ss");
            let peers = out
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let i = f.iter().position(|x| x.ends_with(&format!(":{H2_PORT}")))?;
                    let (host, _) = f.get(i + 1)?.rsplit_once(':')?;
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    Some(host.trim_start_matches("::ffff:").to_owned())
                })
                .collect();
            (p.name.clone(), peers)
        })
        .collect()
}

/// A number in the router's `router-status` answer.
fn router_u64(agent: &Agent, key: &str) -> u64 {
    let s = agent.router_status().expect("router-status");
    s[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in router-status: {s}"))
}

/// A kernel counter from the agent's `status`.
fn counter(agent: &Agent, name: &str) -> u64 {
    agent.counter(name).expect("kernel counter")
}

/// The sum of the samples of metric `name` in the router's metrics.
fn router_metric(t: &Topology, name: &str) -> u64 {
    let m = t
        .node
        .exec("curl", &["-s", &format!("http://{METRICS}/metrics")])
        .expect("router metrics");
    let samples: Vec<f64> = m
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(
        !samples.is_empty(),
        "no {name} in the router's metrics:\n{m}"
    );
    samples.iter().sum::<f64>() as u64
}

/// The last lines of the router's log, for a failure message.
fn router_tail(agent: &Agent) -> String {
    let log = agent.router_log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The kernel counters a test looks at.
#[derive(Debug, Clone, Copy)]
struct Kernel {
    steered: u64,
    unserved: u64,
}

fn kernel(agent: &Agent) -> Kernel {
    Kernel {
        steered: counter(agent, "steered"),
        unserved: counter(agent, "router_unserved"),
    }
}

/// Asserts that `v`, a run of `n` requests, was served whole through the
/// router: no errors, every pod served at least a tenth (one connection
/// balanced at L4 would be one pod), and every answer seen by its pod as
/// coming from `seen`.
fn assert_routed_as(v: &Value, n: u64, seen: &str, agent: &Agent) {
    assert!(
        counts(v, "errors").is_empty() && served(v) == n,
        "{n} requests served: {v}\nrouter log:\n{}",
        router_tail(agent)
    );
    let pods = pods_of(v);
    assert_eq!(pods.len(), 4, "spread over the 4 pods: {v}");
    for (pod, k) in &pods {
        assert!(k * 10 >= n, "{pod} served {k} of {n}: {v}");
    }
    assert_eq!(
        counts(v, "seen_as"),
        BTreeMap::from([(seen.to_owned(), n)]),
        "every request seen by its pod as {seen}: {v}"
    );
}

/// NetworkPolicy as a CNI enforces it at the pod: in each pod's namespace
/// only new connections to the HTTP/2 port from `admitted` are accepted,
/// established ones pass, every other new one is dropped.
fn admit_only(t: &Topology, admitted: &[&str]) {
    let port = H2_PORT.to_string();
    for p in &t.pods {
        let rule = |args: &[&str]| {
            let mut full = vec!["-A", "INPUT", "-p", "tcp", "--dport", &port];
            full.extend_from_slice(args);
            p.ns.exec("iptables", &full).expect("iptables");
        };
        rule(&[
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ]);
        for a in admitted {
            rule(&[
                "-s",
                a,
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "ACCEPT",
            ]);
        }
        rule(&["-j", "DROP"]);
        // No IPv6 way around it.
        p.ns.exec(
            "ip6tables",
            &[
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                &port,
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "DROP",
            ],
        )
        .expect("ip6tables");
    }
}

/// Whether a direct connection (no VIP, no balancing) from `ns` to pod0's
/// HTTP/2 port is admitted: one request within 2 s.
fn admitted_directly(t: &Topology, ns: &str) -> bool {
    let v = client(
        ns,
        None,
        &format!("{}:{H2_PORT}", t.pods[0].v4),
        1,
        1,
        Duration::from_secs(2),
    );
    served(&v) == 1
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Shape {
    /// The pods are on another node: the node's address is just another
    /// host, not admitted.
    Remote,
    /// The pods are on this node: Kubernetes exempts a pod's own node, so
    /// its address is admitted too.
    Local,
}

/// Issue 18's NetworkPolicy emulation: A admitted, B refused. Through the
/// router A is served whole, spread over the 4 pods, and the pods see only
/// A; B is served nothing, in bounded time, and no pod ever sees the
/// node's address (which the local shape would admit) for it.
fn network_policy(tag: &str, shape: Shape) {
    let s = setup(tag, &[]);
    let t = &s.t;
    let a = t.extra_client("a", A.0, A.1).expect("client A");
    let b = t.extra_client("b", B.0, B.1).expect("client B");
    match shape {
        Shape::Remote => admit_only(t, &[A.0]),
        Shape::Local => admit_only(t, &[A.0, NODE]),
    }
    // The emulation itself, from each namespace straight to a pod.
    assert!(admitted_directly(t, &a.name), "A is admitted");
    assert!(!admitted_directly(t, &b.name), "B is refused");
    assert_eq!(
        admitted_directly(t, &t.node.name),
        shape == Shape::Local,
        "the node's address is admitted only in the local shape"
    );
    let status = s.agent.router_status().expect("router-status");
    assert_eq!(status["source_identity"], "pod", "the default: {status}");

    // A: 400 requests on one connection.
    let k0 = kernel(&s.agent);
    let before = accepted(t);
    let received = requests_received(t);
    let v = balanced(&s, &a.name, 400, 16);
    assert_routed_as(&v, 400, A.0, &s.agent);
    assert_eq!(requests_received(t) - received, 400);
    let seen = accepted_since(t, &before);
    assert_eq!(seen.len(), 4, "every pod got connections: {seen:?}");
    for (pod, from) in &seen {
        assert_eq!(
            from.keys().collect::<Vec<_>>(),
            [A.0],
            "{pod} accepted connections only from A: {seen:?}"
        );
    }
    let peers = established_peers(t);
    assert!(
        peers.values().flatten().all(|p| p == A.0),
        "the pods' open connections are all from A: {peers:?}"
    );
    let k1 = kernel(&s.agent);
    assert_eq!(k1.steered - k0.steered, 1, "A went through the router");
    assert_eq!(k1.unserved, k0.unserved, "A was not sent to L4");
    assert!(router_u64(&s.agent, "namespaces") >= 2, "A and B are known");

    // B: 400 requests on one connection; nothing may reach a pod.
    let before = accepted(t);
    let received = requests_received(t);
    let started = Instant::now();
    let v = client(
        &b.name,
        Some(&t.cgroup.path),
        VIP,
        400,
        400,
        Duration::from_secs(15),
    );
    let took = started.elapsed();
    eprintln!(
        "{shape:?} shape, B in {took:?}: pods {:?}, errors {:?}",
        pods_of(&v),
        counts(&v, "errors")
    );
    let mut problems = Vec::new();
    if served(&v) != 0 {
        problems.push(format!("B was served {} requests", served(&v)));
    }
    let failed: u64 = counts(&v, "errors").values().sum::<u64>()
        + pods_of(&v)
            .iter()
            .filter(|(p, _)| p == "?")
            .map(|(_, n)| n)
            .sum::<u64>();
    if failed != 400 {
        problems.push(format!("{failed} of B's 400 requests failed"));
    }
    let got = requests_received(t) - received;
    if got != 0 {
        problems.push(format!("the pods received {got} of B's requests"));
    }
    let seen = accepted_since(t, &before);
    if !seen.is_empty() {
        problems.push(format!(
            "the pods accepted connections while B ran: {seen:?}"
        ));
    }
    let peers = established_peers(t);
    if peers.values().flatten().any(|p| p != A.0) {
        problems.push(format!("open pod connections not from A: {peers:?}"));
    }
    let k2 = kernel(&s.agent);
    if k2.steered - k1.steered != 1 || k2.unserved != k1.unserved {
        problems.push(format!(
            "B's connection should be steered to the router (its namespace is known): {k1:?} -> {k2:?}"
        ));
    }
    assert!(
        problems.is_empty(),
        "{shape:?} shape, B: {problems:#?}\nB's client: {v}\nin {took:?}\nrouter log:\n{}",
        router_tail(&s.agent)
    );
}

#[test]
fn network_policy_remote_shape_admitted_client_served_as_itself_refused_one_gets_nothing() {
    network_policy("idpolremote", Shape::Remote);
}

#[test]
fn network_policy_local_shape_refused_client_never_gets_in_through_the_node_address() {
    network_policy("idpollocal", Shape::Local);
}

/// A refused client's failed pod connections are its own: after B tried
/// (and failed) from its namespace, A is still served whole, spread over
/// all 4 pods, and the failure accrual did not take pods away from A.
#[test]
fn a_refused_clients_failed_connects_do_not_take_pods_from_an_admitted_client() {
    let s = setup("idpolisolate", &[]);
    let t = &s.t;
    let a = t.extra_client("a", A.0, A.1).expect("client A");
    let b = t.extra_client("b", B.0, B.1).expect("client B");
    admit_only(t, &[A.0]);
    let v = client(
        &b.name,
        Some(&t.cgroup.path),
        VIP,
        100,
        100,
        Duration::from_secs(15),
    );
    assert_eq!(served(&v), 0, "B is refused: {v}");
    let v = balanced(&s, &a.name, 400, 16);
    let endpoints = s.agent.endpoints_json().expect("endpoints");
    assert!(
        counts(&v, "errors").is_empty() && served(&v) == 400,
        "A served whole after B: {v}"
    );
    assert_eq!(
        pods_of(&v).len(),
        4,
        "A spread over all 4 pods after B's refused connects: {v}\nendpoints: {endpoints}"
    );
    assert_eq!(
        counts(&v, "seen_as"),
        BTreeMap::from([(A.0.to_owned(), 400)]),
        "{v}"
    );
}

/// A client in the node's own namespace (hostNetwork) is served through
/// the router, spread, with the node's address: its real identity.
#[test]
fn a_host_network_client_is_routed_with_the_nodes_address() {
    let s = setup("idhostnet", &[]);
    let t = &s.t;
    let k0 = kernel(&s.agent);
    let before = accepted(t);
    let v = balanced(&s, &t.node.name, 400, 16);
    assert_routed_as(&v, 400, NODE, &s.agent);
    for (pod, from) in accepted_since(t, &before) {
        assert_eq!(from.keys().collect::<Vec<_>>(), [NODE], "{pod}: {from:?}");
    }
    let k1 = kernel(&s.agent);
    assert_eq!(k1.steered - k0.steered, 1, "through the router");
    assert_eq!(k1.unserved, k0.unserved, "not sent to L4");
}

/// Checks of a client namespace that appeared after the router started:
/// its very first connection went through the router, and the pods saw
/// its own address.
fn assert_first_connection_routed(s: &Setup, v: &Value, k0: Kernel, closed0: u64, addr: &str) {
    assert_routed_as(v, 200, addr, &s.agent);
    let k1 = kernel(&s.agent);
    assert_eq!(
        (k1.steered - k0.steered, k1.unserved - k0.unserved),
        (1, 0),
        "the first connection was steered to the router, not balanced at L4"
    );
    assert_eq!(
        router_u64(&s.agent, "unserved_closed"),
        closed0,
        "the router knew its namespace when it accepted it"
    );
}

/// A client namespace made (`ip netns add`), plugged and used at once,
/// after the agent and the router are up: its first connection is routed
/// with its own identity.
#[test]
fn a_namespace_added_after_the_router_is_served_from_its_first_connection() {
    let s = setup("idlate", &[]);
    let k0 = kernel(&s.agent);
    let closed0 = router_u64(&s.agent, "unserved_closed");
    let made = Instant::now();
    let late =
        s.t.extra_client("late", "198.18.4.10", "fd00:18::4:10")
            .expect("late client");
    let gap = made.elapsed();
    let v = balanced(&s, &late.name, 200, 16);
    eprintln!("ip netns add to the client's start: {gap:?}");
    assert_first_connection_routed(&s, &v, k0, closed0, "198.18.4.10");
}

/// The strictest timing: a namespace with its network already plugged is
/// given its file in /run/netns (`ip netns attach`, the file then the bind
/// mount, as `ip netns add` and container runtimes make them) and its
/// client connects a few milliseconds later.
#[test]
fn a_namespace_attached_milliseconds_before_its_first_connect_is_served() {
    let s = setup("idattach", &[]);
    let holder = UnnamedNetns::new().expect("namespace");
    s.t.plug_at(
        &holder.path,
        "198.18.4.20".parse().expect("ip"),
        "fd00:18::4:20".parse().expect("ip"),
    )
    .expect("plug");
    let k0 = kernel(&s.agent);
    let closed0 = router_u64(&s.agent, "unserved_closed");
    let name = format!("{}-attached", s.t.prefix);
    let started = Instant::now();
    sh("ip", &["netns", "attach", &name, &holder.pid().to_string()]).expect("ip netns attach");
    // Deleted on drop (its file; the namespace goes with its holder).
    let _named = Netns { name: name.clone() };
    let attached = started.elapsed();
    let child = h2_client_spawn(
        &name,
        Some(&s.t.cgroup.path),
        VIP,
        &[
            "--path",
            "/unary",
            "--requests",
            "200",
            "--concurrency",
            "16",
            "--timeout-ms",
            "20000",
        ],
    )
    .expect("client");
    let spawned = started.elapsed();
    let v = h2_client_wait_timeout(child, Duration::from_secs(50)).expect("client");
    eprintln!("ip netns attach took {attached:?}; client started {spawned:?} after it began");
    assert_first_connection_routed(&s, &v, k0, closed0, "198.18.4.20");
}

/// 1,000 client namespaces come and go (every 50th used by a client
/// through the router while it lives): the router's descriptors, memory,
/// namespaces and pools are back where they started. The namespaces are
/// files of a directory of this test's own (the router's `--netns-dir`),
/// so neither this router sees other tests' namespaces nor theirs these.
#[test]
fn a_thousand_client_namespaces_come_and_go_and_the_router_is_back_where_it_started() {
    let prefix = balancer_tests::netns::unique_prefix("idchurn");
    let dir = NetnsDir::new(&format!("{prefix}-netns")).expect("netns dir");
    let dir_arg = dir.path.display().to_string();
    let s = setup("idchurn", &["--netns-dir", &dir_arg]);
    let t = &s.t;
    // Settled: the router's tick and table reads have run.
    std::thread::sleep(Duration::from_secs(1));
    let fds0 = s.agent.router_fd_count().expect("fds");
    let rss0 = s.agent.router_rss_bytes().expect("rss");
    let ns0 = router_u64(&s.agent, "namespaces");
    let pools0 = router_u64(&s.agent, "namespace_pools");
    assert_eq!(ns0, 0, "the test's netns dir is empty");
    let k0 = kernel(&s.agent);
    let closed0 = router_u64(&s.agent, "unserved_closed");
    let started = Instant::now();
    let mut used = 0;
    for batch in 0..10 {
        let names: Vec<String> = (0..100).map(|i| format!("c{}", batch * 100 + i)).collect();
        dir.add(&names).expect("namespaces");
        let mut clients = Vec::new();
        for (i, n) in names.iter().enumerate().filter(|(i, _)| i % 50 == 0) {
            let k = batch * 2 + i / 50;
            let v4 = format!("198.18.5.{}", 10 + k);
            t.plug_at(
                &dir.file(n),
                v4.parse().expect("ip"),
                format!("fd00:18::5:{:x}", 0x10 + k).parse().expect("ip"),
            )
            .expect("plug");
            clients.push((dir.file(n), v4));
        }
        Topology::wait_for(
            "the router to know the batch's 100 namespaces",
            Duration::from_secs(10),
            || Ok(router_u64(&s.agent, "namespaces") == ns0 + 100),
        )
        .expect("discovery");
        for (file, v4) in &clients {
            let v = balanced(&s, file, 40, 8);
            assert!(
                counts(&v, "errors").is_empty() && served(&v) == 40,
                "namespace {file}: {v}"
            );
            assert!(pods_of(&v).len() >= 2, "through the router: {v}");
            assert_eq!(
                counts(&v, "seen_as"),
                BTreeMap::from([(v4.clone(), 40)]),
                "{v}"
            );
            used += 1;
        }
        dir.del(&names).expect("delete namespaces");
    }
    let churn = started.elapsed();
    let mut last = (0, 0, 0);
    let settled = Topology::wait_for(
        "the router to forget them and close their pools",
        Duration::from_secs(10),
        || {
            last = (
                router_u64(&s.agent, "namespaces"),
                router_u64(&s.agent, "namespace_pools"),
                s.agent.router_fd_count()? as u64,
            );
            Ok(last.0 == ns0 && last.1 == pools0 && last.2 <= fds0 as u64 + 8)
        },
    );
    assert!(
        settled.is_ok(),
        "after {used} used of 1000 namespaces ({churn:?}): namespaces {} (start {ns0}), \
         pools {} (start {pools0}), fds {} (start {fds0})\nrouter log:\n{}",
        last.0,
        last.1,
        last.2,
        router_tail(&s.agent)
    );
    let rss = s.agent.router_rss_bytes().expect("rss");
    assert!(
        rss < rss0 + (32 << 20),
        "router RSS {} MiB, started at {} MiB",
        rss >> 20,
        rss0 >> 20
    );
    assert_eq!(
        router_metric(t, "balancer_router_client_namespaces"),
        ns0,
        "metrics agree"
    );
    assert_eq!(
        router_metric(t, "balancer_router_namespace_pools"),
        pools0,
        "metrics agree"
    );
    let k1 = kernel(&s.agent);
    assert_eq!(k1.steered - k0.steered, used, "every client was steered");
    assert_eq!(k1.unserved, k0.unserved, "none was sent to L4");
    assert_eq!(router_u64(&s.agent, "unserved_closed"), closed0);
    eprintln!(
        "1000 namespaces ({used} used) in {churn:?}; fds {fds0} -> {}, RSS {} -> {} KiB",
        last.2,
        rss0 >> 10,
        rss >> 10
    );
}

/// Two client namespaces at once, on one router thread (so on one core's
/// pools): every answer each gets was carried by a pod connection of its
/// own namespace, never the other's.
#[test]
fn two_client_namespaces_at_once_each_seen_as_itself() {
    let s = setup("idtwo", &["--router-threads", "1"]);
    let t = &s.t;
    let c = (
        ("198.18.2.10", "fd00:18::2:10"),
        ("198.18.7.10", "fd00:18::7:10"),
    );
    let one = t.extra_client("one", c.0.0, c.0.1).expect("client one");
    let two = t.extra_client("two", c.1.0, c.1.1).expect("client two");
    let run = |ns: &str| {
        h2_client_spawn(
            ns,
            Some(&t.cgroup.path),
            VIP,
            &[
                "--path",
                "/unary",
                "--requests",
                "2000",
                "--concurrency",
                "16",
                "--timeout-ms",
                "20000",
            ],
        )
        .expect("client")
    };
    let (a, b) = (run(&one.name), run(&two.name));
    let limit = Duration::from_secs(60);
    let va = h2_client_wait_timeout(a, limit).expect("client one");
    let vb = h2_client_wait_timeout(b, limit).expect("client two");
    assert_routed_as(&va, 2000, c.0.0, &s.agent);
    assert_routed_as(&vb, 2000, c.1.0, &s.agent);

    // `endpoints -o json` shows the two pools (ORIGIN_POOL_IDLE keeps
    // them 10 s), and its per-pod pod connections add up to theirs.
    Topology::wait_for(
        "endpoints to show both pools",
        Duration::from_secs(5),
        || {
            let e = s.agent.endpoints_json()?;
            let r = &e["router"];
            let per_pod: u64 = e["services"][0]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|ep| ep["router_connections"].as_u64().unwrap_or(0))
                .sum();
            Ok(r["source_identity"] == "pod"
                && r["namespace_pools"] == 2
                && r["namespace_connections"].as_u64().is_some_and(|n| n >= 2)
                && per_pod == r["namespace_connections"].as_u64().unwrap_or(0))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", s.agent.endpoints_json().expect("endpoints")));
}

/// The router restarts (`kill -9`, then a new one): the new one learns
/// the namespaces from the directory again, so one made while no router
/// ran is served with its own identity, and one deleted meanwhile is not
/// counted.
#[test]
fn a_restarted_router_serves_namespaces_made_while_it_was_down() {
    let prefix = balancer_tests::netns::unique_prefix("idrestart");
    let dir = NetnsDir::new(&format!("{prefix}-netns")).expect("netns dir");
    let dir_arg = dir.path.display().to_string();
    let mut s = setup("idrestart", &["--netns-dir", &dir_arg]);
    dir.add(&["old".to_owned()]).expect("namespace");
    Topology::wait_for("the router to know it", Duration::from_secs(5), || {
        Ok(router_u64(&s.agent, "namespaces") == 1)
    })
    .expect("discovery");
    s.agent.kill_router().expect("kill -9 the router");
    dir.del(&["old".to_owned()]).expect("del");
    dir.add(&["new".to_owned()]).expect("namespace");
    let v4 = "198.18.8.10";
    s.t.plug_at(
        &dir.file("new"),
        v4.parse().expect("ip"),
        "fd00:18::8:10".parse().expect("ip"),
    )
    .expect("plug");
    s.agent.start_router().expect("a new router");
    Topology::wait_for("the new router to know it", Duration::from_secs(5), || {
        Ok(router_u64(&s.agent, "namespaces") == 1)
    })
    .expect("discovery after the restart");
    let k0 = kernel(&s.agent);
    let v = balanced(&s, &dir.file("new"), 200, 16);
    assert_routed_as(&v, 200, v4, &s.agent);
    let k1 = kernel(&s.agent);
    assert_eq!(
        (k1.steered - k0.steered, k1.unserved - k0.unserved),
        (1, 0),
        "steered to the new router"
    );
}

/// `--source-identity node`: today's shared pools, and the pods see the
/// node's address for a client namespace's streams.
#[test]
fn source_identity_node_keeps_the_nodes_address() {
    let s = setup("idnode", &["--source-identity", "node"]);
    let status = s.agent.router_status().expect("router-status");
    assert_eq!(status["source_identity"], "node", "{status}");
    let v = balanced(&s, &s.t.client.name, 400, 16);
    assert_routed_as(&v, 400, NODE, &s.agent);
    assert_eq!(router_u64(&s.agent, "namespace_pools"), 0, "shared pools");
}

/// Fail safe, never open: a client whose namespace the router does not
/// know (no file in its `--netns-dir`: an unnamed namespace, or one named
/// only elsewhere) is balanced at L4 by the kernel, its connection never
/// reaches the router, and the pod sees its own address. The same after a
/// namespace the router served loses its file while its process lives on.
#[test]
fn a_client_in_a_namespace_the_router_does_not_know_is_balanced_at_l4_as_itself() {
    let prefix = balancer_tests::netns::unique_prefix("idunknown");
    let dir = NetnsDir::new(&format!("{prefix}-netns")).expect("netns dir");
    let dir_arg = dir.path.display().to_string();
    let s = setup("idunknown", &["--netns-dir", &dir_arg]);
    let t = &s.t;
    let all_before = accepted(t);
    let closed0 = router_u64(&s.agent, "unserved_closed");
    let unnamed = UnnamedNetns::new().expect("namespace");
    let u4 = "198.18.6.10";
    t.plug_at(
        &unnamed.path,
        u4.parse().expect("ip"),
        "fd00:18::6:10".parse().expect("ip"),
    )
    .expect("plug");

    // One L4 connection: every request on one pod, seen as the client.
    let at_l4 = |ns: &str, addr: &str, why: &str| {
        let k0 = kernel(&s.agent);
        let v = balanced(&s, ns, 40, 4);
        assert!(
            counts(&v, "errors").is_empty() && served(&v) == 40,
            "{why}: {v}"
        );
        assert_eq!(
            pods_of(&v).len(),
            1,
            "{why}: one L4 connection, one pod: {v}"
        );
        assert_eq!(v["peer"], VIP, "{why}: getpeername gives the VIP: {v}");
        assert_eq!(
            counts(&v, "seen_as"),
            BTreeMap::from([(addr.to_owned(), 40)]),
            "{why}: {v}"
        );
        let k1 = kernel(&s.agent);
        assert_eq!(
            (k1.steered - k0.steered, k1.unserved - k0.unserved),
            (0, 1),
            "{why}: not steered, counted in router_unserved"
        );
        let e = s.agent.endpoints_json().expect("endpoints");
        assert_eq!(
            e["router"]["l4_by_reason"]["router_unserved"].as_u64(),
            Some(k1.unserved),
            "{why}: endpoints -o json counts it by reason: {e}"
        );
    };
    at_l4(&unnamed.path, u4, "an unnamed namespace");
    // The topology's client: named in /run/netns, not in the router's dir.
    at_l4(
        &t.client.name,
        "198.18.200.1",
        "a namespace named elsewhere",
    );

    // Named in the router's dir: served through the router as itself.
    dir.attach("u", &unnamed.path).expect("attach");
    Topology::wait_for(
        "the router to know the namespace",
        Duration::from_secs(5),
        || Ok(router_u64(&s.agent, "namespaces") == 1),
    )
    .expect("discovery");
    let k0 = kernel(&s.agent);
    let v = balanced(&s, &unnamed.path, 200, 16);
    assert_routed_as(&v, 200, u4, &s.agent);
    assert_eq!(kernel(&s.agent).steered - k0.steered, 1);
    // Its pod connections stay pooled a while (the gauge moves on the
    // router's 500 ms tick).
    Topology::wait_for("a pool of its own", Duration::from_secs(3), || {
        Ok(router_u64(&s.agent, "namespace_pools") >= 1)
    })
    .expect("its pools");

    // Its file goes, its process stays: forgotten, pools closed, L4 again.
    dir.del(&["u".to_owned()]).expect("del");
    Topology::wait_for(
        "the router to forget the namespace and close its pools",
        Duration::from_secs(5),
        || {
            Ok(router_u64(&s.agent, "namespaces") == 0
                && router_u64(&s.agent, "namespace_pools") == 0)
        },
    )
    .expect("forgotten");
    at_l4(&unnamed.path, u4, "a namespace whose file was removed");

    assert_eq!(
        router_u64(&s.agent, "unserved_closed"),
        closed0,
        "the router never accepted a connection it could not serve"
    );
    // The agent's metrics show the kernel counter as its status does.
    let unserved = counter(&s.agent, "router_unserved");
    assert_eq!(unserved, 3, "three connections balanced at L4");
    let m = t
        .node
        .exec("curl", &["-s", &format!("http://{AGENT_METRICS}/metrics")])
        .expect("agent metrics");
    let line = "balancer_datapath_decisions_total{decision=\"router_unserved\"}";
    assert!(
        m.lines().any(|l| l == format!("{line} {unserved}")),
        "{line} {unserved} in the agent's metrics:\n{m}"
    );
    let seen = accepted_since(t, &all_before);
    assert!(
        seen.values().all(|from| !from.contains_key(NODE)),
        "no pod ever saw the node's address: {seen:?}"
    );
}
