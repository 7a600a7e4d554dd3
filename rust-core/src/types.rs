// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Small shared types: permissions, access kinds, translation fragments.

use std::fmt;

/// The translation granule: 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Mask of the in-page offset.
pub const PAGE_MASK: u64 = PAGE_SIZE - 1;

/// Permissions of a mapping: which device accesses it allows.
///
/// Bit 0 READ (the device may read memory), bit 1 WRITE (the device may
/// write memory), as in the ABI's request flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// No access.
    pub const NONE: Perm = Perm(0);
    /// The device may read.
    pub const READ: Perm = Perm(1);
    /// The device may write.
    pub const WRITE: Perm = Perm(2);
    /// The device may read and write.
    pub const RW: Perm = Perm(3);

    /// From the low two bits of `bits` (other bits ignored).
    pub const fn from_bits_truncate(bits: u8) -> Perm {
        Perm(bits & 3)
    }

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// True when every permission in `other` is in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// True when no permission is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether this permission set allows `access`.
    pub const fn allows(self, access: Access) -> bool {
        self.contains(access.perm())
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = if self.contains(Perm::READ) { 'r' } else { '-' };
        let w = if self.contains(Perm::WRITE) { 'w' } else { '-' };
        write!(f, "{r}{w}")
    }
}

impl From<Perm> for vm_memory::Permissions {
    fn from(p: Perm) -> Self {
        match p.0 {
            0 => vm_memory::Permissions::No,
            1 => vm_memory::Permissions::Read,
            2 => vm_memory::Permissions::Write,
            _ => vm_memory::Permissions::ReadWrite,
        }
    }
}

impl From<vm_memory::Permissions> for Perm {
    fn from(p: vm_memory::Permissions) -> Self {
        Perm(p as u8 & 3)
    }
}

/// What a device access does to memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Access {
    /// The device reads memory (memory -> device, DMA_TO_DEVICE).
    Read = 1,
    /// The device writes memory (device -> memory, DMA_FROM_DEVICE).
    Write = 2,
    /// Read-modify-write (atomics): needs both.
    ReadWrite = 3,
}

impl Access {
    /// The permission this access needs.
    pub const fn perm(self) -> Perm {
        Perm(self as u8)
    }

    /// From raw bits 1..=3.
    pub fn from_raw(raw: u32) -> Option<Access> {
        match raw {
            1 => Some(Access::Read),
            2 => Some(Access::Write),
            3 => Some(Access::ReadWrite),
            _ => None,
        }
    }
}

/// One piece of a translated IOVA range: `len` bytes at host address `hva`,
/// which is guest-physical `gpa`.
///
/// Consecutive fragments of one translation are never contiguous in host
/// memory (they are coalesced when they are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Host virtual address of the first byte.
    pub hva: usize,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perm_allows_access() {
        assert!(Perm::RW.allows(Access::Read));
        assert!(Perm::RW.allows(Access::ReadWrite));
        assert!(Perm::READ.allows(Access::Read));
        assert!(!Perm::READ.allows(Access::Write));
        assert!(!Perm::WRITE.allows(Access::ReadWrite));
        assert!(!Perm::NONE.allows(Access::Read));
        assert_eq!(Perm::from_bits_truncate(0xff), Perm::RW);
        assert_eq!(format!("{}", Perm::WRITE), "-w");
    }

    #[test]
    fn perm_converts_to_vm_memory() {
        for bits in 0..4u8 {
            let p = Perm::from_bits_truncate(bits);
            let v: vm_memory::Permissions = p.into();
            assert_eq!(Perm::from(v), p);
        }
    }
}
