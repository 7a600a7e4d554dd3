// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A translation domain: the IOVA space of one attached endpoint.
//!
//! The domain pairs the lock-free [`IoPageTable`] that readers walk with the
//! writer-side records (which mapping owns which pages, the IOVA allocator)
//! that MAP and UNMAP need. Writers are serialised by the domain mutex; the
//! table is only ever changed while it is held, so the records and the table
//! agree whenever the mutex is free.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::hash::PageKeyHash;
use crate::iova_alloc::IovaAllocator;
use crate::pin::{self, PinTable};
use crate::ram::RamLayout;
use crate::sync::epoch::Guard;
use crate::sync::{AtomicU64, Ordering};
use crate::table::{IoPageTable, TableWriter, HUGE_SIZE, NODE_BYTES};
use crate::types::{Access, Fragment, Perm, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE};

/// Why a domain operation failed. Each maps onto one ABI status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed request (segment rules, alignment, range).
    #[error("malformed mapping request: {0}")]
    Inval(&'static str),
    /// A segment is not entirely in guest RAM.
    #[error("segment {gpa:#x}+{len:#x} is not entirely in guest RAM")]
    Fault {
        /// Segment start.
        gpa: u64,
        /// Segment length.
        len: u64,
    },
    /// No free IOVA range of the size asked for.
    #[error("no free IOVA range of {pages} pages")]
    NoSpace {
        /// Pages asked for.
        pages: u64,
    },
    /// A FIXED range overlaps a mapping.
    #[error("IOVA range {iova:#x}+{len:#x} is not free")]
    Exist {
        /// Range start.
        iova: u64,
        /// Range length.
        len: u64,
    },
    /// No mapping where one was named.
    #[error("no mapping at IOVA {iova:#x}")]
    NoEnt {
        /// Address asked about.
        iova: u64,
    },
    /// A mapping crosses an end of the UNMAP range.
    #[error("mapping at {iova:#x}+{len:#x} crosses the end of the range")]
    Range {
        /// The crossing mapping's first byte.
        iova: u64,
        /// Its length.
        len: u64,
    },
    /// The pin table refused.
    #[error(transparent)]
    Pin(#[from] pin::Error),
    /// The mapping's page tables and records would pass the VM's memory
    /// limit.
    #[error("mapping needs up to {need} bytes of host memory; {used} of {limit} in use")]
    MemQuota {
        /// Bytes reserved for the request (an upper bound).
        need: u64,
        /// Bytes in use before it.
        used: u64,
        /// The limit.
        limit: u64,
    },
}

/// Host memory the mappings of one VM may take: page-table nodes below
/// each domain's root, and the records of each mapping. Shared by the VM's
/// domains. A guest may map one page at any number of IOVAs (pins count
/// distinct pages only), so without this bound a guest could make the host
/// allocate page tables without limit.
#[derive(Debug)]
pub struct MemBudget {
    limit: u64,
    used: AtomicU64,
}

impl MemBudget {
    /// A budget of `limit` bytes (`u64::MAX`: unlimited).
    pub fn new(limit: u64) -> MemBudget {
        MemBudget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        // Relaxed: a statistic; reservations use read-modify-write.
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit under the limit.
    fn reserve(&self, bytes: u64) -> Result<()> {
        // Relaxed: the counter guards no other memory; the read-modify-write
        // alone makes concurrent reservations add up exactly.
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .map(|_| ())
            .map_err(|used| Error::MemQuota {
                need: bytes,
                used,
                limit: self.limit,
            })
    }

    /// Gives back `bytes` taken by [`MemBudget::reserve`].
    fn release(&self, bytes: u64) {
        // A MAP whose reservation was exact gives back nothing: no locked
        // read-modify-write for that.
        if bytes == 0 {
            return;
        }
        // Relaxed: see reserve.
        let old = self.used.fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(old >= bytes, "memory budget underflow");
    }
}

/// Bytes charged for one mapping's record besides its table nodes: the
/// record, its segment list, and the record map's slot and IOVA allocator
/// entries it may add (an estimate of both, on the safe side).
fn record_bytes(segs: usize) -> u64 {
    const BOOKKEEPING: u64 = 128;
    std::mem::size_of::<Mapping>() as u64
        + segs as u64 * std::mem::size_of::<(u64, u64)>() as u64
        + BOOKKEEPING
}

/// Result alias for domain operations.
pub type Result<T> = std::result::Result<T, Error>;

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
    fn new(iova: u64, segs: &'a [(u64, u64)]) -> Runs<'a> {
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
fn for_each_distinct_span(runs: Runs<'_>, mut f: impl FnMut(u64, u64)) {
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

/// Where the IOVA of a new mapping comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IovaChoice {
    /// The guest gave it (FIXED).
    Fixed(u64),
    /// The host picks it.
    Host,
}

/// Why a translation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u32)]
pub enum FaultReason {
    /// No mapping covers the address.
    #[error("unmapped")]
    Unmapped = 1,
    /// A mapping covers it without the access permission.
    #[error("permission")]
    Permission = 2,
    /// The endpoint is not attached and bypass is off.
    #[error("blocked")]
    Blocked = 3,
    /// The address (or its translation) is outside guest RAM.
    #[error("outside RAM")]
    OutsideRam = 4,
    /// The requester is not an endpoint behind this pvdma.
    #[error("unknown requester")]
    NoDevice = 5,
    /// The range wraps the 64-bit address space.
    #[error("range overflow")]
    Overflow = 6,
}

/// A refused translation: what and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DMA refused at {iova:#x}: {reason}")]
pub struct TranslateFault {
    /// First address that could not be translated.
    pub iova: u64,
    /// Why.
    pub reason: FaultReason,
}

/// Collects fragments, merging a piece into the previous one when it
/// continues it both in host and in guest-physical memory. Stores at most
/// `out.len()` fragments but counts all of them, so a caller with too small
/// an array learns how many it needs.
pub struct FragmentSink<'a> {
    out: &'a mut [Fragment],
    count: usize,
    last: Fragment,
}

impl<'a> FragmentSink<'a> {
    /// A sink writing into `out`.
    pub fn new(out: &'a mut [Fragment]) -> Self {
        FragmentSink {
            out,
            count: 0,
            last: Fragment {
                hva: 0,
                gpa: 0,
                len: 0,
            },
        }
    }

    /// Fragments the translation needed so far (may exceed `out.len()`).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Adds `len` bytes at host `hva`, guest-physical `gpa`.
    #[inline]
    pub fn push(&mut self, hva: usize, gpa: u64, len: u64) {
        let last = &mut self.last;
        if self.count > 0
            && last.hva.wrapping_add(last.len as usize) == hva
            && last.gpa.wrapping_add(last.len) == gpa
        {
            last.len += len;
            if let Some(slot) = self.out.get_mut(self.count - 1) {
                slot.len = last.len;
            }
            return;
        }
        *last = Fragment { hva, gpa, len };
        if let Some(slot) = self.out.get_mut(self.count) {
            *slot = *last;
        }
        self.count += 1;
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // DETACH clears a domain before dropping it, so this is 0 but when
        // a VM goes away with mappings in place.
        let charged = self.inner.get_mut().charged;
        self.budget.release(charged);
    }
}

/// Source of [`Domain::generation`] values: one counter for every domain
/// of the process, so that a value is never seen twice, not even by a
/// domain allocated where a freed one was (a cache keyed on it has no ABA).
static NEXT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub(crate) fn next_generation() -> u64 {
    // Relaxed: only uniqueness matters; publication of the new value is
    // ordered by the Release store into `Domain::generation`.
    NEXT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The translation state of one attached endpoint.
pub struct Domain {
    table: IoPageTable,
    /// On cache lines of its own: every request locks it, and every
    /// translation reads the table's root next to it otherwise.
    inner: CachePadded<Mutex<DomainInner>>,
    /// Changes whenever a translation is removed (UNMAP, DETACH, RAM
    /// removal): caches of translations (virtqueue rings) compare it.
    generation: AtomicU64,
    /// The VM's memory budget, charged for nodes and records.
    budget: Arc<MemBudget>,
    /// A generation shared with other domains (the VM's, see
    /// `Vm::lookup`), set to a new value after this one on every removal.
    shared_generation: Option<Arc<AtomicU64>>,
}

struct DomainInner {
    /// Mappings by first IOVA page. Unordered: range questions (which
    /// mappings lie in a span, does one cross its ends) are answered by
    /// the table, whose leaves are exactly the mapped pages (see
    /// [`DomainInner::span_victims`]). Keyed per domain: guests pick IOVAs.
    mappings: HashMap<u64, Mapping, PageKeyHash>,
    /// Free IOVA pages for host-chosen MAPs; `None` until the first one.
    /// FIXED maps check their range in the table instead, so a domain
    /// whose driver only maps FIXED (the Linux driver) never keeps it.
    alloc: Option<IovaAllocator>,
    /// Bytes this domain holds of the budget: tracked rather than
    /// recomputed from the table at drop, because the table's writer is
    /// public and tests write it directly, past the budget.
    charged: u64,
}

impl DomainInner {
    /// The allocator of host-chosen IOVAs, built from the mappings on its
    /// first use (O(m log m) once) and kept in step with them after.
    fn host_allocator(&mut self, iova_bits: u32) -> &mut IovaAllocator {
        let mappings = &self.mappings;
        self.alloc.get_or_insert_with(|| {
            let mut alloc = IovaAllocator::new(iova_bits);
            for m in mappings.values() {
                let taken = alloc.reserve(m.first_page(), m.npages());
                debug_assert!(taken, "mappings overlap at {:#x}", m.iova);
            }
            alloc
        })
    }

    /// Pushes the first page of every mapping inside the page span
    /// `[first, last]` onto `victims` and returns how many; RANGE when a
    /// mapping crosses either end of the span.
    ///
    /// Every page of a mapping has a leaf and nothing else does, so a scan
    /// of the span's leaves from `first` meets each mapping inside it at
    /// its first page (one record lookup), then skips the rest of it. A
    /// leaf that starts no mapping can only be met first thing: a mapping
    /// that began before the span. Costs the mappings found plus the table
    /// nodes the scan passes through.
    fn span_victims(
        &self,
        writer: &TableWriter<'_>,
        first: u64,
        last: u64,
        victims: &mut impl Extend<u64>,
    ) -> Result<usize> {
        let end = (last + 1) << PAGE_SHIFT;
        let mut at = first << PAGE_SHIFT;
        let mut found = 0;
        while let Some(iova) = writer.next_mapped(at, end) {
            let page = iova >> PAGE_SHIFT;
            let Some(m) = self.mappings.get(&page) else {
                return Err(self.crossing(page));
            };
            let m_last = page + m.npages() - 1;
            if m_last > last {
                return Err(Error::Range {
                    iova: m.iova,
                    len: m.length,
                });
            }
            victims.extend([page]);
            found += 1;
            at = (m_last + 1) << PAGE_SHIFT;
        }
        Ok(found)
    }

    /// RANGE for the mapping holding `page`, which is not its first page.
    /// A search of every record: only a request that fails pays it.
    #[cold]
    fn crossing(&self, page: u64) -> Error {
        let holder = self
            .mappings
            .values()
            .find(|m| (m.first_page()..m.first_page() + m.npages()).contains(&page));
        debug_assert!(holder.is_some(), "leaf at page {page:#x} without a mapping");
        match holder {
            Some(m) => Error::Range {
                iova: m.iova,
                len: m.length,
            },
            None => Error::Range {
                iova: page << PAGE_SHIFT,
                len: PAGE_SIZE,
            },
        }
    }
}

impl Domain {
    /// An empty domain with an IOVA space of `iova_bits` bits and a
    /// memory budget of its own, unlimited.
    pub fn new(iova_bits: u32) -> Domain {
        Domain::in_vm(iova_bits, Arc::new(MemBudget::new(u64::MAX)), None)
    }

    /// An empty domain of a VM: its nodes and records are charged to
    /// `budget`, and when `shared` is given a new value is stored into it
    /// on every removal of a translation (after the domain's own
    /// generation, with Release), so that a cache spanning several domains
    /// can be invalidated by one load.
    pub fn in_vm(iova_bits: u32, budget: Arc<MemBudget>, shared: Option<Arc<AtomicU64>>) -> Domain {
        Domain {
            shared_generation: shared,
            table: IoPageTable::new(iova_bits),
            inner: CachePadded::new(Mutex::new(DomainInner {
                mappings: HashMap::default(),
                alloc: None,
                charged: 0,
            })),
            generation: AtomicU64::new(next_generation()),
            budget,
        }
    }

    /// A value that changes (to one never used before by any domain)
    /// whenever a translation of this domain is removed. Adding mappings
    /// does not change it: a cached translation stays correct until one of
    /// its pages is unmapped.
    #[inline]
    pub fn generation(&self) -> u64 {
        // Acquire pairs with the Release store in `remove_locked`: a reader
        // that sees the old value may use translations it cached before;
        // one that sees the new value sees the table without the pages.
        self.generation.load(Ordering::Acquire)
    }

    /// The IOVA width.
    pub fn iova_bits(&self) -> u32 {
        self.table.iova_bits()
    }

    /// The page table (for lock-free readers).
    pub fn table(&self) -> &IoPageTable {
        &self.table
    }

    /// Number of live mappings.
    pub fn mapping_count(&self) -> usize {
        self.inner.lock().mappings.len()
    }

    /// A copy of every mapping, by IOVA.
    pub fn mappings(&self) -> Vec<Mapping> {
        let mut all: Vec<Mapping> = self.inner.lock().mappings.values().cloned().collect();
        all.sort_unstable_by_key(|m| m.iova);
        all
    }

    /// Adds a mapping: validates, picks or checks the IOVA, checks RAM,
    /// pins, installs the table entries, records it. All or nothing.
    ///
    /// `notify` runs for each page run after the table holds it, still
    /// under the domain lock so notifications follow the serial order.
    pub fn map(
        &self,
        segs: Vec<(u64, u64)>,
        perms: Perm,
        choice: IovaChoice,
        ram: &RamLayout,
        pins: &PinTable,
        notify: &mut dyn FnMut(&PageRun),
    ) -> Result<(u64, u64)> {
        let (length, npages) = check_segments(&segs)?;
        let offset = segs[0].0 & PAGE_MASK;
        let span = npages << PAGE_SHIFT;
        let limit = 1u64 << self.iova_bits();
        for &(gpa, len) in &segs {
            if !ram.contains_range(gpa, len) {
                return Err(Error::Fault { gpa, len });
            }
        }

        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        // Taken before the IOVA is checked and the reservation made, so
        // that the table cannot change between counting the nodes it lacks
        // and adding them.
        let mut writer = self.table.lock();
        let first_page = match choice {
            IovaChoice::Fixed(iova) => {
                if iova & PAGE_MASK != offset {
                    return Err(Error::Inval("IOVA offset differs from the first segment's"));
                }
                let start = iova & !PAGE_MASK;
                if start.checked_add(span).is_none_or(|end| end > limit) {
                    return Err(Error::Inval("IOVA range beyond IOVA_BITS"));
                }
                start >> PAGE_SHIFT
            }
            IovaChoice::Host => {
                // Large, 2 MiB aligned guest memory gets a 2 MiB aligned
                // IOVA so the table can use 2 MiB leaves for it.
                let huge_pages = HUGE_SIZE >> PAGE_SHIFT;
                let align = if span >= HUGE_SIZE && segs[0].0 & (HUGE_SIZE - 1) == 0 {
                    huge_pages
                } else {
                    1
                };
                let alloc = inner.host_allocator(self.iova_bits());
                alloc
                    .alloc(npages, align)
                    .or_else(|| alloc.alloc(npages, 1))
                    .ok_or(Error::NoSpace { pages: npages })?
            }
        };

        let iova = (first_page << PAGE_SHIFT) | offset;
        // Every page of every mapping has a leaf, and nothing else does: a
        // range without leaves overlaps no mapping. The same descent counts
        // the nodes the MAP may add.
        let Some(nodes) = writer.nodes_needed(iova & !PAGE_MASK, span) else {
            debug_assert!(
                matches!(choice, IovaChoice::Fixed(_)),
                "the allocator handed out mapped IOVA {iova:#x}"
            );
            return Err(Error::Exist { iova, len: length });
        };
        let give_back = |inner: &mut DomainInner| {
            if let Some(alloc) = &mut inner.alloc {
                alloc.free(first_page, npages);
            }
        };
        if let (IovaChoice::Fixed(_), Some(alloc)) = (choice, &mut inner.alloc) {
            // Free in the table, so free here too: the two agree.
            let reserved = alloc.reserve(first_page, npages);
            debug_assert!(reserved, "allocator and table disagree at {iova:#x}");
        }
        let record = record_bytes(segs.len());
        let reserved = nodes * NODE_BYTES + record;
        if let Err(e) = self.budget.reserve(reserved) {
            give_back(inner);
            return Err(e);
        }
        let pages = page_list(Runs::new(iova, &segs), ram);
        if let Err(e) = pins.pin(&pages) {
            self.budget.release(reserved);
            give_back(inner);
            return Err(e.into());
        }
        let nodes_before = self.table.node_count();
        for run in Runs::new(iova, &segs) {
            writer.map(run.iova, run.gpa, run.len, perms);
        }
        // Writers are serialised: the difference is this MAP's.
        let added = (self.table.node_count() - nodes_before) as u64;
        let charge = added * NODE_BYTES + record;
        debug_assert!(charge <= reserved, "MAP took more nodes than reserved");
        self.budget.release(reserved.saturating_sub(charge));
        inner.charged += charge;
        drop(writer);
        for run in Runs::new(iova, &segs) {
            notify(&run);
        }
        let mapping = Mapping {
            iova,
            length,
            perms,
            segs,
        };
        inner.mappings.insert(first_page, mapping);
        Ok((iova, length))
    }

    /// UNMAP with `length` 0: removes the mapping whose first page is the
    /// page of `iova`.
    pub fn unmap_at(
        &self,
        iova: u64,
        ram: &RamLayout,
        pins: &PinTable,
        notify: &mut dyn FnMut(&PageRun),
    ) -> Result<Removed> {
        let mut inner = self.inner.lock();
        let page = iova >> PAGE_SHIFT;
        if !inner.mappings.contains_key(&page) {
            return Err(Error::NoEnt { iova });
        }
        Ok(self.remove_locked(&mut inner, self.table.lock(), &[page], ram, pins, notify))
    }

    /// UNMAP with `length` > 0: removes every mapping inside the pages
    /// covering [iova, iova + length). RANGE (removing nothing) when a
    /// mapping crosses either end; NOENT when none is inside.
    pub fn unmap_range(
        &self,
        iova: u64,
        length: u64,
        ram: &RamLayout,
        pins: &PinTable,
        notify: &mut dyn FnMut(&PageRun),
    ) -> Result<Removed> {
        let end = iova
            .checked_add(length)
            .ok_or(Error::Inval("UNMAP range wraps"))?;
        let first = iova >> PAGE_SHIFT;
        let last = (end - 1) >> PAGE_SHIFT; // inclusive
        let mut inner = self.inner.lock();
        // The usual UNMAP names exactly one mapping: one that starts on the
        // range's first page and ends on its last. Mappings are disjoint,
        // so no other one can then lie in the range or cross its ends: one
        // lookup decides what the scan below would.
        if inner
            .mappings
            .get(&first)
            .is_some_and(|m| first + m.npages() - 1 == last)
        {
            let writer = self.table.lock();
            return Ok(self.remove_locked(&mut inner, writer, &[first], ram, pins, notify));
        }
        let mut victims = SmallVec::<[u64; 4]>::new();
        let writer = self.table.lock();
        let found = inner.span_victims(&writer, first, last, &mut victims)?;
        if found == 0 {
            return Err(Error::NoEnt { iova });
        }
        Ok(self.remove_locked(&mut inner, writer, &victims, ram, pins, notify))
    }

    /// UNMAP_LIST: removes every mapping inside any of the page spans
    /// `spans` (first and last page, inclusive), which the caller has
    /// checked: sorted by first page, pairwise disjoint, inside the IOVA
    /// space. All or nothing: RANGE when a mapping crosses an end of any
    /// span, else NOENT when any span holds no mapping; only then are the
    /// mappings of every span removed, under one hold of the domain lock
    /// and with one generation bump.
    ///
    /// Each span costs a table descent per mapping in it (one record
    /// lookup each) plus the empty table entries its scan passes over, so
    /// the list is independent of the mappings outside its spans.
    pub fn unmap_spans(
        &self,
        spans: &[(u64, u64)],
        ram: &RamLayout,
        pins: &PinTable,
        notify: &mut dyn FnMut(&PageRun),
    ) -> Result<Removed> {
        debug_assert!(
            spans.windows(2).all(|w| w[0].1 < w[1].0),
            "spans must be sorted and disjoint"
        );
        let mut inner = self.inner.lock();
        let mut victims = Vec::new();
        let mut empty = None;
        let writer = self.table.lock();
        for &(first, last) in spans {
            if inner.span_victims(&writer, first, last, &mut victims)? == 0 && empty.is_none() {
                empty = Some(first << PAGE_SHIFT);
            }
        }
        // RANGE anywhere in the list wins over an empty span.
        if let Some(iova) = empty {
            return Err(Error::NoEnt { iova });
        }
        Ok(self.remove_locked(&mut inner, writer, &victims, ram, pins, notify))
    }

    /// Removes every mapping (DETACH, reset).
    pub fn clear(
        &self,
        ram: &RamLayout,
        pins: &PinTable,
        notify: &mut dyn FnMut(&PageRun),
    ) -> Removed {
        let mut inner = self.inner.lock();
        let mut all: Vec<u64> = inner.mappings.keys().copied().collect();
        // By IOVA: notifications in a stable order.
        all.sort_unstable();
        self.remove_locked(&mut inner, self.table.lock(), &all, ram, pins, notify)
    }

    /// Removes every mapping that has a page in guest-physical
    /// [gpa, gpa + len) (RAM region removal).
    pub fn remove_gpa_range(
        &self,
        gpa: u64,
        len: u64,
        ram: &RamLayout,
        pins: &PinTable,
        notify: &mut dyn FnMut(&PageRun),
    ) -> Removed {
        let mut inner = self.inner.lock();
        let mut hit: Vec<u64> = inner
            .mappings
            .iter()
            .filter(|(_, m)| m.touches_gpa(gpa, len))
            .map(|(&p, _)| p)
            .collect();
        // By IOVA: notifications in a stable order.
        hit.sort_unstable();
        self.remove_locked(&mut inner, self.table.lock(), &hit, ram, pins, notify)
    }

    /// Removes the mappings starting at `first_pages`, under the domain
    /// lock (`inner`) and the table's writer lock (`writer`, taken by the
    /// caller, which may have used it to find them; released here before
    /// the pins are).
    fn remove_locked(
        &self,
        inner: &mut DomainInner,
        mut writer: TableWriter<'_>,
        first_pages: &[u64],
        ram: &RamLayout,
        pins: &PinTable,
        notify: &mut dyn FnMut(&PageRun),
    ) -> Removed {
        let mut removed = SmallVec::<[Mapping; 2]>::with_capacity(first_pages.len());
        let nodes_before = self.table.node_count();
        let mut released = 0;
        for page in first_pages {
            let Some(m) = inner.mappings.remove(page) else {
                continue;
            };
            writer.unmap(m.iova & !PAGE_MASK, m.span());
            if let Some(alloc) = &mut inner.alloc {
                alloc.free(m.first_page(), m.npages());
            }
            released += record_bytes(m.segs.len());
            removed.push(m);
        }
        released += (nodes_before - self.table.node_count()) as u64 * NODE_BYTES;
        debug_assert!(
            released <= inner.charged,
            "domain releases more than it holds"
        );
        let released = released.min(inner.charged);
        inner.charged -= released;
        self.budget.release(released);
        if !removed.is_empty() {
            // Release: ordered after the table entries were cleared above,
            // so a cache that sees the new generation and rebuilds finds
            // the pages gone. Stored before the request returns (and before
            // pins are released below).
            self.generation.store(next_generation(), Ordering::Release);
            if let Some(shared) = &self.shared_generation {
                // Release, after the table was cleared: as above.
                shared.store(next_generation(), Ordering::Release);
            }
        }
        drop(writer);
        // The table no longer reaches these pages: release the pins and
        // tell the embedder, before the request returns.
        let mut summary = Removed::default();
        for m in &removed {
            pins.unpin(&page_list(m.run_iter(), ram));
            for run in m.run_iter() {
                notify(&run);
            }
            summary.mappings += 1;
            summary.bytes += m.span();
        }
        summary
    }

    /// Translates [iova, iova + len) for `access` into host fragments.
    ///
    /// Lock-free: walks the table under `guard`. Returns how many fragments
    /// the range needs; the first `sink.len()` are stored.
    ///
    /// Always inlined: its few callers are the translation entry points,
    /// where a call with its fault result costs ~30 instructions.
    #[inline(always)]
    pub fn translate(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        ram: &RamLayout,
        guard: &Guard,
        sink: &mut FragmentSink<'_>,
    ) -> std::result::Result<(), TranslateFault> {
        // The body of `translate_with`, written out rather than calling it
        // with a closure: the hot uncached path keeps its own copy (see
        // the note there).
        let end = iova.checked_add(len).ok_or(TranslateFault {
            iova,
            reason: FaultReason::Overflow,
        })?;
        let mut cur = iova;
        while cur < end {
            let leaf = self.table.lookup(cur, guard).ok_or(TranslateFault {
                iova: cur,
                reason: FaultReason::Unmapped,
            })?;
            if !leaf.perms.allows(access) {
                return Err(TranslateFault {
                    iova: cur,
                    reason: FaultReason::Permission,
                });
            }
            let n = leaf.run.min(end - cur);
            emit_gpa_range(ram, leaf.gpa, n, cur, sink)?;
            cur += n;
        }
        Ok(())
    }

    /// [`Domain::translate`] with the table walk supplied by the caller:
    /// `lookup(iova)` answers what [`IoPageTable::lookup`] would (a cache
    /// in front of the table, see [`crate::iotlb`]). `Domain::translate`
    /// has its own copy of this loop: calling this with a closure gave the
    /// same instruction count but measured 15-19% slower (code layout).
    #[inline(always)]
    pub fn translate_with(
        iova: u64,
        len: u64,
        access: Access,
        ram: &RamLayout,
        sink: &mut FragmentSink<'_>,
        mut lookup: impl FnMut(u64) -> Option<crate::table::Leaf>,
    ) -> std::result::Result<(), TranslateFault> {
        let end = iova.checked_add(len).ok_or(TranslateFault {
            iova,
            reason: FaultReason::Overflow,
        })?;
        let mut cur = iova;
        while cur < end {
            let leaf = lookup(cur).ok_or(TranslateFault {
                iova: cur,
                reason: FaultReason::Unmapped,
            })?;
            if !leaf.perms.allows(access) {
                return Err(TranslateFault {
                    iova: cur,
                    reason: FaultReason::Permission,
                });
            }
            let n = leaf.run.min(end - cur);
            emit_gpa_range(ram, leaf.gpa, n, cur, sink)?;
            cur += n;
        }
        Ok(())
    }
}

/// Resolves guest-physical [gpa, gpa + len) to host runs. `iova` is only
/// for the fault report.
#[inline(always)]
pub fn emit_gpa_range(
    ram: &RamLayout,
    start: u64,
    len: u64,
    iova: u64,
    sink: &mut FragmentSink<'_>,
) -> std::result::Result<(), TranslateFault> {
    let (mut gpa, mut len) = (start, len);
    while len > 0 {
        let (hva, run) = ram.host_run(gpa, len).ok_or(TranslateFault {
            iova: iova.wrapping_add(gpa - start),
            reason: FaultReason::OutsideRam,
        })?;
        sink.push(hva, gpa, run);
        gpa += run;
        len -= run;
    }
    Ok(())
}

/// The (gfn, hva) list the pin table takes for a mapping: its distinct
/// frames, ascending. Every page was checked to be in RAM when the mapping
/// was made; a page whose region went away since gets hva 0, which the pin
/// table only uses for mlock. Inline (no allocation) up to 16 pages.
fn page_list(runs: Runs<'_>, ram: &RamLayout) -> PageList {
    let mut pages = PageList::new();
    // One segment is one run of distinct pages: no ordering or overlap to
    // look for (the usual one-page MAP).
    if runs.segs.len() == 1 {
        if let Some(run) = runs.clone().next() {
            let first = run.gpa >> PAGE_SHIFT;
            push_frames(&mut pages, ram, first, first + (run.len >> PAGE_SHIFT));
        }
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
type PageList = SmallVec<[(u64, usize); 16]>;

/// What an UNMAP (or DETACH, or RAM removal) took away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Mappings removed.
    pub mappings: u64,
    /// IOVA bytes they occupied (whole pages).
    pub bytes: u64,
}
