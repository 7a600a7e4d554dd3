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
#   guest_kernel_select 6.1|6.12|7.2  sets the GK_* variables of a kernel
#   guest_kernel                   vmlinuz, config and modules of GK_*: sets GK_DIR
#   guest_headers                  headers + kbuild of GK_*: sets GK_KBUILD
#   guest_buildroot                7.2's Debian build root: sets GK_BUILDROOT
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
#   7.2   Debian testing's cloud kernel (linux-image-7.2.N+debM-cloud-amd64,
#         a meta package over linux-binary-* (vmlinuz), linux-modules-* and
#         linux-base-* (config, modules.builtin), all under
#         usr/lib/modules/RELEASE), or unstable's when testing has no
#         complete 7.2 build. Neither suite is in the machine's /etc/apt:
#         each has a private apt root of its own under $GUEST_CACHE
#         (guest_debian_apt), whose sources are signed-by the Debian archive
#         keyring. Its headers want gcc-16 and a newer glibc than Debian
#         12's: modules are built in a Debian build root (guest_buildroot).
#
# By default the newest build of the series that apt offers is used, with
# the image, headers and kbuild packages all at one version; every .deb is
# then checked against apt's signed indices (`apt-get download` and the
# `SHA256:` of `apt-cache show`). PVDMA_GUEST_KERNEL_PIN=1 takes instead
# the exact builds pinned below, by SHA-256, to reproduce an earlier run
# (they work only while the archive still has them); PVDMA_GUEST_ABI_6_1 /
# PVDMA_GUEST_ABI_6_12 / PVDMA_GUEST_ABI_7_2 pick one ABI (e.g. 6.1.0-50)
# at the version apt has.
PVDMA_GUEST_KERNEL_PIN=${PVDMA_GUEST_KERNEL_PIN:-0}
# The Debian mirror of the private apt roots and of the build root.
PVDMA_APT_MIRROR=${PVDMA_APT_MIRROR:-http://deb.debian.org/debian}
GUEST_KEYRING=${GUEST_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
# The suites 7.2 is looked for in, in order of preference.
GUEST_7_2_SUITES=${GUEST_7_2_SUITES:-testing unstable}
# apt's options for the kernel's packages: none (the machine's apt) for
# 6.1 and 6.12, a private apt root's for 7.2 (guest_debian_apt).
GK_APT=()

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
    7.2)
        GK_SUITE=testing
        GK_ABI=7.2.12+deb14
        GK_VER=7.2.12-1
        GK_BINARY_SHA256=43451b88872589d518acba127482df16fab53e2a51e92811cbd6221ca92cb6bf
        GK_MODULES_SHA256=12e77fcb84416569f8a81cb09c4535b187b8749047df2df2b1a39ad1c9250670
        GK_BASE_SHA256=ed2a648d5d7fd243750e203d51a52421fd61083de983f26cae10ce25ab9f8182
        GK_HEADERS_SHA256=b6b98bdd93e0956049edeb2cc6851f17cf49695f277cbac7621a887508709b1c
        GK_COMMON_SHA256=25172b3c5c011670f9d271a882b714baf37f64ae8be212f2fea50755431f0c5c
        GK_KBUILD_SHA256=7f3250236ad2e8c2357dbce4563586915e44e89c721e29cd941ad325623ede0b
        ;;
    esac
}

# guest_series_packages NAME ABI: sets GK_IMAGE_PKG, GK_KBUILD_PKG and
# GK_IMAGE_DEBS (the packages that hold vmlinuz, config and the modules) of
# the series NAME at ABI.
guest_series_packages() {
    GK_IMAGE_DEBS=
    case $1 in
    6.1)
        GK_IMAGE_PKG=linux-image-$2-cloud-amd64
        GK_KBUILD_PKG=linux-kbuild-6.1
        ;;
    6.12)
        GK_IMAGE_PKG=linux-image-$2-cloud-amd64-unsigned
        GK_KBUILD_PKG=linux-kbuild-${2%+deb12}+deb12
        ;;
    7.2)
        GK_IMAGE_PKG=linux-image-$2-cloud-amd64
        GK_KBUILD_PKG=linux-kbuild-$2
        GK_IMAGE_DEBS="linux-binary-$2-cloud-amd64 linux-modules-$2-cloud-amd64 linux-base-$2-cloud-amd64"
        ;;
    esac
    GK_IMAGE_DEBS=${GK_IMAGE_DEBS:-$GK_IMAGE_PKG}
}

# guest_debian_apt SUITE: a private apt root for the Debian SUITE
# (testing, unstable) under $GUEST_CACHE, never the machine's /etc/apt,
# its lists updated when they are older than 6 hours; sets GK_APT to the
# options every apt-get / apt-cache call on it takes, and GK_SUITE_NAME
# to SUITE and its code name ("testing (forky)"). Its sources are
# signed-by the Debian archive keyring, so apt checks every index, and
# through them every .deb, against the archive's signature.
guest_debian_apt() {
    local suite=$1 root="$GUEST_CACHE/apt-$1" now t codename
    private_apt "$root" \
        "deb [signed-by=$GUEST_KEYRING] $PVDMA_APT_MIRROR $suite main"
    # apt's binary cache of the lists: every apt-cache call would parse
    # the suite's whole index again where a configuration turns it off
    # (a Docker image's docker-clean does).
    GK_APT=("${PRIVATE_APT[@]}" -o Dir::Cache::pkgcache=pkgcache.bin)
    now=$(date +%s)
    t=0
    [ -f "$root/updated" ] && t=$(stat -c %Y "$root/updated")
    if [ $((now - t)) -ge 21600 ]; then
        log "updating the private apt lists of Debian $suite ($root)"
        if apt-get "${GK_APT[@]}" -qq update >&2; then
            touch "$root/updated"
        else
            log "apt-get update of Debian $suite failed; using the lists as they are"
        fi
    fi
    codename=$(sed -n 's/^Codename: //p' "$root"/lists/*_dists_"${suite}"_InRelease \
                   2>/dev/null | head -n1)
    GK_SUITE_NAME="$suite${codename:+ ($codename)}"
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

# apt_version PKG: the candidate version apt (GK_APT's) offers for PKG
# (empty if none).
apt_version() {
    apt-cache "${GK_APT[@]}" policy "$1" 2>/dev/null |
        sed -n 's/^ *Candidate: //p' | grep -v '(none)' || true
}

# guest_series_newest NAME: prints "ABI VERSION" of the newest build of the
# series NAME whose image (every package of GK_IMAGE_DEBS), headers and
# kbuild apt (GK_APT's) all offers at one version.
guest_series_newest() {
    local name=$1 re abis abi ver p ok
    case $name in
    6.1) re='^linux-image-(6\.1\.0-[0-9]+)-cloud-amd64$' ;;
    6.12) re='^linux-image-(6\.12\.[0-9]+\+deb12)-cloud-amd64-unsigned$' ;;
    7.2) re='^linux-image-(7\.2\.[0-9]+\+deb[0-9]+)-cloud-amd64$' ;;
    esac
    abis=$(apt-cache "${GK_APT[@]}" pkgnames linux-image-"${name}". 2>/dev/null |
               sed -nE "s/$re/\\1/p" | sort -rV)
    for abi in $abis; do
        guest_series_packages "$name" "$abi"
        ver=$(apt_version "$GK_IMAGE_PKG")
        [ -n "$ver" ] || continue
        ok=1
        for p in $GK_IMAGE_DEBS "linux-headers-$abi-cloud-amd64" "linux-headers-$abi-common"; do
            [ "$(apt_version "$p")" = "$ver" ] || { ok=0; break; }
        done
        [ "$ok" = 1 ] || continue
        apt-cache "${GK_APT[@]}" show "$GK_KBUILD_PKG=$ver" >/dev/null 2>&1 || continue
        printf '%s %s\n' "$abi" "$ver"
        return 0
    done
    return 1
}

# guest_use_apt SUITE: the apt the kernel's packages come from: "machine"
# (the machine's own, for 6.1 and 6.12) or a Debian suite's private root
# (guest_debian_apt). Sets GK_SUITE, GK_SUITE_NAME and GK_APT.
guest_use_apt() {
    GK_SUITE=$1
    if [ "$1" = machine ]; then
        GK_APT=()
        GK_SUITE_NAME=apt
    else
        guest_debian_apt "$1"
        GK_SUITE_NAME="Debian $GK_SUITE_NAME"
    fi
}

# guest_kernel_select NAME: sets the GK_* variables of the series NAME
# (6.1, 6.12 or 7.2). GK_ABI is the package ABI (uname -r is
# GK_ABI-cloud-amd64), GK_VER the version of every package of the set;
# each *_SHA256 is the .deb's (empty: the one apt's signed index gives).
# GK_SUITE is "machine" or the Debian suite of 7.2 (the first of
# GUEST_7_2_SUITES with a complete build), GK_APT the apt options.
guest_kernel_select() {
    local suites
    case $1 in
    6.1 | 6.12) suites=machine ;;
    7.2) suites=$GUEST_7_2_SUITES ;;
    *)
        echo "guest_kernel_select: unknown kernel '$1' (6.1, 6.12 or 7.2)" >&2
        return 1
        ;;
    esac
    GK_IMAGE_SHA256='' GK_HEADERS_SHA256='' GK_COMMON_SHA256='' GK_KBUILD_SHA256=''
    GK_BINARY_SHA256='' GK_MODULES_SHA256='' GK_BASE_SHA256='' GK_SUITE=''
    local how want_var want found='' suite
    want_var=PVDMA_GUEST_ABI_${1//./_}
    want=${!want_var:-}
    if [ "$PVDMA_GUEST_KERNEL_PIN" = 1 ]; then
        guest_kernel_pinned "$1"
        guest_use_apt "${GK_SUITE:-machine}"
        how="pinned build (PVDMA_GUEST_KERNEL_PIN=1), from $GK_SUITE_NAME"
    elif [ -n "$want" ]; then
        GK_ABI=$want
        guest_series_packages "$1" "$GK_ABI"
        GK_VER=
        for suite in $suites; do
            guest_use_apt "$suite"
            GK_VER=$(apt_version "$GK_IMAGE_PKG")
            if [ -z "$GK_VER" ] && [ "$suite" = machine ]; then
                apt_fresh
                GK_VER=$(apt_version "$GK_IMAGE_PKG")
            fi
            [ -z "$GK_VER" ] || break
        done
        [ -n "$GK_VER" ] || { echo "apt offers no $GK_IMAGE_PKG" >&2; return 1; }
        how="$want_var, from $GK_SUITE_NAME"
    else
        for suite in $suites; do
            guest_use_apt "$suite"
            [ "$suite" != machine ] || apt_fresh
            found=$(guest_series_newest "$1") && break
            [ "$suite" = machine ] ||
                log "$GK_SUITE_NAME offers no complete $1 cloud kernel build"
        done
        [ -n "$found" ] || {
            echo "apt offers no complete $1 cloud kernel build (image, headers, kbuild)" >&2
            return 1
        }
        read -r GK_ABI GK_VER <<<"$found"
        how="the newest build $GK_SUITE_NAME offers"
    fi
    guest_series_packages "$1" "$GK_ABI"
    # shellcheck disable=SC2034  # GK_NAME is for the callers
    GK_NAME=$1
    GK_RELEASE=$GK_ABI-cloud-amd64
    GK_DIR='' GK_KBUILD='' GK_BUILDROOT=''  # set by guest_kernel, guest_headers, guest_buildroot
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

# fetch_deb PKG VERSION SHA256 [ARCH]: prints the path of the verified .deb,
# downloaded through GK_APT's apt (the machine's when it is empty).
fetch_deb() {
    local pkg=$1 ver=$2 sha=$3 arch=${4:-amd64} dir="$GUEST_CACHE/debs" deb
    mkdir -p "$dir"
    deb="$dir/${pkg}_${ver//:/%3a}_${arch}.deb"
    if [ -z "$sha" ]; then
        sha=$(apt-cache "${GK_APT[@]}" show "$pkg=$ver" 2>/dev/null |
              sed -n 's/^SHA256: //p' | head -n1)
        [ -n "$sha" ] || { echo "no SHA-256 for $pkg=$ver in apt-cache" >&2; return 1; }
    fi
    if [ ! -f "$deb" ] || ! echo "$sha  $deb" | sha256sum -c --quiet - >/dev/null 2>&1; then
        rm -f "$deb"
        log "downloading $pkg=$ver"
        if ! apt-cache "${GK_APT[@]}" show "$pkg=$ver" >/dev/null 2>&1; then
            apt-get "${GK_APT[@]}" update -qq
        fi
        (cd "$dir" && apt-get "${GK_APT[@]}" download -qq -o APT::Sandbox::User=root \
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

# guest_image_sha256 PKG: the pinned SHA-256 of the image package PKG
# (empty: apt's).
guest_image_sha256() {
    case $1 in
    linux-binary-*) echo "$GK_BINARY_SHA256" ;;
    linux-modules-*) echo "$GK_MODULES_SHA256" ;;
    linux-base-*) echo "$GK_BASE_SHA256" ;;
    *) echo "$GK_IMAGE_SHA256" ;;
    esac
}

# guest_kernel: vmlinuz, config and the modules tree of the packages of
# GK_IMAGE_DEBS, extracted once per version into GK_DIR (vmlinuz, config,
# modules/ with kernel/ and modules.builtin). Two layouts: 6.1 and 6.12
# have one package with boot/vmlinuz-RELEASE, boot/config-RELEASE and
# lib/modules/RELEASE; 7.2 splits it into linux-binary (vmlinuz),
# linux-modules (kernel/) and linux-base (config, modules.builtin), all
# under usr/lib/modules/RELEASE.
guest_kernel() {
    GK_DIR="$GUEST_CACHE/$GK_IMAGE_PKG-${GK_VER//:/%3a}"
    # An older layout (guest-demo.sh before the modules were needed) kept
    # vmlinuz and config only: .done marks the complete one.
    [ -f "$GK_DIR/.done" ] && return 0
    local deb pkg x m
    rm -rf "$GK_DIR.tmp" && mkdir -p "$GK_DIR.tmp/x"
    x="$GK_DIR.tmp/x"
    for pkg in $GK_IMAGE_DEBS; do
        deb=$(fetch_deb "$pkg" "$GK_VER" "$(guest_image_sha256 "$pkg")") || return 1
        dpkg-deb -x "$deb" "$x"
    done
    if [ -d "$x/usr/lib/modules/$GK_RELEASE" ]; then
        m="$x/usr/lib/modules/$GK_RELEASE"
        mv "$m/vmlinuz" "$GK_DIR.tmp/vmlinuz"
        cp "$m/config" "$GK_DIR.tmp/config"
    else
        m="$x/lib/modules/$GK_RELEASE"
        cp "$x"/boot/vmlinuz-* "$GK_DIR.tmp/vmlinuz"
        cp "$x"/boot/config-* "$GK_DIR.tmp/config"
    fi
    [ -s "$GK_DIR.tmp/vmlinuz" ] && [ -d "$m/kernel" ] && [ -f "$m/modules.builtin" ] || {
        echo "$GK_IMAGE_DEBS $GK_VER: no vmlinuz, modules or modules.builtin" >&2
        return 1
    }
    mv "$m" "$GK_DIR.tmp/modules"
    rm -rf "$x" "$GK_DIR"
    mv "$GK_DIR.tmp" "$GK_DIR"
    touch "$GK_DIR/.done"
}

# guest_busybox: busybox-static, extracted once per version.
guest_busybox() {
    local bdir="$GUEST_CACHE/busybox-${GUEST_BUSYBOX_VER//:/%3a}" deb
    local -a GK_APT=()   # Debian 12's, from the machine's apt
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

# guest_buildroot: sets GK_BUILDROOT to a Debian build root of GK_SUITE
# (debootstrap --variant=minbase) for the kernels whose headers the
# machine cannot build with: 7.2's name CC x86_64-linux-gnu-gcc-16 and
# its kbuild binaries (fixdep, modpost, objtool) are linked against a
# newer glibc than Debian 12's. It holds the compiler of the headers'
# CONFIG_CC_VERSION_TEXT, make, libc6-dev, libelf-dev and what
# GK_KBUILD_PKG depends on (pahole, libelf, libssl, zlib), nothing else
# (no apt lists, .debs, docs or locales are kept). debootstrap checks the
# suite's Release signature against the Debian archive keyring
# (--force-check-gpg) and every .deb against the signed index. Cached as
# $GUEST_CACHE/buildroot-SUITE-KEY, KEY a hash of the package list and the
# versions GK_APT's lists offer for them (a new compiler or libc in the
# suite makes a new root); .suite in it records the suite's Release date.
# GK_BUILDROOT_EXTRA names more packages for the root (dkms for
# tests/tools/dkms-test.sh); they are in the key, so such a root is one of
# its own.
guest_buildroot() {
    [ -n "${GK_KBUILD:-}" ] || guest_headers || return 1
    local cc pkgs p vers key dir rel
    cc=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\([^ ]*\) .*/\1/p' "$GK_KBUILD/.config")
    cc=${cc#x86_64-linux-gnu-}
    case $cc in
    gcc-[0-9]*) ;;
    *)
        echo "$GK_KBUILD: CONFIG_CC_VERSION_TEXT names no gcc-N ('$cc')" >&2
        return 1
        ;;
    esac
    pkgs="$cc make libc6-dev libelf-dev ${GK_BUILDROOT_EXTRA:-} $(apt-cache "${GK_APT[@]}" show \
              "$GK_KBUILD_PKG=$GK_HEADERS_VER" 2>/dev/null |
              sed -n 's/^Depends: //p' | head -n1 |
              sed 's/([^)]*)//g; s/|[^,]*//g; s/,/ /g')"
    # shellcheck disable=SC2086  # split the list
    pkgs=$(printf '%s\n' $pkgs | LC_ALL=C sort -u | tr '\n' ' ')
    pkgs=${pkgs% }
    vers=$(for p in $pkgs; do echo "$p $(apt_version "$p")"; done)
    if grep -q ' $' <<<"$vers"; then
        echo "Debian $GK_SUITE offers no$(sed -n 's/ $//p' <<<"$vers" | tr '\n' ' ' | sed 's/^/ /')" >&2
        return 1
    fi
    key=$(printf '%s\n%s\n' "$GK_SUITE" "$vers" | sha256sum | cut -c1-16)
    dir="$GUEST_CACHE/buildroot-$GK_SUITE-$key"
    GK_BUILDROOT=
    [ -f "$dir/.done" ] && { GK_BUILDROOT=$dir; return 0; }
    ensure_apt debootstrap debian-archive-keyring util-linux
    mkdir -p "$GUEST_CACHE"
    (
        flock 9
        [ -f "$dir/.done" ] && exit 0
        log "building the Debian $GK_SUITE build root $dir ($pkgs)"
        # A half-made root is removed whatever ends the build; debootstrap
        # runs in a mount namespace of its own, so the /proc and /sys it
        # mounts in the root cannot outlive it.
        trap 'rm -rf --one-file-system "$dir.tmp"' EXIT
        rm -rf --one-file-system "$dir.tmp"
        if ! unshare --mount --propagation private -- \
                debootstrap --variant=minbase --force-check-gpg \
                --keyring="$GUEST_KEYRING" --include="${pkgs// /,}" \
                "$GK_SUITE" "$dir.tmp" "$PVDMA_APT_MIRROR" >"$dir.log" 2>&1; then
            tail -n 20 "$dir.log" >&2
            echo "debootstrap of Debian $GK_SUITE failed (log: $dir.log)" >&2
            exit 1
        fi
        rel=$(ls "$dir.tmp"/var/lib/apt/lists/*_InRelease 2>/dev/null | head -n1)
        { echo "suite $GK_SUITE"
          [ -z "$rel" ] || grep -E '^(Codename|Date):' "$rel"
          printf '%s\n' "$vers"; } >"$dir.tmp/.suite"
        [ -x "$dir.tmp/usr/bin/x86_64-linux-gnu-$cc" ] || {
            echo "the build root has no x86_64-linux-gnu-$cc" >&2
            exit 1
        }
        # gcc's LTO back end and lto-dump (78 MB) too: kbuild links no
        # gcc LTO.
        rm -rf "$dir.tmp"/var/cache/apt/archives/*.deb "$dir.tmp"/var/lib/apt/lists/* \
            "$dir.tmp"/usr/share/{doc,man,info,locale}/* \
            "$dir.tmp/usr/libexec/gcc/x86_64-linux-gnu/${cc#gcc-}/lto1" \
            "$dir.tmp/usr/bin/x86_64-linux-gnu-lto-dump-${cc#gcc-}"
        rm -rf "$dir"
        mv "$dir.tmp" "$dir"
        touch "$dir/.done"
        log "build root ready: $(du -sh "$dir" | cut -f1)"
    ) 9>"$dir.lock" || return 1
    GK_BUILDROOT=$dir
}

# guest_buildroot_run DIR CMD...: runs CMD in GK_BUILDROOT as root, in a
# mount namespace of its own (its mounts end with it, on every exit path)
# with a fresh /proc (objtool reads it), the headers read-only and DIR
# read-write, both at their own paths, and nothing else of the machine.
guest_buildroot_run() {
    local dir=$1 hroot=${GK_KBUILD%/usr/src/*}
    shift
    mkdir -p "$GK_BUILDROOT$hroot" "$GK_BUILDROOT$dir"
    unshare --mount --propagation private -- /bin/sh -euc '
        r=$1 h=$2 d=$3
        shift 3
        mount -t proc proc "$r/proc"
        mount --bind "$h" "$r$h"
        mount -o remount,bind,ro "$r$h"
        mount --bind "$d" "$r$d"
        exec chroot "$r" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/tmp \
            LC_ALL=C.UTF-8 "$@"
    ' sh "$GK_BUILDROOT" "$hroot" "$dir" "$@"
}

# guest_build_module SRC_DIR KO: builds the out-of-tree module directory
# SRC_DIR (a Kbuild taking PVDMA_ABI_INC) against GK_KBUILD and prints the
# path of KO (e.g. pvdma_hc.ko): with the machine's gcc-12 for 6.1 and
# 6.12, in guest_buildroot's root for a kernel of a newer suite (7.2).
# Cached under a key of the sources (every file in SRC_DIR), pvdma_abi.h,
# the headers' release and version and the compiler (gcc-12's version or
# the build root's key); built in a copy so the source tree stays clean.
# Further arguments are make variables (e.g. PVDMA_TEST=1), part of the
# key too.
guest_build_module() {
    local src=$1 ko=$2 key mdir out files cckey
    shift 2
    [ -n "${GK_KBUILD:-}" ] || guest_headers || return 1
    if [ "${GK_SUITE:-machine}" != machine ]; then
        [ -n "${GK_BUILDROOT:-}" ] || guest_buildroot || return 1
        cckey="build root ${GK_BUILDROOT##*/}"
    else
        cckey=$(gcc-12 --version | head -n1)
    fi
    # The sources: every file but kbuild's output, should SRC_DIR have
    # been built in place.
    files=$(cd "$src" && find . -type f ! -name '.*' ! -name '*.o' \
                ! -name '*.ko' ! -name '*.mod' ! -name '*.mod.c' \
                ! -name Module.symvers ! -name modules.order | LC_ALL=C sort)
    key=$( { echo "$GK_RELEASE $GK_HEADERS_VER $*"; echo "$cckey"
             (cd "$src" && printf '%s\n' "$files" | xargs sha256sum)
             cat "$GUEST_ABI_H"; } | sha256sum | cut -c1-16)
    mdir="$GUEST_CACHE/kmod-${ko%.ko}-$key"
    # In a build root everything the build sees is in the key: a failure
    # of the compiler's is kept (kmod-*.failed, kbuild's output) and not
    # tried again.
    if [ -f "$mdir.failed" ]; then
        echo "$ko did not build against $GK_KBUILD ($(grep -c 'error:' "$mdir.failed") errors; kbuild's output: $mdir.failed)" >&2
        return 1
    fi
    if [ ! -f "$mdir/$ko" ]; then
        log "building $ko against $GK_KBUILD${GK_BUILDROOT:+ in $GK_BUILDROOT}"
        rm -rf "$mdir.tmp" && mkdir -p "$mdir.tmp"
        mkdir -p "$mdir.tmp/src"
        (cd "$src" && printf '%s\n' "$files" | tar -cf - -T -) |
            tar -xf - -C "$mdir.tmp/src"
        cp "$GUEST_ABI_H" "$mdir.tmp/src/"
        if [ -n "${GK_BUILDROOT:-}" ]; then
            out=$(guest_buildroot_run "$mdir.tmp/src" make -s -C "$GK_KBUILD" \
                      M="$mdir.tmp/src" PVDMA_ABI_INC="$mdir.tmp/src" W=1 "$@" modules 2>&1) || true
        else
            out=$(make -s -C "$GK_KBUILD" M="$mdir.tmp/src" \
                      PVDMA_ABI_INC="$mdir.tmp/src" W=1 "$@" modules 2>&1) || true
        fi
        printf '%s\n' "$out" | grep -v 'Skipping BTF generation' | grep . >&2 || true
        if [ ! -f "$mdir.tmp/src/$ko" ]; then
            if [ -n "${GK_BUILDROOT:-}" ] && grep -q 'error:' <<<"$out"; then
                printf '%s\n' "$out" >"$mdir.failed"
            fi
            rm -rf "$mdir.tmp"
            echo "$ko did not build against $GK_KBUILD" >&2
            return 1
        fi
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
