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
# Usage: tests/qemu/libvirt-check.sh [path/to/qemu-system-x86_64]
# Env:   PVDMA_LIBVIRT_TIMEOUT  seconds each virsh call may take (default 20);
#                               the whole check is killed after 120 s
#        PVDMA_LIBVIRT_USER     uid:gid to run libvirt as when run as root
#                               (default 65534:65534, nobody)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/../framework/lib.sh"

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
    export PVDMA_LIBVIRT_DEADLINE=120
    exec timeout "$PVDMA_LIBVIRT_DEADLINE" "$BASH" "$0" "$qemu"
fi
ensure_apt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients ||
    die "cannot install the libvirt packages (no network or no apt source?)"
for b in libvirtd virsh; do
    command -v "$b" >/dev/null || die "$b not found after installing libvirt"
done

tmp=$(mktemp -d /tmp/pvdma-libvirt.XXXXXX)
daemon_pid=
# destroy the domain, kill what libvirt left running, stop the daemon,
# remove the directory; runs on every exit path
cleanup() {
    local rc=$? pidfile qpid
    trap - EXIT INT TERM
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        "${as_user[@]}" timeout -k 5 10 virsh -q -c qemu:///session destroy "$dom" \
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
virsh_() { "${as_user[@]}" timeout -k 5 "$limit" virsh -q -c qemu:///session "$@"; }

mkdir -p "$tmp"/{home,run,config/libvirt,cache,data,qemu/bin}
chmod 700 "$tmp/run"
cp "$qemu" "$tmp/qemu/bin/qemu-system-x86_64"
# QEMU's stdout/stderr go to a plain file instead of through virtlogd, so
# the session starts no second daemon
echo 'stdio_handler = "file"' >"$tmp/config/libvirt/qemu.conf"
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
log "libvirtd $(libvirtd --version | awk '{print $NF}') session daemon as uid $("${as_user[@]}" id -u) in $tmp"
# --timeout: exit after 60 s without clients or domains, even if we are killed
"${as_user[@]}" timeout -k 5 150 libvirtd --timeout 60 >"$tmp/libvirtd.log" 2>&1 &
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
virsh_ start "$dom" >/dev/null || { dump_logs; die "virsh start"; }
state=$(virsh_ domstate "$dom")
[[ $state == running ]] || { dump_logs; die "domain is '$state', not running"; }
log "domain $dom running (TCG, q35), QEMU pid $(<"$tmp/run/libvirt/qemu/run/$dom.pid")"
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

virsh_ destroy "$dom" >/dev/null || { dump_logs; die "virsh destroy"; }
virsh_ undefine "$dom" >/dev/null || die "virsh undefine"
left=$(virsh_ list --all --name | sed '/^$/d')
[[ -z $left ]] || die "domains left after undefine: $left"

log "PASS ($((SECONDS - t0)) s)"
