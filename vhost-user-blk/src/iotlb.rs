// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device IOTLB: vhost-user `IOTLB_MSG` updates and invalidations fed
//! into a pvdma [`Domain`], whose lock-free table every access of the rings
//! and buffers then walks (through pvdma's `IovaSpace`).
//!
//! Rules (each refusal is a non-zero ack and changes nothing):
//!
//! - An update must be page-aligned in IOVA, size and user address (the
//!   table is page-granular: an unaligned update would grant the rest of
//!   its pages), lie entirely in one memory-table region, and end below
//!   `2^iova_bits` (and inside the window, in window mode).
//! - An update equal to an entry we hold is a no-op (QEMU answers every
//!   miss, so the same translation can come twice). An update that
//!   overlaps entries otherwise replaces them: they are invalidated first
//!   (newest wins; removing a translation is always safe).
//! - An invalidation removes every entry that overlaps its range, whole
//!   (as the kernel's vhost does). Invalidating what was never mapped is
//!   fine and removes nothing. Size 0 means "to the end of the space".
//! - At most `capacity` entries are held (`max_entries`, and in window
//!   mode a share of the kernel's `vm.max_map_count`, see
//!   [`window_entry_limit`]). An update that finds the IOTLB full evicts
//!   the entries updated least recently (a batch, with one quiesce):
//!   evicting is always safe, a later access misses and QEMU sends the
//!   translation again. Every check comes before anything is removed, so
//!   a refused update changes nothing; only a failing system call after
//!   the checks (the window's `mmap`) leaves the entries it replaced or
//!   evicted removed, which is safe too.
//! - A removal that cannot take the range out of the window again (the
//!   `PROT_NONE` remap and `mprotect` both fail) is reported as an error,
//!   so the invalidation is refused; the table has dropped the entry
//!   before, so no access is made through it either way.
//!
//! Ordering: the entries leave the table (which stores the domain's new
//! generation with Release) before `quiesce` runs, and the caller's
//! `quiesce` waits until no access that might have translated through
//! them is still running; only then is the window unmapped and the
//! message acked. So once QEMU has the ack, no translation can start that
//! reaches the removed range, and none that started earlier is still
//! touching it.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use pvdma::{
    Domain, IovaChoice, Perm, PinMode, PinTable, RamLayout, MAX_IOVA_BITS, PAGE_MASK, PAGE_SHIFT,
};

use crate::mem::MemTable;

/// Why an update was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// IOVA, size or user address not page-aligned.
    #[error("IOTLB update {iova:#x}+{size:#x} -> {uaddr:#x} is not page-aligned")]
    Unaligned {
        /// IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
        /// User address.
        uaddr: u64,
    },
    /// The user range is not inside one region of the memory table.
    #[error("IOTLB update to user address {uaddr:#x}+{size:#x} is outside the memory table")]
    NotInMemory {
        /// User address.
        uaddr: u64,
        /// Bytes.
        size: u64,
    },
    /// The IOVA range ends past the space we translate.
    #[error("IOTLB update {iova:#x}+{size:#x} ends past the IOVA limit {limit:#x}")]
    OutOfRange {
        /// IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
        /// First IOVA not accepted.
        limit: u64,
    },
    /// A removed range could not be made inaccessible in the window.
    #[error("window: revoking IOVA {iova:#x}+{len:#x}: {source}")]
    Revoke {
        /// IOVA.
        iova: u64,
        /// Bytes.
        len: u64,
        /// errno.
        source: std::io::Error,
    },
    /// pvdma refused the mapping.
    #[error("pvdma: {0}")]
    Domain(#[from] pvdma::DomainError),
    /// The window mapping failed.
    #[error("window mmap at IOVA {iova:#x}: {source}")]
    Window {
        /// IOVA.
        iova: u64,
        /// errno.
        source: std::io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One translation we hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// One past the last IOVA.
    pub end: u64,
    /// User address of the first byte.
    pub uaddr: u64,
    /// Permissions.
    pub perm: Perm,
}

/// What an update did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Updated {
    /// A new entry.
    Added,
    /// The same entry was there already.
    Duplicate,
    /// Added after removing this many overlapping entries.
    Replaced(usize),
}

/// The contiguous IOVA window of the kvmtool sketch: a reserved range of
/// our address space where each update's fragment of the guest-memory fd
/// is mapped at `base + iova`, so a buffer contiguous in IOVA space is one
/// plain slice.
#[derive(Debug)]
pub struct Window {
    base: usize,
    size: u64,
}

impl Window {
    /// Reserves `size` bytes (no memory, no swap: PROT_NONE, NORESERVE).
    pub fn reserve(size: u64) -> std::io::Result<Window> {
        let len =
            usize::try_from(size).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh anonymous inaccessible mapping where the kernel
        // chooses; nothing aliases it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Window {
            base: p as usize,
            size,
        })
    }

    /// Host address of `iova` (valid to access only where an entry maps it
    /// with the permission needed, checked in the table first).
    #[inline]
    pub fn host(&self, iova: u64) -> usize {
        self.base + iova as usize
    }

    /// Bytes reserved.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn map(
        &self,
        iova: u64,
        len: u64,
        perm: Perm,
        fd: &impl AsRawFd,
        offset: u64,
    ) -> std::io::Result<()> {
        debug_assert!(iova + len <= self.size);
        let mut prot = 0;
        if perm.contains(Perm::READ) {
            prot |= libc::PROT_READ;
        }
        if perm.contains(Perm::WRITE) {
            prot |= libc::PROT_WRITE;
        }
        // SAFETY: [base + iova, + len) lies in our reservation (checked by
        // the caller against `size`), so MAP_FIXED replaces only our own
        // pages there, which no entry maps (the caller removed overlaps).
        let p = unsafe {
            libc::mmap(
                (self.base + iova as usize) as *mut libc::c_void,
                len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes `[iova, +len)` inaccessible again. The reservation's own
    /// kind of mapping first (so it merges back into one mapping); if
    /// that fails (the kernel's map limit, memory), `mprotect` of what is
    /// there; `Err` only when both fail.
    fn unmap(&self, iova: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: as in `map`; the range goes back to reserved PROT_NONE.
        // The caller quiesced every access that could reach it.
        let p = unsafe {
            libc::mmap(
                (self.base + iova as usize) as *mut libc::c_void,
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return Ok(());
        }
        let remap = std::io::Error::last_os_error();
        // SAFETY: inside our reservation, as above; only the protection of
        // pages we mapped changes.
        let r = unsafe {
            libc::mprotect(
                (self.base + iova as usize) as *mut libc::c_void,
                len as usize,
                libc::PROT_NONE,
            )
        };
        if r == 0 {
            log::warn!("window: IOVA {iova:#x}+{len:#x}: remap failed ({remap}), mprotect'ed");
            return Ok(());
        }
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: our reservation; no access can be running once the
        // device that owns the window is dropped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
    }
}

/// Mappings of the process left to everything else than the window.
const MAP_HEADROOM: usize = 4096;

/// Most entries a window may hold so that the process stays well inside
/// the kernel's `vm.max_map_count` (65,530 by default, read at start): an
/// entry is at most two mappings (its own, and the piece of the
/// reservation after it), and revoking part of a mapping the kernel
/// merged splits it, which needs two more for a moment. A quarter of the
/// limit, less some headroom, keeps every revocation possible.
pub fn window_entry_limit() -> usize {
    let max = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(65530);
    (max.saturating_sub(MAP_HEADROOM) / 4).max(1)
}

/// An entry and when it was last updated.
#[derive(Clone, Copy, Debug)]
struct Held {
    entry: Entry,
    age: u64,
}

/// The device's IOTLB: entries, the pvdma domain they are published in,
/// and the window in window mode. Written by the frontend-socket thread
/// only; read lock-free (the domain's table) by the queue thread.
pub struct DeviceIotlb {
    domain: Arc<Domain>,
    pins: PinTable,
    entries: BTreeMap<u64, Held>,
    /// Entries by the age of their last update (age -> IOVA), oldest first.
    ages: BTreeMap<u64, u64>,
    next_age: u64,
    evicted: u64,
    window: Option<Arc<Window>>,
    capacity: usize,
    limit: u64,
}

impl std::fmt::Debug for DeviceIotlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIotlb")
            .field("entries", &self.entries.len())
            .field("capacity", &self.capacity)
            .field("window", &self.window)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl DeviceIotlb {
    /// An empty IOTLB holding at most `max_entries` entries (fewer in
    /// window mode, see [`window_entry_limit`]); `window`: the window
    /// mode's reservation.
    pub fn new(window: Option<Arc<Window>>, max_entries: usize) -> DeviceIotlb {
        let mut capacity = max_entries.max(1);
        if window.is_some() {
            capacity = capacity.min(window_entry_limit());
        }
        let limit = window
            .as_ref()
            .map_or(1u64 << MAX_IOVA_BITS, |w| w.size.min(1 << MAX_IOVA_BITS));
        DeviceIotlb {
            domain: Arc::new(Domain::new(MAX_IOVA_BITS)),
            // The frontend's memory is ours only while it says so: nothing
            // to pin, and no quota beyond `max_entries`.
            pins: PinTable::new(u64::MAX, PinMode::None),
            entries: BTreeMap::new(),
            ages: BTreeMap::new(),
            next_age: 0,
            evicted: 0,
            window,
            capacity,
            limit,
        }
    }

    /// The domain the queue thread translates through.
    pub fn domain(&self) -> &Arc<Domain> {
        &self.domain
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry starting at `iova`, if any.
    pub fn entry(&self, iova: u64) -> Option<&Entry> {
        self.entries.get(&iova).map(|h| &h.entry)
    }

    /// Most entries held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries evicted so far to make room.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Marks `iova`'s entry as updated now.
    fn touch(&mut self, iova: u64) {
        let age = self.next_age;
        self.next_age += 1;
        if let Some(h) = self.entries.get_mut(&iova) {
            self.ages.remove(&h.age);
            h.age = age;
            self.ages.insert(age, iova);
        }
    }

    /// Starts of the entries overlapping `[iova, last]`.
    fn overlapping(&self, iova: u64, last: u64) -> Vec<u64> {
        self.entries
            .range(..=last)
            .rev()
            .take_while(|(_, h)| h.entry.end > iova)
            .map(|(&s, _)| s)
            .collect()
    }

    /// Adds `[iova, iova + size)` -> `uaddr` with `perm`. `quiesce` is
    /// called (before the mapping is added) when overlapping entries were
    /// removed; see the module doc.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        mem: &MemTable,
        ram: &RamLayout,
        iova: u64,
        size: u64,
        uaddr: u64,
        perm: Perm,
        quiesce: &mut dyn FnMut(),
    ) -> Result<Updated> {
        if (iova | size | uaddr) & PAGE_MASK != 0 {
            return Err(Error::Unaligned { iova, size, uaddr });
        }
        let end = iova
            .checked_add(size)
            .filter(|&e| e <= self.limit)
            .ok_or(Error::OutOfRange {
                iova,
                size,
                limit: self.limit,
            })?;
        let (region, gpa) = mem
            .resolve(uaddr, size)
            .ok_or(Error::NotInMemory { uaddr, size })?;
        let entry = Entry { end, uaddr, perm };
        if self.entry(iova) == Some(&entry) {
            self.touch(iova);
            return Ok(Updated::Duplicate);
        }
        let mut victims = self.overlapping(iova, end - 1);
        let replaced = victims.len();
        let kept = self.entries.len() - replaced;
        if kept >= self.capacity {
            // Full: evict the entries updated least recently, a sixteenth
            // of the capacity at once so that one quiesce serves many
            // updates.
            let n = (kept + 1 - self.capacity).max(self.capacity / 16).min(kept);
            let oldest: Vec<u64> = self
                .ages
                .values()
                .copied()
                .filter(|s| !victims.contains(s))
                .take(n)
                .collect();
            self.evicted += oldest.len() as u64;
            victims.extend(oldest);
        }
        self.remove(ram, &victims, quiesce)?;
        if let Some(w) = &self.window {
            w.map(
                iova,
                size,
                perm,
                &region.fd,
                region.offset + (uaddr - region.uaddr),
            )
            .map_err(|source| Error::Window { iova, source })?;
        }
        if let Err(e) = self.domain.map(
            vec![(gpa, size)],
            perm,
            IovaChoice::Fixed(iova),
            ram,
            &self.pins,
            &mut |_| {},
        ) {
            if let Some(w) = &self.window {
                w.unmap(iova, size).map_err(|source| Error::Revoke {
                    iova,
                    len: size,
                    source,
                })?;
            }
            return Err(e.into());
        }
        self.entries.insert(iova, Held { entry, age: 0 });
        self.touch(iova);
        Ok(if replaced == 0 {
            Updated::Added
        } else {
            Updated::Replaced(replaced)
        })
    }

    /// Removes every entry overlapping `[iova, iova + size)` (size 0: to
    /// the end of the space) and returns how many. `quiesce` runs after
    /// the table no longer holds them and before the window drops them.
    /// `Err` only when the window could not revoke a range (the entries
    /// are gone from the table all the same).
    pub fn invalidate(
        &mut self,
        ram: &RamLayout,
        iova: u64,
        size: u64,
        quiesce: &mut dyn FnMut(),
    ) -> Result<usize> {
        // Inclusive last byte; saturates for "to the end".
        let last = if size == 0 {
            u64::MAX
        } else {
            iova.saturating_add(size - 1)
        };
        let victims = self.overlapping(iova, last);
        self.remove(ram, &victims, quiesce)?;
        Ok(victims.len())
    }

    /// Removes the entries starting at `starts`: out of the table, then
    /// `quiesce`, then out of the window (all of them even when one
    /// revocation fails; the first failure is returned).
    fn remove(&mut self, ram: &RamLayout, starts: &[u64], quiesce: &mut dyn FnMut()) -> Result<()> {
        if starts.is_empty() {
            return Ok(());
        }
        // Entries are disjoint: spans sorted by first page and disjoint.
        let mut spans: Vec<(u64, u64)> = starts
            .iter()
            .filter_map(|s| self.entries.get(s).map(|h| (*s, h.entry.end)))
            .map(|(s, end)| (s >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT))
            .collect();
        spans.sort_unstable();
        if let Err(e) = self
            .domain
            .unmap_spans(&spans, ram, &self.pins, &mut |_| {})
        {
            // Every span holds exactly one mapping we made: cannot happen.
            log::error!(
                "IOTLB removal of {} entries: pvdma refused: {e}",
                spans.len()
            );
        }
        quiesce();
        let mut failed = None;
        for s in starts {
            let Some(h) = self.entries.remove(s) else {
                continue;
            };
            self.ages.remove(&h.age);
            if let Some(w) = &self.window {
                if let Err(source) = w.unmap(*s, h.entry.end - s) {
                    log::error!("window: revoking IOVA {s:#x}: {source}");
                    failed.get_or_insert(Error::Revoke {
                        iova: *s,
                        len: h.entry.end - s,
                        source,
                    });
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Removes everything (memory table change, reset, disconnect).
    pub fn clear(&mut self, ram: &RamLayout, quiesce: &mut dyn FnMut()) -> Result<usize> {
        self.invalidate(ram, 0, 0, quiesce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::tests::memfd;
    use pvdma::{epoch, Access, Fragment, FragmentSink, GuestRam, IovaSpace};
    use vhost::vhost_user::message::VhostUserMemoryRegion;
    use vm_memory::{Bytes, GuestAddress};

    const UADDR: u64 = 0x7f00_0000_0000;
    const GPA: u64 = 0x10_0000;
    const RAM: u64 = 0x10_0000;

    struct Fixture {
        mem: MemTable,
        ram: GuestRam,
    }

    fn fixture() -> Fixture {
        let mem = MemTable::new(
            &[VhostUserMemoryRegion::new(GPA, RAM, UADDR, 0)],
            vec![memfd(RAM)],
        )
        .unwrap();
        let ram = GuestRam::new();
        mem.publish(&ram).unwrap();
        // distinct contents per page
        for p in 0..RAM / 0x1000 {
            // SAFETY: inside our own test mapping.
            unsafe { *((mem.regions()[0].host + (p * 0x1000) as usize) as *mut u8) = p as u8 };
        }
        Fixture { mem, ram }
    }

    impl Fixture {
        fn update(
            &self,
            tlb: &mut DeviceIotlb,
            iova: u64,
            size: u64,
            uaddr: u64,
            perm: Perm,
        ) -> Result<Updated> {
            let g = epoch::pin();
            let mut q = 0;
            let r = tlb.update(
                &self.mem,
                self.ram.load(&g),
                iova,
                size,
                uaddr,
                perm,
                &mut || q += 1,
            );
            r
        }

        fn invalidate(&self, tlb: &mut DeviceIotlb, iova: u64, size: u64) -> (usize, u32) {
            let g = epoch::pin();
            let mut quiesced = 0;
            let n = tlb
                .invalidate(self.ram.load(&g), iova, size, &mut || quiesced += 1)
                .unwrap();
            (n, quiesced)
        }

        /// First byte read through pvdma at `iova`, if the table allows
        /// `access`.
        fn read(&self, tlb: &DeviceIotlb, iova: u64, need: Perm) -> Option<u8> {
            let g = epoch::pin();
            let space = IovaSpace::new(Some(tlb.domain()), self.ram.load(&g), &g);
            let mut frag = [Fragment {
                hva: 0,
                gpa: 0,
                len: 0,
            }; 1];
            space
                .translate(iova, 1, need, &mut FragmentSink::new(&mut frag))
                .ok()?;
            let mut b = [0u8];
            space.read_slice(&mut b, GuestAddress(iova)).ok()?;
            Some(b[0])
        }
    }

    #[test]
    fn updates_translate_and_invalidations_remove() {
        let f = fixture();
        let mut tlb = DeviceIotlb::new(None, 16);
        assert_eq!(
            f.update(&mut tlb, 0x4000_0000, 0x2000, UADDR + 0x5000, Perm::RW)
                .unwrap(),
            Updated::Added
        );
        assert_eq!(f.read(&tlb, 0x4000_0000, Perm::READ), Some(5));
        assert_eq!(f.read(&tlb, 0x4000_1000, Perm::WRITE), Some(6));
        assert_eq!(f.read(&tlb, 0x4000_2000, Perm::READ), None);
        // invalidating one byte of it removes the whole entry, quiesced once
        assert_eq!(f.invalidate(&mut tlb, 0x4000_1fff, 1), (1, 1));
        assert_eq!(f.read(&tlb, 0x4000_0000, Perm::READ), None);
        assert!(tlb.is_empty());
    }

    #[test]
    fn permissions_are_enforced() {
        let f = fixture();
        let mut tlb = DeviceIotlb::new(None, 16);
        f.update(&mut tlb, 0x1000, 0x1000, UADDR, Perm::READ)
            .unwrap();
        f.update(&mut tlb, 0x2000, 0x1000, UADDR, Perm::WRITE)
            .unwrap();
        assert_eq!(f.read(&tlb, 0x1000, Perm::READ), Some(0));
        assert_eq!(f.read(&tlb, 0x1000, Perm::WRITE), None);
        assert_eq!(f.read(&tlb, 0x2000, Perm::READ), None);
        let g = epoch::pin();
        let space = IovaSpace::new(Some(tlb.domain()), f.ram.load(&g), &g);
        assert!(space.write_slice(&[1], GuestAddress(0x1000)).is_err());
        assert!(space.write_slice(&[1], GuestAddress(0x2000)).is_ok());
        let _ = Access::Read;
    }

    #[test]
    fn duplicates_are_noops_and_overlaps_replace() {
        let f = fixture();
        let mut tlb = DeviceIotlb::new(None, 16);
        f.update(&mut tlb, 0x10000, 0x3000, UADDR, Perm::RW)
            .unwrap();
        assert_eq!(
            f.update(&mut tlb, 0x10000, 0x3000, UADDR, Perm::RW)
                .unwrap(),
            Updated::Duplicate
        );
        // same IOVA, other permission: replaces
        assert_eq!(
            f.update(&mut tlb, 0x10000, 0x3000, UADDR, Perm::READ)
                .unwrap(),
            Updated::Replaced(1)
        );
        assert_eq!(f.read(&tlb, 0x10000, Perm::WRITE), None);
        // straddling two entries replaces both
        f.update(&mut tlb, 0x13000, 0x1000, UADDR + 0x9000, Perm::RW)
            .unwrap();
        assert_eq!(
            f.update(&mut tlb, 0x12000, 0x2000, UADDR + 0x20000, Perm::RW)
                .unwrap(),
            Updated::Replaced(2)
        );
        assert_eq!(f.read(&tlb, 0x10000, Perm::READ), None);
        assert_eq!(f.read(&tlb, 0x13000, Perm::READ), Some(0x21));
        assert_eq!(tlb.len(), 1);
    }

    #[test]
    fn hostile_updates_change_nothing() {
        let f = fixture();
        let mut tlb = DeviceIotlb::new(None, 2);
        f.update(&mut tlb, 0x1000, 0x1000, UADDR, Perm::RW).unwrap();
        let gen = tlb.domain().generation();
        for (iova, size, uaddr) in [
            (0x2001, 0x1000, UADDR),                // unaligned IOVA
            (0x2000, 0x800, UADDR),                 // unaligned size
            (0x2000, 0x1000, UADDR + 8),            // unaligned user address
            (0x2000, 0x1000, UADDR - 0x1000),       // before the region
            (0x2000, 0x2000, UADDR + RAM - 0x1000), // runs off its end
            (0x2000, 0x1000, 0),                    // not guest memory at all
            (1 << MAX_IOVA_BITS, 0x1000, UADDR),    // past the IOVA space
            (!0xfffu64, 0x1000, UADDR),             // ends at 2^64
        ] {
            assert!(
                f.update(&mut tlb, iova, size, uaddr, Perm::RW).is_err(),
                "{iova:#x}+{size:#x}->{uaddr:#x}"
            );
        }
        assert_eq!(
            tlb.domain().generation(),
            gen,
            "a refused update removed something"
        );
        assert_eq!(tlb.len(), 1);
    }

    #[test]
    fn invalidations_of_nothing_and_to_the_end() {
        let f = fixture();
        let mut tlb = DeviceIotlb::new(None, 16);
        // never mapped: nothing removed, no quiesce, no generation change
        let gen = tlb.domain().generation();
        assert_eq!(f.invalidate(&mut tlb, 0x1000, 0x1000), (0, 0));
        assert_eq!(f.invalidate(&mut tlb, u64::MAX, 1), (0, 0));
        assert_eq!(tlb.domain().generation(), gen);
        for i in 0..4u64 {
            f.update(&mut tlb, 0x10000 + i * 0x10000, 0x1000, UADDR, Perm::RW)
                .unwrap();
        }
        // adjacent but not overlapping: untouched
        assert_eq!(f.invalidate(&mut tlb, 0x11000, 0xf000), (0, 0));
        assert_eq!(f.invalidate(&mut tlb, 0x0, 0x10000), (0, 0));
        // size 0 from 0x30000: to the end of the space
        assert_eq!(f.invalidate(&mut tlb, 0x30000, 0), (2, 1));
        assert_ne!(tlb.domain().generation(), gen);
        assert_eq!(f.read(&tlb, 0x10000, Perm::READ), Some(0));
        assert_eq!(f.read(&tlb, 0x40000, Perm::READ), None);
        // the whole space (QEMU's addr_mask ~0 + 1 == 0)
        assert_eq!(f.invalidate(&mut tlb, 0, 0), (2, 1));
        assert!(tlb.is_empty());
    }

    #[test]
    fn window_maps_fragments_contiguously() {
        let f = fixture();
        let w = Arc::new(Window::reserve(1 << 30).unwrap());
        let mut tlb = DeviceIotlb::new(Some(w.clone()), 16);
        // two IOVA-adjacent pages from scattered guest pages
        f.update(&mut tlb, 0x20000, 0x1000, UADDR + 0x7000, Perm::RW)
            .unwrap();
        f.update(&mut tlb, 0x21000, 0x1000, UADDR + 0x3000, Perm::READ)
            .unwrap();
        // SAFETY: both pages are mapped in the window (just updated).
        let (a, b) = unsafe {
            (
                *(w.host(0x20000) as *const u8),
                *(w.host(0x21000) as *const u8),
            )
        };
        assert_eq!((a, b), (7, 3));
        // a write through the window reaches guest memory
        // SAFETY: mapped read-write just above.
        unsafe { *(w.host(0x20001) as *mut u8) = 0xab };
        // SAFETY: the test's own mapping of the region.
        let seen = unsafe { *((f.mem.regions()[0].host + 0x7001) as *const u8) };
        assert_eq!(seen, 0xab);
        // beyond the window: refused
        assert!(matches!(
            f.update(&mut tlb, 1 << 30, 0x1000, UADDR, Perm::RW),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(f.invalidate(&mut tlb, 0x20000, 0x2000), (2, 1));
        // the pages are PROT_NONE again: mincore says the range is mapped
        // but the table no longer has them
        assert_eq!(f.read(&tlb, 0x20000, Perm::READ), None);
    }

    /// Mappings (lines of /proc/self/maps) inside `w`'s reservation.
    fn window_maps(w: &Window) -> usize {
        let (lo, hi) = (w.host(0), w.host(0) + w.size() as usize);
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| {
                let (range, _) = l.split_once(' ').unwrap();
                let (a, b) = range.split_once('-').unwrap();
                let a = usize::from_str_radix(a, 16).unwrap();
                let b = usize::from_str_radix(b, 16).unwrap();
                a < hi && lo < b
            })
            .count()
    }

    fn max_map_count() -> usize {
        std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_full_iotlb_evicts_the_least_recently_updated() {
        let f = fixture();
        let mut tlb = DeviceIotlb::new(None, 4);
        for i in 0..10u64 {
            f.update(&mut tlb, i << 16, 0x1000, UADDR + (i << 12), Perm::RW)
                .unwrap_or_else(|e| panic!("update {i} refused: {e}"));
            // the entry at 0 is refreshed by QEMU answering a miss again
            f.update(&mut tlb, 0, 0x1000, UADDR, Perm::RW).unwrap();
            assert!(tlb.len() <= 4);
        }
        assert_eq!(f.read(&tlb, 9 << 16, Perm::READ), Some(9));
        assert_eq!(f.read(&tlb, 0, Perm::READ), Some(0), "refreshed, kept");
        assert_eq!(f.read(&tlb, 1 << 16, Perm::READ), None, "the oldest goes");
        // at capacity, an update that replaces an entry evicts nothing else
        let len = tlb.len();
        let before: Vec<u64> = (0..10u64)
            .filter(|&i| f.read(&tlb, i << 16, Perm::READ).is_some())
            .collect();
        assert_eq!(
            f.update(&mut tlb, 9 << 16, 0x1000, UADDR + 0x5000, Perm::READ)
                .unwrap(),
            Updated::Replaced(1)
        );
        let after: Vec<u64> = (0..10u64)
            .filter(|&i| f.read(&tlb, i << 16, Perm::READ).is_some())
            .collect();
        assert_eq!((tlb.len(), after), (len, before));
        assert_eq!(f.read(&tlb, 9 << 16, Perm::READ), Some(5));
    }

    /// At the kernel's limit: more disjoint updates than the process has
    /// mappings for (each one its own mapping, each leaving a piece of the
    /// reservation between it and the next). All are accepted, the window
    /// never holds more than a bounded number of mappings, and an
    /// invalidation of everything merges the reservation back into one.
    #[test]
    fn window_mappings_stay_bounded_at_the_map_limit() {
        let f = fixture();
        let updates = max_map_count() as u64 * 2 / 3;
        let w = Arc::new(Window::reserve((updates + 1) << 13).unwrap());
        let mut tlb = DeviceIotlb::new(Some(w.clone()), 1 << 20);
        let mut most = 0;
        for i in 0..updates {
            let page = i % (RAM >> 12);
            f.update(&mut tlb, i << 13, 0x1000, UADDR + (page << 12), Perm::RW)
                .unwrap_or_else(|e| panic!("update {i} of {updates} refused: {e}"));
            if i % 4096 == 0 {
                most = most.max(window_maps(&w));
            }
        }
        most = most.max(window_maps(&w));
        assert!(
            most <= 2 * tlb.capacity() + 1 && most < max_map_count() / 2,
            "{most} mappings in the window"
        );
        let last = updates - 1;
        assert_eq!(
            f.read(&tlb, last << 13, Perm::READ),
            Some((last % (RAM >> 12)) as u8)
        );
        // SAFETY: the last update is mapped in the window.
        let b = unsafe { *(w.host(last << 13) as *const u8) };
        assert_eq!(b, (last % (RAM >> 12)) as u8);
        f.invalidate(&mut tlb, 0, 0);
        assert_eq!(window_maps(&w), 1);
    }
}
