//! Endpoint sources. Each produces complete [`crate::state::DesiredState`]
//! values; the agent publishes them.
pub mod file;
pub mod kube;

/// One reload attempt, as seen by the agent: a new state from either
/// source, or why the file could not be read or parsed.
pub type Update = Result<crate::state::DesiredState, file::FileError>;
