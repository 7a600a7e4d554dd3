# shellcheck shell=bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Debian guest kernels, their headers and modules, busybox, and
# out-of-tree modules built against those headers, for the scripts that boot
# real Linux guests (guest-demo.sh, guest-io-test.sh). Source lib.sh first.
#
# Everything is downloaded with `apt-get download`, checked against a pinned
# SHA-256 (the `SHA256:` of `apt-cache show`) and cached under
# $PVDMA_CACHE/guest/, keyed by package version. Nothing is installed on the
# host except the tools needed to unpack and build (ensure_apt).
#
#   guest_kernel_select 6.1|6.12   sets the GK_* variables of a pinned kernel
#   guest_kernel                   vmlinuz, config and modules of GK_*: sets GK_DIR
#   guest_headers                  headers + kbuild of GK_*: sets GK_KBUILD
#   guest_busybox                  sets GUEST_BUSYBOX (the static binary)
#   guest_build_module SRC KO [VAR=VALUE..]  prints the path of KO built
#                                  from SRC (VAR=VALUE: more make variables)
#   guest_modules_closure DEST M.. copies modules M (and their dependencies,
#                                  decompressed) to DEST; prints the load order

GUEST_CACHE="$PVDMA_CACHE/guest"
GUEST_ABI_H="$PVDMA_ROOT/rust-core/include/pvdma_abi.h"

# busybox-static from bookworm main.
GUEST_BUSYBOX_VER=${GUEST_BUSYBOX_VER:-1:1.35.0-4+deb12u1+b1}
GUEST_BUSYBOX_SHA256=${GUEST_BUSYBOX_SHA256-3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744}

# The guest kernels are chosen by series, not by build: Debian drops a
# kernel build from its archive once no suite lists it, so a pin to one
# build stops working on fresh machines at the next point release.
#
#   6.1   Debian 12's cloud kernel (linux-image-6.1.0-N-cloud-amd64, from
#         bookworm or bookworm-security)
#   6.12  the 6.12 cloud kernel of Debian 12's security archive
#         (linux-image-6.12.N+deb12-cloud-amd64-unsigned, backported from
#         trixie; the -unsigned image comes from the same source package as
#         the headers, the signed one differs only in vmlinuz's signature)
#
# By default the newest build of the series that apt offers is used, with
# the image, headers and kbuild packages all at one version; every .deb is
# then checked against apt's signed indices (`apt-get download` and the
# `SHA256:` of `apt-cache show`). PVDMA_GUEST_KERNEL_PIN=1 takes instead
# the exact builds pinned below, by SHA-256, to reproduce an earlier run
# (they work only while the archive still has them); PVDMA_GUEST_ABI_6_1 /
# PVDMA_GUEST_ABI_6_12 pick one ABI (e.g. 6.1.0-50) at the version apt has.
PVDMA_GUEST_KERNEL_PIN=${PVDMA_GUEST_KERNEL_PIN:-0}

# guest_kernel_pinned NAME: the exact builds of an earlier run, with the
# SHA-256 of each .deb.
guest_kernel_pinned() {
    case $1 in
    6.1)
        GK_ABI=6.1.0-50
        GK_VER=6.1.176-1
        GK_IMAGE_SHA256=efe19f605b6f54a8352e68d85a629abb2d30b72a085faef603a9152590baa791
        GK_HEADERS_SHA256=9fdb34aac8cbd0519c78c2e69db5a4d02df1e82a797bfde0dbbe7a1da4379a92
        GK_COMMON_SHA256=7f6f7bee50efbc36dc02c976be5982b96cf36abe544f03f09368e98cfcc5ac3b
        GK_KBUILD_SHA256=667d2e1e94047031c3bcefa4bb67c2520bbc3cc1cce0aa592e67b108dbbead03
        ;;
    6.12)
        GK_ABI=6.12.118+deb12
        GK_VER=6.12.118-1~deb12u1
        GK_IMAGE_SHA256=6b1406fe07b5304fca0361928e96d6f12c4fe8af833fc6f54bc053d2a127b935
        GK_HEADERS_SHA256=1df8576b4b347108f6e51510f8a333acc31089294fe279c2418a70eec7fc6c50
        GK_COMMON_SHA256=ed74603a3ba75ea8dfa271cbf5bf79a9a272f56e898729b7d5d02c60703d74c5
        GK_KBUILD_SHA256=1f35a2cbe452526944e3b89507a37ad607ea71ccfa21a5cb196f7fdcbb0af6f2
        ;;
    esac
}

# guest_series_packages NAME ABI: sets GK_IMAGE_PKG and GK_KBUILD_PKG of
# the series NAME at ABI.
guest_series_packages() {
    case $1 in
    6.1)
        GK_IMAGE_PKG=linux-image-$2-cloud-amd64
        GK_KBUILD_PKG=linux-kbuild-6.1
        ;;
    6.12)
        GK_IMAGE_PKG=linux-image-$2-cloud-amd64-unsigned
        GK_KBUILD_PKG=linux-kbuild-${2%+deb12}+deb12
        ;;
    esac
}

# apt_fresh: apt's package lists, updated when they are older than 6 hours
# (a fresh machine's lists come with its image and may predate builds the
# archive has since replaced).
apt_fresh() {
    local stamp="$PVDMA_CACHE/apt-lists-updated" t now
    now=$(date +%s)
    t=$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo 0)
    [ -f "$stamp" ] && [ "$(stat -c %Y "$stamp")" -gt "$t" ] && t=$(stat -c %Y "$stamp")
    [ $((now - t)) -lt 21600 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    log "updating apt's package lists ($(((now - t) / 3600)) h old)"
    if $sudo apt-get update -qq >&2; then
        mkdir -p "$PVDMA_CACHE" && touch "$stamp"
    else
        log "apt-get update failed; using the lists as they are"
    fi
}

# apt_version PKG: the candidate version apt offers for PKG (empty if none).
apt_version() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' |
        grep -v '(none)' || true
}

# guest_series_newest NAME: prints "ABI VERSION" of the newest build of the
# series NAME whose image, headers and kbuild apt all offers at one version.
guest_series_newest() {
    local name=$1 re abis abi ver
    case $name in
    6.1) re='^linux-image-(6\.1\.0-[0-9]+)-cloud-amd64$' ;;
    6.12) re='^linux-image-(6\.12\.[0-9]+\+deb12)-cloud-amd64-unsigned$' ;;
    esac
    abis=$(apt-cache pkgnames linux-image-"${name}". 2>/dev/null |
               sed -nE "s/$re/\\1/p" | sort -rV)
    for abi in $abis; do
        guest_series_packages "$name" "$abi"
        ver=$(apt_version "$GK_IMAGE_PKG")
        [ -n "$ver" ] || continue
        [ "$(apt_version "linux-headers-$abi-cloud-amd64")" = "$ver" ] || continue
        [ "$(apt_version "linux-headers-$abi-common")" = "$ver" ] || continue
        apt-cache show "$GK_KBUILD_PKG=$ver" >/dev/null 2>&1 || continue
        printf '%s %s\n' "$abi" "$ver"
        return 0
    done
    return 1
}

# guest_kernel_select NAME: sets the GK_* variables of the series NAME
# (6.1 or 6.12). GK_ABI is the package ABI (uname -r is GK_ABI-cloud-amd64),
# GK_VER the version of every package of the set; each *_SHA256 is the
# .deb's (empty: the one apt's signed index gives).
guest_kernel_select() {
    case $1 in
    6.1 | 6.12) ;;
    *)
        echo "guest_kernel_select: unknown kernel '$1' (6.1 or 6.12)" >&2
        return 1
        ;;
    esac
    GK_IMAGE_SHA256='' GK_HEADERS_SHA256='' GK_COMMON_SHA256='' GK_KBUILD_SHA256=''
    local how want_var want found
    want_var=PVDMA_GUEST_ABI_${1//./_}
    want=${!want_var:-}
    if [ "$PVDMA_GUEST_KERNEL_PIN" = 1 ]; then
        guest_kernel_pinned "$1"
        how="pinned build (PVDMA_GUEST_KERNEL_PIN=1)"
    elif [ -n "$want" ]; then
        GK_ABI=$want
        guest_series_packages "$1" "$GK_ABI"
        GK_VER=$(apt_version "$GK_IMAGE_PKG")
        [ -n "$GK_VER" ] || {
            apt_fresh
            GK_VER=$(apt_version "$GK_IMAGE_PKG")
        }
        [ -n "$GK_VER" ] || { echo "apt offers no $GK_IMAGE_PKG" >&2; return 1; }
        how="$want_var"
    else
        apt_fresh
        found=$(guest_series_newest "$1") || {
            echo "apt offers no complete $1 cloud kernel build (image, headers, kbuild)" >&2
            return 1
        }
        read -r GK_ABI GK_VER <<<"$found"
        how="the newest build apt offers"
    fi
    guest_series_packages "$1" "$GK_ABI"
    # shellcheck disable=SC2034  # GK_NAME is for the callers
    GK_NAME=$1
    GK_RELEASE=$GK_ABI-cloud-amd64
    GK_DIR='' GK_KBUILD=''     # set by guest_kernel and guest_headers
    GK_HEADERS_VER=$GK_VER
    log "guest kernel $1: $GK_IMAGE_PKG $GK_VER ($how)"
}

# guest_tools: what unpacking and building need. qemu-system-data has
# qboot.rom; gcc-12, make, libelf1, libssl3 and zlib1g are kbuild's (its
# fixdep/modpost/objtool binaries); dwarves has pahole, which 6.12's
# kbuild runs to add BTF to every module it links; xz-utils and zstd
# decompress modules.
guest_tools() {
    ensure_apt cpio gcc libc6-dev gzip python3 coreutils qemu-system-data \
        gcc-12 make libelf1 libssl3 zlib1g dwarves xz-utils zstd
}

# fetch_deb PKG VERSION SHA256 [ARCH]: prints the path of the verified .deb.
fetch_deb() {
    local pkg=$1 ver=$2 sha=$3 arch=${4:-amd64} dir="$GUEST_CACHE/debs" deb
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

# guest_kernel: vmlinuz, config and the modules tree (lib/modules/RELEASE)
# of GK_IMAGE_PKG, extracted once per version into GK_DIR.
guest_kernel() {
    GK_DIR="$GUEST_CACHE/$GK_IMAGE_PKG-${GK_VER//:/%3a}"
    # An older layout (guest-demo.sh before the modules were needed) kept
    # vmlinuz and config only: .done marks the complete one.
    [ -f "$GK_DIR/.done" ] && return 0
    local deb
    deb=$(fetch_deb "$GK_IMAGE_PKG" "$GK_VER" "$GK_IMAGE_SHA256") || return 1
    rm -rf "$GK_DIR.tmp" && mkdir -p "$GK_DIR.tmp/x"
    dpkg-deb -x "$deb" "$GK_DIR.tmp/x"
    cp "$GK_DIR.tmp/x"/boot/vmlinuz-* "$GK_DIR.tmp/vmlinuz"
    cp "$GK_DIR.tmp/x"/boot/config-* "$GK_DIR.tmp/config"
    mv "$GK_DIR.tmp/x/lib/modules/$GK_RELEASE" "$GK_DIR.tmp/modules"
    rm -rf "$GK_DIR.tmp/x" "$GK_DIR"
    mv "$GK_DIR.tmp" "$GK_DIR"
    touch "$GK_DIR/.done"
}

# guest_busybox: busybox-static, extracted once per version.
guest_busybox() {
    local bdir="$GUEST_CACHE/busybox-${GUEST_BUSYBOX_VER//:/%3a}" deb
    GUEST_BUSYBOX="$bdir/busybox"
    [ -x "$GUEST_BUSYBOX" ] && return 0
    deb=$(fetch_deb busybox-static "$GUEST_BUSYBOX_VER" "$GUEST_BUSYBOX_SHA256") || return 1
    rm -rf "$bdir.tmp" && mkdir -p "$bdir.tmp/x"
    dpkg-deb -x "$deb" "$bdir.tmp/x"
    cp "$bdir.tmp/x/bin/busybox" "$bdir.tmp/busybox"
    rm -rf "$bdir.tmp/x" "$bdir"
    mv "$bdir.tmp" "$bdir"
}

# guest_headers: the kernel headers (flavour + common + kbuild) of GK_*,
# extracted into one tree per version; sets GK_KBUILD to the directory to
# run `make -C` in. The flavour's Makefile includes the common one by its
# absolute /usr/src path; point it into the extracted tree instead (the
# scripts/tools symlinks are relative and resolve inside it).
guest_headers() {
    local hroot="$GUEST_CACHE/linux-headers-$GK_RELEASE-${GK_HEADERS_VER//:/%3a}"
    GK_KBUILD="$hroot/usr/src/linux-headers-$GK_RELEASE"
    [ -f "$hroot/.done" ] && return 0
    local spec hpkg hsha harch deb
    rm -rf "$hroot.tmp" && mkdir -p "$hroot.tmp"
    for spec in "linux-headers-$GK_RELEASE|$GK_HEADERS_SHA256|amd64" \
                "linux-headers-$GK_ABI-common|$GK_COMMON_SHA256|all" \
                "$GK_KBUILD_PKG|$GK_KBUILD_SHA256|amd64"; do
        IFS='|' read -r hpkg hsha harch <<<"$spec"
        deb=$(fetch_deb "$hpkg" "$GK_HEADERS_VER" "$hsha" "$harch") || return 1
        dpkg-deb -x "$deb" "$hroot.tmp"
    done
    sed -i "s|/usr/src/|$hroot/usr/src/|" \
        "$hroot.tmp/usr/src/linux-headers-$GK_RELEASE/Makefile"
    rm -rf "$hroot" && mv "$hroot.tmp" "$hroot"
    touch "$hroot/.done"
}

# guest_build_module SRC_DIR KO: builds the out-of-tree module directory
# SRC_DIR (a Kbuild taking PVDMA_ABI_INC) against GK_KBUILD and prints the
# path of KO (e.g. pvdma_hc.ko). Cached under a key of the sources (every
# file in SRC_DIR), pvdma_abi.h, the headers' release and version and
# gcc-12's version; built in a copy so the source tree stays clean. Further
# arguments are make variables (e.g. PVDMA_TEST=1), part of the key too.
guest_build_module() {
    local src=$1 ko=$2 key mdir out files
    shift 2
    [ -n "${GK_KBUILD:-}" ] || guest_headers || return 1
    # The sources: every file but kbuild's output, should SRC_DIR have
    # been built in place.
    files=$(cd "$src" && find . -type f ! -name '.*' ! -name '*.o' \
                ! -name '*.ko' ! -name '*.mod' ! -name '*.mod.c' \
                ! -name Module.symvers ! -name modules.order | LC_ALL=C sort)
    key=$( { echo "$GK_RELEASE $GK_HEADERS_VER $*"; gcc-12 --version | head -n1
             (cd "$src" && printf '%s\n' "$files" | xargs sha256sum)
             cat "$GUEST_ABI_H"; } | sha256sum | cut -c1-16)
    mdir="$GUEST_CACHE/kmod-${ko%.ko}-$key"
    if [ ! -f "$mdir/$ko" ]; then
        log "building $ko against $GK_KBUILD"
        rm -rf "$mdir.tmp" && mkdir -p "$mdir.tmp"
        mkdir -p "$mdir.tmp/src"
        (cd "$src" && printf '%s\n' "$files" | tar -cf - -T -) |
            tar -xf - -C "$mdir.tmp/src"
        cp "$GUEST_ABI_H" "$mdir.tmp/src/"
        out=$(make -s -C "$GK_KBUILD" M="$mdir.tmp/src" \
                  PVDMA_ABI_INC="$mdir.tmp/src" W=1 "$@" modules 2>&1) || true
        printf '%s\n' "$out" | grep -v 'Skipping BTF generation' | grep . >&2 || true
        [ -f "$mdir.tmp/src/$ko" ] || { echo "$ko did not build against $GK_KBUILD" >&2; return 1; }
        cp "$mdir.tmp/src/$ko" "$mdir.tmp/$ko"
        rm -rf "$mdir.tmp/src" "$mdir"
        mv "$mdir.tmp" "$mdir"
    fi
    printf '%s\n' "$mdir/$ko"
}

# guest_modules_closure DEST NAME...: for each module NAME of the kernel in
# GK_DIR that is a module (built-in ones are skipped), copies it and its
# dependencies to DEST as plain .ko files (busybox insmod loads uncompressed
# modules only), and prints their file names, one a line, in an order where
# every module comes after the ones it depends on. The .debs carry no
# modules.dep (depmod makes it at install time), so the dependencies come
# from each module's own `depends=` (.modinfo, written by modpost from the
# symbols it uses, which is what depmod derives modules.dep from too).
guest_modules_closure() {
    local dest=$1
    shift
    mkdir -p "$dest"
    python3 - "$GK_DIR/modules" "$dest" "$@" <<'EOF'
import lzma, os, struct, subprocess, sys
mdir, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]

def modname(path):
    return os.path.basename(path).split(".ko")[0].replace("-", "_")

def load(path):
    if path.endswith(".xz"):
        return lzma.open(path).read()
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", path], check=True,
                              capture_output=True).stdout
    with open(path, "rb") as f:
        return f.read()

def modinfo_depends(elf):
    """depends= of an ELF64 little-endian module's .modinfo section."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    def sect(i):
        name, _, _, _, off, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize)
        return name, off, size
    _, stroff, _ = sect(shstrndx)
    for i in range(shnum):
        name, off, size = sect(i)
        if elf[stroff + name:elf.index(b"\0", stroff + name)] == b".modinfo":
            for item in elf[off:off + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
            return []
    return []

by_name = {}
for root, _, files in os.walk(os.path.join(mdir, "kernel")):
    for f in files:
        if ".ko" in f:
            by_name[modname(f)] = os.path.join(root, f)
builtin = {modname(l.strip()) for l in open(os.path.join(mdir, "modules.builtin"))}

order, seen = [], set()
def visit(name):
    if name in seen:
        return
    seen.add(name)
    data = load(by_name[name])
    for d in modinfo_depends(data):
        visit(d.replace("-", "_"))
    with open(os.path.join(dest, name + ".ko"), "wb") as f:
        f.write(data)
    order.append(name + ".ko")

for n in names:
    n = n.replace("-", "_")
    if n in by_name:
        visit(n)
    elif n not in builtin:
        sys.exit(f"module {n}: neither a module nor built in")
print("\n".join(order))
EOF
}

# guest_initramfs_begin DIR APPLET...: a fresh staging root for the
# initramfs DIR/initramfs.cpio.gz, with busybox and links for the APPLETs,
# the usual mount points and /dev/console; sets GI_ROOT. Fill GI_ROOT (an
# /init at least), then guest_initramfs_end DIR packs it and puts DIR in
# place (so a half-built one is never taken for a cached one).
guest_initramfs_begin() {
    local dir=$1 applet
    shift
    rm -rf "$dir.tmp"
    GI_ROOT="$dir.tmp/root"
    mkdir -p "$GI_ROOT"/{bin,dev,proc,sys,tmp,lib/modules}
    cp "$GUEST_BUSYBOX" "$GI_ROOT/bin/busybox"
    for applet in "$@"; do
        ln -s busybox "$GI_ROOT/bin/$applet"
    done
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    mknod -m 600 "$GI_ROOT/dev/console" c 5 1
}

# guest_initramfs_end DIR: packs guest_initramfs_begin's root (reproducibly:
# sorted, owner 0, no gzip timestamp) into DIR/initramfs.cpio.gz.
guest_initramfs_end() {
    local dir=$1
    (cd "$dir.tmp/root" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --quiet --owner=0:0) |
        gzip -6n >"$dir.tmp/initramfs.cpio.gz"
    rm -rf "$dir.tmp/root" "$dir"
    mv "$dir.tmp" "$dir"
}
