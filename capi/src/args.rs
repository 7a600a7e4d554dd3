// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Arguments from C: handles and pointers borrowed for the call, NULL
//! checks that return from the export, and output arrays.
//!
//! The macros `return` from the closure of the export's
//! [`ffi_boundary!`](crate::panic), i.e. from the export.

/// Borrows a `*const T`/`*mut T` argument as `&T`, returning `$on_null`
/// (by default `PVDMA_ERR_NULL_ARGUMENT`) from the export when it is NULL.
/// Only for use inside [`ffi_boundary!`] of an export whose contract says
/// the pointer is NULL or valid for the call.
macro_rules! try_ref {
    ($ptr:expr) => {
        try_ref!($ptr, pvdma_result::PVDMA_ERR_NULL_ARGUMENT)
    };
    ($ptr:expr, ()) => {{
        let p = $ptr;
        // SAFETY: the export's contract: the pointer is NULL (checked by
        // as_ref) or points to a valid, initialised value for the call.
        match unsafe { p.as_ref() } {
            Some(r) => r,
            None => return,
        }
    }};
    ($ptr:expr, $on_null:expr) => {{
        let p = $ptr;
        // SAFETY: the export's contract: the pointer is NULL (checked by
        // as_ref) or points to a valid, initialised value for the call.
        match unsafe { p.as_ref() } {
            Some(r) => r,
            None => return $on_null,
        }
    }};
}

/// Borrows the VM behind a handle, returning `$on_null` when it is NULL.
macro_rules! try_vm {
    ($vm:expr) => {
        try_ref!(($vm).cast::<Vm>())
    };
    ($vm:expr, ()) => {
        try_ref!(($vm).cast::<Vm>(), ())
    };
    ($vm:expr, $on_null:expr) => {
        try_ref!(($vm).cast::<Vm>(), $on_null)
    };
}

/// Returns `PVDMA_ERR_NULL_ARGUMENT` from the export when an output
/// pointer is NULL.
macro_rules! require_out {
    ($($ptr:expr),+) => {
        $(if $ptr.is_null() {
            return pvdma_result::PVDMA_ERR_NULL_ARGUMENT;
        })+
    };
}

/// Writes `items` to `out[0..]`, at most `n` of them, with plain writes (the
/// array may be uninitialised).
///
/// # Safety
/// When `n > 0`, `out` is valid for writing `n` values of `T`.
pub(crate) unsafe fn write_array<T>(out: *mut T, n: usize, items: impl IntoIterator<Item = T>) {
    for (i, item) in items.into_iter().take(n).enumerate() {
        // SAFETY: i < n, and `out` is valid for n writes per the contract.
        unsafe { out.add(i).write(item) };
    }
}
