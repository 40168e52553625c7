//! The HTTP/2 frame router's logic, without I/O.
//!
//! The agent's router thread (`balancer-agent/src/proxy/`) owns the
//! sockets; everything it does with the bytes is here, so that it can be
//! tested frame by frame and fuzzed (`fuzz/fuzz_targets/h2router.rs`):
//! - [`core`]: client and backend connections, streams across the two
//!   hops, flow control, retries, drain;
//! - [`frame`]: writing frames;
//! - [`hpack`]: the checks and re-encoding that let header blocks be
//!   forwarded without decoding;
//! - [`endpoint`]: per-stream endpoint choice (least-request and others);
//! - [`stats`]: the router's counters, read by the agent's metrics.
#![forbid(unsafe_code)]

pub mod core;
pub mod endpoint;
pub mod frame;
pub mod hpack;
pub mod stats;
