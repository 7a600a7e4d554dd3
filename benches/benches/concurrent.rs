// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Two reader threads translate (each over its own hot set of [`HOT`] pages
//! out of 64K mapped pages) while, optionally, a writer thread maps and
//! unmaps one page at other IOVAs of the same domain as fast as it can.
//!
//! Measured: the time one reader needs per translation (criterion's mean is
//! the mean of the two readers' elapsed time over `iters` translations
//! each; its element throughput is translations/s per reader). pvdma's
//! readers use [`Vm::translate`] and its writer [`Vm::execute`]; the
//! baseline's readers take the `RwLock<Iotlb>` read lock, its writer the
//! write lock (once for `set_mapping`, once for `invalidate_mapping`).
//!
//! The machine this was written for has 2 cores, so with the writer
//! running three threads share them: part of any slow-down is CPU
//! sharing, the same for both. `pvdma_readers_with_cpu_hog` runs a third
//! thread that only burns CPU, to measure that part alone. The writer's
//! own rate is printed, so that a writer starved by its lock is visible
//! too.
//!
//! Threads are scoped and bounded: readers do a fixed number of
//! translations, the writer stops when they are done (or after
//! [`WRITER_DEADLINE`], whichever comes first).
//!
//! [`Vm::translate`]: pvdma::Vm::translate
//! [`Vm::execute`]: pvdma::Vm::execute

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pvdma::epoch;
use pvdma::{Access, Perm, Status, PAGE_SIZE};
use pvdma_benches::*;
use vm_memory::{GuestAddress, Permissions};

/// Mapped pages.
const PAGES: u64 = 1 << 16;
/// Reader threads.
const READERS: usize = 2;
/// A writer never outlives this, even if a reader were to hang.
const WRITER_DEADLINE: Duration = Duration::from_secs(30);
/// The page the writer maps and unmaps: a hole in the population.
const HOLE: u64 = PAGES / 2;

/// The writer's operations and the wall time they took, over every run.
#[derive(Default)]
struct Tally {
    writes: u64,
    wall: Duration,
}

/// Runs [`READERS`] readers for `iters` translations each, with `writer`
/// looping beside them when given; returns the readers' mean elapsed time.
fn run<R>(iters: u64, reader: &R, writer: Option<&(dyn Fn() + Sync)>, tally: &mut Tally) -> Duration
where
    R: Fn(usize, u64) -> u64 + Sync,
{
    let stop = AtomicBool::new(false);
    let start = Barrier::new(READERS + usize::from(writer.is_some()));
    let began = Instant::now();
    let (elapsed, writes) = thread::scope(|s| {
        let writer = writer.map(|write| {
            let (stop, start) = (&stop, &start);
            s.spawn(move || {
                start.wait();
                let deadline = Instant::now() + WRITER_DEADLINE;
                let mut n = 0u64;
                // Relaxed: a stop flag; the scope's join orders the rest.
                while !stop.load(Ordering::Relaxed) && (n % 64 != 0 || Instant::now() < deadline) {
                    write();
                    n += 1;
                }
                n
            })
        });
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    let t = Instant::now();
                    black_box(reader(r, iters));
                    t.elapsed()
                })
            })
            .collect();
        let elapsed: Duration = readers
            .into_iter()
            .map(|h| h.join().expect("reader panicked"))
            .sum();
        stop.store(true, Ordering::Relaxed);
        let writes = writer.map_or(0, |h| h.join().expect("writer panicked"));
        (elapsed, writes)
    });
    tally.writes += writes;
    tally.wall += began.elapsed();
    elapsed / READERS as u32
}

fn report(name: &str, tally: &Tally) {
    if tally.writes > 0 && name.ends_with("_with_writer") {
        println!(
            "concurrent/{name}: writer did {:.2} M map+unmap pairs/s",
            tally.writes as f64 / tally.wall.as_secs_f64() / 1e6
        );
    }
}

fn concurrent(c: &mut Criterion) {
    let mut group = c.benchmark_group("concurrent");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));

    let hot: Vec<Vec<u64>> = (0..READERS as u64)
        .map(|r| hot_iovas(PAGES, HOT, 0xc0 + r))
        .collect();
    let hole_iova = iova_of(HOLE);

    let guest = Guest::populated(PAGES);
    guest.execute(&unmap_request(hole_iova, SEGS_PER_MAP * PAGE_SIZE));
    let pvdma_reader = |r: usize, iters: u64| {
        let mut out = fragments::<1>();
        let hot = &hot[r];
        (0..iters).fold(0u64, |acc, k| {
            let iova = hot[k as usize % HOT];
            let r = guest
                .vm
                .translate(EP, black_box(iova), PAGE_SIZE, Access::Read, &mut out);
            debug_assert_eq!(r, Ok(1));
            acc.wrapping_add(out[0].hva as u64)
        })
    };
    let (map, unmap) = (
        map_request(hole_iova, segs_of(HOLE, 1)),
        unmap_request(hole_iova, PAGE_SIZE),
    );
    let pvdma_writer = || {
        let mapped = guest.vm.execute(&map).status;
        let unmapped = guest.vm.execute(&unmap).status;
        assert!(mapped == Status::Ok && unmapped == Status::Ok);
    };
    // The control: a thread that only burns CPU, to tell CPU sharing on a
    // small machine from interference through the domain.
    let cpu_hog = || {
        for k in 0..1000u64 {
            black_box(k);
        }
    };
    for (name, writer) in [
        ("pvdma_readers_alone", None),
        (
            "pvdma_readers_with_cpu_hog",
            Some(&cpu_hog as &(dyn Fn() + Sync)),
        ),
        ("pvdma_readers_with_writer", Some(&pvdma_writer)),
    ] {
        let mut tally = Tally::default();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| run(iters, &pvdma_reader, writer, &mut tally))
        });
        report(name, &tally);
    }

    // The same with the bare table: readers walk `IoPageTable::lookup` (one
    // epoch pin per translation, like `Vm::translate`), the writer maps and
    // unmaps through `TableWriter`. Beside the rows above, this tells how
    // much of what a writer costs readers comes from the table itself and
    // how much from the layers around it.
    let (domain, _pins) = domain_populated(&guest, PAGES);
    let table = domain.table();
    table.lock().unmap(hole_iova, SEGS_PER_MAP * PAGE_SIZE);
    let table_reader = |r: usize, iters: u64| {
        let hot = &hot[r];
        (0..iters).fold(0u64, |acc, k| {
            let guard = epoch::pin();
            let leaf = table.lookup(black_box(hot[k as usize % HOT]), &guard);
            acc.wrapping_add(leaf.map_or(0, |l| l.gpa))
        })
    };
    let table_writer = || {
        table
            .lock()
            .map(hole_iova, gpa_of(HOLE), PAGE_SIZE, Perm::RW);
        table.lock().unmap(hole_iova, PAGE_SIZE);
    };
    for (name, writer) in [
        ("pvdma_table_readers_alone", None),
        (
            "pvdma_table_readers_with_cpu_hog",
            Some(&cpu_hog as &(dyn Fn() + Sync)),
        ),
        ("pvdma_table_readers_with_writer", Some(&table_writer)),
    ] {
        let mut tally = Tally::default();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| run(iters, &table_reader, writer, &mut tally))
        });
        report(name, &tally);
    }
    drop(domain);
    drop(guest);

    let iotlb = iotlb_populated(PAGES);
    iotlb
        .write()
        .expect("no panics")
        .invalidate_mapping(GuestAddress(hole_iova), (SEGS_PER_MAP * PAGE_SIZE) as usize);
    let iotlb_reader = |r: usize, iters: u64| {
        let hot = &hot[r];
        (0..iters).fold(0u64, |acc, k| {
            let iova = hot[k as usize % HOT];
            acc.wrapping_add(iotlb_translate(&iotlb, black_box(iova), PAGE_SIZE as usize))
        })
    };
    let (iova, gpa) = (GuestAddress(hole_iova), GuestAddress(gpa_of(HOLE)));
    let iotlb_writer = || {
        iotlb
            .write()
            .expect("no panics")
            .set_mapping(iova, gpa, PAGE_SIZE as usize, Permissions::ReadWrite)
            .expect("never fails");
        iotlb
            .write()
            .expect("no panics")
            .invalidate_mapping(iova, PAGE_SIZE as usize);
    };
    for (name, writer) in [
        ("vmm_iotlb_readers_alone", None),
        (
            "vmm_iotlb_readers_with_writer",
            Some(&iotlb_writer as &(dyn Fn() + Sync)),
        ),
    ] {
        let mut tally = Tally::default();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| run(iters, &iotlb_reader, writer, &mut tally))
        });
        report(name, &tally);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion();
    targets = concurrent
}
criterion_main!(benches);
