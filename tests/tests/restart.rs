//! The data path outlives the agent: with --pin, a `kill -9` leaves every
//! program attached and every count counting, connections keep being
//! balanced while no agent runs, a new agent adopts the pins without a
//! rewrite, and `cleanup` removes them all.

use std::{process::Command, time::Duration};

use balancer_tests::{
    agent::{Agent, agent_bin},
    bpfquery,
    peers::{hold_connections, short_connections},
    topology::Topology,
    yaml::endpoints_yaml,
};

const SVC: &str = "default/echo";
const VIP: &str = "198.19.0.10";

#[test]
fn kill_9_keeps_balancing_and_a_restarted_agent_adopts_the_pins() {
    let t = Topology::new("restart", 4, &[8080]).expect("topology");
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let yaml = endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &eps);
    let pin_dir = balancer_tests::agent::PinDir::new(&t.prefix);
    let pins = pin_dir.path.clone();
    let args = ["--pin", "--bpffs", pins.as_str()];
    let agent = Agent::start_with(&t.prefix, &t.cgroup.path, &yaml, None, &args).expect("agent");
    let first_status = agent.status_json().expect("status");
    let first = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        8,
    )
    .expect("client");
    assert!(
        first.result.pods.values().all(|&n| n == 2),
        "{:?}",
        first.result.pods
    );

    // kill -9: no cleanup at all.
    let pid = agent.pid().expect("pid");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    std::thread::sleep(Duration::from_millis(300));
    for (name, n) in bpfquery::attachments(&t.cgroup.path).expect("query") {
        assert_eq!(n, 1, "{name} detached by the agent's death");
    }
    // No agent: new connections are still balanced, least-conn still sees
    // the live counts (2 per pod): 4 more go one per pod.
    let during = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        4,
    )
    .expect("client");
    assert!(
        during.result.errors.is_empty(),
        "{:?}",
        during.result.errors
    );
    assert!(
        during.result.pods.values().all(|&n| n == 1),
        "{:?}",
        during.result.pods
    );
    drop(agent);

    // A new agent adopts: same counts, nothing rewritten.
    let prefix2 = format!("{}-b", t.prefix);
    let agent = Agent::start_with(&prefix2, &t.cgroup.path, &yaml, None, &args).expect("agent 2");
    assert!(
        agent.log().contains("adopted the pinned data path"),
        "{}",
        agent.log()
    );
    let status = agent.status_json().expect("status");
    assert_eq!(status["adopted"], true, "{status}");
    // Adopted programs are reported as the kernel sees them, each the one
    // program at its attach point, as the first agent left it.
    let before = first_status["programs"].as_array().expect("programs");
    let after = status["programs"].as_array().expect("programs");
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(after) {
        assert_eq!(a["attached"], true, "{a}");
        assert_eq!(a["ids"], b["ids"], "the same programs: {b} then {a}");
    }
    assert!(
        status["pins"]
            .as_str()
            .is_some_and(|p| p.starts_with(&pins)),
        "{status}"
    );
    assert!(
        agent
            .cli(&["status"])
            .expect("status")
            .contains("adopted from an earlier agent")
    );
    let counts = agent.active_by_endpoint(SVC).expect("endpoints");
    assert!(
        counts.values().all(|&n| n == 3),
        "counts survived the restart: {counts:?}"
    );
    let status = agent.status_json().expect("status");
    assert!(
        status["counters"]["balanced"].as_u64().unwrap_or(0) >= 12,
        "{status}"
    );
    first.close().expect("close");
    during.close().expect("close");
    Topology::wait_for("all counts back to 0", Duration::from_secs(10), || {
        Ok(agent.active_by_endpoint(SVC)?.values().all(|&n| n == 0))
    })
    .expect("zero");
    // An update after adoption applies as usual.
    let status = agent
        .reload(&endpoints_yaml(
            SVC,
            &[VIP],
            80,
            8080,
            "least-conn",
            &eps[..2],
        ))
        .expect("reload");
    assert_eq!(status["last_reload"]["ok"], true);
    let r = short_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        4,
    )
    .expect("client");
    assert_eq!(r.count("pod0") + r.count("pod1"), 4, "{r:?}");

    // SIGTERM with --pin leaves the data path; cleanup removes it.
    drop(agent);
    for (name, n) in bpfquery::attachments(&t.cgroup.path).expect("query") {
        assert_eq!(n, 1, "{name}: SIGTERM with --pin must leave it attached");
    }
    let out = Command::new(agent_bin())
        .args(["cleanup", "--bpffs", &pins])
        .output()
        .expect("cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"));
    for (name, n) in bpfquery::attachments(&t.cgroup.path).expect("query") {
        assert_eq!(n, 0, "{name} still attached after cleanup");
    }
    let r = short_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        1,
    )
    .expect("client");
    assert_eq!(r.errors.get("ENETUNREACH"), Some(&1), "{r:?}");
}

#[test]
fn pins_of_another_layout_are_refused_with_the_way_out() {
    use std::os::unix::fs::MetadataExt;
    let t = Topology::new("oldpins", 1, &[8080]).expect("topology");
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let yaml = endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &eps);
    let pin_dir = balancer_tests::agent::PinDir::new(&t.prefix);
    let pins = pin_dir.path.clone();
    // bpffs where the pins go (the agent mounts it too, when it must).
    let fs = Command::new("stat")
        .args(["-f", "-c", "%T", "/sys/fs/bpf"])
        .output()
        .expect("stat");
    if String::from_utf8_lossy(&fs.stdout).trim() != "bpf_fs" {
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("mount");
        assert!(ok.success(), "mounting bpffs");
    }
    // What an agent of map layout v1 left for this cgroup: its marker.
    let ino = std::fs::metadata(&t.cgroup.path).expect("cgroup").ino();
    std::fs::create_dir_all(format!("{pins}/v1/cg-{ino}/complete")).expect("old pins");
    let args = ["--pin", "--bpffs", pins.as_str()];
    let err = Agent::start_with(&t.prefix, &t.cgroup.path, &yaml, None, &args)
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("v1/cg-{ino}")) && msg.contains("balancer-agent cleanup"),
        "{msg}"
    );
    for (name, n) in bpfquery::attachments(&t.cgroup.path).expect("query") {
        assert_eq!(n, 0, "{name} attached after a refused start");
    }
    // The way out works.
    let out = Command::new(agent_bin())
        .args(["cleanup", "--bpffs", &pins])
        .output()
        .expect("cleanup");
    assert!(out.status.success());
    let agent = Agent::start_with(&t.prefix, &t.cgroup.path, &yaml, None, &args)
        .expect("starts after cleanup");
    drop(agent);
}

/// A bpffs the agent mounted itself on an empty directory, unmounted and
/// removed on drop.
struct OwnBpffs(String);

impl Drop for OwnBpffs {
    fn drop(&mut self) {
        let _ = Command::new(agent_bin())
            .args(["cleanup", "--bpffs", &self.0])
            .output();
        let _ = Command::new("umount").arg(&self.0).output();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn cleanup_works_on_a_bpffs_the_agent_mounted_itself() {
    let t = Topology::new("ownbpffs", 2, &[8080]).expect("topology");
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let yaml = endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &eps);
    let dir = OwnBpffs(format!("/tmp/{}-bpffs", t.prefix));
    std::fs::create_dir_all(&dir.0).expect("empty dir");
    let args = ["--pin", "--bpffs", dir.0.as_str()];
    let agent = Agent::start_with(&t.prefix, &t.cgroup.path, &yaml, None, &args).expect("agent");
    drop(agent);
    // The kernel's own files sit at the root of the new bpffs, beside the
    // agent's layout directory.
    let entries: Vec<(String, bool)> = std::fs::read_dir(&dir.0)
        .expect("read bpffs")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                e.file_type().expect("type").is_dir(),
            )
        })
        .collect();
    assert!(
        entries.iter().any(|(_, d)| *d),
        "a layout directory: {entries:?}"
    );
    let out = Command::new(agent_bin())
        .args(["cleanup", "--bpffs", &dir.0])
        .output()
        .expect("cleanup");
    assert!(
        out.status.success(),
        "cleanup on {entries:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, n) in bpfquery::attachments(&t.cgroup.path).expect("query") {
        assert_eq!(n, 0, "{name} still attached after cleanup");
    }
    let left: Vec<String> = std::fs::read_dir(&dir.0)
        .expect("read bpffs")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "layouts left: {left:?}");
}
