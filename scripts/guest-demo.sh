#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# pvdma with a real Linux guest: boots Debian 12's cloud kernel with a tiny
# busybox initramfs on `-M q35 -accel tcg -device pvdma -device edu`; a
# static userspace program in the guest (guest/pvdma-guest-test.c) drives
# pvdma through its doorbell and makes edu DMA through the IOVAs it mapped;
# then a kernel module (guest/kmod/pvdma_hc.c, built here with kbuild
# against Debian's headers for the same kernel) drives it by hypercall.
# While the mappings are live, and again before the guest powers off, the
# host prints `query-pvdma` (QMP). See docs/guest-demo.md.
#
# Usage: scripts/guest-demo.sh [QEMU_BINARY]
#   Without QEMU_BINARY, scripts/qemu-build.sh provides it (cached).
#   GUEST_DEMO_TIMEOUT (seconds, default 120) bounds the whole boot.
# Exit status 0 only when the guest printed PVDMA-GUEST-DEMO: PASS.
set -euo pipefail

. "$(dirname "$0")/lib.sh"

# Pinned guest packages (Debian 12 "bookworm", amd64). The SHA-256 is the
# .deb's, as `apt-cache show` gives it; a download that does not match is
# refused. To try another version, set all three variables of a package;
# without a pinned hash the one from `apt-cache show` is used.
KERNEL_PKG=${GUEST_KERNEL_PKG:-linux-image-6.1.0-50-cloud-amd64}
KERNEL_VER=${GUEST_KERNEL_VER:-6.1.176-1}
KERNEL_SHA256=${GUEST_KERNEL_SHA256-efe19f605b6f54a8352e68d85a629abb2d30b72a085faef603a9152590baa791}
BUSYBOX_PKG=busybox-static
BUSYBOX_VER=${GUEST_BUSYBOX_VER:-1:1.35.0-4+deb12u1+b1}
BUSYBOX_SHA256=${GUEST_BUSYBOX_SHA256-3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744}
# The module is built against the headers of exactly that kernel (ABI
# 6.1.0-50, cloud-amd64 flavour); kbuild's gcc-12 is the machine's gcc.
HEADERS_ABI=${GUEST_HEADERS_ABI:-6.1.0-50}
HEADERS_VER=${GUEST_HEADERS_VER:-$KERNEL_VER}
HEADERS_SHA256=${GUEST_HEADERS_SHA256-9fdb34aac8cbd0519c78c2e69db5a4d02df1e82a797bfde0dbbe7a1da4379a92}
HEADERS_COMMON_SHA256=${GUEST_HEADERS_COMMON_SHA256-7f6f7bee50efbc36dc02c976be5982b96cf36abe544f03f09368e98cfcc5ac3b}
KBUILD_PKG=${GUEST_KBUILD_PKG:-linux-kbuild-6.1}
KBUILD_SHA256=${GUEST_KBUILD_SHA256-667d2e1e94047031c3bcefa4bb67c2520bbc3cc1cce0aa592e67b108dbbead03}
TIMEOUT=${GUEST_DEMO_TIMEOUT:-120}

CACHE="$PVDMA_CACHE/guest"
GUEST_SRC="$PVDMA_ROOT/guest"
ABI_H="$PVDMA_ROOT/rust-core/include/pvdma_abi.h"

t_start=$(date +%s.%N)

# qemu-system-data: qboot.rom, the firmware guest-demo-boot.py boots with.
# gcc-12, make, libelf1 and libssl3: kbuild (its fixdep/modpost binaries).
ensure_apt cpio gcc libc6-dev gzip python3 coreutils qemu-system-data \
    gcc-12 make libelf1 libssl3

# fetch_deb PKG VERSION SHA256 [ARCH]: prints the path of the verified .deb.
fetch_deb() {
    local pkg=$1 ver=$2 sha=$3 arch=${4:-amd64} dir="$CACHE/debs" deb
    mkdir -p "$dir"
    deb="$dir/${pkg}_${ver//:/%3a}_${arch}.deb"
    if [ -z "$sha" ]; then
        sha=$(apt-cache show "$pkg=$ver" 2>/dev/null |
              sed -n 's/^SHA256: //p' | head -n1)
        [ -n "$sha" ] || { echo "no SHA-256 for $pkg=$ver in apt-cache" >&2; return 1; }
    fi
    if [ ! -f "$deb" ] || ! echo "$sha  $deb" | sha256sum -c --quiet - >/dev/null 2>&1; then
        rm -f "$deb"
        log "downloading $pkg=$ver"
        if ! apt-cache show "$pkg=$ver" >/dev/null 2>&1; then
            apt-get update -qq
        fi
        (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root \
            "$pkg=$ver") >&2
        [ -f "$deb" ] || { echo "apt-get download gave no $deb" >&2; return 1; }
        if ! echo "$sha  $deb" | sha256sum -c --quiet - >&2; then
            echo "$deb: SHA-256 is not the pinned $sha" >&2
            rm -f "$deb"
            return 1
        fi
    fi
    printf '%s\n' "$deb"
}

# The kernel and busybox, extracted once per version.
kdir="$CACHE/$KERNEL_PKG-$KERNEL_VER"
if [ ! -f "$kdir/vmlinuz" ]; then
    deb=$(fetch_deb "$KERNEL_PKG" "$KERNEL_VER" "$KERNEL_SHA256")
    rm -rf "$kdir.tmp" && mkdir -p "$kdir.tmp/x"
    dpkg-deb -x "$deb" "$kdir.tmp/x"
    cp "$kdir.tmp/x"/boot/vmlinuz-* "$kdir.tmp/vmlinuz"
    cp "$kdir.tmp/x"/boot/config-* "$kdir.tmp/config"
    rm -rf "$kdir.tmp/x" "$kdir"
    mv "$kdir.tmp" "$kdir"
fi
bdir="$CACHE/busybox-${BUSYBOX_VER//:/%3a}"
if [ ! -x "$bdir/busybox" ]; then
    deb=$(fetch_deb "$BUSYBOX_PKG" "$BUSYBOX_VER" "$BUSYBOX_SHA256")
    rm -rf "$bdir.tmp" && mkdir -p "$bdir.tmp/x"
    dpkg-deb -x "$deb" "$bdir.tmp/x"
    cp "$bdir.tmp/x/bin/busybox" "$bdir.tmp/busybox"
    rm -rf "$bdir.tmp/x" "$bdir"
    mv "$bdir.tmp" "$bdir"
fi

# The kernel headers (flavour + common + kbuild), extracted into one tree
# per version. The flavour's Makefile includes the common one by its
# absolute /usr/src path; point it into the extracted tree instead (the
# scripts/tools symlinks are relative and resolve inside it).
hroot="$CACHE/linux-headers-$HEADERS_ABI-cloud-amd64-$HEADERS_VER"
kbuild_dir="$hroot/usr/src/linux-headers-$HEADERS_ABI-cloud-amd64"
if [ ! -f "$hroot/.done" ]; then
    rm -rf "$hroot.tmp" && mkdir -p "$hroot.tmp"
    for spec in "linux-headers-$HEADERS_ABI-cloud-amd64|$HEADERS_SHA256|amd64" \
                "linux-headers-$HEADERS_ABI-common|$HEADERS_COMMON_SHA256|all" \
                "$KBUILD_PKG|$KBUILD_SHA256|amd64"; do
        IFS='|' read -r hpkg hsha harch <<<"$spec"
        deb=$(fetch_deb "$hpkg" "$HEADERS_VER" "$hsha" "$harch")
        dpkg-deb -x "$deb" "$hroot.tmp"
    done
    sed -i "s|/usr/src/|$hroot/usr/src/|" \
        "$hroot.tmp/usr/src/linux-headers-$HEADERS_ABI-cloud-amd64/Makefile"
    rm -rf "$hroot" && mv "$hroot.tmp" "$hroot"
    touch "$hroot/.done"
fi

# pvdma_hc.ko, keyed by its sources, the ABI header, the headers version
# and gcc; built in a copy so the source tree stays clean.
mkey=$( { echo "$HEADERS_ABI $HEADERS_VER"; gcc-12 --version | head -n1
          cat "$GUEST_SRC"/kmod/{Kbuild,Makefile,pvdma_hc.c,shim/stdint.h} "$ABI_H"; } |
        sha256sum | cut -c1-16)
mdir="$CACHE/kmod-$mkey"
if [ ! -f "$mdir/pvdma_hc.ko" ]; then
    log "building pvdma_hc.ko against $kbuild_dir"
    rm -rf "$mdir.tmp" && mkdir -p "$mdir.tmp/src"
    cp -r "$GUEST_SRC"/kmod/{Kbuild,pvdma_hc.c,shim} "$ABI_H" "$mdir.tmp/src/"
    make -s -C "$kbuild_dir" M="$mdir.tmp/src" PVDMA_ABI_INC="$mdir.tmp/src" \
        W=1 modules 2>&1 |
        grep -v 'Skipping BTF generation' >&2 || true
    [ -f "$mdir.tmp/src/pvdma_hc.ko" ] || { echo "pvdma_hc.ko did not build" >&2; exit 1; }
    cp "$mdir.tmp/src/pvdma_hc.ko" "$mdir.tmp/pvdma_hc.ko"
    rm -rf "$mdir.tmp/src" "$mdir"
    mv "$mdir.tmp" "$mdir"
fi

# The initramfs, keyed by the package versions and the guest sources.
key=$( { echo "$KERNEL_PKG $KERNEL_VER $BUSYBOX_VER"; gcc --version | head -n1
         cat "$GUEST_SRC/init" "$GUEST_SRC/pvdma-guest-test.c" "$ABI_H" \
             "$mdir/pvdma_hc.ko"; } |
       sha256sum | cut -c1-16)
idir="$CACHE/initramfs-$key"
if [ ! -f "$idir/initramfs.cpio.gz" ]; then
    log "building the initramfs ($idir)"
    rm -rf "$idir.tmp" && mkdir -p "$idir.tmp/root"
    root="$idir.tmp/root"
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
    gcc -static -O2 -Wall -Wextra -Werror -I "$PVDMA_ROOT/rust-core/include" \
        -o "$root/bin/pvdma-guest-test" "$GUEST_SRC/pvdma-guest-test.c"
    strip "$root/bin/pvdma-guest-test"
    cp "$bdir/busybox" "$root/bin/busybox"
    for applet in sh mount umount cat echo ls sleep stty uname poweroff \
                  reboot cut dmesg lspci sync insmod rmmod grep; do
        ln -s busybox "$root/bin/$applet"
    done
    install -m 0755 "$GUEST_SRC/init" "$root/init"
    install -m 0644 "$mdir/pvdma_hc.ko" "$root/lib/modules/pvdma_hc.ko"
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    mknod -m 600 "$root/dev/console" c 5 1
    (cd "$root" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --quiet --owner=0:0) |
        gzip -9n > "$idir.tmp/initramfs.cpio.gz"
    rm -rf "$root" "$idir"
    mv "$idir.tmp" "$idir"
fi

if [ $# -ge 1 ]; then
    qemu=$1
else
    qemu=$("$PVDMA_ROOT/scripts/qemu-build.sh" | tail -n1)
fi
[ -x "$qemu" ] || { echo "not an executable: $qemu" >&2; exit 1; }

t_ready=$(date +%s.%N)
log "guest prepared in $(python3 -c "print(round($t_ready - $t_start, 1))") s:" \
    "$kdir/vmlinuz, $idir/initramfs.cpio.gz"
exec python3 "$PVDMA_ROOT/scripts/guest-demo-boot.py" "$qemu" \
    "$kdir/vmlinuz" "$idir/initramfs.cpio.gz" "$TIMEOUT"
