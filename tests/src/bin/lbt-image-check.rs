//! `cargo xtask image --check`: the agent and the router from the image,
//! run as the DaemonSet runs them: the manifest's arguments, its
//! securityContext (capabilities, read-only root, no privilege escalation,
//! user 0, the seccomp profile) and its mounts (the cgroup v2 root, bpffs,
//! a shared /run/balancer, the host's netns directory), in the host network
//! of a node of network namespaces. Then a client namespace is balanced
//! through them: L4 connections and HTTP/2 streams; and a client namespace
//! made after the router started is found by the router (through the
//! mount's propagation) and its HTTP/2 streams reach the pods from its own
//! address, not the node's. And the runtime's default seccomp profile is
//! shown to stop the agent, which is why the manifest names one; and the
//! router without SYS_ADMIN is shown to refuse to start, naming it.
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
    peers::{EchoClient, H2_PORT, H2Hold, h2_client, hold_connections},
    topology::Topology,
};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, PodSpec, Volume},
};

const NODE_IP: &str = "198.18.0.1";
const TCP_VIP: &str = "198.19.0.10";
const H2_VIP: &str = "198.19.0.20";
/// The client namespace made after the router started.
const LATE_V4: &str = "198.18.202.1";
const LATE_V6: &str = "fd00:18::ca:1";

fn daemonset() -> anyhow::Result<PodSpec> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/daemonset.yaml");
    let ds: DaemonSet = serde_saphyr::from_str(&std::fs::read_to_string(path)?)?;
    ds.spec.context("spec")?.template.spec.context("pod spec")
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

/// `podman run -v` flags for `c`'s volumeMounts: each of the pod's volumes
/// at its path on this node (`host`), with the mount's read-only flag and
/// propagation (HostToContainer is rslave, Bidirectional rshared).
fn mounts(
    c: &Container,
    volumes: &[Volume],
    host: impl Fn(&Volume) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<Vec<String>> {
    let mut f = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        anyhow::ensure!(
            m.sub_path.is_none() && m.sub_path_expr.is_none(),
            "{}: subPath",
            m.name
        );
        let v = volumes
            .iter()
            .find(|v| v.name == m.name)
            .with_context(|| format!("{}: no volume {}", c.name, m.name))?;
        let mut opts = Vec::new();
        if m.read_only == Some(true) {
            opts.push("ro");
        }
        match m.mount_propagation.as_deref() {
            None | Some("None") => {}
            Some("HostToContainer") => opts.push("rslave"),
            Some("Bidirectional") => opts.push("rshared"),
            Some(p) => bail!("{}: mountPropagation {p}", m.name),
        }
        let mut flag = format!("-v={}:{}", host(v)?.display(), m.mount_path);
        if !opts.is_empty() {
            flag += &format!(":{}", opts.join(","));
        }
        f.push(flag);
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
    /// Whether it exited within `timeout`.
    fn exits_within(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
    fn exit_code(&self) -> anyhow::Result<i64> {
        let (code, _) = podman(&["inspect", "-f", "{{.State.ExitCode}}", &self.name])?;
        Ok(code.trim().parse()?)
    }
    /// SIGTERM (podman stop), and the exit code.
    fn stop(&self) -> anyhow::Result<i64> {
        podman(&["stop", "-t", "20", &self.name])?;
        self.exit_code()
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
    volumes: &'a [Volume],
}

impl Run<'_> {
    /// Where each of the DaemonSet's volumes is on this node.
    fn host(&self, v: &Volume) -> anyhow::Result<PathBuf> {
        if v.empty_dir.is_some() && v.name == "run" {
            return Ok(self.run_dir.to_owned());
        }
        let hp = v.host_path.as_ref().with_context(|| {
            format!(
                "volume {}: neither hostPath nor the sockets' emptyDir",
                v.name
            )
        })?;
        Ok(match hp.path.as_str() {
            // The cgroup v2 root, wherever this host mounts it.
            "/sys/fs/cgroup" => cgroup2_root(),
            "/sys/fs/bpf" => PathBuf::from("/sys/fs/bpf"),
            // The runtime's namespace files: here `ip netns`'s, where the
            // test's namespaces are (/var/run is /run on this host, as on
            // most); a shared mount, as the runtime's directory is.
            "/var/run/netns" => PathBuf::from("/run/netns"),
            p => bail!("volume {}: no place on this node for hostPath {p}", v.name),
        })
    }

    /// `podman run` arguments for container `c` as the DaemonSet runs it;
    /// with `command`, that command line instead of the manifest's args,
    /// run in the foreground and removed after.
    fn run_args(
        &self,
        c: &Container,
        name: &str,
        seccomp: Option<&Path>,
        command: Option<&[&str]>,
    ) -> anyhow::Result<Vec<String>> {
        let mut a: Vec<String> = vec![
            "run".into(),
            if command.is_some() { "--rm" } else { "-d" }.into(),
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
        ];
        // The DaemonSet's volumes, mounted as the manifest mounts them.
        a.extend(mounts(c, self.volumes, |v| self.host(v))?);
        if c.name == "agent" {
            // No apiserver here: the endpoints file stands for it.
            a.push(format!("-v={}:/etc/balancer:ro", self.etc_dir.display()));
        }
        a.extend(security(c, seccomp)?);
        a.push(self.image.into());
        match command {
            Some(cmd) => a.extend(cmd.iter().map(|s| (*s).to_owned())),
            None => {
                a.extend(args(c, self.cgroup_in, self.bpffs));
                if c.name == "agent" {
                    a.push("--endpoints-file=/etc/balancer/endpoints.yaml".into());
                }
            }
        }
        Ok(a)
    }

    fn start(&self, c: &Container, name: &str, seccomp: Option<&Path>) -> anyhow::Result<Podman> {
        let a = self.run_args(c, name, seccomp, None)?;
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        podman(&refs)?;
        Ok(Podman { name: name.into() })
    }

    /// `balancer-agent check --preflight -o json` in container `c`'s
    /// settings: its report and its exit code.
    fn preflight(
        &self,
        c: &Container,
        name: &str,
        seccomp: Option<&Path>,
    ) -> anyhow::Result<(serde_json::Value, Option<i32>)> {
        let cgroup = format!("--cgroup={}", self.cgroup_in);
        let bpffs = format!("--bpffs={}", self.bpffs);
        let cmd = [
            "check",
            "--preflight",
            "-o",
            "json",
            cgroup.as_str(),
            bpffs.as_str(),
            "--netns-dir=/var/run/netns",
        ];
        let a = self.run_args(c, name, seccomp, Some(&cmd))?;
        let out = Command::new("podman").args(&a).output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "check --preflight in a container: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((v, out.status.code()))
    }
}

/// Container `c` as the DaemonSet has it, less CAP_SYS_ADMIN.
fn without_sys_admin(c: &Container) -> Container {
    let mut c = c.clone();
    if let Some(caps) = c
        .security_context
        .as_mut()
        .and_then(|sc| sc.capabilities.as_mut())
    {
        caps.add
            .get_or_insert_default()
            .retain(|c| c != "SYS_ADMIN" && c != "CAP_SYS_ADMIN");
    }
    c
}

/// The level and detail of item `name` of a `check` report.
fn check_item(v: &serde_json::Value, name: &str) -> (String, String) {
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == name)
        .map(|i| {
            (
                i["level"].as_str().unwrap_or("").to_owned(),
                i["detail"].as_str().unwrap_or("").to_owned(),
            )
        })
        .unwrap_or_default()
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

/// The router's own answer to `router-status` on its admin socket.
fn router_status(socket: &Path) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"{\"command\":\"router-status\"}\n")?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).context("router-status answer")?;
    anyhow::ensure!(v["ok"] == true, "router-status: {v}");
    Ok(v["data"].clone())
}

/// The peers of the established connections to the gRPC port in pod
/// namespace `ns` (`ss`), addresses without their ports (IPv4 unmapped).
fn peers_of_pod(ns: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Htn", "state", "established"])
        .arg(format!("( sport = :{H2_PORT} )"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|peer| peer.rsplit_once(':'))
        .map(|(a, _)| {
            // A dual-stack listener shows IPv4 peers as [::ffff:a.b.c.d].
            let a = a.trim_start_matches('[').trim_end_matches(']');
            a.strip_prefix("::ffff:").unwrap_or(a).to_owned()
        })
        .collect())
}

fn main() -> anyhow::Result<()> {
    let image = std::env::var("LBT_IMAGE").context("LBT_IMAGE")?;
    let seccomp = PathBuf::from(std::env::var("LBT_SECCOMP").context("LBT_SECCOMP")?);
    let pod = daemonset()?;
    let (containers, volumes) = (pod.containers, pod.volumes.unwrap_or_default());
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
    std::fs::write(etc_dir.join("endpoints.yaml"), &yaml)?;
    let rel = t.cgroup.path.strip_prefix(cgroup2_root())?;
    let cgroup_in = format!("/host/sys/fs/cgroup/{}", rel.display());
    let run = Run {
        image: &image,
        node_ns: &t.node.name,
        run_dir: &run_dir,
        etc_dir: &etc_dir,
        cgroup_in: &cgroup_in,
        bpffs: &pins.path,
        volumes: &volumes,
    };
    let admin = run_dir.join("admin.sock");
    let router_sock = run_dir.join("router.sock");

    // 1. The runtime's default seccomp profile stops the agent. It lets
    // bpf(2) through only with CAP_SYS_ADMIN, which the DaemonSet gives
    // the agent (setns, to end a removed endpoint's connections in client
    // namespaces; the shipped profile narrows it to that): so this is the
    // agent as run without it.
    println!("1. agent with the runtime's default seccomp profile, without SYS_ADMIN");
    let plain = without_sys_admin(&agent_c);
    let (report, code) = run.preflight(&plain, &format!("{}-check-default", t.prefix), None)?;
    let (level, detail) = check_item(&report, "seccomp");
    anyhow::ensure!(
        code == Some(1) && level == "fail" && detail.contains("seccomp"),
        "check --preflight under the default profile was expected to fail on seccomp: {report}"
    );
    println!("   check --preflight: fail seccomp: {detail}");
    let (report, code) = run.preflight(
        &agent_c,
        &format!("{}-check-shipped", t.prefix),
        Some(&seccomp),
    )?;
    for item in [
        "seccomp",
        "capabilities",
        "capabilities (namespaces)",
        "netns",
        "bpffs",
        "cgroup",
    ] {
        let (level, detail) = check_item(&report, item);
        anyhow::ensure!(
            level == "ok",
            "check --preflight with the shipped profile: {item} is {level}: {detail}: {report}"
        );
    }
    anyhow::ensure!(
        code == Some(0),
        "check --preflight exited {code:?}: {report}"
    );
    println!("   check --preflight with the DaemonSet's settings: every item ok");
    let c = run.start(&plain, &format!("{}-default", t.prefix), None)?;
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

    // 1b. The router without SYS_ADMIN (and so without setns) refuses to
    // start with --source-identity pod, and says what it lacks.
    println!("   router without SYS_ADMIN");
    let weak = without_sys_admin(&router_c);
    let c = run.start(&weak, &format!("{}-nosysadmin", t.prefix), Some(&seccomp))?;
    let exited = c.exits_within(Duration::from_secs(10));
    let logs = c.logs();
    anyhow::ensure!(
        exited && c.exit_code()? != 0 && logs.contains("CAP_SYS_ADMIN"),
        "the router without SYS_ADMIN was expected to exit naming CAP_SYS_ADMIN: {logs}"
    );
    println!(
        "   refused, as expected: {}",
        logs.lines()
            .rfind(|l| l.contains("CAP_SYS_ADMIN"))
            .unwrap_or("")
            .trim()
    );
    drop(c);
    let _ = std::fs::remove_file(&router_sock);

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

    // Both containers' SYS_ADMIN is for setns into network namespaces
    // alone (the router's for client identity, the agent's to end removed
    // endpoints' connections): the profile refuses what else it would
    // allow (remounting read-only mounts writable, renaming the node, new
    // namespaces). Tried with the image's own tools, if it has them (this
    // check's Debian runtime base does; distroless does not).
    for (who, cmd) in [
        &["mount", "-o", "remount,rw", "/host/sys/fs/cgroup"][..],
        &["mount", "-t", "tmpfs", "none", "/tmp"],
        &["hostname", "lbt-renamed"],
        &["nsenter", "--uts=/proc/1/ns/uts", "true"],
        &["unshare", "--mount", "true"],
    ]
    .iter()
    .flat_map(|cmd| [(&router, *cmd), (&agent, *cmd)])
    {
        let mut a = vec!["exec", who.name.as_str()];
        a.extend_from_slice(cmd);
        let who = if std::ptr::eq(who, &router) {
            "router"
        } else {
            "agent"
        };
        match podman(&a) {
            Ok(_) => bail!("the {who} container could run {cmd:?}"),
            Err(e) if e.to_string().contains("executable file") => {
                println!("   (no {} in the image: not tried)", cmd[0]);
            }
            Err(e) => {
                let e = e.to_string();
                // The tool's own complaint (podman's message ends with it).
                let said = e
                    .lines()
                    .find_map(|l| l.split_once(&format!("{}: ", cmd[0])).map(|(_, m)| m))
                    .unwrap_or(&e);
                println!("   {who}: {} refused: {}", cmd.join(" "), said.trim());
            }
        }
    }

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

    // 4. Client identity: a client namespace made now, after the router
    // started (its file is a new mount in the host's netns directory: it
    // reaches the container only through the mount's propagation), is found
    // and served, and its streams reach the pods from its own address.
    let before = router_status(&router_sock)?;
    anyhow::ensure!(before["source_identity"] == "pod", "{before}");
    let n0 = before["namespaces"].as_u64().context("namespaces")?;
    let found = std::time::Instant::now();
    let late = t.extra_client("late", LATE_V4, LATE_V6)?;
    // (Other tests on this host may add and remove namespaces meanwhile:
    // what proves this one was found is that its streams below are spread
    // by the router, which the kernel steers to only for served ones.)
    Topology::wait_for(
        "the router to find the new namespace",
        Duration::from_secs(10),
        || Ok(router_status(&router_sock)?["namespaces"].as_u64() > Some(n0)),
    )
    .map_err(|e| anyhow::anyhow!("{e}\nrouter: {}", router.logs()))?;
    println!(
        "4. client namespace {} made after the router started: router-status namespaces {n0} -> {} within {:?}",
        late.name,
        router_status(&router_sock)?["namespaces"],
        found.elapsed()
    );
    let v = h2_client(
        &late.name,
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
        "its first connection, routed over every pod: {v}"
    );
    // Streams held open, so their pod connections can be looked at.
    let hold = H2Hold::start(
        &late.name,
        Some(&t.cgroup.path),
        &format!("{H2_VIP}:80"),
        &[
            "--connections",
            "1",
            "--streams",
            "8",
            "--path",
            "/slow?ms=20000",
        ],
    )?;
    anyhow::ensure!(hold.report["connections"] == 1, "{}", hold.report);
    let mut seen: Vec<(String, Vec<String>)> = Vec::new();
    Topology::wait_for(
        "pod connections from the client's namespace",
        Duration::from_secs(10),
        || {
            seen = t
                .pods
                .iter()
                .map(|p| Ok((p.name.clone(), peers_of_pod(&p.ns.name)?)))
                .collect::<anyhow::Result<_>>()?;
            Ok(seen
                .iter()
                .filter(|(_, peers)| peers.iter().any(|a| a == LATE_V4))
                .count()
                >= 2)
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}: {seen:?}"))?;
    // No pod connection carries the node's address: every client here is
    // in a namespace the router serves, so none is opened from its own.
    anyhow::ensure!(
        seen.iter()
            .all(|(_, peers)| peers.iter().all(|a| a != NODE_IP)),
        "a pod connection from the node's address: {seen:?}"
    );
    // What the router reports is what the pods see (all its workers'
    // counts): its pod connections, and at least one pool per client
    // namespace with some. Asked again until both agree, as idle pooled
    // connections may close in between.
    let mut status = serde_json::Value::Null;
    let mut pod_side = (0, 0);
    Topology::wait_for(
        "router-status to count the pod connections the pods see",
        Duration::from_secs(5),
        || {
            status = router_status(&router_sock)?;
            let mut peers = Vec::new();
            for p in &t.pods {
                peers.extend(peers_of_pod(&p.ns.name)?);
            }
            let clients: std::collections::BTreeSet<&String> = peers.iter().collect();
            pod_side = (peers.len() as u64, clients.len() as u64);
            Ok(status["namespace_connections"].as_u64() == Some(pod_side.0)
                && status["backend_connections"].as_u64() == Some(pod_side.0)
                && status["namespace_pools"].as_u64() >= Some(pod_side.1))
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: the pods see {} connections from {} client namespaces; router-status: {status}",
            pod_side.0,
            pod_side.1
        )
    })?;
    hold.close()?;
    println!(
        "   200 HTTP/2 requests on its first connection: {:?}; 8 held streams: pods see {:?}; router: {} namespace pools, {} of their pod connections",
        pods.iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>(),
        seen,
        status["namespace_pools"],
        status["namespace_connections"]
    );
    drop(late);

    // 4b. A removed endpoint's connections end, in the client's own
    // namespace: the agent container enters it (SYS_ADMIN, setns only,
    // through its HostToContainer mount) and asks sock_diag there
    // (NET_ADMIN), under the shipped profile.
    let echo = EchoClient::start(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{TCP_VIP}:80"),
        8,
    )?;
    let before = cli(&admin, &["status"])?["last_reload"]["applied"]
        .as_u64()
        .unwrap_or(0);
    let pod0 = format!("      - address: {}\n", t.pods[0].v4);
    let tmp = etc_dir.join("endpoints.yaml.tmp");
    std::fs::write(&tmp, yaml.replace(&pod0, ""))?;
    std::fs::rename(&tmp, etc_dir.join("endpoints.yaml"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cli(&admin, &["status"])?["last_reload"]["applied"]
        .as_u64()
        .unwrap_or(0)
        <= before
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the agent did not reload"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let report = echo.report()?;
    let ended: Vec<_> = report.iter().filter(|c| c.error.is_some()).collect();
    anyhow::ensure!(
        ended.len() == 2
            && ended
                .iter()
                .all(|c| c.pod == "pod0" && c.error.as_ref().is_some_and(|e| e.0 == "ECONNABORTED")),
        "the removed pod's 2 connections, and only they, were to end with ECONNABORTED: {report:?}"
    );
    let status = cli(&admin, &["status"])?;
    anyhow::ensure!(
        status["removed_connections"]["services"]["default/tcp"]["ended"] == 2
            && status["removed_connections"]["enters_namespaces"] == true,
        "status: {}",
        status["removed_connections"]
    );
    println!(
        "4b. pod0 removed: its 2 connections (from namespace {}) ended with ECONNABORTED, the 6 others kept echoing",
        t.client.name
    );

    // 5. SIGTERM: both exit 0.
    let (r, a) = (router.stop()?, agent.stop()?);
    anyhow::ensure!(r == 0 && a == 0, "exit codes: router {r}, agent {a}");
    println!("5. podman stop: router exited {r}, agent {a}");
    let _ = std::fs::remove_dir_all(&dir);
    println!("image check passed: {image}");
    Ok(())
}
