//! The running agent: the data path, the state it serves, and the answers to
//! admin requests.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    api::{
        DrainingView, EndpointView, EndpointsView, MapView, PortView, ProgramView, ReloadView,
        Request, RouterEndpointView, RouterPoolsView, RouterView, ServiceView, SourceView,
        StatusView,
    },
    dataplane::Dataplane,
    state::DesiredState,
};

pub struct Agent {
    pub dataplane: Dataplane,
    /// Failure accrual of `tcp` ports (failed connects).
    pub l4: crate::eject::L4Accrual,
    /// The backends of `tcp` ports, whose connects `l4` follows.
    l4_backends: Vec<std::net::SocketAddr>,
    /// `connect_failed` when `l4` last looked.
    connect_failed_seen: u64,
    pub state: DesiredState,
    pub source_kind: &'static str,
    /// The file, or the cluster's default namespace.
    pub source_location: String,
    /// The apiserver's state, for the kubernetes source.
    pub apiserver: Option<std::sync::Arc<std::sync::Mutex<crate::api::ApiserverState>>>,
    pub reload: ReloadView,
    /// Ends the client sockets of removed endpoints (`run
    /// --end-removed-connections`); None when turned off.
    pub ender: Option<crate::gone::Ender>,
    /// What became of those sockets, per service, since start.
    pub ended: BTreeMap<String, crate::gone::Ended>,
    /// The data path was adopted from an earlier agent: once the first
    /// whole state is applied, end the sockets of endpoints removed while
    /// no agent ran.
    sweep_pending: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Agent {
    pub fn new(dataplane: Dataplane, source_kind: &'static str, source_location: String) -> Self {
        Self {
            dataplane,
            l4: crate::eject::L4Accrual::default(),
            l4_backends: Vec::new(),
            connect_failed_seen: 0,
            state: DesiredState::default(),
            source_kind,
            source_location,
            apiserver: None,
            reload: ReloadView::default(),
            ender: None,
            ended: BTreeMap::new(),
            sweep_pending: false,
        }
    }

    /// Publish a new desired state; on failure the previous one stays.
    pub fn apply(&mut self, state: DesiredState) -> Result<(), String> {
        self.reload.attempts += 1;
        self.reload.at_unix_ms = now_ms();
        // Convert everything first, then publish to the kernel (and so to
        // the router process, which reads the same maps).
        match self.program(&state) {
            Ok(summary) => {
                tracing::info!(
                    services = state.services.len(),
                    frontends = summary.frontends,
                    map_writes = summary.ops,
                    "endpoints applied"
                );
                self.reload.ok = true;
                self.reload.error = None;
                self.reload.applied += 1;
                self.reload.services = state.services.len();
                self.reload.frontends = summary.frontends;
                let gone = crate::gone::removed_endpoints(&self.state, &state);
                if !gone.is_empty() {
                    self.end_connections_of(&gone);
                }
                self.state = state;
                if std::mem::take(&mut self.sweep_pending) {
                    self.end_orphans();
                }
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                self.reload.ok = false;
                self.reload.error = Some(msg.clone());
                Err(msg)
            }
        }
    }

    /// Set when the data path was adopted: see `sweep_pending`.
    pub fn sweep_after_first_state(&mut self) {
        self.sweep_pending = true;
    }

    /// End the balanced sockets of endpoints their Service no longer
    /// lists (removed while no agent ran).
    fn end_orphans(&mut self) {
        if self.ender.is_none() {
            return;
        }
        let state = &self.state;
        let sockets = self
            .dataplane
            .balanced_where(|s| crate::gone::orphaned(state, s));
        self.end_sockets(sockets, "endpoints removed while no agent ran");
    }

    /// End the balanced client sockets whose backend is one of `gone`
    /// (endpoints that just left their Services; the maps no longer
    /// choose them), and count what became of them per service.
    fn end_connections_of(&mut self, gone: &std::collections::HashSet<std::net::IpAddr>) {
        if self.ender.is_none() {
            return;
        }
        let sockets = self.dataplane.balanced_to(gone);
        self.end_sockets(sockets, "removed endpoints");
    }

    /// End `sockets` and count what became of them per service.
    fn end_sockets(&mut self, sockets: Vec<(u64, balancer_common::BalancedSock)>, whose: &str) {
        let Some(ender) = &self.ender else {
            return;
        };
        if sockets.is_empty() {
            return;
        }
        let outcomes = ender.end(&sockets);
        let state = &self.state;
        let service_of = |vip: std::net::SocketAddr| {
            state
                .services
                .iter()
                .find(|s| {
                    s.addresses.contains(&vip.ip()) && s.ports.iter().any(|p| p.port == vip.port())
                })
                .map(|s| s.name.clone())
        };
        let before: u64 = self.ended.values().map(|e| e.ended).sum();
        crate::gone::tally(&sockets, &outcomes, service_of, &mut self.ended);
        let after: u64 = self.ended.values().map(|e| e.ended).sum();
        tracing::info!(
            sockets = sockets.len(),
            ended = after - before,
            "ended the connections of {whose}"
        );
    }

    /// The frontends of `state` into the maps, without the backends that
    /// failure accrual took out of `tcp` ports.
    fn program(
        &mut self,
        state: &DesiredState,
    ) -> Result<crate::dataplane::ApplySummary, crate::dataplane::DataplaneError> {
        let mut frontends = state.frontends();
        let mut tcp: Vec<std::net::SocketAddr> = frontends
            .iter()
            .filter(|f| f.mode == balancer_common::Mode::Tcp)
            .flat_map(|f| f.backends.iter().copied())
            .collect();
        tcp.sort();
        tcp.dedup();
        self.l4.retain(&tcp.iter().copied().collect());
        self.l4_backends = tcp;
        self.l4.filter(&mut frontends);
        self.dataplane.apply(&frontends)
    }

    /// Program the current state again (after an ejection or a return).
    pub fn reprogram(&mut self) {
        let state = std::mem::take(&mut self.state);
        if let Err(e) = self.program(&state) {
            tracing::error!(error = %e, "cannot apply an ejection; keeping the last good state");
        }
        self.state = state;
    }

    /// Look at the failed connects of `tcp` backends, when the kernel
    /// counted any since the last look; true if one was ejected.
    pub fn accrual_tick(&mut self, now: std::time::Instant) -> bool {
        let seen = self
            .dataplane
            .counter(balancer_common::Counter::ConnectFailed);
        if seen == self.connect_failed_seen {
            return false;
        }
        self.connect_failed_seen = seen;
        let mut ejected = false;
        for addr in self.l4_backends.clone() {
            if let Some(id) = self.dataplane.backend_id(&addr) {
                let st = self.dataplane.stats(id);
                ejected |= self.l4.observe(addr, &st, now);
            }
        }
        ejected
    }

    /// One update from the source: applied, or refused with the last good
    /// state kept serving.
    pub fn update(&mut self, update: Result<DesiredState, impl std::fmt::Display>) {
        match update {
            Ok(state) => {
                if let Err(e) = self.apply(state) {
                    tracing::error!(error = %e, "reload refused; keeping the last good state");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; keeping the last good state");
                self.reject(e.to_string());
            }
        }
    }

    /// The 250 ms upkeep: forget drained backends, run failure accrual of
    /// tcp ports (reprogramming on an ejection), and return the ejected
    /// backends due a probe.
    pub fn tick(&mut self, now: std::time::Instant) -> Vec<std::net::SocketAddr> {
        self.dataplane.collect_drained();
        if self.accrual_tick(now) {
            self.reprogram();
        }
        self.l4.due_probes(now)
    }

    /// Record an update the source could not produce (a bad file); the
    /// serving state is unchanged.
    pub fn reject(&mut self, error: String) {
        self.reload.attempts += 1;
        self.reload.ok = false;
        self.reload.error = Some(error);
        self.reload.at_unix_ms = now_ms();
    }

    /// The endpoints view of `req` with the kernel's counts (the router's
    /// are filled in by the caller, from the router's socket).
    pub fn endpoints_for(&self, req: &Request) -> Result<EndpointsView, String> {
        match req {
            Request::Services | Request::Endpoints { name: None } => Ok(self.endpoints(None)),
            Request::Endpoints { name: Some(n) } => {
                if !self.state.services.iter().any(|s| &s.name == n) {
                    return Err(format!("no service named {n:?}"));
                }
                Ok(self.endpoints(Some(n)))
            }
            Request::Status
            | Request::RouterStatus
            | Request::RouterEndpoints
            | Request::RouterListener
            | Request::HeldListener { .. } => Err(format!(
                "{req:?} is not an endpoints request (router requests go to the router's socket)"
            )),
        }
    }

    pub fn status(&self) -> StatusView {
        StatusView {
            version: env!("CARGO_PKG_VERSION").into(),
            cgroup: self.dataplane.cgroup().display().to_string(),
            programs: self
                .dataplane
                .attached()
                .iter()
                .map(ProgramView::from)
                .collect(),
            maps: self
                .dataplane
                .map_fill()
                .into_iter()
                .map(MapView::from)
                .collect(),
            source: SourceView {
                kind: self.source_kind.into(),
                path: self.source_location.clone(),
            },
            pins: self
                .dataplane
                .pin_dir
                .as_ref()
                .map(|p| p.display().to_string()),
            adopted: self.dataplane.adopted,
            generation: self.dataplane.generation(),
            l4_ejected: self.l4.ejected(),
            l4_ejections: self.l4.ejections,
            removed_connections: self
                .ender
                .as_ref()
                .map(|e| crate::api::RemovedConnectionsView {
                    enters_namespaces: e.enters_namespaces(),
                    services: self.ended.clone(),
                }),
            router: self.dataplane.router_config().map(|c| {
                let now = crate::router::monotonic_ns();
                let age = now.saturating_sub(c.heartbeat_ns);
                RouterView {
                    address: crate::dataplane::plan::config_router_addr(&c).to_string(),
                    splice: c.splice != 0,
                    heartbeat_age_ms: age / 1_000_000,
                    alive: age <= balancer_common::ROUTER_STALE_NS,
                    process: None,
                    error: None,
                }
            }),
            apiserver: self
                .apiserver
                .as_ref()
                .map(|a| a.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            last_reload: self.reload.clone(),
            counters: self
                .dataplane
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    pub fn endpoints(&self, only: Option<&str>) -> EndpointsView {
        let mut v = self.endpoints_shape(only);
        fill_kernel(&mut v, |id| self.dataplane.stats(id));
        v.router = self.dataplane.router_config().map(|_| RouterPoolsView {
            l4_by_reason: L4_REASONS
                .iter()
                .map(|&c| (c.name().to_owned(), self.dataplane.counter(c)))
                .collect(),
            ..RouterPoolsView::default()
        });
        v
    }

    /// The endpoints view without the live counts, which [`fill_kernel`]
    /// and [`fill_router`] add: no syscall, so a scrape can take it under
    /// the agent's lock and read the counts after releasing it.
    pub fn endpoints_shape(&self, only: Option<&str>) -> EndpointsView {
        let now = std::time::Instant::now();
        let mut services = Vec::new();
        for s in &self.state.services {
            if only.is_some_and(|n| n != s.name) {
                continue;
            }
            let mut endpoints = Vec::new();
            for e in &s.endpoints {
                let usable = s
                    .usable_endpoints(e.address.is_ipv4())
                    .iter()
                    .any(|u| u.address == e.address);
                let mut target_ports: Vec<u16> = s
                    .ports
                    .iter()
                    .map(|p| {
                        e.target_ports
                            .get(p.name.as_deref().unwrap_or(""))
                            .copied()
                            .unwrap_or(p.target_port)
                    })
                    .filter(|port| *port != 0)
                    .collect();
                target_ports.sort_unstable();
                target_ports.dedup();
                for port in target_ports {
                    let addr = std::net::SocketAddr::new(e.address, port);
                    let l4 = self.l4.view(&addr, now);
                    endpoints.push(EndpointView {
                        address: e.address.to_string(),
                        port,
                        zone: e.zone.clone(),
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                        usable,
                        active_connections: 0,
                        connections_total: 0,
                        active_streams: 0,
                        streams_total: 0,
                        ewma_us: 0,
                        failures: 0,
                        ejections: 0,
                        ejected: l4.map(|_| "connect".to_owned()),
                        ejected_for_ms: l4.unwrap_or(0),
                        router_connections: 0,
                        backend_id: self.dataplane.backend_id(&addr),
                        socket: Some(addr),
                    });
                }
            }
            services.push(ServiceView {
                name: s.name.clone(),
                addresses: s.addresses.iter().map(ToString::to_string).collect(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| PortView {
                        name: p.name.clone(),
                        port: p.port,
                        target_port: p.target_port,
                        protocol: p.protocol.as_str().into(),
                        algorithm: p.algorithm.as_str().into(),
                    })
                    .collect(),
                endpoints,
            });
        }
        let draining = self
            .dataplane
            .draining_ids()
            .into_iter()
            .map(|(id, addr)| DrainingView {
                address: addr.ip().to_string(),
                port: addr.port(),
                active_connections: 0,
                connections_total: 0,
                backend_id: id,
            })
            .collect();
        EndpointsView {
            services,
            draining,
            router: None,
        }
    }
}

/// The kernel counters of connections to http2 ports balanced at L4
/// instead of routed (`endpoints`' `l4_by_reason`).
const L4_REASONS: [balancer_common::Counter; 2] = [
    balancer_common::Counter::RouterDown,
    balancer_common::Counter::RouterUnserved,
];

/// Add what the router says of its pools (`router-status`) to an
/// endpoints view that has a router.
pub fn fill_router_pools(view: &mut EndpointsView, status: &crate::api::RouterStatusView) {
    if let Some(r) = view.router.as_mut() {
        r.pools.clone_from(&status.pools);
        r.l4_by_reason
            .insert("unserved_closed".to_owned(), status.unserved_closed);
    }
}

/// Fill an [`Agent::endpoints_shape`] with the kernel's per-backend
/// counts (`stats`).
pub fn fill_kernel(view: &mut EndpointsView, stats: impl Fn(u32) -> balancer_common::BackendStats) {
    for s in &mut view.services {
        for e in &mut s.endpoints {
            let st = e.backend_id.map(&stats).unwrap_or_default();
            e.active_connections = st.active;
            e.connections_total = st.total;
            e.failures = st.connect_failures;
            // Streams sk_msg saw on L4-balanced connections; the router's
            // are added by `fill_router`.
            e.streams_total = st.streams;
        }
    }
    for d in &mut view.draining {
        let st = stats(d.backend_id);
        d.active_connections = st.active;
        d.connections_total = st.total;
    }
}

/// Add the router's per-endpoint streams and latency (http2 ports).
pub fn fill_router(view: &mut EndpointsView, router: &[RouterEndpointView]) {
    let by_addr: std::collections::HashMap<_, _> =
        router.iter().map(|r| (r.address, &r.stats)).collect();
    for s in &mut view.services {
        for e in &mut s.endpoints {
            let Some(r) = e.socket.and_then(|a| by_addr.get(&a)) else {
                continue;
            };
            e.active_streams = r.active_streams;
            e.streams_total += r.streams_total;
            e.ewma_us = r.ewma_us;
            e.failures += r.failures;
            e.ejections = r.ejections;
            e.router_connections = r.pod_connections;
            if r.ejected.is_some() {
                e.ejected.clone_from(&r.ejected);
                e.ejected_for_ms = r.ejected_for_ms;
            }
        }
    }
}

/// The agent's answers: the view under the lock, then AFFINITY's fill and
/// the router's part from its socket after releasing it.
pub fn admin_answer(
    agent: std::sync::Arc<std::sync::Mutex<Agent>>,
    affinity: std::sync::Arc<crate::dataplane::AffinityReader>,
    router_socket: std::path::PathBuf,
    held: crate::router_link::HeldSlot,
) -> crate::admin::Answer {
    std::sync::Arc::new(move |req: Request| {
        let agent = agent.clone();
        let affinity = affinity.clone();
        let router_socket = router_socket.clone();
        let held = held.clone();
        Box::pin(async move {
            match req {
                Request::HeldListener { listen } => {
                    let h = held.lock().unwrap_or_else(|p| p.into_inner());
                    match h.as_ref().filter(|h| h.listen == listen) {
                        Some(h) => {
                            let fd = h.fd.try_clone().map_err(|e| e.to_string())?;
                            tracing::info!(%listen, "passing the held listener to a new router");
                            let view = crate::api::ListenerView { inode: h.inode };
                            let v = serde_json::to_value(view).map_err(|e| e.to_string())?;
                            Ok((v, Some(fd)))
                        }
                        None => Ok((serde_json::Value::Null, None)),
                    }
                }
                Request::Status => {
                    let mut status = agent.lock().unwrap_or_else(|p| p.into_inner()).status();
                    if let Ok(fill) = tokio::task::spawn_blocking(move || affinity.fill()).await {
                        status.maps.push(fill.into());
                    }
                    if let Some(r) = status.router.as_mut() {
                        match crate::router_link::ask_router::<crate::api::RouterStatusView>(
                            &router_socket,
                            &Request::RouterStatus,
                        )
                        .await
                        {
                            Ok(p) => r.process = Some(p),
                            Err(e) => r.error = Some(e),
                        }
                    }
                    serde_json::to_value(status)
                        .map(|v| (v, None))
                        .map_err(|e| e.to_string())
                }
                req => {
                    let mut view = agent
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .endpoints_for(&req)?;
                    if let Ok(r) = crate::router_link::ask_router::<
                        Vec<crate::api::RouterEndpointView>,
                    >(&router_socket, &Request::RouterEndpoints)
                    .await
                    {
                        fill_router(&mut view, &r);
                    }
                    if view.router.is_some()
                        && let Ok(s) =
                            crate::router_link::ask_router::<crate::api::RouterStatusView>(
                                &router_socket,
                                &Request::RouterStatus,
                            )
                            .await
                    {
                        fill_router_pools(&mut view, &s);
                    }
                    serde_json::to_value(view)
                        .map(|v| (v, None))
                        .map_err(|e| e.to_string())
                }
            }
        })
    })
}
