/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/*
 * The pvdma C API as QEMU's glue will use it, driven from C.
 *
 * Guest RAM is two mmap'd regions (2 MiB at guest-physical 0, 1 MiB at
 * 4 GiB). Requests are laid out in guest RAM with pvdma_abi.h, exactly as
 * a guest driver would, and submitted like a DOORBELL write. Output is
 * TAP ("ok N - name"); the exit status is non-zero when anything failed.
 *
 * The wire format is little-endian; like the guest drivers it stands in
 * for, this program builds blocks with the host's struct layout, so it
 * assumes a little-endian host (checked at start).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "pvdma.h"

/* ---- a tiny TAP harness ----------------------------------------------- */

static atomic_int failures;   /* in the running test */
static int tests_run;
static int tests_failed;

#define CHECK(cond)                                                         \
    do {                                                                    \
        if (!(cond)) {                                                      \
            printf("#   %s:%d: check failed: %s\n", __FILE__, __LINE__,     \
                   #cond);                                                  \
            atomic_fetch_add(&failures, 1);                                 \
        }                                                                   \
    } while (0)

#define CHECK_U64(got, want)                                                \
    do {                                                                    \
        uint64_t g_ = (uint64_t)(got), w_ = (uint64_t)(want);               \
        if (g_ != w_) {                                                     \
            printf("#   %s:%d: %s is 0x%" PRIx64 ", expected %s = 0x%"      \
                   PRIx64 "\n", __FILE__, __LINE__, #got, g_, #want, w_);   \
            atomic_fetch_add(&failures, 1);                                 \
        }                                                                   \
    } while (0)

/* A pvdma_result. */
#define CHECK_RES(expr, want)                                               \
    do {                                                                    \
        pvdma_result r_ = (expr);                                           \
        if (r_ != (pvdma_result)(want)) {                                   \
            printf("#   %s:%d: %s returned %u (%s), expected %s\n",         \
                   __FILE__, __LINE__, #expr, (unsigned)r_,                 \
                   pvdma_strerror(r_), #want);                              \
            atomic_fetch_add(&failures, 1);                                 \
        }                                                                   \
    } while (0)

/* A guest status (PVDMA_S_*). */
#define CHECK_ST(expr, want)                                                \
    do {                                                                    \
        uint32_t s_ = (expr);                                               \
        if (s_ != (uint32_t)(want)) {                                       \
            printf("#   %s:%d: %s returned %s, expected %s\n", __FILE__,    \
                   __LINE__, #expr, pvdma_guest_status_name(s_),            \
                   pvdma_guest_status_name(want));                          \
            atomic_fetch_add(&failures, 1);                                 \
        }                                                                   \
    } while (0)

static void run_test(const char *name, void (*fn)(void))
{
    atomic_store(&failures, 0);
    fn();
    tests_run++;
    if (atomic_load(&failures)) {
        tests_failed++;
        printf("not ok %d - %s\n", tests_run, name);
    } else {
        printf("ok %d - %s\n", tests_run, name);
    }
}

/* ---- guest RAM ----------------------------------------------------------- */

#define MiB (1024ull * 1024)
#define RAM0_GPA 0x0ull
#define RAM0_SIZE (2 * MiB)
#define RAM1_GPA 0x100000000ull
#define RAM1_SIZE (1 * MiB)
#define PAGE 0x1000ull

/* Request blocks live in the last 64 KiB of RAM0; data below that. */
#define REQ_GPA 0x1f0000ull
#define NOT_RAM 0x80000000ull

#define RID_A 0x10u   /* an emulated device */
#define RID_B 0x18u   /* an assigned host device */
#define RID_NONE 0x99u

static uint8_t *ram0, *ram1;

static void *gpa_ptr(uint64_t gpa)
{
    /* Unsigned: below the base wraps to a huge offset. */
    if (gpa - RAM0_GPA < RAM0_SIZE) {
        return ram0 + (gpa - RAM0_GPA);
    }
    if (gpa - RAM1_GPA < RAM1_SIZE) {
        return ram1 + (gpa - RAM1_GPA);
    }
    return NULL;
}

static void *map_ram(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return p;
}

/* ---- VMs ------------------------------------------------------------------- */

static pvdma_config default_config(void)
{
    pvdma_config c;
    pvdma_config_default(&c);
    return c;
}

/* A VM with both RAM regions and endpoints A and B (B passthrough). */
static pvdma_vm *new_vm_with(const pvdma_config *cfg)
{
    pvdma_vm *vm = NULL;
    CHECK_RES(pvdma_vm_new(cfg, &vm), PVDMA_OK);
    if (!vm) {
        printf("Bail out! cannot create a VM\n");
        exit(1);
    }
    CHECK_RES(pvdma_vm_add_ram(vm, RAM0_GPA, RAM0_SIZE, ram0), PVDMA_OK);
    CHECK_RES(pvdma_vm_add_ram(vm, RAM1_GPA, RAM1_SIZE, ram1), PVDMA_OK);
    CHECK_RES(pvdma_vm_add_endpoint(vm, RID_A, NULL), PVDMA_OK);
    CHECK_RES(pvdma_vm_add_endpoint(vm, RID_B, "0000:65:00.0"), PVDMA_OK);
    return vm;
}

static pvdma_vm *new_vm(void)
{
    pvdma_config c = default_config();
    return new_vm_with(&c);
}

/* ---- requests, as a guest driver lays them out ----------------------------- */

struct req {
    uint16_t op;
    uint16_t flags;
    uint32_t rid;
    uint64_t iova;
    uint64_t length;
    const struct pvdma_seg *segs;
    uint32_t nr_segs;
    uint64_t reserved0;          /* must be 0: lets a test break the rule */
};

/*
 * Writes the block at guest-physical `block` (when it is in RAM), submits
 * it, and copies the written-back header to *out (when not NULL). Checks
 * that the status in the block is the one returned and that the host wrote
 * nothing but status, iova, length and result.
 */
static uint32_t submit_at(pvdma_vm *vm, uint64_t block, const struct req *r,
                          struct pvdma_req *out)
{
    struct pvdma_req h;
    memset(&h, 0, sizeof(h));
    h.op = r->op;
    h.flags = r->flags;
    h.status = 0xdeadbeef;
    h.requester = r->rid;
    h.nr_segs = r->nr_segs;
    h.iova = r->iova;
    h.length = r->length;
    h.result = 0x5a5a5a5a5a5a5a5aull;
    h.reserved[0] = r->reserved0;

    uint8_t *p = gpa_ptr(block);
    size_t segs_bytes = (size_t)r->nr_segs * sizeof(struct pvdma_seg);
    if (p) {
        /* memcpy: a test may put the block at a misaligned address. */
        memcpy(p, &h, sizeof(h));
        if (r->segs) {
            memcpy(p + sizeof(h), r->segs, segs_bytes);
        }
    }
    uint32_t status = pvdma_vm_submit(vm, block);
    if (p) {
        struct pvdma_req back;
        memcpy(&back, p, sizeof(back));
        CHECK_U64(back.status, status);
        CHECK_U64(back.op, h.op);
        CHECK_U64(back.flags, h.flags);
        CHECK_U64(back.requester, h.requester);
        CHECK_U64(back.nr_segs, h.nr_segs);
        CHECK_U64(back.reserved[0], h.reserved[0]);
        if (status != PVDMA_S_OK || r->op != PVDMA_OP_MAP) {
            CHECK_U64(back.iova, h.iova);
            CHECK_U64(back.length, h.length);
        }
        if (status != PVDMA_S_OK && r->op != PVDMA_OP_SYNC) {
            /* SYNC writes result (failed entries) with any status. */
            CHECK_U64(back.result, h.result);
        }
        if (r->segs) {
            CHECK(memcmp(p + sizeof(h), r->segs, segs_bytes) == 0);
        }
        if (out) {
            *out = back;
        }
    }
    return status;
}

static uint32_t submit(pvdma_vm *vm, const struct req *r, struct pvdma_req *out)
{
    return submit_at(vm, REQ_GPA, r, out);
}

static uint32_t op_simple(pvdma_vm *vm, uint16_t op, uint32_t rid,
                          uint64_t *result)
{
    struct req r = { .op = op, .rid = rid };
    struct pvdma_req back;
    uint32_t s = submit(vm, &r, &back);
    if (result) {
        *result = back.result;
    }
    return s;
}

/* MAP: returns the status; *iova gets the IOVA written back. */
static uint32_t map(pvdma_vm *vm, uint32_t rid, uint16_t flags, uint64_t iova,
                    const struct pvdma_seg *segs, uint32_t n, uint64_t *out_iova)
{
    struct req r = { .op = PVDMA_OP_MAP, .flags = flags, .rid = rid,
                     .iova = iova, .segs = segs, .nr_segs = n };
    struct pvdma_req back;
    uint32_t s = submit(vm, &r, &back);
    if (out_iova) {
        *out_iova = back.iova;
    }
    return s;
}

static uint32_t unmap(pvdma_vm *vm, uint32_t rid, uint64_t iova, uint64_t len,
                      uint64_t *result)
{
    struct req r = { .op = PVDMA_OP_UNMAP, .rid = rid, .iova = iova,
                     .length = len };
    struct pvdma_req back;
    uint32_t s = submit(vm, &r, &back);
    if (result) {
        *result = back.result;
    }
    return s;
}

#define RW (PVDMA_FLAG_READ | PVDMA_FLAG_WRITE)

/* UNMAP_LIST: the ranges fill the segment slots. */
static uint32_t unmap_list(pvdma_vm *vm, uint32_t rid,
                           const struct pvdma_range *ranges, uint32_t n,
                           uint64_t *result)
{
    struct pvdma_seg slots[8];
    CHECK(n <= 8);
    memcpy(slots, ranges, n * sizeof(*ranges));
    struct req r = { .op = PVDMA_OP_UNMAP_LIST, .rid = rid,
                     .segs = n ? slots : NULL, .nr_segs = n };
    struct pvdma_req back;
    uint32_t s = submit(vm, &r, &back);
    if (result) {
        *result = back.result;
    }
    return s;
}
#define FIXED PVDMA_FLAG_FIXED

/* The scattered mapping used by several tests: 4 host fragments. */
#define SCATTER_IOVA 0x50000800ull
static const struct pvdma_seg scatter[] = {
    { 0x30800, 0x800 },         /* a half page at an in-page offset */
    { 0x50000, 0x1000 },
    { RAM1_GPA + 0x2000, 0x2000 }, /* in the other RAM region */
    { 0x40000, 0x10 },          /* a short tail */
};
#define SCATTER_LEN (0x800 + 0x1000 + 0x2000 + 0x10)

/* ---- tests ----------------------------------------------------------------- */

static void test_names(void)
{
    const char *unknown = pvdma_strerror(10);
    CHECK(unknown != NULL);
    CHECK(pvdma_strerror(0xffffffffu) != NULL);
    CHECK(strcmp(pvdma_strerror(0xffffffffu), unknown) == 0);
    for (uint32_t r = PVDMA_OK; r <= PVDMA_ERR_PANIC; r++) {
        const char *s = pvdma_strerror(r);
        CHECK(s != NULL && s[0] != '\0');
        CHECK(s && strcmp(s, unknown) != 0);
        for (uint32_t q = PVDMA_OK; q < r; q++) {
            CHECK(strcmp(pvdma_strerror(q), s) != 0);
        }
    }
    static const struct { uint32_t s; const char *name; } st[] = {
        { PVDMA_S_OK, "OK" }, { PVDMA_S_INVAL, "INVAL" },
        { PVDMA_S_NODEV, "NODEV" }, { PVDMA_S_FAULT, "FAULT" },
        { PVDMA_S_NOSPC, "NOSPC" }, { PVDMA_S_EXIST, "EXIST" },
        { PVDMA_S_NOENT, "NOENT" }, { PVDMA_S_RANGE, "RANGE" },
        { PVDMA_S_TOOBIG, "TOOBIG" }, { PVDMA_S_QUOTA, "QUOTA" },
        { PVDMA_S_PERM, "PERM" }, { PVDMA_S_STATE, "STATE" },
        { PVDMA_S_INTERNAL, "INTERNAL" }, { 12, "UNKNOWN" },
        { 254, "UNKNOWN" },
    };
    for (size_t i = 0; i < sizeof(st) / sizeof(st[0]); i++) {
        CHECK(strcmp(pvdma_guest_status_name(st[i].s), st[i].name) == 0);
    }
    CHECK(strcmp(pvdma_fault_reason_name(PVDMA_FAULT_UNMAPPED), "UNMAPPED") == 0);
    CHECK(strcmp(pvdma_fault_reason_name(PVDMA_FAULT_PERMISSION), "PERMISSION") == 0);
    CHECK(strcmp(pvdma_fault_reason_name(PVDMA_FAULT_BLOCKED), "BLOCKED") == 0);
    CHECK(strcmp(pvdma_fault_reason_name(PVDMA_FAULT_OUTSIDE_RAM), "OUTSIDE_RAM") == 0);
    CHECK(strcmp(pvdma_fault_reason_name(PVDMA_FAULT_NO_DEVICE), "NO_DEVICE") == 0);
    CHECK(strcmp(pvdma_fault_reason_name(PVDMA_FAULT_OVERFLOW), "OVERFLOW") == 0);
    CHECK(strcmp(pvdma_fault_reason_name(0), "UNKNOWN") == 0);
    CHECK(strcmp(pvdma_fault_reason_name(7), "UNKNOWN") == 0);
    const char *v = pvdma_version();
    CHECK(v != NULL && v[0] >= '0' && v[0] <= '9');
}

static void test_null_arguments(void)
{
    pvdma_config cfg = default_config();
    pvdma_vm *vm = NULL;
    CHECK_RES(pvdma_vm_new(NULL, &vm), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_new(&cfg, NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK(vm == NULL);

    /* A NULL handle everywhere. */
    size_t n = 77;
    pvdma_lookup l;
    pvdma_stats st;
    uint8_t buf[8];
    CHECK_RES(pvdma_vm_add_ram(NULL, 0, PAGE, ram0), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_remove_ram(NULL, 0, PAGE, NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_add_endpoint(NULL, RID_A, NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_remove_endpoint(NULL, RID_A), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_ST(pvdma_vm_submit(NULL, REQ_GPA), PVDMA_S_INTERNAL);
    CHECK_RES(pvdma_vm_translate(NULL, RID_A, 0, 1, PVDMA_ACCESS_READ, NULL, 0,
                                 &n, NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_lookup(NULL, RID_A, 0, 0, &l), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_stats(NULL, &st), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_state_save(NULL, buf, sizeof(buf), &n), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_state_load(NULL, buf, sizeof(buf)), PVDMA_ERR_NULL_ARGUMENT);
    CHECK(n == 77);
    CHECK(pvdma_vm_features(NULL) == 0);
    CHECK(pvdma_vm_page_sizes(NULL) == 0);
    CHECK(!pvdma_vm_ram_pinned(NULL, 0, PAGE));
    CHECK(pvdma_vm_faults(NULL, NULL, 0) == 0);
    CHECK(pvdma_vm_fault_count(NULL) == 0);
    CHECK(pvdma_vm_endpoints(NULL, NULL, 0) == 0);
    CHECK(pvdma_vm_mappings(NULL, RID_A, NULL, 0) == 0);
    pvdma_vm_reset(NULL);
    pvdma_vm_record_fault(NULL, RID_A, 0, PVDMA_ACCESS_READ, PVDMA_FAULT_UNMAPPED);
    pvdma_vm_set_notifier(NULL, NULL, NULL);
    pvdma_vm_free(NULL);
    pvdma_config_default(NULL);

    /* NULL outputs and buffers on a live handle (no RAM needed). */
    CHECK_RES(pvdma_vm_new(&cfg, &vm), PVDMA_OK);
    CHECK_RES(pvdma_vm_add_ram(vm, 0, PAGE, NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_translate(vm, RID_A, 0, 1, PVDMA_ACCESS_READ, NULL, 0,
                                 NULL, NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_translate(vm, RID_A, 0, 1, PVDMA_ACCESS_READ, NULL, 4,
                                 &n, NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, 0, 0, NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_stats(vm, NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_state_save(vm, buf, sizeof(buf), NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_state_save(vm, NULL, 16, &n), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_state_load(vm, NULL, 0), PVDMA_ERR_NULL_ARGUMENT);
    CHECK(n == 77);
    /* Bad arguments that are not pointers. */
    CHECK_RES(pvdma_vm_add_endpoint(vm, 0x10000, NULL), PVDMA_ERR_INVALID_ARGUMENT);
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, 0, 4, &l), PVDMA_ERR_INVALID_ARGUMENT);
    pvdma_vm_free(vm);
}

static void test_config(void)
{
    pvdma_config c = default_config();
    CHECK_U64(c.iova_bits, 48);
    CHECK_U64(c.max_segs, 512);
    CHECK_U64(c.pin_limit, UINT64_MAX);
    CHECK_U64(c.mem_limit, UINT64_MAX);
    CHECK_U64(c.pin_mode, PVDMA_PIN_NONE);
    CHECK(c.bypass && c.host_iova && c.unmap_list);
    CHECK_U64(c.fault_log_len, 64);
    CHECK_U64(c.queues, 8);
    /* unmap_list and queues took padding: the layout is what it was. */
    CHECK_U64(sizeof(pvdma_config), 40);
    CHECK_U64(offsetof(pvdma_config, fault_log_len), 32);
    CHECK_U64(offsetof(pvdma_config, queues), 36);
    /* The queue counters are appended. */
    CHECK_U64(sizeof(pvdma_stats), (6 * 13 + 7 + 4) * 8);
    CHECK_U64(offsetof(pvdma_stats, queue_drains), (6 * 13 + 7) * 8);

    pvdma_vm *vm = NULL;
    CHECK_RES(pvdma_vm_new(&c, &vm), PVDMA_OK);
    CHECK_U64(pvdma_vm_features(vm), PVDMA_FEATURE_HOST_IOVA | PVDMA_FEATURE_BYPASS |
                                     PVDMA_FEATURE_UNMAP_LIST | PVDMA_FEATURE_QUEUE);
    CHECK_U64(pvdma_vm_queue_count(vm), 8);
    CHECK_U64(pvdma_vm_page_sizes(vm), (1ull << 12) | (1ull << 21));
    pvdma_vm_free(vm);

    c.bypass = false;
    c.host_iova = false;
    c.unmap_list = false;
    c.queues = 0;
    CHECK_RES(pvdma_vm_new(&c, &vm), PVDMA_OK);
    CHECK_U64(pvdma_vm_features(vm), 0);
    CHECK_U64(pvdma_vm_queue_count(vm), 0);
    CHECK_U64(pvdma_vm_queues(vm, NULL, 0), 0);
    pvdma_vm_free(vm);
    CHECK_U64(pvdma_vm_queue_count(NULL), 0);

    /* Out-of-range values; *out untouched. */
    pvdma_vm *sentinel = (pvdma_vm *)&c;
    struct { const char *what; pvdma_config cfg; } bad[7];
    for (int i = 0; i < 7; i++) {
        bad[i].cfg = default_config();
    }
    bad[0].what = "iova_bits 20"; bad[0].cfg.iova_bits = 20;
    bad[1].what = "iova_bits 58"; bad[1].cfg.iova_bits = 58;
    bad[2].what = "max_segs 251"; bad[2].cfg.max_segs = 251;
    bad[3].what = "max_segs 65537"; bad[3].cfg.max_segs = 65537;
    bad[4].what = "pin_mode 2"; bad[4].cfg.pin_mode = 2;
    bad[5].what = "fault_log_len 0"; bad[5].cfg.fault_log_len = 0;
    bad[6].what = "queues 65"; bad[6].cfg.queues = PVDMA_MAX_QUEUES + 1;
    for (int i = 0; i < 7; i++) {
        vm = sentinel;
        pvdma_result r = pvdma_vm_new(&bad[i].cfg, &vm);
        if (r != PVDMA_ERR_INVALID_ARGUMENT || vm != sentinel) {
            printf("#   config %s: %s\n", bad[i].what, pvdma_strerror(r));
            atomic_fetch_add(&failures, 1);
        }
    }
}

static void test_ram_and_endpoints(void)
{
    pvdma_vm *vm = new_vm();
    CHECK_RES(pvdma_vm_add_endpoint(vm, RID_A, NULL), PVDMA_ERR_EXISTS);
    CHECK_RES(pvdma_vm_remove_endpoint(vm, RID_NONE), PVDMA_ERR_NOT_FOUND);
    /* Overlapping RAM and removing what is not a region. */
    CHECK_RES(pvdma_vm_add_ram(vm, RAM0_GPA + MiB, MiB, ram0), PVDMA_ERR_RAM);
    CHECK_RES(pvdma_vm_remove_ram(vm, NOT_RAM, MiB, NULL), PVDMA_ERR_RAM);

    pvdma_endpoint_info eps[3];
    memset(eps, 0xff, sizeof(eps));
    CHECK_U64(pvdma_vm_endpoints(vm, eps, 1), 2);
    CHECK_U64(eps[0].requester, RID_A);
    CHECK(!eps[0].attached && !eps[0].passthrough);
    CHECK_U64(eps[1].requester, 0xffffffffu);   /* n = 1: only one written */
    CHECK_U64(pvdma_vm_endpoints(vm, eps, 3), 2);
    CHECK_U64(eps[1].requester, RID_B);
    CHECK(!eps[1].attached && eps[1].passthrough);
    CHECK_U64(pvdma_vm_endpoints(vm, NULL, 0), 2);

    CHECK_RES(pvdma_vm_remove_endpoint(vm, RID_B), PVDMA_OK);
    CHECK_U64(pvdma_vm_endpoints(vm, eps, 3), 1);
    CHECK_ST(op_simple(vm, PVDMA_OP_QUERY, RID_B, NULL), PVDMA_S_NODEV);
    pvdma_vm_free(vm);
}

static void test_query_attach_detach(void)
{
    pvdma_vm *vm = new_vm();
    uint64_t res;
    CHECK_ST(op_simple(vm, PVDMA_OP_QUERY, RID_A, &res), PVDMA_S_OK);
    CHECK_U64(res, PVDMA_QUERY_BYPASS);
    CHECK_ST(op_simple(vm, PVDMA_OP_QUERY, RID_B, &res), PVDMA_S_OK);
    CHECK_U64(res, PVDMA_QUERY_PASSTHROUGH | PVDMA_QUERY_BYPASS);
    CHECK_ST(op_simple(vm, PVDMA_OP_QUERY, RID_NONE, NULL), PVDMA_S_NODEV);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_NONE, NULL), PVDMA_S_NODEV);

    CHECK_ST(op_simple(vm, PVDMA_OP_DETACH, RID_A, NULL), PVDMA_S_STATE);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_STATE);
    CHECK_ST(op_simple(vm, PVDMA_OP_QUERY, RID_A, &res), PVDMA_S_OK);
    CHECK_U64(res, PVDMA_QUERY_ATTACHED);
    CHECK_ST(op_simple(vm, PVDMA_OP_DETACH, RID_A, &res), PVDMA_S_OK);
    CHECK_U64(res, 0);
    CHECK_ST(op_simple(vm, PVDMA_OP_QUERY, RID_A, &res), PVDMA_S_OK);
    CHECK_U64(res, PVDMA_QUERY_BYPASS);

    /* Without BYPASS an unattached endpoint is blocked, not bypassing. */
    pvdma_config c = default_config();
    c.bypass = false;
    pvdma_vm *blocked = new_vm_with(&c);
    CHECK_ST(op_simple(blocked, PVDMA_OP_QUERY, RID_A, &res), PVDMA_S_OK);
    CHECK_U64(res, 0);
    pvdma_vm_free(blocked);
    pvdma_vm_free(vm);
}

static void test_malformed_requests(void)
{
    pvdma_vm *vm = new_vm();
    struct pvdma_seg seg = { 0x10000, PAGE };
    struct req r;

    r = (struct req){ .op = 9, .rid = RID_A };
    CHECK_ST(submit(vm, &r, NULL), PVDMA_S_INVAL);
    r = (struct req){ .op = 0, .rid = RID_A };
    CHECK_ST(submit(vm, &r, NULL), PVDMA_S_INVAL);
    r = (struct req){ .op = PVDMA_OP_QUERY, .rid = RID_A, .reserved0 = 1 };
    CHECK_ST(submit(vm, &r, NULL), PVDMA_S_INVAL);
    r = (struct req){ .op = PVDMA_OP_QUERY, .rid = RID_A, .flags = 0x8 };
    CHECK_ST(submit(vm, &r, NULL), PVDMA_S_INVAL);
    /* Requester bits 16..31 name another PCI segment: nothing there. */
    r = (struct req){ .op = PVDMA_OP_QUERY, .rid = (1u << 16) | RID_A };
    CHECK_ST(submit(vm, &r, NULL), PVDMA_S_NODEV);

    /* A misaligned block: INVAL, and the status still written back. */
    r = (struct req){ .op = PVDMA_OP_QUERY, .rid = RID_A };
    CHECK_ST(submit_at(vm, REQ_GPA + 4, &r, NULL), PVDMA_S_INVAL);
    /* A block outside RAM, or running off its end: FAULT. */
    CHECK_ST(pvdma_vm_submit(vm, NOT_RAM), PVDMA_S_FAULT);
    CHECK_ST(pvdma_vm_submit(vm, RAM0_SIZE - 32), PVDMA_S_FAULT);
    /* Segments running off the end of RAM: FAULT. */
    r = (struct req){ .op = PVDMA_OP_MAP, .flags = RW, .rid = RID_A,
                      .segs = &seg, .nr_segs = 1 };
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_ST(submit_at(vm, RAM0_SIZE - 64 - 8, &(struct req){
                 .op = PVDMA_OP_MAP, .flags = RW, .rid = RID_A, .nr_segs = 1 },
                 NULL), PVDMA_S_FAULT);

    /* MAP before ATTACH on the other endpoint. */
    r.rid = RID_B;
    CHECK_ST(submit(vm, &r, NULL), PVDMA_S_STATE);
    pvdma_vm_free(vm);
}

static void test_map_unmap(void)
{
    pvdma_vm *vm = new_vm();
    uint64_t iova, res;
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);

    /* FIXED, one segment of three pages. */
    struct pvdma_seg s1 = { 0x10000, 3 * PAGE };
    struct pvdma_req back;
    struct req r = { .op = PVDMA_OP_MAP, .flags = RW | FIXED, .rid = RID_A,
                     .iova = 0x40000000, .segs = &s1, .nr_segs = 1 };
    CHECK_ST(submit(vm, &r, &back), PVDMA_S_OK);
    CHECK_U64(back.iova, 0x40000000);
    CHECK_U64(back.length, 3 * PAGE);
    CHECK_U64(back.result, 0);

    /* Host-chosen, with an in-page offset: same offset, never page 0. */
    struct pvdma_seg s2 = { 0x20123, PAGE };
    r = (struct req){ .op = PVDMA_OP_MAP, .flags = PVDMA_FLAG_READ,
                      .rid = RID_A, .segs = &s2, .nr_segs = 1 };
    CHECK_ST(submit(vm, &r, &back), PVDMA_S_OK);
    CHECK_U64(back.iova & 0xfff, 0x123);
    CHECK(back.iova >= PAGE);
    CHECK(back.iova + back.length <= (1ull << 48));
    CHECK_U64(back.length, PAGE);
    uint64_t host_iova = back.iova;

    /* Scattered pages over both RAM regions. */
    CHECK_ST(map(vm, RID_A, RW | FIXED, SCATTER_IOVA, scatter, 4, &iova), PVDMA_S_OK);
    CHECK_U64(iova, SCATTER_IOVA);

    /* The same guest page may be named twice. */
    struct pvdma_seg twice[2] = { { 0x60000, PAGE }, { 0x60000, PAGE } };
    CHECK_ST(map(vm, RID_A, RW, 0, twice, 2, &iova), PVDMA_S_OK);
    CHECK_ST(unmap(vm, RID_A, iova, 0, &res), PVDMA_S_OK);
    CHECK_U64(res, 2 * PAGE);

    /* Error paths, each leaving nothing behind. */
    struct pvdma_seg s3 = { 0x60000, PAGE };
    CHECK_ST(map(vm, RID_A, FIXED, 0x70000000, &s3, 1, NULL), PVDMA_S_PERM);
    CHECK_ST(map(vm, RID_A, RW | FIXED, 0x40001000, &s3, 1, NULL), PVDMA_S_EXIST);
    CHECK_ST(map(vm, RID_A, RW | FIXED, 0x70000010, &s3, 1, NULL), PVDMA_S_INVAL);
    CHECK_ST(map(vm, RID_A, RW | FIXED, 1ull << 48, &s3, 1, NULL), PVDMA_S_INVAL);
    CHECK_ST(map(vm, RID_A, RW, 0, &s3, 0, NULL), PVDMA_S_INVAL);
    struct pvdma_seg zero = { 0x60000, 0 };
    CHECK_ST(map(vm, RID_A, RW, 0, &zero, 1, NULL), PVDMA_S_INVAL);
    struct pvdma_seg gap[2] = { { 0x60000, 0x800 }, { 0x62000, PAGE } };
    CHECK_ST(map(vm, RID_A, RW, 0, gap, 2, NULL), PVDMA_S_INVAL);
    struct pvdma_seg outside = { NOT_RAM, PAGE };
    CHECK_ST(map(vm, RID_A, RW, 0, &outside, 1, NULL), PVDMA_S_FAULT);
    struct pvdma_seg straddle = { RAM0_SIZE - PAGE, 2 * PAGE };
    CHECK_ST(map(vm, RID_A, RW, 0, &straddle, 1, NULL), PVDMA_S_FAULT);
    static struct pvdma_seg many[513];
    for (int i = 0; i < 513; i++) {
        many[i] = (struct pvdma_seg){ 0x60000, PAGE };
    }
    CHECK_ST(map(vm, RID_A, RW, 0, many, 513, NULL), PVDMA_S_TOOBIG);
    CHECK_U64(pvdma_vm_mappings(vm, RID_A, NULL, 0), 3);
    CHECK(!pvdma_vm_ram_pinned(vm, 0x60000, PAGE));

    /* Listing, by IOVA. */
    pvdma_mapping_info mi[4];
    CHECK_U64(pvdma_vm_mappings(vm, RID_A, mi, 4), 3);
    CHECK_U64(mi[0].iova, host_iova < 0x40000000 ? host_iova : 0x40000000);
    for (int i = 0; i < 3; i++) {
        if (mi[i].iova == 0x40000000) {
            CHECK_U64(mi[i].length, 3 * PAGE);
            CHECK_U64(mi[i].perms, RW);
            CHECK_U64(mi[i].nr_segs, 1);
        } else if (mi[i].iova == SCATTER_IOVA) {
            CHECK_U64(mi[i].length, SCATTER_LEN);
            CHECK_U64(mi[i].nr_segs, 4);
        } else {
            CHECK_U64(mi[i].iova, host_iova);
            CHECK_U64(mi[i].perms, PVDMA_FLAG_READ);
        }
    }
    pvdma_endpoint_info ei[2];
    CHECK_U64(pvdma_vm_endpoints(vm, ei, 2), 2);
    CHECK(ei[0].attached && !ei[1].attached);
    CHECK_U64(ei[0].mappings, 3);
    CHECK_U64(ei[0].mapped_bytes, 3 * PAGE + PAGE + SCATTER_LEN);
    CHECK_U64(ei[1].mappings, 0);

    /* UNMAP: NOENT, RANGE (nothing removed), by start, by range. */
    CHECK_ST(unmap(vm, RID_A, 0x40001000, 0, NULL), PVDMA_S_NOENT);
    CHECK_ST(unmap(vm, RID_A, 0x7000000, 0x1000, NULL), PVDMA_S_NOENT);
    CHECK_ST(unmap(vm, RID_A, 0x40001000, PAGE, NULL), PVDMA_S_RANGE);
    CHECK_ST(unmap(vm, RID_A, 0x40000000, PAGE, NULL), PVDMA_S_RANGE);
    CHECK_ST(unmap(vm, RID_A, 1ull << 48, 0, NULL), PVDMA_S_INVAL);
    CHECK_U64(pvdma_vm_mappings(vm, RID_A, NULL, 0), 3);
    CHECK_ST(unmap(vm, RID_A, 0x40000123, 0, &res), PVDMA_S_OK);
    CHECK_U64(res, 3 * PAGE);
    CHECK_ST(unmap(vm, RID_A, 0x50000000, 0x10000, &res), PVDMA_S_OK);
    CHECK_U64(res, 5 * PAGE);   /* offset 0x800 + 0x3810 bytes: 5 pages */
    CHECK(!pvdma_vm_ram_pinned(vm, 0x10000, 3 * PAGE));
    CHECK(pvdma_vm_ram_pinned(vm, 0x20000, PAGE));

    /* DETACH removes what is left and says how much. */
    CHECK_ST(op_simple(vm, PVDMA_OP_DETACH, RID_A, &res), PVDMA_S_OK);
    CHECK_U64(res, 1);
    CHECK(!pvdma_vm_ram_pinned(vm, 0, RAM0_SIZE));
    CHECK_ST(map(vm, RID_A, RW, 0, &s3, 1, NULL), PVDMA_S_STATE);
    pvdma_vm_free(vm);
}

static void test_quota(void)
{
    pvdma_config c = default_config();
    c.pin_limit = 4 * PAGE;
    pvdma_vm *vm = new_vm_with(&c);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    struct pvdma_seg three = { 0x10000, 3 * PAGE };
    struct pvdma_seg two = { 0x70000, 2 * PAGE };
    struct pvdma_seg again = { 0x10000, PAGE };
    struct pvdma_seg one = { 0x70000, PAGE };
    struct pvdma_seg another = { 0x71000, PAGE };
    CHECK_ST(map(vm, RID_A, RW, 0, &three, 1, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW, 0, &two, 1, NULL), PVDMA_S_QUOTA);
    /* Pages already pinned cost nothing more. */
    CHECK_ST(map(vm, RID_A, RW, 0, &again, 1, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW, 0, &one, 1, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW, 0, &another, 1, NULL), PVDMA_S_QUOTA);
    pvdma_stats st;
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.pinned_pages, 4);
    CHECK_U64(st.pin_limit, 4 * PAGE);
    CHECK_U64(st.mappings, 3);
    CHECK_U64(st.requests[PVDMA_OP_MAP][PVDMA_S_QUOTA], 2);
    CHECK(pvdma_vm_ram_pinned(vm, 0x70000, PAGE));
    CHECK(!pvdma_vm_ram_pinned(vm, 0x71000, PAGE));
    pvdma_vm_free(vm);
}

/*
 * One guest page mapped at IOVAs 512 GiB apart costs page tables each time
 * but no new pin: mem_limit bounds that memory.
 */
static void test_mem_quota(void)
{
    pvdma_config c = default_config();
    c.mem_limit = 64 * 1024;
    pvdma_vm *vm = new_vm_with(&c);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    struct pvdma_seg page = { 0x10000, PAGE };
    unsigned ok = 0;
    uint32_t st = PVDMA_S_OK;
    for (uint64_t i = 1; i < 64 && st == PVDMA_S_OK; i++) {
        st = map(vm, RID_A, RW | FIXED, i << 39, &page, 1, NULL);
        ok += st == PVDMA_S_OK;
    }
    CHECK_ST(st, PVDMA_S_QUOTA);
    CHECK(ok >= 2 && ok < 10);
    pvdma_stats s;
    CHECK_RES(pvdma_vm_stats(vm, &s), PVDMA_OK);
    CHECK_U64(s.mappings, ok);
    CHECK_U64(s.pinned_pages, 1);
    CHECK_U64(s.mem_limit, 64 * 1024);
    CHECK(s.mem_used > 0 && s.mem_used <= 64 * 1024);
    CHECK_U64(s.requests[PVDMA_OP_MAP][PVDMA_S_QUOTA], 1);
    CHECK_ST(op_simple(vm, PVDMA_OP_DETACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_RES(pvdma_vm_stats(vm, &s), PVDMA_OK);
    CHECK_U64(s.mem_used, 0);
    pvdma_vm_free(vm);
}

static void test_nospc_and_host_iova_off(void)
{
    /* A 2 MiB IOVA space: 511 usable pages, as page 0 is never handed out. */
    pvdma_config c = default_config();
    c.iova_bits = 21;
    pvdma_vm *vm = new_vm_with(&c);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    static struct pvdma_seg same[511];
    for (int i = 0; i < 511; i++) {
        same[i] = (struct pvdma_seg){ 0x10000, PAGE };
    }
    uint64_t iova = 0;
    CHECK_ST(map(vm, RID_A, RW, 0, same, 511, &iova), PVDMA_S_OK);
    CHECK_U64(iova, PAGE);
    CHECK_ST(map(vm, RID_A, RW, 0, same, 1, NULL), PVDMA_S_NOSPC);
    /*
     * A well-formed mapping larger than any free range is NOSPC ("no range
     * is free"), even when it is larger than the whole space; one that
     * also runs past the end of RAM may get FAULT instead.
     */
    struct pvdma_seg huge = { 0, RAM0_SIZE };
    CHECK_ST(map(vm, RID_A, RW, 0, &huge, 1, NULL), PVDMA_S_NOSPC);
    struct pvdma_seg past_ram = { 0, RAM0_SIZE + PAGE };
    CHECK_ST(map(vm, RID_A, RW, 0, &past_ram, 1, NULL), PVDMA_S_FAULT);
    pvdma_stats st;
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.pinned_pages, 1);
    pvdma_vm_free(vm);

    /* Without HOST_IOVA, MAP must be FIXED. */
    c = default_config();
    c.host_iova = false;
    vm = new_vm_with(&c);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW, 0, same, 1, NULL), PVDMA_S_INVAL);
    CHECK_ST(map(vm, RID_A, RW | FIXED, 0x3000, same, 1, &iova), PVDMA_S_OK);
    CHECK_U64(iova, 0x3000);
    pvdma_vm_free(vm);
}

static void check_iov(const pvdma_iovec *v, uint64_t gpa, uint64_t len)
{
    CHECK_U64(v->gpa, gpa);
    CHECK_U64(v->len, len);
    CHECK(v->base == gpa_ptr(gpa));
}

static void test_translate(void)
{
    pvdma_vm *vm = new_vm();
    memset(ram0, 0, RAM0_SIZE);
    memset(ram1, 0, RAM1_SIZE);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW | FIXED, SCATTER_IOVA, scatter, 4, NULL), PVDMA_S_OK);

    /* Too small (including the size query), then big enough. */
    pvdma_iovec iov[8];
    size_t count = 0;
    memset(iov, 0, sizeof(iov));
    CHECK_RES(pvdma_vm_translate(vm, RID_A, SCATTER_IOVA, SCATTER_LEN,
                                 PVDMA_ACCESS_WRITE, NULL, 0, &count, NULL),
              PVDMA_ERR_BUFFER_TOO_SMALL);
    CHECK_U64(count, 4);
    count = 0;
    CHECK_RES(pvdma_vm_translate(vm, RID_A, SCATTER_IOVA, SCATTER_LEN,
                                 PVDMA_ACCESS_WRITE, iov, 2, &count, NULL),
              PVDMA_ERR_BUFFER_TOO_SMALL);
    CHECK_U64(count, 4);
    check_iov(&iov[0], 0x30800, 0x800);
    check_iov(&iov[1], 0x50000, 0x1000);
    CHECK(iov[2].base == NULL && iov[2].len == 0);   /* not written */
    CHECK_RES(pvdma_vm_translate(vm, RID_A, SCATTER_IOVA, SCATTER_LEN,
                                 PVDMA_ACCESS_WRITE, iov, 8, &count, NULL),
              PVDMA_OK);
    CHECK_U64(count, 4);
    check_iov(&iov[0], 0x30800, 0x800);
    check_iov(&iov[1], 0x50000, 0x1000);
    check_iov(&iov[2], RAM1_GPA + 0x2000, 0x2000);
    check_iov(&iov[3], 0x40000, 0x10);

    /* Write as the device would, through the host pointers... */
    uint8_t pattern[SCATTER_LEN];
    for (size_t i = 0; i < sizeof(pattern); i++) {
        pattern[i] = (uint8_t)(i * 7 + 1);
    }
    size_t off = 0;
    for (size_t i = 0; i < count; i++) {
        memcpy(iov[i].base, pattern + off, iov[i].len);
        off += iov[i].len;
    }
    CHECK_U64(off, SCATTER_LEN);
    /* ...and find the bytes in the right guest pages, nothing around. */
    off = 0;
    for (size_t i = 0; i < 4; i++) {
        CHECK(memcmp(gpa_ptr(scatter[i].gpa), pattern + off, scatter[i].len) == 0);
        off += scatter[i].len;
    }
    CHECK(((uint8_t *)gpa_ptr(0x307ff))[0] == 0);
    CHECK(((uint8_t *)gpa_ptr(0x40010))[0] == 0);

    /* A piece from the middle, across the RAM1 pages. */
    CHECK_RES(pvdma_vm_translate(vm, RID_A, 0x50002ff0, 0x20,
                                 PVDMA_ACCESS_READ, iov, 8, &count, NULL),
              PVDMA_OK);
    CHECK_U64(count, 1);
    check_iov(&iov[0], RAM1_GPA + 0x2ff0, 0x20);

    /* Refusals: each is logged, with the first address refused. */
    uint64_t faults0 = pvdma_vm_fault_count(vm);
    struct pvdma_seg ro = { 0x60000, PAGE };
    CHECK_ST(map(vm, RID_A, PVDMA_FLAG_READ | FIXED, 0x60000000, &ro, 1, NULL),
             PVDMA_S_OK);
    pvdma_translate_fault tf = { 0, 0 };
    count = 99;
    CHECK_RES(pvdma_vm_translate(vm, RID_A, 0x60000000, 0x10, PVDMA_ACCESS_WRITE,
                                 iov, 8, &count, &tf),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(count, 99);
    CHECK_U64(tf.iova, 0x60000000);
    CHECK_U64(tf.reason, PVDMA_FAULT_PERMISSION);
    CHECK_RES(pvdma_vm_translate(vm, RID_A, 0x60000000, 0x10, PVDMA_ACCESS_RW,
                                 iov, 8, &count, NULL),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_RES(pvdma_vm_translate(vm, RID_A, 0x60000800, 0x1000, PVDMA_ACCESS_READ,
                                 iov, 8, &count, &tf),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(tf.iova, 0x60001000);
    CHECK_U64(tf.reason, PVDMA_FAULT_UNMAPPED);
    CHECK_RES(pvdma_vm_translate(vm, RID_NONE, 0, 1, PVDMA_ACCESS_READ,
                                 iov, 8, &count, &tf),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(tf.reason, PVDMA_FAULT_NO_DEVICE);
    CHECK_RES(pvdma_vm_translate(vm, RID_A, UINT64_MAX - 10, 100,
                                 PVDMA_ACCESS_READ, iov, 8, &count, &tf),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(tf.reason, PVDMA_FAULT_OVERFLOW);
    /* A bad access is the caller's mistake, not a device fault. */
    CHECK_RES(pvdma_vm_translate(vm, RID_A, 0x60000000, 1, 0, iov, 8, &count, &tf),
              PVDMA_ERR_INVALID_ARGUMENT);
    CHECK_RES(pvdma_vm_translate(vm, RID_A, 0x60000000, 1, 4, iov, 8, &count, &tf),
              PVDMA_ERR_INVALID_ARGUMENT);
    CHECK_U64(pvdma_vm_fault_count(vm), faults0 + 5);

    pvdma_fault f[8];
    memset(f, 0, sizeof(f));
    CHECK_U64(pvdma_vm_faults(vm, f, 2), faults0 + 5);
    /* The newest two, oldest first. */
    CHECK_U64(f[0].requester, RID_NONE);
    CHECK_U64(f[0].reason, PVDMA_FAULT_NO_DEVICE);
    CHECK_U64(f[1].requester, RID_A);
    CHECK_U64(f[1].reason, PVDMA_FAULT_OVERFLOW);
    CHECK_U64(f[1].seq, f[0].seq + 1);
    CHECK_U64(pvdma_vm_faults(vm, f, 8), faults0 + 5);
    CHECK_U64(f[0].requester, RID_A);
    CHECK_U64(f[0].access, PVDMA_ACCESS_WRITE);
    CHECK_U64(f[0].reason, PVDMA_FAULT_PERMISSION);
    CHECK_U64(f[0].iova, 0x60000000);
    CHECK_U64(f[1].access, PVDMA_ACCESS_RW);
    CHECK_U64(f[2].iova, 0x60001000);
    CHECK_U64(f[2].access, PVDMA_ACCESS_READ);

    /* Bypass (B is not attached): identity over guest RAM only. */
    CHECK_RES(pvdma_vm_translate(vm, RID_B, 0x10010, 0x100, PVDMA_ACCESS_RW,
                                 iov, 8, &count, NULL),
              PVDMA_OK);
    CHECK_U64(count, 1);
    check_iov(&iov[0], 0x10010, 0x100);
    CHECK_RES(pvdma_vm_translate(vm, RID_B, RAM0_SIZE - PAGE, 2 * PAGE,
                                 PVDMA_ACCESS_READ, iov, 8, &count, &tf),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(tf.iova, RAM0_SIZE);
    CHECK_U64(tf.reason, PVDMA_FAULT_OUTSIDE_RAM);

    /* Transports that refuse DMA themselves log it too. */
    uint64_t before = pvdma_vm_fault_count(vm);
    pvdma_vm_record_fault(vm, RID_B, 0x1234, PVDMA_ACCESS_READ, PVDMA_FAULT_BLOCKED);
    pvdma_vm_record_fault(vm, RID_B, 0x1234, 0, PVDMA_FAULT_BLOCKED);  /* ignored */
    pvdma_vm_record_fault(vm, RID_B, 0x1234, PVDMA_ACCESS_READ, 0);    /* ignored */
    CHECK_U64(pvdma_vm_fault_count(vm), before + 1);
    CHECK_U64(pvdma_vm_faults(vm, f, 1), before + 1);
    CHECK_U64(f[0].iova, 0x1234);
    CHECK_U64(f[0].reason, PVDMA_FAULT_BLOCKED);
    pvdma_vm_free(vm);

    /* Without bypass, an unattached endpoint is blocked. */
    pvdma_config c = default_config();
    c.bypass = false;
    vm = new_vm_with(&c);
    CHECK_RES(pvdma_vm_translate(vm, RID_B, 0x10000, 0x10, PVDMA_ACCESS_READ,
                                 iov, 8, &count, &tf),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(tf.reason, PVDMA_FAULT_BLOCKED);
    CHECK_U64(pvdma_vm_fault_count(vm), 1);
    pvdma_vm_free(vm);
}

static void test_fault_log_wraps(void)
{
    pvdma_config c = default_config();
    c.fault_log_len = 4;
    pvdma_vm *vm = new_vm_with(&c);
    for (uint64_t i = 0; i < 10; i++) {
        pvdma_vm_record_fault(vm, RID_A, i * PAGE, PVDMA_ACCESS_READ,
                              PVDMA_FAULT_UNMAPPED);
    }
    pvdma_fault f[8];
    CHECK_U64(pvdma_vm_fault_count(vm), 10);
    CHECK_U64(pvdma_vm_faults(vm, f, 8), 4);
    CHECK_U64(f[0].iova, 6 * PAGE);
    CHECK_U64(f[0].seq, 6);
    CHECK_U64(f[3].iova, 9 * PAGE);
    CHECK_U64(f[3].seq, 9);
    pvdma_vm_reset(vm);
    CHECK_U64(pvdma_vm_fault_count(vm), 0);
    CHECK_U64(pvdma_vm_faults(vm, f, 8), 0);
    pvdma_vm_free(vm);
}

static void test_lookup(void)
{
    pvdma_vm *vm = new_vm();
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    struct pvdma_seg s = { 0x10000, 3 * PAGE };
    CHECK_ST(map(vm, RID_A, RW | FIXED, 0x40000000, &s, 1, NULL), PVDMA_S_OK);
    struct pvdma_seg ro = { 0x60000, PAGE };
    CHECK_ST(map(vm, RID_A, PVDMA_FLAG_READ | FIXED, 0x60000000, &ro, 1, NULL),
             PVDMA_S_OK);

    pvdma_lookup l;
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, 0x40001010, 0, &l), PVDMA_OK);
    CHECK_U64(l.gpa, 0x11010);
    CHECK_U64(l.perms, RW);
    CHECK_U64(l.flags, 0);
    CHECK(l.run >= PAGE - 0x10 && l.run <= 2 * PAGE - 0x10);
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, 0x60000008, PVDMA_ACCESS_READ, &l), PVDMA_OK);
    CHECK_U64(l.gpa, 0x60008);
    CHECK_U64(l.perms, PVDMA_FLAG_READ);
    CHECK_U64(l.run, PAGE - 8);

    /* Just looking logs nothing; a device access does. */
    memset(&l, 0xab, sizeof(l));
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, 0x70000000, 0, &l), PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, 0x60000000, 0, &l), PVDMA_OK);
    CHECK_U64(pvdma_vm_fault_count(vm), 0);
    memset(&l, 0xab, sizeof(l));
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, 0x60000010, PVDMA_ACCESS_WRITE, &l),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(l.gpa, 0xababababababababull);   /* untouched on failure */
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, 0x70000000, PVDMA_ACCESS_READ, &l),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_RES(pvdma_vm_lookup(vm, RID_NONE, 0, PVDMA_ACCESS_READ, &l),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(pvdma_vm_fault_count(vm), 3);
    pvdma_fault f[3];
    CHECK_U64(pvdma_vm_faults(vm, f, 3), 3);
    CHECK_U64(f[0].reason, PVDMA_FAULT_PERMISSION);
    CHECK_U64(f[0].iova, 0x60000010);
    CHECK_U64(f[0].access, PVDMA_ACCESS_WRITE);
    CHECK_U64(f[1].reason, PVDMA_FAULT_UNMAPPED);
    CHECK_U64(f[2].reason, PVDMA_FAULT_NO_DEVICE);

    /* Bypass: identity, read-write, to the end of the page. */
    CHECK_RES(pvdma_vm_lookup(vm, RID_B, 0x123456, PVDMA_ACCESS_RW, &l), PVDMA_OK);
    CHECK_U64(l.gpa, 0x123456);
    CHECK_U64(l.perms, RW);
    CHECK_U64(l.flags, PVDMA_LOOKUP_BYPASS);
    CHECK_U64(l.run, PAGE - 0x456);
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, 0, 4, &l), PVDMA_ERR_INVALID_ARGUMENT);
    pvdma_vm_free(vm);

    pvdma_config c = default_config();
    c.bypass = false;
    vm = new_vm_with(&c);
    CHECK_RES(pvdma_vm_lookup(vm, RID_B, 0x1000, 0, &l), PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(pvdma_vm_fault_count(vm), 0);
    CHECK_RES(pvdma_vm_lookup(vm, RID_B, 0x1000, PVDMA_ACCESS_READ, &l),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(pvdma_vm_faults(vm, f, 1), 1);
    CHECK_U64(f[0].reason, PVDMA_FAULT_BLOCKED);
    pvdma_vm_free(vm);
}

/* Events the notifier saw. */
struct events {
    int n;
    pvdma_map_event ev[16];
    void *opaque_seen;
    /* Refuse the MAP event with this number (from 1; 0: none). */
    int refuse;
};

static int record_event(void *opaque, const pvdma_map_event *ev)
{
    struct events *e = opaque;
    e->opaque_seen = opaque;
    if (e->n < 16) {
        e->ev[e->n] = *ev;
    }
    e->n++;
    return e->refuse == e->n && ev->kind == PVDMA_EVENT_MAP;
}

static void check_event(const pvdma_map_event *ev, uint32_t kind, uint64_t iova,
                        uint64_t gpa, uint64_t len, uint32_t perms)
{
    CHECK_U64(ev->kind, kind);
    CHECK_U64(ev->requester, RID_A);
    CHECK_U64(ev->iova, iova);
    CHECK_U64(ev->gpa, gpa);
    CHECK_U64(ev->len, len);
    CHECK_U64(ev->perms, perms);
}

static void test_notifier(void)
{
    pvdma_vm *vm = new_vm();
    struct events e;
    memset(&e, 0, sizeof(e));
    pvdma_vm_set_notifier(vm, record_event, &e);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_U64(e.n, 0);

    /* One event per run contiguous in both spaces, page granular. */
    CHECK_ST(map(vm, RID_A, RW | FIXED, SCATTER_IOVA, scatter, 4, NULL), PVDMA_S_OK);
    CHECK_U64(e.n, 4);
    CHECK(e.opaque_seen == &e);
    check_event(&e.ev[0], PVDMA_EVENT_MAP, 0x50000000, 0x30000, PAGE, RW);
    check_event(&e.ev[1], PVDMA_EVENT_MAP, 0x50001000, 0x50000, PAGE, RW);
    check_event(&e.ev[2], PVDMA_EVENT_MAP, 0x50002000, RAM1_GPA + 0x2000, 2 * PAGE, RW);
    check_event(&e.ev[3], PVDMA_EVENT_MAP, 0x50004000, 0x40000, PAGE, RW);
    /* Guest-physically contiguous segments make one run. */
    struct pvdma_seg contig[2] = { { 0x80000, PAGE }, { 0x81000, PAGE } };
    CHECK_ST(map(vm, RID_A, PVDMA_FLAG_READ | FIXED, 0x70000000, contig, 2, NULL),
             PVDMA_S_OK);
    CHECK_U64(e.n, 5);
    check_event(&e.ev[4], PVDMA_EVENT_MAP, 0x70000000, 0x80000, 2 * PAGE,
                PVDMA_FLAG_READ);
    /* Failed requests notify nothing. */
    CHECK_ST(map(vm, RID_A, RW | FIXED, 0x70000000, contig, 2, NULL), PVDMA_S_EXIST);
    CHECK_U64(e.n, 5);

    e.n = 0;
    CHECK_ST(unmap(vm, RID_A, SCATTER_IOVA, 0, NULL), PVDMA_S_OK);
    CHECK_U64(e.n, 4);
    check_event(&e.ev[0], PVDMA_EVENT_UNMAP, 0x50000000, 0x30000, PAGE, 0);
    check_event(&e.ev[2], PVDMA_EVENT_UNMAP, 0x50002000, RAM1_GPA + 0x2000, 2 * PAGE, 0);

    /* DETACH reports what it tears down. */
    e.n = 0;
    CHECK_ST(op_simple(vm, PVDMA_OP_DETACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_U64(e.n, 1);
    check_event(&e.ev[0], PVDMA_EVENT_UNMAP, 0x70000000, 0x80000, 2 * PAGE, 0);

    /* Cleared: silence. */
    pvdma_vm_set_notifier(vm, NULL, NULL);
    e.n = 0;
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW, 0, contig, 2, NULL), PVDMA_S_OK);
    CHECK_U64(e.n, 0);

    /* Reset and free tear down with notifications too. */
    pvdma_vm_set_notifier(vm, record_event, &e);
    pvdma_vm_reset(vm);
    CHECK_U64(e.n, 1);
    CHECK_U64(e.ev[0].kind, PVDMA_EVENT_UNMAP);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW, 0, contig, 2, NULL), PVDMA_S_OK);
    e.n = 0;
    pvdma_vm_free(vm);
    CHECK_U64(e.n, 1);
}

/*
 * A notifier that cannot carry a MAP out (VFIO could not pin it) refuses
 * it: QUOTA, the later runs are not notified, every run is unmapped
 * again, and nothing stays mapped or pinned.
 */
static void test_notifier_refuses_map(void)
{
    pvdma_vm *vm = new_vm();
    struct events e;
    pvdma_stats st;
    memset(&e, 0, sizeof(e));
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    pvdma_vm_set_notifier(vm, record_event, &e);
    e.refuse = 2;
    CHECK_ST(map(vm, RID_A, RW | FIXED, SCATTER_IOVA, scatter, 4, NULL), PVDMA_S_QUOTA);
    CHECK_U64(e.n, 6);
    check_event(&e.ev[0], PVDMA_EVENT_MAP, 0x50000000, 0x30000, PAGE, RW);
    check_event(&e.ev[1], PVDMA_EVENT_MAP, 0x50001000, 0x50000, PAGE, RW);
    check_event(&e.ev[2], PVDMA_EVENT_UNMAP, 0x50000000, 0x30000, PAGE, 0);
    check_event(&e.ev[3], PVDMA_EVENT_UNMAP, 0x50001000, 0x50000, PAGE, 0);
    check_event(&e.ev[4], PVDMA_EVENT_UNMAP, 0x50002000, RAM1_GPA + 0x2000, 2 * PAGE, 0);
    check_event(&e.ev[5], PVDMA_EVENT_UNMAP, 0x50004000, 0x40000, PAGE, 0);
    CHECK_U64(pvdma_vm_mappings(vm, RID_A, NULL, 0), 0);
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.mappings, 0);
    CHECK_U64(st.pinned_pages, 0);
    CHECK_U64(st.mem_used, 0);
    CHECK(!pvdma_vm_ram_pinned(vm, 0, RAM0_SIZE));

    /* What UNMAP events return is ignored; the same MAP accepted maps. */
    e.n = 0;
    e.refuse = 0;
    CHECK_ST(map(vm, RID_A, RW | FIXED, SCATTER_IOVA, scatter, 4, NULL), PVDMA_S_OK);
    CHECK_U64(e.n, 4);
    e.n = 0;
    e.refuse = 1;
    CHECK_ST(unmap(vm, RID_A, SCATTER_IOVA, 0, NULL), PVDMA_S_OK);
    CHECK_U64(e.n, 4);
    CHECK_U64(pvdma_vm_mappings(vm, RID_A, NULL, 0), 0);
    pvdma_vm_set_notifier(vm, NULL, NULL);
    pvdma_vm_free(vm);
}

static void test_remove_ram(void)
{
    pvdma_vm *vm = new_vm();
    struct events e;
    memset(&e, 0, sizeof(e));
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW | FIXED, SCATTER_IOVA, scatter, 4, NULL), PVDMA_S_OK);
    struct pvdma_seg s = { 0x10000, PAGE };
    CHECK_ST(map(vm, RID_A, RW | FIXED, 0x40000000, &s, 1, NULL), PVDMA_S_OK);
    CHECK(pvdma_vm_ram_pinned(vm, RAM1_GPA, RAM1_SIZE));
    CHECK(pvdma_vm_ram_pinned(vm, RAM1_GPA + 0x3000, 1));
    CHECK(!pvdma_vm_ram_pinned(vm, RAM1_GPA + 0x4000, PAGE));

    /* Removing RAM tears down the mappings that reach it, and only them. */
    pvdma_vm_set_notifier(vm, record_event, &e);
    uint64_t torn = 99;
    CHECK_RES(pvdma_vm_remove_ram(vm, RAM1_GPA, RAM1_SIZE, &torn), PVDMA_OK);
    CHECK_U64(torn, 1);
    CHECK_U64(e.n, 4);
    CHECK_U64(e.ev[0].kind, PVDMA_EVENT_UNMAP);
    CHECK(!pvdma_vm_ram_pinned(vm, RAM1_GPA, RAM1_SIZE));
    CHECK(!pvdma_vm_ram_pinned(vm, 0x30000, PAGE));
    CHECK(pvdma_vm_ram_pinned(vm, 0x10000, PAGE));
    CHECK_U64(pvdma_vm_mappings(vm, RID_A, NULL, 0), 1);
    pvdma_iovec iov[4];
    size_t count;
    pvdma_translate_fault tf;
    CHECK_RES(pvdma_vm_translate(vm, RID_A, SCATTER_IOVA, 1, PVDMA_ACCESS_READ,
                                 iov, 4, &count, &tf),
              PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_U64(tf.reason, PVDMA_FAULT_UNMAPPED);
    CHECK_RES(pvdma_vm_remove_ram(vm, RAM1_GPA, RAM1_SIZE, NULL), PVDMA_ERR_RAM);
    /* Segments in the removed region now FAULT; put it back and they map. */
    CHECK_ST(map(vm, RID_A, RW | FIXED, SCATTER_IOVA, scatter, 4, NULL), PVDMA_S_FAULT);
    CHECK_RES(pvdma_vm_add_ram(vm, RAM1_GPA, RAM1_SIZE, ram1), PVDMA_OK);
    CHECK_ST(map(vm, RID_A, RW | FIXED, SCATTER_IOVA, scatter, 4, NULL), PVDMA_S_OK);

    /* Removing an endpoint releases its pins. */
    CHECK_RES(pvdma_vm_remove_endpoint(vm, RID_A), PVDMA_OK);
    CHECK(!pvdma_vm_ram_pinned(vm, 0, RAM0_SIZE));
    pvdma_stats st;
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.pinned_pages, 0);
    CHECK_U64(st.mappings, 0);
    pvdma_vm_set_notifier(vm, NULL, NULL);
    pvdma_vm_free(vm);
}

/* UNMAP_LIST through the C API: statuses, atomicity, notifications. */
static void test_unmap_list(void)
{
    pvdma_vm *vm = new_vm();
    struct events e;
    memset(&e, 0, sizeof(e));
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    struct pvdma_seg a = { 0x10000, PAGE }, b = { 0x20000, 2 * PAGE },
                     c = { 0x30000, PAGE };
    CHECK_ST(map(vm, RID_A, RW | FIXED, 0x100000, &a, 1, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW | FIXED, 0x102000, &b, 1, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW | FIXED, 0x200000, &c, 1, NULL), PVDMA_S_OK);
    pvdma_vm_set_notifier(vm, record_event, &e);

    pvdma_stats before, st;
    CHECK_RES(pvdma_vm_stats(vm, &before), PVDMA_OK);
    const struct pvdma_range crosses[] = { { 0x100000, PAGE }, { 0x103000, PAGE } };
    const struct pvdma_range empty[] = { { 0x100000, PAGE }, { 0x400000, 1 } };
    const struct pvdma_range overlap[] = { { 0x102000, 1 }, { 0x100000, 0x2001 } };
    const struct pvdma_range zero[] = { { 0x100000, 0 } };
    CHECK_ST(unmap_list(vm, RID_A, crosses, 2, NULL), PVDMA_S_RANGE);
    CHECK_ST(unmap_list(vm, RID_A, empty, 2, NULL), PVDMA_S_NOENT);
    CHECK_ST(unmap_list(vm, RID_A, overlap, 2, NULL), PVDMA_S_INVAL);
    CHECK_ST(unmap_list(vm, RID_A, zero, 1, NULL), PVDMA_S_INVAL);
    CHECK_ST(unmap_list(vm, RID_A, zero, 0, NULL), PVDMA_S_INVAL);
    CHECK_ST(unmap_list(vm, RID_B, zero, 1, NULL), PVDMA_S_STATE);
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.mappings, before.mappings);
    CHECK_U64(st.pinned_pages, before.pinned_pages);
    CHECK_U64(st.mem_used, before.mem_used);
    CHECK_U64(e.n, 0);

    /* Two of three, out of order; one event per removed mapping. */
    const struct pvdma_range good[] = { { 0x200000, PAGE }, { 0x100800, 0x3000 } };
    uint64_t result = 0;
    CHECK_ST(unmap_list(vm, RID_A, good, 2, &result), PVDMA_S_OK);
    CHECK_U64(result, 4 * PAGE);
    CHECK_U64(e.n, 3);
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.mappings, 0);
    CHECK_U64(st.pinned_pages, 0);
    CHECK_U64(st.mem_used, 0);
    pvdma_iovec iov[1];
    size_t count;
    CHECK_RES(pvdma_vm_translate(vm, RID_A, 0x102000, 1, PVDMA_ACCESS_READ,
                                 iov, 1, &count, NULL), PVDMA_ERR_TRANSLATION_FAULT);

    pvdma_request_counts rc;
    CHECK_RES(pvdma_vm_request_counts(vm, &rc), PVDMA_OK);
    CHECK_U64(rc.unmap_list, 7);
    CHECK_U64(rc.attach, 1);
    CHECK_U64(rc.map, 3);
    CHECK_U64(rc.other, 0);
    /* pvdma_stats keeps its layout: op 6 has no row there. */
    uint64_t old_rows = 0;
    for (int op = 0; op < 6; op++) {
        for (int s = 0; s < 13; s++) {
            old_rows += st.requests[op][s];
        }
    }
    CHECK_U64(old_rows, 4);
    pvdma_vm_set_notifier(vm, NULL, NULL);
    pvdma_vm_free(vm);

    /* With the extension off op 6 is an unknown op. */
    pvdma_config cfg = default_config();
    cfg.unmap_list = false;
    vm = new_vm_with(&cfg);
    CHECK_U64(pvdma_vm_features(vm) & PVDMA_FEATURE_UNMAP_LIST, 0);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_ST(map(vm, RID_A, RW | FIXED, 0x100000, &a, 1, NULL), PVDMA_S_OK);
    CHECK_ST(unmap_list(vm, RID_A, good + 1, 1, NULL), PVDMA_S_INVAL);
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.mappings, 1);
    CHECK_RES(pvdma_vm_request_counts(vm, &rc), PVDMA_OK);
    CHECK_U64(rc.unmap_list, 0);
    CHECK_U64(rc.other, 1);
    pvdma_vm_free(vm);
}

/* Requests by op and by transport. */
static void test_request_counts(void)
{
    pvdma_vm *vm = new_vm();
    pvdma_request_counts rc;
    CHECK_RES(pvdma_vm_request_counts(NULL, &rc), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_request_counts(vm, NULL), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vm_request_counts(vm, &rc), PVDMA_OK);
    CHECK_U64(rc.query + rc.attach + rc.detach + rc.map + rc.unmap +
              rc.unmap_list + rc.other, 0);
    CHECK_U64(rc.doorbell + rc.hypercall + rc.other_transport, 0);

    CHECK_ST(op_simple(vm, PVDMA_OP_QUERY, RID_A, NULL), PVDMA_S_OK);
    uint8_t *p = gpa_ptr(REQ_GPA);
    struct pvdma_req h;
    memset(&h, 0, sizeof(h));
    h.op = PVDMA_OP_QUERY;
    h.requester = RID_A;
    memcpy(p, &h, sizeof(h));
    CHECK_ST(pvdma_vm_submit_via(vm, REQ_GPA, PVDMA_TRANSPORT_DOORBELL), PVDMA_S_OK);
    CHECK_ST(pvdma_vm_submit_via(vm, REQ_GPA, PVDMA_TRANSPORT_HYPERCALL), PVDMA_S_OK);
    CHECK_ST(pvdma_vm_submit_via(vm, NOT_RAM, PVDMA_TRANSPORT_HYPERCALL), PVDMA_S_FAULT);
    CHECK_ST(pvdma_vm_submit_via(vm, REQ_GPA, 99), PVDMA_S_OK);
    CHECK_ST(pvdma_vm_submit_via(NULL, REQ_GPA, PVDMA_TRANSPORT_DOORBELL),
             PVDMA_S_INTERNAL);
    CHECK_RES(pvdma_vm_request_counts(vm, &rc), PVDMA_OK);
    CHECK_U64(rc.query, 4);
    CHECK_U64(rc.other, 1);
    CHECK_U64(rc.doorbell, 1);
    CHECK_U64(rc.hypercall, 2);
    CHECK_U64(rc.other_transport, 2);   /* pvdma_vm_submit, transport 99 */
    /* Reset keeps them. */
    pvdma_vm_reset(vm);
    CHECK_RES(pvdma_vm_request_counts(vm, &rc), PVDMA_OK);
    CHECK_U64(rc.query, 4);
    pvdma_vm_free(vm);
}

static void test_stats(void)
{
    pvdma_vm *vm = new_vm();
    pvdma_stats st;
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    for (int op = 0; op < 6; op++) {
        for (int s = 0; s < 13; s++) {
            CHECK_U64(st.requests[op][s], 0);
        }
    }
    CHECK_U64(st.pin_limit, UINT64_MAX);

    CHECK_ST(op_simple(vm, PVDMA_OP_QUERY, RID_A, NULL), PVDMA_S_OK);
    CHECK_ST(op_simple(vm, PVDMA_OP_QUERY, RID_NONE, NULL), PVDMA_S_NODEV);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    struct pvdma_seg s = { 0x10000, 2 * PAGE };
    uint64_t iova;
    CHECK_ST(map(vm, RID_A, FIXED, 0x1000, &s, 1, NULL), PVDMA_S_PERM);
    CHECK_ST(map(vm, RID_A, RW, 0, &s, 1, &iova), PVDMA_S_OK);
    CHECK_ST(unmap(vm, RID_A, 0x12345000, 0, NULL), PVDMA_S_NOENT);
    CHECK_ST(op_simple(vm, 9, RID_A, NULL), PVDMA_S_INVAL);
    CHECK_ST(pvdma_vm_submit(vm, NOT_RAM), PVDMA_S_FAULT);

    pvdma_iovec iov[2];
    size_t count;
    pvdma_lookup l;
    CHECK_RES(pvdma_vm_translate(vm, RID_A, iova, 2 * PAGE, PVDMA_ACCESS_READ,
                                 iov, 2, &count, NULL), PVDMA_OK);
    CHECK_RES(pvdma_vm_translate(vm, RID_A, iova, 1, PVDMA_ACCESS_READ,
                                 NULL, 0, &count, NULL), PVDMA_ERR_BUFFER_TOO_SMALL);
    CHECK_RES(pvdma_vm_translate(vm, RID_A, 0x7000, 1, PVDMA_ACCESS_READ,
                                 iov, 2, &count, NULL), PVDMA_ERR_TRANSLATION_FAULT);
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, iova, 0, &l), PVDMA_OK);           /* not counted */
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, iova, PVDMA_ACCESS_READ, &l), PVDMA_OK);

    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.requests[PVDMA_OP_QUERY][PVDMA_S_OK], 1);
    CHECK_U64(st.requests[PVDMA_OP_QUERY][PVDMA_S_NODEV], 1);
    CHECK_U64(st.requests[PVDMA_OP_ATTACH][PVDMA_S_OK], 1);
    CHECK_U64(st.requests[PVDMA_OP_MAP][PVDMA_S_PERM], 1);
    CHECK_U64(st.requests[PVDMA_OP_MAP][PVDMA_S_OK], 1);
    CHECK_U64(st.requests[PVDMA_OP_UNMAP][PVDMA_S_NOENT], 1);
    CHECK_U64(st.requests[0][PVDMA_S_INVAL], 1);
    CHECK_U64(st.requests[0][PVDMA_S_FAULT], 1);
    CHECK_U64(st.requests[0][12], 0);
    CHECK_U64(st.mappings, 1);
    CHECK_U64(st.pinned_pages, 2);
    CHECK_U64(st.translations, 4);
    CHECK_U64(st.faults, 1);
    pvdma_vm_free(vm);
}

/* ---- queued requests (ABI 3.2) ------------------------------------------- */

#define QCTRL 0x1e0000ull
#define QRING 0x1e1000ull
#define QRING_LEN 0x1000u

struct hook_log {
    atomic_int begins, ends, drained;
    uint32_t last_queue, last_cause, last_applied, last_failed, last_head, last_tail;
    uint64_t last_token;
};

static uint64_t hook_miss_begin(void *opaque)
{
    struct hook_log *h = opaque;
    atomic_fetch_add(&h->begins, 1);
    return 0x1234;
}

static void hook_miss_end(void *opaque, uint64_t token)
{
    struct hook_log *h = opaque;
    h->last_token = token;
    atomic_fetch_add(&h->ends, 1);
}

static void hook_drained(void *opaque, uint32_t queue, uint32_t cause,
                         uint32_t applied, uint32_t failed, uint32_t head,
                         uint32_t tail)
{
    struct hook_log *h = opaque;
    h->last_queue = queue;
    h->last_cause = cause;
    h->last_applied = applied;
    h->last_failed = failed;
    h->last_head = head;
    h->last_tail = tail;
    atomic_fetch_add(&h->drained, 1);
}

/* The guest's side: writes entry `i` into the ring and publishes head. */
static void queue_push(uint32_t i, uint16_t op, uint16_t flags, uint32_t rid,
                       uint64_t iova, uint64_t gpa, uint64_t length)
{
    struct pvdma_queue_entry e;
    memset(&e, 0, sizeof(e));
    e.op = op;
    e.flags = flags;
    e.requester = rid;
    e.iova = iova;
    e.gpa = gpa;
    e.length = length;
    memcpy((uint8_t *)gpa_ptr(QRING) + (i % (QRING_LEN / sizeof(e))) * sizeof(e),
           &e, sizeof(e));
    struct pvdma_queue_ctrl *c = gpa_ptr(QCTRL);
    __atomic_store_n(&c->head, i + 1, __ATOMIC_RELEASE);
}

static void test_queues(void)
{
    pvdma_vm *vm = new_vm();
    CHECK_U64(sizeof(struct pvdma_queue_ctrl), 64);
    CHECK_U64(sizeof(struct pvdma_queue_entry), 32);
    struct hook_log log;
    memset(&log, 0, sizeof(log));
    struct pvdma_drain_hooks hooks = {
        .opaque = &log, .miss_begin = hook_miss_begin,
        .miss_end = hook_miss_end, .drained = hook_drained,
    };
    CHECK_RES(pvdma_vm_set_drain_hooks(vm, &hooks), PVDMA_OK);
    CHECK_RES(pvdma_vm_set_drain_hooks(NULL, &hooks), PVDMA_ERR_NULL_ARGUMENT);
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);

    memset(gpa_ptr(QCTRL), 0, 64);
    struct pvdma_seg segs[2] = { { QCTRL, 64 }, { QRING, QRING_LEN } };
    struct req setup = { .op = PVDMA_OP_QUEUE, .rid = RID_A, .iova = 0,
                         .segs = segs, .nr_segs = 2 };
    CHECK_ST(submit(vm, &setup, NULL), PVDMA_S_OK);
    CHECK_ST(submit(vm, &setup, NULL), PVDMA_S_STATE);
    setup.iova = 8;
    CHECK_ST(submit(vm, &setup, NULL), PVDMA_S_INVAL);

    struct pvdma_queue_info info[8];
    memset(info, 0xff, sizeof(info));
    CHECK_U64(pvdma_vm_queues(vm, info, 2), 8);
    CHECK(info[0].set_up && !info[0].stopped);
    CHECK_U64(info[0].entries, QRING_LEN / 32);
    CHECK_U64(info[0].ctrl_gpa, QCTRL);
    CHECK_U64(info[0].ring_gpa, QRING);
    CHECK(!info[1].set_up);
    CHECK_U64(info[1].index, 1);
    CHECK_U64(info[2].index, UINT32_MAX); /* only n entries written */

    /* Rule 2: a lookup of a queued MAP drains and succeeds. */
    queue_push(0, PVDMA_OP_MAP, RW, RID_A, 0x40000, 0x10000, PAGE);
    pvdma_lookup l;
    CHECK_RES(pvdma_vm_lookup(vm, RID_A, 0x40000, PVDMA_ACCESS_WRITE, &l), PVDMA_OK);
    CHECK_U64(l.gpa, 0x10000);
    CHECK_U64(atomic_load(&log.begins), 1);
    CHECK_U64(atomic_load(&log.ends), 1);
    CHECK_U64(log.last_token, 0x1234);
    CHECK_U64(log.last_cause, PVDMA_DRAIN_MISS);
    CHECK_U64(log.last_applied, 1);
    CHECK_U64(log.last_tail, 1);

    /* Rule 1: a request applies the queue first; a failed entry shows in
     * the next SYNC (status EXIST, result 1: written with any status). */
    queue_push(1, PVDMA_OP_MAP, RW, RID_A, 0x40000, 0x10000, PAGE);
    CHECK_ST(op_simple(vm, PVDMA_OP_QUERY, RID_A, NULL), PVDMA_S_OK);
    CHECK_U64(log.last_cause, PVDMA_DRAIN_REQUEST);
    CHECK_U64(log.last_failed, 1);
    struct pvdma_req *blk = gpa_ptr(REQ_GPA);
    memset(blk, 0, sizeof(*blk));
    blk->op = PVDMA_OP_SYNC;
    blk->requester = RID_A;
    CHECK_ST(pvdma_vm_submit(vm, REQ_GPA), PVDMA_S_EXIST);
    CHECK_U64(blk->result, 1);
    uint64_t result = 99;
    CHECK_ST(op_simple(vm, PVDMA_OP_SYNC, RID_A, &result), PVDMA_S_OK);
    CHECK_U64(result, 0);
    struct pvdma_queue_ctrl *c = gpa_ptr(QCTRL);
    CHECK_U64(c->tail, 2);
    CHECK_U64(c->failed, 1);
    CHECK_U64(c->last_error, PVDMA_S_EXIST);

    pvdma_stats st;
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.queue_entries, 2);
    CHECK_U64(st.queue_failed, 1);
    CHECK_U64(st.queue_drains, 2);
    CHECK_U64(st.miss_drains, 1);
    CHECK_U64(st.faults, 0);

    /* Broken: head - tail > N. SYNC answers STATE; the hook says STOPPED. */
    c->head = 2 + QRING_LEN / 32 + 1;
    CHECK_ST(op_simple(vm, PVDMA_OP_SYNC, RID_A, NULL), PVDMA_S_STATE);
    CHECK_U64(c->stopped, 1);
    CHECK_U64(log.last_cause, PVDMA_DRAIN_STOPPED);
    CHECK_U64(pvdma_vm_queues(vm, info, 1), 8);
    CHECK(info[0].stopped);

    /* Reset tears the queue down and releases its pins. */
    pvdma_vm_reset(vm);
    CHECK_U64(pvdma_vm_queues(vm, info, 1), 8);
    CHECK(!info[0].set_up);
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.pinned_pages, 0);
    CHECK_RES(pvdma_vm_set_drain_hooks(vm, NULL), PVDMA_OK);
    pvdma_vm_free(vm);
}

/* Everything a translation of [iova, iova + len) gives, for comparison. */
static size_t snapshot(pvdma_vm *vm, uint32_t rid, uint64_t iova, uint64_t len,
                       pvdma_iovec *iov, size_t n)
{
    size_t count = 0;
    memset(iov, 0, n * sizeof(*iov));
    pvdma_result r = pvdma_vm_translate(vm, rid, iova, len, PVDMA_ACCESS_READ,
                                        iov, n, &count, NULL);
    return r == PVDMA_OK ? count : (size_t)-1 - r;
}

static void test_state(void)
{
    pvdma_vm *src = new_vm();
    CHECK_ST(op_simple(src, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    CHECK_ST(map(src, RID_A, RW | FIXED, SCATTER_IOVA, scatter, 4, NULL), PVDMA_S_OK);
    struct pvdma_seg s = { 0x10000, 3 * PAGE };
    uint64_t host_iova;
    CHECK_ST(map(src, RID_A, PVDMA_FLAG_READ, 0, &s, 1, &host_iova), PVDMA_S_OK);
    pvdma_vm_record_fault(src, RID_A, 0x1000, PVDMA_ACCESS_READ, PVDMA_FAULT_UNMAPPED);

    /* Size query, too small, then exact. */
    size_t needed = 0;
    CHECK_RES(pvdma_vm_state_save(src, NULL, 0, &needed), PVDMA_ERR_BUFFER_TOO_SMALL);
    CHECK(needed > 0);
    uint8_t *blob = malloc(needed + 16);
    memset(blob, 0xee, needed + 16);
    size_t short_needed = 0;
    CHECK_RES(pvdma_vm_state_save(src, blob, needed - 1, &short_needed),
              PVDMA_ERR_BUFFER_TOO_SMALL);
    CHECK_U64(short_needed, needed);
    CHECK(blob[0] == 0xee);   /* nothing written */
    size_t written = 0;
    CHECK_RES(pvdma_vm_state_save(src, blob, needed + 16, &written), PVDMA_OK);
    CHECK_U64(written, needed);
    CHECK(blob[needed] == 0xee);

    /* The destination: same RAM, same endpoints. */
    pvdma_vm *dst = new_vm();
    CHECK_RES(pvdma_vm_state_load(dst, blob, written), PVDMA_OK);
    CHECK_U64(pvdma_vm_fault_count(dst), 1);
    pvdma_mapping_info ms[4], md[4];
    memset(ms, 0, sizeof(ms));
    memset(md, 0, sizeof(md));
    CHECK_U64(pvdma_vm_mappings(src, RID_A, ms, 4), 2);
    CHECK_U64(pvdma_vm_mappings(dst, RID_A, md, 4), 2);
    CHECK(memcmp(ms, md, sizeof(ms)) == 0);
    pvdma_endpoint_info es[2], ed[2];
    memset(es, 0, sizeof(es));
    memset(ed, 0, sizeof(ed));
    CHECK_U64(pvdma_vm_endpoints(src, es, 2), 2);
    CHECK_U64(pvdma_vm_endpoints(dst, ed, 2), 2);
    /* Field by field: the struct has padding after the two bools. */
    for (int i = 0; i < 2; i++) {
        CHECK_U64(es[i].requester, ed[i].requester);
        CHECK(es[i].attached == ed[i].attached);
        CHECK(es[i].passthrough == ed[i].passthrough);
        CHECK_U64(es[i].mappings, ed[i].mappings);
        CHECK_U64(es[i].mapped_bytes, ed[i].mapped_bytes);
    }

    /* Translations agree, including refusals. */
    static const struct { uint32_t rid; uint64_t iova, len; } probes[] = {
        { RID_A, SCATTER_IOVA, SCATTER_LEN },
        { RID_A, SCATTER_IOVA + 0x900, 0x2000 },
        { RID_A, 0x40000000, 1 },
        { RID_B, 0x10000, 0x3000 },
        { RID_A, SCATTER_IOVA + SCATTER_LEN, 0x1000 },
    };
    for (size_t i = 0; i < sizeof(probes) / sizeof(probes[0]); i++) {
        pvdma_iovec a[8], b[8];
        size_t na = snapshot(src, probes[i].rid, probes[i].iova, probes[i].len, a, 8);
        size_t nb = snapshot(dst, probes[i].rid, probes[i].iova, probes[i].len, b, 8);
        CHECK_U64(na, nb);
        CHECK(memcmp(a, b, sizeof(a)) == 0);
    }
    pvdma_iovec a[8];
    CHECK_U64(snapshot(dst, RID_A, host_iova, 3 * PAGE, a, 8), 1);
    check_iov(&a[0], 0x10000, 3 * PAGE);

    /* A damaged blob is refused, and leaves the destination reset. */
    blob[20] ^= 0x40;
    CHECK_RES(pvdma_vm_state_load(dst, blob, written), PVDMA_ERR_BAD_STATE);
    blob[20] ^= 0x40;
    CHECK_U64(pvdma_vm_mappings(dst, RID_A, NULL, 0), 0);
    uint64_t res;
    CHECK_ST(op_simple(dst, PVDMA_OP_QUERY, RID_A, &res), PVDMA_S_OK);
    CHECK_U64(res, PVDMA_QUERY_BYPASS);
    CHECK_RES(pvdma_vm_state_load(dst, blob, written - 1), PVDMA_ERR_BAD_STATE);
    CHECK_RES(pvdma_vm_state_load(dst, blob, 0), PVDMA_ERR_BAD_STATE);
    /* And it can still take the good one. */
    CHECK_RES(pvdma_vm_state_load(dst, blob, written), PVDMA_OK);
    CHECK_U64(pvdma_vm_mappings(dst, RID_A, NULL, 0), 2);

    /* Another IOVA width, or a missing endpoint: refused. */
    pvdma_config c = default_config();
    c.iova_bits = 40;
    pvdma_vm *narrow = new_vm_with(&c);
    CHECK_RES(pvdma_vm_state_load(narrow, blob, written), PVDMA_ERR_BAD_STATE);
    pvdma_vm_free(narrow);
    pvdma_vm *missing = new_vm();
    CHECK_RES(pvdma_vm_remove_endpoint(missing, RID_A), PVDMA_OK);
    CHECK_RES(pvdma_vm_state_load(missing, blob, written), PVDMA_ERR_BAD_STATE);
    pvdma_vm_free(missing);

    free(blob);
    pvdma_vm_free(dst);
    pvdma_vm_free(src);
}

/* ---- concurrency ------------------------------------------------------------ */

#define THREADS 4
#define ITERATIONS 300

struct worker {
    pvdma_vm *vm;
    uint32_t rid;
    uint64_t block;
    uint64_t data;
};

static void *worker(void *arg)
{
    struct worker *w = arg;
    struct pvdma_seg seg = { w->data, 2 * PAGE };
    for (int i = 0; i < ITERATIONS; i++) {
        struct req r = { .op = PVDMA_OP_MAP, .flags = RW, .rid = w->rid,
                         .segs = &seg, .nr_segs = 1 };
        struct pvdma_req back;
        CHECK_ST(submit_at(w->vm, w->block, &r, &back), PVDMA_S_OK);
        pvdma_iovec iov[2];
        size_t count = 0;
        CHECK_RES(pvdma_vm_translate(w->vm, w->rid, back.iova, 2 * PAGE,
                                     PVDMA_ACCESS_WRITE, iov, 2, &count, NULL),
                  PVDMA_OK);
        CHECK_U64(count, 1);
        if (count == 1) {
            CHECK(iov[0].base == gpa_ptr(w->data));
            ((volatile uint8_t *)iov[0].base)[i % (2 * PAGE)] = (uint8_t)i;
        }
        pvdma_lookup l;
        CHECK_RES(pvdma_vm_lookup(w->vm, w->rid, back.iova + PAGE, 0, &l), PVDMA_OK);
        CHECK_U64(l.gpa, w->data + PAGE);
        r = (struct req){ .op = PVDMA_OP_UNMAP, .rid = w->rid, .iova = back.iova };
        CHECK_ST(submit_at(w->vm, w->block, &r, &back), PVDMA_S_OK);
        CHECK_U64(back.result, 2 * PAGE);
    }
    return NULL;
}

static atomic_bool readers_stop;

static void *reader(void *arg)
{
    pvdma_vm *vm = arg;
    while (!atomic_load(&readers_stop)) {
        pvdma_stats st;
        pvdma_fault f[4];
        pvdma_endpoint_info e[8];
        pvdma_mapping_info m[4];
        CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
        CHECK(st.mappings <= THREADS);
        (void)pvdma_vm_faults(vm, f, 4);
        CHECK_U64(pvdma_vm_endpoints(vm, e, 8), 2 + THREADS);
        CHECK(pvdma_vm_mappings(vm, 0x20, m, 4) <= 1);
        (void)pvdma_vm_ram_pinned(vm, 0x100000, 0x100000);
    }
    return NULL;
}

static void test_concurrency(void)
{
    pvdma_vm *vm = new_vm();
    pthread_t th[THREADS], rd;
    struct worker w[THREADS];
    for (int t = 0; t < THREADS; t++) {
        w[t] = (struct worker){ .vm = vm, .rid = 0x20u + (uint32_t)t,
                                .block = REQ_GPA + 0x2000 + (uint64_t)t * PAGE,
                                .data = 0x100000 + (uint64_t)t * 0x10000 };
        CHECK_RES(pvdma_vm_add_endpoint(vm, w[t].rid, NULL), PVDMA_OK);
        CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, w[t].rid, NULL), PVDMA_S_OK);
    }
    atomic_store(&readers_stop, false);
    CHECK(pthread_create(&rd, NULL, reader, vm) == 0);
    for (int t = 0; t < THREADS; t++) {
        CHECK(pthread_create(&th[t], NULL, worker, &w[t]) == 0);
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
    }
    atomic_store(&readers_stop, true);
    pthread_join(rd, NULL);
    pvdma_stats st;
    CHECK_RES(pvdma_vm_stats(vm, &st), PVDMA_OK);
    CHECK_U64(st.mappings, 0);
    CHECK_U64(st.pinned_pages, 0);
    CHECK_U64(st.requests[PVDMA_OP_MAP][PVDMA_S_OK], THREADS * ITERATIONS);
    CHECK_U64(st.requests[PVDMA_OP_UNMAP][PVDMA_S_OK], THREADS * ITERATIONS);
    CHECK_U64(st.faults, 0);
    pvdma_vm_free(vm);
}

/* ---- virtqueues -------------------------------------------------------------- */

/*
 * A split ring of 16 entries whose rings and buffers sit at IOVAs that the
 * guest mapped onto scattered pages of both RAM regions.
 */
#define VQ_SIZE 16u
#define VQ_DESC_IOVA 0x70000000ull
#define VQ_AVAIL_IOVA 0x70005000ull
#define VQ_USED_IOVA 0x70002000ull
#define VQ_DESC_GPA 0x9000ull
#define VQ_AVAIL_GPA (RAM1_GPA + 0x3000)
#define VQ_USED_GPA 0x6000ull
#define VQ_HDR_IOVA 0x71000000ull
#define VQ_DATA_IOVA 0x71001000ull
#define VQ_STATUS_IOVA 0x71002000ull
#define VQ_HDR_GPA 0x20000ull
#define VQ_DATA_GPA (RAM1_GPA + 0x4000)
#define VQ_STATUS_GPA 0x70000ull
#define VRING_F_NEXT 1u
#define VRING_F_WRITE 2u
#define VIRTIO_RING_F_EVENT_IDX (1ull << 29)

/* Virtio rings are little-endian: the host is (checked in main). */
struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static void vq_map_page(pvdma_vm *vm, uint64_t iova, uint64_t gpa,
                        uint16_t perms)
{
    const struct pvdma_seg seg = { gpa, PAGE };
    CHECK_ST(map(vm, RID_A, FIXED | perms, iova, &seg, 1, NULL), PVDMA_S_OK);
}

static void vq_publish(uint16_t slot, uint16_t head, uint16_t idx)
{
    uint16_t *avail = gpa_ptr(VQ_AVAIL_GPA);
    avail[2 + slot % VQ_SIZE] = head;
    /* The driver's barrier before publishing idx. */
    atomic_thread_fence(memory_order_release);
    avail[1] = idx;
}

static void test_virtqueue(void)
{
    pvdma_vm *vm = new_vm();
    CHECK_ST(op_simple(vm, PVDMA_OP_ATTACH, RID_A, NULL), PVDMA_S_OK);
    vq_map_page(vm, VQ_DESC_IOVA, VQ_DESC_GPA, PVDMA_FLAG_READ);
    vq_map_page(vm, VQ_AVAIL_IOVA, VQ_AVAIL_GPA, PVDMA_FLAG_READ);
    vq_map_page(vm, VQ_USED_IOVA, VQ_USED_GPA, RW);
    vq_map_page(vm, VQ_HDR_IOVA, VQ_HDR_GPA, PVDMA_FLAG_READ);
    vq_map_page(vm, VQ_DATA_IOVA, VQ_DATA_GPA, PVDMA_FLAG_READ);
    vq_map_page(vm, VQ_STATUS_IOVA, VQ_STATUS_GPA, PVDMA_FLAG_WRITE);

    /* Driver: clean rings, a header / data / status chain at head 0. */
    memset(gpa_ptr(VQ_DESC_GPA), 0, PAGE);
    memset(gpa_ptr(VQ_AVAIL_GPA), 0, PAGE);
    memset(gpa_ptr(VQ_USED_GPA), 0, PAGE);
    const struct vring_desc chain_desc[3] = {
        { VQ_HDR_IOVA, 16, VRING_F_NEXT, 1 },
        { VQ_DATA_IOVA, 512, VRING_F_NEXT, 2 },
        { VQ_STATUS_IOVA, 1, VRING_F_WRITE, 0 },
    };
    memcpy(gpa_ptr(VQ_DESC_GPA), chain_desc, sizeof(chain_desc));
    memcpy(gpa_ptr(VQ_HDR_GPA), "virtio-blk req!!", 16);
    memset(gpa_ptr(VQ_DATA_GPA), 0xab, 512);
    *(uint8_t *)gpa_ptr(VQ_STATUS_GPA) = 0xff;
    vq_publish(0, 0, 1);

    const pvdma_vq_config cfg = {
        .desc = VQ_DESC_IOVA, .avail = VQ_AVAIL_IOVA, .used = VQ_USED_IOVA,
        .features = VIRTIO_RING_F_EVENT_IDX, .size = VQ_SIZE,
    };
    pvdma_vq *vq = NULL;
    CHECK_RES(pvdma_vq_open(vm, RID_A, &cfg, &vq), PVDMA_VQ_OK);
    if (!vq) {
        pvdma_vm_free(vm);
        return;
    }

    /* Too small: the counts needed come back, the chain stays queued. */
    pvdma_iovec rd[4], wr[4];
    pvdma_vq_chain ch;
    memset(&ch, 0, sizeof(ch));
    CHECK_RES(pvdma_vq_pop(vq, rd, 1, wr, 1, &ch),
              PVDMA_VQ_ERR_BUFFER_TOO_SMALL);
    CHECK_U64(ch.head, 0);
    CHECK_U64(ch.n_readable, 2);
    CHECK_U64(ch.n_writable, 1);
    CHECK_RES(pvdma_vq_pop(vq, NULL, 0, NULL, 0, &ch),
              PVDMA_VQ_ERR_BUFFER_TOO_SMALL);

    memset(&ch, 0, sizeof(ch));
    CHECK_RES(pvdma_vq_pop(vq, rd, 4, wr, 4, &ch), PVDMA_VQ_OK);
    CHECK_U64(ch.head, 0);
    CHECK_U64(ch.n_readable, 2);
    CHECK_U64(ch.n_writable, 1);
    CHECK_U64(ch.readable_bytes, 528);
    CHECK_U64(ch.writable_bytes, 1);
    CHECK_U64(rd[0].gpa, VQ_HDR_GPA);
    CHECK_U64(rd[0].len, 16);
    CHECK(rd[0].base == gpa_ptr(VQ_HDR_GPA));
    CHECK(memcmp(rd[0].base, "virtio-blk req!!", 16) == 0);
    CHECK_U64(rd[1].gpa, VQ_DATA_GPA);
    CHECK_U64(rd[1].len, 512);
    CHECK(rd[1].base == gpa_ptr(VQ_DATA_GPA));
    CHECK_U64(((const uint8_t *)rd[1].base)[511], 0xab);
    CHECK_U64(wr[0].gpa, VQ_STATUS_GPA);
    CHECK_U64(wr[0].len, 1);
    CHECK(wr[0].base == gpa_ptr(VQ_STATUS_GPA));
    /* The device writes its status through the host pointer. */
    *(uint8_t *)wr[0].base = 0;
    CHECK_U64(*(const uint8_t *)gpa_ptr(VQ_STATUS_GPA), 0);
    CHECK_RES(pvdma_vq_pop(vq, rd, 4, wr, 4, &ch), PVDMA_VQ_EMPTY);

    CHECK_RES(pvdma_vq_push(vq, 0, 1), PVDMA_VQ_OK);
    const uint16_t *used16 = gpa_ptr(VQ_USED_GPA);
    const uint32_t *used32 = gpa_ptr(VQ_USED_GPA);
    CHECK_U64(used16[1], 1);        /* used idx */
    CHECK_U64(used32[1], 0);        /* used[0].id */
    CHECK_U64(used32[2], 1);        /* used[0].len */
    CHECK_RES(pvdma_vq_push(vq, VQ_SIZE, 1), PVDMA_VQ_ERR_INVALID_ARGUMENT);
    CHECK_U64(used16[1], 1);

    /* used_event is 0: crossing it (idx 0 -> 1) notifies, once. */
    bool notify = false;
    CHECK_RES(pvdma_vq_needs_notify(vq, &notify), PVDMA_VQ_OK);
    CHECK(notify);
    CHECK_RES(pvdma_vq_needs_notify(vq, &notify), PVDMA_VQ_OK);
    CHECK(!notify);
    bool pending = true;
    CHECK_RES(pvdma_vq_set_notify(vq, true, &pending), PVDMA_VQ_OK);
    CHECK(!pending);

    /*
     * The guest unmaps the used ring: the next chain still pops (the
     * descriptor table and avail ring are mapped), but its push faults,
     * though the queue translated the used ring before.
     */
    vq_publish(1, 0, 2);
    CHECK_ST(unmap(vm, RID_A, VQ_USED_IOVA, 0, NULL), PVDMA_S_OK);
    CHECK_RES(pvdma_vq_pop(vq, rd, 4, wr, 4, &ch), PVDMA_VQ_OK);
    pvdma_stats before, after;
    pvdma_vm_stats(vm, &before);
    CHECK_RES(pvdma_vq_push(vq, ch.head, 1), PVDMA_VQ_ERR_TRANSLATION_FAULT);
    pvdma_vm_stats(vm, &after);
    CHECK(after.faults > before.faults);
    CHECK_U64(used16[1], 1);
    /* Mapped again (elsewhere): the push goes through. */
    vq_map_page(vm, VQ_USED_IOVA, VQ_USED_GPA + PAGE, RW);
    memset(gpa_ptr(VQ_USED_GPA + PAGE), 0, PAGE);
    CHECK_RES(pvdma_vq_push(vq, ch.head, 1), PVDMA_VQ_OK);
    CHECK_U64(((const uint16_t *)gpa_ptr(VQ_USED_GPA + PAGE))[1], 2);

    /* NULL and bad arguments. */
    pvdma_vq *other = NULL;
    CHECK_RES(pvdma_vq_open(NULL, RID_A, &cfg, &other),
              PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_open(vm, RID_A, NULL, &other),
              PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_open(vm, RID_A, &cfg, NULL),
              PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_open(vm, RID_NONE, &cfg, &other),
              PVDMA_VQ_ERR_NOT_FOUND);
    pvdma_vq_config bad = cfg;
    bad.size = 3;
    CHECK_RES(pvdma_vq_open(vm, RID_A, &bad, &other),
              PVDMA_VQ_ERR_INVALID_ARGUMENT);
    bad = cfg;
    bad.desc += 8;
    CHECK_RES(pvdma_vq_open(vm, RID_A, &bad, &other),
              PVDMA_VQ_ERR_INVALID_ARGUMENT);
    bad = cfg;
    bad.features |= 1ull << 34;     /* VIRTIO_F_RING_PACKED */
    CHECK_RES(pvdma_vq_open(vm, RID_A, &bad, &other),
              PVDMA_VQ_ERR_INVALID_ARGUMENT);
    CHECK(other == NULL);
    CHECK_RES(pvdma_vq_pop(NULL, rd, 4, wr, 4, &ch),
              PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_pop(vq, NULL, 4, wr, 4, &ch),
              PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_pop(vq, rd, 4, NULL, 4, &ch),
              PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_pop(vq, rd, 4, wr, 4, NULL),
              PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_push(NULL, 0, 0), PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_needs_notify(NULL, &notify),
              PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_needs_notify(vq, NULL), PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_set_notify(NULL, true, &pending),
              PVDMA_VQ_ERR_NULL_ARGUMENT);
    CHECK_RES(pvdma_vq_set_notify(vq, false, NULL), PVDMA_VQ_OK);

    /* Every result has its own description; others share "unknown". */
    static const uint32_t codes[] = {
        PVDMA_VQ_OK, PVDMA_VQ_ERR_NULL_ARGUMENT,
        PVDMA_VQ_ERR_INVALID_ARGUMENT, PVDMA_VQ_ERR_NOT_FOUND,
        PVDMA_VQ_ERR_BUFFER_TOO_SMALL, PVDMA_VQ_ERR_TRANSLATION_FAULT,
        PVDMA_VQ_ERR_BAD_STATE, PVDMA_VQ_ERR_PANIC, PVDMA_VQ_EMPTY,
        PVDMA_VQ_ERR_BAD_CHAIN,
    };
    const size_t ncodes = sizeof(codes) / sizeof(codes[0]);
    const char *unknown = pvdma_vq_strerror(0xffffffffu);
    CHECK(unknown != NULL);
    CHECK(strcmp(pvdma_vq_strerror(3), unknown) == 0);
    CHECK(strcmp(pvdma_vq_strerror(18), unknown) == 0);
    for (size_t i = 0; i < ncodes; i++) {
        const char *d = pvdma_vq_strerror(codes[i]);
        CHECK(d != NULL && d[0] != '\0');
        CHECK(d && strcmp(d, unknown) != 0);
        for (size_t j = 0; j < i; j++) {
            CHECK(strcmp(pvdma_vq_strerror(codes[j]), d) != 0);
        }
    }

    pvdma_vq_close(vq);
    pvdma_vq_close(NULL);
    pvdma_vm_free(vm);
}

int main(void)
{
    /* Unbuffered, so the TAP lines before any abort are not lost. */
    setvbuf(stdout, NULL, _IONBF, 0);
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) {
        printf("1..0 # SKIP big-endian host: blocks are built in host order\n");
        return 0;
    }
    ram0 = map_ram(RAM0_SIZE);
    ram1 = map_ram(RAM1_SIZE);

    /* First the tests that need no guest RAM behind the VM. */
    run_test("names of results, statuses and fault reasons", test_names);
    run_test("NULL and bad arguments are refused", test_null_arguments);
    run_test("configuration defaults, features, bad values", test_config);
    run_test("RAM regions and endpoints", test_ram_and_endpoints);
    run_test("QUERY, ATTACH, DETACH", test_query_attach_detach);
    run_test("malformed requests", test_malformed_requests);
    run_test("MAP and UNMAP, with every error", test_map_unmap);
    run_test("QUOTA at the pin limit", test_quota);
    run_test("QUOTA at the memory limit", test_mem_quota);
    run_test("NOSPC, and INVAL without HOST_IOVA", test_nospc_and_host_iova_off);
    run_test("translate into an iovec array", test_translate);
    run_test("the fault log keeps the newest", test_fault_log_wraps);
    run_test("single-address lookup", test_lookup);
    run_test("map/unmap notifications", test_notifier);
    run_test("a notifier refusing a MAP: QUOTA, nothing left", test_notifier_refuses_map);
    run_test("RAM removal tears down mappings", test_remove_ram);
    run_test("statistics", test_stats);
    run_test("queued requests", test_queues);
    run_test("UNMAP_LIST", test_unmap_list);
    run_test("request counts by op and transport", test_request_counts);
    run_test("migration state save and load", test_state);
    run_test("concurrent requests and translations", test_concurrency);
    run_test("a virtqueue over scattered IOVA pages", test_virtqueue);

    printf("1..%d\n", tests_run);
    /* The plain summary goes to stderr: on stdout it is not TAP. */
    fprintf(stderr, "%d passed, %d failed\n", tests_run - tests_failed,
            tests_failed);
    return tests_failed ? 1 : 0;
}
