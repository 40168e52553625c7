//! `balancer-agent router`: the HTTP/2 router as its own process, the
//! second container of the DaemonSet pod.
//!
//! - It waits for the agent's pinned data path, then opens the maps it
//!   needs from the pins: the table (`table.rs`), `ORIG_DST`, `CONFIG`,
//!   and with `--splice` `SPLICE`.
//! - It serves only once its first table is read, and only then writes its
//!   address and heartbeat to `CONFIG`: the kernel steers http2 ports to a
//!   router that is ready, and to nothing else.
//! - The heartbeat (every 250 ms, while the router's event loop checks
//!   in) is the kernel's proof of life: when this process dies, new
//!   connections go back to L4 within `ROUTER_STALE_NS` (1 s).
//! - It needs nothing of the agent to serve: the agent can crash, restart
//!   or be upgraded, and the router keeps serving the last table it read.
//! - The agent holds a duplicate of its listening socket (`RouterListener`
//!   on the router's socket, SCM_RIGHTS). When the router dies, the
//!   listener stays open: clients that reconnect meanwhile queue on it
//!   instead of being refused or pinned to one pod at L4, and the next
//!   router adopts it (`HeldListener` on the agent's socket) and serves
//!   them, spread. A router that is not back within the agent's
//!   `--router-grace` has its listener shut (its queue resets, and clients
//!   reconnect at L4).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, SockHash};
use balancer_common::{Config, map_names};
use tokio::signal::unix::{SignalKind, signal};

use super::{
    Maps, Router, core,
    table::{PinnedTable, TableError},
};
use crate::{
    admin,
    api::{ListenerView, Request, RouterEndpointView, RouterStatusView},
    dataplane::{pin, plan},
    metrics,
    node::RemoveOnDrop,
    socket,
};

/// How often the table's generation is polled (one syscall).
const TABLE_POLL: Duration = Duration::from_millis(50);
/// How often the pins are checked for a data path pinned anew.
const PIN_CHECK: Duration = Duration::from_secs(1);
/// How often the heartbeat is written.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// Not alive (`/healthz`) after this long without the event loop checking in.
const STUCK: Duration = Duration::from_secs(2);

/// What the router's admin socket and metrics report.
struct Shared {
    router: Arc<Router>,
    identity: super::netns::SourceIdentity,
    listen: SocketAddr,
    splice: bool,
    generation: AtomicU64,
    table_error: Mutex<Option<String>>,
    last_alive: Mutex<Option<Instant>>,
    /// A duplicate of the listening socket: passed to the agent, and shut
    /// at drain (which stops it listening for every holder).
    listener: std::os::fd::OwnedFd,
    listener_inode: u64,
}

impl Shared {
    fn status(&self) -> RouterStatusView {
        let gauges = self.router.gauges();
        RouterStatusView {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            listen: self.listen.to_string(),
            splice: self.splice,
            generation: self.generation.load(Ordering::Relaxed),
            routes: self.router.routes(),
            client_connections: gauges.client_connections,
            backend_connections: gauges.backend_connections,
            held_bytes: gauges.held_bytes,
            pools: crate::api::NamespacePoolsView {
                source_identity: self.identity.as_str().into(),
                namespaces: self.router.namespaces().unwrap_or(0),
                namespace_pools: gauges.origin_pools,
                namespace_connections: gauges.origin_connections,
            },
            unserved_closed: self.router.unserved(),
            pod_probe_timeouts: balancer_router::stats::POD_PROBE_TIMEOUTS.load(Ordering::Relaxed),
            listener_inode: self.listener_inode,
            ejected: self
                .router
                .endpoint_stats()
                .iter()
                .filter(|(_, s)| s.ejected.is_some())
                .count(),
            table_error: self
                .table_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    fn alive(&self) -> bool {
        self.last_alive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < STUCK)
    }

    /// Ready: its event loop checks in, its listener still accepts (not
    /// draining: SIGTERM shuts it, and a new router takes the new
    /// connections), and the newest table was read (not only an older
    /// one kept serving).
    fn ready(&self) -> Result<(), String> {
        if !self.alive() {
            return Err("the router's event loop is not checking in".into());
        }
        if !nix::sys::socket::getsockopt(&self.listener, nix::sys::socket::sockopt::AcceptConn)
            .unwrap_or(false)
        {
            return Err("draining: its listener accepts no more connections".into());
        }
        if let Some(e) = self
            .table_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Err(format!(
                "serving an older table: the newest could not be read: {e}"
            ));
        }
        Ok(())
    }
}

/// The maps besides the table, opened from the pins.
fn open_maps(dir: &Path, splice: bool) -> Result<Maps, TableError> {
    let open = |name: &'static str| pin::open_map(dir, name);
    let err = |map: &'static str| move |source| TableError::Map { map, source };
    Ok(Maps {
        orig_dst: HashMap::try_from(open(map_names::ORIG_DST)?)
            .map_err(err(map_names::ORIG_DST))?,
        config: Array::try_from(open(map_names::CONFIG)?).map_err(err(map_names::CONFIG))?,
        listeners: Array::try_from(open(map_names::ROUTER_LISTENERS)?)
            .map_err(err(map_names::ROUTER_LISTENERS))?,
        splice: if splice {
            Some(SockHash::try_from(open(map_names::SPLICE)?).map_err(err(map_names::SPLICE))?)
        } else {
            None
        },
        served: HashMap::try_from(open(map_names::SERVED_NETNS)?)
            .map_err(err(map_names::SERVED_NETNS))?,
    })
}

/// The listener the agent holds for `listen` (a dead router's, with the
/// connections queued on it), if it has one and it is what it claims.
async fn adopt_held(agent_socket: &Path, listen: SocketAddr) -> Option<std::net::TcpListener> {
    let path = agent_socket.to_owned();
    let asked = tokio::task::spawn_blocking(move || {
        admin::request_fd::<Option<ListenerView>>(
            &path,
            &Request::HeldListener { listen },
            Duration::from_millis(500),
        )
    })
    .await
    .ok()?;
    let fd = match asked {
        Ok((_, Some(fd))) => fd,
        Ok((_, None)) => return None,
        Err(e) => {
            tracing::debug!(error = %e, "no listener from the agent");
            return None;
        }
    };
    match socket::listener_on(fd, listen) {
        Ok(l) => {
            tracing::info!(%listen, "adopted the listener the agent held: serving the connections queued while no router ran");
            Some(l)
        }
        Err(socket::NotListener { listening, bound }) => {
            tracing::warn!(
                ?bound,
                listening,
                "the agent passed a socket that is not our listener; ignoring it"
            );
            None
        }
    }
}

/// Listen on CONFIG's address, written first (without a heartbeat unless a
/// router already beats there), so that sock_ops counts the listener; then
/// see whether it did: it does only for a router in the attached cgroup.
fn listen_counted(router: &Router, cfg: Config) -> std::io::Result<std::net::TcpListener> {
    let current = router.config().unwrap_or_default();
    let same = current.router_port == cfg.router_port
        && current.router4 == cfg.router4
        && current.router6 == cfg.router6;
    if !same {
        router
            .write_config(cfg)
            .map_err(|e| std::io::Error::other(format!("writing CONFIG: {e}")))?;
    }
    let before = router.listeners();
    let listener = socket::bind_reuseport(plan::config_router_addr(&cfg))?;
    let tracked = router.listeners() > before;
    router.set_tracked(tracked);
    if tracked {
        tracing::info!("sock_ops sees the router's listener: if the router dies, L4 at once");
    } else {
        tracing::warn!(
            "sock_ops does not see the router's listener (the router is not in the cgroup the \
             agent attached to): if the router dies, http2 ports go back to L4 only when its \
             heartbeat is stale, after 1 s"
        );
    }
    Ok(listener)
}

/// Wait until the agent has pinned a complete data path, then open it.
async fn wait_for_pins(dir: &Path, splice: bool) -> (PinnedTable, Maps) {
    let mut said = None::<Instant>;
    loop {
        if pin::is_pinned(dir) {
            match PinnedTable::open(dir).and_then(|t| Ok((t, open_maps(dir, splice)?))) {
                Ok(x) => return x,
                Err(e) => {
                    if said.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        tracing::warn!(error = %e, "cannot open the pinned data path yet");
                        said = Some(Instant::now());
                    }
                }
            }
        } else if said.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            tracing::info!(
                pins = %dir.display(),
                "waiting for the agent to pin the data path (balancer-agent run --pin)"
            );
            said = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Poll the generation; re-read the table when it moved, and reopen
/// everything when the agent pinned a fresh data path. Runs on its own
/// thread: map reads are syscalls, thousands for a large table.
fn watch_table(shared: Arc<Shared>, mut table: PinnedTable, dir: PathBuf, stop: Arc<AtomicBool>) {
    let mut last = shared.generation.load(Ordering::Relaxed);
    let mut checked = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TABLE_POLL);
        if checked.elapsed() >= PIN_CHECK {
            checked = Instant::now();
            if !table.current() && pin::is_pinned(&dir) {
                match PinnedTable::open(&dir).and_then(|t| Ok((t, open_maps(&dir, shared.splice)?)))
                {
                    Ok((t, maps)) => {
                        tracing::info!("the agent pinned a new data path; reading it");
                        table = t;
                        shared.router.replace_maps(maps);
                        last = u64::MAX;
                    }
                    Err(e) => tracing::debug!(error = %e, "new pins not readable yet"),
                }
            }
        }
        let g = match table.generation() {
            Ok(g) => g,
            Err(e) => {
                record(&shared, Some(e.to_string()));
                continue;
            }
        };
        if g == last || g % 2 == 1 {
            continue;
        }
        match table.read() {
            Ok((g, routes)) => {
                shared.router.update(&routes);
                shared.generation.store(g, Ordering::Relaxed);
                record(&shared, None);
                tracing::debug!(generation = g, routes = routes.len(), "routing table read");
                last = g;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the routing table; serving the last one");
                record(&shared, Some(e.to_string()));
            }
        }
    }
}

fn record(shared: &Shared, error: Option<String>) {
    *shared.table_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
}

fn answer(shared: Arc<Shared>) -> admin::Answer {
    Arc::new(move |req: Request| {
        let shared = shared.clone();
        Box::pin(async move {
            match req {
                Request::RouterStatus => serde_json::to_value(shared.status())
                    .map(|v| (v, None))
                    .map_err(|e| e.to_string()),
                Request::RouterListener => {
                    let fd = shared.listener.try_clone().map_err(|e| e.to_string())?;
                    let view = ListenerView {
                        inode: shared.listener_inode,
                    };
                    let v = serde_json::to_value(view).map_err(|e| e.to_string())?;
                    Ok((v, Some(fd)))
                }
                Request::RouterEndpoints => {
                    let v: Vec<RouterEndpointView> = shared
                        .router
                        .endpoint_stats()
                        .into_iter()
                        .map(|(address, stats)| RouterEndpointView { address, stats })
                        .collect();
                    serde_json::to_value(v)
                        .map(|v| (v, None))
                        .map_err(|e| e.to_string())
                }
                other => Err(format!(
                    "this is the router's socket; {other:?} goes to the agent's (--admin-socket of `run`)"
                )),
            }
        })
    })
}

fn metrics_handler(shared: Arc<Shared>) -> metrics::Handler {
    Arc::new(move |path: String| {
        let shared = shared.clone();
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => metrics::ok(metrics::render_router(&shared.status())),
                // Alive: the event loop checks in (a stuck router is
                // restarted; its clients fall back to L4 meanwhile).
                "/healthz" if shared.alive() => metrics::ok("ok\n".into()),
                "/healthz" => metrics::unavailable("the router's event loop is not checking in"),
                "/readyz" => match shared.ready() {
                    Ok(()) => metrics::ok("ready\n".into()),
                    Err(why) => metrics::unavailable(&why),
                },
                _ => metrics::not_found(),
            }
        })
    })
}

pub async fn run(args: crate::args::RouterArgs) -> anyhow::Result<()> {
    let crate::args::RouterArgs {
        listen,
        cgroup,
        bpffs,
        admin_socket,
        agent_socket,
        metrics_addr,
        splice,
        drain_timeout,
        stream_idle_timeout,
        pod_probe_timeout,
        client_buffer,
        router_buffer_limit,
        router_threads,
        source_identity: identity,
        netns_dir,
        accrual,
    } = args;
    let threads = router_threads.map_or_else(super::default_threads, |n| n as usize);
    let limits = core::Limits {
        stream_idle_timeout,
        probe_timeout: pod_probe_timeout,
        client_buffer,
        buffer_limit: router_buffer_limit,
        ..Default::default()
    };
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "balancer-agent router must run as root: it opens the agent's pinned maps (CAP_BPF)"
        );
    }
    let cgroup = match cgroup {
        Some(c) => c,
        None => crate::node::cgroup2_root()?,
    };
    let dir = pin::dir_of(&bpffs, &cgroup)?;
    // Before anything is taken over (the admin socket of a router that
    // still serves, in an upgrade): a router that cannot enter namespaces
    // says so now, and names the fix.
    let namespaces = match identity {
        super::netns::SourceIdentity::Pod => Some(Arc::new(
            super::netns::Namespaces::new(netns_dir)
                .map_err(|e| anyhow::anyhow!("--source-identity pod: {e}"))?,
        )),
        super::netns::SourceIdentity::Node => None,
    };
    let admin_listener = admin::bind(&admin_socket, true)?;
    let _socket_guard = RemoveOnDrop(admin_socket.clone());
    let metrics_listener = socket::bind_metrics(metrics_addr)?;
    let (table, maps) = wait_for_pins(&dir, splice).await;
    let router = Router::new(maps, limits, accrual.policy(), namespaces.clone());
    let stop = Arc::new(AtomicBool::new(false));
    // The namespaces that exist are in SERVED_NETNS before the kernel
    // steers anything here; new ones are added as they appear.
    let netns_watcher = match &namespaces {
        Some(ns) => Some(super::netns::start(
            ns.clone(),
            router.clone(),
            stop.clone(),
        )?),
        None => None,
    };
    let mut cfg = Config {
        splice: u8::from(splice),
        identity: match identity {
            super::netns::SourceIdentity::Pod => balancer_common::Identity::Pod as u8,
            super::netns::SourceIdentity::Node => balancer_common::Identity::Node as u8,
        },
        ..Config::default()
    };
    plan::set_config_router_addr(&mut cfg, listen);
    let listener = match adopt_held(&agent_socket, listen).await {
        Some(l) => {
            // Counted by sock_ops when it was opened, if the router that
            // opened it was: that router wrote it to CONFIG.
            router.set_tracked(router.config().is_some_and(|c| c.track_listeners != 0));
            l
        }
        None => listen_counted(&router, cfg)
            .map_err(|e| anyhow::anyhow!("cannot listen on --listen {listen}: {e}"))?,
    };
    let listener_dup: std::os::fd::OwnedFd = listener.try_clone()?.into();
    let listener_inode = nix::sys::stat::fstat(&listener_dup)
        .map(|s| s.st_ino)
        .unwrap_or(0);
    let (generation, routes) = {
        // The first table before serving: a router that is steered to
        // knows every http2 port.
        let mut first = table.read();
        while let Err(e) = &first {
            tracing::warn!(error = %e, "cannot read the routing table yet");
            tokio::time::sleep(Duration::from_millis(100)).await;
            first = table.read();
        }
        first.unwrap_or_default()
    };
    router.update(&routes);
    tracing::info!(generation, routes = routes.len(), pins = %dir.display(), "routing table read");
    let shared = Arc::new(Shared {
        router: router.clone(),
        identity,
        listen,
        splice,
        generation: AtomicU64::new(generation),
        table_error: Mutex::new(None),
        last_alive: Mutex::new(None),
        listener: listener_dup,
        listener_inode,
    });
    let watcher = {
        let (shared, dir, stop) = (shared.clone(), dir.clone(), stop.clone());
        std::thread::Builder::new()
            .name("table".into())
            .spawn(move || watch_table(shared, table, dir, stop))?
    };
    let router_threads = router.spawn_threads(listener, threads)?;
    let admin_task = tokio::spawn(admin::serve(admin_listener, answer(shared.clone())));
    let metrics_task =
        metrics_listener.map(|l| tokio::spawn(metrics::serve(l, metrics_handler(shared.clone()))));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut beat = tokio::time::interval(HEARTBEAT);
    let mut said_ready = false;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                if router.take_alive() {
                    *shared.last_alive.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                    match router.heartbeat(cfg) {
                        Ok(()) if !said_ready => {
                            tracing::info!(%listen, splice, "HTTP/2 router listening; the kernel steers http2 ports here");
                            said_ready = true;
                        }
                        Ok(()) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot write the heartbeat to CONFIG"),
                    }
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break; }
        }
    }
    // Two-phase GOAWAY to every client, then let their streams finish.
    // The heartbeat stops now: the listener closes at once, so new
    // connections go to the next router (SO_REUSEPORT, which beats on), or
    // to L4 within a second when there is none.
    let handover = async {
        // Our listener closes as the drain starts. When sock_ops counts
        // listeners, the kernel knows at once whether another router
        // listens. Otherwise: if no other router answers on the address,
        // tell the kernel now (else new connections would be refused
        // until the heartbeat is stale).
        // Shut, not only closed: the agent's duplicate stops listening too
        // (else connections would queue on it with nobody to accept them).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&shared.listener),
            nix::sys::socket::Shutdown::Both,
        );
        if router.tracked() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let other = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(listen),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !other {
            cfg.heartbeat_ns = 0;
            let _ = router.write_config(cfg);
            tracing::info!("no other router listens: http2 ports go back to L4 now");
        }
    };
    let (open, ()) = tokio::join!(router.drain(drain_timeout), handover);
    if open > 0 {
        tracing::warn!(
            open,
            "drain timeout: closing client connections with streams in flight"
        );
    }
    router_threads.stop();
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    if let Some(w) = netns_watcher {
        let _ = w.join();
    }
    admin_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    tracing::info!("router stopped");
    Ok(())
}
