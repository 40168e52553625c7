//! The agent's link to the router process: start it (`run --proxy-addr`)
//! or find the one that runs, stop it with the agent, ask it on its
//! socket, and hold a duplicate of its listener for the next router when
//! it dies.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    admin,
    api::{ListenerView, Request, RouterStatusView},
};

/// How long the agent waits for the router's socket to answer.
const ROUTER_ASK_TIMEOUT: Duration = Duration::from_millis(500);

/// The router process `run --proxy-addr` starts.
pub struct SpawnRouter {
    pub listen: std::net::SocketAddr,
    /// Its arguments besides the paths, which are the agent's.
    pub args: Vec<String>,
}

/// A router this agent started or found; stopped with the agent.
pub enum OwnedRouter {
    Child(std::process::Child),
    Found(u32),
}

/// Start the router process, unless one answers on `router_socket` for
/// the same address (an agent that was killed started it).
pub async fn ensure_router(
    spawn: &SpawnRouter,
    router_socket: &Path,
    admin_socket: &Path,
    cgroup: &Path,
    bpffs: &Path,
) -> anyhow::Result<OwnedRouter> {
    if let Ok(st) = ask_router::<RouterStatusView>(router_socket, &Request::RouterStatus).await
        && st.listen == spawn.listen.to_string()
    {
        tracing::info!(pid = st.pid, listen = %st.listen, "a router already runs; keeping it");
        return Ok(OwnedRouter::Found(st.pid));
    }
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe()?;
    let child = std::process::Command::new(exe)
        .arg("router")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--bpffs")
        .arg(bpffs)
        .arg("--admin-socket")
        .arg(router_socket)
        .arg("--agent-socket")
        .arg(admin_socket)
        .args(&spawn.args)
        // Its own process group: a Ctrl-C to the agent's terminal, or a
        // signal to the agent's group, does not reach it.
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start the router process: {e}"))?;
    tracing::info!(pid = child.id(), listen = %spawn.listen, "started the router process");
    Ok(OwnedRouter::Child(child))
}

/// SIGTERM to the router (it drains), and wait for it.
pub async fn stop_router(router: OwnedRouter) {
    use nix::{sys::signal, unistd::Pid};
    let pid = match &router {
        OwnedRouter::Child(c) => c.id(),
        OwnedRouter::Found(p) => *p,
    };
    let pid = Pid::from_raw(pid as i32);
    let _ = signal::kill(pid, signal::Signal::SIGTERM);
    tracing::info!(%pid, "stopping the router (it drains its clients)");
    match router {
        OwnedRouter::Child(mut c) => {
            let _ = tokio::task::spawn_blocking(move || c.wait()).await;
        }
        OwnedRouter::Found(_) => {
            // Not our child: wait until it is gone.
            while signal::kill(pid, None).is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Ask the router process on `path`, with a short timeout: a router that
/// is down or stuck must not hold up the agent's answers.
pub async fn ask_router<T: for<'de> serde::Deserialize<'de>>(
    path: &Path,
    req: &Request,
) -> Result<T, String> {
    match tokio::time::timeout(ROUTER_ASK_TIMEOUT, admin::request(path, req)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the router at {} did not answer within {ROUTER_ASK_TIMEOUT:?}",
            path.display()
        )),
    }
}

/// A duplicate of the router's listening socket, held so that it outlives
/// the router: connections made while no router runs queue on it, for the
/// next router to adopt.
pub struct Held {
    pub fd: std::os::fd::OwnedFd,
    pub inode: u64,
    pub listen: std::net::SocketAddr,
    /// When the router last answered.
    pub seen: std::time::Instant,
}

pub type HeldSlot = Arc<Mutex<Option<Held>>>;

/// Keep a duplicate of the live router's listener; shut it when no router
/// answered for `grace` (its queued connections reset, and the clients
/// reconnect at L4 rather than wait for a router that does not come).
pub async fn hold_router_listener(router_socket: PathBuf, held: HeldSlot, grace: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        match ask_router::<RouterStatusView>(&router_socket, &Request::RouterStatus).await {
            Ok(st) => {
                let mine = {
                    let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(h) = h.as_mut() {
                        h.seen = std::time::Instant::now();
                    }
                    h.as_ref().is_some_and(|h| h.inode == st.listener_inode)
                };
                if mine || st.listener_inode == 0 {
                    continue;
                }
                let Ok(listen) = st.listen.parse() else {
                    continue;
                };
                let path = router_socket.clone();
                let got = tokio::task::spawn_blocking(move || {
                    admin::request_fd::<ListenerView>(
                        &path,
                        &Request::RouterListener,
                        Duration::from_millis(500),
                    )
                })
                .await;
                if let Ok(Ok((_, Some(fd)))) = got {
                    let inode = nix::sys::stat::fstat(&fd).map(|s| s.st_ino).unwrap_or(0);
                    tracing::info!(%listen, pid = st.pid, "holding the router's listener");
                    *held.lock().unwrap_or_else(|p| p.into_inner()) = Some(Held {
                        fd,
                        inode,
                        listen,
                        seen: std::time::Instant::now(),
                    });
                }
            }
            Err(_) => {
                let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
                if h.as_ref().is_some_and(|h| h.seen.elapsed() > grace)
                    && let Some(old) = h.take()
                {
                    let _ = nix::sys::socket::shutdown(
                        std::os::fd::AsRawFd::as_raw_fd(&old.fd),
                        nix::sys::socket::Shutdown::Both,
                    );
                    tracing::warn!(
                        listen = %old.listen,
                        ?grace,
                        "no router came back: shut the listener it left (connections queued on it reset)"
                    );
                }
            }
        }
    }
}
