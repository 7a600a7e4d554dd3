// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Statistics: request counts by op and transport, live mappings, and
//! translations, counted per thread: each thread bumps its own slot with a
//! plain load and store, without sharing a cache line or a locked
//! instruction with another.

use super::*;

/// Rows of [`StatsSnapshot::requests`]: unknown ops, then ops 1..=8.
pub const STATS_OPS: usize = 9;

/// A snapshot of the counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// `requests[op][status index]`; op 0 counts unknown ops (and requests
    /// whose header could not be read).
    pub requests: [[u64; 13]; STATS_OPS],
    /// Requests submitted by each [`Transport`], indexed by its value.
    pub transports: [u64; 3],
    /// Live mappings over all domains.
    pub mappings: u64,
    /// Distinct pinned guest pages.
    pub pinned_pages: u64,
    /// Bytes of host memory the mappings take (see [`VmConfig::mem_limit`]).
    pub mem_used: u64,
    /// Translations performed through [`Vm::translate`].
    pub translations: u64,
    /// Refused device accesses.
    pub faults: u64,
    /// Drains of one queue that took at least one entry.
    pub queue_drains: u64,
    /// Queued entries taken (applied or failed).
    pub queue_entries: u64,
    /// Queued entries that failed.
    pub queue_failed: u64,
    /// Rule-2 drains: a device access about to be refused while entries
    /// were pending.
    pub miss_drains: u64,
}

/// Each group on cache lines of its own: the request counters are
/// written by every request, and `translations` (its VM id) is read by
/// every translation.
///
/// Requests, transports and mappings are counted in the calling thread's
/// slot (see [`TranslationCounters`]); the shared `requests`, `transports`
/// and `mappings` here count what a thread without a slot (one exiting)
/// counts, and [`Vm::stats`] adds the two.
pub(super) struct Stats {
    pub(super) requests: CachePadded<[[AtomicU64; 13]; STATS_OPS]>,
    pub(super) transports: CachePadded<[AtomicU64; 3]>,
    pub(super) mappings: CachePadded<AtomicU64>,
    pub(super) translations: CachePadded<TranslationCounters>,
    pub(super) faults: AtomicU64,
}

/// The translation count, kept per thread: every device thread counts on
/// the hot path, and a shared counter would cost each translation a locked
/// read-modify-write (and bounce its cache line between threads). Each
/// thread that translates owns one slot of this VM, bumps it with a plain
/// load and store, and [`Vm::stats`] sums the slots.
///
/// Slots are never freed before the VM: when a thread exits it gives its
/// slot up (count included) and the next new thread claims it, so the
/// list is as long as the most threads that ever translated at the same
/// time. A thread finds its slot through a thread-local cache keyed by the
/// VM's [`TranslationCounters::vm_id`].
///
/// These atomics are std's even under loom: they are statistics, outside
/// the table protocol the loom model checks.
pub(super) struct TranslationCounters {
    /// Never reused (unlike the VM's address), so that a thread's cache
    /// entry of a dropped VM is never taken for a new VM's.
    pub(super) vm_id: u64,
    /// Push-only list of slots (each from `Arc::into_raw`, one reference
    /// owned by the list), freed in `Drop`.
    pub(super) head: StdAtomicPtr<CounterSlot>,
    /// Translations counted by threads whose thread-local storage was
    /// already being torn down (a translation from a TLS destructor).
    pub(super) orphans: StdAtomicU64,
}

/// One thread's counts for one VM. Every counter is written only by the
/// thread that claimed the slot.
#[repr(align(128))]
pub(super) struct CounterSlot {
    /// Translations.
    pub(super) count: StdAtomicU64,
    /// Requests, as [`StatsSnapshot::requests`].
    pub(super) requests: [[StdAtomicU64; 13]; STATS_OPS],
    /// Requests by transport, as [`StatsSnapshot::transports`].
    pub(super) transports: [StdAtomicU64; 3],
    /// Mappings added less mappings removed by this thread, wrapping: a
    /// thread may remove more than it added, and the sum over the slots
    /// is the live count.
    pub(super) mappings: StdAtomicU64,
    /// Whether a live thread owns the slot.
    pub(super) claimed: StdAtomicBool,
    /// The slot pushed before this one; immutable once published.
    pub(super) next: *const CounterSlot,
}

// SAFETY: `next` is only read, and points to a slot kept alive by the
// list until the VM drops; every other field is atomic.
unsafe impl Send for CounterSlot {}
// SAFETY: as above.
unsafe impl Sync for CounterSlot {}

impl CounterSlot {
    fn new() -> CounterSlot {
        CounterSlot {
            count: StdAtomicU64::new(0),
            requests: Default::default(),
            transports: Default::default(),
            mappings: StdAtomicU64::new(0),
            claimed: StdAtomicBool::new(true),
            next: std::ptr::null(),
        }
    }

    #[inline]
    pub(super) fn bump(&self) {
        Self::add(&self.count, 1);
    }

    /// Adds `n` (wrapping) to `counter`, one of this slot's.
    #[inline]
    pub(super) fn add(counter: &StdAtomicU64, n: u64) {
        // Relaxed load and store, no RMW: only the owning thread writes
        // the slot's counters. It got the slot through the Acquire CAS on
        // `claimed` (pairing with the previous owner's Release store of
        // false), so its load sees the previous owner's last store.
        // Readers (`Vm::stats`) see every increment that happened before
        // them.
        let c = counter.load(StdOrdering::Relaxed);
        counter.store(c.wrapping_add(n), StdOrdering::Relaxed);
    }
}

/// This thread's counter slots, one per VM it translated for.
pub(super) struct ThreadCounters(Vec<(u64, Arc<CounterSlot>)>);

impl Drop for ThreadCounters {
    fn drop(&mut self) {
        // The fast-path cache must not outlive the references we drop.
        // (`LAST` has no destructor, so it is always accessible.)
        LAST.set((0, std::ptr::null()));
        for (_, slot) in &self.0 {
            // Release: our last `bump` happens before whichever thread
            // claims the slot next (its Acquire CAS in `claim`).
            slot.claimed.store(false, StdOrdering::Release);
        }
    }
}

thread_local! {
    static THREAD_COUNTERS: RefCell<ThreadCounters> =
        const { RefCell::new(ThreadCounters(Vec::new())) };
    /// The slot this thread used last, `(vm_id, slot)`: the hot path's one
    /// compare. Invariant: when the id is not 0, `THREAD_COUNTERS` holds
    /// a reference to that slot under that id (so the slot is alive). An
    /// entry is dropped from there only once its VM is gone, and a gone
    /// VM's id is never asked for again.
    static LAST: Cell<(u64, *const CounterSlot)> =
        const { Cell::new((0, std::ptr::null())) };
}

impl TranslationCounters {
    pub(super) fn new() -> TranslationCounters {
        static NEXT_VM_ID: StdAtomicU64 = StdAtomicU64::new(1);
        TranslationCounters {
            // Relaxed: only uniqueness matters.
            vm_id: NEXT_VM_ID.fetch_add(1, StdOrdering::Relaxed),
            head: StdAtomicPtr::new(std::ptr::null_mut()),
            orphans: StdAtomicU64::new(0),
        }
    }

    /// Counts one translation by the calling thread.
    #[inline]
    pub(super) fn count(&self) {
        match self.slot() {
            Some(slot) => slot.bump(),
            // Relaxed: a statistic; a rare path (thread exit).
            None => {
                self.orphans.fetch_add(1, StdOrdering::Relaxed);
            }
        }
    }

    /// The calling thread's slot of this VM, claimed on its first use;
    /// `None` when the thread's local storage is gone (thread exit). The
    /// slot lives as long as `self`: the list holds it until `self` drops.
    #[inline]
    pub(super) fn slot(&self) -> Option<&CounterSlot> {
        let (id, slot) = LAST.get();
        if id == self.vm_id {
            // SAFETY: ids start at 1, so `slot` was set with this VM's id,
            // and by `LAST`'s invariant it is alive while we are.
            Some(unsafe { &*slot })
        } else {
            self.slot_other()
        }
    }

    /// [`TranslationCounters::slot`] of a thread whose last count was for
    /// another VM (or that never counted).
    #[cold]
    pub(super) fn slot_other(&self) -> Option<&CounterSlot> {
        let id = self.vm_id;
        let found = THREAD_COUNTERS.try_with(|tc| {
            let tc = tc.borrow();
            tc.0.iter().find(|(vm, _)| *vm == id).map(|(_, slot)| {
                LAST.set((id, Arc::as_ptr(slot)));
                Arc::as_ptr(slot)
            })
        });
        let at = match found {
            Ok(Some(at)) => at,
            Ok(None) => self.slot_first()?,
            Err(_) => return None,
        };
        // SAFETY: a slot of this VM's list (claimed by this thread), which
        // keeps it alive until `self` drops.
        Some(unsafe { &*at })
    }

    /// The calling thread's first count on this VM: claims a slot
    /// (lock-free: a CAS per slot tried, a CAS loop to push a new one) and
    /// remembers it in the thread's cache.
    #[cold]
    pub(super) fn slot_first(&self) -> Option<*const CounterSlot> {
        let slot = self.claim();
        let cached = THREAD_COUNTERS.try_with(|tc| {
            let mut tc = tc.borrow_mut();
            // Forget the slots of VMs that are gone (only we still hold
            // them): nobody will claim them again.
            tc.0.retain(|(_, s)| Arc::strong_count(s) > 1);
            LAST.set((self.vm_id, Arc::as_ptr(&slot)));
            tc.0.push((self.vm_id, Arc::clone(&slot)));
        });
        if cached.is_err() {
            // No thread-local storage any more (thread exit): give the
            // slot back. Release pairs with the Acquire CAS of the next
            // claimer.
            slot.claimed.store(false, StdOrdering::Release);
            return None;
        }
        Some(Arc::as_ptr(&slot))
    }

    /// A slot no live thread owns, reused or new, claimed for the caller.
    pub(super) fn claim(&self) -> Arc<CounterSlot> {
        // Acquire pairs with the AcqRel CAS that pushed the head: the slot
        // (and, through its `next` chain, every older one) is initialised.
        let mut at = self.head.load(StdOrdering::Acquire);
        while !at.is_null() {
            // SAFETY: slots in the list live until `self` drops.
            let slot = unsafe { &*at };
            // Acquire pairs with the Release store of the previous owner
            // giving the slot up: its count is ours to continue.
            if slot
                .claimed
                .compare_exchange(false, true, StdOrdering::Acquire, StdOrdering::Relaxed)
                .is_ok()
            {
                // SAFETY: `at` came from `Arc::into_raw` and the list still
                // holds that reference; this adds one for the caller.
                return unsafe {
                    Arc::increment_strong_count(at);
                    Arc::from_raw(at)
                };
            }
            at = slot.next.cast_mut();
        }
        let mut new = Arc::new(CounterSlot::new());
        let mut head = self.head.load(StdOrdering::Relaxed);
        loop {
            Arc::get_mut(&mut new).expect("not shared yet").next = head;
            let raw = Arc::into_raw(Arc::clone(&new)).cast_mut();
            // AcqRel: Release publishes the slot's initialisation to
            // walkers (`claim`, `total`); Acquire so the `next` we link
            // was itself published.
            match self.head.compare_exchange_weak(
                head,
                raw,
                StdOrdering::AcqRel,
                StdOrdering::Relaxed,
            ) {
                Ok(_) => return new,
                Err(now) => {
                    // SAFETY: `raw` was not published: take it back.
                    drop(unsafe { Arc::from_raw(raw) });
                    head = now;
                }
            }
        }
    }

    /// Every translation counted so far (exact for every translation that
    /// happened before the call).
    pub(super) fn total(&self) -> u64 {
        // Relaxed: a statistic.
        let mut sum = self.orphans.load(StdOrdering::Relaxed);
        self.for_each_slot(|slot| {
            // Relaxed: coherence gives every store that happened before us.
            sum = sum.wrapping_add(slot.count.load(StdOrdering::Relaxed));
        });
        sum
    }

    /// Calls `f` on every slot, claimed or not.
    pub(super) fn for_each_slot(&self, mut f: impl FnMut(&CounterSlot)) {
        // Acquire: as in `claim`.
        let mut at = self.head.load(StdOrdering::Acquire);
        while !at.is_null() {
            // SAFETY: slots in the list live until `self` drops.
            let slot = unsafe { &*at };
            f(slot);
            at = slot.next.cast_mut();
        }
    }
}

impl Drop for TranslationCounters {
    fn drop(&mut self) {
        let mut at = *self.head.get_mut();
        while !at.is_null() {
            // SAFETY: each slot in the list came from `Arc::into_raw`; the
            // list's reference is released once, here. Threads that cached
            // the slot keep it alive with their own reference.
            let slot = unsafe { Arc::from_raw(at) };
            at = slot.next.cast_mut();
        }
    }
}

impl Stats {
    /// Counts a request of op row `op` that ended with `status`.
    #[inline]
    pub(super) fn count_request(&self, op: usize, status: Status) {
        match self.translations.slot() {
            Some(slot) => CounterSlot::add(&slot.requests[op][status.index()], 1),
            // Relaxed: statistics.
            None => {
                self.requests[op][status.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts a request that came by `transport`.
    #[inline]
    pub(super) fn count_transport(&self, transport: Transport) {
        match self.translations.slot() {
            Some(slot) => CounterSlot::add(&slot.transports[transport as usize], 1),
            // Relaxed: statistics.
            None => {
                self.transports[transport as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Adds `delta` (wrapping: a removal adds its negation) to the live
    /// mappings.
    #[inline]
    pub(super) fn add_mappings(&self, delta: u64) {
        match self.translations.slot() {
            Some(slot) => CounterSlot::add(&slot.mappings, delta),
            // Relaxed: statistics.
            None => {
                self.mappings.fetch_add(delta, Ordering::Relaxed);
            }
        }
    }
}

impl Vm {
    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        for (op, row) in self.stats.requests.iter().enumerate() {
            for (st, c) in row.iter().enumerate() {
                // Relaxed: statistics.
                s.requests[op][st] = c.load(Ordering::Relaxed);
            }
        }
        for (t, c) in self.stats.transports.iter().enumerate() {
            // Relaxed: statistics.
            s.transports[t] = c.load(Ordering::Relaxed);
        }
        s.mappings = self.stats.mappings.load(Ordering::Relaxed);
        // Relaxed: statistics; coherence gives every store that happened
        // before this call.
        let load = |c: &StdAtomicU64| c.load(StdOrdering::Relaxed);
        self.stats.translations.for_each_slot(|slot| {
            for (op, row) in slot.requests.iter().enumerate() {
                for (st, c) in row.iter().enumerate() {
                    s.requests[op][st] = s.requests[op][st].wrapping_add(load(c));
                }
            }
            for (t, c) in slot.transports.iter().enumerate() {
                s.transports[t] = s.transports[t].wrapping_add(load(c));
            }
            s.mappings = s.mappings.wrapping_add(load(&slot.mappings));
        });
        // Read while requests run, a removal's slot may be seen without
        // the slot of the MAP that made the mapping (slots are read one by
        // one): the wrapping sum is then "below zero". Such a snapshot is
        // not exact anyway; show 0, not 2^64 - 1.
        if s.mappings > i64::MAX as u64 {
            s.mappings = 0;
        }
        s.pinned_pages = self.pins.pinned_pages();
        s.mem_used = self.mem.used();
        s.translations = self.stats.translations.total();
        s.faults = self.fault_count();
        // Relaxed: statistics.
        s.queue_drains = self.queues.drains.load(StdOrdering::Relaxed);
        s.queue_entries = self.queues.entries.load(StdOrdering::Relaxed);
        s.queue_failed = self.queues.failed.load(StdOrdering::Relaxed);
        s.miss_drains = self.queues.miss_drains.load(StdOrdering::Relaxed);
        s
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A snapshot taken while a MAP and its UNMAP run on two threads may
    /// read the remover's slot (one below zero) without the mapper's:
    /// the live count then shows 0, not a wrapped 2^64 - 1.
    #[test]
    fn a_slot_below_zero_shows_no_mappings() {
        let vm = Vm::new(VmConfig::default()).expect("valid config");
        vm.stats.add_mappings(1u64.wrapping_neg());
        assert_eq!(vm.stats().mappings, 0);
        vm.stats.add_mappings(3);
        assert_eq!(vm.stats().mappings, 2);
    }
}
