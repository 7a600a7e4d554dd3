// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The C API for virtqueues (`pvdma_vq_*`), for C device models.
//!
//! Same conventions as the rest of the C API: opaque handles, results from
//! the one `pvdma_result` (`pvdma_vq_result` is its other name; the
//! `PVDMA_VQ_*` names of 0..=9 are aliases, 16 and 17 are virtqueue-only),
//! NULL checks, every export inside the one panic boundary, output
//! parameters written only on success (and the needed counts on
//! `PVDMA_ERR_BUFFER_TOO_SMALL`).

use crate::prelude::*;

use pvdma::{QueueConfig, VirtQueue, VqError};

/// A virtqueue of one endpoint. Opaque; `pvdma_vq_open` / `pvdma_vq_close`.
pub struct pvdma_vq {
    _private: [u8; 0],
}

/// Where a split queue's rings are (IOVAs of the endpoint) and what was
/// negotiated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pvdma_vq_config {
    /// Descriptor table IOVA (16-byte aligned).
    pub desc: u64,
    /// Avail ring IOVA (2-byte aligned, not 0).
    pub avail: u64,
    /// Used ring IOVA (4-byte aligned).
    pub used: u64,
    /// Negotiated feature bits (EVENT_IDX bit 29, INDIRECT_DESC bit 28;
    /// RING_PACKED bit 34 is refused).
    pub features: u64,
    /// Queue size: a power of two, 1..=32768.
    pub size: u16,
}

/// What `pvdma_vq_pop` found.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pvdma_vq_chain {
    /// Head index, for `pvdma_vq_push`.
    pub head: u16,
    /// Readable (device reads) iovecs written, or needed.
    pub n_readable: usize,
    /// Writable (device writes) iovecs written, or needed.
    pub n_writable: usize,
    /// Bytes the device may read.
    pub readable_bytes: u64,
    /// Bytes the device may write.
    pub writable_bytes: u64,
}

/// Fragments up to which pop needs no heap allocation.
const STACK_FRAGMENTS: usize = 64;

macro_rules! try_queue {
    ($vq:expr) => {{
        // SAFETY: the export's contract: NULL or a live handle from
        // pvdma_vq_open, used by one thread at a time.
        match unsafe { ($vq).cast::<VirtQueue<'static>>().as_mut() } {
            Some(q) => q,
            None => return PVDMA_ERR_NULL_ARGUMENT,
        }
    }};
}

fn result_of(e: &VqError) -> pvdma_result {
    match e {
        VqError::Config(_) | VqError::PackedUnsupported | VqError::InvalidHead(_) => {
            PVDMA_ERR_INVALID_ARGUMENT
        }
        VqError::Fault(f) if f.reason == pvdma::FaultReason::NoDevice => PVDMA_ERR_NOT_FOUND,
        VqError::Fault(_) => PVDMA_ERR_TRANSLATION_FAULT,
        VqError::BadChain { .. } => PVDMA_VQ_ERR_BAD_CHAIN,
        VqError::Driver(_) => PVDMA_ERR_BAD_STATE,
        VqError::TooSmall { .. } => PVDMA_ERR_BUFFER_TOO_SMALL,
    }
}

/// Opens a split virtqueue of endpoint `rid` of `vm` and stores its handle
/// in `*out`. The endpoint need not be attached yet: its domain is looked
/// up on every call. `PVDMA_ERR_INVALID_ARGUMENT` for a bad size,
/// misaligned ring or packed ring; `PVDMA_ERR_NOT_FOUND` for an unknown
/// endpoint.
///
/// # Safety
/// `vm` is NULL or a live VM handle that outlives the queue; `cfg` is NULL
/// or valid; `out` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vq_open(
    vm: *const pvdma_vm,
    rid: u32,
    cfg: *const pvdma_vq_config,
    out: *mut *mut pvdma_vq,
) -> pvdma_vq_result {
    ffi_boundary!({
        // SAFETY: NULL or a live VM handle (a `Vm`) per the contract, which
        // also promises it outlives the queue: hence 'static.
        let Some(vm) = (unsafe { vm.cast::<Vm>().as_ref() }) else {
            return PVDMA_ERR_NULL_ARGUMENT;
        };
        // SAFETY: NULL or valid per the contract.
        let Some(cfg) = (unsafe { cfg.as_ref() }) else {
            return PVDMA_ERR_NULL_ARGUMENT;
        };
        if out.is_null() {
            return PVDMA_ERR_NULL_ARGUMENT;
        }
        if vm.endpoint(rid).is_none() {
            return PVDMA_ERR_NOT_FOUND;
        }
        let qcfg = QueueConfig {
            desc: cfg.desc,
            avail: cfg.avail,
            used: cfg.used,
            size: cfg.size,
            features: cfg.features,
        };
        match VirtQueue::open(vm, rid, qcfg) {
            Ok(q) => {
                let handle = Box::into_raw(Box::new(q)).cast::<pvdma_vq>();
                // SAFETY: non-null (checked) and valid for writing.
                unsafe { out.write(handle) };
                PVDMA_OK
            }
            Err(e) => result_of(&e),
        }
    })
}

/// Closes a queue. NULL is ignored.
///
/// # Safety
/// `vq` is NULL or a handle from `pvdma_vq_open` not yet closed, unused by
/// any other thread.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vq_close(vq: *mut pvdma_vq) {
    let _ = std::panic::catch_unwind(|| {
        if !vq.is_null() {
            // SAFETY: from Box::into_raw in pvdma_vq_open; the caller gives
            // up every other use of it.
            drop(unsafe { Box::from_raw(vq.cast::<VirtQueue<'static>>()) });
        }
    });
}

/// Pops the next chain: device-readable buffers into `readable[0..]`,
/// device-writable ones into `writable[0..]`, as host pointers (valid while
/// the guest keeps them mapped). Returns:
/// - `PVDMA_OK`: `*chain` filled.
/// - `PVDMA_VQ_EMPTY`: nothing available; `*chain` untouched.
/// - `PVDMA_ERR_BUFFER_TOO_SMALL`: `chain->n_readable/n_writable` are
///   the counts needed (at most 65536 each); the chain stays on the ring
///   (call again).
/// - `PVDMA_VQ_ERR_BAD_CHAIN`: `chain->head` is the consumed bad chain,
///   also one needing more than 65536 fragments on a side.
/// - `PVDMA_ERR_TRANSLATION_FAULT`, `PVDMA_ERR_BAD_STATE`.
///
/// # Safety
/// `vq` is NULL or a live handle; `readable`/`writable` are valid for
/// `n_readable`/`n_writable` entries (or that count is 0); `chain` is NULL
/// or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vq_pop(
    vq: *mut pvdma_vq,
    readable: *mut pvdma_iovec,
    n_readable: usize,
    writable: *mut pvdma_iovec,
    n_writable: usize,
    chain: *mut pvdma_vq_chain,
) -> pvdma_vq_result {
    ffi_boundary!({
        let q = try_queue!(vq);
        if chain.is_null()
            || (readable.is_null() && n_readable > 0)
            || (writable.is_null() && n_writable > 0)
        {
            return PVDMA_ERR_NULL_ARGUMENT;
        }
        const Z: Fragment = Fragment {
            hva: 0,
            gpa: 0,
            len: 0,
        };
        // pop() refuses a chain needing more than MAX_CHAIN_FRAGMENTS on a
        // side (BAD_CHAIN, consumed), so scratch beyond that is never
        // used: a huge n_* costs nothing and TOO_SMALL always asks for a
        // count this call can satisfy.
        let cap = |n: usize| n.min(pvdma::MAX_CHAIN_FRAGMENTS);
        let (mut rs, mut ws) = ([Z; STACK_FRAGMENTS], [Z; STACK_FRAGMENTS]);
        let (mut rh, mut wh) = (Vec::new(), Vec::new());
        let rbuf: &mut [Fragment] = if cap(n_readable) <= STACK_FRAGMENTS {
            &mut rs[..n_readable]
        } else {
            rh.resize(cap(n_readable), Z);
            &mut rh
        };
        let wbuf: &mut [Fragment] = if cap(n_writable) <= STACK_FRAGMENTS {
            &mut ws[..n_writable]
        } else {
            wh.resize(cap(n_writable), Z);
            &mut wh
        };
        let write_chain = |c: pvdma_vq_chain| {
            // SAFETY: non-null (checked) and valid for writing.
            unsafe { chain.write(c) }
        };
        match q.pop(rbuf, wbuf) {
            Ok(None) => PVDMA_VQ_EMPTY,
            Ok(Some(info)) => {
                for (out, frags, n) in [
                    (readable, &*rbuf, info.readable),
                    (writable, &*wbuf, info.writable),
                ] {
                    for (i, f) in frags[..n].iter().enumerate() {
                        // SAFETY: i < n <= the array's length per the contract.
                        unsafe {
                            out.add(i).write(pvdma_iovec {
                                base: f.hva as *mut c_void,
                                gpa: f.gpa,
                                len: f.len,
                            })
                        };
                    }
                }
                write_chain(pvdma_vq_chain {
                    head: info.head,
                    n_readable: info.readable,
                    n_writable: info.writable,
                    readable_bytes: info.readable_bytes,
                    writable_bytes: info.writable_bytes,
                });
                PVDMA_OK
            }
            Err(e) => {
                match e {
                    VqError::TooSmall {
                        head,
                        readable,
                        writable,
                    } => write_chain(pvdma_vq_chain {
                        head,
                        n_readable: readable,
                        n_writable: writable,
                        ..Default::default()
                    }),
                    VqError::BadChain { head, .. } => write_chain(pvdma_vq_chain {
                        head,
                        ..Default::default()
                    }),
                    _ => {}
                }
                result_of(&e)
            }
        }
    })
}

/// Returns chain `head` to the driver with `len` bytes written.
///
/// # Safety
/// `vq` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vq_push(vq: *mut pvdma_vq, head: u16, len: u32) -> pvdma_vq_result {
    ffi_boundary!({
        let q = try_queue!(vq);
        match q.push(head, len) {
            Ok(()) => PVDMA_OK,
            Err(e) => result_of(&e),
        }
    })
}

/// Stores in `*notify` whether the driver wants an interrupt for the
/// entries pushed since the last call (EVENT_IDX aware).
///
/// # Safety
/// `vq` is NULL or a live handle; `notify` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vq_needs_notify(
    vq: *mut pvdma_vq,
    notify: *mut bool,
) -> pvdma_vq_result {
    ffi_boundary!({
        let q = try_queue!(vq);
        if notify.is_null() {
            return PVDMA_ERR_NULL_ARGUMENT;
        }
        match q.needs_notification() {
            Ok(n) => {
                // SAFETY: non-null (checked) and valid for writing.
                unsafe { notify.write(n) };
                PVDMA_OK
            }
            Err(e) => result_of(&e),
        }
    })
}

/// Enables (`enable` true) or disables driver notifications. When
/// enabling, `*pending` (if not NULL) says whether chains arrived meanwhile.
///
/// # Safety
/// `vq` is NULL or a live handle; `pending` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn pvdma_vq_set_notify(
    vq: *mut pvdma_vq,
    enable: bool,
    pending: *mut bool,
) -> pvdma_vq_result {
    ffi_boundary!({
        let q = try_queue!(vq);
        let r = if enable {
            q.enable_notification()
        } else {
            q.disable_notification().map(|()| false)
        };
        match r {
            Ok(p) => {
                if !pending.is_null() {
                    // SAFETY: non-null and valid for writing per the contract.
                    unsafe { pending.write(p) };
                }
                PVDMA_OK
            }
            Err(e) => result_of(&e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::pvdma_vq_strerror;
    use pvdma::testing::{self, GuestMem};
    use pvdma::{Op, Perm, VmConfig, PAGE_SIZE};
    use std::ptr;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn c_api_pop_push_notify() {
        let mem = GuestMem::new(&[(0, 1 << 20)]);
        let vm = Vm::new(VmConfig::default()).unwrap();
        // SAFETY: `mem` outlives `vm`.
        unsafe { mem.register(&vm) };
        vm.add_endpoint(8, None).unwrap();
        assert_eq!(
            vm.execute(&testing::req(Op::Attach, 8)).status,
            pvdma::Status::Ok
        );
        for (iova, gpa) in [
            (0x10000u64, 0x9000u64),
            (0x11000, 0x3000),
            (0x12000, 0x6000),
            (0x40000, 0x20000),
            (0x41000, 0x50000),
        ] {
            let r = vm.execute(&testing::map_fixed(8, Perm::RW, iova, &[(gpa, PAGE_SIZE)]));
            assert_eq!(r.status, pvdma::Status::Ok);
        }
        // One writable descriptor over two scattered pages.
        let mut d = Vec::new();
        d.extend(0x40800u64.to_le_bytes());
        d.extend(0x1000u32.to_le_bytes());
        d.extend(2u16.to_le_bytes());
        d.extend(0u16.to_le_bytes());
        mem.write_slice(&d, GuestAddress(0x9000)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x3002)).unwrap();
        let cfg = pvdma_vq_config {
            desc: 0x10000,
            avail: 0x11000,
            used: 0x12000,
            features: 0,
            size: 8,
        };
        let vmh = (&vm as *const Vm).cast::<pvdma_vm>();
        let mut q = ptr::null_mut();
        // SAFETY: valid pointers throughout; vm outlives the queue.
        unsafe {
            assert_eq!(
                pvdma_vq_open(ptr::null(), 8, &cfg, &mut q),
                PVDMA_ERR_NULL_ARGUMENT
            );
            assert_eq!(pvdma_vq_open(vmh, 9, &cfg, &mut q), PVDMA_ERR_NOT_FOUND);
            let bad = pvdma_vq_config { size: 3, ..cfg };
            assert_eq!(
                pvdma_vq_open(vmh, 8, &bad, &mut q),
                PVDMA_ERR_INVALID_ARGUMENT
            );
            assert_eq!(pvdma_vq_open(vmh, 8, &cfg, &mut q), PVDMA_OK);
            let mut chain = pvdma_vq_chain::default();
            let mut w = [pvdma_iovec {
                base: ptr::null_mut(),
                gpa: 0,
                len: 0,
            }; 2];
            assert_eq!(
                pvdma_vq_pop(q, ptr::null_mut(), 0, w.as_mut_ptr(), 1, &mut chain),
                PVDMA_ERR_BUFFER_TOO_SMALL
            );
            assert_eq!(chain.n_writable, 2);
            assert_eq!(
                pvdma_vq_pop(q, ptr::null_mut(), 0, w.as_mut_ptr(), 2, &mut chain),
                PVDMA_OK
            );
            assert_eq!(
                (chain.head, chain.n_writable, chain.writable_bytes),
                (0, 2, 0x1000)
            );
            assert_eq!(
                (w[0].gpa, w[0].len, w[1].gpa, w[1].len),
                (0x20800, 0x800, 0x50000, 0x800)
            );
            assert_eq!(
                pvdma_vq_pop(q, ptr::null_mut(), 0, w.as_mut_ptr(), 2, &mut chain),
                PVDMA_VQ_EMPTY
            );
            assert_eq!(pvdma_vq_push(q, 9, 0), PVDMA_ERR_INVALID_ARGUMENT);
            assert_eq!(pvdma_vq_push(q, 0, 0x1000), PVDMA_OK);
            let mut notify = false;
            assert_eq!(pvdma_vq_needs_notify(q, &mut notify), PVDMA_OK);
            assert!(notify);
            assert_eq!(pvdma_vq_set_notify(q, true, ptr::null_mut()), PVDMA_OK);
            assert_eq!(
                pvdma_vq_push(ptr::null_mut(), 0, 0),
                PVDMA_ERR_NULL_ARGUMENT
            );
            pvdma_vq_close(q);
            pvdma_vq_close(ptr::null_mut());
        }
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x6002)).unwrap(), 1);
        assert!(!pvdma_vq_strerror(17).is_null());
    }
}
