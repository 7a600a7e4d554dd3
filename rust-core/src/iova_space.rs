// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One endpoint's IOVA space as a [`vm_memory::GuestMemory`].
//!
//! Behind pvdma a virtio device sees only IOVAs: its rings, indirect tables
//! and buffers are each contiguous in IOVA space but may be scattered over
//! guest pages. [`IovaSpace`] is a view of one domain's translations over the
//! VM's RAM that implements vm-memory's `GuestMemory` (the IOMMU-aware
//! trait), so rust-vmm's `virtio-queue` walks split rings, chains, indirect
//! tables and `Reader`/`Writer` buffers through pvdma unchanged.
//!
//! Semantics follow vm-memory's `IommuMemory` (`src/iommu.rs`): an access
//! is checked over its whole range before any slice is produced (all or
//! nothing: a missing page or a missing permission fails the access and
//! nothing is read or written), and `get_slices` yields one slice per
//! host-contiguous piece. Unlike `IommuMemory`, the lookups are lock-free
//! (the domain's radix table under an epoch guard), and a caller that makes
//! many accesses (a virtqueue) may attach a [`PageCache`] (a software IOTLB
//! of recently used pages) and pre-translated windows (the rings, see
//! [`CachedWindow`]) that are served without a table walk, for as long as
//! no translation of the domain has been removed.
//!
//! Lifetimes make the view safe: an `IovaSpace<'g>` borrows the domain, the
//! RAM layout and the epoch guard they were loaded under, all for `'g`, so
//! neither it nor any slice it hands out can outlive the guard that keeps
//! the RAM mapped.

use std::cell::Cell;
use std::iter::FusedIterator;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions, VolatileSlice,
};

use crate::domain::{Domain, FaultReason, FragmentSink, TranslateFault};
use crate::ram::RamLayout;
use crate::sync::epoch::Guard;
use crate::types::{Perm, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE};

/// Why an [`IovaSpace`] operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The access was refused: unmapped page, missing permission, a
    /// translation outside RAM, or a range that wraps.
    #[error(transparent)]
    Fault(#[from] TranslateFault),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Entries of a [`PageCache`] (a power of two). A virtqueue request
/// touches a handful of buffer pages; 32 keep a few requests' worth.
const PAGE_CACHE_ENTRIES: usize = 32;

/// `cache_gen` of a space without caches: never a domain generation
/// (those count up from 1) nor the bypass value 0.
const NO_CACHE: u64 = u64::MAX;

/// One translated piece of an access: contiguous in host and guest memory.
#[derive(Clone, Copy, Debug)]
struct Piece {
    hva: usize,
    gpa: u64,
    len: u64,
}

/// One host-contiguous run of a [`CachedWindow`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct WindowRun {
    /// Offset of the run's first byte from the window's IOVA.
    offset: u64,
    /// Host address of the run's first byte.
    hva: usize,
    /// Guest-physical address of the run's first byte.
    gpa: u64,
    /// Length in bytes.
    len: u64,
}

/// A translated IOVA window kept across accesses: a virtqueue ring. Built
/// by [`IovaSpace::cache_window`]; served only under the [`PageCache`] key
/// it was built for (see [`IovaSpace::with_cache`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CachedWindow {
    iova: u64,
    len: u64,
    /// What every page of the window allows (the intersection).
    perms: Perm,
    /// The first run, copied out of `runs`: a ring is usually one run, and
    /// this is looked at on every access.
    first: WindowRun,
    /// The page cache key it was built under (`None`: built by a space
    /// without a current cache; never served).
    key: Option<(u64, u64)>,
    runs: Vec<WindowRun>,
}

impl CachedWindow {
    /// First IOVA of the window.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty window.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The permissions every page of the window has.
    pub fn perms(&self) -> Perm {
        self.perms
    }

    /// Host-contiguous runs the window is made of.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Whether `other` translates the same range the same way (whatever
    /// key either was built under).
    pub fn same_translation(&self, other: &CachedWindow) -> bool {
        (self.iova, self.len, self.perms, &self.runs)
            == (other.iova, other.len, other.perms, &other.runs)
    }

    /// The piece of `[iova, iova + left)` that starts at `iova`, if the
    /// window holds `iova` and allows `need`: at most to the end of the run.
    #[inline(always)]
    fn piece(&self, iova: u64, left: u64, need: Perm) -> Option<Piece> {
        // Wrapping: an IOVA below the window gives a huge offset.
        let offset = iova.wrapping_sub(self.iova);
        if offset >= self.len || !self.perms.contains(need) {
            return None;
        }
        // The first run starts at offset 0.
        let run = if offset < self.first.len {
            &self.first
        } else {
            // Runs are sorted by offset and few.
            self.runs
                .iter()
                .find(|r| offset >= r.offset && offset - r.offset < r.len)?
        };
        let within = offset - run.offset;
        Some(Piece {
            hva: run.hva + within as usize,
            gpa: run.gpa + within,
            len: (run.len - within).min(left),
        })
    }
}

/// One cached page translation.
#[derive(Clone, Copy, Debug, Default)]
struct PageEntry {
    /// IOVA of the page, with bit 0 set; 0 for an empty entry.
    tag: u64,
    /// Host address of the page's first byte.
    hva: usize,
    /// Guest-physical address of the page's first byte.
    gpa: u64,
    perms: Perm,
}

/// A small software IOTLB (vhost's answer to a table walk per access): the
/// translations of recently used IOVA pages, with their permissions.
///
/// Entries are valid only under the key they were made under: the domain
/// [`generation`](Domain::generation) (0 in bypass) and the
/// [`RamLayout::id`]. The generation changes with every removal of a
/// translation (UNMAP, DETACH, RAM removal) and never with a MAP, so a MAP
/// never invalidates and an entry is never used after a removal: an
/// [`IovaSpace`] compares the generation before every cached access.
///
/// Owned by one device thread (a virtqueue): not `Sync`.
pub struct PageCache {
    entries: [Cell<PageEntry>; PAGE_CACHE_ENTRIES],
    key: Cell<Option<(u64, u64)>>,
    misses: Cell<u64>,
}

impl Default for PageCache {
    fn default() -> Self {
        PageCache {
            entries: Default::default(),
            key: Cell::new(None),
            misses: Cell::new(0),
        }
    }
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache")
            .field("key", &self.key.get())
            .field("misses", &self.misses.get())
            .finish_non_exhaustive()
    }
}

impl PageCache {
    /// An empty cache (no key: serves nothing until [`reset`](Self::reset)).
    pub fn new() -> Self {
        Self::default()
    }

    /// `(domain generation or 0 in bypass, RAM layout id)` the entries
    /// belong to.
    pub fn key(&self) -> Option<(u64, u64)> {
        self.key.get()
    }

    /// Empties the cache and gives it a new key.
    pub fn reset(&self, key: Option<(u64, u64)>) {
        for e in &self.entries {
            e.set(PageEntry::default());
        }
        self.key.set(key);
    }

    /// Table walks done while the cache was valid.
    pub fn misses(&self) -> u64 {
        self.misses.get()
    }

    #[inline]
    fn slot(&self, iova: u64) -> &Cell<PageEntry> {
        // Consecutive pages take consecutive slots; folding in the higher
        // bits keeps buffers 128 KiB or 4 MiB apart (the same low page
        // bits) from sharing one.
        let page = iova >> PAGE_SHIFT;
        let i = (page ^ (page >> 5) ^ (page >> 10)) as usize;
        &self.entries[i % PAGE_CACHE_ENTRIES]
    }

    #[inline]
    fn get(&self, iova: u64) -> Option<PageEntry> {
        let e = self.slot(iova).get();
        (e.tag == (iova & !PAGE_MASK) | 1).then_some(e)
    }

    #[inline]
    fn insert(&self, iova: u64, hva: usize, gpa: u64, perms: Perm) {
        let off = iova & PAGE_MASK;
        self.slot(iova).set(PageEntry {
            tag: (iova & !PAGE_MASK) | 1,
            hva: hva - off as usize,
            gpa: gpa - off,
            perms,
        });
    }
}

/// One endpoint's IOVA space under an epoch guard: a [`GuestMemory`]
/// whose addresses are IOVAs.
///
/// Not `Sync` (it remembers the last refused access for its owner); make
/// one per thread, they are cheap.
pub struct IovaSpace<'g> {
    /// `None`: the endpoint is unattached and bypasses translation
    /// (IOVA = guest-physical address, RAM only).
    domain: Option<&'g Domain>,
    ram: &'g RamLayout,
    guard: &'g Guard,
    windows: &'g [CachedWindow],
    pages: Option<&'g PageCache>,
    /// Domain generation (0 in bypass) under which `windows` and `pages`
    /// may be served; [`NO_CACHE`] when they may not.
    cache_gen: u64,
    last_fault: Cell<Option<TranslateFault>>,
}

impl std::fmt::Debug for IovaSpace<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IovaSpace")
            .field("translated", &self.domain.is_some())
            .field("windows", &self.windows.len())
            .field("page_cache", &self.pages.is_some())
            .finish_non_exhaustive()
    }
}

impl<'g> IovaSpace<'g> {
    /// A view of `domain`'s translations (`None`: identity, for an
    /// unattached endpoint in bypass mode) over `ram`, both loaded under
    /// `guard` (see [`crate::vm::Vm::dma_view`]). Every access walks the
    /// table.
    pub fn new(domain: Option<&'g Domain>, ram: &'g RamLayout, guard: &'g Guard) -> Self {
        IovaSpace {
            domain,
            ram,
            guard,
            windows: &[],
            pages: None,
            cache_gen: NO_CACHE,
            last_fault: Cell::new(None),
        }
    }

    /// As [`new`](Self::new), serving accesses from `windows` and `pages`
    /// and filling `pages` on table walks, as long as the domain's
    /// generation is the one in `pages`' key (checked before every cached
    /// access) and `ram` is the layout in it. The windows are served only
    /// if every one was built under that same key (by
    /// [`cache_window`](Self::cache_window) on a space with `pages`
    /// current).
    pub fn with_cache(
        domain: Option<&'g Domain>,
        ram: &'g RamLayout,
        guard: &'g Guard,
        windows: &'g [CachedWindow],
        pages: &'g PageCache,
    ) -> Self {
        let key = pages.key();
        let (pages, cache_gen) = match key {
            Some((gen, ram_id)) if ram_id == ram.id() => (Some(pages), gen),
            _ => (None, NO_CACHE),
        };
        // Windows hold host addresses: serve them only under the key they
        // were built for, whatever the caller passed.
        let windows_ok = pages.is_some() && windows.iter().all(|w| w.key == key);
        IovaSpace {
            domain,
            ram,
            guard,
            windows: if windows_ok { windows } else { &[] },
            pages,
            cache_gen,
            last_fault: Cell::new(None),
        }
    }

    /// The domain (`None` in bypass).
    pub fn domain(&self) -> Option<&'g Domain> {
        self.domain
    }

    /// The RAM layout the translations resolve into.
    pub fn ram(&self) -> &'g RamLayout {
        self.ram
    }

    /// Takes the last refused access, if any (vm-memory errors cannot
    /// carry pvdma's reason; this can).
    pub fn take_fault(&self) -> Option<TranslateFault> {
        self.last_fault.take()
    }

    /// Whether an access was refused since the last [`take_fault`](Self::take_fault).
    pub fn has_fault(&self) -> bool {
        let f = self.last_fault.get();
        f.is_some()
    }

    fn fault(&self, f: TranslateFault) -> TranslateFault {
        self.last_fault.set(Some(f));
        f
    }

    /// Whether the caches may be served now: the domain's generation is
    /// still the one they were made under (no translation was removed
    /// since). Read before every cached access.
    /// Only meaningful when `pages` is set (`cache_gen` is then the key's).
    #[inline(always)]
    fn cache_current(&self) -> bool {
        // Domain::generation is an Acquire load, pairing with the Release
        // store after the table entries were cleared: if it still reads
        // the cache's generation, no removal has completed since.
        self.domain.map_or(0, Domain::generation) == self.cache_gen
    }

    /// Translates the first piece of `[iova, iova + left)` from the table:
    /// contiguous in host and guest memory, `0 < len <= left`, with the
    /// permissions of its leaf. `left > 0`.
    #[inline]
    fn table_step(
        &self,
        iova: u64,
        left: u64,
        need: Perm,
    ) -> std::result::Result<(Piece, Perm), TranslateFault> {
        let refuse = |reason| TranslateFault { iova, reason };
        let (gpa, perms, run) = match self.domain {
            Some(dom) => {
                let leaf = dom
                    .table()
                    .lookup(iova, self.guard)
                    .ok_or(refuse(FaultReason::Unmapped))?;
                (leaf.gpa, leaf.perms, leaf.run)
            }
            None => (iova, Perm::RW, u64::MAX),
        };
        if !perms.contains(need) {
            return Err(refuse(FaultReason::Permission));
        }
        let (hva, len) = self
            .ram
            .host_run(gpa, run.min(left))
            .ok_or(refuse(FaultReason::OutsideRam))?;
        if len == 0 {
            // host_run of a RAM address with left > 0 is never empty.
            return Err(refuse(FaultReason::OutsideRam));
        }
        Ok((Piece { hva, gpa, len }, perms))
    }

    /// The first piece of `[iova, iova + left)`: from the page cache or a
    /// ring window, else from the table (filling the page cache).
    /// `left > 0`. Only the cache hits are inlined.
    #[inline(always)]
    fn piece(
        &self,
        iova: u64,
        left: u64,
        need: Perm,
    ) -> std::result::Result<Piece, TranslateFault> {
        if let Some(pages) = self.pages {
            if self.cache_current() {
                if let Some(e) = pages.get(iova) {
                    if e.perms.contains(need) {
                        let off = iova & PAGE_MASK;
                        return Ok(Piece {
                            hva: e.hva + off as usize,
                            gpa: e.gpa + off,
                            len: (PAGE_SIZE - off).min(left),
                        });
                    }
                }
                for w in self.windows {
                    if let Some(p) = w.piece(iova, left, need) {
                        return Ok(p);
                    }
                }
            }
        }
        self.piece_slow(iova, left, need)
    }

    /// [`piece`](Self::piece) without a cache hit: a permission fault on a
    /// cached page, or a table walk that, while the cache is current,
    /// caches the page.
    #[inline(never)]
    fn piece_slow(
        &self,
        iova: u64,
        left: u64,
        need: Perm,
    ) -> std::result::Result<Piece, TranslateFault> {
        let pages = match self.pages {
            Some(pages) if self.cache_current() => pages,
            _ => return self.table_step(iova, left, need).map(|(p, _)| p),
        };
        if pages.get(iova).is_some() {
            // Cached without the permission (a hit is served by `piece`).
            // Exact: a mapping's permissions change only by UNMAP + MAP,
            // which changes the generation.
            return Err(TranslateFault {
                iova,
                reason: FaultReason::Permission,
            });
        }
        let (p, perms) = self.table_step(iova, left, need)?;
        pages.misses.set(pages.misses.get() + 1);
        // Regions are page aligned, so the whole page of a RAM address is
        // RAM, host-contiguous, in one region; and a leaf covers at least
        // the whole page. The generation was compared before this walk:
        // should a removal race with it, the entry is never served (the
        // generation no longer matches at the next access).
        pages.insert(iova, p.hva, p.gpa, perms);
        Ok(p)
    }

    /// Checks `[cur, end)` whole, the rest of an access after its first
    /// piece (all or nothing).
    #[inline(never)]
    fn check_rest(
        &self,
        mut cur: u64,
        end: u64,
        need: Perm,
    ) -> std::result::Result<(), TranslateFault> {
        while cur < end {
            cur += self.piece(cur, end - cur, need)?.len;
        }
        Ok(())
    }

    /// Translates `[iova, iova + len)` for `need` into `sink` (which merges
    /// contiguous pieces and counts past its capacity). Refusals are also
    /// remembered for [`take_fault`](Self::take_fault).
    pub fn translate(
        &self,
        iova: u64,
        len: u64,
        need: Perm,
        sink: &mut FragmentSink<'_>,
    ) -> Result<()> {
        let end = iova.checked_add(len).ok_or_else(|| {
            Error::Fault(self.fault(TranslateFault {
                iova,
                reason: FaultReason::Overflow,
            }))
        })?;
        let mut cur = iova;
        // Each piece advances by at least one byte and at most one page or
        // table leaf, so the walk is bounded by the range's pages.
        while cur < end {
            let p = self
                .piece(cur, end - cur, need)
                .map_err(|f| Error::Fault(self.fault(f)))?;
            sink.push(p.hva, p.gpa, p.len);
            cur += p.len;
        }
        Ok(())
    }

    /// Translates `[iova, iova + len)` once, for `need`, from the table,
    /// into a window that later accesses are served from (see
    /// [`with_cache`](Self::with_cache)).
    pub fn cache_window(&self, iova: u64, len: u64, need: Perm) -> Result<CachedWindow> {
        let mut w = CachedWindow {
            iova,
            len,
            perms: Perm::RW,
            first: WindowRun::default(),
            key: match self.pages {
                Some(pages) if self.cache_current() => pages.key(),
                _ => None,
            },
            runs: Vec::new(),
        };
        let end = iova.checked_add(len).ok_or_else(|| {
            self.fault(TranslateFault {
                iova,
                reason: FaultReason::Overflow,
            })
        })?;
        let mut cur = iova;
        while cur < end {
            let (p, perms) = self
                .table_step(cur, end - cur, need)
                .map_err(|f| self.fault(f))?;
            w.perms = Perm::from_bits_truncate(w.perms.bits() & perms.bits());
            self.prefill(cur, &p, perms);
            let offset = cur - iova;
            match w.runs.last_mut() {
                Some(last)
                    if last.hva.wrapping_add(last.len as usize) == p.hva
                        && last.gpa.wrapping_add(last.len) == p.gpa =>
                {
                    last.len += p.len
                }
                _ => w.runs.push(WindowRun {
                    offset,
                    hva: p.hva,
                    gpa: p.gpa,
                    len: p.len,
                }),
            }
            cur += p.len;
        }
        if let Some(first) = w.runs.first() {
            w.first = *first;
        }
        Ok(w)
    }

    /// Puts the pages of piece `p` (at `iova`, from the table) in the page
    /// cache while it is current, so that ring accesses hit it too.
    fn prefill(&self, iova: u64, p: &Piece, perms: Perm) {
        let Some(pages) = self.pages else {
            return;
        };
        if !self.cache_current() {
            return;
        }
        // A piece is inside one leaf and one RAM region: linear, page by
        // page. A ring is at most 129 pages; only the last few stay.
        let mut at = 0;
        while at < p.len {
            pages.insert(iova + at, p.hva + at as usize, p.gpa + at, perms);
            at += PAGE_SIZE - ((iova + at) & PAGE_MASK);
        }
    }

    /// Plans an access: checks all of it (all or nothing) and keeps the
    /// first piece; the rest, if any, is translated again lazily (from the
    /// caches, as the check just filled them).
    #[inline(always)]
    fn plan(
        &self,
        addr: u64,
        count: usize,
        need: Perm,
    ) -> std::result::Result<IovaSlices<'_, 'g>, TranslateFault> {
        let len = count as u64;
        let end = addr.checked_add(len).ok_or(TranslateFault {
            iova: addr,
            reason: FaultReason::Overflow,
        })?;
        if len == 0 {
            return Ok(IovaSlices {
                space: self,
                first: (0, 0),
                cur: end,
                end,
                need,
            });
        }
        let first = self.piece(addr, len, need)?;
        let next = addr + first.len;
        if next < end {
            self.check_rest(next, end, need)?;
        }
        Ok(IovaSlices {
            space: self,
            first: (first.hva, first.len),
            cur: next,
            end,
            need,
        })
    }
}

/// The slices of one access, as [`GuestMemory::get_slices`] returns them.
pub struct IovaSlices<'a, 'g> {
    space: &'a IovaSpace<'g>,
    /// `(hva, len)` of the first piece, translated while planning; `len`
    /// 0 once handed out.
    first: (usize, u64),
    /// IOVA of the first byte after the pieces handed out.
    cur: u64,
    end: u64,
    need: Perm,
}

impl<'a> IovaSlices<'a, '_> {
    /// The pieces after the first one, translated again (from the caches
    /// the planning filled).
    #[inline(never)]
    fn next_slow(
        &mut self,
    ) -> Option<vm_memory::guest_memory::Result<VolatileSlice<'a, BS<'a, ()>>>> {
        match self.space.piece(self.cur, self.end - self.cur, self.need) {
            Ok(p) => {
                self.cur += p.len;
                Some(Ok(Self::slice(p.hva, p.len)))
            }
            Err(f) => {
                // Only a concurrent UNMAP can get here (the range was
                // checked whole): stop, as vm-memory requires.
                self.cur = self.end;
                self.space.fault(f);
                Some(Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(
                    f.iova,
                ))))
            }
        }
    }

    #[inline(always)]
    fn slice(hva: usize, len: u64) -> VolatileSlice<'a, BS<'a, ()>> {
        // SAFETY: [hva, hva + len) lies inside one region of the RAM
        // layout the space borrows (from the table: host_run never crosses
        // a region's end; from a window or the page cache: a translation
        // made the same way under the same RAM layout id, which the space
        // checked), which the VMM keeps mapped, readable and writable
        // while the epoch guard the layout was loaded under is held
        // (GuestRam::add's contract). The slice lives for 'a, shorter than
        // the space's 'g borrow of that guard. Guest memory is only ever
        // accessed volatilely. `len` is at most the access's `count`, a
        // usize.
        unsafe { VolatileSlice::new(hva as *mut u8, len as usize) }
    }
}

impl<'a> Iterator for IovaSlices<'a, '_> {
    type Item = vm_memory::guest_memory::Result<VolatileSlice<'a, BS<'a, ()>>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.first.1 != 0 {
            let (hva, len) = self.first;
            self.first.1 = 0;
            return Some(Ok(Self::slice(hva, len)));
        }
        if self.cur < self.end {
            return self.next_slow();
        }
        None
    }
}

impl FusedIterator for IovaSlices<'_, '_> {}

impl<'a> GuestMemorySliceIterator<'a, BS<'a, ()>> for IovaSlices<'a, '_> {
    /// vm-memory's default wraps the iterator in a `Peekable` to find an
    /// error in the first slice; here the first slice was translated (and
    /// the whole range checked) by `get_slices`, so it cannot fail, and
    /// a later error (a concurrent UNMAP) just ends the iteration. Every
    /// `Bytes` read and write goes through this: the adapter saves the
    /// peek on each access.
    fn stop_on_error(
        self,
    ) -> vm_memory::guest_memory::Result<impl Iterator<Item = VolatileSlice<'a, BS<'a, ()>>>> {
        Ok(StopOnError(self))
    }
}

/// [`IovaSlices`] ending at its first error (see `stop_on_error`).
struct StopOnError<'a, 'g>(IovaSlices<'a, 'g>);

impl<'a> Iterator for StopOnError<'a, '_> {
    type Item = VolatileSlice<'a, BS<'a, ()>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        // IovaSlices is fused and returns None after its first error.
        self.0.next()?.ok()
    }
}

impl GuestMemory for IovaSpace<'_> {
    type PhysicalMemory = GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        match self.plan(addr.0, count, access.into()) {
            Ok(_) => true,
            Err(f) => {
                self.fault(f);
                false
            }
        }
    }

    #[inline(always)]
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>>
    {
        self.plan(addr.0, count, access.into()).map_err(|f| {
            self.fault(f);
            GuestMemoryError::InvalidGuestAddress(GuestAddress(f.iova))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::epoch;
    use crate::testing::{self, GuestMem};
    use crate::vm::{Vm, VmConfig};
    use vm_memory::Bytes;

    const RID: u32 = 0x10;

    fn vm_with_ram() -> (Vm, GuestMem) {
        let mem = GuestMem::new(&[(0, 1 << 20)]);
        let vm = Vm::new(VmConfig::default()).unwrap();
        // SAFETY: `mem` outlives `vm` in every test.
        unsafe { mem.register(&vm) };
        vm.add_endpoint(RID, None).unwrap();
        assert_eq!(vm.attach(RID), crate::Status::Ok);
        (vm, mem)
    }

    fn map(vm: &Vm, iova: u64, gpa: u64, perms: Perm) {
        let r = vm.execute(&testing::map_fixed(RID, perms, iova, &[(gpa, PAGE_SIZE)]));
        assert_eq!(r.status, crate::Status::Ok);
    }

    #[test]
    fn reads_across_scattered_pages_and_checks_permissions() {
        let (vm, mem) = vm_with_ram();
        // IOVA pages 0x10000, 0x11000 -> guest pages 0x5000, 0x2000.
        map(&vm, 0x10000, 0x5000, Perm::RW);
        map(&vm, 0x11000, 0x2000, Perm::READ);
        mem.write_slice(&[1, 2], GuestAddress(0x5ffe)).unwrap();
        mem.write_slice(&[3, 4], GuestAddress(0x2000)).unwrap();
        let guard = epoch::pin();
        let (dom, ram) = vm.dma_view(RID, &guard).unwrap();
        let space = IovaSpace::new(dom, ram, &guard);
        let mut buf = [0u8; 4];
        space.read_slice(&mut buf, GuestAddress(0x10ffe)).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        assert_eq!(
            space
                .get_slices(GuestAddress(0x10ffe), 4, Permissions::Read)
                .unwrap()
                .count(),
            2
        );
        // Writing needs WRITE on both pages: refused, and nothing written.
        assert!(space.write_slice(&[9; 4], GuestAddress(0x10ffe)).is_err());
        assert_eq!(space.take_fault().unwrap().reason, FaultReason::Permission);
        let mut check = [0u8; 2];
        mem.read_slice(&mut check, GuestAddress(0x5ffe)).unwrap();
        assert_eq!(check, [1, 2], "all or nothing");
        assert!(!space.check_range(GuestAddress(0x11ff0), 0x20, Permissions::Read));
        assert_eq!(space.take_fault().unwrap().reason, FaultReason::Unmapped);
        assert!(space.check_range(GuestAddress(0x10000), 0x2000, Permissions::Read));
        assert!(space
            .get_slices(GuestAddress(u64::MAX), 2, Permissions::Read)
            .is_err());
        assert_eq!(space.take_fault().unwrap().reason, FaultReason::Overflow);
    }

    #[test]
    fn many_fragments_are_walked_lazily() {
        let (vm, mem) = vm_with_ram();
        // Eight IOVA pages mapped backwards onto guest pages.
        for i in 0..8u64 {
            map(
                &vm,
                0x40000 + i * PAGE_SIZE,
                0x80000 - i * PAGE_SIZE,
                Perm::RW,
            );
            mem.write_obj(i as u8, GuestAddress(0x80000 - i * PAGE_SIZE))
                .unwrap();
        }
        let guard = epoch::pin();
        let (dom, ram) = vm.dma_view(RID, &guard).unwrap();
        let space = IovaSpace::new(dom, ram, &guard);
        let slices: Vec<_> = space
            .get_slices(
                GuestAddress(0x40000),
                8 * PAGE_SIZE as usize,
                Permissions::Read,
            )
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        assert_eq!(slices.len(), 8);
        for (i, s) in slices.iter().enumerate() {
            assert_eq!(s.len(), PAGE_SIZE as usize);
            let b: u8 = s.read_obj(0).unwrap();
            assert_eq!(b, i as u8);
        }
    }

    #[test]
    fn windows_serve_accesses_and_bypass_is_identity() {
        let (vm, mem) = vm_with_ram();
        map(&vm, 0x10000, 0x7000, Perm::RW);
        map(&vm, 0x11000, 0x3000, Perm::RW);
        mem.write_obj(0xabcd_u16, GuestAddress(0x3000)).unwrap();
        let guard = epoch::pin();
        let (dom, ram) = vm.dma_view(RID, &guard).unwrap();
        let key = Some((dom.unwrap().generation(), ram.id()));
        let pages = PageCache::new();
        pages.reset(key);
        let w = IovaSpace::with_cache(dom, ram, &guard, &[], &pages)
            .cache_window(0x10800, 0x1000, Perm::READ)
            .unwrap();
        assert_eq!((w.run_count(), w.perms()), (2, Perm::RW));
        // Empty the page cache the build filled: the window alone serves.
        pages.reset(key);
        let windows = [w];
        let space = IovaSpace::with_cache(dom, ram, &guard, &windows, &pages);
        let v: u16 = space.read_obj(GuestAddress(0x11000)).unwrap();
        assert_eq!(v, 0xabcd);
        assert_eq!(pages.misses(), 0, "served by the window");
        // A window built without a current cache is never served.
        let stray = [IovaSpace::new(dom, ram, &guard)
            .cache_window(0x10800, 0x1000, Perm::READ)
            .unwrap()];
        let space = IovaSpace::with_cache(dom, ram, &guard, &stray, &pages);
        let v: u16 = space.read_obj(GuestAddress(0x11000)).unwrap();
        assert_eq!(v, 0xabcd);
        assert_eq!(pages.misses(), 1, "walked, not served by the stray window");
        // Nor is any cache once a translation was removed.
        map(&vm, 0x20000, 0x8000, Perm::RW);
        let r = vm.execute(&testing::unmap_req(RID, 0x20000, 0));
        assert_eq!(r.status, crate::Status::Ok);
        let v: u16 = space.read_obj(GuestAddress(0x11000)).unwrap();
        assert_eq!(v, 0xabcd);
        assert_eq!(pages.misses(), 1, "stale generation: plain walk, no fill");
        let identity = IovaSpace::new(None, ram, &guard);
        let v: u16 = identity.read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!(v, 0xabcd);
        assert!(identity.read_obj::<u16>(GuestAddress(2 << 20)).is_err());
        assert_eq!(
            identity.take_fault().unwrap().reason,
            FaultReason::OutsideRam
        );
    }
}
