//! PRIORITY (RFC 9113 6.3) and the priority fields of HEADERS. RFC 9113
//! deprecates the signal; the router neither forwards nor honours it, but
//! it still enforces the one rule a server must: a stream cannot depend on
//! itself (5.3.1, a stream error PROTOCOL_ERROR).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    pub dependency: u32,
    pub exclusive: bool,
    pub weight: u8,
}

impl Priority {
    /// The 5 bytes of a PRIORITY payload or of HEADERS' priority fields.
    pub fn parse(p: &[u8]) -> Self {
        let d = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
        Self {
            dependency: d & 0x7fff_ffff,
            exclusive: d & 0x8000_0000 != 0,
            weight: p[4],
        }
    }
}
