// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! INVALIDATE round trips (send to ack) while another thread keeps the
//! ring full of 4 KiB reads, and the rate of that load with and without
//! the invalidations. The frontend is the scripted one of
//! `tests/frontend.rs`; see BENCHMARKS.md ("vhost-user-blk").
//!
//!   cargo bench -p pvdma-vhost-user-blk --bench invalidate_under_load \
//!       [-- LOAD ROUNDS SERVICE_US]
//!
//! LOAD reads (default 5000), up to ROUNDS invalidations (default 200),
//! each read held SERVICE_US microseconds in the backend (default 100).

#[allow(dead_code, unused_imports)]
#[path = "../tests/frontend.rs"]
mod frontend;

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(|a| a.parse::<u32>().expect("LOAD and ROUNDS are numbers"));
    let load = args.next().unwrap_or(5000);
    let rounds = args.next().unwrap_or(200) as usize;
    let service = std::time::Duration::from_micros(args.next().unwrap_or(100).into());
    frontend::bench_invalidation_under_load(load, rounds, service);
}
