// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Split virtqueues through pvdma translations.
//!
//! [`VirtQueue`] wraps a `virtio_queue::Queue` whose ring addresses are
//! IOVAs of one endpoint. Every operation pins an epoch guard, builds an
//! [`IovaSpace`] over the endpoint's current domain and lets virtio-queue
//! do the ring work through it. Rust device models use
//! [`VirtQueue::with_queue`] and virtio-queue's own API (chains, `Reader`,
//! `Writer`); C device models use the strict, iovec-producing operations
//! ([`VirtQueue::pop`], [`VirtQueue::push`], ...) behind `vq_ffi`.
//!
//! Caches (the vhost lesson: one table walk per access is too slow): the
//! descriptor table, avail ring and used ring are translated once into
//! [`CachedWindow`]s, and a per-queue [`PageCache`] (a small software
//! IOTLB) keeps the translations of the ring pages and of recently used
//! buffer pages. Both are keyed on the domain's
//! [`generation`](crate::domain::Domain::generation), which changes only
//! when a translation is removed (UNMAP, DETACH, RAM removal), and on the
//! [`RamLayout::id`](crate::ram::RamLayout::id). The generation is compared
//! before every cached access, so a removal is seen by the next access;
//! on a key change the caches are reset and the windows rebuilt from the
//! table before the next access. A ring that no longer translates is left
//! out, so accesses to it go through the table and fail cleanly, and the
//! windows are retried on every operation until the ring is mapped again.
//!
//! Packed virtqueues are not supported: virtio-queue 0.18 provides the
//! packed descriptor layout but no packed ring queue; [`VirtQueue::open`]
//! refuses `VIRTIO_F_RING_PACKED`.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::domain::{FaultReason, FragmentSink, TranslateFault};
use crate::iova_space::{CachedWindow, IovaSpace, PageCache};
use crate::sync::epoch;
use crate::types::{Access, Fragment, Perm};
use crate::vm::{EndpointCache, Vm};

/// `VIRTIO_RING_F_INDIRECT_DESC`: the driver may use indirect tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`: used_event / avail_event suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_F_RING_PACKED`: packed virtqueues (not supported).
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
/// Largest split queue size (virtio 1.x).
pub const MAX_QUEUE_SIZE: u16 = 32768;

const VRING_DESC_F_INDIRECT: u16 = 4;

/// Why a virtqueue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The queue configuration is unusable.
    #[error("invalid queue configuration: {0}")]
    Config(&'static str),
    /// Packed virtqueues were negotiated.
    #[error("packed virtqueues are not supported (virtio-queue 0.18 has no packed ring)")]
    PackedUnsupported,
    /// A device access was refused (and recorded in the VM's fault log).
    #[error(transparent)]
    Fault(#[from] TranslateFault),
    /// The driver put a malformed chain on the ring. The chain is consumed;
    /// the device should return it with length 0 or ask for a reset.
    #[error("malformed descriptor chain at head {head}: {reason}")]
    BadChain {
        /// Head index of the chain.
        head: u16,
        /// What is wrong.
        reason: &'static str,
    },
    /// The driver corrupted the ring itself (e.g. avail idx too far ahead).
    #[error("driver error in the rings: {0}")]
    Driver(virtio_queue::Error),
    /// The caller's iovec arrays are too small. The chain is left on the
    /// ring; call again with at least these many entries.
    #[error("chain at head {head} needs {readable} readable and {writable} writable entries")]
    TooSmall {
        /// Head index of the chain.
        head: u16,
        /// Readable entries needed.
        readable: usize,
        /// Writable entries needed.
        writable: usize,
    },
    /// A used entry names a descriptor the queue does not have.
    #[error("descriptor index {0} is outside the queue")]
    InvalidHead(u16),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The most fragments one side (readable or writable) of a chain may need.
/// A chain can need far more (one 4 GiB descriptor over scattered pages is
/// a million), and asking the caller for arrays that large would only turn
/// [`Error::TooSmall`] into a retry loop that never ends: such a chain is an
/// [`Error::BadChain`] instead, consumed like any other malformed chain.
pub const MAX_CHAIN_FRAGMENTS: usize = 1 << 16;

/// Where a split queue's rings are, in the endpoint's IOVA space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Descriptor table IOVA (16-byte aligned).
    pub desc: u64,
    /// Avail ring IOVA (2-byte aligned).
    pub avail: u64,
    /// Used ring IOVA (4-byte aligned).
    pub used: u64,
    /// Queue size, a power of two in 1..=32768.
    pub size: u16,
    /// Negotiated feature bits (`VIRTIO_RING_F_*`, `VIRTIO_F_*`).
    pub features: u64,
}

/// What [`VirtQueue::pop`] returns for a chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainInfo {
    /// Head index: give it back to [`VirtQueue::push`].
    pub head: u16,
    /// Readable (device reads) fragments stored.
    pub readable: usize,
    /// Writable (device writes) fragments stored.
    pub writable: usize,
    /// Bytes the device may read.
    pub readable_bytes: u64,
    /// Bytes the device may write.
    pub writable_bytes: u64,
}

/// Counters of the ring cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Times the ring windows were (re)built.
    pub rebuilds: u64,
    /// Rebuilds whose result differed from the cache they replaced (a ring
    /// page was unmapped or moved).
    pub invalidations: u64,
    /// Table walks made while the caches were current (each fills the
    /// buffer page cache): accesses neither the ring windows nor the page
    /// cache could serve.
    pub misses: u64,
}

/// The three rings, translated, and the buffer pages used lately.
#[derive(Default)]
struct RingCache {
    /// `(domain generation, RAM layout id)` the windows were built for;
    /// `None`: rebuild before the next access.
    key: Option<(u64, u64)>,
    windows: Vec<CachedWindow>,
    /// The software IOTLB of buffer pages; its key is the one the windows
    /// are served under.
    pages: PageCache,
    endpoint: EndpointCache,
    stats: CacheStats,
}

/// A split virtqueue of endpoint `rid`, its rings in the endpoint's IOVA
/// space. Single-threaded like `virtio_queue::Queue`; `Send`.
pub struct VirtQueue<'vm> {
    vm: &'vm Vm,
    rid: u32,
    queue: Queue,
    features: u64,
    cache: RingCache,
}

impl std::fmt::Debug for VirtQueue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtQueue")
            .field("rid", &self.rid)
            .field("queue", &self.queue)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl<'vm> VirtQueue<'vm> {
    /// Opens a queue of endpoint `rid` (which need not be attached yet: the
    /// domain is looked up on every operation).
    pub fn open(vm: &'vm Vm, rid: u32, cfg: QueueConfig) -> Result<Self> {
        if cfg.features & VIRTIO_F_RING_PACKED != 0 {
            return Err(Error::PackedUnsupported);
        }
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(|_| Error::Config("queue"))?;
        queue
            .try_set_size(cfg.size)
            .map_err(|_| Error::Config("size is not a power of two in 1..=32768"))?;
        queue
            .try_set_desc_table_address(GuestAddress(cfg.desc))
            .map_err(|_| Error::Config("descriptor table is not 16-byte aligned"))?;
        queue
            .try_set_avail_ring_address(GuestAddress(cfg.avail))
            .map_err(|_| Error::Config("avail ring is not 2-byte aligned"))?;
        queue
            .try_set_used_ring_address(GuestAddress(cfg.used))
            .map_err(|_| Error::Config("used ring is not 4-byte aligned"))?;
        if cfg.avail == 0 {
            // virtio-queue treats avail address 0 as "not configured".
            return Err(Error::Config("avail ring at IOVA 0"));
        }
        queue.set_event_idx(cfg.features & VIRTIO_RING_F_EVENT_IDX != 0);
        queue.set_ready(true);
        Ok(VirtQueue {
            vm,
            rid,
            queue,
            features: cfg.features,
            cache: RingCache::default(),
        })
    }

    /// The endpoint.
    pub fn requester(&self) -> u32 {
        self.rid
    }

    /// The ring cache counters.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            misses: self.cache.pages.misses(),
            ..self.cache.stats
        }
    }

    /// The queue's IOVA ranges and the permission each needs:
    /// `(iova, len, perm)` for desc, avail, used.
    fn ring_ranges(&self) -> [(u64, u64, Perm); 3] {
        let size = u64::from(self.queue.size());
        let event = if self.queue.event_idx_enabled() { 2 } else { 0 };
        [
            (self.queue.desc_table(), 16 * size, Perm::READ),
            (self.queue.avail_ring(), 4 + 2 * size + event, Perm::READ),
            (self.queue.used_ring(), 4 + 8 * size + event, Perm::WRITE),
        ]
    }

    /// Runs `f` with the queue and the endpoint's IOVA space (rings served
    /// from the cache). The way Rust device models use virtio-queue's own
    /// API: `q.pop_descriptor_chain(space)`, `chain.reader(space)`,
    /// `q.add_used(space, ..)`. A refused access is recorded as a fault;
    /// one refused for want of a mapping or permission also drains the
    /// VM's request queues, so that the caller's retry sees what the guest
    /// had queued (the queued-request rule 2 for closures that cannot be
    /// run twice; [`VirtQueue::pop`] and [`VirtQueue::push`] retry
    /// themselves).
    pub fn with_queue<R>(&mut self, f: impl FnOnce(&mut Queue, &IovaSpace<'_>) -> R) -> Result<R> {
        let guard = epoch::pin();
        let (dom, ram) = self
            .vm
            .dma_view_cached(self.rid, &guard, &mut self.cache.endpoint)
            .inspect_err(|f| {
                self.vm
                    .record_fault(self.rid, f.iova, Access::Read, f.reason);
            })?;
        // The generation is read before the windows are built from the
        // table: a removal racing with the build changes it, and the
        // space then serves nothing from them.
        let key = (dom.map_or(0, |d| d.generation()), ram.id());
        if self.cache.pages.key() != Some(key) {
            self.cache.pages.reset(Some(key));
        }
        if self.cache.key != Some(key) {
            self.rebuild_windows(key, dom, ram, &guard);
        }
        let space = IovaSpace::with_cache(dom, ram, &guard, &self.cache.windows, &self.cache.pages);
        let r = f(&mut self.queue, &space);
        if let Some(fault) = space.take_fault() {
            self.vm
                .record_fault(self.rid, fault.iova, Access::Read, fault.reason);
            // Rule 2 of ABI 3.2 cannot run the caller's closure again: the
            // drain makes the caller's retry find what was queued.
            if Vm::drainable(fault.reason) {
                self.vm.drain_for_miss();
            }
        }
        Ok(r)
    }

    #[cold]
    fn rebuild_windows(
        &mut self,
        key: (u64, u64),
        dom: Option<&crate::domain::Domain>,
        ram: &crate::ram::RamLayout,
        guard: &epoch::Guard,
    ) {
        let ranges = self.ring_ranges();
        // From the table, filling the page cache (reset to `key` by the
        // caller) with the ring pages as it goes.
        let plain = IovaSpace::with_cache(dom, ram, guard, &[], &self.cache.pages);
        let mut complete = true;
        let mut windows = Vec::with_capacity(3);
        for (iova, len, need) in ranges {
            match plain.cache_window(iova, len, need) {
                Ok(w) => windows.push(w),
                Err(_) => complete = false,
            }
        }
        let stats = &mut self.cache.stats;
        stats.rebuilds += 1;
        let same = windows.len() == self.cache.windows.len()
            && windows
                .iter()
                .zip(&self.cache.windows)
                .all(|(a, b)| a.same_translation(b));
        if self.cache.key.is_some() && !same {
            stats.invalidations += 1;
        }
        self.cache.windows = windows;
        // Incomplete (a ring is not mapped): try again next time, as a
        // MAP does not change the generation.
        self.cache.key = complete.then_some(key);
    }

    /// Pops the next available chain and translates its buffers into host
    /// fragments: device-readable ones into `readable`, device-writable
    /// ones into `writable`. `Ok(None)` when no chain is available.
    ///
    /// Strict where virtio-queue is lenient: a chain that ends early
    /// (loop, index out of range, nested or malformed indirect table,
    /// lengths summing past u32, an unreadable descriptor) is an error, not
    /// a shorter chain; so is a readable descriptor after a writable one, or
    /// an indirect head without `VIRTIO_RING_F_INDIRECT_DESC`. When an array
    /// is too small nothing is lost: [`Error::TooSmall`] says how many
    /// entries each side needs and the chain stays on the ring.
    ///
    /// Rule 2 of the queued requests (ABI 3.2): a buffer or ring access
    /// refused for want of a mapping or permission puts the chain back,
    /// drains the VM's request queues and pops it once more; only a second
    /// refusal is recorded as a fault.
    pub fn pop(
        &mut self,
        readable: &mut [Fragment],
        writable: &mut [Fragment],
    ) -> Result<Option<ChainInfo>> {
        let deferred = std::cell::Cell::new(false);
        let r = self.pop_once(readable, writable, &deferred);
        if !deferred.get() {
            return r;
        }
        self.vm.drain_for_miss();
        self.pop_once(readable, writable, &std::cell::Cell::new(true))
    }

    /// One attempt of [`VirtQueue::pop`]. With `deferred` false, a
    /// refusal that a drain may lift is not recorded: `deferred` is set
    /// and the chain put back for the retry.
    fn pop_once(
        &mut self,
        readable: &mut [Fragment],
        writable: &mut [Fragment],
        deferred: &std::cell::Cell<bool>,
    ) -> Result<Option<ChainInfo>> {
        let indirect_ok = self.features & VIRTIO_RING_F_INDIRECT_DESC != 0;
        let rid = self.rid;
        let vm = self.vm;
        let may_defer = !deferred.get();
        let popped = std::cell::Cell::new(false);
        self.with_queue(|queue, space| {
            let refused = |space: &IovaSpace<'_>, access| {
                let f = space.take_fault().unwrap_or(TranslateFault {
                    iova: 0,
                    reason: FaultReason::Unmapped,
                });
                if may_defer && Vm::drainable(f.reason) && vm.queues_active() {
                    deferred.set(true);
                } else {
                    vm.record_fault(rid, f.iova, access, f.reason);
                }
                Error::Fault(f)
            };
            let r = Self::pop_chain(
                queue,
                space,
                indirect_ok,
                readable,
                writable,
                &refused,
                &popped,
            );
            if may_defer && deferred.get() && popped.get() {
                queue.go_to_previous_position();
            }
            r
        })?
    }

    /// The chain walk of [`VirtQueue::pop_once`].
    fn pop_chain(
        queue: &mut Queue,
        space: &IovaSpace<'_>,
        indirect_ok: bool,
        readable: &mut [Fragment],
        writable: &mut [Fragment],
        refused: &dyn Fn(&IovaSpace<'_>, Access) -> Error,
        popped: &std::cell::Cell<bool>,
    ) -> Result<Option<ChainInfo>> {
        {
            let mut iter = match queue.iter(space) {
                Ok(iter) => iter,
                Err(virtio_queue::Error::GuestMemory(_)) => {
                    return Err(refused(space, Access::Read))
                }
                Err(e) => return Err(Error::Driver(e)),
            };
            let Some(chain) = iter.next() else {
                // Empty, or the avail ring entry could not be read.
                if space.has_fault() {
                    return Err(refused(space, Access::Read));
                }
                return Ok(None);
            };
            popped.set(true);
            let head = chain.head_index();
            let bad = |reason| Error::BadChain { head, reason };
            if !indirect_ok {
                let at = queue.desc_table() + u64::from(head) * 16;
                match space.read_obj::<Descriptor>(GuestAddress(at)) {
                    Ok(d) if d.flags() & VRING_DESC_F_INDIRECT != 0 => {
                        return Err(bad(
                            "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC",
                        ))
                    }
                    Ok(_) => {}
                    Err(_) => return Err(refused(space, Access::Read)),
                }
            }
            let mut rsink = FragmentSink::new(readable);
            let mut wsink = FragmentSink::new(writable);
            let mut info = ChainInfo {
                head,
                ..ChainInfo::default()
            };
            let (mut count, mut last_has_next, mut seen_writable) = (0u32, false, false);
            for desc in chain {
                count += 1;
                last_has_next = desc.has_next();
                let (sink, need, bytes) = if desc.is_write_only() {
                    seen_writable = true;
                    (&mut wsink, Perm::WRITE, &mut info.writable_bytes)
                } else if seen_writable {
                    return Err(bad(
                        "device-readable descriptor after a device-writable one",
                    ));
                } else {
                    (&mut rsink, Perm::READ, &mut info.readable_bytes)
                };
                let len = u64::from(desc.len());
                let access = if need == Perm::WRITE {
                    Access::Write
                } else {
                    Access::Read
                };
                if space.translate(desc.addr().0, len, need, sink).is_err() {
                    return Err(refused(space, access));
                }
                *bytes += len;
            }
            if count == 0 || last_has_next {
                // virtio-queue's walk ends silently on any error: tell a
                // refused descriptor read from a malformed chain.
                if space.has_fault() {
                    return Err(refused(space, Access::Read));
                }
                return Err(bad(
                    "chain ends early (loop, index out of range, nested or malformed indirect table, or lengths past u32)",
                ));
            }
            info.readable = rsink.count();
            info.writable = wsink.count();
            if info.readable > MAX_CHAIN_FRAGMENTS || info.writable > MAX_CHAIN_FRAGMENTS {
                return Err(bad("chain needs more than MAX_CHAIN_FRAGMENTS fragments"));
            }
            if info.readable > readable.len() || info.writable > writable.len() {
                // Leave the chain on the ring for a retry with bigger arrays.
                queue.go_to_previous_position();
                return Err(Error::TooSmall {
                    head,
                    readable: info.readable,
                    writable: info.writable,
                });
            }
            Ok(Some(info))
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    ///
    /// A used-ring write refused for want of a mapping or permission
    /// drains the VM's request queues and is tried once more (rule 2 of
    /// ABI 3.2; the entry and idx are simply written again).
    pub fn push(&mut self, head: u16, len: u32) -> Result<()> {
        let deferred = std::cell::Cell::new(false);
        let r = self.push_once(head, len, &deferred);
        if !deferred.get() {
            return r;
        }
        self.vm.drain_for_miss();
        self.push_once(head, len, &std::cell::Cell::new(true))
    }

    /// One attempt of [`VirtQueue::push`], deferring as
    /// [`VirtQueue::pop_once`] does.
    fn push_once(&mut self, head: u16, len: u32, deferred: &std::cell::Cell<bool>) -> Result<()> {
        let may_defer = !deferred.get();
        let (vm, rid) = (self.vm, self.rid);
        self.with_queue(|queue, space| match queue.add_used(space, head, len) {
            Ok(()) => Ok(()),
            Err(virtio_queue::Error::InvalidDescriptorIndex) => Err(Error::InvalidHead(head)),
            Err(virtio_queue::Error::GuestMemory(_))
            | Err(virtio_queue::Error::AddressOverflow) => {
                let f = space.take_fault().unwrap_or(TranslateFault {
                    iova: queue.used_ring(),
                    reason: FaultReason::Overflow,
                });
                if may_defer && Vm::drainable(f.reason) && vm.queues_active() {
                    deferred.set(true);
                } else {
                    vm.record_fault(rid, f.iova, Access::Write, f.reason);
                }
                Err(Error::Fault(f))
            }
            Err(e) => Err(Error::Driver(e)),
        })?
    }

    /// Whether the driver wants an interrupt for the entries pushed since
    /// the last call (`used_event` with EVENT_IDX, else always).
    pub fn needs_notification(&mut self) -> Result<bool> {
        self.again(|vq| vq.needs_notification_once())
    }

    fn needs_notification_once(&mut self) -> Result<bool> {
        self.with_queue(|queue, space| {
            queue
                .needs_notification(space)
                .map_err(|e| match space.take_fault() {
                    Some(f) => Error::Fault(f),
                    None => Error::Driver(e),
                })
        })?
    }

    /// Asks the driver for notifications again; true when chains arrived
    /// meanwhile (process them before sleeping).
    pub fn enable_notification(&mut self) -> Result<bool> {
        self.again(|vq| vq.enable_notification_once())
    }

    fn enable_notification_once(&mut self) -> Result<bool> {
        self.with_queue(|queue, space| {
            queue
                .enable_notification(space)
                .map_err(|e| match space.take_fault() {
                    Some(f) => Error::Fault(f),
                    None => Error::Driver(e),
                })
        })?
    }

    /// Asks the driver not to notify.
    pub fn disable_notification(&mut self) -> Result<()> {
        self.again(|vq| vq.disable_notification_once())
    }

    fn disable_notification_once(&mut self) -> Result<()> {
        self.with_queue(|queue, space| {
            queue
                .disable_notification(space)
                .map_err(|e| match space.take_fault() {
                    Some(f) => Error::Fault(f),
                    None => Error::Driver(e),
                })
        })?
    }

    /// Runs `op`, and once more after draining the VM's request queues
    /// when it was refused for want of a mapping or permission (rule 2 of
    /// ABI 3.2). For operations that record no fault themselves.
    fn again<R>(&mut self, op: impl Fn(&mut Self) -> Result<R>) -> Result<R> {
        match op(self) {
            Err(Error::Fault(f)) if Vm::drainable(f.reason) && self.vm.drain_for_miss() => op(self),
            r => r,
        }
    }

    /// The next avail index the device will read (for migration/debug).
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// The next used index the device will write.
    pub fn next_used(&self) -> u16 {
        self.queue.next_used()
    }

    /// The avail idx the driver published (Acquire, as virtio-queue reads
    /// it before walking chains).
    pub fn avail_idx(&mut self) -> Result<u16> {
        self.with_queue(|queue, space| {
            // Acquire pairs with the driver's write barrier before its idx
            // update (virtio's avail ring protocol).
            queue
                .avail_idx(space, Ordering::Acquire)
                .map(|w| w.0)
                .map_err(Error::Driver)
        })?
    }
}
