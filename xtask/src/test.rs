//! `cargo xtask test`: setup when needed, build the binaries the
//! integration tests drive, then run every test of the workspace.

use crate::{setup, util};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let env = setup::run_setup()?;
    if !util::is_root() {
        eprintln!(
            "test: not root: the integration tests will FAIL (they need network namespaces, \
             cgroups and eBPF); run as root"
        );
    }
    util::run(util::cargo(&env).args(["build", "--workspace", "--bins"]))?;
    util::run(
        util::cargo(&env)
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(args),
    )
}
