// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Statistics and listings (`query-pvdma`).

use crate::prelude::*;

/// The counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pvdma_stats {
    /// `requests[op][status]`: op 1..=5 (`PVDMA_OP_*`, 0 counts unknown
    /// ops), status index 0..=11 as `PVDMA_S_*` and 12 for
    /// `PVDMA_S_INTERNAL`. UNMAP_LIST (op 6) has no row here, which keeps
    /// this struct's layout; `pvdma_vm_request_counts` counts it.
    pub requests: [[u64; 13]; 6],
    /// Live mappings over all endpoints.
    pub mappings: u64,
    /// Distinct pinned guest pages.
    pub pinned_pages: u64,
    /// The pin limit in bytes (UINT64_MAX: none).
    pub pin_limit: u64,
    /// Bytes of host memory the mappings take (page tables, records).
    pub mem_used: u64,
    /// The limit on `mem_used` (UINT64_MAX: none).
    pub mem_limit: u64,
    /// Translations performed (`pvdma_vm_translate`, and `pvdma_vm_lookup`
    /// with an access).
    pub translations: u64,
    /// Refused device accesses since reset.
    pub faults: u64,
    /// Drains of one queue that took at least one entry.
    pub queue_drains: u64,
    /// Queued entries taken (applied or failed).
    pub queue_entries: u64,
    /// Queued entries that failed.
    pub queue_failed: u64,
    /// Rule-2 drains: a device access about to be refused while queued
    /// entries were pending.
    pub miss_drains: u64,
}

/// Fills `*out` with the counters.
///
/// # Safety
/// `vm` is NULL or a live handle; `out` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_stats(
    vm: *const pvdma_vm,
    out: *mut pvdma_stats,
) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        require_out!(out);
        let s = vm.stats();
        let mut requests = [[0; 13]; 6];
        requests.copy_from_slice(&s.requests[..6]);
        let v = pvdma_stats {
            requests,
            mappings: s.mappings,
            pinned_pages: s.pinned_pages,
            pin_limit: vm.pins().limit_bytes(),
            mem_used: s.mem_used,
            mem_limit: vm.config().mem_limit,
            translations: s.translations,
            faults: s.faults,
            queue_drains: s.queue_drains,
            queue_entries: s.queue_entries,
            queue_failed: s.queue_failed,
            miss_drains: s.miss_drains,
        };
        // SAFETY: non-null (checked) and valid for writing.
        unsafe { out.write(v) };
        PVDMA_OK
    })
}

/// Requests by op and by transport, for request rates (e.g. requests per
/// I/O): every request submitted is counted once in the op totals and
/// once in the transport totals, whatever its status.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pvdma_request_counts {
    /// QUERY requests.
    pub query: u64,
    /// ATTACH requests.
    pub attach: u64,
    /// DETACH requests.
    pub detach: u64,
    /// MAP requests.
    pub map: u64,
    /// UNMAP requests.
    pub unmap: u64,
    /// UNMAP_LIST requests (with the extension on; without it op 6 is
    /// counted in `other`).
    pub unmap_list: u64,
    /// Requests with an unknown op, or whose header was not in guest RAM.
    pub other: u64,
    /// Requests through `pvdma_vm_submit_via` with
    /// `PVDMA_TRANSPORT_DOORBELL`.
    pub doorbell: u64,
    /// Requests through `pvdma_vm_submit_via` with
    /// `PVDMA_TRANSPORT_HYPERCALL`.
    pub hypercall: u64,
    /// Requests by any other path (`pvdma_vm_submit`, an unknown
    /// transport). Migration import re-creates mappings without counting.
    pub other_transport: u64,
}

/// Fills `*out` with the request counts. They start at 0 when the VM is
/// created and are not reset by `pvdma_vm_reset` or migration.
///
/// # Safety
/// `vm` is NULL or a live handle; `out` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_request_counts(
    vm: *const pvdma_vm,
    out: *mut pvdma_request_counts,
) -> pvdma_result {
    ffi_boundary!({
        let vm = try_vm!(vm);
        require_out!(out);
        let s = vm.stats();
        let total = |op: usize| s.requests[op].iter().sum::<u64>();
        let v = pvdma_request_counts {
            query: total(pvdma::abi::Op::Query.index()),
            attach: total(pvdma::abi::Op::Attach.index()),
            detach: total(pvdma::abi::Op::Detach.index()),
            map: total(pvdma::abi::Op::Map.index()),
            unmap: total(pvdma::abi::Op::Unmap.index()),
            unmap_list: total(pvdma::abi::Op::UnmapList.index()),
            other: total(0),
            doorbell: s.transports[pvdma::Transport::Doorbell as usize],
            hypercall: s.transports[pvdma::Transport::Hypercall as usize],
            other_transport: s.transports[pvdma::Transport::Other as usize],
        };
        // SAFETY: non-null (checked) and valid for writing.
        unsafe { out.write(v) };
        PVDMA_OK
    })
}

/// One endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pvdma_endpoint_info {
    /// Requester ID.
    pub requester: u32,
    /// Translation is on.
    pub attached: bool,
    /// An assigned host device.
    pub passthrough: bool,
    /// Live mappings.
    pub mappings: u64,
    /// Sum of the mappings' lengths (bytes the guest mapped).
    pub mapped_bytes: u64,
}

/// Fills `out` with the first `min(n, total)` endpoints by requester ID and
/// returns the total (so `n` 0 is a size query). 0 for a NULL handle;
/// nothing is copied when `out` is NULL.
///
/// # Safety
/// `vm` is NULL or a live handle; `out` is NULL or valid for writing `n`
/// entries.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_endpoints(
    vm: *const pvdma_vm,
    out: *mut pvdma_endpoint_info,
    n: usize,
) -> usize {
    ffi_boundary!({
        let vm = try_vm!(vm, 0);
        let infos: Vec<pvdma_endpoint_info> = vm
            .endpoints()
            .into_iter()
            .filter_map(|rid| {
                // Removed since the listing: skip it.
                let ep = vm.endpoint(rid)?;
                let maps = vm.mappings(rid);
                Some(pvdma_endpoint_info {
                    requester: rid,
                    attached: ep.is_attached(),
                    passthrough: ep.passthrough().is_some(),
                    mappings: maps.len() as u64,
                    mapped_bytes: maps.iter().map(|m| m.length).sum(),
                })
            })
            .collect();
        let n = if out.is_null() { 0 } else { n };
        // SAFETY: at most n entries, `out` valid for n.
        unsafe { write_array(out, n, infos.iter().copied()) };
        infos.len()
    })
}

/// One mapping.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pvdma_mapping_info {
    /// IOVA of the first byte.
    pub iova: u64,
    /// Sum of the segment lengths.
    pub length: u64,
    /// Bit 0 READ, bit 1 WRITE.
    pub perms: u32,
    /// Guest-physical segments.
    pub nr_segs: u32,
}

/// Fills `out` with the first `min(n, total)` mappings of endpoint `rid`
/// by IOVA and returns the total (0 when detached or unknown; `n` 0 is a
/// size query). Nothing is copied when `out` is NULL.
///
/// # Safety
/// `vm` is NULL or a live handle; `out` is NULL or valid for writing `n`
/// entries.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vm_mappings(
    vm: *const pvdma_vm,
    rid: u32,
    out: *mut pvdma_mapping_info,
    n: usize,
) -> usize {
    ffi_boundary!({
        let vm = try_vm!(vm, 0);
        let maps = vm.mappings(rid);
        let n = if out.is_null() { 0 } else { n };
        let infos = maps.iter().map(|m| pvdma_mapping_info {
            iova: m.iova,
            length: m.length,
            perms: u32::from(m.perms.bits()),
            nr_segs: u32::try_from(m.segs.len()).unwrap_or(u32::MAX),
        });
        // SAFETY: at most n entries, `out` valid for n.
        unsafe { write_array(out, n, infos) };
        maps.len()
    })
}
