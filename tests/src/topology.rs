//! The local cluster of one test: a node namespace with a bridge, pods and
//! clients on it.
//!
//! Layout (no test traffic ever leaves the machine): a node namespace holding a bridge; pods and clients
//! on veth pairs into it. Pods live in 198.18.0.0/16 and fd00:18::/64, VIPs
//! in 198.19.0.0/16 and fd00:19::/64. No namespace has a default route, so an
//! unrewritten connect to a VIP fails with ENETUNREACH and never leaves.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    cgroup::Cgroup,
    netns::{Netns, ip, unique_prefix},
    nghttp2::Nghttpd,
    peers::{H2_PORT, H2Server, Server},
    process::{require_root, sh},
};

/// Where the agent's router listens in tests: the node's bridge address.
pub const ROUTER_ADDR: &str = "198.18.0.1:15001";

/// One pod: a namespace on the bridge with a server.
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub v4: IpAddr,
    pub v6: IpAddr,
    pub server: Option<Server>,
    pub h2: Option<H2Server>,
}

/// The local cluster of one test.
pub struct Topology {
    pub prefix: String,
    pub pods: Vec<Pod>,
    /// Client namespace balanced by the agent (its processes are in `cgroup`).
    pub client: Netns,
    /// A child of `cgroup` for the agent itself (see [`Topology::agent_cgroup`]);
    /// dropped before its parent.
    pub agent_cgroup: Option<Cgroup>,
    pub cgroup: Cgroup,
    /// Holds the bridge; dropped last.
    pub node: Netns,
    veth_seq: AtomicU32,
}

impl Topology {
    /// A cgroup below the balanced one, for the agent: there sock_ops sees
    /// the router's own sockets, as on a node where the agent attaches to
    /// the root cgroup (needed for `--splice` of both directions).
    pub fn agent_cgroup(&mut self) -> anyhow::Result<PathBuf> {
        let cg = Cgroup::new(&format!("{}/agent", self.prefix))?;
        let path = cg.path.clone();
        self.agent_cgroup = Some(cg);
        Ok(path)
    }

    /// `n` pods, each running a server on `ports`, and one client namespace.
    pub fn new(tag: &str, n: usize, ports: &[u16]) -> anyhow::Result<Self> {
        require_root();
        let prefix = unique_prefix(tag);
        let node = Netns::new(&format!("{prefix}-node"))?;
        ip(&["-n", &node.name, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &node.name, "link", "set", "br0", "up"])?;
        // The node's own address: where the agent's HTTP/2 router listens.
        ip(&[
            "-n",
            &node.name,
            "addr",
            "add",
            "198.18.0.1/16",
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            &node.name,
            "addr",
            "add",
            "fd00:18::1/64",
            "dev",
            "br0",
            "nodad",
        ])?;
        let cgroup = Cgroup::new(&prefix)?;
        let client = Netns::new(&format!("{prefix}-client"))?;
        let topo_client_v4: IpAddr = "198.18.200.1".parse()?;
        let topo_client_v6: IpAddr = "fd00:18::c8:1".parse()?;
        let mut t = Self {
            prefix: prefix.clone(),
            pods: Vec::new(),
            client,
            agent_cgroup: None,
            cgroup,
            node,
            veth_seq: AtomicU32::new(0),
        };
        t.plug(&t.client.name.clone(), topo_client_v4, topo_client_v6)?;
        for i in 0..n {
            let name = format!("pod{i}");
            let ns = Netns::new(&format!("{prefix}-{name}"))?;
            let v4: IpAddr = format!("198.18.1.{}", 10 + i).parse()?;
            let v6: IpAddr = format!("fd00:18::1:{:x}", 0x10 + i).parse()?;
            t.plug(&ns.name, v4, v6)?;
            let server = if ports.is_empty() {
                None
            } else {
                Some(Server::start(&ns.name, &name, ports)?)
            };
            t.pods.push(Pod {
                name,
                ns,
                v4,
                v6,
                server,
                h2: None,
            });
        }
        Ok(t)
    }

    /// A veth from the bridge into namespace `ns`, as eth0 with two addresses.
    pub fn plug(&self, ns: &str, v4: IpAddr, v6: IpAddr) -> anyhow::Result<()> {
        let port = format!("v{}", self.veth_seq.fetch_add(1, Ordering::SeqCst));
        let node = &self.node.name;
        ip(&[
            "-n", node, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", node, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{v4}/16"), "dev", "eth0"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// A veth from the bridge into the namespace of file `netns_file` (any
    /// namespace file: `/proc/PID/ns/net`, a bind mount outside
    /// `/run/netns`), as eth0 with two addresses; its loopback up too.
    pub fn plug_at(&self, netns_file: &str, v4: IpAddr, v6: IpAddr) -> anyhow::Result<()> {
        let port = format!("v{}", self.veth_seq.fetch_add(1, Ordering::SeqCst));
        let net = format!("--net={netns_file}");
        let inside = |args: &[&str]| -> anyhow::Result<()> {
            let mut full = vec![net.as_str(), "ip"];
            full.extend_from_slice(args);
            sh("nsenter", &full).map(|_| ())
        };
        inside(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.node.name,
        ])?;
        ip(&[
            "-n",
            &self.node.name,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        inside(&["addr", "add", &format!("{v4}/16"), "dev", "eth0"])?;
        inside(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        inside(&["link", "set", "eth0", "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// An extra client namespace (not in the agent's cgroup unless the
    /// client joins it), e.g. for the kube-proxy baseline.
    pub fn extra_client(&self, tag: &str, v4: &str, v6: &str) -> anyhow::Result<Netns> {
        let ns = Netns::new(&format!("{}-{tag}", self.prefix))?;
        self.plug(&ns.name, v4.parse()?, v6.parse()?)?;
        Ok(ns)
    }

    /// The kube-proxy baseline's client: an extra client namespace outside
    /// the agent's cgroup, with a route for service traffic (198.19.0.0/16)
    /// out of its eth0, so a connect to a VIP reaches the kube-proxy-shaped
    /// rules installed in it ([`crate::kube_proxy::install_kube_proxy`])
    /// instead of failing with ENETUNREACH.
    pub fn kube_proxy_client(&self) -> anyhow::Result<Netns> {
        let kp = self.extra_client("kp", "198.18.201.1", "fd00:18::c9:1")?;
        ip(&[
            "-n",
            &kp.name,
            "route",
            "add",
            "198.19.0.0/16",
            "dev",
            "eth0",
        ])?;
        Ok(kp)
    }

    /// Start nghttpd on `port` in every pod; it serves `/index`.
    pub fn start_nghttpd(&self, port: u16) -> anyhow::Result<Nghttpd> {
        let docroot = std::env::temp_dir().join(format!("{}-docroot", self.prefix));
        std::fs::create_dir_all(&docroot)?;
        std::fs::write(docroot.join("index"), vec![b'x'; 256])?;
        let mut n = Nghttpd {
            children: Vec::new(),
            docroot,
        };
        let root = n.docroot.display().to_string();
        for p in &self.pods {
            n.children.push(
                Command::new("ip")
                    .args([
                        "netns", "exec", &p.ns.name, "nghttpd", "--no-tls", "-d", &root,
                    ])
                    .arg(port.to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting nghttpd (cargo xtask setup installs nghttp2-server)")?,
            );
        }
        for p in &self.pods {
            Self::wait_for("nghttpd to listen", Duration::from_secs(10), || {
                let out = sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &p.ns.name,
                        "ss",
                        "-Hltn",
                        &format!("sport = :{port}"),
                    ],
                )?;
                Ok(!out.trim().is_empty())
            })?;
        }
        Ok(n)
    }

    /// Start an `lbt-h2` server on [`H2_PORT`] in every pod.
    pub fn start_h2(&mut self) -> anyhow::Result<()> {
        self.start_h2_with(&[])
    }

    /// As [`Topology::start_h2`], with more `lbt-h2 serve` arguments
    /// (`--report-peer`: each pod reports the address it sees its clients
    /// at, see [`H2Server::accepted_from`]).
    pub fn start_h2_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        for p in &mut self.pods {
            p.h2 = Some(H2Server::start_with(&p.ns.name, &p.name, H2_PORT, extra)?);
        }
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("pod")
    }

    /// Server-side active counts per pod.
    pub fn server_active(&self) -> BTreeMap<String, u64> {
        self.pods
            .iter()
            .filter_map(|p| p.server.as_ref().map(|s| (p.name.clone(), s.active())))
            .collect()
    }

    /// Wait until `cond` holds, or fail after `timeout` with `what`.
    pub fn wait_for(
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if cond()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
