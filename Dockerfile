# The agent image: one binary for both containers of the DaemonSet
# (`balancer-agent run` and `balancer-agent router`).
#
# Default: what a user with internet access runs (`docker build .`): the
# rust image and rustup's pinned nightly for the eBPF programs, on a
# distroless runtime.
#
# Where rustup cannot reach its servers (the development machine), the
# builder takes Debian's toolchain instead: bookworm-security's rustc-web
# 1.96 and its prebuilt `core` for bpfel-unknown-none, on a Debian base of
# your own; `cargo xtask image` does exactly this (debootstrap, buildah):
#   --build-arg TOOLCHAIN=debian --build-arg BUILD_BASE=<bookworm image>
#   --build-arg RUNTIME_BASE=<bookworm image>
# A TLS proxy's CA for cargo: --build-arg CARGO_HTTP_CAINFO=<path inside>,
# with the bundle mounted there.
ARG BUILD_BASE=rust:1.95-bookworm
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12

FROM ${BUILD_BASE} AS build
ARG TOOLCHAIN=rustup
ARG NIGHTLY=nightly-2026-05-20
ARG CARGO_HTTP_CAINFO
ENV DEBIAN_FRONTEND=noninteractive
RUN set -eux; \
    if [ "$TOOLCHAIN" = debian ]; then \
        echo 'deb http://deb.debian.org/debian-security bookworm-security main' \
            > /etc/apt/sources.list.d/security.list; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates llvm-22-dev \
        zlib1g-dev libzstd-dev libxml2-dev gcc libc6-dev; \
    if [ "$TOOLCHAIN" = debian ]; then \
        apt-get install -y --no-install-recommends rustc-web cargo-web \
            libstd-rust-web-dev-bpf; \
    fi; \
    rm -rf /var/lib/apt/lists/*
RUN set -eux; \
    if [ "$TOOLCHAIN" = rustup ]; then \
        rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src; \
    fi; \
    PATH=/usr/lib/llvm-22/bin:$PATH cargo install --root /usr/local bpf-linker \
        --version 0.13.0 --no-default-features --features llvm-22
WORKDIR /src
COPY . .
# rustup: the eBPF crates build with the pinned nightly (-Z build-std).
# Debian: with the stable 1.96 and its prebuilt core for the BPF target,
# the two crates of the eBPF build that use unstable features may.
RUN set -eux; \
    if [ "$TOOLCHAIN" = debian ]; then \
        export RUSTC_BOOTSTRAP=aya_ebpf,balancer; \
    else \
        export BALANCER_EBPF_TOOLCHAIN="$NIGHTLY"; \
    fi; \
    PATH=/usr/local/bin:/usr/lib/llvm-22/bin:$PATH \
        cargo build --release --locked -p balancer-agent

FROM ${RUNTIME_BASE}
COPY --from=build /src/target/release/balancer-agent /usr/local/bin/balancer-agent
ENTRYPOINT ["/usr/local/bin/balancer-agent"]
