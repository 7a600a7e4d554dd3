// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Request queues (ABI section 3.2): the QUEUES register, a listing of
//! every queue (`query-pvdma`), and the hooks QEMU puts around drains.
//! Ops 7 QUEUE and 8 SYNC need no call of their own: `pvdma_vm_submit`
//! runs them; `pvdma_vm_reset` tears the queues down; migration carries
//! them.

use crate::prelude::*;

/// Most queues a VM may offer (`pvdma_config.queues`).
pub const PVDMA_MAX_QUEUES: u32 = 64;

/// `drained`'s cause: rule 1, a request arrived.
pub const PVDMA_DRAIN_REQUEST: u32 = 0;
/// `drained`'s cause: rule 2, a device access was about to be refused.
pub const PVDMA_DRAIN_MISS: u32 = 1;
/// `drained`'s cause: the SYNC op.
pub const PVDMA_DRAIN_SYNC: u32 = 2;
/// `drained`'s cause: tear-down (QUEUE with nr_segs 0).
pub const PVDMA_DRAIN_TEARDOWN: u32 = 3;
/// `drained`'s cause: the drain found the queue broken and stopped it.
pub const PVDMA_DRAIN_STOPPED: u32 = 4;

// Literals above so that cbindgen can write them; the core must agree.
const _: () = {
    assert!(PVDMA_MAX_QUEUES == pvdma::MAX_QUEUES);
    assert!(PVDMA_DRAIN_REQUEST == pvdma::DrainCause::Request as u32);
    assert!(PVDMA_DRAIN_MISS == pvdma::DrainCause::Miss as u32);
    assert!(PVDMA_DRAIN_SYNC == pvdma::DrainCause::Sync as u32);
    assert!(PVDMA_DRAIN_TEARDOWN == pvdma::DrainCause::Teardown as u32);
    assert!(PVDMA_DRAIN_STOPPED == pvdma::DrainCause::Stopped as u32);
};

/// The QUEUES register: the number of queues offered, 0 when the QUEUE
/// extension is off. 0 for NULL.
///
/// # Safety
/// `vm` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_queue_count(vm: *const pvdma_vm) -> u32 {
    ffi_boundary!({
        let vm = try_vm!(vm, 0);
        vm.queue_count()
    })
}

/// One queue as the host sees it. All but `index` are 0 when the queue is
/// not set up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pvdma_queue_info {
    /// Queue index, 0..QUEUES.
    pub index: u32,
    /// The guest set it up.
    pub set_up: bool,
    /// The host stopped it (the guest broke it, or its memory went away);
    /// SYNC answers STATE until it is torn down.
    pub stopped: bool,
    /// Entries in the ring (N).
    pub entries: u32,
    /// Guest-physical address of the control block.
    pub ctrl_gpa: u64,
    /// Guest-physical address of the ring.
    pub ring_gpa: u64,
    /// `head` as the host last read it.
    pub head: u32,
    /// The host's `tail`: entries taken.
    pub tail: u32,
    /// Entries failed since set-up.
    pub failed: u32,
    /// Status of the latest failed entry (`PVDMA_S_*`, 0: none).
    pub last_error: u32,
    /// Entries taken since set-up, failed ones included.
    pub applied: u64,
    /// Drains that took at least one entry since set-up.
    pub drains: u64,
}

/// Fills `out[0..min(n, QUEUES)]` with the queues in index order and
/// returns QUEUES (so a caller may ask with `n` 0 first). 0 for NULL `vm`,
/// and nothing written when `out` is NULL.
///
/// # Safety
/// `vm` is NULL or a live handle; `out` is NULL or valid for writing `n`
/// entries.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_queues(
    vm: *const pvdma_vm,
    out: *mut pvdma_queue_info,
    n: usize,
) -> usize {
    ffi_boundary!({
        let vm = try_vm!(vm, 0);
        let queues = vm.queues();
        if !out.is_null() {
            let k = n.min(queues.len());
            let items = queues[..k].iter().map(|q| pvdma_queue_info {
                index: q.index,
                set_up: q.set_up,
                stopped: q.stopped,
                entries: q.entries,
                ctrl_gpa: q.ctrl_gpa,
                ring_gpa: q.ring_gpa,
                head: q.head,
                tail: q.tail,
                failed: q.failed,
                last_error: q.last_error,
                applied: q.applied,
                drains: q.drains,
            });
            // SAFETY: k <= n entries, `out` valid for n per the contract.
            unsafe { write_array(out, k, items) };
        }
        queues.len()
    })
}

/// Hooks around drains. Every pointer may be NULL.
///
/// - `miss_begin`/`miss_end` wrap every rule-2 drain (a device access
///   about to be refused while some queue has entries pending); called
///   before any pvdma lock is taken, on the translating thread. QEMU takes
///   its big lock there when the thread does not hold it, since the
///   drain's MAP/UNMAP notifications need it. `miss_end` gets what
///   `miss_begin` returned.
/// - `drained` is called once per queue per drain that took at least one
///   entry or stopped the queue (`cause`: `PVDMA_DRAIN_*`; `applied` and
///   `failed` count this drain's entries; `head` as read, `tail` after).
///   It runs with no queue lock held but possibly under the caller's (a
///   request's) context: it must not call back into pvdma requests.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pvdma_drain_hooks {
    /// Handed back to every hook.
    pub opaque: *mut c_void,
    /// Before a rule-2 drain; its value goes to `miss_end`.
    pub miss_begin: Option<unsafe extern "C" fn(opaque: *mut c_void) -> u64>,
    /// After a rule-2 drain.
    pub miss_end: Option<unsafe extern "C" fn(opaque: *mut c_void, token: u64)>,
    /// After a drain of one queue that took entries or stopped it.
    pub drained: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            queue: u32,
            cause: u32,
            applied: u32,
            failed: u32,
            head: u32,
            tail: u32,
        ),
    >,
}

/// The hooks, with `opaque` carried to whichever thread drains.
struct Hooks(pvdma_drain_hooks);

// SAFETY: pvdma_vm_set_drain_hooks's contract makes the hooks callable
// with `opaque` from any thread; pvdma never dereferences `opaque`.
unsafe impl Send for Hooks {}
// SAFETY: as for Send.
unsafe impl Sync for Hooks {}

impl pvdma::DrainHooks for Hooks {
    fn miss_begin(&self) -> u64 {
        match self.0.miss_begin {
            // SAFETY: the caller promised the hook may be called with
            // `opaque` from any thread while set.
            Some(f) => unsafe { f(self.0.opaque) },
            None => 0,
        }
    }

    fn miss_end(&self, token: u64) {
        if let Some(f) = self.0.miss_end {
            // SAFETY: as in miss_begin.
            unsafe { f(self.0.opaque, token) }
        }
    }

    fn drained(&self, r: &pvdma::DrainReport) {
        if let Some(f) = self.0.drained {
            // SAFETY: as in miss_begin.
            unsafe {
                f(
                    self.0.opaque,
                    r.queue,
                    r.cause as u32,
                    r.applied,
                    r.failed,
                    r.head,
                    r.tail,
                )
            }
        }
    }
}

/// Sets the drain hooks (copied; NULL `hooks` clears them). A drain
/// already running may still call the previous hooks, so keep their
/// `opaque` valid until such calls have returned.
///
/// # Safety
/// `vm` is NULL or a live handle; `hooks` is NULL or points to a
/// `pvdma_drain_hooks` whose functions may be called from any thread with
/// its `opaque` for as long as they are set.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_set_drain_hooks(
    vm: *mut pvdma_vm,
    hooks: *const pvdma_drain_hooks,
) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        let hooks: Option<Arc<dyn pvdma::DrainHooks>> = if hooks.is_null() {
            None
        } else {
            // SAFETY: non-null, and points to a pvdma_drain_hooks per the
            // contract.
            Some(Arc::new(Hooks(unsafe { hooks.read() })))
        };
        vm.set_drain_hooks(hooks);
        PVDMA_OK
    })
}
