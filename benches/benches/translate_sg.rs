// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A 64 KiB translation over 16 scattered pages (16 fragments), as a
//! device reading one scatter-gather buffer does, in a domain of 64K mapped
//! pages: pvdma's paths beside vm-memory's `Iotlb` under an `RwLock` and a
//! `BTreeMap` under a `Mutex`.
//!
//! Each iteration translates [`BUFFERS`] buffers drawn from the population
//! (one MAP of 16 pages each); the per-buffer time is the mean divided by
//! [`BUFFERS`] (criterion's element throughput).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pvdma::epoch;
use pvdma::FragmentSink;
use pvdma::{Access, PAGE_SHIFT, PAGE_SIZE};
use pvdma_benches::*;
use vm_memory::{GuestAddress, Iotlb, Permissions};

/// Mapped pages.
const PAGES: u64 = 1 << 16;
/// Buffers translated per iteration.
const BUFFERS: usize = 64;
/// Bytes per buffer: [`SEGS_PER_MAP`] pages.
const LEN: u64 = SEGS_PER_MAP * PAGE_SIZE;

fn translate_sg(c: &mut Criterion) {
    let mut group = c.benchmark_group("translate_sg");
    group.throughput(Throughput::Elements(BUFFERS as u64));
    let guest = Guest::populated(PAGES);
    let (domain, _pins) = domain_populated(&guest, PAGES);
    let iotlb = iotlb_populated(PAGES);
    let btree = btree_populated(PAGES);
    // Each buffer is one whole MAP of SEGS_PER_MAP scattered pages.
    let buffers: Vec<u64> = (0..BUFFERS as u64)
        .map(|k| iova_of(mix(0xb0f ^ k) % (PAGES / SEGS_PER_MAP) * SEGS_PER_MAP))
        .collect();
    let want: u64 = buffers
        .iter()
        .flat_map(|&iova| {
            let first = (iova - IOVA_BASE) >> PAGE_SHIFT;
            (first..first + SEGS_PER_MAP).map(gpa_of)
        })
        .fold(0, u64::wrapping_add);

    group.bench_function("pvdma_table_lookup", |b| {
        let guard = epoch::pin();
        let table = domain.table();
        let sum = || {
            buffers.iter().fold(0u64, |mut acc, &iova| {
                let (mut cur, end) = (black_box(iova), iova + LEN);
                while cur < end {
                    let leaf = table.lookup(cur, &guard).expect("mapped");
                    acc = acc.wrapping_add(leaf.gpa);
                    cur += leaf.run.min(end - cur);
                }
                acc
            })
        };
        assert_eq!(sum(), want);
        b.iter(sum);
    });

    group.bench_function("pvdma_domain_translate", |b| {
        let guard = epoch::pin();
        guest.vm.with_ram(|ram| {
            let mut out = fragments::<16>();
            let mut sum = || {
                buffers.iter().fold(0u64, |acc, &iova| {
                    let mut sink = FragmentSink::new(&mut out);
                    let r = domain.translate(
                        black_box(iova),
                        LEN,
                        Access::Read,
                        ram,
                        &guard,
                        &mut sink,
                    );
                    debug_assert!(r.is_ok() && sink.count() == 16);
                    out.iter().fold(acc, |a, f| a.wrapping_add(f.gpa))
                })
            };
            assert_eq!(sum(), want);
            b.iter(&mut sum);
        });
    });

    group.bench_function("pvdma_vm_translate_in", |b| {
        let guard = epoch::pin();
        let mut out = fragments::<16>();
        let mut sum = || {
            buffers.iter().fold(0u64, |acc, &iova| {
                let r =
                    guest
                        .vm
                        .translate_in(EP, black_box(iova), LEN, Access::Read, &mut out, &guard);
                debug_assert_eq!(r, Ok(16));
                out.iter().fold(acc, |a, f| a.wrapping_add(f.gpa))
            })
        };
        assert_eq!(sum(), want);
        b.iter(&mut sum);
    });

    group.bench_function("pvdma_vm_translate", |b| {
        let mut out = fragments::<16>();
        let mut sum = || {
            buffers.iter().fold(0u64, |acc, &iova| {
                let r = guest
                    .vm
                    .translate(EP, black_box(iova), LEN, Access::Read, &mut out);
                debug_assert_eq!(r, Ok(16));
                out.iter().fold(acc, |a, f| a.wrapping_add(f.gpa))
            })
        };
        assert_eq!(sum(), want);
        b.iter(&mut sum);
    });

    group.bench_function("pvdma_translator", |b| {
        let guard = epoch::pin();
        let translator = guest.vm.translator(EP).expect("endpoint");
        let mut out = fragments::<16>();
        let mut sum = || {
            buffers.iter().fold(0u64, |acc, &iova| {
                let r = translator.translate(black_box(iova), LEN, Access::Read, &mut out, &guard);
                debug_assert_eq!(r, Ok(16));
                out.iter().fold(acc, |a, f| a.wrapping_add(f.gpa))
            })
        };
        assert_eq!(sum(), want);
        b.iter(&mut sum);
    });

    group.bench_function("vmm_iotlb_rwlock", |b| {
        let sum = || {
            buffers.iter().fold(0u64, |acc, &iova| {
                let guard = iotlb.read().expect("no writer panics");
                let ranges = Iotlb::lookup(
                    &*guard,
                    GuestAddress(black_box(iova)),
                    LEN as usize,
                    Permissions::Read,
                )
                .expect("mapped");
                ranges.fold(acc, |a, r| a.wrapping_add(r.base.0))
            })
        };
        assert_eq!(sum(), want);
        b.iter(sum);
    });

    group.bench_function("btreemap_mutex", |b| {
        let sum = || {
            buffers.iter().fold(0u64, |acc, &iova| {
                let map = btree.lock().expect("no writer panics");
                let first = black_box(iova) >> PAGE_SHIFT;
                (first..first + SEGS_PER_MAP).fold(acc, |a, page| {
                    a.wrapping_add(*map.get(&page).expect("mapped"))
                })
            })
        };
        assert_eq!(sum(), want);
        b.iter(sum);
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion();
    targets = translate_sg
}
criterion_main!(benches);
