//! Prometheus metrics and health endpoints on their own listener
//! (`--metrics-addr`): `GET /metrics`, `/healthz`, `/readyz`. The agent and
//! the router process each serve their own (`render`, `render_router`).
//!
//! The exposition is built on each scrape from the same sources as the
//! admin API (kernel maps, router counters), so the two never disagree: a
//! fresh prometheus-client [`Registry`] is filled from the views and
//! encoded in the Prometheus text format (0.0.4). The library writes HELP
//! and TYPE, escapes label values, adds the `_total` of counters and the
//! unit of a name (`_seconds`, `_bytes`), and lays out histogram buckets.

use std::{
    collections::HashMap, convert::Infallible, future::Future, pin::Pin, sync::Arc, time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use tokio::net::TcpListener;

use balancer_common::Counter as Decision;
use balancer_router::{accrual, core::calm, endpoint::Algorithm, stats as router_stats};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text},
    metrics::{
        MetricType, TypedMetric, counter::Counter, exemplar::Exemplar, family::Family, gauge::Gauge,
    },
    registry::{Registry, Unit},
};

use crate::api::{EndpointView, EndpointsView, RouterStatusView, StatusView};

/// A count, as a gauge's value (the library's gauges are signed).
fn count(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Counter `name` (without its `_total`, which the encoder adds) at `v`.
fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
}

fn encode(reg: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut out, reg);
    out
}

/// The `Content-Type` of [`render`] and [`render_router`].
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    service: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EjectedLabels {
    service: String,
    endpoint: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SelectionLabels {
    layer: &'static str,
    algorithm: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    source: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemovedLabels {
    service: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlgorithmLabels {
    algorithm: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FloodLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    side: &'static str,
}

/// The whole exposition.
pub fn render(view: &EndpointsView, status: &StatusView) -> String {
    let mut reg = Registry::default();
    per_endpoint(&mut reg, view);

    let c = &status.counters;
    let get = |d: Decision| c.get(d.name()).copied().unwrap_or(0);
    let decisions = Family::<DecisionLabels, Counter>::default();
    for (k, v) in c {
        decisions
            .get_or_create(&DecisionLabels {
                decision: k.clone(),
            })
            .inc_by(*v);
    }
    reg.register(
        "balancer_datapath_decisions",
        "Decisions of the kernel programs, by kind.",
        decisions,
    );
    counter(
        &mut reg,
        "balancer_connects_refused",
        "connect() calls to a service refused (no usable endpoint, update in flight, family mismatch).",
        get(Decision::NoBackend) + get(Decision::LookupMiss) + get(Decision::FamilyMismatch),
    );
    let selections = Family::<SelectionLabels, Counter>::default();
    for (algorithm, d) in [
        ("random", Decision::SelectRandom),
        ("round-robin", Decision::SelectRoundRobin),
        ("least-conn", Decision::SelectLeastConn),
    ] {
        selections
            .get_or_create(&SelectionLabels {
                layer: "kernel",
                algorithm,
            })
            .inc_by(get(d));
    }
    reg.register(
        "balancer_selections",
        "Backend choices by layer (kernel per connection, router per stream) and algorithm.",
        selections,
    );

    let r = &status.last_reload;
    let sync = Family::<SyncLabels, Counter>::default();
    for (result, n) in [("applied", r.applied), ("rejected", r.attempts - r.applied)] {
        sync.get_or_create(&SyncLabels {
            source: status.source.kind.clone(),
            result,
        })
        .inc_by(n);
    }
    reg.register("balancer_sync", "Endpoint source updates, by result.", sync);
    counter(
        &mut reg,
        "balancer_sync_errors",
        "Endpoint source updates refused (the last good state kept serving).",
        r.attempts - r.applied,
    );
    gauge(
        &mut reg,
        "balancer_sync_last_ok",
        "1 when the last update was applied, 0 when it was refused.",
        i64::from(r.ok),
    );

    if let Some(a) = &status.apiserver {
        gauge(
            &mut reg,
            "balancer_apiserver_up",
            "1 while the Kubernetes watches are synced, 0 while the apiserver is unreachable or not yet synced.",
            i64::from(a.state == crate::api::Apiserver::Synced),
        );
        counter(
            &mut reg,
            "balancer_apiserver_errors",
            "Failed list/watch requests to the apiserver (retried with backoff).",
            a.errors,
        );
    }
    gauge(
        &mut reg,
        "balancer_l4_ejected_backends",
        "Backends of tcp ports taken out of their services because their connects fail.",
        count(status.l4_ejected),
    );
    counter(
        &mut reg,
        "balancer_l4_ejections",
        "Ejections of tcp backends by failure accrual (failed connects).",
        status.l4_ejections,
    );
    if let Some(r) = &status.removed_connections {
        let removed = Family::<RemovedLabels, Counter>::default();
        for (service, e) in &r.services {
            for (outcome, n) in [
                ("ended", e.ended),
                ("already_closed", e.already_closed),
                ("unreachable", e.unreachable),
                ("failed", e.failed),
            ] {
                removed
                    .get_or_create(&RemovedLabels {
                        service: service.clone(),
                        outcome,
                    })
                    .inc_by(n);
            }
        }
        reg.register(
            "balancer_removed_endpoint_connections",
            "Balanced client connections to endpoints removed from their Services, by what the \
             agent did: ended (the client saw ECONNABORTED), already_closed, unreachable (in a \
             namespace it cannot enter; left to TCP), failed.",
            removed,
        );
    }
    let entries = Family::<MapLabels, Gauge>::default();
    let capacity = Family::<MapLabels, Gauge>::default();
    for m in &status.maps {
        let labels = MapLabels {
            map: m.name.clone(),
        };
        entries.get_or_create(&labels).set(count(m.entries));
        capacity.get_or_create(&labels).set(count(m.max_entries));
    }
    reg.register(
        "balancer_map_entries",
        "Entries in each kernel map.",
        entries,
    );
    reg.register(
        "balancer_map_capacity",
        "Capacity of each kernel map.",
        capacity,
    );
    encode(&reg)
}

/// The per-endpoint families: connections and streams, failures,
/// ejections, latency.
fn per_endpoint(reg: &mut Registry, view: &EndpointsView) {
    let endpoints = || {
        view.services.iter().flat_map(|s| {
            s.endpoints.iter().map(|e| {
                let labels = EndpointLabels {
                    service: s.name.clone(),
                    endpoint: format!("{}:{}", e.address, e.port),
                };
                (labels, e)
            })
        })
    };
    type Get = fn(&EndpointView) -> u64;
    let gauges: [(&str, &str, Get); 2] = [
        (
            "balancer_endpoint_connections_active",
            "Live connections per endpoint, counted by sock_ops.",
            |e| e.active_connections,
        ),
        (
            "balancer_endpoint_streams_active",
            "HTTP/2 streams in flight per endpoint through the router.",
            |e| e.active_streams,
        ),
    ];
    let counters: [(&str, &str, Get); 3] = [
        (
            "balancer_endpoint_connections",
            "Connections established per endpoint.",
            |e| e.connections_total,
        ),
        (
            "balancer_endpoint_streams",
            "HTTP/2 streams per endpoint (router, and sk_msg on L4 connections).",
            |e| e.streams_total,
        ),
        (
            "balancer_endpoint_failures",
            "Streams through the router the pod failed (connect, reset, 5xx, gRPC failure).",
            |e| e.failures,
        ),
    ];
    for (name, help, get) in gauges {
        let f = Family::<EndpointLabels, Gauge>::default();
        for (labels, e) in endpoints() {
            f.get_or_create(&labels).set(count(get(e)));
        }
        reg.register(name, help, f);
    }
    for (name, help, get) in counters {
        let f = Family::<EndpointLabels, Counter>::default();
        for (labels, e) in endpoints() {
            f.get_or_create(&labels).inc_by(get(e));
        }
        reg.register(name, help, f);
    }
    let ejected = Family::<EjectedLabels, Gauge>::default();
    for (l, e) in endpoints() {
        if let Some(why) = &e.ejected {
            ejected
                .get_or_create(&EjectedLabels {
                    service: l.service,
                    endpoint: l.endpoint,
                    reason: why.clone(),
                })
                .set(1);
        }
    }
    reg.register(
        "balancer_endpoint_ejected",
        "1 while the router's failure accrual has ejected the endpoint, by reason.",
        ejected,
    );
    let ewma = Family::<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for (labels, e) in endpoints().filter(|(_, e)| e.ewma_us > 0) {
        ewma.get_or_create(&labels).set(e.ewma_us as f64 / 1e6);
    }
    reg.register_with_unit(
        "balancer_endpoint_latency_ewma",
        "The router's latency estimate per endpoint.",
        Unit::Seconds,
        ewma,
    );
}

/// The router process's exposition: its choices, defences, buffers and
/// latency histogram (its per-endpoint streams are in the agent's, with
/// the service names).
pub fn render_router(status: &RouterStatusView) -> String {
    let mut reg = Registry::default();
    let selections = Family::<AlgorithmLabels, Counter>::default();
    for alg in Algorithm::ALL {
        selections
            .get_or_create(&AlgorithmLabels {
                algorithm: alg.as_str(),
            })
            .inc_by(router_stats::SELECTIONS.get(alg));
    }
    reg.register(
        "balancer_router_selections",
        "Backend choices of the router, per stream, by algorithm.",
        selections,
    );
    gauge(
        &mut reg,
        "balancer_router_routes",
        "http2 service ports in the router's table.",
        count(status.routes),
    );
    gauge(
        &mut reg,
        "balancer_router_ejected_endpoints",
        "Endpoints the router's failure accrual has ejected now.",
        count(status.ejected),
    );
    let ejections = Family::<ReasonLabels, Counter>::default();
    for why in accrual::Failure::ALL {
        ejections
            .get_or_create(&ReasonLabels {
                reason: why.as_str(),
            })
            .inc_by(why.ejections());
    }
    reg.register(
        "balancer_router_ejections",
        "Ejections by failure accrual (consecutive failed streams, and failed probes), by the \
         failure that caused them: connect, reset, 5xx, grpc, connection-lost.",
        ejections,
    );
    gauge(
        &mut reg,
        "balancer_router_table_generation",
        "Generation of the routing table the router serves (the agent's GENERATION map).",
        count(status.generation),
    );
    gauge(
        &mut reg,
        "balancer_router_client_namespaces",
        "Client network namespaces the router can open pod connections from (--source-identity pod), not counting its own.",
        count(status.pools.namespaces),
    );
    gauge(
        &mut reg,
        "balancer_router_namespace_pools",
        "Client network namespaces with pod connections of their own now.",
        count(status.pools.namespace_pools),
    );
    gauge(
        &mut reg,
        "balancer_router_namespace_connections",
        "Pod connections opened from client network namespaces (not the node's) now.",
        count(status.pools.namespace_connections),
    );
    counter(
        &mut reg,
        "balancer_router_unserved_closed",
        "Client connections closed on accept because the router could not enter their network namespace (they reconnect, and are balanced at L4 with their own address).",
        status.unserved_closed,
    );
    router_protection(&mut reg, status);
    reg.register_with_unit(
        "balancer_router_response_latency",
        "Router: time from sending a stream to a backend to its response headers.",
        Unit::Seconds,
        Latency(router_stats::LATENCY.snapshot()),
    );
    encode(&reg)
}

/// The router's defences: connections cut for floods, streams reset for
/// idleness or because a backend connection failed, silent backends.
fn router_protection(reg: &mut Registry, status: &RouterStatusView) {
    use std::sync::atomic::Ordering::Relaxed;
    let floods = Family::<FloodLabels, Counter>::default();
    for kind in calm::Flood::ALL {
        floods
            .get_or_create(&FloodLabels { kind: kind.name() })
            .inc_by(calm::FLOODS[kind as usize].load(Relaxed));
    }
    reg.register(
        "balancer_router_floods",
        "HTTP/2 client connections closed with ENHANCE_YOUR_CALM, by what they flooded.",
        floods,
    );
    let held = Gauge::<i64>::default();
    held.set(status.held_bytes);
    reg.register_with_unit(
        "balancer_router_held",
        "Response bytes the HTTP/2 router holds or has let pods send for its clients (bounded by --router-buffer-limit plus 16 KiB per stream).",
        Unit::Bytes,
        held,
    );
    let connections = Family::<SideLabels, Gauge>::default();
    for (side, n) in [
        ("client", status.client_connections),
        ("pod", status.backend_connections),
    ] {
        connections
            .get_or_create(&SideLabels { side })
            .set(count(n));
    }
    reg.register(
        "balancer_router_connections",
        "Connections of the HTTP/2 router, by side.",
        connections,
    );
    for (name, help, v) in [
        (
            "balancer_router_pod_probe_timeouts",
            "Pod connections lost because they did not answer a liveness probe (sent when a client pings, at its pace, or when their endpoint is removed).",
            &router_stats::POD_PROBE_TIMEOUTS,
        ),
        (
            "balancer_router_stream_idle_timeouts",
            "HTTP/2 streams reset on both hops after --stream-idle-timeout without a frame.",
            &router_stats::STREAM_IDLE_TIMEOUTS,
        ),
        (
            "balancer_router_backend_connection_resets",
            "HTTP/2 streams a pod may have processed, reset because its connection failed.",
            &router_stats::BACKEND_CONN_RESETS,
        ),
        (
            "balancer_router_backend_reset_retirements",
            "Pod connections the router stopped opening streams on because it sent them many resets (a fresh one takes over).",
            &router_stats::BACKEND_RESET_RETIREMENTS,
        ),
        (
            "balancer_router_backend_settings_timeouts",
            "Backend connections given up because the pod sent no SETTINGS in time.",
            &router_stats::BACKEND_SETTINGS_TIMEOUTS,
        ),
    ] {
        counter(reg, name, help, v.load(Relaxed));
    }
}

/// The router's latency histogram as read at the scrape. The router counts
/// in its own lock-free [`router_stats::Histogram`] (prometheus-client's
/// takes a lock per observation, and the router crate stays free of the
/// exposition); the library lays out the buckets.
#[derive(Debug)]
struct Latency(router_stats::HistogramSnapshot);

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        encoder.encode_histogram::<NoLabelSet>(
            s.sum_seconds,
            s.count,
            &s.buckets,
            None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// An HTTP reply: status, content type, body.
pub type Reply = (http::StatusCode, &'static str, String);

/// What answers a GET on the metrics listener, by path.
pub type Handler = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// A metrics exposition (from [`render`] or [`render_router`]), or a health
/// answer.
pub fn ok(body: String) -> Reply {
    (http::StatusCode::OK, CONTENT_TYPE, body)
}

pub fn unavailable(why: &str) -> Reply {
    (
        http::StatusCode::SERVICE_UNAVAILABLE,
        "text/plain",
        format!("{why}\n"),
    )
}

pub fn not_found() -> Reply {
    (
        http::StatusCode::NOT_FOUND,
        "text/plain",
        "not found\n".to_owned(),
    )
}

/// How long the listener gives a client, so that a slow or stuck scraper
/// holds nothing for long: each connection is its own task, cut at these
/// limits.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// To send the whole request head.
    header_read: Duration,
    /// For the whole connection: request, answer, and the client reading it.
    connection: Duration,
    /// Connections served at once. Past it the listener stops accepting
    /// (new ones wait in the kernel's backlog) instead of spending a task
    /// and a descriptor on each of a flood of idle connections; each held
    /// one is cut at `header_read` at the latest, so a scrape waits that
    /// long at worst.
    connections: usize,
}

const LIMITS: Limits = Limits {
    header_read: Duration::from_secs(5),
    connection: Duration::from_secs(30),
    connections: 64,
};

/// After a failed accept (out of descriptors, say), before the next try:
/// the error would otherwise come back at once, in a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The largest request head read, bytes (hyper's smallest buffer; a larger
/// head is answered 431). Bodies are never read.
const MAX_REQUEST_HEAD: usize = 8192;

/// Serve GETs with `handler` over HTTP/1.1, one request per connection.
pub async fn serve(listener: TcpListener, handler: Handler) {
    serve_with(listener, handler, LIMITS).await;
}

async fn serve_with(listener: TcpListener, handler: Handler, limits: Limits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(respond(req, handler).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .max_buf_size(MAX_REQUEST_HEAD)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            // Past the limit the connection is dropped, which closes it.
            let _ = tokio::time::timeout(limits.connection, conn).await;
        });
    }
}

async fn respond(
    req: http::Request<hyper::body::Incoming>,
    handler: Handler,
) -> http::Response<Full<Bytes>> {
    let (status, ctype, body) = if req.method() == http::Method::GET {
        handler(req.uri().path().to_owned()).await
    } else {
        (
            http::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        )
    };
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    resp
}

/// The agent's metrics listener: each scrape takes the agent's lock only
/// for what costs no syscall per backend (the endpoints' shape, the
/// status), and reads the per-backend counts through its own handle on
/// the map after releasing it (and AFFINITY's fill likewise): a scrape
/// never holds up an update.
pub fn agent_handler(
    agent: std::sync::Arc<std::sync::Mutex<crate::agent::Agent>>,
    stats: crate::dataplane::StatsReader,
    affinity: std::sync::Arc<crate::dataplane::AffinityReader>,
    router_socket: std::path::PathBuf,
) -> Handler {
    let stats = std::sync::Arc::new(stats);
    std::sync::Arc::new(move |path: String| {
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
                    let router = crate::router_link::ask_router::<
                        Vec<crate::api::RouterEndpointView>,
                    >(
                        &router_socket, &crate::api::Request::RouterEndpoints
                    )
                    .await
                    .unwrap_or_default();
                    let body = tokio::task::spawn_blocking(move || {
                        crate::agent::fill_kernel(&mut view, |id| stats.get(id));
                        crate::agent::fill_router(&mut view, &router);
                        status.maps.push(affinity.fill().into());
                        render(&view, &status)
                    })
                    .await
                    .unwrap_or_default();
                    ok(body)
                }
                "/healthz" => ok("ok\n".into()),
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
                        ok("ready\n".into())
                    } else {
                        unavailable("not synced yet")
                    }
                }
                _ => not_found(),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::api::{ReloadView, ServiceView};

    fn endpoint(address: &str, ejected: Option<&str>) -> EndpointView {
        serde_json::from_value(serde_json::json!({
            "address": address, "port": 8080, "zone": null, "ready": true,
            "serving": true, "terminating": false, "usable": true,
            "active_connections": 2, "connections_total": 7, "ewma_us": 1500,
            "ejected": ejected,
        }))
        .expect("endpoint view")
    }

    fn view() -> EndpointsView {
        let mut v = EndpointsView {
            services: vec![],
            draining: vec![],
            router: None,
        };
        let mut s: ServiceView = serde_json::from_value(serde_json::json!({
            "name": "default/a\"b", "addresses": [], "ports": [], "endpoints": [],
        }))
        .expect("service view");
        s.endpoints = vec![
            endpoint("198.18.0.1", None),
            endpoint("198.18.0.2", Some("consecutive-failures")),
        ];
        v.services.push(s);
        v
    }

    #[test]
    fn exposition_keeps_names_types_units_and_escapes_labels() {
        let mut status: StatusView = serde_json::from_value(serde_json::json!({
            "version": "test", "cgroup": "/", "programs": [],
            "maps": [{"name": "SERVICES", "entries": 1, "max_entries": 4096}],
            "source": {"kind": "file", "path": "eps.yaml"},
            "last_reload": ReloadView::default(), "counters": {},
        }))
        .expect("status view");
        status.counters.insert("select_least_conn".into(), 4);
        status.counters.insert("no_backend".into(), 1);
        let out = render(&view(), &status);
        for needle in [
            "# TYPE balancer_endpoint_connections_total counter\n",
            "balancer_endpoint_connections_total{service=\"default/a\\\"b\",endpoint=\"198.18.0.1:8080\"} 7\n",
            "# TYPE balancer_endpoint_connections_active gauge\n",
            "balancer_endpoint_connections_active{service=\"default/a\\\"b\",endpoint=\"198.18.0.2:8080\"} 2\n",
            "balancer_endpoint_ejected{service=\"default/a\\\"b\",endpoint=\"198.18.0.2:8080\",reason=\"consecutive-failures\"} 1\n",
            "balancer_endpoint_latency_ewma_seconds{service=\"default/a\\\"b\",endpoint=\"198.18.0.1:8080\"} 0.0015\n",
            "balancer_selections_total{layer=\"kernel\",algorithm=\"least-conn\"} 4\n",
            "balancer_datapath_decisions_total{decision=\"no_backend\"} 1\n",
            "balancer_connects_refused_total 1\n",
            "balancer_sync_total{source=\"file\",result=\"applied\"} 0\n",
            "balancer_sync_last_ok 0\n",
            "balancer_map_entries{map=\"SERVICES\"} 1\n",
            "balancer_map_capacity{map=\"SERVICES\"} 4096\n",
        ] {
            assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
        }
        assert!(!out.contains("balancer_apiserver"), "file source: {out}");
        assert!(!out.contains("_total_total"), "{out}");
    }

    #[test]
    fn router_exposition_has_the_latency_histogram() {
        let out = render_router(&RouterStatusView::default());
        for needle in [
            "# TYPE balancer_router_response_latency_seconds histogram\n",
            "balancer_router_response_latency_seconds_bucket{le=\"0.0001\"} ",
            "balancer_router_response_latency_seconds_bucket{le=\"+Inf\"} ",
            "balancer_router_response_latency_seconds_count ",
            "balancer_router_selections_total{algorithm=\"least-request\"} ",
            "# TYPE balancer_router_held_bytes gauge\n",
            "balancer_router_connections{side=\"pod\"} ",
            "balancer_router_backend_settings_timeouts_total ",
        ] {
            assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
        }
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn a_slow_client_is_cut_off_while_scrapes_go_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler: Handler = Arc::new(|path: String| {
            Box::pin(async move {
                match path.as_str() {
                    "/healthz" => ok("ok\n".into()),
                    "/readyz" => unavailable("not synced yet"),
                    _ => not_found(),
                }
            })
        });
        let limits = Limits {
            header_read: Duration::from_millis(300),
            connection: Duration::from_secs(2),
            connections: 64,
        };
        tokio::spawn(serve_with(listener, handler, limits));

        // Half a request head, then nothing.
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /metr").await.expect("write");
        let started = Instant::now();

        // Meanwhile every other scrape is answered, with today's replies.
        let r = get(addr, "/healthz").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nok\n"), "{r}");
        // (What the real /readyz answers is the handlers', tested on a
        // running agent and router: agent_cli.rs.)
        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(
            get(addr, "/nope")
                .await
                .starts_with("HTTP/1.1 404 Not Found\r\n")
        );
        let mut post = tokio::net::TcpStream::connect(addr).await.expect("connect");
        post.write_all(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("write");
        let mut r = String::new();
        post.read_to_string(&mut r).await.expect("read");
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");

        // The slow one is closed at the header timeout, not held.
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest))
            .await
            .expect("the slow client must be cut off");
        assert!(n.is_ok() || rest.is_empty(), "{n:?}");
        let held = started.elapsed();
        assert!(held >= Duration::from_millis(250), "cut early: {held:?}");
        assert!(held < Duration::from_secs(3), "held {held:?}");
    }

    #[tokio::test]
    async fn a_flood_of_idle_connections_holds_at_most_the_cap() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler: Handler = Arc::new(|_| Box::pin(async { ok("ok\n".into()) }));
        let limits = Limits {
            header_read: Duration::from_millis(300),
            connection: Duration::from_secs(2),
            connections: 2,
        };
        tokio::spawn(serve_with(listener, handler, limits));
        // Two idle connections take both slots...
        let mut idle = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /").await.expect("write");
            idle.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...so a scrape waits in the backlog until the header timeout
        // frees one, and is then answered.
        let started = Instant::now();
        let r = get(addr, "/healthz").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(150),
            "not capped: {waited:?}"
        );
        assert!(waited < Duration::from_secs(2), "waited {waited:?}");
    }

    #[tokio::test]
    async fn a_request_head_over_the_limit_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler: Handler = Arc::new(|_| Box::pin(async { ok("ok\n".into()) }));
        tokio::spawn(serve(listener, handler));
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let big = "a".repeat(2 * MAX_REQUEST_HEAD);
        let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
        // The server may close before it has read all of it.
        let _ = s.write_all(req.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("answered and closed");
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.is_empty() || out.starts_with("HTTP/1.1 431"),
            "a head over {MAX_REQUEST_HEAD} bytes: {out}"
        );
    }
}
