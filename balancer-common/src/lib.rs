//! Types shared by the kernel programs and the agent, and the pure backend
//! selection logic that both run.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and no
//! `bool`, and its size is asserted, so the kernel and the agent can never
//! disagree on a layout. Addresses are stored as four raw 32-bit words in
//! network byte order, exactly as the kernel hands them to `cgroup/connect6`;
//! IPv4 addresses use the IPv4-mapped IPv6 form `::ffff:a.b.c.d`, so one
//! service map serves both families and IPv4-mapped connects on IPv6 sockets
//! hit the IPv4 service naturally (the codec is [`addr`]).
#![no_std]

pub mod addr;
pub mod h2frame;
pub mod select;

/// Names of the maps in the eBPF object; the agent looks them up by these.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const SLOTS: &str = "SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const SERVICE_STATE: &str = "SERVICE_STATE";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SOCK_STATE: &str = "SOCK_STATE";
    pub const CONFIG: &str = "CONFIG";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const SOCKS: &str = "SOCKS";
    pub const SPLICE: &str = "SPLICE";
    pub const AFFINITY: &str = "AFFINITY";
    pub const GENERATION: &str = "GENERATION";
    pub const ROUTER_LISTENERS: &str = "ROUTER_LISTENERS";
    pub const SERVED_NETNS: &str = "SERVED_NETNS";
    pub const BALANCED: &str = "BALANCED";
}

/// Capacity of `BALANCED`: open client sockets that connect() balanced to
/// a backend, tracked so the agent can end those of a removed endpoint.
pub const MAX_BALANCED: u32 = 65_536;

/// Capacity of `SERVED_NETNS`: client network namespaces the router can
/// serve at once (a node runs at most a few hundred pods).
pub const MAX_SERVED_NETNS: u32 = 16_384;

/// Map capacities. The agent refuses a desired state that does not fit
/// rather than letting a map insert fail half way through an update.
pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_BACKENDS: u32 = 262_144;
pub const MAX_SLOTS: u32 = 262_144;
/// Backends per service port (slots are numbered `0..count`).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 4_096;

/// Protocol numbers used in [`ServiceKey::proto`].
pub const PROTO_TCP: u8 = 6;

/// Key of the `SERVICES` map: a VIP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// VIP, network-order words; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// VIP port, network byte order (as in `bpf_sock_addr.user_port`).
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// Selection algorithm of a service port, stored in [`ServiceValue::algorithm`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Random = 0,
    RoundRobin = 1,
    LeastConn = 2,
    /// An http2 port whose streams the router spreads by least-request;
    /// its connections, when they are balanced in the kernel (no router),
    /// go by least-conn. Stored as its own value so that an agent that
    /// adopts the maps reads back what was written. Programs of earlier
    /// builds treat it as an unknown value: least-conn too.
    LeastRequest = 3,
}

impl Algorithm {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Random),
            1 => Some(Self::RoundRobin),
            2 => Some(Self::LeastConn),
            3 => Some(Self::LeastRequest),
            _ => None,
        }
    }
}

/// Value of the `SERVICES` map.
///
/// `backend_count` is the publication point of an update: the agent writes
/// slots `0..n` first and this value last, so a reader that sees count `n`
/// finds every slot below `n` filled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Stable id of this VIP:port, the first half of every [`SlotKey`].
    pub id: u32,
    /// Number of usable backends; 0 means connect() gets ECONNREFUSED.
    pub backend_count: u32,
    /// An [`Algorithm`] as `u8`.
    pub algorithm: u8,
    /// A [`Mode`] as `u8`.
    pub mode: u8,
    pub _pad: [u8; 2],
    /// sessionAffinity ClientIP: seconds a client sticks to its backend;
    /// 0 = no affinity.
    pub affinity_timeout_s: u32,
}

/// How a service port is balanced, stored in [`ServiceValue::mode`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// connect() goes straight to a backend (L4).
    Tcp = 0,
    /// connect() goes to the agent's HTTP/2 frame router, which balances
    /// every stream; if no router is configured, as `Tcp`.
    Http2 = 1,
}

/// Key of the `AFFINITY` LRU map: a client (its network namespace, which
/// is the pod and so the pod IP; the node for host-network clients) and a
/// service. connect() cannot use the source IP: it is not bound yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

/// Value of the `AFFINITY` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last connect that used it.
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// The single entry of the `CONFIG` array: where the router listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Router address for IPv4 VIPs, network-order words, IPv4-mapped; all
    /// zero when there is none.
    pub router4: [u32; 4],
    /// Router address for IPv6 VIPs; all zero when there is none.
    pub router6: [u32; 4],
    /// Router port, network byte order; 0 = no router.
    pub router_port: u16,
    /// 1: splice client and router sockets through the `SPLICE` sockhash
    /// (`run --splice`), see [`SpliceKey`].
    pub splice: u8,
    /// 1: the router's listening sockets are seen by `sock_ops` (the
    /// router runs in the attached cgroup, as in the DaemonSet), and
    /// [`ROUTER_LISTENERS`](map_names::ROUTER_LISTENERS) counts them: http2
    /// ports are steered only while one is open, so a router that dies
    /// sends new connections to L4 at once, not a second later.
    pub track_listeners: u8,
    /// Whose address the router's pod connections carry (see
    /// [`Identity`]): with [`Identity::Pod`], http2 ports are steered to
    /// the router only for clients whose network namespace cookie is in
    /// `SERVED_NETNS`; every other connection is balanced at L4, where its
    /// own address is kept.
    pub identity: u8,
    pub _pad: [u8; 3],
    /// CLOCK_MONOTONIC nanoseconds (the clock of `bpf_ktime_get_ns`) when
    /// the router process last checked in (every 250 ms while its event
    /// loop runs). Older than
    /// [`ROUTER_STALE_NS`]: http2 ports are balanced at L4 instead, so a
    /// dead router never blackholes new connections.
    pub heartbeat_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 48);

/// [`Config::identity`]: the address a pod sees for streams the router
/// carries.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// The node's (`router --source-identity node`): shared pools.
    Node = 0,
    /// The client pod's own: pod connections opened from the client's
    /// network namespace (`router --source-identity pod`, the default).
    Pod = 1,
}

/// How old the router heartbeat may be before http2 ports fall back to L4.
pub const ROUTER_STALE_NS: u64 = 1_000_000_000;

/// Key of the `ORIG_DST` map: the client end of a steered connection, as
/// the router sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 20);

/// Value of the `BALANCED` map, keyed by socket cookie: an open client
/// socket that connect() balanced to a backend, as `sock_diag` needs it to
/// end the socket (its namespace and both ends; the cookie makes sure no
/// later socket on the same addresses is hit), and the VIP it was for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BalancedSock {
    /// `bpf_get_netns_cookie` of the client socket.
    pub netns_cookie: u64,
    /// The client's own end.
    pub local: SockKey,
    /// The backend.
    pub remote: SockKey,
    /// The VIP:port the client connected to.
    pub vip: SockKey,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<BalancedSock>() == 72);

/// Key of the `SPLICE` sockhash: a socket by its own end and its peer's.
/// A steered client socket and the router's socket for it have mirrored
/// keys, so each finds the other by swapping the halves of its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SpliceKey {
    pub local: SockKey,
    pub remote: SockKey,
}
const _: () = assert!(core::mem::size_of::<SpliceKey>() == 40);

/// Value of the `ORIG_DST` map: the VIP:port the client asked for, and
/// the network namespace it connected from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct OrigDst {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
    pub _pad2: u32,
    /// The client socket's network namespace cookie
    /// (`bpf_get_netns_cookie`, the same number as the socket option
    /// `SO_NETNS_COOKIE` gives for a socket made in that namespace): the
    /// router opens the pod connections for this client's streams there.
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// Key of the `SLOTS` map: the n-th backend of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

/// Value of the `BACKENDS` map, keyed by backend id (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    /// Pod address, network-order words; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// Target port, network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Backend>() == 20);

impl Backend {
    /// True when the address is IPv4 (stored IPv4-mapped).
    pub const fn is_v4(&self) -> bool {
        addr::is_v4_mapped(&self.addr)
    }
}

/// Value of the `BACKEND_STATS` map, keyed by backend id. Updated with
/// atomic adds by `sock_ops`; read by least-conn and by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// Connections established and not yet closed.
    pub active: u64,
    /// Connections ever established.
    pub total: u64,
    /// HTTP/2 streams clients opened on L4-balanced connections to this
    /// backend (counted by sk_msg).
    pub streams: u64,
    /// Balanced connects that never established (refused, unreachable,
    /// timed out): SYN_SENT to CLOSE, seen by sock_ops.
    pub connect_failures: u64,
    /// CLOCK_MONOTONIC ns of its last failed connect, 0 once a connect to
    /// it established since: connect4/6 pass over a backend marked less
    /// than [`select::FAILED_MARK_NS`] ago (see [`select::marked`]).
    pub failed_at_ns: u64,
}
const _: () = assert!(core::mem::size_of::<BackendStats>() == 40);

/// Value of the `SERVICE_STATE` array, indexed by service id: mutable
/// per-service state the kernel owns (the round-robin cursor).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceState {
    pub cursor: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceState>() == 8);

/// Per-socket state in the `SOCK_STATE` socket storage, written by connect
/// and read by `sock_ops` and `getpeername`. It lives and dies with the
/// socket, so it can never leak or be evicted the way a cookie-keyed LRU
/// entry can.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockState {
    /// VIP the application connected to (network-order words).
    pub vip_addr: [u32; 4],
    /// VIP port, network byte order.
    pub vip_port: u16,
    /// 1 once `sock_ops` has counted this socket as active, 0 before it is
    /// counted and again after it was uncounted on close. This flag is what
    /// keeps the counts exact: a socket is decremented only if it was
    /// incremented, and at most once.
    pub counted: u8,
    /// `SOCK_STEERED` when the socket goes to the HTTP/2 router.
    pub flags: u8,
    /// Backend chosen for this socket; 0 when it was steered to the router.
    pub backend_id: u32,
    /// What sk_msg found the client sending: [`H2_UNKNOWN`], [`H2_ACTIVE`]
    /// or [`H2_NOT`].
    pub h2: u8,
    /// For a steered socket in `SPLICE`: [`SPLICE_UNDECIDED`] until its
    /// first send, then [`SPLICE_ON`] or [`SPLICE_OFF`] for good.
    pub splice: u8,
    pub _pad: [u8; 2],
    /// Highest client stream id seen opening (HEADERS).
    pub last_stream: u32,
}
const _: () = assert!(core::mem::size_of::<SockState>() == 32);

/// [`SockState::flags`]: the socket was steered to the HTTP/2 router.
pub const SOCK_STEERED: u8 = 1;
/// [`SockState::splice`]: nothing sent yet.
pub const SPLICE_UNDECIDED: u8 = 0;
/// The router's socket was in `SPLICE` at the first send: every byte goes
/// straight to its receive queue.
pub const SPLICE_ON: u8 = 1;
/// It was not (or the client did not speak HTTP/2): every byte goes through
/// TCP. Deciding once per direction is what keeps the byte order: the
/// router's socket reads spliced bytes before those in its TCP queue.
pub const SPLICE_OFF: u8 = 2;
/// [`SockState::h2`]: nothing sent yet.
pub const H2_UNKNOWN: u8 = 0;
/// The client sent the HTTP/2 preface: its frames are followed.
pub const H2_ACTIVE: u8 = 1;
/// Not HTTP/2: sk_msg leaves the socket alone.
pub const H2_NOT: u8 = 2;

/// Indexes into the `COUNTERS` per-CPU array: every decision the data path
/// takes is counted under exactly one reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() to a VIP rewritten to a backend.
    Balanced = 0,
    /// connect() to a VIP with no usable backend: ECONNREFUSED.
    NoBackend = 1,
    /// A slot or backend lookup failed (an update in flight); ECONNREFUSED.
    LookupMiss = 2,
    /// Socket storage could not be created: rewritten but not counted.
    StorageFull = 3,
    /// IPv6 VIP whose backend is IPv4 or the reverse: refused.
    FamilyMismatch = 4,
    /// sock_ops counted an established connection.
    Established = 5,
    /// sock_ops uncounted a closed connection.
    Closed = 6,
    /// getpeername() rewritten back to the VIP.
    PeerRewritten = 7,
    /// connect() to an http2 port sent to the router.
    Steered = 8,
    /// The original destination of a steered socket could not be recorded.
    OrigDstFull = 9,
    /// A balanced socket could not be added to SOCKS (its streams are not
    /// counted).
    SockmapFull = 10,
    /// HTTP/2 streams seen opening by sk_msg.
    H2Streams = 11,
    /// Backend choices by algorithm.
    SelectRandom = 12,
    SelectRoundRobin = 13,
    SelectLeastConn = 14,
    /// An http2 port balanced at L4 because the router's heartbeat is stale.
    RouterDown = 15,
    /// sessionAffinity: a client reused its backend.
    AffinityHit = 16,
    /// A direction of a client-router connection spliced (sk_msg redirect).
    SpliceOn = 17,
    /// A direction left on TCP: the peer socket was not in `SPLICE` yet at
    /// the first send, or the client does not speak HTTP/2.
    SpliceOff = 18,
    /// A socket could not be added to `SPLICE`.
    SpliceFull = 19,
    /// A balanced connect failed (see [`BackendStats::connect_failures`]).
    ConnectFailed = 20,
    /// An http2 port balanced at L4 because the router cannot serve the
    /// client's network namespace (not in `SERVED_NETNS`), so that the pod
    /// sees the client's own address.
    RouterUnserved = 21,
    /// A choice moved off a backend whose last connect failed less than
    /// a second ago (see [`select::marked`]).
    SteeredFromFailed = 22,
    /// A balanced socket established while `BALANCED` was full: it cannot
    /// be ended if its endpoint is removed.
    BalancedFull = 23,
}

/// Entries of the `COUNTERS` array: one per [`Counter`].
pub const COUNTER_COUNT: u32 = 24;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Self; COUNTER_COUNT as usize] = [
        Self::Balanced,
        Self::NoBackend,
        Self::LookupMiss,
        Self::StorageFull,
        Self::FamilyMismatch,
        Self::Established,
        Self::Closed,
        Self::PeerRewritten,
        Self::Steered,
        Self::OrigDstFull,
        Self::SockmapFull,
        Self::H2Streams,
        Self::SelectRandom,
        Self::SelectRoundRobin,
        Self::SelectLeastConn,
        Self::RouterDown,
        Self::AffinityHit,
        Self::SpliceOn,
        Self::SpliceOff,
        Self::SpliceFull,
        Self::ConnectFailed,
        Self::RouterUnserved,
        Self::SteeredFromFailed,
        Self::BalancedFull,
    ];

    /// Its name in `status` and metrics (the `decision` label). A match,
    /// not a table: a new variant does not compile without its name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Balanced => "balanced",
            Self::NoBackend => "no_backend",
            Self::LookupMiss => "lookup_miss",
            Self::StorageFull => "storage_full",
            Self::FamilyMismatch => "family_mismatch",
            Self::Established => "established",
            Self::Closed => "closed",
            Self::PeerRewritten => "peer_rewritten",
            Self::Steered => "steered",
            Self::OrigDstFull => "orig_dst_full",
            Self::SockmapFull => "sockmap_full",
            Self::H2Streams => "h2_streams",
            Self::SelectRandom => "select_random",
            Self::SelectRoundRobin => "select_round_robin",
            Self::SelectLeastConn => "select_least_conn",
            Self::RouterDown => "router_down",
            Self::AffinityHit => "affinity_hit",
            Self::SpliceOn => "splice_on",
            Self::SpliceOff => "splice_off",
            Self::SpliceFull => "splice_full",
            Self::ConnectFailed => "connect_failed",
            Self::RouterUnserved => "router_unserved",
            Self::SteeredFromFailed => "steered_from_failed",
            Self::BalancedFull => "balanced_full",
        }
    }
}

/// The enum, [`Counter::ALL`] and the kernel array agree: `ALL` has
/// `COUNTER_COUNT` entries and entry `i` is the variant with index `i`, so
/// the indexes are exactly `0..COUNTER_COUNT` and each is listed once.
const fn counters_agree() -> bool {
    let mut i = 0;
    while i < Counter::ALL.len() {
        if Counter::ALL[i] as usize != i {
            return false;
        }
        i += 1;
    }
    Counter::ALL.len() == COUNTER_COUNT as usize
}
const _: () = assert!(counters_agree(), "Counter::ALL out of index order");

#[cfg(test)]
mod counter_tests {
    use super::Counter;

    #[test]
    fn counter_names_are_distinct_label_values() {
        let mut names = Counter::ALL.map(Counter::name);
        assert!(names.iter().all(|n| {
            n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        }));
        names.sort_unstable();
        assert!(names.windows(2).all(|w| w[0] != w[1]), "{names:?}");
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type below is `#[repr(C)]`, `Copy`, made only of integers
    // and explicit padding fields, so any bit pattern is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for ServiceState {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for SpliceKey {}
    unsafe impl aya::Pod for BalancedSock {}
}
