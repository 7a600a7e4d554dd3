// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The translation read path: the endpoint index, translation handles
//! ([`pvdma::Translator`]) and the exactness of the translation count.

mod common;

use common::*;
use pvdma::epoch;
use pvdma::FaultReason;
use pvdma::Lookup;
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

/// What the reader thread of the test below must see in a phase.
const EXPECT_UNMAPPED: u64 = 1;
const EXPECT_UNATTACHED: u64 = 2;

/// A `CachedTranslator` (and `Vm::lookup`, with its thread-local cache)
/// on another thread, its cache filled with a page's translation, never
/// serves that translation once UNMAP, DETACH or the
/// removal of the page's RAM has returned, nor a mapping made in the
/// previous attachment. Lock-step: the writer does one operation, then
/// publishes what every translation from now on must give, and waits until
/// the reader has checked it (several times, so also from the cache).
#[test]
fn cached_translator_is_never_stale_across_threads() {
    use std::sync::atomic::{AtomicU64, Ordering};

    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    let phase = AtomicU64::new(0);
    let expect = AtomicU64::new(EXPECT_UNMAPPED);
    let ack = AtomicU64::new(0);
    const DONE: u64 = u64::MAX;
    let blocked = if g.vm.config().bypass {
        None
    } else {
        Some(FaultReason::Blocked)
    };

    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut tr = g.vm.cached_translator(EP).expect("endpoint");
            let mut out = frags::<1>();
            let mut seen = 0;
            loop {
                let p = phase.load(Ordering::Acquire);
                if p == DONE {
                    break;
                }
                if p == seen {
                    std::hint::spin_loop();
                    continue;
                }
                let want = expect.load(Ordering::Relaxed);
                for _ in 0..3 {
                    let guard = epoch::pin();
                    let l = tr.lookup(IOVA + 8, Some(Access::Read), &guard);
                    let t = tr.translate_in(IOVA, PAGE_SIZE, Access::Read, &mut out, &guard);
                    // `Vm::lookup` and its thread-local cache: the same.
                    assert_eq!(
                        g.vm.lookup(EP, IOVA + 8, Some(Access::Read)),
                        l,
                        "phase {p}"
                    );
                    match want {
                        EXPECT_UNMAPPED => {
                            assert_eq!(l.unwrap_err().reason, FaultReason::Unmapped, "phase {p}");
                            assert_eq!(t.unwrap_err().reason, FaultReason::Unmapped, "phase {p}");
                        }
                        EXPECT_UNATTACHED => match blocked {
                            Some(reason) => assert_eq!(l.unwrap_err().reason, reason),
                            None => {
                                let l = l.unwrap();
                                assert!(l.bypass && l.gpa == IOVA + 8, "phase {p}: {l:?}");
                            }
                        },
                        gpa => {
                            let l = l.unwrap_or_else(|f| panic!("phase {p}: {f}"));
                            assert_eq!((l.gpa, l.bypass), (gpa + 8, false), "phase {p}");
                            assert_eq!(t, Ok(1), "phase {p}");
                            assert_eq!((out[0].gpa, out[0].hva), (gpa, g.hva(gpa)), "phase {p}");
                        }
                    }
                }
                seen = p;
                ack.store(p, Ordering::Release);
            }
        });

        let mut p = 0;
        let mut publish = |want: u64| {
            p += 1;
            expect.store(want, Ordering::Relaxed);
            // Release: the operation that just returned happens before
            // every translation the reader makes for this phase.
            phase.store(p, Ordering::Release);
            while ack.load(Ordering::Acquire) != p {
                // A failed check ends the reader: fail, do not hang.
                assert!(!reader.is_finished(), "the reader failed in phase {p}");
                std::thread::yield_now();
            }
        };
        for round in 0..300u64 {
            let page = (round % 7) * PAGE_SIZE;
            match round % 3 {
                0 => {
                    let gpa = GPA + page;
                    assert_eq!(
                        g.map(EP, RW | FIXED, IOVA, &[(gpa, PAGE_SIZE)]).status,
                        Status::Ok
                    );
                    publish(gpa);
                    assert_eq!(g.unmap(EP, IOVA, 0).status, Status::Ok);
                    publish(EXPECT_UNMAPPED);
                }
                1 => {
                    let gpa = GPA + 0x10_0000 + page;
                    assert_eq!(
                        g.map(EP, RW | FIXED, IOVA, &[(gpa, PAGE_SIZE)]).status,
                        Status::Ok
                    );
                    publish(gpa);
                    assert_eq!(g.detach(EP).status, Status::Ok);
                    publish(EXPECT_UNATTACHED);
                    assert_eq!(g.attach(EP), Status::Ok);
                    publish(EXPECT_UNMAPPED);
                }
                _ => {
                    let gpa = HIGH.0 + page;
                    assert_eq!(
                        g.map(EP, RW | FIXED, IOVA, &[(gpa, PAGE_SIZE)]).status,
                        Status::Ok
                    );
                    publish(gpa);
                    assert_eq!(g.vm.remove_ram_region(HIGH.0, HIGH.1).unwrap(), 1);
                    publish(EXPECT_UNMAPPED);
                    // SAFETY: `g.mem` owns this memory and outlives the VM.
                    unsafe { g.vm.add_ram_region(HIGH.0, HIGH.1, g.hva(HIGH.0)) }.unwrap();
                }
            }
        }
        phase.store(DONE, Ordering::Release);
    });
}
