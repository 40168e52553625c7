//! The command line: one `clap::Args` struct per command, handed as it
//! is to the code that runs the command (`app::run`, `router::process::run`,
//! `check`), so each option is declared once.

use std::{path::PathBuf, time::Duration};

use crate::{
    cli::Output,
    router,
    units::{keep, parse_duration, parse_size},
};

pub const DEFAULT_ADMIN_SOCKET: &str = "/run/balancer/admin.sock";
pub const DEFAULT_ROUTER_SOCKET: &str = "/run/balancer/router.sock";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/balancer";

/// The agent's admin socket and how to print its answer: every command
/// that asks the running agent.
#[derive(clap::Args)]
pub struct AdminArgs {
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

/// Failure accrual, for the agent's tcp ports and the router's streams.
#[derive(clap::Args)]
pub struct AccrualArgs {
    /// Failures in a row that eject an endpoint; 0 turns failure accrual
    /// off. `run` (tcp ports): failed connects, counted in the kernel.
    /// `router` (http2 ports): connects, resets by the pod, 5xx, gRPC
    /// Trailers-Only UNAVAILABLE / INTERNAL / UNKNOWN / DEADLINE_EXCEEDED.
    /// (linkerd2-proxy: 7; Envoy's consecutive_5xx: 5.)
    #[arg(long, default_value_t = 5)]
    pub failure_accrual: u32,
    /// First ejection; then one probe (stream or connect), and twice as
    /// long again if it fails. (linkerd2-proxy: 1s; Envoy's
    /// base_ejection_time: 30s.)
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub ejection_backoff: Duration,
    /// Longest ejection. (linkerd2-proxy: 60s; Envoy's max_ejection_time:
    /// 300s.)
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub ejection_backoff_max: Duration,
    /// Most of a service's endpoints ejected at once, percent; never the
    /// last one. (Envoy's max_ejection_percent: 10.)
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_ejected_percent: u32,
}

impl AccrualArgs {
    pub fn policy(&self) -> balancer_router::accrual::Policy {
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
pub struct SpawnArgs {
    /// Outside Kubernetes, one command for both: also start the router
    /// process (`balancer-agent router --listen ADDR`), unless one
    /// already answers on --router-socket. It runs in a process group
    /// of its own and outlives this one (a restarted agent finds it);
    /// SIGTERM stops it too. Needs --pin.
    #[arg(long, requires = "pin")]
    pub proxy_addr: Option<std::net::SocketAddr>,
    /// With --proxy-addr: the router's --splice.
    #[arg(long, requires = "proxy_addr")]
    pub splice: bool,
    /// With --proxy-addr: the router's --drain-timeout.
    #[arg(long, requires = "proxy_addr", value_parser = keep(parse_duration))]
    pub drain_timeout: Option<String>,
    /// With --proxy-addr: the router's --stream-idle-timeout.
    #[arg(long, requires = "proxy_addr", value_parser = keep(parse_duration))]
    pub stream_idle_timeout: Option<String>,
    /// With --proxy-addr: the router's --client-buffer.
    #[arg(long, requires = "proxy_addr", value_parser = keep(parse_size))]
    pub client_buffer: Option<String>,
    /// With --proxy-addr: the router's --router-buffer-limit.
    #[arg(long, requires = "proxy_addr", value_parser = keep(parse_size))]
    pub router_buffer_limit: Option<String>,
    /// With --proxy-addr: the router's --router-threads.
    #[arg(long, requires = "proxy_addr", value_parser = clap::value_parser!(u32).range(1..=router::MAX_THREADS as i64))]
    pub router_threads: Option<u32>,
    /// With --proxy-addr: the router's --source-identity.
    #[arg(long, requires = "proxy_addr", value_enum)]
    pub source_identity: Option<router::netns::SourceIdentity>,
}

impl SpawnArgs {
    /// The router process to start, with its flags as given.
    pub fn router(self, netns_dir: &std::path::Path) -> Option<crate::router_link::SpawnRouter> {
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
        Some(crate::router_link::SpawnRouter { listen: addr, args })
    }
}

/// `balancer-agent run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// YAML or JSON endpoints file; reloaded when it changes. Without
    /// it, the Kubernetes API is watched (configured like kubectl:
    /// KUBECONFIG, ~/.kube/config, or the in-cluster service account).
    #[arg(long)]
    pub endpoints_file: Option<PathBuf>,
    /// This node's name, for topology hints and internalTrafficPolicy
    /// (the Kubernetes source; unused with --endpoints-file, whose
    /// endpoints name no node).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// cgroup v2 directory to attach to (default: the cgroup v2 root).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// bpffs directory for pins (mounted if missing).
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Pin maps and links under --bpffs: the data path outlives the
    /// agent (restarts, kill -9, upgrades adopt it) and SIGTERM leaves it
    /// in place; the router process reads its table from these pins.
    /// `balancer-agent cleanup` removes them.
    #[arg(long)]
    pub pin: bool,
    /// The router process's admin socket, asked for its streams per
    /// endpoint (`endpoints`, `top`, metrics) and its status.
    #[arg(long, default_value = DEFAULT_ROUTER_SOCKET)]
    pub router_socket: PathBuf,
    /// The agent holds a duplicate of the router's listening socket.
    /// When the router dies, clients that reconnect queue on it, and
    /// the next router adopts it and serves them, spread. A router not
    /// back within this time: the listener is shut (its queue resets;
    /// clients reconnect, balanced per connection).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub router_grace: Duration,
    // tcp ports; http2 ports have the router's flags of the same names.
    #[command(flatten)]
    pub accrual: AccrualArgs,
    /// Prometheus metrics and /healthz, /readyz on this address.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// When an endpoint leaves its Services (its pod deleted, or its
    /// node declared dead; not while it is only terminating), end the
    /// client sockets connect() balanced to it, in their own network
    /// namespaces (sock_diag SOCK_DESTROY): their owners get
    /// ECONNABORTED at once and reconnect to a live pod, instead of
    /// waiting up to ~15 minutes for TCP to give up. Entering client
    /// pods' namespaces needs CAP_SYS_ADMIN (setns). `false` leaves
    /// them to TCP, as kube-proxy does.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub end_removed_connections: bool,
    /// Where the container runtime keeps pods' network namespace files
    /// (containerd and CRI-O: /var/run/netns): the connections of
    /// removed endpoints are ended there, and with --proxy-addr it is
    /// the router's --netns-dir.
    #[arg(long, default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,
    #[command(flatten)]
    pub spawn: SpawnArgs,
}

/// `balancer-agent router`.
#[derive(clap::Args)]
pub struct RouterArgs {
    /// Where pods reach the router (an address of the node); the kernel
    /// steers http2 ports here while the router's heartbeat is fresh.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// The cgroup the agent attached to (default: the cgroup v2 root),
    /// which names its pin directory.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// The agent's --bpffs.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    #[arg(long, default_value = DEFAULT_ROUTER_SOCKET)]
    pub admin_socket: PathBuf,
    /// The agent's admin socket: a listener it held for a router that
    /// died is adopted, with the connections queued on it.
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
    pub agent_socket: PathBuf,
    /// Prometheus metrics and /healthz, /readyz on this address.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Splice client and router sockets with sk_msg (SockHash
    /// redirect), skipping TCP/IP on that hop. Experimental: see
    /// bench/results/http2.txt for what it measured.
    #[arg(long)]
    pub splice: bool,
    /// On SIGTERM, how long HTTP/2 clients get to finish their streams
    /// after the GOAWAY.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// An HTTP/2 stream with no frame either way for this long is reset
    /// on both hops; 0 (the default): never, as at L4, where an idle
    /// stream lives as long as its connection (a gRPC watch may wait
    /// minutes for its next event). Pod connections stay checked by
    /// probes instead (--pod-probe-timeout).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub stream_idle_timeout: Duration,
    /// When a client PINGs the router (its keepalive), the pod
    /// connections carrying its open streams are PINGed too, at its
    /// pace; one that does not answer within the client's ping
    /// interval (at least 2s, at most this) is lost, and its streams
    /// end as at L4 (gRPC: UNAVAILABLE).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub pod_probe_timeout: Duration,
    /// What one HTTP/2 client connection may make the router hold:
    /// unread responses (through the windows granted to pods) and
    /// queued request bytes (its connection window). Like 4MiB, 512KiB.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub client_buffer: usize,
    /// What the responses of all HTTP/2 clients together may make the
    /// router hold; past it pods get a minimal window per stream.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub router_buffer_limit: usize,
    /// Worker threads, each a single-threaded event loop with its own
    /// backend connections; client connections go to the one with the
    /// fewest. Default: the CPUs this process may use (affinity, CPU
    /// quota), at most 4. One connection's streams stay on one worker.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=router::MAX_THREADS as i64))]
    pub router_threads: Option<u32>,
    /// Whose address pods see for the streams the router carries.
    /// `pod`: the client pod's own; its pod connections are opened
    /// from its network namespace (found in --netns-dir; needs
    /// CAP_SYS_ADMIN, for setns), so NetworkPolicy, source checks and
    /// logs see the client, and clients whose namespace the router
    /// cannot enter are balanced at L4 instead. `node`: the node's,
    /// with pod connections shared by every client (fewer of them).
    #[arg(long, value_enum, default_value_t)]
    pub source_identity: router::netns::SourceIdentity,
    /// Where the container runtime keeps pods' network namespace files
    /// (containerd and CRI-O: /var/run/netns), watched for new ones.
    #[arg(long, default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,
    #[command(flatten)]
    pub accrual: AccrualArgs,
}

/// `balancer-agent check`.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// Check this node before installing: kernel, BTF, cgroup v2,
    /// bpffs, capabilities, seccomp, client namespaces (and with
    /// --kube the apiserver and RBAC), instead of a running agent.
    #[arg(long)]
    pub preflight: bool,
    /// With --preflight: also ask the apiserver (KUBECONFIG or the
    /// pod's service account) whether it answers, and whether RBAC
    /// allows list and watch on services, endpointslices and nodes
    /// (SelfSubjectAccessReview, as `kubectl auth can-i`).
    #[arg(long, requires = "preflight")]
    pub kube: bool,
    /// The cgroup the agent will attach to (default: the cgroup v2
    /// mount).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    #[arg(long, default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,
    #[command(flatten)]
    pub admin: AdminArgs,
}
