//! Backend selection: plain functions that `cgroup/connect4/6` run in the
//! kernel and that the unit tests run in userspace.
//!
//! They work on slot numbers (`0..n`) and ask the caller for the load of a
//! slot through a closure, so the kernel can back it with map lookups and a
//! test with an array. Everything is written for the verifier: loops have a
//! constant bound, no arithmetic can panic (`n` is a `NonZeroU32`), and
//! nothing allocates.

use core::num::NonZeroU32;

/// Up to this many backends least-conn looks at every one of them; above it,
/// it samples two (power of two choices). A full scan costs two map lookups
/// per backend, so it is kept to small services, where P2C's randomness
/// would cost the most evenness.
pub const FULL_SCAN_MAX: u32 = 16;

/// How long a backend whose connect failed is passed over: a refusing
/// pod (its process died, its port closed) never counts a live
/// connection, so without the mark least-conn would find it the least
/// loaded every time, and a pool refilling after a failure would send
/// nearly every connect there. One connect a second still tries it, so a
/// pod that comes back is used again within a second.
pub const FAILED_MARK_NS: u64 = 1_000_000_000;

/// Slots looked at past a marked pick for an unmarked one (random,
/// round-robin, and least-conn above [`FULL_SCAN_MAX`]).
pub const AVOID_SCAN: u32 = 8;

/// Whether a backend whose last failed connect was at `failed_at_ns` (0:
/// none since its last established one) is passed over at `now_ns`.
#[inline(always)]
pub fn marked(failed_at_ns: u64, now_ns: u64) -> bool {
    failed_at_ns != 0 && now_ns.saturating_sub(failed_at_ns) < FAILED_MARK_NS
}

/// `first`, or if it is marked the next unmarked slot within
/// [`AVOID_SCAN`]; `first` again when they are all marked (a connect that
/// may fail beats none at all).
#[inline(always)]
pub fn avoid_marked(n: NonZeroU32, first: u32, mut is_marked: impl FnMut(u32) -> bool) -> u32 {
    if !is_marked(first) {
        return first;
    }
    let count = n.get();
    let mut i = 1;
    while i <= AVOID_SCAN {
        if i >= count {
            break;
        }
        let mut slot = first + i;
        if slot >= count {
            slot -= count;
        }
        if !is_marked(slot) {
            return slot;
        }
        i += 1;
    }
    first
}

/// `random`: what kube-proxy's `statistic --mode random` chain amounts to.
#[inline(always)]
pub fn pick_random(n: NonZeroU32, rand: u32) -> u32 {
    rand % n
}

/// `round-robin`: `cursor` is the service's counter before this pick.
#[inline(always)]
pub fn pick_round_robin(n: NonZeroU32, cursor: u64) -> u32 {
    // Truncation is fine: only the residue matters and n fits in u32.
    (cursor % u64::from(n.get())) as u32
}

/// `least-conn`.
///
/// With at most [`FULL_SCAN_MAX`] backends it scans all of them, starting at
/// `cursor % n`, and takes the first one with the fewest live connections.
/// Rotating the start means ties are broken round-robin, so a burst of
/// concurrent connects (which all see the same counts, because a connection
/// is only counted once it is established) still spreads evenly, and
/// connections opened one after another spread exactly evenly.
///
/// With more backends it compares two distinct random slots (P2C) and takes
/// the less loaded, the first on a tie.
///
/// `load(slot)` returns the live connection count of a slot, or `None` when
/// the slot cannot be read (an update in flight); such slots are skipped. If
/// no slot can be read the result is `None`.
#[inline(always)]
pub fn pick_least_conn(
    n: NonZeroU32,
    cursor: u64,
    rand: u32,
    mut load: impl FnMut(u32) -> Option<u64>,
) -> Option<u32> {
    let count = n.get();
    if count <= FULL_SCAN_MAX {
        let start = pick_round_robin(n, cursor);
        let mut best: Option<(u32, u64)> = None;
        let mut i = 0;
        while i < FULL_SCAN_MAX {
            if i >= count {
                break;
            }
            let mut slot = start + i;
            if slot >= count {
                slot -= count;
            }
            if let Some(l) = load(slot) {
                match best {
                    Some((_, b)) if b <= l => {}
                    _ => best = Some((slot, l)),
                }
            }
            i += 1;
        }
        return best.map(|(slot, _)| slot);
    }
    let a = rand % n;
    // A second slot distinct from `a`: an offset in 1..n.
    let offset = 1 + (rand >> 16) % (count - 1);
    let mut b = a + offset;
    if b >= count {
        b -= count;
    }
    match (load(a), load(b)) {
        (Some(la), Some(lb)) => Some(if lb < la { b } else { a }),
        (Some(_), None) => Some(a),
        (None, Some(_)) => Some(b),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    /// A tiny xorshift so the tests are deterministic.
    struct Rng(u32);
    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            self.0
        }
    }

    #[test]
    fn a_mark_lasts_a_second_and_an_established_connect_clears_it() {
        assert!(!marked(0, 5 * FAILED_MARK_NS), "never failed");
        assert!(marked(FAILED_MARK_NS, FAILED_MARK_NS + 1));
        assert!(marked(FAILED_MARK_NS, 2 * FAILED_MARK_NS - 1));
        assert!(!marked(FAILED_MARK_NS, 2 * FAILED_MARK_NS));
    }

    #[test]
    fn a_marked_pick_moves_to_the_next_unmarked_slot_unless_all_are_marked() {
        let marks = [true, false, true, false];
        let m = |s: u32| marks[s as usize];
        assert_eq!(avoid_marked(nz(4), 0, m), 1);
        assert_eq!(avoid_marked(nz(4), 1, m), 1);
        assert_eq!(avoid_marked(nz(4), 2, m), 3);
        assert_eq!(avoid_marked(nz(4), 3, m), 3);
        assert_eq!(avoid_marked(nz(3), 2, |_| true), 2, "all marked: the pick");
        assert_eq!(avoid_marked(nz(1), 0, |_| true), 0);
    }

    /// The case that motivated the mark: a pool refilling 40 connections
    /// one after another over 4 backends, one of them refusing. Without
    /// the mark least-conn sends nearly all of them there (a refused
    /// connect is never counted live); with it, only the first.
    #[test]
    fn a_refusing_backend_takes_one_connect_of_a_refilling_pool_not_most() {
        for marking in [false, true] {
            let mut active = [0u64; 4];
            let mut failed_at = [0u64; 4];
            let mut refused = 0;
            let mut rng = Rng(11);
            for i in 0..40u64 {
                let now = 1_000 + i * 1_000_000; // 1 ms apart
                let load = |s: u32| {
                    let s = s as usize;
                    Some(if marking && marked(failed_at[s], now) {
                        u64::MAX
                    } else {
                        active[s]
                    })
                };
                let slot = pick_least_conn(nz(4), i, rng.next(), load).expect("a slot") as usize;
                if slot == 0 {
                    refused += 1;
                    failed_at[0] = now;
                } else {
                    active[slot] += 1;
                }
            }
            if marking {
                assert_eq!(refused, 1, "marked after its first refusal");
            } else {
                assert!(refused > 30, "the unmarked baseline: {refused}");
            }
        }
    }

    #[test]
    fn round_robin_cycles_through_every_slot() {
        let picks: Vec<u32> = (0..8).map(|c| pick_round_robin(nz(4), c)).collect();
        assert_eq!(picks, vec![0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn random_stays_in_range_and_hits_every_slot() {
        let mut rng = Rng(7);
        let mut hits = [0u32; 5];
        for _ in 0..5000 {
            hits[pick_random(nz(5), rng.next()) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| h > 800), "{hits:?}");
    }

    #[test]
    fn least_conn_sequential_opens_spread_exactly() {
        // 64 connections opened one after another over 4 backends, each
        // counted before the next pick: exactly 16 each, whatever the cursor.
        for start_cursor in [0u64, 3, 1_000_001] {
            let mut loads = [0u64; 4];
            for i in 0..64u64 {
                let s = pick_least_conn(nz(4), start_cursor + i, 0, |s| Some(loads[s as usize]))
                    .expect("pick");
                loads[s as usize] += 1;
            }
            assert_eq!(loads, [16; 4]);
        }
    }

    #[test]
    fn least_conn_burst_with_stale_counts_rotates_ties() {
        // Concurrent connects all see the same (zero) counts; the rotating
        // cursor still spreads them one per backend per round.
        let loads = [0u64; 4];
        let mut got = [0u32; 4];
        for c in 0..64u64 {
            let s = pick_least_conn(nz(4), c, 0, |s| Some(loads[s as usize])).expect("pick");
            got[s as usize] += 1;
        }
        assert_eq!(got, [16; 4]);
    }

    #[test]
    fn least_conn_prefers_least_loaded() {
        let loads = [5u64, 9, 1, 7];
        for c in 0..4 {
            assert_eq!(
                pick_least_conn(nz(4), c, 0, |s| Some(loads[s as usize])),
                Some(2)
            );
        }
    }

    #[test]
    fn least_conn_refills_a_new_backend_first() {
        // Scale-up: a new, empty backend takes every new connection until it
        // has caught up with the others.
        let mut loads = [10u64, 10, 10, 0];
        for c in 0..10 {
            let s = pick_least_conn(nz(4), c, 0, |s| Some(loads[s as usize])).expect("pick");
            assert_eq!(s, 3);
            loads[3] += 1;
        }
    }

    #[test]
    fn least_conn_skips_unreadable_slots() {
        let loads = [Some(1u64), None, Some(0), None];
        assert_eq!(pick_least_conn(nz(4), 0, 0, |s| loads[s as usize]), Some(2));
        assert_eq!(pick_least_conn(nz(2), 0, 0, |_| None), None);
    }

    #[test]
    fn least_conn_single_backend() {
        assert_eq!(pick_least_conn(nz(1), 99, 12345, |_| Some(3)), Some(0));
    }

    #[test]
    fn p2c_picks_two_distinct_slots_and_takes_the_lighter() {
        let n = 100u32;
        let mut rng = Rng(99);
        for _ in 0..10_000 {
            let r = rng.next();
            let mut seen = Vec::new();
            let pick = pick_least_conn(nz(n), 0, r, |s| {
                seen.push(s);
                Some(u64::from(s))
            })
            .expect("pick");
            assert_eq!(seen.len(), 2);
            assert_ne!(seen[0], seen[1]);
            assert!(seen.iter().all(|&s| s < n));
            assert_eq!(pick, *seen.iter().min().expect("two"));
        }
    }

    #[test]
    fn p2c_balances_many_backends() {
        // 64 backends, 6400 sequential opens: P2C keeps max close to mean.
        let n = 64usize;
        let mut loads = vec![0u64; n];
        let mut rng = Rng(12345);
        for c in 0..6400u64 {
            let s = pick_least_conn(nz(n as u32), c, rng.next(), |s| Some(loads[s as usize]))
                .expect("pick");
            loads[s as usize] += 1;
        }
        let max = *loads.iter().max().expect("max");
        assert!(max <= 104, "max {max} over mean 100: {loads:?}");
    }
}
