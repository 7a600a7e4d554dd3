#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Checks that a libvirt-managed QEMU runs -device pvdma the way
# qemu-glue/docs/system/devices/pvdma.rst tells users to pass it: libvirt
# has no element for pvdma, so the domain XML carries it (and an edu device
# behind it) in <qemu:commandline> with fixed PCI addresses. The check
# defines and starts a q35 TCG domain through libvirt, then through
# libvirt's monitor passthrough (virsh qemu-monitor-command) expects
# query-pci to show pvdma (1b36:0015) and edu at the chosen slots,
# query-pvdma to answer with one device having edu as an endpoint, and HMP
# "info pvdma" to print it; then destroys and undefines the domain. The
# domain also has an i6300esb watchdog, a conventional PCI device for which
# libvirt adds bridges of its own on pcie.0, so libvirt's address
# assignment runs next to the fixed slots.
#
# The machine's libvirt state (/etc/libvirt, /var/lib/libvirt,
# /run/libvirt, system daemons) is never used: a private *session* libvirtd
# (qemu:///session) runs as an unprivileged user (libvirt treats euid 0 as
# privileged: run as root, the check drops to nobody with setpriv; run as
# anyone else, it stays that user) with HOME and every XDG_*
# directory inside one temporary directory owned by that user. It listens
# only on its unix socket there, exits by itself after --timeout seconds
# idle, and is killed on every exit path along with the domain's QEMU.
# virsh runs with LIBVIRT_AUTOSTART=0 so it never spawns a daemon of its own.
# The unprivileged user cannot read the QEMU build under /root, so the
# binary is copied into the temporary directory; it finds its firmware
# through its --firmwarepath (/usr/share/qemu, /usr/share/seabios), which
# works from any location.
#
# Installs libvirt-daemon, libvirt-daemon-driver-qemu and libvirt-clients
# (Debian 12: libvirt 9.0.0) when missing; not libvirt-daemon-system, which
# would set up and start the system daemons. Fails (never skips) when they
# cannot be installed.
#
# --native checks libvirt with patches/libvirt instead (docs/libvirt.md):
# libvirtd and virsh of tools/libvirt-build.sh's build, a domain with
# <iommu model='pvdma'> (pin_mode='mlock', a pin limit and every other
# option set), a virtio-blk disk, two virtio-net NICs wired to each other
# and edu in <qemu:commandline>, booting the Debian 6.1 I/O guest
# (guest/io/init with pvdma_iommu.ko). It expects the device libvirt
# placed on pcie.0 in query-pci, every option back in query-pvdma, edu
# among pvdma's endpoints, the <iommu> element unchanged through
# dumpxml and a second define, in /proc/<QEMU pid>/limits the locked
# memory limit libvirt computes from the pin limit (pin limit + 1 GiB),
# the disk and the NICs in pvdma's IOMMU groups in the guest and attached
# with mappings in query-pvdma, and the guest's data checks to pass.
# The build lives under /root/.cache, which the unprivileged user cannot
# enter: run as root, the check runs in a mount namespace of its own
# (unshare) where a small tmpfs covers /root and the build directory alone
# is bind-mounted back, read-only, at its path (libvirt run from its build
# tree finds its modules there). The daemon starts with an unlimited hard
# RLIMIT_MEMLOCK so that libvirt, unprivileged, can set QEMU's.
#
# Usage: tests/qemu/libvirt-check.sh [--native] [path/to/qemu-system-x86_64]
# Env:   PVDMA_LIBVIRT_TIMEOUT  seconds each virsh call may take (default 20);
#                               the whole check is killed after 120 s
#        PVDMA_LIBVIRT_USER     uid:gid to run libvirt as when run as root
#                               (default 65534:65534, nobody)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/../framework/lib.sh"

native=0
if [[ ${1:-} == --native ]]; then
    native=1
    shift
fi
qemu=${1:-$("$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)}
limit=${PVDMA_LIBVIRT_TIMEOUT:-20}
ids=${PVDMA_LIBVIRT_USER:-65534:65534}
uid=${ids%%:*}
gid=${ids##*:}
dom=pvdma-libvirt-check
# pvdma at the slot pvdma.rst's XML gives it. On q35 libvirt fills slots
# from 00:01 upwards and puts devices of its own at fixed slots only at
# 00:01 (video), 00:1a and 00:1d (ICH9 USB2), 00:1b (ICH9 sound), 00:1e
# (a dmi-to-pci-bridge in the XML without an address) and 00:1f (ICH9);
# 00:1e was the documented slot until a domain with such a bridge failed
# to start ("slot 30 function 0 not available"). edu goes to 00:19.
pvdma_slot=0x1c
edu_slot=0x19

[[ -x $qemu ]] || die "no QEMU binary at $qemu"
# the whole check runs under one deadline: on it the EXIT trap still cleans
# up (no --kill-after, which would skip the trap)
if [[ -z ${PVDMA_LIBVIRT_DEADLINE:-} ]]; then
    # --native boots a guest that does I/O: more time
    export PVDMA_LIBVIRT_DEADLINE=120
    ((native)) && PVDMA_LIBVIRT_DEADLINE=300
    mode=()
    ((native)) && mode=(--native)
    if ((native)); then
        # built (or found cached) before the deadline starts, as is the
        # I/O guest (Debian 6.1 with pvdma_iommu.ko, tools/guest-io-prepare.sh)
        PVDMA_LIBVIRT_BUILD=$("$PVDMA_ROOT/tools/libvirt-build.sh" | tail -n1)
        guest=$("$PVDMA_ROOT/tools/guest-io-prepare.sh" 6.1)
        PVDMA_LIBVIRT_VMLINUZ=$(sed -n 's/^VMLINUZ=//p' <<<"$guest")
        PVDMA_LIBVIRT_INITRD=$(sed -n 's/^INITRD=//p' <<<"$guest")
        grep -qx PVDMA_IOMMU=yes <<<"$guest" || die "the 6.1 I/O guest has no pvdma_iommu.ko"
        export PVDMA_LIBVIRT_BUILD PVDMA_LIBVIRT_VMLINUZ PVDMA_LIBVIRT_INITRD
    fi
    # --native as root: a mount namespace of its own (see above)
    ns=()
    ((native && $(id -u) == 0)) && ns=(unshare --mount --propagation private)
    exec timeout "$PVDMA_LIBVIRT_DEADLINE" "${ns[@]}" "$BASH" "$0" "${mode[@]}" "$qemu"
fi
if ((native)); then
    build=${PVDMA_LIBVIRT_BUILD:?}
    libvirtd=$build/src/libvirtd
    virsh=$build/tools/virsh
    dom=pvdma-libvirt-native
else
    ensure_apt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients ||
        die "cannot install the libvirt packages (no network or no apt source?)"
    libvirtd=$(command -v libvirtd) || die "libvirtd not found after installing libvirt"
    virsh=$(command -v virsh) || die "virsh not found after installing libvirt"
fi

tmp=$(mktemp -d /tmp/pvdma-libvirt.XXXXXX)
daemon_pid=
hold=
# destroy the domain, kill what libvirt left running, stop the daemon,
# remove the directory; runs on every exit path
cleanup() {
    local rc=$? pidfile qpid
    trap - EXIT INT TERM
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        "${as_user[@]}" timeout -k 5 10 "$virsh" -q -c qemu:///session destroy "$dom" \
            >/dev/null 2>&1 || true
    fi
    # QEMU outlives libvirtd if the daemon dies first: kill it by its pid
    pidfile=$tmp/run/libvirt/qemu/run/$dom.pid
    if [[ -s $pidfile ]]; then
        qpid=$(<"$pidfile")
        if [[ $qpid =~ ^[0-9]+$ ]] && kill -0 "$qpid" 2>/dev/null; then
            kill -KILL "$qpid" 2>/dev/null || true
        fi
    fi
    if [[ -n $daemon_pid ]]; then
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    # the namespace's mounts go with it; $hold (outside $tmp) is only
    # ever rmdir'ed, never removed recursively
    if [[ -n $hold ]]; then
        umount "$(dirname "$build")" 2>/dev/null || true
        umount /root 2>/dev/null || true
        umount "$hold" 2>/dev/null || true
        rmdir "$hold" 2>/dev/null || true
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# "${as_user[@]}" CMD...: runs CMD as the unprivileged user with the
# private environment (nothing inherited from ours but PATH and LANG). An
# array, not a function, so that `"${as_user[@]}" CMD &` leaves $! the pid
# of the process that becomes CMD (setpriv and env exec), not of a subshell.
# Run by a user other than root, libvirt is unprivileged already and runs
# as that user.
as_user=()
(($(id -u) == 0)) && as_user=(setpriv --reuid="$uid" --regid="$gid" --clear-groups)
as_user+=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
    HOME="$tmp/home" XDG_RUNTIME_DIR="$tmp/run"
    XDG_CONFIG_HOME="$tmp/config" XDG_CACHE_HOME="$tmp/cache"
    XDG_DATA_HOME="$tmp/data" LIBVIRT_AUTOSTART=0)
virsh_() { "${as_user[@]}" timeout -k 5 "$limit" "$virsh" -q -c qemu:///session "$@"; }

mkdir -p "$tmp"/{home,run,config/libvirt,cache,data,qemu/bin}
chmod 700 "$tmp/run"
cp "$qemu" "$tmp/qemu/bin/qemu-system-x86_64"
if ((native)); then
    # the I/O guest and its virtio-blk disk, where nobody can read them
    mkdir -p "$tmp/guest"
    cp "${PVDMA_LIBVIRT_VMLINUZ:?}" "$tmp/guest/vmlinuz"
    cp "${PVDMA_LIBVIRT_INITRD:?}" "$tmp/guest/initrd"
    truncate -s 64M "$tmp/guest/blk.img"
fi
if ((native && $(id -u) == 0)); then
    # in our own mount namespace: cover /root, bring the build back
    lvwork=$(dirname "$build")
    [[ $lvwork == /root/* ]] || die "expected the libvirt build under /root, not $lvwork"
    hold=$(mktemp -d /tmp/pvdma-libvirt-build.XXXXXX)
    mount --bind "$lvwork" "$hold" && mount -o remount,bind,ro "$hold" ||
        die "cannot bind-mount $lvwork (needs a mount namespace: unshare)"
    mount -t tmpfs -o mode=0755,size=1m pvdma-root /root
    mkdir -p "$lvwork"
    mount --bind "$hold" "$lvwork" && mount -o remount,bind,ro "$lvwork" ||
        die "cannot bind-mount the build back at $lvwork"
fi
# QEMU's stdout/stderr go to a plain file instead of through virtlogd, so
# the session starts no second daemon
echo 'stdio_handler = "file"' >"$tmp/config/libvirt/qemu.conf"
# --native: pvdma from the domain XML's own element, every option set;
# libvirt assigns its slot. The locked memory libvirt gives QEMU: the pin
# limit (pin_mode='mlock', no VFIO device) plus 1 GiB (docs/libvirt.md).
pin_limit_mib=64
memlock_want=$(((pin_limit_mib + 1024) << 20))
if ((native)); then
    # The I/O guest (guest/io/init) loads pvdma_iommu.ko, checks that the
    # virtio-blk disk and both NICs are in pvdma's IOMMU groups, verifies
    # data written to the disk and sent from one NIC to the other (wired
    # together through a TCP socket on the loopback, which unlike UDP
    # loses no frame), prints PVDMA-IO: PASS or FAIL and
    # powers off. libvirt puts each device behind a pcie-root-port.
    # A uuid of its own, so that the XML can be defined again (edited).
    port=$((20000 + RANDOM % 20000))
    cat >"$tmp/domain.xml" <<EOF
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$dom</name>
  <uuid>$(cat /proc/sys/kernel/random/uuid)</uuid>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <!-- qboot: SeaBIOS takes 30-50 s under TCG -->
    <loader readonly='yes' type='rom'>/usr/share/qemu/qboot.rom</loader>
    <kernel>$tmp/guest/vmlinuz</kernel>
    <initrd>$tmp/guest/initrd</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 pvdmaio.mode=test pvdmaio.iommu=pvdma pvdmaio.disks=blk pvdmaio.pause_timeout=1</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>$tmp/qemu/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <disk type='file' device='disk' model='virtio-non-transitional'>
      <driver name='qemu' type='raw' iommu='on'/>
      <source file='$tmp/guest/blk.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='server'>
      <mac address='52:54:00:fa:00:01'/>
      <source address='127.0.0.1' port='$port'/>
      <model type='virtio-non-transitional'/>
      <driver iommu='on'/>
    </interface>
    <interface type='client'>
      <mac address='52:54:00:fa:00:02'/>
      <source address='127.0.0.1' port='$port'/>
      <model type='virtio-non-transitional'/>
      <driver iommu='on'/>
    </interface>
    <serial type='file'>
      <source path='$tmp/serial.log'/>
    </serial>
    <iommu model='pvdma'>
      <driver pin_mode='mlock' iova_bits='39' bypass='off' hypercall='off' unmap_list='off' queues='2'>
        <pin_limit unit='MiB'>$pin_limit_mib</pin_limit>
        <mem_limit unit='MiB'>32</mem_limit>
      </driver>
    </iommu>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='edu,id=edu0,bus=pcie.0,addr=$edu_slot'/>
  </qemu:commandline>
</domain>
EOF
else
cat >"$tmp/domain.xml" <<EOF
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$dom</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <!-- without <acpi/> libvirt 9.0 passes -no-acpi, which QEMU 10.2 rejects -->
  <features>
    <acpi/>
  </features>
  <devices>
    <emulator>$tmp/qemu/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <!-- a conventional PCI device: libvirt adds a pcie-root-port and a
         pcie-to-pci-bridge for it on pcie.0, next to the fixed slots -->
    <watchdog model='i6300esb' action='reset'/>
    <serial type='file'>
      <source path='$tmp/serial.log'/>
    </serial>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='pvdma,id=pvdma0,bus=pcie.0,addr=$pvdma_slot,pin-limit=1073741824'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='edu,id=edu0,bus=pcie.0,addr=$edu_slot'/>
  </qemu:commandline>
</domain>
EOF
fi
(($(id -u) == 0)) && chown -R "$uid:$gid" "$tmp"

# on failure, show what libvirt and QEMU said
dump_logs() {
    local f
    for f in "$tmp/libvirtd.log" "$tmp/cache/libvirt/qemu/log/$dom.log"; do
        [[ -s $f ]] && { log "--- $f"; tail -n 30 "$f" >&2; }
    done
    return 0
}

t0=$SECONDS
log "libvirtd $("$libvirtd" --version | awk '{print $NF}') ($libvirtd) session daemon as uid $("${as_user[@]}" id -u) in $tmp"
# an unlimited hard RLIMIT_MEMLOCK, which only root can grant, lets the
# unprivileged daemon set the limit it computes on QEMU (--native). A
# root without CAP_SYS_RESOURCE (some containers) cannot: see below.
memlock=()
can_raise=0
hard=$(ulimit -Hl)
if [[ $hard == unlimited ]] || ((hard * 1024 >= memlock_want)); then
    can_raise=1
elif ((native && $(id -u) == 0)) &&
    prlimit --memlock=unlimited:unlimited -- true 2>/dev/null; then
    memlock=(prlimit --memlock=unlimited:unlimited --)
    can_raise=1
fi
# --timeout: exit after 60 s without clients or domains, even if we are killed
"${memlock[@]}" "${as_user[@]}" timeout -k 5 150 "$libvirtd" --timeout 60 >"$tmp/libvirtd.log" 2>&1 &
daemon_pid=$!
sock=$tmp/run/libvirt/libvirt-sock
for _ in $(seq 100); do
    [[ -S $sock ]] && break
    kill -0 "$daemon_pid" 2>/dev/null || { dump_logs; die "libvirtd exited"; }
    sleep 0.1
done
[[ -S $sock ]] || { dump_logs; die "libvirtd made no socket at $sock"; }
log "uri: $(virsh_ uri)"

virsh_ define "$tmp/domain.xml" >/dev/null || { dump_logs; die "virsh define"; }
pin_mode=mlock
if ((native && !can_raise)); then
    # This host lets no one raise RLIMIT_MEMLOCK (root lacks
    # CAP_SYS_RESOURCE, and our hard limit is lower), so libvirt cannot give QEMU the limit it computes
    # for pin_mode='mlock' and the start must fail naming that limit. The
    # domain then runs with pin_mode='none', for which libvirt sets no
    # limit at all (no VFIO device): QEMU keeps the daemon's.
    err=$(virsh_ start "$dom" 2>&1) && die "started although the host cannot raise RLIMIT_MEMLOCK"
    grep -q "cannot limit locked memory of process [0-9]* to $memlock_want:" <<<"$err" ||
        { dump_logs; die "start failed, but not on libvirt's memlock limit $memlock_want: $err"; }
    log "host cannot raise RLIMIT_MEMLOCK (no CAP_SYS_RESOURCE): the start with pin_mode='mlock' failed on libvirt's limit $memlock_want bytes = pin limit + 1 GiB, as computed"
    pin_mode=none
    sed -i "s/pin_mode='mlock'/pin_mode='none'/" "$tmp/domain.xml"
    virsh_ define "$tmp/domain.xml" >/dev/null || { dump_logs; die "virsh define (pin_mode=none)"; }
    memlock_want=$(($(ulimit -l) * 1024))
fi
virsh_ start "$dom" >/dev/null || { dump_logs; die "virsh start"; }
state=$(virsh_ domstate "$dom")
[[ $state == running ]] || { dump_logs; die "domain is '$state', not running"; }
qpid=$(<"$tmp/run/libvirt/qemu/run/$dom.pid")
log "domain $dom running (TCG, q35), QEMU pid $qpid"

teardown() {
    if [[ $(virsh_ domstate "$dom") != "shut off" ]]; then
        virsh_ destroy "$dom" >/dev/null || { dump_logs; die "virsh destroy"; }
    fi
    virsh_ undefine "$dom" >/dev/null || die "virsh undefine"
    left=$(virsh_ list --all --name | sed '/^$/d')
    [[ -z $left ]] || die "domains left after undefine: $left"
}

if ((native)); then
    # libvirt wrote the device as JSON with the XML's options
    grep -qF -- "-device '{\"driver\":\"pvdma\",\"id\":\"iommu0\",\"pin-limit\":$((pin_limit_mib << 20))," \
        "$tmp/cache/libvirt/qemu/log/$dom.log" ||
        { dump_logs; die "QEMU command line has no -device pvdma from <iommu>"; }
    xml1=$(virsh_ dumpxml "$dom") || { dump_logs; die "virsh dumpxml"; }
    # round trip: what dumpxml gives, defined again, dumps the same
    virsh_ dumpxml --inactive "$dom" >"$tmp/dump1.xml" || die "virsh dumpxml --inactive"
    virsh_ define "$tmp/dump1.xml" >/dev/null || { dump_logs; die "virsh define of dumpxml's output"; }
    virsh_ dumpxml --inactive "$dom" >"$tmp/dump2.xml" || die "virsh dumpxml --inactive (2)"
    pci=$(virsh_ qemu-monitor-command "$dom" '{"execute":"query-pci"}') ||
        { dump_logs; die "query-pci"; }
    pvdma=$(virsh_ qemu-monitor-command "$dom" '{"execute":"query-pvdma"}') ||
        { dump_logs; die "query-pvdma"; }
    limits=$(<"/proc/$qpid/limits")
    /usr/bin/python3 - "$xml1" "$tmp/dump1.xml" "$tmp/dump2.xml" "$pci" "$pvdma" \
        "$limits" "$pin_limit_mib" "$memlock_want" "$edu_slot" "$pin_mode" <<'PY' ||
import json, sys
import xml.etree.ElementTree as ET

xml1, dump1, dump2, pci, pvdma, limits = sys.argv[1:7]
pin_limit = int(sys.argv[7]) << 20
memlock_want, edu_slot = int(sys.argv[8]), int(sys.argv[9], 0)
pin_mode = sys.argv[10]

def iommu_of(text):
    its = ET.fromstring(text).findall("./devices/iommu")
    if len(its) != 1:
        sys.exit(f"dumpxml: {len(its)} <iommu> elements")
    return its[0]

def canon(e):
    return ET.tostring(e, encoding="unicode").strip()

# the element libvirt formats: every option as written (sizes in KiB),
# and the PCI address it assigned on bus 0; returns the slot
def check_iommu(it, what):
    drv = it.find("driver")
    want_attrs = {"pin_mode": pin_mode, "iova_bits": "39", "bypass": "off",
                  "hypercall": "off", "unmap_list": "off", "queues": "2"}
    if it.get("model") != "pvdma" or drv is None or dict(drv.attrib) != want_attrs:
        sys.exit(f"{what}: unexpected <iommu>:\n{canon(it)}")
    for name, kib in (("pin_limit", pin_limit >> 10), ("mem_limit", 32 << 10)):
        e = drv.find(name)
        if e is None or e.get("unit") != "KiB" or int(e.text) != kib:
            sys.exit(f"{what}: <{name}> is not {kib} KiB:\n{canon(it)}")
    addr = it.find("address")
    if (addr is None or addr.get("type") != "pci"
            or int(addr.get("domain"), 0) != 0 or int(addr.get("bus"), 0) != 0):
        sys.exit(f"{what}: pvdma has no PCI address on bus 0:\n{canon(it)}")
    return int(addr.get("slot"), 0)

slot = check_iommu(iommu_of(xml1), "dumpxml")
i1, i2 = (iommu_of(open(f).read()) for f in (dump1, dump2))
if check_iommu(i1, "dumpxml --inactive") != slot:
    sys.exit("dumpxml --inactive: pvdma's slot differs from the live one")
if canon(i1) != canon(i2):
    sys.exit(f"dumpxml round trip changed <iommu>:\n{canon(i1)}\n---\n{canon(i2)}")
print(f"dumpxml: <iommu model='pvdma'> at 00:{slot:02x}.0, the same after "
      f"dumpxml, define, dumpxml:\n{canon(i1)}", file=sys.stderr)

devs = {}
def walk(devices):
    for d in devices:
        devs[(d["bus"], d["slot"], d["function"])] = d
        walk(d.get("pci_bridge", {}).get("devices", []))
for bus in json.loads(pci)["return"]:
    walk(bus["devices"])
d = devs.get((0, slot, 0))
if not d or (d["id"]["vendor"], d["id"]["device"]) != (0x1b36, 0x0015):
    sys.exit(f"query-pci: no pvdma at libvirt's 00:{slot:02x}.0: {d and d['id']}")
print(f"query-pci: pvdma 1b36:0015 at 00:{slot:02x}.0", file=sys.stderr)

pv = json.loads(pvdma)["return"]
if len(pv) != 1 or pv[0].get("id") != "iommu0":
    sys.exit(f"query-pvdma: expected one device iommu0, got {pv}")
p = pv[0]
got = {"pin-limit": p["pin-limit"], "pin-mode": p["pin-mode"],
       "mem-limit": p["mem-limit"], "iova-bits": p["iova-bits"],
       "queues": len(p.get("queues", [])),
       "hypercall": bool(p["features"] & 1), "bypass": bool(p["features"] & 4),
       "unmap-list": bool(p["features"] & 8), "queue": bool(p["features"] & 16)}
want = {"pin-limit": pin_limit, "pin-mode": pin_mode, "mem-limit": 32 << 20,
        "iova-bits": 39, "queues": 2, "hypercall": False, "bypass": False,
        "unmap-list": False, "queue": True}
if got != want:
    sys.exit(f"query-pvdma: {got}, want {want}")
edu_rid = f"00:{edu_slot:02x}.0"
eps = {e["requester"] for e in p["endpoints"]}
if edu_rid not in eps:
    sys.exit(f"query-pvdma: edu {edu_rid} not among the endpoints {sorted(eps)}")
print(f"query-pvdma: {got}, edu {edu_rid} an endpoint", file=sys.stderr)

line = [l for l in limits.splitlines() if l.startswith("Max locked memory")]
fields = line[0].split() if line else []
if fields[3:6] != [str(memlock_want), str(memlock_want), "bytes"]:
    sys.exit(f"/proc/<qemu>/limits: {line}, want {memlock_want} bytes")
if pin_mode == "mlock":
    print(f"QEMU's RLIMIT_MEMLOCK: {memlock_want} bytes = pin limit "
          f"{pin_limit} + 1 GiB", file=sys.stderr)
else:
    print(f"QEMU's RLIMIT_MEMLOCK: {memlock_want} bytes, the daemon's: "
          "libvirt set none (pin_mode='none', no VFIO device)", file=sys.stderr)
PY
        { dump_logs; die "native <iommu model='pvdma'> checks"; }

    # the guest: its devices behind pvdma, then its verdict
    io_wait() {   # io_wait REGEX: the serial log's first line matching it
        local line
        while :; do
            line=$(grep -a -m1 -E "$1" "$tmp/serial.log" 2>/dev/null) && break
            [[ $(virsh_ domstate "$dom") == running ]] ||
                { sleep 1; line=$(grep -a -m1 -E "$1" "$tmp/serial.log") && break; return 1; }
            sleep 1
        done
        echo "$line"
    }
    ready=$(io_wait 'PVDMA-IO: (READY|FAIL)') ||
        { tail -n 30 "$tmp/serial.log" >&2; die "the guest stopped before READY"; }
    log "guest: ${ready%%, uptime*}"
    [[ $ready == *READY* ]] || { tail -n 40 "$tmp/serial.log" >&2; die "guest: $ready"; }
    pvdma=$(virsh_ qemu-monitor-command "$dom" '{"execute":"query-pvdma"}') ||
        { dump_logs; die "query-pvdma (guest ready)"; }
    grep -a "PVDMA-IO: DEVICE" "$tmp/serial.log" | sed 's/^/  /' >&2
    verdict=$(io_wait 'PVDMA-IO: (PASS|FAIL)') ||
        { tail -n 40 "$tmp/serial.log" >&2; die "the guest gave no verdict"; }
    grep -a -E "PVDMA-IO: (RUN|DONE|RESULT)" "$tmp/serial.log" | sed 's/^/  /' >&2
    [[ $verdict == *PASS* ]] || {
        # what pvdma-io said, then the guest kernel's last messages
        sed -n '/PVDMA-IO: RUN/,$p' "$tmp/serial.log" | grep -av '^PVDMA-IO: \(RUN\|DONE\)' >&2
        die "guest: $verdict"
    }
    # the disk's and the NICs' functions (the guest's DEVICE lines) were
    # attached to pvdma with mappings while the guest was ready: its
    # driver, not bypass, carried their DMA
    bdfs=$(grep -a "PVDMA-IO: DEVICE" "$tmp/serial.log" | sed -n 's/.* pci=0000:\([^ ]*\) .*/\1/p')
    /usr/bin/python3 - "$pvdma" $bdfs <<'PY' || die "query-pvdma with the guest ready"
import json, sys
p = json.loads(sys.argv[1])["return"][0]
want = sys.argv[2:]
eps = {e["requester"]: e for e in p["endpoints"]}
if len(want) != 3:
    sys.exit(f"the guest named {want}, not one disk and two NICs")
for rid in want:
    e = eps.get(rid)
    if not e or not e["attached"] or not e["mappings"]:
        sys.exit(f"query-pvdma: {rid} not attached with mappings: {e}")
print("query-pvdma, guest ready: disk and NICs attached, " + ", ".join(
      f"{rid} {eps[rid]['mappings']} mappings" for rid in want),
      file=sys.stderr)
PY
    log "guest: ${verdict%% (uptime*}"
    teardown
    log "PASS, native <iommu model='pvdma'> ($((SECONDS - t0)) s)"
    exit 0
fi
grep -q -- "-device pvdma,id=pvdma0" "$tmp/cache/libvirt/qemu/log/$dom.log" ||
    { dump_logs; die "QEMU command line has no -device pvdma"; }

pci=$(virsh_ qemu-monitor-command "$dom" '{"execute":"query-pci"}') ||
    { dump_logs; die "query-pci"; }
pvdma=$(virsh_ qemu-monitor-command "$dom" '{"execute":"query-pvdma"}') ||
    { dump_logs; die "query-pvdma"; }
hmp=$(virsh_ qemu-monitor-command --hmp "$dom" 'info pvdma') ||
    { dump_logs; die "info pvdma"; }

/usr/bin/python3 - "$pci" "$pvdma" "$hmp" "$pvdma_slot" "$edu_slot" <<'PY' ||
import json, sys

pci, pvdma, hmp = (json.loads(sys.argv[1])["return"],
                   json.loads(sys.argv[2])["return"], sys.argv[3])
pvdma_slot, edu_slot = int(sys.argv[4], 0), int(sys.argv[5], 0)
devs = {}
def walk(devices):
    for d in devices:
        devs[(d["bus"], d["slot"], d["function"])] = d
        walk(d.get("pci_bridge", {}).get("devices", []))
for bus in pci:
    walk(bus["devices"])

def at(slot, vendor, device, what):
    d = devs.get((0, slot, 0))
    if not d or (d["id"]["vendor"], d["id"]["device"]) != (vendor, device):
        sys.exit(f"query-pci: {what} ({vendor:04x}:{device:04x}) not at "
                 f"00:{slot:02x}.0: {d and d['id']}")
    print(f"query-pci: {what} {vendor:04x}:{device:04x} at 00:{slot:02x}.0 "
          f"class 0x{d['class_info']['class']:04x}", file=sys.stderr)
    return d

pv = at(pvdma_slot, 0x1b36, 0x0015, "pvdma")
if pv["class_info"]["class"] != 0x0806:
    sys.exit(f"pvdma class is 0x{pv['class_info']['class']:04x}, not 0x0806")
at(edu_slot, 0x1234, 0x11e8, "edu")
edu_rid = f"00:{edu_slot:02x}.0"
wdt = [k for k, d in devs.items()
       if (d["id"]["vendor"], d["id"]["device"]) == (0x8086, 0x25ab)]
if not wdt or wdt[0][0] == 0:
    sys.exit("query-pci: libvirt's i6300esb (8086:25ab) not behind its bridge")
print(f"query-pci: libvirt's i6300esb at {wdt[0][0]:02x}:{wdt[0][1]:02x}."
      f"{wdt[0][2]} behind its bridges", file=sys.stderr)

if len(pvdma) != 1 or pvdma[0].get("id") != "pvdma0":
    sys.exit(f"query-pvdma: expected one device pvdma0, got {pvdma}")
d = pvdma[0]
eps = {e["requester"] for e in d["endpoints"]}
if edu_rid not in eps:
    sys.exit(f"query-pvdma: edu {edu_rid} not among the endpoints {sorted(eps)}")
if d["pin-limit"] != 1 << 30:
    sys.exit(f"query-pvdma: pin-limit {d['pin-limit']}, not the XML's 1 GiB")
print(f"query-pvdma: {d['id']} at {d['path']}, {len(eps)} endpoints "
      f"(edu {edu_rid} among them), pin-limit {d['pin-limit']}",
      file=sys.stderr)

if "pvdma0" not in hmp or f"endpoint {edu_rid}" not in hmp:
    sys.exit(f"info pvdma: unexpected output:\n{hmp}")
print("info pvdma:\n" + hmp.rstrip(), file=sys.stderr)
PY
    { dump_logs; die "monitor answers"; }

teardown
log "PASS ($((SECONDS - t0)) s)"
