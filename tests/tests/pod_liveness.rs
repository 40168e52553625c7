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

use balancer_tests::grpc::{PEER, setup};
use serde_json::Value;

const PORT: u16 = 50058;
const VIP: &str = "198.19.0.78";

#[test]
fn streams_on_a_pod_whose_node_dies_end_unavailable_within_seconds_and_others_are_untouched() {
    let (t, _servers, agent) = setup("podlive", VIP, PORT, &[], &[]);
    let seconds = 12.0;
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 {PEER} streams {VIP}:80 8 {seconds} 1000",
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
}
