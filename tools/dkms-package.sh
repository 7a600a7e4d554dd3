#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds pvdma-iommu-dkms_<version>_all.deb: the guest IOMMU driver
# (guest/linux, with pvdma_abi.h) as DKMS source, so a guest's package
# manager builds pvdma_iommu.ko for every kernel it installs
# (docs/guest-driver.md, "From the package"). The package holds:
#
#   /usr/src/pvdma-iommu-<version>/         the sources, dkms.conf and the
#                                           pre-build kernel check
#   /lib/modprobe.d/pvdma-iommu.conf        softdeps: pvdma_iommu loads
#                                           before the device drivers
#   /usr/share/initramfs-tools/hooks/...    puts the module into the
#   /usr/share/initramfs-tools/modules.d/   initramfs, loaded early
#
# Its postinst registers, builds and installs the module for the running
# kernel and every kernel with headers (Debian's dkms common.postinst,
# AUTOINSTALL for later kernels); its prerm removes it. The version is the
# project's (Cargo.toml's workspace version).
#
# Usage: tools/dkms-package.sh [OUT_DIR]   (default build/dkms)
# Prints the path of the .deb on its last line.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

out=${1:-$PVDMA_ROOT/build/dkms}
ensure_apt dpkg-dev
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' \
    "$PVDMA_ROOT/Cargo.toml")
[ -n "$version" ] || die "no workspace version in Cargo.toml"
name=pvdma-iommu
src=$PVDMA_ROOT/guest/linux
pkg=$out/$name-dkms_${version}_all

rm -rf "$pkg" && mkdir -p "$pkg/DEBIAN"
usrc=$pkg/usr/src/$name-$version
install -d "$usrc"
install -m 0644 "$src/pvdma-iommu.c" "$src/Kbuild" "$src/Makefile" "$usrc/"
install -m 0644 "$PVDMA_ROOT/rust-core/include/pvdma_abi.h" "$usrc/"
install -m 0755 "$src/dkms/pvdma-check-kernel" "$usrc/"
sed "s/@VERSION@/$version/" "$src/dkms/dkms.conf.in" >"$usrc/dkms.conf"
install -D -m 0644 "$src/dkms/modprobe.conf" "$pkg/lib/modprobe.d/$name.conf"
install -D -m 0755 "$src/dkms/initramfs-hook" \
    "$pkg/usr/share/initramfs-tools/hooks/$name"
install -D -m 0644 /dev/null "$pkg/usr/share/initramfs-tools/modules.d/$name"
echo pvdma_iommu >"$pkg/usr/share/initramfs-tools/modules.d/$name"
install -d "$pkg/usr/share/doc/$name-dkms"
cat >"$pkg/usr/share/doc/$name-dkms/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pvdma
Files: *
License: GPL-2.0
 The guest driver pvdma_iommu.ko is GPL-2.0 (SPDX headers of its files);
 pvdma_abi.h is Apache-2.0 OR BSD-3-Clause. On Debian systems the GPL-2.0
 is in /usr/share/common-licenses/GPL-2.
EOF

cat >"$pkg/DEBIAN/control" <<EOF
Package: $name-dkms
Version: $version
Architecture: all
Section: kernel
Priority: optional
Maintainer: pvdma developers <pvdma@example.invalid>
Depends: dkms (>= 3.0)
Installed-Size: $(du -sk "$pkg/usr" "$pkg/lib" | awk '{s += $1} END {print s}')
Description: pvdma guest IOMMU driver (DKMS source)
 pvdma_iommu.ko makes pvdma, QEMU's paravirtual DMA remapping device, the
 IOMMU of a Linux guest: every DMA mapping of the devices behind it is sent
 to the host, which pins the pages and translates the devices' DMA. DKMS
 builds the module for each installed kernel (Linux 6.1.y, 6.12.y, 7.2 and
 later); modprobe softdeps and an initramfs-tools hook load it before the
 device drivers.
EOF
cat >"$pkg/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
case "\$1" in
configure)
	/usr/lib/dkms/common.postinst $name $version /usr/share/$name-dkms "" "\$2"
	;;
esac
EOF
cat >"$pkg/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
case "\$1" in
remove | upgrade | deconfigure)
	if [ "\$(dkms status -m $name -v $version)" ]; then
		dkms remove -m $name -v $version --all
	fi
	;;
esac
EOF
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm"
# A new module in the initramfs: initramfs-tools rebuilds it once dpkg is
# done (no-op on a system without initramfs-tools).
echo "activate-noawait update-initramfs" >"$pkg/DEBIAN/triggers"

deb=$pkg.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
rm -rf "$pkg"
log "built $(basename "$deb")"
echo "$deb"
