// SPDX-License-Identifier: GPL-2.0
/*
 * Ember guest test agent.
 *
 * Guest user space cannot run on the project's software hypervisor, so the
 * checks a test wants from inside the guest are made here, in kernel mode,
 * with the kernel's own APIs. The agent is built into Ember's guest kernel
 * and does nothing unless `ember.agent=on` is on the command line. It runs
 * once every initcall has finished (late_initcall_sync, after waiting for
 * device probing), prints one machine-readable line per check on the
 * console, then restarts the machine (or halts, or lets boot continue).
 *
 * Output format, one line per check:
 *
 *   EMBER-AGENT <check> key=value key=value ...
 *
 * and a last line `EMBER-AGENT done checks=N failed=M`.
 *
 * Parameters (kernel command line):
 *   ember.agent=on            run the agent
 *   ember.after=reboot|halt|poweroff|continue
 *                             what to do after the checks (poweroff goes
 *                             through ACPI's sleep register when the
 *                             platform has ACPI)
 *   ember.net_addr=IFACE:ADDR:PREFIX
 *                             configure another interface (see net.c)
 *   ember.net_tcp=ADDR:PORT:SEND_KIB:RECV_KIB
 *                             a TCP exchange with a host listener (see net.c)
 *   ember.sleep=SECONDS       stay up this long after the checks (before
 *                             the `done` line), e.g. for the host to ping
 *   ember.read_file=PATH      read up to 64 bytes of PATH (e.g. a file the
 *                             initramfs carries) and print them
 *   ember.pci=on              list PCI functions (ids, class, MSI-X enabled)
 *   ember.blk_serial=vda,...  print each disk's serial (virtio-blk GET_ID)
 *   ember.blk_read=vda,...    read each whole disk: bytes, FNV-1a 64, KiB/s
 *   ember.blk_write=DEV:SEED:COUNT
 *                             write COUNT 4 KiB blocks of a seeded pattern at
 *                             seeded offsets, then fsync (see block.c)
 *   ember.blk_verify=DEV:SEED:COUNT
 *                             read those blocks back and count mismatches
 *   ember.blk_ro=DEV          writing to DEV must fail
 *   ember.blk_discard=DEV:OFFSET_KIB:LEN_KIB
 *   ember.blk_zeroout=DEV:OFFSET_KIB:LEN_KIB
 *                             discard / write zeroes through the block layer
 *   ember.blk_stress=DEV:THREADS:OPS:OFFSET_KIB:LEN_KIB[:ACK]
 *                             THREADS kernel threads write, flush and verify
 *                             OPS blocks each in their own slice of the range;
 *                             with ACK, thread T prints `blk_ack t=T op=K`
 *                             once op K (a multiple of ACK) is flushed, and
 *                             `blk_stress_bad t= op= what=` at once on a
 *                             failure (for crash tests, which never see the
 *                             end line). Op K of thread T writes block
 *                             OFFSET_KIB/4 + T*S + splitmix64(T<<32|K) % S
 *                             (S = LEN_KIB/4/THREADS) with the pattern of
 *                             seed splitmix64(T<<32|K)
 *   ember.blk_fill=DEV:SEED:FIRST:COUNT[,...]
 *       writes 4 KiB blocks FIRST.. in order, each written and fsynced
 *       before the next; reports how many the device acknowledged
 *       (durable: the leading run, ok: in all) and the errors (a host
 *       fault test expects them: not a failed check)
 *   ember.hog=MIB:HOLD_S      print `hog start`, allocate MIB MiB in 2 MiB blocks, write every
 *                             page, print `hog touched mib= ms=` (the time
 *                             allocating and writing took), hold them HOLD_S
 *                             seconds, free them and print `hog freed` (for
 *                             balloon and free page reporting tests)
 *   ember.vsock_listen=PORT, ember.vsock_connect=PORT:SEND_KIB:RECV_KIB,
 *   ember.vsock_refused=PORT, ember.hwrng=BYTES
 *                             vsock echo listener, vsock exchanges with a
 *                             host listener, reads from the hwrng (see
 *                             vsock.c)
 *   ember.beat=DEV:SECONDS:MEM_MIB
 *                             start a kernel thread that makes SECONDS beats,
 *                             one a second: beat N checks MEM_MIB MiB of
 *                             patterned memory and rewrites each page's
 *                             generation word, writes and fsyncs 4 KiB block
 *                             N of DEV and prints `beat n=N mem_ok= disk_ok=
 *                             uptime_ms=`; the agent goes on at once (for
 *                             snapshot/restore tests, see beat.c)
 */

#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/moduleparam.h>
#include <linux/printk.h>
#include <linux/cpumask.h>
#include <linux/mm.h>
#include <linux/timekeeping.h>
#include <linux/reboot.h>
#include <linux/device/driver.h>
#include <linux/async.h>
#include <linux/string.h>
#include <linux/utsname.h>
#include <linux/fs.h>
#include <linux/err.h>
#include <linux/ctype.h>
#include <linux/delay.h>
#include <linux/nodemask.h>
#include <linux/topology.h>
#include <linux/mmzone.h>
#include <linux/gfp.h>
#include <linux/slab.h>
#include <linux/acpi.h>
#include <asm/mc146818rtc.h>

#include "ember_agent_block.h"

#undef MODULE_PARAM_PREFIX
#define MODULE_PARAM_PREFIX "ember."

static char *agent = "off";
module_param(agent, charp, 0444);

static char *after = "reboot";
module_param(after, charp, 0444);

static unsigned int sleep_s;
module_param_named(sleep, sleep_s, uint, 0444);

static char *read_file = "";
module_param(read_file, charp, 0444);

static char *hog = "";
module_param(hog, charp, 0444);

unsigned int ember_checks_run;
unsigned int ember_checks_failed;
#define checks_run ember_checks_run
#define checks_failed ember_checks_failed

static void __init check_hello(void)
{
	AGENT_LINE("hello kernel=%s", init_utsname()->release);
	checks_run++;
}

static void __init check_cpus(void)
{
	AGENT_LINE("cpus online=%u possible=%u present=%u", num_online_cpus(),
		   num_possible_cpus(), num_present_cpus());
	checks_run++;
}

static void __init check_memory(void)
{
	unsigned long present_kib = get_num_physpages() << (PAGE_SHIFT - 10);
	unsigned long total_kib = totalram_pages() << (PAGE_SHIFT - 10);

	AGENT_LINE("mem present_kib=%lu total_kib=%lu", present_kib, total_kib);
	checks_run++;
}

static void __init check_clock(void)
{
	struct timespec64 cmos;
	time64_t wall = ktime_get_real_seconds();

	mach_get_cmos_time(&cmos);
	AGENT_LINE("clock wall_epoch=%lld cmos_epoch=%lld", (long long)wall,
		   (long long)cmos.tv_sec);
	checks_run++;
	if (cmos.tv_sec < 1600000000LL)
		checks_failed++;
}

/*
 * The guest's NUMA view: one line per online node with its CPUs, its
 * memory and its distance to every online node (the SLIT, or 10/20 without
 * one); and whether the platform came up with ACPI.
 */
static void __init check_numa(void)
{
	int n, m;

	AGENT_LINE("platform acpi=%s nodes=%u", acpi_disabled ? "off" : "on",
		   num_online_nodes());
	checks_run++;
	for_each_online_node(n) {
		char dist[128];
		int at = 0;

		dist[0] = '\0';
		for_each_online_node(m) {
			at += scnprintf(dist + at, sizeof(dist) - at, "%s%d",
					at ? "," : "", node_distance(n, m));
		}
		AGENT_LINE("numa node=%d cpus=%*pbl mem_mib=%lu distances=%s", n,
			   cpumask_pr_args(cpumask_of_node(n)),
			   node_present_pages(n) >> (20 - PAGE_SHIFT), dist);
	}
}

/* ember.hog=MIB:HOLD_S: see the header. */
static void __init run_hog(void)
{
	unsigned int mib, hold_s, order = 9, blocks, got = 0, i;
	struct page **pages;
	ktime_t t0;

	if (!hog[0])
		return;
	checks_run++;
	if (sscanf(hog, "%u:%u", &mib, &hold_s) != 2 || !mib) {
		AGENT_LINE("hog error=bad-argument");
		checks_failed++;
		return;
	}
	blocks = mib / 2;
	pages = kvmalloc_array(blocks, sizeof(*pages), GFP_KERNEL);
	if (!pages) {
		AGENT_LINE("hog error=no-memory");
		checks_failed++;
		return;
	}
	/* The host times the touch between this line and the next: the guest's
	 * own clock does not see the time the host spends faulting pages in. */
	AGENT_LINE("hog start mib=%u", mib);
	t0 = ktime_get();
	for (i = 0; i < blocks; i++) {
		pages[got] = alloc_pages(GFP_KERNEL | __GFP_NOWARN | __GFP_NORETRY, order);
		if (!pages[got])
			break;
		memset(page_address(pages[got]), 0x5a, PAGE_SIZE << order);
		got++;
	}
	AGENT_LINE("hog touched mib=%u ms=%lld", got * 2,
		   ktime_ms_delta(ktime_get(), t0));
	msleep(hold_s * 1000);
	for (i = 0; i < got; i++)
		__free_pages(pages[i], order);
	kvfree(pages);
	AGENT_LINE("hog freed mib=%u", got * 2);
}

static void __init check_read_file(void)
{
	struct file *f;
	char buf[65];
	loff_t pos = 0;
	ssize_t n, i;

	if (!read_file[0])
		return;
	checks_run++;
	f = filp_open(read_file, O_RDONLY, 0);
	if (IS_ERR(f)) {
		AGENT_LINE("file path=%s error=%ld", read_file, PTR_ERR(f));
		checks_failed++;
		return;
	}
	n = kernel_read(f, buf, sizeof(buf) - 1, &pos);
	filp_close(f, NULL);
	if (n < 0) {
		AGENT_LINE("file path=%s error=%zd", read_file, n);
		checks_failed++;
		return;
	}
	/* One word on one line: anything but printable non-space is '.'. */
	for (i = 0; i < n; i++)
		if (!isgraph(buf[i]))
			buf[i] = '.';
	buf[n] = '\0';
	AGENT_LINE("file path=%s bytes=%zd content=%s", read_file, n, buf);
}

static int __init ember_agent_run(void)
{
	if (strcmp(agent, "on") != 0)
		return 0;

	/* Everything the checks touch must have been probed. */
	wait_for_device_probe();
	async_synchronize_full();

	check_hello();
	check_cpus();
	check_memory();
	check_clock();
	check_numa();
	check_read_file();
	ember_block_checks();
	ember_net_checks();
	ember_vsock_checks();
	/* The heartbeat thread beats on while the agent finishes. */
	ember_beat_start();
	run_hog();

	if (sleep_s) {
		AGENT_LINE("sleeping seconds=%u", sleep_s);
		msleep(sleep_s * 1000);
	}
	AGENT_LINE("done checks=%u failed=%u", checks_run, checks_failed);

	if (strcmp(after, "continue") == 0)
		return 0;
	if (strcmp(after, "halt") == 0)
		kernel_halt();
	if (strcmp(after, "poweroff") == 0)
		kernel_power_off();
	kernel_restart(NULL);
	return 0;
}
late_initcall_sync(ember_agent_run);
