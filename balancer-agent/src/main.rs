//! balancer-agent: the node agent (`run`) and its CLI (`status`, `services`,
//! `endpoints`).
// No unsafe code but in `dataplane::query` (BPF_PROG_QUERY), which says why.
#![deny(unsafe_code)]

mod admin;
mod agent;
mod cli;
mod dataplane;
mod metrics;
mod proxy;
mod source;
mod state;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};

use crate::{admin::Request, agent::Agent, dataplane::Dataplane, source::file};

const DEFAULT_ADMIN_SOCKET: &str = "/run/balancer/admin.sock";

#[derive(Parser)]
#[command(version, about = "Socket-level load balancer for Kubernetes Services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, Default)]
enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the eBPF programs, attach them to a cgroup and keep their maps in
    /// sync with an endpoints file, or, without one, with the cluster's
    /// Services and EndpointSlices.
    Run {
        /// YAML or JSON endpoints file; reloaded when it changes. Without
        /// it, the Kubernetes API is watched (configured like kubectl:
        /// KUBECONFIG, ~/.kube/config, or the in-cluster service account).
        #[arg(long)]
        endpoints_file: Option<PathBuf>,
        /// This node's name, for topology hints and internalTrafficPolicy.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// cgroup v2 directory to attach to (default: the cgroup v2 root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// bpffs directory for pins (mounted if missing).
        #[arg(long, default_value = "/sys/fs/bpf/balancer")]
        bpffs: PathBuf,
        /// Pin maps and links under --bpffs: the data path outlives the
        /// agent (restarts, kill -9, upgrades adopt it) and SIGTERM leaves it
        /// in place. `balancer-agent cleanup` removes it.
        #[arg(long)]
        pin: bool,
        /// Address of the HTTP/2 frame router (for `protocol: http2` ports).
        #[arg(long)]
        proxy_addr: Option<std::net::SocketAddr>,
        /// Splice client and router sockets with sk_msg (SockHash
        /// redirect), skipping TCP/IP on that hop. Experimental: see
        /// bench/results/http2.txt for what it measured.
        #[arg(long, requires = "proxy_addr")]
        splice: bool,
        /// Prometheus metrics and /healthz, /readyz on this address.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// On SIGTERM, how long HTTP/2 clients get to finish their streams
        /// after the GOAWAY.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        drain_timeout: Duration,
        /// An HTTP/2 stream with no frame either way for this long is reset
        /// on both hops (Envoy's stream_idle_timeout default). Streaming
        /// RPCs that keep exchanging messages are never cut.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        stream_idle_timeout: Duration,
        /// What one HTTP/2 client connection may make the router hold:
        /// unread responses (through the windows granted to pods) and
        /// queued request bytes (its connection window). Like 4MiB, 512KiB.
        #[arg(long, default_value = "4MiB", value_parser = parse_size)]
        client_buffer: usize,
        /// What the responses of all HTTP/2 clients together may make the
        /// router hold; past it pods get a minimal window per stream.
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        router_buffer_limit: usize,
    },
    /// Remove every pin (and so detach every pinned program) under --bpffs.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/balancer")]
        bpffs: PathBuf,
    },
    /// Programs, cgroup, maps, source and the last reload.
    Status {
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Services and their ports.
    Services {
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// A live per-pod view: connections, streams/s, share of traffic,
    /// latency, and the imbalance (busiest / mean) per service.
    Top {
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// Refresh period.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        /// Stop after this many refreshes (default: until Ctrl-C).
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Endpoints with their live connection counts.
    Endpoints {
        /// Only this service (namespace/name).
        name: Option<String>,
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Run {
                endpoints_file,
                node_name,
                cgroup,
                admin_socket,
                bpffs,
                pin,
                proxy_addr,
                splice,
                metrics_addr,
                drain_timeout,
                stream_idle_timeout,
                client_buffer,
                router_buffer_limit,
            } => {
                run(RunOptions {
                    limits: proxy::core::Limits {
                        stream_idle_timeout,
                        client_buffer,
                        buffer_limit: router_buffer_limit,
                        ..Default::default()
                    },
                    splice,
                    endpoints_file,
                    node_name,
                    pin_root: pin.then_some(bpffs),
                    cgroup,
                    admin_socket,
                    proxy_addr,
                    metrics_addr,
                    drain_timeout,
                })
                .await
            }
            Command::Cleanup { bpffs } => {
                let removed = dataplane::pin::cleanup(&bpffs)?;
                if removed.is_empty() {
                    println!("nothing pinned under {}", bpffs.display());
                }
                for r in removed {
                    println!("removed {}", r.display());
                }
                Ok(())
            }
            Command::Status {
                admin_socket,
                output,
            } => {
                let v = admin::request(&admin_socket, &Request::Status).await?;
                cli::print_status(&v, matches!(output, Output::Json))
            }
            Command::Services {
                admin_socket,
                output,
            } => {
                let v = admin::request(&admin_socket, &Request::Services).await?;
                cli::print_services(&v, matches!(output, Output::Json))
            }
            Command::Top {
                admin_socket,
                interval,
                iterations,
            } => cli::top(&admin_socket, interval, iterations).await,
            Command::Endpoints {
                name,
                admin_socket,
                output,
            } => {
                let v = admin::request(&admin_socket, &Request::Endpoints { name }).await?;
                cli::print_endpoints(&v, matches!(output, Output::Json))
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// "10s", "500ms", "2m" or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (like 10s, 500ms, 2m)");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(bad()),
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let bad = || format!("{s:?} is not a size (like 4MiB, 512KiB, 1GiB, 65536)");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| (&s[..i], &s[i..]));
    let n: usize = num.parse().map_err(|_| bad())?;
    let mult: usize = match unit {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        _ => return Err(bad()),
    };
    let v = n.checked_mul(mult).ok_or_else(bad)?;
    if v < 64 * 1024 {
        return Err(format!(
            "{s:?} is below the 64KiB minimum (one HTTP/2 window)"
        ));
    }
    Ok(v)
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
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

/// Everything `run` takes from the command line.
struct RunOptions {
    endpoints_file: Option<PathBuf>,
    node_name: Option<String>,
    pin_root: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    admin_socket: PathBuf,
    proxy_addr: Option<std::net::SocketAddr>,
    splice: bool,
    metrics_addr: Option<std::net::SocketAddr>,
    drain_timeout: Duration,
    limits: proxy::core::Limits,
}

async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let RunOptions {
        endpoints_file,
        node_name,
        pin_root,
        cgroup,
        admin_socket,
        proxy_addr,
        splice,
        metrics_addr,
        drain_timeout,
        limits,
    } = opts;
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
    let listener = admin::bind(&admin_socket)?;
    let _socket_guard = RemoveOnDrop(admin_socket.clone());
    let router_listener = match proxy_addr {
        Some(addr) => Some(
            proxy::bind_reuseport(addr)
                .map_err(|e| anyhow::anyhow!("cannot listen on --proxy-addr {addr}: {e}"))?,
        ),
        None => None,
    };
    let metrics_listener = match metrics_addr {
        Some(addr) => Some(
            // SO_REUSEPORT too: during an upgrade both agents listen.
            proxy::bind_reuseport(addr)
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(l)
                })
                .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?,
        ),
        None => None,
    };
    let mut dataplane = Dataplane::attach(&cgroup, pin_root.as_deref())?;
    if dataplane.adopted {
        tracing::info!(cgroup = %cgroup.display(), "adopted the pinned data path; it never stopped");
    } else {
        tracing::info!(cgroup = %cgroup.display(), pinned = pin_root.is_some(), "programs attached");
    }
    let pinned = dataplane.pin_dir.clone();
    let mut router_task = None;
    let router = match (proxy_addr, router_listener) {
        (Some(addr), Some(l)) => {
            let orig = dataplane
                .take_orig_dst()
                .ok_or_else(|| anyhow::anyhow!("ORIG_DST map already taken"))?;
            let splice_map = if splice {
                Some(
                    dataplane
                        .take_splice()
                        .ok_or_else(|| anyhow::anyhow!("SPLICE map already taken"))?,
                )
            } else {
                None
            };
            let router = proxy::Router::new(orig, splice_map, limits);
            router_task = Some(router.spawn_thread(l)?);
            dataplane.set_router(addr, splice)?;
            tracing::info!(%addr, "HTTP/2 router listening");
            Some(router)
        }
        _ => None,
    };
    let (kind, where_) = match &source {
        Source::File(p, _, _) => ("file", p.display().to_string()),
        Source::Kube(c) => ("kubernetes", c.default_namespace().to_owned()),
    };
    let mut agent = Agent::new(dataplane, kind, where_);
    agent.router = router.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let watch_task = match source {
        Source::File(path, bytes, initial) => {
            agent
                .apply(initial)
                .map_err(|e| anyhow::anyhow!("cannot program the endpoints: {e}"))?;
            tokio::spawn(file::watch(path, bytes, tx))
        }
        Source::Kube(client) => {
            let health = Arc::new(Mutex::new(source::kube::ApiserverState::default()));
            agent.apiserver = Some(health.clone());
            tokio::spawn(source::kube::run(client, node_name, tx, health))
        }
    };
    let agent = Arc::new(Mutex::new(agent));

    let admin_task = tokio::spawn(admin::serve(listener, agent.clone()));
    let metrics_task = match metrics_listener {
        Some(l) => {
            let stats = agent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dataplane
                .stats_reader()?;
            Some(tokio::spawn(metrics::serve(l, agent.clone(), stats)))
        }
        None => None,
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Drained-backend collection and the router heartbeat.
    let mut gc = tokio::time::interval(Duration::from_millis(250));
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
                let mut a = agent.lock().unwrap_or_else(|p| p.into_inner());
                a.dataplane.collect_drained();
                if router.as_ref().is_some_and(|r| r.take_alive())
                    && let Err(e) = a.dataplane.heartbeat()
                {
                    tracing::warn!(error = %e, "router heartbeat");
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM: detaching"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: detaching"); break; }
        }
    }
    if let Some(r) = &router {
        // Two-phase GOAWAY to every client, then let their streams finish.
        // The programs stay attached meanwhile, so new connections are
        // still balanced (and told to go away by the router).
        let open = r.drain(drain_timeout).await;
        if open > 0 {
            tracing::warn!(
                open,
                "drain timeout: closing client connections with streams in flight"
            );
        }
    }
    if let Some(t) = router_task {
        t.stop();
    }
    drop(router);
    admin_task.abort();
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

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
