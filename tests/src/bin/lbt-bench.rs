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
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use balancer_tests::{
    Agent, SINK_PORT, Topology, endpoints_yaml, hold_connections, install_kube_proxy,
    kube_proxy_services, rate_connections, sh,
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
    let trials: usize = std::env::var("LBT_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let conns: usize = std::env::var("LBT_CONNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let rate_n: usize = std::env::var("LBT_RATE_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
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
    let kp = kube_proxy_client(&t)?;
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

fn spawn_in(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<Proc> {
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {cmd} (cargo xtask setup installs it)"))?;
    Ok(Proc(child))
}

fn tx_bytes(ns: &str) -> anyhow::Result<u64> {
    let out = sh("ip", &["-n", ns, "-j", "-s", "link", "show", "dev", "eth0"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["tx"]["bytes"].as_u64().context("tx bytes")
}

fn agent_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")": state is 3rd; utime 14th and stime 15th overall.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
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

#[derive(Debug, Clone, Default, serde::Serialize)]
struct H2Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    succeeded: u64,
    failed: u64,
    /// Share of response bytes per pod (sums to 1).
    pod_share: Vec<f64>,
    /// Busiest pod / mean.
    spread: f64,
}

/// A client namespace outside the agent's cgroup whose service traffic
/// (198.19.0.0/16) goes out to the node, where kube-proxy-shaped rules are
/// installed.
fn kube_proxy_client(t: &Topology) -> anyhow::Result<balancer_tests::Netns> {
    let kp = t.extra_client("kp", "198.18.201.1", "fd00:18::c9:1")?;
    sh(
        "ip",
        &[
            "-n",
            &kp.name,
            "route",
            "add",
            "198.19.0.0/16",
            "dev",
            "eth0",
        ],
    )?;
    Ok(kp)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One h2load run from namespace `ns` (joining `cgroup` first if given).
fn h2load(
    t: &Topology,
    ns: &str,
    cgroup: Option<&std::path::Path>,
    url: &str,
    n: usize,
    log: &std::path::Path,
) -> anyhow::Result<H2Run> {
    let before: Vec<u64> = t
        .pods
        .iter()
        .map(|p| tx_bytes(&p.ns.name))
        .collect::<Result<_, _>>()?;
    let h2 = format!(
        "exec ip netns exec {ns} h2load -n {n} -c 1 -m 32 --log-file={} {url}",
        log.display()
    );
    let script = match cgroup {
        Some(cg) => format!("echo $$ > {}/cgroup.procs && {h2}", cg.display()),
        None => h2,
    };
    let out = sh("sh", &["-c", &script])?;
    let after: Vec<u64> = t
        .pods
        .iter()
        .map(|p| tx_bytes(&p.ns.name))
        .collect::<Result<_, _>>()?;
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|x| x.trim_end_matches(" req/s").parse::<f64>().ok())
        .with_context(|| format!("h2load output: {out}"))?;
    let reqs = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or("");
    let field = |name: &str| -> u64 {
        reqs.split(", ")
            .find_map(|p| {
                p.trim()
                    .strip_suffix(name)
                    .map(|n| n.trim().trim_start_matches("requests: "))
            })
            .and_then(|n| n.split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    };
    let mut lat: Vec<f64> = std::fs::read_to_string(log)?
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .collect();
    lat.sort_by(f64::total_cmp);
    let deltas: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64)
        .collect();
    let total: f64 = deltas.iter().sum();
    let pod_share: Vec<f64> = deltas
        .iter()
        .map(|d| if total > 0.0 { d / total } else { 0.0 })
        .collect();
    let max = pod_share.iter().copied().fold(0.0, f64::max);
    Ok(H2Run {
        rps,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        succeeded: field("succeeded"),
        failed: field("failed") + field("errored"),
        spread: max * pod_share.len() as f64,
        pod_share,
    })
}

fn median_run(mut runs: Vec<H2Run>) -> H2Run {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    runs[runs.len() / 2].clone()
}

fn http2(out: PathBuf) -> anyhow::Result<()> {
    let n: usize = std::env::var("LBT_H2_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40_000);
    let rounds: usize = std::env::var("LBT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
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
    let mut yaml = String::from(
        "services:\n  - name: bench/h2\n    addresses: [198.19.0.60]\n    ports:\n      - port: 80\n        targetPort: 8080\n        protocol: http2\n    endpoints:\n",
    );
    for e in &eps {
        yaml += &format!("      - address: {e}\n");
    }
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        &yaml,
        Some(&t.node.name),
        &["--proxy-addr", balancer_tests::ROUTER_ADDR],
    )?;
    // The router process does the HTTP/2 work: its CPU and memory.
    let agent_pid = agent.router_pid().context("router pid")?;
    // The splice experiment (`run --splice`): a second agent, on its own
    // cgroup and client namespace, with its router on another port and
    // itself in a child of that cgroup, as on a node where the agent
    // attaches to the root cgroup (so sock_ops sees the router's sockets).
    let splice_cg = balancer_tests::Cgroup::new(&format!("{}-splice", t.prefix))?;
    let splice_agent_cg = balancer_tests::Cgroup::new(&format!("{}-splice/agent", t.prefix))?;
    let splice_client = t.extra_client("splice", "198.18.203.1", "fd00:18::cb:1")?;
    let splice_agent = Agent::start_in_cgroup(
        &format!("{}-splice", t.prefix),
        &splice_cg.path,
        &yaml,
        Some(&t.node.name),
        &["--proxy-addr", "198.18.0.1:15002", "--splice"],
        &splice_agent_cg.path,
    )?;
    let splice_pid = splice_agent.router_pid().context("splice router pid")?;
    let plain = t.extra_client("plain", "198.18.202.1", "fd00:18::ca:1")?;
    let kp = kube_proxy_client(&t)?;
    let backends: Vec<(String, u16)> = eps.iter().map(|e| (e.clone(), 8080)).collect();
    install_kube_proxy(&kp, &kube_proxy_services(&[("198.19.0.60", 80, &backends)]))?;

    let haproxy_cfg = dir.join("haproxy.cfg");
    let mut cfg = String::from(
        "global\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend fe\n  bind 198.18.0.1:18080 proto h2\n  default_backend be\nbackend be\n  balance roundrobin\n",
    );
    for (i, e) in eps.iter().enumerate() {
        cfg += &format!("  server p{i} {e}:8080 proto h2\n");
    }
    std::fs::write(&haproxy_cfg, cfg)?;
    procs.push(spawn_in(
        &t.node.name,
        "haproxy",
        &["-f", &haproxy_cfg.display().to_string(), "-db"],
    )?);
    let mut nghttpx_args = vec!["--frontend=198.18.0.1,18081;no-tls".to_owned()];
    for e in &eps {
        nghttpx_args.push(format!("--backend={e},8080;;proto=h2"));
    }
    nghttpx_args.push("--log-level=WARN".into());
    let nghttpx_refs: Vec<&str> = nghttpx_args.iter().map(String::as_str).collect();
    procs.push(spawn_in(&t.node.name, "nghttpx", &nghttpx_refs)?);
    std::thread::sleep(Duration::from_millis(800));

    let log = dir.join("h2load.log");
    let cg = t.cgroup.path.clone();
    let configs: [(&str, &str, Option<&std::path::Path>, String); 6] = [
        (
            "direct",
            plain.name.as_str(),
            None,
            format!("http://{}:8080/index", eps[0]),
        ),
        (
            "kube_proxy",
            kp.name.as_str(),
            None,
            "http://198.19.0.60:80/index".into(),
        ),
        (
            "haproxy",
            plain.name.as_str(),
            None,
            "http://198.18.0.1:18080/index".into(),
        ),
        (
            "nghttpx",
            plain.name.as_str(),
            None,
            "http://198.18.0.1:18081/index".into(),
        ),
        (
            "balancer",
            t.client.name.as_str(),
            Some(cg.as_path()),
            "http://198.19.0.60:80/index".into(),
        ),
        (
            "balancer_splice",
            splice_client.name.as_str(),
            Some(splice_cg.path.as_path()),
            "http://198.19.0.60:80/index".into(),
        ),
    ];
    // Warm-up: one short run each.
    for (_, ns, cgroup, url) in &configs {
        h2load(&t, ns, *cgroup, url, 2000, &log)?;
    }
    let mut runs: BTreeMap<&str, Vec<H2Run>> = BTreeMap::new();
    let mut cpu_ticks = 0u64;
    let mut balancer_secs = 0.0;
    let mut splice_ticks = 0u64;
    let mut splice_secs = 0.0;
    eprintln!("http2: {rounds} rounds x 6 configurations x {n} requests (h2load -c 1 -m 32)");
    for _ in 0..rounds {
        for (name, ns, cgroup, url) in &configs {
            let t0 = agent_cpu_ticks(agent_pid);
            let s0 = agent_cpu_ticks(splice_pid);
            let start = std::time::Instant::now();
            let r = h2load(&t, ns, *cgroup, url, n, &log)?;
            if *name == "balancer" {
                cpu_ticks += agent_cpu_ticks(agent_pid) - t0;
                balancer_secs += start.elapsed().as_secs_f64();
            }
            if *name == "balancer_splice" {
                splice_ticks += agent_cpu_ticks(splice_pid) - s0;
                splice_secs += start.elapsed().as_secs_f64();
            }
            runs.entry(name).or_default().push(r);
        }
    }
    let med: BTreeMap<&str, H2Run> = runs
        .clone()
        .into_iter()
        .map(|(k, v)| (k, median_run(v)))
        .collect();
    let direct = med["direct"].clone();
    let clk = 100.0; // USER_HZ
    let agent_cpu = cpu_ticks as f64 / clk / balancer_secs;
    let splice_cpu = splice_ticks as f64 / clk / splice_secs.max(1e-9);
    let splice_status = splice_agent.status_json()?;
    let rss = agent_mem_kib(agent_pid, "VmRSS:");
    let hwm = agent_mem_kib(agent_pid, "VmHWM:");
    let mut rows = serde_json::Map::new();
    let mut table = format!(
        "HTTP/2 benchmark: h2load -n {n} -c 1 -m 32 over {PODS} nghttpd pods, median of {rounds} rounds\n\n{:<12} {:>9} {:>7} {:>8} {:>8} {:>7} {:>7} {:>7}  per-pod share\n",
        "config", "req/s", "xdirect", "p50 us", "p99 us", "p50 x", "p99 x", "spread"
    );
    for (name, r) in &med {
        let row = serde_json::json!({
            "rps": r.rps, "rps_vs_direct": r.rps / direct.rps,
            "p50_us": r.p50_us, "p50_vs_direct": r.p50_us / direct.p50_us,
            "p99_us": r.p99_us, "p99_vs_direct": r.p99_us / direct.p99_us,
            "spread_max_over_mean": r.spread, "pod_share": r.pod_share,
            "succeeded": r.succeeded, "failed": r.failed,
            "all_rounds_rps": runs[name].iter().map(|x| x.rps).collect::<Vec<_>>(),
        });
        table += &format!(
            "{:<16} {:>9.0} {:>7.2} {:>8.0} {:>8.0} {:>7.2} {:>7.2} {:>7.2}  {}\n",
            name,
            r.rps,
            r.rps / direct.rps,
            r.p50_us,
            r.p99_us,
            r.p50_us / direct.p50_us,
            r.p99_us / direct.p99_us,
            r.spread,
            r.pod_share
                .iter()
                .map(|s| format!("{:.0}%", s * 100.0))
                .collect::<Vec<_>>()
                .join("/")
        );
        rows.insert((*name).to_owned(), row);
    }
    table += &format!(
        "\nagent during the balancer runs: {:.0}% of one CPU, RSS {} KiB (peak {} KiB)\n",
        agent_cpu * 100.0,
        rss,
        hwm
    );
    table += &format!(
        "agent during the balancer_splice runs: {:.0}% of one CPU; client directions spliced: {}, left on TCP: {}\n",
        splice_cpu * 100.0,
        splice_status["counters"]["splice_on"],
        splice_status["counters"]["splice_off"],
    );
    let result = serde_json::json!({
        "benchmark": "http2",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        "h2load": format!("-n {n} -c 1 -m 32"), "pods": PODS, "rounds": rounds,
        "configs": rows,
        "agent": {"cpu_fraction_of_one_core": agent_cpu, "rss_kib": rss, "peak_rss_kib": hwm},
        "splice_agent": {"cpu_fraction_of_one_core": splice_cpu,
            "splice_on": splice_status["counters"]["splice_on"],
            "splice_off": splice_status["counters"]["splice_off"]},
    });
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("http2.json"),
        serde_json::to_string_pretty(&result)? + "\n",
    )?;
    std::fs::write(out.join("http2.txt"), &table)?;
    print!("{table}");
    drop(procs);
    drop(splice_agent);
    drop(splice_agent_cg);
    drop(splice_cg);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Sync of N Services x M endpoints from a fake apiserver: time from the
/// agent's start to all of them programmed, and the agent's memory.
fn kube(out: PathBuf) -> anyhow::Result<()> {
    use balancer_tests::fakeapi::{FakeApi, Kind};
    let services: usize = std::env::var("LBT_SERVICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let per: usize = std::env::var("LBT_ENDPOINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let prefix = balancer_tests::unique_prefix("kubebench");
    let cg = balancer_tests::Cgroup::new(&prefix)?;
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
