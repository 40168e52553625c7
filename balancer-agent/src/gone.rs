//! Ending the client sockets of a removed endpoint.
//!
//! When a pod's node dies, its packets vanish: a client socket connect()
//! balanced to it sees no error until TCP gives up, about 15 minutes for a
//! sender under Linux defaults, and never for an idle reader without
//! keepalive. kube-proxy leaves such sockets too (its conntrack entry
//! stays). When the endpoint leaves its Services (the EndpointSlice
//! controller removes it once the node is declared dead, or the pod is
//! deleted), the agent ends those sockets itself: their owners get
//! ECONNABORTED at once and reconnect, balanced to a live pod. An endpoint
//! that is only terminating is left alone: its connections drain as
//! Kubernetes intends.
//!
//! How, and why this way:
//! - sock_ops records every balanced socket in `BALANCED` at establish
//!   (its cookie, namespace, both ends) and deletes it at close, so the
//!   agent knows which sockets to end without walking every socket of
//!   every namespace on the node.
//! - `SOCK_DESTROY` over `NETLINK_SOCK_DIAG` (CONFIG_INET_DIAG_DESTROY)
//!   ends one socket, named by its ends and its cookie (so a later socket
//!   on the same addresses is never hit), in the namespace of the netlink
//!   socket that asks. Client sockets live in their pods' namespaces, so
//!   the netlink socket is made inside each (`setns`, as the router does
//!   for client identity: CAP_SYS_ADMIN), and the request takes
//!   CAP_NET_ADMIN, which the agent has for its programs.
//! - The kernel answers by aborting the socket: its owner's next call
//!   fails with ECONNABORTED (a blocked read wakes with it), and a RST is
//!   sent to the pod, which is gone anyway.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use balancer_common::{BalancedSock, addr::is_v4_mapped};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
    setsockopt, socket, sockopt,
};
use serde::{Deserialize, Serialize};

use crate::router::netns::{Namespaces, NetnsError};

/// `SOCK_DESTROY` (linux/sock_diag.h).
const SOCK_DESTROY: u16 = 21;
/// `NLMSG_ERROR`: the kernel's answer to a request with `NLM_F_ACK`.
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// An `nlmsghdr` and an `inet_diag_req_v2`.
const REQUEST_LEN: usize = 16 + 56;
/// How long the kernel may take to answer one request (it answers at
/// once; this only bounds a broken kernel).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum GoneError {
    #[error("opening a sock_diag socket: {0}")]
    Socket(nix::Error),
    #[error("asking sock_diag to end a socket: {0}")]
    Send(nix::Error),
    #[error("reading sock_diag's answer: {0}")]
    Recv(nix::Error),
    #[error("sock_diag answered with a message of type {0}, not an acknowledgement")]
    Answer(u16),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// What became of the sockets of removed endpoints, as counted since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// Ended by the agent: their owners saw ECONNABORTED.
    pub ended: u64,
    /// Closed by their owners before the agent got to them.
    pub already_closed: u64,
    /// In a namespace the agent cannot enter (no file for it in
    /// `--netns-dir`, or no CAP_SYS_ADMIN): left to TCP.
    pub unreachable: u64,
    /// The kernel refused to end them (see the agent's log).
    pub failed: u64,
}

impl Ended {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Ended => self.ended += 1,
            Outcome::AlreadyClosed => self.already_closed += 1,
            Outcome::Unreachable => self.unreachable += 1,
            Outcome::Failed => self.failed += 1,
        }
    }
}

/// What became of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ended,
    AlreadyClosed,
    Unreachable,
    Failed,
}

/// Ends balanced client sockets, each in its own network namespace.
pub struct Ender {
    /// None: this process cannot enter namespaces; only the sockets of
    /// its own (hostNetwork clients) can be ended.
    namespaces: Option<Namespaces>,
    own_cookie: u64,
}

impl Ender {
    /// An ender for the namespaces under `netns_dir`. Without the power to
    /// enter namespaces it still ends the node's own sockets, and says so.
    pub fn new(netns_dir: PathBuf) -> Result<Self, GoneError> {
        match Namespaces::new(netns_dir.clone()) {
            Ok(ns) => Ok(Self {
                own_cookie: ns.own_cookie(),
                namespaces: Some(ns),
            }),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    dir = %netns_dir.display(),
                    "cannot enter client network namespaces (needs CAP_SYS_ADMIN and a seccomp \
                     profile that allows setns): the connections of a removed endpoint are \
                     ended only for hostNetwork clients; pass --end-removed-connections=false \
                     to say this is intended"
                );
                Ok(Self {
                    namespaces: None,
                    own_cookie: crate::router::netns::cookie_here()?,
                })
            }
        }
    }

    /// Whether client pods' namespaces can be entered.
    pub fn enters_namespaces(&self) -> bool {
        self.namespaces.is_some()
    }

    /// End `sockets` (by cookie), grouped by namespace: one netlink socket
    /// per namespace, one request per socket.
    pub fn end(&self, sockets: &[(u64, BalancedSock)]) -> Vec<Outcome> {
        let mut by_ns: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, (_, s)) in sockets.iter().enumerate() {
            by_ns.entry(s.netns_cookie).or_default().push(i);
        }
        let wanted: HashSet<u64> = by_ns
            .keys()
            .copied()
            .filter(|c| *c != self.own_cookie)
            .collect();
        let handles: HashMap<u64, OwnedFd> = match &self.namespaces {
            Some(ns) if !wanted.is_empty() => ns.find(&wanted),
            _ => HashMap::new(),
        };
        let mut out = vec![Outcome::Unreachable; sockets.len()];
        for (cookie, idx) in by_ns {
            let diag = if cookie == self.own_cookie {
                diag_socket()
            } else {
                match (&self.namespaces, handles.get(&cookie)) {
                    (Some(ns), Some(fd)) => ns
                        .run_in(std::os::fd::AsFd::as_fd(fd), diag_socket)
                        .map_err(GoneError::from)
                        .and_then(|r| r),
                    _ => {
                        tracing::warn!(
                            netns_cookie = cookie,
                            sockets = idx.len(),
                            "a removed endpoint's connections are in a network namespace \
                             with no file in --netns-dir: left to TCP"
                        );
                        continue;
                    }
                }
            };
            let diag = match diag {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(netns_cookie = cookie, error = %e, "cannot end a removed endpoint's connections");
                    for i in idx {
                        out[i] = Outcome::Failed;
                    }
                    continue;
                }
            };
            for (seq, i) in idx.into_iter().enumerate() {
                let (sock_cookie, s) = &sockets[i];
                out[i] = match destroy(&diag, seq as u32 + 1, *sock_cookie, s) {
                    Ok(0) => Outcome::Ended,
                    // The owner closed it first (ENOENT), or the
                    // addresses now belong to a newer socket (ESTALE).
                    Ok(e) if e == -libc::ENOENT || e == -libc::ESTALE => Outcome::AlreadyClosed,
                    Ok(e) => {
                        tracing::warn!(
                            error = %std::io::Error::from_raw_os_error(-e),
                            "the kernel refused to end a removed endpoint's connection \
                             (SOCK_DESTROY needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY)"
                        );
                        Outcome::Failed
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot end a removed endpoint's connection");
                        Outcome::Failed
                    }
                };
            }
        }
        out
    }
}

/// Count `outcomes` of `sockets` per service: the VIP each socket was for,
/// named by `service_of`.
pub fn tally(
    sockets: &[(u64, BalancedSock)],
    outcomes: &[Outcome],
    service_of: impl Fn(std::net::SocketAddr) -> Option<String>,
    into: &mut BTreeMap<String, Ended>,
) {
    for ((_, s), o) in sockets.iter().zip(outcomes) {
        let vip = std::net::SocketAddr::new(
            balancer_common::addr::words_addr(s.vip.addr),
            u16::from_be(s.vip.port),
        );
        let name = service_of(vip).unwrap_or_else(|| vip.to_string());
        into.entry(name).or_default().add(*o);
    }
}

/// A `NETLINK_SOCK_DIAG` socket in the calling thread's namespace.
fn diag_socket() -> Result<OwnedFd, GoneError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(GoneError::Socket)?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0),
    )
    .map_err(GoneError::Socket)?;
    Ok(fd)
}

/// Ask the kernel to end one socket; its answer: 0 or a negative errno.
fn destroy(diag: &OwnedFd, seq: u32, cookie: u64, s: &BalancedSock) -> Result<i32, GoneError> {
    let req = destroy_request(seq, cookie, s);
    sendto(
        diag.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(GoneError::Send)?;
    let mut buf = [0u8; 512];
    loop {
        let n = recv(diag.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(GoneError::Recv)?;
        match parse_ack(&buf[..n]) {
            Some((got, code)) if got == seq => return Ok(code),
            // An answer to an earlier request that timed out: skip it.
            Some(_) => continue,
            None => {
                let ty = if n >= 6 {
                    u16::from_ne_bytes([buf[4], buf[5]])
                } else {
                    0
                };
                return Err(GoneError::Answer(ty));
            }
        }
    }
}

/// An `nlmsghdr` + `inet_diag_req_v2` asking to destroy the TCP socket
/// `s` whose cookie is `cookie`. Addresses and ports are copied as the
/// bytes they are in memory (network order); the header in host order.
fn destroy_request(seq: u32, cookie: u64, s: &BalancedSock) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&SOCK_DESTROY.to_ne_bytes());
    b[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // b[12..16]: the port id, 0 = the kernel.
    // A v4 connection (a v4 socket, or a v6 one to a v4-mapped address)
    // is found under AF_INET with plain v4 addresses.
    let v4 = is_v4_mapped(&s.local.addr) && is_v4_mapped(&s.remote.addr);
    b[16] = if v4 {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    };
    b[17] = libc::IPPROTO_TCP as u8;
    // b[18] extensions, b[19] padding.
    b[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    // inet_diag_sockid: sport, dport, src[4], dst[4], if, cookie[2].
    b[24..26].copy_from_slice(&s.local.port.to_ne_bytes());
    b[26..28].copy_from_slice(&s.remote.port.to_ne_bytes());
    let put = |b: &mut [u8], words: [u32; 4]| {
        if v4 {
            b[0..4].copy_from_slice(&words[3].to_ne_bytes());
        } else {
            for (i, w) in words.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
        }
    };
    put(&mut b[28..44], s.local.addr);
    put(&mut b[44..60], s.remote.addr);
    // b[60..64]: the interface, any.
    b[64..68].copy_from_slice(&(cookie as u32).to_ne_bytes());
    b[68..72].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    b
}

/// The sequence number and error code of an `NLMSG_ERROR` answer.
fn parse_ack(m: &[u8]) -> Option<(u32, i32)> {
    if m.len() < 20 || u16::from_ne_bytes([m[4], m[5]]) != NLMSG_ERROR {
        return None;
    }
    let seq = u32::from_ne_bytes(m[8..12].try_into().ok()?);
    let code = i32::from_ne_bytes(m[16..20].try_into().ok()?);
    Some((seq, code))
}

/// Whether balanced socket `s` goes to an endpoint its Service no longer
/// lists: its VIP:port is a port of a Service in `state` and its backend's
/// address is none of that Service's endpoints (whatever their
/// conditions). What an agent that adopted the data path ends once it has
/// the whole state: endpoints removed while no agent ran. A socket whose
/// VIP is no Service's any more is kept, as when a Service is deleted.
pub fn orphaned(state: &crate::state::DesiredState, s: &BalancedSock) -> bool {
    let vip = balancer_common::addr::words_addr(s.vip.addr);
    let port = u16::from_be(s.vip.port);
    let backend = balancer_common::addr::words_addr(s.remote.addr);
    state
        .services
        .iter()
        .find(|svc| svc.addresses.contains(&vip) && svc.ports.iter().any(|p| p.port == port))
        .is_some_and(|svc| !svc.endpoints.iter().any(|e| e.address == backend))
}

/// The addresses of endpoints that left their Services between `old` and
/// `new`: in a Service before, in no Service now, whatever their
/// conditions (an endpoint still listed as terminating, or not ready, is
/// not gone). The endpoints of a Service that was itself deleted are not
/// counted: deleting or recreating a Service is not a sign its pods died,
/// and L4 keeps those connections too.
pub fn removed_endpoints(
    old: &crate::state::DesiredState,
    new: &crate::state::DesiredState,
) -> HashSet<IpAddr> {
    let present: HashSet<IpAddr> = new
        .services
        .iter()
        .flat_map(|s| s.endpoints.iter().map(|e| e.address))
        .collect();
    let new_by_name: HashMap<&str, &crate::state::ServiceSpec> =
        new.services.iter().map(|s| (s.name.as_str(), s)).collect();
    old.services
        .iter()
        .filter(|s| new_by_name.contains_key(s.name.as_str()))
        .flat_map(|s| s.endpoints.iter().map(|e| e.address))
        .filter(|a| !present.contains(a))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DesiredState, EndpointSpec, ServiceSpec};

    fn svc(name: &str, eps: &[(&str, bool)]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            affinity_timeout_s: 0,
            addresses: vec!["10.96.0.1".parse().expect("ip")],
            ports: vec![],
            endpoints: eps
                .iter()
                .map(|(a, terminating)| EndpointSpec {
                    address: a.parse().expect("ip"),
                    zone: None,
                    ready: !terminating,
                    serving: true,
                    terminating: *terminating,
                    target_ports: Default::default(),
                })
                .collect(),
        }
    }

    #[test]
    fn only_endpoints_that_left_every_service_of_a_service_that_stays_are_removed() {
        let old = DesiredState {
            services: vec![
                svc(
                    "a",
                    &[
                        ("10.0.0.1", false),
                        ("10.0.0.2", false),
                        ("10.0.0.3", false),
                    ],
                ),
                svc("b", &[("10.0.0.4", false)]),
                svc("deleted", &[("10.0.0.5", false)]),
            ],
        };
        let new = DesiredState {
            services: vec![
                // .2 terminating: kept; .3 gone from a but still in b.
                svc("a", &[("10.0.0.1", false), ("10.0.0.2", true)]),
                svc("b", &[("10.0.0.3", false)]),
            ],
        };
        let gone = removed_endpoints(&old, &new);
        let want: HashSet<IpAddr> = ["10.0.0.4".parse().expect("ip")].into();
        assert_eq!(gone, want, "b's .4 left; .5's Service was deleted");
    }

    #[test]
    fn a_socket_is_orphaned_when_its_service_stays_and_no_longer_lists_its_backend() {
        use crate::state::{Algorithm, PortSpec, Protocol};
        let v4 = |a: [u8; 4]| balancer_common::addr::v4_mapped(u32::from_ne_bytes(a));
        let sock = |vip: [u8; 4], port: u16, backend: [u8; 4]| BalancedSock {
            vip: balancer_common::SockKey {
                addr: v4(vip),
                port: port.to_be(),
                _pad: [0; 2],
            },
            remote: balancer_common::SockKey {
                addr: v4(backend),
                port: 8080u16.to_be(),
                _pad: [0; 2],
            },
            ..Default::default()
        };
        let mut web = svc("web", &[("10.0.0.1", false), ("10.0.0.2", true)]);
        web.ports = vec![PortSpec {
            name: None,
            port: 80,
            target_port: 8080,
            protocol: Protocol::Tcp,
            algorithm: Algorithm::LeastConn,
        }];
        let state = DesiredState {
            services: vec![web],
        };
        let vip = [10, 96, 0, 1];
        assert!(
            orphaned(&state, &sock(vip, 80, [10, 0, 0, 9])),
            "gone from web"
        );
        assert!(!orphaned(&state, &sock(vip, 80, [10, 0, 0, 1])), "listed");
        assert!(
            !orphaned(&state, &sock(vip, 80, [10, 0, 0, 2])),
            "terminating is listed"
        );
        assert!(
            !orphaned(&state, &sock(vip, 81, [10, 0, 0, 9])),
            "not a port of web"
        );
        assert!(
            !orphaned(&state, &sock([10, 96, 0, 2], 80, [10, 0, 0, 9])),
            "its Service was deleted: kept"
        );
    }

    #[test]
    fn a_destroy_request_names_the_socket_as_sock_diag_expects() {
        let v4 = |a: [u8; 4]| balancer_common::addr::v4_mapped(u32::from_ne_bytes(a));
        let s = BalancedSock {
            netns_cookie: 7,
            local: balancer_common::SockKey {
                addr: v4([198, 18, 2, 10]),
                port: 40000u16.to_be(),
                _pad: [0; 2],
            },
            remote: balancer_common::SockKey {
                addr: v4([198, 19, 1, 2]),
                port: 8080u16.to_be(),
                _pad: [0; 2],
            },
            ..Default::default()
        };
        let r = destroy_request(9, 0x1122_3344_5566_7788, &s);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().expect("4 bytes")), 72);
        assert_eq!(
            u16::from_ne_bytes(r[4..6].try_into().expect("4 bytes")),
            SOCK_DESTROY
        );
        assert_eq!(r[16], libc::AF_INET as u8);
        assert_eq!(r[17], 6);
        assert_eq!(&r[24..26], &40000u16.to_be_bytes());
        assert_eq!(&r[26..28], &8080u16.to_be_bytes());
        assert_eq!(&r[28..32], &[198, 18, 2, 10]);
        assert_eq!(&r[44..48], &[198, 19, 1, 2]);
        assert_eq!(
            u32::from_ne_bytes(r[64..68].try_into().expect("4 bytes")),
            0x5566_7788
        );
        assert_eq!(
            u32::from_ne_bytes(r[68..72].try_into().expect("4 bytes")),
            0x1122_3344
        );
    }
}
