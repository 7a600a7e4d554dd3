/*
 * pvdma: paravirtual DMA remapping device, state shared by its files
 *
 * pvdma.c             registers, doorbell, guest RAM, life cycle
/* @series-begin migration */
 *                     and migration
/* @series-end migration */
/* @series-begin iommu */
 * pvdma-iommu.c       endpoints: address spaces, translation
/* @series-end iommu */
/* @series-begin notify */
 *                     IOMMU notifiers and replay
/* @series-end notify */
/* @series-begin qmp */
 * pvdma-qmp.c         query-pvdma and info pvdma
/* @series-end qmp */
/* @series-begin hypercall */
 * pvdma-hypercall.c   the VMCALL/VMMCALL transport
/* @series-end hypercall */
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef HW_MISC_PVDMA_INTERNAL_H
#define HW_MISC_PVDMA_INTERNAL_H

#include "hw/pci/pci_device.h"
#include "qapi/qapi-types-common.h"
/* @series-begin hypercall */
#include "qemu/queue.h"
/* @series-end hypercall */
#include "system/memory.h"

/* libpvdma's C API */
#include "pvdma.h"

#define TYPE_PVDMA "pvdma"
OBJECT_DECLARE_SIMPLE_TYPE(PvdmaState, PVDMA)

/*
 * HYPERCALL_NR reads this even while the hypercall transport is off, so
 * that a driver sees a stable, defined value: the ASCII bytes "PDMA", far
 * from the small numbers KVM assigns to its own hypercalls (KVM_HC_*).
 */
#define PVDMA_HYPERCALL_NR 0x50444d41
/* @series-begin iommu */

#define TYPE_PVDMA_IOMMU_MEMORY_REGION "pvdma-iommu-memory-region"

/* Requester ID of an endpoint that has none (yet): not registered. */
#define PVDMA_RID_NONE UINT32_MAX

typedef struct PvdmaEndpoint {
    struct PvdmaState *s;
    PCIBus *bus;
    uint8_t devfn;
    /*
     * The requester ID the library knows this endpoint by. Written under
     * the BQL; read by pvdma_translate() without it.
     */
    uint32_t rid;
    bool attached;
    bool remapping;
    IOMMUNotifierFlag notifier_flags;
/* @series-begin vfio-quota */
    /*
     * pvdma_notify_event() is sending a MAP, and the first error a
     * notifier reported for it (-errno), or 0.
     */
    bool map_pending;
    int map_error;
/* @series-end vfio-quota */
    MemoryRegion root;
    MemoryRegion bypass_mr;
    MemoryRegion msi_mr;
    IOMMUMemoryRegion iommu_mr;
    AddressSpace as;
} PvdmaEndpoint;

/* The endpoints of one bus, keyed by the bus, as requester IDs change. */
typedef struct PvdmaBus {
    PCIBus *bus;
    PvdmaEndpoint *ep[PCI_DEVFN_MAX];
} PvdmaBus;
/* @series-end iommu */

struct PvdmaState {
    PCIDevice parent_obj;

    MemoryRegion mmio;
    MemoryListener ram_listener;
    pvdma_vm *vm;
    bool discard_disabled;

    uint32_t last_status;
    uint32_t doorbell_lo;
/* @series-begin iommu */

    GHashTable *buses;          /* PCIBus * -> PvdmaBus */
    GHashTable *by_rid;         /* requester ID -> registered PvdmaEndpoint */
    uint32_t faults_logged;
    uint64_t attach_requests;   /* ATTACH + DETACH requests last synced */
    DeviceListener dev_listener; /* functions unplugged behind pvdma */
/* @series-end iommu */
/* @series-begin migration */

    uint8_t *mig_state;
    uint32_t mig_state_len;
    char *mig_endpoints;
    uint32_t mig_endpoints_len;
/* @series-end migration */

    /* properties */
    uint64_t pin_limit;
    uint64_t mem_limit;
    char *pin_mode;
    uint32_t iova_bits;
    uint32_t max_segs;
    bool bypass;
    bool unmap_list;
    OnOffAuto hypercall;
/* @series-begin queue */
    uint32_t queues;
/* @series-end queue */
/* @series-begin hypercall */

    /* The hypercall transport is live (FEATURES.HYPERCALL) */
    bool hypercall_live;
/* @series-begin kvm */
    /* The number it answers to (HYPERCALL_NR): the accelerator's choice */
    uint64_t hypercall_nr;
/* @series-end kvm */
    QTAILQ_ENTRY(PvdmaState) hypercall_next;
/* @series-end hypercall */
};

/* pvdma.c */

/* The FEATURES register */
uint64_t pvdma_features(PvdmaState *s);

/*
 * Run the request whose block is at @block_gpa and return its status. The
 * doorbell and the hypercall transport both come through here, each
 * naming itself in @transport (PVDMA_TRANSPORT_*) for query-pvdma's
 * request counts.
 */
uint32_t pvdma_submit(PvdmaState *s, uint64_t block_gpa, uint32_t transport);
/* @series-begin iommu */

/* pvdma-iommu.c */

const char *pvdma_bus_name(PCIBus *bus);

/*
 * Fail unless pvdma can be the IOMMU of its bus: a root bus without one,
 * with no assigned device created before pvdma.
 */
bool pvdma_iommu_check_bus(PvdmaState *s, Error **errp);

/* Become the IOMMU of the bus, once the library state exists */
void pvdma_iommu_setup(PvdmaState *s);

/*
 * Register @ep with the library under @rid (false, logged as a guest
 * error, when another endpoint has it), or unregister it.
 */
bool pvdma_ep_register(PvdmaEndpoint *ep, uint32_t rid);
void pvdma_ep_unregister(PvdmaEndpoint *ep);

/*
 * Bring the library's endpoint set in line with the buses (before a
 * request), and the address spaces in line with the library's attach
 * states (after a request, reset or migration).
 */
void pvdma_sync_endpoints(PvdmaState *s);
void pvdma_sync_attached(PvdmaState *s);
void pvdma_sync_attached_after_request(PvdmaState *s);
/* @series-end iommu */
/* @series-begin hypercall */

/* pvdma-hypercall.c */

/*
 * Check the hypercall property at realize and decide whether the
 * transport is live (hypercall_live), or fail when it was asked for and
 * cannot be.
 */
bool pvdma_hypercall_check(PvdmaState *s, Error **errp);

/* Offer or withdraw a realized function's live transport */
void pvdma_hypercall_register(PvdmaState *s);
void pvdma_hypercall_unregister(PvdmaState *s);
/* @series-end hypercall */

#endif
