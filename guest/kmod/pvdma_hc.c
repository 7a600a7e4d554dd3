// SPDX-License-Identifier: GPL-2.0
/*
 * pvdma_hc: the pvdma hypercall transport from guest kernel code.
 *
 * A demo module for tests/guest/guest-demo.sh, not a driver: at load it finds
 * pvdma (1b36:0015) and edu (1234:11e8), reads FEATURES and HYPERCALL_NR
 * from pvdma's BAR0 and, when FEATURES.HYPERCALL is set, runs QUERY,
 * ATTACH, MAP (FIXED, READ|WRITE), UNMAP, DETACH for edu and a QUERY of a
 * requester that does not exist, each through VMCALL (Intel) or VMMCALL
 * (AMD) with RAX = HYPERCALL_NR and RBX = the request block's
 * guest-physical address. It prints one "pvdma_hc: " line per step and
 * "pvdma_hc: PASS" or "pvdma_hc: FAIL ...". Everything it did is undone
 * by then; on PASS it loads (0) so /init can rmmod it, on FAIL the load
 * fails (-EIO). (Not -EAGAIN on PASS: busybox insmod retries a failed
 * finit_module() with init_module(), which would run the demo twice.)
 *
 * The request layout comes from rust-core/include/pvdma_abi.h, unchanged.
 */
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/gfp.h>
#include <linux/io.h>
#include <asm/processor.h>

#include "pvdma_abi.h"

#define EDU_VENDOR	0x1234
#define EDU_DEVICE	0x11e8

static unsigned long iova = 0x2000000;
module_param(iova, ulong, 0444);
MODULE_PARM_DESC(iova, "FIXED IOVA for the MAP of the data page");

static uint nodev_rid = 0x0100;		/* bus 1: nothing there on q35 */
module_param(nodev_rid, uint, 0444);
MODULE_PARM_DESC(nodev_rid, "a requester ID with no device, for NODEV");

static char *insn = "auto";
module_param(insn, charp, 0444);
MODULE_PARM_DESC(insn, "auto (by CPU vendor), vmcall or vmmcall");

static const char *status_name(long s)
{
	static const char *const names[] = {
		"OK", "INVAL", "NODEV", "FAULT", "NOSPC", "EXIST", "NOENT",
		"RANGE", "TOOBIG", "QUOTA", "PERM", "STATE",
	};

	if (s >= 0 && s < ARRAY_SIZE(names))
		return names[s];
	if (s == PVDMA_S_INTERNAL)
		return "INTERNAL";
	return s == PVDMA_HC_EPERM ? "EPERM(-1)" : "?";
}

/* RAX = nr, RBX = gpa; the status comes back in RAX. */
static long hypercall(bool amd, unsigned long nr, phys_addr_t gpa)
{
	unsigned long rax = nr;

	if (amd)
		asm volatile("vmmcall" : "+a"(rax) : "b"(gpa) : "memory");
	else
		asm volatile("vmcall" : "+a"(rax) : "b"(gpa) : "memory");
	return (long)rax;
}

struct ctx {
	bool amd;
	u32 nr;
	struct pvdma_req *req;
	phys_addr_t req_gpa;
	int failed;
};

static long request(struct ctx *c, const char *what, u16 op, u16 flags,
		    u32 rid, u64 req_iova, const struct pvdma_seg *seg,
		    long want)
{
	struct pvdma_req *r = c->req;
	long st;

	memset(r, 0, PVDMA_REQ_HEADER_SIZE + PVDMA_SEG_SIZE);
	r->op = op;
	r->flags = flags;
	r->status = 0xdeadbeef;
	r->requester = rid;
	r->iova = req_iova;
	if (seg) {
		r->nr_segs = 1;
		r->segs[0] = *seg;
	}
	st = hypercall(c->amd, c->nr, c->req_gpa);
	if (st != want || READ_ONCE(r->status) != (u32)st) {
		c->failed++;
		pr_info("pvdma_hc: FAIL: %s -> RAX %ld (%s), block status 0x%x, want %s\n",
			what, st, status_name(st), READ_ONCE(r->status),
			status_name(want));
	} else {
		pr_info("pvdma_hc: %s -> %s (iova 0x%llx length 0x%llx result 0x%llx)\n",
			what, status_name(st), r->iova, r->length, r->result);
	}
	return st;
}

static int __init pvdma_hc_init(void)
{
	struct pci_dev *pvdma, *edu = NULL;
	void __iomem *bar0 = NULL;
	struct ctx c = { };
	struct pvdma_seg seg;
	unsigned long page = 0;
	u64 features;
	u32 rid;
	int ret = -ENODEV;
	long st;

	pvdma = pci_get_device(PVDMA_PCI_VENDOR_ID, PVDMA_PCI_DEVICE_ID, NULL);
	if (!pvdma) {
		pr_info("pvdma_hc: FAIL: no pvdma (1b36:0015)\n");
		return -ENODEV;
	}
	edu = pci_get_device(EDU_VENDOR, EDU_DEVICE, NULL);
	if (!edu) {
		pr_info("pvdma_hc: FAIL: no edu (1234:11e8)\n");
		goto out;
	}
	rid = pci_dev_id(edu);
	ret = pci_enable_device(pvdma);
	if (ret) {
		pr_info("pvdma_hc: FAIL: pci_enable_device(pvdma): %d\n", ret);
		goto out;
	}
	bar0 = pci_iomap(pvdma, 0, PVDMA_BAR0_SIZE);
	if (!bar0) {
		pr_info("pvdma_hc: FAIL: pci_iomap BAR0\n");
		ret = -ENOMEM;
		goto out_disable;
	}
	features = ioread32(bar0 + PVDMA_REG_FEATURES) |
		   (u64)ioread32(bar0 + PVDMA_REG_FEATURES + 4) << 32;
	c.nr = ioread32(bar0 + PVDMA_REG_HYPERCALL_NR);
	pr_info("pvdma_hc: pvdma %s, edu %s (requester 0x%04x), MAGIC 0x%08x FEATURES 0x%llx HYPERCALL_NR 0x%x\n",
		pci_name(pvdma), pci_name(edu), rid,
		ioread32(bar0 + PVDMA_REG_MAGIC), features, c.nr);
	if (!(features & PVDMA_FEATURE_HYPERCALL)) {
		pr_info("pvdma_hc: FAIL: hypercall not offered (FEATURES.HYPERCALL clear)\n");
		ret = -ENODEV;
		goto out_unmap;
	}

	if (!strcmp(insn, "vmmcall"))
		c.amd = true;
	else if (!strcmp(insn, "vmcall"))
		c.amd = false;
	else
		c.amd = boot_cpu_data.x86_vendor == X86_VENDOR_AMD ||
			boot_cpu_data.x86_vendor == X86_VENDOR_HYGON;
	pr_info("pvdma_hc: CPU vendor %s (x86_vendor %u), using %s (insn=%s)\n",
		boot_cpu_data.x86_vendor_id, boot_cpu_data.x86_vendor,
		c.amd ? "VMMCALL" : "VMCALL", insn);

	ret = -ENOMEM;
	c.req = kmalloc(PVDMA_REQ_HEADER_SIZE + PVDMA_SEG_SIZE, GFP_KERNEL);
	page = get_zeroed_page(GFP_KERNEL);
	if (!c.req || !page) {
		pr_info("pvdma_hc: FAIL: out of memory\n");
		goto out_free;
	}
	c.req_gpa = virt_to_phys(c.req);
	if (c.req_gpa & 7) {
		pr_info("pvdma_hc: FAIL: request block at %pa is not 8-byte aligned\n",
			&c.req_gpa);
		ret = -EINVAL;
		goto out_free;
	}
	pr_info("pvdma_hc: request block gpa 0x%llx, data page gpa 0x%llx\n",
		(u64)c.req_gpa, (u64)virt_to_phys((void *)page));

	/* The other vendor's instruction too: TCG takes both. */
	c.amd = !c.amd;
	request(&c, c.amd ? "QUERY edu by VMMCALL (other vendor's insn)" :
		"QUERY edu by VMCALL (other vendor's insn)",
		PVDMA_OP_QUERY, 0, rid, 0, NULL, PVDMA_S_OK);
	c.amd = !c.amd;

	st = request(&c, "QUERY edu", PVDMA_OP_QUERY, 0, rid, 0, NULL, PVDMA_S_OK);
	if (st == PVDMA_S_OK && (c.req->result & PVDMA_QUERY_ATTACHED)) {
		pr_info("pvdma_hc: FAIL: edu already attached\n");
		c.failed++;
	}
	request(&c, "ATTACH edu", PVDMA_OP_ATTACH, 0, rid, 0, NULL, PVDMA_S_OK);
	seg.gpa = virt_to_phys((void *)page);
	seg.len = PAGE_SIZE;
	st = request(&c, "MAP data page READ|WRITE FIXED", PVDMA_OP_MAP,
		     PVDMA_FLAG_READ | PVDMA_FLAG_WRITE | PVDMA_FLAG_FIXED,
		     rid, iova, &seg, PVDMA_S_OK);
	if (st == PVDMA_S_OK && (c.req->iova != iova || c.req->length != PAGE_SIZE)) {
		pr_info("pvdma_hc: FAIL: MAP wrote back iova 0x%llx length 0x%llx\n",
			c.req->iova, c.req->length);
		c.failed++;
	}
	st = request(&c, "UNMAP", PVDMA_OP_UNMAP, 0, rid, iova, NULL, PVDMA_S_OK);
	if (st == PVDMA_S_OK && c.req->result != PAGE_SIZE) {
		pr_info("pvdma_hc: FAIL: UNMAP freed %llu bytes\n", c.req->result);
		c.failed++;
	}
	request(&c, "DETACH edu", PVDMA_OP_DETACH, 0, rid, 0, NULL, PVDMA_S_OK);
	request(&c, "QUERY a requester with no device", PVDMA_OP_QUERY, 0, nodev_rid,
		0, NULL, PVDMA_S_NODEV);

	if (c.failed)
		pr_info("pvdma_hc: FAIL: %d step(s) failed\n", c.failed);
	else
		pr_info("pvdma_hc: PASS (%s)\n", c.amd ? "VMMCALL" : "VMCALL");
	ret = c.failed ? -EIO : 0;
out_free:
	free_page(page);
	kfree(c.req);
out_unmap:
	pci_iounmap(pvdma, bar0);
out_disable:
	pci_disable_device(pvdma);
out:
	pci_dev_put(edu);
	pci_dev_put(pvdma);
	return ret;
}
module_init(pvdma_hc_init);

/* Nothing is held once init returns; an exit function makes it unloadable. */
static void __exit pvdma_hc_exit(void)
{
}
module_exit(pvdma_hc_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("pvdma hypercall transport demo (guest-demo.sh)");
