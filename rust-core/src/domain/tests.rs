// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of the domain: the work its refusals do, ranges near 2^64.

use super::*;
use crate::pin::PinMode;
use crate::ram::GuestRam;
use crate::sync::epoch;
use crate::testing::GuestMem;

/// Mappings of the crowd: one page each, side by side from `CROWD`.
const MANY: u64 = 1000;
const CROWD: u64 = 0x100;

/// A domain with `MANY` one-page mappings at pages `CROWD..`, and a
/// two-page mapping at page `TWO`; its RAM and pins.
const TWO: u64 = 0x10_0000;

struct Fixture {
    dom: Domain,
    pins: PinTable,
    ram: GuestRam,
    _mem: GuestMem,
}

impl Fixture {
    fn new() -> Fixture {
        let mem = GuestMem::new(&[(0, 1 << 20)]);
        let ram = GuestRam::new();
        // SAFETY: `_mem` outlives `ram`'s uses: both live in the
        // fixture, and nothing keeps the layout past it.
        unsafe { ram.add(0, 1 << 20, mem.hva(0)) }.expect("adding RAM");
        let f = Fixture {
            dom: Domain::new(48),
            pins: PinTable::new(u64::MAX, PinMode::None),
            ram,
            _mem: mem,
        };
        for page in CROWD..CROWD + MANY {
            f.map(page, 1);
        }
        f.map(TWO, 2);
        f
    }

    fn map(&self, page: u64, pages: u64) {
        let guard = epoch::pin();
        let segs = vec![(0x1000, pages * PAGE_SIZE)];
        let at = IovaChoice::Fixed(page << PAGE_SHIFT);
        let ram = self.ram.load(&guard);
        self.dom
            .map(segs, Perm::RW, at, ram, &self.pins, &mut |_| {})
            .expect("mapping");
    }

    /// UNMAP of the page span `[first, last]`, and the record probes
    /// it made.
    fn unmap(&self, first: u64, last: u64) -> (Result<Removed>, u64) {
        let guard = epoch::pin();
        let ram = self.ram.load(&guard);
        let before = self.dom.lock().parts().1.probes.get();
        let (iova, len) = (first << PAGE_SHIFT, (last - first + 1) << PAGE_SHIFT);
        let r = self
            .dom
            .unmap_range(iova, len, ram, &self.pins, &mut |_| {});
        (r, self.dom.lock().parts().1.probes.get() - before)
    }

    fn unmap_list(&self, spans: &[(u64, u64)]) -> (Result<Removed>, u64) {
        let guard = epoch::pin();
        let ram = self.ram.load(&guard);
        let before = self.dom.lock().parts().1.probes.get();
        let r = self.dom.unmap_spans(spans, ram, &self.pins, &mut |_| {});
        (r, self.dom.lock().parts().1.probes.get() - before)
    }
}

/// UNMAP ranges reaching 2^64 neither overflow nor miss mappings: the
/// whole 64-bit space takes every mapping, its last page is NOENT.
#[test]
fn unmap_ranges_up_to_2_pow_64() {
    let f = Fixture::new();
    let guard = epoch::pin();
    let ram = f.ram.load(&guard);
    let unmap = |iova, len| f.dom.unmap_range(iova, len, ram, &f.pins, &mut |_| {});
    let top = PAGE_SIZE.wrapping_neg();
    for (iova, len) in [(top, PAGE_SIZE), (top + 5, PAGE_SIZE - 5), (top, 1)] {
        let r = unmap(iova, len);
        assert!(
            matches!(r, Err(Error::NoEnt { .. })),
            "{iova:#x}+{len:#x}: {r:?}"
        );
    }
    // Wrapping past 2^64, and empty: invalid.
    assert!(matches!(unmap(top, PAGE_SIZE + 1), Err(Error::Inval(_))));
    assert!(matches!(
        unmap(CROWD << PAGE_SHIFT, 0),
        Err(Error::Inval(_))
    ));
    let removed = unmap(0, u64::MAX).expect("everything inside");
    assert_eq!(removed.mappings, MANY + 1);
    assert_eq!(f.dom.mapping_count(), 0);
}

/// A refused UNMAP or UNMAP_LIST probes a bounded number of records,
/// however many mappings the domain or the range holds: the guest
/// picks the inputs, and all of it runs under QEMU's global lock.
#[test]
fn refusals_cost_the_same_whatever_the_domain_holds() {
    let f = Fixture::new();
    let last = CROWD + MANY - 1;
    // RANGE: from the second page of the two-page mapping.
    let (r, probes) = f.unmap(TWO + 1, TWO + 5);
    assert!(matches!(r, Err(Error::Range { iova }) if iova == (TWO + 1) << PAGE_SHIFT));
    assert!(probes <= 2, "{probes} probes");
    // RANGE: the whole crowd, and the first page of the two-page one.
    let (r, probes) = f.unmap(CROWD, TWO);
    assert!(matches!(r, Err(Error::Range { iova }) if iova == TWO << PAGE_SHIFT));
    assert!(probes <= 4, "{probes} probes");
    // NOENT: an empty span.
    let (r, probes) = f.unmap(TWO + 4, TWO + 100);
    assert!(matches!(r, Err(Error::NoEnt { .. })), "{r:?}");
    assert!(probes <= 4, "{probes} probes");
    // UNMAP_LIST: the crowd, then a crossing or an empty span.
    for (other, noent) in [((TWO, TWO), false), ((TWO + 4, TWO + 9), true)] {
        let (r, probes) = f.unmap_list(&[(CROWD, last), other]);
        assert_eq!(matches!(r, Err(Error::NoEnt { .. })), noent, "{r:?}");
        assert_eq!(matches!(r, Err(Error::Range { .. })), !noent, "{r:?}");
        assert!(probes <= 8, "{probes} probes");
    }
    // Nothing was removed; then the crowd goes at once.
    assert_eq!(f.dom.mapping_count() as u64, MANY + 1);
    let (r, _) = f.unmap_list(&[(CROWD, last), (TWO, TWO + 1)]);
    assert_eq!(r.expect("removing").mappings, MANY + 1);
    assert_eq!(f.dom.mapping_count(), 0);
}
