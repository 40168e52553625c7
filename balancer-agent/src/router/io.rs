//! The router's sockets: one reader and one writer task per connection,
//! client or backend, all on the router thread's `LocalSet`, all sharing
//! one [`Core`].
//!
//! A reader hands every read (as large as the socket has, up to the buffer)
//! to the core at once, and a writer puts everything the core queued for
//! its connection on the wire in one write. So with many streams in flight
//! frames are batched: one syscall per burst per socket, not per frame.

use std::{cell::RefCell, net::SocketAddr, rc::Rc, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, tcp::OwnedWriteHalf},
    sync::{Notify, watch},
};

use super::{
    core::{ConnId, Core, Io, Map, Origin},
    netns::SocketFactory,
};

/// Second phase of a drain if the client does not answer our PING.
const DRAIN_PING_TIMEOUT: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 64 * 1024;
/// How long a connection the router closes on an error keeps reading
/// (and discarding) what its peer still sends...
const LINGER: Duration = Duration::from_secs(1);
/// ...and how much at most.
const LINGER_BYTES: usize = 4 << 20;

/// Read and discard until the peer closes, [`LINGER`] passes, or
/// [`LINGER_BYTES`] came. A socket closed with unread input sends RST, and
/// a RST can make the peer's kernel drop what it had not yet read, our
/// GOAWAY among it: a peer that floods us would never learn why it was cut
/// off (nginx's lingering close, for the same reason).
async fn linger(r: &mut tokio::net::tcp::OwnedReadHalf, buf: &mut BytesMut) {
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut drained = 0;
    while drained < LINGER_BYTES {
        buf.clear();
        match tokio::time::timeout_at(deadline, r.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// Buffers above this are replaced by fresh ones once they drained.
const KEEP_BUFFER: usize = 4 * READ_CHUNK;

pub struct Shared {
    core: RefCell<Core>,
    wakers: RefCell<Map<ConnId, Rc<Notify>>>,
    /// Where pod connections come from (see [`SocketFactory`]).
    sockets: SocketFactory,
}

impl Shared {
    pub fn new(core: Core, sockets: SocketFactory) -> Rc<Self> {
        Rc::new(Self {
            core: RefCell::new(core),
            wakers: RefCell::new(Map::default()),
            sockets,
        })
    }

    /// Run `f` on the core, then carry out what it asked for (also for
    /// the worker's upkeep between I/O events).
    pub(super) fn with<R>(self: &Rc<Self>, f: impl FnOnce(&mut Core) -> R) -> R {
        let r = f(&mut self.core.borrow_mut());
        let ios = self.core.borrow_mut().take_io();
        for io in ios {
            match io {
                Io::Wake(id) => {
                    if let Some(n) = self.wakers.borrow().get(&id) {
                        n.notify_one();
                    }
                }
                Io::Connect { id, addr, origin } => {
                    tokio::task::spawn_local(self.clone().backend(id, addr, origin));
                }
            }
        }
        r
    }

    /// Periodic upkeep of the core (see [`Core::tick`]).
    pub fn tick(self: &Rc<Self>) {
        let now = std::time::Instant::now();
        self.with(|c| c.tick(now));
    }

    fn register(&self, id: ConnId) -> Rc<Notify> {
        let n = Rc::new(Notify::new());
        self.wakers.borrow_mut().insert(id, n.clone());
        // Whatever the core queued before we listened.
        n.notify_one();
        n
    }

    /// Serve one HTTP/2 client connection until it is closed.
    pub async fn client(
        self: Rc<Self>,
        sock: TcpStream,
        vip: SocketAddr,
        origin: Origin,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let id = self.with(|c| c.add_client_from(vip, origin));
        let notify = self.register(id);
        let (mut r, w) = sock.into_split();
        let me = self.clone();
        let reader = async move {
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            let mut draining = false;
            let timer = tokio::time::sleep(Duration::from_secs(86_400));
            tokio::pin!(timer);
            let mut timer_armed = false;
            if *shutdown.borrow_and_update() {
                draining = true;
                me.with(|c| c.client_drain(id));
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + DRAIN_PING_TIMEOUT);
                timer_armed = true;
            }
            loop {
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(READ_CHUNK);
                }
                tokio::select! {
                    res = r.read_buf(&mut buf) => match res {
                        Ok(0) => {
                            me.with(|c| c.client_eof(id));
                            return;
                        }
                        Ok(_) => {
                            let go = me.with(|c| {
                                c.client_read(id, &mut buf);
                                c.client_reading(id)
                            });
                            if !go {
                                linger(&mut r, &mut buf).await;
                                return;
                            }
                        }
                        Err(_) => {
                            me.with(|c| c.client_gone(id));
                            return;
                        }
                    },
                    _ = shutdown.changed(), if !draining => {
                        draining = true;
                        me.with(|c| c.client_drain(id));
                        timer.as_mut().reset(tokio::time::Instant::now() + DRAIN_PING_TIMEOUT);
                        timer_armed = true;
                    }
                    () = &mut timer, if timer_armed => {
                        timer_armed = false;
                        me.with(|c| c.drain_final(id));
                    }
                }
            }
        };
        self.run(id, reader, w, notify).await;
    }

    /// One backend connection of `origin`'s pool: connect from its
    /// namespace, then move bytes until the core lets it go.
    async fn backend(self: Rc<Self>, id: ConnId, addr: SocketAddr, origin: Origin) {
        // The core gives a connection that is up but sends no SETTINGS the
        // same time (see `Limits::connect_timeout`).
        let timeout = self.core.borrow().limits().connect_timeout;
        let sock = match self.sockets.connect(origin, addr, timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%addr, %origin, error = %e, "connecting to backend");
                self.with(|c| c.backend_connect_failed(id));
                return;
            }
        };
        let _ = sock.set_nodelay(true);
        let notify = self.register(id);
        self.with(|c| c.backend_connected(id));
        let (mut r, w) = sock.into_split();
        let me = self.clone();
        let reader = async move {
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            loop {
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(READ_CHUNK);
                }
                match r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => {
                        me.with(|c| c.backend_eof(id));
                        return;
                    }
                    Ok(_) => {
                        let go = me.with(|c| {
                            c.backend_read(id, &mut buf);
                            c.backend_reading(id)
                        });
                        if !go {
                            return;
                        }
                    }
                }
            }
        };
        self.run(id, reader, w, notify).await;
    }

    /// Run a connection's reader and writer. The writer ends the
    /// connection (after its last bytes, or on a write error); the reader
    /// may stop earlier (end of input), and is dropped with the socket.
    async fn run(
        self: &Rc<Self>,
        id: ConnId,
        reader: impl std::future::Future<Output = ()>,
        w: OwnedWriteHalf,
        notify: Rc<Notify>,
    ) {
        let writer = self.clone().writer(id, w, notify);
        tokio::pin!(reader);
        tokio::pin!(writer);
        tokio::select! {
            // The reader may be lingering (see [`linger`]), or draining what
            // a backend sent before a write to it failed (see
            // [`Core::write_failed`]): give it its time before the socket
            // closes, then make sure the core let the connection go.
            () = &mut writer => {
                let _ = tokio::time::timeout(LINGER, &mut reader).await;
                self.with(|c| c.forget(id));
            }
            () = &mut reader => writer.await,
        }
        self.wakers.borrow_mut().remove(&id);
    }

    async fn writer(self: Rc<Self>, id: ConnId, mut w: OwnedWriteHalf, notify: Rc<Notify>) {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.clear();
            let Some(close) = self.core.borrow_mut().take_out(id, &mut buf) else {
                return;
            };
            if !buf.is_empty() {
                if let Err(e) = w.write_all(&buf).await {
                    tracing::debug!(conn = id, error = %e, "router write failed");
                    self.with(|c| c.write_failed(id));
                    return;
                }
                self.with(|c| c.written(id));
                // A burst grew the buffer: give the memory back rather
                // than keep it for every idle connection.
                if buf.capacity() > KEEP_BUFFER {
                    buf = BytesMut::with_capacity(READ_CHUNK);
                }
                continue;
            }
            if close {
                let _ = w.shutdown().await;
                self.with(|c| c.forget(id));
                return;
            }
            notify.notified().await;
        }
    }
}
