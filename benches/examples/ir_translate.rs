// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Instruction counts of the translation read path, the load-independent
//! companion of the `translate_hit` criterion bench: the same population
//! (64K scattered pages) and hot set, each variant in its own
//! `#[inline(never)]` function so callgrind can count just that loop:
//!
//! ```sh
//! cargo build --release -p pvdma-benches --example ir_translate
//! tools/ir-translate.sh            # every variant, Ir per translation
//! ```
//!
//! Run by hand: `valgrind --tool=callgrind --collect-atstart=no
//! --toggle-collect='ir_translate::run_*' target/release/examples/ir_translate
//! VARIANT`; the Ir total divided by [`ITERS`] * [`HOT`] is the cost of one
//! one-page translation.

use std::hint::black_box;

use pvdma::epoch::{self, Guard};
use pvdma::{Access, Vm, PAGE_SHIFT, PAGE_SIZE};
use pvdma::{Domain, FragmentSink};
use pvdma_benches::*;

/// Mapped pages (the 64K row of `translate_hit`).
const PAGES: u64 = 1 << 16;
/// Passes over the hot set.
const ITERS: usize = 200;

#[inline(never)]
fn run_table_lookup(domain: &Domain, hot: &[u64], guard: &Guard) -> u64 {
    let table = domain.table();
    let mut acc = 0u64;
    for _ in 0..ITERS {
        for &iova in hot {
            let gpa = table.lookup(black_box(iova), guard).map_or(0, |l| l.gpa);
            acc = acc.wrapping_add(gpa);
        }
    }
    acc
}

#[inline(never)]
fn run_domain_translate(domain: &Domain, vm: &Vm, hot: &[u64], guard: &Guard) -> u64 {
    let mut out = fragments::<1>();
    let mut acc = 0u64;
    vm.with_ram(|ram| {
        for _ in 0..ITERS {
            for &iova in hot {
                let mut sink = FragmentSink::new(&mut out);
                let r = domain.translate(
                    black_box(iova),
                    PAGE_SIZE,
                    Access::Read,
                    ram,
                    guard,
                    &mut sink,
                );
                assert!(r.is_ok());
                acc = acc.wrapping_add(out[0].gpa);
            }
        }
    });
    acc
}

#[inline(never)]
fn run_vm_translate_in(vm: &Vm, hot: &[u64], guard: &Guard) -> u64 {
    let mut out = fragments::<1>();
    let mut acc = 0u64;
    for _ in 0..ITERS {
        for &iova in hot {
            let r = vm.translate_in(
                EP,
                black_box(iova),
                PAGE_SIZE,
                Access::Read,
                &mut out,
                guard,
            );
            assert_eq!(r, Ok(1));
            acc = acc.wrapping_add(out[0].gpa);
        }
    }
    acc
}

#[inline(never)]
fn run_vm_translate(vm: &Vm, hot: &[u64]) -> u64 {
    let mut out = fragments::<1>();
    let mut acc = 0u64;
    for _ in 0..ITERS {
        for &iova in hot {
            let r = vm.translate(EP, black_box(iova), PAGE_SIZE, Access::Read, &mut out);
            assert_eq!(r, Ok(1));
            acc = acc.wrapping_add(out[0].gpa);
        }
    }
    acc
}

#[inline(never)]
fn run_vm_lookup(vm: &Vm, hot: &[u64]) -> u64 {
    let mut acc = 0u64;
    for _ in 0..ITERS {
        for &iova in hot {
            let l = vm.lookup(EP, black_box(iova), Some(Access::Read));
            acc = acc.wrapping_add(l.map_or(0, |l| l.gpa));
        }
    }
    acc
}

#[inline(never)]
fn run_translator_translate_in(vm: &Vm, hot: &[u64], guard: &Guard) -> u64 {
    let t = vm.translator(EP).expect("endpoint");
    let mut out = fragments::<1>();
    let mut acc = 0u64;
    for _ in 0..ITERS {
        for &iova in hot {
            let r = t.translate_in(black_box(iova), PAGE_SIZE, Access::Read, &mut out, guard);
            assert_eq!(r, Ok(1));
            acc = acc.wrapping_add(out[0].gpa);
        }
    }
    acc
}

#[inline(never)]
fn run_translator_translate(vm: &Vm, hot: &[u64], guard: &Guard) -> u64 {
    let t = vm.translator(EP).expect("endpoint");
    let mut out = fragments::<1>();
    let mut acc = 0u64;
    for _ in 0..ITERS {
        for &iova in hot {
            let r = t.translate(black_box(iova), PAGE_SIZE, Access::Read, &mut out, guard);
            assert_eq!(r, Ok(1));
            acc = acc.wrapping_add(out[0].gpa);
        }
    }
    acc
}

#[inline(never)]
fn run_translator_lookup(vm: &Vm, hot: &[u64], guard: &Guard) -> u64 {
    let t = vm.translator(EP).expect("endpoint");
    let mut acc = 0u64;
    for _ in 0..ITERS {
        for &iova in hot {
            let l = t.lookup(black_box(iova), Some(Access::Read), guard);
            acc = acc.wrapping_add(l.map_or(0, |l| l.gpa));
        }
    }
    acc
}

#[inline(never)]
fn run_translator_cached_translate(vm: &Vm, hot: &[u64], guard: &Guard) -> u64 {
    let mut t = vm.cached_translator(EP).expect("endpoint");
    let mut out = fragments::<1>();
    let mut acc = 0u64;
    for _ in 0..ITERS {
        for &iova in hot {
            let r = t.translate(black_box(iova), PAGE_SIZE, Access::Read, &mut out, guard);
            assert_eq!(r, Ok(1));
            acc = acc.wrapping_add(out[0].gpa);
        }
    }
    acc
}

#[inline(never)]
fn run_translator_cached_lookup(vm: &Vm, hot: &[u64], guard: &Guard) -> u64 {
    let mut t = vm.cached_translator(EP).expect("endpoint");
    let mut acc = 0u64;
    for _ in 0..ITERS {
        for &iova in hot {
            let l = t.lookup(black_box(iova), Some(Access::Read), guard);
            acc = acc.wrapping_add(l.map_or(0, |l| l.gpa));
        }
    }
    acc
}

fn main() {
    let variant = std::env::args().nth(1).unwrap_or_default();
    let guest = Guest::populated(PAGES);
    let (domain, _pins) = domain_populated(&guest, PAGES);
    let hot = hot_iovas(PAGES, HOT, 0x5eed);
    let want = hot
        .iter()
        .map(|&iova| gpa_of((iova - IOVA_BASE) >> PAGE_SHIFT))
        .fold(0, u64::wrapping_add)
        .wrapping_mul(ITERS as u64);
    let vm = &guest.vm;
    let guard = epoch::pin();
    let got = match variant.as_str() {
        "table_lookup" => run_table_lookup(&domain, &hot, &guard),
        "domain_translate" => run_domain_translate(&domain, vm, &hot, &guard),
        "vm_translate_in" => run_vm_translate_in(vm, &hot, &guard),
        "vm_translate" => run_vm_translate(vm, &hot),
        "vm_lookup" => run_vm_lookup(vm, &hot),
        "translator_translate_in" => run_translator_translate_in(vm, &hot, &guard),
        "translator_translate" => run_translator_translate(vm, &hot, &guard),
        "translator_lookup" => run_translator_lookup(vm, &hot, &guard),
        "translator_cached_translate" => run_translator_cached_translate(vm, &hot, &guard),
        "translator_cached_lookup" => run_translator_cached_lookup(vm, &hot, &guard),
        _ => {
            eprintln!("usage: ir_translate VARIANT (see tools/ir-translate.sh)");
            std::process::exit(2);
        }
    };
    assert_eq!(got, want, "{variant}: wrong translations");
    println!("{variant}: {} translations", ITERS * HOT);
}
