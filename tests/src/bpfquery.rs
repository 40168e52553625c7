//! What is attached to a cgroup, asked of the kernel with BPF_PROG_QUERY
//! (the same question `bpftool cgroup show` asks).
//!
//! The agent asks the same in `dataplane/query.rs`, for `status`. This one
//! is the tests' own on purpose: it is the oracle that checks what the
//! agent says it attached and detached, so it shares no code with it (a
//! bug in a shared query would pass both).

use std::{os::fd::AsRawFd, path::Path};

/// The attach points the agent uses, with their `bpf_attach_type` numbers.
pub const ATTACH_POINTS: [(&str, u32); 5] = [
    ("sock_ops", 3),
    ("connect4", 10),
    ("connect6", 11),
    ("getpeername4", 29),
    ("getpeername6", 30),
];

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Number of programs attached to `cgroup` at `attach_type`.
pub fn attached_count(cgroup: &Path, attach_type: u32) -> std::io::Result<u32> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    let dir = std::fs::File::open(cgroup)?;
    let mut attr = QueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid, zero-initialised bpf_attr prefix for
    // BPF_PROG_QUERY of the size passed; with prog_ids == 0 the kernel only
    // writes prog_cnt (and attach_flags/revision) into it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr.prog_cnt)
}

/// (attach point, count) for every attach point the agent uses.
pub fn attachments(cgroup: &Path) -> std::io::Result<Vec<(&'static str, u32)>> {
    ATTACH_POINTS
        .iter()
        .map(|(name, t)| attached_count(cgroup, *t).map(|c| (*name, c)))
        .collect()
}
