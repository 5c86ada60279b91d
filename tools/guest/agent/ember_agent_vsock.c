// SPDX-License-Identifier: GPL-2.0
/*
 * Ember guest test agent: virtio-vsock and virtio-rng checks.
 *
 *   ember.vsock_listen=PORT
 *     listen on vsock port PORT and echo every connection: a kernel thread
 *     per connection writes back what it reads until the host shuts down
 *     its side, then reports and closes:
 *     EMBER-AGENT vsock_conn port=PORT n=N bytes=B fnv=H error=E
 *     (N counts the connections accepted, H is FNV-1a 64 of the bytes).
 *     The agent goes on at once after
 *     EMBER-AGENT vsock_listen port=PORT ret=R
 *
 *   ember.vsock_connect=PORT:SEND_KIB:RECV_KIB[,...]
 *     connect to the host (CID 2) on PORT and exchange as net_tcp does
 *     (send SEND_KIB KiB of the pattern with seed 1, shut down sending, read
 *     RECV_KIB KiB of the pattern with seed 2 until the host closes):
 *     EMBER-AGENT vsock_connect port=PORT sent=S recv=R recv_ok=1|0
 *                 send_kib_per_s=X recv_kib_per_s=Y errors=E
 *     or ... error=connect:ERRNO when the connection is refused.
 *
 *   ember.vsock_refused=PORT[,...]
 *     connect to the host on PORT, where no host program listens: the
 *     connection must be refused (reset), reported as
 *     EMBER-AGENT vsock_refused port=PORT ret=ERRNO
 *
 *   ember.hwrng=BYTES
 *     read BYTES from the current hwrng (virtio-rng):
 *     EMBER-AGENT hwrng name=NAME bytes=B distinct=D ms=T error=E
 *     (D: how many of the 256 byte values were seen).
 */

#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/moduleparam.h>
#include <linux/net.h>
#include <linux/socket.h>
#include <linux/slab.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/delay.h>
#include <linux/atomic.h>
#include <linux/vm_sockets.h>
#include <net/sock.h>

#include "ember_agent_block.h"

#undef MODULE_PARAM_PREFIX
#define MODULE_PARAM_PREFIX "ember."

static unsigned int vsock_listen;
module_param(vsock_listen, uint, 0444);
static char *vsock_connect = "";
module_param(vsock_connect, charp, 0444);
static char *vsock_refused = "";
module_param(vsock_refused, charp, 0444);
static unsigned int hwrng;
module_param(hwrng, uint, 0444);

#define ECHO_CHUNK 16384
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static atomic_t accepted = ATOMIC_INIT(0);

struct echo {
	struct socket *sock;
	unsigned int n;
};

/* Writes all of buf; 0 or a negative errno. */
static int send_all(struct socket *sock, u8 *buf, int len)
{
	int off = 0;

	while (off < len) {
		struct kvec v = { .iov_base = buf + off, .iov_len = len - off };
		struct msghdr msg = { .msg_flags = MSG_NOSIGNAL };
		int ret = kernel_sendmsg(sock, &msg, &v, 1, len - off);

		if (ret <= 0)
			return ret ? ret : -EPIPE;
		off += ret;
	}
	return 0;
}

static int echo_fn(void *data)
{
	struct echo *e = data;
	u8 *buf = kmalloc(ECHO_CHUNK, GFP_KERNEL);
	u64 bytes = 0, hash = FNV_OFFSET;
	int err = buf ? 0 : -ENOMEM;

	while (buf) {
		struct kvec v = { .iov_base = buf, .iov_len = ECHO_CHUNK };
		struct msghdr msg = { 0 };
		int ret = kernel_recvmsg(e->sock, &msg, &v, 1, ECHO_CHUNK, 0);
		int i;

		if (ret <= 0) {
			err = ret;
			break;
		}
		for (i = 0; i < ret; i++)
			hash = (hash ^ buf[i]) * FNV_PRIME;
		bytes += ret;
		err = send_all(e->sock, buf, ret);
		if (err)
			break;
	}
	AGENT_LINE("vsock_conn port=%u n=%u bytes=%llu fnv=%016llx error=%d",
		   vsock_listen, e->n, bytes, hash, err);
	sock_release(e->sock);
	kfree(buf);
	kfree(e);
	return 0;
}

static int listen_fn(void *data)
{
	struct socket *lsock = data;
	unsigned int failures = 0;

	while (failures < 100) {
		struct task_struct *t;
		struct socket *conn;
		struct echo *e;
		int ret = kernel_accept(lsock, &conn, 0);

		if (ret) {
			AGENT_LINE("vsock_listen port=%u error=accept:%d", vsock_listen, ret);
			failures++;
			msleep(100);
			continue;
		}
		e = kmalloc(sizeof(*e), GFP_KERNEL);
		if (!e) {
			sock_release(conn);
			continue;
		}
		e->sock = conn;
		e->n = atomic_inc_return(&accepted);
		t = kthread_run(echo_fn, e, "ember-vecho%u", e->n);
		if (IS_ERR(t)) {
			sock_release(conn);
			kfree(e);
		}
	}
	return 0;
}

static void start_listener(void)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_port = vsock_listen,
		.svm_cid = VMADDR_CID_ANY,
	};
	struct socket *lsock;
	struct task_struct *t;
	int ret;

	ember_checks_run++;
	ret = sock_create_kern(&init_net, AF_VSOCK, SOCK_STREAM, 0, &lsock);
	if (!ret) {
		ret = kernel_bind(lsock, (struct sockaddr *)&addr, sizeof(addr));
		if (!ret)
			ret = kernel_listen(lsock, 128);
		if (!ret) {
			t = kthread_run(listen_fn, lsock, "ember-vlisten");
			ret = PTR_ERR_OR_ZERO(t);
		}
		if (ret)
			sock_release(lsock);
	}
	AGENT_LINE("vsock_listen port=%u ret=%d", vsock_listen, ret);
	if (ret)
		ember_checks_failed++;
}

static void check_connect(const char *spec)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST };
	unsigned int port, send_kib, recv_kib;
	struct ember_xfer x;
	struct socket *sock;
	int ret;

	ember_checks_run++;
	if (sscanf(spec, "%u:%u:%u", &port, &send_kib, &recv_kib) != 3) {
		AGENT_LINE("vsock_connect spec=%s error=bad-spec", spec);
		ember_checks_failed++;
		return;
	}
	addr.svm_port = port;
	ret = sock_create_kern(&init_net, AF_VSOCK, SOCK_STREAM, 0, &sock);
	if (ret) {
		AGENT_LINE("vsock_connect port=%u error=socket:%d", port, ret);
		ember_checks_failed++;
		return;
	}
	ret = kernel_connect(sock, (struct sockaddr *)&addr, sizeof(addr), 0);
	if (ret) {
		AGENT_LINE("vsock_connect port=%u error=connect:%d", port, ret);
		sock_release(sock);
		ember_checks_failed++;
		return;
	}
	ember_stream_exchange(sock, (u64)send_kib * 1024, (u64)recv_kib * 1024, &x);
	sock_release(sock);
	AGENT_LINE("vsock_connect port=%u sent=%llu recv=%llu recv_ok=%d send_kib_per_s=%llu recv_kib_per_s=%llu errors=%u",
		   port, x.sent, x.recvd, x.recv_ok, x.sent * 1000000 / 1024 / x.send_us,
		   x.recvd * 1000000 / 1024 / x.recv_us, x.errors);
	if (x.errors || !x.recv_ok || x.sent != (u64)send_kib * 1024)
		ember_checks_failed++;
}

static void check_refused(const char *spec)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST };
	struct socket *sock;
	unsigned int port;
	int ret;

	ember_checks_run++;
	if (kstrtouint(spec, 10, &port)) {
		AGENT_LINE("vsock_refused spec=%s error=bad-spec", spec);
		ember_checks_failed++;
		return;
	}
	addr.svm_port = port;
	ret = sock_create_kern(&init_net, AF_VSOCK, SOCK_STREAM, 0, &sock);
	if (!ret) {
		ret = kernel_connect(sock, (struct sockaddr *)&addr, sizeof(addr), 0);
		sock_release(sock);
	}
	AGENT_LINE("vsock_refused port=%u ret=%d", port, ret);
	if (!ret)
		ember_checks_failed++;
}

static void check_hwrng(void)
{
	bool seen[256] = { false };
	unsigned int got = 0, distinct = 0, i;
	char name[32] = "none";
	u8 *buf = kmalloc(hwrng, GFP_KERNEL);
	ktime_t t0 = ktime_get();
	int ret = buf ? 0 : -ENOMEM;

	ember_checks_run++;
	while (buf && got < hwrng) {
		ret = ember_hwrng_read(buf + got, hwrng - got, name, sizeof(name));
		if (ret <= 0) {
			ret = ret ? ret : -EIO;
			break;
		}
		got += ret;
		ret = 0;
	}
	for (i = 0; i < got; i++) {
		if (!seen[buf[i]])
			distinct++;
		seen[buf[i]] = true;
	}
	AGENT_LINE("hwrng name=%s bytes=%u distinct=%u ms=%lld error=%d", name, got,
		   distinct, ktime_ms_delta(ktime_get(), t0), ret);
	if (ret || got != hwrng)
		ember_checks_failed++;
	kfree(buf);
}

void __init ember_vsock_checks(void)
{
	if (hwrng)
		check_hwrng();
	if (vsock_listen)
		start_listener();
	ember_each_item(vsock_connect, check_connect);
	ember_each_item(vsock_refused, check_refused);
}
