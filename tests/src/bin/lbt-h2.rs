//! HTTP/2 test peer built on the `h2` crate (not on the router's code).
//!
//! ```text
//! lbt-h2 serve  --netns NS --name POD --port P [--report-peer]
//! lbt-h2 client --netns NS --cgroup DIR --connect ADDR --path P --requests N
//!               [--concurrency C] [--upload BYTES] [--cancel-after-ms MS]
//!               [--upload-chunks N --upload-interval-ms MS] [--paths P1,P2]
//!               [--timeout-ms MS]
//! lbt-h2 raw    --netns NS --cgroup DIR --connect ADDR --send HEX [--wait-s S]
//! lbt-h2 hostile --netns NS --cgroup DIR --connect ADDR [--case NAME]...
//!               [--path P] [--parallel N] [--passes N] [--wait-ms MS]
//! lbt-h2 hold   --netns NS --cgroup DIR --connect ADDR --connections N
//!               --streams S --path P [--rcvbuf BYTES]
//! lbt-h2 silent --netns NS --port P
//! ```
//!
//! `--netns` names a file in `/run/netns`, or is a path to a namespace file
//! when it holds a `/` (`/proc/PID/ns/net`, a bind mount elsewhere).
//!
//! Server paths (gRPC-like: 200, body, then `grpc-status` trailers):
//! `/unary` answers the pod name; `/echo` streams back what it receives;
//! `/download?bytes=N` sends N bytes; `/status?code=N` fails with that
//! grpc-status; `/slow?ms=N` answers after N ms; `/drip?chunks=N&ms=M`
//! sends N chunks of 1 KiB, one every M ms; `/goaway` answers, then
//! gracefully closes its connection. It prints `reset <path>` when a client
//! cancels a stream and `req <path>` per request.
//!
//! `hostile` sends each case of `balancer_tests::h2wire::cases` on its own
//! connection and reports what came back (GOAWAY code, RST_STREAM codes,
//! whether a PING after the case was still answered). `hold` opens
//! connections that advertise huge windows, ask for large responses and
//! never read (with a small receive buffer). `silent` accepts TCP
//! connections and never sends a byte.
//!
//! `serve --report-peer`: the server also prints `accept <ip>` per accepted
//! connection (the peer address it sees, IPv4 unmapped) and answers every
//! request with an `x-peer: <ip>` header, the peer of the connection that
//! carried it; the client counts those in `seen_as`.
//!
//! The client uses ONE connection for all its requests and prints a JSON
//! summary: per-pod counts (from the `x-pod` header), errors by kind, bytes,
//! the trailers it saw, and the connection's peer address. With
//! `--timeout-ms`, a request not answered within that time fails as
//! `timeout`, and a connection that cannot be made (or is not HTTP/2)
//! within it fails every request (`connect: ...`) instead of the process.

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
        let path = if ns.contains('/') {
            ns
        } else {
            format!("/run/netns/{ns}")
        };
        let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {path}"))?;
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
            Some("hostile") => tokio::task::spawn_blocking(move || hostile::run(&args)).await?,
            Some("hold") => tokio::task::spawn_blocking(move || hold(&args)).await?,
            Some("silent") => silent(&args).await,
            _ => bail!("usage: lbt-h2 serve|client|raw|hostile|hold|silent ..."),
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
    let report_peer = args.iter().any(|a| a == "--report-peer");
    let l = TcpListener::bind(format!("[::]:{port}")).await?;
    say("listening");
    loop {
        let (sock, from) = l.accept().await?;
        // The listener is dual-stack: IPv4 peers come as ::ffff:a.b.c.d.
        let peer = report_peer.then(|| from.ip().to_canonical().to_string());
        if let Some(p) = &peer {
            say(&format!("accept {p}"));
        }
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
                        let peer = peer.clone();
                        tokio::spawn(async move {
                            let path = req.uri().path().to_owned();
                            say(&format!("req {path}"));
                            if let Err(e) = handle(&name, peer.as_deref(), req, respond, &goaway, &notify).await
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
    peer: Option<&str>,
    req: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    goaway: &AtomicBool,
    notify: &tokio::sync::Notify,
) -> anyhow::Result<()> {
    let uri = req.uri().clone();
    let mut body = req.into_body();
    let mut head = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("x-pod", name);
    if let Some(p) = peer {
        head = head.header("x-peer", p);
    }
    let head = head.body(())?;
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
        "/drip" => {
            drain(&mut body).await?;
            let chunks = query(&uri, "chunks").unwrap_or(10);
            let ms = query(&uri, "ms").unwrap_or(500);
            let mut out = respond.send_response(head, false)?;
            let block = Bytes::from(pattern(DRIP_CHUNK));
            for _ in 0..chunks {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                send_all(&mut out, block.clone(), false).await?;
            }
            out.send_trailers(trailers(0, ""))?;
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

/// Bytes of one `/drip` chunk and of one `--upload-chunks` chunk.
const DRIP_CHUNK: usize = 1024;

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
    /// `x-peer` of each answer: the address the pod saw.
    seen_as: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    statuses: BTreeMap<String, u64>,
    bytes_received: u64,
    bytes_echoed_ok: bool,
    messages: Vec<String>,
    error_latency_ms: Vec<u64>,
    /// When streams that ended with a grpc-status other than 0 ended.
    status_latency_ms: Vec<u64>,
}

async fn client(args: &[String]) -> anyhow::Result<()> {
    let addr: SocketAddr = arg(args, "--connect").context("--connect")?.parse()?;
    let path = arg(args, "--path").unwrap_or_else(|| "/unary".into());
    // `--paths A,B,..`: request i asks for path i mod n (all on the one
    // connection).
    let paths: Vec<String> = arg(args, "--paths").map_or_else(
        || vec![path.clone()],
        |p| p.split(',').map(str::to_owned).collect(),
    );
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
    let drip = match arg(args, "--upload-chunks") {
        Some(n) => Some(Drip {
            chunks: n.parse()?,
            interval: Duration::from_millis(
                arg(args, "--upload-interval-ms")
                    .unwrap_or_else(|| "500".into())
                    .parse()?,
            ),
        }),
        None => None,
    };
    let upload = drip.map_or(upload, |d| d.chunks * DRIP_CHUNK);
    let timeout: Option<Duration> = arg(args, "--timeout-ms")
        .map(|s| s.parse().map(Duration::from_millis))
        .transpose()?;
    let connect_start = Instant::now();
    let connected = async {
        let sock = TcpStream::connect(addr).await?;
        let _ = sock.set_nodelay(true);
        let peer = sock.peer_addr()?.to_string();
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake::<_, Bytes>(sock)
            .await?;
        Ok::<_, anyhow::Error>((peer, send, conn))
    };
    let (peer, send, conn) = match timeout {
        None => connected.await?,
        Some(t) => match tokio::time::timeout(t, connected).await {
            Ok(Ok(c)) => c,
            // Every request failed the same way, reported as for a stream.
            failed => {
                let why = match failed {
                    Ok(Err(e)) => format!("connect: {e}"),
                    _ => "connect: timeout".to_owned(),
                };
                say(&serde_json::json!({
                    "pods": {}, "seen_as": {}, "errors": { why: requests },
                    "statuses": {}, "bytes_received": 0, "echo_ok": false,
                    "messages": [], "error_latency_ms": [], "status_latency_ms": [], "peer": null,
                    "elapsed_s": connect_start.elapsed().as_secs_f64(),
                })
                .to_string());
                return Ok(());
            }
        },
    };
    let conn = tokio::spawn(async move {
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
        let (send, summary, next, paths) =
            (send.clone(), summary.clone(), next.clone(), paths.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= requests {
                    break;
                }
                let path = &paths[i % paths.len()];
                let t0 = Instant::now();
                let r = one(send.clone(), path, upload, cancel_after, drip);
                let r = match timeout {
                    None => r.await,
                    Some(t) => tokio::time::timeout(t, r)
                        .await
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("timeout"))),
                };
                let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Ok(o) => {
                        *s.pods.entry(o.pod).or_default() += 1;
                        if let Some(p) = o.seen_as {
                            *s.seen_as.entry(p).or_default() += 1;
                        }
                        if o.status != "0" {
                            s.status_latency_ms.push(t0.elapsed().as_millis() as u64);
                        }
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
    // Let the connection put what it still holds on the wire (the
    // RST_STREAMs of --cancel-after-ms) and close: with no handle and no
    // stream left it ends by itself. Exiting at once could close the
    // socket before those frames left, and the router would see only the
    // end of the connection (which it takes as a half-close).
    drop(send);
    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
    let s = summary.lock().unwrap_or_else(|p| p.into_inner());
    let out = serde_json::json!({
        "pods": s.pods, "seen_as": s.seen_as, "errors": s.errors, "statuses": s.statuses,
        "bytes_received": s.bytes_received, "echo_ok": s.bytes_echoed_ok,
        "messages": s.messages.iter().take(5).collect::<Vec<_>>(),
        "error_latency_ms": s.error_latency_ms,
        "status_latency_ms": s.status_latency_ms,
        "peer": peer, "elapsed_s": elapsed,
    });
    say(&out.to_string());
    Ok(())
}

/// A request body sent in chunks of [`DRIP_CHUNK`], one every `interval`.
#[derive(Clone, Copy)]
struct Drip {
    chunks: usize,
    interval: Duration,
}

struct Outcome {
    pod: String,
    seen_as: Option<String>,
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
    drip: Option<Drip>,
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
            match drip {
                Some(d) => {
                    for i in 0..d.chunks {
                        tokio::time::sleep(d.interval).await;
                        let off = i * DRIP_CHUNK;
                        let chunk = data.slice(off..off + DRIP_CHUNK);
                        send_all(&mut up, chunk, i + 1 == d.chunks).await?;
                    }
                    if d.chunks == 0 {
                        send_all(&mut up, Bytes::new(), true).await?;
                    }
                }
                None => send_all(&mut up, data, true).await?,
            }
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
        let seen_as = resp
            .headers()
            .get("x-peer")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // A Trailers-Only response carries its grpc-status in its headers.
        let head_status = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (only_status, only_message) = (head_status("grpc-status"), head_status("grpc-message"));
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
            .map(str::to_owned)
            .or(only_status)
            .unwrap_or_else(|| "none".into());
        let message = t
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or(only_message);
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
            seen_as,
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
    // (bytes received so far, when): to time each frame.
    let mut reads: Vec<(usize, f64)> = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(wait.saturating_sub(start.elapsed()), sock.read(&mut buf)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                reads.push((got.len(), start.elapsed().as_secs_f64()));
            }
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
        // When the read that completed this frame returned.
        let at = reads
            .iter()
            .find(|(n, _)| *n >= end)
            .map_or(0.0, |(_, t)| *t);
        frames.push(serde_json::json!({
            "type": ty, "flags": got[i + 4], "stream": stream, "payload": payload, "at_s": at,
        }));
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

/// `lbt-h2 silent`: accept TCP connections and never send a byte (a
/// backend that never sends its SETTINGS). What arrives is read and
/// dropped.
async fn silent(args: &[String]) -> anyhow::Result<()> {
    let port = arg(args, "--port").context("--port")?;
    let l = TcpListener::bind(format!("[::]:{port}")).await?;
    say("listening");
    let mut n = 0u64;
    loop {
        let (mut sock, _) = l.accept().await?;
        n += 1;
        say(&format!("conn {n}"));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while matches!(sock.read(&mut buf).await, Ok(k) if k > 0) {}
        });
    }
}

/// `lbt-h2 hold`: `--connections` connections, each with a receive buffer
/// of `--rcvbuf` bytes, advertising the largest windows HTTP/2 allows,
/// each opening `--streams` GET streams for `--path`, and then never
/// reading again. Prints one JSON line once all are open, then holds them
/// until a line arrives on stdin, closes them and prints `closed`.
fn hold(args: &[String]) -> anyhow::Result<()> {
    use balancer_tests::h2wire as w;
    use std::io::{BufRead as _, Read as _, Write as _};
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let addr: std::net::SocketAddrV4 = arg(args, "--connect").context("--connect")?.parse()?;
    let count: usize = arg(args, "--connections")
        .context("--connections")?
        .parse()?;
    let streams: usize = arg(args, "--streams")
        .unwrap_or_else(|| "1".into())
        .parse()?;
    let path = arg(args, "--path").context("--path")?;
    let rcvbuf: usize = arg(args, "--rcvbuf")
        .unwrap_or_else(|| "4096".into())
        .parse()?;
    let mut socks = Vec::with_capacity(count);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let start = Instant::now();
    for _ in 0..count {
        let r = (|| -> anyhow::Result<std::net::TcpStream> {
            use nix::sys::socket::{
                AddressFamily, SockFlag, SockType, SockaddrIn, connect, setsockopt, socket, sockopt,
            };
            use std::os::fd::AsRawFd as _;
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )?;
            // Before connect, so the window it advertises is small from the SYN.
            setsockopt(&fd, sockopt::RcvBuf, &rcvbuf)?;
            connect(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
            let mut sock = std::net::TcpStream::from(fd);
            sock.set_nodelay(true)?;
            let mut out = w::PREFACE.to_vec();
            w::settings(
                &mut out,
                &[
                    (w::setting::INITIAL_WINDOW_SIZE, w::MAX_WINDOW),
                    (w::setting::MAX_FRAME_SIZE, 1 << 20),
                ],
            );
            w::window_update(&mut out, 0, w::MAX_WINDOW - w::DEFAULT_WINDOW);
            sock.write_all(&out)?;
            // The router's SETTINGS, to ACK them: then nothing more is read.
            sock.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            'settings: loop {
                let n = sock.read(&mut buf)?;
                anyhow::ensure!(n > 0, "closed before SETTINGS");
                got.extend_from_slice(&buf[..n]);
                for f in w::take_frames(&mut got) {
                    if f.settings().is_some() {
                        break 'settings;
                    }
                }
            }
            let mut out = Vec::new();
            w::settings_ack(&mut out);
            let block = w::request("GET", &path, "svc", &[]);
            for i in 0..streams {
                w::headers(
                    &mut out,
                    (2 * i + 1) as u32,
                    w::flag::END_STREAM | w::flag::END_HEADERS,
                    &block,
                );
            }
            sock.write_all(&out)?;
            Ok(sock)
        })();
        match r {
            Ok(s) => socks.push(s),
            Err(e) => *errors.entry(e.to_string()).or_default() += 1,
        }
    }
    say(&serde_json::json!({
        "connections": socks.len(), "streams": socks.len() * streams,
        "errors": errors, "elapsed_s": start.elapsed().as_secs_f64(),
    })
    .to_string());
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    drop(socks);
    say("closed");
    Ok(())
}

mod hostile {
    //! `lbt-h2 hostile`: every case on a fresh connection, with blocking
    //! sockets (a reader thread per case records what the router sends
    //! while the case's bytes go out).

    use std::{
        collections::BTreeMap,
        io::{Read as _, Write as _},
        net::{Shutdown, SocketAddr, TcpStream},
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::{Duration, Instant},
    };

    use anyhow::{Context as _, bail};
    use balancer_tests::h2wire::{self as w, Case, Ctx, Group};

    use super::{arg, say};

    /// The PING sent after every case: answered only if the connection
    /// still works.
    const PROBE: [u8; 8] = *b"lbtprobe";

    #[derive(Default)]
    struct Seen {
        settings: Option<BTreeMap<u16, u32>>,
        /// (last stream id, error code)
        goaway: Option<(u32, u32)>,
        goaway_at: Option<Instant>,
        rsts: Vec<(u32, u32)>,
        rst_count: usize,
        /// HEADERS frames the router sent (responses).
        responses: usize,
        probe_at: Option<Instant>,
        frames: usize,
        closed: bool,
        conn_reset: bool,
    }

    pub fn run(args: &[String]) -> anyhow::Result<()> {
        let addr: SocketAddr = arg(args, "--connect").context("--connect")?.parse()?;
        let path = arg(args, "--path").unwrap_or_else(|| "/index".into());
        let parallel: usize = arg(args, "--parallel")
            .unwrap_or_else(|| "8".into())
            .parse()?;
        let wait = Duration::from_millis(
            arg(args, "--wait-ms")
                .unwrap_or_else(|| "2500".into())
                .parse()?,
        );
        let names: Vec<String> = args
            .windows(2)
            .filter(|p| p[0] == "--case")
            .map(|p| p[1].clone())
            .collect();
        let all = w::cases();
        let chosen: Vec<&Case> = if names.is_empty() {
            all.iter().collect()
        } else {
            names
                .iter()
                .map(|n| {
                    all.iter()
                        .find(|c| c.name == n)
                        .with_context(|| format!("no case named {n}"))
                })
                .collect::<anyhow::Result<_>>()?
        };
        let passes: usize = arg(args, "--passes")
            .unwrap_or_else(|| "1".into())
            .parse()?;
        // The whole list, `passes` times over: a hostile client with many
        // connections, so that what reaches shared backend connections adds up.
        let runs: Vec<(usize, &Case)> = (0..passes)
            .flat_map(|p| chosen.iter().map(move |c| (p, *c)))
            .collect();
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<serde_json::Value>>> = Mutex::new(vec![None; runs.len()]);
        std::thread::scope(|s| {
            for _ in 0..parallel.max(1) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some((pass, case)) = runs.get(i) else {
                            break;
                        };
                        let mut v = match run_case(addr, &path, case, wait) {
                            Ok(v) => v,
                            Err(e) => serde_json::json!({
                                "name": case.name, "error": format!("{e:#}"),
                            }),
                        };
                        v["pass"] = (*pass).into();
                        results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(v);
                    }
                });
            }
        });
        let results: Vec<serde_json::Value> = results
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .flatten()
            .collect();
        say(&serde_json::json!({ "results": results }).to_string());
        Ok(())
    }

    fn group_name(g: Group) -> &'static str {
        match g {
            Group::Hpack => "hpack",
            Group::Frame => "frame",
            Group::Request => "request",
            Group::Attack => "attack",
            Group::Control => "control",
        }
    }

    fn reader(mut sock: TcpStream, seen: Arc<Mutex<Seen>>) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending = Vec::new();
        loop {
            let n = match sock.read(&mut buf) {
                Ok(0) => 0,
                Ok(n) => n,
                Err(e) => {
                    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                    s.conn_reset = e.kind() == std::io::ErrorKind::ConnectionReset;
                    0
                }
            };
            if n == 0 {
                seen.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
                return;
            }
            pending.extend_from_slice(&buf[..n]);
            let frames = w::take_frames(&mut pending);
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            for f in frames {
                s.frames += 1;
                match f.kind {
                    w::kind::SETTINGS if s.settings.is_none() => s.settings = f.settings(),
                    w::kind::GOAWAY if s.goaway.is_none() => {
                        let last = f
                            .payload
                            .get(..4)
                            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                            & 0x7fff_ffff;
                        s.goaway = Some((last, f.error_code().unwrap_or(u32::MAX)));
                        s.goaway_at = Some(Instant::now());
                    }
                    w::kind::RST_STREAM => {
                        s.rst_count += 1;
                        if s.rsts.len() < 16 {
                            let c = f.error_code().unwrap_or(u32::MAX);
                            s.rsts.push((f.stream, c));
                        }
                    }
                    w::kind::HEADERS => s.responses += 1,
                    w::kind::PING if f.flags & w::flag::ACK != 0 && f.payload == PROBE => {
                        s.probe_at.get_or_insert_with(Instant::now);
                    }
                    _ => {}
                }
            }
        }
    }

    fn run_case(
        addr: SocketAddr,
        path: &str,
        case: &Case,
        wait: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let start = Instant::now();
        let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        sock.set_nodelay(true)?;
        sock.set_write_timeout(Some(Duration::from_secs(5)))?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let r = {
            let (sock, seen) = (sock.try_clone()?, seen.clone());
            std::thread::spawn(move || reader(sock, seen))
        };
        let mut hello = w::PREFACE.to_vec();
        w::settings(&mut hello, &[]);
        sock.write_all(&hello)?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let settings = loop {
            {
                let s = seen.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(st) = &s.settings {
                    break st.clone();
                }
                if s.closed {
                    bail!("closed before the router's SETTINGS");
                }
            }
            if Instant::now() > deadline {
                bail!("no SETTINGS from the router within 3 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if case.ack {
            let mut ack = Vec::new();
            w::settings_ack(&mut ack);
            sock.write_all(&ack)?;
        }
        let ctx = Ctx::new(path, "svc", &settings);
        let mut chunks = (case.build)(&ctx);
        let mut probe = Vec::new();
        w::ping(&mut probe, false, PROBE);
        chunks.push(probe);
        let sent_at = Instant::now();
        let mut sent = 0usize;
        let mut write_error = None;
        for c in &chunks {
            {
                let s = seen.lock().unwrap_or_else(|p| p.into_inner());
                if s.goaway.is_some() || s.closed {
                    break;
                }
            }
            if let Err(e) = sock.write_all(c) {
                write_error = Some(e.to_string());
                break;
            }
            sent += c.len();
        }
        let wrote_ms = sent_at.elapsed().as_millis() as u64;
        // Wait for the answer: a GOAWAY (and the close after it), or for
        // the non-attacks the probe's answer and any RST_STREAM or
        // response that comes with or soon after it.
        let deadline = Instant::now() + wait;
        loop {
            std::thread::sleep(Duration::from_millis(10));
            let s = seen.lock().unwrap_or_else(|p| p.into_inner());
            if s.closed {
                break;
            }
            if let Some(t) = s.goaway_at {
                if t.elapsed() > Duration::from_millis(500) {
                    break;
                }
                continue;
            }
            if case.group != Group::Attack
                && let Some(t) = s.probe_at
            {
                let answered = s.rst_count > 0 || s.responses > 0;
                if (answered && t.elapsed() > Duration::from_millis(100))
                    || t.elapsed() > Duration::from_millis(1000)
                {
                    break;
                }
            }
            if Instant::now() > deadline {
                break;
            }
        }
        let _ = sock.shutdown(Shutdown::Both);
        let _ = r.join();
        let s = seen.lock().unwrap_or_else(|p| p.into_inner());
        let settings: BTreeMap<String, u32> =
            settings.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        Ok(serde_json::json!({
            "name": case.name,
            "group": group_name(case.group),
            "ack": case.ack,
            "goaway": s.goaway.map(|g| g.1),
            "goaway_name": s.goaway.map(|g| w::code::name(g.1)),
            "goaway_last_stream": s.goaway.map(|g| g.0),
            "goaway_after_ms": s.goaway_at.map(|t| t.saturating_duration_since(sent_at).as_millis() as u64),
            "rsts": s.rsts,
            "rst_count": s.rst_count,
            "responses": s.responses,
            "probe_answered": s.probe_at.is_some(),
            "closed": s.closed,
            "conn_reset": s.conn_reset,
            "frames": s.frames,
            "bytes_to_send": chunks.iter().map(Vec::len).sum::<usize>(),
            "bytes_sent": sent,
            "write_ms": wrote_ms,
            "write_error": write_error,
            "router_settings": settings,
            "ms": start.elapsed().as_millis() as u64,
        }))
    }
}
