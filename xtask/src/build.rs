//! `cargo xtask build`: release build of the agent (and the test peers the
//! demo and benchmarks use).

use crate::{setup, util};

pub fn run() -> anyhow::Result<()> {
    let env = setup::run_setup()?;
    release(&env)?;
    println!(
        "build: {}",
        util::root().join("target/release/balancer-agent").display()
    );
    Ok(())
}

pub fn release(env: &setup::Env) -> anyhow::Result<()> {
    util::run(util::cargo(env).args([
        "build",
        "--release",
        "-p",
        "balancer-agent",
        "-p",
        "balancer-tests",
        "--bins",
    ]))
}
