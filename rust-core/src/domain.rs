// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A translation domain: the IOVA space of one attached endpoint.
//!
//! The domain pairs the lock-free [`IoPageTable`] that readers walk with the
//! writer-side records (which mapping owns which pages, the IOVA allocator)
//! that MAP and UNMAP need. Writers are serialised by the table's writer
//! lock, which guards the records too (one lock per request): the table and
//! the records only change while it is held, so they agree whenever it is
//! free.

use std::collections::HashMap;
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use smallvec::SmallVec;

use crate::hash::{note_room, shrink_when_sparse, PageKeyHash};
use crate::iova_alloc::IovaAllocator;
pub use crate::mapping::{check_segments, Mapping, PageRun, Runs};
use crate::mapping::{pin_runs, unpin_runs};
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
    #[error("a mapping crosses the UNMAP range's end at page {iova:#x}")]
    Range {
        /// The first byte of the range's end page that the crossing
        /// mapping holds (its first or last page). Not the mapping's own
        /// address: finding it would cost a search of every record.
        iova: u64,
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
        let charged = self.records.0.get_mut().charged;
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

/// Moves `shared`, a generation that several writers move (the VM's
/// lookup generation: every endpoint's requests, each under its own
/// locks), to a new value, after the caller's table changes.
///
/// A read-modify-write with AcqRel, not a Release store. A reader that
/// loads a value with Acquire synchronises with the write it read and,
/// through the release sequence that read-modify-writes continue, with
/// every write before it. With plain stores it would synchronise with the
/// last writer only: it could load the current value and still see an
/// earlier writer's removed page in the table, and cache it under a value
/// that never changes again (the loom model in `domain/loom_tests.rs`
/// finds this).
///
/// A swap rather than `fetch_max`: the new value comes from
/// [`next_generation`] before the write, so two writers may write theirs
/// in the other order; `fetch_max` would then leave the larger in place
/// and the second removal would not change the value at all. Every value
/// is written once, so any write makes every cached tag stale.
#[inline]
pub(crate) fn bump_shared_generation(shared: &AtomicU64) {
    set_shared_generation(shared, next_generation());
}

/// [`bump_shared_generation`] to `value`, a value of [`next_generation`]
/// that no other shared generation is given. A removal gives its domain's
/// generation and the shared one the same value: each is still written
/// once into each, which is all their caches need (a cache tagged with one
/// never compares it with the other), and the process-wide counter, a
/// locked instruction on a line every writer of every VM bounces, is taken
/// once.
#[inline]
pub(crate) fn set_shared_generation(shared: &AtomicU64, value: u64) {
    shared.swap(value, Ordering::AcqRel);
}

/// The translation state of one attached endpoint.
pub struct Domain {
    table: IoPageTable,
    /// Reached only through [`Domain::lock`], under the table's writer
    /// lock. On cache lines of their own: every request writes them, and
    /// every translation reads the table's root next to them otherwise.
    records: CachePadded<Records>,
    /// Changes whenever a translation is removed (UNMAP, DETACH, RAM
    /// removal): caches of translations (virtqueue rings) compare it.
    generation: AtomicU64,
    /// The VM's memory budget, charged for nodes and records.
    budget: Arc<MemBudget>,
    /// A generation shared with other domains (the VM's, see
    /// `Vm::lookup`), set to a new value after this one on every removal.
    shared_generation: Option<Arc<AtomicU64>>,
}

/// The writer-side records of a domain, guarded by its table's writer lock
/// rather than a mutex of their own: every request takes that lock anyway,
/// and one lock per request is one pair of locked instructions less.
struct Records(std::cell::UnsafeCell<DomainInner>);

// SAFETY: the records are only reached through `Domain::lock`, which holds
// the table's writer lock for as long as the `Locked` it returns (and every
// reference borrowed from it) lives: one thread at a time, and the lock
// orders one holder's writes before the next holder's reads. `DomainInner`
// is `Send` (asserted below), so handing it from thread to thread is sound.
unsafe impl Sync for Records {}

const _: () = {
    const fn send<T: Send>() {}
    send::<DomainInner>();
};

/// A domain's table writer and its records, locked together by
/// [`Domain::lock`]. The records cannot be borrowed for longer than this
/// value lives, so no one reaches them without the lock.
struct Locked<'a> {
    writer: TableWriter<'a>,
    records: &'a Records,
}

impl<'a> Locked<'a> {
    /// The table writer and the records, borrowed together.
    #[inline]
    fn parts(&mut self) -> (&mut TableWriter<'a>, &mut DomainInner) {
        // SAFETY: `self.writer` holds the table's writer lock, which is
        // what guards the records (see `Records`); the reference lives no
        // longer than `&mut self`, so not past the lock, and `&mut self`
        // makes it the only one.
        let inner = unsafe { &mut *self.records.0.get() };
        (&mut self.writer, inner)
    }
}

struct DomainInner {
    /// Mappings by first IOVA page. Unordered: range questions (which
    /// mappings lie in a span, does one cross its ends) are answered by
    /// the table, whose leaves are exactly the mapped pages (see
    /// [`DomainInner::span_victims`]). Keyed per domain: guests pick IOVAs.
    mappings: HashMap<u64, Mapping, PageKeyHash>,
    /// The record map's size, for shrinking it as mappings go (see
    /// [`shrink_when_sparse`]).
    room: usize,
    /// Free IOVA pages for host-chosen MAPs; `None` until the first one.
    /// FIXED maps check their range in the table instead, so a domain
    /// whose driver only maps FIXED (the Linux driver) never keeps it.
    alloc: Option<IovaAllocator>,
    /// Bytes this domain holds of the budget: tracked rather than
    /// recomputed from the table at drop, because the table's writer is
    /// public and tests write it directly, past the budget.
    charged: u64,
    /// Record probes (see [`DomainInner::record`]).
    #[cfg(test)]
    probes: std::cell::Cell<u64>,
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

    /// The mapping whose first page is `page`, if any. Under `cfg(test)`
    /// the probes are counted, so that tests can bound the work a request
    /// does without timing it.
    #[inline]
    fn record(&self, page: u64) -> Option<&Mapping> {
        #[cfg(test)]
        self.probes.set(self.probes.get() + 1);
        self.mappings.get(&page)
    }

    /// RANGE when a mapping crosses an end of the page span `[first,
    /// last]`: one that holds `first` without starting there, or one that
    /// holds `last + 1` without starting there (then it holds `last` too:
    /// a mapping's pages are contiguous). At most two table descents and
    /// two record probes, however many mappings the domain holds.
    fn check_span_ends(&self, writer: &TableWriter<'_>, first: u64, last: u64) -> Result<()> {
        let crossed = |page: u64| writer.is_mapped_page(page) && self.record(page).is_none();
        if crossed(first) {
            return Err(Error::Range {
                iova: first << PAGE_SHIFT,
            });
        }
        if last.checked_add(1).is_some_and(crossed) {
            return Err(Error::Range {
                iova: last << PAGE_SHIFT,
            });
        }
        Ok(())
    }

    /// Pushes the first page of every mapping inside the page span
    /// `[first, last]` onto `victims` and returns how many; RANGE when a
    /// mapping crosses either end of the span.
    ///
    /// The ends are checked first ([`DomainInner::check_span_ends`]), so a
    /// refused span costs the same whatever it holds. Then every page of a
    /// mapping has a leaf and nothing else does, so a scan of the span's
    /// leaves from `first` meets each mapping inside it at its first page
    /// (one record lookup) and skips the rest of it: the mappings removed
    /// plus the table nodes the scan passes through.
    fn span_victims(
        &self,
        writer: &TableWriter<'_>,
        first: u64,
        last: u64,
        victims: &mut impl Extend<u64>,
    ) -> Result<usize> {
        self.check_span_ends(writer, first, last)?;
        Ok(self.collect_span(writer, first, last, victims))
    }

    /// The scan of [`DomainInner::span_victims`], for a span whose ends
    /// were checked.
    fn collect_span(
        &self,
        writer: &TableWriter<'_>,
        first: u64,
        last: u64,
        victims: &mut impl Extend<u64>,
    ) -> usize {
        let end = page_end(last);
        let mut at = first << PAGE_SHIFT;
        let mut found = 0;
        while let Some(iova) = writer.next_mapped(at, end) {
            let page = iova >> PAGE_SHIFT;
            let Some(m) = self.record(page) else {
                // The ends were checked: every leaf met is a first page.
                debug_assert!(false, "leaf at page {page:#x} starts no mapping");
                break;
            };
            let m_last = page + m.npages() - 1;
            debug_assert!(m_last <= last, "mapping at {page:#x} crosses the span");
            victims.extend([page]);
            found += 1;
            at = page_end(m_last);
        }
        found
    }
}

/// The address just past page `page`, saturated at `u64::MAX` for the last
/// page of the 64-bit space (its end, 2^64, is not a `u64`; no table
/// reaches that far).
fn page_end(page: u64) -> u64 {
    (page << PAGE_SHIFT).saturating_add(PAGE_SIZE)
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
            records: CachePadded::new(Records(std::cell::UnsafeCell::new(DomainInner {
                mappings: HashMap::default(),
                room: 0,
                alloc: None,
                charged: 0,
                #[cfg(test)]
                probes: std::cell::Cell::new(0),
            }))),
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

    /// Takes the table's writer lock, which guards the records too.
    #[inline]
    fn lock(&self) -> Locked<'_> {
        Locked {
            writer: self.table.lock(),
            records: &self.records,
        }
    }

    /// Number of live mappings.
    pub fn mapping_count(&self) -> usize {
        self.lock().parts().1.mappings.len()
    }

    /// A copy of every mapping, by IOVA.
    pub fn mappings(&self) -> Vec<Mapping> {
        let mut all: Vec<Mapping> = self.lock().parts().1.mappings.values().cloned().collect();
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

        // Taken before the IOVA is checked and the reservation made, so
        // that the table cannot change between counting the nodes it lacks
        // and adding them.
        let mut locked = self.lock();
        let (writer, inner) = locked.parts();
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
        if let Err(e) = pin_runs(pins, Runs::new(iova, &segs), ram) {
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
        // Still under the lock, so notifications follow the serial order.
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
        note_room(&inner.mappings, &mut inner.room);
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
        let mut locked = self.lock();
        let page = iova >> PAGE_SHIFT;
        if locked.parts().1.record(page).is_none() {
            return Err(Error::NoEnt { iova });
        }
        Ok(self.remove_locked(locked, &[page], ram, pins, notify))
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
        // The last byte, not the end: a range may end at 2^64.
        let last_byte = length
            .checked_sub(1)
            .and_then(|n| iova.checked_add(n))
            .ok_or(Error::Inval("UNMAP range empty or wrapping"))?;
        let first = iova >> PAGE_SHIFT;
        let last = last_byte >> PAGE_SHIFT; // inclusive
        let mut locked = self.lock();
        let (writer, inner) = locked.parts();
        // The usual UNMAP names exactly one mapping: one that starts on the
        // range's first page and ends on its last. Mappings are disjoint,
        // so no other one can then lie in the range or cross its ends: one
        // lookup decides what the scan below would.
        if inner
            .record(first)
            .is_some_and(|m| first + m.npages() - 1 == last)
        {
            return Ok(self.remove_locked(locked, &[first], ram, pins, notify));
        }
        let mut victims = SmallVec::<[u64; 4]>::new();
        let found = inner.span_victims(writer, first, last, &mut victims)?;
        if found == 0 {
            return Err(Error::NoEnt { iova });
        }
        Ok(self.remove_locked(locked, &victims, ram, pins, notify))
    }

    /// UNMAP_LIST: removes every mapping inside any of the page spans
    /// `spans` (first and last page, inclusive), which the caller has
    /// checked: sorted by first page, pairwise disjoint, inside the IOVA
    /// space. All or nothing: RANGE when a mapping crosses an end of any
    /// span, else NOENT when any span holds no mapping; only then are the
    /// mappings of every span removed, under one hold of the domain lock
    /// and with one generation bump.
    ///
    /// Refusals are decided before any span is scanned: first the ends of
    /// every span (RANGE), then whether each span holds a leaf at all
    /// (NOENT; with the ends checked, a leaf is a mapping inside), so a
    /// refused list costs a few table descents per span however many
    /// mappings its spans hold. Only a list that will succeed is scanned,
    /// a table descent per mapping removed (one record lookup each).
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
        let mut locked = self.lock();
        let (writer, inner) = locked.parts();
        // RANGE anywhere in the list wins over an empty span.
        for &(first, last) in spans {
            inner.check_span_ends(writer, first, last)?;
        }
        for &(first, last) in spans {
            if writer
                .next_mapped(first << PAGE_SHIFT, page_end(last))
                .is_none()
            {
                return Err(Error::NoEnt {
                    iova: first << PAGE_SHIFT,
                });
            }
        }
        let mut victims = Vec::new();
        for &(first, last) in spans {
            inner.collect_span(writer, first, last, &mut victims);
        }
        Ok(self.remove_locked(locked, &victims, ram, pins, notify))
    }

    /// Removes every mapping (DETACH, reset).
    pub fn clear(
        &self,
        ram: &RamLayout,
        pins: &PinTable,
        notify: &mut dyn FnMut(&PageRun),
    ) -> Removed {
        let mut locked = self.lock();
        let mut all: Vec<u64> = locked.parts().1.mappings.keys().copied().collect();
        // By IOVA: notifications in a stable order.
        all.sort_unstable();
        self.remove_locked(locked, &all, ram, pins, notify)
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
        let mut locked = self.lock();
        let mut hit: Vec<u64> = locked
            .parts()
            .1
            .mappings
            .iter()
            .filter(|(_, m)| m.touches_gpa(gpa, len))
            .map(|(&p, _)| p)
            .collect();
        // By IOVA: notifications in a stable order.
        hit.sort_unstable();
        self.remove_locked(locked, &hit, ram, pins, notify)
    }

    /// Removes the mappings starting at `first_pages`, under the lock the
    /// caller took (and may have used to find them). It is held until the
    /// pins are released and the embedder told, as a request's own lock
    /// would be, so that notifications follow the serial order; readers
    /// never wait for it.
    fn remove_locked(
        &self,
        mut locked: Locked<'_>,
        first_pages: &[u64],
        ram: &RamLayout,
        pins: &PinTable,
        notify: &mut dyn FnMut(&PageRun),
    ) -> Removed {
        let (writer, inner) = locked.parts();
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
        // The records' memory goes back with them (not only their budget).
        shrink_when_sparse(&mut inner.mappings, &mut inner.room);
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
            let generation = next_generation();
            self.generation.store(generation, Ordering::Release);
            if let Some(shared) = &self.shared_generation {
                // After the table was cleared: as above, but other domains
                // write it too (see the function).
                set_shared_generation(shared, generation);
            }
        }
        // The table no longer reaches these pages: release the pins and
        // tell the embedder, before the request returns.
        let mut summary = Removed::default();
        for m in &removed {
            unpin_runs(pins, m.run_iter(), ram);
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

/// What an UNMAP (or DETACH, or RAM removal) took away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Mappings removed.
    pub mappings: u64,
    /// IOVA bytes they occupied (whole pages).
    pub bytes: u64,
}

#[cfg(all(test, not(loom)))]
mod tests;

// LOOM_MAX_PREEMPTIONS=2 RUSTFLAGS="--cfg loom --cfg crossbeam_loom" \
//     cargo test -p pvdma --features loom --release --lib loom_tests
#[cfg(all(test, loom))]
mod loom_tests;
