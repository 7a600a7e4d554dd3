// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user wire: frames on the frontend socket and on the backend
//! channel, and the IOTLB messages rust-vmm's `vhost` 0.18 lacks.
//!
//! `vhost` 0.18 gives the request codes (`FrontendReq::IOTLB_MSG`,
//! `BackendReq::IOTLB_MSG`), the protocol feature bits and the payload
//! structs we use, but its message header and socket endpoint are
//! crate-private, its backend handler answers `IOTLB_MSG` with an error,
//! and its `Backend` (the backend channel) cannot send a miss. So this
//! module carries the frame codec itself (a 12-byte header, a payload of at
//! most `MAX_MSG_SIZE` bytes, file descriptors as `SCM_RIGHTS`) and adds:
//!
//! - [`VhostUserIotlb`], the `struct vhost_iotlb_msg` payload, with
//!   [`IotlbMsg::parse`] turning it into a checked update or invalidation;
//! - [`BackendChannel::iotlb_miss`], a miss sent with `NEED_REPLY` so that
//!   the frontend's answer says whether it could translate.
//!
//! As an upstream patch these are: the payload struct and its validator in
//! `message.rs`, an `iotlb_msg()` method on `VhostUserBackendReqHandler`
//! (dispatched from `BackendReqHandler::handle_request`, acked like
//! `REPLY_ACK`), and `Backend::iotlb_miss()` in `backend_req.rs`
//! (`docs/vhost-user.md`).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{BackendReq, FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use pvdma::Perm;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer closed the socket.
    #[error("peer closed the socket")]
    Closed,
    /// A socket call failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The header announces more payload than any message has: the stream
    /// cannot be resynchronised.
    #[error("payload of {0:#x} bytes exceeds the maximum")]
    Oversized(u32),
    /// The header's version is not 1.
    #[error("bad header flags {0:#x}")]
    BadFlags(u32),
    /// The backend channel's answer is not a reply to our request.
    #[error("unexpected reply on the backend channel: request {request}, flags {flags:#x}")]
    BadReply {
        /// Request code of the reply.
        request: u32,
        /// Its flags.
        flags: u32,
    },
    /// No answer within the time limit, or the device stopped waiting.
    #[error("no answer on the backend channel")]
    NoAnswer,
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Reads a `T` from exactly `T`'s size of bytes, at any alignment
/// (`ByteValued::from_slice` wants the slice aligned for `T`).
pub fn read_pod<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    if bytes.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(bytes);
    Some(v)
}

/// Protocol version in the low two flag bits.
pub const VERSION: u32 = 0x1;
/// The message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// The sender wants a reply (REPLY_ACK).
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// A vhost-user message header (`VhostUserMsgHeader` in `vhost`, which
/// does not export it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Version and flags.
    pub flags: u32,
    /// Payload bytes that follow.
    pub size: u32,
}

// SAFETY: three u32, no padding; every bit pattern is a valid value.
unsafe impl ByteValued for Header {}

impl Header {
    /// Whether the sender asked for an acknowledgement.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

/// `struct vhost_iotlb_msg`, the payload of `IOTLB_MSG` on both channels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VhostUserIotlb {
    /// I/O virtual address.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// The frontend's user address the range translates to.
    pub user_addr: u64,
    /// `VHOST_ACCESS_RO` (1), `_WO` (2), `_RW` (3).
    pub perm: u8,
    /// [`IotlbType`].
    pub msg_type: u8,
    /// Padding to the C struct's size.
    pub padding: [u8; 6],
}

// SAFETY: plain integers and a byte array, with explicit padding: every
// bit pattern is a valid value.
unsafe impl ByteValued for VhostUserIotlb {}

/// `VHOST_IOTLB_*` message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum IotlbType {
    /// Backend -> frontend: translate this IOVA.
    Miss = 1,
    /// Frontend -> backend: add a translation.
    Update = 2,
    /// Frontend -> backend: remove translations.
    Invalidate = 3,
    /// Backend -> frontend: an access was refused.
    AccessFail = 4,
}

/// A checked IOTLB request from the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbMsg {
    /// `[iova, iova + size)` translates to the frontend's `user_addr` with
    /// `perm`.
    Update {
        /// First IOVA.
        iova: u64,
        /// Bytes, > 0, `iova + size` does not wrap.
        size: u64,
        /// Frontend user address of `iova`.
        user_addr: u64,
        /// Non-empty.
        perm: Perm,
    },
    /// Remove every translation overlapping `[iova, iova + size)`; size 0
    /// means up to the end of the address space (as the kernel's vhost
    /// reads it: `last = iova + size - 1`).
    Invalidate {
        /// First IOVA.
        iova: u64,
        /// Bytes; 0: to the end.
        size: u64,
    },
}

/// Why an IOTLB message is refused (answered with a non-zero ack).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IotlbMsgError {
    /// The payload is not a `vhost_iotlb_msg`.
    #[error("payload of {0} bytes is not a vhost_iotlb_msg")]
    Size(usize),
    /// Not a type the frontend may send.
    #[error("IOTLB message type {0} not accepted from the frontend")]
    Type(u8),
    /// Permission not RO/WO/RW.
    #[error("IOTLB update with permission {0:#x}")]
    Perm(u8),
    /// An update of no bytes.
    #[error("IOTLB update of size 0 at IOVA {0:#x}")]
    Empty(u64),
    /// The range wraps the 64-bit space.
    #[error("IOTLB range at {iova:#x} of {size:#x} bytes wraps")]
    Wraps {
        /// First address.
        iova: u64,
        /// Bytes.
        size: u64,
    },
}

impl IotlbMsg {
    /// Checks a frontend `IOTLB_MSG` payload.
    pub fn parse(payload: &[u8]) -> std::result::Result<IotlbMsg, IotlbMsgError> {
        let msg: VhostUserIotlb = read_pod(payload).ok_or(IotlbMsgError::Size(payload.len()))?;
        let wraps = |base: u64| {
            base.checked_add(msg.size)
                .is_none_or(|end| end == 0 && msg.size != 0)
        };
        match msg.msg_type {
            t if t == IotlbType::Update as u8 => {
                let perm = match msg.perm {
                    p @ 1..=3 => Perm::from_bits_truncate(p),
                    p => return Err(IotlbMsgError::Perm(p)),
                };
                if msg.size == 0 {
                    return Err(IotlbMsgError::Empty(msg.iova));
                }
                if wraps(msg.iova) || wraps(msg.user_addr) {
                    return Err(IotlbMsgError::Wraps {
                        iova: msg.iova,
                        size: msg.size,
                    });
                }
                Ok(IotlbMsg::Update {
                    iova: msg.iova,
                    size: msg.size,
                    user_addr: msg.user_addr,
                    perm,
                })
            }
            t if t == IotlbType::Invalidate as u8 => {
                // An end exactly at 2^64 is fine here: it is "to the end".
                if msg.size != 0 && msg.iova.checked_add(msg.size - 1).is_none() {
                    return Err(IotlbMsgError::Wraps {
                        iova: msg.iova,
                        size: msg.size,
                    });
                }
                Ok(IotlbMsg::Invalidate {
                    iova: msg.iova,
                    size: msg.size,
                })
            }
            t => Err(IotlbMsgError::Type(t)),
        }
    }
}

/// A frame read from the frontend.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub hdr: Header,
    /// Its payload (`hdr.size` bytes).
    pub payload: Vec<u8>,
    /// File descriptors that came with it (closed on drop).
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// The request, if it is one `vhost` knows.
    pub fn request(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.hdr.request).ok()
    }

    /// The payload as a `T`, if it has exactly `T`'s size.
    pub fn payload<T: ByteValued + Default>(&self) -> Option<T> {
        read_pod(&self.payload)
    }
}

/// The frontend socket.
#[derive(Debug)]
pub struct Connection {
    sock: UnixStream,
}

impl Connection {
    /// Wraps an accepted stream.
    pub fn new(sock: UnixStream) -> Self {
        Connection { sock }
    }

    /// The socket (for poll).
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Reads one frame. Descriptors are owned as soon as they arrive, so
    /// none leaks whatever the frame turns out to be.
    pub fn recv(&mut self) -> Result<Message> {
        let mut hdr = Header::default();
        let mut raw = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_slice().as_mut_ptr().cast(),
            iov_len: std::mem::size_of::<Header>(),
        }];
        // SAFETY: the iovec covers `hdr`, a plain-integer struct any bytes
        // are valid for, borrowed mutably for the call.
        let (got, nfds) = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| Error::Io(io::Error::from_raw_os_error(e.errno())))?;
        let fds: Vec<OwnedFd> = raw[..nfds.min(raw.len())]
            .iter()
            // SAFETY: recvmsg installed these descriptors in our table just
            // now; nothing else owns them.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if got == 0 {
            return Err(Error::Closed);
        }
        let hsize = std::mem::size_of::<Header>();
        if got < hsize {
            read_exact(&mut self.sock, &mut hdr.as_mut_slice()[got..])?;
        }
        if hdr.flags & 0x3 != VERSION {
            return Err(Error::BadFlags(hdr.flags));
        }
        if hdr.size as usize > MAX_MSG_SIZE {
            return Err(Error::Oversized(hdr.size));
        }
        let mut payload = vec![0u8; hdr.size as usize];
        read_exact(&mut self.sock, &mut payload)?;
        Ok(Message { hdr, payload, fds })
    }

    /// Sends a reply to `req` carrying `payload`.
    pub fn reply(&mut self, req: &Header, payload: &[u8]) -> Result<()> {
        let hdr = Header {
            request: req.request,
            flags: VERSION | FLAG_REPLY,
            size: payload.len() as u32,
        };
        let mut frame = Vec::with_capacity(std::mem::size_of::<Header>() + payload.len());
        frame.extend_from_slice(hdr.as_slice());
        frame.extend_from_slice(payload);
        self.sock.write_all(&frame)?;
        Ok(())
    }

    /// Sends a reply to `req` carrying `payload` and `fds` (SCM_RIGHTS
    /// with the frame's first bytes, as vhost-user asks).
    pub fn reply_with_fds(&mut self, req: &Header, payload: &[u8], fds: &[RawFd]) -> Result<()> {
        let hdr = Header {
            request: req.request,
            flags: VERSION | FLAG_REPLY,
            size: payload.len() as u32,
        };
        let mut frame = Vec::with_capacity(std::mem::size_of::<Header>() + payload.len());
        frame.extend_from_slice(hdr.as_slice());
        frame.extend_from_slice(payload);
        let sent = self
            .sock
            .send_with_fds(&[&frame[..]], fds)
            .map_err(|e| Error::Io(io::Error::from_raw_os_error(e.errno())))?;
        if sent < frame.len() {
            self.sock.write_all(&frame[sent..])?;
        }
        Ok(())
    }

    /// Sends the u64 acknowledgement of REPLY_ACK (0: success).
    pub fn ack(&mut self, req: &Header, value: u64) -> Result<()> {
        self.reply(req, &value.to_ne_bytes())
    }
}

fn read_exact(sock: &mut UnixStream, buf: &mut [u8]) -> Result<()> {
    match sock.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::Closed),
        Err(e) => Err(Error::Io(e)),
    }
}

/// The backend channel (`SET_BACKEND_REQ_FD`): requests from us to the
/// frontend. Used by one thread at a time (the caller serialises).
#[derive(Debug)]
pub struct BackendChannel {
    sock: UnixStream,
    /// Replies still to come for requests whose wait was abandoned: each
    /// is read and dropped before the reply to a later request.
    owed: usize,
    /// The stream lost its framing (a reply that is not ours): whatever
    /// is readable is dropped before the next request.
    stale: bool,
}

impl BackendChannel {
    /// Wraps the descriptor from `SET_BACKEND_REQ_FD`.
    pub fn new(fd: OwnedFd) -> Self {
        BackendChannel {
            sock: UnixStream::from(fd),
            owed: 0,
            stale: false,
        }
    }

    /// Sends an IOTLB miss for `iova` with `perm`, with `NEED_REPLY`, and
    /// waits for the frontend's acknowledgement. QEMU answers only after it
    /// has translated and sent (and had acked) the `IOTLB_MSG` update on
    /// the frontend socket, so `Ok(true)` means the update is in. `Ok(false)`:
    /// the frontend could not translate (the guest has no such mapping, or
    /// not with that permission). Waiting ends early when `stop` is
    /// signalled (the ring is being stopped) or after `timeout`.
    pub fn iotlb_miss(
        &mut self,
        iova: u64,
        perm: Perm,
        stop: &EventFd,
        timeout: Duration,
    ) -> Result<bool> {
        Ok(self.iotlb_misses(&[(iova, perm)], stop, timeout)?[0])
    }

    /// [`BackendChannel::iotlb_miss`] for several addresses at once: every
    /// miss is sent before the first reply is awaited, so the frontend
    /// answers them back to back instead of one per round trip through
    /// the queue thread. One answer per miss, in order.
    pub fn iotlb_misses(
        &mut self,
        misses: &[(u64, Perm)],
        stop: &EventFd,
        timeout: Duration,
    ) -> Result<Vec<bool>> {
        if self.stale {
            self.drain()?;
        }
        let hdr = Header {
            request: BackendReq::IOTLB_MSG.into(),
            flags: VERSION | FLAG_NEED_REPLY,
            size: std::mem::size_of::<VhostUserIotlb>() as u32,
        };
        let mut frames = Vec::with_capacity(misses.len() * (12 + 32));
        for &(iova, perm) in misses {
            let msg = VhostUserIotlb {
                iova,
                size: 0,
                user_addr: 0,
                perm: perm.bits(),
                msg_type: IotlbType::Miss as u8,
                padding: [0; 6],
            };
            frames.extend_from_slice(hdr.as_slice());
            frames.extend_from_slice(msg.as_slice());
        }
        self.sock.write_all(&frames)?;
        self.owed += misses.len();

        let deadline = Instant::now() + timeout;
        let mut answers = Vec::with_capacity(misses.len());
        while answers.len() < misses.len() {
            self.wait_reply(stop, deadline)?;
            let mut rhdr = Header::default();
            read_exact(&mut self.sock, rhdr.as_mut_slice())?;
            if rhdr.request != u32::from(BackendReq::IOTLB_MSG)
                || rhdr.flags & FLAG_REPLY == 0
                || rhdr.size != 8
            {
                self.owed = 0;
                self.stale = true;
                return Err(Error::BadReply {
                    request: rhdr.request,
                    flags: rhdr.flags,
                });
            }
            let mut val = [0u8; 8];
            read_exact(&mut self.sock, &mut val)?;
            // Replies to abandoned requests come first; ours are the last
            // `misses.len()` still owed.
            if self.owed <= misses.len() - answers.len() {
                answers.push(u64::from_ne_bytes(val) == 0);
            }
            self.owed -= 1;
        }
        Ok(answers)
    }

    /// Waits until a reply is readable; `NoAnswer` when `stop` is
    /// signalled or `deadline` passes (the replies stay owed).
    fn wait_reply(&mut self, stop: &EventFd, deadline: Instant) -> Result<()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::NoAnswer);
            }
            let mut pfd = [
                libc::pollfd {
                    fd: self.sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `pfd` is a valid array of two pollfd for the call.
            let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if pfd[1].revents != 0 {
                return Err(Error::NoAnswer);
            }
            if pfd[0].revents != 0 {
                return Ok(());
            }
        }
    }

    /// Discards whatever is readable now.
    fn drain(&mut self) -> Result<()> {
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: `buf` is writable for its length; MSG_DONTWAIT makes
            // the call return at once when nothing is queued.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
        }
        self.stale = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    fn iotlb(t: u8, iova: u64, size: u64, uaddr: u64, perm: u8) -> Vec<u8> {
        VhostUserIotlb {
            iova,
            size,
            user_addr: uaddr,
            perm,
            msg_type: t,
            padding: [0; 6],
        }
        .as_slice()
        .to_vec()
    }

    #[test]
    fn wire_layout_matches_vhost_iotlb_msg() {
        assert_eq!(size_of::<Header>(), 12);
        assert_eq!(size_of::<VhostUserIotlb>(), 32);
        assert_eq!(offset_of!(VhostUserIotlb, user_addr), 16);
        assert_eq!(offset_of!(VhostUserIotlb, perm), 24);
        assert_eq!(offset_of!(VhostUserIotlb, msg_type), 25);
    }

    #[test]
    fn parse_accepts_updates_and_invalidations() {
        assert_eq!(
            IotlbMsg::parse(&iotlb(2, 0x1000, 0x2000, 0x7f00_0000_0000, 3)),
            Ok(IotlbMsg::Update {
                iova: 0x1000,
                size: 0x2000,
                user_addr: 0x7f00_0000_0000,
                perm: Perm::RW
            })
        );
        assert_eq!(
            IotlbMsg::parse(&iotlb(3, 0x1000, 0x1000, 0, 0)),
            Ok(IotlbMsg::Invalidate {
                iova: 0x1000,
                size: 0x1000
            })
        );
        // size 0: to the end; the whole space from 0 as well
        assert_eq!(
            IotlbMsg::parse(&iotlb(3, 0, 0, 0, 0)),
            Ok(IotlbMsg::Invalidate { iova: 0, size: 0 })
        );
        // ending exactly at 2^64 is not a wrap for an invalidation
        assert!(IotlbMsg::parse(&iotlb(3, 1 << 63, 1 << 63, 0, 0)).is_ok());
    }

    #[test]
    fn parse_refuses_hostile_messages() {
        assert_eq!(IotlbMsg::parse(&[0u8; 31]), Err(IotlbMsgError::Size(31)));
        assert_eq!(IotlbMsg::parse(&[0u8; 40]), Err(IotlbMsgError::Size(40)));
        for t in [0u8, 1, 4, 5, 0xff] {
            assert_eq!(
                IotlbMsg::parse(&iotlb(t, 0, 0x1000, 0, 3)),
                Err(IotlbMsgError::Type(t))
            );
        }
        for p in [0u8, 4, 0x83] {
            assert_eq!(
                IotlbMsg::parse(&iotlb(2, 0, 0x1000, 0, p)),
                Err(IotlbMsgError::Perm(p))
            );
        }
        assert_eq!(
            IotlbMsg::parse(&iotlb(2, 0x5000, 0, 0, 3)),
            Err(IotlbMsgError::Empty(0x5000))
        );
        assert!(matches!(
            IotlbMsg::parse(&iotlb(2, u64::MAX - 0xfff, 0x2000, 0, 3)),
            Err(IotlbMsgError::Wraps { .. })
        ));
        // An update ending exactly at 2^64 wraps too: no byte is addressable there
        assert!(matches!(
            IotlbMsg::parse(&iotlb(2, u64::MAX - 0xfff, 0x1000, 0, 3)),
            Err(IotlbMsgError::Wraps { .. })
        ));
        assert!(matches!(
            IotlbMsg::parse(&iotlb(2, 0, 0x2000, u64::MAX - 0xfff, 3)),
            Err(IotlbMsgError::Wraps { .. })
        ));
        assert!(matches!(
            IotlbMsg::parse(&iotlb(3, u64::MAX, 2, 0, 0)),
            Err(IotlbMsgError::Wraps { .. })
        ));
    }

    #[test]
    fn frames_round_trip_with_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(a);
        let hdr = Header {
            request: FrontendReq::SET_VRING_KICK.into(),
            flags: VERSION | FLAG_NEED_REPLY,
            size: 8,
        };
        let ev = EventFd::new(0).unwrap();
        let mut frame = hdr.as_slice().to_vec();
        frame.extend_from_slice(&0u64.to_ne_bytes());
        b.send_with_fds(&[&frame[..]], &[ev.as_raw_fd()]).unwrap();
        let m = conn.recv().unwrap();
        assert_eq!(m.request(), Some(FrontendReq::SET_VRING_KICK));
        assert!(m.hdr.need_reply());
        assert_eq!(m.fds.len(), 1);
        assert_eq!(m.payload::<u64>(), Some(0));
        conn.ack(&m.hdr, 0).unwrap();
        let mut back = [0u8; 20];
        (&b).read_exact(&mut back).unwrap();
        assert_eq!(&back[4..8], &(VERSION | FLAG_REPLY).to_ne_bytes());

        // an oversized payload cannot be skipped: the stream is dropped
        let bad = Header {
            request: 1,
            flags: VERSION,
            size: 0x10000,
        };
        (&b).write_all(bad.as_slice()).unwrap();
        assert!(matches!(conn.recv(), Err(Error::Oversized(0x10000))));
        drop(b);
        assert!(matches!(conn.recv(), Err(Error::Closed)));
    }

    #[test]
    fn miss_waits_for_the_ack_and_gives_up_on_stop() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut chan = BackendChannel::new(OwnedFd::from(a));
        let stop = EventFd::new(0).unwrap();
        let frontend = std::thread::spawn(move || {
            let mut b = b;
            for answer in [0u64, 1] {
                let mut m = [0u8; 44];
                b.read_exact(&mut m).unwrap();
                let hdr: Header = read_pod(&m[..12]).unwrap();
                let msg: VhostUserIotlb = read_pod(&m[12..]).unwrap();
                assert_eq!(hdr.request, 1);
                assert!(hdr.need_reply());
                assert_eq!(msg.msg_type, IotlbType::Miss as u8);
                assert_eq!(msg.iova, 0xabc000);
                let r = Header {
                    request: hdr.request,
                    flags: VERSION | FLAG_REPLY,
                    size: 8,
                };
                b.write_all(r.as_slice()).unwrap();
                b.write_all(&answer.to_ne_bytes()).unwrap();
            }
            b
        });
        let t = Duration::from_secs(10);
        assert!(chan.iotlb_miss(0xabc000, Perm::WRITE, &stop, t).unwrap());
        assert!(!chan.iotlb_miss(0xabc000, Perm::READ, &stop, t).unwrap());
        let _b = frontend.join().unwrap();
        // nobody answers: stop ends the wait
        stop.write(1).unwrap();
        assert!(matches!(
            chan.iotlb_miss(0x1000, Perm::READ, &stop, t),
            Err(Error::NoAnswer)
        ));
    }

    /// Reads one miss from `b` and answers it with `answer`; its IOVA.
    fn answer_miss(b: &mut UnixStream, answer: u64) -> u64 {
        let mut m = [0u8; 44];
        b.read_exact(&mut m).unwrap();
        let msg: VhostUserIotlb = read_pod(&m[12..]).unwrap();
        let r = Header {
            request: 1,
            flags: VERSION | FLAG_REPLY,
            size: 8,
        };
        b.write_all(r.as_slice()).unwrap();
        b.write_all(&answer.to_ne_bytes()).unwrap();
        msg.iova
    }

    #[test]
    fn batched_misses_and_late_replies_stay_in_step() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut chan = BackendChannel::new(OwnedFd::from(a));
        let stop = EventFd::new(0).unwrap();
        let t = Duration::from_secs(10);
        // Two misses abandoned before any reply (the ring stopped).
        stop.write(1).unwrap();
        let two = [(0x1000, Perm::READ), (0x2000, Perm::WRITE)];
        assert!(matches!(
            chan.iotlb_misses(&two, &stop, t),
            Err(Error::NoAnswer)
        ));
        stop.read().unwrap();
        // Their replies come late, a refusal and a success, then the
        // answers to a batch of three: the late ones must not be taken
        // for the batch's.
        let frontend = std::thread::spawn(move || {
            let mut iovas = vec![answer_miss(&mut b, 1), answer_miss(&mut b, 0)];
            for answer in [0, 1, 0] {
                iovas.push(answer_miss(&mut b, answer));
            }
            (b, iovas)
        });
        let three = [
            (0x3000, Perm::READ),
            (0x4000, Perm::WRITE),
            (0x5000, Perm::READ),
        ];
        assert_eq!(
            chan.iotlb_misses(&three, &stop, t).unwrap(),
            vec![true, false, true]
        );
        let (_b, iovas) = frontend.join().unwrap();
        assert_eq!(iovas, vec![0x1000, 0x2000, 0x3000, 0x4000, 0x5000]);
        assert_eq!(chan.owed, 0);
    }
}
