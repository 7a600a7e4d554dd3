// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The one panic boundary of the C API.
//!
//! **A panic inside pvdma aborts the process, on purpose, in every build.**
//!
//! Every export runs its body through [`ffi_boundary!`] (that is,
//! [`boundary`]), which turns a panic into `std::process::abort()` after
//! logging it. Nothing answers a panic with an error code:
//!
//! - A panic means one of the library's own invariants broke (pvdma
//!   returns errors for everything a guest or the VMM can get wrong). The
//!   state it broke in is what hands host pointers to devices and keeps
//!   guest pages pinned; carrying on translating DMA from it could let a
//!   device reach memory the guest never mapped. Stopping the VM is the
//!   safe failure for a security boundary, and it is what QEMU itself does
//!   on an internal bug (`g_assert`, `abort()`).
//! - The release profile is `panic = "abort"` (the workspace `Cargo.toml`)
//!   so that no unwinding machinery (landing pads for every drop) sits on
//!   the translate path; there `catch_unwind` cannot catch anything and
//!   the runtime aborts after the panic hook printed the message. The test
//!   and bench profiles always unwind (cargo ignores `panic` for them):
//!   there [`boundary`] catches the panic and aborts itself, so a test of
//!   an export sees the same outcome as QEMU would (the unit test
//!   `a_panic_at_the_boundary_aborts_the_process` checks it in a child
//!   process).
//! - A panic can never unwind into C either way (`extern "C"` functions do
//!   not unwind since Rust 1.81; this boundary says so explicitly).
//!
//! `PVDMA_ERR_PANIC` (and `PVDMA_S_INTERNAL` from `pvdma_vm_submit`) keep
//! their values and mean "internal error": a call that found an inconsistency
//! it can report without panicking answers them (e.g. a translation whose
//! fragment count broke its own bound), as does a NULL handle where the
//! return type has no other way to say so.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs an export's `body`; a panic in it aborts the process (see the
/// module documentation). `return` inside `body` returns from the export.
#[inline(always)]
pub(crate) fn boundary<R>(body: impl FnOnce() -> R) -> R {
    // AssertUnwindSafe: nothing observes the state after a panic, since
    // the process aborts.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(payload) => abort_after_panic(payload.as_ref()),
    }
}

#[cold]
#[inline(never)]
fn abort_after_panic(payload: &(dyn Any + Send)) -> ! {
    let msg = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    log::error!("pvdma: internal error (panic) in a C API call: {msg}; aborting");
    std::process::abort()
}

/// Runs `$body` (a block evaluating to the export's return value) inside
/// the one panic boundary, [`boundary`]. `return` inside the body returns
/// from the boundary closure, i.e. from the export.
macro_rules! ffi_boundary {
    ($body:block) => {
        $crate::panic::boundary(|| $body)
    };
}
