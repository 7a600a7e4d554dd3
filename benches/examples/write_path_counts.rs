// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Load-independent costs of the MAP + UNMAP write path: heap allocations
//! per MAP + UNMAP pair (counted by a wrapping global allocator), and a
//! `#[inline(never)]` loop per case for callgrind to count instructions in:
//!
//! ```sh
//! cargo build --release -p pvdma-benches --example write_path_counts
//! target/release/examples/write_path_counts            # allocations
//! valgrind --tool=callgrind --collect-atstart=no \
//!     --toggle-collect='write_path_counts::timed_loop' \
//!     target/release/examples/write_path_counts submit  # Ir / 10240 pairs
//! ```
//!
//! The cases are those of the `map_unmap` bench (same population, hole
//! and requests), plus `queued`: the same one-page pairs taken from a
//! request queue, 256 pairs per SYNC (the `queue_drain` bench's
//! `pvdma_queued`), counted per pair.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use pvdma::testing::{map_entry, queue_setup_req, sync_req, unmap_entry, GuestQueue};
use pvdma::{Perm, Status, PAGE_SHIFT, PAGE_SIZE};
use pvdma_benches::*;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PAGES: u64 = 1 << 16;
const HOLE: u64 = PAGES / 2;
const HOLE_PAGES: u64 = 64;
const COLD_IOVA: u64 = IOVA_BASE + (PAGES << PAGE_SHIFT) + (64 << 20);
const PAIRS: u64 = 10_240;
/// Pairs per SYNC in the `queued` case.
const BATCH: u64 = 256;

/// One MAP + UNMAP pair.
type Pair<'a> = Box<dyn Fn() + 'a>;

#[inline(never)]
fn timed_loop(n: u64, pair: &dyn Fn()) {
    for _ in 0..n {
        pair();
    }
}

fn main() {
    let only = std::env::args().nth(1);
    let guest = Guest::populated(PAGES);
    let hole_iova = iova_of(HOLE);
    guest.execute(&unmap_request(hole_iova, HOLE_PAGES * PAGE_SIZE));
    let one_map = map_request(hole_iova, segs_of(HOLE, 1));
    let one_unmap = unmap_request(hole_iova, PAGE_SIZE);
    let submit = |map, unmap, at| {
        let m = guest.write_block(BLOCK_AREA + at, map);
        let u = guest.write_block(BLOCK_AREA + at + 0x4000, unmap);
        (m, u)
    };
    let (sm, su) = submit(&one_map, &one_unmap, 0);
    let cold = (
        map_request(COLD_IOVA, segs_of(HOLE, 1)),
        unmap_request(COLD_IOVA, PAGE_SIZE),
    );
    let (cm, cu) = submit(&cold.0, &cold.1, 0x8000);
    let many = (
        map_request(hole_iova, segs_of(HOLE, HOLE_PAGES)),
        unmap_request(hole_iova, HOLE_PAGES * PAGE_SIZE),
    );
    let (mm, mu) = submit(&many.0, &many.1, 0x10000);
    let blocks = |m: u64, u: u64| {
        let guest = &guest;
        move || {
            let mapped = guest.vm.submit(black_box(m));
            let unmapped = guest.vm.submit(black_box(u));
            assert!(mapped == Status::Ok && unmapped == Status::Ok);
        }
    };
    let execute = || {
        let mapped = guest.vm.execute(black_box(&one_map)).status;
        let unmapped = guest.vm.execute(black_box(&one_unmap)).status;
        assert!(mapped == Status::Ok && unmapped == Status::Ok);
    };
    // The queue: every slot pair holds the same MAP and UNMAP of the
    // hole's first page, so a batch only moves head (the guest's work is
    // not counted), then one SYNC drains it.
    let (ctrl, ring, ring_len) = (BLOCK_AREA + 0x4_0000, BLOCK_AREA + 0x8_0000, 0x1_0000);
    // Set up by the `queued` case only (its first call): with a queue set
    // up, every other case's request would also pay the idle check.
    let setup = guest.write_block(
        BLOCK_AREA + 0x2_0000,
        &queue_setup_req(EP, 0, ctrl, ring, ring_len),
    );
    let q = std::cell::RefCell::new(GuestQueue::new(&guest.mem, ctrl, ring, ring_len));
    let set_up = std::cell::Cell::new(false);
    let gpa = segs_of(HOLE, 1)[0].0;
    for slot in 0..q.borrow().entries {
        let e = if slot % 2 == 0 {
            map_entry(EP, Perm::RW, hole_iova, gpa, PAGE_SIZE)
        } else {
            unmap_entry(EP, hole_iova, PAGE_SIZE)
        };
        q.borrow().write(&guest.mem, slot, &e);
    }
    let sync = guest.write_block(BLOCK_AREA + 0x2_1000, &sync_req(EP));
    let queued = || {
        if !set_up.replace(true) {
            assert_eq!(guest.vm.submit(setup), Status::Ok);
            q.borrow_mut().head = guest.vm.queues()[0].tail;
        }
        let mut q = q.borrow_mut();
        q.head = q.head.wrapping_add(2 * BATCH as u32);
        q.publish(&guest.mem);
        assert!(guest.vm.submit(black_box(sync)) == Status::Ok);
    };
    let cases: [(&str, Pair<'_>, u64); 5] = [
        ("submit", Box::new(blocks(sm, su)), 1),
        ("execute", Box::new(execute), 1),
        ("submit_cold_leaf", Box::new(blocks(cm, cu)), 1),
        ("submit_64seg", Box::new(blocks(mm, mu)), 1),
        ("queued", Box::new(queued), BATCH),
    ];
    for (name, pair, per) in &cases {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        timed_loop(100, pair);
        let before = ALLOCS.load(Relaxed);
        // `per` pairs per call: PAIRS pairs in all.
        timed_loop(PAIRS / per, pair);
        let allocs = ALLOCS.load(Relaxed) - before;
        println!(
            "{name:>18}: {:.2} allocations per MAP+UNMAP pair",
            allocs as f64 / PAIRS as f64
        );
    }
}
