// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk side: one queue's chains, popped and served through
//! pvdma's `IovaSpace` (bypass when the IOMMU is off), buffers as
//! per-fragment host slices (scatter-gather mode) or as one slice of the
//! IOVA window per descriptor (window mode).
//!
//! A step pops one chain. A translation the table lacks is a *miss*: the
//! chain goes back on the ring and the caller asks the frontend (up to
//! `MISS_TRIES` times per page per chain), then steps again. An access still refused after that,
//! or refused for a reason a miss cannot fix, fails the request: status
//! `VIRTIO_BLK_S_IOERR` when the status byte is writable, else the chain
//! is returned with length 0. Nothing is read or written outside what the
//! table allows.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;

use pvdma::{
    epoch, Domain, FaultReason, Fragment, FragmentSink, IovaSpace, PageCache, Perm, TranslateFault,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::device::{CrashPoint, Mode, Shared};
use crate::inflight::{self, QueueInflight, Recovered, WalkError};

/// `VIRTIO_BLK_T_IN`.
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`.
pub const T_GET_ID: u32 = 8;
/// Status: success.
pub const S_OK: u8 = 0;
/// Status: I/O error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;
/// Sector size.
pub const SECTOR: u64 = 512;
/// Most descriptors we take in one chain (a larger chain is refused).
pub const MAX_DESCS: usize = 1024;
/// Most misses sent for one chain (256 MiB of 4 KiB pages).
pub const MAX_MISSES_PER_CHAIN: usize = 1 << 16;
/// Most misses for one page of one chain. A page QEMU did translate can
/// be invalidated again before the chain is served (an invalidation may
/// cover more than the mapping removed: QEMU's IOTLB entries can span
/// neighbouring mappings), or evicted by a full IOTLB, so one more miss
/// is not proof that the frontend cannot help; a third refusal is.
pub const MISS_TRIES: u8 = 3;
/// Most misses sent to the frontend together.
pub const MISS_BATCH: usize = 64;
/// Most pages looked at to fill a batch (a chain's buffers may span
/// gigabytes that are mapped already).
pub const MISS_SCAN: usize = 4096;

/// A descriptor of the chain being served.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

/// One queue's device state.
#[derive(Debug)]
pub struct Vring {
    /// virtio-queue's split queue (addresses: IOVA, or GPA without IOMMU).
    pub queue: Queue,
    /// Page cache keyed by (domain generation, RAM layout).
    pages: PageCache,
    /// Used entries not yet written (the used ring was unmapped), and
    /// whether the chain came from the avail ring (not served again from
    /// the inflight region).
    pending_used: Vec<(u16, u32, bool)>,
    /// Pages already missed for the chain at the head of the ring, and
    /// how often.
    missed: HashMap<u64, u8>,
    /// Misses sent for that chain.
    misses: usize,
    descs: Vec<Desc>,
    frags: Vec<Fragment>,
    iov: Vec<libc::iovec>,
    /// Inflight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), when
    /// the frontend gave a region: every chain taken is recorded in it
    /// until its used entry is written, and the chains a killed backend
    /// left there are served again first (`inflight.rs`).
    pub inflight: Option<QueueInflight>,
    /// Chains taken from the avail ring (tests: `Options::test_crash`).
    taken: u32,
    /// Tests: the backend "died" (`Options::test_crash`): nothing more
    /// is done on this ring, the region is left as it is.
    crashed: bool,
}

// SAFETY: the iovecs are scratch space rebuilt for every request and only
// dereferenced (by the kernel) inside the step that built them, on the
// thread that owns the Vring at the time.
unsafe impl Send for Vring {}

/// What one step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A chain was served (or failed and returned).
    Done,
    /// Nothing available.
    Empty,
    /// The table lacks each `iova` for its `perm`: ask the frontend (all
    /// at once), step again. Never empty.
    Miss(Vec<(u64, Perm)>),
    /// The rings cannot be reached (even after a miss) or are corrupt:
    /// stop until the next kick.
    Stalled,
    /// Chains arrived while notifications were being re-enabled
    /// ([`Vring::rearm`]): step again.
    Again,
}

impl Vring {
    /// A queue at the given addresses, starting at avail index `base`.
    pub fn new(
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        base: u16,
        event_idx: bool,
    ) -> Option<Vring> {
        let mut queue = Queue::new(pvdma::MAX_QUEUE_SIZE).ok()?;
        queue.try_set_size(size).ok()?;
        queue.try_set_desc_table_address(GuestAddress(desc)).ok()?;
        queue.try_set_avail_ring_address(GuestAddress(avail)).ok()?;
        queue.try_set_used_ring_address(GuestAddress(used)).ok()?;
        queue.set_event_idx(event_idx);
        queue.set_next_avail(base);
        queue.set_next_used(base);
        queue.set_ready(true);
        if avail == 0 {
            // virtio-queue reads avail address 0 as "not configured".
            return None;
        }
        Some(Vring {
            queue,
            pages: PageCache::new(),
            pending_used: Vec::new(),
            missed: HashMap::new(),
            misses: 0,
            descs: Vec::new(),
            frags: Vec::new(),
            iov: Vec::new(),
            inflight: None,
            taken: 0,
            crashed: false,
        })
    }

    /// Records a miss of `iova`'s page for the current chain; false when
    /// that page was missed `MISS_TRIES` times already (the frontend
    /// cannot help: give up on it) or the chain has sent
    /// `MAX_MISSES_PER_CHAIN` misses, so a chain always ends.
    pub fn note_miss(&mut self, iova: u64) -> bool {
        if self.misses >= MAX_MISSES_PER_CHAIN {
            return false;
        }
        let tries = self.missed.entry(iova >> pvdma::PAGE_SHIFT).or_insert(0);
        if *tries >= MISS_TRIES {
            return false;
        }
        *tries += 1;
        self.misses += 1;
        true
    }

    /// Whether a chain was begun and not finished (it missed, and is
    /// retried by the next step).
    pub fn chain_in_progress(&self) -> bool {
        self.misses != 0
    }

    /// Forgets the misses of the chain just finished.
    fn forget_misses(&mut self) {
        self.missed.clear();
        self.misses = 0;
    }

    /// Serves at most one chain.
    pub fn step(&mut self, sh: &Shared) -> Step {
        // The space borrows the page cache while the step mutates the rest.
        let pages = std::mem::take(&mut self.pages);
        let r = self.step_with(sh, &pages);
        self.pages = pages;
        r
    }

    fn step_with(&mut self, sh: &Shared, pages: &PageCache) -> Step {
        let guard = epoch::pin();
        let ram = sh.ram.load(&guard);
        let dom = sh.iommu().then(|| &**sh.domain());
        // The generation is read before any walk: a removal racing with
        // this step changes it and the cache serves nothing stale.
        let key = (dom.map_or(0, |d| d.generation()), ram.id());
        if pages.key() != Some(key) {
            pages.reset(Some(key));
        }
        let space = IovaSpace::with_cache(dom, ram, &guard, &[], pages);
        if self.crashed {
            return Step::Stalled;
        }

        if self.flush_used(sh, &space).is_err() {
            let iova = fault_iova(&space, self.queue.used_ring());
            return self.ring_fault(iova, Perm::WRITE);
        }

        if let Some(step) = self.recover_inflight(sh, &space) {
            return step;
        }
        let resubmit = self.inflight.as_ref().and_then(|i| i.next_resubmit());
        let head = match resubmit {
            Some(head) => match self.walk_resubmitted(sh, &space, head) {
                Ok(()) => head,
                Err(step) => return step,
            },
            None => match self.pop(sh, &space) {
                Ok(head) => head,
                Err(step) => return step,
            },
        };
        match self.serve(sh, &space) {
            Ok(used) => self.complete(sh, &space, head, used),
            Err(Fail::Miss(iova, perm)) => {
                if resubmit.is_none() {
                    self.queue.go_to_previous_position();
                }
                let mut misses = vec![(iova, perm)];
                if let Some(dom) = dom {
                    self.more_misses(dom, &guard, &mut misses);
                }
                Step::Miss(misses)
            }
            Err(Fail::NoStatus) => {
                sh.stats.bump(&sh.stats.bad_chains);
                self.complete(sh, &space, head, 0)
            }
        }
    }

    /// Takes the next chain from the avail ring into `self.descs`: its
    /// head, or the step to return (empty, a miss, a malformed chain
    /// returned).
    fn pop(&mut self, sh: &Shared, space: &IovaSpace<'_>) -> Result<u16, Step> {
        let mut iter = match self.queue.iter(space) {
            Ok(it) => it,
            Err(virtio_queue::Error::GuestMemory(_)) => {
                let iova = fault_iova(space, self.queue.avail_ring());
                return Err(self.ring_fault(iova, Perm::READ));
            }
            Err(e) => {
                sh.stats.bump(&sh.stats.ring_errors);
                log::warn!("queue: driver error in the rings: {e}");
                return Err(Step::Stalled);
            }
        };
        // Where a chain is popped (the only place).
        let Some(chain) = iter.next() else {
            if let Some(f) = space.take_fault() {
                return Err(self.ring_fault(f.iova, Perm::READ));
            }
            return Err(Step::Empty);
        };
        let head = chain.head_index();
        // Recorded before anything else is done with the chain, and
        // before the next one is taken (recovery counts on it).
        if let Some(inf) = self.inflight.as_mut() {
            inf.begin(head);
        }
        if self.misses == 0 {
            // a new chain, not one retried after its misses
            self.taken += 1;
        }
        if sh.test_crash == Some((CrashPoint::AfterPop, self.taken)) {
            self.crashed = true;
            return Err(Step::Stalled);
        }
        self.descs.clear();
        let mut ends_early = true;
        for d in chain {
            if self.descs.len() == MAX_DESCS {
                break;
            }
            ends_early = d.has_next();
            self.descs.push(Desc {
                addr: d.addr().0,
                len: d.len(),
                write: d.is_write_only(),
            });
        }
        if self.descs.is_empty() || ends_early {
            if let Some(f) = space.take_fault() {
                if self.note_miss(f.iova) {
                    self.queue.go_to_previous_position();
                    return Err(Step::Miss(vec![(f.iova, Perm::READ)]));
                }
            }
            sh.stats.bump(&sh.stats.bad_chains);
            log::warn!(
                "queue: malformed or unreadable chain at head {head}: returned with length 0"
            );
            return Err(self.complete(sh, space, head, 0));
        }
        Ok(head)
    }

    /// Reads the chain a killed backend had taken, by its head, into
    /// `self.descs`; else the step to return (a miss, or the chain
    /// returned with length 0 when malformed).
    fn walk_resubmitted(
        &mut self,
        sh: &Shared,
        space: &IovaSpace<'_>,
        head: u16,
    ) -> Result<(), Step> {
        let mut walked = Vec::new();
        let r = inflight::walk_chain(
            space,
            self.queue.desc_table(),
            self.queue.size(),
            head,
            MAX_DESCS,
            &mut walked,
        );
        match r {
            Ok(()) => {
                self.descs.clear();
                self.descs.extend(walked.iter().map(|d| Desc {
                    addr: d.addr,
                    len: d.len,
                    write: d.write,
                }));
                Ok(())
            }
            Err(WalkError::Unreadable) => {
                let iova = fault_iova(space, self.queue.desc_table());
                if self.note_miss(iova) {
                    return Err(Step::Miss(vec![(iova, Perm::READ)]));
                }
                sh.stats.bump(&sh.stats.bad_chains);
                log::warn!(
                    "queue: chain {head} to serve again is unreadable: returned with length 0"
                );
                Err(self.complete(sh, space, head, 0))
            }
            Err(WalkError::Bad(why)) => {
                sh.stats.bump(&sh.stats.bad_chains);
                log::warn!("queue: chain {head} to serve again: {why}: returned with length 0");
                Err(self.complete(sh, space, head, 0))
            }
        }
    }

    /// Spec, "When reconnecting": once per ring start with a region, the
    /// used and avail indices are read (through the IOTLB: a miss is
    /// asked like any other) and the region recovered; `Some` is the
    /// step to return meanwhile.
    fn recover_inflight(&mut self, sh: &Shared, space: &IovaSpace<'_>) -> Option<Step> {
        if self.inflight.as_ref().is_none_or(|i| i.recovered()) {
            return None;
        }
        let used = match self
            .queue
            .used_idx(space, std::sync::atomic::Ordering::Acquire)
        {
            Ok(u) => u.0,
            Err(_) => {
                let iova = fault_iova(space, self.queue.used_ring());
                return Some(self.ring_fault(iova, Perm::READ));
            }
        };
        let avail = match self
            .queue
            .avail_idx(space, std::sync::atomic::Ordering::Acquire)
        {
            Ok(a) => a.0,
            Err(_) => {
                let iova = fault_iova(space, self.queue.avail_ring());
                return Some(self.ring_fault(iova, Perm::READ));
            }
        };
        self.forget_misses();
        let base = self.queue.next_avail();
        let inf = self.inflight.as_mut().expect("checked above");
        match inf.recover(used, avail) {
            Ok(Recovered::Fresh) => {
                log::info!("inflight: fresh region, starting at avail {base}, used {used}");
            }
            Ok(Recovered::Resumed {
                next_avail,
                inflight,
            }) => {
                if inflight != 0 || next_avail != base {
                    log::info!(
                        "inflight: {inflight} chain(s) in flight to serve again; used {used}, \
                         next avail {next_avail} (the frontend said {base})"
                    );
                }
                sh.stats
                    .add(&sh.stats.inflight_resubmitted, u64::from(inflight));
                self.queue.set_next_avail(next_avail);
            }
            Err(e) => {
                sh.stats.bump(&sh.stats.inflight_errors);
                log::error!(
                    "inflight: the region cannot be trusted ({e}): its chains are not served \
                     again; it is reset and the ring starts at the frontend's base {base}"
                );
                inf.init(used);
            }
        }
        self.queue.set_next_used(used);
        None
    }

    /// Writes one used entry, with the inflight region's steps around it
    /// (spec, "When supplying used buffers": a batch of one).
    fn write_used(
        &mut self,
        sh: &Shared,
        space: &IovaSpace<'_>,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        if let Some(inf) = self.inflight.as_mut() {
            inf.pre_put(head);
        }
        let before = self.queue.next_used();
        if let Err(e) = self.queue.add_used(space, head, len) {
            // add_used counts the entry before it stores the idx: undo
            // that when the idx store is what failed, or a retry would
            // publish the entry twice.
            self.queue.set_next_used(before);
            return Err(e);
        }
        if sh.test_crash == Some((CrashPoint::AfterUsedIdx, self.taken)) {
            self.crashed = true;
            return Ok(());
        }
        if let Some(inf) = &self.inflight {
            inf.post_put(head, self.queue.next_used());
        }
        Ok(())
    }

    /// Writes the used entries held back while the used ring was out of
    /// reach; `Err` (with the fault in `space`) when it still is. Only a
    /// step that found none pending pops a chain, so at most one entry is
    /// ever pending, for the last chain popped.
    fn flush_used(&mut self, sh: &Shared, space: &IovaSpace<'_>) -> Result<(), ()> {
        while let Some(&(head, len, _)) = self.pending_used.first() {
            match self.write_used(sh, space, head, len) {
                Ok(()) => {
                    self.pending_used.remove(0);
                }
                Err(virtio_queue::Error::GuestMemory(_)) => return Err(()),
                Err(e) => {
                    log::warn!("queue: dropping used entry {head}: {e}");
                    self.pending_used.remove(0);
                }
            }
        }
        Ok(())
    }

    /// Stops the queue (GET_VRING_BASE, reset), inside an access section:
    /// writes the used entries still pending if the used ring can be
    /// reached through the table now (no miss can be asked: the frontend
    /// waits for our answer), and returns the avail index to restart from
    /// and how many entries were written. A chain whose completion still
    /// cannot be written is not dropped: the index returned is before it
    /// (it is the last chain popped, see `flush_used`), so the restarted
    /// queue serves it again. Serving a block request twice is harmless:
    /// the driver has not seen it complete, so its buffers are unchanged.
    pub fn stop(&mut self, sh: &Shared) -> (u16, u32) {
        let guard = epoch::pin();
        let ram = sh.ram.load(&guard);
        let dom = sh.iommu().then(|| &**sh.domain());
        let space = IovaSpace::new(dom, ram, &guard);
        let before = self.pending_used.len();
        let _ = if self.crashed {
            Ok(())
        } else {
            self.flush_used(sh, &space)
        };
        let written = (before - self.pending_used.len()) as u32;
        // A chain served again from the inflight region has no avail slot
        // of its own after next_avail: only the others move the base back.
        let unreported = self.pending_used.iter().filter(|p| p.2).count() as u16;
        if unreported != 0 {
            log::warn!(
                "queue: {unreported} completion(s) could not be written at stop: served again after a restart"
            );
        }
        self.pending_used.clear();
        (self.queue.next_avail().wrapping_sub(unreported), written)
    }

    /// With `VIRTIO_RING_F_EVENT_IDX`, once the ring is empty: asks the
    /// driver for a kick at the next chain (`avail_event` = next avail
    /// index, in the used ring), then looks at the avail index again, so
    /// a chain made available meanwhile is not left waiting for a kick
    /// the driver will not send. `Empty` when armed and idle, `Again`
    /// when chains arrived, `Miss` / `Stalled` when the used or avail
    /// ring cannot be reached through the table. Without EVENT_IDX the
    /// driver kicks for every chain it adds (we never set
    /// `VRING_USED_F_NO_NOTIFY`): `Empty`, nothing written.
    pub fn rearm(&mut self, sh: &Shared) -> Step {
        if !self.queue.event_idx_enabled() {
            return Step::Empty;
        }
        let guard = epoch::pin();
        let ram = sh.ram.load(&guard);
        let dom = sh.iommu().then(|| &**sh.domain());
        let space = IovaSpace::new(dom, ram, &guard);
        match self.queue.enable_notification(&space) {
            Ok(false) => Step::Empty,
            Ok(true) => Step::Again,
            Err(virtio_queue::Error::GuestMemory(_)) => {
                // Either the avail_event store (used ring) or the avail
                // index load faulted.
                let avail = self.queue.avail_ring();
                let (iova, perm) = match space.take_fault() {
                    Some(f) if f.iova >= avail && f.iova - avail < 4 => (f.iova, Perm::READ),
                    Some(f) => (f.iova, Perm::WRITE),
                    None => (self.avail_event_addr(), Perm::WRITE),
                };
                self.ring_fault(iova, perm)
            }
            Err(e) => {
                sh.stats.bump(&sh.stats.ring_errors);
                log::warn!("queue: driver error in the rings: {e}");
                Step::Stalled
            }
        }
    }

    fn avail_event_addr(&self) -> u64 {
        self.queue
            .used_ring()
            .wrapping_add(4 + 8 * u64::from(self.queue.size()))
    }

    /// Whether the driver wants to hear of the completions written since
    /// the last call: always without `VIRTIO_RING_F_EVENT_IDX`; with it,
    /// when `used_event` (in the avail ring, read through the table) lies
    /// among them. A `used_event` that cannot be read signals: a
    /// spurious interrupt costs the driver little, a lost one hangs it.
    /// Any value the driver wrote is fine (wrapping arithmetic).
    pub fn wants_signal(&mut self, sh: &Shared) -> bool {
        if !self.queue.event_idx_enabled() {
            return true;
        }
        let guard = epoch::pin();
        let ram = sh.ram.load(&guard);
        let dom = sh.iommu().then(|| &**sh.domain());
        let space = IovaSpace::new(dom, ram, &guard);
        match self.queue.needs_notification(&space) {
            Ok(want) => want,
            Err(_) => {
                let _ = space.take_fault();
                true
            }
        }
    }

    /// Adds to `misses` the other pages of the chain's buffers that the
    /// table cannot serve for their access yet (not missed too often, at most
    /// `MISS_BATCH` in all, looking at `MISS_SCAN` pages at most), so
    /// that one round of misses usually fetches every translation a
    /// request needs instead of one per retry.
    fn more_misses(&mut self, dom: &Domain, guard: &epoch::Guard, misses: &mut Vec<(u64, Perm)>) {
        let mut budget = MISS_SCAN;
        for i in 0..self.descs.len() {
            let d = self.descs[i];
            let perm = if d.write { Perm::WRITE } else { Perm::READ };
            let Some(end) = d.addr.checked_add(u64::from(d.len)) else {
                continue;
            };
            let mut page = d.addr & !(pvdma::PAGE_SIZE - 1);
            while page < end && misses.len() < MISS_BATCH && budget > 0 {
                budget -= 1;
                let served = dom
                    .table()
                    .lookup(page, guard)
                    .is_some_and(|leaf| leaf.perms.contains(perm));
                let queued = || {
                    misses
                        .iter()
                        .any(|&(i, _)| i >> pvdma::PAGE_SHIFT == page >> pvdma::PAGE_SHIFT)
                };
                if !served && !queued() && self.note_miss(page) {
                    misses.push((page, perm));
                }
                let Some(next) = page.checked_add(pvdma::PAGE_SIZE) else {
                    break;
                };
                page = next;
            }
        }
    }

    fn ring_fault(&mut self, iova: u64, perm: Perm) -> Step {
        if self.note_miss(iova) {
            Step::Miss(vec![(iova, perm)])
        } else {
            self.forget_misses();
            Step::Stalled
        }
    }

    /// Where a completion is written (the only place, with `flush_used`
    /// for one held back): the used entry and index, and the inflight
    /// region's record of it; the call is the caller's, once per batch.
    fn complete(&mut self, sh: &Shared, space: &IovaSpace<'_>, head: u16, len: u32) -> Step {
        self.forget_misses();
        let from_avail = !self
            .inflight
            .as_mut()
            .is_some_and(|inf| inf.resubmitted(head));
        if let Err(e) = self.write_used(sh, space, head, len) {
            if matches!(e, virtio_queue::Error::GuestMemory(_)) {
                // The used ring is not mapped: write it once it is.
                self.pending_used.push((head, len, from_avail));
            } else {
                log::warn!("queue: add_used {head}: {e}");
            }
        }
        Step::Done
    }

    /// Serves the request in `self.descs`; the used length on success or
    /// after writing an error status.
    fn serve(&mut self, sh: &Shared, space: &IovaSpace<'_>) -> Result<u32, Fail> {
        // The status byte: the last byte of the last descriptor, which must
        // be device-writable.
        let last = *self.descs.last().expect("non-empty chain");
        if !last.write || last.len == 0 {
            log::warn!("queue: request without a writable status byte");
            return Err(Fail::NoStatus);
        }
        let status_at = last
            .addr
            .checked_add(u64::from(last.len) - 1)
            .ok_or(Fail::NoStatus)?;
        match self.execute(sh, space) {
            Ok((status, written)) => {
                self.write_status(sh, space, status_at, status)?;
                Ok(written + 1)
            }
            Err(Fail::Miss(iova, perm)) => Err(Fail::Miss(iova, perm)),
            Err(Fail::NoStatus) => {
                sh.stats.bump(&sh.stats.io_errors);
                self.write_status(sh, space, status_at, S_IOERR)?;
                Ok(1)
            }
        }
    }

    fn write_status(
        &mut self,
        sh: &Shared,
        space: &IovaSpace<'_>,
        at: u64,
        status: u8,
    ) -> Result<(), Fail> {
        if space.write_obj(status, GuestAddress(at)).is_ok() {
            return Ok(());
        }
        let f = space.take_fault().unwrap_or(TranslateFault {
            iova: at,
            reason: FaultReason::Unmapped,
        });
        self.refused(sh, f, Perm::WRITE)?;
        Err(Fail::NoStatus)
    }

    /// A refused access: a miss to ask for, up to `MISS_TRIES` times per
    /// page; else the request fails.
    fn refused(&mut self, sh: &Shared, f: TranslateFault, perm: Perm) -> Result<(), Fail> {
        if sh.iommu()
            && matches!(f.reason, FaultReason::Unmapped | FaultReason::Permission)
            && self.note_miss(f.iova)
        {
            return Err(Fail::Miss(f.iova, perm));
        }
        sh.stats.bump(&sh.stats.refused);
        log::debug!(
            "queue: refused {perm} access at {:#x}: {}",
            f.iova,
            f.reason
        );
        Ok(())
    }

    /// Runs the request: `(status, bytes written to the driver)`;
    /// `Err(NoStatus)` means "fail with IOERR".
    fn execute(&mut self, sh: &Shared, space: &IovaSpace<'_>) -> Result<(u8, u32), Fail> {
        let mut hdr = [0u8; 16];
        let readable: u64 = self
            .descs
            .iter()
            .filter(|d| !d.write)
            .map(|d| u64::from(d.len))
            .sum();
        let writable: u64 = self
            .descs
            .iter()
            .filter(|d| d.write)
            .map(|d| u64::from(d.len))
            .sum();
        if readable < 16 {
            log::debug!("queue: request header of {readable} bytes");
            return Err(Fail::NoStatus);
        }
        self.copy_from(sh, space, 0, &mut hdr)?;
        let rtype = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        sh.stats.bump(&sh.stats.requests);
        match rtype {
            T_IN | T_OUT => {
                let (dir_write, data_len, skip) = if rtype == T_IN {
                    (true, writable - 1, 0)
                } else {
                    (false, readable - 16, 16)
                };
                let offset = sector.checked_mul(SECTOR).ok_or(Fail::NoStatus)?;
                if data_len % SECTOR != 0
                    || offset.checked_add(data_len).is_none_or(|e| e > sh.capacity)
                {
                    log::debug!("queue: request past the end or unaligned: sector {sector}, {data_len} bytes");
                    return Err(Fail::NoStatus);
                }
                if rtype == T_OUT && sh.readonly {
                    return Err(Fail::NoStatus);
                }
                self.build_iov(sh, space, dir_write, skip, data_len)?;
                if !sh.test_io_delay.is_zero() {
                    std::thread::sleep(sh.test_io_delay);
                }
                let done = if rtype == T_IN {
                    rw_all(&sh.image, &mut self.iov, offset, false)
                } else {
                    rw_all(&sh.image, &mut self.iov, offset, true)
                };
                match done {
                    Ok(()) => {
                        let ctr = if rtype == T_IN {
                            &sh.stats.read_bytes
                        } else {
                            &sh.stats.write_bytes
                        };
                        ctr.fetch_add(data_len, std::sync::atomic::Ordering::Relaxed);
                        Ok((S_OK, if rtype == T_IN { data_len as u32 } else { 0 }))
                    }
                    Err(e) => {
                        log::warn!("image I/O at {offset:#x}: {e}");
                        Err(Fail::NoStatus)
                    }
                }
            }
            T_FLUSH => {
                if sh.image.sync_data().is_err() {
                    return Err(Fail::NoStatus);
                }
                Ok((S_OK, 0))
            }
            T_GET_ID => {
                let id = sh.serial.as_bytes();
                let n = (id.len() as u64).min(20).min(writable - 1);
                let written = self.copy_to(sh, space, &id[..n as usize])?;
                Ok((S_OK, written))
            }
            _ => Ok((S_UNSUPP, 0)),
        }
    }

    /// Reads `buf.len()` bytes from the start (after `skip` bytes) of the
    /// readable descriptors.
    fn copy_from(
        &mut self,
        sh: &Shared,
        space: &IovaSpace<'_>,
        skip: u64,
        buf: &mut [u8],
    ) -> Result<(), Fail> {
        let mut pos = 0usize;
        let mut skip = skip;
        for i in 0..self.descs.len() {
            let d = self.descs[i];
            if d.write || pos == buf.len() {
                break;
            }
            let len = u64::from(d.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = ((len - skip) as usize).min(buf.len() - pos);
            let at = d.addr.checked_add(skip).ok_or(Fail::NoStatus)?;
            if space
                .read_slice(&mut buf[pos..pos + n], GuestAddress(at))
                .is_err()
            {
                let f = space.take_fault().unwrap_or(TranslateFault {
                    iova: at,
                    reason: FaultReason::Overflow,
                });
                self.refused(sh, f, Perm::READ)?;
                return Err(Fail::NoStatus);
            }
            pos += n;
            skip = 0;
        }
        Ok(())
    }

    /// Writes `buf` at the start of the writable descriptors; bytes written.
    fn copy_to(&mut self, sh: &Shared, space: &IovaSpace<'_>, buf: &[u8]) -> Result<u32, Fail> {
        let mut pos = 0usize;
        for i in 0..self.descs.len() {
            let d = self.descs[i];
            if !d.write || pos == buf.len() {
                continue;
            }
            let n = (d.len as usize).min(buf.len() - pos);
            if space
                .write_slice(&buf[pos..pos + n], GuestAddress(d.addr))
                .is_err()
            {
                let f = space.take_fault().unwrap_or(TranslateFault {
                    iova: d.addr,
                    reason: FaultReason::Overflow,
                });
                self.refused(sh, f, Perm::WRITE)?;
                return Err(Fail::NoStatus);
            }
            pos += n;
        }
        Ok(pos as u32)
    }

    /// Builds `self.iov` for `len` bytes of the device-writable
    /// (`write`) or device-readable descriptors, after `skip` bytes. Every
    /// range is checked in the table for the access first.
    fn build_iov(
        &mut self,
        sh: &Shared,
        space: &IovaSpace<'_>,
        write: bool,
        skip: u64,
        len: u64,
    ) -> Result<(), Fail> {
        let need = if write { Perm::WRITE } else { Perm::READ };
        self.iov.clear();
        let mut used = 0;
        let mut skip = skip;
        let mut left = len;
        for i in 0..self.descs.len() {
            if left == 0 {
                break;
            }
            let d = self.descs[i];
            if d.write != write {
                continue;
            }
            let dlen = u64::from(d.len);
            if skip >= dlen {
                skip -= dlen;
                continue;
            }
            let n = (dlen - skip).min(left);
            let at = d.addr.checked_add(skip).ok_or(Fail::NoStatus)?;
            skip = 0;
            left -= n;
            match sh.mode {
                Mode::Window if sh.iommu() => {
                    // One check of the whole range in the table, then the
                    // window's contiguous slice.
                    let mut none: [Fragment; 0] = [];
                    if space
                        .translate(at, n, need, &mut FragmentSink::new(&mut none))
                        .is_err()
                    {
                        self.fail_translate(sh, space, at, need)?;
                    }
                    let w = sh.window.as_ref().expect("window mode has a window");
                    self.iov.push(libc::iovec {
                        iov_base: w.host(at) as *mut libc::c_void,
                        iov_len: n as usize,
                    });
                }
                _ => {
                    let start = used;
                    let mut count = {
                        let mut sink = FragmentSink::new(&mut self.frags[start..]);
                        let r = space.translate(at, n, need, &mut sink);
                        r.map(|()| sink.count())
                    };
                    if let Ok(c) = count {
                        if c > self.frags.len() - start {
                            // Too few slots: grow and translate again.
                            self.frags.resize(
                                start + c,
                                Fragment {
                                    hva: 0,
                                    gpa: 0,
                                    len: 0,
                                },
                            );
                            let mut sink = FragmentSink::new(&mut self.frags[start..]);
                            count = space
                                .translate(at, n, need, &mut sink)
                                .map(|()| sink.count());
                        }
                    }
                    match count {
                        Ok(c) => {
                            used += c;
                            for fr in &self.frags[start..start + c] {
                                self.iov.push(libc::iovec {
                                    iov_base: fr.hva as *mut libc::c_void,
                                    iov_len: fr.len as usize,
                                });
                            }
                        }
                        Err(_) => self.fail_translate(sh, space, at, need)?,
                    }
                }
            }
        }
        Ok(())
    }

    fn fail_translate(
        &mut self,
        sh: &Shared,
        space: &IovaSpace<'_>,
        at: u64,
        need: Perm,
    ) -> Result<(), Fail> {
        let f = space.take_fault().unwrap_or(TranslateFault {
            iova: at,
            reason: FaultReason::Overflow,
        });
        self.refused(sh, f, need)?;
        Err(Fail::NoStatus)
    }
}

/// Why serving stopped.
#[derive(Debug)]
enum Fail {
    /// Ask the frontend for this translation and retry the chain.
    Miss(u64, Perm),
    /// Fail the request (IOERR), or return the chain with length 0 when
    /// even the status cannot be written.
    NoStatus,
}

fn fault_iova(space: &IovaSpace<'_>, fallback: u64) -> u64 {
    space.take_fault().map_or(fallback, |f| f.iova)
}

/// preadv / pwritev of all of `iov` at `offset`, through short transfers.
fn rw_all(
    file: &File,
    iov: &mut [libc::iovec],
    mut offset: u64,
    write: bool,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < iov.len() {
        let cnt = (iov.len() - first).min(1024) as libc::c_int;
        // SAFETY: every iovec points into guest memory that the table
        // allowed for this access (checked in build_iov) and that stays
        // mapped while the caller holds the access lock and epoch guard;
        // the kernel reads or writes at most iov_len bytes of each.
        let n = unsafe {
            if write {
                libc::pwritev(
                    file.as_raw_fd(),
                    iov[first..].as_ptr(),
                    cnt,
                    offset as libc::off_t,
                )
            } else {
                libc::preadv(
                    file.as_raw_fd(),
                    iov[first..].as_ptr(),
                    cnt,
                    offset as libc::off_t,
                )
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        offset += n as u64;
        let mut n = n as usize;
        while n > 0 && first < iov.len() {
            let l = iov[first].iov_len;
            if n >= l {
                n -= l;
                first += 1;
            } else {
                iov[first].iov_base = (iov[first].iov_base as usize + n) as *mut libc::c_void;
                iov[first].iov_len = l - n;
                n = 0;
            }
        }
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}
