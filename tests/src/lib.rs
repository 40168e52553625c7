//! Test harness: a local "cluster" made of network namespaces, real servers
//! in pod namespaces, a client in its own cgroup, and the agent as a real
//! process. Every test builds its own topology, named after the test, and
//! everything is removed on drop, also when the test fails.

pub mod agent;
pub mod bpfquery;
pub mod cgroup;
pub mod fakeapi;
pub mod grpc;
pub mod h2wire;
pub mod kube_proxy;
pub mod netns;
pub mod nghttp2;
pub mod peers;
pub mod process;
pub mod topology;
pub mod yaml;

pub use agent::*;
pub use cgroup::*;
pub use kube_proxy::*;
pub use netns::*;
pub use nghttp2::*;
pub use peers::*;
pub use process::*;
pub use topology::*;
pub use yaml::*;
