// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
/*
 * pvdma-io: disk and network I/O checks and benchmarks for the I/O guest
 * (guest/io/init), built static on the host:
 *
 *   gcc -static -O2 -Wall -Wextra -Werror -pthread -o pvdma-io pvdma-io.c
 *
 * pvdma-io disk-verify DEV [MiB]
 *     Writes an offset-dependent pattern with O_DIRECT in 4 KiB, 128 KiB and
 *     1 MiB blocks, reads it back with O_DIRECT in another block size and
 *     compares; then the same with JOBS=4 threads on disjoint stripes.
 *     Every 8-byte word holds its own byte offset and the pass number, so a
 *     block landing in the wrong place (or a stale one) names where it came
 *     from. Exit status 1 on a mismatch or an I/O error.
 * pvdma-io disk-stress DEV SECONDS [JOBS] [MiB]
 *     JOBS threads (default 4), each on its own stripe of the first MiB
 *     (default 8) of the disk: first writes its stripe, then for SECONDS
 *     mixes O_DIRECT writes (4-128 KiB, at random 4 KiB-aligned places,
 *     buffers at a 0 or 512-byte skew) with reads of random ranges that are
 *     checked against what the thread last wrote there (every 8-byte word
 *     holds its offset and the generation of the write that put it there),
 *     and an fdatasync every 64 writes; at the end reads the whole stripe
 *     back and checks every byte. So JOBS requests are in flight all the
 *     time, and a write lost, done twice out of order, or a read served
 *     stale shows as a wrong word. Prints a progress line every 2 s and
 *     RESULT stress dev=.. jobs=.. secs=F ios=N writes=N reads=N flushes=N
 *         bytes_written=N bytes_verified=N max_wait=F
 *     (max_wait: the longest single request, seconds). Exit status 1 on a
 *     mismatch or an I/O error.
 * pvdma-io disk-bench DEV seq|rand BS JOBS SECONDS
 *     O_DIRECT reads by JOBS threads for SECONDS (seq: a stripe of the
 *     disk each; rand: anywhere, block-aligned); prints
 *     RESULT disk dev=.. mode=.. bs=.. jobs=.. ios=N bytes=N secs=F iops=F mbps=F
 * pvdma-io net-verify IF_A IF_B [N]
 *     Sends N (default 2000) full-size raw frames (ethertype 0x88b5, 1500
 *     bytes of payload) on IF_A to IF_B's MAC and receives them on IF_B:
 *     every frame must arrive once, in order, with its payload intact.
 * pvdma-io net-bench IF_A IF_B SECONDS
 *     The same, as fast as a window of frames in flight allows, for
 *     SECONDS; prints
 *     RESULT net frames=N bytes=N lost=N secs=F fps=F mbps=F
 *
 * mbps is 10^6 bytes per second in both RESULT lines (bytes= counts disk
 * data, or Ethernet payload bytes received). Benchmarks print
 * `PVDMA-IO: MARK begin:<what>` right before the timed part and
 * `PVDMA-IO: MARK end:<what>` right after it (what: disk-DEV-MODE-BS-JOBS,
 * e.g. disk-vda-rand-4096-2, or net-1500), for the host to read QEMU's
 * CPU time at both. Nothing waits without a timeout: every network wait is
 * a poll() against a deadline.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define KiB 1024UL
#define MiB (1024UL * 1024UL)

static const char *prog = "pvdma-io";

static void die(const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);
	fprintf(stderr, "%s: FAIL: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void mark(const char *what, const char *name)
{
	printf("PVDMA-IO: MARK %s:%s\n", what, name);
	fflush(stdout);
}

static unsigned long parse_ulong(const char *s, const char *what)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || end == s)
		die("bad %s '%s'", what, s);
	if (*end == 'k' || *end == 'K')
		v *= KiB, end++;
	else if (*end == 'm' || *end == 'M')
		v *= MiB, end++;
	if (*end)
		die("bad %s '%s'", what, s);
	return v;
}

static void *xalloc_aligned(size_t size)
{
	void *p;

	if (posix_memalign(&p, 4096, size))
		die("out of memory (%zu bytes)", size);
	return p;
}

/* --- disk ---------------------------------------------------------------- */

/* The word at byte offset off of pass gen: 0xa5, gen, 48 bits of offset. */
static inline uint64_t disk_word(uint64_t off, unsigned gen)
{
	return 0xa5ULL << 56 | (uint64_t)(gen & 0xff) << 48 |
	       (off & 0xffffffffffffULL);
}

static void disk_fill(uint64_t *buf, uint64_t off, size_t len, unsigned gen)
{
	for (size_t i = 0; i < len / 8; i++)
		buf[i] = disk_word(off + i * 8, gen);
}

/* 0, or 1 after printing where the first wrong word of buf is. */
static int disk_check(const char *dev, const uint64_t *buf, uint64_t off,
		      size_t len, unsigned gen)
{
	for (size_t i = 0; i < len / 8; i++) {
		uint64_t want = disk_word(off + i * 8, gen), got = buf[i];

		if (got == want)
			continue;
		fflush(stdout);
		fprintf(stderr,
			"%s: %s: mismatch at byte 0x%" PRIx64 " (pass %u): "
			"expected 0x%016" PRIx64 ", got 0x%016" PRIx64,
			prog, dev, off + i * 8, gen, want, got);
		if (got >> 56 == 0xa5)
			fprintf(stderr, " = the word of offset 0x%" PRIx64
				" of pass %u", (uint64_t)(got & 0xffffffffffffULL),
				(unsigned)(got >> 48 & 0xff));
		fputc('\n', stderr);
		return 1;
	}
	return 0;
}

static void xpio(int write, int fd, const char *dev, void *buf, size_t len,
		 uint64_t off)
{
	ssize_t n = write ? pwrite(fd, buf, len, off) : pread(fd, buf, len, off);

	if (n < 0)
		die("%s: %s of %zu bytes at 0x%" PRIx64 ": %s", dev,
		    write ? "write" : "read", len, off, strerror(errno));
	if ((size_t)n != len)
		die("%s: short %s at 0x%" PRIx64 ": %zd of %zu bytes", dev,
		    write ? "write" : "read", off, n, len);
}

static int open_direct(const char *dev, int flags, uint64_t *size)
{
	int fd = open(dev, flags | O_DIRECT);

	if (fd < 0)
		die("open %s (O_DIRECT): %s", dev, strerror(errno));
	if (size) {
		struct stat st;

		/* A regular file works too (for trying it on the host). */
		if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
			*size = st.st_size;
		else if (ioctl(fd, BLKGETSIZE64, size) < 0)
			die("%s: BLKGETSIZE64: %s", dev, strerror(errno));
	}
	return fd;
}

/*
 * One pass: write [start, start + len) in wbs blocks, read it back in rbs
 * blocks; buffers start `skew` bytes into a page, so transfers straddle
 * page boundaries (a scatter-gather list the IOMMU maps in pieces).
 */
static int disk_pass(const char *dev, int fd, uint64_t start, uint64_t len,
		     size_t wbs, size_t rbs, size_t skew, unsigned gen)
{
	size_t max = wbs > rbs ? wbs : rbs;
	char *mem = xalloc_aligned(max + 4096);
	uint64_t *buf = (uint64_t *)(mem + skew);
	int bad = 0;

	for (uint64_t off = start; off < start + len; off += wbs) {
		disk_fill(buf, off, wbs, gen);
		xpio(1, fd, dev, buf, wbs, off);
	}
	if (fdatasync(fd) < 0)
		die("%s: fdatasync: %s", dev, strerror(errno));
	for (uint64_t off = start; off < start + len && !bad; off += rbs) {
		memset(buf, 0, rbs);
		xpio(0, fd, dev, buf, rbs, off);
		bad = disk_check(dev, buf, off, rbs, gen);
	}
	free(mem);
	return bad;
}

struct stripe {
	const char *dev;
	int fd;
	uint64_t start, len;
	unsigned gen;
	int bad;
};

static void *stripe_thread(void *arg)
{
	struct stripe *s = arg;

	/* 64 KiB writes, 4 KiB reads at a 512-byte skew. */
	s->bad = disk_pass(s->dev, s->fd, s->start, s->len, 64 * KiB, 4 * KiB,
			   512, s->gen);
	return NULL;
}

static int disk_verify(int argc, char **argv)
{
	static const struct {
		size_t wbs, rbs, skew;
	} passes[] = {
		{ 4 * KiB, 128 * KiB, 0 },
		{ 128 * KiB, 1 * MiB, 512 },
		{ 1 * MiB, 4 * KiB, 0 },
		{ 4 * KiB, 4 * KiB, 512 },
	};
	const char *dev;
	uint64_t size, len;
	unsigned gen = 0;
	int fd, bad = 0;
	double t0 = now();

	if (argc < 1 || argc > 2)
		die("usage: disk-verify DEV [MiB]");
	dev = argv[0];
	fd = open_direct(dev, O_RDWR, &size);
	len = argc > 1 ? parse_ulong(argv[1], "MiB") * MiB : 16 * MiB;
	if (len > size)
		len = size & ~(MiB - 1);
	if (len < MiB)
		die("%s: %" PRIu64 " bytes is too small", dev, size);
	/* A run's passes differ from the last run's (the disk keeps data). */
	gen = (unsigned)(time(NULL) & 0x3f) << 2;
	for (size_t i = 0; i < sizeof(passes) / sizeof(passes[0]); i++) {
		gen++;
		bad = disk_pass(dev, fd, 0, len, passes[i].wbs, passes[i].rbs,
				passes[i].skew, gen);
		if (bad)
			die("%s: pass %zu (write %zu, read %zu, skew %zu) read "
			    "back wrong data", dev, i, passes[i].wbs,
			    passes[i].rbs, passes[i].skew);
		printf("ok: %s: %" PRIu64 " MiB written in %zu-byte blocks, "
		       "read back in %zu-byte blocks (buffer skew %zu)\n",
		       dev, len / MiB, passes[i].wbs, passes[i].rbs,
		       passes[i].skew);
	}
	/* Concurrent: 4 threads, one stripe each, each with its own fd. */
	{
		enum { JOBS = 4 };
		struct stripe s[JOBS];
		pthread_t t[JOBS];

		gen++;
		for (int j = 0; j < JOBS; j++) {
			s[j] = (struct stripe){ dev, open_direct(dev, O_RDWR, NULL),
						j * (len / JOBS), len / JOBS, gen, 0 };
			if (pthread_create(&t[j], NULL, stripe_thread, &s[j]))
				die("pthread_create");
		}
		for (int j = 0; j < JOBS; j++) {
			pthread_join(t[j], NULL);
			close(s[j].fd);
			bad |= s[j].bad;
		}
		if (bad)
			die("%s: concurrent pass read back wrong data", dev);
		printf("ok: %s: %d threads on disjoint stripes, 64 KiB writes, "
		       "4 KiB reads\n", dev, JOBS);
	}
	close(fd);
	printf("%s: disk-verify %s PASS (%" PRIu64 " MiB, %.2f s)\n", prog,
	       dev, len / MiB, now() - t0);
	return 0;
}

struct bench_job {
	const char *dev;
	int rand;
	size_t bs;
	uint64_t size, start, span;
	double deadline;
	unsigned seed;
	uint64_t ios, bytes;
};

static void *bench_thread(void *arg)
{
	struct bench_job *b = arg;
	int fd = open_direct(b->dev, O_RDONLY, NULL);
	char *buf = xalloc_aligned(b->bs);
	uint64_t blocks = b->span / b->bs, pos = 0, x = b->seed | 1;

	while (now() < b->deadline) {
		uint64_t off;

		for (int k = 0; k < 8; k++) {
			if (b->rand) {
				x ^= x << 13, x ^= x >> 7, x ^= x << 17;
				off = b->start + (x % blocks) * b->bs;
			} else {
				off = b->start + pos * b->bs;
				pos = (pos + 1) % blocks;
			}
			xpio(0, fd, b->dev, buf, b->bs, off);
			b->ios++;
			b->bytes += b->bs;
		}
	}
	free(buf);
	close(fd);
	return NULL;
}

static int disk_bench(int argc, char **argv)
{
	const char *dev, *mode;
	size_t bs;
	unsigned long jobs;
	double secs, t0, t1;
	uint64_t size, ios = 0, bytes = 0;
	struct bench_job *b;
	pthread_t *t;
	char name[128];
	int fd;

	if (argc != 5)
		die("usage: disk-bench DEV seq|rand BS JOBS SECONDS");
	dev = argv[0];
	mode = argv[1];
	if (strcmp(mode, "seq") && strcmp(mode, "rand"))
		die("mode must be seq or rand, not '%s'", mode);
	bs = parse_ulong(argv[2], "block size");
	jobs = parse_ulong(argv[3], "jobs");
	secs = atof(argv[4]);
	if (bs < 512 || bs % 512 || bs > 64 * MiB || jobs < 1 || jobs > 64 ||
	    !(secs > 0 && secs <= 3600))
		die("bad arguments");
	fd = open_direct(dev, O_RDONLY, &size);
	close(fd);
	if (size / jobs < bs)
		die("%s: too small for %lu jobs of %zu-byte reads", dev, jobs, bs);
	b = calloc(jobs, sizeof(*b));
	t = calloc(jobs, sizeof(*t));
	if (!b || !t)
		die("out of memory");
	snprintf(name, sizeof(name), "disk-%s-%s-%zu-%lu",
		 strrchr(dev, '/') ? strrchr(dev, '/') + 1 : dev, mode, bs, jobs);
	mark("begin", name);
	t0 = now();
	for (unsigned long j = 0; j < jobs; j++) {
		/* seq: a stripe each; rand: the whole device each. */
		uint64_t span = !strcmp(mode, "seq") ? size / jobs : size;

		b[j] = (struct bench_job){ dev, !strcmp(mode, "rand"), bs, size,
			!strcmp(mode, "seq") ? j * (size / jobs) : 0,
			span - span % bs, t0 + secs, 0x9e3779b9u * (j + 1), 0, 0 };
		if (pthread_create(&t[j], NULL, bench_thread, &b[j]))
			die("pthread_create");
	}
	for (unsigned long j = 0; j < jobs; j++) {
		pthread_join(t[j], NULL);
		ios += b[j].ios;
		bytes += b[j].bytes;
	}
	t1 = now();
	mark("end", name);
	printf("RESULT disk dev=%s mode=%s bs=%zu jobs=%lu ios=%" PRIu64
	       " bytes=%" PRIu64 " secs=%.3f iops=%.1f mbps=%.2f\n",
	       strrchr(dev, '/') ? strrchr(dev, '/') + 1 : dev,
	       mode, bs, jobs, ios, bytes, t1 - t0, ios / (t1 - t0),
	       bytes / (t1 - t0) / 1e6);
	free(b);
	free(t);
	return 0;
}

/* --- disk-stress ---------------------------------------------------------- */

/*
 * A word of disk-stress: 0x5c, 16 bits of the write's generation, 40 bits
 * of byte offset (disks up to 1 TiB).
 */
static inline uint64_t stress_word(uint64_t off, uint32_t gen)
{
	return 0x5cULL << 56 | (uint64_t)(gen & 0xffff) << 40 |
	       (off & 0xffffffffffULL);
}

#define STRESS_UNIT (4 * KiB)
#define STRESS_MAX (128 * KiB)

struct stress_job {
	const char *dev;
	int id, fd;
	uint64_t start, len;
	double deadline;
	uint32_t *gen;		/* generation of each 4 KiB unit of the stripe */
	uint32_t next_gen;
	uint64_t x;		/* xorshift state */
	atomic_ullong ios, writes, reads, flushes, bytes_written, bytes_verified;
	double max_wait;
};

static uint64_t stress_rand(struct stress_job *j)
{
	j->x ^= j->x << 13, j->x ^= j->x >> 7, j->x ^= j->x << 17;
	return j->x;
}

static void stress_io(struct stress_job *j, int write, void *buf, size_t len,
		      uint64_t off)
{
	double t = now();

	xpio(write, j->fd, j->dev, buf, len, off);
	t = now() - t;
	if (t > j->max_wait)
		j->max_wait = t;
	atomic_fetch_add(&j->ios, 1);
}

static void stress_write(struct stress_job *j, char *buf, uint64_t rel,
			 size_t len)
{
	uint64_t *w = (uint64_t *)buf;
	uint32_t gen = ++j->next_gen;

	for (size_t i = 0; i < len / 8; i++)
		w[i] = stress_word(j->start + rel + i * 8, gen);
	stress_io(j, 1, buf, len, j->start + rel);
	for (size_t u = 0; u < len / STRESS_UNIT; u++)
		j->gen[rel / STRESS_UNIT + u] = gen;
	atomic_fetch_add(&j->writes, 1);
	atomic_fetch_add(&j->bytes_written, len);
}

/* Reads [rel, rel + len) of the stripe and checks every word. */
static void stress_read(struct stress_job *j, char *buf, uint64_t rel,
			size_t len)
{
	const uint64_t *w = (const uint64_t *)buf;

	memset(buf, 0, len);
	stress_io(j, 0, buf, len, j->start + rel);
	for (size_t i = 0; i < len / 8; i++) {
		uint64_t off = j->start + rel + i * 8;
		uint32_t gen = j->gen[(rel + i * 8) / STRESS_UNIT];
		uint64_t want = stress_word(off, gen), got = w[i];

		if (got == want)
			continue;
		fflush(stdout);
		fprintf(stderr, "%s: %s: disk-stress job %d: mismatch at byte "
			"0x%" PRIx64 ": expected 0x%016" PRIx64 " (generation "
			"%u), got 0x%016" PRIx64, prog, j->dev, j->id, off, want,
			gen & 0xffff, got);
		if (got >> 56 == 0x5c)
			fprintf(stderr, " = the word of offset 0x%" PRIx64
				" of generation %u", (uint64_t)(got & 0xffffffffffULL),
				(unsigned)(got >> 40 & 0xffff));
		fputc('\n', stderr);
		die("%s: disk-stress read back wrong data", j->dev);
	}
	atomic_fetch_add(&j->reads, 1);
	atomic_fetch_add(&j->bytes_verified, len);
}

static void *stress_thread(void *arg)
{
	struct stress_job *j = arg;
	char *mem = xalloc_aligned(STRESS_MAX + 4096);
	uint64_t units = j->len / STRESS_UNIT;
	unsigned since_flush = 0;

	/* The whole stripe first, so that every unit has a known content. */
	for (uint64_t rel = 0; rel < j->len; rel += STRESS_MAX)
		stress_write(j, mem, rel, j->len - rel < STRESS_MAX ?
			     j->len - rel : STRESS_MAX);
	while (now() < j->deadline) {
		uint64_t r = stress_rand(j);
		size_t len = STRESS_UNIT << (r >> 8) % 6;      /* 4..128 KiB */
		uint64_t rel = (r >> 16) % units * STRESS_UNIT;
		char *buf = mem + ((r >> 4) & 1 ? 512 : 0);

		if (len > j->len - rel)
			len = j->len - rel;
		if (r & 1) {
			stress_write(j, buf, rel, len);
			if (++since_flush == 64) {
				since_flush = 0;
				if (fdatasync(j->fd) < 0)
					die("%s: fdatasync: %s", j->dev,
					    strerror(errno));
				atomic_fetch_add(&j->flushes, 1);
			}
		} else {
			stress_read(j, buf, rel, len);
		}
	}
	/* Everything the thread wrote, read back once more. */
	for (uint64_t rel = 0; rel < j->len; rel += STRESS_MAX)
		stress_read(j, mem, rel, j->len - rel < STRESS_MAX ?
			    j->len - rel : STRESS_MAX);
	free(mem);
	return NULL;
}

static int disk_stress(int argc, char **argv)
{
	const char *dev;
	double secs, t0, next;
	unsigned long jobs = 4;
	uint64_t size, len = 8 * MiB, stripe;
	struct stress_job *j;
	pthread_t *t;
	char *joined;
	unsigned long long ios, writes, reads, flushes, bw, bv;
	double max_wait = 0;
	int fd;

	if (argc < 2 || argc > 4)
		die("usage: disk-stress DEV SECONDS [JOBS] [MiB]");
	dev = argv[0];
	secs = atof(argv[1]);
	if (argc > 2)
		jobs = parse_ulong(argv[2], "JOBS");
	if (argc > 3)
		len = parse_ulong(argv[3], "MiB") * MiB;
	if (!(secs > 0 && secs <= 3600) || jobs < 1 || jobs > 64)
		die("bad arguments");
	fd = open_direct(dev, O_RDONLY, &size);
	close(fd);
	if (len > size)
		len = size;
	stripe = len / jobs / STRESS_MAX * STRESS_MAX;
	if (stripe < STRESS_MAX)
		die("%s: %" PRIu64 " bytes is too small for %lu jobs", dev,
		    len, jobs);
	j = calloc(jobs, sizeof(*j));
	t = calloc(jobs, sizeof(*t));
	joined = calloc(jobs, 1);
	if (!j || !t || !joined)
		die("out of memory");
	t0 = now();
	for (unsigned long i = 0; i < jobs; i++) {
		j[i].dev = dev;
		j[i].id = (int)i;
		j[i].fd = open_direct(dev, O_RDWR, NULL);
		j[i].start = i * stripe;
		j[i].len = stripe;
		j[i].deadline = t0 + secs;
		j[i].gen = calloc(stripe / STRESS_UNIT, sizeof(uint32_t));
		/* Generations differ between runs (the disk keeps data). */
		j[i].next_gen = (uint32_t)(time(NULL) & 0xff) << 8;
		j[i].x = 0x9e3779b97f4a7c15ULL * (i + 1) ^ (uint64_t)time(NULL);
		if (!j[i].gen)
			die("out of memory");
		if (pthread_create(&t[i], NULL, stress_thread, &j[i]))
			die("pthread_create");
	}
	/* Progress until every thread is done (they end on their own; a
	 * request that never completes keeps this printing). */
	next = t0 + 2;
	for (unsigned long done = 0; done < jobs;) {
		usleep(100000);
		for (unsigned long i = 0; i < jobs; i++)
			if (!joined[i] && pthread_tryjoin_np(t[i], NULL) == 0)
				joined[i] = 1, done++;
		if (now() >= next) {
			ios = 0;
			for (unsigned long i = 0; i < jobs; i++)
				ios += atomic_load(&j[i].ios);
			printf("stress: %.0f s, %llu requests\n", now() - t0, ios);
			next += 2;
		}
	}
	ios = writes = reads = flushes = bw = bv = 0;
	for (unsigned long i = 0; i < jobs; i++) {
		ios += j[i].ios, writes += j[i].writes, reads += j[i].reads;
		flushes += j[i].flushes, bw += j[i].bytes_written;
		bv += j[i].bytes_verified;
		if (j[i].max_wait > max_wait)
			max_wait = j[i].max_wait;
	}
	printf("RESULT stress dev=%s jobs=%lu secs=%.3f ios=%llu writes=%llu "
	       "reads=%llu flushes=%llu bytes_written=%llu bytes_verified=%llu "
	       "max_wait=%.3f\n", strrchr(dev, '/') ? strrchr(dev, '/') + 1 : dev,
	       jobs, now() - t0, ios, writes, reads, flushes, bw, bv, max_wait);
	printf("%s: disk-stress %s PASS\n", prog, dev);
	for (unsigned long i = 0; i < jobs; i++) {
		close(j[i].fd);
		free(j[i].gen);
	}
	free(j);
	free(t);
	free(joined);
	return 0;
}

/* --- network ------------------------------------------------------------- */

#define NET_ETHERTYPE 0x88b5        /* IEEE 802 local experimental 1 */
#define NET_PAYLOAD 1500
#define NET_MAGIC 0x70766e74u       /* "pvnt" */
#define NET_WINDOW 128              /* frames in flight */

struct net_hdr {
	uint32_t magic, seq, run;
} __attribute__((packed));

struct nic {
	const char *name;
	int ifindex, fd;
	unsigned char mac[ETH_ALEN];
};

/*
 * Until the kernel's link watch has seen the carrier and activated the
 * queueing discipline (operstate "up"), frames sent are dropped by the
 * placeholder one: a NIC just bound (or rebound into an IOMMU domain) is
 * not ready the moment it is up. Waits at most 10 s.
 */
static void nic_wait_up(const char *name)
{
	char path[64], state[16] = "";
	double until = now() + 10.0;

	snprintf(path, sizeof(path), "/sys/class/net/%s/operstate", name);
	while (now() < until) {
		FILE *f = fopen(path, "r");

		if (f) {
			if (!fgets(state, sizeof(state), f))
				state[0] = 0;
			fclose(f);
		}
		if (!strncmp(state, "up", 2))
			return;
		usleep(20000);
	}
	die("%s: operstate is still '%.*s' after 10 s", name,
	    (int)strcspn(state, "\n"), state);
}

static void nic_open(struct nic *n, const char *name)
{
	struct ifreq ifr;
	struct sockaddr_ll sll;
	int s = socket(AF_INET, SOCK_DGRAM, 0);

	if (s < 0)
		die("socket(AF_INET): %s", strerror(errno));
	memset(&ifr, 0, sizeof(ifr));
	n->name = name;
	if (strlen(name) >= IFNAMSIZ)
		die("interface name too long: %s", name);
	strcpy(ifr.ifr_name, name);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		die("%s: SIOCGIFFLAGS: %s", name, strerror(errno));
	if (!(ifr.ifr_flags & IFF_UP)) {
		ifr.ifr_flags |= IFF_UP;
		if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
			die("%s: SIOCSIFFLAGS (up): %s", name, strerror(errno));
	}
	if (ioctl(s, SIOCGIFINDEX, &ifr) < 0)
		die("%s: SIOCGIFINDEX: %s", name, strerror(errno));
	n->ifindex = ifr.ifr_ifindex;
	if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0)
		die("%s: SIOCGIFHWADDR: %s", name, strerror(errno));
	memcpy(n->mac, ifr.ifr_hwaddr.sa_data, ETH_ALEN);
	if (ioctl(s, SIOCGIFMTU, &ifr) < 0)
		die("%s: SIOCGIFMTU: %s", name, strerror(errno));
	if (ifr.ifr_mtu < NET_PAYLOAD)
		die("%s: MTU %d < %d", name, ifr.ifr_mtu, NET_PAYLOAD);
	close(s);
	nic_wait_up(name);

	n->fd = socket(AF_PACKET, SOCK_RAW, htons(NET_ETHERTYPE));
	if (n->fd < 0)
		die("socket(AF_PACKET): %s", strerror(errno));
	memset(&sll, 0, sizeof(sll));
	sll.sll_family = AF_PACKET;
	sll.sll_protocol = htons(NET_ETHERTYPE);
	sll.sll_ifindex = n->ifindex;
	if (bind(n->fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
		die("%s: bind(AF_PACKET): %s", name, strerror(errno));
	{
		/* Room for the window and then some; *FORCE (root) goes
		 * past net.core.rmem_max. */
		int sz = 4 * 1024 * 1024;

		if (setsockopt(n->fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof(sz)))
			setsockopt(n->fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
		if (setsockopt(n->fd, SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof(sz)))
			setsockopt(n->fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
	}
	{
		/*
		 * Straight to the driver: the default qdisc (fq_codel) drops
		 * frames that wait longer than its target, which a slow TX
		 * ring under TCG causes, and a dropped frame would look like
		 * a lost DMA. A full ring now fails send() with ENOBUFS and
		 * the sender tries again.
		 */
		int one = 1;

		if (setsockopt(n->fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one,
			       sizeof(one)))
			die("%s: PACKET_QDISC_BYPASS: %s", name, strerror(errno));
	}
}

static inline uint8_t net_byte(uint32_t seq, uint32_t run, size_t i)
{
	return (uint8_t)(seq * 131 + run * 7 + i * 29 + (i >> 8));
}

/* A frame from a to b; with pattern 0 only the header changes (the
 * benchmark keeps the payload of frame 0 and does not check it). */
static size_t net_frame(unsigned char *f, const struct nic *a,
			const struct nic *b, uint32_t seq, uint32_t run,
			int pattern)
{
	struct ether_header *eh = (struct ether_header *)f;
	struct net_hdr h = { htonl(NET_MAGIC), htonl(seq), htonl(run) };
	unsigned char *p = f + sizeof(*eh);

	memcpy(eh->ether_dhost, b->mac, ETH_ALEN);
	memcpy(eh->ether_shost, a->mac, ETH_ALEN);
	eh->ether_type = htons(NET_ETHERTYPE);
	memcpy(p, &h, sizeof(h));
	if (pattern || seq == 0)
		for (size_t i = sizeof(h); i < NET_PAYLOAD; i++)
			p[i] = net_byte(seq, run, i);
	return sizeof(*eh) + NET_PAYLOAD;
}

/* The shared state of a sender (main thread) and a receiver thread. */
struct net_run {
	struct nic a, b;
	uint32_t run, count;          /* count 0: until the deadline */
	int verify;
	double deadline;              /* sender stops; receiver 2 s later */
	atomic_uint sent, received;   /* frames */
	atomic_int sender_done;
	uint64_t bytes, bad, dup_or_reorder;
	char error[256];
};

static void *net_receiver(void *arg)
{
	struct net_run *r = arg;
	unsigned char f[ETH_FRAME_LEN + 64];
	uint32_t expect = 0;
	double idle_until = 0;

	for (;;) {
		struct pollfd p = { r->b.fd, POLLIN, 0 };
		int rc;
		ssize_t n;
		struct net_hdr h;

		if (atomic_load(&r->sender_done)) {
			if (atomic_load(&r->received) == atomic_load(&r->sent))
				break;
			if (!idle_until)
				idle_until = now() + 2.0;
			else if (now() > idle_until)
				break;        /* the rest is lost */
		}
		rc = poll(&p, 1, 50);
		if (rc < 0 && errno != EINTR) {
			snprintf(r->error, sizeof(r->error), "poll: %s",
				 strerror(errno));
			break;
		}
		if (rc <= 0)
			continue;
		n = recv(r->b.fd, f, sizeof(f), MSG_DONTWAIT);
		if (n < 0)
			continue;
		if ((size_t)n < sizeof(struct ether_header) + sizeof(h))
			continue;
		memcpy(&h, f + sizeof(struct ether_header), sizeof(h));
		if (ntohl(h.magic) != NET_MAGIC || ntohl(h.run) != r->run)
			continue;             /* not ours */
		if (ntohl(h.seq) != expect) {
			if (ntohl(h.seq) < expect)
				r->dup_or_reorder++;
			else
				expect = ntohl(h.seq);  /* frames lost */
		}
		if ((size_t)n != sizeof(struct ether_header) + NET_PAYLOAD) {
			r->bad++;
			if (!r->error[0])
				snprintf(r->error, sizeof(r->error),
					 "frame %u: %zd bytes, not %zu", ntohl(h.seq),
					 n, sizeof(struct ether_header) + NET_PAYLOAD);
		} else if (r->verify) {
			const unsigned char *pl = f + sizeof(struct ether_header);

			for (size_t i = sizeof(h); i < NET_PAYLOAD; i++)
				if (pl[i] != net_byte(ntohl(h.seq), r->run, i)) {
					r->bad++;
					if (!r->error[0])
						snprintf(r->error, sizeof(r->error),
							 "frame %u: payload byte %zu is 0x%02x, "
							 "not 0x%02x", ntohl(h.seq), i, pl[i],
							 net_byte(ntohl(h.seq), r->run, i));
					break;
				}
		}
		expect++;
		r->bytes += NET_PAYLOAD;
		atomic_fetch_add(&r->received, 1);
	}
	return NULL;
}

/* Sends until count frames or the deadline; returns when both are done. */
static void net_go(struct net_run *r, const char *ifa, const char *ifb)
{
	unsigned char f[ETH_FRAME_LEN];
	pthread_t t;
	double stall = 0;

	nic_open(&r->a, ifa);
	nic_open(&r->b, ifb);
	r->run = (uint32_t)(now() * 1000) ^ (uint32_t)getpid() << 16;
	if (pthread_create(&t, NULL, net_receiver, r))
		die("pthread_create");
	while (now() < r->deadline && (!r->count || r->sent < r->count)) {
		uint32_t seq = atomic_load(&r->sent);
		size_t len;
		struct pollfd p = { r->a.fd, POLLOUT, 0 };

		/* Flow control: at most NET_WINDOW frames in flight; a frame
		 * that never arrives releases its slot after 100 ms. */
		if (seq - atomic_load(&r->received) >= NET_WINDOW) {
			if (!stall)
				stall = now() + 0.1;
			if (now() < stall) {
				usleep(20);
				continue;
			}
		}
		stall = 0;
		len = net_frame(f, &r->a, &r->b, seq, r->run, r->verify);
		if (poll(&p, 1, 100) <= 0)
			continue;
		if (send(r->a.fd, f, len, MSG_DONTWAIT) != (ssize_t)len) {
			if (errno == EAGAIN || errno == ENOBUFS || errno == EINTR) {
				usleep(50);	/* the TX ring is full */
				continue;
			}
			die("%s: send: %s", ifa, strerror(errno));
		}
		atomic_fetch_add(&r->sent, 1);
	}
	atomic_store(&r->sender_done, 1);
	pthread_join(t, NULL);
}

static int net_verify(int argc, char **argv)
{
	struct net_run *r = calloc(1, sizeof(*r));
	double t0;

	if (argc < 2 || argc > 3)
		die("usage: net-verify IF_A IF_B [N]");
	r->count = argc > 2 ? parse_ulong(argv[2], "N") : 2000;
	r->verify = 1;
	t0 = now();
	r->deadline = t0 + 30;  /* bounded even if frames trickle */
	nic_open(&r->a, argv[0]);   /* brings the links up */
	nic_open(&r->b, argv[1]);
	close(r->a.fd), close(r->b.fd);
	net_go(r, argv[0], argv[1]);
	if (r->error[0])
		die("%s -> %s: %s", argv[0], argv[1], r->error);
	if (r->sent != r->count)
		die("%s -> %s: sent %u of %u frames in 30 s", argv[0], argv[1],
		    r->sent, r->count);
	if (r->received != r->count || r->bad || r->dup_or_reorder)
		die("%s -> %s: %u frames sent, %u received, %" PRIu64
		    " bad, %" PRIu64 " duplicated or reordered", argv[0],
		    argv[1], r->sent, r->received, r->bad, r->dup_or_reorder);
	printf("%s: net-verify %s -> %s PASS (%u frames of %d bytes, %.2f s)\n",
	       prog, argv[0], argv[1], r->count, NET_PAYLOAD, now() - t0);
	free(r);
	return 0;
}

static int net_bench(int argc, char **argv)
{
	struct net_run *r = calloc(1, sizeof(*r));
	double secs, t0, t1;
	char name[64];

	if (argc != 3)
		die("usage: net-bench IF_A IF_B SECONDS");
	secs = atof(argv[2]);
	if (!(secs > 0 && secs <= 3600))
		die("bad SECONDS '%s'", argv[2]);
	nic_open(&r->a, argv[0]);
	nic_open(&r->b, argv[1]);
	close(r->a.fd), close(r->b.fd);
	snprintf(name, sizeof(name), "net-%d", NET_PAYLOAD);
	mark("begin", name);
	t0 = now();
	r->deadline = t0 + secs;
	net_go(r, argv[0], argv[1]);
	t1 = now();
	mark("end", name);
	if (r->error[0])
		die("%s -> %s: %s", argv[0], argv[1], r->error);
	printf("RESULT net frames=%u bytes=%" PRIu64 " lost=%u secs=%.3f "
	       "fps=%.1f mbps=%.2f\n", r->received, r->bytes,
	       r->sent - r->received, t1 - t0, r->received / (t1 - t0),
	       r->bytes / (t1 - t0) / 1e6);
	free(r);
	return 0;
}

/* --- refusal --------------------------------------------------------------- */

/*
 * disk-refused DEV BDF [skip|ro]: shows a DMA that pvdma refuses. Writes a
 * pattern to one 4 KiB block, then asks pvdma_iommu.ko not to send the next
 * MAP of the disk's PCI function BDF (skip, the default: test_skip_map) or
 * to send it read-only (ro: test_ro_map), and reads the block back with O_DIRECT into a buffer filled with 0x5a: the device's
 * write into that buffer is refused by the host (FAULTS rises), so the
 * data must not arrive. QEMU's DMA helpers drop a refused transfer without
 * the device reporting an error, so the read may "succeed"; an I/O error
 * is accepted too. A second read, mapped normally, must return the
 * pattern: the device keeps working.
 */
static int disk_refused(int argc, char **argv)
{
	const char *param = "/sys/module/pvdma_iommu/parameters/test_skip_map";
	const uint64_t off = 3 * MiB;
	const unsigned gen = 0x77;
	uint64_t *buf = xalloc_aligned(4 * KiB);
	unsigned char *bytes = (unsigned char *)buf;
	const char *dev, *bdf;
	ssize_t n;
	size_t kept = 0;
	int fd, pfd;

	if (argc == 3 && !strcmp(argv[2], "ro"))
		param = "/sys/module/pvdma_iommu/parameters/test_ro_map";
	else if (argc != 2 && !(argc == 3 && !strcmp(argv[2], "skip")))
		die("usage: disk-refused DEV BDF [skip|ro]");
	dev = argv[0];
	bdf = argv[1];
	fd = open_direct(dev, O_RDWR, NULL);
	disk_fill(buf, off, 4 * KiB, gen);
	if (pwrite(fd, buf, 4 * KiB, off) != (ssize_t)(4 * KiB))
		die("%s: writing the pattern: %s", dev, strerror(errno));

	memset(buf, 0x5a, 4 * KiB);
	pfd = open(param, O_WRONLY);
	if (pfd < 0 || write(pfd, bdf, strlen(bdf)) != (ssize_t)strlen(bdf))
		die("%s: %s", param, strerror(errno));
	close(pfd);
	n = pread(fd, buf, 4 * KiB, off);
	for (size_t i = 0; i < 4 * KiB; i++)
		kept += bytes[i] == 0x5a;
	printf("refused read: %s, %zu of 4096 bytes unchanged\n",
	       n < 0 ? strerror(errno) : "no error reported", kept);
	if (n >= 0 && kept != 4 * KiB)
		die("%s: %zu bytes of a read into a refused mapping arrived",
		    dev, 4 * KiB - kept);

	if (pread(fd, buf, 4 * KiB, off) != (ssize_t)(4 * KiB))
		die("%s: the read after the refusal failed: %s", dev,
		    strerror(errno));
	if (disk_check(dev, buf, off, 4 * KiB, gen))
		die("%s: the read after the refusal returned wrong data", dev);
	printf("%s: disk-refused %s PASS (refused DMA kept out, next read "
	       "correct)\n", prog, dev);
	close(fd);
	free(buf);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 2 && !strcmp(argv[1], "disk-verify"))
		return disk_verify(argc - 2, argv + 2);
	if (argc >= 2 && !strcmp(argv[1], "disk-stress"))
		return disk_stress(argc - 2, argv + 2);
	if (argc >= 2 && !strcmp(argv[1], "disk-bench"))
		return disk_bench(argc - 2, argv + 2);
	if (argc >= 2 && !strcmp(argv[1], "net-verify"))
		return net_verify(argc - 2, argv + 2);
	if (argc >= 2 && !strcmp(argv[1], "net-bench"))
		return net_bench(argc - 2, argv + 2);
	if (argc >= 2 && !strcmp(argv[1], "disk-refused"))
		return disk_refused(argc - 2, argv + 2);
	fprintf(stderr,
		"usage: %s disk-verify DEV [MiB]\n"
		"       %s disk-stress DEV SECONDS [JOBS] [MiB]\n"
		"       %s disk-bench DEV seq|rand BS JOBS SECONDS\n"
		"       %s net-verify IF_A IF_B [N]\n"
		"       %s net-bench IF_A IF_B SECONDS\n"
		"       %s disk-refused DEV BDF [skip|ro]\n",
		prog, prog, prog, prog, prog, prog);
	return 2;
}
