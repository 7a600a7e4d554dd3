// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The IOVA allocator: picks IOVA pages for MAP requests that let the host
//! choose (no FIXED flag).
//!
//! Page granular. The free set is a set of maximal free ranges, indexed
//! twice: by end (to find neighbours when freeing and the range holding a
//! FIXED reservation) and by `(len, start)` (best fit for allocation). Every
//! operation is O(log n) in the number of free ranges, with one documented
//! exception for large alignments (see [`IovaAllocator::alloc`]).
//!
//! Keyed by end, the common updates are in place: a reservation at the start
//! of a free range, and a free that merges with the range after it, keep
//! that range's end. The best-fit index is only needed by `alloc`, so it is
//! built on the first `alloc`: a domain whose driver only maps FIXED never
//! pays for it.
//!
//! IOVA page 0 is never handed out by `alloc`, so that a zero IOVA always
//! means "none" to a guest driver; FIXED maps may still reserve it.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::PAGE_SHIFT;

/// The narrowest IOVA space: 2 MiB, 512 pages.
pub const MIN_IOVA_BITS: u32 = 21;
/// The widest IOVA space: 57 bits (5-level paging).
pub const MAX_IOVA_BITS: u32 = 57;

/// How many too-small-to-be-sure free ranges `alloc` tries for a best fit
/// before it takes a range that fits whatever its alignment.
const BEST_FIT_PROBES: usize = 8;

/// Allocator of IOVA pages.
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    /// Free ranges: end page (exclusive) -> start page. Never empty ranges,
    /// never two ranges touching (they are merged).
    by_end: BTreeMap<u64, u64>,
    /// The same ranges as `(length, start)`, for best fit; `None` until the
    /// first `alloc` needs it (kept in step with `by_end` from then on).
    by_len: Option<BTreeSet<(u64, u64)>>,
    free_pages: u64,
    total_pages: u64,
}

impl IovaAllocator {
    /// An allocator for an IOVA space of `iova_bits` bits, all free.
    ///
    /// `iova_bits` outside 21..=57 is a VMM configuration bug: it is
    /// asserted in debug builds and clamped into range in release.
    pub fn new(iova_bits: u32) -> IovaAllocator {
        debug_assert!(
            (MIN_IOVA_BITS..=MAX_IOVA_BITS).contains(&iova_bits),
            "iova_bits {iova_bits} out of range"
        );
        let bits = iova_bits.clamp(MIN_IOVA_BITS, MAX_IOVA_BITS);
        let total_pages = 1u64 << (bits - PAGE_SHIFT);
        let mut alloc = IovaAllocator {
            by_end: BTreeMap::new(),
            by_len: None,
            free_pages: total_pages,
            total_pages,
        };
        alloc.insert_range(0, total_pages);
        alloc
    }

    fn insert_range(&mut self, start: u64, len: u64) {
        debug_assert!(len > 0);
        self.by_end.insert(start + len, start);
        if let Some(by_len) = &mut self.by_len {
            by_len.insert((len, start));
        }
    }

    fn remove_range(&mut self, start: u64, len: u64) {
        self.by_end.remove(&(start + len));
        if let Some(by_len) = &mut self.by_len {
            by_len.remove(&(len, start));
        }
    }

    /// Moves the start of the free range ending at `end` from `old` to
    /// `new` (its end stays, so `by_end` is updated in place).
    fn move_start(&mut self, end: u64, old: u64, new: u64) {
        debug_assert!(new < end);
        if let Some(start) = self.by_end.get_mut(&end) {
            *start = new;
        }
        if let Some(by_len) = &mut self.by_len {
            by_len.remove(&(end - old, old));
            by_len.insert((end - new, new));
        }
    }

    /// The best-fit index, built from `by_end` on first use.
    fn by_len(&mut self) -> &BTreeSet<(u64, u64)> {
        let by_end = &self.by_end;
        self.by_len.get_or_insert_with(|| {
            by_end
                .iter()
                .map(|(&end, &start)| (end - start, start))
                .collect()
        })
    }

    /// The free range holding page `page`, as `(start, len)`.
    fn range_holding(&self, page: u64) -> Option<(u64, u64)> {
        // The first range ending after `page` is the only candidate.
        let (&end, &start) = self.by_end.range(page.checked_add(1)?..).next()?;
        (start <= page).then_some((start, end - start))
    }

    /// Where `npages` aligned to `align` would go inside the free range
    /// `[start, start + len)`, avoiding page 0.
    fn fit(start: u64, len: u64, npages: u64, align: u64) -> Option<u64> {
        let lowest = start.max(1);
        let at = lowest.checked_add(align - 1)? & !(align - 1);
        (at.checked_add(npages)? <= start + len).then_some(at)
    }

    /// The first range of `candidates` that fits, as `(start, len, at)`.
    fn first_fit<'a>(
        candidates: impl Iterator<Item = &'a (u64, u64)>,
        npages: u64,
        align: u64,
    ) -> Option<(u64, u64, u64)> {
        candidates
            .filter_map(|&(len, start)| Some((start, len, Self::fit(start, len, npages, align)?)))
            .next()
    }

    /// Allocates `npages` contiguous free pages whose first page is a
    /// multiple of `align_pages` (a power of two), never page 0. Returns the
    /// first page, or `None` when nothing fits or the arguments are invalid
    /// (`npages == 0`, `align_pages` not a power of two).
    ///
    /// Best fit: the smallest free range that can hold the request, lowest
    /// address among equals. Cost: O(log n) in the number of free ranges
    /// whenever some free range has at least `npages + align_pages - 1`
    /// pages (any such range fits, whatever its alignment). Only when none
    /// does, i.e. an almost exhausted or badly fragmented space asked for a
    /// large alignment, does it look at every free range of length in
    /// `[npages, npages + align_pages - 1)`: O(m log n) for those m ranges,
    /// so that `None` is always exact. With `align_pages == 1` that set is
    /// empty and `alloc` is always O(log n).
    pub fn alloc(&mut self, npages: u64, align_pages: u64) -> Option<u64> {
        if npages == 0 || !align_pages.is_power_of_two() || npages > self.free_pages {
            return None;
        }
        // Any range this long fits (page 0 aside, handled by probing two).
        let sure = npages.saturating_add(align_pages - 1);
        let by_len = self.by_len();
        let maybe = || by_len.range((npages, 0)..(sure, 0));
        let (start, len, at) = Self::first_fit(maybe().take(BEST_FIT_PROBES), npages, align_pages)
            // At most one range starts at page 0, so two probes suffice.
            .or_else(|| Self::first_fit(by_len.range((sure, 0)..).take(2), npages, align_pages))
            .or_else(|| Self::first_fit(maybe().skip(BEST_FIT_PROBES), npages, align_pages))?;
        self.take(start, len, at, npages);
        Some(at)
    }

    /// Takes exactly `[first, first + npages)` (page 0 allowed: FIXED maps
    /// may use it). Returns false, changing nothing, unless `npages > 0` and
    /// every page is free and inside the space. O(log n).
    pub fn reserve(&mut self, first: u64, npages: u64) -> bool {
        let Some(taken_end) = first.checked_add(npages) else {
            return false;
        };
        match self.range_holding(first) {
            Some((start, len)) if npages > 0 && taken_end <= start + len => {
                self.take(start, len, first, npages);
                true
            }
            _ => false,
        }
    }

    /// Takes `[at, at + npages)` out of the free range `[start, start +
    /// len)` that holds it.
    fn take(&mut self, start: u64, len: u64, at: u64, npages: u64) {
        let end = start + len;
        let taken_end = at + npages;
        debug_assert!(start <= at && taken_end <= end && npages > 0);
        if taken_end < end {
            // The range keeps its end: what is left after the taken pages
            // stays under the same key.
            self.move_start(end, start, taken_end);
            if at > start {
                self.insert_range(start, at - start);
            }
        } else {
            self.remove_range(start, len);
            if at > start {
                self.insert_range(start, at - start);
            }
        }
        self.free_pages -= npages;
    }

    /// Returns `[first, first + npages)` to the free set, merging it with
    /// free neighbours. O(log n).
    ///
    /// Freeing pages that are (even partly) free already, or outside the
    /// space, is a caller bug: it is logged and ignored (and asserted in
    /// debug builds) so the free set is never corrupted.
    pub fn free(&mut self, first: u64, npages: u64) {
        if npages == 0 {
            return;
        }
        let end = match first.checked_add(npages) {
            Some(end) if end <= self.total_pages => end,
            _ => {
                log::error!(
                    "iova_alloc: free of pages [{first:#x}, +{npages:#x}) outside the space of {:#x} pages",
                    self.total_pages
                );
                debug_assert!(false, "iova_alloc: free outside the space");
                return;
            }
        };
        // The first free range ending after `first` is the only one that
        // can overlap (free ranges are disjoint and sorted); it is also the
        // one that may start at `end` and merge.
        let next = self.by_end.range(first + 1..).next().map(|(&e, &s)| (s, e));
        if let Some((start, e)) = next {
            if start < end {
                log::error!(
                    "iova_alloc: free of pages [{first:#x}, +{npages:#x}) overlaps free range [{start:#x}, +{:#x})",
                    e - start
                );
                debug_assert!(false, "iova_alloc: double free");
                return;
            }
        }

        // A free range ending exactly at `first` merges from the left.
        let prev = self.by_end.get(&first).copied();
        match (prev, next) {
            (prev, Some((start, next_end))) if start == end => {
                if let Some(prev_start) = prev {
                    self.remove_range(prev_start, first - prev_start);
                    self.move_start(next_end, end, prev_start);
                } else {
                    self.move_start(next_end, end, first);
                }
            }
            (Some(prev_start), _) => {
                self.remove_range(prev_start, first - prev_start);
                self.insert_range(prev_start, end - prev_start);
            }
            (None, _) => self.insert_range(first, npages),
        }
        self.free_pages += npages;
    }

    /// Whether every page of `[first, first + npages)` is free and inside
    /// the space (false for `npages == 0`). O(log n).
    pub fn is_free(&self, first: u64, npages: u64) -> bool {
        if npages == 0 {
            return false;
        }
        let Some(end) = first.checked_add(npages) else {
            return false;
        };
        match self.range_holding(first) {
            Some((start, len)) => end <= start + len,
            None => false,
        }
    }

    /// Free pages.
    pub fn free_pages(&self) -> u64 {
        self.free_pages
    }

    /// Pages in the space.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Panics unless the two indexes agree, ranges are non-empty, disjoint,
    /// merged and inside the space, and `free_pages` is their sum.
    #[cfg(test)]
    fn check_invariants(&self) {
        if let Some(by_len) = &self.by_len {
            assert_eq!(self.by_end.len(), by_len.len());
        }
        let mut sum = 0;
        let mut prev_end = None;
        for (&end, &start) in &self.by_end {
            assert!(end > start);
            let len = end - start;
            if let Some(by_len) = &self.by_len {
                assert!(by_len.contains(&(len, start)));
            }
            if let Some(prev_end) = prev_end {
                assert!(start > prev_end, "ranges touch or overlap at {start:#x}");
            }
            prev_end = Some(start + len);
            sum += len;
        }
        assert!(prev_end.unwrap_or(0) <= self.total_pages);
        assert_eq!(sum, self.free_pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn new_space_is_all_free() {
        let a = IovaAllocator::new(21);
        assert_eq!(a.total_pages(), 512);
        assert_eq!(a.free_pages(), 512);
        assert!(a.is_free(0, 512));
        assert!(!a.is_free(0, 513));
        assert!(!a.is_free(511, 2));
        assert!(!a.is_free(0, 0));
        assert!(!a.is_free(u64::MAX, 2));
        assert_eq!(IovaAllocator::new(48).total_pages(), 1 << 36);
        assert_eq!(IovaAllocator::new(57).total_pages(), 1 << 45);
        a.check_invariants();
    }

    #[test]
    fn alloc_never_returns_page_zero() {
        let mut a = IovaAllocator::new(21);
        assert_eq!(a.alloc(1, 1), Some(1));
        // The whole space but page 0 fits; page 0 stays free.
        let mut b = IovaAllocator::new(21);
        assert_eq!(b.alloc(511, 1), Some(1));
        assert_eq!(b.alloc(1, 1), None);
        assert!(b.is_free(0, 1));
        assert_eq!(b.free_pages(), 1);
        // Nor does the whole space fit.
        let mut c = IovaAllocator::new(21);
        assert_eq!(c.alloc(512, 1), None);
        c.check_invariants();
    }

    #[test]
    fn alloc_respects_alignment() {
        let mut a = IovaAllocator::new(21);
        assert_eq!(a.alloc(3, 1), Some(1));
        for align in [1u64, 2, 4, 8, 16, 64, 256] {
            let at = a.alloc(2, align).unwrap();
            assert_eq!(at % align, 0, "align {align}");
            assert_ne!(at, 0);
        }
        // Page 0 is free but page 0 is never the aligned answer.
        let mut b = IovaAllocator::new(21);
        assert_eq!(b.alloc(4, 256), Some(256));
        assert_eq!(b.alloc(4, 512), None);
        assert_eq!(b.alloc(4, 3), None);
        assert_eq!(b.alloc(4, 0), None);
        assert_eq!(b.alloc(0, 1), None);
        b.check_invariants();
    }

    #[test]
    fn alloc_finds_small_aligned_hole_when_nothing_large_is_left() {
        let mut a = IovaAllocator::new(21);
        // Fragment into free ranges of 17 pages, none long enough to fit 16
        // pages at any alignment (31), more misaligned ones than the
        // best-fit probes, and one aligned range that sorts last.
        assert!(a.reserve(0, 512));
        for i in 0..12u64 {
            a.free(1 + i * 40, 17);
        }
        a.free(480, 17);
        a.check_invariants();
        assert_eq!(a.alloc(16, 16), Some(480));
        assert_eq!(a.alloc(16, 16), None);
        assert_eq!(a.alloc(17, 1), Some(1));
        a.check_invariants();
    }

    #[test]
    fn alloc_is_best_fit() {
        let mut a = IovaAllocator::new(21);
        assert!(a.reserve(0, 512));
        a.free(10, 20);
        a.free(100, 5);
        a.free(200, 8);
        assert_eq!(a.alloc(5, 1), Some(100));
        assert_eq!(a.alloc(6, 1), Some(200));
        assert_eq!(a.alloc(2, 1), Some(206));
        assert_eq!(a.alloc(3, 1), Some(10));
        a.check_invariants();
    }

    #[test]
    fn exhaustion_returns_none_and_free_reuses() {
        let mut a = IovaAllocator::new(21);
        let mut got = Vec::new();
        while let Some(p) = a.alloc(7, 1) {
            got.push(p);
        }
        assert_eq!(got.len(), 511 / 7);
        // 511 = 73 * 7: only page 0 is left.
        assert_eq!(a.free_pages(), 1);
        assert_eq!(a.alloc(7, 1), None);
        a.free(got[10], 7);
        assert_eq!(a.alloc(7, 1), Some(got[10]));
        a.check_invariants();
    }

    #[test]
    fn reserve_free_and_merge() {
        let mut a = IovaAllocator::new(21);
        assert!(a.reserve(0, 1));
        assert!(!a.reserve(0, 1));
        assert!(a.reserve(10, 10));
        assert!(!a.reserve(15, 10));
        assert!(!a.reserve(5, 6));
        assert!(!a.reserve(510, 3));
        assert!(!a.reserve(u64::MAX, 2));
        assert!(!a.reserve(5, 0));
        assert_eq!(a.free_pages(), 512 - 11);
        assert!(a.reserve(20, 5));
        assert_eq!(a.by_end.len(), 2);
        // Free the middle, then both sides: everything merges back.
        a.free(12, 3);
        assert_eq!(a.by_end.len(), 3);
        a.free(10, 2);
        a.free(15, 10);
        assert_eq!(a.by_end.get(&512), Some(&1));
        assert_eq!(a.by_end.len(), 1);
        a.free(0, 1);
        assert_eq!(a.by_end.len(), 1);
        assert_eq!(a.free_pages(), 512);
        assert!(a.is_free(0, 512));
        a.check_invariants();
    }

    #[test]
    fn bad_free_changes_nothing() {
        let mut a = IovaAllocator::new(21);
        assert!(a.reserve(100, 10));
        let before = a.clone();
        for (first, npages) in [
            (95, 6),
            (109, 2),
            (99, 12),
            (200, 1),
            (510, 4),
            (u64::MAX, 2),
        ] {
            let mut b = a.clone();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                b.free(first, npages);
            }));
            assert_eq!(
                result.is_err(),
                cfg!(debug_assertions),
                "[{first}, +{npages})"
            );
            assert_eq!(b.by_end, before.by_end);
            assert_eq!(b.free_pages(), before.free_pages());
            b.check_invariants();
        }
        a.free(100, 0);
        a.check_invariants();
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc { npages: u64, align_shift: u32 },
        Reserve { first: u64, npages: u64 },
        Free { pick: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..48, 0u32..7).prop_map(|(npages, align_shift)| Op::Alloc {
                npages,
                align_shift
            }),
            (0u64..520, 1u64..48).prop_map(|(first, npages)| Op::Reserve { first, npages }),
            any::<usize>().prop_map(|pick| Op::Free { pick }),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_model_of_used_pages(ops in proptest::collection::vec(op(), 1..200)) {
            const TOTAL: u64 = 512;
            let mut a = IovaAllocator::new(21);
            let mut used = BTreeSet::new();
            let mut live: Vec<(u64, u64)> = Vec::new();
            let all_free = |used: &BTreeSet<u64>, first: u64, n: u64| {
                first + n <= TOTAL && (first..first + n).all(|p| !used.contains(&p))
            };
            for op in ops {
                match op {
                    Op::Alloc { npages, align_shift } => {
                        let align = 1u64 << align_shift;
                        match a.alloc(npages, align) {
                            Some(first) => {
                                prop_assert!(first != 0);
                                prop_assert_eq!(first % align, 0);
                                prop_assert!(all_free(&used, first, npages));
                                used.extend(first..first + npages);
                                live.push((first, npages));
                            }
                            None => {
                                // Exact: no aligned non-zero start fits.
                                let fits = (1..TOTAL)
                                    .filter(|p| p % align == 0)
                                    .any(|p| all_free(&used, p, npages));
                                prop_assert!(!fits, "alloc({}, {}) missed a fit", npages, align);
                            }
                        }
                    }
                    Op::Reserve { first, npages } => {
                        let expect = all_free(&used, first, npages);
                        prop_assert_eq!(a.is_free(first, npages), expect);
                        prop_assert_eq!(a.reserve(first, npages), expect);
                        if expect {
                            used.extend(first..first + npages);
                            live.push((first, npages));
                        }
                    }
                    Op::Free { pick } => {
                        if !live.is_empty() {
                            let (first, npages) = live.swap_remove(pick % live.len());
                            a.free(first, npages);
                            for p in first..first + npages {
                                used.remove(&p);
                            }
                        }
                    }
                }
                prop_assert_eq!(a.free_pages(), TOTAL - used.len() as u64);
                a.check_invariants();
            }
        }
    }
}
