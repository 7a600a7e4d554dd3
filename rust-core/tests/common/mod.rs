// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A test guest: real host memory registered as guest RAM, and helpers to
//! lay out request blocks the way a guest driver would.
#![allow(dead_code)]

use pvdma::abi::Op;
use pvdma::vm::{encode_request, Request};
use pvdma::{Status, Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Low RAM: [0, 8 MiB).
pub const LOW: (u64, u64) = (0, 8 << 20);
/// High RAM: [4 GiB, 4 GiB + 4 MiB).
pub const HIGH: (u64, u64) = (1 << 32, 4 << 20);
/// Where request blocks go.
pub const BLOCK: u64 = 0x7f_0000;

pub const EP: u32 = 0x0010; // 00:02.0
pub const EP2: u32 = 0x0018; // 00:03.0

pub struct Guest {
    pub vm: Vm,
    pub mem: GuestMemoryMmap<()>,
}

/// Live mappings, pinned pages, pin refcounts, and each endpoint's mappings.
pub type Footprint = (
    u64,
    u64,
    u64,
    Vec<(u64, u32)>,
    Vec<Vec<pvdma::domain::Mapping>>,
);

/// What the host wrote back into the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Out {
    pub status: Status,
    pub raw_status: u32,
    pub iova: u64,
    pub length: u64,
    pub result: u64,
}

impl Guest {
    pub fn new() -> Guest {
        Guest::with(VmConfig::default())
    }

    pub fn with(cfg: VmConfig) -> Guest {
        let vm = Vm::new(cfg).expect("valid config");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(LOW.0), LOW.1 as usize),
            (GuestAddress(HIGH.0), HIGH.1 as usize),
        ])
        .expect("allocating guest RAM");
        for (gpa, size) in [LOW, HIGH] {
            let hva = mem.get_host_address(GuestAddress(gpa)).unwrap() as usize;
            // SAFETY: `mem` owns the mapping and outlives `vm` (Guest drops
            // vm first: fields drop in declaration order).
            unsafe { vm.add_ram_region(gpa, size, hva).unwrap() };
        }
        vm.add_endpoint(EP, None).unwrap();
        vm.add_endpoint(EP2, Some("0000:01:00.0")).unwrap();
        Guest { vm, mem }
    }

    pub fn hva(&self, gpa: u64) -> usize {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as usize
    }

    /// Writes `req` at `at` and submits it.
    pub fn submit_at(&self, at: u64, req: &Request) -> Out {
        let bytes = encode_request(req);
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        // A marker the host must overwrite on success only.
        self.mem
            .write_obj(0xdead_beef_u64, GuestAddress(at + 32))
            .unwrap();
        let ret = self.vm.submit(at);
        let raw_status: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        let out = Out {
            status: ret,
            raw_status,
            iova: self.mem.read_obj(GuestAddress(at + 16)).unwrap(),
            length: self.mem.read_obj(GuestAddress(at + 24)).unwrap(),
            result: self.mem.read_obj(GuestAddress(at + 32)).unwrap(),
        };
        assert_eq!(
            out.raw_status, ret as u32,
            "written status = returned status"
        );
        out
    }

    pub fn submit(&self, req: &Request) -> Out {
        self.submit_at(BLOCK, req)
    }

    pub fn query(&self, rid: u32) -> Out {
        self.submit(&req(Op::Query, rid))
    }

    pub fn attach(&self, rid: u32) -> Status {
        self.submit(&req(Op::Attach, rid)).status
    }

    pub fn detach(&self, rid: u32) -> Out {
        self.submit(&req(Op::Detach, rid))
    }

    pub fn map(&self, rid: u32, flags: u16, iova: u64, segs: &[(u64, u64)]) -> Out {
        self.submit(&map_req(rid, flags, iova, segs))
    }

    pub fn unmap(&self, rid: u32, iova: u64, length: u64) -> Out {
        let mut r = req(Op::Unmap, rid);
        r.iova = iova;
        r.length = length;
        self.submit(&r)
    }

    /// UNMAP_LIST of `ranges` (`(iova, len)` each).
    pub fn unmap_list(&self, rid: u32, ranges: &[(u64, u64)]) -> Out {
        self.submit(&unmap_list_req(rid, ranges))
    }

    /// Everything a failed request must leave untouched.
    pub fn footprint(&self) -> Footprint {
        let s = self.vm.stats();
        (
            s.mappings,
            s.pinned_pages,
            s.mem_used,
            self.vm.pins().snapshot(),
            [EP, EP2].iter().map(|&r| self.vm.mappings(r)).collect(),
        )
    }
}

pub const R: u16 = 1;
pub const W: u16 = 2;
pub const RW: u16 = 3;
pub const FIXED: u16 = 4;

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

pub fn map_req(rid: u32, flags: u16, iova: u64, segs: &[(u64, u64)]) -> Request {
    Request {
        op: Op::Map as u16,
        flags,
        requester: rid,
        nr_segs: segs.len() as u32,
        iova,
        length: 0,
        reserved: [0; 3],
        segs: segs.to_vec(),
    }
}

pub fn unmap_list_req(rid: u32, ranges: &[(u64, u64)]) -> Request {
    Request {
        op: Op::UnmapList as u16,
        flags: 0,
        requester: rid,
        nr_segs: ranges.len() as u32,
        iova: 0,
        length: 0,
        reserved: [0; 3],
        segs: ranges.to_vec(),
    }
}
