// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Single-page translation hits over a hot set of [`HOT`] pages drawn from
//! 1K, 64K and 1M mapped pages: pvdma's lock-free paths (raw table walk
//! under a held epoch guard, in the default 48-bit table and in a 39-bit
//! one that has a level less, the domain translation to a host address, and
//! the VM entry points, a per-endpoint `Translator` handle and the
//! single-address `Vm::lookup`) beside vm-memory's `Iotlb` under an `RwLock` and a
//! `BTreeMap` under a `Mutex`.
//!
//! Each iteration translates the whole hot set once (independent lookups),
//! so the per-translation time is the mean divided by [`HOT`] (criterion's
//! element throughput says the same).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pvdma::epoch;
use pvdma::FragmentSink;
use pvdma::IoPageTable;
use pvdma::{Access, Perm, PAGE_SHIFT, PAGE_SIZE};
use pvdma_benches::*;

fn translate_hit(c: &mut Criterion) {
    let mut group = c.benchmark_group("translate_hit");
    group.throughput(Throughput::Elements(HOT as u64));
    for pages in SIZES {
        let guest = Guest::populated(pages);
        let (domain, _pins) = domain_populated(&guest, pages);
        let iotlb = iotlb_populated(pages);
        let btree = btree_populated(pages);
        let hot = hot_iovas(pages, HOT, 0x5eed);
        let want: u64 = hot
            .iter()
            .map(|&iova| gpa_of((iova - IOVA_BASE) >> PAGE_SHIFT))
            .fold(0, u64::wrapping_add);

        group.bench_with_input(
            BenchmarkId::new("pvdma_table_lookup", pages),
            &hot,
            |b, hot| {
                let guard = epoch::pin();
                let table = domain.table();
                let sum = |hot: &[u64]| {
                    hot.iter().fold(0u64, |acc, &iova| {
                        let gpa = table.lookup(black_box(iova), &guard).map_or(0, |l| l.gpa);
                        acc.wrapping_add(gpa)
                    })
                };
                assert_eq!(sum(hot), want);
                b.iter(|| sum(hot));
            },
        );

        // The same walk in a 39-bit table (3 levels instead of 4): what one
        // level of the radix walk costs.
        let narrow = IoPageTable::new(39);
        {
            let mut writer = narrow.lock();
            for i in 0..pages {
                writer.map(iova_of(i), gpa_of(i), PAGE_SIZE, Perm::RW);
            }
        }
        group.bench_with_input(
            BenchmarkId::new("pvdma_table_lookup_39bit", pages),
            &hot,
            |b, hot| {
                let guard = epoch::pin();
                let sum = |hot: &[u64]| {
                    hot.iter().fold(0u64, |acc, &iova| {
                        let gpa = narrow.lookup(black_box(iova), &guard).map_or(0, |l| l.gpa);
                        acc.wrapping_add(gpa)
                    })
                };
                assert_eq!(sum(hot), want);
                b.iter(|| sum(hot));
            },
        );

        group.bench_with_input(
            BenchmarkId::new("pvdma_domain_translate", pages),
            &hot,
            |b, hot| {
                let guard = epoch::pin();
                guest.vm.with_ram(|ram| {
                    let mut out = fragments::<1>();
                    let mut sum = |hot: &[u64]| {
                        hot.iter().fold(0u64, |acc, &iova| {
                            let mut sink = FragmentSink::new(&mut out);
                            let r = domain.translate(
                                black_box(iova),
                                PAGE_SIZE,
                                Access::Read,
                                ram,
                                &guard,
                                &mut sink,
                            );
                            debug_assert!(r.is_ok() && sink.count() == 1);
                            acc.wrapping_add(out[0].gpa)
                        })
                    };
                    assert_eq!(sum(hot), want);
                    b.iter(|| sum(hot));
                });
            },
        );

        group.bench_with_input(
            BenchmarkId::new("pvdma_vm_translate_in", pages),
            &hot,
            |b, hot| {
                let guard = epoch::pin();
                let mut out = fragments::<1>();
                let mut sum = |hot: &[u64]| {
                    hot.iter().fold(0u64, |acc, &iova| {
                        let r = guest.vm.translate_in(
                            EP,
                            black_box(iova),
                            PAGE_SIZE,
                            Access::Read,
                            &mut out,
                            &guard,
                        );
                        debug_assert_eq!(r, Ok(1));
                        acc.wrapping_add(out[0].gpa)
                    })
                };
                assert_eq!(sum(hot), want);
                b.iter(|| sum(hot));
            },
        );

        group.bench_with_input(
            BenchmarkId::new("pvdma_vm_translate", pages),
            &hot,
            |b, hot| {
                let mut out = fragments::<1>();
                let mut sum = |hot: &[u64]| {
                    hot.iter().fold(0u64, |acc, &iova| {
                        let r = guest.vm.translate(
                            EP,
                            black_box(iova),
                            PAGE_SIZE,
                            Access::Read,
                            &mut out,
                        );
                        debug_assert_eq!(r, Ok(1));
                        acc.wrapping_add(out[0].gpa)
                    })
                };
                assert_eq!(sum(hot), want);
                b.iter(|| sum(hot));
            },
        );

        // A device model's handle (`Vm::translator`): the requester ID
        // resolved once; counted and fault-logged like `Vm::translate`,
        // under a held guard like `translate_in`.
        group.bench_with_input(
            BenchmarkId::new("pvdma_translator", pages),
            &hot,
            |b, hot| {
                let guard = epoch::pin();
                let translator = guest.vm.translator(EP).expect("endpoint");
                let mut out = fragments::<1>();
                let mut sum = |hot: &[u64]| {
                    hot.iter().fold(0u64, |acc, &iova| {
                        let r = translator.translate(
                            black_box(iova),
                            PAGE_SIZE,
                            Access::Read,
                            &mut out,
                            &guard,
                        );
                        debug_assert_eq!(r, Ok(1));
                        acc.wrapping_add(out[0].gpa)
                    })
                };
                assert_eq!(sum(hot), want);
                b.iter(|| sum(hot));
            },
        );

        // The same handle with its software IOTLB (`Translator::cached`):
        // the hot set is 256 random pages in 1024 direct-mapped entries, so
        // some collide and miss on every pass (about a fifth: this is not
        // an all-hits figure).
        group.bench_with_input(
            BenchmarkId::new("pvdma_translator_cached", pages),
            &hot,
            |b, hot| {
                let guard = epoch::pin();
                let mut translator = guest.vm.cached_translator(EP).expect("endpoint");
                let mut out = fragments::<1>();
                let mut sum = |hot: &[u64]| {
                    hot.iter().fold(0u64, |acc, &iova| {
                        let r = translator.translate(
                            black_box(iova),
                            PAGE_SIZE,
                            Access::Read,
                            &mut out,
                            &guard,
                        );
                        debug_assert_eq!(r, Ok(1));
                        acc.wrapping_add(out[0].gpa)
                    })
                };
                assert_eq!(sum(hot), want);
                b.iter(|| sum(hot));
            },
        );

        // `Translator::lookup` (the IOMMU-style single address, counted)
        // without and with the IOTLB.
        group.bench_with_input(
            BenchmarkId::new("pvdma_translator_lookup", pages),
            &hot,
            |b, hot| {
                let guard = epoch::pin();
                let translator = guest.vm.translator(EP).expect("endpoint");
                let sum = |hot: &[u64]| {
                    hot.iter().fold(0u64, |acc, &iova| {
                        let l = translator.lookup(black_box(iova), Some(Access::Read), &guard);
                        acc.wrapping_add(l.map_or(0, |l| l.gpa))
                    })
                };
                assert_eq!(sum(hot), want);
                b.iter(|| sum(hot));
            },
        );
        group.bench_with_input(
            BenchmarkId::new("pvdma_translator_lookup_cached", pages),
            &hot,
            |b, hot| {
                let guard = epoch::pin();
                let mut translator = guest.vm.cached_translator(EP).expect("endpoint");
                let mut sum = |hot: &[u64]| {
                    hot.iter().fold(0u64, |acc, &iova| {
                        let l = translator.lookup(black_box(iova), Some(Access::Read), &guard);
                        acc.wrapping_add(l.map_or(0, |l| l.gpa))
                    })
                };
                assert_eq!(sum(hot), want);
                b.iter(|| sum(hot));
            },
        );

        // The single-address lookup QEMU's IOMMU translate makes
        // (`pvdma_vm_lookup`): counts, then a hit in the thread-local
        // lookup cache (512 entries for the 256 hot pages: about 60% of
        // them hit, the rest collide and pin, find the endpoint and walk).
        group.bench_with_input(
            BenchmarkId::new("pvdma_vm_lookup", pages),
            &hot,
            |b, hot| {
                let sum = |hot: &[u64]| {
                    hot.iter().fold(0u64, |acc, &iova| {
                        let l = guest.vm.lookup(EP, black_box(iova), Some(Access::Read));
                        acc.wrapping_add(l.map_or(0, |l| l.gpa))
                    })
                };
                assert_eq!(sum(hot), want);
                b.iter(|| sum(hot));
            },
        );

        group.bench_with_input(
            BenchmarkId::new("vmm_iotlb_rwlock", pages),
            &hot,
            |b, hot| {
                let sum = |hot: &[u64]| {
                    hot.iter().fold(0u64, |acc, &iova| {
                        let gpa = iotlb_translate(&iotlb, black_box(iova), PAGE_SIZE as usize);
                        acc.wrapping_add(gpa)
                    })
                };
                assert_eq!(sum(hot), want);
                b.iter(|| sum(hot));
            },
        );

        group.bench_with_input(BenchmarkId::new("btreemap_mutex", pages), &hot, |b, hot| {
            let sum = |hot: &[u64]| {
                hot.iter().fold(0u64, |acc, &iova| {
                    let map = btree.lock().expect("no writer panics");
                    let page = black_box(iova) >> PAGE_SHIFT;
                    acc.wrapping_add(map.get(&page).copied().unwrap_or(0))
                })
            };
            assert_eq!(sum(hot), want);
            b.iter(|| sum(hot));
        });
    }
    group.finish();
}

/// Evidence for a proposed change, not a pvdma benchmark: `Vm::translate_in`
/// finds the endpoint in a `HashMap<u32, Arc<Endpoint>>` with the default
/// SipHash hasher on every translation. This measures that lookup beside a
/// cheap multiplicative hasher and a direct index by requester ID (16 bits),
/// with the two endpoints a test guest has.
fn endpoint_lookup(c: &mut Criterion) {
    use std::collections::HashMap;
    use std::hash::{BuildHasherDefault, Hasher};
    use std::sync::Arc;

    /// A Fibonacci-multiplicative hasher for small integer keys.
    #[derive(Default)]
    struct MulHasher(u64);
    impl Hasher for MulHasher {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            }
        }
        fn write_u32(&mut self, n: u32) {
            self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    let rids = [EP, 0x0018];
    let keys: Vec<u32> = (0..HOT).map(|k| rids[k % 2]).collect();
    let sip: HashMap<u32, Arc<u64>> = rids.iter().map(|&r| (r, Arc::new(u64::from(r)))).collect();
    let mul: HashMap<u32, Arc<u64>, BuildHasherDefault<MulHasher>> =
        rids.iter().map(|&r| (r, Arc::new(u64::from(r)))).collect();
    let mut direct: Vec<Option<Arc<u64>>> = vec![None; 1 << 16];
    for &r in &rids {
        direct[r as usize] = Some(Arc::new(u64::from(r)));
    }

    let mut group = c.benchmark_group("endpoint_lookup");
    group.throughput(Throughput::Elements(HOT as u64));
    group.bench_function("siphash_hashmap", |b| {
        b.iter(|| {
            keys.iter()
                .fold(0u64, |acc, &k| acc.wrapping_add(*sip[&black_box(k)]))
        })
    });
    group.bench_function("mul_hasher_hashmap", |b| {
        b.iter(|| {
            keys.iter()
                .fold(0u64, |acc, &k| acc.wrapping_add(*mul[&black_box(k)]))
        })
    });
    group.bench_function("direct_index", |b| {
        b.iter(|| {
            keys.iter().fold(0u64, |acc, &k| {
                let ep = direct[black_box(k) as usize & 0xffff].as_ref();
                acc.wrapping_add(ep.map_or(0, |e| **e))
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion();
    targets = translate_hit, endpoint_lookup
}
criterion_main!(benches);
