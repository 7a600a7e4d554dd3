// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A vhost-user-blk backend whose every access to the guest's rings and
//! buffers goes through pvdma's translation table, fed by vhost-user IOTLB
//! messages (`docs/vhost-user.md`). The binary is `pvdma-vhost-user-blk`.
//!
//! - [`proto`]: the vhost-user frames and the IOTLB messages rust-vmm's
//!   `vhost` 0.18 does not handle (written to become a patch to it).
//! - [`iotlb`]: the device IOTLB over a pvdma `Domain`, and the window.
//! - [`mem`]: the frontend's memory table.
//! - [`blk`]: virtio-blk requests served through pvdma's `IovaSpace`.
//! - [`inflight`]: the inflight region (resubmission after a restart).
//! - [`device`]: the frontend's requests and the queue thread.

pub mod blk;
pub mod device;
pub mod inflight;
pub mod iotlb;
pub mod mem;
pub mod proto;
