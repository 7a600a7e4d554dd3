// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VM's configuration and the errors of the embedder-facing API.

use super::*;

/// Errors of the embedder-facing (not guest-facing) API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The requester ID is already registered.
    #[error("endpoint {0:#06x} already exists")]
    EndpointExists(u32),
    /// No such endpoint.
    #[error("no endpoint {0:#06x}")]
    NoEndpoint(u32),
    /// A RAM region operation failed.
    #[error(transparent)]
    Ram(#[from] ram::Error),
    /// Migration state could not be applied.
    #[error("bad migration state: {0}")]
    State(String),
}

/// Result alias for the embedder-facing API.
pub type Result<T> = std::result::Result<T, Error>;

/// Default IOVA width.
pub const DEFAULT_IOVA_BITS: u32 = 48;
/// Default MAX_SEGS.
pub const DEFAULT_MAX_SEGS: u32 = 512;
/// Largest MAX_SEGS accepted (bounds one request block to ~1 MiB).
pub const MAX_MAX_SEGS: u32 = 65536;
/// Default number of fault records kept.
pub const DEFAULT_FAULT_LOG_LEN: usize = 64;

/// Per-VM configuration, fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// IOVA width, 21..=57 bits.
    pub iova_bits: u32,
    /// Most segments one MAP may carry (>= 252).
    pub max_segs: u32,
    /// Pin limit in bytes (u64::MAX: unlimited).
    pub pin_limit: u64,
    /// Host memory the VM's mappings may take, page-table nodes and
    /// mapping records, in bytes (u64::MAX: unlimited). A MAP that would
    /// pass it gets QUOTA.
    pub mem_limit: u64,
    /// Whether pinning mlocks pages.
    pub pin_mode: PinMode,
    /// Unattached endpoints bypass translation (else they are blocked).
    pub bypass: bool,
    /// MAP without FIXED is allowed (the host picks the IOVA).
    pub host_iova: bool,
    /// The UNMAP_LIST extension (op 6, FEATURES bit 3) is offered; without
    /// it op 6 is an unknown op.
    pub unmap_list: bool,
    /// Fault records kept.
    pub fault_log_len: usize,
    /// Request queues offered (the QUEUES register), 0..=[`MAX_QUEUES`];
    /// 0 turns the QUEUE extension (ops 7 and 8, FEATURES bit 4) off.
    pub queues: u32,
}

/// Default number of request queues.
pub const DEFAULT_QUEUES: u32 = 8;

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            iova_bits: DEFAULT_IOVA_BITS,
            max_segs: DEFAULT_MAX_SEGS,
            pin_limit: u64::MAX,
            mem_limit: u64::MAX,
            pin_mode: PinMode::None,
            bypass: true,
            host_iova: true,
            unmap_list: true,
            fault_log_len: DEFAULT_FAULT_LOG_LEN,
            queues: DEFAULT_QUEUES,
        }
    }
}

impl VmConfig {
    /// Checks every value; the error says which and why.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_IOVA_BITS..=MAX_IOVA_BITS).contains(&self.iova_bits) {
            return Err(Error::Config(format!(
                "iova-bits {} outside {MIN_IOVA_BITS}..={MAX_IOVA_BITS}",
                self.iova_bits
            )));
        }
        if !(abi::PVDMA_MIN_MAX_SEGS..=MAX_MAX_SEGS).contains(&self.max_segs) {
            return Err(Error::Config(format!(
                "max-segs {} outside {}..={MAX_MAX_SEGS}",
                self.max_segs,
                abi::PVDMA_MIN_MAX_SEGS
            )));
        }
        if self.fault_log_len == 0 || self.fault_log_len > 65536 {
            return Err(Error::Config(format!(
                "fault log length {} outside 1..=65536",
                self.fault_log_len
            )));
        }
        if self.queues > MAX_QUEUES {
            return Err(Error::Config(format!(
                "queues {} outside 0..={MAX_QUEUES}",
                self.queues
            )));
        }
        Ok(())
    }

    /// The FEATURES register bits this configuration implies (the
    /// transport adds HYPERCALL when it is live).
    pub fn features(&self) -> u64 {
        let mut f = 0;
        if self.host_iova {
            f |= u64::from(abi::PVDMA_FEATURE_HOST_IOVA);
        }
        if self.bypass {
            f |= u64::from(abi::PVDMA_FEATURE_BYPASS);
        }
        if self.unmap_list {
            f |= u64::from(abi::PVDMA_FEATURE_UNMAP_LIST);
        }
        if self.queues > 0 {
            f |= abi::PVDMA_FEATURE_QUEUE as u64;
        }
        f
    }

    /// Decodes a request's `op` as this VM offers ops: `None` for an
    /// unknown op, which UNMAP_LIST is when the extension is off, and
    /// QUEUE and SYNC are with no queue offered.
    #[inline]
    pub fn op(&self, raw: u16) -> Option<Op> {
        match Op::from_raw(raw) {
            Some(Op::UnmapList) if !self.unmap_list => None,
            Some(Op::Queue | Op::Sync) if self.queues == 0 => None,
            op => op,
        }
    }

    /// The PAGE_SIZES register: 4 KiB and 2 MiB.
    pub fn page_sizes(&self) -> u64 {
        (1 << 12) | (1 << 21)
    }
}
