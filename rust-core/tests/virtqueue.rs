// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Virtqueues through pvdma translations: the hazards the kvmtool seed
//! flagged (virtio_populate_sg / virtio_access_sg), each with a test.

use std::io::{Read, Write};

use pvdma::epoch;
use pvdma::testing::{self, GuestMem};
use pvdma::FaultReason;
use pvdma::Request;
use pvdma::{Fragment, IovaSpace, Op, Perm, Status, Vm, VmConfig, PAGE_SIZE};
use pvdma::{QueueConfig, VirtQueue, VqError};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

const RID: u32 = 0x10;
const RAM: u64 = 1 << 20;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;

struct Guest {
    vm: Vm,
    mem: GuestMem,
}

impl Guest {
    fn new() -> Guest {
        Guest::with(VmConfig::default())
    }

    fn with(cfg: VmConfig) -> Guest {
        let mem = GuestMem::new(&[(0, RAM)]);
        let vm = Vm::new(cfg).unwrap();
        // SAFETY: `mem` outlives `vm` (dropped after it).
        unsafe { mem.register(&vm) };
        vm.add_endpoint(RID, None).unwrap();
        let g = Guest { vm, mem };
        assert_eq!(g.op(Op::Attach, 0), Status::Ok);
        g
    }

    fn op(&self, op: Op, iova: u64) -> Status {
        self.vm
            .execute(&Request {
                iova,
                ..testing::req(op, RID)
            })
            .status
    }

    /// Maps IOVA page `iova` to guest page `gpa`.
    fn map(&self, iova: u64, gpa: u64, perms: Perm) {
        let r = self
            .vm
            .execute(&testing::map_fixed(RID, perms, iova, &[(gpa, PAGE_SIZE)]));
        assert_eq!(r.status, Status::Ok, "map {iova:#x} -> {gpa:#x}");
    }

    fn unmap(&self, iova: u64) {
        assert_eq!(self.op(Op::Unmap, iova), Status::Ok);
    }

    /// Writes `bytes` at IOVA `iova` as the driver would (through the
    /// translation, whatever the device permissions).
    fn write(&self, iova: u64, bytes: &[u8]) {
        let mut frags = [Fragment {
            hva: 0,
            gpa: 0,
            len: 0,
        }; 16];
        let n = self.driver_translate(iova, bytes.len() as u64, &mut frags);
        let mut off = 0;
        for f in &frags[..n] {
            let len = f.len as usize;
            self.mem
                .write_slice(&bytes[off..off + len], GuestAddress(f.gpa))
                .unwrap();
            off += len;
        }
    }

    fn read(&self, iova: u64, len: usize) -> Vec<u8> {
        let mut frags = [Fragment {
            hva: 0,
            gpa: 0,
            len: 0,
        }; 16];
        let n = self.driver_translate(iova, len as u64, &mut frags);
        let mut out = Vec::new();
        for f in &frags[..n] {
            let mut b = vec![0; f.len as usize];
            self.mem.read_slice(&mut b, GuestAddress(f.gpa)).unwrap();
            out.extend(b);
        }
        out
    }

    /// Where the driver's IOVA range is in guest memory, whatever the
    /// device may do with it.
    fn driver_translate(&self, iova: u64, len: u64, frags: &mut [Fragment]) -> usize {
        self.vm
            .translate(RID, iova, len, pvdma::Access::Read, frags)
            .or_else(|_| {
                self.vm
                    .translate(RID, iova, len, pvdma::Access::Write, frags)
            })
            .expect("driver access inside mapped space")
    }

    fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend(addr.to_le_bytes());
        d.extend(len.to_le_bytes());
        d.extend(flags.to_le_bytes());
        d.extend(next.to_le_bytes());
        self.write(table + u64::from(i) * 16, &d);
    }

    /// Publishes `heads` in the avail ring at `avail` (starting at slot 0).
    fn publish(&self, avail: u64, heads: &[u16]) {
        for (i, h) in heads.iter().enumerate() {
            self.write(avail + 4 + 2 * i as u64, &h.to_le_bytes());
        }
        self.write(avail + 2, &(heads.len() as u16).to_le_bytes());
    }

    fn used_idx(&self) -> u16 {
        let b = self.read(USED + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// The standard layout: rings at DESC/AVAIL/USED on scattered guest
    /// pages, size 16.
    fn queue(&self, features: u64) -> VirtQueue<'_> {
        self.map(DESC, 0x9000, Perm::READ);
        self.map(AVAIL, 0x3000, Perm::READ);
        self.map(USED, 0x6000, Perm::RW);
        VirtQueue::open(&self.vm, RID, cfg(features)).unwrap()
    }
}

fn cfg(features: u64) -> QueueConfig {
    QueueConfig {
        desc: DESC,
        avail: AVAIL,
        used: USED,
        size: 16,
        features,
    }
}

const Z: Fragment = Fragment {
    hva: 0,
    gpa: 0,
    len: 0,
};

/// The basic path: a 3-descriptor chain (header, data, status), each
/// buffer on its own scattered page; pop, read, write, push.
#[test]
fn three_descriptor_chain_round_trip() {
    let g = Guest::new();
    let mut q = g.queue(pvdma::VIRTIO_RING_F_EVENT_IDX);
    g.map(0x40000, 0x20000, Perm::READ);
    g.map(0x41000, 0x50000, Perm::READ);
    g.map(0x42000, 0x70000, Perm::WRITE);
    g.desc(DESC, 0, 0x40000, 16, NEXT, 1);
    g.desc(DESC, 1, 0x41000, 512, NEXT, 2);
    g.desc(DESC, 2, 0x42000, 1, WRITE, 0);
    g.write(0x40000, b"virtio-blk req!!");
    g.publish(AVAIL, &[0]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    let info = q.pop(&mut r, &mut w).unwrap().unwrap();
    assert_eq!((info.head, info.readable, info.writable), (0, 2, 1));
    assert_eq!((info.readable_bytes, info.writable_bytes), (528, 1));
    assert_eq!(
        (r[0].gpa, r[0].len, r[1].gpa, w[0].gpa),
        (0x20000, 16, 0x50000, 0x70000)
    );
    assert!(q.pop(&mut r, &mut w).unwrap().is_none(), "ring empty");
    q.push(info.head, 1).unwrap();
    assert_eq!(g.used_idx(), 1);
    // used_event 0 (never written): the first push notifies.
    assert!(q.needs_notification().unwrap());
    assert_eq!(q.cache_stats().rebuilds, 1, "rings translated once");
}

/// Hazard: a buffer that fragments into more iovecs than the caller gave.
/// No overflow, no silent truncation: the needed count comes back and the
/// chain stays on the ring.
#[test]
fn more_fragments_than_iovecs_reports_the_count_needed() {
    let g = Guest::new();
    let mut q = g.queue(0);
    for i in 0..4u64 {
        g.map(
            0x40000 + i * PAGE_SIZE,
            0x80000 - 2 * i * PAGE_SIZE,
            Perm::RW,
        );
    }
    g.desc(DESC, 3, 0x40000, 4 * PAGE_SIZE as u32, WRITE, 0);
    g.publish(AVAIL, &[3]);
    let (mut r, mut w) = ([Z; 1], [Z; 2]);
    match q.pop(&mut r, &mut w) {
        Err(VqError::TooSmall {
            head: 3,
            readable: 0,
            writable: 4,
        }) => {}
        other => panic!("expected TooSmall, got {other:?}"),
    }
    let mut w4 = [Z; 4];
    let info = q
        .pop(&mut r, &mut w4)
        .unwrap()
        .expect("chain kept on the ring");
    assert_eq!(
        (info.head, info.writable, info.writable_bytes),
        (3, 4, 4 * PAGE_SIZE)
    );
    assert!(w4.iter().all(|f| f.len == PAGE_SIZE));
}

/// Hazard: a chain that needs more fragments than MAX_CHAIN_FRAGMENTS. As
/// TooSmall it would ask for the same impossible count on every retry, and
/// a device model following the documented retry loop would spin: it is a
/// final BadChain, consumed. 65,537 IOVA pages alternate between two
/// non-adjacent guest pages, so no two fragments merge.
#[test]
fn chain_beyond_the_fragment_bound_is_a_final_error() {
    let g = Guest::new();
    let mut q = g.queue(0);
    let pages = pvdma::MAX_CHAIN_FRAGMENTS as u64 + 1;
    let base = 0x1000_0000;
    for i in 0..pages {
        let gpa = if i % 2 == 0 { 0x80000 } else { 0x82000 };
        g.map(base + i * PAGE_SIZE, gpa, Perm::RW);
    }
    g.desc(DESC, 0, base, (pages * PAGE_SIZE) as u32, WRITE, 0);
    g.publish(AVAIL, &[0]);
    let mut r = [Z; 1];
    let mut w = vec![Z; pvdma::MAX_CHAIN_FRAGMENTS];
    match q.pop(&mut r, &mut w) {
        Err(VqError::BadChain { head: 0, .. }) => {}
        other => panic!("expected BadChain, got {other:?}"),
    }
    assert_eq!(
        q.pop(&mut r, &mut w).unwrap(),
        None,
        "the chain is consumed"
    );
}

/// Hazard: devices must not depend on message framing. A 16-byte virtio
/// header split over two non-adjacent guest pages reads correctly through
/// virtio-queue's Reader, and a Writer writes across fragments.
#[test]
fn header_split_across_pages_reads_correctly() {
    let g = Guest::new();
    let mut q = g.queue(0);
    g.map(0x40000, 0x22000, Perm::READ);
    g.map(0x41000, 0x11000 + 0x40000, Perm::READ);
    g.map(0x50000, 0x77000, Perm::WRITE);
    g.map(0x51000, 0x33000, Perm::WRITE);
    let header: Vec<u8> = (1..=16).collect();
    g.write(0x40ff8, &header);
    g.desc(DESC, 0, 0x40ff8, 16, NEXT, 1);
    g.desc(DESC, 1, 0x50ffc, 8, WRITE, 0);
    g.publish(AVAIL, &[0]);
    q.with_queue(|queue, space| {
        let chain = queue.pop_descriptor_chain(space).unwrap();
        let mut reader = chain.clone().reader(space).unwrap();
        let mut got = [0u8; 16];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(got.to_vec(), header);
        let mut writer = chain.writer(space).unwrap();
        writer.write_all(b"ABCDEFGH").unwrap();
        queue.add_used(space, 0, 8).unwrap();
    })
    .unwrap();
    assert_eq!(g.read(0x50ffc, 8), b"ABCDEFGH");
    let mut tail = [0u8; 4];
    g.mem.read_slice(&mut tail, GuestAddress(0x33000)).unwrap();
    assert_eq!(&tail, b"EFGH", "second half on the second page");
}

/// Hazard: a ring crossing an unmapped page. Entries on the mapped page
/// work; the first on the unmapped one is a translation fault (recorded),
/// not a crash and not an access elsewhere.
#[test]
fn avail_ring_crossing_an_unmapped_page_faults_cleanly() {
    let g = Guest::new();
    g.map(DESC, 0x9000, Perm::READ);
    g.map(0x14000, 0x3000, Perm::READ); // 0x15000 stays unmapped
    g.map(USED, 0x6000, Perm::RW);
    g.map(0x40000, 0x20000, Perm::RW);
    let avail = 0x14ff8; // ring[0] at +0xffc, ring[1] at +0xffe, ring[2] unmapped
    let mut q = VirtQueue::open(&g.vm, RID, QueueConfig { avail, ..cfg(0) }).unwrap();
    for i in 0..3 {
        g.desc(DESC, i, 0x40000, 8, WRITE, 0);
    }
    g.write(avail + 4, &[0, 0, 1, 0]);
    g.write(avail + 2, &3u16.to_le_bytes());
    let (mut r, mut w) = ([Z; 2], [Z; 2]);
    assert_eq!(q.pop(&mut r, &mut w).unwrap().unwrap().head, 0);
    assert_eq!(q.pop(&mut r, &mut w).unwrap().unwrap().head, 1);
    match q.pop(&mut r, &mut w) {
        Err(VqError::Fault(f)) => assert_eq!(f.reason, FaultReason::Unmapped),
        other => panic!("expected a fault, got {other:?}"),
    }
    assert!(g.vm.fault_count() > 0, "the refused access is logged");
}

/// Hazard: an indirect table scattered over pages (it crosses a page
/// boundary onto a non-adjacent guest page).
#[test]
fn indirect_table_scattered_over_pages() {
    let g = Guest::new();
    let mut q = g.queue(pvdma::VIRTIO_RING_F_INDIRECT_DESC);
    g.map(0x30000, 0x44000, Perm::READ);
    g.map(0x31000, 0x2a000, Perm::READ);
    g.map(0x40000, 0x20000, Perm::RW);
    let table = 0x30fe0; // 4 descriptors: 2 on each page
    for i in 0..4u16 {
        let flags = if i < 3 { NEXT } else { 0 } | if i >= 2 { WRITE } else { 0 };
        g.desc(
            table,
            i,
            0x40000 + u64::from(i) * 0x100,
            0x100,
            flags,
            i + 1,
        );
    }
    g.desc(DESC, 5, table, 64, INDIRECT, 0);
    g.publish(AVAIL, &[5]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    let info = q.pop(&mut r, &mut w).unwrap().unwrap();
    assert_eq!(
        (info.head, info.readable, info.writable),
        (5, 1, 1),
        "adjacent buffers merge"
    );
    assert_eq!((info.readable_bytes, info.writable_bytes), (0x200, 0x200));
    assert_eq!((r[0].gpa, w[0].gpa), (0x20000, 0x20200));
}

/// Hazard: indirect inside indirect is a malformed chain, and an indirect
/// head without the negotiated feature is refused.
#[test]
fn nested_indirect_and_unnegotiated_indirect_are_rejected() {
    let g = Guest::new();
    let mut q = g.queue(pvdma::VIRTIO_RING_F_INDIRECT_DESC);
    g.map(0x30000, 0x44000, Perm::READ);
    g.map(0x40000, 0x20000, Perm::RW);
    g.desc(0x30000, 0, 0x30100, 32, INDIRECT, 0);
    g.desc(0x30100, 0, 0x40000, 8, 0, 0);
    g.desc(DESC, 0, 0x30000, 16, INDIRECT, 0);
    g.publish(AVAIL, &[0]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    assert!(matches!(
        q.pop(&mut r, &mut w),
        Err(VqError::BadChain { head: 0, .. })
    ));

    let g = Guest::new();
    let mut q = g.queue(0);
    g.map(0x30000, 0x44000, Perm::READ);
    g.map(0x40000, 0x20000, Perm::RW);
    g.desc(0x30000, 0, 0x40000, 8, 0, 0);
    g.desc(DESC, 0, 0x30000, 16, INDIRECT, 0);
    g.publish(AVAIL, &[0]);
    assert!(matches!(
        q.pop(&mut r, &mut w),
        Err(VqError::BadChain { head: 0, .. })
    ));
}

/// Hazard: chain loops and out-of-range next indices end in an error, in
/// at most queue-size steps.
#[test]
fn chain_loops_and_bad_indices_are_rejected() {
    let g = Guest::new();
    let mut q = g.queue(0);
    g.map(0x40000, 0x20000, Perm::RW);
    g.desc(DESC, 0, 0x40000, 8, NEXT, 1);
    g.desc(DESC, 1, 0x40000, 8, NEXT, 0); // loop 0 -> 1 -> 0
    g.desc(DESC, 2, 0x40000, 8, NEXT, 16); // next out of range
    g.desc(DESC, 3, 0x40000, 8, NEXT, 3); // self loop
    g.publish(AVAIL, &[0, 2, 3, 17]);
    let (mut r, mut w) = ([Z; 32], [Z; 32]);
    for head in [0, 2, 3] {
        match q.pop(&mut r, &mut w) {
            Err(VqError::BadChain { head: h, .. }) => assert_eq!(h, head),
            other => panic!("head {head}: expected BadChain, got {other:?}"),
        }
    }
    // A head index outside the table yields no descriptor at all.
    assert!(matches!(
        q.pop(&mut r, &mut w),
        Err(VqError::BadChain { head: 17, .. })
    ));
    // The queue keeps working after a bad chain.
    g.desc(DESC, 4, 0x40000, 8, 0, 0);
    g.write(AVAIL + 4 + 8, &4u16.to_le_bytes());
    g.write(AVAIL + 2, &5u16.to_le_bytes());
    assert_eq!(q.pop(&mut r, &mut w).unwrap().unwrap().head, 4);
}

/// Hazard: descriptor lengths whose sum overflows u32.
#[test]
fn lengths_overflowing_u32_are_rejected() {
    let g = Guest::new();
    let mut q = g.queue(0);
    g.map(0x40000, 0x20000, Perm::RW);
    g.desc(DESC, 0, 0x40000, 0x1000, NEXT, 1);
    g.desc(DESC, 1, 0x40000, u32::MAX, 0, 0);
    g.publish(AVAIL, &[0]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    assert!(matches!(
        q.pop(&mut r, &mut w),
        Err(VqError::BadChain { head: 0, .. })
    ));
}

/// Hazard: descriptors pointing outside mapped space: an unmapped IOVA,
/// one beyond IOVA_BITS, and a range that wraps the address space.
#[test]
fn descriptors_outside_mapped_space_fault() {
    let g = Guest::new();
    let mut q = g.queue(0);
    g.map(0x40000, 0x20000, Perm::RW);
    g.desc(DESC, 0, 0x40ff0, 0x20, 0, 0); // runs off the mapped page
    g.desc(DESC, 1, 1 << 60, 8, 0, 0);
    g.desc(DESC, 2, u64::MAX - 3, 8, 0, 0);
    g.publish(AVAIL, &[0, 1, 2]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    let reasons: Vec<_> = (0..3)
        .map(|_| match q.pop(&mut r, &mut w) {
            Err(VqError::Fault(f)) => f.reason,
            other => panic!("expected a fault, got {other:?}"),
        })
        .collect();
    assert_eq!(
        reasons,
        [
            FaultReason::Unmapped,
            FaultReason::Unmapped,
            FaultReason::Overflow
        ]
    );
}

/// Hazard: a device-writable buffer the guest mapped READ-only is refused
/// (pop and virtio-queue's Writer alike), and nothing is written.
#[test]
fn device_writable_buffer_mapped_read_only_is_refused() {
    let g = Guest::new();
    let mut q = g.queue(0);
    g.map(0x40000, 0x20000, Perm::READ);
    g.desc(DESC, 0, 0x40000, 8, WRITE, 0);
    g.publish(AVAIL, &[0, 0]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    match q.pop(&mut r, &mut w) {
        Err(VqError::Fault(f)) => {
            assert_eq!((f.iova, f.reason), (0x40000, FaultReason::Permission))
        }
        other => panic!("expected a permission fault, got {other:?}"),
    }
    q.with_queue(|queue, space| {
        let chain = queue.pop_descriptor_chain(space).unwrap();
        assert!(chain.writer(space).is_err());
        assert!(space.write_slice(&[1; 8], GuestAddress(0x40000)).is_err());
    })
    .unwrap();
    assert_eq!(g.read(0x40000, 8), [0; 8]);
}

/// Ring cache: unmapping the used ring makes the next push fail cleanly;
/// remapping it makes the queue work again. An unrelated UNMAP rebuilds
/// the cache without changing it.
#[test]
fn unmapping_the_used_ring_invalidates_the_cache() {
    let g = Guest::new();
    let mut q = g.queue(0);
    g.map(0x40000, 0x20000, Perm::RW);
    g.map(0x90000, 0x21000, Perm::RW);
    g.desc(DESC, 0, 0x40000, 8, WRITE, 0);
    g.publish(AVAIL, &[0, 0, 0]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    q.pop(&mut r, &mut w).unwrap().unwrap();
    q.push(0, 8).unwrap();
    let before = q.cache_stats();

    g.unmap(0x90000); // not a ring page
    q.pop(&mut r, &mut w).unwrap().unwrap();
    let after = q.cache_stats();
    assert_eq!(after.rebuilds, before.rebuilds + 1);
    assert_eq!(after.invalidations, before.invalidations, "rings unchanged");

    g.unmap(USED);
    match q.push(0, 8) {
        Err(VqError::Fault(f)) => assert_eq!(
            (f.iova, f.reason),
            (USED + 4 + 8, FaultReason::Unmapped),
            "used ring entry 1"
        ),
        other => panic!("expected a fault, got {other:?}"),
    }
    assert_eq!(q.cache_stats().invalidations, before.invalidations + 1);

    g.map(USED, 0x7000, Perm::RW); // remapped elsewhere
    q.push(0, 8).unwrap();
    assert_eq!(g.used_idx(), 2);
    q.pop(&mut r, &mut w).unwrap().unwrap();
    q.push(0, 8).unwrap();
    assert_eq!(g.used_idx(), 3);
}

/// Buffer page cache (software IOTLB): a MAP leaves it valid; an UNMAP of
/// a cached buffer page is seen by the very next access, even one made in
/// the same `with_queue` call, and a remap of the IOVA elsewhere is
/// translated afresh, never from the stale entry.
#[test]
fn unmapping_a_cached_buffer_page_is_seen_at_once() {
    let g = Guest::new();
    let mut q = g.queue(0);
    g.map(0x40000, 0x20000, Perm::RW);
    g.desc(DESC, 0, 0x40000, 8, WRITE, 0);
    g.publish(AVAIL, &[0, 0, 0, 0]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    q.pop(&mut r, &mut w).unwrap().unwrap();
    assert_eq!(w[0].gpa, 0x20000);
    q.push(0, 8).unwrap();
    let s0 = q.cache_stats();
    assert!(s0.misses >= 1, "the buffer page was walked and cached");

    // A MAP elsewhere does not invalidate: the next pop and push are
    // served from the caches, no table walk.
    g.map(0x80000, 0x30000, Perm::RW);
    q.pop(&mut r, &mut w).unwrap().unwrap();
    q.push(0, 8).unwrap();
    let s1 = q.cache_stats();
    assert_eq!((s1.misses, s1.rebuilds), (s0.misses, s0.rebuilds));

    // UNMAP + remap of the buffer IOVA onto another guest page.
    g.unmap(0x40000);
    g.map(0x40000, 0x21000, Perm::RW);
    q.pop(&mut r, &mut w).unwrap().unwrap();
    assert_eq!(w[0].gpa, 0x21000, "not the stale translation");
    q.push(0, 8).unwrap();

    // Inside one with_queue call: cache the page, unmap it, access again.
    q.with_queue(|_, space| {
        let mut b = [0u8; 8];
        space.read_slice(&mut b, GuestAddress(0x40000)).unwrap();
        space.write_slice(&[7; 8], GuestAddress(0x40000)).unwrap();
        g.unmap(0x40000);
        assert!(space.read_slice(&mut b, GuestAddress(0x40000)).is_err());
        assert_eq!(space.take_fault().unwrap().reason, FaultReason::Unmapped);
        assert!(space.write_slice(&[9; 8], GuestAddress(0x40000)).is_err());
        // Rings are still served, from the table now.
        let idx: u16 = space.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(idx, 4);
    })
    .unwrap();
    let mut page = [0u8; 8];
    g.mem.read_slice(&mut page, GuestAddress(0x21000)).unwrap();
    assert_eq!(
        page, [7; 8],
        "the write before the UNMAP landed, not the one after"
    );
    match q.pop(&mut r, &mut w) {
        Err(VqError::Fault(f)) => {
            assert_eq!((f.iova, f.reason), (0x40000, FaultReason::Unmapped))
        }
        other => panic!("expected an unmapped fault, got {other:?}"),
    }
}

/// The page cache keeps permissions: a READ-only page cached by a read is
/// still refused for a write, and a write-only page for a read.
#[test]
fn cached_pages_keep_their_permissions() {
    let g = Guest::new();
    let mut q = g.queue(0);
    g.map(0x40000, 0x20000, Perm::READ);
    g.map(0x41000, 0x21000, Perm::WRITE);
    q.with_queue(|_, space| {
        let mut b = [0u8; 4];
        space.read_slice(&mut b, GuestAddress(0x40000)).unwrap();
        space.read_slice(&mut b, GuestAddress(0x40010)).unwrap();
        assert!(space.write_slice(&b, GuestAddress(0x40000)).is_err());
        assert_eq!(space.take_fault().unwrap().reason, FaultReason::Permission);
        space.write_slice(&b, GuestAddress(0x41000)).unwrap();
        assert!(space.read_slice(&mut b, GuestAddress(0x41000)).is_err());
        assert_eq!(space.take_fault().unwrap().reason, FaultReason::Permission);
        // Across the two pages: all or nothing, whatever is cached.
        assert!(space
            .read_slice(&mut [0; 8], GuestAddress(0x40ffc))
            .is_err());
        assert!(space.write_slice(&[1; 8], GuestAddress(0x40ffc)).is_err());
    })
    .unwrap();
    assert_eq!(q.cache_stats().misses, 2, "one walk per page");
    assert_eq!(g.read(0x40ffc, 4), [0; 4]);
}

/// DETACH removes every ring page: with bypass off the next operation is
/// refused as blocked; after re-attach and re-map the queue works.
#[test]
fn detach_invalidates_the_cache() {
    let g = Guest::with(VmConfig {
        bypass: false,
        ..VmConfig::default()
    });
    let mut q = g.queue(0);
    g.map(0x40000, 0x20000, Perm::RW);
    g.desc(DESC, 0, 0x40000, 8, WRITE, 0);
    g.publish(AVAIL, &[0, 0]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    q.pop(&mut r, &mut w).unwrap().unwrap();
    assert_eq!(g.op(Op::Detach, 0), Status::Ok);
    match q.push(0, 8) {
        Err(VqError::Fault(f)) => assert_eq!(f.reason, FaultReason::Blocked),
        other => panic!("expected blocked, got {other:?}"),
    }
    assert_eq!(g.op(Op::Attach, 0), Status::Ok);
    g.map(DESC, 0x9000, Perm::READ);
    g.map(AVAIL, 0x3000, Perm::READ);
    g.map(USED, 0x6000, Perm::RW);
    g.map(0x40000, 0x20000, Perm::RW);
    q.push(0, 8).unwrap();
    assert_eq!(q.pop(&mut r, &mut w).unwrap().unwrap().head, 0);
}

/// EVENT_IDX: the device notifies only when used_event is crossed.
#[test]
fn event_idx_suppresses_notifications() {
    let g = Guest::new();
    let mut q = g.queue(pvdma::VIRTIO_RING_F_EVENT_IDX);
    g.map(0x40000, 0x20000, Perm::RW);
    g.desc(DESC, 0, 0x40000, 8, WRITE, 0);
    g.write(AVAIL + 4 + 2 * 16, &5u16.to_le_bytes()); // used_event = 5
    g.publish(AVAIL, &[0, 0]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    q.pop(&mut r, &mut w).unwrap().unwrap();
    q.push(0, 0).unwrap();
    assert!(
        !q.needs_notification().unwrap(),
        "used idx 1 does not cross 5"
    );
}

/// The IovaSpace is a GuestMemory: virtio-queue's is_valid checks ring
/// permissions through it (the used ring must be device-writable).
#[test]
fn queue_validity_honours_permissions() {
    let g = Guest::new();
    g.map(DESC, 0x9000, Perm::READ);
    g.map(AVAIL, 0x3000, Perm::READ);
    g.map(USED, 0x6000, Perm::READ);
    let mut q = VirtQueue::open(&g.vm, RID, cfg(0)).unwrap();
    assert!(!q.with_queue(|queue, space| queue.is_valid(space)).unwrap());
    g.unmap(USED);
    g.map(USED, 0x6000, Perm::RW);
    assert!(q.with_queue(|queue, space| queue.is_valid(space)).unwrap());
    let guard = epoch::pin();
    let (dom, ram) = g.vm.dma_view(RID, &guard).unwrap();
    let space = IovaSpace::new(dom, ram, &guard);
    let mut queue = virtio_queue::Queue::new(16).unwrap();
    assert!(queue.iter(&space).is_err(), "not ready");
}

/// Packed rings are refused at open, with a reason.
#[test]
fn packed_rings_are_refused() {
    let g = Guest::new();
    assert!(matches!(
        VirtQueue::open(&g.vm, RID, cfg(pvdma::VIRTIO_F_RING_PACKED)),
        Err(VqError::PackedUnsupported)
    ));
    assert!(VirtQueue::open(&g.vm, RID, QueueConfig { size: 3, ..cfg(0) }).is_err());
    assert!(VirtQueue::open(
        &g.vm,
        RID,
        QueueConfig {
            desc: DESC + 8,
            ..cfg(0)
        }
    )
    .is_err());
}

/// The fuzz target's entry point on many pseudo-random inputs (the
/// cargo-fuzz target calls the same function).
#[test]
fn fuzz_entry_point_on_random_inputs() {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for len in (0..2000).step_by(7) {
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        pvdma::testing::fuzz::virtqueue(&data);
    }
}

/// Rule 2 of queued requests (ABI 3.2) in the virtqueue path: a buffer or
/// ring page whose MAP is still queued is applied by the refused access,
/// which then succeeds; a refusal no drain lifts is recorded once and the
/// chain consumed as before.
#[test]
fn queued_maps_are_applied_before_a_ring_or_buffer_access_is_refused() {
    use pvdma::testing::{map_entry, queue_setup_req, GuestQueue};
    let g = Guest::new();
    let mut q = g.queue(0);
    let (ctrl, ring) = (0xe0000, 0xe1000);
    assert_eq!(
        g.vm.execute(&queue_setup_req(RID, 0, ctrl, ring, 0x1000))
            .status,
        Status::Ok
    );
    let mut gq = GuestQueue::new(&g.mem, ctrl, ring, 0x1000);
    gq.push(
        &g.mem,
        &map_entry(RID, Perm::READ, 0x40000, 0x20000, PAGE_SIZE),
    );
    g.desc(DESC, 0, 0x40000, 16, 0, 0);
    g.publish(AVAIL, &[0]);
    let (mut r, mut w) = ([Z; 4], [Z; 4]);
    let info = q.pop(&mut r, &mut w).unwrap().unwrap();
    assert_eq!((info.head, r[0].gpa), (0, 0x20000));
    assert_eq!(g.vm.stats().faults, 0);
    // The used ring moves to a page whose MAP is queued.
    g.unmap(USED);
    gq.push(&g.mem, &map_entry(RID, Perm::RW, USED, 0x6000, PAGE_SIZE));
    q.push(info.head, 16).unwrap();
    assert_eq!(g.used_idx(), 1);
    let s = g.vm.stats();
    assert_eq!((s.faults, s.miss_drains, s.queue_entries), (0, 2, 2));
    // Nothing queued for this one: one fault, chain consumed.
    g.desc(DESC, 1, 0x50000, 16, 0, 0);
    g.write(AVAIL + 4 + 2, &1u16.to_le_bytes());
    g.write(AVAIL + 2, &2u16.to_le_bytes());
    match q.pop(&mut r, &mut w) {
        Err(VqError::Fault(f)) => assert_eq!(f.reason, FaultReason::Unmapped),
        other => panic!("expected a fault, got {other:?}"),
    }
    assert_eq!(g.vm.stats().faults, 1);
    assert_eq!(q.pop(&mut r, &mut w).unwrap(), None, "consumed");
}
