// SPDX-License-Identifier: GPL-2.0
/*
 * Ember guest test agent: network checks with kernel sockets.
 *
 *   ember.net_tcp=A.B.C.D:PORT:SEND_KIB:RECV_KIB[,...]
 *     connect to A.B.C.D:PORT, send SEND_KIB KiB of the pattern with seed 1,
 *     shut down the sending side, then read until the peer closes (the host
 *     side sends RECV_KIB KiB of the pattern with seed 2) and report:
 *     EMBER-AGENT net_tcp peer=A.B.C.D:PORT sent=N recv=M recv_ok=1|0
 *                 send_kib_per_s=S recv_kib_per_s=R errors=E
 *
 * The pattern, shared with the host-side tests (tests/common): the 64-bit
 * little-endian word k of a stream is splitmix64(seed + k).
 */

#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/moduleparam.h>
#include <linux/net.h>
#include <linux/in.h>
#include <linux/inet.h>
#include <linux/slab.h>
#include <linux/ktime.h>
#include <linux/string.h>
#include <net/sock.h>

#include "ember_agent_block.h"

#undef MODULE_PARAM_PREFIX
#define MODULE_PARAM_PREFIX "ember."

static char *net_tcp = "";
module_param(net_tcp, charp, 0444);

#define NET_CHUNK 16384

static u64 mix(u64 x)
{
	u64 z = x + 0x9e3779b97f4a7c15ULL;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* Fills buf (len a multiple of 8) with pattern words starting at word k. */
static void pattern(u8 *buf, size_t len, u64 seed, u64 k)
{
	size_t i;

	for (i = 0; i < len / 8; i++) {
		__le64 w = cpu_to_le64(mix(seed + k + i));

		memcpy(buf + i * 8, &w, 8);
	}
}

static void check_tcp(const char *spec)
{
	unsigned int a, b, c, d, port, send_kib, recv_kib;
	struct sockaddr_in addr = { .sin_family = AF_INET };
	struct socket *sock = NULL;
	u8 *buf = NULL;
	u64 sent = 0, recvd = 0, send_us = 1, recv_us = 1;
	unsigned int errors = 0;
	bool recv_ok = true;
	ktime_t t0;
	int ret;

	ember_checks_run++;
	if (sscanf(spec, "%u.%u.%u.%u:%u:%u:%u", &a, &b, &c, &d, &port, &send_kib,
		   &recv_kib) != 7 || a > 255 || b > 255 || c > 255 || d > 255 ||
	    port > 65535) {
		AGENT_LINE("net_tcp spec=%s error=bad-spec", spec);
		ember_checks_failed++;
		return;
	}
	addr.sin_addr.s_addr = htonl((a << 24) | (b << 16) | (c << 8) | d);
	addr.sin_port = htons(port);
	buf = kmalloc(NET_CHUNK, GFP_KERNEL);
	if (!buf) {
		errors++;
		goto out;
	}
	ret = sock_create_kern(&init_net, AF_INET, SOCK_STREAM, IPPROTO_TCP, &sock);
	if (ret) {
		AGENT_LINE("net_tcp peer=%u.%u.%u.%u:%u error=socket:%d", a, b, c, d, port, ret);
		errors++;
		goto out;
	}
	ret = kernel_connect(sock, (struct sockaddr *)&addr, sizeof(addr), 0);
	if (ret) {
		AGENT_LINE("net_tcp peer=%u.%u.%u.%u:%u error=connect:%d", a, b, c, d, port, ret);
		errors++;
		goto out;
	}

	t0 = ktime_get();
	while (sent < (u64)send_kib * 1024) {
		size_t n = min_t(u64, (u64)send_kib * 1024 - sent, NET_CHUNK);
		struct kvec v = { .iov_base = buf, .iov_len = n };
		struct msghdr msg = { .msg_flags = MSG_NOSIGNAL };

		pattern(buf, n, 1, sent / 8);
		ret = kernel_sendmsg(sock, &msg, &v, 1, n);
		if (ret != (int)n) {
			errors++;
			break;
		}
		sent += n;
	}
	send_us = max_t(u64, 1, ktime_us_delta(ktime_get(), t0));
	kernel_sock_shutdown(sock, SHUT_WR);

	t0 = ktime_get();
	for (;;) {
		struct kvec v = { .iov_base = buf, .iov_len = NET_CHUNK };
		struct msghdr msg = { 0 };
		int i;

		ret = kernel_recvmsg(sock, &msg, &v, 1, NET_CHUNK, 0);
		if (ret <= 0) {
			if (ret < 0)
				errors++;
			break;
		}
		for (i = 0; i < ret; i++) {
			u64 pos = recvd + i;

			if (buf[i] != (u8)(mix(2 + pos / 8) >> (8 * (pos % 8))))
				recv_ok = false;
		}
		recvd += ret;
	}
	recv_us = max_t(u64, 1, ktime_us_delta(ktime_get(), t0));
	if (recvd != (u64)recv_kib * 1024)
		recv_ok = false;
out:
	if (sock)
		sock_release(sock);
	kfree(buf);
	AGENT_LINE("net_tcp peer=%u.%u.%u.%u:%u sent=%llu recv=%llu recv_ok=%d send_kib_per_s=%llu recv_kib_per_s=%llu errors=%u",
		   a, b, c, d, port, sent, recvd, recv_ok, sent * 1000000 / 1024 / send_us,
		   recvd * 1000000 / 1024 / recv_us, errors);
	if (errors || !recv_ok || sent != (u64)send_kib * 1024)
		ember_checks_failed++;
}

void __init ember_net_checks(void)
{
	char *copy, *cur, *item;

	if (!net_tcp[0])
		return;
	copy = kstrdup(net_tcp, GFP_KERNEL);
	if (!copy) {
		ember_checks_failed++;
		return;
	}
	cur = copy;
	while ((item = strsep(&cur, ",")) != NULL)
		if (item[0])
			check_tcp(item);
	kfree(copy);
}
