// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Atomics and epoch reclamation, switched to loom's models under `cfg(loom)`
//! so that the lock-free table can be model-checked with the code it ships.

#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Epoch-based reclamation: crossbeam-epoch (loom-instrumented under
/// `--cfg crossbeam_loom`), with a [`Guard`](epoch::Guard) of pvdma's own.
pub mod epoch {
    pub use crossbeam_epoch::{default_collector, unprotected, Atomic, Owned, Shared};

    /// A pinned epoch of the collector that pvdma frees its memory
    /// through (crossbeam-epoch's default one): while it lives, nothing a
    /// reader reached under it (table nodes, RAM layouts, domains,
    /// endpoint maps) is freed. Made only by [`pin`].
    ///
    /// Every lock-free read path of pvdma takes one, and the type is what
    /// makes them sound: a crossbeam-epoch guard could come from another
    /// collector (`Collector::new()`), which would not hold off pvdma's
    /// reclamation, and safe code could then read freed memory. So the
    /// read paths take this type, which only [`pin`] makes, and not
    /// crossbeam's. It dereferences to the crossbeam guard inside.
    ///
    /// ```compile_fail
    /// // A guard of another collector is not a pvdma guard.
    /// let collector = crossbeam_epoch::Collector::new();
    /// let handle = collector.register();
    /// let table = pvdma::IoPageTable::new(39);
    /// table.lookup(0x1000, &handle.pin());
    /// ```
    ///
    /// ```
    /// let table = pvdma::IoPageTable::new(39);
    /// assert_eq!(table.lookup(0x1000, &pvdma::epoch::pin()), None);
    /// ```
    #[repr(transparent)]
    pub struct Guard(crossbeam_epoch::Guard);

    /// Pins the current thread in pvdma's collector (crossbeam-epoch's
    /// default one); see [`Guard`].
    #[inline]
    pub fn pin() -> Guard {
        Guard(crossbeam_epoch::pin())
    }

    impl std::ops::Deref for Guard {
        type Target = crossbeam_epoch::Guard;

        #[inline]
        fn deref(&self) -> &crossbeam_epoch::Guard {
            &self.0
        }
    }

    impl std::fmt::Debug for Guard {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Guard { .. }")
        }
    }
}
