#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Boot the pvdma guest demo and watch it (used by scripts/guest-demo.sh).

Usage: guest-demo-boot.py QEMU_BINARY VMLINUZ INITRD [TIMEOUT_SECONDS]

Runs QEMU (q35, TCG, -nographic, serial on stdio, QMP on a unix socket)
under `timeout`, copies the guest's console to stdout, and whenever the
guest prints `PVDMA-GUEST-DEMO: PAUSE <tag>` runs `query-pvdma` over QMP,
prints it, and sends the guest a line so it goes on. QEMU is killed on
every exit path. Exit status 0 only when the guest printed
`PVDMA-GUEST-DEMO: PASS` and QEMU exited by itself (guest poweroff).
"""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pvdma_qemu import QMP, QemuError  # noqa: E402  (the scripts' shared client)

MARK = "PVDMA-GUEST-DEMO: "
# qboot (shipped with QEMU) starts the kernel in well under a second under
# TCG, where SeaBIOS takes 30-50 s on this machine before it even loads it.
# GUEST_DEMO_BIOS= (empty) boots with QEMU's default firmware (SeaBIOS).
BIOS = os.environ.get("GUEST_DEMO_BIOS", "qboot.rom")


def log(msg=""):
    print(msg, flush=True)


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


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    # SIGTERM/SIGHUP unwind like Ctrl-C, through the `finally` that kills QEMU.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    qemu, kernel, initrd = sys.argv[1:4]
    limit = float(sys.argv[4]) if len(sys.argv) > 4 else 120
    t0 = time.monotonic()
    deadline = t0 + limit
    tmp = tempfile.TemporaryDirectory(prefix="pvdma-guest-")
    qmp_path = os.path.join(tmp.name, "qmp")
    argv = ["timeout", "--kill-after=5", str(int(limit)), qemu,
            "-M", "q35", "-accel", "tcg", "-m", "512M",
            "-nographic", "-no-reboot", "-nic", "none",
            *(["-bios", BIOS] if BIOS else []),
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet panic=-1",
            "-device", "pvdma,id=pvdma0",
            "-device", "edu,id=edu0",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    log("$ " + " ".join(argv[3:]))
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    times = {}
    passed = False
    failure = None
    qmp = None
    buf = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                failure = f"no result within {limit:.0f} s"
                break
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break                       # QEMU exited
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace").rstrip("\r")
                print(line, flush=True)
                at = line.find(MARK)
                if at < 0:
                    continue
                line = line[at:]
                word = line[len(MARK):].split()[0:2] or ["?"]
                now = round(time.monotonic() - t0, 1)
                if word[0] == "BOOTED":
                    times["booted"] = now
                elif word[0] == "PASS":
                    times["result"] = now
                    passed = True
                elif word[0] == "FAIL":
                    times["result"] = now
                    failure = line[len(MARK):]
                elif word[0] == "PAUSE":
                    tag = word[1] if len(word) > 1 else "?"
                    if qmp is None:
                        qmp = QMP.connect(qmp_path, deadline)
                    log(f"\n== host: QMP query-pvdma ({tag})")
                    log(compact_json(qmp.execute("query-pvdma")))
                    log("== host: guest, go on\n")
                    proc.stdin.write(b"\n")
                    proc.stdin.flush()
        if buf:
            print(buf.decode(errors="replace"), flush=True)
        if failure is None:
            try:
                rc = proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failure = "QEMU did not exit after the guest finished"
            else:
                if rc == 124 or rc == 137:
                    failure = f"timed out after {limit:.0f} s"
                elif rc != 0:
                    failure = f"QEMU exited with status {rc}"
                elif not passed:
                    failure = "the guest did not print PASS"
    except (OSError, ValueError, QemuError) as e:
        failure = f"host side: {e}"
    except KeyboardInterrupt as e:
        failure = f"interrupted ({e or 'SIGINT'})"
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            # `timeout` passes SIGTERM on to QEMU and reaps it; SIGKILL to
            # the whole group only if that does not end it promptly.
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        tmp.cleanup()
    total = round(time.monotonic() - t0, 1)
    log(f"\n== timing: QEMU start -> guest /init {times.get('booted', '?')} s,"
        f" -> test result {times.get('result', '?')} s,"
        f" -> QEMU exit {total} s (includes the host's QMP queries)")
    if passed and failure is None:
        log("guest-demo: PASS")
        return 0
    log(f"guest-demo: FAIL: {failure}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
