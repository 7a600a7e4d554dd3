// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Queued requests (ABI 3.2): the host's cost per one-page MAP + UNMAP
//! pair taken from a request queue, beside the same pairs as synchronous
//! requests in the same run and domain (`bench.sh` prints the ratios):
//!
//! - `pvdma_queued`: 256 pairs (512 entries) published at once, then one
//!   SYNC request, whose rule-1 drain applies them (read head, copy and
//!   parse each entry, run it, write tail back) and the SYNC itself; per
//!   pair. The ring's contents never change (every slot pair holds the
//!   same MAP and UNMAP), so each iteration only moves `head`: what is
//!   measured is the host's work, not the guest's stores;
//! - `pvdma_queued_32`: the same with 32 pairs per SYNC (the fixed cost
//!   of a drain and a SYNC spread over fewer entries);
//! - `pvdma_submit`: the same pairs as synchronous request blocks through
//!   `Vm::submit` (each also pays the idle check of the queue, one read
//!   of `head`);
//! - `pvdma_execute`: the same pairs pre-parsed through `Vm::execute`,
//!   the engine's one-page MAP + UNMAP pair.
//!
//! The domain is `map_unmap`'s: 64K mapped pages, the pairs go into a hole
//! in the middle of the population.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pvdma::testing::{map_entry, queue_setup_req, sync_req, unmap_entry, GuestQueue};
use pvdma::{Perm, Status, PAGE_SIZE};
use pvdma_benches::*;

/// Mapped pages.
const PAGES: u64 = 1 << 16;
/// The page the pairs map and unmap (a hole in the population).
const HOLE: u64 = PAGES / 2;
/// The queue: control block and a 64 KiB ring (2048 entries) in the
/// request area, away from the blocks.
const CTRL: u64 = BLOCK_AREA + 0x4_0000;
const RING: u64 = BLOCK_AREA + 0x8_0000;
const RING_LEN: u64 = 0x1_0000;

fn queue_drain(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue_drain");
    let guest = Guest::populated(PAGES);
    let iova = iova_of(HOLE);
    // A whole MAP of the population (SEGS_PER_MAP pages) goes.
    guest.execute(&unmap_request(iova, SEGS_PER_MAP * PAGE_SIZE));
    let setup = guest.write_block(
        BLOCK_AREA + 0x1_0000,
        &queue_setup_req(EP, 0, CTRL, RING, RING_LEN),
    );
    assert_eq!(guest.vm.submit(setup), Status::Ok);
    let mut q = GuestQueue::new(&guest.mem, CTRL, RING, RING_LEN);
    let gpa = segs_of(HOLE, 1)[0].0;
    for slot in 0..q.entries {
        let e = if slot % 2 == 0 {
            map_entry(EP, Perm::RW, iova, gpa, PAGE_SIZE)
        } else {
            unmap_entry(EP, iova, PAGE_SIZE)
        };
        q.write(&guest.mem, slot, &e);
    }
    let sync = guest.write_block(BLOCK_AREA + 0x2_0000, &sync_req(EP));

    for (name, pairs) in [("pvdma_queued", 256u32), ("pvdma_queued_32", 32)] {
        group.throughput(Throughput::Elements(u64::from(pairs)));
        group.bench_function(name, |b| {
            b.iter(|| {
                q.head = q.head.wrapping_add(2 * pairs);
                q.publish(&guest.mem);
                let status = guest.vm.submit(black_box(sync));
                assert!(status == Status::Ok);
            })
        });
    }
    let s = guest.vm.stats();
    assert_eq!((s.queue_failed, s.mappings), (0, PAGES / SEGS_PER_MAP - 1));

    group.throughput(Throughput::Elements(1));
    let map = map_request(iova, segs_of(HOLE, 1));
    let unmap = unmap_request(iova, PAGE_SIZE);
    let map_block = guest.write_block(BLOCK_AREA, &map);
    let unmap_block = guest.write_block(BLOCK_AREA + 0x4000, &unmap);
    group.bench_function("pvdma_submit", |b| {
        b.iter(|| submit_pair(&guest.vm, map_block, unmap_block))
    });
    group.bench_function("pvdma_execute", |b| {
        b.iter(|| execute_pair(&guest.vm, &map, &unmap))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion();
    targets = queue_drain
}
criterion_main!(benches);
