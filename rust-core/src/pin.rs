// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The per-VM pin table: which guest pages are mapped for DMA, how many
//! times, and how much the VM may pin.
//!
//! A page stays pinned while at least one mapping of any domain refers to
//! it, so the table counts references per guest frame. The VMM asks
//! [`PinTable::any_pinned`] before it discards, balloons or unplugs guest
//! memory, and the limit bounds how much RAM a guest can hold hostage.
//!
//! In [`PinMode::Mlock`] a page is also `mlock`ed while its count is non
//! zero, so the host neither swaps it out nor migrates it under the device.
//! `mlock` is not reference counted by the kernel: two guest frames aliasing
//! one host page share one lock, and a VMM that already locks all guest
//! memory (QEMU `-overcommit mem-lock=on`) should use [`PinMode::None`], or
//! the `munlock` on the last unpin would undo its lock.

use std::collections::{BTreeMap, HashMap};

use crate::hash::{note_room, shrink_when_sparse, PageKeyHash};
use crate::ram::RamLayout;
use crate::sync::{AtomicU64, Ordering};
use crate::types::{PAGE_SHIFT, PAGE_SIZE};

/// How pinning affects host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PinMode {
    /// Bookkeeping only: the VMM keeps guest memory resident by other means
    /// (or the device tolerates faults).
    #[default]
    None,
    /// `mlock` each page while it is pinned.
    Mlock,
}

/// Errors of the pin table. A failed [`PinTable::pin`] changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Pinning would exceed the VM's limit.
    #[error(
        "pin limit exceeded: {new_pages:#x} new pages on top of {pinned_pages:#x} pinned exceed {limit_bytes:#x} bytes"
    )]
    Quota {
        /// Pages the request would newly pin.
        new_pages: u64,
        /// Pages pinned before the request.
        pinned_pages: u64,
        /// The limit in bytes.
        limit_bytes: u64,
    },
    /// `mlock` failed.
    #[error("mlock of guest page {gpa:#x} failed: errno {errno}")]
    Mlock {
        /// Guest-physical address of the page.
        gpa: u64,
        /// The `errno` of `mlock`.
        errno: i32,
    },
    /// A page's reference count would exceed `u32::MAX`.
    #[error("pin count of guest page {gpa:#x} would overflow")]
    RefcountOverflow {
        /// Guest-physical address of the page.
        gpa: u64,
    },
}

/// Result of pin table operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Guest-physical address of frame `gfn` (frames come from validated
/// addresses, so the shift never loses bits in practice).
fn gpa_of(gfn: u64) -> u64 {
    gfn << PAGE_SHIFT
}

/// The host address of frame `gfn` in `ram`, 0 when it is not RAM (any
/// more): only `mlock` and `munlock` use it, and fail on 0.
fn frame_hva(ram: &RamLayout, gfn: u64) -> usize {
    ram.hva(gpa_of(gfn)).unwrap_or(0)
}

/// `mlock`s the host page at `hva`; the errno on failure.
fn mlock_page(hva: usize) -> std::result::Result<(), i32> {
    // SAFETY: mlock only changes the residency of existing mappings; an
    // unmapped or foreign address makes it fail, not corrupt memory.
    let rc = unsafe { libc::mlock(hva as *const libc::c_void, PAGE_SIZE as usize) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// `munlock`s the host page at `hva`; failure is only logged because the
/// page is no longer pinned either way.
fn munlock_page(gfn: u64, hva: usize) {
    // SAFETY: as for mlock: residency only.
    let rc = unsafe { libc::munlock(hva as *const libc::c_void, PAGE_SIZE as usize) };
    if rc != 0 {
        log::warn!(
            "pin: munlock of guest page {:#x} (hva {hva:#x}) failed: {}",
            gpa_of(gfn),
            std::io::Error::last_os_error()
        );
    }
}

/// Frames per block of the range index (2 MiB of guest memory).
const BLOCK_SHIFT: u32 = 9;

/// The pinned frames: references per frame in a hash map (the hot path:
/// one probe per page), and how many frames of each 2 MiB block are
/// pinned in a B-tree, which only changes when a frame is pinned for the
/// first time or unpinned for the last, and answers range queries.
#[derive(Debug, Default)]
struct Frames {
    /// Guest frame -> references; only frames with a count > 0 are present.
    counts: HashMap<u64, u32, PageKeyHash>,
    /// The size of `counts`, for shrinking it as frames are unpinned (see
    /// [`shrink_when_sparse`]).
    room: usize,
    /// Block (`gfn >> BLOCK_SHIFT`) -> frames of it in `counts`; only
    /// blocks with a count > 0 are present.
    blocks: BTreeMap<u64, u32>,
}

impl Frames {
    fn block_gained(&mut self, gfn: u64) {
        *self.blocks.entry(gfn >> BLOCK_SHIFT).or_insert(0) += 1;
    }

    fn block_lost(&mut self, gfn: u64) {
        let block = gfn >> BLOCK_SHIFT;
        if let Some(n) = self.blocks.get_mut(&block) {
            *n -= 1;
            if *n == 0 {
                self.blocks.remove(&block);
            }
        }
    }

    /// Whether a frame in `[first, last]` is pinned.
    fn any_in(&self, first: u64, last: u64) -> bool {
        let (first_block, last_block) = (first >> BLOCK_SHIFT, last >> BLOCK_SHIFT);
        // Blocks wholly inside the range answer at once; at most the two
        // end blocks are partial, and those are probed frame by frame
        // (at most 2 * 512 probes).
        for (&block, _) in self.blocks.range(first_block..=last_block) {
            let lo = block << BLOCK_SHIFT;
            let hi = lo | ((1 << BLOCK_SHIFT) - 1);
            if first <= lo && hi <= last {
                return true;
            }
            if (first.max(lo)..=last.min(hi)).any(|gfn| self.counts.contains_key(&gfn)) {
                return true;
            }
        }
        false
    }
}

/// The per-VM pin table.
#[derive(Debug)]
pub struct PinTable {
    pages: parking_lot::Mutex<Frames>,
    /// `pages.len()`, readable without the lock. Written only with the lock
    /// held, so writers can read-modify-write it with a plain load/store.
    pinned_pages: AtomicU64,
    limit_bytes: AtomicU64,
    mode: PinMode,
}

impl PinTable {
    /// An empty table allowing `limit_bytes` of pinned memory.
    pub fn new(limit_bytes: u64, mode: PinMode) -> PinTable {
        PinTable {
            pages: parking_lot::Mutex::new(Frames::default()),
            pinned_pages: AtomicU64::new(0),
            limit_bytes: AtomicU64::new(limit_bytes),
            mode,
        }
    }

    /// Takes one reference on every page of `pages`, `(gfn, hva of that
    /// page)` sorted by gfn without duplicates.
    ///
    /// All or nothing: on error no count changes and pages `mlock`ed by this
    /// call are `munlock`ed again. Only pages going from 0 to 1 reference
    /// count against the limit: an extra reference on a pinned page costs
    /// nothing, so it succeeds even when the limit was lowered below the
    /// current use.
    pub fn pin(&self, pages: &[(u64, usize)]) -> Result<()> {
        debug_assert!(
            pages.windows(2).all(|w| w[0].0 < w[1].0),
            "pin: pages not sorted or not unique"
        );
        self.pin_frames(pages.iter().copied(), |p| p.0, |p| p.1)
    }

    /// [`PinTable::pin`] of the frames `[first, end)`, the host address of
    /// each looked up in `ram` only when it is `mlock`ed (0 when its
    /// region went away: `mlock` then fails). A one-segment mapping pins
    /// this way, without building a page list.
    pub(crate) fn pin_span(&self, first: u64, end: u64, ram: &RamLayout) -> Result<()> {
        self.pin_frames(first..end, |gfn| gfn, |gfn| frame_hva(ram, gfn))
    }

    /// [`PinTable::unpin`] of what [`PinTable::pin_span`] pinned.
    pub(crate) fn unpin_span(&self, first: u64, end: u64, ram: &RamLayout) {
        self.unpin_frames(first..end, |gfn| gfn, |gfn| frame_hva(ram, gfn));
    }

    /// The body of [`PinTable::pin`]: `frames` yields each page once,
    /// ascending by `gfn_of`; `hva_of` is asked only for pages that are
    /// `mlock`ed or `munlock`ed.
    fn pin_frames<T: Copy>(
        &self,
        frames: impl Iterator<Item = T> + Clone,
        gfn_of: impl Fn(T) -> u64,
        hva_of: impl Fn(T) -> usize,
    ) -> Result<()> {
        let mut map = self.pages.lock();
        // Only written under the lock we hold.
        let pinned_pages = self.pinned_pages.load(Ordering::Relaxed);

        // Count distinct new frames; sorting makes duplicates adjacent, so
        // even a caller breaking the contract cannot make this undercount.
        let mut prev = None;
        let new_pages = frames
            .clone()
            .filter(|&p| {
                let gfn = gfn_of(p);
                let repeat = prev == Some(gfn);
                prev = Some(gfn);
                !repeat && !map.counts.contains_key(&gfn)
            })
            .count() as u64;
        let limit_bytes = self.limit_bytes.load(Ordering::Relaxed);
        let wanted = (u128::from(pinned_pages) + u128::from(new_pages)) * u128::from(PAGE_SIZE);
        if new_pages > 0 && wanted > u128::from(limit_bytes) {
            return Err(Error::Quota {
                new_pages,
                pinned_pages,
                limit_bytes,
            });
        }

        let mut added = 0u64;
        for (done, p) in frames.clone().enumerate() {
            let gfn = gfn_of(p);
            if let Some(count) = map.counts.get_mut(&gfn) {
                let Some(next) = count.checked_add(1) else {
                    let gpa = gpa_of(gfn);
                    self.rollback(&mut map, frames.clone().take(done), &gfn_of, &hva_of);
                    return Err(Error::RefcountOverflow { gpa });
                };
                *count = next;
                continue;
            }
            if self.mode == PinMode::Mlock {
                if let Err(errno) = mlock_page(hva_of(p)) {
                    self.rollback(&mut map, frames.clone().take(done), &gfn_of, &hva_of);
                    return Err(Error::Mlock {
                        gpa: gpa_of(gfn),
                        errno,
                    });
                }
            }
            map.counts.insert(gfn, 1);
            map.block_gained(gfn);
            added += 1;
        }
        // Relaxed: the counter is informational for lock-free readers; the
        // map itself is published by the mutex.
        self.pinned_pages
            .store(pinned_pages + added, Ordering::Relaxed);
        if added > 0 {
            let frames = &mut *map;
            note_room(&frames.counts, &mut frames.room);
        }
        Ok(())
    }

    /// Undoes the references `pin` took on `done`, before `pinned_pages`
    /// was updated.
    fn rollback<T: Copy>(
        &self,
        map: &mut Frames,
        done: impl Iterator<Item = T>,
        gfn_of: &impl Fn(T) -> u64,
        hva_of: &impl Fn(T) -> usize,
    ) {
        for p in done {
            let gfn = gfn_of(p);
            if self.release(map, gfn, || hva_of(p)) == Release::Unknown {
                // `pin` just took this reference under the same lock.
                debug_assert!(false, "pin: rollback lost gfn {gfn:#x}");
            }
        }
    }

    /// Drops one reference on `gfn`, removing and unlocking it (at the
    /// address `hva` gives) on the last.
    fn release(&self, map: &mut Frames, gfn: u64, hva: impl FnOnce() -> usize) -> Release {
        let Some(count) = map.counts.get_mut(&gfn) else {
            return Release::Unknown;
        };
        // Present entries always have count >= 1.
        *count = count.saturating_sub(1);
        if *count > 0 {
            return Release::StillPinned;
        }
        map.counts.remove(&gfn);
        map.block_lost(gfn);
        if self.mode == PinMode::Mlock {
            munlock_page(gfn, hva());
        }
        Release::Unpinned
    }

    /// Drops one reference on each page of `pages` (as given to
    /// [`PinTable::pin`]), `munlock`ing pages whose last reference goes.
    ///
    /// Unpinning a page that is not pinned is a caller bug: it is logged
    /// and skipped (and asserted in debug builds), never a panic in release.
    pub fn unpin(&self, pages: &[(u64, usize)]) {
        self.unpin_frames(pages.iter().copied(), |p| p.0, |p| p.1);
    }

    /// The body of [`PinTable::unpin`], `frames` as for
    /// [`PinTable::pin_frames`].
    fn unpin_frames<T: Copy>(
        &self,
        frames: impl Iterator<Item = T>,
        gfn_of: impl Fn(T) -> u64,
        hva_of: impl Fn(T) -> usize,
    ) {
        let mut map = self.pages.lock();
        let mut unpinned = 0u64;
        let mut unknown = 0usize;
        for p in frames {
            let gfn = gfn_of(p);
            match self.release(&mut map, gfn, || hva_of(p)) {
                Release::Unpinned => unpinned += 1,
                Release::StillPinned => {}
                Release::Unknown => {
                    unknown += 1;
                    log::error!(
                        "pin: unpin of guest page {:#x} that is not pinned",
                        gpa_of(gfn)
                    );
                }
            }
        }
        let pinned_pages = self.pinned_pages.load(Ordering::Relaxed);
        self.pinned_pages
            .store(pinned_pages.saturating_sub(unpinned), Ordering::Relaxed);
        // Unpinned frames give their memory back.
        let frames = &mut *map;
        shrink_when_sparse(&mut frames.counts, &mut frames.room);
        drop(map);
        // Checked after the table is consistent again, so a test observing
        // the panic still sees a sane table.
        debug_assert_eq!(unknown, 0, "pin: unpin of pages that are not pinned");
    }

    /// References on `gfn` (0 when not pinned).
    pub fn refcount(&self, gfn: u64) -> u32 {
        self.pages.lock().counts.get(&gfn).copied().unwrap_or(0)
    }

    /// Distinct pages with a count > 0, without taking the lock.
    pub fn pinned_pages(&self) -> u64 {
        self.pinned_pages.load(Ordering::Relaxed)
    }

    /// [`PinTable::pinned_pages`] in bytes.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_pages().saturating_mul(PAGE_SIZE)
    }

    /// The limit on pinned memory, in bytes.
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes.load(Ordering::Relaxed)
    }

    /// Changes the limit. Lowering it below the current use unpins nothing;
    /// it only refuses new pages until use drops below it.
    pub fn set_limit_bytes(&self, limit: u64) {
        self.limit_bytes.store(limit, Ordering::Relaxed);
    }

    /// The pin mode chosen at creation.
    pub fn mode(&self) -> PinMode {
        self.mode
    }

    /// Whether any page overlapping `[gpa, gpa + len)` is pinned. Empty
    /// ranges pin nothing; a range running past the top of the address space
    /// is clamped there.
    pub fn any_pinned(&self, gpa: u64, len: u64) -> bool {
        let Some(last_offset) = len.checked_sub(1) else {
            return false;
        };
        let last = gpa.saturating_add(last_offset);
        self.pages
            .lock()
            .any_in(gpa >> PAGE_SHIFT, last >> PAGE_SHIFT)
    }

    /// All pinned pages as `(gfn, refcount)`, ascending.
    pub fn snapshot(&self) -> Vec<(u64, u32)> {
        let mut pages: Vec<(u64, u32)> = self
            .pages
            .lock()
            .counts
            .iter()
            .map(|(&g, &c)| (g, c))
            .collect();
        pages.sort_unstable();
        pages
    }
}

/// What dropping one reference did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Release {
    Unpinned,
    StillPinned,
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HVA: usize = 0x7f00_0000_0000;

    /// `(gfn, fake hva)` for frames `first..first + n`.
    fn frames(first: u64, n: u64) -> Vec<(u64, usize)> {
        (first..first + n)
            .map(|g| (g, HVA + (g as usize) * PAGE_SIZE as usize))
            .collect()
    }

    /// Unpinned frames give their memory back: the frame map shrinks
    /// with them instead of keeping its largest size (the pin limit's
    /// worth) for the VM's life.
    #[test]
    fn unpinning_shrinks_the_frame_map() {
        let t = PinTable::new(u64::MAX, PinMode::None);
        let batches: Vec<_> = (0..100).map(|b| frames(b * 1000, 1000)).collect();
        for pages in &batches {
            t.pin(pages).unwrap();
        }
        let full = t.pages.lock().counts.capacity();
        assert!(full >= 100_000);
        for pages in &batches[..90] {
            t.unpin(pages);
        }
        let tenth = t.pages.lock().counts.capacity();
        assert!(
            tenth <= full / 4,
            "{tenth} of {full} kept for 10,000 frames"
        );
        for pages in &batches[90..] {
            t.unpin(pages);
        }
        let left = t.pages.lock().counts.capacity();
        assert!(left <= 256, "{left} kept for no frame");
        assert_eq!(t.pinned_pages(), 0);
    }

    #[test]
    fn overlapping_pins_count_references() {
        let t = PinTable::new(1 << 30, PinMode::None);
        t.pin(&frames(10, 4)).unwrap();
        t.pin(&frames(12, 4)).unwrap();
        assert_eq!(t.pinned_pages(), 6);
        assert_eq!(t.pinned_bytes(), 6 * PAGE_SIZE);
        assert_eq!(
            t.snapshot(),
            [(10, 1), (11, 1), (12, 2), (13, 2), (14, 1), (15, 1)]
        );
        t.unpin(&frames(10, 4));
        assert_eq!(t.snapshot(), [(12, 1), (13, 1), (14, 1), (15, 1)]);
        assert_eq!(t.refcount(10), 0);
        assert_eq!(t.refcount(13), 1);
        t.unpin(&frames(12, 4));
        assert_eq!(t.pinned_pages(), 0);
        assert!(t.snapshot().is_empty());
        // An empty request is a no-op.
        t.pin(&[]).unwrap();
        t.unpin(&[]);
        assert_eq!(t.pinned_pages(), 0);
    }

    #[test]
    fn quota_exactly_at_limit_passes_one_over_fails_unchanged() {
        let t = PinTable::new(8 * PAGE_SIZE, PinMode::None);
        t.pin(&frames(0, 5)).unwrap();
        // 3 new (5..8) + re-references on 3 and 4: exactly 8 pages.
        t.pin(&frames(3, 5)).unwrap();
        assert_eq!(t.pinned_bytes(), t.limit_bytes());
        let before = t.snapshot();

        let err = t.pin(&frames(6, 3)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Quota {
                    new_pages: 1,
                    pinned_pages: 8,
                    limit_bytes: 0x8000
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("0x8000"));
        assert_eq!(t.snapshot(), before);
        assert_eq!(t.pinned_pages(), 8);

        // Already-pinned pages take more references at the limit.
        t.pin(&frames(0, 8)).unwrap();
        assert_eq!(t.refcount(0), 2);
        // Lowering the limit unpins nothing and still allows re-references.
        t.set_limit_bytes(PAGE_SIZE);
        assert_eq!(t.limit_bytes(), PAGE_SIZE);
        assert_eq!(t.pinned_pages(), 8);
        t.pin(&frames(7, 1)).unwrap();
        assert!(matches!(t.pin(&frames(8, 1)), Err(Error::Quota { .. })));
        // A huge limit cannot overflow the quota arithmetic.
        t.set_limit_bytes(u64::MAX);
        t.pin(&[(u64::MAX - 1, HVA), (u64::MAX, HVA)]).unwrap();
        assert_eq!(t.pinned_pages(), 10);
    }

    #[test]
    fn zero_limit_refuses_everything() {
        let t = PinTable::new(0, PinMode::None);
        assert!(matches!(t.pin(&frames(0, 1)), Err(Error::Quota { .. })));
        assert_eq!(t.pinned_pages(), 0);
        assert_eq!(t.mode(), PinMode::None);
    }

    #[test]
    fn refcount_overflow_rolls_back() {
        let t = PinTable::new(1 << 20, PinMode::None);
        t.pin(&frames(5, 1)).unwrap();
        t.pages.lock().counts.insert(5, u32::MAX);
        let err = t.pin(&frames(3, 3)).unwrap_err();
        assert!(
            matches!(err, Error::RefcountOverflow { gpa: 0x5000 }),
            "{err}"
        );
        assert_eq!(t.snapshot(), [(5, u32::MAX)]);
        assert_eq!(t.pinned_pages(), 1);
    }

    #[test]
    fn any_pinned_edges() {
        let t = PinTable::new(1 << 20, PinMode::None);
        t.pin(&[(2, HVA), (4, HVA + 0x1000)]).unwrap();
        assert!(!t.any_pinned(0, 0x2000));
        assert!(t.any_pinned(0, 0x2001));
        assert!(t.any_pinned(0x2fff, 1));
        assert!(!t.any_pinned(0x3000, 0x1000));
        assert!(t.any_pinned(0x3fff, 2));
        assert!(!t.any_pinned(0x5000, u64::MAX - 0x5000));
        assert!(!t.any_pinned(0x2000, 0));
        assert!(t.any_pinned(0, u64::MAX));
        // Overflowing ranges are clamped, never a panic.
        assert!(!t.any_pinned(u64::MAX, u64::MAX));
        t.pin(&[(u64::MAX >> PAGE_SHIFT, HVA)]).unwrap();
        assert!(t.any_pinned(u64::MAX, u64::MAX));
        assert!(t.any_pinned(u64::MAX - 0x1000, 0x2000));
    }

    #[test]
    fn any_pinned_across_blocks_matches_a_scan() {
        let t = PinTable::new(u64::MAX, PinMode::None);
        // Frames at both ends of 2 MiB blocks, in the middle of one, and
        // two blocks apart.
        let pinned = [511u64, 512, 1000, 1535, 2048 + 7];
        let pages: Vec<_> = pinned.iter().map(|&g| (g, HVA)).collect();
        t.pin(&pages).unwrap();
        for first in (0..2600u64).step_by(37) {
            for n in [1u64, 2, 300, 511, 512, 513, 1100, 2000] {
                let expect = pinned.iter().any(|&g| (first..first + n).contains(&g));
                let got = t.any_pinned(first << PAGE_SHIFT, n << PAGE_SHIFT);
                assert_eq!(got, expect, "frames [{first}, +{n})");
            }
        }
        t.unpin(&pages[1..2]);
        assert!(!t.any_pinned(512 << PAGE_SHIFT, 488 << PAGE_SHIFT));
        assert!(t.any_pinned(512 << PAGE_SHIFT, 489 << PAGE_SHIFT));
        t.unpin(&pages[2..]);
        t.unpin(&pages[..1]);
        assert!(!t.any_pinned(0, u64::MAX));
        assert!(t.pages.lock().blocks.is_empty());
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "not pinned")]
    fn unpin_of_unknown_page_asserts_in_debug() {
        let t = PinTable::new(1 << 20, PinMode::None);
        t.pin(&frames(1, 1)).unwrap();
        t.unpin(&frames(1, 2));
    }

    #[test]
    fn unpin_of_unknown_page_keeps_table_sane() {
        let t = PinTable::new(1 << 20, PinMode::None);
        t.pin(&frames(1, 2)).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            t.unpin(&frames(0, 2));
        }));
        assert_eq!(result.is_err(), cfg!(debug_assertions));
        assert_eq!(t.snapshot(), [(2, 1)]);
        assert_eq!(t.pinned_pages(), 1);
    }

    #[test]
    fn concurrent_pins_keep_counts_exact() {
        let t = std::sync::Arc::new(PinTable::new(1 << 30, PinMode::None));
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let t = std::sync::Arc::clone(&t);
                std::thread::spawn(move || {
                    for i in 0..500u64 {
                        let pages = frames((i + w) % 16, 8);
                        t.pin(&pages).unwrap();
                        t.unpin(&pages);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(t.pinned_pages(), 0);
        assert!(t.snapshot().is_empty());
    }

    /// An anonymous mapping of `pages` pages framed by inaccessible guard
    /// pages, so that its VMA never merges with a neighbour's and its
    /// `Locked:` line in smaps is ours alone.
    struct Mapping {
        base: usize,
        pages: usize,
    }

    impl Mapping {
        fn new(pages: usize) -> Mapping {
            let page = PAGE_SIZE as usize;
            // SAFETY: a fresh anonymous mapping; no existing memory changes.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    (pages + 2) * page,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            let base = base as usize;
            // SAFETY: the inner pages belong to the mapping just created.
            let rc = unsafe {
                libc::mprotect(
                    (base + page) as *mut libc::c_void,
                    pages * page,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            assert_eq!(rc, 0);
            Mapping { base, pages }
        }

        fn page(&self, i: usize) -> usize {
            self.base + (i + 1) * PAGE_SIZE as usize
        }

        /// kB locked in the VMA holding page `i`, from /proc/self/smaps.
        fn locked_kb(&self, i: usize) -> u64 {
            let addr = self.page(i);
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let mut inside = false;
            for line in smaps.lines() {
                let first = line.split_whitespace().next().unwrap_or("");
                if let Some((lo, hi)) = first.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = lo <= addr && addr < hi;
                        continue;
                    }
                }
                if inside {
                    if let Some(rest) = line.strip_prefix("Locked:") {
                        return rest.trim().trim_end_matches("kB").trim().parse().unwrap();
                    }
                }
            }
            panic!("no smaps entry for {addr:#x}");
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping created in `new`.
            unsafe {
                libc::munmap(
                    self.base as *mut libc::c_void,
                    (self.pages + 2) * PAGE_SIZE as usize,
                )
            };
        }
    }

    #[test]
    fn mlock_mode_locks_while_pinned() {
        let m = Mapping::new(2);
        let t = PinTable::new(1 << 20, PinMode::Mlock);
        assert_eq!(t.mode(), PinMode::Mlock);
        let page0 = [(7, m.page(0))];
        assert_eq!(m.locked_kb(0), 0);

        match t.pin(&page0) {
            Ok(()) => {}
            // Without CAP_IPC_LOCK and a tiny RLIMIT_MEMLOCK the only
            // meaningful check left is that the failure changed nothing.
            Err(Error::Mlock { gpa, errno }) => {
                assert_eq!(gpa, 0x7000);
                assert!(errno == libc::EPERM || errno == libc::ENOMEM, "{errno}");
                assert_eq!(t.pinned_pages(), 0);
                assert_eq!(m.locked_kb(0), 0);
                return;
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(m.locked_kb(0), 4);
        assert_eq!(m.locked_kb(1), 0);
        // A second reference does not lock again; the first unpin keeps it.
        t.pin(&page0).unwrap();
        t.unpin(&page0);
        assert_eq!(m.locked_kb(0), 4);
        t.unpin(&page0);
        assert_eq!(m.locked_kb(0), 0);
        assert_eq!(t.pinned_pages(), 0);
    }

    #[test]
    fn mlock_failure_rolls_back_earlier_pages() {
        let m = Mapping::new(2);
        let t = PinTable::new(1 << 20, PinMode::Mlock);
        // Kernel space: never mapped in user space, so mlock deterministically
        // fails (ENOMEM) whatever the rlimit and capabilities.
        let unmapped = 0xffff_8000_0000_0000usize;
        let pages = [(1, m.page(0)), (2, m.page(1)), (3, unmapped)];
        let err = t.pin(&pages).unwrap_err();
        match err {
            Error::Mlock { gpa, errno } => {
                // With CAP_IPC_LOCK or room under RLIMIT_MEMLOCK it is the
                // kernel address that fails, after two pages were locked;
                // otherwise an earlier page hits the rlimit (EPERM/ENOMEM).
                // Either way nothing may stay locked or counted.
                assert!(matches!(gpa, 0x1000..=0x3000), "{err}");
                assert!(errno == libc::ENOMEM || errno == libc::EPERM, "{err}");
            }
            e => panic!("{e}"),
        }
        assert!(err.to_string().contains("mlock of guest page 0x"));
        assert!(t.snapshot().is_empty());
        assert_eq!(t.pinned_pages(), 0);
        assert_eq!(m.locked_kb(0), 0);
        assert_eq!(m.locked_kb(1), 0);
    }

    /// A span pins what the list of its frames pins, looks up the host
    /// address of each frame in RAM when it `mlock`s it, and gives it back
    /// the same way. A span partly outside RAM (hva 0 past its end) is
    /// refused whole, with nothing left locked or counted.
    #[test]
    fn span_pins_lock_the_frames_ram_holds() {
        let m = Mapping::new(3);
        let ram = crate::ram::GuestRam::new();
        // SAFETY: `m` outlives every use of the layout below (both are
        // dropped at the end of the test, `ram` first).
        unsafe { ram.add(0x10_000, 3 * PAGE_SIZE, m.page(0)) }.expect("adding RAM");
        let guard = crate::sync::epoch::pin();
        let layout = ram.load(&guard);
        let t = PinTable::new(1 << 20, PinMode::Mlock);
        // Frames 0x10..0x13 are RAM; 0x13 is not.
        match t.pin_span(0x11, 0x14, layout) {
            Err(Error::Mlock { gpa, .. }) => assert!(matches!(gpa, 0x11000..=0x13000)),
            r => panic!("{r:?}"),
        }
        assert!(t.snapshot().is_empty());
        assert_eq!(m.locked_kb(1), 0);
        match t.pin_span(0x11, 0x13, layout) {
            Ok(()) => {}
            // No room to lock here: nothing else to check.
            Err(Error::Mlock { errno, .. }) => {
                assert!(errno == libc::EPERM || errno == libc::ENOMEM, "{errno}");
                assert!(t.snapshot().is_empty());
                return;
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(t.snapshot(), [(0x11, 1), (0x12, 1)]);
        assert_eq!(m.locked_kb(1), 8);
        assert_eq!(m.locked_kb(0), 0);
        // The list form of the same frames takes a second reference.
        t.pin(&[(0x11, m.page(1)), (0x12, m.page(2))]).unwrap();
        assert_eq!(t.snapshot(), [(0x11, 2), (0x12, 2)]);
        t.unpin_span(0x11, 0x13, layout);
        assert_eq!(m.locked_kb(1), 8);
        t.unpin_span(0x11, 0x13, layout);
        assert_eq!(m.locked_kb(1), 0);
        assert_eq!(t.pinned_pages(), 0);
    }
}
