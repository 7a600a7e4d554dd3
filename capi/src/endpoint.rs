// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Endpoints: the PCI requesters behind a pvdma function.

use crate::prelude::*;

/// Registers endpoint `rid` (bus << 8 | devfn, 0..=0xffff). `host_bdf` is
/// the host PCI address ("0000:65:00.0") when the endpoint is an assigned
/// host device, NULL otherwise. `PVDMA_ERR_EXISTS` when registered,
/// `PVDMA_ERR_INVALID_ARGUMENT` for a requester ID above 0xffff or a
/// `host_bdf` that is not UTF-8.
///
/// # Safety
/// `vm` is NULL or a live handle; `host_bdf` is NULL or a NUL-terminated
/// string.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_add_endpoint(
    vm: *mut pvdma_vm,
    rid: u32,
    host_bdf: *const c_char,
) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        let bdf = if host_bdf.is_null() {
            None
        } else {
            // SAFETY: non-null and NUL-terminated per the contract.
            match unsafe { CStr::from_ptr(host_bdf) }.to_str() {
                Ok(s) => Some(s),
                Err(_) => return PVDMA_ERR_INVALID_ARGUMENT,
            }
        };
        match vm.add_endpoint(rid, bdf) {
            Ok(()) => PVDMA_OK,
            Err(e) => result_of(&e),
        }
    })
}

/// Unregisters endpoint `rid`, detaching it first (UNMAP events, pins
/// released). `PVDMA_ERR_NOT_FOUND` when it is not registered.
///
/// # Safety
/// `vm` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_remove_endpoint(vm: *mut pvdma_vm, rid: u32) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        match vm.remove_endpoint(rid) {
            Ok(()) => PVDMA_OK,
            Err(e) => result_of(&e),
        }
    })
}
