//! `cargo xtask test`: setup when needed, build the binaries the
//! integration tests drive, build the docs with warnings denied (so a
//! broken or private intra-doc link fails here, not in a reader's
//! browser), run every test of the workspace, fuzz the
//! HTTP/2 router's core for a bounded time, then build the image and run
//! it as the DaemonSet does (`cargo xtask image --check`, about 10 minutes
//! the first time on 2 cores; later builds reuse buildah's layers).

use crate::{image, setup, util};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let env = setup::run_setup()?;
    if !util::is_root() {
        eprintln!(
            "test: not root: the integration tests will FAIL (they need network namespaces, \
             cgroups and eBPF); run as root"
        );
    }
    util::run(util::cargo(&env).args(["build", "--workspace", "--bins"]))?;
    // Only on a full run: a filtered run is someone iterating on a test.
    let docs = if args.is_empty() {
        println!("test: cargo doc, warnings denied");
        util::run(
            util::cargo(&env)
                .args(["doc", "--workspace", "--no-deps"])
                .env("RUSTDOCFLAGS", "-D warnings"),
        )
    } else {
        Ok(())
    };
    let tests = util::run(
        util::cargo(&env)
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(args),
    );
    // Only on a full run, not when a test filter was given.
    let fuzz = if args.is_empty() { fuzz(&env) } else { Ok(()) };
    let image = if args.is_empty() {
        println!("test: the image, run as the DaemonSet runs it");
        image::check()
    } else {
        Ok(())
    };
    tests?;
    docs?;
    fuzz?;
    image
}

fn fuzz(env: &setup::Env) -> anyhow::Result<()> {
    let seconds = std::env::var("LBT_FUZZ_SECONDS").unwrap_or_else(|_| "30".into());
    println!("test: fuzzing the HTTP/2 router core for {seconds} s");
    std::fs::create_dir_all(util::root().join("fuzz/corpus/h2router"))?;
    util::run(
        std::process::Command::new("rustup")
            .args(["run", &env.toolchain, "cargo", "fuzz", "run"])
            // The working corpus first (new inputs go there), then the
            // committed seeds: valid exchanges to mutate from.
            .args(["--fuzz-dir", "fuzz", "h2router"])
            .args(["fuzz/corpus/h2router", "fuzz/seeds/h2router", "--"])
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(util::root())
            .env("PATH", &env.path),
    )
}
