// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Atomics and epoch reclamation, switched to loom's models under `cfg(loom)`
//! so that the lock-free table can be model-checked with the code it ships.

#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Epoch-based reclamation (crossbeam-epoch; loom-instrumented under
/// `--cfg crossbeam_loom`).
pub use crossbeam_epoch as epoch;
