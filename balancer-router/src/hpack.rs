//! HPACK, only as far as a router that forwards header blocks unchanged
//! must go (it routes by stream id, so blocks pass as they are once no
//! dynamic table can be in play), and the checks that make a header block safe to forward.
//!
//! The router advertises SETTINGS_HEADER_TABLE_SIZE = 0 to every peer. Once
//! a peer has applied it, every header block it sends is self-contained: it
//! may start with a table size update to 0 and refers to the static table
//! only. Such a block is forwarded as it is, on any connection, after
//! [`check_block`] walked it whole. Backend connections are shared by every
//! client of the node, so the walk refuses every byte that a conformant
//! server could answer with a connection error: a block that refers to the
//! dynamic table (the next hop would read it against an unrelated table:
//! another client's header, or a COMPRESSION_ERROR), a bad integer, length
//! or Huffman code, a misplaced table size update, and strings or integers
//! longer than common servers accept. It also refuses the malformed
//! messages of RFC 9113 8.1.1, 8.2 and 8.3, as errors of the sender's
//! stream alone.
//!
//! Before a client has ACKed our SETTINGS it may still use the default
//! 4,096-byte dynamic table, so those blocks are decoded ([`PreAck`]) and
//! re-encoded as literals that use no table at all.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

use crate::huffman::{self, HuffmanError};

/// Static table entries (RFC 7541 Appendix A).
const STATIC_ENTRIES: u64 = 61;
/// A decoded header list above this is refused (ENHANCE_YOUR_CALM): a
/// small block can expand a lot through indexed references.
pub const MAX_DECODED: usize = 256 * 1024;
/// The table a client may use before it ACKs our settings (the default).
const DEFAULT_TABLE: usize = 4096;
/// The longest string literal [`check_block`] lets through by default,
/// counted as sent (Huffman-coded or not): nghttp2's limit (COMPRESSION_ERROR
/// above `NGHTTP2_HD_MAX_NV`, 65,536 bytes, which ends the whole
/// connection). It is no lower than the router's header list limit
/// (`core::MAX_HEADER_LIST`), so within that list one field may be as large
/// as the list allows; only a Huffman code longer than its text (which no
/// encoder chooses) reaches it first. nginx ends its connection on far
/// shorter fields (above `large_client_header_buffers`' 8 KiB), but with
/// pod connections per client namespace that ends only the sender's own.
pub const MAX_STRING: usize = 64 * 1024;
/// Bytes an integer may take after its prefix. nginx refuses integers of
/// more than 4 bytes in all, h2 (Rust) of more than 5, as COMPRESSION_ERROR
/// (RFC 7541 5.1 lets a decoder limit them); 3 bytes still carry 2^21 - 1,
/// more than any string we let through.
const MAX_INTEGER_TAIL: usize = 3;
/// Table size updates a block may start with: two are all RFC 7541 4.2 has
/// a use for (the smallest size since the last block, then the final one).
const MAX_SIZE_UPDATES: u8 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    #[error("header block is truncated")]
    Truncated,
    #[error("header block integer is longer than {MAX_INTEGER_TAIL} bytes after its prefix")]
    Overflow,
    #[error("header block refers to index {0}, outside the static table")]
    DynamicReference(u64),
    #[error("header block refers to index 0")]
    ZeroIndex,
    #[error("table size update to {0}, above the size allowed")]
    TableSize(u64),
    #[error("table size update after the first header field")]
    LateSizeUpdate,
    #[error("more than {MAX_SIZE_UPDATES} table size updates")]
    TooManySizeUpdates,
    #[error("header block has a bad Huffman-coded string: {0}")]
    Huffman(#[from] HuffmanError),
    #[error("header block cannot be decoded: {0}")]
    Decode(String),
    #[error("decoded header list exceeds {MAX_DECODED} bytes")]
    TooLarge,
}

/// Which message a header block opens or ends, for RFC 9113 8.3's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A request's header section (client to backend).
    Request,
    /// A request's trailers.
    RequestTrailers,
    /// A response's header section, informational (1xx) or final; a
    /// trailers-only response is one too.
    Response,
    /// A response's trailers.
    ResponseTrailers,
}

/// What [`check_block`] learnt on the way, for the caller's own checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockInfo {
    /// `:status` of a response.
    pub status: Option<u16>,
    /// `content-length`, to hold DATA to (RFC 9113 8.1.1).
    pub content_length: Option<u64>,
    /// The decoded list's size: name + value + 32 per field (RFC 7541 4.1).
    pub list_size: usize,
    /// Header fields in the block.
    pub fields: usize,
    /// The block starts with a table size update (needed once after a peer
    /// ACKs a smaller SETTINGS_HEADER_TABLE_SIZE, RFC 7541 4.2).
    pub size_update: bool,
    /// A request whose `:method` is CONNECT.
    pub is_connect: bool,
    /// A request whose `:method` is HEAD (its response's content-length
    /// describes no DATA).
    pub is_head: bool,
    /// `grpc-status`, in trailers or a trailers-only response, if it is a
    /// decimal number.
    pub grpc_status: Option<u32>,
    /// A `content-type` starting with `application/grpc`: a gRPC message,
    /// to be refused the gRPC way (a Trailers-Only response).
    pub grpc: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    /// RFC 9113 4.3 / RFC 7541: the block cannot be decoded (or not by
    /// every conformant server): connection error COMPRESSION_ERROR.
    #[error("header block cannot be decoded: {0}")]
    Compression(#[from] HpackError),
    /// The decoded list exceeds [`Limits::max_list`] (a peer that ignores
    /// the SETTINGS_MAX_HEADER_LIST_SIZE we advertise). What the block
    /// holds is reported all the same (the walk went to its end), so
    /// that the caller can tell a big but honest list, which it refuses
    /// on that stream alone (431, or gRPC's RESOURCE_EXHAUSTED), from a
    /// bomb, which ends the connection (ENHANCE_YOUR_CALM). The block
    /// refers to no table, so no HPACK state is lost if only the stream
    /// ends.
    #[error("header list too large")]
    TooLarge(BlockInfo),
    /// The list is within the limit but one string exceeds
    /// [`Limits::max_string`] as sent, which some servers refuse by ending
    /// the whole connection: the caller refuses the message as for
    /// [`BlockError::TooLarge`], with the same report.
    #[error("header field too large")]
    FieldTooLarge(BlockInfo),
    /// A malformed message (RFC 9113 8.1.1, 8.2, 8.3): stream error
    /// PROTOCOL_ERROR on that stream only.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// The sizes [`check_block_with`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The decoded list's size (RFC 7541 4.1), as in
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_list: usize,
    /// One string literal's length as sent (see [`MAX_STRING`]).
    pub max_string: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_list: MAX_DECODED,
            max_string: MAX_STRING,
        }
    }
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 5.1): value and the
/// bytes it took.
fn integer(b: &[u8], n: u8) -> Result<(u64, usize), HpackError> {
    let mask = (1u8 << n) - 1;
    let first = *b.first().ok_or(HpackError::Truncated)? & mask;
    if first < mask {
        return Ok((u64::from(first), 1));
    }
    let mut value = u64::from(mask);
    for i in 0..MAX_INTEGER_TAIL {
        let byte = *b.get(1 + i).ok_or(HpackError::Truncated)?;
        value += u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, 2 + i));
        }
    }
    Err(HpackError::Overflow)
}

/// A string literal as sent.
#[derive(Clone, Copy)]
struct Str<'b> {
    raw: &'b [u8],
    huffman: bool,
}

impl<'b> Str<'b> {
    /// A string literal (RFC 7541 5.2) and the bytes it took.
    fn parse(b: &'b [u8]) -> Result<(Self, usize), HpackError> {
        let huffman = *b.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
        let (len, n) = integer(b, 7)?;
        let end = (n as u64).saturating_add(len);
        if end > b.len() as u64 {
            return Err(HpackError::Truncated);
        }
        let end = end as usize;
        Ok((
            Str {
                raw: &b[n..end],
                huffman,
            },
            end,
        ))
    }

    /// The string, decoded into `scratch` if Huffman-coded. `scratch`
    /// only grows (its length is its high-water mark), so that it is not
    /// cleared for every string.
    fn text<'s>(self, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], HpackError>
    where
        'b: 's,
    {
        if !self.huffman {
            return Ok(self.raw);
        }
        let need = huffman::buf_len(self.raw.len());
        if scratch.len() < need {
            scratch.resize(need, 0);
        }
        let n = huffman::decode_into(self.raw, scratch)?;
        Ok(&scratch[..n])
    }

    /// The decoded length, checking the Huffman code without writing it.
    fn decoded_len(self) -> Result<usize, HpackError> {
        if self.huffman {
            Ok(huffman::validate(self.raw)?)
        } else {
            Ok(self.raw.len())
        }
    }
}

/// One header field representation (RFC 7541 6.1, 6.2).
struct Rep<'b> {
    /// The table index: of the field if `value` is `None`, of its name if
    /// `name` is `None`; 0 for a literal name.
    index: u64,
    name: Option<Str<'b>>,
    value: Option<Str<'b>>,
    /// A literal never indexed (6.2.3).
    never: bool,
}

/// Walk a block's representations, checking integers, lengths, that
/// indexed fields are not index 0, and that table size updates come first,
/// at most [`MAX_SIZE_UPDATES`] of them, to at most `table_limit`. Index
/// ranges and strings are left to `each`. Returns whether the block starts
/// with a size update.
fn walk<'b>(
    block: &'b [u8],
    table_limit: u64,
    mut each: impl FnMut(Rep<'b>) -> Result<(), HpackError>,
) -> Result<bool, HpackError> {
    let mut at = 0;
    let mut fields = false;
    let mut updates = 0u8;
    while let Some(&first) = block.get(at) {
        let b = &block[at..];
        if first & 0x80 != 0 {
            let (index, n) = integer(b, 7)?;
            if index == 0 {
                return Err(HpackError::ZeroIndex);
            }
            at += n;
            fields = true;
            each(Rep {
                index,
                name: None,
                value: None,
                never: false,
            })?;
        } else if first & 0xe0 == 0x20 {
            if fields {
                return Err(HpackError::LateSizeUpdate);
            }
            updates += 1;
            if updates > MAX_SIZE_UPDATES {
                return Err(HpackError::TooManySizeUpdates);
            }
            let (size, n) = integer(b, 5)?;
            if size > table_limit {
                return Err(HpackError::TableSize(size));
            }
            at += n;
        } else {
            // A literal: with incremental indexing (01, 6-bit name index),
            // without indexing (0000) or never indexed (0001), 4-bit.
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            let (index, mut n) = integer(b, prefix)?;
            let name = if index == 0 {
                let (s, used) = Str::parse(&b[n..])?;
                n += used;
                Some(s)
            } else {
                None
            };
            let (value, used) = Str::parse(&b[n..])?;
            n += used;
            at += n;
            fields = true;
            each(Rep {
                index,
                name,
                value: Some(value),
                never: first & 0xf0 == 0x10,
            })?;
        }
    }
    Ok(updates > 0)
}

/// What RFC 9113 8.2 and 8.3 care about in a field name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Method,
    Scheme,
    Authority,
    Path,
    Status,
    /// `:protocol` (RFC 8441), which we do not enable.
    Protocol,
    UnknownPseudo,
    ContentLength,
    ContentType,
    Te,
    /// RFC 9113 8.2.2: connection, proxy-connection, keep-alive,
    /// transfer-encoding, upgrade.
    ConnectionSpecific,
    GrpcStatus,
    Other,
}

struct Entry {
    name: &'static [u8],
    value: &'static [u8],
    kind: Kind,
}

const fn e(name: &'static [u8], value: &'static [u8], kind: Kind) -> Entry {
    Entry { name, value, kind }
}

/// RFC 7541 Appendix A, by index (0 is no entry).
static STATIC: [Entry; 62] = {
    use Kind::*;
    [
        e(b"", b"", Other),
        e(b":authority", b"", Authority),
        e(b":method", b"GET", Method),
        e(b":method", b"POST", Method),
        e(b":path", b"/", Path),
        e(b":path", b"/index.html", Path),
        e(b":scheme", b"http", Scheme),
        e(b":scheme", b"https", Scheme),
        e(b":status", b"200", Status),
        e(b":status", b"204", Status),
        e(b":status", b"206", Status),
        e(b":status", b"304", Status),
        e(b":status", b"400", Status),
        e(b":status", b"404", Status),
        e(b":status", b"500", Status),
        e(b"accept-charset", b"", Other),
        e(b"accept-encoding", b"gzip, deflate", Other),
        e(b"accept-language", b"", Other),
        e(b"accept-ranges", b"", Other),
        e(b"accept", b"", Other),
        e(b"access-control-allow-origin", b"", Other),
        e(b"age", b"", Other),
        e(b"allow", b"", Other),
        e(b"authorization", b"", Other),
        e(b"cache-control", b"", Other),
        e(b"content-disposition", b"", Other),
        e(b"content-encoding", b"", Other),
        e(b"content-language", b"", Other),
        e(b"content-length", b"", ContentLength),
        e(b"content-location", b"", Other),
        e(b"content-range", b"", Other),
        e(b"content-type", b"", ContentType),
        e(b"cookie", b"", Other),
        e(b"date", b"", Other),
        e(b"etag", b"", Other),
        e(b"expect", b"", Other),
        e(b"expires", b"", Other),
        e(b"from", b"", Other),
        e(b"host", b"", Other),
        e(b"if-match", b"", Other),
        e(b"if-modified-since", b"", Other),
        e(b"if-none-match", b"", Other),
        e(b"if-range", b"", Other),
        e(b"if-unmodified-since", b"", Other),
        e(b"last-modified", b"", Other),
        e(b"link", b"", Other),
        e(b"location", b"", Other),
        e(b"max-forwards", b"", Other),
        e(b"proxy-authenticate", b"", Other),
        e(b"proxy-authorization", b"", Other),
        e(b"range", b"", Other),
        e(b"referer", b"", Other),
        e(b"refresh", b"", Other),
        e(b"retry-after", b"", Other),
        e(b"server", b"", Other),
        e(b"set-cookie", b"", Other),
        e(b"strict-transport-security", b"", Other),
        e(b"transfer-encoding", b"", ConnectionSpecific),
        e(b"user-agent", b"", Other),
        e(b"vary", b"", Other),
        e(b"via", b"", Other),
        e(b"www-authenticate", b"", Other),
    ]
};

const NAME_BAD: u8 = 1;
const NAME_UPPER: u8 = 2;
const NAME_COLON: u8 = 4;

/// RFC 9113 8.2.1: no 0x00-0x20, 0x41-0x5a (uppercase) or 0x7f-0xff in a
/// name, and no colon but a pseudo-header's first.
static NAME_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = match b as u8 {
            0x00..=0x20 | 0x7f..=0xff => NAME_BAD,
            b'A'..=b'Z' => NAME_UPPER,
            b':' => NAME_COLON,
            _ => 0,
        };
        b += 1;
    }
    t
};

/// A literal name's kind, or why it is malformed.
fn classify(name: &[u8]) -> Result<Kind, &'static str> {
    let (pseudo, body) = match name {
        [] => return Err("empty field name"),
        [b':', rest @ ..] => (true, rest),
        _ => (false, name),
    };
    let class = body
        .iter()
        .fold(0u8, |a, &b| a | NAME_CLASS[usize::from(b)]);
    if class != 0 {
        return Err(if class & NAME_UPPER != 0 {
            "uppercase character in a field name"
        } else if class & NAME_COLON != 0 {
            "colon inside a field name"
        } else {
            "invalid character in a field name"
        });
    }
    Ok(if pseudo {
        match body {
            b"method" => Kind::Method,
            b"scheme" => Kind::Scheme,
            b"authority" => Kind::Authority,
            b"path" => Kind::Path,
            b"status" => Kind::Status,
            b"protocol" => Kind::Protocol,
            _ => Kind::UnknownPseudo,
        }
    } else {
        match body {
            b"content-length" => Kind::ContentLength,
            b"content-type" => Kind::ContentType,
            b"te" => Kind::Te,
            b"connection" | b"proxy-connection" | b"keep-alive" | b"transfer-encoding"
            | b"upgrade" => Kind::ConnectionSpecific,
            b"grpc-status" => Kind::GrpcStatus,
            _ => Kind::Other,
        }
    })
}

/// Whether `v` has a NUL, CR or LF. Values seldom have any byte below
/// 0x0e: that is looked for 8 bytes at a time first (a byte `b < 0x0e`
/// makes `b - 0x0e` borrow into its top bit while `!b` has it set).
fn has_nul_cr_lf(v: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let (words, tail) = v.as_chunks::<8>();
    let low = words.iter().fold(0u64, |a, w| {
        let x = u64::from_ne_bytes(*w);
        a | (x.wrapping_sub(0x0e * ONES) & !x & (0x80 * ONES))
    });
    if low == 0 && tail.iter().all(|&b| b >= 0x0e) {
        return false;
    }
    v.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n'))
}

/// RFC 9113 8.2.1: no NUL, CR or LF, and no SP or HTAB at either end.
fn check_value(v: &[u8]) -> Result<(), &'static str> {
    if has_nul_cr_lf(v) {
        return Err("NUL, CR or LF in a field value");
    }
    let ws = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    if ws(v.first()) || ws(v.last()) {
        return Err("field value starts or ends with whitespace");
    }
    Ok(())
}

/// A decimal number (1*DIGIT), without overflow.
fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// A `:status`: three digits, 100 to 999.
fn status(v: &[u8]) -> Option<u16> {
    match v {
        [a @ b'1'..=b'9', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}

const METHOD: u8 = 1;
const SCHEME: u8 = 2;
const AUTHORITY: u8 = 4;
const PATH: u8 = 8;
const STATUS: u8 = 16;

/// RFC 9113 8.2 and 8.3, field by field.
struct Message {
    role: Role,
    /// Pseudo-header fields seen.
    seen: u8,
    /// A regular field was seen.
    regular: bool,
    /// The first rule broken.
    malformed: Option<&'static str>,
    info: BlockInfo,
}

impl Message {
    fn new(role: Role) -> Self {
        Self {
            role,
            seen: 0,
            regular: false,
            malformed: None,
            info: BlockInfo::default(),
        }
    }

    fn flag(&mut self, why: &'static str) {
        if self.malformed.is_none() {
            self.malformed = Some(why);
        }
    }

    fn field(&mut self, kind: Kind, value: &[u8]) {
        let bit = match kind {
            Kind::Method => METHOD,
            Kind::Scheme => SCHEME,
            Kind::Authority => AUTHORITY,
            Kind::Path => PATH,
            Kind::Status => STATUS,
            Kind::Protocol => return self.flag(":protocol without extended CONNECT"),
            Kind::UnknownPseudo => return self.flag("unknown pseudo-header field"),
            _ => return self.regular_field(kind, value),
        };
        if self.regular {
            self.flag("pseudo-header field after a regular field");
        }
        match self.role {
            Role::Request if bit == STATUS => self.flag(":status in a request"),
            Role::Response if bit != STATUS => {
                self.flag("request pseudo-header field in a response");
            }
            Role::RequestTrailers | Role::ResponseTrailers => {
                self.flag("pseudo-header field in trailers");
            }
            _ => {}
        }
        if self.seen & bit != 0 {
            self.flag("duplicate pseudo-header field");
        }
        self.seen |= bit;
        match kind {
            Kind::Method => {
                if value.is_empty() {
                    self.flag("empty :method");
                }
                self.info.is_connect = value == b"CONNECT";
                self.info.is_head = value == b"HEAD";
            }
            Kind::Scheme if value.is_empty() => self.flag("empty :scheme"),
            Kind::Path if value.is_empty() => self.flag("empty :path"),
            Kind::Status => match status(value) {
                // RFC 9113 8.6: HTTP/2 has no 101.
                Some(101) => self.flag(":status 101 in HTTP/2"),
                Some(s) => self.info.status = Some(s),
                None => self.flag(":status is not three digits"),
            },
            _ => {}
        }
    }

    fn regular_field(&mut self, kind: Kind, value: &[u8]) {
        self.regular = true;
        match kind {
            Kind::ConnectionSpecific => self.flag("connection-specific header field"),
            Kind::Te if value != b"trailers" => self.flag("te other than trailers"),
            Kind::ContentLength => match (decimal(value), self.info.content_length) {
                (None, _) => self.flag("content-length is not a decimal number"),
                (Some(n), Some(m)) if n != m => self.flag("conflicting content-length values"),
                (Some(n), _) => self.info.content_length = Some(n),
            },
            Kind::GrpcStatus => {
                self.info.grpc_status = decimal(value).and_then(|n| u32::try_from(n).ok());
            }
            Kind::ContentType => self.info.grpc = value.starts_with(b"application/grpc"),
            _ => {}
        }
    }

    /// The rules on the whole list.
    fn finish(&mut self) {
        let seen = self.seen;
        match self.role {
            Role::Request if seen & METHOD == 0 => self.flag("request without :method"),
            Role::Request if self.info.is_connect => {
                if seen & AUTHORITY == 0 {
                    self.flag("CONNECT without :authority");
                }
                if seen & (SCHEME | PATH) != 0 {
                    self.flag("CONNECT with :scheme or :path");
                }
            }
            Role::Request => {
                if seen & SCHEME == 0 {
                    self.flag("request without :scheme");
                }
                if seen & PATH == 0 {
                    self.flag("request without :path");
                }
            }
            Role::Response if seen & STATUS == 0 => self.flag("response without :status"),
            _ => {}
        }
    }
}

/// [`check_block_with`] with `max_list` and [`MAX_STRING`].
pub fn check_block(
    block: &[u8],
    role: Role,
    max_list: usize,
    scratch: &mut Vec<u8>,
) -> Result<BlockInfo, BlockError> {
    check_block_with(
        block,
        role,
        Limits {
            max_list,
            max_string: MAX_STRING,
        },
        scratch,
    )
}

/// Check a header block sent after its sender ACKed our
/// SETTINGS_HEADER_TABLE_SIZE = 0, in one pass and without allocating
/// beyond `scratch` (which holds Huffman-decoded strings; keep one per
/// connection): HPACK (integers, lengths, Huffman strings, static indexes
/// only, size updates to 0 and only first), sizes, and RFC 9113's field
/// and pseudo-header rules for `role`.
///
/// The whole block is always walked, so a decoding error is found even
/// after a malformed field: [`BlockError::Compression`] wins over
/// [`BlockError::TooLarge`], which wins over [`BlockError::Malformed`].
pub fn check_block_with(
    block: &[u8],
    role: Role,
    limits: Limits,
    scratch: &mut Vec<u8>,
) -> Result<BlockInfo, BlockError> {
    let mut msg = Message::new(role);
    let mut too_long = false;
    let mut list = 0usize;
    let mut fields = 0usize;
    let size_update = walk(block, 0, |rep| {
        if rep.index > STATIC_ENTRIES {
            return Err(HpackError::DynamicReference(rep.index));
        }
        let entry = &STATIC[rep.index as usize];
        let (kind, name_len) = match rep.name {
            None => (Ok(entry.kind), entry.name.len()),
            Some(s) => {
                too_long |= s.raw.len() > limits.max_string;
                let name = s.text(scratch)?;
                (classify(name), name.len())
            }
        };
        let value_len = match rep.value {
            // Static values are valid values.
            None => {
                msg.field(entry.kind, entry.value);
                entry.value.len()
            }
            Some(s) => {
                too_long |= s.raw.len() > limits.max_string;
                let value = s.text(scratch)?;
                match kind.and_then(|k| check_value(value).map(|()| k)) {
                    Ok(k) => msg.field(k, value),
                    Err(why) => msg.flag(why),
                }
                value.len()
            }
        };
        list = list.saturating_add(name_len + value_len + 32);
        fields += 1;
        Ok(())
    })?;
    msg.finish();
    let info = BlockInfo {
        list_size: list,
        fields,
        size_update,
        ..msg.info
    };
    if list > limits.max_list {
        return Err(BlockError::TooLarge(info));
    }
    if too_long {
        return Err(BlockError::FieldTooLarge(info));
    }
    if let Some(why) = msg.malformed {
        return Err(BlockError::Malformed(why));
    }
    Ok(info)
}

/// The last block a peer sent that passed [`check_block_with`], to skip
/// the walk when the next one is the same bytes. With no dynamic table a
/// client's requests, and a pod's responses, are often byte for byte
/// alike (the same method, authority and metadata; a date that changes
/// once a second): the check is a pure function of the bytes, the role
/// and the limits, so its answer can be kept. Only small blocks are kept,
/// copied (a slice would pin the whole read buffer).
#[derive(Debug, Default)]
pub struct LastBlock {
    block: Vec<u8>,
    role: Option<Role>,
    limits: Option<Limits>,
    info: BlockInfo,
}

impl LastBlock {
    /// Blocks longer than this are checked every time.
    pub const MAX: usize = 512;

    /// [`check_block_with`], answered from the last block when it is the
    /// same.
    pub fn check(
        &mut self,
        block: &[u8],
        role: Role,
        limits: Limits,
        scratch: &mut Vec<u8>,
    ) -> Result<BlockInfo, BlockError> {
        if self.role == Some(role) && self.limits == Some(limits) && self.block == block {
            return Ok(self.info);
        }
        let info = check_block_with(block, role, limits, scratch)?;
        if block.len() <= Self::MAX {
            self.block.clear();
            self.block.extend_from_slice(block);
            self.role = Some(role);
            self.limits = Some(limits);
            self.info = info;
        }
        Ok(info)
    }
}

/// Check that a header block uses no dynamic table and decodes: every
/// index is in the static table, table size updates (only at the start)
/// set 0, integers, lengths and Huffman strings are valid, and the decoded
/// list is at most [`MAX_DECODED`]. The tests' oracle for what the router
/// writes; the router itself runs [`check_block`], which does all that and
/// RFC 9113's rules.
#[cfg(test)]
pub fn check_self_contained(block: &[u8]) -> Result<(), HpackError> {
    let mut list = 0usize;
    walk(block, 0, |rep| {
        if rep.index > STATIC_ENTRIES {
            return Err(HpackError::DynamicReference(rep.index));
        }
        let entry = &STATIC[rep.index as usize];
        let name = match rep.name {
            None => entry.name.len(),
            Some(s) => s.decoded_len()?,
        };
        let value = match rep.value {
            None => entry.value.len(),
            Some(s) => s.decoded_len()?,
        };
        list = list.saturating_add(name + value + 32);
        Ok(())
    })?;
    if list > MAX_DECODED {
        return Err(HpackError::TooLarge);
    }
    Ok(())
}

/// Check what loona-hpack would not, before it decodes a block against
/// the client's table: integers, lengths, Huffman strings, and size
/// updates (first, at most two, within the default table); and note which
/// fields are never indexed.
fn check_pre_ack(block: &[u8], never: &mut Vec<bool>) -> Result<(), HpackError> {
    walk(block, DEFAULT_TABLE as u64, |rep| {
        if let Some(s) = rep.name {
            s.decoded_len()?;
        }
        if let Some(s) = rep.value {
            s.decoded_len()?;
        }
        never.push(rep.never);
        Ok(())
    })
    .map(|_| ())
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
    /// that representation (6.2.3: intermediaries must). The result is
    /// still to be checked with [`check_block`] (RFC 9113's rules, sizes).
    ///
    /// The block is walked first (`check_pre_ack`) because loona-hpack
    /// is lax where a backend may not be: it takes a table size update
    /// anywhere in a block (RFC 7541 4.2: only at its start) and any
    /// number of them, and integers of 5 bytes. Its Huffman decoder is
    /// strict (the tests in `huffman` compare it with ours) but builds two
    /// hash maps for every Huffman-coded string, so the walk also refuses
    /// bad Huffman cheaply first. It is stricter than RFC 7541 in one
    /// place: it refuses a block that ends with a size update, even one
    /// made only of size updates.
    pub fn reencode(&mut self, block: &[u8]) -> Result<Bytes, HpackError> {
        // Which fields were "never indexed" cannot be told from the
        // callback; the walk notes them in order.
        let mut never = Vec::new();
        check_pre_ack(block, &mut never)?;
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

    /// RFC 7541 C.4: the same requests, Huffman-coded.
    const C4: [&str; 3] = [
        "828684418cf1e3c2e5f23a6ba0ab90f4ff",
        "828684be5886a8eb10649cbf",
        "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
    ];

    /// RFC 7541 C.6.1: a response, Huffman-coded.
    const C6_1: &str = "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// A decoded header list.
    type List = Vec<(Vec<u8>, Vec<u8>)>;

    fn decode_fresh(block: &[u8]) -> List {
        loona_hpack::Decoder::new().decode(block).expect("decodes")
    }

    fn int(v: &mut Vec<u8>, flags: u8, n: u8, value: u64) {
        let mut b = BytesMut::new();
        put_integer(&mut b, flags, n, value);
        v.extend_from_slice(&b);
    }

    /// A header block under construction, as a test writes it.
    #[derive(Default, Clone)]
    struct B(Vec<u8>);

    impl B {
        fn idx(mut self, i: u64) -> Self {
            int(&mut self.0, 0x80, 7, i);
            self
        }
        fn size(mut self, n: u64) -> Self {
            int(&mut self.0, 0x20, 5, n);
            self
        }
        fn string(&mut self, s: &[u8], huffman: bool) {
            if huffman {
                let mut h = Vec::new();
                huffman::encode(s, &mut h);
                int(&mut self.0, 0x80, 7, h.len() as u64);
                self.0.extend_from_slice(&h);
            } else {
                int(&mut self.0, 0, 7, s.len() as u64);
                self.0.extend_from_slice(s);
            }
        }
        /// A string sent with the H bit but bytes as given.
        fn bad_huffman(&mut self, coded: &[u8]) {
            int(&mut self.0, 0x80, 7, coded.len() as u64);
            self.0.extend_from_slice(coded);
        }
        /// Literal without indexing, literal name.
        fn lit(self, name: &str, value: &str) -> Self {
            self.lit_as(name.as_bytes(), value.as_bytes(), false)
        }
        /// The same, both strings Huffman-coded.
        fn lit_h(self, name: &str, value: &str) -> Self {
            self.lit_as(name.as_bytes(), value.as_bytes(), true)
        }
        fn lit_as(mut self, name: &[u8], value: &[u8], huffman: bool) -> Self {
            self.0.push(0x00);
            self.string(name, huffman);
            self.string(value, huffman);
            self
        }
        /// Literal without indexing, name from the static table.
        fn named(self, i: u64, value: &str) -> Self {
            self.named_as(i, value.as_bytes(), false)
        }
        fn named_h(self, i: u64, value: &str) -> Self {
            self.named_as(i, value.as_bytes(), true)
        }
        fn named_as(mut self, i: u64, value: &[u8], huffman: bool) -> Self {
            int(&mut self.0, 0x00, 4, i);
            self.string(value, huffman);
            self
        }
    }

    /// GET http://example.com/ with every pseudo-header but one.
    fn get_without(skip: u8) -> B {
        let mut b = B::default();
        if skip != METHOD {
            b = b.idx(2);
        }
        if skip != SCHEME {
            b = b.idx(6);
        }
        if skip != PATH {
            b = b.idx(4);
        }
        if skip != AUTHORITY {
            b = b.named(1, "example.com");
        }
        b
    }

    fn get() -> B {
        get_without(0)
    }

    fn check(b: &B, role: Role) -> Result<BlockInfo, BlockError> {
        check_block(&b.0, role, MAX_DECODED, &mut Vec::new())
    }

    fn req(b: &B) -> Result<BlockInfo, BlockError> {
        check(b, Role::Request)
    }

    fn malformed(r: Result<BlockInfo, BlockError>) -> &'static str {
        match r {
            Err(BlockError::Malformed(why)) => why,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn compression(r: Result<BlockInfo, BlockError>) -> HpackError {
        match r {
            Err(BlockError::Compression(e)) => e,
            other => panic!("expected Compression, got {other:?}"),
        }
    }

    // ---- check_self_contained and PreAck (the API core.rs uses today) ----

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
    fn self_contained_check_validates_huffman() {
        assert_eq!(check_self_contained(&hex(C4[0])), Ok(()));
        let mut b = B(vec![0x00]);
        b.bad_huffman(&[0x1f, 0xff]);
        b.string(b"v", false);
        assert_eq!(
            check_self_contained(&b.0),
            Err(HpackError::Huffman(HuffmanError::PaddingTooLong))
        );
        let mut b = B(vec![0x04]);
        b.bad_huffman(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            check_self_contained(&b.0),
            Err(HpackError::Huffman(HuffmanError::Eos))
        );
    }

    #[test]
    fn pre_ack_blocks_are_re_encoded_without_the_table() {
        let mut pre = PreAck::default();
        let mut client_table = loona_hpack::Decoder::new();
        for block in C3.iter().chain(&C4[..1]) {
            let block = hex(block);
            let want = client_table.decode(&block).expect("rfc example");
            let re = pre.reencode(&block).expect("re-encodes");
            // Self-contained, valid, and any fresh decoder reads the same
            // list.
            check_self_contained(&re).expect("self-contained");
            check_block(&re, Role::Request, MAX_DECODED, &mut Vec::new()).expect("valid");
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
        int(&mut block, 0, 7, 4000);
        block.extend(std::iter::repeat_n(b'v', 4000));
        let mut big = PreAck::default();
        big.reencode(&block).expect("adds the entry");
        assert_eq!(big.reencode(&[0xbe; 100]), Err(HpackError::TooLarge));
    }

    /// What loona-hpack lets through, and the walk before it does not.
    #[test]
    fn pre_ack_refuses_what_loona_hpack_lets_through() {
        // A size update after a field: loona takes it.
        let late = [0x82, 0x20, 0x84];
        assert!(loona_hpack::Decoder::new().decode(&late).is_ok());
        assert_eq!(
            PreAck::default().reencode(&late),
            Err(HpackError::LateSizeUpdate)
        );
        // Three size updates.
        let three = [0x20, 0x20, 0x20, 0x82];
        assert!(loona_hpack::Decoder::new().decode(&three).is_ok());
        assert_eq!(
            PreAck::default().reencode(&three),
            Err(HpackError::TooManySizeUpdates)
        );
        // A 5-byte integer (nginx refuses more than 4).
        let long = [0x0f, 0x80, 0x80, 0x80, 0x00, 0x01, b'v'];
        assert!(loona_hpack::Decoder::new().decode(&long).is_ok());
        assert_eq!(PreAck::default().reencode(&long), Err(HpackError::Overflow));
        // A size update above the default table, and bad Huffman.
        assert_eq!(
            PreAck::default().reencode(&[0x3f, 0xe2, 0x1f, 0x82]),
            Err(HpackError::TableSize(4097))
        );
        let mut b = B(vec![0x04]);
        b.bad_huffman(&[0x18]);
        assert_eq!(
            PreAck::default().reencode(&b.0),
            Err(HpackError::Huffman(HuffmanError::PaddingNotEos))
        );
        // Dynamic references are fine before the ACK, and a table size
        // update within 4096.
        let mut pre = PreAck::default();
        pre.reencode(&[0x3f, 0xe1, 0x1f, 0x40, 1, b'x', 1, b'y'])
            .expect("adds x: y");
        let re = pre.reencode(&[0xbe]).expect("refers to it");
        assert_eq!(decode_fresh(&re), vec![(b"x".to_vec(), b"y".to_vec())]);
    }

    // ---- HPACK: connection errors ----

    #[test]
    fn integer_overflow_is_a_compression_error() {
        // Four bytes after the prefix.
        assert_eq!(
            compression(req(&B(vec![0xff, 0x80, 0x80, 0x80, 0x01]))),
            HpackError::Overflow
        );
        // Three are read (and make an index outside the static table).
        assert_eq!(
            compression(req(&B(vec![0xff, 0x80, 0x80, 0x01]))),
            HpackError::DynamicReference(127 + (1 << 14))
        );
        // In a string length, and in a size update.
        assert_eq!(
            compression(req(&B(vec![0x00, 0x7f, 0xff, 0xff, 0xff, 0x7f]))),
            HpackError::Overflow
        );
        assert_eq!(
            compression(req(&B(vec![0x3f, 0x80, 0x80, 0x80, 0x00]))),
            HpackError::Overflow
        );
    }

    #[test]
    fn integer_truncation_is_a_compression_error() {
        for block in [
            &[0xff][..],
            &[0xff, 0x80],
            &[0x00],
            &[0x04],
            &[0x0f, 0x80],
            &[0x3f],
        ] {
            assert_eq!(
                compression(req(&B(block.to_vec()))),
                HpackError::Truncated,
                "{block:02x?}"
            );
        }
    }

    #[test]
    fn string_length_past_the_end_is_a_compression_error() {
        let mut b = get();
        b.0.extend_from_slice(&[0x00, 0x01, b'a', 0x05, b'b']);
        assert_eq!(compression(req(&b)), HpackError::Truncated);
        let mut b = get();
        b.0.extend_from_slice(&[0x00, 0x05, b'a']);
        assert_eq!(compression(req(&b)), HpackError::Truncated);
        // A huge length in a short block.
        let mut b = get();
        b.0.extend_from_slice(&[0x04, 0x7f, 0xff, 0xff, 0x7f]);
        assert_eq!(compression(req(&b)), HpackError::Truncated);
    }

    #[test]
    fn huffman_names_and_values_are_decoded() {
        let ok = get()
            .lit_h("te", "trailers")
            .named_h(31, "application/grpc");
        assert!(req(&ok).is_ok());
        // A Huffman-coded name is checked as its decoded text.
        assert_eq!(
            malformed(req(&get().lit_h("TE", "trailers"))),
            "uppercase character in a field name"
        );
        assert_eq!(
            malformed(req(&get().lit_h("te", "gzip"))),
            "te other than trailers"
        );
        // Bad Huffman in a name, and in a value.
        let mut b = get();
        b.0.push(0x00);
        b.bad_huffman(&[0x18]);
        b.string(b"v", false);
        assert_eq!(
            compression(req(&b)),
            HpackError::Huffman(HuffmanError::PaddingNotEos)
        );
        let mut b = get();
        b.0.push(0x1f);
        b.0.push(0x10); // name index 31 (15 + 16), never indexed
        b.bad_huffman(&[0x18]);
        assert_eq!(
            compression(req(&b)),
            HpackError::Huffman(HuffmanError::PaddingNotEos)
        );
    }

    /// h2spec hpack/5.2/1.
    #[test]
    fn h2spec_hpack_5_2_1_huffman_padding_longer_than_7_bits() {
        let mut coded = Vec::new();
        huffman::encode(b"test", &mut coded);
        coded.push(0xff);
        let mut b = get();
        b.0.push(0x00);
        b.string(b"x-test", false);
        b.bad_huffman(&coded);
        assert_eq!(
            compression(req(&b)),
            HpackError::Huffman(HuffmanError::PaddingTooLong)
        );
    }

    /// h2spec hpack/5.2/2.
    #[test]
    fn h2spec_hpack_5_2_2_huffman_padding_not_eos_prefix() {
        // "test" is 26 bits; 6 bits of zero padding.
        let mut coded = Vec::new();
        huffman::encode(b"test", &mut coded);
        *coded.last_mut().expect("coded") &= 0xc0;
        let mut b = get();
        b.0.push(0x00);
        b.string(b"x-test", false);
        b.bad_huffman(&coded);
        assert_eq!(
            compression(req(&b)),
            HpackError::Huffman(HuffmanError::PaddingNotEos)
        );
    }

    /// h2spec hpack/5.2/3.
    #[test]
    fn h2spec_hpack_5_2_3_huffman_eos_in_string() {
        let mut b = get();
        b.0.push(0x00);
        b.string(b"x-test", false);
        b.bad_huffman(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(compression(req(&b)), HpackError::Huffman(HuffmanError::Eos));
    }

    #[test]
    fn index_zero_is_a_compression_error() {
        assert_eq!(compression(req(&get().idx(0))), HpackError::ZeroIndex);
    }

    #[test]
    fn dynamic_table_index_is_a_compression_error() {
        assert_eq!(
            compression(req(&get().idx(62))),
            HpackError::DynamicReference(62)
        );
        assert_eq!(
            compression(req(&get().named(62, "v"))),
            HpackError::DynamicReference(62)
        );
        assert!(req(&get().idx(61)).is_ok());
        // RFC 7541 C.4.2 refers to C.4.1's entry.
        assert_eq!(
            compression(req(&B(hex(C4[1])))),
            HpackError::DynamicReference(62)
        );
    }

    #[test]
    fn size_update_only_at_the_start() {
        let mut b = B::default().size(0).size(0);
        b.0.extend_from_slice(&get().0);
        let info = req(&b).expect("two updates first");
        assert!(info.size_update);
        assert!(!req(&get()).expect("none").size_update);
        assert_eq!(compression(req(&get().size(0))), HpackError::LateSizeUpdate);
        let mut b = B::default().idx(2).size(0);
        b.0.extend_from_slice(&get_without(METHOD).0);
        assert_eq!(compression(req(&b)), HpackError::LateSizeUpdate);
    }

    #[test]
    fn size_update_only_within_the_advertised_limit() {
        let mut b = B::default().size(1);
        b.0.extend_from_slice(&get().0);
        assert_eq!(compression(req(&b)), HpackError::TableSize(1));
        let mut b = B::default().size(4096);
        b.0.extend_from_slice(&get().0);
        assert_eq!(compression(req(&b)), HpackError::TableSize(4096));
    }

    #[test]
    fn size_update_at_most_twice() {
        let mut b = B::default().size(0).size(0).size(0);
        b.0.extend_from_slice(&get().0);
        assert_eq!(compression(req(&b)), HpackError::TooManySizeUpdates);
    }

    // ---- sizes ----

    #[test]
    fn header_list_size_is_name_value_and_32_per_field() {
        // :method GET (7 + 3), :scheme http (7 + 4), :path / (5 + 1),
        // :authority example.com (10 + 11), x: yz Huffman-coded (1 + 2).
        let b = get().lit_h("x", "yz");
        let want = (7 + 3) + (7 + 4) + (5 + 1) + (10 + 11) + (1 + 2) + 5 * 32;
        let info = req(&b).expect("valid");
        assert_eq!(info.list_size, want);
        assert_eq!(info.fields, 5);
        let mut s = Vec::new();
        assert!(check_block(&b.0, Role::Request, want, &mut s).is_ok());
        // Over the limit, what the block holds is still reported.
        assert_eq!(
            check_block(&b.0, Role::Request, want - 1, &mut s),
            Err(BlockError::TooLarge(info))
        );
    }

    #[test]
    fn string_longer_than_max_string_is_too_large() {
        let long = "v".repeat(MAX_STRING + 1);
        assert!(matches!(
            req(&get().lit("x-long", &long)),
            Err(BlockError::FieldTooLarge(info)) if info.list_size > MAX_STRING
        ));
        assert!(req(&get().lit("x-long", &long[1..])).is_ok());
        // Counted as sent: Huffman-coded, MAX_STRING bytes decode to more.
        let mut coded = Vec::new();
        huffman::encode(b"0", &mut coded);
        let zeros = "0".repeat(MAX_STRING * 8 / 5);
        assert_eq!(huffman::encoded_len(zeros.as_bytes()), MAX_STRING);
        assert!(req(&get().named_h(58, &zeros)).is_ok());
        let limits = Limits {
            max_list: MAX_DECODED,
            max_string: 16,
        };
        let b = get().lit("x-name-of-17-byte", "v");
        assert!(matches!(
            check_block_with(&b.0, Role::Request, limits, &mut Vec::new()),
            Err(BlockError::FieldTooLarge(_))
        ));
    }

    #[test]
    fn the_last_block_is_answered_again_only_when_it_is_the_same() {
        let mut last = LastBlock::default();
        let mut s = Vec::new();
        let limits = Limits::default();
        let good = get().0;
        let info = check_block_with(&good, Role::Request, limits, &mut s).expect("valid");
        assert_eq!(last.check(&good, Role::Request, limits, &mut s), Ok(info));
        assert_eq!(last.check(&good, Role::Request, limits, &mut s), Ok(info));
        // The same bytes in another role, or under other limits, are checked.
        assert!(matches!(
            last.check(&good, Role::RequestTrailers, limits, &mut s),
            Err(BlockError::Malformed(_))
        ));
        let tight = Limits {
            max_list: 10,
            ..limits
        };
        assert_eq!(
            last.check(&good, Role::Request, tight, &mut s),
            Err(BlockError::TooLarge(info))
        );
        // Another block is checked, and a bad one never kept.
        let mut bad = good.clone();
        bad.push(0x80);
        assert!(matches!(
            last.check(&bad, Role::Request, limits, &mut s),
            Err(BlockError::Compression(_))
        ));
        assert_eq!(last.check(&good, Role::Request, limits, &mut s), Ok(info));
    }

    // ---- RFC 9113 8.2: fields ----

    #[test]
    fn uppercase_field_name_is_malformed() {
        assert_eq!(
            malformed(req(&get().lit("X-Custom", "v"))),
            "uppercase character in a field name"
        );
        assert_eq!(
            malformed(req(&get().lit(":Path", "/"))),
            "uppercase character in a field name"
        );
    }

    #[test]
    fn field_name_characters_are_checked() {
        for name in [&b"x y"[..], b"x\0", b"\x7f", b"x\xff", b"\t", b" x"] {
            assert_eq!(
                malformed(req(&get().lit_as(name, b"v", false))),
                "invalid character in a field name",
                "{name:?}"
            );
        }
        for name in ["x:y", "x:", "::path"] {
            assert_eq!(
                malformed(req(&get().lit(name, "v"))),
                "colon inside a field name",
                "{name}"
            );
        }
        // Token characters besides lowercase letters are fine.
        assert!(req(&get().lit("x-a_b.c~!#$%&'*+^`|0", "v")).is_ok());
    }

    #[test]
    fn empty_field_name_is_malformed() {
        // nginx ends the whole connection on one.
        assert_eq!(malformed(req(&get().lit("", "v"))), "empty field name");
        assert_eq!(malformed(req(&get().lit_h("", "v"))), "empty field name");
    }

    #[test]
    fn field_value_without_nul_cr_lf() {
        for value in [&b"a\0b"[..], b"a\rb", b"a\nb", b"\n", b"ab\r"] {
            assert_eq!(
                malformed(req(&get().lit_as(b"x", value, false))),
                "NUL, CR or LF in a field value",
                "{value:?}"
            );
            // Huffman-coded too.
            assert_eq!(
                malformed(req(&get().lit_as(b"x", value, true))),
                "NUL, CR or LF in a field value"
            );
        }
        // Other control bytes and obs-text are RFC 9113's business no more.
        assert!(req(&get().lit_as(b"x", b"a\x01\x7f\xffb", true)).is_ok());
    }

    #[test]
    fn field_value_without_leading_or_trailing_whitespace() {
        for value in [" v", "v ", "\tv", "v\t", " ", "\t"] {
            assert_eq!(
                malformed(req(&get().lit("x", value))),
                "field value starts or ends with whitespace",
                "{value:?}"
            );
        }
        assert!(req(&get().lit("x", "a b\tc")).is_ok());
        assert!(req(&get().lit("x", "")).is_ok());
        // On a pseudo-header field too.
        assert_eq!(
            malformed(req(&get_without(PATH).named(4, "/ "))),
            "field value starts or ends with whitespace"
        );
    }

    #[test]
    fn connection_specific_fields_are_malformed() {
        for name in [
            "connection",
            "proxy-connection",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
        ] {
            assert_eq!(
                malformed(req(&get().lit(name, "close"))),
                "connection-specific header field",
                "{name}"
            );
            // In responses and trailers as well.
            let resp = B::default().idx(8).lit_h(name, "x");
            assert_eq!(
                malformed(check(&resp, Role::Response)),
                "connection-specific header field"
            );
        }
        // transfer-encoding is in the static table.
        assert_eq!(
            malformed(req(&get().named(57, "chunked"))),
            "connection-specific header field"
        );
        assert_eq!(
            malformed(check(
                &B::default().named(57, "chunked"),
                Role::RequestTrailers
            )),
            "connection-specific header field"
        );
    }

    #[test]
    fn te_only_with_trailers() {
        assert!(req(&get().lit("te", "trailers")).is_ok());
        for value in ["gzip", "trailers, deflate", "Trailers", ""] {
            assert_eq!(
                malformed(req(&get().lit("te", value))),
                "te other than trailers",
                "{value}"
            );
        }
    }

    // ---- RFC 9113 8.3: pseudo-header fields ----

    #[test]
    fn request_pseudo_headers_at_most_once() {
        for extra in [
            B::default().idx(3),
            B::default().idx(7),
            B::default().idx(5),
            B::default().named(1, "example.org"),
        ] {
            let mut b = get();
            b.0.extend_from_slice(&extra.0);
            assert_eq!(malformed(req(&b)), "duplicate pseudo-header field");
        }
    }

    #[test]
    fn pseudo_headers_before_regular_fields() {
        let b = get_without(PATH).lit("x", "v").idx(4);
        assert_eq!(
            malformed(req(&b)),
            "pseudo-header field after a regular field"
        );
        let b = B::default().lit("x", "v").idx(8);
        assert_eq!(
            malformed(check(&b, Role::Response)),
            "pseudo-header field after a regular field"
        );
    }

    #[test]
    fn request_needs_method_scheme_and_path() {
        assert_eq!(
            malformed(req(&get_without(METHOD))),
            "request without :method"
        );
        assert_eq!(
            malformed(req(&get_without(SCHEME))),
            "request without :scheme"
        );
        assert_eq!(malformed(req(&get_without(PATH))), "request without :path");
        // :authority is optional.
        assert!(req(&get_without(AUTHORITY)).is_ok());
        assert_eq!(malformed(req(&B::default())), "request without :method");
    }

    #[test]
    fn path_must_not_be_empty() {
        assert_eq!(
            malformed(req(&get_without(PATH).named(4, ""))),
            "empty :path"
        );
        assert_eq!(
            malformed(req(&get_without(PATH).lit(":path", ""))),
            "empty :path"
        );
        assert_eq!(
            malformed(req(&get_without(METHOD).named(2, ""))),
            "empty :method"
        );
        assert_eq!(
            malformed(req(&get_without(SCHEME).named(6, ""))),
            "empty :scheme"
        );
    }

    #[test]
    fn connect_has_authority_and_no_scheme_or_path() {
        let connect = B::default()
            .named_h(2, "CONNECT")
            .named(1, "example.com:443");
        let info = req(&connect).expect("valid CONNECT");
        assert!(info.is_connect);
        assert_eq!(
            malformed(req(&B::default().named(2, "CONNECT"))),
            "CONNECT without :authority"
        );
        assert_eq!(
            malformed(req(&connect.clone().idx(7))),
            "CONNECT with :scheme or :path"
        );
        assert_eq!(
            malformed(req(&connect.idx(4))),
            "CONNECT with :scheme or :path"
        );
    }

    #[test]
    fn protocol_pseudo_header_is_malformed() {
        let b = B::default()
            .named(2, "CONNECT")
            .idx(7)
            .named(1, "example.com")
            .idx(4)
            .lit(":protocol", "websocket");
        assert_eq!(malformed(req(&b)), ":protocol without extended CONNECT");
    }

    #[test]
    fn unknown_pseudo_header_is_malformed() {
        for name in [":foo", ":"] {
            let mut b = B::default().lit(name, "v");
            b.0.extend_from_slice(&get().0);
            assert_eq!(malformed(req(&b)), "unknown pseudo-header field");
        }
    }

    #[test]
    fn response_pseudo_header_in_a_request_is_malformed() {
        assert_eq!(malformed(req(&get().idx(8))), ":status in a request");
        let mut b = B::default().lit(":status", "200");
        b.0.extend_from_slice(&get().0);
        assert_eq!(malformed(req(&b)), ":status in a request");
    }

    #[test]
    fn request_pseudo_header_in_a_response_is_malformed() {
        for extra in [2, 4, 6, 1] {
            let b = B::default().idx(8).idx(extra);
            assert_eq!(
                malformed(check(&b, Role::Response)),
                "request pseudo-header field in a response"
            );
        }
    }

    #[test]
    fn response_needs_exactly_one_three_digit_status() {
        let info = check(&B::default().idx(9), Role::Response).expect("204");
        assert_eq!(info.status, Some(204));
        let info = check(&B::default().named_h(8, "103"), Role::Response).expect("103");
        assert_eq!(info.status, Some(103));
        assert_eq!(
            malformed(check(&B::default().lit("x", "v"), Role::Response)),
            "response without :status"
        );
        assert_eq!(
            malformed(check(&B::default().idx(8).idx(8), Role::Response)),
            "duplicate pseudo-header field"
        );
        for bad in ["20", "2000", "abc", "099", "", "+20", "2 0"] {
            assert_eq!(
                malformed(check(&B::default().named(8, bad), Role::Response)),
                ":status is not three digits",
                "{bad}"
            );
        }
        assert_eq!(
            malformed(check(&B::default().named(8, "101"), Role::Response)),
            ":status 101 in HTTP/2"
        );
    }

    #[test]
    fn trailers_carry_no_pseudo_headers() {
        assert!(check(&B::default().lit("x", "v"), Role::RequestTrailers).is_ok());
        assert!(check(&B::default(), Role::ResponseTrailers).is_ok());
        assert_eq!(
            malformed(check(&B::default().idx(4), Role::RequestTrailers)),
            "pseudo-header field in trailers"
        );
        assert_eq!(
            malformed(check(&B::default().idx(8), Role::ResponseTrailers)),
            "pseudo-header field in trailers"
        );
    }

    // ---- values the caller uses ----

    #[test]
    fn content_length_is_a_decimal_u64() {
        let info = req(&get().named(28, "1234")).expect("valid");
        assert_eq!(info.content_length, Some(1234));
        let info = req(&get().lit_h("content-length", "18446744073709551615")).expect("max");
        assert_eq!(info.content_length, Some(u64::MAX));
        let info = req(&get().named(28, "0").named(28, "0")).expect("equal twice");
        assert_eq!(info.content_length, Some(0));
        for bad in ["", "12a", "-1", "+1", "1,1", "18446744073709551616", "0x10"] {
            assert_eq!(
                malformed(req(&get().named(28, bad))),
                "content-length is not a decimal number",
                "{bad}"
            );
        }
        // The indexed static entry has an empty value.
        assert_eq!(
            malformed(req(&get().idx(28))),
            "content-length is not a decimal number"
        );
        assert_eq!(
            malformed(req(&get().named(28, "1").named(28, "2"))),
            "conflicting content-length values"
        );
    }

    #[test]
    fn grpc_status_and_methods_are_reported() {
        let t = B::default()
            .lit_h("grpc-status", "14")
            .lit_h("grpc-message", "unavailable");
        let info = check(&t, Role::ResponseTrailers).expect("trailers");
        assert_eq!(info.grpc_status, Some(14));
        // A trailers-only response.
        let only = B::default()
            .idx(8)
            .named_h(31, "application/grpc")
            .lit("grpc-status", "0");
        let info = check(&only, Role::Response).expect("trailers-only");
        assert_eq!((info.status, info.grpc_status), (Some(200), Some(0)));
        let info = check(
            &B::default().lit("grpc-status", "x"),
            Role::ResponseTrailers,
        )
        .expect("not ours to refuse");
        assert_eq!(info.grpc_status, None);
        let info = req(&get_without(METHOD).named(2, "HEAD")).expect("HEAD");
        assert!(info.is_head && !info.is_connect);
        // gRPC requests, by content-type (static name or literal).
        let grpc = |b: &B| req(b).expect("valid").grpc;
        assert!(grpc(&get().named(31, "application/grpc")));
        assert!(grpc(&get().named_h(31, "application/grpc+proto")));
        assert!(grpc(&get().lit("content-type", "application/grpc")));
        assert!(!grpc(&get().named(31, "application/json")));
        assert!(!grpc(&get().lit("x-content-type", "application/grpc")));
        assert!(!grpc(&get()));
    }

    #[test]
    fn static_table_matches_loona_and_rfc() {
        for i in 1..=STATIC_ENTRIES {
            let e = &STATIC[i as usize];
            let got = decode_fresh(&[0x80 | i as u8]);
            assert_eq!(got, vec![(e.name.to_vec(), e.value.to_vec())], "index {i}");
            assert_eq!(classify(e.name), Ok(e.kind), "index {i}");
            assert_eq!(check_value(e.value), Ok(()));
        }
    }

    #[test]
    fn compression_error_wins_over_malformed() {
        let mut b = get().lit("X", "v");
        b.0.push(0x04);
        b.bad_huffman(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(compression(req(&b)), HpackError::Huffman(HuffmanError::Eos));
        let mut b = get().lit("X", "v");
        b.0.push(0xbf);
        assert_eq!(compression(req(&b)), HpackError::DynamicReference(63));
        // And a list too large wins over malformed.
        let b = get().lit("X", &"v".repeat(100));
        assert!(matches!(
            check_block(&b.0, Role::Request, 100, &mut Vec::new()),
            Err(BlockError::TooLarge(_))
        ));
    }

    #[test]
    fn rfc7541_c4_and_c6_blocks() {
        let info = req(&B(hex(C4[0]))).expect("C.4.1");
        assert_eq!(info.fields, 4);
        assert_eq!(
            info.list_size,
            (7 + 3) + (7 + 4) + (5 + 1) + (10 + 15) + 4 * 32
        );
        // C.6.1 adds to the table as it goes (literals with incremental
        // indexing) but refers to none of it.
        let info = check(&B(hex(C6_1)), Role::Response).expect("C.6.1");
        assert_eq!(info.status, Some(302));
        assert_eq!(info.list_size, 222);
    }

    /// h2spec http2/8.1.2.x: requests a server must treat as malformed.
    #[test]
    fn h2spec_8_1_2_malformed_requests() {
        let cases: [(&str, B); 13] = [
            ("8.1.2/1 uppercase name", get().lit("X-TEST", "ok")),
            (
                "8.1.2.1/1 unknown pseudo",
                get_without(PATH).lit(":test", "ok").idx(4),
            ),
            ("8.1.2.1/2 response pseudo", get().lit(":status", "200")),
            (
                "8.1.2.1/3 pseudo after regular",
                get_without(PATH).lit("x", "y").idx(4),
            ),
            (
                "8.1.2.1/4 pseudo in trailers",
                B::default().lit(":path", "/"),
            ),
            (
                "8.1.2.2/1 connection",
                get().lit("connection", "keep-alive"),
            ),
            ("8.1.2.2/2 te", get().lit("te", "trailers, deflate")),
            ("8.1.2.3/1 empty :path", get_without(PATH).named(4, "")),
            ("8.1.2.3/2 no :method", get_without(METHOD)),
            ("8.1.2.3/3 no :scheme", get_without(SCHEME)),
            ("8.1.2.3/4 no :path", get_without(PATH)),
            ("8.1.2.3/5 two :method", get().idx(3)),
            ("8.1.2.3/7 two :path", get().idx(5)),
        ];
        for (name, b) in cases {
            let role = if name.contains("trailers") {
                Role::RequestTrailers
            } else {
                Role::Request
            };
            assert!(
                matches!(check(&b, role), Err(BlockError::Malformed(_))),
                "{name}"
            );
        }
    }

    // ---- against loona-hpack ----

    const NAMES: [&str; 8] = [
        "x-a",
        "user-agent",
        "grpc-timeout",
        "accept",
        "cookie",
        "x-request-id",
        "te",
        "content-type",
    ];

    /// A random valid request and its header list.
    fn random_request(rng: &mut fastrand::Rng) -> (B, List) {
        let mut b = B::default();
        if rng.bool() {
            b = b.size(0);
        }
        let mut list = Vec::new();
        let mut push = |b: B, rng: &mut fastrand::Rng, name: &str, value: &str| {
            list.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
            let h = rng.bool();
            let static_name = STATIC[1..]
                .iter()
                .position(|e| e.name == name.as_bytes())
                .map(|i| i as u64 + 1);
            let static_field = STATIC[1..]
                .iter()
                .position(|e| e.name == name.as_bytes() && e.value == value.as_bytes())
                .map(|i| i as u64 + 1);
            match (static_field, static_name, rng.u8(0..3)) {
                (Some(i), _, 0 | 1) => b.idx(i),
                (_, Some(i), 0 | 1) => b.named_as(i, value.as_bytes(), h),
                _ => {
                    let mut b = b;
                    // Any literal form: without, never, with indexing.
                    let first = [0x00, 0x10, 0x40][rng.usize(0..3)];
                    b.0.push(first);
                    b.string(name.as_bytes(), h);
                    b.string(value.as_bytes(), h);
                    b
                }
            }
        };
        let method = ["GET", "POST"][rng.usize(0..2)];
        b = push(b, rng, ":method", method);
        let scheme = ["http", "https"][rng.usize(0..2)];
        b = push(b, rng, ":scheme", scheme);
        let path: String = (0..rng.usize(1..30))
            .map(|_| {
                rng.choice(b"/abcxyz019-_.?=&%".iter())
                    .copied()
                    .map_or('/', char::from)
            })
            .collect();
        b = push(b, rng, ":path", &format!("/{path}"));
        b = push(b, rng, ":authority", "svc.ns.svc.cluster.local:8080");
        for _ in 0..rng.usize(0..8) {
            let name = NAMES[rng.usize(0..NAMES.len())];
            let value: String = if name == "te" {
                "trailers".into()
            } else {
                let len = rng.usize(0..40);
                (0..len)
                    .map(|i| {
                        let c = rng.u8(0x21..0x7f);
                        if i % 7 == 3 && i + 1 < len {
                            ' '
                        } else {
                            char::from(c)
                        }
                    })
                    .collect()
            };
            b = push(b, rng, name, &value);
        }
        (b, list)
    }

    /// Random valid requests, every representation: loona-hpack decodes
    /// them to the list written, and check_block accepts them with that
    /// list's size.
    #[test]
    fn random_requests_agree_with_loona() {
        let mut rng = fastrand::Rng::with_seed(9113);
        let mut scratch = Vec::new();
        for _ in 0..1_000 {
            let (b, list) = random_request(&mut rng);
            assert_eq!(decode_fresh(&b.0), list);
            let info = check_block(&b.0, Role::Request, MAX_DECODED, &mut scratch)
                .unwrap_or_else(|e| panic!("{e}: {list:?}"));
            let size: usize = list.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
            assert_eq!(info.list_size, size);
            assert_eq!(info.fields, list.len());
            assert_eq!(check_self_contained(&b.0), Ok(()));
        }
    }

    /// Random damage to valid requests: whatever check_block does not
    /// refuse as a compression error, loona-hpack decodes, to a list of
    /// the size check_block counted. (The one exception would be a block
    /// of size updates only, which loona-hpack refuses: such a request is
    /// malformed anyway.)
    #[test]
    fn damaged_blocks_we_let_through_loona_decodes() {
        let mut rng = fastrand::Rng::with_seed(0xdead);
        let mut scratch = Vec::new();
        let mut outcomes = [0usize; 4];
        for _ in 0..5_000 {
            let (mut b, _) = random_request(&mut rng);
            for _ in 0..rng.usize(1..4) {
                match rng.u8(0..4) {
                    0 if !b.0.is_empty() => {
                        let i = rng.usize(0..b.0.len());
                        b.0[i] = rng.u8(..);
                    }
                    1 if !b.0.is_empty() => {
                        let i = rng.usize(0..b.0.len());
                        b.0[i] ^= 1 << rng.u8(0..8);
                    }
                    2 => b.0.truncate(rng.usize(0..=b.0.len())),
                    _ => {
                        let i = rng.usize(0..=b.0.len());
                        b.0.insert(i, rng.u8(..));
                    }
                }
            }
            let ours = check_block(&b.0, Role::Request, MAX_DECODED, &mut scratch);
            outcomes[match ours {
                Ok(_) => 0,
                Err(BlockError::Compression(_)) => 1,
                Err(BlockError::TooLarge(_) | BlockError::FieldTooLarge(_)) => 2,
                Err(BlockError::Malformed(_)) => 3,
            }] += 1;
            if matches!(ours, Err(BlockError::Compression(_))) {
                continue;
            }
            let only_updates = b.0.iter().all(|&x| x & 0xe0 == 0x20);
            match loona_hpack::Decoder::new().decode(&b.0) {
                Ok(list) => {
                    if let Ok(info) = ours {
                        let size: usize = list.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
                        assert_eq!(info.list_size, size, "{:02x?}", b.0);
                    }
                }
                Err(e) => assert!(only_updates, "loona refuses {:02x?}: {e:?}", b.0),
            }
        }
        // (Too large cannot happen here: MAX_DECODED is far away.)
        assert!(
            outcomes[0] > 50 && outcomes[1] > 50 && outcomes[3] > 50,
            "{outcomes:?}"
        );
    }

    /// A gRPC unary request as grpc-go sends it. Run with
    /// `cargo test --release -p balancer-router grpc_request_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run in release"]
    fn grpc_request_timing() {
        let b = B::default()
            .idx(3)
            .idx(6)
            .named_h(4, "/helloworld.Greeter/SayHello")
            .named_h(1, "greeter.default.svc.cluster.local:50051")
            .named_h(31, "application/grpc")
            .lit_h("te", "trailers")
            .named_h(58, "grpc-go/1.64.0")
            .lit_h("grpc-timeout", "4999958u")
            .lit_h("grpc-accept-encoding", "gzip");
        let mut scratch = Vec::new();
        let t = huffman::best_of(|| {
            let info = check_block(
                std::hint::black_box(&b.0),
                Role::Request,
                MAX_DECODED,
                &mut scratch,
            );
            assert!(std::hint::black_box(info).is_ok());
        });
        println!("check_block, {} bytes, 9 fields: {t:?}", b.0.len());
        let t = huffman::best_of(|| {
            assert!(check_self_contained(std::hint::black_box(&b.0)).is_ok());
        });
        println!("check_self_contained: {t:?}");
    }
}
