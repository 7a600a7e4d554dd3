// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Migration: the VM's mappings as a byte string and back.

use crate::prelude::*;

/// Saves the migration state (every endpoint's attach state and mappings)
/// into `buf`. `PVDMA_OK`: `*needed` = bytes written.
/// `PVDMA_ERR_BUFFER_TOO_SMALL`: nothing written, `*needed` = bytes
/// required (`buf` may be NULL when `len` is 0). The state can grow between
/// two calls while the guest runs: save with the VM stopped, or retry.
///
/// # Safety
/// `vm` is NULL or a live handle; `buf` is valid for writing `len` bytes
/// (or `len` is 0); `needed` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_state_save(
    vm: *const pvdma_vm,
    buf: *mut u8,
    len: usize,
    needed: *mut usize,
) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        require_out!(needed);
        if buf.is_null() && len > 0 {
            return PVDMA_ERR_NULL_ARGUMENT;
        }
        let blob = vm.export_state();
        // SAFETY: non-null (checked) and valid for writing.
        unsafe { needed.write(blob.len()) };
        if blob.len() > len {
            return PVDMA_ERR_BUFFER_TOO_SMALL;
        }
        // SAFETY: blob.len() <= len bytes, `buf` valid for len, and a
        // fresh Vec cannot overlap the caller's buffer.
        unsafe { ptr::copy_nonoverlapping(blob.as_ptr(), buf, blob.len()) };
        PVDMA_OK
    })
}

/// Loads migration state saved by `pvdma_vm_state_save` on the source. The
/// destination's RAM regions and endpoints must already be registered.
/// The VM is reset first; `PVDMA_ERR_BAD_STATE` when the state is damaged,
/// from another configuration, or names an unknown endpoint, and the VM
/// is then left reset.
///
/// # Safety
/// `vm` is NULL or a live handle; `buf` is NULL or valid for reading `len`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_state_load(
    vm: *mut pvdma_vm,
    buf: *const u8,
    len: usize,
) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        if buf.is_null() {
            return PVDMA_ERR_NULL_ARGUMENT;
        }
        // SAFETY: non-null and valid for reading len bytes per the contract.
        let blob = unsafe { std::slice::from_raw_parts(buf, len) };
        match vm.import_state(blob) {
            Ok(()) => PVDMA_OK,
            // Every refusal (including an unknown endpoint) is bad state.
            // Vm::import_state returns before resetting when the blob does
            // not decode or names another IOVA width; reset here so the
            // contract holds for every refusal: a half-migrated VM never
            // runs, whatever was wrong.
            Err(_) => {
                vm.reset();
                PVDMA_ERR_BAD_STATE
            }
        }
    })
}
