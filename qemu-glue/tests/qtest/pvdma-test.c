/*
 * QTest testcase for the pvdma paravirtual DMA remapping device
 *
 * The guest side of the pvdma ABI (version 1) is driven from here the way
 * a driver would: request blocks are written into guest RAM, the doorbell
 * is rung through BAR0 and the written-back fields are checked. QEMU's
 * "edu" device sits behind pvdma as the DMA-capable endpoint, so every
 * translation result is observed as bytes landing (or not landing) in
 * guest RAM.
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/bswap.h"
#include "qemu/units.h"
#include <glib/gstdio.h>
#include "libqtest.h"
#include "libqos/pci.h"
#include "libqos/pci-pc.h"
#include "hw/pci/pci_regs.h"
#include "qobject/qdict.h"
#include "qobject/qlist.h"
#include "qobject/qnum.h"

/*
 * The guest ABI, restated: a qtest cannot include the project's
 * pvdma_abi.h, and the values below are the contract, not the device's
 * implementation details, so spelling them out here also guards against
 * the device drifting from them.
 */
#define PVDMA_VENDOR_ID         0x1b36
#define PVDMA_DEVICE_ID         0x0015
#define PVDMA_REVISION          1
#define PVDMA_CLASS_CODE        0x080600

#define PVDMA_REG_MAGIC         0x000
#define PVDMA_REG_VERSION       0x004
#define PVDMA_REG_FEATURES      0x008
#define PVDMA_REG_IOVA_BITS     0x010
#define PVDMA_REG_MAX_SEGS      0x014
#define PVDMA_REG_PAGE_SIZES    0x018
#define PVDMA_REG_HYPERCALL_NR  0x020
#define PVDMA_REG_DOORBELL      0x028
#define PVDMA_REG_DOORBELL_HI   0x02c
#define PVDMA_REG_FAULTS        0x030
#define PVDMA_REG_LAST_STATUS   0x038
/* @series-begin queue */
#define PVDMA_REG_QUEUES        0x03c
/* @series-end queue */

#define PVDMA_MAGIC             0x414d4450 /* "PDMA" */
#define PVDMA_MIN_MAX_SEGS      252

#define PVDMA_F_HYPERCALL       (1ULL << 0)
#define PVDMA_F_HOST_IOVA       (1ULL << 1)
#define PVDMA_F_BYPASS          (1ULL << 2)
#define PVDMA_F_UNMAP_LIST      (1ULL << 3)
/* @series-begin queue */
#define PVDMA_F_QUEUE           (1ULL << 4)
/* @series-end queue */

enum {
    OP_QUERY = 1,
    OP_ATTACH = 2,
    OP_DETACH = 3,
    OP_MAP = 4,
    OP_UNMAP = 5,
    OP_UNMAP_LIST = 6,
/* @series-begin queue */
    OP_QUEUE = 7,
    OP_SYNC = 8,
/* @series-end queue */
};

#define FLAG_READ               (1 << 0)
#define FLAG_WRITE              (1 << 1)
#define FLAG_FIXED              (1 << 2)
#define FLAG_RW                 (FLAG_READ | FLAG_WRITE)

#define QUERY_ATTACHED          (1ULL << 0)
#define QUERY_PASSTHROUGH       (1ULL << 1)
#define QUERY_BYPASS            (1ULL << 2)

enum {
    S_OK = 0,
    S_INVAL = 1,
    S_NODEV = 2,
    S_FAULT = 3,
    S_NOSPC = 4,
    S_EXIST = 5,
    S_NOENT = 6,
    S_RANGE = 7,
    S_TOOBIG = 8,
    S_QUOTA = 9,
    S_PERM = 10,
    S_STATE = 11,
};

#define REQ_HEADER_SIZE         64
#define REQ_SEG_SIZE            16
#define PAGE                    0x1000ULL

/* edu (hw/misc/edu.c): a DMA engine with a 4 KiB buffer at 0x40000. */
#define EDU_VENDOR_ID           0x1234
#define EDU_DEVICE_ID           0x11e8
#define EDU_REG_DMA_SRC         0x80
#define EDU_REG_DMA_DST         0x88
#define EDU_REG_DMA_CNT         0x90
#define EDU_REG_DMA_CMD         0x98
#define EDU_DMA_RUN             0x1
#define EDU_DMA_TO_RAM          0x2
#define EDU_BUF                 0x40000

/*
 * Where things live. Emulated endpoints pick their DMA address space once
 * the machine is complete, so the order of -device options does not matter
 * (/pvdma/dma/device-order checks that); pvdma comes first by habit.
 */
#define PVDMA_SLOT              4
#define EDU_SLOT                5
#define EMPTY_SLOT              10
#define RID(slot)               (QPCI_DEVFN(slot, 0))   /* bus 0 */
#define PVDMA_RID               RID(PVDMA_SLOT)
#define EDU_RID                 RID(EDU_SLOT)
#define EMPTY_RID               RID(EMPTY_SLOT)

#define GUEST_RAM               (128 * MiB)
#define REQ_GPA                 0x100000ULL   /* request blocks */
#define DATA_GPA                0x800000ULL   /* buffers the devices see */
/* IOVAs under edu's 28-bit DMA mask, and never equal to a buffer's gpa. */
#define IOVA_BASE               0x1000000ULL
/* Not RAM: below the PCI hole of q35 with 128 MiB. */
#define NOT_RAM_GPA             0x40000000ULL

#define DEVICE_ARGS(pvdma_opts)                                        \
    "-M q35 -m 128M "                                                  \
    "-device pvdma,id=pvdma0,addr=04.0" pvdma_opts " "                 \
    "-device edu,addr=05.0"

typedef struct PvdmaReq {
    uint16_t op;
    uint16_t flags;
    uint32_t status;
    uint32_t requester;
    uint32_t nr_segs;
    uint64_t iova;
    uint64_t length;
    uint64_t result;
    uint64_t reserved[3];
} PvdmaReq;

typedef struct PvdmaSeg {
    uint64_t gpa;
    uint64_t len;
} PvdmaSeg;

typedef struct PvdmaTest {
    QTestState *qts;
    QPCIBus *bus;
    QPCIDevice *pvdma;
    QPCIDevice *edu;
    QPCIBar bar;
    QPCIBar edu_bar;
    bool split_doorbell;    /* ring with two 32-bit writes */
} PvdmaTest;

static void pvdma_enable(PvdmaTest *t)
{
    uint64_t size;

    qpci_device_enable(t->pvdma);
    t->bar = qpci_iomap(t->pvdma, 0, &size);
    g_assert_cmpuint(size, ==, 4096);
    qpci_device_enable(t->edu);
    t->edu_bar = qpci_iomap(t->edu, 0, NULL);
}

static void pvdma_attach_devices(PvdmaTest *t, QTestState *qts)
{
    t->qts = qts;
    t->bus = qpci_new_pc(qts, NULL);
    t->pvdma = qpci_device_find(t->bus, QPCI_DEVFN(PVDMA_SLOT, 0));
    g_assert_nonnull(t->pvdma);
    t->edu = qpci_device_find(t->bus, QPCI_DEVFN(EDU_SLOT, 0));
    g_assert_nonnull(t->edu);
}

static PvdmaTest *pvdma_start(const char *args)
{
    PvdmaTest *t = g_new0(PvdmaTest, 1);

    pvdma_attach_devices(t, qtest_init(args));
    pvdma_enable(t);
    return t;
}

/* @series-begin queue-test */
/*
 * Started from the binary in environment variable @var when it is set
 * (else QTEST_QEMU_BINARY's): an older QEMU as a migration source.
 */
static PvdmaTest *pvdma_start_ext(const char *var, const char *args)
{
    PvdmaTest *t = g_new0(PvdmaTest, 1);

    pvdma_attach_devices(t, qtest_init_ext(var, args, NULL, true));
    pvdma_enable(t);
    return t;
}

/* @series-end queue-test */
static void pvdma_stop(PvdmaTest *t)
{
    g_free(t->pvdma);
    g_free(t->edu);
    qpci_free_pc(t->bus);
    qtest_quit(t->qts);
    g_free(t);
}

static uint32_t reg_readl(PvdmaTest *t, uint64_t off)
{
    return qpci_io_readl(t->pvdma, t->bar, off);
}

static uint64_t reg_readq(PvdmaTest *t, uint64_t off)
{
    return qpci_io_readq(t->pvdma, t->bar, off);
}

static uint64_t faults(PvdmaTest *t)
{
    return reg_readq(t, PVDMA_REG_FAULTS);
}

/* Request blocks */

static void req_write(PvdmaTest *t, uint64_t gpa, const PvdmaReq *req,
                      const PvdmaSeg *segs, uint32_t nsegs)
{
    g_autofree uint8_t *buf = g_malloc0(REQ_HEADER_SIZE + REQ_SEG_SIZE * nsegs);
    uint32_t i;

    stw_le_p(buf + 0, req->op);
    stw_le_p(buf + 2, req->flags);
    stl_le_p(buf + 4, req->status);
    stl_le_p(buf + 8, req->requester);
    stl_le_p(buf + 12, req->nr_segs);
    stq_le_p(buf + 16, req->iova);
    stq_le_p(buf + 24, req->length);
    stq_le_p(buf + 32, req->result);
    for (i = 0; i < 3; i++) {
        stq_le_p(buf + 40 + 8 * i, req->reserved[i]);
    }
    for (i = 0; i < nsegs; i++) {
        stq_le_p(buf + REQ_HEADER_SIZE + REQ_SEG_SIZE * i, segs[i].gpa);
        stq_le_p(buf + REQ_HEADER_SIZE + REQ_SEG_SIZE * i + 8, segs[i].len);
    }
    qtest_memwrite(t->qts, gpa, buf, REQ_HEADER_SIZE + REQ_SEG_SIZE * nsegs);
}

static void req_read(PvdmaTest *t, uint64_t gpa, PvdmaReq *req)
{
    uint8_t buf[REQ_HEADER_SIZE];
    int i;

    qtest_memread(t->qts, gpa, buf, sizeof(buf));
    req->op = lduw_le_p(buf + 0);
    req->flags = lduw_le_p(buf + 2);
    req->status = ldl_le_p(buf + 4);
    req->requester = ldl_le_p(buf + 8);
    req->nr_segs = ldl_le_p(buf + 12);
    req->iova = ldq_le_p(buf + 16);
    req->length = ldq_le_p(buf + 24);
    req->result = ldq_le_p(buf + 32);
    for (i = 0; i < 3; i++) {
        req->reserved[i] = ldq_le_p(buf + 40 + 8 * i);
    }
}

/* Rings the doorbell with @gpa and returns LAST_STATUS. */
static uint32_t ring(PvdmaTest *t, uint64_t gpa)
{
    if (t->split_doorbell) {
        qpci_io_writel(t->pvdma, t->bar, PVDMA_REG_DOORBELL, (uint32_t)gpa);
        qpci_io_writel(t->pvdma, t->bar, PVDMA_REG_DOORBELL_HI, gpa >> 32);
    } else {
        qpci_io_writeq(t->pvdma, t->bar, PVDMA_REG_DOORBELL, gpa);
    }
    return reg_readl(t, PVDMA_REG_LAST_STATUS);
}

/* A status value no request can produce, to see that the host wrote one. */
#define STATUS_POISON 0xdeadbeef

/*
 * Submits @req (with @nsegs segments following it) from @gpa, reads the
 * block back into @req, checks that the host wrote the status it also
 * reports in LAST_STATUS and that it touched nothing but the output
 * fields, and returns the status.
 */
static uint32_t submit_at(PvdmaTest *t, uint64_t gpa, PvdmaReq *req,
                          const PvdmaSeg *segs, uint32_t nsegs)
{
    PvdmaReq in, out;
    uint32_t last;

    req->status = STATUS_POISON;
    in = *req;
    req_write(t, gpa, req, segs, nsegs);
    last = ring(t, gpa);
    req_read(t, gpa, &out);
    g_assert_cmpuint(out.status, ==, last);
    g_assert_cmpuint(out.op, ==, in.op);
    g_assert_cmpuint(out.flags, ==, in.flags);
    g_assert_cmpuint(out.requester, ==, in.requester);
    g_assert_cmpuint(out.nr_segs, ==, in.nr_segs);
    g_assert_cmpuint(out.reserved[0], ==, in.reserved[0]);
    g_assert_cmpuint(out.reserved[1], ==, in.reserved[1]);
    g_assert_cmpuint(out.reserved[2], ==, in.reserved[2]);
/* @series-until queue-test */
    if (last != S_OK) {
/* @series-end queue-test */
/* @series-begin queue-test */
    /*
     * SYNC is the exception: a failed entry makes its status, and result
     * counts the failed entries.
     */
    if (last != S_OK && in.op != OP_SYNC) {
/* @series-end queue-test */
        /* On failure only status is written back. */
        g_assert_cmphex(out.iova, ==, in.iova);
        g_assert_cmphex(out.length, ==, in.length);
        g_assert_cmphex(out.result, ==, in.result);
    }
    *req = out;
    return last;
}

static uint32_t submit(PvdmaTest *t, PvdmaReq *req, const PvdmaSeg *segs,
                       uint32_t nsegs)
{
    return submit_at(t, REQ_GPA, req, segs, nsegs);
}

static uint32_t do_op(PvdmaTest *t, uint16_t op, uint32_t rid,
                      uint64_t *result)
{
    PvdmaReq req = { .op = op, .requester = rid };
    uint32_t status = submit(t, &req, NULL, 0);

    if (result) {
        *result = req.result;
    }
    return status;
}

static uint64_t query(PvdmaTest *t, uint32_t rid)
{
    uint64_t result = ~0ULL;

    g_assert_cmpuint(do_op(t, OP_QUERY, rid, &result), ==, S_OK);
    return result;
}

static void attach(PvdmaTest *t, uint32_t rid)
{
    uint64_t result = ~0ULL;

    g_assert_cmpuint(do_op(t, OP_ATTACH, rid, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 0);
}

/* MAP of one guest range; returns the status, *iova is in/out. */
static uint32_t map_range(PvdmaTest *t, uint32_t rid, uint16_t flags,
                          uint64_t *iova, uint64_t gpa, uint64_t len)
{
    PvdmaSeg seg = { .gpa = gpa, .len = len };
    PvdmaReq req = {
        .op = OP_MAP, .flags = flags, .requester = rid, .nr_segs = 1,
        .iova = *iova,
    };
    uint32_t status = submit(t, &req, &seg, 1);

    if (status == S_OK) {
        g_assert_cmphex(req.iova & (PAGE - 1), ==, gpa & (PAGE - 1));
        g_assert_cmpuint(req.length, ==, len);
        g_assert_cmpuint(req.result, ==, 0);
        if (flags & FLAG_FIXED) {
            g_assert_cmphex(req.iova, ==, *iova);
        }
        *iova = req.iova;
    }
    return status;
}

static void map_fixed(PvdmaTest *t, uint32_t rid, uint16_t perm,
                      uint64_t iova, uint64_t gpa, uint64_t len)
{
    g_assert_cmpuint(map_range(t, rid, perm | FLAG_FIXED, &iova, gpa, len),
                     ==, S_OK);
}

static uint32_t unmap(PvdmaTest *t, uint32_t rid, uint64_t iova,
                      uint64_t len, uint64_t *result)
{
    PvdmaReq req = {
        .op = OP_UNMAP, .requester = rid, .iova = iova, .length = len,
    };
    uint32_t status = submit(t, &req, NULL, 0);

    if (result) {
        *result = req.result;
    }
    return status;
}

/* An IOVA range of UNMAP_LIST; it fills a segment slot. */
typedef struct PvdmaRange {
    uint64_t iova;
    uint64_t len;
} PvdmaRange;

static uint32_t unmap_list(PvdmaTest *t, uint32_t rid,
                           const PvdmaRange *ranges, uint32_t n,
                           uint64_t *result)
{
    g_autofree PvdmaSeg *slots = g_new0(PvdmaSeg, MAX(n, 1));
    PvdmaReq req = {
        .op = OP_UNMAP_LIST, .requester = rid, .nr_segs = n,
    };
    uint32_t status, i;

    for (i = 0; i < n; i++) {
        slots[i].gpa = ranges[i].iova;
        slots[i].len = ranges[i].len;
    }
    status = submit(t, &req, slots, n);
    if (result) {
        *result = req.result;
    }
    return status;
}

/* edu as the DMA master */

/*
 * Runs one edu DMA of @cnt bytes between its buffer offset @buf_off and
 * bus address @addr, and waits for it: edu starts the copy from a 100 ms
 * virtual-clock timer, which only moves when qtest steps it.
 */
static void edu_dma(PvdmaTest *t, bool to_ram, uint64_t addr,
                    uint64_t buf_off, uint32_t cnt)
{
    uint64_t cmd = EDU_DMA_RUN | (to_ram ? EDU_DMA_TO_RAM : 0);
    int i;

    g_assert_cmphex(addr, <, 1ULL << 28);  /* edu's DMA mask */
    g_assert_cmpuint(buf_off + cnt, <=, 4096);
    qpci_io_writeq(t->edu, t->edu_bar, EDU_REG_DMA_SRC,
                   to_ram ? EDU_BUF + buf_off : addr);
    qpci_io_writeq(t->edu, t->edu_bar, EDU_REG_DMA_DST,
                   to_ram ? addr : EDU_BUF + buf_off);
    qpci_io_writeq(t->edu, t->edu_bar, EDU_REG_DMA_CNT, cnt);
    qpci_io_writeq(t->edu, t->edu_bar, EDU_REG_DMA_CMD, cmd);
    for (i = 0; i < 20; i++) {
        if (!(qpci_io_readq(t->edu, t->edu_bar, EDU_REG_DMA_CMD) &
              EDU_DMA_RUN)) {
            return;
        }
        qtest_clock_step(t->qts, 110 * 1000 * 1000);
    }
    g_assert_not_reached();
}

/* Byte @i of pattern @seed; different seeds give different pages. */
static uint8_t pattern(uint8_t seed, size_t i)
{
    return seed + i * 7;
}

static void fill(PvdmaTest *t, uint64_t gpa, uint8_t seed, size_t len)
{
    g_autofree uint8_t *buf = g_malloc(len);
    size_t i;

    for (i = 0; i < len; i++) {
        buf[i] = pattern(seed, i);
    }
    qtest_memwrite(t->qts, gpa, buf, len);
}

/* @len bytes at @gpa are bytes @first.. of pattern @seed. */
static void assert_pattern(PvdmaTest *t, uint64_t gpa, uint8_t seed,
                           size_t first, size_t len)
{
    g_autofree uint8_t *buf = g_malloc(len);
    size_t i;

    qtest_memread(t->qts, gpa, buf, len);
    for (i = 0; i < len; i++) {
        if (buf[i] != pattern(seed, first + i)) {
            g_test_message("gpa 0x%" PRIx64 ": byte %zu is 0x%02x, "
                           "expected 0x%02x", gpa, i, buf[i],
                           pattern(seed, first + i));
            g_test_fail();
            return;
        }
    }
}

static void assert_filled(PvdmaTest *t, uint64_t gpa, uint8_t seed,
                          size_t len)
{
    assert_pattern(t, gpa, seed, 0, len);
}

static void assert_bytes(PvdmaTest *t, uint64_t gpa, uint8_t val, size_t len)
{
    g_autofree uint8_t *buf = g_malloc(len);
    size_t i;

    qtest_memread(t->qts, gpa, buf, len);
    for (i = 0; i < len; i++) {
        if (buf[i] != val) {
            g_test_message("gpa 0x%" PRIx64 ": byte %zu is 0x%02x, "
                           "expected 0x%02x", gpa, i, buf[i], val);
            g_test_fail();
            return;
        }
    }
}

/* Registers and PCI identity */

static void test_pci_identity(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint32_t bar0;

    g_assert_cmphex(qpci_config_readw(t->pvdma, PCI_VENDOR_ID), ==,
                    PVDMA_VENDOR_ID);
    g_assert_cmphex(qpci_config_readw(t->pvdma, PCI_DEVICE_ID), ==,
                    PVDMA_DEVICE_ID);
    g_assert_cmpuint(qpci_config_readb(t->pvdma, PCI_REVISION_ID), ==,
                     PVDMA_REVISION);
    g_assert_cmphex(qpci_config_readl(t->pvdma, PCI_CLASS_REVISION) >> 8,
                    ==, PVDMA_CLASS_CODE);

    /* BAR0: 32-bit, non-prefetchable memory (qpci_iomap checked 4 KiB). */
    bar0 = qpci_config_readl(t->pvdma, PCI_BASE_ADDRESS_0);
    g_assert_cmphex(bar0 & PCI_BASE_ADDRESS_SPACE, ==,
                    PCI_BASE_ADDRESS_SPACE_MEMORY);
    g_assert_cmphex(bar0 & PCI_BASE_ADDRESS_MEM_TYPE_MASK, ==,
                    PCI_BASE_ADDRESS_MEM_TYPE_32);
    g_assert_cmphex(bar0 & PCI_BASE_ADDRESS_MEM_PREFETCH, ==, 0);

    /* The endpoint under test is really there. */
    g_assert_cmphex(qpci_config_readw(t->edu, PCI_VENDOR_ID), ==,
                    EDU_VENDOR_ID);
    g_assert_cmphex(qpci_config_readw(t->edu, PCI_DEVICE_ID), ==,
                    EDU_DEVICE_ID);
    pvdma_stop(t);
}

static void test_registers(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    static const uint64_t undefined[] = {
/* @series-until queue */
        0x024, 0x03c, 0x040, 0x080, 0x100, 0x800, 0xff8, 0xffc,
/* @series-end queue */
/* @series-begin queue */
        0x024, 0x040, 0x080, 0x100, 0x800, 0xff8, 0xffc,
/* @series-end queue */
    };
    uint64_t features, page_sizes;
    uint32_t iova_bits;
    size_t i;

    g_assert_cmphex(reg_readl(t, PVDMA_REG_MAGIC), ==, PVDMA_MAGIC);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_VERSION), ==, 1);

    /*
/* @series-until queue */
     * Defaults: host-chosen IOVAs, bypass and UNMAP_LIST; qtest has no
     * hypercalls.
/* @series-end queue */
/* @series-begin queue */
     * Defaults: host-chosen IOVAs, bypass, UNMAP_LIST and 8 queues; qtest
     * has no hypercalls.
/* @series-end queue */
     */
    features = reg_readq(t, PVDMA_REG_FEATURES);
    g_assert_cmphex(features & PVDMA_F_HOST_IOVA, ==, PVDMA_F_HOST_IOVA);
    g_assert_cmphex(features & PVDMA_F_BYPASS, ==, PVDMA_F_BYPASS);
    g_assert_cmphex(features & PVDMA_F_UNMAP_LIST, ==, PVDMA_F_UNMAP_LIST);
    g_assert_cmphex(features & PVDMA_F_HYPERCALL, ==, 0);
/* @series-until queue */
    g_assert_cmphex(features & ~0xfULL, ==, 0);
/* @series-end queue */
/* @series-begin queue */
    g_assert_cmphex(features & PVDMA_F_QUEUE, ==, PVDMA_F_QUEUE);
    g_assert_cmphex(features & ~0x1fULL, ==, 0);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_QUEUES), ==, 8);
    /* QUEUES is the upper half of the LAST_STATUS qword */
    g_assert_cmphex(reg_readq(t, PVDMA_REG_LAST_STATUS), ==, 8ULL << 32);
/* @series-end queue */

    iova_bits = reg_readl(t, PVDMA_REG_IOVA_BITS);
    g_assert_cmpuint(iova_bits, >=, 28);    /* edu must fit in it */
    g_assert_cmpuint(iova_bits, <=, 64);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_MAX_SEGS), >=,
                     PVDMA_MIN_MAX_SEGS);
    page_sizes = reg_readq(t, PVDMA_REG_PAGE_SIZES);
    g_assert_cmphex(page_sizes & (1ULL << 12), ==, 1ULL << 12);
    g_assert_cmphex(page_sizes & ((1ULL << 12) - 1), ==, 0);

    g_assert_cmpuint(faults(t), ==, 0);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_LAST_STATUS), ==, S_OK);

    /* 64-bit registers read the same as two 32-bit halves. */
    g_assert_cmphex(reg_readl(t, PVDMA_REG_FEATURES), ==, (uint32_t)features);
    g_assert_cmphex(reg_readl(t, PVDMA_REG_FEATURES + 4), ==, features >> 32);

    for (i = 0; i < ARRAY_SIZE(undefined); i++) {
        g_assert_cmphex(reg_readl(t, undefined[i]), ==, 0);
        qpci_io_writel(t->pvdma, t->bar, undefined[i], 0xffffffff);
        g_assert_cmphex(reg_readl(t, undefined[i]), ==, 0);
    }

    /* Writes to read-only registers are dropped. */
    qpci_io_writel(t->pvdma, t->bar, PVDMA_REG_MAGIC, 0x12345678);
    qpci_io_writel(t->pvdma, t->bar, PVDMA_REG_VERSION, 7);
    qpci_io_writeq(t->pvdma, t->bar, PVDMA_REG_FEATURES, 0);
    qpci_io_writel(t->pvdma, t->bar, PVDMA_REG_IOVA_BITS, 12);
    qpci_io_writel(t->pvdma, t->bar, PVDMA_REG_MAX_SEGS, 1);
    qpci_io_writeq(t->pvdma, t->bar, PVDMA_REG_PAGE_SIZES, 0);
    qpci_io_writeq(t->pvdma, t->bar, PVDMA_REG_FAULTS, 99);
    qpci_io_writel(t->pvdma, t->bar, PVDMA_REG_LAST_STATUS, 5);
/* @series-begin queue */
    qpci_io_writel(t->pvdma, t->bar, PVDMA_REG_QUEUES, 3);
/* @series-end queue */
    g_assert_cmphex(reg_readl(t, PVDMA_REG_MAGIC), ==, PVDMA_MAGIC);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_VERSION), ==, 1);
    g_assert_cmphex(reg_readq(t, PVDMA_REG_FEATURES), ==, features);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_IOVA_BITS), ==, iova_bits);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_MAX_SEGS), >=, PVDMA_MIN_MAX_SEGS);
    g_assert_cmphex(reg_readq(t, PVDMA_REG_PAGE_SIZES), ==, page_sizes);
    g_assert_cmpuint(faults(t), ==, 0);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_LAST_STATUS), ==, S_OK);
/* @series-begin queue */
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_QUEUES), ==, 8);
/* @series-end queue */
    pvdma_stop(t);
}

static void test_registers_configured(void)
{
    PvdmaTest *t;

    t = pvdma_start(DEVICE_ARGS(",bypass=off,iova-bits=21,max-segs=252"));
    g_assert_cmphex(reg_readq(t, PVDMA_REG_FEATURES) &
                    (PVDMA_F_BYPASS | PVDMA_F_HOST_IOVA), ==,
                    PVDMA_F_HOST_IOVA);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_IOVA_BITS), ==, 21);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_MAX_SEGS), ==, 252);
    pvdma_stop(t);

    t = pvdma_start(DEVICE_ARGS(",iova-bits=57,max-segs=4096"));
    g_assert_cmphex(reg_readq(t, PVDMA_REG_FEATURES) &
                    (PVDMA_F_BYPASS | PVDMA_F_HOST_IOVA), ==,
                    PVDMA_F_BYPASS | PVDMA_F_HOST_IOVA);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_IOVA_BITS), ==, 57);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_MAX_SEGS), ==, 4096);
    pvdma_stop(t);

    t = pvdma_start(DEVICE_ARGS(",unmap-list=off"));
    g_assert_cmphex(reg_readq(t, PVDMA_REG_FEATURES), ==,
/* @series-until queue */
                    PVDMA_F_BYPASS | PVDMA_F_HOST_IOVA);
/* @series-end queue */
/* @series-begin queue */
                    PVDMA_F_BYPASS | PVDMA_F_HOST_IOVA | PVDMA_F_QUEUE);
/* @series-end queue */
    pvdma_stop(t);
/* @series-begin queue */

    t = pvdma_start(DEVICE_ARGS(",queues=64"));
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_QUEUES), ==, 64);
    g_assert_cmphex(reg_readq(t, PVDMA_REG_FEATURES) & PVDMA_F_QUEUE, ==,
                    PVDMA_F_QUEUE);
    pvdma_stop(t);

    t = pvdma_start(DEVICE_ARGS(",queues=0"));
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_QUEUES), ==, 0);
    g_assert_cmphex(reg_readq(t, PVDMA_REG_FEATURES) & PVDMA_F_QUEUE, ==, 0);
    pvdma_stop(t);
/* @series-end queue */
}

/* The requests */

static void test_query(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t result;

    /* An endpoint starts detached, bypassing translation. */
    g_assert_cmphex(query(t, EDU_RID), ==, QUERY_BYPASS);
    /* So does every other function on the root bus (ICH9 LPC). */
    g_assert_cmphex(query(t, QPCI_DEVFN(0x1f, 0)), ==, QUERY_BYPASS);

    /* pvdma itself, an empty slot, another segment or bus: NODEV. */
    g_assert_cmpuint(do_op(t, OP_QUERY, PVDMA_RID, &result), ==, S_NODEV);
    g_assert_cmpuint(do_op(t, OP_QUERY, EMPTY_RID, &result), ==, S_NODEV);
    g_assert_cmpuint(do_op(t, OP_QUERY, EDU_RID | 1, &result), ==, S_NODEV);
    g_assert_cmpuint(do_op(t, OP_QUERY, 0x10000 | EDU_RID, &result), ==,
                     S_NODEV);
    g_assert_cmpuint(do_op(t, OP_QUERY, 0x500 | EDU_RID, &result), ==,
                     S_NODEV);
    pvdma_stop(t);
}

static void test_query_no_bypass(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(",bypass=off"));

    g_assert_cmphex(query(t, EDU_RID), ==, 0);
    attach(t, EDU_RID);
    g_assert_cmphex(query(t, EDU_RID), ==, QUERY_ATTACHED);
    pvdma_stop(t);
}

static void test_attach_detach(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t iova = 0, result;

    /* MAP and DETACH need an attached endpoint. */
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW, &iova, DATA_GPA, PAGE),
                     ==, S_STATE);
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, NULL), ==, S_STATE);
    g_assert_cmpuint(do_op(t, OP_ATTACH, PVDMA_RID, NULL), ==, S_NODEV);
    g_assert_cmpuint(do_op(t, OP_ATTACH, EMPTY_RID, NULL), ==, S_NODEV);

    attach(t, EDU_RID);
    g_assert_cmphex(query(t, EDU_RID), ==, QUERY_ATTACHED);
    g_assert_cmpuint(do_op(t, OP_ATTACH, EDU_RID, NULL), ==, S_STATE);
    /* Another endpoint is unaffected. */
    g_assert_cmphex(query(t, QPCI_DEVFN(0x1f, 0)), ==, QUERY_BYPASS);

    /* DETACH reports how many mappings it removed. */
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 0);
    g_assert_cmphex(query(t, EDU_RID), ==, QUERY_BYPASS);

    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, IOVA_BASE, DATA_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, IOVA_BASE + PAGE, DATA_GPA, 3 * PAGE);
    map_fixed(t, EDU_RID, FLAG_RW, IOVA_BASE + 8 * PAGE, DATA_GPA, 1);
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 3);
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, NULL), ==, S_STATE);

    /* Re-attaching starts from an empty IOVA space. */
    attach(t, EDU_RID);
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE, 0, NULL), ==, S_NOENT);
    pvdma_stop(t);
}

/* MAP and UNMAP, through either doorbell width (@data: split doorbell). */
static void test_map_unmap(const void *data)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint32_t iova_bits;
    uint64_t iova, result;
    PvdmaSeg segs[3];
    PvdmaReq req;

    t->split_doorbell = data != NULL;
    iova_bits = reg_readl(t, PVDMA_REG_IOVA_BITS);
    attach(t, EDU_RID);

    /* FIXED, with an offset inside the first page. */
    iova = IOVA_BASE + 0x123;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW | FLAG_FIXED, &iova,
                               DATA_GPA + 0x123, 0x2000), ==, S_OK);
    /* That covers three pages: 0x123 .. 0x2122. */
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE, 0, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 3 * PAGE);

    /* Host-chosen: never page 0, same in-page offset, inside the space. */
    iova = 0xdead000;   /* ignored without FIXED */
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_READ, &iova,
                               DATA_GPA + 0x10, 0x100), ==, S_OK);
    g_assert_cmphex(iova & ~(PAGE - 1), !=, 0);
    g_assert_cmphex(iova & (PAGE - 1), ==, 0x10);
    g_assert_cmphex(iova >> iova_bits, ==, 0);
    g_assert_cmpuint(unmap(t, EDU_RID, iova, 0, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, PAGE);

    /*
     * Three segments, scattered and out of order in guest memory, one
     * contiguous IOVA run over three pages: [0x800, page end) + one page +
     * 0x10 bytes.
     */
    segs[0] = (PvdmaSeg) { DATA_GPA + 5 * PAGE + 0x800, 0x800 };
    segs[1] = (PvdmaSeg) { DATA_GPA + 2 * PAGE, PAGE };
    segs[2] = (PvdmaSeg) { DATA_GPA + 9 * PAGE, 0x10 };
    req = (PvdmaReq) {
        .op = OP_MAP, .flags = FLAG_RW | FLAG_FIXED, .requester = EDU_RID,
        .nr_segs = 3, .iova = IOVA_BASE + 0x10800,
    };
    g_assert_cmpuint(submit(t, &req, segs, 3), ==, S_OK);
    g_assert_cmphex(req.iova, ==, IOVA_BASE + 0x10800);
    g_assert_cmpuint(req.length, ==, 0x800 + PAGE + 0x10);
    g_assert_cmpuint(req.result, ==, 0);

    /* The same, host-chosen, with one guest page named twice. */
    segs[2] = (PvdmaSeg) { DATA_GPA + 2 * PAGE, PAGE };
    req = (PvdmaReq) {
        .op = OP_MAP, .flags = FLAG_READ, .requester = EDU_RID, .nr_segs = 3,
    };
    g_assert_cmpuint(submit(t, &req, segs, 3), ==, S_OK);
    g_assert_cmphex(req.iova & (PAGE - 1), ==, 0x800);
    g_assert_cmpuint(req.length, ==, 0x800 + 2 * PAGE);
    g_assert_cmpuint(unmap(t, EDU_RID, req.iova, 0, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 3 * PAGE);

    /* A ranged UNMAP takes every mapping wholly inside it. */
    map_fixed(t, EDU_RID, FLAG_READ, IOVA_BASE + 0x20000, DATA_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_READ, IOVA_BASE + 0x22000, DATA_GPA,
              2 * PAGE);
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE + 0x10000, 0x20000,
                           &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 3 * PAGE + PAGE + 2 * PAGE);
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE + 0x10000, 0x20000,
                           NULL), ==, S_NOENT);

    /* LAST_STATUS follows the last request, whichever width rang it. */
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_LAST_STATUS), ==, S_NOENT);
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 0);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_LAST_STATUS), ==, S_OK);
    pvdma_stop(t);
}

static void test_status_inval(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    PvdmaSeg segs[2];
    PvdmaReq req;
    uint64_t iova;
    uint32_t iova_bits = reg_readl(t, PVDMA_REG_IOVA_BITS);

    attach(t, EDU_RID);

    /* Unknown ops. */
    g_assert_cmpuint(do_op(t, 0, EDU_RID, NULL), ==, S_INVAL);
    g_assert_cmpuint(do_op(t, 6, EDU_RID, NULL), ==, S_INVAL);
    g_assert_cmpuint(do_op(t, 0xffff, EDU_RID, NULL), ==, S_INVAL);

    /* Undefined flag bits and reserved words, on any op. */
    req = (PvdmaReq) { .op = OP_QUERY, .flags = 1 << 3,
                       .requester = EDU_RID };
    g_assert_cmpuint(submit(t, &req, NULL, 0), ==, S_INVAL);
    req = (PvdmaReq) { .op = OP_QUERY, .flags = 0x8000,
                       .requester = EDU_RID };
    g_assert_cmpuint(submit(t, &req, NULL, 0), ==, S_INVAL);
    req = (PvdmaReq) { .op = OP_QUERY, .requester = EDU_RID,
                       .reserved = { 0, 0, 1 } };
    g_assert_cmpuint(submit(t, &req, NULL, 0), ==, S_INVAL);
    segs[0] = (PvdmaSeg) { DATA_GPA, PAGE };
    req = (PvdmaReq) { .op = OP_MAP, .flags = FLAG_RW | 0x10,
                       .requester = EDU_RID, .nr_segs = 1 };
    g_assert_cmpuint(submit(t, &req, segs, 1), ==, S_INVAL);

    /* A misaligned block; its status is still written where it lies. */
    req = (PvdmaReq) { .op = OP_QUERY, .requester = EDU_RID };
    g_assert_cmpuint(submit_at(t, REQ_GPA + 0x1004, &req, NULL, 0), ==,
                     S_INVAL);

    /* MAP: no segments, an empty one, broken contiguity. */
    iova = 0;
    req = (PvdmaReq) { .op = OP_MAP, .flags = FLAG_RW, .requester = EDU_RID,
                       .nr_segs = 0 };
    g_assert_cmpuint(submit(t, &req, NULL, 0), ==, S_INVAL);
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW, &iova, DATA_GPA, 0), ==,
                     S_INVAL);
    /* The second segment does not start on a page. */
    segs[0] = (PvdmaSeg) { DATA_GPA, PAGE };
    segs[1] = (PvdmaSeg) { DATA_GPA + 3 * PAGE + 8, 8 };
    req = (PvdmaReq) { .op = OP_MAP, .flags = FLAG_RW, .requester = EDU_RID,
                       .nr_segs = 2 };
    g_assert_cmpuint(submit(t, &req, segs, 2), ==, S_INVAL);
    /* The first segment does not end on a page but is not the last. */
    segs[0] = (PvdmaSeg) { DATA_GPA, 0x800 };
    segs[1] = (PvdmaSeg) { DATA_GPA + 3 * PAGE, PAGE };
    g_assert_cmpuint(submit(t, &req, segs, 2), ==, S_INVAL);
    /* A segment wrapping the address space. */
    iova = 0;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW, &iova, ~0ULL - 0xfff,
                               0x2000), ==, S_INVAL);

    /* FIXED: in-page offset differs from the first segment's. */
    iova = IOVA_BASE + 0x10;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW | FLAG_FIXED, &iova,
                               DATA_GPA + 0x20, 0x10), ==, S_INVAL);
    /* FIXED: the range ends above 2^IOVA_BITS. */
    iova = (1ULL << iova_bits) - PAGE;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW | FLAG_FIXED, &iova,
                               DATA_GPA, 2 * PAGE), ==, S_INVAL);
    /* ... while its last page alone is fine. */
    iova = (1ULL << iova_bits) - PAGE;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW | FLAG_FIXED, &iova,
                               DATA_GPA, PAGE), ==, S_OK);

    /* Nothing above was mapped, except that last page. */
    g_assert_cmpuint(unmap(t, EDU_RID, 0, 1ULL << iova_bits, &iova), ==,
                     S_OK);
    g_assert_cmpuint(iova, ==, PAGE);
    pvdma_stop(t);
}

static void test_status_fault(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t iova = IOVA_BASE;
    PvdmaSeg segs[2];
    PvdmaReq req;

    attach(t, EDU_RID);

    /* A block outside RAM: nothing to write back, LAST_STATUS tells. */
    g_assert_cmpuint(ring(t, NOT_RAM_GPA), ==, S_FAULT);
    g_assert_cmpuint(ring(t, GUEST_RAM - 32), ==, S_FAULT);
    g_assert_cmpuint(do_op(t, OP_QUERY, EDU_RID, NULL), ==, S_OK);
    t->split_doorbell = true;
    g_assert_cmpuint(ring(t, 1ULL << 40), ==, S_FAULT);

    /* A block whose segment array runs off the end of RAM. */
    req = (PvdmaReq) { .op = OP_MAP, .flags = FLAG_RW, .requester = EDU_RID,
                       .nr_segs = 4 };
    segs[0] = (PvdmaSeg) { DATA_GPA, PAGE };
    g_assert_cmpuint(submit_at(t, GUEST_RAM - REQ_HEADER_SIZE - REQ_SEG_SIZE,
                               &req, segs, 1), ==, S_FAULT);

    /* Segments outside RAM, or straddling its end. */
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW | FLAG_FIXED, &iova,
                               NOT_RAM_GPA, PAGE), ==, S_FAULT);
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW | FLAG_FIXED, &iova,
                               GUEST_RAM - PAGE, 2 * PAGE), ==, S_FAULT);
    segs[0] = (PvdmaSeg) { DATA_GPA, PAGE };
    segs[1] = (PvdmaSeg) { NOT_RAM_GPA, PAGE };
    req = (PvdmaReq) { .op = OP_MAP, .flags = FLAG_RW, .requester = EDU_RID,
                       .nr_segs = 2 };
    g_assert_cmpuint(submit(t, &req, segs, 2), ==, S_FAULT);

    /* All or nothing: the first segment's page was not mapped. */
    g_assert_cmpuint(unmap(t, EDU_RID, 0, 1ULL << 28, NULL), ==, S_NOENT);
    pvdma_stop(t);
}

static void test_status_nospc(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(",iova-bits=21"));
    uint64_t iova, result;

    g_assert_cmpuint(reg_readl(t, PVDMA_REG_IOVA_BITS), ==, 21);
    attach(t, EDU_RID);

    /* 2 MiB of IOVA space, page 0 never handed out: 511 pages fit. */
    iova = 0;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_READ, &iova, DATA_GPA,
                               512 * PAGE), ==, S_NOSPC);
    iova = 0;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_READ, &iova, DATA_GPA,
                               511 * PAGE), ==, S_OK);
    g_assert_cmphex(iova, ==, PAGE);
    iova = 0;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_READ, &iova, DATA_GPA, 1),
                     ==, S_NOSPC);
    /* FIXED may still use page 0. */
    iova = 0;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_READ | FLAG_FIXED, &iova,
                               DATA_GPA, 1), ==, S_OK);
    /* Beyond the 21 bits, FIXED is INVAL. */
    iova = 1ULL << 21;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_READ | FLAG_FIXED, &iova,
                               DATA_GPA, 1), ==, S_INVAL);
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 2);
    pvdma_stop(t);
}

static void test_status_exist_noent_range(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t iova, result;

    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_RW, IOVA_BASE + 2 * PAGE, DATA_GPA, 2 * PAGE);

    /* EXIST: any page of a FIXED range already in use. */
    iova = IOVA_BASE + 3 * PAGE;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW | FLAG_FIXED, &iova,
                               DATA_GPA, PAGE), ==, S_EXIST);
    iova = IOVA_BASE;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW | FLAG_FIXED, &iova,
                               DATA_GPA, 3 * PAGE), ==, S_EXIST);
    /* ... and the free page in front of it was not taken either. */
    map_fixed(t, EDU_RID, FLAG_RW, IOVA_BASE, DATA_GPA, PAGE);

    /* NOENT: length 0 needs a mapping starting in that page. */
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE + 3 * PAGE, 0, NULL), ==,
                     S_NOENT);
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE + PAGE, 0, NULL), ==,
                     S_NOENT);
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE + 0x100000, PAGE, NULL), ==,
                     S_NOENT);

    /* RANGE: a mapping crosses either end; nothing is removed. */
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE + 3 * PAGE, PAGE, NULL), ==,
                     S_RANGE);
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE, 3 * PAGE, NULL), ==,
                     S_RANGE);
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE + 3 * PAGE, 0x10000, NULL),
                     ==, S_RANGE);

    /* The mappings survived those refusals intact. */
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE + 2 * PAGE + 0x10, 0,
                           &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 2 * PAGE);
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE + 0xfff, 1, &result), ==,
                     S_OK);
    g_assert_cmpuint(result, ==, PAGE);
    pvdma_stop(t);
}

static void test_status_toobig_perm(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint32_t max_segs = reg_readl(t, PVDMA_REG_MAX_SEGS);
    g_autofree PvdmaSeg *segs = g_new0(PvdmaSeg, max_segs + 1);
    uint64_t iova = IOVA_BASE, result;
    PvdmaReq req;
    uint32_t i;

    attach(t, EDU_RID);

    /* PERM: neither READ nor WRITE. */
    g_assert_cmpuint(map_range(t, EDU_RID, 0, &iova, DATA_GPA, PAGE), ==,
                     S_PERM);
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_FIXED, &iova, DATA_GPA, PAGE),
                     ==, S_PERM);

    /* MAX_SEGS one-page segments is the most a MAP may carry ... */
    for (i = 0; i <= max_segs; i++) {
        segs[i] = (PvdmaSeg) { DATA_GPA + (i % 64) * PAGE, PAGE };
    }
    req = (PvdmaReq) { .op = OP_MAP, .flags = FLAG_READ | FLAG_FIXED,
                       .requester = EDU_RID, .nr_segs = max_segs + 1,
                       .iova = IOVA_BASE };
    g_assert_cmpuint(submit(t, &req, segs, max_segs + 1), ==, S_TOOBIG);
    /* ... and that many is fine. */
    req = (PvdmaReq) { .op = OP_MAP, .flags = FLAG_READ | FLAG_FIXED,
                       .requester = EDU_RID, .nr_segs = max_segs,
                       .iova = IOVA_BASE };
    g_assert_cmpuint(submit(t, &req, segs, max_segs), ==, S_OK);
    g_assert_cmpuint(req.length, ==, max_segs * PAGE);
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE, 0, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, max_segs * PAGE);
    pvdma_stop(t);
}

static void test_status_quota(void)
{
    /* Four pages of pins for the whole VM. */
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(",pin-limit=16384"));
    uint64_t iova = IOVA_BASE, result;

    attach(t, EDU_RID);
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_RW | FLAG_FIXED, &iova,
                               DATA_GPA, 5 * PAGE), ==, S_QUOTA);
    map_fixed(t, EDU_RID, FLAG_RW, IOVA_BASE, DATA_GPA, 3 * PAGE);
    /* A page already pinned costs nothing more ... */
    map_fixed(t, EDU_RID, FLAG_READ, IOVA_BASE + 0x10000, DATA_GPA, PAGE);
    /* ... a new one does, up to the limit. */
    iova = IOVA_BASE + 0x20000;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_READ | FLAG_FIXED, &iova,
                               DATA_GPA + 8 * PAGE, 2 * PAGE), ==, S_QUOTA);
    map_fixed(t, EDU_RID, FLAG_READ, IOVA_BASE + 0x20000,
              DATA_GPA + 8 * PAGE, PAGE);
    iova = IOVA_BASE + 0x28000;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_READ | FLAG_FIXED, &iova,
                               DATA_GPA + 9 * PAGE, PAGE), ==, S_QUOTA);

    /* UNMAP releases the pins. */
    g_assert_cmpuint(unmap(t, EDU_RID, IOVA_BASE, 0, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 3 * PAGE);
    iova = IOVA_BASE + 0x30000;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_READ | FLAG_FIXED, &iova,
                               DATA_GPA + 9 * PAGE, 2 * PAGE), ==, S_OK);
    pvdma_stop(t);
}

/* DMA through pvdma */

/* Scratch page that edu may always read, to load its buffer from. */
#define SRC_GPA                 (DATA_GPA + 0x40000)
#define SRC_IOVA                (IOVA_BASE + 0x400000)
/* Target pages. */
#define DST_GPA                 (DATA_GPA + 0x10000)
#define DST_IOVA                (IOVA_BASE + 0x100000)

/* edu's buffer gets pattern @seed, read from SRC through @src_addr. */
static void edu_load_from(PvdmaTest *t, uint64_t src_addr, uint8_t seed)
{
    uint64_t before = faults(t);

    fill(t, SRC_GPA, seed, PAGE);
    edu_dma(t, false, src_addr, 0, PAGE);
    g_assert_cmpuint(faults(t), ==, before);
}

static void test_dma_translated(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));

    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    /* Let the untranslated destinations be recognisable. */
    qtest_memset(t->qts, SRC_IOVA, 0xaa, PAGE);
    qtest_memset(t->qts, DST_IOVA, 0xbb, PAGE);
    qtest_memset(t->qts, DST_GPA, 0xcc, PAGE);

    /* RAM -> edu through the IOVA reads the mapped page, not SRC_IOVA. */
    edu_load_from(t, SRC_IOVA, 0x31);
    /* edu -> RAM through the IOVA lands in DST_GPA. */
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    assert_filled(t, DST_GPA, 0x31, PAGE);
    assert_bytes(t, DST_IOVA, 0xbb, PAGE);
    assert_bytes(t, SRC_IOVA, 0xaa, PAGE);

    /* An unaligned slice inside the page keeps its offset. */
    qtest_memset(t->qts, DST_GPA, 0, PAGE);
    edu_dma(t, true, DST_IOVA + 0x321, 0x100, 0x80);
    assert_bytes(t, DST_GPA, 0, 0x321);
    assert_pattern(t, DST_GPA + 0x321, 0x31, 0x100, 0x80);
    assert_bytes(t, DST_GPA + 0x321 + 0x80, 0, PAGE - 0x321 - 0x80);
    g_assert_cmpuint(faults(t), ==, 0);
    pvdma_stop(t);
}

static void test_dma_scatter(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    PvdmaSeg segs[2] = {
        { DST_GPA + 3 * PAGE + 0x800, 0x800 },
        { DST_GPA, 0x800 },
    };
    PvdmaReq req = {
        .op = OP_MAP, .flags = FLAG_WRITE | FLAG_FIXED,
        .requester = EDU_RID, .nr_segs = 2, .iova = DST_IOVA + 0x800,
    };
    uint8_t a[0x800], b[0x800];
    int i;

    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    g_assert_cmpuint(submit(t, &req, segs, 2), ==, S_OK);

    /* One 4 KiB DMA, contiguous in IOVA space, split in guest memory. */
    edu_load_from(t, SRC_IOVA, 0x52);
    edu_dma(t, true, DST_IOVA + 0x800, 0, PAGE);
    qtest_memread(t->qts, DST_GPA + 3 * PAGE + 0x800, a, sizeof(a));
    qtest_memread(t->qts, DST_GPA, b, sizeof(b));
    for (i = 0; i < 0x800; i++) {
        g_assert_cmphex(a[i], ==, pattern(0x52, i));
        g_assert_cmphex(b[i], ==, pattern(0x52, i + 0x800));
    }
    g_assert_cmpuint(faults(t), ==, 0);
    pvdma_stop(t);
}

static void test_dma_unmapped(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t before;

    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    edu_load_from(t, SRC_IOVA, 0x17);
    qtest_memset(t->qts, DST_IOVA + PAGE, 0xbb, PAGE);
    qtest_memset(t->qts, DST_GPA + PAGE, 0xcc, PAGE);

    /* The page after the mapping is not mapped: refused, nothing lands. */
    before = faults(t);
    edu_dma(t, true, DST_IOVA + PAGE, 0, PAGE);
    g_assert_cmpuint(faults(t), >, before);
    assert_bytes(t, DST_IOVA + PAGE, 0xbb, PAGE);
    assert_bytes(t, DST_GPA + PAGE, 0xcc, PAGE);

    /* Reads of unmapped IOVAs are refused too. */
    before = faults(t);
    edu_dma(t, false, DST_IOVA + PAGE, 0, 64);
    g_assert_cmpuint(faults(t), >, before);

    /* After UNMAP the old IOVA no longer reaches its page. */
    g_assert_cmpuint(unmap(t, EDU_RID, DST_IOVA, 0, NULL), ==, S_OK);
    qtest_memset(t->qts, DST_GPA, 0xcc, PAGE);
    before = faults(t);
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    g_assert_cmpuint(faults(t), >, before);
    assert_bytes(t, DST_GPA, 0xcc, PAGE);
    pvdma_stop(t);
}

static void test_dma_read_only(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t before;

    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);

    /* Reading through the READ mapping works ... */
    edu_load_from(t, SRC_IOVA, 0x44);
    /* ... writing through it is refused and the page is untouched. */
    fill(t, SRC_GPA, 0x99, PAGE);
    before = faults(t);
    edu_dma(t, true, SRC_IOVA, 0, PAGE);
    g_assert_cmpuint(faults(t), >, before);
    assert_filled(t, SRC_GPA, 0x99, PAGE);

    /* A WRITE-only mapping refuses reads. */
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    before = faults(t);
    edu_dma(t, false, DST_IOVA, 0, 64);
    g_assert_cmpuint(faults(t), >, before);
    /* ... and what edu read earlier is what it writes through it. */
    edu_dma(t, true, DST_IOVA, 64, PAGE - 64);
    assert_pattern(t, DST_GPA, 0x44, 64, PAGE - 64);
    pvdma_stop(t);
}

static void test_dma_detach_bypass(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t result;

    /* Detached from the start: identity DMA. */
    edu_load_from(t, SRC_GPA, 0x61);
    qtest_memset(t->qts, DST_GPA, 0, PAGE);
    edu_dma(t, true, DST_GPA, 0, PAGE);
    assert_filled(t, DST_GPA, 0x61, PAGE);

    /* Attached, the same gpa is an unmapped IOVA. */
    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    qtest_memset(t->qts, DST_GPA, 0, PAGE);
    edu_dma(t, true, DST_GPA, 0, PAGE);
    g_assert_cmpuint(faults(t), >, 0);
    assert_bytes(t, DST_GPA, 0, PAGE);

    /* DETACH drops the mapping and returns to bypass. */
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 1);
    g_assert_cmphex(query(t, EDU_RID), ==, QUERY_BYPASS);
    qtest_memset(t->qts, DST_IOVA, 0, PAGE);
    edu_dma(t, true, DST_GPA, 0, PAGE);
    assert_filled(t, DST_GPA, 0x61, PAGE);
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    assert_filled(t, DST_IOVA, 0x61, PAGE);
    pvdma_stop(t);
}

static void test_dma_detach_blocked(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(",bypass=off"));
    uint64_t before, result;

    /* Not attached and no bypass: all its DMA is blocked. */
    fill(t, SRC_GPA, 0x70, PAGE);
    qtest_memset(t->qts, DST_GPA, 0xcc, PAGE);
    edu_dma(t, false, SRC_GPA, 0, PAGE);
    g_assert_cmpuint(faults(t), >, 0);
    before = faults(t);
    edu_dma(t, true, DST_GPA, 0, PAGE);
    g_assert_cmpuint(faults(t), >, before);
    assert_bytes(t, DST_GPA, 0xcc, PAGE);

    /* Attached and mapped it works ... */
    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    edu_load_from(t, SRC_IOVA, 0x70);
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    assert_filled(t, DST_GPA, 0x70, PAGE);

    /* ... and after DETACH it is blocked again. */
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 2);
    g_assert_cmphex(query(t, EDU_RID), ==, 0);
    qtest_memset(t->qts, DST_GPA, 0xcc, PAGE);
    qtest_memset(t->qts, DST_IOVA, 0xbb, PAGE);
    before = faults(t);
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    edu_dma(t, true, DST_GPA, 0, PAGE);
    g_assert_cmpuint(faults(t), >=, before + 2);
    assert_bytes(t, DST_GPA, 0xcc, PAGE);
    assert_bytes(t, DST_IOVA, 0xbb, PAGE);
    pvdma_stop(t);
}

static void test_device_order(void)
{
    /* edu first: it still gets its address space from pvdma. */
    PvdmaTest *t = pvdma_start("-M q35 -m 128M -device edu,addr=05.0 "
                               "-device pvdma,addr=04.0");
    uint64_t before;

    g_assert_cmphex(query(t, EDU_RID), ==, QUERY_BYPASS);
    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    edu_load_from(t, SRC_IOVA, 0x0d);
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    assert_filled(t, DST_GPA, 0x0d, PAGE);
    before = faults(t);
    edu_dma(t, true, DST_IOVA + PAGE, 0, PAGE);
    g_assert_cmpuint(faults(t), >, before);
    pvdma_stop(t);
}

static void test_system_reset(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t before;

    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    edu_dma(t, true, DST_IOVA + PAGE, 0, 64);  /* one refused access */
    g_assert_cmpuint(faults(t), >, 0);

    qtest_system_reset(t->qts);
    pvdma_enable(t);    /* reset cleared BARs and bus mastering */

    /* Every endpoint is detached and the refusal count starts over. */
    g_assert_cmphex(query(t, EDU_RID), ==, QUERY_BYPASS);
    g_assert_cmpuint(faults(t), ==, 0);

    /* Bypassing, the old IOVA is just a gpa again. */
    edu_load_from(t, SRC_GPA, 0x23);
    qtest_memset(t->qts, DST_GPA, 0xcc, PAGE);
    qtest_memset(t->qts, DST_IOVA, 0, PAGE);
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    assert_bytes(t, DST_GPA, 0xcc, PAGE);
    assert_filled(t, DST_IOVA, 0x23, PAGE);

    /* Attached again, the IOVA space is empty. */
    attach(t, EDU_RID);
    before = faults(t);
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    g_assert_cmpuint(faults(t), >, before);
    assert_bytes(t, DST_GPA, 0xcc, PAGE);
    g_assert_cmpuint(unmap(t, EDU_RID, 0, 1ULL << 28, NULL), ==, S_NOENT);
    pvdma_stop(t);
}

/* QMP and HMP */

/* query-pvdma's entry for the one pvdma device (a new reference). */
static QDict *pvdma_info(QTestState *qts)
{
    QDict *rsp = qtest_qmp(qts, "{ 'execute': 'query-pvdma' }");
    QList *list;
    QDict *info;

    g_assert(qdict_haskey(rsp, "return"));
    list = qdict_get_qlist(rsp, "return");
    g_assert_cmpuint(qlist_size(list), ==, 1);
    info = qobject_to(QDict, qlist_peek(list));
    g_assert_nonnull(info);
    qobject_ref(info);
    qobject_unref(rsp);
    return info;
}

/*
 * One guest page at IOVAs 512 GiB apart: no new pins, but new page tables
 * each time, until mem-limit stops it with QUOTA.
 */
static void test_status_quota_mem(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(",mem-limit=64K"));
    uint64_t iova, result;
    unsigned ok = 0;
    uint32_t st = S_OK;
    QDict *info;

    attach(t, EDU_RID);
    while (st == S_OK && ok < 64) {
        iova = (uint64_t)(ok + 1) << 39;
        st = map_range(t, EDU_RID, FLAG_READ | FLAG_FIXED, &iova, DATA_GPA,
                       PAGE);
        ok += st == S_OK;
    }
    g_assert_cmpuint(st, ==, S_QUOTA);
    g_assert_cmpuint(ok, >=, 2);
    g_assert_cmpuint(ok, <, 10);

    info = pvdma_info(t->qts);
    g_assert_cmpint(qdict_get_int(info, "mem-limit"), ==, 64 * KiB);
    g_assert_cmpint(qdict_get_int(info, "mem-used"), >, 0);
    g_assert_cmpint(qdict_get_int(info, "mem-used"), <=, 64 * KiB);
    g_assert_cmpint(qdict_get_int(info, "mappings"), ==, ok);
    g_assert_cmpint(qdict_get_int(info, "pinned-bytes"), ==, PAGE);
    qobject_unref(info);

    /* Next to a mapped page only the record is new */
    iova = (1ULL << 39) + PAGE;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_READ | FLAG_FIXED, &iova,
                               DATA_GPA, PAGE), ==, S_OK);
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, ok + 1);
    info = pvdma_info(t->qts);
    g_assert_cmpint(qdict_get_int(info, "mem-used"), ==, 0);
    g_assert_cmpint(qdict_get_int(info, "pinned-bytes"), ==, 0);
    qobject_unref(info);
    pvdma_stop(t);
}

/* The endpoints[] entry of @info for requester "bus:dev.fn", or NULL. */
static QDict *endpoint_info(QDict *info, const char *requester)
{
    QListEntry *e;

    QLIST_FOREACH_ENTRY(qdict_get_qlist(info, "endpoints"), e) {
        QDict *ep = qobject_to(QDict, qlist_entry_obj(e));

        if (!g_strcmp0(qdict_get_str(ep, "requester"), requester)) {
            return ep;
        }
    }
    return NULL;
}

static void assert_endpoint(QDict *info, const char *requester,
                            bool attached, int64_t mappings, int64_t bytes)
{
    QDict *ep = endpoint_info(info, requester);

    g_assert_nonnull(ep);
    g_assert_cmpint(qdict_get_bool(ep, "attached"), ==, attached);
    g_assert_false(qdict_get_bool(ep, "passthrough"));
    g_assert_cmpint(qdict_get_int(ep, "mappings"), ==, mappings);
    g_assert_cmpint(qdict_get_int(ep, "mapped-bytes"), ==, bytes);
}

#define UNMAPPED_IOVA           (IOVA_BASE + 0x200000)

static void test_qmp_hmp(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(",pin-limit=1M"));
    g_autofree char *hmp = NULL;
    g_autofree char *fault_line = NULL;
    QDict *info, *fault;
    QList *last_faults;
    uint64_t result;

    info = pvdma_info(t->qts);
    g_assert_cmpstr(qdict_get_str(info, "path"), ==,
                    "/machine/peripheral/pvdma0");
    g_assert_cmpstr(qdict_get_str(info, "id"), ==, "pvdma0");
    g_assert_cmphex(qdict_get_int(info, "features"), ==,
                    reg_readq(t, PVDMA_REG_FEATURES));
    g_assert_cmpint(qdict_get_int(info, "iova-bits"), ==,
                    reg_readl(t, PVDMA_REG_IOVA_BITS));
    g_assert_cmpint(qdict_get_int(info, "max-segs"), ==,
                    reg_readl(t, PVDMA_REG_MAX_SEGS));
    g_assert_cmpint(qdict_get_int(info, "pin-limit"), ==, 1 * MiB);
    g_assert_cmpint(qdict_get_int(info, "pinned-bytes"), ==, 0);
    /* The default bound on mapping memory */
    g_assert_cmpint(qdict_get_int(info, "mem-limit"), ==, 256 * MiB);
    g_assert_cmpint(qdict_get_int(info, "mem-used"), ==, 0);
    g_assert_cmpint(qdict_get_int(info, "mappings"), ==, 0);
    g_assert_cmpint(qdict_get_int(info, "faults"), ==, 0);
    g_assert_cmpuint(qlist_size(qdict_get_qlist(info, "last-faults")), ==, 0);
    /* Every function on the root bus but pvdma is an endpoint. */
    assert_endpoint(info, "00:05.0", false, 0, 0);
    assert_endpoint(info, "00:1f.0", false, 0, 0);
    g_assert_null(endpoint_info(info, "00:04.0"));
    qobject_unref(info);

    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, 2 * PAGE);
    /* Same guest page again: a third mapping, no new pin. */
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA + 0x10080, SRC_GPA + 0x80,
              0x10);
    edu_dma(t, true, UNMAPPED_IOVA, 0, 64);

    info = pvdma_info(t->qts);
    g_assert_cmpint(qdict_get_int(info, "mappings"), ==, 3);
    g_assert_cmpint(qdict_get_int(info, "pinned-bytes"), ==, 3 * PAGE);
    g_assert_cmpint(qdict_get_int(info, "faults"), ==, faults(t));
    g_assert_cmpint(qdict_get_int(info, "faults"), >, 0);
    g_assert_cmpint(qdict_get_int(info, "last-status"), ==, S_OK);
    assert_endpoint(info, "00:05.0", true, 3, 3 * PAGE + 0x10);
    assert_endpoint(info, "00:1f.0", false, 0, 0);
    last_faults = qdict_get_qlist(info, "last-faults");
    g_assert_cmpuint(qlist_size(last_faults), >, 0);
    fault = qobject_to(QDict, qlist_peek(last_faults));
    g_assert_cmpstr(qdict_get_str(fault, "requester"), ==, "00:05.0");
    g_assert_cmpstr(qdict_get_str(fault, "access"), ==, "write");
    g_assert_cmpstr(qdict_get_str(fault, "reason"), ==, "UNMAPPED");
    g_assert_cmphex(qdict_get_int(fault, "iova"), ==, UNMAPPED_IOVA);
    g_assert_cmpint(qdict_get_int(fault, "seq"), ==, 0);
    qobject_unref(info);

    hmp = qtest_hmp(t->qts, "info pvdma");
    g_test_message("info pvdma says: %s", hmp);
    g_assert_nonnull(strstr(hmp, "/machine/peripheral/pvdma0"));
    g_assert_nonnull(strstr(hmp, "mappings 3"));
    g_assert_nonnull(strstr(hmp, "endpoint 00:05.0: attached, 3 mappings"));
    g_assert_nonnull(strstr(hmp, "endpoint 00:1f.0: detached"));
    fault_line = g_strdup_printf("00:05.0 write at IOVA 0x%" PRIx64
                                 " refused: UNMAPPED",
                                 (uint64_t)UNMAPPED_IOVA);
    g_assert_nonnull(strstr(hmp, fault_line));

    /* DETACH shows up too. */
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 3);
    info = pvdma_info(t->qts);
    g_assert_cmpint(qdict_get_int(info, "mappings"), ==, 0);
    g_assert_cmpint(qdict_get_int(info, "pinned-bytes"), ==, 0);
    assert_endpoint(info, "00:05.0", false, 0, 0);
    qobject_unref(info);
    pvdma_stop(t);
}

/* The sum of the members of @what in query-pvdma's @info */
static int64_t counts_sum(QDict *info, const char *what)
{
    QDict *d = qdict_get_qdict(info, what);
    const QDictEntry *e;
    int64_t sum = 0;

    g_assert_nonnull(d);
    for (e = qdict_first(d); e; e = qdict_next(d, e)) {
        sum += qnum_get_int(qobject_to(QNum, qdict_entry_value(e)));
    }
    return sum;
}

static int64_t count_of(QDict *info, const char *what, const char *key)
{
    return qdict_get_int(qdict_get_qdict(info, what), key);
}

/* Request counters: every doorbell request shows up by op and transport */
static void test_qmp_counters(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    static const PvdmaRange second = { DST_IOVA + PAGE, PAGE };
    g_autofree char *hmp = NULL;
    QDict *info;

    info = pvdma_info(t->qts);
    g_assert_cmpint(counts_sum(info, "requests"), ==, 0);
    g_assert_cmpint(counts_sum(info, "transports"), ==, 0);
    qobject_unref(info);

    query(t, EDU_RID);
    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA + PAGE, DST_GPA, PAGE);
    g_assert_cmpuint(unmap(t, EDU_RID, DST_IOVA, 0, NULL), ==, S_OK);
    g_assert_cmpuint(unmap_list(t, EDU_RID, &second, 1, NULL), ==, S_OK);
    g_assert_cmpuint(do_op(t, 77, EDU_RID, NULL), ==, S_INVAL);
    g_assert_cmpuint(ring(t, NOT_RAM_GPA), ==, S_FAULT);
    g_assert_cmpuint(do_op(t, OP_DETACH, EDU_RID, NULL), ==, S_OK);

    info = pvdma_info(t->qts);
    g_assert_cmpint(count_of(info, "requests", "query"), ==, 1);
    g_assert_cmpint(count_of(info, "requests", "attach"), ==, 1);
    g_assert_cmpint(count_of(info, "requests", "map"), ==, 2);
    g_assert_cmpint(count_of(info, "requests", "unmap"), ==, 1);
    g_assert_cmpint(count_of(info, "requests", "unmap-list"), ==, 1);
    g_assert_cmpint(count_of(info, "requests", "detach"), ==, 1);
    g_assert_cmpint(count_of(info, "requests", "other"), ==, 2);
    g_assert_cmpint(count_of(info, "transports", "doorbell"), ==, 9);
    g_assert_cmpint(count_of(info, "transports", "hypercall"), ==, 0);
    g_assert_cmpint(counts_sum(info, "requests"), ==,
                    counts_sum(info, "transports"));
    qobject_unref(info);

    hmp = qtest_hmp(t->qts, "info pvdma");
    g_assert_nonnull(strstr(hmp, "requests: query 1, attach 1, detach 1, "
/* @series-until queue */
                            "map 2, unmap 1, unmap-list 1, other 2"));
/* @series-end queue */
/* @series-begin queue */
                            "map 2, unmap 1, unmap-list 1, queue 0, "
                            "sync 0, other 2"));
/* @series-end queue */
    g_assert_nonnull(strstr(hmp, "transports: doorbell 9, hypercall 0"));

    /* Reset does not clear them */
    qtest_qmp_assert_success(t->qts, "{ 'execute': 'system_reset' }");
    info = pvdma_info(t->qts);
    g_assert_cmpint(count_of(info, "transports", "doorbell"), ==, 9);
    qobject_unref(info);
    pvdma_stop(t);
}

/* UNMAP_LIST (FEATURES bit 3) */

#define UL_IOVA(n)              (IOVA_BASE + (n))

static void assert_mappings(PvdmaTest *t, int64_t n, int64_t bytes)
{
    QDict *info = pvdma_info(t->qts);

    g_assert_cmpint(qdict_get_int(info, "mappings"), ==, n);
    assert_endpoint(info, "00:05.0", true, n, bytes);
    qobject_unref(info);
}

static void test_unmap_list(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    /* M1 one page, M2 two pages, M3 one page: the list removes them */
    static const PvdmaRange crosses[] = {
        { UL_IOVA(0), PAGE }, { UL_IOVA(0x2000), PAGE },
    };
    static const PvdmaRange empty[] = {
        { UL_IOVA(0), PAGE }, { UL_IOVA(0x30000), PAGE },
    };
    static const PvdmaRange overlap[] = {
        { UL_IOVA(0x10000), PAGE }, { UL_IOVA(0x800), 0x10000 },
    };
    static const PvdmaRange zero_len[] = {
        { UL_IOVA(0), PAGE }, { UL_IOVA(0x10000), 0 },
    };
    static const PvdmaRange good[] = {
        { UL_IOVA(0x10123), 1 },        /* M3 by one byte */
        { UL_IOVA(0), PAGE },           /* M1 */
        { UL_IOVA(0x2000), 2 * PAGE },  /* M2 */
    };
    static const uint64_t removed[] = {
        UL_IOVA(0), UL_IOVA(0x3000), UL_IOVA(0x10000),
    };
    uint64_t result = 0, before;
    QDict *info;
    size_t i;

    g_assert_cmphex(reg_readq(t, PVDMA_REG_FEATURES) & PVDMA_F_UNMAP_LIST,
                    ==, PVDMA_F_UNMAP_LIST);
    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, UL_IOVA(0), DST_GPA, PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, UL_IOVA(0x2000), DST_GPA + PAGE,
              2 * PAGE);
    map_fixed(t, EDU_RID, FLAG_WRITE, UL_IOVA(0x10000), DST_GPA + 3 * PAGE,
              PAGE);
    /* M4 stays */
    map_fixed(t, EDU_RID, FLAG_WRITE, UL_IOVA(0x20000), DST_GPA + 4 * PAGE,
              PAGE);
    assert_mappings(t, 5, 6 * PAGE);

    /* Refusals remove nothing */
    g_assert_cmpuint(unmap_list(t, EDU_RID, crosses, 2, NULL), ==, S_RANGE);
    g_assert_cmpuint(unmap_list(t, EDU_RID, empty, 2, NULL), ==, S_NOENT);
    g_assert_cmpuint(unmap_list(t, EDU_RID, overlap, 2, NULL), ==, S_INVAL);
    g_assert_cmpuint(unmap_list(t, EDU_RID, zero_len, 2, NULL), ==, S_INVAL);
    g_assert_cmpuint(unmap_list(t, EDU_RID, good, 0, NULL), ==, S_INVAL);
    g_assert_cmpuint(unmap_list(t, RID(EMPTY_SLOT), good, 3, NULL), ==,
                     S_NODEV);
    assert_mappings(t, 5, 6 * PAGE);
    edu_load_from(t, SRC_IOVA, 0x5a);
    qtest_memset(t->qts, DST_GPA, 0, PAGE);
    edu_dma(t, true, UL_IOVA(0), 0, PAGE);
    assert_filled(t, DST_GPA, 0x5a, PAGE);

    /* Three mappings in one request, the ranges out of order */
    g_assert_cmpuint(unmap_list(t, EDU_RID, good, 3, &result), ==, S_OK);
    g_assert_cmphex(result, ==, 4 * PAGE);
    assert_mappings(t, 2, 2 * PAGE);

    /* edu can no longer reach any removed range; M4 still works */
    qtest_memset(t->qts, DST_GPA, 0xcc, 4 * PAGE);
    for (i = 0; i < ARRAY_SIZE(removed); i++) {
        before = faults(t);
        edu_dma(t, true, removed[i], 0, PAGE);
        g_assert_cmpuint(faults(t), >, before);
    }
    assert_bytes(t, DST_GPA, 0xcc, 4 * PAGE);
    before = faults(t);
    edu_dma(t, true, UL_IOVA(0x20000), 0, PAGE);
    assert_filled(t, DST_GPA + 4 * PAGE, 0x5a, PAGE);
    g_assert_cmpuint(faults(t), ==, before);

    /* Once removed, the same list finds nothing */
    g_assert_cmpuint(unmap_list(t, EDU_RID, good, 3, NULL), ==, S_NOENT);

    info = pvdma_info(t->qts);
    g_assert_cmpint(count_of(info, "requests", "unmap-list"), ==, 8);
    g_assert_cmpint(count_of(info, "requests", "other"), ==, 0);
    qobject_unref(info);
    pvdma_stop(t);
}

/* unmap-list=off: FEATURES bit 3 clear and op 6 is an unknown op */
static void test_unmap_list_off(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(",unmap-list=off"));
    static const PvdmaRange r = { DST_IOVA, PAGE };
    QDict *info;

    g_assert_cmphex(reg_readq(t, PVDMA_REG_FEATURES) & PVDMA_F_UNMAP_LIST,
                    ==, 0);
    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    g_assert_cmpuint(unmap_list(t, EDU_RID, &r, 1, NULL), ==, S_INVAL);
    assert_mappings(t, 1, PAGE);

    info = pvdma_info(t->qts);
    g_assert_cmphex(qdict_get_int(info, "features") & PVDMA_F_UNMAP_LIST,
                    ==, 0);
    g_assert_cmpint(count_of(info, "requests", "unmap-list"), ==, 0);
    g_assert_cmpint(count_of(info, "requests", "other"), ==, 1);
    qobject_unref(info);
    pvdma_stop(t);
}

static void test_qmp_no_device(void)
{
    QTestState *qts = qtest_init("-M q35");
    QDict *rsp = qtest_qmp(qts, "{ 'execute': 'query-pvdma' }");
    g_autofree char *hmp = NULL;

    g_assert_cmpuint(qlist_size(qdict_get_qlist(rsp, "return")), ==, 0);
    qobject_unref(rsp);
    hmp = qtest_hmp(qts, "info pvdma");
    g_assert_nonnull(strstr(hmp, "No pvdma device"));
    qtest_quit(qts);
}

/* Migration */

/* The BAR the firmware (here: the source's test) programmed, read back. */
static QPCIBar bar_of(QPCIDevice *dev)
{
    uint32_t bar0 = qpci_config_readl(dev, PCI_BASE_ADDRESS_0);

    g_assert_cmphex(bar0 & PCI_BASE_ADDRESS_SPACE, ==,
                    PCI_BASE_ADDRESS_SPACE_MEMORY);
    return (QPCIBar) { .addr = bar0 & PCI_BASE_ADDRESS_MEM_MASK };
}

static void wait_migration_completed(QTestState *qts)
{
    gint64 deadline = g_get_monotonic_time() + 60 * G_USEC_PER_SEC;

    for (;;) {
        QDict *rsp = qtest_qmp_assert_success_ref(
            qts, "{ 'execute': 'query-migrate' }");
        const char *status = qdict_get_try_str(rsp, "status");
        bool done = !g_strcmp0(status, "completed");

        g_assert_cmpstr(status, !=, "failed");
        qobject_unref(rsp);
        if (done) {
            return;
        }
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(10 * 1000);
    }
}

/* @series-begin queue-test */
/*
 * With QTEST_QEMU_BINARY_SRC set to an older QEMU (one without queued
 * requests, say), the source is that QEMU: its stream must load here.
 */
/* @series-end queue-test */
static void test_migration(void)
{
    g_autofree char *dir = g_dir_make_tmp("pvdma-test-XXXXXX", NULL);
    g_autofree char *uri = g_strdup_printf("unix:%s/migration", dir);
/* @series-until queue-test */
    PvdmaTest *src = pvdma_start(DEVICE_ARGS(""));
/* @series-end queue-test */
/* @series-begin queue-test */
    PvdmaTest *src = pvdma_start_ext("QTEST_QEMU_BINARY_SRC",
                                     DEVICE_ARGS(""));
/* @series-end queue-test */
    PvdmaTest *dst = g_new0(PvdmaTest, 1);
    uint64_t before, result;
    QDict *info;

    attach(src, EDU_RID);
    map_fixed(src, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    map_fixed(src, EDU_RID, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    /* The source works before it goes. */
    edu_load_from(src, SRC_IOVA, 0x3c);
    edu_dma(src, true, DST_IOVA, 0, PAGE);
    assert_filled(src, DST_GPA, 0x3c, PAGE);
    fill(src, SRC_GPA, 0x5a, PAGE);
    qtest_memset(src->qts, DST_GPA, 0xcc, PAGE);
    qtest_memset(src->qts, DST_IOVA, 0xbb, PAGE);

    pvdma_attach_devices(dst, qtest_initf(DEVICE_ARGS("") " -incoming %s",
                                          uri));
    qtest_qmp_assert_success(src->qts, "{ 'execute': 'migrate',"
                             "  'arguments': { 'uri': %s } }", uri);
    wait_migration_completed(src->qts);
    wait_migration_completed(dst->qts);

    /* pvdma's PCI state came along: its BAR is where the source put it. */
    dst->bar = bar_of(dst->pvdma);
    g_assert_cmphex(dst->bar.addr, ==, src->bar.addr);
    g_assert_cmphex(qpci_io_readl(dst->pvdma, dst->bar, PVDMA_REG_MAGIC), ==,
                    PVDMA_MAGIC);
    /*
     * edu has no migration state at all (no vmsd in hw/misc/edu.c), so it
     * arrives reset: program its BAR and bus mastering as on the source.
     */
    qpci_config_writel(dst->edu, PCI_BASE_ADDRESS_0, src->edu_bar.addr);
    qpci_device_enable(dst->edu);
    dst->edu_bar = bar_of(dst->edu);
    g_assert_cmphex(dst->edu_bar.addr, ==, src->edu_bar.addr);

    /* The destination translates as the source did. */
    g_assert_cmphex(query(dst, EDU_RID), ==, QUERY_ATTACHED);
    info = pvdma_info(dst->qts);
    g_assert_cmpint(qdict_get_int(info, "mappings"), ==, 2);
    g_assert_cmpint(qdict_get_int(info, "pinned-bytes"), ==, 2 * PAGE);
    assert_endpoint(info, "00:05.0", true, 2, 2 * PAGE);
    assert_endpoint(info, "00:1f.0", false, 0, 0);
    qobject_unref(info);
    before = faults(dst);
    edu_dma(dst, false, SRC_IOVA, 0, PAGE);
    edu_dma(dst, true, DST_IOVA, 0, PAGE);
    assert_filled(dst, DST_GPA, 0x5a, PAGE);
    assert_bytes(dst, DST_IOVA, 0xbb, PAGE);
    g_assert_cmpuint(faults(dst), ==, before);

    /* ... permissions included, and nothing else is mapped. */
    qtest_memset(dst->qts, DST_GPA, 0xcc, PAGE);
    edu_dma(dst, true, SRC_IOVA, 0, PAGE);
    g_assert_cmpuint(faults(dst), >, before);
    assert_filled(dst, SRC_GPA, 0x5a, PAGE);
    before = faults(dst);
    edu_dma(dst, true, DST_IOVA + PAGE, 0, PAGE);
    g_assert_cmpuint(faults(dst), >, before);

    /* The mappings are real state: UNMAP finds them, DETACH counts them. */
    g_assert_cmpuint(do_op(dst, OP_ATTACH, EDU_RID, NULL), ==, S_STATE);
    g_assert_cmpuint(unmap(dst, EDU_RID, DST_IOVA, 0, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, PAGE);
    g_assert_cmpuint(do_op(dst, OP_DETACH, EDU_RID, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 1);

    pvdma_stop(dst);
    pvdma_stop(src);
    g_rmdir(dir);
}
/* @series-begin dma-bench-test */

/* x-pvdma-dma-bench */

#define BENCH_CMD  "{ 'execute': 'x-pvdma-dma-bench', 'arguments': {"   \
                   " 'device': %s, 'iterations': %" PRIu64 ","           \
                   " 'segments': [ { 'addr': %" PRIu64 ","               \
                   " 'len': %" PRIu64 " } ] } }"
#define HUGE_IOVA  (IOVA_BASE + 0x1000000)  /* 2 MiB aligned */
#define HUGE_GPA   0x2000000ULL             /* 2 MiB aligned */
#define HUGE_LEN   (2 * MiB)

/* The transfers done, or 0 when the command failed */
static uint64_t bench(PvdmaTest *t, const char *device, uint64_t iterations,
                      uint64_t addr, uint64_t len)
{
    QDict *rsp = qtest_qmp(t->qts, BENCH_CMD, device, iterations, addr, len);
    QDict *ret = qdict_get_qdict(rsp, "return");
    uint64_t done = 0;

    if (ret) {
        done = qdict_get_uint(ret, "iterations");
        g_assert_cmpuint(qdict_get_uint(ret, "bytes"), ==, len);
        g_assert_cmpuint(qdict_get_uint(ret, "wall-ns"), >, 0);
    } else {
        g_assert(qdict_haskey(rsp, "error"));
    }
    qobject_unref(rsp);
    return done;
}

static void test_dma_bench(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS("") ",id=edu0");
    QDict *rsp;
    uint64_t before;

    attach(t, EDU_RID);
    map_fixed(t, EDU_RID, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    g_assert_cmpuint(bench(t, "edu0", 10, SRC_IOVA, PAGE), ==, 10);
    g_assert_cmpuint(bench(t, "/machine/peripheral/edu0", 1, SRC_IOVA + 8,
                           16), ==, 1);

    /* Bad arguments fail, with nothing timed */
    g_assert_cmpuint(bench(t, "edu0", 0, SRC_IOVA, PAGE), ==, 0);
    g_assert_cmpuint(bench(t, "edu0", 100000001, SRC_IOVA, PAGE), ==, 0);
    g_assert_cmpuint(bench(t, "edu0", 1, SRC_IOVA, 0), ==, 0);
    g_assert_cmpuint(bench(t, "edu0", 1, SRC_IOVA, MiB + 1), ==, 0);
    g_assert_cmpuint(bench(t, "edu0", 1, UINT64_MAX - PAGE + 1, 2 * PAGE),
                     ==, 0);
    g_assert_cmpuint(bench(t, "nosuch", 1, SRC_IOVA, PAGE), ==, 0);
    g_assert_cmpuint(bench(t, "/machine", 1, SRC_IOVA, PAGE), ==, 0);
    rsp = qtest_qmp(t->qts, "{ 'execute': 'x-pvdma-dma-bench',"
                    " 'arguments': { 'device': 'edu0', 'iterations': 1,"
                    " 'segments': [] } }");
    g_assert(qdict_haskey(rsp, "error"));
    qobject_unref(rsp);

    /* A refused DMA fails the command, and is refused as ever */
    before = faults(t);
    g_assert_cmpuint(bench(t, "edu0", 1, SRC_IOVA + PAGE, PAGE), ==, 0);
    g_assert_cmpuint(faults(t), >, before);

    /*
     * A 2 MiB mapping, which the table holds as one 2 MiB leaf: reads
     * reach neither past it nor, after UNMAP, into it.
     */
    map_fixed(t, EDU_RID, FLAG_READ, HUGE_IOVA, HUGE_GPA, HUGE_LEN);
    g_assert_cmpuint(bench(t, "edu0", 2, HUGE_IOVA, MiB), ==, 2);
    g_assert_cmpuint(bench(t, "edu0", 2, HUGE_IOVA + HUGE_LEN - PAGE, PAGE),
                     ==, 2);
    before = faults(t);
    g_assert_cmpuint(bench(t, "edu0", 1, HUGE_IOVA + HUGE_LEN - PAGE,
                           2 * PAGE), ==, 0);
    g_assert_cmpuint(bench(t, "edu0", 1, HUGE_IOVA - PAGE, 2 * PAGE), ==, 0);
    g_assert_cmpuint(faults(t), >, before);
    g_assert_cmpuint(unmap(t, EDU_RID, HUGE_IOVA, 0, NULL), ==, S_OK);
    before = faults(t);
    g_assert_cmpuint(bench(t, "edu0", 1, HUGE_IOVA + MiB, PAGE), ==, 0);
    g_assert_cmpuint(faults(t), >, before);

    /*
     * Two neighbouring 32 KiB mappings, neighbours in guest RAM too: one
     * 64 KiB read crosses both; after one is unmapped it is refused, and
     * the other still reads.
     */
    map_fixed(t, EDU_RID, FLAG_READ, HUGE_IOVA, HUGE_GPA, 32 * KiB);
    map_fixed(t, EDU_RID, FLAG_READ, HUGE_IOVA + 32 * KiB,
              HUGE_GPA + 32 * KiB, 32 * KiB);
    g_assert_cmpuint(bench(t, "edu0", 2, HUGE_IOVA, 64 * KiB), ==, 2);
    g_assert_cmpuint(unmap(t, EDU_RID, HUGE_IOVA + 32 * KiB, 0, NULL), ==,
                     S_OK);
    before = faults(t);
    g_assert_cmpuint(bench(t, "edu0", 1, HUGE_IOVA, 64 * KiB), ==, 0);
    g_assert_cmpuint(faults(t), >, before);
    g_assert_cmpuint(bench(t, "edu0", 2, HUGE_IOVA, 32 * KiB), ==, 2);
    pvdma_stop(t);
}
/* @series-end dma-bench-test */

/* @series-begin queue-test */

/*
 * Queued requests (FEATURES.QUEUE): a control block and a ring of 32-byte
 * MAP/UNMAP entries in guest memory, set up with QUEUE (op 7) and applied
 * by the device before any request, at SYNC (op 8), and before it refuses
 * a DMA access.
 */
#define Q_CTRL_GPA              0x200000ULL   /* control blocks, 4 KiB apart */
#define Q_RING_GPA              0x300000ULL   /* rings, 64 KiB apart */
#define Q_RING_LEN              0x1000ULL     /* 128 entries */
#define Q_ENTRY_SIZE            32

typedef struct PvdmaQueue {
    uint32_t index;
    uint64_t ctrl;
    uint64_t ring;
    uint32_t entries;
    uint32_t head;          /* the next entry the test publishes */
} PvdmaQueue;

typedef struct PvdmaCtrl {
    uint32_t head;
    uint32_t tail;
    uint32_t failed;
    uint32_t last_error;
    uint32_t stopped;
} PvdmaCtrl;

static uint32_t queue_request(PvdmaTest *t, uint32_t rid, uint32_t index,
                              const PvdmaSeg *segs, uint32_t nsegs)
{
    PvdmaReq req = {
        .op = OP_QUEUE, .requester = rid, .nr_segs = nsegs, .iova = index,
    };

    return submit(t, &req, segs, nsegs);
}

static uint32_t queue_setup_at(PvdmaTest *t, uint32_t index, uint64_t ctrl,
                               uint64_t ctrl_len, uint64_t ring,
                               uint64_t ring_len)
{
    PvdmaSeg segs[2] = { { ctrl, ctrl_len }, { ring, ring_len } };

    return queue_request(t, EDU_RID, index, segs, 2);
}

static uint32_t queue_teardown(PvdmaTest *t, uint32_t index)
{
    return queue_request(t, EDU_RID, index, NULL, 0);
}

static void ctrl_read(PvdmaTest *t, uint64_t ctrl, PvdmaCtrl *c)
{
    uint8_t buf[20];

    qtest_memread(t->qts, ctrl, buf, sizeof(buf));
    c->head = ldl_le_p(buf);
    c->tail = ldl_le_p(buf + 4);
    c->failed = ldl_le_p(buf + 8);
    c->last_error = ldl_le_p(buf + 12);
    c->stopped = ldl_le_p(buf + 16);
}

/*
 * Sets queue @index up with the default layout, its head at @head (which
 * the device takes as its tail), and checks what the device wrote.
 */
static void queue_setup(PvdmaTest *t, PvdmaQueue *q, uint32_t index,
                        uint32_t head)
{
    PvdmaCtrl c;

    q->index = index;
    q->ctrl = Q_CTRL_GPA + index * PAGE;
    q->ring = Q_RING_GPA + index * 0x10000;
    q->entries = Q_RING_LEN / Q_ENTRY_SIZE;
    q->head = head;
    /* Junk where the device writes, to see that it does */
    qtest_memset(t->qts, q->ctrl, 0x5a, 64);
    qtest_memset(t->qts, q->ctrl + 20, 0, 44);
    qtest_writel(t->qts, q->ctrl, head);
    g_assert_cmpuint(queue_setup_at(t, index, q->ctrl, 64, q->ring,
                                    Q_RING_LEN), ==, S_OK);
    ctrl_read(t, q->ctrl, &c);
    g_assert_cmpuint(c.head, ==, head);
    g_assert_cmpuint(c.tail, ==, head);
    g_assert_cmpuint(c.failed, ==, 0);
    g_assert_cmpuint(c.last_error, ==, 0);
    g_assert_cmpuint(c.stopped, ==, 0);
}

/* Writes an entry into the next slot, and publishes it when @publish. */
static void queue_entry(PvdmaTest *t, PvdmaQueue *q, uint16_t op,
                        uint16_t flags, uint32_t rid, uint64_t iova,
                        uint64_t gpa, uint64_t len, bool publish)
{
    uint8_t e[Q_ENTRY_SIZE];

    stw_le_p(e, op);
    stw_le_p(e + 2, flags);
    stl_le_p(e + 4, rid);
    stq_le_p(e + 8, iova);
    stq_le_p(e + 16, gpa);
    stq_le_p(e + 24, len);
    qtest_memwrite(t->qts, q->ring + (q->head % q->entries) * Q_ENTRY_SIZE,
                   e, sizeof(e));
    q->head++;
    if (publish) {
        qtest_writel(t->qts, q->ctrl, q->head);
    }
}

static void queue_map(PvdmaTest *t, PvdmaQueue *q, uint16_t flags,
                      uint64_t iova, uint64_t gpa, uint64_t len)
{
    queue_entry(t, q, OP_MAP, flags, EDU_RID, iova, gpa, len, true);
}

static void queue_unmap(PvdmaTest *t, PvdmaQueue *q, uint64_t iova,
                        uint64_t len)
{
    queue_entry(t, q, OP_UNMAP, 0, EDU_RID, iova, 0, len, true);
}

static uint32_t sync_queues(PvdmaTest *t, uint64_t *result)
{
    PvdmaReq req = { .op = OP_SYNC, .requester = EDU_RID };
    uint32_t status = submit(t, &req, NULL, 0);

    *result = req.result;
    return status;
}

/* query-pvdma's entry for queue @index (a new reference) */
static QDict *queue_info(QTestState *qts, uint32_t index)
{
    QDict *info = pvdma_info(qts);
    QList *queues = qdict_get_qlist(info, "queues");
    QListEntry *e;
    QDict *q = NULL;

    QLIST_FOREACH_ENTRY(queues, e) {
        QDict *d = qobject_to(QDict, qlist_entry_obj(e));

        if (qdict_get_int(d, "index") == index) {
            q = d;
            qobject_ref(q);
        }
    }
    qobject_unref(info);
    g_assert_nonnull(q);
    return q;
}

static int64_t info_int(QTestState *qts, const char *key)
{
    QDict *info = pvdma_info(qts);
    int64_t v = qdict_get_int(info, key);

    qobject_unref(info);
    return v;
}

/* Set-up and tear-down, and the status codes of QUEUE */
static void test_queue_setup(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t ctrl = Q_CTRL_GPA, ring = Q_RING_GPA;
    PvdmaSeg seg = { ctrl, 64 }, segs3[3];
    g_autofree char *hmp = NULL;
    PvdmaReq req;
    PvdmaQueue q;
    QDict *info;
    QList *list;

    g_assert_cmpuint(reg_readl(t, PVDMA_REG_QUEUES), ==, 8);

    /* Sizes, alignment and overlap: INVAL */
    g_assert_cmpuint(queue_setup_at(t, 0, ctrl, 32, ring, Q_RING_LEN), ==,
                     S_INVAL);
    g_assert_cmpuint(queue_setup_at(t, 0, ctrl, 128, ring, Q_RING_LEN), ==,
                     S_INVAL);
    g_assert_cmpuint(queue_setup_at(t, 0, ctrl + 32, 64, ring, Q_RING_LEN),
                     ==, S_INVAL);
    g_assert_cmpuint(queue_setup_at(t, 0, ctrl, 64, ring, 0x800), ==,
                     S_INVAL);
    g_assert_cmpuint(queue_setup_at(t, 0, ctrl, 64, ring, 0x3000), ==,
                     S_INVAL);
    g_assert_cmpuint(queue_setup_at(t, 0, ctrl, 64, ring, 2 * MiB), ==,
                     S_INVAL);
    g_assert_cmpuint(queue_setup_at(t, 0, ctrl, 64, ring + 0x800,
                                    Q_RING_LEN), ==, S_INVAL);
    g_assert_cmpuint(queue_setup_at(t, 0, ring + 0x40, 64, ring,
                                    Q_RING_LEN), ==, S_INVAL);
    /* Not RAM: FAULT */
    g_assert_cmpuint(queue_setup_at(t, 0, NOT_RAM_GPA, 64, ring,
                                    Q_RING_LEN), ==, S_FAULT);
    g_assert_cmpuint(queue_setup_at(t, 0, ctrl, 64, NOT_RAM_GPA,
                                    Q_RING_LEN), ==, S_FAULT);
    /* An index past QUEUES, or a segment count other than 0 and 2 */
    g_assert_cmpuint(queue_setup_at(t, 8, ctrl, 64, ring, Q_RING_LEN), ==,
                     S_INVAL);
    g_assert_cmpuint(queue_setup_at(t, UINT32_MAX, ctrl, 64, ring,
                                    Q_RING_LEN), ==, S_INVAL);
    segs3[0] = (PvdmaSeg) { ctrl, 64 };
    segs3[1] = (PvdmaSeg) { ring, Q_RING_LEN };
    segs3[2] = (PvdmaSeg) { ring + Q_RING_LEN, Q_RING_LEN };
    req = (PvdmaReq) {
        .op = OP_QUEUE, .requester = EDU_RID, .nr_segs = 2,
        .iova = 1ULL << 32,
    };
    g_assert_cmpuint(submit(t, &req, segs3, 2), ==, S_INVAL);
    g_assert_cmpuint(queue_request(t, EDU_RID, 0, &seg, 1), ==, S_INVAL);
    g_assert_cmpuint(queue_request(t, EDU_RID, 0, segs3, 3), ==, S_INVAL);
    /* The requester must be an endpoint */
    req = (PvdmaReq) { .op = OP_QUEUE, .requester = EMPTY_RID };
    g_assert_cmpuint(submit(t, &req, NULL, 0), ==, S_NODEV);
    /* Tear-down of a queue that is not set up */
    g_assert_cmpuint(queue_teardown(t, 0), ==, S_STATE);
    g_assert_cmpuint(queue_teardown(t, 8), ==, S_INVAL);

    info = queue_info(t->qts, 0);
    g_assert_false(qdict_get_bool(info, "set-up"));
    qobject_unref(info);

    /* Set up with head 5: nothing published before is ever applied */
    queue_setup(t, &q, 0, 5);
    g_assert_cmpuint(queue_setup_at(t, 0, Q_CTRL_GPA + 7 * PAGE, 64,
                                    Q_RING_GPA + 7 * 0x10000, Q_RING_LEN),
                     ==, S_STATE);
    info = queue_info(t->qts, 0);
    g_assert_true(qdict_get_bool(info, "set-up"));
    g_assert_cmphex(qdict_get_int(info, "ctrl-gpa"), ==, q.ctrl);
    g_assert_cmphex(qdict_get_int(info, "ring-gpa"), ==, q.ring);
    g_assert_cmpuint(qdict_get_int(info, "entries"), ==, 128);
    g_assert_cmpuint(qdict_get_int(info, "head"), ==, 5);
    g_assert_cmpuint(qdict_get_int(info, "tail"), ==, 5);
    g_assert_cmpuint(qdict_get_int(info, "failed"), ==, 0);
    g_assert_cmpuint(qdict_get_int(info, "last-error"), ==, 0);
    g_assert_false(qdict_get_bool(info, "stopped"));
    g_assert_cmpuint(qdict_get_int(info, "applied"), ==, 0);
    qobject_unref(info);
    info = pvdma_info(t->qts);
    list = qdict_get_qlist(info, "queues");
    g_assert_cmpuint(qlist_size(list), ==, 8);
    qobject_unref(info);
    hmp = qtest_hmp(t->qts, "info pvdma");
    g_test_message("info pvdma says: %s", hmp);
    g_assert_nonnull(strstr(hmp, "queues 8: drains "));
    g_assert_nonnull(strstr(hmp, "queue 0: ctrl 0x200000, ring 0x300000 "
                            "(128 entries), head 5, tail 5, failed 0"));
    g_assert_null(strstr(hmp, "queue 1:"));

    /* Tear-down, after which the index can be set up again */
    g_assert_cmpuint(queue_teardown(t, 0), ==, S_OK);
    g_assert_cmpuint(queue_teardown(t, 0), ==, S_STATE);
    info = queue_info(t->qts, 0);
    g_assert_false(qdict_get_bool(info, "set-up"));
    qobject_unref(info);
    queue_setup(t, &q, 0, 0);
    queue_setup(t, &q, 7, UINT32_MAX);
    pvdma_stop(t);
}

/*
 * Rule 1: a request applies what is published first, so a queued MAP and
 * a synchronous request after it take effect in that order.
 */
static void test_queue_rule1(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t result = 0, before;
    PvdmaCtrl c;
    PvdmaQueue q;

    attach(t, EDU_RID);
    queue_setup(t, &q, 0, 0);
    queue_map(t, &q, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    /* The synchronous UNMAP finds the mapping the queue holds */
    g_assert_cmpuint(unmap(t, EDU_RID, DST_IOVA, 0, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, PAGE);
    ctrl_read(t, q.ctrl, &c);
    g_assert_cmpuint(c.tail, ==, 1);
    g_assert_cmpuint(c.failed, ==, 0);

    /* So it is gone: the DMA is refused */
    qtest_memset(t->qts, DST_GPA, 0xcc, PAGE);
    before = faults(t);
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    g_assert_cmpuint(faults(t), >, before);
    assert_bytes(t, DST_GPA, 0xcc, PAGE);

    /* A queued MAP, then a synchronous MAP of the same IOVA: EXIST */
    queue_map(t, &q, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    result = DST_IOVA;
    g_assert_cmpuint(map_range(t, EDU_RID, FLAG_WRITE | FLAG_FIXED, &result,
                               DST_GPA + PAGE, PAGE), ==, S_EXIST);
    /* Any request drains, even one that turns out malformed */
    queue_unmap(t, &q, DST_IOVA, 0);
    g_assert_cmpuint(do_op(t, 99, EDU_RID, NULL), ==, S_INVAL);
    ctrl_read(t, q.ctrl, &c);
    g_assert_cmpuint(c.tail, ==, 3);
    assert_mappings(t, 0, 0);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 0);
    pvdma_stop(t);
}

/*
 * Rule 2: a DMA that would be refused first applies what is published, so
 * a queued MAP reaches the device with no request in between. A queued
 * UNMAP takes effect at the latest at SYNC.
 */
static void test_queue_rule2(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t result = 0, before, requests;
    PvdmaCtrl c;
    PvdmaQueue q, q2;
    QDict *info;

    attach(t, EDU_RID);
    queue_setup(t, &q, 0, 0);
    queue_setup(t, &q2, 3, 100);
    fill(t, SRC_GPA, 0x61, PAGE);
    qtest_memset(t->qts, DST_GPA, 0xcc, PAGE);
    qtest_memset(t->qts, SRC_IOVA, 0xaa, PAGE);
    before = faults(t);
    info = pvdma_info(t->qts);
    requests = qdict_get_int(qdict_get_qdict(info, "transports"),
                             "doorbell");
    qobject_unref(info);

    queue_map(t, &q, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    queue_map(t, &q2, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    /* No request: the reads and the writes find their queued mappings */
    edu_dma(t, false, SRC_IOVA, 0, PAGE);
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    assert_filled(t, DST_GPA, 0x61, PAGE);
    g_assert_cmpuint(faults(t), ==, before);
    info = pvdma_info(t->qts);
    g_assert_cmpint(qdict_get_int(qdict_get_qdict(info, "transports"),
                                  "doorbell"), ==, requests);
    g_assert_cmpint(qdict_get_int(info, "miss-drains"), >=, 1);
    g_assert_cmpint(qdict_get_int(info, "queue-entries"), ==, 2);
    g_assert_cmpint(qdict_get_int(info, "mappings"), ==, 2);
    qobject_unref(info);
    ctrl_read(t, q.ctrl, &c);
    g_assert_cmpuint(c.tail, ==, 1);
    ctrl_read(t, q2.ctrl, &c);
    g_assert_cmpuint(c.tail, ==, 101);

    /* A queued UNMAP, then SYNC: the DMA is refused and counted */
    queue_unmap(t, &q2, DST_IOVA, PAGE);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 0);
    ctrl_read(t, q2.ctrl, &c);
    g_assert_cmpuint(c.tail, ==, 102);
    qtest_memset(t->qts, DST_GPA, 0xcc, PAGE);
    edu_dma(t, true, DST_IOVA, 0, PAGE);
    g_assert_cmpuint(faults(t), >, before);
    assert_bytes(t, DST_GPA, 0xcc, PAGE);

    /* A DMA refused with nothing queued is refused as before */
    before = faults(t);
    edu_dma(t, true, DST_IOVA + PAGE, 0, 64);
    g_assert_cmpuint(faults(t), >, before);
    pvdma_stop(t);
}

/* SYNC reports the entries that failed since the previous SYNC */
static void test_queue_sync_failed(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t result = 0;
    PvdmaCtrl c;
    PvdmaQueue q;
    QDict *info;

    attach(t, EDU_RID);
    queue_setup(t, &q, 1, 0);
    /* OK, then PERM, EXIST, NOENT, INVAL (UNMAP with a gpa), NODEV */
    queue_map(t, &q, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    queue_map(t, &q, 0, DST_IOVA + PAGE, DST_GPA, PAGE);
    queue_map(t, &q, FLAG_READ, DST_IOVA, DST_GPA + PAGE, PAGE);
    queue_unmap(t, &q, DST_IOVA + 4 * PAGE, 0);
    queue_entry(t, &q, OP_UNMAP, 0, EDU_RID, DST_IOVA, DST_GPA, 0, false);
    queue_entry(t, &q, OP_MAP, FLAG_READ, EMPTY_RID, DST_IOVA, DST_GPA,
                PAGE, true);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_PERM);
    g_assert_cmpuint(result, ==, 5);
    ctrl_read(t, q.ctrl, &c);
    g_assert_cmpuint(c.tail, ==, 6);
    g_assert_cmpuint(c.failed, ==, 5);
    g_assert_cmpuint(c.last_error, ==, S_NODEV);
    g_assert_cmpuint(c.stopped, ==, 0);
    /* The failed entries changed nothing; the good one is there */
    assert_mappings(t, 1, PAGE);
    info = queue_info(t->qts, 1);
    g_assert_cmpuint(qdict_get_int(info, "failed"), ==, 5);
    g_assert_cmpuint(qdict_get_int(info, "last-error"), ==, S_NODEV);
    g_assert_cmpuint(qdict_get_int(info, "applied"), ==, 6);
    qobject_unref(info);
    g_assert_cmpint(info_int(t->qts, "queue-failed"), ==, 5);

    /* A new window: nothing failed since */
    g_assert_cmpuint(sync_queues(t, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 0);

    /* Failures applied by another request are reported at the next SYNC */
    queue_unmap(t, &q, DST_IOVA + 8 * PAGE, PAGE);
    g_assert_cmphex(query(t, EDU_RID), ==, QUERY_ATTACHED);
    queue_entry(t, &q, 42, 0, EDU_RID, 0, 0, 0, true);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_NOENT);
    g_assert_cmpuint(result, ==, 2);
    ctrl_read(t, q.ctrl, &c);
    g_assert_cmpuint(c.failed, ==, 7);
    g_assert_cmpuint(c.last_error, ==, S_INVAL);

    /* QUEUE and SYNC have counts of their own */
    info = pvdma_info(t->qts);
    g_assert_cmpint(count_of(info, "requests", "queue"), ==, 1);
    g_assert_cmpint(count_of(info, "requests", "sync"), ==, 3);
    g_assert_cmpint(count_of(info, "requests", "other"), ==, 0);
    g_assert_cmpint(counts_sum(info, "requests"), ==,
                    counts_sum(info, "transports"));
    qobject_unref(info);
    pvdma_stop(t);
}

/*
 * A broken queue (head more than a ring ahead of tail) stops: nothing more
 * is applied from it and SYNC answers STATE until it is torn down. The
 * other queues keep working.
 */
static void test_queue_broken(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t result = 0;
    PvdmaCtrl c;
    PvdmaQueue q, q2;
    QDict *info;

    attach(t, EDU_RID);
    queue_setup(t, &q, 0, 10);
    queue_setup(t, &q2, 2, 0);
    queue_map(t, &q, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    /* The guest claims N + 1 entries ahead of the host's tail */
    qtest_writel(t->qts, q.ctrl, 10 + q.entries + 1);
    queue_map(t, &q2, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_STATE);
    ctrl_read(t, q.ctrl, &c);
    g_assert_cmpuint(c.stopped, ==, 1);
    g_assert_cmpuint(c.tail, ==, 10);
    /* Queue 2's entry was applied all the same, queue 0's not */
    assert_mappings(t, 1, PAGE);
    edu_load_from(t, SRC_IOVA, 0x44);
    info = queue_info(t->qts, 0);
    g_assert_true(qdict_get_bool(info, "stopped"));
    qobject_unref(info);

    /* Stopped for good: a sane head now applies nothing */
    qtest_writel(t->qts, q.ctrl, 11);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_STATE);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_STATE);
    assert_mappings(t, 1, PAGE);

    /* Tear-down applies nothing; set up again, the queue works */
    g_assert_cmpuint(queue_teardown(t, 0), ==, S_OK);
    assert_mappings(t, 1, PAGE);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_OK);
    queue_setup(t, &q, 0, 11);
    queue_map(t, &q, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 0);
    assert_mappings(t, 2, 2 * PAGE);
    pvdma_stop(t);
}

/* Device reset tears every queue down, dropping what was not applied */
static void test_queue_reset(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(""));
    uint64_t result = 0;
    PvdmaCtrl c;
    PvdmaQueue q;
    QDict *info;

    attach(t, EDU_RID);
    queue_setup(t, &q, 4, 0);
    queue_map(t, &q, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    qtest_system_reset(t->qts);
    pvdma_enable(t);

    /* Not applied (the tail stayed), and the queue is gone */
    ctrl_read(t, q.ctrl, &c);
    g_assert_cmpuint(c.tail, ==, 0);
    info = queue_info(t->qts, 4);
    g_assert_false(qdict_get_bool(info, "set-up"));
    qobject_unref(info);
    g_assert_cmpuint(queue_teardown(t, 4), ==, S_STATE);
    g_assert_cmpint(info_int(t->qts, "mappings"), ==, 0);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_OK);
    ctrl_read(t, q.ctrl, &c);
    g_assert_cmpuint(c.tail, ==, 0);
    /* The index can be set up again */
    queue_setup(t, &q, 4, 1);
    pvdma_stop(t);
}

/* queues=0: no QUEUE feature, and ops 7 and 8 are unknown ops */
static void test_queue_off(void)
{
    PvdmaTest *t = pvdma_start(DEVICE_ARGS(",queues=0"));
    uint64_t result = 0;
    QDict *info;

    g_assert_cmphex(reg_readq(t, PVDMA_REG_FEATURES) & PVDMA_F_QUEUE, ==, 0);
    g_assert_cmpuint(reg_readl(t, PVDMA_REG_QUEUES), ==, 0);
    attach(t, EDU_RID);
    g_assert_cmpuint(queue_setup_at(t, 0, Q_CTRL_GPA, 64, Q_RING_GPA,
                                    Q_RING_LEN), ==, S_INVAL);
    g_assert_cmpuint(sync_queues(t, &result), ==, S_INVAL);
    info = pvdma_info(t->qts);
    g_assert_cmpuint(qlist_size(qdict_get_qlist(info, "queues")), ==, 0);
    /* Unknown ops here: counted as such */
    g_assert_cmpint(count_of(info, "requests", "queue"), ==, 0);
    g_assert_cmpint(count_of(info, "requests", "sync"), ==, 0);
    g_assert_cmpint(count_of(info, "requests", "other"), ==, 2);
    qobject_unref(info);
    pvdma_stop(t);
}

/*
 * Migration carries each queue: where it is, the host's tail, failed and
 * last_error, whether it is stopped, and what the next SYNC reports. What
 * was published and not applied is applied on the destination.
 */
static void test_queue_migration(void)
{
    g_autofree char *dir = g_dir_make_tmp("pvdma-test-XXXXXX", NULL);
    g_autofree char *uri = g_strdup_printf("unix:%s/migration", dir);
    PvdmaTest *src = pvdma_start(DEVICE_ARGS(""));
    PvdmaTest *dst = g_new0(PvdmaTest, 1);
    uint64_t result = 0, before;
    PvdmaQueue q, q5;
    PvdmaCtrl c;
    QDict *info;

    attach(src, EDU_RID);
    queue_setup(src, &q, 0, 40);
    queue_setup(src, &q5, 5, 0);
    /*
     * Applied before: a MAP, and an UNMAP that fails NOENT; and queue 5,
     * broken, stops
     */
    queue_map(src, &q, FLAG_READ, SRC_IOVA, SRC_GPA, PAGE);
    queue_unmap(src, &q, DST_IOVA + 4 * PAGE, 0);
    qtest_writel(src->qts, q5.ctrl, q5.entries + 1);
    g_assert_cmphex(query(src, EDU_RID), ==, QUERY_ATTACHED);
    ctrl_read(src, q.ctrl, &c);
    g_assert_cmpuint(c.tail, ==, 42);
    ctrl_read(src, q5.ctrl, &c);
    g_assert_cmpuint(c.stopped, ==, 1);
    /* Published, not applied */
    queue_map(src, &q, FLAG_WRITE, DST_IOVA, DST_GPA, PAGE);
    fill(src, SRC_GPA, 0x2e, PAGE);
    qtest_memset(src->qts, DST_GPA, 0xcc, PAGE);

    pvdma_attach_devices(dst, qtest_initf(DEVICE_ARGS("") " -incoming %s",
                                          uri));
    qtest_qmp_assert_success(src->qts, "{ 'execute': 'migrate',"
                             "  'arguments': { 'uri': %s } }", uri);
    wait_migration_completed(src->qts);
    wait_migration_completed(dst->qts);
    dst->bar = bar_of(dst->pvdma);
    qpci_config_writel(dst->edu, PCI_BASE_ADDRESS_0, src->edu_bar.addr);
    qpci_device_enable(dst->edu);
    dst->edu_bar = bar_of(dst->edu);

    info = queue_info(dst->qts, 0);
    g_assert_true(qdict_get_bool(info, "set-up"));
    g_assert_cmphex(qdict_get_int(info, "ctrl-gpa"), ==, q.ctrl);
    g_assert_cmphex(qdict_get_int(info, "ring-gpa"), ==, q.ring);
    g_assert_cmpuint(qdict_get_int(info, "entries"), ==, q.entries);
    g_assert_cmpuint(qdict_get_int(info, "tail"), ==, 42);
    g_assert_cmpuint(qdict_get_int(info, "failed"), ==, 1);
    g_assert_cmpuint(qdict_get_int(info, "last-error"), ==, S_NOENT);
    g_assert_false(qdict_get_bool(info, "stopped"));
    qobject_unref(info);
    info = queue_info(dst->qts, 5);
    g_assert_true(qdict_get_bool(info, "set-up"));
    g_assert_true(qdict_get_bool(info, "stopped"));
    qobject_unref(info);

    /* The published MAP reaches the destination's DMA (rule 2) */
    before = faults(dst);
    edu_dma(dst, false, SRC_IOVA, 0, PAGE);
    edu_dma(dst, true, DST_IOVA, 0, PAGE);
    assert_filled(dst, DST_GPA, 0x2e, PAGE);
    g_assert_cmpuint(faults(dst), ==, before);
    ctrl_read(dst, q.ctrl, &c);
    g_assert_cmpuint(c.tail, ==, 43);

    /*
     * Queue 5 still stops SYNC, whose result counts the failure carried
     * over; torn down, SYNC answers OK (the STATE one began a new window)
     */
    g_assert_cmpuint(sync_queues(dst, &result), ==, S_STATE);
    g_assert_cmpuint(result, ==, 1);
    g_assert_cmpuint(queue_teardown(dst, 5), ==, S_OK);
    g_assert_cmpuint(sync_queues(dst, &result), ==, S_OK);
    g_assert_cmpuint(result, ==, 0);
    queue_unmap(dst, &q, DST_IOVA + 5 * PAGE, 0);
    g_assert_cmpuint(sync_queues(dst, &result), ==, S_NOENT);
    g_assert_cmpuint(result, ==, 1);

    pvdma_stop(dst);
    pvdma_stop(src);
    g_rmdir(dir);
}

/* @series-end queue-test */
int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);

    qtest_add_func("/pvdma/pci-identity", test_pci_identity);
    qtest_add_func("/pvdma/registers/defaults", test_registers);
    qtest_add_func("/pvdma/registers/configured", test_registers_configured);
    qtest_add_func("/pvdma/query", test_query);
    qtest_add_func("/pvdma/query/no-bypass", test_query_no_bypass);
    qtest_add_func("/pvdma/attach-detach", test_attach_detach);
    qtest_add_data_func("/pvdma/map-unmap/doorbell64", NULL,
                        test_map_unmap);
    qtest_add_data_func("/pvdma/map-unmap/doorbell32", "split",
                        test_map_unmap);
    qtest_add_func("/pvdma/status/inval", test_status_inval);
    qtest_add_func("/pvdma/status/fault", test_status_fault);
    qtest_add_func("/pvdma/status/nospc", test_status_nospc);
    qtest_add_func("/pvdma/status/exist-noent-range",
                   test_status_exist_noent_range);
    qtest_add_func("/pvdma/status/toobig-perm", test_status_toobig_perm);
    qtest_add_func("/pvdma/status/quota", test_status_quota);
    qtest_add_func("/pvdma/status/quota-mem", test_status_quota_mem);
    qtest_add_func("/pvdma/dma/translated", test_dma_translated);
    qtest_add_func("/pvdma/dma/scatter", test_dma_scatter);
    qtest_add_func("/pvdma/dma/unmapped", test_dma_unmapped);
    qtest_add_func("/pvdma/dma/read-only", test_dma_read_only);
    qtest_add_func("/pvdma/dma/detach-bypass", test_dma_detach_bypass);
    qtest_add_func("/pvdma/dma/detach-blocked", test_dma_detach_blocked);
    qtest_add_func("/pvdma/dma/device-order", test_device_order);
    qtest_add_func("/pvdma/reset", test_system_reset);
    qtest_add_func("/pvdma/qmp-hmp", test_qmp_hmp);
    qtest_add_func("/pvdma/qmp-hmp/no-device", test_qmp_no_device);
    qtest_add_func("/pvdma/qmp-hmp/counters", test_qmp_counters);
    qtest_add_func("/pvdma/unmap-list", test_unmap_list);
    qtest_add_func("/pvdma/unmap-list/off", test_unmap_list_off);
    qtest_add_func("/pvdma/migration", test_migration);
/* @series-begin dma-bench-test */
    qtest_add_func("/pvdma/dma-bench", test_dma_bench);
/* @series-end dma-bench-test */
/* @series-begin queue-test */
    qtest_add_func("/pvdma/queue/setup", test_queue_setup);
    qtest_add_func("/pvdma/queue/rule1", test_queue_rule1);
    qtest_add_func("/pvdma/queue/rule2", test_queue_rule2);
    qtest_add_func("/pvdma/queue/sync-failed", test_queue_sync_failed);
    qtest_add_func("/pvdma/queue/broken", test_queue_broken);
    qtest_add_func("/pvdma/queue/reset", test_queue_reset);
    qtest_add_func("/pvdma/queue/off", test_queue_off);
    qtest_add_func("/pvdma/queue/migration", test_queue_migration);
/* @series-end queue-test */

    return g_test_run();
}
