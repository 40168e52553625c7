//! Endpoint sources. Each produces complete [`crate::state::DesiredState`]
//! values; the agent publishes them.
pub mod file;
pub mod kube;
