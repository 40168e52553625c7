//! The `kubernetes` endpoint source: Services and discovery.k8s.io/v1
//! EndpointSlices, watched with kube-rs, converted into the same
//! [`crate::state::DesiredState`] the file source produces.
//!
//! Robustness rules:
//! - a watch restart, relist or 410 Gone never empties the data path: a
//!   relist is buffered and swapped in whole when it completes
//!   (`Init`..`InitDone`);
//! - an unreachable apiserver is retried with backoff while the last state
//!   keeps serving; the state is visible in `status`;
//! - a malformed object is skipped with a log line naming it; the others
//!   still apply;
//! - every update converts everything outside any lock, then publishes once.
//!
//! `watch.rs` holds the watchers, their stores and the run loop;
//! `convert.rs` the pure conversion from the stored objects.

mod convert;
mod watch;

pub use watch::run;
