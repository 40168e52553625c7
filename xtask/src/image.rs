//! `cargo xtask image`: build the agent image from the Dockerfile here,
//! without a Docker engine, and `--check` it: run the agent and the router
//! from it with exactly the DaemonSet's securityContext, mounts and seccomp
//! profile, balance connections from a test namespace, and see the
//! router find a client namespace made after it started and open that
//! client's pod connections from it (`lbt-image-check`). `cargo xtask
//! seccomp` writes the seccomp profile.
//!
//! How (no Docker engine here; Debian's buildah and podman with runc build
//! and run images): a Debian bookworm base from `debootstrap --variant=
//! minbase`, imported with podman; `buildah bud` with Debian's toolchain
//! (rustup cannot reach its servers here) and the host's CA bundle for
//! cargo; runc with the cgroupfs manager; explicit ulimits.

use std::{path::PathBuf, process::Command};

use anyhow::Context;

use crate::util;

pub const IMAGE: &str = "localhost/balancer-agent:0.1.0";
const BASE: &str = "localhost/balancer-bookworm-base:latest";
/// The runtime's default profile, from Debian's containers-common.
const RUNTIME_DEFAULT: &str = "/usr/share/containers/seccomp.json";
pub const PROFILE: &str = "manifests/seccomp/balancer-agent.json";
/// Syscalls the runtime's default allows only with CAP_SYS_ADMIN, which
/// the agent needs with the capability the kernel checks since 5.8.
const CALLS: [(&str, &str); 2] = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
/// `setns(2)`'s second argument for a network namespace: the only one the
/// profile lets through (the router's, with CAP_SYS_ADMIN).
const CLONE_NEWNET: u64 = 0x4000_0000;
/// What else CAP_SYS_ADMIN (the router's, for setns) would open, none of
/// which either container calls: mounts (a remount would make the
/// read-only cgroup and netns mounts writable), the node's hostname (a
/// hostNetwork pod shares the host's UTS namespace), new namespaces, the
/// kernel log, quotas, fanotify. Refused with EPERM, as the kernel refuses
/// them without the capability.
const REFUSED: [&str; 19] = [
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "unshare",
    "sethostname",
    "setdomainname",
    "syslog",
    "quotactl",
    "quotactl_fd",
    "fanotify_init",
    "lookup_dcookie",
];

static ULIMITS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// containers.conf for buildah and podman on this host: runc (crun 1.8
/// refuses the hybrid cgroup layout), cgroupfs (no systemd), and ulimits
/// within the host's hard limits.
fn containers_conf() -> anyhow::Result<PathBuf> {
    // Hard limits from /proc/self/limits: "Max open files  20000  20000  files".
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let hard = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(4096)
    };
    let nofile = hard("Max open files").min(1 << 20);
    // Measured: buildah's RUN steps are refused an nproc above 32768 (the
    // limit buildah itself runs with), whatever the host allows.
    let nproc = hard("Max processes").min(32_768);
    let path = std::env::temp_dir().join("balancer-containers.conf");
    // buildah does not take ulimits from containers.conf: flags too.
    *ULIMITS.lock().unwrap_or_else(|p| p.into_inner()) = vec![
        format!("--ulimit=nofile={nofile}:{nofile}"),
        format!("--ulimit=nproc={nproc}:{nproc}"),
    ];
    std::fs::write(
        &path,
        format!(
            "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"file\"\n"
        ),
    )?;
    Ok(path)
}

/// The environment buildah and podman run with.
pub fn podman_env() -> anyhow::Result<Vec<(String, String)>> {
    Ok(vec![(
        "CONTAINERS_CONF".into(),
        containers_conf()?.display().to_string(),
    )])
}

fn base(env: &[(String, String)]) -> anyhow::Result<()> {
    if util::ok(
        Command::new("podman")
            .args(["image", "exists", BASE])
            .envs(env.iter().cloned()),
    ) {
        return Ok(());
    }
    let dir = std::env::temp_dir().join("balancer-bookworm-rootfs");
    let _ = std::fs::remove_dir_all(&dir);
    println!("image: debootstrap --variant=minbase bookworm (about 30 s)");
    util::run(Command::new("debootstrap").args([
        "--variant=minbase",
        "bookworm",
        &dir.display().to_string(),
        "http://deb.debian.org/debian",
    ]))?;
    let script = format!("tar -C {} -c . | podman import - {BASE}", dir.display());
    util::run(
        Command::new("sh")
            .args(["-c", &script])
            .envs(env.iter().cloned()),
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Build the image from the Dockerfile.
pub fn build() -> anyhow::Result<()> {
    anyhow::ensure!(
        util::is_root(),
        "cargo xtask image needs root (buildah, podman)"
    );
    // Installs debootstrap, buildah, podman and runc with the rest.
    crate::setup::run_setup()?;
    let env = podman_env()?;
    base(&env)?;
    let ca = "/etc/ssl/certs/ca-certificates.crt";
    println!("image: buildah bud (Debian's toolchain; several minutes)");
    util::run(
        Command::new("buildah")
            .args(["bud", "--layers", "-t", IMAGE, "-f", "Dockerfile"])
            .args(ULIMITS.lock().unwrap_or_else(|p| p.into_inner()).iter())
            .args(["--build-arg", "TOOLCHAIN=debian"])
            .args(["--build-arg", &format!("BUILD_BASE={BASE}")])
            .args(["--build-arg", &format!("RUNTIME_BASE={BASE}")])
            // crates.io through the TLS proxy the host trusts.
            .args(["-v", &format!("{ca}:/etc/ssl/host-ca.crt:ro")])
            .args(["--build-arg", "CARGO_HTTP_CAINFO=/etc/ssl/host-ca.crt"])
            .arg(".")
            .envs(env.iter().cloned()),
    )?;
    println!("image: {IMAGE}");
    Ok(())
}

/// Build, then run `lbt-image-check` against the image.
pub fn check() -> anyhow::Result<()> {
    build()?;
    let env = crate::setup::run_setup()?;
    util::run(util::cargo(&env).args([
        "build",
        "-p",
        "balancer-agent",
        "-p",
        "balancer-tests",
        "--bins",
    ]))?;
    util::run(
        Command::new(util::root().join("target/debug/lbt-image-check"))
            .env("LBT_IMAGE", IMAGE)
            .env("LBT_SECCOMP", util::root().join(PROFILE))
            .envs(podman_env()?),
    )
}

/// Write the seccomp profile: the runtime's default, with `bpf(2)` and
/// `perf_event_open(2)` allowed for CAP_BPF and CAP_PERFMON too (the
/// default allows them only with CAP_SYS_ADMIN, which the agent does not
/// have); `setns(2)` only into a network namespace; and what else the
/// router's CAP_SYS_ADMIN would open ([`REFUSED`]) refused.
///
/// setns and the refused calls are each in exactly one rule, with no
/// `includes`/`excludes`: containerd reads a Localhost profile as a plain
/// OCI one and ignores those (checked with runc here: every rule then
/// applies, and the first allow of a call wins), so these rules mean the
/// same under containerd as under CRI-O and podman. The kernel still checks
/// CAP_SYS_ADMIN for setns: the agent, without it, is refused there.
pub fn seccomp() -> anyhow::Result<()> {
    crate::setup::run_setup()?;
    let text = std::fs::read_to_string(RUNTIME_DEFAULT)
        .with_context(|| format!("reading the runtime's default profile {RUNTIME_DEFAULT}"))?;
    let mut profile: serde_json::Value = serde_json::from_str(&text)?;
    let syscalls = profile["syscalls"]
        .as_array_mut()
        .context("a profile without syscalls")?;
    let ours = |n: &serde_json::Value| CALLS.iter().any(|(c, _)| n == c);
    // Take our calls out of the rules that deny them without
    // CAP_SYS_ADMIN (they would conflict with an allow for another cap).
    for rule in syscalls.iter_mut() {
        if rule["action"] != "SCMP_ACT_ALLOW"
            && let Some(names) = rule["names"].as_array_mut()
        {
            names.retain(|n| !ours(n));
        }
    }
    // setns and the refused calls out of every rule (allow, or deny
    // without CAP_SYS_ADMIN), to be in one rule each below.
    let narrowed = |n: &serde_json::Value| n == "setns" || REFUSED.iter().any(|c| n == c);
    for rule in syscalls.iter_mut() {
        if let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| !narrowed(n));
        }
    }
    syscalls.retain(|r| r["names"].as_array().is_none_or(|n| !n.is_empty()));
    syscalls.push(serde_json::json!({
        "names": ["setns"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 1, "value": CLONE_NEWNET, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
        "comment": "balancer-agent: setns(fd, CLONE_NEWNET) only: the router opens pod connections in client pods' network namespaces (the kernel checks CAP_SYS_ADMIN)",
        "includes": {}, "excludes": {}
    }));
    syscalls.push(serde_json::json!({
        "names": REFUSED, "action": "SCMP_ACT_ERRNO", "args": [],
        "comment": "balancer-agent: what CAP_SYS_ADMIN would open beyond setns, used by neither container",
        "includes": {}, "excludes": {}, "errnoRet": 1, "errno": "EPERM"
    }));
    for (call, cap) in CALLS {
        syscalls.push(serde_json::json!({
            "names": [call], "action": "SCMP_ACT_ALLOW", "args": [],
            "comment": format!("balancer-agent: {call} with {cap} (Linux 5.8+), not only CAP_SYS_ADMIN"),
            "includes": {"caps": [cap]}, "excludes": {}
        }));
        syscalls.push(serde_json::json!({
            "names": [call], "action": "SCMP_ACT_ERRNO", "args": [],
            "comment": "", "includes": {},
            "excludes": {"caps": ["CAP_SYS_ADMIN", cap]}, "errnoRet": 1, "errno": "EPERM"
        }));
    }
    let out = util::root().join(PROFILE);
    std::fs::create_dir_all(out.parent().context("profile dir")?)?;
    std::fs::write(&out, serde_json::to_string_pretty(&profile)? + "\n")?;
    println!("seccomp: {}", out.display());
    Ok(())
}
