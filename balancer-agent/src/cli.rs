//! Human and JSON output of the CLI commands.

use std::fmt::Write as _;

use crate::admin::{EndpointsView, StatusView};

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
            ports: &'a [crate::admin::PortView],
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

pub fn print_endpoints(v: &EndpointsView, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(v);
    }
    let mut rows = Vec::new();
    for s in &v.services {
        for e in &s.endpoints {
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
            rows.push(vec![
                s.name.clone(),
                addr,
                cond.into(),
                if e.usable { "yes" } else { "no" }.into(),
                e.zone.clone().unwrap_or_else(|| "-".into()),
                e.active_connections.to_string(),
                e.connections_total.to_string(),
            ]);
        }
    }
    for d in &v.draining {
        rows.push(vec![
            "(removed)".into(),
            format!("{}:{}", d.address, d.port),
            "draining".into(),
            "no".into(),
            "-".into(),
            d.active_connections.to_string(),
            d.connections_total.to_string(),
        ]);
    }
    emit(&table(
        &[
            "SERVICE", "ENDPOINT", "STATE", "USABLE", "ZONE", "ACTIVE", "TOTAL",
        ],
        &rows,
    ))
}
