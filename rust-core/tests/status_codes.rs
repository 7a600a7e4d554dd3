// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One test per status code of the ABI (INTERNAL lives with the C API: it
//! is what the boundary returns on a NULL VM or a caught panic), each
//! failure also checked to leave no mapping, pin or IOVA behind.

mod common;

use common::*;
use pvdma::abi::Op;
use std::sync::{Arc, Mutex};

use pvdma::PinMode;
use pvdma::{encode_request, MapEvent, MapEventKind};
use pvdma::{Access, Fragment, Status, VmConfig};
use vm_memory::Bytes;

/// Runs `f`, which must fail with `want`, and checks nothing changed.
fn fails_cleanly(g: &Guest, want: Status, f: impl FnOnce(&Guest) -> Out) {
    let before = g.footprint();
    let out = f(g);
    assert_eq!(out.status, want, "{out:?}");
    assert_eq!(
        out.result, 0xdead_beef,
        "result must not be written on failure"
    );
    assert_eq!(g.footprint(), before, "a failed request changed state");
}

/// The IOVA the host would pick next for one page: proves a failed MAP
/// gave back any IOVA it had taken.
fn next_host_iova(g: &Guest) -> u64 {
    let out = g.map(EP, RW, 0, &[(0x1000, 0x1000)]);
    assert_eq!(out.status, Status::Ok);
    assert_eq!(g.unmap(EP, out.iova, 0).status, Status::Ok);
    out.iova
}

#[test]
fn ok_query_attach_map_unmap_detach() {
    let g = Guest::new();
    let q = g.query(EP);
    assert_eq!(q.status, Status::Ok);
    assert_eq!(q.result, 0b100, "unattached, bypass");
    assert_eq!(g.query(EP2).result, 0b110, "passthrough is reported");
    assert_eq!(g.attach(EP), Status::Ok);
    assert_eq!(g.query(EP).result, 0b001);

    let m = g.map(EP, RW, 0, &[(0x2345, 0x100)]);
    assert_eq!(m.status, Status::Ok);
    assert_eq!(m.iova & 0xfff, 0x345, "in-page offset kept");
    assert_ne!(m.iova >> 12, 0, "never page 0");
    assert_eq!(m.length, 0x100);
    assert_eq!(m.result, 0);

    let mut frags = [Fragment {
        hva: 0,
        gpa: 0,
        len: 0,
    }; 4];
    let n =
        g.vm.translate(EP, m.iova, 0x100, Access::Write, &mut frags)
            .unwrap();
    assert_eq!(n, 1);
    assert_eq!(frags[0].gpa, 0x2345);
    assert_eq!(frags[0].hva, g.hva(0x2345));

    let u = g.unmap(EP, m.iova, 0);
    assert_eq!((u.status, u.result), (Status::Ok, 0x1000));
    assert!(g
        .vm
        .translate(EP, m.iova, 1, Access::Read, &mut frags)
        .is_err());
    let d = g.detach(EP);
    assert_eq!((d.status, d.result), (Status::Ok, 0));
    assert_eq!(g.vm.stats().pinned_pages, 0);
}

#[test]
fn inval() {
    let g = Guest::with(VmConfig {
        iova_bits: 32,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    let iova0 = next_host_iova(&g);
    let mut bad_op = req(Op::Query, EP);
    bad_op.op = 9;
    fails_cleanly(&g, Status::Inval, |g| g.submit(&bad_op));
    bad_op.op = 0;
    fails_cleanly(&g, Status::Inval, |g| g.submit(&bad_op));
    let mut reserved = req(Op::Query, EP);
    reserved.reserved[2] = 1;
    fails_cleanly(&g, Status::Inval, |g| g.submit(&reserved));
    let mut flags = req(Op::Query, EP);
    flags.flags = 8;
    fails_cleanly(&g, Status::Inval, |g| g.submit(&flags));
    fails_cleanly(&g, Status::Inval, |g| {
        g.submit_at(BLOCK + 4, &req(Op::Query, EP))
    });
    // Segment rules.
    fails_cleanly(&g, Status::Inval, |g| g.map(EP, RW, 0, &[(0x1000, 0)]));
    fails_cleanly(&g, Status::Inval, |g| {
        g.map(EP, RW, 0, &[(0x1000, 0x1000), (0x3800, 0x800)])
    });
    fails_cleanly(&g, Status::Inval, |g| {
        g.map(EP, RW, 0, &[(0x1000, 0x800), (0x3000, 0x1000)])
    });
    fails_cleanly(&g, Status::Inval, |g| {
        g.map(EP, RW, 0, &[(0x1000, u64::MAX)])
    });
    fails_cleanly(&g, Status::Inval, |g| {
        let mut r = map_req(EP, RW, 0, &[]);
        r.nr_segs = 0;
        g.submit(&r)
    });
    // FIXED: offset must match, range must be below 2^IOVA_BITS.
    fails_cleanly(&g, Status::Inval, |g| {
        g.map(EP, RW | FIXED, 0x10_0100, &[(0x1200, 0x10)])
    });
    fails_cleanly(&g, Status::Inval, |g| {
        g.map(EP, RW | FIXED, (1 << 32) - 0x1000, &[(0x1000, 0x2000)])
    });
    fails_cleanly(&g, Status::Inval, |g| {
        g.map(EP, RW | FIXED, 1 << 32, &[(0x1000, 0x10)])
    });
    // UNMAP beyond the IOVA space.
    fails_cleanly(&g, Status::Inval, |g| g.unmap(EP, 1 << 32, 0));
    fails_cleanly(&g, Status::Inval, |g| g.unmap(EP, 0x1000, u64::MAX));
    assert_eq!(next_host_iova(&g), iova0);

    // MAP without FIXED when the host may not pick.
    let g = Guest::with(VmConfig {
        host_iova: false,
        ..VmConfig::default()
    });
    assert_eq!(g.vm.config().features() & 2, 0);
    assert_eq!(g.attach(EP), Status::Ok);
    fails_cleanly(&g, Status::Inval, |g| g.map(EP, RW, 0, &[(0x1000, 0x10)]));
    assert_eq!(
        g.map(EP, RW | FIXED, 0x5000, &[(0x1000, 0x10)]).status,
        Status::Ok
    );
}

#[test]
fn nodev() {
    let g = Guest::new();
    fails_cleanly(&g, Status::NoDev, |g| g.query(0x0020));
    fails_cleanly(&g, Status::NoDev, |g| g.query(0x1_0010)); // segment 1
    fails_cleanly(&g, Status::NoDev, |g| g.map(0x0020, RW, 0, &[(0x1000, 1)]));
    g.vm.remove_endpoint(EP).unwrap();
    fails_cleanly(&g, Status::NoDev, |g| g.query(EP));
}

#[test]
fn fault() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    let iova0 = next_host_iova(&g);
    // Block outside RAM: nothing can be written back.
    assert_eq!(g.vm.submit(LOW.1), Status::Fault);
    assert_eq!(
        g.vm.submit(LOW.1 - 32),
        Status::Fault,
        "header straddles the end"
    );
    assert_eq!(g.vm.submit(u64::MAX - 7), Status::Fault);
    // Segments outside RAM, straddling its end, in the hole.
    fails_cleanly(&g, Status::Fault, |g| g.map(EP, RW, 0, &[(LOW.1, 0x1000)]));
    fails_cleanly(&g, Status::Fault, |g| {
        g.map(EP, RW, 0, &[(LOW.1 - 0x1000, 0x2000)])
    });
    fails_cleanly(&g, Status::Fault, |g| {
        g.map(EP, RW, 0, &[(0x1000, 0x1000), (HIGH.0 + HIGH.1, 0x1000)])
    });
    // The segment array runs past the end of RAM.
    let at = LOW.1 - 64 - 16;
    let mut r = map_req(EP, RW, 0, &[(0x1000, 0x1000)]);
    r.nr_segs = 2; // the second segment would lie past the end of RAM
    fails_cleanly(&g, Status::Fault, |g| g.submit_at(at, &r));
    assert_eq!(next_host_iova(&g), iova0);
}

#[test]
fn nospc() {
    // 21 bits: 512 pages, page 0 never handed out.
    let g = Guest::with(VmConfig {
        iova_bits: 21,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    let m = g.map(EP, RW, 0, &[(0x10_0000, 511 * 4096)]);
    assert_eq!(m.status, Status::Ok);
    assert_eq!(m.iova, 0x1000);
    fails_cleanly(&g, Status::NoSpc, |g| g.map(EP, R, 0, &[(0x1000, 1)]));
    // FIXED may still use page 0.
    assert_eq!(
        g.map(EP, R | FIXED, 0x10, &[(0x1010, 1)]).status,
        Status::Ok
    );
    assert_eq!(g.unmap(EP, 0x1000, 0).status, Status::Ok);
    assert_eq!(
        g.map(EP, R, 0, &[(0x1000, 1)]).iova,
        0x1000,
        "freed IOVA reused"
    );
}

#[test]
fn exist() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    assert_eq!(
        g.map(EP, RW | FIXED, 0x10_0000, &[(0x1000, 0x3000)]).status,
        Status::Ok
    );
    let iova0 = next_host_iova(&g);
    fails_cleanly(&g, Status::Exist, |g| {
        g.map(EP, RW | FIXED, 0x10_2000, &[(0x9000, 1)])
    });
    fails_cleanly(&g, Status::Exist, |g| {
        g.map(EP, RW | FIXED, 0xf_f000, &[(0x9000, 0x2000)])
    });
    // Another endpoint's IOVA space is separate.
    assert_eq!(g.attach(EP2), Status::Ok);
    assert_eq!(
        g.map(EP2, RW | FIXED, 0x10_0000, &[(0x9000, 1)]).status,
        Status::Ok
    );
    assert_eq!(next_host_iova(&g), iova0);
}

#[test]
fn noent() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    assert_eq!(
        g.map(EP, RW | FIXED, 0x10_0000, &[(0x1000, 0x3000)]).status,
        Status::Ok
    );
    fails_cleanly(&g, Status::NoEnt, |g| g.unmap(EP, 0x10_1000, 0)); // not its first page
    fails_cleanly(&g, Status::NoEnt, |g| g.unmap(EP, 0x20_0000, 0));
    fails_cleanly(&g, Status::NoEnt, |g| g.unmap(EP, 0x20_0000, 0x10_0000));
    // length 0 ignores the in-page offset
    assert_eq!(g.unmap(EP, 0x10_0abc, 0).result, 0x3000);
}

#[test]
fn range() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    for (iova, gpa) in [(0x10_0000, 0x1000), (0x10_4000, 0x8000)] {
        assert_eq!(
            g.map(EP, RW | FIXED, iova, &[(gpa, 0x2000)]).status,
            Status::Ok
        );
    }
    // crosses the start, crosses the end: nothing removed
    fails_cleanly(&g, Status::Range, |g| g.unmap(EP, 0x10_1000, 0x10_0000));
    fails_cleanly(&g, Status::Range, |g| g.unmap(EP, 0x10_0000, 0x5000));
    // a byte range is widened to whole pages: [0x100001, 0x105fff) covers both
    let u = g.unmap(EP, 0x10_0001, 0x5ffe);
    assert_eq!((u.status, u.result), (Status::Ok, 0x4000));
    assert!(g.vm.mappings(EP).is_empty());
}

#[test]
fn toobig() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    let max = g.vm.config().max_segs;
    assert!(max >= 252);
    let segs: Vec<(u64, u64)> = (0..u64::from(max) + 1)
        .map(|i| (i * 0x1000, 0x1000))
        .collect();
    fails_cleanly(&g, Status::TooBig, |g| g.map(EP, RW, 0, &segs));
    assert_eq!(g.map(EP, RW, 0, &segs[..max as usize]).status, Status::Ok);
}

#[test]
fn quota() {
    let g = Guest::with(VmConfig {
        pin_limit: 3 * 4096,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    assert_eq!(g.attach(EP2), Status::Ok);
    // Two pages, named twice: pinned once.
    let m = g.map(EP, RW, 0, &[(0x1000, 0x2000), (0x1000, 0x2000)]);
    assert_eq!(m.status, Status::Ok);
    assert_eq!(g.vm.stats().pinned_pages, 2);
    // Another endpoint mapping the same page pins nothing new.
    assert_eq!(g.map(EP2, R, 0, &[(0x1000, 1)]).status, Status::Ok);
    assert_eq!(g.vm.pins().refcount(1), 2);
    fails_cleanly(&g, Status::Quota, |g| g.map(EP, RW, 0, &[(0x5000, 0x2000)]));
    assert_eq!(g.map(EP, RW, 0, &[(0x5000, 0x1000)]).status, Status::Ok);
    assert_eq!(g.vm.stats().pinned_pages, 3);
    assert!(g.vm.ram_range_pinned(0x5fff, 1));
    assert!(!g.vm.ram_range_pinned(0x6000, 0x1000));
}

/// A MAP the embedder cannot carry out (VFIO could not pin it) is refused
/// by its notifier: QUOTA, later runs not notified, every run unmapped
/// again, and no mapping, pin or IOVA left behind.
#[test]
fn quota_refused_by_the_notifier() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    let keep = g.map(EP, RW, 0, &[(0x9000, 0x1000)]);
    assert_eq!(keep.status, Status::Ok);
    let iova0 = next_host_iova(&g);
    let log: Arc<Mutex<Vec<MapEvent>>> = Arc::default();
    let sink = Arc::clone(&log);
    g.vm.set_notifier(Some(Arc::new(move |e: &MapEvent| {
        let mut log = sink.lock().unwrap();
        log.push(*e);
        // Refuse the second MAP run; UNMAP answers are ignored.
        !(e.kind == MapEventKind::Map && log.len() == 2)
    })));
    // Three runs: guest-physically apart.
    let segs = [(0x1000, 0x1000), (0x3000, 0x2000), (0x7000, 0x1000)];
    fails_cleanly(&g, Status::Quota, |g| g.map(EP, RW, 0, &segs));
    let kinds: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .map(|e| (e.kind, e.iova - iova0, e.gpa, e.len))
        .collect();
    use MapEventKind::{Map, Unmap};
    assert_eq!(
        kinds,
        [
            (Map, 0, 0x1000, 0x1000),
            (Map, 0x1000, 0x3000, 0x2000),
            (Unmap, 0, 0x1000, 0x1000),
            (Unmap, 0x1000, 0x3000, 0x2000),
            (Unmap, 0x3000, 0x7000, 0x1000),
        ]
    );
    assert!(
        g.vm.lookup(EP, iova0, None).is_err(),
        "the refused MAP translates"
    );
    g.vm.set_notifier(None);
    assert_eq!(next_host_iova(&g), iova0, "the refused MAP kept its IOVA");
    // The same MAP, not refused, maps.
    let m = g.map(EP, RW, 0, &segs);
    assert_eq!(m.status, Status::Ok);
    assert_eq!(g.vm.stats().pinned_pages, 5);
    assert_eq!(g.vm.stats().mappings, 2);
}

/// A guest may map one page at many IOVAs (pins count distinct pages), so
/// the host memory its page tables and records take has a limit of its
/// own, shared by the VM's domains: QUOTA, leaving nothing behind.
#[test]
fn quota_memory() {
    use pvdma::NODE_BYTES;
    // 48-bit IOVAs: four levels, so a page alone in its 512 GiB region
    // needs three nodes below the root.
    let limit = 8 * NODE_BYTES;
    let g = Guest::with(VmConfig {
        mem_limit: limit,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    assert_eq!(g.attach(EP2), Status::Ok);
    let used = || g.vm.stats().mem_used;
    assert_eq!(used(), 0);

    // The same guest page, 512 GiB apart in IOVA space.
    let far = |i: u64| (i + 1) << 39;
    let m = g.map(EP, RW | FIXED, far(0), &[(0x1000, 0x1000)]);
    assert_eq!(m.status, Status::Ok);
    let one = used();
    assert!(one > 3 * NODE_BYTES && one < 4 * NODE_BYTES, "{one}");
    assert_eq!(
        g.map(EP2, RW | FIXED, far(1), &[(0x1000, 0x1000)]).status,
        Status::Ok
    );
    assert_eq!(used(), 2 * one, "both domains charge one budget");
    // A third sparse page does not fit; nothing is left behind.
    fails_cleanly(&g, Status::Quota, |g| {
        g.map(EP, RW | FIXED, far(2), &[(0x1000, 0x1000)])
    });
    // A host-chosen IOVA lands in the first 512 GiB, also empty so far.
    fails_cleanly(&g, Status::Quota, |g| g.map(EP, RW, 0, &[(0x1000, 0x1000)]));
    // Next to an existing page only the record is new: it fits.
    let near = g.map(EP, RW | FIXED, far(0) + 0x1000, &[(0x1000, 0x1000)]);
    assert_eq!(near.status, Status::Ok);
    assert!(used() - 2 * one < NODE_BYTES);
    assert!(used() <= limit);

    // UNMAP gives the memory back, DETACH all of it.
    assert_eq!(g.unmap(EP2, far(1), 0).status, Status::Ok);
    // Left: EP's first page (nodes and record) and the record of its
    // neighbour.
    assert_eq!(used(), 2 * one - 3 * NODE_BYTES);
    assert_eq!(
        g.map(EP, RW | FIXED, far(2), &[(0x1000, 0x1000)]).status,
        Status::Ok
    );
    assert_eq!(g.detach(EP).status, Status::Ok);
    assert_eq!(used(), 0);
    assert_eq!(g.vm.stats().pinned_pages, 0);
}

#[test]
fn perm() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    fails_cleanly(&g, Status::Perm, |g| g.map(EP, 0, 0, &[(0x1000, 1)]));
    fails_cleanly(&g, Status::Perm, |g| {
        g.map(EP, FIXED, 0x1000, &[(0x1000, 1)])
    });
}

#[test]
fn state() {
    let g = Guest::new();
    fails_cleanly(&g, Status::State, |g| g.map(EP, RW, 0, &[(0x1000, 1)]));
    fails_cleanly(&g, Status::State, |g| g.unmap(EP, 0x1000, 0));
    fails_cleanly(&g, Status::State, |g| g.detach(EP));
    assert_eq!(g.attach(EP), Status::Ok);
    fails_cleanly(&g, Status::State, |g| g.submit(&req(Op::Attach, EP)));
}

#[test]
fn detach_and_reset_drop_everything() {
    let g = Guest::with(VmConfig {
        pin_mode: PinMode::None,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    assert_eq!(g.attach(EP2), Status::Ok);
    for i in 0..3 {
        assert_eq!(
            g.map(EP, RW, 0, &[(0x1000 * (i + 1), 1)]).status,
            Status::Ok
        );
    }
    assert_eq!(g.map(EP2, RW, 0, &[(0x1000, 1)]).status, Status::Ok);
    let d = g.detach(EP);
    assert_eq!((d.status, d.result), (Status::Ok, 3));
    assert_eq!(g.query(EP).result, 0b100);
    assert_eq!(g.vm.stats().pinned_pages, 1);
    g.vm.reset();
    assert_eq!(g.vm.stats().pinned_pages, 0);
    assert_eq!(g.vm.stats().mappings, 0);
    assert_eq!(g.query(EP2).result, 0b110);
}

// ---- UNMAP_LIST (op 6, FEATURES bit 3) ------------------------------------

/// Maps, FIXED, one mapping per `(iova, pages)` for EP, each on guest
/// pages of its own.
fn map_pages(g: &Guest, layout: &[(u64, u64)]) {
    for (i, &(iova, pages)) in layout.iter().enumerate() {
        let gpa = 0x10_0000 + i as u64 * 0x1_0000;
        let m = g.map(EP, RW | FIXED, iova, &[(gpa, pages * 0x1000)]);
        assert_eq!(m.status, Status::Ok);
    }
}

/// Records every notifier event of `g`.
fn record_events(g: &Guest) -> Arc<Mutex<Vec<MapEvent>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    g.vm.set_notifier(Some(Arc::new(move |e: &MapEvent| {
        sink.lock().unwrap().push(*e);
        true
    })));
    log
}

/// Like `fails_cleanly`, and the IOVA allocator and the notifier saw
/// nothing either.
fn list_fails_cleanly(g: &Guest, want: Status, ranges: &[(u64, u64)]) {
    let events = record_events(g);
    let iova0 = next_host_iova(g);
    events.lock().unwrap().clear();
    fails_cleanly(g, want, |g| g.unmap_list(EP, ranges));
    assert!(
        events.lock().unwrap().is_empty(),
        "a failed request notified"
    );
    assert_eq!(next_host_iova(g), iova0, "a failed request moved IOVAs");
    g.vm.set_notifier(None);
}

#[test]
fn unmap_list_ok() {
    let g = Guest::new();
    assert_ne!(
        g.vm.config().features() & u64::from(pvdma::abi::PVDMA_FEATURE_UNMAP_LIST),
        0,
        "on by default"
    );
    assert_eq!(g.attach(EP), Status::Ok);
    // A, B (two pages), C, and D that stays.
    map_pages(
        &g,
        &[
            (0x10_0000, 1),
            (0x10_2000, 2),
            (0x20_0000, 1),
            (0x30_0000, 1),
        ],
    );
    let events = record_events(&g);
    let before = g.vm.stats();
    // Out of order, byte ranges widened to pages, one range holding two
    // mappings and a gap.
    let u = g.unmap_list(EP, &[(0x20_0fff, 1), (0x10_0010, 0x3000)]);
    assert_eq!((u.status, u.result), (Status::Ok, 0x4000));
    assert_eq!(u.iova, 0, "iova is not written back");
    let left: Vec<u64> = g.vm.mappings(EP).iter().map(|m| m.iova).collect();
    assert_eq!(left, [0x30_0000]);
    let after = g.vm.stats();
    assert_eq!(after.mappings, before.mappings - 3);
    assert_eq!(after.pinned_pages, before.pinned_pages - 4);
    assert!(after.mem_used < before.mem_used);
    // An unmap event for every page run of every removed mapping.
    let mut seen: Vec<(u64, u64)> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!((e.kind, e.requester), (MapEventKind::Unmap, EP));
            (e.iova, e.len)
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        [
            (0x10_0000, 0x1000),
            (0x10_2000, 0x2000),
            (0x20_0000, 0x1000)
        ]
    );
    // No translation reaches the removed ranges; D still translates.
    let mut frags = [Fragment {
        hva: 0,
        gpa: 0,
        len: 0,
    }; 2];
    for iova in [0x10_0000, 0x10_3000, 0x20_0000] {
        assert!(g
            .vm
            .translate(EP, iova, 1, Access::Read, &mut frags)
            .is_err());
    }
    assert!(g
        .vm
        .translate(EP, 0x30_0000, 1, Access::Read, &mut frags)
        .is_ok());
    // Exactly MAX_SEGS ranges are fine; the page just below 2^IOVA_BITS
    // is in range.
    let g = Guest::with(VmConfig {
        iova_bits: 32,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    let max = u64::from(g.vm.config().max_segs);
    let layout: Vec<(u64, u64)> = (0..max).map(|i| ((i + 1) << 13, 1)).collect();
    map_pages(&g, &layout[..8]);
    map_pages(&g, &[((1 << 32) - 0x1000, 1)]);
    let mut ranges: Vec<(u64, u64)> = layout.iter().map(|&(iova, _)| (iova, 0x1000)).collect();
    ranges[max as usize - 1] = ((1 << 32) - 0x1000, 0x1000);
    ranges.reverse();
    let u = g.unmap_list(EP, &ranges);
    // The ranges past the eighth hold nothing.
    assert_eq!(u.status, Status::NoEnt);
    let mut ranges: Vec<(u64, u64)> = layout[..8]
        .iter()
        .map(|&(iova, _)| (iova, 0x1000))
        .collect();
    ranges.push(((1 << 32) - 0x1000, 0x1000));
    let u = g.unmap_list(EP, &ranges);
    assert_eq!((u.status, u.result), (Status::Ok, 9 * 0x1000));
    assert!(g.vm.mappings(EP).is_empty());
    assert_eq!(g.vm.stats().pinned_pages, 0);
    assert_eq!(g.vm.stats().mem_used, 0);
}

#[test]
fn unmap_list_inval() {
    let g = Guest::with(VmConfig {
        iova_bits: 32,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    map_pages(&g, &[(0x10_0000, 1), (0x10_2000, 2), (0x20_0000, 1)]);
    let a = (0x10_0000, 0x1000);
    // No ranges.
    list_fails_cleanly(&g, Status::Inval, &[]);
    // A range of length 0, one that wraps, one reaching past 2^IOVA_BITS.
    list_fails_cleanly(&g, Status::Inval, &[a, (0x20_0000, 0)]);
    list_fails_cleanly(&g, Status::Inval, &[a, (u64::MAX - 0xfff, 0x2000)]);
    list_fails_cleanly(&g, Status::Inval, &[a, ((1 << 32) - 0x1000, 0x1001)]);
    list_fails_cleanly(&g, Status::Inval, &[(1 << 32, 0x1000), a]);
    // Page spans that overlap, in either order, also by one shared page
    // or with one range inside the other.
    list_fails_cleanly(&g, Status::Inval, &[a, a]);
    list_fails_cleanly(
        &g,
        Status::Inval,
        &[(0x10_2000, 0x2000), (0x10_0000, 0x2001)],
    );
    list_fails_cleanly(
        &g,
        Status::Inval,
        &[(0x10_0000, 0x2001), (0x10_2000, 0x2000)],
    );
    list_fails_cleanly(
        &g,
        Status::Inval,
        &[(0x20_0000, 1), (0x10_0000, 0x20_0000), (0x20_0fff, 1)],
    );
    list_fails_cleanly(&g, Status::Inval, &[(0x20_0000, 1), (0x20_0fff, 1)]);
    // Flag bits 3..15 are checked; READ/WRITE/FIXED, iova and length are
    // ignored.
    let mut r = unmap_list_req(EP, &[a]);
    r.flags = 8;
    fails_cleanly(&g, Status::Inval, |g| g.submit(&r));
    r.flags = RW | FIXED;
    r.iova = 0x20_0000;
    r.length = 0x1000;
    let u = g.submit(&r);
    assert_eq!((u.status, u.result), (Status::Ok, 0x1000));
    assert_eq!(g.vm.mappings(EP).len(), 2);
}

#[test]
fn unmap_list_disabled_is_an_unknown_op() {
    let g = Guest::with(VmConfig {
        unmap_list: false,
        ..VmConfig::default()
    });
    assert_eq!(
        g.vm.config().features() & u64::from(pvdma::abi::PVDMA_FEATURE_UNMAP_LIST),
        0
    );
    assert_eq!(g.attach(EP), Status::Ok);
    map_pages(&g, &[(0x10_0000, 1)]);
    list_fails_cleanly(&g, Status::Inval, &[(0x10_0000, 0x1000)]);
    // Unknown op wins over TOOBIG: the slots are never looked at.
    let many = vec![(0x10_0000, 0x1000); g.vm.config().max_segs as usize + 1];
    list_fails_cleanly(&g, Status::Inval, &many);
    let s = g.vm.stats();
    assert_eq!(s.requests[Op::UnmapList.index()].iter().sum::<u64>(), 0);
    assert_eq!(s.requests[0][Status::Inval.index()], 2);
}

#[test]
fn unmap_list_nodev_state() {
    let g = Guest::new();
    fails_cleanly(&g, Status::State, |g| {
        g.unmap_list(EP, &[(0x10_0000, 0x1000)])
    });
    // STATE comes before the range rules.
    fails_cleanly(&g, Status::State, |g| g.unmap_list(EP, &[(0x10_0000, 0)]));
    fails_cleanly(&g, Status::NoDev, |g| {
        g.unmap_list(0x0020, &[(0x10_0000, 0x1000)])
    });
}

#[test]
fn unmap_list_fault_toobig() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    map_pages(&g, &[(0x10_0000, 1)]);
    let max = g.vm.config().max_segs as usize;
    let many: Vec<(u64, u64)> = (0..=max as u64).map(|i| (i << 12, 0x1000)).collect();
    list_fails_cleanly(&g, Status::TooBig, &many);
    // The range array runs past the end of RAM.
    let mut r = unmap_list_req(EP, &[(0x10_0000, 0x1000)]);
    r.nr_segs = 2;
    fails_cleanly(&g, Status::Fault, |g| g.submit_at(LOW.1 - 64 - 16, &r));
    assert_eq!(g.vm.mappings(EP).len(), 1);
}

#[test]
fn unmap_list_noent_range() {
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    map_pages(&g, &[(0x10_0000, 1), (0x10_2000, 2), (0x20_0000, 1)]);
    let a = (0x10_0000, 0x1000);
    // One range of several holds nothing.
    list_fails_cleanly(&g, Status::NoEnt, &[a, (0x40_0000, 0x1000)]);
    list_fails_cleanly(&g, Status::NoEnt, &[(0x10_1000, 0x1000), a]);
    // A mapping crosses the start or the end of a range.
    list_fails_cleanly(&g, Status::Range, &[a, (0x10_3000, 0x1000)]);
    list_fails_cleanly(&g, Status::Range, &[(0x10_2000, 0x1000), a]);
    // Two adjacent ranges splitting one mapping: it crosses both.
    list_fails_cleanly(
        &g,
        Status::Range,
        &[(0x10_2000, 0x1000), (0x10_3000, 0x1000)],
    );
    // RANGE wins over NOENT, wherever they are in the list.
    list_fails_cleanly(
        &g,
        Status::Range,
        &[(0x40_0000, 0x1000), (0x10_3000, 0x1000)],
    );
    list_fails_cleanly(
        &g,
        Status::Range,
        &[(0x10_3000, 0x1000), (0x40_0000, 0x1000)],
    );
    assert_eq!(g.vm.mappings(EP).len(), 3);
}

#[test]
fn request_counts_by_op_and_transport() {
    use pvdma::Transport;
    let g = Guest::new();
    assert_eq!(g.attach(EP), Status::Ok);
    map_pages(&g, &[(0x10_0000, 1)]);
    assert_eq!(g.unmap_list(EP, &[(0x10_0000, 1)]).status, Status::Ok);
    let block = encode_request(&req(Op::Query, EP));
    g.mem
        .write_slice(&block, vm_memory::GuestAddress(BLOCK))
        .unwrap();
    assert_eq!(g.vm.submit_via(BLOCK, Transport::Doorbell), Status::Ok);
    assert_eq!(g.vm.submit_via(BLOCK, Transport::Hypercall), Status::Ok);
    assert_eq!(g.vm.submit_via(LOW.1, Transport::Hypercall), Status::Fault);
    let s = g.vm.stats();
    let total = |op: usize| s.requests[op].iter().sum::<u64>();
    assert_eq!(total(Op::Attach.index()), 1);
    assert_eq!(total(Op::Map.index()), 1);
    assert_eq!(total(Op::UnmapList.index()), 1);
    assert_eq!(total(Op::Query.index()), 2);
    assert_eq!(total(0), 1, "the block outside RAM");
    assert_eq!(s.transports, [3, 1, 2]);
    assert_eq!(
        s.requests.iter().flatten().sum::<u64>(),
        s.transports.iter().sum::<u64>()
    );
}
