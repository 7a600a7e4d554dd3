// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The wire codec of request blocks (`docs/abi.md`), little-endian whatever
//! the host. Every offset comes from the bindgen structs of `pvdma_abi.h`
//! ([`abi::ReqHeader`], [`abi::Seg`]), the one definition guest drivers
//! compile against: the fields are decoded one by one from their offsets
//! (the block is guest memory read into a byte array, with no alignment or
//! endianness promise, so the struct itself is never overlaid on it). The
//! offsets are constants: the codec costs what hand-written offsets cost.

use std::mem::{offset_of, size_of};

use super::*;
use crate::abi::{ReqHeader, Seg};

const OP: usize = offset_of!(ReqHeader, op);
const FLAGS: usize = offset_of!(ReqHeader, flags);
const STATUS: usize = offset_of!(ReqHeader, status);
const REQUESTER: usize = offset_of!(ReqHeader, requester);
const NR_SEGS: usize = offset_of!(ReqHeader, nr_segs);
const IOVA: usize = offset_of!(ReqHeader, iova);
const LENGTH: usize = offset_of!(ReqHeader, length);
const RESULT: usize = offset_of!(ReqHeader, result);
const RESERVED: usize = offset_of!(ReqHeader, reserved);
const SEG_GPA: usize = offset_of!(Seg, gpa);
const SEG_LEN: usize = offset_of!(Seg, len);

/// Where the host writes a request's status in its block.
pub(super) const STATUS_OFFSET: u64 = STATUS as u64;
/// Where the host writes iova, length and result (adjacent, in that
/// order) after a MAP.
pub(super) const MAP_OUT_OFFSET: u64 = IOVA as u64;
/// Where the host writes the result after the other ops.
pub(super) const RESULT_OFFSET: u64 = RESULT as u64;

const _: () = {
    assert!(size_of::<ReqHeader>() == abi::HEADER_SIZE as usize);
    assert!(size_of::<Seg>() == abi::SEG_SIZE as usize);
    assert!(size_of::<abi::Range>() == abi::SEG_SIZE as usize);
    assert!(offset_of!(abi::Range, iova) == SEG_GPA && offset_of!(abi::Range, len) == SEG_LEN);
    // The MAP write-back is one 24-byte write.
    assert!(LENGTH == IOVA + 8 && RESULT == IOVA + 16);
};

#[inline(always)]
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

#[inline(always)]
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes the 64-byte header.
pub fn parse_header(h: &[u8; 64]) -> Request {
    Request {
        op: u16_at(h, OP),
        flags: u16_at(h, FLAGS),
        requester: u32_at(h, REQUESTER),
        nr_segs: u32_at(h, NR_SEGS),
        iova: u64_at(h, IOVA),
        length: u64_at(h, LENGTH),
        reserved: [
            u64_at(h, RESERVED),
            u64_at(h, RESERVED + 8),
            u64_at(h, RESERVED + 16),
        ],
        segs: Vec::new(),
    }
}

/// Decodes one 16-byte slot (a segment, or an UNMAP_LIST range) as
/// (gpa or iova, length).
#[inline(always)]
pub(super) fn parse_slot(c: &[u8]) -> (u64, u64) {
    (u64_at(c, SEG_GPA), u64_at(c, SEG_LEN))
}

/// The bytes the host writes at [`MAP_OUT_OFFSET`] after a MAP.
pub(super) fn encode_map_out(iova: u64, length: u64, result: u64) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&iova.to_le_bytes());
    out[LENGTH - IOVA..][..8].copy_from_slice(&length.to_le_bytes());
    out[RESULT - IOVA..][..8].copy_from_slice(&result.to_le_bytes());
    out
}

/// Encodes a request block (header + segments) as a guest would lay it
/// out: for tests, fuzzing and the C test program's Rust twin. `status`
/// and `result` are 0.
pub fn encode_request(req: &Request) -> Vec<u8> {
    let mut h = [0u8; abi::HEADER_SIZE as usize];
    h[OP..OP + 2].copy_from_slice(&req.op.to_le_bytes());
    h[FLAGS..FLAGS + 2].copy_from_slice(&req.flags.to_le_bytes());
    h[REQUESTER..REQUESTER + 4].copy_from_slice(&req.requester.to_le_bytes());
    h[NR_SEGS..NR_SEGS + 4].copy_from_slice(&req.nr_segs.to_le_bytes());
    h[IOVA..IOVA + 8].copy_from_slice(&req.iova.to_le_bytes());
    h[LENGTH..LENGTH + 8].copy_from_slice(&req.length.to_le_bytes());
    for (i, r) in req.reserved.iter().enumerate() {
        h[RESERVED + 8 * i..][..8].copy_from_slice(&r.to_le_bytes());
    }
    let mut b = Vec::with_capacity(h.len() + abi::SEG_SIZE as usize * req.segs.len());
    b.extend_from_slice(&h);
    for &(gpa, len) in &req.segs {
        let mut s = [0u8; abi::SEG_SIZE as usize];
        s[SEG_GPA..SEG_GPA + 8].copy_from_slice(&gpa.to_le_bytes());
        s[SEG_LEN..SEG_LEN + 8].copy_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&s);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_parse_roundtrips_and_matches_the_abi_layout() {
        let req = Request {
            op: 4,
            flags: 0x0107,
            requester: 0x1_0010,
            nr_segs: 2,
            iova: 0x1234_5000,
            length: 0x2000,
            reserved: [1, 2, 3],
            segs: vec![(0x8000, 0x1000), (0x9000_0000_0000, 0x10)],
        };
        let b = encode_request(&req);
        assert_eq!(b.len(), 64 + 32);
        // The layout docs/abi.md gives, byte by byte.
        assert_eq!(&b[0..2], &4u16.to_le_bytes());
        assert_eq!(&b[2..4], &0x0107u16.to_le_bytes());
        assert_eq!(&b[4..8], &[0; 4], "status");
        assert_eq!(&b[8..12], &0x1_0010u32.to_le_bytes());
        assert_eq!(&b[12..16], &2u32.to_le_bytes());
        assert_eq!(&b[16..24], &0x1234_5000u64.to_le_bytes());
        assert_eq!(&b[24..32], &0x2000u64.to_le_bytes());
        assert_eq!(&b[32..40], &[0; 8], "result");
        assert_eq!(&b[40..48], &1u64.to_le_bytes());
        assert_eq!(&b[56..64], &3u64.to_le_bytes());
        assert_eq!(&b[80..88], &0x9000_0000_0000u64.to_le_bytes());
        let mut h = [0u8; 64];
        h.copy_from_slice(&b[..64]);
        let back = parse_header(&h);
        assert_eq!(
            (back.op, back.flags, back.requester, back.nr_segs),
            (4, 0x0107, 0x1_0010, 2)
        );
        assert_eq!(
            (back.iova, back.length, back.reserved),
            (0x1234_5000, 0x2000, [1, 2, 3])
        );
        assert_eq!(parse_slot(&b[64..80]), (0x8000, 0x1000));
        assert_eq!((STATUS_OFFSET, MAP_OUT_OFFSET, RESULT_OFFSET), (4, 16, 32));
        let out = encode_map_out(7, 8, 9);
        assert_eq!(&out[16..24], &9u64.to_le_bytes());
    }
}
