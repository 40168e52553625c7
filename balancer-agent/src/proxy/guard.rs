//! The client side of a router connection, checked frame by frame before
//! the HTTP/2 server sees it.
//!
//! The `h2` crate answers a frame that breaks a size rule (too long for
//! SETTINGS_MAX_FRAME_SIZE, a SETTINGS length that is not a multiple of 6,
//! a PING that is not 8 bytes...) with GOAWAY(PROTOCOL_ERROR); RFC 9113
//! requires FRAME_SIZE_ERROR. This wrapper follows frame boundaries in both
//! directions (no payload is buffered); on a violation it hands h2 only the
//! valid frames before it, writes GOAWAY(FRAME_SIZE_ERROR) itself at the
//! next frame boundary of the outgoing stream, and ends the connection.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use balancer_common::h2frame::{self, Tracker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Guarded<S> {
    inner: S,
    incoming: Tracker,
    outgoing: Tracker,
    /// Our GOAWAY went out (or could not): swallow h2's later writes.
    closed: bool,
}

impl<S> Guarded<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            incoming: Tracker::new(true, h2frame::DEFAULT_MAX_FRAME_SIZE),
            // Our own frames are trusted; only their boundaries matter.
            outgoing: Tracker::new(false, u32::MAX),
            closed: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guarded<S> {
    /// Write GOAWAY if the outgoing stream is between frames; either way
    /// the connection is over afterwards.
    fn poll_goaway(&mut self, cx: &mut Context<'_>, code: u32) {
        if self.closed {
            return;
        }
        self.closed = true;
        if self.outgoing.at_boundary {
            let frame = h2frame::goaway(self.incoming.last_stream, code);
            // 17 bytes into an idle socket; a short or pending write just
            // means the peer sees the close without the code.
            let _ = Pin::new(&mut self.inner).poll_write(cx, &frame);
            let _ = Pin::new(&mut self.inner).poll_flush(cx);
        }
        let _ = Pin::new(&mut self.inner).poll_shutdown(cx);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(code) = this.incoming.failed() {
            this.poll_goaway(cx, code);
            // EOF for h2.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                let n = new.len();
                let ok = this.incoming.feed(new);
                if ok < n {
                    buf.set_filled(before + ok);
                    if ok == 0 {
                        let code = this.incoming.failed().unwrap_or(h2frame::PROTOCOL_ERROR);
                        this.poll_goaway(cx, code);
                    }
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(data.len()));
        }
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                this.outgoing.feed(&data[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
