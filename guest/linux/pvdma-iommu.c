// SPDX-License-Identifier: GPL-2.0
/*
 * pvdma-iommu: the pvdma paravirtual IOMMU as a Linux IOMMU driver.
 *
 * pvdma (PCI 1b36:0015) translates the DMA of every other function on its
 * PCI root bus through tables the guest fills with MAP and UNMAP requests.
 * This driver registers it with the IOMMU core, so dma-iommu provides the
 * DMA API, IOVA allocation, scatter-gather merging and strict or lazy
 * (flush-queue) invalidation; the driver only turns the core's domain
 * operations into pvdma requests:
 *
 *   map_pages        a FIXED MAP of the pages (on 6.12 gathered per
 *                    iotlb_sync_map into one multi-segment MAP)
 *   unmap_pages      strict: gathered, one UNMAP of the range in iotlb_sync
 *                    lazy: queued per domain, sent by flush_iotlb_all as
 *                    UNMAP_LIST requests (or UNMAPs without that feature)
 *   attach_dev       paging, blocked: ATTACH, or UNMAP of everything when
 *                    attached already, then MAPs of the domain's mappings;
 *                    identity: DETACH (the only way out of translation)
 *   .shutdown        DETACH of every endpoint, for a kexec'd kernel
 *
 * A shadow interval tree per domain answers iova_to_phys, which dma-iommu
 * calls on every unmap. See docs/guest-driver.md for use and limits.
 *
 * Requests are synchronous: one is complete when the doorbell write or
 * the hypercall returns. They are built in a per-CPU block with the
 * domain's spinlock held and interrupts off, so any context the DMA API
 * allows (including the flush-queue timer) may issue them.
 *
 * Queued mode (FEATURES.QUEUE, parameter queued=1, the default): MAP and
 * whole-mapping UNMAP are written as entries into per-CPU rings in guest
 * memory that the host applies before any request, before it refuses an
 * access, and at SYNC (ABI section 3.2); map_pages and unmap_pages then
 * make no exit. SYNC is issued where an entry must have taken effect:
 * iotlb_sync (strict), flush_iotlb_all (the lazy flush queue, before the
 * IOVAs are freed), iotlb_sync_map (or map_pages on 6.1) for a domain
 * with an assigned host device, and a full ring. Everything else (partial
 * unmaps, domain switches, replays, DETACH) stays synchronous.
 */
#define pr_fmt(fmt) "pvdma-iommu: " fmt

#include <linux/module.h>
#include <linux/pci.h>
#include <linux/iommu.h>
#include <linux/interval_tree.h>
#include <linux/dma-map-ops.h>
#include <linux/slab.h>
#include <linux/percpu.h>
#include <linux/io.h>
#include <linux/workqueue.h>
#include <asm/kvm_para.h>

#include "pvdma_abi.h"

/*
 * The IOMMU driver APIs this module supports; Kbuild chooses from the
 * kernel's version (PVDMA_CORE_612 is 0 for 6.1.y, 1 for 6.12.y and 7.2+;
 * PVDMA_CORE_72 is 1 for 7.2+).
 * 6.1: domain_alloc(type) for every type, detach_dev, iommu_setup_dma_ops()
 *      from probe_finalize, iotlb_sync_map returns void (so MAP is issued
 *      synchronously from map_pages), no IOMMU_CAP_DEFERRED_FLUSH.
 * 6.12: domain_alloc_paging + static identity/blocked domains, the core
 *      sets up the DMA ops, iotlb_sync_map returns int and a failure is
 *      unwound by the core (so one map_sg can be one MAP), lazy mode needs
 *      IOMMU_CAP_DEFERRED_FLUSH.
 * 7.2: as 6.12, but attach_dev is also given the domain being left, and
 *      page sizes are only the domains' (iommu_ops has no pgsize_bitmap).
 */
#if !defined(PVDMA_CORE_612) || !defined(PVDMA_CORE_72)
#error "build pvdma-iommu through its Kbuild file"
#endif

#define PVDMA_MSI_BASE		0xfee00000UL
#define PVDMA_MSI_SIZE		0x00100000UL
/* A request block of one page holds this many segments. */
#define PVDMA_BLOCK_SEGS	((PAGE_SIZE - PVDMA_REQ_HEADER_SIZE) / PVDMA_SEG_SIZE)

static char *exclude;
module_param(exclude, charp, 0444);
MODULE_PARM_DESC(exclude,
		 "comma-separated PCI functions (bb:dd.f) to leave alone; they keep bypassing or being blocked as the host decides");

static char *transport = "auto";
module_param(transport, charp, 0444);
MODULE_PARM_DESC(transport,
		 "auto (hypercall when FEATURES.HYPERCALL, else doorbell), doorbell or hypercall");

static bool batch_map = true;
module_param(batch_map, bool, 0444);
MODULE_PARM_DESC(batch_map,
		 "6.12+: send the pages of one iommu_map/map_sg as one MAP from iotlb_sync_map (ignored on 6.1, where a deferred MAP could fail unseen)");

static bool queued = true;
module_param(queued, bool, 0444);
MODULE_PARM_DESC(queued,
		 "queue MAP and UNMAP in rings the host applies (when it offers FEATURES.QUEUE); 0: every request synchronous");

struct pvdma_iommu {
	struct iommu_device iommu;
	struct pci_dev *pdev;
	void __iomem *regs;
	u64 features;
	u32 iova_bits;
	u32 max_segs;		/* segments per request: min(MAX_SEGS, block) */
	u32 hc_nr;
	bool use_hypercall;
};

/* One pvdma per guest: the IOMMU core of 6.1 allows one driver per bus. */
static struct pvdma_iommu *pvdma;
static DEFINE_PER_CPU(struct pvdma_req *, pvdma_block);
/*
 * Queued mode. pvdma_q_nr queues, CPU c writing into queue c % pvdma_q_nr;
 * their control blocks share one page. Set up at probe, torn down at
 * .remove and .shutdown, or when the host stops one (a broken queue).
 */
#define PVDMA_RING_BYTES	SZ_64K
#define PVDMA_RING_ENTRIES	(PVDMA_RING_BYTES / PVDMA_QUEUE_ENTRY_SIZE)
#define PVDMA_MAX_QUEUES	(PAGE_SIZE / PVDMA_QUEUE_CTRL_SIZE)

struct pvdma_queue {
	spinlock_t lock;		/* everything below and the ring */
	struct pvdma_queue_ctrl *ctrl;
	struct pvdma_queue_entry *ring;
	u32 head;			/* entries published */
	u32 tail;			/* entries taken, as the host last said */
	bool dead;			/* torn down: never written again */
};

static struct pvdma_queue *pvdma_q;
static unsigned int pvdma_q_nr;
static struct pvdma_queue_ctrl *pvdma_q_ctrl;
/* Queues were set up once: SYNC points must look at the epoch below. */
static bool pvdma_q_used;
/* The queues take MAP and UNMAP entries (cleared for good when torn down). */
static bool pvdma_q_on;
/* The host stopped a queue (or answered nonsense): tear them all down. */
static bool pvdma_q_broken;
/*
 * Bumped (under pvdma_sync_lock) whenever a SYNC reports failed entries or
 * a queue breaks: a domain that queued entries since it last saw the epoch
 * may hold host state that differs from its shadow, and is rebuilt.
 */
static atomic_long_t pvdma_fail_epoch;
/* SYNCs made because a ring was full (for the tests). */
static atomic_long_t pvdma_full_syncs;
static DEFINE_SPINLOCK(pvdma_sync_lock);
/* Every paging domain, for the rebuild work. */
static LIST_HEAD(pvdma_domains);
static DEFINE_MUTEX(pvdma_domains_lock);
static void pvdma_q_work_fn(struct work_struct *work);
static DECLARE_WORK(pvdma_q_work, pvdma_q_work_fn);

/* Serialises domain switches with .shutdown. */
static DEFINE_MUTEX(pvdma_switch_lock);
/*
 * Set by .shutdown (under pvdma_switch_lock), which DETACHed every
 * endpoint for the next kernel: no request but DETACH is sent afterwards.
 */
static bool pvdma_down;

struct pvdma_domain;

/* One PCI function behind pvdma (an IOMMU core "device"). */
struct pvdma_endpoint {
	struct device *dev;
	u32 rid;		/* requester ID: bus << 8 | devfn */
	bool attached;		/* ATTACHed on the host */
	bool passthrough;	/* QUERY: its DMA does not go through the host */
	struct pvdma_domain *domain;
	struct list_head link;	/* in domain->endpoints, under domain->lock */
};

/* A mapping as the guest made it: the shadow behind iova_to_phys. */
struct pvdma_mapping {
	struct interval_tree_node it;	/* [iova, iova + size - 1] */
	phys_addr_t paddr;
	u16 flags;			/* PVDMA_FLAG_READ / _WRITE */
	bool sent;			/* MAP issued to the attached endpoints */
	/*
	 * An endpoint may lack it on the host (a MAP skipped by a test hook,
	 * or refused in a rebuild): UNMAP it synchronously, where NOENT is
	 * no error, not through a queue.
	 */
	bool sync_unmap;
	/*
	 * The queue its MAP entries went into, where its UNMAP entries go
	 * too: entries of different queues have no order until a SYNC, and
	 * the UNMAP is often made on another CPU than the MAP.
	 */
	u8 queue;
};

struct pvdma_domain {
	struct iommu_domain domain;
	spinlock_t lock;		/* everything below; requests too */
	struct rb_root_cached mappings;
	struct list_head endpoints;
	struct list_head all;		/* in pvdma_domains */
	unsigned int nr_passthrough;	/* endpoints with QUERY's PASSTHROUGH */
	bool queued;			/* entries queued since the last check */
	unsigned long seen_epoch;	/* pvdma_fail_epoch before the first */
	unsigned int nr_pending;	/* lazy: UNMAPs not yet sent */
	struct pvdma_range pending[PVDMA_BLOCK_SEGS];
};

static struct pvdma_domain *to_pvdma_domain(struct iommu_domain *d)
{
	return container_of(d, struct pvdma_domain, domain);
}

/* ---- requests ---------------------------------------------------------- */

static int pvdma_errno(u32 status)
{
	switch (status) {
	case PVDMA_S_OK:
		return 0;
	case PVDMA_S_QUOTA:
		return -ENOMEM;
	case PVDMA_S_NOSPC:
		return -ENOSPC;
	case PVDMA_S_EXIST:
		return -EEXIST;
	case PVDMA_S_NOENT:
		return -ENOENT;
	case PVDMA_S_NODEV:
		return -ENODEV;
	case PVDMA_S_FAULT:
		return -EFAULT;
	case PVDMA_S_TOOBIG:
		return -E2BIG;
	case PVDMA_S_PERM:
		return -EPERM;
	case PVDMA_S_STATE:
		return -EBUSY;
	case PVDMA_S_RANGE:
		return -ERANGE;
	default:
		return -EIO;
	}
}

/* This CPU's request block, header cleared. Interrupts must be off. */
static struct pvdma_req *pvdma_req_begin(u16 op, u16 flags, u32 rid)
{
	struct pvdma_req *r = this_cpu_read(pvdma_block);

	lockdep_assert_irqs_disabled();
	memset(r, 0, PVDMA_REQ_HEADER_SIZE);
	r->op = op;
	r->flags = flags;
	r->requester = rid;
	return r;
}

/* Issues the block; returns the pvdma status. Interrupts must be off. */
static u32 pvdma_req_issue(struct pvdma_req *r)
{
	phys_addr_t gpa = virt_to_phys(r);

	r->status = PVDMA_S_INTERNAL;
	if (pvdma->use_hypercall)
		return (u32)kvm_hypercall1(pvdma->hc_nr, gpa);
	/* The host has processed the request when this write completes. */
	writeq(gpa, pvdma->regs + PVDMA_REG_DOORBELL);
	return READ_ONCE(r->status);
}

/* A request without segments (QUERY, ATTACH, DETACH, UNMAP). */
static u32 pvdma_simple(u16 op, u32 rid, u64 iova, u64 length, u64 *result)
{
	unsigned long irqflags;
	struct pvdma_req *r;
	u32 st;

	local_irq_save(irqflags);
	r = pvdma_req_begin(op, 0, rid);
	r->iova = iova;
	r->length = length;
	st = pvdma_req_issue(r);
	if (result)
		*result = READ_ONCE(r->result);
	local_irq_restore(irqflags);
	return st;
}

static const char *pvdma_op_name(u16 op)
{
	static const char *const names[] = {
		"?", "QUERY", "ATTACH", "DETACH", "MAP", "UNMAP", "UNMAP_LIST",
		"QUEUE", "SYNC",
	};

	return op < ARRAY_SIZE(names) ? names[op] : "?";
}

static void pvdma_report(struct pvdma_endpoint *ep, u16 op, u64 iova, u32 st)
{
	dev_err_ratelimited(ep->dev, "%s at iova 0x%llx: status %u (%d)\n",
			    pvdma_op_name(op), iova, st, pvdma_errno(st));
}

/* ---- queued requests --------------------------------------------------- */

/*
 * The queues are no longer trusted (the host stopped one, or its tail makes
 * no sense): nothing more is written into them, requests go synchronous,
 * the work tears them down and rebuilds the domains that queued entries
 * (those in a stopped queue are lost).
 */
static void pvdma_q_break(const char *why)
{
	if (!READ_ONCE(pvdma_q_broken))
		dev_err(&pvdma->pdev->dev, "request queues: %s; tearing them down, requests are synchronous from now on\n",
			why);
	WRITE_ONCE(pvdma_q_broken, true);
	WRITE_ONCE(pvdma_q_on, false);
	atomic_long_inc(&pvdma_fail_epoch);
	schedule_work(&pvdma_q_work);
}

/*
 * SYNC (op 8) through endpoint @rid: every entry published in any queue
 * has been applied when it returns. Failed entries (the host gives their
 * number and the status of the first) are logged and bump the failure
 * epoch, which makes the domains that queued entries rebuild their
 * endpoints from the shadow. Returns the epoch after this SYNC.
 */
static unsigned long pvdma_sync(u32 rid)
{
	unsigned long irqflags, epoch;
	u64 failed = 0;
	u32 st;

	spin_lock_irqsave(&pvdma_sync_lock, irqflags);
	st = pvdma_simple(PVDMA_OP_SYNC, rid, 0, 0, &failed);
	if (st == PVDMA_S_STATE) {
		dev_err(&pvdma->pdev->dev, "SYNC: status %u (%d): the host stopped a request queue; %llu queued requests failed besides\n",
			st, pvdma_errno(st), failed);
		pvdma_q_break("one was stopped by the host");
	} else if (failed) {
		dev_err_ratelimited(&pvdma->pdev->dev, "SYNC: %llu queued requests failed, the first with status %u (%d); rebuilding the endpoints that queued them\n",
				    failed, st, pvdma_errno(st));
	} else if (st != PVDMA_S_OK) {
		/* Failures may have gone unreported: trust the queues no more. */
		dev_err(&pvdma->pdev->dev, "SYNC through requester 0x%04x: status %u (%d)\n",
			rid, st, pvdma_errno(st));
		pvdma_q_break("SYNC failed");
	}
	if (st != PVDMA_S_OK || failed) {
		atomic_long_inc(&pvdma_fail_epoch);
		schedule_work(&pvdma_q_work);
	}
	epoch = atomic_long_read(&pvdma_fail_epoch);
	spin_unlock_irqrestore(&pvdma_sync_lock, irqflags);
	return epoch;
}

/* The queue this CPU writes its MAP entries into. */
static u8 pvdma_q_mine(void)
{
	return pvdma_q_nr ? smp_processor_id() % pvdma_q_nr : 0;
}

/*
 * Writes one entry into queue @idx and publishes it. A full ring is synced
 * (through @rid) and its tail read again. Returns false when the queues
 * are off: the caller sends the request synchronously instead. Interrupts
 * off (a domain's lock is held).
 */
static bool pvdma_q_push(u8 idx, u16 op, u16 flags, u32 rid, u64 iova,
			 u64 gpa, u64 len)
{
	struct pvdma_queue_entry *e;
	struct pvdma_queue *q;
	int syncs = 0;
	u32 tail;

	lockdep_assert_irqs_disabled();
	if (!READ_ONCE(pvdma_q_on) || idx >= pvdma_q_nr)
		return false;
	q = &pvdma_q[idx];
	spin_lock(&q->lock);
	while (!q->dead && READ_ONCE(pvdma_q_on) &&
	       q->head - q->tail >= PVDMA_RING_ENTRIES) {
		/* Orders the host's reads of the slots before our rewrites. */
		tail = smp_load_acquire(&q->ctrl->tail);
		if (q->head - tail > PVDMA_RING_ENTRIES ||
		    READ_ONCE(q->ctrl->stopped)) {
			pvdma_q_break("one is stopped, or its tail is not behind its head");
			break;
		}
		q->tail = tail;
		if (q->head - q->tail < PVDMA_RING_ENTRIES)
			break;
		/* Other CPUs may fill it again meanwhile; not forever. */
		if (syncs++ == 3) {
			pvdma_q_break("one stays full after three SYNCs");
			break;
		}
		spin_unlock(&q->lock);
		atomic_long_inc(&pvdma_full_syncs);
		pvdma_sync(rid);
		spin_lock(&q->lock);
	}
	if (q->dead || !READ_ONCE(pvdma_q_on)) {
		spin_unlock(&q->lock);
		return false;
	}
	e = &q->ring[q->head % PVDMA_RING_ENTRIES];
	e->op = op;
	e->flags = flags;
	e->requester = rid;
	e->iova = iova;
	e->gpa = gpa;
	e->length = len;
	q->head++;
	/* The entry's stores before head's. */
	smp_store_release(&q->ctrl->head, q->head);
	spin_unlock(&q->lock);
	return true;
}

/*
 * pvdma_q_push() of an entry of @dom's. The failure epoch is read before
 * the entry is published: a failure of it can only be reported after.
 */
static bool pvdma_q_push_dom(struct pvdma_domain *dom, u8 idx, u16 op,
			     u16 flags, u32 rid, u64 iova, u64 gpa, u64 len)
{
	unsigned long epoch = atomic_long_read(&pvdma_fail_epoch);

	if (!pvdma_q_push(idx, op, flags, rid, iova, gpa, len))
		return false;
	if (!dom->queued) {
		dom->queued = true;
		dom->seen_epoch = epoch;
	}
	return true;
}

/*
 * Tears every live queue down through endpoint @rid (the host applies
 * what they hold first, except in a stopped one). A queue whose tear-down
 * the host refused keeps its memory: the host may still read it.
 */
static void pvdma_q_teardown(u32 rid)
{
	unsigned long irqflags;
	bool all = true;
	unsigned int i;
	u32 st;

	WRITE_ONCE(pvdma_q_on, false);
	for (i = 0; i < pvdma_q_nr; i++) {
		struct pvdma_queue *q = &pvdma_q[i];

		spin_lock_irqsave(&q->lock, irqflags);
		if (!q->dead) {
			q->dead = true;
			st = pvdma_simple(PVDMA_OP_QUEUE, rid, i, 0, NULL);
			if (st == PVDMA_S_OK || st == PVDMA_S_STATE) {
				free_pages((unsigned long)q->ring,
					   get_order(PVDMA_RING_BYTES));
				q->ring = NULL;
			} else {
				dev_warn(&pvdma->pdev->dev, "tearing request queue %u down: status %u; its memory is kept\n",
					 i, st);
			}
		}
		all &= !q->ring;
		spin_unlock_irqrestore(&q->lock, irqflags);
	}
	if (all && pvdma_q_ctrl) {
		free_page((unsigned long)pvdma_q_ctrl);
		pvdma_q_ctrl = NULL;
	}
}

/*
 * Some PCI function pvdma knows as an endpoint, to route QUEUE through
 * (QUEUE and SYNC need a requester behind the pvdma function).
 */
static bool pvdma_any_rid(u32 *rid)
{
	struct pci_dev *pdev = NULL;
	u64 result;

	for_each_pci_dev(pdev) {
		if (pdev == pvdma->pdev)
			continue;
		if (pvdma_simple(PVDMA_OP_QUERY, pci_dev_id(pdev), 0, 0,
				 &result) == PVDMA_S_OK) {
			*rid = pci_dev_id(pdev);
			pci_dev_put(pdev);
			return true;
		}
	}
	return false;
}

/* .remove, .shutdown and a broken queue: the queues go, for good. */
static void pvdma_q_stop(void)
{
	static DEFINE_MUTEX(stop_lock);
	u32 rid;

	if (!READ_ONCE(pvdma_q_used))
		return;
	mutex_lock(&stop_lock);
	if (pvdma_any_rid(&rid))
		pvdma_q_teardown(rid);
	else
		WRITE_ONCE(pvdma_q_on, false);
	mutex_unlock(&stop_lock);
}

/* ---- endpoints and attach ---------------------------------------------- */

static bool pvdma_excluded(struct pci_dev *pdev)
{
	const char *p = exclude;
	unsigned int bus, slot, fn;

	while (p && *p) {
		if (sscanf(p, "%x:%x.%x", &bus, &slot, &fn) == 3 &&
		    pdev->bus->number == bus &&
		    pdev->devfn == PCI_DEVFN(slot, fn))
			return true;
		p = strchr(p, ',');
		if (p)
			p++;
	}
	return false;
}

/* The endpoint's host state: DETACHed, then ATTACHed if @attach. */
static int pvdma_host_reset(struct pvdma_endpoint *ep, bool attach)
{
	u32 st;

	if (ep->attached) {
		st = pvdma_simple(PVDMA_OP_DETACH, ep->rid, 0, 0, NULL);
		if (st != PVDMA_S_OK && st != PVDMA_S_STATE) {
			pvdma_report(ep, PVDMA_OP_DETACH, 0, st);
			return pvdma_errno(st);
		}
		ep->attached = false;
	}
	if (!attach)
		return 0;
	st = pvdma_simple(PVDMA_OP_ATTACH, ep->rid, 0, 0, NULL);
	if (st != PVDMA_S_OK) {
		pvdma_report(ep, PVDMA_OP_ATTACH, 0, st);
		return pvdma_errno(st);
	}
	ep->attached = true;
	return 0;
}

/* ---- MAP --------------------------------------------------------------- */

#ifdef PVDMA_TEST_HOOKS
/*
 * Testing only (a build with PVDMA_TEST=1): one-shot MAP tweaks for one
 * PCI function (-1: none), set through test_skip_map and test_ro_map.
 */
static int skip_map_rid = -1;
static int ro_map_rid = -1;

/* Takes a one-shot test request aimed at ep: true once. */
static bool pvdma_test_once(int *rid, struct pvdma_endpoint *ep)
{
	if (READ_ONCE(*rid) != (int)ep->rid)
		return false;
	return cmpxchg(rid, (int)ep->rid, -1) == (int)ep->rid;
}

static bool pvdma_test_skip_map(struct pvdma_endpoint *ep)
{
	return pvdma_test_once(&skip_map_rid, ep);
}

static bool pvdma_test_ro_map(struct pvdma_endpoint *ep)
{
	return pvdma_test_once(&ro_map_rid, ep);
}
#else
static bool pvdma_test_skip_map(struct pvdma_endpoint *ep)
{
	return false;
}

static bool pvdma_test_ro_map(struct pvdma_endpoint *ep)
{
	return false;
}
#endif

/*
 * Sends the MAP already laid out in this CPU's block (flags, iova, segs)
 * to every endpoint of the domain; on a failure, removes it again from
 * those that took it. Domain lock held.
 */
static int pvdma_map_all(struct pvdma_domain *dom)
{
	struct pvdma_req *r = this_cpu_read(pvdma_block);
	struct pvdma_endpoint *ep, *undo;
	u64 iova = r->iova;
	u16 flags = r->flags;
	u32 st;

	if (READ_ONCE(pvdma_down))
		return -ENODEV;		/* shut down: the endpoints bypass */
	list_for_each_entry(ep, &dom->endpoints, link) {
		if (!ep->attached)
			continue;
		if (pvdma_test_skip_map(ep)) {
			dev_warn(ep->dev, "test_skip_map: not sending this MAP\n");
			continue;
		}
		r->flags = flags;
		if ((flags & PVDMA_FLAG_WRITE) &&
		    pvdma_test_ro_map(ep)) {
			dev_warn(ep->dev, "test_ro_map: sending this MAP read-only\n");
			r->flags = (flags & ~PVDMA_FLAG_WRITE) | PVDMA_FLAG_READ;
		}
		r->requester = ep->rid;
		r->iova = iova;
		st = pvdma_req_issue(r);
		if (st == PVDMA_S_OK)
			continue;
		pvdma_report(ep, PVDMA_OP_MAP, iova, st);
		list_for_each_entry(undo, &dom->endpoints, link) {
			if (undo == ep)
				break;
			if (undo->attached)
				pvdma_simple(PVDMA_OP_UNMAP, undo->rid, iova, 0,
					     NULL);
		}
		return pvdma_errno(st);
	}
	return 0;
}

static u16 pvdma_prot_flags(int prot)
{
	u16 flags = 0;

	if (prot & IOMMU_READ)
		flags |= PVDMA_FLAG_READ;
	if (prot & IOMMU_WRITE)
		flags |= PVDMA_FLAG_WRITE;
	return flags;
}

/* One MAP of one mapping; domain lock held. */
static int pvdma_send_one(struct pvdma_domain *dom, struct pvdma_mapping *m)
{
	struct pvdma_req *r;

	r = pvdma_req_begin(PVDMA_OP_MAP, m->flags | PVDMA_FLAG_FIXED, 0);
	r->iova = m->it.start;
	r->nr_segs = 1;
	r->segs[0].gpa = m->paddr;
	r->segs[0].len = m->it.last - m->it.start + 1;
	return pvdma_map_all(dom);
}

/*
 * Queued mode: a MAP entry of @m for every attached endpoint (synchronous
 * MAPs once the queues are gone). An error is a synchronous MAP's: the
 * endpoints that took the mapping lose it again. Domain lock held.
 */
static int pvdma_q_map_all(struct pvdma_domain *dom, struct pvdma_mapping *m)
{
	u64 iova = m->it.start, len = m->it.last - m->it.start + 1;
	struct pvdma_endpoint *ep, *undo;
	struct pvdma_req *r;
	u16 flags;
	u32 st;

	if (READ_ONCE(pvdma_down))
		return -ENODEV;		/* shut down: the endpoints bypass */
	m->queue = pvdma_q_mine();
	list_for_each_entry(ep, &dom->endpoints, link) {
		if (!ep->attached)
			continue;
		if (pvdma_test_skip_map(ep)) {
			dev_warn(ep->dev, "test_skip_map: not sending this MAP\n");
			m->sync_unmap = true;
			continue;
		}
		flags = m->flags;
		if ((flags & PVDMA_FLAG_WRITE) && pvdma_test_ro_map(ep)) {
			dev_warn(ep->dev, "test_ro_map: sending this MAP read-only\n");
			flags = (flags & ~PVDMA_FLAG_WRITE) | PVDMA_FLAG_READ;
		}
		if (pvdma_q_push_dom(dom, m->queue, PVDMA_OP_MAP,
				     flags | PVDMA_FLAG_FIXED, ep->rid, iova,
				     m->paddr, len))
			continue;
		r = pvdma_req_begin(PVDMA_OP_MAP, flags | PVDMA_FLAG_FIXED,
				    ep->rid);
		r->iova = iova;
		r->nr_segs = 1;
		r->segs[0].gpa = m->paddr;
		r->segs[0].len = len;
		st = pvdma_req_issue(r);
		if (st == PVDMA_S_OK)
			continue;
		pvdma_report(ep, PVDMA_OP_MAP, iova, st);
		/* Applies their queued MAP first (rule 1), then removes it. */
		list_for_each_entry(undo, &dom->endpoints, link) {
			if (undo == ep)
				break;
			if (undo->attached)
				pvdma_simple(PVDMA_OP_UNMAP, undo->rid, iova, 0,
					     NULL);
		}
		return pvdma_errno(st);
	}
	return 0;
}

static void pvdma_sync_dom(struct pvdma_domain *dom);

static bool pvdma_batching(void)
{
	return PVDMA_CORE_612 && batch_map;
}

static int pvdma_map_pages(struct iommu_domain *domain, unsigned long iova,
			   phys_addr_t paddr, size_t pgsize, size_t pgcount,
			   int prot, gfp_t gfp, size_t *mapped)
{
	struct pvdma_domain *dom = to_pvdma_domain(domain);
	size_t size = pgsize * pgcount;
	struct pvdma_mapping *m;
	unsigned long irqflags;
	int ret = 0;

	if (!(prot & (IOMMU_READ | IOMMU_WRITE)))
		return -EINVAL;
	if (iova + size - 1 < iova || iova + size - 1 > domain->geometry.aperture_end)
		return -EINVAL;
	m = kzalloc(sizeof(*m), gfp);
	if (!m)
		return -ENOMEM;
	m->it.start = iova;
	m->it.last = iova + size - 1;
	m->paddr = paddr;
	m->flags = pvdma_prot_flags(prot);

	spin_lock_irqsave(&dom->lock, irqflags);
	if (interval_tree_iter_first(&dom->mappings, m->it.start, m->it.last)) {
		ret = -EEXIST;
	} else if (READ_ONCE(pvdma_q_on)) {
		ret = pvdma_q_map_all(dom, m);
		m->sent = !ret;
	} else if (!pvdma_batching()) {
		ret = pvdma_send_one(dom, m);
		m->sent = !ret;
	}
	if (!ret)
		interval_tree_insert(&m->it, &dom->mappings);
#if !PVDMA_CORE_612
	/*
	 * An assigned host device's DMA never reaches the host's translation:
	 * its MAP must be applied before the IOVA is handed out. (6.12 and
	 * later sync once per iommu_map in iotlb_sync_map.) The shadow holds
	 * the mapping first, should the SYNC rebuild the domain.
	 */
	if (!ret && dom->nr_passthrough)
		pvdma_sync_dom(dom);
#endif
	spin_unlock_irqrestore(&dom->lock, irqflags);
	if (ret) {
		kfree(m);
		return ret;
	}
	*mapped = size;
	return 0;
}

#if PVDMA_CORE_612
/*
 * The mappings of one iommu_map()/iommu_map_sg() call, not yet sent, go to
 * the host here: IOVA-contiguous runs with equal permissions become one
 * MAP each, of up to max_segs segments (physically adjacent pages share a
 * segment). On a failure the core unmaps [iova, iova + size) again, which
 * removes what was sent through the usual unmap path.
 */
static int pvdma_iotlb_sync_map(struct iommu_domain *domain, unsigned long iova,
				size_t size)
{
	struct pvdma_domain *dom = to_pvdma_domain(domain);
	struct interval_tree_node *it;
	struct pvdma_req *r = NULL;
	unsigned long irqflags;
	u64 next_iova = 0;
	u16 flags = 0;
	int ret = 0;

	if (!size)
		return 0;
	spin_lock_irqsave(&dom->lock, irqflags);
	/* An assigned host device needs its MAPs applied now (rule 3). */
	if (dom->nr_passthrough)
		pvdma_sync_dom(dom);
	/* Queued mode sent (queued) every mapping in map_pages. */
	if (!pvdma_batching() || READ_ONCE(pvdma_q_on)) {
		spin_unlock_irqrestore(&dom->lock, irqflags);
		return 0;
	}
	for (it = interval_tree_iter_first(&dom->mappings, iova, iova + size - 1);
	     it; it = interval_tree_iter_next(it, iova, iova + size - 1)) {
		struct pvdma_mapping *m = container_of(it, struct pvdma_mapping,
						       it);
		u64 len = it->last - it->start + 1;
		struct pvdma_seg *last;

		if (m->sent)
			continue;
		if (r && (it->start != next_iova || m->flags != flags)) {
			ret = pvdma_map_all(dom);	/* the run ends here */
			r = NULL;
			if (ret)
				break;
		}
		if (r) {
			last = &r->segs[r->nr_segs - 1];
			if (last->gpa + last->len == m->paddr) {
				last->len += len;	/* physically adjacent */
				goto added;
			}
			if (r->nr_segs == pvdma->max_segs) {
				ret = pvdma_map_all(dom);
				r = NULL;
				if (ret)
					break;
			}
		}
		if (!r) {
			flags = m->flags;
			r = pvdma_req_begin(PVDMA_OP_MAP, flags | PVDMA_FLAG_FIXED,
					    0);
			r->iova = it->start;
		}
		r->segs[r->nr_segs].gpa = m->paddr;
		r->segs[r->nr_segs].len = len;
		r->nr_segs++;
added:
		next_iova = it->last + 1;
		m->sent = true;
	}
	if (r && !ret)
		ret = pvdma_map_all(dom);
	spin_unlock_irqrestore(&dom->lock, irqflags);
	return ret;
}
#endif

/* ---- UNMAP ------------------------------------------------------------- */

static void pvdma_resync(struct pvdma_domain *dom, struct pvdma_endpoint *ep);

/* UNMAP of [iova, iova + len) on every endpoint; domain lock held. */
static void pvdma_unmap_range_all(struct pvdma_domain *dom, u64 iova, u64 len)
{
	struct pvdma_endpoint *ep;
	u32 st;

	if (READ_ONCE(pvdma_down))
		return;			/* DETACH removed everything */
	list_for_each_entry(ep, &dom->endpoints, link) {
		if (!ep->attached)
			continue;
		st = pvdma_simple(PVDMA_OP_UNMAP, ep->rid, iova, len, NULL);
		/* NOENT: nothing was mapped there for this endpoint. */
		if (st == PVDMA_S_OK || st == PVDMA_S_NOENT)
			continue;
		pvdma_report(ep, PVDMA_OP_UNMAP, iova, st);
		pvdma_resync(dom, ep);
	}
}

/*
 * Queued mode: an UNMAP entry of [iova, iova + len), one whole mapping of
 * the shadow, for every attached endpoint, into queue @idx, its MAP's (a
 * synchronous UNMAP once the queues are gone). Domain lock held.
 */
static void pvdma_q_unmap_all(struct pvdma_domain *dom, u8 idx, u64 iova,
			      u64 len)
{
	struct pvdma_endpoint *ep;
	u32 st;

	if (READ_ONCE(pvdma_down))
		return;			/* DETACH removed everything */
	list_for_each_entry(ep, &dom->endpoints, link) {
		if (!ep->attached)
			continue;
		if (pvdma_q_push_dom(dom, idx, PVDMA_OP_UNMAP, 0, ep->rid, iova,
				     0, len))
			continue;
		st = pvdma_simple(PVDMA_OP_UNMAP, ep->rid, iova, len, NULL);
		if (st == PVDMA_S_OK || st == PVDMA_S_NOENT)
			continue;
		pvdma_report(ep, PVDMA_OP_UNMAP, iova, st);
		pvdma_resync(dom, ep);
	}
}

/* Sends the lazily queued UNMAPs; domain lock held. */
static void pvdma_flush_pending(struct pvdma_domain *dom)
{
	struct pvdma_endpoint *ep;
	unsigned int i;
	u32 st;

	if (!dom->nr_pending)
		return;
	if (READ_ONCE(pvdma_down))
		goto done;		/* DETACH removed everything */
	list_for_each_entry(ep, &dom->endpoints, link) {
		bool refused = false;
		struct pvdma_req *r;

		if (!ep->attached)
			continue;
		if (pvdma->features & PVDMA_FEATURE_UNMAP_LIST) {
			r = pvdma_req_begin(PVDMA_OP_UNMAP_LIST, 0, ep->rid);
			r->nr_segs = dom->nr_pending;
			memcpy(r->segs, dom->pending,
			       dom->nr_pending * sizeof(dom->pending[0]));
			st = pvdma_req_issue(r);
			if (st == PVDMA_S_OK)
				continue;
			/*
			 * The list is atomic: one range the host does not
			 * hold (a MAP it refused) fails all of it. Fall back
			 * to one UNMAP per range.
			 */
			dev_dbg(ep->dev, "UNMAP_LIST: status %u, retrying per range\n",
				st);
		}
		for (i = 0; i < dom->nr_pending; i++) {
			st = pvdma_simple(PVDMA_OP_UNMAP, ep->rid,
					  dom->pending[i].iova,
					  dom->pending[i].len, NULL);
			if (st == PVDMA_S_OK || st == PVDMA_S_NOENT)
				continue;
			pvdma_report(ep, PVDMA_OP_UNMAP, dom->pending[i].iova,
				     st);
			refused = true;
		}
		if (refused)
			pvdma_resync(dom, ep);
	}
done:
	dom->nr_pending = 0;
}

/* Queues a lazy UNMAP, merging with the previous range; lock held. */
static void pvdma_queue_unmap(struct pvdma_domain *dom, u64 iova, u64 len)
{
	struct pvdma_range *prev;

	if (dom->nr_pending) {
		prev = &dom->pending[dom->nr_pending - 1];
		if (prev->iova + prev->len == iova) {
			prev->len += len;
			return;
		}
	}
	if (dom->nr_pending == pvdma->max_segs)
		pvdma_flush_pending(dom);
	dom->pending[dom->nr_pending].iova = iova;
	dom->pending[dom->nr_pending].len = len;
	dom->nr_pending++;
}

/*
 * Removes [iova, last] from the shadow. A mapping reaching past either end
 * is cut there and keeps the rest (one that reaches past both ends needs
 * @tail for the part after @last): exactly the range asked for goes, and
 * true is returned when the whole mapping went. The host's MAP of such a mapping covers the part
 * that stays, so the UNMAP of the range answers RANGE, and the endpoint is
 * brought back to the shadow (pvdma_resync).
 */
static bool pvdma_cut(struct pvdma_domain *dom, struct pvdma_mapping *m,
		      u64 iova, u64 last, struct pvdma_mapping **tail)
{
	struct interval_tree_node *it = &m->it;

	if (it->start >= iova && it->last <= last) {
		interval_tree_remove(it, &dom->mappings);
		return true;			/* whole: the caller frees it */
	}
	interval_tree_remove(it, &dom->mappings);
	if (it->start < iova && it->last > last) {
		(*tail)->it.start = last + 1;
		(*tail)->it.last = it->last;
		(*tail)->paddr = m->paddr + (last + 1 - it->start);
		(*tail)->flags = m->flags;
		(*tail)->sent = m->sent;
		(*tail)->sync_unmap = m->sync_unmap;
		(*tail)->queue = m->queue;
		interval_tree_insert(&(*tail)->it, &dom->mappings);
		*tail = NULL;
		it->last = iova - 1;
	} else if (it->start < iova) {
		it->last = iova - 1;
	} else {
		m->paddr += last + 1 - it->start;
		it->start = last + 1;
	}
	interval_tree_insert(it, &dom->mappings);
	return false;
}

static size_t pvdma_unmap_pages(struct iommu_domain *domain, unsigned long iova,
				size_t pgsize, size_t pgcount,
				struct iommu_iotlb_gather *gather)
{
	struct pvdma_domain *dom = to_pvdma_domain(domain);
	u64 last = iova + pgsize * pgcount - 1;
	struct pvdma_mapping *tail = NULL;
	struct interval_tree_node *it, *next;
	u64 sent_first = U64_MAX, sent_last = 0;
	unsigned long irqflags;
	bool found = false;
	bool q;

again:
	spin_lock_irqsave(&dom->lock, irqflags);
	q = READ_ONCE(pvdma_q_on);
	it = interval_tree_iter_first(&dom->mappings, iova, last);
	if (it && it->start < iova && it->last > last && !tail) {
		/* Unmapping the middle of a mapping (never dma-iommu's). */
		spin_unlock_irqrestore(&dom->lock, irqflags);
		tail = kzalloc(sizeof(*tail), GFP_ATOMIC);
		if (!tail)
			return 0;
		goto again;
	}
	while (it) {
		struct pvdma_mapping *m = container_of(it, struct pvdma_mapping,
						       it);
		u64 first = max_t(u64, it->start, iova);
		u64 end = min_t(u64, it->last, last);
		bool sync_unmap = m->sync_unmap;
		bool sent = m->sent;
		u8 idx = m->queue;
		bool whole;

		next = interval_tree_iter_next(it, iova, last);
		whole = pvdma_cut(dom, m, iova, last, &tail);
		if (whole)
			kfree(m);
		found = true;
		if (sent && q) {
			/*
			 * Queued mode: a whole mapping goes as an entry (SYNC
			 * in iotlb_sync or flush_iotlb_all); a part of one,
			 * synchronously, which answers RANGE and brings the
			 * endpoints back to the shadow.
			 */
			if (whole && !sync_unmap)
				pvdma_q_unmap_all(dom, idx, first,
						  end - first + 1);
			else
				pvdma_unmap_range_all(dom, first,
						      end - first + 1);
			sent_first = min_t(u64, sent_first, first);
			sent_last = max_t(u64, sent_last, end);
		} else if (sent) {
			sent_first = min_t(u64, sent_first, first);
			sent_last = max_t(u64, sent_last, end);
			if (iommu_iotlb_gather_queued(gather))
				pvdma_queue_unmap(dom, first, end - first + 1);
		}
		it = next;
	}
	spin_unlock_irqrestore(&dom->lock, irqflags);
	kfree(tail);

	if (!found)
		return 0;
	if (sent_first <= sent_last && !iommu_iotlb_gather_queued(gather)) {
		/*
		 * Strict: one UNMAP of the gathered range in iotlb_sync.
		 * Everything between two gathered mappings of one call is
		 * unmapped by that call too; a gap towards an earlier call's
		 * range may hold live mappings, so that range goes first.
		 */
		if (iommu_iotlb_gather_is_disjoint(gather, sent_first,
						   sent_last - sent_first + 1))
			iommu_iotlb_sync(domain, gather);
		iommu_iotlb_gather_add_range(gather, sent_first,
					     sent_last - sent_first + 1);
	}
	return last - iova + 1;
}

static void pvdma_iotlb_sync(struct iommu_domain *domain,
			     struct iommu_iotlb_gather *gather)
{
	struct pvdma_domain *dom = to_pvdma_domain(domain);
	unsigned long irqflags;

	if (gather->start > gather->end)
		return;
	spin_lock_irqsave(&dom->lock, irqflags);
	/*
	 * Queued mode: the range's UNMAPs are queued, SYNC applies them. The
	 * queues may have gone since (torn down, which applied them): then
	 * the UNMAP of the range finds nothing, or what was unmapped
	 * synchronously meanwhile.
	 */
	if (!READ_ONCE(pvdma_q_on))
		pvdma_unmap_range_all(dom, gather->start,
				      gather->end - gather->start + 1);
	pvdma_sync_dom(dom);
	spin_unlock_irqrestore(&dom->lock, irqflags);
	iommu_iotlb_gather_init(gather);
}

static void pvdma_flush_iotlb_all(struct iommu_domain *domain)
{
	struct pvdma_domain *dom = to_pvdma_domain(domain);
	unsigned long irqflags;

	spin_lock_irqsave(&dom->lock, irqflags);
	pvdma_flush_pending(dom);
	/* Queued UNMAPs are applied before dma-iommu frees their IOVAs. */
	pvdma_sync_dom(dom);
	spin_unlock_irqrestore(&dom->lock, irqflags);
}

static phys_addr_t pvdma_iova_to_phys(struct iommu_domain *domain,
				      dma_addr_t iova)
{
	struct pvdma_domain *dom = to_pvdma_domain(domain);
	struct interval_tree_node *it;
	unsigned long irqflags;
	phys_addr_t pa = 0;

	spin_lock_irqsave(&dom->lock, irqflags);
	it = interval_tree_iter_first(&dom->mappings, iova, iova);
	if (it)
		pa = container_of(it, struct pvdma_mapping, it)->paddr +
		     (iova - it->start);
	spin_unlock_irqrestore(&dom->lock, irqflags);
	return pa;
}

/* ---- domains ----------------------------------------------------------- */

/*
 * Removes every mapping an attached endpoint holds on the host and leaves
 * it attached: its DMA is blocked. One UNMAP over the whole IOVA space
 * cannot answer RANGE (no mapping crosses its ends), and it also takes
 * what the shadow does not know of (a MAP whose answer was lost).
 */
static int pvdma_host_block(struct pvdma_endpoint *ep)
{
	u64 len = pvdma->iova_bits >= 64 ? U64_MAX : 1ULL << pvdma->iova_bits;
	u32 st;

	st = pvdma_simple(PVDMA_OP_UNMAP, ep->rid, 0, len, NULL);
	if (st == PVDMA_S_OK || st == PVDMA_S_NOENT)
		return 0;
	pvdma_report(ep, PVDMA_OP_UNMAP, 0, st);
	return pvdma_errno(st);
}

/*
 * Takes the endpoint off its domain's list. With @block (and the endpoint
 * attached) its mappings go on the host first, under the domain's lock:
 * the domain's UNMAPs are issued under that lock to the endpoints on its
 * list, so none of them can fall between the endpoint leaving the list
 * and its mappings going, which would leave an IOVA the domain freed
 * mapped for the device. Returns the block's error (the endpoint leaves
 * the list all the same).
 */
static int pvdma_leave_domain(struct pvdma_endpoint *ep, bool block)
{
	struct pvdma_domain *old = ep->domain;
	unsigned long irqflags;
	int ret = 0;

	if (!old)
		return block && ep->attached ? pvdma_host_block(ep) : 0;
	spin_lock_irqsave(&old->lock, irqflags);
	if (block && ep->attached)
		ret = pvdma_host_block(ep);
	list_del_init(&ep->link);
	old->nr_passthrough -= ep->passthrough;
	spin_unlock_irqrestore(&old->lock, irqflags);
	ep->domain = NULL;
	return ret;
}

/*
 * The domain's mappings to one endpoint, which is not on its list yet (or
 * was just emptied). It stops at the first MAP the host refuses, unless
 * @keep_going: then each refused MAP is reported, its mapping marked for
 * a synchronous UNMAP, and the first error returned at the end.
 */
static int pvdma_replay(struct pvdma_domain *dom, struct pvdma_endpoint *ep,
			bool keep_going)
{
	struct interval_tree_node *it;
	int ret = 0;

	lockdep_assert_held(&dom->lock);
	for (it = interval_tree_iter_first(&dom->mappings, 0, U64_MAX); it;
	     it = interval_tree_iter_next(it, 0, U64_MAX)) {
		struct pvdma_mapping *m = container_of(it, struct pvdma_mapping,
						       it);
		struct pvdma_req *r;
		u32 st;

		if (!m->sent)
			continue;	/* iotlb_sync_map sends it to the list */
		r = pvdma_req_begin(PVDMA_OP_MAP, m->flags | PVDMA_FLAG_FIXED,
				    ep->rid);
		r->iova = it->start;
		r->nr_segs = 1;
		r->segs[0].gpa = m->paddr;
		r->segs[0].len = it->last - it->start + 1;
		st = pvdma_req_issue(r);
		if (st == PVDMA_S_OK)
			continue;
		pvdma_report(ep, PVDMA_OP_MAP, it->start, st);
		if (!keep_going)
			return pvdma_errno(st);
		m->sync_unmap = true;
		if (!ret)
			ret = pvdma_errno(st);
	}
	return ret;
}

/*
 * After an UNMAP the host refused with RANGE (a MAP of several shadow
 * mappings, or of one since cut by a partial unmap, crosses the range) or
 * INTERNAL, the host may still map IOVAs the shadow has freed, and that
 * dma-iommu may hand out again: the endpoint is brought back to the shadow,
 * every mapping removed and the domain's MAPped again. Its DMA is refused in
 * between; if that fails too it stays blocked (attached, nothing mapped)
 * until its next domain change. Domain lock held, endpoint on its list.
 */
static void pvdma_resync(struct pvdma_domain *dom, struct pvdma_endpoint *ep)
{
	int ret = pvdma_host_block(ep);

	if (!ret)
		ret = pvdma_replay(dom, ep, false);
	if (!ret)
		return;
	pvdma_host_block(ep);
	dev_err_ratelimited(ep->dev, "could not restore its mappings (%d): its DMA is refused until its next domain change\n",
			    ret);
}

/*
 * After queued entries failed (or were lost in a stopped queue): every
 * attached endpoint of the domain is emptied and MAPped again from the
 * shadow, synchronously. Each MAP the host refuses now is reported with
 * the device and IOVA, and its range stays unmapped (as the failed entry
 * left it); the rest works on. Domain lock held.
 */
static void pvdma_rebuild(struct pvdma_domain *dom)
{
	struct pvdma_endpoint *ep;

	list_for_each_entry(ep, &dom->endpoints, link) {
		if (ep->attached && !pvdma_host_block(ep))
			pvdma_replay(dom, ep, true);
	}
}

/*
 * The domain's entries have all been applied (a SYNC, or the queues'
 * tear-down): if any entry failed anywhere since its first one (@epoch
 * moved), its endpoints are rebuilt, so that none keeps an IOVA mapped
 * that the shadow freed, or lacks one the shadow holds.
 */
static void pvdma_dom_check(struct pvdma_domain *dom, unsigned long epoch)
{
	if (dom->queued && dom->seen_epoch != epoch &&
	    !READ_ONCE(pvdma_down))
		pvdma_rebuild(dom);
	dom->queued = false;
}

/*
 * Queued mode: SYNC through one of the domain's endpoints (with none, no
 * entry can matter to it), then the check above. Nothing when queues were
 * never set up. Domain lock held.
 */
static void pvdma_sync_dom(struct pvdma_domain *dom)
{
	struct pvdma_endpoint *ep;
	unsigned long epoch;

	lockdep_assert_held(&dom->lock);
	if (!READ_ONCE(pvdma_q_used))
		return;
	epoch = atomic_long_read(&pvdma_fail_epoch);
	if (READ_ONCE(pvdma_q_on) && !READ_ONCE(pvdma_down)) {
		list_for_each_entry(ep, &dom->endpoints, link) {
			if (ep->attached) {
				epoch = pvdma_sync(ep->rid);
				break;
			}
		}
	}
	pvdma_dom_check(dom, epoch);
}

/*
 * After a SYNC reported failures or a queue broke: the queues torn down if
 * broken, then every domain that queued entries since the failure epoch
 * moved is rebuilt, also those that issue no SYNC of their own soon.
 */
static void pvdma_q_work_fn(struct work_struct *work)
{
	struct pvdma_domain *dom;
	unsigned long irqflags, epoch;

	if (READ_ONCE(pvdma_q_broken))
		pvdma_q_stop();
	mutex_lock(&pvdma_domains_lock);
	list_for_each_entry(dom, &pvdma_domains, all) {
		spin_lock_irqsave(&dom->lock, irqflags);
		epoch = atomic_long_read(&pvdma_fail_epoch);
		/* Its requests apply what it queued since (rule 1). */
		if (dom->queued && dom->seen_epoch != epoch) {
			if (!READ_ONCE(pvdma_down))
				pvdma_rebuild(dom);
			dom->queued = false;
		}
		spin_unlock_irqrestore(&dom->lock, irqflags);
	}
	mutex_unlock(&pvdma_domains_lock);
}

/*
 * A domain switch. During it the device's DMA reaches the old domain's
 * mappings or the new one's, or is refused; it never bypasses unless the
 * new domain is the identity domain:
 *   identity  DETACH (only with FEATURES.BYPASS);
 *   blocked   ATTACH when detached, else UNMAP of every mapping;
 *   paging    the same, then the domain's mappings are MAPped.
 * On a failure the endpoint stays attached with no mappings (blocked), or
 * detached if it was (ATTACH failed), and the core re-attaches the old
 * domain.
 */
static int pvdma_attach_dev(struct iommu_domain *domain, struct device *dev)
{
	struct pvdma_endpoint *ep = dev_iommu_priv_get(dev);
	struct pvdma_domain *dom;
	unsigned long irqflags;
	int ret = 0;

	if (!ep)
		return -ENODEV;
	mutex_lock(&pvdma_switch_lock);
	if (pvdma_down) {
		ret = -ENODEV;
		goto out;
	}
	if (domain->type == IOMMU_DOMAIN_IDENTITY) {
		pvdma_leave_domain(ep, false);
		ret = pvdma_host_reset(ep, false);
		goto out;
	}
	/* Attached: to an old domain, blocked, or left so by a kexec. */
	if (ep->attached) {
		ret = pvdma_leave_domain(ep, true);
	} else {
		pvdma_leave_domain(ep, false);
		ret = pvdma_host_reset(ep, true);
	}
	if (ret || domain->type == IOMMU_DOMAIN_BLOCKED)
		goto out;

	dom = to_pvdma_domain(domain);
	spin_lock_irqsave(&dom->lock, irqflags);
	ret = pvdma_replay(dom, ep, false);
	if (!ret) {
		list_add_tail(&ep->link, &dom->endpoints);
		dom->nr_passthrough += ep->passthrough;
		ep->domain = dom;
	}
	spin_unlock_irqrestore(&dom->lock, irqflags);
	if (ret)
		pvdma_host_block(ep);
out:
	mutex_unlock(&pvdma_switch_lock);
	return ret;
}

#if PVDMA_CORE_72
/* 7.2 names the domain being left too; the endpoint knows its own. */
static int pvdma_attach_dev_from(struct iommu_domain *domain,
				 struct device *dev, struct iommu_domain *old)
{
	return pvdma_attach_dev(domain, dev);
}

#define pvdma_attach_op pvdma_attach_dev_from
#else
#define pvdma_attach_op pvdma_attach_dev
#endif

static const struct iommu_domain_ops pvdma_domain_ops;

static struct pvdma_domain *pvdma_alloc_domain(void)
{
	struct pvdma_domain *dom = kzalloc(sizeof(*dom), GFP_KERNEL);

	if (!dom)
		return NULL;
	spin_lock_init(&dom->lock);
	dom->mappings = RB_ROOT_CACHED;
	INIT_LIST_HEAD(&dom->endpoints);
	dom->domain.ops = &pvdma_domain_ops;
	dom->domain.pgsize_bitmap = SZ_4K;
	dom->domain.geometry.aperture_start = 0;
	dom->domain.geometry.aperture_end =
		pvdma->iova_bits >= 64 ? U64_MAX :
		(1ULL << pvdma->iova_bits) - 1;
	dom->domain.geometry.force_aperture = true;
	mutex_lock(&pvdma_domains_lock);
	list_add_tail(&dom->all, &pvdma_domains);
	mutex_unlock(&pvdma_domains_lock);
	return dom;
}

static void pvdma_domain_free(struct iommu_domain *domain)
{
	struct pvdma_domain *dom = to_pvdma_domain(domain);
	struct interval_tree_node *it;

	mutex_lock(&pvdma_domains_lock);
	list_del(&dom->all);
	mutex_unlock(&pvdma_domains_lock);
	/* No endpoint is left: nothing to send; drop the shadow. */
	while ((it = interval_tree_iter_first(&dom->mappings, 0, U64_MAX))) {
		interval_tree_remove(it, &dom->mappings);
		kfree(container_of(it, struct pvdma_mapping, it));
	}
	kfree(dom);
}

static bool pvdma_capable(struct device *dev, enum iommu_cap cap)
{
	switch (cap) {
	case IOMMU_CAP_CACHE_COHERENCY:
		return true;
#if PVDMA_CORE_612
	case IOMMU_CAP_DEFERRED_FLUSH:
		return true;
#endif
	default:
		return false;
	}
}

/* ---- device probe ------------------------------------------------------ */

/*
 * Functions the driver does not take (they get no IOMMU group, and the host
 * treats them as unattached: bypass with FEATURES.BYPASS, else blocked;
 * the MSI window stays open for them either way):
 *
 * Bridges (root ports, switch ports, PCI bridges). Their only DMA of their
 * own is MSI writes, which the host never translates. Taking them would
 * put every function below a port without enabled ACS (Linux enables ACS
 * only when an IOMMU is found at boot) into the port's group, and a port
 * bound to pcieport at boot would drag that group into an identity
 * domain. Left out, each endpoint below a PCIe port gets a group of its
 * own from pci_device_group; in QEMU no DMA is routed between the
 * functions below a port, every access of every function goes through
 * pvdma under its own requester ID.
 *
 * Functions with a driver: it was bound before this IOMMU existed, so its
 * DMA uses physical addresses and the IOMMU core never counted it as a
 * user of a domain (iommu_device_use_default_domain ran without a group).
 * Grouping it would let the core change the group's domain under it and
 * hand the group to VFIO. The only probes that can meet a driver are the
 * bus walk of iommu_device_register (a device added later is probed from
 * BUS_NOTIFY_ADD_DEVICE, before any driver binds); PCI remove and rescan
 * brings such a function back without a driver, and then it is taken.
 */
static bool pvdma_refused(struct pci_dev *pdev)
{
	if (pci_is_bridge(pdev))
		return true;
	if (pdev->dev.driver) {
		pci_info(pdev, "bound to %s before pvdma: left untranslated; remove and rescan it to put it behind pvdma\n",
			 pdev->dev.driver->name);
		return true;
	}
	return false;
}

static struct iommu_device *pvdma_probe_device(struct device *dev)
{
	struct pvdma_endpoint *ep;
	struct pci_dev *pdev;
	u64 result = 0;
	u32 rid = 0;
	u32 st;

	if (!pvdma || !dev_is_pci(dev))
		return ERR_PTR(-ENODEV);
	pdev = to_pci_dev(dev);
	if (pdev == pvdma->pdev || pvdma_excluded(pdev))
		return ERR_PTR(-ENODEV);
	/*
	 * The function's own ID. One behind a conventional PCI bridge DMAs
	 * under the bridge's alias; pvdma keys that endpoint by the alias,
	 * so QUERY says NODEV here and the function is left alone.
	 */
	rid = pci_dev_id(pdev);
	st = pvdma_simple(PVDMA_OP_QUERY, rid, 0, 0, &result);
	if (st != PVDMA_S_OK)
		return ERR_PTR(-ENODEV);	/* not in pvdma's scope */
	if (pvdma_refused(pdev)) {
		/* Left attached by an earlier kernel (kexec): let it go. */
		if (result & PVDMA_QUERY_ATTACHED)
			pvdma_simple(PVDMA_OP_DETACH, rid, 0, 0, NULL);
		return ERR_PTR(-ENODEV);
	}
	ep = kzalloc(sizeof(*ep), GFP_KERNEL);
	if (!ep)
		return ERR_PTR(-ENOMEM);
	ep->dev = dev;
	ep->rid = rid;
	/* Attached by an earlier driver instance (kexec): start over. */
	ep->attached = result & PVDMA_QUERY_ATTACHED;
	ep->passthrough = result & PVDMA_QUERY_PASSTHROUGH;
	INIT_LIST_HEAD(&ep->link);
	dev_iommu_priv_set(dev, ep);
	dev_dbg(dev, "behind pvdma as requester 0x%04x%s\n", rid,
		result & PVDMA_QUERY_PASSTHROUGH ? " (passthrough)" : "");
	return &pvdma->iommu;
}

static void pvdma_release_device(struct device *dev)
{
	struct pvdma_endpoint *ep = dev_iommu_priv_get(dev);

	if (!ep)
		return;
	pvdma_leave_domain(ep, false);
	pvdma_host_reset(ep, false);
	dev_iommu_priv_set(dev, NULL);
	kfree(ep);
}

static void pvdma_get_resv_regions(struct device *dev, struct list_head *head)
{
	struct iommu_resv_region *msi;

	/* The host leaves the MSI window untranslated. */
	msi = iommu_alloc_resv_region(PVDMA_MSI_BASE, PVDMA_MSI_SIZE,
				      IOMMU_WRITE | IOMMU_MMIO, IOMMU_RESV_MSI,
				      GFP_KERNEL);
	if (msi)
		list_add_tail(&msi->list, head);
}

#if PVDMA_CORE_612
static struct iommu_domain *pvdma_domain_alloc_paging(struct device *dev)
{
	struct pvdma_domain *dom = pvdma_alloc_domain();

	return dom ? &dom->domain : ERR_PTR(-ENOMEM);
}

static const struct iommu_domain_ops pvdma_static_domain_ops = {
	.attach_dev = pvdma_attach_op,
};

static struct iommu_domain pvdma_identity_domain = {
	.type = IOMMU_DOMAIN_IDENTITY,
	.ops = &pvdma_static_domain_ops,
};

static struct iommu_domain pvdma_blocked_domain = {
	.type = IOMMU_DOMAIN_BLOCKED,
	.ops = &pvdma_static_domain_ops,
};
#else
static struct iommu_domain *pvdma_domain_alloc(unsigned int type)
{
	struct pvdma_domain *dom;

	switch (type) {
	case IOMMU_DOMAIN_IDENTITY:
		if (!(pvdma->features & PVDMA_FEATURE_BYPASS))
			return NULL;
		break;
	case IOMMU_DOMAIN_BLOCKED:
	case IOMMU_DOMAIN_UNMANAGED:
	case IOMMU_DOMAIN_DMA:
	case IOMMU_DOMAIN_DMA_FQ:
		break;
	default:
		return NULL;
	}
	dom = pvdma_alloc_domain();
	return dom ? &dom->domain : NULL;
}

static void pvdma_detach_dev(struct iommu_domain *domain, struct device *dev)
{
	struct pvdma_endpoint *ep = dev_iommu_priv_get(dev);

	if (!ep || ep->domain != to_pvdma_domain(domain))
		return;
	/* No domain: blocked, as attach_dev leaves a failed switch. */
	mutex_lock(&pvdma_switch_lock);
	pvdma_leave_domain(ep, !pvdma_down);
	mutex_unlock(&pvdma_switch_lock);
}

static void pvdma_probe_finalize(struct device *dev)
{
	/* Clear the ops first in case the device left a DMA domain. */
	set_dma_ops(dev, NULL);
	iommu_setup_dma_ops(dev, 0, U64_MAX);
}
#endif

static const struct iommu_domain_ops pvdma_domain_ops = {
	.attach_dev		= pvdma_attach_op,
#if !PVDMA_CORE_612
	.detach_dev		= pvdma_detach_dev,
#else
	.iotlb_sync_map		= pvdma_iotlb_sync_map,
#endif
	.map_pages		= pvdma_map_pages,
	.unmap_pages		= pvdma_unmap_pages,
	.flush_iotlb_all	= pvdma_flush_iotlb_all,
	.iotlb_sync		= pvdma_iotlb_sync,
	.iova_to_phys		= pvdma_iova_to_phys,
	.free			= pvdma_domain_free,
};

/* Not const: the identity domain exists only with FEATURES.BYPASS. */
static struct iommu_ops pvdma_iommu_ops = {
	.capable		= pvdma_capable,
#if PVDMA_CORE_612
	.domain_alloc_paging	= pvdma_domain_alloc_paging,
	.blocked_domain		= &pvdma_blocked_domain,
#else
	.domain_alloc		= pvdma_domain_alloc,
	.probe_finalize		= pvdma_probe_finalize,
#endif
	.probe_device		= pvdma_probe_device,
	.release_device		= pvdma_release_device,
	.device_group		= pci_device_group,
	.get_resv_regions	= pvdma_get_resv_regions,
#if !PVDMA_CORE_72
	.pgsize_bitmap		= SZ_4K,
#endif
	.owner			= THIS_MODULE,
	.default_domain_ops	= &pvdma_domain_ops,
};

/* ---- the pvdma PCI function -------------------------------------------- */

#ifdef PVDMA_TEST_HOOKS
/* test_skip_map, test_ro_map: "bb:dd.f" arms the tweak, "none" disarms. */
static int param_set_test_rid(const char *val, const struct kernel_param *kp)
{
	unsigned int bus, slot, fn;
	int *rid = kp->arg;

	if (sysfs_streq(val, "none")) {
		WRITE_ONCE(*rid, -1);
		return 0;
	}
	if (sscanf(val, "%x:%x.%x", &bus, &slot, &fn) != 3 || bus > 0xff ||
	    slot > 0x1f || fn > 7)
		return -EINVAL;
	WRITE_ONCE(*rid, (int)PCI_DEVID(bus, PCI_DEVFN(slot, fn)));
	return 0;
}

static int param_get_test_rid(char *buf, const struct kernel_param *kp)
{
	int rid = READ_ONCE(*(int *)kp->arg);

	if (rid < 0)
		return sysfs_emit(buf, "none\n");
	return sysfs_emit(buf, "%02x:%02x.%x\n", PCI_BUS_NUM(rid),
			  PCI_SLOT(rid & 0xff), PCI_FUNC(rid & 0xff));
}

static const struct kernel_param_ops test_rid_ops = {
	.set = param_set_test_rid,
	.get = param_get_test_rid,
};
module_param_cb(test_skip_map, &test_rid_ops, &skip_map_rid, 0644);
MODULE_PARM_DESC(test_skip_map,
		 "testing only: bb:dd.f whose next MAP is not sent (its DMA there faults), or none");
module_param_cb(test_ro_map, &test_rid_ops, &ro_map_rid, 0644);
MODULE_PARM_DESC(test_ro_map,
		 "testing only: bb:dd.f whose next writable MAP is sent read-only (the device's write there faults), or none");

#define PVDMA_TEST_IOVA		0x10000000UL

/*
 * The test hooks' common start: the function named bb:dd.f (a reference
 * the caller puts) and a new paging domain for it.
 */
static struct iommu_domain *pvdma_test_domain(const char *val,
					      struct pci_dev **pdevp)
{
	unsigned int bus, slot, fn;
	struct iommu_domain *domain;
	struct pci_dev *pdev;

	if (sscanf(val, "%x:%x.%x", &bus, &slot, &fn) != 3 || bus > 0xff ||
	    slot > 0x1f || fn > 7)
		return ERR_PTR(-EINVAL);
	pdev = pci_get_domain_bus_and_slot(0, bus, PCI_DEVFN(slot, fn));
	if (!pdev)
		return ERR_PTR(-ENODEV);
#if PVDMA_CORE_612
	domain = iommu_paging_domain_alloc(&pdev->dev);
#else
	domain = iommu_domain_alloc(&pci_bus_type) ?: ERR_PTR(-ENOMEM);
#endif
	if (IS_ERR(domain))
		pci_dev_put(pdev);
	else
		*pdevp = pdev;
	return domain;
}

static int pvdma_test_map(struct iommu_domain *domain, unsigned long iova,
			  phys_addr_t pa, size_t size, int prot)
{
#if PVDMA_CORE_612
	return iommu_map(domain, iova, pa, size, prot, GFP_KERNEL);
#else
	return iommu_map(domain, iova, pa, size, prot);
#endif
}

/*
 * test_partial_unmap=bb:dd.f (a function without a driver, alone in its
 * group): the function goes into a new paging domain, as with VFIO, which
 * maps 16 KiB with one iommu_map() at PVDMA_TEST_IOVA and unmaps its
 * second page. The write fails unless exactly that page went; the rest
 * stays mapped, and the domain attached, for the host to check.
 */
static int param_set_test_partial_unmap(const char *val,
					const struct kernel_param *kp)
{
	struct iommu_domain *domain;
	phys_addr_t pa, got[4];
	struct pci_dev *pdev;
	struct page *pages;
	size_t unmapped;
	int i, ret;

	domain = pvdma_test_domain(val, &pdev);
	if (IS_ERR(domain))
		return PTR_ERR(domain);
	pages = alloc_pages(GFP_KERNEL | __GFP_ZERO, 2);
	ret = -ENOMEM;
	if (!pages)
		goto out_domain;
	pa = page_to_phys(pages);
	ret = iommu_attach_device(domain, &pdev->dev);
	if (ret)
		goto out_pages;
	ret = pvdma_test_map(domain, PVDMA_TEST_IOVA, pa, SZ_16K,
			     IOMMU_READ | IOMMU_WRITE);
	if (ret)
		goto out_detach;
	unmapped = iommu_unmap(domain, PVDMA_TEST_IOVA + SZ_4K, SZ_4K);
	for (i = 0; i < 4; i++)
		got[i] = iommu_iova_to_phys(domain, PVDMA_TEST_IOVA + i * SZ_4K);
	pci_info(pdev, "test_partial_unmap: 0x%zx of 0x1000 unmapped; pages %pa %pa %pa %pa (mapped from %pa)\n",
		 unmapped, &got[0], &got[1], &got[2], &got[3], &pa);
	if (unmapped == SZ_4K && got[0] == pa && !got[1] &&
	    got[2] == pa + SZ_8K && got[3] == pa + SZ_8K + SZ_4K) {
		pci_dev_put(pdev);
		return 0;		/* left in place: test builds only */
	}
	ret = -EIO;
	iommu_unmap(domain, PVDMA_TEST_IOVA, SZ_16K);
out_detach:
	iommu_detach_device(domain, &pdev->dev);
out_pages:
	__free_pages(pages, 2);
out_domain:
	iommu_domain_free(domain);
	pci_dev_put(pdev);
	return ret;
}

static const struct kernel_param_ops test_partial_unmap_ops = {
	.set = param_set_test_partial_unmap,
};
module_param_cb(test_partial_unmap, &test_partial_unmap_ops, NULL, 0200);
MODULE_PARM_DESC(test_partial_unmap,
		 "testing only: bb:dd.f (no driver) to put in a new domain that maps 16 KiB and unmaps the second page");

#define PVDMA_TEST_REPLAY_IOVA	0x40000000UL
#define PVDMA_TEST_REPLAY_SIZE	SZ_512M

/*
 * test_failed_replay=bb:dd.f (a function without a driver, alone in its
 * group): a new paging domain maps 512 MiB of guest RAM from 1 MiB while
 * no device is in it (so nothing is sent), then the function is attached
 * to it. The replay asks the host to pin all of it, which a pin-limit
 * below that refuses (QUOTA): the write succeeds when the attach failed
 * so, with -ENOMEM. The domain is freed; the function is left as the IOMMU core leaves
 * it (6.12 attaches its default domain again, 6.1 does not).
 */
static int param_set_test_failed_replay(const char *val,
					const struct kernel_param *kp)
{
	struct iommu_domain *domain;
	struct pci_dev *pdev;
	int ret;

	domain = pvdma_test_domain(val, &pdev);
	if (IS_ERR(domain))
		return PTR_ERR(domain);
	ret = pvdma_test_map(domain, PVDMA_TEST_REPLAY_IOVA, SZ_1M,
			     PVDMA_TEST_REPLAY_SIZE, IOMMU_READ);
	if (ret)
		goto out_domain;
	ret = iommu_attach_device(domain, &pdev->dev);
	pci_info(pdev, "test_failed_replay: attach to a domain holding 512 MiB: %d\n",
		 ret);
	if (!ret)
		iommu_detach_device(domain, &pdev->dev);
	/* The replay was meant to fail, and for the pins (QUOTA). */
	ret = ret == -ENOMEM ? 0 : -EIO;
	iommu_unmap(domain, PVDMA_TEST_REPLAY_IOVA, PVDMA_TEST_REPLAY_SIZE);
out_domain:
	iommu_domain_free(domain);
	pci_dev_put(pdev);
	return ret;
}

static const struct kernel_param_ops test_failed_replay_ops = {
	.set = param_set_test_failed_replay,
};
module_param_cb(test_failed_replay, &test_failed_replay_ops, NULL, 0200);
MODULE_PARM_DESC(test_failed_replay,
		 "testing only: bb:dd.f (no driver) to attach to a new domain whose 512 MiB the host's pin-limit refuses");

/*
 * test_queued_fail=bb:dd.f (queued mode; a function without a driver, alone
 * in its group; a pin-limit below 512 MiB): the function goes into a new
 * paging domain, which maps 512 MiB of guest RAM from 1 MiB with one
 * iommu_map(): a queued MAP, which the host refuses (QUOTA) when it
 * applies it. iommu_flush_iotlb_all() SYNCs: the SYNC reports the failed
 * entry, the domain is rebuilt, and the replay, refused again, reports the
 * MAP with the device and IOVA and marks the mapping. The write succeeds
 * when that mark is found; the function is detached and the domain freed
 * (6.12 attaches its default domain again, 6.1 leaves it blocked).
 */
static int param_set_test_queued_fail(const char *val,
				      const struct kernel_param *kp)
{
	struct pvdma_domain *dom;
	struct iommu_domain *domain;
	struct interval_tree_node *it;
	unsigned long irqflags;
	struct pci_dev *pdev;
	bool refused = false;
	int ret;

	if (!READ_ONCE(pvdma_q_on))
		return -EOPNOTSUPP;
	domain = pvdma_test_domain(val, &pdev);
	if (IS_ERR(domain))
		return PTR_ERR(domain);
	dom = to_pvdma_domain(domain);
	ret = iommu_attach_device(domain, &pdev->dev);
	if (ret)
		goto out_domain;
	ret = pvdma_test_map(domain, PVDMA_TEST_REPLAY_IOVA, SZ_1M,
			     PVDMA_TEST_REPLAY_SIZE, IOMMU_READ);
	if (!ret) {
		iommu_flush_iotlb_all(domain);
		spin_lock_irqsave(&dom->lock, irqflags);
		it = interval_tree_iter_first(&dom->mappings,
					      PVDMA_TEST_REPLAY_IOVA,
					      PVDMA_TEST_REPLAY_IOVA);
		refused = it && container_of(it, struct pvdma_mapping,
					     it)->sync_unmap;
		spin_unlock_irqrestore(&dom->lock, irqflags);
		iommu_unmap(domain, PVDMA_TEST_REPLAY_IOVA,
			    PVDMA_TEST_REPLAY_SIZE);
	}
	pci_info(pdev, "test_queued_fail: queued MAP of 512 MiB: %d, refused in the rebuild: %s\n",
		 ret, refused ? "yes" : "no");
	ret = refused ? 0 : -EIO;
	iommu_detach_device(domain, &pdev->dev);
out_domain:
	iommu_domain_free(domain);
	pci_dev_put(pdev);
	return ret;
}

struct pvdma_test_xq {
	struct iommu_domain *domain;
	phys_addr_t pa;
};

static long pvdma_test_xq_map(void *arg)
{
	struct pvdma_test_xq *x = arg;

	return pvdma_test_map(x->domain, PVDMA_TEST_IOVA, x->pa, SZ_4K,
			      IOMMU_READ);
}

static long pvdma_test_xq_unmap(void *arg)
{
	struct pvdma_test_xq *x = arg;

	return iommu_unmap(x->domain, PVDMA_TEST_IOVA, SZ_4K) == SZ_4K ?
	       0 : -EIO;
}

/*
 * test_cross_queue=bb:dd.f (queued mode with two queues or more and two
 * CPUs; a function without a driver, alone in its group): in a new paging
 * domain, one page is mapped from CPU 1 and unmapped from CPU 0, whose
 * queues differ; the UNMAP must still be applied after the MAP (the SYNC
 * at the end of iommu_unmap reports no failed entry, the failure epoch
 * stays). The function is detached and the domain freed.
 */
static int param_set_test_cross_queue(const char *val,
				      const struct kernel_param *kp)
{
	struct iommu_domain *domain;
	struct pvdma_test_xq x;
	unsigned long epoch;
	struct pci_dev *pdev;
	struct page *page;
	int ret;

	if (!READ_ONCE(pvdma_q_on) || pvdma_q_nr < 2 || !cpu_online(1))
		return -EOPNOTSUPP;
	domain = pvdma_test_domain(val, &pdev);
	if (IS_ERR(domain))
		return PTR_ERR(domain);
	page = alloc_page(GFP_KERNEL | __GFP_ZERO);
	ret = -ENOMEM;
	if (!page)
		goto out_domain;
	ret = iommu_attach_device(domain, &pdev->dev);
	if (ret)
		goto out_page;
	x.domain = domain;
	x.pa = page_to_phys(page);
	epoch = atomic_long_read(&pvdma_fail_epoch);
	ret = work_on_cpu(1, pvdma_test_xq_map, &x);
	if (!ret)
		ret = work_on_cpu(0, pvdma_test_xq_unmap, &x);
	if (!ret && atomic_long_read(&pvdma_fail_epoch) != epoch)
		ret = -EIO;
	pci_info(pdev, "test_cross_queue: a page mapped on CPU 1, unmapped on CPU 0: %d\n",
		 ret);
	iommu_detach_device(domain, &pdev->dev);
out_page:
	__free_page(page);
out_domain:
	iommu_domain_free(domain);
	pci_dev_put(pdev);
	return ret;
}

static const struct kernel_param_ops test_cross_queue_ops = {
	.set = param_set_test_cross_queue,
};
module_param_cb(test_cross_queue, &test_cross_queue_ops, NULL, 0200);
MODULE_PARM_DESC(test_cross_queue,
		 "testing only: bb:dd.f (no driver) to put in a new domain that maps a page on CPU 1 and unmaps it on CPU 0");

#define PVDMA_TEST_RING_PAGES	(2 * PVDMA_RING_ENTRIES)

/*
 * test_ring_full=bb:dd.f (queued mode; a function without a driver, alone
 * in its group): in a new paging domain, one page is mapped at twice as
 * many IOVAs as a ring has slots, one iommu_map() each, and all of them
 * unmapped with one iommu_unmap(): the CPU's ring fills, is synced and
 * taken up again. The write fails unless a full ring was synced and no
 * entry failed. The function is detached and the domain freed.
 */
static int param_set_test_ring_full(const char *val,
				    const struct kernel_param *kp)
{
	unsigned long epoch, full;
	struct iommu_domain *domain;
	struct pci_dev *pdev;
	struct page *page;
	size_t unmapped = 0;
	int i, ret;

	if (!READ_ONCE(pvdma_q_on))
		return -EOPNOTSUPP;
	domain = pvdma_test_domain(val, &pdev);
	if (IS_ERR(domain))
		return PTR_ERR(domain);
	page = alloc_page(GFP_KERNEL | __GFP_ZERO);
	ret = -ENOMEM;
	if (!page)
		goto out_domain;
	ret = iommu_attach_device(domain, &pdev->dev);
	if (ret)
		goto out_page;
	epoch = atomic_long_read(&pvdma_fail_epoch);
	full = atomic_long_read(&pvdma_full_syncs);
	for (i = 0; i < PVDMA_TEST_RING_PAGES && !ret; i++)
		ret = pvdma_test_map(domain, PVDMA_TEST_IOVA + i * SZ_4K,
				     page_to_phys(page), SZ_4K, IOMMU_READ);
	unmapped = iommu_unmap(domain, PVDMA_TEST_IOVA,
			       PVDMA_TEST_RING_PAGES * SZ_4K);
	full = atomic_long_read(&pvdma_full_syncs) - full;
	pci_info(pdev, "test_ring_full: %d pages mapped one by one: %d; 0x%zx unmapped; %lu SYNCs of a full ring\n",
		 i, ret, unmapped, full);
	if (!ret && (!full || atomic_long_read(&pvdma_fail_epoch) != epoch ||
		     unmapped != PVDMA_TEST_RING_PAGES * SZ_4K))
		ret = -EIO;
	iommu_detach_device(domain, &pdev->dev);
out_page:
	__free_page(page);
out_domain:
	iommu_domain_free(domain);
	pci_dev_put(pdev);
	return ret;
}

static const struct kernel_param_ops test_ring_full_ops = {
	.set = param_set_test_ring_full,
};
module_param_cb(test_ring_full, &test_ring_full_ops, NULL, 0200);
MODULE_PARM_DESC(test_ring_full,
		 "testing only: bb:dd.f (no driver) to put in a new domain that maps a page at twice a ring's entries of IOVAs, then unmaps them");

/*
 * test_break_queue=1 (queued mode): this CPU's queue publishes a ring and
 * one more entries than the host took, which the host must answer by
 * stopping the queue. The SYNC that follows answers STATE; the driver
 * gives the queues up. The write succeeds once the work has torn them
 * down and requests are synchronous.
 */
static int param_set_test_break_queue(const char *val,
				      const struct kernel_param *kp)
{
	unsigned long irqflags;
	struct pvdma_queue *q;
	u32 rid;

	if (!READ_ONCE(pvdma_q_on) || !pvdma_any_rid(&rid))
		return -EOPNOTSUPP;
	local_irq_save(irqflags);
	q = &pvdma_q[pvdma_q_mine()];
	spin_lock(&q->lock);
	if (!q->dead) {
		q->head = READ_ONCE(q->ctrl->tail) + PVDMA_RING_ENTRIES + 1;
		/* Published as pvdma_q_push() does; the slots are stale. */
		smp_store_release(&q->ctrl->head, q->head);
	}
	spin_unlock(&q->lock);
	pvdma_sync(rid);
	local_irq_restore(irqflags);
	flush_work(&pvdma_q_work);
	pr_info("test_break_queue: queues %s, %s\n",
		READ_ONCE(pvdma_q_broken) ? "given up" : "still trusted",
		READ_ONCE(pvdma_q_on) ? "still in use" : "torn down");
	return READ_ONCE(pvdma_q_broken) && !READ_ONCE(pvdma_q_on) ? 0 : -EIO;
}

static const struct kernel_param_ops test_break_queue_ops = {
	.set = param_set_test_break_queue,
};
module_param_cb(test_break_queue, &test_break_queue_ops, NULL, 0200);
MODULE_PARM_DESC(test_break_queue,
		 "testing only: 1 overruns this CPU's queue, which the host stops; the driver goes synchronous");

static const struct kernel_param_ops test_queued_fail_ops = {
	.set = param_set_test_queued_fail,
};
module_param_cb(test_queued_fail, &test_queued_fail_ops, NULL, 0200);
MODULE_PARM_DESC(test_queued_fail,
		 "testing only: bb:dd.f (no driver) to put in a new domain whose queued MAP of 512 MiB the host's pin-limit refuses");
#endif

static void pvdma_free_blocks(void)
{
	int cpu;

	for_each_possible_cpu(cpu) {
		free_page((unsigned long)per_cpu(pvdma_block, cpu));
		per_cpu(pvdma_block, cpu) = NULL;
	}
}

static int pvdma_alloc_blocks(void)
{
	struct page *page;
	int cpu;

	for_each_possible_cpu(cpu) {
		page = alloc_pages_node(cpu_to_node(cpu),
					GFP_KERNEL | __GFP_ZERO, 0);
		if (!page) {
			pvdma_free_blocks();
			return -ENOMEM;
		}
		per_cpu(pvdma_block, cpu) = page_address(page);
	}
	return 0;
}

/* QUEUE (op 7) setting queue @idx up, through endpoint @rid. */
static u32 pvdma_q_setup_one(unsigned int idx, u32 rid)
{
	struct pvdma_queue *q = &pvdma_q[idx];
	unsigned long irqflags;
	struct pvdma_req *r;
	u32 st;

	local_irq_save(irqflags);
	r = pvdma_req_begin(PVDMA_OP_QUEUE, 0, rid);
	r->iova = idx;
	r->nr_segs = 2;
	r->segs[0].gpa = virt_to_phys(q->ctrl);
	r->segs[0].len = PVDMA_QUEUE_CTRL_SIZE;
	r->segs[1].gpa = virt_to_phys(q->ring);
	r->segs[1].len = PVDMA_RING_BYTES;
	st = pvdma_req_issue(r);
	local_irq_restore(irqflags);
	return st;
}

/*
 * Queued mode, when the host offers it and queued=1: min(CPUs, QUEUES)
 * queues of PVDMA_RING_ENTRIES entries. On any failure the driver stays
 * synchronous. Before iommu_device_register: no endpoint maps yet.
 */
static void pvdma_q_setup(struct pvdma_iommu *p)
{
	struct device *dev = &p->pdev->dev;
	unsigned int i, nr;
	u32 rid, st = 0;

	if (!queued || !(p->features & PVDMA_FEATURE_QUEUE))
		return;
	nr = readl(p->regs + PVDMA_REG_QUEUES);
	nr = min3(nr, nr_cpu_ids, (unsigned int)PVDMA_MAX_QUEUES);
	if (!nr) {
		dev_warn(dev, "FEATURES.QUEUE but QUEUES is 0: requests are synchronous\n");
		return;
	}
	if (!pvdma_any_rid(&rid)) {
		dev_warn(dev, "no endpoint to set request queues up through: requests are synchronous\n");
		return;
	}
	pvdma_q = kcalloc(nr, sizeof(*pvdma_q), GFP_KERNEL);
	pvdma_q_ctrl = (void *)get_zeroed_page(GFP_KERNEL);
	if (!pvdma_q || !pvdma_q_ctrl)
		goto err_free;
	for (i = 0; i < nr; i++) {
		spin_lock_init(&pvdma_q[i].lock);
		pvdma_q[i].ctrl = &pvdma_q_ctrl[i];
		pvdma_q[i].ring = (void *)__get_free_pages(GFP_KERNEL | __GFP_ZERO,
							   get_order(PVDMA_RING_BYTES));
		if (!pvdma_q[i].ring)
			goto err_free;
	}
	pvdma_q_nr = nr;
	for (i = 0; i < nr; i++) {
		st = pvdma_q_setup_one(i, rid);
		if (st == PVDMA_S_STATE) {
			/* Left set up by an earlier kernel (kdump): take it over. */
			pvdma_simple(PVDMA_OP_QUEUE, rid, i, 0, NULL);
			st = pvdma_q_setup_one(i, rid);
		}
		if (st != PVDMA_S_OK)
			break;
		/* The host took tail = head = 0 (the block was zeroed). */
		pvdma_q[i].tail = READ_ONCE(pvdma_q[i].ctrl->tail);
		pvdma_q[i].head = pvdma_q[i].tail;
		WRITE_ONCE(pvdma_q[i].ctrl->head, pvdma_q[i].head);
	}
	if (i == nr) {
		WRITE_ONCE(pvdma_q_used, true);
		WRITE_ONCE(pvdma_q_on, true);
		dev_info(dev, "%u request queues of %u entries\n", nr,
			 PVDMA_RING_ENTRIES);
		return;
	}
	dev_warn(dev, "setting request queue %u up: status %u (%d); requests are synchronous\n",
		 i, st, pvdma_errno(st));
	/* Those set up go again; the memory of any that would not, stays. */
	pvdma_q_nr = i;
	pvdma_q_teardown(rid);
	for (; i < nr; i++)
		free_pages((unsigned long)pvdma_q[i].ring,
			   get_order(PVDMA_RING_BYTES));
	pvdma_q_nr = 0;
	if (!pvdma_q_ctrl) {
		kfree(pvdma_q);
		pvdma_q = NULL;
	}
	return;

err_free:
	dev_warn(dev, "no memory for request queues: requests are synchronous\n");
	for (i = 0; pvdma_q && i < nr; i++)
		free_pages((unsigned long)pvdma_q[i].ring,
			   get_order(PVDMA_RING_BYTES));
	free_page((unsigned long)pvdma_q_ctrl);
	pvdma_q_ctrl = NULL;
	kfree(pvdma_q);
	pvdma_q = NULL;
}

/*
 * The function's state lives as long as the module: once devices were
 * probed they may issue requests at any time, and Linux 6.1 keeps the bus
 * operations after an unregister. So nothing here is device-managed (a
 * removal through sysfs would unmap the registers under them), and a
 * failed registration keeps what it set up.
 */
static int pvdma_pci_setup(struct pci_dev *pdev, struct pvdma_iommu *p)
{
	struct device *dev = &pdev->dev;
	int ret;

	ret = pci_enable_device_mem(pdev);
	if (ret)
		return ret;
	ret = pci_request_region(pdev, 0, KBUILD_MODNAME);
	if (ret)
		goto err_disable;
	p->regs = pci_iomap(pdev, 0, 0);
	if (!p->regs) {
		ret = -ENOMEM;
		goto err_release;
	}
	ret = -ENODEV;
	if (readl(p->regs + PVDMA_REG_MAGIC) != PVDMA_MAGIC ||
	    readl(p->regs + PVDMA_REG_VERSION) != PVDMA_VERSION) {
		dev_err(dev, "not a pvdma version %u register block\n",
			PVDMA_VERSION);
		goto err_unmap;
	}
	p->features = readq(p->regs + PVDMA_REG_FEATURES);
	p->iova_bits = readl(p->regs + PVDMA_REG_IOVA_BITS);
	p->max_segs = min_t(u32, readl(p->regs + PVDMA_REG_MAX_SEGS),
			    PVDMA_BLOCK_SEGS);
	p->hc_nr = readl(p->regs + PVDMA_REG_HYPERCALL_NR);
	if (p->iova_bits < 32 || p->iova_bits > 64 || !p->max_segs) {
		dev_err(dev, "unusable IOVA_BITS %u / MAX_SEGS %u\n",
			p->iova_bits, p->max_segs);
		goto err_unmap;
	}
	if (sysfs_streq(transport, "hypercall")) {
		if (!(p->features & PVDMA_FEATURE_HYPERCALL)) {
			dev_err(dev, "transport=hypercall, but FEATURES.HYPERCALL is clear\n");
			goto err_unmap;
		}
		p->use_hypercall = true;
	} else if (sysfs_streq(transport, "auto")) {
		p->use_hypercall = p->features & PVDMA_FEATURE_HYPERCALL;
	} else if (!sysfs_streq(transport, "doorbell")) {
		dev_err(dev, "transport=%s: want auto, doorbell or hypercall\n",
			transport);
		ret = -EINVAL;
		goto err_unmap;
	}
	return 0;

err_unmap:
	pci_iounmap(pdev, p->regs);
err_release:
	pci_release_region(pdev, 0);
err_disable:
	pci_disable_device(pdev);
	return ret;
}

static int pvdma_pci_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct pvdma_iommu *p;
	int ret;

	if (pvdma) {
		dev_err(dev, "only one pvdma function is supported\n");
		return -EBUSY;
	}
	/* Another IOMMU driver has probed the PCI bus, this function too. */
	if (device_iommu_mapped(dev)) {
		dev_err(dev, "another IOMMU drives the PCI bus; not registering\n");
		return -EBUSY;
	}
	p = kzalloc(sizeof(*p), GFP_KERNEL);
	if (!p)
		return -ENOMEM;
	p->pdev = pdev;
	ret = pvdma_pci_setup(pdev, p);
	if (ret)
		goto err_free;
	ret = pvdma_alloc_blocks();
	if (ret)
		goto err_regs;
#if PVDMA_CORE_612
	if (p->features & PVDMA_FEATURE_BYPASS)
		pvdma_iommu_ops.identity_domain = &pvdma_identity_domain;
#endif
	ret = iommu_device_sysfs_add(&p->iommu, dev, NULL, "pvdma-%s",
				     pci_name(pdev));
	if (ret)
		goto err_blocks;
	/* Kept, like everything above, for as long as the module is loaded. */
	pci_dev_get(pdev);
	pvdma = p;
	pvdma_q_setup(p);
	/*
	 * Probes every PCI device. The 6.1 core leaves its bus ops set even
	 * after an unregister, so from here on the module stays (no remove,
	 * no unbind, no module_exit).
	 */
	ret = iommu_device_register(&p->iommu, &pvdma_iommu_ops, NULL);
	if (ret) {
		/*
		 * Devices may have been probed and attached before the failure,
		 * and released since (DETACH): the blocks and registers stay,
		 * a few pages for the life of the module, as does pvdma.
		 */
		dev_err(dev, "iommu_device_register: %d; the devices keep bypassing or being blocked as the host decides\n",
			ret);
		return ret;
	}
	dev_info(dev, "IOMMU for PCI bus %02x: features 0x%llx, %u-bit IOVAs, %u segments per request, %s\n",
		 pdev->bus->number, p->features, p->iova_bits, p->max_segs,
		 p->use_hypercall ? "hypercall" : "doorbell");
	return 0;

err_blocks:
	pvdma_free_blocks();
err_regs:
	pci_iounmap(pdev, p->regs);
	pci_release_region(pdev, 0);
	pci_disable_device(pdev);
err_free:
	kfree(p);
	return ret;
}

/*
 * Before a kexec (and reboot or power-off), every endpoint is DETACHed,
 * as intel-iommu turns translation off: the next kernel's drivers, built
 * in and bound before any IOMMU driver, DMA to physical addresses and must
 * not meet this kernel's tables. Devices bound after pvdma are shut down
 * before it (the core shuts devices down in reverse probe order); any DMA
 * mapping made after this fails. A crash kernel (kdump) is entered without
 * this and finds the endpoints attached: see docs/guest-driver.md.
 */
static void pvdma_pci_shutdown(struct pci_dev *pdev)
{
	struct pci_dev *ep_pdev = NULL;
	u64 result;
	u32 rid, st;

	if (!pvdma || pvdma->pdev != pdev)
		return;
	mutex_lock(&pvdma_switch_lock);
	WRITE_ONCE(pvdma_down, true);
	/* Applies what they hold; the next kernel sets its own up. */
	pvdma_q_stop();
	/* By requester ID: no endpoint structure is touched here. */
	for_each_pci_dev(ep_pdev) {
		if (ep_pdev == pdev)
			continue;
		rid = pci_dev_id(ep_pdev);
		result = 0;
		st = pvdma_simple(PVDMA_OP_QUERY, rid, 0, 0, &result);
		if (st != PVDMA_S_OK || !(result & PVDMA_QUERY_ATTACHED))
			continue;
		st = pvdma_simple(PVDMA_OP_DETACH, rid, 0, 0, NULL);
		if (st != PVDMA_S_OK && st != PVDMA_S_STATE)
			pci_warn(ep_pdev, "pvdma: DETACH at shutdown: status %u\n",
				 st);
	}
	mutex_unlock(&pvdma_switch_lock);
}

/*
 * The function removed (sysfs, hot-unplug): the driver goes on with
 * synchronous requests over the registers it keeps; the queues, whose
 * memory the host pins, are torn down.
 */
static void pvdma_pci_remove(struct pci_dev *pdev)
{
	if (pvdma && pvdma->pdev == pdev)
		pvdma_q_stop();
}

static const struct pci_device_id pvdma_pci_ids[] = {
	{ PCI_DEVICE(PVDMA_PCI_VENDOR_ID, PVDMA_PCI_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, pvdma_pci_ids);

static struct pci_driver pvdma_pci_driver = {
	.name = "pvdma-iommu",
	.id_table = pvdma_pci_ids,
	.probe = pvdma_pci_probe,
	.remove = pvdma_pci_remove,
	.shutdown = pvdma_pci_shutdown,
	.driver.suppress_bind_attrs = true,
};

static int __init pvdma_iommu_init(void)
{
	return pci_register_driver(&pvdma_pci_driver);
}
module_init(pvdma_iommu_init);

MODULE_DESCRIPTION("pvdma paravirtual IOMMU");
MODULE_LICENSE("GPL");
