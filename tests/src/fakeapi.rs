//! A fake Kubernetes apiserver that speaks the real list/watch protocol over
//! HTTP/1.1: JSON lists with `metadata.resourceVersion`, chunked watch event
//! streams (ADDED, MODIFIED, DELETED, BOOKMARK), `410 Gone` for a watch from
//! a compacted resource version, for Services, EndpointSlices and Nodes;
//! `/version`, and SelfSubjectAccessReviews answered from a list of denied
//! (verb, resource) pairs, or 403 Forbidden for everything
//! ([`FakeApi::forbid_all`]). The agent reaches it through a kubeconfig,
//! as it would a real cluster.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
    fn from_path(path: &str) -> Option<(Kind, Option<String>)> {
        let p = path.split('?').next()?;
        if p == "/api/v1/services" {
            return Some((Kind::Service, None));
        }
        if p == "/apis/discovery.k8s.io/v1/endpointslices" {
            return Some((Kind::EndpointSlice, None));
        }
        if p == "/api/v1/nodes" {
            return Some((Kind::Node, None));
        }
        if let Some(n) = p.strip_prefix("/api/v1/nodes/") {
            return Some((Kind::Node, Some(n.to_owned())));
        }
        None
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// Requests served, by "METHOD path-without-query".
    pub requests: Vec<String>,
    /// (verb, resource) pairs a SelfSubjectAccessReview denies.
    denied: Vec<(String, String)>,
    /// Every request answered 403 Forbidden.
    forbid_all: bool,
}

/// Handle to a running fake apiserver.
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(Kind, u64, Value)>,
    /// Closing every open watch (sent on `compact` and `stop`).
    cut: broadcast::Sender<()>,
    pub addr: std::net::SocketAddr,
    pub kubeconfig: PathBuf,
    rt: Option<tokio::runtime::Runtime>,
}

impl FakeApi {
    /// Start on 127.0.0.1 (root namespace loopback), writing a kubeconfig
    /// into `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            ..Default::default()
        }));
        let (events, _) = broadcast::channel(100_000);
        let (cut, _) = broadcast::channel(16);
        {
            let (state, events, cut) = (state.clone(), events.clone(), cut.clone());
            rt.spawn(async move {
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        continue;
                    };
                    let (state, events, cut) = (state.clone(), events.clone(), cut.clone());
                    tokio::spawn(async move {
                        let _ = serve(sock, state, events, cut).await;
                    });
                }
            });
        }
        std::fs::create_dir_all(dir)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
            ),
        )?;
        Ok(Self {
            state,
            events,
            cut,
            addr,
            kubeconfig,
            rt: Some(rt),
        })
    }

    fn key(kind: Kind, obj: &Value) -> (Kind, String, String) {
        (
            kind,
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            obj["metadata"]["name"].as_str().unwrap_or("").to_owned(),
        )
    }

    /// Create or replace an object; watchers get ADDED or MODIFIED.
    pub fn apply(&self, kind: Kind, mut obj: Value) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.rv += 1;
        let rv = st.rv;
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.name());
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        let key = Self::key(kind, &obj);
        let existed = st.objects.insert(key, obj.clone()).is_some();
        let _ = self.events.send((
            kind,
            rv,
            json!({"type": if existed {"MODIFIED"} else {"ADDED"}, "object": obj}),
        ));
    }

    /// Delete an object; watchers get DELETED.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.rv += 1;
        let rv = st.rv;
        if let Some(mut obj) = st
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let _ = self
                .events
                .send((kind, rv, json!({"type": "DELETED", "object": obj})));
        }
    }

    /// Send a BOOKMARK to every watch of `kind`.
    pub fn bookmark(&self, kind: Kind) {
        let rv = self.state.lock().unwrap_or_else(|p| p.into_inner()).rv;
        let obj = json!({"apiVersion": kind.api_version(), "kind": kind.name(),
                         "metadata": {"resourceVersion": rv.to_string()}});
        let _ = self
            .events
            .send((kind, rv, json!({"type": "BOOKMARK", "object": obj})));
    }

    /// Forget history: every open watch is cut, and re-watching from an old
    /// resource version gets 410 Gone, so clients must relist.
    pub fn compact(&self) {
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.rv += 1;
            st.compacted = st.rv;
        }
        let _ = self.cut.send(());
    }

    /// SelfSubjectAccessReviews for `verb` on `resource` are denied.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .denied
            .push((verb.to_owned(), resource.to_owned()));
    }

    /// Answer every request 403 Forbidden, as an apiserver does to a
    /// service account without any role.
    pub fn forbid_all(&self, on: bool) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forbid_all = on;
    }

    pub fn requests(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests
            .clone()
    }

    /// The apiserver goes away: listener and every connection closed.
    pub fn stop(&mut self) {
        let _ = self.cut.send(());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn query(path: &str, key: &str) -> Option<String> {
    path.split_once('?')?
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

/// The name a `fieldSelector=metadata.name=NAME` asks for (the only field
/// selector served), URL-decoded.
fn selected_name(path: &str) -> Option<String> {
    let sel = query(path, "fieldSelector")?
        .replace("%3D", "=")
        .replace("%3d", "=");
    sel.strip_prefix("metadata.name=").map(str::to_owned)
}

fn named(v: &Value, name: Option<&str>) -> bool {
    name.is_none_or(|n| v["metadata"]["name"] == n)
}

async fn serve(
    mut sock: TcpStream,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(Kind, u64, Value)>,
    cut: broadcast::Sender<()>,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    loop {
        // One request head at a time (keep-alive).
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let line = head.lines().next().context("request line")?.to_owned();
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("").to_owned(),
        );
        state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests
            .push(format!("{method} {}", path.split('?').next().unwrap_or("")));
        let forbidden = state.lock().unwrap_or_else(|p| p.into_inner()).forbid_all;
        if forbidden {
            let body_len = content_length(&head);
            read_body(&mut sock, &mut buf, body_len).await?;
            respond(&mut sock, 403, &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden", "message": "forbidden: the fake apiserver refuses everything"})).await?;
            continue;
        }
        if path.split('?').next() == Some("/version") {
            respond(&mut sock, 200, &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake", "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "", "platform": "linux/amd64"})).await?;
            continue;
        }
        if method == "POST"
            && path.split('?').next()
                == Some("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews")
        {
            let body_len = content_length(&head);
            let body = read_body(&mut sock, &mut buf, body_len).await?;
            let mut review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let attrs = &review["spec"]["resourceAttributes"];
            let (verb, resource) = (
                attrs["verb"].as_str().unwrap_or("").to_owned(),
                attrs["resource"].as_str().unwrap_or("").to_owned(),
            );
            let allowed = !state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .denied
                .iter()
                .any(|(v, r)| *v == verb && *r == resource);
            review["status"] = json!({"allowed": allowed});
            respond(&mut sock, 201, &review).await?;
            continue;
        }
        let Some((kind, name)) = Kind::from_path(&path) else {
            respond(&mut sock, 404, &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"})).await?;
            continue;
        };
        if let Some(name) = name {
            let obj = state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .objects
                .get(&(kind, String::new(), name))
                .cloned();
            match obj {
                Some(o) => respond(&mut sock, 200, &o).await?,
                None => respond(&mut sock, 404, &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"})).await?,
            }
            continue;
        }
        if query(&path, "watch").as_deref() == Some("true")
            || query(&path, "watch").as_deref() == Some("1")
        {
            return watch(sock, &path, kind, state, events, cut).await;
        }
        // LIST, in pages as the apiserver serves them (`limit`, and a
        // `continue` token: here the offset of the next item).
        let limit = query(&path, "limit").and_then(|l| l.parse::<usize>().ok());
        let offset = query(&path, "continue")
            .and_then(|c| c.parse::<usize>().ok())
            .unwrap_or(0);
        let (items, rv, more) = {
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            let name = selected_name(&path);
            let all = st
                .objects
                .iter()
                .filter(|((k, _, _), v)| *k == kind && named(v, name.as_deref()));
            let take = limit.unwrap_or(usize::MAX);
            let items: Vec<Value> = all
                .clone()
                .skip(offset)
                .take(take)
                .map(|(_, v)| v.clone())
                .collect();
            let more = all.count() > offset + items.len();
            (items, st.rv, more)
        };
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if more {
            meta["continue"] = json!((offset + items.len()).to_string());
        }
        let list = json!({"apiVersion": kind.api_version(), "kind": format!("{}List", kind.name()),
                          "metadata": meta, "items": items});
        respond(&mut sock, 200, &list).await?;
    }
}

/// The Content-Length of a request head (0 without one).
fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// A request body of `len` bytes: what `buf` already holds, then the rest.
async fn read_body(sock: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> anyhow::Result<Vec<u8>> {
    while buf.len() < len {
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "request body cut short");
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf.drain(..len).collect())
}

async fn respond(sock: &mut TcpStream, code: u16, body: &Value) -> anyhow::Result<()> {
    let body = serde_json::to_vec(body)?;
    let reason = match code {
        200 => "OK",
        201 => "Created",
        403 => "Forbidden",
        _ => "Error",
    };
    sock.write_all(
        format!("HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len())
            .as_bytes(),
    )
    .await?;
    sock.write_all(&body).await?;
    Ok(())
}

async fn chunk(sock: &mut TcpStream, v: &Value) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(v)?;
    line.push(b'\n');
    sock.write_all(format!("{:x}\r\n", line.len()).as_bytes())
        .await?;
    sock.write_all(&line).await?;
    sock.write_all(b"\r\n").await?;
    Ok(())
}

async fn watch(
    mut sock: TcpStream,
    path: &str,
    kind: Kind,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(Kind, u64, Value)>,
    cut: broadcast::Sender<()>,
) -> anyhow::Result<()> {
    let from: u64 = query(path, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut rx = events.subscribe();
    let mut cut_rx = cut.subscribe();
    let compacted = state.lock().unwrap_or_else(|p| p.into_inner()).compacted;
    sock.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await?;
    if from != 0 && from < compacted {
        chunk(
            &mut sock,
            &json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": format!("too old resource version: {from} ({compacted})"),
                "reason": "Expired", "code": 410}}),
        )
        .await?;
        sock.write_all(b"0\r\n\r\n").await?;
        return Ok(());
    }
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok((k, rv, v))
                    if k == kind
                        && rv > from
                        && (v["type"] == "BOOKMARK"
                            || named(&v["object"], selected_name(path).as_deref())) =>
                {
                    chunk(&mut sock, &v).await?
                }
                Ok(_) => {}
                Err(_) => return Ok(()),
            },
            _ = cut_rx.recv() => {
                sock.write_all(b"0\r\n\r\n").await?;
                return Ok(());
            }
        }
    }
}
