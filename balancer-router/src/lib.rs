//! The HTTP/2 frame router's logic, without I/O.
//!
//! The router process (`balancer-agent/src/router/`) owns the
//! sockets; everything it does with the bytes is here, so that it can be
//! tested frame by frame and fuzzed (`fuzz/fuzz_targets/h2router.rs`):
//! - [`core`]: client and backend connections, streams across the two
//!   hops, retries, drain, flood detection, time and memory bounds;
//! - [`frame`]: reading and writing frames, one file per frame type where
//!   it has more than a header; [`frame::Reason`], the typed error code;
//! - [`flow`]: flow-control windows as types;
//! - [`hpack`] and [`huffman`]: the complete validation of header blocks
//!   that lets them be forwarded without re-encoding, and the re-encoding
//!   of blocks sent before a client ACKed our settings;
//! - [`error`]: connection and stream errors;
//! - [`endpoint`]: per-stream endpoint choice (least-request and others);
//! - [`accrual`]: failure accrual, the ejection of failing endpoints;
//! - [`stats`]: the router's counters, read by the agent's metrics.
#![forbid(unsafe_code)]

pub mod accrual;
pub mod core;
pub mod endpoint;
pub mod error;
pub mod flow;
pub mod frame;
pub mod hpack;
pub mod huffman;
pub mod stats;
