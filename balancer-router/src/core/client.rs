//! The client hop: frames from clients, the router as their HTTP/2
//! server. Everything a client sends is checked here before any of it can
//! reach a shared backend connection; a client's errors and floods end its
//! own streams or connection.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use super::{
    CStream, Chunk, Client, ConnId, Core, Drain, HARD_OUT_LIMIT, MAX_CLIENT_STREAMS,
    MAX_HEADER_LIST, Origin, Replay, STREAM_WINDOW, Up,
    calm::Calm,
    state::{Closed, Recent, State},
};
use crate::{
    error::Error,
    flow::{RecvWindow, SendWindow},
    frame::{self, Block, FrameHeader, PeerSettings, Priority, Reason, setting},
    hpack::{self, PreAck, Role},
};

/// DATA frames smaller than this join the chunk waiting before them...
const SMALL_DATA: usize = 1024;
/// ...up to this size (the default frame size: a merged chunk still goes
/// out in one frame).
const MERGED_DATA: usize = 16 * 1024;

/// `:status 431`: a literal without indexing on the static name `:status`.
const TOO_LARGE_431: &[u8] = &[0x08, 0x03, b'4', b'3', b'1'];

/// A request header list over [`MAX_HEADER_LIST`] but at most this is a
/// big request (a token, trace baggage) from a client that did not heed
/// our SETTINGS_MAX_HEADER_LIST_SIZE, refused on its stream alone; above
/// it, the client is abusing the router: GOAWAY ENHANCE_YOUR_CALM. Twice
/// our limit: a list that large is no honest misjudgement of one header
/// (and the hostile-client test's literal bomb, twice what we advertise,
/// must still end its connection).
pub const HEADER_LIST_BOMB: usize = 2 * MAX_HEADER_LIST;
/// A list over [`MAX_HEADER_LIST`] that is also more than this many times
/// its block's size as sent is an HPACK bomb whatever its size: static
/// table references (one byte for up to 60 bytes of list) or, before the
/// client's ACK, dynamic ones. Big honest lists are long literals, within
/// Huffman's 8/5 of their size on the wire.
pub const HPACK_EXPANSION_BOMB: usize = 8;
/// Before a pod's SETTINGS arrive its limit is unknown (and unlimited by
/// RFC 9113 6.5.2): requests whose header list is larger than this wait
/// for them on a new connection, so a pod that names a smaller limit
/// never receives one over it. 8 KiB: the smallest limit common gRPC
/// servers advertise (grpc-java's default; gRPC C-core's is 16 KiB).
pub const UNSETTLED_HEADER_LIST: usize = 8 * 1024;

// No string we let through is longer than nghttp2 pods take
// (`hpack::MAX_STRING`), which would end their whole connection.
const _: () = assert!(MAX_HEADER_LIST <= hpack::MAX_STRING);

/// What the router keeps of a request's header block: its decoded list's
/// size and whether it is gRPC, to check it against its pod's
/// SETTINGS_MAX_HEADER_LIST_SIZE and to refuse it the right way.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Head {
    pub list_size: usize,
    pub grpc: bool,
}

impl Head {
    fn of(info: &hpack::BlockInfo) -> Self {
        Self {
            list_size: info.list_size,
            grpc: info.grpc,
        }
    }
}

/// Whether a header list of `list` bytes decoded from `wire` bytes is a
/// bomb rather than a big request (see [`HEADER_LIST_BOMB`],
/// [`HPACK_EXPANSION_BOMB`]).
fn header_list_bomb(list: usize, wire: usize) -> bool {
    list > HEADER_LIST_BOMB
        || (list > MAX_HEADER_LIST && list > HPACK_EXPANSION_BOMB.saturating_mul(wire))
}

/// Answer client stream `sid` (whose request is `head`, over `limit`) with
/// [`too_large_answer`]; the stream ends there, and a request the client
/// has not ended is reset with NO_ERROR after it (RFC 9113 8.1).
fn answer_too_large(c: &mut Client, sid: u32, ended: bool, head: Head, limit: usize, whose: &str) {
    tracing::debug!(
        vip = %c.vip,
        stream = sid,
        list = head.list_size,
        limit,
        whose,
        grpc = head.grpc,
        "request header list over the limit; refused on its stream"
    );
    let block = too_large_answer(head, limit, whose);
    frame::headers(&mut c.out, sid, &block, true, c.peer.max_frame);
    if ended {
        c.recent.insert(sid, Closed::Ended);
    } else {
        frame::rst(&mut c.out, sid, Reason::NO_ERROR);
        c.recent.insert(sid, Closed::ByUs);
    }
}

/// Append a literal without indexing (RFC 7541 6.2.2), no Huffman: on
/// static name `index` (1 to 14), or on a literal `name` if `index` is 0.
/// Strings are shorter than 127 bytes (one-byte lengths).
fn literal(out: &mut Vec<u8>, index: u8, name: &[u8], value: &[u8]) {
    debug_assert!(index < 15 && name.len() < 127 && value.len() < 127);
    out.push(index);
    if index == 0 {
        out.push(name.len() as u8);
        out.extend_from_slice(name);
    }
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

/// The answer to a request whose header list is over a limit (`limit`,
/// `whose`), as its server would answer it, ending the stream: for gRPC a
/// Trailers-Only response (`:status 200`, `content-type:
/// application/grpc`, `grpc-status: 8` RESOURCE_EXHAUSTED and a
/// `grpc-message`), which a gRPC client reports as such; for anything
/// else 431 Request Header Fields Too Large (RFC 6585).
fn too_large_answer(head: Head, limit: usize, whose: &str) -> Vec<u8> {
    if !head.grpc {
        return TOO_LARGE_431.to_vec();
    }
    let mut b = Vec::with_capacity(128);
    // `:status 200` is static entry 8; `content-type` is static name 31,
    // which takes two bytes (15, then 16).
    b.push(0x88);
    b.extend_from_slice(&[0x0f, 0x10, 16]);
    b.extend_from_slice(b"application/grpc");
    literal(&mut b, 0, b"grpc-status", b"8");
    let message = format!(
        "request metadata of {} bytes exceeds the {whose}'s limit of {limit}",
        head.list_size
    );
    literal(&mut b, 0, b"grpc-message", message.as_bytes());
    b
}

/// The end of a gRPC stream whose pod connection was lost after the pod
/// may have processed it: `grpc-status: 14` UNAVAILABLE, as the client
/// would see at L4 when its connection dies. Trailers after a response
/// the pod began (`response_seen`), else a Trailers-Only response.
pub(super) fn grpc_unavailable(response_seen: bool, pod: std::net::SocketAddr) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    if !response_seen {
        b.push(0x88);
        b.extend_from_slice(&[0x0f, 0x10, 16]);
        b.extend_from_slice(b"application/grpc");
    }
    literal(&mut b, 0, b"grpc-status", b"14");
    let message = format!("connection to the pod at {pod} was lost");
    literal(&mut b, 0, b"grpc-message", message.as_bytes());
    b
}

impl Core {
    /// A client connection from the router's own namespace (see
    /// [`Core::add_client_from`]).
    pub fn add_client(&mut self, vip: std::net::SocketAddr) -> ConnId {
        self.add_client_from(vip, Origin::NODE)
    }

    /// A client connection that sent the HTTP/2 preface (it is still in
    /// the bytes the reader will hand over), whose streams go to pods over
    /// `origin`'s own pod connections. Our SETTINGS go out at once.
    pub fn add_client_from(&mut self, vip: std::net::SocketAddr, origin: Origin) -> ConnId {
        *self.origin_clients.entry(origin).or_default() += 1;
        let id = self.next_id;
        self.next_id += 1;
        let conn_window =
            (self.limits.client_buffer as i64).clamp(frame::DEFAULT_WINDOW, frame::MAX_WINDOW);
        let mut out = BytesMut::with_capacity(16 * 1024);
        frame::settings(
            &mut out,
            &[
                (setting::HEADER_TABLE_SIZE, 0),
                (setting::MAX_CONCURRENT_STREAMS, MAX_CLIENT_STREAMS),
                (setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW as u32),
                (setting::MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
            ],
        );
        if conn_window > frame::DEFAULT_WINDOW {
            frame::window_update(&mut out, 0, (conn_window - frame::DEFAULT_WINDOW) as u32);
        }
        self.clients.insert(
            id,
            Client {
                vip,
                origin,
                preface_done: false,
                settings_seen: false,
                out,
                closing: false,
                eof: false,
                pre_ack: Some(PreAck::default()),
                peer: PeerSettings::new(usize::MAX),
                send: SendWindow::new(frame::DEFAULT_WINDOW),
                recv: RecvWindow::new(conn_window),
                streams: super::Map::default(),
                last_stream: 0,
                fragments: frame::Fragments::default(),
                blocked: Vec::new(),
                drain: Drain::No,
                recent: Recent::default(),
                calm: Calm::default(),
                held: 0,
                out_data: 0,
                writing: 0,
                short: Vec::new(),
                last_block: hpack::LastBlock::default(),
                last_ping: None,
            },
        );
        self.wake(id);
        id
    }

    /// Whether the reader should go on reading this client.
    pub fn client_reading(&self, id: ConnId) -> bool {
        self.clients.get(&id).is_some_and(|c| !c.closing && !c.eof)
    }

    /// Streams open on a client connection (the tests' and the fuzz
    /// target's view).
    #[cfg(test)]
    pub fn client_streams(&self, id: ConnId) -> usize {
        self.clients.get(&id).map_or(0, |c| c.streams.len())
    }

    /// Response bytes a client makes the router hold (see
    /// [`super::Limits::client_buffer`]).
    pub fn client_held(&self, id: ConnId) -> i64 {
        self.clients.get(&id).map_or(0, |c| c.held)
    }

    /// Bytes the client sent.
    pub fn client_read(&mut self, id: ConnId, buf: &mut BytesMut) {
        let r = self.client_frames(id, buf).and_then(|()| {
            // Answers it made us queue (PING and SETTINGS ACKs, resets)
            // that it does not read.
            match self.clients.get(&id) {
                Some(c) if !c.closing && c.out.len() > HARD_OUT_LIMIT => Err(Calm::unread()),
                _ => Ok(()),
            }
        });
        if let Err(e) = r {
            // Stream errors are handled per frame; one that got here ends
            // the connection rather than the process.
            let (Error::Conn { reason, why } | Error::Stream { reason, why, .. }) = e;
            tracing::debug!(conn = id, %reason, why, "client connection error");
            self.client_error(id, reason);
            buf.clear();
        }
    }

    fn client_frames(&mut self, id: ConnId, buf: &mut BytesMut) -> Result<(), Error> {
        loop {
            let Some(c) = self.clients.get_mut(&id) else {
                buf.clear();
                return Ok(());
            };
            if c.closing {
                buf.clear();
                return Ok(());
            }
            if !c.preface_done {
                if buf.len() < frame::PREFACE.len() {
                    if !frame::PREFACE.starts_with(buf) {
                        return Err(Error::conn(Reason::PROTOCOL_ERROR, "bad preface"));
                    }
                    return Ok(());
                }
                if &buf[..frame::PREFACE.len()] != frame::PREFACE {
                    return Err(Error::conn(Reason::PROTOCOL_ERROR, "bad preface"));
                }
                buf.advance(frame::PREFACE.len());
                c.preface_done = true;
            }
            let Some((h, f)) = frame::next_frame(buf)? else {
                return Ok(());
            };
            frame::check_order(&h, &mut c.settings_seen, c.fragments.in_progress())?;
            match self.client_frame(id, h, f) {
                Ok(()) => {}
                Err(Error::Stream {
                    stream,
                    reason,
                    why,
                }) => {
                    tracing::debug!(conn = id, stream, %reason, why, "client stream error");
                    self.client_stream_error(id, stream, reason)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One frame from client `id`: a dispatch on its type, as `h2` does.
    fn client_frame(&mut self, id: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        match h.kind {
            frame::DATA => self.client_data(id, h, p),
            frame::HEADERS | frame::CONTINUATION => self.client_headers(id, h, p),
            frame::PRIORITY => self.client_priority(id, h, &p),
            frame::RST_STREAM => self.client_rst_stream(id, h, &p),
            frame::SETTINGS => self.client_settings(id, h, &p),
            frame::PUSH_PROMISE => Err(Error::conn(
                Reason::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            )),
            frame::PING => self.client_ping(id, h, &p),
            frame::GOAWAY => self.client_goaway(id, h),
            frame::WINDOW_UPDATE => self.client_window_update(id, h, &p),
            // Unknown frame types are ignored (RFC 9113 4.1), but not free.
            _ => self.client(id).calm.control(1),
        }
    }

    fn client(&mut self, id: ConnId) -> &mut Client {
        self.clients.get_mut(&id).expect("client exists")
    }

    /// HEADERS or CONTINUATION: a piece of a header block; the block, once
    /// whole, goes to `client_block`.
    fn client_headers(&mut self, id: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        match self.client(id).fragments.push(h, p)? {
            Some(block) => self.client_block(id, block),
            None => Ok(()),
        }
    }

    fn client_priority(&mut self, id: ConnId, h: FrameHeader, p: &[u8]) -> Result<(), Error> {
        if h.stream == 0 {
            return Err(Error::conn(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
        }
        self.client(id).calm.control(1)?;
        if h.length != 5 {
            return Err(Error::stream(
                h.stream,
                Reason::FRAME_SIZE_ERROR,
                "PRIORITY length",
            ));
        }
        if Priority::parse(p).dependency == h.stream {
            return Err(Error::stream(
                h.stream,
                Reason::PROTOCOL_ERROR,
                "stream depends on itself",
            ));
        }
        Ok(())
    }

    fn client_rst_stream(&mut self, id: ConnId, h: FrameHeader, p: &[u8]) -> Result<(), Error> {
        let c = self.client(id);
        if h.stream == 0 || h.stream > c.last_stream || h.stream.is_multiple_of(2) {
            return Err(Error::conn(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on an idle stream",
            ));
        }
        let reason = frame::reason_at(p, 0);
        let Some(cs) = c.streams.remove(&h.stream) else {
            // Closed already: ignored (5.1), but not free.
            return c.calm.control(1);
        };
        c.recent.insert(
            h.stream,
            if cs.state.recv_closed() {
                Closed::Ended
            } else {
                Closed::ByPeer
            },
        );
        // A reset before any response is the shape of a rapid
        // reset (CVE-2023-44487); one that we pass on to a pod
        // spends that pod connection's reset budget, which all
        // clients share: both count.
        let costly = !cs.responded || matches!(cs.up, Up::Open(..));
        let r = if costly { c.calm.reset() } else { Ok(()) };
        self.drop_stream(id, h.stream, cs, reason);
        self.after_stream_end(id);
        r
    }

    fn client_ping(&mut self, id: ConnId, h: FrameHeader, p: &[u8]) -> Result<(), Error> {
        if h.stream != 0 {
            return Err(Error::conn(Reason::PROTOCOL_ERROR, "PING on a stream"));
        }
        let c = self.client(id);
        c.calm.control(1)?;
        let payload: [u8; 8] = p[..8].try_into().expect("8 bytes");
        if h.flags & frame::FLAG_ACK == 0 {
            frame::ping(&mut c.out, true, payload);
            self.wake(id);
            self.client_pinged(id);
        } else if payload == super::DRAIN_PING && c.drain == Drain::Pinged {
            self.drain_final(id);
        }
        Ok(())
    }

    fn client_goaway(&mut self, id: ConnId, h: FrameHeader) -> Result<(), Error> {
        if h.stream != 0 {
            return Err(Error::conn(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
        }
        // The client opens no more streams; the open ones finish.
        self.client(id).calm.control(1)
    }

    fn client_window_update(&mut self, id: ConnId, h: FrameHeader, p: &[u8]) -> Result<(), Error> {
        let now = self.now;
        let c = self.client(id);
        c.calm.control(1)?;
        let inc = i64::from(frame::u31(p));
        if h.stream == 0 {
            c.send.connection_update(inc)?;
            self.unblock_down(id);
            return Ok(());
        }
        if h.stream > c.last_stream || h.stream.is_multiple_of(2) {
            return Err(Error::conn(
                Reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE on an idle stream",
            ));
        }
        let Some(cs) = c.streams.get_mut(&h.stream) else {
            // A closed stream: ignored (5.1).
            return Ok(());
        };
        if inc == 0 {
            return Err(Error::stream(
                h.stream,
                Reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE of 0",
            ));
        }
        cs.down_window.adjust(inc).map_err(|_| {
            Error::stream(
                h.stream,
                Reason::FLOW_CONTROL_ERROR,
                "stream window overflow",
            )
        })?;
        cs.last_active = now;
        self.pump_down(id, h.stream);
        Ok(())
    }

    fn client_settings(&mut self, id: ConnId, h: FrameHeader, p: &[u8]) -> Result<(), Error> {
        if h.stream != 0 {
            return Err(Error::conn(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        let c = self.clients.get_mut(&id).expect("client exists");
        if h.flags & frame::FLAG_ACK != 0 {
            if c.pre_ack.is_none() {
                // We sent one SETTINGS; more ACKs are cheap frames.
                return c.calm.control(1);
            }
            // From here on the client's header blocks use no dynamic
            // table: forward them as they are.
            c.pre_ack = None;
            return Ok(());
        }
        c.calm.control(super::calm::SETTINGS_COST)?;
        let delta = c.peer.apply(p)?;
        frame::settings_ack(&mut c.out);
        self.wake(id);
        if delta != 0 {
            let c = self.clients.get_mut(&id).expect("client exists");
            for cs in c.streams.values_mut() {
                // RFC 9113 6.9.2: an overflow here is a connection error.
                cs.down_window.adjust(delta).map_err(|_| {
                    Error::conn(Reason::FLOW_CONTROL_ERROR, "stream window overflow")
                })?;
            }
            if delta > 0 {
                let sids: Vec<u32> = c.streams.keys().copied().collect();
                for sid in sids {
                    self.pump_down(id, sid);
                }
            }
        }
        Ok(())
    }

    fn client_data(&mut self, id: ConnId, h: FrameHeader, p: Bytes) -> Result<(), Error> {
        if h.stream == 0 {
            return Err(Error::conn(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let now = self.now;
        let len = i64::from(h.length);
        let c = self.clients.get_mut(&id).expect("client exists");
        c.recv
            .consume(len)
            .map_err(|_| Error::conn(Reason::FLOW_CONTROL_ERROR, "connection window exceeded"))?;
        let (s, e) = frame::unpadded(h.kind, h.flags, &p)
            .ok_or(Error::conn(Reason::PROTOCOL_ERROR, "DATA padding"))?;
        let end = h.flags & frame::FLAG_END_STREAM != 0;
        if s == e && !end {
            // Empty DATA does nothing for anyone (CVE-2019-9518).
            c.calm.control(1)?;
        }
        let Some(cs) = c.streams.get_mut(&h.stream) else {
            if h.stream > c.last_stream || h.stream.is_multiple_of(2) {
                return Err(Error::conn(
                    Reason::PROTOCOL_ERROR,
                    "DATA on an idle stream",
                ));
            }
            // Not useful to anyone: a cheap frame, whatever its size.
            c.calm.control(1)?;
            let how = c.recent.get(h.stream);
            // Whatever happens to the stream, its bytes count against the
            // connection window.
            self.credit_client(id, None, len);
            return match how {
                Some(Closed::Ended) => {
                    Err(Error::conn(Reason::STREAM_CLOSED, "DATA after END_STREAM"))
                }
                Some(Closed::ByPeer) => Err(Error::stream(
                    h.stream,
                    Reason::STREAM_CLOSED,
                    "DATA after RST_STREAM",
                )),
                Some(Closed::ByUs) | None => Ok(()),
            };
        };
        if cs.state.recv_closed() {
            self.credit_client(id, None, len);
            return Err(Error::stream(
                h.stream,
                Reason::STREAM_CLOSED,
                "DATA after END_STREAM",
            ));
        }
        if cs.recv.consume(len).is_err() {
            self.credit_client(id, None, len);
            return Err(Error::stream(
                h.stream,
                Reason::FLOW_CONTROL_ERROR,
                "stream window exceeded",
            ));
        }
        cs.last_active = now;
        if end {
            cs.state.recv_end();
        }
        if cs.up == Up::Done || (s == e && !end) {
            // Nobody takes it, or it carries nothing (an empty DATA frame
            // is not passed on: pods count them as a flood too).
            self.credit_client(id, Some(h.stream), len);
            self.finish_if_done(id, h.stream);
            return Ok(());
        }
        c.calm.useful();
        let data = p.slice(s..e);
        // A small frame behind one still waiting joins it: chunks cost
        // memory and work per frame, and one-byte frames must not make a
        // window's worth of them.
        match cs.to_up.back_mut() {
            Some(Chunk::Data {
                data: last,
                end: last_end,
                credit,
            }) if !*last_end
                && data.len() < SMALL_DATA
                && last.len() + data.len() <= MERGED_DATA =>
            {
                let mut m = std::mem::take(last).try_into_mut().unwrap_or_else(|b| {
                    let mut m = BytesMut::with_capacity(MERGED_DATA);
                    m.extend_from_slice(&b);
                    m
                });
                m.extend_from_slice(&data);
                *last = m.freeze();
                *credit += len;
                *last_end = end;
            }
            _ => cs.to_up.push_back(Chunk::Data {
                data,
                end,
                credit: len,
            }),
        }
        self.pump_up(id, h.stream);
        Ok(())
    }

    /// A complete header block: a new request, or a request's trailers.
    fn client_block(&mut self, id: ConnId, block: Block) -> Result<(), Error> {
        let now = self.now;
        let c = self.clients.get_mut(&id).expect("client exists");
        let Block {
            stream: sid,
            end_stream: end,
            priority,
            buf,
        } = block;
        // Its size as sent tells a bomb: taken before re-encoding, as a
        // small block can expand through the client's table.
        let wire = buf.len();
        // Decode while the client may use its table (into literals that
        // need none); either way what goes on is checked whole below.
        let buf = match &mut c.pre_ack {
            Some(dec) => dec.reencode(&buf).map_err(|e| match e {
                // A small block that expands through the table past
                // what the decoder will build.
                hpack::HpackError::TooLarge => {
                    Error::conn(Reason::ENHANCE_YOUR_CALM, "header list bomb")
                }
                e => Error::block(sid, &hpack::BlockError::Compression(e)),
            })?,
            None => buf,
        };
        let existing = c.streams.get(&sid).map(|cs| cs.state);
        let role = if existing.is_some() {
            Role::RequestTrailers
        } else {
            Role::Request
        };
        let new = existing.is_none() && sid > c.last_stream;
        if new {
            if sid.is_multiple_of(2) {
                return Err(Error::conn(
                    Reason::PROTOCOL_ERROR,
                    "client stream id is even",
                ));
            }
            // The stream is open from here on, even if the request turns
            // out malformed (then it is reset).
            c.last_stream = sid;
        }
        if !new && existing.is_none() {
            // A stream that is gone: its late HEADERS (trailers) are an
            // error if the client ended or reset it, ignored if we did.
            return match c.recent.get(sid) {
                Some(Closed::Ended) => Err(Error::conn(
                    Reason::STREAM_CLOSED,
                    "HEADERS on a closed stream",
                )),
                Some(Closed::ByPeer) => Err(Error::stream(
                    sid,
                    Reason::STREAM_CLOSED,
                    "HEADERS after RST_STREAM",
                )),
                Some(Closed::ByUs) => Ok(()),
                None => Err(Error::conn(
                    Reason::PROTOCOL_ERROR,
                    "stream id lower than a previous one",
                )),
            };
        }
        // One field may be as large as the list allows (as sent: only a
        // Huffman code longer than its text, which no encoder chooses,
        // can pass the list's limit first).
        let limits = hpack::Limits {
            max_list: MAX_HEADER_LIST,
            max_string: MAX_HEADER_LIST,
        };
        let info = match c.last_block.check(&buf, role, limits, &mut self.scratch) {
            Ok(info) => info,
            Err(hpack::BlockError::TooLarge(info) | hpack::BlockError::FieldTooLarge(info))
                if header_list_bomb(info.list_size, wire) =>
            {
                return Err(Error::conn(Reason::ENHANCE_YOUR_CALM, "header list bomb"));
            }
            Err(hpack::BlockError::TooLarge(info) | hpack::BlockError::FieldTooLarge(info))
                if new =>
            {
                // A big request from a client that did not heed our
                // SETTINGS_MAX_HEADER_LIST_SIZE: refused on this stream
                // alone, as its server would.
                let c = self.clients.get_mut(&id).expect("client exists");
                answer_too_large(c, sid, end, Head::of(&info), MAX_HEADER_LIST, "router");
                self.wake(id);
                let c = self.clients.get_mut(&id).expect("client exists");
                return c.calm.reset();
            }
            Err(e) => {
                // Trailers too large end their stream (ENHANCE_YOUR_CALM).
                let e = Error::block(sid, &e);
                if new && matches!(e, Error::Stream { .. }) {
                    c.recent.insert(sid, Closed::ByUs);
                    if end {
                        c.recent.insert(sid, Closed::Ended);
                    }
                }
                return Err(e);
            }
        };
        if priority.is_some_and(|p| p.dependency == sid) {
            return Err(Error::stream(
                sid,
                Reason::PROTOCOL_ERROR,
                "stream depends on itself",
            ));
        }
        if let Some(state) = existing {
            // Trailers.
            if state.recv_closed() {
                return Err(Error::stream(
                    sid,
                    Reason::STREAM_CLOSED,
                    "HEADERS after END_STREAM",
                ));
            }
            if !end {
                return Err(Error::stream(
                    sid,
                    Reason::PROTOCOL_ERROR,
                    "trailers without END_STREAM",
                ));
            }
            let cs = c.streams.get_mut(&sid).expect("exists");
            if let Up::Open(b, _) | Up::Queued(b) = cs.up
                && self
                    .backends
                    .get(&b)
                    .is_some_and(|be| info.list_size > be.peer.max_header_list)
            {
                return Err(Error::stream(
                    sid,
                    Reason::ENHANCE_YOUR_CALM,
                    "trailers over the pod's header list limit",
                ));
            }
            cs.state.recv_end();
            cs.last_active = now;
            if cs.up == Up::Done {
                self.finish_if_done(id, sid);
                return Ok(());
            }
            cs.to_up.push_back(Chunk::Headers { block: buf, end });
            self.pump_up(id, sid);
            return Ok(());
        }
        if let Drain::Final(last) = c.drain
            && sid > last
        {
            // Above our final GOAWAY: ignored (6.8).
            return Ok(());
        }
        if c.streams.len() >= MAX_CLIENT_STREAMS as usize {
            frame::rst(&mut c.out, sid, Reason::REFUSED_STREAM);
            c.recent.insert(sid, Closed::ByUs);
            self.wake(id);
            let c = self.clients.get_mut(&id).expect("client exists");
            return c.calm.reset();
        }
        c.calm.useful();
        let init = c.peer.init_window;
        let mut state = State::Open;
        if end {
            state.recv_end();
        }
        c.streams.insert(
            sid,
            CStream {
                state,
                up: Up::Done,
                inflight: None,
                tried: Vec::new(),
                to_up: VecDeque::from([Chunk::Headers { block: buf, end }]),
                up_window: SendWindow::new(0),
                replay: Replay::Keep {
                    chunks: Vec::new(),
                    bytes: 0,
                },
                recv: RecvWindow::new(STREAM_WINDOW),
                to_down: VecDeque::new(),
                down_bytes: 0,
                down_window: SendWindow::new(init),
                responded: false,
                rst_after_down: false,
                short: false,
                blocked_up: false,
                blocked_down: false,
                last_active: now,
                head: Head::of(&info),
            },
        );
        self.route(id, sid);
        Ok(())
    }

    /// Where in backend `b`'s queue the next stream to open is: the
    /// first, but a request too large to send before the pod's SETTINGS
    /// (which may name a smaller limit: over [`UNSETTLED_HEADER_LIST`])
    /// waits for them. A stream that is gone or moved is taken (and then
    /// skipped).
    pub(super) fn next_queued(&self, b: ConnId) -> Option<usize> {
        let be = self.backends.get(&b)?;
        be.queue.iter().position(|(c, sid)| {
            be.settings_seen
                || self
                    .clients
                    .get(c)
                    .and_then(|cl| cl.streams.get(sid))
                    .is_none_or(|cs| {
                        cs.up != Up::Queued(b) || cs.head.list_size <= UNSETTLED_HEADER_LIST
                    })
        })
    }

    /// Whether queued request `sid` of client `c` is over the header list
    /// limit backend `b` advertised; if so it is refused (see
    /// [`too_large_answer`]), and never sent there.
    pub(super) fn refused_by_pod_limit(&mut self, c: ConnId, sid: u32, b: ConnId) -> bool {
        let Some(limit) = self.backends.get(&b).map(|be| be.peer.max_header_list) else {
            return false;
        };
        // Most pods name no limit, or one no smaller than ours, which
        // every request we took is within.
        if limit >= MAX_HEADER_LIST {
            return false;
        }
        let Some(cl) = self.clients.get_mut(&c) else {
            return false;
        };
        if cl
            .streams
            .get(&sid)
            .is_none_or(|cs| cs.head.list_size <= limit)
        {
            return false;
        }
        let mut cs = cl.streams.remove(&sid).expect("present");
        // Not the pod's failure: it never saw the request.
        cs.inflight = None;
        cs.up = Up::Done;
        answer_too_large(cl, sid, cs.state.recv_closed(), cs.head, limit, "pod");
        self.wake(c);
        self.drop_stream(c, sid, cs, Reason::CANCEL);
        self.after_stream_end(c);
        true
    }

    /// A stream error on a client's stream: RST_STREAM to the client, the
    /// backend's side cancelled. Resets the client provokes count towards
    /// its reset limit (CVE-2025-8671).
    fn client_stream_error(&mut self, id: ConnId, sid: u32, reason: Reason) -> Result<(), Error> {
        let Some(c) = self.clients.get_mut(&id) else {
            return Ok(());
        };
        c.calm.reset()?;
        if let Some(cs) = c.streams.get(&sid) {
            let how = if cs.state.recv_closed() {
                Closed::Ended
            } else {
                Closed::ByUs
            };
            c.recent.insert(sid, how);
            self.reset_client_stream(id, sid, reason);
        } else {
            if c.recent.get(sid).is_none() {
                c.recent.insert(sid, Closed::ByUs);
            }
            frame::rst(&mut c.out, sid, reason);
            self.wake(id);
        }
        Ok(())
    }

    /// A connection error on a client: GOAWAY with `reason`, then close.
    fn client_error(&mut self, id: ConnId, reason: Reason) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        frame::goaway(&mut c.out, c.last_stream, reason);
        self.close_client(id);
    }

    /// End every stream of a client and close it once its output is out.
    pub(super) fn close_client(&mut self, id: ConnId) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        c.closing = true;
        c.blocked.clear();
        c.short.clear();
        let streams: Vec<(u32, CStream)> = c.streams.drain().collect();
        for (sid, cs) in streams {
            self.drop_stream(id, sid, cs, Reason::CANCEL);
        }
        self.wake(id);
    }

    /// The client closed its side: streams in flight finish.
    pub fn client_eof(&mut self, id: ConnId) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.eof = true;
            self.after_stream_end(id);
        }
    }

    /// The client's socket failed: nothing more can reach it.
    pub fn client_gone(&mut self, id: ConnId) {
        self.close_client(id);
        if let Some(c) = self.clients.get_mut(&id) {
            c.out.clear();
        }
    }

    /// Start a graceful drain of a client: GOAWAY(2^31-1) and a PING.
    pub fn client_drain(&mut self, id: ConnId) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.drain != Drain::No || c.closing {
            return;
        }
        frame::goaway(&mut c.out, frame::MAX_WINDOW as u32, Reason::NO_ERROR);
        frame::ping(&mut c.out, false, super::DRAIN_PING);
        c.drain = Drain::Pinged;
        self.wake(id);
    }

    /// The drain's second phase (on the PING's ACK, or after a timeout):
    /// GOAWAY with the last stream id really accepted.
    pub fn drain_final(&mut self, id: ConnId) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.drain != Drain::Pinged || c.closing {
            return;
        }
        frame::goaway(&mut c.out, c.last_stream, Reason::NO_ERROR);
        c.drain = Drain::Final(c.last_stream);
        self.wake(id);
        self.after_stream_end(id);
    }

    /// Close a client whose work is over (drained or half-closed, and no
    /// stream left).
    pub(super) fn after_stream_end(&mut self, id: ConnId) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        if c.streams.is_empty() && !c.closing && (c.eof || matches!(c.drain, Drain::Final(_))) {
            self.close_client(id);
        }
    }

    /// Remove a client stream whose work is over on both hops.
    pub(super) fn finish_if_done(&mut self, c: ConnId, sid: u32) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        let Some(cs) = cl.streams.get(&sid) else {
            return;
        };
        if cs.state == State::Closed && cs.to_down.is_empty() && cs.up == Up::Done {
            let cs = cl.streams.remove(&sid).expect("present");
            cl.recent.insert(
                sid,
                if cs.rst_after_down {
                    Closed::ByUs
                } else {
                    Closed::Ended
                },
            );
            cl.calm.completed();
            self.drop_stream(c, sid, cs, Reason::CANCEL);
            self.after_stream_end(c);
        }
    }

    /// Reset a client's stream (RST_STREAM `reason`) and end its backend
    /// side.
    pub(super) fn reset_client_stream(&mut self, c: ConnId, sid: u32, reason: Reason) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        let Some(cs) = cl.streams.remove(&sid) else {
            return;
        };
        if cl.recent.get(sid).is_none() {
            cl.recent.insert(
                sid,
                if cs.state.recv_closed() {
                    Closed::Ended
                } else {
                    Closed::ByUs
                },
            );
        }
        frame::rst(&mut cl.out, sid, reason);
        self.wake(c);
        self.drop_stream(c, sid, cs, Reason::CANCEL);
        self.after_stream_end(c);
    }

    /// A client stream is gone (reset by either side, finished, or its
    /// connection closed): cancel its backend stream with `cancel` if that
    /// is still open, and give back the flow-control credit and the budget
    /// of what it still held.
    pub(super) fn drop_stream(&mut self, c: ConnId, sid: u32, cs: CStream, cancel: Reason) {
        let held_up: i64 = cs.to_up.iter().map(Chunk::credit).sum();
        self.credit_client(c, None, held_up);
        let mut released = cs.down_bytes;
        if let Up::Open(b, bid) = cs.up {
            let mut reset = false;
            if let Some(be) = self.backends.get_mut(&b)
                && let Some(bs) = be.streams.remove(&bid)
            {
                released += bs.recv.available();
                reset = bs.state != State::Closed;
            }
            if reset {
                self.reset_backend_stream(b, bid, cancel);
            }
            self.after_bstream(b);
        }
        self.release(c, released);
        if cs.short
            && let Some(cl) = self.clients.get_mut(&c)
        {
            cl.short.retain(|s| *s != sid);
        }
    }
}
