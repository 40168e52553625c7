//! The address codec every map uses: four raw 32-bit words in network byte
//! order, exactly as the kernel hands them to `cgroup/connect6`, with IPv4
//! in the IPv4-mapped IPv6 form `::ffff:a.b.c.d`.
//!
//! The kernel programs and the agent both build and test that form here,
//! so they cannot disagree on it. `const fn` and `#[inline(always)]`: the
//! eBPF programs call these on their hot path.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Word 2 of an IPv4-mapped IPv6 address (`::ffff:0:0/96`) as a raw
/// network-order word.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4-mapped words of an IPv4 address given as one raw network-order
/// word (as in `bpf_sock_addr.user_ip4`).
#[inline(always)]
pub const fn v4_mapped(v4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, v4]
}

/// True when the words are an IPv4-mapped address, that is IPv4.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// The IPv4 address (one raw network-order word) the words map, if they
/// are IPv4-mapped.
#[inline(always)]
pub const fn v4_word(addr: &[u32; 4]) -> Option<u32> {
    if is_v4_mapped(addr) {
        Some(addr[3])
    } else {
        None
    }
}

/// Address as four raw network-order words, IPv4 mapped into IPv6.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The inverse of [`addr_words`]. IPv4-mapped words come back as the IPv4
/// address they map.
pub fn words_addr(w: [u32; 4]) -> IpAddr {
    if let Some(v4) = v4_word(&w) {
        return IpAddr::V4(Ipv4Addr::from(v4.to_ne_bytes()));
    }
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_words_are_the_kernel_view() {
        let w = v4_mapped(u32::from_ne_bytes([198, 19, 0, 10]));
        assert_eq!(w[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(w[3].to_ne_bytes(), [198, 19, 0, 10]);
        assert!(is_v4_mapped(&w));
        assert_eq!(v4_word(&w), Some(w[3]));
        assert_eq!(addr_words("198.19.0.10".parse().expect("ip")), w);
    }

    #[test]
    fn ipv6_is_not_v4_mapped() {
        for a in [
            "fd00:18::1",
            "::1",
            "::",
            "::ffff:0:0:1",
            "64:ff9b::1.2.3.4",
        ] {
            let w = addr_words(a.parse().expect("ip"));
            assert!(!is_v4_mapped(&w), "{a}");
            assert_eq!(v4_word(&w), None, "{a}");
        }
        // Only word 2 marks the mapping: any other non-zero word is IPv6.
        let mut w = v4_mapped(1);
        w[1] = 1;
        assert!(!is_v4_mapped(&w));
    }

    #[test]
    fn address_words_round_trip() {
        for a in ["198.18.1.10", "fd00:18::1:10", "::ffff:1.2.3.4", "::1"] {
            let ip: IpAddr = a.parse().expect("ip");
            let back = words_addr(addr_words(ip));
            // IPv4-mapped IPv6 comes back as the IPv4 address it maps.
            let want = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            assert_eq!(back, want);
        }
    }
}
