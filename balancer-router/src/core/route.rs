//! Routing: an endpoint for each new client stream, a stream id on that
//! endpoint's pooled connection (in the order HEADERS go out, within its
//! MAX_CONCURRENT_STREAMS), and retries of streams a backend did not
//! process (RFC 9113 8.7: REFUSED_STREAM, above a GOAWAY's last id, or a
//! connection that never came up), replayed elsewhere.

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering},
};

use bytes::BytesMut;

use super::{
    BACKEND_CONN_WINDOW, BACKEND_INITIAL_WINDOW, BACKEND_SETTINGS, BStream, Backend, Chunk, ConnId,
    Core, INITIAL_BACKEND_STREAMS, Io, MAX_ATTEMPTS, MAX_CONNS_PER_ENDPOINT, Origin, Up,
    state::State, unpool,
};
use crate::{
    endpoint::Endpoint,
    flow::{RecvWindow, SendWindow},
    frame::{self, Fragments, PeerSettings, Reason},
};

/// Prefix a header block with a table size update to 0 when the peer's
/// decoder table changed since our last block (RFC 7541 4.2).
pub(super) fn with_size_update(block: &bytes::Bytes, flag: &mut bool) -> bytes::Bytes {
    if !std::mem::take(flag) {
        return block.clone();
    }
    let mut b = BytesMut::with_capacity(block.len() + 1);
    b.extend_from_slice(&[0x20]);
    b.extend_from_slice(block);
    b.freeze()
}

impl Core {
    /// Send a client stream (its queued chunks start with the request's
    /// HEADERS) to an endpoint.
    pub(super) fn route(&mut self, c: ConnId, sid: u32) {
        let Some(client) = self.clients.get_mut(&c) else {
            return;
        };
        let vip = client.vip;
        let origin = client.origin;
        let Some(cs) = client.streams.get_mut(&sid) else {
            return;
        };
        let Some(ep) = (self.pick)(vip, &cs.tried) else {
            tracing::debug!(%vip, "no endpoint for a stream; refused");
            self.reset_client_stream(c, sid, Reason::REFUSED_STREAM);
            return;
        };
        cs.tried.push(ep.addr);
        cs.inflight = Some(ep.start());
        let b = self.connection_for(origin, ep);
        let cs = self.cstream(c, sid).expect("stream exists");
        cs.up = Up::Queued(b);
        let be = self.backends.get_mut(&b).expect("pooled backend exists");
        be.queue.push_back((c, sid));
        self.open_queued(b);
    }

    /// One of `origin`'s pooled connections to `ep` with a free stream
    /// slot, or a new one (up to [`MAX_CONNS_PER_ENDPOINT`]; past that, the
    /// least busy).
    fn connection_for(&mut self, origin: Origin, ep: Arc<Endpoint>) -> ConnId {
        let conns = self
            .pool
            .get(&(origin, ep.addr))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut least: Option<(usize, ConnId)> = None;
        for b in conns {
            let Some(be) = self.backends.get(b) else {
                continue;
            };
            let busy = be.streams.len() + be.queue.len();
            if busy < be.peer.max_streams {
                return *b;
            }
            if least.is_none_or(|(n, _)| busy < n) {
                least = Some((busy, *b));
            }
        }
        match least {
            Some((_, b)) if conns.len() >= MAX_CONNS_PER_ENDPOINT => b,
            _ => self.new_backend(origin, ep),
        }
    }

    fn new_backend(&mut self, origin: Origin, ep: Arc<Endpoint>) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = BytesMut::with_capacity(16 * 1024);
        out.extend_from_slice(frame::PREFACE);
        frame::settings(&mut out, &BACKEND_SETTINGS);
        frame::window_update(
            &mut out,
            0,
            (BACKEND_CONN_WINDOW - frame::DEFAULT_WINDOW) as u32,
        );
        let addr = ep.addr;
        ep.connections.fetch_add(1, Ordering::Relaxed);
        self.backends.insert(
            id,
            Backend {
                ep,
                origin,
                last_used: self.now,
                connected: false,
                settings_seen: false,
                started: self.now,
                retiring: false,
                write_failed: false,
                closing: false,
                resets: 0,
                probe: None,
                last_probe: None,
                last_heard: self.now,
                removal_probed: false,
                last_block: crate::hpack::LastBlock::default(),
                out,
                peer: PeerSettings::new(INITIAL_BACKEND_STREAMS),
                send: SendWindow::new(frame::DEFAULT_WINDOW),
                recv: RecvWindow::new(BACKEND_CONN_WINDOW),
                next_stream: 1,
                streams: super::Map::default(),
                queue: VecDeque::new(),
                fragments: Fragments::default(),
                blocked: Vec::new(),
            },
        );
        self.pool.entry((origin, addr)).or_default().push(id);
        self.io.push(Io::Connect { id, addr, origin });
        id
    }

    /// Give queued streams of a backend connection their stream ids and
    /// send their HEADERS, within its MAX_CONCURRENT_STREAMS.
    pub(super) fn open_queued(&mut self, b: ConnId) {
        loop {
            let Some(be) = self.backends.get_mut(&b) else {
                return;
            };
            if be.closing {
                return;
            }
            if be.retiring {
                // Nothing new starts here: requeue elsewhere.
                let queued: Vec<_> = be.queue.drain(..).collect();
                for (c, sid) in queued {
                    self.reroute(c, sid, b);
                }
                return;
            }
            if be.streams.len() >= be.peer.max_streams {
                return;
            }
            let Some(i) = self.next_queued(b) else {
                return;
            };
            let be = self.backends.get_mut(&b).expect("backend exists");
            let (c, sid) = be.queue.remove(i).expect("in the queue");
            if self.refused_by_pod_limit(c, sid, b) {
                continue;
            }
            let be = self.backends.get_mut(&b).expect("backend exists");
            let Some(cl) = self.clients.get_mut(&c) else {
                continue;
            };
            let Some(cs) = cl.streams.get_mut(&sid) else {
                continue;
            };
            if cs.up != Up::Queued(b) {
                continue;
            }
            be.last_used = self.now;
            let bid = be.next_stream;
            be.next_stream += 2;
            if i64::from(be.next_stream) > frame::MAX_WINDOW {
                // Ids ran out: this connection takes no more streams.
                be.retiring = true;
                let key = (be.origin, be.ep.addr);
                unpool(&mut self.pool, key, b);
            }
            let mut state = State::Open;
            cs.up = Up::Open(b, bid);
            cs.up_window = SendWindow::new(be.peer.init_window);
            // The window the backend may fill for this stream from the
            // start is part of its client's budget.
            cl.held += BACKEND_INITIAL_WINDOW;
            self.held += BACKEND_INITIAL_WINDOW;
            // The HEADERS go out now, whatever the output holds: ids must
            // reach the backend in increasing order.
            match cs.to_up.pop_front() {
                Some(Chunk::Headers { block, end }) => {
                    let fwd = with_size_update(&block, &mut be.peer.size_update);
                    frame::headers(&mut be.out, bid, &fwd, end, be.peer.max_frame);
                    if let Some(i) = &cs.inflight {
                        i.sent();
                    }
                    cs.replay.push(Chunk::Headers { block, end });
                    if end {
                        state.send_end();
                    }
                }
                other => {
                    // Cannot happen: a routed stream starts with HEADERS.
                    tracing::error!(?other, "routed stream without HEADERS");
                }
            }
            be.streams.insert(
                bid,
                BStream {
                    client: c,
                    sid,
                    state,
                    recv: RecvWindow::new(BACKEND_INITIAL_WINDOW),
                    response_seen: false,
                },
            );
            if be.connected {
                self.wake(b);
            }
            self.pump_up(c, sid);
        }
    }

    /// A stream left a backend connection unprocessed: route it again
    /// without counting an attempt (it was never sent).
    pub(super) fn reroute(&mut self, c: ConnId, sid: u32, from: ConnId) {
        let Some(cs) = self.cstream(c, sid) else {
            return;
        };
        if cs.up != Up::Queued(from) {
            return;
        }
        cs.inflight = None;
        cs.tried.pop();
        cs.up = Up::Done;
        self.route(c, sid);
    }

    /// Retry a stream a backend did not process, or reset it if that is
    /// no longer safe. Its backend stream is already gone (and its window
    /// out of the budget).
    pub(super) fn retry(&mut self, c: ConnId, sid: u32) {
        let Some(cs) = self.cstream(c, sid) else {
            return;
        };
        // Not a failure of the pod (REFUSED_STREAM, beyond its GOAWAY, or
        // no connection, which is counted once per connection).
        cs.inflight = None;
        let replay = if cs.responded || cs.tried.len() >= MAX_ATTEMPTS {
            None
        } else {
            cs.replay.take()
        };
        let Some(replay) = replay else {
            self.reset_client_stream(c, sid, Reason::REFUSED_STREAM);
            return;
        };
        tracing::debug!(tried = ?cs.tried, "stream not processed; retrying elsewhere");
        // The request again from the start: what went out, then what had
        // not yet.
        let mut chunks: VecDeque<Chunk> = replay.into();
        chunks.extend(cs.to_up.drain(..));
        cs.to_up = chunks;
        cs.replay = super::Replay::Keep {
            chunks: Vec::new(),
            bytes: 0,
        };
        cs.up = Up::Done;
        self.route(c, sid);
    }
}
