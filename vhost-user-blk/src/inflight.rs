// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Inflight I/O tracking for split rings (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`,
//! QEMU's `docs/interop/vhost-user.rst`, "Inflight I/O tracking").
//!
//! The backend creates a shared region (`GET_INFLIGHT_FD`), the frontend
//! keeps it and hands it to every later backend process
//! (`SET_INFLIGHT_FD`), so a backend that was killed or restarted leaves
//! behind which chains it had taken and not yet completed, and the next
//! one serves them again.
//!
//! The region: one queue region per queue, back to back, each
//! [`queue_region_size`] bytes (the split layout of the spec, rounded up to
//! [`QUEUE_ALIGN`]):
//!
//! | offset | field |
//! |---|---|
//! | 0 | `features: u64` (0) |
//! | 8 | `version: u16` (1; 0 = never initialised) |
//! | 10 | `desc_num: u16` (= queue size) |
//! | 12 | `last_batch_head: u16` |
//! | 14 | `used_idx: u16` |
//! | 16 + 16 i | `desc[i]`: `inflight: u8`, `padding: [u8; 5]`, `next: u16`, `counter: u64` |
//!
//! The frontend may write the region at any time, so it is read only when
//! a ring starts ([`QueueInflight::recover`]), copied first, and the copy
//! checked before anything is done with it; while the ring runs it is
//! only written. Every access is an atomic one on the shared mapping, and
//! the stores that the spec orders are ordered (Release), so a backend
//! killed between any two of them leaves a region the next one recovers
//! from (see the rules below).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;

/// The region version this backend writes and reads.
pub const VERSION: u16 = 1;
/// Each queue region is a multiple of this (a cache line), as in
/// libvhost-user, so two queue threads never share a line; for every
/// power-of-two queue size the sizes then agree with libvhost-user's.
pub const QUEUE_ALIGN: u64 = 64;
/// Largest split queue (virtio).
pub const MAX_QUEUE_SIZE: u16 = 32768;

const HEADER: usize = 16;
const DESC: usize = 16;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const D_INFLIGHT: usize = 0;
const D_NEXT: usize = 6;
const D_COUNTER: usize = 8;

/// Bytes of one queue's region for a queue of `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> u64 {
    let raw = (HEADER + DESC * usize::from(queue_size)) as u64;
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// Why a `GET_INFLIGHT_FD` or `SET_INFLIGHT_FD` is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No queue, or more than the device serves.
    #[error("{0} queues: 1..={1} are served")]
    NumQueues(u16, usize),
    /// Not a virtio split queue size.
    #[error("queue size {0}: a power of two up to 32768")]
    QueueSize(u16),
    /// The size does not match the queues.
    #[error("region of {size:#x} bytes; {num_queues} queues of {queue_size} take {expected:#x}")]
    Size {
        /// `mmap_size` sent.
        size: u64,
        /// What the layout needs.
        expected: u64,
        /// Queues.
        num_queues: u16,
        /// Queue size.
        queue_size: u16,
    },
    /// `mmap_offset` is not page-aligned (mmap needs it).
    #[error("region offset {0:#x} is not page-aligned")]
    Offset(u64),
    /// The region does not lie inside the file: touching it would raise
    /// SIGBUS.
    #[error("region at {offset:#x}+{size:#x} lies past the end of its file ({file:#x} bytes)")]
    PastEnd {
        /// `mmap_offset`.
        offset: u64,
        /// `mmap_size`.
        size: u64,
        /// File size.
        file: u64,
    },
    /// The file can shrink under our mapping (SIGBUS on the next access).
    #[error("the region's file is not sealed against shrinking (seals {0:#x})")]
    NotSealed(i32),
    /// A system call failed.
    #[error("{0}: {1}")]
    Sys(&'static str, io::Error),
}

/// Why a queue region cannot be recovered from (its chains are not
/// resubmitted; the ring restarts at the frontend's base).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    /// Neither 0 (fresh) nor [`VERSION`].
    #[error("version {0}")]
    Version(u16),
    /// `desc_num` is not the queue size.
    #[error("desc_num {got}, the queue has {want} entries")]
    DescNum {
        /// In the region.
        got: u16,
        /// Queue size.
        want: u16,
    },
    /// An `inflight` byte that is neither 0 nor 1.
    #[error("desc[{index}].inflight is {value}")]
    InflightByte {
        /// Entry.
        index: u16,
        /// Its byte.
        value: u8,
    },
    /// More used entries since `used_idx` than the queue has.
    #[error("last batch of {0} entries (region used_idx {1}, used ring {2})")]
    Batch(u16, u16, u16),
    /// `last_batch_head`, or a `next` of the batch list, is not an entry.
    #[error("batch list reaches entry {0}, past the queue")]
    OutOfRange(u16),
    /// The batch list comes back to an entry.
    #[error("batch list loops at entry {0}")]
    Loop(u16),
    /// More chains in flight than the driver has made available and
    /// not seen used.
    #[error(
        "{inflight} chains in flight, but avail idx {avail} - used idx {used} leaves {pending}"
    )]
    TooMany {
        /// Entries marked in flight.
        inflight: u16,
        /// Avail ring index.
        avail: u16,
        /// Used ring index.
        used: u16,
        /// `avail - used`.
        pending: u16,
    },
    /// Two chains in flight with the same counter: their order is unknown.
    #[error("desc[{0}] and desc[{1}] have the same counter {2}")]
    DuplicateCounter(u16, u16, u64),
}

/// Creates a region for `GET_INFLIGHT_FD`: a memfd of the right size,
/// zero (version 0: every queue region is initialised when its ring
/// starts), sealed against shrinking and growing so that no one can make
/// a mapping of it fault. `max_queues` is how many queues the device
/// serves.
pub fn create(
    num_queues: u16,
    queue_size: u16,
    max_queues: usize,
) -> Result<(OwnedFd, VhostUserInflight), Error> {
    check_shape(num_queues, queue_size, max_queues)?;
    let size = u64::from(num_queues) * queue_region_size(queue_size);
    // SAFETY: a NUL-terminated name and flags; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"pvdma-vub-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(Error::Sys("memfd_create", io::Error::last_os_error()));
    }
    // SAFETY: a descriptor we just created and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate and fcntl on a descriptor we own.
    let ok = unsafe {
        libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) == 0
            && libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            ) == 0
    };
    if !ok {
        return Err(Error::Sys(
            "sizing and sealing the memfd",
            io::Error::last_os_error(),
        ));
    }
    Ok((fd, VhostUserInflight::new(size, 0, num_queues, queue_size)))
}

fn check_shape(num_queues: u16, queue_size: u16, max_queues: usize) -> Result<(), Error> {
    if num_queues == 0 || usize::from(num_queues) > max_queues {
        return Err(Error::NumQueues(num_queues, max_queues));
    }
    if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
        return Err(Error::QueueSize(queue_size));
    }
    Ok(())
}

/// A region mapped from `SET_INFLIGHT_FD`.
#[derive(Debug)]
pub struct Region {
    ptr: *mut u8,
    len: usize,
    _fd: OwnedFd,
    /// Queues it holds.
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
}

// SAFETY: the mapping is only reached through atomic accesses (see
// `QueueInflight`), from any thread; it lives until the Region drops.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `len` bytes, not reached any more
        // (every QueueInflight holds an Arc to us).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl Region {
    /// Maps the region of a `SET_INFLIGHT_FD` after checking that its
    /// shape is one [`create`] makes, that it lies inside its file, and
    /// that the file is sealed against shrinking (a mapping past the end
    /// of a file faults with SIGBUS).
    pub fn map(fd: OwnedFd, msg: &VhostUserInflight, max_queues: usize) -> Result<Region, Error> {
        let (size, offset) = (msg.mmap_size, msg.mmap_offset);
        let (num_queues, queue_size) = (msg.num_queues, msg.queue_size);
        check_shape(num_queues, queue_size, max_queues)?;
        let expected = u64::from(num_queues) * queue_region_size(queue_size);
        if size != expected {
            return Err(Error::Size {
                size,
                expected,
                num_queues,
                queue_size,
            });
        }
        if offset % pvdma::PAGE_SIZE != 0 {
            return Err(Error::Offset(offset));
        }
        // SAFETY: F_GET_SEALS on a descriptor we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(Error::Sys(
                "F_GET_SEALS (not a memfd?)",
                io::Error::last_os_error(),
            ));
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(Error::NotSealed(seals));
        }
        // SAFETY: `st` is plain data fstat fills in for a valid fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we own and a stat buffer of the right type.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(Error::Sys("fstat", io::Error::last_os_error()));
        }
        let file = st.st_size as u64;
        if offset.checked_add(size).is_none_or(|end| end > file) {
            return Err(Error::PastEnd { offset, size, file });
        }
        let len = size as usize;
        // SAFETY: a fresh shared mapping of a range checked to lie inside
        // a file that cannot shrink; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Sys("mmap", io::Error::last_os_error()));
        }
        Ok(Region {
            ptr: ptr.cast(),
            len,
            _fd: fd,
            num_queues,
            queue_size,
        })
    }

    /// Queue `index`'s tracking, for a ring of `size` entries; `None`
    /// when the region has no such queue or another size.
    pub fn queue(self: &Arc<Self>, index: usize, size: u16) -> Option<QueueInflight> {
        if index >= usize::from(self.num_queues) || size != self.queue_size {
            return None;
        }
        Some(QueueInflight {
            region: self.clone(),
            off: index * queue_region_size(size) as usize,
            size,
            counter: 0,
            last_batch_head: 0,
            recovered: false,
            resubmit: VecDeque::new(),
        })
    }
}

/// What [`QueueInflight::recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// Version 0: a region no backend used yet, now initialised. The ring
    /// starts at the frontend's base.
    Fresh,
    /// Chains to serve again (in [`QueueInflight::next_resubmit`] order,
    /// the order they were taken in) before any new one, and the avail
    /// index to go on from: the used index plus the chains in flight.
    Resumed {
        /// Next avail index.
        next_avail: u16,
        /// Chains in flight.
        inflight: u16,
    },
}

/// One queue's part of the region, and the queue's tracking state.
#[derive(Debug)]
pub struct QueueInflight {
    region: Arc<Region>,
    /// Byte offset of the queue region in the mapping.
    off: usize,
    size: u16,
    /// The counter of the next chain taken ("global counter" of the spec;
    /// per queue here, which orders each queue's chains just as well).
    counter: u64,
    /// Our copy of `last_batch_head`: what the region holds is written,
    /// never read back while the ring runs (the frontend could change it).
    last_batch_head: u16,
    recovered: bool,
    resubmit: VecDeque<u16>,
}

impl QueueInflight {
    fn at<T>(&self, off: usize) -> *mut T {
        debug_assert!(off + std::mem::size_of::<T>() <= queue_region_size(self.size) as usize);
        // SAFETY: `self.off + off` lies inside the mapping: the region holds `num_queues` queue regions of
        // this size (checked in Region::map and Region::queue) and every
        // caller passes an offset inside one queue region.
        unsafe { self.region.ptr.add(self.off + off).cast() }
    }

    fn u8(&self, off: usize) -> &AtomicU8 {
        // SAFETY: inside the mapping (see `at`), which lives as long as
        // `self.region`; u8 needs no alignment. Atomic, because the
        // frontend shares the mapping.
        unsafe { AtomicU8::from_ptr(self.at(off)) }
    }

    fn u16(&self, off: usize) -> &AtomicU16 {
        // SAFETY: as in `u8`; every u16 field is at an even offset of a
        // queue region, which starts at a multiple of 64 of a
        // page-aligned mapping.
        unsafe { AtomicU16::from_ptr(self.at(off)) }
    }

    fn u64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: as in `u16`; the u64 fields are at multiples of 8.
        unsafe { AtomicU64::from_ptr(self.at(off)) }
    }

    fn desc(i: u16) -> usize {
        HEADER + DESC * usize::from(i)
    }

    /// Whether [`QueueInflight::recover`] ran for this ring start.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// The next chain to serve again, if any (it stays first until
    /// [`QueueInflight::resubmitted`]).
    pub fn next_resubmit(&self) -> Option<u16> {
        self.resubmit.front().copied()
    }

    /// Chains still to serve again.
    pub fn resubmit_left(&self) -> usize {
        self.resubmit.len()
    }

    /// Chain `head` is complete (its used entry is written, or held back
    /// to be written): true when it was the chain being served again, and
    /// the next one is due.
    pub fn resubmitted(&mut self, head: u16) -> bool {
        if self.resubmit.front() == Some(&head) {
            self.resubmit.pop_front();
            true
        } else {
            false
        }
    }

    /// Spec, "When receiving available buffers": chain `head` was just
    /// taken from the avail ring. Must come before the next chain is
    /// taken (recovery counts the chains in flight to find the next avail
    /// index).
    pub fn begin(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let d = Self::desc(head);
        // 2. desc[i].counter = global counter; 3. counter += 1.
        self.u64(d + D_COUNTER)
            .store(self.counter, Ordering::Relaxed);
        self.counter += 1;
        // 4. desc[i].inflight = 1, after the counter (Release): an entry
        // in flight always has its counter.
        self.u8(d + D_INFLIGHT).store(1, Ordering::Release);
    }

    /// Spec, "When supplying used buffers", steps 1-3, before the used
    /// entry is written: `desc[head].next = last_batch_head;
    /// last_batch_head = head`. The used ring's idx store (Release, in
    /// virtio-queue's `add_used`) orders these before it: a backend killed
    /// after the used idx moved finds the batch list naming `head`.
    pub fn pre_put(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.u16(Self::desc(head) + D_NEXT)
            .store(self.last_batch_head, Ordering::Relaxed);
        self.u16(OFF_LAST_BATCH_HEAD).store(head, Ordering::Release);
        self.last_batch_head = head;
    }

    /// Spec, the steps after the used idx store: `desc[head].inflight =
    /// 0`, then `used_idx` = the used ring's idx. Each store is Release,
    /// ordered after the one before it: killed before the first, the
    /// region's `used_idx` lags the ring and recovery clears the last
    /// batch instead.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head >= self.size {
            return;
        }
        self.u8(Self::desc(head) + D_INFLIGHT)
            .store(0, Ordering::Release);
        self.u16(OFF_USED_IDX).store(used_idx, Ordering::Release);
    }

    /// (Re)initialises the queue region for a ring whose used idx is
    /// `used_idx`: version 0 first and version 1 last, so a backend killed
    /// meanwhile leaves a region the next one initialises again.
    pub fn init(&mut self, used_idx: u16) {
        self.u16(OFF_VERSION).store(0, Ordering::Release);
        self.u64(0).store(0, Ordering::Relaxed);
        self.u16(OFF_DESC_NUM).store(self.size, Ordering::Relaxed);
        self.u16(OFF_LAST_BATCH_HEAD).store(0, Ordering::Relaxed);
        self.u16(OFF_USED_IDX).store(used_idx, Ordering::Relaxed);
        for i in 0..self.size {
            let d = Self::desc(i);
            self.u8(d + D_INFLIGHT).store(0, Ordering::Relaxed);
            self.u16(d + D_NEXT).store(0, Ordering::Relaxed);
            self.u64(d + D_COUNTER).store(0, Ordering::Relaxed);
        }
        self.u16(OFF_VERSION).store(VERSION, Ordering::Release);
        self.counter = 0;
        self.last_batch_head = 0;
        self.resubmit.clear();
        self.recovered = true;
    }

    /// Spec, "When reconnecting", for a ring whose used idx is `used` and
    /// avail idx `avail` (both read from the rings now). The queue region
    /// is copied, the copy checked; a fresh region is initialised; a
    /// sound one has its last batch cleared (when its `used_idx` lags the
    /// ring) and its chains in flight queued for resubmission in counter
    /// order. On `Err` nothing was changed: the caller logs it and calls
    /// [`QueueInflight::init`].
    pub fn recover(&mut self, used: u16, avail: u16) -> Result<Recovered, Corrupt> {
        // Copy first: the frontend could change the region under us.
        let version = self.u16(OFF_VERSION).load(Ordering::Acquire);
        if version == 0 {
            self.init(used);
            return Ok(Recovered::Fresh);
        }
        if version != VERSION {
            return Err(Corrupt::Version(version));
        }
        let desc_num = self.u16(OFF_DESC_NUM).load(Ordering::Relaxed);
        if desc_num != self.size {
            return Err(Corrupt::DescNum {
                got: desc_num,
                want: self.size,
            });
        }
        let last_batch_head = self.u16(OFF_LAST_BATCH_HEAD).load(Ordering::Relaxed);
        if last_batch_head >= self.size {
            // Checked even with no batch to clear: the next completion
            // links to it.
            return Err(Corrupt::OutOfRange(last_batch_head));
        }
        let region_used = self.u16(OFF_USED_IDX).load(Ordering::Relaxed);
        let mut inflight = Vec::with_capacity(usize::from(self.size));
        let mut next = Vec::with_capacity(usize::from(self.size));
        let mut counter = Vec::with_capacity(usize::from(self.size));
        for i in 0..self.size {
            let d = Self::desc(i);
            inflight.push(self.u8(d + D_INFLIGHT).load(Ordering::Relaxed));
            next.push(self.u16(d + D_NEXT).load(Ordering::Relaxed));
            counter.push(self.u64(d + D_COUNTER).load(Ordering::Relaxed));
        }
        if let Some(i) = inflight.iter().position(|&b| b > 1) {
            return Err(Corrupt::InflightByte {
                index: i as u16,
                value: inflight[i],
            });
        }

        // 1. used_idx lags the used ring: the last batch was published
        // but not yet marked done. Clear it (walking `batch` entries of
        // the list from last_batch_head, bounded and loop-checked).
        let batch = used.wrapping_sub(region_used);
        let mut cleared = Vec::new();
        if batch != 0 {
            if batch > self.size {
                return Err(Corrupt::Batch(batch, region_used, used));
            }
            let mut seen = vec![false; usize::from(self.size)];
            let mut h = last_batch_head;
            for k in 0..batch {
                let Some(s) = seen.get_mut(usize::from(h)) else {
                    return Err(Corrupt::OutOfRange(h));
                };
                if *s {
                    return Err(Corrupt::Loop(h));
                }
                *s = true;
                cleared.push(h);
                if k + 1 < batch {
                    h = next[usize::from(h)];
                }
            }
            for &h in &cleared {
                inflight[usize::from(h)] = 0;
            }
        }

        // 2. The chains in flight, in the order they were taken.
        let mut heads: Vec<u16> = (0..self.size)
            .filter(|&i| inflight[usize::from(i)] == 1)
            .collect();
        let n = heads.len() as u16;
        let pending = avail.wrapping_sub(used);
        if n > pending || pending > self.size {
            return Err(Corrupt::TooMany {
                inflight: n,
                avail,
                used,
                pending,
            });
        }
        heads.sort_unstable_by_key(|&h| counter[usize::from(h)]);
        for w in heads.windows(2) {
            let (a, b) = (w[0], w[1]);
            if counter[usize::from(a)] == counter[usize::from(b)] {
                return Err(Corrupt::DuplicateCounter(a, b, counter[usize::from(a)]));
            }
        }

        // Sound: commit the cleared batch, then used_idx, in the spec's
        // order (a backend killed meanwhile redoes the same clearing).
        for &h in &cleared {
            self.u8(Self::desc(h) + D_INFLIGHT)
                .store(0, Ordering::Release);
        }
        self.u16(OFF_USED_IDX).store(used, Ordering::Release);
        self.last_batch_head = last_batch_head;
        self.counter = heads
            .last()
            .map_or(0, |&h| counter[usize::from(h)].wrapping_add(1));
        self.resubmit = heads.into();
        self.recovered = true;
        Ok(Recovered::Resumed {
            next_avail: used.wrapping_add(n),
            inflight: n,
        })
    }
}

/// A descriptor read by [`walk_chain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkedDesc {
    /// Buffer address (IOVA, or guest-physical without the IOMMU).
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// Why [`walk_chain`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkError {
    /// A descriptor could not be read (the memory error is left in the
    /// space for the caller: a miss to ask for).
    Unreadable,
    /// The chain is malformed: it is returned with length 0.
    Bad(&'static str),
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Reads the chain whose head is `head` in the descriptor table at
/// `table` of a queue of `size` entries, into `out` (at most `max`
/// descriptors). virtio-queue builds chains only from the avail ring, so
/// resubmission, which knows only the head, walks them here: bounded (a
/// table of n entries yields at most n descriptors, so a loop ends), an
/// index past the table refused, one level of indirect table (whose
/// length must be a non-zero multiple of 16, not inside another), and at
/// most 4 GiB in all, as virtio asks of a driver.
pub fn walk_chain<M: vm_memory::GuestMemory + ?Sized>(
    mem: &M,
    table: u64,
    size: u16,
    head: u16,
    max: usize,
    out: &mut Vec<WalkedDesc>,
) -> Result<(), WalkError> {
    use vm_memory::{Bytes, GuestAddress};
    out.clear();
    let (mut table, mut entries, mut index) = (table, u32::from(size), u32::from(head));
    let mut ttl = entries;
    let mut indirect = false;
    let mut total: u32 = 0;
    loop {
        if index >= entries {
            return Err(WalkError::Bad("descriptor index past the table"));
        }
        if ttl == 0 {
            return Err(WalkError::Bad("chain longer than its table (a loop)"));
        }
        ttl -= 1;
        let at = table
            .checked_add(u64::from(index) * 16)
            .ok_or(WalkError::Bad("descriptor address wraps"))?;
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, GuestAddress(at))
            .map_err(|_| WalkError::Unreadable)?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes"));
        let next = u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes"));
        if flags & F_INDIRECT != 0 {
            if indirect {
                return Err(WalkError::Bad(
                    "indirect descriptor inside an indirect table",
                ));
            }
            if len == 0 || len % 16 != 0 {
                return Err(WalkError::Bad("indirect table length not a multiple of 16"));
            }
            indirect = true;
            table = addr;
            entries = len / 16;
            ttl = entries;
            index = 0;
            continue;
        }
        total = total
            .checked_add(len)
            .ok_or(WalkError::Bad("chain longer than 4 GiB"))?;
        if out.len() == max {
            return Err(WalkError::Bad("too many descriptors"));
        }
        out.push(WalkedDesc {
            addr,
            len,
            write: flags & F_WRITE != 0,
        });
        if flags & F_NEXT == 0 {
            return Ok(());
        }
        index = u32::from(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(num_queues: u16, queue_size: u16) -> Arc<Region> {
        let (fd, msg) = create(num_queues, queue_size, 8).unwrap();
        Arc::new(Region::map(fd, &msg, 8).unwrap())
    }

    #[test]
    fn layout_and_sizes() {
        // The spec's header is 16 bytes and DescStateSplit 16; regions
        // are padded to 64 (equal to libvhost-user's for these sizes).
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(2), 64);
        assert_eq!(queue_region_size(4), 128);
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(32768), 16 + 16 * 32768 + 48);
        assert_eq!(std::mem::size_of::<VhostUserInflight>(), 24);
    }

    #[test]
    fn create_refuses_bad_shapes() {
        for (nq, qs) in [(0, 16), (9, 16), (1, 0), (1, 12), (1, 65535)] {
            assert!(create(nq, qs, 8).is_err(), "{nq} queues of {qs}");
        }
        let (fd, msg) = create(2, 16, 8).unwrap();
        assert_eq!({ msg.mmap_size }, 2 * 272u64.div_ceil(64) * 64);
        // SAFETY: F_GET_SEALS on our descriptor.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        assert_ne!(seals & libc::F_SEAL_GROW, 0);
    }

    #[test]
    fn map_refuses_what_does_not_fit() {
        let msg = |size, offset, nq, qs| VhostUserInflight::new(size, offset, nq, qs);
        let good = queue_region_size(16);
        let fresh = || create(1, 16, 8).unwrap().0;
        for (m, what) in [
            (msg(good + 64, 0, 1, 16), "size"),
            (msg(good, 4096, 1, 16), "offset past the file"),
            (msg(good, 100, 1, 16), "unaligned offset"),
            (msg(good, 0, 0, 16), "no queue"),
            (msg(good, 0, 1, 24), "queue size"),
            (msg(2 * good, 0, 2, 16), "more than the file"),
        ] {
            assert!(Region::map(fresh(), &m, 8).is_err(), "{what}");
        }
        // An unsealed memfd, and a short one.
        // SAFETY: plain syscall.
        let raw = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: ours.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ours.
        unsafe { libc::ftruncate(fd.as_raw_fd(), good as i64) };
        assert!(matches!(
            Region::map(fd, &msg(good, 0, 1, 16), 8),
            Err(Error::Sys(..) | Error::NotSealed(_))
        ));
        let (fd, _) = create(1, 4, 8).unwrap();
        assert!(matches!(
            Region::map(fd, &msg(good, 0, 1, 16), 8),
            Err(Error::PastEnd { .. })
        ));
        assert!(Region::map(fresh(), &msg(good, 0, 1, 16), 8).is_ok());
    }

    #[test]
    fn track_crash_and_recover() {
        let r = region(2, 8);
        let mut q = r.queue(1, 8).unwrap();
        assert!(r.queue(2, 8).is_none() && r.queue(0, 16).is_none());
        assert_eq!(q.recover(0, 0), Ok(Recovered::Fresh));
        // take 3, 5, 1; complete 5
        for h in [3, 5, 1] {
            q.begin(h);
        }
        q.pre_put(5);
        q.post_put(5, 1);
        // a new backend: 3 then 1 again, next avail 1 + 2
        let mut q2 = r.queue(1, 8).unwrap();
        assert_eq!(
            q2.recover(1, 3),
            Ok(Recovered::Resumed {
                next_avail: 3,
                inflight: 2
            })
        );
        assert_eq!(q2.next_resubmit(), Some(3));
        q2.resubmitted(3);
        assert_eq!(q2.next_resubmit(), Some(1));
        // killed after the used idx store of 1's completion, before its
        // inflight = 0: the last batch is cleared, 1 is not served again
        q2.pre_put(1);
        let mut q3 = r.queue(1, 8).unwrap();
        assert_eq!(
            q3.recover(2, 3),
            Ok(Recovered::Resumed {
                next_avail: 3,
                inflight: 1
            })
        );
        assert_eq!(q3.next_resubmit(), Some(3));
        // queue 0 untouched by all this
        let mut q0 = r.queue(0, 8).unwrap();
        assert_eq!(q0.recover(7, 7), Ok(Recovered::Fresh));
    }

    /// Writes raw values into queue 0's region of a fresh 8-entry region.
    fn forged(f: impl Fn(&QueueInflight)) -> QueueInflight {
        let r = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        q.init(0);
        f(&q);
        q.recovered = false;
        q
    }

    #[test]
    fn recover_refuses_lies() {
        let set8 = |i: u16, v: u8| {
            move |q: &QueueInflight| q.u8(QueueInflight::desc(i)).store(v, Ordering::Relaxed)
        };
        type Forge<'a> = Box<dyn Fn(&QueueInflight) + 'a>;
        let mut cases: Vec<(Forge, u16, u16, &str)> = vec![
            (
                Box::new(|q| q.u16(OFF_VERSION).store(2, Ordering::Relaxed)),
                0,
                0,
                "version",
            ),
            (
                Box::new(|q| q.u16(OFF_DESC_NUM).store(16, Ordering::Relaxed)),
                0,
                0,
                "desc_num",
            ),
            (Box::new(set8(3, 2)), 0, 1, "inflight byte"),
            (
                Box::new(|q| q.u16(OFF_LAST_BATCH_HEAD).store(8, Ordering::Relaxed)),
                1,
                1,
                "last_batch_head",
            ),
            (
                Box::new(|q| q.u16(OFF_LAST_BATCH_HEAD).store(8, Ordering::Relaxed)),
                0,
                0,
                "last_batch_head, no batch",
            ),
            (
                Box::new(|q| {
                    q.u16(OFF_LAST_BATCH_HEAD).store(2, Ordering::Relaxed);
                    q.u16(QueueInflight::desc(2) + D_NEXT)
                        .store(9, Ordering::Relaxed);
                }),
                2,
                2,
                "next out of range",
            ),
            (
                Box::new(|q| {
                    q.u16(OFF_LAST_BATCH_HEAD).store(2, Ordering::Relaxed);
                    q.u16(QueueInflight::desc(2) + D_NEXT)
                        .store(4, Ordering::Relaxed);
                    q.u16(QueueInflight::desc(4) + D_NEXT)
                        .store(2, Ordering::Relaxed);
                }),
                3,
                3,
                "next loop",
            ),
            (Box::new(|_| {}), 9, 9, "batch larger than the queue"),
            (
                Box::new(|q| {
                    for i in 0..8 {
                        set8(i, 1)(q);
                        q.u64(QueueInflight::desc(i) + D_COUNTER)
                            .store(u64::from(i), Ordering::Relaxed);
                    }
                }),
                0,
                2,
                "more in flight than available",
            ),
            (
                Box::new(|q| {
                    set8(1, 1)(q);
                    set8(6, 1)(q);
                    q.u64(QueueInflight::desc(1) + D_COUNTER)
                        .store(7, Ordering::Relaxed);
                    q.u64(QueueInflight::desc(6) + D_COUNTER)
                        .store(7, Ordering::Relaxed);
                }),
                0,
                2,
                "duplicate counters",
            ),
        ];
        for (f, used, avail, what) in cases.drain(..) {
            let mut q = forged(f);
            assert!(q.recover(used, avail).is_err(), "{what} accepted");
            assert!(!q.recovered(), "{what}");
        }
        // the same region, sound, is accepted
        let mut q = forged(|q| {
            set8(6, 1)(q);
            set8(1, 1)(q);
            q.u64(QueueInflight::desc(1) + D_COUNTER)
                .store(9, Ordering::Relaxed);
            q.u64(QueueInflight::desc(6) + D_COUNTER)
                .store(4, Ordering::Relaxed);
        });
        assert_eq!(
            q.recover(0, 2),
            Ok(Recovered::Resumed {
                next_avail: 2,
                inflight: 2
            })
        );
        assert_eq!(q.next_resubmit(), Some(6), "counter order");
        // resumed counters go on past the largest
        q.begin(0);
        assert_eq!(
            q.u64(QueueInflight::desc(0) + D_COUNTER)
                .load(Ordering::Relaxed),
            10
        );
    }

    /// A 64 KiB guest memory at 0 with descriptors written by `descs`
    /// (`(table, index, addr, len, flags, next)`).
    fn mem_with(descs: &[(u64, u16, u64, u32, u16, u16)]) -> vm_memory::GuestMemoryMmap<()> {
        use vm_memory::{Bytes, GuestAddress};
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        for &(table, i, addr, len, flags, next) in descs {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(table + 16 * u64::from(i)))
                .unwrap();
        }
        mem
    }

    #[test]
    fn walk_follows_chains_and_indirect_tables() {
        let mut out = Vec::new();
        // head 2 -> 5 -> 1, the last device-writable
        let mem = mem_with(&[
            (0, 2, 0x1000, 16, F_NEXT, 5),
            (0, 5, 0x2000, 512, F_NEXT, 1),
            (0, 1, 0x3000, 1, F_WRITE, 0),
        ]);
        walk_chain(&mem, 0, 8, 2, 64, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                WalkedDesc {
                    addr: 0x1000,
                    len: 16,
                    write: false
                },
                WalkedDesc {
                    addr: 0x2000,
                    len: 512,
                    write: false
                },
                WalkedDesc {
                    addr: 0x3000,
                    len: 1,
                    write: true
                },
            ]
        );
        // head 0 is an indirect table of 3 at 0x800
        let mem = mem_with(&[
            (0, 0, 0x800, 48, F_INDIRECT, 0),
            (0x800, 0, 0x1000, 16, F_NEXT, 1),
            (0x800, 1, 0x2000, 512, F_NEXT | F_WRITE, 2),
            (0x800, 2, 0x3000, 1, F_WRITE, 0),
        ]);
        walk_chain(&mem, 0, 8, 0, 64, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out[1].write && out[2].write && !out[0].write);
    }

    #[test]
    fn walk_refuses_malformed_chains() {
        let mut out = Vec::new();
        let bad = |mem: &vm_memory::GuestMemoryMmap<()>, size, head, max| {
            let mut out = Vec::new();
            matches!(
                walk_chain(mem, 0, size, head, max, &mut out),
                Err(WalkError::Bad(_))
            )
        };
        // a loop 0 -> 1 -> 0
        let looped = mem_with(&[(0, 0, 0x1000, 16, F_NEXT, 1), (0, 1, 0x1000, 16, F_NEXT, 0)]);
        assert_eq!(
            walk_chain(&looped, 0, 8, 0, 64, &mut out),
            Err(WalkError::Bad("chain longer than its table (a loop)")),
            "a loop ends after as many descriptors as the table has"
        );
        // next past the table, head past the table
        let past = mem_with(&[(0, 0, 0x1000, 16, F_NEXT, 8)]);
        assert!(bad(&past, 8, 0, 64), "next past the table");
        assert!(bad(&past, 8, 8, 64), "head past the table");
        // an indirect table inside an indirect table; of a bad length;
        // looping inside itself
        let nested = mem_with(&[
            (0, 0, 0x800, 32, F_INDIRECT, 0),
            (0x800, 0, 0x900, 16, F_INDIRECT, 0),
        ]);
        assert!(bad(&nested, 8, 0, 64), "nested indirect");
        let odd = mem_with(&[(0, 0, 0x800, 24, F_INDIRECT, 0)]);
        assert!(bad(&odd, 8, 0, 64), "indirect length");
        let empty = mem_with(&[(0, 0, 0x800, 0, F_INDIRECT, 0)]);
        assert!(bad(&empty, 8, 0, 64), "empty indirect table");
        let iloop = mem_with(&[
            (0, 0, 0x800, 32, F_INDIRECT, 0),
            (0x800, 0, 0x1000, 16, F_NEXT, 1),
            (0x800, 1, 0x1000, 16, F_NEXT, 0),
        ]);
        assert!(bad(&iloop, 8, 0, 64), "loop in an indirect table");
        // more descriptors than allowed; more than 4 GiB
        let long = mem_with(&[(0, 0, 0x1000, 16, F_NEXT, 1), (0, 1, 0x1000, 16, 0, 0)]);
        assert!(bad(&long, 8, 0, 1), "too many descriptors");
        let big = mem_with(&[(0, 0, 0x1000, u32::MAX, F_NEXT, 1), (0, 1, 0x1000, 2, 0, 0)]);
        assert!(bad(&big, 8, 0, 64), "over 4 GiB");
        // a table outside memory is unreadable (a miss to ask for)
        assert_eq!(
            walk_chain(&long, 0x20000, 8, 0, 64, &mut out),
            Err(WalkError::Unreadable)
        );
    }
}
