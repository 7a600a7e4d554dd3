// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Translation handles: [`Translator`] and [`CachedTranslator`], an
//! endpoint resolved once (with a software IOTLB of its own for the latter).

use super::*;

/// A translation handle for one endpoint ([`Vm::translator`]): the
/// endpoint resolved once, so each translation goes straight to its
/// domain. Lock-free and wait-free like [`Vm::translate`]; `Send` and
/// `Sync`, so device threads may share one.
pub struct Translator<'a> {
    pub(super) vm: &'a Vm,
    pub(super) ep: Arc<Endpoint>,
}

impl<'a> Translator<'a> {
    /// This handle with a software IOTLB in front of the domain's table
    /// ([`crate::iotlb`]): for one device thread that translates the same
    /// pages over and over. The cache is invalidated by every removal of a
    /// translation (UNMAP, DETACH, RAM removal), so it never serves a
    /// translation removed before the call started.
    pub fn cached(self) -> CachedTranslator<'a> {
        self.cached_with(Iotlb::new())
    }

    /// [`Translator::cached`] with a cache the caller already has (from
    /// [`CachedTranslator::into_parts`]), say when a device model moves
    /// to another VM or endpoint: entries made for any other domain, or
    /// under an older generation of this one, are never served.
    pub fn cached_with(self, tlb: Iotlb) -> CachedTranslator<'a> {
        CachedTranslator { tr: self, tlb }
    }

    /// The endpoint's requester ID.
    pub fn requester(&self) -> u32 {
        self.ep.rid
    }

    /// [`Vm::translate`] for this endpoint, under the caller's guard:
    /// counted, and a refusal logged as a fault.
    #[inline]
    pub fn translate(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        // Counted and logged by hand, not through `Vm::device_access`: the
        // closure cost 15-18% on this path (A/B in docs/benchmark-log.md).
        self.vm.stats.translations.count();
        let r = self.translate_in(iova, len, access, out, guard);
        if let Err(f) = r {
            self.vm.record_fault(self.ep.rid, f.iova, access, f.reason);
        }
        r
    }

    /// [`Vm::translate_in`] for this endpoint: neither counted nor logged.
    #[inline]
    pub fn translate_in(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        self.vm.translate_ep(
            &self.ep,
            Some(&self.ep),
            None,
            iova,
            len,
            access,
            out,
            guard,
        )
    }

    /// [`Vm::lookup`] for this endpoint, under the caller's guard.
    #[inline]
    pub fn lookup(
        &self,
        iova: u64,
        access: Option<Access>,
        guard: &Guard,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        self.vm.device_access(self.ep.rid, access, || {
            self.vm
                .lookup_ep(&self.ep, Some(&self.ep), None, iova, access, guard)
        })
    }
}

/// A [`Translator`] with a software IOTLB ([`Translator::cached`],
/// [`Vm::cached_translator`]): the same answers, but a page translated
/// before is served from the cache without a table walk for as long as no
/// translation of the endpoint's domain has been removed. Its methods take
/// `&mut self`: one per device thread (it is `Send`, not shared).
pub struct CachedTranslator<'a> {
    pub(super) tr: Translator<'a>,
    pub(super) tlb: Iotlb,
}

impl std::fmt::Debug for CachedTranslator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTranslator")
            .field("rid", &self.tr.ep.rid)
            .field("tlb", &self.tlb)
            .finish()
    }
}

impl<'a> CachedTranslator<'a> {
    /// The endpoint's requester ID.
    pub fn requester(&self) -> u32 {
        self.tr.ep.rid
    }

    /// The cache (its miss count).
    pub fn iotlb(&self) -> &Iotlb {
        &self.tlb
    }

    /// The uncached handle and the cache.
    pub fn into_parts(self) -> (Translator<'a>, Iotlb) {
        (self.tr, self.tlb)
    }

    /// [`Translator::translate`] through the cache: counted, and a refusal
    /// logged as a fault.
    #[inline]
    pub fn translate(
        &mut self,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        // By hand, as in [`Translator::translate`].
        self.tr.vm.stats.translations.count();
        let r = self.translate_in(iova, len, access, out, guard);
        if let Err(f) = r {
            self.tr
                .vm
                .record_fault(self.tr.ep.rid, f.iova, access, f.reason);
        }
        r
    }

    /// [`Translator::translate_in`] through the cache: neither counted nor
    /// logged.
    #[inline]
    pub fn translate_in(
        &mut self,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        let ep = &self.tr.ep;
        self.tr.vm.translate_ep(
            ep,
            Some(ep),
            Some(&mut self.tlb),
            iova,
            len,
            access,
            out,
            guard,
        )
    }

    /// [`Translator::lookup`] through the cache.
    #[inline]
    pub fn lookup(
        &mut self,
        iova: u64,
        access: Option<Access>,
        guard: &Guard,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        let (vm, ep, tlb) = (self.tr.vm, &self.tr.ep, &mut self.tlb);
        vm.device_access(ep.rid, access, || {
            vm.lookup_ep(ep, Some(ep), Some(tlb), iova, access, guard)
        })
    }
}
