//! `balancer-agent run`: the control plane. It attaches the programs, keeps
//! their maps in sync with the endpoint source, and serves the admin
//! socket and metrics. It holds no HTTP/2 connection: the router is its own
//! process (`router::process`), which reads the same pinned maps, so this
//! one can crash, OOM or restart without touching a client.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    admin,
    agent::{Agent, admin_answer},
    dataplane::Dataplane,
    metrics,
    node::{RemoveOnDrop, cgroup2_root},
    router_link::{HeldSlot, ensure_router, hold_router_listener, stop_router},
    socket,
    source::{self, file},
    state,
};

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
        if agent.dataplane.adopted {
            agent.sweep_after_first_state();
        }
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
        (Some(spawn), Some(_)) => {
            // Pinned, so there is a root: the router reads the pins there.
            let bpffs = pin_root.as_deref().context("--pin without --bpffs")?;
            Some(ensure_router(spawn, &router_socket, &admin_socket, &cgroup, bpffs).await?)
        }
        _ => None,
    };

    let held: HeldSlot = Arc::new(Mutex::new(None));
    let admin_task = tokio::spawn(admin::serve(
        listener,
        admin_answer(
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
                metrics::agent_handler(agent.clone(), stats, affinity, router_socket),
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
                agent.lock().unwrap_or_else(|p| p.into_inner()).update(update);
            }
            _ = gc.tick() => {
                let probes = agent
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .tick(std::time::Instant::now());
                for addr in probes {
                    tokio::spawn(crate::eject::probe(addr, probe_tx.clone()));
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
