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
//! u64 FNV-1a of everything before
//! ```
//! Import re-creates each mapping through the same validation as a guest
//! FIXED MAP, so a damaged or hostile blob cannot create what a guest could
//! not. It is all or nothing: on any error the VM is left reset.

use crate::domain::Mapping;
use crate::types::Perm;
use crate::vm::{Error, Result, Vm};

const MAGIC: &[u8; 8] = b"PVDMAMIG";
/// The state format version written by this build.
pub const STATE_VERSION: u32 = 1;

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
}

impl VmState {
    /// Encodes to the blob format.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
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
        if version != STATE_VERSION {
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
        VmState {
            iova_bits: self.config().iova_bits,
            faults: self.fault_count(),
            endpoints,
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
        }
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
