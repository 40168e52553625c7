//! Human and JSON output of the CLI commands.

use std::fmt::Write as _;

use crate::api::{EndpointsView, StatusView};

/// Write to stdout; a closed pipe (`| head`) ends the output quietly.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    emit(&(serde_json::to_string_pretty(v)? + "\n"))
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            let _ = write!(s, "{:<w$}  ", c, w = widths[i]);
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut header.iter().copied());
    for r in rows {
        line(&mut out, &mut r.iter().map(String::as_str));
    }
    out
}

/// What `cleanup` removed under `bpffs`.
/// `-o`: how a command prints its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    /// A table.
    #[default]
    Table,
    /// A table with every column (`endpoints`: connection and stream
    /// columns for every port).
    Wide,
    /// The admin socket's JSON.
    Json,
}

impl Output {
    pub fn is_json(self) -> bool {
        self == Self::Json
    }
}

pub fn print_cleanup(
    bpffs: &std::path::Path,
    removed: &[std::path::PathBuf],
) -> anyhow::Result<()> {
    if removed.is_empty() {
        println!("nothing pinned under {}", bpffs.display());
    }
    for r in removed {
        println!("removed {}", r.display());
    }
    Ok(())
}

pub fn print_status(v: &StatusView, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(v);
    }
    let mut o = String::new();
    let _ = writeln!(o, "version:   {}", v.version);
    let _ = writeln!(o, "cgroup:    {}", v.cgroup);
    let _ = writeln!(o, "source:    {} {}", v.source.kind, v.source.path);
    let r = &v.last_reload;
    let _ = writeln!(
        o,
        "reload:    {} ({} applied of {} loads; {} services, {} frontends)",
        if r.ok {
            "ok"
        } else {
            "FAILED, serving the last good state"
        },
        r.applied,
        r.attempts,
        r.services,
        r.frontends
    );
    if let Some(p) = &v.pins {
        let _ = writeln!(
            o,
            "pins:      {p}{}",
            if v.adopted {
                " (adopted from an earlier agent)"
            } else {
                ""
            }
        );
    }
    if let Some(a) = &v.apiserver {
        let _ = writeln!(
            o,
            "apiserver: {} ({} services, {} endpointslices, zone {}, {} errors{})",
            a.state.as_str(),
            a.services,
            a.endpoint_slices,
            a.node_zone.as_deref().unwrap_or("-"),
            a.errors,
            a.last_error
                .as_ref()
                .map(|e| format!("; last: {e}"))
                .unwrap_or_default()
        );
    }
    match &v.router {
        None => {
            let _ = writeln!(
                o,
                "router:    none (http2 ports are balanced per connection)"
            );
        }
        Some(rt) => {
            let _ = writeln!(
                o,
                "router:    {} {} (heartbeat {} ms ago{}){}",
                rt.address,
                if rt.alive {
                    "steered to"
                } else {
                    "DOWN, http2 ports balanced per connection"
                },
                rt.heartbeat_age_ms,
                if rt.splice { ", splice" } else { "" },
                match (&rt.process, &rt.error) {
                    (Some(p), _) => format!(
                        "; pid {}, table generation {} of {}, {} routes, {} client connections, \
                         {} pod connections lost to unanswered probes",
                        p.pid,
                        p.generation,
                        v.generation,
                        p.routes,
                        p.client_connections,
                        p.pod_probe_timeouts
                    ),
                    (None, Some(e)) => format!("; {e}"),
                    (None, None) => String::new(),
                }
            );
            if let Some(p) = &rt.process {
                let _ = writeln!(
                    o,
                    "identity:  {}",
                    if p.pools.source_identity == "node" {
                        "node (pods see the node's address for streams through the router)"
                            .to_owned()
                    } else {
                        format!(
                            "pod ({} client namespaces served, {} with pod connections of their \
                             own ({} connections), {} connections closed for a namespace it \
                             could not enter)",
                            p.pools.namespaces,
                            p.pools.namespace_pools,
                            p.pools.namespace_connections,
                            p.unserved_closed
                        )
                    }
                );
            }
        }
    }
    match &v.removed_connections {
        None => {
            let _ = writeln!(
                o,
                "removed:   connections of removed endpoints are left to TCP \
                 (--end-removed-connections=false)"
            );
        }
        Some(rc) => {
            let sum = |f: fn(&crate::gone::Ended) -> u64| rc.services.values().map(f).sum::<u64>();
            let _ = writeln!(
                o,
                "removed:   {} connections of removed endpoints ended, {} already closed, \
                 {} unreachable, {} failed{}",
                sum(|e| e.ended),
                sum(|e| e.already_closed),
                sum(|e| e.unreachable),
                sum(|e| e.failed),
                if rc.enters_namespaces {
                    ""
                } else {
                    " (no CAP_SYS_ADMIN: only hostNetwork clients' are ended)"
                }
            );
        }
    }
    if let Some(e) = &r.error {
        let _ = writeln!(o, "error:     {e}");
    }
    o.push('\n');
    let rows: Vec<Vec<String>> = v
        .programs
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.attach_type.clone(),
                if p.attached { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    let _ = write!(o, "{}", table(&["PROGRAM", "ATTACH", "ATTACHED"], &rows));
    for p in &v.programs {
        for other in &p.others {
            let _ = writeln!(
                o,
                "{}: also {} (id {}){}",
                p.attach_type,
                if other.name.is_empty() {
                    "a program"
                } else {
                    &other.name
                },
                other.id,
                match (other.before, p.attach_type.contains("connect")) {
                    (true, true) =>
                        ", which runs BEFORE ours: a VIP it rewrites (a CNI's socket \
                                     load balancer) never reaches us, and that service is not \
                                     balanced by this agent",
                    (true, false) => ", which runs before ours",
                    (false, _) => ", which runs after ours",
                }
            );
        }
    }
    o.push('\n');
    let rows: Vec<Vec<String>> = v
        .maps
        .iter()
        .map(|m| {
            let pct = 100.0 * m.entries as f64 / f64::from(m.max_entries.max(1));
            vec![
                m.name.clone(),
                m.entries.to_string(),
                m.max_entries.to_string(),
                format!("{pct:.1}%"),
            ]
        })
        .collect();
    let _ = write!(o, "{}", table(&["MAP", "ENTRIES", "MAX", "FILL"], &rows));
    o.push('\n');
    let rows: Vec<Vec<String>> = v
        .counters
        .iter()
        .map(|(k, n)| vec![k.clone(), n.to_string()])
        .collect();
    let _ = write!(o, "{}", table(&["COUNTER", "VALUE"], &rows));
    emit(&o)
}

pub fn print_services(v: &EndpointsView, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        #[derive(serde::Serialize)]
        struct Svc<'a> {
            name: &'a str,
            addresses: &'a [String],
            ports: &'a [crate::api::PortView],
            endpoints_usable: usize,
            endpoints_total: usize,
        }
        #[derive(serde::Serialize)]
        struct Out<'a> {
            services: Vec<Svc<'a>>,
        }
        let services = v
            .services
            .iter()
            .map(|s| Svc {
                name: &s.name,
                addresses: &s.addresses,
                ports: &s.ports,
                endpoints_usable: s.endpoints.iter().filter(|e| e.usable).count(),
                endpoints_total: s.endpoints.len(),
            })
            .collect();
        return json(&Out { services });
    }
    let rows: Vec<Vec<String>> = v
        .services
        .iter()
        .map(|s| {
            let ports = s
                .ports
                .iter()
                .map(|p| {
                    format!(
                        "{}->{}/{}/{}",
                        p.port, p.target_port, p.protocol, p.algorithm
                    )
                })
                .collect::<Vec<_>>()
                .join(",");
            let usable = s.endpoints.iter().filter(|e| e.usable).count();
            vec![
                s.name.clone(),
                s.addresses.join(","),
                ports,
                format!("{usable}/{}", s.endpoints.len()),
            ]
        })
        .collect();
    emit(&table(
        &["SERVICE", "ADDRESSES", "PORTS", "ENDPOINTS"],
        &rows,
    ))
}

pub fn print_endpoints(v: &EndpointsView, output: Output) -> anyhow::Result<()> {
    if output.is_json() {
        return json(v);
    }
    emit(&endpoints_tables(v, output == Output::Wide))
}

/// What an endpoint's row is about: the protocols of the service ports
/// that reach it (its target port; a named port that differs per endpoint
/// matches none, and then every port of the service counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carries {
    /// `tcp` only: connections, balanced by the kernel.
    Connections,
    /// `http2` only: streams, balanced by the router.
    Streams,
    /// Both kinds of port reach the same target port.
    Both,
}

fn carries(s: &crate::api::ServiceView, e: &crate::api::EndpointView) -> (Carries, String) {
    let mine: Vec<&crate::api::PortView> =
        s.ports.iter().filter(|p| p.target_port == e.port).collect();
    let ports = if mine.is_empty() {
        s.ports.iter().collect()
    } else {
        mine
    };
    let h2 = ports.iter().any(|p| p.protocol == "http2");
    let other = ports.iter().any(|p| p.protocol != "http2");
    let mut names: Vec<&str> = ports.iter().map(|p| p.protocol.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let kind = match (h2, other) {
        (true, false) => Carries::Streams,
        (true, true) => Carries::Both,
        (false, _) => Carries::Connections,
    };
    let names = if names.is_empty() {
        "-".to_owned()
    } else {
        names.join(",")
    };
    (kind, names)
}

/// The router's latency estimate (PeakEWMA) with its unit.
fn latency(us: u64) -> String {
    match us {
        0 => "-".into(),
        1..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// The columns every row starts with: service, endpoint, state, usable,
/// zone.
fn endpoint_cells(s: &crate::api::ServiceView, e: &crate::api::EndpointView) -> Vec<String> {
    let cond = if e.ready {
        "ready"
    } else if e.serving && e.terminating {
        "terminating"
    } else {
        "not-ready"
    };
    let addr = if e.address.contains(':') {
        format!("[{}]:{}", e.address, e.port)
    } else {
        format!("{}:{}", e.address, e.port)
    };
    vec![
        s.name.clone(),
        addr,
        cond.into(),
        if e.usable { "yes" } else { "no" }.into(),
        e.zone.clone().unwrap_or_else(|| "-".into()),
    ]
}

fn ejected_cell(e: &crate::api::EndpointView) -> String {
    match &e.ejected {
        Some(why) => format!("{why}, probe in {:.1}s", e.ejected_for_ms as f64 / 1000.0),
        None => "-".into(),
    }
}

/// The `endpoints` tables. `tcp` ports' endpoints (and the draining
/// backends) show their connections, `http2` ports' their streams through
/// the router, latency and failures, in a table each (an endpoint reached
/// by both kinds of port is in both); `wide` puts every column of every
/// endpoint in one table.
fn endpoints_tables(v: &EndpointsView, wide: bool) -> String {
    const FIRST: [&str; 5] = ["SERVICE", "ENDPOINT", "STATE", "USABLE", "ZONE"];
    const CONNS: [&str; 2] = ["ACTIVE", "TOTAL"];
    const STREAMS: [&str; 4] = ["STREAMS", "STREAMS-TOTAL", "LATENCY", "FAILURES"];
    let conns = |e: &crate::api::EndpointView| {
        [e.active_connections, e.connections_total].map(|n| n.to_string())
    };
    let streams = |e: &crate::api::EndpointView| {
        [
            e.active_streams.to_string(),
            e.streams_total.to_string(),
            // Before its first stream, the router's estimate is only its
            // starting guess.
            if e.active_streams + e.streams_total == 0 {
                "-".into()
            } else {
                latency(e.ewma_us)
            },
            e.failures.to_string(),
        ]
    };
    if wide {
        let mut rows = Vec::new();
        for s in &v.services {
            for e in &s.endpoints {
                let mut r = endpoint_cells(s, e);
                r.insert(2, carries(s, e).1);
                r.extend(conns(e));
                r.extend(streams(e));
                r.push(e.ejections.to_string());
                r.push(ejected_cell(e));
                rows.push(r);
            }
        }
        for d in &v.draining {
            let mut r = vec![
                "(removed)".into(),
                format!("{}:{}", d.address, d.port),
                "-".into(),
                "draining".into(),
                "no".into(),
                "-".into(),
                d.active_connections.to_string(),
                d.connections_total.to_string(),
            ];
            r.extend(std::iter::repeat_n("-".to_owned(), STREAMS.len() + 2));
            rows.push(r);
        }
        let mut header = FIRST.to_vec();
        header.insert(2, "PROTOCOL");
        header.extend(CONNS);
        header.extend(STREAMS);
        header.extend(["EJECTIONS", "EJECTED"]);
        return table(&header, &rows);
    }
    let (mut conn_rows, mut stream_rows) = (Vec::new(), Vec::new());
    for s in &v.services {
        for e in &s.endpoints {
            let kind = carries(s, e).0;
            if kind != Carries::Streams {
                let mut r = endpoint_cells(s, e);
                r.extend(conns(e));
                r.push(ejected_cell(e));
                conn_rows.push(r);
            }
            if kind != Carries::Connections {
                let mut r = endpoint_cells(s, e);
                r.extend(streams(e));
                r.push(ejected_cell(e));
                stream_rows.push(r);
            }
        }
    }
    for d in &v.draining {
        conn_rows.push(vec![
            "(removed)".into(),
            format!("{}:{}", d.address, d.port),
            "draining".into(),
            "no".into(),
            "-".into(),
            d.active_connections.to_string(),
            d.connections_total.to_string(),
            "-".into(),
        ]);
    }
    let mut out = String::new();
    // With nothing at all, the connections header alone, as before.
    if !conn_rows.is_empty() || stream_rows.is_empty() {
        let header: Vec<&str> = FIRST
            .iter()
            .chain(&CONNS)
            .chain(&["EJECTED"])
            .copied()
            .collect();
        out += &table(&header, &conn_rows);
    }
    if !stream_rows.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        let header: Vec<&str> = FIRST
            .iter()
            .chain(&STREAMS)
            .chain(&["EJECTED"])
            .copied()
            .collect();
        out += &table(&header, &stream_rows);
    }
    out
}

/// One service's rows in `top`, from two snapshots `dt` apart.
pub fn top_frame(prev: Option<&EndpointsView>, now: &EndpointsView, dt: f64) -> String {
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for s in &now.services {
        let before = prev.and_then(|p| p.services.iter().find(|x| x.name == s.name));
        let rate = |e: &crate::api::EndpointView, f: fn(&crate::api::EndpointView) -> u64| {
            let old = before
                .and_then(|b| {
                    b.endpoints
                        .iter()
                        .find(|x| x.address == e.address && x.port == e.port)
                })
                .map_or(f(e), f);
            f(e).saturating_sub(old) as f64 / dt.max(1e-3)
        };
        // Traffic per pod: streams/s where the router sees streams,
        // otherwise new connections/s.
        let per: Vec<(f64, f64)> = s
            .endpoints
            .iter()
            .map(|e| {
                (
                    rate(e, |x| x.streams_total),
                    rate(e, |x| x.connections_total),
                )
            })
            .collect();
        let use_streams =
            per.iter().any(|(st, _)| *st > 0.0) || s.endpoints.iter().any(|e| e.streams_total > 0);
        let load: Vec<f64> = s
            .endpoints
            .iter()
            .zip(&per)
            .map(|(e, (st, _))| {
                if use_streams {
                    *st
                } else {
                    e.active_connections as f64
                }
            })
            .collect();
        let total: f64 = load.iter().sum();
        for (i, e) in s.endpoints.iter().enumerate() {
            let share = if total > 0.0 {
                100.0 * load[i] / total
            } else {
                0.0
            };
            rows.push(vec![
                s.name.clone(),
                format!("{}:{}", e.address, e.port),
                e.active_connections.to_string(),
                format!("{:.0}", per[i].1),
                e.active_streams.to_string(),
                format!("{:.0}", per[i].0),
                format!("{share:.1}%"),
                match (&e.ejected, e.ewma_us) {
                    (Some(why), _) => format!("EJECTED ({why})"),
                    (None, 0) => "-".into(),
                    (None, us) => format!("{us}us"),
                },
            ]);
        }
        let n = load.len().max(1) as f64;
        let max = load.iter().copied().fold(0.0, f64::max);
        let imbalance = if total > 0.0 { max / (total / n) } else { 0.0 };
        summary.push(format!(
            "{}: imbalance {imbalance:.2} (busiest/mean of {})",
            s.name,
            if use_streams {
                "streams/s"
            } else {
                "active connections"
            }
        ));
    }
    let mut out = table(
        &[
            "SERVICE",
            "ENDPOINT",
            "CONNS",
            "CONN/S",
            "STREAMS",
            "STREAMS/S",
            "SHARE",
            "LATENCY",
        ],
        &rows,
    );
    out.push('\n');
    for l in summary {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

pub async fn top(
    socket: &std::path::Path,
    interval: std::time::Duration,
    iterations: Option<u64>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let tty = std::io::stdout().is_terminal();
    let mut prev: Option<EndpointsView> = None;
    let mut last = std::time::Instant::now();
    let mut n = 0u64;
    loop {
        let now: EndpointsView =
            crate::admin::request(socket, &crate::api::Request::Endpoints { name: None }).await?;
        let dt = last.elapsed().as_secs_f64();
        last = std::time::Instant::now();
        let frame = top_frame(prev.as_ref(), &now, dt);
        if tty {
            // Clear the screen and go home.
            emit(&format!("\x1b[2J\x1b[H{frame}"))?;
        } else {
            emit(&format!("{frame}\n"))?;
        }
        prev = Some(now);
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{EndpointView, ServiceView};

    fn ep(addr: &str, conns: u64, streams: u64) -> EndpointView {
        EndpointView {
            address: addr.into(),
            port: 80,
            zone: None,
            ready: true,
            serving: true,
            terminating: false,
            usable: true,
            active_connections: conns,
            connections_total: conns,
            active_streams: 0,
            streams_total: streams,
            ewma_us: 0,
            failures: 0,
            ejections: 0,
            ejected: None,
            ejected_for_ms: 0,
            router_connections: 0,
            backend_id: None,
            socket: None,
        }
    }

    fn view(eps: Vec<EndpointView>) -> EndpointsView {
        EndpointsView {
            services: vec![ServiceView {
                name: "a/b".into(),
                addresses: vec!["198.19.0.1".into()],
                ports: vec![],
                endpoints: eps,
            }],
            draining: vec![],
            router: None,
        }
    }

    #[test]
    fn top_computes_rates_shares_and_imbalance() {
        let before = view(vec![ep("198.18.1.1", 1, 100), ep("198.18.1.2", 1, 100)]);
        let after = view(vec![ep("198.18.1.1", 1, 400), ep("198.18.1.2", 1, 200)]);
        let f = top_frame(Some(&before), &after, 1.0);
        assert!(f.contains("300"), "{f}");
        assert!(f.contains("75.0%") && f.contains("25.0%"), "{f}");
        assert!(
            f.contains("imbalance 1.50 (busiest/mean of streams/s)"),
            "{f}"
        );
    }

    #[test]
    fn top_falls_back_to_connections_for_l4_services() {
        let v = view(vec![ep("198.18.1.1", 16, 0), ep("198.18.1.2", 16, 0)]);
        let f = top_frame(None, &v, 1.0);
        assert!(
            f.contains("imbalance 1.00 (busiest/mean of active connections)"),
            "{f}"
        );
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "LONGER"], &[vec!["xxxx".into(), "y".into()]]);
        assert_eq!(t, "A     LONGER\nxxxx  y\n");
    }
}
