//! `cargo xtask <command>`: setup, build, test, demo, bench, image and
//! seccomp, one module each (`image.rs` for the last two).

mod bench;
mod build;
mod demo;
mod image;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer tasks for the balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing: Debian packages, the nightly toolchain with
    /// rust-src, bpf-linker. Idempotent.
    Setup,
    /// Release build; the agent lands at target/release/balancer-agent.
    Build,
    /// Setup when needed, then every unit and integration test (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A local cluster of network namespaces: kube-proxy rules vs the agent.
    Demo,
    /// Benchmarks; results go to bench/results/.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Build the agent image from the Dockerfile (debootstrap, buildah; no
    /// Docker engine needed); with --check, run the agent and the router
    /// from it as the DaemonSet does and balance a test namespace.
    Image {
        #[arg(long)]
        check: bool,
    },
    /// Write manifests/seccomp/balancer-agent.json: the container runtime's
    /// default profile with bpf and perf_event_open allowed for CAP_BPF and
    /// CAP_PERFMON, setns only into a network namespace, and what else
    /// CAP_SYS_ADMIN would open (mount, the node's hostname, unshare,
    /// syslog, quotactl, fanotify_init) refused.
    Seccomp,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run().map(|_| ()),
        Command::Build => build::run(),
        Command::Test { args } => test::run(&args),
        Command::Demo => demo::run(),
        Command::Bench { which } => bench::run(which),
        Command::Image { check: false } => image::build(),
        Command::Image { check: true } => image::check(),
        Command::Seccomp => image::seccomp(),
    }
}
