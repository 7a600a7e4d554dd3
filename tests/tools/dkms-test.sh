#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The guest driver as a DKMS package, the way a user installs it:
#
#   1. tools/dkms-package.sh builds pvdma-iommu-dkms_<version>_all.deb and
#      apt installs it on this machine (its postinst builds the module for
#      every kernel here that has headers; none is fine);
#   2. DKMS builds pvdma_iommu.ko for every supported guest kernel's
#      headers: 6.1 and 6.12 with this machine's DKMS, 7.2 with the DKMS of
#      a Debian testing build root the package is installed into (7.2's
#      headers need testing's gcc and glibc); each module's vermagic must
#      name its kernel and it must be the release build (no test_*
#      parameters);
#   3. headers of a kernel older than the driver supports (5.10) fail the
#      DKMS build with a message naming the minimum kernel;
#   4. a 6.1 guest boots with the DKMS-built module as its IOMMU driver
#      (queued, lazy) and verifies its disks and NICs through it
#      (pvdma_guest.py, as in guest-io-test.sh);
#   5. the package is purged again, and DKMS forgets the module.
#
# Usage: tests/tools/dkms-test.sh [QEMU_BINARY]
# Env:   DKMS_TEST_KERNELS  kernels to build for (default "6.1 6.12 7.2")
#        DKMS_TEST_BOOT     kernel to boot, "" for none (default 6.1)
#        DKMS_TEST_TIMEOUT  hard limit of the boot, seconds (default 180)
set -euo pipefail
. "$(dirname "$0")/../framework/lib.sh"

KERNELS=${DKMS_TEST_KERNELS:-6.1 6.12 7.2}
BOOT=${DKMS_TEST_BOOT-6.1}
TIMEOUT=${DKMS_TEST_TIMEOUT:-180}
ensure_apt dkms dpkg-dev kmod python3 cpio

deb=$("$PVDMA_ROOT/tools/dkms-package.sh" | tail -n1)
name=pvdma-iommu
version=$(dpkg-deb -f "$deb" Version)
out=$(mktemp -d)
cleanup() {
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq "$name-dkms" >/dev/null 2>&1 || true
    rm -rf "$out"
}
trap cleanup EXIT

fail() {
    echo "dkms-test: FAIL: $*" >&2
    exit 1
}

log "installing $(basename "$deb")"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall "$deb" >"$out/install.log" 2>&1 ||
    { cat "$out/install.log" >&2; fail "apt could not install the package"; }
[ -f "/usr/src/$name-$version/dkms.conf" ] || fail "no /usr/src/$name-$version/dkms.conf"
[ -f "/lib/modprobe.d/$name.conf" ] || fail "no modprobe softdeps"
grep -qx 'softdep virtio_pci pre: pvdma_iommu' "/lib/modprobe.d/$name.conf" ||
    fail "no softdep loading pvdma_iommu before virtio_pci"
[ -x "/usr/share/initramfs-tools/hooks/$name" ] || fail "no initramfs hook"
dkms status -m "$name" -v "$version" | grep -q "$name/$version" ||
    fail "DKMS does not know $name/$version after the install"

# check_ko KO RELEASE: the module DKMS built is for RELEASE and is the
# release build.
check_ko() {
    local ko=$1 rel=$2 vermagic
    [ -f "$ko" ] || fail "DKMS built no pvdma_iommu.ko for $rel"
    vermagic=$(modinfo -F vermagic "$ko")
    [ "${vermagic%% *}" = "$rel" ] || fail "$ko: vermagic '$vermagic', expected $rel"
    if modinfo -F parm "$ko" | grep -q '^test_'; then
        fail "$ko is the test build (it has test_* parameters)"
    fi
    log "$rel: $(basename "$ko") built by DKMS ($(stat -c %s "$ko") bytes, vermagic $vermagic)"
}

declare -A built
for k in $KERNELS; do
    (
        guest_kernel_select "$k" >/dev/null
        guest_headers
        if [ "${GK_SUITE:-machine}" = machine ]; then
            dkms build -m "$name" -v "$version" -k "$GK_RELEASE" --force \
                --kernelsourcedir "$GK_KBUILD" >"$out/build-$k.log" 2>&1 ||
                { cat "$out/build-$k.log" >&2; fail "DKMS build for $GK_RELEASE"; }
            ko=/var/lib/dkms/$name/$version/$GK_RELEASE/x86_64/module/pvdma_iommu.ko
        else
            # The machine's gcc 12 cannot build against these headers: a
            # Debian $GK_SUITE root with its own DKMS takes the package.
            GK_BUILDROOT_EXTRA=dkms guest_buildroot
            work=$out/root-$k
            mkdir -p "$work"
            cp "$deb" "$work/"
            guest_buildroot_run "$work" /bin/sh -ec '
                export PATH=/usr/sbin:/usr/bin:/sbin:/bin
                deb=$1 name=$2 version=$3 rel=$4 kbuild=$5
                dpkg --purge "$name-dkms" >/dev/null 2>&1 || true
                dpkg -i "$deb"
                dkms build -m "$name" -v "$version" -k "$rel" --force \
                    --kernelsourcedir "$kbuild"
            ' sh "$work/$(basename "$deb")" "$name" "$version" "$GK_RELEASE" \
                "$GK_KBUILD" >"$out/build-$k.log" 2>&1 ||
                { tail -n 40 "$out/build-$k.log" >&2; fail "DKMS build for $GK_RELEASE in $GK_BUILDROOT"; }
            ko=$GK_BUILDROOT/var/lib/dkms/$name/$version/$GK_RELEASE/x86_64/module/pvdma_iommu.ko
        fi
        check_ko "$ko" "$GK_RELEASE"
        cp "$ko" "$out/pvdma_iommu-$k.ko"
    )
    built[$k]=$out/pvdma_iommu-$k.ko
done

# Headers that say 5.10: DKMS's pre-build check names the minimum.
old=$out/linux-headers-5.10.0-35-cloud-amd64
mkdir -p "$old/include/config"
echo 5.10.0-35-cloud-amd64 >"$old/include/config/kernel.release"
printf 'VERSION = 5\nPATCHLEVEL = 10\nSUBLEVEL = 0\nmodules:\n\t@false\n' >"$old/Makefile"
if dkms build -m "$name" -v "$version" -k 5.10.0-35-cloud-amd64 \
        --kernelsourcedir "$old" >"$out/build-old.log" 2>&1; then
    fail "DKMS built the module against 5.10 headers"
fi
grep -q 'the minimum kernel is 6.1' "$out/build-old.log" ||
    { cat "$out/build-old.log" >&2; fail "the 5.10 build failed without naming the minimum kernel"; }
log "5.10 headers: refused ($(grep -m1 'minimum kernel' "$out/build-old.log"))"

if [ -n "$BOOT" ]; then
    [ -n "${built[$BOOT]:-}" ] || fail "no DKMS module for the boot kernel $BOOT"
    if [ $# -ge 1 ]; then
        qemu=$1
    else
        qemu=$("$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)
    fi
    # The guest's initramfs must hold exactly the DKMS-built module.
    initrd=$(PVDMA_IOMMU_KO=${built[$BOOT]} "$PVDMA_ROOT/tools/guest-io-prepare.sh" "$BOOT" |
             sed -n 's/^INITRD=//p')
    (cd "$out" && zcat "$initrd" | cpio -i --quiet --to-stdout lib/modules/pvdma_iommu.ko) |
        cmp -s - "${built[$BOOT]}" ||
        fail "the $BOOT guest's initramfs does not hold the DKMS-built module"
    log "booting $BOOT with the DKMS-built pvdma_iommu.ko"
    PVDMA_IOMMU_KO=${built[$BOOT]} timeout --kill-after=10 $((TIMEOUT + 30)) \
        python3 "$PVDMA_ROOT/tests/framework/pvdma_guest.py" --qemu "$qemu" \
        --kernel "$BOOT" --variant pvdma --modparams queued=1 --expect-queued \
        --timeout "$TIMEOUT" || fail "the $BOOT guest with the DKMS module"
fi

DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq "$name-dkms" >"$out/purge.log" 2>&1 ||
    { cat "$out/purge.log" >&2; fail "apt could not purge the package"; }
if dkms status -m "$name" 2>/dev/null | grep -q .; then
    fail "DKMS still knows $name after the purge: $(dkms status -m "$name")"
fi
[ ! -e "/usr/src/$name-$version" ] || fail "/usr/src/$name-$version left after the purge"
log "PASS: DKMS built pvdma_iommu.ko for ${KERNELS// /, }${BOOT:+, the $BOOT guest ran on it}"
