// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VM's guest RAM: which guest-physical ranges are RAM and where the VMM
//! mapped them in this process.
//!
//! Every DMA translation ends here (guest-physical -> host virtual), so the
//! read side must never wait: [`GuestRam`] publishes an immutable
//! [`RamLayout`] through an epoch-protected pointer and replaces it
//! copy-on-write (under a writer mutex) when the VMM adds or removes a
//! region, the way vm-memory's `GuestMemoryAtomic` swaps snapshots but
//! without a reference count on the read path.
//!
//! All inputs other than [`GuestRam::add`]'s mapping come from a hostile
//! guest: every address sum is checked, and nothing here panics on them.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion, VolatileSlice};

use crate::sync::epoch::{self, Atomic, Guard, Owned};
use crate::sync::Ordering;
use crate::types::PAGE_MASK;

/// The most regions a VM may have. QEMU splits RAM into a handful of
/// regions (below/above the PCI hole, hotplugged DIMMs); the limit keeps the
/// copy-on-write update and the `contains_range` walk bounded.
pub const MAX_REGIONS: usize = 256;

/// Up to this many regions, [`RamLayout::find`] scans linearly: with the
/// usual 1..4 regions that beats a binary search's unpredictable branches.
const LINEAR_SCAN_MAX: usize = 4;

/// Errors of the RAM layout.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The region is malformed.
    #[error("invalid RAM region gpa {gpa:#x} size {size:#x} hva {hva:#x}: {reason}")]
    Invalid {
        /// Guest-physical start.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Host virtual start.
        hva: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The region overlaps an existing one in guest-physical space.
    #[error(
        "RAM region [{gpa:#x}, +{size:#x}) overlaps existing region [{other_gpa:#x}, +{other_size:#x})"
    )]
    Overlap {
        /// Guest-physical start of the new region.
        gpa: u64,
        /// Size of the new region.
        size: u64,
        /// Guest-physical start of the existing region.
        other_gpa: u64,
        /// Size of the existing region.
        other_size: u64,
    },
    /// No region matches exactly.
    #[error("no RAM region [{gpa:#x}, +{size:#x})")]
    NotFound {
        /// Guest-physical start asked for.
        gpa: u64,
        /// Size asked for.
        size: u64,
    },
    /// The VM already has the maximum number of regions.
    #[error("too many RAM regions (limit {limit})")]
    TooMany {
        /// The limit ([`MAX_REGIONS`]).
        limit: usize,
    },
    /// A guest access is not entirely inside RAM.
    #[error("guest access [{gpa:#x}, +{len:#x}) is not entirely in RAM")]
    Access {
        /// Guest-physical start of the access.
        gpa: u64,
        /// Length of the access in bytes.
        len: u64,
    },
    /// vm-memory refused the mapping.
    #[error("vm-memory rejected RAM region at gpa {gpa:#x}: {source}")]
    Mmap {
        /// Guest-physical start of the region.
        gpa: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the region collection (a bug: our own checks
    /// should have caught it first).
    #[error("vm-memory rejected the RAM layout with region at gpa {gpa:#x}: {source}")]
    Collection {
        /// Guest-physical start of the region being added or removed.
        gpa: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestRegionCollectionError,
    },
}

/// Result of RAM layout operations.
pub type Result<T> = std::result::Result<T, Error>;

/// One region of guest RAM: `size` bytes at guest-physical `gpa`, mapped at
/// host virtual `hva`.
///
/// Regions in a [`RamLayout`] have been validated: all three values are
/// 4 KiB aligned, `size > 0`, and neither `gpa + size` nor `hva + size`
/// overflows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the first byte.
    pub hva: usize,
}

impl RamRegion {
    /// The first guest-physical address after the region.
    ///
    /// Saturates instead of overflowing for a hand-built region that would
    /// wrap (validated regions never do).
    #[inline]
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.size)
    }

    /// Whether `gpa` is inside the region.
    #[inline]
    pub fn contains(&self, gpa: u64) -> bool {
        // Subtracting instead of comparing with `end()` cannot overflow.
        gpa >= self.gpa && gpa - self.gpa < self.size
    }

    /// Host address of `gpa`, which must be inside the region.
    #[inline]
    fn hva_of(&self, gpa: u64) -> usize {
        debug_assert!(self.contains(gpa));
        // Cannot overflow: `gpa - self.gpa < size` and `hva + size` was
        // checked when the region was added.
        self.hva + (gpa - self.gpa) as usize
    }

    fn validate(&self) -> Result<()> {
        let invalid = |reason| Error::Invalid {
            gpa: self.gpa,
            size: self.size,
            hva: self.hva,
            reason,
        };
        if self.size == 0 {
            return Err(invalid("zero size"));
        }
        if self.gpa & PAGE_MASK != 0
            || self.size & PAGE_MASK != 0
            || self.hva as u64 & PAGE_MASK != 0
        {
            return Err(invalid("not 4 KiB aligned"));
        }
        // The end must be representable: the last page of the address space
        // cannot be RAM, which keeps `end()` exact for every region.
        if self.gpa.checked_add(self.size).is_none() {
            return Err(invalid("guest-physical range overflows"));
        }
        let size = usize::try_from(self.size).map_err(|_| invalid("size exceeds usize"))?;
        if self.hva.checked_add(size).is_none() {
            return Err(invalid("host range overflows"));
        }
        Ok(())
    }
}

/// An immutable snapshot of the RAM layout.
pub struct RamLayout {
    /// Sorted by `gpa`, non-overlapping.
    regions: Vec<RamRegion>,
    /// The same regions as vm-memory sees them.
    memory: Arc<GuestMemoryMmap<()>>,
    /// Never reused by another layout of this process (see [`RamLayout::id`]).
    id: u64,
}

/// Source of [`RamLayout::id`] values.
static NEXT_LAYOUT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_layout_id() -> u64 {
    // Relaxed: only uniqueness matters; the id is published with the
    // layout by the AcqRel swap in `publish`.
    NEXT_LAYOUT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl std::fmt::Debug for RamLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamLayout")
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

impl RamLayout {
    fn empty() -> RamLayout {
        RamLayout {
            regions: Vec::new(),
            memory: Arc::new(GuestMemoryMmap::new()),
            id: next_layout_id(),
        }
    }

    /// A value that identifies this layout among every layout the process
    /// ever built (never 0). Unlike the layout's address, which a later
    /// layout may reuse once this one is freed, it is safe as a cache key
    /// for host addresses.
    #[inline]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The regions, sorted by guest-physical address.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The region containing `gpa`.
    #[inline]
    pub fn find(&self, gpa: u64) -> Option<&RamRegion> {
        if self.regions.len() <= LINEAR_SCAN_MAX {
            return self.regions.iter().find(|r| r.contains(gpa));
        }
        // The last region starting at or below `gpa` is the only candidate.
        let idx = self.regions.partition_point(|r| r.gpa <= gpa);
        let region = self.regions.get(idx.checked_sub(1)?)?;
        region.contains(gpa).then_some(region)
    }

    /// Host address of `gpa`, if it is RAM.
    #[inline]
    pub fn hva(&self, gpa: u64) -> Option<usize> {
        self.find(gpa).map(|r| r.hva_of(gpa))
    }

    /// The longest host-contiguous run at `gpa`: `(hva, run_len)` with
    /// `run_len <= len`, ending at `len` bytes or at the end of the region
    /// holding `gpa`, whichever comes first. Adjacent regions are never
    /// merged, even when their host mappings happen to be contiguous.
    ///
    /// `None` if `gpa` is not RAM. `len == 0` gives `Some((hva, 0))`.
    #[inline]
    pub fn host_run(&self, gpa: u64, len: u64) -> Option<(usize, u64)> {
        let region = self.find(gpa)?;
        let left_in_region = region.size - (gpa - region.gpa);
        Some((region.hva_of(gpa), len.min(left_in_region)))
    }

    /// Whether every byte of `[gpa, gpa + len)` is RAM; the range may span
    /// adjacent regions but not a hole.
    ///
    /// A range whose end overflows is never RAM. An empty range (`len == 0`)
    /// counts as RAM only if `gpa` itself is RAM: a guest address outside RAM
    /// is never validated, not even by a degenerate request.
    pub fn contains_range(&self, gpa: u64, len: u64) -> bool {
        if len == 0 {
            return self.find(gpa).is_some();
        }
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let mut cur = gpa;
        // Each step moves to the end of a distinct region, so the walk is
        // bounded by MAX_REGIONS whatever `len` the guest picked.
        while cur < end {
            match self.find(cur) {
                Some(region) => cur = region.end(),
                None => return false,
            }
        }
        true
    }

    /// The vm-memory view of the same regions, for the virtio-queue
    /// integration.
    ///
    /// The regions do not own their mappings: the memory is guaranteed
    /// mapped only while the epoch guard this layout was loaded under is
    /// held. A clone of the `Arc` must not be used after that guard is
    /// dropped.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap<()>> {
        &self.memory
    }

    /// Calls `f(hva, offset_in_access, chunk_len)` for each host-contiguous
    /// chunk of `[gpa, gpa + len)`, after checking that the whole range is
    /// RAM (so `f` is never called for a failing access).
    fn for_each_run(
        &self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(usize, usize, usize),
    ) -> Result<()> {
        // Inside one region (a request block, its status): one region
        // lookup answers both whether it is RAM and where it is.
        if let Some(region) = self.find(gpa) {
            if len > 0 && len <= region.size - (gpa - region.gpa) {
                // `len` came from a slice length.
                f(region.hva_of(gpa), 0, len as usize);
                return Ok(());
            }
        }
        if !self.contains_range(gpa, len) {
            return Err(Error::Access { gpa, len });
        }
        let mut done = 0u64;
        while done < len {
            // Cannot overflow: contains_range checked `gpa + len`.
            let cur = gpa + done;
            let Some((hva, run)) = self.host_run(cur, len - done) else {
                // Unreachable after contains_range; fail rather than panic.
                return Err(Error::Access { gpa, len });
            };
            // `run <= len`, and `len` came from a slice length.
            f(hva, done as usize, run as usize);
            done += run;
        }
        Ok(())
    }

    /// Copies guest memory at `gpa` into `buf` with volatile reads (the
    /// guest may be writing concurrently). The range may span adjacent
    /// regions. Fails, copying nothing, unless all of it is RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.for_each_run(gpa, buf.len() as u64, |hva, off, len| {
            // SAFETY: [hva, hva + len) lies inside one region, which the VMM
            // promised (GuestRam::add) stays mapped and readable while the
            // epoch guard this layout is borrowed from is held; the slice
            // lives only for this call. Guest memory is only ever accessed
            // volatilely from here.
            unsafe { read_volatile_run(hva, &mut buf[off..off + len]) };
        })
    }

    /// Writes `buf` to guest memory at `gpa` with volatile writes. The range
    /// may span adjacent regions. Fails, writing nothing, unless all of it
    /// is RAM.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<()> {
        self.for_each_run(gpa, buf.len() as u64, |hva, off, len| {
            // SAFETY: as in `read`; the region is also writable (GuestRam::add).
            unsafe { write_volatile_run(hva, &buf[off..off + len]) };
        })
    }
}

/// Copies guest memory at `hva` into `buf` with volatile reads. Whole
/// aligned words when both address and length allow (request blocks and
/// their fields: a few loads instead of vm-memory's general copy, which
/// cost ~70 instructions per request-block access), else vm-memory's copy.
///
/// # Safety
///
/// `[hva, hva + buf.len())` is mapped and readable for the whole call.
#[inline]
unsafe fn read_volatile_run(hva: usize, buf: &mut [u8]) {
    if hva % 8 == 0 && buf.len() % 8 == 0 {
        let words = hva as *const u64;
        for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
            // SAFETY: an aligned word inside the range the caller vouches
            // for; native byte order keeps memory's byte order.
            let word = unsafe { std::ptr::read_volatile(words.add(i)) };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
    } else if hva % 4 == 0 && buf.len() == 4 {
        // SAFETY: as above, one aligned 32-bit word.
        let word = unsafe { std::ptr::read_volatile(hva as *const u32) };
        buf.copy_from_slice(&word.to_ne_bytes());
    } else {
        // SAFETY: the caller's promise; the slice lives only for this call.
        let guest = unsafe { VolatileSlice::new(hva as *mut u8, buf.len()) };
        guest.copy_to(buf);
    }
}

/// Copies `buf` to guest memory at `hva` with volatile writes, as
/// [`read_volatile_run`] reads.
///
/// # Safety
///
/// `[hva, hva + buf.len())` is mapped and writable for the whole call.
#[inline]
unsafe fn write_volatile_run(hva: usize, buf: &[u8]) {
    if hva % 8 == 0 && buf.len() % 8 == 0 {
        let words = hva as *mut u64;
        for (i, chunk) in buf.chunks_exact(8).enumerate() {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            // SAFETY: an aligned word inside the range the caller vouches
            // for; native byte order keeps the buffer's byte order.
            unsafe { std::ptr::write_volatile(words.add(i), u64::from_ne_bytes(bytes)) };
        }
    } else if hva % 4 == 0 && buf.len() == 4 {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(buf);
        // SAFETY: as above, one aligned 32-bit word.
        unsafe { std::ptr::write_volatile(hva as *mut u32, u32::from_ne_bytes(bytes)) };
    } else {
        // SAFETY: the caller's promise; the slice lives only for this call.
        let guest = unsafe { VolatileSlice::new(hva as *mut u8, buf.len()) };
        guest.copy_from(buf);
    }
}

/// The live RAM layout of a VM.
///
/// Readers ([`GuestRam::load`]) never wait: they read an epoch-protected
/// pointer. Writers serialise on a mutex, build a new layout and swap it
/// in; the old one is freed once no reader can still hold it.
pub struct GuestRam {
    layout: Atomic<RamLayout>,
    /// Serialises writers so that copy-on-write never loses an update.
    writer: parking_lot::Mutex<()>,
}

impl Default for GuestRam {
    fn default() -> Self {
        GuestRam::new()
    }
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let guard = epoch::pin();
        f.debug_struct("GuestRam")
            .field("regions", &self.load(&guard).regions())
            .finish()
    }
}

impl GuestRam {
    /// A VM with no RAM.
    pub fn new() -> GuestRam {
        GuestRam {
            layout: Atomic::new(RamLayout::empty()),
            writer: parking_lot::Mutex::new(()),
        }
    }

    /// The current layout, valid while `guard` is held.
    #[inline]
    pub fn load<'g>(&self, guard: &'g Guard) -> &'g RamLayout {
        // Acquire pairs with the Release half of the AcqRel swap in
        // `publish`: the layout's contents are visible before its pointer.
        let shared = self.layout.load(Ordering::Acquire, guard);
        // SAFETY: the pointer is never null (set in `new`, only ever
        // replaced by `publish` with a valid layout), and the layout it
        // points to is destroyed only through `defer_destroy`, i.e. after
        // every guard that could have loaded it, including `guard`, is gone.
        unsafe { shared.deref() }
    }

    /// Adds a region of `size` bytes at guest-physical `gpa`, mapped at `hva`.
    ///
    /// # Safety
    ///
    /// `[hva, hva + size)` is mapped, readable and writable host memory that
    /// stays mapped until this region is removed and an epoch has passed
    /// (every guard pinned before [`GuestRam::remove`] returned has been
    /// dropped), or until this `GuestRam` is dropped.
    pub unsafe fn add(&self, gpa: u64, size: u64, hva: usize) -> Result<()> {
        let new = RamRegion { gpa, size, hva };
        new.validate()?;
        let _writer = self.writer.lock();
        let guard = epoch::pin();
        let cur = self.load(&guard);
        if cur.regions.len() >= MAX_REGIONS {
            return Err(Error::TooMany { limit: MAX_REGIONS });
        }
        let idx = cur.regions.partition_point(|r| r.gpa < gpa);
        // Sorted and non-overlapping: only the neighbours can overlap.
        let prev = idx.checked_sub(1).and_then(|i| cur.regions.get(i));
        let next = cur.regions.get(idx);
        for other in prev.into_iter().chain(next) {
            if other.gpa < new.end() && new.gpa < other.end() {
                return Err(Error::Overlap {
                    gpa,
                    size,
                    other_gpa: other.gpa,
                    other_size: other.size,
                });
            }
        }

        // validate() checked that `size` fits in usize.
        // SAFETY: the caller guarantees [hva, hva + size) is mapped,
        // readable and writable for as long as this layout (and so this
        // non-owning MmapRegion) can be reached; validate() checked
        // alignment and that the range does not wrap.
        let mapping = unsafe {
            MmapRegion::<()>::build_raw(
                hva as *mut u8,
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                // Only recorded by vm-memory; the real flags are the VMM's.
                libc::MAP_SHARED,
            )
        }
        .map_err(|source| Error::Mmap { gpa, source })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or(Error::Invalid {
            gpa,
            size,
            hva,
            reason: "vm-memory rejected the range",
        })?;
        let memory = cur
            .memory
            .insert_region(Arc::new(region))
            .map_err(|source| Error::Collection { gpa, source })?;

        let mut regions = Vec::with_capacity(cur.regions.len() + 1);
        regions.extend_from_slice(&cur.regions[..idx]);
        regions.push(new);
        regions.extend_from_slice(&cur.regions[idx..]);
        self.publish(
            RamLayout {
                regions,
                memory: Arc::new(memory),
                id: next_layout_id(),
            },
            &guard,
        );
        Ok(())
    }

    /// Removes the region that is exactly `[gpa, gpa + size)` and returns
    /// it. Its mapping may be torn down once an epoch has passed.
    pub fn remove(&self, gpa: u64, size: u64) -> Result<RamRegion> {
        let _writer = self.writer.lock();
        let guard = epoch::pin();
        let cur = self.load(&guard);
        let idx = cur
            .regions
            .iter()
            .position(|r| r.gpa == gpa && r.size == size)
            .ok_or(Error::NotFound { gpa, size })?;
        let removed = cur.regions[idx];
        let (memory, _) = cur
            .memory
            .remove_region(GuestAddress(gpa), size)
            .map_err(|source| Error::Collection { gpa, source })?;
        let mut regions = cur.regions.clone();
        regions.remove(idx);
        self.publish(
            RamLayout {
                regions,
                memory: Arc::new(memory),
                id: next_layout_id(),
            },
            &guard,
        );
        Ok(removed)
    }

    /// Swaps in `layout` and schedules the old one for destruction.
    /// Must be called with `writer` held.
    fn publish(&self, layout: RamLayout, guard: &Guard) {
        // Release: readers that Acquire-load the new pointer see the fully
        // built layout. Acquire: we own the old layout's contents to drop.
        let old = self
            .layout
            .swap(Owned::new(layout), Ordering::AcqRel, guard);
        // SAFETY: `old` is no longer reachable from `self.layout`, and the
        // writer mutex makes this the only place that retires it; readers
        // that still hold it are protected by their guards, which
        // defer_destroy waits out.
        unsafe { guard.defer_destroy(old) };
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `&mut self` means no reader or writer can reach the
        // layout any more; guards that loaded it borrowed `self`, so they
        // are gone too. The pointer is never null.
        unsafe {
            let layout = self.layout.load(Ordering::Relaxed, epoch::unprotected());
            drop(layout.into_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::PAGE_SIZE;
    use vm_memory::{Bytes, GuestMemoryBackend};

    /// Page-aligned zeroed host memory, freed on drop.
    struct HostBuf {
        ptr: *mut u8,
        layout: std::alloc::Layout,
    }

    impl HostBuf {
        fn new(pages: usize) -> HostBuf {
            let layout =
                std::alloc::Layout::from_size_align(pages * PAGE_SIZE as usize, PAGE_SIZE as usize)
                    .unwrap();
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            HostBuf { ptr, layout }
        }

        fn hva(&self) -> usize {
            self.ptr as usize
        }

        fn size(&self) -> u64 {
            self.layout.size() as u64
        }

        fn bytes(&self) -> &[u8] {
            // SAFETY: allocated and initialised (zeroed) in `new`.
            unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
        }
    }

    impl Drop for HostBuf {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr, self.layout) };
        }
    }

    /// Fake host addresses for layout-only tests: never dereferenced.
    const FAKE_HVA: usize = 0x7f00_0000_0000;

    fn add_fake(ram: &GuestRam, gpa: u64, size: u64) -> Result<()> {
        // SAFETY: these tests never access guest memory, only the layout.
        unsafe { ram.add(gpa, size, FAKE_HVA + gpa as usize) }
    }

    fn regions(ram: &GuestRam) -> Vec<RamRegion> {
        let guard = epoch::pin();
        ram.load(&guard).regions().to_vec()
    }

    #[test]
    fn region_end_and_contains() {
        let r = RamRegion {
            gpa: 0x1000,
            size: 0x2000,
            hva: FAKE_HVA,
        };
        assert_eq!(r.end(), 0x3000);
        assert!(!r.contains(0xfff));
        assert!(r.contains(0x1000));
        assert!(r.contains(0x2fff));
        assert!(!r.contains(0x3000));
        let wrapping = RamRegion {
            gpa: u64::MAX - 0xfff,
            size: 0x2000,
            hva: 0,
        };
        assert_eq!(wrapping.end(), u64::MAX);
        assert!(wrapping.contains(u64::MAX));
    }

    #[test]
    fn add_keeps_regions_sorted_and_remove_matches_exactly() {
        let ram = GuestRam::new();
        add_fake(&ram, 0x10_0000, 0x1000).unwrap();
        add_fake(&ram, 0, 0x1000).unwrap();
        add_fake(&ram, 0x1000, 0x2000).unwrap();
        let gpas: Vec<u64> = regions(&ram).iter().map(|r| r.gpa).collect();
        assert_eq!(gpas, [0, 0x1000, 0x10_0000]);

        assert!(matches!(
            ram.remove(0x1000, 0x1000),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            ram.remove(0x2000, 0x1000),
            Err(Error::NotFound { .. })
        ));
        let removed = ram.remove(0x1000, 0x2000).unwrap();
        assert_eq!(
            removed,
            RamRegion {
                gpa: 0x1000,
                size: 0x2000,
                hva: FAKE_HVA + 0x1000
            }
        );
        assert_eq!(regions(&ram).len(), 2);
        ram.remove(0, 0x1000).unwrap();
        ram.remove(0x10_0000, 0x1000).unwrap();
        assert!(regions(&ram).is_empty());
        // The hole can be filled again.
        add_fake(&ram, 0, 0x3000).unwrap();
    }

    #[test]
    fn add_rejects_overlap() {
        let ram = GuestRam::new();
        add_fake(&ram, 0x10000, 0x4000).unwrap();
        for (gpa, size) in [
            (0x10000, 0x4000),
            (0xf000, 0x2000),
            (0x13000, 0x1000),
            (0x13000, 0x10000),
            (0x8000, 0x20000),
            (0x11000, 0x1000),
        ] {
            let err = add_fake(&ram, gpa, size).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Overlap {
                        other_gpa: 0x10000,
                        ..
                    }
                ),
                "{err}"
            );
        }
        // Touching is not overlapping.
        add_fake(&ram, 0xf000, 0x1000).unwrap();
        add_fake(&ram, 0x14000, 0x1000).unwrap();
        assert_eq!(regions(&ram).len(), 3);
    }

    #[test]
    fn add_rejects_invalid() {
        let ram = GuestRam::new();
        let cases: [(u64, u64, usize); 7] = [
            (0, 0, FAKE_HVA),
            (0x800, 0x1000, FAKE_HVA),
            (0, 0x1800, FAKE_HVA),
            (0, 0x1000, FAKE_HVA + 8),
            (!PAGE_MASK, 0x1000, FAKE_HVA),
            (!PAGE_MASK, 0x2000, FAKE_HVA),
            (0, 0x2000, usize::MAX & !(PAGE_MASK as usize)),
        ];
        for (gpa, size, hva) in cases {
            // SAFETY: rejected before anything could access the memory.
            let err = unsafe { ram.add(gpa, size, hva) }.unwrap_err();
            assert!(matches!(err, Error::Invalid { .. }), "{err}");
            assert!(err.to_string().contains(&format!("{gpa:#x}")));
        }
        assert!(regions(&ram).is_empty());
    }

    #[test]
    fn add_enforces_region_limit() {
        let ram = GuestRam::new();
        for i in 0..MAX_REGIONS as u64 {
            add_fake(&ram, i * 0x2000, 0x1000).unwrap();
        }
        let err = add_fake(&ram, 0x1000_0000, 0x1000).unwrap_err();
        assert!(matches!(err, Error::TooMany { limit: MAX_REGIONS }));
        // Making room lets the next one in.
        ram.remove(0, 0x1000).unwrap();
        add_fake(&ram, 0x1000_0000, 0x1000).unwrap();
    }

    fn check_lookups(ram: &GuestRam, layout_regions: &[(u64, u64)]) {
        let guard = epoch::pin();
        let layout = ram.load(&guard);
        for &(gpa, size) in layout_regions {
            let hva = FAKE_HVA + gpa as usize;
            assert_eq!(layout.find(gpa).map(|r| r.gpa), Some(gpa));
            assert_eq!(layout.find(gpa + size - 1).map(|r| r.gpa), Some(gpa));
            assert_eq!(layout.hva(gpa), Some(hva));
            assert_eq!(layout.hva(gpa + 0x123), Some(hva + 0x123));
            assert_eq!(
                layout.host_run(gpa + 0x10, u64::MAX),
                Some((hva + 0x10, size - 0x10))
            );
            assert_eq!(layout.host_run(gpa + 0x10, 0x20), Some((hva + 0x10, 0x20)));
            assert_eq!(layout.host_run(gpa, 0), Some((hva, 0)));
            // The pages around every region are holes in these layouts.
            if gpa > 0 {
                assert!(layout.find(gpa - 1).is_none());
                assert!(layout.hva(gpa - 1).is_none());
            }
            assert!(layout.find(gpa + size).is_none());
            assert!(layout.host_run(gpa + size, 1).is_none());
        }
        assert!(layout.find(u64::MAX).is_none());
        assert!(layout.host_run(u64::MAX, u64::MAX).is_none());
    }

    #[test]
    fn lookups_with_one_region() {
        let ram = GuestRam::new();
        add_fake(&ram, 0x4000, 0x8000).unwrap();
        check_lookups(&ram, &[(0x4000, 0x8000)]);
    }

    #[test]
    fn lookups_with_eight_regions() {
        let ram = GuestRam::new();
        let mut layout = Vec::new();
        // Added out of order, with holes between them, varied sizes.
        for i in [5u64, 2, 7, 0, 3, 6, 1, 4] {
            let gpa = 0x1000 + i * 0x10_0000;
            let size = (i + 1) * 0x1000;
            add_fake(&ram, gpa, size).unwrap();
            layout.push((gpa, size));
        }
        assert_eq!(regions(&ram).len(), 8);
        check_lookups(&ram, &layout);
        assert!(regions(&ram).windows(2).all(|w| w[0].end() < w[1].gpa));
    }

    #[test]
    fn contains_range_spans_adjacent_regions_not_holes() {
        let ram = GuestRam::new();
        add_fake(&ram, 0x1000, 0x1000).unwrap();
        add_fake(&ram, 0x2000, 0x2000).unwrap();
        add_fake(&ram, 0x6000, 0x1000).unwrap();
        let guard = epoch::pin();
        let layout = ram.load(&guard);
        assert!(layout.contains_range(0x1000, 0x3000));
        assert!(layout.contains_range(0x1fff, 2));
        assert!(layout.contains_range(0x3fff, 1));
        assert!(!layout.contains_range(0x3fff, 2));
        assert!(!layout.contains_range(0x1000, 0x6000));
        assert!(!layout.contains_range(0xfff, 2));
        assert!(layout.contains_range(0x6000, 0x1000));
        // Zero length: RAM iff the address is.
        assert!(layout.contains_range(0x1000, 0));
        assert!(!layout.contains_range(0x4000, 0));
        // Overflowing ends never panic and are never RAM.
        assert!(!layout.contains_range(0x1000, u64::MAX));
        assert!(!layout.contains_range(u64::MAX, 2));
        assert!(!layout.contains_range(u64::MAX, 1));
        assert!(!layout.contains_range(u64::MAX - 0xfff, 0x1000));
    }

    #[test]
    fn read_write_real_memory_across_adjacent_regions() {
        let low = HostBuf::new(2);
        let high = HostBuf::new(1);
        let ram = GuestRam::new();
        // SAFETY: both buffers are live, readable and writable for the
        // whole test and outlive `ram` (declared before it).
        unsafe {
            ram.add(0x10_0000, low.size(), low.hva()).unwrap();
            ram.add(0x10_2000, high.size(), high.hva()).unwrap();
        }
        let guard = epoch::pin();
        let layout = ram.load(&guard);

        let pattern: Vec<u8> = (0..0x200u32).map(|i| (i * 7 + 1) as u8).collect();
        // The write straddles the boundary between the two host buffers.
        let gpa = 0x10_2000 - 0x100;
        layout.write(gpa, &pattern).unwrap();
        assert_eq!(&low.bytes()[0x1f00..], &pattern[..0x100]);
        assert_eq!(&high.bytes()[..0x100], &pattern[0x100..]);

        let mut back = vec![0u8; pattern.len()];
        layout.read(gpa, &mut back).unwrap();
        assert_eq!(back, pattern);

        // The vm-memory view sees the same bytes.
        let mut via_vm_memory = vec![0u8; pattern.len()];
        layout
            .memory()
            .read_slice(&mut via_vm_memory, GuestAddress(gpa))
            .unwrap();
        assert_eq!(via_vm_memory, pattern);
        assert_eq!(layout.memory().num_regions(), 2);
        let word: u32 = layout.memory().read_obj(GuestAddress(0x10_2000)).unwrap();
        assert_eq!(word.to_le_bytes(), pattern[0x100..0x104]);
        layout
            .memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x10_0010))
            .unwrap();
        let mut four = [0u8; 4];
        layout.read(0x10_0010, &mut four).unwrap();
        assert_eq!(u32::from_le_bytes(four), 0xdead_beef);

        // Empty accesses inside RAM succeed.
        layout.read(0x10_0000, &mut []).unwrap();
        layout.write(0x10_0000, &[]).unwrap();
    }

    #[test]
    fn failed_access_touches_nothing() {
        let buf = HostBuf::new(1);
        let ram = GuestRam::new();
        // SAFETY: `buf` is live and outlives `ram`.
        unsafe { ram.add(0x2000, buf.size(), buf.hva()).unwrap() };
        let guard = epoch::pin();
        let layout = ram.load(&guard);

        // Starts in RAM, runs into the hole after it.
        let err = layout.write(0x2f00, &[0xaa; 0x200]).unwrap_err();
        assert!(matches!(
            err,
            Error::Access {
                gpa: 0x2f00,
                len: 0x200
            }
        ));
        assert!(err.to_string().contains("0x2f00"));
        assert!(buf.bytes().iter().all(|&b| b == 0));

        let mut out = [0x55u8; 0x200];
        assert!(layout.read(0x2f00, &mut out).is_err());
        assert!(out.iter().all(|&b| b == 0x55));
        // Starts in the hole before it.
        assert!(layout.read(0x1f00, &mut out).is_err());
        assert!(layout.write(0x1f00, &out).is_err());
        assert!(buf.bytes().iter().all(|&b| b == 0));
        // Near the top of the address space.
        assert!(layout.read(u64::MAX, &mut out[..1]).is_err());
        assert!(layout.read(u64::MAX - 0x10, &mut out).is_err());
        assert!(layout.write(u64::MAX - 0xfff, &out).is_err());
        assert!(layout.read(u64::MAX, &mut []).is_err());
    }

    #[test]
    fn readers_keep_their_snapshot_across_updates() {
        let ram = GuestRam::new();
        add_fake(&ram, 0, 0x1000).unwrap();
        let guard = epoch::pin();
        let before = ram.load(&guard);
        add_fake(&ram, 0x1000, 0x1000).unwrap();
        ram.remove(0, 0x1000).unwrap();
        // The old snapshot is intact while the guard is held.
        assert_eq!(before.regions().len(), 1);
        assert_eq!(before.hva(0x10), Some(FAKE_HVA + 0x10));
        let after = ram.load(&guard);
        assert_eq!(after.regions().len(), 1);
        assert!(after.find(0x10).is_none());
        assert!(after.find(0x1010).is_some());
        assert_eq!(after.memory().num_regions(), 1);
    }

    #[test]
    fn concurrent_readers_and_writer() {
        let ram = Arc::new(GuestRam::new());
        add_fake(&ram, 0, 0x1000).unwrap();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let ram = Arc::clone(&ram);
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let guard = epoch::pin();
                        let layout = ram.load(&guard);
                        // Region 0 is always there; the other comes and goes.
                        assert_eq!(layout.hva(0x10), Some(FAKE_HVA + 0x10));
                        assert!(layout.regions().len() <= 2);
                        assert_eq!(layout.memory().num_regions(), layout.regions().len());
                    }
                })
            })
            .collect();
        for _ in 0..500 {
            add_fake(&ram, 0x10_0000, 0x1000).unwrap();
            ram.remove(0x10_0000, 0x1000).unwrap();
        }
        for r in readers {
            r.join().unwrap();
        }
    }

    #[test]
    fn empty_ram_finds_nothing() {
        let ram = GuestRam::default();
        let guard = epoch::pin();
        let layout = ram.load(&guard);
        assert!(layout.find(0).is_none());
        assert!(layout.host_run(0, 1).is_none());
        assert!(!layout.contains_range(0, 1));
        assert!(layout.read(0, &mut [0u8; 1]).is_err());
        assert_eq!(layout.memory().num_regions(), 0);
        assert!(matches!(ram.remove(0, 0x1000), Err(Error::NotFound { .. })));
        assert!(format!("{ram:?}").contains("GuestRam"));
    }
}
