/*
 * pvdma hypercall transport under KVM
 *
 * A host kernel carrying the pvdma KVM patch forwards hypercall
 * KVM_HC_PVDMA to QEMU once QEMU enables it in KVM_CAP_EXIT_HYPERCALL.
 * Kept apart from kvm.c so that tests/unit can feed it synthetic exits.
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "standard-headers/linux/kvm_para.h"
#include "hw/misc/pvdma-hypercall.h"
#include "pvdma-kvm.h"

bool kvm_pvdma_handle_hypercall(struct kvm_run *run)
{
    uint64_t ret;

    if (run->hypercall.nr != KVM_HC_PVDMA) {
        return false;
    }
    /*
     * KVM answers callers at CPL > 0 with -KVM_EPERM itself, so whatever
     * reaches here ran at CPL 0. It has also cut the argument to 32 bits
     * for callers outside 64-bit mode, and cuts the result the same way
     * when it writes it to RAX.
     */
    if (!pvdma_hypercall(run->hypercall.nr, run->hypercall.args[0], true,
                         &ret)) {
        ret = -(uint64_t)KVM_ENOSYS;
    }
    run->hypercall.ret = ret;
    return true;
}
