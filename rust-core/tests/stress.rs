// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Concurrency: lock-free readers against writers, racing requests, and
//! the notifier's view of a concurrent request stream.
//!
//! Every loop is bounded by an iteration count; nothing is timed. The
//! checks hold for every interleaving, so a failure is a real bug whatever
//! the scheduler did.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use common::*;
use pvdma::FaultReason;
use pvdma::{Access, Fragment, Op, Perm, Status, PAGE_SIZE};
use pvdma::{MapEvent, MapEventKind};

/// Map/unmap rounds per writer.
const ROUNDS: u64 = 1500;
/// IOVA slots per writer; each slot is a 2-page mapping.
const SLOTS: u64 = 4;
/// Generations a slot cycles through (each a different pair of pages).
const GENS: u64 = 8;
/// Upper bound on reader iterations, in case writers stall.
const READER_CAP: u64 = 5_000_000;

/// Request block of writer thread `t` (each thread needs its own).
fn block(t: u64) -> u64 {
    BLOCK + 0x1000 * (t + 1)
}

/// IOVA of slot `s` of writer `w`: 2 pages, with an in-page offset.
fn slot_iova(w: u64, s: u64) -> u64 {
    0x40_0000 + (w * SLOTS + s) * 0x10_000 + 0x80
}

/// Guest page of page `idx` (0 or 1) of generation `k` of slot `s` of
/// writer `w`. The two pages of a mapping are swapped (page 1 before page
/// 0 in guest memory) so a translation needs two fragments.
fn gpa_page(w: u64, s: u64, k: u64, idx: u64) -> u64 {
    let pair = 0x100 + ((w * SLOTS + s) * GENS + k) * 2;
    pair + (1 - idx)
}

fn map_segs(w: u64, s: u64, k: u64) -> [(u64, u64); 2] {
    [
        (gpa_page(w, s, k, 0) * PAGE_SIZE + 0x80, PAGE_SIZE - 0x80),
        (gpa_page(w, s, k, 1) * PAGE_SIZE, 0x800),
    ]
}

fn frags() -> [Fragment; 4] {
    [Fragment {
        hva: 0,
        gpa: 0,
        len: 0,
    }; 4]
}

/// Checks one reader translation of `len` bytes at `iova` (inside slot
/// `s` of writer `w`, starting `start` bytes into the slot): unmapped, or
/// every byte lands on a page some generation of that slot mapped there.
fn check_read(g: &Guest, rid: u32, w: u64, s: u64, start: u64, len: u64) {
    let base = slot_iova(w, s);
    let iova = base + start;
    let mut out = frags();
    match g.vm.translate(rid, iova, len, Access::Read, &mut out) {
        Err(f) => {
            assert_eq!(f.reason, FaultReason::Unmapped, "{f}");
            assert!(
                f.iova >= iova && f.iova < iova + len,
                "{f} outside the range"
            );
        }
        Ok(n) => {
            assert!(n <= out.len(), "{n} fragments for two pages");
            let mut cur = iova;
            for f in &out[..n] {
                assert_eq!(f.hva, g.hva(f.gpa), "hva of {:#x}", f.gpa);
                // Walk the fragment page by page: generations of adjacent
                // pages may meet guest-physically and be merged.
                let mut gpa = f.gpa;
                while gpa < f.gpa + f.len {
                    let idx = (cur - (base & !0xfff)) / PAGE_SIZE;
                    let page = gpa / PAGE_SIZE;
                    assert!(
                        (0..GENS).any(|k| gpa_page(w, s, k, idx) == page),
                        "iova {cur:#x} -> gpa {gpa:#x}: no generation of slot {s} mapped it"
                    );
                    assert_eq!(gpa % PAGE_SIZE, cur % PAGE_SIZE, "in-page offset");
                    let step = (PAGE_SIZE - gpa % PAGE_SIZE).min(f.gpa + f.len - gpa);
                    gpa += step;
                    cur += step;
                }
            }
            assert_eq!(
                cur,
                iova + len,
                "translation covered {:#x} of {len:#x}",
                cur - iova
            );
        }
    }
}

/// One writer: `ROUNDS` times, maps each of its slots FIXED to the next
/// generation and unmaps it again (by first page, or by range), checking
/// every status and that its own translations right after UNMAP fault.
fn writer(g: &Guest, t: u64, rid: u32, w: u64) {
    for round in 0..ROUNDS {
        let s = round % SLOTS;
        let k = (round / SLOTS) % GENS;
        let iova = slot_iova(w, s);
        let out = g.submit_at(block(t), &map_req(rid, R | FIXED, iova, &map_segs(w, s, k)));
        assert_eq!(out.status, Status::Ok, "writer {w} round {round}");
        assert_eq!((out.iova, out.length), (iova, PAGE_SIZE - 0x80 + 0x800));
        let mut u = req(pvdma::abi::Op::Unmap, rid);
        (u.iova, u.length) = if round % 2 == 0 {
            (iova, 0)
        } else {
            (iova & !0xfff, 2 * PAGE_SIZE)
        };
        let out = g.submit_at(block(t), &u);
        assert_eq!((out.status, out.result), (Status::Ok, 2 * PAGE_SIZE));
        // Nothing that starts after UNMAP returned reaches the range.
        let mut f = frags();
        let e =
            g.vm.translate(rid, iova, 1, Access::Read, &mut f)
                .unwrap_err();
        assert_eq!(e.reason, FaultReason::Unmapped, "after UNMAP returned");
    }
}

fn readers_vs_writers(same_endpoint: bool) {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    assert_eq!(g.attach(EP2), Status::Ok);
    // Writer w works on endpoint rids[w], slots of its own.
    let rids = if same_endpoint { [EP, EP] } else { [EP, EP2] };
    let done = AtomicBool::new(false);
    let writers_left = std::sync::atomic::AtomicUsize::new(2);
    thread::scope(|sc| {
        for w in 0..2u64 {
            let (g, done, left) = (&g, &done, &writers_left);
            sc.spawn(move || {
                writer(g, w, rids[w as usize], w);
                if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    done.store(true, Ordering::Release);
                }
            });
        }
        for r in 0..2u64 {
            let (g, done) = (&g, &done);
            sc.spawn(move || {
                let mut i = 0u64;
                while !done.load(Ordering::Acquire) && i < READER_CAP {
                    let w = (i + r) % 2;
                    let s = (i / 2) % SLOTS;
                    // One byte, one page, a page pair, and from the middle.
                    let (start, len) =
                        [(0, 1), (0, 0xf80), (0, 0xf80 + 0x800), (0x100, 0x800)][(i % 4) as usize];
                    check_read(g, rids[w as usize], w, s, start, len);
                    // Another endpoint's slots are never visible through
                    // this one (separate IOVA spaces).
                    if !same_endpoint {
                        let other = rids[1 - w as usize];
                        check_read(g, other, 1 - w, s, 0, 1);
                    }
                    i += 1;
                }
            });
        }
    });
    let s = g.vm.stats();
    assert_eq!((s.mappings, s.pinned_pages), (0, 0));
    assert!(g.vm.pins().snapshot().is_empty());
}

#[test]
fn readers_see_old_or_new_mapping_different_endpoints() {
    readers_vs_writers(false);
}

#[test]
fn readers_see_old_or_new_mapping_same_endpoint() {
    readers_vs_writers(true);
}

#[test]
fn racing_fixed_maps_one_wins_and_racing_unmaps_one_wins() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    let barrier = Barrier::new(2);
    for round in 0..300u64 {
        let iova = 0x20_0000 + (round % 7) * 0x3000;
        let gpas = [
            0x1_0000 + round % 5 * PAGE_SIZE,
            0x4_0000 + round % 3 * PAGE_SIZE,
        ];
        // Two MAP FIXED at the same IOVA, each of a different page.
        let outs: Vec<Out> = thread::scope(|sc| {
            let hs: Vec<_> = (0..2)
                .map(|t| {
                    let (g, b) = (&g, &barrier);
                    sc.spawn(move || {
                        b.wait();
                        g.submit_at(
                            block(t),
                            &map_req(EP, RW | FIXED, iova, &[(gpas[t as usize], 0x1000)]),
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let st: Vec<Status> = outs.iter().map(|o| o.status).collect();
        let winner = match st[..] {
            [Status::Ok, Status::Exist] => 0,
            [Status::Exist, Status::Ok] => 1,
            _ => panic!("round {round}: {st:?}, want one OK and one EXIST"),
        };
        let mut f = frags();
        assert_eq!(
            g.vm.translate(EP, iova, 1, Access::Write, &mut f).unwrap(),
            1
        );
        assert_eq!(f[0].gpa, gpas[winner], "the winner's page is mapped");
        assert_eq!(g.vm.pins().snapshot(), vec![(gpas[winner] / PAGE_SIZE, 1)]);

        // Two UNMAPs of that one mapping.
        let outs: Vec<Out> = thread::scope(|sc| {
            let hs: Vec<_> = (0..2)
                .map(|t| {
                    let (g, b) = (&g, &barrier);
                    sc.spawn(move || {
                        let mut u = req(pvdma::abi::Op::Unmap, EP);
                        // One by first page, one by range: both name it.
                        (u.iova, u.length) = if (round + t) % 2 == 0 {
                            (iova, 0)
                        } else {
                            (iova, 0x1000)
                        };
                        b.wait();
                        g.submit_at(block(t), &u)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut st: Vec<(Status, u64)> = outs.iter().map(|o| (o.status, o.result)).collect();
        st.sort_by_key(|s| s.0 as u32);
        assert_eq!(
            st,
            vec![(Status::Ok, 0x1000), (Status::NoEnt, 0xdead_beef)],
            "round {round}"
        );
        assert_eq!(g.footprint(), (0, 0, 0, vec![], vec![vec![], vec![]]));
    }
}

/// The notifier during concurrent requests: each thread, right after its
/// request returns, finds exactly its events in the log (so they were
/// delivered before the return), with the right fields; the whole log
/// replays as a serial history (a page is mapped only when free and
/// unmapped only when mapped to that page).
#[test]
fn notifier_sees_every_event_before_the_request_returns() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    assert_eq!(g.attach(EP2), Status::Ok);
    let log: Arc<Mutex<Vec<MapEvent>>> = Arc::default();
    let sink = log.clone();
    g.vm.set_notifier(Some(Arc::new(move |e: &MapEvent| {
        sink.lock().unwrap().push(*e);
        true
    })));

    // Thread t: writer slots of its own on EP (shared endpoint), and for
    // t == 1 also EP2 every other round.
    thread::scope(|sc| {
        for t in 0..2u64 {
            let (g, log) = (&g, &log);
            sc.spawn(move || {
                let mine = |e: &MapEvent| {
                    let lo = slot_iova(t, 0) & !0xfff;
                    e.iova >= lo && e.iova < lo + SLOTS * 0x10_000
                };
                let mut want: Vec<MapEvent> = Vec::new();
                for round in 0..400u64 {
                    let rid = if t == 1 && round % 2 == 1 { EP2 } else { EP };
                    let s = round % SLOTS;
                    let k = round % GENS;
                    let iova = slot_iova(t, s);
                    let perms = [R, W, RW][(round % 3) as usize];
                    let out = g.submit_at(
                        block(t),
                        &map_req(rid, perms | FIXED, iova, &map_segs(t, s, k)),
                    );
                    assert_eq!(out.status, Status::Ok);
                    // Two runs: the pages are swapped in guest memory.
                    let ev = |kind, idx: u64, perms| MapEvent {
                        kind,
                        requester: rid,
                        iova: (iova & !0xfff) + idx * PAGE_SIZE,
                        len: PAGE_SIZE,
                        gpa: gpa_page(t, s, k, idx) * PAGE_SIZE,
                        perms,
                    };
                    let p = Perm::from_bits_truncate(perms as u8);
                    want.extend([ev(MapEventKind::Map, 0, p), ev(MapEventKind::Map, 1, p)]);
                    let got: Vec<MapEvent> = log
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|e| mine(e))
                        .copied()
                        .collect();
                    assert_eq!(
                        got, want,
                        "thread {t} round {round}: events after MAP returned"
                    );

                    let mut u = req(pvdma::abi::Op::Unmap, rid);
                    u.iova = iova;
                    assert_eq!(g.submit_at(block(t), &u).status, Status::Ok);
                    // UNMAP events carry no permissions (docs: "a
                    // translation was removed"); compare the rest.
                    want.extend([
                        ev(MapEventKind::Unmap, 0, Perm::NONE),
                        ev(MapEventKind::Unmap, 1, Perm::NONE),
                    ]);
                    let got: Vec<MapEvent> = log
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|e| mine(e))
                        .copied()
                        .collect();
                    assert_eq!(
                        got.len(),
                        want.len(),
                        "thread {t} round {round}: events after UNMAP returned"
                    );
                    for (a, b) in got.iter().zip(&want) {
                        assert_eq!(
                            (a.kind, a.requester, a.iova, a.len, a.gpa),
                            (b.kind, b.requester, b.iova, b.len, b.gpa)
                        );
                        if a.kind == MapEventKind::Map {
                            assert_eq!(a.perms, b.perms);
                        }
                    }
                }
            });
        }
    });

    // Replay the interleaved log as one serial history.
    let mut live: BTreeMap<(u32, u64), u64> = BTreeMap::new();
    for e in log.lock().unwrap().iter() {
        assert_eq!(e.iova % PAGE_SIZE, 0);
        assert_eq!(e.gpa % PAGE_SIZE, 0);
        for p in 0..e.len / PAGE_SIZE {
            let key = (e.requester, e.iova / PAGE_SIZE + p);
            let gpa = e.gpa + p * PAGE_SIZE;
            match e.kind {
                MapEventKind::Map => {
                    assert_eq!(live.insert(key, gpa), None, "{e:?} maps a live page")
                }
                MapEventKind::Unmap => assert_eq!(
                    live.remove(&key),
                    Some(gpa),
                    "{e:?} unmaps what is not mapped"
                ),
            }
        }
    }
    assert!(live.is_empty());
    g.vm.set_notifier(None);
}

/// A request racing `remove_endpoint` must not run on the removed
/// endpoint. The engine looks the endpoint up and then takes its request
/// lock, while removal unpublishes it and then detaches it under that lock:
/// an ATTACH arriving in between would install a domain on an endpoint
/// that nothing can reach, detach or free again. One thread adds and
/// removes an endpoint; another keeps attaching whatever incarnation is
/// published. Once every incarnation is removed, none may be attached.
#[test]
fn requests_racing_endpoint_removal_leave_nothing_behind() {
    const RID: u32 = 0x0300;
    const CHURN: u64 = 200_000;
    let g = Guest::new();
    let done = AtomicBool::new(false);
    let seen = thread::scope(|sc| {
        sc.spawn(|| {
            for _ in 0..CHURN {
                g.vm.add_endpoint(RID, None).unwrap();
                g.vm.remove_endpoint(RID).unwrap();
            }
            done.store(true, Ordering::Release);
        });
        let attacher = sc.spawn(|| {
            let mut seen = Vec::new();
            while !done.load(Ordering::Acquire) {
                if let Some(ep) = g.vm.endpoint(RID) {
                    g.vm.execute(&req(Op::Attach, RID));
                    if !seen.last().is_some_and(|last| Arc::ptr_eq(last, &ep)) {
                        seen.push(ep);
                    }
                }
            }
            seen
        });
        attacher.join().unwrap()
    });
    assert!(g.vm.endpoint(RID).is_none());
    let leaked = seen.iter().filter(|ep| ep.is_attached()).count();
    assert_eq!(
        leaked,
        0,
        "{leaked} removed endpoints of {} still attached",
        seen.len()
    );
}

/// Queued requests (ABI 3.2), rule 2 under races: a guest thread queues
/// MAPs (and UNMAPs of older ones) and announces each after publishing
/// it; device threads translate each announced IOVA, through
/// `Vm::translate` and `Vm::lookup`, while another thread keeps issuing
/// requests (rule-1 drains racing the miss drains). A translation that
/// starts after the publish is never refused: no fault, ever.
#[test]
fn translations_after_a_publish_are_never_refused() {
    use pvdma::testing::{map_entry, queue_setup_req, sync_req, unmap_entry, GuestQueue};
    use std::sync::atomic::AtomicU64;
    const ENTRIES: u64 = 6000;
    const KEEP: u64 = 16;
    const CTRL: u64 = 0x60_0000;
    const RING: u64 = 0x60_1000;
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    let out = g.submit(&queue_setup_req(EP, 0, CTRL, RING, 0x1000));
    assert_eq!(out.status, Status::Ok);
    let iova = |k: u64| 0x100_0000 + k * PAGE_SIZE;
    let gpa = |k: u64| 0x10_0000 + (k % 64) * PAGE_SIZE;
    // Entries announced: k < published has been published.
    let published = AtomicU64::new(0);
    // Entries k < unmapping may have their UNMAP published: a refusal of
    // those is the guest's business (it raced its own UNMAP).
    let unmapping = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            let mut q = GuestQueue::new(&g.mem, CTRL, RING, 0x1000);
            for k in 0..ENTRIES {
                // Two entries per step; wait for room as a driver does.
                while q.head.wrapping_sub(q.ctrl_words(&g.mem)[1]) + 2 > q.entries {
                    let out = g.submit_at(block(0), &sync_req(EP));
                    assert_eq!(out.status, Status::Ok);
                }
                q.push(&g.mem, &map_entry(EP, Perm::RW, iova(k), gpa(k), PAGE_SIZE));
                if k >= KEEP {
                    unmapping.store(k - KEEP + 1, Ordering::SeqCst);
                    q.push(&g.mem, &unmap_entry(EP, iova(k - KEEP), 0));
                }
                // After the publish (head stored above).
                published.store(k + 1, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        });
        for t in 0..2u64 {
            let (g, published, done, unmapping) = (&g, &published, &done, &unmapping);
            s.spawn(move || {
                let mut out = frags();
                let mut n = 0u64;
                while !done.load(Ordering::SeqCst) && n < READER_CAP {
                    n += 1;
                    let k = published.load(Ordering::SeqCst);
                    if k == 0 {
                        continue;
                    }
                    let k = k - 1;
                    let r = if t == 0 {
                        g.vm.translate(EP, iova(k), 8, Access::Write, &mut out)
                            .map(|_| out[0].gpa)
                    } else {
                        g.vm.lookup(EP, iova(k), Some(Access::Read)).map(|l| l.gpa)
                    };
                    if r.is_err() && unmapping.load(Ordering::SeqCst) > k {
                        continue;
                    }
                    assert_eq!(r, Ok(gpa(k)), "entry {k}");
                }
            });
        }
        s.spawn(|| {
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) && n < READER_CAP {
                n += 1;
                assert_eq!(
                    g.submit_at(block(1), &req(Op::Query, EP)).status,
                    Status::Ok
                );
            }
        });
    });
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    assert_eq!(g.vm.mappings(EP).len() as u64, KEEP);
}

/// Request statistics are counted in per-thread slots: the counts stay
/// exact whichever threads made the requests, mappings removed by other
/// threads than the one that made them leave the live count right (each
/// remover's slot goes below zero), and threads that exited leave their
/// counts behind for the next thread that takes their slot.
#[test]
fn request_counts_are_exact_across_threads() {
    const N: u64 = 64;
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    let total = |s: &pvdma::StatsSnapshot| -> (u64, u64) {
        let requests = s.requests.iter().flatten().sum();
        (requests, s.transports.iter().sum())
    };
    let before = total(&g.vm.stats());
    let iova = |i: u64| 0x100_0000 + i * PAGE_SIZE;
    let map = |i: u64| {
        let r = pvdma::testing::map_fixed(EP, Perm::RW, iova(i), &[(0x1000 * (i + 1), PAGE_SIZE)]);
        assert_eq!(g.vm.execute(&r).status, Status::Ok);
    };
    let unmap = |i: u64| {
        let r = pvdma::testing::unmap_req(EP, iova(i), PAGE_SIZE);
        assert_eq!(g.vm.execute(&r).status, Status::Ok);
    };
    thread::scope(|s| {
        s.spawn(|| (0..N).for_each(map));
    });
    let mid = g.vm.stats();
    assert_eq!(mid.mappings, N);
    assert_eq!(total(&mid), (before.0 + N, before.1 + N));
    // Two threads at once, each removing half of what the first made.
    thread::scope(|s| {
        s.spawn(|| (0..N / 2).for_each(unmap));
        s.spawn(|| (N / 2..N).for_each(unmap));
    });
    let after = g.vm.stats();
    assert_eq!(after.mappings, 0);
    assert_eq!(total(&after), (before.0 + 2 * N, before.1 + 2 * N));
    // This thread's own slot, and a refusal counted like any request.
    map(0);
    let r = pvdma::testing::unmap_req(EP, iova(1), PAGE_SIZE);
    assert_eq!(g.vm.execute(&r).status, Status::NoEnt);
    let last = g.vm.stats();
    assert_eq!(last.mappings, 1);
    assert_eq!(total(&last), (before.0 + 2 * N + 2, before.1 + 2 * N + 2));
}
