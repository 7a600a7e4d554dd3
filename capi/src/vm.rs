// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VM handle and its configuration.

use crate::prelude::*;

/// A VM as pvdma sees it: guest RAM, endpoints and their translations.
/// Opaque; made by `pvdma_vm_new`, freed by `pvdma_vm_free`.
pub struct pvdma_vm {
    _private: [u8; 0],
}

/// `pvdma_config.pin_mode`: pinning only counts pages.
pub const PVDMA_PIN_NONE: u32 = 0;
/// `pvdma_config.pin_mode`: pinning also mlocks pages.
pub const PVDMA_PIN_MLOCK: u32 = 1;

/// Per-VM configuration, fixed at creation. Start from
/// `pvdma_config_default`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pvdma_config {
    /// IOVA width, 21..=57 bits (IOVA_BITS register).
    pub iova_bits: u32,
    /// Most segments one MAP may carry, 252..=65536 (MAX_SEGS register).
    pub max_segs: u32,
    /// Pin limit in bytes; UINT64_MAX: unlimited.
    pub pin_limit: u64,
    /// Host memory the mappings may take (page tables and mapping
    /// records) in bytes; UINT64_MAX: unlimited. A MAP that would pass it
    /// gets QUOTA.
    pub mem_limit: u64,
    /// `PVDMA_PIN_NONE` or `PVDMA_PIN_MLOCK`.
    pub pin_mode: u32,
    /// Unattached endpoints bypass translation (else their DMA is blocked).
    pub bypass: bool,
    /// MAP without FIXED is allowed (the host picks the IOVA).
    pub host_iova: bool,
    /// The UNMAP_LIST extension (`PVDMA_OP_UNMAP_LIST`,
    /// `PVDMA_FEATURE_UNMAP_LIST`) is offered; when false op 6 is an
    /// unknown op (INVAL). It sits in what was padding after `host_iova`,
    /// so the struct's size and other offsets are as before, and a caller
    /// that zeroes the struct instead of calling `pvdma_config_default`
    /// gets the extension off, the behaviour from before it existed.
    pub unmap_list: bool,
    /// Fault records kept, 1..=65536.
    pub fault_log_len: u32,
    /// Request queues offered (the QUEUES register, ABI section 3.2),
    /// 0..=`PVDMA_MAX_QUEUES`; 0 turns the QUEUE extension off (FEATURES
    /// bit 4 clear, ops 7 and 8 unknown). It sits in what was padding at
    /// the end, so the struct's size is as before, and a caller that
    /// zeroes the struct gets the extension off.
    pub queues: u32,
}

impl pvdma_config {
    pub(crate) fn to_vm_config(self) -> Option<VmConfig> {
        let pin_mode = match self.pin_mode {
            PVDMA_PIN_NONE => PinMode::None,
            PVDMA_PIN_MLOCK => PinMode::Mlock,
            _ => return None,
        };
        Some(VmConfig {
            iova_bits: self.iova_bits,
            max_segs: self.max_segs,
            pin_limit: self.pin_limit,
            mem_limit: self.mem_limit,
            pin_mode,
            bypass: self.bypass,
            host_iova: self.host_iova,
            unmap_list: self.unmap_list,
            fault_log_len: usize::try_from(self.fault_log_len).ok()?,
            queues: self.queues,
        })
    }

    pub(crate) fn from_vm_config(c: &VmConfig) -> pvdma_config {
        pvdma_config {
            iova_bits: c.iova_bits,
            max_segs: c.max_segs,
            pin_limit: c.pin_limit,
            mem_limit: c.mem_limit,
            pin_mode: match c.pin_mode {
                PinMode::None => PVDMA_PIN_NONE,
                PinMode::Mlock => PVDMA_PIN_MLOCK,
            },
            bypass: c.bypass,
            host_iova: c.host_iova,
            unmap_list: c.unmap_list,
            fault_log_len: u32::try_from(c.fault_log_len).unwrap_or(u32::MAX),
            queues: c.queues,
        }
    }
}

/// Fills `*out` with the default configuration (48 IOVA bits, 512
/// segments, no pin or memory limit, no mlock, bypass, host IOVA and
/// UNMAP_LIST on, 64 fault records, 8 request queues). Does nothing when
/// `out` is NULL.
///
/// # Safety
/// `out` is NULL or valid for writing a `pvdma_config`.
#[no_mangle]
pub unsafe extern "C" fn pvdma_config_default(out: *mut pvdma_config) {
    ffi_boundary!({
        if !out.is_null() {
            let cfg = pvdma_config::from_vm_config(&VmConfig::default());
            // SAFETY: non-null and valid for writing per the contract.
            unsafe { out.write(cfg) };
        }
    })
}

/// Creates a VM with no RAM and no endpoints and stores its handle in
/// `*out`. `PVDMA_ERR_INVALID_ARGUMENT` when a configuration value is out
/// of range.
///
/// # Safety
/// `cfg` is NULL or points to a `pvdma_config`; `out` is NULL or valid for
/// writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_new(
    cfg: *const pvdma_config,
    out: *mut *mut pvdma_vm,
) -> pvdma_result {
    ffi_boundary!({
        let cfg = try_ref!(cfg);
        require_out!(out);
        let Some(cfg) = cfg.to_vm_config() else {
            return PVDMA_ERR_INVALID_ARGUMENT;
        };
        match Vm::new(cfg) {
            Ok(vm) => {
                let handle = Box::into_raw(Box::new(vm)).cast::<pvdma_vm>();
                // SAFETY: non-null (checked) and valid for writing.
                unsafe { out.write(handle) };
                PVDMA_OK
            }
            Err(e) => result_of(&e),
        }
    })
}

/// Frees a VM: every endpoint is detached (pins released, UNMAP events
/// sent to the notifier) first. NULL is ignored.
///
/// # Safety
/// `vm` is NULL or a handle from `pvdma_vm_new` not yet freed, and no other
/// thread uses it during or after this call.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_free(vm: *mut pvdma_vm) {
    ffi_boundary!({
        if !vm.is_null() {
            // SAFETY: the handle came from Box::into_raw in pvdma_vm_new and
            // the caller gives up every other use of it.
            drop(unsafe { Box::from_raw(vm.cast::<Vm>()) });
        }
    })
}

/// The FEATURES register bits the configuration implies: HOST_IOVA,
/// BYPASS, UNMAP_LIST and QUEUE (`PVDMA_FEATURE_*`). The transport adds HYPERCALL itself. 0 for
/// NULL.
///
/// # Safety
/// `vm` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_features(vm: *const pvdma_vm) -> u64 {
    ffi_boundary!({
        let vm = try_vm!(vm, 0);
        vm.config().features()
    })
}

/// The PAGE_SIZES register (bit n: mappings of 2^n bytes). 0 for NULL.
///
/// # Safety
/// `vm` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_page_sizes(vm: *const pvdma_vm) -> u64 {
    ffi_boundary!({
        let vm = try_vm!(vm, 0);
        vm.config().page_sizes()
    })
}
