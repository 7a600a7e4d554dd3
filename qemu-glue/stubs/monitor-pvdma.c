/*
 * pvdma monitor commands when the pvdma device is not built
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-pvdma.h"
#include "monitor/hmp.h"
#include "monitor/monitor.h"

PvdmaInfoList *qmp_query_pvdma(Error **errp)
{
    error_setg(errp, "pvdma support is not compiled in");
    return NULL;
}

void hmp_info_pvdma(Monitor *mon, const QDict *qdict)
{
    monitor_printf(mon, "pvdma support is not compiled in\n");
}
/* @series-begin dma-bench */

PvdmaDmaBenchResult *qmp_x_pvdma_dma_bench(const char *device,
                                           PvdmaDmaSegmentList *segments,
                                           uint64_t iterations,
                                           Error **errp)
{
    error_setg(errp, "pvdma support is not compiled in");
    return NULL;
}
/* @series-end dma-bench */
