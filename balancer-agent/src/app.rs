//! `balancer-agent run`: the control plane. It attaches the programs, keeps
//! their maps in sync with the endpoint source, and serves the admin
//! socket and metrics. It holds no HTTP/2 connection: the router is its own
//! process (`router::process`), which reads the same pinned maps, so this
//! one can crash, OOM or restart without touching a client.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    admin,
    agent::{Agent, fill_kernel, fill_router},
    api::{ListenerView, Request, RouterEndpointView, RouterStatusView},
    dataplane::{AffinityReader, Dataplane},
    metrics, socket,
    source::{self, file},
    state,
};

/// How long the agent waits for the router's socket to answer.
const ROUTER_ASK_TIMEOUT: Duration = Duration::from_millis(500);

/// The router process `run --proxy-addr` starts.
pub struct SpawnRouter {
    pub listen: std::net::SocketAddr,
    /// Its arguments besides the paths, which are the agent's.
    pub args: Vec<String>,
}

/// A router this agent started or found; stopped with the agent.
enum OwnedRouter {
    Child(std::process::Child),
    Found(u32),
}

/// Start the router process, unless one answers on `router_socket` for
/// the same address (an agent that was killed started it).
async fn ensure_router(
    spawn: &SpawnRouter,
    router_socket: &Path,
    admin_socket: &Path,
    cgroup: &Path,
    bpffs: &Path,
) -> anyhow::Result<OwnedRouter> {
    if let Ok(st) = ask_router::<RouterStatusView>(router_socket, &Request::RouterStatus).await
        && st.listen == spawn.listen.to_string()
    {
        tracing::info!(pid = st.pid, listen = %st.listen, "a router already runs; keeping it");
        return Ok(OwnedRouter::Found(st.pid));
    }
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe()?;
    let child = std::process::Command::new(exe)
        .arg("router")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--bpffs")
        .arg(bpffs)
        .arg("--admin-socket")
        .arg(router_socket)
        .arg("--agent-socket")
        .arg(admin_socket)
        .args(&spawn.args)
        // Its own process group: a Ctrl-C to the agent's terminal, or a
        // signal to the agent's group, does not reach it.
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start the router process: {e}"))?;
    tracing::info!(pid = child.id(), listen = %spawn.listen, "started the router process");
    Ok(OwnedRouter::Child(child))
}

/// SIGTERM to the router (it drains), and wait for it.
async fn stop_router(router: OwnedRouter) {
    use nix::{sys::signal, unistd::Pid};
    let pid = match &router {
        OwnedRouter::Child(c) => c.id(),
        OwnedRouter::Found(p) => *p,
    };
    let pid = Pid::from_raw(pid as i32);
    let _ = signal::kill(pid, signal::Signal::SIGTERM);
    tracing::info!(%pid, "stopping the router (it drains its clients)");
    match router {
        OwnedRouter::Child(mut c) => {
            let _ = tokio::task::spawn_blocking(move || c.wait()).await;
        }
        OwnedRouter::Found(_) => {
            // Not our child: wait until it is gone.
            while signal::kill(pid, None).is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        // ... mount-point ... - fstype source options
        let mut halves = line.split(" - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mnt) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mnt));
        }
    }
    anyhow::bail!("no cgroup v2 hierarchy is mounted; pass --cgroup")
}

/// Ask the router process on `path`, with a short timeout: a router that
/// is down or stuck must not hold up the agent's answers.
pub async fn ask_router<T: for<'de> serde::Deserialize<'de>>(
    path: &Path,
    req: &Request,
) -> Result<T, String> {
    match tokio::time::timeout(ROUTER_ASK_TIMEOUT, admin::request(path, req)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the router at {} did not answer within {ROUTER_ASK_TIMEOUT:?}",
            path.display()
        )),
    }
}

/// A duplicate of the router's listening socket, held so that it outlives
/// the router: connections made while no router runs queue on it, for the
/// next router to adopt.
struct Held {
    fd: std::os::fd::OwnedFd,
    inode: u64,
    listen: std::net::SocketAddr,
    /// When the router last answered.
    seen: std::time::Instant,
}

type HeldSlot = Arc<Mutex<Option<Held>>>;

/// Keep a duplicate of the live router's listener; shut it when no router
/// answered for `grace` (its queued connections reset, and the clients
/// reconnect at L4 rather than wait for a router that does not come).
async fn hold_router_listener(router_socket: PathBuf, held: HeldSlot, grace: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        match ask_router::<RouterStatusView>(&router_socket, &Request::RouterStatus).await {
            Ok(st) => {
                let mine = {
                    let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(h) = h.as_mut() {
                        h.seen = std::time::Instant::now();
                    }
                    h.as_ref().is_some_and(|h| h.inode == st.listener_inode)
                };
                if mine || st.listener_inode == 0 {
                    continue;
                }
                let Ok(listen) = st.listen.parse() else {
                    continue;
                };
                let path = router_socket.clone();
                let got = tokio::task::spawn_blocking(move || {
                    admin::request_fd::<ListenerView>(
                        &path,
                        &Request::RouterListener,
                        Duration::from_millis(500),
                    )
                })
                .await;
                if let Ok(Ok((_, Some(fd)))) = got {
                    let inode = nix::sys::stat::fstat(&fd).map(|s| s.st_ino).unwrap_or(0);
                    tracing::info!(%listen, pid = st.pid, "holding the router's listener");
                    *held.lock().unwrap_or_else(|p| p.into_inner()) = Some(Held {
                        fd,
                        inode,
                        listen,
                        seen: std::time::Instant::now(),
                    });
                }
            }
            Err(_) => {
                let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
                if h.as_ref().is_some_and(|h| h.seen.elapsed() > grace)
                    && let Some(old) = h.take()
                {
                    let _ = nix::sys::socket::shutdown(
                        std::os::fd::AsRawFd::as_raw_fd(&old.fd),
                        nix::sys::socket::Shutdown::Both,
                    );
                    tracing::warn!(
                        listen = %old.listen,
                        ?grace,
                        "no router came back: shut the listener it left (connections queued on it reset)"
                    );
                }
            }
        }
    }
}

/// The agent's answers: the view under the lock, then AFFINITY's fill and
/// the router's part from its socket after releasing it.
fn answer(
    agent: Arc<Mutex<Agent>>,
    affinity: Arc<AffinityReader>,
    router_socket: PathBuf,
    held: HeldSlot,
) -> admin::Answer {
    Arc::new(move |req: Request| {
        let agent = agent.clone();
        let affinity = affinity.clone();
        let router_socket = router_socket.clone();
        let held = held.clone();
        Box::pin(async move {
            match req {
                Request::HeldListener { listen } => {
                    let h = held.lock().unwrap_or_else(|p| p.into_inner());
                    match h.as_ref().filter(|h| h.listen == listen) {
                        Some(h) => {
                            let fd = h.fd.try_clone().map_err(|e| e.to_string())?;
                            tracing::info!(%listen, "passing the held listener to a new router");
                            let view = ListenerView { inode: h.inode };
                            let v = serde_json::to_value(view).map_err(|e| e.to_string())?;
                            Ok((v, Some(fd)))
                        }
                        None => Ok((serde_json::Value::Null, None)),
                    }
                }
                Request::Status => {
                    let mut status = agent.lock().unwrap_or_else(|p| p.into_inner()).status();
                    if let Ok(fill) = tokio::task::spawn_blocking(move || affinity.fill()).await {
                        status.maps.push(fill.into());
                    }
                    if let Some(r) = status.router.as_mut() {
                        match ask_router::<RouterStatusView>(&router_socket, &Request::RouterStatus)
                            .await
                        {
                            Ok(p) => r.process = Some(p),
                            Err(e) => r.error = Some(e),
                        }
                    }
                    serde_json::to_value(status)
                        .map(|v| (v, None))
                        .map_err(|e| e.to_string())
                }
                req => {
                    let mut view = agent
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .endpoints_for(&req)?;
                    if let Ok(r) = ask_router::<Vec<RouterEndpointView>>(
                        &router_socket,
                        &Request::RouterEndpoints,
                    )
                    .await
                    {
                        fill_router(&mut view, &r);
                    }
                    serde_json::to_value(view)
                        .map(|v| (v, None))
                        .map_err(|e| e.to_string())
                }
            }
        })
    })
}

/// The agent's metrics listener: each scrape takes the agent's lock only
/// for what costs no syscall per backend (the endpoints' shape, the
/// status), and reads the per-backend counts through its own handle on
/// the map after releasing it (and AFFINITY's fill likewise): a scrape
/// never holds up an update.
fn metrics_handler(
    agent: Arc<Mutex<Agent>>,
    stats: crate::dataplane::StatsReader,
    affinity: Arc<AffinityReader>,
    router_socket: PathBuf,
) -> metrics::Handler {
    let stats = Arc::new(stats);
    Arc::new(move |path: String| {
        let agent = agent.clone();
        let stats = stats.clone();
        let affinity = affinity.clone();
        let router_socket = router_socket.clone();
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => {
                    let (mut view, mut status) = {
                        let a = agent.lock().unwrap_or_else(|p| p.into_inner());
                        (a.endpoints_shape(None), a.status())
                    };
                    let router = ask_router::<Vec<RouterEndpointView>>(
                        &router_socket,
                        &Request::RouterEndpoints,
                    )
                    .await
                    .unwrap_or_default();
                    let body = tokio::task::spawn_blocking(move || {
                        fill_kernel(&mut view, |id| stats.get(id));
                        fill_router(&mut view, &router);
                        status.maps.push(affinity.fill().into());
                        metrics::render(&view, &status)
                    })
                    .await
                    .unwrap_or_default();
                    metrics::ok(body)
                }
                "/healthz" => metrics::ok("ok\n".into()),
                "/readyz" => {
                    // Ready: programs attached (the agent exists only then)
                    // and the first sync applied.
                    if agent
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .reload
                        .applied
                        > 0
                    {
                        metrics::ok("ready\n".into())
                    } else {
                        metrics::unavailable("not synced yet")
                    }
                }
                _ => metrics::not_found(),
            }
        })
    })
}

pub async fn run(args: crate::args::RunArgs) -> anyhow::Result<()> {
    let crate::args::RunArgs {
        endpoints_file,
        node_name,
        cgroup,
        admin_socket,
        bpffs,
        pin,
        router_socket,
        router_grace,
        accrual,
        metrics_addr,
        end_removed_connections,
        netns_dir,
        spawn,
    } = args;
    let accrual = accrual.policy();
    let spawn_router = spawn.router(&netns_dir);
    let pin_root = pin.then_some(bpffs);
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "balancer-agent run must run as root: loading eBPF programs needs CAP_BPF, \
             CAP_NET_ADMIN and CAP_SYS_ADMIN"
        );
    }
    // Parse the file (or find the cluster) before touching the kernel: a
    // bad file attaches nothing.
    let source = match &endpoints_file {
        Some(path) => {
            let (bytes, initial) = file::load(path).await?;
            Source::File(path.clone(), bytes, initial)
        }
        None => {
            let client = ::kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!(
                    "no --endpoints-file and no Kubernetes configuration \
                     (KUBECONFIG, ~/.kube/config or in-cluster): {e}"
                )
            })?;
            Source::Kube(client)
        }
    };
    let cgroup = match cgroup {
        Some(c) => c,
        None => cgroup2_root()?,
    };
    let listener = admin::bind(&admin_socket, false)?;
    let _socket_guard = RemoveOnDrop(admin_socket.clone());
    let metrics_listener = socket::bind_metrics(metrics_addr)?;
    let dataplane = Dataplane::attach(&cgroup, pin_root.as_deref())?;
    if dataplane.adopted {
        tracing::info!(cgroup = %cgroup.display(), "adopted the pinned data path; it never stopped");
    } else {
        tracing::info!(cgroup = %cgroup.display(), pinned = pin_root.is_some(), "programs attached");
    }
    if dataplane.pin_dir.is_none() {
        tracing::info!(
            "not pinned (no --pin): the router process cannot read the data path, so http2 \
             ports are balanced per connection"
        );
    }
    let pinned = dataplane.pin_dir.clone();
    let (kind, where_) = match &source {
        Source::File(p, _, _) => ("file", p.display().to_string()),
        Source::Kube(c) => ("kubernetes", c.default_namespace().to_owned()),
    };
    let mut agent = Agent::new(dataplane, kind, where_);
    agent.l4 = crate::eject::L4Accrual::new(accrual);
    if end_removed_connections {
        agent.ender = Some(crate::gone::Ender::new(netns_dir)?);
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let watch_task = match source {
        Source::File(path, bytes, initial) => {
            agent
                .apply(initial)
                .map_err(|e| anyhow::anyhow!("cannot program the endpoints: {e}"))?;
            tokio::spawn(file::watch(path, bytes, tx))
        }
        Source::Kube(client) => {
            let health = Arc::new(Mutex::new(crate::api::ApiserverState::default()));
            agent.apiserver = Some(health.clone());
            tokio::spawn(source::kube::run(client, node_name, tx, health))
        }
    };
    let affinity = Arc::new(agent.dataplane.affinity_reader()?);
    let agent = Arc::new(Mutex::new(agent));
    let owned_router = match (&spawn_router, &pinned) {
        (Some(spawn), Some(_)) => Some(
            ensure_router(
                spawn,
                &router_socket,
                &admin_socket,
                &cgroup,
                pin_root
                    .as_deref()
                    .unwrap_or(Path::new("/sys/fs/bpf/balancer")),
            )
            .await?,
        ),
        _ => None,
    };

    let held: HeldSlot = Arc::new(Mutex::new(None));
    let admin_task = tokio::spawn(admin::serve(
        listener,
        answer(
            agent.clone(),
            affinity.clone(),
            router_socket.clone(),
            held.clone(),
        ),
    ));
    let hold_task = tokio::spawn(hold_router_listener(
        router_socket.clone(),
        held,
        router_grace,
    ));
    let metrics_task = match metrics_listener {
        Some(l) => {
            let stats = agent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dataplane
                .stats_reader()?;
            Some(tokio::spawn(metrics::serve(
                l,
                metrics_handler(agent.clone(), stats, affinity, router_socket),
            )))
        }
        None => None,
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Drained-backend collection, and failure accrual of tcp ports.
    let mut gc = tokio::time::interval(Duration::from_millis(250));
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::channel::<(std::net::SocketAddr, bool)>(64);
    tracing::info!(admin_socket = %admin_socket.display(), "agent ready");
    loop {
        tokio::select! {
            Some(update) = rx.recv() => {
                let mut a = agent.lock().unwrap_or_else(|p| p.into_inner());
                match update {
                    Ok(state) => {
                        if let Err(e) = a.apply(state) {
                            tracing::error!(error = %e, "reload refused; keeping the last good state");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused; keeping the last good state");
                        a.reject(e.to_string());
                    }
                }
            }
            _ = gc.tick() => {
                let now = std::time::Instant::now();
                let probes = {
                    let mut a = agent.lock().unwrap_or_else(|p| p.into_inner());
                    a.dataplane.collect_drained();
                    if a.accrual_tick(now) {
                        a.reprogram();
                    }
                    a.l4.due_probes(now)
                };
                for addr in probes {
                    // A real connect, from the node: the backend is back
                    // when it accepts one.
                    let tx = probe_tx.clone();
                    tokio::spawn(async move {
                        let ok = tokio::time::timeout(
                            Duration::from_secs(1),
                            tokio::net::TcpStream::connect(addr),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok());
                        let _ = tx.send((addr, ok)).await;
                    });
                }
            }
            Some((addr, ok)) = probe_rx.recv() => {
                let mut a = agent.lock().unwrap_or_else(|p| p.into_inner());
                if a.l4.probe_result(addr, ok, std::time::Instant::now()) {
                    a.reprogram();
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM: detaching"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: detaching"); break; }
        }
    }
    if let Some(r) = owned_router {
        stop_router(r).await;
    }
    admin_task.abort();
    hold_task.abort();
    watch_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
        let _ = t.await;
    }
    let _ = admin_task.await;
    let _ = watch_task.await;
    // The last reference: dropping it drops the eBPF object, which closes
    // the link fds and so detaches every program that is not pinned.
    drop(agent);
    match pinned {
        Some(dir) => tracing::info!(
            pins = %dir.display(),
            "left the data path pinned for the next agent; `balancer-agent cleanup` removes it"
        ),
        None => tracing::info!("detached; bye"),
    }
    Ok(())
}

enum Source {
    File(PathBuf, Vec<u8>, state::DesiredState),
    Kube(::kube::Client),
}

pub struct RemoveOnDrop(pub PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
