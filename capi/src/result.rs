// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The one result type of the C API, its one description table
//! (`pvdma_strerror`), and the names of guest statuses and the version.

use std::ffi::{c_char, CStr};

use pvdma::Status;

/// Result of a pvdma C API call, the `pvdma_vm_*` and the `pvdma_vq_*`
/// ones alike. The values are stable: new codes are only ever added.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum pvdma_result {
    /// Success.
    PVDMA_OK = 0,
    /// A required pointer argument is NULL.
    PVDMA_ERR_NULL_ARGUMENT = 1,
    /// An argument is out of range (configuration, requester ID, access;
    /// a virtqueue's size, alignment, packed ring or head).
    PVDMA_ERR_INVALID_ARGUMENT = 2,
    /// The endpoint is already registered.
    PVDMA_ERR_EXISTS = 3,
    /// No such endpoint.
    PVDMA_ERR_NOT_FOUND = 4,
    /// A guest RAM region could not be added or removed.
    PVDMA_ERR_RAM = 5,
    /// The output buffer is too small; the size needed was reported (for
    /// `pvdma_vq_pop`: the counts needed, and the chain stays on the ring).
    PVDMA_ERR_BUFFER_TOO_SMALL = 6,
    /// The device access (or a virtqueue's ring or buffer access) was
    /// refused, and recorded in the fault log.
    PVDMA_ERR_TRANSLATION_FAULT = 7,
    /// A state was refused: the migration state (the VM was left reset),
    /// or a virtqueue ring the driver corrupted (e.g. avail idx too far
    /// ahead: the device should set NEEDS_RESET).
    PVDMA_ERR_BAD_STATE = 8,
    /// An internal error: the library found an inconsistency of its own.
    /// (A panic is not answered: it aborts the process, see the panic
    /// boundary in `capi/src/panic.rs`.)
    PVDMA_ERR_PANIC = 9,
    /// `pvdma_vq_pop`: no chain available (not an error).
    PVDMA_VQ_EMPTY = 16,
    /// `pvdma_vq_pop`: the chain at `chain->head` is malformed (loop, bad
    /// index, nested indirect, lengths past u32, readable after writable,
    /// more fragments than a chain may have); it is consumed: push it back
    /// with length 0.
    PVDMA_VQ_ERR_BAD_CHAIN = 17,
}

use pvdma_result::*;

/// The result type of the `pvdma_vq_*` calls: `pvdma_result` under its
/// virtqueue name.
pub type pvdma_vq_result = pvdma_result;

/// `PVDMA_OK` under its virtqueue name.
pub const PVDMA_VQ_OK: u32 = 0;
/// `PVDMA_ERR_NULL_ARGUMENT` under its virtqueue name.
pub const PVDMA_VQ_ERR_NULL_ARGUMENT: u32 = 1;
/// `PVDMA_ERR_INVALID_ARGUMENT` under its virtqueue name.
pub const PVDMA_VQ_ERR_INVALID_ARGUMENT: u32 = 2;
/// `PVDMA_ERR_NOT_FOUND` under its virtqueue name.
pub const PVDMA_VQ_ERR_NOT_FOUND: u32 = 4;
/// `PVDMA_ERR_BUFFER_TOO_SMALL` under its virtqueue name.
pub const PVDMA_VQ_ERR_BUFFER_TOO_SMALL: u32 = 6;
/// `PVDMA_ERR_TRANSLATION_FAULT` under its virtqueue name.
pub const PVDMA_VQ_ERR_TRANSLATION_FAULT: u32 = 7;
/// `PVDMA_ERR_BAD_STATE` under its virtqueue name.
pub const PVDMA_VQ_ERR_BAD_STATE: u32 = 8;
/// `PVDMA_ERR_PANIC` under its virtqueue name.
pub const PVDMA_VQ_ERR_PANIC: u32 = 9;

// The aliases are literals (cbindgen writes them as #defines); they must
// stay the values of the codes they name.
const _: () = {
    assert!(PVDMA_VQ_OK == PVDMA_OK as u32);
    assert!(PVDMA_VQ_ERR_NULL_ARGUMENT == PVDMA_ERR_NULL_ARGUMENT as u32);
    assert!(PVDMA_VQ_ERR_INVALID_ARGUMENT == PVDMA_ERR_INVALID_ARGUMENT as u32);
    assert!(PVDMA_VQ_ERR_NOT_FOUND == PVDMA_ERR_NOT_FOUND as u32);
    assert!(PVDMA_VQ_ERR_BUFFER_TOO_SMALL == PVDMA_ERR_BUFFER_TOO_SMALL as u32);
    assert!(PVDMA_VQ_ERR_TRANSLATION_FAULT == PVDMA_ERR_TRANSLATION_FAULT as u32);
    assert!(PVDMA_VQ_ERR_BAD_STATE == PVDMA_ERR_BAD_STATE as u32);
    assert!(PVDMA_VQ_ERR_PANIC == PVDMA_ERR_PANIC as u32);
};

/// The C result of a `Vm` error.
pub(crate) fn result_of(e: &pvdma::Error) -> pvdma_result {
    match e {
        pvdma::Error::Config(_) => PVDMA_ERR_INVALID_ARGUMENT,
        pvdma::Error::EndpointExists(_) => PVDMA_ERR_EXISTS,
        pvdma::Error::NoEndpoint(_) => PVDMA_ERR_NOT_FOUND,
        pvdma::Error::Ram(_) => PVDMA_ERR_RAM,
        pvdma::Error::State(_) => PVDMA_ERR_BAD_STATE,
    }
}

/// What `pvdma_strerror` says for a value no call returns.
const UNKNOWN: &CStr = c"unknown pvdma_result";

/// The one description table: every `pvdma_result`, or None.
fn describe(result: u32) -> Option<&'static CStr> {
    Some(match result {
        0 => c"success",
        1 => c"a required pointer argument is NULL",
        2 => c"an argument is out of range",
        3 => c"the endpoint already exists",
        4 => c"no such endpoint",
        5 => c"the guest RAM region operation failed",
        6 => c"the output buffer is too small",
        7 => c"the DMA access was refused",
        8 => c"the state was refused (migration state: the VM was reset; virtqueue: the driver corrupted the ring)",
        9 => c"internal error",
        16 => c"no chain available",
        17 => c"malformed descriptor chain",
        _ => return None,
    })
}

/// A static description of `result`, never NULL (also for values this
/// build does not know). Takes the raw value so that any `uint32_t` is safe
/// to pass.
#[no_mangle]
pub extern "C" fn pvdma_strerror(result: u32) -> *const c_char {
    describe(result).unwrap_or(UNKNOWN).as_ptr()
}

/// `pvdma_strerror` for the results a `pvdma_vq_*` call returns (0, 1, 2,
/// 4, 6, 7, 8, 9, 16, 17); any other value gets the description of an
/// unknown result. Static, never NULL.
#[no_mangle]
pub extern "C" fn pvdma_vq_strerror(result: u32) -> *const c_char {
    let vq_result = !matches!(result, 3 | 5);
    match describe(result) {
        Some(s) if vq_result => s.as_ptr(),
        _ => UNKNOWN.as_ptr(),
    }
}

/// The spec's name of guest status `status` (`PVDMA_S_*`): "OK", "INVAL",
/// ..., "INTERNAL", or "UNKNOWN". Static, never NULL.
#[no_mangle]
pub extern "C" fn pvdma_guest_status_name(status: u32) -> *const c_char {
    Status::from_raw(status)
        .map_or(c"UNKNOWN", Status::c_name)
        .as_ptr()
}

const VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("the package version contains a NUL"),
    };

/// The library version ("MAJOR.MINOR.PATCH"), static.
#[no_mangle]
pub extern "C" fn pvdma_version() -> *const c_char {
    VERSION.as_ptr()
}
