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
        _ => bail!("usage: lbt-bench l4 OUT_DIR"),
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
