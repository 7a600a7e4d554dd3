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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_entry_survives_simple_inputs() {
        virtqueue(&[]);
        virtqueue(&[0xff; 512]);
        let mut x = 0x1234_5678_9abc_def0_u64;
        for _ in 0..200 {
            let data: Vec<u8> = (0..600)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            virtqueue(&data);
        }
    }
}
