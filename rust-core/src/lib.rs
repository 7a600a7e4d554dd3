// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! pvdma: paravirtual DMA remapping for QEMU/KVM.
//!
//! A guest asks the host, through an MMIO doorbell or a hypercall, to map
//! and unmap DMA buffers for the PCI endpoints behind a pvdma function. This
//! crate is the host side of that contract (`docs/abi.md`); its C API, the
//! static library QEMU links, is the `pvdma-capi` crate (`capi/`).
//!
//! The modules are private; what they offer is re-exported here, flat (as
//! virtio-queue does), so a module can move or split without breaking a
//! user. Only [`abi`], the wire format generated from `pvdma_abi.h`, is a
//! namespace of its own. The modules:
//!
//! - `abi`: the guest ABI v1 (bindgen structs and constants, [`Op`],
//!   [`Status`]).
//! - `types`: pages, permissions, accesses, host fragments.
//! - `ram`: the VM's guest RAM regions (guest-physical -> host virtual),
//!   snapshotted so that readers never wait.
//! - `table`: the per-domain IOVA page table, lock-free for readers,
//!   with epoch-based reclamation of freed table memory.
//! - `pin`: the per-VM pin table (refcounts, limit, optional mlock).
//! - `iova_alloc`: the IOVA allocator used when the host picks the IOVA.
//! - `domain`: a translation domain: table + mapping records + allocator.
//! - `mapping`: a domain's mapping records, their page runs and pins.
//! - `iotlb`: a per-handle software IOTLB in front of the table.
//! - `iova_space`: a domain's IOVA space as vm-memory's `GuestMemory`.
//! - `vq`: split virtqueues whose rings and buffers are IOVAs.
//! - `vm`: the VM ([`Vm`]): configuration, endpoints, the request engine
//!   ([`Vm::submit`]), translation and its handles, notifications and
//!   faults, statistics, migration state.
//! - `sync`: atomics and epochs, switched to loom's under `cfg(loom)`.
//! - [`testing`] (feature `test-utils`): guest-memory fixtures, request
//!   builders and fuzz harnesses shared by the tests, benchmarks and fuzz
//!   targets.

pub mod abi;
mod domain;
mod hash;
mod iotlb;
mod iova_alloc;
mod iova_space;
mod mapping;
mod pin;
mod ram;
mod sync;
mod table;
mod types;
mod vm;
mod vq;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use abi::{Op, Status};
pub use domain::{
    Domain, Error as DomainError, FaultReason, FragmentSink, IovaChoice, Mapping, MemBudget,
    PageRun, Removed, TranslateFault,
};
pub use iotlb::{Iotlb, IOTLB_ENTRIES};
pub use iova_alloc::IovaAllocator;
pub use iova_space::{CachedWindow, Error as IovaSpaceError, IovaSlices, IovaSpace, PageCache};
pub use pin::{Error as PinError, PinMode, PinTable};
pub use ram::{Error as RamError, GuestRam, RamLayout, RamRegion, MAX_REGIONS};
pub use sync::epoch;
pub use table::{
    IoPageTable, Leaf, TableWriter, HUGE_SIZE, MAX_IOVA_BITS, MIN_IOVA_BITS, NODE_BYTES,
};
pub use types::{Access, Fragment, Perm, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE};
pub use vm::{
    encode_request, parse_header, CachedTranslator, Endpoint, EndpointCache, EndpointState, Error,
    FaultRecord, Lookup, MapEvent, MapEventKind, Notifier, Request, Response, Result,
    StatsSnapshot, Translator, Transport, Vm, VmConfig, VmState, DEFAULT_FAULT_LOG_LEN,
    DEFAULT_IOVA_BITS, DEFAULT_MAX_SEGS, MAX_MAX_SEGS, STATE_VERSION, STATS_OPS,
};
pub use vm::{
    DrainCause, DrainHooks, DrainReport, QueueEntry, QueueInfo, QueueSaved, DEFAULT_QUEUES,
    MAX_QUEUES, QUEUE_CTRL_SIZE, QUEUE_ENTRY_SIZE, QUEUE_RING_MAX, QUEUE_RING_MIN,
};
pub use vq::{
    CacheStats, ChainInfo, Error as VqError, QueueConfig, VirtQueue, MAX_CHAIN_FRAGMENTS,
    MAX_QUEUE_SIZE, VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
