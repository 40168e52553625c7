//! The `file` endpoint source: a YAML (or JSON) endpoints file, validated
//! into a [`DesiredState`] and hot-reloaded when it changes.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};
use tokio::sync::mpsc;

use super::Update;
use crate::state::{Algorithm, DesiredState, EndpointSpec, PortSpec, Protocol, ServiceSpec};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read endpoints file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// YAML syntax and type errors: the field path (from
    /// serde_path_to_error) and serde-saphyr's message with the line and
    /// column, on one line.
    #[error("endpoints file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// Semantic errors found after parsing, with the path of the field.
    #[error("endpoints file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// A TCP/UDP port number, 1..=65535. Deserialized by hand so that 0 and
/// out-of-range values get a clear message with the parser's line number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Port(u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, so the error is raised while the parser still knows the
        // field: the message then names `...ports[0].port` and the line.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number 1..=65535")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Port, E> {
                match u16::try_from(v) {
                    Ok(p) if p != 0 => Ok(Port(p)),
                    _ => Err(E::custom(format!(
                        "port {v} is out of range: a port must be 1..=65535"
                    ))),
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Port, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_i64(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    services: Vec<FileService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: String,
    addresses: Vec<IpAddr>,
    ports: Vec<FilePort>,
    #[serde(default)]
    endpoints: Vec<FileEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilePort {
    #[serde(default)]
    name: Option<String>,
    port: Port,
    #[serde(default)]
    target_port: Option<Port>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    algorithm: Option<Algorithm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    address: IpAddr,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
}

/// Parse and validate an endpoints file's contents.
pub fn parse(path: &Path, text: &str) -> Result<DesiredState, FileError> {
    let doc: FileDoc = if text.trim().is_empty() {
        FileDoc { services: vec![] }
    } else {
        from_yaml(text).map_err(|message| FileError::Parse {
            path: path.to_owned(),
            message,
        })?
    };
    validate(path, doc)
}

/// Deserialize YAML (JSON is YAML), an error as one line: the path of the
/// field, then the parser's message with its line and column
/// (`services[0].ports[0].port: port 0 is out of range: ... at line 5,
/// column 15`).
fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut field = None;
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            field = Some(e.path().to_string());
            e.into_inner()
        })
    })
    .map_err(|e| {
        // Without the snippet: the source lines it quotes would make the
        // error several lines long.
        let message = e.without_snippet().to_string();
        match field.filter(|f| f != ".") {
            Some(f) => format!("{f}: {message}"),
            None => message,
        }
    })
}

fn validate(path: &Path, doc: FileDoc) -> Result<DesiredState, FileError> {
    let invalid = |field: String, message: String| FileError::Invalid {
        path: path.to_owned(),
        field,
        message,
    };
    let mut names = HashSet::new();
    let mut frontends: HashMap<(IpAddr, u16), String> = HashMap::new();
    let mut services = Vec::with_capacity(doc.services.len());
    for (si, s) in doc.services.into_iter().enumerate() {
        let at = format!("services[{si}]");
        let mut parts = s.name.split('/');
        let well_formed = matches!((parts.next(), parts.next(), parts.next()),
            (Some(ns), Some(n), None) if !ns.is_empty() && !n.is_empty());
        if !well_formed {
            return Err(invalid(
                format!("{at}.name"),
                format!("{:?} is not of the form namespace/name", s.name),
            ));
        }
        if !names.insert(s.name.clone()) {
            return Err(invalid(
                format!("{at}.name"),
                format!("duplicate service name {:?}", s.name),
            ));
        }
        if s.addresses.is_empty() {
            return Err(invalid(
                format!("{at}.addresses"),
                "a service needs at least one address".into(),
            ));
        }
        if s.ports.is_empty() {
            return Err(invalid(
                format!("{at}.ports"),
                "a service needs at least one port".into(),
            ));
        }
        let mut seen_addrs = HashSet::new();
        for (ai, a) in s.addresses.iter().enumerate() {
            if !seen_addrs.insert(*a) {
                return Err(invalid(
                    format!("{at}.addresses[{ai}]"),
                    format!("address {a} listed twice"),
                ));
            }
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                return Err(invalid(
                    format!("{at}.addresses[{ai}]"),
                    format!("{a} cannot be a service address"),
                ));
            }
        }
        let mut port_names = HashSet::new();
        let mut ports = Vec::with_capacity(s.ports.len());
        for (pi, p) in s.ports.iter().enumerate() {
            if let Some(name) = &p.name
                && !port_names.insert(name.clone())
            {
                return Err(invalid(
                    format!("{at}.ports[{pi}].name"),
                    format!("duplicate port name {name:?}"),
                ));
            }
            for a in &s.addresses {
                if let Some(other) = frontends.insert((*a, p.port.0), s.name.clone()) {
                    return Err(invalid(
                        format!("{at}.ports[{pi}].port"),
                        format!(
                            "{} is already used by service {other}",
                            std::net::SocketAddr::new(*a, p.port.0)
                        ),
                    ));
                }
            }
            ports.push(PortSpec {
                name: p.name.clone(),
                port: p.port.0,
                target_port: p.target_port.map_or(p.port.0, |t| t.0),
                protocol: p.protocol,
                algorithm: p
                    .algorithm
                    .unwrap_or_else(|| p.protocol.default_algorithm()),
            });
        }
        let has_v4 = s.addresses.iter().any(IpAddr::is_ipv4);
        let has_v6 = s.addresses.iter().any(IpAddr::is_ipv6);
        let mut seen_eps = HashSet::new();
        let mut endpoints = Vec::with_capacity(s.endpoints.len());
        for (ei, e) in s.endpoints.iter().enumerate() {
            let field = format!("{at}.endpoints[{ei}].address");
            if (e.address.is_ipv4() && !has_v4) || (e.address.is_ipv6() && !has_v6) {
                let fam = if e.address.is_ipv4() { "IPv4" } else { "IPv6" };
                return Err(invalid(
                    field,
                    format!(
                        "{fam} endpoint {} but the service has no {fam} address, so no port can serve it",
                        e.address
                    ),
                ));
            }
            if e.address.is_unspecified() || e.address.is_multicast() {
                return Err(invalid(
                    field,
                    format!("{} cannot be an endpoint", e.address),
                ));
            }
            if !seen_eps.insert(e.address) {
                return Err(invalid(
                    field,
                    format!("endpoint {} listed twice", e.address),
                ));
            }
            let ready = e.ready.unwrap_or(true);
            endpoints.push(EndpointSpec {
                target_ports: Default::default(),
                address: e.address,
                zone: e.zone.clone(),
                ready,
                serving: e.serving.unwrap_or(ready),
                terminating: e.terminating.unwrap_or(false),
            });
        }
        if !endpoints.is_empty() {
            for (ai, a) in s.addresses.iter().enumerate() {
                if !endpoints.iter().any(|e| e.address.is_ipv4() == a.is_ipv4()) {
                    return Err(invalid(
                        format!("{at}.addresses[{ai}]"),
                        format!("{a} has no endpoint of its family, so its ports cannot serve it"),
                    ));
                }
            }
        }
        services.push(ServiceSpec {
            affinity_timeout_s: 0,
            name: s.name,
            addresses: s.addresses,
            ports,
            endpoints,
        });
    }
    Ok(DesiredState { services })
}

/// Read and parse the file.
pub async fn load(path: &Path) -> Result<(Vec<u8>, DesiredState), FileError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })?;
    let text = String::from_utf8_lossy(&bytes);
    let state = parse(path, &text)?;
    Ok((bytes, state))
}

/// Watch the file and send every changed version (or the error parsing it).
///
/// Polling the contents, rather than inotify, follows editors that replace
/// the file by rename and ConfigMap volumes that swap a symlink, and cannot
/// miss an event; at 250 ms it costs one small read.
pub async fn watch(path: PathBuf, initial: Vec<u8>, tx: mpsc::Sender<Update>) {
    let mut last = initial;
    let mut last_error: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(source) => {
                let err = FileError::Read {
                    path: path.clone(),
                    source,
                };
                // Report a missing file once, not every tick.
                if last_error.as_deref() != Some(&err.to_string()) {
                    last_error = Some(err.to_string());
                    if tx.send(Err(err)).await.is_err() {
                        return;
                    }
                }
                continue;
            }
        };
        if bytes == last {
            continue;
        }
        last = bytes;
        last_error = None;
        let update = parse(&path, &String::from_utf8_lossy(&last));
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<DesiredState, String> {
        parse(Path::new("eps.yaml"), text).map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
services:
  - name: default/echo
    addresses: [198.19.0.10]
    ports:
      - name: main
        port: 80
        targetPort: 8080
        protocol: tcp
        algorithm: least-conn
    endpoints:
      - address: 198.18.1.10
        zone: zone-a
      - address: 198.18.1.11
        ready: false
        serving: true
        terminating: true
"#;

    #[test]
    fn parses_the_documented_example() {
        let s = p(GOOD).expect("valid");
        let svc = &s.services[0];
        assert_eq!(svc.name, "default/echo");
        assert_eq!(svc.ports[0].port, 80);
        assert_eq!(svc.ports[0].target_port, 8080);
        assert_eq!(svc.ports[0].algorithm, Algorithm::LeastConn);
        assert_eq!(svc.endpoints.len(), 2);
        assert!(svc.endpoints[0].ready && svc.endpoints[0].serving);
        assert_eq!(svc.endpoints[0].zone.as_deref(), Some("zone-a"));
        assert!(!svc.endpoints[1].ready && svc.endpoints[1].terminating);
    }

    #[test]
    fn json_is_accepted() {
        let s = p(r#"{"services":[{"name":"a/b","addresses":["fd00:19::10"],"ports":[{"port":443}],"endpoints":[{"address":"fd00:18::10"}]}]}"#)
            .expect("valid json");
        let port = &s.services[0].ports[0];
        assert_eq!((port.port, port.target_port), (443, 443));
        assert_eq!(
            port.algorithm,
            Algorithm::LeastConn,
            "least-conn is the default"
        );
        assert_eq!(port.protocol, Protocol::Tcp);
    }

    #[test]
    fn empty_file_is_no_services() {
        assert!(p("").expect("empty").services.is_empty());
        assert!(p("services: []").expect("empty").services.is_empty());
    }

    fn err_of(text: &str) -> String {
        p(text).expect_err("must be refused")
    }

    #[test]
    fn invalid_yaml_names_the_line() {
        let e = err_of("services:\n  - name: a/b\n    addresses: [1.2.3.4\n");
        assert!(e.contains("line"), "{e}");
        assert!(!e.contains('\n'), "one line for logs and status: {e}");
    }

    #[test]
    fn bad_ip_names_field_and_line() {
        let e = err_of(
            "services:\n  - name: a/b\n    addresses: [198.19.0.300]\n    ports: [{port: 80}]\n",
        );
        assert!(e.contains("services[0].addresses[0]"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let e = err_of(
            "services:\n  - name: a/b\n    addresses: [198.19.0.1]\n    ports: [{port: 80}]\n    endpoints:\n      - address: not-an-ip\n",
        );
        assert!(e.contains("services[0].endpoints[0].address"), "{e}");
        assert!(e.contains("line 6"), "{e}");
    }

    #[test]
    fn port_zero_and_too_big_are_refused() {
        for bad in ["0", "65536", "70000", "-1"] {
            let e = err_of(&format!(
                "services:\n  - name: a/b\n    addresses: [198.19.0.1]\n    ports:\n      - port: {bad}\n"
            ));
            assert!(e.contains("services[0].ports[0].port"), "{e}");
            assert!(e.contains("1..=65535"), "{e}");
            assert!(e.contains("line 5"), "{e}");
        }
        let e = err_of(
            "services:\n  - name: a/b\n    addresses: [198.19.0.1]\n    ports:\n      - port: 80\n        targetPort: 0\n",
        );
        assert!(e.contains("services[0].ports[0].targetPort"), "{e}");
    }

    #[test]
    fn unknown_protocol_and_algorithm_are_refused() {
        let e = err_of(
            "services:\n  - name: a/b\n    addresses: [198.19.0.1]\n    ports:\n      - port: 80\n        protocol: udp\n",
        );
        assert!(e.contains("services[0].ports[0].protocol"), "{e}");
        assert!(e.contains("unknown variant"), "{e}");
        let e = err_of(
            "services:\n  - name: a/b\n    addresses: [198.19.0.1]\n    ports:\n      - port: 80\n        algorithm: fastest\n",
        );
        assert!(e.contains("services[0].ports[0].algorithm"), "{e}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let e = err_of(
            "services:\n  - name: a/b\n    addresses: [198.19.0.1]\n    ports: [{port: 80, tragetPort: 8080}]\n",
        );
        assert!(e.contains("tragetPort"), "{e}");
    }

    #[test]
    fn duplicate_names_and_frontends_are_refused() {
        let e = err_of(
            "services:\n  - {name: a/b, addresses: [198.19.0.1], ports: [{port: 80}]}\n  - {name: a/b, addresses: [198.19.0.2], ports: [{port: 80}]}\n",
        );
        assert!(
            e.contains("services[1].name") && e.contains("duplicate"),
            "{e}"
        );
        let e = err_of(
            "services:\n  - {name: a/b, addresses: [198.19.0.1], ports: [{port: 80}]}\n  - {name: a/c, addresses: [198.19.0.1], ports: [{port: 80}]}\n",
        );
        assert!(
            e.contains("services[1].ports[0].port") && e.contains("a/b"),
            "{e}"
        );
        let e = err_of(
            "services:\n  - {name: a/b, addresses: [198.19.0.1], ports: [{port: 80}, {port: 80}]}\n",
        );
        assert!(e.contains("services[0].ports[1].port"), "{e}");
    }

    #[test]
    fn family_mismatches_are_refused() {
        let e = err_of(
            "services:\n  - {name: a/b, addresses: [198.19.0.1], ports: [{port: 80}], endpoints: [{address: 'fd00:18::1'}]}\n",
        );
        assert!(
            e.contains("services[0].endpoints[0].address") && e.contains("IPv6"),
            "{e}"
        );
        let e = err_of(
            "services:\n  - {name: a/b, addresses: [198.19.0.1, 'fd00:19::1'], ports: [{port: 80}], endpoints: [{address: 198.18.0.5}]}\n",
        );
        assert!(e.contains("services[0].addresses[1]"), "{e}");
    }

    #[test]
    fn bad_names_and_missing_fields_are_refused() {
        assert!(
            err_of(
                "services:\n  - {name: nonamespace, addresses: [198.19.0.1], ports: [{port: 80}]}\n"
            )
            .contains("services[0].name")
        );
        assert!(
            err_of("services:\n  - {name: a/b, addresses: [], ports: [{port: 80}]}\n")
                .contains("services[0].addresses")
        );
        assert!(
            err_of("services:\n  - {name: a/b, addresses: [198.19.0.1], ports: []}\n")
                .contains("services[0].ports")
        );
        assert!(err_of("services:\n  - {name: a/b, ports: [{port: 80}]}\n").contains("addresses"));
        assert!(err_of("services:\n  - {name: a/b, addresses: [198.19.0.1], ports: [{port: 80}], endpoints: [{address: 198.18.0.1}, {address: 198.18.0.1}]}\n").contains("endpoints[1]"));
    }

    #[test]
    fn service_without_endpoints_is_valid() {
        let s = p("services:\n  - {name: a/b, addresses: [198.19.0.1], ports: [{port: 80}]}\n")
            .expect("valid");
        assert!(s.services[0].endpoints.is_empty());
    }
}
