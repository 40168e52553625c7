//! `balancer-agent check`: each `fail` made for real, on this kernel:
//! no bpffs, a dropped capability (capsh), an apiserver that denies the
//! agent's RBAC or refuses everything (the fake apiserver), and a dead
//! router under a running agent. The seccomp case runs inside
//! `cargo xtask image --check`, under the runtime's default profile.

use std::{
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use balancer_tests::{
    agent::{Agent, agent_bin},
    fakeapi::FakeApi,
    netns::unique_prefix,
    process::require_root,
    topology::Topology,
};
use serde_json::Value;

fn run(cmd: &mut Command) -> (Output, Value) {
    let out = cmd.output().expect("balancer-agent check");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check -o json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

fn preflight(extra: &[&str]) -> (Output, Value) {
    run(Command::new(agent_bin())
        .args(["check", "--preflight", "-o", "json"])
        .args(extra))
}

/// The level of item `name`, and the item.
fn level<'a>(v: &'a Value, name: &str) -> (&'a str, &'a Value) {
    let it = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no item {name}: {v}"));
    (it["level"].as_str().expect("level"), it)
}

#[test]
fn preflight_on_this_node_passes_every_item_the_agent_needs() {
    require_root();
    // A namespace directory of its own: /run/netns exists only once some
    // test made a namespace.
    let netns = std::env::temp_dir().join(unique_prefix("chknetns"));
    std::fs::create_dir_all(&netns).expect("dir");
    let (out, v) = preflight(&["--netns-dir", &netns.display().to_string()]);
    let _ = std::fs::remove_dir_all(&netns);
    assert!(out.status.success(), "{v}");
    for name in [
        "kernel",
        "btf",
        "cgroup",
        "bpffs",
        "capabilities",
        "capabilities (namespaces)",
        "seccomp",
        "netns",
    ] {
        assert_eq!(level(&v, name).0, "ok", "{v}");
    }
    // The table form: one line per item, led by its level.
    let table = Command::new(agent_bin())
        .args(["check", "--preflight"])
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("ok    kernel")),
        "{text}"
    );
}

#[test]
fn preflight_without_bpffs_fails_and_names_it() {
    require_root();
    let dir = std::env::temp_dir().join(unique_prefix("chkbpffs"));
    std::fs::create_dir_all(&dir).expect("dir");
    let (out, v) = preflight(&["--bpffs", &dir.join("balancer").display().to_string()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1), "{v}");
    let (lvl, it) = level(&v, "bpffs");
    assert_eq!(lvl, "fail", "{v}");
    assert!(
        it["hint"]
            .as_str()
            .is_some_and(|h| h.contains("mount -t bpf")),
        "{it}"
    );
    assert_eq!(v["ok"], false);
}

#[test]
fn preflight_without_cap_bpf_fails_and_names_the_capability() {
    require_root();
    let script = format!("exec {} check --preflight -o json", agent_bin().display());
    let (out, v) = run(Command::new("capsh").args([
        "--drop=cap_bpf,cap_perfmon,cap_sys_admin",
        "--",
        "-c",
        &script,
    ]));
    assert_eq!(out.status.code(), Some(1), "{v}");
    let (lvl, it) = level(&v, "capabilities");
    assert_eq!(lvl, "fail", "{v}");
    let detail = it["detail"].as_str().expect("detail");
    assert!(
        detail.contains("CAP_BPF") && detail.contains("CAP_PERFMON"),
        "{it}"
    );
    assert!(!detail.contains("CAP_NET_ADMIN"), "it was kept: {it}");
    // bpf(2) itself is refused, and the namespaces cannot be entered.
    assert_eq!(level(&v, "seccomp").0, "fail", "{v}");
    assert_eq!(level(&v, "capabilities (namespaces)").0, "warn", "{v}");
    assert_eq!(level(&v, "netns").0, "warn", "{v}");
}

#[test]
fn preflight_against_an_apiserver_asks_rbac_and_fails_on_a_denied_verb_or_a_403() {
    require_root();
    let dir = std::env::temp_dir().join(unique_prefix("chkkube"));
    let api = FakeApi::start(&dir).expect("fake apiserver");
    let kube = |api: &FakeApi| {
        run(Command::new(agent_bin())
            .args(["check", "--preflight", "--kube", "-o", "json"])
            .env("KUBECONFIG", &api.kubeconfig))
    };
    let (out, v) = kube(&api);
    assert!(out.status.success(), "{v}");
    assert_eq!(level(&v, "apiserver").0, "ok", "{v}");
    assert_eq!(level(&v, "rbac").0, "ok", "{v}");
    let asked = api
        .requests()
        .iter()
        .filter(|r| r.contains("selfsubjectaccessreviews"))
        .count();
    assert_eq!(
        asked,
        6,
        "list and watch on three resources: {:?}",
        api.requests()
    );
    // A ClusterRole without watch on endpointslices.
    api.deny("watch", "endpointslices");
    let (out, v) = kube(&api);
    assert_eq!(out.status.code(), Some(1), "{v}");
    let (lvl, it) = level(&v, "rbac");
    assert_eq!(lvl, "fail", "{v}");
    assert!(
        it["detail"]
            .as_str()
            .is_some_and(|d| d.contains("watch endpointslices") && !d.contains("list")),
        "{it}"
    );
    assert!(
        it["hint"]
            .as_str()
            .is_some_and(|h| h.contains("clusterrole")),
        "{it}"
    );
    // No role at all: 403 for everything.
    api.forbid_all(true);
    let (out, v) = kube(&api);
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(level(&v, "apiserver").0, "fail", "{v}");
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}

#[test]
fn a_running_agent_checks_ok_and_a_dead_router_fails() {
    require_root();
    let t = Topology::new("chkrun", 2, &[8080]).expect("topology");
    let mut agent = Agent::start_web_with_router(&t, "198.19.0.81").expect("agent");
    let check = |agent: &Agent| {
        run(Command::new(agent_bin())
            .args(["check", "-o", "json", "--admin-socket"])
            .arg(&agent.admin_socket))
    };
    let (out, v) = check(&agent);
    assert!(out.status.success(), "{v}");
    for name in [
        "agent",
        "programs",
        "router",
        "source",
        "maps",
        "socket maps",
        "refused",
    ] {
        assert_eq!(level(&v, name).0, "ok", "{name}: {v}");
    }
    agent.kill_router().expect("kill -9 the router");
    let mut seen = Value::Null;
    Topology::wait_for(
        "check to see the router down",
        Duration::from_secs(5),
        || {
            let (out, v) = check(&agent);
            let down = out.status.code() == Some(1) && level(&v, "router").0 == "fail";
            seen = v;
            Ok(down)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {seen}"));
    let (_, it) = level(&seen, "router");
    assert!(
        it["detail"].as_str().is_some_and(|d| d.contains("down")),
        "{it}"
    );
    // No agent at all.
    let (out, v) = run(Command::new(agent_bin()).args([
        "check",
        "-o",
        "json",
        "--admin-socket",
        "/nonexistent/admin.sock",
    ]));
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(level(&v, "agent").0, "fail", "{v}");
}
