// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! pvdma: paravirtual DMA remapping for QEMU/KVM.
//!
//! A guest asks the host, through an MMIO doorbell or a hypercall, to map
//! and unmap DMA buffers for the PCI endpoints behind a pvdma function. This
//! crate is the host side of that contract (`docs/abi.md`):
//!
//! - [`ram`]: the VM's guest RAM regions (guest-physical -> host virtual),
//!   snapshotted so that readers never wait.
//! - [`table`]: the per-domain IOVA page table, lock-free for readers,
//!   with epoch-based reclamation of freed table memory.
//! - [`pin`]: the per-VM pin table (refcounts, limit, optional mlock).
//! - [`iova_alloc`]: the IOVA allocator used when the host picks the IOVA.
//! - [`domain`]: a translation domain: table + mapping records + allocator.
//! - [`iotlb`]: a per-handle software IOTLB in front of the table.
//! - [`vm`]: the VM: endpoints, domains, notifications, faults, statistics,
//!   the request engine ([`vm::Vm::submit`]) and migration state.
//! - [`ffi`]: the C API (header `include/pvdma.h`, made by cbindgen).

pub mod abi;
pub mod domain;
pub mod ffi;
pub mod iotlb;
pub mod iova_alloc;
pub mod iova_space;
pub mod pin;
pub mod ram;
pub mod sync;
pub mod table;
pub mod types;
pub mod vm;
pub mod vq;

pub use abi::{Op, Status};
pub use types::{Access, Fragment, Perm, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE};
pub use vm::{Vm, VmConfig};
