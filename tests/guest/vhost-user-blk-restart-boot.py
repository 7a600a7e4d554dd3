#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""One boot of the I/O guest whose virtio-blk disk is served by
pvdma-vhost-user-blk processes that the harness kills and restarts under
the guest's I/O; nothing may be lost.

    vhost-user-blk-restart-boot.py --backend BIN [--qemu BIN]
        [--kernel 6.1|6.12|7.2] [--variant pvdma|none] [--strict]
        [--access-mode sg|window] [--kills N]
        [--graceful N] [--stress-secs S] [--jobs N] [--reconnect-ms MS]
        [--num-queues N]
        [--io-delay-us US] [--expect-resubmit] [--seed N] [--timeout S]
        [--quiet] [--summary-file F]

QEMU's chardev reconnects (`-chardev socket,...,reconnect-ms=MS`) to the
backend's socket path. The guest (guest/io/init, pvdmaio.stress) runs
pvdma-io disk-stress on the disk: JOBS threads of O_DIRECT writes and
reads, every byte of every read checked against what was written, then
the whole area read back. Meanwhile the harness, each time the backend in
service has served requests, waits a random moment and then
  - SIGKILLs it (--kills times), as soon as one of its threads sleeps in
    the I/O delay (below), that is inside a request (after 2 s anyway), or
  - SIGTERMs it (--graceful times), also inside a request: it must finish
    what it took and exit with status 0,
and at once starts a new backend process on the same socket path and the
same image; QEMU reconnects to it. Each backend waits --io-delay-us
between mapping a request's buffers and its I/O (--test-io-delay-us), so
that a kill finds one in flight. The new backend must serve what the old one had
taken: from the inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)
when it tracks requests there, else from the available ring, where QEMU
restarts the ring at the used index (docs/vhost-user.md, "Restarting the
backend").

Passes when the guest's stress run completes with every byte right and
the kernel logged no I/O error (guest/io/init), every restart happened
during the I/O, every backend after the first served requests (QEMU
reconnected and the I/O went on), the gracefully stopped ones exited 0,
the last one exited 0 when QEMU closed the socket, no backend counted an
I/O error, a bad chain or a ring error, and (variant pvdma) query-pvdma
shows the disk attached and no fault; with --expect-resubmit also only
when the backends counted requests resubmitted after a restart (a
counter of theirs whose name has "resubmit"), at least one fewer than
there were SIGKILLs inside a request and at least one, and the backend after a SIGTERM had nothing
to resubmit (the stopped one drained). Every backend and QEMU run under a hard
timeout and are ended on every exit path.

--variant pvdma: vhost-user-blk-pci,iommu_platform=on behind pvdma (the
guest's pvdma_iommu.ko, the backend in sg mode on IOTLB translations);
none: no IOMMU, the device without iommu_platform.
"""

import argparse
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "framework"))
import pvdma_guest as pg  # noqa: E402
from pvdma_vhost import Backend  # noqa: E402

# How long a new backend may take to serve its first request (QEMU
# reconnects, the guest's requests resume), and a stopped one to exit.
SERVE_LIMIT = 30.0
EXIT_LIMIT = 20.0
# The backend's log line once QEMU started its ring ("queue started: ..."
# or "queue 0 started: ...").
QUEUE_STARTED = re.compile(r"queue (\d+ )?started")


def killed_status(rc):
    """A backend's status (of `timeout`) says SIGKILL."""
    return rc in (-signal.SIGKILL, 128 + signal.SIGKILL)


def in_request(pid):
    """Whether a thread of the backend sleeps in --test-io-delay-us, that
    is, holds a request between mapping its buffers and its I/O (the only
    nanosleep of the backend)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/wchan") as f:
                if "nanosleep" in f.read():
                    return True
        except OSError:
            pass
    return False


def signal_in_request(pid, sig, limit=2.0):
    """Sends sig to pid as soon as it is inside a request (at most limit
    seconds from now; then anyway); True when it was."""
    deadline = time.monotonic() + limit
    inside = False
    while time.monotonic() < deadline:
        if in_request(pid):
            inside = True
            break
        time.sleep(0.0005)
    os.kill(pid, sig)
    return inside


def resubmitted(st):
    """Requests a backend served again after taking over (its counter
    whose name says resubmitted, if it has one)."""
    return sum(v for k, v in (st or {}).items() if "resubmit" in k)


class Restarter:
    """The backends, one after another, and the thread that replaces them."""

    def __init__(self, a, tmp, rng):
        self.a, self.tmp, self.rng = a, tmp, rng
        self.backends = []        # every Backend started, in order
        self.events = []          # (kind, at, backend index) done
        self.last_stats = {}      # backend index -> counters last seen
        self.inside = []          # per SIGKILL: inside a request (or None)
        self.error = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = None
        self.vm = None            # the ConsoleMachine, ended on an error
        self.t0 = None
        plan = ["kill"] * a.kills + ["term"] * a.graceful
        rng.shuffle(plan)
        self.plan = plan

    def start_backend(self):
        i = len(self.backends)
        b = Backend(self.a.backend, self.tmp, self.a.access_mode,
                    self.a.timeout + 30,
                    log_level="info", keep_image=i > 0,
                    log_name=f"backend-{i}.log",
                    extra_args=["--num-queues", str(self.a.num_queues)]
                    + (["--test-io-delay-us", str(self.a.io_delay_us)]
                       if self.a.io_delay_us else []))
        with self.lock:
            self.backends.append(b)
        return b

    def current(self):
        with self.lock:
            return len(self.backends) - 1, self.backends[-1]

    def begin(self, vm):
        """The guest's I/O started: run the plan in a thread."""
        if self.thread is None:
            self.vm = vm
            self.t0 = time.monotonic()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _wait_served(self, i, b):
        """Waits until backend i has served requests; its counters."""
        deadline = time.monotonic() + SERVE_LIMIT
        while not self.stop.is_set():
            # SIGUSR1 prints counters only once a frontend is connected.
            if not QUEUE_STARTED.search(b.text()):
                if b.proc.poll() is not None:
                    raise RuntimeError(f"backend {i} exited on its own "
                                       f"(status {b.proc.returncode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"QEMU did not reconnect to backend {i} and start "
                        f"its queue within {SERVE_LIMIT:.0f} s")
                time.sleep(0.05)
                continue
            st = b.snapshot()
            if st is not None:
                self.last_stats[i] = st
                if st.get("requests", 0) > 0:
                    return st
            if b.proc.poll() is not None:
                raise RuntimeError(f"backend {i} exited on its own "
                                   f"(status {b.proc.returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"backend {i} served no request within {SERVE_LIMIT:.0f}"
                    " s of starting (QEMU did not reconnect, or the guest's"
                    " I/O did not resume)")
            time.sleep(0.2)
        return None

    def _run(self):
        try:
            # Random moments spread over the first three quarters of the
            # guest's I/O; each backend serves before it is replaced.
            span = 0.75 * self.a.stress_secs
            times = sorted(self.rng.uniform(0.3, span) for _ in self.plan)
            for kind, when in zip(self.plan, times):
                i, b = self.current()
                if self._wait_served(i, b) is None:
                    return
                left = when - (time.monotonic() - self.t0)
                if self.stop.wait(max(left, self.rng.uniform(0.05, 0.3))):
                    return
                st = b.snapshot()
                if st is not None:
                    self.last_stats[i] = st
                at = time.monotonic() - self.t0
                sig = signal.SIGKILL if kind == "kill" else signal.SIGTERM
                if self.a.io_delay_us:
                    inside = signal_in_request(b.pid(), sig)
                else:
                    os.kill(b.pid(), sig)
                    inside = None
                if kind == "kill":
                    self.inside.append(inside)
                    rc = b.wait(EXIT_LIMIT)
                    if not killed_status(rc):
                        raise RuntimeError(f"backend {i} after SIGKILL: "
                                           f"status {rc}")
                else:
                    rc = b.wait(EXIT_LIMIT)
                    if rc != 0:
                        raise RuntimeError(
                            f"backend {i} after SIGTERM: status {rc} (not a "
                            f"clean exit within {EXIT_LIMIT:.0f} s)")
                    self.last_stats[i] = b.stats() or self.last_stats.get(i)
                self.events.append((kind, round(at, 2), i))
                print(f"== host: {'SIGKILL' if kind == 'kill' else 'SIGTERM'}"
                      f" to backend {i} at {at:.2f} s of the I/O (status "
                      f"{rc}); starting backend {i + 1}", flush=True)
                if self.stop.is_set():
                    return
                self.start_backend()
            # The last one must serve too before the I/O ends.
            i, b = self.current()
            self._wait_served(i, b)
        except Exception as e:  # reported as the boot's failure
            self.error = str(e)
            print(f"== host: {e}; ending QEMU", flush=True)
            if self.vm is not None and self.vm.proc.poll() is None:
                self.vm.proc.terminate()   # `timeout` passes it on to QEMU

    def finish(self):
        self.stop.set()
        if self.thread is not None:
            self.thread.join(SERVE_LIMIT + EXIT_LIMIT + 10)
            if self.thread.is_alive():
                self.error = self.error or "the restart thread did not end"

    def close(self):
        """Ends every backend still running (SIGTERM, then SIGKILL to its
        group); True when none is left."""
        with self.lock:
            backends = list(self.backends)
        for b in backends:
            b.close()
        return all(b.proc.poll() is not None for b in backends)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", required=True)
    ap.add_argument("--qemu")
    ap.add_argument("--kernel", default="6.1", choices=("6.1", "6.12", "7.2"))
    ap.add_argument("--variant", default="pvdma", choices=("pvdma", "none"))
    ap.add_argument("--access-mode", default="sg", choices=("sg", "window"),
                    help="the backends' --access-mode")
    ap.add_argument("--strict", action="store_true",
                    help="iommu.strict=1: every unmap waits for the "
                    "backend's invalidation ack")
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--graceful", type=int, default=1)
    ap.add_argument("--stress-secs", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--verify-mib", type=int, default=8)
    ap.add_argument("--reconnect-ms", type=int, default=100)
    ap.add_argument("--num-queues", type=int, default=1,
                    help="the device's queues (a backend that serves them)")
    ap.add_argument("--io-delay-us", type=int, default=3000,
                    help="the backends' --test-io-delay-us: each request "
                    "waits this long between mapping its buffers and its "
                    "I/O, so that a kill finds requests in flight")
    ap.add_argument("--seed", type=int,
                    help="the restart moments' seed (default: random, printed)")
    ap.add_argument("--timeout", type=float, default=150)
    ap.add_argument("--expect-resubmit", action="store_true",
                    help="fail unless the backends counted requests "
                    "resubmitted after a restart (inflight tracking)")
    ap.add_argument("--quiet", action="store_true",
                    help="no copy of the guest's console")
    ap.add_argument("--summary-file")
    a = ap.parse_args()
    pg.interrupt_on_signals()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    qemu = a.qemu or pg.qemu_build()
    image = pg.prepare(a.kernel)
    what = (f"vhost-user-blk restart kernel {a.kernel} variant {a.variant}"
            f"{' strict' if a.strict else ''}"
            f"{' window' if a.access_mode == 'window' else ''}"
            f" ({a.kills} kills, {a.graceful} graceful, seed {seed})")
    print(f"== {what}", flush=True)
    failure = None
    tmp = tempfile.TemporaryDirectory(prefix="pvdma-vub-restart-")
    rs = Restarter(a, tmp.name, rng)
    r = None
    summary = {}
    t_start = time.monotonic()
    try:
        rs.start_backend()

        def on_line(vm, line):
            if "PVDMA-IO: RUN stress-blk" in line:
                rs.begin(vm)

        try:
            r = pg.run_variant(
                qemu, image, a.variant, strict=a.strict, mode="test",
                timeout=a.timeout,
                vhost_user_blk=rs.backends[0].sock, echo=not a.quiet,
                vub_chardev=f",reconnect-ms={a.reconnect_ms}",
                vhost_user_blk_opts=f"num-queues={a.num_queues},"
                + ("disable-legacy=on,iommu_platform=on"
                   if a.variant == "pvdma" else "disable-legacy=on"),
                extra_append=["pvdmaio.disks=blk", "pvdmaio.net=0",
                              f"pvdmaio.verify_mib={a.verify_mib}",
                              f"pvdmaio.stress={a.stress_secs}:{a.jobs}"],
                on_line=on_line)
        except KeyboardInterrupt as e:
            sys.exit(f"interrupted ({e or 'SIGINT'})")
        rs.finish()
        if rs.error:
            failure = rs.error
        elif not r.passed:
            failure = r.failure
        elif len(rs.events) != len(rs.plan):
            failure = (f"only {len(rs.events)} of {len(rs.plan)} restarts "
                       "happened during the guest's I/O")
        # QEMU is gone: the last backend must see the socket close and exit.
        i, last = rs.current()
        rc = last.wait(15)
        if rc is None:
            failure = failure or f"backend {i} did not exit after QEMU closed the socket"
        elif rc != 0:
            failure = failure or f"backend {i} exited with status {rc}"
        else:
            rs.last_stats[i] = last.stats() or rs.last_stats.get(i)
        per = [rs.last_stats.get(k, {}) for k in range(len(rs.backends))]
        for k, st in enumerate(per):
            bad = {c: st.get(c) for c in ("io_errors", "bad_chains",
                                          "ring_errors") if st.get(c)}
            if bad:
                failure = failure or f"backend {k} counted {bad}"
        reqs = [st.get("requests", 0) for st in per]
        resub = sum(resubmitted(st) for st in per)
        inside = sum(1 for x in rs.inside if x)
        # A graceful stop drains: the next backend has nothing to resubmit.
        for kind, _, k in rs.events:
            left = resubmitted(per[k + 1]) if k + 1 < len(per) else 0
            if failure is None and a.expect_resubmit and kind == "term" \
                    and left:
                failure = (f"backend {k} was stopped with SIGTERM, yet "
                           f"backend {k + 1} resubmitted {left} requests: "
                           "it did not finish what it had taken")
        # One kill may escape: the delay can end between the look at wchan
        # and the SIGKILL, and the ring be empty right then.
        if failure is None and a.expect_resubmit and \
                resub < max(inside - 1, 1):
            failure = (f"{inside} SIGKILLs hit a backend inside a request, "
                       f"but the backends counted {resub} requests "
                       "resubmitted: what a killed one had taken was not "
                       "taken over from the inflight region")
        if failure is not None and a.quiet:
            print("== guest console (tail)")
            print("\n".join(r.console[-30:]))
        stress = next((x for x in (r.results if r else [])
                       if x.get("kind") == "stress"), {})
        summary = {
            "kills": sum(1 for e in rs.events if e[0] == "kill"),
            "kills_inside": inside,
            "graceful": sum(1 for e in rs.events if e[0] == "term"),
            "backends": len(rs.backends), "requests": reqs,
            "resubmitted": resub,
            "guest_ios": stress.get("ios"),
            "verified_mib": round(stress.get("bytes_verified", 0) / 2**20, 1),
            "written_mib": round(stress.get("bytes_written", 0) / 2**20, 1),
            "max_wait_s": stress.get("max_wait"),
            "events": rs.events,
        }
    finally:
        rs.finish()
        if not rs.close():
            failure = failure or "a backend was still running at the end"
        for k, b in enumerate(rs.backends):
            if failure is None and a.quiet:
                break
            print(f"== backend {k} log (tail)")
            print("\n".join(b.text().splitlines()[-8:]))
        tmp.cleanup()
    print(f"== restarts (kind, seconds into the I/O, backend): "
          f"{summary.get('events')}")
    print(f"== summary: {summary.get('kills', 0)} SIGKILLs ("
          f"{summary.get('kills_inside', 0)} inside a request) and "
          f"{summary.get('graceful', 0)} graceful restarts under I/O; "
          f"{summary.get('backends', 0)} backend processes served "
          f"{summary.get('requests')} requests, "
          f"{summary.get('resubmitted', 0)} resubmitted after a restart; the "
          f"guest made {summary.get('guest_ios')} requests, wrote "
          f"{summary.get('written_mib')} MiB and checked "
          f"{summary.get('verified_mib')} MiB read back (longest request "
          f"{summary.get('max_wait_s')} s); "
          f"{time.monotonic() - t_start:.0f} s in all")
    verdict = "PASS" if failure is None else f"FAIL: {failure}"
    line = (f"{what}: {verdict} ({summary.get('backends', 0)} backends, "
            f"requests {summary.get('requests')}, resubmitted "
            f"{summary.get('resubmitted', 0)}, {summary.get('verified_mib')} "
            f"MiB verified, {time.monotonic() - t_start:.0f} s)")
    print("== " + line)
    if a.summary_file:
        with open(a.summary_file, "a") as f:
            f.write(line + "\n")
    return 0 if failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
