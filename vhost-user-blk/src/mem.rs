// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory from `SET_MEM_TABLE`: each region's fd mapped once, shared,
//! and published to pvdma's [`GuestRam`] under its guest-physical address.
//! IOTLB updates name the frontend's user addresses; [`MemTable::resolve`]
//! turns one into a guest-physical address and a file offset.

use std::os::fd::{AsRawFd, OwnedFd};

use pvdma::{GuestRam, PAGE_MASK};
use vhost::vhost_user::message::VhostUserMemoryRegion;

/// Why a memory table is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// More regions than fds, or more than we accept.
    #[error("{regions} regions with {fds} descriptors (at most {max})")]
    Count {
        /// Regions in the message.
        regions: usize,
        /// Descriptors attached.
        fds: usize,
        /// Most regions accepted.
        max: usize,
    },
    /// A region is empty, unaligned or wraps.
    #[error("region at guest-physical {gpa:#x} ({size:#x} bytes, user {uaddr:#x}, offset {offset:#x}): {why}")]
    Region {
        /// Guest-physical address.
        gpa: u64,
        /// Bytes.
        size: u64,
        /// Frontend user address.
        uaddr: u64,
        /// Offset in the fd.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// Two regions overlap in user addresses.
    #[error("regions overlap at user address {0:#x}")]
    Overlap(u64),
    /// mmap failed.
    #[error("mmap of region at guest-physical {gpa:#x}: {source}")]
    Mmap {
        /// Guest-physical address.
        gpa: u64,
        /// errno.
        source: std::io::Error,
    },
    /// pvdma refused the RAM layout.
    #[error(transparent)]
    Ram(#[from] pvdma::RamError),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Most regions in one table (QEMU's `VHOST_MEMORY_BASELINE_NREGIONS`:
/// we do not offer `CONFIGURE_MEM_SLOTS`).
pub const MAX_REGIONS: usize = 8;

/// One mapped region.
#[derive(Debug)]
pub struct MemRegion {
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// The frontend's user address of its first byte.
    pub uaddr: u64,
    /// Offset of its first byte in `fd`.
    pub offset: u64,
    /// The memory's fd (the window mode maps pieces of it again).
    pub fd: OwnedFd,
    /// Where we mapped it.
    pub host: usize,
}

/// A memory table, mapped. Unmapped on drop: drop it only when no reader
/// can hold a translation into it (the device drops it with every guest
/// memory access quiesced).
#[derive(Debug, Default)]
pub struct MemTable {
    regions: Vec<MemRegion>,
}

impl MemTable {
    /// Maps `regions` (each with its fd).
    pub fn new(regions: &[VhostUserMemoryRegion], fds: Vec<OwnedFd>) -> Result<MemTable> {
        if regions.len() != fds.len() || regions.len() > MAX_REGIONS {
            return Err(Error::Count {
                regions: regions.len(),
                fds: fds.len(),
                max: MAX_REGIONS,
            });
        }
        let mut table = MemTable::default();
        for (r, fd) in regions.iter().zip(fds) {
            let bad = |why| Error::Region {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                uaddr: r.user_addr,
                offset: r.mmap_offset,
                why,
            };
            if r.memory_size == 0 {
                return Err(bad("empty"));
            }
            if (r.guest_phys_addr | r.memory_size | r.user_addr | r.mmap_offset) & PAGE_MASK != 0 {
                return Err(bad("not page-aligned"));
            }
            if r.guest_phys_addr.checked_add(r.memory_size).is_none()
                || r.user_addr.checked_add(r.memory_size).is_none()
                || r.mmap_offset.checked_add(r.memory_size).is_none()
                || usize::try_from(r.memory_size).is_err()
                || i64::try_from(r.mmap_offset).is_err()
            {
                return Err(bad("wraps"));
            }
            // A mapping past the end of a file maps, but touching it
            // raises SIGBUS: the region must lie inside the file.
            // SAFETY: `st` is plain data fstat fills in for a valid fd.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: a descriptor we own and a stat buffer of the right type.
            if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
                return Err(Error::Mmap {
                    gpa: r.guest_phys_addr,
                    source: std::io::Error::last_os_error(),
                });
            }
            if st.st_mode & libc::S_IFMT == libc::S_IFREG
                && (st.st_size as u64) < r.mmap_offset + r.memory_size
            {
                return Err(bad("past the end of its file"));
            }
            for o in &table.regions {
                if o.uaddr < r.user_addr + r.memory_size && r.user_addr < o.uaddr + o.size {
                    return Err(Error::Overlap(r.user_addr));
                }
            }
            // SAFETY: a fresh shared mapping at an address the kernel picks;
            // length and offset were checked above. Nothing aliases it yet.
            let host = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    r.memory_size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                    fd.as_raw_fd(),
                    r.mmap_offset as libc::off_t,
                )
            };
            if host == libc::MAP_FAILED {
                return Err(Error::Mmap {
                    gpa: r.guest_phys_addr,
                    source: std::io::Error::last_os_error(),
                });
            }
            table.regions.push(MemRegion {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                uaddr: r.user_addr,
                offset: r.mmap_offset,
                fd,
                host: host as usize,
            });
        }
        Ok(table)
    }

    /// The regions.
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions
    }

    /// Publishes the regions in `ram` (which must hold none of ours).
    pub fn publish(&self, ram: &GuestRam) -> Result<()> {
        for r in &self.regions {
            // SAFETY: [host, host + size) is our shared RW mapping; it stays
            // mapped until this table is dropped, which the device does
            // only after `unpublish` and with every reader quiesced.
            unsafe { ram.add(r.gpa, r.size, r.host) }?;
        }
        Ok(())
    }

    /// Removes the regions from `ram`.
    pub fn unpublish(&self, ram: &GuestRam) {
        for r in &self.regions {
            if let Err(e) = ram.remove(r.gpa, r.size) {
                log::warn!("removing RAM region {:#x}: {e}", r.gpa);
            }
        }
    }

    /// The region holding `[uaddr, uaddr + len)` entirely, and the
    /// guest-physical address of `uaddr`.
    pub fn resolve(&self, uaddr: u64, len: u64) -> Option<(&MemRegion, u64)> {
        let end = uaddr.checked_add(len)?;
        self.regions
            .iter()
            .find(|r| r.uaddr <= uaddr && end <= r.uaddr + r.size)
            .map(|r| (r, r.gpa + (uaddr - r.uaddr)))
    }
}

impl Drop for MemTable {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: our own mapping from `new`, of that size; the owner
            // guarantees nobody reads through it any more.
            unsafe { libc::munmap(r.host as *mut libc::c_void, r.size as usize) };
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A memfd of `size` bytes.
    pub(crate) fn memfd(size: u64) -> OwnedFd {
        // SAFETY: plain syscall with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"pvdma-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: memfd_create returned a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: valid fd, plain syscall.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        fd
    }

    #[test]
    fn refuses_bad_tables() {
        let r = |gpa, size, uaddr, off| VhostUserMemoryRegion::new(gpa, size, uaddr, off);
        assert!(matches!(
            MemTable::new(&[r(0, 0x1000, 0x1000, 0)], vec![]),
            Err(Error::Count { .. })
        ));
        for bad in [
            r(0, 0, 0x10000, 0),
            r(0x10, 0x1000, 0x10000, 0),
            r(0, 0x1000, 0x10000, 0x10),
            r(!0xfffu64, 0x2000, 0x10000, 0),
            r(0, 0x2000, !0xfffu64, 0),
        ] {
            assert!(matches!(
                MemTable::new(&[bad], vec![memfd(0x2000)]),
                Err(Error::Region { .. })
            ));
        }
        // past the end of its file: touching it would raise SIGBUS
        for (size, off) in [(0x3000, 0), (0x2000, 0x1000), (0x1000, 0x2000)] {
            assert!(
                matches!(
                    MemTable::new(&[r(0, size, 0x10000, off)], vec![memfd(0x2000)]),
                    Err(Error::Region { .. })
                ),
                "{size:#x} at {off:#x} of a 0x2000-byte file"
            );
        }
        assert!(MemTable::new(&[r(0, 0x1000, 0x10000, 0x1000)], vec![memfd(0x2000)]).is_ok());
        assert!(matches!(
            MemTable::new(
                &[r(0, 0x2000, 0x10000, 0), r(0x100000, 0x2000, 0x11000, 0)],
                vec![memfd(0x2000), memfd(0x2000)]
            ),
            Err(Error::Overlap(0x11000))
        ));
    }

    #[test]
    fn resolves_user_addresses() {
        let t = MemTable::new(
            &[VhostUserMemoryRegion::new(0x100000, 0x4000, 0x7f0000, 0)],
            vec![memfd(0x4000)],
        )
        .unwrap();
        let (r, gpa) = t.resolve(0x7f1000, 0x3000).unwrap();
        assert_eq!((r.gpa, gpa), (0x100000, 0x101000));
        assert!(t.resolve(0x7f1000, 0x3001).is_none());
        assert!(t.resolve(0x7ef000, 0x1000).is_none());
        assert!(t.resolve(u64::MAX, 2).is_none());
        let ram = GuestRam::new();
        t.publish(&ram).unwrap();
        t.unpublish(&ram);
    }
}
