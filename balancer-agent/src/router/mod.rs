//! The HTTP/2 router, its own process (`balancer-agent router`): the
//! listener at `--listen`, where `connect4/6` send connections to `http2`
//! service ports. It reads its routing table from the maps the agent pinned
//! (`table.rs`) and writes its heartbeat and address to `CONFIG`
//! (`process.rs`), so the control plane can crash, OOM or restart without
//! touching an HTTP/2 connection.
//!
//! On accept it learns the VIP the client asked for from the kernel's
//! `ORIG_DST` map, then:
//! - HTTP/2 with prior knowledge (h2c, what gRPC uses in-cluster): every
//!   stream is routed on its own to an endpoint the port's algorithm picks
//!   (least-request by default), over pooled backend connections. Frames
//!   are forwarded by stream id; every header block is decoded and
//!   checked, and forwarded as it came (`balancer-router`);
//! - anything else (HTTP/1.1, TLS, a server-speaks-first protocol): plain
//!   L4 pass-through to one endpoint the port's pool picks, so nothing
//!   breaks.
//!
//! Either way the pod connections carry the client's own address: with
//! `--source-identity pod` they are made in the client's network namespace
//! (`netns.rs`), one pool per client namespace; a client whose namespace
//! the router cannot enter is closed, never served from the node's
//! address (the kernel steers only namespaces the router serves).

mod io;
pub mod netns;
pub mod process;
mod routes;
pub mod table;

pub use balancer_router::{core, endpoint};

use std::{
    net::SocketAddr,
    rc::Rc,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, SockHash};
use balancer_common::{Config, OrigDst, SockKey, SpliceKey};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{api::EndpointStats, dataplane::plan::addr_words};
use endpoint::Endpoint;
use routes::RouteTable;
use table::Route;

use balancer_common::h2frame::PREFACE;
/// A client that starts the preface must finish it within this time.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that sends nothing for this long is taken for a
/// server-speaks-first protocol and passed through at L4.
const SILENT_CLIENT: Duration = Duration::from_millis(500);

pub struct Router {
    /// The http2 routes and every endpoint the router knows.
    routes: RouteTable,
    /// The kernel maps the router uses; replaced whole when the agent
    /// pinned a fresh data path.
    maps: Mutex<Maps>,
    /// With `--splice`, client and router sockets are spliced.
    splice: bool,
    shutdown: watch::Sender<bool>,
    /// The router's bounds in time and memory.
    limits: core::Limits,
    /// Client connections open now.
    connections: std::sync::atomic::AtomicUsize,
    /// Bits set by the router's threads every 100 ms: proof of life.
    alive: std::sync::atomic::AtomicU64,
    /// The bits of every thread that runs.
    alive_expected: std::sync::atomic::AtomicU64,
    /// sock_ops counts this router's listener.
    tracked: std::sync::atomic::AtomicBool,
    /// With `--source-identity pod`: the client namespaces it can enter.
    namespaces: Option<Arc<netns::Namespaces>>,
    /// Where pod connections come from.
    sockets: netns::SocketFactory,
    /// Accepted connections closed because their namespace could not be
    /// entered.
    unserved: std::sync::atomic::AtomicU64,
    /// Each worker's gauges as of its last tick, summed when read.
    gauges: Mutex<Vec<core::Gauges>>,
    /// Moves when the maps are replaced (see [`netns::Served::epoch`]).
    maps_epoch: std::sync::atomic::AtomicU64,
}

/// The pinned maps the router reads and writes besides its table.
pub struct Maps {
    /// The VIP each steered client asked for.
    pub orig_dst: BpfHashMap<MapData, SockKey, OrigDst>,
    /// Where the router listens, and its heartbeat.
    pub config: Array<MapData, Config>,
    /// The router listeners sock_ops counts.
    pub listeners: Array<MapData, u64>,
    /// With `--splice`: the SPLICE sockhash, where the router puts its
    /// client sockets that sock_ops did not.
    pub splice: Option<SockHash<MapData, SpliceKey>>,
    /// The client namespaces (cookies) the router serves, for connect4/6.
    pub served: BpfHashMap<MapData, u64, u32>,
}

/// A socket's address as the kernel's maps key it.
fn sock_key(addr: SocketAddr) -> SockKey {
    SockKey {
        addr: addr_words(addr.ip()),
        port: addr.port().to_be(),
        _pad: [0; 2],
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which
/// the programs compare the heartbeat against.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Counts a client connection, in the router and on its worker, while it
/// lives.
struct ConnGuard {
    router: Arc<Router>,
    worker: Arc<std::sync::atomic::AtomicUsize>,
}
impl Drop for ConnGuard {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.router.connections.fetch_sub(1, SeqCst);
        self.worker.fetch_sub(1, SeqCst);
    }
}

impl netns::Served for Router {
    fn set(&self, cookie: u64, served: bool) {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let r = if served {
            maps.served.insert(cookie, 1, 0)
        } else {
            match maps.served.remove(&cookie) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            }
        };
        if let Err(e) = r {
            // Full, or a stale entry that stays: either way no connection
            // reaches a pod from another's address (an unserved namespace
            // goes to L4; a stale one is closed on accept).
            tracing::warn!(cookie, served, error = %e, "writing SERVED_NETNS");
        }
    }

    fn list(&self) -> Vec<u64> {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.served
            .keys()
            .take(balancer_common::MAX_SERVED_NETNS as usize)
            .flatten()
            .collect()
    }

    fn epoch(&self) -> u64 {
        self.maps_epoch.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Router {
    pub fn new(
        maps: Maps,
        limits: core::Limits,
        accrual: balancer_router::accrual::Policy,
        namespaces: Option<Arc<netns::Namespaces>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            sockets: netns::SocketFactory::new(namespaces.clone()),
            namespaces,
            unserved: std::sync::atomic::AtomicU64::new(0),
            gauges: Mutex::new(Vec::new()),
            maps_epoch: std::sync::atomic::AtomicU64::new(0),
            limits,
            splice: maps.splice.is_some(),
            routes: RouteTable::new(accrual),
            maps: Mutex::new(maps),
            shutdown: watch::channel(false).0,
            connections: std::sync::atomic::AtomicUsize::new(0),
            alive: std::sync::atomic::AtomicU64::new(0),
            alive_expected: std::sync::atomic::AtomicU64::new(u64::MAX),
            tracked: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Take maps the agent pinned anew. The listener opened before them
    /// is not counted in their ROUTER_LISTENERS: the heartbeat alone
    /// tells the kernel the router is alive from now on.
    pub fn replace_maps(&self, maps: Maps) {
        *self.maps.lock().unwrap_or_else(|p| p.into_inner()) = maps;
        self.tracked
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.maps_epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every worker's gauges, summed.
    pub fn gauges(&self) -> core::Gauges {
        let g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        g.iter().fold(core::Gauges::default(), |a, b| core::Gauges {
            held_bytes: a.held_bytes + b.held_bytes,
            client_connections: a.client_connections + b.client_connections,
            backend_connections: a.backend_connections + b.backend_connections,
            origin_pools: a.origin_pools + b.origin_pools,
            origin_connections: a.origin_connections + b.origin_connections,
        })
    }

    /// Client namespaces served now (None with `--source-identity node`).
    pub fn namespaces(&self) -> Option<usize> {
        self.namespaces.as_ref().map(|n| n.len())
    }

    /// Accepted connections closed because their namespace could not be
    /// entered.
    pub fn unserved(&self) -> u64 {
        self.unserved.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Router listeners open now, as sock_ops counted them.
    pub fn listeners(&self) -> u64 {
        self.maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .listeners
            .get(&0, 0)
            .unwrap_or(0)
    }

    /// Whether sock_ops counts this router's listener (see
    /// `Config::track_listeners`).
    pub fn set_tracked(&self, tracked: bool) {
        self.tracked
            .store(tracked, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn tracked(&self) -> bool {
        self.tracked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publish the http2 routes (see [`RouteTable::update`]).
    pub fn update(&self, routes: &[Route]) {
        self.routes.update(routes);
    }

    pub fn pick(&self, vip: SocketAddr, exclude: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        self.routes.pick(vip, exclude)
    }

    /// Every endpoint the router knows, with its counters.
    pub fn endpoint_stats(&self) -> Vec<(SocketAddr, EndpointStats)> {
        self.routes.endpoint_stats()
    }

    /// The number of http2 service ports in the table.
    pub fn routes(&self) -> usize {
        self.routes.len()
    }

    /// Write `cfg` (with the heartbeat of now) to CONFIG.
    pub fn heartbeat(&self, mut cfg: Config) -> Result<(), aya::maps::MapError> {
        cfg.heartbeat_ns = monotonic_ns();
        cfg.track_listeners = u8::from(self.tracked());
        self.write_config(cfg)
    }

    /// What CONFIG holds now.
    pub fn config(&self) -> Option<Config> {
        self.maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .get(&0, 0)
            .ok()
    }

    pub fn write_config(&self, cfg: Config) -> Result<(), aya::maps::MapError> {
        self.maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .set(0, cfg, 0)
    }

    /// True if every router thread checked in since the last call: they
    /// run and none of their runtimes is stuck.
    pub fn take_alive(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let seen = self.alive.swap(0, Relaxed);
        let expected = self.alive_expected.load(Relaxed);
        seen & expected == expected
    }

    /// The VIP a steered client connected to, and its network namespace
    /// cookie.
    fn orig_dst(&self, peer: SocketAddr) -> Option<(SocketAddr, u64)> {
        let key = sock_key(peer);
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let v = maps.orig_dst.get(&key, 0).ok()?;
        let ip = crate::dataplane::plan::words_addr(v.addr);
        Some((SocketAddr::new(ip, u16::from_be(v.port)), v.netns_cookie))
    }

    /// Whose pool a client from namespace `cookie` uses: None when the
    /// router cannot enter it (gone since the kernel steered it, or never
    /// known), so that it is never served from the node's address.
    fn origin(&self, cookie: u64) -> Option<core::Origin> {
        match &self.namespaces {
            None => Some(core::Origin::NODE),
            Some(ns) => ns.origin(cookie),
        }
    }

    /// Drain: two-phase GOAWAY on every client connection, then wait until
    /// they have all closed (their streams finished), at most `timeout`.
    /// Returns the connections still open at the end.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let open = self.connections.load(std::sync::atomic::Ordering::SeqCst);
            if open == 0 || tokio::time::Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Run the router on `threads` threads, each a single-threaded
    /// runtime with its own [`core::Core`], and one accept thread that
    /// hands every connection to the worker with the fewest.
    ///
    /// Why single-threaded workers: every stream hops between three tasks
    /// (client connection, stream, backend connection). On the
    /// multi-threaded runtime those hops were cross-thread wake-ups, and
    /// the profile of the HTTP/2 benchmark was dominated by them
    /// (`_raw_spin_unlock_irqrestore` and `finish_task_switch` above 20%,
    /// h2 itself a few percent). A worker shares nothing hot with another:
    /// a client connection and its streams' backend connections live on
    /// one worker, which keeps its own pool of backend connections.
    ///
    /// Why one acceptor, not a listener per worker behind SO_REUSEPORT:
    /// the kernel picks a reuseport socket by a hash of the 4-tuple, so
    /// two long-lived connections land on one worker half the time and
    /// leave the other core idle for their whole life. The acceptor
    /// assigns by count instead (gRPC clients hold few connections). The
    /// listener itself stays SO_REUSEPORT, for upgrades.
    ///
    /// Each worker's core gets `--router-buffer-limit` / `threads`.
    pub fn spawn_threads(
        self: &Arc<Self>,
        listener: std::net::TcpListener,
        threads: usize,
    ) -> std::io::Result<RouterThreads> {
        let threads = threads.clamp(1, MAX_THREADS);
        listener.set_nonblocking(true)?;
        // Bit i: worker i checked in; the top bit: the acceptor.
        let expected = ((1u64 << threads) - 1) | ACCEPTOR_BIT;
        self.alive_expected
            .store(expected, std::sync::atomic::Ordering::Relaxed);
        let mut limits = self.limits.clone();
        limits.buffer_limit = (limits.buffer_limit / threads).max(1);
        *self.gauges.lock().unwrap_or_else(|p| p.into_inner()) =
            vec![core::Gauges::default(); threads];
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        let mut workers = Vec::new();
        for i in 0..threads {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let router = self.clone();
            let limits = limits.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("router-{i}"))
                    .spawn(move || router.worker(i, limits, rx, stopped))?,
            );
            stops.push(stop);
            workers.push(Worker {
                tx,
                connections: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            });
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = self.clone();
        handles.push(
            std::thread::Builder::new()
                .name("router-accept".into())
                .spawn(move || router.acceptor(listener, workers, stopped))?,
        );
        stops.push(stop);
        Ok(RouterThreads { stops, handles })
    }

    /// A single-threaded runtime on this thread, until `stopped`.
    fn block_on_thread(name: &str, fut: impl std::future::Future<Output = ()>) {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            // The core is single-threaded (`Rc`): every task of a worker
            // runs on its thread's LocalSet.
            Ok(rt) => tokio::task::LocalSet::new().block_on(&rt, fut),
            Err(e) => tracing::error!(error = %e, thread = name, "cannot start a router runtime"),
        }
    }

    /// Check in: `bit` of the router's proof of life (see [`take_alive`]).
    ///
    /// [`take_alive`]: Router::take_alive
    fn check_in(&self, bit: u64) {
        self.alive
            .fetch_or(bit, std::sync::atomic::Ordering::Relaxed);
    }

    fn acceptor(
        self: Arc<Self>,
        listener: std::net::TcpListener,
        workers: Vec<Worker>,
        stopped: tokio::sync::oneshot::Receiver<()>,
    ) {
        Self::block_on_thread("router-accept", async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "router listener");
                    return;
                }
            };
            let beat = async {
                loop {
                    self.check_in(ACCEPTOR_BIT);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let serving = async {
                self.clone().serve(listener, workers).await;
                // Draining: the workers finish their connections.
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = beat => {}
                () = serving => {}
                _ = stopped => {}
            }
        });
    }

    /// One worker: its core, and the connections the acceptor gives it.
    fn worker(
        self: Arc<Self>,
        index: usize,
        limits: core::Limits,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
        stopped: tokio::sync::oneshot::Receiver<()>,
    ) {
        Self::block_on_thread(&format!("router-{index}"), async move {
            let picker = self.clone();
            let shared = io::Shared::new(
                core::Core::with_limits(
                    Box::new(move |vip, tried| picker.pick(vip, tried)),
                    limits,
                ),
                self.sockets.clone(),
            );
            let beat = async {
                let mut n = 0u64;
                loop {
                    self.check_in(1 << index);
                    n += 1;
                    if n.is_multiple_of(5) {
                        shared.tick();
                        self.upkeep(index, &shared);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let take = async {
                while let Some(a) = rx.recv().await {
                    let sock = match TcpStream::from_std(a.sock) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "router worker cannot take a connection");
                            continue;
                        }
                    };
                    let (router, shared) = (self.clone(), shared.clone());
                    tokio::task::spawn_local(async move {
                        let _guard = a.guard;
                        if let Err(e) = router.handle(sock, a.peer, shared).await {
                            tracing::debug!(peer = %a.peer, error = %e, "router connection ended");
                        }
                    });
                }
                // The acceptor is gone: serve what is open until stopped.
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = beat => {}
                () = take => {}
                _ = stopped => {}
            }
        });
    }

    /// After a worker's tick: close the pools of client namespaces that are
    /// gone, and publish its gauges.
    fn upkeep(&self, index: usize, shared: &Rc<io::Shared>) {
        let gauges = shared.with(|c| {
            if let Some(ns) = &self.namespaces {
                for o in c.origins() {
                    if !ns.contains(o) {
                        tracing::debug!(origin = %o, "client namespace gone; closing its pod connections");
                        c.close_origin(o);
                    }
                }
            }
            c.gauges()
        });
        if let Some(g) = self
            .gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
        {
            *g = gauges;
        }
    }

    /// Accept until draining starts; each connection goes to the worker
    /// with the fewest open.
    async fn serve(self: Arc<Self>, listener: TcpListener, workers: Vec<Worker>) {
        use std::sync::atomic::Ordering::SeqCst;
        let mut shutdown = self.shutdown.subscribe();
        let mut next = 0usize;
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                // Draining: stop accepting at once. With SO_REUSEPORT the
                // next router's listener takes the new connections (and, with
                // net.ipv4.tcp_migrate_req=1, those queued on this one).
                _ = shutdown.changed() => {
                    tracing::info!("router: stopped accepting, draining");
                    return;
                }
            };
            let (sock, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "router accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let sock = match sock.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "router accept: cannot hand the connection over");
                    continue;
                }
            };
            // Fewest connections; ties go round, so equal workers alternate.
            let n = workers.len();
            let w = (0..n)
                .map(|k| (next + k) % n)
                .min_by_key(|&i| workers[i].connections.load(SeqCst))
                .unwrap_or(0);
            next = (w + 1) % n;
            self.connections.fetch_add(1, SeqCst);
            workers[w].connections.fetch_add(1, SeqCst);
            let guard = ConnGuard {
                router: self.clone(),
                worker: workers[w].connections.clone(),
            };
            if workers[w].tx.send(Accepted { sock, peer, guard }).is_err() {
                tracing::warn!(worker = w, "router worker gone; connection dropped");
            }
        }
    }

    async fn handle(
        self: Arc<Self>,
        sock: TcpStream,
        peer: SocketAddr,
        shared: Rc<io::Shared>,
    ) -> anyhow::Result<()> {
        let _ = sock.set_nodelay(true);
        let Some((vip, cookie)) = self.orig_dst(peer) else {
            anyhow::bail!("no original destination recorded for {peer}; closing");
        };
        let Some(origin) = self.origin(cookie) else {
            // Fail safe: the kernel steered it while its namespace was
            // served, and it is gone since (or the maps were stale). Its
            // client reconnects, and is balanced at L4 with its own address.
            self.unserved
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            anyhow::bail!(
                "{peer} connected from network namespace {cookie}, which the router cannot \
                 enter; closing rather than reaching a pod from another address"
            );
        };
        let splice_key = self.splice_in(&sock, peer);
        match sniff(&sock).await? {
            Sniffed::Http2 => {
                shared
                    .client(sock, vip, origin, self.shutdown.subscribe())
                    .await;
                Ok(())
            }
            Sniffed::Other => {
                // No HTTP/2 flow control to bound a spliced queue: TCP.
                if let Some(key) = splice_key {
                    let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(m) = maps.splice.as_mut() {
                        let _ = m.remove(&key);
                    }
                }
                self.pass_through(sock, vip, origin).await
            }
        }
    }

    /// With `--splice`: make sure the accepted socket is in SPLICE before
    /// it sends anything (sock_ops adds it at PASSIVE_ESTABLISHED when the
    /// router is in the attached cgroup; otherwise only this does, and the
    /// client's direction, which decided at its first send, stays on TCP).
    fn splice_in(&self, sock: &TcpStream, peer: SocketAddr) -> Option<SpliceKey> {
        if !self.splice {
            return None;
        }
        let local = sock.local_addr().ok()?;
        let key = SpliceKey {
            local: sock_key(local),
            remote: sock_key(peer),
        };
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let m = maps.splice.as_mut()?;
        // BPF_NOEXIST: already there from sock_ops is fine.
        if let Err(e) = m.insert(key, std::os::fd::AsRawFd::as_raw_fd(sock), 2)
            && !matches!(&e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EEXIST))
        {
            tracing::debug!(%peer, error = %e, "cannot splice");
            return None;
        }
        Some(key)
    }

    /// Not HTTP/2: one backend for the whole connection, picked by the
    /// port's pool (its algorithm, over the live counts: a passed-through
    /// connection counts as one request in flight while it lasts), and
    /// connected from the client's origin like its streams would be.
    async fn pass_through(
        self: Arc<Self>,
        mut sock: TcpStream,
        vip: SocketAddr,
        origin: core::Origin,
    ) -> anyhow::Result<()> {
        let ep = self
            .pick(vip, &[])
            .ok_or_else(|| anyhow::anyhow!("no endpoint for {vip}"))?;
        let _inflight = ep.start();
        let mut up = self
            .sockets
            .connect(origin, ep.addr, self.limits.connect_timeout)
            .await?;
        let _ = up.set_nodelay(true);
        tokio::io::copy_bidirectional(&mut sock, &mut up).await?;
        Ok(())
    }
}

/// `--router-threads` by default: the CPUs this process may use (its
/// affinity and its cgroup's CPU quota, as `available_parallelism` reads
/// them), at most 4.
/// Streams on one connection stay on one worker, so past the number of
/// busy client connections more workers only idle.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// At most this many workers (`--router-threads`).
pub const MAX_THREADS: usize = 63;
/// The acceptor's bit in [`Router::take_alive`]'s mask.
const ACCEPTOR_BIT: u64 = 1 << 63;

/// A worker as the acceptor sees it.
struct Worker {
    tx: tokio::sync::mpsc::UnboundedSender<Accepted>,
    /// Client connections open on it.
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// A connection on its way from the acceptor to a worker.
struct Accepted {
    sock: std::net::TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
}

/// The router's threads; [`RouterThreads::stop`] ends them and every
/// connection on them.
pub struct RouterThreads {
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl RouterThreads {
    pub fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
        for h in self.handles {
            let _ = h.join();
        }
    }
}

enum Sniffed {
    Http2,
    Other,
}

/// Tell HTTP/2 prior knowledge from anything else by peeking at the first
/// bytes, without consuming them.
async fn sniff(sock: &TcpStream) -> anyhow::Result<Sniffed> {
    let mut buf = [0u8; PREFACE.len()];
    let start = tokio::time::Instant::now();
    loop {
        let n = match tokio::time::timeout(
            if start.elapsed() < SILENT_CLIENT {
                SILENT_CLIENT
            } else {
                PREFACE_TIMEOUT
            },
            sock.peek(&mut buf),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => 0,
        };
        if n > 0 && buf[..n] != PREFACE[..n] {
            return Ok(Sniffed::Other);
        }
        if n == PREFACE.len() {
            return Ok(Sniffed::Http2);
        }
        if n == 0 && start.elapsed() >= SILENT_CLIENT {
            // Nothing at all: a protocol where the server speaks first.
            return Ok(Sniffed::Other);
        }
        if start.elapsed() >= PREFACE_TIMEOUT {
            anyhow::bail!("client did not finish the HTTP/2 preface within {PREFACE_TIMEOUT:?}");
        }
        // A partial preface: wait for more (peek returns at once while data
        // is queued, so sleep briefly).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
