//! Builds the eBPF programs (`balancer-ebpf`) for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker, so `include_bytes_aligned!` can embed
//! them. `cargo xtask setup` installs both.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=BALANCER_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("BALANCER_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir)
        .join("../balancer-ebpf")
        .canonicalize()?;
    let root_dir = root_dir.to_string_lossy();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "balancer-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
