//! A pod whose node dies (its interface goes down: packets vanish, nothing
//! answers) under long-lived gRPC streams through the router, with a
//! client that set keepalive as gRPC recommends for catching dead peers.
//! At L4 the client's keepalive fails the streams within about a second;
//! through the router the client's PINGs reach the pods that carry its
//! streams, so the streams on the dead pod end UNAVAILABLE within seconds
//! (not the quarter of an hour TCP takes), and the others are untouched.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use balancer_tests::{
    agent::Agent,
    grpc::{GoServer, PEER, gopeer_bin, service_yaml, setup},
    process::require_root,
    topology::{ROUTER_ADDR, Topology},
};
use serde_json::Value;

const PORT: u16 = 50058;
const VIP: &str = "198.19.0.78";

/// Eight long-lived streams on one channel over the router to pods 0..4,
/// from `client` (a command that runs 12 s in the client namespace);
/// pod0's node dies 2 s in, and with `remove`, its endpoint is removed a
/// second later (the EndpointSlice controller, once the node is declared
/// dead). Checks that pod0's two streams end UNAVAILABLE within 5 s and
/// the others run on, and returns the client's report.
fn pod0_dies_under_streams(
    t: &Topology,
    agent: &Agent,
    client: &str,
    remove: Option<&str>,
) -> Value {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} {client}",
        t.cgroup.path.display(),
        t.client.name,
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("grpc client");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let started = lines.next().expect("a line").expect("read");
    assert!(started.contains("started"), "{started}");
    let t_start = Instant::now();
    // Let the streams exchange a few messages, then pod0's node dies.
    std::thread::sleep(Duration::from_secs(2));
    let down = Command::new("ip")
        .args(["-n", &t.pods[0].ns.name, "link", "set", "eth0", "down"])
        .status()
        .expect("ip");
    assert!(down.success(), "link down");
    let died_at = t_start.elapsed().as_secs_f64();
    if let Some(yaml) = remove {
        std::thread::sleep(Duration::from_secs(1));
        agent.reload(yaml).expect("reload");
    }
    let last = lines.next().expect("the report").expect("read");
    let _ = child.wait();
    let v: Value = serde_json::from_str(&last).expect("JSON");
    let streams = v["streams"].as_array().expect("streams");
    let on_pod0: Vec<&Value> = streams.iter().filter(|s| s["pod"] == "pod0").collect();
    assert_eq!(on_pod0.len(), 2, "two of the eight streams on pod0: {v}");
    eprintln!("pod0 died at {died_at:.2} s; its streams: {on_pod0:?}");
    for s in &on_pod0 {
        assert_eq!(s["code"], "UNAVAILABLE", "{v}");
        // The client's clock started a little before ours.
        let at = s["at"].as_f64().expect("at");
        assert!(
            at - died_at < 5.0,
            "ended {:.1} s after the pod died: {v}\n{}",
            at - died_at,
            agent.router_log()
        );
    }
    for s in streams.iter().filter(|s| s["pod"] != "pod0") {
        assert_eq!(s["code"], "OK", "the other streams are untouched: {v}");
        assert!(s["messages"].as_u64() >= Some(30), "{v}");
    }
    let status = agent.status_json().expect("status");
    assert!(
        status["router"]["process"].is_object(),
        "router status: {status}"
    );
    v
}

#[test]
fn streams_on_a_pod_whose_node_dies_end_unavailable_within_seconds_and_others_are_untouched() {
    let (t, _servers, agent) = setup("podlive", VIP, PORT, &[], &[]);
    let client = format!("python3 {PEER} streams {VIP}:80 8 12 1000");
    pod0_dies_under_streams(&t, &agent, &client, None);
}

/// Four grpc-go pods behind the http2 service, and the agent with its
/// router.
fn grpc_go_setup(tag: &str) -> (Topology, Vec<GoServer>, Agent) {
    require_root();
    let t = Topology::new(tag, 4, &[]).expect("topology");
    let servers: Vec<GoServer> = t
        .pods
        .iter()
        .map(|p| GoServer::start(&p.ns.name, &p.name, PORT).expect("grpc-go server"))
        .collect();
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &service_yaml(&t, VIP, PORT),
        Some(&t.node.name),
        &["--proxy-addr", ROUTER_ADDR],
    )
    .expect("agent");
    (t, servers, agent)
}

/// A grpc-go client: keepalive 10 s (grpc-go's shortest) and 1 s timeout,
/// four bidi and four server streams. It pings only after its channel went
/// quiet for 10 s, and its channel stays busy through the live pods, so it
/// never pings here: the dead pod is found by the probe of a removed
/// endpoint's connections.
#[test]
fn a_grpc_go_clients_bidi_and_server_streams_on_a_dead_pod_end_unavailable_once_it_is_removed() {
    let (t, servers, agent) = grpc_go_setup("podlivegocl");
    let client = format!(
        "{} client {VIP}:80 8 12",
        gopeer_bin().expect("gopeer").display()
    );
    let mut without_pod0 = service_yaml(&t, VIP, PORT);
    without_pod0 = without_pod0.replace(&format!("      - address: {}\n", t.pods[0].v4), "");
    let v = pod0_dies_under_streams(&t, &agent, &client, Some(&without_pod0));
    let streams = v["streams"].as_array().expect("streams");
    assert!(
        streams.iter().filter(|s| s["pod"] != "pod0").count() == 6,
        "{v}"
    );
    let policed: Vec<u64> = servers.iter().map(GoServer::too_many_pings).collect();
    assert_eq!(policed, [0, 0, 0, 0], "GOAWAY too_many_pings per pod");
}

/// The same with grpc-go pods under grpc-go's default keepalive
/// enforcement (pings no closer than 5 minutes unless the server sends
/// data, none without streams; a third strike ends the connection with
/// GOAWAY ENHANCE_YOUR_CALM `too_many_pings`). The router's probes follow
/// the client's pace (1 s here) and go only to pod connections that carry
/// its open streams: no pod ever polices the router.
#[test]
fn grpc_go_pods_with_default_ping_policing_never_see_too_many_pings_from_the_router() {
    let (t, servers, agent) = grpc_go_setup("podlivego");
    let client = format!("python3 {PEER} streams {VIP}:80 8 12 1000");
    pod0_dies_under_streams(&t, &agent, &client, None);
    let policed: Vec<u64> = servers.iter().map(GoServer::too_many_pings).collect();
    assert_eq!(policed, [0, 0, 0, 0], "GOAWAY too_many_pings per pod");
    // The control: the same pace straight to pod1 on a channel with no
    // call is policed, so the zeros above are the router's doing.
    let idle = format!(
        "import grpc, time\n\
         opts = [('grpc.keepalive_time_ms', 1000), ('grpc.keepalive_timeout_ms', 1000),\n\
         ('grpc.keepalive_permit_without_calls', 1), ('grpc.http2.max_pings_without_data', 0)]\n\
         ch = grpc.insecure_channel('{}:{PORT}', options=opts)\n\
         grpc.channel_ready_future(ch).result(timeout=10)\n\
         time.sleep(6)\n",
        t.pods[1].v4
    );
    let status = Command::new("ip")
        .args(["netns", "exec", &t.client.name, "python3", "-c", &idle])
        .stderr(Stdio::null())
        .status()
        .expect("idle client");
    assert!(status.success());
    assert!(
        servers[1].too_many_pings() >= 1,
        "grpc-go did not police an idle channel pinging every second: the check sees nothing"
    );
}
