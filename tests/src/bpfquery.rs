//! What is attached to a cgroup, asked of the kernel with BPF_PROG_QUERY
//! (the same question `bpftool cgroup show` asks), through the agent's own
//! query module (`balancer-agent/src/dataplane/query.rs`, compiled in here
//! whole): one implementation of the call, a thin wrapper whose answer the
//! tests check against behaviour (connects balanced or not) besides.

use std::{os::fd::AsFd, path::Path};

#[path = "../../balancer-agent/src/dataplane/query.rs"]
#[expect(
    dead_code,
    reason = "the agent's module whole: the tests use `attached` and the cgroup attach types"
)]
mod query;

/// The attach points the agent uses, with their `bpf_attach_type` numbers.
pub const ATTACH_POINTS: [(&str, u32); 5] = [
    ("sock_ops", query::CGROUP_SOCK_OPS),
    ("connect4", query::CGROUP_INET4_CONNECT),
    ("connect6", query::CGROUP_INET6_CONNECT),
    ("getpeername4", query::CGROUP_INET4_GETPEERNAME),
    ("getpeername6", query::CGROUP_INET6_GETPEERNAME),
];

/// Number of programs attached to `cgroup` at `attach_type`.
pub fn attached_count(cgroup: &Path, attach_type: u32) -> std::io::Result<u32> {
    let dir = std::fs::File::open(cgroup)?;
    query::attached(dir.as_fd(), attach_type).map(|ids| ids.len() as u32)
}

/// (attach point, count) for every attach point the agent uses.
pub fn attachments(cgroup: &Path) -> std::io::Result<Vec<(&'static str, u32)>> {
    ATTACH_POINTS
        .iter()
        .map(|(name, t)| attached_count(cgroup, *t).map(|c| (*name, c)))
        .collect()
}
