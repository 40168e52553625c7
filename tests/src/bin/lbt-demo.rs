//! The demo behind `cargo xtask demo`: a local "cluster" of network
//! namespaces (a node bridge, 4 pods running real servers, a client), and 64
//! long-lived connections to one Service, first through kube-proxy-shaped
//! iptables rules, then through the agent. Prints both distributions side by
//! side and removes everything it created, also on Ctrl-C.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use balancer_tests::{
    agent::Agent,
    kube_proxy::{install_kube_proxy, kube_proxy_services},
    peers::{H2_PORT, h2_client, hold_connections},
    topology::{ROUTER_ADDR, Topology},
};

const ENDPOINTS: &str = include_str!("../../demo/endpoints.yaml");
const VIP: &str = "198.19.0.10:80";
const CONNECTIONS: usize = 64;
const GRPC_VIP: &str = "198.19.0.20:80";
const RPCS: usize = 2000;

fn bar(n: u64, max: u64, width: usize) -> String {
    let len = if max == 0 {
        0
    } else {
        (n as usize * width).div_ceil(max as usize)
    };
    "█".repeat(len) + &" ".repeat(width - len)
}

fn ratio(c: &BTreeMap<String, u64>, pods: usize) -> f64 {
    let total: u64 = c.values().sum();
    c.values().copied().max().unwrap_or(0) as f64 / (total as f64 / pods as f64)
}

fn main() -> std::process::ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        if let Err(e) = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)) {
            eprintln!("error: installing the Ctrl-C handler: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    // Everything the demo creates is dropped (removed) before this returns.
    let result = demo(&stop);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) if stop.load(Ordering::SeqCst) => {
            eprintln!("\ninterrupted: namespaces, cgroup, servers and agent removed");
            std::process::ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn demo(stop: &AtomicBool) -> anyhow::Result<()> {
    let check = || -> anyhow::Result<()> {
        anyhow::ensure!(!stop.load(Ordering::SeqCst), "interrupted; cleaning up");
        Ok(())
    };

    println!(
        "Building a local cluster: node bridge, 4 pods (198.18.1.10-13) serving TCP on 8080 \
         and HTTP/2 on {H2_PORT}, a client."
    );
    let mut t = Topology::new("demo", 4, &[8080])?;
    t.start_h2()?;
    check()?;

    println!("\n1. kube-proxy: iptables KUBE-SVC/KUBE-SEP chain, random per connection.");
    let kp = t.kube_proxy_client()?;
    let backends: Vec<(String, u16)> = t.pods.iter().map(|p| (p.v4.to_string(), 8080)).collect();
    let grpc_backends: Vec<(String, u16)> =
        t.pods.iter().map(|p| (p.v4.to_string(), H2_PORT)).collect();
    install_kube_proxy(
        &kp,
        &kube_proxy_services(&[
            ("198.19.0.10", 80, &backends),
            ("198.19.0.20", 80, &grpc_backends),
        ]),
    )?;
    let kube = hold_connections(&kp.name, None, VIP, CONNECTIONS)?;
    println!("   {CONNECTIONS} connections to {VIP} opened.");
    check()?;

    println!("\n2. balancer-agent: eBPF connect4 + sock_ops on the client's cgroup, least-conn.");
    let agent = Agent::start_with(
        &t.prefix,
        &t.cgroup.path,
        ENDPOINTS,
        Some(&t.node.name),
        &["--proxy-addr", ROUTER_ADDR],
    )?;
    let ours = hold_connections(&t.client.name, Some(&t.cgroup.path), VIP, CONNECTIONS)?;
    println!("   {CONNECTIONS} connections to {VIP} opened.");
    check()?;

    let max = kube
        .result
        .pods
        .values()
        .chain(ours.result.pods.values())
        .copied()
        .max()
        .unwrap_or(1);
    println!(
        "\n{:<18} {:<28} {:<28}",
        "pod", "kube-proxy (iptables)", "balancer (least-conn)"
    );
    for p in &t.pods {
        let a = kube.result.count(&p.name);
        let b = ours.result.count(&p.name);
        println!(
            "{:<18} {} {:>3}   {} {:>3}",
            format!("{} {}", p.name, p.v4),
            bar(a, max, 22),
            a,
            bar(b, max, 22),
            b
        );
    }
    println!(
        "{:<18} {:<26} {:<28}",
        "busiest/mean",
        format!("{:.2}x", ratio(&kube.result.pods, 4)),
        format!("{:.2}x", ratio(&ours.result.pods, 4))
    );

    println!("\nThe agent's own view (`balancer-agent endpoints`), live counts from sock_ops:\n");
    print!("{}", agent.cli(&["endpoints", "demo/echo"])?);
    check()?;

    println!(
        "\n3. The headline: ONE HTTP/2 (gRPC-style) connection, {RPCS} unary RPCs over it, \
         to {GRPC_VIP}."
    );
    let kube_rpc = h2_client(
        &kp.name,
        None,
        GRPC_VIP,
        &[
            "--path",
            "/unary",
            "--requests",
            &RPCS.to_string(),
            "--concurrency",
            "8",
        ],
    )?;
    check()?;
    let ours_rpc = h2_client(
        &t.client.name,
        Some(&t.cgroup.path),
        GRPC_VIP,
        &[
            "--path",
            "/unary",
            "--requests",
            &RPCS.to_string(),
            "--concurrency",
            "8",
        ],
    )?;
    check()?;
    let count = |v: &serde_json::Value, pod: &str| v["pods"][pod].as_u64().unwrap_or(0);
    let rpc_counts = |v: &serde_json::Value| -> BTreeMap<String, u64> {
        t.pods
            .iter()
            .map(|p| (p.name.clone(), count(v, &p.name)))
            .collect()
    };
    let (k, o) = (rpc_counts(&kube_rpc), rpc_counts(&ours_rpc));
    let max = k.values().chain(o.values()).copied().max().unwrap_or(1);
    println!(
        "\n{:<18} {:<30} {:<30}",
        "pod", "kube-proxy (1 connection)", "balancer (every RPC)"
    );
    for p in &t.pods {
        let (a, b) = (k[&p.name], o[&p.name]);
        println!(
            "{:<18} {} {:>4}   {} {:>4}",
            format!("{} {}", p.name, p.v4),
            bar(a, max, 22),
            a,
            bar(b, max, 22),
            b
        );
    }
    println!(
        "{:<18} {:<28} {:<28}",
        "busiest/mean",
        format!("{:.2}x", ratio(&k, 4)),
        format!("{:.2}x", ratio(&o, 4))
    );
    println!(
        "\nRPC errors: kube-proxy {}, balancer {}",
        kube_rpc["errors"].as_object().map_or(0, |e| e.len()),
        ours_rpc["errors"].as_object().map_or(0, |e| e.len())
    );

    kube.close()?;
    ours.close()?;
    println!("\nConnections closed; removing namespaces, cgroup, servers and the agent.");
    Ok(())
}
