// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Endpoints: the requesters behind a pvdma function, in an
//! epoch-protected map that translations read without a lock.

use super::*;

/// An endpoint behind this pvdma: a PCI requester ID.
pub struct Endpoint {
    pub(super) rid: u32,
    pub(super) passthrough: Option<String>,
    /// Null while detached. Swapped only under `op_lock`; read lock-free.
    pub(super) domain: Atomic<Domain>,
    /// Serialises the endpoint's requests. On a cache line of its own:
    /// every request locks and unlocks it, and every translation reads
    /// `domain` (sharing a line, each request would make every device
    /// thread's next translation miss the cache).
    pub(super) op_lock: CachePadded<Mutex<()>>,
}

impl Endpoint {
    /// The requester ID.
    pub fn requester(&self) -> u32 {
        self.rid
    }

    /// The host PCI address when the endpoint is an assigned host device.
    pub fn passthrough(&self) -> Option<&str> {
        self.passthrough.as_deref()
    }

    /// Whether translation is on.
    pub fn is_attached(&self) -> bool {
        let guard = epoch::pin();
        // Acquire pairs with the Release store in attach.
        !self.domain.load(Ordering::Acquire, &guard).is_null()
    }
}

/// Endpoints by requester ID (`bus << 8 | devfn`, PCI segment 0 only),
/// indexed directly: 256 bus slots, each a lazily created table of 256
/// devfns. A lookup is two indexed loads, no hashing: it is on every
/// translation. Published copy-on-write like any epoch-protected value; a
/// copy shares the devfn tables it does not change, so a map costs 2 KiB
/// plus 2 KiB per bus in use.
#[derive(Clone)]
pub(super) struct EndpointMap {
    pub(super) buses: Box<[Option<Arc<DevfnTable>>; 256]>,
}

pub(super) type DevfnTable = [Option<Arc<Endpoint>>; 256];

impl EndpointMap {
    pub(super) fn new() -> EndpointMap {
        EndpointMap {
            buses: Box::new([const { None }; 256]),
        }
    }

    /// The endpoint `rid`; None as well for segments other than 0.
    #[inline]
    pub(super) fn get(&self, rid: &u32) -> Option<&Arc<Endpoint>> {
        let rid = *rid;
        if rid > 0xffff {
            return None;
        }
        // Both indices are masked to 8 bits: no bounds check can fail.
        let bus = self.buses[(rid >> 8) as usize & 0xff].as_deref()?;
        bus[rid as usize & 0xff].as_ref()
    }

    pub(super) fn contains_key(&self, rid: &u32) -> bool {
        self.get(rid).is_some()
    }

    /// Every endpoint, by ascending requester ID.
    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.buses
            .iter()
            .flatten()
            .flat_map(|bus| bus.iter().flatten())
    }

    /// Every requester ID, ascending.
    pub(super) fn keys(&self) -> impl Iterator<Item = &u32> {
        self.values().map(|ep| &ep.rid)
    }

    /// Adds `ep` at `rid` (<= 0xffff, checked by the caller).
    pub(super) fn insert(&mut self, rid: u32, ep: Arc<Endpoint>) {
        debug_assert!(rid <= 0xffff);
        let bus = self.buses[(rid >> 8) as usize & 0xff]
            .get_or_insert_with(|| Arc::new([const { None }; 256]));
        // Copies the devfn table if the published map still shares it.
        Arc::make_mut(bus)[rid as usize & 0xff] = Some(ep);
    }

    pub(super) fn remove(&mut self, rid: &u32) {
        let rid = *rid;
        if rid > 0xffff {
            return;
        }
        let slot = &mut self.buses[(rid >> 8) as usize & 0xff];
        if let Some(bus) = slot {
            let devfns = Arc::make_mut(bus);
            devfns[rid as usize & 0xff] = None;
            if devfns.iter().all(Option::is_none) {
                *slot = None;
            }
        }
    }
}

/// The endpoint a [`Vm::dma_view_cached`] caller found last, and the
/// endpoint-map version it was found under.
#[derive(Default)]
pub struct EndpointCache {
    pub(super) version: u64,
    pub(super) endpoint: Option<Arc<Endpoint>>,
}

impl std::fmt::Debug for EndpointCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointCache")
            .field("version", &self.version)
            .field("endpoint", &self.endpoint.as_ref().map(|e| e.rid))
            .finish()
    }
}

impl Vm {
    /// Registers endpoint `rid` (bus << 8 | devfn), optionally as an
    /// assigned host device with its host PCI address.
    pub fn add_endpoint(&self, rid: u32, passthrough: Option<&str>) -> Result<()> {
        if rid > 0xffff {
            return Err(Error::Config(format!(
                "requester ID {rid:#x} is not in PCI segment 0"
            )));
        }
        let _w = self.endpoints_writer.lock();
        let guard = epoch::pin();
        let cur = self.endpoint_map(&guard);
        if cur.contains_key(&rid) {
            return Err(Error::EndpointExists(rid));
        }
        let mut next = cur.clone();
        next.insert(
            rid,
            Arc::new(Endpoint {
                rid,
                passthrough: passthrough.map(str::to_owned),
                domain: Atomic::null(),
                op_lock: CachePadded::new(Mutex::new(())),
            }),
        );
        self.publish_endpoints(next, &guard);
        Ok(())
    }

    /// Unregisters an endpoint, detaching it first.
    pub fn remove_endpoint(&self, rid: u32) -> Result<()> {
        let _w = self.endpoints_writer.lock();
        let guard = epoch::pin();
        let cur = self.endpoint_map(&guard);
        let ep = cur.get(&rid).cloned().ok_or(Error::NoEndpoint(rid))?;
        let mut next = cur.clone();
        next.remove(&rid);
        self.publish_endpoints(next, &guard);
        // Under op_lock no drain may start on this thread (a notifier that
        // translates): queue mutexes come before op_lock.
        let _no_drain = NoDrain::enter(self.cfg.queues > 0);
        let _op = ep.op_lock.lock();
        self.detach_locked(&ep, &guard);
        // After the map without the endpoint was published.
        self.bump_lookup_generation();
        Ok(())
    }

    /// Requester IDs of every endpoint, ascending.
    pub fn endpoints(&self) -> Vec<u32> {
        let guard = epoch::pin();
        let mut v: Vec<u32> = self.endpoint_map(&guard).keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The endpoint with requester ID `rid`.
    pub fn endpoint(&self, rid: u32) -> Option<Arc<Endpoint>> {
        let guard = epoch::pin();
        self.endpoint_map(&guard).get(&rid).cloned()
    }

    /// A copy of `rid`'s mappings (empty when detached or unknown).
    pub fn mappings(&self, rid: u32) -> Vec<Mapping> {
        let guard = epoch::pin();
        self.endpoint_map(&guard)
            .get(&rid)
            .and_then(|ep| Self::domain_of(ep, &guard))
            .map(Domain::mappings)
            .unwrap_or_default()
    }

    #[inline]
    pub(super) fn endpoint_map<'g>(&self, guard: &'g Guard) -> &'g EndpointMap {
        // Acquire pairs with the Release in publish_endpoints.
        let p = self.endpoints.load(Ordering::Acquire, guard);
        // SAFETY: the map pointer is never null (set in new, replaced only
        // by publish_endpoints with a non-null one) and is freed only via
        // defer_destroy, after every guard that could see it is gone.
        unsafe { p.deref() }
    }

    pub(super) fn endpoint_list(&self, guard: &Guard) -> Vec<Arc<Endpoint>> {
        let mut v: Vec<_> = self.endpoint_map(guard).values().cloned().collect();
        v.sort_unstable_by_key(|e| e.rid);
        v
    }

    pub(super) fn publish_endpoints(&self, next: EndpointMap, guard: &Guard) {
        // Release publishes the new map's contents; AcqRel on the swap so
        // the old pointer we retire is the one readers saw.
        let old = self
            .endpoints
            .swap(Owned::new(next), Ordering::AcqRel, guard);
        // SAFETY: `old` is unlinked; readers holding a guard may still use
        // it, and defer_destroy waits for them.
        unsafe { guard.defer_destroy(old) };
        // Release, after the swap: pairs with the Acquire load in
        // `dma_view_cached`; a reader that sees the new version then loads
        // the new map. (One that still sees the old version uses what it
        // looked up in the old map, as a lookup just before the swap would.)
        self.endpoints_version.fetch_add(1, Ordering::Release);
    }

    #[inline]
    pub(super) fn domain_of<'g>(ep: &Endpoint, guard: &'g Guard) -> Option<&'g Domain> {
        // Acquire pairs with the Release store in attach: the domain is
        // fully built before it is visible.
        let p = ep.domain.load(Ordering::Acquire, guard);
        // SAFETY: domains are freed only through defer_destroy after being
        // unlinked, so a pointer loaded under `guard` stays valid for 'g.
        unsafe { p.as_ref() }
    }
}
