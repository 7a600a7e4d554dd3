// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of the C API through its exports.

use crate::prelude::*;
use crate::{
    endpoint::*, fault::*, migration::*, notify::*, queue::*, ram::*, request::*, stats::*,
};
use std::ffi::CStr;

fn default_config() -> pvdma_config {
    let mut c = std::mem::MaybeUninit::<pvdma_config>::uninit();
    // SAFETY: a valid pointer to writable storage.
    unsafe { pvdma_config_default(c.as_mut_ptr()) };
    // SAFETY: pvdma_config_default wrote every field.
    unsafe { c.assume_init() }
}

fn new_vm() -> *mut pvdma_vm {
    let cfg = default_config();
    let mut vm = ptr::null_mut();
    // SAFETY: valid pointers.
    assert_eq!(unsafe { pvdma_vm_new(&cfg, &mut vm) }, PVDMA_OK);
    assert!(!vm.is_null());
    vm
}

fn cstr(p: *const c_char) -> &'static str {
    assert!(!p.is_null());
    // SAFETY: the API returns static NUL-terminated strings.
    unsafe { CStr::from_ptr(p) }.to_str().unwrap()
}

/// Set in the child process of `a_panic_at_the_boundary_aborts_the_process`.
const PANIC_CHILD: &str = "PVDMA_CAPI_TEST_PANIC_CHILD";

// A stand-in export: the same boundary as the real ones, with a body that
// panics (the real bodies have no panic to provoke).
extern "C" fn panicking_export() -> u32 {
    ffi_boundary!({
        let v: Vec<u32> = Vec::new();
        // An index out of bounds: a panic from inside the library.
        #[allow(clippy::indexing_slicing)]
        v[3]
    })
}

/// The panic decision (`panic.rs`): a panic at the boundary aborts the
/// process, also under the test profile, which unwinds. The test runs
/// itself again as a child that calls a panicking export.
#[test]
fn a_panic_at_the_boundary_aborts_the_process() {
    use std::os::unix::process::ExitStatusExt;
    if std::env::var_os(PANIC_CHILD).is_some() {
        let v = panicking_export();
        // Not reached: the boundary aborted.
        println!("the export returned {v}");
        std::process::exit(0);
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::a_panic_at_the_boundary_aborts_the_process",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(PANIC_CHILD, "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "status {:?}, stdout {}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("index out of bounds"));
}

#[test]
fn boundary_early_return_returns_from_the_export() {
    fn f(p: *const u32) -> u32 {
        ffi_boundary!({
            let v = try_ref!(p, 1);
            *v + 100
        })
    }
    assert_eq!(f(ptr::null()), 1);
    assert_eq!(f(&5), 105);
}

#[test]
fn null_arguments_are_refused() {
    let cfg = default_config();
    let mut vm = ptr::null_mut();
    // SAFETY: every pointer is NULL or valid.
    unsafe {
        assert_eq!(pvdma_vm_new(ptr::null(), &mut vm), PVDMA_ERR_NULL_ARGUMENT);
        assert_eq!(pvdma_vm_new(&cfg, ptr::null_mut()), PVDMA_ERR_NULL_ARGUMENT);
        assert!(vm.is_null());
        let null = ptr::null_mut::<pvdma_vm>();
        assert_eq!(
            pvdma_vm_add_endpoint(null, 1, ptr::null()),
            PVDMA_ERR_NULL_ARGUMENT
        );
        assert_eq!(pvdma_vm_remove_endpoint(null, 1), PVDMA_ERR_NULL_ARGUMENT);
        assert_eq!(
            pvdma_vm_add_ram(null, 0, 4096, 8 as *mut c_void),
            PVDMA_ERR_NULL_ARGUMENT
        );
        assert_eq!(pvdma_vm_submit(null, 0), 255);
        let mut n = 0usize;
        assert_eq!(
            pvdma_vm_translate(
                null,
                1,
                0,
                1,
                1,
                ptr::null_mut(),
                0,
                &mut n,
                ptr::null_mut()
            ),
            PVDMA_ERR_NULL_ARGUMENT
        );
        let mut l = std::mem::zeroed::<pvdma_lookup>();
        assert_eq!(
            pvdma_vm_lookup(null, 1, 0, 0, &mut l),
            PVDMA_ERR_NULL_ARGUMENT
        );
        let mut s = std::mem::zeroed::<pvdma_stats>();
        assert_eq!(pvdma_vm_stats(null, &mut s), PVDMA_ERR_NULL_ARGUMENT);
        assert_eq!(
            pvdma_vm_state_save(null, ptr::null_mut(), 0, &mut n),
            PVDMA_ERR_NULL_ARGUMENT
        );
        assert_eq!(
            pvdma_vm_state_load(null, [0u8].as_ptr(), 1),
            PVDMA_ERR_NULL_ARGUMENT
        );
        assert_eq!(pvdma_vm_faults(null, ptr::null_mut(), 0), 0);
        assert_eq!(pvdma_vm_fault_count(null), 0);
        assert_eq!(pvdma_vm_features(null), 0);
        assert!(!pvdma_vm_ram_pinned(null, 0, 4096));
        pvdma_vm_reset(null);
        pvdma_vm_record_fault(null, 1, 0, 1, 1);
        pvdma_vm_set_notifier(null, None, ptr::null_mut());
        pvdma_vm_free(null);
        pvdma_config_default(ptr::null_mut());
    }
}

#[test]
fn vm_handle_null_outputs_and_bad_config() {
    let vm = new_vm();
    // SAFETY: `vm` is live; other pointers NULL or valid.
    unsafe {
        assert_eq!(pvdma_vm_stats(vm, ptr::null_mut()), PVDMA_ERR_NULL_ARGUMENT);
        assert_eq!(
            pvdma_vm_lookup(vm, 1, 0, 0, ptr::null_mut()),
            PVDMA_ERR_NULL_ARGUMENT
        );
        assert_eq!(
            pvdma_vm_translate(vm, 1, 0, 1, 1, ptr::null_mut(), 1, &mut 0, ptr::null_mut()),
            PVDMA_ERR_NULL_ARGUMENT
        );
        assert_eq!(
            pvdma_vm_state_save(vm, ptr::null_mut(), 16, &mut 0),
            PVDMA_ERR_NULL_ARGUMENT
        );
        assert_eq!(
            pvdma_vm_state_load(vm, ptr::null(), 0),
            PVDMA_ERR_NULL_ARGUMENT
        );
        assert_eq!(
            pvdma_vm_add_ram(vm, 0, 4096, ptr::null_mut()),
            PVDMA_ERR_NULL_ARGUMENT
        );
        let mut l = std::mem::zeroed::<pvdma_lookup>();
        assert_eq!(
            pvdma_vm_lookup(vm, 1, 0, 4, &mut l),
            PVDMA_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            pvdma_vm_features(vm),
            u64::from(
                pvdma::abi::PVDMA_FEATURE_HOST_IOVA
                    | pvdma::abi::PVDMA_FEATURE_BYPASS
                    | pvdma::abi::PVDMA_FEATURE_UNMAP_LIST
            ) | pvdma::abi::PVDMA_FEATURE_QUEUE as u64
        );
        assert_eq!(pvdma_vm_queue_count(vm), 8);
        assert_eq!(pvdma_vm_page_sizes(vm), (1 << 12) | (1 << 21));
        pvdma_vm_free(vm);
    }
    for bad in [
        pvdma_config {
            iova_bits: 20,
            ..default_config()
        },
        pvdma_config {
            iova_bits: 58,
            ..default_config()
        },
        pvdma_config {
            max_segs: 251,
            ..default_config()
        },
        pvdma_config {
            pin_mode: 2,
            ..default_config()
        },
        pvdma_config {
            fault_log_len: 0,
            ..default_config()
        },
        pvdma_config {
            queues: 65,
            ..default_config()
        },
    ] {
        let mut vm = ptr::null_mut();
        // SAFETY: valid pointers.
        let r = unsafe { pvdma_vm_new(&bad, &mut vm) };
        assert_eq!(r, PVDMA_ERR_INVALID_ARGUMENT);
        assert!(vm.is_null(), "output written on failure");
    }
}

#[test]
fn endpoints_and_faults_through_the_boundary() {
    let vm = new_vm();
    // SAFETY: `vm` is live; other pointers NULL or valid.
    unsafe {
        assert_eq!(pvdma_vm_add_endpoint(vm, 0x10, ptr::null()), PVDMA_OK);
        assert_eq!(
            pvdma_vm_add_endpoint(vm, 0x10, ptr::null()),
            PVDMA_ERR_EXISTS
        );
        assert_eq!(
            pvdma_vm_add_endpoint(vm, 0x18, c"0000:65:00.0".as_ptr()),
            PVDMA_OK
        );
        assert_eq!(
            pvdma_vm_add_endpoint(vm, 0x1_0000, ptr::null()),
            PVDMA_ERR_INVALID_ARGUMENT
        );
        let mut eps = [std::mem::zeroed::<pvdma_endpoint_info>(); 1];
        assert_eq!(pvdma_vm_endpoints(vm, eps.as_mut_ptr(), 1), 2);
        assert_eq!(eps[0].requester, 0x10);
        assert!(!eps[0].passthrough && !eps[0].attached);
        assert_eq!(pvdma_vm_endpoints(vm, ptr::null_mut(), 5), 2);
        assert_eq!(pvdma_vm_mappings(vm, 0x10, ptr::null_mut(), 0), 0);

        pvdma_vm_record_fault(vm, 0x10, 0x1000, 2, PVDMA_FAULT_UNMAPPED);
        pvdma_vm_record_fault(vm, 0x18, 0x2000, 1, PVDMA_FAULT_PERMISSION);
        pvdma_vm_record_fault(vm, 0x18, 0x3000, 9, PVDMA_FAULT_PERMISSION); // ignored
        assert_eq!(pvdma_vm_fault_count(vm), 2);
        let mut f = [std::mem::zeroed::<pvdma_fault>(); 1];
        assert_eq!(pvdma_vm_faults(vm, f.as_mut_ptr(), 1), 2);
        // The newest one.
        assert_eq!((f[0].requester, f[0].iova, f[0].seq), (0x18, 0x2000, 1));
        assert_eq!(cstr(pvdma_fault_reason_name(f[0].reason)), "PERMISSION");

        assert_eq!(pvdma_vm_remove_endpoint(vm, 0x10), PVDMA_OK);
        assert_eq!(pvdma_vm_remove_endpoint(vm, 0x10), PVDMA_ERR_NOT_FOUND);
        pvdma_vm_reset(vm);
        assert_eq!(pvdma_vm_fault_count(vm), 0);
        pvdma_vm_free(vm);
    }
}

#[test]
fn names_are_static_and_total() {
    for r in (0..=9).chain([16, 17]) {
        assert!(!cstr(pvdma_strerror(r)).is_empty());
        assert_ne!(cstr(pvdma_strerror(r)), "unknown pvdma_result");
    }
    assert_eq!(cstr(pvdma_strerror(10)), "unknown pvdma_result");
    for r in [0, 1, 2, 4, 6, 7, 8, 9, 16, 17] {
        assert_eq!(cstr(pvdma_vq_strerror(r)), cstr(pvdma_strerror(r)));
    }
    for r in [3, 5, 10, 15, 18, u32::MAX] {
        assert_eq!(cstr(pvdma_vq_strerror(r)), "unknown pvdma_result");
    }
    assert_eq!(cstr(pvdma_strerror(u32::MAX)), "unknown pvdma_result");
    assert_eq!(cstr(pvdma_guest_status_name(0)), "OK");
    assert_eq!(cstr(pvdma_guest_status_name(11)), "STATE");
    assert_eq!(cstr(pvdma_guest_status_name(255)), "INTERNAL");
    assert_eq!(cstr(pvdma_guest_status_name(12)), "UNKNOWN");
    assert_eq!(cstr(pvdma_fault_reason_name(4)), "OUTSIDE_RAM");
    assert_eq!(cstr(pvdma_fault_reason_name(0)), "UNKNOWN");
    assert_eq!(cstr(pvdma_version()), env!("CARGO_PKG_VERSION"));
}

#[test]
fn constants_agree_with_the_rust_types() {
    for r in [
        FaultReason::Unmapped,
        FaultReason::Permission,
        FaultReason::Blocked,
        FaultReason::OutsideRam,
        FaultReason::NoDevice,
        FaultReason::Overflow,
    ] {
        assert_eq!(fault_reason_from_raw(r as u32), Some(r));
    }
    assert_eq!(PVDMA_FAULT_UNMAPPED, FaultReason::Unmapped as u32);
    assert_eq!(PVDMA_FAULT_OVERFLOW, FaultReason::Overflow as u32);
    assert_eq!(PVDMA_EVENT_MAP, pvdma::MapEventKind::Map as u32);
    assert_eq!(PVDMA_EVENT_UNMAP, pvdma::MapEventKind::Unmap as u32);
    assert_eq!(PVDMA_ACCESS_READ, Access::Read as u32);
    assert_eq!(PVDMA_ACCESS_WRITE, Access::Write as u32);
    assert_eq!(PVDMA_ACCESS_RW, Access::ReadWrite as u32);
    assert_eq!(
        PVDMA_LOOKUP_BYPASS | PVDMA_PIN_MLOCK,
        1,
        "single-bit values the header documents"
    );
}

#[test]
fn result_values_are_stable() {
    assert_eq!(PVDMA_OK as u32, 0);
    assert_eq!(PVDMA_ERR_TRANSLATION_FAULT as u32, 7);
    assert_eq!(PVDMA_ERR_PANIC as u32, 9);
    assert_eq!(PVDMA_VQ_EMPTY as u32, 16);
    assert_eq!(PVDMA_VQ_ERR_BAD_CHAIN as u32, 17);
    assert_eq!(std::mem::size_of::<pvdma_result>(), 4);
}

#[test]
fn config_roundtrips() {
    let c = default_config();
    assert_eq!(c.to_vm_config(), Some(VmConfig::default()));
    assert_eq!(c.iova_bits, 48);
    assert!(c.bypass && c.host_iova);
}

/// The queue exports: NULL handling, the listing's bounds, the hooks
/// reaching C function pointers, the stats appended, reset.
#[test]
fn queues_through_the_boundary() {
    use std::sync::atomic::{AtomicU32, Ordering};
    static DRAINED: AtomicU32 = AtomicU32::new(0);
    static CAUSE: AtomicU32 = AtomicU32::new(99);
    unsafe extern "C" fn drained(
        opaque: *mut c_void,
        queue: u32,
        cause: u32,
        applied: u32,
        _failed: u32,
        _head: u32,
        tail: u32,
    ) {
        assert_eq!(opaque as usize, 0x77);
        assert_eq!((queue, applied, tail), (2, 1, 1));
        CAUSE.store(cause, Ordering::SeqCst);
        DRAINED.fetch_add(1, Ordering::SeqCst);
    }
    let vm = new_vm();
    let mem = pvdma::testing::GuestMem::new(&[(0, 1 << 20)]);
    // SAFETY: `vm` is live; other pointers NULL or valid; `mem` outlives
    // the VM's use of it (freed after pvdma_vm_free).
    unsafe {
        assert_eq!(pvdma_vm_queue_count(ptr::null()), 0);
        assert_eq!(pvdma_vm_queues(ptr::null(), ptr::null_mut(), 4), 0);
        assert_eq!(pvdma_vm_queue_count(vm), 8);
        assert_eq!(pvdma_vm_queues(vm, ptr::null_mut(), 4), 8);
        assert_eq!(
            pvdma_vm_set_drain_hooks(ptr::null_mut(), ptr::null()),
            PVDMA_ERR_NULL_ARGUMENT
        );
        let hooks = pvdma_drain_hooks {
            opaque: 0x77 as *mut c_void,
            miss_begin: None,
            miss_end: None,
            drained: Some(drained),
        };
        assert_eq!(pvdma_vm_set_drain_hooks(vm, &hooks), PVDMA_OK);
        assert_eq!(
            pvdma_vm_add_ram(vm, 0, 1 << 20, mem.hva(0) as *mut c_void),
            PVDMA_OK
        );
        assert_eq!(pvdma_vm_add_endpoint(vm, 0x10, ptr::null()), PVDMA_OK);
        let v = &*vm.cast::<Vm>();
        let submit = |r: &pvdma::Request| {
            use vm_memory::{Bytes, GuestAddress};
            mem.write_slice(&pvdma::encode_request(r), GuestAddress(0x8000))
                .unwrap();
            v.submit(0x8000)
        };
        assert_eq!(
            submit(&pvdma::testing::req(pvdma::abi::Op::Attach, 0x10)),
            Status::Ok
        );
        let setup = pvdma::testing::queue_setup_req(0x10, 2, 0x1000, 0x2000, 0x1000);
        assert_eq!(submit(&setup), Status::Ok);
        let mut q = pvdma::testing::GuestQueue::new(&mem, 0x1000, 0x2000, 0x1000);
        let e = pvdma::testing::map_entry(0x10, pvdma::Perm::RW, 0x5000, 0x4000, 0x1000);
        q.push(&mem, &e);
        let mut l = std::mem::zeroed::<pvdma_lookup>();
        assert_eq!(pvdma_vm_lookup(vm, 0x10, 0x5000, 1, &mut l), PVDMA_OK);
        assert_eq!(DRAINED.load(Ordering::SeqCst), 1);
        assert_eq!(CAUSE.load(Ordering::SeqCst), PVDMA_DRAIN_MISS);
        let mut info = [pvdma_queue_info::default(); 8];
        assert_eq!(pvdma_vm_queues(vm, info.as_mut_ptr(), 8), 8);
        assert!(info[2].set_up && !info[0].set_up);
        assert_eq!(
            (info[2].index, info[2].entries, info[2].head, info[2].tail),
            (2, 128, 1, 1)
        );
        assert_eq!((info[2].applied, info[2].drains), (1, 1));
        let mut st = std::mem::zeroed::<pvdma_stats>();
        assert_eq!(pvdma_vm_stats(vm, &mut st), PVDMA_OK);
        assert_eq!(
            (
                st.queue_drains,
                st.queue_entries,
                st.queue_failed,
                st.miss_drains
            ),
            (1, 1, 0, 1)
        );
        assert_eq!(pvdma_vm_set_drain_hooks(vm, ptr::null()), PVDMA_OK);
        pvdma_vm_reset(vm);
        assert_eq!(pvdma_vm_queues(vm, info.as_mut_ptr(), 8), 8);
        assert!(!info[2].set_up);
        pvdma_vm_free(vm);
    }
}
