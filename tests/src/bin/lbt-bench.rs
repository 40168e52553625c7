//! Benchmarks behind `cargo xtask bench`. Every figure is measured in the
//! same run as its baseline and reported as a ratio to it.
//!
//! `lbt-bench l4 OUT_DIR`:
//! - spread: N long-lived connections over 4 pods, kube-proxy's iptables
//!   rules vs the agent's least-conn, many trials each; busiest pod / mean;
//! - connect rate: sequential connect + first byte + close, direct to a pod
//!   vs through connect4 vs through iptables DNAT.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use balancer_tests::{
    agent::Agent,
    cgroup::Cgroup,
    kube_proxy::{install_kube_proxy, kube_proxy_services},
    netns::Netns,
    peers::{SINK_PORT, hold_connections, rate_connections},
    process::sh,
    topology::Topology,
    yaml::endpoints_yaml,
};
use serde_json::json;

const VIP: &str = "198.19.0.10";
const PODS: usize = 4;

fn ratio(c: &BTreeMap<String, u64>) -> f64 {
    let total: u64 = c.values().sum();
    let max = c.values().copied().max().unwrap_or(0);
    if total == 0 {
        0.0
    } else {
        max as f64 / (total as f64 / PODS as f64)
    }
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    json!({
        "trials": v.len(),
        "mean": v.iter().sum::<f64>() / v.len() as f64,
        "p50": pct(0.5), "p95": pct(0.95), "max": pct(1.0), "min": pct(0.0),
    })
}

/// Environment variable `name` parsed, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("l4") => l4(PathBuf::from(args.get(2).context("OUT_DIR")?)),
        Some("http2") => http2(PathBuf::from(args.get(2).context("OUT_DIR")?)),
        Some("kube") => kube(PathBuf::from(args.get(2).context("OUT_DIR")?)),
        _ => bail!("usage: lbt-bench l4|http2|kube OUT_DIR"),
    }
}

fn l4(out: PathBuf) -> anyhow::Result<()> {
    let trials: usize = env_or("LBT_TRIALS", 30);
    let conns: usize = env_or("LBT_CONNS", 64);
    let rate_n: usize = env_or("LBT_RATE_N", 5000);
    let rounds = 3;

    let t = Topology::new("bench", PODS, &[8080])?;
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let agent = Agent::start(
        &t.prefix,
        &t.cgroup.path,
        &format!(
            "{}{}",
            endpoints_yaml("bench/echo", &[VIP], 80, 8080, "least-conn", &eps),
            endpoints_yaml("bench/sink", &[VIP], 90, SINK_PORT, "least-conn", &eps)
                .trim_start_matches("services:\n")
        ),
    )?;
    let kp = t.kube_proxy_client()?;
    let backends: Vec<(String, u16)> = eps.iter().map(|e| (e.clone(), 8080)).collect();
    let sink_backends: Vec<(String, u16)> = eps.iter().map(|e| (e.clone(), SINK_PORT)).collect();
    install_kube_proxy(
        &kp,
        &kube_proxy_services(&[(VIP, 80, &backends), (VIP, 90, &sink_backends)]),
    )?;
    // Baseline namespace: no iptables rules (so no conntrack) and not in
    // the agent's cgroup, the way a pod talks to a pod IP.
    let plain = t.extra_client("plain", "198.18.202.1", "fd00:18::ca:1")?;
    let vip = format!("{VIP}:80");

    // Spread.
    let mut kube = Vec::new();
    let mut ours = Vec::new();
    eprintln!("spread: {trials} trials x {conns} connections, each way");
    for _ in 0..trials {
        let k = hold_connections(&kp.name, None, &vip, conns)?;
        kube.push(ratio(&k.result.pods));
        k.close()?;
        let o = hold_connections(&t.client.name, Some(&t.cgroup.path), &vip, conns)?;
        ours.push(ratio(&o.result.pods));
        o.close()?;
        Topology::wait_for("connections to close", Duration::from_secs(10), || {
            Ok(agent
                .active_by_endpoint("bench/echo")?
                .values()
                .all(|&n| n == 0))
        })?;
    }

    // Connect rate, interleaved rounds so drift hits every mode alike.
    let direct_addr = format!("{}:{SINK_PORT}", eps[0]);
    let sink_vip = format!("{VIP}:90");
    let mut rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    eprintln!("connect rate: {rounds} rounds x {rate_n} sequential connections per mode");
    for _ in 0..rounds {
        let d = rate_connections(&plain.name, None, &direct_addr, rate_n)?;
        let c = rate_connections(&t.client.name, Some(&t.cgroup.path), &sink_vip, rate_n)?;
        let i = rate_connections(&kp.name, None, &sink_vip, rate_n)?;
        for (mode, r) in [("direct", d), ("connect4", c), ("iptables_dnat", i)] {
            anyhow::ensure!(r.errors.is_empty(), "{mode}: {:?}", r.errors);
            rates
                .entry(mode)
                .or_default()
                .push(rate_n as f64 / r.elapsed_s);
        }
    }
    let best = |m: &str| rates[m].iter().copied().fold(0.0, f64::max);
    let direct = best("direct");

    let ks = summary(kube.clone());
    let os = summary(ours.clone());
    let result = json!({
        "benchmark": "l4",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        "pods": PODS,
        "spread": {
            "connections": conns,
            "metric": "busiest pod / mean (1.00 is perfect)",
            "kube_proxy": ks,
            "least_conn": os,
        },
        "connect_rate": {
            "metric": "sequential connect + first byte + server close + close, per second (best of rounds)",
            "connections_per_round": rate_n,
            "rounds": rounds,
            "direct_per_s": direct,
            "connect4_per_s": best("connect4"),
            "iptables_dnat_per_s": best("iptables_dnat"),
            "connect4_vs_direct": best("connect4") / direct,
            "iptables_dnat_vs_direct": best("iptables_dnat") / direct,
            "all_rounds": rates,
        },
    });
    let table = format!(
        "L4 benchmark ({PODS} pods)\n\n\
         spread of {conns} long-lived connections, busiest/mean over {trials} trials\n\
         {:<14} {:>6} {:>6} {:>6} {:>6}\n\
         {:<14} {:>6.2} {:>6.2} {:>6.2} {:>6.2}\n\
         {:<14} {:>6.2} {:>6.2} {:>6.2} {:>6.2}\n\n\
         connect rate (connect, first byte, server FIN, close; sequential), best of {rounds} x {rate_n}\n\
         {:<14} {:>9.0}/s  1.00x\n\
         {:<14} {:>9.0}/s  {:.2}x\n\
         {:<14} {:>9.0}/s  {:.2}x\n",
        "",
        "mean",
        "p50",
        "p95",
        "max",
        "kube-proxy",
        ks["mean"].as_f64().unwrap_or(0.0),
        ks["p50"].as_f64().unwrap_or(0.0),
        ks["p95"].as_f64().unwrap_or(0.0),
        ks["max"].as_f64().unwrap_or(0.0),
        "least-conn",
        os["mean"].as_f64().unwrap_or(0.0),
        os["p50"].as_f64().unwrap_or(0.0),
        os["p95"].as_f64().unwrap_or(0.0),
        os["max"].as_f64().unwrap_or(0.0),
        "direct",
        direct,
        "connect4",
        best("connect4"),
        best("connect4") / direct,
        "iptables DNAT",
        best("iptables_dnat"),
        best("iptables_dnat") / direct,
    );
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("l4.json"),
        serde_json::to_string_pretty(&result)? + "\n",
    )?;
    std::fs::write(out.join("l4.txt"), &table)?;
    print!("{table}");
    println!("\nwritten: {} and l4.txt", out.join("l4.json").display());
    Ok(())
}

/// A child process killed on drop.
struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// `cmd` in namespace `ns`: `ip netns exec` execs in place, so the
/// child's pid is `cmd`'s.
fn spawn_in(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<Proc> {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {cmd} (cargo xtask setup installs it)"))?;
    Ok(Proc(child))
}

fn tx_bytes(ns: &str) -> anyhow::Result<u64> {
    let out = sh("ip", &["-n", ns, "-j", "-s", "link", "show", "dev", "eth0"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["tx"]["bytes"].as_u64().context("tx bytes")
}

fn pod_tx_bytes(t: &Topology) -> anyhow::Result<Vec<u64>> {
    t.pods.iter().map(|p| tx_bytes(&p.ns.name)).collect()
}

/// Clock ticks per second of /proc/PID/stat (USER_HZ).
const USER_HZ: f64 = 100.0;

/// (pid, parent pid, utime + stime in ticks) of every process.
fn all_procs() -> Vec<(u32, u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the ")" ending the command: state (3rd field overall),
            // ppid (4th), ...; utime is the 14th and stime the 15th.
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let num = |i: usize| f.get(i)?.parse::<u64>().ok();
            Some((pid, u32::try_from(num(1)?).ok()?, num(11)? + num(12)?))
        })
        .collect()
}

/// `root` and all its descendants (nghttpx forks its worker).
fn tree_of(procs: &[(u32, u32, u64)], root: u32) -> Vec<u32> {
    let mut tree = vec![root];
    let mut i = 0;
    while let Some(&p) = tree.get(i) {
        tree.extend(procs.iter().filter(|x| x.1 == p).map(|x| x.0));
        i += 1;
    }
    tree
}

/// CPU seconds (user + system) so far of each of `roots` with all its
/// descendants.
fn tree_cpu_s(roots: &[u32]) -> Vec<f64> {
    let procs = all_procs();
    roots
        .iter()
        .map(|&root| {
            let tree = tree_of(&procs, root);
            let ticks: u64 = procs
                .iter()
                .filter(|x| tree.contains(&x.0))
                .map(|x| x.2)
                .sum();
            ticks as f64 / USER_HZ
        })
        .collect()
}

/// `perf stat` counting the proxy's syscalls and context switches while
/// it runs; None where perf cannot (not installed, no tracepoints).
struct PerfCount {
    child: std::process::Child,
    out: PathBuf,
}

/// What [`PerfCount`] counted.
#[derive(Debug, Clone, Copy, Default)]
struct Counted {
    syscalls: f64,
    context_switches: f64,
}

impl PerfCount {
    /// Count every thread of `root`'s process tree, named one by one.
    fn start(root: u32, out: &Path) -> Option<Self> {
        let pids: Vec<String> = tree_of(&all_procs(), root)
            .iter()
            .flat_map(|p| {
                std::fs::read_dir(format!("/proc/{p}/task"))
                    .into_iter()
                    .flatten()
            })
            .flatten()
            .filter_map(|t| t.file_name().to_str().map(str::to_owned))
            .collect();
        let child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter,context-switches",
                "-o",
            ])
            .arg(out)
            .args(["-t", &pids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Self {
            child,
            out: out.to_owned(),
        })
    }

    /// Stop (perf prints its counts on SIGINT) and read them.
    fn stop(mut self) -> Option<Counted> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).ok()?;
        let count = |event: &str| {
            text.lines()
                .find(|l| l.split(',').nth(2) == Some(event))
                .and_then(|l| l.split(',').next()?.parse::<f64>().ok())
        };
        Some(Counted {
            syscalls: count("raw_syscalls:sys_enter")?,
            context_switches: count("context-switches")?,
        })
    }
}

fn agent_mem_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// The HTTP/2 service's address, balanced by the agents.
const H2_VIP: &str = "198.19.0.60";
/// h2load's warm-up (`--warm-up-time`), after which the CPU is sampled.
const H2_WARM_UP: Duration = Duration::from_millis(500);

/// One configuration of the HTTP/2 benchmark: where h2load runs, what it
/// loads, and which processes proxy for it.
struct Config<'a> {
    name: &'static str,
    ns: &'a str,
    /// The cgroup h2load joins first (a balanced one), if any.
    cgroup: Option<&'a Path>,
    url: String,
    /// h2load's connections, one thread each.
    conns: usize,
    /// Roots of the process trees doing the proxying, the proxy (router)
    /// first; empty without a proxy.
    pids: Vec<u32>,
}

impl Config<'_> {
    /// The configurations its ratios are to: direct (only at one
    /// connection, the way it is measured) and the TCP relay at its load.
    fn baselines(&self) -> (Option<&'static str>, &'static str) {
        match self.conns {
            1 => (Some("direct"), "tcp_relay"),
            _ => (None, "tcp_relay_c2"),
        }
    }
}

#[derive(Debug, Clone)]
struct H2Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    succeeded: u64,
    failed: u64,
    /// Response bytes per pod.
    pod_bytes: Vec<u64>,
    /// CPU seconds of each of the configuration's process trees, over
    /// `cpu_wall_s` of the measured part of the run.
    cpu_s: Vec<f64>,
    cpu_wall_s: f64,
    /// The proxy's (the router's) syscalls and context switches over the
    /// same time, when perf could count them.
    counted: Option<Counted>,
}

impl H2Run {
    /// Syscalls and context switches of the proxy per request.
    fn per_request(&self, f: fn(&Counted) -> f64) -> Option<f64> {
        self.counted
            .as_ref()
            .map(|c| f(c) / self.cpu_wall_s / self.rps)
    }

    fn cpu_us_per_request(&self) -> Option<f64> {
        (!self.cpu_s.is_empty())
            .then(|| self.cpu_s.iter().sum::<f64>() / self.cpu_wall_s / self.rps * 1e6)
    }

    /// Cores the proxy (the router, without the agent) used.
    fn proxy_cores(&self) -> Option<f64> {
        self.cpu_s.first().map(|s| s / self.cpu_wall_s)
    }
}

/// `finished in 2.50s, 115392.00 req/s, ...`: the req/s.
fn h2load_rps(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|x| x.trim_end_matches(" req/s").parse().ok())
}

/// A count of h2load's `requests:` line (`... 9 succeeded, 0 failed, ...`).
fn h2load_requests(out: &str, name: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix("requests:"))
        .and_then(|l| {
            l.split(", ")
                .find_map(|p| p.trim().strip_suffix(name))
                .and_then(|n| n.split_whitespace().last()?.parse().ok())
        })
        .unwrap_or(0)
}

/// One h2load run of `c` for `secs` seconds after its warm-up, with the
/// CPU of `c`'s processes over the measured part.
fn h2load(t: &Topology, c: &Config, secs: u64, log: &Path) -> anyhow::Result<H2Run> {
    let before = pod_tx_bytes(t)?;
    let h2 = format!(
        "exec ip netns exec {} h2load -D {secs} --warm-up-time {}ms -c {n} -t {n} -m 32 --log-file={} {}",
        c.ns,
        H2_WARM_UP.as_millis(),
        log.display(),
        c.url,
        n = c.conns,
    );
    let script = match c.cgroup {
        Some(cg) => format!("echo $$ > {}/cgroup.procs && {h2}", cg.display()),
        None => h2,
    };
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting h2load")?;
    std::thread::sleep(H2_WARM_UP);
    let perf = c
        .pids
        .first()
        .and_then(|&p| PerfCount::start(p, &log.with_extension("perf")));
    let (cpu0, start) = (tree_cpu_s(&c.pids), Instant::now());
    let out = child.wait_with_output()?;
    let cpu_wall_s = start.elapsed().as_secs_f64();
    let counted = perf.and_then(PerfCount::stop);
    let cpu_s = tree_cpu_s(&c.pids)
        .iter()
        .zip(&cpu0)
        .map(|(a, b)| a - b)
        .collect();
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "h2load ({}) failed: {text}{}",
        c.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let pod_bytes = pod_tx_bytes(t)?
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let mut lat: Vec<f64> = std::fs::read_to_string(log)?
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .collect();
    lat.sort_by(f64::total_cmp);
    Ok(H2Run {
        rps: h2load_rps(&text).with_context(|| format!("h2load output: {text}"))?,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        succeeded: h2load_requests(&text, "succeeded"),
        failed: h2load_requests(&text, "failed") + h2load_requests(&text, "errored"),
        pod_bytes,
        cpu_s,
        cpu_wall_s,
        counted,
    })
}

/// A configuration over its rounds: medians of each figure.
#[derive(Debug, serde::Serialize)]
struct H2Summary {
    rps: f64,
    /// The slowest and fastest round's req/s, % of the median.
    rps_min_pct: f64,
    rps_max_pct: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU of the proxy's processes (router and agent for the balancer).
    cpu_us_per_request: Option<f64>,
    /// Cores the proxy itself (the router) used: CPU seconds per second.
    proxy_cores: Option<f64>,
    /// The proxy's syscalls and context switches per request (perf).
    syscalls_per_request: Option<f64>,
    context_switches_per_request: Option<f64>,
    /// Share of response bytes per pod, over all rounds (sums to 1).
    pod_share: Vec<f64>,
    /// Busiest pod / mean.
    spread: f64,
    /// Over all rounds.
    succeeded: u64,
    failed: u64,
    all_rounds_rps: Vec<f64>,
}

fn summarize(runs: &[H2Run]) -> H2Summary {
    let med = |f: fn(&H2Run) -> f64| median(runs.iter().map(f).collect());
    let med_opt = |f: fn(&H2Run) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let rps = med(|r| r.rps);
    let all_rounds_rps: Vec<f64> = runs.iter().map(|r| r.rps).collect();
    let pct = |x: f64| x / rps * 100.0;
    let mut bytes = [0u64; PODS];
    for r in runs {
        for (b, x) in bytes.iter_mut().zip(&r.pod_bytes) {
            *b += x;
        }
    }
    let total: u64 = bytes.iter().sum();
    let pod_share: Vec<f64> = bytes
        .iter()
        .map(|&b| {
            if total > 0 {
                b as f64 / total as f64
            } else {
                0.0
            }
        })
        .collect();
    H2Summary {
        rps,
        rps_min_pct: pct(all_rounds_rps.iter().copied().fold(f64::MAX, f64::min)),
        rps_max_pct: pct(all_rounds_rps.iter().copied().fold(0.0, f64::max)),
        p50_us: med(|r| r.p50_us),
        p99_us: med(|r| r.p99_us),
        cpu_us_per_request: med_opt(H2Run::cpu_us_per_request),
        proxy_cores: med_opt(H2Run::proxy_cores),
        syscalls_per_request: med_opt(|r| r.per_request(|c| c.syscalls)),
        context_switches_per_request: med_opt(|r| r.per_request(|c| c.context_switches)),
        spread: pod_share.iter().copied().fold(0.0, f64::max) * PODS as f64,
        pod_share,
        succeeded: runs.iter().map(|r| r.succeeded).sum(),
        failed: runs.iter().map(|r| r.failed).sum(),
        all_rounds_rps,
    }
}

/// A configuration's figures as ratios to its baselines (see
/// [`Config::baselines`]), each the median of the ratios within a round.
/// Why per round: this VM's speed drifts by 10% and more from one minute
/// to the next, and a configuration and its baseline run in the same
/// round, seconds apart, so a round's ratio cancels the drift that a
/// ratio of two medians taken over minutes keeps.
#[derive(Debug, serde::Serialize)]
struct H2Ratios {
    rps_vs_direct: Option<f64>,
    p99_vs_direct: Option<f64>,
    rps_vs_relay: f64,
    cpu_vs_relay: Option<f64>,
    /// `rps_vs_relay` of each round.
    rps_vs_relay_rounds: Vec<f64>,
    /// `cpu_vs_relay` of each round.
    cpu_vs_relay_rounds: Vec<f64>,
}

/// `f(me, base)` of each round both ran, and their median.
fn paired(
    me: &[H2Run],
    base: &[H2Run],
    f: impl Fn(&H2Run, &H2Run) -> Option<f64>,
) -> (Option<f64>, Vec<f64>) {
    let v: Vec<f64> = me.iter().zip(base).filter_map(|(a, b)| f(a, b)).collect();
    ((!v.is_empty()).then(|| median(v.clone())), v)
}

fn ratios(runs: &BTreeMap<&str, &[H2Run]>, c: &Config) -> H2Ratios {
    let (direct, relay) = c.baselines();
    let (me, relay) = (runs[c.name], runs[relay]);
    let direct = direct.map(|d| runs[d]);
    let vs_direct =
        |f: fn(&H2Run) -> f64| direct.and_then(|d| paired(me, d, |a, b| Some(f(a) / f(b))).0);
    let (rps_vs_relay, rps_vs_relay_rounds) = paired(me, relay, |a, b| Some(a.rps / b.rps));
    let (cpu_vs_relay, cpu_vs_relay_rounds) = paired(me, relay, |a, b| {
        a.cpu_us_per_request()
            .zip(b.cpu_us_per_request())
            .map(|(a, b)| a / b)
    });
    H2Ratios {
        rps_vs_direct: vs_direct(|r| r.rps),
        p99_vs_direct: vs_direct(|r| r.p99_us),
        rps_vs_relay: rps_vs_relay.unwrap_or(f64::NAN),
        cpu_vs_relay,
        rps_vs_relay_rounds,
        cpu_vs_relay_rounds,
    }
}

/// `v` with `prec` decimals, `-` without a value.
fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

fn table_row(name: &str, s: &H2Summary, r: &H2Ratios) -> String {
    format!(
        "{name:<16} {:>8.0} {:>8} {:>6} {:>7.2} {:>7.0} {:>7.0} {:>6} {:>8} {:>6} {:>5} {:>5} {:>6.2} {:>6}  {}\n",
        s.rps,
        format!("{:.0}-{:.0}", s.rps_min_pct, s.rps_max_pct),
        opt(r.rps_vs_direct, 2),
        r.rps_vs_relay,
        s.p50_us,
        s.p99_us,
        opt(r.p99_vs_direct, 2),
        opt(s.cpu_us_per_request, 2),
        opt(r.cpu_vs_relay, 2),
        opt(s.syscalls_per_request, 2),
        opt(s.context_switches_per_request, 2),
        s.spread,
        s.failed,
        s.pod_share
            .iter()
            .map(|x| format!("{:.0}%", x * 100.0))
            .collect::<Vec<_>>()
            .join("/")
    )
}

/// The default balancer's targets: (what, bound, value, met).
fn targets(s: &H2Summary, r: &H2Ratios) -> Vec<(&'static str, &'static str, String, bool)> {
    let cpu = r.cpu_vs_relay.unwrap_or(f64::NAN);
    let p99 = r.p99_vs_direct.unwrap_or(f64::NAN);
    vec![
        (
            "req/s vs tcp_relay",
            ">= 0.90x",
            format!("{:.2}x", r.rps_vs_relay),
            r.rps_vs_relay >= 0.9,
        ),
        (
            "CPU/request vs tcp_relay",
            "<= 1.50x",
            format!("{cpu:.2}x"),
            cpu <= 1.5,
        ),
        (
            "p99 vs direct",
            "<= 1.50x",
            format!("{p99:.2}x"),
            p99 <= 1.5,
        ),
        (
            "pod spread (busiest/mean)",
            "<= 1.05",
            format!("{:.2}", s.spread),
            s.spread <= 1.05,
        ),
        (
            "failed requests",
            "== 0",
            s.failed.to_string(),
            s.failed == 0,
        ),
    ]
}

/// An agent with its router beside the default one, for the
/// configurations that need their own: its own balanced cgroup with the
/// agent in a child of it (as on a node where the agent attaches to the
/// root cgroup, so sock_ops sees the router's sockets), its own client
/// namespace. Fields drop in order: the agent first.
struct Balancer {
    agent: Agent,
    _agent_cg: Cgroup,
    cg: Cgroup,
    client: Netns,
}

impl Balancer {
    /// Client namespace `tag` at `v4`/`v6`; `args` with the router's
    /// `--proxy-addr`.
    fn start(
        t: &Topology,
        tag: &str,
        (v4, v6): (&str, &str),
        yaml: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let prefix = format!("{}-{tag}", t.prefix);
        let cg = Cgroup::new(&prefix)?;
        let agent_cg = Cgroup::new(&format!("{prefix}/agent"))?;
        let client = t.extra_client(tag, v4, v6)?;
        let agent = Agent::start_in_cgroup(
            &prefix,
            &cg.path,
            yaml,
            Some(&t.node.name),
            args,
            &agent_cg.path,
        )?;
        Ok(Self {
            agent,
            _agent_cg: agent_cg,
            cg,
            client,
        })
    }

    fn config(&self, name: &'static str, conns: usize) -> anyhow::Result<Config<'_>> {
        Ok(Config {
            name,
            ns: &self.client.name,
            cgroup: Some(&self.cg.path),
            url: format!("http://{H2_VIP}:80/index"),
            conns,
            pids: balancer_pids(&self.agent)?,
        })
    }
}

/// The router's pid, then the agent's.
fn balancer_pids(agent: &Agent) -> anyhow::Result<Vec<u32>> {
    Ok(vec![
        agent.router_pid().context("router pid")?,
        agent.pid().context("agent pid")?,
    ])
}

/// haproxy's configuration: the frontend's `bind`, and the backend's
/// `server` lines.
fn haproxy_cfg(mode: &str, bind: &str, servers: &[String]) -> String {
    let mut cfg = format!(
        "global\n  maxconn 4000\ndefaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend fe\n  bind {bind}\n  default_backend be\nbackend be\n  balance roundrobin\n"
    );
    for s in servers {
        cfg += &format!("  server {s}\n");
    }
    cfg
}

/// haproxy on the node with configuration `cfg`, written to `path`.
fn start_haproxy(t: &Topology, path: &Path, cfg: &str) -> anyhow::Result<Proc> {
    std::fs::write(path, cfg)?;
    spawn_in(
        &t.node.name,
        "haproxy",
        &["-f", &path.to_string_lossy(), "-db"],
    )
}

/// One warm-up run of every configuration, then `rounds` rounds each
/// running every configuration once, the first one rotating.
fn run_rounds(
    t: &Topology,
    configs: &[Config],
    rounds: usize,
    secs: u64,
    log: &Path,
) -> anyhow::Result<Vec<Vec<H2Run>>> {
    for c in configs {
        h2load(t, c, 1, log)?;
    }
    let mut runs = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        eprintln!("http2: round {}/{rounds}", round + 1);
        for i in 0..configs.len() {
            let k = (round + i) % configs.len();
            runs[k].push(h2load(t, &configs[k], secs, log)?);
        }
    }
    Ok(runs)
}

/// Client namespaces of the identity rows: one h2load connection each.
const IDENTITY_CLIENTS: usize = 16;

/// One run of the identity rows: `nss.len()` h2load processes at once, each
/// one connection (`-m 32`) from its own client namespace, through the
/// balancer whose cgroup is `cg`.
#[derive(Debug, Clone)]
struct ManyRun {
    rps: f64,
    failed: u64,
    cpu_s: f64,
    cpu_wall_s: f64,
    /// Pod connections the router had open in the middle of the run.
    pod_connections: u64,
}

fn h2load_many(nss: &[Netns], cg: &Path, agent: &Agent, secs: u64) -> anyhow::Result<ManyRun> {
    let pids = balancer_pids(agent)?;
    let mut children = Vec::new();
    for ns in nss {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} h2load -D {secs} --warm-up-time {}ms -c 1 -t 1 -m 32 http://{H2_VIP}:80/index",
            cg.display(),
            ns.name,
            H2_WARM_UP.as_millis(),
        );
        children.push(
            Command::new("sh")
                .args(["-c", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting h2load")?,
        );
    }
    std::thread::sleep(H2_WARM_UP);
    let (cpu0, start) = (tree_cpu_s(&pids), Instant::now());
    std::thread::sleep(Duration::from_millis(secs * 500));
    let pod_connections = agent.status_json()?["router"]["process"]["backend_connections"]
        .as_u64()
        .unwrap_or(0);
    let (mut rps, mut failed) = (0.0, 0);
    for child in children {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(out.status.success(), "h2load failed: {text}");
        rps += h2load_rps(&text).with_context(|| format!("h2load output: {text}"))?;
        failed += h2load_requests(&text, "failed") + h2load_requests(&text, "errored");
    }
    let cpu_wall_s = start.elapsed().as_secs_f64();
    let cpu_s = tree_cpu_s(&pids)
        .iter()
        .zip(&cpu0)
        .map(|(a, b)| a - b)
        .sum();
    Ok(ManyRun {
        rps,
        failed,
        cpu_s,
        cpu_wall_s,
        pod_connections,
    })
}

/// The identity rows: the same 16 client namespaces through a router with
/// `--source-identity pod` (each namespace its own pod connections) and
/// one with `node` (shared pools), interleaved over `rounds`.
fn identity_rows(
    t: &Topology,
    yaml: &str,
    rounds: usize,
    secs: u64,
) -> anyhow::Result<(String, serde_json::Value)> {
    let nss: Vec<Netns> = (0..IDENTITY_CLIENTS)
        .map(|i| {
            t.extra_client(
                &format!("id{i}"),
                &format!("198.18.210.{}", 10 + i),
                &format!("fd00:18::d2:{:x}", 0x10 + i),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let pod = Balancer::start(
        t,
        "idpod",
        ("198.18.206.1", "fd00:18::ce:1"),
        yaml,
        &[
            "--proxy-addr",
            "198.18.0.1:15005",
            "--source-identity",
            "pod",
        ],
    )?;
    let node = Balancer::start(
        t,
        "idnode",
        ("198.18.207.1", "fd00:18::cf:1"),
        yaml,
        &[
            "--proxy-addr",
            "198.18.0.1:15006",
            "--source-identity",
            "node",
        ],
    )?;
    let rows = [("identity_pod_16ns", &pod), ("identity_node_16ns", &node)];
    for (_, b) in &rows {
        h2load_many(&nss, &b.cg.path, &b.agent, 1)?;
    }
    let mut runs: Vec<Vec<ManyRun>> = vec![Vec::new(); rows.len()];
    for round in 0..rounds {
        eprintln!("http2 identity: round {}/{rounds}", round + 1);
        for i in 0..rows.len() {
            let k = (round + i) % rows.len();
            let b = rows[k].1;
            runs[k].push(h2load_many(&nss, &b.cg.path, &b.agent, secs)?);
        }
    }
    let summary = |r: &[ManyRun]| {
        let rps = median(r.iter().map(|x| x.rps).collect());
        let cpu = median(
            r.iter()
                .map(|x| x.cpu_s / x.cpu_wall_s / x.rps * 1e6)
                .collect(),
        );
        let conns = r.iter().map(|x| x.pod_connections).max().unwrap_or(0);
        let failed: u64 = r.iter().map(|x| x.failed).sum();
        (rps, cpu, conns, failed)
    };
    let (p, n) = (summary(&runs[0]), summary(&runs[1]));
    let mut table = format!(
        "\nclient identity: {IDENTITY_CLIENTS} client namespaces, one h2load connection each (-m 32), at once, median of {rounds} rounds\n\
         {:<20} {:>8} {:>8} {:>8} {:>10} {:>6}\n",
        "config", "req/s", "cpu us", "cpu x", "pod conns", "failed"
    );
    for (name, (rps, cpu, conns, failed)) in [(rows[0].0, p), (rows[1].0, n)] {
        table += &format!(
            "{name:<20} {rps:>8.0} {cpu:>8.2} {:>8.2} {conns:>10} {failed:>6}\n",
            cpu / n.1
        );
    }
    let json = json!({
        "clients": IDENTITY_CLIENTS,
        "pod": {"rps": p.0, "cpu_us_per_request": p.1, "pod_connections": p.2, "failed": p.3},
        "node": {"rps": n.0, "cpu_us_per_request": n.1, "pod_connections": n.2, "failed": n.3},
        "cpu_per_request_pod_over_node": p.1 / n.1,
        "rps_pod_over_node": p.0 / n.0,
    });
    Ok((table, json))
}

fn http2(out: PathBuf) -> anyhow::Result<()> {
    let secs: u64 = env_or("LBT_H2_SECS", 3);
    anyhow::ensure!(secs >= 2, "LBT_H2_SECS must be at least 2");
    let rounds: usize = env_or("LBT_ROUNDS", 5);
    anyhow::ensure!(rounds >= 1, "LBT_ROUNDS must be at least 1");
    let t = Topology::new("h2bench", PODS, &[])?;
    let dir = std::env::temp_dir().join(format!("{}-files", t.prefix));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("index"), vec![b'x'; 256])?;
    let docroot = dir.display().to_string();
    let mut procs = Vec::new();
    for p in &t.pods {
        procs.push(spawn_in(
            &p.ns.name,
            "nghttpd",
            &["--no-tls", "-d", &docroot, "8080"],
        )?);
    }
    let eps: Vec<String> = t.pods.iter().map(|p| p.v4.to_string()).collect();
    let mut yaml = format!(
        "services:\n  - name: bench/h2\n    addresses: [{H2_VIP}]\n    ports:\n      - port: 80\n        targetPort: 8080\n        protocol: http2\n    endpoints:\n",
    );
    for e in &eps {
        yaml += &format!("      - address: {e}\n");
    }
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &yaml,
        Some(&t.node.name),
        &["--proxy-addr", balancer_tests::topology::ROUTER_ADDR],
    )?;
    // The splice experiment (`run --splice`) and the router's threads,
    // each with an agent and router of its own.
    let splice = Balancer::start(
        &t,
        "splice",
        ("198.18.203.1", "fd00:18::cb:1"),
        &yaml,
        &["--proxy-addr", "198.18.0.1:15002", "--splice"],
    )?;
    let t1 = Balancer::start(
        &t,
        "t1",
        ("198.18.204.1", "fd00:18::cc:1"),
        &yaml,
        &["--proxy-addr", "198.18.0.1:15003", "--router-threads", "1"],
    )?;
    let t2 = Balancer::start(
        &t,
        "t2",
        ("198.18.205.1", "fd00:18::cd:1"),
        &yaml,
        &["--proxy-addr", "198.18.0.1:15004", "--router-threads", "2"],
    )?;
    let plain = t.extra_client("plain", "198.18.202.1", "fd00:18::ca:1")?;
    let kp = t.kube_proxy_client()?;
    let backends: Vec<(String, u16)> = eps.iter().map(|e| (e.clone(), 8080)).collect();
    install_kube_proxy(&kp, &kube_proxy_services(&[(H2_VIP, 80, &backends)]))?;

    let h2_servers: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(i, e)| format!("p{i} {e}:8080 proto h2"))
        .collect();
    let haproxy = start_haproxy(
        &t,
        &dir.join("haproxy.cfg"),
        &haproxy_cfg("http", "198.18.0.1:18080 proto h2", &h2_servers),
    )?;
    let relay = start_haproxy(
        &t,
        &dir.join("relay.cfg"),
        &haproxy_cfg("tcp", "198.18.0.1:18082", &[format!("p0 {}:8080", eps[0])]),
    )?;
    let mut nghttpx_args = vec!["--frontend=198.18.0.1,18081;no-tls".to_owned()];
    for e in &eps {
        nghttpx_args.push(format!("--backend={e},8080;;proto=h2"));
    }
    nghttpx_args.push("--log-level=WARN".into());
    let nghttpx_refs: Vec<&str> = nghttpx_args.iter().map(String::as_str).collect();
    let nghttpx = spawn_in(&t.node.name, "nghttpx", &nghttpx_refs)?;
    std::thread::sleep(Duration::from_millis(800));

    let plain_config = |name, url: String, conns, pids: Vec<u32>| Config {
        name,
        ns: &plain.name,
        cgroup: None,
        url,
        conns,
        pids,
    };
    let relay_url = "http://198.18.0.1:18082/index".to_owned();
    let configs = vec![
        plain_config("direct", format!("http://{}:8080/index", eps[0]), 1, vec![]),
        Config {
            name: "kube_proxy",
            ns: &kp.name,
            cgroup: None,
            url: format!("http://{H2_VIP}:80/index"),
            conns: 1,
            pids: vec![],
        },
        plain_config("tcp_relay", relay_url.clone(), 1, vec![relay.pid()]),
        plain_config(
            "haproxy",
            "http://198.18.0.1:18080/index".into(),
            1,
            vec![haproxy.pid()],
        ),
        plain_config(
            "nghttpx",
            "http://198.18.0.1:18081/index".into(),
            1,
            vec![nghttpx.pid()],
        ),
        Config {
            name: "balancer",
            ns: &t.client.name,
            cgroup: Some(&t.cgroup.path),
            url: format!("http://{H2_VIP}:80/index"),
            conns: 1,
            pids: balancer_pids(&agent)?,
        },
        splice.config("balancer_splice", 1)?,
        plain_config("tcp_relay_c2", relay_url, 2, vec![relay.pid()]),
        t1.config("balancer_c2_t1", 2)?,
        t2.config("balancer_c2_t2", 2)?,
    ];
    // LBT_H2_ONLY=a,b: only those configurations, with the baselines and
    // the default balancer that the ratios and targets need (for quick
    // runs while profiling; the committed results run them all).
    let only: Option<Vec<String>> = std::env::var("LBT_H2_ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let keep = |c: &Config| {
        only.as_ref().is_none_or(|o| {
            ["direct", "tcp_relay", "tcp_relay_c2", "balancer"].contains(&c.name)
                || o.iter().any(|n| n == c.name)
        })
    };
    let configs: Vec<Config> = configs.into_iter().filter(keep).collect();
    eprintln!(
        "http2: {rounds} rounds x {} configurations x {secs} s (h2load -D {secs} -m 32)",
        configs.len()
    );
    let runs = run_rounds(&t, &configs, rounds, secs, &dir.join("h2load.log"))?;
    let summaries: BTreeMap<&str, H2Summary> = configs
        .iter()
        .zip(&runs)
        .map(|(c, r)| (c.name, summarize(r)))
        .collect();
    let by_name: BTreeMap<&str, &[H2Run]> = configs
        .iter()
        .zip(&runs)
        .map(|(c, r)| (c.name, r.as_slice()))
        .collect();
    let (identity_table, identity) = identity_rows(&t, &yaml, rounds, secs)?;
    let router_pid = agent.router_pid().context("router pid")?;
    let (rss, hwm) = (
        agent_mem_kib(router_pid, "VmRSS:"),
        agent_mem_kib(router_pid, "VmHWM:"),
    );
    let splice_counters = splice.agent.status_json()?["counters"].clone();

    let mut rows = serde_json::Map::new();
    let mut table = format!(
        "HTTP/2 benchmark: h2load -D {secs} --warm-up-time {}ms -m 32 over {PODS} nghttpd pods, median of {rounds} interleaved rounds\n\
         -c 1 -t 1, ratios to direct and tcp_relay; _c2 rows -c 2 -t 2, ratios to tcp_relay_c2; each ratio the median of the rounds' own ratios.\n\
         rounds: slowest-fastest round, % of the median req/s. cpu: the proxy's processes (router + agent for the balancer), us per request.\n\
         sys, cs: the proxy's (router's) syscalls and context switches per request (perf stat).\n\n\
         {:<16} {:>8} {:>8} {:>6} {:>7} {:>7} {:>7} {:>6} {:>8} {:>6} {:>5} {:>5} {:>6} {:>6}  per-pod share\n",
        H2_WARM_UP.as_millis(),
        "config",
        "req/s",
        "rounds%",
        "xdir",
        "xrelay",
        "p50 us",
        "p99 us",
        "p99 x",
        "cpu us",
        "cpu x",
        "sys",
        "cs",
        "spread",
        "failed",
    );
    for c in &configs {
        let (s, r) = (&summaries[c.name], ratios(&by_name, c));
        table += &table_row(c.name, s, &r);
        let mut row = serde_json::to_value(s)?;
        row.as_object_mut().context("row")?.extend(
            serde_json::to_value(&r)?
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        row["h2load_connections"] = json!(c.conns);
        row["relay_baseline"] = json!(c.baselines().1);
        rows.insert(c.name.to_owned(), row);
    }

    let default = configs
        .iter()
        .find(|c| c.name == "balancer")
        .context("balancer config")?;
    let checks = targets(&summaries["balancer"], &ratios(&by_name, default));
    table += "\ntargets for balancer (default threads, -c 1):\n";
    for (what, bound, value, met) in &checks {
        table += &format!(
            "  {what:<26} {bound:<9} {value:>8}  {}\n",
            if *met { "MET" } else { "MISSED" }
        );
    }
    let mut threads = json!(null);
    if let (Some(c2_t1), Some(c2_t2)) = (
        summaries.get("balancer_c2_t1"),
        summaries.get("balancer_c2_t2"),
    ) {
        let cores = |s: &H2Summary| s.proxy_cores.unwrap_or(f64::NAN);
        table += &format!(
            "\nrouter threads at -c 2 -t 2: req/s t2/t1 {:.2}x; router cores used: t1 {:.2}, t2 {:.2}\n",
            c2_t2.rps / c2_t1.rps,
            cores(c2_t1),
            cores(c2_t2),
        );
        threads = json!({"rps_t2_over_t1": c2_t2.rps / c2_t1.rps,
            "router_cores_t1": c2_t1.proxy_cores, "router_cores_t2": c2_t2.proxy_cores});
    }
    table += &format!(
        "router of balancer after the runs: RSS {rss} KiB (peak {hwm} KiB)\n\
         balancer_splice: client directions spliced: {}, left on TCP: {}\n",
        splice_counters["splice_on"], splice_counters["splice_off"],
    );
    table += &identity_table;
    let result = json!({
        "benchmark": "http2",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        "h2load": format!("-D {secs} --warm-up-time {}ms -c N -t N -m 32", H2_WARM_UP.as_millis()),
        "pods": PODS, "rounds": rounds, "seconds_per_run": secs,
        "configs": rows,
        "targets": {"balancer": checks.iter().map(|(what, bound, value, met)| json!({
            "target": what, "bound": bound, "value": value, "met": met})).collect::<Vec<_>>()},
        "router_threads": threads,
        "identity": identity,
        "router": {"rss_kib": rss, "peak_rss_kib": hwm},
        "splice": {"splice_on": splice_counters["splice_on"],
            "splice_off": splice_counters["splice_off"]},
    });
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("http2.json"),
        serde_json::to_string_pretty(&result)? + "\n",
    )?;
    std::fs::write(out.join("http2.txt"), &table)?;
    print!("{table}");
    drop((procs, haproxy, relay, nghttpx));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Sync of N Services x M endpoints from a fake apiserver: time from the
/// agent's start to all of them programmed, and the agent's memory.
fn kube(out: PathBuf) -> anyhow::Result<()> {
    use balancer_tests::fakeapi::{FakeApi, Kind};
    let services: usize = env_or("LBT_SERVICES", 10_000);
    let per: usize = env_or("LBT_ENDPOINTS", 10);
    let prefix = balancer_tests::netns::unique_prefix("kubebench");
    let cg = Cgroup::new(&prefix)?;
    let dir = std::env::temp_dir().join(format!("{prefix}-api"));
    let api = FakeApi::start(&dir)?;
    eprintln!("kube: creating {services} services x {per} endpoints in the fake apiserver");
    for i in 0..services {
        let vip = format!("198.19.{}.{}", i / 256, i % 256);
        // Shaped like what a real cluster serves: server-side-apply
        // managedFields, kubectl's last-applied annotation, labels, and
        // for every endpoint its pod reference, node and zone.
        let managed = serde_json::json!([{"manager": "kubectl-client-side-apply",
            "operation": "Update", "apiVersion": "v1", "time": "2026-11-01T00:00:00Z",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {".": {},
            "f:kubectl.kubernetes.io/last-applied-configuration": {}}, "f:labels": {".": {}, "f:app": {}}},
            "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {
            ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
            "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}}]);
        api.apply(
            Kind::Service,
            serde_json::json!({"metadata": {"name": format!("svc-{i}"), "namespace": "bench",
                    "uid": format!("00000000-0000-0000-0000-{i:012}"),
                    "labels": {"app": format!("svc-{i}"), "team": "bench"},
                    "annotations": {"kubectl.kubernetes.io/last-applied-configuration":
                        format!("{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"svc-{i}\",\"namespace\":\"bench\"}},\"spec\":{{\"ports\":[{{\"name\":\"http\",\"port\":80,\"targetPort\":8080}}],\"selector\":{{\"app\":\"svc-{i}\"}}}}}}")},
                    "managedFields": managed},
                "spec": {"clusterIP": vip, "clusterIPs": [vip], "type": "ClusterIP",
                         "selector": {"app": format!("svc-{i}")}, "sessionAffinity": "None",
                         "internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"],
                         "ipFamilyPolicy": "SingleStack",
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
                "status": {"loadBalancer": {}}}),
        );
        let eps: Vec<serde_json::Value> = (0..per)
            .map(|j| {
                let k = i * per + j;
                serde_json::json!({"addresses": [format!("10.{}.{}.{}", (k >> 16) & 255, (k >> 8) & 255, k & 255)],
                                   "conditions": {"ready": true, "serving": true, "terminating": false},
                                   "nodeName": format!("node-{}", k % 50),
                                   "zone": format!("zone-{}", k % 3),
                                   "targetRef": {"kind": "Pod", "namespace": "bench",
                                                 "name": format!("svc-{i}-7d9f8b6c5d-{j:05}"),
                                                 "uid": format!("00000000-0000-0000-0001-{k:012}")}})
            })
            .collect();
        api.apply(
            Kind::EndpointSlice,
            serde_json::json!({"metadata": {"name": format!("svc-{i}-a"), "namespace": "bench",
                    "generateName": format!("svc-{i}-"),
                    "labels": {"kubernetes.io/service-name": format!("svc-{i}"),
                               "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                               "app": format!("svc-{i}")},
                    "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-01T00:00:00Z"},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": format!("svc-{i}"),
                        "uid": format!("00000000-0000-0000-0000-{i:012}"), "controller": true,
                        "blockOwnerDeletion": true}]},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps}),
        );
    }
    let start = std::time::Instant::now();
    let agent = Agent::start_kube(&prefix, &cg.path, &api.kubeconfig, &[])?;
    let pid = agent.pid().context("pid")?;
    Topology::wait_for("the sync", Duration::from_secs(600), || {
        Ok(agent.status_json()?["last_reload"]["frontends"].as_u64() == Some(services as u64))
    })?;
    let secs = start.elapsed().as_secs_f64();
    let rss = agent_mem_kib(pid, "VmRSS:");
    let hwm = agent_mem_kib(pid, "VmHWM:");
    let status = agent.status_json()?;
    let result = serde_json::json!({
        "benchmark": "kube_sync",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        "services": services, "endpoints_per_service": per,
        "seconds_from_start_to_programmed": secs,
        "agent_rss_kib": rss, "agent_peak_rss_kib": hwm,
        "maps": status["maps"],
    });
    let table = format!(
        "Kubernetes sync: {services} Services x {per} endpoints from a fake apiserver\n\
         agent start to everything programmed: {secs:.2} s\n\
         agent RSS after sync: {rss} KiB (peak {hwm} KiB)\n"
    );
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("kube_sync.json"),
        serde_json::to_string_pretty(&result)? + "\n",
    )?;
    std::fs::write(out.join("kube_sync.txt"), &table)?;
    print!("{table}");
    drop(agent);
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
