//! The frame router's connection logic, without I/O.
//!
//! Every client connection and every pooled backend connection of the
//! router thread lives in one [`Core`]. The I/O tasks (the agent's
//! `router/io.rs`) hand it the bytes they read and write out what it
//! queued; the core parses frames, routes each new client stream to an
//! endpoint, and moves frames between the two hops by stream id. Header
//! blocks are validated whole ([`crate::hpack`]) and forwarded as they are:
//! the router never builds header maps.
//!
//! Files by concern, as in the `h2` crate:
//! - `client`: the client hop (frames from clients, their errors);
//! - `backend`: the backend hop (pooled connections, frames from pods);
//! - `route`: choosing an endpoint, stream ids per backend connection,
//!   retries of unprocessed streams;
//! - `pump`: moving a stream's chunks to the other hop within its
//!   windows, in either direction, and the memory budget of responses;
//! - `state`: the stream lifecycle; [`calm`]: flood detection.
//!
//! Per hop, by RFC 9113: connection and stream flow control are the
//! router's own on each side ([`crate::flow`]); stream ids on a backend
//! connection are 1, 3, 5... in the order their HEADERS go out, and the
//! connection retires when they run out; a backend's
//! MAX_CONCURRENT_STREAMS queues streams; PING and SETTINGS are answered
//! locally.
//!
//! Isolation: backend connections are shared by every client, so nothing
//! a client sends reaches one unless a conformant server would accept it
//! (every header block is decoded and checked, every frame's state and
//! window arithmetic is checked on the client's hop). A client's errors
//! and floods end its own streams or connection, never a shared one.
//!
//! Bounds: what one client can make the router hold is bounded through
//! the windows it grants pods ([`Limits::client_buffer`], plus a floor per
//! stream so no stream starves) and its own connection window, and all
//! clients together by [`Limits::buffer_limit`]; a stream with no frame
//! either way for [`Limits::stream_idle_timeout`] is reset on both hops;
//! a backend that does not send its SETTINGS within
//! [`Limits::connect_timeout`] is given up and its streams retried.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};

use crate::{
    endpoint::{Endpoint, InFlight},
    flow::{RecvWindow, SendWindow},
    frame::{self, Fragments, PeerSettings, setting},
    hpack::{LastBlock, PreAck},
    stats,
};

mod backend;
pub mod calm;
mod client;
mod pump;
mod route;
mod state;

use calm::Calm;
use state::{Recent, State};

pub type ConnId = u64;

/// Where a client connection comes from, as far as pod connections are
/// concerned: the network namespace whose address its pod connections
/// carry. Streams of one origin share pod connections, and never another
/// origin's, so a pod sees each client by its own address (its
/// NetworkPolicy, its source checks, its logs), as at L4.
///
/// [`Origin::NODE`] is the router's own namespace: clients there
/// (hostNetwork pods, the node itself), or every client with
/// `--source-identity node`. Any other value is a namespace cookie
/// (`SO_NETNS_COOKIE`), which the I/O layer turns into a socket made in
/// that namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Origin(pub u64);

impl Origin {
    pub const NODE: Origin = Origin(0);

    pub fn is_node(self) -> bool {
        self == Self::NODE
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_node() {
            f.write_str("node")
        } else {
            write!(f, "netns:{}", self.0)
        }
    }
}

/// A pool of pod connections: one origin's connections to one endpoint.
pub type PoolKey = (Origin, SocketAddr);

/// A pod connection of a client namespace (not [`Origin::NODE`]) with no
/// stream, whose origin has no client connection on this core, is closed
/// once it has been idle this long: a client pod that went away (or
/// reconnects now and then) does not keep pod connections open.
pub const ORIGIN_POOL_IDLE: Duration = Duration::from_secs(10);

/// Hashing for the router's maps, whose keys are small integers (our
/// connection ids, stream ids): SipHash was 4% of the router's profile.
/// A client picks its stream ids, but it has at most
/// [`MAX_CLIENT_STREAMS`] of them in its own map, so collisions it could
/// craft cost it, not others, little.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type Map<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// Request body kept for a retry.
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// Attempts per stream. Only unprocessed failures are retried, which is
/// always safe; a backend that closes every connection with GOAWAY after one
/// request under 16 concurrent streams needed more than 3 here.
pub const MAX_ATTEMPTS: usize = 8;
/// The stream window granted to clients: larger than the 64 KiB default
/// so one upload can fill a fast link. What a client's uploads may make
/// the router hold in all is its connection window,
/// [`Limits::client_buffer`].
pub const STREAM_WINDOW: i64 = 1 << 20;
/// The window a backend stream is topped up to while its client's budget
/// allows.
pub const BACKEND_STREAM_WINDOW: i64 = 256 << 10;
/// The initial stream window advertised to backends, and the floor every
/// stream is granted whatever the budgets say (so a client whose other
/// streams hold its budget still makes progress on each).
pub const BACKEND_INITIAL_WINDOW: i64 = 16 << 10;
/// A backend connection's window. It is shared by every client, so it is
/// credited as soon as bytes arrive (a client that does not read must not
/// stall the others on that backend); what a response may hold in the
/// router is bounded by its stream window instead.
pub const BACKEND_CONN_WINDOW: i64 = 8 << 20;
/// Streams one client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
pub const MAX_CLIENT_STREAMS: u32 = 256;
/// SETTINGS_MAX_HEADER_LIST_SIZE we advertise to clients, and the largest
/// request header list (RFC 7541 4.1's size) we take; one field may be as
/// large as the list allows. 64 KiB: at least Envoy's default (60 KiB for
/// the whole list), for the tokens and trace baggage gRPC metadata carries
/// (grpc-go pods take 16 MiB). A list above it is refused on its stream
/// alone, as a gRPC server would (`client::too_large_answer`); far above
/// it, a bomb ends the connection (`client::HEADER_LIST_BOMB`). It was
/// 32 KiB, with 8 KiB per field, while pod connections were shared by
/// every client: a pod that ends its connection on a big header (nginx)
/// ended everyone's streams. With pod connections per client namespace it
/// ends only the sender's own, and a pod's own advertised limit is honoured
/// on the way to it (`client::refused_by_pod_limit`).
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// The largest response header list accepted from a backend.
pub const MAX_RESPONSE_HEADER_LIST: usize = 256 * 1024;
/// Frames are only queued to a connection while its output holds less than
/// this; beyond it, streams wait until the socket took the bytes.
pub const SOFT_OUT_LIMIT: usize = 64 * 1024;
/// A client whose output grows beyond this (answers to its PINGs and
/// SETTINGS, resets, which are queued whatever the output holds) does
/// not read them: ENHANCE_YOUR_CALM.
pub const HARD_OUT_LIMIT: usize = 1 << 20;
/// Assumed for a backend until its SETTINGS say otherwise (a backend that
/// allows fewer refuses the extra streams, and those are retried); SETTINGS
/// that name no limit mean none (RFC 9113 6.5.2).
const INITIAL_BACKEND_STREAMS: usize = 100;
/// Connections to one endpoint: when every one is full (its
/// MAX_CONCURRENT_STREAMS), a stream opens another, so one client holding
/// every slot of a connection cannot make others' streams wait. Idle extra
/// connections close at the next tick.
pub const MAX_CONNS_PER_ENDPOINT: usize = 64;
/// RST_STREAMs the router may send on one pod connection, net of what
/// time pays back ([`BACKEND_RESET_REFUND`] per tick), before it stops
/// opening streams there and opens a fresh connection. Servers defend
/// against rapid reset per connection: nghttp2 (nghttpd, Envoy) ends a
/// connection past a burst of 1,000 resets and 33 a second, and every
/// client's streams on it with it. Clients' cancels (deadlines, and
/// attacks within each client's own limit) are many clients' resets on
/// one shared connection, so the router keeps each connection well
/// inside that.
pub const BACKEND_RESET_BUDGET: u32 = 400;
/// What a tick (500 ms) pays back of [`BACKEND_RESET_BUDGET`]: 10 a second.
pub const BACKEND_RESET_REFUND: u32 = 5;
/// The payload of the PING of a graceful drain.
pub const DRAIN_PING: [u8; 8] = *b"lbdrain\0";
/// The payload of the router's liveness probes of pod connections.
pub const PROBE_PING: [u8; 8] = *b"lbprobe\0";
/// A pod connection is probed at most this often, and never faster than
/// the client whose PING asked for it pings the router: the pod sees the
/// ping rate it would see from that client at L4, which keeps gRPC
/// servers' ping policing quiet (grpc-go and grpcio end a connection with
/// GOAWAY ENHANCE_YOUR_CALM `too_many_pings` after 2 strikes of pings
/// faster than 5 minutes while they send nothing, or on an idle
/// connection; a probe goes only where the client has streams open).
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A pod connection that carries open streams and has sent nothing for
/// this long is probed by the router itself, whether or not a client
/// pings: a client whose connection to the router stays busy through
/// other pods never pings (grpc-go pings only after its connection went
/// quiet for its keepalive time), yet at L4 its connection to this one pod
/// would have gone quiet and been checked. Five minutes is the closest
/// pace gRPC servers accept by default from a peer they send nothing to
/// (grpc-go's enforcement MinTime, C-core's
/// `min_recv_ping_interval_without_data`), so no pod ever polices it; a
/// dead pod's streams then end within this plus `--pod-probe-timeout`, not
/// TCP's quarter of an hour, even when no client pings and its endpoint is
/// never removed.
pub const SILENT_PROBE_INTERVAL: Duration = Duration::from_secs(300);
/// A probe's answer is awaited for the client's own ping interval, at
/// least this long (the core's clock moves in 500 ms ticks) and at most
/// [`Limits::probe_timeout`].
pub const MIN_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// To backends: no dynamic table (the point of the design), no push, our
/// stream window.
const BACKEND_SETTINGS: [(u16, u32); 3] = [
    (setting::HEADER_TABLE_SIZE, 0),
    (setting::ENABLE_PUSH, 0),
    (setting::INITIAL_WINDOW_SIZE, BACKEND_INITIAL_WINDOW as u32),
];

/// The router's bounds in time and memory (the agent's flags).
#[derive(Debug, Clone)]
pub struct Limits {
    /// A stream with no frame either way for this long is reset on both
    /// hops (`--stream-idle-timeout`); zero, the default, never: L4 keeps
    /// an idle stream as long as its connection lives (a gRPC watch may
    /// wait minutes for its next event), and the router keeps its pod
    /// connections' liveness checked instead (probes, see
    /// [`PROBE_PING`]).
    pub stream_idle_timeout: Duration,
    /// The longest a probed pod connection may take to answer before it
    /// is lost (`--pod-probe-timeout`; gRPC's default keepalive timeout).
    pub probe_timeout: Duration,
    /// A backend connection must be up and have sent its SETTINGS within
    /// this, or it is given up and its streams retried.
    pub connect_timeout: Duration,
    /// What one client connection's responses may hold in the router
    /// (`--client-buffer`); also its connection window for uploads.
    pub client_buffer: usize,
    /// What the responses of all clients may hold (`--router-buffer-limit`).
    pub buffer_limit: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            stream_idle_timeout: Duration::ZERO,
            probe_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(3),
            client_buffer: 4 << 20,
            buffer_limit: 256 << 20,
        }
    }
}

/// What the core asks of the I/O layer.
#[derive(Debug, PartialEq, Eq)]
pub enum Io {
    /// Open a TCP connection for backend `id`, from `origin`'s network
    /// namespace.
    Connect {
        id: ConnId,
        addr: SocketAddr,
        origin: Origin,
    },
    /// Connection `id` has output (or is to be closed, or was forgotten).
    Wake(ConnId),
}

/// A unit of a stream's traffic, queued for the other hop.
#[derive(Debug, Clone)]
enum Chunk {
    Headers {
        block: Bytes,
        end: bool,
    },
    /// `credit`: flow-control bytes to give back to the sender once this
    /// chunk is passed on (the frame's length, padding included).
    Data {
        data: Bytes,
        end: bool,
        credit: i64,
    },
}

impl Chunk {
    fn credit(&self) -> i64 {
        match self {
            Chunk::Data { credit, .. } => *credit,
            Chunk::Headers { .. } => 0,
        }
    }
}

/// Where a client stream's request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    /// Waiting in backend connection's queue for a stream slot.
    Queued(ConnId),
    /// Open on backend connection, as that stream id.
    Open(ConnId, u32),
    /// The backend side is over: later request bytes are dropped.
    Done,
}

/// The request as sent so far, kept to replay it elsewhere if the backend
/// did not process it; given up past [`REPLAY_LIMIT`].
#[derive(Debug)]
enum Replay {
    Keep { chunks: Vec<Chunk>, bytes: usize },
    Off,
}

impl Replay {
    fn push(&mut self, chunk: Chunk) {
        let Replay::Keep { chunks, bytes } = self else {
            return;
        };
        if let Chunk::Data { data, .. } = &chunk {
            *bytes += data.len();
            if *bytes > REPLAY_LIMIT {
                *self = Replay::Off;
                return;
            }
        }
        chunks.push(chunk);
    }

    fn take(&mut self) -> Option<Vec<Chunk>> {
        match std::mem::replace(self, Replay::Off) {
            Replay::Keep { chunks, .. } => Some(chunks),
            Replay::Off => None,
        }
    }
}

/// A client's stream: its state on the client hop, and where its request
/// goes.
struct CStream {
    state: State,
    up: Up,
    inflight: Option<InFlight>,
    tried: Vec<SocketAddr>,
    /// client -> backend
    to_up: VecDeque<Chunk>,
    up_window: SendWindow,
    replay: Replay,
    recv: RecvWindow,
    /// backend -> client
    to_down: VecDeque<Chunk>,
    /// Flow-control bytes in `to_down` (part of the client's budget).
    down_bytes: i64,
    down_window: SendWindow,
    responded: bool,
    /// Reset the client's stream with NO_ERROR once the response is out
    /// (the backend answered without reading the whole request, 8.1).
    rst_after_down: bool,
    /// Its backend stream's window was granted less than it wanted.
    short: bool,
    /// In its backend connection's `blocked` list (at most once).
    blocked_up: bool,
    /// In its client's `blocked` list (at most once).
    blocked_down: bool,
    last_active: Instant,
    /// The request's header list size and whether it is gRPC: checked
    /// against its pod's SETTINGS_MAX_HEADER_LIST_SIZE, and how to refuse it.
    head: client::Head,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    No,
    /// GOAWAY(2^31-1) and a PING went out.
    Pinged,
    /// GOAWAY with the real last stream id went out.
    Final(u32),
}

struct Client {
    vip: SocketAddr,
    origin: Origin,
    preface_done: bool,
    settings_seen: bool,
    out: BytesMut,
    /// Flush `out`, then close.
    closing: bool,
    eof: bool,
    /// HPACK decoder until the client ACKed our SETTINGS.
    pre_ack: Option<PreAck>,
    /// The client's SETTINGS.
    peer: PeerSettings,
    send: SendWindow,
    recv: RecvWindow,
    streams: Map<u32, CStream>,
    last_stream: u32,
    fragments: Fragments,
    blocked: Vec<u32>,
    drain: Drain,
    recent: Recent,
    calm: Calm,
    /// Response bytes this client makes the router hold or may make it
    /// hold: windows granted to backends for its streams and not yet used,
    /// bytes queued for it, bytes in its output and being written.
    held: i64,
    /// Response bytes in `out` since the last [`Core::take_out`], and
    /// those the writer took and has not yet reported written.
    out_data: i64,
    writing: i64,
    /// Streams whose backend window was cut by a budget.
    short: Vec<u32>,
    last_block: LastBlock,
    /// When it last sent a PING (its pace, for probes of its pods).
    last_ping: Option<Instant>,
}

/// A stream on a backend connection: the backend hop of a client stream.
struct BStream {
    client: ConnId,
    sid: u32,
    state: State,
    recv: RecvWindow,
    /// A final (non-1xx) response HEADERS arrived: the next block is
    /// trailers.
    response_seen: bool,
}

struct Backend {
    ep: Arc<Endpoint>,
    origin: Origin,
    /// When it last had a stream (the core's coarse clock).
    last_used: Instant,
    connected: bool,
    /// Its SETTINGS arrived: it is an HTTP/2 server, and streams sent to it
    /// may have been processed.
    settings_seen: bool,
    started: Instant,
    /// No new streams (GOAWAY received, ids ran out, endpoint left, too
    /// many resets sent).
    retiring: bool,
    /// A write failed ([`Core::write_failed`]): nothing more goes out.
    write_failed: bool,
    closing: bool,
    /// RST_STREAMs sent, net of time (see [`BACKEND_RESET_BUDGET`]).
    resets: u32,
    /// A liveness probe awaiting its ACK: when it went, how long it may
    /// take.
    probe: Option<(Instant, Duration)>,
    /// When the last probe went.
    last_probe: Option<Instant>,
    /// When it last sent anything (the core's coarse clock).
    last_heard: Instant,
    /// Probed once its endpoint left every service.
    removal_probed: bool,
    last_block: LastBlock,
    out: BytesMut,
    /// The backend's SETTINGS.
    peer: PeerSettings,
    send: SendWindow,
    recv: RecvWindow,
    next_stream: u32,
    streams: Map<u32, BStream>,
    queue: VecDeque<(ConnId, u32)>,
    fragments: Fragments,
    blocked: Vec<(ConnId, u32)>,
}

pub type Picker = Box<dyn Fn(SocketAddr, &[SocketAddr]) -> Option<Arc<Endpoint>>>;

pub struct Core {
    pick: Picker,
    limits: Limits,
    clients: Map<ConnId, Client>,
    backends: Map<ConnId, Backend>,
    /// The backend connections new streams of an origin to an endpoint
    /// may use (more than one when one connection's
    /// MAX_CONCURRENT_STREAMS is full).
    pool: Map<PoolKey, Vec<ConnId>>,
    /// Client connections open per origin.
    origin_clients: Map<Origin, usize>,
    next_id: ConnId,
    io: Vec<Io>,
    /// The time of the last [`Core::tick`]: a coarse clock, so frames cost
    /// no clock reads and the core stays deterministic between ticks.
    now: Instant,
    /// The sum of every client's `held`.
    held: i64,
    /// Scratch space for header block validation.
    scratch: Vec<u8>,
}

impl Core {
    pub fn new(pick: Picker) -> Self {
        Self::with_limits(pick, Limits::default())
    }

    pub fn with_limits(pick: Picker, limits: Limits) -> Self {
        Self {
            pick,
            limits,
            clients: Map::default(),
            backends: Map::default(),
            pool: Map::default(),
            origin_clients: Map::default(),
            next_id: 1,
            io: Vec::new(),
            now: Instant::now(),
            held: 0,
            scratch: Vec::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn take_io(&mut self) -> Vec<Io> {
        std::mem::take(&mut self.io)
    }

    fn wake(&mut self, id: ConnId) {
        if !self.io.contains(&Io::Wake(id)) {
            self.io.push(Io::Wake(id));
        }
    }

    /// Response bytes all clients make the router hold now (see
    /// [`Limits::buffer_limit`]).
    pub fn held(&self) -> i64 {
        self.held
    }

    /// Swap a connection's output (client or backend) into `buf` (which
    /// must be empty; the two buffers are reused in turn), and say whether
    /// the connection is to be closed once that is written. None once the
    /// core forgot it.
    pub fn take_out(&mut self, id: ConnId, buf: &mut BytesMut) -> Option<bool> {
        if let Some(c) = self.clients.get_mut(&id) {
            std::mem::swap(&mut c.out, buf);
            c.writing += std::mem::take(&mut c.out_data);
            return Some(c.closing);
        }
        let b = self.backends.get_mut(&id)?;
        if b.write_failed {
            b.out.clear();
        } else if b.connected {
            std::mem::swap(&mut b.out, buf);
        }
        Some(b.closing)
    }

    /// The writer put everything it took on the wire: its bytes leave the
    /// budget, and streams that waited for room go on.
    pub fn written(&mut self, id: ConnId) {
        if let Some(c) = self.clients.get_mut(&id) {
            let done = std::mem::take(&mut c.writing);
            c.held -= done;
            self.held -= done;
            self.unblock_down(id);
            self.regrant(id);
        } else if self.backends.contains_key(&id) {
            self.unblock_up(id);
        }
    }

    /// The connection is closed and its writer done: drop it.
    pub fn forget(&mut self, id: ConnId) {
        if self.clients.contains_key(&id) {
            self.close_client(id);
            if let Some(c) = self.clients.remove(&id) {
                self.held -= c.held;
                if let Some(n) = self.origin_clients.get_mut(&c.origin) {
                    *n -= 1;
                    if *n == 0 {
                        self.origin_clients.remove(&c.origin);
                    }
                }
            }
        } else if self.backends.contains_key(&id) {
            self.backend_gone(id);
        }
        self.io.retain(|io| *io != Io::Wake(id));
    }

    /// A write to connection `id` failed: its peer is gone or reset it.
    ///
    /// A client is forgotten at once. A backend is not: what it sent before
    /// it went may still be in our socket, unread, and it can be the very
    /// thing that says which streams were never processed (the GOAWAY of a
    /// graceful shutdown whose socket closed with our newer HEADERS
    /// unread, so that its kernel answered them with a RST). Forgetting the
    /// connection first would reset those streams on their clients, though
    /// they are safe to retry. So the connection only stops taking
    /// streams and writing; its reader drains what came, and its end
    /// (`backend_eof`, or `forget` after the linger) settles the rest.
    pub fn write_failed(&mut self, id: ConnId) {
        let Some(be) = self.backends.get_mut(&id) else {
            self.forget(id);
            return;
        };
        tracing::debug!(conn = id, endpoint = %be.ep.addr, "backend write failed; draining its input");
        be.write_failed = true;
        be.out.clear();
        be.retiring = true;
        let key = (be.origin, be.ep.addr);
        unpool(&mut self.pool, key, id);
        // Streams still waiting for a slot here move elsewhere now.
        self.after_bstream(id);
    }

    /// Periodic upkeep (the router calls it every 500 ms with the time):
    /// flood meters pay back, idle streams are reset, backends that never
    /// sent SETTINGS are given up, and pooled connections to endpoints
    /// that left every service are closed once idle.
    pub fn tick(&mut self, now: Instant) {
        self.now = now;
        let idle = self.limits.stream_idle_timeout;
        let mut expired = Vec::new();
        let mut unanswered = Vec::new();
        let mut silent = Vec::new();
        for (id, be) in &mut self.backends {
            be.resets = be.resets.saturating_sub(BACKEND_RESET_REFUND);
            if let Some((sent, timeout)) = be.probe
                && now.saturating_duration_since(sent) >= timeout
            {
                unanswered.push(*id);
            } else if be.probe.is_none()
                && !be.streams.is_empty()
                && now.saturating_duration_since(be.last_heard) >= SILENT_PROBE_INTERVAL
            {
                silent.push(*id);
            }
        }
        let timeout = self.limits.probe_timeout.max(MIN_PROBE_TIMEOUT);
        for b in silent {
            self.probe(b, SILENT_PROBE_INTERVAL, timeout);
        }
        for (id, c) in &mut self.clients {
            c.calm.tick();
            if idle.is_zero() {
                continue;
            }
            for (sid, cs) in &c.streams {
                if now.saturating_duration_since(cs.last_active) >= idle {
                    expired.push((*id, *sid));
                }
            }
        }
        for b in unanswered {
            if let Some(be) = self.backends.get(&b) {
                tracing::info!(conn = b, endpoint = %be.ep.addr, origin = %be.origin, "pod connection did not answer its liveness probe; lost");
            }
            stats::POD_PROBE_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
            self.backend_gone(b);
        }
        for (c, sid) in expired {
            tracing::debug!(conn = c, stream = sid, "stream idle; reset on both hops");
            stats::STREAM_IDLE_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
            self.reset_client_stream(c, sid, frame::Reason::CANCEL);
        }
        let silent: Vec<ConnId> = self
            .backends
            .iter()
            .filter(|(_, be)| {
                !be.settings_seen
                    && !be.closing
                    && now.saturating_duration_since(be.started) >= self.limits.connect_timeout
            })
            .map(|(id, _)| *id)
            .collect();
        for b in silent {
            if let Some(be) = self.backends.get(&b) {
                tracing::debug!(endpoint = %be.ep.addr, "backend sent no SETTINGS in time; given up");
            }
            stats::BACKEND_SETTINGS_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
            self.backend_connect_failed(b);
        }
        self.sweep();
    }

    /// This core's gauges now. Each router thread has its own core, so the
    /// router sums them (a core never writes a process-wide gauge: with
    /// several threads, that would show whichever ticked last).
    pub fn gauges(&self) -> Gauges {
        let mut origins: Vec<Origin> = self
            .backends
            .values()
            .map(|be| be.origin)
            .filter(|o| !o.is_node())
            .collect();
        origins.sort_unstable();
        origins.dedup();
        Gauges {
            held_bytes: self.held,
            client_connections: self.clients.len() as u64,
            backend_connections: self.backends.len() as u64,
            origin_pools: origins.len() as u64,
            origin_connections: self
                .backends
                .values()
                .filter(|be| !be.origin.is_node())
                .count() as u64,
        }
    }

    /// The client namespaces (not [`Origin::NODE`]) this core has pod
    /// connections or clients for.
    pub fn origins(&self) -> Vec<Origin> {
        let mut v: Vec<Origin> = self
            .backends
            .values()
            .map(|be| be.origin)
            .chain(self.origin_clients.keys().copied())
            .filter(|o| !o.is_node())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// `origin`'s namespace is gone (its pod was deleted): its pod
    /// connections take no new stream, and close once their streams are
    /// over (at once when idle).
    pub fn close_origin(&mut self, origin: Origin) {
        let conns: Vec<ConnId> = self
            .backends
            .iter()
            .filter(|(_, be)| be.origin == origin && !be.closing)
            .map(|(id, _)| *id)
            .collect();
        for b in conns {
            self.retire(b);
        }
    }

    /// Close pooled connections to endpoints that left every service and
    /// have no stream left (those with streams close after their last).
    pub fn sweep(&mut self) {
        let idle: Vec<ConnId> = self
            .backends
            .iter()
            .filter(|(_, be)| {
                be.streams.is_empty()
                    && be.queue.is_empty()
                    && !be.closing
                    && be.ep.draining.load(Ordering::Relaxed)
            })
            .map(|(id, _)| *id)
            .collect();
        for b in idle {
            self.after_bstream(b);
        }
        // Connections to a removed endpoint that still carry streams: is
        // the pod there at all? (Removed because its node died, they would
        // wait on TCP for a quarter of an hour.)
        let removed: Vec<ConnId> = self
            .backends
            .iter()
            .filter(|(_, be)| {
                !be.removal_probed
                    && !be.streams.is_empty()
                    && be.ep.draining.load(Ordering::Relaxed)
            })
            .map(|(id, _)| *id)
            .collect();
        for b in removed {
            if let Some(be) = self.backends.get_mut(&b) {
                be.removal_probed = true;
            }
            self.probe(b, Duration::ZERO, MIN_PROBE_TIMEOUT);
        }
        self.close_idle_extras();
        self.close_idle_origins();
    }

    /// Send a liveness probe (PING) on pod connection `b`, unless one is
    /// awaited or one went less than `spacing` (at least
    /// [`MIN_PROBE_INTERVAL`]) ago; unanswered after `timeout`, the
    /// connection is lost ([`Core::tick`]).
    fn probe(&mut self, b: ConnId, spacing: Duration, timeout: Duration) {
        let now = self.now;
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        if let Some((_, awaited)) = &mut be.probe {
            // The client's pace is known now (its first PING could not
            // tell it): wait for the answer no longer than that.
            *awaited = (*awaited).min(timeout);
            return;
        }
        if !be.connected || !be.settings_seen || be.closing || be.write_failed {
            return;
        }
        let spacing = spacing.max(MIN_PROBE_INTERVAL);
        if be
            .last_probe
            .is_some_and(|t| now.saturating_duration_since(t) < spacing)
        {
            return;
        }
        frame::ping(&mut be.out, false, PROBE_PING);
        be.probe = Some((now, timeout));
        be.last_probe = Some(now);
        self.wake(b);
    }

    /// Client `c` sent a PING: its keepalive checks its peer is alive.
    /// Its peer is the router, but what it means to check is its pods:
    /// probe the pod connections that carry its open streams, at its pace.
    fn client_pinged(&mut self, c: ConnId) {
        let now = self.now;
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        let interval = cl.last_ping.map(|t| now.saturating_duration_since(t));
        cl.last_ping = Some(now);
        let mut conns: Vec<ConnId> = cl
            .streams
            .values()
            .filter_map(|cs| match cs.up {
                Up::Open(b, _) => Some(b),
                _ => None,
            })
            .collect();
        conns.sort_unstable();
        conns.dedup();
        let timeout = interval.unwrap_or(self.limits.probe_timeout).clamp(
            MIN_PROBE_TIMEOUT,
            self.limits.probe_timeout.max(MIN_PROBE_TIMEOUT),
        );
        for b in conns {
            self.probe(b, interval.unwrap_or(MIN_PROBE_INTERVAL), timeout);
        }
    }

    /// Close the pod connections of client namespaces that have no client
    /// connection here any more, once idle for [`ORIGIN_POOL_IDLE`]: a
    /// namespace's pools live as long as its clients (plus a grace for a
    /// client that reconnects), so the pod connections stay bounded by
    /// the clients served.
    fn close_idle_origins(&mut self) {
        let now = self.now;
        let idle: Vec<ConnId> = self
            .backends
            .iter()
            .filter(|(_, be)| {
                !be.origin.is_node()
                    && !be.closing
                    && be.streams.is_empty()
                    && be.queue.is_empty()
                    && !self.origin_clients.contains_key(&be.origin)
                    && now.saturating_duration_since(be.last_used) >= ORIGIN_POOL_IDLE
            })
            .map(|(id, _)| *id)
            .collect();
        for b in idle {
            if let Some(be) = self.backends.get(&b) {
                tracing::debug!(conn = b, origin = %be.origin, endpoint = %be.ep.addr, "client namespace has no client left; closing its idle pod connection");
            }
            self.retire(b);
        }
    }

    /// Close extra pooled connections to an endpoint once they are idle
    /// (the first one stays).
    fn close_idle_extras(&mut self) {
        let extra: Vec<ConnId> = self
            .pool
            .values()
            .filter(|conns| conns.len() > 1)
            .flat_map(|conns| conns[1..].iter().copied())
            .filter(|b| {
                self.backends
                    .get(b)
                    .is_some_and(|be| be.streams.is_empty() && be.queue.is_empty())
            })
            .collect();
        for b in extra {
            self.retire(b);
        }
    }

    /// Backend connection `b` takes no new stream (out of its pool), and
    /// closes once its streams are over (at once when it has none).
    fn retire(&mut self, b: ConnId) {
        if let Some(be) = self.backends.get_mut(&b) {
            be.retiring = true;
            let key = (be.origin, be.ep.addr);
            unpool(&mut self.pool, key, b);
        }
        self.after_bstream(b);
    }

    /// Send RST_STREAM on backend stream `bid` of `b`; past the budget the
    /// connection takes no new streams.
    fn reset_backend_stream(&mut self, b: ConnId, bid: u32, reason: frame::Reason) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        frame::rst(&mut be.out, bid, reason);
        be.resets += 1;
        if be.resets > BACKEND_RESET_BUDGET && !be.retiring {
            tracing::debug!(endpoint = %be.ep.addr, "many resets on a pod connection; opening a fresh one");
            stats::BACKEND_RESET_RETIREMENTS.fetch_add(1, Ordering::Relaxed);
            be.retiring = true;
            let key = (be.origin, be.ep.addr);
            unpool(&mut self.pool, key, b);
        }
        if be.connected {
            self.wake(b);
        }
    }

    /// Pump every stream that waited for room or window on client `c`.
    fn unblock_down(&mut self, c: ConnId) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        let blocked = std::mem::take(&mut cl.blocked);
        for sid in &blocked {
            if let Some(cs) = cl.streams.get_mut(sid) {
                cs.blocked_down = false;
            }
        }
        for sid in blocked {
            self.pump_down(c, sid);
        }
    }

    /// Pump every stream that waited for room or window on backend `b`.
    fn unblock_up(&mut self, b: ConnId) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        let blocked = std::mem::take(&mut be.blocked);
        for (c, sid) in &blocked {
            if let Some(cs) = self
                .clients
                .get_mut(c)
                .and_then(|cl| cl.streams.get_mut(sid))
            {
                cs.blocked_up = false;
            }
        }
        for (c, sid) in blocked {
            self.pump_up(c, sid);
        }
    }

    /// The client stream `sid` of `c`, if both exist.
    fn cstream(&mut self, c: ConnId, sid: u32) -> Option<&mut CStream> {
        self.clients.get_mut(&c)?.streams.get_mut(&sid)
    }
}

#[cfg(test)]
mod random_frames;
/// Take backend connection `b` out of the pool `key`: no new streams.
fn unpool(pool: &mut Map<PoolKey, Vec<ConnId>>, key: PoolKey, b: ConnId) {
    if let Some(conns) = pool.get_mut(&key) {
        conns.retain(|x| *x != b);
        if conns.is_empty() {
            pool.remove(&key);
        }
    }
}

/// A core's gauges (see [`Core::gauges`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Response bytes its clients make the router hold.
    pub held_bytes: i64,
    pub client_connections: u64,
    /// Pod connections, of every origin.
    pub backend_connections: u64,
    /// Client namespaces with pod connections of their own.
    pub origin_pools: u64,
    /// Pod connections of client namespaces (not the node's).
    pub origin_connections: u64,
}

#[cfg(test)]
mod tests;
