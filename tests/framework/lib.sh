# shellcheck shell=bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Sourced by the shell tests under tests/: the project's shell library
# (tools/lib.sh: PVDMA_ROOT, log, die, ensure_*), the guest artefact helpers
# (tools/guest-lib.sh: pinned Debian kernels, busybox, modules), and the
# Python framework on PYTHONPATH (pvdma_qemu: the one QMP/qtest client;
# pvdma_guest: guest boots with pvdma_iommu.ko).
# shellcheck source=../../tools/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../tools/lib.sh"
# shellcheck source=../../tools/guest-lib.sh
. "$PVDMA_ROOT/tools/guest-lib.sh"
PVDMA_FRAMEWORK="$PVDMA_ROOT/tests/framework"
export PYTHONPATH="$PVDMA_FRAMEWORK${PYTHONPATH:+:$PYTHONPATH}"
