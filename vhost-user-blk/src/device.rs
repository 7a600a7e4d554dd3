// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user-blk device: the frontend's requests (on the socket
//! thread) and the queue threads that serve the rings.
//!
//! Threads and locks:
//!
//! - The socket thread owns the [`DeviceIotlb`] and the memory table and
//!   answers every frontend message in order.
//! - Each queue has a thread of its own (`--num-queues`), which serves
//!   its ring when kicked. A queue thread touches guest memory only
//!   inside an *access section*: holding `access` for reading, with an
//!   epoch guard pinned, translating through the domain's table. A
//!   section serves one chain, and is released fairly, so a writer waits
//!   for at most one chain per queue thread (see `serve_ring`).
//! - An invalidation (and a memory-table change) removes the translations
//!   first, then takes `access` for writing once, which waits out every
//!   access section of every queue thread that could still use them, and
//!   only then acks. (`access` is one lock for all queues: a reader lock
//!   per queue would make a writer take them all, and readers do not
//!   contend on it.)
//! - A queue thread never waits on the frontend inside an access
//!   section: a miss is sent, and its answer awaited, with nothing held,
//!   so the frontend can send the update (or an invalidation) meanwhile.
//!   The backend channel is one socket: two threads that miss at once
//!   take turns on its lock (each sends its misses and reads its answers
//!   in one turn), and a thread waiting for its turn holds nothing
//!   either. A queue's stop (GET_VRING_BASE) ends that queue's miss
//!   wait, and any it begins until the ring starts again (so a thread
//!   that gets the channel after its ring stopped does not wait for an
//!   answer the frontend may never send).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use pvdma::{epoch, Domain, GuestRam, Perm};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserU64, VhostUserVirtioFeatures, VhostUserVringAddr,
    VhostUserVringState,
};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::{Step, Vring, SECTOR};
use crate::inflight::{self, Region};
use crate::iotlb::{DeviceIotlb, Updated, Window};
use crate::mem::MemTable;
use crate::proto::{read_pod, BackendChannel, Connection, IotlbMsg, Message};

/// How the queue thread reaches buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Per-fragment host slices from pvdma's translation (default).
    Sg,
    /// One slice per descriptor in the contiguous IOVA window.
    Window,
}

/// The device's settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Access mode.
    pub mode: Mode,
    /// Serve read-only.
    pub readonly: bool,
    /// GET_ID answer.
    pub serial: String,
    /// How long the queue thread waits for a miss's answer.
    pub miss_timeout: Duration,
    /// Most IOTLB entries held.
    pub max_entries: usize,
    /// Window size, log2 bytes (window mode).
    pub window_bits: u32,
    /// Tests only: sleep this long between translating a request's
    /// buffers and doing its I/O, to widen races with invalidations.
    pub test_io_delay: Duration,
    /// Queues offered (`VIRTIO_BLK_F_MQ`, `num_queues` in the config
    /// space), each served by its own thread: 1..=[`MAX_QUEUES`].
    pub num_queues: usize,
    /// Tests only: the queue "dies" at this point of the n-th chain taken
    /// from the avail ring (counted from 1 per ring start): it does
    /// nothing more, as if the process had been killed there, and the
    /// inflight region is left as it is.
    pub test_crash: Option<(CrashPoint, u32)>,
}

/// Where `Options::test_crash` stops a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Right after the chain was taken and recorded in the inflight
    /// region, before any I/O.
    AfterPop,
    /// After its used entry and the used idx were written, before the
    /// region records the completion.
    AfterUsedIdx,
}

/// Counters (relaxed atomics: statistics, not synchronisation).
#[derive(Debug, Default)]
pub struct Stats {
    /// IOTLB misses sent.
    pub misses: AtomicU64,
    /// Misses the frontend could not translate (or did not answer).
    pub miss_failures: AtomicU64,
    /// IOTLB updates accepted (new entries).
    pub updates: AtomicU64,
    /// Updates equal to an entry held.
    pub duplicate_updates: AtomicU64,
    /// IOTLB messages refused (malformed, or updates we cannot take).
    pub refused_updates: AtomicU64,
    /// IOTLB invalidation messages.
    pub invalidations: AtomicU64,
    /// Entries they removed.
    pub invalidated_entries: AtomicU64,
    /// Entries evicted to make room for an update.
    pub evictions: AtomicU64,
    /// virtio-blk requests parsed.
    pub requests: AtomicU64,
    /// Bytes read from the image into guest buffers.
    pub read_bytes: AtomicU64,
    /// Bytes written to the image from guest buffers.
    pub write_bytes: AtomicU64,
    /// Requests failed with IOERR.
    pub io_errors: AtomicU64,
    /// Accesses refused by the table (after misses).
    pub refused: AtomicU64,
    /// Chains returned with length 0 (malformed, or no status byte).
    pub bad_chains: AtomicU64,
    /// Ring corruption seen.
    pub ring_errors: AtomicU64,
    /// Chains served again from the inflight region after a restart.
    pub inflight_resubmitted: AtomicU64,
    /// Inflight regions refused (malformed `SET_INFLIGHT_FD`, or a
    /// queue region that could not be trusted at ring start).
    pub inflight_errors: AtomicU64,
    /// Times a ring stalled (unreachable or corrupt; retried later).
    pub ring_stalls: AtomicU64,
    /// Microseconds queue threads spent on misses: from sending them (or
    /// waiting for the backend channel) to the last answer.
    pub miss_wait_us: AtomicU64,
    /// Microseconds the socket thread waited for access sections to end
    /// before acking an invalidation (or a replacing update).
    pub quiesce_wait_us: AtomicU64,
}

impl Stats {
    /// Adds one.
    pub fn bump(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to counter `c`.
    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// One line, `name=value` pairs.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "iotlb_misses={} iotlb_miss_failures={} iotlb_updates={} iotlb_duplicate_updates={} \
             iotlb_refused={} iotlb_invalidations={} iotlb_invalidated_entries={} \
             iotlb_evictions={} \
             requests={} read_bytes={} write_bytes={} io_errors={} refused_accesses={} \
             bad_chains={} ring_errors={} inflight_resubmitted={} inflight_errors={} \
             ring_stalls={} miss_wait_us={} quiesce_wait_us={}",
            g(&self.misses),
            g(&self.miss_failures),
            g(&self.updates),
            g(&self.duplicate_updates),
            g(&self.refused_updates),
            g(&self.invalidations),
            g(&self.invalidated_entries),
            g(&self.evictions),
            g(&self.requests),
            g(&self.read_bytes),
            g(&self.write_bytes),
            g(&self.io_errors),
            g(&self.refused),
            g(&self.bad_chains),
            g(&self.ring_errors),
            g(&self.inflight_resubmitted),
            g(&self.inflight_errors),
            g(&self.ring_stalls),
            g(&self.miss_wait_us),
            g(&self.quiesce_wait_us),
        )
    }
}

/// Most queues (`--num-queues`): each is a thread, and Linux's
/// virtio-blk uses at most one queue per vCPU, so more than the machine
/// has cores only adds threads that contend for them.
pub const MAX_QUEUES: usize = 16;
/// Largest segment count advertised (`seg_max`).
const SEG_MAX: u32 = 126;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`: `used_event` / `avail_event` suppress
/// calls and kicks.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_ACCESS_PLATFORM` (`iommu_platform=on`).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// State the socket thread and the queue threads reach.
pub struct Shared {
    /// Guest RAM (guest-physical), published from the memory table.
    pub ram: GuestRam,
    domain: Arc<Domain>,
    iommu: AtomicBool,
    /// Access mode.
    pub mode: Mode,
    /// Window (window mode).
    pub window: Option<Arc<Window>>,
    /// The image.
    pub image: File,
    /// Its size in bytes (a multiple of 512).
    pub capacity: u64,
    /// Read-only.
    pub readonly: bool,
    /// GET_ID.
    pub serial: String,
    /// Counters.
    pub stats: Stats,
    access: RwLock<()>,
    vrings: Vec<Mutex<Slot>>,
    /// Per queue: its thread's wake-up and miss-wait end.
    ctl: Vec<QueueCtl>,
    /// The backend channel. The outer lock is held only to clone or
    /// replace the handle, never across a miss wait (which holds the
    /// channel's own lock), so SET_BACKEND_REQ_FD never waits for a miss.
    backend: Mutex<Option<Arc<Mutex<BackendChannel>>>>,
    exit: AtomicBool,
    miss_timeout: Duration,
    /// See [`Options::test_io_delay`].
    pub test_io_delay: Duration,
    /// See [`Options::test_crash`].
    pub test_crash: Option<(CrashPoint, u32)>,
}

/// One queue thread's eventfds.
struct QueueCtl {
    /// Ends its miss wait: set when its ring is stopped (GET_VRING_BASE,
    /// reset, exit), cleared when the ring starts again.
    stop: EventFd,
    /// Wakes it (rings changed, exit).
    wake: EventFd,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("mode", &self.mode)
            .field("capacity", &self.capacity)
            .field("iommu", &self.iommu())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Whether VIRTIO_F_ACCESS_PLATFORM was negotiated: addresses are IOVAs.
    #[inline]
    pub fn iommu(&self) -> bool {
        // Relaxed: set by SET_FEATURES before any ring is started (the
        // ring's start, under its mutex, orders it for the queue thread).
        self.iommu.load(Ordering::Relaxed)
    }

    /// The domain the IOTLB feeds.
    pub fn domain(&self) -> &Arc<Domain> {
        &self.domain
    }

    fn quiesce(&self) {
        let t = Instant::now();
        // Every access section that began before the translations left
        // the table has ended once we get the write lock.
        drop(self.access.write());
        self.stats.add(&self.stats.quiesce_wait_us, elapsed_us(t));
    }
}

#[derive(Default)]
struct Slot {
    size: u16,
    base: u16,
    addr: Option<VhostUserVringAddr>,
    kick: Option<Arc<EventFd>>,
    call: Option<EventFd>,
    enabled: bool,
    ring: Option<Vring>,
    /// Chains completed since the call eventfd was last signalled.
    unsignalled: u32,
    /// The ring started and has not called yet: its first signal calls
    /// whatever `used_event` says. A backend killed (or stopped) after
    /// writing used entries and before its call leaves the driver
    /// waiting for a call no later completion brings: with EVENT_IDX the
    /// driver asked for one only as the used index passes `used_event`,
    /// which it already has; and a driver with nothing more in flight
    /// has no later completion at all.
    call_on_start: bool,
}

impl Slot {
    /// Tells the driver about the completions not yet signalled, if it
    /// wants to hear of them (`VIRTIO_RING_F_EVENT_IDX`, see
    /// [`Vring::wants_signal`]); the caller holds an access section.
    /// One call per batch: the caller signals at the end of what was
    /// available (or every `SIGNAL_EVERY` chains), not per chain.
    fn signal(&mut self, sh: &Shared) {
        if self.call_on_start {
            if let Some(call) = &self.call {
                let _ = call.write(1);
                self.call_on_start = false;
                if self.unsignalled != 0 {
                    // This call covers them; reset EVENT_IDX's count.
                    if let Some(r) = self.ring.as_mut() {
                        let _ = r.wants_signal(sh);
                    }
                    self.unsignalled = 0;
                }
                return;
            }
        }
        if self.unsignalled == 0 {
            return;
        }
        let want = self.ring.as_mut().is_none_or(|r| r.wants_signal(sh));
        if want {
            if let Some(call) = &self.call {
                let _ = call.write(1);
            }
        }
        self.unsignalled = 0;
    }

    /// Stops the ring (GET_VRING_BASE, reset): the completions it holds
    /// are written and signalled first, as far as the used ring can be
    /// reached now; the avail index to restart from. The caller holds an
    /// access section.
    fn stop(&mut self, sh: &Shared) -> u16 {
        self.kick = None;
        if let Some(mut ring) = self.ring.take() {
            let (base, written) = ring.stop(sh);
            self.unsignalled += written;
            self.base = base;
        }
        // The ring is gone: signalled whatever used_event says (a
        // spurious call is harmless, a stopped ring gets no later one).
        self.signal(sh);
        self.base
    }
}

/// One frontend connection's device.
pub struct Device {
    sh: Arc<Shared>,
    iotlb: DeviceIotlb,
    mem: Option<MemTable>,
    features: u64,
    protocol: u64,
    /// The inflight region of the last `SET_INFLIGHT_FD`.
    inflight: Option<Arc<Region>>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("features", &self.features)
            .finish()
    }
}

/// Why the connection must end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a reply failed.
    #[error(transparent)]
    Proto(#[from] crate::proto::Error),
    /// Setting up failed.
    #[error("{0}")]
    Setup(String),
}

impl Device {
    /// A device serving `image`.
    pub fn new(image: File, opts: &Options) -> Result<Device, Error> {
        if !(1..=MAX_QUEUES).contains(&opts.num_queues) {
            return Err(Error::Setup(format!(
                "{} queues: 1 to {MAX_QUEUES}",
                opts.num_queues
            )));
        }
        let len = image
            .metadata()
            .map_err(|e| Error::Setup(format!("image: {e}")))?
            .len();
        let window = match opts.mode {
            Mode::Window => Some(Arc::new(
                Window::reserve(1u64 << opts.window_bits)
                    .map_err(|e| Error::Setup(format!("reserving the IOVA window: {e}")))?,
            )),
            Mode::Sg => None,
        };
        let iotlb = DeviceIotlb::new(window.clone(), opts.max_entries);
        if iotlb.capacity() < opts.max_entries {
            log::info!(
                "window mode: at most {} IOTLB entries (a share of vm.max_map_count)",
                iotlb.capacity()
            );
        }
        let ev = || EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Setup(format!("eventfd: {e}")));
        let sh = Arc::new(Shared {
            ram: GuestRam::new(),
            domain: iotlb.domain().clone(),
            iommu: AtomicBool::new(false),
            mode: opts.mode,
            window,
            image,
            capacity: len / SECTOR * SECTOR,
            readonly: opts.readonly,
            serial: opts.serial.clone(),
            stats: Stats::default(),
            access: RwLock::new(()),
            vrings: (0..opts.num_queues)
                .map(|_| Mutex::new(Slot::default()))
                .collect(),
            ctl: (0..opts.num_queues)
                .map(|_| {
                    Ok(QueueCtl {
                        stop: ev()?,
                        wake: ev()?,
                    })
                })
                .collect::<Result<_, Error>>()?,
            backend: Mutex::new(None),
            exit: AtomicBool::new(false),
            miss_timeout: opts.miss_timeout,
            test_io_delay: opts.test_io_delay,
            test_crash: opts.test_crash,
        });
        let mut dev = Device {
            sh,
            iotlb,
            mem: None,
            features: 0,
            protocol: 0,
            inflight: None,
            workers: Vec::new(),
        };
        for i in 0..opts.num_queues {
            let worker_sh = dev.sh.clone();
            let w = std::thread::Builder::new()
                .name(format!("queue{i}"))
                .spawn(move || queue_thread(&worker_sh, i))
                .map_err(|e| Error::Setup(format!("spawning queue thread {i}: {e}")))?;
            // On an error above, Drop stops the threads started so far.
            dev.workers.push(w);
        }
        Ok(dev)
    }

    /// The shared state (counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.sh
    }

    fn features_offered(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_MQ
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_F_VERSION_1
            | VIRTIO_F_ACCESS_PLATFORM
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.sh.readonly {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_offered() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn num_queues(&self) -> usize {
        self.sh.vrings.len()
    }

    fn config_space(&self) -> [u8; 256] {
        let mut c = [0u8; 256];
        c[0..8].copy_from_slice(&(self.sh.capacity / SECTOR).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c[34..36].copy_from_slice(&(self.num_queues() as u16).to_le_bytes());
        c
    }

    /// Answers one message. `Err` ends the connection.
    pub fn handle(&mut self, conn: &mut Connection, mut msg: Message) -> Result<(), Error> {
        let Some(req) = msg.request() else {
            log::warn!("unknown request {}", msg.hdr.request);
            return self.done(conn, &msg, Err("unknown request".into()));
        };
        log::trace!(
            "request {req:?} ({} bytes, {} fds)",
            msg.payload.len(),
            msg.fds.len()
        );
        let r: Result<(), String> = match req {
            FrontendReq::GET_FEATURES => return reply_u64(conn, &msg, self.features_offered()),
            FrontendReq::GET_PROTOCOL_FEATURES => {
                return reply_u64(conn, &msg, Self::protocol_offered().bits())
            }
            FrontendReq::GET_QUEUE_NUM => return reply_u64(conn, &msg, self.num_queues() as u64),
            FrontendReq::GET_VRING_BASE => return self.get_vring_base(conn, &msg),
            FrontendReq::GET_CONFIG => return self.get_config(conn, &msg),
            FrontendReq::GET_INFLIGHT_FD => return self.get_inflight_fd(conn, &msg),
            FrontendReq::SET_INFLIGHT_FD => {
                self.set_inflight_fd(&msg.payload, std::mem::take(&mut msg.fds))
            }
            FrontendReq::SET_FEATURES => match msg.payload::<VhostUserU64>() {
                Some(v) if v.value & !self.features_offered() == 0 => {
                    self.features = v.value;
                    self.sh
                        .iommu
                        .store(v.value & VIRTIO_F_ACCESS_PLATFORM != 0, Ordering::Relaxed);
                    log::info!(
                        "features {:#x}: {}",
                        v.value,
                        if self.sh.iommu() {
                            "behind the IOMMU (IOTLB)"
                        } else {
                            "no IOMMU"
                        }
                    );
                    Ok(())
                }
                Some(v) => Err(format!("features {:#x} not offered", v.value)),
                None => Err("bad payload".into()),
            },
            FrontendReq::SET_PROTOCOL_FEATURES => match msg.payload::<VhostUserU64>() {
                Some(v) if v.value & !Self::protocol_offered().bits() == 0 => {
                    self.protocol = v.value;
                    Ok(())
                }
                Some(v) => Err(format!("protocol features {:#x} not offered", v.value)),
                None => Err("bad payload".into()),
            },
            FrontendReq::SET_OWNER => Ok(()),
            FrontendReq::RESET_OWNER | FrontendReq::RESET_DEVICE => {
                self.reset();
                // The rings the region tracked are gone; the frontend
                // sends a region again before the next start.
                self.inflight = None;
                Ok(())
            }
            FrontendReq::SET_MEM_TABLE => self.set_mem_table(msg.payload.as_slice(), &msg.fds),
            FrontendReq::SET_VRING_NUM => self.with_slot(&msg, |s, n| match n {
                n @ 1..=32768 if n.is_power_of_two() => {
                    s.size = n as u16;
                    Ok(())
                }
                n => Err(format!("queue size {n}")),
            }),
            FrontendReq::SET_VRING_BASE => self.with_slot(&msg, |s, n| match u16::try_from(n) {
                Ok(b) => {
                    s.base = b;
                    Ok(())
                }
                Err(_) => Err(format!("vring base {n}")),
            }),
            FrontendReq::SET_VRING_ADDR => self.set_vring_addr(&msg),
            FrontendReq::SET_VRING_KICK
            | FrontendReq::SET_VRING_CALL
            | FrontendReq::SET_VRING_ERR => self.set_vring_fd(
                req,
                msg.payload::<VhostUserU64>(),
                std::mem::take(&mut msg.fds),
            ),
            FrontendReq::SET_VRING_ENABLE => self.with_slot(&msg, |s, n| match n {
                0 | 1 => {
                    s.enabled = n == 1;
                    Ok(())
                }
                n => Err(format!("SET_VRING_ENABLE {n}")),
            }),
            FrontendReq::SET_CONFIG => Ok(()),
            FrontendReq::SET_BACKEND_REQ_FD => {
                match std::mem::take(&mut msg.fds).into_iter().next() {
                    Some(fd) => {
                        *self.sh.backend.lock() =
                            Some(Arc::new(Mutex::new(BackendChannel::new(fd))));
                        return self.ack_if_asked(conn, &msg.hdr, Ok(()));
                    }
                    None => Err("SET_BACKEND_REQ_FD without a descriptor".into()),
                }
            }
            FrontendReq::IOTLB_MSG => {
                // Always acknowledged (vhost-user.rst), REPLY_ACK or not.
                let r = self.iotlb_msg(&msg.payload);
                if let Err(e) = &r {
                    log::warn!("IOTLB: {e}");
                }
                conn.ack(&msg.hdr, u64::from(r.is_err()))?;
                return Ok(());
            }
            other => Err(format!("{other:?} not supported")),
        };
        self.wake();
        self.done(conn, &msg, r)
    }

    fn done(
        &mut self,
        conn: &mut Connection,
        msg: &Message,
        r: Result<(), String>,
    ) -> Result<(), Error> {
        if let Err(e) = &r {
            log::warn!("request {}: {e}", msg.hdr.request);
        }
        self.ack_if_asked(conn, &msg.hdr, r)
    }

    fn ack_if_asked(
        &self,
        conn: &mut Connection,
        hdr: &crate::proto::Header,
        r: Result<(), String>,
    ) -> Result<(), Error> {
        if hdr.need_reply() && self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0 {
            conn.ack(hdr, u64::from(r.is_err()))?;
        }
        Ok(())
    }

    /// Wakes every queue thread (rings changed, exit).
    fn wake(&self) {
        for c in &self.sh.ctl {
            let _ = c.wake.write(1);
        }
    }

    fn with_slot(
        &self,
        msg: &Message,
        f: impl FnOnce(&mut Slot, u32) -> Result<(), String>,
    ) -> Result<(), String> {
        let st = msg.payload::<VhostUserVringState>().ok_or("bad payload")?;
        let slot = self
            .sh
            .vrings
            .get(st.index as usize)
            .ok_or(format!("no queue {}", { st.index }))?;
        f(&mut slot.lock(), st.num)
    }

    fn iotlb_msg(&mut self, payload: &[u8]) -> Result<(), String> {
        let sh = self.sh.clone();
        let msg = IotlbMsg::parse(payload).map_err(|e| {
            sh.stats.bump(&sh.stats.refused_updates);
            e.to_string()
        })?;
        let guard = epoch::pin();
        let ram = sh.ram.load(&guard);
        match msg {
            IotlbMsg::Update {
                iova,
                size,
                user_addr,
                perm,
            } => {
                let Some(mem) = &self.mem else {
                    sh.stats.bump(&sh.stats.refused_updates);
                    return Err("IOTLB update before SET_MEM_TABLE".into());
                };
                match self
                    .iotlb
                    .update(mem, ram, iova, size, user_addr, perm, &mut || sh.quiesce())
                {
                    Ok(Updated::Duplicate) => sh.stats.bump(&sh.stats.duplicate_updates),
                    Ok(u) => {
                        if let Updated::Replaced(n) = u {
                            sh.stats
                                .invalidated_entries
                                .fetch_add(n as u64, Ordering::Relaxed);
                        }
                        sh.stats.bump(&sh.stats.updates);
                        log::debug!("IOTLB update {iova:#x}+{size:#x} -> {user_addr:#x} {perm}");
                    }
                    Err(e) => {
                        sh.stats.bump(&sh.stats.refused_updates);
                        return Err(e.to_string());
                    }
                }
                sh.stats
                    .evictions
                    .store(self.iotlb.evicted(), Ordering::Relaxed);
            }
            IotlbMsg::Invalidate { iova, size } => {
                sh.stats.bump(&sh.stats.invalidations);
                let n = self
                    .iotlb
                    .invalidate(ram, iova, size, &mut || sh.quiesce())
                    .map_err(|e| {
                        sh.stats.bump(&sh.stats.refused_updates);
                        e.to_string()
                    })?;
                sh.stats
                    .invalidated_entries
                    .fetch_add(n as u64, Ordering::Relaxed);
                log::debug!("IOTLB invalidate {iova:#x}+{size:#x}: {n} entries");
            }
        }
        Ok(())
    }

    fn set_mem_table(&mut self, payload: &[u8], fds: &[OwnedFd]) -> Result<(), String> {
        const HDR: usize = 8;
        const REG: usize = std::mem::size_of::<VhostUserMemoryRegion>();
        if payload.len() < HDR {
            return Err("bad payload".into());
        }
        let n = u32::from_ne_bytes(payload[0..4].try_into().unwrap()) as usize;
        if n > crate::mem::MAX_REGIONS || payload.len() != HDR + n * REG {
            return Err(format!(
                "memory table of {n} regions in {} bytes",
                payload.len()
            ));
        }
        let regions: Vec<VhostUserMemoryRegion> = (0..n)
            .map(|i| read_pod(&payload[HDR + i * REG..HDR + (i + 1) * REG]).expect("sized above"))
            .collect();
        let fds = fds
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let table = MemTable::new(&regions, fds).map_err(|e| e.to_string())?;
        // Nothing may translate through the old table from here on.
        let _quiet = self.sh.access.write();
        {
            let guard = epoch::pin();
            let ram = self.sh.ram.load(&guard);
            // A window range that cannot be revoked refuses the table
            // (the entries have left pvdma's table all the same).
            self.iotlb
                .clear(ram, &mut || {})
                .map_err(|e| e.to_string())?;
        }
        let old = self.mem.take();
        if let Some(old) = &old {
            old.unpublish(&self.sh.ram);
        }
        if let Err(e) = table.publish(&self.sh.ram) {
            table.unpublish(&self.sh.ram);
            return Err(e.to_string());
        }
        for r in table.regions() {
            log::info!(
                "memory: guest-physical {:#x}+{:#x} at user {:#x}",
                r.gpa,
                r.size,
                r.uaddr
            );
        }
        self.mem = Some(table);
        drop(old);
        Ok(())
    }

    fn set_vring_addr(&self, msg: &Message) -> Result<(), String> {
        let a = msg.payload::<VhostUserVringAddr>().ok_or("bad payload")?;
        let slot = self
            .sh
            .vrings
            .get(a.index as usize)
            .ok_or(format!("no queue {}", { a.index }))?;
        slot.lock().addr = Some(a);
        Ok(())
    }

    fn set_vring_fd(
        &self,
        req: FrontendReq,
        v: Option<VhostUserU64>,
        fds: Vec<OwnedFd>,
    ) -> Result<(), String> {
        let v = v.ok_or("bad payload")?;
        let index = (v.value & 0xff) as usize;
        let nofd = v.value & 0x100 != 0;
        let slot = self
            .sh
            .vrings
            .get(index)
            .ok_or(format!("no queue {index}"))?;
        let fd = match (nofd, fds.into_iter().next()) {
            (false, Some(fd)) => Some(fd),
            (true, None) => None,
            _ => return Err(format!("{req:?}: descriptor and flag disagree")),
        };
        if let Some(fd) = &fd {
            if req != FrontendReq::SET_VRING_ERR {
                check_eventfd(fd).map_err(|e| format!("{req:?}: {e}"))?;
            }
        }
        let ev = fd.map(|fd| {
            // EventFd has no From<OwnedFd>: rebuild it from the raw fd.
            let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
            // SAFETY: `raw` came from an OwnedFd we just gave up.
            unsafe { <EventFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
        });
        let mut s = slot.lock();
        match req {
            FrontendReq::SET_VRING_KICK => {
                s.kick = ev.map(Arc::new);
                if s.kick.is_none() {
                    return Err("polling mode (no kick descriptor) is not supported".into());
                }
                // Without VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled
                // when started; with it, by SET_VRING_ENABLE.
                if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
                    s.enabled = true;
                }
                self.start(index, &mut s)
            }
            FrontendReq::SET_VRING_CALL => {
                s.call = ev;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Starts ring `index`, whose kick just arrived.
    fn start(&self, index: usize, s: &mut Slot) -> Result<(), String> {
        let a = s.addr.ok_or("SET_VRING_KICK before SET_VRING_ADDR")?;
        if s.size == 0 {
            return Err("SET_VRING_KICK before SET_VRING_NUM".into());
        }
        let (desc, avail, used) = if self.sh.iommu() {
            (a.descriptor, a.available, a.used)
        } else {
            // Without the IOMMU, ring addresses are the frontend's user
            // addresses; the ring code works in guest-physical ones.
            let mem = self
                .mem
                .as_ref()
                .ok_or("SET_VRING_KICK before SET_MEM_TABLE")?;
            let gpa = |u: u64| {
                mem.resolve(u, 1).map(|(_, g)| g).ok_or(format!(
                    "ring at user address {u:#x} is not in guest memory"
                ))
            };
            (gpa(a.descriptor)?, gpa(a.available)?, gpa(a.used)?)
        };
        // A stop of the ring before ends no miss wait of the new one.
        let _ = self.sh.ctl[index].stop.read();
        let event_idx = self.features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut ring = Vring::new(s.size, desc, avail, used, s.base, event_idx)
            .ok_or("invalid ring addresses")?;
        if let Some(region) = &self.inflight {
            ring.inflight = region.queue(index, s.size);
            if ring.inflight.is_none() {
                self.sh.stats.bump(&self.sh.stats.inflight_errors);
                log::error!(
                    "inflight: the region has {} queues of {}, not queue {index} of {}: \
                     this queue is not tracked",
                    region.num_queues,
                    region.queue_size,
                    s.size
                );
            }
        }
        s.ring = Some(ring);
        s.call_on_start = true;
        log::info!(
            "queue {index} started: size {}, desc {desc:#x}, avail {avail:#x}, used {used:#x}, \
             base {}{}",
            s.size,
            s.base,
            if s.ring.as_ref().is_some_and(|r| r.inflight.is_some()) {
                ", inflight tracked"
            } else {
                ""
            }
        );
        // Serve the ring once even without a kick: the driver's kicks
        // while no backend was connected are lost, it will not kick for
        // chains it added while the ring was stopped (with EVENT_IDX, not
        // until its avail index passes our last avail_event), and the
        // chains a killed backend had taken are served again now.
        if let Some(kick) = &s.kick {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// `GET_INFLIGHT_FD`: a new region for the queues and size asked. A
    /// request we cannot serve is answered with `mmap_size` 0 and no
    /// descriptor, which QEMU takes as "no inflight tracking".
    fn get_inflight_fd(&mut self, conn: &mut Connection, msg: &Message) -> Result<(), Error> {
        let Some(req) = msg.payload::<VhostUserInflight>() else {
            log::warn!("GET_INFLIGHT_FD: payload of {} bytes", msg.payload.len());
            self.sh.stats.bump(&self.sh.stats.inflight_errors);
            conn.reply(&msg.hdr, VhostUserInflight::default().as_slice())?;
            return Ok(());
        };
        let r = if self.protocol & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() == 0 {
            Err("INFLIGHT_SHMFD not negotiated".to_string())
        } else {
            inflight::create(req.num_queues, req.queue_size, self.sh.vrings.len())
                .map_err(|e| e.to_string())
        };
        match r {
            Ok((fd, reply)) => {
                log::info!(
                    "inflight: region of {:#x} bytes for {} queue(s) of {}",
                    { reply.mmap_size },
                    { reply.num_queues },
                    { reply.queue_size }
                );
                conn.reply_with_fds(&msg.hdr, reply.as_slice(), &[fd.as_raw_fd()])?;
            }
            Err(e) => {
                log::warn!("GET_INFLIGHT_FD refused: {e}");
                self.sh.stats.bump(&self.sh.stats.inflight_errors);
                let none = VhostUserInflight::new(0, 0, req.num_queues, req.queue_size);
                conn.reply(&msg.hdr, none.as_slice())?;
            }
        }
        Ok(())
    }

    /// `SET_INFLIGHT_FD`: the region to track the rings in from their
    /// next start (QEMU sends it before starting them). Refused, and
    /// the previous region dropped, when it does not fit.
    fn set_inflight_fd(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> Result<(), String> {
        let r = (|| {
            if self.protocol & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() == 0 {
                return Err("INFLIGHT_SHMFD not negotiated".to_string());
            }
            let msg: VhostUserInflight =
                read_pod(payload).ok_or(format!("payload of {} bytes", payload.len()))?;
            let mut fds = fds.into_iter();
            let (Some(fd), None) = (fds.next(), fds.next()) else {
                return Err("not exactly one descriptor".into());
            };
            Region::map(fd, &msg, self.sh.vrings.len()).map_err(|e| e.to_string())
        })();
        self.inflight = None;
        match r {
            Ok(region) => {
                log::info!(
                    "inflight: region for {} queue(s) of {}",
                    region.num_queues,
                    region.queue_size
                );
                self.inflight = Some(Arc::new(region));
                Ok(())
            }
            Err(e) => {
                self.sh.stats.bump(&self.sh.stats.inflight_errors);
                Err(format!(
                    "SET_INFLIGHT_FD refused: {e}; the rings run untracked"
                ))
            }
        }
    }

    fn get_vring_base(&mut self, conn: &mut Connection, msg: &Message) -> Result<(), Error> {
        let Some(st) = msg.payload::<VhostUserVringState>() else {
            return self.done(conn, msg, Err("bad payload".into()));
        };
        let Some(slot) = self.sh.vrings.get(st.index as usize) else {
            return self.done(conn, msg, Err(format!("no queue {}", { st.index })));
        };
        // End a miss wait of this queue's thread: the frontend handles
        // our backend channel only after this reply. The eventfd stays
        // set until the ring starts again, so a wait that begins later
        // (the thread was waiting for its turn on the backend channel)
        // ends at once too.
        let _ = self.sh.ctl[st.index as usize].stop.write(1);
        let base = {
            // An access section: the completions still held are written
            // to the used ring before the frontend learns the base.
            let _access = self.sh.access.read();
            slot.lock().stop(&self.sh)
        };
        log::info!("queue {} stopped at {base}", { st.index });
        conn.reply(
            &msg.hdr,
            VhostUserVringState::new(st.index, u32::from(base)).as_slice(),
        )?;
        self.wake();
        Ok(())
    }

    fn get_config(&self, conn: &mut Connection, msg: &Message) -> Result<(), Error> {
        const HDR: usize = std::mem::size_of::<VhostUserConfig>();
        let bad = |conn: &mut Connection| {
            // An empty config in the reply is vhost-user's error answer.
            let mut h = [0u8; HDR];
            h.copy_from_slice(
                &msg.payload[..HDR.min(msg.payload.len())]
                    .iter()
                    .copied()
                    .chain(std::iter::repeat(0))
                    .take(HDR)
                    .collect::<Vec<_>>(),
            );
            h[4..8].copy_from_slice(&0u32.to_ne_bytes());
            conn.reply(&msg.hdr, &h).map_err(Error::from)
        };
        if msg.payload.len() < HDR {
            return bad(conn);
        }
        let cfg: VhostUserConfig = read_pod(&msg.payload[..HDR]).expect("sized above");
        let (off, size) = (cfg.offset as usize, cfg.size as usize);
        let space = self.config_space();
        if msg.payload.len() != HDR + size || off.checked_add(size).is_none_or(|e| e > space.len())
        {
            log::warn!("GET_CONFIG offset {off} size {size}");
            return bad(conn);
        }
        let mut out = msg.payload[..HDR].to_vec();
        out.extend_from_slice(&space[off..off + size]);
        conn.reply(&msg.hdr, &out)?;
        Ok(())
    }

    fn reset(&mut self) {
        for c in &self.sh.ctl {
            let _ = c.stop.write(1);
        }
        {
            let _access = self.sh.access.read();
            for slot in &self.sh.vrings {
                let mut s = slot.lock();
                s.stop(&self.sh);
                *s = Slot::default();
            }
        }
        let sh = self.sh.clone();
        let guard = epoch::pin();
        if let Err(e) = self.iotlb.clear(sh.ram.load(&guard), &mut || sh.quiesce()) {
            log::error!("reset: {e}");
        }
    }

    /// Starts a graceful stop (SIGTERM, an upgrade): each queue thread
    /// takes no new chain, finishes the one in progress on each ring
    /// (misses included: keep answering the frontend meanwhile), writes
    /// and signals its used entries, and ends; [`Device::drained`] tells
    /// when. Then call [`Device::shutdown`]. Whatever is left in progress
    /// if the process exits before is in the inflight region.
    pub fn begin_drain(&self) {
        self.sh.exit.store(true, Ordering::Release);
        self.wake();
    }

    /// Whether every queue thread has ended (after [`Device::begin_drain`]).
    pub fn drained(&self) -> bool {
        self.workers.iter().all(|w| w.is_finished())
    }

    /// Graceful stop: [`Device::begin_drain`], then the frontend's
    /// messages are answered (a miss's answer comes as an IOTLB update
    /// on `conn`) until the queue thread has ended. False when it did not
    /// end within `timeout` (the caller may exit anyway: the inflight
    /// region holds what is left). Call [`Device::shutdown`] after a true.
    pub fn drain(&mut self, conn: &mut Connection, timeout: Duration) -> bool {
        self.begin_drain();
        let deadline = std::time::Instant::now() + timeout;
        let mut open = true;
        while !self.drained() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut p = libc::pollfd {
                fd: if open { conn.raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 10) as i32;
            // SAFETY: one valid pollfd (poll ignores a negative fd).
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n <= 0 || p.revents == 0 {
                continue;
            }
            match conn.recv() {
                Ok(msg) => {
                    if let Err(e) = self.handle(conn, msg) {
                        log::warn!("frontend socket while draining: {e}");
                        open = false;
                    }
                }
                Err(e) => {
                    if !matches!(e, crate::proto::Error::Closed) {
                        log::warn!("frontend socket while draining: {e}");
                    }
                    open = false;
                }
            }
        }
        log::info!("drained: the requests in progress are complete");
        true
    }

    /// Stops the queue thread and forgets the guest's memory.
    pub fn shutdown(&mut self) {
        self.sh.exit.store(true, Ordering::Release);
        for c in &self.sh.ctl {
            let _ = c.stop.write(1);
        }
        self.wake();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.reset();
        let _quiet = self.sh.access.write();
        if let Some(m) = self.mem.take() {
            m.unpublish(&self.sh.ram);
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Refuses a kick or call descriptor that is not an eventfd (a pipe as
/// call fd blocks the queue thread once it is full, and every
/// invalidation waits behind it), and makes it non-blocking: a frontend
/// that fills the counter itself must not block our writes either. The
/// kernel names an eventfd's inode `anon_inode:[eventfd]`; without /proc
/// only the anonymous-inode type is checked.
fn check_eventfd(fd: &OwnedFd) -> Result<(), String> {
    // SAFETY: `st` is plain data fstat fills in for a valid fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we own and a stat buffer of the right type.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(format!("fstat: {}", std::io::Error::last_os_error()));
    }
    // Anonymous inodes (eventfd, timerfd, ...) have no file type bits.
    if st.st_mode & libc::S_IFMT != 0 {
        return Err("not an eventfd".into());
    }
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(name) if name.as_os_str() != "anon_inode:[eventfd]" => {
            return Err(format!("not an eventfd: {}", name.display()))
        }
        Ok(_) => {}
        Err(e) if std::path::Path::new("/proc/self/fd").exists() => {
            return Err(format!("/proc/self/fd: {e}"))
        }
        Err(_) => {}
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    let ok = unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        fl >= 0 && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn elapsed_us(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn reply_u64(conn: &mut Connection, msg: &Message, v: u64) -> Result<(), Error> {
    conn.reply(&msg.hdr, &v.to_ne_bytes())?;
    Ok(())
}

/// Queue `i`'s thread: waits for its kick, serves its ring, resolves
/// its misses.
///
/// A ring that stalled (unreachable, or corrupt) is served again after
/// [`STALL_RETRY_FIRST`], then twice as long each time up to
/// [`STALL_RETRY_MAX`], as well as on its next kick: with EVENT_IDX the
/// driver kicks only when its avail index passes the `avail_event` we
/// wrote last, which a ring that stalled before re-arming never updated,
/// so the kick may never come.
fn queue_thread(sh: &Shared, i: usize) {
    let ctl = &sh.ctl[i];
    // (when, backoff) of the next retry of a stalled ring
    let mut retry: Option<(Instant, Duration)> = None;
    while !sh.exit.load(Ordering::Acquire) {
        let kick = {
            let s = sh.vrings[i].lock();
            match (&s.kick, s.enabled, s.ring.is_some()) {
                (Some(k), true, true) => Some(k.clone()),
                _ => None,
            }
        };
        let mut pfds = [
            libc::pollfd {
                fd: ctl.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: kick.as_ref().map_or(-1, |k| k.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = retry.map_or(1000, |(at, _)| {
            at.saturating_duration_since(Instant::now())
                .as_millis()
                .min(1000) as i32
        });
        // SAFETY: `pfds` is a valid array of pollfd for the call (poll
        // ignores the entry with fd -1); the kick eventfd stays open
        // while we hold its Arc.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            continue;
        }
        if pfds[0].revents != 0 {
            let _ = ctl.wake.read();
        }
        let Some(k) = &kick else {
            retry = None;
            continue;
        };
        let kicked = pfds[1].revents != 0;
        if kicked {
            let _ = k.read();
        }
        let due = retry.is_some_and(|(at, _)| Instant::now() >= at);
        if kicked || due {
            retry = if serve_ring(sh, i) {
                let backoff = match retry {
                    Some((_, b)) if due => (b * 2).min(STALL_RETRY_MAX),
                    Some((_, b)) => b,
                    None => STALL_RETRY_FIRST,
                };
                Some((Instant::now() + backoff, backoff))
            } else {
                None
            };
        }
    }
}

/// First retry of a stalled ring.
const STALL_RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between retries of a stalled ring.
const STALL_RETRY_MAX: Duration = Duration::from_secs(30);

/// Chains served before the call eventfd is signalled even though the
/// ring is not empty yet, so a driver that keeps the ring full still hears
/// of its completions.
const SIGNAL_EVERY: u32 = 32;

/// Serves ring `i` until it is empty or stalls, resolving misses.
///
/// Each chain is served in an access section of its own: the access lock
/// (read) and the ring's mutex are released after every chain, and
/// released *fairly*, handed straight to a thread that waits for them. So
/// an invalidation or memory-table change (which takes `access` for
/// writing) and GET_VRING_BASE (which takes the ring's mutex) wait for at
/// most the chain in progress, however busy the ring is, and never for
/// the ring to drain.
///
/// Completions are signalled once per batch: when the ring is found
/// empty (after re-arming the driver's kick with EVENT_IDX, see
/// [`Vring::rearm`]), stalls or misses, or every `SIGNAL_EVERY` chains,
/// and with EVENT_IDX only when `used_event` asks for it.
///
/// True when the ring stalled (see `queue_thread`).
fn serve_ring(sh: &Shared, i: usize) -> bool {
    loop {
        let access = sh.access.read();
        let mut slot = sh.vrings[i].lock();
        if !slot.enabled {
            return false;
        }
        let Some(ring) = slot.ring.as_mut() else {
            return false;
        };
        if sh.exit.load(Ordering::Acquire) && !ring.chain_in_progress() {
            // Draining: no new chain.
            slot.signal(sh);
            return false;
        }
        let outcome = match ring.step(sh) {
            Step::Empty => ring.rearm(sh),
            other => other,
        };
        // Draining (graceful stop): no new chain once the one in progress
        // (retried after its misses) is done.
        let leaving = sh.exit.load(Ordering::Acquire) && !ring.chain_in_progress();
        if outcome == Step::Done {
            slot.unsignalled += 1;
        }
        let batch_end = !matches!(outcome, Step::Done | Step::Again);
        if batch_end || slot.unsignalled >= SIGNAL_EVERY || leaving {
            slot.signal(sh);
        }
        MutexGuard::unlock_fair(slot);
        RwLockReadGuard::unlock_fair(access);
        match outcome {
            Step::Done | Step::Again => {}
            Step::Miss(misses) => resolve_misses(sh, i, &misses),
            Step::Empty => return false,
            Step::Stalled => {
                sh.stats.bump(&sh.stats.ring_stalls);
                return true;
            }
        }
        if leaving {
            return false;
        }
    }
}

fn resolve_misses(sh: &Shared, i: usize, misses: &[(u64, Perm)]) {
    sh.stats.add(&sh.stats.misses, misses.len() as u64);
    let chan = sh.backend.lock().clone();
    let Some(chan) = chan else {
        sh.stats.add(&sh.stats.miss_failures, misses.len() as u64);
        log::warn!("IOTLB miss at {:#x} without a backend channel", misses[0].0);
        return;
    };
    // Another queue thread may hold the channel for its own misses: we
    // wait for our turn holding nothing (no access section, no ring).
    let t = Instant::now();
    let answers = chan
        .lock()
        .iotlb_misses(misses, &sh.ctl[i].stop, sh.miss_timeout);
    sh.stats.add(&sh.stats.miss_wait_us, elapsed_us(t));
    match answers {
        Ok(answers) => {
            for (&(iova, perm), ok) in misses.iter().zip(answers) {
                if ok {
                    log::debug!("IOTLB miss {iova:#x} {perm}: answered");
                } else {
                    sh.stats.bump(&sh.stats.miss_failures);
                    log::debug!("IOTLB miss {iova:#x} {perm}: no translation");
                }
            }
        }
        Err(e) => {
            sh.stats.add(&sh.stats.miss_failures, misses.len() as u64);
            log::warn!(
                "IOTLB misses at {:#x} ({} in all): {e}",
                misses[0].0,
                misses.len()
            );
        }
    }
}
