// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `pvdma-vhost-user-blk`: a vhost-user-blk backend serving a raw image,
//! whose every access to the guest's rings and buffers goes through pvdma's
//! translation table, fed by the frontend's vhost-user IOTLB messages when
//! the device is behind an IOMMU (`iommu_platform=on`).
//!
//! User guide: `docs/vhost-user.md`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use pvdma_vhost_user_blk::device::{Device, Mode, Options, MAX_QUEUES};
use pvdma_vhost_user_blk::proto::{self, Connection};

const USAGE: &str = "\
Usage: pvdma-vhost-user-blk --socket-path PATH --blk-file IMAGE [OPTIONS]

A vhost-user-blk backend. Behind a vIOMMU (iommu_platform=on) it reaches the
guest's rings and buffers only through IOVA translations that QEMU sends as
vhost-user IOTLB messages, kept in pvdma's lock-free table.

Options:
  --socket-path PATH      listen on this unix socket (created; a stale socket
                          file there is replaced)
  --blk-file IMAGE        raw image to serve (size rounded down to 512 bytes)
  --read-only             serve read-only (VIRTIO_BLK_F_RO; writes fail)
  --access-mode MODE      sg (default): per-fragment slices of guest memory;
                          window: each IOTLB update mapped at base + IOVA in a
                          reserved window, one slice per descriptor
  --window-bits N         window size 2^N bytes (window mode; default 39)
  --serial ID             answer to GET_ID (default: pvdma-vhost)
  --num-queues N          queues offered (VIRTIO_BLK_F_MQ), each served by
                          a thread of its own: 1 (default) to 16; the
                          frontend's num-queues must not exceed it
  --max-iotlb-entries N   most IOTLB entries held (default 65536; fewer in
                          window mode); a full IOTLB evicts the oldest
  --miss-timeout-ms N     wait for a miss's answer at most N ms (default 5000)
  --connect-timeout S     exit when no frontend connects within S seconds
                          (default: wait forever)
  --drain-timeout-ms N    on SIGTERM/SIGINT, wait at most N ms for the
                          requests in progress (default 3000)
  --log-level LEVEL       error, warn, info (default), debug or trace
  --test-io-delay-us N    testing only: sleep N microseconds between mapping
                          a request's buffers and its I/O (so that a kill
                          lands while requests are in flight)
  --help                  this text
  --version               version

Serves one frontend connection, then exits: on socket close, on SIGINT,
SIGTERM or SIGHUP. A signal drains first: no new request is taken, the ones
in progress complete (exit 0); what is still in progress after the drain
timeout is left to the next backend process through the inflight region
(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), which QEMU hands over when it
reconnects (-chardev socket,reconnect-ms=...). Prints its counters (IOTLB
misses, updates, invalidations, I/O) to stderr at exit, and on SIGUSR1.";

struct Args {
    socket: PathBuf,
    image: PathBuf,
    opts: Options,
    connect_timeout: Option<Duration>,
    drain_timeout: Duration,
    level: log::LevelFilter,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut it = std::env::args().skip(1);
    let mut socket = None;
    let mut image = None;
    let mut opts = Options {
        mode: Mode::Sg,
        readonly: false,
        serial: "pvdma-vhost".into(),
        miss_timeout: Duration::from_secs(5),
        max_entries: 65536,
        window_bits: 39,
        test_io_delay: Duration::ZERO,
        test_crash: None,
        num_queues: 1,
    };
    let mut drain_timeout = Duration::from_secs(3);
    let mut connect_timeout = None;
    let mut level = log::LevelFilter::Info;
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut val = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or(format!("{key} needs a value"))
        };
        let num = |s: String| {
            s.parse::<u64>()
                .map_err(|_| format!("{key}: not a number: {s}"))
        };
        match key.as_str() {
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--version" | "-V" => {
                println!("pvdma-vhost-user-blk {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--socket-path" => socket = Some(PathBuf::from(val()?)),
            "--blk-file" => image = Some(PathBuf::from(val()?)),
            "--read-only" => opts.readonly = true,
            "--access-mode" => {
                opts.mode = match val()?.as_str() {
                    "sg" => Mode::Sg,
                    "window" => Mode::Window,
                    m => return Err(format!("--access-mode: sg or window, not {m}")),
                }
            }
            "--window-bits" => {
                let b = num(val()?)?;
                if !(21..=46).contains(&b) {
                    return Err("--window-bits: 21..=46".into());
                }
                opts.window_bits = b as u32;
            }
            "--serial" => opts.serial = val()?,
            "--num-queues" => {
                let n = num(val()?)?;
                if !(1..=MAX_QUEUES as u64).contains(&n) {
                    return Err(format!("--num-queues: 1..={MAX_QUEUES}"));
                }
                opts.num_queues = n as usize;
            }
            "--max-iotlb-entries" => opts.max_entries = num(val()?)?.max(1) as usize,
            "--miss-timeout-ms" => opts.miss_timeout = Duration::from_millis(num(val()?)?),
            "--connect-timeout" => connect_timeout = Some(Duration::from_secs(num(val()?)?)),
            "--test-io-delay-us" => opts.test_io_delay = Duration::from_micros(num(val()?)?),
            "--drain-timeout-ms" => drain_timeout = Duration::from_millis(num(val()?)?),
            "--log-level" => {
                level = val()?
                    .parse()
                    .map_err(|_| "--log-level: error, warn, info, debug or trace".to_string())?
            }
            other => return Err(format!("unknown option {other} (see --help)")),
        }
    }
    Ok(Some(Args {
        socket: socket.ok_or("--socket-path is required")?,
        image: image.ok_or("--blk-file is required")?,
        opts,
        connect_timeout,
        drain_timeout,
        level,
    }))
}

/// Logs to stderr: `[time level target] message`.
struct Logger {
    start: Instant,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let t = self.start.elapsed();
            let _ = writeln!(
                std::io::stderr().lock(),
                "[{:>4}.{:03} {:<5} vhost-user-blk] {}",
                t.as_secs(),
                t.subsec_millis(),
                r.level(),
                r.args()
            );
        }
    }

    fn flush(&self) {}
}

/// The eventfd the signal handler writes to (-1: none yet).
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
/// Set by SIGUSR1: print the counters and go on.
static STATS_ASKED: AtomicBool = AtomicBool::new(false);
/// Set by SIGINT, SIGTERM, SIGHUP: exit.
static EXIT_ASKED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGUSR1 {
        STATS_ASKED.store(true, Ordering::Relaxed);
    } else {
        EXIT_ASKED.store(true, Ordering::Relaxed);
    }
    let fd = SIGNAL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; `one` lives for the call.
        unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
    }
}

fn install_signals(fd: i32) {
    SIGNAL_FD.store(fd, Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
        // SAFETY: a handler that only does an async-signal-safe write.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    // A closed socket is an error from write, not a fatal signal.
    // SAFETY: ignoring SIGPIPE has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Waits until `fd` is readable or an exit signal came: Ok(true) when
/// readable. `on_stats` runs for each SIGUSR1.
fn wait_readable(
    fd: i32,
    sig: &vmm_sys_util::eventfd::EventFd,
    timeout: Option<Duration>,
    on_stats: &dyn Fn(),
) -> std::io::Result<bool> {
    let sigfd = sig.as_raw_fd();
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
                }
                left.as_millis().min(i32::MAX as u128) as i32
            }
            None => -1,
        };
        let mut p = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `p` is a valid pollfd array for the call.
        let n = unsafe { libc::poll(p.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if p[1].revents != 0 {
            let _ = sig.read();
            if STATS_ASKED.swap(false, Ordering::Relaxed) {
                on_stats();
            }
            if EXIT_ASKED.load(Ordering::Relaxed) {
                return Ok(false);
            }
            continue;
        }
        if p[0].revents != 0 {
            return Ok(true);
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let image = OpenOptions::new()
        .read(true)
        .write(!args.opts.readonly)
        .open(&args.image)
        .map_err(|e| format!("{}: {e}", args.image.display()))?;
    let sig = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
    install_signals(sig.as_raw_fd());

    if let Ok(md) = std::fs::symlink_metadata(&args.socket) {
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(&args.socket);
        }
    }
    let listener =
        UnixListener::bind(&args.socket).map_err(|e| format!("{}: {e}", args.socket.display()))?;
    log::info!(
        "listening on {} ({} mode, {})",
        args.socket.display(),
        if args.opts.mode == Mode::Sg {
            "sg"
        } else {
            "window"
        },
        args.image.display()
    );
    let accepted = wait_readable(listener.as_raw_fd(), &sig, args.connect_timeout, &|| {});
    let _ = std::fs::remove_file(&args.socket);
    match accepted {
        Ok(true) => {}
        Ok(false) => {
            log::info!("signal before any connection: exiting");
            return Ok(());
        }
        Err(e) => return Err(format!("waiting for the frontend: {e}")),
    }
    let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
    drop(listener);
    log::info!("frontend connected");
    let mut conn = Connection::new(stream);
    let mut dev = Device::new(image, &args.opts).map_err(|e| e.to_string())?;
    let mut signalled = false;
    let result = loop {
        let stats = || {
            eprintln!(
                "pvdma-vhost-user-blk: stats: {}",
                dev.shared().stats.summary()
            )
        };
        match wait_readable(conn.raw_fd(), &sig, None, &stats) {
            Ok(true) => {}
            Ok(false) => {
                log::info!(
                    "signal: draining (at most {} ms)",
                    args.drain_timeout.as_millis()
                );
                signalled = true;
                break Ok(());
            }
            Err(e) => break Err(e.to_string()),
        }
        let msg = match conn.recv() {
            Ok(m) => m,
            Err(proto::Error::Closed) => {
                log::info!("frontend closed the socket: exiting");
                break Ok(());
            }
            Err(e) => break Err(format!("frontend socket: {e}")),
        };
        if let Err(e) = dev.handle(&mut conn, msg) {
            break Err(format!("frontend socket: {e}"));
        }
    };
    if signalled && !dev.drain(&mut conn, args.drain_timeout) {
        log::warn!(
            "signal: the requests in progress did not finish within {} ms: exiting anyway \
             (the inflight region has them; the next backend serves them again)",
            args.drain_timeout.as_millis()
        );
        eprintln!(
            "pvdma-vhost-user-blk: stats: {}",
            dev.shared().stats.summary()
        );
        std::process::exit(0);
    }
    dev.shutdown();
    eprintln!(
        "pvdma-vhost-user-blk: stats: {}",
        dev.shared().stats.summary()
    );
    result
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pvdma-vhost-user-blk: {e}");
            return ExitCode::from(2);
        }
    };
    log::set_max_level(args.level);
    let _ = log::set_boxed_logger(Box::new(Logger {
        start: Instant::now(),
    }));
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
