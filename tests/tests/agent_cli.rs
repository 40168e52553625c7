//! The agent's contract with its operator: start-up failures, bad reloads,
//! the admin socket and the CLI.

use std::{os::unix::fs::PermissionsExt, process::Command, time::Duration};

use balancer_tests::{
    agent::{Agent, agent_bin},
    bpfquery,
    cgroup::Cgroup,
    netns::unique_prefix,
    peers::{hold_connections, short_connections},
    process::require_root,
    topology::Topology,
    yaml::endpoints_yaml,
};

const SVC: &str = "default/echo";
const VIP: &str = "198.19.0.10";

fn run_agent(args: &[&str]) -> (bool, String) {
    let out = Command::new(agent_bin())
        .arg("run")
        .args(args)
        .output()
        .expect("spawn agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_file_at_start_exits_nonzero_naming_the_field_and_attaches_nothing() {
    require_root();
    let prefix = unique_prefix("badstart");
    let cg = Cgroup::new(&prefix).expect("cgroup");
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).expect("dir");
    let cases = [
        (
            "services:\n  - name: a/b\n    addresses: [198.19.0.300]\n    ports: [{port: 80}]\n",
            "services[0].addresses[0]",
        ),
        (
            "services:\n  - name: a/b\n    addresses: [198.19.0.1]\n    ports:\n      - port: 0\n",
            "1..=65535",
        ),
        (
            "services:\n  - name: a/b\n    addresses: [198.19.0.1]\n    ports:\n      - port: 80\n        protocol: sctp\n",
            "services[0].ports[0].protocol",
        ),
        ("services: [\n", "line"),
    ];
    for (i, (yaml, needle)) in cases.iter().enumerate() {
        let f = dir.join(format!("bad{i}.yaml"));
        std::fs::write(&f, yaml).expect("write");
        let sock = dir.join(format!("s{i}.sock"));
        let (ok, stderr) = run_agent(&[
            "--endpoints-file",
            f.to_str().expect("path"),
            "--cgroup",
            cg.path.to_str().expect("path"),
            "--admin-socket",
            sock.to_str().expect("path"),
        ]);
        assert!(!ok, "a bad file must fail the start");
        assert!(
            stderr.contains(needle),
            "error should name {needle:?}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
        for (name, n) in bpfquery::attachments(&cg.path).expect("query") {
            assert_eq!(n, 0, "{name} attached after a failed start");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_cgroup_and_missing_root_are_one_clear_line() {
    require_root();
    let dir = std::env::temp_dir().join(unique_prefix("startfail"));
    std::fs::create_dir_all(&dir).expect("dir");
    let f = dir.join("eps.yaml");
    std::fs::write(&f, endpoints_yaml(SVC, &[VIP], 80, 80, "least-conn", &[])).expect("write");
    let sock = dir.join("a.sock");
    let (ok, stderr) = run_agent(&[
        "--endpoints-file",
        f.to_str().expect("p"),
        "--cgroup",
        "/sys/fs/cgroup/unified/does-not-exist-lbt",
        "--admin-socket",
        sock.to_str().expect("p"),
    ]);
    assert!(!ok);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // Not root: drop to nobody with setpriv (util-linux).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(agent_bin())
        .args([
            "run",
            "--endpoints-file",
            f.to_str().expect("p"),
            "--admin-socket",
        ])
        .arg(dir.join("nobody.sock"))
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("must run as root"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_reload_keeps_the_last_good_state_and_a_good_one_applies() {
    let t = Topology::new("badreload", 2, &[8080]).expect("topology");
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let good = endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &eps);
    let agent = Agent::start(&t.prefix, &t.cgroup.path, &good).expect("agent");
    let before = agent.endpoints_json().expect("json");

    let bad = good.replace("targetPort: 8080", "targetPort: 99999");
    let status = agent.reload(&bad).expect("reload");
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    let err = status["last_reload"]["error"].as_str().expect("error");
    assert!(err.contains("services[0].ports[0].targetPort"), "{err}");
    assert!(err.contains("line"), "{err}");
    assert!(agent.log().contains("keeping the last good state"));
    // Same state, still balancing: 8 live connections spread 4/4.
    let after = agent.endpoints_json().expect("json");
    assert_eq!(before["services"], after["services"]);
    let held = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        8,
    )
    .expect("client");
    let r = &held.result;
    assert_eq!((r.count("pod0"), r.count("pod1")), (4, 4), "{r:?}");
    held.close().expect("close");

    // Duplicate VIP:port on reload: refused too.
    let dup = format!(
        "{good}{}",
        good.trim_start_matches("services:\n")
            .replace(SVC, "default/other")
    );
    let status = agent.reload(&dup).expect("reload");
    assert_eq!(status["last_reload"]["ok"], false);
    assert!(
        status["last_reload"]["error"]
            .as_str()
            .expect("e")
            .contains("already used")
    );

    // A good file applies: only pod1 now.
    let status = agent
        .reload(&endpoints_yaml(
            SVC,
            &[VIP],
            80,
            8080,
            "least-conn",
            &eps[1..],
        ))
        .expect("reload");
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    let r = short_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        4,
    )
    .expect("client");
    assert_eq!(r.count("pod1"), 4, "{r:?}");
}

#[test]
fn admin_socket_is_root_only_and_cli_tables_show_live_counts() {
    let t = Topology::new("cli", 2, &[8080]).expect("topology");
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let agent = Agent::start(
        &t.prefix,
        &t.cgroup.path,
        &endpoints_yaml(SVC, &[VIP], 80, 8080, "round-robin", &eps),
    )
    .expect("agent");
    let mode = std::fs::metadata(&agent.admin_socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

    let held = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        6,
    )
    .expect("client");
    Topology::wait_for("counts", Duration::from_secs(5), || {
        Ok(agent.active_by_endpoint(SVC)?.values().sum::<u64>() == 6)
    })
    .expect("counts");
    let table = agent.cli(&["endpoints"]).expect("endpoints");
    assert!(table.contains("ACTIVE"), "{table}");
    assert!(table.contains(&format!("{}:8080", eps[0])), "{table}");
    assert_eq!(
        table
            .lines()
            .filter(|l| l.contains(SVC) && l.contains(" 3 "))
            .count(),
        2,
        "{table}"
    );
    let one = agent.cli(&["endpoints", SVC, "-o", "json"]).expect("one");
    assert!(one.contains("active_connections"));
    assert!(
        agent
            .cli(&["endpoints", "nope/nope"])
            .expect_err("unknown")
            .to_string()
            .contains("no service")
    );
    let services = agent.cli(&["services"]).expect("services");
    assert!(services.contains("80->8080/tcp/round-robin"), "{services}");
    assert!(services.contains("2/2"), "{services}");
    let status = agent.cli(&["status"]).expect("status");
    for needle in [
        "balancer_connect4",
        "balancer_h2_streams",
        "sock_ops",
        "SERVICES",
        "BACKEND_STATS",
        "AFFINITY",
        "reload:    ok",
        "endpoints.yaml",
    ] {
        assert!(status.contains(needle), "status lacks {needle}: {status}");
    }
    let top = agent
        .cli(&["top", "--iterations", "2", "--interval", "100ms"])
        .expect("top");
    assert!(top.contains("CONNS") && top.contains("SHARE"), "{top}");
    assert!(
        top.contains("imbalance 1.00 (busiest/mean of active connections)"),
        "{top}"
    );
    let json = agent.status_json().expect("status json");
    // connect4/6, getpeername4/6, sock_ops, and the two sk_msg programs
    // (stream counting on SOCKS, the splice on SPLICE).
    let names: Vec<&str> = json["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
    assert!(
        names.contains(&"balancer_h2_streams") && names.contains(&"balancer_splice"),
        "{names:?}"
    );
    // What the kernel reports: one program at each attach point.
    for p in json["programs"].as_array().expect("programs") {
        assert_eq!(p["attached"], true, "{p}");
        assert_eq!(p["ids"].as_array().map(Vec::len), Some(1), "{p}");
    }
    // AFFINITY, which only the kernel writes, is counted by a walk.
    assert!(
        json["maps"]
            .as_array()
            .expect("maps")
            .iter()
            .any(|m| m["name"] == "AFFINITY" && m["max_entries"].as_u64() > Some(0)),
        "{}",
        json["maps"]
    );
    assert_eq!(json["counters"]["balanced"], 6);
    held.close().expect("close");
}

fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").expect("http response");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[test]
fn metrics_and_health_endpoints_report_live_counts() {
    let t = Topology::new("metrics", 2, &[8080]).expect("topology");
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    // A free loopback port of the root namespace (no traffic leaves it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &eps),
        None,
        &["--metrics-addr", &addr],
    )
    .expect("agent");
    assert_eq!(http_get(&addr, "/healthz").0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(&addr, "/readyz").0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(&addr, "/nope").0, "HTTP/1.1 404 Not Found");
    let held = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP}:80"),
        4,
    )
    .expect("client");
    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    for ep in &eps {
        let line = format!(
            "balancer_endpoint_connections_active{{service=\"{SVC}\",endpoint=\"{ep}:8080\"}} 2"
        );
        assert!(body.contains(&line), "missing {line}:\n{body}");
    }
    for needle in [
        "# TYPE balancer_endpoint_connections_total counter",
        "balancer_selections_total{layer=\"kernel\",algorithm=\"least-conn\"} 4",
        "balancer_sync_total{source=\"file\",result=\"applied\"} 1",
        "balancer_map_entries{map=\"SERVICES\"} 1",
        "balancer_connects_refused_total 0",
    ] {
        assert!(body.contains(needle), "missing {needle}:\n{body}");
    }
    held.close().expect("close");
    // A bad reload shows up as a sync error.
    let status = agent.reload("services: [\n").expect("reload");
    assert_eq!(status["last_reload"]["ok"], false);
    let (_, body) = http_get(&addr, "/metrics");
    assert!(body.contains("balancer_sync_errors_total 1"), "{body}");
    assert!(body.contains("balancer_sync_last_ok 0"), "{body}");
}

/// The router's `/readyz` means something: ready while it serves its
/// newest table and its listener accepts; on SIGTERM it drains (its
/// listener shut, a new router takes new connections) and says so at
/// once, while `/healthz` stays 200 until it exits.
#[test]
fn the_routers_readiness_is_serving_then_draining() {
    let t = Topology::new("rtready", 2, &[8080]).expect("topology");
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    // The router's metrics on the node's address, in the node namespace.
    let metrics = "198.18.0.1:19465";
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &endpoints_yaml(SVC, &[VIP], 80, 8080, "least-conn", &eps),
        Some(&t.node.name),
        &[
            "--proxy-addr",
            balancer_tests::topology::ROUTER_ADDR,
            "--router-metrics-addr",
            metrics,
            "--drain-timeout",
            "5s",
        ],
    )
    .expect("agent");
    let get = |path: &str| -> (String, String) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &t.node.name,
                "curl",
                "-s",
                "-w",
                "\n%{http_code}",
            ])
            .arg(format!("http://{metrics}{path}"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_owned(), body.to_owned())
    };
    assert_eq!(get("/readyz"), ("200".into(), "ready\n".into()));
    assert_eq!(get("/healthz").0, "200");
    let pid = agent.router_pid().expect("router pid");
    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let mut seen = (String::new(), String::new());
    Topology::wait_for(
        "the router to say it drains",
        Duration::from_secs(2),
        || {
            seen = get("/readyz");
            Ok(seen.0 == "503")
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {seen:?}"));
    assert!(seen.1.contains("draining"), "{seen:?}");
    assert_eq!(get("/healthz").0, "200", "alive while it drains");
}
