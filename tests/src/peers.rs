//! Peers run in namespaces: `lbt-peer` servers and clients (TCP), and
//! `lbt-h2` servers and clients (HTTP/2).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::process::workspace_bin;

pub fn peer_bin() -> PathBuf {
    workspace_bin("lbt-peer")
}

/// Every server also listens here: it answers with its name and closes at
/// once (see `lbt-peer serve --sink-port`).
pub const SINK_PORT: u16 = 9090;

/// A server process in a pod namespace.
pub struct Server {
    child: Child,
    /// (active, total) connections as the server counts them.
    pub counts: Arc<Mutex<(u64, u64)>>,
}

impl Server {
    pub fn start(ns: &str, name: &str, ports: &[u16]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(peer_bin());
        cmd.args([
            "serve",
            "--netns",
            ns,
            "--name",
            name,
            "--sink-port",
            &SINK_PORT.to_string(),
        ]);
        for p in ports {
            cmd.args(["--port", &p.to_string()]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning lbt-peer serve")?;
        let stdout = child.stdout.take().context("stdout")?;
        let counts = Arc::new(Mutex::new((0, 0)));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let counts = counts.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line == "listening" {
                        let _ = tx.send(());
                    } else if let Some(rest) = line.strip_prefix("conn ") {
                        let mut it = rest.split(' ').filter_map(|n| n.parse::<u64>().ok());
                        if let (Some(a), Some(t)) = (it.next(), it.next()) {
                            *counts.lock().unwrap_or_else(|p| p.into_inner()) = (a, t);
                        }
                    }
                }
            });
        }
        rx.recv_timeout(Duration::from_secs(10))
            .context("server did not start listening")?;
        Ok(Self { child, counts })
    }

    pub fn active(&self) -> u64 {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).0
    }
    pub fn total(&self) -> u64 {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `lbt-h2 serve` in a pod namespace; records the events it prints.
pub struct H2Server {
    child: Child,
    pub events: Arc<Mutex<Vec<String>>>,
}

impl H2Server {
    pub fn start(ns: &str, name: &str, port: u16) -> anyhow::Result<Self> {
        Self::start_with(ns, name, port, &[])
    }

    /// As [`H2Server::start`], with more `lbt-h2 serve` arguments (e.g.
    /// `--report-peer`, see [`H2Server::accepted_from`]).
    pub fn start_with(ns: &str, name: &str, port: u16, extra: &[&str]) -> anyhow::Result<Self> {
        let port = port.to_string();
        let mut args = vec!["serve", "--netns", ns, "--name", name, "--port", &port];
        args.extend_from_slice(extra);
        Self::spawn(&args)
    }

    /// `lbt-h2 silent`: a TCP listener that accepts and never sends a
    /// byte (no SETTINGS); it prints `conn <n>` per accepted connection.
    pub fn start_silent(ns: &str, port: u16) -> anyhow::Result<Self> {
        Self::spawn(&["silent", "--netns", ns, "--port", &port.to_string()])
    }

    fn spawn(args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(workspace_bin("lbt-h2"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning lbt-h2 serve")?;
        let stdout = child.stdout.take().context("stdout")?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let events = events.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line == "listening" {
                        let _ = tx.send(());
                    } else {
                        events.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                    }
                }
            });
        }
        rx.recv_timeout(Duration::from_secs(10))
            .context("h2 server did not start listening")?;
        Ok(Self { child, events })
    }

    pub fn count(&self, event: &str) -> usize {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| e.as_str() == event)
            .count()
    }

    /// Events that start with `prefix`.
    pub fn count_prefix(&self, prefix: &str) -> usize {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| e.starts_with(prefix))
            .count()
    }

    /// With `--report-peer`: connections accepted so far, by the peer
    /// address the server saw (IPv4 unmapped).
    pub fn accepted_from(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for e in self.events.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some(ip) = e.strip_prefix("accept ") {
                *out.entry(ip.to_owned()).or_default() += 1;
            }
        }
        out
    }

    /// Kill the server process (the pod's backend dies).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for H2Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Port of the `lbt-h2` servers.
pub const H2_PORT: u16 = 50051;

/// Run `lbt-h2 client` (one HTTP/2 connection) and return its summary.
pub fn h2_client(
    ns: &str,
    cgroup: Option<&Path>,
    addr: &str,
    extra: &[&str],
) -> anyhow::Result<Value> {
    h2_tool("client", ns, cgroup, addr, extra)
}

/// Run `lbt-h2 raw` and return what the peer sent back.
pub fn h2_raw(
    ns: &str,
    cgroup: Option<&Path>,
    addr: &str,
    send_hex: &str,
    wait_s: u64,
) -> anyhow::Result<Value> {
    h2_tool(
        "raw",
        ns,
        cgroup,
        addr,
        &["--send", send_hex, "--wait-s", &wait_s.to_string()],
    )
}

/// `lbt-h2 <mode>` connecting to `addr` from namespace `ns` (and
/// `cgroup`), with `extra` arguments.
fn h2_cmd(mode: &str, ns: &str, cgroup: Option<&Path>, addr: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(workspace_bin("lbt-h2"));
    cmd.args([mode, "--netns", ns, "--connect", addr])
        .args(extra);
    if let Some(cg) = cgroup {
        cmd.arg("--cgroup").arg(cg);
    }
    cmd
}

fn h2_tool(
    mode: &str,
    ns: &str,
    cgroup: Option<&Path>,
    addr: &str,
    extra: &[&str],
) -> anyhow::Result<Value> {
    let out = h2_cmd(mode, ns, cgroup, addr, extra)
        .stderr(Stdio::inherit())
        .output()
        .context("running lbt-h2")?;
    anyhow::ensure!(out.status.success(), "lbt-h2 {mode} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or(""))?)
}

/// Start `lbt-h2 client` in the background; `wait` collects its summary.
pub fn h2_client_spawn(
    ns: &str,
    cgroup: Option<&Path>,
    addr: &str,
    extra: &[&str],
) -> anyhow::Result<Child> {
    Ok(h2_cmd("client", ns, cgroup, addr, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?)
}

/// As [`h2_client_wait`], but a client still running after `timeout` is
/// killed and that is an error (a stream that hangs fails the test instead
/// of hanging it).
pub fn h2_client_wait_timeout(mut child: Child, timeout: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("lbt-h2 client did not finish within {timeout:?}: a stream hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    h2_client_wait(child)
}

/// Run `lbt-h2 hostile`: every named case on its own connection; returns
/// `{"results": [...]}`, one observation per case.
pub fn h2_hostile(
    ns: &str,
    cgroup: Option<&Path>,
    addr: &str,
    extra: &[&str],
) -> anyhow::Result<Value> {
    h2_tool("hostile", ns, cgroup, addr, extra)
}

/// `lbt-h2 hold`: many connections whose streams ask for responses that
/// are never read, held until [`H2Hold::close`].
pub struct H2Hold {
    holder: Holder,
    /// The first line it printed: what it opened.
    pub report: Value,
}

impl H2Hold {
    pub fn start(
        ns: &str,
        cgroup: Option<&Path>,
        addr: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = h2_cmd("hold", ns, cgroup, addr, extra);
        let (holder, first) = Holder::spawn(&mut cmd, "lbt-h2 hold")?;
        Ok(Self {
            holder,
            report: serde_json::from_str(&first).context("lbt-h2 hold output")?,
        })
    }

    /// Close every connection and wait for the helper to exit.
    pub fn close(self) -> anyhow::Result<()> {
        self.holder.close()
    }
}

pub fn h2_client_wait(child: Child) -> anyhow::Result<Value> {
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "lbt-h2 client failed");
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or(""))?)
}

/// Result of a client run.
#[derive(Debug, Clone)]
pub struct ClientResult {
    pub pods: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub peers: BTreeMap<String, u64>,
    pub order: Vec<String>,
    pub elapsed_s: f64,
}

impl ClientResult {
    fn parse(v: &Value) -> anyhow::Result<Self> {
        let map = |k: &str| -> BTreeMap<String, u64> {
            v[k].as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Self {
            pods: map("pods"),
            errors: map("errors"),
            peers: map("peers"),
            order: v["order"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            elapsed_s: v["elapsed_s"].as_f64().unwrap_or(0.0),
        })
    }

    pub fn count(&self, pod: &str) -> u64 {
        self.pods.get(pod).copied().unwrap_or(0)
    }
}

/// A client holding its connections open until [`HeldClient::close`].
pub struct HeldClient {
    holder: Holder,
    pub result: ClientResult,
}

impl HeldClient {
    /// Close every connection and wait for the client to exit.
    pub fn close(self) -> anyhow::Result<()> {
        self.holder.close()
    }
}

/// A helper process that holds connections until told `close` on stdin
/// (killed on drop if it was not).
struct Holder {
    what: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Holder {
    /// Spawn it and wait up to 60 s for its first line (its report).
    fn spawn(cmd: &mut Command, what: &'static str) -> anyhow::Result<(Self, String)> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let holder = Self {
            what,
            child,
            stdin,
            lines: rx,
        };
        let first = holder
            .lines
            .recv_timeout(Duration::from_secs(60))
            .with_context(|| format!("{what} printed nothing"))?;
        Ok((holder, first))
    }

    fn close(mut self) -> anyhow::Result<()> {
        if let Some(mut s) = self.stdin.take() {
            writeln!(s, "close")?;
        }
        let what = self.what;
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(20))
            .with_context(|| format!("{what} did not close"))?;
        anyhow::ensure!(line == "closed", "{what} said {line}");
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client_cmd(ns: &str, cgroup: Option<&Path>, addr: &str, count: usize, mode: &str) -> Command {
    let mut cmd = Command::new(peer_bin());
    cmd.args([
        "client",
        "--netns",
        ns,
        "--connect",
        addr,
        "--count",
        &count.to_string(),
        "--mode",
        mode,
    ]);
    if let Some(cg) = cgroup {
        cmd.args(["--cgroup", &cg.display().to_string()]);
    }
    cmd
}

/// Open `count` connections one after another and keep them open.
pub fn hold_connections(
    ns: &str,
    cgroup: Option<&Path>,
    addr: &str,
    count: usize,
) -> anyhow::Result<HeldClient> {
    let (holder, first) = Holder::spawn(
        &mut client_cmd(ns, cgroup, addr, count, "hold"),
        "lbt-peer client",
    )?;
    let result = ClientResult::parse(&serde_json::from_str(&first).context("client output")?)?;
    Ok(HeldClient { holder, result })
}

/// A client whose connections each send a line and read its echo every
/// 100 ms (`lbt-peer client --mode echo`), until [`EchoClient::report`].
pub struct EchoClient {
    holder: Holder,
    pub result: ClientResult,
}

/// What one connection of an [`EchoClient`] saw.
#[derive(Debug, Clone)]
pub struct EchoReport {
    pub pod: String,
    pub echoes: u64,
    /// Its first error (`ECONNABORTED`, ...) and when, in unix ms.
    pub error: Option<(String, u64)>,
}

impl EchoClient {
    /// Open `count` connections one after another and start echoing.
    pub fn start(
        ns: &str,
        cgroup: Option<&Path>,
        addr: &str,
        count: usize,
    ) -> anyhow::Result<Self> {
        let (holder, first) = Holder::spawn(
            &mut client_cmd(ns, cgroup, addr, count, "echo"),
            "lbt-peer client --mode echo",
        )?;
        let result = ClientResult::parse(&serde_json::from_str(&first).context("client output")?)?;
        Ok(Self { holder, result })
    }

    /// Each connection's echoes and first error so far (the client then
    /// exits).
    pub fn report(mut self) -> anyhow::Result<Vec<EchoReport>> {
        if let Some(mut s) = self.holder.stdin.take() {
            writeln!(s, "report")?;
        }
        let line = self
            .holder
            .lines
            .recv_timeout(Duration::from_secs(20))
            .context("the echo client did not report")?;
        let v: Value = serde_json::from_str(&line).context("echo report")?;
        Ok(v.as_array()
            .context("echo report")?
            .iter()
            .map(|c| EchoReport {
                pod: c["pod"].as_str().unwrap_or_default().to_owned(),
                echoes: c["echoes"].as_u64().unwrap_or(0),
                error: c["error"]
                    .as_str()
                    .map(|e| (e.to_owned(), c["error_at_ms"].as_u64().unwrap_or(0))),
            })
            .collect())
    }
}

/// Open and close `count` connections one after another.
pub fn short_connections(
    ns: &str,
    cgroup: Option<&Path>,
    addr: &str,
    count: usize,
) -> anyhow::Result<ClientResult> {
    run_client(ns, cgroup, addr, count, "short")
}

/// Open `count` connections one after another to a sink port, each closed
/// by the server first.
pub fn rate_connections(
    ns: &str,
    cgroup: Option<&Path>,
    addr: &str,
    count: usize,
) -> anyhow::Result<ClientResult> {
    run_client(ns, cgroup, addr, count, "rate")
}

fn run_client(
    ns: &str,
    cgroup: Option<&Path>,
    addr: &str,
    count: usize,
    mode: &str,
) -> anyhow::Result<ClientResult> {
    let out = client_cmd(ns, cgroup, addr, count, mode)
        .stderr(Stdio::inherit())
        .output()
        .context("running lbt-peer client")?;
    anyhow::ensure!(out.status.success(), "client failed");
    let text = String::from_utf8_lossy(&out.stdout);
    ClientResult::parse(&serde_json::from_str(text.lines().next().unwrap_or(""))?)
}
