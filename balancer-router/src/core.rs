//! The frame router's connection logic, without I/O.
//!
//! Every client connection and every pooled backend connection of the
//! router thread lives in one [`Core`]. The I/O tasks ([`super::io`]) hand
//! it the bytes they read and write out what it queued; the core parses
//! frames, routes each new client stream to an endpoint, and moves frames
//! between the two hops by stream id. Header blocks are forwarded as they
//! are, without HPACK decoding, when that is safe (see [`super::hpack`]):
//! the router never builds header maps.
//!
//! Per hop, by RFC 9113:
//! - connection and stream flow control are the router's own on each side.
//!   A frame's bytes are credited back to its sender (WINDOW_UPDATE) only
//!   once they were queued to the other hop within that hop's windows, so a
//!   slow reader on either side pushes back instead of growing buffers;
//! - stream ids: each backend connection numbers its streams 1, 3, 5...
//!   in the order their HEADERS go out, never reusing one; when they run
//!   out the connection is retired and a new one opened;
//! - MAX_CONCURRENT_STREAMS of a backend: streams beyond it wait in a queue;
//! - PING is answered locally; SETTINGS are acknowledged locally.
//!
//! Failures: a stream a backend did not process (REFUSED_STREAM, above the
//! last-stream-id of its GOAWAY, or queued on a connection that never
//! came up) is retried on another endpoint with its request replayed, as
//! long as no response reached the client and the body sent so far fits in
//! [`REPLAY_LIMIT`]. Anything else resets the client's stream.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
};

use bytes::{Buf, Bytes, BytesMut};

use crate::{
    endpoint::{Endpoint, InFlight},
    frame::{self, FrameHeader, HEADER_LEN, code, setting},
    hpack::{self, HpackError, PreAck},
};

pub type ConnId = u64;

/// Hashing for the router's maps, whose keys are small integers (our
/// connection ids, stream ids): SipHash was 4% of the router's profile.
/// A client picks its stream ids, but it has at most
/// [`MAX_CLIENT_STREAMS`] of them in its own map, so collisions it could
/// craft cost it, not others, little.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type Map<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// Request body kept for a retry.
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// Attempts per stream. Only unprocessed failures are retried, which is
/// always safe; a backend that closes every connection with GOAWAY after one
/// request under 16 concurrent streams needed more than 3 here.
pub const MAX_ATTEMPTS: usize = 8;
/// Windows the router grants, per stream and per connection, on each hop:
/// larger than the 64 KiB default so one stream can fill a fast link.
pub const STREAM_WINDOW: i64 = 1 << 20;
/// The stream window granted to backends. A pooled backend connection is
/// shared by every client, so its connection window is credited as soon
/// as bytes arrive (a client that does not read must not stall the others
/// on that backend); what one response may hold in the router is then
/// this window, until its client reads.
pub const BACKEND_STREAM_WINDOW: i64 = 256 << 10;
pub const CONN_WINDOW: i64 = 8 << 20;
/// Streams one client may have open at once.
pub const MAX_CLIENT_STREAMS: u32 = 1024;
/// A header block (HEADERS + CONTINUATION) larger than this is refused.
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Frames are only queued to a connection while its output holds less than
/// this; beyond it, streams wait until the socket took the bytes.
pub const SOFT_OUT_LIMIT: usize = 256 * 1024;
/// Assumed for a backend until its SETTINGS say otherwise (RFC 9113 says
/// unlimited; a backend that allows fewer refuses the extra streams, and
/// those are retried).
const INITIAL_BACKEND_STREAMS: usize = 100;
/// The payload of the PING of a graceful drain.
pub const DRAIN_PING: [u8; 8] = *b"lbdrain\0";
/// Our settings: no dynamic table (the point of the design), our windows,
/// and to backends no push.
const CLIENT_SETTINGS: [(u16, u32); 3] = [
    (setting::HEADER_TABLE_SIZE, 0),
    (setting::MAX_CONCURRENT_STREAMS, MAX_CLIENT_STREAMS),
    (setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW as u32),
];
const BACKEND_SETTINGS: [(u16, u32); 3] = [
    (setting::HEADER_TABLE_SIZE, 0),
    (setting::ENABLE_PUSH, 0),
    (setting::INITIAL_WINDOW_SIZE, BACKEND_STREAM_WINDOW as u32),
];

/// What the core asks of the I/O layer.
#[derive(Debug, PartialEq, Eq)]
pub enum Io {
    /// Open a TCP connection for backend `id`.
    Connect { id: ConnId, addr: SocketAddr },
    /// Connection `id` has output (or is to be closed).
    Wake(ConnId),
}

/// A connection error: the code for GOAWAY, and why (for the log).
#[derive(Debug)]
struct ConnError {
    code: u32,
    why: &'static str,
}

fn err(code: u32, why: &'static str) -> ConnError {
    ConnError { code, why }
}

impl From<HpackError> for ConnError {
    fn from(e: HpackError) -> Self {
        match e {
            HpackError::TooLarge => err(code::ENHANCE_YOUR_CALM, "header list too large"),
            _ => err(code::COMPRESSION_ERROR, "header block"),
        }
    }
}

/// A unit of a stream's traffic, queued for the other hop.
#[derive(Debug, Clone)]
enum Chunk {
    Headers {
        block: Bytes,
        end: bool,
    },
    /// `credit`: flow-control bytes to give back to the sender once this
    /// chunk is passed on (the frame's length, padding included).
    Data {
        data: Bytes,
        end: bool,
        credit: i64,
    },
}

/// Where a client stream's request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    /// Waiting in backend connection's queue for a stream slot.
    Queued(ConnId),
    /// Open on backend connection, as that stream id.
    Open(ConnId, u32),
    /// The backend side is over: later request bytes are dropped.
    Done,
}

struct CStream {
    up: Up,
    inflight: Option<InFlight>,
    tried: Vec<SocketAddr>,
    /// client -> backend
    to_up: VecDeque<Chunk>,
    up_window: i64,
    replay: Vec<Chunk>,
    replay_bytes: usize,
    replayable: bool,
    client_ended: bool,
    recv_window: i64,
    recv_credit: i64,
    /// backend -> client
    to_down: VecDeque<Chunk>,
    down_window: i64,
    responded: bool,
    down_ended: bool,
    /// Reset the client's stream with NO_ERROR once the response is out
    /// (the backend answered without reading the whole request, 8.1).
    rst_after_down: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    No,
    /// GOAWAY(2^31-1) and a PING went out.
    Pinged,
    /// GOAWAY with the real last stream id went out.
    Final(u32),
}

struct Block {
    stream: u32,
    end_stream: bool,
    /// A slice of the HEADERS frame (no copy); copied only when
    /// CONTINUATION frames extend it.
    buf: Bytes,
}

impl Block {
    fn extend(&mut self, more: &[u8]) {
        let mut b = BytesMut::with_capacity(self.buf.len() + more.len());
        b.extend_from_slice(&self.buf);
        b.extend_from_slice(more);
        self.buf = b.freeze();
    }
}

struct Client {
    vip: SocketAddr,
    preface_done: bool,
    settings_seen: bool,
    out: BytesMut,
    /// Flush `out`, then close.
    closing: bool,
    eof: bool,
    /// HPACK decoder until the client ACKed our SETTINGS.
    pre_ack: Option<PreAck>,
    /// The client's SETTINGS.
    peer: PeerSettings,
    send_window: i64,
    recv_window: i64,
    recv_credit: i64,
    streams: Map<u32, CStream>,
    last_stream: u32,
    block: Option<Block>,
    blocked: Vec<u32>,
    drain: Drain,
}

struct BStream {
    client: ConnId,
    sid: u32,
    recv_window: i64,
    recv_credit: i64,
    local_end: bool,
    remote_end: bool,
}

struct Backend {
    ep: Arc<Endpoint>,
    connected: bool,
    /// No new streams (GOAWAY received, ids ran out, endpoint left).
    retiring: bool,
    closing: bool,
    out: BytesMut,
    /// The backend's SETTINGS.
    peer: PeerSettings,
    send_window: i64,
    recv_window: i64,
    recv_credit: i64,
    next_stream: u32,
    streams: Map<u32, BStream>,
    queue: VecDeque<(ConnId, u32)>,
    block: Option<Block>,
    blocked: Vec<(ConnId, u32)>,
}

pub type Picker = Box<dyn Fn(SocketAddr, &[SocketAddr]) -> Option<Arc<Endpoint>>>;

pub struct Core {
    pick: Picker,
    clients: Map<ConnId, Client>,
    backends: Map<ConnId, Backend>,
    /// The backend connection new streams to an endpoint use.
    pool: Map<SocketAddr, ConnId>,
    next_id: ConnId,
    io: Vec<Io>,
}

fn push_replay(cs: &mut CStream, chunk: Chunk) {
    if !cs.replayable {
        return;
    }
    if let Chunk::Data { data, .. } = &chunk {
        cs.replay_bytes += data.len();
        if cs.replay_bytes > REPLAY_LIMIT {
            cs.replayable = false;
            cs.replay = Vec::new();
            return;
        }
    }
    cs.replay.push(chunk);
}

/// Take the next whole frame (header and payload) off `buf`, checking the
/// size rules; None while it is incomplete (room is reserved for it).
fn next_frame(buf: &mut BytesMut) -> Result<Option<(FrameHeader, Bytes)>, ConnError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let h = FrameHeader::parse(buf[..HEADER_LEN].try_into().expect("9 bytes"));
    h.check(frame::DEFAULT_MAX_FRAME_SIZE)
        .map_err(|code| err(code, "frame size"))?;
    let total = HEADER_LEN + h.length as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut f = buf.split_to(total).freeze();
    f.advance(HEADER_LEN);
    Ok(Some((h, f)))
}

/// A HEADERS or CONTINUATION frame from either peer: the header block it
/// completes (END_HEADERS), if any. A block in progress waits in `pending`.
fn header_fragment(
    pending: &mut Option<Block>,
    h: FrameHeader,
    p: Bytes,
) -> Result<Option<Block>, ConnError> {
    let block = if h.kind == frame::HEADERS {
        if h.stream == 0 {
            return Err(err(code::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        let (s, e) = frame::unpadded(h.kind, h.flags, &p)
            .ok_or(err(code::PROTOCOL_ERROR, "HEADERS padding"))?;
        Block {
            stream: h.stream,
            end_stream: h.flags & frame::FLAG_END_STREAM != 0,
            buf: p.slice(s..e),
        }
    } else {
        let Some(mut block) = pending.take() else {
            return Err(err(code::PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
        };
        if block.stream != h.stream {
            return Err(err(code::PROTOCOL_ERROR, "CONTINUATION on another stream"));
        }
        block.extend(&p);
        block
    };
    if block.buf.len() > MAX_HEADER_BLOCK {
        return Err(err(code::ENHANCE_YOUR_CALM, "header block too large"));
    }
    if h.flags & frame::FLAG_END_HEADERS == 0 {
        *pending = Some(block);
        return Ok(None);
    }
    Ok(Some(block))
}

/// Credit `n` bytes to a receive window; once the credit reaches
/// `threshold`, hand it to the peer in one WINDOW_UPDATE (fewer frames than
/// one per DATA). True if a frame was queued.
fn replenish(
    window: &mut i64,
    credit: &mut i64,
    n: i64,
    threshold: i64,
    out: &mut BytesMut,
    stream: u32,
) -> bool {
    *credit += n;
    if n == 0 || *credit < threshold {
        return false;
    }
    frame::window_update(out, stream, *credit as u32);
    *window += *credit;
    *credit = 0;
    true
}

/// What a peer's SETTINGS told us (RFC 9113 6.5.2).
struct PeerSettings {
    /// Its decoder table changed: start the next block we send it with a
    /// table size update.
    size_update: bool,
    max_frame: usize,
    init_window: i64,
    max_streams: usize,
}

impl PeerSettings {
    fn new(max_streams: usize) -> Self {
        Self {
            size_update: false,
            max_frame: frame::DEFAULT_MAX_FRAME_SIZE as usize,
            init_window: frame::DEFAULT_WINDOW,
            max_streams,
        }
    }

    /// Apply a SETTINGS payload; returns the change of the initial stream
    /// window, which the caller applies to the open streams.
    fn apply(&mut self, p: &[u8]) -> Result<i64, ConnError> {
        let mut delta = 0;
        for s in p.chunks_exact(6) {
            let ident = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match ident {
                setting::HEADER_TABLE_SIZE => self.size_update = true,
                setting::ENABLE_PUSH if v > 1 => {
                    return Err(err(code::PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1"));
                }
                setting::MAX_CONCURRENT_STREAMS => self.max_streams = v as usize,
                setting::INITIAL_WINDOW_SIZE => {
                    if i64::from(v) > frame::MAX_WINDOW {
                        return Err(err(code::FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE"));
                    }
                    delta += i64::from(v) - self.init_window;
                    self.init_window = i64::from(v);
                }
                setting::MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME_SIZE..=0xff_ffff).contains(&v) {
                        return Err(err(code::PROTOCOL_ERROR, "MAX_FRAME_SIZE"));
                    }
                    self.max_frame = v as usize;
                }
                _ => {}
            }
        }
        Ok(delta)
    }
}

/// Prefix a header block with a table size update to 0 when the peer's
/// decoder table changed since our last block (RFC 7541 4.2).
fn with_size_update(block: &Bytes, flag: &mut bool) -> Bytes {
    if !std::mem::take(flag) {
        return block.clone();
    }
    let mut b = BytesMut::with_capacity(block.len() + 1);
    b.extend_from_slice(&[0x20]);
    b.extend_from_slice(block);
    b.freeze()
}

impl Core {
    pub fn new(pick: Picker) -> Self {
        Self {
            pick,
            clients: Map::default(),
            backends: Map::default(),
            pool: Map::default(),
            next_id: 1,
            io: Vec::new(),
        }
    }

    pub fn take_io(&mut self) -> Vec<Io> {
        std::mem::take(&mut self.io)
    }

    fn wake(&mut self, id: ConnId) {
        if !self.io.contains(&Io::Wake(id)) {
            self.io.push(Io::Wake(id));
        }
    }

    // ---- client connections -------------------------------------------

    /// A client connection that sent the HTTP/2 preface (it is still in
    /// the bytes the reader will hand over). Our SETTINGS go out at once.
    pub fn add_client(&mut self, vip: SocketAddr) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = BytesMut::with_capacity(64 * 1024);
        frame::settings(&mut out, &CLIENT_SETTINGS);
        frame::window_update(&mut out, 0, (CONN_WINDOW - frame::DEFAULT_WINDOW) as u32);
        self.clients.insert(
            id,
            Client {
                vip,
                preface_done: false,
                settings_seen: false,
                out,
                closing: false,
                eof: false,
                pre_ack: Some(PreAck::default()),
                peer: PeerSettings::new(usize::MAX),
                send_window: frame::DEFAULT_WINDOW,
                recv_window: CONN_WINDOW,
                recv_credit: 0,
                streams: Map::default(),
                last_stream: 0,
                block: None,
                blocked: Vec::new(),
                drain: Drain::No,
            },
        );
        self.wake(id);
        id
    }

    /// Whether the reader should go on reading this client.
    pub fn client_reading(&self, id: ConnId) -> bool {
        self.clients.get(&id).is_some_and(|c| !c.closing && !c.eof)
    }

    /// Streams open on a client connection (for tests and stats).
    pub fn client_streams(&self, id: ConnId) -> usize {
        self.clients.get(&id).map_or(0, |c| c.streams.len())
    }

    /// Bytes the client sent.
    pub fn client_read(&mut self, id: ConnId, buf: &mut BytesMut) {
        if let Err(e) = self.client_frames(id, buf) {
            tracing::debug!(
                conn = id,
                code = e.code,
                why = e.why,
                "client connection error"
            );
            self.client_error(id, e.code);
        }
    }

    fn client_frames(&mut self, id: ConnId, buf: &mut BytesMut) -> Result<(), ConnError> {
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
                        return Err(err(code::PROTOCOL_ERROR, "bad preface"));
                    }
                    return Ok(());
                }
                if &buf[..frame::PREFACE.len()] != frame::PREFACE {
                    return Err(err(code::PROTOCOL_ERROR, "bad preface"));
                }
                buf.advance(frame::PREFACE.len());
                c.preface_done = true;
            }
            let Some((h, f)) = next_frame(buf)? else {
                return Ok(());
            };
            if !c.settings_seen {
                if h.kind != frame::SETTINGS || h.flags & frame::FLAG_ACK != 0 {
                    return Err(err(code::PROTOCOL_ERROR, "first frame is not SETTINGS"));
                }
                c.settings_seen = true;
            }
            if c.block.is_some() && h.kind != frame::CONTINUATION {
                return Err(err(code::PROTOCOL_ERROR, "frame inside a header block"));
            }
            self.client_frame(id, h, f)?;
        }
    }

    fn client_frame(&mut self, id: ConnId, h: FrameHeader, p: Bytes) -> Result<(), ConnError> {
        match h.kind {
            frame::DATA => self.client_data(id, h, p),
            frame::HEADERS | frame::CONTINUATION => {
                let c = self.clients.get_mut(&id).expect("client exists");
                match header_fragment(&mut c.block, h, p)? {
                    Some(block) => self.client_block(id, block),
                    None => Ok(()),
                }
            }
            frame::PRIORITY => {
                if h.stream == 0 {
                    return Err(err(code::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                if h.length != 5 {
                    return Err(err(code::FRAME_SIZE_ERROR, "PRIORITY length"));
                }
                Ok(())
            }
            frame::RST_STREAM => {
                let c = self.clients.get_mut(&id).expect("client exists");
                if h.stream == 0 || h.stream > c.last_stream {
                    return Err(err(code::PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
                }
                let reason = (&p[..]).get_u32();
                if let Some(cs) = c.streams.remove(&h.stream) {
                    self.drop_stream(id, cs, reason);
                    self.after_stream_end(id);
                }
                Ok(())
            }
            frame::SETTINGS => self.client_settings(id, h, &p),
            frame::PUSH_PROMISE => Err(err(code::PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            frame::PING => {
                if h.stream != 0 {
                    return Err(err(code::PROTOCOL_ERROR, "PING on a stream"));
                }
                let payload: [u8; 8] = p[..8].try_into().expect("8 bytes");
                let c = self.clients.get_mut(&id).expect("client exists");
                if h.flags & frame::FLAG_ACK == 0 {
                    frame::ping(&mut c.out, true, payload);
                    self.wake(id);
                } else if payload == DRAIN_PING && c.drain == Drain::Pinged {
                    self.drain_final(id);
                }
                Ok(())
            }
            frame::GOAWAY => {
                if h.stream != 0 {
                    return Err(err(code::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                // The client opens no more streams; the open ones finish.
                Ok(())
            }
            frame::WINDOW_UPDATE => {
                let inc = i64::from((&p[..]).get_u32() & 0x7fff_ffff);
                let c = self.clients.get_mut(&id).expect("client exists");
                if inc == 0 {
                    return Err(err(code::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
                }
                if h.stream == 0 {
                    c.send_window += inc;
                    if c.send_window > frame::MAX_WINDOW {
                        return Err(err(code::FLOW_CONTROL_ERROR, "connection window overflow"));
                    }
                    let blocked = std::mem::take(&mut c.blocked);
                    for sid in blocked {
                        self.pump_down(id, sid);
                    }
                } else if let Some(cs) = c.streams.get_mut(&h.stream) {
                    cs.down_window += inc;
                    if cs.down_window > frame::MAX_WINDOW {
                        return Err(err(code::FLOW_CONTROL_ERROR, "stream window overflow"));
                    }
                    self.pump_down(id, h.stream);
                } else if h.stream > c.last_stream {
                    return Err(err(code::PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream"));
                }
                Ok(())
            }
            // Unknown frame types are ignored (RFC 9113 4.1).
            _ => Ok(()),
        }
    }

    fn client_settings(&mut self, id: ConnId, h: FrameHeader, p: &[u8]) -> Result<(), ConnError> {
        if h.stream != 0 {
            return Err(err(code::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        let c = self.clients.get_mut(&id).expect("client exists");
        if h.flags & frame::FLAG_ACK != 0 {
            // From here on the client's header blocks use no dynamic
            // table: forward them as they are.
            c.pre_ack = None;
            return Ok(());
        }
        let delta = c.peer.apply(p)?;
        frame::settings_ack(&mut c.out);
        self.wake(id);
        if delta != 0 {
            let c = self.clients.get_mut(&id).expect("client exists");
            for cs in c.streams.values_mut() {
                cs.down_window += delta;
                if cs.down_window > frame::MAX_WINDOW {
                    return Err(err(code::FLOW_CONTROL_ERROR, "stream window overflow"));
                }
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

    fn client_data(&mut self, id: ConnId, h: FrameHeader, p: Bytes) -> Result<(), ConnError> {
        if h.stream == 0 {
            return Err(err(code::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let len = i64::from(h.length);
        let c = self.clients.get_mut(&id).expect("client exists");
        if len > c.recv_window {
            return Err(err(code::FLOW_CONTROL_ERROR, "connection window exceeded"));
        }
        c.recv_window -= len;
        let (s, e) = frame::unpadded(h.kind, h.flags, &p)
            .ok_or(err(code::PROTOCOL_ERROR, "DATA padding"))?;
        let end = h.flags & frame::FLAG_END_STREAM != 0;
        let Some(cs) = c.streams.get_mut(&h.stream) else {
            if h.stream > c.last_stream {
                return Err(err(code::PROTOCOL_ERROR, "DATA on an idle stream"));
            }
            // A stream we closed or reset: its bytes still count against
            // the connection window.
            self.credit_client(id, None, len);
            return Ok(());
        };
        if cs.client_ended {
            return Err(err(code::STREAM_CLOSED, "DATA after END_STREAM"));
        }
        if len > cs.recv_window {
            return Err(err(code::FLOW_CONTROL_ERROR, "stream window exceeded"));
        }
        cs.recv_window -= len;
        cs.client_ended = end;
        if cs.up == Up::Done {
            self.credit_client(id, Some(h.stream), len);
            self.finish_if_done(id, h.stream);
            return Ok(());
        }
        cs.to_up.push_back(Chunk::Data {
            data: p.slice(s..e),
            end,
            credit: len,
        });
        self.pump_up(id, h.stream);
        Ok(())
    }

    /// A HEADERS or CONTINUATION frame; `complete` when END_HEADERS.
    fn client_block(&mut self, id: ConnId, block: Block) -> Result<(), ConnError> {
        let c = self.clients.get_mut(&id).expect("client exists");
        let Block {
            stream: sid,
            end_stream: end,
            buf,
        } = block;
        // Decode while the client may use its table; check otherwise.
        let forwarded = match &mut c.pre_ack {
            Some(dec) => dec.reencode(&buf)?,
            None => {
                hpack::check_self_contained(&buf)?;
                buf
            }
        };
        if let Some(cs) = c.streams.get_mut(&sid) {
            // Trailers.
            if cs.client_ended {
                return Err(err(code::STREAM_CLOSED, "HEADERS after END_STREAM"));
            }
            if !end {
                return Err(err(code::PROTOCOL_ERROR, "trailers without END_STREAM"));
            }
            cs.client_ended = true;
            if cs.up == Up::Done {
                self.finish_if_done(id, sid);
                return Ok(());
            }
            cs.to_up.push_back(Chunk::Headers {
                block: forwarded,
                end: true,
            });
            self.pump_up(id, sid);
            return Ok(());
        }
        if sid <= c.last_stream {
            return Err(err(code::STREAM_CLOSED, "HEADERS on a closed stream"));
        }
        if sid.is_multiple_of(2) {
            return Err(err(code::PROTOCOL_ERROR, "client stream id is even"));
        }
        c.last_stream = sid;
        if let Drain::Final(last) = c.drain
            && sid > last
        {
            // Above our final GOAWAY: ignored (6.8).
            return Ok(());
        }
        if c.streams.len() >= MAX_CLIENT_STREAMS as usize {
            frame::rst(&mut c.out, sid, code::REFUSED_STREAM);
            self.wake(id);
            return Ok(());
        }
        let init = c.peer.init_window;
        c.streams.insert(
            sid,
            CStream {
                up: Up::Done,
                inflight: None,
                tried: Vec::new(),
                to_up: VecDeque::from([Chunk::Headers {
                    block: forwarded,
                    end,
                }]),
                up_window: 0,
                replay: Vec::new(),
                replay_bytes: 0,
                replayable: true,
                client_ended: end,
                recv_window: STREAM_WINDOW,
                recv_credit: 0,
                to_down: VecDeque::new(),
                down_window: init,
                responded: false,
                down_ended: false,
                rst_after_down: false,
            },
        );
        self.route(id, sid);
        Ok(())
    }

    /// A connection error on a client: GOAWAY with `code`, then close.
    fn client_error(&mut self, id: ConnId, code: u32) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        frame::goaway(&mut c.out, c.last_stream, code);
        self.close_client(id);
    }

    /// End every stream of a client and close it once its output is out.
    fn close_client(&mut self, id: ConnId) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        c.closing = true;
        c.blocked.clear();
        let streams: Vec<CStream> = c.streams.drain().map(|(_, cs)| cs).collect();
        for cs in streams {
            self.drop_stream(id, cs, code::CANCEL);
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
        frame::goaway(&mut c.out, frame::MAX_WINDOW as u32, code::NO_ERROR);
        frame::ping(&mut c.out, false, DRAIN_PING);
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
        frame::goaway(&mut c.out, c.last_stream, code::NO_ERROR);
        c.drain = Drain::Final(c.last_stream);
        self.wake(id);
        self.after_stream_end(id);
    }

    /// Close a client whose work is over (drained or half-closed, and no
    /// stream left).
    fn after_stream_end(&mut self, id: ConnId) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        if c.streams.is_empty() && !c.closing && (c.eof || matches!(c.drain, Drain::Final(_))) {
            self.close_client(id);
        }
    }

    /// Swap a connection's output (client or backend) into `buf` (which
    /// must be empty; the two buffers are reused in turn), and say whether
    /// the connection is to be closed once that is written. None once the
    /// core forgot it.
    pub fn take_out(&mut self, id: ConnId, buf: &mut BytesMut) -> Option<bool> {
        if let Some(c) = self.clients.get_mut(&id) {
            std::mem::swap(&mut c.out, buf);
            return Some(c.closing);
        }
        let b = self.backends.get_mut(&id)?;
        if b.connected {
            std::mem::swap(&mut b.out, buf);
        }
        Some(b.closing)
    }

    /// The writer put everything it took on the wire: streams that
    /// waited for room go on.
    pub fn written(&mut self, id: ConnId) {
        if let Some(c) = self.clients.get_mut(&id) {
            let blocked = std::mem::take(&mut c.blocked);
            for sid in blocked {
                self.pump_down(id, sid);
            }
        } else if let Some(b) = self.backends.get_mut(&id) {
            let blocked = std::mem::take(&mut b.blocked);
            for (c, sid) in blocked {
                self.pump_up(c, sid);
            }
        }
    }

    /// The connection is closed and its writer done: drop it.
    pub fn forget(&mut self, id: ConnId) {
        if self.clients.contains_key(&id) {
            self.close_client(id);
            self.clients.remove(&id);
        } else if self.backends.contains_key(&id) {
            self.backend_gone(id);
        }
        self.io.retain(|io| *io != Io::Wake(id));
    }

    // ---- routing ---------------------------------------------------------

    /// Send a client stream (its queued chunks start with the request's
    /// HEADERS) to an endpoint.
    fn route(&mut self, c: ConnId, sid: u32) {
        let Some(client) = self.clients.get_mut(&c) else {
            return;
        };
        let vip = client.vip;
        let Some(cs) = client.streams.get_mut(&sid) else {
            return;
        };
        let Some(ep) = (self.pick)(vip, &cs.tried) else {
            tracing::debug!(%vip, "no endpoint for a stream; refused");
            self.reset_client_stream(c, sid, code::REFUSED_STREAM);
            return;
        };
        cs.tried.push(ep.addr);
        cs.inflight = Some(ep.start());
        let b = match self.pool.get(&ep.addr) {
            Some(b) => *b,
            None => self.new_backend(ep),
        };
        let cs = self
            .clients
            .get_mut(&c)
            .and_then(|cl| cl.streams.get_mut(&sid))
            .expect("stream exists");
        cs.up = Up::Queued(b);
        let be = self.backends.get_mut(&b).expect("pooled backend exists");
        be.queue.push_back((c, sid));
        self.open_queued(b);
    }

    fn new_backend(&mut self, ep: Arc<Endpoint>) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = BytesMut::with_capacity(64 * 1024);
        out.extend_from_slice(frame::PREFACE);
        frame::settings(&mut out, &BACKEND_SETTINGS);
        frame::window_update(&mut out, 0, (CONN_WINDOW - frame::DEFAULT_WINDOW) as u32);
        let addr = ep.addr;
        self.backends.insert(
            id,
            Backend {
                ep,
                connected: false,
                retiring: false,
                closing: false,
                out,
                peer: PeerSettings::new(INITIAL_BACKEND_STREAMS),
                send_window: frame::DEFAULT_WINDOW,
                recv_window: CONN_WINDOW,
                recv_credit: 0,
                next_stream: 1,
                streams: Map::default(),
                queue: VecDeque::new(),
                block: None,
                blocked: Vec::new(),
            },
        );
        self.pool.insert(addr, id);
        self.io.push(Io::Connect { id, addr });
        id
    }

    /// Give queued streams of a backend connection their stream ids and
    /// send their HEADERS, within its MAX_CONCURRENT_STREAMS.
    fn open_queued(&mut self, b: ConnId) {
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
            let Some((c, sid)) = be.queue.pop_front() else {
                return;
            };
            let Some(cs) = self
                .clients
                .get_mut(&c)
                .and_then(|cl| cl.streams.get_mut(&sid))
            else {
                continue;
            };
            if cs.up != Up::Queued(b) {
                continue;
            }
            let bid = be.next_stream;
            be.next_stream += 2;
            if i64::from(be.next_stream) > frame::MAX_WINDOW {
                // Ids ran out: this connection takes no more streams.
                be.retiring = true;
                if self.pool.get(&be.ep.addr) == Some(&b) {
                    self.pool.remove(&be.ep.addr);
                }
            }
            be.streams.insert(
                bid,
                BStream {
                    client: c,
                    sid,
                    recv_window: BACKEND_STREAM_WINDOW,
                    recv_credit: 0,
                    local_end: false,
                    remote_end: false,
                },
            );
            cs.up = Up::Open(b, bid);
            cs.up_window = be.peer.init_window;
            // The HEADERS go out now, whatever the output holds: ids must
            // reach the backend in increasing order.
            match cs.to_up.pop_front() {
                Some(Chunk::Headers { block, end }) => {
                    let fwd = with_size_update(&block, &mut be.peer.size_update);
                    frame::headers(&mut be.out, bid, &fwd, end, be.peer.max_frame);
                    if let Some(i) = &cs.inflight {
                        i.sent();
                    }
                    push_replay(cs, Chunk::Headers { block, end });
                    if end {
                        be.streams.get_mut(&bid).expect("just added").local_end = true;
                    }
                }
                other => {
                    // Cannot happen: a routed stream starts with HEADERS.
                    tracing::error!(?other, "routed stream without HEADERS");
                }
            }
            let connected = be.connected;
            if connected {
                self.wake(b);
            }
            self.pump_up(c, sid);
        }
    }

    /// A stream left a backend connection unprocessed: route it again
    /// without counting an attempt (it was never sent).
    fn reroute(&mut self, c: ConnId, sid: u32, from: ConnId) {
        let Some(cs) = self
            .clients
            .get_mut(&c)
            .and_then(|cl| cl.streams.get_mut(&sid))
        else {
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
    /// no longer safe.
    fn retry(&mut self, c: ConnId, sid: u32) {
        let Some(cs) = self
            .clients
            .get_mut(&c)
            .and_then(|cl| cl.streams.get_mut(&sid))
        else {
            return;
        };
        if let Some(i) = cs.inflight.take() {
            i.ep.failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if cs.responded || !cs.replayable || cs.tried.len() >= MAX_ATTEMPTS {
            self.reset_client_stream(c, sid, code::REFUSED_STREAM);
            return;
        }
        tracing::debug!(
            tried = ?cs.tried,
            "stream not processed; retrying elsewhere"
        );
        // The request again from the start: what went out, then what had
        // not yet.
        let mut chunks: VecDeque<Chunk> = std::mem::take(&mut cs.replay).into();
        chunks.extend(cs.to_up.drain(..));
        cs.to_up = chunks;
        cs.replay_bytes = 0;
        cs.up = Up::Done;
        self.route(c, sid);
    }

    // ---- moving bytes ----------------------------------------------------

    /// Give flow-control credit back to a client for bytes passed on.
    fn credit_client(&mut self, c: ConnId, sid: Option<u32>, n: i64) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        if n == 0 || cl.closing {
            return;
        }
        let mut wake = replenish(
            &mut cl.recv_window,
            &mut cl.recv_credit,
            n,
            CONN_WINDOW / 4,
            &mut cl.out,
            0,
        );
        if let Some(sid) = sid
            && let Some(cs) = cl.streams.get_mut(&sid)
            && !cs.client_ended
        {
            wake |= replenish(
                &mut cs.recv_window,
                &mut cs.recv_credit,
                n,
                STREAM_WINDOW / 2,
                &mut cl.out,
                sid,
            );
        }
        if wake {
            self.wake(c);
        }
    }

    /// Give flow-control credit back to a backend: `conn` bytes to its
    /// connection window (on arrival), `stream` bytes to a stream's (once
    /// passed on to the client).
    fn credit_backend(&mut self, b: ConnId, conn: i64, stream: Option<(u32, i64)>) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        if be.closing {
            return;
        }
        let mut wake = replenish(
            &mut be.recv_window,
            &mut be.recv_credit,
            conn,
            CONN_WINDOW / 4,
            &mut be.out,
            0,
        );
        if let Some((bid, n)) = stream
            && let Some(bs) = be.streams.get_mut(&bid)
            && !bs.remote_end
        {
            wake |= replenish(
                &mut bs.recv_window,
                &mut bs.recv_credit,
                n,
                BACKEND_STREAM_WINDOW / 2,
                &mut be.out,
                bid,
            );
        }
        if wake && be.connected {
            self.wake(b);
        }
    }

    /// Move a stream's request chunks to its backend, within the
    /// backend's windows and the output limit.
    fn pump_up(&mut self, c: ConnId, sid: u32) {
        let Some(cs) = self
            .clients
            .get_mut(&c)
            .and_then(|cl| cl.streams.get_mut(&sid))
        else {
            return;
        };
        let (b, bid) = match cs.up {
            Up::Open(b, bid) => (b, bid),
            Up::Queued(_) => return,
            Up::Done => {
                let credit: i64 = cs
                    .to_up
                    .drain(..)
                    .map(|ch| match ch {
                        Chunk::Data { credit, .. } => credit,
                        Chunk::Headers { .. } => 0,
                    })
                    .sum();
                self.credit_client(c, Some(sid), credit);
                return;
            }
        };
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        let mut credit = 0;
        let mut wrote = false;
        let mut ended = false;
        while let Some(front) = cs.to_up.front_mut() {
            if be.out.len() >= SOFT_OUT_LIMIT {
                be.blocked.push((c, sid));
                break;
            }
            match front {
                Chunk::Headers { block, end } => {
                    let fwd = with_size_update(block, &mut be.peer.size_update);
                    frame::headers(&mut be.out, bid, &fwd, *end, be.peer.max_frame);
                    ended |= *end;
                    let ch = cs.to_up.pop_front().expect("front exists");
                    push_replay(cs, ch);
                }
                Chunk::Data {
                    data,
                    end,
                    credit: cr,
                } => {
                    let n = (data.len() as i64)
                        .min(cs.up_window)
                        .min(be.send_window)
                        .min(be.peer.max_frame as i64);
                    if n <= 0 && !data.is_empty() {
                        be.blocked.push((c, sid));
                        break;
                    }
                    let n = n.max(0) as usize;
                    let part = data.split_to(n);
                    let last = data.is_empty();
                    frame::data(&mut be.out, bid, &part, *end && last);
                    cs.up_window -= n as i64;
                    be.send_window -= n as i64;
                    let end = *end;
                    let cr = *cr;
                    push_replay(
                        cs,
                        Chunk::Data {
                            data: part,
                            end: end && last,
                            credit: 0,
                        },
                    );
                    if last {
                        credit += cr;
                        ended |= end;
                        cs.to_up.pop_front();
                    }
                }
            }
            wrote = true;
        }
        if ended && let Some(bs) = be.streams.get_mut(&bid) {
            bs.local_end = true;
        }
        let connected = be.connected;
        if wrote && connected {
            self.wake(b);
        }
        self.credit_client(c, Some(sid), credit);
        if ended {
            self.maybe_close_bstream(b, bid);
        }
    }

    /// Move a stream's response chunks to its client, within the client's
    /// windows and the output limit.
    fn pump_down(&mut self, c: ConnId, sid: u32) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        if cl.closing {
            return;
        }
        let Some(cs) = cl.streams.get_mut(&sid) else {
            return;
        };
        let mut credit = 0;
        let mut wrote = false;
        while let Some(front) = cs.to_down.front_mut() {
            if cl.out.len() >= SOFT_OUT_LIMIT {
                cl.blocked.push(sid);
                break;
            }
            match front {
                Chunk::Headers { block, end } => {
                    let fwd = with_size_update(block, &mut cl.peer.size_update);
                    frame::headers(&mut cl.out, sid, &fwd, *end, cl.peer.max_frame);
                    cs.down_ended |= *end;
                    cs.to_down.pop_front();
                }
                Chunk::Data {
                    data,
                    end,
                    credit: cr,
                } => {
                    let n = (data.len() as i64)
                        .min(cs.down_window)
                        .min(cl.send_window)
                        .min(cl.peer.max_frame as i64);
                    if n <= 0 && !data.is_empty() {
                        cl.blocked.push(sid);
                        break;
                    }
                    let n = n.max(0) as usize;
                    let part = data.split_to(n);
                    let last = data.is_empty();
                    frame::data(&mut cl.out, sid, &part, *end && last);
                    cs.down_window -= n as i64;
                    cl.send_window -= n as i64;
                    if last {
                        credit += *cr;
                        cs.down_ended |= *end;
                        cs.to_down.pop_front();
                    }
                }
            }
            wrote = true;
        }
        if cs.down_ended && cs.to_down.is_empty() && cs.rst_after_down && !cs.client_ended {
            frame::rst(&mut cl.out, sid, code::NO_ERROR);
            cs.client_ended = true;
            cs.rst_after_down = false;
            wrote = true;
        }
        let up = cs.up;
        if wrote {
            self.wake(c);
        }
        if let Up::Open(b, bid) = up {
            self.credit_backend(b, 0, Some((bid, credit)));
        }
        self.finish_if_done(c, sid);
    }

    /// Remove a client stream whose work is over on both hops.
    fn finish_if_done(&mut self, c: ConnId, sid: u32) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        let Some(cs) = cl.streams.get(&sid) else {
            return;
        };
        if cs.client_ended && cs.down_ended && cs.to_down.is_empty() && cs.up == Up::Done {
            cl.streams.remove(&sid);
            self.after_stream_end(c);
        }
    }

    /// Reset a client's stream (RST_STREAM `code`) and end its backend side.
    fn reset_client_stream(&mut self, c: ConnId, sid: u32, code: u32) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        let Some(cs) = cl.streams.remove(&sid) else {
            return;
        };
        frame::rst(&mut cl.out, sid, code);
        self.wake(c);
        self.drop_stream(c, cs, code::CANCEL);
        self.after_stream_end(c);
    }

    /// A client stream is gone (reset by either side, or its connection
    /// closed): cancel its backend stream with `cancel`, and give back
    /// the flow-control credit of what it still held.
    fn drop_stream(&mut self, c: ConnId, cs: CStream, cancel: u32) {
        let held_up: i64 = cs
            .to_up
            .iter()
            .map(|ch| match ch {
                Chunk::Data { credit, .. } => *credit,
                Chunk::Headers { .. } => 0,
            })
            .sum();
        // (What it held of the response was credited to the backend's
        // connection on arrival, and its backend stream ends here.)
        self.credit_client(c, None, held_up);
        if let Up::Open(b, bid) = cs.up {
            let mut wake = false;
            if let Some(be) = self.backends.get_mut(&b)
                && let Some(bs) = be.streams.remove(&bid)
                && !(bs.local_end && bs.remote_end)
            {
                frame::rst(&mut be.out, bid, cancel);
                wake = be.connected;
            }
            if wake {
                self.wake(b);
            }
            self.after_bstream(b);
        }
    }

    // ---- backend connections ---------------------------------------------

    /// The TCP connection of backend `b` is up: its queued output goes.
    pub fn backend_connected(&mut self, b: ConnId) {
        if let Some(be) = self.backends.get_mut(&b) {
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
    }

    /// Backend `b` could not be reached: nothing reached it, so all its
    /// streams are retried elsewhere.
    pub fn backend_connect_failed(&mut self, b: ConnId) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        tracing::debug!(endpoint = %be.ep.addr, "backend connection failed");
        be.ep
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.backend_gone(b);
    }

    /// Backend `b`'s connection ended (closed, failed, or we closed it).
    fn backend_gone(&mut self, b: ConnId) {
        let Some(mut be) = self.backends.remove(&b) else {
            return;
        };
        if self.pool.get(&be.ep.addr) == Some(&b) {
            self.pool.remove(&be.ep.addr);
        }
        let connected = be.connected;
        let queued: Vec<_> = be.queue.drain(..).collect();
        let streams: Vec<(u32, BStream)> = be.streams.drain().collect();
        for (c, sid) in queued {
            self.reroute(c, sid, b);
        }
        for (bid, bs) in streams {
            let Some(cs) = self
                .clients
                .get_mut(&bs.client)
                .and_then(|cl| cl.streams.get_mut(&bs.sid))
            else {
                continue;
            };
            if cs.up != Up::Open(b, bid) {
                continue;
            }
            cs.up = Up::Done;
            if !connected {
                self.retry(bs.client, bs.sid);
            } else if bs.remote_end {
                // The whole response arrived; only the request's tail is lost.
                cs.inflight = None;
                cs.rst_after_down = true;
                self.pump_up(bs.client, bs.sid);
                self.pump_down(bs.client, bs.sid);
            } else {
                self.reset_client_stream(bs.client, bs.sid, code::INTERNAL_ERROR);
            }
        }
        self.io.retain(|io| *io != Io::Wake(b));
    }

    /// Close a backend connection on a protocol error of its own.
    fn backend_error(&mut self, b: ConnId, e: ConnError) {
        if let Some(be) = self.backends.get_mut(&b) {
            tracing::warn!(endpoint = %be.ep.addr, code = e.code, why = e.why, "backend connection error");
            frame::goaway(&mut be.out, 0, e.code);
            be.closing = true;
            self.wake(b);
        }
    }

    /// Bytes backend `b` sent.
    pub fn backend_read(&mut self, b: ConnId, buf: &mut BytesMut) {
        if let Err(e) = self.backend_frames(b, buf) {
            self.backend_error(b, e);
        }
    }

    /// The backend closed its side (or its socket failed).
    pub fn backend_eof(&mut self, b: ConnId) {
        self.backend_gone(b);
    }

    pub fn backend_reading(&self, b: ConnId) -> bool {
        self.backends.get(&b).is_some_and(|be| !be.closing)
    }

    fn backend_frames(&mut self, b: ConnId, buf: &mut BytesMut) -> Result<(), ConnError> {
        loop {
            let Some(be) = self.backends.get_mut(&b) else {
                buf.clear();
                return Ok(());
            };
            if be.closing {
                buf.clear();
                return Ok(());
            }
            let Some((h, f)) = next_frame(buf)? else {
                return Ok(());
            };
            if be.block.is_some() && h.kind != frame::CONTINUATION {
                return Err(err(code::PROTOCOL_ERROR, "frame inside a header block"));
            }
            self.backend_frame(b, h, f)?;
        }
    }

    fn backend_frame(&mut self, b: ConnId, h: FrameHeader, p: Bytes) -> Result<(), ConnError> {
        let be = self.backends.get_mut(&b).expect("backend exists");
        match h.kind {
            frame::DATA => {
                let len = i64::from(h.length);
                if len > be.recv_window {
                    return Err(err(code::FLOW_CONTROL_ERROR, "connection window exceeded"));
                }
                be.recv_window -= len;
                let (s, e) = frame::unpadded(h.kind, h.flags, &p)
                    .ok_or(err(code::PROTOCOL_ERROR, "DATA padding"))?;
                let end = h.flags & frame::FLAG_END_STREAM != 0;
                self.credit_backend(b, len, None);
                let be = self.backends.get_mut(&b).expect("backend exists");
                let Some(bs) = be.streams.get_mut(&h.stream) else {
                    return Ok(());
                };
                if bs.remote_end || len > bs.recv_window {
                    return Err(err(code::FLOW_CONTROL_ERROR, "stream window exceeded"));
                }
                bs.recv_window -= len;
                bs.remote_end |= end;
                let (c, sid) = (bs.client, bs.sid);
                if let Some(cs) = self
                    .clients
                    .get_mut(&c)
                    .and_then(|cl| cl.streams.get_mut(&sid))
                {
                    cs.responded = true;
                    cs.to_down.push_back(Chunk::Data {
                        data: p.slice(s..e),
                        end,
                        credit: len,
                    });
                    self.pump_down(c, sid);
                }
                if end {
                    self.maybe_close_bstream(b, h.stream);
                }
                Ok(())
            }
            frame::HEADERS | frame::CONTINUATION => match header_fragment(&mut be.block, h, p)? {
                Some(block) => self.backend_block(b, block),
                None => Ok(()),
            },
            frame::RST_STREAM => {
                let reason = (&p[..]).get_u32();
                let Some(bs) = be.streams.remove(&h.stream) else {
                    return Ok(());
                };
                let (c, sid) = (bs.client, bs.sid);
                let Some(cs) = self
                    .clients
                    .get_mut(&c)
                    .and_then(|cl| cl.streams.get_mut(&sid))
                else {
                    self.after_bstream(b);
                    return Ok(());
                };
                cs.up = Up::Done;
                if reason == code::REFUSED_STREAM && !cs.responded {
                    self.retry(c, sid);
                } else if bs.remote_end {
                    // The response is complete; the backend wants no more
                    // of the request (RFC 9113 8.1).
                    cs.inflight = None;
                    cs.rst_after_down = true;
                    self.pump_up(c, sid);
                    self.pump_down(c, sid);
                } else {
                    if let Some(i) = cs.inflight.take() {
                        i.ep.failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.reset_client_stream(c, sid, reason);
                }
                self.after_bstream(b);
                Ok(())
            }
            frame::SETTINGS => {
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
                        if let Some(cs) = self
                            .clients
                            .get_mut(c)
                            .and_then(|cl| cl.streams.get_mut(sid))
                        {
                            cs.up_window += delta;
                        }
                    }
                    for (c, sid) in streams {
                        self.pump_up(c, sid);
                    }
                }
                self.open_queued(b);
                Ok(())
            }
            frame::PING => {
                if h.flags & frame::FLAG_ACK == 0 {
                    let payload: [u8; 8] = p[..8].try_into().expect("8 bytes");
                    frame::ping(&mut be.out, true, payload);
                    self.wake(b);
                }
                Ok(())
            }
            frame::GOAWAY => {
                let last = (&p[..4]).get_u32() & 0x7fff_ffff;
                be.retiring = true;
                if self.pool.get(&be.ep.addr) == Some(&b) {
                    self.pool.remove(&be.ep.addr);
                }
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
                    if let Some(cs) = self
                        .clients
                        .get_mut(&bs.client)
                        .and_then(|cl| cl.streams.get_mut(&bs.sid))
                    {
                        cs.up = Up::Done;
                        self.retry(bs.client, bs.sid);
                    }
                }
                self.after_bstream(b);
                Ok(())
            }
            frame::WINDOW_UPDATE => {
                let inc = i64::from((&p[..]).get_u32() & 0x7fff_ffff);
                if inc == 0 {
                    return Err(err(code::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
                }
                if h.stream == 0 {
                    be.send_window += inc;
                    if be.send_window > frame::MAX_WINDOW {
                        return Err(err(code::FLOW_CONTROL_ERROR, "connection window overflow"));
                    }
                    let blocked = std::mem::take(&mut be.blocked);
                    for (c, sid) in blocked {
                        self.pump_up(c, sid);
                    }
                } else if let Some(bs) = be.streams.get(&h.stream) {
                    let (c, sid) = (bs.client, bs.sid);
                    if let Some(cs) = self
                        .clients
                        .get_mut(&c)
                        .and_then(|cl| cl.streams.get_mut(&sid))
                    {
                        cs.up_window += inc;
                        if cs.up_window > frame::MAX_WINDOW {
                            return Err(err(code::FLOW_CONTROL_ERROR, "stream window overflow"));
                        }
                        self.pump_up(c, sid);
                    }
                }
                Ok(())
            }
            frame::PUSH_PROMISE => {
                Err(err(code::PROTOCOL_ERROR, "PUSH_PROMISE with push disabled"))
            }
            _ => Ok(()),
        }
    }

    fn backend_block(&mut self, b: ConnId, block: Block) -> Result<(), ConnError> {
        let be = self.backends.get_mut(&b).expect("backend exists");
        hpack::check_self_contained(&block.buf)?;
        let Some(bs) = be.streams.get_mut(&block.stream) else {
            // A stream we reset; or a push, which we disabled.
            if block.stream.is_multiple_of(2) {
                return Err(err(
                    code::PROTOCOL_ERROR,
                    "HEADERS on a stream we did not open",
                ));
            }
            return Ok(());
        };
        if bs.remote_end {
            return Err(err(code::STREAM_CLOSED, "HEADERS after END_STREAM"));
        }
        bs.remote_end |= block.end_stream;
        let (c, sid) = (bs.client, bs.sid);
        if let Some(cs) = self
            .clients
            .get_mut(&c)
            .and_then(|cl| cl.streams.get_mut(&sid))
        {
            if !cs.responded {
                cs.responded = true;
                if let Some(i) = &cs.inflight {
                    i.responded();
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
    fn maybe_close_bstream(&mut self, b: ConnId, bid: u32) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        let Some(bs) = be.streams.get(&bid) else {
            return;
        };
        if !(bs.local_end && bs.remote_end) {
            return;
        }
        let bs = be.streams.remove(&bid).expect("present");
        if let Some(cs) = self
            .clients
            .get_mut(&bs.client)
            .and_then(|cl| cl.streams.get_mut(&bs.sid))
        {
            cs.up = Up::Done;
            cs.inflight = None;
            cs.replay = Vec::new();
        }
        self.after_bstream(b);
        self.finish_if_done(bs.client, bs.sid);
    }

    /// Close pooled connections to endpoints that left every service and
    /// have no stream left (those with streams close after their last).
    /// The router calls this periodically.
    pub fn sweep(&mut self) {
        let idle: Vec<ConnId> = self
            .backends
            .iter()
            .filter(|(_, be)| {
                be.streams.is_empty()
                    && be.queue.is_empty()
                    && !be.closing
                    && be.ep.draining.load(std::sync::atomic::Ordering::Relaxed)
            })
            .map(|(id, _)| *id)
            .collect();
        for b in idle {
            self.after_bstream(b);
        }
    }

    /// A stream left backend `b`: open waiting ones, or close the
    /// connection if it is retiring and idle.
    fn after_bstream(&mut self, b: ConnId) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        let draining = be.ep.draining.load(std::sync::atomic::Ordering::Relaxed);
        if draining && !be.retiring {
            be.retiring = true;
            if self.pool.get(&be.ep.addr) == Some(&b) {
                self.pool.remove(&be.ep.addr);
            }
        }
        if be.retiring && be.streams.is_empty() && be.queue.is_empty() {
            if !be.closing {
                frame::goaway(&mut be.out, 0, code::NO_ERROR);
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

#[cfg(test)]
mod tests;
