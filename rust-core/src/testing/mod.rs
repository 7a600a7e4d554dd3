// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared by the tests, benchmarks and fuzz targets (feature `test-utils`;
//! always built for the crate's own unit tests), never by the library:
//! guest memory registered as a VM's RAM ([`GuestMem`]), request builders
//! ([`req`], [`map_req`], [`unmap_req`], ...), and the fuzz harnesses
//! ([`fuzz`]).

pub mod fuzz;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::abi::{Op, PVDMA_FLAG_FIXED};
use crate::types::Perm;
use crate::vm::{Request, Vm};

/// Host memory standing in for a guest's RAM: `regions` of
/// (guest-physical address, size), anonymous mappings owned by this value.
pub struct GuestMem {
    /// The memory, for reading and writing guest RAM.
    pub mem: GuestMemoryMmap<()>,
    regions: Vec<(u64, u64)>,
}

impl GuestMem {
    /// Allocates `regions` (guest-physical address, size in bytes).
    ///
    /// # Panics
    /// When a region cannot be allocated or regions overlap.
    pub fn new(regions: &[(u64, u64)]) -> GuestMem {
        let ranges: Vec<_> = regions
            .iter()
            .map(|&(gpa, size)| (GuestAddress(gpa), size as usize))
            .collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("allocating guest RAM");
        GuestMem {
            mem,
            regions: regions.to_vec(),
        }
    }

    /// The regions (guest-physical address, size).
    pub fn regions(&self) -> &[(u64, u64)] {
        &self.regions
    }

    /// The host address of guest-physical `gpa`.
    ///
    /// # Panics
    /// When `gpa` is not in a region.
    pub fn hva(&self, gpa: u64) -> usize {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("gpa in guest RAM") as usize
    }

    /// Registers every region as guest RAM of `vm`.
    ///
    /// # Safety
    /// `self` outlives every use `vm` makes of the regions: `vm` is dropped
    /// (or the regions removed from it) before `self` is.
    pub unsafe fn register(&self, vm: &Vm) {
        for &(gpa, size) in &self.regions {
            // SAFETY: the mapping is owned by `self`, which the caller
            // promises outlives `vm`'s use of it.
            unsafe { vm.add_ram_region(gpa, size, self.hva(gpa)) }.expect("adding guest RAM");
        }
    }
}

/// A request of `op` for `rid` with every other field 0 (QUERY, ATTACH,
/// DETACH as they are; the others to be filled in).
pub fn req(op: Op, rid: u32) -> Request {
    Request {
        op: op as u16,
        flags: 0,
        requester: rid,
        nr_segs: 0,
        iova: 0,
        length: 0,
        reserved: [0; 3],
        segs: Vec::new(),
    }
}

/// A MAP of `segs` (guest-physical address, length) with `flags` (perms,
/// FIXED, ...) at `iova`.
pub fn map_req(rid: u32, flags: u16, iova: u64, segs: &[(u64, u64)]) -> Request {
    Request {
        flags,
        iova,
        nr_segs: segs.len() as u32,
        segs: segs.to_vec(),
        ..req(Op::Map, rid)
    }
}

/// A FIXED MAP of `segs` at `iova` with permissions `perm`.
pub fn map_fixed(rid: u32, perm: Perm, iova: u64, segs: &[(u64, u64)]) -> Request {
    map_req(
        rid,
        perm.bits() as u16 | PVDMA_FLAG_FIXED as u16,
        iova,
        segs,
    )
}

/// An UNMAP of `[iova, iova + length)` (length 0: the mapping starting at
/// `iova`'s page).
pub fn unmap_req(rid: u32, iova: u64, length: u64) -> Request {
    Request {
        iova,
        length,
        ..req(Op::Unmap, rid)
    }
}

/// An UNMAP_LIST of `ranges` (IOVA, length).
pub fn unmap_list_req(rid: u32, ranges: &[(u64, u64)]) -> Request {
    Request {
        nr_segs: ranges.len() as u32,
        segs: ranges.to_vec(),
        ..req(Op::UnmapList, rid)
    }
}

impl std::ops::Deref for GuestMem {
    type Target = GuestMemoryMmap<()>;

    fn deref(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }
}
