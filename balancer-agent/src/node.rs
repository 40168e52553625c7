//! What the node gives both processes: where cgroup v2 is mounted, and
//! files (sockets) removed when their owner goes.

use std::path::PathBuf;

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        // ... mount-point ... - fstype source options
        let mut halves = line.split(" - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mnt) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mnt));
        }
    }
    anyhow::bail!("no cgroup v2 hierarchy is mounted; pass --cgroup")
}

/// A file removed when this is dropped (an admin socket).
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
