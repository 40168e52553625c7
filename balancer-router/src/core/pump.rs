//! Moving bytes: one pump takes a stream's queued chunks to the other hop
//! within that hop's stream and connection windows and its output limit,
//! in either direction. Around it, the credit each side gets back, and the
//! budget of response bytes that bounds what a client can make the router
//! hold.
//!
//! The budget (see [`super::Limits`]): a client's `held` counts the window
//! granted to backends for its streams and not yet used, the response
//! bytes queued for it, and those in its output until the writer reports
//! them written. A backend stream is topped up to
//! [`BACKEND_STREAM_WINDOW`] as its bytes move on, as far as the client's
//! budget and the node's allow, and always to [`BACKEND_INITIAL_WINDOW`]
//! (so every stream makes progress). A client that does not read thus
//! holds at most its budget plus one floor per stream; the pods wait on
//! their windows, and no byte is dropped.

use std::collections::VecDeque;

use bytes::BytesMut;

use super::{
    BACKEND_CONN_WINDOW, BACKEND_INITIAL_WINDOW, BACKEND_STREAM_WINDOW, Chunk, ConnId, Core,
    Replay, SOFT_OUT_LIMIT, STREAM_WINDOW, Up, route::with_size_update,
};
use crate::{
    flow::SendWindow,
    frame::{self, PeerSettings},
};

/// The hop a pump writes to.
struct Sink<'a> {
    out: &'a mut BytesMut,
    conn: &'a mut SendWindow,
    peer: &'a mut PeerSettings,
}

#[derive(Default)]
struct Pumped {
    /// Frames were written.
    wrote: bool,
    /// Stopped for lack of window or room: retry when that changes.
    blocked: bool,
    /// END_STREAM went out.
    ended: bool,
    /// Flow-control bytes of the chunks passed on whole.
    credit: i64,
    /// DATA frames with payload written.
    data_frames: u32,
}

/// Move `queue`'s chunks to `sink` as stream `sid`, within `stream`'s and
/// the connection's windows, the peer's frame size and the output limit.
/// `replay` keeps what went out (requests only).
fn pump(
    queue: &mut VecDeque<Chunk>,
    stream: &mut SendWindow,
    sid: u32,
    sink: Sink<'_>,
    mut replay: Option<&mut Replay>,
) -> Pumped {
    let mut r = Pumped::default();
    while let Some(front) = queue.front_mut() {
        if sink.out.len() >= SOFT_OUT_LIMIT {
            r.blocked = true;
            break;
        }
        match front {
            Chunk::Headers { block, end } => {
                let fwd = with_size_update(block, &mut sink.peer.size_update);
                frame::headers(sink.out, sid, &fwd, *end, sink.peer.max_frame);
                r.ended |= *end;
                let ch = queue.pop_front().expect("front exists");
                if let Some(rp) = replay.as_deref_mut() {
                    rp.push(ch);
                }
            }
            Chunk::Data { data, end, credit } => {
                let n = (data.len() as i64)
                    .min(stream.get())
                    .min(sink.conn.get())
                    .min(sink.peer.max_frame as i64);
                if n <= 0 && !data.is_empty() {
                    r.blocked = true;
                    break;
                }
                let n = n.max(0);
                let part = data.split_to(n as usize);
                let last = data.is_empty();
                frame::data(sink.out, sid, &part, *end && last);
                stream.consume(n);
                sink.conn.consume(n);
                if n > 0 {
                    r.data_frames += 1;
                }
                let (end, cr) = (*end, *credit);
                if let Some(rp) = replay.as_deref_mut() {
                    rp.push(Chunk::Data {
                        data: part,
                        end: end && last,
                        credit: 0,
                    });
                }
                if last {
                    r.credit += cr;
                    r.ended |= end;
                    queue.pop_front();
                }
            }
        }
        r.wrote = true;
    }
    r
}

impl Core {
    /// Give flow-control credit back to a client for bytes passed on.
    pub(super) fn credit_client(&mut self, c: ConnId, sid: Option<u32>, n: i64) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        if n == 0 || cl.closing {
            return;
        }
        let mut wake = false;
        if let Some(inc) = cl
            .recv
            .release(n, (self.limits.client_buffer as i64 / 4).max(1))
        {
            frame::window_update(&mut cl.out, 0, inc);
            wake = true;
        }
        if let Some(sid) = sid
            && let Some(cs) = cl.streams.get_mut(&sid)
            && !cs.state.recv_closed()
            && let Some(inc) = cs.recv.release(n, STREAM_WINDOW / 2)
        {
            frame::window_update(&mut cl.out, sid, inc);
            wake = true;
        }
        if wake {
            self.wake(c);
        }
    }

    /// Give a backend connection's window back as soon as bytes arrive
    /// (see [`BACKEND_CONN_WINDOW`]).
    pub(super) fn credit_backend_conn(&mut self, b: ConnId, n: i64) {
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        if be.closing {
            return;
        }
        if let Some(inc) = be.recv.release(n, BACKEND_CONN_WINDOW / 4) {
            frame::window_update(&mut be.out, 0, inc);
            if be.connected {
                self.wake(b);
            }
        }
    }

    /// Response bytes of client `c` no longer held (`n` may be 0).
    pub(super) fn release(&mut self, c: ConnId, n: i64) {
        if n == 0 {
            return;
        }
        // A client that is gone was taken out of the node's count whole.
        if let Some(cl) = self.clients.get_mut(&c) {
            cl.held -= n;
            self.held -= n;
        }
    }

    /// Top up the backend window of client stream `sid` as far as the
    /// budgets allow (see the module docs).
    pub(super) fn grant(&mut self, c: ConnId, sid: u32) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        if cl.closing {
            return;
        }
        let Some(cs) = cl.streams.get_mut(&sid) else {
            return;
        };
        let Up::Open(b, bid) = cs.up else {
            return;
        };
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        let Some(bs) = be.streams.get_mut(&bid) else {
            return;
        };
        if bs.state.recv_closed() || be.closing {
            return;
        }
        let stream_held = bs.recv.available() + cs.down_bytes;
        let want = BACKEND_STREAM_WINDOW - stream_held;
        // The floor only for a client that took everything we sent it: one
        // that stopped reading gets nothing past the budgets.
        let floor = if cl.out_data + cl.writing == 0 {
            BACKEND_INITIAL_WINDOW - stream_held
        } else {
            0
        };
        if want < BACKEND_STREAM_WINDOW / 2 && floor <= 0 {
            // Batch: one WINDOW_UPDATE per half window.
            return;
        }
        let room = (self.limits.client_buffer as i64 - cl.held)
            .min(self.limits.buffer_limit as i64 - self.held);
        let g = want.min(room.max(floor));
        if g < want && !cs.short {
            cs.short = true;
            cl.short.push(sid);
        }
        if g <= 0 {
            return;
        }
        frame::window_update(&mut be.out, bid, bs.recv.grant(g));
        cl.held += g;
        self.held += g;
        if be.connected {
            self.wake(b);
        }
    }

    /// Budget came back to client `c`: top up the streams it cut short.
    pub(super) fn regrant(&mut self, c: ConnId) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        if cl.short.is_empty() {
            return;
        }
        let short = std::mem::take(&mut cl.short);
        for sid in short {
            if let Some(cs) = self.cstream(c, sid) {
                cs.short = false;
            }
            self.grant(c, sid);
        }
    }

    /// Move a stream's request chunks to its backend.
    pub(super) fn pump_up(&mut self, c: ConnId, sid: u32) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        let Some(cs) = cl.streams.get_mut(&sid) else {
            return;
        };
        let (b, bid) = match cs.up {
            Up::Open(b, bid) => (b, bid),
            Up::Queued(_) => return,
            Up::Done => {
                // Nobody takes them: the client gets its credit back.
                let credit: i64 = cs.to_up.drain(..).map(|ch| ch.credit()).sum();
                self.credit_client(c, Some(sid), credit);
                return;
            }
        };
        let Some(be) = self.backends.get_mut(&b) else {
            return;
        };
        if be.closing {
            // Its GOAWAY is out: nothing more goes there; the streams are
            // dealt with when the connection is gone.
            return;
        }
        let r = pump(
            &mut cs.to_up,
            &mut cs.up_window,
            bid,
            Sink {
                out: &mut be.out,
                conn: &mut be.send,
                peer: &mut be.peer,
            },
            Some(&mut cs.replay),
        );
        if r.blocked && !cs.blocked_up {
            cs.blocked_up = true;
            be.blocked.push((c, sid));
        }
        if r.ended
            && let Some(bs) = be.streams.get_mut(&bid)
        {
            bs.state.send_end();
        }
        if r.wrote && be.connected {
            self.wake(b);
        }
        self.credit_client(c, Some(sid), r.credit);
        if r.ended {
            self.maybe_close_bstream(b, bid);
        }
    }

    /// Move a stream's response chunks to its client.
    pub(super) fn pump_down(&mut self, c: ConnId, sid: u32) {
        let Some(cl) = self.clients.get_mut(&c) else {
            return;
        };
        if cl.closing {
            return;
        }
        let Some(cs) = cl.streams.get_mut(&sid) else {
            return;
        };
        let mut r = pump(
            &mut cs.to_down,
            &mut cs.down_window,
            sid,
            Sink {
                out: &mut cl.out,
                conn: &mut cl.send,
                peer: &mut cl.peer,
            },
            None,
        );
        if r.blocked && !cs.blocked_down {
            cs.blocked_down = true;
            cl.blocked.push(sid);
        }
        if r.ended {
            cs.state.send_end();
        }
        // What went into the output leaves the queue's count but stays in
        // the budget until it is written.
        cs.down_bytes -= r.credit;
        cl.out_data += r.credit;
        cl.calm.useful_times(r.data_frames);
        if cs.state.send_closed() && cs.to_down.is_empty() && cs.rst_after_down {
            if cs.state.recv_closed() {
                cs.rst_after_down = false;
            } else {
                frame::rst(&mut cl.out, sid, frame::Reason::NO_ERROR);
                r.wrote = true;
            }
            cs.state = super::state::State::Closed;
        }
        if r.wrote {
            self.wake(c);
        }
        if r.credit > 0 {
            self.grant(c, sid);
        }
        self.finish_if_done(c, sid);
    }
}
