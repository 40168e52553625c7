//! Pure conversion of the stored Services and EndpointSlices into a
//! [`DesiredState`], and what the stores keep of each object (only what
//! the conversion reads). No I/O: the watchers are in `watch.rs`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServiceSpec as KubeServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::ResourceExt;

use crate::state::{Algorithm, DesiredState, EndpointSpec, PortSpec, Protocol, ServiceSpec};

/// Annotations of this project, on a Service.
const ANNOTATION_PREFIX: &str = "balancer.dev/";
pub const ANNOTATION_MODE: &str = "balancer.dev/mode";
pub const ANNOTATION_ALGORITHM: &str = "balancer.dev/algorithm";
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// EndpointSlices hold at most 1000 endpoints; more is a malformed object.
const MAX_SLICE_ENDPOINTS: usize = 1000;

/// What the node the agent runs on contributes to the conversion.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub name: Option<String>,
    pub zone: Option<String>,
}

/// What the conversion reads of an EndpointSlice. The store keeps this
/// instead of the object: a k8s-openapi `Endpoint` is about 350 bytes
/// before any string, mostly fields the conversion never reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: Option<String>,
    pub address_type: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
    /// More endpoints than an EndpointSlice may hold: not kept.
    pub oversized: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first address (the one kube-proxy uses).
    pub address: Option<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones` names.
    pub for_zones: Option<Vec<String>>,
}

impl From<EndpointSlice> for Slice {
    fn from(s: EndpointSlice) -> Self {
        let count = s.endpoints.len();
        // A fresh vector: collecting in place would keep the source's
        // buffer, sized for the much larger k8s-openapi endpoints.
        let mut endpoints = Vec::new();
        if count <= MAX_SLICE_ENDPOINTS {
            endpoints.reserve_exact(count);
            endpoints.extend(s.endpoints.into_iter().map(|e| {
                let c = e.conditions.unwrap_or_default();
                SliceEndpoint {
                    address: e.addresses.into_iter().next(),
                    ready: c.ready,
                    serving: c.serving,
                    terminating: c.terminating,
                    node_name: e.node_name,
                    zone: e.zone,
                    for_zones: e
                        .hints
                        .and_then(|h| h.for_zones)
                        .map(|z| z.into_iter().map(|z| z.name).collect()),
                }
            }));
        }
        Self {
            namespace: s.metadata.namespace.unwrap_or_default(),
            name: s.metadata.name.unwrap_or_default(),
            service: s
                .metadata
                .labels
                .and_then(|mut l| l.remove(SERVICE_NAME_LABEL)),
            address_type: s.address_type,
            ports: s
                .ports
                .unwrap_or_default()
                .into_iter()
                .map(|p| SlicePort {
                    name: p.name,
                    port: p.port,
                    protocol: p.protocol,
                })
                .collect(),
            endpoints,
            oversized: (count > MAX_SLICE_ENDPOINTS).then_some(count),
        }
    }
}

/// A Service as the store keeps it: without what the conversion never
/// reads. On a real cluster `managedFields`, owner references, status and
/// foreign annotations are most of an object, and every node holds every
/// Service of the cluster.
pub(super) fn keep_service(mut s: Service) -> Service {
    let m = &mut s.metadata;
    m.managed_fields = None;
    m.owner_references = None;
    m.finalizers = None;
    m.generate_name = None;
    m.uid = None;
    m.creation_timestamp = None;
    m.resource_version = None;
    m.labels = None;
    if let Some(a) = m.annotations.as_mut() {
        a.retain(|k, _| k.starts_with(ANNOTATION_PREFIX));
    }
    s.status = None;
    s
}

fn parse_mode(svc: &str, v: &str) -> Result<Option<Protocol>, String> {
    match v {
        "tcp" => Ok(Some(Protocol::Tcp)),
        "http2" => Ok(Some(Protocol::Http2)),
        "off" => Ok(None),
        other => Err(format!(
            "service {svc}: annotation {ANNOTATION_MODE}={other:?} is not tcp, http2 or off; ignored"
        )),
    }
}

fn parse_algorithm(svc: &str, v: &str) -> Result<Algorithm, String> {
    match v {
        "random" => Ok(Algorithm::Random),
        "round-robin" => Ok(Algorithm::RoundRobin),
        "least-conn" => Ok(Algorithm::LeastConn),
        "least-request" => Ok(Algorithm::LeastRequest),
        other => Err(format!(
            "service {svc}: annotation {ANNOTATION_ALGORITHM}={other:?} is not random, round-robin, least-conn or least-request; ignored"
        )),
    }
}

/// Convert Services and EndpointSlices into the desired state. Returns the
/// state and one line per object (or field) that was skipped.
pub fn convert(
    services: &[&Service],
    slices: &[&Slice],
    node: &NodeInfo,
) -> (DesiredState, Vec<String>) {
    let mut warnings = Vec::new();
    let by_service = slices_by_service(slices);
    let mut out: Vec<ServiceSpec> = services
        .iter()
        .filter_map(|svc| convert_service(svc, &by_service, node, &mut warnings))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    dedupe_vip_ports(&mut out, &mut warnings);
    (DesiredState { services: out }, warnings)
}

/// The slices of each Service, by namespace and the service-name label.
type SlicesByService<'a> = HashMap<(String, String), Vec<&'a Slice>>;

fn slices_by_service<'a>(slices: &[&'a Slice]) -> SlicesByService<'a> {
    let mut by_service: SlicesByService<'a> = HashMap::new();
    for s in slices {
        let Some(svc) = &s.service else {
            continue;
        };
        by_service
            .entry((s.namespace.clone(), svc.clone()))
            .or_default()
            .push(s);
    }
    by_service
}

/// One Service with its endpoints, or `None` when it is not balanced here:
/// no spec, ExternalName, headless, no valid clusterIP, `mode=off`, or no
/// port left.
fn convert_service(
    svc: &Service,
    by_service: &SlicesByService<'_>,
    node: &NodeInfo,
    warnings: &mut Vec<String>,
) -> Option<ServiceSpec> {
    let ns = svc.namespace().unwrap_or_default();
    let name = format!("{ns}/{}", svc.name_any());
    let Some(spec) = svc.spec.as_ref() else {
        warnings.push(format!("service {name}: no spec; skipped"));
        return None;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let addresses = cluster_ips(&name, spec, warnings)?;
    let overrides = annotation_overrides(&name, svc, warnings)?;
    let affinity_timeout_s = affinity_timeout(spec);
    let ports = service_ports(&name, spec, overrides, warnings);
    if ports.is_empty() {
        return None;
    }
    let slices = by_service
        .get(&(ns.clone(), svc.name_any()))
        .map_or(&[][..], Vec::as_slice);
    let candidates = merge_slices(&ns, slices, warnings);
    Some(ServiceSpec {
        affinity_timeout_s,
        name,
        addresses,
        ports,
        endpoints: categorize_endpoints(candidates, spec, node),
    })
}

/// The Service's cluster IPs, or `None` when there is nothing to balance
/// (headless, or not one of them an IP address).
fn cluster_ips(
    name: &str,
    spec: &KubeServiceSpec,
    warnings: &mut Vec<String>,
) -> Option<Vec<IpAddr>> {
    let ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(v), _) if !v.is_empty() => v.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => vec![],
    };
    if ips.iter().any(|ip| ip == "None") || ips.is_empty() {
        // Headless: DNS only, nothing to balance.
        return None;
    }
    let mut addresses = Vec::new();
    for ip in &ips {
        match ip.parse::<IpAddr>() {
            Ok(a) => addresses.push(a),
            Err(_) => warnings.push(format!(
                "service {name}: clusterIP {ip:?} is not an IP address; skipped"
            )),
        }
    }
    (!addresses.is_empty()).then_some(addresses)
}

/// What this project's annotations on a Service override for all its
/// ports.
#[derive(Debug, Clone, Copy)]
struct Overrides {
    /// `balancer.dev/mode` tcp or http2, over what appProtocol says.
    mode: Option<Protocol>,
    /// `balancer.dev/algorithm`, over the protocol's default.
    algorithm: Option<Algorithm>,
}

/// The Service's annotations, or `None` for `mode=off`. A value that does
/// not parse is ignored with a warning.
fn annotation_overrides(
    name: &str,
    svc: &Service,
    warnings: &mut Vec<String>,
) -> Option<Overrides> {
    let annotations = svc.annotations();
    let mode = match annotations
        .get(ANNOTATION_MODE)
        .map(|v| parse_mode(name, v))
    {
        Some(Ok(None)) => return None, // mode=off: leave it to kube-proxy
        Some(Ok(Some(p))) => Some(p),
        Some(Err(w)) => {
            warnings.push(w);
            None
        }
        None => None,
    };
    let algorithm = match annotations
        .get(ANNOTATION_ALGORITHM)
        .map(|v| parse_algorithm(name, v))
    {
        Some(Ok(a)) => Some(a),
        Some(Err(w)) => {
            warnings.push(w);
            None
        }
        None => None,
    };
    Some(Overrides { mode, algorithm })
}

/// sessionAffinity ClientIP, with Kubernetes' default of 3 hours; 0 for
/// none.
fn affinity_timeout(spec: &KubeServiceSpec) -> u32 {
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map_or(10_800, |t| u32::try_from(t.max(1)).unwrap_or(10_800))
    } else {
        0
    }
}

/// The Service's TCP ports, each with its target port (0 when it is a
/// name), protocol and algorithm. A port that is not TCP or out of range
/// is ignored with a warning.
fn service_ports(
    name: &str,
    spec: &KubeServiceSpec,
    overrides: Overrides,
    warnings: &mut Vec<String>,
) -> Vec<PortSpec> {
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let pname = p.name.clone().unwrap_or_default();
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if proto != "TCP" {
            warnings.push(format!(
                "service {name}: port {} is {proto}; only TCP is balanced, ignored",
                p.port
            ));
            continue;
        }
        let Ok(port) = u16::try_from(p.port) else {
            warnings.push(format!(
                "service {name}: ports[{i}].port {} is out of range; ignored",
                p.port
            ));
            continue;
        };
        if port == 0 {
            warnings.push(format!("service {name}: ports[{i}].port is 0; ignored"));
            continue;
        }
        let target_port = match &p.target_port {
            None => port,
            Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                Ok(t) if t != 0 => t,
                _ => {
                    warnings.push(format!(
                        "service {name}: ports[{i}].targetPort {n} is out of range; ignored"
                    ));
                    continue;
                }
            },
            // Named: resolved per endpoint from the slices.
            Some(IntOrString::String(_)) => 0,
        };
        let h2 = matches!(
            p.app_protocol.as_deref(),
            Some("kubernetes.io/h2c" | "grpc")
        );
        let protocol = overrides
            .mode
            .unwrap_or(if h2 { Protocol::Http2 } else { Protocol::Tcp });
        ports.push(PortSpec {
            name: (!pname.is_empty()).then_some(pname),
            port,
            target_port,
            protocol,
            algorithm: overrides
                .algorithm
                .unwrap_or_else(|| protocol.default_algorithm()),
        });
    }
    ports
}

/// An endpoint with what topology and traffic policy need: its node and
/// its zone hints.
#[derive(Debug, Clone)]
struct Candidate {
    endpoint: EndpointSpec,
    /// `nodeName`.
    node: Option<String>,
    /// `hints.forZones` names.
    for_zones: Option<Vec<String>>,
}

/// Endpoints of every slice of this service, merged: one per address, in
/// address order.
fn merge_slices(ns: &str, slices: &[&Slice], warnings: &mut Vec<String>) -> Vec<Candidate> {
    let mut endpoints: BTreeMap<IpAddr, Candidate> = BTreeMap::new();
    for slice in slices {
        let slice_name = format!("{ns}/{}", slice.name);
        if slice.address_type == "FQDN" {
            continue;
        }
        if let Some(n) = slice.oversized {
            warnings.push(format!(
                "endpointslice {slice_name}: {n} endpoints, more than {MAX_SLICE_ENDPOINTS}; skipped"
            ));
            continue;
        }
        let target_ports = Arc::new(slice_target_ports(&slice_name, slice, warnings));
        for (j, e) in slice.endpoints.iter().enumerate() {
            let Some(addr) = &e.address else {
                continue;
            };
            let Ok(ip) = addr.parse::<IpAddr>() else {
                warnings.push(format!(
                    "endpointslice {slice_name}: endpoints[{j}] address {addr:?} is not an IP; skipped"
                ));
                continue;
            };
            let spec = endpoint_spec(ip, e, target_ports.clone());
            // The same address in two slices (a pod moving between
            // them): keep the ready one.
            match endpoints.get(&ip) {
                Some(old) if old.endpoint.ready || !spec.ready => {}
                _ => {
                    endpoints.insert(
                        ip,
                        Candidate {
                            endpoint: spec,
                            node: e.node_name.clone(),
                            for_zones: e.for_zones.clone(),
                        },
                    );
                }
            }
        }
    }
    endpoints.into_values().collect()
}

/// A slice's TCP ports by name ("" for an unnamed one): where its
/// endpoints take each Service port.
fn slice_target_ports(
    slice_name: &str,
    slice: &Slice,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, u16> {
    let mut target_ports = BTreeMap::new();
    for sp in &slice.ports {
        if sp.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            continue;
        }
        match sp.port.map(u16::try_from) {
            Some(Ok(n)) if n != 0 => {
                target_ports.insert(sp.name.clone().unwrap_or_default(), n);
            }
            Some(_) => warnings.push(format!(
                "endpointslice {slice_name}: port {:?} is out of range; ignored",
                sp.name
            )),
            None => {}
        }
    }
    target_ports
}

/// One endpoint of a slice, its unset conditions read as the
/// EndpointSlice API says: ready, serving as ready, not terminating.
fn endpoint_spec(
    ip: IpAddr,
    e: &SliceEndpoint,
    target_ports: Arc<BTreeMap<String, u16>>,
) -> EndpointSpec {
    let ready = e.ready.unwrap_or(true);
    EndpointSpec {
        address: ip,
        zone: e.zone.clone(),
        ready,
        serving: e.serving.unwrap_or(ready),
        terminating: e.terminating.unwrap_or(false),
        target_ports,
    }
}

/// Which of a Service's endpoints this node sends its traffic to, by the
/// rules of kube-proxy's `CategorizeEndpoints`: internalTrafficPolicy
/// Local, then topology hints. Its ready / serving-terminating fallback
/// is not applied here but where the frontends are built, per VIP family
/// (`ServiceSpec::usable_endpoints` in state.rs), so the file source has
/// it too; the conditions are kept on each endpoint for it. As in
/// kube-proxy, hints apply to Cluster-policy endpoints only: a Local
/// Service's traffic already stays on this node.
fn categorize_endpoints(
    candidates: Vec<Candidate>,
    spec: &KubeServiceSpec,
    node: &NodeInfo,
) -> Vec<EndpointSpec> {
    let mut list = candidates;
    // internalTrafficPolicy: Local: only this node's endpoints; none
    // means none (as kube-proxy drops the traffic).
    if spec.internal_traffic_policy.as_deref() == Some("Local") {
        list.retain(|c| c.node.is_some() && c.node == node.name);
        return list.into_iter().map(|c| c.endpoint).collect();
    }
    let prefer_close = spec.traffic_distribution.as_deref() == Some("PreferClose");
    prefer_zone(list, prefer_close, node)
        .into_iter()
        .map(|c| c.endpoint)
        .collect()
}

/// Topology: PreferClose / hints, with kube-proxy's safeguards: use
/// hints only when every ready endpoint has them and some are for
/// this zone; otherwise use all endpoints.
fn prefer_zone(list: Vec<Candidate>, prefer_close: bool, node: &NodeInfo) -> Vec<Candidate> {
    let ready: Vec<_> = list.iter().filter(|c| c.endpoint.ready).collect();
    if let Some(zone) = &node.zone
        && (prefer_close || ready.iter().any(|c| c.for_zones.is_some()))
        && !ready.is_empty()
        && ready.iter().all(|c| c.for_zones.is_some())
    {
        let local: Vec<_> = list
            .iter()
            .filter(|c| {
                c.for_zones
                    .as_ref()
                    .is_some_and(|z: &Vec<String>| z.contains(zone))
            })
            .cloned()
            .collect();
        if local.iter().any(|c| c.endpoint.ready) {
            return local;
        }
    }
    list
}

/// Two Services claiming one VIP:port (a misconfiguration): the first by
/// name keeps it. `out` is sorted by name; a Service left without a port
/// is dropped.
fn dedupe_vip_ports(out: &mut Vec<ServiceSpec>, warnings: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    for s in out.iter_mut() {
        let name = s.name.clone();
        s.ports.retain(|p| {
            let fresh = s.addresses.iter().all(|a| !seen.contains(&(*a, p.port)));
            if !fresh {
                warnings.push(format!(
                    "service {name}: port {} duplicates another service's VIP:port; ignored",
                    p.port
                ));
            }
            fresh
        });
        for p in &s.ports {
            for a in &s.addresses {
                seen.insert((*a, p.port));
            }
        }
    }
    out.retain(|s| !s.ports.is_empty());
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn svc(json: serde_json::Value) -> Service {
        serde_json::from_value(json).expect("service")
    }
    /// An EndpointSlice from JSON, as the store keeps it.
    fn slice(json: serde_json::Value) -> Slice {
        Slice::from(serde_json::from_value::<EndpointSlice>(json).expect("slice"))
    }

    pub(in crate::source::kube) fn base_svc(extra: serde_json::Value) -> Service {
        let mut v = serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
        });
        merge(&mut v, extra);
        svc(v)
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn web_slice(name: &str, port: i32, eps: serde_json::Value) -> Slice {
        slice(serde_json::json!({
            "metadata": {"name": name, "namespace": "default",
                          "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": eps
        }))
    }

    #[test]
    fn named_target_ports_resolve_per_slice_and_slices_merge() {
        let s = base_svc(serde_json::json!({}));
        let a = web_slice(
            "web-a",
            8080,
            serde_json::json!([{"addresses": ["10.0.0.1"]}]),
        );
        let b = web_slice(
            "web-b",
            9090,
            serde_json::json!([{"addresses": ["10.0.0.2"], "conditions": {"ready": true}}]),
        );
        let (st, w) = convert(&[&s], &[&a, &b], &NodeInfo::default());
        assert!(w.is_empty(), "{w:?}");
        let f = st.frontends();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].vip.to_string(), "10.96.0.10:80");
        let b: Vec<String> = f[0].backends.iter().map(ToString::to_string).collect();
        assert_eq!(b, vec!["10.0.0.1:8080", "10.0.0.2:9090"]);
    }

    #[test]
    fn conditions_follow_kube_proxy() {
        let s = base_svc(serde_json::json!({}));
        let sl = web_slice(
            "web-a",
            8080,
            serde_json::json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": false, "terminating": true}}
            ]),
        );
        let (st, _) = convert(&[&s], &[&sl], &NodeInfo::default());
        let f = st.frontends();
        let b: Vec<String> = f[0].backends.iter().map(ToString::to_string).collect();
        assert_eq!(b, vec!["10.0.0.1:8080"], "serving+terminating fallback");
    }

    #[test]
    fn headless_externalname_udp_and_off_are_skipped() {
        let headless = svc(
            serde_json::json!({"metadata": {"name": "h", "namespace": "d"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
        );
        let ext = svc(
            serde_json::json!({"metadata": {"name": "e", "namespace": "d"},
            "spec": {"type": "ExternalName", "externalName": "x.example", "ports": [{"port": 80}]}}),
        );
        let udp = svc(
            serde_json::json!({"metadata": {"name": "u", "namespace": "d"},
            "spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 53, "protocol": "UDP"}]}}),
        );
        let off = base_svc(
            serde_json::json!({"metadata": {"annotations": {"balancer.dev/mode": "off"}}}),
        );
        let (st, w) = convert(&[&headless, &ext, &udp, &off], &[], &NodeInfo::default());
        assert!(st.services.is_empty(), "{st:?}");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("UDP"));
    }

    #[test]
    fn app_protocol_and_annotations_select_mode_and_algorithm() {
        let grpc = base_svc(
            serde_json::json!({"spec": {"ports": [{"name": "g", "port": 80, "appProtocol": "grpc"}]}}),
        );
        let (st, _) = convert(&[&grpc], &[], &NodeInfo::default());
        assert_eq!(st.services[0].ports[0].protocol, Protocol::Http2);
        assert_eq!(st.services[0].ports[0].algorithm, Algorithm::LeastRequest);
        let ann = base_svc(serde_json::json!({"metadata": {"annotations": {
            "balancer.dev/mode": "http2", "balancer.dev/algorithm": "round-robin"}}}));
        let (st, _) = convert(&[&ann], &[], &NodeInfo::default());
        assert_eq!(st.services[0].ports[0].protocol, Protocol::Http2);
        assert_eq!(st.services[0].ports[0].algorithm, Algorithm::RoundRobin);
        let bad = base_svc(serde_json::json!({"metadata": {"annotations": {
            "balancer.dev/mode": "fast", "balancer.dev/algorithm": "magic"}}}));
        let (st, w) = convert(&[&bad], &[], &NodeInfo::default());
        assert_eq!(
            st.services[0].ports[0].protocol,
            Protocol::Tcp,
            "bad values ignored"
        );
        assert_eq!(w.len(), 2, "{w:?}");
    }

    #[test]
    fn bad_objects_are_skipped_and_named_others_apply() {
        let bad_ip = svc(
            serde_json::json!({"metadata": {"name": "bad", "namespace": "d"},
            "spec": {"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}}),
        );
        let good = base_svc(serde_json::json!({}));
        let sl = web_slice(
            "web-a",
            8080,
            serde_json::json!([{"addresses": ["not-an-ip"]}, {"addresses": ["10.0.0.1"]}]),
        );
        let (st, w) = convert(&[&bad_ip, &good], &[&sl], &NodeInfo::default());
        assert_eq!(st.services.len(), 1);
        assert_eq!(st.services[0].endpoints.len(), 1);
        assert!(w.iter().any(|l| l.contains("service d/bad")), "{w:?}");
        assert!(
            w.iter().any(|l| l.contains("endpointslice default/web-a")),
            "{w:?}"
        );
    }

    #[test]
    fn topology_hints_and_local_policy() {
        let node = NodeInfo {
            name: Some("n1".into()),
            zone: Some("a".into()),
        };
        let s = base_svc(serde_json::json!({"spec": {"trafficDistribution": "PreferClose"}}));
        let sl = web_slice(
            "web-a",
            8080,
            serde_json::json!([
                {"addresses": ["10.0.0.1"], "zone": "a", "nodeName": "n1", "hints": {"forZones": [{"name": "a"}]}},
                {"addresses": ["10.0.0.2"], "zone": "b", "nodeName": "n2", "hints": {"forZones": [{"name": "b"}]}}
            ]),
        );
        let (st, _) = convert(&[&s], &[&sl], &node);
        assert_eq!(st.services[0].endpoints.len(), 1, "same-zone only");
        // Safeguard: one endpoint without hints disables them.
        let sl2 = web_slice(
            "web-a",
            8080,
            serde_json::json!([
                {"addresses": ["10.0.0.1"], "hints": {"forZones": [{"name": "a"}]}},
                {"addresses": ["10.0.0.2"]}
            ]),
        );
        let (st, _) = convert(&[&s], &[&sl2], &node);
        assert_eq!(st.services[0].endpoints.len(), 2);
        let local = base_svc(serde_json::json!({"spec": {"internalTrafficPolicy": "Local"}}));
        let (st, _) = convert(&[&local], &[&sl], &node);
        assert_eq!(st.services[0].endpoints.len(), 1);
        assert_eq!(st.services[0].endpoints[0].address.to_string(), "10.0.0.1");
    }

    #[test]
    fn session_affinity_timeout_with_kubernetes_default() {
        let with = base_svc(serde_json::json!({"spec": {"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}}}}));
        let default = base_svc(serde_json::json!({"spec": {"sessionAffinity": "ClientIP"}}));
        let none = base_svc(serde_json::json!({"spec": {"sessionAffinity": "None"}}));
        let (st, _) = convert(&[&with], &[], &NodeInfo::default());
        assert_eq!(st.services[0].affinity_timeout_s, 30);
        let (st, _) = convert(&[&default], &[], &NodeInfo::default());
        assert_eq!(st.services[0].affinity_timeout_s, 10_800);
        let (st, _) = convert(&[&none], &[], &NodeInfo::default());
        assert_eq!(st.services[0].affinity_timeout_s, 0);
        assert_eq!(st.frontends()[0].affinity_timeout_s, 0);
    }

    #[test]
    fn dual_stack_cluster_ips() {
        let s = base_svc(
            serde_json::json!({"spec": {"clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "ipFamilies": ["IPv4", "IPv6"]}}),
        );
        let v4 = web_slice(
            "web-4",
            8080,
            serde_json::json!([{"addresses": ["10.0.0.1"]}]),
        );
        let mut v6 = web_slice(
            "web-6",
            8080,
            serde_json::json!([{"addresses": ["fd00:10::1"]}]),
        );
        v6.address_type = "IPv6".into();
        let (st, _) = convert(&[&s], &[&v4, &v6], &NodeInfo::default());
        let f = st.frontends();
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].backends[0].to_string(), "[fd00:10::1]:8080");
    }

    #[test]
    fn stored_objects_keep_only_what_the_conversion_reads() {
        let full_svc = base_svc(serde_json::json!({
            "metadata": {
                "annotations": {"balancer.dev/algorithm": "random", "kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                "labels": {"app": "web"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {}}}],
                "uid": "1234", "resourceVersion": "99",
            },
            "spec": {"internalTrafficPolicy": "Cluster", "sessionAffinity": "None"},
            "status": {"loadBalancer": {}},
        }));
        let full_slice = web_slice(
            "web-a",
            8080,
            serde_json::json!([
                {"addresses": ["10.0.0.1", "10.0.0.9"], "conditions": {"ready": true},
                 "nodeName": "n1", "zone": "z1", "hostname": "web-0",
                 "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]},
                 "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "default", "uid": "abcd"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true},
                 "nodeName": "n2", "zone": "z2",
                 "hints": {"forZones": [{"name": "z2"}]}}
            ]),
        );
        let node = NodeInfo {
            name: Some("n1".into()),
            zone: Some("z1".into()),
        };
        let want = convert(&[&full_svc], &[&full_slice], &node);
        assert_eq!(want.0.services[0].endpoints.len(), 1, "z1's hint: {want:?}");
        let svc = keep_service(full_svc.clone());
        assert_eq!(convert(&[&svc], &[&full_slice], &node), want);
        // What is gone.
        assert!(svc.metadata.managed_fields.is_none() && svc.status.is_none());
        assert_eq!(
            svc.annotations().keys().collect::<Vec<_>>(),
            vec!["balancer.dev/algorithm"]
        );
        // The slice keeps the first address, conditions, node, zone and
        // zone hints of each endpoint, and nothing else.
        assert_eq!(
            full_slice.endpoints[0],
            SliceEndpoint {
                address: Some("10.0.0.1".into()),
                ready: Some(true),
                serving: None,
                terminating: None,
                node_name: Some("n1".into()),
                zone: Some("z1".into()),
                for_zones: Some(vec!["z1".into()]),
            }
        );
        assert_eq!(full_slice.service.as_deref(), Some("web"));
    }

    #[test]
    fn a_vip_port_claimed_twice_stays_with_the_first_service_by_name() {
        let named = |name: &str, ports: serde_json::Value| {
            base_svc(serde_json::json!({"metadata": {"name": name},
                "spec": {"ports": ports}}))
        };
        let a = named("a", serde_json::json!([{"name": "http", "port": 80}]));
        let b = named(
            "b",
            serde_json::json!([{"name": "http", "port": 80}, {"name": "alt", "port": 81}]),
        );
        let c = named("c", serde_json::json!([{"name": "http", "port": 80}]));
        // Listed out of order: the name decides, not the order seen.
        let (st, w) = convert(&[&c, &b, &a], &[], &NodeInfo::default());
        let names: Vec<_> = st.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["default/a", "default/b"], "c has no port left");
        let b_ports: Vec<_> = st.services[1].ports.iter().map(|p| p.port).collect();
        assert_eq!(b_ports, vec![81]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("service default/b: port 80 duplicates"),
            "{w:?}"
        );
        assert!(
            w[1].contains("service default/c: port 80 duplicates"),
            "{w:?}"
        );
    }

    #[test]
    fn an_address_in_two_slices_keeps_the_ready_one() {
        let s = base_svc(serde_json::json!({}));
        let old = web_slice(
            "web-a",
            8080,
            serde_json::json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false}}]),
        );
        let new = web_slice(
            "web-b",
            9090,
            serde_json::json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}]),
        );
        for slices in [[&old, &new], [&new, &old]] {
            let (st, _) = convert(&[&s], &slices, &NodeInfo::default());
            let b: Vec<String> = st.frontends()[0]
                .backends
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(b, vec!["10.0.0.1:9090"], "the ready one's port");
        }
    }

    #[test]
    fn fqdn_and_oversized_slices_are_skipped() {
        let s = base_svc(serde_json::json!({}));
        let mut fqdn = web_slice(
            "web-f",
            8080,
            serde_json::json!([{"addresses": ["web.example"]}]),
        );
        fqdn.address_type = "FQDN".into();
        let many: Vec<_> = (0..=MAX_SLICE_ENDPOINTS)
            .map(|i| serde_json::json!({"addresses": [format!("10.1.{}.{}", i / 250, i % 250)]}))
            .collect();
        let big = web_slice("web-big", 8080, serde_json::Value::Array(many));
        let ok = web_slice(
            "web-a",
            8080,
            serde_json::json!([{"addresses": ["10.0.0.1"]}]),
        );
        let (st, w) = convert(&[&s], &[&fqdn, &big, &ok], &NodeInfo::default());
        assert_eq!(st.services[0].endpoints.len(), 1);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("endpointslice default/web-big: 1001 endpoints"));
    }

    /// kube-proxy applies hints to Cluster-policy endpoints only
    /// (CategorizeEndpoints): a Local Service keeps every endpoint on this
    /// node, whatever zone its hints name.
    #[test]
    fn hints_do_not_narrow_a_local_services_endpoints() {
        let node = NodeInfo {
            name: Some("n1".into()),
            zone: Some("a".into()),
        };
        let local = base_svc(serde_json::json!({"spec": {"internalTrafficPolicy": "Local"}}));
        let sl = web_slice(
            "web-a",
            8080,
            serde_json::json!([
                {"addresses": ["10.0.0.1"], "nodeName": "n1", "hints": {"forZones": [{"name": "a"}]}},
                {"addresses": ["10.0.0.2"], "nodeName": "n1", "hints": {"forZones": [{"name": "b"}]}},
                {"addresses": ["10.0.0.3"], "nodeName": "n2", "hints": {"forZones": [{"name": "a"}]}}
            ]),
        );
        let (st, _) = convert(&[&local], &[&sl], &node);
        let eps: Vec<String> = st.services[0]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(eps, vec!["10.0.0.1", "10.0.0.2"]);
    }
}
