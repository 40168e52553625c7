//! `cargo xtask bench <which>`: build, then run a benchmark (`lbt-bench`),
//! which writes JSON and a table to bench/results/.

use crate::{build, setup, util};

#[derive(clap::Subcommand, Clone, Copy)]
pub enum Which {
    /// Connection spread (kube-proxy rules vs least-conn) and connect() rate
    /// (connect4 vs iptables DNAT vs direct).
    L4,
    /// h2load over 4 nghttpd pods: direct, kube-proxy rules, a TCP relay
    /// (the floor), haproxy, nghttpx and the balancer (plain, --splice, 1
    /// and 2 router threads), interleaved rounds, CPU and syscalls per
    /// request.
    Http2,
    /// Sync of 10,000 Services x 10 endpoints from a fake apiserver: time
    /// and agent memory.
    Kube,
}

pub fn run(which: Which) -> anyhow::Result<()> {
    anyhow::ensure!(
        util::is_root(),
        "benchmarks use network namespaces: run as root"
    );
    let env = setup::run_setup()?;
    build::release(&env)?;
    let bin = util::root().join("target/release");
    let out = util::root().join("bench/results");
    std::fs::create_dir_all(&out)?;
    let name = match which {
        Which::L4 => "l4",
        Which::Http2 => "http2",
        Which::Kube => "kube",
    };
    util::run(
        std::process::Command::new(bin.join("lbt-bench"))
            .arg(name)
            .arg(&out)
            .env("LBT_BIN_BALANCER_AGENT", bin.join("balancer-agent"))
            .env("LBT_BIN_LBT_PEER", bin.join("lbt-peer"))
            .env("LBT_BIN_LBT_H2", bin.join("lbt-h2")),
    )
}
