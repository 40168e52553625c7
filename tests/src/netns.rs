//! Network namespaces, named after their test (see [`unique_prefix`]) and
//! deleted on drop, also when the test fails.

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
