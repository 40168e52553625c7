//! Test harness: a local "cluster" made of network namespaces, real servers
//! in pod namespaces, a client in its own cgroup, and the agent as a real
//! process. Every test builds its own topology, named after the test, and
//! everything is removed on drop, also when the test fails.
//!
//! One module per concern:
//! - [`netns`]: network namespaces, named after their test;
//! - [`cgroup`]: cgroup v2 directories;
//! - [`topology`]: the local cluster (node bridge, pods, clients);
//! - [`peers`]: `lbt-peer` and `lbt-h2` servers and clients in namespaces;
//! - [`nghttp2`]: nghttpd and h2load as peers;
//! - [`agent`]: the agent under test, and its router process;
//! - [`kube_proxy`]: kube-proxy's iptables rules, the baseline;
//! - [`yaml`]: the agent's endpoints file;
//! - [`process`]: this workspace's binaries, commands, process limits;
//! - [`grpc`]: real gRPC peers (Python grpcio) and the gRPC test setup;
//! - [`fakeapi`]: a fake Kubernetes apiserver;
//! - [`h2wire`]: raw HTTP/2 on the wire, and the hostile cases;
//! - [`bpfquery`]: what is attached to a cgroup, asked of the kernel.

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
