// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small software IOTLB: a direct-mapped cache of page-table leaves in
//! front of [`IoPageTable::lookup`], owned by one translating thread (a
//! [`CachedTranslator`](crate::vm::CachedTranslator)).
//!
//! # Validity
//!
//! An entry caches what the table walk answered for one 4 KiB IOVA page
//! (only hits are cached: a miss is never remembered, so MAP needs no
//! invalidation) and is tagged with the [`Domain::generation`] read before
//! that walk. It is served only while the domain's generation still has
//! that value. Every removal of a translation (UNMAP, DETACH, RAM removal:
//! all go through `Domain::remove_locked`) clears the table entries and
//! then stores a new, never-used generation with Release, before the
//! request returns. Generations are unique across all domains, so the tag
//! also names the domain: after DETACH and ATTACH of a new domain no entry
//! of the old one matches.
//!
//! # Memory ordering
//!
//! - Fill: the generation is loaded with Acquire *before* the walk. If the
//!   walk saw a leaf that a concurrent UNMAP then cleared, that UNMAP's new
//!   generation is stored after the clearing, so the load could not have
//!   returned it ... unless it happened-before our load, in which case
//!   (Acquire pairing with the Release store) the walk sees the cleared
//!   table. Either way an entry tagged `g` holds a translation that was
//!   live while the generation was `g`.
//! - Hit: the generation is loaded with Acquire and compared. A reader
//!   whose translation starts after an UNMAP returned (happens-after it)
//!   loads the new value (or a later one) and misses. A reader concurrent
//!   with the UNMAP may still get the old translation, exactly as the bare
//!   table walk may: the result is always either the old or the new
//!   mapping, never one that was removed before the translation started.
//!
//! Permissions are cached with the leaf and checked by the caller on every
//! access, hit or miss. Only the table level is cached: guest RAM (the
//! host address) is resolved per translation against the current RAM
//! layout, so RAM changes need nothing from the cache.

use crate::domain::Domain;
use crate::sync::epoch::Guard;
use crate::table::{IoPageTable, Leaf};
use crate::types::{Perm, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE};

/// Entries of an [`Iotlb`] (a power of two): 16 KiB, covering 4 MiB of
/// IOVA space in 4 KiB pages.
pub const IOTLB_ENTRIES: usize = 1024;

/// Local epochs live in the low bits of a tag, below the page address.
const EPOCH_MASK: u64 = PAGE_MASK;
/// Pages from a cached page to the end of its leaf live in the low bits of
/// the value, above the two permission bits; leaves that reach further
/// (none are made today: the largest is 2 MiB, 512 pages) are not cached.
const SPAN_SHIFT: u32 = 2;
const MAX_SPAN_PAGES: u64 = PAGE_MASK >> SPAN_SHIFT;

/// One cached page: 16 bytes, four to a cache line.
#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
struct Entry {
    /// The page's IOVA (page aligned) | the local epoch it was filled in
    /// (never 0), so `0` is empty. IOVAs of every width fit: no aliasing.
    tag: u64,
    /// Guest-physical address of the page's first byte | the pages from
    /// this page to the end of its leaf << [`SPAN_SHIFT`] | the leaf's
    /// permission bits.
    value: u64,
}

/// A direct-mapped cache of table leaves keyed by IOVA page and valid for
/// one domain generation (see the module documentation).
///
/// Entries are not tagged with the generation itself, which would double
/// their size, but with a small local epoch: the cache remembers the last
/// generation it saw and moves to a new epoch whenever the generation it
/// is given differs, which invalidates every entry at once without
/// touching them. The epoch is 12 bits; when it wraps (every 4095
/// generation changes) the entries are cleared.
pub struct Iotlb {
    entries: Box<[Entry; IOTLB_ENTRIES]>,
    /// The domain generation the current epoch belongs to (0: none;
    /// generations start at 1).
    generation: u64,
    /// The current local epoch, 1..=EPOCH_MASK.
    epoch: u64,
    misses: u64,
}

impl Default for Iotlb {
    fn default() -> Self {
        Iotlb {
            entries: Box::new([Entry::default(); IOTLB_ENTRIES]),
            generation: 0,
            epoch: 1,
            misses: 0,
        }
    }
}

impl std::fmt::Debug for Iotlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iotlb")
            .field("generation", &self.generation)
            .field("misses", &self.misses)
            .finish_non_exhaustive()
    }
}

impl Iotlb {
    /// An empty cache.
    pub fn new() -> Iotlb {
        Iotlb::default()
    }

    /// Table walks made because the cache did not hold a valid entry.
    pub fn misses(&self) -> u64 {
        self.misses
    }

    /// Drops every entry (never needed for correctness).
    pub fn clear(&mut self) {
        self.entries.fill(Entry::default());
        self.generation = 0;
        self.epoch = 1;
    }

    /// What `dom.table().lookup(iova, guard)` answers, from the cache when
    /// it holds a valid entry.
    #[inline(always)]
    pub fn lookup(&mut self, dom: &Domain, iova: u64, guard: &Guard) -> Option<Leaf> {
        self.set_generation(dom.generation());
        self.lookup_at(dom.table(), iova, guard)
    }

    /// Makes the cache serve only what was cached under `generation`:
    /// the value [`Domain::generation`] returned (Acquire) for the domain
    /// whose table the following [`Iotlb::lookup_at`] calls walk, read
    /// before them. A caller translating several pages reads it once,
    /// before the first.
    #[inline(always)]
    pub(crate) fn set_generation(&mut self, generation: u64) {
        if generation != self.generation {
            self.new_epoch(generation);
        }
    }

    #[cold]
    fn new_epoch(&mut self, generation: u64) {
        self.generation = generation;
        self.epoch += 1;
        if self.epoch > EPOCH_MASK {
            // Wrapped: tags of the coming epochs may still be in entries.
            self.entries.fill(Entry::default());
            self.epoch = 1;
        }
    }

    /// A lookup in `table` under the generation last given to
    /// [`Iotlb::set_generation`] (which must be the table's domain's).
    #[inline(always)]
    pub(crate) fn lookup_at(
        &mut self,
        table: &IoPageTable,
        iova: u64,
        guard: &Guard,
    ) -> Option<Leaf> {
        let tag = (iova & !PAGE_MASK) | self.epoch;
        // The mask keeps the index in range: no bounds check.
        let e = &mut self.entries[(iova >> PAGE_SHIFT) as usize & (IOTLB_ENTRIES - 1)];
        if e.tag == tag {
            let span = (e.value & PAGE_MASK) >> SPAN_SHIFT;
            let off = iova & PAGE_MASK;
            return Some(Leaf {
                gpa: (e.value & !PAGE_MASK) | off,
                // Truncation intended: the low bits hold the permissions.
                perms: Perm::from_bits_truncate(e.value as u8),
                run: (span << PAGE_SHIFT) - off,
            });
        }
        Self::fill(e, &mut self.misses, table, iova, tag, guard)
    }

    #[inline(never)]
    fn fill(
        e: &mut Entry,
        misses: &mut u64,
        table: &IoPageTable,
        iova: u64,
        tag: u64,
        guard: &Guard,
    ) -> Option<Leaf> {
        *misses += 1;
        let leaf = table.lookup(iova, guard)?;
        let off = iova & PAGE_MASK;
        let span = (off + leaf.run) / PAGE_SIZE;
        debug_assert_eq!((off + leaf.run) % PAGE_SIZE, 0);
        if span <= MAX_SPAN_PAGES {
            *e = Entry {
                tag,
                value: (leaf.gpa - off) | span << SPAN_SHIFT | u64::from(leaf.perms.bits()),
            };
        }
        Some(leaf)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::epoch;
    use crate::types::PAGE_SIZE;

    #[test]
    fn hits_equal_the_walk_and_follow_the_generation() {
        let dom = Domain::new(48);
        {
            let mut w = dom.table().lock();
            w.map(0x4000, 0x9000, PAGE_SIZE, Perm::READ);
            // A 2 MiB leaf.
            w.map(0x4000_0000, 0x8020_0000, 1 << 21, Perm::RW);
        }
        let guard = epoch::pin();
        let mut tlb = Iotlb::new();
        for iova in [
            0x4000,
            0x4123,
            0x4fff,
            0x4000_0000,
            0x4012_3456,
            0x401f_ffff,
        ] {
            let want = dom.table().lookup(iova, &guard);
            assert!(want.is_some());
            assert_eq!(tlb.lookup(&dom, iova, &guard), want, "{iova:#x} miss");
            let misses = tlb.misses();
            assert_eq!(tlb.lookup(&dom, iova, &guard), want, "{iova:#x} hit");
            assert_eq!(tlb.misses(), misses, "{iova:#x} was not served cached");
        }
        // Unmapped pages are not cached.
        assert_eq!(tlb.lookup(&dom, 0x8000, &guard), None);
        assert_eq!(tlb.lookup(&dom, 0x8000, &guard), None);
        // A new generation invalidates without any table change.
        let g = dom.generation();
        dom.table().lock().unmap(0x4000, PAGE_SIZE);
        // The table changed behind the domain's back: still served (the
        // contract is that removals go through the domain, which bumps).
        assert!(tlb.lookup(&dom, 0x4000, &guard).is_some());
        assert_eq!(dom.generation(), g);
        let other = Domain::new(48);
        other
            .table()
            .lock()
            .map(0x4000, 0x7000, PAGE_SIZE, Perm::READ);
        // Same page, other domain (other generation): not served.
        assert_eq!(tlb.lookup(&other, 0x4000, &guard).unwrap().gpa, 0x7000);
    }
}

// Model-checks the generation protocol with loom (tools/loom.sh): the
// writer does what `Domain::remove_locked` does (clear the table entries,
// then store a new generation with Release) while a reader probes its
// cache, one page already cached (a hit racing the removal) and one not
// (a fill racing it).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::epoch;
    use crate::sync::{AtomicU64, Ordering};
    use crate::types::PAGE_SIZE;
    use loom::sync::Arc;
    use loom::thread;

    const BITS: u32 = 30;
    const CACHED: u64 = 0x3000;
    const UNCACHED: u64 = 0x4000;
    const GPA: u64 = 0x2345_6000;

    fn probe(tlb: &mut Iotlb, table: &IoPageTable, generation: &AtomicU64) -> [Option<u64>; 2] {
        let guard = epoch::pin();
        // Acquire, as `Domain::generation`.
        tlb.set_generation(generation.load(Ordering::Acquire));
        [CACHED, UNCACHED].map(|iova| tlb.lookup_at(table, iova, &guard).map(|l| l.gpa))
    }

    #[test]
    fn a_completed_removal_is_never_served_from_the_cache() {
        loom::model(|| {
            let table = Arc::new(IoPageTable::new(BITS));
            table.lock().map(CACHED, GPA, 2 * PAGE_SIZE, Perm::READ);
            let generation = Arc::new(AtomicU64::new(1));
            let done = Arc::new(AtomicU64::new(0));
            let mut tlb = Iotlb::new();
            {
                let guard = epoch::pin();
                tlb.set_generation(generation.load(Ordering::Acquire));
                assert!(tlb.lookup_at(&table, CACHED, &guard).is_some());
            }
            let writer = {
                let (table, generation, done) = (
                    Arc::clone(&table),
                    Arc::clone(&generation),
                    Arc::clone(&done),
                );
                thread::spawn(move || {
                    table.lock().unmap(CACHED, 2 * PAGE_SIZE);
                    generation.store(2, Ordering::Release);
                    // "The UNMAP returned", as a device could learn it.
                    done.store(1, Ordering::Release);
                })
            };
            let finished = done.load(Ordering::Acquire) == 1;
            let seen = probe(&mut tlb, &table, &generation);
            let old = [Some(GPA), Some(GPA + PAGE_SIZE)];
            for (got, old) in seen.into_iter().zip(old) {
                if finished {
                    assert_eq!(got, None, "served after the removal completed");
                } else {
                    assert!(got.is_none() || got == old, "{got:x?}");
                }
            }
            writer.join().unwrap();
            // Whatever was cached meanwhile (a fill racing the removal is
            // tagged with the old generation) is not served any more.
            assert_eq!(probe(&mut tlb, &table, &generation), [None, None]);
        });
    }
}
