//! The agent under test as a real process, with its HTTP/2 router process
//! beside it when a test asks for one.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{
    cgroup::{Cgroup, cgroup2_root},
    process::{rss_of, workspace_bin},
    topology::Topology,
};

/// Every `balancer-agent` subcommand, in `--help`'s order.
pub const SUBCOMMANDS: [&str; 8] = [
    "run",
    "router",
    "check",
    "status",
    "services",
    "endpoints",
    "top",
    "cleanup",
];

pub fn agent_bin() -> PathBuf {
    workspace_bin("balancer-agent")
}

/// A bpffs pin directory of one test (`/sys/fs/bpf/<name>`), removed with
/// `balancer-agent cleanup` on drop, also when the test fails: pins outlive
/// the agent by design.
pub struct PinDir {
    pub path: String,
}

impl PinDir {
    pub fn new(name: &str) -> Self {
        Self {
            path: format!("/sys/fs/bpf/{name}"),
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = Command::new(agent_bin())
            .args(["cleanup", "--bpffs", &self.path])
            .output();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Arguments of the router process among a test's agent arguments: each
/// with whether it takes a value. `--proxy-addr` is the router's
/// `--listen`, `--router-metrics-addr` its `--metrics-addr`.
const ROUTER_ARGS: [(&str, bool); 10] = [
    ("--proxy-addr", true),
    ("--splice", false),
    ("--drain-timeout", true),
    ("--stream-idle-timeout", true),
    ("--client-buffer", true),
    ("--router-buffer-limit", true),
    ("--router-metrics-addr", true),
    ("--router-threads", true),
    ("--source-identity", true),
    ("--netns-dir", true),
];

/// The agent as a real process, stopped with SIGTERM on drop; with
/// `--proxy-addr` among its arguments, the HTTP/2 router process beside it
/// (`balancer-agent router`, as the DaemonSet's second container), which
/// reads the data path from the agent's pins: `--pin` is added, with a pin
/// directory of this agent's own, unless the test pins itself.
pub struct Agent {
    child: Option<Child>,
    /// The agent's arguments and environment, to start it again.
    agent_cmd: Vec<std::ffi::OsString>,
    agent_env: Vec<(String, PathBuf)>,
    pub admin_socket: PathBuf,
    pub endpoints_file: PathBuf,
    pub dir: PathBuf,
    pub stderr_log: PathBuf,
    router: Option<Child>,
    /// The router's arguments, to start it again.
    router_cmd: Option<Vec<std::ffi::OsString>>,
    pub router_socket: PathBuf,
    pub router_log: PathBuf,
    /// Where the processes run (netns, cgroup), to start them again.
    netns: Option<String>,
    router_netns: Option<String>,
    agent_cgroup: Option<PathBuf>,
    /// The router's cgroup when the agent's is not given: below the
    /// balanced one, as in the DaemonSet (where the agent attaches to the
    /// root), so sock_ops sees its listener.
    router_cgroup: Option<Cgroup>,
    /// Declared last: removed after both processes stopped.
    _pins: Option<PinDir>,
}

/// A command run in `agent_cgroup` (joined first: same pid) and `netns`.
fn wrapped(agent_cgroup: Option<&Path>, netns: Option<&str>) -> Command {
    let mut cmd = match agent_cgroup {
        Some(cg) => {
            let mut c = Command::new("sh");
            c.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
                .arg(cg);
            c
        }
        None => Command::new("env"),
    };
    match netns {
        Some(ns) => {
            cmd.arg("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .arg(agent_bin());
        }
        None => {
            cmd.arg(agent_bin());
        }
    }
    cmd
}

impl Agent {
    /// Write `endpoints_yaml` to a file and start the agent on `cgroup`.
    pub fn start(prefix: &str, cgroup: &Path, endpoints_yaml: &str) -> anyhow::Result<Self> {
        Self::start_with(prefix, cgroup, endpoints_yaml, None, &[])
    }

    /// The same, run inside network namespace `netns` (without remounting
    /// /sys, so the cgroup path stays visible) and with extra arguments.
    pub fn start_with(
        prefix: &str,
        cgroup: &Path,
        endpoints_yaml: &str,
        netns: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_file(prefix, cgroup, endpoints_yaml, netns, extra, None)
    }

    /// The agent and its router in `t`'s node namespace, with every pod of
    /// `t` behind one least-conn tcp Service `default/web` at `vip`:80
    /// (target port 8080).
    pub fn start_web_with_router(t: &Topology, vip: &str) -> anyhow::Result<Self> {
        let pods: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
        Self::start_with(
            &t.prefix,
            &t.cgroup.path,
            &crate::yaml::endpoints_yaml("default/web", &[vip], 80, 8080, "least-conn", &pods),
            Some(&t.node.name),
            &["--proxy-addr", crate::topology::ROUTER_ADDR],
        )
    }

    /// As [`Agent::start_with`], with the agent process in `agent_cgroup`
    /// (from [`Topology::agent_cgroup`]).
    pub fn start_in_cgroup(
        prefix: &str,
        cgroup: &Path,
        endpoints_yaml: &str,
        netns: Option<&str>,
        extra: &[&str],
        agent_cgroup: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_file(
            prefix,
            cgroup,
            endpoints_yaml,
            netns,
            extra,
            Some(agent_cgroup),
        )
    }

    /// The agent on an endpoints file written from `endpoints_yaml`.
    fn start_file(
        prefix: &str,
        cgroup: &Path,
        endpoints_yaml: &str,
        netns: Option<&str>,
        extra: &[&str],
        agent_cgroup: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(prefix);
        std::fs::create_dir_all(&dir)?;
        let endpoints_file = dir.join("endpoints.yaml");
        std::fs::write(&endpoints_file, endpoints_yaml)?;
        let mut args: Vec<std::ffi::OsString> =
            vec!["--endpoints-file".into(), endpoints_file.clone().into()];
        args.extend(extra.iter().map(Into::into));
        Self::spawn(dir, endpoints_file, cgroup, netns, &args, &[], agent_cgroup)
    }

    /// Start the agent on the Kubernetes source, configured by `kubeconfig`.
    pub fn start_kube(
        prefix: &str,
        cgroup: &Path,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(prefix);
        std::fs::create_dir_all(&dir)?;
        let args: Vec<std::ffi::OsString> = extra.iter().map(Into::into).collect();
        Self::spawn(
            dir.clone(),
            dir.join("no-endpoints-file"),
            cgroup,
            None,
            &args,
            &[("KUBECONFIG", kubeconfig)],
            None,
        )
    }

    fn spawn(
        dir: PathBuf,
        endpoints_file: PathBuf,
        cgroup: &Path,
        netns: Option<&str>,
        args: &[std::ffi::OsString],
        env: &[(&str, &Path)],
        agent_cgroup: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let admin_socket = dir.join("admin.sock");
        let stderr_log = dir.join("agent.log");
        let router_socket = dir.join("router.sock");
        // Split the router's arguments off.
        let mut agent_args: Vec<std::ffi::OsString> = Vec::new();
        let mut router_args: Vec<std::ffi::OsString> = Vec::new();
        let mut router_netns = netns.map(str::to_owned);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--router-netns" {
                // The harness's own: where the router runs when the agent
                // runs elsewhere (the kube source's agent is in the root
                // namespace, to reach the fake apiserver on loopback).
                let ns = it.next().context("--router-netns NS")?;
                router_netns = Some(ns.to_string_lossy().into_owned());
                continue;
            }
            if a == "--router-by-agent" {
                // The agent's own --proxy-addr: it starts the router.
                agent_args.push("--proxy-addr".into());
                agent_args.push(it.next().context("--router-by-agent ADDR")?.clone());
                continue;
            }
            match ROUTER_ARGS.iter().find(|(n, _)| a == n) {
                Some((name, takes_value)) => {
                    router_args.push(match *name {
                        "--proxy-addr" => "--listen".into(),
                        "--router-metrics-addr" => "--metrics-addr".into(),
                        _ => a.clone(),
                    });
                    if *takes_value {
                        router_args.push(it.next().context("a router argument's value")?.clone());
                    }
                }
                None => agent_args.push(a.clone()),
            }
        }
        let mut pins = None;
        let router_cmd = if router_args.iter().any(|a| a == "--listen") {
            if !agent_args.iter().any(|a| a == "--pin") {
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let p = PinDir::new(&format!("lbt-{name}"));
                agent_args.extend(["--pin".into(), "--bpffs".into(), p.path.clone().into()]);
                pins = Some(p);
            }
            let bpffs = agent_args
                .iter()
                .position(|a| a == "--bpffs")
                .and_then(|i| agent_args.get(i + 1))
                .cloned()
                .context("--pin needs --bpffs in tests")?;
            let mut r: Vec<std::ffi::OsString> = vec![
                "router".into(),
                "--cgroup".into(),
                cgroup.into(),
                "--bpffs".into(),
                bpffs,
                "--admin-socket".into(),
                router_socket.clone().into(),
                "--agent-socket".into(),
                admin_socket.clone().into(),
            ];
            r.extend(router_args);
            Some(r)
        } else {
            None
        };
        let mut run: Vec<std::ffi::OsString> = vec![
            "run".into(),
            "--cgroup".into(),
            cgroup.into(),
            "--admin-socket".into(),
            admin_socket.clone().into(),
            "--router-socket".into(),
            router_socket.clone().into(),
        ];
        run.extend(agent_args);
        let router_cgroup = match (&router_cmd, agent_cgroup) {
            (Some(_), None) => {
                let rel = cgroup
                    .strip_prefix(cgroup2_root())
                    .context("the balanced cgroup is below the cgroup v2 root")?;
                // Named after this agent: two agents (an upgrade) share the
                // balanced cgroup.
                let name = format!(
                    "router-{}",
                    dir.file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default()
                );
                Some(Cgroup::new(&rel.join(name).to_string_lossy())?)
            }
            _ => None,
        };
        let mut agent = Self {
            child: None,
            agent_cmd: run,
            agent_env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.to_path_buf()))
                .collect(),
            admin_socket,
            endpoints_file,
            router_log: dir.join("router.log"),
            dir,
            stderr_log,
            router: None,
            router_cmd,
            router_socket,
            netns: netns.map(str::to_owned),
            router_netns,
            agent_cgroup: agent_cgroup.map(Path::to_owned),
            router_cgroup,
            _pins: pins,
        };
        agent.start_agent()?;
        if agent.router_cmd.is_some() {
            agent.start_router()?;
        }
        Ok(agent)
    }

    /// Start the agent process (again: after `kill_agent`, it adopts the
    /// pins), and wait until it answers.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)?;
        let mut cmd = wrapped(self.agent_cgroup.as_deref(), self.netns.as_deref());
        for (k, v) in &self.agent_env {
            cmd.env(k, v);
        }
        let child = logged(cmd.args(&self.agent_cmd), log)
            .spawn()
            .context("spawning balancer-agent")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.cli(&["status", "-o", "json"]).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("agent exited with {status}: {}", self.log());
            }
            if Instant::now() > deadline {
                bail!("agent did not come up: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start the router process (again), and wait until the kernel steers
    /// to it and it serves the agent's table.
    pub fn start_router(&mut self) -> anyhow::Result<()> {
        let args = self
            .router_cmd
            .clone()
            .context("no router for this agent")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.router_log)?;
        let cg = self
            .router_cgroup
            .as_ref()
            .map(|c| c.path.as_path())
            .or(self.agent_cgroup.as_deref());
        let child = logged(wrapped(cg, self.router_netns.as_deref()).args(&args), log)
            .spawn()
            .context("spawning balancer-agent router")?;
        self.router = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.router_synced().unwrap_or(false) {
                return Ok(());
            }
            if let Some(c) = self.router.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("router exited with {status}: {}", self.router_log());
            }
            if Instant::now() > deadline {
                bail!("router did not come up: {}", self.router_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The kernel steers to a router, which serves this agent's table.
    pub fn router_synced(&self) -> anyhow::Result<bool> {
        let s = self.status_json()?;
        let r = &s["router"];
        Ok(r["alive"] == true
            && r["process"]["pid"].as_u64() == self.router_pid().map(u64::from)
            && r["process"]["generation"] == s["generation"])
    }

    pub fn router_log(&self) -> String {
        std::fs::read_to_string(&self.router_log).unwrap_or_default()
    }

    /// The router process's id while it runs.
    pub fn router_pid(&self) -> Option<u32> {
        self.router.as_ref().map(Child::id)
    }

    /// `kill -9` of the router process.
    pub fn kill_router(&mut self) -> anyhow::Result<()> {
        let mut c = self.router.take().context("no router running")?;
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// `kill -9` of the agent (the control plane) only.
    pub fn kill_agent(&mut self) -> anyhow::Result<()> {
        let mut c = self.child.take().context("agent not running")?;
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// The router's resident set size (VmRSS), in bytes.
    pub fn router_rss_bytes(&self) -> anyhow::Result<u64> {
        rss_of(self.router_pid().context("router not running")?)
    }

    /// The router's open file descriptors now (entries of /proc/PID/fd).
    pub fn router_fd_count(&self) -> anyhow::Result<usize> {
        let pid = self.router_pid().context("router not running")?;
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    }

    /// The router's own answer to `router-status`, asked on its admin
    /// socket (fresh, not the agent's copy).
    pub fn router_status(&self) -> anyhow::Result<Value> {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.router_socket)
            .with_context(|| format!("connecting {}", self.router_socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"{\"command\":\"router-status\"}\n")?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line).context("router-status answer")?;
        anyhow::ensure!(v["ok"] == true, "router-status: {v}");
        Ok(v["data"].clone())
    }

    /// One of the kernel's counters (`status -o json`, `counters`); an
    /// error when the agent does not report it.
    pub fn counter(&self, name: &str) -> anyhow::Result<u64> {
        let s = self.status_json()?;
        s["counters"][name]
            .as_u64()
            .with_context(|| format!("no counter {name} in {}", s["counters"]))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Whether the agent process is still running (not exited).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The agent's resident set size (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_of(self.pid().context("agent not running")?)
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Run a CLI command against this agent's admin socket.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(agent_bin())
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn endpoints_json(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.cli(&[
            "endpoints",
            "-o",
            "json",
        ])?)?)
    }

    pub fn status_json(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.cli(&["status", "-o", "json"])?)?)
    }

    /// active_connections per "address:port" of one service.
    pub fn active_by_endpoint(&self, service: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        let v = self.endpoints_json()?;
        let mut out = BTreeMap::new();
        for s in v["services"].as_array().context("services")? {
            if s["name"] != service {
                continue;
            }
            for e in s["endpoints"].as_array().context("endpoints")? {
                out.insert(
                    e["address"].as_str().unwrap_or("").to_string(),
                    e["active_connections"]
                        .as_u64()
                        .context("active_connections")?,
                );
            }
        }
        Ok(out)
    }

    /// Replace the endpoints file and wait until the agent has tried it.
    pub fn reload(&self, yaml: &str) -> anyhow::Result<Value> {
        let before = self.status_json()?["last_reload"]["attempts"]
            .as_u64()
            .unwrap_or(0);
        // Write-then-rename, as editors and ConfigMap updates do.
        let tmp = self.dir.join("endpoints.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.endpoints_file)?;
        let mut status = Value::Null;
        Topology::wait_for("the agent to reload", Duration::from_secs(10), || {
            status = self.status_json()?;
            Ok(status["last_reload"]["attempts"].as_u64().unwrap_or(0) > before)
        })?;
        if self.router.is_some() {
            Topology::wait_for(
                "the router to read the table",
                Duration::from_secs(10),
                || self.router_synced(),
            )?;
        }
        Ok(status)
    }

    /// SIGTERM to the router (it drains) and the agent, and the agent's
    /// exit status; an error if the router did not exit cleanly.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let router = self.router.take();
        if let Some(r) = &router {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(r.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let agent = self.stop_agent();
        if let Some(r) = router {
            let st = wait_exit(r, Duration::from_secs(30), "router")?;
            anyhow::ensure!(
                st.success(),
                "router exited with {st}: {}",
                self.router_log()
            );
        }
        agent
    }

    /// SIGTERM to the agent only, and its exit status.
    pub fn stop_agent(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("agent did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Wait for `child` to exit, at most `limit` (then kill it).
fn wait_exit(
    mut child: Child,
    limit: Duration,
    what: &str,
) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{what} did not exit within {limit:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An agent or router process's output: stderr to its log, at the level
/// `LBT_AGENT_RUST_LOG` asks (`debug` to see more of what it did; default
/// `info`), stdout discarded.
fn logged(cmd: &mut Command, log: std::fs::File) -> &mut Command {
    cmd.env(
        "RUST_LOG",
        std::env::var("LBT_AGENT_RUST_LOG").unwrap_or_else(|_| "info".into()),
    )
    .stdout(Stdio::null())
    .stderr(log)
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
