// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Migration state: every endpoint's attach state and every mapping, as a
//! versioned little-endian blob that QEMU carries in its VMState.
//!
//! Layout (version 1):
//! ```text
//! magic "PVDMAMIG" | u32 version | u32 iova_bits | u64 faults | u32 n_endpoints
//! n_endpoints x { u32 rid | u32 attached | u32 n_mappings
//!                 n_mappings x { u64 iova | u64 length | u32 perms | u32 n_segs
//!                                n_segs x { u64 gpa | u64 len } } }
//! [version 2 only:]
//! u32 sync_failed | u32 sync_first (status + 1, 0: none) | u32 n_queues
//! n_queues x { u32 index | u64 ctrl_gpa | u64 ring_gpa | u32 ring_len
//!              u32 tail | u32 failed | u32 last_error | u32 stopped }
//! u64 FNV-1a of everything before
//! ```
//! Version 2 adds the request queues (ABI 3.2) and the SYNC window. A
//! source with no queue set up and nothing failed since the last SYNC
//! writes version 1, so an older destination still takes it; version 1
//! streams load with no queue.
//! Import re-creates each mapping through the same validation as a guest
//! FIXED MAP, so a damaged or hostile blob cannot create what a guest could
//! not. It is all or nothing: on any error the VM is left reset.

use crate::domain::Mapping;
use crate::types::Perm;
use crate::vm::{Error, QueueSaved, Result, SyncWindow, Vm};
use crate::Status;

const MAGIC: &[u8; 8] = b"PVDMAMIG";
/// The state format version written by this build.
pub const STATE_VERSION: u32 = 2;

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| Error::State(format!("truncated at byte {}", self.pos)))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A count of items of at least `item_size` bytes each, checked against
    /// what is left so a hostile count cannot make us allocate.
    fn count(&mut self, item_size: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item_size) > self.buf.len() - self.pos {
            return Err(Error::State(format!(
                "count {n} at byte {} exceeds the blob",
                self.pos - 4
            )));
        }
        Ok(n)
    }
}

/// One endpoint's saved state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointState {
    /// Requester ID.
    pub rid: u32,
    /// Translation on.
    pub attached: bool,
    /// Its mappings.
    pub mappings: Vec<Mapping>,
}

/// The decoded state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    /// IOVA width of the source.
    pub iova_bits: u32,
    /// Fault count of the source.
    pub faults: u64,
    /// Every endpoint.
    pub endpoints: Vec<EndpointState>,
    /// Every set-up queue.
    pub queues: Vec<QueueSaved>,
    /// Entries failed since the last SYNC.
    pub sync_failed: u32,
    /// The earliest of them (status).
    pub sync_first: Option<Status>,
}

impl VmState {
    /// Encodes to the blob format.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        let v2 = !self.queues.is_empty() || self.sync_failed != 0 || self.sync_first.is_some();
        let version: u32 = if v2 { 2 } else { 1 };
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&self.iova_bits.to_le_bytes());
        b.extend_from_slice(&self.faults.to_le_bytes());
        b.extend_from_slice(&(self.endpoints.len() as u32).to_le_bytes());
        for ep in &self.endpoints {
            b.extend_from_slice(&ep.rid.to_le_bytes());
            b.extend_from_slice(&u32::from(ep.attached).to_le_bytes());
            b.extend_from_slice(&(ep.mappings.len() as u32).to_le_bytes());
            for m in &ep.mappings {
                b.extend_from_slice(&m.iova.to_le_bytes());
                b.extend_from_slice(&m.length.to_le_bytes());
                b.extend_from_slice(&u32::from(m.perms.bits()).to_le_bytes());
                b.extend_from_slice(&(m.segs.len() as u32).to_le_bytes());
                for &(gpa, len) in &m.segs {
                    b.extend_from_slice(&gpa.to_le_bytes());
                    b.extend_from_slice(&len.to_le_bytes());
                }
            }
        }
        if v2 {
            b.extend_from_slice(&self.sync_failed.to_le_bytes());
            let first = self.sync_first.map_or(0, |s| s as u32 + 1);
            b.extend_from_slice(&first.to_le_bytes());
            b.extend_from_slice(&(self.queues.len() as u32).to_le_bytes());
            for q in &self.queues {
                b.extend_from_slice(&q.index.to_le_bytes());
                b.extend_from_slice(&q.ctrl.to_le_bytes());
                b.extend_from_slice(&q.ring.to_le_bytes());
                b.extend_from_slice(&q.ring_len.to_le_bytes());
                b.extend_from_slice(&q.tail.to_le_bytes());
                b.extend_from_slice(&q.failed.to_le_bytes());
                b.extend_from_slice(&q.last_error.to_le_bytes());
                b.extend_from_slice(&u32::from(q.stopped).to_le_bytes());
            }
        }
        let sum = fnv1a(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes a blob, checking magic, version, bounds and checksum.
    pub fn decode(blob: &[u8]) -> Result<VmState> {
        if blob.len() < MAGIC.len() + 8 {
            return Err(Error::State("blob too short".into()));
        }
        let (body, sum) = blob.split_at(blob.len() - 8);
        let mut s = [0u8; 8];
        s.copy_from_slice(sum);
        if fnv1a(body) != u64::from_le_bytes(s) {
            return Err(Error::State("checksum mismatch".into()));
        }
        let mut r = Reader { buf: body, pos: 0 };
        if r.take(8)? != MAGIC {
            return Err(Error::State("bad magic".into()));
        }
        let version = r.u32()?;
        if !(1..=STATE_VERSION).contains(&version) {
            return Err(Error::State(format!(
                "version {version}, this build reads {STATE_VERSION}"
            )));
        }
        let iova_bits = r.u32()?;
        let faults = r.u64()?;
        let n_ep = r.count(12)?;
        let mut endpoints = Vec::with_capacity(n_ep);
        for _ in 0..n_ep {
            let rid = r.u32()?;
            let attached = match r.u32()? {
                0 => false,
                1 => true,
                x => return Err(Error::State(format!("endpoint {rid:#x}: attached={x}"))),
            };
            let n_m = r.count(24)?;
            let mut mappings = Vec::with_capacity(n_m);
            for _ in 0..n_m {
                let iova = r.u64()?;
                let length = r.u64()?;
                let perms = r.u32()?;
                if perms == 0 || perms > 3 {
                    return Err(Error::State(format!("mapping {iova:#x}: perms {perms}")));
                }
                let n_s = r.count(16)?;
                let mut segs = Vec::with_capacity(n_s);
                for _ in 0..n_s {
                    segs.push((r.u64()?, r.u64()?));
                }
                mappings.push(Mapping {
                    iova,
                    length,
                    perms: Perm::from_bits_truncate(perms as u8),
                    segs,
                });
            }
            endpoints.push(EndpointState {
                rid,
                attached,
                mappings,
            });
        }
        let (mut queues, mut sync_failed, mut sync_first) = (Vec::new(), 0, None);
        if version >= 2 {
            sync_failed = r.u32()?;
            sync_first = match r.u32()? {
                0 => None,
                x => Some(
                    Status::from_raw(x - 1)
                        .filter(|&s| s != Status::Ok)
                        .ok_or_else(|| Error::State(format!("sync status {}", x - 1)))?,
                ),
            };
            let n_q = r.count(40)?;
            for _ in 0..n_q {
                let index = r.u32()?;
                let ctrl = r.u64()?;
                let ring = r.u64()?;
                let ring_len = r.u32()?;
                let tail = r.u32()?;
                let failed = r.u32()?;
                let last_error = r.u32()?;
                let stopped = match r.u32()? {
                    0 => false,
                    1 => true,
                    x => return Err(Error::State(format!("queue {index}: stopped={x}"))),
                };
                if queues.iter().any(|q: &QueueSaved| q.index == index) {
                    return Err(Error::State(format!("queue {index} twice")));
                }
                queues.push(QueueSaved {
                    index,
                    ctrl,
                    ring,
                    ring_len,
                    tail,
                    failed,
                    last_error,
                    stopped,
                });
            }
        }
        if r.pos != body.len() {
            return Err(Error::State(format!(
                "{} trailing bytes",
                body.len() - r.pos
            )));
        }
        Ok(VmState {
            iova_bits,
            faults,
            endpoints,
            queues,
            sync_failed,
            sync_first,
        })
    }
}

impl Vm {
    /// The complete guest-visible state, for migration.
    pub fn export_state(&self) -> Vec<u8> {
        let endpoints = self
            .endpoints()
            .into_iter()
            .filter_map(|rid| {
                let ep = self.endpoint(rid)?;
                Some(EndpointState {
                    rid,
                    attached: ep.is_attached(),
                    mappings: self.mappings(rid),
                })
            })
            .collect();
        let (queues, window) = self.export_queues();
        VmState {
            iova_bits: self.config().iova_bits,
            faults: self.fault_count(),
            endpoints,
            queues,
            sync_failed: window.count,
            sync_first: window.first,
        }
        .encode()
    }

    /// Applies a blob from [`Vm::export_state`] on the destination, whose
    /// RAM regions and endpoints must already be set up. The VM is reset
    /// first; on any error it is left reset and the error says why.
    pub fn import_state(&self, blob: &[u8]) -> Result<()> {
        self.reset();
        let r = VmState::decode(blob).and_then(|st| {
            if st.iova_bits != self.config().iova_bits {
                return Err(Error::State(format!(
                    "source iova-bits {} != destination {}",
                    st.iova_bits,
                    self.config().iova_bits
                )));
            }
            self.apply(&st)
        });
        if r.is_err() {
            self.reset();
        }
        r
    }

    fn apply(&self, st: &VmState) -> Result<()> {
        for ep in &st.endpoints {
            if self.endpoint(ep.rid).is_none() {
                return Err(Error::NoEndpoint(ep.rid));
            }
            if !ep.attached {
                if !ep.mappings.is_empty() {
                    return Err(Error::State(format!(
                        "endpoint {:#x} detached but has mappings",
                        ep.rid
                    )));
                }
                continue;
            }
            let s = self.attach(ep.rid);
            if s != crate::Status::Ok {
                return Err(Error::State(format!("attach {:#x}: {s}", ep.rid)));
            }
            for m in &ep.mappings {
                self.import_mapping(ep.rid, m)
                    .map_err(|s| Error::State(format!("endpoint {:#x} {m:?}: {s}", ep.rid)))?;
                let got = self.mappings(ep.rid);
                if !got.iter().any(|g| g.iova == m.iova && g.length == m.length) {
                    return Err(Error::State(format!(
                        "endpoint {:#x} {m:?}: length mismatch",
                        ep.rid
                    )));
                }
            }
        }
        self.import_queues(
            &st.queues,
            SyncWindow {
                count: st.sync_failed,
                first: st.sync_first,
            },
        )?;
        self.restore_fault_count(st.faults);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        VmState {
            iova_bits: 48,
            faults: 7,
            endpoints: vec![
                EndpointState {
                    rid: 0x10,
                    attached: true,
                    mappings: vec![Mapping {
                        iova: 0x1234,
                        length: 0x2000,
                        perms: Perm::RW,
                        segs: vec![(0x5234, 0xdcc), (0x9000, 0x1234)],
                    }],
                },
                EndpointState {
                    rid: 0x18,
                    attached: false,
                    mappings: vec![],
                },
            ],
            queues: vec![QueueSaved {
                index: 3,
                ctrl: 0x40,
                ring: 0x1000,
                ring_len: 0x1000,
                tail: 7,
                failed: 2,
                last_error: 5,
                stopped: false,
            }],
            sync_failed: 1,
            sync_first: Some(Status::Exist),
        }
    }

    #[test]
    fn without_queues_writes_version_1_and_it_loads() {
        let mut s = sample();
        s.queues.clear();
        s.sync_failed = 0;
        s.sync_first = None;
        let blob = s.encode();
        assert_eq!(&blob[8..12], &1u32.to_le_bytes());
        assert_eq!(VmState::decode(&blob).unwrap(), s);
        // With a queue: version 2.
        assert_eq!(&sample().encode()[8..12], &2u32.to_le_bytes());
    }

    #[test]
    fn roundtrip() {
        let s = sample();
        assert_eq!(VmState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_refused() {
        let blob = sample().encode();
        for n in 0..blob.len() {
            assert!(VmState::decode(&blob[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..blob.len() {
            let mut b = blob.clone();
            b[i] ^= 0x40;
            assert!(VmState::decode(&b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn hostile_count_does_not_allocate() {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&48u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        let sum = fnv1a(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        let e = VmState::decode(&b).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
    }
}
