// SPDX-License-Identifier: GPL-2.0
/*
 * Ember guest test agent: PCI and block checks, with the kernel's own APIs.
 *
 * The seeded pattern, shared with the host-side tests (tests/common):
 *   splitmix64(x): x += 0x9e3779b97f4a7c15; z = x;
 *                  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9;
 *                  z = (z ^ (z >> 27)) * 0x94d049bb133111eb;
 *                  return z ^ (z >> 31);
 *   block i of a write (0 <= i < COUNT) lands at 4 KiB block
 *     splitmix64(seed + i) % (disk size / 4096);
 *   the 64-bit word j (0..511) of the block at byte offset `off` is
 *     splitmix64(seed ^ off ^ (j << 48)), little-endian.
 */

#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/moduleparam.h>
#include <linux/fs.h>
#include <linux/err.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/blkdev.h>
#include <linux/init_syscalls.h>
#include <linux/ktime.h>
#include <linux/kthread.h>
#include <linux/completion.h>
#include <linux/pci.h>
#include <linux/string.h>
#include <linux/ctype.h>

#include "ember_agent_block.h"

#undef MODULE_PARAM_PREFIX
#define MODULE_PARAM_PREFIX "ember."

static char *pci = "off";
module_param(pci, charp, 0444);
static char *blk_serial = "";
module_param(blk_serial, charp, 0444);
static char *blk_read = "";
module_param(blk_read, charp, 0444);
static char *blk_write = "";
module_param(blk_write, charp, 0444);
static char *blk_verify = "";
module_param(blk_verify, charp, 0444);
static char *blk_ro = "";
module_param(blk_ro, charp, 0444);
static char *blk_discard = "";
module_param(blk_discard, charp, 0444);
static char *blk_zeroout = "";
module_param(blk_zeroout, charp, 0444);
static char *blk_stress = "";
module_param(blk_stress, charp, 0444);
static char *blk_fill = "";
module_param(blk_fill, charp, 0444);

#define BLOCK 4096
#define IO_CHUNK (64 * 1024)

static u64 splitmix64(u64 x)
{
	u64 z = x + 0x9e3779b97f4a7c15ULL;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void fill_pattern(u64 *buf, u64 seed, u64 off)
{
	int j;

	for (j = 0; j < BLOCK / 8; j++)
		buf[j] = cpu_to_le64(splitmix64(seed ^ off ^ ((u64)j << 48)));
}

static void fail(void)
{
	ember_checks_failed++;
}

static struct file *open_disk(const char *name, int flags)
{
	char path[32];

	snprintf(path, sizeof(path), "/dev/%s", name);
	return filp_open(path, flags | O_LARGEFILE, 0);
}

static loff_t disk_size(struct file *f)
{
	return i_size_read(f->f_mapping->host);
}

/* Drop the disk's clean cached pages so the next read reaches the device. */
static void drop_cache(struct file *f)
{
	invalidate_mapping_pages(f->f_mapping, 0, -1);
}

static void check_pci(void)
{
	struct pci_dev *pdev = NULL;

	if (strcmp(pci, "on") != 0)
		return;
	ember_checks_run++;
	for_each_pci_dev(pdev)
		AGENT_LINE("pci bdf=%s vendor=%04x device=%04x class=%06x msix=%d",
			   pci_name(pdev), pdev->vendor, pdev->device,
			   pdev->class, pdev->msix_enabled);
}

static void check_serial(const char *name)
{
	char path[64], buf[32];
	struct file *f;
	loff_t pos = 0;
	ssize_t n, i;

	ember_checks_run++;
	snprintf(path, sizeof(path), "/sys/block/%s/serial", name);
	f = filp_open(path, O_RDONLY, 0);
	if (IS_ERR(f)) {
		AGENT_LINE("blk_serial dev=%s error=%ld", name, PTR_ERR(f));
		fail();
		return;
	}
	n = kernel_read(f, buf, sizeof(buf) - 1, &pos);
	filp_close(f, NULL);
	if (n < 0) {
		AGENT_LINE("blk_serial dev=%s error=%zd", name, n);
		fail();
		return;
	}
	for (i = 0; i < n; i++)
		if (!isgraph(buf[i]))
			break;
	buf[i] = '\0';
	AGENT_LINE("blk_serial dev=%s serial=%s", name, buf);
}

static void check_read(const char *name)
{
	struct file *f;
	u8 *buf;
	loff_t pos = 0;
	u64 hash = 0xcbf29ce484222325ULL, bytes = 0, us;
	ktime_t t0;
	ssize_t n, i;

	ember_checks_run++;
	f = open_disk(name, O_RDONLY);
	if (IS_ERR(f)) {
		AGENT_LINE("blk_read dev=%s error=%ld", name, PTR_ERR(f));
		fail();
		return;
	}
	buf = kvmalloc(IO_CHUNK, GFP_KERNEL);
	if (!buf) {
		filp_close(f, NULL);
		fail();
		return;
	}
	drop_cache(f);
	t0 = ktime_get();
	while ((n = kernel_read(f, buf, IO_CHUNK, &pos)) > 0) {
		for (i = 0; i < n; i++) {
			hash ^= buf[i];
			hash *= 0x100000001b3ULL;
		}
		bytes += n;
	}
	us = ktime_us_delta(ktime_get(), t0);
	kvfree(buf);
	filp_close(f, NULL);
	if (n < 0) {
		AGENT_LINE("blk_read dev=%s error=%zd bytes=%llu", name, n, bytes);
		fail();
		return;
	}
	AGENT_LINE("blk_read dev=%s bytes=%llu fnv1a=%016llx kib_per_s=%llu", name,
		   bytes, hash, us ? bytes * 1000000 / 1024 / us : 0);
}

/* Writes (write=true) or verifies the seeded blocks; returns mismatches. */
static void pattern_blocks(const char *spec, bool write)
{
	const char *what = write ? "blk_write" : "blk_verify";
	char name[16];
	unsigned long long seed;
	unsigned int count, i, mismatches = 0, errors = 0;
	struct file *f;
	u64 *want, *got, nblocks, us = 0;
	ktime_t t0;

	ember_checks_run++;
	if (sscanf(spec, "%15[^:]:%llu:%u", name, &seed, &count) != 3) {
		AGENT_LINE("%s spec=%s error=bad-spec", what, spec);
		fail();
		return;
	}
	f = open_disk(name, write ? O_RDWR : O_RDONLY);
	if (IS_ERR(f)) {
		AGENT_LINE("%s dev=%s error=%ld", what, name, PTR_ERR(f));
		fail();
		return;
	}
	nblocks = disk_size(f) / BLOCK;
	want = kmalloc(BLOCK, GFP_KERNEL);
	got = kmalloc(BLOCK, GFP_KERNEL);
	if (!want || !got || !nblocks) {
		errors++;
		goto out;
	}
	if (!write)
		drop_cache(f);
	t0 = ktime_get();
	for (i = 0; i < count; i++) {
		u64 off = (splitmix64(seed + i) % nblocks) * BLOCK;
		loff_t pos = off;
		ssize_t n;

		fill_pattern(want, seed, off);
		if (write) {
			n = kernel_write(f, want, BLOCK, &pos);
		} else {
			n = kernel_read(f, got, BLOCK, &pos);
			if (n == BLOCK && memcmp(want, got, BLOCK))
				mismatches++;
		}
		if (n != BLOCK)
			errors++;
	}
	if (write && vfs_fsync(f, 0))
		errors++;
	us = ktime_us_delta(ktime_get(), t0);
out:
	kfree(want);
	kfree(got);
	filp_close(f, NULL);
	if (write)
		AGENT_LINE("blk_write dev=%s seed=%llu blocks=%u errors=%u kib_per_s=%llu",
			   name, seed, count, errors,
			   us ? (u64)count * BLOCK * 1000000 / 1024 / us : 0);
	else
		AGENT_LINE("blk_verify dev=%s seed=%llu blocks=%u mismatches=%u errors=%u kib_per_s=%llu",
			   name, seed, count, mismatches, errors,
			   us ? (u64)count * BLOCK * 1000000 / 1024 / us : 0);
	if (errors || mismatches)
		fail();
}

static void check_ro(const char *name)
{
	struct file *f;
	void *buf;
	loff_t pos = 0;
	ssize_t wr = 0;
	int sync = 0;

	ember_checks_run++;
	f = open_disk(name, O_RDWR);
	if (IS_ERR(f)) {
		AGENT_LINE("blk_ro dev=%s open=%ld write=none fsync=none refused=1",
			   name, PTR_ERR(f));
		return;
	}
	buf = kzalloc(BLOCK, GFP_KERNEL);
	if (buf) {
		memset(buf, 0x5a, BLOCK);
		wr = kernel_write(f, buf, BLOCK, &pos);
		sync = vfs_fsync(f, 0);
		kfree(buf);
	}
	drop_cache(f);
	filp_close(f, NULL);
	AGENT_LINE("blk_ro dev=%s open=0 write=%zd fsync=%d refused=%d", name, wr,
		   sync, wr < 0 || sync < 0);
	if (wr >= 0 && sync >= 0)
		fail();
}

static void check_range_op(const char *spec, bool discard)
{
	const char *what = discard ? "blk_discard" : "blk_zeroout";
	char name[16], path[32];
	unsigned long long off_kib, len_kib;
	struct block_device *bdev;
	int ret;

	ember_checks_run++;
	if (sscanf(spec, "%15[^:]:%llu:%llu", name, &off_kib, &len_kib) != 3) {
		AGENT_LINE("%s spec=%s error=bad-spec", what, spec);
		fail();
		return;
	}
	snprintf(path, sizeof(path), "/dev/%s", name);
	bdev = blkdev_get_by_path(path, FMODE_READ | FMODE_WRITE, NULL);
	if (IS_ERR(bdev)) {
		AGENT_LINE("%s dev=%s error=%ld", what, name, PTR_ERR(bdev));
		fail();
		return;
	}
	if (discard)
		ret = blkdev_issue_discard(bdev, off_kib * 2, len_kib * 2, GFP_KERNEL);
	else
		/* Unmapping allowed: the device may punch a hole. */
		ret = blkdev_issue_zeroout(bdev, off_kib * 2, len_kib * 2, GFP_KERNEL, 0);
	if (!ret)
		ret = blkdev_issue_flush(bdev);
	blkdev_put(bdev, FMODE_READ | FMODE_WRITE);
	AGENT_LINE("%s dev=%s offset_kib=%llu len_kib=%llu ret=%d", what, name,
		   off_kib, len_kib, ret);
	if (ret)
		fail();
}

struct stress_ctx {
	char name[16];
	unsigned int id, ops, ack;
	u64 first_block, blocks;
	unsigned int errors, mismatches;
	struct completion done;
};

static int stress_thread(void *data)
{
	struct stress_ctx *c = data;
	struct file *f = open_disk(c->name, O_RDWR);
	u64 *want = kmalloc(BLOCK, GFP_KERNEL);
	u64 *got = kmalloc(BLOCK, GFP_KERNEL);
	unsigned int op;

	if (IS_ERR(f) || !want || !got) {
		c->errors++;
		goto out;
	}
	for (op = 0; op < c->ops; op++) {
		u64 seed = splitmix64(((u64)c->id << 32) | op);
		u64 off = (c->first_block + seed % c->blocks) * BLOCK;
		loff_t pos = off;

		fill_pattern(want, seed, off);
		if (kernel_write(f, want, BLOCK, &pos) != BLOCK || vfs_fsync(f, 1)) {
			c->errors++;
			if (c->ack)
				AGENT_LINE("blk_stress_bad t=%u op=%u what=write", c->id, op);
			continue;
		}
		/* Acknowledged: the host may check this op's block is durable. */
		if (c->ack && op % c->ack == 0)
			AGENT_LINE("blk_ack t=%u op=%u", c->id, op);
		/* Written and flushed: drop the cache and read from the device. */
		drop_cache(f);
		pos = off;
		if (kernel_read(f, got, BLOCK, &pos) != BLOCK) {
			c->errors++;
			if (c->ack)
				AGENT_LINE("blk_stress_bad t=%u op=%u what=read", c->id, op);
		} else if (memcmp(want, got, BLOCK)) {
			c->mismatches++;
			if (c->ack)
				AGENT_LINE("blk_stress_bad t=%u op=%u what=mismatch", c->id, op);
		}
	}
out:
	kfree(want);
	kfree(got);
	if (!IS_ERR(f))
		filp_close(f, NULL);
	complete(&c->done);
	return 0;
}

static void check_stress(const char *spec)
{
	char name[16];
	unsigned int threads, ops, ack = 0, i, errors = 0, mismatches = 0;
	unsigned long long off_kib, len_kib;
	struct stress_ctx *ctx;
	int fields;
	u64 slice;

	ember_checks_run++;
	fields = sscanf(spec, "%15[^:]:%u:%u:%llu:%llu:%u", name, &threads, &ops, &off_kib,
			&len_kib, &ack);
	if (fields < 5 || !threads || threads > 64) {
		AGENT_LINE("blk_stress spec=%s error=bad-spec", spec);
		fail();
		return;
	}
	slice = len_kib / 4 / threads;
	ctx = kcalloc(threads, sizeof(*ctx), GFP_KERNEL);
	if (!ctx || !slice) {
		kfree(ctx);
		fail();
		return;
	}
	for (i = 0; i < threads; i++) {
		struct task_struct *t;

		strscpy(ctx[i].name, name, sizeof(ctx[i].name));
		ctx[i].id = i;
		ctx[i].ops = ops;
		ctx[i].ack = ack;
		ctx[i].first_block = off_kib / 4 + i * slice;
		ctx[i].blocks = slice;
		init_completion(&ctx[i].done);
		t = kthread_run(stress_thread, &ctx[i], "ember-stress%u", i);
		if (IS_ERR(t)) {
			ctx[i].errors++;
			complete(&ctx[i].done);
		}
	}
	for (i = 0; i < threads; i++) {
		wait_for_completion(&ctx[i].done);
		errors += ctx[i].errors;
		mismatches += ctx[i].mismatches;
	}
	kfree(ctx);
	AGENT_LINE("blk_stress dev=%s threads=%u ops=%u errors=%u mismatches=%u",
		   name, threads, ops, errors, mismatches);
	if (errors || mismatches)
		fail();
}

/*
 * DEV:SEED:FIRST:COUNT: writes the 4 KiB blocks FIRST to FIRST+COUNT-1 in
 * order, each written and flushed (fsync) before the next, and says how
 * many the device acknowledged: the leading run (durable) and in all (ok).
 * Failures are what the host's fault tests expect (a full or failing host
 * disk), so they do not fail the check; the host compares the numbers
 * with what it finds in the image.
 */
static void check_fill(const char *spec)
{
	char name[16];
	unsigned long long seed, first, count, i;
	unsigned long long durable = 0, ok = 0, errors = 0, ms;
	bool leading = true;
	struct file *f;
	u64 *buf;
	ktime_t t0;

	ember_checks_run++;
	if (sscanf(spec, "%15[^:]:%llu:%llu:%llu", name, &seed, &first, &count) != 4) {
		AGENT_LINE("blk_fill spec=%s error=bad-spec", spec);
		fail();
		return;
	}
	f = open_disk(name, O_RDWR);
	if (IS_ERR(f)) {
		AGENT_LINE("blk_fill dev=%s error=%ld", name, PTR_ERR(f));
		fail();
		return;
	}
	buf = kmalloc(BLOCK, GFP_KERNEL);
	if (!buf) {
		filp_close(f, NULL);
		fail();
		return;
	}
	t0 = ktime_get();
	for (i = 0; i < count; i++) {
		u64 off = (first + i) * BLOCK;
		loff_t pos = off;

		fill_pattern(buf, seed, off);
		if (kernel_write(f, buf, BLOCK, &pos) == BLOCK && !vfs_fsync(f, 1)) {
			ok++;
			durable += leading;
		} else {
			errors++;
			leading = false;
		}
	}
	ms = ktime_ms_delta(ktime_get(), t0);
	kfree(buf);
	filp_close(f, NULL);
	AGENT_LINE("blk_fill dev=%s seed=%llu first=%llu count=%llu durable=%llu ok=%llu errors=%llu ms=%llu",
		   name, seed, first, count, durable, ok, errors, ms);
}

static void do_write(const char *s) { pattern_blocks(s, true); }
static void do_verify(const char *s) { pattern_blocks(s, false); }
static void do_discard(const char *s) { check_range_op(s, true); }
static void do_zeroout(const char *s) { check_range_op(s, false); }

void __init ember_block_checks(void)
{
	bool block = blk_serial[0] || blk_read[0] || blk_write[0] || blk_verify[0] ||
		     blk_ro[0] || blk_discard[0] || blk_zeroout[0] || blk_stress[0] ||
		     blk_fill[0];

	check_pci();
	if (!block)
		return;
	/* Before the root is mounted nothing provides /dev and /sys: mount them. */
	init_mkdir("/dev", 0755);
	init_mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	init_mkdir("/sys", 0755);
	init_mount("sysfs", "/sys", "sysfs", 0, NULL);

	ember_each_item(blk_serial, check_serial);
	ember_each_item(blk_read, check_read);
	ember_each_item(blk_verify, do_verify);
	ember_each_item(blk_write, do_write);
	ember_each_item(blk_ro, check_ro);
	ember_each_item(blk_discard, do_discard);
	ember_each_item(blk_zeroout, do_zeroout);
	ember_each_item(blk_stress, check_stress);
	ember_each_item(blk_fill, check_fill);
}
