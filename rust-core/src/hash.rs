// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The hash of the maps keyed by page or frame numbers a guest chooses.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Hashes a `u64` page or frame number with one 64x64->128 multiply under
/// two secret per-map values, folded. A guest picks the keys (FIXED MAP
/// IOVAs, the frames it maps); with a fixed hash it could pick keys that
/// all land in one probe sequence and make every request walk them under
/// a lock, with these it cannot aim. Each map gets its own values
/// (`Default` draws them).
#[derive(Clone, Copy)]
pub(crate) struct PageKeyHash {
    k0: u64,
    /// Odd.
    k1: u64,
}

impl Default for PageKeyHash {
    fn default() -> PageKeyHash {
        let seed = RandomState::new();
        PageKeyHash {
            k0: seed.hash_one(0u64),
            k1: seed.hash_one(1u64) | 1,
        }
    }
}

impl BuildHasher for PageKeyHash {
    type Hasher = PageHasher;

    #[inline]
    fn build_hasher(&self) -> PageHasher {
        PageHasher {
            key: *self,
            hash: 0,
        }
    }
}

/// The hasher of [`PageKeyHash`].
pub(crate) struct PageHasher {
    key: PageKeyHash,
    hash: u64,
}

impl Hasher for PageHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed; fold anything else in byte by byte.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    #[inline]
    fn write_u64(&mut self, page: u64) {
        let m = u128::from(self.hash ^ page ^ self.key.k0) * u128::from(self.key.k1);
        // Truncation intended: the two halves are folded together.
        self.hash = (m as u64) ^ ((m >> 64) as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// Capacity a page-keyed map keeps however few entries it holds: a map
/// that goes between empty and a few entries (one page mapped and
/// unmapped per I/O) must not allocate and free on every request.
const KEEP_CAPACITY: usize = 64;

/// Gives back the memory of removed entries once `map` holds fewer than a
/// quarter of what it has room for, shrinking it to twice its entries.
///
/// `room` is the caller's record of the map's size: `map.capacity()` as
/// it was after the last insertion (see [`note_room`]). Not the capacity
/// now: removals leave tombstones that `capacity()` stops counting while
/// their memory stays allocated, so a map emptied by removals can report
/// a capacity close to its length.
///
/// A map only grows when full (to about twice its entries), so between a
/// growth and a shrink at least half of its entries come or go: the
/// rehashing costs O(1) per insertion or removal, amortised, and the
/// allocation stays within about 4x the entries (or [`KEEP_CAPACITY`]).
/// Call after removals.
#[inline]
pub(crate) fn shrink_when_sparse<V>(
    map: &mut std::collections::HashMap<u64, V, PageKeyHash>,
    room: &mut usize,
) {
    if *room > 4 * KEEP_CAPACITY && map.len() * 4 < *room {
        map.shrink_to((map.len() * 2).max(KEEP_CAPACITY));
        *room = map.capacity();
    }
}

/// Records the size of `map` after insertions, for [`shrink_when_sparse`].
#[inline]
pub(crate) fn note_room<V>(map: &std::collections::HashMap<u64, V, PageKeyHash>, room: &mut usize) {
    *room = (*room).max(map.capacity());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn maps_get_their_own_keys_and_keep_entries_apart() {
        let (a, b) = (PageKeyHash::default(), PageKeyHash::default());
        assert_ne!((a.k0, a.k1), (b.k0, b.k1), "two maps drew the same key");
        assert_eq!(a.hash_one(7u64), a.hash_one(7u64));
        let mut m: HashMap<u64, u64, PageKeyHash> = HashMap::default();
        for k in 0..1000u64 {
            m.insert(k << 9, k);
        }
        assert!((0..1000u64).all(|k| m[&(k << 9)] == k));
    }
}
