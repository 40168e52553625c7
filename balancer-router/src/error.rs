//! The router's HTTP/2 errors: a connection error ends the whole
//! connection with GOAWAY, a stream error only that stream with
//! RST_STREAM (RFC 9113 5.4). `why` is for the log and never reaches the
//! peer.

use crate::{frame::Reason, hpack::BlockError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("connection error {reason}: {why}")]
    Conn { reason: Reason, why: &'static str },
    #[error("stream {stream} error {reason}: {why}")]
    Stream {
        stream: u32,
        reason: Reason,
        why: &'static str,
    },
}

impl Error {
    pub fn conn(reason: Reason, why: &'static str) -> Self {
        Error::Conn { reason, why }
    }

    pub fn stream(stream: u32, reason: Reason, why: &'static str) -> Self {
        Error::Stream {
            stream,
            reason,
            why,
        }
    }

    /// A header block's error on `stream`: decoding errors are the
    /// connection's (the peer's HPACK state is unknown from there on), a
    /// malformed message is the stream's. A list over the limit ends only
    /// the stream too (the client hop answers a new request with 431 or
    /// gRPC's RESOURCE_EXHAUSTED before it gets here, and ends a bomb's
    /// connection): ENHANCE_YOUR_CALM, which gRPC reads as
    /// RESOURCE_EXHAUSTED.
    pub fn block(stream: u32, e: &BlockError) -> Self {
        match e {
            BlockError::Compression(_) => {
                Error::conn(Reason::COMPRESSION_ERROR, "header block cannot be decoded")
            }
            BlockError::TooLarge(_) | BlockError::FieldTooLarge(_) => {
                Error::stream(stream, Reason::ENHANCE_YOUR_CALM, "header list too large")
            }
            BlockError::Malformed(why) => Error::stream(stream, Reason::PROTOCOL_ERROR, why),
        }
    }
}
