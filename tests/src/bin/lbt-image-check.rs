//! `cargo xtask image --check`: the agent and the router from the image,
//! run as the DaemonSet runs them: the manifest's arguments, its
//! securityContext (capabilities, read-only root, no privilege escalation,
//! user 0, the seccomp profile) and its mounts (the cgroup v2 root, bpffs,
//! a shared /run/balancer), in the host network of a node of network
//! namespaces. Then a client namespace is balanced through them: L4
//! connections and HTTP/2 streams. And the runtime's default seccomp
//! profile is shown to stop the agent, which is why the manifest names one.
//!
//! Env: LBT_IMAGE (the image), LBT_SECCOMP (the profile file),
//! CONTAINERS_CONF (from xtask).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use balancer_tests::{
    agent::{PinDir, agent_bin},
    cgroup::cgroup2_root,
    peers::{H2_PORT, h2_client, hold_connections},
    topology::Topology,
};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};

const NODE_IP: &str = "198.18.0.1";
const TCP_VIP: &str = "198.19.0.10";
const H2_VIP: &str = "198.19.0.20";

fn daemonset() -> anyhow::Result<Vec<Container>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/daemonset.yaml");
    let ds: DaemonSet = serde_saphyr::from_str(&std::fs::read_to_string(path)?)?;
    Ok(ds
        .spec
        .context("spec")?
        .template
        .spec
        .context("pod spec")?
        .containers)
}

/// `podman run` flags for `c`'s securityContext.
fn security(c: &Container, seccomp: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let sc = c.security_context.as_ref().context("securityContext")?;
    let mut f = vec!["--cap-drop=all".to_owned()];
    let caps = sc.capabilities.as_ref().context("capabilities")?;
    anyhow::ensure!(caps.drop.as_deref() == Some(&["ALL".to_owned()][..]));
    for cap in caps.add.iter().flatten() {
        f.push(format!("--cap-add={cap}"));
    }
    if sc.read_only_root_filesystem == Some(true) {
        f.push("--read-only".into());
    }
    if sc.allow_privilege_escalation == Some(false) {
        f.push("--security-opt=no-new-privileges".into());
    }
    anyhow::ensure!(sc.privileged != Some(true), "{} is privileged", c.name);
    f.push(format!("--user={}", sc.run_as_user.unwrap_or(0)));
    let profile = sc.seccomp_profile.as_ref().context("seccompProfile")?;
    anyhow::ensure!(
        profile.type_ == "Localhost",
        "{}: {}",
        c.name,
        profile.type_
    );
    if let Some(p) = seccomp {
        f.push(format!("--security-opt=seccomp={}", p.display()));
    }
    Ok(f)
}

/// The manifest's arguments, with this node's values: the balanced cgroup
/// is the test's (not the machine's root), the pins are the test's own.
fn args(c: &Container, cgroup_in: &str, bpffs: &str) -> Vec<String> {
    c.args
        .iter()
        .flatten()
        .map(|a| {
            let a = a
                .replace("$(NODE_IP)", NODE_IP)
                .replace("$(PROXY_PORT)", "15001")
                .replace("$(DRAIN_TIMEOUT)", "5s");
            if a.starts_with("--cgroup=") {
                format!("--cgroup={cgroup_in}")
            } else if a.starts_with("--bpffs=") {
                format!("--bpffs={bpffs}")
            } else {
                a
            }
        })
        .collect()
}

struct Podman {
    name: String,
}

impl Podman {
    fn logs(&self) -> String {
        podman(&["logs", &self.name])
            .map(|o| o.1)
            .unwrap_or_default()
    }
    fn running(&self) -> bool {
        podman(&["inspect", "-f", "{{.State.Running}}", &self.name])
            .is_ok_and(|o| o.0.trim() == "true")
    }
    /// SIGTERM (podman stop), and the exit code.
    fn stop(&self) -> anyhow::Result<i64> {
        podman(&["stop", "-t", "20", &self.name])?;
        let (code, _) = podman(&["inspect", "-f", "{{.State.ExitCode}}", &self.name])?;
        Ok(code.trim().parse()?)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", &self.name]);
    }
}

/// podman's stdout and stderr; an error if it failed.
fn podman(args: &[&str]) -> anyhow::Result<(String, String)> {
    let out = Command::new("podman").args(args).output()?;
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    if !out.status.success() {
        bail!("podman {args:?}: {e}");
    }
    Ok((o, e))
}

struct Run<'a> {
    image: &'a str,
    node_ns: &'a str,
    run_dir: &'a Path,
    etc_dir: &'a Path,
    cgroup_in: &'a str,
    bpffs: &'a str,
}

impl Run<'_> {
    fn start(&self, c: &Container, name: &str, seccomp: Option<&Path>) -> anyhow::Result<Podman> {
        let mut a: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            format!("--name={name}"),
            // Within this host's hard limits (podman's defaults exceed them).
            format!(
                "--ulimit=nofile={0}:{0}",
                limit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            ),
            // Measured: runc is refused an nproc above 32768 here.
            format!(
                "--ulimit=nproc={0}:{0}",
                limit(nix::sys::resource::Resource::RLIMIT_NPROC).min(32_768)
            ),
            // hostNetwork: the node's network namespace.
            format!("--network=ns:/run/netns/{}", self.node_ns),
            // The DaemonSet's volumes.
            format!("-v={}:/host/sys/fs/cgroup:ro", cgroup2_root().display()),
            "-v=/sys/fs/bpf:/sys/fs/bpf:rslave".into(),
            format!("-v={}:/run/balancer", self.run_dir.display()),
        ];
        if c.name == "agent" {
            // No apiserver here: the endpoints file stands for it.
            a.push(format!("-v={}:/etc/balancer:ro", self.etc_dir.display()));
        }
        a.extend(security(c, seccomp)?);
        a.push(self.image.into());
        a.extend(args(c, self.cgroup_in, self.bpffs));
        if c.name == "agent" {
            a.push("--endpoints-file=/etc/balancer/endpoints.yaml".into());
        }
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        podman(&refs)?;
        Ok(Podman { name: name.into() })
    }
}

/// The hard limit of `r`.
fn limit(r: nix::sys::resource::Resource) -> u64 {
    nix::sys::resource::getrlimit(r).map_or(4096, |(_, hard)| hard.min(1 << 20))
}

fn cli(socket: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(agent_bin())
        .args(args)
        .arg("--admin-socket")
        .arg(socket)
        .args(["-o", "json"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn main() -> anyhow::Result<()> {
    let image = std::env::var("LBT_IMAGE").context("LBT_IMAGE")?;
    let seccomp = PathBuf::from(std::env::var("LBT_SECCOMP").context("LBT_SECCOMP")?);
    let containers = daemonset()?;
    let find = |n: &str| containers.iter().find(|c| c.name == n).cloned();
    let (agent_c, router_c) = (
        find("agent").context("agent")?,
        find("router").context("router")?,
    );

    let mut t = Topology::new("image", 4, &[8080])?;
    t.start_h2()?;
    let pins = PinDir::new(&format!("lbt-image-{}", std::process::id()));
    let dir = std::env::temp_dir().join(format!("{}-image", t.prefix));
    let (run_dir, etc_dir) = (dir.join("run"), dir.join("etc"));
    std::fs::create_dir_all(&run_dir)?;
    std::fs::create_dir_all(&etc_dir)?;
    let mut yaml = format!(
        "services:\n  - name: default/tcp\n    addresses: [{TCP_VIP}]\n    ports:\n      - port: 80\n        targetPort: 8080\n    endpoints:\n"
    );
    for p in &t.pods {
        yaml += &format!("      - address: {}\n", p.v4);
    }
    yaml += &format!(
        "  - name: default/grpc\n    addresses: [{H2_VIP}]\n    ports:\n      - port: 80\n        targetPort: {H2_PORT}\n        protocol: http2\n    endpoints:\n"
    );
    for p in &t.pods {
        yaml += &format!("      - address: {}\n", p.v4);
    }
    std::fs::write(etc_dir.join("endpoints.yaml"), yaml)?;
    let rel = t.cgroup.path.strip_prefix(cgroup2_root())?;
    let cgroup_in = format!("/host/sys/fs/cgroup/{}", rel.display());
    let run = Run {
        image: &image,
        node_ns: &t.node.name,
        run_dir: &run_dir,
        etc_dir: &etc_dir,
        cgroup_in: &cgroup_in,
        bpffs: &pins.path,
    };
    let admin = run_dir.join("admin.sock");

    // 1. The runtime's default seccomp profile stops the agent.
    println!("1. agent with the runtime's default seccomp profile");
    let c = run.start(&agent_c, &format!("{}-default", t.prefix), None)?;
    let mut ok = false;
    for _ in 0..100 {
        if !c.running() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = c.logs();
    anyhow::ensure!(
        ok && logs.contains("Operation not permitted"),
        "the default profile was expected to stop the agent: {logs}"
    );
    println!(
        "   stopped, as expected: {}",
        logs.lines().last().unwrap_or("").trim()
    );
    drop(c);
    let _ = std::fs::remove_file(&admin);

    // 2. With the shipped profile: both containers start and attach.
    println!("2. agent and router with {}", seccomp.display());
    let agent = run.start(&agent_c, &format!("{}-agent", t.prefix), Some(&seccomp))?;
    let router = run.start(&router_c, &format!("{}-router", t.prefix), Some(&seccomp))?;
    let mut status = serde_json::Value::Null;
    Topology::wait_for("agent and router up", Duration::from_secs(30), || {
        status = match cli(&admin, &["status"]) {
            Ok(s) => s,
            Err(_) => return Ok(false),
        };
        Ok(status["router"]["alive"] == true
            && status["router"]["process"]["generation"] == status["generation"])
    })
    .map_err(|e| anyhow::anyhow!("{e}\nagent: {}\nrouter: {}", agent.logs(), router.logs()))?;
    let programs = status["programs"].as_array().context("programs")?;
    anyhow::ensure!(
        programs.iter().all(|p| p["attached"] == true),
        "not every program attached: {status}"
    );
    println!(
        "   {} programs attached (kernel ids: {}); router {} alive, table generation {}",
        programs.len(),
        programs
            .iter()
            .map(|p| format!("{}={}", p["name"].as_str().unwrap_or(""), p["ids"]))
            .collect::<Vec<_>>()
            .join(" "),
        status["router"]["address"],
        status["generation"]
    );

    // 3. Balanced: L4 connections, and HTTP/2 streams through the router.
    let held = hold_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{TCP_VIP}:80"),
        8,
    )?;
    anyhow::ensure!(held.result.errors.is_empty(), "{:?}", held.result.errors);
    for p in &t.pods {
        anyhow::ensure!(held.result.count(&p.name) == 2, "{:?}", held.result.pods);
    }
    held.close()?;
    println!("3. 8 connections to {TCP_VIP}:80: 2 on each of 4 pods");
    let v = h2_client(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{H2_VIP}:80"),
        &[
            "--path",
            "/unary",
            "--requests",
            "200",
            "--concurrency",
            "8",
        ],
    )?;
    let pods = v["pods"].as_object().context("pods")?;
    anyhow::ensure!(
        pods.len() == 4 && v["errors"].as_object().is_none_or(|e| e.is_empty()),
        "{v}"
    );
    println!(
        "   200 HTTP/2 requests on one connection to {H2_VIP}:80: {:?}",
        pods.iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
    );

    // 4. SIGTERM: both exit 0.
    let (r, a) = (router.stop()?, agent.stop()?);
    anyhow::ensure!(r == 0 && a == 0, "exit codes: router {r}, agent {a}");
    println!("4. podman stop: router exited {r}, agent {a}");
    let _ = std::fs::remove_dir_all(&dir);
    println!("image check passed: {image}");
    Ok(())
}
