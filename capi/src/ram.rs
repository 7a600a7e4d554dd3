// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM regions.

use crate::prelude::*;

/// Adds a guest RAM region: guest-physical `[gpa, gpa + size)` is host
/// memory at `hva`. `PVDMA_ERR_RAM` when the region is malformed or
/// overlaps another.
///
/// # Safety
/// `vm` is NULL or a live handle. `[hva, hva + size)` is mapped, readable
/// and writable host memory that stays mapped until the region is removed
/// with `pvdma_vm_remove_ram` or the VM is freed: translations hand out
/// pointers into it and requests are read from and written back to it.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_add_ram(
    vm: *mut pvdma_vm,
    gpa: u64,
    size: u64,
    hva: *mut c_void,
) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        if hva.is_null() {
            return PVDMA_ERR_NULL_ARGUMENT;
        }
        // SAFETY: forwarded from this function's contract on hva and size.
        match unsafe { vm.add_ram_region(gpa, size, hva as usize) } {
            Ok(()) => PVDMA_OK,
            Err(e) => result_of(&e),
        }
    })
}

/// Removes the guest RAM region `[gpa, gpa + size)`. Mappings with a page
/// in it are torn down first (UNMAP events, pins released); their number
/// is stored in `*torn_down` when it is not NULL. A VMM that would rather
/// refuse the removal asks `pvdma_vm_ram_pinned` first.
///
/// # Safety
/// `vm` is NULL or a live handle; `torn_down` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_remove_ram(
    vm: *mut pvdma_vm,
    gpa: u64,
    size: u64,
    torn_down: *mut u64,
) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        match vm.remove_ram_region(gpa, size) {
            Ok(n) => {
                if !torn_down.is_null() {
                    // SAFETY: non-null and valid for writing per the contract.
                    unsafe { torn_down.write(n as u64) };
                }
                PVDMA_OK
            }
            Err(e) => result_of(&e),
        }
    })
}

/// Whether any page of guest-physical `[gpa, gpa + len)` is pinned by a
/// mapping (the VMM then refuses discard, ballooning or unplug of it).
/// false for NULL.
///
/// # Safety
/// `vm` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_ram_pinned(vm: *const pvdma_vm, gpa: u64, len: u64) -> bool {
    // A panic answers "pinned": the caller then keeps the memory.
    ffi_boundary!({
        let vm = try_vm!(vm, false);
        vm.ram_range_pinned(gpa, len)
    })
}
