/*
 * pvdma: paravirtual DMA remapping device
 *
 * A PCI function that remaps the DMA of every other PCI function on its
 * root bus, programmed through request blocks in guest RAM (see
 * docs/system/devices/pvdma.rst). The request engine, the IOVA tables and
 * the pin accounting live in libpvdma, a Rust library with a C API. This
 * file is the PCI function itself: registers, the doorbell, guest RAM
/* @series-until migration */
 * layout, properties, realize and reset.
/* @series-end migration */
/* @series-begin migration */
 * layout, properties, realize, reset and migration.
/* @series-end migration */
/* @series-begin iommu */
 * pvdma-internal.h lists the device's other files.
/* @series-end iommu */
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
/* @series-begin queue */
#include "qemu/main-loop.h"
/* @series-end queue */
#include "qemu/error-report.h"
#include "qemu/log.h"
#include "qemu/units.h"
#include "qapi/error.h"
#include "hw/qdev-properties.h"
#include "migration/vmstate.h"
#include "system/address-spaces.h"
#include "trace.h"
#include "pvdma-internal.h"

/* System peripheral, IOMMU (PCI code and ID spec, class 08h subclass 06h) */
#define PVDMA_PCI_CLASS_SYSTEM_IOMMU 0x0806

#define PVDMA_IOVA_BITS_MIN 21
#define PVDMA_IOVA_BITS_MAX 57
#define PVDMA_MAX_SEGS_MAX 65536

uint64_t pvdma_features(PvdmaState *s)
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
/* @series-until queue */
        return s->last_status;
/* @series-end queue */
/* @series-begin queue */
        /* QUEUES is the upper half: 0 when the feature is off */
        return s->last_status |
               ((uint64_t)pvdma_vm_queue_count(s->vm) << 32);
/* @series-end queue */
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

uint32_t pvdma_submit(PvdmaState *s, uint64_t block_gpa, uint32_t transport)
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

/* @series-begin queue */
/*
 * Queued requests (FEATURES.QUEUE). The library applies a queue's entries
 * itself: before every request, at SYNC and tear-down (all under the BQL,
 * in the doorbell or hypercall path), and when a translation would be
 * refused (rule 2), which may run in any thread that does DMA. Applying
 * an entry sends IOMMU notifications (vhost, vfio), and those need the
 * BQL, so a miss drain takes it when its thread does not hold it. The
 * library calls these hooks before it takes any lock of its own, and only
 * when some queue has entries published.
 */
static uint64_t pvdma_miss_begin(void *opaque)
{
    if (bql_locked()) {
        return 0;
    }
    bql_lock();
    return 1;
}

static void pvdma_miss_end(void *opaque, uint64_t token)
{
    if (token) {
        bql_unlock();
    }
}

static const char *pvdma_drain_cause_name(uint32_t cause)
{
    switch (cause) {
    case PVDMA_DRAIN_REQUEST:
        return "request";
    case PVDMA_DRAIN_MISS:
        return "miss";
    case PVDMA_DRAIN_SYNC:
        return "sync";
    case PVDMA_DRAIN_TEARDOWN:
        return "teardown";
    default:
        return "?";
    }
}

static void pvdma_drained(void *opaque, uint32_t queue, uint32_t cause,
                          uint32_t applied, uint32_t failed, uint32_t head,
                          uint32_t tail)
{
    if (cause == PVDMA_DRAIN_STOPPED) {
        /* head - tail > N: the guest overwrote entries not yet taken */
        qemu_log_mask(LOG_GUEST_ERROR,
                      "pvdma: queue %u stopped: head %u is more than a ring "
                      "ahead of tail %u\n", queue, head, tail);
        trace_pvdma_queue_broken(queue, head, tail);
        return;
    }
    trace_pvdma_queue_drain(queue, pvdma_drain_cause_name(cause), applied,
                            failed, head, tail);
}

static void pvdma_queue_setup(PvdmaState *s)
{
    const struct pvdma_drain_hooks hooks = {
        .opaque = s,
        .miss_begin = pvdma_miss_begin,
        .miss_end = pvdma_miss_end,
        .drained = pvdma_drained,
    };

    /* Only a VM that does not exist makes this fail */
    pvdma_vm_set_drain_hooks(s->vm, &hooks);
}

/* @series-end queue */
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
/* @series-begin queue */
    if (s->queues > PVDMA_MAX_QUEUES) {
        error_setg(errp, "pvdma: queues must be 0..%u, not %u",
                   PVDMA_MAX_QUEUES, s->queues);
        error_append_hint(errp, "0 turns queued requests (FEATURES.QUEUE) "
                          "off.\n");
        return false;
    }
/* @series-end queue */
    return true;
}

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
    if (!pvdma_iommu_check_bus(s, errp)) {
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
/* @series-begin queue */
    cfg.queues = s->queues;
/* @series-end queue */
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
    pvdma_iommu_setup(s);
/* @series-end iommu */
/* @series-begin hypercall */
    pvdma_hypercall_register(s);
/* @series-end hypercall */
/* @series-begin queue */
    pvdma_queue_setup(s);
/* @series-end queue */
}

static void pvdma_exit(PCIDevice *pdev)
{
    PvdmaState *s = PVDMA(pdev);

    /* pvdma is not hot-pluggable: this only runs when QEMU exits */
    if (!s->vm) {
        return;
    }
/* @series-begin hypercall */
    pvdma_hypercall_unregister(s);
/* @series-end hypercall */
    memory_listener_unregister(&s->ram_listener);
/* @series-begin iommu */
    device_listener_unregister(&s->dev_listener);
/* @series-end iommu */
/* @series-begin queue */
    pvdma_vm_set_drain_hooks(s->vm, NULL);
/* @series-end queue */
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
/* @series-until queue */
    /* Detaches every endpoint: mappings removed, pins released */
/* @series-end queue */
/* @series-begin queue */
    /*
     * Tears every queue down without applying what is published in it,
     * then detaches every endpoint: mappings removed, pins released
     */
/* @series-end queue */
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
/* @series-until queue */
                   "bypass or guest RAM layout than the source?)",
/* @series-end queue */
/* @series-begin queue */
                   "bypass, queues or guest RAM layout than the source?)",
/* @series-end queue */
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

static const Property pvdma_properties[] = {
    DEFINE_PROP_SIZE("pin-limit", PvdmaState, pin_limit, 0),
    DEFINE_PROP_SIZE("mem-limit", PvdmaState, mem_limit, 256 * MiB),
    DEFINE_PROP_STRING("pin-mode", PvdmaState, pin_mode),
    DEFINE_PROP_UINT32("iova-bits", PvdmaState, iova_bits, 48),
    DEFINE_PROP_UINT32("max-segs", PvdmaState, max_segs, 512),
    DEFINE_PROP_BOOL("bypass", PvdmaState, bypass, true),
    DEFINE_PROP_BOOL("unmap-list", PvdmaState, unmap_list, true),
/* @series-begin queue */
    DEFINE_PROP_UINT32("queues", PvdmaState, queues, 8),
/* @series-end queue */
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
/* @series-begin queue */
    object_class_property_set_description(klass, "queues",
        "Request queues offered to the guest, 0..64 (QUEUES register): "
        "MAP and UNMAP entries in guest memory that the device applies "
        "without an exit. 0 turns queued requests off (FEATURES bit 4 "
        "clear, ops 7 and 8 unknown ops)");
/* @series-end queue */
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
    },
};

DEFINE_TYPES(pvdma_types)
