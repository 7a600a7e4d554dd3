// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The per-domain IOVA page table.
//!
//! A radix tree with 9 index bits per level over 4 KiB pages, like an x86
//! IOMMU's second-level table: level 0 holds 4 KiB leaves, level 1 holds
//! 2 MiB leaves or pointers to level-0 tables, and every level above holds
//! pointers only. The top level is narrower when `iova_bits - 12` is not a
//! multiple of 9.
//!
//! # Concurrency
//!
//! - Readers ([`IoPageTable::lookup`]) take no lock, perform no
//!   read-modify-write and never loop more than once per level: they are
//!   wait-free. They run inside a crossbeam-epoch [`Guard`].
//! - Writers are serialised by a mutex ([`IoPageTable::lock`]) and never
//!   wait for readers. A new node is published only after it is fully
//!   initialised; a node is never modified once it has been unlinked; an
//!   unlinked node is freed through the epoch collector, i.e. only once
//!   every reader pinned while it was reachable has unpinned.
//!
//! # Entry encoding
//!
//! Every entry is one `AtomicU64`:
//!
//! | value                                     | meaning                       |
//! |-------------------------------------------|-------------------------------|
//! | `0`                                       | nothing mapped                |
//! | `node_address \| PRESENT`                 | pointer to the next level     |
//! | `gpa \| perms << 3 \| [HUGE] \| LEAF \| PRESENT` | leaf (4 KiB, or 2 MiB at level 1) |
//!
//! Node addresses are at least 64-byte aligned and leaf addresses 4 KiB
//! aligned, so the flag bits never collide with an address.

use crate::sync::epoch::{self, Guard};
use crate::sync::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use crate::types::{Perm, PAGE_MASK, PAGE_SHIFT};
use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};

/// Largest supported IOVA width.
pub const MAX_IOVA_BITS: u32 = 57;
/// Smallest supported IOVA width.
pub const MIN_IOVA_BITS: u32 = 21; // at least one 2 MiB block
/// Size of a large leaf: 2 MiB.
pub const HUGE_SIZE: u64 = 1 << 21;

/// Index bits resolved by one level.
const LEVEL_BITS: u32 = 9;
/// Entries per node.
const ENTRIES: usize = 1 << LEVEL_BITS;
/// Mask of a per-level index.
const INDEX_MASK: u64 = (1 << LEVEL_BITS) - 1;
/// The level whose leaves are [`HUGE_SIZE`] bytes.
const HUGE_LEVEL: u32 = 1;
/// log2 of [`HUGE_SIZE`]: the span of one level-0 node.
const HUGE_SHIFT: u32 = entry_shift(HUGE_LEVEL);

/// The entry holds something (a leaf or a pointer).
const PRESENT: u64 = 1 << 0;
/// The entry is a leaf (else, when present, a pointer to the next level).
const LEAF: u64 = 1 << 1;
/// The leaf is a 2 MiB leaf (informative: the level also says so).
const HUGE: u64 = 1 << 2;
/// Where the two [`Perm`] bits of a leaf live.
const PERM_SHIFT: u32 = 3;
/// The address bits of a leaf.
const LEAF_ADDR_MASK: u64 = !PAGE_MASK;
/// The flag bits of a pointer entry; the rest is the node address.
const PTR_FLAGS_MASK: u64 = PRESENT | LEAF | HUGE;

/// Bytes covered by one entry at `level`.
const fn entry_shift(level: u32) -> u32 {
    PAGE_SHIFT + LEVEL_BITS * level
}

/// Encodes a leaf translating to `gpa` (aligned to the leaf size).
fn leaf_entry(gpa: u64, perms: Perm, level: u32) -> u64 {
    let huge = if level > 0 { HUGE } else { 0 };
    (gpa & LEAF_ADDR_MASK) | u64::from(perms.bits()) << PERM_SHIFT | huge | LEAF | PRESENT
}

/// The permissions of a leaf entry.
fn leaf_perms(entry: u64) -> Perm {
    // Truncation is intended: only the two permission bits are kept.
    Perm::from_bits_truncate((entry >> PERM_SHIFT) as u8)
}

/// Host memory one table node takes (memory accounting).
pub const NODE_BYTES: u64 = std::mem::size_of::<Node>() as u64;

/// One table node: 512 entries plus the writer's count of present ones.
#[repr(C, align(64))]
struct Node {
    entries: [AtomicU64; ENTRIES],
    /// Present entries. Read and written only under the writer mutex (the
    /// atomic is a safe cell: every access is `Relaxed`, ordered by the
    /// mutex).
    live: AtomicU32,
    /// Set just before the node is freed, so that the loom model catches a
    /// reader that can still reach a freed node.
    #[cfg(loom)]
    retired: AtomicU32,
}

// Pointer entries keep their flags in the low bits of the node address.
const _: () = assert!(std::mem::align_of::<Node>() as u64 > PTR_FLAGS_MASK);

impl Node {
    /// A node with every entry empty.
    fn new() -> Box<Node> {
        Box::new(Node {
            entries: std::array::from_fn(|_| AtomicU64::new(0)),
            live: AtomicU32::new(0),
            #[cfg(loom)]
            retired: AtomicU32::new(0),
        })
    }

    /// The entry indexing `iova` at `level`.
    #[inline]
    fn slot(&self, iova: u64, level: u32) -> &AtomicU64 {
        // The mask keeps the index below ENTRIES: no bounds panic.
        &self.entries[((iova >> entry_shift(level)) & INDEX_MASK) as usize]
    }

    /// Writer-side accounting of one more present entry.
    fn inc_live(&self) {
        // Relaxed, and a load and a store rather than a read-modify-write
        // (a locked instruction on x86): only touched under the writer
        // mutex, which orders it.
        let old = self.live.load(Ordering::Relaxed);
        debug_assert!((old as usize) < ENTRIES);
        self.live.store(old + 1, Ordering::Relaxed);
    }

    /// Writer-side accounting of one fewer present entry.
    fn dec_live(&self) {
        // Relaxed, load and store: as in `inc_live`.
        let old = self.live.load(Ordering::Relaxed);
        debug_assert!(old > 0);
        self.live.store(old.wrapping_sub(1), Ordering::Relaxed);
    }

    /// Writer-side count of present entries.
    fn live(&self) -> u32 {
        // Relaxed: only touched under the writer mutex, which orders it.
        self.live.load(Ordering::Relaxed)
    }

    /// The pointer entries, for the writer or the node's exclusive owner.
    /// The scan stops once all `live` present entries were seen, so empty
    /// and sparse nodes cost little.
    fn children(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .iter()
            // Relaxed: only writers store entries, and the caller either
            // holds the writer mutex or owns the node exclusively (after an
            // epoch grace period or through `&mut`), which orders them.
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|&entry| entry & PRESENT != 0)
            .take(self.live() as usize)
            .filter(|&entry| entry & LEAF == 0)
    }
}

/// The node a pointer entry points to.
///
/// # Safety
///
/// `entry` is a pointer entry (PRESENT set, LEAF clear) loaded from a node
/// that is reachable (or was reachable when the caller's epoch guard was
/// pinned), and the node it points to outlives the returned reference:
/// either the caller's epoch guard lives at least as long, or the caller
/// holds the writer mutex (only writers free nodes).
#[inline]
unsafe fn child<'a>(entry: u64) -> &'a Node {
    debug_assert!(entry & (PRESENT | LEAF) == PRESENT);
    let ptr = (entry & !PTR_FLAGS_MASK) as usize as *const Node;
    // SAFETY: pointer entries are only ever made from `Box::into_raw` of a
    // live node (see `TableWriter::link`), and the caller guarantees that
    // the node is not freed while the reference lives.
    unsafe { &*ptr }
}

/// Frees `node` and every node below it, at once.
///
/// # Safety
///
/// `node` came from `Box::into_raw` in `TableWriter::link` and sits at
/// `level`; it is no longer reachable from any table, no reader can still
/// hold a reference into it (a grace period has passed, or there are no
/// readers), and it is freed only once.
unsafe fn free_subtree(node: *mut Node, level: u32) {
    // SAFETY: the caller guarantees `node` is live and exclusively ours.
    let owned = unsafe { Box::from_raw(node) };
    if level > 0 {
        for entry in owned.children() {
            let ptr = (entry & !PTR_FLAGS_MASK) as usize as *mut Node;
            // SAFETY: a pointer entry of an exclusively owned node points
            // to a node that only this entry references.
            unsafe { free_subtree(ptr, level - 1) };
        }
    }
    #[cfg(loom)]
    owned.retired.store(1, Ordering::Relaxed);
    drop(owned);
}

/// Counts `node` and the nodes below it (writer side).
fn count_subtree(node: &Node, level: u32) -> usize {
    let mut count = 1;
    if level > 0 {
        for entry in node.children() {
            // SAFETY: a pointer entry of a linked node; the caller holds
            // the writer mutex, so nothing below it is freed meanwhile.
            count += count_subtree(unsafe { child(entry) }, level - 1);
        }
    }
    count
}

/// One level of a reader's walk.
enum Step<'a> {
    /// Go on with this node, one level down.
    Next(&'a Node),
    /// The walk ends here: a leaf, or nothing mapped.
    Done(Option<Leaf>),
}

/// The reader's step at `LEVEL` (a constant, so the shift and the leaf
/// size are too): loads the entry indexing `iova` in `node`.
///
/// `node` is reachable under the caller's epoch guard (the root, or a
/// node a previous step returned under the same guard).
#[inline(always)]
fn walk_step<const LEVEL: u32>(node: &Node, iova: u64) -> Step<'_> {
    // The mask keeps the index below ENTRIES: no bounds check remains.
    let index = ((iova >> entry_shift(LEVEL)) & INDEX_MASK) as usize;
    // Acquire: pairs with the Release store that published this entry
    // (`link`, `set_leaf`), so a pointer's node is seen fully initialised,
    // and a leaf comes with whatever the writer did before mapping it.
    let entry = node.entries[index].load(Ordering::Acquire);
    #[cfg(loom)]
    assert_eq!(
        node.retired.load(Ordering::Relaxed),
        0,
        "reader reached a freed node"
    );
    if entry & PRESENT == 0 {
        return Step::Done(None);
    }
    if entry & LEAF != 0 {
        let size = 1u64 << entry_shift(LEVEL);
        let offset = iova & (size - 1);
        return Step::Done(Some(Leaf {
            // Leaf addresses are aligned to the leaf size: OR, not add.
            gpa: (entry & LEAF_ADDR_MASK) | offset,
            perms: leaf_perms(entry),
            run: size - offset,
        }));
    }
    if LEVEL == 0 {
        // A pointer at the bottom level is never written.
        debug_assert!(false, "pointer entry at level 0");
        return Step::Done(None);
    }
    // SAFETY: `entry` is a pointer entry we just loaded from a node
    // reachable under the caller's guard; nodes are freed only through the
    // default epoch collector after they are unlinked, so the child stays
    // live while that guard (which outlives the walk) is pinned. The
    // returned lifetime is tied to `node`'s, itself bounded by the guard.
    Step::Next(unsafe { child(entry) })
}

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Guest-physical address `iova` translates to (in-page offset included).
    pub gpa: u64,
    /// Permissions of the leaf.
    pub perms: Perm,
    /// Bytes from `iova` to the end of the leaf holding it (4 KiB page or
    /// 2 MiB block): the translation is linear over this many bytes.
    pub run: u64,
}

/// The IOVA -> guest-physical page table of one translation domain.
pub struct IoPageTable {
    /// The top-level node; never replaced, freed by `Drop`.
    root: Box<Node>,
    /// Number of levels, root included (2..=5).
    levels: u32,
    /// Width of the IOVA space.
    iova_bits: u32,
    /// Linked nodes, root included (statistics; writer-maintained).
    nodes: AtomicUsize,
    /// Serialises writers. On a cache line of its own: every MAP and UNMAP
    /// locks it, and every lookup reads `root` and `iova_bits`.
    writer: CachePadded<Mutex<()>>,
}

impl IoPageTable {
    /// An empty table translating `iova_bits`-bit IOVAs.
    ///
    /// Panics only on a programming error (bits outside MIN..=MAX); callers validate.
    pub fn new(iova_bits: u32) -> IoPageTable {
        assert!(
            (MIN_IOVA_BITS..=MAX_IOVA_BITS).contains(&iova_bits),
            "IOVA width {iova_bits} outside {MIN_IOVA_BITS}..={MAX_IOVA_BITS}"
        );
        // At least two levels, so that even the narrowest table has a level
        // whose entries are 2 MiB leaves (its top level has one entry).
        let levels = (iova_bits - PAGE_SHIFT)
            .div_ceil(LEVEL_BITS)
            .max(HUGE_LEVEL + 1);
        IoPageTable {
            root: Node::new(),
            levels,
            iova_bits,
            nodes: AtomicUsize::new(1),
            writer: CachePadded::new(Mutex::new(())),
        }
    }

    /// Width of the IOVA space in bits.
    pub fn iova_bits(&self) -> u32 {
        self.iova_bits
    }

    /// Translates `iova`. Lock-free and wait-free.
    ///
    /// `guard` ([`epoch::pin`]) keeps the nodes the walk passes through
    /// from being freed; its type is pvdma's own, so it cannot be a guard
    /// of another collector. The result holds no reference into the table.
    ///
    /// Returns None when `iova >= 2^iova_bits` or nothing is mapped there.
    ///
    /// Always inlined: it is the read path's core, and a call would cost
    /// a sizeable part of it.
    #[inline(always)]
    pub fn lookup(&self, iova: u64, guard: &Guard) -> Option<Leaf> {
        // Not read: holding it while the walk runs is what it is for.
        let _ = guard;
        // iova_bits <= 57, so the shift is in range.
        if iova >> self.iova_bits != 0 {
            return None;
        }
        // The walk is unrolled, one step per level with its shift a
        // constant, entered at the table's top level (levels is 2..=5: a
        // table has at least the levels 1 and 0).
        let levels = self.levels;
        let mut node: &Node = &self.root;
        macro_rules! step {
            ($level:literal) => {
                match walk_step::<$level>(node, iova) {
                    Step::Next(next) => node = next,
                    Step::Done(found) => return found,
                }
            };
        }
        if levels > 4 {
            step!(4);
        }
        if levels > 3 {
            step!(3);
        }
        if levels > 2 {
            step!(2);
        }
        step!(1);
        match walk_step::<0>(node, iova) {
            Step::Done(found) => found,
            Step::Next(_) => unreachable!("level 0 never steps down"),
        }
    }

    /// Takes the writer lock. Readers are never blocked by it.
    pub fn lock(&self) -> TableWriter<'_> {
        TableWriter {
            table: self,
            _guard: self.writer.lock(),
        }
    }

    /// Number of nodes currently linked, the root included (so an empty
    /// table has 1).
    pub fn node_count(&self) -> usize {
        // Relaxed: a statistic; writers update it under the mutex.
        self.nodes.load(Ordering::Relaxed)
    }

    /// Clips `[iova, iova + len)` to page boundaries inside the table; None
    /// when nothing is left.
    fn clip(&self, iova: u64, len: u64) -> Option<(u64, u64)> {
        let limit = 1u64 << self.iova_bits;
        let start = iova & !PAGE_MASK;
        // Clipped to the table before rounding up (`limit` <= 2^57), so a
        // range ending at or within a page of 2^64 cannot overflow; one
        // that would wrap is taken to end at 2^64.
        let end = iova.saturating_add(len).min(limit);
        let end = (end + PAGE_MASK) & !PAGE_MASK;
        (start < end).then_some((start, end))
    }
}

impl Drop for IoPageTable {
    fn drop(&mut self) {
        let level = self.levels - 1;
        // `&mut self`: no reader or writer is left.
        for entry in self.root.children() {
            let ptr = (entry & !PTR_FLAGS_MASK) as usize as *mut Node;
            // SAFETY: the subtree hangs only off this root entry, and
            // `&mut self` proves no reader can reach it any more. Nodes
            // unlinked earlier are not reachable from here: they belong to
            // the epoch collector.
            unsafe { free_subtree(ptr, level - 1) };
        }
    }
}

/// Exclusive write access to an [`IoPageTable`].
pub struct TableWriter<'a> {
    table: &'a IoPageTable,
    _guard: MutexGuard<'a, ()>,
}

impl TableWriter<'_> {
    /// The level-0 node whose entries hold the 4 KiB leaves of the page
    /// range `[start, end)` (page aligned, non-empty, inside the table),
    /// when the range lies in one 2 MiB block and the path to that node
    /// exists: pointer entries all the way down, no 2 MiB leaf on it.
    ///
    /// The fast paths of `nodes_needed`, `map` and `unmap` use it: the
    /// usual request maps or unmaps a few pages next to live mappings, and
    /// then the recursive descent (with its per-level range arithmetic and,
    /// for `unmap`, an epoch pin) is a handful of loads.
    #[inline]
    fn leaf_node(&self, start: u64, end: u64) -> Option<&Node> {
        if start >> HUGE_SHIFT != (end - 1) >> HUGE_SHIFT {
            return None;
        }
        let mut node: &Node = &self.table.root;
        let mut level = self.table.levels - 1;
        while level > 0 {
            // Relaxed: only writers store entries, and we hold the mutex.
            let entry = node.slot(start, level).load(Ordering::Relaxed);
            if entry & (PRESENT | LEAF) != PRESENT {
                return None;
            }
            // SAFETY: a pointer entry (PRESENT set, LEAF clear) of a linked
            // node; we hold the mutex, and only writers free nodes.
            node = unsafe { child(entry) };
            level -= 1;
        }
        Some(node)
    }

    /// The level-0 entries of `[start, end)` in `node` (from
    /// [`TableWriter::leaf_node`]).
    #[inline]
    fn leaf_slots(node: &Node, start: u64, end: u64) -> &[AtomicU64] {
        let first = ((start >> PAGE_SHIFT) & INDEX_MASK) as usize;
        let n = ((end - start) >> PAGE_SHIFT) as usize;
        // In one 2 MiB block: first + n <= ENTRIES.
        &node.entries[first..first + n]
    }

    /// Maps [iova, iova+len) linearly onto [gpa, gpa+len) with `perms`.
    ///
    /// iova, gpa, len are page aligned, len > 0, the range lies below
    /// 2^iova_bits and is currently unmapped (the caller guarantees all of
    /// this). Uses a 2 MiB leaf for every 2 MiB IOVA block that lies wholly
    /// inside the range when the matching gpa is 2 MiB aligned too; 4 KiB
    /// leaves elsewhere.
    ///
    /// Should the caller break its promises anyway (debug builds assert),
    /// the range is clipped to the table and rounded to pages, and existing
    /// leaves are overwritten (a 2 MiB leaf is first split into 4 KiB ones).
    pub fn map(&mut self, iova: u64, gpa: u64, len: u64, perms: Perm) {
        debug_assert!(iova & PAGE_MASK == 0, "unaligned iova {iova:#x}");
        debug_assert!(gpa & PAGE_MASK == 0, "unaligned gpa {gpa:#x}");
        debug_assert!(len > 0 && len & PAGE_MASK == 0, "bad length {len:#x}");
        debug_assert!(
            iova.checked_add(len)
                .is_some_and(|end| end <= 1 << self.table.iova_bits),
            "range {iova:#x}+{len:#x} outside the table"
        );
        debug_assert!(gpa.checked_add(len).is_some(), "gpa {gpa:#x} overflows");
        let Some((start, end)) = self.table.clip(iova, len) else {
            return;
        };
        if let Some(node) = self.leaf_node(start, end) {
            // 4 KiB leaves into a node that exists: what `map_in` would do
            // (it never puts a 2 MiB leaf where a node is linked).
            let gpa = gpa & !PAGE_MASK;
            for (i, slot) in Self::leaf_slots(node, start, end).iter().enumerate() {
                // Relaxed: only writers store entries, and we hold the mutex.
                let entry = slot.load(Ordering::Relaxed);
                debug_assert!(entry == 0, "map over a mapped iova");
                if entry == 0 {
                    node.inc_live();
                }
                self.set_leaf(slot, gpa + ((i as u64) << PAGE_SHIFT), perms, 0);
            }
            return;
        }
        // gpa = iova + delta, modulo 2^64 (no overflow by the caller's promise).
        let delta = gpa.wrapping_sub(iova);
        let top = self.table.levels - 1;
        self.map_in(&self.table.root, top, start, end, delta, perms);
    }

    /// An upper bound on the nodes a [`TableWriter::map`] of `[iova, iova +
    /// len)` adds to the table as it is now: every node on the range's path
    /// that does not exist yet (counted even where a 2 MiB leaf would make
    /// a 4 KiB-leaf node unnecessary); `None` when a leaf already lies in
    /// the range. Memory accounting reserves this much before a MAP, under
    /// the same lock, and a FIXED MAP learns from the same descent whether
    /// its range is free.
    pub fn nodes_needed(&self, iova: u64, len: u64) -> Option<u64> {
        let Some((start, end)) = self.table.clip(iova, len) else {
            return Some(0);
        };
        if let Some(node) = self.leaf_node(start, end) {
            // Relaxed: only writers store entries, and we hold the mutex.
            let free = Self::leaf_slots(node, start, end)
                .iter()
                .all(|slot| slot.load(Ordering::Relaxed) == 0);
            return free.then_some(0);
        }
        self.needed_in(&self.table.root, self.table.levels - 1, start, end)
    }

    fn needed_in(&self, node: &Node, level: u32, start: u64, end: u64) -> Option<u64> {
        let size = 1u64 << entry_shift(level);
        let mut lo = start & !(size - 1);
        let mut needed = 0;
        while lo < end {
            // `end <= 2^57`, so these never overflow.
            let hi = lo + size;
            let (sub_start, sub_end) = (start.max(lo), end.min(hi));
            // Relaxed: only writers store entries, and we hold the mutex.
            let entry = node.slot(lo, level).load(Ordering::Relaxed);
            if entry & LEAF != 0 {
                return None;
            }
            if entry & PRESENT != 0 {
                // SAFETY: a pointer entry (never at level 0) of a linked
                // node; we hold the mutex, and only writers free nodes.
                needed += self.needed_in(unsafe { child(entry) }, level - 1, sub_start, sub_end)?;
            } else {
                // Empty: a new subtree, one node per node-sized block the
                // range touches at each level below this one.
                needed += (0..level)
                    .map(|l| {
                        let shift = entry_shift(l + 1);
                        ((sub_end - 1) >> shift) - (sub_start >> shift) + 1
                    })
                    .sum::<u64>();
            }
            lo = hi;
        }
        Some(needed)
    }

    /// Whether a leaf covers IOVA page number `page` (a page inside a 2 MiB
    /// leaf counts): one descent, no epoch pin.
    pub fn is_mapped_page(&self, page: u64) -> bool {
        if page >> (self.table.iova_bits - PAGE_SHIFT) != 0 {
            return false;
        }
        let iova = page << PAGE_SHIFT;
        let mut node: &Node = &self.table.root;
        let mut level = self.table.levels - 1;
        loop {
            // Relaxed: only writers store entries, and we hold the mutex.
            let entry = node.slot(iova, level).load(Ordering::Relaxed);
            if entry & PRESENT == 0 || level == 0 {
                return entry & PRESENT != 0;
            }
            if entry & LEAF != 0 {
                return true;
            }
            // SAFETY: a pointer entry (PRESENT set, LEAF clear) of a linked
            // node; we hold the mutex, and only writers free nodes.
            node = unsafe { child(entry) };
            level -= 1;
        }
    }

    /// The first page address at or above `from` and below `end` that a
    /// leaf covers (a page inside a 2 MiB leaf counts), if any. Empty
    /// subtrees are skipped whole, so a scan over a sparse range costs the
    /// nodes it passes through, not its pages.
    pub fn next_mapped(&self, from: u64, end: u64) -> Option<u64> {
        let (start, end) = self.table.clip(from, end.checked_sub(from)?)?;
        self.next_in(&self.table.root, self.table.levels - 1, start, end)
    }

    fn next_in(&self, node: &Node, level: u32, start: u64, end: u64) -> Option<u64> {
        let size = 1u64 << entry_shift(level);
        let mut lo = start & !(size - 1);
        while lo < end {
            // `end <= 2^57`, so this never overflows.
            let hi = lo + size;
            // Relaxed: only writers store entries, and we hold the mutex.
            let entry = node.slot(lo, level).load(Ordering::Relaxed);
            if entry & PRESENT != 0 {
                let from = start.max(lo);
                if entry & LEAF != 0 {
                    return Some(from);
                }
                // SAFETY: a pointer entry of a linked node; we hold the
                // mutex, and only writers free nodes.
                let next = unsafe { child(entry) };
                if let Some(found) = self.next_in(next, level - 1, from, end.min(hi)) {
                    return Some(found);
                }
            }
            lo = hi;
        }
        None
    }

    /// Removes every leaf in [iova, iova+len) (page aligned).
    ///
    /// The caller never cuts through a 2 MiB leaf; if it happens anyway the
    /// whole 2 MiB leaf goes (debug builds assert). Nodes left empty are
    /// unlinked and freed once every reader that could see them is done.
    /// After `unmap` returns, no lookup that starts afterwards sees the
    /// removed leaves.
    pub fn unmap(&mut self, iova: u64, len: u64) {
        debug_assert!(
            iova & PAGE_MASK == 0 && len & PAGE_MASK == 0,
            "unaligned unmap {iova:#x}+{len:#x}"
        );
        let Some((start, end)) = self.table.clip(iova, len) else {
            return;
        };
        if let Some(node) = self.leaf_node(start, end) {
            let slots = Self::leaf_slots(node, start, end);
            // Relaxed: only writers store entries, and we hold the mutex.
            let present = slots
                .iter()
                .filter(|slot| slot.load(Ordering::Relaxed) != 0)
                .count() as u32;
            // A node left empty is unlinked and freed: the general path.
            if present < node.live() {
                for slot in slots {
                    // Relaxed load: as above. Release store: as in `unmap_in`.
                    if slot.load(Ordering::Relaxed) != 0 {
                        slot.store(0, Ordering::Release);
                        node.dec_live();
                    }
                }
                return;
            }
        }
        let guard = epoch::pin();
        let top = self.table.levels - 1;
        let freed = self.unmap_in(&self.table.root, top, start, end, &guard);
        if freed {
            // Hand the garbage to the global queue now, so that it is
            // reclaimed soon even if this thread does not pin again.
            guard.flush();
        }
    }

    /// Removes every leaf and frees every node except the root (deferred).
    pub fn clear(&mut self) {
        self.unmap(0, 1 << self.table.iova_bits);
    }

    /// Maps `[start, end)` (inside `node`'s span, page aligned, non-empty)
    /// at `gpa = iova + delta`.
    fn map_in(&self, node: &Node, level: u32, start: u64, end: u64, delta: u64, perms: Perm) {
        let shift = entry_shift(level);
        let size = 1u64 << shift;
        let mut lo = start & !(size - 1);
        while lo < end {
            // `end <= 2^57`, so these never overflow.
            let hi = lo + size;
            let sub_start = start.max(lo);
            let sub_end = end.min(hi);
            let slot = node.slot(lo, level);
            // Relaxed: only writers store entries, and we hold the mutex.
            let entry = slot.load(Ordering::Relaxed);
            let whole = sub_start == lo && sub_end == hi;
            let huge_ok = level == HUGE_LEVEL && whole && lo.wrapping_add(delta) & (size - 1) == 0;
            // A pointer in the way of a 2 MiB leaf (caller bug): map the
            // block with 4 KiB leaves below it instead.
            if level == 0 || (huge_ok && entry & (PRESENT | LEAF) != PRESENT) {
                debug_assert!(entry == 0, "map over a mapped iova {lo:#x}");
                if entry == 0 {
                    node.inc_live();
                }
                self.set_leaf(slot, lo.wrapping_add(delta), perms, level);
            } else {
                let next = if entry & PRESENT == 0 {
                    node.inc_live();
                    self.link(slot, Node::new())
                } else if entry & LEAF != 0 {
                    debug_assert!(false, "map over a mapped 2 MiB leaf at {lo:#x}");
                    self.split(slot, entry, level)
                } else {
                    // SAFETY: a pointer entry of a linked node; we hold the
                    // mutex, and only writers free nodes.
                    unsafe { child(entry) }
                };
                self.map_in(next, level - 1, sub_start, sub_end, delta, perms);
            }
            lo = hi;
        }
    }

    /// Stores a leaf for `gpa` into `slot`.
    fn set_leaf(&self, slot: &AtomicU64, gpa: u64, perms: Perm, level: u32) {
        // Release: pairs with the Acquire load in `lookup`, so a reader that
        // sees the leaf also sees what the writer did before mapping it
        // (e.g. pinning the guest page).
        slot.store(leaf_entry(gpa, perms, level), Ordering::Release);
    }

    /// Publishes the fully initialised `new` into `slot` and returns it.
    fn link(&self, slot: &AtomicU64, new: Box<Node>) -> &Node {
        let ptr = Box::into_raw(new);
        // Release: pairs with the Acquire load in `lookup`, so a reader that
        // follows the pointer sees the node's initialised entries.
        slot.store(ptr as usize as u64 | PRESENT, Ordering::Release);
        // Relaxed: a statistic, updated under the mutex.
        self.table.nodes.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from `Box::into_raw` just now and is linked;
        // only writers free nodes and we hold the mutex.
        unsafe { &*ptr }
    }

    /// Replaces the leaf `entry` at `level` in `slot` by a node of
    /// next-level leaves with the same translation; returns the new node.
    fn split(&self, slot: &AtomicU64, entry: u64, level: u32) -> &Node {
        let new = Node::new();
        let base = entry & LEAF_ADDR_MASK;
        let step = 1u64 << entry_shift(level - 1);
        let perms = leaf_perms(entry);
        for (i, e) in new.entries.iter().enumerate() {
            let gpa = base.wrapping_add(step * i as u64);
            // Relaxed: the node is not published yet; `link` releases it.
            e.store(leaf_entry(gpa, perms, level - 1), Ordering::Relaxed);
        }
        // Relaxed: the node is not published yet.
        new.live.store(ENTRIES as u32, Ordering::Relaxed);
        self.link(slot, new)
    }

    /// Removes the leaves in `[start, end)` (inside `node`'s span, page
    /// aligned, non-empty) below `node`; returns whether a node was freed.
    fn unmap_in(&self, node: &Node, level: u32, start: u64, end: u64, guard: &Guard) -> bool {
        let shift = entry_shift(level);
        let size = 1u64 << shift;
        let mut freed = false;
        let mut lo = start & !(size - 1);
        while lo < end {
            let hi = lo + size;
            let slot = node.slot(lo, level);
            // Relaxed: only writers store entries, and we hold the mutex.
            let entry = slot.load(Ordering::Relaxed);
            let whole = start <= lo && hi <= end;
            if entry & PRESENT == 0 {
                // Nothing here.
            } else if entry & LEAF != 0 {
                debug_assert!(whole, "unmap cuts through the 2 MiB leaf at {lo:#x}");
                // Release: like every entry store (see `set_leaf`); what
                // keeps readers away from the old leaf is only coherence.
                slot.store(0, Ordering::Release);
                node.dec_live();
            } else {
                // SAFETY: a pointer entry of a linked node; we hold the
                // mutex, and only writers free nodes.
                let next = unsafe { child(entry) };
                let unlinked = if whole {
                    // The whole subtree goes: readers that already hold it
                    // may still see its old leaves, later ones cannot reach
                    // it, so its entries need not be cleared one by one.
                    count_subtree(next, level - 1)
                } else {
                    freed |= self.unmap_in(next, level - 1, start.max(lo), end.min(hi), guard);
                    if next.live() == 0 {
                        1
                    } else {
                        0
                    }
                };
                if unlinked > 0 {
                    // Release: as above. The epoch collector does the rest:
                    // this store precedes `defer_unchecked`, which stamps
                    // the garbage with the epoch after a SeqCst fence, and
                    // a reader that pins later reads the entry after its
                    // own SeqCst fence, so it sees 0 (or a newer node).
                    slot.store(0, Ordering::Release);
                    node.dec_live();
                    // Relaxed: a statistic, updated under the mutex.
                    self.table.nodes.fetch_sub(unlinked, Ordering::Relaxed);
                    let ptr = next as *const Node as *mut Node;
                    let child_level = level - 1;
                    // SAFETY: the subtree was just unlinked from its only
                    // parent entry and no writer touches it again; the
                    // closure runs once, on any thread, after every reader
                    // pinned while it was reachable has unpinned (readers
                    // pin on the default collector, as `guard` does).
                    unsafe { guard.defer_unchecked(move || free_subtree(ptr, child_level)) };
                    freed = true;
                }
            }
            lo = hi;
        }
        freed
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::types::PAGE_SIZE;
    use std::collections::{BTreeMap, BTreeSet};

    const MIB: u64 = 1 << 20;

    fn look(table: &IoPageTable, iova: u64) -> Option<Leaf> {
        table.lookup(iova, &epoch::pin())
    }

    fn map(table: &IoPageTable, iova: u64, gpa: u64, len: u64, perms: Perm) {
        table.lock().map(iova, gpa, len, perms);
    }

    fn unmap(table: &IoPageTable, iova: u64, len: u64) {
        table.lock().unmap(iova, len);
    }

    /// Nodes a table of `levels` levels needs for `leaves` (iova, level):
    /// the root plus one node per distinct prefix above each leaf.
    fn expected_nodes(levels: u32, leaves: &[(u64, u32)]) -> usize {
        let mut nodes = BTreeSet::new();
        for &(iova, leaf_level) in leaves {
            for level in leaf_level..levels - 1 {
                nodes.insert((level, iova >> entry_shift(level + 1)));
            }
        }
        nodes.len() + 1
    }

    #[test]
    fn table_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<IoPageTable>();
    }

    #[test]
    fn levels_follow_the_width() {
        let levels = |bits| IoPageTable::new(bits).levels;
        assert_eq!(levels(MIN_IOVA_BITS), 2); // one-entry top level
        assert_eq!(levels(30), 2);
        assert_eq!(levels(31), 3);
        assert_eq!(levels(39), 3);
        assert_eq!(levels(48), 4);
        assert_eq!(levels(MAX_IOVA_BITS), 5);
        assert_eq!(IoPageTable::new(40).iova_bits(), 40);
        assert_eq!(IoPageTable::new(40).node_count(), 1);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn new_rejects_a_too_wide_table() {
        IoPageTable::new(MAX_IOVA_BITS + 1);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn new_rejects_a_too_narrow_table() {
        IoPageTable::new(MIN_IOVA_BITS - 1);
    }

    #[test]
    fn single_page_translates_with_offset_and_run() {
        let t = IoPageTable::new(39);
        assert_eq!(look(&t, 0x1000), None);
        map(&t, 0x1000, 0x5000_0000, PAGE_SIZE, Perm::RW);
        let hit = |gpa, run| {
            Some(Leaf {
                gpa,
                perms: Perm::RW,
                run,
            })
        };
        assert_eq!(look(&t, 0x1000), hit(0x5000_0000, 4096));
        assert_eq!(look(&t, 0x1234), hit(0x5000_0234, 4096 - 0x234));
        assert_eq!(look(&t, 0x1fff), hit(0x5000_0fff, 1));
        assert_eq!(look(&t, 0x0fff), None);
        assert_eq!(look(&t, 0x2000), None);
        // Same index bits, different upper bits: must not alias.
        assert_eq!(look(&t, 0x1000 + (1 << 30)), None);
        assert_eq!(t.node_count(), 3);
    }

    #[test]
    fn runs_of_pages_keep_gpa_and_perms() {
        let t = IoPageTable::new(48);
        map(&t, 0x10_0000, 0x7000_0000, 16 * PAGE_SIZE, Perm::READ);
        map(&t, 0x20_0000, 0x9000_3000, 3 * PAGE_SIZE, Perm::WRITE);
        map(&t, 0x30_0000, 0xa000_0000, PAGE_SIZE, Perm::NONE);
        for i in 0..16 {
            let leaf = look(&t, 0x10_0000 + i * PAGE_SIZE + 8).unwrap();
            assert_eq!(leaf.gpa, 0x7000_0000 + i * PAGE_SIZE + 8);
            assert_eq!(leaf.perms, Perm::READ);
            assert_eq!(leaf.run, PAGE_SIZE - 8);
        }
        assert_eq!(look(&t, 0x10_0000 + 16 * PAGE_SIZE), None);
        let leaf = look(&t, 0x20_2000).unwrap();
        assert_eq!((leaf.gpa, leaf.perms), (0x9000_5000, Perm::WRITE));
        let leaf = look(&t, 0x30_0010).unwrap();
        assert_eq!((leaf.gpa, leaf.perms), (0xa000_0010, Perm::NONE));
        assert_eq!(look(&t, 0x20_3000), None);
    }

    #[test]
    fn out_of_range_iovas_miss() {
        for bits in [MIN_IOVA_BITS, 32, 39, 48, MAX_IOVA_BITS] {
            let t = IoPageTable::new(bits);
            let last = (1u64 << bits) - PAGE_SIZE;
            map(&t, 0, 0x1000_0000, PAGE_SIZE, Perm::RW);
            map(&t, last, 0x2000_0000, PAGE_SIZE, Perm::RW);
            assert_eq!(look(&t, last + 5).unwrap().gpa, 0x2000_0005, "bits {bits}");
            assert_eq!(look(&t, 7).unwrap().gpa, 0x1000_0007, "bits {bits}");
            for iova in [1u64 << bits, (1 << bits) + 7, last + (1 << bits), u64::MAX] {
                assert_eq!(look(&t, iova), None, "bits {bits} iova {iova:#x}");
            }
            for shift in bits..64 {
                assert_eq!(look(&t, 1 << shift), None, "bits {bits} 1<<{shift}");
            }
        }
    }

    #[test]
    fn huge_leaf_only_when_block_covered_and_gpa_aligned() {
        let base = 0x4000_0000;
        // Both aligned, two whole blocks: two 2 MiB leaves, no leaf table.
        let t = IoPageTable::new(48);
        map(&t, base, 0x8000_0000, 4 * MIB, Perm::RW);
        let leaf = look(&t, base + 0x1234).unwrap();
        assert_eq!((leaf.gpa, leaf.run), (0x8000_1234, HUGE_SIZE - 0x1234));
        let leaf = look(&t, base + 3 * MIB).unwrap();
        assert_eq!((leaf.gpa, leaf.run), (0x8030_0000, MIB));
        assert_eq!(t.node_count(), 3);
        assert_eq!(look(&t, base + 4 * MIB), None);

        // gpa not 2 MiB aligned: 4 KiB leaves in two leaf tables.
        let t = IoPageTable::new(48);
        map(&t, base, 0x8000_1000, 4 * MIB, Perm::RW);
        let leaf = look(&t, base + 0x1234).unwrap();
        assert_eq!((leaf.gpa, leaf.run), (0x8000_2234, PAGE_SIZE - 0x234));
        assert_eq!(t.node_count(), 5);

        // Block not wholly covered: 4 KiB leaves.
        let t = IoPageTable::new(48);
        map(&t, base, 0x8000_0000, HUGE_SIZE - PAGE_SIZE, Perm::RW);
        assert_eq!(look(&t, base).unwrap().run, PAGE_SIZE);
        assert_eq!(look(&t, base + HUGE_SIZE - PAGE_SIZE), None);
        assert_eq!(t.node_count(), 4);

        // Exactly one block.
        let t = IoPageTable::new(48);
        map(&t, base, 0x8000_0000, HUGE_SIZE, Perm::READ);
        let leaf = look(&t, base + HUGE_SIZE - 1).unwrap();
        assert_eq!(
            (leaf.gpa, leaf.run, leaf.perms),
            (0x801f_ffff, 1, Perm::READ)
        );
        assert_eq!(t.node_count(), 3);
    }

    #[test]
    fn mixed_range_uses_head_huge_middle_and_tail() {
        let t = IoPageTable::new(39);
        // iova and gpa share their offset within 2 MiB, so the one block
        // wholly inside the range gets a 2 MiB leaf.
        let (iova, gpa) = (0x4000_1000, 0x8000_1000);
        let len = 4 * MIB;
        map(&t, iova, gpa, len, Perm::RW);
        let head = look(&t, iova).unwrap();
        assert_eq!((head.gpa, head.run), (gpa, PAGE_SIZE));
        let last_head = look(&t, 0x401f_f000).unwrap();
        assert_eq!((last_head.gpa, last_head.run), (0x801f_f000, PAGE_SIZE));
        let middle = look(&t, 0x4020_0000).unwrap();
        assert_eq!((middle.gpa, middle.run), (0x8020_0000, HUGE_SIZE));
        let tail = look(&t, 0x4040_0000).unwrap();
        assert_eq!((tail.gpa, tail.run), (0x8040_0000, PAGE_SIZE));
        assert_eq!(look(&t, iova + len), None);
        assert_eq!(look(&t, iova - PAGE_SIZE), None);
        // root + level-1 node + two leaf tables (head and tail).
        assert_eq!(t.node_count(), 4);
        unmap(&t, iova, len);
        assert_eq!(t.node_count(), 1);
        assert_eq!(look(&t, 0x4020_0000), None);
    }

    #[test]
    fn unmap_removes_exactly_the_range() {
        let t = IoPageTable::new(39);
        map(&t, 0x10_0000, 0x100_0000, 8 * PAGE_SIZE, Perm::RW);
        unmap(&t, 0x10_2000, 2 * PAGE_SIZE);
        for i in 0..8 {
            let iova = 0x10_0000 + i * PAGE_SIZE;
            let found = look(&t, iova).map(|l| l.gpa);
            if i == 2 || i == 3 {
                assert_eq!(found, None, "page {i}");
            } else {
                assert_eq!(found, Some(0x100_0000 + i * PAGE_SIZE), "page {i}");
            }
        }
        // Unmapping nothing mapped, or beyond the table, is harmless.
        unmap(&t, 0x7000_0000, 4 * MIB);
        unmap(&t, 0x10_2000, PAGE_SIZE);
        assert_eq!(look(&t, 0x10_1000).unwrap().gpa, 0x100_1000);
        assert_eq!(t.node_count(), 3);
        unmap(&t, 0x10_0000, 8 * PAGE_SIZE);
        assert_eq!(t.node_count(), 1);
        // The freed iovas can be mapped again.
        map(&t, 0x10_2000, 0x300_0000, PAGE_SIZE, Perm::READ);
        assert_eq!(look(&t, 0x10_2000).unwrap().gpa, 0x300_0000);
    }

    #[test]
    fn empty_nodes_are_reclaimed_at_every_width() {
        for bits in [MIN_IOVA_BITS, 32, 39, 48, MAX_IOVA_BITS] {
            let t = IoPageTable::new(bits);
            let levels = t.levels;
            let top = 1u64 << bits;
            let huge_iova = (top / 2) & !(HUGE_SIZE - 1);
            // (iova, gpa, len) with the leaves they make.
            let mut ranges = vec![
                (0, 0x10_0000, 3 * PAGE_SIZE),
                (top - 2 * PAGE_SIZE, 0x20_0000, 2 * PAGE_SIZE),
            ];
            let mut leaves = vec![(0, 0), (top - PAGE_SIZE, 0)];
            // The narrowest table is a single 2 MiB block, already in use.
            if bits > MIN_IOVA_BITS {
                ranges.push((huge_iova, 0x4000_0000, HUGE_SIZE));
                leaves.push((huge_iova, 1));
            }
            for &(iova, gpa, len) in &ranges {
                map(&t, iova, gpa, len, Perm::RW);
            }
            assert_eq!(
                t.node_count(),
                expected_nodes(levels, &leaves),
                "bits {bits}"
            );
            for (i, &(iova, gpa, len)) in ranges.iter().enumerate().rev() {
                assert_eq!(look(&t, iova + len - 1).unwrap().gpa, gpa + len - 1);
                unmap(&t, iova, len);
                leaves.remove(i);
                assert_eq!(look(&t, iova), None);
                assert_eq!(
                    t.node_count(),
                    expected_nodes(levels, &leaves),
                    "bits {bits}"
                );
            }
            assert_eq!(t.node_count(), 1, "bits {bits}");

            // clear() frees everything but the root in one go.
            for &(iova, gpa, len) in &ranges {
                map(&t, iova, gpa, len, Perm::RW);
            }
            assert!(t.node_count() > 1);
            t.lock().clear();
            assert_eq!(t.node_count(), 1, "bits {bits}");
            for &(iova, _, len) in &ranges {
                assert_eq!(look(&t, iova), None);
                assert_eq!(look(&t, iova + len - 1), None);
            }
        }
    }

    #[test]
    fn next_mapped_finds_the_first_covered_page_past_empty_subtrees() {
        const GIB: u64 = 1 << 30;
        let t = IoPageTable::new(48);
        let w = t.lock();
        assert_eq!(w.next_mapped(0, 1 << 48), None);
        drop(w);
        // A 4 KiB page far up, a 2 MiB leaf further up still.
        map(&t, 7 * GIB + 0x3000, 0x10_0000, PAGE_SIZE, Perm::READ);
        map(&t, 9 * GIB, 0x4000_0000, HUGE_SIZE, Perm::RW);
        assert!(look(&t, 9 * GIB).is_some_and(|l| l.run == HUGE_SIZE));
        let w = t.lock();
        assert_eq!(w.next_mapped(0, 1 << 48), Some(7 * GIB + 0x3000));
        assert_eq!(
            w.next_mapped(7 * GIB + 0x3000, 1 << 48),
            Some(7 * GIB + 0x3000)
        );
        assert_eq!(w.next_mapped(7 * GIB + 0x4000, 1 << 48), Some(9 * GIB));
        // Inside the 2 MiB leaf: the page asked from.
        assert_eq!(
            w.next_mapped(9 * GIB + 0x5000, 1 << 48),
            Some(9 * GIB + 0x5000)
        );
        // `end` is exclusive; empty and reversed ranges find nothing.
        assert_eq!(w.next_mapped(0, 7 * GIB + 0x3000), None);
        assert_eq!(w.next_mapped(9 * GIB, 9 * GIB), None);
        assert_eq!(w.next_mapped(9 * GIB + 1, 9 * GIB), None);
        assert_eq!(w.next_mapped(9 * GIB + HUGE_SIZE, u64::MAX), None);
    }

    /// Ranges that end at 2^64, or within a page of it, reach the top of
    /// the table: nothing overflows while rounding them to pages.
    #[test]
    fn ranges_ending_near_2_pow_64_reach_the_table() {
        let t = IoPageTable::new(48);
        let top = (1u64 << 48) - PAGE_SIZE;
        map(&t, 0x5000, 0x9000, PAGE_SIZE, Perm::RW);
        map(&t, top, 0xa000, PAGE_SIZE, Perm::RW);
        let w = t.lock();
        for end in [u64::MAX, u64::MAX - 1, u64::MAX - PAGE_MASK + 1] {
            assert_eq!(w.next_mapped(0, end), Some(0x5000), "end {end:#x}");
            assert_eq!(w.next_mapped(0x6000, end), Some(top), "end {end:#x}");
            assert_eq!(w.next_mapped(u64::MAX - PAGE_SIZE, end), None);
        }
        assert!(w.is_mapped_page(top >> PAGE_SHIFT));
        assert!(!w.is_mapped_page(u64::MAX >> PAGE_SHIFT));
        drop(w);
        // [top, 2^64): its length is 2^64 - top.
        unmap(&t, top, top.wrapping_neg());
        assert_eq!(look(&t, top), None);
        assert_eq!(look(&t, 0x5000).map(|l| l.gpa), Some(0x9000));
    }

    #[test]
    fn unmapping_a_whole_subtree_frees_it_at_once() {
        let t = IoPageTable::new(48);
        // 1 GiB of 4 KiB leaves would be slow to build; 8 leaf tables in
        // two level-1 nodes are enough to exercise whole-subtree removal.
        for i in 0..4u64 {
            map(
                &t,
                i * HUGE_SIZE,
                0x1000 + i * HUGE_SIZE,
                2 * PAGE_SIZE,
                Perm::RW,
            );
            let far = (1 << 30) + i * HUGE_SIZE;
            map(&t, far, 0x1000 + far, PAGE_SIZE, Perm::RW);
        }
        assert_eq!(t.node_count(), 1 + 1 + 2 + 8);
        // Cuts into the first level-1 node only partially.
        unmap(&t, HUGE_SIZE, (1 << 30) + HUGE_SIZE);
        assert_eq!(look(&t, 0).unwrap().gpa, 0x1000);
        assert_eq!(look(&t, HUGE_SIZE), None);
        assert_eq!(look(&t, 1 << 30), None);
        assert_eq!(look(&t, (1 << 30) + 2 * HUGE_SIZE).unwrap().run, PAGE_SIZE);
        assert_eq!(t.node_count(), 1 + 1 + 2 + 3);
        unmap(&t, 0, 1 << 48);
        assert_eq!(t.node_count(), 1);
    }

    #[test]
    fn dropping_a_populated_table_frees_it() {
        let t = IoPageTable::new(MAX_IOVA_BITS);
        map(&t, 0, 0, 4 * MIB + PAGE_SIZE, Perm::RW);
        map(&t, (1 << 56) + HUGE_SIZE, HUGE_SIZE, HUGE_SIZE, Perm::RW);
        // Some nodes are already with the collector, some still linked.
        unmap(&t, 4 * MIB, PAGE_SIZE);
        drop(t);
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "cuts through"))]
    fn unmap_through_a_huge_leaf_removes_all_of_it() {
        let t = IoPageTable::new(39);
        map(&t, 0, 0, HUGE_SIZE, Perm::RW);
        unmap(&t, PAGE_SIZE, PAGE_SIZE);
        assert_eq!(look(&t, 0), None);
        assert_eq!(look(&t, HUGE_SIZE - 1), None);
    }

    #[test]
    fn nodes_needed_is_exact_for_4k_leaves_and_an_upper_bound_else() {
        let t = IoPageTable::new(48);
        let mut mapped = BTreeSet::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            // xorshift64: deterministic, no dependency.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..400 {
            // Clustered and far-apart ranges, 1 page to 4 MiB.
            let region = (next() % 4) << 39;
            let page = region | ((next() % 4096) << PAGE_SHIFT);
            let len = (1 + next() % 1024) << PAGE_SHIFT;
            if (page..page + len)
                .step_by(PAGE_SIZE as usize)
                .any(|p| mapped.contains(&p))
            {
                assert_eq!(t.lock().nodes_needed(page, len), None, "{page:#x}+{len:#x}");
                continue;
            }
            // Odd pages: the gpa is never 2 MiB aligned, so no 2 MiB leaf.
            let huge_possible = i % 3 == 0;
            let gpa = if huge_possible {
                page
            } else {
                page + PAGE_SIZE
            };
            let before = t.node_count() as u64;
            let needed = t
                .lock()
                .nodes_needed(page, len)
                .expect("the range is unmapped");
            map(&t, page, gpa, len, Perm::READ);
            let added = t.node_count() as u64 - before;
            if huge_possible {
                assert!(added <= needed, "{page:#x}+{len:#x}: {added} > {needed}");
            } else {
                assert_eq!(added, needed, "{page:#x}+{len:#x}");
            }
            mapped.extend((page..page + len).step_by(PAGE_SIZE as usize));
        }
        assert_eq!(
            t.lock().nodes_needed(1 << 48, PAGE_SIZE),
            Some(0),
            "outside the table"
        );
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "2 MiB leaf"))]
    fn map_into_a_huge_leaf_splits_it() {
        let t = IoPageTable::new(39);
        map(&t, 0, 0x4000_0000, HUGE_SIZE, Perm::READ);
        map(&t, 0x3000, 0x9000, PAGE_SIZE, Perm::WRITE);
        let leaf = look(&t, 0x2000).unwrap();
        assert_eq!(
            (leaf.gpa, leaf.perms, leaf.run),
            (0x4000_2000, Perm::READ, PAGE_SIZE)
        );
        assert_eq!(look(&t, 0x3000).unwrap().gpa, 0x9000);
        unmap(&t, 0, HUGE_SIZE);
        assert_eq!(t.node_count(), 1);
    }

    /// A reference model of the table: whole mappings by start iova.
    #[derive(Default)]
    struct Model {
        maps: BTreeMap<u64, (u64, u64, Perm)>,
    }

    impl Model {
        fn overlaps(&self, iova: u64, len: u64) -> bool {
            self.maps
                .range(..iova + len)
                .next_back()
                .is_some_and(|(&start, &(l, _, _))| start + l > iova)
        }

        /// The leaves the table must hold: (iova, level).
        fn leaves(&self) -> Vec<(u64, u32)> {
            let mut out = Vec::new();
            for (&iova, &(len, gpa, _)) in &self.maps {
                let mut at = iova;
                while at < iova + len {
                    let block = at & !(HUGE_SIZE - 1);
                    let aligned = (at - iova + gpa) % HUGE_SIZE == 0;
                    if at == block && block + HUGE_SIZE <= iova + len && aligned {
                        out.push((at, 1));
                        at += HUGE_SIZE;
                    } else {
                        out.push((at, 0));
                        at += PAGE_SIZE;
                    }
                }
            }
            out
        }

        fn lookup(&self, iova: u64) -> Option<Leaf> {
            let (&start, &(len, gpa, perms)) = self.maps.range(..=iova).next_back()?;
            if iova >= start + len {
                return None;
            }
            let leaves = Model {
                maps: BTreeMap::from([(start, (len, gpa, perms))]),
            }
            .leaves();
            let &(leaf, level) = leaves.iter().rev().find(|&&(l, _)| l <= iova)?;
            Some(Leaf {
                gpa: gpa + (iova - start),
                perms,
                run: leaf + (1 << entry_shift(level)) - iova,
            })
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Random maps and unmaps agree with the model, including which
        /// leaves are 2 MiB and how many nodes stay linked.
        #[test]
        fn table_matches_model(
            ops in proptest::collection::vec((0u64..3, 0u64..6144, 1u64..1200, 0u64..4, 0u8..4), 1..24),
            probes in proptest::collection::vec(0u64..(24 << 20), 32),
        ) {
            let t = IoPageTable::new(32);
            let mut model = Model::default();
            for (kind, page, pages, gpa_shift, perms) in ops {
                let (iova, len) = (page * PAGE_SIZE, pages * PAGE_SIZE);
                match kind {
                    0 | 1 if !model.overlaps(iova, len) => {
                        // gpa shares iova's offset in 2 MiB half the time.
                        let gpa = (1 << 33) + iova + gpa_shift * 0x1000 * kind;
                        let perms = Perm::from_bits_truncate(perms);
                        map(&t, iova, gpa, len, perms);
                        model.maps.insert(iova, (len, gpa, perms));
                    }
                    _ => {
                        // Remove the mapping at or after `iova`, whole.
                        let found = model.maps.range(iova..).next().map(|(&s, &(l, _, _))| (s, l));
                        if let Some((start, len)) = found {
                            unmap(&t, start, len);
                            model.maps.remove(&start);
                        }
                    }
                }
                proptest::prop_assert_eq!(t.node_count(), expected_nodes(t.levels, &model.leaves()));
            }
            for iova in probes.into_iter().chain(model.maps.keys().flat_map(|&s| [s, s + 0xfff])) {
                proptest::prop_assert_eq!(look(&t, iova), model.lookup(iova), "iova {:#x}", iova);
            }
            t.lock().clear();
            proptest::prop_assert_eq!(t.node_count(), 1);
        }
    }

    /// One writer remaps pages generation after generation while two
    /// readers translate them: a reader sees either nothing or a leaf of
    /// that very iova from some generation, never going back in time.
    #[test]
    fn concurrent_readers_see_only_valid_leaves() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
        use std::sync::Arc;

        const GENERATIONS: u64 = 3000;
        const GEN_SHIFT: u32 = 40;
        const IOVA_MASK: u64 = (1 << GEN_SHIFT) - 1;
        // (iova, len): pages in distinct leaf tables, one at the very top,
        // and a 2 MiB block (gpa 2 MiB aligned too).
        const RANGES: [(u64, u64); 4] = [
            (0x1000, PAGE_SIZE),
            (0x60_5000, 2 * PAGE_SIZE),
            ((1 << 39) - PAGE_SIZE, PAGE_SIZE),
            (0x4000_0000, HUGE_SIZE),
        ];
        const PROBES: [u64; 6] = [
            0x1000,
            0x60_5123,
            0x60_6fff,
            (1 << 39) - 1,
            0x4000_0000,
            0x4012_3456,
        ];

        let table = Arc::new(IoPageTable::new(39));
        // Keeps the first page's leaf table alive across generations.
        map(&table, 0x2000, 0x2000, PAGE_SIZE, Perm::READ);
        let done = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));

        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (table, done) = (Arc::clone(&table), Arc::clone(&done));
                let started = Arc::clone(&started);
                std::thread::spawn(move || {
                    started.fetch_add(1, Relaxed);
                    let mut last_gen = [0u64; PROBES.len()];
                    let mut hits = 0u64;
                    while !done.load(Relaxed) {
                        for (i, &iova) in PROBES.iter().enumerate() {
                            let guard = epoch::pin();
                            let Some(leaf) = table.lookup(iova, &guard) else {
                                continue;
                            };
                            hits += 1;
                            let gen = leaf.gpa >> GEN_SHIFT;
                            assert_eq!(leaf.gpa & IOVA_MASK, iova, "wrong translation");
                            assert!((1..=GENERATIONS).contains(&gen), "gen {gen}");
                            assert!(gen >= last_gen[i], "went back in time");
                            last_gen[i] = gen;
                            assert_eq!(leaf.perms, Perm::from_bits_truncate(gen as u8));
                            assert!(leaf.run > 0 && leaf.run <= HUGE_SIZE);
                        }
                    }
                    hits
                })
            })
            .collect();

        // Race with running readers, not with thread start-up.
        while started.load(Relaxed) < 2 {
            std::thread::yield_now();
        }
        for gen in 1..=GENERATIONS {
            let perms = Perm::from_bits_truncate(gen as u8);
            for (iova, len) in RANGES {
                table.lock().map(iova, gen << GEN_SHIFT | iova, len, perms);
            }
            let mut writer = table.lock();
            for (iova, len) in RANGES {
                writer.unmap(iova, len);
            }
        }
        done.store(true, Relaxed);
        let hits: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(hits > 0, "the readers never raced the writer");
        assert_eq!(table.node_count(), 3);
        assert_eq!(look(&table, 0x2000).unwrap().gpa, 0x2000);
    }
}

// Model-checks the reader/writer/reclamation protocol with loom, through
// the same code (atomics from `crate::sync`, crossbeam-epoch built for loom):
//
// LOOM_MAX_PREEMPTIONS=2 RUSTFLAGS="--cfg loom --cfg crossbeam_loom" \
//     cargo test -p pvdma --features loom --release --lib loom_tests
//
// Only one thread writes: the writer mutex is parking_lot's, which loom does
// not model (a contended lock would really block a loom thread).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::types::PAGE_SIZE;
    use loom::sync::Arc;
    use loom::thread;

    /// Two levels: the root and one leaf table that unmap frees.
    const BITS: u32 = 30;
    const IOVA: u64 = 0x3000;
    const GPA: u64 = 0x2345_6000;

    /// A reader racing a map, an unmap that unlinks and defer-frees the
    /// leaf table, and enough epoch advances to really free it: the reader
    /// sees nothing or exactly the mapped leaf, and never a freed node
    /// (`lookup` asserts that under loom).
    #[test]
    fn lookup_races_map_unmap_and_reclamation() {
        loom::model(|| {
            let table = Arc::new(IoPageTable::new(BITS));
            let writer = {
                let table = Arc::clone(&table);
                thread::spawn(move || {
                    table.lock().map(IOVA, GPA, PAGE_SIZE, Perm::READ);
                    table.lock().unmap(IOVA, PAGE_SIZE);
                    assert_eq!(table.node_count(), 1);
                    // unmap flushed once; two more collections can advance
                    // the epoch far enough for the leaf table to be freed
                    // while the reader may still be running.
                    epoch::pin().flush();
                    epoch::pin().flush();
                })
            };
            let guard = epoch::pin();
            let seen = table.lookup(IOVA + 0x10, &guard);
            drop(guard);
            let expected = Leaf {
                gpa: GPA + 0x10,
                perms: Perm::READ,
                run: PAGE_SIZE - 0x10,
            };
            assert!(seen.is_none() || seen == Some(expected), "{seen:?}");
            writer.join().unwrap();
            assert_eq!(table.lookup(IOVA, &epoch::pin()), None);
        });
    }
}
