/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/*
 * pvdma guest demo, userspace doorbell transport.
 *
 * Runs as root inside a Linux guest that has `-device pvdma` and
 * `-device edu`. With no kernel driver at all it plays the pvdma guest
 * driver from userspace: BAR0 through sysfs resource0, request blocks in
 * mlock'ed pages whose guest-physical addresses come from
 * /proc/self/pagemap, submitted with a 64-bit write to DOORBELL. It then
 * makes edu DMA through the IOVAs it mapped and checks the bytes.
 *
 * Output: one "  ok:"/"FAIL:" line per check, and finally
 * "pvdma-guest-test: PASS" (exit 0; /init has the last word on the demo's
 * PASS, after the kernel module's part) or
 * "PVDMA-GUEST-DEMO: FAIL <reason>" (exit 1).
 * With FEATURES.HYPERCALL it also checks that a VMCALL/VMMCALL from CPL 3
 * returns -1 and does nothing.
 * With mappings live it prints "PVDMA-GUEST-DEMO: PAUSE live" and waits up
 * to PAUSE_SECONDS for a line on stdin, so the host can look at pvdma's
 * state over QMP (tests/guest/guest-demo.sh does); without one it goes on.
 *
 * Built static: gcc -static -O2 -Wall -Wextra -Werror -I rust-core/include
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <cpuid.h>
#include <time.h>
#include <unistd.h>

#include "pvdma_abi.h"

#define EDU_VENDOR      0x1234
#define EDU_DEVICE      0x11e8
#define EDU_REG_ID      0x00
#define EDU_DMA_SRC     0x80
#define EDU_DMA_DST     0x88
#define EDU_DMA_CNT     0x90
#define EDU_DMA_CMD     0x98
#define EDU_CMD_START   0x1
#define EDU_CMD_TO_RAM  0x2   /* edu buffer -> RAM; clear: RAM -> edu buffer */
#define EDU_BUF         0x40000
#define EDU_DMA_MASK    ((1ull << 28) - 1) /* edu drops higher address bits */

#define PAGE            PVDMA_PAGE_SIZE
#define POOL_PAGES      64
#define PAUSE_SECONDS   15

/* IOVAs edu sees; all below 2^28. */
#define SRC_IOVA        0x1000000ull  /* FIXED mapping, READ */
#define IOVA_STEP       0x0100000ull

static const char *status_name(uint32_t s)
{
    static const char *names[] = {
        "OK", "INVAL", "NODEV", "FAULT", "NOSPC", "EXIST", "NOENT",
        "RANGE", "TOOBIG", "QUOTA", "PERM", "STATE",
    };
    if (s < sizeof(names) / sizeof(names[0]))
        return names[s];
    return s == PVDMA_S_INTERNAL ? "INTERNAL" : "?";
}

static void fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    printf("FAIL: %s\nPVDMA-GUEST-DEMO: FAIL %s\n", msg, msg);
    fflush(stdout);
    exit(1);
}

static void ok(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void ok(const char *fmt, ...)
{
    va_list ap;

    printf("  ok: ");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

#define CHECK(cond, ...) do { if (!(cond)) fail(__VA_ARGS__); ok(__VA_ARGS__); } while (0)

static void step(const char *title)
{
    printf("\n== %s\n", title);
    fflush(stdout);
}

/* ---- PCI through sysfs ---------------------------------------------- */

struct pcidev {
    char name[256];         /* 0000:00:05.0 */
    char path[300];
    unsigned bus, dev, fn;
    volatile uint8_t *bar0;
    size_t bar0_size;
};

static unsigned long read_hex_file(const char *dir, const char *file)
{
    char p[400], buf[64];
    FILE *f;

    snprintf(p, sizeof(p), "%s/%s", dir, file);
    f = fopen(p, "r");
    if (!f || !fgets(buf, sizeof(buf), f))
        fail("cannot read %s: %s", p, strerror(errno));
    fclose(f);
    return strtoul(buf, NULL, 16);
}

static int find_pci(unsigned vendor, unsigned device, struct pcidev *out)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    int found = 0;

    if (!d)
        fail("cannot open /sys/bus/pci/devices: %s", strerror(errno));
    while ((e = readdir(d))) {
        char dir[300];
        unsigned seg;

        if (e->d_name[0] == '.')
            continue;
        snprintf(dir, sizeof(dir), "/sys/bus/pci/devices/%s", e->d_name);
        if (read_hex_file(dir, "vendor") != vendor ||
            read_hex_file(dir, "device") != device)
            continue;
        if (sscanf(e->d_name, "%x:%x:%x.%x", &seg, &out->bus, &out->dev,
                   &out->fn) != 4 || seg != 0)
            fail("unexpected PCI name %s", e->d_name);
        snprintf(out->name, sizeof(out->name), "%s", e->d_name);
        snprintf(out->path, sizeof(out->path), "%s", dir);
        found = 1;
        break;
    }
    closedir(d);
    return found;
}

static uint32_t requester_id(const struct pcidev *p)
{
    return p->bus << 8 | p->dev << 3 | p->fn;
}

/* Memory decoding and bus mastering, via the config space file. */
static void pci_enable(struct pcidev *p)
{
    char path[400];
    uint16_t cmd, after;
    int fd;

    snprintf(path, sizeof(path), "%s/config", p->path);
    fd = open(path, O_RDWR);
    if (fd < 0 || pread(fd, &cmd, 2, 4) != 2)
        fail("%s: cannot read the command register: %s", p->name, strerror(errno));
    after = cmd | 0x6; /* MEMORY | BUS_MASTER */
    if (pwrite(fd, &after, 2, 4) != 2 || pread(fd, &after, 2, 4) != 2)
        fail("%s: cannot write the command register: %s", p->name, strerror(errno));
    close(fd);
    if ((after & 0x6) != 0x6)
        fail("%s: command register reads 0x%04x after enabling", p->name, after);
    ok("%s: PCI command 0x%04x -> 0x%04x (memory, bus master)", p->name, cmd, after);
}

static void map_bar0(struct pcidev *p)
{
    char path[400];
    struct stat st;
    off_t size;
    void *m;
    int fd;

    snprintf(path, sizeof(path), "%s/resource0", p->path);
    fd = open(path, O_RDWR | O_SYNC);
    if (fd < 0)
        fail("%s: open %s: %s", p->name, path, strerror(errno));
    if (fstat(fd, &st))
        fail("%s: stat %s: %s", p->name, path, strerror(errno));
    size = st.st_size;
    if (size < (off_t)PAGE)
        fail("%s: BAR0 is %lld bytes", p->name, (long long)size);
    m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        fail("%s: mmap BAR0: %s", p->name, strerror(errno));
    close(fd);
    p->bar0 = m;
    p->bar0_size = size;
}

static uint32_t rd32(const struct pcidev *p, unsigned off)
{
    return *(volatile uint32_t *)(p->bar0 + off);
}

static uint64_t rd64(const struct pcidev *p, unsigned off)
{
    return *(volatile uint64_t *)(p->bar0 + off);
}

static void wr64(const struct pcidev *p, unsigned off, uint64_t v)
{
    __sync_synchronize();
    *(volatile uint64_t *)(p->bar0 + off) = v;
    __sync_synchronize();
}

/* ---- guest-physical memory ------------------------------------------ */

struct page {
    volatile uint8_t *va;
    uint64_t gpa;
};

static uint64_t virt_to_gpa(const volatile void *va)
{
    uint64_t entry;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    off_t off = (off_t)((uintptr_t)va / PAGE) * 8;

    if (fd < 0 || pread(fd, &entry, 8, off) != 8)
        fail("pagemap: %s", strerror(errno));
    close(fd);
    if (!(entry & (1ull << 63)))
        fail("page %p not present", (const void *)va);
    if (!(entry & ((1ull << 55) - 1)))
        fail("pagemap gives PFN 0 (not root?)");
    return (entry & ((1ull << 55) - 1)) * PAGE + (uintptr_t)va % PAGE;
}

static struct page pool[POOL_PAGES];

static void alloc_pool(void)
{
    uint8_t *m = mmap(NULL, POOL_PAGES * PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    int i;

    if (m == MAP_FAILED)
        fail("mmap pool: %s", strerror(errno));
    /* Separate 4 KiB pages (no THP), resident and pinned in place. */
    madvise(m, POOL_PAGES * PAGE, MADV_NOHUGEPAGE);
    if (mlock(m, POOL_PAGES * PAGE))
        fail("mlock: %s", strerror(errno));
    for (i = 0; i < POOL_PAGES; i++) {
        pool[i].va = m + (size_t)i * PAGE;
        memset((void *)pool[i].va, 0, PAGE);
        pool[i].gpa = virt_to_gpa(pool[i].va);
    }
}

/* A pool page from index `from` on that edu could reach by identity (GPA
 * below 2^28) and that no IOVA used here covers; NULL if none. */
static struct page *low_page(int from, uint64_t avoid_page)
{
    for (; from < POOL_PAGES; from++) {
        struct page *pg = &pool[from];

        if (pg->gpa <= EDU_DMA_MASK - PAGE && pg->gpa != avoid_page &&
            (pg->gpa + PAGE <= SRC_IOVA || pg->gpa >= SRC_IOVA + 4 * IOVA_STEP))
            return pg;
    }
    return NULL;
}

/* ---- pvdma requests -------------------------------------------------- */

static struct pcidev pvdma, edu;
static struct page *req_page;

struct result {
    uint32_t status;
    uint64_t iova, length, result;
};

static struct result request(uint16_t op, uint16_t flags, uint32_t rid,
                             uint64_t iova, uint64_t length,
                             const struct pvdma_seg *segs, uint32_t nr_segs)
{
    volatile struct pvdma_req *r = (volatile struct pvdma_req *)req_page->va;
    struct result out;
    uint32_t i, last;

    memset((void *)r, 0, PVDMA_REQ_HEADER_SIZE + PVDMA_SEG_SIZE * nr_segs);
    r->op = op;
    r->flags = flags;
    r->status = 0xdeadbeef;
    r->requester = rid;
    r->nr_segs = nr_segs;
    r->iova = iova;
    r->length = length;
    for (i = 0; i < nr_segs; i++) {
        r->segs[i].gpa = segs[i].gpa;
        r->segs[i].len = segs[i].len;
    }
    wr64(&pvdma, PVDMA_REG_DOORBELL, req_page->gpa);
    out.status = r->status;
    out.iova = r->iova;
    out.length = r->length;
    out.result = r->result;
    last = rd32(&pvdma, PVDMA_REG_LAST_STATUS);
    if (last != out.status)
        fail("LAST_STATUS %u differs from the written-back status 0x%x",
             last, out.status);
    return out;
}

/* ---- the hypercall from CPL 3 ----------------------------------------- */

/* AMD (and Hygon) CPUs take VMMCALL, the others VMCALL. */
static int cpu_is_amd(char vendor[13])
{
    unsigned a, b, c, d;

    __cpuid(0, a, b, c, d);
    memcpy(vendor, &b, 4);
    memcpy(vendor + 4, &d, 4);
    memcpy(vendor + 8, &c, 4);
    vendor[12] = 0;
    return !strcmp(vendor, "AuthenticAMD") || !strcmp(vendor, "HygonGenuine");
}

/* Runs the hypercall from userspace in a child (a #UD there kills only the
 * child), with RAX = nr and RBX = the request page's GPA; the block is a
 * QUERY of rid. Returns the child's RAX; the block must stay untouched. */
static void hypercall_from_cpl3(uint32_t nr, uint32_t rid)
{
    volatile struct pvdma_req *r = (volatile struct pvdma_req *)req_page->va;
    char vendor[13];
    int amd = cpu_is_amd(vendor), fds[2], wst;
    uint64_t rax = 0;
    pid_t pid;

    memset((void *)r, 0, PVDMA_REQ_HEADER_SIZE);
    r->op = PVDMA_OP_QUERY;
    r->status = 0xdeadbeef;
    r->requester = rid;
    r->result = 0x1234567887654321ull;
    if (pipe(fds))
        fail("pipe: %s", strerror(errno));
    pid = fork();
    if (pid < 0)
        fail("fork: %s", strerror(errno));
    if (pid == 0) {
        uint64_t v = nr;

        if (amd)
            __asm__ volatile("vmmcall" : "+a"(v) : "b"(req_page->gpa) : "memory");
        else
            __asm__ volatile("vmcall" : "+a"(v) : "b"(req_page->gpa) : "memory");
        (void)!write(fds[1], &v, sizeof(v));
        _exit(0);
    }
    close(fds[1]);
    if (read(fds[0], &rax, sizeof(rax)) != sizeof(rax))
        rax = 0;
    close(fds[0]);
    if (waitpid(pid, &wst, 0) != pid)
        fail("waitpid: %s", strerror(errno));
    if (WIFSIGNALED(wst))
        fail("%s from CPL 3 killed the child with signal %d (%s)",
             amd ? "VMMCALL" : "VMCALL", WTERMSIG(wst), strsignal(WTERMSIG(wst)));
    printf("  CPU vendor %s: %s from CPL 3, RAX = HYPERCALL_NR 0x%x, RBX = gpa 0x%"
           PRIx64 " -> RAX 0x%" PRIx64 "\n", vendor, amd ? "VMMCALL" : "VMCALL",
           nr, req_page->gpa, rax);
    CHECK(rax == (uint64_t)PVDMA_HC_EPERM, "CPL 3 hypercall returns -1 (RAX 0x%"
          PRIx64 ")", rax);
    CHECK(r->status == 0xdeadbeef && r->result == 0x1234567887654321ull,
          "request block untouched (status 0x%x)", r->status);
}

/* ---- edu ------------------------------------------------------------- */

static void edu_dma(int to_ram, uint64_t addr, uint64_t count)
{
    struct timespec t0, t;

    wr64(&edu, EDU_DMA_SRC, to_ram ? EDU_BUF : addr);
    wr64(&edu, EDU_DMA_DST, to_ram ? addr : EDU_BUF);
    wr64(&edu, EDU_DMA_CNT, count);
    wr64(&edu, EDU_DMA_CMD, EDU_CMD_START | (to_ram ? EDU_CMD_TO_RAM : 0));
    /* edu starts the copy 100 ms (virtual clock) after the command. */
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (rd64(&edu, EDU_DMA_CMD) & EDU_CMD_START) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec > 10)
            fail("edu DMA never finished");
        usleep(5000);
    }
}

static void pause_for_host(const char *tag)
{
    struct pollfd pfd = { .fd = 0, .events = POLLIN };
    char line[64];

    printf("PVDMA-GUEST-DEMO: PAUSE %s\n", tag);
    fflush(stdout);
    if (poll(&pfd, 1, PAUSE_SECONDS * 1000) > 0)
        (void)!read(0, line, sizeof(line));
}

static int all_bytes(const volatile uint8_t *p, uint8_t v, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (p[i] != v)
            return 0;
    return 1;
}

int main(void)
{
    static const char message[] =
        "pvdma guest demo: RAM -> edu -> RAM through IOVAs, from userspace. ";
    struct page *src, *dst, *canary, *low;
    struct pvdma_seg seg;
    struct result r;
    uint64_t features, faults, dst_iova, bad_iova, src_iova = SRC_IOVA;
    uint32_t rid, iova_bits;
    int next = 0;
    size_t i;

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (geteuid() != 0)
        fail("must run as root (pagemap PFNs, sysfs config writes)");

    step("PCI functions (sysfs)");
    if (!find_pci(PVDMA_PCI_VENDOR_ID, PVDMA_PCI_DEVICE_ID, &pvdma))
        fail("no pvdma (1b36:0015) in /sys/bus/pci/devices");
    ok("pvdma 1b36:0015 at %s", pvdma.name);
    if (!find_pci(EDU_VENDOR, EDU_DEVICE, &edu))
        fail("no edu (1234:11e8) in /sys/bus/pci/devices");
    rid = requester_id(&edu);
    ok("edu 1234:11e8 at %s, requester ID 0x%04x", edu.name, rid);
    pci_enable(&pvdma);
    pci_enable(&edu);
    map_bar0(&pvdma);
    map_bar0(&edu);
    ok("BAR0s mapped through resource0 (pvdma %zu bytes, edu %zu bytes)",
       pvdma.bar0_size, edu.bar0_size);

    step("pvdma registers");
    CHECK(rd32(&pvdma, PVDMA_REG_MAGIC) == PVDMA_MAGIC,
          "MAGIC 0x%08x ('PDMA')", rd32(&pvdma, PVDMA_REG_MAGIC));
    CHECK(rd32(&pvdma, PVDMA_REG_VERSION) == PVDMA_VERSION,
          "VERSION %u", rd32(&pvdma, PVDMA_REG_VERSION));
    features = rd64(&pvdma, PVDMA_REG_FEATURES);
    CHECK(!(features & ~(PVDMA_FEATURE_HYPERCALL | PVDMA_FEATURE_HOST_IOVA |
                         PVDMA_FEATURE_BYPASS | PVDMA_FEATURE_UNMAP_LIST |
                         PVDMA_FEATURE_QUEUE)),
          "FEATURES 0x%" PRIx64 " (HYPERCALL %d, HOST_IOVA %d, BYPASS %d, "
          "UNMAP_LIST %d, QUEUE %d)",
          features, !!(features & PVDMA_FEATURE_HYPERCALL),
          !!(features & PVDMA_FEATURE_HOST_IOVA),
          !!(features & PVDMA_FEATURE_BYPASS),
          !!(features & PVDMA_FEATURE_UNMAP_LIST),
          !!(features & PVDMA_FEATURE_QUEUE));
    /* QUEUES: at least 1 with FEATURES.QUEUE, else 0 (ABI section 1). */
    CHECK(!!(features & PVDMA_FEATURE_QUEUE) ==
          (rd32(&pvdma, PVDMA_REG_QUEUES) > 0),
          "QUEUES %u", rd32(&pvdma, PVDMA_REG_QUEUES));
    iova_bits = rd32(&pvdma, PVDMA_REG_IOVA_BITS);
    printf("  IOVA_BITS %u  MAX_SEGS %u  PAGE_SIZES 0x%" PRIx64
           "  HYPERCALL_NR 0x%x  FAULTS %" PRIu64 "\n", iova_bits,
           rd32(&pvdma, PVDMA_REG_MAX_SEGS), rd64(&pvdma, PVDMA_REG_PAGE_SIZES),
           rd32(&pvdma, PVDMA_REG_HYPERCALL_NR), rd64(&pvdma, PVDMA_REG_FAULTS));
    CHECK(iova_bits >= 29, "IOVA_BITS %u covers edu's 28-bit DMA addresses",
          iova_bits);

    step("guest memory (mmap + mlock + /proc/self/pagemap)");
    alloc_pool();
    req_page = &pool[next++];
    src = &pool[next++];
    dst = &pool[next++];
    canary = &pool[next++];
    printf("  request block gpa 0x%" PRIx64 ", src gpa 0x%" PRIx64
           ", dst gpa 0x%" PRIx64 ", canary gpa 0x%" PRIx64 "\n",
           req_page->gpa, src->gpa, dst->gpa, canary->gpa);
    for (i = 0; i < PAGE; i++)
        src->va[i] = message[i % (sizeof(message) - 1)];
    memset((void *)dst->va, 0, PAGE);
    memset((void *)canary->va, 0xcc, PAGE);
    CHECK(src_iova != src->gpa, "src IOVA 0x%" PRIx64 " differs from its gpa",
          src_iova);

    step("hypercall from userspace (CPL 3)");
    if (features & PVDMA_FEATURE_HYPERCALL)
        hypercall_from_cpl3(rd32(&pvdma, PVDMA_REG_HYPERCALL_NR), rid);
    else
        printf("  skipped: FEATURES.HYPERCALL is clear (the call would #UD)\n");

    step("requests through the doorbell");
    r = request(PVDMA_OP_QUERY, 0, rid, 0, 0, NULL, 0);
    printf("  QUERY edu -> %s, result 0x%" PRIx64 "\n", status_name(r.status),
           r.result);
    CHECK(r.status == PVDMA_S_OK && !(r.result & PVDMA_QUERY_ATTACHED),
          "edu is an endpoint behind pvdma, not attached");
    r = request(PVDMA_OP_QUERY, 0, requester_id(&pvdma), 0, 0, NULL, 0);
    CHECK(r.status == PVDMA_S_NODEV, "QUERY of pvdma itself -> %s",
          status_name(r.status));

    r = request(PVDMA_OP_ATTACH, 0, rid, 0, 0, NULL, 0);
    CHECK(r.status == PVDMA_S_OK, "ATTACH edu -> %s", status_name(r.status));
    r = request(PVDMA_OP_ATTACH, 0, rid, 0, 0, NULL, 0);
    CHECK(r.status == PVDMA_S_STATE, "second ATTACH -> %s",
          status_name(r.status));
    r = request(PVDMA_OP_QUERY, 0, rid, 0, 0, NULL, 0);
    CHECK(r.status == PVDMA_S_OK && r.result == PVDMA_QUERY_ATTACHED,
          "QUERY edu -> result 0x%" PRIx64 " (attached, translating)", r.result);

    seg.gpa = src->gpa;
    seg.len = PAGE;
    r = request(PVDMA_OP_MAP, PVDMA_FLAG_READ | PVDMA_FLAG_FIXED, rid,
                src_iova, 0, &seg, 1);
    printf("  MAP READ FIXED gpa 0x%" PRIx64 " at IOVA 0x%" PRIx64
           " -> %s, iova 0x%" PRIx64 " length 0x%" PRIx64 "\n", src->gpa,
           src_iova, status_name(r.status), r.iova, r.length);
    CHECK(r.status == PVDMA_S_OK && r.iova == src_iova && r.length == PAGE,
          "src mapped at the IOVA the guest chose");
    r = request(PVDMA_OP_MAP, PVDMA_FLAG_READ | PVDMA_FLAG_FIXED, rid,
                src_iova, 0, &seg, 1);
    CHECK(r.status == PVDMA_S_EXIST, "the same FIXED IOVA again -> %s",
          status_name(r.status));

    seg.gpa = dst->gpa;
    if (features & PVDMA_FEATURE_HOST_IOVA) {
        r = request(PVDMA_OP_MAP, PVDMA_FLAG_WRITE, rid, 0, 0, &seg, 1);
        printf("  MAP WRITE gpa 0x%" PRIx64 ", host's choice -> %s, iova 0x%"
               PRIx64 " length 0x%" PRIx64 "\n", dst->gpa,
               status_name(r.status), r.iova, r.length);
        CHECK(r.status == PVDMA_S_OK && r.length == PAGE && r.iova != 0 &&
              r.iova % PAGE == 0 && r.iova != src_iova,
              "dst mapped at host-chosen IOVA 0x%" PRIx64, r.iova);
        dst_iova = r.iova;
        if (dst_iova > EDU_DMA_MASK - PAGE)
            fail("host-chosen IOVA 0x%" PRIx64 " is beyond edu's 28 bits",
                 dst_iova);
    } else {
        dst_iova = SRC_IOVA + IOVA_STEP;
        r = request(PVDMA_OP_MAP, PVDMA_FLAG_WRITE | PVDMA_FLAG_FIXED, rid,
                    dst_iova, 0, &seg, 1);
        CHECK(r.status == PVDMA_S_OK && r.iova == dst_iova,
              "no HOST_IOVA: dst mapped FIXED at 0x%" PRIx64 " -> %s",
              dst_iova, status_name(r.status));
    }
    CHECK(dst_iova != dst->gpa, "dst IOVA 0x%" PRIx64 " differs from its gpa",
          dst_iova);

    step("edu DMA through pvdma");
    faults = rd64(&pvdma, PVDMA_REG_FAULTS);
    edu_dma(0, src_iova, PAGE);
    printf("  edu read 4 KiB from IOVA 0x%" PRIx64 " into its buffer\n", src_iova);
    edu_dma(1, dst_iova, PAGE);
    printf("  edu wrote 4 KiB to IOVA 0x%" PRIx64 "\n", dst_iova);
    printf("  dst page (gpa 0x%" PRIx64 ") now starts: \"%.*s\"\n", dst->gpa,
           (int)sizeof(message) - 2, (const char *)dst->va);
    CHECK(memcmp((const void *)dst->va, (const void *)src->va, PAGE) == 0,
          "4096 bytes went RAM -> edu -> RAM through two IOVAs");
    CHECK(rd64(&pvdma, PVDMA_REG_FAULTS) == faults, "FAULTS unchanged (%" PRIu64
          ")", faults);

    step("edu DMA to an unmapped IOVA");
    /* Best: a page of ours whose gpa edu can name, used as the IOVA: were
     * the DMA not translated, it would land there by identity. The kernel
     * hands out high pages first, so with 512 MiB there may be none below
     * 256 MiB; then an unmapped IOVA in the demo's range, and the check is
     * that none of our pages changed. */
    if ((low = low_page(next, dst_iova))) {
        canary = low;
        memset((void *)canary->va, 0xcc, PAGE);
        bad_iova = canary->gpa;
    } else {
        bad_iova = SRC_IOVA + 2 * IOVA_STEP;
    }
    faults = rd64(&pvdma, PVDMA_REG_FAULTS);
    memset((void *)dst->va, 0x5a, PAGE);
    edu_dma(1, bad_iova, 64);
    printf("  edu wrote 64 bytes to unmapped IOVA 0x%" PRIx64 "%s;"
           " FAULTS %" PRIu64 " -> %" PRIu64 "\n", bad_iova,
           low ? " (= the canary page's gpa)" : "", faults,
           rd64(&pvdma, PVDMA_REG_FAULTS));
    CHECK(rd64(&pvdma, PVDMA_REG_FAULTS) > faults, "refused: FAULTS grew");
    CHECK(all_bytes(canary->va, 0xcc, PAGE),
          low ? "canary page at gpa == IOVA untouched (no identity fallback)"
              : "canary page untouched (no page of ours below 256 MiB to "
                "test identity with)");
    CHECK(all_bytes(dst->va, 0x5a, PAGE), "mapped dst page untouched");
    faults = rd64(&pvdma, PVDMA_REG_FAULTS);
    memset((void *)src->va, 0x11, PAGE);
    edu_dma(1, src_iova, 64);
    CHECK(rd64(&pvdma, PVDMA_REG_FAULTS) > faults && all_bytes(src->va, 0x11, PAGE),
          "edu write to the READ-only mapping refused, src intact");

    pause_for_host("live");

    step("teardown");
    r = request(PVDMA_OP_UNMAP, 0, rid, src_iova, 0, NULL, 0);
    CHECK(r.status == PVDMA_S_OK && r.result == PAGE,
          "UNMAP IOVA 0x%" PRIx64 " -> %s, %" PRIu64 " bytes freed", src_iova,
          status_name(r.status), r.result);
    r = request(PVDMA_OP_UNMAP, 0, rid, src_iova, 0, NULL, 0);
    CHECK(r.status == PVDMA_S_NOENT, "UNMAP it again -> %s",
          status_name(r.status));
    faults = rd64(&pvdma, PVDMA_REG_FAULTS);
    edu_dma(0, src_iova, 64);
    CHECK(rd64(&pvdma, PVDMA_REG_FAULTS) > faults,
          "edu read from the unmapped IOVA refused (FAULTS %" PRIu64 ")",
          rd64(&pvdma, PVDMA_REG_FAULTS));
    r = request(PVDMA_OP_DETACH, 0, rid, 0, 0, NULL, 0);
    CHECK(r.status == PVDMA_S_OK && r.result == 1,
          "DETACH edu -> %s, %" PRIu64 " mapping removed", status_name(r.status),
          r.result);
    r = request(PVDMA_OP_DETACH, 0, rid, 0, 0, NULL, 0);
    CHECK(r.status == PVDMA_S_STATE, "second DETACH -> %s",
          status_name(r.status));
    r = request(PVDMA_OP_QUERY, 0, rid, 0, 0, NULL, 0);
    CHECK(r.status == PVDMA_S_OK && !(r.result & PVDMA_QUERY_ATTACHED),
          "QUERY edu -> result 0x%" PRIx64 " (detached)", r.result);

    printf("\npvdma-guest-test: PASS (FAULTS %" PRIu64 ")\n",
           rd64(&pvdma, PVDMA_REG_FAULTS));
    return 0;
}
