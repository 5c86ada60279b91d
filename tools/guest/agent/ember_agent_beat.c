// SPDX-License-Identifier: GPL-2.0
/*
 * Ember guest test agent: a heartbeat for snapshot and restore tests.
 *
 *   ember.beat=DEV:SECONDS:MEM_MIB
 *     at agent run time, open /dev/DEV, vmalloc MEM_MIB MiB, print
 *       EMBER-AGENT beat_start dev=DEV seconds=S mem_mib=M blocks=B
 *     (or `beat_start ... error=E`, counted as a failed check) and start a
 *     kernel thread; the agent goes on at once (done line, ember.after).
 *     The thread fills the buffer with the pattern below, then makes SECONDS
 *     beats, one a second (msleep(1000)). Beat N (from 0) checks the buffer
 *     (mem_ok), writes 4 KiB block N of DEV (byte offset N * 4096) and
 *     fsyncs it (disk_ok: the write and the flush succeeded), then prints
 *       EMBER-AGENT beat n=N mem_ok=1|0 disk_ok=1|0 uptime_ms=U
 *     After the last beat it compares every word of the buffer and prints
 *       EMBER-AGENT beat_end beats=N mem_fail=M disk_fail=D bad_words=W
 *
 * The check of a beat is one 64-bit word in every 4 KiB page of the buffer,
 * word (N + page) % 511 of the page, so each beat sees every page (a page
 * lost, zeroed or misplaced by a snapshot fails at once) and 511 beats see
 * every word. The page's last word is its generation: beat N finds it at
 * pattern + N (mod 2^64) and rewrites it to pattern + N + 1, so every beat
 * dirties every page of the buffer (MEM_MIB MiB a second: the dirtying
 * workload of the migration tests) and a page that a migration left one
 * generation behind fails the next beat. Hashing the whole buffer each second is out of reach on the
 * project's software hypervisor, where guest kernel code runs emulated at
 * about a microsecond an instruction (a byte-wise FNV-1a of 1 MiB took 12 s).
 *
 * Beats count loop iterations, not elapsed time: when msleep() comes back
 * after a long gap (the VM was paused, snapshotted and restored in another
 * process), the next beat simply has the next number.
 *
 * The patterns, for the host side of the tests:
 *   memory: 64-bit word k of the buffer is
 *     ((k + 1) * 0x9e3779b97f4a7c15) ^ 0x454d424552424541 (mod 2^64),
 *     plus the number of beats made for the last word of each page;
 *   disk block N: bytes 0..19 are the ASCII text "EMBER-BEAT %08u\n" of N,
 *     byte i (20 <= i < 4096) is (N * 31 + i) & 0xff.
 */

#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/moduleparam.h>
#include <linux/fs.h>
#include <linux/err.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/kthread.h>
#include <linux/sched.h>
#include <linux/delay.h>
#include <linux/timekeeping.h>
#include <linux/math64.h>
#include <linux/init_syscalls.h>
#include <linux/string.h>
#include <linux/sizes.h>

#include "ember_agent_block.h"

#undef MODULE_PARAM_PREFIX
#define MODULE_PARAM_PREFIX "ember."

static char *beat = "";
module_param(beat, charp, 0444);

#define BEAT_BLOCK 4096
#define BEAT_HEADER 20 /* strlen("EMBER-BEAT 00000000\n") */
#define BEAT_SEED 0x454d424552424541ULL /* "EMBERBEA" */
#define BEAT_STEP 0x9e3779b97f4a7c15ULL
#define BEAT_PAGE_WORDS (PAGE_SIZE / sizeof(u64))
#define BEAT_MAX_MIB 4096

/* What the beat thread owns; allocated once and never freed. */
struct beat_ctx {
	char name[16];
	unsigned int seconds;
	struct file *disk;
	u64 disk_blocks;
	u64 *mem;
	size_t mem_words;
	u8 *block;
};

/* The pattern's word k. */
static inline u64 beat_word(size_t k)
{
	return ((u64)(k + 1) * BEAT_STEP) ^ BEAT_SEED;
}

/*
 * Fills the buffer: a running sum instead of a multiplication per word, and
 * eight words a round, as every instruction counts when emulated.
 */
static void beat_fill_mem(u64 *words, size_t count)
{
	u64 v = 0;
	size_t i;

	for (i = 0; i + 8 <= count; i += 8) {
		words[i + 0] = (v += BEAT_STEP) ^ BEAT_SEED;
		words[i + 1] = (v += BEAT_STEP) ^ BEAT_SEED;
		words[i + 2] = (v += BEAT_STEP) ^ BEAT_SEED;
		words[i + 3] = (v += BEAT_STEP) ^ BEAT_SEED;
		words[i + 4] = (v += BEAT_STEP) ^ BEAT_SEED;
		words[i + 5] = (v += BEAT_STEP) ^ BEAT_SEED;
		words[i + 6] = (v += BEAT_STEP) ^ BEAT_SEED;
		words[i + 7] = (v += BEAT_STEP) ^ BEAT_SEED;
		if ((i & (SZ_1M / sizeof(u64) - 1)) == 0)
			cond_resched();
	}
	for (; i < count; i++)
		words[i] = (v += BEAT_STEP) ^ BEAT_SEED;
}

/* Whether word k is a page's generation word (the buffer is whole pages). */
static inline bool beat_is_gen(size_t k)
{
	return k % BEAT_PAGE_WORDS == BEAT_PAGE_WORDS - 1;
}

/*
 * Beat n's check: one pattern word and the generation word of every page,
 * which it then moves on to n + 1; true when all matched.
 */
static bool beat_check_mem(u64 *words, size_t count, unsigned int n)
{
	size_t page, k, gen;
	bool ok = true;

	for (page = 0; (page + 1) * BEAT_PAGE_WORDS <= count; page++) {
		k = page * BEAT_PAGE_WORDS + (n + page) % (BEAT_PAGE_WORDS - 1);
		gen = page * BEAT_PAGE_WORDS + BEAT_PAGE_WORDS - 1;
		if (words[k] != beat_word(k) || words[gen] != beat_word(gen) + n)
			ok = false;
		words[gen] = beat_word(gen) + n + 1;
	}
	return ok;
}

/* Every word against the pattern after `beats` beats: how many differ. */
static size_t beat_bad_words(const u64 *words, size_t count, unsigned int beats)
{
	size_t k, bad = 0;

	for (k = 0; k < count; k++) {
		bad += words[k] != beat_word(k) + (beat_is_gen(k) ? beats : 0);
		if ((k & (SZ_1M / sizeof(u64) - 1)) == 0)
			cond_resched();
	}
	return bad;
}

static void beat_fill_block(u8 *block, unsigned int n)
{
	char header[BEAT_HEADER + 1];
	unsigned int i;

	for (i = 0; i < BEAT_BLOCK; i++)
		block[i] = (u8)(n * 31 + i);
	/* The text only: its terminating NUL stays out of the block. */
	snprintf(header, sizeof(header), "EMBER-BEAT %08u\n", n);
	memcpy(block, header, BEAT_HEADER);
}

/* Writes block n and flushes it to the device; true on success. */
static bool beat_write(struct beat_ctx *c, unsigned int n)
{
	loff_t pos = (loff_t)n * BEAT_BLOCK;

	if (n >= c->disk_blocks)
		return false;
	beat_fill_block(c->block, n);
	if (kernel_write(c->disk, c->block, BEAT_BLOCK, &pos) != BEAT_BLOCK)
		return false;
	return vfs_fsync(c->disk, 0) == 0;
}

static int beat_thread(void *data)
{
	struct beat_ctx *c = data;
	unsigned int n, mem_fail = 0, disk_fail = 0;

	beat_fill_mem(c->mem, c->mem_words);
	for (n = 0; n < c->seconds && !kthread_should_stop(); n++) {
		bool mem_ok = beat_check_mem(c->mem, c->mem_words, n);
		bool disk_ok = beat_write(c, n);

		mem_fail += !mem_ok;
		disk_fail += !disk_ok;
		AGENT_LINE("beat n=%u mem_ok=%d disk_ok=%d uptime_ms=%llu", n,
			   mem_ok, disk_ok,
			   div_u64(ktime_get_boottime_ns(), NSEC_PER_MSEC));
		/*
		 * One beat a second. A restored snapshot makes this return
		 * after any wall-clock gap: the count just goes on.
		 */
		if (n + 1 < c->seconds)
			msleep(1000);
	}
	AGENT_LINE("beat_end beats=%u mem_fail=%u disk_fail=%u bad_words=%zu", n,
		   mem_fail, disk_fail, beat_bad_words(c->mem, c->mem_words, n));
	return 0;
}

/* Opens /dev/NAME, mounting devtmpfs there first if it is not yet. */
static struct file *__init beat_open_disk(const char *name)
{
	char path[32];
	struct file *f;

	snprintf(path, sizeof(path), "/dev/%s", name);
	f = filp_open(path, O_RDWR | O_LARGEFILE, 0);
	if (!IS_ERR(f) || PTR_ERR(f) != -ENOENT)
		return f;
	/* Before the root is mounted nothing provides /dev (see block.c). */
	init_mkdir("/dev", 0755);
	init_mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	return filp_open(path, O_RDWR | O_LARGEFILE, 0);
}

void __init ember_beat_start(void)
{
	struct beat_ctx *c;
	struct task_struct *t;
	unsigned int mem_mib;
	long err;

	if (!beat[0])
		return;
	ember_checks_run++;
	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c) {
		err = -ENOMEM;
		goto fail;
	}
	if (sscanf(beat, "%15[^:]:%u:%u", c->name, &c->seconds, &mem_mib) != 3 ||
	    mem_mib > BEAT_MAX_MIB) {
		AGENT_LINE("beat_start spec=%s error=bad-spec", beat);
		kfree(c);
		ember_checks_failed++;
		return;
	}

	c->disk = beat_open_disk(c->name);
	if (IS_ERR(c->disk)) {
		err = PTR_ERR(c->disk);
		c->disk = NULL;
		goto fail;
	}
	c->disk_blocks = i_size_read(c->disk->f_mapping->host) / BEAT_BLOCK;

	c->block = kmalloc(BEAT_BLOCK, GFP_KERNEL);
	/* Filled by the thread: 16 MiB take seconds when emulated. */
	c->mem_words = (size_t)mem_mib * SZ_1M / sizeof(u64);
	c->mem = vmalloc(mem_mib ? (size_t)mem_mib * SZ_1M : 1);
	if (!c->block || !c->mem) {
		err = -ENOMEM;
		goto fail;
	}

	AGENT_LINE("beat_start dev=%s seconds=%u mem_mib=%u blocks=%llu",
		   c->name, c->seconds, mem_mib, c->disk_blocks);
	t = kthread_run(beat_thread, c, "ember-beat");
	if (!IS_ERR(t))
		return;
	err = PTR_ERR(t);
fail:
	AGENT_LINE("beat_start dev=%s error=%ld", c ? c->name : "?", err);
	ember_checks_failed++;
	if (c) {
		vfree(c->mem);
		kfree(c->block);
		if (c->disk)
			filp_close(c->disk, NULL);
		kfree(c);
	}
}
