//! HTTP/2 test peer built on the `h2` crate (not on the router's code).
//!
//! ```text
//! lbt-h2 serve  --netns NS --name POD --port P
//! lbt-h2 client --netns NS --cgroup DIR --connect ADDR --path P --requests N
//!               [--concurrency C] [--upload BYTES] [--cancel-after-ms MS]
//! lbt-h2 raw    --netns NS --cgroup DIR --connect ADDR --send HEX [--wait-s S]
//! ```
//!
//! Server paths (gRPC-like: 200, body, then `grpc-status` trailers):
//! `/unary` answers the pod name; `/echo` streams back what it receives;
//! `/download?bytes=N` sends N bytes; `/status?code=N` fails with that
//! grpc-status; `/slow?ms=N` answers after N ms; `/goaway` answers, then
//! gracefully closes its connection. It prints `reset <path>` when a client
//! cancels a stream and `req <path>` per request.
//!
//! The client uses ONE connection for all its requests and prints a JSON
//! summary: per-pod counts (from the `x-pod` header), errors by kind, bytes,
//! the trailers it saw, and the connection's peer address.

use std::{
    collections::BTreeMap,
    future::poll_fn,
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Request, Response};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(cg) = arg(&args, "--cgroup") {
        std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {cg}"))?;
    }
    if let Some(ns) = arg(&args, "--netns") {
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.get(1).map(String::as_str) {
            Some("serve") => serve(&args).await,
            Some("client") => client(&args).await,
            Some("raw") => raw(&args).await,
            _ => bail!("usage: lbt-h2 serve|client|raw ..."),
        }
    })
}

fn say(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

async fn send_all(s: &mut SendStream<Bytes>, mut data: Bytes, eos: bool) -> anyhow::Result<()> {
    if data.is_empty() {
        s.send_data(data, eos)?;
        return Ok(());
    }
    while !data.is_empty() {
        s.reserve_capacity(data.len());
        let cap = poll_fn(|cx| s.poll_capacity(cx))
            .await
            .context("stream closed")??;
        let chunk = data.split_to(cap.min(data.len()));
        s.send_data(chunk, eos && data.is_empty())?;
    }
    Ok(())
}

fn trailers(code: u32, msg: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", code.to_string().parse().expect("header"));
    if !msg.is_empty() {
        t.insert("grpc-message", msg.parse().expect("header"));
    }
    t
}

fn query(uri: &http::Uri, key: &str) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

async fn serve(args: &[String]) -> anyhow::Result<()> {
    let name = arg(args, "--name").context("--name")?;
    let port = arg(args, "--port").context("--port")?;
    let l = TcpListener::bind(format!("[::]:{port}")).await?;
    say("listening");
    loop {
        let (sock, _) = l.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let Ok(mut conn) = h2::server::Builder::new()
                .initial_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .handshake::<_, Bytes>(sock)
                .await
            else {
                return;
            };
            let goaway = Arc::new(AtomicBool::new(false));
            let notify = Arc::new(tokio::sync::Notify::new());
            let mut closing = false;
            loop {
                tokio::select! {
                    next = conn.accept() => {
                        let Some(Ok((req, respond))) = next else { return };
                        let (name, goaway, notify) = (name.clone(), goaway.clone(), notify.clone());
                        tokio::spawn(async move {
                            let path = req.uri().path().to_owned();
                            say(&format!("req {path}"));
                            if let Err(e) = handle(&name, req, respond, &goaway, &notify).await
                                && (e.to_string().contains("reset") || e.to_string().contains("CANCEL"))
                            {
                                say(&format!("reset {path}"));
                            }
                        });
                    }
                    _ = notify.notified(), if !closing => {
                        closing = true;
                        conn.graceful_shutdown();
                    }
                }
            }
        });
    }
}

async fn handle(
    name: &str,
    req: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    goaway: &AtomicBool,
    notify: &tokio::sync::Notify,
) -> anyhow::Result<()> {
    let uri = req.uri().clone();
    let mut body = req.into_body();
    let head = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("x-pod", name)
        .body(())?;
    match uri.path() {
        "/echo" => {
            let mut out = respond.send_response(head, false)?;
            let mut n = 0u64;
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                n += chunk.len() as u64;
                let len = chunk.len();
                send_all(&mut out, chunk, false).await?;
                let _ = body.flow_control().release_capacity(len);
            }
            let mut t = trailers(0, "");
            t.insert("x-bytes", n.to_string().parse()?);
            out.send_trailers(t)?;
        }
        "/download" => {
            drain(&mut body).await?;
            let total = query(&uri, "bytes").unwrap_or(0) as usize;
            let mut out = respond.send_response(head, false)?;
            let block = Bytes::from(pattern(64 * 1024));
            let mut left = total;
            while left > 0 {
                let n = left.min(block.len());
                send_all(&mut out, block.slice(..n), false).await?;
                left -= n;
            }
            out.send_trailers(trailers(0, ""))?;
        }
        "/status" => {
            drain(&mut body).await?;
            let code = query(&uri, "code").unwrap_or(2) as u32;
            let mut out = respond.send_response(head, false)?;
            send_all(&mut out, Bytes::from(name.to_owned()), false).await?;
            out.send_trailers(trailers(code, "failed on purpose"))?;
        }
        "/slow" => {
            drain(&mut body).await?;
            let ms = query(&uri, "ms").unwrap_or(1000);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                r = poll_fn(|cx| respond.poll_reset(cx)) => {
                    let reason = r?;
                    bail!("reset by client: {reason:?}");
                }
            }
            let mut out = respond.send_response(head, false)?;
            send_all(&mut out, Bytes::from(name.to_owned()), false).await?;
            out.send_trailers(trailers(0, ""))?;
        }
        path => {
            let n = drain(&mut body).await?;
            let mut out = respond.send_response(head, false)?;
            let reply = if path == "/upload" {
                n.to_string()
            } else {
                name.to_owned()
            };
            send_all(&mut out, Bytes::from(reply), false).await?;
            let mut t = trailers(0, "");
            t.insert("x-bytes", n.to_string().parse()?);
            out.send_trailers(t)?;
            if path == "/goaway" && !goaway.swap(true, Ordering::SeqCst) {
                notify.notify_one();
            }
        }
    }
    Ok(())
}

/// Read a request body to its end; returns its length.
async fn drain(body: &mut RecvStream) -> anyhow::Result<u64> {
    let mut n = 0u64;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        n += chunk.len() as u64;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(n)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[derive(Default)]
struct Summary {
    pods: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    statuses: BTreeMap<String, u64>,
    bytes_received: u64,
    bytes_echoed_ok: bool,
    messages: Vec<String>,
    error_latency_ms: Vec<u64>,
}

async fn client(args: &[String]) -> anyhow::Result<()> {
    let addr: SocketAddr = arg(args, "--connect").context("--connect")?.parse()?;
    let path = arg(args, "--path").unwrap_or_else(|| "/unary".into());
    let requests: usize = arg(args, "--requests")
        .unwrap_or_else(|| "1".into())
        .parse()?;
    let concurrency: usize = arg(args, "--concurrency")
        .unwrap_or_else(|| "1".into())
        .parse()?;
    let upload: usize = arg(args, "--upload")
        .unwrap_or_else(|| "0".into())
        .parse()?;
    let cancel_after: Option<u64> = arg(args, "--cancel-after-ms")
        .map(|s| s.parse())
        .transpose()?;
    let sock = TcpStream::connect(addr).await?;
    let _ = sock.set_nodelay(true);
    let peer = sock.peer_addr()?.to_string();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake::<_, Bytes>(sock)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let summary = Arc::new(Mutex::new(Summary {
        bytes_echoed_ok: true,
        ..Default::default()
    }));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (send, summary, next, path) =
            (send.clone(), summary.clone(), next.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < requests {
                let t0 = Instant::now();
                let r = one(send.clone(), &path, upload, cancel_after).await;
                let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Ok(o) => {
                        *s.pods.entry(o.pod).or_default() += 1;
                        *s.statuses.entry(o.status).or_default() += 1;
                        s.bytes_received += o.bytes;
                        if let Some(m) = o.message {
                            s.messages.push(m);
                        }
                        if !o.echo_ok {
                            s.bytes_echoed_ok = false;
                        }
                    }
                    Err(e) => {
                        *s.errors.entry(e.to_string()).or_default() += 1;
                        s.error_latency_ms.push(t0.elapsed().as_millis() as u64);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let s = summary.lock().unwrap_or_else(|p| p.into_inner());
    let out = serde_json::json!({
        "pods": s.pods, "errors": s.errors, "statuses": s.statuses,
        "bytes_received": s.bytes_received, "echo_ok": s.bytes_echoed_ok,
        "messages": s.messages.iter().take(5).collect::<Vec<_>>(),
        "error_latency_ms": s.error_latency_ms,
        "peer": peer, "elapsed_s": elapsed,
    });
    say(&out.to_string());
    Ok(())
}

struct Outcome {
    pod: String,
    status: String,
    bytes: u64,
    message: Option<String>,
    echo_ok: bool,
}

async fn one(
    send: h2::client::SendRequest<Bytes>,
    path: &str,
    upload: usize,
    cancel_after: Option<u64>,
) -> anyhow::Result<Outcome> {
    let mut send = send.ready().await?;
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://svc{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let (resp, mut up) = send.send_request(req, false)?;
    let data = Bytes::from(pattern(upload));
    let uploader = {
        let data = data.clone();
        async move {
            send_all(&mut up, data, true).await?;
            Ok::<_, anyhow::Error>(up)
        }
    };
    if let Some(ms) = cancel_after {
        let mut up = tokio::spawn(uploader).await??;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        up.send_reset(h2::Reason::CANCEL);
        drop(resp);
        bail!("cancelled");
    }
    let (up_r, resp) = tokio::join!(uploader, async {
        let resp = resp.await?;
        let pod = resp
            .headers()
            .get("x-pod")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        let mut body = resp.into_body();
        let mut bytes = 0u64;
        let mut echo_ok = true;
        let expect = pattern(upload.max(1));
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            if path == "/echo" {
                let off = bytes as usize;
                echo_ok &= chunk[..] == expect[off..off + chunk.len()];
            }
            bytes += chunk.len() as u64;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let t = body.trailers().await?.unwrap_or_default();
        let status = t
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        let message = t
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if path == "/echo" || path == "/upload" {
            let n: u64 = t
                .get("x-bytes")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            echo_ok &= n == upload as u64;
        }
        Ok::<_, anyhow::Error>(Outcome {
            pod,
            status,
            bytes,
            message,
            echo_ok,
        })
    });
    up_r?;
    resp
}

/// Send raw bytes after connecting, then report what came back and whether
/// (and when) the connection was closed.
async fn raw(args: &[String]) -> anyhow::Result<()> {
    let addr: SocketAddr = arg(args, "--connect").context("--connect")?.parse()?;
    let send = hex(&arg(args, "--send").unwrap_or_default())?;
    let wait = Duration::from_secs(
        arg(args, "--wait-s")
            .unwrap_or_else(|| "10".into())
            .parse()?,
    );
    let mut sock = TcpStream::connect(addr).await?;
    let start = Instant::now();
    sock.write_all(&send).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(wait.saturating_sub(start.elapsed()), sock.read(&mut buf)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    // Frames the peer sent: (type, flags, stream, payload-hex).
    let mut frames = Vec::new();
    let mut i = 0;
    while i + 9 <= got.len() {
        let len =
            (usize::from(got[i]) << 16) | (usize::from(got[i + 1]) << 8) | usize::from(got[i + 2]);
        let ty = got[i + 3];
        let stream =
            u32::from_be_bytes([got[i + 5], got[i + 6], got[i + 7], got[i + 8]]) & 0x7fff_ffff;
        let end = (i + 9 + len).min(got.len());
        let payload: String = got[i + 9..end].iter().map(|b| format!("{b:02x}")).collect();
        frames.push(serde_json::json!({"type": ty, "flags": got[i + 4], "stream": stream, "payload": payload}));
        i = end;
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    say(&serde_json::json!({
        "closed": closed, "closed_after_s": start.elapsed().as_secs_f64(),
        "frames": frames, "text": text,
    })
    .to_string());
    Ok(())
}

fn hex(s: &str) -> anyhow::Result<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("hex"))
        .collect()
}
