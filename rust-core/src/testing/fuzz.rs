// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz harnesses that live in the library (behind `test-utils`) so that
//! `cargo test` replays them on every build; `fuzz/fuzz_targets/` wires
//! them to cargo-fuzz. They are not part of the static library.

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::types::Fragment;
use crate::vm::Vm;
use crate::vq::*;

/// Deterministic fuzzing entry point (wired to cargo-fuzz by `fuzz/`): a
/// VM with 64 KiB of RAM, a domain, mappings, a ring layout and ring
/// contents all taken from `data`, then pops, pushes and unmaps (the
/// caches must follow). Panics only when an invariant breaks: an iovec or
/// a `get_slices` slice outside RAM.
pub fn virtqueue(data: &[u8]) {
    use crate::types::{PAGE_MASK, PAGE_SIZE};
    use crate::vm::VmConfig;
    use vm_memory::{GuestMemory, GuestMemoryBackend, GuestMemoryMmap, Permissions};

    const RAM: u64 = 16 * PAGE_SIZE;
    const RID: u32 = 8;
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next().unwrap_or(0);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]) else {
        return;
    };
    let Ok(vm) = Vm::new(VmConfig::default()) else {
        return;
    };
    let Ok(base) = mem.get_host_address(GuestAddress(0)) else {
        return;
    };
    let base = base as usize;
    // SAFETY: `mem` owns the mapping and outlives `vm` (dropped after it,
    // declared before it in this function's scope).
    if unsafe { vm.add_ram_region(0, RAM, base) }.is_err() || vm.add_endpoint(RID, None).is_err() {
        return;
    }
    vm.attach(RID);
    // Mappings: up to 24 (IOVA page in 0..32, guest page in 0..20 — some
    // outside RAM, refused by MAP — perms).
    let map = |iova_page: u64, gpa_page: u64, perms: u8| {
        vm.execute(&super::map_req(
            RID,
            u16::from(perms & 3) | crate::abi::PVDMA_FLAG_FIXED as u16,
            iova_page * PAGE_SIZE,
            &[(gpa_page * PAGE_SIZE, PAGE_SIZE)],
        ));
    };
    for _ in 0..(next() % 25) {
        map(u64::from(next() % 32), u64::from(next() % 20), next());
    }
    // Guest RAM contents: fuzzer bytes at fuzzer-chosen offsets.
    for _ in 0..(next() % 64) {
        let at = ((u64::from(next()) << 8 | u64::from(next())) % RAM) & !7;
        let chunk: Vec<u8> = (0..16).map(|_| next()).collect();
        let _ = mem.write_slice(&chunk, GuestAddress(at));
    }
    let iova = |hi: u8, lo: u8| (u64::from(hi % 36) * PAGE_SIZE) | (u64::from(lo) << 4 & PAGE_MASK);
    let cfg = QueueConfig {
        desc: iova(next(), next()) & !15,
        avail: iova(next(), next()) & !1,
        used: iova(next(), next()) & !3,
        size: 1 << (next() % 9),
        features: u64::from(next() & 3) << 28,
    };
    let Ok(mut q) = VirtQueue::open(&vm, RID, cfg) else {
        return;
    };
    let zero = Fragment {
        hva: 0,
        gpa: 0,
        len: 0,
    };
    let in_ram = |f: &Fragment| {
        f.len == 0
            || (f.hva >= base
                && f.hva
                    .checked_add(f.len as usize)
                    .is_some_and(|e| e <= base + RAM as usize)
                && f.gpa.checked_add(f.len).is_some_and(|e| e <= RAM))
    };
    for _ in 0..(next() % 16 + 1) {
        match next() % 5 {
            0 | 1 => {
                let (mut r, mut w) = ([zero; 4], [zero; 4]);
                if let Ok(Some(info)) = q.pop(&mut r, &mut w) {
                    assert!(
                        r[..info.readable].iter().all(in_ram),
                        "readable fragment outside RAM"
                    );
                    assert!(
                        w[..info.writable].iter().all(in_ram),
                        "writable fragment outside RAM"
                    );
                    let _ = q.push(info.head, next().into());
                }
            }
            2 => {
                // Through virtio-queue's own Reader/Writer, and the slices
                // they are built from.
                let _ = q.with_queue(|queue, space| {
                    if let Some(chain) = queue.pop_descriptor_chain(space) {
                        let head = chain.head_index();
                        for desc in chain.clone() {
                            let access = if desc.is_write_only() {
                                Permissions::Write
                            } else {
                                Permissions::Read
                            };
                            let Ok(slices) =
                                space.get_slices(desc.addr(), desc.len() as usize, access)
                            else {
                                continue;
                            };
                            let mut total = 0;
                            for s in slices.flatten() {
                                let hva = s.ptr_guard().as_ptr() as usize;
                                assert!(
                                    hva >= base
                                        && hva
                                            .checked_add(s.len())
                                            .is_some_and(|e| e <= base + RAM as usize),
                                    "slice outside RAM"
                                );
                                total += s.len();
                            }
                            assert!(
                                total <= desc.len() as usize,
                                "slices longer than the access"
                            );
                        }
                        if let Ok(mut reader) = chain.clone().reader(space) {
                            let mut sink = [0u8; 64];
                            let _ = std::io::Read::read(&mut reader, &mut sink);
                        }
                        if let Ok(mut writer) = chain.writer(space) {
                            let _ = std::io::Write::write(&mut writer, &[0x5a; 64]);
                        }
                        let _ = queue.add_used(space, head, 0);
                    }
                });
            }
            3 => {
                let _ = q.needs_notification();
                let _ = q.enable_notification();
            }
            _ => {
                vm.execute(&super::unmap_req(
                    RID,
                    u64::from(next() % 32) * PAGE_SIZE,
                    0,
                ));
                map(u64::from(next() % 32), u64::from(next() % 16), next());
            }
        }
    }
    drop(q);
    drop(vm);
}

/// Deterministic fuzzing entry point of the request queues (ABI 3.2),
/// wired to cargo-fuzz by `fuzz/`: the fuzzer owns a queue's ring and
/// control block. It writes arbitrary or well-formed entries into any
/// slot, moves `head` anywhere (also far ahead, breaking the queue), has
/// the host drain by every path (a request, a device access, SYNC,
/// tear-down, reset, migration), and can rewrite the ring and head while
/// a drain runs (from the MAP notifier, which runs inside it). Panics only
/// when an invariant breaks:
/// - no drain of one queue takes more than N entries;
/// - pins are exactly what the mappings and the set-up queue imply, and
///   every mapping lies in RAM and translates;
/// - a stopped queue makes SYNC answer STATE, and nothing is taken from
///   it any more;
/// - after reset nothing is mapped or pinned and no queue is set up.
pub fn queue(data: &[u8]) {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    use vm_memory::GuestMemoryMmap;

    use crate::abi::Op;
    use crate::types::{Access, Perm, PAGE_SIZE};
    use crate::vm::{DrainHooks, DrainReport, QueueEntry, VmConfig, QUEUE_ENTRY_SIZE};

    const RAM: u64 = 32 * PAGE_SIZE;
    const RIDS: [u32; 3] = [8, 16, 0x300];
    const BLOCK: u64 = 31 * PAGE_SIZE;
    const RING: u64 = 4 * PAGE_SIZE;

    struct Bound {
        entries: AtomicU32,
        broken: AtomicBool,
    }
    impl DrainHooks for Bound {
        fn drained(&self, r: &DrainReport) {
            if r.applied > self.entries.load(Ordering::SeqCst) {
                self.broken.store(true, Ordering::SeqCst);
            }
        }
    }

    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next().unwrap_or(0);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]) else {
        return;
    };
    let mem = Arc::new(mem);
    let Ok(base) = vm_memory::GuestMemoryBackend::get_host_address(&*mem, GuestAddress(0)) else {
        return;
    };
    let new_vm = || -> Option<Vm> {
        let vm = Vm::new(VmConfig::default()).ok()?;
        // SAFETY: `mem` owns the mapping and outlives every VM made here
        // (each is dropped before this function returns, `mem` after).
        unsafe { vm.add_ram_region(0, RAM, base as usize) }.ok()?;
        for rid in &RIDS[..2] {
            vm.add_endpoint(*rid, None).ok()?;
        }
        Some(vm)
    };
    let Some(mut vm) = new_vm() else {
        return;
    };
    let bound = Arc::new(Bound {
        entries: AtomicU32::new(0),
        broken: AtomicBool::new(false),
    });
    vm.set_drain_hooks(Some(bound.clone()));
    let submit = |vm: &Vm, r: &crate::vm::Request| -> crate::Status {
        let _ = mem.write_slice(&crate::vm::encode_request(r), GuestAddress(BLOCK));
        vm.submit(BLOCK)
    };
    for rid in &RIDS[..2] {
        if next() % 4 != 0 {
            vm.attach(*rid);
        }
    }
    // The queue: control block in page 0, ring of 1, 2 or 4 pages.
    let ctrl = u64::from(next() % 64) * 64;
    let ring_len = PAGE_SIZE << (next() % 3);
    let n = (ring_len / QUEUE_ENTRY_SIZE) as u32;
    let _ = mem.write_obj(u32::from(next()) << 24, GuestAddress(ctrl));
    let setup = super::queue_setup_req(RIDS[0], 0, ctrl, RING, ring_len);
    let mut up = submit(&vm, &setup) == crate::Status::Ok;
    bound.entries.store(n, Ordering::SeqCst);
    // Rewrites armed for the next MAP notification: (slot, bytes) and an
    // optional head value.
    /// A rewrite armed for the next MAP notification: the slot, its new
    /// bytes, and a new head (or none).
    type Rewrite = Option<(u32, [u8; 32], Option<u32>)>;
    let armed: Arc<Mutex<Rewrite>> = Arc::default();
    {
        let (armed, mem) = (armed.clone(), mem.clone());
        vm.set_notifier(Some(Arc::new(move |_ev: &crate::vm::MapEvent| {
            if let Some((slot, raw, head)) = armed.lock().ok().and_then(|mut a| a.take()) {
                let at = RING + u64::from(slot % n) * QUEUE_ENTRY_SIZE;
                let _ = mem.write_slice(&raw, GuestAddress(at));
                if let Some(h) = head {
                    let _ = mem.write_obj(h, GuestAddress(ctrl));
                }
            }
            true
        })));
    }
    let head = |mem: &GuestMemoryMmap<()>| mem.read_obj::<u32>(GuestAddress(ctrl)).unwrap_or(0);
    let entry = |next: &mut dyn FnMut() -> u8| -> [u8; 32] {
        if next() % 4 == 0 {
            let mut raw = [0u8; 32];
            raw.iter_mut().for_each(|b| *b = next());
            return raw;
        }
        let rid = RIDS[usize::from(next()) % 3];
        let iova = (u64::from(next() % 48) * PAGE_SIZE) | (u64::from(next() % 4) * 0x400);
        if next() % 2 == 0 {
            QueueEntry {
                op: Op::Map as u16,
                flags: u16::from(next() % 8),
                requester: rid,
                iova,
                gpa: (u64::from(next() % 36) * PAGE_SIZE) | (iova & 0xfff),
                length: u64::from(next()) * 64 + u64::from(next() % 2) * PAGE_SIZE,
            }
            .encode()
        } else {
            QueueEntry {
                op: Op::Unmap as u16,
                flags: 0,
                requester: rid,
                iova,
                gpa: 0,
                length: u64::from(next() % 4) * PAGE_SIZE,
            }
            .encode()
        }
    };
    for _ in 0..(next() % 48 + 1) {
        match next() % 12 {
            0..=3 => {
                // Publish one well-formed or raw entry at head.
                let h = head(&mem);
                let raw = entry(&mut next);
                let at = RING + u64::from(h % n) * QUEUE_ENTRY_SIZE;
                let _ = mem.write_slice(&raw, GuestAddress(at));
                let _ = mem.write_obj(h.wrapping_add(1), GuestAddress(ctrl));
            }
            4 => {
                // Head jumps anywhere.
                let d = u32::from(next()) << (next() % 32);
                let _ = mem.write_obj(head(&mem).wrapping_add(d), GuestAddress(ctrl));
            }
            5 => {
                // A rewrite during the next drain that maps something.
                let slot = u32::from(next());
                let raw = entry(&mut next);
                let h = (next() % 2 == 0).then(|| head(&mem).wrapping_add(u32::from(next())));
                if let Ok(mut a) = armed.lock() {
                    *a = Some((slot, raw, h));
                }
            }
            6 => {
                let _ = submit(&vm, &super::req(Op::Query, RIDS[0]));
            }
            7 => {
                let mut out = [Fragment {
                    hva: 0,
                    gpa: 0,
                    len: 0,
                }; 4];
                let rid = RIDS[usize::from(next()) % 2];
                let iova = u64::from(next() % 48) * PAGE_SIZE;
                let _ = vm.translate(rid, iova, 16, Access::Read, &mut out);
                let _ = vm.lookup(rid, iova, Some(Access::Write));
            }
            8 => {
                let st = submit(&vm, &super::sync_req(RIDS[0]));
                let stopped = vm.queues().first().is_some_and(|q| q.stopped);
                // (STATE is also an entry's status: only one direction.)
                assert!(
                    !stopped || st == crate::Status::State,
                    "SYNC {st} on a stopped queue"
                );
            }
            9 => {
                let _ = submit(&vm, &super::queue_teardown_req(RIDS[0], 0));
                up = submit(&vm, &setup) == crate::Status::Ok;
            }
            10 => {
                vm.reset();
                let s = vm.stats();
                assert_eq!((s.mappings, s.pinned_pages), (0, 0), "after reset");
                assert!(vm.queues().iter().all(|q| !q.set_up), "queue after reset");
                vm.attach(RIDS[0]);
                up = submit(&vm, &setup) == crate::Status::Ok;
            }
            _ => {
                let blob = vm.export_state();
                let Some(dst) = new_vm() else {
                    return;
                };
                dst.import_state(&blob).expect("a fresh export imports");
                // Everything but what counts this VM's own drains, and the
                // head last read (the destination has read none yet).
                let carried = |q: &crate::vm::QueueInfo| crate::vm::QueueInfo {
                    head: 0,
                    applied: 0,
                    drains: 0,
                    ..*q
                };
                let want: Vec<_> = vm.queues().iter().map(carried).collect();
                let got: Vec<_> = dst.queues().iter().map(carried).collect();
                assert_eq!(got, want, "queues after migration");
                dst.set_drain_hooks(Some(bound.clone()));
                let (armed, mem) = (armed.clone(), mem.clone());
                dst.set_notifier(Some(Arc::new(move |_ev: &crate::vm::MapEvent| {
                    if let Some((slot, raw, head)) = armed.lock().ok().and_then(|mut a| a.take()) {
                        let at = RING + u64::from(slot % n) * QUEUE_ENTRY_SIZE;
                        let _ = mem.write_slice(&raw, GuestAddress(at));
                        if let Some(h) = head {
                            let _ = mem.write_obj(h, GuestAddress(ctrl));
                        }
                    }
                    true
                })));
                vm = dst;
            }
        }
        assert!(
            !bound.broken.load(Ordering::SeqCst),
            "a drain took more than N entries"
        );
        // Pins: one reference per distinct page per mapping, plus the
        // queue's control block page and ring pages.
        let mut pins: BTreeMap<u64, u32> = BTreeMap::new();
        let q = vm.queues();
        if q.first().is_some_and(|q| q.set_up) {
            assert!(up, "a queue set up that the harness did not set up");
            pins.insert(ctrl / PAGE_SIZE, 1);
            for p in 0..ring_len / PAGE_SIZE {
                pins.insert(RING / PAGE_SIZE + p, 1);
            }
        }
        for rid in &RIDS[..2] {
            for m in vm.mappings(*rid) {
                let mut pages = BTreeSet::new();
                for &(gpa, len) in &m.segs {
                    assert!(
                        gpa.checked_add(len).is_some_and(|e| e <= RAM),
                        "{m:?} outside RAM"
                    );
                    pages.extend(gpa / PAGE_SIZE..=(gpa + len - 1) / PAGE_SIZE);
                }
                for p in pages {
                    *pins.entry(p).or_default() += 1;
                }
                let mut out = [Fragment {
                    hva: 0,
                    gpa: 0,
                    len: 0,
                }; 4];
                let a = if m.perms.contains(Perm::READ) {
                    Access::Read
                } else {
                    Access::Write
                };
                assert!(
                    vm.translate(*rid, m.iova, m.length, a, &mut out).is_ok(),
                    "{m:?}"
                );
            }
        }
        assert_eq!(
            vm.pins().snapshot(),
            pins.into_iter().collect::<Vec<_>>(),
            "pins"
        );
    }
    vm.set_notifier(None);
    drop(vm);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `entry` the empty input, 512 bytes of 0xff, and `count`
    /// xorshift-random inputs of `len` bytes from `seed`.
    fn feed(entry: fn(&[u8]), seed: u64, count: usize, len: usize) {
        entry(&[]);
        entry(&[0xff; 512]);
        let mut x = seed;
        for _ in 0..count {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            entry(&data);
        }
    }

    #[test]
    fn queue_fuzz_entry_survives_simple_inputs() {
        feed(queue, 0x9e37_79b9_7f4a_7c15, 300, 400);
    }

    #[test]
    fn fuzz_entry_survives_simple_inputs() {
        feed(virtqueue, 0x1234_5678_9abc_def0, 200, 600);
    }
}
