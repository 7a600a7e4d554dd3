/*
 * pvdma hypercall transport: the entry point for the CPU emulation
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef HW_MISC_PVDMA_HYPERCALL_H
#define HW_MISC_PVDMA_HYPERCALL_H

/**
 * pvdma_hypercall: run a hypercall that a pvdma function may handle
 * @nr: the hypercall number (RAX)
 * @arg: its argument (RBX), the guest-physical address of a request block
 * @cpl0: whether the caller runs at CPL 0
 * @ret: where to put the value for RAX
 *
 * The one dispatch point of the pvdma hypercall transport, for every
 * accelerator that forwards a guest's VMCALL or VMMCALL (TCG; KVM once it
 * exits to QEMU for it). Takes the BQL if the caller does not hold it.
 *
 * Returns: false, having done nothing, when @nr is not the pvdma
 * hypercall number or no pvdma function has the transport live; the
 * caller then treats the instruction as it otherwise would. Otherwise
 * true, with @ret set to the request's status (as the doorbell would give
 * it), or to -1 (KVM's -KVM_EPERM) without running anything when !@cpl0.
 */
bool pvdma_hypercall(uint64_t nr, uint64_t arg, bool cpl0, uint64_t *ret);

#endif
