// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Queued requests (ABI section 3.2): every status code of ops 7 QUEUE and
//! 8 SYNC, every entry check, rules 1 and 2 in each device-access path,
//! the broken-queue stop, tear-down, reset, migration and the drain hooks.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use pvdma::abi::Op;
use pvdma::testing::{
    map_entry, queue_setup_req, queue_teardown_req, sync_req, unmap_entry, GuestQueue,
};
use pvdma::{
    Access, DrainHooks, DrainReport, FaultReason, Fragment, MapEvent, Perm, QueueEntry, Status,
    VmConfig,
};
use vm_memory::{Bytes, GuestAddress};

/// Queue 0's control block and ring (4 KiB: N = 128).
const CTRL: u64 = 0x60_0000;
const RING: u64 = 0x60_1000;
const RING_LEN: u64 = 0x1000;
/// Queue 1's.
const CTRL1: u64 = 0x60_0040;
const RING1: u64 = 0x60_2000;
/// Guest pages the entries map.
const DATA: u64 = 0x10_0000;

fn frag() -> [Fragment; 4] {
    [Fragment {
        hva: 0,
        gpa: 0,
        len: 0,
    }; 4]
}

/// A guest with EP attached and queue 0 set up.
fn setup() -> (Guest, GuestQueue) {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    let q = setup_queue(&g, 0, CTRL, RING);
    (g, q)
}

fn setup_queue(g: &Guest, index: u64, ctrl: u64, ring: u64) -> GuestQueue {
    let out = g.submit(&queue_setup_req(EP, index, ctrl, ring, RING_LEN));
    assert_eq!(out.status, Status::Ok, "set-up of queue {index}");
    GuestQueue::new(&g.mem, ctrl, ring, RING_LEN)
}

fn mapped(g: &Guest, iova: u64) -> bool {
    g.vm.mappings(EP).iter().any(|m| m.iova == iova)
}

#[test]
fn features_and_queues_register_follow_the_config() {
    let g = Guest::new();
    assert_eq!(g.vm.queue_count(), 8);
    assert_ne!(
        g.vm.config().features() & pvdma::abi::PVDMA_FEATURE_QUEUE as u64,
        0
    );
    let off = Guest::with(VmConfig {
        queues: 0,
        ..VmConfig::default()
    });
    assert_eq!(off.vm.queue_count(), 0);
    assert_eq!(
        off.vm.config().features() & pvdma::abi::PVDMA_FEATURE_QUEUE as u64,
        0
    );
    // Without the extension, ops 7 and 8 are unknown ops.
    assert_eq!(
        off.submit(&queue_setup_req(EP, 0, CTRL, RING, RING_LEN))
            .status,
        Status::Inval
    );
    assert_eq!(off.submit(&sync_req(EP)).status, Status::Inval);
    assert!(pvdma::Vm::new(VmConfig {
        queues: 65,
        ..VmConfig::default()
    })
    .is_err());
    assert!(pvdma::Vm::new(VmConfig {
        queues: 64,
        ..VmConfig::default()
    })
    .is_ok());
}

#[test]
fn setup_writes_the_control_block_and_pins_its_pages() {
    let g = Guest::new();
    // Whatever the guest left there: head 5, junk in the host's words.
    for (i, v) in [5u32, 9, 9, 9, 9].iter().enumerate() {
        g.mem
            .write_obj(*v, GuestAddress(CTRL + 4 * i as u64))
            .unwrap();
    }
    let before = g.vm.stats().pinned_pages;
    let out = g.submit(&queue_setup_req(EP, 3, CTRL, RING, 0x2000));
    assert_eq!(out.status, Status::Ok);
    assert_eq!(out.result, 0);
    let q = GuestQueue::new(&g.mem, CTRL, RING, 0x2000);
    assert_eq!(q.ctrl_words(&g.mem), [5, 5, 0, 0, 0]);
    assert_eq!(
        g.vm.stats().pinned_pages,
        before + 3,
        "ctrl page + 2 ring pages"
    );
    assert!(g.vm.ram_range_pinned(RING + 0x1000, 1));
    let info = g.vm.queues()[3];
    assert!(info.set_up && !info.stopped);
    assert_eq!((info.entries, info.tail, info.ctrl_gpa), (256, 5, CTRL));
    assert_eq!(g.submit(&queue_teardown_req(EP, 3)).status, Status::Ok);
    assert_eq!(g.vm.stats().pinned_pages, before);
    assert!(!g.vm.queues()[3].set_up);
}

#[test]
fn queue_status_codes() {
    let g = Guest::new();
    let fails = |r: pvdma::Request, want: Status| {
        let before = g.footprint();
        let out = g.submit(&r);
        assert_eq!(out.status, want, "{r:?}");
        assert_eq!(g.footprint(), before, "{r:?} changed state");
        assert!(g.vm.queues().iter().all(|q| !q.set_up), "{r:?}");
    };
    let setup = |index, ctrl, ring, len| queue_setup_req(EP, index, ctrl, ring, len);
    // INVAL: index, nr_segs, sizes, alignment, overlap, flags, reserved.
    fails(setup(8, CTRL, RING, RING_LEN), Status::Inval);
    fails(setup(u64::MAX, CTRL, RING, RING_LEN), Status::Inval);
    let mut r = setup(0, CTRL, RING, RING_LEN);
    r.nr_segs = 1;
    r.segs.truncate(1);
    fails(r, Status::Inval);
    let mut r = setup(0, CTRL, RING, RING_LEN);
    r.nr_segs = 3;
    r.segs.push((0x5000, 0x1000));
    fails(r, Status::Inval);
    let mut r = setup(0, CTRL, RING, RING_LEN);
    r.segs[0].1 = 32;
    fails(r, Status::Inval);
    fails(setup(0, CTRL + 32, RING, RING_LEN), Status::Inval);
    fails(setup(0, CTRL, RING, 0x3000), Status::Inval);
    fails(setup(0, CTRL, RING, 0x800), Status::Inval);
    fails(setup(0, CTRL, 0, 2 << 20), Status::Inval);
    fails(setup(0, CTRL, RING + 0x200, RING_LEN), Status::Inval);
    fails(setup(0, RING + 0x40, RING, RING_LEN), Status::Inval);
    let mut r = setup(0, CTRL, RING, RING_LEN);
    r.flags = 1 << 3;
    fails(r, Status::Inval);
    let mut r = setup(0, CTRL, RING, RING_LEN);
    r.reserved[1] = 1;
    fails(r, Status::Inval);
    // READ/WRITE/FIXED and length are ignored.
    let mut r = setup(0, CTRL, RING, RING_LEN);
    r.flags = 7;
    r.length = 12345;
    assert_eq!(g.submit(&r).status, Status::Ok);
    assert_eq!(g.submit(&queue_teardown_req(EP, 0)).status, Status::Ok);
    // FAULT: outside RAM (the gap between LOW and HIGH, and past HIGH).
    fails(setup(0, LOW.1, RING, RING_LEN), Status::Fault);
    fails(setup(0, CTRL, LOW.1 - 0x800, RING_LEN), Status::Inval);
    fails(setup(0, CTRL, LOW.1, RING_LEN), Status::Fault);
    fails(setup(0, CTRL, !0xfffu64, RING_LEN), Status::Fault);
    // NODEV: the requester routes the request.
    fails(
        queue_setup_req(0x0100, 0, CTRL, RING, RING_LEN),
        Status::NoDev,
    );
    // STATE: tear-down of a queue not set up.
    fails(queue_teardown_req(EP, 0), Status::State);
    // STATE: set up twice.
    assert_eq!(g.submit(&setup(0, CTRL, RING, RING_LEN)).status, Status::Ok);
    let before = g.footprint();
    assert_eq!(
        g.submit(&setup(0, CTRL1, RING1, RING_LEN)).status,
        Status::State
    );
    assert_eq!(g.footprint(), before);
    assert_eq!(g.vm.queues()[0].ring_gpa, RING);
    // A QUEUE with an endpoint that is not attached is fine (it routes).
    assert_eq!(
        g.submit(&queue_setup_req(EP2, 1, CTRL1, RING1, RING_LEN))
            .status,
        Status::Ok
    );
}

#[test]
fn queue_quota_leaves_nothing_pinned() {
    let g = Guest::with(VmConfig {
        pin_limit: 2 * 4096,
        ..VmConfig::default()
    });
    let before = g.footprint();
    let out = g.submit(&queue_setup_req(EP, 0, CTRL, RING, 0x2000));
    assert_eq!(out.status, Status::Quota);
    assert_eq!(g.footprint(), before);
    assert!(!g.vm.queues()[0].set_up);
    assert_eq!(
        g.submit(&queue_setup_req(EP, 0, CTRL, RING, 0x1000)).status,
        Status::Ok
    );
}

#[test]
fn entries_published_before_setup_are_never_applied() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    let mut early = GuestQueue::new(&g.mem, CTRL, RING, RING_LEN);
    early.push(&g.mem, &map_entry(EP, Perm::RW, 0x1000, DATA, 0x1000));
    let q = setup_queue(&g, 0, CTRL, RING);
    assert_eq!(q.head, 1);
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    assert!(g.vm.mappings(EP).is_empty());
}

#[test]
fn rule_1_every_request_applies_the_queues_first() {
    let (g, mut q) = setup();
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x5000, DATA, 0x1000));
    assert!(!mapped(&g, 0x5000), "nothing drains on its own");
    // A synchronous UNMAP of the queued mapping succeeds: program order.
    assert_eq!(g.unmap(EP, 0x5000, 0).status, Status::Ok);
    assert_eq!(q.ctrl_words(&g.mem)[1], 1, "tail written back");
    // A malformed request (misaligned block) applies them too.
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x6000, DATA, 0x1000));
    let out = g.submit_at(BLOCK + 4, &pvdma::testing::req(Op::Query, EP));
    assert_eq!(out.status, Status::Inval);
    assert!(mapped(&g, 0x6000));
    // So does a request whose block is outside RAM, and one of an
    // unknown op.
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x7000, DATA, 0x1000));
    assert_eq!(g.vm.submit(LOW.1), Status::Fault);
    assert!(mapped(&g, 0x7000));
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x8000, DATA, 0x1000));
    let mut r = pvdma::testing::req(Op::Query, EP);
    r.op = 99;
    assert_eq!(g.submit(&r).status, Status::Inval);
    assert!(mapped(&g, 0x8000));
    // And `Vm::execute` (the already-read path).
    q.push(&g.mem, &unmap_entry(EP, 0x8000, 0));
    g.vm.execute(&pvdma::testing::req(Op::Query, EP));
    assert!(!mapped(&g, 0x8000));
    let s = g.vm.stats();
    assert_eq!((s.queue_entries, s.queue_failed), (5, 0));
}

#[test]
fn rule_2_a_refused_translation_drains_and_retries_in_every_path() {
    let (g, mut q) = setup();
    let mut out = frag();
    let mut iova = 0x10_0000u64;
    let mut next = |g: &Guest, q: &mut GuestQueue| {
        iova += 0x1000;
        q.push(&g.mem, &map_entry(EP, Perm::RW, iova, DATA, 0x1000));
        iova
    };
    let a = next(&g, &mut q);
    assert_eq!(g.vm.translate(EP, a, 16, Access::Read, &mut out), Ok(1));
    let a = next(&g, &mut q);
    assert_eq!(g.vm.lookup(EP, a, Some(Access::Write)).unwrap().gpa, DATA);
    let a = next(&g, &mut q);
    assert_eq!(g.vm.lookup(EP, a, None).unwrap().gpa, DATA, "a look too");
    let tr = g.vm.translator(EP).unwrap();
    let a = next(&g, &mut q);
    let guard = pvdma::epoch::pin();
    assert_eq!(tr.translate(a, 16, Access::Read, &mut out, &guard), Ok(1));
    let a = next(&g, &mut q);
    assert!(tr.lookup(a, Some(Access::Read), &guard).is_ok());
    let mut ct = g.vm.cached_translator(EP).unwrap();
    let a = next(&g, &mut q);
    assert_eq!(ct.translate(a, 16, Access::Read, &mut out, &guard), Ok(1));
    let a = next(&g, &mut q);
    assert!(ct.lookup(a, Some(Access::Read), &guard).is_ok());
    drop(guard);
    let s = g.vm.stats();
    assert_eq!(s.faults, 0, "none of them was refused");
    assert_eq!((s.miss_drains, s.queue_entries), (7, 7));
    // A refusal with nothing queued is counted once and drains nothing.
    assert!(g
        .vm
        .translate(EP, 0x9000_0000, 1, Access::Read, &mut out)
        .is_err());
    let s = g.vm.stats();
    assert_eq!((s.faults, s.miss_drains), (1, 7));
}

#[test]
fn rule_2_permission_refusal_drains_too() {
    let (g, mut q) = setup();
    assert_eq!(
        g.map(EP, R | FIXED, 0x4000, &[(DATA, 0x1000)]).status,
        Status::Ok
    );
    q.push(&g.mem, &unmap_entry(EP, 0x4000, 0));
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x4000, DATA, 0x1000));
    let mut out = frag();
    assert_eq!(
        g.vm.translate(EP, 0x4000, 8, Access::Write, &mut out),
        Ok(1)
    );
    assert_eq!(g.vm.stats().faults, 0);
}

#[test]
fn a_hit_blocked_or_unknown_device_does_not_drain() {
    let g = Guest::with(VmConfig {
        bypass: false,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    let mut q = setup_queue(&g, 0, CTRL, RING);
    assert_eq!(
        g.map(EP, RW | FIXED, 0x4000, &[(DATA, 0x1000)]).status,
        Status::Ok
    );
    // Rule 4: a queued UNMAP does not stop a hit.
    q.push(&g.mem, &unmap_entry(EP, 0x4000, 0));
    let mut out = frag();
    assert_eq!(g.vm.translate(EP, 0x4000, 8, Access::Read, &mut out), Ok(1));
    assert!(g.vm.lookup(EP, 0x4000, Some(Access::Read)).is_ok());
    // Blocked (EP2 unattached, no bypass) and no device: no drain.
    let e =
        g.vm.translate(EP2, 0x4000, 8, Access::Read, &mut out)
            .unwrap_err();
    assert_eq!(e.reason, FaultReason::Blocked);
    let e =
        g.vm.translate(0x0100, 0x4000, 8, Access::Read, &mut out)
            .unwrap_err();
    assert_eq!(e.reason, FaultReason::NoDevice);
    assert_eq!(q.ctrl_words(&g.mem)[1], 0, "still queued");
    assert_eq!(g.vm.stats().miss_drains, 0);
    assert!(mapped(&g, 0x4000));
}

#[test]
fn sync_reports_the_earliest_failure_and_the_count() {
    let (g, mut q) = setup();
    let s = g.submit(&sync_req(EP));
    assert_eq!((s.status, s.result), (Status::Ok, 0));
    assert_eq!(
        g.map(EP, RW | FIXED, 0x4000, &[(DATA, 0x1000)]).status,
        Status::Ok
    );
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x4000, DATA, 0x1000)); // EXIST
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x8000, DATA, 0x1000)); // OK
    q.push(&g.mem, &unmap_entry(EP, 0x20_0000, 0)); // NOENT
    let s = g.submit(&sync_req(EP));
    assert_eq!((s.status, s.result), (Status::Exist, 2));
    assert!(mapped(&g, 0x8000));
    assert_eq!(
        q.ctrl_words(&g.mem),
        [3, 3, 2, Status::NoEnt as u32, 0],
        "head, tail, failed, last_error, stopped"
    );
    // A new window.
    let s = g.submit(&sync_req(EP));
    assert_eq!((s.status, s.result), (Status::Ok, 0));
    // SYNC needs an endpoint requester; its flags/iova/nr_segs are ignored.
    let mut r = sync_req(0x0100);
    assert_eq!(g.submit(&r).status, Status::NoDev);
    r.requester = EP;
    r.flags = 7;
    r.iova = 99;
    r.nr_segs = 5;
    assert_eq!(g.submit(&r).status, Status::Ok);
    r.flags = 8;
    assert_eq!(g.submit(&r).status, Status::Inval);
    // The window is VM-wide: a failure in queue 1 shows in the next SYNC,
    // even when drained by a translation.
    let mut q1 = setup_queue(&g, 1, CTRL1, RING1);
    q1.push(&g.mem, &map_entry(EP, Perm::NONE, 0x9000, DATA, 0x1000));
    g.vm.drain_queues();
    let s = g.submit(&sync_req(EP));
    assert_eq!((s.status, s.result), (Status::Perm, 1));
}

#[test]
fn every_entry_check_fails_cleanly() {
    let (g, mut q) = setup();
    assert_eq!(
        g.map(EP, RW | FIXED, 0x4000, &[(DATA, 0x2000)]).status,
        Status::Ok
    );
    let e = |op, flags, rid, iova, gpa, length| QueueEntry {
        op,
        flags,
        requester: rid,
        iova,
        gpa,
        length,
    };
    let cases = [
        (e(6, 0, EP, 0x4000, 0, 0x1000), Status::Inval),
        (e(0, 0, EP, 0x4000, 0, 0x1000), Status::Inval),
        (e(7, 0, EP, 0, 0, 0), Status::Inval),
        (e(8, 0, EP, 0, 0, 0), Status::Inval),
        (e(5, 1, EP, 0x4000, 0, 0), Status::Inval),
        (e(5, 0, EP, 0x4000, DATA, 0), Status::Inval),
        (e(4, 0, EP, 0x9000, DATA, 0x1000), Status::Perm),
        (e(4, 4, EP, 0x9000, DATA, 0x1000), Status::Perm),
        (e(4, 3 | 8, EP, 0x9000, DATA, 0x1000), Status::Inval),
        (e(4, 3, EP, 0x9000, DATA, 0), Status::Inval),
        (e(4, 3, EP, 0x9100, DATA, 0x100), Status::Inval),
        (e(4, 3, EP, 1 << 48, DATA, 0x1000), Status::Inval),
        (e(4, 3, 0x0100, 0x9000, DATA, 0x1000), Status::NoDev),
        (e(4, 3, EP2, 0x9000, DATA, 0x1000), Status::State),
        (e(4, 3, EP, 0x9000, LOW.1, 0x1000), Status::Fault),
        (e(4, 3, EP, 0x5000, DATA, 0x1000), Status::Exist),
        (e(5, 0, EP, 0x9000, 0, 0), Status::NoEnt),
        (e(5, 0, EP, 0x4000, 0, 0x1000), Status::Range),
        (e(5, 0, EP, 1 << 48, 0, 0), Status::Inval),
    ];
    for (i, (entry, want)) in cases.iter().enumerate() {
        let before = g.footprint();
        q.push(&g.mem, entry);
        let s = g.submit(&sync_req(EP));
        assert_eq!((s.status, s.result), (*want, 1), "case {i}: {entry:?}");
        assert_eq!(g.footprint(), before, "case {i}: {entry:?}");
        assert_eq!(q.ctrl_words(&g.mem)[3], *want as u32, "last_error");
    }
    assert_eq!(q.ctrl_words(&g.mem)[2], cases.len() as u32, "failed");
    // FIXED may be set, the in-page offset of gpa is kept.
    q.push(&g.mem, &e(4, 7, EP, 0x9123, DATA + 0x123, 0x10));
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    assert!(mapped(&g, 0x9123));
}

#[test]
fn queued_map_quota() {
    let g = Guest::with(VmConfig {
        pin_limit: 3 * 4096,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    let mut q = setup_queue(&g, 0, CTRL, RING); // 2 pages
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x4000, DATA, 0x1000));
    q.push(
        &g.mem,
        &map_entry(EP, Perm::RW, 0x8000, DATA + 0x1000, 0x1000),
    );
    let s = g.submit(&sync_req(EP));
    assert_eq!((s.status, s.result), (Status::Quota, 1));
    assert!(mapped(&g, 0x4000) && !mapped(&g, 0x8000));
}

#[test]
fn a_broken_queue_stops_and_answers_state_until_torn_down() {
    let (g, mut q) = setup();
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x4000, DATA, 0x1000));
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    // The guest overwrote entries it had not had taken: head - tail > N.
    for _ in 0..=q.entries {
        q.write(
            &g.mem,
            q.head,
            &map_entry(EP, Perm::RW, 0x8000, DATA, 0x1000),
        );
        q.head = q.head.wrapping_add(1);
    }
    q.publish(&g.mem);
    let s = g.submit(&sync_req(EP));
    assert_eq!(s.status, Status::State);
    assert_eq!(q.ctrl_words(&g.mem)[4], 1, "stopped written");
    assert_eq!(q.ctrl_words(&g.mem)[1], 1, "nothing taken");
    assert!(!mapped(&g, 0x8000));
    assert!(g.vm.queues()[0].stopped);
    // Still STATE, and a translation does not apply it either.
    let mut out = frag();
    assert!(g
        .vm
        .translate(EP, 0x8000, 1, Access::Read, &mut out)
        .is_err());
    assert_eq!(g.submit(&sync_req(EP)).status, Status::State);
    // Other queues are still applied.
    let mut q1 = setup_queue(&g, 1, CTRL1, RING1);
    q1.push(&g.mem, &map_entry(EP, Perm::RW, 0xa000, DATA, 0x1000));
    assert_eq!(g.submit(&sync_req(EP)).status, Status::State);
    assert!(mapped(&g, 0xa000));
    // Tear-down applies nothing; a new set-up works.
    assert_eq!(g.submit(&queue_teardown_req(EP, 0)).status, Status::Ok);
    assert!(!mapped(&g, 0x8000));
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    let mut q = setup_queue(&g, 0, CTRL, RING);
    assert_eq!(q.ctrl_words(&g.mem)[4], 0);
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x8000, DATA, 0x1000));
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    assert!(mapped(&g, 0x8000));
}

#[test]
fn a_full_ring_is_taken_whole_and_counters_wrap() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    // head near the top of u32: the counters wrap during the drain.
    g.mem.write_obj(u32::MAX - 60, GuestAddress(CTRL)).unwrap();
    let mut q = setup_queue(&g, 0, CTRL, RING);
    for i in 0..u64::from(q.entries) {
        q.write(
            &g.mem,
            q.head,
            &map_entry(EP, Perm::RW, 0x10_0000 + i * 0x1000, DATA, 0x1000),
        );
        q.head = q.head.wrapping_add(1);
    }
    q.publish(&g.mem);
    let s = g.submit(&sync_req(EP));
    assert_eq!((s.status, s.result), (Status::Ok, 0));
    assert_eq!(g.vm.mappings(EP).len(), q.entries as usize);
    assert_eq!(q.ctrl_words(&g.mem)[1], q.head);
    assert_eq!(g.vm.queues()[0].applied, u64::from(q.entries));
}

#[test]
fn teardown_applies_first_and_reset_drops_unapplied() {
    let (g, mut q) = setup();
    let pinned = g.vm.stats().pinned_pages;
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x4000, DATA, 0x1000));
    assert_eq!(g.vm.execute(&queue_teardown_req(EP, 0)).status, Status::Ok);
    assert!(mapped(&g, 0x4000), "tear-down applied the entry");
    assert_eq!(g.vm.stats().pinned_pages, pinned - 2 + 1);
    let mut q = setup_queue(&g, 0, CTRL, RING);
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x8000, DATA, 0x1000));
    g.vm.reset();
    assert!(g.vm.queues().iter().all(|q| !q.set_up));
    assert_eq!(g.vm.stats().pinned_pages, 0);
    assert_eq!(g.attach(EP), Status::Ok);
    assert!(g.vm.mappings(EP).is_empty(), "reset dropped the entry");
}

#[test]
fn migration_carries_queues_and_old_streams_load() {
    let (g, mut q) = setup();
    q.push(&g.mem, &map_entry(EP, Perm::NONE, 0x4000, DATA, 0x1000));
    g.vm.drain_queues(); // one failure in the window
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x8000, DATA, 0x1000)); // pending
    let blob = g.vm.export_state();
    // The destination: the same RAM content (it travels with the guest).
    let d = Guest::new();
    let mut all = vec![0u8; 0x3000];
    g.mem.read_slice(&mut all, GuestAddress(CTRL)).unwrap();
    d.mem.write_slice(&all, GuestAddress(CTRL)).unwrap();
    d.vm.import_state(&blob).unwrap();
    let info = d.vm.queues()[0];
    assert!(info.set_up);
    assert_eq!(
        (info.tail, info.failed, info.last_error),
        (1, 1, Status::Perm as u32)
    );
    assert_eq!(d.vm.stats().pinned_pages, 2);
    let s = d.submit(&sync_req(EP));
    assert_eq!((s.status, s.result), (Status::Perm, 1));
    assert!(d.vm.mappings(EP).iter().any(|m| m.iova == 0x8000));
    // A destination without queues refuses the stream and stays reset.
    let off = Guest::with(VmConfig {
        queues: 0,
        ..VmConfig::default()
    });
    assert!(off.vm.import_state(&blob).is_err());
    assert_eq!(off.vm.stats().pinned_pages, 0);
    // A stream with no queue is version 1 and loads anywhere.
    let plain = Guest::new();
    assert_eq!(plain.attach(EP), Status::Ok);
    let blob = plain.vm.export_state();
    assert_eq!(&blob[8..12], &1u32.to_le_bytes());
    off.vm.import_state(&blob).unwrap();
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

impl DrainHooks for Recorder {
    fn miss_begin(&self) -> u64 {
        self.events.lock().unwrap().push("begin".into());
        42
    }
    fn miss_end(&self, token: u64) {
        self.events.lock().unwrap().push(format!("end {token}"));
    }
    fn drained(&self, r: &DrainReport) {
        self.events.lock().unwrap().push(format!(
            "{} {:?} {} {} {} {}",
            r.queue, r.cause, r.applied, r.failed, r.head, r.tail
        ));
    }
}

#[test]
fn hooks_see_every_drain_with_its_cause() {
    let (g, mut q) = setup();
    let rec = Arc::new(Recorder::default());
    g.vm.set_drain_hooks(Some(rec.clone()));
    let events = || std::mem::take(&mut *rec.events.lock().unwrap());
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x4000, DATA, 0x1000));
    g.query(EP);
    assert_eq!(events(), ["0 Request 1 0 1 1"]);
    g.query(EP);
    assert_eq!(events(), Vec::<String>::new(), "nothing taken: no report");
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x4000, DATA, 0x1000));
    g.submit(&sync_req(EP));
    assert_eq!(events(), ["0 Sync 1 1 2 2"]);
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x8000, DATA, 0x1000));
    let mut out = frag();
    assert!(g
        .vm
        .translate(EP, 0x8000, 1, Access::Read, &mut out)
        .is_ok());
    assert_eq!(events(), ["begin", "0 Miss 1 0 3 3", "end 42"]);
    // No begin/end when nothing is pending.
    assert!(g
        .vm
        .translate(EP, 0xc000, 1, Access::Read, &mut out)
        .is_err());
    assert_eq!(events(), Vec::<String>::new());
    q.push(&g.mem, &unmap_entry(EP, 0x8000, 0));
    g.vm.execute(&queue_teardown_req(EP, 0));
    // `execute` drained first (rule 1), so the tear-down had nothing left.
    assert_eq!(events(), ["0 Request 1 0 4 4"]);
    let mut q = setup_queue(&g, 0, CTRL, RING);
    q.head = q.head.wrapping_add(q.entries + 1);
    q.publish(&g.mem);
    g.query(EP);
    let h = q.head;
    assert_eq!(events(), [format!("0 Stopped 0 0 {h} 4")]);
    g.vm.set_drain_hooks(None);
    g.query(EP);
    assert!(events().is_empty());
}

/// A guest rewriting its ring and head while the host drains (here from
/// the MAP notifier, which runs inside the drain): the drain takes what
/// head said when it read it, each entry as it copied it (the host copies
/// 32 entries at a time, each once, before parsing any of them), and the
/// next drain sees the broken queue. Nothing loops or panics; a
/// translation from inside the drain does not drain again.
#[test]
fn rewrites_during_a_drain_get_a_consistent_outcome() {
    let (g, mut q) = setup();
    let g = Arc::new(g);
    let scribbled = Arc::new(Mutex::new(false));
    let (g2, s2, q2) = (Arc::downgrade(&g), scribbled.clone(), q.clone());
    g.vm.set_notifier(Some(Arc::new(move |ev: &MapEvent| {
        let Some(g) = g2.upgrade() else { return true };
        let mut done = s2.lock().unwrap();
        if !*done && ev.iova == 0x4000 {
            *done = true;
            // Entry 1 (already copied with the first 32) and entry 35 (not
            // yet copied) become UNMAPs of 0x4000; head jumps far ahead.
            q2.write(&g.mem, 1, &unmap_entry(EP, 0x4000, 0));
            q2.write(&g.mem, 35, &unmap_entry(EP, 0x4000, 0));
            g.mem.write_obj(1000u32, GuestAddress(CTRL)).unwrap();
            // Re-entrant translation: refused, no nested drain.
            let mut out = frag();
            assert!(g
                .vm
                .translate(EP, 0x7_0000, 1, Access::Read, &mut out)
                .is_err());
        }
        true
    })));
    let iova = |i: u64| 0x10_0000 + i * 0x1000;
    q.push(&g.mem, &map_entry(EP, Perm::RW, 0x4000, DATA, 0x1000));
    for i in 1..40 {
        q.push(&g.mem, &map_entry(EP, Perm::RW, iova(i), DATA, 0x1000));
    }
    let s = g.submit(&sync_req(EP));
    // The first drain (rule 1) read head 40 and took all 40: entry 1 as
    // first copied (its MAP), entry 35 as rewritten (UNMAP 0x4000). SYNC's
    // own drain then saw head 1000: stopped.
    assert!(*scribbled.lock().unwrap());
    assert_eq!(s.status, Status::State);
    assert!(!mapped(&g, 0x4000), "entry 35 applied as rewritten");
    assert!(mapped(&g, iova(1)), "entry 1 applied as first copied");
    assert!(!mapped(&g, iova(35)));
    assert_eq!(g.vm.mappings(EP).len(), 38);
    assert_eq!(q.ctrl_words(&g.mem)[1], 40);
    assert_eq!(g.vm.stats().faults, 1);
    g.vm.set_notifier(None);
}

/// A notifier runs under its endpoint's request lock; a translation it
/// makes must not drain (queue mutexes come before that lock: a drain there
/// could deadlock against a drain applying an entry of this endpoint).
#[test]
fn no_drain_under_a_request_lock() {
    let (g, q) = setup();
    assert_eq!(g.attach(EP2), Status::Ok);
    let g = Arc::new(g);
    let seen = Arc::new(Mutex::new(None));
    let (g2, s2, q2) = (Arc::downgrade(&g), seen.clone(), Mutex::new(q));
    g.vm.set_notifier(Some(Arc::new(move |ev: &MapEvent| {
        let Some(g) = g2.upgrade() else { return true };
        if ev.requester == EP && ev.iova == 0x4000 {
            let mut q = q2.lock().unwrap();
            q.push(&g.mem, &map_entry(EP2, Perm::RW, 0x8000, DATA, 0x1000));
            let mut out = frag();
            *s2.lock().unwrap() = Some(g.vm.translate(EP2, 0x8000, 1, Access::Read, &mut out));
        }
        true
    })));
    assert_eq!(
        g.map(EP, RW | FIXED, 0x4000, &[(DATA, 0x1000)]).status,
        Status::Ok
    );
    let r = seen.lock().unwrap().take().expect("notifier ran");
    assert_eq!(r.unwrap_err().reason, FaultReason::Unmapped);
    // The next request applies it.
    g.query(EP);
    assert!(g.vm.mappings(EP2).iter().any(|m| m.iova == 0x8000));
    g.vm.set_notifier(None);
}

/// The UNMAP events of one drain are merged: queued one-page UNMAPs that
/// follow on in IOVA space reach the listener as one event (a vhost
/// backend pays per invalidation message), sent before the drain returns,
/// and a removal merged so far is sent before a MAP event of the same
/// drain, which may reuse its IOVA. Synchronous UNMAPs stay one event each.
#[test]
fn a_drains_unmap_events_are_merged_and_sent_before_it_returns() {
    let (g, mut q) = setup();
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    g.vm.set_notifier(Some(Arc::new(move |ev: &MapEvent| {
        log.lock().unwrap().push((ev.kind, ev.iova, ev.len));
        true
    })));
    let page = |i: u64| 0x20_0000 + i * 0x1000;
    for i in 0..32 {
        q.push(
            &g.mem,
            &map_entry(EP, Perm::RW, page(i), DATA + i * 0x1000, 0x1000),
        );
    }
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    events.lock().unwrap().clear();
    // 32 UNMAPs in address order, then a remap of page 3, then two more
    // UNMAPs of another endpoint-local run.
    for i in 0..32 {
        q.push(&g.mem, &unmap_entry(EP, page(i), 0));
    }
    q.push(&g.mem, &map_entry(EP, Perm::RW, page(3), DATA, 0x1000));
    q.push(&g.mem, &unmap_entry(EP, page(3), 0));
    let s = g.submit(&sync_req(EP));
    assert_eq!((s.status, s.result), (Status::Ok, 0));
    use pvdma::MapEventKind::{Map, Unmap};
    assert_eq!(
        *events.lock().unwrap(),
        vec![
            (Unmap, page(0), 32 * 0x1000),
            (Map, page(3), 0x1000),
            (Unmap, page(3), 0x1000),
        ],
        "one event for the 32 pages, flushed before the MAP; the last \
         one sent before SYNC returned"
    );
    assert!(g.vm.mappings(EP).is_empty());
    // A MAP elsewhere between the UNMAPs does not cut the merged removal.
    for i in 0..4 {
        q.push(&g.mem, &map_entry(EP, Perm::RW, page(i), DATA, 0x1000));
    }
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    events.lock().unwrap().clear();
    q.push(&g.mem, &unmap_entry(EP, page(0), 0));
    q.push(&g.mem, &unmap_entry(EP, page(1), 0));
    q.push(&g.mem, &map_entry(EP, Perm::RW, page(20), DATA, 0x1000));
    q.push(&g.mem, &unmap_entry(EP, page(2), 0));
    q.push(&g.mem, &unmap_entry(EP, page(3), 0));
    q.push(&g.mem, &unmap_entry(EP, page(20), 0));
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    assert_eq!(
        *events.lock().unwrap(),
        vec![
            (Map, page(20), 0x1000),
            (Unmap, page(0), 4 * 0x1000),
            (Unmap, page(20), 0x1000),
        ]
    );
    // Pages mapped one at a time get descending IOVAs from Linux; their
    // UNMAPs come in ascending buffer order, each just below the last.
    for i in 0..8 {
        q.push(&g.mem, &map_entry(EP, Perm::RW, page(7 - i), DATA, 0x1000));
    }
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    events.lock().unwrap().clear();
    for i in 0..8 {
        q.push(&g.mem, &unmap_entry(EP, page(7 - i), 0));
    }
    assert_eq!(g.submit(&sync_req(EP)).status, Status::Ok);
    assert_eq!(*events.lock().unwrap(), vec![(Unmap, page(0), 8 * 0x1000)]);
    // Synchronous UNMAPs: one event per request, as before.
    events.lock().unwrap().clear();
    for i in 0..2 {
        let flags = (pvdma::abi::PVDMA_FLAG_READ | pvdma::abi::PVDMA_FLAG_FIXED) as u16;
        assert_eq!(
            g.map(EP, flags, page(i), &[(DATA, 0x1000)]).status,
            Status::Ok
        );
    }
    for i in 0..2 {
        assert_eq!(g.unmap(EP, page(i), 0).status, Status::Ok);
    }
    assert_eq!(
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.0 == Unmap)
            .count(),
        2
    );
    g.vm.set_notifier(None);
}
