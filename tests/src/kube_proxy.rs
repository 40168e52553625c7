//! kube-proxy emulated: its iptables rule shape, the baseline the agent is
//! compared with.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use anyhow::Context;

use crate::netns::Netns;

/// kube-proxy's rule shape for one service port, for an iptables-restore
/// `nat` table: KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* with
/// `statistic --mode random --probability 1/(n-i)`, DNAT in each SEP.
pub fn kube_proxy_rules(vip: &str, port: u16, backends: &[(String, u16)]) -> String {
    kube_proxy_services(&[(vip, port, backends)])
}

/// A service port for [`kube_proxy_services`]: VIP, port, backends.
pub type KubeService<'a> = (&'a str, u16, &'a [(String, u16)]);

/// The same for several service ports in one table.
pub fn kube_proxy_services(services: &[KubeService<'_>]) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::from("-A OUTPUT -j KUBE-SERVICES\n");
    for (si, (vip, port, backends)) in services.iter().enumerate() {
        let svc = format!("KUBE-SVC-TESTSVC{si:08}");
        chains += &format!(":{svc} - [0:0]\n");
        rules += &format!("-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport {port} -j {svc}\n");
        let n = backends.len();
        for (i, (addr, bport)) in backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-TEST{si:04}SEP{i:04}");
            chains += &format!(":{sep} - [0:0]\n");
            if i + 1 < n {
                let p = 1.0 / (n - i) as f64;
                rules += &format!(
                    "-A {svc} -m statistic --mode random --probability {p:.11} -j {sep}\n"
                );
            } else {
                rules += &format!("-A {svc} -j {sep}\n");
            }
            rules += &format!("-A {sep} -p tcp -m tcp -j DNAT --to-destination {addr}:{bport}\n");
        }
    }
    chains + &rules + "COMMIT\n"
}

/// Install kube-proxy-shaped rules in `ns` (which needs a route to the VIP).
pub fn install_kube_proxy(ns: &Netns, rules: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("iptables-restore (install iptables: cargo xtask setup)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "iptables-restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
