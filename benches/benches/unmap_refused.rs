// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Refused UNMAPs in a domain of 400,000 mapping records, beside a
//! successful one-page MAP + UNMAP in the same domain and run (the
//! baseline: `bench.sh` prints each refusal's time over it).
//!
//! A guest chooses its failing requests, and every one runs under QEMU's
//! global lock, so a refusal must not cost more as the domain grows:
//!
//! - `pvdma_refused_range`: UNMAP from the second page of a two-page
//!   mapping (RANGE; it used to search every record for the crossing
//!   mapping);
//! - `pvdma_refused_range_wide`: UNMAP of the whole population and the
//!   first page of the two-page mapping past it (RANGE after 400,000
//!   mappings inside, which it used to walk first);
//! - `pvdma_refused_noent`: UNMAP of an empty range (NOENT);
//! - `pvdma_refused_list_noent`: UNMAP_LIST of the whole population and
//!   an empty range (NOENT after 400,000 mappings in the first range);
//! - `ok_map_unmap`: MAP + UNMAP of one page in a hole of the population
//!   (the baseline).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pvdma::testing;
use pvdma::{Status, PAGE_SIZE};
use pvdma_benches::*;

/// Mapping records: one page each.
const RECORDS: u64 = 400_000;
/// A page in the middle of the population, left unmapped for the baseline.
const HOLE: u64 = RECORDS / 2;

fn unmap_refused(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmap_refused");
    group.throughput(Throughput::Elements(1));
    let guest = Guest::new();
    for i in (0..RECORDS).filter(|&i| i != HOLE) {
        guest.execute(&map_request(iova_of(i), segs_of(i, 1)));
    }
    // Two pages past the population, one mapping; then an empty range.
    let two = iova_of(RECORDS);
    guest.execute(&map_request(two, segs_of(RECORDS, 2)));
    let empty = iova_of(RECORDS + 16);
    let all = RECORDS * PAGE_SIZE;

    let refused = [
        (
            "pvdma_refused_range",
            unmap_request(two + PAGE_SIZE, PAGE_SIZE),
            Status::Range,
        ),
        (
            "pvdma_refused_range_wide",
            unmap_request(iova_of(0), all + PAGE_SIZE),
            Status::Range,
        ),
        (
            "pvdma_refused_noent",
            unmap_request(empty, 16 * PAGE_SIZE),
            Status::NoEnt,
        ),
        (
            "pvdma_refused_list_noent",
            testing::unmap_list_req(EP, &[(iova_of(0), all), (empty, PAGE_SIZE)]),
            Status::NoEnt,
        ),
    ];
    for (name, req, want) in &refused {
        assert_eq!(guest.vm.execute(req).status, *want, "{name}");
        group.bench_function(*name, |b| {
            b.iter(|| {
                let status = guest.vm.execute(black_box(req)).status;
                assert!(status == *want);
            })
        });
    }

    let map = map_request(iova_of(HOLE), segs_of(HOLE, 1));
    let unmap = unmap_request(iova_of(HOLE), PAGE_SIZE);
    group.bench_function("ok_map_unmap", |b| {
        b.iter(|| {
            let mapped = guest.vm.execute(black_box(&map)).status;
            let unmapped = guest.vm.execute(black_box(&unmap)).status;
            assert!(mapped == Status::Ok && unmapped == Status::Ok);
        })
    });
    assert_eq!(guest.vm.stats().mappings, RECORDS);
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion();
    targets = unmap_refused
}
criterion_main!(benches);
