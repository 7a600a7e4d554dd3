// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared set-up for the pvdma benchmarks: a guest with real RAM, mappings
//! made through the request engine, and the baselines (vm-memory's `Iotlb`
//! behind an `RwLock`, a `BTreeMap` behind a `Mutex`) holding the very same
//! translations, so that every benchmark compares like with like.
//!
//! Layout of a population of `pages` mapped 4 KiB pages: IOVA page `i` is
//! `IOVA_BASE + i * 4 KiB` and translates to a pseudo-random ("scattered")
//! guest page, so no two neighbouring IOVA pages are contiguous in guest
//! memory and the table holds one 4 KiB leaf per page. The guest maps them
//! as MAP requests of [`SEGS_PER_MAP`] one-page segments each, the way a
//! driver maps scatter-gather lists.

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use criterion::Criterion;
use pvdma::abi::Op;
use pvdma::testing::{self, GuestMem};
use pvdma::{encode_request, Request};
use pvdma::{Domain, IovaChoice};
use pvdma::{Fragment, Perm, Status, Vm, VmConfig, PAGE_SHIFT, PAGE_SIZE};
use pvdma::{PinMode, PinTable};
use vm_memory::{Bytes, GuestAddress, Iotlb, Permissions};

/// Guest RAM: one region at guest-physical 0.
pub const RAM_SIZE: u64 = 64 << 20;
/// Guest pages that mapped IOVA pages scatter over (the top 1 MiB of RAM is
/// kept for request blocks).
const DATA_PAGES: u64 = (RAM_SIZE - (1 << 20)) >> PAGE_SHIFT;
/// Where request blocks go (the top 1 MiB of RAM).
pub const BLOCK_AREA: u64 = RAM_SIZE - (1 << 20);
/// First mapped IOVA (1 GiB: far from 0, well inside a 48-bit space).
pub const IOVA_BASE: u64 = 1 << 30;
/// One-page segments per MAP request when populating.
pub const SEGS_PER_MAP: u64 = 16;
/// The endpoint the benchmarks translate for (00:02.0).
pub const EP: u32 = 0x0010;
/// Population sizes of the translate benchmarks, in mapped 4 KiB pages.
pub const SIZES: [u64; 3] = [1 << 10, 1 << 16, 1 << 20];
/// Pages in the hot subset the hit benchmarks cycle through.
pub const HOT: usize = 256;

/// splitmix64: a fixed, seedable, good-enough scatter function.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// IOVA of mapped page `i`.
pub fn iova_of(i: u64) -> u64 {
    IOVA_BASE + i * PAGE_SIZE
}

/// The scattered guest page that mapped page `i` translates to.
pub fn gpa_of(i: u64) -> u64 {
    (mix(i) % DATA_PAGES) << PAGE_SHIFT
}

/// `count` IOVAs drawn pseudo-randomly (fixed seed) from `pages` mapped
/// pages: the hot set, precomputed so the loop does nothing but translate.
pub fn hot_iovas(pages: u64, count: usize, seed: u64) -> Vec<u64> {
    (0..count as u64)
        .map(|k| iova_of(mix(seed ^ mix(k)) % pages))
        .collect()
}

/// The one-page segments of the MAP request that maps pages
/// `[first, first + n)`.
pub fn segs_of(first: u64, n: u64) -> Vec<(u64, u64)> {
    (first..first + n).map(|i| (gpa_of(i), PAGE_SIZE)).collect()
}

/// A MAP request (FIXED at `iova`, read-write) with `segs`.
pub fn map_request(iova: u64, segs: Vec<(u64, u64)>) -> Request {
    testing::map_fixed(EP, Perm::RW, iova, &segs)
}

/// An UNMAP request removing every mapping inside `[iova, iova + length)`.
pub fn unmap_request(iova: u64, length: u64) -> Request {
    testing::unmap_req(EP, iova, length)
}

/// One MAP and its UNMAP through [`Vm::submit`], from request blocks
/// already in guest RAM (the pair the write-side benches time); both must
/// succeed.
#[inline]
pub fn submit_pair(vm: &Vm, map_block: u64, unmap_block: u64) {
    let mapped = vm.submit(std::hint::black_box(map_block));
    let unmapped = vm.submit(std::hint::black_box(unmap_block));
    assert!(mapped == Status::Ok && unmapped == Status::Ok);
}

/// The same pair through [`Vm::execute`], the requests already parsed.
#[inline]
pub fn execute_pair(vm: &Vm, map: &Request, unmap: &Request) {
    let mapped = vm.execute(std::hint::black_box(map)).status;
    let unmapped = vm.execute(std::hint::black_box(unmap)).status;
    assert!(mapped == Status::Ok && unmapped == Status::Ok);
}

/// A fragment array of `N` empty fragments.
pub fn fragments<const N: usize>() -> [Fragment; N] {
    [Fragment {
        hva: 0,
        gpa: 0,
        len: 0,
    }; N]
}

/// A guest: a VM whose RAM is real host memory, with endpoint [`EP`]
/// attached (translation on).
pub struct Guest {
    /// Declared first so it drops before the memory it points into.
    pub vm: Vm,
    /// The guest RAM.
    pub mem: GuestMem,
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

impl Guest {
    /// A guest with [`RAM_SIZE`] bytes of RAM and [`EP`] attached.
    pub fn new() -> Guest {
        let vm = Vm::new(VmConfig::default()).expect("default config is valid");
        let mem = GuestMem::new(&[(0, RAM_SIZE)]);
        // SAFETY: `mem` outlives `vm`, which is declared first in `Guest`
        // and so dropped first.
        unsafe { mem.register(&vm) };
        vm.add_endpoint(EP, None).expect("adding the endpoint");
        let guest = Guest { vm, mem };
        guest.execute(&testing::req(Op::Attach, EP));
        guest
    }

    /// A guest with `pages` scattered pages mapped (see the crate docs),
    /// through the request engine, [`SEGS_PER_MAP`] pages per MAP.
    pub fn populated(pages: u64) -> Guest {
        let guest = Guest::new();
        let mut first = 0;
        while first < pages {
            let n = SEGS_PER_MAP.min(pages - first);
            guest.execute(&map_request(iova_of(first), segs_of(first, n)));
            first += n;
        }
        guest
    }

    /// Runs a pre-parsed request, which must succeed.
    pub fn execute(&self, req: &Request) {
        let status = self.vm.execute(req).status;
        assert_eq!(status, Status::Ok, "{req:?}");
    }

    /// Lays `req` out as a request block at guest-physical `at`, as the
    /// guest driver would, and returns `at` for [`Vm::submit`].
    pub fn write_block(&self, at: u64, req: &Request) -> u64 {
        assert!(
            (BLOCK_AREA..RAM_SIZE).contains(&at),
            "block outside the area"
        );
        self.mem
            .write_slice(&encode_request(req), GuestAddress(at))
            .expect("block inside RAM");
        at
    }
}

/// A bare domain holding the same translations as [`Guest::populated`],
/// built through [`Domain::map`] (for the raw table benchmarks, which need
/// the table itself: the VM does not hand out its domains).
pub fn domain_populated(guest: &Guest, pages: u64) -> (Domain, PinTable) {
    let domain = Domain::new(guest.vm.config().iova_bits);
    let pins = PinTable::new(u64::MAX, PinMode::None);
    guest.vm.with_ram(|ram| {
        let mut first = 0;
        while first < pages {
            let n = SEGS_PER_MAP.min(pages - first);
            let choice = IovaChoice::Fixed(iova_of(first));
            domain
                .map(segs_of(first, n), Perm::RW, choice, ram, &pins, &mut |_| {})
                .expect("mapping the population");
            first += n;
        }
    });
    (domain, pins)
}

/// vm-memory's IOTLB holding the same translations, one mapping per page
/// (the guest pages are scattered, so no two pages could share one).
pub fn iotlb_populated(pages: u64) -> RwLock<Iotlb> {
    let mut iotlb = Iotlb::new();
    for i in 0..pages {
        iotlb
            .set_mapping(
                GuestAddress(iova_of(i)),
                GuestAddress(gpa_of(i)),
                PAGE_SIZE as usize,
                Permissions::ReadWrite,
            )
            .expect("Iotlb::set_mapping never fails");
    }
    RwLock::new(iotlb)
}

/// The naive baseline: IOVA page number -> guest-physical page address.
pub fn btree_populated(pages: u64) -> Mutex<BTreeMap<u64, u64>> {
    Mutex::new(
        (0..pages)
            .map(|i| (iova_of(i) >> PAGE_SHIFT, gpa_of(i)))
            .collect(),
    )
}

/// The baseline's single-range lookup: the guest-physical address of
/// `iova`, or 0 when it is not mapped.
#[inline]
pub fn iotlb_translate(iotlb: &RwLock<Iotlb>, iova: u64, len: usize) -> u64 {
    let guard = iotlb.read().expect("no writer panics");
    match Iotlb::lookup(&*guard, GuestAddress(iova), len, Permissions::Read) {
        Ok(mut ranges) => ranges.next().map_or(0, |r| r.base.0),
        Err(_) => 0,
    }
}

/// Criterion settings that keep a full `cargo bench` run within a few
/// minutes on a 2-core machine while leaving enough samples for its
/// statistics (the noise is handled by comparing in-run ratios).
pub fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(400))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
        .configure_from_args()
}
