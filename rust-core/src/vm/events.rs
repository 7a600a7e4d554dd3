// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a VM tells its embedder: MAP/UNMAP notifications, the fault log,
//! and the transport a request came through.

use super::*;

/// Whether a notification adds or removes a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapEventKind {
    /// A translation was added.
    Map = 1,
    /// A translation was removed.
    Unmap = 2,
}

/// A notification: `len` bytes at `iova` translate (or translated) to
/// guest-physical `gpa` for endpoint `requester`. Page aligned; one event
/// per run contiguous in both spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEvent {
    /// Added or removed.
    pub kind: MapEventKind,
    /// The endpoint.
    pub requester: u32,
    /// Page-aligned IOVA.
    pub iova: u64,
    /// Length, a multiple of 4 KiB.
    pub len: u64,
    /// Page-aligned guest-physical address.
    pub gpa: u64,
    /// Permissions of the mapping.
    pub perms: Perm,
}

/// The embedder's notification callback. It runs after the table commits
/// (adds) or before the request returns (removes), under the endpoint's
/// request lock: it may translate, but must not submit requests.
///
/// It returns whether the embedder carried the change out. Only a MAP can
/// be refused (`false`): the embedder could not set up what the mapping
/// needs (VFIO could not pin its pages, say). The MAP then answers QUOTA
/// and leaves nothing behind: it is removed again, with UNMAP events for
/// all its runs, and no further runs of it are notified. What an UNMAP
/// event returns is ignored: a removal always happens.
pub type Notifier = Arc<dyn Fn(&MapEvent) -> bool + Send + Sync>;

/// What [`Vm`]'s notifier pointer points to.
pub(super) struct NotifierSlot(Notifier);

/// A refused device access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Requester ID of the device.
    pub requester: u32,
    /// First IOVA refused.
    pub iova: u64,
    /// What the device tried.
    pub access: Access,
    /// Why it was refused.
    pub reason: FaultReason,
    /// Sequence number (total faults before this one).
    pub seq: u64,
}

/// The path a request came by, for [`StatsSnapshot::transports`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Transport {
    /// Neither of the guest transports: [`Vm::submit`], [`Vm::execute`]
    /// (tests, migration import).
    Other = 0,
    /// The DOORBELL register.
    Doorbell = 1,
    /// The VMCALL/VMMCALL hypercall.
    Hypercall = 2,
}

impl Transport {
    /// Decodes a raw transport number (the C API's `PVDMA_TRANSPORT_*`).
    pub fn from_raw(raw: u32) -> Option<Transport> {
        Some(match raw {
            0 => Transport::Other,
            1 => Transport::Doorbell,
            2 => Transport::Hypercall,
            _ => return None,
        })
    }
}

impl Vm {
    /// Sets (or with `None` clears) the notification callback. A request
    /// already running may still call the previous one, which is dropped
    /// once no such request is left.
    pub fn set_notifier(&self, notifier: Option<Notifier>) {
        let guard = epoch::pin();
        let new = match notifier {
            Some(n) => Owned::new(NotifierSlot(n)).into_shared(&guard),
            None => Shared::null(),
        };
        // AcqRel: Release publishes the new slot, Acquire so that the old
        // pointer we retire is the one readers saw.
        let old = self.notifier.swap(new, Ordering::AcqRel, &guard);
        if !old.is_null() {
            // SAFETY: unlinked above; readers that loaded it hold guards,
            // which defer_destroy waits for.
            unsafe { guard.defer_destroy(old) };
        }
    }

    /// The notification of one request's page runs, through the callback
    /// set when it started (loaded once, under the request's `guard`).
    /// Returns what the callback did (true without one).
    pub(super) fn notifier_for<'g>(
        &self,
        rid: u32,
        kind: MapEventKind,
        perms: Perm,
        guard: &'g Guard,
    ) -> impl FnMut(&PageRun) -> bool + 'g {
        // Acquire: pairs with the Release of `set_notifier`'s swap.
        let slot = self.notifier.load(Ordering::Acquire, guard);
        // SAFETY: null or a slot from `set_notifier`, freed only through
        // `defer_destroy` after it was unlinked, so alive while `guard` is.
        let n = unsafe { slot.as_ref() }.map(|slot| &slot.0);
        move |run: &PageRun| match n {
            Some(n) => n(&MapEvent {
                kind,
                requester: rid,
                iova: run.iova,
                len: run.len,
                gpa: run.gpa,
                perms,
            }),
            None => true,
        }
    }

    pub(super) fn unmap_notifier<'g>(
        &'g self,
        rid: u32,
        guard: &'g Guard,
    ) -> impl FnMut(&PageRun) + 'g {
        // Unmap events carry no meaningful permissions, and cannot be
        // refused.
        let mut n = self.notifier_for(rid, MapEventKind::Unmap, Perm::NONE, guard);
        move |run: &PageRun| match self.batch_unmap(rid, run) {
            Batched::No => {
                n(run);
            }
            Batched::Absorbed => {}
            Batched::Flush(prev_rid, prev) => {
                self.notifier_for(prev_rid, MapEventKind::Unmap, Perm::NONE, guard)(&prev);
            }
        }
    }

    /// Starts merging this thread's UNMAP events of this VM (a drain of
    /// queued entries): until [`Vm::unmap_batch_end`], consecutive runs of
    /// one requester that follow on in IOVA space (each just above or just
    /// below the ones before) become one event. An
    /// UNMAP event's guest-physical address means nothing, and the
    /// listeners (vhost's device IOTLB, vfio) pay per event: a flush of
    /// a 128 KiB read's 32 one-page mappings becomes one invalidation
    /// instead of 32 messages to a vhost-user backend.
    pub(super) fn unmap_batch_begin(&self) {
        UNMAP_BATCH.with(|b| {
            *b.borrow_mut() = Some(UnmapBatch {
                vm: self as *const Vm as usize,
                pending: None,
            })
        });
    }

    /// Sends the merged UNMAP event still held, and stops merging. Called
    /// before the drain that began the batch returns, so every removal
    /// is notified before the drain completes, as an UNMAP request's are.
    pub(super) fn unmap_batch_end(&self, guard: &Guard) {
        if let Some((rid, run)) =
            UNMAP_BATCH.with(|b| b.borrow_mut().take().and_then(|b| b.pending))
        {
            self.notifier_for(rid, MapEventKind::Unmap, Perm::NONE, guard)(&run);
        }
    }

    /// Sends the merged UNMAP event held, if it is of `rid` and overlaps
    /// `run`, and keeps merging: before the MAP event of `run`, which a
    /// listener must not get ahead of the removal of what was mapped there
    /// before. A MAP elsewhere leaves the held removal growing (a guest's
    /// queue interleaves one request's UNMAPs with the next one's MAPs).
    pub(super) fn unmap_batch_flush(&self, rid: u32, run: &PageRun, guard: &Guard) {
        let held = UNMAP_BATCH.with(|b| {
            b.borrow_mut()
                .as_mut()
                .filter(|b| b.vm == self as *const Vm as usize)
                .and_then(|b| {
                    let overlaps = b.pending.as_ref().is_some_and(|(r, h)| {
                        *r == rid
                            && h.iova < run.iova.saturating_add(run.len)
                            && run.iova < h.iova.saturating_add(h.len)
                    });
                    if overlaps {
                        b.pending.take()
                    } else {
                        None
                    }
                })
        });
        if let Some((rid, run)) = held {
            self.notifier_for(rid, MapEventKind::Unmap, Perm::NONE, guard)(&run);
        }
    }

    /// What to do with an UNMAP run: send it (no batch on this thread for
    /// this VM), nothing (merged into the one held), or send the one held
    /// and hold this one.
    fn batch_unmap(&self, rid: u32, run: &PageRun) -> Batched {
        UNMAP_BATCH.with(|b| {
            let mut b = b.borrow_mut();
            let Some(b) = b.as_mut().filter(|b| b.vm == self as *const Vm as usize) else {
                return Batched::No;
            };
            match &mut b.pending {
                Some((held_rid, held))
                    if *held_rid == rid && held.iova.checked_add(held.len) == Some(run.iova) =>
                {
                    held.len += run.len;
                    Batched::Absorbed
                }
                // Just below: Linux hands out IOVAs top-down, so the pages
                // of one request, mapped one by one, lie in descending
                // order, and are unmapped in ascending buffer order.
                Some((held_rid, held))
                    if *held_rid == rid && run.iova.checked_add(run.len) == Some(held.iova) =>
                {
                    held.iova = run.iova;
                    held.len += run.len;
                    Batched::Absorbed
                }
                pending => match pending.replace((rid, *run)) {
                    Some((prev_rid, prev)) => Batched::Flush(prev_rid, prev),
                    None => Batched::Absorbed,
                },
            }
        })
    }

    /// Invalidates every cached [`Vm::lookup`] of this VM, on every thread.
    pub(super) fn bump_lookup_generation(&self) {
        // Pairs with the Acquire load in `Vm::lookup`; everything this
        // thread changed before (table, endpoint routes) is seen by a
        // lookup that loads the new value or a later one, and such a
        // lookup misses. A read-modify-write: every endpoint writes it.
        domain::bump_shared_generation(&self.lookup_generation);
    }

    pub(super) fn count_removed(&self, removed: Removed) {
        self.stats.add_mappings(removed.mappings.wrapping_neg());
    }

    /// Records a refused device access. Cold and out of line: it is off
    /// every translate path's hot side (see `Vm::device_access`).
    #[cold]
    #[inline(never)]
    pub fn record_fault(&self, requester: u32, iova: u64, access: Access, reason: FaultReason) {
        // Relaxed: the count is a statistic; the log below is locked.
        let seq = self.stats.faults.fetch_add(1, Ordering::Relaxed);
        let mut log = self.faults.lock();
        if log.len() == self.cfg.fault_log_len {
            log.pop_front();
        }
        log.push_back(FaultRecord {
            requester,
            iova,
            access,
            reason,
            seq,
        });
    }

    /// The most recent faults, oldest first.
    pub fn faults(&self) -> Vec<FaultRecord> {
        self.faults.lock().iter().copied().collect()
    }

    /// Refused device accesses since creation or reset.
    pub fn fault_count(&self) -> u64 {
        // Relaxed: a statistic.
        self.stats.faults.load(Ordering::Relaxed)
    }

    /// Sets the fault count (migration import).
    pub(crate) fn restore_fault_count(&self, n: u64) {
        // Relaxed: a statistic.
        self.stats.faults.store(n, Ordering::Relaxed);
    }
}

/// UNMAP events being merged on this thread ([`Vm::unmap_batch_begin`]).
struct UnmapBatch {
    /// The VM whose events are merged (its address, only compared).
    vm: usize,
    /// The merged run not sent yet, and its requester.
    pending: Option<(u32, PageRun)>,
}

thread_local! {
    static UNMAP_BATCH: std::cell::RefCell<Option<UnmapBatch>> =
        const { std::cell::RefCell::new(None) };
}

/// See [`Vm::batch_unmap`].
enum Batched {
    No,
    Absorbed,
    Flush(u32, PageRun),
}
