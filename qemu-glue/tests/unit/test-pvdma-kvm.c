/*
 * Unit tests for the pvdma KVM_EXIT_HYPERCALL handler
 *
 * The handler runs against synthetic exits, as KVM would leave them in
 * struct kvm_run, with pvdma_hypercall() replaced by this file's version:
 * it records how it was called and, when a test asks for it, runs the
 * request in a real libpvdma VM over a buffer standing in for guest RAM.
 *
 * Copyright (c) 2026 pvdma developers
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/memalign.h"
#include "standard-headers/linux/kvm_para.h"
#include "hw/misc/pvdma-hypercall.h"
#include "target/i386/kvm/pvdma-kvm.h"
#include "pvdma.h"

#define RAM_GPA     0x100000ULL
#define RAM_SIZE    (64 * PVDMA_PAGE_SIZE)
#define BLOCK_GPA   RAM_GPA
#define BUF_GPA     (RAM_GPA + 8 * PVDMA_PAGE_SIZE)
#define IOVA        0x40000000ULL
#define RID         0x0010
#define RID_ABSENT  0x0099

/* What the KVM patch leaves in struct kvm_run for a hypercall exit */
static void synthetic_exit(struct kvm_run *run, uint64_t nr, uint64_t arg0)
{
    memset(run, 0, sizeof(*run));
    run->exit_reason = KVM_EXIT_HYPERCALL;
    run->hypercall.nr = nr;
    run->hypercall.args[0] = arg0;
    run->hypercall.longmode = 1;
    run->hypercall.ret = 0x5a5a5a5a5a5a5a5aULL;
}

/* pvdma_hypercall() as the handler sees it */
static struct {
    unsigned calls;
    uint64_t nr;
    uint64_t arg;
    bool cpl0;
    pvdma_vm *vm;           /* NULL: no pvdma function has it live */
} hc;

static uint8_t *ram;

bool pvdma_hypercall(uint64_t nr, uint64_t arg, bool cpl0, uint64_t *ret)
{
    hc.calls++;
    hc.nr = nr;
    hc.arg = arg;
    hc.cpl0 = cpl0;
    if (!hc.vm) {
        return false;
    }
    *ret = pvdma_vm_submit(hc.vm, arg);
    return true;
}

static void hc_reset(pvdma_vm *vm)
{
    memset(&hc, 0, sizeof(hc));
    hc.vm = vm;
}

static pvdma_vm *vm_new(void)
{
    pvdma_config cfg;
    pvdma_vm *vm = NULL;

    pvdma_config_default(&cfg);
    g_assert_cmpuint(pvdma_vm_new(&cfg, &vm), ==, PVDMA_OK);
    g_assert_cmpuint(pvdma_vm_add_ram(vm, RAM_GPA, RAM_SIZE, ram), ==,
                     PVDMA_OK);
    g_assert_cmpuint(pvdma_vm_add_endpoint(vm, RID, NULL), ==, PVDMA_OK);
    return vm;
}

/* Writes a request block with no segments at BLOCK_GPA */
static struct pvdma_req *put_block(uint16_t op, uint16_t flags, uint32_t rid,
                                   uint64_t iova, uint64_t length)
{
    struct pvdma_req *req = (struct pvdma_req *)(ram + (BLOCK_GPA - RAM_GPA));

    memset(req, 0, PVDMA_REQ_HEADER_SIZE + PVDMA_SEG_SIZE);
    req->op = op;
    req->flags = flags;
    req->status = 0xdeadbeef;
    req->requester = rid;
    req->iova = iova;
    req->length = length;
    return req;
}

/* Runs a synthetic pvdma exit for the block at @gpa; returns hypercall.ret */
static uint64_t run_exit(uint64_t gpa)
{
    struct kvm_run run, expect;
    unsigned calls = hc.calls;

    synthetic_exit(&run, KVM_HC_PVDMA, gpa);
    expect = run;
    g_assert_true(kvm_pvdma_handle_hypercall(&run));
    g_assert_cmpuint(hc.calls, ==, calls + 1);
    g_assert_cmpuint(hc.nr, ==, KVM_HC_PVDMA);
    g_assert_cmpuint(hc.arg, ==, gpa);
    /* KVM refuses CPL > 0 callers itself: whatever exits ran at CPL 0 */
    g_assert_true(hc.cpl0);
    /* hypercall.ret is the only field the handler may write */
    g_assert_cmpuint(run.hypercall.ret, !=, 0x5a5a5a5a5a5a5a5aULL);
    expect.hypercall.ret = run.hypercall.ret;
    g_assert_cmpmem(&run, sizeof(run), &expect, sizeof(expect));
    return run.hypercall.ret;
}

/* Exits for other hypercalls are not the handler's: untouched, not run */
static void test_other_numbers(void)
{
    static const uint64_t others[] = {
        KVM_HC_MAP_GPA_RANGE, 0x50444d41 /* TCG's HYPERCALL_NR */,
        KVM_HC_PVDMA + 1, KVM_HC_PVDMA | (1ULL << 32), 0,
    };
    pvdma_vm *vm = vm_new();
    struct kvm_run run, before;
    size_t i;

    for (i = 0; i < ARRAY_SIZE(others); i++) {
        hc_reset(vm);
        synthetic_exit(&run, others[i], BLOCK_GPA);
        before = run;
        g_assert_false(kvm_pvdma_handle_hypercall(&run));
        g_assert_cmpuint(hc.calls, ==, 0);
        g_assert_cmpmem(&run, sizeof(run), &before, sizeof(before));
    }
    pvdma_vm_free(vm);
}

/* No live pvdma function: KVM's answer for an unknown hypercall */
static void test_not_live(void)
{
    hc_reset(NULL);
    g_assert_cmpuint(run_exit(BLOCK_GPA), ==, -(uint64_t)KVM_ENOSYS);
    g_assert_cmpuint(hc.calls, ==, 1);
}

/* QUERY, MAP and UNMAP through exits reach the library and its status RAX */
static void test_map_unmap(void)
{
    pvdma_vm *vm = vm_new();
    struct pvdma_req *req;
    pvdma_lookup lk;

    hc_reset(vm);
    req = put_block(PVDMA_OP_QUERY, 0, RID, 0, 0);
    g_assert_cmpuint(run_exit(BLOCK_GPA), ==, PVDMA_S_OK);
    g_assert_cmpuint(req->status, ==, PVDMA_S_OK);

    req = put_block(PVDMA_OP_ATTACH, 0, RID, 0, 0);
    g_assert_cmpuint(run_exit(BLOCK_GPA), ==, PVDMA_S_OK);

    req = put_block(PVDMA_OP_MAP, PVDMA_FLAG_READ | PVDMA_FLAG_FIXED, RID,
                    IOVA, PVDMA_PAGE_SIZE);
    req->nr_segs = 1;
    req->segs[0].gpa = BUF_GPA;
    req->segs[0].len = PVDMA_PAGE_SIZE;
    g_assert_cmpuint(run_exit(BLOCK_GPA), ==, PVDMA_S_OK);
    g_assert_cmpuint(req->status, ==, PVDMA_S_OK);
    g_assert_cmpuint(pvdma_vm_lookup(vm, RID, IOVA + 8, 0, &lk), ==,
                     PVDMA_OK);
    g_assert_cmpuint(lk.gpa, ==, BUF_GPA + 8);
    g_assert_cmpuint(lk.perms, ==, PVDMA_FLAG_READ);

    /* The same IOVA again: the library's status, not a transport error */
    g_assert_cmpuint(run_exit(BLOCK_GPA), ==, PVDMA_S_EXIST);

    req = put_block(PVDMA_OP_UNMAP, 0, RID, IOVA, PVDMA_PAGE_SIZE);
    g_assert_cmpuint(run_exit(BLOCK_GPA), ==, PVDMA_S_OK);
    g_assert_cmpuint(pvdma_vm_lookup(vm, RID, IOVA, 0, &lk), ==,
                     PVDMA_ERR_TRANSLATION_FAULT);
    g_assert_cmpuint(hc.calls, ==, 5);
    pvdma_vm_free(vm);
}

/* Hostile arguments get the statuses the doorbell would give */
static void test_bad_requests(void)
{
    pvdma_vm *vm = vm_new();
    struct pvdma_req *req;
    pvdma_stats st;

    hc_reset(vm);
    /* A block outside guest RAM (what a 32-bit caller's cut RBX may be) */
    g_assert_cmpuint(run_exit(0xfffff000ULL), ==, PVDMA_S_FAULT);
    g_assert_cmpuint(run_exit(RAM_GPA + RAM_SIZE - 8), ==, PVDMA_S_FAULT);

    req = put_block(PVDMA_OP_QUERY, 0, RID_ABSENT, 0, 0);
    g_assert_cmpuint(run_exit(BLOCK_GPA), ==, PVDMA_S_NODEV);
    g_assert_cmpuint(req->status, ==, PVDMA_S_NODEV);

    req = put_block(0x7777, 0, RID, 0, 0);
    g_assert_cmpuint(run_exit(BLOCK_GPA), ==, PVDMA_S_INVAL);

    /* A MAP of a page outside guest RAM leaves nothing behind */
    req = put_block(PVDMA_OP_MAP, PVDMA_FLAG_WRITE | PVDMA_FLAG_FIXED, RID,
                    IOVA, PVDMA_PAGE_SIZE);
    req->nr_segs = 1;
    req->segs[0].gpa = RAM_GPA + RAM_SIZE;
    req->segs[0].len = PVDMA_PAGE_SIZE;
    g_assert_cmpuint(run_exit(BLOCK_GPA), !=, PVDMA_S_OK);
    g_assert_cmpuint(pvdma_vm_mappings(vm, RID, NULL, 0), ==, 0);
    g_assert_cmpuint(pvdma_vm_stats(vm, &st), ==, PVDMA_OK);
    g_assert_cmpuint(st.mappings, ==, 0);
    g_assert_cmpuint(st.pinned_pages, ==, 0);
    pvdma_vm_free(vm);
}

int main(int argc, char **argv)
{
    int ret;

    /* libpvdma wants guest RAM page aligned, as QEMU's RAM blocks are */
    ram = qemu_memalign(PVDMA_PAGE_SIZE, RAM_SIZE);
    memset(ram, 0, RAM_SIZE);
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/pvdma-kvm/other-numbers", test_other_numbers);
    g_test_add_func("/pvdma-kvm/not-live", test_not_live);
    g_test_add_func("/pvdma-kvm/map-unmap", test_map_unmap);
    g_test_add_func("/pvdma-kvm/bad-requests", test_bad_requests);
    ret = g_test_run();
    qemu_vfree(ram);
    return ret;
}
