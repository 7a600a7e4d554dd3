// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Queued requests (ABI section 3.2, FEATURES bit 4): ops 7 QUEUE and
//! 8 SYNC, and the drains that apply a guest's queued MAP and UNMAP
//! entries (rule 1 before every request, rule 2 before a refused device
//! access, SYNC, tear-down).
//!
//! The guest owns the memory: a 64-byte control block and a ring of
//! 32-byte entries. The host treats every byte of it as hostile:
//!
//! - `head` is read once per drain (then an Acquire fence), and at most
//!   N entries (the ring's size) are taken in one drain, so a drain is
//!   bounded whatever the guest writes.
//! - Each entry is copied once (32 bytes) into host memory and parsed
//!   from the copy; a guest rewriting it during the drain gets either its
//!   old or its new content applied, never a mix the parser saw twice.
//! - `head - tail > N` (the guest overwrote entries not yet taken), or a
//!   control block or ring that can no longer be read or written (its RAM
//!   went away), stops the queue: nothing more is applied from it and SYNC
//!   answers STATE until it is torn down.
//!
//! Cost when idle: with no queue set up, a request or a refused access
//! pays one atomic load ([`Queues::active`]); a translation that hits
//! never comes here. With queues set up, a request pays one 4-byte read of
//! `head` per active queue, compared with the host's `tail`.
//!
//! Locking: each queue has its own mutex, held while a batch of it is
//! applied. Order: queue mutexes (index order, one at a time) ->
//! `endpoints_writer` -> `op_lock` -> domain -> table -> pins. An entry is
//! applied through the same code as a synchronous MAP or UNMAP, under its
//! endpoint's `op_lock`.

use std::cell::Cell;
use std::sync::atomic::fence;

use super::*;
use crate::sync::AtomicU32;

/// Most queues a VM may offer (the QUEUES register's largest value).
pub const MAX_QUEUES: u32 = 64;
/// Size of a queue's control block in bytes.
pub const QUEUE_CTRL_SIZE: u64 = abi::PVDMA_QUEUE_CTRL_SIZE as u64;
/// Size of one queue entry in bytes.
pub const QUEUE_ENTRY_SIZE: u64 = abi::PVDMA_QUEUE_ENTRY_SIZE as u64;
/// Smallest ring in bytes.
pub const QUEUE_RING_MIN: u64 = abi::PVDMA_QUEUE_RING_MIN as u64;
/// Largest ring in bytes.
pub const QUEUE_RING_MAX: u64 = abi::PVDMA_QUEUE_RING_MAX as u64;

const HEAD: u64 = std::mem::offset_of!(abi::pvdma_queue_ctrl, head) as u64;
const TAIL: u64 = std::mem::offset_of!(abi::pvdma_queue_ctrl, tail) as u64;
const STOPPED: u64 = std::mem::offset_of!(abi::pvdma_queue_ctrl, stopped) as u64;

const _: () = {
    assert!(std::mem::size_of::<abi::pvdma_queue_ctrl>() == QUEUE_CTRL_SIZE as usize);
    assert!(std::mem::size_of::<abi::pvdma_queue_entry>() == QUEUE_ENTRY_SIZE as usize);
    // tail, failed, last_error are adjacent: one write back per batch;
    // with stopped after them, one write at set-up.
    assert!(std::mem::offset_of!(abi::pvdma_queue_ctrl, failed) as u64 == TAIL + 4);
    assert!(std::mem::offset_of!(abi::pvdma_queue_ctrl, last_error) as u64 == TAIL + 8);
    assert!(STOPPED == TAIL + 12);
};

/// Why a queue was drained (the `cause` of [`DrainReport`], and the C
/// API's `PVDMA_DRAIN_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DrainCause {
    /// Rule 1: a request arrived.
    Request = 0,
    /// Rule 2: a device access was about to be refused.
    Miss = 1,
    /// The SYNC op.
    Sync = 2,
    /// QUEUE with nr_segs 0 (tear-down applies what is published).
    Teardown = 3,
    /// The queue was found broken and stopped in this drain.
    Stopped = 4,
}

/// What one drain of one queue did, for [`DrainHooks::drained`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainReport {
    /// Queue index.
    pub queue: u32,
    /// Why it was drained ([`DrainCause::Stopped`] when this drain found it
    /// broken).
    pub cause: DrainCause,
    /// Entries taken by this drain (failed ones included).
    pub applied: u32,
    /// Entries of those that failed.
    pub failed: u32,
    /// `head` as this drain read it.
    pub head: u32,
    /// `tail` after this drain.
    pub tail: u32,
}

/// The embedder's hooks around drains ([`Vm::set_drain_hooks`]). Every
/// method has a default that does nothing.
pub trait DrainHooks: Send + Sync {
    /// Called before a rule-2 drain (a device access about to be refused
    /// while some queue has entries pending), before any pvdma lock is
    /// taken. QEMU takes its big lock here when the thread lacks it (the
    /// drain's notifications need it). The value is handed to
    /// [`DrainHooks::miss_end`].
    fn miss_begin(&self) -> u64 {
        0
    }
    /// Called after that drain, with `miss_begin`'s value.
    fn miss_end(&self, _token: u64) {}
    /// Called once per queue per drain that took at least one entry or
    /// stopped the queue, after its mutex was released.
    fn drained(&self, _report: &DrainReport) {}
}

/// What the embedder sees of one queue ([`Vm::queues`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueInfo {
    /// Queue index.
    pub index: u32,
    /// Set up (the rest is 0 when not).
    pub set_up: bool,
    /// Stopped (broken or unreadable).
    pub stopped: bool,
    /// N, the ring's entries.
    pub entries: u32,
    /// Guest-physical address of the control block.
    pub ctrl_gpa: u64,
    /// Guest-physical address of the ring.
    pub ring_gpa: u64,
    /// `head` as the host last read it.
    pub head: u32,
    /// The host's `tail`.
    pub tail: u32,
    /// Entries failed since set-up.
    pub failed: u32,
    /// Status of the latest failed entry (0: none).
    pub last_error: u32,
    /// Entries taken since set-up, failed ones included.
    pub applied: u64,
    /// Drains that took at least one entry since set-up.
    pub drains: u64,
}

/// One entry as the host copied it out of the ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueEntry {
    /// 4 MAP or 5 UNMAP.
    pub op: u16,
    /// Flags.
    pub flags: u16,
    /// Requester ID.
    pub requester: u32,
    /// IOVA.
    pub iova: u64,
    /// MAP: guest-physical address; UNMAP: 0.
    pub gpa: u64,
    /// Length.
    pub length: u64,
}

impl QueueEntry {
    /// Decodes the 32 bytes of an entry (offsets from `pvdma_abi.h`).
    pub fn parse(b: &[u8; QUEUE_ENTRY_SIZE as usize]) -> QueueEntry {
        use std::mem::offset_of;
        type E = abi::pvdma_queue_entry;
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[at..at + 4]);
            u32::from_le_bytes(a)
        };
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        QueueEntry {
            op: u16_at(offset_of!(E, op)),
            flags: u16_at(offset_of!(E, flags)),
            requester: u32_at(offset_of!(E, requester)),
            iova: u64_at(offset_of!(E, iova)),
            gpa: u64_at(offset_of!(E, gpa)),
            length: u64_at(offset_of!(E, length)),
        }
    }

    /// Encodes the entry as a guest writes it (tests, benchmarks).
    pub fn encode(&self) -> [u8; QUEUE_ENTRY_SIZE as usize] {
        use std::mem::offset_of;
        type E = abi::pvdma_queue_entry;
        let mut b = [0u8; QUEUE_ENTRY_SIZE as usize];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(offset_of!(E, op), &self.op.to_le_bytes());
        put(offset_of!(E, flags), &self.flags.to_le_bytes());
        put(offset_of!(E, requester), &self.requester.to_le_bytes());
        put(offset_of!(E, iova), &self.iova.to_le_bytes());
        put(offset_of!(E, gpa), &self.gpa.to_le_bytes());
        put(offset_of!(E, length), &self.length.to_le_bytes());
        b
    }
}

/// A set-up queue, as the host keeps it (under its slot's mutex).
#[derive(Clone, Debug)]
pub(super) struct QueueState {
    pub(super) ctrl: u64,
    pub(super) ring: u64,
    /// N (a power of two).
    pub(super) entries: u32,
    pub(super) tail: u32,
    pub(super) failed: u32,
    pub(super) last_error: u32,
    pub(super) stopped: bool,
    pub(super) head_seen: u32,
    pub(super) applied: u64,
    pub(super) drains: u64,
    /// The pages pinned for the control block and ring, `(gfn, hva)`.
    pub(super) pages: Vec<(u64, usize)>,
}

/// One queue index.
#[derive(Default)]
pub(super) struct Slot {
    /// The host's tail, readable without the mutex: stored (Release) after
    /// the batch that reached it was applied, so a thread that reads `head`
    /// equal to it (Acquire) sees every entry up to it applied.
    tail: AtomicU32,
    /// Control block gpa, stored at set-up: read without the mutex while
    /// the queue's bit in `Queues::active` is set.
    ctrl: AtomicU64,
    state: Mutex<Option<QueueState>>,
}

/// The SYNC window: failures since the previous SYNC, VM-wide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncWindow {
    pub(super) count: u32,
    pub(super) first: Option<Status>,
}

/// Every queue of a VM, and what drains share.
pub(super) struct Queues {
    /// Bit i: queue i is set up and not stopped (has something a drain
    /// could take). 0: the one atomic load an idle VM pays.
    active: AtomicU64,
    slots: Box<[Slot]>,
    window: Mutex<SyncWindow>,
    hooks: parking_lot::RwLock<Option<Arc<dyn DrainHooks>>>,
    pub(super) drains: StdAtomicU64,
    pub(super) entries: StdAtomicU64,
    pub(super) failed: StdAtomicU64,
    pub(super) miss_drains: StdAtomicU64,
}

thread_local! {
    /// This thread is inside a drain: a translation or request it makes
    /// (through a notifier) does not drain again.
    static DRAINING: Cell<bool> = const { Cell::new(false) };
}

/// Marks the thread as draining for its lifetime; made only by the one
/// `enter` that found the thread unmarked, so its drop clears the mark.
struct DrainingMark;

impl DrainingMark {
    fn enter() -> Option<DrainingMark> {
        let was = DRAINING.with(|d| d.replace(true));
        // Not `then_some`: its argument would be made (and dropped,
        // clearing the mark) even when the thread was marked already.
        if was {
            None
        } else {
            Some(DrainingMark)
        }
    }
}

impl Drop for DrainingMark {
    fn drop(&mut self) {
        DRAINING.with(|d| d.set(false));
    }
}

/// No drain starts on this thread while it lives: taken with every
/// endpoint's `op_lock`, because a notifier called under that lock may
/// translate, and a drain there would take a queue mutex after `op_lock`
/// (the lock order is the other way round).
pub(super) struct NoDrain(#[allow(dead_code)] Option<DrainingMark>);

impl NoDrain {
    /// Marks the thread when `queues` (the VM offers request queues);
    /// without them no drain can start, and the mark costs nothing.
    #[inline]
    pub(super) fn enter(queues: bool) -> NoDrain {
        NoDrain(if queues { DrainingMark::enter() } else { None })
    }
}

impl Queues {
    pub(super) fn new(n: u32) -> Queues {
        Queues {
            active: AtomicU64::new(0),
            slots: (0..n).map(|_| Slot::default()).collect(),
            window: Mutex::new(SyncWindow::default()),
            hooks: parking_lot::RwLock::new(None),
            drains: StdAtomicU64::new(0),
            entries: StdAtomicU64::new(0),
            failed: StdAtomicU64::new(0),
            miss_drains: StdAtomicU64::new(0),
        }
    }

    /// Bit mask of the active queues.
    #[inline(always)]
    fn active(&self) -> u64 {
        // Acquire: pairs with the Release of set-up, so the slot's `ctrl`
        // and `tail` stored before are seen.
        self.active.load(Ordering::Acquire)
    }

    fn set_active(&self, index: u32, on: bool) {
        let bit = 1u64 << index;
        if on {
            self.active.fetch_or(bit, Ordering::AcqRel);
        } else {
            self.active.fetch_and(!bit, Ordering::AcqRel);
        }
    }

    /// Whether queue `i` has entries published that it has not taken:
    /// one 4-byte read of `head`, compared with the host's tail. An
    /// unreadable head counts as pending (the drain then stops the queue).
    #[inline]
    fn pending(&self, i: usize, ram: &RamLayout) -> bool {
        let slot = &self.slots[i];
        let ctrl = slot.ctrl.load(Ordering::Acquire);
        let mut h = [0u8; 4];
        if ram.read(ctrl + HEAD, &mut h).is_err() {
            return true;
        }
        // Acquire: pairs with the Release store after a batch.
        u32::from_le_bytes(h) != slot.tail.load(Ordering::Acquire)
    }

    fn hooks(&self) -> Option<Arc<dyn DrainHooks>> {
        self.hooks.read().clone()
    }
}

/// Outcome of one drain of one queue.
#[derive(Clone, Copy, Debug, Default)]
struct Drained {
    applied: u32,
    failed: u32,
    stopped: bool,
    head: u32,
    tail: u32,
}

impl Vm {
    /// Rule 1: applies every entry published in every queue. Cheap when
    /// nothing is pending (see the module doc). Does nothing on a thread
    /// that is inside a drain already.
    #[inline]
    pub(super) fn drain_for_request(&self, cause: DrainCause, ram: &RamLayout, guard: &Guard) {
        if self.queues.active() == 0 {
            return;
        }
        self.drain_pending(cause, ram, guard);
    }

    /// Drains each active queue that has entries pending.
    #[cold]
    fn drain_pending(&self, cause: DrainCause, ram: &RamLayout, guard: &Guard) -> bool {
        let Some(_mark) = DrainingMark::enter() else {
            return false;
        };
        let mut drained = false;
        let mut mask = self.queues.active();
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if self.queues.pending(i, ram) {
                self.drain_one(i, cause, guard);
                drained = true;
            }
        }
        drained
    }

    /// Whether some active queue has entries pending.
    fn any_pending(&self, ram: &RamLayout) -> bool {
        let mut mask = self.queues.active();
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if self.queues.pending(i, ram) {
                return true;
            }
        }
        false
    }

    /// Rule 2: a device access was refused for want of a mapping or a
    /// permission. Applies what is pending (inside the embedder's
    /// [`DrainHooks::miss_begin`]/`miss_end`) and tells the caller whether
    /// to translate once more: true when any queue is active (a drain by
    /// another thread may have applied the entry since the refusal, too).
    /// False on a thread that is inside a drain, or with no queue active.
    #[cold]
    #[inline(never)]
    pub(crate) fn drain_for_miss(&self) -> bool {
        if self.queues.active() == 0 || DRAINING.with(Cell::get) {
            return false;
        }
        let guard = epoch::pin();
        let ram = self.ram.load(&guard);
        if self.any_pending(ram) {
            // Relaxed: a statistic.
            self.queues.miss_drains.fetch_add(1, StdOrdering::Relaxed);
            let hooks = self.queues.hooks();
            let token = hooks.as_ref().map_or(0, |h| h.miss_begin());
            self.drain_pending(DrainCause::Miss, ram, &guard);
            if let Some(h) = &hooks {
                h.miss_end(token);
            }
        }
        true
    }

    /// Whether any request queue is set up and not stopped (a refusal
    /// may then be lifted by a drain).
    #[inline]
    pub(crate) fn queues_active(&self) -> bool {
        self.queues.active() != 0
    }

    /// Whether a refusal of this reason may be lifted by a queued entry.
    #[inline(always)]
    pub(crate) fn drainable(reason: FaultReason) -> bool {
        matches!(reason, FaultReason::Unmapped | FaultReason::Permission)
    }

    /// Drains queue `i` under its mutex, then reports.
    fn drain_one(&self, i: usize, cause: DrainCause, guard: &Guard) -> Drained {
        let d = {
            let mut st = self.queues.slots[i].state.lock();
            match st.as_mut() {
                Some(q) => self.drain_locked(i, q, guard),
                None => Drained::default(),
            }
        };
        self.report(i, cause, &d);
        d
    }

    fn report(&self, i: usize, cause: DrainCause, d: &Drained) {
        if d.applied == 0 && !d.stopped {
            return;
        }
        if let Some(h) = self.queues.hooks() {
            h.drained(&DrainReport {
                queue: i as u32,
                cause: if d.stopped {
                    DrainCause::Stopped
                } else {
                    cause
                },
                applied: d.applied,
                failed: d.failed,
                head: d.head,
                tail: d.tail,
            });
        }
    }

    /// Stops queue `i`: nothing more is applied from it.
    fn stop_locked(&self, i: usize, q: &mut QueueState, ram: &RamLayout) {
        q.stopped = true;
        self.queues.set_active(i as u32, false);
        let _ = ram.write(q.ctrl + STOPPED, &1u32.to_le_bytes());
    }

    /// The drain proper: reads `head` once, takes at most N entries, each
    /// copied once into host memory, and writes tail, failed, last_error
    /// back once. The caller holds the queue's mutex.
    fn drain_locked(&self, i: usize, q: &mut QueueState, guard: &Guard) -> Drained {
        let mut d = Drained {
            head: q.head_seen,
            tail: q.tail,
            ..Drained::default()
        };
        if q.stopped {
            return d;
        }
        let ram = self.ram.load(guard);
        let mut h = [0u8; 4];
        if ram.read(q.ctrl + HEAD, &mut h).is_err() {
            self.stop_locked(i, q, ram);
            d.stopped = true;
            return d;
        }
        // The entries were written before head (the guest's release
        // store): read them after it.
        fence(StdOrdering::Acquire);
        let head = u32::from_le_bytes(h);
        q.head_seen = head;
        d.head = head;
        let pending = head.wrapping_sub(q.tail);
        if pending == 0 {
            return d;
        }
        if pending > q.entries {
            self.stop_locked(i, q, ram);
            d.stopped = true;
            return d;
        }
        let mask = q.entries - 1;
        // Entries are copied a chunk at a time (one read of guest RAM per
        // chunk, not per entry), each exactly once, before any is parsed.
        const CHUNK: u32 = 32;
        let mut raw = [0u8; (CHUNK as usize) * QUEUE_ENTRY_SIZE as usize];
        let mut window = SyncWindow::default();
        let mut left = pending;
        // The UNMAP events of this batch, merged (see `unmap_batch_begin`);
        // all sent before the drain returns.
        self.unmap_batch_begin();
        'drain: while left > 0 {
            let slot = q.tail & mask;
            // Not past the end of the ring: the next chunk starts at slot 0.
            let k = left.min(CHUNK).min(q.entries - slot);
            let bytes = &mut raw[..(k as usize) * QUEUE_ENTRY_SIZE as usize];
            if ram
                .read(q.ring + u64::from(slot) * QUEUE_ENTRY_SIZE, bytes)
                .is_err()
            {
                d.stopped = true;
                break 'drain;
            }
            for one in bytes.chunks_exact(QUEUE_ENTRY_SIZE as usize) {
                let Ok(one) = <&[u8; QUEUE_ENTRY_SIZE as usize]>::try_from(one) else {
                    break 'drain;
                };
                let entry = QueueEntry::parse(one);
                let status = self.apply_entry(&entry);
                q.tail = q.tail.wrapping_add(1);
                d.applied += 1;
                if status != Status::Ok {
                    d.failed += 1;
                    q.failed = q.failed.wrapping_add(1);
                    q.last_error = status as u32;
                    window.count += 1;
                    window.first.get_or_insert(status);
                }
            }
            left -= k;
        }
        self.unmap_batch_end(guard);
        q.applied += u64::from(d.applied);
        if d.applied > 0 {
            q.drains += 1;
            let mut out = [0u8; 12];
            out[0..4].copy_from_slice(&q.tail.to_le_bytes());
            out[4..8].copy_from_slice(&q.failed.to_le_bytes());
            out[8..12].copy_from_slice(&q.last_error.to_le_bytes());
            if ram.write(q.ctrl + TAIL, &out).is_err() {
                d.stopped = true;
            }
            // Relaxed: statistics.
            self.queues.drains.fetch_add(1, StdOrdering::Relaxed);
            self.queues
                .entries
                .fetch_add(u64::from(d.applied), StdOrdering::Relaxed);
            self.queues
                .failed
                .fetch_add(u64::from(d.failed), StdOrdering::Relaxed);
        }
        if window.count > 0 {
            let mut w = self.queues.window.lock();
            w.count = w.count.saturating_add(window.count);
            if w.first.is_none() {
                w.first = window.first;
            }
        }
        // Release: the entries applied above happen before a reader that
        // sees this tail (see `Slot::tail`).
        self.queues.slots[i].tail.store(q.tail, Ordering::Release);
        if d.stopped {
            self.stop_locked(i, q, ram);
        }
        d.tail = q.tail;
        d
    }

    /// Applies one entry exactly as the MAP (FIXED, one segment) or UNMAP
    /// request it stands for. Not counted as a request.
    pub(super) fn apply_entry(&self, e: &QueueEntry) -> Status {
        let valid = u32::from(e.flags) & !abi::PVDMA_FLAGS_VALID == 0;
        let req = match u32::from(e.op) {
            abi::PVDMA_OP_MAP if valid => Request {
                op: Op::Map as u16,
                flags: e.flags | abi::PVDMA_FLAG_FIXED as u16,
                requester: e.requester,
                nr_segs: 1,
                iova: e.iova,
                length: 0,
                reserved: [0; 3],
                segs: Vec::new(),
            },
            abi::PVDMA_OP_UNMAP if e.flags == 0 && e.gpa == 0 => Request {
                op: Op::Unmap as u16,
                flags: 0,
                requester: e.requester,
                nr_segs: 0,
                iova: e.iova,
                length: e.length,
                reserved: [0; 3],
                segs: Vec::new(),
            },
            _ => return Status::Inval,
        };
        let op = Some(if req.op == Op::Map as u16 {
            Op::Map
        } else {
            Op::Unmap
        });
        let (gpa, len) = (e.gpa, e.length);
        self.execute_inner(op, &req, &mut || vec![(gpa, len)])
            .status
    }

    /// Op 7 QUEUE: set-up (nr_segs 2) or tear-down (nr_segs 0). The
    /// requester was found to be an endpoint; no lock is held.
    #[cold]
    #[inline(never)]
    pub(super) fn queue_op(&self, req: &Request, segs: Vec<(u64, u64)>, guard: &Guard) -> Response {
        let Some(i) = usize::try_from(req.iova)
            .ok()
            .filter(|&i| i < self.queues.slots.len())
        else {
            return Response::status(Status::Inval);
        };
        match req.nr_segs {
            0 => self.queue_teardown(i, guard),
            2 if segs.len() == 2 => self.queue_setup(i, segs[0], segs[1], None, guard),
            _ => Response::status(Status::Inval),
        }
    }

    /// Sets queue `i` up; with `saved` (migration) the source's tail and
    /// counters are taken instead of reading head, and guest memory is not
    /// written (it travelled with the source's writes in it).
    fn queue_setup(
        &self,
        i: usize,
        ctrl: (u64, u64),
        ring: (u64, u64),
        saved: Option<&QueueSaved>,
        guard: &Guard,
    ) -> Response {
        let (cgpa, clen) = ctrl;
        let (rgpa, rlen) = ring;
        if clen != QUEUE_CTRL_SIZE || cgpa % u64::from(abi::PVDMA_QUEUE_CTRL_ALIGN) != 0 {
            return Response::status(Status::Inval);
        }
        if !rlen.is_power_of_two()
            || !(QUEUE_RING_MIN..=QUEUE_RING_MAX).contains(&rlen)
            || rgpa & abi::PAGE_MASK != 0
        {
            return Response::status(Status::Inval);
        }
        let (Some(cend), Some(rend)) = (cgpa.checked_add(clen), rgpa.checked_add(rlen)) else {
            return Response::status(Status::Fault);
        };
        if cgpa < rend && rgpa < cend {
            return Response::status(Status::Inval);
        }
        let mut st = self.queues.slots[i].state.lock();
        if st.is_some() {
            return Response::status(Status::State);
        }
        let ram = self.ram.load(guard);
        if !ram.contains_range(cgpa, clen) || !ram.contains_range(rgpa, rlen) {
            return Response::status(Status::Fault);
        }
        let mut pages = Vec::with_capacity((rlen >> abi::PAGE_SHIFT) as usize + 1);
        for gpa in std::iter::once(cgpa & !abi::PAGE_MASK)
            .chain((rgpa..rend).step_by(abi::PAGE_SIZE as usize))
        {
            let Some(hva) = ram.hva(gpa) else {
                return Response::status(Status::Fault);
            };
            pages.push((gpa >> abi::PAGE_SHIFT, hva));
        }
        pages.sort_unstable();
        if let Err(e) = self.pins.pin(&pages) {
            return Response::status(domain_status(&domain::Error::Pin(e)));
        }
        let mut q = QueueState {
            ctrl: cgpa,
            ring: rgpa,
            entries: (rlen / QUEUE_ENTRY_SIZE) as u32,
            tail: 0,
            failed: 0,
            last_error: 0,
            stopped: false,
            head_seen: 0,
            applied: 0,
            drains: 0,
            pages,
        };
        if let Some(s) = saved {
            q.tail = s.tail;
            q.head_seen = s.tail;
            q.failed = s.failed;
            q.last_error = s.last_error;
            q.stopped = s.stopped;
        } else {
            // tail = head as read now: nothing published before set-up is
            // ever applied. Then tail, failed, last_error, stopped in one
            // write.
            let mut h = [0u8; 4];
            let mut out = [0u8; 16];
            let written = ram.read(cgpa + HEAD, &mut h).and_then(|()| {
                out[0..4].copy_from_slice(&h);
                ram.write(cgpa + TAIL, &out)
            });
            if written.is_err() {
                self.pins.unpin(&q.pages);
                return Response::status(Status::Fault);
            }
            q.tail = u32::from_le_bytes(h);
            q.head_seen = q.tail;
        }
        let (head, stopped) = (q.tail, q.stopped);
        *st = Some(q);
        let slot = &self.queues.slots[i];
        slot.tail.store(head, Ordering::Release);
        slot.ctrl.store(cgpa, Ordering::Release);
        self.queues.set_active(i as u32, !stopped);
        Response::ok(0)
    }

    fn queue_teardown(&self, i: usize, guard: &Guard) -> Response {
        let d = {
            let mut st = self.queues.slots[i].state.lock();
            let Some(q) = st.as_mut() else {
                return Response::status(Status::State);
            };
            let d = {
                let _mark = DrainingMark::enter();
                self.drain_locked(i, q, guard)
            };
            self.queues.set_active(i as u32, false);
            if let Some(q) = st.take() {
                self.pins.unpin(&q.pages);
            }
            d
        };
        self.report(i, DrainCause::Teardown, &d);
        Response::ok(0)
    }

    /// Op 8 SYNC: applies everything published, then answers for the
    /// window since the previous SYNC.
    #[cold]
    #[inline(never)]
    pub(super) fn sync_op(&self, guard: &Guard) -> Response {
        let mark = DrainingMark::enter();
        let mut stopped = false;
        for i in 0..self.queues.slots.len() {
            let d = {
                let mut st = self.queues.slots[i].state.lock();
                let Some(q) = st.as_mut() else {
                    continue;
                };
                let d = match mark {
                    Some(_) => self.drain_locked(i, q, guard),
                    None => Drained::default(),
                };
                stopped |= q.stopped;
                d
            };
            self.report(i, DrainCause::Sync, &d);
        }
        drop(mark);
        let w = std::mem::take(&mut *self.queues.window.lock());
        let status = if stopped {
            Status::State
        } else {
            w.first.unwrap_or(Status::Ok)
        };
        Response {
            status,
            iova: 0,
            length: 0,
            result: u64::from(w.count),
        }
    }

    /// Device reset: every queue torn down without applying anything, and
    /// the SYNC window emptied.
    pub(super) fn reset_queues(&self) {
        for (i, slot) in self.queues.slots.iter().enumerate() {
            let mut st = slot.state.lock();
            self.queues.set_active(i as u32, false);
            if let Some(q) = st.take() {
                self.pins.unpin(&q.pages);
            }
        }
        *self.queues.window.lock() = SyncWindow::default();
    }

    /// The QUEUES register: queues offered (0: the extension is off).
    pub fn queue_count(&self) -> u32 {
        self.queues.slots.len() as u32
    }

    /// Every queue, set up or not, in index order.
    pub fn queues(&self) -> Vec<QueueInfo> {
        self.queues
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let st = slot.state.lock();
                match st.as_ref() {
                    None => QueueInfo {
                        index: i as u32,
                        ..QueueInfo::default()
                    },
                    Some(q) => QueueInfo {
                        index: i as u32,
                        set_up: true,
                        stopped: q.stopped,
                        entries: q.entries,
                        ctrl_gpa: q.ctrl,
                        ring_gpa: q.ring,
                        head: q.head_seen,
                        tail: q.tail,
                        failed: q.failed,
                        last_error: q.last_error,
                        applied: q.applied,
                        drains: q.drains,
                    },
                }
            })
            .collect()
    }

    /// Installs (or with `None` removes) the embedder's drain hooks.
    pub fn set_drain_hooks(&self, hooks: Option<Arc<dyn DrainHooks>>) {
        *self.queues.hooks.write() = hooks;
    }

    /// Applies every published entry of every queue now (rule 5: the host
    /// may drain at any time), as a request would.
    pub fn drain_queues(&self) {
        let guard = epoch::pin();
        let ram = self.ram.load(&guard);
        self.drain_for_request(DrainCause::Request, ram, &guard);
    }

    /// The queues' saved state, for migration.
    pub(super) fn export_queues(&self) -> (Vec<QueueSaved>, SyncWindow) {
        let mut out = Vec::new();
        for (i, slot) in self.queues.slots.iter().enumerate() {
            if let Some(q) = slot.state.lock().as_ref() {
                out.push(QueueSaved {
                    index: i as u32,
                    ctrl: q.ctrl,
                    ring: q.ring,
                    ring_len: q.entries * QUEUE_ENTRY_SIZE as u32,
                    tail: q.tail,
                    failed: q.failed,
                    last_error: q.last_error,
                    stopped: q.stopped,
                });
            }
        }
        (out, *self.queues.window.lock())
    }

    /// Re-creates saved queues (the VM was reset): each re-pinned,
    /// through the set-up checks, with the source's tail and counters and
    /// nothing written to guest memory.
    pub(super) fn import_queues(&self, saved: &[QueueSaved], window: SyncWindow) -> Result<()> {
        let guard = epoch::pin();
        for s in saved {
            if s.index >= self.queue_count() {
                return Err(Error::State(format!(
                    "queue {} but the destination offers {}",
                    s.index,
                    self.queue_count()
                )));
            }
            let r = self.queue_setup(
                s.index as usize,
                (s.ctrl, QUEUE_CTRL_SIZE),
                (s.ring, u64::from(s.ring_len)),
                Some(s),
                &guard,
            );
            if r.status != Status::Ok {
                return Err(Error::State(format!("queue {}: {}", s.index, r.status)));
            }
        }
        *self.queues.window.lock() = window;
        Ok(())
    }
}

/// One queue in the migration stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSaved {
    /// Index.
    pub index: u32,
    /// Control block gpa.
    pub ctrl: u64,
    /// Ring gpa.
    pub ring: u64,
    /// Ring length in bytes.
    pub ring_len: u32,
    /// The host's tail.
    pub tail: u32,
    /// Failed count.
    pub failed: u32,
    /// Last error.
    pub last_error: u32,
    /// Stopped.
    pub stopped: bool,
}
