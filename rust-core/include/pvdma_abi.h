/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/*
 * pvdma guest ABI, version 1: the wire format a guest driver programs.
 *
 * This header is the single definition of the request block and the BAR0
 * register layout. Guest drivers include it as is; the host's Rust side is
 * generated from it by bindgen, so the two can never drift apart.
 *
 * All multi-byte fields are little-endian. A "page" is 4096 bytes.
 * docs/abi.md explains the semantics; this file only fixes the layout.
 */
#ifndef PVDMA_ABI_H
#define PVDMA_ABI_H

#ifdef __KERNEL__
#include <linux/types.h> /* uint16_t .. uint64_t, for guest kernel drivers */
#else
#include <stdint.h>
#endif

/* PCI identity of the pvdma function. */
#define PVDMA_PCI_VENDOR_ID         0x1b36
#define PVDMA_PCI_DEVICE_ID         0x0015
#define PVDMA_PCI_REVISION          1
#define PVDMA_PCI_CLASS_CODE        0x080600 /* system peripheral, IOMMU */
#define PVDMA_BAR0_SIZE             0x1000

#define PVDMA_MAGIC                 0x414d4450u /* "PDMA" */
#define PVDMA_VERSION               1u
#define PVDMA_PAGE_SHIFT            12
#define PVDMA_PAGE_SIZE             4096u
#define PVDMA_MIN_MAX_SEGS          252u

/* BAR0 register offsets. */
#define PVDMA_REG_MAGIC             0x000 /* RO 32 */
#define PVDMA_REG_VERSION           0x004 /* RO 32 */
#define PVDMA_REG_FEATURES          0x008 /* RO 64 */
#define PVDMA_REG_IOVA_BITS         0x010 /* RO 32 */
#define PVDMA_REG_MAX_SEGS          0x014 /* RO 32 */
#define PVDMA_REG_PAGE_SIZES        0x018 /* RO 64 */
#define PVDMA_REG_HYPERCALL_NR      0x020 /* RO 32 */
#define PVDMA_REG_DOORBELL          0x028 /* WO 64; 32-bit halves at 0x28/0x2c */
#define PVDMA_REG_DOORBELL_HI       0x02c
#define PVDMA_REG_FAULTS            0x030 /* RO 64 */
#define PVDMA_REG_LAST_STATUS       0x038 /* RO 32 */
#define PVDMA_REG_QUEUES            0x03c /* RO 32; 0 without FEATURE_QUEUE */

/* FEATURES bits. */
#define PVDMA_FEATURE_HYPERCALL     (1ull << 0)
#define PVDMA_FEATURE_HOST_IOVA     (1ull << 1)
#define PVDMA_FEATURE_BYPASS        (1ull << 2)
#define PVDMA_FEATURE_UNMAP_LIST    (1ull << 3) /* op 6 is available */
#define PVDMA_FEATURE_QUEUE         (1ull << 4) /* ops 7, 8 and QUEUES */

/* Request operations. */
#define PVDMA_OP_QUERY              1
#define PVDMA_OP_ATTACH             2
#define PVDMA_OP_DETACH             3
#define PVDMA_OP_MAP                4
#define PVDMA_OP_UNMAP              5
#define PVDMA_OP_UNMAP_LIST         6 /* with PVDMA_FEATURE_UNMAP_LIST */
#define PVDMA_OP_QUEUE              7 /* with PVDMA_FEATURE_QUEUE */
#define PVDMA_OP_SYNC               8 /* with PVDMA_FEATURE_QUEUE */

/* Request flags. */
#define PVDMA_FLAG_READ             (1u << 0) /* the device may read */
#define PVDMA_FLAG_WRITE            (1u << 1) /* the device may write */
#define PVDMA_FLAG_FIXED            (1u << 2) /* iova is given by the guest */
#define PVDMA_FLAGS_VALID           0x7u

/* QUERY result bits. */
#define PVDMA_QUERY_ATTACHED        (1ull << 0)
#define PVDMA_QUERY_PASSTHROUGH     (1ull << 1)
#define PVDMA_QUERY_BYPASS          (1ull << 2)

/* Request status codes. */
#define PVDMA_S_OK                  0
#define PVDMA_S_INVAL               1
#define PVDMA_S_NODEV               2
#define PVDMA_S_FAULT               3
#define PVDMA_S_NOSPC               4
#define PVDMA_S_EXIST               5
#define PVDMA_S_NOENT               6
#define PVDMA_S_RANGE               7
#define PVDMA_S_TOOBIG              8
#define PVDMA_S_QUOTA               9
#define PVDMA_S_PERM                10
#define PVDMA_S_STATE               11
#define PVDMA_S_INTERNAL            255

/* Hypercall transport: RAX returns this when called from CPL > 0. */
#define PVDMA_HC_EPERM              (-1ll)

/* One guest-physical piece of a MAP request. */
struct pvdma_seg {
    uint64_t gpa;
    uint64_t len;
};

/*
 * One IOVA range of an UNMAP_LIST request. It takes a segment slot of the
 * request block (nr_segs counts ranges), in place of a struct pvdma_seg.
 */
struct pvdma_range {
    uint64_t iova;
    uint64_t len;
};

/*
 * The request block: 8-byte aligned in guest RAM, 64 + 16 * nr_segs bytes.
 * The host writes back only status, iova, length and result.
 */
struct pvdma_req {
    uint16_t op;
    uint16_t flags;
    uint32_t status;
    uint32_t requester; /* bus << 8 | devfn; bits 16..31: PCI segment (0) */
    uint32_t nr_segs;
    uint64_t iova;
    uint64_t length;
    uint64_t result;
    uint64_t reserved[3];
    struct pvdma_seg segs[];
};

#define PVDMA_REQ_HEADER_SIZE       64u
#define PVDMA_SEG_SIZE              16u
#define PVDMA_RANGE_SIZE            16u

/*
 * Queued requests (FEATURES.QUEUE). A queue is a control block and a ring
 * of entries, both in guest RAM; counters are free-running and entry i
 * lives in slot i % (ring length / PVDMA_QUEUE_ENTRY_SIZE).
 */
#define PVDMA_QUEUE_CTRL_SIZE       64u
#define PVDMA_QUEUE_CTRL_ALIGN      64u
#define PVDMA_QUEUE_ENTRY_SIZE      32u
#define PVDMA_QUEUE_RING_MIN        4096u     /* bytes, power of two */
#define PVDMA_QUEUE_RING_MAX        (1u << 20) /* bytes, power of two */

/* The control block: the guest writes head, the host the rest. */
struct pvdma_queue_ctrl {
    uint32_t head;       /* entries published (guest) */
    uint32_t tail;       /* entries taken, applied or failed (host) */
    uint32_t failed;     /* entries failed since set-up (host) */
    uint32_t last_error; /* status of the latest failed entry (host) */
    uint32_t stopped;    /* 1 once the host stopped the queue (host) */
    uint32_t reserved[11];
};

/* One queued MAP (always FIXED) or UNMAP. */
struct pvdma_queue_entry {
    uint16_t op;        /* PVDMA_OP_MAP or PVDMA_OP_UNMAP */
    uint16_t flags;     /* MAP: READ and/or WRITE (FIXED optional); UNMAP: 0 */
    uint32_t requester;
    uint64_t iova;
    uint64_t gpa;       /* MAP: first byte; UNMAP: 0 */
    uint64_t length;    /* MAP: bytes > 0; UNMAP: as UNMAP's length */
};

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(struct pvdma_queue_ctrl) == PVDMA_QUEUE_CTRL_SIZE,
               "pvdma_queue_ctrl size");
_Static_assert(sizeof(struct pvdma_queue_entry) == PVDMA_QUEUE_ENTRY_SIZE,
               "pvdma_queue_entry size");
_Static_assert(sizeof(struct pvdma_seg) == PVDMA_SEG_SIZE, "pvdma_seg size");
_Static_assert(sizeof(struct pvdma_range) == PVDMA_RANGE_SIZE,
               "pvdma_range size");
_Static_assert(sizeof(struct pvdma_range) == sizeof(struct pvdma_seg),
               "a pvdma_range fills a segment slot");
_Static_assert(sizeof(struct pvdma_req) == PVDMA_REQ_HEADER_SIZE,
               "pvdma_req header size");
#endif

#endif /* PVDMA_ABI_H */
