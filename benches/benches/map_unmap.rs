// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! MAP + UNMAP of one page in a domain of 64K mapped pages:
//!
//! - `pvdma_submit`: request blocks in guest RAM, as the guest lays them
//!   out, through [`Vm::submit`] (read, parse, validate, run, write back);
//! - `pvdma_execute`: the same requests pre-parsed, through [`Vm::execute`]
//!   (the difference is the cost of reading and parsing the blocks);
//! - `pvdma_submit_cold_leaf`: one page where no leaf table exists, so the
//!   MAP allocates a table node and the UNMAP frees it (through the epoch
//!   collector): the worst case of a lone mapping;
//! - `vmm_iotlb_rwlock`: vm-memory's `Iotlb::set_mapping` and
//!   `invalidate_mapping`, each under the `RwLock` write lock;
//! - `btreemap_mutex`: insert + remove under a `Mutex`;
//! - `*_64seg`: a 64-segment MAP (64 scattered pages) and its UNMAP.
//!
//! The page (or 64 pages) goes into a hole punched in the middle of the
//! population, so its leaf table stays alive, as in a busy domain.
//!
//! [`Vm::submit`]: pvdma::Vm::submit
//! [`Vm::execute`]: pvdma::Vm::execute

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pvdma::{Status, PAGE_SHIFT, PAGE_SIZE};
use pvdma_benches::*;
use vm_memory::{GuestAddress, Permissions};

/// Mapped pages.
const PAGES: u64 = 1 << 16;
/// First page of the hole (a multiple of SEGS_PER_MAP: whole MAPs go).
const HOLE: u64 = PAGES / 2;
/// Pages in the hole.
const HOLE_PAGES: u64 = 64;
/// An IOVA whose whole 2 MiB block is unmapped (past the population).
const COLD_IOVA: u64 = IOVA_BASE + (PAGES << PAGE_SHIFT) + (64 << 20);

fn map_unmap(c: &mut Criterion) {
    let mut group = c.benchmark_group("map_unmap");
    group.throughput(Throughput::Elements(1));
    let guest = Guest::populated(PAGES);
    let hole_iova = iova_of(HOLE);
    guest.execute(&unmap_request(hole_iova, HOLE_PAGES * PAGE_SIZE));
    let iotlb = iotlb_populated(PAGES);
    iotlb
        .write()
        .expect("no panics")
        .invalidate_mapping(GuestAddress(hole_iova), (HOLE_PAGES * PAGE_SIZE) as usize);
    let btree = btree_populated(PAGES);
    {
        let mut map = btree.lock().expect("no panics");
        for i in HOLE..HOLE + HOLE_PAGES {
            map.remove(&(iova_of(i) >> PAGE_SHIFT));
        }
    }

    let one_map = map_request(hole_iova, segs_of(HOLE, 1));
    let one_unmap = unmap_request(hole_iova, PAGE_SIZE);
    let many_map = map_request(hole_iova, segs_of(HOLE, HOLE_PAGES));
    let many_unmap = unmap_request(hole_iova, HOLE_PAGES * PAGE_SIZE);
    let cold_map = map_request(COLD_IOVA, segs_of(HOLE, 1));
    let cold_unmap = unmap_request(COLD_IOVA, PAGE_SIZE);

    for (name, map, unmap) in [
        ("pvdma_submit", &one_map, &one_unmap),
        ("pvdma_submit_cold_leaf", &cold_map, &cold_unmap),
    ] {
        group.bench_function(name, |b| {
            let map_block = guest.write_block(BLOCK_AREA, map);
            let unmap_block = guest.write_block(BLOCK_AREA + 0x4000, unmap);
            b.iter(|| submit_pair(&guest.vm, map_block, unmap_block))
        });
    }

    group.bench_function("pvdma_execute", |b| {
        b.iter(|| execute_pair(&guest.vm, &one_map, &one_unmap))
    });

    group.bench_function("vmm_iotlb_rwlock", |b| {
        let (iova, gpa) = (GuestAddress(hole_iova), GuestAddress(gpa_of(HOLE)));
        b.iter(|| {
            iotlb
                .write()
                .expect("no panics")
                .set_mapping(
                    black_box(iova),
                    gpa,
                    PAGE_SIZE as usize,
                    Permissions::ReadWrite,
                )
                .expect("never fails");
            iotlb
                .write()
                .expect("no panics")
                .invalidate_mapping(black_box(iova), PAGE_SIZE as usize);
        })
    });

    group.bench_function("btreemap_mutex", |b| {
        let (page, gpa) = (hole_iova >> PAGE_SHIFT, gpa_of(HOLE));
        b.iter(|| {
            btree
                .lock()
                .expect("no panics")
                .insert(black_box(page), gpa);
            btree.lock().expect("no panics").remove(&black_box(page));
        })
    });

    group.bench_function("pvdma_submit_64seg", |b| {
        let map_block = guest.write_block(BLOCK_AREA, &many_map);
        let unmap_block = guest.write_block(BLOCK_AREA + 0x4000, &many_unmap);
        b.iter(|| {
            let mapped = guest.vm.submit(black_box(map_block));
            let unmapped = guest.vm.submit(black_box(unmap_block));
            assert!(mapped == Status::Ok && unmapped == Status::Ok);
        })
    });

    group.bench_function("vmm_iotlb_rwlock_64seg", |b| {
        b.iter(|| {
            let mut tlb = iotlb.write().expect("no panics");
            for (k, &(gpa, len)) in many_map.segs.iter().enumerate() {
                let iova = GuestAddress(black_box(hole_iova) + k as u64 * PAGE_SIZE);
                tlb.set_mapping(
                    iova,
                    GuestAddress(gpa),
                    len as usize,
                    Permissions::ReadWrite,
                )
                .expect("never fails");
            }
            drop(tlb);
            iotlb.write().expect("no panics").invalidate_mapping(
                GuestAddress(black_box(hole_iova)),
                (HOLE_PAGES * PAGE_SIZE) as usize,
            );
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion();
    targets = map_unmap
}
criterion_main!(benches);
