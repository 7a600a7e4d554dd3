// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VM: guest RAM, endpoints and their domains, the pin table, the
//! request engine every transport calls, notifications, faults, statistics.
//!
//! Locking: readers ([`Vm::translate`]) take no lock: the endpoint map, each
//! endpoint's domain pointer, the RAM layout and the page tables are all
//! epoch-protected. Requests on one endpoint are serialised by that
//! endpoint's `op_lock` (so the outcome of concurrent requests is that of
//! some serial order); the pin table has its own lock, taken last. Lock
//! order: queue mutexes (`queue`) -> `endpoints_writer` -> `op_lock` ->
//! domain -> table writer -> pins.
//!
//! Here: the [`Vm`] itself (its state, creation, guest RAM, drop). Its
//! other jobs, one file each, all `impl Vm` blocks over that one state:
//!
//! - `config`: [`VmConfig`], the limits, [`Error`].
//! - `endpoints`: [`Endpoint`], the epoch-protected endpoint map, and
//!   adding, removing and finding endpoints.
//! - `engine`: the request engine ([`Vm::submit`], [`Vm::execute`]):
//!   ATTACH, DETACH, MAP, UNMAP, UNMAP_LIST, reset.
//! - `wire`: the request block codec, offsets from `pvdma_abi.h`'s structs.
//! - `translate`: device DMA ([`Vm::translate`], [`Vm::dma_view`]), single
//!   address lookups ([`Vm::lookup`]), and the one "count, then record a
//!   fault" wrapper every device-access entry point goes through.
//! - `lookup_cache`: the thread-local cache of [`Vm::lookup`].
//! - `handles`: [`Translator`] and [`CachedTranslator`].
//! - `events`: MAP/UNMAP notifications, the fault log, [`Transport`].
//! - `queue`: queued requests (ops QUEUE and SYNC, the drains).
//! - `stats`: request counts and per-thread translation counters.
//! - `migration`: [`VmState`], export and import.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{
    AtomicBool as StdAtomicBool, AtomicPtr as StdAtomicPtr, AtomicU64 as StdAtomicU64,
    Ordering as StdOrdering,
};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

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

mod config;
mod endpoints;
mod engine;
mod events;
mod handles;
mod lookup_cache;
mod migration;
mod queue;
mod stats;
mod translate;
mod wire;

pub use config::*;
pub use endpoints::*;
pub use engine::*;
pub use events::*;
pub use handles::*;
use lookup_cache::*;
pub use migration::*;
pub use queue::*;
pub use stats::*;
pub use translate::*;
pub use wire::*;

/// A VM as pvdma sees it.
pub struct Vm {
    cfg: VmConfig,
    ram: GuestRam,
    /// Locked and counted by every MAP and UNMAP: on cache lines of its
    /// own, away from what translations read (`ram`, `endpoints`).
    pins: CachePadded<PinTable>,
    /// What the domains' nodes and records may take.
    mem: Arc<MemBudget>,
    endpoints: Atomic<EndpointMap>,
    /// Bumped after every replacement of `endpoints`: an
    /// [`EndpointCache`] made under the current value is still current.
    endpoints_version: AtomicU64,
    endpoints_writer: Mutex<()>,
    /// The notification callback (null: none). Epoch-protected, so that a
    /// request (which holds a guard already) reaches it with two loads and
    /// no lock or reference count; see [`Vm::set_notifier`].
    notifier: Atomic<NotifierSlot>,
    faults: Mutex<VecDeque<FaultRecord>>,
    stats: Stats,
    /// Changes (to a value never used before, by any VM or domain) after
    /// every removal of a translation in any of this VM's domains and
    /// every DETACH or endpoint removal: the key of the thread-local
    /// cache of [`Vm::lookup`], which it lets serve hits without pinning.
    lookup_generation: Arc<AtomicU64>,
    /// The request queues (ABI 3.2).
    queues: Queues,
}

impl Vm {
    /// A VM with no RAM and no endpoints.
    pub fn new(cfg: VmConfig) -> Result<Vm> {
        cfg.validate()?;
        Ok(Vm {
            pins: CachePadded::new(PinTable::new(cfg.pin_limit, cfg.pin_mode)),
            mem: Arc::new(MemBudget::new(cfg.mem_limit)),
            ram: GuestRam::new(),
            endpoints: Atomic::new(EndpointMap::new()),
            endpoints_version: AtomicU64::new(1),
            endpoints_writer: Mutex::new(()),
            notifier: Atomic::null(),
            faults: Mutex::new(VecDeque::with_capacity(cfg.fault_log_len)),
            stats: Stats {
                requests: Default::default(),
                transports: Default::default(),
                mappings: CachePadded::new(AtomicU64::new(0)),
                translations: CachePadded::new(TranslationCounters::new()),
                faults: AtomicU64::new(0),
            },
            lookup_generation: Arc::new(AtomicU64::new(domain::next_generation())),
            queues: Queues::new(cfg.queues),
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
            // Under op_lock no drain may start on this thread (a notifier that
            // translates): queue mutexes come before op_lock.
            let _no_drain = NoDrain::enter(self.cfg.queues > 0);
            let _op = ep.op_lock.lock();
            if let Some(dom) = Self::domain_of(&ep, &guard) {
                let removed = dom.remove_gpa_range(
                    gpa,
                    size,
                    before,
                    &self.pins,
                    &mut self.unmap_notifier(ep.rid, &guard),
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
        let notifier = self.notifier.swap(Shared::null(), Ordering::AcqRel, &guard);
        if !notifier.is_null() {
            // SAFETY: as for the map: unlinked, and readers hold guards.
            unsafe { guard.defer_destroy(notifier) };
        }
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Vm>();
}
