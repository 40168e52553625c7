# Multi-stage build of the agent image. Not verified on the development
# machine (no Docker engine there); the build steps are those of
# `cargo xtask build`.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends llvm-22-dev \
    && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install nightly-2026-05-20 --profile minimal --component rust-src \
    && PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --version 0.13.0 \
       --no-default-features --features llvm-22
WORKDIR /src
COPY . .
ENV BALANCER_EBPF_TOOLCHAIN=nightly-2026-05-20
RUN PATH=/usr/lib/llvm-22/bin:$PATH cargo build --release --locked -p balancer-agent

FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/balancer-agent /usr/local/bin/balancer-agent
ENTRYPOINT ["/usr/local/bin/balancer-agent"]
