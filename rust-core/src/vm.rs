// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VM (being written).

/// Per-VM configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {}

/// A VM.
pub struct Vm {}
