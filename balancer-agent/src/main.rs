//! balancer-agent: the node agent (`run`, the control plane), the HTTP/2
//! router (`router`, its own process) and the CLI (`status`, `services`,
//! `endpoints`, `top`, `check`, `cleanup`).
// No unsafe code but where a module says why with `#![expect(unsafe_code)]`:
// `dataplane::query` (BPF_PROG_QUERY), `fdpass` (SCM_RIGHTS),
// `router::netns` (SO_NETNS_COOKIE) and `check` (the bpf(2) probe).
#![deny(unsafe_code)]

mod admin;
mod agent;
mod api;
mod app;
mod args;
mod check;
mod cli;
mod dataplane;
mod eject;
mod fdpass;
mod gone;
mod metrics;
mod node;
mod router;
mod router_link;
mod socket;
mod source;
mod state;
mod units;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    api::Request,
    args::{AdminArgs, DEFAULT_ADMIN_SOCKET, DEFAULT_BPFFS},
    units::parse_duration,
};

#[derive(Parser)]
#[command(version, about = "Socket-level load balancer for Kubernetes Services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The control plane: load the eBPF programs, attach them to a cgroup
    /// and keep their maps in sync with an endpoints file, or, without one,
    /// with the cluster's Services and EndpointSlices. HTTP/2 streams are
    /// routed by `balancer-agent router`, a process of its own.
    Run(args::RunArgs),
    /// The HTTP/2 router: balances every stream of `protocol: http2` ports
    /// over pooled pod connections. Reads its table from the maps `run
    /// --pin` pinned, so it keeps serving while the agent restarts.
    Router(args::RouterArgs),
    /// Will the agent run on this node (`--preflight`), and is it running
    /// well (asked on its admin socket): one line per item, ok / warn /
    /// fail, each with a hint. Exits non-zero on any fail.
    Check(args::CheckArgs),
    /// Remove every pin (and so detach every pinned program) under --bpffs.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Programs, cgroup, maps, source and the last reload.
    Status(AdminArgs),
    /// Services and their ports.
    Services(AdminArgs),
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
        #[command(flatten)]
        admin: AdminArgs,
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
            Command::Run(args) => app::run(args).await,
            Command::Router(args) => router::process::run(args).await,
            Command::Check(args) => check::run(args).await,
            Command::Cleanup { bpffs } => cli::print_cleanup(&bpffs, &dataplane::cleanup(&bpffs)?),
            Command::Status(a) => {
                let v = admin::request(&a.admin_socket, &Request::Status).await?;
                cli::print_status(&v, a.output.is_json())
            }
            Command::Services(a) => {
                let v = admin::request(&a.admin_socket, &Request::Services).await?;
                cli::print_services(&v, a.output.is_json())
            }
            Command::Top {
                admin_socket,
                interval,
                iterations,
            } => cli::top(&admin_socket, interval, iterations).await,
            Command::Endpoints { name, admin } => {
                let v = admin::request(&admin.admin_socket, &Request::Endpoints { name }).await?;
                cli::print_endpoints(&v, admin.output)
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
