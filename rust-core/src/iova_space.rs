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
//! (the domain's radix table under an epoch guard) and a caller may attach
//! pre-translated windows (virtqueue rings, see [`CachedWindow`]) that are
//! served without a table walk.
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
use crate::types::Perm;

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

/// Pieces an access can be split into without a second table walk. Ring
/// accesses and page-sized buffers need one or two.
const INLINE_PIECES: usize = 4;

/// One host-contiguous run of a [`CachedWindow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WindowRun {
    /// Offset of the run's first byte from the window's IOVA.
    offset: u64,
    /// Host address of the run's first byte.
    hva: usize,
    /// Length in bytes.
    len: u64,
}

/// A translated IOVA window kept across accesses: a virtqueue ring. Built
/// by [`IovaSpace::cache_window`]; valid only while the domain's generation
/// and the RAM layout are those it was built under (the owner checks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CachedWindow {
    iova: u64,
    len: u64,
    /// What every page of the window allows (the intersection).
    perms: Perm,
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

    /// Whether `[addr, addr + len)` (with `end` its checked end) lies inside
    /// the window and `need` is allowed.
    #[inline]
    fn covers(&self, addr: u64, end: u64, need: Perm) -> bool {
        addr >= self.iova && end <= self.iova + self.len && self.perms.contains(need)
    }

    /// Fills `out` with the pieces of `[addr, addr + len)`, which
    /// [`covers`](Self::covers) accepted. False when they do not fit inline.
    #[inline]
    fn fill(&self, addr: u64, len: u64, out: &mut Pieces) -> bool {
        let mut offset = addr - self.iova;
        let mut left = len;
        // Runs are sorted by offset and few (one or two for a ring).
        for run in &self.runs {
            if left == 0 {
                break;
            }
            if offset >= run.offset + run.len {
                continue;
            }
            let within = offset - run.offset;
            let n = (run.len - within).min(left);
            if !out.push(run.hva + within as usize, n) {
                return false;
            }
            offset += n;
            left -= n;
        }
        left == 0
    }
}

/// Up to [`INLINE_PIECES`] `(hva, len)` pieces, merged when contiguous.
#[derive(Clone, Copy, Debug, Default)]
struct Pieces {
    items: [(usize, u64); INLINE_PIECES],
    n: usize,
}

impl Pieces {
    /// Adds a piece; false when it neither continues the last one nor fits.
    #[inline]
    fn push(&mut self, hva: usize, len: u64) -> bool {
        if let Some(last) = self.n.checked_sub(1).map(|i| &mut self.items[i]) {
            if last.0.wrapping_add(last.1 as usize) == hva {
                last.1 += len;
                return true;
            }
        }
        match self.items.get_mut(self.n) {
            Some(slot) => {
                *slot = (hva, len);
                self.n += 1;
                true
            }
            None => false,
        }
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
    last_fault: Cell<Option<TranslateFault>>,
}

impl std::fmt::Debug for IovaSpace<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IovaSpace")
            .field("translated", &self.domain.is_some())
            .field("windows", &self.windows.len())
            .finish_non_exhaustive()
    }
}

impl<'g> IovaSpace<'g> {
    /// A view of `domain`'s translations (`None`: identity, for an
    /// unattached endpoint in bypass mode) over `ram`, both loaded under
    /// `guard` (see [`crate::vm::Vm::dma_view`]).
    pub fn new(domain: Option<&'g Domain>, ram: &'g RamLayout, guard: &'g Guard) -> Self {
        Self::with_windows(domain, ram, guard, &[])
    }

    /// As [`new`](Self::new), serving accesses that fall entirely inside
    /// one of `windows` from it instead of the table. The caller guarantees
    /// the windows were built for this domain generation and RAM layout.
    pub fn with_windows(
        domain: Option<&'g Domain>,
        ram: &'g RamLayout,
        guard: &'g Guard,
        windows: &'g [CachedWindow],
    ) -> Self {
        IovaSpace {
            domain,
            ram,
            guard,
            windows,
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

    fn fault(&self, f: TranslateFault) -> TranslateFault {
        self.last_fault.set(Some(f));
        f
    }

    /// Translates the first piece of `[iova, iova + left)`: `(hva, gpa,
    /// len)` with `0 < len <= left`, contiguous in host and guest memory.
    /// `left > 0`.
    #[inline]
    fn step(
        &self,
        iova: u64,
        left: u64,
        need: Perm,
    ) -> std::result::Result<(usize, u64, u64), TranslateFault> {
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
        Ok((hva, gpa, len))
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
        self.walk(iova, len, need, |hva, gpa, n| sink.push(hva, gpa, n))
            .map_err(|f| Error::Fault(self.fault(f)))
    }

    fn walk(
        &self,
        iova: u64,
        len: u64,
        need: Perm,
        mut f: impl FnMut(usize, u64, u64),
    ) -> std::result::Result<(), TranslateFault> {
        let end = iova.checked_add(len).ok_or(TranslateFault {
            iova,
            reason: FaultReason::Overflow,
        })?;
        let mut cur = iova;
        // Each step advances by at least one byte and at most one table
        // leaf, so the walk is bounded by the range's pages.
        while cur < end {
            let (hva, gpa, n) = self.step(cur, end - cur, need)?;
            f(hva, gpa, n);
            cur += n;
        }
        Ok(())
    }

    /// Translates `[iova, iova + len)` once, for `need`, into a window that
    /// later accesses are served from (see [`with_windows`](Self::with_windows)).
    pub fn cache_window(&self, iova: u64, len: u64, need: Perm) -> Result<CachedWindow> {
        let mut w = CachedWindow {
            iova,
            len,
            perms: Perm::RW,
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
            let (hva, _, n) = self.step(cur, end - cur, need).map_err(|f| self.fault(f))?;
            // The permissions of this leaf: look again only to intersect
            // (cheap, rings are one or two pages).
            if let Some(dom) = self.domain {
                if let Some(leaf) = dom.table().lookup(cur, self.guard) {
                    w.perms = Perm::from_bits_truncate(w.perms.bits() & leaf.perms.bits());
                }
            }
            let offset = cur - iova;
            match w.runs.last_mut() {
                Some(last) if last.hva.wrapping_add(last.len as usize) == hva => last.len += n,
                _ => w.runs.push(WindowRun {
                    offset,
                    hva,
                    len: n,
                }),
            }
            cur += n;
        }
        Ok(w)
    }

    /// Plans an access: checks all of it and keeps the first pieces.
    #[inline]
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
        let mut it = IovaSlices {
            space: self,
            pieces: Pieces::default(),
            next: 0,
            cur: end,
            left: 0,
            need,
        };
        if len == 0 {
            return Ok(it);
        }
        for w in self.windows {
            if w.covers(addr, end, need) {
                if w.fill(addr, len, &mut it.pieces) {
                    return Ok(it);
                }
                it.pieces = Pieces::default();
                break;
            }
        }
        // The whole range is checked here, so that an access either happens
        // entirely or not at all; only the first pieces are kept, the rest
        // (a buffer scattered over many pages) is walked again lazily.
        let mut resume: Option<u64> = None;
        let pieces = &mut it.pieces;
        self.walk(addr, len, need, |hva, gpa, n| {
            let _ = gpa;
            if resume.is_none() && !pieces.push(hva, n) {
                // `gpa`'s IOVA: the pieces so far cover [addr, here).
                resume = Some(pieces.items.iter().take(pieces.n).map(|p| p.1).sum::<u64>());
            }
        })?;
        if let Some(done) = resume {
            it.cur = addr + done;
            it.left = len - done;
        }
        Ok(it)
    }
}

/// The slices of one access, as [`GuestMemory::get_slices`] returns them.
pub struct IovaSlices<'a, 'g> {
    space: &'a IovaSpace<'g>,
    pieces: Pieces,
    next: usize,
    /// IOVA of the first byte after the inline pieces.
    cur: u64,
    /// Bytes after the inline pieces (walked lazily).
    left: u64,
    need: Perm,
}

impl<'a> Iterator for IovaSlices<'a, '_> {
    type Item = vm_memory::guest_memory::Result<VolatileSlice<'a, BS<'a, ()>>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let (hva, len) = if self.next < self.pieces.n {
            let p = self.pieces.items[self.next];
            self.next += 1;
            p
        } else if self.left > 0 {
            match self.space.step(self.cur, self.left, self.need) {
                Ok((hva, _, n)) => {
                    self.cur += n;
                    self.left -= n;
                    (hva, n)
                }
                Err(f) => {
                    // Only a concurrent UNMAP can get here (the range was
                    // checked whole): stop, as vm-memory requires.
                    self.left = 0;
                    self.space.fault(f);
                    return Some(Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(
                        f.iova,
                    ))));
                }
            }
        } else {
            return None;
        };
        // SAFETY: [hva, hva + len) lies inside one region of the RAM layout
        // the space borrows (host_run never crosses a region's end), which
        // the VMM keeps mapped, readable and writable while the epoch guard
        // the layout was loaded under is held (GuestRam::add's contract).
        // The slice lives for 'a, shorter than the space's 'g borrow of that
        // guard. Guest memory is only ever accessed volatilely. `len` is at
        // most the access's `count`, a usize.
        Some(Ok(unsafe {
            VolatileSlice::new(hva as *mut u8, len as usize)
        }))
    }
}

impl FusedIterator for IovaSlices<'_, '_> {}

impl<'a> GuestMemorySliceIterator<'a, BS<'a, ()>> for IovaSlices<'a, '_> {}

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

    #[inline]
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
    use crate::types::PAGE_SIZE;
    use crate::vm::{Request, Vm, VmConfig};
    use crate::Op;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const RID: u32 = 0x10;

    fn vm_with_ram() -> (Vm, GuestMemoryMmap<()>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vm = Vm::new(VmConfig::default()).unwrap();
        let hva = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        // SAFETY: `mem` owns the mapping and outlives `vm` in every test.
        unsafe { vm.add_ram_region(0, 1 << 20, hva).unwrap() };
        vm.add_endpoint(RID, None).unwrap();
        assert_eq!(vm.attach(RID), crate::Status::Ok);
        (vm, mem)
    }

    fn map(vm: &Vm, iova: u64, gpa: u64, perms: Perm) {
        let r = vm.execute(&Request {
            op: Op::Map as u16,
            flags: perms.bits() as u16 | crate::abi::PVDMA_FLAG_FIXED as u16,
            requester: RID,
            nr_segs: 1,
            iova,
            length: 0,
            reserved: [0; 3],
            segs: vec![(gpa, PAGE_SIZE)],
        });
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
        let w = IovaSpace::new(dom, ram, &guard)
            .cache_window(0x10800, 0x1000, Perm::READ)
            .unwrap();
        assert_eq!((w.run_count(), w.perms()), (2, Perm::RW));
        let windows = [w];
        let space = IovaSpace::with_windows(dom, ram, &guard, &windows);
        let v: u16 = space.read_obj(GuestAddress(0x11000)).unwrap();
        assert_eq!(v, 0xabcd);
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
