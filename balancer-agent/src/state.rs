//! The desired state every endpoint source produces, and its conversion into
//! data-path frontends (one per VIP:port) with their backend lists.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    #[default]
    Tcp,
    /// Stream-level balancing: connections go to the node's HTTP/2 router
    /// (`balancer-agent router`), which sends each stream to its own
    /// endpoint. While no router is alive (none configured, or its
    /// heartbeat is stale) they are balanced per connection in the kernel,
    /// like `tcp`.
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    Random,
    RoundRobin,
    #[default]
    LeastConn,
    /// Per stream, for http2 ports: P2C over outstanding streams weighted by
    /// a PeakEWMA latency estimate. The kernel falls back to least-conn.
    LeastRequest,
}

/// The three `Algorithm`s (this one of the desired state, the kernel's in
/// `balancer_common`, the router's per stream in `balancer_router`)
/// convert with `From` only: desired state <-> kernel here, kernel ->
/// router in `balancer_router::endpoint` (only that crate may implement it).
impl From<Algorithm> for balancer_common::Algorithm {
    fn from(a: Algorithm) -> Self {
        match a {
            Algorithm::Random => Self::Random,
            Algorithm::RoundRobin => Self::RoundRobin,
            Algorithm::LeastConn => Self::LeastConn,
            Algorithm::LeastRequest => Self::LeastRequest,
        }
    }
}

/// Read back from the maps: what was written.
impl From<balancer_common::Algorithm> for Algorithm {
    fn from(a: balancer_common::Algorithm) -> Self {
        match a {
            balancer_common::Algorithm::Random => Self::Random,
            balancer_common::Algorithm::RoundRobin => Self::RoundRobin,
            balancer_common::Algorithm::LeastConn => Self::LeastConn,
            balancer_common::Algorithm::LeastRequest => Self::LeastRequest,
        }
    }
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::RoundRobin => "round-robin",
            Self::LeastConn => "least-conn",
            Self::LeastRequest => "least-request",
        }
    }
}

impl Protocol {
    pub fn to_kernel(self) -> balancer_common::Mode {
        match self {
            Self::Tcp => balancer_common::Mode::Tcp,
            Self::Http2 => balancer_common::Mode::Http2,
        }
    }

    /// The algorithm a port gets when the file names none.
    pub fn default_algorithm(self) -> Algorithm {
        match self {
            Self::Tcp => Algorithm::LeastConn,
            Self::Http2 => Algorithm::LeastRequest,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http2 => "http2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
    pub protocol: Protocol,
    pub algorithm: Algorithm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub address: IpAddr,
    pub zone: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Target ports resolved for this endpoint, by service port name (""
    /// for an unnamed port): what an EndpointSlice says, which is how named
    /// target ports resolve per pod. Empty for the file source. Shared by
    /// the endpoints of one slice (one map per endpoint was the largest
    /// part of the desired state of a big cluster).
    pub target_ports: std::sync::Arc<std::collections::BTreeMap<String, u16>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    /// sessionAffinity ClientIP timeout in seconds; 0 = none.
    pub affinity_timeout_s: u32,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<PortSpec>,
    pub endpoints: Vec<EndpointSpec>,
}

/// Everything the data path should serve, as one value: sources build it
/// completely (outside any lock) and the agent publishes it in one step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredState {
    pub services: Vec<ServiceSpec>,
}

/// One VIP:port of the data path and the backends it balances over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub vip: SocketAddr,
    pub algorithm: Algorithm,
    pub mode: balancer_common::Mode,
    /// sessionAffinity ClientIP timeout in seconds; 0 = none.
    pub affinity_timeout_s: u32,
    pub backends: Vec<SocketAddr>,
}

impl ServiceSpec {
    /// The endpoints that take new connections for a VIP of `v4`'s family,
    /// with kube-proxy's fallback: the ready ones; if none is ready, the
    /// serving ones that are terminating (so a rolling update of a
    /// single-replica service does not refuse connections); else none.
    pub fn usable_endpoints(&self, v4: bool) -> Vec<&EndpointSpec> {
        let family = || {
            self.endpoints
                .iter()
                .filter(move |e| e.address.is_ipv4() == v4)
        };
        let ready: Vec<_> = family().filter(|e| e.ready).collect();
        if !ready.is_empty() {
            return ready;
        }
        family().filter(|e| e.serving && e.terminating).collect()
    }
}

impl DesiredState {
    /// Frontends in a stable order (by VIP, then port).
    pub fn frontends(&self) -> Vec<Frontend> {
        let mut out = Vec::new();
        for s in &self.services {
            for vip in &s.addresses {
                let usable = s.usable_endpoints(vip.is_ipv4());
                for p in &s.ports {
                    let port_name = p.name.as_deref().unwrap_or("");
                    // The endpoint's own resolution wins; a port whose
                    // target is a name (target_port 0) has no default.
                    let mut backends: Vec<SocketAddr> = usable
                        .iter()
                        .filter_map(|e| {
                            let port = e
                                .target_ports
                                .get(port_name)
                                .copied()
                                .unwrap_or(p.target_port);
                            (port != 0).then(|| SocketAddr::new(e.address, port))
                        })
                        .collect();
                    backends.sort();
                    out.push(Frontend {
                        vip: SocketAddr::new(*vip, p.port),
                        algorithm: p.algorithm,
                        mode: p.protocol.to_kernel(),
                        affinity_timeout_s: s.affinity_timeout_s,
                        backends,
                    });
                }
            }
        }
        out.sort_by_key(|f| f.vip);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, ready: bool, serving: bool, terminating: bool) -> EndpointSpec {
        EndpointSpec {
            target_ports: Default::default(),
            address: addr.parse().expect("ip"),
            zone: None,
            ready,
            serving,
            terminating,
        }
    }

    fn svc(endpoints: Vec<EndpointSpec>) -> ServiceSpec {
        ServiceSpec {
            affinity_timeout_s: 0,
            name: "a/b".into(),
            addresses: vec!["198.19.0.1".parse().expect("ip")],
            ports: vec![PortSpec {
                name: None,
                port: 80,
                target_port: 8080,
                protocol: Protocol::Tcp,
                algorithm: Algorithm::LeastConn,
            }],
            endpoints,
        }
    }

    fn addrs(v: Vec<&EndpointSpec>) -> Vec<String> {
        v.iter().map(|e| e.address.to_string()).collect()
    }

    #[test]
    fn ready_endpoints_win() {
        let s = svc(vec![
            ep("198.18.0.1", true, true, false),
            ep("198.18.0.2", false, true, true),
            ep("198.18.0.3", false, false, false),
        ]);
        assert_eq!(addrs(s.usable_endpoints(true)), vec!["198.18.0.1"]);
    }

    #[test]
    fn falls_back_to_serving_terminating() {
        let s = svc(vec![
            ep("198.18.0.2", false, true, true),
            ep("198.18.0.3", false, false, true),
            ep("198.18.0.4", false, true, false),
        ]);
        assert_eq!(addrs(s.usable_endpoints(true)), vec!["198.18.0.2"]);
    }

    #[test]
    fn nothing_usable_means_no_backends() {
        let s = svc(vec![ep("198.18.0.3", false, false, true)]);
        assert!(s.usable_endpoints(true).is_empty());
        let st = DesiredState { services: vec![s] };
        let f = st.frontends();
        assert_eq!(f.len(), 1);
        assert!(f[0].backends.is_empty());
    }

    #[test]
    fn frontends_map_target_ports_and_families() {
        let mut s = svc(vec![
            ep("198.18.0.1", true, true, false),
            ep("fd00:18::1", true, true, false),
        ]);
        s.addresses.push("fd00:19::1".parse().expect("ip"));
        let f = DesiredState { services: vec![s] }.frontends();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].vip.to_string(), "198.19.0.1:80");
        assert_eq!(f[0].backends, vec!["198.18.0.1:8080".parse().expect("sa")]);
        assert_eq!(f[1].vip.to_string(), "[fd00:19::1]:80");
        assert_eq!(
            f[1].backends,
            vec!["[fd00:18::1]:8080".parse().expect("sa")]
        );
    }
}
