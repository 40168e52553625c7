//! Network namespaces, named after their test (see [`unique_prefix`]) and
//! deleted on drop, also when the test fails: named ones in `/run/netns`
//! ([`Netns`]), ones no file names ([`UnnamedNetns`]), and a test's own
//! directory of namespace files ([`NetnsDir`]).

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use serde_json::Value;

use crate::process::sh;

pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    sh("ip", args).map(|_| ())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short, unique prefix for one test's objects: tag, pid and a counter.
pub fn unique_prefix(tag: &str) -> String {
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!(
        "lbt-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn exec(&self, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        sh("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs in it, then delete it.
        if let Ok(pids) = sh("ip", &["netns", "pids", &self.name]) {
            for pid in pids.split_whitespace() {
                let _ = sh("kill", &["-9", pid]);
            }
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Bytes sent by `dev` in namespace `ns` (from the kernel's link stats).
pub fn link_tx_bytes(ns: &str, dev: &str) -> anyhow::Result<u64> {
    let out = sh("ip", &["-n", ns, "-j", "-s", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["tx"]["bytes"].as_u64().context("tx bytes")
}

/// A network namespace that no file names (not in any netns directory),
/// made by a process of its own (`unshare --net sleep infinity`) and
/// reached as `/proc/PID/ns/net`: what a router that discovers namespaces
/// from files cannot know. Gone with the process, killed on drop.
pub struct UnnamedNetns {
    child: std::process::Child,
    /// `/proc/PID/ns/net` of the process holding it.
    pub path: String,
}

impl UnnamedNetns {
    pub fn new() -> anyhow::Result<Self> {
        let child = std::process::Command::new("unshare")
            .args(["--net", "--", "sleep", "infinity"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("spawning unshare --net")?;
        let ns = Self {
            path: format!("/proc/{}/ns/net", child.id()),
            child,
        };
        // unshare(1) execs sleep in the new namespace: wait until its
        // namespace is not ours any more.
        let mine = std::fs::read_link("/proc/self/ns/net")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_link(&ns.path)? == mine {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "unshare --net did not make a namespace"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        sh(
            "nsenter",
            &[
                &format!("--net={}", ns.path),
                "ip",
                "link",
                "set",
                "lo",
                "up",
            ],
        )?;
        Ok(ns)
    }

    /// The process holding it (for `ip netns attach NAME PID`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for UnnamedNetns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory of network namespace files of one test, e.g. a router's
/// `--netns-dir` that sees none of the namespaces of other tests: each file
/// is a bind mount of a new namespace, made as `ip netns add` makes them
/// (the file first, then the mount), and removed as `ip netns del` removes
/// them (detach, unlink). On drop, every file left is removed, then the
/// directory.
pub struct NetnsDir {
    pub path: std::path::PathBuf,
}

impl NetnsDir {
    /// `/run/<name>`, created empty.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let path = std::path::PathBuf::from("/run").join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn file(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }

    /// A new namespace per name, named by a file in this directory. One
    /// thread of this process makes them all: `unshare(CLONE_NEWNET)`
    /// moves only the calling thread, which then exits.
    pub fn add(&self, names: &[String]) -> anyhow::Result<()> {
        let files: Vec<String> = names.iter().map(|n| self.file(n)).collect();
        std::thread::spawn(move || -> anyhow::Result<()> {
            use nix::{
                mount::{MsFlags, mount},
                sched::{CloneFlags, unshare},
            };
            for f in &files {
                std::fs::File::create_new(f).with_context(|| format!("creating {f}"))?;
                unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    f.as_str(),
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .with_context(|| format!("bind mount of a new namespace on {f}"))?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    }

    /// Name an existing namespace (`/proc/PID/ns/net`, another namespace
    /// file) by a new file in this directory, as `ip netns attach` does.
    pub fn attach(&self, name: &str, netns_file: &str) -> anyhow::Result<()> {
        let f = self.file(name);
        std::fs::File::create_new(&f).with_context(|| format!("creating {f}"))?;
        nix::mount::mount(
            Some(netns_file),
            f.as_str(),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind mount of {netns_file} on {f}"))?;
        Ok(())
    }

    /// Remove these namespaces' files (the namespaces go when nothing
    /// else holds them).
    pub fn del(&self, names: &[String]) -> anyhow::Result<()> {
        for n in names {
            let f = self.file(n);
            nix::mount::umount2(f.as_str(), nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("umount {f}"))?;
            std::fs::remove_file(&f).with_context(|| format!("rm {f}"))?;
        }
        Ok(())
    }
}

impl Drop for NetnsDir {
    fn drop(&mut self) {
        if let Ok(dir) = std::fs::read_dir(&self.path) {
            for e in dir.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
