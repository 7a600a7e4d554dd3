#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Download Debian 12's libvirt source package (.dsc + orig tarball) through
# apt's signed source indices, with a private apt configuration so the
# machine's /etc/apt is never touched, and verify it: the .dsc against a
# pinned SHA-256, the orig tarball against the digest the .dsc lists.
#
# Why Debian 12's libvirt 9.0.0 and not the newest Debian's: sid/forky list
# libvirt 12.8.0-1, but its .dsc and tarballs answer 404 on the mirror (as
# QEMU 11.1's do), so the series is kept on the libvirt of the Debian
# release this machine runs (docs/libvirt.md).
#
# Usage: tools/libvirt-fetch.sh            # fetch + verify (cached)
# Env:   PVDMA_CACHE         cache root             (default ~/.cache/pvdma)
#        LIBVIRT_DEB_VERSION Debian source version  (default pinned below)
#        LIBVIRT_DSC_SHA256  the .dsc's SHA-256     (default pinned below)
# Prints the path of the verified orig tarball on its last line.
set -euo pipefail

LIBVIRT_DEB_VERSION=${LIBVIRT_DEB_VERSION:-9.0.0-4+deb12u2}
# Pinned digest of the .dsc: a mismatch means the archive served something
# other than what the series was built and tested against. The .dsc, signed
# by the archive's Sources index, pins the orig tarball in turn. Only valid
# for the default version; overriding the version requires overriding this.
LIBVIRT_DSC_SHA256=${LIBVIRT_DSC_SHA256:-4c6794d4af567cb984d1996a7c9f6b66102f5ccb81faffe2dcef8a95656a16f0}

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
CACHE=$PVDMA_CACHE
APT_ROOT=$CACHE/apt-libvirt
DL=$CACHE/dl
APT_SUITE=${PVDMA_LIBVIRT_APT_SUITE:-bookworm}
APT_MIRROR=${PVDMA_APT_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

upstream_version=${LIBVIRT_DEB_VERSION%-*}  # drop the Debian revision
dsc_name=libvirt_${LIBVIRT_DEB_VERSION}.dsc
orig_name=libvirt_${upstream_version}.orig.tar.xz

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

verify_all() {
    [[ $(sha256_of "$DL/$dsc_name") == "$LIBVIRT_DSC_SHA256" ]] ||
        die "$dsc_name: SHA-256 $(sha256_of "$DL/$dsc_name") != pinned $LIBVIRT_DSC_SHA256"
    local want
    want=$(awk -v f="$orig_name" '
        /^Checksums-Sha256:/ { in_sums = 1; next }
        /^[^ ]/              { in_sums = 0 }
        in_sums && $3 == f   { print $1 }' "$DL/$dsc_name")
    [[ -n $want ]] || die "$orig_name is not listed in $dsc_name"
    [[ $(sha256_of "$DL/$orig_name") == "$want" ]] ||
        die "$orig_name: SHA-256 does not match $dsc_name"
}

mkdir -p "$DL"
if [[ -f $DL/$dsc_name && -f $DL/$orig_name ]]; then
    verify_all
    log "cached and verified: $DL/$orig_name"
    echo "$DL/$orig_name"
    exit 0
fi

private_apt "$APT_ROOT" "deb-src [signed-by=$KEYRING] $APT_MIRROR $APT_SUITE main"
apt_opts=("${PRIVATE_APT[@]}")

log "updating private source lists ($APT_SUITE)"
apt-get "${apt_opts[@]}" -q update >&2

# Read the list once (see qemu-fetch.sh: grep -q under pipefail).
offered=$(apt-cache "${apt_opts[@]}" showsrc libvirt 2>/dev/null |
          awk '/^Version:/ { print $2 }')
log "versions of libvirt source available: $(echo $offered)"
grep -qxF -- "$LIBVIRT_DEB_VERSION" <<<"$offered" ||
    die "libvirt $LIBVIRT_DEB_VERSION not offered by $APT_SUITE"

# --download-only: apt verifies the files against the signed index and
# leaves extraction to libvirt-build.sh.
log "downloading libvirt=$LIBVIRT_DEB_VERSION source into $DL"
(cd "$DL" && apt-get "${apt_opts[@]}" -q --download-only source "libvirt=$LIBVIRT_DEB_VERSION" >&2)
# Only the upstream tarball is built; Debian's packaging is not used.
rm -f "$DL/libvirt_${LIBVIRT_DEB_VERSION}.debian.tar."* "$DL/$orig_name.asc"

verify_all
log "verified: $DL/$orig_name"
echo "$DL/$orig_name"
