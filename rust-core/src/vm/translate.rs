// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Translation: device DMA ([`Vm::translate`], [`Vm::dma_view`]) and
//! single-address lookups ([`Vm::lookup`], QEMU's IOMMU translate).

use super::*;

impl Vm {
    /// Translates device `rid`'s access to [iova, iova + len) into host
    /// fragments, storing the first `out.len()` and returning how many the
    /// range needs (more than `out.len()`: call again with a bigger array).
    ///
    /// Never takes a lock and never waits. A refused access is counted and
    /// logged as a fault. Unattached endpoints bypass (identity, RAM only)
    /// or are blocked, per [`VmConfig::bypass`]. A device model that
    /// translates often resolves `rid` once with [`Vm::translator`].
    pub fn translate(
        &self,
        rid: u32,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
    ) -> std::result::Result<usize, domain::TranslateFault> {
        self.device_access(rid, Some(access), || {
            let guard = epoch::pin();
            self.translate_in(rid, iova, len, access, out, &guard)
        })
    }

    /// The one "count, then record a fault" wrapper of every device-access
    /// entry point ([`Vm::translate`], [`Vm::lookup`] and the handles'):
    /// with `access` (a device access) it is counted as a translation,
    /// `run` does it, and a refusal is logged as a fault of `rid`; without
    /// (a look) nothing is counted or logged. Always inlined, so the
    /// closure costs nothing on the translate path.
    #[inline(always)]
    pub(super) fn device_access<T>(
        &self,
        rid: u32,
        access: Option<Access>,
        run: impl FnOnce() -> std::result::Result<T, domain::TranslateFault>,
    ) -> std::result::Result<T, domain::TranslateFault> {
        if access.is_some() {
            self.stats.translations.count();
        }
        let r = run();
        if let (Err(f), Some(a)) = (&r, access) {
            self.record_fault(rid, f.iova, a, f.reason);
        }
        r
    }

    /// [`Vm::translate`] under the caller's guard, without counting or
    /// logging: for callers that batch many translations (virtqueues).
    #[inline]
    pub fn translate_in(
        &self,
        rid: u32,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        let ep = self
            .endpoint_map(guard)
            .get(&rid)
            .ok_or(domain::TranslateFault {
                iova,
                reason: FaultReason::NoDevice,
            })?;
        // Just found in the map: registered.
        self.translate_ep(ep, None, None, iova, len, access, out, guard)
    }

    /// A translation handle for endpoint `rid`, for device models that
    /// translate repeatedly: it skips the requester-ID lookup. `None` when
    /// `rid` is not an endpoint. The handle follows the endpoint's
    /// attach/detach; once the endpoint is removed it refuses everything
    /// with [`FaultReason::NoDevice`] (also if `rid` is registered again:
    /// that is a new endpoint, ask for a new handle).
    pub fn translator(&self, rid: u32) -> Option<Translator<'_>> {
        let guard = epoch::pin();
        let ep = self.endpoint_map(&guard).get(&rid)?.clone();
        Some(Translator { vm: self, ep })
    }

    /// [`Vm::translator`] with a software IOTLB of its own
    /// ([`Translator::cached`]).
    pub fn cached_translator(&self, rid: u32) -> Option<CachedTranslator<'_>> {
        self.translator(rid).map(Translator::cached)
    }

    /// Where `ep`'s DMA goes under `guard`: its domain, or `None` to
    /// bypass. `handle` is `Some` when `ep` came from a [`Translator`]
    /// rather than from the current endpoint map: then an unattached
    /// endpoint is checked to still be registered (removal detaches it
    /// first, so an attached one always is).
    #[inline]
    pub(super) fn route<'g>(
        &self,
        ep: &Endpoint,
        handle: Option<&Arc<Endpoint>>,
        guard: &'g Guard,
    ) -> std::result::Result<Option<&'g Domain>, FaultReason> {
        if let Some(dom) = Self::domain_of(ep, guard) {
            return Ok(Some(dom));
        }
        self.unattached_route(handle, guard).map(|()| None)
    }

    /// [`Vm::route`] for an endpoint seen unattached (off the hot path):
    /// Ok to bypass, else why not.
    #[cold]
    pub(super) fn unattached_route(
        &self,
        handle: Option<&Arc<Endpoint>>,
        guard: &Guard,
    ) -> std::result::Result<(), FaultReason> {
        if let Some(handle) = handle {
            // `domain_of` saw null: if removal nulled it, its Acquire load
            // synchronised with the swap in `detach_locked`, which
            // `remove_endpoint` does after publishing the map without the
            // endpoint, so this load sees that map (or a later one).
            let still = self
                .endpoint_map(guard)
                .get(&handle.rid)
                .is_some_and(|cur| Arc::ptr_eq(cur, handle));
            if !still {
                return Err(FaultReason::NoDevice);
            }
        }
        if self.cfg.bypass {
            Ok(())
        } else {
            Err(FaultReason::Blocked)
        }
    }

    /// The translation proper, for an endpoint already resolved, with
    /// rule 2 of the queues: a refusal for want of a mapping or permission
    /// drains the queues and translates once more (a hit never gets here).
    /// Always inlined into its few callers: out of line, its seven
    /// arguments and the call cost ~30 instructions per translation.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) fn translate_ep(
        &self,
        ep: &Endpoint,
        handle: Option<&Arc<Endpoint>>,
        mut tlb: Option<&mut Iotlb>,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        let r = self.translate_ep_once(
            ep,
            handle,
            tlb.as_deref_mut(),
            iova,
            len,
            access,
            out,
            guard,
        );
        match r {
            Err(f) if Self::drainable(f.reason) && self.drain_for_miss() => {
                self.translate_ep_once(ep, handle, tlb, iova, len, access, out, guard)
            }
            r => r,
        }
    }

    /// One attempt of [`Vm::translate_ep`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn translate_ep_once(
        &self,
        ep: &Endpoint,
        handle: Option<&Arc<Endpoint>>,
        tlb: Option<&mut Iotlb>,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut [Fragment],
        guard: &Guard,
    ) -> std::result::Result<usize, domain::TranslateFault> {
        let fault = |reason| domain::TranslateFault { iova, reason };
        let route = self.route(ep, handle, guard).map_err(fault)?;
        let ram = self.ram.load(guard);
        let mut sink = FragmentSink::new(out);
        match (route, tlb) {
            (Some(dom), None) => dom.translate(iova, len, access, ram, guard, &mut sink)?,
            (Some(dom), Some(tlb)) => {
                // Read once, before any walk (see `crate::iotlb`).
                tlb.set_generation(dom.generation());
                Domain::translate_with(iova, len, access, ram, &mut sink, |a| {
                    tlb.lookup_at(dom.table(), a, guard)
                })?
            }
            (None, _) => {
                iova.checked_add(len).ok_or(fault(FaultReason::Overflow))?;
                domain::emit_gpa_range(ram, iova, len, iova, &mut sink)?;
            }
        }
        Ok(sink.count())
    }

    /// What endpoint `rid`'s DMA goes through under `guard`: its domain
    /// (`None` when it is unattached and bypasses translation) and the RAM
    /// layout, both valid for as long as `guard` is held. For callers that
    /// build their own view of the IOVA space (virtqueues, `IovaSpace`).
    /// Faults (unknown endpoint, blocked) carry IOVA 0.
    pub fn dma_view<'g>(
        &self,
        rid: u32,
        guard: &'g Guard,
    ) -> std::result::Result<(Option<&'g Domain>, &'g RamLayout), domain::TranslateFault> {
        let fault = |reason| domain::TranslateFault { iova: 0, reason };
        let ep = self
            .endpoint_map(guard)
            .get(&rid)
            .ok_or(fault(FaultReason::NoDevice))?;
        let ram = self.ram.load(guard);
        match Self::domain_of(ep, guard) {
            Some(dom) => Ok((Some(dom), ram)),
            None if self.cfg.bypass => Ok((None, ram)),
            None => Err(fault(FaultReason::Blocked)),
        }
    }

    /// As [`dma_view`](Self::dma_view), for a caller that makes many
    /// (a virtqueue): the endpoint found is remembered in `cache`, and the
    /// endpoint map is searched again only after it changed (an endpoint
    /// was added or removed). The domain is still loaded afresh, so
    /// ATTACH and DETACH are seen at once.
    #[inline]
    pub fn dma_view_cached<'g>(
        &self,
        rid: u32,
        guard: &'g Guard,
        cache: &mut EndpointCache,
    ) -> std::result::Result<(Option<&'g Domain>, &'g RamLayout), domain::TranslateFault> {
        // Acquire pairs with the Release increment in publish_endpoints:
        // loaded before the map, so a map change after this load makes the
        // next call search again.
        let version = self.endpoints_version.load(Ordering::Acquire);
        let ep = match &cache.endpoint {
            Some(ep) if cache.version == version && ep.rid == rid => ep,
            _ => {
                cache.endpoint = None;
                let ep = self
                    .endpoint_map(guard)
                    .get(&rid)
                    .ok_or(domain::TranslateFault {
                        iova: 0,
                        reason: FaultReason::NoDevice,
                    })?;
                cache.version = version;
                cache.endpoint.insert(ep.clone())
            }
        };
        let ram = self.ram.load(guard);
        match Self::domain_of(ep, guard) {
            Some(dom) => Ok((Some(dom), ram)),
            None if self.cfg.bypass => Ok((None, ram)),
            None => Err(domain::TranslateFault {
                iova: 0,
                reason: FaultReason::Blocked,
            }),
        }
    }
}

/// What one IOVA of an endpoint translates to: the answer an IOMMU gives
/// for one page, without touching guest RAM (the address is handed to
/// the embedder's memory system, not dereferenced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// Guest-physical address of the IOVA's byte.
    pub gpa: u64,
    /// Bytes from that address that translate contiguously with the same
    /// permissions (at least 1).
    pub run: u64,
    /// What the device may do there.
    pub perms: Perm,
    /// The endpoint is not attached and bypasses translation (identity,
    /// read-write, `run` to the end of the 4 KiB page).
    pub bypass: bool,
}

impl Vm {
    /// Translates the one address `iova` of device `rid`. With `access`
    /// `None` this only looks (nothing counted, no fault logged, the
    /// permissions are reported, not checked); with `Some` it is a device
    /// access: counted as a translation, refused without the permission,
    /// and a refusal is logged as a fault. Lock-free, like
    /// [`Vm::translate`].
    ///
    /// Successful lookups through a domain are cached per thread (see
    /// [`LookupCache`]); a hit costs no epoch pin and no table walk.
    #[inline]
    pub fn lookup(
        &self,
        rid: u32,
        iova: u64,
        access: Option<Access>,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        // Not through `device_access`: a hit must return straight from the
        // cache probe, and the wrapper's check of the result after it cost
        // 10-15% here (A/B in docs/benchmark-log.md). The slow path logs refusals.
        if access.is_some() {
            self.stats.translations.count();
        }
        // Acquire: pairs with the AcqRel swaps of
        // `bump_lookup_generation` and `Domain::remove_locked` (see
        // `crate::iotlb` for the argument, which is the same with this
        // VM-wide generation). Read before the cache is probed, and
        // before the walk that may fill it.
        let generation = self.lookup_generation.load(Ordering::Acquire);
        if let Some(found) = LookupCache::get(rid, iova, generation) {
            // A refused access takes the slow path, which logs it.
            if access.is_none_or(|a| found.perms.allows(a)) {
                return Ok(found);
            }
        }
        self.lookup_slow(rid, iova, access, generation)
    }

    /// [`Vm::lookup`] through the table, filling the cache; a refused
    /// device access is logged here.
    #[inline(never)]
    pub(super) fn lookup_slow(
        &self,
        rid: u32,
        iova: u64,
        access: Option<Access>,
        generation: u64,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        let guard = epoch::pin();
        let r = match self.endpoint_map(&guard).get(&rid) {
            // Just found in the map: registered.
            Some(ep) => self.lookup_ep(ep, None, None, iova, access, &guard),
            None => Err(domain::TranslateFault {
                iova,
                reason: FaultReason::NoDevice,
            }),
        };
        match (&r, access) {
            (Ok(found), _) if !found.bypass => LookupCache::put(rid, iova, generation, found),
            (Err(f), Some(a)) => self.record_fault(rid, f.iova, a, f.reason),
            _ => {}
        }
        r
    }

    /// One IOVA of an endpoint already resolved, with rule 2 of the
    /// queues as in [`Vm::translate_ep`] (also for a look, `access` None:
    /// the embedder looks when it is about to let a device through).
    #[inline(always)]
    pub(super) fn lookup_ep(
        &self,
        ep: &Endpoint,
        handle: Option<&Arc<Endpoint>>,
        mut tlb: Option<&mut Iotlb>,
        iova: u64,
        access: Option<Access>,
        guard: &Guard,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        match self.lookup_ep_once(ep, handle, tlb.as_deref_mut(), iova, access, guard) {
            Err(f) if Self::drainable(f.reason) && self.drain_for_miss() => {
                self.lookup_ep_once(ep, handle, tlb, iova, access, guard)
            }
            r => r,
        }
    }

    #[inline(always)]
    fn lookup_ep_once(
        &self,
        ep: &Endpoint,
        handle: Option<&Arc<Endpoint>>,
        tlb: Option<&mut Iotlb>,
        iova: u64,
        access: Option<Access>,
        guard: &Guard,
    ) -> std::result::Result<Lookup, domain::TranslateFault> {
        let fault = |reason| domain::TranslateFault { iova, reason };
        let found = match self.route(ep, handle, guard).map_err(fault)? {
            Some(dom) => {
                let leaf = match tlb {
                    Some(tlb) => tlb.lookup(dom, iova, guard),
                    None => dom.table().lookup(iova, guard),
                }
                .ok_or(fault(FaultReason::Unmapped))?;
                Lookup {
                    gpa: leaf.gpa,
                    run: leaf.run,
                    perms: leaf.perms,
                    bypass: false,
                }
            }
            None => Lookup {
                gpa: iova,
                run: crate::types::PAGE_SIZE - (iova & crate::types::PAGE_MASK),
                perms: Perm::RW,
                bypass: true,
            },
        };
        match access {
            Some(a) if !found.perms.allows(a) => Err(fault(FaultReason::Permission)),
            _ => Ok(found),
        }
    }
}
