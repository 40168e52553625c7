//! The backend hop: pooled connections to pods, the router as their
//! HTTP/2 client. A pod's errors end its own connection or stream; what
//! reaches a client from it is checked like what reaches a pod from a
//! client.

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};

use super::{
    BStream, Chunk, ConnId, Core, MAX_RESPONSE_HEADER_LIST, Up, client, state::State, unpool,
};
use crate::{
    accrual::Failure,
    error::Error,
    frame::{self, Block, FrameHeader, Reason},
    hpack::{self, Role},
    stats,
};

impl Core {
    /// The TCP connection of backend `b` is up: its queued output goes.
    pub fn backend_connected(&mut self, b: ConnId) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        be.connected = true;
        for bs in be.streams.values() {
            if let Some(i) = self
                .clients
                .get(&bs.client)
                .and_then(|cl| cl.streams.get(&bs.sid))
                .and_then(|cs| cs.inflight.as_ref())
            {
                i.sent();
            }
        }
        self.wake(b);
    }

    /// Backend `b` could not be reached (or never spoke HTTP/2): nothing
    /// reached it, so all its streams are retried elsewhere.
    pub fn backend_connect_failed(&mut self, b: ConnId) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        tracing::debug!(endpoint = %be.ep.addr, "backend connection failed");
        be.ep.failed(Failure::Connect, self.now);
        self.backend_gone(b);
    }

    /// Backend `b`'s connection ended (closed, failed, or we closed it).
    pub(super) fn backend_gone(&mut self, b: ConnId) {
        let Some(mut be) = self.backends.remove(&b) else {
            return;
        };
        be.ep.connections.fetch_sub(1, Ordering::Relaxed);
        let key = (be.origin, be.ep.addr);
        unpool(&mut self.pool, key, b);
        // Streams may have been processed only by a backend that spoke
        // HTTP/2 to us.
        let spoke = be.settings_seen;
        let queued: Vec<_> = be.queue.drain(..).collect();
        let streams: Vec<(u32, BStream)> = be.streams.drain().collect();
        for (c, sid) in queued {
            self.reroute(c, sid, b);
        }
        let now = self.now;
        for (bid, bs) in streams {
            self.release(bs.client, bs.recv.available());
            let Some(cs) = self.cstream(bs.client, bs.sid) else {
                continue;
            };
            if cs.up != Up::Open(b, bid) {
                continue;
            }
            cs.up = Up::Done;
            if !spoke {
                self.retry(bs.client, bs.sid);
            } else if bs.state.recv_closed() {
                // The whole response arrived; only the request's tail is lost.
                cs.inflight = None;
                cs.rst_after_down = true;
                self.pump_up(bs.client, bs.sid);
                self.pump_down(bs.client, bs.sid);
            } else {
                stats::BACKEND_CONN_RESETS.fetch_add(1, Ordering::Relaxed);
                if let Some(i) = cs.inflight.take() {
                    i.failed(Failure::ConnectionLost, now);
                }
                if cs.head.grpc {
                    // What a gRPC client sees at L4 when its connection to
                    // the pod is lost: UNAVAILABLE, which retry policies
                    // retry (INTERNAL, from a bare RST_STREAM, they do not).
                    // After what the pod sent, as the end of its response.
                    let block = client::grpc_unavailable(bs.response_seen, be.ep.addr);
                    cs.to_down.push_back(Chunk::Headers {
                        block: block.into(),
                        end: true,
                    });
                    cs.rst_after_down = true;
                    self.pump_down(bs.client, bs.sid);
                } else {
                    self.reset_client_stream(bs.client, bs.sid, Reason::INTERNAL_ERROR);
                }
            }
        }
        self.io.retain(|io| *io != Io::Wake(b));
        // Let its writer see that the core forgot it, and close the socket.
        self.io.push(Io::Wake(b));
    }

    /// Close a backend connection on a protocol error of its own.
    fn backend_error(&mut self, b: ConnId, reason: Reason, why: &'static str) {
        if let Some(be) = self.backends.get_mut(&b) {
            tracing::warn!(endpoint = %be.ep.addr, %reason, why, "backend connection error");
            frame::goaway(&mut be.out, 0, reason);
            be.closing = true;
            let key = (be.origin, be.ep.addr);
            unpool(&mut self.pool, key, b);
            self.wake(b);
        }
    }

    /// Bytes backend `b` sent.
    pub fn backend_read(&mut self, b: ConnId, buf: &mut BytesMut) {
        let now = self.now;
        if let Some(be) = self.backends.get_mut(&b) {
            be.last_heard = now;
        }
        if let Err(Error::Conn { reason, why }) = self.backend_frames(b, buf) {
            self.backend_error(b, reason, why);
            buf.clear();
        }
    }

    /// The backend closed its side (or its socket failed).
    pub fn backend_eof(&mut self, b: ConnId) {
        self.backend_gone(b);
    }

    pub fn backend_reading(&self, b: ConnId) -> bool {
        self.backends.get(&b).is_some_and(|be| !be.closing)
    }

    fn backend_frames(&mut self, b: ConnId, buf: &mut BytesMut) -> Result<(), Error> {
        loop {
            let Some(be) = self.backends.get_mut(&b) else {
                buf.clear();
                return Ok(());
            };
            if be.closing {
                buf.clear();
                return Ok(());
            }
            let Some((h, f)) = frame::next_frame(buf)? else {
                return Ok(());
            };
            if !be.settings_seen {
                // Its SETTINGS name its limit, or there is none.
                be.peer.max_streams = usize::MAX;
            }
            frame::check_order(&h, &mut be.settings_seen, be.fragments.in_progress())?;
            match self.backend_frame(b, h, f) {
                Ok(()) => {}
                Err(Error::Stream {
                    stream,
                    reason,
                    why,
                }) => {
                    tracing::debug!(conn = b, stream, %reason, why, "backend stream error");
                    self.backend_stream_error(b, stream, reason);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A stream error on a backend stream: RST_STREAM to the backend, and
    /// the client's stream reset (the client did nothing wrong).
    fn backend_stream_error(&mut self, b: ConnId, bid: u32, reason: Reason) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        let bs = be.streams.remove(&bid);
        self.reset_backend_stream(b, bid, reason);
        if let Some(bs) = bs {
            self.release(bs.client, bs.recv.available());
            if let Some(cs) = self.cstream(bs.client, bs.sid) {
                cs.up = Up::Done;
                if let Some(i) = cs.inflight.take() {
                    i.failed(Failure::Reset, self.now);
                }
            }
            self.reset_client_stream(bs.client, bs.sid, Reason::INTERNAL_ERROR);
            self.after_bstream(b);
        }
    }

    /// One frame from backend `b`, which exists, past the checks every
    /// frame gets in `backend_frames` (its size; SETTINGS first; nothing but
    /// CONTINUATION inside a header block): each type to its own method.
    fn backend_frame(&mut self, b: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        match h.kind {
            frame::DATA => self.backend_data(b, h, p),
            frame::HEADERS | frame::CONTINUATION => self.backend_headers(b, h, p),
            frame::RST_STREAM => self.backend_rst_stream(b, h, p),
            frame::SETTINGS => self.backend_settings(b, h, p),
            frame::PING => self.backend_ping(b, h, p),
            frame::GOAWAY => self.backend_goaway(b, h, p),
            frame::WINDOW_UPDATE => self.backend_window_update(b, h, p),
            frame::PUSH_PROMISE => Err(Error::conn(
                Reason::PROTOCOL_ERROR,
                "PUSH_PROMISE with push disabled",
            )),
            _ => Ok(()),
        }
    }

    /// DATA from a pod: passed on to its client's stream, less padding.
    fn backend_data(&mut self, b: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        let now = self.now;
        let be = self.backends.get_mut(&b).expect("backend exists");
        if h.stream == 0 {
            return Err(Error::conn(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let len = i64::from(h.length);
        be.recv
            .consume(len)
            .map_err(|_| Error::conn(Reason::FLOW_CONTROL_ERROR, "connection window exceeded"))?;
        let (s, e) = frame::unpadded(h.kind, h.flags, &p)
            .ok_or(Error::conn(Reason::PROTOCOL_ERROR, "DATA padding"))?;
        let end = h.flags & frame::FLAG_END_STREAM != 0;
        self.credit_backend_conn(b, len);
        let be = self.backends.get_mut(&b).expect("backend exists");
        let Some(bs) = be.streams.get_mut(&h.stream) else {
            // A stream we reset.
            return Ok(());
        };
        if bs.state.recv_closed() {
            return Err(Error::stream(
                h.stream,
                Reason::STREAM_CLOSED,
                "DATA after END_STREAM",
            ));
        }
        if !bs.response_seen {
            return Err(Error::stream(
                h.stream,
                Reason::PROTOCOL_ERROR,
                "DATA before the response HEADERS",
            ));
        }
        if bs.recv.consume(len).is_err() {
            return Err(Error::stream(
                h.stream,
                Reason::FLOW_CONTROL_ERROR,
                "stream window exceeded",
            ));
        }
        if end {
            bs.state.recv_end();
        }
        let (c, sid) = (bs.client, bs.sid);
        // Padding is not passed on: out of the budget at once.
        let padding = len - (e - s) as i64;
        let data = p.slice(s..e);
        let Some(cs) = self.cstream(c, sid) else {
            return Ok(());
        };
        cs.responded = true;
        cs.last_active = now;
        if data.is_empty() && !end {
            // Nothing to pass on; clients count empty frames as a
            // flood too.
            self.release(c, padding);
            self.grant(c, sid);
            return Ok(());
        }
        cs.down_bytes += len - padding;
        cs.to_down.push_back(Chunk::Data {
            data,
            end,
            credit: len - padding,
        });
        self.release(c, padding);
        self.pump_down(c, sid);
        // A chunk its client cannot take now is copied out of the
        // read buffer, which holds other streams' frames too: a
        // client that does not read must not pin them all. (What is
        // left queued ends with this chunk: the queue is FIFO.)
        if let Some(cs) = self.cstream(c, sid)
            && let Some(Chunk::Data { data, .. }) = cs.to_down.back_mut()
            && !data.is_empty()
        {
            *data = Bytes::copy_from_slice(data);
        }
        if end {
            self.maybe_close_bstream(b, h.stream);
        }
        Ok(())
    }

    /// HEADERS or CONTINUATION from a pod: a header block is handled, by
    /// `backend_block`, once its last fragment is in.
    fn backend_headers(&mut self, b: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        let be = self.backends.get_mut(&b).expect("backend exists");
        match be.fragments.push(h, p)? {
            Some(block) => self.backend_block(b, block),
            None => Ok(()),
        }
    }

    /// RST_STREAM from a pod: a stream it refused before answering is
    /// retried; after the whole response only the request's tail is lost;
    /// otherwise the client's stream is reset with the pod's reason.
    fn backend_rst_stream(&mut self, b: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        let be = self.backends.get_mut(&b).expect("backend exists");
        if h.stream == 0 {
            return Err(Error::conn(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on stream 0",
            ));
        }
        let reason = frame::reason_at(&p, 0);
        let Some(bs) = be.streams.remove(&h.stream) else {
            return Ok(());
        };
        self.release(bs.client, bs.recv.available());
        let (c, sid) = (bs.client, bs.sid);
        let Some(cs) = self.cstream(c, sid) else {
            self.after_bstream(b);
            return Ok(());
        };
        cs.up = Up::Done;
        if reason == Reason::REFUSED_STREAM && !cs.responded {
            self.retry(c, sid);
        } else if bs.state.recv_closed() {
            // The response is complete; the backend wants no more
            // of the request (RFC 9113 8.1).
            cs.inflight = None;
            cs.rst_after_down = true;
            self.pump_up(c, sid);
            self.pump_down(c, sid);
        } else {
            if let Some(i) = cs.inflight.take()
                && !cs.responded
            {
                i.failed(Failure::Reset, self.now);
            }
            self.reset_client_stream(c, sid, reason);
        }
        self.after_bstream(b);
        Ok(())
    }

    /// SETTINGS from a pod: acknowledged, the change of its initial window
    /// applied to the streams it carries, and queued streams opened within
    /// its (maybe new) limit.
    fn backend_settings(&mut self, b: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        let be = self.backends.get_mut(&b).expect("backend exists");
        if h.stream != 0 {
            return Err(Error::conn(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if h.flags & frame::FLAG_ACK != 0 {
            return Ok(());
        }
        let delta = be.peer.apply(&p)?;
        frame::settings_ack(&mut be.out);
        let streams: Vec<(ConnId, u32)> =
            be.streams.values().map(|bs| (bs.client, bs.sid)).collect();
        self.wake(b);
        if delta != 0 {
            for (c, sid) in &streams {
                if let Some(cs) = self.cstream(*c, *sid) {
                    cs.up_window.adjust(delta).map_err(|_| {
                        Error::conn(Reason::FLOW_CONTROL_ERROR, "stream window overflow")
                    })?;
                }
            }
            for (c, sid) in streams {
                self.pump_up(c, sid);
            }
        }
        self.open_queued(b);
        Ok(())
    }

    /// PING from a pod: answered; the answer to our liveness probe clears it.
    fn backend_ping(&mut self, b: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        let be = self.backends.get_mut(&b).expect("backend exists");
        if h.stream != 0 {
            return Err(Error::conn(Reason::PROTOCOL_ERROR, "PING on a stream"));
        }
        let payload: [u8; 8] = p[..8].try_into().expect("8 bytes");
        if h.flags & frame::FLAG_ACK == 0 {
            frame::ping(&mut be.out, true, payload);
            self.wake(b);
        } else if payload == super::PROBE_PING {
            // Alive.
            be.probe = None;
        }
        Ok(())
    }

    /// GOAWAY from a pod: the connection takes no new streams, and those it
    /// says it did not process are retried.
    fn backend_goaway(&mut self, b: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        let be = self.backends.get_mut(&b).expect("backend exists");
        if h.stream != 0 {
            return Err(Error::conn(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
        }
        let last = frame::u31(&p);
        be.retiring = true;
        let key = (be.origin, be.ep.addr);
        unpool(&mut self.pool, key, b);
        tracing::debug!(endpoint = %be.ep.addr, last, "backend GOAWAY");
        // Streams above `last` were not processed (6.8).
        let above: Vec<u32> = be
            .streams
            .keys()
            .copied()
            .filter(|bid| *bid > last)
            .collect();
        let refused: Vec<BStream> = above
            .into_iter()
            .filter_map(|bid| be.streams.remove(&bid))
            .collect();
        for bs in refused {
            self.release(bs.client, bs.recv.available());
            if let Some(cs) = self.cstream(bs.client, bs.sid) {
                cs.up = Up::Done;
                self.retry(bs.client, bs.sid);
            }
        }
        self.after_bstream(b);
        Ok(())
    }

    /// WINDOW_UPDATE from a pod: more room to send it the connection's or a
    /// stream's request body.
    fn backend_window_update(&mut self, b: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        let now = self.now;
        let be = self.backends.get_mut(&b).expect("backend exists");
        let inc = i64::from(frame::u31(&p));
        if h.stream == 0 {
            be.send.connection_update(inc)?;
            self.unblock_up(b);
            return Ok(());
        }
        let Some(bs) = be.streams.get(&h.stream) else {
            return Ok(());
        };
        if inc == 0 {
            return Err(Error::stream(
                h.stream,
                Reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE of 0",
            ));
        }
        let (c, sid) = (bs.client, bs.sid);
        if let Some(cs) = self.cstream(c, sid) {
            cs.up_window.adjust(inc).map_err(|_| {
                Error::stream(
                    h.stream,
                    Reason::FLOW_CONTROL_ERROR,
                    "stream window overflow",
                )
            })?;
            cs.last_active = now;
            self.pump_up(c, sid);
        }
        Ok(())
    }

    fn backend_block(&mut self, b: ConnId, block: Block) -> Result<(), Error> {
        let now = self.now;
        let be = self.backends.get_mut(&b).expect("backend exists");
        let bs = be.streams.get(&block.stream);
        let role = match bs {
            Some(bs) if bs.response_seen => Role::ResponseTrailers,
            _ => Role::Response,
        };
        // Decoding errors are the connection's whatever the stream.
        // Clients are not nginx: a response's field may be as long as its
        // list allows.
        let limits = hpack::Limits {
            max_list: MAX_RESPONSE_HEADER_LIST,
            max_string: MAX_RESPONSE_HEADER_LIST,
        };
        let info = match be
            .last_block
            .check(&block.buf, role, limits, &mut self.scratch)
        {
            Ok(info) => info,
            Err(hpack::BlockError::Compression(_)) => {
                return Err(Error::conn(
                    Reason::COMPRESSION_ERROR,
                    "header block cannot be decoded",
                ));
            }
            Err(e) => {
                if bs.is_none() {
                    return Ok(());
                }
                tracing::debug!(error = %e, "malformed response");
                return Err(Error::stream(
                    block.stream,
                    Reason::PROTOCOL_ERROR,
                    "malformed response",
                ));
            }
        };
        let be = self.backends.get_mut(&b).expect("backend exists");
        let Some(bs) = be.streams.get_mut(&block.stream) else {
            // A stream we reset; or a push, which we disabled.
            if block.stream.is_multiple_of(2) || block.stream >= be.next_stream {
                return Err(Error::conn(
                    Reason::PROTOCOL_ERROR,
                    "HEADERS on a stream we did not open",
                ));
            }
            return Ok(());
        };
        if bs.state.recv_closed() {
            return Err(Error::stream(
                block.stream,
                Reason::STREAM_CLOSED,
                "HEADERS after END_STREAM",
            ));
        }
        let informational = info.status.is_some_and(|s| (100..200).contains(&s));
        if role == Role::ResponseTrailers && !block.end_stream {
            return Err(Error::stream(
                block.stream,
                Reason::PROTOCOL_ERROR,
                "trailers without END_STREAM",
            ));
        }
        if informational && block.end_stream {
            return Err(Error::stream(
                block.stream,
                Reason::PROTOCOL_ERROR,
                "1xx response with END_STREAM",
            ));
        }
        if !informational {
            bs.response_seen = true;
        }
        if block.end_stream {
            bs.state.recv_end();
        }
        let (c, sid) = (bs.client, bs.sid);
        if let Some(cs) = self.cstream(c, sid) {
            cs.last_active = now;
            if !cs.responded {
                cs.responded = true;
                if let Some(i) = &cs.inflight {
                    i.responded();
                }
            }
            // Judged by its first answer (once): a 5xx, or a gRPC
            // Trailers-Only failure, counts against the pod.
            if !informational && let Some(i) = &cs.inflight {
                match Failure::of_response(info.status, info.grpc_status, block.end_stream) {
                    Some(why) => i.failed(why, now),
                    None => i.succeeded(),
                }
            }
            cs.to_down.push_back(Chunk::Headers {
                block: block.buf,
                end: block.end_stream,
            });
            self.pump_down(c, sid);
        }
        if block.end_stream {
            self.maybe_close_bstream(b, block.stream);
        }
        Ok(())
    }

    /// A backend stream is over once both sides ended it.
    pub(super) fn maybe_close_bstream(&mut self, b: ConnId, bid: u32) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        let Some(bs) = be.streams.get(&bid) else {
            return;
        };
        if bs.state != State::Closed {
            return;
        }
        let bs = be.streams.remove(&bid).expect("present");
        self.release(bs.client, bs.recv.available());
        if let Some(cs) = self.cstream(bs.client, bs.sid) {
            cs.up = Up::Done;
            cs.inflight = None;
            cs.replay = super::Replay::Off;
        }
        self.after_bstream(b);
        self.finish_if_done(bs.client, bs.sid);
    }

    /// A stream left backend `b`: open waiting ones, or close the
    /// connection if it is retiring and idle.
    pub(super) fn after_bstream(&mut self, b: ConnId) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        let draining = be.ep.draining.load(Ordering::Relaxed);
        if draining && !be.retiring {
            be.retiring = true;
            let key = (be.origin, be.ep.addr);
            unpool(&mut self.pool, key, b);
        }
        if be.retiring && !be.queue.is_empty() {
            // Nothing new starts here: the queue moves elsewhere first.
            let queued: Vec<_> = be.queue.drain(..).collect();
            for (c, sid) in queued {
                self.reroute(c, sid, b);
            }
        }
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        if be.retiring && be.streams.is_empty() && be.queue.is_empty() {
            if !be.closing {
                frame::goaway(&mut be.out, 0, Reason::NO_ERROR);
                be.closing = true;
                if be.connected {
                    self.wake(b);
                } else {
                    self.backend_gone(b);
                }
            }
            return;
        }
        self.open_queued(b);
    }
}

use super::Io;
