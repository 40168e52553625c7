//! `cargo xtask setup`: install what the build, the tests and the demo need,
//! and say what was done. Safe to run again: it only installs what is
//! missing.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::util::{self, is_root, ok, output};

/// Debian packages: libLLVM 22 for bpf-linker, the real peers the tests
/// and the demo drive (grpc-go pods are built from Debian's Go and grpc-go
/// packages, in GOPATH mode: nothing is downloaded), perf (the HTTP/2 benchmark counts syscalls and
/// context switches with it), and what builds and runs the image without a
/// Docker engine (buildah, podman, runc, debootstrap).
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iptables",
    "iproute2",
    "util-linux",
    "procps",
    "nghttp2-client",
    "nghttp2-server",
    "nghttp2-proxy",
    "haproxy",
    "linux-perf",
    "curl",
    "debootstrap",
    "buildah",
    "podman",
    "runc",
    "golang-github-containers-common",
    "golang-go",
    "golang-google-grpc-dev",
];

/// The pinned nightly: its LLVM (22) is the one bpf-linker links against
/// (a newer nightly's LLVM would not match the linker's).
const PINNED_NIGHTLY: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// What later cargo invocations need in their environment.
pub struct Env {
    pub path: String,
    pub toolchain: String,
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn env_path() -> String {
    format!(
        "{}:{LLVM_BIN}:{}",
        cargo_bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect()
}

fn packages() -> anyhow::Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        println!("setup: Debian packages present ({})", PACKAGES.join(", "));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "setup: Debian packages missing ({}); run `cargo xtask setup` as root",
            missing.join(", ")
        );
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    let install = |update: bool| -> anyhow::Result<()> {
        if update {
            util::run(Command::new("apt-get").args(["update", "-q"]))?;
        }
        util::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    // Package lists on a fresh machine may be stale or empty.
    install(false).or_else(|_| install(true))
}

fn toolchain_llvm_major(toolchain: &str) -> Option<u32> {
    let v = output(Command::new("rustup").args(["run", toolchain, "rustc", "-vV"]))?;
    let line = v.lines().find(|l| l.starts_with("LLVM version:"))?;
    line.split(':')
        .nth(1)?
        .trim()
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn toolchain() -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("BALANCER_EBPF_TOOLCHAIN") {
        println!("setup: eBPF toolchain {t} (from BALANCER_EBPF_TOOLCHAIN)");
        return Ok(t);
    }
    for t in ["nightly", PINNED_NIGHTLY] {
        if toolchain_llvm_major(t) == Some(22) {
            println!("setup: eBPF toolchain {t} (LLVM 22) present");
            return Ok(t.to_owned());
        }
    }
    println!("setup: installing toolchain {PINNED_NIGHTLY} (LLVM 22, as bpf-linker needs)");
    util::run(Command::new("rustup").args([
        "toolchain",
        "install",
        PINNED_NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    Ok(PINNED_NIGHTLY.to_owned())
}

fn rust_src(toolchain: &str) -> anyhow::Result<()> {
    let sysroot =
        output(Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]))
            .context("rustc --print sysroot")?;
    let core = PathBuf::from(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if core.exists() {
        println!("setup: rust-src present for {toolchain}");
        return Ok(());
    }
    println!("setup: adding rust-src to {toolchain}");
    util::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        toolchain,
    ]))
}

fn bpf_linker(path: &str) -> anyhow::Result<()> {
    if ok(Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path))
    {
        println!("setup: bpf-linker present");
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
    util::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path),
    )
}

fn cargo_fuzz(path: &str) -> anyhow::Result<()> {
    if ok(Command::new("cargo-fuzz")
        .arg("--version")
        .env("PATH", path))
    {
        println!("setup: cargo-fuzz present");
        return Ok(());
    }
    println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    util::run(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION])
            .env("PATH", path),
    )
}

/// Python packages: grpcio (a real gRPC stack for the router's interop
/// test) and kubernetes-validate (the manifests' schema check).
fn python_packages() -> anyhow::Result<()> {
    for (module, package) in [
        ("grpc", "grpcio==1.85.1"),
        ("kubernetes_validate", "kubernetes-validate==1.37.0"),
    ] {
        if ok(Command::new("python3").args(["-c", &format!("import {module}")])) {
            println!("setup: python {package} present");
            continue;
        }
        println!("setup: installing python {package}");
        util::run(Command::new("python3").args(["-m", "pip", "install", "-q", package]))?;
    }
    Ok(())
}

/// Bring the machine up to what the project needs.
pub fn run_setup() -> anyhow::Result<Env> {
    packages()?;
    let toolchain = toolchain()?;
    rust_src(&toolchain)?;
    let path = env_path();
    bpf_linker(&path)?;
    cargo_fuzz(&path)?;
    python_packages()?;
    Ok(Env { path, toolchain })
}

pub fn run() -> anyhow::Result<Env> {
    let env = run_setup()?;
    println!("setup: done");
    Ok(env)
}
