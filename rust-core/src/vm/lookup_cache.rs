// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The thread-local cache of [`Vm::lookup`].

use super::*;

/// The thread-local cache of [`Vm::lookup`] (what QEMU's IOMMU translate
/// calls for every access, with no handle to keep a cache in): a
/// direct-mapped table of successful domain lookups keyed by (requester
/// ID, IOVA page) and tagged with the VM's lookup generation, which is
/// unique across VMs. Served only while the VM's generation still has
/// that value; it changes after every removal of a translation in any of
/// the VM's domains and after every DETACH or endpoint removal, before the
/// operation returns (the ordering argument is `crate::iotlb`'s). Bypass
/// and refusals are never cached; permissions are checked on every hit.
/// No epoch pin is needed on a hit: nothing epoch-protected is read.
pub(super) struct LookupCache;

/// Entries of the [`LookupCache`] (a power of two): 12 KiB of
/// thread-local storage per thread that calls [`Vm::lookup`] or not (it is
/// static TLS, zero-initialised).
pub(super) const LOOKUP_CACHE_ENTRIES: usize = 512;

/// One cached lookup; `key == 0` is empty.
#[derive(Clone, Copy)]
pub(super) struct LookupEntry {
    /// `iova_page << 17 | rid << 1 | 1` (IOVAs below 2^57 only).
    pub(super) key: u64,
    /// The VM lookup generation it was made under.
    pub(super) generation: u64,
    /// gpa of the page's first byte | pages to the end of the leaf << 2 |
    /// permission bits (as `crate::iotlb` packs it).
    pub(super) value: u64,
}

thread_local! {
    static LOOKUP_CACHE: [Cell<LookupEntry>; LOOKUP_CACHE_ENTRIES] = const {
        [const {
            Cell::new(LookupEntry {
                key: 0,
                generation: 0,
                value: 0,
            })
        }; LOOKUP_CACHE_ENTRIES]
    };
}

impl LookupCache {
    /// The key and slot of (`rid`, `iova`); None when not cacheable.
    #[inline(always)]
    pub(super) fn key(rid: u32, iova: u64) -> Option<(u64, usize)> {
        if iova >> MAX_IOVA_BITS != 0 || rid > 0xffff {
            return None;
        }
        let page = iova >> crate::types::PAGE_SHIFT;
        let key = page << 17 | u64::from(rid) << 1 | 1;
        let slot = (page ^ u64::from(rid) << 3) as usize & (LOOKUP_CACHE_ENTRIES - 1);
        Some((key, slot))
    }

    #[inline(always)]
    pub(super) fn get(rid: u32, iova: u64, generation: u64) -> Option<Lookup> {
        let (key, slot) = Self::key(rid, iova)?;
        // No destructor: the storage is always accessible, `try_with` only
        // keeps a hypothetical failure off the hot path's panic paths.
        let e = LOOKUP_CACHE.try_with(|c| c[slot].get()).ok()?;
        if e.key != key || e.generation != generation {
            return None;
        }
        let off = iova & crate::types::PAGE_MASK;
        let span = (e.value & crate::types::PAGE_MASK) >> 2;
        Some(Lookup {
            gpa: (e.value & !crate::types::PAGE_MASK) | off,
            run: (span << crate::types::PAGE_SHIFT) - off,
            // Truncation intended: the low bits hold the permissions.
            perms: Perm::from_bits_truncate(e.value as u8),
            bypass: false,
        })
    }

    pub(super) fn put(rid: u32, iova: u64, generation: u64, found: &Lookup) {
        let Some((key, slot)) = Self::key(rid, iova) else {
            return;
        };
        let off = iova & crate::types::PAGE_MASK;
        let span = (off + found.run) >> crate::types::PAGE_SHIFT;
        if span > crate::types::PAGE_MASK >> 2 {
            return;
        }
        let e = LookupEntry {
            key,
            generation,
            value: (found.gpa - off) | span << 2 | u64::from(found.perms.bits()),
        };
        let _ = LOOKUP_CACHE.try_with(|c| c[slot].set(e));
    }
}
