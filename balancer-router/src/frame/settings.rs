//! SETTINGS (RFC 9113 6.5): what a peer told us, and writing ours.

use bytes::{BufMut, BytesMut};

use super::{DEFAULT_MAX_FRAME_SIZE, FLAG_ACK, Reason, SETTINGS, head, setting};
use crate::{error::Error, flow::MAX_WINDOW};

/// The default initial window, per stream and per connection.
pub const DEFAULT_WINDOW: i64 = 65_535;

/// What a peer's SETTINGS told us (RFC 9113 6.5.2).
pub struct PeerSettings {
    /// Its decoder table changed: start the next block we send it with a
    /// table size update.
    pub size_update: bool,
    pub max_frame: usize,
    pub init_window: i64,
    pub max_streams: usize,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: the largest header list (RFC 7541
    /// 4.1's size) it says it accepts; unlimited until it names one
    /// (6.5.2). A pod's is honoured: a request over it is answered by the
    /// router rather than sent (gRPC servers refuse one over their limit,
    /// some servers by ending the whole connection).
    pub max_header_list: usize,
}

impl PeerSettings {
    pub fn new(max_streams: usize) -> Self {
        Self {
            size_update: false,
            max_frame: DEFAULT_MAX_FRAME_SIZE as usize,
            init_window: DEFAULT_WINDOW,
            max_streams,
            max_header_list: usize::MAX,
        }
    }

    /// Apply a SETTINGS payload; returns the change of the initial stream
    /// window, which the caller applies to the open streams.
    pub fn apply(&mut self, p: &[u8]) -> Result<i64, Error> {
        let mut delta = 0;
        for s in p.chunks_exact(6) {
            let ident = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match ident {
                setting::HEADER_TABLE_SIZE => self.size_update = true,
                setting::ENABLE_PUSH if v > 1 => {
                    return Err(Error::conn(
                        Reason::PROTOCOL_ERROR,
                        "ENABLE_PUSH not 0 or 1",
                    ));
                }
                setting::MAX_CONCURRENT_STREAMS => self.max_streams = v as usize,
                setting::INITIAL_WINDOW_SIZE => {
                    if i64::from(v) > MAX_WINDOW {
                        return Err(Error::conn(
                            Reason::FLOW_CONTROL_ERROR,
                            "INITIAL_WINDOW_SIZE above 2^31-1",
                        ));
                    }
                    delta += i64::from(v) - self.init_window;
                    self.init_window = i64::from(v);
                }
                setting::MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME_SIZE..=0xff_ffff).contains(&v) {
                        return Err(Error::conn(Reason::PROTOCOL_ERROR, "MAX_FRAME_SIZE"));
                    }
                    self.max_frame = v as usize;
                }
                setting::MAX_HEADER_LIST_SIZE => self.max_header_list = v as usize,
                _ => {}
            }
        }
        Ok(delta)
    }
}

pub fn settings(out: &mut BytesMut, values: &[(u16, u32)]) {
    head(out, values.len() * 6, SETTINGS, 0, 0);
    for (id, v) in values {
        out.put_u16(*id);
        out.put_u32(*v);
    }
}

pub fn settings_ack(out: &mut BytesMut) {
    head(out, 0, SETTINGS, FLAG_ACK, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::setting;

    #[test]
    fn max_header_list_size_is_kept() {
        let mut p = PeerSettings::new(100);
        assert_eq!(p.max_header_list, usize::MAX, "unlimited until named");
        let mut b = BytesMut::new();
        settings(&mut b, &[(setting::MAX_HEADER_LIST_SIZE, 16_384)]);
        assert_eq!(p.apply(&b[9..]).expect("valid"), 0);
        assert_eq!(p.max_header_list, 16_384);
    }
}
