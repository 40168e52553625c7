//! HPACK, only as far as a router that forwards header blocks must go
//! (DESIGN.md 3).
//!
//! The router advertises SETTINGS_HEADER_TABLE_SIZE = 0 to every peer. Once
//! a peer has applied it, every header block it sends is self-contained: it
//! may start with a table size update to 0 and refers to the static table
//! only. Such a block is forwarded as it is, on any connection, after
//! [`check_self_contained`] proved that (a block that refers to the dynamic
//! table would be decoded by the next hop against an unrelated table: on a
//! shared backend connection that is another client's header, or a
//! COMPRESSION_ERROR that kills every stream on it).
//!
//! Before a client has ACKed our SETTINGS it may still use the default
//! 4,096-byte dynamic table, so those blocks are decoded ([`PreAck`]) and
//! re-encoded as literals that use no table at all.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

/// Static table entries (RFC 7541 Appendix A).
const STATIC_ENTRIES: u64 = 61;
/// A decoded header list above this is refused (ENHANCE_YOUR_CALM): a
/// small block can expand a lot through indexed references.
pub const MAX_DECODED: usize = 256 * 1024;
/// The table a client may use before it ACKs our settings (the default).
const DEFAULT_TABLE: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    #[error("header block is truncated")]
    Truncated,
    #[error("header block integer overflows")]
    Overflow,
    #[error("header block refers to index {0}, outside the static table")]
    DynamicReference(u64),
    #[error("header block refers to index 0")]
    ZeroIndex,
    #[error("table size update to {0} after the table size 0 was set")]
    TableSize(u64),
    #[error("table size update after the first header field")]
    LateSizeUpdate,
    #[error("header block cannot be decoded: {0}")]
    Decode(String),
    #[error("decoded header list exceeds {MAX_DECODED} bytes")]
    TooLarge,
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 5.1): value and the
/// bytes it took.
fn integer(b: &[u8], n: u8) -> Result<(u64, usize), HpackError> {
    let mask = (1u16 << n) as u64 - 1;
    let first = *b.first().ok_or(HpackError::Truncated)? as u64 & mask;
    if first < mask {
        return Ok((first, 1));
    }
    let mut value = mask;
    let mut shift = 0u32;
    for (i, byte) in b.iter().enumerate().skip(1) {
        if shift > 28 {
            return Err(HpackError::Overflow);
        }
        value += u64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(HpackError::Truncated)
}

/// Skip a string literal (RFC 7541 5.2); returns the bytes it took.
fn skip_string(b: &[u8]) -> Result<usize, HpackError> {
    let (len, n) = integer(b, 7)?;
    let end = (n as u64).checked_add(len).ok_or(HpackError::Overflow)?;
    if end > b.len() as u64 {
        return Err(HpackError::Truncated);
    }
    Ok(end as usize)
}

/// Check that a header block uses no dynamic table: every index is in the
/// static table, and table size updates (only at the start) set 0.
pub fn check_self_contained(block: &[u8]) -> Result<(), HpackError> {
    let mut at = 0;
    let mut fields = 0usize;
    while at < block.len() {
        let b = &block[at..];
        let first = b[0];
        let used = if first & 0x80 != 0 {
            // Indexed field.
            let (idx, n) = integer(b, 7)?;
            check_index(idx, false)?;
            fields += 1;
            n
        } else if first & 0xe0 == 0x20 {
            // Dynamic table size update.
            if fields > 0 {
                return Err(HpackError::LateSizeUpdate);
            }
            let (size, n) = integer(b, 5)?;
            if size != 0 {
                return Err(HpackError::TableSize(size));
            }
            n
        } else {
            // A literal: with incremental indexing (6-bit name index), or
            // without / never indexed (4-bit).
            let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
            let (idx, mut n) = integer(b, prefix)?;
            check_index(idx, true)?;
            if idx == 0 {
                n += skip_string(&b[n..])?;
            }
            n += skip_string(&b[n..])?;
            fields += 1;
            n
        };
        at += used;
    }
    Ok(())
}

fn check_index(idx: u64, literal: bool) -> Result<(), HpackError> {
    if idx == 0 && !literal {
        return Err(HpackError::ZeroIndex);
    }
    if idx > STATIC_ENTRIES {
        return Err(HpackError::DynamicReference(idx));
    }
    Ok(())
}

fn put_integer(out: &mut BytesMut, prefix_bits: u8, n: u8, mut value: u64) {
    let mask = (1u16 << n) as u64 - 1;
    if value < mask {
        out.put_u8(prefix_bits | value as u8);
        return;
    }
    out.put_u8(prefix_bits | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

fn put_string(out: &mut BytesMut, s: &[u8]) {
    put_integer(out, 0, 7, s.len() as u64);
    out.put_slice(s);
}

/// The decoder for a client's header blocks sent before it ACKed our
/// SETTINGS (when it may still use a dynamic table).
pub struct PreAck {
    decoder: loona_hpack::Decoder<'static>,
}

impl Default for PreAck {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(DEFAULT_TABLE);
        Self { decoder }
    }
}

impl PreAck {
    /// Decode a block against the client's table and re-encode it as
    /// literals without indexing (RFC 7541 6.2.2), which any decoder reads
    /// the same way whatever its table holds. Never-indexed fields keep
    /// that representation (6.2.3: intermediaries must).
    pub fn reencode(&mut self, block: &[u8]) -> Result<Bytes, HpackError> {
        // Which fields were "never indexed" cannot be told from the
        // callback; sensitive values are re-sent as never indexed when
        // the source said so, found by walking the block alongside.
        let mut never = Vec::new();
        walk_never_indexed(block, &mut never);
        let mut out = BytesMut::with_capacity(block.len() * 2 + 16);
        let mut decoded = 0usize;
        let mut i = 0usize;
        let mut too_large = false;
        self.decoder
            .decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| {
                decoded += name.len() + value.len() + 32;
                if decoded > MAX_DECODED {
                    too_large = true;
                    return;
                }
                let prefix = if never.get(i).copied().unwrap_or(false) {
                    0x10
                } else {
                    0x00
                };
                i += 1;
                put_integer(&mut out, prefix, 4, 0);
                put_string(&mut out, &name);
                put_string(&mut out, &value);
            })
            .map_err(|e| HpackError::Decode(format!("{e:?}")))?;
        if too_large {
            return Err(HpackError::TooLarge);
        }
        Ok(out.freeze())
    }
}

/// For each header field of a block, whether it is "never indexed". Stops
/// quietly on a malformed block (the decoder reports it).
fn walk_never_indexed(block: &[u8], never: &mut Vec<bool>) {
    let mut at = 0;
    while at < block.len() {
        let b = &block[at..];
        let first = b[0];
        let step = if first & 0x80 != 0 {
            never.push(false);
            integer(b, 7).map(|(_, n)| n)
        } else if first & 0xe0 == 0x20 {
            integer(b, 5).map(|(_, n)| n)
        } else {
            let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
            never.push(first & 0xf0 == 0x10);
            integer(b, prefix).and_then(|(idx, mut n)| {
                if idx == 0 {
                    n += skip_string(&b[n..])?;
                }
                n += skip_string(&b[n..])?;
                Ok(n)
            })
        };
        match step {
            Ok(n) => at += n,
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7541 C.3: three requests without Huffman coding, the second and
    /// third referring to entries the first added.
    const C3: [&str; 3] = [
        "828684410f7777772e6578616d706c652e636f6d",
        "828684be58086e6f2d6361636865",
        "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
    ];

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn decode_fresh(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        loona_hpack::Decoder::new().decode(block).expect("decodes")
    }

    #[test]
    fn dynamic_references_are_found() {
        assert_eq!(check_self_contained(&hex(C3[0])), Ok(()));
        assert_eq!(
            check_self_contained(&hex(C3[1])),
            Err(HpackError::DynamicReference(62))
        );
        // A size update to 0 first is fine; to anything else, or late, not.
        assert_eq!(check_self_contained(&[0x20, 0x82]), Ok(()));
        assert!(check_self_contained(&[0x3f, 0xe1, 0x1f]).is_err());
        assert_eq!(
            check_self_contained(&[0x82, 0x20]),
            Err(HpackError::LateSizeUpdate)
        );
        assert_eq!(check_self_contained(&[0x80]), Err(HpackError::ZeroIndex));
        // A literal whose value runs past the end.
        assert_eq!(
            check_self_contained(&[0x40, 0x01, b'a', 0x05, b'b']),
            Err(HpackError::Truncated)
        );
        // An integer that never ends, or overflows.
        assert!(check_self_contained(&[0xff, 0xff, 0xff]).is_err());
        assert_eq!(
            check_self_contained(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(HpackError::Overflow)
        );
    }

    #[test]
    fn pre_ack_blocks_are_re_encoded_without_the_table() {
        let mut pre = PreAck::default();
        let mut client_table = loona_hpack::Decoder::new();
        for block in C3 {
            let block = hex(block);
            let want = client_table.decode(&block).expect("rfc example");
            let re = pre.reencode(&block).expect("re-encodes");
            // Self-contained, and any fresh decoder reads the same list.
            check_self_contained(&re).expect("self-contained");
            assert_eq!(decode_fresh(&re), want);
        }
    }

    #[test]
    fn never_indexed_stays_never_indexed_and_bombs_are_refused() {
        let mut pre = PreAck::default();
        // Never indexed, literal name "a", value "b".
        let re = pre.reencode(&[0x10, 1, b'a', 1, b'b']).expect("ok");
        assert_eq!(re[0] & 0xf0, 0x10);
        // One 4 KiB entry, referred to 100 times in a 100-byte block.
        let mut block = vec![0x40, 1, b'x'];
        put_integer_vec(&mut block, 4000);
        block.extend(std::iter::repeat_n(b'v', 4000));
        let mut big = PreAck::default();
        big.reencode(&block).expect("adds the entry");
        assert_eq!(big.reencode(&[0xbe; 100]), Err(HpackError::TooLarge));
    }

    fn put_integer_vec(v: &mut Vec<u8>, value: u64) {
        let mut b = BytesMut::new();
        put_integer(&mut b, 0, 7, value);
        v.extend_from_slice(&b);
    }
}
