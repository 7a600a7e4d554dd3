#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Boot the pvdma I/O guest (guest/io) with one IOMMU variant and watch it.

As a library (for the tests and benchmarks):

    import pvdma_guest as pg
    image = pg.prepare("6.1")                   # tools/guest-io-prepare.sh
    r = pg.run_variant(qemu, image, "pvdma", strict=True, mode="bench",
                       bench=["blk:rand:4k:2:5", "net:5"])
    r.passed, r.failure          # verdict
    r.results                    # parsed RESULT lines (dicts), each with
                                 # qemu_cpu_s / qemu_cpu_us_per_op
    r.phases                     # name -> Phase(wall_s, cpu_s): QEMU CPU
    r.snapshots                  # PAUSE tag -> query-pvdma reply

As a script:

    tests/framework/pvdma_guest.py [--qemu BIN] [--kernel 6.1|6.12|7.2] [--variant V]
        [--strict] [--mode test|bench|demo] [--bench SPEC ...]
        [--modparams a=1,b=2] [--timeout S] [--append ARG ...] [--quiet]
        [--summary-file FILE] [--json FILE]

Variants (what translates the devices' DMA):
  none          no IOMMU
  pvdma         -device pvdma; the guest loads pvdma_iommu.ko
  pvdma-bypass  -device pvdma, no guest driver: devices bypass it
  intel         -device intel-iommu,intremap=off; intel_iommu=on
  virtio        -device virtio-iommu-pci (a kernel with virtio-iommu: 6.12)

Devices: virtio-blk-pci and nvme on raw 64 MiB images in a temporary
directory, two virtio-net-pci on one QEMU hub; the virtio ones with
disable-legacy=on,iommu_platform=on. QEMU runs under `timeout` and is
killed on every exit path (pvdma_qemu.ConsoleMachine).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pvdma_qemu import (ConsoleMachine, QemuError, QemuTimeout,  # noqa: E402
                        compact_json, interrupt_on_signals)

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(HERE, "..", "..", "tools")
MARK = "PVDMA-IO: "
VARIANTS = ("none", "pvdma", "pvdma-bypass", "intel", "virtio")
# qboot: SeaBIOS spends 30-50 s under TCG before the kernel starts.
BIOS = os.environ.get("PVDMA_GUEST_BIOS", "qboot.rom")


@dataclasses.dataclass
class GuestImage:
    """What guest-io-prepare.sh built for one kernel."""
    kernel: str            # "6.1", "6.12" or "7.2"
    release: str           # uname -r
    vmlinuz: str
    initrd: str
    pvdma_iommu: bool      # the initramfs has pvdma_iommu.ko
    virtio_iommu: bool     # the kernel has a virtio-iommu driver


def prepare(kernel):
    """Builds (or finds cached) the I/O guest for a kernel: GuestImage."""
    out = subprocess.run([os.path.join(TOOLS, "guest-io-prepare.sh"), kernel],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    kv = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return GuestImage(kv["KERNEL"], kv["RELEASE"], kv["VMLINUZ"],
                      kv["INITRD"], kv["PVDMA_IOMMU"] == "yes",
                      kv["VIRTIO_IOMMU"] == "yes")


def qemu_build():
    """The patched QEMU (tools/qemu-build.sh, cached)."""
    out = subprocess.run([os.path.join(TOOLS, "qemu-build.sh")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1]


@dataclasses.dataclass
class Phase:
    wall_s: float          # host wall-clock time between the two markers
    cpu_s: float           # QEMU's CPU time (all threads) in between


@dataclasses.dataclass
class RunResult:
    kernel: str
    variant: str
    strict: bool
    mode: str
    argv: list
    topology: str = "flat"
    hotplug: object = False           # False, True/"acpi", "pciehp"
    passed: bool = False
    failure: str = None
    results: list = dataclasses.field(default_factory=list)
    phases: dict = dataclasses.field(default_factory=dict)
    snapshots: dict = dataclasses.field(default_factory=dict)
    times: dict = dataclasses.field(default_factory=dict)
    cpu_total_s: float = None
    devices: dict = dataclasses.field(default_factory=dict)
    console: list = dataclasses.field(default_factory=list)


def parse_result(line):
    """`RESULT disk mode=seq bs=4096 ...` -> {"kind": "disk", "mode": "seq",
    "bs": 4096, ...} (numbers as int or float)."""
    words = line.split()
    out = {"kind": words[1]}
    for w in words[2:]:
        k, _, v = w.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def requester(bdf):
    """sysfs's 0000:00:02.0 -> query-pvdma's 00:02.0."""
    return bdf.split(":", 1)[1] if bdf.count(":") == 2 else bdf


def check_pvdma(snapshot, requesters=(), attached=True):
    """Problems (strings) in a query-pvdma reply; empty means fine. FAULTS
    must be 0, and each endpoint in requesters (query-pvdma's bus:dev.fn)
    must be listed and attached (attached=True) or not (False)."""
    if not snapshot:
        return ["query-pvdma shows no pvdma device"]
    problems = []
    eps = {}
    for dev in snapshot:
        name = dev.get("id", dev["path"])
        if dev.get("faults", 0) != 0:
            problems.append(f"{name}: FAULTS {dev['faults']}, last: "
                            f"{dev.get('last-faults')}")
        for e in dev.get("endpoints", []):
            eps[e["requester"]] = e
    for rid in requesters:
        e = eps.get(rid)
        if e is None:
            problems.append(f"endpoint {rid}: not in query-pvdma")
        elif e["attached"] != attached:
            problems.append(f"endpoint {rid}: attached={e['attached']}, "
                            f"expected {attached}")
    return problems


# The root-port topology (--topology rootports): what libvirt generates
# for q35, one pcie-root-port per endpoint, packed as functions of one
# slot; one spare port, as libvirt adds for hotplug.
ROOT_PORT_SLOT = 3
ROOT_PORTS = ("rp1", "rp2", "rp3", "rp4", "rp5")
# Where each endpoint goes, and the virtio-blk function's device_add
# arguments (the hotplug test plugs it in again).
RP_OF = {"blk": "rp1", "net0": "rp2", "net1": "rp3", "nvme": "rp4"}
VQ = "disable-legacy=on,iommu_platform=on"
BLK_HOTPLUG = {"driver": "virtio-blk-pci", "id": "vblk0", "drive": "vblk",
               "bus": RP_OF["blk"], "disable-legacy": "on",
               "iommu_platform": True}
# A second disk the hotplug test plugs into the spare port, which had no
# function at boot; its -blockdev (node vhot) exists from the start.
HOT_PLUG = dict(BLK_HOTPLUG, id="vhot0", drive="vhot", bus="rp5")


def root_port_args():
    """-device arguments for the root ports of the root-port topology."""
    out = []
    for i, rp in enumerate(ROOT_PORTS):
        addr = f"{ROOT_PORT_SLOT:#x}.{i:#x}"
        mf = ",multifunction=on" if i == 0 else ""
        out += ["-device", f"pcie-root-port,id={rp},bus=pcie.0,chassis={i + 1},"
                           f"port={0x10 + i:#x},addr={addr}{mf}"]
    return out


def qemu_args(image, variant, disk_dir, append, disk_cache="writeback",
              disk_mib=64, vhost_user_blk=None, topology="flat",
              native_hotplug=False, vhost_user_blk_opts=None):
    """QEMU's arguments (after the binary) for a variant, and the disk
    images created in disk_dir. vhost_user_blk: a vhost-user socket path;
    the virtio-blk disk is then a vhost-user-blk-pci on it (the backend
    serves the image; guest RAM becomes a shared memfd for it).
    vhost_user_blk_opts: that device's options after chardev= (default
    one queue, disable-legacy=on,iommu_platform=on).
    topology: "flat" (every device on the root bus) or "rootports" (each
    behind its own pcie-root-port; the virtio-blk disk is then a -blockdev,
    which outlives its device, so it can be plugged in again).
    native_hotplug: the root ports' hotplug is PCIe native (the guest's
    pciehp) instead of QEMU's default for q35, ACPI (acpiphp)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} ({', '.join(VARIANTS)})")
    if topology not in ("flat", "rootports"):
        raise ValueError(f"unknown topology {topology!r} (flat, rootports)")
    if topology == "rootports" and vhost_user_blk:
        raise ValueError("topology rootports with vhost_user_blk")
    rp = topology == "rootports"

    def on(name):
        return f",bus={RP_OF[name]}" if rp else ""
    vq = VQ
    machine = "q35,memory-backend=ram0" if vhost_user_blk else "q35"
    args = ["-M", machine, "-accel", "tcg", "-m", "1G", "-smp", "2",
            "-no-reboot", "-nic", "none",
            *(["-bios", BIOS] if BIOS else []),
            "-kernel", image.vmlinuz, "-initrd", image.initrd,
            "-append", " ".join(append)]
    # intel-iommu must come before the devices it translates.
    if variant == "intel":
        args += ["-device", "intel-iommu,intremap=off"]
    elif variant in ("pvdma", "pvdma-bypass"):
        args += ["-device", "pvdma,id=pvdma0"]
    elif variant == "virtio":
        args += ["-device", "virtio-iommu-pci"]
    # The ports after the IOMMU, which must exist when they are realized.
    if rp:
        args += root_port_args()
    if native_hotplug:
        args += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    disks = {}
    for name in ("blk", "nvme") + (("hot",) if rp else ()):
        path = os.path.join(disk_dir, f"{name}.img")
        with open(path, "wb") as f:
            f.truncate(disk_mib << 20)
        disks[name] = path
    if vhost_user_blk:
        args += ["-object", "memory-backend-memfd,id=ram0,size=1G,share=on",
                 "-chardev", f"socket,id=vub,path={vhost_user_blk}",
                 "-device", "vhost-user-blk-pci,chardev=vub,"
                            + (vhost_user_blk_opts or f"num-queues=1,{vq}")]
    elif rp:
        direct = "on" if disk_cache == "none" else "off"
        args += ["-blockdev", f"driver=raw,node-name=vblk,"
                              f"file.driver=file,file.filename={disks['blk']},"
                              f"cache.direct={direct}",
                 "-device", f"virtio-blk-pci,drive=vblk,id=vblk0{on('blk')},"
                            f"{vq}",
                 "-blockdev", f"driver=raw,node-name=vhot,"
                              f"file.driver=file,file.filename={disks['hot']},"
                              f"cache.direct={direct}"]
    else:
        args += ["-drive", f"if=none,id=vblk,file={disks['blk']},format=raw,"
                           f"cache={disk_cache}",
                 "-device", f"virtio-blk-pci,drive=vblk,{vq}"]
    args += ["-netdev", "hubport,id=hp0,hubid=0",
             "-device", f"virtio-net-pci,netdev=hp0,mac=52:54:00:fa:00:01"
                        f"{on('net0')},{vq}",
             "-netdev", "hubport,id=hp1,hubid=0",
             "-device", f"virtio-net-pci,netdev=hp1,mac=52:54:00:fa:00:02"
                        f"{on('net1')},{vq}",
             "-drive", f"if=none,id=nvm,file={disks['nvme']},format=raw,"
                       f"cache={disk_cache}",
             "-device", f"nvme,drive=nvm,serial=pvdma1{on('nvme')}"]
    return args


def guest_append(variant, strict, mode, bench=(), modparams="",
                 extra=(), pause_timeout=15, refuse=False, hotplug=False):
    """The kernel command line for a run."""
    iommu = {"pvdma-bypass": "none"}.get(variant, variant)
    out = ["console=ttyS0", "quiet", "panic=-1",
           f"pvdmaio.mode={mode}", f"pvdmaio.iommu={iommu}",
           f"pvdmaio.pause_timeout={pause_timeout}"]
    if variant == "intel":
        out.append("intel_iommu=on")
    if strict:
        out.append("iommu.strict=1")
    if modparams:
        out.append(f"pvdmaio.modparams={modparams}")
    if bench:
        out.append("pvdmaio.bench=" + ",".join(bench))
    if refuse:
        # True: a skipped MAP; "ro", "both": see guest/io/init.
        out.append(f"pvdmaio.refuse={1 if refuse is True else refuse}")
    if hotplug:
        out.append("pvdmaio.hotplug=1")
    return out + list(extra)


def check_requests(snapshot, strict):
    """Problems in the request counts of a run with pvdma_iommu.ko: it must
    have made mappings and removed them, lazily through UNMAP_LIST (when
    the device offers it, FEATURES bit 3), strictly through UNMAP. A run
    whose queues applied entries (the driver's queued mode) made them
    through the queues: check_queued() is the check for those."""
    problems = []
    for dev in snapshot or []:
        req = dev.get("requests")
        if req is None:
            continue                      # a QEMU without the counters
        if queue_summary([dev])[0][2]:
            continue                      # queued mode
        if not req.get("map"):
            problems.append("no MAP requests")
        removal = "unmap" if strict or not dev.get("features", 0) & 8 \
            else "unmap-list"
        if not req.get(removal):
            problems.append(f"no {removal.upper().replace('-', '_')} "
                            f"requests ({'strict' if strict else 'lazy'})")
    return problems


def _field(d, name, default=None):
    """d[name], with QMP's dashes or Python's underscores."""
    for k in (name, name.replace("_", "-"), name.replace("-", "_")):
        if k in d:
            return d[k]
    return default


def queue_summary(snapshot):
    """Per pvdma device: (queues set up, stopped, entries applied, entries
    failed, MAP requests, drains that took entries, requests over both
    transports), from a query-pvdma reply."""
    out = []
    for dev in snapshot or []:
        qs = [q for q in _field(dev, "queues", []) or []
              if _field(q, "set-up", True)]
        req = dev.get("requests", {})
        tr = dev.get("transports", {})
        out.append((len(qs), sum(bool(_field(q, "stopped")) for q in qs),
                    sum(_field(q, "applied", 0) for q in qs),
                    sum(_field(q, "failed", 0) for q in qs),
                    req.get("map", 0), sum(_field(q, "drains", 0) for q in qs),
                    sum(v for v in tr.values() if isinstance(v, int))))
    return out


def check_queued(snapshot):
    """Problems in the final query-pvdma of a run of the driver's queued
    mode (queued=1): the host offers FEATURES.QUEUE (bit 4), queues are set
    up, none stopped, entries were applied and none failed, fewer
    requests were made (SYNCs, boot-time QUERY/ATTACH, the refusal
    test's) than entries applied, and the synchronous MAPs (replays) are
    far fewer than the queued entries."""
    if not snapshot:
        return ["query-pvdma shows no pvdma device"]
    problems = []
    for dev, (nq, stopped, applied, failed, maps, _, reqs) in \
            zip(snapshot, queue_summary(snapshot)):
        name = dev.get("id", dev["path"])
        if not dev.get("features", 0) & 16:
            problems.append(f"{name}: FEATURES {dev.get('features')} "
                            f"offers no QUEUE (bit 4)")
            continue
        if nq == 0:
            problems.append(f"{name}: no request queue set up")
        if stopped:
            problems.append(f"{name}: {stopped} queues stopped")
        if failed:
            problems.append(f"{name}: {failed} queued entries failed")
        if applied == 0:
            problems.append(f"{name}: no queued entry applied")
        if reqs >= applied:
            problems.append(f"{name}: {reqs} requests for {applied} "
                            f"queued entries")
        if maps * 10 > applied:
            problems.append(f"{name}: {maps} synchronous MAPs for "
                            f"{applied} queued entries")
    return problems


def check_refused(snapshot, rid):
    """Problems in the final query-pvdma of a refusal run: FAULTS must have
    risen, and every recorded fault must be the refused device's."""
    if not snapshot:
        return ["query-pvdma shows no pvdma device"]
    problems = []
    for dev in snapshot:
        if dev.get("faults", 0) == 0:
            problems.append("FAULTS is 0 after the refused DMA")
        others = {f["requester"] for f in dev.get("last-faults", [])} - {rid}
        if others:
            problems.append(f"faults from {sorted(others)}, not only {rid}")
    return problems


def pci_find(qmp, rid):
    """query-pci: (qdev id, qdev id of the bridge above it or None) of the
    function rid (bus:dev.fn, the guest's bus numbers), or None."""
    bus, _, df = rid.partition(":")
    dev, _, fn = df.partition(".")
    want = (int(bus, 16), int(dev, 16), int(fn, 16))

    def walk(devices, parent):
        for d in devices:
            if (d["bus"], d["slot"], d["function"]) == want:
                return d.get("qdev_id"), parent
            below = (d.get("pci_bridge") or {}).get("devices")
            found = walk(below, d.get("qdev_id")) if below else None
            if found:
                return found
        return None

    for b in qmp.execute("query-pci"):
        found = walk(b["devices"], None)
        if found:
            return found
    return None


def check_unplugged(snapshot, rid):
    """Problems in a query-pvdma taken after function rid was unplugged:
    it must be neither attached nor hold mappings, and pvdma must hold no
    mappings that no listed endpoint accounts for."""
    if not snapshot:
        return ["query-pvdma shows no pvdma device"]
    problems = []
    for dev in snapshot:
        eps = dev.get("endpoints", [])
        for e in eps:
            if e["requester"] == rid and (e["attached"] or e["mappings"]):
                problems.append(f"removed {rid}: attached={e['attached']}, "
                                f"mappings {e['mappings']}")
        held = sum(e["mappings"] for e in eps)
        if dev.get("mappings", held) != held:
            problems.append(f"{dev['mappings']} mappings, endpoints hold "
                            f"{held}")
    return problems


def hotplug_cycle(vm, rid, res, say, limit=45):
    """The host's part of the guest's `PAUSE unplug:<rid>`: the function
    rid, under I/O, must be the virtio-blk disk below its root port and
    attached; device_del it, wait (bounded) until QEMU has removed it,
    check query-pvdma (snapshot "unplugged"), device_add it again into the
    same port, and a second virtio-blk function into the spare port
    (empty since boot). Returns problems (strings)."""
    q = vm.qmp()
    snap = q.execute("query-pvdma")
    res.snapshots["before-unplug"] = snap
    problems = check_pvdma(snap, [rid])
    eps = {e["requester"]: e for d in snap for e in d.get("endpoints", [])}
    if rid in eps and not eps[rid]["mappings"]:
        problems.append(f"{rid} under I/O holds no mappings")
    found = pci_find(q, rid)
    if found != (BLK_HOTPLUG["id"], BLK_HOTPLUG["bus"]):
        return problems + [f"{rid} is {found}, not "
                           f"({BLK_HOTPLUG['id']}, {BLK_HOTPLUG['bus']})"]
    t0 = time.monotonic()
    q.execute("device_del", id=BLK_HOTPLUG["id"])
    while pci_find(q, rid):
        if time.monotonic() - t0 > limit:
            return problems + [f"device_del {rid}: still there after "
                               f"{limit} s"]
        time.sleep(0.2)
    gone = time.monotonic() - t0
    snap = q.execute("query-pvdma")
    res.snapshots["unplugged"] = snap
    say(f"== host: {rid} removed after {gone:.1f} s; query-pvdma "
        f"(unplugged)\n" + compact_json(snap), flush=True)
    problems += check_unplugged(snap, rid)
    # The guest's release_device DETACHed it before QEMU dropped it (QEMU
    # forgets an unplugged function on its own; this is the guest's part).
    def detaches(reply):
        return sum(d.get("requests", {}).get("detach", 0) for d in reply)

    if detaches(snap) <= detaches(res.snapshots["before-unplug"]):
        problems.append(f"the guest sent no DETACH when {rid} was removed")
    for plug in (BLK_HOTPLUG, HOT_PLUG):
        # The removed device leaves QEMU's PCI bus before it lets go of
        # its -blockdev (requests in flight end first): retry, bounded.
        t1 = time.monotonic()
        while True:
            try:
                q.execute("device_add", **plug)
                break
            except QemuError as e:
                if time.monotonic() - t1 > 15:
                    return problems + [f"device_add {plug['id']}: {e}"]
                time.sleep(0.2)
        say(f"== host: device_add {plug['id']} into {plug['bus']} "
            f"({time.monotonic() - t1:.1f} s)", flush=True)
    res.times["unplugged_s"] = round(gone, 2)
    return problems


def poweroff_snapshot(vm, limit=30):
    """Waits (at most limit seconds) for QEMU to stop at the guest's
    power-off (-action shutdown=pause: no reset, so pvdma's state is what
    the guest left), returns query-pvdma there and quits QEMU."""
    qmp = vm.qmp()
    end = time.monotonic() + limit
    while qmp.execute("query-status")["status"] != "shutdown":
        if time.monotonic() > end:
            raise QemuError(f"the guest did not power off within {limit} s")
        time.sleep(0.1)
    snap = qmp.execute("query-pvdma")
    qmp.execute("quit")
    return snap


def check_shutdown(final, poweroff):
    """Problems after the guest's power-off: every endpoint must be
    detached (the driver's shutdown hook DETACHes them for a kexec'd
    kernel), with one DETACH per endpoint attached at the final PAUSE."""
    if not poweroff:
        return ["no query-pvdma after the power-off"]
    problems = []
    for before, after in zip(final or [], poweroff):
        name = after.get("id", after["path"])
        still = [e["requester"] for e in after.get("endpoints", [])
                 if e["attached"]]
        if still:
            problems.append(f"{name}: attached after the power-off: "
                            f"{', '.join(still)}")
        was = sum(e["attached"] for e in before.get("endpoints", []))
        sent = (after.get("requests", {}).get("detach", 0)
                - before.get("requests", {}).get("detach", 0))
        if sent < was:
            problems.append(f"{name}: {sent} DETACH at power-off for "
                            f"{was} attached endpoints")
    return problems


def stall_dump(vm):
    """The local APICs and registers of every vCPU (HMP over QMP), as text
    for the log; never raises (QEMU may be going away)."""
    out = ["== host: a guest RCU stall; the vCPUs' interrupt state"]
    for cmd in ("info lapic 0", "info lapic 1", "info registers -a"):
        try:
            text = vm.qmp().execute("human-monitor-command",
                                    **{"command-line": cmd})
        except (OSError, ValueError, QemuError) as e:
            text = f"({e})"
        out.append(f"-- {cmd}\n{text}")
    return "\n".join(out)


def run_variant(qemu, image, variant, strict=False, mode="test", bench=(),
                modparams="", timeout=90, extra_append=(), echo=True,
                disk_cache="writeback", disk_mib=64, query=True,
                refuse=False, detached=(), vhost_user_blk=None,
                on_line=None, topology="flat", hotplug=False, extra_args=(),
                on_pause=None, clean_tag=None, after_poweroff=False,
                expect_queued=False, vhost_user_blk_opts=None):
    """Boots the I/O guest once; returns a RunResult (never raises for a
    guest failure; QEMU is gone when it returns).

    At every `PVDMA-IO: PAUSE <tag>` of the guest, runs query-pvdma (when
    the variant has a pvdma device and query is true) into
    .snapshots[tag], then lets the guest go on. With a pvdma device, a
    run only passes when the final snapshot shows FAULTS 0 and every
    device under test (.devices, from the guest's DEVICE lines) attached
    (variant pvdma) or not (pvdma-bypass). QEMU's CPU time (utime +
    stime of all its threads) is read at the guest's markers:
    .phases["boot"] (QEMU start -> /init), "run:<what>" (RUN .. DONE of
    each pvdma-io run, e.g. run:verify-blk), "<name>" (MARK begin:<name>
    .. end:<name>, around a benchmark's timed part only: use these to
    compute host CPU per I/O with .results), "total".

    detached: requesters that must be listed and not attached (functions
    the driver was told to exclude).

    refuse (variant pvdma, mode test; True, "ro" or "both", see
    guest/io/init): after the checks the guest shows a
    refused DMA on the NVMe disk (on the virtio-blk disk when it is the
    only one); then the snapshot taken before it ("verified") must be
    clean, and the final one must show faults, all of them that
    function's.

    vhost_user_blk: the virtio-blk disk is a vhost-user-blk-pci on this
    socket (qemu_args); its backend is the caller's to start.
    vhost_user_blk_opts: its device options (qemu_args).
    on_line(vm, line): called for every console line (after the
    framework's own handling), e.g. to act at a marker.

    topology: "flat" or "rootports" (qemu_args). hotplug (topology
    rootports, mode test; True or "acpi": QEMU's default ACPI hotplug,
    "pciehp": PCIe native): the guest runs I/O on the virtio-blk disk and
    pauses at `unplug:<rid>`; the host then removes that function and
    plugs it in again (hotplug_cycle), and the run passes only if pvdma
    held nothing for it once it was gone, and the new function's disk
    was verified and ends up attached.
    extra_args: more QEMU arguments (devices, a second -qmp).
    on_pause(vm, tag, when): called at each PAUSE with when "before"
    (before query-pvdma) and "after" (after it, before the guest goes on).
    clean_tag: the PAUSE whose snapshot must show FAULTS 0 and the devices
    attached (default "final", or "verified" with refuse).
    after_poweroff: QEMU pauses at the guest's power-off instead of
    exiting (-action shutdown=pause); the framework then takes
    .snapshots["poweroff"] and quits QEMU. The guest's power-off runs the
    drivers' shutdown hooks, so this is what a kexec'd kernel would find.
    expect_queued (variant pvdma, the driver's queued=1): the final
    snapshot must show the request queues used (check_queued) instead of
    the synchronous request counts (check_requests).
    """
    say = print if echo else (lambda *a, **k: None)
    if hotplug and (topology != "rootports" or mode != "test"):
        raise ValueError("hotplug needs topology rootports and mode test")
    if hotplug not in (False, True, "acpi", "pciehp"):
        raise ValueError(f"hotplug={hotplug!r}: acpi or pciehp")
    append = guest_append(variant, strict, mode, bench, modparams,
                          extra_append, refuse=refuse, hotplug=hotplug)
    import tempfile
    disk_dir = tempfile.TemporaryDirectory(prefix="pvdma-io-disks-")
    args = qemu_args(image, variant, disk_dir.name, append, disk_cache,
                     disk_mib, vhost_user_blk, topology,
                     hotplug == "pciehp", vhost_user_blk_opts) + list(extra_args)
    if after_poweroff:
        args += ["-action", "shutdown=pause"]
    res = RunResult(image.kernel, variant, strict, mode, [qemu, *args],
                    topology, hotplug)
    has_pvdma = variant in ("pvdma", "pvdma-bypass")
    if variant == "pvdma" and not image.pvdma_iommu:
        res.failure = "variant pvdma needs guest/linux (pvdma_iommu.ko)"
        disk_dir.cleanup()
        return res
    if variant == "virtio" and not image.virtio_iommu:
        res.failure = f"kernel {image.kernel} has no virtio-iommu driver"
        disk_dir.cleanup()
        return res
    vm = None
    hotplug_problems = ["the guest never paused at unplug"] if hotplug else []
    open_marks = {}          # name -> (monotonic, cpu)
    last_mark = None
    stall_dumped = False
    try:
        vm = ConsoleMachine(qemu, args, timeout)
        say("$ " + " ".join(vm.argv[3:]), flush=True)
        for line in vm.lines():
            res.console.append(line)
            say(line, flush=True)
            if on_line is not None:
                on_line(vm, line)
            if "rcu: INFO: rcu_preempt detected stalls" in line and \
                    not stall_dumped:
                # A rare TCG hang under host load (one vCPU never takes a
                # LAPIC timer interrupt again): record the vCPUs' interrupt
                # state the first time, for whoever meets it next.
                stall_dumped = True
                say(stall_dump(vm), flush=True)
            if line.startswith("RESULT "):
                # pvdma-io prints MARK end:<name> right before its RESULT:
                # attach that phase's QEMU CPU time, and per I/O / frame.
                r = parse_result(line)
                if last_mark in res.phases:
                    p = res.phases[last_mark]
                    ops = r.get("ios", r.get("frames", 0))
                    r["phase"] = last_mark
                    r["qemu_cpu_s"] = p.cpu_s
                    r["qemu_cpu_us_per_op"] = (round(p.cpu_s / ops * 1e6, 2)
                                               if ops else None)
                res.results.append(r)
                continue
            at = line.find(MARK)
            if at < 0:
                continue
            words = line[at + len(MARK):].split()
            if not words:
                continue
            now = vm.elapsed()
            if words[0] == "BOOTED":
                res.times["booted"] = round(now, 2)
                res.phases["boot"] = Phase(now, vm.cpu_seconds())
            elif words[0] == "DEVICE" and len(words) > 1:
                res.devices[words[1]] = dict(
                    w.split("=", 1) for w in words[2:] if "=" in w)
            elif words[0] == "READY":
                res.times["ready"] = round(now, 2)
            elif words[0] in ("RUN", "MARK", "DONE"):
                name = words[1].rstrip(":") if len(words) > 1 else "?"
                if words[0] == "RUN":
                    name = "run:" + name
                elif words[0] == "DONE":
                    name = "run:" + name.rstrip(",")
                if words[0] == "MARK":
                    edge, _, name = name.partition(":")
                    begin = edge == "begin"
                else:
                    begin = words[0] == "RUN"
                if begin:
                    open_marks[name] = (now, vm.cpu_seconds())
                elif name in open_marks:
                    t, c = open_marks.pop(name)
                    base, n = name, 1
                    while name in res.phases:     # the same run again
                        n += 1
                        name = f"{base}#{n}"
                    res.phases[name] = Phase(round(now - t, 3),
                                             round(vm.cpu_seconds() - c, 3))
                    if words[0] == "MARK":
                        last_mark = name
            elif words[0] == "PASS":
                res.times["result"] = round(now, 2)
                res.passed = True
                if after_poweroff and has_pvdma:
                    res.snapshots["poweroff"] = poweroff_snapshot(vm)
                    say("== host: query-pvdma (poweroff)\n"
                        + compact_json(res.snapshots["poweroff"]),
                        flush=True)
            elif words[0] == "FAIL":
                res.times["result"] = round(now, 2)
                res.failure = "guest: " + " ".join(words[1:])
                if after_poweroff:      # QEMU would wait at the power-off
                    res.snapshots["poweroff"] = poweroff_snapshot(vm)
            elif words[0] == "PAUSE":
                tag = words[1] if len(words) > 1 else "?"
                if on_pause is not None:
                    on_pause(vm, tag, "before")
                if hotplug and tag.startswith("unplug:"):
                    hotplug_problems = hotplug_cycle(
                        vm, tag.split(":", 1)[1], res, say)
                elif has_pvdma and query:
                    snap = vm.qmp().execute("query-pvdma")
                    res.snapshots[tag] = snap
                    say(f"== host: query-pvdma ({tag})\n"
                        + compact_json(snap), flush=True)
                res.cpu_total_s = vm.cpu_seconds()
                if on_pause is not None:
                    on_pause(vm, tag, "after")
                vm.send_line()
        if res.failure is None:
            try:
                rc = vm.wait(max(1, vm.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                res.failure = "QEMU did not exit after the guest finished"
            else:
                if rc in (124, 137):
                    res.failure = f"timed out after {timeout} s"
                elif rc != 0:
                    res.failure = f"QEMU exited with status {rc}"
                elif not res.passed:
                    res.failure = "the guest did not print PASS"
    except QemuTimeout as e:
        res.failure = str(e)
    except (OSError, ValueError, QemuError) as e:
        res.failure = f"host side: {e}"
    finally:
        if vm is not None:
            res.times["exit"] = round(vm.elapsed(), 2)
            vm.close()
        disk_dir.cleanup()
    # pvdma's view at the end: no refused DMA, and the devices under test
    # translated (pvdma) or bypassing (pvdma-bypass).
    if res.passed and has_pvdma and query:
        tested = [requester(d["pci"]) for d in res.devices.values()
                  if "pci" in d]
        clean = clean_tag or ("verified" if refuse else "final")
        problems = check_pvdma(res.snapshots.get(clean), tested,
                               attached=variant == "pvdma")
        if not problems and variant == "pvdma":
            final = res.snapshots.get("final")
            if expect_queued:
                problems = check_queued(final)
                for nq, st, ap, fl, mp, sy, tr in queue_summary(final):
                    say(f"== queues: {nq} set up, {st} stopped, {ap} "
                        f"entries applied in {sy} drains, {fl} failed; "
                        f"requests: {mp} MAP, {tr} in all", flush=True)
            else:
                problems = check_requests(final, strict)
        if not problems and detached:
            problems = check_pvdma(res.snapshots.get(clean), detached,
                                   attached=False)
        if problems:
            res.failure = f"query-pvdma ({clean}): " + "; ".join(problems)
        elif refuse:
            nvme = [requester(d["pci"]) for name, d in res.devices.items()
                    if name.startswith("nvme") and "pci" in d] or \
                   [requester(d["pci"]) for name, d in res.devices.items()
                    if name.startswith("vd") and "pci" in d]
            problems = check_refused(res.snapshots.get("final"),
                                     nvme[0] if nvme else "?")
            if problems:
                res.failure = "query-pvdma (final): " + "; ".join(problems)
        if res.failure is None and after_poweroff:
            problems = check_shutdown(res.snapshots.get("final"),
                                      res.snapshots.get("poweroff"))
            if problems:
                res.failure = "query-pvdma (poweroff): " + "; ".join(problems)
    if res.passed and hotplug_problems:
        res.failure = "hotplug: " + "; ".join(hotplug_problems)
    if res.failure is not None:
        res.passed = False
    if res.cpu_total_s is not None:
        res.phases["total"] = Phase(res.times.get("result", 0),
                                    round(res.cpu_total_s, 3))
    return res


def summary(r):
    """One line for a RunResult."""
    t = r.times
    verdict = "PASS" if r.passed else f"FAIL: {r.failure}"
    return (f"kernel {r.kernel} variant {r.variant}"
            f"{' strict' if r.strict else ''}"
            f"{' ' + r.topology if r.topology != 'flat' else ''}"
            f"{' hotplug' if r.hotplug else ''}"
            f"{'-pciehp' if r.hotplug == 'pciehp' else ''}"
            f" mode {r.mode}: {verdict}"
            f" (QEMU start -> /init {t.get('booted', '?')} s, -> ready"
            f" {t.get('ready', '?')} s, -> result {t.get('result', '?')} s,"
            f" -> exit {t.get('exit', '?')} s; QEMU CPU"
            f" {r.cpu_total_s if r.cpu_total_s is not None else '?'} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu", help="QEMU binary (default: qemu-build.sh's)")
    ap.add_argument("--kernel", default="6.1", choices=("6.1", "6.12", "7.2"))
    ap.add_argument("--variant", default="none", choices=VARIANTS)
    ap.add_argument("--strict", action="store_true",
                    help="iommu.strict=1 (unmap invalidates at once)")
    ap.add_argument("--mode", default="test", choices=("test", "bench", "demo"))
    ap.add_argument("--bench", nargs="*", default=[],
                    help="blk|nvme:seq|rand:BS:JOBS:SECS, net:SECS")
    ap.add_argument("--modparams", default="",
                    help="pvdma_iommu.ko parameters, comma-separated")
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--append", nargs="*", default=[],
                    help="more kernel command line arguments")
    ap.add_argument("--quiet", action="store_true", help="no console copy")
    ap.add_argument("--expect-detached", nargs="*", default=[],
                    help="variant pvdma: requesters (bb:dd.f) that must be "
                    "in query-pvdma and not attached at the end (the "
                    "driver's exclude=)")
    ap.add_argument("--refuse", nargs="?", const=True, default=False,
                    choices=(True, "1", "ro", "both"),
                    help="variant pvdma, mode test: end with a refused DMA "
                    "on the NVMe disk (FAULTS must rise, for it only): into "
                    "a buffer whose MAP was skipped (no value), mapped "
                    "read-only (ro), or both")
    ap.add_argument("--topology", default="flat",
                    choices=("flat", "rootports"),
                    help="flat: every device on the root bus; rootports: "
                    "each behind its own pcie-root-port (libvirt's q35)")
    ap.add_argument("--hotplug", nargs="?", const="acpi", default=False,
                    choices=("acpi", "pciehp"),
                    help="topology rootports, mode test: remove the "
                    "virtio-blk function under I/O and plug it in again, "
                    "through ACPI hotplug (QEMU's q35 default) or the "
                    "guest's pciehp")
    ap.add_argument("--expect-queued", action="store_true",
                    help="variant pvdma: the driver's queued mode must "
                    "have been used (FEATURES.QUEUE, queues set up, "
                    "entries applied, none failed)")
    ap.add_argument("--summary-file",
                    help="append the one-line summary to this file")
    ap.add_argument("--json", help="write the whole result (RunResult) "
                    "as JSON to this file")
    a = ap.parse_args()
    interrupt_on_signals()
    qemu = a.qemu or qemu_build()
    image = prepare(a.kernel)
    try:
        r = run_variant(qemu, image, a.variant, a.strict, a.mode, a.bench,
                        a.modparams, a.timeout, a.append, echo=not a.quiet,
                        refuse=a.refuse, detached=a.expect_detached,
                        topology=a.topology, hotplug=a.hotplug,
                        expect_queued=a.expect_queued)
    except KeyboardInterrupt as e:
        sys.exit(f"interrupted ({e or 'SIGINT'})")
    for name, p in r.phases.items():
        print(f"== phase {name}: wall {p.wall_s:.2f} s, QEMU CPU {p.cpu_s:.2f} s")
    for res in r.results:
        print(f"== result {res}")
    print("== " + summary(r))
    if a.summary_file:
        with open(a.summary_file, "a") as f:
            f.write(summary(r) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dataclasses.asdict(r), f, indent=1)
    return 0 if r.passed else 1


if __name__ == "__main__":
    sys.exit(main())
