//! balancer-agent: the node agent (`run`, the control plane), the HTTP/2
//! router (`router`, its own process) and the CLI (`status`, `services`,
//! `endpoints`, `top`, `cleanup`).
// No unsafe code but in `dataplane::query` (BPF_PROG_QUERY), which says why.
#![deny(unsafe_code)]

mod admin;
mod agent;
mod api;
mod app;
mod check;
mod cli;
mod dataplane;
mod eject;
mod fdpass;
mod gone;
mod metrics;
mod router;
mod socket;
mod source;
mod state;
mod units;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    api::Request,
    cli::Output,
    units::{keep, parse_duration, parse_size},
};

const DEFAULT_ADMIN_SOCKET: &str = "/run/balancer/admin.sock";
const DEFAULT_ROUTER_SOCKET: &str = "/run/balancer/router.sock";
const DEFAULT_BPFFS: &str = "/sys/fs/bpf/balancer";

#[derive(Parser)]
#[command(version, about = "Socket-level load balancer for Kubernetes Services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Failure accrual, for the agent's tcp ports and the router's streams.
#[derive(clap::Args)]
struct AccrualArgs {
    /// Failures in a row that eject an endpoint; 0 turns failure accrual
    /// off. `run` (tcp ports): failed connects, counted in the kernel.
    /// `router` (http2 ports): connects, resets by the pod, 5xx, gRPC
    /// Trailers-Only UNAVAILABLE / INTERNAL / UNKNOWN / DEADLINE_EXCEEDED.
    /// (linkerd2-proxy: 7; Envoy's consecutive_5xx: 5.)
    #[arg(long, default_value_t = 5)]
    failure_accrual: u32,
    /// First ejection; then one probe (stream or connect), and twice as
    /// long again if it fails. (linkerd2-proxy: 1s; Envoy's
    /// base_ejection_time: 30s.)
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    ejection_backoff: Duration,
    /// Longest ejection. (linkerd2-proxy: 60s; Envoy's max_ejection_time:
    /// 300s.)
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ejection_backoff_max: Duration,
    /// Most of a service's endpoints ejected at once, percent; never the
    /// last one. (Envoy's max_ejection_percent: 10.)
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    max_ejected_percent: u32,
}

impl AccrualArgs {
    fn policy(&self) -> balancer_router::accrual::Policy {
        balancer_router::accrual::Policy {
            consecutive: self.failure_accrual,
            min_backoff: self.ejection_backoff,
            max_backoff: self.ejection_backoff_max.max(self.ejection_backoff),
            max_ejected_percent: self.max_ejected_percent,
        }
    }
}

/// `run --proxy-addr` and the router flags it passes on.
#[derive(clap::Args)]
struct SpawnArgs {
    /// Outside Kubernetes, one command for both: also start the router
    /// process (`balancer-agent router --listen ADDR`), unless one
    /// already answers on --router-socket. It runs in a process group
    /// of its own and outlives this one (a restarted agent finds it);
    /// SIGTERM stops it too. Needs --pin.
    #[arg(long, requires = "pin")]
    proxy_addr: Option<std::net::SocketAddr>,
    /// With --proxy-addr: the router's --splice.
    #[arg(long, requires = "proxy_addr")]
    splice: bool,
    /// With --proxy-addr: the router's --drain-timeout.
    #[arg(long, requires = "proxy_addr", value_parser = keep(parse_duration))]
    drain_timeout: Option<String>,
    /// With --proxy-addr: the router's --stream-idle-timeout.
    #[arg(long, requires = "proxy_addr", value_parser = keep(parse_duration))]
    stream_idle_timeout: Option<String>,
    /// With --proxy-addr: the router's --client-buffer.
    #[arg(long, requires = "proxy_addr", value_parser = keep(parse_size))]
    client_buffer: Option<String>,
    /// With --proxy-addr: the router's --router-buffer-limit.
    #[arg(long, requires = "proxy_addr", value_parser = keep(parse_size))]
    router_buffer_limit: Option<String>,
    /// With --proxy-addr: the router's --router-threads.
    #[arg(long, requires = "proxy_addr", value_parser = clap::value_parser!(u32).range(1..=router::MAX_THREADS as i64))]
    router_threads: Option<u32>,
    /// With --proxy-addr: the router's --source-identity.
    #[arg(long, requires = "proxy_addr", value_enum)]
    source_identity: Option<router::netns::SourceIdentity>,
}

impl SpawnArgs {
    /// The router process to start, with its flags as given.
    fn router(self, netns_dir: &std::path::Path) -> Option<app::SpawnRouter> {
        let addr = self.proxy_addr?;
        let mut args = vec![
            format!("--listen={addr}"),
            format!("--netns-dir={}", netns_dir.display()),
        ];
        if self.splice {
            args.push("--splice".into());
        }
        for (flag, v) in [
            ("--drain-timeout", self.drain_timeout),
            ("--stream-idle-timeout", self.stream_idle_timeout),
            ("--client-buffer", self.client_buffer),
            ("--router-buffer-limit", self.router_buffer_limit),
            (
                "--router-threads",
                self.router_threads.map(|n| n.to_string()),
            ),
            (
                "--source-identity",
                self.source_identity.map(|i| i.as_str().to_owned()),
            ),
        ] {
            if let Some(v) = v {
                args.push(format!("{flag}={v}"));
            }
        }
        Some(app::SpawnRouter { listen: addr, args })
    }
}

#[derive(Subcommand)]
enum Command {
    /// The control plane: load the eBPF programs, attach them to a cgroup
    /// and keep their maps in sync with an endpoints file, or, without one,
    /// with the cluster's Services and EndpointSlices. HTTP/2 streams are
    /// routed by `balancer-agent router`, a process of its own.
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
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Pin maps and links under --bpffs: the data path outlives the
        /// agent (restarts, kill -9, upgrades adopt it) and SIGTERM leaves it
        /// in place; the router process reads its table from these pins.
        /// `balancer-agent cleanup` removes them.
        #[arg(long)]
        pin: bool,
        /// The router process's admin socket, asked for its streams per
        /// endpoint (`endpoints`, `top`, metrics) and its status.
        #[arg(long, default_value = DEFAULT_ROUTER_SOCKET)]
        router_socket: PathBuf,
        /// The agent holds a duplicate of the router's listening socket.
        /// When the router dies, clients that reconnect queue on it, and
        /// the next router adopts it and serves them, spread. A router not
        /// back within this time: the listener is shut (its queue resets;
        /// clients reconnect, balanced per connection).
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        router_grace: Duration,
        // tcp ports; http2 ports have the router's flags of the same names.
        #[command(flatten)]
        accrual: AccrualArgs,
        /// Prometheus metrics and /healthz, /readyz on this address.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// When an endpoint leaves its Services (its pod deleted, or its
        /// node declared dead; not while it is only terminating), end the
        /// client sockets connect() balanced to it, in their own network
        /// namespaces (sock_diag SOCK_DESTROY): their owners get
        /// ECONNABORTED at once and reconnect to a live pod, instead of
        /// waiting up to ~15 minutes for TCP to give up. Entering client
        /// pods' namespaces needs CAP_SYS_ADMIN (setns). `false` leaves
        /// them to TCP, as kube-proxy does.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        end_removed_connections: bool,
        /// Where the container runtime keeps pods' network namespace files
        /// (containerd and CRI-O: /var/run/netns): the connections of
        /// removed endpoints are ended there, and with --proxy-addr it is
        /// the router's --netns-dir.
        #[arg(long, default_value = "/var/run/netns")]
        netns_dir: PathBuf,
        #[command(flatten)]
        spawn: SpawnArgs,
    },
    /// The HTTP/2 router: balances every stream of `protocol: http2` ports
    /// over pooled pod connections. Reads its table from the maps `run
    /// --pin` pinned, so it keeps serving while the agent restarts.
    Router {
        /// Where pods reach the router (an address of the node); the kernel
        /// steers http2 ports here while the router's heartbeat is fresh.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The cgroup the agent attached to (default: the cgroup v2 root),
        /// which names its pin directory.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// The agent's --bpffs.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        #[arg(long, default_value = DEFAULT_ROUTER_SOCKET)]
        admin_socket: PathBuf,
        /// The agent's admin socket: a listener it held for a router that
        /// died is adopted, with the connections queued on it.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        agent_socket: PathBuf,
        /// Prometheus metrics and /healthz, /readyz on this address.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Splice client and router sockets with sk_msg (SockHash
        /// redirect), skipping TCP/IP on that hop. Experimental: see
        /// bench/results/http2.txt for what it measured.
        #[arg(long)]
        splice: bool,
        /// On SIGTERM, how long HTTP/2 clients get to finish their streams
        /// after the GOAWAY.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        drain_timeout: Duration,
        /// An HTTP/2 stream with no frame either way for this long is reset
        /// on both hops; 0 (the default): never, as at L4, where an idle
        /// stream lives as long as its connection (a gRPC watch may wait
        /// minutes for its next event). Pod connections stay checked by
        /// probes instead (--pod-probe-timeout).
        #[arg(long, default_value = "0", value_parser = parse_duration)]
        stream_idle_timeout: Duration,
        /// When a client PINGs the router (its keepalive), the pod
        /// connections carrying its open streams are PINGed too, at its
        /// pace; one that does not answer within the client's ping
        /// interval (at least 2s, at most this) is lost, and its streams
        /// end as at L4 (gRPC: UNAVAILABLE).
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        pod_probe_timeout: Duration,
        /// What one HTTP/2 client connection may make the router hold:
        /// unread responses (through the windows granted to pods) and
        /// queued request bytes (its connection window). Like 4MiB, 512KiB.
        #[arg(long, default_value = "4MiB", value_parser = parse_size)]
        client_buffer: usize,
        /// What the responses of all HTTP/2 clients together may make the
        /// router hold; past it pods get a minimal window per stream.
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        router_buffer_limit: usize,
        /// Worker threads, each a single-threaded event loop with its own
        /// backend connections; client connections go to the one with the
        /// fewest. Default: the CPUs this process may use (affinity, CPU
        /// quota), at most 4. One connection's streams stay on one worker.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=router::MAX_THREADS as i64))]
        router_threads: Option<u32>,
        /// Whose address pods see for the streams the router carries.
        /// `pod`: the client pod's own; its pod connections are opened
        /// from its network namespace (found in --netns-dir; needs
        /// CAP_SYS_ADMIN, for setns), so NetworkPolicy, source checks and
        /// logs see the client, and clients whose namespace the router
        /// cannot enter are balanced at L4 instead. `node`: the node's,
        /// with pod connections shared by every client (fewer of them).
        #[arg(long, value_enum, default_value_t)]
        source_identity: router::netns::SourceIdentity,
        /// Where the container runtime keeps pods' network namespace files
        /// (containerd and CRI-O: /var/run/netns), watched for new ones.
        #[arg(long, default_value = "/var/run/netns")]
        netns_dir: PathBuf,
        #[command(flatten)]
        accrual: AccrualArgs,
    },
    /// Will the agent run on this node (`--preflight`), and is it running
    /// well (asked on its admin socket): one line per item, ok / warn /
    /// fail, each with a hint. Exits non-zero on any fail.
    Check {
        /// Check this node before installing: kernel, BTF, cgroup v2,
        /// bpffs, capabilities, seccomp, client namespaces (and with
        /// --kube the apiserver and RBAC), instead of a running agent.
        #[arg(long)]
        preflight: bool,
        /// With --preflight: also ask the apiserver (KUBECONFIG or the
        /// pod's service account) whether it answers, and whether RBAC
        /// allows list and watch on services, endpointslices and nodes
        /// (SelfSubjectAccessReview, as `kubectl auth can-i`).
        #[arg(long, requires = "preflight")]
        kube: bool,
        /// The cgroup the agent will attach to (default: the cgroup v2
        /// mount).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        #[arg(long, default_value = "/var/run/netns")]
        netns_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove every pin (and so detach every pinned program) under --bpffs.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
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
                router_socket,
                router_grace,
                accrual,
                metrics_addr,
                end_removed_connections,
                netns_dir,
                spawn,
            } => {
                app::run(app::RunOptions {
                    end_removed_connections,
                    netns_dir: netns_dir.clone(),
                    accrual: accrual.policy(),
                    router: spawn.router(&netns_dir),
                    endpoints_file,
                    node_name,
                    pin_root: pin.then_some(bpffs),
                    cgroup,
                    admin_socket,
                    router_socket,
                    router_grace,
                    metrics_addr,
                })
                .await
            }
            Command::Router {
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
                source_identity,
                netns_dir,
                accrual,
            } => {
                router::process::run(router::process::RouterOptions {
                    identity: source_identity,
                    netns_dir,
                    threads: router_threads.map_or_else(router::default_threads, |n| n as usize),
                    accrual: accrual.policy(),
                    listen,
                    cgroup,
                    bpffs,
                    admin_socket,
                    agent_socket,
                    metrics_addr,
                    splice,
                    drain_timeout,
                    limits: router::core::Limits {
                        stream_idle_timeout,
                        probe_timeout: pod_probe_timeout,
                        client_buffer,
                        buffer_limit: router_buffer_limit,
                        ..Default::default()
                    },
                })
                .await
            }
            Command::Check {
                preflight,
                kube,
                cgroup,
                bpffs,
                netns_dir,
                admin_socket,
                output,
            } => {
                let report = if preflight {
                    check::preflight(&check::Preflight {
                        cgroup,
                        bpffs,
                        netns_dir,
                        kube,
                    })
                    .await
                } else {
                    check::running(&admin_socket).await
                };
                check::print(&report, output.is_json())
            }
            Command::Cleanup { bpffs } => {
                cli::print_cleanup(&bpffs, &dataplane::pin::cleanup(&bpffs)?)
            }
            Command::Status {
                admin_socket,
                output,
            } => {
                let v = admin::request(&admin_socket, &Request::Status).await?;
                cli::print_status(&v, output.is_json())
            }
            Command::Services {
                admin_socket,
                output,
            } => {
                let v = admin::request(&admin_socket, &Request::Services).await?;
                cli::print_services(&v, output.is_json())
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
                cli::print_endpoints(&v, output)
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
