/*
 * pvdma hypercall transport under KVM
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef I386_KVM_PVDMA_KVM_H
#define I386_KVM_PVDMA_KVM_H

#include <linux/kvm.h>

/*
 * The hypercall number a host kernel carrying the pvdma KVM patch forwards
 * to QEMU as KVM_EXIT_HYPERCALL. Upstream kernels do not define it, so
 * neither do QEMU's imported headers.
 */
#ifndef KVM_HC_PVDMA
#define KVM_HC_PVDMA 30
#endif

/**
 * kvm_pvdma_handle_hypercall: handle a KVM_EXIT_HYPERCALL for pvdma
 * @run: the vCPU's kvm_run, after a KVM_EXIT_HYPERCALL exit
 *
 * Returns: false, leaving @run alone, when the exit is not the pvdma
 * hypercall. Otherwise true, with @run->hypercall.ret set to the value
 * KVM puts in the caller's RAX when the vCPU resumes: the request's status
 * from pvdma_hypercall(), or -KVM_ENOSYS when no pvdma function has the
 * transport live (what KVM answers for a hypercall it does not know).
 */
bool kvm_pvdma_handle_hypercall(struct kvm_run *run);

#endif
