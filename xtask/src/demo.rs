//! `cargo xtask demo`: build, then run the namespace demo (`lbt-demo`).

use crate::{build, setup, util};

pub fn run() -> anyhow::Result<()> {
    anyhow::ensure!(
        util::is_root(),
        "the demo creates network namespaces and attaches eBPF programs: run it as root"
    );
    let env = setup::run_setup()?;
    build::release(&env)?;
    let bin = util::root().join("target/release");
    util::run(
        std::process::Command::new(bin.join("lbt-demo"))
            .env("LBT_BIN_BALANCER_AGENT", bin.join("balancer-agent"))
            .env("LBT_BIN_LBT_PEER", bin.join("lbt-peer"))
            .env("LBT_BIN_LBT_H2", bin.join("lbt-h2")),
    )
}
