//! Every map of the object and its capacity. The agent looks them up, and
//! pins them, by these names (`balancer_common::map_names`): a map's name
//! and definition are part of the pin layout.
//!
//! Programs do not touch these directly where a named lookup exists in
//! [`crate::helpers`].

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SkStorage, SockHash},
    macros::btf_map,
};
use balancer_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, BalancedSock, COUNTER_COUNT, Config,
    MAX_BACKENDS, MAX_BALANCED, MAX_SERVED_NETNS, MAX_SERVICES, MAX_SLOTS, OrigDst, ServiceKey,
    ServiceState, ServiceValue, SlotKey, SockKey, SockState, SpliceKey,
};

const MAX_SERVICES_USIZE: usize = MAX_SERVICES as usize;

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, MAX_SERVICES_USIZE> = HashMap::new();
#[btf_map]
pub static SLOTS: HashMap<SlotKey, u32, { MAX_SLOTS as usize }> = HashMap::new();
#[btf_map]
pub static BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }> = HashMap::new();
#[btf_map]
pub static BACKEND_STATS: HashMap<u32, BackendStats, { MAX_BACKENDS as usize }> = HashMap::new();
#[btf_map]
pub static SERVICE_STATE: Array<ServiceState, MAX_SERVICES_USIZE> = Array::new();
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();
#[btf_map]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();
/// Written by the router process (`balancer-agent router`): where it
/// listens, and its heartbeat.
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();
/// The routing table's generation, a seqlock that no program reads: the
/// agent makes it odd before it writes SERVICES, SLOTS and BACKENDS and
/// even after; the router process re-reads the table when it changes.
#[btf_map]
pub static GENERATION: Array<u64, 1> = Array::new();
/// The router's listening sockets open now (on CONFIG's address), counted
/// by sock_ops from listen() to close: the kernel learns that a router
/// died the moment its process does (see `Config::track_listeners`).
#[btf_map]
pub static ROUTER_LISTENERS: Array<u64, 1> = Array::new();
/// Original destination of connections steered to the router, keyed by the
/// client's address as the router sees it. Entries are deleted when the
/// client socket closes; LRU only as a backstop.
#[btf_map]
pub static ORIG_DST: LruHashMap<SockKey, OrigDst, 65_536> = LruHashMap::new();

/// Balanced client sockets, so the sk_msg program sees what they send.
/// Keyed by socket cookie; the kernel removes a socket when it closes.
#[btf_map]
pub static SOCKS: SockHash<u64, 65_536> = SockHash::new();

/// Client sockets steered to the router and the router's sockets for them
/// (`run --splice`), keyed by their own end and their peer's. The
/// `balancer_splice` sk_msg program moves what one sends straight into the
/// other's receive queue, skipping TCP/IP (and the veth) for that hop.
#[btf_map]
pub static SPLICE: SockHash<SpliceKey, 65_536> = SockHash::new();

/// sessionAffinity ClientIP: the backend each client last used per service.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, 65_536> = LruHashMap::new();

/// Client network namespaces (by cookie) the router can open pod
/// connections from, written by the router process: with
/// `Config::identity` = pod, an http2 connect is steered to the router
/// only from these, so no pod ever sees the node's address for a client
/// that has one of its own. The value is unused (1).
#[btf_map]
pub static SERVED_NETNS: HashMap<u64, u32, { MAX_SERVED_NETNS as usize }> = HashMap::new();

/// Open client sockets that connect() balanced to a backend (keyed by
/// socket cookie): written by sock_ops at establish, deleted at close. The
/// agent reads it when an endpoint is removed and ends that endpoint's
/// sockets with sock_diag in their own namespaces, so their owners learn
/// at once instead of after TCP's ~15 minutes of retransmissions.
#[btf_map]
pub static BALANCED: HashMap<u64, BalancedSock, { MAX_BALANCED as usize }> = HashMap::new();
