#!/usr/bin/env bash
# Download Debian's qemu source package (.dsc + orig tarball) through apt's
# own source machinery, using a private apt configuration so the machine's
# /etc/apt is never touched, and verify it against pinned SHA-256 values.
#
# Usage: tools/qemu-fetch.sh            # fetch + verify (cached)
# Env:   PVDMA_CACHE      cache root            (default ~/.cache/pvdma)
#        QEMU_DEB_VERSION Debian source version (default pinned below)
#        PVDMA_FETCH_DEBIAN_TARBALL=1  also fetch the debian/ tarball (reference only)
# Prints the path of the verified orig tarball on its last line.
set -euo pipefail

QEMU_DEB_VERSION=${QEMU_DEB_VERSION:-1:10.2.2+ds-1}
# Pinned digests: a mismatch means the archive served something other than
# what this project was built and tested against. Only valid for the default
# version; overriding QEMU_DEB_VERSION requires overriding these too.
QEMU_DSC_SHA256=${QEMU_DSC_SHA256:-f1684b3aa5ec500c3389d346c6501dee45041ea91656c6556d4da9023b7987dd}
QEMU_ORIG_SHA256=${QEMU_ORIG_SHA256:-be05230fe47a6937cd29f28f562932c8125f9c93c2a82c625198f7a4aa601dfb}

CACHE=${PVDMA_CACHE:-$HOME/.cache/pvdma}
APT_ROOT=$CACHE/apt
DL=$CACHE/dl
# Suites searched for the source package, newest first.
APT_SUITES=${PVDMA_APT_SUITES:-"sid forky"}
APT_MIRROR=${PVDMA_APT_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

upstream_version=${QEMU_DEB_VERSION#*:}     # drop epoch
upstream_version=${upstream_version%-*}     # drop Debian revision
dsc_name=qemu_${QEMU_DEB_VERSION#*:}.dsc
orig_name=qemu_${upstream_version}.orig.tar.xz

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Check a file against the digest the .dsc lists for it.
check_against_dsc() {
    local file=$1 want
    want=$(awk -v f="$(basename "$file")" '
        /^Checksums-Sha256:/ { in_sums = 1; next }
        /^[^ ]/              { in_sums = 0 }
        in_sums && $3 == f   { print $1 }' "$DL/$dsc_name")
    [[ -n $want ]] || die "$(basename "$file") is not listed in $dsc_name"
    [[ $(sha256_of "$file") == "$want" ]] ||
        die "$(basename "$file"): SHA-256 does not match $dsc_name"
}

check_pinned() {
    local file=$1 want=$2
    if [[ $want == @*@ || -z $want ]]; then
        log "no pinned SHA-256 for $(basename "$file"); got $(sha256_of "$file")"
        return 0
    fi
    [[ $(sha256_of "$file") == "$want" ]] ||
        die "$(basename "$file"): SHA-256 $(sha256_of "$file") != pinned $want"
}

verify_all() {
    check_pinned "$DL/$dsc_name" "$QEMU_DSC_SHA256"
    check_pinned "$DL/$orig_name" "$QEMU_ORIG_SHA256"
    check_against_dsc "$DL/$orig_name"
}

mkdir -p "$DL"
if [[ -f $DL/$dsc_name && -f $DL/$orig_name ]] &&
   [[ ${PVDMA_FETCH_DEBIAN_TARBALL:-0} != 1 ]]; then
    verify_all
    log "cached and verified: $DL/$orig_name"
    echo "$DL/$orig_name"
    exit 0
fi

# --- private apt configuration -------------------------------------------
sources=()
for suite in $APT_SUITES; do
    sources+=("deb-src [signed-by=$KEYRING] $APT_MIRROR $suite main")
done
private_apt "$APT_ROOT" "${sources[@]}"
apt_opts=("${PRIVATE_APT[@]}")

log "updating private source lists ($APT_SUITES)"
apt-get "${apt_opts[@]}" -q update >&2

# Read the list once: `apt-cache ... | grep -q` under pipefail fails
# whenever grep finds the version before apt-cache has written everything
# (apt-cache then dies of SIGPIPE), which depends on the archive's order.
offered=$(apt-cache "${apt_opts[@]}" showsrc qemu 2>/dev/null |
          awk '/^Version:/ { print $2 }')
log "versions of qemu source available:"
printf '  %s\n' $offered >&2

if ! grep -qxF -- "$QEMU_DEB_VERSION" <<<"$offered"; then
    die "qemu $QEMU_DEB_VERSION not offered by suites: $APT_SUITES (see list above)"
fi

# apt-get source downloads into the current directory; --download-only skips
# dpkg-source so we control extraction (and patching) ourselves.
log "downloading qemu=$QEMU_DEB_VERSION source into $DL"
(cd "$DL" && apt-get "${apt_opts[@]}" -q --download-only source "qemu=$QEMU_DEB_VERSION" >&2)

if [[ ${PVDMA_FETCH_DEBIAN_TARBALL:-0} != 1 ]]; then
    # Keep only what the build needs; the debian/ tarball is reference material.
    rm -f "$DL"/qemu_"${QEMU_DEB_VERSION#*:}".debian.tar.*
fi

verify_all
log "verified: $DL/$orig_name"
echo "$DL/$orig_name"
