// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzzes split virtqueues through pvdma translations: a hostile guest
//! chooses the IOVA mappings, the ring layout, the ring and descriptor
//! contents, and when pages are unmapped under the device.
//!
//! The harness, [`pvdma::testing::fuzz::virtqueue`], lives in the library
//! (feature `test-utils`, not in the static library) so that `cargo test`
//! replays it on every build. It asserts the invariants: no panic, and
//! every host pointer the queue hands out (the `pop` iovecs and the slices
//! virtio-queue's `Reader`/`Writer` get through `IovaSpace::get_slices`)
//! lies inside the registered guest RAM.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pvdma::testing::fuzz::virtqueue(data);
});
