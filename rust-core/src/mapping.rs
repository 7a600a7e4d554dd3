// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A domain's mapping records: what one successful MAP asked for
//! ([`Mapping`]), its page runs, the segment rules MAP checks, and the list
//! of guest frames it pins. Pure bookkeeping: no table, no locks.

use std::fmt;

use smallvec::SmallVec;

use crate::domain::{Error, Result};
use crate::pin::{self, PinTable};
use crate::ram::RamLayout;
use crate::types::{Perm, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE};

/// One mapping: a guest MAP request that succeeded.
#[derive(Clone, PartialEq, Eq)]
pub struct Mapping {
    /// IOVA of the first byte (same in-page offset as `segs[0].0`).
    pub iova: u64,
    /// Sum of the segment lengths.
    pub length: u64,
    /// What the device may do.
    pub perms: Perm,
    /// Guest-physical segments `(gpa, len)` as the guest gave them.
    pub segs: Vec<(u64, u64)>,
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Mapping({:#x}+{:#x} {} {} segs)",
            self.iova,
            self.length,
            self.perms,
            self.segs.len()
        )
    }
}

/// A run of whole pages that is contiguous in IOVA and in guest-physical
/// space: the unit of table updates and of notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// Page-aligned IOVA.
    pub iova: u64,
    /// Page-aligned guest-physical address.
    pub gpa: u64,
    /// Length in bytes, a multiple of the page size.
    pub len: u64,
}

impl Mapping {
    /// First IOVA page number.
    pub fn first_page(&self) -> u64 {
        self.iova >> PAGE_SHIFT
    }

    /// Number of IOVA pages covered (page of the first byte to page of the
    /// last). Mappings are validated on creation, so this cannot overflow.
    pub fn npages(&self) -> u64 {
        ((self.iova & PAGE_MASK) + self.length).div_ceil(PAGE_SIZE)
    }

    /// Bytes of IOVA space the mapping occupies (whole pages).
    pub fn span(&self) -> u64 {
        self.npages() << PAGE_SHIFT
    }

    /// The page runs, merging segments that continue each other in
    /// guest-physical space.
    pub fn runs(&self) -> Vec<PageRun> {
        self.run_iter().collect()
    }

    /// [`Mapping::runs`] without collecting them.
    pub fn run_iter(&self) -> Runs<'_> {
        Runs::new(self.iova, &self.segs)
    }

    /// Distinct guest page frame numbers covered, ascending.
    ///
    /// Segments may name the same pages many times; the runs are merged as
    /// intervals first, so the work and memory are bounded by the distinct
    /// pages (themselves bounded by guest RAM), not by the IOVA span.
    pub fn gfns(&self) -> Vec<u64> {
        let mut gfns = Vec::new();
        for_each_distinct_span(self.run_iter(), |first, end| gfns.extend(first..end));
        gfns
    }

    /// True when some page of the mapping lies in [gpa, gpa + len).
    pub fn touches_gpa(&self, gpa: u64, len: u64) -> bool {
        let end = gpa.saturating_add(len);
        self.run_iter().any(|r| r.gpa < end && gpa < r.gpa + r.len)
    }
}

/// The page runs of the segments `segs` of a mapping at `iova`: an
/// iterator, so that MAP and UNMAP walk them without allocating.
#[derive(Clone)]
pub struct Runs<'a> {
    segs: std::slice::Iter<'a, (u64, u64)>,
    /// IOVA of the next segment's first page.
    iova: u64,
    /// The run being extended.
    pending: Option<PageRun>,
}

impl<'a> Runs<'a> {
    pub(crate) fn new(iova: u64, segs: &'a [(u64, u64)]) -> Runs<'a> {
        Runs {
            segs: segs.iter(),
            iova: iova & !PAGE_MASK,
            pending: None,
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = PageRun;

    fn next(&mut self) -> Option<PageRun> {
        for &(gpa, len) in self.segs.by_ref() {
            let start = gpa & !PAGE_MASK;
            let bytes = ((gpa & PAGE_MASK) + len).div_ceil(PAGE_SIZE) << PAGE_SHIFT;
            let iova = self.iova;
            self.iova += bytes;
            match &mut self.pending {
                Some(last) if last.gpa + last.len == start => last.len += bytes,
                pending => {
                    let done = pending.replace(PageRun {
                        iova,
                        gpa: start,
                        len: bytes,
                    });
                    if done.is_some() {
                        return done;
                    }
                }
            }
        }
        self.pending.take()
    }
}

/// Calls `f(first_gfn, end_gfn)` for the distinct guest frames of `runs`,
/// as disjoint ascending spans. Runs that are already ascending and
/// disjoint (what drivers send) take one pass without allocating; others
/// are sorted and merged first.
pub(crate) fn for_each_distinct_span(runs: Runs<'_>, mut f: impl FnMut(u64, u64)) {
    let span = |r: PageRun| (r.gpa >> PAGE_SHIFT, (r.gpa + r.len) >> PAGE_SHIFT);
    let mut prev_end = 0;
    let ascending = runs.clone().enumerate().all(|(i, r)| {
        let (first, end) = span(r);
        let ok = i == 0 || first >= prev_end;
        prev_end = end;
        ok
    });
    if ascending {
        runs.for_each(|r| {
            let (first, end) = span(r);
            f(first, end);
        });
        return;
    }
    // At most one run per segment.
    let mut spans: Vec<(u64, u64)> = Vec::with_capacity(runs.segs.len() + 1);
    spans.extend(runs.map(span));
    spans.sort_unstable();
    let mut merged: Option<(u64, u64)> = None;
    for (s, e) in spans {
        match &mut merged {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            last => {
                if let Some((ls, le)) = last.replace((s, e)) {
                    f(ls, le);
                }
            }
        }
    }
    if let Some((s, e)) = merged {
        f(s, e);
    }
}

/// Checks the ABI's segment rules and returns the mapping's byte length
/// and page count. Does not look at guest RAM.
pub fn check_segments(segs: &[(u64, u64)]) -> Result<(u64, u64)> {
    let Some(&(gpa0, _)) = segs.first() else {
        return Err(Error::Inval("no segments"));
    };
    let last = segs.len() - 1;
    let mut length: u64 = 0;
    for (i, &(gpa, len)) in segs.iter().enumerate() {
        if len == 0 {
            return Err(Error::Inval("zero-length segment"));
        }
        let end = gpa
            .checked_add(len)
            .ok_or(Error::Inval("segment wraps the address space"))?;
        if i > 0 && gpa & PAGE_MASK != 0 {
            return Err(Error::Inval("segment after the first is not page aligned"));
        }
        if i < last && end & PAGE_MASK != 0 {
            return Err(Error::Inval(
                "segment before the last does not end on a page",
            ));
        }
        length = length
            .checked_add(len)
            .ok_or(Error::Inval("total length overflows"))?;
    }
    let npages = (gpa0 & PAGE_MASK)
        .checked_add(length)
        .ok_or(Error::Inval("total length overflows"))?
        .div_ceil(PAGE_SIZE);
    Ok((length, npages))
}

/// The one span of frames `[first, end)` of a one-segment mapping: a
/// segment is one run of distinct pages, so there is no ordering or
/// overlap to look for (the usual one-page MAP). `None` for more segments.
fn single_span(runs: &Runs<'_>) -> Option<(u64, u64)> {
    if runs.segs.len() != 1 {
        return None;
    }
    let run = runs.clone().next()?;
    let first = run.gpa >> PAGE_SHIFT;
    Some((first, first + (run.len >> PAGE_SHIFT)))
}

/// Takes one pin on each distinct frame of the runs `runs` (all or
/// nothing, see [`PinTable::pin`]). A one-segment mapping is pinned as a
/// span of frames, with no page list built and no RAM lookup unless the
/// pages are `mlock`ed.
pub(crate) fn pin_runs(pins: &PinTable, runs: Runs<'_>, ram: &RamLayout) -> pin::Result<()> {
    match single_span(&runs) {
        Some((first, end)) => pins.pin_span(first, end, ram),
        None => pins.pin(&page_list(runs, ram)),
    }
}

/// Gives back the pins [`pin_runs`] took for the same runs.
pub(crate) fn unpin_runs(pins: &PinTable, runs: Runs<'_>, ram: &RamLayout) {
    match single_span(&runs) {
        Some((first, end)) => pins.unpin_span(first, end, ram),
        None => pins.unpin(&page_list(runs, ram)),
    }
}

/// The (gfn, hva) list the pin table takes for a mapping: its distinct
/// frames, ascending. Every page was checked to be in RAM when the mapping
/// was made; a page whose region went away since gets hva 0, which the pin
/// table only uses for mlock. Inline (no allocation) up to 16 pages.
pub(crate) fn page_list(runs: Runs<'_>, ram: &RamLayout) -> PageList {
    let mut pages = PageList::new();
    if let Some((first, end)) = single_span(&runs) {
        push_frames(&mut pages, ram, first, end);
        return pages;
    }
    // Room for every page up front (bounded: overlapping segments may
    // name far more pages than are distinct).
    let named: u64 = runs.clone().map(|r| r.len >> PAGE_SHIFT).sum();
    pages.reserve(named.min(1 << 12) as usize);
    for_each_distinct_span(runs, |first, end| push_frames(&mut pages, ram, first, end));
    pages
}

/// Appends `(gfn, hva)` for the frames `[first, end)` to `pages`.
fn push_frames(pages: &mut PageList, ram: &RamLayout, first: u64, end: u64) {
    let mut gfn = first;
    while gfn < end {
        let gpa = gfn << PAGE_SHIFT;
        // One RAM lookup per host-contiguous stretch, not per page.
        let (hva, bytes) = ram
            .host_run(gpa, (end - gfn) << PAGE_SHIFT)
            .filter(|&(_, bytes)| bytes >= PAGE_SIZE)
            .unwrap_or((0, PAGE_SIZE));
        let n = bytes >> PAGE_SHIFT;
        pages.reserve(n as usize);
        for i in 0..n {
            let hva = if hva == 0 {
                0
            } else {
                hva + (i << PAGE_SHIFT) as usize
            };
            pages.push((gfn + i, hva));
        }
        gfn += n;
    }
}

/// A mapping's pinned pages, see [`page_list`].
pub(crate) type PageList = SmallVec<[(u64, usize); 16]>;
