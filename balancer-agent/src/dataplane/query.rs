//! What the kernel has attached, asked with BPF_PROG_QUERY (the question
//! `bpftool cgroup show` asks), so `status` reports what is, not what the
//! agent believes it did. The one place of the agent that touches a raw
//! kernel structure: aya 0.14 offers the query only for device and lirc
//! programs.
#![expect(unsafe_code, reason = "BPF_PROG_QUERY has no safe wrapper in aya 0.14")]

use std::os::fd::{AsRawFd, BorrowedFd};

/// `bpf_attach_type` numbers (include/uapi/linux/bpf.h).
pub const CGROUP_SOCK_OPS: u32 = 3;
pub const SK_MSG_VERDICT: u32 = 7;
pub const CGROUP_INET4_CONNECT: u32 = 10;
pub const CGROUP_INET6_CONNECT: u32 = 11;
pub const CGROUP_INET4_GETPEERNAME: u32 = 29;
pub const CGROUP_INET6_GETPEERNAME: u32 = 30;

/// The BPF_PROG_QUERY part of `union bpf_attr`.
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

const BPF_PROG_QUERY: libc::c_long = 16;
/// More than anything the agent attaches (one per attach point).
const MAX_IDS: usize = 64;

/// `BPF_F_QUERY_EFFECTIVE`: the programs that run for the cgroup (its
/// own and its ancestors'), in the order they run.
const QUERY_EFFECTIVE: u32 = 1;

/// The ids of the programs attached to `target` (a cgroup directory, or a
/// sockmap for [`SK_MSG_VERDICT`]) at `attach_type`.
pub fn attached(target: BorrowedFd<'_>, attach_type: u32) -> std::io::Result<Vec<u32>> {
    query(target, attach_type, 0)
}

/// The ids of the programs that run for cgroup `target` at `attach_type`,
/// its own and those inherited from its ancestors, in the order they run.
pub fn effective(target: BorrowedFd<'_>, attach_type: u32) -> std::io::Result<Vec<u32>> {
    query(target, attach_type, QUERY_EFFECTIVE)
}

fn query(target: BorrowedFd<'_>, attach_type: u32, query_flags: u32) -> std::io::Result<Vec<u32>> {
    let mut ids = [0u32; MAX_IDS];
    let mut attr = QueryAttr {
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        query_flags,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_IDS as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid, zero-initialised bpf_attr prefix of the
    // size passed; `prog_ids` points to `prog_cnt` writable u32s that
    // outlive the call, and the kernel writes at most that many.
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
    let n = (attr.prog_cnt as usize).min(MAX_IDS);
    Ok(ids[..n].to_vec())
}
