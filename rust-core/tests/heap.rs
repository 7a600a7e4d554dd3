// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host heap after the guest's mappings are gone: a counting global
//! allocator (this test binary's own) measures the live heap, so that
//! memory the budget (`mem-limit`) no longer counts is seen to be freed.
//! One test in the binary: nothing else allocates while it measures.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use common::*;
use pvdma::{Status, VmConfig, PAGE_SIZE};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` with the caller's arguments;
// the counter does not change what is allocated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is (see the impl).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is (see the impl).
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is (see the impl).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Live heap bytes, after the epoch collector freed what it holds (table
/// nodes go through it).
fn live() -> isize {
    for _ in 0..64 {
        pvdma::epoch::pin().flush();
    }
    LIVE.load(Ordering::Relaxed)
}

/// [`live`] once the epoch collector has caught up: a drain applies
/// thousands of entries under one pinned epoch, and what they deferred is
/// freed over several collections.
fn settled() -> isize {
    let mut last = live();
    for _ in 0..32 {
        let now = live();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// Guest frames the mappings cycle through (distinct pins, in LOW).
const FRAMES: u64 = 1024;

/// Maps one page after another (each on its own frame of `FRAMES`, so
/// the pin table grows too) until the memory budget says QUOTA, unmaps
/// them all, and returns how many there were.
fn fill_and_empty(g: &Guest) -> u64 {
    let base = 1u64 << 30;
    let mut n = 0;
    loop {
        let gpa = 0x10_0000 + (n % FRAMES) * PAGE_SIZE;
        let out = g.map(EP, RW | FIXED, base + n * PAGE_SIZE, &[(gpa, PAGE_SIZE)]);
        match out.status {
            Status::Ok => n += 1,
            Status::Quota => break,
            s => panic!("MAP {n}: {s:?}"),
        }
    }
    // One by one, as a driver does; the last ones as one range.
    for i in 0..n / 2 {
        assert_eq!(g.unmap(EP, base + i * PAGE_SIZE, 0).status, Status::Ok);
    }
    let rest = (n - n / 2) * PAGE_SIZE;
    assert_eq!(
        g.unmap(EP, base + n / 2 * PAGE_SIZE, rest).status,
        Status::Ok
    );
    n
}

/// Map to QUOTA, unmap everything: the budget reads 0 again, and so does
/// the heap (within what a few empty maps keep), not only the budget.
#[test]
fn freed_mappings_give_their_heap_back() {
    let g = Guest::with(VmConfig {
        mem_limit: 16 << 20,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    // Warm up: thread-locals, the epoch machinery, first allocations.
    let mapped = g.map(EP, RW | FIXED, 0x1000, &[(0x10_0000, PAGE_SIZE)]);
    assert_eq!(mapped.status, Status::Ok);
    assert_eq!(g.unmap(EP, 0x1000, 0).status, Status::Ok);
    let before = live();
    for round in 0..2 {
        let n = fill_and_empty(&g);
        assert!(n > 10_000, "only {n} mappings fit");
        let stats = g.vm.stats();
        assert_eq!((stats.mappings, stats.mem_used), (0, 0), "round {round}");
        let grown = live() - before;
        assert!(
            grown < 64 << 10,
            "round {round}: {n} mappings gone, {grown} heap bytes kept"
        );
    }
    queues_leave_nothing_behind(&g);
}

/// Request queues set up (1 MiB rings, every page pinned), entries
/// drained through them, then torn down (by QUEUE and by reset): no pin
/// and no heap is left. Part of the one test of this binary.
fn queues_leave_nothing_behind(g: &Guest) {
    use pvdma::testing::{map_entry, queue_setup_req, queue_teardown_req, unmap_entry};
    use pvdma::testing::{sync_req, GuestQueue};
    const RING: u64 = 1 << 20;
    let ctrl = |i: u64| 0x8_0000 + i * 64;
    let ring = |i: u64| 0x20_0000 + i * RING;
    let pinned = g.vm.stats().pinned_pages;
    let before = live();
    for round in 0..3 {
        let mut qs: Vec<GuestQueue> = (0..4)
            .map(|i| {
                let out = g.submit(&queue_setup_req(EP, i, ctrl(i), ring(i), RING));
                assert_eq!(out.status, Status::Ok, "round {round} queue {i}");
                GuestQueue::new(&g.mem, ctrl(i), ring(i), RING)
            })
            .collect();
        assert_eq!(g.vm.stats().pinned_pages, pinned + 1 + 4 * 256);
        for (i, q) in qs.iter_mut().enumerate() {
            for k in 0..300u64 {
                let iova = (2 << 30) + ((i as u64) << 24) + k * PAGE_SIZE;
                q.push(
                    &g.mem,
                    &map_entry(EP, pvdma::Perm::RW, iova, 0x10_0000, PAGE_SIZE),
                );
                q.push(&g.mem, &unmap_entry(EP, iova, 0));
            }
        }
        let out = g.submit(&sync_req(EP));
        assert_eq!((out.status, out.result), (Status::Ok, 0));
        if round == 1 {
            g.vm.reset();
            assert_eq!(g.attach(EP), Status::Ok);
        } else {
            for i in 0..4 {
                assert_eq!(g.submit(&queue_teardown_req(EP, i)).status, Status::Ok);
            }
        }
        assert_eq!(g.vm.stats().pinned_pages, pinned, "round {round}");
        let grown = settled() - before;
        assert!(
            grown < 64 << 10,
            "round {round}: queues gone, {grown} heap bytes kept"
        );
    }
}
