// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Notifications: MAP and UNMAP events for the VMM (QEMU's IOMMU notifiers).

use crate::prelude::*;

/// `pvdma_map_event.kind`: a translation was added.
pub const PVDMA_EVENT_MAP: u32 = 1;
/// `pvdma_map_event.kind`: a translation was removed.
pub const PVDMA_EVENT_UNMAP: u32 = 2;

/// A change of translation: `len` bytes at `iova` translate (MAP) or no
/// longer translate (UNMAP) to guest-physical `gpa` for endpoint
/// `requester`. Page aligned; one event per run contiguous in both spaces.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pvdma_map_event {
    /// `PVDMA_EVENT_MAP` or `PVDMA_EVENT_UNMAP`.
    pub kind: u32,
    /// The endpoint's requester ID.
    pub requester: u32,
    /// Page-aligned IOVA.
    pub iova: u64,
    /// Length, a multiple of 4 KiB.
    pub len: u64,
    /// Page-aligned guest-physical address.
    pub gpa: u64,
    /// Permissions of the mapping (0 for UNMAP).
    pub perms: u32,
}

impl From<&MapEvent> for pvdma_map_event {
    fn from(e: &MapEvent) -> Self {
        pvdma_map_event {
            kind: e.kind as u32,
            requester: e.requester,
            iova: e.iova,
            len: e.len,
            gpa: e.gpa,
            perms: u32::from(e.perms.bits()),
        }
    }
}

/// The notification callback. `ev` is valid only during the call.
///
/// It returns 0 when it carried the change out. For a MAP event, nonzero
/// refuses the mapping: the embedder could not set up what it needs (VFIO
/// could not pin the pages, say). The request then answers QUOTA and
/// leaves nothing mapped: no further runs of it are notified, and UNMAP
/// events for all its runs follow, so that the embedder drops whatever it
/// did set up. What an UNMAP event returns is ignored.
pub type pvdma_notify_fn =
    Option<unsafe extern "C" fn(opaque: *mut c_void, ev: *const pvdma_map_event) -> c_int>;

/// The callback's `opaque`, carried to whichever thread runs a request.
struct Opaque(*mut c_void);

// SAFETY: pvdma_vm_set_notifier's contract makes `opaque` usable from any
// thread; pvdma never dereferences it, only hands it back to the callback.
unsafe impl Send for Opaque {}
// SAFETY: as for Send: shared use is the caller's promise.
unsafe impl Sync for Opaque {}

impl Opaque {
    // A method, so closures capture the whole (Send) wrapper rather than
    // the raw-pointer field.
    fn get(&self) -> *mut c_void {
        self.0
    }
}

/// Sets the notification callback (NULL `notify` clears it). It is called
/// for every translation added or removed: after the table holds a new
/// mapping, and before the request that removes one returns (UNMAP, DETACH,
/// reset, endpoint or RAM removal, free).
///
/// The callback runs on the thread of the call that caused it, under that
/// endpoint's request lock: it may translate, look up, read faults and
/// statistics, but it must not call `pvdma_vm_submit`, `pvdma_vm_reset`,
/// `pvdma_vm_remove_ram`, `pvdma_vm_remove_endpoint`, `pvdma_vm_state_load`
/// or `pvdma_vm_free` (they would deadlock). A request already running
/// when the notifier is replaced may still call the previous one, so keep
/// the previous `opaque` valid until such calls have returned.
///
/// # Safety
/// `vm` is NULL or a live handle; `notify` is NULL or a function that may
/// be called from any thread with `opaque` for as long as it is set.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_set_notifier(
    vm: *mut pvdma_vm,
    notify: pvdma_notify_fn,
    opaque: *mut c_void,
) {
    ffi_boundary!({
        let vm = try_vm!(vm, ());
        let notifier: Option<pvdma::Notifier> = notify.map(|f| {
            let opaque = Opaque(opaque);
            let n: pvdma::Notifier = Arc::new(move |ev: &MapEvent| {
                let ev = pvdma_map_event::from(ev);
                // SAFETY: the caller promised `f` may be called with
                // `opaque` from any thread while set; `ev` outlives the call.
                unsafe { f(opaque.get(), &ev) == 0 }
            });
            n
        });
        vm.set_notifier(notifier);
    })
}
