/*
 * pvdma hypercall transport when there is no x86 KVM support
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "hw/misc/pvdma-hypercall.h"

uint64_t pvdma_kvm_hypercall_enable(void)
{
    return 0;
}
