/*
 * pvdma hypercall transport when the pvdma device is not built
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "hw/misc/pvdma-hypercall.h"

bool pvdma_hypercall(uint64_t nr, uint64_t arg, bool cpl0, uint64_t *ret)
{
    return false;
}
