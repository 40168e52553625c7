//! Real gRPC peers (Python grpcio, `tests/grpc/peer.py`; grpc-go,
//! `tests/grpc/gopeer`): servers in pod namespaces, and clients on one
//! channel in the client namespace.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context;
use serde_json::Value;

pub const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grpc/peer.py");

/// A process killed on drop.
pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A grpcio server answering with its pod name on `port` in `ns`.
pub fn server(ns: &str, name: &str, port: u16) -> anyhow::Result<Killed> {
    server_mode(ns, name, port, "")
}

/// The same in a `mode` of `peer.py serve` (`broken`, `broken-for=S`,
/// `slow=MS`).
pub fn server_mode(ns: &str, name: &str, port: u16, mode: &str) -> anyhow::Result<Killed> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", PEER, "serve", name])
        .arg(port.to_string())
        .arg(mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("python3 grpc server (cargo xtask setup installs grpcio)")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    anyhow::ensure!(line.trim() == "listening", "grpc server did not start");
    Ok(Killed(child))
}

/// The grpc-go pod, built once per test process with Debian's Go and
/// grpc-go packages (`cargo xtask setup` installs golang-go and
/// golang-google-grpc-dev): GOPATH mode, nothing downloaded.
pub fn gopeer_bin() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let mut dir = exe.parent().ok_or("no exe dir")?.to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            let dir = dir.join("gopeer");
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let bin = dir.join("gopeer");
            // Tests run in parallel processes: each builds its own file and
            // renames it into place.
            let tmp = dir.join(format!("gopeer.{}", std::process::id()));
            let src = concat!(env!("CARGO_MANIFEST_DIR"), "/grpc/gopeer");
            let out = Command::new("go")
                .args(["build", "-o"])
                .arg(&tmp)
                .arg(".")
                .current_dir(src)
                .env("GO111MODULE", "off")
                .env("GOPATH", "/usr/share/gocode")
                .env("GOCACHE", dir.join("cache"))
                .env("GOFLAGS", "")
                .output()
                .map_err(|e| {
                    format!("go build (cargo xtask setup installs golang-go and golang-google-grpc-dev): {e}")
                })?;
            if !out.status.success() {
                return Err(format!(
                    "go build of {src}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            std::fs::rename(&tmp, &bin).map_err(|e| e.to_string())?;
            Ok(bin)
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A grpc-go server in a pod namespace, answering every method with its
/// name, under grpc-go's default keepalive enforcement.
pub struct GoServer {
    _child: Killed,
    too_many_pings: Arc<AtomicU64>,
}

impl GoServer {
    pub fn start(ns: &str, name: &str, port: u16) -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(gopeer_bin()?)
            .arg(name)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("grpc-go server")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let first = lines.next().context("grpc-go server said nothing")??;
        anyhow::ensure!(first == "listening", "grpc-go server: {first}");
        let too_many_pings = Arc::new(AtomicU64::new(0));
        let seen = too_many_pings.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line == "too_many_pings" {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Ok(Self {
            _child: Killed(child),
            too_many_pings,
        })
    }

    /// Connections it ended with GOAWAY ENHANCE_YOUR_CALM `too_many_pings`.
    pub fn too_many_pings(&self) -> u64 {
        self.too_many_pings.load(Ordering::SeqCst)
    }
}

/// The endpoints file of one http2 service, `default/grpc` at `vip_ip`:80,
/// over every pod of `t` on `port`.
pub fn service_yaml(t: &crate::topology::Topology, vip_ip: &str, port: u16) -> String {
    let mut y = format!(
        "services:\n  - name: default/grpc\n    addresses: [{vip_ip}]\n    ports:\n      - name: grpc\n        port: 80\n        targetPort: {port}\n        protocol: http2\n    endpoints:\n"
    );
    for p in &t.pods {
        y += &format!("      - address: {}\n", p.v4);
    }
    y
}

/// A grpcio server in every pod of `t` on `port`, pod `i` in `modes[i]`
/// (`peer.py serve` modes; missing ones serve plainly).
pub fn servers(t: &crate::topology::Topology, port: u16, modes: &[&str]) -> Vec<Killed> {
    t.pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            server_mode(
                &p.ns.name,
                &p.name,
                port,
                modes.get(i).copied().unwrap_or(""),
            )
            .expect("grpc server")
        })
        .collect()
}

/// Four grpcio pods (see [`servers`]) behind the http2 service at
/// `vip_ip`:80 ([`service_yaml`]), and the agent with its router at
/// [`crate::topology::ROUTER_ADDR`] and `extra` arguments.
pub fn setup(
    tag: &str,
    vip_ip: &str,
    port: u16,
    modes: &[&str],
    extra: &[&str],
) -> (crate::topology::Topology, Vec<Killed>, crate::agent::Agent) {
    crate::process::require_root();
    let t = crate::topology::Topology::new(tag, 4, &[]).expect("topology");
    let servers = servers(&t, port, modes);
    let agent = crate::agent::Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &service_yaml(&t, vip_ip, port),
        Some(&t.node.name),
        &[&["--proxy-addr", crate::topology::ROUTER_ADDR][..], extra].concat(),
    )
    .expect("agent");
    (t, servers, agent)
}

/// `peer.py load`: one channel from `ns` (in `cgroup`), `inflight` unary
/// RPCs at all times for `seconds`.
pub struct Load {
    child: Killed,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Load {
    /// Start it, and return once the channel is ready and the clock runs.
    pub fn start(
        ns: &str,
        cgroup: &Path,
        addr: &str,
        seconds: f64,
        inflight: usize,
    ) -> anyhow::Result<Self> {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {ns} python3 {PEER} load {addr} {seconds} {inflight}",
            cgroup.display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("grpc load client")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        anyhow::ensure!(
            line.trim() == "started",
            "grpc load did not start: {line:?}"
        );
        Ok(Self {
            child: Killed(child),
            stdout,
        })
    }

    /// Its report, once it ends.
    pub fn wait(mut self) -> anyhow::Result<LoadReport> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let status = self.child.0.wait()?;
        anyhow::ensure!(status.success(), "grpc load client failed: {status}");
        LoadReport::parse(&serde_json::from_str(&line)?)
    }
}

/// What `peer.py load` saw: per 100 ms, the RPCs each pod answered.
#[derive(Debug)]
pub struct LoadReport {
    /// (bucket start in ms, pod -> RPCs, failed RPCs)
    pub buckets: Vec<(u64, std::collections::BTreeMap<String, u64>, u64)>,
    /// (ms since start, status code) of every failed RPC.
    pub failures: Vec<(u64, String)>,
    pub ok: u64,
    pub raw: Value,
}

impl LoadReport {
    fn parse(v: &Value) -> anyhow::Result<Self> {
        let mut buckets = Vec::new();
        for (k, row) in v["buckets"].as_object().context("buckets")? {
            let mut pods = std::collections::BTreeMap::new();
            let mut failed = 0;
            for (pod, n) in row.as_object().context("bucket")? {
                let n = n.as_u64().unwrap_or(0);
                if pod == "failed" {
                    failed = n;
                } else {
                    pods.insert(pod.clone(), n);
                }
            }
            buckets.push((k.parse::<u64>()? * 100, pods, failed));
        }
        buckets.sort_by_key(|b| b.0);
        let failures = v["failures"]
            .as_array()
            .context("failures")?
            .iter()
            .map(|f| {
                (
                    f[0].as_u64().unwrap_or(0),
                    f[1].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        Ok(Self {
            buckets,
            failures,
            ok: v["ok"].as_u64().unwrap_or(0),
            raw: v.clone(),
        })
    }

    /// The pods that answered from `from_ms` on.
    pub fn pods_after(&self, from_ms: u64) -> std::collections::BTreeSet<String> {
        self.buckets
            .iter()
            .filter(|b| b.0 >= from_ms)
            .flat_map(|b| b.1.keys().cloned())
            .collect()
    }

    /// The first bucket from `from_ms` on in which an RPC succeeded.
    pub fn first_ok_after(&self, from_ms: u64) -> Option<u64> {
        self.buckets
            .iter()
            .find(|b| b.0 >= from_ms && !b.1.is_empty())
            .map(|b| b.0)
    }

    /// The first bucket from `from_ms` on in which `pods` pods answered.
    pub fn spread_after(&self, from_ms: u64, pods: usize) -> Option<u64> {
        self.buckets
            .iter()
            .find(|b| b.0 >= from_ms && b.1.len() >= pods)
            .map(|b| b.0)
    }
}
