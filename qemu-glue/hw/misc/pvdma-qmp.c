/*
 * pvdma: QMP query-pvdma and HMP info pvdma
/* @series-begin dma-bench */
 * and x-pvdma-dma-bench
/* @series-end dma-bench */
 *
 * What each pvdma function is doing: configuration, pins and mapping
 * memory, endpoints, refused accesses, and request counts by op and by
 * transport.
/* @series-begin queue */
 * And its request queues: where they are, how far the guest and the
 * device have got in each, and what failed.
/* @series-end queue */
/* @series-begin dma-bench */
 * And what one DMA costs: x-pvdma-dma-bench times a PCI function's DMA
 * reads, behind pvdma or any other IOMMU or none.
/* @series-end dma-bench */
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
/* @series-begin dma-bench */
#include "qapi/error.h"
#include "qemu/timer.h"
#include "qemu/units.h"
#include "system/dma.h"
/* @series-end dma-bench */
#include "qapi/qapi-commands-pvdma.h"
#include "monitor/hmp.h"
#include "monitor/monitor.h"
#include "pvdma-internal.h"

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
/* @series-begin queue */
    g_autofree struct pvdma_queue_info *queues = NULL;
    PvdmaQueueInfoList **queue_tail = &info->queues;
/* @series-end queue */

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
/* @series-begin queue */

    info->queue_drains = stats.queue_drains;
    info->queue_entries = stats.queue_entries;
    info->queue_failed = stats.queue_failed;
    info->miss_drains = stats.miss_drains;
    n = pvdma_vm_queues(s->vm, NULL, 0);
    queues = g_new0(struct pvdma_queue_info, n);
    n = MIN(n, pvdma_vm_queues(s->vm, queues, n));
    for (i = 0; i < n; i++) {
        PvdmaQueueInfo *q = g_new0(PvdmaQueueInfo, 1);

        q->index = queues[i].index;
        q->set_up = queues[i].set_up;
        q->ctrl_gpa = queues[i].ctrl_gpa;
        q->ring_gpa = queues[i].ring_gpa;
        q->entries = queues[i].entries;
        q->head = queues[i].head;
        q->tail = queues[i].tail;
        q->failed = queues[i].failed;
        q->last_error = queues[i].last_error;
        q->stopped = queues[i].stopped;
        q->applied = queues[i].applied;
        q->drains = queues[i].drains;
        QAPI_LIST_APPEND(queue_tail, q);
    }
/* @series-end queue */
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
/* @series-begin queue */
        PvdmaQueueInfoList *q;
        unsigned nq = 0;
/* @series-end queue */

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
/* @series-begin queue */
        for (q = d->queues; q; q = q->next) {
            nq++;
        }
        monitor_printf(mon, "  queues %u: drains %" PRIu64 ", entries %"
                       PRIu64 ", failed %" PRIu64 ", miss drains %" PRIu64
                       "\n", nq, d->queue_drains, d->queue_entries,
                       d->queue_failed, d->miss_drains);
        for (q = d->queues; q; q = q->next) {
            PvdmaQueueInfo *v = q->value;

            if (!v->set_up) {
                continue;
            }
            monitor_printf(mon, "  queue %u: ctrl 0x%" PRIx64 ", ring 0x%"
                           PRIx64 " (%u entries), head %u, tail %u, failed %u"
                           " (last error %u), applied %" PRIu64 ", drains %"
                           PRIu64 "%s\n", v->index, v->ctrl_gpa,
                           v->ring_gpa, v->entries, v->head, v->tail,
                           v->failed, v->last_error, v->applied, v->drains,
                           v->stopped ? ", STOPPED" : "");
        }
/* @series-end queue */
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
/* @series-begin dma-bench */

/* x-pvdma-dma-bench's bounds: what one monitor command may hold the BQL */
#define PVDMA_BENCH_MAX_SEGMENTS    256
#define PVDMA_BENCH_MAX_BYTES       (1 * MiB)
#define PVDMA_BENCH_MAX_ITERATIONS  100000000ULL
#define PVDMA_BENCH_TIME_LIMIT_NS   (10 * NANOSECONDS_PER_SECOND)
/* Transfers between looks at the clock, so that looking costs nothing */
#define PVDMA_BENCH_CLOCK_EVERY     256

static int64_t pvdma_thread_cpu_ns(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)) {
        return 0;
    }
    return ts.tv_sec * NANOSECONDS_PER_SECOND + ts.tv_nsec;
}

static PCIDevice *pvdma_bench_find_device(const char *name, Error **errp)
{
    bool ambiguous = false;
    Object *obj = object_resolve_path_type(name, TYPE_PCI_DEVICE,
                                           &ambiguous);
    PCIDevice *dev = NULL;

    if (obj) {
        return PCI_DEVICE(obj);
    }
    if (ambiguous) {
        error_setg(errp, "PCI device path '%s' is ambiguous", name);
        return NULL;
    }
    if (pci_qdev_find_device(name, &dev) < 0 || !dev) {
        error_setg(errp, "no PCI device '%s'", name);
        return NULL;
    }
    return dev;
}

/* One transfer: every segment in turn, into @buf */
static MemTxResult pvdma_bench_transfer(PCIDevice *dev,
                                        PvdmaDmaSegmentList *segments,
                                        uint8_t *buf,
                                        PvdmaDmaSegment **failed)
{
    PvdmaDmaSegmentList *l;

    for (l = segments; l; l = l->next) {
        MemTxResult r = pci_dma_read(dev, l->value->addr, buf,
                                     l->value->len);

        if (r != MEMTX_OK) {
            *failed = l->value;
            return r;
        }
        buf += l->value->len;
    }
    return MEMTX_OK;
}

PvdmaDmaBenchResult *qmp_x_pvdma_dma_bench(const char *device,
                                           PvdmaDmaSegmentList *segments,
                                           uint64_t iterations,
                                           Error **errp)
{
    PvdmaDmaBenchResult *res;
    PvdmaDmaSegmentList *l;
    PvdmaDmaSegment *failed = NULL;
    PCIDevice *dev;
    g_autofree uint8_t *buf = NULL;
    uint64_t bytes = 0, done;
    unsigned nsegs = 0;
    int64_t wall0, cpu0, deadline;
    MemTxResult r;

    if (iterations < 1 || iterations > PVDMA_BENCH_MAX_ITERATIONS) {
        error_setg(errp, "iterations must be 1 to %llu",
                   PVDMA_BENCH_MAX_ITERATIONS);
        return NULL;
    }
    for (l = segments; l; l = l->next) {
        uint64_t len = l->value->len;

        if (++nsegs > PVDMA_BENCH_MAX_SEGMENTS) {
            error_setg(errp, "more than %d segments",
                       PVDMA_BENCH_MAX_SEGMENTS);
            return NULL;
        }
        if (len < 1 || len > PVDMA_BENCH_MAX_BYTES - bytes) {
            error_setg(errp, "segment %u (0x%" PRIx64 " bytes at 0x%"
                       PRIx64 "): segments must have 1 byte or more and "
                       "add up to at most 0x%x bytes", nsegs - 1, len,
                       l->value->addr, (unsigned)PVDMA_BENCH_MAX_BYTES);
            return NULL;
        }
        if (l->value->addr + len - 1 < l->value->addr) {
            error_setg(errp, "segment %u (0x%" PRIx64 " bytes at 0x%"
                       PRIx64 ") wraps around", nsegs - 1, len,
                       l->value->addr);
            return NULL;
        }
        bytes += len;
    }
    if (!nsegs) {
        error_setg(errp, "no segments");
        return NULL;
    }
    dev = pvdma_bench_find_device(device, errp);
    if (!dev) {
        return NULL;
    }
    buf = g_malloc(bytes);

    /* A first transfer untimed: it fails the command if any read does */
    r = pvdma_bench_transfer(dev, segments, buf, &failed);
    if (r != MEMTX_OK) {
        error_setg(errp, "DMA read of 0x%" PRIx64 " bytes at 0x%" PRIx64
                   " by %s failed (MemTxResult 0x%x)", failed->len,
                   failed->addr, device, r);
        return NULL;
    }

    wall0 = get_clock();
    cpu0 = pvdma_thread_cpu_ns();
    deadline = wall0 + PVDMA_BENCH_TIME_LIMIT_NS;
    for (done = 0; done < iterations; done++) {
        r = pvdma_bench_transfer(dev, segments, buf, &failed);
        if (r != MEMTX_OK) {
            error_setg(errp, "DMA read of 0x%" PRIx64 " bytes at 0x%"
                       PRIx64 " by %s failed after %" PRIu64
                       " transfers (MemTxResult 0x%x)", failed->len,
                       failed->addr, device, done, r);
            return NULL;
        }
        if (done % PVDMA_BENCH_CLOCK_EVERY == PVDMA_BENCH_CLOCK_EVERY - 1 &&
            get_clock() > deadline) {
            done++;
            break;
        }
    }

    res = g_new0(PvdmaDmaBenchResult, 1);
    res->wall_ns = get_clock() - wall0;
    res->cpu_ns = pvdma_thread_cpu_ns() - cpu0;
    res->iterations = done;
    res->bytes = bytes;
    return res;
}
/* @series-end dma-bench */
