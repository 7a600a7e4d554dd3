// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared by the tests, benchmarks and fuzz targets (feature `test-utils`;
//! always built for the crate's own unit tests), never by the library:
//! guest memory registered as a VM's RAM ([`GuestMem`]), request builders
//! ([`req`], [`map_req`], [`unmap_req`], ...), and the fuzz harnesses
//! ([`fuzz`]).

pub mod fuzz;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::abi::{Op, PVDMA_FLAG_FIXED};
use crate::types::Perm;
use crate::vm::{QueueEntry, Request, Vm, QUEUE_ENTRY_SIZE};

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

/// QUEUE (op 7) setting queue `index` up with its control block at
/// `ctrl` and a ring of `ring_len` bytes at `ring`.
pub fn queue_setup_req(rid: u32, index: u64, ctrl: u64, ring: u64, ring_len: u64) -> Request {
    Request {
        iova: index,
        nr_segs: 2,
        segs: vec![(ctrl, 64), (ring, ring_len)],
        ..req(Op::Queue, rid)
    }
}

/// QUEUE (op 7) tearing queue `index` down.
pub fn queue_teardown_req(rid: u32, index: u64) -> Request {
    Request {
        iova: index,
        ..req(Op::Queue, rid)
    }
}

/// SYNC (op 8).
pub fn sync_req(rid: u32) -> Request {
    req(Op::Sync, rid)
}

/// A queued MAP entry (FIXED is implied).
pub fn map_entry(rid: u32, perm: Perm, iova: u64, gpa: u64, length: u64) -> QueueEntry {
    QueueEntry {
        op: Op::Map as u16,
        flags: perm.bits() as u16,
        requester: rid,
        iova,
        gpa,
        length,
    }
}

/// A queued UNMAP entry.
pub fn unmap_entry(rid: u32, iova: u64, length: u64) -> QueueEntry {
    QueueEntry {
        op: Op::Unmap as u16,
        flags: 0,
        requester: rid,
        iova,
        gpa: 0,
        length,
    }
}

/// A guest's side of one request queue: where its control block and ring
/// are, and the guest's own `head`. Writes go straight to guest memory,
/// as a guest driver's stores would.
#[derive(Clone, Debug)]
pub struct GuestQueue {
    /// Control block gpa.
    pub ctrl: u64,
    /// Ring gpa.
    pub ring: u64,
    /// N.
    pub entries: u32,
    /// The guest's head (entries published).
    pub head: u32,
}

impl GuestQueue {
    /// A queue whose ring of `ring_len` bytes is at `ring`, control block
    /// at `ctrl`; head starts at what the control block holds.
    pub fn new(mem: &GuestMem, ctrl: u64, ring: u64, ring_len: u64) -> GuestQueue {
        GuestQueue {
            ctrl,
            ring,
            entries: (ring_len / QUEUE_ENTRY_SIZE) as u32,
            head: mem.read_obj(GuestAddress(ctrl)).expect("ctrl in RAM"),
        }
    }

    /// Writes `e` into the slot of entry `head` without publishing it.
    pub fn write(&self, mem: &GuestMem, at: u32, e: &QueueEntry) {
        let slot = u64::from(at % self.entries) * QUEUE_ENTRY_SIZE;
        mem.write_slice(&e.encode(), GuestAddress(self.ring + slot))
            .expect("ring in RAM");
    }

    /// Writes `e` at `head` and publishes it (head + 1).
    pub fn push(&mut self, mem: &GuestMem, e: &QueueEntry) {
        self.write(mem, self.head, e);
        self.head = self.head.wrapping_add(1);
        self.publish(mem);
    }

    /// Stores `head` into the control block.
    pub fn publish(&self, mem: &GuestMem) {
        mem.write_obj(self.head, GuestAddress(self.ctrl))
            .expect("ctrl in RAM");
    }

    /// The control block's words: head, tail, failed, last_error, stopped.
    pub fn ctrl_words(&self, mem: &GuestMem) -> [u32; 5] {
        let mut w = [0u32; 5];
        for (i, v) in w.iter_mut().enumerate() {
            *v = mem
                .read_obj(GuestAddress(self.ctrl + 4 * i as u64))
                .expect("ctrl in RAM");
        }
        w
    }
}

impl std::ops::Deref for GuestMem {
    type Target = GuestMemoryMmap<()>;

    fn deref(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }
}
