//! HPACK's Huffman code (RFC 7541 5.2 and Appendix B): a decoder that also
//! serves as the validator of Huffman-coded string literals, and an encoder.
//!
//! The code is canonical: within one length, codes are consecutive in
//! symbol order, and each length starts right after the last code of the
//! one before, shifted left (RFC 7541 Appendix B lists it that way). So the
//! 257 code lengths are all the spec data needed; codes, the decoding tree
//! and the decoder's tables are computed from them at compile time (the
//! tests compare every code with loona-hpack's table, written out from the
//! RFC by other hands).
//!
//! Decoding goes 4 bits a step through a 256-state machine (one state per
//! internal node of the code tree; the 257 leaves need 256 of them): a
//! 12 KiB table, two look-ups a byte, no allocation beyond the output.
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
const MAX_LEN: u8 = 30;

/// Each symbol's code, right-aligned in `LENGTHS[sym]` bits.
static CODES: [u32; 257] = canonical_codes();

const fn canonical_codes() -> [u32; 257] {
    let mut codes = [0u32; 257];
    let mut code = 0u32;
    let mut len = 1;
    while len <= MAX_LEN {
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] == len {
                codes[sym] = code;
                code += 1;
            }
            sym += 1;
        }
        code <<= 1;
        len += 1;
    }
    // A complete prefix code: after the last length, every code of 31
    // bits is used up.
    assert!(code == 1 << (MAX_LEN + 1));
    codes
}

/// A child in the tree: an internal node's index, or `LEAF | symbol`.
const LEAF: u16 = 0x8000;

/// The code tree: 256 internal nodes, 0 the root.
struct Tree {
    child: [[u16; 2]; 256],
    /// Bits from the root to the node.
    depth: [u8; 256],
    /// Whether those bits are all ones (a prefix of EOS).
    ones: [bool; 256],
}

const fn tree() -> Tree {
    let mut t = Tree {
        child: [[0; 2]; 256],
        depth: [0; 256],
        ones: [false; 256],
    };
    t.ones[0] = true;
    let codes = canonical_codes();
    let mut free = 1usize;
    let mut sym = 0;
    while sym < 257 {
        let len = LENGTHS[sym];
        let code = codes[sym];
        let mut node = 0usize;
        let mut i = len;
        while i > 1 {
            i -= 1;
            let bit = ((code >> i) & 1) as usize;
            let c = t.child[node][bit];
            if c == 0 {
                assert!(free < 256);
                t.child[node][bit] = free as u16;
                t.depth[free] = t.depth[node] + 1;
                t.ones[free] = t.ones[node] && bit == 1;
                node = free;
                free += 1;
            } else {
                assert!(c & LEAF == 0, "not a prefix code");
                node = c as usize;
            }
        }
        let bit = (code & 1) as usize;
        assert!(t.child[node][bit] == 0, "not a prefix code");
        t.child[node][bit] = LEAF | sym as u16;
        sym += 1;
    }
    assert!(free == 256);
    t
}

/// One 4-bit step of the decoder from a state (an internal node).
#[derive(Clone, Copy)]
struct Step {
    next: u8,
    sym: u8,
    /// `EMIT`: `sym` was decoded (at most one symbol fits in 4 bits, the
    /// shortest code being 5); `FAIL`: EOS was decoded.
    flags: u8,
}

const EMIT: u8 = 1;
const FAIL: u8 = 2;

static STEPS: [[Step; 16]; 256] = steps();

const fn steps() -> [[Step; 16]; 256] {
    let t = tree();
    let mut table = [[Step {
        next: 0,
        sym: 0,
        flags: 0,
    }; 16]; 256];
    let mut state = 0;
    while state < 256 {
        let mut nibble = 0;
        while nibble < 16 {
            let mut node = state;
            let mut step = Step {
                next: 0,
                sym: 0,
                flags: 0,
            };
            let mut i = 4;
            while i > 0 {
                i -= 1;
                let c = t.child[node][(nibble >> i) & 1];
                if c & LEAF == 0 {
                    node = c as usize;
                } else if (c & !LEAF) as usize == EOS {
                    step.flags = FAIL;
                    node = 0;
                    break;
                } else {
                    step.flags = EMIT;
                    step.sym = (c & 0xff) as u8;
                    node = 0;
                }
            }
            step.next = node as u8;
            table[state][nibble] = step;
            nibble += 1;
        }
        state += 1;
    }
    table
}

/// How a string may end in each state: 0 if it may, else the error.
static ENDS: [u8; 256] = ends();

const END_OK: u8 = 0;
const END_LONG: u8 = 1;
const END_NOT_EOS: u8 = 2;

const fn ends() -> [u8; 256] {
    let t = tree();
    let mut ends = [END_OK; 256];
    let mut s = 0;
    while s < 256 {
        ends[s] = if t.depth[s] > 7 {
            END_LONG
        } else if !t.ones[s] {
            END_NOT_EOS
        } else {
            END_OK
        };
        s += 1;
    }
    ends
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

fn end(state: u8, failed: bool) -> Result<(), HuffmanError> {
    if failed {
        return Err(HuffmanError::Eos);
    }
    match ENDS[usize::from(state)] {
        END_OK => Ok(()),
        END_LONG => Err(HuffmanError::PaddingTooLong),
        _ => Err(HuffmanError::PaddingNotEos),
    }
}

/// The most bytes `len` bytes of Huffman code can decode to (5-bit codes
/// are the shortest).
pub const fn max_decoded_len(len: usize) -> usize {
    len / 5 * 8 + (len % 5) * 8 / 5
}

/// Decode a Huffman-coded string, appending it to `out`. On error, `out`
/// is left as it was.
pub fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    let start = out.len();
    // Room for the longest result, plus one slot that a step without a
    // symbol may write to: the loop then has no branch per symbol.
    out.resize(start + max_decoded_len(src.len()) + 1, 0);
    let buf = &mut out[start..];
    let mut n = 0usize;
    let mut state = 0u8;
    let mut flags = 0u8;
    for &b in src {
        let s = STEPS[usize::from(state)][usize::from(b >> 4)];
        buf[n] = s.sym;
        n += usize::from(s.flags & EMIT);
        flags |= s.flags;
        let s = STEPS[usize::from(s.next)][usize::from(b & 0x0f)];
        buf[n] = s.sym;
        n += usize::from(s.flags & EMIT);
        flags |= s.flags;
        state = s.next;
    }
    match end(state, flags & FAIL != 0) {
        Ok(()) => {
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
    let mut n = 0usize;
    let mut state = 0u8;
    let mut flags = 0u8;
    for &b in src {
        let s = STEPS[usize::from(state)][usize::from(b >> 4)];
        n += usize::from(s.flags & EMIT);
        flags |= s.flags;
        let s = STEPS[usize::from(s.next)][usize::from(b & 0x0f)];
        n += usize::from(s.flags & EMIT);
        flags |= s.flags;
        state = s.next;
    }
    end(state, flags & FAIL != 0).map(|()| n)
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
        HuffmanDecoder::new().decode(src).map_err(|e| match e {
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
        for _ in 0..5_000 {
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
        for i in 0..50_000 {
            let len = rng.usize(0..12);
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
        assert!(counts.iter().all(|&c| c > 100), "{counts:?}");
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore = "timing; run in release"]
    fn huffman_timing() {
        let mut enc = Vec::new();
        encode(
            b"greeter.default.svc.cluster.local:50051/helloworld.Greeter/SayHello",
            &mut enc,
        );
        let n = 1_000_000u32;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(validate(std::hint::black_box(&enc)).expect("ok"));
        }
        println!("validate {} bytes: {:?}", enc.len(), t.elapsed() / n);
        let mut out = Vec::new();
        let t = std::time::Instant::now();
        for _ in 0..n {
            out.clear();
            decode(std::hint::black_box(&enc), &mut out).expect("ok");
            std::hint::black_box(&out);
        }
        println!("decode {} bytes: {:?}", enc.len(), t.elapsed() / n);
    }
}
