// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest's requests (DOORBELL and hypercall) and device reset.

use crate::prelude::*;

/// Processes the guest's request block at guest-physical `block_gpa` (the
/// DOORBELL write or hypercall): reads it once, runs it, writes back
/// status, iova, length and result as the op defines, and returns the
/// guest status (`PVDMA_S_*`). `PVDMA_S_FAULT` when the block is not in
/// guest RAM (nothing written back); `PVDMA_S_INTERNAL` for a NULL handle
/// or an internal error.
///
/// # Safety
/// `vm` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_submit(vm: *mut pvdma_vm, block_gpa: u64) -> u32 {
    let internal = Status::Internal as u32;
    ffi_boundary!({
        let vm = try_vm!(vm, internal);
        vm.submit(block_gpa) as u32
    })
}

/// `pvdma_vm_submit_via` transport: anything but the guest transports
/// (what `pvdma_vm_submit` counts its requests as).
pub const PVDMA_TRANSPORT_OTHER: u32 = 0;
/// `pvdma_vm_submit_via` transport: the DOORBELL register.
pub const PVDMA_TRANSPORT_DOORBELL: u32 = 1;
/// `pvdma_vm_submit_via` transport: the VMCALL/VMMCALL hypercall.
pub const PVDMA_TRANSPORT_HYPERCALL: u32 = 2;

/// `pvdma_vm_submit`, also counting the request for `transport`
/// (`PVDMA_TRANSPORT_*`) in `pvdma_request_counts`. An unknown
/// `transport` is counted as `PVDMA_TRANSPORT_OTHER`; the request runs
/// the same whatever the transport.
///
/// # Safety
/// `vm` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_submit_via(
    vm: *mut pvdma_vm,
    block_gpa: u64,
    transport: u32,
) -> u32 {
    let internal = Status::Internal as u32;
    ffi_boundary!({
        let vm = try_vm!(vm, internal);
        let t = pvdma::Transport::from_raw(transport).unwrap_or(pvdma::Transport::Other);
        vm.submit_via(block_gpa, t) as u32
    })
}

/// Device reset: detaches every endpoint (mappings removed, pins released,
/// UNMAP events sent) and clears the fault log and count.
///
/// # Safety
/// `vm` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_reset(vm: *mut pvdma_vm) {
    ffi_boundary!({
        let vm = try_vm!(vm, ());
        vm.reset();
    })
}
