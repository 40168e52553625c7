//! nghttp2's tools as peers: nghttpd servers in pods, h2load clients.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::Context;

/// nghttpd (Debian nghttp2-server, h2c with prior knowledge) in pod
/// namespaces, serving a document root with `index` (256 bytes); killed on
/// drop.
pub struct Nghttpd {
    pub(crate) children: Vec<Child>,
    pub docroot: PathBuf,
}

impl Drop for Nghttpd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.docroot);
    }
}

/// The summary of an h2load run ("requests: N total, N started, N done,
/// N succeeded, N failed, N errored, N timeout" and "status codes").
#[derive(Debug, Clone, Default)]
pub struct H2load {
    pub total: u64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    pub status_2xx: u64,
    pub output: String,
}

impl H2load {
    /// Its "requests:" and "status codes:" lines.
    pub fn summary(&self) -> String {
        self.output
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("requests:") || l.starts_with("status codes:"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn parse(output: &str) -> anyhow::Result<Self> {
        let line = |prefix: &str| {
            output
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned))
        };
        let reqs = line("requests:").with_context(|| format!("no requests line: {output}"))?;
        let field = |text: &str, name: &str| -> u64 {
            text.split(',')
                .find_map(|p| {
                    let mut it = p.split_whitespace();
                    let n = it.next()?;
                    (it.next()? == name).then(|| n.parse().ok())?
                })
                .unwrap_or(0)
        };
        let status = line("status codes:").unwrap_or_default();
        Ok(Self {
            total: field(&reqs, "total"),
            started: field(&reqs, "started"),
            done: field(&reqs, "done"),
            succeeded: field(&reqs, "succeeded"),
            failed: field(&reqs, "failed"),
            errored: field(&reqs, "errored"),
            timeout: field(&reqs, "timeout"),
            status_2xx: field(&status, "2xx"),
            output: output.to_owned(),
        })
    }
}

/// Start h2load in namespace `ns` (joining `cgroup` first, so it is
/// balanced by the agent); wait for it with [`h2load_wait`].
pub fn h2load_spawn(ns: &str, cgroup: Option<&Path>, args: &[&str]) -> anyhow::Result<Child> {
    let mut cmd = Command::new("sh");
    match cgroup {
        Some(cg) => {
            cmd.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
                .arg(cg);
        }
        None => {
            cmd.args(["-c", "exec \"$@\"", "sh"]);
        }
    }
    cmd.args(["ip", "netns", "exec", ns, "h2load"]).args(args);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting h2load (cargo xtask setup installs nghttp2-client)")
}

pub fn h2load_wait(child: Child) -> anyhow::Result<H2load> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "h2load failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    H2load::parse(&text)
}
