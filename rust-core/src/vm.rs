// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VM: guest RAM, endpoints and their domains, the pin table, the
//! request engine every transport calls, notifications, faults, statistics.
//!
//! Locking: readers ([`Vm::translate`]) take no lock: the endpoint map, each
//! endpoint's domain pointer, the RAM layout and the page tables are all
//! epoch-protected. Requests on one endpoint are serialised by that
//! endpoint's `op_lock` (so the outcome of concurrent requests is that of
//! some serial order); the pin table has its own lock, taken last. Lock
//! order: `endpoints_writer` -> `op_lock` -> domain -> table writer -> pins.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{
    AtomicBool as StdAtomicBool, AtomicPtr as StdAtomicPtr, AtomicU64 as StdAtomicU64,
    Ordering as StdOrdering,
};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::abi::{self, Op, Status};
use crate::domain::{
    self, Domain, FaultReason, FragmentSink, IovaChoice, Mapping, MemBudget, PageRun, Removed,
};
use crate::iotlb::Iotlb;
use crate::pin::{PinMode, PinTable};
use crate::ram::{self, GuestRam, RamLayout, RamRegion};
use crate::sync::epoch::{self, Atomic, Guard, Owned, Shared};
use crate::sync::{AtomicU64, Ordering};
use crate::table::{MAX_IOVA_BITS, MIN_IOVA_BITS};
use crate::types::{Access, Fragment, Perm};

/// Errors of the embedder-facing (not guest-facing) API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The requester ID is already registered.
    #[error("endpoint {0:#06x} already exists")]
    EndpointExists(u32),
    /// No such endpoint.
    #[error("no endpoint {0:#06x}")]
    NoEndpoint(u32),
    /// A RAM region operation failed.
    #[error(transparent)]
    Ram(#[from] ram::Error),
    /// Migration state could not be applied.
    #[error("bad migration state: {0}")]
    State(String),
}

/// Result alias for the embedder-facing API.
pub type Result<T> = std::result::Result<T, Error>;

/// Default IOVA width.
pub const DEFAULT_IOVA_BITS: u32 = 48;
/// Default MAX_SEGS.
pub const DEFAULT_MAX_SEGS: u32 = 512;
/// Largest MAX_SEGS accepted (bounds one request block to ~1 MiB).
pub const MAX_MAX_SEGS: u32 = 65536;
/// Default number of fault records kept.
pub const DEFAULT_FAULT_LOG_LEN: usize = 64;

/// Per-VM configuration, fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// IOVA width, 21..=57 bits.
    pub iova_bits: u32,
    /// Most segments one MAP may carry (>= 252).
    pub max_segs: u32,
    /// Pin limit in bytes (u64::MAX: unlimited).
    pub pin_limit: u64,
    /// Host memory the VM's mappings may take, page-table nodes and
    /// mapping records, in bytes (u64::MAX: unlimited). A MAP that would
    /// pass it gets QUOTA.
    pub mem_limit: u64,
    /// Whether pinning mlocks pages.
    pub pin_mode: PinMode,
    /// Unattached endpoints bypass translation (else they are blocked).
    pub bypass: bool,
    /// MAP without FIXED is allowed (the host picks the IOVA).
    pub host_iova: bool,
    /// The UNMAP_LIST extension (op 6, FEATURES bit 3) is offered; without
    /// it op 6 is an unknown op.
    pub unmap_list: bool,
    /// Fault records kept.
    pub fault_log_len: usize,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            iova_bits: DEFAULT_IOVA_BITS,
            max_segs: DEFAULT_MAX_SEGS,
            pin_limit: u64::MAX,
            mem_limit: u64::MAX,
            pin_mode: PinMode::None,
            bypass: true,
            host_iova: true,
            unmap_list: true,
            fault_log_len: DEFAULT_FAULT_LOG_LEN,
        }
    }
}

impl VmConfig {
    /// Checks every value; the error says which and why.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_IOVA_BITS..=MAX_IOVA_BITS).contains(&self.iova_bits) {
            return Err(Error::Config(format!(
                "iova-bits {} outside {MIN_IOVA_BITS}..={MAX_IOVA_BITS}",
                self.iova_bits
            )));
        }
        if !(abi::PVDMA_MIN_MAX_SEGS..=MAX_MAX_SEGS).contains(&self.max_segs) {
            return Err(Error::Config(format!(
                "max-segs {} outside {}..={MAX_MAX_SEGS}",
                self.max_segs,
                abi::PVDMA_MIN_MAX_SEGS
            )));
        }
        if self.fault_log_len == 0 || self.fault_log_len > 65536 {
            return Err(Error::Config(format!(
                "fault log length {} outside 1..=65536",
                self.fault_log_len
            )));
        }
        Ok(())
    }

    /// The FEATURES register bits this configuration implies (the
    /// transport adds HYPERCALL when it is live).
    pub fn features(&self) -> u64 {
        let mut f = 0;
        if self.host_iova {
            f |= u64::from(abi::PVDMA_FEATURE_HOST_IOVA);
        }
        if self.bypass {
            f |= u64::from(abi::PVDMA_FEATURE_BYPASS);
        }
        if self.unmap_list {
            f |= u64::from(abi::PVDMA_FEATURE_UNMAP_LIST);
        }
        f
    }

    /// Decodes a request's `op` as this VM offers ops: `None` for an
    /// unknown op, which UNMAP_LIST is when the extension is off.
    pub fn op(&self, raw: u16) -> Option<Op> {
        match Op::from_raw(raw) {
            Some(Op::UnmapList) if !self.unmap_list => None,
            op => op,
        }
    }

    /// The PAGE_SIZES register: 4 KiB and 2 MiB.
    pub fn page_sizes(&self) -> u64 {
        (1 << 12) | (1 << 21)
    }
}

/// Whether a notification adds or removes a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapEventKind {
    /// A translation was added.
    Map = 1,
    /// A translation was removed.
    Unmap = 2,
}

/// A notification: `len` bytes at `iova` translate (or translated) to
/// guest-physical `gpa` for endpoint `requester`. Page aligned; one event
/// per run contiguous in both spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEvent {
    /// Added or removed.
    pub kind: MapEventKind,
    /// The endpoint.
    pub requester: u32,
    /// Page-aligned IOVA.
    pub iova: u64,
    /// Length, a multiple of 4 KiB.
    pub len: u64,
    /// Page-aligned guest-physical address.
    pub gpa: u64,
    /// Permissions of the mapping.
    pub perms: Perm,
}

/// The embedder's notification callback. It runs after the table commits
/// (adds) or before the request returns (removes), under the endpoint's
/// request lock: it may translate, but must not submit requests.
pub type Notifier = Arc<dyn Fn(&MapEvent) + Send + Sync>;

/// A refused device access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Requester ID of the device.
    pub requester: u32,
    /// First IOVA refused.
    pub iova: u64,
    /// What the device tried.
    pub access: Access,
    /// Why it was refused.
    pub reason: FaultReason,
    /// Sequence number (total faults before this one).
    pub seq: u64,
}

/// The path a request came by, for [`StatsSnapshot::transports`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Transport {
    /// Neither of the guest transports: [`Vm::submit`], [`Vm::execute`]
    /// (tests, migration import).
    Other = 0,
    /// The DOORBELL register.
    Doorbell = 1,
    /// The VMCALL/VMMCALL hypercall.
    Hypercall = 2,
}

impl Transport {
    /// Decodes a raw transport number (the C API's `PVDMA_TRANSPORT_*`).
    pub fn from_raw(raw: u32) -> Option<Transport> {
        Some(match raw {
            0 => Transport::Other,
            1 => Transport::Doorbell,
            2 => Transport::Hypercall,
            _ => return None,
        })
    }
}

/// Rows of [`StatsSnapshot::requests`]: unknown ops, then ops 1..=6.
pub const STATS_OPS: usize = 7;

/// A snapshot of the counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// `requests[op][status index]`; op 0 counts unknown ops (and requests
    /// whose header could not be read).
    pub requests: [[u64; 13]; STATS_OPS],
    /// Requests submitted by each [`Transport`], indexed by its value.
    pub transports: [u64; 3],
    /// Live mappings over all domains.
    pub mappings: u64,
    /// Distinct pinned guest pages.
    pub pinned_pages: u64,
    /// Bytes of host memory the mappings take (see [`VmConfig::mem_limit`]).
    pub mem_used: u64,
    /// Translations performed through [`Vm::translate`].
    pub translations: u64,
    /// Refused device accesses.
    pub faults: u64,
}

struct Stats {
    requests: [[AtomicU64; 13]; STATS_OPS],
    transports: [AtomicU64; 3],
    mappings: AtomicU64,
    translations: TranslationCounters,
    faults: AtomicU64,
}

/// The translation count, kept per thread: every device thread counts on
/// the hot path, and a shared counter would cost each translation a locked
/// read-modify-write (and bounce its cache line between threads). Each
/// thread that translates owns one slot of this VM, bumps it with a plain
/// load and store, and [`Vm::stats`] sums the slots.
///
/// Slots are never freed before the VM: when a thread exits it gives its
/// slot up (count included) and the next new thread claims it, so the
/// list is as long as the most threads that ever translated at the same
/// time. A thread finds its slot through a thread-local cache keyed by the
/// VM's [`TranslationCounters::vm_id`].
///
/// These atomics are std's even under loom: they are statistics, outside
/// the table protocol the loom model checks.
struct TranslationCounters {
    /// Never reused (unlike the VM's address), so that a thread's cache
    /// entry of a dropped VM is never taken for a new VM's.
    vm_id: u64,
    /// Push-only list of slots (each from `Arc::into_raw`, one reference
    /// owned by the list), freed in `Drop`.
    head: StdAtomicPtr<CounterSlot>,
    /// Translations counted by threads whose thread-local storage was
    /// already being torn down (a translation from a TLS destructor).
    orphans: StdAtomicU64,
}

/// One thread's translation count for one VM.
#[repr(align(128))]
struct CounterSlot {
    /// Written only by the thread that claimed the slot.
    count: StdAtomicU64,
    /// Whether a live thread owns the slot.
    claimed: StdAtomicBool,
    /// The slot pushed before this one; immutable once published.
    next: *const CounterSlot,
}

// SAFETY: `next` is only read, and points to a slot kept alive by the
// list until the VM drops; every other field is atomic.
unsafe impl Send for CounterSlot {}
// SAFETY: as above.
unsafe impl Sync for CounterSlot {}

impl CounterSlot {
    #[inline]
    fn bump(&self) {
        // Relaxed load and store, no RMW: only the owning thread writes
        // `count`. It got the slot through the Acquire CAS on `claimed`
        // (pairing with the previous owner's Release store of false), so
        // its load sees the previous owner's last store. Readers
        // (`Vm::stats`) see every increment that happened before them.
        let c = self.count.load(StdOrdering::Relaxed);
        self.count.store(c.wrapping_add(1), StdOrdering::Relaxed);
    }
}

/// This thread's counter slots, one per VM it translated for.
struct ThreadCounters(Vec<(u64, Arc<CounterSlot>)>);

impl Drop for ThreadCounters {
    fn drop(&mut self) {
        // The fast-path cache must not outlive the references we drop.
        // (`LAST` has no destructor, so it is always accessible.)
        LAST.set((0, std::ptr::null()));
        for (_, slot) in &self.0 {
            // Release: our last `bump` happens before whichever thread
            // claims the slot next (its Acquire CAS in `claim`).
            slot.claimed.store(false, StdOrdering::Release);
        }
    }
}

thread_local! {
    static THREAD_COUNTERS: RefCell<ThreadCounters> =
        const { RefCell::new(ThreadCounters(Vec::new())) };
    /// The slot this thread used last, `(vm_id, slot)`: the hot path's one
    /// compare. Invariant: when the id is not 0, `THREAD_COUNTERS` holds
    /// a reference to that slot under that id (so the slot is alive). An
    /// entry is dropped from there only once its VM is gone, and a gone
    /// VM's id is never asked for again.
    static LAST: Cell<(u64, *const CounterSlot)> =
        const { Cell::new((0, std::ptr::null())) };
}

impl TranslationCounters {
    fn new() -> TranslationCounters {
        static NEXT_VM_ID: StdAtomicU64 = StdAtomicU64::new(1);
        TranslationCounters {
            // Relaxed: only uniqueness matters.
            vm_id: NEXT_VM_ID.fetch_add(1, StdOrdering::Relaxed),
            head: StdAtomicPtr::new(std::ptr::null_mut()),
            orphans: StdAtomicU64::new(0),
        }
    }

    /// Counts one translation by the calling thread.
    #[inline]
    fn count(&self) {
        let (id, slot) = LAST.get();
        if id == self.vm_id {
            // SAFETY: ids start at 1, so `slot` was set with this VM's id,
            // and by `LAST`'s invariant it is alive while we are.
            unsafe { &*slot }.bump();
        } else {
            self.count_other();
        }
    }

    /// Counts one translation by a thread whose last count was for
    /// another VM (or that never counted).
    #[cold]
    fn count_other(&self) {
        let id = self.vm_id;
        let counted = THREAD_COUNTERS.try_with(|tc| {
            let tc = tc.borrow();
            match tc.0.iter().find(|(vm, _)| *vm == id) {
                Some((_, slot)) => {
                    slot.bump();
                    LAST.set((id, Arc::as_ptr(slot)));
                    true
                }
                None => false,
            }
        });
        match counted {
            Ok(true) => {}
            Ok(false) => self.count_first(),
            // Relaxed: a statistic; a rare path (thread exit).
            Err(_) => {
                self.orphans.fetch_add(1, StdOrdering::Relaxed);
            }
        }
    }

    /// The calling thread's first translation on this VM: claims a slot
    /// (lock-free: a CAS per slot tried, a CAS loop to push a new one) and
    /// remembers it in the thread's cache.
    #[cold]
    fn count_first(&self) {
        let slot = self.claim();
        slot.bump();
        let cached = THREAD_COUNTERS.try_with(|tc| {
            let mut tc = tc.borrow_mut();
            // Forget the slots of VMs that are gone (only we still hold
            // them): nobody will claim them again.
            tc.0.retain(|(_, s)| Arc::strong_count(s) > 1);
            LAST.set((self.vm_id, Arc::as_ptr(&slot)));
            tc.0.push((self.vm_id, Arc::clone(&slot)));
        });
        if cached.is_err() {
            // No thread-local storage any more (thread exit): give the
            // slot back, count included. Release pairs with the Acquire
            // CAS of the next claimer.
            slot.claimed.store(false, StdOrdering::Release);
        }
    }

    /// A slot no live thread owns, reused or new, claimed for the caller.
    fn claim(&self) -> Arc<CounterSlot> {
        // Acquire pairs with the AcqRel CAS that pushed the head: the slot
        // (and, through its `next` chain, every older one) is initialised.
        let mut at = self.head.load(StdOrdering::Acquire);
        while !at.is_null() {
            // SAFETY: slots in the list live until `self` drops.
            let slot = unsafe { &*at };
            // Acquire pairs with the Release store of the previous owner
            // giving the slot up: its count is ours to continue.
            if slot
                .claimed
                .compare_exchange(false, true, StdOrdering::Acquire, StdOrdering::Relaxed)
                .is_ok()
            {
                // SAFETY: `at` came from `Arc::into_raw` and the list still
                // holds that reference; this adds one for the caller.
                return unsafe {
                    Arc::increment_strong_count(at);
                    Arc::from_raw(at)
                };
            }
            at = slot.next.cast_mut();
        }
        let mut new = Arc::new(CounterSlot {
            count: StdAtomicU64::new(0),
            claimed: StdAtomicBool::new(true),
            next: std::ptr::null(),
        });
        let mut head = self.head.load(StdOrdering::Relaxed);
        loop {
            Arc::get_mut(&mut new).expect("not shared yet").next = head;
            let raw = Arc::into_raw(Arc::clone(&new)).cast_mut();
            // AcqRel: Release publishes the slot's initialisation to
            // walkers (`claim`, `total`); Acquire so the `next` we link
            // was itself published.
            match self.head.compare_exchange_weak(
                head,
                raw,
                StdOrdering::AcqRel,
                StdOrdering::Relaxed,
            ) {
                Ok(_) => return new,
                Err(now) => {
                    // SAFETY: `raw` was not published: take it back.
                    drop(unsafe { Arc::from_raw(raw) });
                    head = now;
                }
            }
        }
    }

    /// Every translation counted so far (exact for every translation that
    /// happened before the call).
    fn total(&self) -> u64 {
        // Relaxed: a statistic.
        let mut sum = self.orphans.load(StdOrdering::Relaxed);
        // Acquire: as in `claim`.
        let mut at = self.head.load(StdOrdering::Acquire);
        while !at.is_null() {
            // SAFETY: slots in the list live until `self` drops.
            let slot = unsafe { &*at };
            // Relaxed: coherence gives every store that happened before us.
            sum = sum.wrapping_add(slot.count.load(StdOrdering::Relaxed));
            at = slot.next.cast_mut();
        }
        sum
    }
}

impl Drop for TranslationCounters {
    fn drop(&mut self) {
        let mut at = *self.head.get_mut();
        while !at.is_null() {
            // SAFETY: each slot in the list came from `Arc::into_raw`; the
            // list's reference is released once, here. Threads that cached
            // the slot keep it alive with their own reference.
            let slot = unsafe { Arc::from_raw(at) };
            at = slot.next.cast_mut();
        }
    }
}

/// An endpoint behind this pvdma: a PCI requester ID.
pub struct Endpoint {
    rid: u32,
    passthrough: Option<String>,
    /// Null while detached. Swapped only under `op_lock`; read lock-free.
    domain: Atomic<Domain>,
    op_lock: Mutex<()>,
}

impl Endpoint {
    /// The requester ID.
    pub fn requester(&self) -> u32 {
        self.rid
    }

    /// The host PCI address when the endpoint is an assigned host device.
    pub fn passthrough(&self) -> Option<&str> {
        self.passthrough.as_deref()
    }

    /// Whether translation is on.
    pub fn is_attached(&self) -> bool {
        let guard = epoch::pin();
        // Acquire pairs with the Release store in attach.
        !self.domain.load(Ordering::Acquire, &guard).is_null()
    }
}

/// Endpoints by requester ID (`bus << 8 | devfn`, PCI segment 0 only),
/// indexed directly: 256 bus slots, each a lazily created table of 256
/// devfns. A lookup is two indexed loads, no hashing: it is on every
/// translation. Published copy-on-write like any epoch-protected value; a
/// copy shares the devfn tables it does not change, so a map costs 2 KiB
/// plus 2 KiB per bus in use.
#[derive(Clone)]
struct EndpointMap {
    buses: Box<[Option<Arc<DevfnTable>>; 256]>,
}

type DevfnTable = [Option<Arc<Endpoint>>; 256];

impl EndpointMap {
    fn new() -> EndpointMap {
        EndpointMap {
            buses: Box::new([const { None }; 256]),
        }
    }

    /// The endpoint `rid`; None as well for segments other than 0.
    #[inline]
    fn get(&self, rid: &u32) -> Option<&Arc<Endpoint>> {
        let rid = *rid;
        if rid > 0xffff {
            return None;
        }
        // Both indices are masked to 8 bits: no bounds check can fail.
        let bus = self.buses[(rid >> 8) as usize & 0xff].as_deref()?;
        bus[rid as usize & 0xff].as_ref()
    }

    fn contains_key(&self, rid: &u32) -> bool {
        self.get(rid).is_some()
    }

    /// Every endpoint, by ascending requester ID.
    fn values(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.buses
            .iter()
            .flatten()
            .flat_map(|bus| bus.iter().flatten())
    }

    /// Every requester ID, ascending.
    fn keys(&self) -> impl Iterator<Item = &u32> {
        self.values().map(|ep| &ep.rid)
    }

    /// Adds `ep` at `rid` (<= 0xffff, checked by the caller).
    fn insert(&mut self, rid: u32, ep: Arc<Endpoint>) {
        debug_assert!(rid <= 0xffff);
        let bus = self.buses[(rid >> 8) as usize & 0xff]
            .get_or_insert_with(|| Arc::new([const { None }; 256]));
        // Copies the devfn table if the published map still shares it.
        Arc::make_mut(bus)[rid as usize & 0xff] = Some(ep);
    }

    fn remove(&mut self, rid: &u32) {
        let rid = *rid;
        if rid > 0xffff {
            return;
        }
        let slot = &mut self.buses[(rid >> 8) as usize & 0xff];
        if let Some(bus) = slot {
            let devfns = Arc::make_mut(bus);
            devfns[rid as usize & 0xff] = None;
            if devfns.iter().all(Option::is_none) {
                *slot = None;
            }
        }
    }
}

/// The endpoint a [`Vm::dma_view_cached`] caller found last, and the
/// endpoint-map version it was found under.
#[derive(Default)]
pub struct EndpointCache {
    version: u64,
    endpoint: Option<Arc<Endpoint>>,
}

impl std::fmt::Debug for EndpointCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointCache")
            .field("version", &self.version)
            .field("endpoint", &self.endpoint.as_ref().map(|e| e.rid))
            .finish()
    }
}

/// A parsed request: what the guest asked, read once from its block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Raw op.
    pub op: u16,
    /// Raw flags.
    pub flags: u16,
    /// Requester ID (bits 16..31: segment).
    pub requester: u32,
    /// Raw nr_segs.
    pub nr_segs: u32,
    /// IOVA in.
    pub iova: u64,
    /// Length in.
    pub length: u64,
    /// Reserved words (must be zero).
    pub reserved: [u64; 3],
    /// Segments (MAP) or ranges (UNMAP_LIST); read for no other op.
    pub segs: Vec<(u64, u64)>,
}

/// What a request produced. Only `status` is meaningful on failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status.
    pub status: Status,
    /// IOVA out (MAP).
    pub iova: u64,
    /// Length out (MAP).
    pub length: u64,
    /// Result out.
    pub result: u64,
}

impl Response {
    fn status(status: Status) -> Response {
        Response {
            status,
            iova: 0,
            length: 0,
            result: 0,
        }
    }

    fn ok(result: u64) -> Response {
        Response {
            status: Status::Ok,
            iova: 0,
            length: 0,
            result,
        }
    }
}

/// A VM as pvdma sees it.
pub struct Vm {
    cfg: VmConfig,
    ram: GuestRam,
    pins: PinTable,
    /// What the domains' nodes and records may take.
    mem: Arc<MemBudget>,
    endpoints: Atomic<EndpointMap>,
    /// Bumped after every replacement of `endpoints`: an
    /// [`EndpointCache`] made under the current value is still current.
    endpoints_version: AtomicU64,
    endpoints_writer: Mutex<()>,
    notifier: RwLock<Option<Notifier>>,
    faults: Mutex<VecDeque<FaultRecord>>,
    stats: Stats,
    /// Changes (to a value never used before, by any VM or domain) after
    /// every removal of a translation in any of this VM's domains and
    /// every DETACH or endpoint removal: the key of the thread-local
    /// cache of [`Vm::lookup`], which it lets serve hits without pinning.
    lookup_generation: Arc<AtomicU64>,
}

impl Vm {
    /// A VM with no RAM and no endpoints.
    pub fn new(cfg: VmConfig) -> Result<Vm> {
        cfg.validate()?;
        Ok(Vm {
            pins: PinTable::new(cfg.pin_limit, cfg.pin_mode),
            mem: Arc::new(MemBudget::new(cfg.mem_limit)),
            ram: GuestRam::new(),
            endpoints: Atomic::new(EndpointMap::new()),
            endpoints_version: AtomicU64::new(1),
            endpoints_writer: Mutex::new(()),
            notifier: RwLock::new(None),
            faults: Mutex::new(VecDeque::with_capacity(cfg.fault_log_len)),
            stats: Stats {
                requests: Default::default(),
                transports: Default::default(),
                mappings: AtomicU64::new(0),
                translations: TranslationCounters::new(),
                faults: AtomicU64::new(0),
            },
            lookup_generation: Arc::new(AtomicU64::new(domain::next_generation())),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// The pin table.
    pub fn pins(&self) -> &PinTable {
        &self.pins
    }

    // ---- guest RAM ---------------------------------------------------

    /// Adds a guest RAM region.
    ///
    /// # Safety
    /// `[hva, hva + size)` must be mapped, readable and writable host memory
    /// that stays mapped until the region is removed or the VM dropped.
    pub unsafe fn add_ram_region(&self, gpa: u64, size: u64, hva: usize) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.ram.add(gpa, size, hva)? };
        Ok(())
    }

    /// Removes a guest RAM region. Mappings with a page in it are torn
    /// down first (with UNMAP notifications, their pins released), so no
    /// translation can reach memory that is going away. Returns how many
    /// mappings were torn down. A VMM that wants to refuse the removal
    /// instead asks [`Vm::ram_range_pinned`] beforehand.
    pub fn remove_ram_region(&self, gpa: u64, size: u64) -> Result<usize> {
        let guard = epoch::pin();
        // The layout before removal: still valid under `guard`, and the one
        // whose host addresses the pins of the torn-down pages refer to.
        let before = self.ram.load(&guard);
        // Out of the layout first, so that a MAP running concurrently
        // either finished before (and is torn down below, as we take each
        // endpoint's lock) or sees the region gone and gets FAULT.
        self.ram.remove(gpa, size)?;
        let mut torn = 0;
        for ep in self.endpoint_list(&guard) {
            let _op = ep.op_lock.lock();
            if let Some(dom) = Self::domain_of(&ep, &guard) {
                let removed = dom.remove_gpa_range(
                    gpa,
                    size,
                    before,
                    &self.pins,
                    &mut self.unmap_notifier(ep.rid),
                );
                self.count_removed(removed);
                torn += removed.mappings as usize;
            }
        }
        Ok(torn)
    }

    /// The current RAM regions.
    pub fn ram_regions(&self) -> Vec<RamRegion> {
        let guard = epoch::pin();
        self.ram.load(&guard).regions().to_vec()
    }

    /// Is any page of guest-physical [gpa, gpa + len) pinned? (The VMM
    /// refuses discard, balloon inflation or unplug of such memory.)
    pub fn ram_range_pinned(&self, gpa: u64, len: u64) -> bool {
        self.pins.any_pinned(gpa, len)
    }

    /// Runs `f` on the current RAM layout (for vm-memory based users).
    pub fn with_ram<R>(&self, f: impl FnOnce(&RamLayout) -> R) -> R {
        let guard = epoch::pin();
        f(self.ram.load(&guard))
    }

    // ---- endpoints ---------------------------------------------------

    /// Registers endpoint `rid` (bus << 8 | devfn), optionally as an
    /// assigned host device with its host PCI address.
    pub fn add_endpoint(&self, rid: u32, passthrough: Option<&str>) -> Result<()> {
        if rid > 0xffff {
            return Err(Error::Config(format!(
                "requester ID {rid:#x} is not in PCI segment 0"
            )));
        }
        let _w = self.endpoints_writer.lock();
        let guard = epoch::pin();
        let cur = self.endpoint_map(&guard);
        if cur.contains_key(&rid) {
            return Err(Error::EndpointExists(rid));
        }
        let mut next = cur.clone();
        next.insert(
            rid,
            Arc::new(Endpoint {
                rid,
                passthrough: passthrough.map(str::to_owned),
                domain: Atomic::null(),
                op_lock: Mutex::new(()),
            }),
        );
        self.publish_endpoints(next, &guard);
        Ok(())
    }

    /// Unregisters an endpoint, detaching it first.
    pub fn remove_endpoint(&self, rid: u32) -> Result<()> {
        let _w = self.endpoints_writer.lock();
        let guard = epoch::pin();
        let cur = self.endpoint_map(&guard);
        let ep = cur.get(&rid).cloned().ok_or(Error::NoEndpoint(rid))?;
        let mut next = cur.clone();
        next.remove(&rid);
        self.publish_endpoints(next, &guard);
        let _op = ep.op_lock.lock();
        self.detach_locked(&ep, &guard);
        // After the map without the endpoint was published.
        self.bump_lookup_generation();
        Ok(())
    }

    /// Requester IDs of every endpoint, ascending.
    pub fn endpoints(&self) -> Vec<u32> {
        let guard = epoch::pin();
        let mut v: Vec<u32> = self.endpoint_map(&guard).keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The endpoint with requester ID `rid`.
    pub fn endpoint(&self, rid: u32) -> Option<Arc<Endpoint>> {
        let guard = epoch::pin();
        self.endpoint_map(&guard).get(&rid).cloned()
    }

    /// A copy of `rid`'s mappings (empty when detached or unknown).
    pub fn mappings(&self, rid: u32) -> Vec<Mapping> {
        let guard = epoch::pin();
        self.endpoint_map(&guard)
            .get(&rid)
            .and_then(|ep| Self::domain_of(ep, &guard))
            .map(Domain::mappings)
            .unwrap_or_default()
    }

    fn endpoint_map<'g>(&self, guard: &'g Guard) -> &'g EndpointMap {
        // Acquire pairs with the Release in publish_endpoints.
        let p = self.endpoints.load(Ordering::Acquire, guard);
        // SAFETY: the map pointer is never null (set in new, replaced only
        // by publish_endpoints with a non-null one) and is freed only via
        // defer_destroy, after every guard that could see it is gone.
        unsafe { p.deref() }
    }

    fn endpoint_list(&self, guard: &Guard) -> Vec<Arc<Endpoint>> {
        let mut v: Vec<_> = self.endpoint_map(guard).values().cloned().collect();
        v.sort_unstable_by_key(|e| e.rid);
        v
    }

    fn publish_endpoints(&self, next: EndpointMap, guard: &Guard) {
        // Release publishes the new map's contents; AcqRel on the swap so
        // the old pointer we retire is the one readers saw.
        let old = self
            .endpoints
            .swap(Owned::new(next), Ordering::AcqRel, guard);
        // SAFETY: `old` is unlinked; readers holding a guard may still use
        // it, and defer_destroy waits for them.
        unsafe { guard.defer_destroy(old) };
        // Release, after the swap: pairs with the Acquire load in
        // `dma_view_cached`; a reader that sees the new version then loads
        // the new map. (One that still sees the old version uses what it
        // looked up in the old map, as a lookup just before the swap would.)
        self.endpoints_version.fetch_add(1, Ordering::Release);
    }

    fn domain_of<'g>(ep: &Endpoint, guard: &'g Guard) -> Option<&'g Domain> {
        // Acquire pairs with the Release store in attach: the domain is
        // fully built before it is visible.
        let p = ep.domain.load(Ordering::Acquire, guard);
        // SAFETY: domains are freed only through defer_destroy after being
        // unlinked, so a pointer loaded under `guard` stays valid for 'g.
        unsafe { p.as_ref() }
    }

    // ---- notifications, faults, stats ----------------------------------

    /// Sets (or with `None` clears) the notification callback.
    pub fn set_notifier(&self, notifier: Option<Notifier>) {
        *self.notifier.write() = notifier;
    }

    fn notifier_for(&self, rid: u32, kind: MapEventKind, perms: Perm) -> impl FnMut(&PageRun) + '_ {
        let n = self.notifier.read().clone();
        move |run: &PageRun| {
            if let Some(n) = &n {
                n(&MapEvent {
                    kind,
                    requester: rid,
                    iova: run.iova,
                    len: run.len,
                    gpa: run.gpa,
                    perms,
                })
            }
        }
    }

    fn unmap_notifier(&self, rid: u32) -> impl FnMut(&PageRun) + '_ {
        // Unmap events carry no meaningful permissions.
        self.notifier_for(rid, MapEventKind::Unmap, Perm::NONE)
    }

    /// Invalidates every cached [`Vm::lookup`] of this VM, on every thread.
    fn bump_lookup_generation(&self) {
        // Release: pairs with the Acquire load in `Vm::lookup`; everything
        // this thread changed before (table, endpoint routes) is seen by a
        // lookup that loads the new value, and such a lookup misses.
        self.lookup_generation
            .store(domain::next_generation(), Ordering::Release);
    }

    fn count_removed(&self, removed: Removed) {
        // Relaxed: a statistic, ordered by nothing.
        self.stats
            .mappings
            .fetch_sub(removed.mappings, Ordering::Relaxed);
    }

    /// Records a refused device access.
    pub fn record_fault(&self, requester: u32, iova: u64, access: Access, reason: FaultReason) {
        // Relaxed: the count is a statistic; the log below is locked.
        let seq = self.stats.faults.fetch_add(1, Ordering::Relaxed);
        let mut log = self.faults.lock();
        if log.len() == self.cfg.fault_log_len {
            log.pop_front();
        }
        log.push_back(FaultRecord {
            requester,
            iova,
            access,
            reason,
            seq,
        });
    }

    /// The most recent faults, oldest first.
    pub fn faults(&self) -> Vec<FaultRecord> {
        self.faults.lock().iter().copied().collect()
    }

    /// Refused device accesses since creation or reset.
    pub fn fault_count(&self) -> u64 {
        // Relaxed: a statistic.
        self.stats.faults.load(Ordering::Relaxed)
    }

    /// Sets the fault count (migration import).
    pub(crate) fn restore_fault_count(&self, n: u64) {
        // Relaxed: a statistic.
        self.stats.faults.store(n, Ordering::Relaxed);
    }

    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        for (op, row) in self.stats.requests.iter().enumerate() {
            for (st, c) in row.iter().enumerate() {
                // Relaxed: statistics.
                s.requests[op][st] = c.load(Ordering::Relaxed);
            }
        }
        for (t, c) in self.stats.transports.iter().enumerate() {
            // Relaxed: statistics.
            s.transports[t] = c.load(Ordering::Relaxed);
        }
        s.mappings = self.stats.mappings.load(Ordering::Relaxed);
        s.pinned_pages = self.pins.pinned_pages();
        s.mem_used = self.mem.used();
        s.translations = self.stats.translations.total();
        s.faults = self.fault_count();
        s
    }

    // ---- translation ---------------------------------------------------

    /// Translates device `rid`'s access to [iova, iova + len) into host
    /// fragments, storing the first `out.len()` and returning how many the
    /// range needs (more than `out.len()`: call again with a bigger array).
    ///
    /// Never takes a lock and never waits. A refused access is counted and
    /// logged as a fault. Unattached endpoints bypass (identity, RAM only)
    /// or are blocked, per [`VmConfig::bypass`]. A device model that
    /// translates often resolves `rid` once with [`Vm::translator`].
    pub fn translate(
        &self,
        rid: u32,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
    ) -> std::result::Result<usize, domain::TranslateFault> {
        self.stats.translations.count();
        let guard = epoch::pin();
        let r = self.translate_in(rid, iova, len, access, out, &guard);
        if let Err(f) = r {
            self.record_fault(rid, f.iova, access, f.reason);
        }
        r
    }

    /// [`Vm::translate`] under the caller's guard, without counting or
    /// logging: for callers that batch many translations (virtqueues).
    #[inline]
    pub fn translate_in(
        &self,
        rid: u32,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        let ep = self
            .endpoint_map(guard)
            .get(&rid)
            .ok_or(domain::TranslateFault {
                iova,
                reason: FaultReason::NoDevice,
            })?;
        // Just found in the map: registered.
        self.translate_ep(ep, None, None, iova, len, access, out, guard)
    }

    /// A translation handle for endpoint `rid`, for device models that
    /// translate repeatedly: it skips the requester-ID lookup. `None` when
    /// `rid` is not an endpoint. The handle follows the endpoint's
    /// attach/detach; once the endpoint is removed it refuses everything
    /// with [`FaultReason::NoDevice`] (also if `rid` is registered again:
    /// that is a new endpoint, ask for a new handle).
    pub fn translator(&self, rid: u32) -> Option<Translator<'_>> {
        let guard = epoch::pin();
        let ep = self.endpoint_map(&guard).get(&rid)?.clone();
        Some(Translator { vm: self, ep })
    }

    /// [`Vm::translator`] with a software IOTLB of its own
    /// ([`Translator::cached`]).
    pub fn cached_translator(&self, rid: u32) -> Option<CachedTranslator<'_>> {
        self.translator(rid).map(Translator::cached)
    }

    /// Where `ep`'s DMA goes under `guard`: its domain, or `None` to
    /// bypass. `handle` is `Some` when `ep` came from a [`Translator`]
    /// rather than from the current endpoint map: then an unattached
    /// endpoint is checked to still be registered (removal detaches it
    /// first, so an attached one always is).
    #[inline]
    fn route<'g>(
        &self,
        ep: &Endpoint,
        handle: Option<&Arc<Endpoint>>,
        guard: &'g Guard,
    ) -> std::result::Result<Option<&'g Domain>, FaultReason> {
        if let Some(dom) = Self::domain_of(ep, guard) {
            return Ok(Some(dom));
        }
        self.unattached_route(handle, guard).map(|()| None)
    }

    /// [`Vm::route`] for an endpoint seen unattached (off the hot path):
    /// Ok to bypass, else why not.
    #[cold]
    fn unattached_route(
        &self,
        handle: Option<&Arc<Endpoint>>,
        guard: &Guard,
    ) -> std::result::Result<(), FaultReason> {
        if let Some(handle) = handle {
            // `domain_of` saw null: if removal nulled it, its Acquire load
            // synchronised with the swap in `detach_locked`, which
            // `remove_endpoint` does after publishing the map without the
            // endpoint, so this load sees that map (or a later one).
            let still = self
                .endpoint_map(guard)
                .get(&handle.rid)
                .is_some_and(|cur| Arc::ptr_eq(cur, handle));
            if !still {
                return Err(FaultReason::NoDevice);
            }
        }
        if self.cfg.bypass {
            Ok(())
        } else {
            Err(FaultReason::Blocked)
        }
    }

    /// The translation proper, for an endpoint already resolved. Always
    /// inlined into its few callers: out of line, its seven arguments
    /// and the call cost ~30 instructions per translation.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn translate_ep(
        &self,
        ep: &Endpoint,
        handle: Option<&Arc<Endpoint>>,
        tlb: Option<&mut Iotlb>,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        let fault = |reason| domain::TranslateFault { iova, reason };
        let route = self.route(ep, handle, guard).map_err(fault)?;
        let ram = self.ram.load(guard);
        let mut sink = FragmentSink::new(out);
        match (route, tlb) {
            (Some(dom), None) => dom.translate(iova, len, access, ram, guard, &mut sink)?,
            (Some(dom), Some(tlb)) => {
                // Read once, before any walk (see `crate::iotlb`).
                tlb.set_generation(dom.generation());
                Domain::translate_with(iova, len, access, ram, &mut sink, |a| {
                    tlb.lookup_at(dom.table(), a, guard)
                })?
            }
            (None, _) => {
                iova.checked_add(len).ok_or(fault(FaultReason::Overflow))?;
                domain::emit_gpa_range(ram, iova, len, iova, &mut sink)?;
            }
        }
        Ok(sink.count())
    }

    /// What endpoint `rid`'s DMA goes through under `guard`: its domain
    /// (`None` when it is unattached and bypasses translation) and the RAM
    /// layout, both valid for as long as `guard` is held. For callers that
    /// build their own view of the IOVA space (virtqueues, `IovaSpace`).
    /// Faults (unknown endpoint, blocked) carry IOVA 0.
    pub fn dma_view<'g>(
        &self,
        rid: u32,
        guard: &'g Guard,
    ) -> std::result::Result<(Option<&'g Domain>, &'g RamLayout), domain::TranslateFault> {
        let fault = |reason| domain::TranslateFault { iova: 0, reason };
        let ep = self
            .endpoint_map(guard)
            .get(&rid)
            .ok_or(fault(FaultReason::NoDevice))?;
        let ram = self.ram.load(guard);
        match Self::domain_of(ep, guard) {
            Some(dom) => Ok((Some(dom), ram)),
            None if self.cfg.bypass => Ok((None, ram)),
            None => Err(fault(FaultReason::Blocked)),
        }
    }

    /// As [`dma_view`](Self::dma_view), for a caller that makes many
    /// (a virtqueue): the endpoint found is remembered in `cache`, and the
    /// endpoint map is searched again only after it changed (an endpoint
    /// was added or removed). The domain is still loaded afresh, so
    /// ATTACH and DETACH are seen at once.
    #[inline]
    pub fn dma_view_cached<'g>(
        &self,
        rid: u32,
        guard: &'g Guard,
        cache: &mut EndpointCache,
    ) -> std::result::Result<(Option<&'g Domain>, &'g RamLayout), domain::TranslateFault> {
        // Acquire pairs with the Release increment in publish_endpoints:
        // loaded before the map, so a map change after this load makes the
        // next call search again.
        let version = self.endpoints_version.load(Ordering::Acquire);
        let ep = match &cache.endpoint {
            Some(ep) if cache.version == version && ep.rid == rid => ep,
            _ => {
                cache.endpoint = None;
                let ep = self
                    .endpoint_map(guard)
                    .get(&rid)
                    .ok_or(domain::TranslateFault {
                        iova: 0,
                        reason: FaultReason::NoDevice,
                    })?;
                cache.version = version;
                cache.endpoint.insert(ep.clone())
            }
        };
        let ram = self.ram.load(guard);
        match Self::domain_of(ep, guard) {
            Some(dom) => Ok((Some(dom), ram)),
            None if self.cfg.bypass => Ok((None, ram)),
            None => Err(domain::TranslateFault {
                iova: 0,
                reason: FaultReason::Blocked,
            }),
        }
    }

    // ---- the request engine -------------------------------------------

    /// Processes the request block at guest-physical `block`: reads it once,
    /// validates it, runs it, writes back status (and iova, length, result
    /// as the op defines), and returns the status. The one entry point of
    /// every transport (doorbell, hypercall); counted as
    /// [`Transport::Other`], see [`Vm::submit_via`].
    pub fn submit(&self, block: u64) -> Status {
        self.submit_via(block, Transport::Other)
    }

    /// [`Vm::submit`] of a request that came by `transport`, which the
    /// statistics count.
    pub fn submit_via(&self, block: u64, transport: Transport) -> Status {
        // Relaxed: a statistic.
        self.stats.transports[transport as usize].fetch_add(1, Ordering::Relaxed);
        let guard = epoch::pin();
        let ram = self.ram.load(&guard);
        let mut hdr = [0u8; abi::HEADER_SIZE as usize];
        if ram.read(block, &mut hdr).is_err() {
            // Nowhere to write a status to: the transport reports it.
            self.count_request(0, Status::Fault);
            return Status::Fault;
        }
        let mut req = parse_header(&hdr);
        let early = if block & 7 != 0 {
            Err(Status::Inval)
        } else {
            self.read_segments(block, &mut req, ram)
        };
        let resp = match early {
            Ok(()) => self.execute_owned(&mut req),
            Err(status) => {
                let op = self.cfg.op(req.op).map_or(0, Op::index);
                self.count_request(op, status);
                Response::status(status)
            }
        };
        self.write_back(block, &req, &resp, ram);
        resp.status
    }

    /// For MAP and UNMAP_LIST, reads the slot array behind the header
    /// (once).
    fn read_segments(
        &self,
        block: u64,
        req: &mut Request,
        ram: &RamLayout,
    ) -> std::result::Result<(), Status> {
        if !self.cfg.op(req.op).is_some_and(Op::has_slots) || req.nr_segs == 0 {
            return Ok(());
        }
        if req.nr_segs > self.cfg.max_segs {
            return Err(Status::TooBig);
        }
        let n = req.nr_segs as usize;
        let at = block.checked_add(abi::HEADER_SIZE).ok_or(Status::Fault)?;
        // Straight into the segment list, a stack chunk at a time: one
        // allocation, the list the mapping keeps.
        const CHUNK: usize = 16;
        let mut raw = [0u8; CHUNK * abi::SEG_SIZE as usize];
        req.segs = Vec::with_capacity(n);
        let mut done = 0;
        while done < n {
            let k = CHUNK.min(n - done);
            let bytes = &mut raw[..k * abi::SEG_SIZE as usize];
            let from = at
                .checked_add(done as u64 * abi::SEG_SIZE)
                .ok_or(Status::Fault)?;
            ram.read(from, bytes).map_err(|_| Status::Fault)?;
            req.segs.extend(
                bytes
                    .chunks_exact(16)
                    .map(|c| (le64(&c[0..8]), le64(&c[8..16]))),
            );
            done += k;
        }
        Ok(())
    }

    fn write_back(&self, block: u64, req: &Request, resp: &Response, ram: &RamLayout) {
        // Only status, iova, length and result are ever written. A header
        // outside RAM was never read, so there is nothing to write to.
        let _ = ram.write(block + 4, &(resp.status as u32).to_le_bytes());
        if resp.status != Status::Ok {
            return;
        }
        if self.cfg.op(req.op) == Some(Op::Map) {
            // iova, length and result are adjacent: one write.
            let mut out = [0u8; 24];
            out[0..8].copy_from_slice(&resp.iova.to_le_bytes());
            out[8..16].copy_from_slice(&resp.length.to_le_bytes());
            out[16..24].copy_from_slice(&resp.result.to_le_bytes());
            let _ = ram.write(block + 16, &out);
        } else {
            let _ = ram.write(block + 32, &resp.result.to_le_bytes());
        }
    }

    fn count_request(&self, op: usize, status: Status) {
        // Relaxed: statistics.
        self.stats.requests[op][status.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Runs an already-read request. Every failing request leaves no
    /// mapping, pin or IOVA behind. Counted as [`Transport::Other`].
    pub fn execute(&self, req: &Request) -> Response {
        // Relaxed: a statistic.
        self.stats.transports[Transport::Other as usize].fetch_add(1, Ordering::Relaxed);
        let op = self.cfg.op(req.op);
        let resp = self.execute_inner(op, req, &mut || req.segs.clone());
        self.count_request(op.map_or(0, Op::index), resp.status);
        resp
    }

    /// [`Vm::execute`] without counting the request: migration import
    /// re-creates state, it is not a request of this VM's guest.
    fn execute_uncounted(&self, req: &Request) -> Response {
        self.execute_inner(self.cfg.op(req.op), req, &mut || req.segs.clone())
    }

    /// [`Vm::execute`] of a request the caller no longer needs: a MAP
    /// takes its segment list instead of copying it.
    fn execute_owned(&self, req: &mut Request) -> Response {
        let op = self.cfg.op(req.op);
        let mut segs = std::mem::take(&mut req.segs);
        let resp = self.execute_inner(op, req, &mut || std::mem::take(&mut segs));
        self.count_request(op.map_or(0, Op::index), resp.status);
        resp
    }

    /// `segs` hands over `req.segs` (the request's own segment list is
    /// not read here: `execute_owned` moved it out).
    fn execute_inner(
        &self,
        op: Option<Op>,
        req: &Request,
        segs: &mut dyn FnMut() -> Vec<(u64, u64)>,
    ) -> Response {
        let Some(op) = op else {
            return Response::status(Status::Inval);
        };
        if u32::from(req.flags) & !abi::PVDMA_FLAGS_VALID != 0 || req.reserved != [0; 3] {
            return Response::status(Status::Inval);
        }
        let guard = epoch::pin();
        // Segment bits (16..31) other than 0 name no function we have.
        let Some(ep) = self.endpoint_map(&guard).get(&req.requester).cloned() else {
            return Response::status(Status::NoDev);
        };
        let _op = ep.op_lock.lock();
        // remove_endpoint unpublishes an endpoint and then detaches it under
        // this lock. A request that found it before it was unpublished and
        // got the lock after that detach must not run on it: an ATTACH would
        // install a domain nothing could reach, detach or free again. The
        // lock orders this load after the unpublishing store.
        if !self
            .endpoint_map(&guard)
            .get(&req.requester)
            .is_some_and(|cur| Arc::ptr_eq(cur, &ep))
        {
            return Response::status(Status::NoDev);
        }
        let ram = self.ram.load(&guard);
        match op {
            Op::Query => {
                let attached = Self::domain_of(&ep, &guard).is_some();
                let mut r = 0;
                if attached {
                    r |= u64::from(abi::PVDMA_QUERY_ATTACHED);
                }
                if ep.passthrough.is_some() {
                    r |= u64::from(abi::PVDMA_QUERY_PASSTHROUGH);
                }
                if !attached && self.cfg.bypass {
                    r |= u64::from(abi::PVDMA_QUERY_BYPASS);
                }
                Response::ok(r)
            }
            Op::Attach => {
                if Self::domain_of(&ep, &guard).is_some() {
                    return Response::status(Status::State);
                }
                // Release pairs with the Acquire loads in domain_of.
                ep.domain.store(
                    Owned::new(Domain::in_vm(
                        self.cfg.iova_bits,
                        Arc::clone(&self.mem),
                        Some(Arc::clone(&self.lookup_generation)),
                    )),
                    Ordering::Release,
                );
                // Not needed (the endpoint had no domain, so no cached
                // lookup of it is valid), but keeps the rule simple: every
                // route change moves the lookup generation.
                self.bump_lookup_generation();
                Response::ok(0)
            }
            Op::Detach => {
                if Self::domain_of(&ep, &guard).is_none() {
                    return Response::status(Status::State);
                }
                Response::ok(self.detach_locked(&ep, &guard) as u64)
            }
            Op::Map => self.map_locked(&ep, req, segs(), ram, &guard),
            Op::Unmap => self.unmap_locked(&ep, req, ram, &guard),
            Op::UnmapList => self.unmap_list_locked(&ep, req, segs(), ram, &guard),
        }
    }

    fn map_locked(
        &self,
        ep: &Endpoint,
        req: &Request,
        segs: Vec<(u64, u64)>,
        ram: &RamLayout,
        guard: &Guard,
    ) -> Response {
        let Some(dom) = Self::domain_of(ep, guard) else {
            return Response::status(Status::State);
        };
        let perms = Perm::from_bits_truncate(req.flags as u8);
        if perms.is_empty() {
            return Response::status(Status::Perm);
        }
        if req.nr_segs == 0 {
            return Response::status(Status::Inval);
        }
        if req.nr_segs > self.cfg.max_segs {
            return Response::status(Status::TooBig);
        }
        if segs.len() != req.nr_segs as usize {
            return Response::status(Status::Inval);
        }
        let choice = if u32::from(req.flags) & abi::PVDMA_FLAG_FIXED != 0 {
            IovaChoice::Fixed(req.iova)
        } else if self.cfg.host_iova {
            IovaChoice::Host
        } else {
            return Response::status(Status::Inval);
        };
        let mut notify = self.notifier_for(ep.rid, MapEventKind::Map, perms);
        match dom.map(segs, perms, choice, ram, &self.pins, &mut notify) {
            Ok((iova, length)) => {
                // Relaxed: a statistic.
                self.stats.mappings.fetch_add(1, Ordering::Relaxed);
                Response {
                    status: Status::Ok,
                    iova,
                    length,
                    result: 0,
                }
            }
            Err(e) => Response::status(domain_status(&e)),
        }
    }

    fn unmap_locked(
        &self,
        ep: &Endpoint,
        req: &Request,
        ram: &RamLayout,
        guard: &Guard,
    ) -> Response {
        let Some(dom) = Self::domain_of(ep, guard) else {
            return Response::status(Status::State);
        };
        let limit = 1u64 << self.cfg.iova_bits;
        let in_range = match req.length {
            0 => req.iova < limit,
            n => req.iova.checked_add(n).is_some_and(|end| end <= limit),
        };
        if !in_range {
            return Response::status(Status::Inval);
        }
        let mut notify = self.unmap_notifier(ep.rid);
        let r = if req.length == 0 {
            dom.unmap_at(req.iova, ram, &self.pins, &mut notify)
        } else {
            dom.unmap_range(req.iova, req.length, ram, &self.pins, &mut notify)
        };
        match r {
            Ok(removed) => {
                self.count_removed(removed);
                Response::ok(removed.bytes)
            }
            Err(e) => Response::status(domain_status(&e)),
        }
    }

    /// UNMAP_LIST. Checks, after the attach state: the range count (0:
    /// INVAL, past MAX_SEGS: TOOBIG), then every range on its own (length
    /// 0, wrapping, or past 2^IOVA_BITS: INVAL), then overlap of their
    /// page spans (INVAL), then under the domain lock RANGE and NOENT
    /// (see [`Domain::unmap_spans`]). Nothing is removed unless every
    /// check passes; then every range's mappings go at once.
    fn unmap_list_locked(
        &self,
        ep: &Endpoint,
        req: &Request,
        ranges: Vec<(u64, u64)>,
        ram: &RamLayout,
        guard: &Guard,
    ) -> Response {
        let Some(dom) = Self::domain_of(ep, guard) else {
            return Response::status(Status::State);
        };
        if req.nr_segs == 0 {
            return Response::status(Status::Inval);
        }
        if req.nr_segs > self.cfg.max_segs {
            return Response::status(Status::TooBig);
        }
        if ranges.len() != req.nr_segs as usize {
            return Response::status(Status::Inval);
        }
        let Some(mut spans) = unmap_list_spans(&ranges, self.cfg.iova_bits) else {
            return Response::status(Status::Inval);
        };
        // Sorted by first page, two spans overlap only if neighbours do.
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 <= w[0].1) {
            return Response::status(Status::Inval);
        }
        let mut notify = self.unmap_notifier(ep.rid);
        match dom.unmap_spans(&spans, ram, &self.pins, &mut notify) {
            Ok(removed) => {
                self.count_removed(removed);
                Response::ok(removed.bytes)
            }
            Err(e) => Response::status(domain_status(&e)),
        }
    }

    /// Detaches `ep` (caller holds its op_lock): unlinks the domain so no
    /// new translation finds it, removes every mapping (pins released,
    /// notified), and frees the domain once no reader can see it. Returns
    /// the number of mappings removed.
    fn detach_locked(&self, ep: &Endpoint, guard: &Guard) -> usize {
        // AcqRel: Acquire so we own the domain as attach published it;
        // Release orders our earlier writes before readers seeing null.
        let old = ep.domain.swap(Shared::null(), Ordering::AcqRel, guard);
        // SAFETY: the pointer came from Owned::new in attach and is freed
        // only here, after being unlinked, through defer_destroy.
        let Some(dom) = (unsafe { old.as_ref() }) else {
            return 0;
        };
        let ram = self.ram.load(guard);
        let removed = dom.clear(ram, &self.pins, &mut self.unmap_notifier(ep.rid));
        self.count_removed(removed);
        // After the swap above: a lookup that sees the new value sees the
        // endpoint detached (the domain's removals bumped it too, but not
        // when it was empty).
        self.bump_lookup_generation();
        // SAFETY: unlinked above; readers that loaded it before hold guards
        // and defer_destroy waits for them.
        unsafe { guard.defer_destroy(old) };
        removed.mappings as usize
    }

    /// Device reset: detaches every endpoint (mappings removed, pins
    /// released) and clears the fault log and counters of faults.
    pub fn reset(&self) {
        let guard = epoch::pin();
        for ep in self.endpoint_list(&guard) {
            let _op = ep.op_lock.lock();
            self.detach_locked(&ep, &guard);
        }
        self.faults.lock().clear();
        // Relaxed: a statistic.
        self.stats.faults.store(0, Ordering::Relaxed);
    }

    /// Re-creates a mapping during migration import (FIXED at its IOVA).
    pub(crate) fn import_mapping(&self, rid: u32, m: &Mapping) -> std::result::Result<(), Status> {
        let flags = m.perms.bits() as u16 | abi::PVDMA_FLAG_FIXED as u16;
        let req = Request {
            op: Op::Map as u16,
            flags,
            requester: rid,
            nr_segs: m.segs.len() as u32,
            iova: m.iova,
            length: 0,
            reserved: [0; 3],
            segs: m.segs.clone(),
        };
        match self.execute_uncounted(&req).status {
            Status::Ok => Ok(()),
            s => Err(s),
        }
    }

    /// Attaches `rid` (migration import, tests), uncounted.
    pub(crate) fn attach(&self, rid: u32) -> Status {
        self.execute_uncounted(&Request {
            op: Op::Attach as u16,
            flags: 0,
            requester: rid,
            nr_segs: 0,
            iova: 0,
            length: 0,
            reserved: [0; 3],
            segs: Vec::new(),
        })
        .status
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Release every pin (munlock in mlock mode) and free the domains.
        self.reset();
        let guard = epoch::pin();
        let map = self
            .endpoints
            .swap(Shared::null(), Ordering::AcqRel, &guard);
        // SAFETY: the VM is being dropped: no reader can reach the map
        // except through guards that defer_destroy waits for.
        unsafe { guard.defer_destroy(map) };
    }
}

/// The page span (first and last page, inclusive) of each UNMAP_LIST
/// range, in list order; `None` when a range has length 0, wraps, or
/// reaches past the IOVA space (its last byte at or above 2^`iova_bits`).
fn unmap_list_spans(ranges: &[(u64, u64)], iova_bits: u32) -> Option<Vec<(u64, u64)>> {
    let limit = 1u64 << iova_bits;
    ranges
        .iter()
        .map(|&(iova, len)| {
            let end = iova.checked_add(len).filter(|&e| len > 0 && e <= limit)?;
            Some((iova >> abi::PAGE_SHIFT, (end - 1) >> abi::PAGE_SHIFT))
        })
        .collect()
}

fn domain_status(e: &domain::Error) -> Status {
    use crate::pin::Error as PinError;
    match e {
        domain::Error::Inval(_) => Status::Inval,
        domain::Error::Fault { .. } => Status::Fault,
        domain::Error::NoSpace { .. } => Status::NoSpc,
        domain::Error::Exist { .. } => Status::Exist,
        domain::Error::NoEnt { .. } => Status::NoEnt,
        domain::Error::Range { .. } => Status::Range,
        // An mlock refused by RLIMIT_MEMLOCK is the host's pin limit too.
        domain::Error::Pin(PinError::Quota { .. } | PinError::Mlock { .. }) => Status::Quota,
        // A page referenced 2^32 times: no room to count one more.
        domain::Error::Pin(PinError::RefcountOverflow { .. }) => Status::Quota,
        // The VM's mappings would take more host memory than allowed.
        domain::Error::MemQuota { .. } => Status::Quota,
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

/// Decodes the 64-byte header (little-endian, whatever the host).
pub fn parse_header(h: &[u8; 64]) -> Request {
    Request {
        op: u16::from_le_bytes([h[0], h[1]]),
        flags: u16::from_le_bytes([h[2], h[3]]),
        requester: le32(&h[8..12]),
        nr_segs: le32(&h[12..16]),
        iova: le64(&h[16..24]),
        length: le64(&h[24..32]),
        reserved: [le64(&h[40..48]), le64(&h[48..56]), le64(&h[56..64])],
        segs: Vec::new(),
    }
}

/// Encodes a request block (header + segments) as a guest would lay it
/// out: for tests, fuzzing and the C test program's Rust twin.
pub fn encode_request(req: &Request) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + 16 * req.segs.len());
    b.extend_from_slice(&req.op.to_le_bytes());
    b.extend_from_slice(&req.flags.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&req.requester.to_le_bytes());
    b.extend_from_slice(&req.nr_segs.to_le_bytes());
    b.extend_from_slice(&req.iova.to_le_bytes());
    b.extend_from_slice(&req.length.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    for r in req.reserved {
        b.extend_from_slice(&r.to_le_bytes());
    }
    for &(gpa, len) in &req.segs {
        b.extend_from_slice(&gpa.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
    }
    b
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Vm>();
}

// ---- single-address lookup (added for the C API's IOMMU translate) --------

/// What one IOVA of an endpoint translates to: the answer an IOMMU gives
/// for one page, without touching guest RAM (the address is handed to
/// the embedder's memory system, not dereferenced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// Guest-physical address of the IOVA's byte.
    pub gpa: u64,
    /// Bytes from that address that translate contiguously with the same
    /// permissions (at least 1).
    pub run: u64,
    /// What the device may do there.
    pub perms: Perm,
    /// The endpoint is not attached and bypasses translation (identity,
    /// read-write, `run` to the end of the 4 KiB page).
    pub bypass: bool,
}

impl Vm {
    /// Translates the one address `iova` of device `rid`. With `access`
    /// `None` this only looks (nothing counted, no fault logged, the
    /// permissions are reported, not checked); with `Some` it is a device
    /// access: counted as a translation, refused without the permission,
    /// and a refusal is logged as a fault. Lock-free, like
    /// [`Vm::translate`].
    ///
    /// Successful lookups through a domain are cached per thread (see
    /// [`LookupCache`]); a hit costs no epoch pin and no table walk.
    #[inline]
    pub fn lookup(
        &self,
        rid: u32,
        iova: u64,
        access: Option<Access>,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        if access.is_some() {
            self.stats.translations.count();
        }
        // Acquire: pairs with the Release stores of `bump_lookup_generation`
        // and `Domain::remove_locked` (see `crate::iotlb` for the argument,
        // which is the same with this VM-wide generation). Read before the
        // cache is probed, and before the walk that may fill it.
        let generation = self.lookup_generation.load(Ordering::Acquire);
        if let Some(found) = LookupCache::get(rid, iova, generation) {
            // A refused access takes the slow path, which logs it.
            if access.is_none_or(|a| found.perms.allows(a)) {
                return Ok(found);
            }
        }
        self.lookup_slow(rid, iova, access, generation)
    }

    /// [`Vm::lookup`] through the table, filling the cache.
    #[inline(never)]
    fn lookup_slow(
        &self,
        rid: u32,
        iova: u64,
        access: Option<Access>,
        generation: u64,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        let guard = epoch::pin();
        let r = match self.endpoint_map(&guard).get(&rid) {
            // Just found in the map: registered.
            Some(ep) => self.lookup_ep(ep, None, None, iova, access, &guard),
            None => Err(domain::TranslateFault {
                iova,
                reason: FaultReason::NoDevice,
            }),
        };
        match (r, access) {
            (Ok(found), _) if !found.bypass => LookupCache::put(rid, iova, generation, &found),
            (Err(f), Some(a)) => self.record_fault(rid, f.iova, a, f.reason),
            _ => {}
        }
        r
    }

    #[inline(always)]
    fn lookup_ep(
        &self,
        ep: &Endpoint,
        handle: Option<&Arc<Endpoint>>,
        tlb: Option<&mut Iotlb>,
        iova: u64,
        access: Option<Access>,
        guard: &Guard,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        let fault = |reason| domain::TranslateFault { iova, reason };
        let found = match self.route(ep, handle, guard).map_err(fault)? {
            Some(dom) => {
                let leaf = match tlb {
                    Some(tlb) => tlb.lookup(dom, iova, guard),
                    None => dom.table().lookup(iova, guard),
                }
                .ok_or(fault(FaultReason::Unmapped))?;
                Lookup {
                    gpa: leaf.gpa,
                    run: leaf.run,
                    perms: leaf.perms,
                    bypass: false,
                }
            }
            None => Lookup {
                gpa: iova,
                run: crate::types::PAGE_SIZE - (iova & crate::types::PAGE_MASK),
                perms: Perm::RW,
                bypass: true,
            },
        };
        match access {
            Some(a) if !found.perms.allows(a) => Err(fault(FaultReason::Permission)),
            _ => Ok(found),
        }
    }
}

/// The thread-local cache of [`Vm::lookup`] (what QEMU's IOMMU translate
/// calls for every access, with no handle to keep a cache in): a
/// direct-mapped table of successful domain lookups keyed by (requester
/// ID, IOVA page) and tagged with the VM's lookup generation, which is
/// unique across VMs. Served only while the VM's generation still has
/// that value; it changes after every removal of a translation in any of
/// the VM's domains and after every DETACH or endpoint removal, before the
/// operation returns (the ordering argument is `crate::iotlb`'s). Bypass
/// and refusals are never cached; permissions are checked on every hit.
/// No epoch pin is needed on a hit: nothing epoch-protected is read.
struct LookupCache;

/// Entries of the [`LookupCache`] (a power of two): 12 KiB of
/// thread-local storage per thread that calls [`Vm::lookup`] or not (it is
/// static TLS, zero-initialised).
const LOOKUP_CACHE_ENTRIES: usize = 512;

/// One cached lookup; `key == 0` is empty.
#[derive(Clone, Copy)]
struct LookupEntry {
    /// `iova_page << 17 | rid << 1 | 1` (IOVAs below 2^57 only).
    key: u64,
    /// The VM lookup generation it was made under.
    generation: u64,
    /// gpa of the page's first byte | pages to the end of the leaf << 2 |
    /// permission bits (as `crate::iotlb` packs it).
    value: u64,
}

thread_local! {
    static LOOKUP_CACHE: [Cell<LookupEntry>; LOOKUP_CACHE_ENTRIES] = const {
        [const {
            Cell::new(LookupEntry {
                key: 0,
                generation: 0,
                value: 0,
            })
        }; LOOKUP_CACHE_ENTRIES]
    };
}

impl LookupCache {
    /// The key and slot of (`rid`, `iova`); None when not cacheable.
    #[inline(always)]
    fn key(rid: u32, iova: u64) -> Option<(u64, usize)> {
        if iova >> MAX_IOVA_BITS != 0 || rid > 0xffff {
            return None;
        }
        let page = iova >> crate::types::PAGE_SHIFT;
        let key = page << 17 | u64::from(rid) << 1 | 1;
        let slot = (page ^ u64::from(rid) << 3) as usize & (LOOKUP_CACHE_ENTRIES - 1);
        Some((key, slot))
    }

    #[inline(always)]
    fn get(rid: u32, iova: u64, generation: u64) -> Option<Lookup> {
        let (key, slot) = Self::key(rid, iova)?;
        // No destructor: the storage is always accessible, `try_with` only
        // keeps a hypothetical failure off the hot path's panic paths.
        let e = LOOKUP_CACHE.try_with(|c| c[slot].get()).ok()?;
        if e.key != key || e.generation != generation {
            return None;
        }
        let off = iova & crate::types::PAGE_MASK;
        let span = (e.value & crate::types::PAGE_MASK) >> 2;
        Some(Lookup {
            gpa: (e.value & !crate::types::PAGE_MASK) | off,
            run: (span << crate::types::PAGE_SHIFT) - off,
            // Truncation intended: the low bits hold the permissions.
            perms: Perm::from_bits_truncate(e.value as u8),
            bypass: false,
        })
    }

    fn put(rid: u32, iova: u64, generation: u64, found: &Lookup) {
        let Some((key, slot)) = Self::key(rid, iova) else {
            return;
        };
        let off = iova & crate::types::PAGE_MASK;
        let span = (off + found.run) >> crate::types::PAGE_SHIFT;
        if span > crate::types::PAGE_MASK >> 2 {
            return;
        }
        let e = LookupEntry {
            key,
            generation,
            value: (found.gpa - off) | span << 2 | u64::from(found.perms.bits()),
        };
        let _ = LOOKUP_CACHE.try_with(|c| c[slot].set(e));
    }
}

/// A translation handle for one endpoint ([`Vm::translator`]): the
/// endpoint resolved once, so each translation goes straight to its
/// domain. Lock-free and wait-free like [`Vm::translate`]; `Send` and
/// `Sync`, so device threads may share one.
pub struct Translator<'a> {
    vm: &'a Vm,
    ep: Arc<Endpoint>,
}

impl<'a> Translator<'a> {
    /// This handle with a software IOTLB in front of the domain's table
    /// ([`crate::iotlb`]): for one device thread that translates the same
    /// pages over and over. The cache is invalidated by every removal of a
    /// translation (UNMAP, DETACH, RAM removal), so it never serves a
    /// translation removed before the call started.
    pub fn cached(self) -> CachedTranslator<'a> {
        self.cached_with(Iotlb::new())
    }

    /// [`Translator::cached`] with a cache the caller already has (from
    /// [`CachedTranslator::into_parts`]), say when a device model moves
    /// to another VM or endpoint: entries made for any other domain, or
    /// under an older generation of this one, are never served.
    pub fn cached_with(self, tlb: Iotlb) -> CachedTranslator<'a> {
        CachedTranslator { tr: self, tlb }
    }

    /// The endpoint's requester ID.
    pub fn requester(&self) -> u32 {
        self.ep.rid
    }

    /// [`Vm::translate`] for this endpoint, under the caller's guard:
    /// counted, and a refusal logged as a fault.
    #[inline]
    pub fn translate(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        self.vm.stats.translations.count();
        let r = self.translate_in(iova, len, access, out, guard);
        if let Err(f) = r {
            self.vm.record_fault(self.ep.rid, f.iova, access, f.reason);
        }
        r
    }

    /// [`Vm::translate_in`] for this endpoint: neither counted nor logged.
    #[inline]
    pub fn translate_in(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        self.vm.translate_ep(
            &self.ep,
            Some(&self.ep),
            None,
            iova,
            len,
            access,
            out,
            guard,
        )
    }

    /// [`Vm::lookup`] for this endpoint, under the caller's guard.
    #[inline]
    pub fn lookup(
        &self,
        iova: u64,
        access: Option<Access>,
        guard: &Guard,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        if access.is_some() {
            self.vm.stats.translations.count();
        }
        let r = self
            .vm
            .lookup_ep(&self.ep, Some(&self.ep), None, iova, access, guard);
        if let (Err(f), Some(a)) = (r, access) {
            self.vm.record_fault(self.ep.rid, f.iova, a, f.reason);
        }
        r
    }
}

/// A [`Translator`] with a software IOTLB ([`Translator::cached`],
/// [`Vm::cached_translator`]): the same answers, but a page translated
/// before is served from the cache without a table walk for as long as no
/// translation of the endpoint's domain has been removed. Its methods take
/// `&mut self`: one per device thread (it is `Send`, not shared).
pub struct CachedTranslator<'a> {
    tr: Translator<'a>,
    tlb: Iotlb,
}

impl std::fmt::Debug for CachedTranslator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTranslator")
            .field("rid", &self.tr.ep.rid)
            .field("tlb", &self.tlb)
            .finish()
    }
}

impl<'a> CachedTranslator<'a> {
    /// The endpoint's requester ID.
    pub fn requester(&self) -> u32 {
        self.tr.ep.rid
    }

    /// The cache (its miss count).
    pub fn iotlb(&self) -> &Iotlb {
        &self.tlb
    }

    /// The uncached handle and the cache.
    pub fn into_parts(self) -> (Translator<'a>, Iotlb) {
        (self.tr, self.tlb)
    }

    /// [`Translator::translate`] through the cache: counted, and a refusal
    /// logged as a fault.
    #[inline]
    pub fn translate(
        &mut self,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        self.tr.vm.stats.translations.count();
        let r = self.translate_in(iova, len, access, out, guard);
        if let Err(f) = r {
            self.tr
                .vm
                .record_fault(self.tr.ep.rid, f.iova, access, f.reason);
        }
        r
    }

    /// [`Translator::translate_in`] through the cache: neither counted nor
    /// logged.
    #[inline]
    pub fn translate_in(
        &mut self,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        let ep = &self.tr.ep;
        self.tr.vm.translate_ep(
            ep,
            Some(ep),
            Some(&mut self.tlb),
            iova,
            len,
            access,
            out,
            guard,
        )
    }

    /// [`Translator::lookup`] through the cache.
    #[inline]
    pub fn lookup(
        &mut self,
        iova: u64,
        access: Option<Access>,
        guard: &Guard,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        let vm = self.tr.vm;
        if access.is_some() {
            vm.stats.translations.count();
        }
        let ep = &self.tr.ep;
        let r = vm.lookup_ep(ep, Some(ep), Some(&mut self.tlb), iova, access, guard);
        if let (Err(f), Some(a)) = (r, access) {
            vm.record_fault(ep.rid, f.iova, a, f.reason);
        }
        r
    }
}
