//! HPACK's Huffman code (RFC 7541 5.2 and Appendix B): a decoder that also
//! serves as the validator of Huffman-coded string literals, and an encoder.
//!
//! The code is canonical: within one length, codes are consecutive in
//! symbol order, and each length starts right after the last code of the
//! one before, shifted left (RFC 7541 Appendix B lists it that way). So the
//! 257 code lengths are all the spec data needed; codes and the decoder's
//! tables are computed from them at compile time (the tests compare every
//! code with loona-hpack's table, written out from the RFC by other hands).
//!
//! Decoding reads the string through a 64-bit accumulator and looks the
//! next 12 bits up in a 16 KiB table that gives the one or two whole
//! symbols they hold (header text is mostly 5- to 8-bit codes); a longer
//! code, and the string's last bits, are decoded canonically, by comparing
//! the next 32 bits with each length's last code. No allocation beyond the
//! output, and no branch per symbol on the fast path.
//! A string is refused, as RFC 7541 5.2 requires, when:
//! - its padding (the bits after the last whole symbol) is longer than 7
//!   bits;
//! - its padding is not a prefix of EOS's code, which is all ones;
//! - it contains EOS (30 ones) itself.

/// Code length of each symbol, bytes 0 to 255 then EOS (RFC 7541
/// Appendix B).
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0x00
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 0x10
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // 0x20
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // 0x30
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // 0x40
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 0x50
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // 0x60
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 0x70
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 0x80
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 0x90
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 0xa0
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 0xb0
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 0xc0
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 0xd0
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 0xe0
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 0xf0
    30, // EOS
];

/// The end-of-string symbol.
const EOS: usize = 256;
/// The longest code (EOS's, and a few control bytes').
const MAX_LEN: usize = 30;

/// Each symbol's code, right-aligned in `LENGTHS[sym]` bits.
static CODES: [u32; 257] = canonical().codes;

/// The canonical code, as built from the lengths.
struct Canonical {
    codes: [u32; 257],
    /// For each length, the end of its codes left-aligned in 32 bits: a
    /// 32-bit window `w` starts with a code of the smallest length `len`
    /// with `w < limit[len]`. `limit[MAX_LEN]` is 2^32.
    limit: [u64; MAX_LEN + 1],
    /// For each length, its first code (right-aligned), and that code's
    /// rank in `sorted`.
    first: [u32; MAX_LEN + 1],
    rank: [u16; MAX_LEN + 1],
    /// Symbols by (length, symbol): the order codes are given in.
    sorted: [u16; 257],
}

const fn canonical() -> Canonical {
    let mut c = Canonical {
        codes: [0; 257],
        limit: [0; MAX_LEN + 1],
        first: [0; MAX_LEN + 1],
        rank: [0; MAX_LEN + 1],
        sorted: [0; 257],
    };
    let mut code = 0u32;
    let mut n = 0usize;
    let mut len = 1;
    while len <= MAX_LEN {
        c.first[len] = code;
        c.rank[len] = n as u16;
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] as usize == len {
                c.codes[sym] = code;
                c.sorted[n] = sym as u16;
                code += 1;
                n += 1;
            }
            sym += 1;
        }
        c.limit[len] = (code as u64) << (32 - len);
        code <<= 1;
        len += 1;
    }
    // Every symbol got a code, and the code is complete (Kraft's sum is
    // 1): after the last length, all 31-bit codes are used up. A
    // canonical code from such lengths is prefix-free.
    assert!(n == 257);
    assert!(code == 1 << (MAX_LEN + 1));
    c
}

static CANON: Canonical = canonical();

/// The symbol a 32-bit window starts with, and its length.
#[inline]
fn decode_one(w: u32) -> (usize, u32) {
    let c = &CANON;
    let mut len = 5;
    while u64::from(w) >= c.limit[len] {
        len += 1;
    }
    let code = w >> (32 - len);
    let sym = c.sorted[usize::from(c.rank[len]) + (code - c.first[len]) as usize];
    (usize::from(sym), len as u32)
}

/// A look-up by the next 12 bits: the whole symbols they hold (at most
/// two, the shortest code being 5 bits), as `bits | count << 6 | sym0 << 8
/// | sym1 << 16`; 0 when the first code is longer than 12 bits. `bits`
/// comes first so that a shift by the entry (masked to 6 bits, as x86
/// does anyway) consumes them.
const WINDOW: u32 = 12;
static FAST: [u32; 1 << WINDOW] = fast();

const fn fast() -> [u32; 1 << WINDOW] {
    let c = canonical();
    let mut t = [0u32; 1 << WINDOW];
    let mut w = 0usize;
    while w < 1 << WINDOW {
        let v = (w as u64) << (32 - WINDOW);
        let mut entry = 0u32;
        let mut used = 0usize;
        let mut count = 0u32;
        while count < 2 {
            let rest = (v << used) & 0xffff_ffff;
            let mut len = 5;
            while rest >= c.limit[len] {
                len += 1;
            }
            if used + len > WINDOW as usize {
                break;
            }
            let code = (rest >> (32 - len)) as u32;
            let sym = c.sorted[c.rank[len] as usize + (code - c.first[len]) as usize];
            entry |= (sym as u32) << (8 + 8 * count);
            used += len;
            count += 1;
        }
        if count > 0 {
            entry |= used as u32 | count << 6;
        }
        t[w] = entry;
        w += 1;
    }
    t
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HuffmanError {
    #[error("Huffman-coded string has more than 7 bits of padding")]
    PaddingTooLong,
    #[error("Huffman-coded string's padding is not a prefix of EOS (all ones)")]
    PaddingNotEos,
    #[error("Huffman-coded string contains the EOS symbol")]
    Eos,
}

/// The most bytes `len` bytes of Huffman code can decode to (5-bit codes
/// are the shortest).
pub const fn max_decoded_len(len: usize) -> usize {
    len / 5 * 8 + (len % 5) * 8 / 5
}

/// Decode `src` into `buf` if `OUT` (which then has room for
/// `max_decoded_len(src.len()) + 2` bytes); returns the decoded length.
#[inline(always)]
fn run<const OUT: bool>(src: &[u8], buf: &mut [u8]) -> Result<usize, HuffmanError> {
    // `acc` holds the next `bits` bits of `src`, left-aligned; below them
    // it holds zeros or more of `src` as it is (so or-ing `src` in again
    // at the right place changes nothing). Byte `pos` starts right after
    // the `bits` bits.
    let mut acc = 0u64;
    let mut bits = 0u32;
    let mut pos = 0usize;
    let mut n = 0usize;
    loop {
        if bits >= 32 {
            // Enough for any code: no refill.
        } else if let Some(chunk) = src.get(pos..).and_then(<[u8]>::first_chunk::<8>) {
            // 7 whole bytes or more.
            acc |= u64::from_be_bytes(*chunk) >> bits;
            pos += ((63 - bits) >> 3) as usize;
            bits |= 56;
        } else {
            while bits <= 56 {
                let Some(&b) = src.get(pos) else { break };
                acc |= u64::from(b) << (56 - bits);
                pos += 1;
                bits += 8;
            }
        }
        if bits == 0 {
            return Ok(n);
        }
        let e = FAST[(acc >> (64 - WINDOW)) as usize];
        let used = e & 0x3f;
        if used != 0 && used <= bits {
            if OUT {
                buf[n] = (e >> 8) as u8;
                buf[n + 1] = (e >> 16) as u8;
            }
            n += ((e >> 6) & 3) as usize;
            acc = acc.wrapping_shl(e);
            bits -= used;
            continue;
        }
        // A code longer than the window, or the string's last bits.
        let (sym, len) = decode_one((acc >> 32) as u32);
        if len > bits {
            // The last bits are no whole code: they are padding.
            if bits > 7 {
                return Err(HuffmanError::PaddingTooLong);
            }
            if acc >> (64 - bits) != (1 << bits) - 1 {
                return Err(HuffmanError::PaddingNotEos);
            }
            return Ok(n);
        }
        if sym == EOS {
            return Err(HuffmanError::Eos);
        }
        if OUT {
            buf[n] = sym as u8;
        }
        n += 1;
        acc <<= len;
        bits -= len;
    }
}

/// The room [`decode_into`] needs for `len` bytes of code: the longest
/// result, plus two bytes that a step decoding fewer than two symbols
/// writes to (the loop then has no branch per symbol).
pub const fn buf_len(len: usize) -> usize {
    max_decoded_len(len) + 2
}

/// Decode a Huffman-coded string into the start of `buf`, which must be
/// at least [`buf_len`]`(src.len())` long (else this panics); returns the
/// decoded length. What `buf` holds past it is unspecified.
pub fn decode_into(src: &[u8], buf: &mut [u8]) -> Result<usize, HuffmanError> {
    assert!(
        buf.len() >= buf_len(src.len()),
        "Huffman output buffer too small"
    );
    run::<true>(src, buf)
}

/// Decode a Huffman-coded string, appending it to `out`. On error, `out`
/// is left as it was.
pub fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    let start = out.len();
    out.resize(start + buf_len(src.len()), 0);
    match run::<true>(src, &mut out[start..]) {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Check a Huffman-coded string without writing it out; returns its
/// decoded length.
pub fn validate(src: &[u8]) -> Result<usize, HuffmanError> {
    run::<false>(src, &mut [])
}

/// The length of `src` once Huffman-coded.
pub fn encoded_len(src: &[u8]) -> usize {
    let bits: usize = src
        .iter()
        .map(|&b| usize::from(LENGTHS[usize::from(b)]))
        .sum();
    bits.div_ceil(8)
}

/// Huffman-code `src`, appending it to `out` (padded with the start of
/// EOS, as RFC 7541 5.2 asks).
pub fn encode(src: &[u8], out: &mut Vec<u8>) {
    out.reserve(encoded_len(src));
    let mut acc = 0u64;
    let mut bits = 0u32;
    for &b in src {
        let len = u32::from(LENGTHS[usize::from(b)]);
        acc = (acc << len) | u64::from(CODES[usize::from(b)]);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::huffman::{HuffmanDecoder, HuffmanDecoderError};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn ours(src: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|()| out)
    }

    fn loona(src: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        thread_local! {
            // Building it takes longer than decoding with it.
            static LOONA: std::cell::RefCell<HuffmanDecoder> =
                std::cell::RefCell::new(HuffmanDecoder::new());
        }
        let got = LOONA.with(|d| d.borrow_mut().decode(src));
        got.map_err(|e| match e {
            HuffmanDecoderError::PaddingTooLarge => HuffmanError::PaddingTooLong,
            HuffmanDecoderError::InvalidPadding => HuffmanError::PaddingNotEos,
            HuffmanDecoderError::EOSInString => HuffmanError::Eos,
            e => panic!("unexpected loona error {e:?}"),
        })
    }

    /// A code as a string of bits, padded with ones to whole bytes.
    fn code_bytes(sym: usize) -> Vec<u8> {
        let len = u32::from(LENGTHS[sym]);
        let pad = (8 - len % 8) % 8;
        let v = (u64::from(CODES[sym]) << pad) | ((1u64 << pad) - 1);
        let n = (len + pad) / 8;
        (0..n).rev().map(|i| (v >> (8 * i)) as u8).collect()
    }

    #[test]
    fn canonical_codes_are_the_rfc_codes() {
        // Spot checks against RFC 7541 Appendix B as printed.
        let rfc: [(usize, u32, u8); 9] = [
            (0, 0x1ff8, 13),
            (b' ' as usize, 0x14, 6),
            (b'0' as usize, 0x0, 5),
            (b'a' as usize, 0x3, 5),
            (b'A' as usize, 0x21, 6),
            (b'z' as usize, 0x7b, 7),
            (b'~' as usize, 0x1ffd, 13),
            (255, 0x3ffffee, 26),
            (EOS, 0x3fff_ffff, 30),
        ];
        for (sym, code, len) in rfc {
            assert_eq!((CODES[sym], LENGTHS[sym]), (code, len), "symbol {sym}");
        }
        // The code is complete (Kraft's sum is exactly 1).
        let kraft: u64 = LENGTHS.iter().map(|&l| 1u64 << (30 - l)).sum();
        assert_eq!(kraft, 1 << 30);
    }

    /// loona-hpack has no Huffman encoder (its encoder never uses Huffman),
    /// but its decoder holds the RFC's (code, length) table. Each byte's
    /// code, padded with ones, must decode there to that byte alone; and
    /// since codes are prefix-free, followed by '0' (00000) to both, which
    /// pins the code's length too.
    #[test]
    fn every_byte_code_matches_loona() {
        for sym in 0..256usize {
            let bytes = code_bytes(sym);
            assert_eq!(loona(&bytes), Ok(vec![sym as u8]), "symbol {sym}");
            assert_eq!(ours(&bytes), Ok(vec![sym as u8]), "symbol {sym}");
            let mut enc = Vec::new();
            encode(&[sym as u8], &mut enc);
            assert_eq!(enc, bytes, "symbol {sym}");
            let mut two = Vec::new();
            encode(&[sym as u8, b'0'], &mut two);
            assert_eq!(loona(&two), Ok(vec![sym as u8, b'0']), "symbol {sym}");
        }
        // EOS: loona and we both refuse its code.
        let eos = code_bytes(EOS);
        assert_eq!(loona(&eos), Err(HuffmanError::Eos));
        assert_eq!(ours(&eos), Err(HuffmanError::Eos));
    }

    /// RFC 7541 C.4 and C.6: the Huffman-coded strings of the examples.
    #[test]
    fn rfc7541_c4_c6_examples() {
        let cases = [
            ("www.example.com", "f1e3c2e5f23a6ba0ab90f4ff"),
            ("no-cache", "a8eb10649cbf"),
            ("custom-key", "25a849e95ba97d7f"),
            ("custom-value", "25a849e95bb8e8b4bf"),
            ("302", "6402"),
            ("private", "aec3771a4b"),
            (
                "Mon, 21 Oct 2013 20:13:21 GMT",
                "d07abe941054d444a8200595040b8166e082a62d1bff",
            ),
            (
                "https://www.example.com",
                "9d29ad171863c78f0b97c8e9ae82ae43d3",
            ),
            ("307", "640eff"),
            (
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
                "94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
            ),
            ("gzip", "9bd9ab"),
        ];
        for (plain, coded) in cases {
            let coded = hex(coded);
            assert_eq!(ours(&coded).as_deref(), Ok(plain.as_bytes()), "{plain}");
            assert_eq!(validate(&coded), Ok(plain.len()), "{plain}");
            let mut enc = Vec::new();
            encode(plain.as_bytes(), &mut enc);
            assert_eq!(enc, coded, "{plain}");
            assert_eq!(encoded_len(plain.as_bytes()), coded.len());
        }
    }

    #[test]
    fn empty_string_is_valid() {
        assert_eq!(ours(&[]), Ok(vec![]));
        assert_eq!(validate(&[]), Ok(0));
    }

    /// h2spec hpack/5.2/1: more than 7 bits of padding.
    #[test]
    fn padding_longer_than_7_bits() {
        // A whole byte of ones after nothing, or after 'a' (00011).
        assert_eq!(ours(&[0xff]), Err(HuffmanError::PaddingTooLong));
        assert_eq!(ours(&[0x1f, 0xff]), Err(HuffmanError::PaddingTooLong));
        // "www.example.com" with an extra 0xff.
        let mut s = hex("f1e3c2e5f23a6ba0ab90f4ff");
        s.push(0xff);
        assert_eq!(ours(&s), Err(HuffmanError::PaddingTooLong));
        assert_eq!(validate(&s), Err(HuffmanError::PaddingTooLong));
        assert_eq!(loona(&s), Err(HuffmanError::PaddingTooLong));
    }

    /// h2spec hpack/5.2/2: padding that is not the start of EOS.
    #[test]
    fn padding_not_all_ones() {
        // 'a' (00011) then 000.
        assert_eq!(ours(&[0x18]), Err(HuffmanError::PaddingNotEos));
        // 'a' then 110.
        assert_eq!(ours(&[0x1e]), Err(HuffmanError::PaddingNotEos));
        assert_eq!(validate(&[0x1e]), Err(HuffmanError::PaddingNotEos));
        assert_eq!(loona(&[0x1e]), Err(HuffmanError::PaddingNotEos));
        // 'a' then 111 is fine.
        assert_eq!(ours(&[0x1f]), Ok(b"a".to_vec()));
    }

    /// h2spec hpack/5.2/3: EOS inside the string.
    #[test]
    fn eos_inside_a_string() {
        assert_eq!(ours(&[0xff, 0xff, 0xff, 0xff]), Err(HuffmanError::Eos));
        // 'a', EOS, then 'a' again.
        let mut bits = vec![false, false, false, true, true];
        bits.extend([true; 30]);
        bits.extend([false, false, false, true, true]);
        while bits.len() % 8 != 0 {
            bits.push(true);
        }
        let bytes: Vec<u8> = bits
            .chunks(8)
            .map(|c| c.iter().fold(0u8, |a, &b| (a << 1) | u8::from(b)))
            .collect();
        assert_eq!(ours(&bytes), Err(HuffmanError::Eos));
        assert_eq!(validate(&bytes), Err(HuffmanError::Eos));
        assert_eq!(loona(&bytes), Err(HuffmanError::Eos));
    }

    #[test]
    fn decode_appends_and_leaves_out_alone_on_error() {
        let mut out = b"x".to_vec();
        decode(&hex("9bd9ab"), &mut out).expect("gzip");
        assert_eq!(out, b"xgzip");
        assert!(decode(&[0xff], &mut out).is_err());
        assert_eq!(out, b"xgzip");
    }

    #[test]
    fn max_decoded_len_is_tight() {
        // '0' is 5 bits: 8 of them in 5 bytes.
        let mut enc = Vec::new();
        encode(b"00000000", &mut enc);
        assert_eq!(enc.len(), 5);
        assert_eq!(max_decoded_len(5), 8);
        for n in 0..40 {
            assert_eq!(max_decoded_len(n), n * 8 / 5);
        }
    }

    /// Random strings, biased towards the symbols headers use: encoded by
    /// us, loona and we decode them back.
    #[test]
    fn random_round_trip_against_loona() {
        let mut rng = fastrand::Rng::with_seed(0x6875_6666);
        let mut enc = Vec::new();
        for _ in 0..2_000 {
            let len = rng.usize(0..64);
            let plain: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.bool() {
                        rng.u8(..)
                    } else {
                        rng.u8(b' '..=b'~')
                    }
                })
                .collect();
            enc.clear();
            encode(&plain, &mut enc);
            assert_eq!(enc.len(), encoded_len(&plain));
            assert_eq!(ours(&enc).as_ref(), Ok(&plain));
            assert_eq!(validate(&enc), Ok(plain.len()));
            assert_eq!(loona(&enc).as_ref(), Ok(&plain));
        }
    }

    /// Random bytes, mostly invalid: loona and we agree on the result or
    /// the error, and `validate` agrees with `decode`.
    #[test]
    fn random_garbage_against_loona() {
        let mut rng = fastrand::Rng::with_seed(7541);
        let mut counts = [0usize; 4];
        for i in 0..20_000 {
            let len = rng.usize(0..24);
            let mut src: Vec<u8> = (0..len)
                .map(|_| match rng.u8(0..4) {
                    0 => 0xff,
                    1 => rng.u8(0xf0..),
                    _ => rng.u8(..),
                })
                .collect();
            if i % 3 == 0 {
                // Valid most of the way: a real string with a random tail.
                let mut enc = Vec::new();
                encode(b"grpc-timeout", &mut enc);
                enc.extend_from_slice(&src);
                src = enc;
            }
            let want = loona(&src);
            assert_eq!(ours(&src), want, "{src:02x?}");
            assert_eq!(validate(&src), want.as_ref().map(Vec::len).map_err(|e| *e));
            counts[match want {
                Ok(_) => 0,
                Err(HuffmanError::PaddingTooLong) => 1,
                Err(HuffmanError::PaddingNotEos) => 2,
                Err(HuffmanError::Eos) => 3,
            }] += 1;
        }
        // Every outcome was exercised.
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }
}

/// Best-of-batches timing for the `#[ignore]` micro-benchmarks: the
/// minimum is what the code costs when nothing else runs on the core.
#[cfg(test)]
pub(crate) fn best_of<F: FnMut()>(mut f: F) -> std::time::Duration {
    const BATCH: u32 = 2_000;
    (0..500)
        .map(|_| {
            let t = std::time::Instant::now();
            for _ in 0..BATCH {
                f();
            }
            t.elapsed() / BATCH
        })
        .min()
        .unwrap_or_default()
}

#[cfg(test)]
mod bench {
    use super::*;

    /// `cargo test --release -p balancer-router huffman_timing -- --ignored --nocapture`
    #[test]
    #[ignore = "timing; run in release"]
    fn huffman_timing() {
        let mut enc = Vec::new();
        encode(
            b"greeter.default.svc.cluster.local:50051/helloworld.Greeter/SayHello",
            &mut enc,
        );
        let t = best_of(|| {
            std::hint::black_box(validate(std::hint::black_box(&enc)).ok());
        });
        println!("validate {} bytes: {t:?}", enc.len());
        let mut out = Vec::new();
        let t = best_of(|| {
            out.clear();
            std::hint::black_box(decode(std::hint::black_box(&enc), &mut out).ok());
        });
        println!("decode {} bytes: {t:?}", enc.len());
        // The worst case: codes of 20 bits and more, decoded canonically.
        let plain: Vec<u8> = (0..4096u32).map(|i| 0x80 | (i * 37) as u8).collect();
        let mut enc = Vec::new();
        encode(&plain, &mut enc);
        let t = best_of(|| {
            std::hint::black_box(validate(std::hint::black_box(&enc)).ok());
        });
        println!("validate {} bytes of long codes: {t:?}", enc.len());
    }
}
