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
//!     target/release/examples/write_path_counts submit  # Ir / 10000 pairs
//! ```
//!
//! The cases are those of the `map_unmap` bench (same population, hole
//! and requests).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use pvdma::{Status, PAGE_SHIFT, PAGE_SIZE};
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
const PAIRS: u64 = 10_000;

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
    let cases: [(&str, Pair<'_>); 4] = [
        ("submit", Box::new(blocks(sm, su))),
        ("execute", Box::new(execute)),
        ("submit_cold_leaf", Box::new(blocks(cm, cu))),
        ("submit_64seg", Box::new(blocks(mm, mu))),
    ];
    for (name, pair) in &cases {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        timed_loop(100, pair);
        let before = ALLOCS.load(Relaxed);
        timed_loop(PAIRS, pair);
        let allocs = ALLOCS.load(Relaxed) - before;
        println!(
            "{name:>18}: {:.2} allocations per MAP+UNMAP pair",
            allocs as f64 / PAIRS as f64
        );
    }
}
