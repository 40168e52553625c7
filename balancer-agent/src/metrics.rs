//! Prometheus metrics and health endpoints on their own listener
//! (`--metrics-addr`): `GET /metrics`, `/healthz`, `/readyz`. The agent and
//! the router process each serve their own (`render`, `render_router`).
//!
//! The exposition is rendered on each scrape from the same sources as the
//! admin API (kernel maps, router counters), so the two never disagree.

use std::{
    fmt::Write as _,
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::api::{EndpointsView, RouterStatusView, StatusView};

pub use balancer_router::stats::{LATENCY as ROUTER_LATENCY, SELECTIONS as ROUTER_SELECTIONS};
use balancer_router::{core::calm, stats as router_stats};

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        if l.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{}}} {value}", l.join(","));
        }
    }
}

/// The whole exposition.
pub fn render(view: &EndpointsView, status: &StatusView) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };

    type Get = fn(&crate::api::EndpointView) -> u64;
    let per_endpoint: [(&str, &str, &str, Get); 4] = [
        (
            "balancer_endpoint_connections_active",
            "gauge",
            "Live connections per endpoint, counted by sock_ops.",
            |e| e.active_connections,
        ),
        (
            "balancer_endpoint_connections_total",
            "counter",
            "Connections established per endpoint.",
            |e| e.connections_total,
        ),
        (
            "balancer_endpoint_streams_active",
            "gauge",
            "HTTP/2 streams in flight per endpoint through the router.",
            |e| e.active_streams,
        ),
        (
            "balancer_endpoint_streams_total",
            "counter",
            "HTTP/2 streams per endpoint (router, and sk_msg on L4 connections).",
            |e| e.streams_total,
        ),
    ];
    for (name, kind, help, get) in per_endpoint {
        f.head(name, kind, help);
        for s in &view.services {
            for e in &s.endpoints {
                let ep = format!("{}:{}", e.address, e.port);
                f.sample(name, &[("service", &s.name), ("endpoint", &ep)], get(e));
            }
        }
    }
    f.head(
        "balancer_endpoint_failures_total",
        "counter",
        "Streams through the router the pod failed (connect, reset, 5xx, gRPC failure).",
    );
    for s in &view.services {
        for e in &s.endpoints {
            let ep = format!("{}:{}", e.address, e.port);
            f.sample(
                "balancer_endpoint_failures_total",
                &[("service", &s.name), ("endpoint", &ep)],
                e.failures,
            );
        }
    }
    f.head(
        "balancer_endpoint_ejected",
        "gauge",
        "1 while the router's failure accrual has ejected the endpoint, by reason.",
    );
    for s in &view.services {
        for e in &s.endpoints {
            if let Some(why) = &e.ejected {
                let ep = format!("{}:{}", e.address, e.port);
                f.sample(
                    "balancer_endpoint_ejected",
                    &[("service", &s.name), ("endpoint", &ep), ("reason", why)],
                    1,
                );
            }
        }
    }
    f.head(
        "balancer_endpoint_latency_ewma_seconds",
        "gauge",
        "The router's latency estimate per endpoint.",
    );
    for s in &view.services {
        for e in s.endpoints.iter().filter(|e| e.ewma_us > 0) {
            let ep = format!("{}:{}", e.address, e.port);
            f.sample(
                "balancer_endpoint_latency_ewma_seconds",
                &[("service", &s.name), ("endpoint", &ep)],
                e.ewma_us as f64 / 1e6,
            );
        }
    }

    let c = &status.counters;
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    f.head(
        "balancer_datapath_decisions_total",
        "counter",
        "Decisions of the kernel programs, by kind.",
    );
    for (k, v) in c {
        f.sample("balancer_datapath_decisions_total", &[("decision", k)], v);
    }
    f.head(
        "balancer_connects_refused_total",
        "counter",
        "connect() calls to a service refused (no usable endpoint, update in flight, family mismatch).",
    );
    f.sample(
        "balancer_connects_refused_total",
        &[],
        get("no_backend") + get("lookup_miss") + get("family_mismatch"),
    );
    f.head(
        "balancer_selections_total",
        "counter",
        "Backend choices by layer (kernel per connection, router per stream) and algorithm.",
    );
    for (alg, key) in [
        ("random", "select_random"),
        ("round-robin", "select_round_robin"),
        ("least-conn", "select_least_conn"),
    ] {
        f.sample(
            "balancer_selections_total",
            &[("layer", "kernel"), ("algorithm", alg)],
            get(key),
        );
    }

    let r = &status.last_reload;
    f.head(
        "balancer_sync_total",
        "counter",
        "Endpoint source updates, by result.",
    );
    f.sample(
        "balancer_sync_total",
        &[("source", &status.source.kind), ("result", "applied")],
        r.applied,
    );
    f.sample(
        "balancer_sync_total",
        &[("source", &status.source.kind), ("result", "rejected")],
        r.attempts - r.applied,
    );
    f.head(
        "balancer_sync_errors_total",
        "counter",
        "Endpoint source updates refused (the last good state kept serving).",
    );
    f.sample("balancer_sync_errors_total", &[], r.attempts - r.applied);
    f.head(
        "balancer_sync_last_ok",
        "gauge",
        "1 when the last update was applied, 0 when it was refused.",
    );
    f.sample("balancer_sync_last_ok", &[], u8::from(r.ok));

    if let Some(a) = &status.apiserver {
        f.head(
            "balancer_apiserver_up",
            "gauge",
            "1 while the Kubernetes watches are synced, 0 while the apiserver is unreachable or not yet synced.",
        );
        f.sample(
            "balancer_apiserver_up",
            &[],
            u8::from(a.state == crate::source::kube::Apiserver::Synced),
        );
        f.head(
            "balancer_apiserver_errors_total",
            "counter",
            "Failed list/watch requests to the apiserver (retried with backoff).",
        );
        f.sample("balancer_apiserver_errors_total", &[], a.errors);
    }
    f.head(
        "balancer_l4_ejected_backends",
        "gauge",
        "Backends of tcp ports taken out of their services because their connects fail.",
    );
    f.sample("balancer_l4_ejected_backends", &[], status.l4_ejected);
    f.head(
        "balancer_l4_ejections_total",
        "counter",
        "Ejections of tcp backends by failure accrual (failed connects).",
    );
    f.sample("balancer_l4_ejections_total", &[], status.l4_ejections);
    f.head(
        "balancer_map_entries",
        "gauge",
        "Entries in each kernel map.",
    );
    for m in &status.maps {
        f.sample("balancer_map_entries", &[("map", &m.name)], m.entries);
    }
    f.head(
        "balancer_map_capacity",
        "gauge",
        "Capacity of each kernel map.",
    );
    for m in &status.maps {
        f.sample("balancer_map_capacity", &[("map", &m.name)], m.max_entries);
    }
    out
}

/// The router process's exposition: its choices, defences, buffers and
/// latency histogram (its per-endpoint streams are in the agent's, with
/// the service names).
pub fn render_router(status: &RouterStatusView) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    f.head(
        "balancer_router_selections_total",
        "counter",
        "Backend choices of the router, per stream, by algorithm.",
    );
    for alg in balancer_router::endpoint::Algorithm::ALL {
        f.sample(
            "balancer_router_selections_total",
            &[("algorithm", alg.as_str())],
            ROUTER_SELECTIONS.get(alg),
        );
    }
    f.head(
        "balancer_router_routes",
        "gauge",
        "http2 service ports in the router's table.",
    );
    f.sample("balancer_router_routes", &[], status.routes);
    f.head(
        "balancer_router_ejected_endpoints",
        "gauge",
        "Endpoints the router's failure accrual has ejected now.",
    );
    f.sample("balancer_router_ejected_endpoints", &[], status.ejected);
    f.head(
        "balancer_router_ejections_total",
        "counter",
        "Ejections by failure accrual (consecutive failed streams, and failed probes).",
    );
    f.sample(
        "balancer_router_ejections_total",
        &[],
        balancer_router::accrual::EJECTIONS.load(Ordering::Relaxed),
    );
    f.head(
        "balancer_router_table_generation",
        "gauge",
        "Generation of the routing table the router serves (the agent's GENERATION map).",
    );
    f.sample("balancer_router_table_generation", &[], status.generation);
    router_protection(&mut f);
    ROUTER_LATENCY.render(
        &mut out,
        "balancer_router_response_latency_seconds",
        "Router: time from sending a stream to a backend to its response headers.",
    );
    out
}

/// An HTTP reply: status line, content type, body.
pub type Reply = (&'static str, &'static str, String);

/// What answers a GET on the metrics listener, by path.
pub type Handler = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

pub fn ok(body: String) -> Reply {
    ("200 OK", "text/plain; version=0.0.4", body)
}

pub fn unavailable(why: &str) -> Reply {
    ("503 Service Unavailable", "text/plain", format!("{why}\n"))
}

pub fn not_found() -> Reply {
    ("404 Not Found", "text/plain", "not found\n".to_owned())
}

/// Serve GETs with `handler`, one request per connection.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = handle(sock, handler).await;
        });
    }
}

async fn handle(mut sock: TcpStream, handler: Handler) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // The request head only; bodies are not expected.
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, ctype, body) = if method == "GET" {
        handler(path.to_owned()).await
    } else {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        )
    };
    let resp = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await?;
    sock.shutdown().await
}

/// The router's defences: connections cut for floods, streams reset for
/// idleness or because a backend connection failed, silent backends.
fn router_protection(f: &mut Family<'_>) {
    f.head(
        "balancer_router_floods_total",
        "counter",
        "HTTP/2 client connections closed with ENHANCE_YOUR_CALM, by what they flooded.",
    );
    for kind in calm::Flood::ALL {
        f.sample(
            "balancer_router_floods_total",
            &[("kind", kind.name())],
            calm::FLOODS[kind as usize].load(Ordering::Relaxed),
        );
    }
    f.head(
        "balancer_router_held_bytes",
        "gauge",
        "Response bytes the HTTP/2 router holds or has let pods send for its clients (bounded by --router-buffer-limit plus 16 KiB per stream).",
    );
    f.sample(
        "balancer_router_held_bytes",
        &[],
        router_stats::HELD_BYTES.load(Ordering::Relaxed),
    );
    f.head(
        "balancer_router_connections",
        "gauge",
        "Connections of the HTTP/2 router, by side.",
    );
    f.sample(
        "balancer_router_connections",
        &[("side", "client")],
        router_stats::CLIENT_CONNECTIONS.load(Ordering::Relaxed),
    );
    f.sample(
        "balancer_router_connections",
        &[("side", "pod")],
        router_stats::BACKEND_CONNECTIONS.load(Ordering::Relaxed),
    );
    for (name, help, v) in [
        (
            "balancer_router_stream_idle_timeouts_total",
            "HTTP/2 streams reset on both hops after --stream-idle-timeout without a frame.",
            &router_stats::STREAM_IDLE_TIMEOUTS,
        ),
        (
            "balancer_router_backend_connection_resets_total",
            "HTTP/2 streams a pod may have processed, reset because its connection failed.",
            &router_stats::BACKEND_CONN_RESETS,
        ),
        (
            "balancer_router_backend_reset_retirements_total",
            "Pod connections the router stopped opening streams on because it sent them many resets (a fresh one takes over).",
            &router_stats::BACKEND_RESET_RETIREMENTS,
        ),
        (
            "balancer_router_backend_settings_timeouts_total",
            "Backend connections given up because the pod sent no SETTINGS in time.",
            &router_stats::BACKEND_SETTINGS_TIMEOUTS,
        ),
    ] {
        f.head(name, "counter", help);
        f.sample(name, &[], v.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
