//! The admin API's wire schema: the requests, the answer envelope, and
//! every view the agent and the router answer with. The CLI, the agent and
//! the router speak it over `admin.rs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dataplane::{Attached, MapFill};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Services,
    Endpoints {
        name: Option<String>,
    },
    /// The router process: its listener, table and connections.
    RouterStatus,
    /// The router process: streams and latency per endpoint.
    RouterEndpoints,
    /// The router process: a duplicate of its listening socket, passed
    /// with the answer (SCM_RIGHTS), for the agent to hold.
    RouterListener,
    /// The agent: the listener it holds for `listen`, if any, passed with
    /// the answer; a router that starts adopts it (and so the connections
    /// queued on it while no router ran).
    HeldListener {
        listen: std::net::SocketAddr,
    },
}

/// The envelope of every answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// The answer to `router-listener` and `held-listener` (when held): the
/// listening socket's inode; the socket itself is passed with the answer
/// (SCM_RIGHTS).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ListenerView {
    pub inode: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramView {
    pub name: String,
    pub attach_type: String,
    /// What the kernel reports (BPF_PROG_QUERY), not what the agent did.
    pub attached: bool,
    /// Kernel ids of the programs attached there.
    #[serde(default)]
    pub ids: Vec<u32>,
    /// Why the kernel could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Programs of others that run at the same hook for the cgroup.
    #[serde(default)]
    pub others: Vec<OtherProgramView>,
}

/// A program of someone else's on one of the agent's hooks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OtherProgramView {
    pub id: u32,
    pub name: String,
    /// It runs before the agent's program.
    pub before: bool,
}

impl From<&Attached> for ProgramView {
    fn from(p: &Attached) -> Self {
        let (ids, error) = match &p.ids {
            Ok(ids) => (ids.clone(), None),
            Err(e) => (Vec::new(), Some(e.clone())),
        };
        Self {
            name: p.name.into(),
            attach_type: p.attach_type.into(),
            attached: !ids.is_empty(),
            ids,
            error,
            others: p
                .others
                .iter()
                .map(|o| OtherProgramView {
                    id: o.id,
                    name: o.name.clone(),
                    before: o.before,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapView {
    pub name: String,
    pub entries: usize,
    pub max_entries: u32,
}

impl From<MapFill> for MapView {
    fn from(m: MapFill) -> Self {
        Self {
            name: m.name.into(),
            entries: m.entries,
            max_entries: m.max_entries,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadView {
    /// Loads attempted, the first included.
    pub attempts: u64,
    /// Loads that were applied.
    pub applied: u64,
    pub ok: bool,
    /// Unix time, milliseconds.
    pub at_unix_ms: u64,
    #[serde(default)]
    pub error: Option<String>,
    pub services: usize,
    pub frontends: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceView {
    pub kind: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub cgroup: String,
    pub programs: Vec<ProgramView>,
    pub maps: Vec<MapView>,
    pub source: SourceView,
    pub last_reload: ReloadView,
    pub counters: BTreeMap<String, u64>,
    /// The kubernetes source's view of the apiserver.
    #[serde(default)]
    pub apiserver: Option<ApiserverState>,
    /// Pin directory, when the data path is pinned.
    #[serde(default)]
    pub pins: Option<String>,
    /// This agent adopted an earlier agent's pinned data path.
    #[serde(default)]
    pub adopted: bool,
    /// The routing table's generation in the maps (even when complete).
    #[serde(default)]
    pub generation: u64,
    /// `tcp` backends failure accrual has taken out now (failed connects).
    #[serde(default)]
    pub l4_ejected: usize,
    #[serde(default)]
    pub l4_ejections: u64,
    /// The HTTP/2 router, as the kernel sees it (CONFIG) and as it
    /// answers on its socket.
    #[serde(default)]
    pub router: Option<RouterView>,
    /// Connections of removed endpoints ended by the agent (`run
    /// --end-removed-connections`); None when turned off.
    #[serde(default)]
    pub removed_connections: Option<RemovedConnectionsView>,
}

/// What became of the balanced connections of removed endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedConnectionsView {
    /// False when the agent cannot enter client pods' namespaces (no
    /// CAP_SYS_ADMIN): only hostNetwork clients' connections are ended.
    pub enters_namespaces: bool,
    /// Per service (namespace/name).
    pub services: BTreeMap<String, crate::gone::Ended>,
}

/// Where the watches stand with the apiserver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Apiserver {
    #[default]
    Connecting,
    Synced,
    Unreachable,
}

impl Apiserver {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Synced => "synced",
            Self::Unreachable => "unreachable",
        }
    }
}

/// The apiserver as the agent sees it, for `status` and metrics (the
/// kubernetes source keeps it up to date).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApiserverState {
    pub state: Apiserver,
    pub last_error: Option<String>,
    pub errors: u64,
    pub services: usize,
    pub endpoint_slices: usize,
    pub node_zone: Option<String>,
}

/// The router as the agent sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RouterView {
    /// Where it listens (from CONFIG).
    pub address: String,
    pub splice: bool,
    /// Since its last heartbeat in CONFIG.
    pub heartbeat_age_ms: u64,
    /// Heartbeat fresh: the kernel steers http2 ports to it (else they
    /// are balanced per connection).
    pub alive: bool,
    /// What it answered on its socket; `None` when it did not.
    #[serde(default)]
    pub process: Option<RouterStatusView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The router process's own status (`router-status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RouterStatusView {
    pub version: String,
    pub pid: u32,
    pub listen: String,
    pub splice: bool,
    /// The generation of the table it serves.
    pub generation: u64,
    /// http2 service ports in its table.
    pub routes: usize,
    pub client_connections: u64,
    /// Pod connections, of every origin.
    pub backend_connections: u64,
    /// Response bytes its clients make it hold (see `core::Limits`).
    #[serde(default)]
    pub held_bytes: i64,
    /// Whose address pod connections carry, and its pools per client
    /// namespace.
    #[serde(flatten)]
    pub pools: NamespacePoolsView,
    /// Accepted connections closed because their namespace could not be
    /// entered (gone since the kernel steered them).
    #[serde(default)]
    pub unserved_closed: u64,
    /// Pod connections lost because they did not answer a liveness probe.
    #[serde(default)]
    pub pod_probe_timeouts: u64,
    /// Endpoints its failure accrual has ejected now.
    #[serde(default)]
    pub ejected: usize,
    /// The inode of its listening socket (the agent holds a duplicate).
    #[serde(default)]
    pub listener_inode: u64,
    /// The last failure to read the table (it keeps serving the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_error: Option<String>,
}

/// One endpoint's counters in the router (the body of
/// [`RouterEndpointView`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndpointStats {
    pub active_streams: u64,
    pub streams_total: u64,
    pub ewma_us: u64,
    /// Streams the pod failed (connects, resets, 5xx, gRPC failures).
    #[serde(default)]
    pub failures: u64,
    /// Failures in a row now.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Times it was ejected.
    #[serde(default)]
    pub ejections: u64,
    /// Ejected now (or probing): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected: Option<String>,
    /// Until its probe, milliseconds (0 once the probe is due).
    #[serde(default)]
    pub ejected_for_ms: u64,
    /// The router's pod connections to it now, of every client namespace.
    #[serde(default)]
    pub pod_connections: u64,
}

/// One endpoint's streams through the router (`router-endpoints`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouterEndpointView {
    pub address: std::net::SocketAddr,
    #[serde(flatten)]
    pub stats: EndpointStats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortView {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
    pub protocol: String,
    pub algorithm: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointView {
    pub address: String,
    pub port: u16,
    pub zone: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Takes new connections (ready, or the serving-terminating fallback).
    pub usable: bool,
    pub active_connections: u64,
    pub connections_total: u64,
    /// Streams in flight through the HTTP/2 router (http2 ports).
    #[serde(default)]
    pub active_streams: u64,
    #[serde(default)]
    pub streams_total: u64,
    /// The router's PeakEWMA latency estimate, microseconds.
    #[serde(default)]
    pub ewma_us: u64,
    /// Streams through the router that the pod failed.
    #[serde(default)]
    pub failures: u64,
    #[serde(default)]
    pub ejections: u64,
    /// Ejected by the router's failure accrual now: why (`connect`,
    /// `reset`, `5xx`, `grpc`, `connection-lost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected: Option<String>,
    /// How long until its probe, milliseconds.
    #[serde(default)]
    pub ejected_for_ms: u64,
    /// The router's pod connections to it now, of every client namespace
    /// (http2 ports).
    #[serde(default)]
    pub router_connections: u64,
    /// Where its counts are read: the data path's backend id, and the
    /// address the router knows it by.
    #[serde(skip)]
    pub backend_id: Option<u32>,
    #[serde(skip)]
    pub socket: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub addresses: Vec<String>,
    pub ports: Vec<PortView>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainingView {
    pub address: String,
    pub port: u16,
    pub active_connections: u64,
    pub connections_total: u64,
    #[serde(skip)]
    pub backend_id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointsView {
    pub services: Vec<ServiceView>,
    /// Backends no longer in any service whose connections are still open.
    #[serde(default)]
    pub draining: Vec<DrainingView>,
    /// With a router (`run --proxy-addr`): its pools per client namespace
    /// and the http2 connections balanced at L4 instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterPoolsView>,
}

/// Whose address the router's pod connections carry and its pools per
/// client namespace: in `router-status`, and in `endpoints`' router
/// section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NamespacePoolsView {
    /// `pod` or `node` (`--source-identity`); empty in `endpoints` when
    /// the router did not answer.
    #[serde(default)]
    pub source_identity: String,
    /// Client network namespaces it can serve now (not counting its own).
    #[serde(default)]
    pub namespaces: usize,
    /// Client namespaces with pod connections of their own now.
    #[serde(default)]
    pub namespace_pools: u64,
    /// Pod connections of client namespaces (not the node's) now.
    #[serde(default)]
    pub namespace_connections: u64,
}

/// The router's pools as `endpoints` shows them, and the connections to
/// http2 ports that did not go through it, by reason.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RouterPoolsView {
    #[serde(flatten)]
    pub pools: NamespacePoolsView,
    /// Connections to http2 ports balanced at L4 instead of routed, by
    /// reason, since the data path was loaded: `router_down` (no router
    /// alive), `router_unserved` (a client namespace the router cannot
    /// enter), `unserved_closed` (closed by the router on accept: their
    /// namespace went away since the kernel steered them; they reconnect
    /// at L4).
    pub l4_by_reason: std::collections::BTreeMap<String, u64>,
}
