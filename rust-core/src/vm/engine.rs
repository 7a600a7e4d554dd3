// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request engine: [`Vm::submit`], the one entry point of every
//! transport, and the ops it runs (ATTACH, DETACH, MAP, UNMAP, UNMAP_LIST).

use super::*;

/// A parsed request: what the guest asked, read once from its block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Raw op.
    pub op: u16,
    /// Raw flags.
    pub flags: u16,
    /// Requester ID (bits 16..31: segment).
    pub requester: u32,
    /// Raw nr_segs.
    pub nr_segs: u32,
    /// IOVA in.
    pub iova: u64,
    /// Length in.
    pub length: u64,
    /// Reserved words (must be zero).
    pub reserved: [u64; 3],
    /// Segments (MAP) or ranges (UNMAP_LIST); read for no other op.
    pub segs: Vec<(u64, u64)>,
}

/// What a request produced. Only `status` is meaningful on failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status.
    pub status: Status,
    /// IOVA out (MAP).
    pub iova: u64,
    /// Length out (MAP).
    pub length: u64,
    /// Result out.
    pub result: u64,
}

impl Response {
    pub(super) fn status(status: Status) -> Response {
        Response {
            status,
            iova: 0,
            length: 0,
            result: 0,
        }
    }

    pub(super) fn ok(result: u64) -> Response {
        Response {
            status: Status::Ok,
            iova: 0,
            length: 0,
            result,
        }
    }
}

impl Vm {
    /// Processes the request block at guest-physical `block`: reads it once,
    /// validates it, runs it, writes back status (and iova, length, result
    /// as the op defines), and returns the status. The one entry point of
    /// every transport (doorbell, hypercall); counted as
    /// [`Transport::Other`], see [`Vm::submit_via`].
    pub fn submit(&self, block: u64) -> Status {
        self.submit_via(block, Transport::Other)
    }

    /// [`Vm::submit`] of a request that came by `transport`, which the
    /// statistics count.
    pub fn submit_via(&self, block: u64, transport: Transport) -> Status {
        self.stats.count_transport(transport);
        let guard = epoch::pin();
        let ram = self.ram.load(&guard);
        let mut hdr = [0u8; abi::HEADER_SIZE as usize];
        let readable = ram.read(block, &mut hdr).is_ok();
        // Rule 1 of the queues: every request, even one that turns out
        // malformed, first applies what is published in every queue. The
        // bytes were only copied so far; nothing of them was parsed but
        // the op, which names the cause for the embedder's trace.
        let cause = if readable && u16::from_le_bytes([hdr[0], hdr[1]]) == Op::Sync as u16 {
            DrainCause::Sync
        } else {
            DrainCause::Request
        };
        self.drain_for_request(cause, ram, &guard);
        if !readable {
            // Nowhere to write a status to: the transport reports it.
            self.count_request(0, Status::Fault);
            return Status::Fault;
        }
        let mut req = parse_header(&hdr);
        let early = if block & 7 != 0 {
            Err(Status::Inval)
        } else {
            self.read_segments(block, &mut req, ram)
        };
        let resp = match early {
            Ok(()) => self.execute_owned(&mut req),
            Err(status) => {
                let op = self.cfg.op(req.op).map_or(0, Op::index);
                self.count_request(op, status);
                Response::status(status)
            }
        };
        self.write_back(block, &req, &resp, ram);
        resp.status
    }

    /// For MAP and UNMAP_LIST, reads the slot array behind the header
    /// (once).
    pub(super) fn read_segments(
        &self,
        block: u64,
        req: &mut Request,
        ram: &RamLayout,
    ) -> std::result::Result<(), Status> {
        if !self.cfg.op(req.op).is_some_and(Op::has_slots) || req.nr_segs == 0 {
            return Ok(());
        }
        if self.cfg.op(req.op) == Some(Op::Queue) && req.nr_segs != 2 {
            // Tear-down reads none; any other count is INVAL, not TOOBIG.
            return Ok(());
        }
        if req.nr_segs > self.cfg.max_segs {
            return Err(Status::TooBig);
        }
        let n = req.nr_segs as usize;
        let at = block.checked_add(abi::HEADER_SIZE).ok_or(Status::Fault)?;
        // Straight into the segment list, a stack chunk at a time: one
        // allocation, the list the mapping keeps.
        const CHUNK: usize = 16;
        let mut raw = [0u8; CHUNK * abi::SEG_SIZE as usize];
        req.segs = Vec::with_capacity(n);
        let mut done = 0;
        while done < n {
            let k = CHUNK.min(n - done);
            let bytes = &mut raw[..k * abi::SEG_SIZE as usize];
            let from = at
                .checked_add(done as u64 * abi::SEG_SIZE)
                .ok_or(Status::Fault)?;
            ram.read(from, bytes).map_err(|_| Status::Fault)?;
            req.segs.extend(
                bytes
                    .chunks_exact(abi::SEG_SIZE as usize)
                    .map(wire::parse_slot),
            );
            done += k;
        }
        Ok(())
    }

    pub(super) fn write_back(&self, block: u64, req: &Request, resp: &Response, ram: &RamLayout) {
        // Only status, iova, length and result are ever written. A header
        // outside RAM was never read, so there is nothing to write to.
        let _ = ram.write(
            block + wire::STATUS_OFFSET,
            &(resp.status as u32).to_le_bytes(),
        );
        if resp.status != Status::Ok {
            if self.cfg.op(req.op) == Some(Op::Sync) {
                // SYNC reports the failed entries with any status.
                let _ = ram.write(block + wire::RESULT_OFFSET, &resp.result.to_le_bytes());
            }
            return;
        }
        if self.cfg.op(req.op) == Some(Op::Map) {
            // iova, length and result are adjacent: one write.
            let out = wire::encode_map_out(resp.iova, resp.length, resp.result);
            let _ = ram.write(block + wire::MAP_OUT_OFFSET, &out);
        } else {
            let _ = ram.write(block + wire::RESULT_OFFSET, &resp.result.to_le_bytes());
        }
    }

    pub(super) fn count_request(&self, op: usize, status: Status) {
        self.stats.count_request(op, status);
    }

    /// Runs an already-read request. Every failing request leaves no
    /// mapping, pin or IOVA behind. Counted as [`Transport::Other`].
    pub fn execute(&self, req: &Request) -> Response {
        self.stats.count_transport(Transport::Other);
        let op = self.cfg.op(req.op);
        if self.queues_active() {
            // Rule 1, as in `submit_via`.
            let guard = epoch::pin();
            let cause = if op == Some(Op::Sync) {
                DrainCause::Sync
            } else {
                DrainCause::Request
            };
            self.drain_for_request(cause, self.ram.load(&guard), &guard);
        }
        let resp = self.execute_inner(op, req, &mut || req.segs.clone());
        self.count_request(op.map_or(0, Op::index), resp.status);
        resp
    }

    /// [`Vm::execute`] without counting the request: migration import
    /// re-creates state, it is not a request of this VM's guest.
    pub(super) fn execute_uncounted(&self, req: &Request) -> Response {
        self.execute_inner(self.cfg.op(req.op), req, &mut || req.segs.clone())
    }

    /// [`Vm::execute`] of a request the caller no longer needs: a MAP
    /// takes its segment list instead of copying it.
    pub(super) fn execute_owned(&self, req: &mut Request) -> Response {
        let op = self.cfg.op(req.op);
        let mut segs = std::mem::take(&mut req.segs);
        let resp = self.execute_inner(op, req, &mut || std::mem::take(&mut segs));
        self.count_request(op.map_or(0, Op::index), resp.status);
        resp
    }

    /// `segs` hands over `req.segs` (the request's own segment list is
    /// not read here: `execute_owned` moved it out).
    pub(super) fn execute_inner(
        &self,
        op: Option<Op>,
        req: &Request,
        segs: &mut dyn FnMut() -> Vec<(u64, u64)>,
    ) -> Response {
        let Some(op) = op else {
            return Response::status(Status::Inval);
        };
        if u32::from(req.flags) & !abi::PVDMA_FLAGS_VALID != 0 || req.reserved != [0; 3] {
            return Response::status(Status::Inval);
        }
        let guard = epoch::pin();
        // Segment bits (16..31) other than 0 name no function we have.
        // Borrowed, not cloned: the map it is in lives until `guard` goes
        // (an Arc clone and drop would be two locked instructions).
        let Some(ep) = self.endpoint_map(&guard).get(&req.requester) else {
            return Response::status(Status::NoDev);
        };
        // The queue ops take queue mutexes, which come before op_lock: the
        // requester only routes them.
        match op {
            Op::Queue => return self.queue_op(req, segs(), &guard),
            Op::Sync => return self.sync_op(&guard),
            _ => {}
        }
        // Under op_lock no drain may start on this thread (a notifier that
        // translates): queue mutexes come before op_lock.
        let _no_drain = NoDrain::enter(self.cfg.queues > 0);
        let _op = ep.op_lock.lock();
        // remove_endpoint unpublishes an endpoint and then detaches it under
        // this lock. A request that found it before it was unpublished and
        // got the lock after that detach must not run on it: an ATTACH would
        // install a domain nothing could reach, detach or free again. The
        // lock orders this load after the unpublishing store.
        if !self
            .endpoint_map(&guard)
            .get(&req.requester)
            .is_some_and(|cur| Arc::ptr_eq(cur, ep))
        {
            return Response::status(Status::NoDev);
        }
        let ram = self.ram.load(&guard);
        match op {
            Op::Query => {
                let attached = Self::domain_of(ep, &guard).is_some();
                let mut r = 0;
                if attached {
                    r |= u64::from(abi::PVDMA_QUERY_ATTACHED);
                }
                if ep.passthrough.is_some() {
                    r |= u64::from(abi::PVDMA_QUERY_PASSTHROUGH);
                }
                if !attached && self.cfg.bypass {
                    r |= u64::from(abi::PVDMA_QUERY_BYPASS);
                }
                Response::ok(r)
            }
            Op::Attach => {
                if Self::domain_of(ep, &guard).is_some() {
                    return Response::status(Status::State);
                }
                // Release pairs with the Acquire loads in domain_of.
                ep.domain.store(
                    Owned::new(Domain::in_vm(
                        self.cfg.iova_bits,
                        Arc::clone(&self.mem),
                        Some(Arc::clone(&self.lookup_generation)),
                    )),
                    Ordering::Release,
                );
                // Not needed (the endpoint had no domain, so no cached
                // lookup of it is valid), but keeps the rule simple: every
                // route change moves the lookup generation.
                self.bump_lookup_generation();
                Response::ok(0)
            }
            Op::Detach => {
                if Self::domain_of(ep, &guard).is_none() {
                    return Response::status(Status::State);
                }
                Response::ok(self.detach_locked(ep, &guard) as u64)
            }
            Op::Map => self.map_locked(ep, req, segs(), ram, &guard),
            Op::Unmap => self.unmap_locked(ep, req, ram, &guard),
            Op::UnmapList => self.unmap_list_locked(ep, req, segs(), ram, &guard),
            Op::Queue | Op::Sync => Response::status(Status::Internal),
        }
    }

    pub(super) fn map_locked(
        &self,
        ep: &Endpoint,
        req: &Request,
        segs: Vec<(u64, u64)>,
        ram: &RamLayout,
        guard: &Guard,
    ) -> Response {
        let Some(dom) = Self::domain_of(ep, guard) else {
            return Response::status(Status::State);
        };
        let perms = Perm::from_bits_truncate(req.flags as u8);
        if perms.is_empty() {
            return Response::status(Status::Perm);
        }
        if req.nr_segs == 0 {
            return Response::status(Status::Inval);
        }
        if req.nr_segs > self.cfg.max_segs {
            return Response::status(Status::TooBig);
        }
        if segs.len() != req.nr_segs as usize {
            return Response::status(Status::Inval);
        }
        let choice = if u32::from(req.flags) & abi::PVDMA_FLAG_FIXED != 0 {
            IovaChoice::Fixed(req.iova)
        } else if self.cfg.host_iova {
            IovaChoice::Host
        } else {
            return Response::status(Status::Inval);
        };
        let mut embedder = self.notifier_for(ep.rid, MapEventKind::Map, perms, guard);
        let mut refused = false;
        let mut notify = |run: &PageRun| {
            // A removal merged in this drain that this mapping reuses
            // IOVAs of reaches the listeners first.
            self.unmap_batch_flush(ep.rid, run, guard);
            if !refused {
                refused = !embedder(run);
            }
        };
        let mapped = dom.map(segs, perms, choice, ram, &self.pins, &mut notify);
        match mapped {
            Ok((iova, _)) if refused => {
                // The embedder could not carry the mapping out (VFIO could
                // not pin it): take it down again, pins and all, and tell
                // the embedder so that it drops what it did set up. Still
                // under the request lock, so no other request saw it.
                let mut notify = self.unmap_notifier(ep.rid, guard);
                let undone = dom.unmap_at(iova, ram, &self.pins, &mut notify);
                debug_assert!(undone.is_ok(), "the refused MAP at {iova:#x} is gone");
                Response::status(Status::Quota)
            }
            Ok((iova, length)) => {
                self.stats.add_mappings(1);
                Response {
                    status: Status::Ok,
                    iova,
                    length,
                    result: 0,
                }
            }
            Err(e) => Response::status(domain_status(&e)),
        }
    }

    pub(super) fn unmap_locked(
        &self,
        ep: &Endpoint,
        req: &Request,
        ram: &RamLayout,
        guard: &Guard,
    ) -> Response {
        let Some(dom) = Self::domain_of(ep, guard) else {
            return Response::status(Status::State);
        };
        let limit = 1u64 << self.cfg.iova_bits;
        let in_range = match req.length {
            0 => req.iova < limit,
            n => req.iova.checked_add(n).is_some_and(|end| end <= limit),
        };
        if !in_range {
            return Response::status(Status::Inval);
        }
        let mut notify = self.unmap_notifier(ep.rid, guard);
        let r = if req.length == 0 {
            dom.unmap_at(req.iova, ram, &self.pins, &mut notify)
        } else {
            dom.unmap_range(req.iova, req.length, ram, &self.pins, &mut notify)
        };
        match r {
            Ok(removed) => {
                self.count_removed(removed);
                Response::ok(removed.bytes)
            }
            Err(e) => Response::status(domain_status(&e)),
        }
    }

    /// UNMAP_LIST. Checks, after the attach state: the range count (0:
    /// INVAL, past MAX_SEGS: TOOBIG), then every range on its own (length
    /// 0, wrapping, or past 2^IOVA_BITS: INVAL), then overlap of their
    /// page spans (INVAL), then under the domain lock RANGE and NOENT
    /// (see [`Domain::unmap_spans`]). Nothing is removed unless every
    /// check passes; then every range's mappings go at once.
    pub(super) fn unmap_list_locked(
        &self,
        ep: &Endpoint,
        req: &Request,
        ranges: Vec<(u64, u64)>,
        ram: &RamLayout,
        guard: &Guard,
    ) -> Response {
        let Some(dom) = Self::domain_of(ep, guard) else {
            return Response::status(Status::State);
        };
        if req.nr_segs == 0 {
            return Response::status(Status::Inval);
        }
        if req.nr_segs > self.cfg.max_segs {
            return Response::status(Status::TooBig);
        }
        if ranges.len() != req.nr_segs as usize {
            return Response::status(Status::Inval);
        }
        let Some(mut spans) = unmap_list_spans(&ranges, self.cfg.iova_bits) else {
            return Response::status(Status::Inval);
        };
        // Sorted by first page, two spans overlap only if neighbours do.
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 <= w[0].1) {
            return Response::status(Status::Inval);
        }
        let mut notify = self.unmap_notifier(ep.rid, guard);
        match dom.unmap_spans(&spans, ram, &self.pins, &mut notify) {
            Ok(removed) => {
                self.count_removed(removed);
                Response::ok(removed.bytes)
            }
            Err(e) => Response::status(domain_status(&e)),
        }
    }

    /// Detaches `ep` (caller holds its op_lock): unlinks the domain so no
    /// new translation finds it, removes every mapping (pins released,
    /// notified), and frees the domain once no reader can see it. Returns
    /// the number of mappings removed.
    pub(super) fn detach_locked(&self, ep: &Endpoint, guard: &Guard) -> usize {
        // AcqRel: Acquire so we own the domain as attach published it;
        // Release orders our earlier writes before readers seeing null.
        let old = ep.domain.swap(Shared::null(), Ordering::AcqRel, guard);
        // SAFETY: the pointer came from Owned::new in attach and is freed
        // only here, after being unlinked, through defer_destroy.
        let Some(dom) = (unsafe { old.as_ref() }) else {
            return 0;
        };
        let ram = self.ram.load(guard);
        let removed = dom.clear(ram, &self.pins, &mut self.unmap_notifier(ep.rid, guard));
        self.count_removed(removed);
        // After the swap above: a lookup that sees the new value sees the
        // endpoint detached (the domain's removals bumped it too, but not
        // when it was empty).
        self.bump_lookup_generation();
        // SAFETY: unlinked above; readers that loaded it before hold guards
        // and defer_destroy waits for them.
        unsafe { guard.defer_destroy(old) };
        removed.mappings as usize
    }

    /// Device reset: tears every queue down without applying what is
    /// published in it, detaches every endpoint (mappings removed, pins
    /// released) and clears the fault log and counters of faults.
    pub fn reset(&self) {
        self.reset_queues();
        let guard = epoch::pin();
        for ep in self.endpoint_list(&guard) {
            // Under op_lock no drain may start on this thread (a notifier that
            // translates): queue mutexes come before op_lock.
            let _no_drain = NoDrain::enter(self.cfg.queues > 0);
            let _op = ep.op_lock.lock();
            self.detach_locked(&ep, &guard);
        }
        self.faults.lock().clear();
        // Relaxed: a statistic.
        self.stats.faults.store(0, Ordering::Relaxed);
    }

    /// Re-creates a mapping during migration import (FIXED at its IOVA).
    pub(crate) fn import_mapping(&self, rid: u32, m: &Mapping) -> std::result::Result<(), Status> {
        let flags = m.perms.bits() as u16 | abi::PVDMA_FLAG_FIXED as u16;
        let req = Request {
            op: Op::Map as u16,
            flags,
            requester: rid,
            nr_segs: m.segs.len() as u32,
            iova: m.iova,
            length: 0,
            reserved: [0; 3],
            segs: m.segs.clone(),
        };
        match self.execute_uncounted(&req).status {
            Status::Ok => Ok(()),
            s => Err(s),
        }
    }

    /// Attaches `rid` (migration import, tests), uncounted.
    pub(crate) fn attach(&self, rid: u32) -> Status {
        self.execute_uncounted(&Request {
            op: Op::Attach as u16,
            flags: 0,
            requester: rid,
            nr_segs: 0,
            iova: 0,
            length: 0,
            reserved: [0; 3],
            segs: Vec::new(),
        })
        .status
    }
}

/// The page span (first and last page, inclusive) of each UNMAP_LIST
/// range, in list order; `None` when a range has length 0, wraps, or
/// reaches past the IOVA space (its last byte at or above 2^`iova_bits`).
pub(super) fn unmap_list_spans(ranges: &[(u64, u64)], iova_bits: u32) -> Option<Vec<(u64, u64)>> {
    let limit = 1u64 << iova_bits;
    ranges
        .iter()
        .map(|&(iova, len)| {
            let end = iova.checked_add(len).filter(|&e| len > 0 && e <= limit)?;
            Some((iova >> abi::PAGE_SHIFT, (end - 1) >> abi::PAGE_SHIFT))
        })
        .collect()
}

pub(super) fn domain_status(e: &domain::Error) -> Status {
    use crate::pin::Error as PinError;
    match e {
        domain::Error::Inval(_) => Status::Inval,
        domain::Error::Fault { .. } => Status::Fault,
        domain::Error::NoSpace { .. } => Status::NoSpc,
        domain::Error::Exist { .. } => Status::Exist,
        domain::Error::NoEnt { .. } => Status::NoEnt,
        domain::Error::Range { .. } => Status::Range,
        // An mlock refused by RLIMIT_MEMLOCK is the host's pin limit too.
        domain::Error::Pin(PinError::Quota { .. } | PinError::Mlock { .. }) => Status::Quota,
        // A page referenced 2^32 times: no room to count one more.
        domain::Error::Pin(PinError::RefcountOverflow { .. }) => Status::Quota,
        // The VM's mappings would take more host memory than allowed.
        domain::Error::MemQuota { .. } => Status::Quota,
    }
}
