// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The translation read path: the endpoint index, translation handles
//! ([`pvdma::vm::Translator`]) and the exactness of the translation count.

mod common;

use common::*;
use pvdma::domain::FaultReason;
use pvdma::sync::epoch;
use pvdma::vm::Lookup;
use pvdma::{Access, Fragment, Perm, Status, Vm, VmConfig, PAGE_SIZE};

const IOVA: u64 = 0x10_0000;
const GPA: u64 = 0x20_0000;

fn frags<const N: usize>() -> [Fragment; N] {
    [Fragment {
        hva: 0,
        gpa: 0,
        len: 0,
    }; N]
}

fn mapped_guest() -> Guest {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    assert_eq!(
        g.map(EP, RW | FIXED, IOVA, &[(GPA, PAGE_SIZE)]).status,
        Status::Ok
    );
    g
}

#[test]
fn endpoints_are_indexed_by_every_requester_id() {
    let vm = Vm::new(VmConfig::default()).unwrap();
    // Corners of the bus/devfn index, several devfns on one bus.
    let rids = [
        0x0000, 0x00ff, 0x0100, 0x0108, 0x01ff, 0x8000, 0xff00, 0xffff,
    ];
    for &rid in rids.iter().rev() {
        vm.add_endpoint(rid, None).unwrap();
    }
    assert_eq!(vm.endpoints(), rids.to_vec());
    assert!(vm.add_endpoint(0x0108, None).is_err());
    assert!(vm.add_endpoint(0x1_0000, None).is_err());
    for &rid in &rids {
        assert_eq!(vm.endpoint(rid).unwrap().requester(), rid);
        assert!(vm.translator(rid).is_some());
    }
    for rid in [0x0001, 0x0200, 0xfffe, 0x1_0000, 0x1_0108, u32::MAX] {
        assert!(vm.endpoint(rid).is_none(), "{rid:#x}");
        assert!(vm.translator(rid).is_none(), "{rid:#x}");
        let f = vm.lookup(rid, 0x1000, None).unwrap_err();
        assert_eq!(f.reason, FaultReason::NoDevice);
    }
    // Emptying a bus and refilling it.
    vm.remove_endpoint(0x0100).unwrap();
    vm.remove_endpoint(0x0108).unwrap();
    vm.remove_endpoint(0x01ff).unwrap();
    assert!(vm.remove_endpoint(0x0108).is_err());
    assert_eq!(vm.endpoints(), vec![0x0000, 0x00ff, 0x8000, 0xff00, 0xffff]);
    vm.add_endpoint(0x0142, None).unwrap();
    assert_eq!(
        vm.endpoints(),
        vec![0x0000, 0x00ff, 0x0142, 0x8000, 0xff00, 0xffff]
    );
}

#[test]
fn translator_agrees_with_the_vm() {
    let g = mapped_guest();
    let t = g.vm.translator(EP).unwrap();
    assert_eq!(t.requester(), EP);
    let guard = epoch::pin();
    for iova in [
        IOVA,
        IOVA + 0x123,
        IOVA + PAGE_SIZE - 1,
        IOVA + PAGE_SIZE,
        0,
    ] {
        for access in [Access::Read, Access::Write, Access::ReadWrite] {
            let (mut a, mut b) = (frags::<2>(), frags::<2>());
            let by_rid = g.vm.translate(EP, iova, 16, access, &mut a);
            let by_handle = t.translate(iova, 16, access, &mut b, &guard);
            assert_eq!(by_rid, by_handle, "{iova:#x}");
            assert_eq!(a, b);
            assert_eq!(
                g.vm.lookup(EP, iova, Some(access)),
                t.lookup(iova, Some(access), &guard)
            );
        }
    }
    let l = t.lookup(IOVA + 8, None, &guard).unwrap();
    assert_eq!(
        l,
        Lookup {
            gpa: GPA + 8,
            run: PAGE_SIZE - 8,
            perms: Perm::RW,
            bypass: false
        }
    );
}

#[test]
fn translator_follows_detach_and_removal() {
    let g = mapped_guest();
    let t = g.vm.translator(EP).unwrap();
    let mut out = frags::<1>();
    let guard = epoch::pin;
    assert_eq!(
        t.translate(IOVA, 8, Access::Read, &mut out, &guard()),
        Ok(1)
    );
    assert_eq!(out[0].hva, g.hva(GPA));
    // Detached: bypass (identity), as for the VM.
    assert_eq!(g.detach(EP).status, Status::Ok);
    assert_eq!(t.translate(GPA, 8, Access::Read, &mut out, &guard()), Ok(1));
    assert_eq!(out[0].hva, g.hva(GPA));
    assert!(t.lookup(GPA, None, &guard()).unwrap().bypass);
    // Removed: refused, even once the requester ID is registered again.
    g.vm.remove_endpoint(EP).unwrap();
    let err = t
        .translate(GPA, 8, Access::Read, &mut out, &guard())
        .unwrap_err();
    assert_eq!(err.reason, FaultReason::NoDevice);
    g.vm.add_endpoint(EP, None).unwrap();
    for access in [None, Some(Access::Read)] {
        let err = t.lookup(GPA, access, &guard()).unwrap_err();
        assert_eq!(err.reason, FaultReason::NoDevice);
    }
    assert_eq!(g.vm.lookup(EP, GPA, None).map(|l| l.bypass), Ok(true));
    // A new handle sees the new endpoint.
    let t2 = g.vm.translator(EP).unwrap();
    assert_eq!(
        t2.translate(GPA, 8, Access::Read, &mut out, &guard()),
        Ok(1)
    );
}

#[test]
fn translator_is_blocked_without_bypass() {
    let g = Guest::with(VmConfig {
        bypass: false,
        ..VmConfig::default()
    });
    let t = g.vm.translator(EP).unwrap();
    let mut out = frags::<1>();
    let err = t
        .translate(GPA, 8, Access::Read, &mut out, &epoch::pin())
        .unwrap_err();
    assert_eq!(err.reason, FaultReason::Blocked);
    assert_eq!(g.vm.fault_count(), 1);
}

#[test]
fn translations_are_counted_exactly() {
    let g = mapped_guest();
    let mut out = frags::<1>();
    let guard = epoch::pin();
    let t = g.vm.translator(EP).unwrap();
    let base = g.vm.stats().translations;
    g.vm.translate(EP, IOVA, 8, Access::Read, &mut out).unwrap();
    // A refused access counts too.
    g.vm.translate(EP, 0, 8, Access::Read, &mut out)
        .unwrap_err();
    g.vm.lookup(EP, IOVA, Some(Access::Write)).unwrap();
    t.translate(IOVA, 8, Access::Read, &mut out, &guard)
        .unwrap();
    t.lookup(IOVA, Some(Access::Read), &guard).unwrap();
    // Not counted: looks and the caller-batched translate_in.
    g.vm.lookup(EP, IOVA, None).unwrap();
    t.lookup(IOVA, None, &guard).unwrap();
    g.vm.translate_in(EP, IOVA, 8, Access::Read, &mut out, &guard)
        .unwrap();
    t.translate_in(IOVA, 8, Access::Read, &mut out, &guard)
        .unwrap();
    assert_eq!(g.vm.stats().translations, base + 5);

    // Threads come and go (their counters are handed on), in several
    // rounds; every translation of a joined thread is in the count.
    const THREADS: u64 = 4;
    const EACH: u64 = 1000;
    for round in 1..=3u64 {
        std::thread::scope(|s| {
            for k in 0..THREADS {
                let (vm, t) = (&g.vm, &t);
                s.spawn(move || {
                    let mut out = frags::<1>();
                    for i in 0..EACH {
                        if (i + k) % 2 == 0 {
                            vm.translate(EP, IOVA, 8, Access::Read, &mut out).unwrap();
                        } else {
                            t.lookup(IOVA, Some(Access::Read), &epoch::pin()).unwrap();
                        }
                    }
                });
            }
        });
        assert_eq!(g.vm.stats().translations, base + 5 + round * THREADS * EACH);
    }

    // A second VM on the same threads keeps its own count.
    let other = mapped_guest();
    other
        .vm
        .translate(EP, IOVA, 8, Access::Read, &mut out)
        .unwrap();
    assert_eq!(other.vm.stats().translations, 1);
    g.vm.translate(EP, IOVA, 8, Access::Read, &mut out).unwrap();
    assert_eq!(g.vm.stats().translations, base + 6 + 3 * THREADS * EACH);
}

#[test]
fn counting_is_exact_while_stats_are_read() {
    let g = mapped_guest();
    const EACH: u64 = 20_000;
    std::thread::scope(|s| {
        for _ in 0..2 {
            let vm = &g.vm;
            s.spawn(move || {
                let mut out = frags::<1>();
                for _ in 0..EACH {
                    vm.translate(EP, IOVA, 8, Access::Read, &mut out).unwrap();
                }
            });
        }
        // Never goes backwards while the readers run.
        let mut last = 0;
        for _ in 0..1000 {
            let now = g.vm.stats().translations;
            assert!(now >= last);
            last = now;
        }
    });
    assert_eq!(g.vm.stats().translations, 2 * EACH);
}
