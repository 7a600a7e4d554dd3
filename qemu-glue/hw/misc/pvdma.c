/*
 * pvdma: paravirtual DMA remapping device
 *
 * A PCI function that remaps the DMA of every other PCI function on its
 * root bus, programmed through request blocks in guest RAM (see
 * docs/system/devices/pvdma.rst). The request engine, the IOVA tables and
 * the pin accounting live in libpvdma, a Rust library with a C API; this
 * file is the QEMU side: registers, guest RAM layout, per-endpoint address
 * spaces and the IOMMU memory regions that translate through the library.
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/error-report.h"
#include "qemu/log.h"
#include "qemu/units.h"
#include "qapi/error.h"
/* @series-begin qmp */
#include "qapi/qapi-commands-pvdma.h"
#include "monitor/hmp.h"
#include "monitor/monitor.h"
/* @series-end qmp */
#include "hw/pci/pci_device.h"
/* @series-begin iommu */
#include "hw/pci/pci_bus.h"
/* @series-end iommu */
#include "hw/qdev-properties.h"
/* @series-begin hypercall */
#include "hw/misc/pvdma-hypercall.h"
#include "qemu/main-loop.h"
#include "system/kvm.h"
#include "system/tcg.h"
/* @series-end hypercall */
#include "migration/vmstate.h"
#include "system/address-spaces.h"
#include "system/memory.h"
#include "trace.h"

#include "pvdma.h"

#define TYPE_PVDMA "pvdma"
OBJECT_DECLARE_SIMPLE_TYPE(PvdmaState, PVDMA)

/* @series-begin iommu */
#define TYPE_PVDMA_IOMMU_MEMORY_REGION "pvdma-iommu-memory-region"

/* Requester ID of an endpoint that has none (yet): not registered. */
#define PVDMA_RID_NONE UINT32_MAX

/*
 * The x86 MSI window. Message writes from endpoints are interrupts, not
 * memory accesses, and bypass translation as they do with VT-d's interrupt
 * remapping region; IOVAs in it cannot reach memory.
 */
#define PVDMA_MSI_BASE 0xfee00000ULL
#define PVDMA_MSI_SIZE (1 * MiB)

/* Refused DMA accesses logged per reset before the log goes quiet. */
#define PVDMA_FAULT_LOG_BURST 16
/* @series-end iommu */

/* System peripheral, IOMMU (PCI code and ID spec, class 08h subclass 06h) */
#define PVDMA_PCI_CLASS_SYSTEM_IOMMU 0x0806

#define PVDMA_IOVA_BITS_MIN 21
#define PVDMA_IOVA_BITS_MAX 57
#define PVDMA_MAX_SEGS_MAX 65536

/*
 * HYPERCALL_NR reads this even while the hypercall transport is off, so
 * that a driver sees a stable, defined value: the ASCII bytes "PDMA", far
 * from the small numbers KVM assigns to its own hypercalls (KVM_HC_*).
 */
#define PVDMA_HYPERCALL_NR 0x50444d41

/* @series-begin iommu */
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

/* @series-begin hypercall */
/* The pvdma functions whose hypercall transport is live, under the BQL */
static QTAILQ_HEAD(, PvdmaState) pvdma_hypercall_devs =
    QTAILQ_HEAD_INITIALIZER(pvdma_hypercall_devs);
/* @series-end hypercall */

/* @series-begin iommu */
static void pvdma_sync_endpoints(PvdmaState *s);
static void pvdma_sync_attached(PvdmaState *s);
static void pvdma_sync_attached_after_request(PvdmaState *s);
/* @series-end iommu */

static uint64_t pvdma_features(PvdmaState *s)
{
/* @series-until hypercall */
    /* FEATURES.HYPERCALL stays clear until the hypercall transport exists */
    return pvdma_vm_features(s->vm);
/* @series-end hypercall */
/* @series-begin hypercall */
    return pvdma_vm_features(s->vm) |
           (s->hypercall_live ? PVDMA_FEATURE_HYPERCALL : 0);
/* @series-end hypercall */
}

/* The naturally aligned 64-bit register word at @off. */
static uint64_t pvdma_reg_qword(PvdmaState *s, hwaddr off)
{
    switch (off) {
    case PVDMA_REG_MAGIC:
        return PVDMA_MAGIC | ((uint64_t)PVDMA_VERSION << 32);
    case PVDMA_REG_FEATURES:
        return pvdma_features(s);
    case PVDMA_REG_IOVA_BITS:
        return s->iova_bits | ((uint64_t)s->max_segs << 32);
    case PVDMA_REG_PAGE_SIZES:
        return pvdma_vm_page_sizes(s->vm);
    case PVDMA_REG_HYPERCALL_NR:
/* @series-until kvm */
        return PVDMA_HYPERCALL_NR;
/* @series-end kvm */
/* @series-begin kvm */
        return s->hypercall_live ? s->hypercall_nr : PVDMA_HYPERCALL_NR;
/* @series-end kvm */
    case PVDMA_REG_FAULTS:
        return pvdma_vm_fault_count(s->vm);
    case PVDMA_REG_LAST_STATUS:
        return s->last_status;
    default:
        /* DOORBELL is write-only; everything else is undefined */
        return 0;
    }
}

static uint64_t pvdma_mmio_read(void *opaque, hwaddr addr, unsigned size)
{
    PvdmaState *s = opaque;
    uint64_t val = pvdma_reg_qword(s, addr & ~7ULL) >> ((addr & 7) * 8);

    if (size < 8) {
        val &= MAKE_64BIT_MASK(0, size * 8);
    }
    trace_pvdma_mmio_read(addr, size, val);
    return val;
}

/*
 * Run the request whose block is at @block_gpa and return its status. The
 * doorbell and the hypercall transport both come through here, each
 * naming itself in @transport (PVDMA_TRANSPORT_*) for query-pvdma's
 * request counts.
 */
static uint32_t pvdma_submit(PvdmaState *s, uint64_t block_gpa,
                             uint32_t transport)
{
    uint16_t op = 0;
    uint32_t requester = 0, nr_segs = 0;
    uint64_t result = 0;
    uint32_t status;

/* @series-begin iommu */
    /* Bus numbers may have changed or functions come and gone since. */
    pvdma_sync_endpoints(s);
/* @series-end iommu */
    status = pvdma_vm_submit_via(s->vm, block_gpa, transport);
/* @series-begin iommu */
    pvdma_sync_attached_after_request(s);
/* @series-end iommu */

    if (status == PVDMA_S_INVAL ||
        trace_event_get_state_backends(TRACE_PVDMA_REQUEST) ||
        trace_event_get_state_backends(TRACE_PVDMA_UNMAP_LIST)) {
        /* Not for the request: the library has read the block already */
        uint8_t hdr[40];

        if (address_space_read(&address_space_memory, block_gpa,
                               MEMTXATTRS_UNSPECIFIED, hdr,
                               sizeof(hdr)) == MEMTX_OK) {
            op = lduw_le_p(hdr);
            requester = ldl_le_p(hdr + 8);
            nr_segs = ldl_le_p(hdr + 12);
            result = ldq_le_p(hdr + 32);
        }
    }
    trace_pvdma_request(block_gpa, op, requester,
                        pvdma_guest_status_name(status), status);
    if (op == PVDMA_OP_UNMAP_LIST) {
        if (!s->unmap_list) {
            qemu_log_mask(LOG_GUEST_ERROR,
                          "%s: UNMAP_LIST (op %u) from requester 0x%04x "
                          "while FEATURES.UNMAP_LIST is clear "
                          "(unmap-list=off): INVAL\n",
                          __func__, op, requester);
        } else {
            trace_pvdma_unmap_list(block_gpa, requester, nr_segs,
                                   status == PVDMA_S_OK ? result : 0,
                                   pvdma_guest_status_name(status));
        }
    }
    return status;
}

static void pvdma_doorbell(PvdmaState *s, uint64_t block_gpa)
{
    s->last_status = pvdma_submit(s, block_gpa, PVDMA_TRANSPORT_DOORBELL);
}

static void pvdma_mmio_write(void *opaque, hwaddr addr, uint64_t val,
                             unsigned size)
{
    PvdmaState *s = opaque;

    trace_pvdma_mmio_write(addr, size, val);
    if (addr == PVDMA_REG_DOORBELL && size == 8) {
        pvdma_doorbell(s, val);
    } else if (addr == PVDMA_REG_DOORBELL && size == 4) {
        s->doorbell_lo = val;
    } else if (addr == PVDMA_REG_DOORBELL_HI && size == 4) {
        pvdma_doorbell(s, (val << 32) | s->doorbell_lo);
    } else {
        qemu_log_mask(LOG_GUEST_ERROR,
                      "%s: write of %u bytes to read-only or undefined "
                      "register 0x%" HWADDR_PRIx " ignored\n",
                      __func__, size, addr);
    }
}

static const MemoryRegionOps pvdma_mmio_ops = {
    .read = pvdma_mmio_read,
    .write = pvdma_mmio_write,
    .endianness = DEVICE_LITTLE_ENDIAN,
    .valid = {
        .min_access_size = 4,
        .max_access_size = 8,
    },
    .impl = {
        .min_access_size = 4,
        .max_access_size = 8,
    },
};

/*
 * Guest RAM: every writable RAM section of the system address space is a
 * region the library may read request blocks from and map. ROM, ROM
 * devices and RAM devices (assigned BARs) are not guest RAM in the ABI's
 * sense.
 */
static bool pvdma_section_is_ram(MemoryRegionSection *section, uint64_t *gpa,
                                 uint64_t *size, void **hva)
{
    MemoryRegion *mr = section->mr;

    if (!memory_region_is_ram(mr) || mr->readonly ||
        memory_region_is_ram_device(mr)) {
        return false;
    }
    *gpa = section->offset_within_address_space;
    *size = int128_get64(section->size);
    *hva = (uint8_t *)memory_region_get_ram_ptr(mr) +
           section->offset_within_region;
    if (!QEMU_IS_ALIGNED(*gpa | *size | (uintptr_t)*hva, PVDMA_PAGE_SIZE)) {
        trace_pvdma_ram_skip(*gpa, *size, memory_region_name(mr));
        return false;
    }
    return true;
}

static void pvdma_ram_add(MemoryListener *listener,
                          MemoryRegionSection *section)
{
    PvdmaState *s = container_of(listener, PvdmaState, ram_listener);
    uint64_t gpa, size;
    void *hva;
    pvdma_result r;

    if (!pvdma_section_is_ram(section, &gpa, &size, &hva)) {
        return;
    }
    r = pvdma_vm_add_ram(s->vm, gpa, size, hva);
    trace_pvdma_ram_add(gpa, size, memory_region_name(section->mr),
                        pvdma_strerror(r));
}

static void pvdma_ram_del(MemoryListener *listener,
                          MemoryRegionSection *section)
{
    PvdmaState *s = container_of(listener, PvdmaState, ram_listener);
    uint64_t gpa, size, torn_down = 0;
    void *hva;
    pvdma_result r;

    if (!pvdma_section_is_ram(section, &gpa, &size, &hva)) {
        return;
    }
    r = pvdma_vm_remove_ram(s->vm, gpa, size, &torn_down);
    trace_pvdma_ram_del(gpa, size, torn_down, pvdma_strerror(r));
}

/* @series-begin iommu */
/* Endpoints and their address spaces */

static const char *pvdma_bus_name(PCIBus *bus)
{
    return BUS(bus)->name;
}

static uint32_t pvdma_ep_bdf(PvdmaEndpoint *ep)
{
    return PCI_BUILD_BDF(pci_bus_num(ep->bus), ep->devfn);
}

/*
 * The requester ID the endpoint has now, or PVDMA_RID_NONE when it has
 * none: its function was unplugged, or its bus has no number yet (a
 * secondary bus before the guest's enumeration).
 */
static uint32_t pvdma_ep_current_rid(PvdmaEndpoint *ep)
{
    PCIBus *bus = ep->bus;

    if (!bus->devices[ep->devfn]) {
        /*
         * Behind a PCIe-to-PCI bridge every function uses the alias
         * secondary-bus:00.0, which needs no function of its own there.
         */
        bool alias = !pci_bus_is_root(bus) && !pci_bus_is_express(bus) &&
                     ep->devfn == 0;
        int i;

        for (i = 0; alias && i < PCI_DEVFN_MAX; i++) {
            if (bus->devices[i]) {
                break;
            }
        }
        if (!alias || i == PCI_DEVFN_MAX) {
            return PVDMA_RID_NONE;
        }
    }
    if (!pci_bus_is_root(bus) && pci_bus_num(bus) == 0) {
        return PVDMA_RID_NONE;
    }
    return pvdma_ep_bdf(ep);
}

static void pvdma_switch_as(PvdmaEndpoint *ep, bool force)
{
    bool remap = ep->attached || !ep->s->bypass;

    if (remap == ep->remapping && !force) {
        return;
    }
    ep->remapping = remap;
    trace_pvdma_switch_as(pci_bus_num(ep->bus), PCI_SLOT(ep->devfn),
                          PCI_FUNC(ep->devfn),
                          remap ? "translated" :
                          (ep->s->bypass ? "bypass" : "blocked"));

    memory_region_transaction_begin();
    /* Turn one off before the other goes on */
    if (remap) {
        memory_region_set_enabled(&ep->bypass_mr, false);
        memory_region_set_enabled(MEMORY_REGION(&ep->iommu_mr), true);
    } else {
        memory_region_set_enabled(MEMORY_REGION(&ep->iommu_mr), false);
        memory_region_set_enabled(&ep->bypass_mr, true);
    }
    memory_region_transaction_commit();
}

/* A host device assigned to the guest: its DMA pins host memory. */
static char *pvdma_passthrough_host(PCIDevice *dev)
{
    Object *obj = OBJECT(dev);
    char *host;

    if (!dev || !object_dynamic_cast(obj, "vfio-pci")) {
        return NULL;
    }
    host = object_property_get_str(obj, "host", NULL);
    if (!host || !*host) {
        g_free(host);
        host = object_property_get_str(obj, "sysfsdev", NULL);
    }
    if (!host || !*host) {
        g_free(host);
        host = g_strdup("vfio");
    }
    return host;
}

static void pvdma_ep_unregister(PvdmaEndpoint *ep)
{
    PvdmaState *s = ep->s;
    uint32_t rid = ep->rid;

    if (rid == PVDMA_RID_NONE) {
        return;
    }
    /* Still findable while the library sends its UNMAP events */
    pvdma_vm_remove_endpoint(s->vm, rid);
    g_hash_table_remove(s->by_rid, GUINT_TO_POINTER(rid));
    qatomic_set(&ep->rid, PVDMA_RID_NONE);
    trace_pvdma_endpoint_del(rid);
}

static bool pvdma_ep_register(PvdmaEndpoint *ep, uint32_t rid)
{
    PvdmaState *s = ep->s;
    g_autofree char *host = pvdma_passthrough_host(ep->bus->devices[ep->devfn]);
    pvdma_result r;

    r = pvdma_vm_add_endpoint(s->vm, rid, host);
    trace_pvdma_endpoint_add(rid, host ? host : "", pvdma_strerror(r));
    if (r != PVDMA_OK) {
        /* Two functions claiming one ID: a guest bus numbering conflict */
        qemu_log_mask(LOG_GUEST_ERROR,
                      "pvdma: requester %02x:%02x.%x not registered: %s\n",
                      PCI_BUS_NUM(rid), PCI_SLOT(rid), PCI_FUNC(rid),
                      pvdma_strerror(r));
        return false;
    }
    g_hash_table_insert(s->by_rid, GUINT_TO_POINTER(rid), ep);
    qatomic_set(&ep->rid, rid);
    return true;
}

/*
 * Bring the library's endpoint set in line with the bus: requester IDs
 * are bus numbers the guest assigns, and functions come and go with
 * hotplug. An endpoint whose ID changed starts over, detached.
 */
static void pvdma_sync_endpoints(PvdmaState *s)
{
    GHashTableIter iter;
    PvdmaBus *pbus;
    int devfn;

    g_hash_table_iter_init(&iter, s->buses);
    while (g_hash_table_iter_next(&iter, NULL, (void **)&pbus)) {
        for (devfn = 0; devfn < PCI_DEVFN_MAX; devfn++) {
            PvdmaEndpoint *ep = pbus->ep[devfn];
            uint32_t rid;

            if (!ep) {
                continue;
            }
            rid = pvdma_ep_current_rid(ep);
            if (rid == ep->rid) {
                continue;
            }
            pvdma_ep_unregister(ep);
            if (rid != PVDMA_RID_NONE) {
                pvdma_ep_register(ep, rid);
            }
            ep->attached = false;
            pvdma_switch_as(ep, false);
        }
    }
}

/* Follow ATTACH/DETACH (and reset, migration) with the address spaces. */
static void pvdma_sync_attached(PvdmaState *s)
{
    size_t n = pvdma_vm_endpoints(s->vm, NULL, 0);
    g_autofree struct pvdma_endpoint_info *info =
        g_new0(struct pvdma_endpoint_info, n);
    size_t i;

    n = MIN(n, pvdma_vm_endpoints(s->vm, info, n));
    for (i = 0; i < n; i++) {
        gpointer key = GUINT_TO_POINTER(info[i].requester);
        PvdmaEndpoint *ep = g_hash_table_lookup(s->by_rid, key);

        if (ep && ep->attached != info[i].attached) {
            ep->attached = info[i].attached;
            pvdma_switch_as(ep, false);
        }
    }
}

/*
 * After a guest request: only ATTACH and DETACH change whether an endpoint
 * is attached (reset and migration sync on their own), so follow their
 * request counts. Listing every endpoint after each request cost more
 * than the request: the list counts each endpoint's mappings.
 */
static void pvdma_sync_attached_after_request(PvdmaState *s)
{
    struct pvdma_request_counts counts;
    uint64_t n;

    if (pvdma_vm_request_counts(s->vm, &counts) != PVDMA_OK) {
        pvdma_sync_attached(s);
        return;
    }
    n = counts.attach + counts.detach;
    if (n != s->attach_requests) {
        s->attach_requests = n;
        pvdma_sync_attached(s);
    }
}

static AddressSpace *pvdma_get_address_space(PCIBus *bus, void *opaque,
                                             int devfn)
{
    PvdmaState *s = opaque;
    PCIDevice *self = PCI_DEVICE(s);
    PvdmaBus *pbus;
    PvdmaEndpoint *ep;
    g_autofree char *name = NULL;

    if (bus == pci_get_bus(self) && devfn == self->devfn) {
        /* pvdma does not translate its own accesses */
        return &address_space_memory;
    }

    pbus = g_hash_table_lookup(s->buses, bus);
    if (!pbus) {
        pbus = g_new0(PvdmaBus, 1);
        pbus->bus = bus;
        g_hash_table_insert(s->buses, bus, pbus);
    }
    ep = pbus->ep[devfn];
    if (ep) {
        return &ep->as;
    }

    ep = pbus->ep[devfn] = g_new0(PvdmaEndpoint, 1);
    ep->s = s;
    ep->bus = bus;
    ep->devfn = devfn;
    ep->rid = PVDMA_RID_NONE;
    name = g_strdup_printf("pvdma-%s-%02x.%x", pvdma_bus_name(bus),
                           PCI_SLOT(devfn), PCI_FUNC(devfn));

    memory_region_init(&ep->root, OBJECT(s), name, UINT64_MAX);
    address_space_init(&ep->as, &ep->root, name);
    memory_region_init_alias(&ep->bypass_mr, OBJECT(s), "pvdma-bypass",
                             get_system_memory(), 0,
                             memory_region_size(get_system_memory()));
    memory_region_init_iommu(&ep->iommu_mr, sizeof(ep->iommu_mr),
                             TYPE_PVDMA_IOMMU_MEMORY_REGION, OBJECT(s),
                             name, UINT64_MAX);
    memory_region_init_alias(&ep->msi_mr, OBJECT(s), "pvdma-msi",
                             get_system_memory(), PVDMA_MSI_BASE,
                             PVDMA_MSI_SIZE);
    memory_region_add_subregion_overlap(&ep->root, 0,
                                        MEMORY_REGION(&ep->iommu_mr), 0);
    memory_region_add_subregion_overlap(&ep->root, 0, &ep->bypass_mr, 0);
    memory_region_add_subregion_overlap(&ep->root, PVDMA_MSI_BASE,
                                        &ep->msi_mr, 1);
    pvdma_switch_as(ep, true);
    trace_pvdma_endpoint_new(name);
    return &ep->as;
}

static const PCIIOMMUOps pvdma_iommu_ops = {
    .get_address_space = pvdma_get_address_space,
};

/* Translation: runs under RCU, without the BQL, for every device access */

static void pvdma_report_fault(PvdmaEndpoint *ep, uint32_t rid,
                               hwaddr iova, uint32_t access)
{
    PvdmaState *s = ep->s;
    uint32_t n = qatomic_fetch_inc(&s->faults_logged);
    const char *what = access == PVDMA_ACCESS_READ ? "read" :
                       access == PVDMA_ACCESS_WRITE ? "write" : "read/write";

    trace_pvdma_fault(rid, iova, what);
    if (n < PVDMA_FAULT_LOG_BURST) {
        qemu_log_mask(LOG_GUEST_ERROR,
                      "pvdma: refused DMA %s by %02x:%02x.%x at IOVA 0x%"
                      HWADDR_PRIx "\n", what, PCI_BUS_NUM(rid),
                      PCI_SLOT(rid), PCI_FUNC(rid), iova);
    } else if (n == PVDMA_FAULT_LOG_BURST) {
        qemu_log_mask(LOG_GUEST_ERROR,
                      "pvdma: more refused DMA, not logged until reset "
                      "(see the FAULTS register and query-pvdma)\n");
    }
}

static IOMMUTLBEntry pvdma_translate(IOMMUMemoryRegion *iommu_mr,
                                     hwaddr addr, IOMMUAccessFlags flag,
                                     int iommu_idx)
{
    PvdmaEndpoint *ep = container_of(iommu_mr, PvdmaEndpoint, iommu_mr);
    PvdmaState *s = ep->s;
    uint32_t rid = qatomic_read(&ep->rid);
    /* IOMMU_RO/WO/RW are PVDMA_ACCESS_READ/WRITE/RW; NONE only looks */
    uint32_t access = flag & IOMMU_RW;
    IOMMUTLBEntry entry = {
        .target_as = &address_space_memory,
        .iova = addr & ~(hwaddr)(PVDMA_PAGE_SIZE - 1),
        .addr_mask = PVDMA_PAGE_SIZE - 1,
        .perm = IOMMU_NONE,
    };
    struct pvdma_lookup lookup;
    pvdma_result r;

    if (rid == PVDMA_RID_NONE) {
        /* No requester ID yet: nothing can have been mapped for it */
        rid = pvdma_ep_bdf(ep);
        if (access) {
            pvdma_vm_record_fault(s->vm, rid, addr, access,
                                  PVDMA_FAULT_NO_DEVICE);
            pvdma_report_fault(ep, rid, addr, access);
        }
        return entry;
    }

    r = pvdma_vm_lookup(s->vm, rid, addr, access, &lookup);
    if (r != PVDMA_OK) {
        if (access) {
            pvdma_report_fault(ep, rid, addr, access);
        }
        return entry;
    }
    if (lookup.flags & PVDMA_LOOKUP_BYPASS) {
        entry.translated_addr = entry.iova;
        entry.perm = IOMMU_RW;
    } else {
        entry.translated_addr = lookup.gpa & ~(hwaddr)(PVDMA_PAGE_SIZE - 1);
        entry.perm = lookup.perms & IOMMU_RW;
    }
    trace_pvdma_translate(rid, addr, entry.translated_addr, entry.perm);
    return entry;
}
/* @series-end iommu */

/* @series-begin notify */
/* Notifiers: vfio and vhost keep shadow mappings of the translations */

typedef void PvdmaEventFn(IOMMUMemoryRegion *iommu_mr, IOMMUNotifier *n,
                          IOMMUTLBEvent *event);

/*
 * An IOTLB entry covers a naturally aligned power of two, so a run of
 * @len bytes at @iova (to @gpa) goes out as the fewest such pieces.
 */
static void pvdma_for_each_piece(IOMMUMemoryRegion *iommu_mr,
                                 IOMMUNotifier *n, IOMMUNotifierFlag type,
                                 uint64_t iova, uint64_t gpa, uint64_t len,
                                 IOMMUAccessFlags perm, PvdmaEventFn *fn)
{
    while (len) {
        uint64_t align = iova | (type == IOMMU_NOTIFIER_MAP ? gpa : 0);
        uint64_t size = align ? 1ULL << ctz64(align) : 1ULL << 63;
        IOMMUTLBEvent event;

        while (size > len) {
            size >>= 1;
        }
        event.type = type;
        event.entry = (IOMMUTLBEntry) {
            .target_as = &address_space_memory,
            .iova = iova,
            .translated_addr = type == IOMMU_NOTIFIER_MAP ? gpa : 0,
            .addr_mask = size - 1,
            .perm = type == IOMMU_NOTIFIER_MAP ? perm : IOMMU_NONE,
        };
        fn(iommu_mr, n, &event);
        iova += size;
        gpa += size;
        len -= size;
    }
}

static void pvdma_notify_all(IOMMUMemoryRegion *iommu_mr, IOMMUNotifier *n,
                             IOMMUTLBEvent *event)
{
    memory_region_notify_iommu(iommu_mr, 0, *event);
}

static void pvdma_notify_one(IOMMUMemoryRegion *iommu_mr, IOMMUNotifier *n,
                             IOMMUTLBEvent *event)
{
    memory_region_notify_iommu_one(n, event);
}

/*
 * The library's notification: after a MAP is in the table, before an
 * UNMAP (DETACH, reset, ...) returns. It runs under the BQL, as every
 * call that changes the library's state is made under it.
 */
static void pvdma_notify_event(void *opaque,
                               const struct pvdma_map_event *ev)
{
    PvdmaState *s = opaque;
    PvdmaEndpoint *ep = g_hash_table_lookup(s->by_rid,
                                            GUINT_TO_POINTER(ev->requester));
    IOMMUMemoryRegion *iommu_mr;

    trace_pvdma_map_event(ev->kind == PVDMA_EVENT_MAP ? "map" : "unmap",
                          ev->requester, ev->iova, ev->len, ev->gpa,
                          ev->perms);
    if (!ep || !ep->notifier_flags) {
        return;
    }
    iommu_mr = &ep->iommu_mr;
    if (ev->kind == PVDMA_EVENT_MAP) {
        pvdma_for_each_piece(iommu_mr, NULL, IOMMU_NOTIFIER_MAP, ev->iova,
                             ev->gpa, ev->len, ev->perms & IOMMU_RW,
                             pvdma_notify_all);
        return;
    }
    pvdma_for_each_piece(iommu_mr, NULL, IOMMU_NOTIFIER_UNMAP, ev->iova,
                         ev->gpa, ev->len, IOMMU_NONE, pvdma_notify_all);
    if (ep->notifier_flags & IOMMU_NOTIFIER_DEVIOTLB_UNMAP) {
        pvdma_for_each_piece(iommu_mr, NULL, IOMMU_NOTIFIER_DEVIOTLB_UNMAP,
                             ev->iova, ev->gpa, ev->len, IOMMU_NONE,
                             pvdma_notify_all);
    }
}

/* Tell a new notifier about every translation the endpoint has. */
static void pvdma_replay(IOMMUMemoryRegion *iommu_mr, IOMMUNotifier *n)
{
    PvdmaEndpoint *ep = container_of(iommu_mr, PvdmaEndpoint, iommu_mr);
    PvdmaState *s = ep->s;
    uint32_t rid = ep->rid;
    g_autofree struct pvdma_mapping_info *maps = NULL;
    size_t count, i;

    if (rid == PVDMA_RID_NONE) {
        return;
    }
    count = pvdma_vm_mappings(s->vm, rid, NULL, 0);
    maps = g_new0(struct pvdma_mapping_info, count);
    count = MIN(count, pvdma_vm_mappings(s->vm, rid, maps, count));
    trace_pvdma_replay(rid, count);

    for (i = 0; i < count; i++) {
        uint64_t addr = QEMU_ALIGN_DOWN(maps[i].iova, PVDMA_PAGE_SIZE);
        uint64_t end = QEMU_ALIGN_UP(maps[i].iova + maps[i].length,
                                     PVDMA_PAGE_SIZE);

        while (addr < end) {
            struct pvdma_lookup lookup;
            uint64_t len;

            if (pvdma_vm_lookup(s->vm, rid, addr, 0, &lookup) != PVDMA_OK ||
                (lookup.flags & PVDMA_LOOKUP_BYPASS)) {
                addr += PVDMA_PAGE_SIZE;
                continue;
            }
            len = QEMU_ALIGN_DOWN(MIN(lookup.run, end - addr),
                                  PVDMA_PAGE_SIZE);
            len = MAX(len, PVDMA_PAGE_SIZE);
            pvdma_for_each_piece(iommu_mr, n, IOMMU_NOTIFIER_MAP, addr,
                                 lookup.gpa, len, lookup.perms & IOMMU_RW,
                                 pvdma_notify_one);
            addr += len;
        }
    }
}

static int pvdma_notify_flag_changed(IOMMUMemoryRegion *iommu_mr,
                                     IOMMUNotifierFlag old,
                                     IOMMUNotifierFlag new, Error **errp)
{
    PvdmaEndpoint *ep = container_of(iommu_mr, PvdmaEndpoint, iommu_mr);

    trace_pvdma_notify_flag_changed(
        memory_region_name(MEMORY_REGION(iommu_mr)), old, new);
    ep->notifier_flags = new;
    return 0;
}
/* @series-end notify */

/* @series-begin hypercall */
/*
 * The hypercall transport
 *
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
static bool pvdma_hypercall_check(PvdmaState *s, Error **errp)
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
/* @series-end hypercall */

/* Device life cycle */

static bool pvdma_check_properties(PvdmaState *s, uint32_t *pin_mode,
                                   Error **errp)
{
    if (s->iova_bits < PVDMA_IOVA_BITS_MIN ||
        s->iova_bits > PVDMA_IOVA_BITS_MAX) {
        error_setg(errp, "pvdma: iova-bits must be %d..%d, not %u",
                   PVDMA_IOVA_BITS_MIN, PVDMA_IOVA_BITS_MAX, s->iova_bits);
        return false;
    }
    if (s->max_segs < PVDMA_MIN_MAX_SEGS ||
        s->max_segs > PVDMA_MAX_SEGS_MAX) {
        error_setg(errp, "pvdma: max-segs must be %u..%u, not %u",
                   PVDMA_MIN_MAX_SEGS, PVDMA_MAX_SEGS_MAX, s->max_segs);
        return false;
    }
    if (!s->pin_mode || !strcmp(s->pin_mode, "none")) {
        *pin_mode = PVDMA_PIN_NONE;
    } else if (!strcmp(s->pin_mode, "mlock")) {
        *pin_mode = PVDMA_PIN_MLOCK;
    } else {
        error_setg(errp, "pvdma: pin-mode must be 'none' or 'mlock', not '%s'",
                   s->pin_mode);
        return false;
    }
/* @series-until hypercall */
    if (s->hypercall == ON_OFF_AUTO_ON) {
        error_setg(errp, "pvdma: the hypercall transport is not supported yet");
        error_append_hint(errp, "Use hypercall=auto or hypercall=off; "
                          "guests then use the DOORBELL register.\n");
        return false;
    }
/* @series-end hypercall */
/* @series-begin hypercall */
    if (!pvdma_hypercall_check(s, errp)) {
        return false;
    }
/* @series-end hypercall */
    return true;
}

/* @series-begin iommu */
static bool pvdma_check_bus(PvdmaState *s, Error **errp)
{
    PCIBus *bus = pci_get_bus(PCI_DEVICE(s));
    int devfn;

    if (!pci_bus_is_root(bus)) {
        error_setg(errp, "pvdma: must sit on a PCI root bus, not on %s",
                   pvdma_bus_name(bus));
        return false;
    }
    if (bus->iommu_ops) {
        error_setg(errp, "pvdma: PCI bus %s already has an IOMMU",
                   pvdma_bus_name(bus));
        return false;
    }
    /*
     * Emulated functions look up their DMA address space when the machine
     * is complete, so their order on the command line does not matter.
     * Assigned host devices look it up when they are created: one that
     * came first would DMA past pvdma, untranslated.
     */
    for (devfn = 0; devfn < PCI_DEVFN_MAX; devfn++) {
        PCIDevice *dev = bus->devices[devfn];

        if (dev && object_dynamic_cast(OBJECT(dev), "vfio-pci")) {
            error_setg(errp, "pvdma: -device pvdma must come before the "
                       "assigned device %s (%02x.%x) on the command line",
                       dev->name, PCI_SLOT(devfn), PCI_FUNC(devfn));
            return false;
        }
    }
    return true;
}
/* @series-end iommu */

static void pvdma_realize(PCIDevice *pdev, Error **errp)
{
    PvdmaState *s = PVDMA(pdev);
    pvdma_config cfg;
    uint32_t pin_mode;
    pvdma_result r;

    if (!pvdma_check_properties(s, &pin_mode, errp)) {
        return;
    }
/* @series-begin iommu */
    if (!pvdma_check_bus(s, errp)) {
        return;
    }
/* @series-end iommu */

    pvdma_config_default(&cfg);
    cfg.iova_bits = s->iova_bits;
    cfg.max_segs = s->max_segs;
    cfg.pin_limit = s->pin_limit ? s->pin_limit : UINT64_MAX;
    cfg.mem_limit = s->mem_limit ? s->mem_limit : UINT64_MAX;
    cfg.pin_mode = pin_mode;
    cfg.bypass = s->bypass;
    cfg.unmap_list = s->unmap_list;
    r = pvdma_vm_new(&cfg, &s->vm);
    if (r != PVDMA_OK) {
        error_setg(errp, "pvdma: cannot create the remapping state: %s",
                   pvdma_strerror(r));
        return;
    }

    /*
     * Mapped guest pages are pinned for the mapping's life: an assigned
     * device may DMA to them at any time. Discarding guest RAM (balloon
     * inflation, virtio-mem unplug, ...) would pull pages out from under
     * such mappings, so pvdma refuses it for the whole VM, as vfio does.
     */
    if (ram_block_discard_disable(true)) {
        error_setg(errp, "pvdma: cannot disable discarding of guest RAM, "
                   "which a device present (e.g. virtio-mem) requires");
        pvdma_vm_free(s->vm);
        s->vm = NULL;
        return;
    }
    s->discard_disabled = true;

    pdev->config[PCI_INTERRUPT_PIN] = 0;
    memory_region_init_io(&s->mmio, OBJECT(s), &pvdma_mmio_ops, s,
                          "pvdma-mmio", PVDMA_BAR0_SIZE);
    pci_register_bar(pdev, 0, PCI_BASE_ADDRESS_SPACE_MEMORY |
                     PCI_BASE_ADDRESS_MEM_TYPE_32, &s->mmio);

    s->ram_listener = (MemoryListener) {
        .name = "pvdma-ram",
        .region_add = pvdma_ram_add,
        .region_del = pvdma_ram_del,
        .priority = MEMORY_LISTENER_PRIORITY_MIN,
    };
    memory_listener_register(&s->ram_listener, &address_space_memory);

/* @series-begin iommu */
    s->buses = g_hash_table_new_full(g_direct_hash, g_direct_equal,
                                     NULL, g_free);
    s->by_rid = g_hash_table_new(g_direct_hash, g_direct_equal);
/* @series-end iommu */
/* @series-begin notify */
    pvdma_vm_set_notifier(s->vm, pvdma_notify_event, s);
/* @series-end notify */
/* @series-begin iommu */
    pci_setup_iommu(pci_get_bus(pdev), &pvdma_iommu_ops, s);
/* @series-end iommu */
/* @series-begin hypercall */
    if (s->hypercall_live) {
        QTAILQ_INSERT_TAIL(&pvdma_hypercall_devs, s, hypercall_next);
    }
/* @series-end hypercall */
}

static void pvdma_exit(PCIDevice *pdev)
{
    PvdmaState *s = PVDMA(pdev);

    /* pvdma is not hot-pluggable: this only runs when QEMU exits */
    if (!s->vm) {
        return;
    }
/* @series-begin hypercall */
    if (s->hypercall_live) {
        QTAILQ_REMOVE(&pvdma_hypercall_devs, s, hypercall_next);
        s->hypercall_live = false;
    }
/* @series-end hypercall */
    memory_listener_unregister(&s->ram_listener);
    pvdma_vm_set_notifier(s->vm, NULL, NULL);
    pvdma_vm_free(s->vm);
    s->vm = NULL;
    if (s->discard_disabled) {
        ram_block_discard_disable(false);
        s->discard_disabled = false;
    }
}

static void pvdma_reset(DeviceState *dev)
{
    PvdmaState *s = PVDMA(dev);

    trace_pvdma_reset();
    /* Detaches every endpoint: mappings removed, pins released */
    pvdma_vm_reset(s->vm);
    s->last_status = 0;
    s->doorbell_lo = 0;
/* @series-begin iommu */
    qatomic_set(&s->faults_logged, 0);
    pvdma_sync_endpoints(s);
    pvdma_sync_attached(s);
/* @series-end iommu */
}

/* @series-begin migration */
/*
 * Migration. The library's state names endpoints by requester ID; those
 * are bus numbers the guest programmed into bridges, whose config space
 * arrives after pvdma's (MIG_PRI_IOMMU). So the source also sends which
 * bus and devfn each registered ID belongs to, and the destination
 * registers exactly those before it loads the library state.
 */
static int pvdma_pre_save(void *opaque)
{
    PvdmaState *s = opaque;
    GString *eps = g_string_new(NULL);
    GHashTableIter iter;
    PvdmaEndpoint *ep;
    size_t needed = 0;
    pvdma_result r;

    g_free(s->mig_state);
    s->mig_state = NULL;
    do {
        r = pvdma_vm_state_save(s->vm, s->mig_state, s->mig_state_len,
                                &needed);
        if (r == PVDMA_ERR_BUFFER_TOO_SMALL) {
            g_free(s->mig_state);
            s->mig_state = g_malloc(needed);
            s->mig_state_len = needed;
        }
    } while (r == PVDMA_ERR_BUFFER_TOO_SMALL);
    if (r != PVDMA_OK || needed > UINT32_MAX) {
        error_report("pvdma: cannot save the remapping state: %s",
                     pvdma_strerror(r));
        g_string_free(eps, true);
        return -EINVAL;
    }
    s->mig_state_len = needed;

    g_hash_table_iter_init(&iter, s->by_rid);
    while (g_hash_table_iter_next(&iter, NULL, (void **)&ep)) {
        g_string_append_printf(eps, "%s %u %u\n", pvdma_bus_name(ep->bus),
                               ep->devfn, ep->rid);
    }
    g_free(s->mig_endpoints);
    s->mig_endpoints_len = eps->len + 1;
    s->mig_endpoints = g_string_free(eps, false);
    trace_pvdma_migration("save", s->mig_state_len,
                          g_hash_table_size(s->by_rid));
    return 0;
}

static int pvdma_post_save(void *opaque)
{
    PvdmaState *s = opaque;

    g_free(s->mig_state);
    s->mig_state = NULL;
    s->mig_state_len = 0;
    g_free(s->mig_endpoints);
    s->mig_endpoints = NULL;
    s->mig_endpoints_len = 0;
    return 0;
}

static PvdmaEndpoint *pvdma_find_endpoint(PvdmaState *s, const char *bus_name,
                                          unsigned devfn)
{
    GHashTableIter iter;
    PvdmaBus *pbus;

    if (devfn >= PCI_DEVFN_MAX) {
        return NULL;
    }
    g_hash_table_iter_init(&iter, s->buses);
    while (g_hash_table_iter_next(&iter, NULL, (void **)&pbus)) {
        if (!strcmp(pvdma_bus_name(pbus->bus), bus_name)) {
            return pbus->ep[devfn];
        }
    }
    return NULL;
}

static bool pvdma_load_endpoints(PvdmaState *s, Error **errp)
{
    g_auto(GStrv) lines = NULL;
    GHashTableIter iter;
    PvdmaBus *pbus;
    int devfn;
    size_t i;

    if (!s->mig_endpoints_len ||
        s->mig_endpoints[s->mig_endpoints_len - 1] != '\0') {
        error_setg(errp, "pvdma: malformed endpoint table in the stream");
        return false;
    }
    /* Forget whatever this side registered: the source's IDs rule */
    g_hash_table_iter_init(&iter, s->buses);
    while (g_hash_table_iter_next(&iter, NULL, (void **)&pbus)) {
        for (devfn = 0; devfn < PCI_DEVFN_MAX; devfn++) {
            if (pbus->ep[devfn]) {
                pvdma_ep_unregister(pbus->ep[devfn]);
            }
        }
    }
    lines = g_strsplit(s->mig_endpoints, "\n", -1);
    for (i = 0; lines[i]; i++) {
        char bus_name[64];
        unsigned dfn, rid;
        PvdmaEndpoint *ep;

        if (!*lines[i]) {
            continue;
        }
        if (sscanf(lines[i], "%63s %u %u", bus_name, &dfn, &rid) != 3 ||
            rid > UINT16_MAX) {
            error_setg(errp, "pvdma: malformed endpoint '%s' in the stream",
                       lines[i]);
            return false;
        }
        ep = pvdma_find_endpoint(s, bus_name, dfn);
        if (!ep) {
            error_setg(errp, "pvdma: the source translated for %s %02x.%x, "
                       "which has no function here", bus_name,
                       PCI_SLOT(dfn), PCI_FUNC(dfn));
            return false;
        }
        if (!pvdma_ep_register(ep, rid)) {
            error_setg(errp, "pvdma: cannot register requester "
                       "%02x:%02x.%x", PCI_BUS_NUM(rid), PCI_SLOT(rid),
                       PCI_FUNC(rid));
            return false;
        }
    }
    return true;
}

static bool pvdma_post_load(void *opaque, int version_id, Error **errp)
{
    PvdmaState *s = opaque;
    pvdma_result r;
    bool ok = false;

    if (s->last_status > PVDMA_S_STATE && s->last_status != PVDMA_S_INTERNAL) {
        error_setg(errp, "pvdma: invalid LAST_STATUS %u in the stream",
                   s->last_status);
        goto out;
    }
    if (!pvdma_load_endpoints(s, errp)) {
        goto out;
    }
    r = pvdma_vm_state_load(s->vm, s->mig_state, s->mig_state_len);
    if (r != PVDMA_OK) {
        error_setg(errp, "pvdma: the remapping state was refused: %s "
                   "(different iova-bits, max-segs, pin-limit, mem-limit, "
                   "bypass or guest RAM layout than the source?)",
                   pvdma_strerror(r));
        goto out;
    }
    trace_pvdma_migration("load", s->mig_state_len,
                          g_hash_table_size(s->by_rid));
    ok = true;
out:
    /* Endpoints follow the library, loaded or (on refusal) reset */
    pvdma_sync_attached(s);
    pvdma_post_save(s);
    return ok;
}

static const VMStateDescription vmstate_pvdma = {
    .name = "pvdma",
    .version_id = 1,
    .minimum_version_id = 1,
    .priority = MIG_PRI_IOMMU,
    .pre_save = pvdma_pre_save,
    .post_save = pvdma_post_save,
    .post_load_errp = pvdma_post_load,
    .fields = (const VMStateField[]) {
        VMSTATE_PCI_DEVICE(parent_obj, PvdmaState),
        VMSTATE_UINT32(last_status, PvdmaState),
        VMSTATE_UINT32(doorbell_lo, PvdmaState),
        VMSTATE_UINT32(mig_state_len, PvdmaState),
        VMSTATE_VBUFFER_ALLOC_UINT32(mig_state, PvdmaState, 0, NULL,
                                     mig_state_len),
        VMSTATE_UINT32(mig_endpoints_len, PvdmaState),
        VMSTATE_VBUFFER_ALLOC_UINT32(mig_endpoints, PvdmaState, 0, NULL,
                                     mig_endpoints_len),
        VMSTATE_END_OF_LIST()
    },
};
/* @series-end migration */
/* @series-until migration */

static const VMStateDescription vmstate_pvdma = {
    .name = "pvdma",
    .unmigratable = 1,
};
/* @series-end migration */

/* @series-begin qmp */
/* QMP query-pvdma and HMP info pvdma */

static char *pvdma_bdf_str(uint32_t rid)
{
    return g_strdup_printf("%02x:%02x.%x", PCI_BUS_NUM(rid), PCI_SLOT(rid),
                           PCI_FUNC(rid));
}

static const char *pvdma_access_name(uint32_t access)
{
    switch (access) {
    case PVDMA_ACCESS_READ:
        return "read";
    case PVDMA_ACCESS_WRITE:
        return "write";
    default:
        return "read-write";
    }
}

static PvdmaInfo *pvdma_query_one(PvdmaState *s)
{
    PvdmaInfo *info = g_new0(PvdmaInfo, 1);
    DeviceState *dev = DEVICE(s);
    struct pvdma_stats stats;
    struct pvdma_request_counts counts;
    size_t n, i;
    g_autofree struct pvdma_endpoint_info *eps = NULL;
    g_autofree struct pvdma_fault *faults = NULL;
    PvdmaEndpointInfoList **ep_tail = &info->endpoints;
    PvdmaFaultInfoList **fault_tail = &info->last_faults;

    pvdma_vm_stats(s->vm, &stats);
    pvdma_vm_request_counts(s->vm, &counts);
    info->path = object_get_canonical_path(OBJECT(s));
    if (dev->id) {
        info->id = g_strdup(dev->id);
    }
    info->features = pvdma_features(s);
    info->iova_bits = s->iova_bits;
    info->max_segs = s->max_segs;
    info->pin_limit = s->pin_limit;
    info->pin_mode = g_strdup(s->pin_mode ? s->pin_mode : "none");
    info->pinned_bytes = stats.pinned_pages * PVDMA_PAGE_SIZE;
    info->mem_limit = s->mem_limit;
    info->mem_used = stats.mem_used;
    info->mappings = stats.mappings;
    info->faults = pvdma_vm_fault_count(s->vm);
    info->last_status = s->last_status;
    info->requests = g_new0(PvdmaRequestCounts, 1);
    info->requests->query = counts.query;
    info->requests->attach = counts.attach;
    info->requests->detach = counts.detach;
    info->requests->map = counts.map;
    info->requests->unmap = counts.unmap;
    info->requests->unmap_list = counts.unmap_list;
    info->requests->other = counts.other;
    info->transports = g_new0(PvdmaTransportCounts, 1);
    info->transports->doorbell = counts.doorbell;
    info->transports->hypercall = counts.hypercall;

    n = pvdma_vm_endpoints(s->vm, NULL, 0);
    eps = g_new0(struct pvdma_endpoint_info, n);
    n = MIN(n, pvdma_vm_endpoints(s->vm, eps, n));
    for (i = 0; i < n; i++) {
        PvdmaEndpointInfo *e = g_new0(PvdmaEndpointInfo, 1);

        e->requester = pvdma_bdf_str(eps[i].requester);
        e->attached = eps[i].attached;
        e->passthrough = eps[i].passthrough;
        e->mappings = eps[i].mappings;
        e->mapped_bytes = eps[i].mapped_bytes;
        QAPI_LIST_APPEND(ep_tail, e);
    }

    n = pvdma_vm_faults(s->vm, NULL, 0);
    faults = g_new0(struct pvdma_fault, n);
    n = MIN(n, pvdma_vm_faults(s->vm, faults, n));
    for (i = 0; i < n; i++) {
        PvdmaFaultInfo *f = g_new0(PvdmaFaultInfo, 1);

        f->requester = pvdma_bdf_str(faults[i].requester);
        f->access = g_strdup(pvdma_access_name(faults[i].access));
        f->reason = g_strdup(pvdma_fault_reason_name(faults[i].reason));
        f->iova = faults[i].iova;
        f->seq = faults[i].seq;
        QAPI_LIST_APPEND(fault_tail, f);
    }
    return info;
}

static int pvdma_query_each(Object *obj, void *opaque)
{
    PvdmaInfoList ***tail = opaque;
    PvdmaState *s = (PvdmaState *)object_dynamic_cast(obj, TYPE_PVDMA);

    if (s && s->vm) {
        QAPI_LIST_APPEND(*tail, pvdma_query_one(s));
    }
    return 0;
}

PvdmaInfoList *qmp_query_pvdma(Error **errp)
{
    PvdmaInfoList *list = NULL, **tail = &list;

    object_child_foreach_recursive(object_get_root(), pvdma_query_each,
                                   &tail);
    return list;
}

void hmp_info_pvdma(Monitor *mon, const QDict *qdict)
{
    g_autoptr(PvdmaInfoList) list = qmp_query_pvdma(NULL);
    PvdmaInfoList *l;

    if (!list) {
        monitor_printf(mon, "No pvdma device\n");
        return;
    }
    for (l = list; l; l = l->next) {
        PvdmaInfo *d = l->value;
        PvdmaEndpointInfoList *e;
        PvdmaFaultInfoList *f;

        monitor_printf(mon, "pvdma %s%s%s%s\n", d->path,
                       d->id ? " (id " : "", d->id ? d->id : "",
                       d->id ? ")" : "");
        monitor_printf(mon, "  features 0x%" PRIx64 ", iova-bits %" PRId64
                       ", max-segs %" PRId64 ", last status %" PRId64 "\n",
                       d->features, d->iova_bits, d->max_segs,
                       d->last_status);
        monitor_printf(mon, "  pin-mode %s, pin-limit %" PRIu64
                       "%s, pinned %" PRIu64 " bytes, mappings %" PRIu64
                       ", faults %" PRIu64 "\n", d->pin_mode, d->pin_limit,
                       d->pin_limit ? "" : " (unlimited)", d->pinned_bytes,
                       d->mappings, d->faults);
        monitor_printf(mon, "  mem-limit %" PRIu64 "%s, mapping memory %"
                       PRIu64 " bytes\n", d->mem_limit,
                       d->mem_limit ? "" : " (unlimited)", d->mem_used);
        monitor_printf(mon, "  requests: query %" PRIu64 ", attach %" PRIu64
                       ", detach %" PRIu64 ", map %" PRIu64 ", unmap %"
                       PRIu64 ", unmap-list %" PRIu64 ", other %" PRIu64
                       "\n", d->requests->query, d->requests->attach,
                       d->requests->detach, d->requests->map,
                       d->requests->unmap, d->requests->unmap_list,
                       d->requests->other);
        monitor_printf(mon, "  transports: doorbell %" PRIu64
                       ", hypercall %" PRIu64 "\n",
                       d->transports->doorbell, d->transports->hypercall);
        for (e = d->endpoints; e; e = e->next) {
            monitor_printf(mon, "  endpoint %s: %s%s, %" PRIu64
                           " mappings, %" PRIu64 " bytes mapped\n",
                           e->value->requester,
                           e->value->attached ? "attached" : "detached",
                           e->value->passthrough ? ", passthrough" : "",
                           e->value->mappings, e->value->mapped_bytes);
        }
        for (f = d->last_faults; f; f = f->next) {
            monitor_printf(mon, "  fault #%" PRIu64 ": %s %s at IOVA 0x%"
                           PRIx64 " refused: %s\n", f->value->seq,
                           f->value->requester, f->value->access,
                           f->value->iova, f->value->reason);
        }
    }
}
/* @series-end qmp */

static const Property pvdma_properties[] = {
    DEFINE_PROP_SIZE("pin-limit", PvdmaState, pin_limit, 0),
    DEFINE_PROP_SIZE("mem-limit", PvdmaState, mem_limit, 256 * MiB),
    DEFINE_PROP_STRING("pin-mode", PvdmaState, pin_mode),
    DEFINE_PROP_UINT32("iova-bits", PvdmaState, iova_bits, 48),
    DEFINE_PROP_UINT32("max-segs", PvdmaState, max_segs, 512),
    DEFINE_PROP_BOOL("bypass", PvdmaState, bypass, true),
    DEFINE_PROP_BOOL("unmap-list", PvdmaState, unmap_list, true),
    DEFINE_PROP_ON_OFF_AUTO("hypercall", PvdmaState, hypercall,
                            ON_OFF_AUTO_AUTO),
};

static void pvdma_class_init(ObjectClass *klass, const void *data)
{
    DeviceClass *dc = DEVICE_CLASS(klass);
    PCIDeviceClass *k = PCI_DEVICE_CLASS(klass);

    k->realize = pvdma_realize;
    k->exit = pvdma_exit;
    k->vendor_id = PCI_VENDOR_ID_REDHAT;
    k->device_id = PCI_DEVICE_ID_REDHAT_PVDMA;
    k->revision = PVDMA_PCI_REVISION;
    k->class_id = PVDMA_PCI_CLASS_SYSTEM_IOMMU;
    dc->desc = "pvdma paravirtual DMA remapping";
    dc->vmsd = &vmstate_pvdma;
    /* It must exist before the functions whose DMA it translates */
    dc->hotpluggable = false;
    set_bit(DEVICE_CATEGORY_MISC, dc->categories);
    device_class_set_legacy_reset(dc, pvdma_reset);
    device_class_set_props(dc, pvdma_properties);

    object_class_property_set_description(klass, "pin-limit",
        "Most guest RAM that mappings may pin, in bytes (0: no limit). "
        "MAP requests past it fail with QUOTA");
    object_class_property_set_description(klass, "mem-limit",
        "Most host memory the mappings' page tables and records may take, "
        "in bytes (0: no limit). MAP requests past it fail with QUOTA");
    object_class_property_set_description(klass, "pin-mode",
        "none: pins are only counted; mlock: pinned pages are also "
        "mlock()ed (subject to RLIMIT_MEMLOCK)");
    object_class_property_set_description(klass, "iova-bits",
        "Width of each endpoint's IOVA space, 21..57 (IOVA_BITS register)");
    object_class_property_set_description(klass, "max-segs",
        "Most segments one MAP request may carry, 252..65536 "
        "(MAX_SEGS register)");
    object_class_property_set_description(klass, "bypass",
        "Whether endpoints that are not attached DMA untranslated (on) "
        "or are blocked (off)");
    object_class_property_set_description(klass, "unmap-list",
        "Whether the UNMAP_LIST extension is offered (FEATURES bit 3): "
        "one request unmaps a list of IOVA ranges. Off hides it, and "
        "op 6 is then an unknown op (INVAL)");
/* @series-until hypercall */
    object_class_property_set_description(klass, "hypercall",
        "The hypercall transport: not supported yet, so 'auto' means "
        "off and 'on' is an error");
/* @series-end hypercall */
/* @series-begin hypercall */
/* @series-until kvm */
    object_class_property_set_description(klass, "hypercall",
        "The VMCALL/VMMCALL transport (FEATURES.HYPERCALL): 'auto' makes "
        "it live under TCG; under KVM it is not supported yet");
/* @series-end kvm */
/* @series-begin kvm */
    object_class_property_set_description(klass, "hypercall",
        "The VMCALL/VMMCALL transport (FEATURES.HYPERCALL): 'auto' makes "
        "it live under TCG, and under KVM when the host kernel forwards "
        "it (the pvdma KVM patch); 'on' fails where it cannot be live");
/* @series-end kvm */
/* @series-end hypercall */
}

/* @series-begin iommu */
static void pvdma_iommu_memory_region_class_init(ObjectClass *klass,
                                                 const void *data)
{
    IOMMUMemoryRegionClass *imrc = IOMMU_MEMORY_REGION_CLASS(klass);

    imrc->translate = pvdma_translate;
/* @series-end iommu */
/* @series-begin notify */
    imrc->replay = pvdma_replay;
    imrc->notify_flag_changed = pvdma_notify_flag_changed;
/* @series-end notify */
/* @series-begin iommu */
}
/* @series-end iommu */

static const TypeInfo pvdma_types[] = {
    {
        .name = TYPE_PVDMA,
        .parent = TYPE_PCI_DEVICE,
        .instance_size = sizeof(PvdmaState),
        .class_init = pvdma_class_init,
        .interfaces = (const InterfaceInfo[]) {
            { INTERFACE_CONVENTIONAL_PCI_DEVICE },
            { },
        },
/* @series-begin iommu */
    }, {
        .name = TYPE_PVDMA_IOMMU_MEMORY_REGION,
        .parent = TYPE_IOMMU_MEMORY_REGION,
        .class_init = pvdma_iommu_memory_region_class_init,
/* @series-end iommu */
    },
};

DEFINE_TYPES(pvdma_types)
