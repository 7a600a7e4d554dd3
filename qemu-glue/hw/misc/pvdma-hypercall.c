/*
 * pvdma: the hypercall transport
 *
 * A guest's VMCALL or VMMCALL with RAX = HYPERCALL_NR and RBX = a request
 * block's guest-physical address runs as a doorbell request would. Each
 * accelerator that forwards such calls hands them to pvdma_hypercall()
 * (hw/misc/pvdma-hypercall.h).
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/main-loop.h"
#include "qapi/error.h"
#include "hw/misc/pvdma-hypercall.h"
#include "system/address-spaces.h"
#include "system/kvm.h"
#include "system/tcg.h"
#include "trace.h"
#include "pvdma-internal.h"

/* The pvdma functions whose hypercall transport is live, under the BQL */
static QTAILQ_HEAD(, PvdmaState) pvdma_hypercall_devs =
    QTAILQ_HEAD_INITIALIZER(pvdma_hypercall_devs);

/*
 * The request goes to the pvdma function whose scope holds the block's
 * requester; with none (a bad requester, or a block outside guest RAM),
 * to the first live one, which answers NODEV or FAULT exactly as its
 * doorbell would. LAST_STATUS is left alone: the ABI defines it as the
 * status of the last request that came through the doorbell, and a
 * hypercall returns its status in RAX anyway.
 */
static PvdmaState *pvdma_hypercall_route(uint64_t block_gpa)
{
    PvdmaState *s;
    uint8_t rid_le[4];
    uint32_t rid;

    if (QTAILQ_FIRST(&pvdma_hypercall_devs) ==
        QTAILQ_LAST(&pvdma_hypercall_devs)) {
        return QTAILQ_FIRST(&pvdma_hypercall_devs);
    }
    if (address_space_read(&address_space_memory, block_gpa + 8,
                           MEMTXATTRS_UNSPECIFIED, rid_le,
                           sizeof(rid_le)) != MEMTX_OK) {
        return QTAILQ_FIRST(&pvdma_hypercall_devs);
    }
    rid = ldl_le_p(rid_le);
    QTAILQ_FOREACH(s, &pvdma_hypercall_devs, hypercall_next) {
        pvdma_sync_endpoints(s);
        if (g_hash_table_contains(s->by_rid, GUINT_TO_POINTER(rid))) {
            return s;
        }
    }
    return QTAILQ_FIRST(&pvdma_hypercall_devs);
}

bool pvdma_hypercall(uint64_t nr, uint64_t arg, bool cpl0, uint64_t *ret)
{
    PvdmaState *s;
    uint32_t status;

    BQL_LOCK_GUARD();
/* @series-until kvm */
    if (nr != PVDMA_HYPERCALL_NR || QTAILQ_EMPTY(&pvdma_hypercall_devs)) {
        return false;
    }
/* @series-end kvm */
/* @series-begin kvm */
    /* Every live function answers to the same number: one accelerator */
    if (QTAILQ_EMPTY(&pvdma_hypercall_devs) ||
        nr != QTAILQ_FIRST(&pvdma_hypercall_devs)->hypercall_nr) {
        return false;
    }
/* @series-end kvm */
    if (!cpl0) {
        trace_pvdma_hypercall_eperm(arg);
        *ret = (uint64_t)PVDMA_HC_EPERM;
        return true;
    }
    s = pvdma_hypercall_route(arg);
    status = pvdma_submit(s, arg, PVDMA_TRANSPORT_HYPERCALL);
    trace_pvdma_hypercall(object_get_canonical_path_component(OBJECT(s)),
                          arg, status);
    *ret = status;
    return true;
}

/* @series-until kvm */
/*
 * Whether the transport can be live: TCG's VMCALL and VMMCALL come to
 * pvdma_hypercall(); KVM handles hypercalls in the kernel and would need
 * to forward this one to QEMU (KVM_CAP_EXIT_HYPERCALL), which pvdma does
 * not ask for yet.
 */
/* @series-end kvm */
/* @series-begin kvm */
/*
 * Whether the transport can be live, and with which number: TCG's VMCALL
 * and VMMCALL come to pvdma_hypercall() with any number, so it keeps
 * PVDMA_HYPERCALL_NR; KVM handles hypercalls in the kernel and forwards
 * only KVM_HC_PVDMA, and only when the host kernel has the pvdma KVM patch.
 */
/* @series-end kvm */
bool pvdma_hypercall_check(PvdmaState *s, Error **errp)
{
    if (s->hypercall == ON_OFF_AUTO_OFF) {
        return true;
    }
    if (tcg_enabled()) {
        s->hypercall_live = true;
/* @series-begin kvm */
        s->hypercall_nr = PVDMA_HYPERCALL_NR;
/* @series-end kvm */
        return true;
    }
/* @series-begin kvm */
    if (kvm_enabled()) {
        s->hypercall_nr = pvdma_kvm_hypercall_enable();
        if (s->hypercall_nr) {
            s->hypercall_live = true;
            return true;
        }
    }
/* @series-end kvm */
    if (s->hypercall == ON_OFF_AUTO_ON) {
        if (kvm_enabled()) {
/* @series-until kvm */
            error_setg(errp, "pvdma: hypercall=on under KVM needs "
                       "KVM_CAP_EXIT_HYPERCALL support, which pvdma does "
                       "not have yet");
/* @series-end kvm */
/* @series-begin kvm */
            error_setg(errp, "pvdma: hypercall=on under KVM needs a host "
                       "kernel that forwards the pvdma hypercall to QEMU, "
                       "and this one does not (KVM_CAP_EXIT_HYPERCALL)");
            error_append_hint(errp, "The pvdma project's patches/linux adds "
                              "that to KVM.\n");
/* @series-end kvm */
        } else {
            error_setg(errp, "pvdma: hypercall=on needs the TCG "
                       "accelerator");
        }
        error_append_hint(errp, "Use hypercall=auto or hypercall=off; "
                          "guests then use the DOORBELL register.\n");
        return false;
    }
    return true;
}

void pvdma_hypercall_register(PvdmaState *s)
{
    if (s->hypercall_live) {
        QTAILQ_INSERT_TAIL(&pvdma_hypercall_devs, s, hypercall_next);
    }
}

void pvdma_hypercall_unregister(PvdmaState *s)
{
    if (s->hypercall_live) {
        QTAILQ_REMOVE(&pvdma_hypercall_devs, s, hypercall_next);
        s->hypercall_live = false;
    }
}
