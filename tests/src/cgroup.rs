//! cgroup v2 directories for the balanced clients, the agent and the router,
//! removed on drop.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;

use crate::process::sh;

/// A cgroup v2 directory, removed on drop (its processes are killed first).
pub struct Cgroup {
    pub path: PathBuf,
}

pub fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for line in info.lines() {
        let mut halves = line.split(" - ");
        if let (Some(left), Some(right)) = (halves.next(), halves.next())
            && right.split_whitespace().next() == Some("cgroup2")
            && let Some(m) = left.split_whitespace().nth(4)
        {
            return PathBuf::from(m);
        }
    }
    panic!("no cgroup v2 hierarchy mounted");
}

impl Cgroup {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let path = cgroup2_root().join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Children first (a router's cgroup below the balanced one).
        if let Ok(dir) = std::fs::read_dir(&self.path) {
            for e in dir.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    drop(Cgroup { path: e.path() });
                }
            }
        }
        for _ in 0..50 {
            if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
                for pid in procs.split_whitespace() {
                    let _ = sh("kill", &["-9", pid]);
                }
            }
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
