//! Client network namespaces: where the router opens pod connections.
//!
//! With `--source-identity pod` (the default) the pod connections that
//! carry a client pod's streams are opened from inside that pod's own
//! network namespace, so they leave with its address, through its own
//! interface: the pod they reach sees the client as it would at L4 (its
//! NetworkPolicy, source checks and access logs apply), and the answer
//! comes back to that socket with no help. Istio ambient's ztunnel does
//! the same in its "in-pod" mode. A socket keeps the namespace it was made
//! in for its whole life, whatever namespace the thread using it is in
//! (checked on this kernel: SO_NETNS_COOKIE of such a socket stays its
//! namespace's), so a worker thread enters the namespace with
//! `setns(CLONE_NEWNET)`, makes the socket, and goes back at once; the
//! socket is then used from the router's own namespace like any other.
//!
//! The kernel names a client's namespace by its cookie
//! (`bpf_get_netns_cookie`, recorded in `ORIG_DST` at establish); the
//! router learns each namespace file's cookie from `SO_NETNS_COOKIE` on a
//! socket made in it. Namespace files come from `--netns-dir`: containerd
//! and CRI-O bind-mount one per pod under `/var/run/netns` before any of
//! its containers starts, and `ip netns` does the same under `/run/netns`.
//! The directory is watched with inotify, so a new pod's namespace is
//! known before its first connect; a file is often created before its
//! namespace is mounted on it, so a file that is not a namespace yet is
//! tried again shortly. Every namespace served is written to the kernel's
//! `SERVED_NETNS`: `connect4/6` steer a connection to the router only from
//! those, and balance every other at L4, where its own address is kept.
//!
//! Entering a namespace takes CAP_SYS_ADMIN, the one power this module
//! needs; it is checked at start with a clear error.

#![expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE) has no safe wrapper in nix 0.30 or socket2 0.6"
)]

use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::sched::CloneFlags;

use super::core::Origin;

/// `SO_NETNS_COOKIE` (Linux 5.14): libc 0.2 does not name it on every
/// target.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// `statfs(2)` type of a namespace file (nsfs).
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// A file that is not a namespace yet (created, not yet mounted on) is
/// retried this often...
const RETRY: Duration = Duration::from_millis(10);
/// ...for this long, then only at the next full scan.
const RETRY_FOR: Duration = Duration::from_secs(2);
/// A full scan of the directory, besides inotify: catches what a
/// dropped event (queue overflow) or a slow mount missed.
const RESCAN: Duration = Duration::from_secs(1);

/// Whose address pod connections carry (`router --source-identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum SourceIdentity {
    /// The client pod's own: pod connections opened from its network
    /// namespace, one pool per client namespace.
    #[default]
    Pod,
    /// The node's: every client's streams share the router's pools.
    Node,
}

impl SourceIdentity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Node => "node",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "entering network namespace {what}: {source} (opening a client pod's pod connections \
         from its own namespace needs CAP_SYS_ADMIN and a seccomp profile that allows setns; \
         run the router with --source-identity node to do without, at the cost of pods seeing \
         the node's address)"
    )]
    Enter { what: String, source: nix::Error },
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace (yet)")]
    NotNetns { path: PathBuf },
    #[error("reading the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+): {0}")]
    Cookie(std::io::Error),
    #[error("making a socket: {0}")]
    Socket(std::io::Error),
    #[error("client network namespace {0} is gone")]
    Gone(Origin),
}

/// The namespaces the router can open pod connections from.
pub struct Namespaces {
    dir: PathBuf,
    /// The router's own namespace, where every thread returns.
    own: OwnedFd,
    own_cookie: u64,
    /// Cookie -> a handle on the namespace (kept open while its file is
    /// there; a pod connection made in it keeps it alive by itself).
    known: RwLock<HashMap<u64, Arc<OwnedFd>>>,
    /// How many of `known` the kernel has been told of (`SERVED_NETNS`):
    /// the table is filled first, so that a connection the kernel steers
    /// finds its namespace, and this counts a namespace only once it is
    /// served both ways (what `router-status` reports).
    served: std::sync::atomic::AtomicUsize,
}

impl Namespaces {
    /// Take the calling thread's namespace as the router's own, and check
    /// that this process may enter namespaces at all.
    pub fn new(dir: PathBuf) -> Result<Self, NetnsError> {
        let path = PathBuf::from("/proc/thread-self/ns/net");
        let own: OwnedFd = std::fs::File::open(&path)
            .map_err(|source| NetnsError::Open { path, source })?
            .into();
        // Entering our own namespace changes nothing but needs the same
        // power as entering a client's: fail here, clearly, not at the
        // first pod connection.
        nix::sched::setns(own.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
            NetnsError::Enter {
                what: "of the router itself".into(),
                source,
            }
        })?;
        let own_cookie = cookie_here()?;
        Ok(Self {
            dir,
            own,
            own_cookie,
            known: RwLock::new(HashMap::new()),
            served: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Client namespaces served now (not counting the router's own): in
    /// the table and in the kernel's `SERVED_NETNS`, so a client that
    /// connects once this counts its namespace is routed.
    pub fn len(&self) -> usize {
        self.served.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The origin of a client connection from namespace `cookie`: the
    /// node for the router's own namespace, the namespace for a known one,
    /// None for one the router cannot enter.
    pub fn origin(&self, cookie: u64) -> Option<Origin> {
        if cookie == self.own_cookie {
            return Some(Origin::NODE);
        }
        self.contains(Origin(cookie)).then_some(Origin(cookie))
    }

    /// Whether `origin` can still be entered (the node always can).
    pub fn contains(&self, origin: Origin) -> bool {
        origin.is_node()
            || self
                .known
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&origin.0)
    }

    /// The cookie of this process's own network namespace.
    pub fn own_cookie(&self) -> u64 {
        self.own_cookie
    }

    /// Handles on the namespace files in the directory whose cookies are
    /// in `wanted`, found by one walk of the directory (each file entered
    /// once to learn its cookie). Namespaces with no file there are
    /// simply not in the answer.
    pub fn find(&self, wanted: &HashSet<u64>) -> HashMap<u64, OwnedFd> {
        let mut found = HashMap::new();
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return found;
        };
        for entry in dir.flatten() {
            if found.len() == wanted.len() {
                break;
            }
            if let Ok((cookie, fd)) = self.open(&entry.path())
                && wanted.contains(&cookie)
            {
                found.entry(cookie).or_insert(fd);
            }
        }
        found
    }

    /// Run `f` on this thread inside the namespace `ns` (a handle from
    /// [`Namespaces::find`]), then come back.
    pub fn run_in<R>(&self, ns: BorrowedFd<'_>, f: impl FnOnce() -> R) -> Result<R, NetnsError> {
        self.enter(ns, "of a client", f)
    }

    /// Run `f` on this thread inside namespace `ns`, then come back.
    fn enter<R>(
        &self,
        ns: BorrowedFd<'_>,
        what: &str,
        f: impl FnOnce() -> R,
    ) -> Result<R, NetnsError> {
        nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            what: what.into(),
            source,
        })?;
        let r = f();
        if let Err(e) = nix::sched::setns(self.own.as_fd(), CloneFlags::CLONE_NEWNET) {
            // This thread would make every later socket in a client's
            // namespace: nothing is safe to do but stop (the kernel sends
            // new connections to L4 at once, and a new router takes over).
            tracing::error!(error = %e, "cannot return to the router's own network namespace; aborting");
            std::process::abort();
        }
        Ok(r)
    }

    /// Make a socket with `make` inside `origin`'s namespace.
    fn make_in<R>(&self, origin: Origin, make: impl FnOnce() -> R) -> Result<R, NetnsError> {
        let ns = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&origin.0)
            .cloned()
            .ok_or(NetnsError::Gone(origin))?;
        self.enter(ns.as_fd(), &origin.to_string(), make)
    }

    /// The cookie of the namespace file `path` (None if it is not a
    /// namespace yet), and a handle on it.
    fn open(&self, path: &Path) -> Result<(u64, OwnedFd), NetnsError> {
        let fd: OwnedFd = std::fs::File::open(path)
            .map_err(|source| NetnsError::Open {
                path: path.to_owned(),
                source,
            })?
            .into();
        let is_ns =
            nix::sys::statfs::fstatfs(&fd).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC);
        if !is_ns {
            return Err(NetnsError::NotNetns {
                path: path.to_owned(),
            });
        }
        let cookie = self.enter(fd.as_fd(), &path.display().to_string(), cookie_here)??;
        Ok((cookie, fd))
    }
}

/// Where the router's pod connections come from: the one place that
/// makes their sockets, keyed by the client's origin (ztunnel's
/// `SocketFactory` / `InPodSocketFactory`).
#[derive(Clone, Default)]
pub struct SocketFactory {
    /// None with `--source-identity node`: every socket is the node's.
    namespaces: Option<Arc<Namespaces>>,
}

impl SocketFactory {
    pub fn new(namespaces: Option<Arc<Namespaces>>) -> Self {
        Self { namespaces }
    }

    /// A TCP socket for a pod connection of `origin` to `addr`, made in
    /// `origin`'s namespace (the router's own for [`Origin::NODE`]).
    pub fn tcp(
        &self,
        origin: Origin,
        addr: SocketAddr,
    ) -> Result<tokio::net::TcpSocket, NetnsError> {
        let make = || {
            socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
        };
        let sock = match (&self.namespaces, origin.is_node()) {
            (_, true) => make(),
            (Some(ns), false) => ns.make_in(origin, make)?,
            (None, false) => return Err(NetnsError::Gone(origin)),
        }
        .map_err(NetnsError::Socket)?;
        sock.set_nonblocking(true).map_err(NetnsError::Socket)?;
        Ok(tokio::net::TcpSocket::from_std_stream(sock.into()))
    }

    /// Connect a pod connection of `origin` to `addr`, within `timeout`.
    pub async fn connect(
        &self,
        origin: Origin,
        addr: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let sock = self.tcp(origin, addr).map_err(std::io::Error::other)?;
        match tokio::time::timeout(timeout, sock.connect(addr)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            )),
        }
    }
}

/// The cookie of the calling thread's network namespace.
pub fn cookie_here() -> Result<u64, NetnsError> {
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)
        .map_err(NetnsError::Socket)?;
    netns_cookie(sock.as_fd())
}

/// The cookie of the network namespace socket `sock` was made in.
fn netns_cookie(sock: BorrowedFd<'_>) -> Result<u64, NetnsError> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a u64 and `len` its size, as the kernel
    // expects for SO_NETNS_COOKIE; the descriptor is borrowed, so open.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(NetnsError::Cookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// What the watcher tells the kernel: the namespaces served.
pub trait Served: Send + Sync {
    /// Add (`true`) or remove a cookie from `SERVED_NETNS`.
    fn set(&self, cookie: u64, served: bool);
    /// Every cookie in `SERVED_NETNS` now.
    fn list(&self) -> Vec<u64>;
    /// Moves when the kernel maps were replaced (a fresh data path): the
    /// watcher then writes every cookie again.
    fn epoch(&self) -> u64;
}

/// The watcher's state: which file names hold which namespace.
struct Watch {
    ns: Arc<Namespaces>,
    served: Arc<dyn Served>,
    names: HashMap<OsString, u64>,
    /// Names that were not a namespace yet, and when first seen.
    pending: HashMap<OsString, Instant>,
    /// Names whose failure was logged (once per name).
    warned: HashSet<OsString>,
    epoch: u64,
}

impl Watch {
    fn add(&mut self, name: &OsString) {
        if self.names.contains_key(name) {
            return;
        }
        let path = self.ns.dir.join(name);
        match self.ns.open(&path) {
            Ok((cookie, fd)) => {
                self.pending.remove(name);
                self.warned.remove(name);
                if cookie == self.ns.own_cookie {
                    // The router's own namespace, listed there too: its
                    // clients are the node's.
                    self.names.insert(name.clone(), cookie);
                    return;
                }
                self.names.insert(name.clone(), cookie);
                let fresh = self
                    .ns
                    .known
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(cookie, Arc::new(fd))
                    .is_none();
                if fresh {
                    self.served.set(cookie, true);
                    self.ns
                        .served
                        .fetch_add(1, std::sync::atomic::Ordering::Release);
                    tracing::debug!(name = ?name, cookie, "client network namespace served");
                }
            }
            Err(NetnsError::NotNetns { .. }) | Err(NetnsError::Open { .. }) => {
                self.pending
                    .entry(name.clone())
                    .or_insert_with(Instant::now);
            }
            Err(e) => {
                self.pending
                    .entry(name.clone())
                    .or_insert_with(Instant::now);
                if self.warned.insert(name.clone()) {
                    tracing::warn!(name = ?name, error = %e, "cannot serve a client network namespace; its connections are balanced at L4");
                }
            }
        }
    }

    fn remove(&mut self, name: &OsString) {
        self.pending.remove(name);
        self.warned.remove(name);
        let Some(cookie) = self.names.remove(name) else {
            return;
        };
        if cookie == self.ns.own_cookie || self.names.values().any(|c| *c == cookie) {
            return;
        }
        // The kernel first, so no new connection is steered here for it.
        self.served.set(cookie, false);
        let was = self
            .ns
            .known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cookie);
        if was.is_some() {
            self.ns
                .served
                .fetch_sub(1, std::sync::atomic::Ordering::Release);
        }
        tracing::debug!(name = ?name, cookie, "client network namespace gone");
    }

    /// Read the whole directory: add what is new, remove what is gone.
    fn scan(&mut self) {
        let Ok(dir) = std::fs::read_dir(&self.ns.dir) else {
            // No directory (yet): nothing is served but the node.
            let names: Vec<OsString> = self.names.keys().cloned().collect();
            for n in names {
                self.remove(&n);
            }
            return;
        };
        let present: HashSet<OsString> = dir.flatten().map(|e| e.file_name()).collect();
        let gone: Vec<OsString> = self
            .names
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            self.remove(&n);
        }
        self.pending.retain(|n, _| present.contains(n));
        for n in &present {
            self.add(n);
        }
    }

    /// Make `SERVED_NETNS` exactly the node's namespace and the known
    /// ones (at start, and when the maps were replaced).
    fn sync_kernel(&mut self) {
        let mut want: HashSet<u64> = self
            .ns
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        want.insert(self.ns.own_cookie);
        for c in self.served.list() {
            if !want.contains(&c) {
                self.served.set(c, false);
            }
        }
        for c in want {
            self.served.set(c, true);
        }
    }
}

/// Discover the namespaces once, now, and tell the kernel (before the
/// router serves, so that clients that exist are steered from the start).
pub fn start(
    ns: Arc<Namespaces>,
    served: Arc<dyn Served>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut w = Watch {
        epoch: served.epoch(),
        ns,
        served,
        names: HashMap::new(),
        pending: HashMap::new(),
        warned: HashSet::new(),
    };
    w.scan();
    w.sync_kernel();
    tracing::info!(
        dir = %w.ns.dir.display(),
        namespaces = w.ns.len(),
        "serving client network namespaces with their own addresses"
    );
    std::thread::Builder::new()
        .name("netns-watch".into())
        .spawn(move || watch(w, stop))
}

fn watch(mut w: Watch, stop: Arc<AtomicBool>) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let mut inotify: Option<Inotify> = None;
    let mut last_scan = Instant::now();
    // inotify sees a namespace file made, not the namespace mounted on it
    // a moment later; the mount table says when something was mounted
    // (poll gives POLLPRI on each change), so a file waiting for its
    // namespace is tried again at once, not at the next retry: a client
    // that connects a few ms after its namespace appeared is served.
    let mounts = std::fs::File::open("/proc/self/mountinfo").ok();
    while !stop.load(Ordering::Relaxed) {
        if inotify.is_none() {
            inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
                .ok()
                .filter(|i| {
                    i.add_watch(
                        &w.ns.dir,
                        AddWatchFlags::IN_CREATE
                            | AddWatchFlags::IN_DELETE
                            | AddWatchFlags::IN_MOVED_FROM
                            | AddWatchFlags::IN_MOVED_TO
                            | AddWatchFlags::IN_CLOSE_WRITE
                            | AddWatchFlags::IN_ATTRIB
                            | AddWatchFlags::IN_DELETE_SELF
                            | AddWatchFlags::IN_ONLYDIR,
                    )
                    .is_ok()
                });
            if inotify.is_some() {
                // Whatever came before the watch.
                w.scan();
            }
        }
        let retrying = w.pending.values().any(|t| t.elapsed() < RETRY_FOR);
        let timeout = if retrying { RETRY } else { RESCAN };
        let mut events = Vec::new();
        let mut lost = false;
        let mut mounted = false;
        if let Some(i) = &inotify {
            use nix::poll::{PollFd, PollFlags, PollTimeout};
            let mut fds = vec![PollFd::new(i.as_fd(), PollFlags::POLLIN)];
            if let Some(m) = &mounts {
                fds.push(PollFd::new(m.as_fd(), PollFlags::POLLPRI));
            }
            let ms = PollTimeout::try_from(timeout.as_millis() as i32).unwrap_or(PollTimeout::MAX);
            if matches!(nix::poll::poll(&mut fds, ms), Ok(n) if n > 0) {
                mounted = fds.get(1).is_some_and(|f| {
                    f.revents()
                        .is_some_and(|r| r.intersects(PollFlags::POLLPRI | PollFlags::POLLERR))
                });
                let readable = fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLIN));
                if readable {
                    match i.read_events() {
                        Ok(evs) => events = evs,
                        Err(nix::errno::Errno::EAGAIN) => {}
                        Err(_) => lost = true,
                    }
                }
            }
        } else {
            std::thread::sleep(timeout);
        }
        for ev in &events {
            if ev.mask.intersects(
                AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_IGNORED
                    | AddWatchFlags::IN_Q_OVERFLOW,
            ) {
                lost = true;
                continue;
            }
            let Some(name) = &ev.name else { continue };
            if ev
                .mask
                .intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM)
            {
                w.remove(name);
            } else {
                w.add(name);
            }
        }
        if lost {
            inotify = None;
            w.scan();
        }
        let due: Vec<OsString> = w
            .pending
            .iter()
            .filter(|(_, t)| mounted || t.elapsed() < RETRY_FOR)
            .map(|(n, _)| n.clone())
            .collect();
        for n in due {
            w.add(&n);
        }
        if last_scan.elapsed() >= RESCAN {
            last_scan = Instant::now();
            w.scan();
            let epoch = w.served.epoch();
            if epoch != w.epoch {
                w.epoch = epoch;
                w.sync_kernel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Real namespaces, made the way the runtime makes them: a file in the
    //! directory, then a namespace bind-mounted on it. Needs root.

    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorded(Mutex<HashSet<u64>>);

    impl Served for Recorded {
        fn set(&self, cookie: u64, served: bool) {
            let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if served {
                s.insert(cookie);
            } else {
                s.remove(&cookie);
            }
        }
        fn list(&self) -> Vec<u64> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied()
                .collect()
        }
        fn epoch(&self) -> u64 {
            0
        }
    }

    /// A new network namespace bind-mounted on `path` (created empty
    /// first, as `ip netns add` and the runtimes do), after `delay`.
    fn make_netns(path: &Path, delay: Duration) {
        std::fs::write(path, b"").expect("namespace file");
        let path = path.to_owned();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare (needs root)");
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .expect("bind mount");
        })
        .join()
        .expect("namespace thread");
    }

    fn remove_netns(path: &Path) {
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(path);
    }

    fn wait(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn cookie_of(sock: &tokio::net::TcpSocket) -> u64 {
        netns_cookie(sock.as_fd()).expect("SO_NETNS_COOKIE")
    }

    #[test]
    fn namespaces_are_found_as_they_appear_entered_for_sockets_and_let_go_when_deleted() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (namespaces, mounts)"
        );
        let dir = std::env::temp_dir().join(format!("lbt-netns-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        // One namespace before the watcher starts, mounted at once.
        let first = dir.join("first");
        make_netns(&first, Duration::ZERO);
        let ns = Arc::new(Namespaces::new(dir.clone()).expect("CAP_SYS_ADMIN"));
        let served = Arc::new(Recorded::default());
        let stop = Arc::new(AtomicBool::new(false));
        let handle = start(ns.clone(), served.clone(), stop.clone()).expect("watcher");
        assert_eq!(ns.len(), 1, "found by the first scan");
        assert!(served.list().contains(&ns.own_cookie), "the node is served");
        // A second one whose file is there 100 ms before its namespace.
        let second = dir.join("second");
        make_netns(&second, Duration::from_millis(100));
        // Counted once both the table and the served map have it (the
        // table is filled first), so a client that connects once the
        // count shows its namespace is steered to the router.
        wait("the second namespace", || ns.len() == 2);
        assert_eq!(served.list().len(), 3, "the node and both namespaces");
        let cookies: Vec<u64> = served
            .list()
            .into_iter()
            .filter(|c| *c != ns.own_cookie)
            .collect();
        assert_eq!(cookies.len(), 2, "{cookies:?}");
        // Sockets are made in the namespace their origin names.
        let sockets = SocketFactory::new(Some(ns.clone()));
        let addr: SocketAddr = "198.18.0.1:80".parse().expect("addr");
        for c in &cookies {
            let s = sockets
                .tcp(Origin(*c), addr)
                .expect("socket in the namespace");
            assert_eq!(cookie_of(&s), *c);
            assert_eq!(ns.origin(*c), Some(Origin(*c)));
        }
        let node = sockets.tcp(Origin::NODE, addr).expect("node socket");
        assert_eq!(
            cookie_of(&node),
            ns.own_cookie,
            "this thread came back home"
        );
        assert_eq!(ns.origin(ns.own_cookie), Some(Origin::NODE));
        // Deleted: no longer served, no longer entered.
        remove_netns(&first);
        wait("the first namespace to go", || ns.len() == 1);
        assert_eq!(served.list().len(), 2, "the node and the second");
        let gone: Vec<u64> = cookies
            .iter()
            .copied()
            .filter(|c| ns.origin(*c).is_none())
            .collect();
        assert_eq!(gone.len(), 1);
        assert!(matches!(
            sockets.tcp(Origin(gone[0]), addr),
            Err(NetnsError::Gone(_))
        ));
        remove_netns(&second);
        wait("the second namespace to go", || ns.len() == 0);
        stop.store(true, Ordering::Relaxed);
        let _ = handle.join();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
