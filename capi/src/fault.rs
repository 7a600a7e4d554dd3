// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The fault log: refused device accesses.

use crate::prelude::*;

/// One refused device access.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pvdma_fault {
    /// Requester ID of the device.
    pub requester: u32,
    /// What the device tried (`PVDMA_ACCESS_*`).
    pub access: u32,
    /// Why it was refused (`PVDMA_FAULT_*`).
    pub reason: u32,
    /// First IOVA refused.
    pub iova: u64,
    /// Sequence number: faults recorded before this one since reset.
    pub seq: u64,
}

/// The name of fault reason `reason` ("UNMAPPED", "PERMISSION", "BLOCKED",
/// "OUTSIDE_RAM", "NO_DEVICE", "OVERFLOW"), or "UNKNOWN". Static, never
/// NULL.
#[no_mangle]
pub extern "C" fn pvdma_fault_reason_name(reason: u32) -> *const c_char {
    let s: &'static CStr = match fault_reason_from_raw(reason) {
        Some(FaultReason::Unmapped) => c"UNMAPPED",
        Some(FaultReason::Permission) => c"PERMISSION",
        Some(FaultReason::Blocked) => c"BLOCKED",
        Some(FaultReason::OutsideRam) => c"OUTSIDE_RAM",
        Some(FaultReason::NoDevice) => c"NO_DEVICE",
        Some(FaultReason::Overflow) => c"OVERFLOW",
        None => c"UNKNOWN",
    };
    s.as_ptr()
}

/// Copies the newest `min(n, logged)` fault records into `out`, oldest
/// first, and returns how many are logged (so `n` 0 is a size query). 0
/// for a NULL handle; nothing is copied when `out` is NULL.
///
/// # Safety
/// `vm` is NULL or a live handle; `out` is NULL or valid for writing `n`
/// entries.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_faults(
    vm: *const pvdma_vm,
    out: *mut pvdma_fault,
    n: usize,
) -> usize {
    ffi_boundary!({
        let vm = try_vm!(vm, 0);
        let log = vm.faults();
        let n = if out.is_null() { 0 } else { n.min(log.len()) };
        let newest = log[log.len() - n..].iter().map(|f| pvdma_fault {
            requester: f.requester,
            access: f.access as u32,
            reason: f.reason as u32,
            iova: f.iova,
            seq: f.seq,
        });
        // SAFETY: n <= the caller's n, `out` valid for that many.
        unsafe { write_array(out, n, newest) };
        log.len()
    })
}

/// Refused device accesses since creation or reset (the FAULTS register).
/// 0 for NULL.
///
/// # Safety
/// `vm` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_fault_count(vm: *const pvdma_vm) -> u64 {
    ffi_boundary!({
        let vm = try_vm!(vm, 0);
        vm.fault_count()
    })
}

/// Records a device access that a transport refused itself (so it shows
/// in the FAULTS register and the log). Ignored when `access` is not
/// 1..=3 or `reason` is not a `PVDMA_FAULT_*` value.
///
/// # Safety
/// `vm` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_record_fault(
    vm: *mut pvdma_vm,
    rid: u32,
    iova: u64,
    access: u32,
    reason: u32,
) {
    ffi_boundary!({
        let vm = try_vm!(vm, ());
        if let (Some(a), Some(r)) = (Access::from_raw(access), fault_reason_from_raw(reason)) {
            vm.record_fault(rid, iova, a, r);
        }
    })
}
