/*
 * pvdma: the IOMMU side of the device
 *
 * pvdma is the IOMMU of its PCI root bus. Every other function on the
 * bus, and below it, is an endpoint with its own address space, which
 * switches between bypass (or blocked) and an IOMMU memory region whose
 * translate looks the IOVA up in libpvdma. Endpoints are keyed by bus and
 * devfn, and registered with the library under the requester IDs the
 * guest's bus numbering gives them.
/* @series-begin notify */
 * IOMMU notifiers (vfio, vhost) hear about every mapping change, and
 * replay tells a new one about the mappings there are.
/* @series-end notify */
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/log.h"
#include "qemu/units.h"
#include "qapi/error.h"
#include "hw/pci/pci_bus.h"
#include "system/address-spaces.h"
#include "trace.h"
#include "pvdma-internal.h"

/*
 * The x86 MSI window. Message writes from endpoints are interrupts, not
 * memory accesses, and bypass translation as they do with VT-d's interrupt
 * remapping region; IOVAs in it cannot reach memory.
 */
#define PVDMA_MSI_BASE 0xfee00000ULL
#define PVDMA_MSI_SIZE (1 * MiB)

/* Refused DMA accesses logged per reset before the log goes quiet. */
#define PVDMA_FAULT_LOG_BURST 16

/* Endpoints and their address spaces */

const char *pvdma_bus_name(PCIBus *bus)
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

void pvdma_ep_unregister(PvdmaEndpoint *ep)
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

bool pvdma_ep_register(PvdmaEndpoint *ep, uint32_t rid)
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
void pvdma_sync_endpoints(PvdmaState *s)
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
void pvdma_sync_attached(PvdmaState *s)
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
void pvdma_sync_attached_after_request(PvdmaState *s)
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

/*
 * A PCI function was unplugged (called after it is unrealized and gone
 * from its bus): its endpoint's requester ID, attach state and mappings
 * go now, not at the guest's next request. Otherwise pvdma keeps their
 * pins, and a function plugged into the same slot before that request
 * would start attached with them (VFIO would replay them into its
 * container).
 */
static void pvdma_device_unrealize(DeviceListener *listener, DeviceState *dev)
{
    PvdmaState *s = container_of(listener, PvdmaState, dev_listener);

    if (s->vm && dev != DEVICE(s) &&
        object_dynamic_cast(OBJECT(dev), TYPE_PCI_DEVICE)) {
        pvdma_sync_endpoints(s);
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
/* @series-begin queue */
/*
 * An access the library would refuse for want of a mapping or permission
 * first applies the guest's request queues and is looked up again, inside
 * pvdma_vm_lookup(): only a second refusal comes back here as one. That
 * drain may notify (and take the BQL for it, see pvdma.c); a lookup that
 * finds its mapping never touches the queues.
 */
/* @series-end queue */

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
/* @series-begin iotlb-leaf */

/*
 * The largest IOTLB entry a translation returns: the largest leaf of the
 * library's table (a 2 MiB block).
 */
#define PVDMA_IOTLB_MAX (2 * MiB)
/*
 * The largest entry joined from several leaves: 4 KiB pages that follow
 * each other in guest-physical space with the same permissions.
 */
#define PVDMA_IOTLB_JOIN (64 * KiB)
/*
 * Notifiers that hear of removals. With none registered nothing keeps
 * translate's entries (QEMU's DMA path asks again for every access), so
 * an entry may be joined across neighbouring mappings.
 */
#define PVDMA_REMOVAL_NOTIFIERS \
    (IOMMU_NOTIFIER_UNMAP | IOMMU_NOTIFIER_DEVIOTLB_UNMAP)

/*
 * Where this thread's last translation (of a table leaf, not bypass)
 * ended. A translation that starts there is a DMA going on page by page:
 * worth joining pages for. Only read and written inside
 * pvdma_translate(), which never yields.
 */
static __thread struct {
    PvdmaEndpoint *ep;
    hwaddr next;
} pvdma_last_translation;

/*
 * The addr_mask of the table leaf holding @iova, which the library found
 * in @found: @found->run reaches the end of the leaf, a 4 KiB page or a
 * 2 MiB block that one mapping covers, aligned in both spaces.
 */
static hwaddr pvdma_leaf_mask(hwaddr iova, const struct pvdma_lookup *found)
{
    hwaddr in_page = iova & (PVDMA_PAGE_SIZE - 1);
    uint64_t align = (iova - in_page) | (found->gpa - in_page);
    uint64_t size = align ? 1ULL << ctz64(align) : PVDMA_IOTLB_MAX;

    size = MIN(size, PVDMA_IOTLB_MAX);
    size = MIN(size, pow2floor(in_page + found->run));
    return MAX(size, PVDMA_PAGE_SIZE) - 1;
}

/*
 * The addr_mask of the largest naturally aligned block, up to
 * PVDMA_IOTLB_JOIN, that holds @iova's page and whose pages all follow
 * on from it in guest-physical space (@found) with the same permissions.
 * The other pages are looked at (not counted, no fault), and a page that
 * does not follow on halves the block until it is out.
 */
static hwaddr pvdma_join_mask(PvdmaState *s, uint32_t rid, hwaddr iova,
                              const struct pvdma_lookup *found)
{
    hwaddr in_page = iova & (PVDMA_PAGE_SIZE - 1);
    uint64_t page = iova - in_page;
    uint64_t delta = found->gpa - in_page - page;
    uint64_t size = delta ? 1ULL << ctz64(delta) : PVDMA_IOTLB_JOIN;
    uint64_t q;

    size = MIN(size, PVDMA_IOTLB_JOIN);
    for (q = page & ~(size - 1); size > PVDMA_PAGE_SIZE &&
         q < (page & ~(size - 1)) + size; q += PVDMA_PAGE_SIZE) {
        struct pvdma_lookup l;

        if (q == page) {
            continue;
        }
        if (pvdma_vm_lookup(s->vm, rid, q, 0, &l) == PVDMA_OK &&
            !(l.flags & PVDMA_LOOKUP_BYPASS) && l.gpa == q + delta &&
            l.perms == found->perms) {
            continue;
        }
        while (size > PVDMA_PAGE_SIZE && !((q ^ page) & ~(size - 1))) {
            size >>= 1;
        }
        /* Start over in the smaller block (its pages mostly cached now) */
        q = (page & ~(size - 1)) - PVDMA_PAGE_SIZE;
    }
    return size - 1;
}

/*
 * The addr_mask of the IOTLB entry for @iova of @ep: QEMU's DMA path
 * clamps each access to the entry it gets, so a transfer translates once
 * per entry rather than once per 4 KiB page.
 *
 * The first translation of a transfer gets the leaf: nothing more to
 * look up, so a 4 KiB DMA costs what it did. One that starts where this
 * thread's last one ended is a transfer crossing into its next page:
 * that one joins the pages around it (pvdma_join_mask()), so a 64 KiB
 * DMA through 4 KiB leaves translates twice rather than 16 times.
 *
 * A leaf lies inside one mapping, and so inside one of the naturally
 * aligned pieces in which its removal is announced. A joined entry may
 * span neighbouring mappings, whose removals are announced separately:
 * a notifier that caches entries (vhost's device IOTLB) would keep part
 * of it after one of them is gone, and announcing every removal's wider
 * span instead would make it drop live neighbours' translations on every
 * UNMAP (a vhost-user backend then misses the same page over and over
 * under a stream of strict UNMAPs). So pages are joined only while no
 * notifier listens for removals on the endpoint: QEMU's own device
 * models, which cache nothing.
 */
static hwaddr pvdma_iotlb_mask(PvdmaEndpoint *ep, uint32_t rid, hwaddr iova,
                               const struct pvdma_lookup *found)
{
    hwaddr in_page = iova & (PVDMA_PAGE_SIZE - 1);
    hwaddr mask = PVDMA_PAGE_SIZE - 1;

    /* Only a 2 MiB leaf runs past the page: skip the sums for the rest */
    if (found->run > PVDMA_PAGE_SIZE - in_page) {
        mask = pvdma_leaf_mask(iova, found);
    }
    if (mask == PVDMA_PAGE_SIZE - 1 && pvdma_last_translation.ep == ep &&
        pvdma_last_translation.next == iova - in_page &&
        !(qatomic_read(&ep->notifier_flags) & PVDMA_REMOVAL_NOTIFIERS)) {
        mask = pvdma_join_mask(ep->s, rid, iova, found);
    }
    pvdma_last_translation.ep = ep;
    pvdma_last_translation.next = (iova | mask) + 1;
    return mask;
}
/* @series-end iotlb-leaf */

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
/* @series-until iotlb-leaf */
        entry.translated_addr = lookup.gpa & ~(hwaddr)(PVDMA_PAGE_SIZE - 1);
/* @series-end iotlb-leaf */
/* @series-begin iotlb-leaf */
        entry.addr_mask = pvdma_iotlb_mask(ep, rid, addr, &lookup);
        entry.iova = addr & ~entry.addr_mask;
        entry.translated_addr = lookup.gpa & ~entry.addr_mask;
/* @series-end iotlb-leaf */
        entry.perm = lookup.perms & IOMMU_RW;
    }
    trace_pvdma_translate(rid, addr, entry.translated_addr, entry.perm);
    return entry;
}
/* @series-begin notify */

/* Notifiers: vfio and vhost keep shadow mappings of the translations */

typedef void PvdmaEventFn(IOMMUMemoryRegion *iommu_mr, IOMMUNotifier *n,
                          IOMMUTLBEvent *event);

/*
 * An IOTLB entry covers a naturally aligned power of two, so a run of
 * @len bytes at @iova (to @gpa) goes out as the fewest such pieces.
/* @series-begin vfio-quota */
 * A MAP stops at the first piece a notifier could not carry out.
/* @series-end vfio-quota */
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
/* @series-begin vfio-quota */
        if (container_of(iommu_mr, PvdmaEndpoint, iommu_mr)->map_error) {
            return;
        }
/* @series-end vfio-quota */
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
 * A MAP that does not allow writes reaches VFIO as a read-only DMA
 * mapping, for which the host kernel pins whatever backs each page at
 * that moment. A page the host never populated (the guest has not written
 * it since QEMU started) is the shared zero page then, and the guest's
 * later writes go to a new page the device never sees. Populate such
 * pages for write first: their contents stay what the guest sees.
 */
static void pvdma_populate_for_write(uint64_t gpa, uint64_t len)
{
#ifdef MADV_POPULATE_WRITE
    while (len) {
        MemoryRegionSection sec = memory_region_find(get_system_memory(),
                                                     gpa, len);
        uint64_t n;

        if (!sec.mr) {
            return;
        }
        n = int128_get64(sec.size);
        if (memory_region_is_ram(sec.mr) && !sec.mr->readonly &&
            !memory_region_is_ram_device(sec.mr) && n) {
            uint8_t *hva = memory_region_get_ram_ptr(sec.mr) +
                           sec.offset_within_region;

            /* best effort: on failure VFIO pins as it would have */
            (void)madvise(hva, n, MADV_POPULATE_WRITE);
        }
        memory_region_unref(sec.mr);
        if (!n) {
            return;
        }
        gpa += n;
        len -= n;
    }
#endif
}

/* @series-begin vfio-quota */
/*
 * A notifier could not carry out a MAP event it was sent: VFIO could not
 * map (and pin) the pages in the host IOMMU, most often because that
 * would pass the process's RLIMIT_MEMLOCK. The guest must not get OK for
 * it: the device's DMA would fault in the host IOMMU and its data would
 * be lost. Remember the error; pvdma_notify_event() then refuses the MAP.
 * Only while pvdma_notify_event() sends a MAP: during a replay (a notifier
 * registered while the endpoint has mappings, which the guest got OK for
 * long ago) there is nothing left to refuse.
 */
static void pvdma_map_failed(IOMMUMemoryRegion *iommu_mr, IOMMUNotifier *n,
                             const IOMMUTLBEntry *entry, int err)
{
    PvdmaEndpoint *ep = container_of(iommu_mr, PvdmaEndpoint, iommu_mr);

    trace_pvdma_map_failed(memory_region_name(MEMORY_REGION(iommu_mr)),
                           entry->iova, entry->addr_mask + 1, err);
    if (ep->map_pending && !ep->map_error) {
        ep->map_error = err ? err : -EIO;
    }
}

/* @series-end vfio-quota */
/*
 * The library's notification: after a MAP is in the table, before an
 * UNMAP (DETACH, reset, ...) returns. It runs under the BQL, as every
 * call that changes the library's state is made under it.
/* @series-begin vfio-quota */
 *
 * A MAP that a notifier could not carry out is refused (nonzero): the
 * library answers QUOTA, the status for "the host will not pin more", and
 * takes the mapping down again with UNMAP events, which make VFIO drop
 * the pieces it did map.
/* @series-end vfio-quota */
 */
static int pvdma_notify_event(void *opaque, const struct pvdma_map_event *ev)
{
    PvdmaState *s = opaque;
    PvdmaEndpoint *ep = g_hash_table_lookup(s->by_rid,
                                            GUINT_TO_POINTER(ev->requester));
    IOMMUMemoryRegion *iommu_mr;

    trace_pvdma_map_event(ev->kind == PVDMA_EVENT_MAP ? "map" : "unmap",
                          ev->requester, ev->iova, ev->len, ev->gpa,
                          ev->perms);
    if (!ep || !ep->notifier_flags) {
        return 0;
    }
    iommu_mr = &ep->iommu_mr;
    if (ev->kind == PVDMA_EVENT_MAP) {
        if (!(ev->perms & IOMMU_WO)) {
            pvdma_populate_for_write(ev->gpa, ev->len);
        }
/* @series-begin vfio-quota */
        ep->map_pending = true;
        ep->map_error = 0;
/* @series-end vfio-quota */
        pvdma_for_each_piece(iommu_mr, NULL, IOMMU_NOTIFIER_MAP, ev->iova,
                             ev->gpa, ev->len, ev->perms & IOMMU_RW,
                             pvdma_notify_all);
/* @series-begin vfio-quota */
        ep->map_pending = false;
        if (ep->map_error) {
            trace_pvdma_map_refused(ev->requester, ev->iova, ev->len,
                                    ep->map_error);
            ep->map_error = 0;
            return 1;
        }
/* @series-end vfio-quota */
        return 0;
    }
    pvdma_for_each_piece(iommu_mr, NULL, IOMMU_NOTIFIER_UNMAP, ev->iova,
                         ev->gpa, ev->len, IOMMU_NONE, pvdma_notify_all);
    if (ep->notifier_flags & IOMMU_NOTIFIER_DEVIOTLB_UNMAP) {
        pvdma_for_each_piece(iommu_mr, NULL, IOMMU_NOTIFIER_DEVIOTLB_UNMAP,
                             ev->iova, ev->gpa, ev->len, IOMMU_NONE,
                             pvdma_notify_all);
    }
    return 0;
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

/* Life cycle */

bool pvdma_iommu_check_bus(PvdmaState *s, Error **errp)
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

void pvdma_iommu_setup(PvdmaState *s)
{
    s->buses = g_hash_table_new_full(g_direct_hash, g_direct_equal,
                                     NULL, g_free);
    s->by_rid = g_hash_table_new(g_direct_hash, g_direct_equal);
/* @series-begin notify */
    pvdma_vm_set_notifier(s->vm, pvdma_notify_event, s);
/* @series-end notify */
    pci_setup_iommu(pci_get_bus(PCI_DEVICE(s)), &pvdma_iommu_ops, s);
    s->dev_listener.unrealize = pvdma_device_unrealize;
    device_listener_register(&s->dev_listener);
}

static void pvdma_iommu_memory_region_class_init(ObjectClass *klass,
                                                 const void *data)
{
    IOMMUMemoryRegionClass *imrc = IOMMU_MEMORY_REGION_CLASS(klass);

    imrc->translate = pvdma_translate;
/* @series-begin notify */
    imrc->replay = pvdma_replay;
    imrc->notify_flag_changed = pvdma_notify_flag_changed;
/* @series-end notify */
/* @series-begin vfio-quota */
    imrc->map_failed = pvdma_map_failed;
/* @series-end vfio-quota */
}

static const TypeInfo pvdma_iommu_memory_region_info = {
    .name = TYPE_PVDMA_IOMMU_MEMORY_REGION,
    .parent = TYPE_IOMMU_MEMORY_REGION,
    .class_init = pvdma_iommu_memory_region_class_init,
};

static void pvdma_iommu_register_types(void)
{
    type_register_static(&pvdma_iommu_memory_region_info);
}

type_init(pvdma_iommu_register_types)
