//! Shared helpers for the pvdma benchmarks (being written).
