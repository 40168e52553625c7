//! The eBPF programs live in the `balancer` binary target (`src/main.rs`),
//! built for `bpfel-unknown-none`. This empty library lets the agent declare a
//! build-dependency on the crate so cargo rebuilds it when it changes.
#![no_std]
