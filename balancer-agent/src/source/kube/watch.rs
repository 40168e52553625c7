//! The watchers: Services, EndpointSlices and this node, each into a
//! store that buffers relists, the run loop that converts (`convert.rs`)
//! and publishes at most every 100 ms after a change, and the apiserver's
//! health as `status` shows it.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;

use super::convert::{NodeInfo, SERVICE_NAME_LABEL, Slice, convert, keep_service};
use crate::api::{Apiserver, ApiserverState};

const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Objects of one kind, with relists buffered until complete, each kept
/// as what the conversion needs of it (`V`).
struct Store<V> {
    objects: HashMap<(String, String), V>,
    relist: Option<HashMap<(String, String), V>>,
    synced: bool,
}

impl<V> Store<V> {
    fn new() -> Self {
        Self {
            objects: HashMap::new(),
            relist: None,
            synced: false,
        }
    }

    fn key<K: kube::Resource>(o: &K) -> (String, String) {
        (o.namespace().unwrap_or_default(), o.name_any())
    }

    /// Apply one watcher event, keeping `keep(object)`; true if the served
    /// set changed.
    fn apply<K: kube::Resource>(&mut self, e: watcher::Event<K>, keep: impl Fn(K) -> V) -> bool {
        match e {
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(o) => {
                if let Some(r) = self.relist.as_mut() {
                    r.insert(Self::key(&o), keep(o));
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some(r) = self.relist.take() {
                    self.objects = r;
                }
                self.synced = true;
                true
            }
            watcher::Event::Apply(o) => {
                self.objects.insert(Self::key(&o), keep(o));
                true
            }
            watcher::Event::Delete(o) => {
                self.objects.remove(&Self::key(&o));
                true
            }
        }
    }
}

/// Watch the cluster and send a new desired state after every change,
/// coalesced, once both kinds completed their first list.
pub async fn run(
    client: Client,
    node_name: Option<String>,
    tx: mpsc::Sender<crate::source::Update>,
    health: Arc<Mutex<ApiserverState>>,
) {
    let set = |f: &dyn Fn(&mut ApiserverState)| {
        let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut h);
    };
    set(&|h| h.state = Apiserver::Connecting);
    let mut node = NodeInfo {
        name: node_name.clone(),
        zone: None,
    };
    // This node alone, watched: a relabelled zone (a node moved between
    // zones, or labelled after it joined) changes which endpoints topology
    // hints pick, without a restart. The first sync waits for it, so the
    // first state already has the zone; without --node-name hints are off.
    let nodes = match &node_name {
        Some(n) => watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={n}")),
        )
        .default_backoff()
        .left_stream(),
        None => futures::stream::pending().right_stream(),
    };
    let mut zone = NodeZone {
        synced: node_name.is_none(),
        ..NodeZone::default()
    };
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let slices = watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
    )
    .default_backoff();
    tokio::pin!(services, slices, nodes);
    let mut svc_store: Store<Service> = Store::new();
    let mut eps_store: Store<Slice> = Store::new();
    let mut dirty = false;
    let mut warned: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            Some(e) = services.next() => match e {
                Ok(e) => dirty |= svc_store.apply(e, keep_service),
                Err(e) => note_error(&health, &e),
            },
            Some(e) = slices.next() => match e {
                Ok(e) => dirty |= eps_store.apply(e, Slice::from),
                Err(e) => note_error(&health, &e),
            },
            Some(e) = nodes.next() => match e {
                Ok(e) => {
                    if let Some(z) = zone.apply(e) {
                        tracing::info!(node = ?node.name, from = ?node.zone, to = ?z, "node zone");
                        node.zone = z;
                        set(&|h| h.node_zone = node.zone.clone());
                        dirty = true;
                    }
                }
                Err(e) => note_error(&health, &e),
            },
            _ = tick.tick() => {
                if !dirty || !svc_store.synced || !eps_store.synced || !zone.synced {
                    continue;
                }
                dirty = false;
                let svcs: Vec<&Service> = svc_store.objects.values().collect();
                let eps: Vec<&Slice> = eps_store.objects.values().collect();
                let (state, warnings) = convert(&svcs, &eps, &node);
                for w in warnings {
                    // Each distinct problem once, not on every update.
                    if warned.insert(w.clone()) {
                        tracing::warn!("{w}");
                    }
                }
                let (ns, ne) = (svcs.len(), eps.len());
                set(&|h| {
                    h.state = Apiserver::Synced;
                    h.services = ns;
                    h.endpoint_slices = ne;
                });
                if tx.send(Ok(state)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// This node's zone, from a watch of the node alone. The node deleted,
/// its label removed, or a relist without it: no zone (topology hints
/// off), as kube-proxy does.
#[derive(Debug, Default)]
struct NodeZone {
    zone: Option<String>,
    /// During a (re)list: the zone it has shown so far.
    relist: Option<Option<String>>,
    /// The first list completed.
    synced: bool,
}

impl NodeZone {
    /// Apply a watch event; returns the new zone if it changed.
    fn apply(&mut self, e: watcher::Event<Node>) -> Option<Option<String>> {
        let of = |n: &Node| n.labels().get(ZONE_LABEL).cloned();
        let next = match e {
            watcher::Event::Init => {
                self.relist = Some(None);
                return None;
            }
            watcher::Event::InitApply(n) => {
                self.relist = Some(of(&n));
                return None;
            }
            watcher::Event::InitDone => {
                self.synced = true;
                self.relist.take().unwrap_or(None)
            }
            watcher::Event::Apply(n) => of(&n),
            watcher::Event::Delete(_) => None,
        };
        (next != self.zone).then(|| {
            self.zone = next.clone();
            next
        })
    }
}

fn note_error(health: &Arc<Mutex<ApiserverState>>, e: &watcher::Error) {
    tracing::warn!(error = %e, "apiserver watch failed; retrying with backoff, serving the last state");
    let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
    h.state = Apiserver::Unreachable;
    h.last_error = Some(e.to_string());
    h.errors += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kube::convert::tests::base_svc;

    #[test]
    fn the_node_zone_follows_its_watch() {
        let node = |zone: Option<&str>| -> Node {
            let mut labels = serde_json::Map::new();
            if let Some(z) = zone {
                labels.insert(ZONE_LABEL.into(), z.into());
            }
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "n1", "labels": labels}
            }))
            .expect("node")
        };
        let mut z = NodeZone::default();
        assert_eq!(z.apply(watcher::Event::Init), None);
        assert_eq!(z.apply(watcher::Event::InitApply(node(Some("a")))), None);
        assert!(!z.synced);
        assert_eq!(z.apply(watcher::Event::InitDone), Some(Some("a".into())));
        assert!(z.synced);
        assert_eq!(
            z.apply(watcher::Event::Apply(node(Some("a")))),
            None,
            "unchanged"
        );
        assert_eq!(
            z.apply(watcher::Event::Apply(node(Some("b")))),
            Some(Some("b".into()))
        );
        assert_eq!(
            z.apply(watcher::Event::Apply(node(None))),
            Some(None),
            "label removed"
        );
        assert_eq!(
            z.apply(watcher::Event::Apply(node(Some("c")))),
            Some(Some("c".into()))
        );
        // A relist that no longer shows the node: no zone.
        assert_eq!(z.apply(watcher::Event::Init), None);
        assert_eq!(z.apply(watcher::Event::InitDone), Some(None));
        assert_eq!(
            z.apply(watcher::Event::Apply(node(Some("c")))),
            Some(Some("c".into()))
        );
        assert_eq!(z.apply(watcher::Event::Delete(node(Some("c")))), Some(None));
    }

    #[test]
    fn a_relist_is_swapped_in_whole() {
        let mut st: Store<Service> = Store::new();
        assert!(!st.apply(watcher::Event::Init, keep_service));
        st.apply(
            watcher::Event::InitApply(base_svc(serde_json::json!({}))),
            keep_service,
        );
        assert!(st.apply(watcher::Event::InitDone, keep_service));
        assert_eq!(st.objects.len(), 1);
        // A relist starts: the served set stays until it completes.
        st.apply(watcher::Event::Init, keep_service);
        assert_eq!(st.objects.len(), 1);
        st.apply(watcher::Event::InitDone, keep_service);
        assert_eq!(st.objects.len(), 0, "the relist said there is nothing");
    }
}
