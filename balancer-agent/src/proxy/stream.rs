//! Forwarding one HTTP/2 stream from a client to a backend and back.
//!
//! Each hop has its own flow control: the client's window is only released
//! once the backend accepted the bytes, and the response is only read as
//! fast as the client's window lets it out, so a slow reader on either side
//! pushes back instead of growing buffers.
//!
//! A stream the backend never processed (REFUSED_STREAM, or above the
//! last-stream-id of its GOAWAY) is retried on another endpoint, replaying
//! the request body read so far (up to [`REPLAY_LIMIT`]); once any response
//! reached the client, or more body than that was sent, it is not.

use std::{future::poll_fn, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream, server::SendResponse};
use http::{HeaderMap, Request, Response};

use super::{Router, balance::InFlight};

/// Request body kept for a retry.
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// Attempts per stream. Only unprocessed failures are retried, which is
/// always safe; a backend that closes every connection with GOAWAY after one
/// request under 16 concurrent streams needed more than 3 here.
const MAX_ATTEMPTS: usize = 8;

/// Why an attempt failed.
#[derive(Debug)]
enum Failure {
    /// Nothing of the stream was processed: another endpoint may take it.
    Unprocessed,
    /// The stream is over: reset the client's stream with this reason.
    Reset(Reason),
    /// The client went away or reset the stream: nothing to tell it.
    ClientGone,
}

fn classify_backend(e: &h2::Error) -> Failure {
    if e.reason() == Some(Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote()) {
        Failure::Unprocessed
    } else {
        Failure::Reset(e.reason().unwrap_or(Reason::INTERNAL_ERROR))
    }
}

/// The client's request body, replayable while it is small.
struct Body {
    recv: RecvStream,
    replay: Vec<Bytes>,
    replay_bytes: usize,
    replayable: bool,
    /// The client's body has ended (all of it is in `replay` if replayable).
    ended: bool,
    trailers: Option<HeaderMap>,
}

impl Body {
    fn new(recv: RecvStream) -> Self {
        let ended = recv.is_end_stream();
        Self {
            recv,
            replay: Vec::new(),
            replay_bytes: 0,
            replayable: true,
            ended,
            trailers: None,
        }
    }

    /// Copy the body to the backend: first what an earlier attempt read,
    /// then the rest from the client.
    async fn pump(&mut self, up: &mut SendStream<Bytes>) -> Result<(), Failure> {
        let n = self.replay.len();
        for i in 0..n {
            let last = self.ended && self.trailers.is_none() && i + 1 == n;
            send_all(up, self.replay[i].clone(), last)
                .await
                .map_err(|e| classify_backend(&e))?;
        }
        if self.ended {
            if let Some(t) = &self.trailers {
                up.send_trailers(t.clone())
                    .map_err(|e| classify_backend(&e))?;
            } else if n == 0 {
                up.send_data(Bytes::new(), true)
                    .map_err(|e| classify_backend(&e))?;
            }
            return Ok(());
        }
        loop {
            match self.recv.data().await {
                Some(Ok(chunk)) => {
                    let len = chunk.len();
                    let eos = self.recv.is_end_stream();
                    if self.replayable {
                        if self.replay_bytes + len <= REPLAY_LIMIT {
                            self.replay.push(chunk.clone());
                            self.replay_bytes += len;
                        } else {
                            self.replayable = false;
                            self.replay = Vec::new();
                        }
                    }
                    send_all(up, chunk, eos)
                        .await
                        .map_err(|e| classify_backend(&e))?;
                    let _ = self.recv.flow_control().release_capacity(len);
                    if eos {
                        self.ended = true;
                        return Ok(());
                    }
                }
                Some(Err(_)) => return Err(Failure::ClientGone),
                None => {
                    let trailers = self
                        .recv
                        .trailers()
                        .await
                        .map_err(|_| Failure::ClientGone)?;
                    self.ended = true;
                    match &trailers {
                        Some(t) => up.send_trailers(t.clone()),
                        None => up.send_data(Bytes::new(), true),
                    }
                    .map_err(|e| classify_backend(&e))?;
                    self.trailers = trailers;
                    return Ok(());
                }
            }
        }
    }
}

/// Send `data` as flow control allows.
async fn send_all(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
    eos: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        return stream.send_data(data, eos);
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(cap)) => cap,
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(Reason::CANCEL)),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        stream.send_data(chunk, eos && data.is_empty())?;
    }
    Ok(())
}

/// Serve one client stream.
pub async fn forward(
    router: Arc<Router>,
    vip: SocketAddr,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (parts, recv) = req.into_parts();
    let mut body = Body::new(recv);
    let mut tried = Vec::new();
    for _ in 0..MAX_ATTEMPTS {
        let Some(ep) = router.pick(vip, &tried) else {
            respond.send_reset(Reason::REFUSED_STREAM);
            return;
        };
        tried.push(ep.addr);
        let inflight = ep.start();
        match attempt(&router, &parts, &mut body, &mut respond, &inflight).await {
            Ok(()) => return,
            Err(Failure::Unprocessed) if body.replayable => {
                ep.failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(endpoint = %ep.addr, "stream not processed; retrying elsewhere");
            }
            Err(Failure::Unprocessed) => {
                respond.send_reset(Reason::REFUSED_STREAM);
                return;
            }
            Err(Failure::Reset(reason)) => {
                ep.failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                respond.send_reset(reason);
                return;
            }
            Err(Failure::ClientGone) => return,
        }
    }
    respond.send_reset(Reason::REFUSED_STREAM);
}

async fn attempt(
    router: &Router,
    parts: &http::request::Parts,
    body: &mut Body,
    respond: &mut SendResponse<Bytes>,
    inflight: &InFlight,
) -> Result<(), Failure> {
    let addr = inflight.ep.addr;
    let sender = router
        .backends
        .get(addr)
        .await
        .map_err(|_| Failure::Unprocessed)?;
    let mut sender = sender.ready().await.map_err(|_| {
        router.backends.evict(addr);
        Failure::Unprocessed
    })?;
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    let no_body = body.ended && body.replay.is_empty() && body.trailers.is_none();
    inflight.sent();
    let (mut resp_fut, mut up) = sender.send_request(req, no_body).map_err(|e| {
        router.backends.evict(addr);
        classify_backend(&e)
    })?;

    let upload = async {
        if no_body {
            Ok(())
        } else {
            body.pump(&mut up).await
        }
    };
    tokio::pin!(upload);
    let mut up_done = no_body;

    // Phase 1: wait for the response headers, pumping the request body,
    // and watching for the client's cancel.
    let resp = loop {
        tokio::select! {
            r = &mut upload, if !up_done => {
                up_done = true;
                // A backend-side failure of the upload (the stream was
                // refused, the connection is going away) is classified by
                // the response below, which knows whether it was processed.
                if let Err(Failure::ClientGone) = r {
                    return Err(Failure::ClientGone);
                }
            }
            r = &mut resp_fut => break r,
            reason = poll_fn(|cx| respond.poll_reset(cx)) => {
                let _ = reason;
                return Err(Failure::ClientGone);
            }
        }
    };
    let resp = resp.map_err(|e| {
        if e.is_go_away() {
            router.backends.evict(addr);
        }
        classify_backend(&e)
    })?;
    inflight.responded();
    let (rparts, mut rbody) = resp.into_parts();
    let resp_eos = rbody.is_end_stream();
    let head = Response::from_parts(rparts, ());
    let mut down = respond
        .send_response(head, resp_eos)
        .map_err(|_| Failure::ClientGone)?;
    if resp_eos {
        return Ok(());
    }

    // Phase 2: the response body (and trailers), while any request body
    // still flows the other way. From here on nothing is retried.
    let download = async {
        loop {
            match rbody.data().await {
                Some(Ok(chunk)) => {
                    let len = chunk.len();
                    let eos = rbody.is_end_stream();
                    send_all(&mut down, chunk, eos)
                        .await
                        .map_err(|_| Failure::ClientGone)?;
                    let _ = rbody.flow_control().release_capacity(len);
                    if eos {
                        return Ok(());
                    }
                }
                Some(Err(e)) => {
                    let reason = e.reason().unwrap_or(Reason::INTERNAL_ERROR);
                    down.send_reset(reason);
                    return Err(Failure::Reset(reason));
                }
                None => {
                    match rbody.trailers().await {
                        Ok(Some(t)) => down.send_trailers(t).map_err(|_| Failure::ClientGone)?,
                        Ok(None) => down
                            .send_data(Bytes::new(), true)
                            .map_err(|_| Failure::ClientGone)?,
                        Err(e) => {
                            let reason = e.reason().unwrap_or(Reason::INTERNAL_ERROR);
                            down.send_reset(reason);
                            return Err(Failure::Reset(reason));
                        }
                    }
                    return Ok(());
                }
            }
        }
    };
    tokio::pin!(download);
    loop {
        tokio::select! {
            r = &mut upload, if !up_done => {
                up_done = true;
                if let Err(f) = r {
                    // The backend may have finished reading (it answered);
                    // a client cancel ends the stream.
                    if matches!(f, Failure::ClientGone) {
                        return Err(f);
                    }
                }
            }
            r = &mut download => {
                return match r {
                    // The response went out already; a backend reset after
                    // it was also passed on in `download`.
                    Err(Failure::Reset(_)) => Err(Failure::ClientGone),
                    other => other,
                };
            }
        }
    }
}
