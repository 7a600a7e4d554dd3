// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! pop + read + write + push of a 3-descriptor chain (16-byte header,
//! 512-byte data, 1-byte status), through virtio-queue's Reader/Writer:
//! (a) plain GuestMemoryMmap, (b) pvdma with each buffer in one page,
//! (c) pvdma with each buffer scattered over 4 pages, (d) vm-memory's
//! IommuMemory with a RwLock<Iotlb>.

use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::{Arc, RwLock};

use criterion::{criterion_group, criterion_main, Criterion};
use pvdma::testing::{self, GuestMem};
use pvdma::{Op, Perm, Vm, VmConfig, PAGE_SIZE};
use pvdma::{QueueConfig, VirtQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::iommu::{Error as IommuError, IotlbIterator};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Iommu, IommuMemory, Iotlb, Permissions,
};

const RAM: u64 = 4 << 20;
const RID: u32 = 8;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const LENS: [u32; 3] = [16, 512, 1];
const SIZE: u16 = 256;

/// Driver side: writes the chain (descriptors at DESC..) and publishes it.
fn publish<M: GuestMemory>(mem: &M, bufs: [u64; 3], round: u16) {
    for (i, (&addr, &len)) in bufs.iter().zip(LENS.iter()).enumerate() {
        let flags: u16 = if i < 2 { 1 } else { 2 };
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
        let _ = mem.write_slice(&d, GuestAddress(DESC + 16 * i as u64));
    }
    let slot = u64::from(round % SIZE);
    let _ = mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot));
    let _ = mem.write_obj(round.wrapping_add(1), GuestAddress(AVAIL + 2));
}

/// Device side: the operation measured.
fn device<M: GuestMemory>(q: &mut Queue, mem: &M) {
    let chain = q.pop_descriptor_chain(mem).expect("a chain");
    let head = chain.head_index();
    let mut reader = chain.clone().reader(mem).unwrap();
    let mut buf = [0u8; 528];
    reader.read_exact(&mut buf).unwrap();
    let mut writer = chain.writer(mem).unwrap();
    writer.write_all(&[0]).unwrap();
    q.add_used(mem, head, 1).unwrap();
    black_box(&buf);
}

fn queue() -> Queue {
    let mut q = Queue::new(SIZE).unwrap();
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    q
}

fn ram() -> GuestMemoryMmap<()> {
    GuestMem::new(&[(0, RAM)]).mem
}

fn map(vm: &Vm, iova: u64, gpa: u64) {
    let r = vm.execute(&testing::map_fixed(
        RID,
        Perm::RW,
        iova,
        &[(gpa, PAGE_SIZE)],
    ));
    assert_eq!(r.status, pvdma::Status::Ok);
}

/// A VM whose rings are mapped 1:1-ish and buffers at IOVA 0x100000+,
/// each `pages` pages scattered over guest memory (reverse order).
fn pvdma_setup(mem: &GuestMem, pages: u64) -> (Vm, [u64; 3]) {
    let vm = Vm::new(VmConfig::default()).unwrap();
    // SAFETY: `mem` outlives the VM in every benchmark below.
    unsafe { mem.register(&vm) };
    vm.add_endpoint(RID, None).unwrap();
    vm.execute(&testing::req(Op::Attach, RID));
    for (i, ring) in [DESC, AVAIL, USED].into_iter().enumerate() {
        map(&vm, ring, 0x200000 + i as u64 * PAGE_SIZE);
    }
    let mut bufs = [0u64; 3];
    for (b, len) in LENS.iter().enumerate() {
        let base = 0x100000 + b as u64 * 0x10000;
        for p in 0..pages {
            map(
                &vm,
                base + p * PAGE_SIZE,
                0x300000 - (b as u64 * 8 + p) * 2 * PAGE_SIZE,
            );
        }
        // Spread the buffer evenly over its pages.
        let span = u64::from(*len);
        bufs[b] = if pages == 1 {
            base
        } else {
            base + PAGE_SIZE - span.div_ceil(pages).min(PAGE_SIZE) / 2
        };
        let _ = span;
    }
    (vm, bufs)
}

#[derive(Debug)]
struct LockedIotlb(RwLock<Iotlb>);

impl Iommu for LockedIotlb {
    type IotlbGuard<'a> = std::sync::RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        Iotlb::lookup(self.0.read().unwrap(), iova, length, access).map_err(|f| {
            IommuError::CannotResolve {
                iova_range: vm_memory::iommu::IovaRange { base: iova, length },
                reason: format!("{f:?}"),
            }
        })
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtqueue_3desc");

    // (a) plain guest memory.
    {
        let mem = ram();
        let mut q = queue();
        let bufs = [0x100000, 0x110000, 0x120000];
        let mut round = 0u16;
        g.bench_function("a_plain_mmap", |b| {
            b.iter(|| {
                publish(&mem, bufs, round);
                device(&mut q, &mem);
                round = round.wrapping_add(1);
            })
        });
    }

    // (b), (c) through pvdma, rings cached.
    for (name, pages) in [("b_pvdma_1page", 1u64), ("c_pvdma_4pages", 4)] {
        let mem = GuestMem::new(&[(0, RAM)]);
        let (vm, bufs) = pvdma_setup(&mem, pages);
        let mut vq = VirtQueue::open(
            &vm,
            RID,
            QueueConfig {
                desc: DESC,
                avail: AVAIL,
                used: USED,
                size: SIZE,
                features: 0,
            },
        )
        .unwrap();
        let mut round = 0u16;
        g.bench_function(name, |b| {
            b.iter(|| {
                vq.with_queue(|q, space| {
                    publish(space, bufs, round);
                    device(q, space);
                })
                .unwrap();
                round = round.wrapping_add(1);
            })
        });
        drop(vq);
        drop(vm);
    }

    // (d) vm-memory's IommuMemory over a RwLock<Iotlb>, same layout as (b).
    {
        let mem = ram();
        let mut tlb = Iotlb::new();
        for (i, ring) in [DESC, AVAIL, USED].into_iter().enumerate() {
            tlb.set_mapping(
                GuestAddress(ring),
                GuestAddress(0x200000 + i as u64 * PAGE_SIZE),
                PAGE_SIZE as usize,
                Permissions::ReadWrite,
            )
            .unwrap();
        }
        for b in 0..3u64 {
            let base = 0x100000 + b * 0x10000;
            tlb.set_mapping(
                GuestAddress(base),
                GuestAddress(0x300000 - b * 16 * PAGE_SIZE),
                PAGE_SIZE as usize,
                Permissions::ReadWrite,
            )
            .unwrap();
        }
        let iommu_mem = IommuMemory::new(mem, LockedIotlb(RwLock::new(tlb)), true, ());
        let iommu_mem = Arc::new(iommu_mem);
        let mut q = queue();
        let bufs = [0x100000, 0x110000, 0x120000];
        let mut round = 0u16;
        g.bench_function("d_iommu_memory_rwlock_iotlb", |b| {
            b.iter(|| {
                publish(&*iommu_mem, bufs, round);
                device(&mut q, &*iommu_mem);
                round = round.wrapping_add(1);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
