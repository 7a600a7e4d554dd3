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
/* @series-until kvm */
 * accelerator that forwards a guest's VMCALL or VMMCALL (TCG; KVM once it
 * exits to QEMU for it). Takes the BQL if the caller does not hold it.
/* @series-end kvm */
/* @series-begin kvm */
 * accelerator that forwards a guest's VMCALL or VMMCALL (TCG's helpers,
 * KVM's KVM_EXIT_HYPERCALL handling). Takes the BQL if the caller does not
 * hold it.
/* @series-end kvm */
 *
 * Returns: false, having done nothing, when @nr is not the pvdma
 * hypercall number or no pvdma function has the transport live; the
 * caller then treats the instruction as it otherwise would. Otherwise
 * true, with @ret set to the request's status (as the doorbell would give
 * it), or to -1 (KVM's -KVM_EPERM) without running anything when !@cpl0.
 */
bool pvdma_hypercall(uint64_t nr, uint64_t arg, bool cpl0, uint64_t *ret);
/* @series-begin kvm */

/**
 * pvdma_kvm_hypercall_enable: have KVM forward the pvdma hypercall to QEMU
 *
 * Asks KVM, through KVM_CAP_EXIT_HYPERCALL, to exit to QEMU for the pvdma
 * hypercall, keeping the other hypercalls QEMU already receives. Only a
 * host kernel carrying the pvdma KVM patch offers it. Call only under KVM.
 *
 * Returns: the hypercall number that guests must then use (KVM_HC_PVDMA),
 * or 0 when KVM cannot forward it (a stock kernel, or no x86 KVM support
 * built in), in which case nothing changed.
 */
uint64_t pvdma_kvm_hypercall_enable(void);
/* @series-end kvm */

#endif
