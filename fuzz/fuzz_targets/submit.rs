// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzzes the request engine through its one guest entry point,
//! [`Vm::submit`].
//!
//! The input describes a VM (configuration, 1-3 small RAM regions backed by
//! host buffers this target owns) and a sequence of steps: request blocks
//! written into guest RAM at chosen (possibly unaligned or out-of-RAM)
//! addresses and submitted, device translations, RAM region removal and
//! re-adding, device reset, and migration into a fresh VM. After every step
//! the VM's observable state must be self-consistent:
//! - every translation lands inside a registered RAM region, at the host
//!   address that region gives the guest-physical address;
//! - every mapping translates in full, and lies in RAM;
//! - pin refcounts equal what the mappings of all endpoints imply;
//! - `stats().mappings`, `pinned_pages` and `mem_used` agree with the mappings
//!   and pins, and `mem_used` stays within `mem_limit`;
//! - the status written back is the status returned;
//! - a request that fails changes no mapping, pin or memory charge;
//! - an UNMAP_LIST (op 6, when the configuration offers it; INVAL or FAULT
//!   otherwise) that succeeds removes only mappings inside its ranges' pages,
//!   adds none, returns their page spans' total, and leaves none of the
//!   removed IOVAs translatable;
//! - every submitted request is counted once by op and once by transport;
//! - after reset nothing is mapped, pinned or attached.
#![no_main]

use std::alloc::{self, Layout};
use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pvdma::Mapping;
use pvdma::{encode_request, parse_header, Request};
use pvdma::{Access, Fragment, Status, Vm, VmConfig, PAGE_SIZE};

/// Every endpoint's mappings, pin refcounts, memory charged.
type Footprint = (Vec<Vec<Mapping>>, Vec<(u64, u32)>, u64);

const RIDS: [u32; 5] = [0x0010, 0x0018, 0x0100, 0x0020, 0x1_0010];
const ENDPOINTS: usize = 3;
const MAX_STEPS: usize = 48;
const MAX_SEGS_FUZZ: usize = 8;

/// Host memory standing in for a guest RAM region.
struct HostBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl HostBuf {
    fn new(size: usize) -> HostBuf {
        let layout = Layout::from_size_align(size, PAGE_SIZE as usize).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        HostBuf { ptr, layout }
    }

    fn range(&self) -> (usize, usize) {
        (self.ptr as usize, self.ptr as usize + self.layout.size())
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) };
    }
}

#[derive(Arbitrary, Debug)]
struct RegionSpec {
    /// Start right after the previous region (exercises requests and
    /// segments spanning two regions).
    adjacent: bool,
    gap_pages: u8,
    pages: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// Inside (or just past) region `region`.
    InRegion {
        region: u8,
        offset: u32,
    },
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Block {
    /// A well-formed-looking request.
    Request {
        op: u8,
        flags: u16,
        rid: u8,
        nr_segs_delta: i8,
        iova: u64,
        iova_from_mapping: Option<u8>,
        length: u64,
        reserved: Option<u64>,
        segs: Vec<(Addr, u64)>,
    },
    /// Any bytes.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Step {
    Submit {
        at: Addr,
        block: Block,
    },
    Translate {
        rid: u8,
        iova: u64,
        len: u16,
        access: u8,
    },
    RemoveRegion(u8),
    AddRegion(u8),
    Reset,
    Migrate,
}

#[derive(Arbitrary, Debug)]
struct Input {
    iova_bits: u8,
    pin_limit_pages: Option<u8>,
    bypass: bool,
    host_iova: bool,
    unmap_list_off: bool,
    regions: Vec<RegionSpec>,
    steps: Vec<Step>,
}

struct Region {
    gpa: u64,
    size: u64,
    buf: HostBuf,
    present: bool,
}

struct World {
    // Declared before `regions`: the VM goes first, then the memory.
    vm: Vm,
    cfg: VmConfig,
    regions: Vec<Region>,
}

impl World {
    fn new_vm(cfg: &VmConfig, regions: &[Region]) -> Vm {
        let vm = Vm::new(cfg.clone()).expect("valid configuration");
        for r in regions.iter().filter(|r| r.present) {
            // SAFETY: the buffer is owned by the World, which drops the VM
            // before the buffers, and is never freed while registered.
            unsafe { vm.add_ram_region(r.gpa, r.size, r.buf.ptr as usize) }.expect("region");
        }
        for &rid in &RIDS[..ENDPOINTS] {
            vm.add_endpoint(rid, (rid == 0x18).then_some("0000:02:00.0"))
                .unwrap();
        }
        vm
    }

    fn gpa_of(&self, a: Addr) -> u64 {
        match a {
            Addr::InRegion { region, offset } => {
                let r = &self.regions[region as usize % self.regions.len()];
                // Mostly inside, sometimes just past the end.
                r.gpa + u64::from(offset) % (r.size + 2 * PAGE_SIZE)
            }
            Addr::Raw(x) => x,
        }
    }

    /// The host address of a guest-physical byte, if registered RAM.
    fn host_of(&self, gpa: u64) -> Option<usize> {
        self.regions
            .iter()
            .filter(|r| r.present)
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)
            .map(|r| r.buf.ptr as usize + (gpa - r.gpa) as usize)
    }

    /// The guest writes `bytes` at `gpa`: the parts that are RAM land.
    fn guest_write(&self, gpa: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let Some(g) = gpa.checked_add(i as u64) else {
                break;
            };
            if let Some(h) = self.host_of(g) {
                // SAFETY: `h` is inside a live buffer this World owns.
                unsafe { *(h as *mut u8) = *b };
            }
        }
    }

    fn guest_read_u32(&self, gpa: u64) -> Option<u32> {
        let mut v = [0u8; 4];
        for (i, b) in v.iter_mut().enumerate() {
            // SAFETY: a live buffer this World owns.
            *b = unsafe { *(self.host_of(gpa.checked_add(i as u64)?)? as *const u8) };
        }
        Some(u32::from_le_bytes(v))
    }

    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        // Regions never overlap; a range may span adjacent ones.
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let mut cur = gpa;
        while cur < end {
            match self
                .regions
                .iter()
                .filter(|r| r.present)
                .find(|r| cur >= r.gpa && cur - r.gpa < r.size)
            {
                Some(r) => cur = r.gpa + r.size,
                None => return false,
            }
        }
        true
    }

    fn build_block(&self, block: &Block) -> Vec<u8> {
        match block {
            Block::Raw(b) => b.iter().copied().take(64 + 16 * MAX_SEGS_FUZZ).collect(),
            Block::Request {
                op,
                flags,
                rid,
                nr_segs_delta,
                iova,
                iova_from_mapping,
                length,
                reserved,
                segs,
            } => {
                let segs: Vec<(u64, u64)> = segs
                    .iter()
                    .take(MAX_SEGS_FUZZ)
                    .map(|&(a, len)| {
                        (
                            self.gpa_of(a),
                            if len >> 63 == 1 {
                                len
                            } else {
                                len % (64 * PAGE_SIZE)
                            },
                        )
                    })
                    .collect();
                let requester = RIDS[*rid as usize % RIDS.len()];
                let mapped: Vec<u64> = RIDS[..ENDPOINTS]
                    .iter()
                    .flat_map(|&r| self.vm.mappings(r))
                    .map(|m| m.iova)
                    .collect();
                // UNMAP_LIST: aim the ranges at existing mappings now and
                // then (a range's start from a mapping, its length kept).
                let segs = match iova_from_mapping {
                    Some(i) if op % 8 == 6 && !mapped.is_empty() => segs
                        .iter()
                        .enumerate()
                        .map(|(k, &(start, len))| {
                            let m = mapped[(*i as usize + k) % mapped.len()];
                            (m + (start & 0x1fff), len)
                        })
                        .collect(),
                    _ => segs,
                };
                // Aim UNMAP and FIXED MAP at existing mappings now and then.
                let iova = match iova_from_mapping {
                    Some(i) => mapped
                        .get(*i as usize % mapped.len().max(1))
                        .map_or(*iova, |m| m + (iova & 0x1fff)),
                    None => *iova,
                };
                let mut req = Request {
                    op: u16::from(*op % 8),
                    flags: *flags,
                    requester,
                    nr_segs: (segs.len() as i64 + i64::from(*nr_segs_delta % 3)).max(0) as u32,
                    iova,
                    length: *length,
                    reserved: [0; 3],
                    segs,
                };
                if let Some(r) = reserved {
                    req.reserved[(*r % 3) as usize] = *r;
                }
                encode_request(&req)
            }
        }
    }

    fn check(&self) {
        let vm = &self.vm;
        let mut pins: BTreeMap<u64, u32> = BTreeMap::new();
        let mut count = 0u64;
        for &rid in &RIDS[..ENDPOINTS] {
            for m in vm.mappings(rid) {
                count += 1;
                let mut gfns = BTreeSet::new();
                for &(gpa, len) in &m.segs {
                    assert!(
                        self.in_ram(gpa, len),
                        "rid {rid:#x} {m:?}: segment {gpa:#x}+{len:#x} not in RAM"
                    );
                    gfns.extend(gpa / PAGE_SIZE..=(gpa + len - 1) / PAGE_SIZE);
                }
                for g in gfns {
                    *pins.entry(g).or_default() += 1;
                }
                // The whole mapping translates, into the right host memory.
                let access = if m.perms.bits() & 1 != 0 {
                    Access::Read
                } else {
                    Access::Write
                };
                let mut out = [Fragment {
                    hva: 0,
                    gpa: 0,
                    len: 0,
                }; 2 * MAX_SEGS_FUZZ + 2];
                let n = vm
                    .translate(rid, m.iova, m.length, access, &mut out)
                    .unwrap_or_else(|e| panic!("rid {rid:#x} {m:?}: {e}"));
                assert!(n <= out.len(), "{m:?}: {n} fragments");
                let total: u64 = out[..n].iter().map(|f| f.len).sum();
                assert_eq!(total, m.length, "{m:?}");
                assert_eq!(out[0].gpa, m.segs[0].0, "{m:?}: first byte");
                for f in &out[..n] {
                    self.check_fragment(f);
                }
            }
        }
        let s = vm.stats();
        assert_eq!(s.mappings, count, "stats().mappings");
        let want: Vec<(u64, u32)> = pins.into_iter().collect();
        assert_eq!(vm.pins().snapshot(), want, "pin refcounts");
        assert_eq!(s.pinned_pages, want.len() as u64, "stats().pinned_pages");
        assert!(s.mem_used <= vm.config().mem_limit, "memory budget passed");
        assert_eq!(
            count == 0,
            s.mem_used == 0,
            "memory charged without mappings"
        );
    }

    /// Mappings of every endpoint, pin refcounts, memory charged.
    fn footprint(&self) -> Footprint {
        (
            RIDS[..ENDPOINTS]
                .iter()
                .map(|&r| self.vm.mappings(r))
                .collect(),
            self.vm.pins().snapshot(),
            self.vm.stats().mem_used,
        )
    }

    /// After a successful request whose block is at `at`: if it was an
    /// UNMAP_LIST, only mappings inside its ranges' pages went, none came,
    /// `result` is their page spans' total, and they no longer translate.
    fn check_unmap_list(&self, at: u64, before: &Footprint) {
        let mut hdr = [0u8; 64];
        for (i, b) in hdr.iter_mut().enumerate() {
            // SAFETY: the header is in RAM (checked by the caller).
            *b = unsafe { *(self.host_of(at + i as u64).unwrap() as *const u8) };
        }
        let req = parse_header(&hdr);
        if req.op != 6 {
            return;
        }
        assert!(self.cfg.unmap_list, "op 6 succeeded with the extension off");
        let mut ranges = Vec::new();
        for k in 0..u64::from(req.nr_segs) {
            let mut slot = [0u8; 16];
            for (i, b) in slot.iter_mut().enumerate() {
                let gpa = at + 64 + 16 * k + i as u64;
                // SAFETY: the request read these bytes from RAM.
                *b = unsafe { *(self.host_of(gpa).unwrap() as *const u8) };
            }
            let iova = u64::from_le_bytes(slot[..8].try_into().unwrap());
            let len = u64::from_le_bytes(slot[8..].try_into().unwrap());
            ranges.push((iova / PAGE_SIZE, (iova + len - 1) / PAGE_SIZE));
        }
        let result = u64::from_le_bytes(hdr[32..40].try_into().unwrap());
        let ep = RIDS[..ENDPOINTS]
            .iter()
            .position(|&r| r == req.requester)
            .expect("UNMAP_LIST succeeded for an endpoint");
        let now = self.footprint();
        let mut freed = 0;
        for (i, maps) in before.0.iter().enumerate() {
            for m in maps {
                let kept = now.0[i].contains(m);
                if i != ep {
                    assert!(kept, "UNMAP_LIST removed another endpoint's {m:?}");
                    continue;
                }
                let first = m.iova / PAGE_SIZE;
                let last = (m.iova + m.length - 1) / PAGE_SIZE;
                let inside = ranges.iter().any(|&(a, b)| a <= first && last <= b);
                assert_eq!(!kept, inside, "{m:?} vs ranges {ranges:x?}");
                if !kept {
                    freed += (last - first + 1) * PAGE_SIZE;
                    let mut out = [Fragment {
                        hva: 0,
                        gpa: 0,
                        len: 0,
                    }; 1];
                    assert!(
                        self.vm
                            .translate(req.requester, m.iova, 1, Access::Read, &mut out)
                            .is_err(),
                        "{m:?} still translates after UNMAP_LIST"
                    );
                }
            }
            assert!(now.0[i].iter().all(|m| maps.contains(m)), "mapping added");
        }
        assert!(freed > 0);
        assert_eq!(result, freed, "UNMAP_LIST result");
    }

    /// A fragment is inside one registered region, at the host address
    /// that region gives its guest-physical address.
    fn check_fragment(&self, f: &Fragment) {
        assert!(f.len > 0, "{f:?}");
        let r = self
            .regions
            .iter()
            .filter(|r| r.present)
            .find(|r| f.gpa >= r.gpa && f.gpa - r.gpa < r.size)
            .unwrap_or_else(|| panic!("{f:x?}: gpa not in RAM"));
        assert!(
            f.gpa - r.gpa + f.len <= r.size,
            "{f:x?} runs past its region"
        );
        let (lo, hi) = r.buf.range();
        assert_eq!(
            f.hva,
            lo + (f.gpa - r.gpa) as usize,
            "{f:x?}: wrong host address"
        );
        assert!(f.hva + f.len as usize <= hi);
    }

    fn step(&mut self, s: &Step) {
        match s {
            Step::Submit { at, block } => {
                let at = self.gpa_of(*at);
                let bytes = self.build_block(block);
                self.guest_write(at, &bytes);
                let header_in_ram = self.in_ram(at, 64);
                // Make sure the status word is not already the answer.
                if header_in_ram {
                    self.guest_write(at + 4, &0xffff_fff0u32.to_le_bytes());
                }
                let before = self.footprint();
                let counted = self.vm.stats().transports.iter().sum::<u64>();
                let status = self.vm.submit(at);
                if header_in_ram {
                    assert_eq!(
                        self.guest_read_u32(at + 4),
                        Some(status as u32),
                        "status written back"
                    );
                }
                let s = self.vm.stats();
                assert_eq!(s.transports.iter().sum::<u64>(), counted + 1);
                assert_eq!(
                    s.requests.iter().flatten().sum::<u64>(),
                    counted + 1,
                    "each request counted once by op"
                );
                if header_in_ram
                    && !self.cfg.unmap_list
                    && self.guest_read_u32(at).map(|w| w & 0xffff) == Some(6)
                {
                    assert_eq!(status, Status::Inval, "op 6 with the extension off");
                }
                if status != Status::Ok {
                    assert_eq!(self.footprint(), before, "failed {status:?} changed state");
                } else if header_in_ram {
                    self.check_unmap_list(at, &before);
                }
            }
            Step::Translate {
                rid,
                iova,
                len,
                access,
            } => {
                let rid = RIDS[*rid as usize % RIDS.len()];
                let access = [Access::Read, Access::Write, Access::ReadWrite][*access as usize % 3];
                let mut out = [Fragment {
                    hva: 0,
                    gpa: 0,
                    len: 0,
                }; 8];
                if let Ok(n) = self
                    .vm
                    .translate(rid, *iova, u64::from(*len), access, &mut out)
                {
                    let total: u64 = out[..n.min(8)].iter().map(|f| f.len).sum();
                    if n <= 8 {
                        assert_eq!(total, u64::from(*len));
                    }
                    for f in &out[..n.min(8)] {
                        self.check_fragment(f);
                    }
                }
            }
            Step::RemoveRegion(i) => {
                let i = *i as usize % self.regions.len();
                let r = &self.regions[i];
                let res = self.vm.remove_ram_region(r.gpa, r.size);
                assert_eq!(res.is_ok(), r.present, "{res:?}");
                self.regions[i].present = false;
            }
            Step::AddRegion(i) => {
                let i = *i as usize % self.regions.len();
                let r = &self.regions[i];
                // SAFETY: as in new_vm.
                let res = unsafe { self.vm.add_ram_region(r.gpa, r.size, r.buf.ptr as usize) };
                assert_eq!(res.is_ok(), !r.present, "{res:?}");
                self.regions[i].present = true;
            }
            Step::Reset => {
                self.vm.reset();
                let s = self.vm.stats();
                assert_eq!((s.mappings, s.pinned_pages, s.mem_used), (0, 0, 0));
                assert!(self.vm.pins().snapshot().is_empty());
                for &rid in &RIDS[..ENDPOINTS] {
                    assert!(!self.vm.endpoint(rid).unwrap().is_attached());
                    assert!(self.vm.mappings(rid).is_empty());
                }
            }
            Step::Migrate => {
                let blob = self.vm.export_state();
                let dst = World::new_vm(&self.cfg, &self.regions);
                dst.import_state(&blob).expect("a fresh export imports");
                for &rid in &RIDS[..ENDPOINTS] {
                    assert_eq!(dst.mappings(rid), self.vm.mappings(rid));
                    assert_eq!(
                        dst.endpoint(rid).unwrap().is_attached(),
                        self.vm.endpoint(rid).unwrap().is_attached()
                    );
                }
                self.vm = dst;
            }
        }
    }
}

fn run(input: &Input) {
    let cfg = VmConfig {
        iova_bits: [21, 32, 48][input.iova_bits as usize % 3],
        pin_limit: input
            .pin_limit_pages
            .map_or(u64::MAX, |p| u64::from(p) * PAGE_SIZE),
        // Tight enough that sparse MAPs meet it: about 2 nodes per page.
        mem_limit: input
            .pin_limit_pages
            .map_or(u64::MAX, |p| u64::from(p) * 8192),
        bypass: input.bypass,
        host_iova: input.host_iova,
        unmap_list: !input.unmap_list_off,
        max_segs: 252,
        // Queues are the `queue` target's: here ops 7 and 8 are unknown
        // ops (a set-up queue's pins are not in this target's model).
        queues: 0,
        ..VmConfig::default()
    };
    let mut regions = Vec::new();
    let mut next = 0u64;
    for spec in input.regions.iter().take(3) {
        let size = (u64::from(spec.pages % 64) + 1) * PAGE_SIZE;
        let gpa = if spec.adjacent {
            next
        } else {
            next + (u64::from(spec.gap_pages) + 1) * 0x10_0000
        };
        regions.push(Region {
            gpa,
            size,
            buf: HostBuf::new(size as usize),
            present: true,
        });
        next = gpa + size;
    }
    if regions.is_empty() {
        return;
    }
    let vm = World::new_vm(&cfg, &regions);
    let mut w = World { vm, cfg, regions };
    w.check();
    for s in input.steps.iter().take(MAX_STEPS) {
        w.step(s);
        w.check();
    }
}

fuzz_target!(|input: Input| run(&input));
