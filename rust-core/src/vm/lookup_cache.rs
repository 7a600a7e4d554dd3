// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The thread-local cache of [`Vm::lookup`].

use super::*;

/// The thread-local cache of [`Vm::lookup`] (what QEMU's IOMMU translate
/// calls for every access, with no handle to keep a cache in): a
/// two-way set-associative table of successful domain lookups keyed by
/// (requester ID, IOVA page) and tagged with the VM's lookup generation,
/// which is
/// unique across VMs. Served only while the VM's generation still has
/// that value; it changes after every removal of a translation in any of
/// the VM's domains and after every DETACH or endpoint removal, before the
/// operation returns (the ordering argument is `crate::iotlb`'s). Bypass
/// and refusals are never cached; permissions are checked on every hit.
/// No epoch pin is needed on a hit: nothing epoch-protected is read.
pub(super) struct LookupCache;

/// Entries of the [`LookupCache`] (a power of two): 12 KiB of
/// thread-local storage per thread that calls [`Vm::lookup`] or not (it is
/// static TLS, zero-initialised).
pub(super) const LOOKUP_CACHE_ENTRIES: usize = 512;

/// Sets of two entries. Two ways rather than one: a page whose set already
/// holds another hot page no longer evicts it (with 256 hot pages spread
/// over 512 direct-mapped slots about 40% of them collided and missed on
/// every pass; with two ways a set must get three of them).
const LOOKUP_CACHE_SETS: usize = LOOKUP_CACHE_ENTRIES / 2;

/// One cached lookup; `key == 0` is empty.
#[derive(Clone, Copy)]
pub(super) struct LookupEntry {
    /// `iova_page << 17 | rid << 1 | 1` (IOVAs below 2^57 only).
    pub(super) key: u64,
    /// The VM lookup generation it was made under.
    pub(super) generation: u64,
    /// gpa of the page's first byte | pages to the end of the leaf << 2 |
    /// permission bits (as `crate::iotlb` packs it).
    pub(super) value: u64,
}

thread_local! {
    static LOOKUP_CACHE: [Cell<LookupEntry>; LOOKUP_CACHE_ENTRIES] = const {
        [const {
            Cell::new(LookupEntry {
                key: 0,
                generation: 0,
                value: 0,
            })
        }; LOOKUP_CACHE_ENTRIES]
    };
}

impl LookupCache {
    /// The key of (`rid`, `iova`) and the first slot of its set; None when
    /// not cacheable.
    #[inline(always)]
    pub(super) fn key(rid: u32, iova: u64) -> Option<(u64, usize)> {
        if iova >> MAX_IOVA_BITS != 0 || rid > 0xffff {
            return None;
        }
        let page = iova >> crate::types::PAGE_SHIFT;
        let key = page << 17 | u64::from(rid) << 1 | 1;
        let set = (page ^ u64::from(rid) << 3) as usize & (LOOKUP_CACHE_SETS - 1);
        Some((key, set * 2))
    }

    #[inline(always)]
    pub(super) fn get(rid: u32, iova: u64, generation: u64) -> Option<Lookup> {
        let (key, slot) = Self::key(rid, iova)?;
        // No destructor: the storage is always accessible, `try_with` only
        // keeps a hypothetical failure off the hot path's panic paths.
        // `slot` is even and below the length: `slot + 1` is in bounds.
        let e = LOOKUP_CACHE
            .try_with(|c| {
                let first = c[slot].get();
                if first.key == key {
                    first
                } else {
                    c[slot + 1].get()
                }
            })
            .ok()?;
        if e.key != key || e.generation != generation {
            return None;
        }
        let off = iova & crate::types::PAGE_MASK;
        let span = (e.value & crate::types::PAGE_MASK) >> 2;
        Some(Lookup {
            gpa: (e.value & !crate::types::PAGE_MASK) | off,
            run: (span << crate::types::PAGE_SHIFT) - off,
            // Truncation intended: the low bits hold the permissions.
            perms: Perm::from_bits_truncate(e.value as u8),
            bypass: false,
        })
    }

    pub(super) fn put(rid: u32, iova: u64, generation: u64, found: &Lookup) {
        let Some((key, slot)) = Self::key(rid, iova) else {
            return;
        };
        let off = iova & crate::types::PAGE_MASK;
        let span = (off + found.run) >> crate::types::PAGE_SHIFT;
        if span > crate::types::PAGE_MASK >> 2 {
            return;
        }
        let e = LookupEntry {
            key,
            generation,
            value: (found.gpa - off) | span << 2 | u64::from(found.perms.bits()),
        };
        // The newest entry goes first, the one it displaces second (the
        // second's goes); a stale copy of the same key is overwritten.
        let _ = LOOKUP_CACHE.try_with(|c| {
            let first = c[slot].get();
            if first.key != key {
                c[slot + 1].set(first);
            }
            c[slot].set(e);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup_of(gpa: u64) -> Lookup {
        Lookup {
            gpa,
            run: crate::types::PAGE_SIZE,
            perms: Perm::RW,
            bypass: false,
        }
    }

    #[test]
    fn a_set_keeps_its_two_newest_pages() {
        // Requester 0: the set is the page number's low bits, so these
        // three pages share one set. A thread of its own: the cache is
        // per thread.
        std::thread::spawn(|| {
            const GEN: u64 = 0x5eed;
            let sets = LOOKUP_CACHE_SETS as u64;
            let pages = [7, 7 + sets, 7 + 2 * sets];
            let iova = |i: usize| pages[i] << crate::types::PAGE_SHIFT;
            let gpa = |i: usize| 0x1000_0000 + ((i as u64) << crate::types::PAGE_SHIFT);
            let hit = |i: usize| LookupCache::get(0, iova(i), GEN).map(|l| l.gpa);

            LookupCache::put(0, iova(0), GEN, &lookup_of(gpa(0)));
            LookupCache::put(0, iova(1), GEN, &lookup_of(gpa(1)));
            assert_eq!(hit(0), Some(gpa(0)), "the older page stays in the set");
            assert_eq!(hit(1), Some(gpa(1)));
            // A third page evicts the oldest.
            LookupCache::put(0, iova(2), GEN, &lookup_of(gpa(2)));
            assert_eq!(hit(0), None);
            assert_eq!(hit(1), Some(gpa(1)));
            assert_eq!(hit(2), Some(gpa(2)));
            // Another generation: nothing is served.
            assert_eq!(LookupCache::get(0, iova(2), GEN + 1), None);
            // Re-filling a page under the new generation keeps its
            // neighbour (the stale copy is overwritten in place).
            LookupCache::put(0, iova(2), GEN + 1, &lookup_of(gpa(2)));
            assert_eq!(
                LookupCache::get(0, iova(2), GEN + 1).map(|l| l.gpa),
                Some(gpa(2))
            );
            assert_eq!(hit(1), Some(gpa(1)));
        })
        .join()
        .unwrap();
    }
}
