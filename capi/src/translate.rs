// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Translation: device DMA to host memory, and IOMMU lookups.

use crate::prelude::*;

/// A device access reads memory.
pub const PVDMA_ACCESS_READ: u32 = 1;
/// A device access writes memory.
pub const PVDMA_ACCESS_WRITE: u32 = 2;
/// A device access reads and writes memory (atomics).
pub const PVDMA_ACCESS_RW: u32 = 3;

/// One piece of a translated range: `len` bytes at host address `base`,
/// which is guest-physical `gpa`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pvdma_iovec {
    /// Host address of the first byte.
    pub base: *mut c_void,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl From<&Fragment> for pvdma_iovec {
    fn from(f: &Fragment) -> Self {
        pvdma_iovec {
            base: f.hva as *mut c_void,
            gpa: f.gpa,
            len: f.len,
        }
    }
}

/// Why a device access was refused (`pvdma_fault.reason`).
pub const PVDMA_FAULT_UNMAPPED: u32 = 1;
/// A mapping covers the address without the access's permission.
pub const PVDMA_FAULT_PERMISSION: u32 = 2;
/// The endpoint is not attached and bypass is off.
pub const PVDMA_FAULT_BLOCKED: u32 = 3;
/// The address (or its translation) is outside guest RAM.
pub const PVDMA_FAULT_OUTSIDE_RAM: u32 = 4;
/// The requester is not an endpoint behind this pvdma.
pub const PVDMA_FAULT_NO_DEVICE: u32 = 5;
/// The range wraps the 64-bit address space.
pub const PVDMA_FAULT_OVERFLOW: u32 = 6;

pub(crate) fn fault_reason_from_raw(raw: u32) -> Option<FaultReason> {
    Some(match raw {
        PVDMA_FAULT_UNMAPPED => FaultReason::Unmapped,
        PVDMA_FAULT_PERMISSION => FaultReason::Permission,
        PVDMA_FAULT_BLOCKED => FaultReason::Blocked,
        PVDMA_FAULT_OUTSIDE_RAM => FaultReason::OutsideRam,
        PVDMA_FAULT_NO_DEVICE => FaultReason::NoDevice,
        PVDMA_FAULT_OVERFLOW => FaultReason::Overflow,
        _ => return None,
    })
}

/// What a refused translation reports: the first address refused and why
/// (`PVDMA_FAULT_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pvdma_translate_fault {
    /// First IOVA that could not be translated.
    pub iova: u64,
    /// `PVDMA_FAULT_*`.
    pub reason: u32,
}

impl From<&TranslateFault> for pvdma_translate_fault {
    fn from(f: &TranslateFault) -> Self {
        pvdma_translate_fault {
            iova: f.iova,
            reason: f.reason as u32,
        }
    }
}

/// Fragments up to which `pvdma_vm_translate` needs no heap allocation.
const STACK_FRAGMENTS: usize = 32;

/// Translates device `rid`'s access (`PVDMA_ACCESS_*`) to IOVA range
/// `[iova, iova + len)` into host memory pieces, as the device's DMA would
/// see it (unattached endpoints bypass to guest RAM or are blocked, per the
/// configuration). Counted in the statistics.
///
/// - `PVDMA_OK`: `iov[0..*count]` hold the pieces, in order.
/// - `PVDMA_ERR_BUFFER_TOO_SMALL`: the range needs more than `iov_len`
///   pieces; the first `iov_len` are written and `*count` is the number
///   needed. `iov` may be NULL when `iov_len` is 0 (a size query).
/// - `PVDMA_ERR_TRANSLATION_FAULT`: refused and recorded in the fault log;
///   `*fault` (when not NULL) says where and why; `*count` is not written.
/// - `PVDMA_ERR_INVALID_ARGUMENT`: `access` is not 1..=3.
///
/// The host pointers stay valid while the mapping exists and its RAM
/// region is registered.
///
/// # Safety
/// `vm` is NULL or a live handle; `iov` is valid for writing `iov_len`
/// entries (or `iov_len` is 0); `count` and `fault` are NULL or valid for
/// writing.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // the C signature QEMU's glue calls
pub unsafe extern "C" fn pvdma_vm_translate(
    vm: *mut pvdma_vm,
    rid: u32,
    iova: u64,
    len: u64,
    access: u32,
    iov: *mut pvdma_iovec,
    iov_len: usize,
    count: *mut usize,
    fault: *mut pvdma_translate_fault,
) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        require_out!(count);
        if iov.is_null() && iov_len > 0 {
            return PVDMA_ERR_NULL_ARGUMENT;
        }
        let Some(access) = Access::from_raw(access) else {
            return PVDMA_ERR_INVALID_ARGUMENT;
        };
        // Fragments never exceed the pages the range touches plus the RAM
        // regions it may cross, so a huge iov_len costs no huge allocation.
        let pages = ((iova & PAGE_MASK).saturating_add(len) >> PAGE_SHIFT).saturating_add(1);
        let regions = vm.with_ram(|ram| ram.regions().len()) as u64;
        let bound = usize::try_from(pages.saturating_add(regions)).unwrap_or(usize::MAX);
        const ZERO: Fragment = Fragment {
            hva: 0,
            gpa: 0,
            len: 0,
        };
        let mut stack = [ZERO; STACK_FRAGMENTS];
        let mut heap = Vec::new();
        let cap = iov_len.min(bound);
        let frags: &mut [Fragment] = if cap <= STACK_FRAGMENTS {
            &mut stack[..cap]
        } else {
            heap.resize(cap, ZERO);
            &mut heap
        };
        let needed = match vm.translate(rid, iova, len, access, frags) {
            Ok(n) => n,
            Err(f) => {
                if !fault.is_null() {
                    // SAFETY: non-null and valid for writing per the contract.
                    unsafe { fault.write((&f).into()) };
                }
                return PVDMA_ERR_TRANSLATION_FAULT;
            }
        };
        // The bound above is an upper bound, so `needed > cap` means
        // `cap == iov_len`: the caller's array is what is too small.
        let stored = needed.min(frags.len());
        // SAFETY: stored <= cap <= iov_len entries, `iov` valid for iov_len.
        unsafe { write_array(iov, stored, frags[..stored].iter().map(pvdma_iovec::from)) };
        // SAFETY: non-null (checked) and valid for writing.
        unsafe { count.write(needed) };
        if needed > iov_len {
            PVDMA_ERR_BUFFER_TOO_SMALL
        } else if needed > stored {
            // Only if the fragment bound were wrong: never report a short
            // translation as complete.
            PVDMA_ERR_PANIC
        } else {
            PVDMA_OK
        }
    })
}

/// `pvdma_lookup.flags`: the endpoint is not attached and bypasses
/// translation (identity).
pub const PVDMA_LOOKUP_BYPASS: u32 = 1 << 0;

/// What one IOVA translates to (QEMU's IOMMU translate).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pvdma_lookup {
    /// Guest-physical address of the IOVA's byte.
    pub gpa: u64,
    /// Bytes from there that translate contiguously with the same
    /// permissions (at least 1; to the end of the 4 KiB page in bypass).
    pub run: u64,
    /// Permissions there: bit 0 READ, bit 1 WRITE (`PVDMA_FLAG_READ`/`WRITE`).
    pub perms: u32,
    /// `PVDMA_LOOKUP_BYPASS`.
    pub flags: u32,
}

/// Translates the one address `iova` of device `rid` (QEMU's IOMMU
/// translate). With `access` 0 this only looks: nothing is counted or
/// logged and `perms` says what is allowed. With `access` 1..=3 it is a
/// device access: counted, refused without the permission, and a refusal
/// is recorded in the fault log. Returns the guest-physical address, not a
/// host pointer (RAM is not consulted).
///
/// `PVDMA_ERR_TRANSLATION_FAULT` when refused (unmapped, permission,
/// blocked, unknown requester); `PVDMA_ERR_INVALID_ARGUMENT` for `access`
/// above 3. `*out` is written only on `PVDMA_OK`.
///
/// # Safety
/// `vm` is NULL or a live handle; `out` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_lookup(
    vm: *const pvdma_vm,
    rid: u32,
    iova: u64,
    access: u32,
    out: *mut pvdma_lookup,
) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        require_out!(out);
        let access = match access {
            0 => None,
            a => match Access::from_raw(a) {
                Some(a) => Some(a),
                None => return PVDMA_ERR_INVALID_ARGUMENT,
            },
        };
        match vm.lookup(rid, iova, access) {
            Ok(l) => {
                let v = pvdma_lookup {
                    gpa: l.gpa,
                    run: l.run,
                    perms: u32::from(l.perms.bits()),
                    flags: if l.bypass { PVDMA_LOOKUP_BYPASS } else { 0 },
                };
                // SAFETY: non-null (checked) and valid for writing.
                unsafe { out.write(v) };
                PVDMA_OK
            }
            Err(_) => PVDMA_ERR_TRANSLATION_FAULT,
        }
    })
}
