// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request engine against a reference model of the ABI.
//!
//! Random sequences of guest requests (ATTACH, DETACH, QUERY, MAP with
//! FIXED and host-chosen IOVAs, UNMAP by first page and by range, malformed
//! blocks), RAM unplug/replug, device reset and migration are run through
//! [`Vm::submit`] on real guest RAM. A model written from
//! `shared/spec/pvdma-abi-v1.md` and `docs/abi.md` alone (a map per endpoint
//! from IOVA page to guest page and permissions) predicts every status and
//! written-back field. After every step the VM must translate every mapped
//! page, the neighbours of every mapping and some random windows exactly as
//! the model does, and its pin refcounts, mapping records and statistics
//! must equal the model's.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use common::*;
use proptest::prelude::*;
use pvdma::abi::Op;
use pvdma::epoch;
use pvdma::FaultReason;
use pvdma::Iotlb;
use pvdma::Request;
use pvdma::{Access, Fragment, Perm, Status, Vm, VmConfig, PAGE_SIZE};

/// A requester ID with no function behind it.
const NOBODY: u32 = 0x0020;
const RIDS: [u32; 3] = [EP, EP2, NOBODY];
const HOLE: u64 = 0xffff_f000; // just below HIGH, in no region

// ---- what the strategies generate -------------------------------------

/// A guest page for a segment to start in.
#[derive(Clone, Copy, Debug)]
enum GpaPick {
    /// Page `n` of low RAM (a small pool, so pages repeat).
    Low(u64),
    /// Page `n` of high RAM.
    High(u64),
    /// Outside RAM: past low RAM, the hole below high RAM, past high RAM,
    /// straddling the end of low RAM.
    Outside(u8),
}

#[derive(Clone, Copy, Debug)]
struct SegSpec {
    gpa: GpaPick,
    pages: u64,
    /// For the last segment: bytes cut from its last page (0..4096).
    cut: u64,
}

#[derive(Clone, Copy, Debug)]
enum Malform {
    ZeroLen(usize),
    UnalignedStart(usize),
    UnalignedEnd(usize),
    Wrap(usize),
}

/// A FIXED IOVA.
#[derive(Clone, Copy, Debug)]
enum IovaPick {
    /// Page `n` of a small pool near 0 (where the host allocates too).
    Low(u64),
    /// Relative to the top of the IOVA space (page `2^(bits-12) + d`).
    Top(i64),
    /// So high that `iova + span` wraps.
    Wrap,
}

#[derive(Clone, Copy, Debug)]
enum UnmapSpec {
    /// `length` 0 at the first page of the `idx`-th mapping, plus `off`.
    First { idx: usize, off: u64 },
    /// Exactly the `idx`-th mapping's bytes.
    Whole { idx: usize },
    /// Whole pages around the `idx`-th mapping, possibly crossing others.
    Around {
        idx: usize,
        before: u64,
        after: i64,
        trim: u64,
    },
    /// Anywhere.
    Raw { iova: IovaPick, len: u64 },
}

#[derive(Clone, Copy, Debug)]
enum BadHeader {
    Op(u16),
    Flags(u16),
    Reserved(usize),
    Misaligned,
    OutsideRam,
}

#[derive(Clone, Debug)]
enum Step {
    Attach(usize),
    Detach(usize),
    Query(usize),
    Map {
        ep: usize,
        perms: u16,
        fixed: Option<(IovaPick, bool)>,
        off: u64,
        segs: Vec<SegSpec>,
        malform: Option<Malform>,
    },
    Unmap(usize, UnmapSpec),
    /// UNMAP_LIST of one range per spec (`First` names a one-byte range
    /// in the mapping's first page).
    UnmapList(usize, Vec<UnmapSpec>),
    Bad(usize, BadHeader),
    Reset,
    Migrate,
    RemoveHigh,
    AddHigh,
}

fn ep_index() -> impl Strategy<Value = usize> {
    prop_oneof![10 => 0..2usize, 1 => Just(2usize)]
}

fn gpa_pick() -> impl Strategy<Value = GpaPick> {
    prop_oneof![
        30 => (1..24u64).prop_map(GpaPick::Low),
        10 => (0..8u64).prop_map(GpaPick::High),
        1 => (0..4u8).prop_map(GpaPick::Outside),
    ]
}

fn seg_spec(big: bool) -> impl Strategy<Value = SegSpec> {
    let pages = if big {
        prop_oneof![8 => 1..4u64, 3 => 16..64u64, 1 => 100..200u64].boxed()
    } else {
        (1..4u64).boxed()
    };
    (gpa_pick(), pages, prop_oneof![Just(0u64), 1..4096u64]).prop_map(|(gpa, pages, cut)| SegSpec {
        gpa,
        pages,
        cut,
    })
}

fn iova_pick() -> impl Strategy<Value = IovaPick> {
    prop_oneof![
        12 => (0..48u64).prop_map(IovaPick::Low),
        2 => (-4..=1i64).prop_map(IovaPick::Top),
        1 => Just(IovaPick::Wrap),
    ]
}

fn malform() -> impl Strategy<Value = Malform> {
    prop_oneof![
        (0..6usize).prop_map(Malform::ZeroLen),
        (0..6usize).prop_map(Malform::UnalignedStart),
        (0..6usize).prop_map(Malform::UnalignedEnd),
        (0..6usize).prop_map(Malform::Wrap),
    ]
}

fn unmap_spec() -> impl Strategy<Value = UnmapSpec> {
    prop_oneof![
        3 => (any::<usize>(), prop_oneof![Just(0u64), 1..4096u64])
            .prop_map(|(idx, off)| UnmapSpec::First { idx, off }),
        3 => any::<usize>().prop_map(|idx| UnmapSpec::Whole { idx }),
        3 => (any::<usize>(), 0..3u64, -1..3i64, prop_oneof![Just(0u64), 1..4096u64])
            .prop_map(|(idx, before, after, trim)| UnmapSpec::Around { idx, before, after, trim }),
        2 => (iova_pick(), prop_oneof![Just(0u64), 1..0x8000u64, Just(u64::MAX)])
            .prop_map(|(iova, len)| UnmapSpec::Raw { iova, len }),
    ]
}

fn bad_header() -> impl Strategy<Value = BadHeader> {
    prop_oneof![
        prop_oneof![Just(0u16), Just(9u16), Just(0xffffu16)].prop_map(BadHeader::Op),
        (3..16u32).prop_map(|b| BadHeader::Flags(1 << b)),
        (0..3usize).prop_map(BadHeader::Reserved),
        Just(BadHeader::Misaligned),
        Just(BadHeader::OutsideRam),
    ]
}

fn step(big: bool) -> impl Strategy<Value = Step> {
    let map = (
        ep_index(),
        prop_oneof![10 => 1..4u16, 1 => Just(0u16)],
        prop_oneof![1 => Just(None), 1 => (iova_pick(), prop::bool::weighted(0.9)).prop_map(Some)],
        prop_oneof![Just(0u64), 1..4096u64],
        prop::collection::vec(seg_spec(big), 1..=6),
        prop_oneof![12 => Just(None), 1 => malform().prop_map(Some)],
    )
        .prop_map(|(ep, perms, fixed, off, segs, malform)| Step::Map {
            ep,
            perms,
            fixed,
            off,
            segs,
            malform,
        });
    prop_oneof![
        10 => ep_index().prop_map(Step::Attach),
        1 => ep_index().prop_map(Step::Detach),
        1 => ep_index().prop_map(Step::Query),
        20 => map,
        10 => (ep_index(), unmap_spec()).prop_map(|(e, u)| Step::Unmap(e, u)),
        6 => (ep_index(), prop::collection::vec(unmap_spec(), 0..6))
            .prop_map(|(e, u)| Step::UnmapList(e, u)),
        1 => (ep_index(), bad_header()).prop_map(|(e, b)| Step::Bad(e, b)),
        1 => Just(Step::Reset),
        2 => Just(Step::Migrate),
        1 => Just(Step::RemoveHigh),
        1 => Just(Step::AddHigh),
    ]
}

/// A configuration and a sequence. Small IOVA spaces (21 bits: 512 pages)
/// with large mappings make NOSPC and the top-of-space checks reachable.
fn scenario() -> impl Strategy<Value = (u32, Vec<Step>)> {
    let steps = |big| {
        (
            prop::bool::weighted(0.8),
            prop::collection::vec(step(big), 1..60),
        )
            .prop_map(|(attach_first, mut steps)| {
                // Most sequences start attached: MAP and UNMAP then do more
                // than report STATE.
                if attach_first {
                    steps.splice(0..0, [Step::Attach(0), Step::Attach(1)]);
                }
                steps
            })
    };
    prop_oneof![
        3 => steps(false).prop_map(|s| (48u32, s)),
        1 => steps(true).prop_map(|s| (21u32, s)),
    ]
}

// ---- the model ----------------------------------------------------------

#[derive(Clone, Debug)]
struct ModelMapping {
    iova: u64,
    length: u64,
    perms: u8,
    segs: Vec<(u64, u64)>,
    /// Guest page of each IOVA page, in order.
    gpa_pages: Vec<u64>,
}

impl ModelMapping {
    fn first_page(&self) -> u64 {
        self.iova / PAGE_SIZE
    }
    fn npages(&self) -> u64 {
        self.gpa_pages.len() as u64
    }
    fn last_page(&self) -> u64 {
        self.first_page() + self.npages() - 1
    }
}

struct Model {
    bits: u32,
    attached: [bool; 2],
    /// Mappings by first IOVA page.
    maps: [BTreeMap<u64, ModelMapping>; 2],
    high: bool,
}

impl Model {
    fn iova_pages(&self) -> u64 {
        1 << (self.bits - 12)
    }

    /// IOVA page -> (guest page, perms).
    fn pages(&self, ep: usize) -> BTreeMap<u64, (u64, u8)> {
        let mut p = BTreeMap::new();
        for m in self.maps[ep].values() {
            for (i, &g) in m.gpa_pages.iter().enumerate() {
                assert!(p.insert(m.first_page() + i as u64, (g, m.perms)).is_none());
            }
        }
        p
    }

    /// Expected pin refcounts: each live mapping holds one reference on
    /// each distinct guest page it covers.
    fn pins(&self) -> Vec<(u64, u32)> {
        let mut pins = BTreeMap::new();
        for m in self.maps.iter().flat_map(|m| m.values()) {
            let distinct: BTreeSet<u64> = m.gpa_pages.iter().copied().collect();
            for g in distinct {
                *pins.entry(g).or_insert(0u32) += 1;
            }
        }
        pins.into_iter().collect()
    }

    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let within = |(s, n): (u64, u64)| gpa >= s && end <= s + n;
        within(LOW) || (self.high && within(HIGH))
    }

    fn used(&self, ep: usize, first: u64, n: u64) -> bool {
        self.maps[ep]
            .values()
            .any(|m| m.first_page() < first + n && first <= m.last_page())
    }

    fn free_run_exists(&self, ep: usize, n: u64) -> bool {
        // Page 0 is never handed out by the host.
        let mut next_free = 1;
        for m in self.maps[ep].values() {
            if m.first_page() >= next_free && m.first_page() - next_free >= n {
                return true;
            }
            next_free = next_free.max(m.last_page() + 1);
        }
        self.iova_pages().saturating_sub(next_free) >= n
    }

    fn mapping_count(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum()
    }
}

// ---- building requests ----------------------------------------------------

fn gpa_of(p: GpaPick) -> u64 {
    match p {
        GpaPick::Low(n) => n * PAGE_SIZE,
        GpaPick::High(n) => HIGH.0 + n * PAGE_SIZE,
        GpaPick::Outside(0) => LOW.1,
        GpaPick::Outside(1) => HOLE,
        GpaPick::Outside(2) => HIGH.0 + HIGH.1,
        GpaPick::Outside(_) => LOW.1 - PAGE_SIZE, // with 2+ pages: straddles
    }
}

fn iova_of(bits: u32, p: IovaPick) -> u64 {
    match p {
        IovaPick::Low(n) => n * PAGE_SIZE,
        IovaPick::Top(d) => ((1i64 << (bits - 12)) + d) as u64 * PAGE_SIZE,
        IovaPick::Wrap => !(PAGE_SIZE - 1),
    }
}

/// The segments as a guest would lay them out: the first may start inside
/// its page, every boundary between segments is a page boundary, the last
/// may end anywhere. Then at most one rule is broken on purpose.
fn build_segs(off: u64, specs: &[SegSpec], malform: Option<Malform>) -> Vec<(u64, u64)> {
    let last = specs.len() - 1;
    let mut segs: Vec<(u64, u64)> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let start = gpa_of(s.gpa) + if i == 0 { off } else { 0 };
            let mut end = gpa_of(s.gpa) + s.pages * PAGE_SIZE;
            if i == last {
                end -= s.cut.min(end - start - 1);
            }
            (start, end - start)
        })
        .collect();
    match malform {
        Some(Malform::ZeroLen(i)) => segs[i % specs.len()].1 = 0,
        Some(Malform::UnalignedStart(i)) => {
            let i = i % specs.len();
            segs[i].0 += 0x10;
            if i == 0 && segs.len() > 1 {
                segs[i].1 -= 0x10.min(segs[i].1 - 1); // still ends aligned
            }
        }
        Some(Malform::UnalignedEnd(i)) => {
            let s = &mut segs[i % specs.len()];
            s.1 = if s.1 > 8 { s.1 - 8 } else { s.1 + 8 };
        }
        Some(Malform::Wrap(i)) => segs[i % specs.len()] = (u64::MAX - 0xfff, 0x2000),
        None => {}
    }
    segs
}

/// The segment rules of the spec, from its text: `Err` with the status,
/// else (length, IOVA pages as guest pages).
fn segment_rules(segs: &[(u64, u64)]) -> Result<(u64, Vec<u64>), Status> {
    let last = segs.len() - 1;
    let mut length = 0u64;
    let mut pages = Vec::new();
    for (i, &(gpa, len)) in segs.iter().enumerate() {
        let end = gpa.checked_add(len).ok_or(Status::Inval)?;
        if len == 0 || (i > 0 && gpa % PAGE_SIZE != 0) || (i < last && end % PAGE_SIZE != 0) {
            return Err(Status::Inval);
        }
        length = length.checked_add(len).ok_or(Status::Inval)?;
        pages.extend(gpa / PAGE_SIZE..=(end - 1) / PAGE_SIZE);
    }
    Ok((length, pages))
}

// ---- the harness ------------------------------------------------------------

struct Run {
    g: Guest,
    m: Model,
    /// One software IOTLB per endpoint, kept for the whole run (across
    /// UNMAP, DETACH, RAM removal, reset and migration to a new VM):
    /// every translation is also made through a `CachedTranslator` using
    /// it, and must agree with the model like the uncached one.
    tlbs: RefCell<[Iotlb; 2]>,
}

fn fresh_vm(g: &Guest, bits: u32, high: bool) -> Vm {
    let vm = Vm::new(VmConfig {
        iova_bits: bits,
        ..VmConfig::default()
    })
    .unwrap();
    for (gpa, size) in [LOW, HIGH] {
        if gpa == HIGH.0 && !high {
            continue;
        }
        // SAFETY: `g.mem` owns this memory and outlives the VM, which is
        // stored into `g.vm` (dropped before `g.mem`) or dropped earlier.
        unsafe { vm.add_ram_region(gpa, size, g.hva(gpa)).unwrap() };
    }
    vm.add_endpoint(EP, None).unwrap();
    vm.add_endpoint(EP2, Some("0000:01:00.0")).unwrap();
    vm
}

impl Run {
    fn new(bits: u32) -> Run {
        let g = Guest::with(VmConfig {
            iova_bits: bits,
            ..VmConfig::default()
        });
        Run {
            g,
            m: Model {
                bits,
                attached: [false; 2],
                maps: [BTreeMap::new(), BTreeMap::new()],
                high: true,
            },
            tlbs: RefCell::default(),
        }
    }

    /// Whether the endpoint is attached; `None` for NOBODY.
    fn attached(&self, ep: usize) -> Option<bool> {
        self.m.attached.get(ep).copied()
    }

    /// Submits and checks the written-back fields against the model's
    /// expectation: `Ok(result, Option<(iova, length)>)` or the statuses
    /// allowed, the first being the one docs/abi.md's check order picks.
    fn submit(&self, req: &Request) -> Out {
        let out = self.g.submit(req);
        if out.status != Status::Ok {
            assert_eq!(out.result, 0xdead_beef, "result written on failure");
            assert_eq!(
                (out.iova, out.length),
                (req.iova, req.length),
                "iova/length written on failure"
            );
        }
        out
    }

    fn expect_status(out: &Out, allowed: &[Status], what: &str) {
        assert!(!allowed.is_empty());
        assert!(
            allowed.contains(&out.status),
            "{what}: got {:?}, the spec allows {allowed:?}",
            out.status
        );
        // docs/abi.md "Order of checks" fixes which one wins.
        assert_eq!(
            out.status, allowed[0],
            "{what}: docs/abi.md check order picks {:?} of {allowed:?}",
            allowed[0]
        );
    }

    fn step(&mut self, s: &Step) {
        match *s {
            Step::Attach(ep) => {
                let out = self.submit(&req(Op::Attach, RIDS[ep]));
                match self.attached(ep) {
                    None => Self::expect_status(&out, &[Status::NoDev], "ATTACH"),
                    Some(true) => Self::expect_status(&out, &[Status::State], "ATTACH"),
                    Some(false) => {
                        Self::expect_status(&out, &[Status::Ok], "ATTACH");
                        assert_eq!(out.result, 0);
                        self.m.attached[ep] = true;
                    }
                }
            }
            Step::Detach(ep) => {
                let out = self.submit(&req(Op::Detach, RIDS[ep]));
                match self.attached(ep) {
                    None => Self::expect_status(&out, &[Status::NoDev], "DETACH"),
                    Some(false) => Self::expect_status(&out, &[Status::State], "DETACH"),
                    Some(true) => {
                        Self::expect_status(&out, &[Status::Ok], "DETACH");
                        assert_eq!(out.result, self.m.maps[ep].len() as u64, "DETACH result");
                        self.m.maps[ep].clear();
                        self.m.attached[ep] = false;
                    }
                }
            }
            Step::Query(ep) => {
                let out = self.submit(&req(Op::Query, RIDS[ep]));
                match self.attached(ep) {
                    None => Self::expect_status(&out, &[Status::NoDev], "QUERY"),
                    Some(a) => {
                        Self::expect_status(&out, &[Status::Ok], "QUERY");
                        let passthrough = if ep == 1 { 2 } else { 0 };
                        let bypass = if a { 0 } else { 4 };
                        let want = u64::from(a) | passthrough | bypass;
                        assert_eq!(out.result, want, "QUERY result");
                    }
                }
            }
            Step::Map {
                ep,
                perms,
                fixed,
                off,
                ref segs,
                malform,
            } => self.map(ep, perms, fixed, off, segs, malform),
            Step::Unmap(ep, u) => self.unmap(ep, u),
            Step::UnmapList(ep, ref specs) => self.unmap_list(ep, specs),
            Step::Bad(ep, b) => {
                let mut r = req(Op::Query, RIDS[ep]);
                let before = self.g.footprint();
                let status = match b {
                    BadHeader::Op(op) => {
                        r.op = op;
                        self.submit(&r).status
                    }
                    BadHeader::Flags(f) => {
                        r.flags = f;
                        self.submit(&r).status
                    }
                    BadHeader::Reserved(i) => {
                        r.reserved[i] = 1 << (i * 7);
                        self.submit(&r).status
                    }
                    BadHeader::Misaligned => self.g.submit_at(BLOCK + 4, &r).status,
                    BadHeader::OutsideRam => self.g.vm.submit(LOW.1 - 32),
                };
                let want = if matches!(b, BadHeader::OutsideRam) {
                    Status::Fault
                } else {
                    Status::Inval
                };
                assert_eq!(status, want, "{b:?}");
                assert_eq!(self.g.footprint(), before);
            }
            Step::Reset => {
                self.g.vm.reset();
                self.m.attached = [false; 2];
                self.m.maps = [BTreeMap::new(), BTreeMap::new()];
                let s = self.g.vm.stats();
                assert_eq!(
                    (s.mappings, s.pinned_pages, s.faults),
                    (0, 0, 0),
                    "after reset"
                );
            }
            Step::Migrate => {
                let blob = self.g.vm.export_state();
                let dst = fresh_vm(&self.g, self.m.bits, self.m.high);
                dst.import_state(&blob).expect("import of a fresh export");
                // The destination takes over; the source goes away, which
                // must not disturb the destination's pins.
                let src = std::mem::replace(&mut self.g.vm, dst);
                drop(src);
            }
            Step::RemoveHigh => {
                let r = self.g.vm.remove_ram_region(HIGH.0, HIGH.1);
                if !self.m.high {
                    assert!(r.is_err(), "removing absent RAM");
                    return;
                }
                let touches = |m: &ModelMapping| {
                    m.gpa_pages
                        .iter()
                        .any(|&g| (HIGH.0 / PAGE_SIZE..(HIGH.0 + HIGH.1) / PAGE_SIZE).contains(&g))
                };
                let mut torn = 0;
                for maps in &mut self.m.maps {
                    let before = maps.len();
                    maps.retain(|_, m| !touches(m));
                    torn += before - maps.len();
                }
                assert_eq!(r.unwrap(), torn, "mappings torn down with the region");
                self.m.high = false;
            }
            Step::AddHigh => {
                // SAFETY: `g.mem` owns this memory and outlives the VM.
                let r = unsafe { self.g.vm.add_ram_region(HIGH.0, HIGH.1, self.g.hva(HIGH.0)) };
                assert_eq!(r.is_ok(), !self.m.high, "{r:?}");
                self.m.high = true;
            }
        }
    }

    fn map(
        &mut self,
        ep: usize,
        perms: u16,
        fixed: Option<(IovaPick, bool)>,
        off: u64,
        specs: &[SegSpec],
        malform: Option<Malform>,
    ) {
        let segs = build_segs(off, specs, malform);
        let (iova_in, flags) = match fixed {
            Some((p, same_offset)) => {
                let o = if same_offset {
                    segs[0].0 % PAGE_SIZE
                } else {
                    (segs[0].0 + 8) % PAGE_SIZE
                };
                (iova_of(self.m.bits, p) | o, perms | FIXED)
            }
            // Without FIXED the iova field is ignored: put garbage there.
            None => (0x5a5a_5000, perms),
        };
        let out = self.submit(&map_req(RIDS[ep], flags, iova_in, &segs));

        // Every rule the request breaks, in docs/abi.md's check order.
        let mut allowed = Vec::new();
        let Some(attached) = self.attached(ep) else {
            return Self::expect_status(&out, &[Status::NoDev], "MAP");
        };
        if !attached {
            allowed.push(Status::State);
        }
        if perms & 3 == 0 {
            allowed.push(Status::Perm);
        }
        let rules = segment_rules(&segs);
        if let Err(s) = rules {
            allowed.push(s);
        }
        if segs.iter().any(|&(gpa, len)| !self.m.in_ram(gpa, len)) {
            allowed.push(Status::Fault);
        }
        let (length, gpa_pages) = match rules {
            Ok(r) => r,
            Err(_) => (0, vec![0]),
        };
        let npages = gpa_pages.len() as u64;
        let first_off = segs[0].0 % PAGE_SIZE;
        if fixed.is_some() {
            let first = iova_in / PAGE_SIZE;
            let fits = first
                .checked_add(npages)
                .is_some_and(|e| e <= self.m.iova_pages());
            if iova_in % PAGE_SIZE != first_off || !fits {
                allowed.push(Status::Inval);
            } else if attached && self.m.used(ep, first, npages) {
                allowed.push(Status::Exist);
            }
        } else if attached && !self.m.free_run_exists(ep, npages) {
            allowed.push(Status::NoSpc);
        }
        let what = format!("MAP ep{ep} flags {flags:#x} iova {iova_in:#x} segs {segs:x?}");
        if !allowed.is_empty() {
            return Self::expect_status(&out, &allowed, &what);
        }
        Self::expect_status(&out, &[Status::Ok], &what);
        assert_eq!(out.result, 0, "{what}");
        assert_eq!(out.length, length, "{what}: length out");
        assert_eq!(
            out.iova % PAGE_SIZE,
            first_off,
            "{what}: offset of iova out"
        );
        let first = out.iova / PAGE_SIZE;
        match fixed {
            Some(_) => assert_eq!(out.iova, iova_in, "{what}: FIXED iova out"),
            None => {
                assert_ne!(first, 0, "{what}: host handed out page 0");
                assert!(
                    first + npages <= self.m.iova_pages(),
                    "{what}: beyond IOVA_BITS"
                );
                assert!(
                    !self.m.used(ep, first, npages),
                    "{what}: host picked a used range at {:#x}",
                    out.iova
                );
            }
        }
        self.m.maps[ep].insert(
            first,
            ModelMapping {
                iova: out.iova,
                length,
                perms: (perms & 3) as u8,
                segs,
                gpa_pages,
            },
        );
    }

    /// The UNMAP `(iova, length)` a spec names.
    fn range_of(&self, ep: usize, u: UnmapSpec) -> (u64, u64) {
        let bits = self.m.bits;
        let nth = |idx: usize| -> Option<ModelMapping> {
            let maps = self.m.maps.get(ep)?;
            (!maps.is_empty()).then(|| maps.values().nth(idx % maps.len()).unwrap().clone())
        };
        match u {
            UnmapSpec::First { idx, off } => match nth(idx) {
                Some(m) => (m.first_page() * PAGE_SIZE + off, 0),
                None => (0x3000 + off, 0),
            },
            UnmapSpec::Whole { idx } => match nth(idx) {
                Some(m) => (m.iova, m.length),
                None => (0x3000, 0x1000),
            },
            UnmapSpec::Around {
                idx,
                before,
                after,
                trim,
            } => match nth(idx) {
                Some(m) => {
                    let start = m.first_page().saturating_sub(before);
                    let end = (m.last_page() as i64 + 1 + after).max(start as i64 + 1) as u64;
                    let len = (end - start) * PAGE_SIZE;
                    (
                        start * PAGE_SIZE + trim.min(len - 1) / 2,
                        len - trim.min(len - 1),
                    )
                }
                None => (0x3000, 0x1000),
            },
            UnmapSpec::Raw { iova, len } => (iova_of(bits, iova) + (len & 0xff8), len),
        }
    }

    /// UNMAP_LIST, predicted from the spec's rules in docs/abi.md's order:
    /// NODEV, STATE, INVAL (no ranges; a range of length 0, wrapping or
    /// past the IOVA space; page spans overlapping), RANGE, NOENT.
    fn unmap_list(&mut self, ep: usize, specs: &[UnmapSpec]) {
        let ranges: Vec<(u64, u64)> = specs
            .iter()
            .map(|&u| match u {
                UnmapSpec::First { .. } => {
                    let (iova, _) = self.range_of(ep, u);
                    (iova, 1)
                }
                u => self.range_of(ep, u),
            })
            .collect();
        let out = self.submit(&unmap_list_req(RIDS[ep], &ranges));
        let what = format!("UNMAP_LIST ep{ep} {ranges:x?}");
        let Some(attached) = self.attached(ep) else {
            return Self::expect_status(&out, &[Status::NoDev], &what);
        };
        if !attached {
            return Self::expect_status(&out, &[Status::State], &what);
        }
        let limit = 1u64 << self.m.bits;
        if ranges.is_empty()
            || ranges
                .iter()
                .any(|&(iova, len)| len == 0 || iova.checked_add(len).is_none_or(|e| e > limit))
        {
            return Self::expect_status(&out, &[Status::Inval], &what);
        }
        let spans: Vec<(u64, u64)> = ranges
            .iter()
            .map(|&(iova, len)| (iova / PAGE_SIZE, (iova + len - 1) / PAGE_SIZE))
            .collect();
        // Quadratic on purpose: the model checks every pair.
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                if a.0 <= b.1 && b.0 <= a.1 {
                    return Self::expect_status(&out, &[Status::Inval], &what);
                }
            }
        }
        let mut crossing = false;
        let mut empty = false;
        let mut victims = Vec::new();
        for &(first, last) in &spans {
            let mut inside = 0;
            for m in self.m.maps[ep].values() {
                if m.first_page() <= last && first <= m.last_page() {
                    if m.first_page() < first || m.last_page() > last {
                        crossing = true;
                    } else {
                        inside += 1;
                        victims.push(m.first_page());
                    }
                }
            }
            empty |= inside == 0;
        }
        match (crossing, empty) {
            (true, true) => {
                return Self::expect_status(&out, &[Status::Range, Status::NoEnt], &what)
            }
            (true, false) => return Self::expect_status(&out, &[Status::Range], &what),
            (false, true) => return Self::expect_status(&out, &[Status::NoEnt], &what),
            (false, false) => {}
        }
        Self::expect_status(&out, &[Status::Ok], &what);
        let mut freed = 0;
        for p in victims {
            freed += self.m.maps[ep].remove(&p).unwrap().npages() * PAGE_SIZE;
        }
        assert_eq!(out.result, freed, "{what}: result is the IOVA space freed");
        assert_eq!(
            (out.iova, out.length),
            (0, 0),
            "{what}: only result written"
        );
    }

    fn unmap(&mut self, ep: usize, u: UnmapSpec) {
        let bits = self.m.bits;
        let (iova, length) = self.range_of(ep, u);
        let mut r = req(Op::Unmap, RIDS[ep]);
        r.iova = iova;
        r.length = length;
        let out = self.submit(&r);
        let what = format!("UNMAP ep{ep} iova {iova:#x} length {length:#x}");
        let Some(attached) = self.attached(ep) else {
            return Self::expect_status(&out, &[Status::NoDev], &what);
        };
        if !attached {
            return Self::expect_status(&out, &[Status::State], &what);
        }
        let limit = 1u64 << bits;
        let victims: Vec<u64> = if length == 0 {
            if iova >= limit {
                return Self::expect_status(&out, &[Status::Inval], &what);
            }
            let page = iova / PAGE_SIZE;
            if !self.m.maps[ep].contains_key(&page) {
                return Self::expect_status(&out, &[Status::NoEnt], &what);
            }
            vec![page]
        } else {
            if iova.checked_add(length).is_none_or(|e| e > limit) {
                return Self::expect_status(&out, &[Status::Inval], &what);
            }
            let (first, last) = (iova / PAGE_SIZE, (iova + length - 1) / PAGE_SIZE);
            let overlapping: Vec<&ModelMapping> = self.m.maps[ep]
                .values()
                .filter(|m| m.first_page() <= last && first <= m.last_page())
                .collect();
            let crossing = overlapping
                .iter()
                .any(|m| m.first_page() < first || m.last_page() > last);
            let inside: Vec<u64> = overlapping
                .iter()
                .filter(|m| m.first_page() >= first && m.last_page() <= last)
                .map(|m| m.first_page())
                .collect();
            match (crossing, inside.is_empty()) {
                (true, false) => return Self::expect_status(&out, &[Status::Range], &what),
                // "NOENT if no mapping is in range": a crossing mapping is
                // partly in range, so either reading is the spec's.
                (true, true) => {
                    let ok = [Status::Range, Status::NoEnt].contains(&out.status);
                    assert!(ok, "{what}: {:?}", out.status);
                    return;
                }
                (false, true) => return Self::expect_status(&out, &[Status::NoEnt], &what),
                (false, false) => inside,
            }
        };
        Self::expect_status(&out, &[Status::Ok], &what);
        let mut freed = 0;
        for p in victims {
            freed += self.m.maps[ep].remove(&p).unwrap().npages() * PAGE_SIZE;
        }
        assert_eq!(out.result, freed, "{what}: result is the IOVA space freed");
    }

    /// Everything observable must agree with the model.
    fn check(&self, vm: &Vm) {
        let s = vm.stats();
        assert_eq!(s.mappings, self.m.mapping_count(), "stats().mappings");
        let pins = self.m.pins();
        assert_eq!(vm.pins().snapshot(), pins, "pin refcounts");
        assert_eq!(s.pinned_pages, pins.len() as u64, "stats().pinned_pages");
        for (ep, &rid) in RIDS[..2].iter().enumerate() {
            let got: Vec<_> = vm
                .mappings(rid)
                .into_iter()
                .map(|m| (m.iova, m.length, m.perms.bits(), m.segs))
                .collect();
            let want: Vec<_> = self.m.maps[ep]
                .values()
                .map(|m| (m.iova, m.length, m.perms, m.segs.clone()))
                .collect();
            assert_eq!(got, want, "mapping records of ep{ep}");
            self.check_translations(vm, ep);
        }
        // An unknown requester translates nothing.
        let mut frag = [Fragment {
            hva: 0,
            gpa: 0,
            len: 0,
        }; 1];
        let e = vm
            .translate(NOBODY, 0x1000, 1, Access::Read, &mut frag)
            .unwrap_err();
        assert_eq!(e.reason, FaultReason::NoDevice);
    }

    /// What translating [iova, iova + len) must give: fragments as
    /// (gpa, len), merged where guest-physically contiguous, or the first
    /// refused address and why.
    fn expected(
        &self,
        pages: &BTreeMap<u64, (u64, u8)>,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<(u64, u64)>, (u64, FaultReason)> {
        let mut frags: Vec<(u64, u64)> = Vec::new();
        let mut cur = iova;
        while cur < iova + len {
            let Some(&(gpage, perms)) = pages.get(&(cur / PAGE_SIZE)) else {
                return Err((cur, FaultReason::Unmapped));
            };
            if !Perm::from_bits_truncate(perms).allows(access) {
                return Err((cur, FaultReason::Permission));
            }
            let n = (PAGE_SIZE - cur % PAGE_SIZE).min(iova + len - cur);
            let gpa = gpage * PAGE_SIZE + cur % PAGE_SIZE;
            match frags.last_mut() {
                Some(l) if l.0 + l.1 == gpa => l.1 += n,
                _ => frags.push((gpa, n)),
            }
            cur += n;
        }
        Ok(frags)
    }

    fn compare(
        &self,
        vm: &Vm,
        ep: usize,
        iova: u64,
        len: u64,
        access: Access,
        want: Result<Vec<(u64, u64)>, (u64, FaultReason)>,
    ) {
        let mut out = [Fragment {
            hva: 0,
            gpa: 0,
            len: 0,
        }; 16];
        let got = vm.translate(RIDS[ep], iova, len, access, &mut out);
        let ctx = format!("ep{ep} translate {iova:#x}+{len:#x} {access:?}");
        // The same through the endpoint's cache, twice (fill, then hit),
        // before the uncached result is checked against the model.
        for pass in 0..2 {
            let mut cached_out = out;
            let cached = self.with_cached(vm, ep, |tr, guard| {
                tr.translate_in(iova, len, access, &mut cached_out, guard)
            });
            assert_eq!(cached, got, "{ctx}: cached pass {pass}");
            if let Ok(n) = got {
                assert_eq!(cached_out[..n.min(16)], out[..n.min(16)], "{ctx}: cached");
            }
        }
        match want {
            Ok(w) => {
                let n = got.unwrap_or_else(|e| panic!("{ctx}: {e}, want {w:x?}"));
                assert_eq!(
                    n,
                    w.len(),
                    "{ctx}: fragment count, got {:x?}",
                    &out[..n.min(16)]
                );
                for (f, &(gpa, flen)) in out.iter().zip(&w) {
                    assert_eq!((f.gpa, f.len), (gpa, flen), "{ctx}");
                    assert_eq!(f.hva, self.g.hva(gpa), "{ctx}: hva of {gpa:#x}");
                }
            }
            Err((at, reason)) => {
                let e = got.expect_err(&ctx);
                assert_eq!((e.iova, e.reason), (at, reason), "{ctx}");
            }
        }
    }

    /// Runs `f` on a `CachedTranslator` of endpoint `ep` that uses the
    /// run's cache for it.
    fn with_cached<R>(
        &self,
        vm: &Vm,
        ep: usize,
        f: impl FnOnce(&mut pvdma::CachedTranslator<'_>, &epoch::Guard) -> R,
    ) -> R {
        let mut tlbs = self.tlbs.borrow_mut();
        let tlb = std::mem::take(&mut tlbs[ep]);
        let mut tr = vm
            .translator(RIDS[ep])
            .expect("both endpoints exist")
            .cached_with(tlb);
        let r = f(&mut tr, &epoch::pin());
        tlbs[ep] = tr.into_parts().1;
        r
    }

    fn check_translations(&self, vm: &Vm, ep: usize) {
        if !self.m.attached[ep] {
            // Bypass: identity onto RAM.
            for gpa in [0x1000, HIGH.0 + 0x3000] {
                let want = if self.m.in_ram(gpa, 1) {
                    Ok(vec![(gpa, PAGE_SIZE)])
                } else {
                    Err((gpa, FaultReason::OutsideRam))
                };
                self.compare(vm, ep, gpa, PAGE_SIZE, Access::ReadWrite, want);
            }
            return;
        }
        let pages = self.m.pages(ep);
        let accesses = [Access::Read, Access::Write, Access::ReadWrite];
        // Single-address lookups (what an IOMMU translate asks), mapped
        // or not: the uncached `Translator::lookup` as the model says,
        // then `Vm::lookup` (thread-local cache) and the endpoint's
        // `CachedTranslator`, each twice (fill, then hit), equal to it.
        let uncached = vm.translator(RIDS[ep]).expect("both endpoints exist");
        for &p in pages.keys().chain(&[0, 47]) {
            let iova = p * PAGE_SIZE + 0x18;
            if iova >> self.m.bits != 0 {
                continue;
            }
            for access in [None, Some(Access::Write)] {
                let ctx = format!("ep{ep} lookup {iova:#x} {access:?}");
                let want = uncached.lookup(iova, access, &epoch::pin());
                match (pages.get(&p), &want) {
                    (None, Err(f)) => assert_eq!(f.reason, FaultReason::Unmapped, "{ctx}"),
                    (Some(&(gpage, perms)), _)
                        if access.is_some_and(|a| !Perm::from_bits_truncate(perms).allows(a)) =>
                    {
                        let f = want.expect_err(&ctx);
                        assert_eq!(f.reason, FaultReason::Permission, "{ctx}: {gpage:#x}");
                    }
                    (Some(&(gpage, perms)), Ok(l)) => {
                        assert_eq!(l.gpa, gpage * PAGE_SIZE + 0x18, "{ctx}");
                        assert_eq!(l.perms.bits(), perms, "{ctx}");
                        assert!(!l.bypass && l.run > 0, "{ctx}");
                    }
                    (model, got) => panic!("{ctx}: model {model:?}, got {got:?}"),
                }
                for pass in 0..2 {
                    let got = vm.lookup(RIDS[ep], iova, access);
                    assert_eq!(got, want, "{ctx}: Vm::lookup pass {pass}");
                    let got = self.with_cached(vm, ep, |tr, guard| tr.lookup(iova, access, guard));
                    assert_eq!(got, want, "{ctx}: cached translator pass {pass}");
                }
            }
        }
        // Every mapped page, one page at a time, every access kind.
        for &p in pages.keys() {
            for a in accesses {
                let want = self.expected(&pages, p * PAGE_SIZE, PAGE_SIZE, a);
                self.compare(vm, ep, p * PAGE_SIZE, PAGE_SIZE, a, want);
            }
        }
        // Each mapping as a whole, and its unmapped or foreign neighbours
        // (a window from the page before to the page after).
        for m in self.m.maps[ep].values() {
            let a = if m.perms & 1 != 0 {
                Access::Read
            } else {
                Access::Write
            };
            self.compare(
                vm,
                ep,
                m.iova,
                m.length,
                a,
                self.expected(&pages, m.iova, m.length, a),
            );
            let lo = m.first_page().saturating_sub(1) * PAGE_SIZE;
            let hi = ((m.last_page() + 2) * PAGE_SIZE).min(1 << self.m.bits);
            for probe in [lo, (m.last_page() + 1) * PAGE_SIZE] {
                if probe < 1 << self.m.bits {
                    self.compare(vm, ep, probe, 1, a, self.expected(&pages, probe, 1, a));
                }
            }
            self.compare(
                vm,
                ep,
                lo + 0x10,
                hi - lo - 0x20,
                a,
                self.expected(&pages, lo + 0x10, hi - lo - 0x20, a),
            );
        }
        // Some never-mapped pages and multi-page windows across the pool.
        for p in [0u64, 7, 23, 47, 300] {
            if p < self.m.iova_pages() {
                let want = self.expected(&pages, p * PAGE_SIZE + 1, 3 * PAGE_SIZE, Access::Read);
                self.compare(vm, ep, p * PAGE_SIZE + 1, 3 * PAGE_SIZE, Access::Read, want);
            }
        }
    }
}

fn run(bits: u32, steps: &[Step]) {
    let mut r = Run::new(bits);
    for (i, s) in steps.iter().enumerate() {
        r.step(s);
        let vm = &r.g.vm;
        // The panic message of a failing check names the step.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.check(vm)));
        if let Err(e) = res {
            eprintln!("state check failed after step {i}: {s:?}");
            std::panic::resume_unwind(e);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 384,
        max_shrink_iters: 2048,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn requests_match_the_model((bits, steps) in scenario()) {
        run(bits, &steps);
    }
}

/// The spec: "Without FIXED the host picks the range (... NOSPC when no
/// range is free ...)". A mapping of more pages than the IOVA space has is
/// the extreme case of no free range; INVAL is for malformed requests and
/// out-of-range *given* IOVAs, and docs/abi.md lists no exception.
#[test]
fn host_mapping_larger_than_iova_space_is_nospc() {
    let g = Guest::with(VmConfig {
        iova_bits: 21,
        ..VmConfig::default()
    });
    assert_eq!(g.attach(EP), Status::Ok);
    // 513 pages of RAM: well-formed, all in RAM, one page more than 2^21.
    let before = g.footprint();
    let out = g.map(EP, RW, 0, &[(0x1000, 513 * PAGE_SIZE)]);
    assert_eq!(out.status, Status::NoSpc);
    assert_eq!(g.footprint(), before);
}

/// A hand-written sequence through the paths the random one reaches
/// rarely: NOSPC in a full 21-bit space, unplug of RAM under mappings,
/// migration of a mapping with repeated pages.
#[test]
fn model_smoke_sequence() {
    let seg = |gpa, pages| SegSpec { gpa, pages, cut: 0 };
    let mut steps = vec![Step::Attach(0), Step::Attach(1)];
    for _ in 0..9 {
        steps.push(Step::Map {
            ep: 0,
            perms: 3,
            fixed: None,
            off: 0,
            segs: vec![seg(GpaPick::Low(1), 60)],
            malform: None,
        });
    }
    steps.extend([
        Step::Map {
            ep: 1,
            perms: 1,
            fixed: Some((IovaPick::Low(0), true)),
            off: 0x123,
            segs: vec![
                seg(GpaPick::High(1), 2),
                seg(GpaPick::High(1), 2),
                seg(GpaPick::Low(3), 1),
            ],
            malform: None,
        },
        Step::Migrate,
        Step::RemoveHigh,
        Step::Map {
            ep: 1,
            perms: 2,
            fixed: None,
            off: 0,
            segs: vec![seg(GpaPick::High(0), 1)],
            malform: None,
        },
        Step::AddHigh,
        Step::Unmap(
            0,
            UnmapSpec::Raw {
                iova: IovaPick::Low(0),
                len: u64::MAX,
            },
        ),
        Step::Unmap(
            0,
            UnmapSpec::Around {
                idx: 3,
                before: 2,
                after: 2,
                trim: 0,
            },
        ),
        Step::Detach(0),
        Step::Reset,
    ]);
    run(21, &steps);
}
