// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzzes the request queues (ABI section 3.2): the fuzzer owns a queue's
//! ring and control block and writes arbitrary or well-formed entries,
//! moves `head` anywhere (breaking the queue), rewrites the ring and head
//! while a drain runs, and has the host drain by every path (a request, a
//! device access, SYNC, tear-down, reset, migration).
//!
//! The harness, [`pvdma::testing::fuzz::queue`], lives in the library
//! (feature `test-utils`) so that `cargo test` replays it on every build.
//! Its invariants: no panic or endless loop; no drain takes more than N
//! entries of a queue; pins are exactly what the mappings and the set-up
//! queue imply and every mapping translates; a stopped queue makes SYNC
//! answer STATE; reset leaves nothing mapped, pinned or set up.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pvdma::testing::fuzz::queue(data);
});
