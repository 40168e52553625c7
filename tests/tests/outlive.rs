//! HTTP/2 traffic outlives the control plane, and the control plane the
//! router: `kill -9` of either under a real gRPC client (grpcio, one
//! channel, 16 unary RPCs in flight at all times), counting every failed
//! RPC.

use std::time::Duration;

use balancer_tests::{
    agent::Agent,
    grpc::{self, Killed, Load},
    process::require_root,
    topology::{ROUTER_ADDR, Topology},
};

const PORT: u16 = 50053;
const VIP_IP: &str = "198.19.0.71";
const VIP: &str = "198.19.0.71:80";
const INFLIGHT: usize = 16;

fn setup(tag: &str) -> (Topology, Vec<Killed>, Agent) {
    setup_with(tag, &[])
}

fn setup_with(tag: &str, extra: &[&str]) -> (Topology, Vec<Killed>, Agent) {
    grpc::setup(tag, VIP_IP, PORT, &[], extra)
}

#[test]
fn kill_9_of_the_control_plane_under_grpc_load_fails_no_rpc() {
    let (t, _servers, mut agent) = setup("cpkill");
    let load = Load::start(&t.client.name, &t.cgroup.path, VIP, 5.0, INFLIGHT).expect("load");
    std::thread::sleep(Duration::from_millis(1500));
    agent.kill_agent().expect("kill -9 the agent");
    std::thread::sleep(Duration::from_millis(500));
    agent.start_agent().expect("the agent again");
    assert!(
        agent.log().contains("adopted the pinned data path"),
        "{}",
        agent.log()
    );
    let r = load.wait().expect("load report");
    eprintln!(
        "control plane kill -9 at 1.5 s, back at 2.0 s: {} RPCs, {} failed",
        r.ok,
        r.failures.len()
    );
    assert!(r.failures.is_empty(), "failed RPCs: {:?}", r.failures);
    assert!(r.ok > 1000, "the load ran: {}", r.ok);
    // The channel never noticed: still spread over every pod.
    assert_eq!(r.pods_after(4000).len(), 4, "{:?}", r.raw);
    // And the restarted agent sees the router serving its table.
    assert!(agent.router_synced().expect("status"));
}

#[test]
fn kill_9_of_the_router_under_grpc_load_fails_only_rpcs_in_flight() {
    let (t, _servers, mut agent) = setup("rtkill");
    let load = Load::start(&t.client.name, &t.cgroup.path, VIP, 6.0, INFLIGHT).expect("load");
    // The load's clock starts when it says so; ours is within a few ms.
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = t0.elapsed().as_millis() as u64;
    agent.kill_router().expect("kill -9 the router");
    // As kubelet restarts a container: a second later.
    std::thread::sleep(Duration::from_millis(1000));
    let restart_at = t0.elapsed().as_millis() as u64;
    agent.start_router().expect("the router again");
    let back_at = t0.elapsed().as_millis() as u64;
    let r = load.wait().expect("load report");
    let served = r.first_ok_after(killed_at + 100);
    let spread = r.spread_after(killed_at + 100, 4);
    eprintln!(
        "router kill -9 at {killed_at} ms, a new one started at {restart_at} ms (steered to from \
         {back_at} ms): {} RPCs ok, {} failed ({:?}); served again from {served:?} ms; spread \
         over 4 pods again from {spread:?} ms",
        r.ok,
        r.failures.len(),
        r.failures.iter().take(20).collect::<Vec<_>>(),
    );
    // Only what was in flight when the router died: its streams, and the
    // few RPCs grpcio handed to the dying transport in that instant (the
    // kernel saw the listener close; measured 13-23 of 16 in flight).
    assert!(
        r.failures.len() <= 2 * INFLIGHT,
        "more than the RPCs in flight failed: {:?}",
        r.failures
    );
    assert!(
        r.failures.iter().all(|f| f.0 < killed_at + 100),
        "RPCs failed after the moment of the kill: {:?}",
        r.failures
    );
    // The channel reconnected at once, onto the listener the agent held:
    // the new router served it as soon as it ran, spread over every pod.
    let served = served.expect("served again");
    assert!(
        served <= back_at + 200,
        "served again only at {served} ms (router back at {back_at} ms)"
    );
    let spread = spread.expect("spread again");
    assert!(
        spread <= back_at + 1000,
        "spread again only at {spread} ms (router back at {back_at} ms)"
    );
    assert_eq!(r.pods_after(back_at + 1000).len(), 4, "{:?}", r.raw);
}

#[test]
fn a_router_that_does_not_come_back_leaves_clients_to_l4_after_the_grace() {
    let (t, _servers, mut agent) = setup_with("rtgone", &["--router-grace", "2s"]);
    let load = Load::start(&t.client.name, &t.cgroup.path, VIP, 7.0, INFLIGHT).expect("load");
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = t0.elapsed().as_millis() as u64;
    agent.kill_router().expect("kill -9 the router");
    let r = load.wait().expect("load report");
    let served = r.first_ok_after(killed_at + 100);
    eprintln!(
        "router kill -9 at {killed_at} ms, never back (grace 2 s): {} RPCs ok, {} failed \
         (at {:?} ms); served again from {served:?} ms",
        r.ok,
        r.failures.len(),
        r.failures
            .iter()
            .map(|f| f.0)
            .collect::<std::collections::BTreeSet<_>>(),
    );
    // Failures at two moments only: the RPCs in flight at the kill, and,
    // when the grace ran out, those that waited on the held listener (with
    // those grpcio fails fast while its channel reconnects: 17 here on an
    // idle machine, over a hundred on a busy one, all within milliseconds).
    let at_kill = |f: &&(u64, String)| f.0 < killed_at + 100;
    assert!(
        r.failures.iter().filter(at_kill).count() <= 2 * INFLIGHT,
        "{:?}",
        r.failures
    );
    let later: Vec<u64> = r
        .failures
        .iter()
        .filter(|f| !at_kill(f))
        .map(|f| f.0)
        .collect();
    let grace_end = *later.first().expect("the queued RPCs fail at the grace");
    assert!(
        grace_end <= killed_at + 2000 + 750,
        "the grace ended only at {grace_end} ms"
    );
    assert!(
        later.iter().all(|t| *t < grace_end + 300),
        "failures long after the grace: {later:?}"
    );
    let served = served.expect("served again");
    assert!(
        served <= grace_end + 500,
        "served again at L4 only at {served} ms"
    );
    // At L4 now: one connection, one pod.
    assert_eq!(r.pods_after(6000).len(), 1, "{:?}", r.raw);
    assert!(
        agent.log().contains("no router came back"),
        "{}",
        agent.log()
    );
}

#[test]
fn run_with_proxy_addr_starts_a_router_that_outlives_the_agent() {
    require_root();
    let t = Topology::new("runrouter", 4, &[]).expect("topology");
    let _servers = grpc::servers(&t, PORT, &[]);
    let pins = balancer_tests::agent::PinDir::new(&format!("lbt-runrouter-{}", std::process::id()));
    let mut agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &grpc::service_yaml(&t, VIP_IP, PORT),
        Some(&t.node.name),
        &[
            "--pin",
            "--bpffs",
            &pins.path,
            "--router-by-agent",
            ROUTER_ADDR,
        ],
    )
    .expect("agent");
    let mut pid = None;
    Topology::wait_for(
        "the router the agent started",
        Duration::from_secs(20),
        || {
            let s = agent.status_json()?;
            pid = s["router"]["process"]["pid"].as_u64();
            Ok(s["router"]["alive"] == true
                && s["router"]["process"]["generation"] == s["generation"])
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    let load = Load::start(&t.client.name, &t.cgroup.path, VIP, 4.0, INFLIGHT).expect("load");
    std::thread::sleep(Duration::from_millis(1000));
    agent.kill_agent().expect("kill -9 the agent");
    std::thread::sleep(Duration::from_millis(500));
    agent.start_agent().expect("the agent again");
    let r = load.wait().expect("load report");
    assert!(r.failures.is_empty(), "failed RPCs: {:?}", r.failures);
    assert_eq!(r.pods_after(3000).len(), 4, "{:?}", r.raw);
    assert!(
        agent.log().contains("a router already runs; keeping it"),
        "{}",
        agent.log()
    );
    let s = agent.status_json().expect("status");
    assert_eq!(
        s["router"]["process"]["pid"].as_u64(),
        pid,
        "the same router: {s}"
    );
    // SIGTERM to the agent stops the router it found, too.
    assert!(agent.stop().expect("stop").success(), "{}", agent.log());
    let pid = nix::unistd::Pid::from_raw(pid.expect("pid") as i32);
    assert!(
        nix::sys::signal::kill(pid, None).is_err(),
        "the router outlived the agent's SIGTERM"
    );
}
