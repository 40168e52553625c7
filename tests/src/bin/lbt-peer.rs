//! Test peer: a TCP server that tells each client which pod it reached and
//! reports its live connection count, and a client that opens connections
//! from inside a test cgroup and network namespace.
//!
//! ```text
//! lbt-peer serve  --netns NS --name POD --port P [--port P2] [--sink-port S]
//! lbt-peer client --netns NS --cgroup DIR --connect ADDR --count N --mode hold|short|rate|echo
//! ```
//!
//! `echo` holds its connections like `hold`, and each sends a line and
//! reads its echo every 100 ms, as a long-lived database or broker client
//! does; on the line on stdin it prints, per connection, its pod, the
//! echoes it got, and its first error (name and unix time in ms).
//!
//! The server prints `conn <active> <total>` on every change. The client
//! prints one JSON line with its results; in `hold` mode it then keeps the
//! connections open until a line arrives on stdin, closes them and prints
//! `closed`.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn args_all(args: &[String], name: &str) -> Vec<String> {
    args.windows(2)
        .filter(|w| w[0] == name)
        .map(|w| w[1].clone())
        .collect()
}

fn enter_netns(ns: &str) -> anyhow::Result<()> {
    let f =
        std::fs::File::open(format!("/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // Cgroup first (the path lives in this mount namespace), then netns.
    if let Some(cg) = arg(&args, "--cgroup") {
        std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {cg}"))?;
    }
    if let Some(ns) = arg(&args, "--netns") {
        enter_netns(&ns)?;
    }
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args),
        Some("client") => client(&args),
        _ => bail!("usage: lbt-peer serve|client ..."),
    }
}

fn serve(args: &[String]) -> anyhow::Result<()> {
    let name = arg(args, "--name").context("--name")?;
    let ports = args_all(args, "--port");
    let active = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let report = {
        let (active, total, out) = (active.clone(), total.clone(), out.clone());
        move || {
            let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(
                o,
                "conn {} {}",
                active.load(Ordering::SeqCst),
                total.load(Ordering::SeqCst)
            );
            let _ = o.flush();
        }
    };
    let mut handles = Vec::new();
    for port in ports {
        // [::] takes IPv4 too (as IPv4-mapped) in a fresh namespace.
        let l =
            TcpListener::bind(format!("[::]:{port}")).with_context(|| format!("bind {port}"))?;
        let (name, active, total, report) =
            (name.clone(), active.clone(), total.clone(), report.clone());
        handles.push(std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                active.fetch_add(1, Ordering::SeqCst);
                total.fetch_add(1, Ordering::SeqCst);
                report();
                let (name, active, report) = (name.clone(), active.clone(), report.clone());
                std::thread::spawn(move || {
                    let _ = conn.write_all(format!("{name}\n").as_bytes());
                    let mut buf = [0u8; 512];
                    // Echo until the client closes.
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                    report();
                });
            }
        }));
    }
    // Sink ports answer with the pod's name and close at once, without a
    // thread per connection: for connect-rate measurements, where the
    // server must not be the bottleneck. The server closes first, so the
    // client never sits in TIME_WAIT.
    for port in args_all(args, "--sink-port") {
        let l =
            TcpListener::bind(format!("[::]:{port}")).with_context(|| format!("bind {port}"))?;
        let reply = format!("{name}\n");
        handles.push(std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.write_all(reply.as_bytes());
                let _ = conn.shutdown(std::net::Shutdown::Write);
            }
        }));
    }
    println!("listening");
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(n) => format!("errno{n}"),
        None => e.kind().to_string(),
    }
}

/// Connect and read the pod's name.
fn open(addr: SocketAddr) -> Result<(TcpStream, String), String> {
    let s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| errno_name(&e))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| errno_name(&e))?;
    let mut line = String::new();
    let mut r = BufReader::new(&s);
    r.read_line(&mut line).map_err(|e| errno_name(&e))?;
    Ok((s, line.trim().to_owned()))
}

fn client(args: &[String]) -> anyhow::Result<()> {
    let addr: SocketAddr = arg(args, "--connect").context("--connect")?.parse()?;
    let count: usize = arg(args, "--count").context("--count")?.parse()?;
    let mode = arg(args, "--mode").unwrap_or_else(|| "hold".into());
    let mut pods: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut peers: BTreeMap<String, u64> = BTreeMap::new();
    let mut order = Vec::new();
    let mut held = Vec::new();
    let start = Instant::now();
    for _ in 0..count {
        match open(addr) {
            Ok((s, pod)) => {
                *pods.entry(pod.clone()).or_default() += 1;
                if let Ok(p) = s.peer_addr() {
                    *peers.entry(p.to_string()).or_default() += 1;
                }
                order.push(pod);
                if mode == "hold" || mode == "echo" {
                    held.push(s);
                } else if mode == "rate" {
                    // Wait for the server's FIN, then close.
                    let mut rest = Vec::new();
                    let _ = (&s).read_to_end(&mut rest);
                }
            }
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let result = serde_json::json!({
        "pods": pods, "errors": errors, "peers": peers,
        "order": if count <= 1000 { order } else { vec![] },
        "elapsed_s": elapsed,
    });
    println!("{result}");
    std::io::stdout().flush()?;
    if mode == "hold" {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        drop(held);
        println!("closed");
    } else if mode == "echo" {
        let conns: Vec<Arc<Echo>> = held
            .into_iter()
            .zip(pods_in_order(&result))
            .map(|(s, pod)| Echo::start(s, pod))
            .collect();
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let report: Vec<serde_json::Value> = conns.iter().map(|c| c.report()).collect();
        println!("{}", serde_json::Value::Array(report));
    }
    Ok(())
}

fn pods_in_order(result: &serde_json::Value) -> Vec<String> {
    result["order"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// One long-lived connection of `--mode echo`.
struct Echo {
    pod: String,
    echoes: AtomicU64,
    /// The first error and when (unix ms).
    error: Mutex<Option<(String, u64)>>,
}

impl Echo {
    fn start(s: TcpStream, pod: String) -> Arc<Self> {
        let e = Arc::new(Self {
            pod,
            echoes: AtomicU64::new(0),
            error: Mutex::new(None),
        });
        let me = e.clone();
        std::thread::spawn(move || {
            // No read timeout: a read waits as long as the kernel lets it,
            // as a client without its own deadline does.
            let _ = s.set_read_timeout(None);
            let mut s = s;
            let mut buf = [0u8; 64];
            loop {
                let r = s.write_all(b"ping\n").and_then(|()| {
                    let mut got = 0;
                    while got < 5 {
                        let n = s.read(&mut buf[got..5])?;
                        if n == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        got += n;
                    }
                    Ok(())
                });
                if let Err(err) = r {
                    let at = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    let name = match err.raw_os_error() {
                        Some(libc::ECONNABORTED) => "ECONNABORTED".into(),
                        Some(libc::ECONNRESET) => "ECONNRESET".into(),
                        Some(libc::EPIPE) => "EPIPE".into(),
                        _ => errno_name(&err),
                    };
                    *me.error.lock().unwrap_or_else(|p| p.into_inner()) = Some((name, at));
                    return;
                }
                me.echoes.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        e
    }

    fn report(&self) -> serde_json::Value {
        let error = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        serde_json::json!({
            "pod": self.pod,
            "echoes": self.echoes.load(Ordering::SeqCst),
            "error": error.as_ref().map(|e| e.0.clone()),
            "error_at_ms": error.as_ref().map(|e| e.1),
        })
    }
}
