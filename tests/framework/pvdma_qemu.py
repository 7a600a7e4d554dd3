# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Driving QEMU from the project's scripts: QMP, qtest and pvdma requests.

Python 3.11 standard library only. Used by pvdma-demo.py,
pvdma-doorbell-check.py, qemu-smoke.sh, qemu-pvdma-smoke.sh,
guest-demo-boot.py and pvdma_guest.py:

  * `QMP`: a QMP client on a unix socket, every read bounded by a deadline;
  * `QTestMachine`: QEMU started under `timeout --kill-after` with a qtest
    and a QMP socket, for playing a guest driver without a guest;
  * `ConsoleMachine`: QEMU booting a real guest under `timeout
    --kill-after`, its serial console read line by line against a
    deadline, QMP on a socket, and QEMU's CPU time (all its threads);
  * `compact_json`: query-pvdma's reply, one line per endpoint and fault;
  * `queue_summary`: the request queues of one device in query-pvdma's
    reply, the ones set up, with the device's queue totals;
  * the pvdma guest ABI v1 (docs/abi.md): register offsets, ops, flags,
    status names, request-block encoding/decoding and a doorbell submit.

Failures raise `QemuError`; `exit_on_error` turns one into an exit message.
"""

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

# --- pvdma guest ABI v1 (docs/abi.md, rust-core/include/pvdma_abi.h) --------
PVDMA_VENDOR, PVDMA_DEVICE = 0x1B36, 0x0015
REG_MAGIC, REG_VERSION, REG_FEATURES = 0x00, 0x04, 0x08
REG_IOVA_BITS, REG_MAX_SEGS, REG_PAGE_SIZES = 0x10, 0x14, 0x18
REG_DOORBELL, REG_DOORBELL_HI = 0x28, 0x2C
REG_FAULTS, REG_LAST_STATUS, REG_QUEUES = 0x30, 0x38, 0x3C
OP_QUERY, OP_ATTACH, OP_DETACH, OP_MAP, OP_UNMAP = 1, 2, 3, 4, 5
OP_UNMAP_LIST, OP_QUEUE, OP_SYNC = 6, 7, 8
FEATURE_QUEUE = 1 << 4
FLAG_READ, FLAG_WRITE, FLAG_FIXED = 1, 2, 4
STATUS = {0: "OK", 1: "INVAL", 2: "NODEV", 3: "FAULT", 4: "NOSPC",
          5: "EXIST", 6: "NOENT", 7: "RANGE", 8: "TOOBIG", 9: "QUOTA",
          10: "PERM", 11: "STATE", 255: "INTERNAL"}
# op, flags, status, requester, nr_segs, iova, length, result, reserved
REQ_HEADER = struct.Struct("<HHIIIQQQ24x")
REQ_REPLY = struct.Struct("<HHIIIQQQ")          # the first 40 bytes
REQ_SEG = struct.Struct("<QQ")                  # gpa, len
STATUS_UNSET = 0xFFFFFFFF   # written by the guest; the host overwrites it


class QemuError(Exception):
    """A QMP error reply, a qtest error, a closed connection or a bad reply."""


def exit_on_error(fn, *args, **kw):
    """Run fn(*args, **kw); a QemuError becomes sys.exit with its message."""
    try:
        return fn(*args, **kw)
    except QemuError as e:
        sys.exit(str(e))


def _settimeout(sock, deadline, floor=0.1):
    sock.settimeout(None if deadline is None
                    else max(floor, deadline - time.monotonic()))


class QMP:
    """QMP client (docs/interop/qmp-spec.rst) over a connected socket."""

    def __init__(self, sock, deadline=None):
        """Reads the greeting into .greeting and negotiates capabilities."""
        self.sock, self.deadline = sock, deadline
        self.f = sock.makefile("rw", newline="\n")
        self.greeting = self._recv()
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path, deadline):
        """Connects to a QMP server socket, retrying until the deadline."""
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                _settimeout(s, deadline, 1.0)
                s.connect(path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise QemuError("QMP socket never appeared") from None
                time.sleep(0.1)
        return cls(s, deadline)

    def _recv(self):
        _settimeout(self.sock, self.deadline)
        line = self.f.readline()
        if not line:
            raise QemuError("QMP connection closed")
        return json.loads(line)

    def execute(self, name, **args):
        """Runs a command; returns its `return`, raises on `error`.

        Asynchronous events before the reply are skipped."""
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            reply = self._recv()
            if "error" in reply:
                raise QemuError(f"QMP {name}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self):
        self.sock.close()


class QTestMachine:
    """QEMU under `timeout --kill-after`, driven over qtest (system/qtest.c).

    QEMU connects to the script's qtest and QMP sockets at start-up
    (connect() accepts them); the machine's stdout and stderr go to a file
    that close() returns. Every socket read is bounded by the deadline
    (start + timeout seconds), after which `timeout` kills QEMU anyway.
    Call close() on every path, also when connect() fails.
    """

    def __init__(self, qemu, args, timeout=60, connect_timeout=None):
        """Starts `qemu` with `args` plus the qtest and QMP sockets.

        connect_timeout bounds connect()'s wait for QEMU (default: the
        whole timeout)."""
        self.deadline = time.monotonic() + timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="pvdma-qemu-")
        self.tmp = self._tmp.name
        self.proc = self.qmp = self.sock = self._out = None
        self._listeners = {}
        try:
            for name in ("qtest", "qmp"):
                s = socket.socket(socket.AF_UNIX)
                self._listeners[name] = s
                s.bind(os.path.join(self.tmp, name + ".sock"))
                s.listen(1)
                s.settimeout(connect_timeout or timeout)
            self.argv = [
                "timeout", "--kill-after=5", str(int(timeout)), qemu, *args,
                "-qtest", "unix:" + os.path.join(self.tmp, "qtest.sock"),
                "-qtest-log", "/dev/null",
                "-qmp", "unix:" + os.path.join(self.tmp, "qmp.sock")]
            self._out = open(os.path.join(self.tmp, "qemu.log"), "w+b")
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._out,
                stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self.close()
            raise

    def connect(self):
        """Accepts QEMU's qtest and QMP connections; returns self."""
        self.sock, _ = self._listeners["qtest"].accept()
        self.f = self.sock.makefile("rw", newline="\n")
        self.qmp = QMP(self._listeners["qmp"].accept()[0], self.deadline)
        self._close_listeners()
        return self

    def _close_listeners(self):
        for s in self._listeners.values():
            s.close()
        self._listeners = {}

    def close(self):
        """Closes the sockets, terminates QEMU (SIGTERM, then SIGKILL to
        its process group) and returns everything it printed."""
        self._close_listeners()
        for s in (self.qmp, self.sock):
            if s is not None:
                s.close()
        self.qmp = self.sock = None
        out = ""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()       # `timeout` passes it on to QEMU
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            self.proc = None
        if self._out is not None:
            self._out.seek(0)
            out = self._out.read().decode(errors="replace")
            self._out.close()
            self._out = None
        self._tmp.cleanup()
        return out

    def cmd(self, line):
        """Sends one qtest command; returns the words after `OK`."""
        _settimeout(self.sock, self.deadline)
        self.f.write(line + "\n")
        self.f.flush()
        while True:
            reply = self.f.readline()
            if not reply:
                raise QemuError(f"qtest: connection closed after {line!r}")
            if reply.startswith("IRQ"):
                continue
            words = reply.split()
            if not words or words[0] != "OK":
                raise QemuError(f"qtest: {line!r} -> {reply.strip()!r}")
            return words[1:]

    def _value(self, line):
        return int(self.cmd(line)[0], 16)

    def readl(self, addr):
        return self._value(f"readl 0x{addr:x}")

    def readq(self, addr):
        return self._value(f"readq 0x{addr:x}")

    def writel(self, addr, val):
        self.cmd(f"writel 0x{addr:x} 0x{val:x}")

    def writeq(self, addr, val):
        self.cmd(f"writeq 0x{addr:x} 0x{val:x}")

    def mem_read(self, addr, size):
        """Reads guest-physical memory."""
        return bytes.fromhex(self.cmd(f"read 0x{addr:x} 0x{size:x}")[0][2:])

    def mem_write(self, addr, data):
        """Writes guest-physical memory."""
        self.cmd(f"write 0x{addr:x} 0x{len(data):x} 0x{data.hex()}")

    def clock_step(self, ns):
        """Advances the virtual clock (only with -accel qtest)."""
        self.cmd(f"clock_step {ns}")

    # PCI config space of bus 0 through the 0xcf8/0xcfc mechanism
    def _cfg_addr(self, devfn, reg):
        self.cmd(f"outl 0xcf8 0x{0x80000000 | devfn << 8 | reg & ~3:x}")

    def cfg_read(self, devfn, reg):
        """Reads the config dword at reg of 00:devfn."""
        self._cfg_addr(devfn, reg)
        return self._value("inl 0xcfc")

    def cfg_write(self, devfn, reg, val):
        """Writes the config dword at reg of 00:devfn."""
        self._cfg_addr(devfn, reg)
        self.cmd(f"outl 0xcfc 0x{val:x}")

    def find(self, vendor, device):
        """The devfn of the first vendor:device function on bus 0."""
        for devfn in range(256):
            if self.cfg_read(devfn, 0) == (device << 16 | vendor):
                return devfn
        raise QemuError(f"{vendor:04x}:{device:04x} not found")


class QemuTimeout(QemuError):
    """The deadline passed before QEMU said what was waited for."""


def compact_json(devices):
    """query-pvdma's reply, with each endpoint and fault on one line."""
    out = ["["]
    for i, dev in enumerate(devices):
        out.append("  {")
        items = list(dev.items())
        for j, (key, val) in enumerate(items):
            comma = "," if j < len(items) - 1 else ""
            if isinstance(val, list) and val and isinstance(val[0], dict):
                out.append(f"    {json.dumps(key)}: [")
                out += [f"      {json.dumps(v)}" + ("," if k < len(val) - 1 else "")
                        for k, v in enumerate(val)]
                out.append(f"    ]{comma}")
            else:
                out.append(f"    {json.dumps(key)}: {json.dumps(val)}{comma}")
        out.append("  }" + ("," if i < len(devices) - 1 else ""))
    out.append("]")
    return "\n".join(out)


# query-pvdma's per-queue fields and the device's queue totals (QAPI names)
QUEUE_FIELDS = ("index", "set-up", "ctrl-gpa", "ring-gpa", "entries", "head",
                "tail", "failed", "last-error", "stopped", "applied",
                "drains")
QUEUE_TOTALS = ("queue-drains", "queue-entries", "queue-failed",
                "miss-drains")


def queue_summary(device):
    """The request queues of one device of query-pvdma's reply:
    {"queues": [the entries whose set-up is true, as QMP gave them],
     "count": QUEUES (entries listed, set up or not), and each of
     QUEUE_TOTALS}. A QEMU whose pvdma has no queues (older series) has
    no "queues" key: count 0, no queues, totals 0."""
    queues = device.get("queues", [])
    out = {"queues": [q for q in queues if q.get("set-up")],
           "count": len(queues)}
    for key in QUEUE_TOTALS:
        out[key] = device.get(key, 0)
    return out


class ConsoleMachine:
    """A guest booting in QEMU under `timeout --kill-after`, in its own
    process group: serial console on QEMU's stdio (-nographic), QMP on a
    unix socket (connected on first use of .qmp()).

    Every read is bounded by the deadline (start + timeout seconds), after
    which `timeout` kills QEMU anyway. close() (also by `with`) ends QEMU
    on every path: SIGTERM to `timeout`, which passes it on and reaps
    QEMU, then SIGKILL to the group if that did not end it within 3 s.
    """

    def __init__(self, qemu, args, timeout=60):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="pvdma-guest-")
        self.tmp = self._tmp.name
        self.qmp_path = os.path.join(self.tmp, "qmp")
        self._qmp = None
        self._qemu_pid = None
        self._buf = b""
        self.argv = ["timeout", "--kill-after=5", str(int(timeout)), qemu,
                     "-nographic", *args,
                     "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def elapsed(self):
        return time.monotonic() - self.t0

    def lines(self):
        """Yields the console's lines (str, without the line end) until
        QEMU closes its output; raises QemuTimeout at the deadline."""
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                yield raw.decode(errors="replace").rstrip("\r")
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise QemuTimeout(f"no result within {self.timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:               # QEMU exited
                if self._buf:
                    rest, self._buf = self._buf, b""
                    yield rest.decode(errors="replace").rstrip("\r")
                return
            self._buf += chunk

    def send_line(self, text=""):
        """Types a line on the guest's console."""
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def qmp(self):
        """The QMP connection, opened on first use."""
        if self._qmp is None:
            self._qmp = QMP.connect(self.qmp_path, self.deadline)
        return self._qmp

    def qemu_pid(self):
        """QEMU's pid: the child of `timeout` (not `timeout` itself)."""
        if self._qemu_pid is None:
            tpid = self.proc.pid
            try:
                with open(f"/proc/{tpid}/task/{tpid}/children") as f:
                    kids = f.read().split()
            except OSError:
                kids = []
            if not kids:                # no CONFIG_PROC_CHILDREN: scan
                for pid in filter(str.isdigit, os.listdir("/proc")):
                    try:
                        with open(f"/proc/{pid}/stat") as f:
                            st = f.read()
                    except OSError:
                        continue
                    if int(st[st.rindex(")") + 2:].split()[1]) == tpid:
                        kids.append(pid)
            if not kids:
                raise QemuError("QEMU is not running under timeout")
            self._qemu_pid = int(kids[0])
        return self._qemu_pid

    def cpu_seconds(self):
        """QEMU's user + system CPU time in seconds, over all its threads
        (also the ones that exited): utime + stime of /proc/PID/stat, in
        clock ticks (10 ms here)."""
        with open(f"/proc/{self.qemu_pid()}/stat") as f:
            st = f.read()
        fields = st[st.rindex(")") + 2:].split()
        # fields[0] is stat's 3rd field (state); utime, stime: 14th, 15th
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def wait(self, timeout):
        """QEMU's exit status (of `timeout`: 124/137 when it killed it);
        raises subprocess.TimeoutExpired."""
        return self.proc.wait(timeout=timeout)

    def close(self):
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.proc.poll() is None:
            self.proc.terminate()       # `timeout` passes it on to QEMU
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._tmp.cleanup()


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def interrupt_on_signals():
    """Makes SIGTERM and SIGHUP raise KeyboardInterrupt, as SIGINT does, so
    a script's clean-up (ending its QEMU) runs on them too."""
    def raise_interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)


def exit_verdict(vm, limit, passed, who):
    """After a console guest finished its test: why it failed, or None.

    Waits for QEMU to exit (the guest powers off) and reads its status:
    124 or 137 is `timeout` killing it, anything else non-zero a QEMU
    failure; a clean exit without the guest's PASS line fails too."""
    try:
        rc = vm.wait(max(1, vm.deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return f"QEMU did not exit after {who} finished"
    if rc in (124, 137):
        return f"timed out after {limit:.0f} s"
    if rc != 0:
        return f"QEMU exited with status {rc}"
    if not passed:
        return f"{who} did not print PASS"
    return None


# What a console test's runner catches around a boot: host_failure(e) says
# what went wrong in words for its verdict.
HOST_ERRORS = (QemuError, OSError, ValueError, KeyboardInterrupt)


def host_failure(e):
    """The verdict's words for an exception of HOST_ERRORS."""
    if isinstance(e, QemuTimeout):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted ({e or 'SIGINT'})"
    return f"host side: {e}"


def encode_request(op, requester, flags=0, iova=0, length=0, segs=()):
    """A pvdma request block: the 64-byte header, then (gpa, len) segments."""
    block = REQ_HEADER.pack(op, flags, STATUS_UNSET, requester, len(segs),
                            iova, length, 0)
    return block + b"".join(REQ_SEG.pack(gpa, n) for gpa, n in segs)


def decode_reply(block):
    """(status, iova, length, result) from a request block the host wrote."""
    _, _, status, _, _, iova, length, result = REQ_REPLY.unpack(block[:40])
    return status, iova, length, result


def request(m, bar, block_gpa, op, requester, flags=0, iova=0, length=0,
            segs=()):
    """Writes a request block at block_gpa, rings the DOORBELL of the pvdma
    at bar and returns decode_reply of the block written back. Raises
    QemuError unless the block's status equals LAST_STATUS."""
    m.mem_write(block_gpa, encode_request(op, requester, flags, iova,
                                           length, segs))
    m.writeq(bar + REG_DOORBELL, block_gpa)
    last = m.readl(bar + REG_LAST_STATUS)
    reply = decode_reply(m.mem_read(block_gpa, REQ_REPLY.size))
    if reply[0] != last:
        raise QemuError(f"op {op}: block status {reply[0]} "
                        f"!= LAST_STATUS {last}")
    return reply
