# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""pvdma-vhost-user-blk for the guest tests and benchmarks: started under
`timeout` in its own process group on a fresh image, its counters read
from its log (printed at exit and on SIGUSR1)."""

import os
import re
import signal
import subprocess
import time

# A whole line only: the backend writes it in pieces, and a snapshot may
# read the log between them.
STATS = re.compile(r"pvdma-vhost-user-blk: stats: (.*)\n")


def timeout_child(proc):
    """The pid of the program a `timeout` process (`proc`) runs."""
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        return int(f.read().split()[0])


class Backend:
    """pvdma-vhost-user-blk under `timeout`, in its own process group; its
    stderr goes to a log file.

    keep_image: serve the image already in tmp (a backend taking over
    from one that was killed or stopped) instead of a fresh one;
    log_name: the log file's name in tmp; extra_args: more options."""

    def __init__(self, binary, tmp, mode, timeout, image_mib=64,
                 log_level="info", extra_args=(), keep_image=False,
                 log_name="backend.log"):
        self.sock = os.path.join(tmp, "vub.sock")
        self.image = os.path.join(tmp, "vub.img")
        self.log = os.path.join(tmp, log_name)
        if not keep_image:
            with open(self.image, "wb") as f:
                f.truncate(image_mib << 20)
        self.logf = open(self.log, "w")
        self.proc = subprocess.Popen(
            ["timeout", "--kill-after=5", str(int(timeout)), binary,
             "--socket-path", self.sock, "--blk-file", self.image,
             "--access-mode", mode, "--connect-timeout", "60",
             "--log-level", log_level, *extra_args],
            stdout=self.logf, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 10
        # The socket file goes once a frontend connected, which a frontend
        # that reconnects does at once: its log says it listened.
        while not os.path.exists(self.sock) and \
                "listening on" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the backend did not create its socket:\n"
                                   + self.text())
            time.sleep(0.05)

    def pid(self):
        """The backend's pid (the child of `timeout`)."""
        return timeout_child(self.proc)

    def text(self):
        if not self.logf.closed:
            self.logf.flush()
        with open(self.log) as f:
            return f.read()

    def stats(self):
        m = None
        for m in STATS.finditer(self.text()):
            pass
        if not m:
            return None
        return {k: int(v) for k, v in
                (w.split("=") for w in m.group(1).split())}

    def snapshot(self, timeout=5.0):
        """Asks for the counters now (SIGUSR1) and returns them, or None
        when they did not come within timeout seconds."""
        before = len(STATS.findall(self.text()))
        try:
            os.kill(self.pid(), signal.SIGUSR1)
        except (OSError, ValueError, IndexError):
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(STATS.findall(self.text())) > before:
                return self.stats()
            time.sleep(0.02)
        return None

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()


