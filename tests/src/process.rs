//! Running things: this workspace's binaries, commands, and the limits and
//! sizes of processes.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

/// Fails (never skips) when not root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it creates network namespaces, cgroups and loads eBPF programs. \
         Run it with `cargo xtask test` as root."
    );
}

/// Path of a binary of this workspace (built by `cargo xtask test`).
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("LBT_BIN_{}", name.to_uppercase().replace('-', "_")))
    {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/test-binary -> target/<profile>/<name>
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build --bins`, which `cargo xtask test` does)",
        p.display()
    );
    p
}

/// Run a command, failing with its stderr.
pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Raise this process's open-file limit to its hard limit (children, such
/// as the agent and the helpers, inherit it). Returns the new soft limit.
pub fn raise_nofile_limit() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

/// A process's resident set size (VmRSS), in bytes.
pub fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(kib * 1024)
}
