// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Loom model of the shared lookup generation; `tools/loom.sh` runs it:
//!
//! ```sh
//! LOOM_MAX_PREEMPTIONS=2 RUSTFLAGS="--cfg loom --cfg crossbeam_loom" \
//!     cargo test -p pvdma --features loom --release --lib loom_tests
//! ```

use super::*;
use crate::sync::epoch;
use loom::sync::Arc;
use loom::thread;

const IOVA: u64 = 0x3000;
const GPA: u64 = 0x2345_6000;

/// Two domains' removals (each table cleared, then the shared
/// generation moved, as `remove_locked` does) race a reader filling a
/// cache entry as `Vm::lookup` does (the shared generation loaded
/// before the walks). Once both removals returned, an entry tagged
/// with the current value must hold neither removed page. Fails with
/// Release stores in `bump_shared_generation`: the reader can load the
/// second writer's value and still see the first writer's page.
#[test]
fn shared_generation_orders_every_writer() {
    loom::model(|| {
        let tables = Arc::new([IoPageTable::new(30), IoPageTable::new(30)]);
        for table in tables.iter() {
            let mut w = table.lock();
            w.map(IOVA, GPA, PAGE_SIZE, Perm::READ);
            // Keeps the leaf node alive: the removal clears one entry.
            w.map(IOVA + PAGE_SIZE, GPA, PAGE_SIZE, Perm::READ);
        }
        let shared = Arc::new(AtomicU64::new(next_generation()));
        let writers: Vec<_> = (0..2)
            .map(|i| {
                let (tables, shared) = (Arc::clone(&tables), Arc::clone(&shared));
                thread::spawn(move || {
                    tables[i].lock().unmap(IOVA, PAGE_SIZE);
                    bump_shared_generation(&shared);
                })
            })
            .collect();
        let tag = shared.load(Ordering::Acquire);
        let guard = epoch::pin();
        let cached = [0, 1].map(|i| tables[i].lookup(IOVA, &guard).is_some());
        drop(guard);
        for w in writers {
            w.join().unwrap();
        }
        if shared.load(Ordering::Acquire) == tag {
            assert_eq!(
                cached,
                [false, false],
                "a removed page under the current tag"
            );
        }
    });
}
