// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM going away under live mappings: pvdma tears the affected
//! mappings down first (UNMAP notifications, pins released), then new MAPs
//! of that memory are FAULT. See docs/abi.md, "Choices", item 10.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use pvdma::{Access, Fragment, Status};
use pvdma::{MapEvent, MapEventKind};

#[test]
fn removing_a_region_tears_down_exactly_the_mappings_in_it() {
    let g = Guest::new();
    let events: Arc<Mutex<Vec<MapEvent>>> = Arc::default();
    let sink = events.clone();
    g.vm.set_notifier(Some(Arc::new(move |e: &MapEvent| {
        sink.lock().unwrap().push(*e);
        true
    })));
    assert_eq!(g.attach(EP), Status::Ok);
    assert_eq!(g.attach(EP2), Status::Ok);
    let low = g.map(EP, RW, 0, &[(0x3000, 0x1000)]);
    let high = g.map(EP, RW, 0, &[(HIGH.0 + 0x2000, 0x2000)]);
    // One mapping straddling both regions' pages: low page, then high page.
    let mixed = g.map(EP2, R, 0, &[(0x5000, 0x1000), (HIGH.0, 0x1000)]);
    for m in [low, high, mixed] {
        assert_eq!(m.status, Status::Ok);
    }
    assert!(g.vm.ram_range_pinned(HIGH.0, HIGH.1));
    events.lock().unwrap().clear();

    let torn = g.vm.remove_ram_region(HIGH.0, HIGH.1).unwrap();
    assert_eq!(torn, 2, "the high mapping and the mixed one");

    // Pins of the torn-down mappings are gone; the low mapping keeps its.
    assert!(!g.vm.ram_range_pinned(HIGH.0, HIGH.1));
    assert_eq!(g.vm.pins().snapshot(), vec![(3, 1)]);
    assert_eq!(g.vm.stats().mappings, 1);
    assert_eq!(g.vm.mappings(EP).len(), 1);
    assert!(g.vm.mappings(EP2).is_empty());

    // Every removed run was notified as an UNMAP before the call returned.
    let ev = events.lock().unwrap().clone();
    assert!(ev.iter().all(|e| e.kind == MapEventKind::Unmap));
    let mut got: Vec<(u32, u64, u64)> = ev.iter().map(|e| (e.requester, e.gpa, e.len)).collect();
    got.sort_unstable();
    assert_eq!(
        got,
        vec![
            (EP, HIGH.0 + 0x2000, 0x2000),
            (EP2, 0x5000, 0x1000),
            (EP2, HIGH.0, 0x1000),
        ]
    );

    // Translations of the removed IOVAs now fault; the low one still works.
    let mut f = [Fragment {
        hva: 0,
        gpa: 0,
        len: 0,
    }; 2];
    assert!(g
        .vm
        .translate(EP, high.iova, 1, Access::Read, &mut f)
        .is_err());
    assert!(g
        .vm
        .translate(EP2, mixed.iova, 1, Access::Read, &mut f)
        .is_err());
    assert_eq!(g.vm.translate(EP, low.iova, 1, Access::Read, &mut f), Ok(1));

    // The memory is no longer RAM: mapping it is FAULT, and nothing leaks.
    let before = g.footprint();
    assert_eq!(g.map(EP, RW, 0, &[(HIGH.0, 0x1000)]).status, Status::Fault);
    assert_eq!(g.footprint(), before);

    // Removing it again is an error, not a panic.
    assert!(g.vm.remove_ram_region(HIGH.0, HIGH.1).is_err());
}
