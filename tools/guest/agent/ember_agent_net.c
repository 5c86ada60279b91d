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
 *   ember.net_addr=IFACE:A.B.C.D:PREFIX[,...]
 *     give IFACE an IPv4 address and bring it up (the kernel's ip= option
 *     configures one interface; this configures the others), reporting
 *     EMBER-AGENT net_addr dev=IFACE addr=A.B.C.D/PREFIX ret=0
 *
 *   ember.net_wait=SECONDS
 *     print "EMBER-AGENT net_wait seconds=S" and sleep (the host acts meanwhile)
 *   ember.net_pause=IFACE:SECONDS
 *     take IFACE down (its receive buffers stay posted and fill up), print
 *     "EMBER-AGENT net_pause dev=IFACE state=down", sleep, bring it up again,
 *     print "... state=up ret=R"
 *   ember.net_udp=A.B.C.D:PORT:COUNT
 *     send COUNT 1000-byte UDP datagrams (broadcast allowed) without
 *     waiting for anything
 *
 *   ember.net_mac=IFACE:AA:BB:CC:DD:EE:FF[,...]
 *     change IFACE's MAC address while it is up (virtio-net sends the
 *     control queue's MAC_ADDR_SET), reporting
 *     EMBER-AGENT net_mac dev=IFACE mac=AA:BB:CC:DD:EE:FF ret=R
 *   ember.net_vlan=IFACE:VID[,...]
 *     add VID to IFACE's VLAN receive filter through the driver's
 *     ndo_vlan_rx_add_vid (virtio-net: the control queue's VLAN_ADD; the
 *     guest kernel needs no 8021q for it), reporting
 *     EMBER-AGENT net_vlan dev=IFACE vid=VID ret=R
 *   ember.net_channels=IFACE:N[,...]
 *     what `ethtool -L IFACE combined N` does (virtio-net: the control
 *     queue's MQ VQ_PAIRS_SET), reporting
 *     EMBER-AGENT net_channels dev=IFACE combined=N ret=R real_rx=X real_tx=Y
 *   ember.net_watch=SECONDS
 *     print "EMBER-AGENT net_watch seconds=S", then for S seconds print
 *     "EMBER-AGENT net_watch tcp_out_rsts=N tcp_passive_opens=P
 *     tcp_in_segs=I" whenever one of the guest's TCP counters changes (the
 *     host connects meanwhile: a reset the guest sent is the guest's)
 *
 * They run in this order: net_addr, net_mac, net_vlan, net_channels,
 * net_wait, net_pause, net_tcp, net_udp, net_watch.
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
#include <linux/netdevice.h>
#include <linux/inetdevice.h>
#include <linux/rtnetlink.h>
#include <linux/if.h>
#include <linux/delay.h>
#include <linux/ethtool.h>
#include <linux/if_ether.h>
#include <linux/if_arp.h>
#include <net/sock.h>
#include <net/snmp.h>
#include <net/ip.h>
#include <net/tcp.h>

#include "ember_agent_block.h"

#undef MODULE_PARAM_PREFIX
#define MODULE_PARAM_PREFIX "ember."

static char *net_tcp = "";
module_param(net_tcp, charp, 0444);
static char *net_addr = "";
module_param(net_addr, charp, 0444);
static unsigned int net_wait;
module_param(net_wait, uint, 0444);
static char *net_pause = "";
module_param(net_pause, charp, 0444);
static char *net_udp = "";
module_param(net_udp, charp, 0444);
static char *net_mac = "";
module_param(net_mac, charp, 0444);
static char *net_vlan = "";
module_param(net_vlan, charp, 0444);
static char *net_channels = "";
module_param(net_channels, charp, 0444);
static unsigned int net_watch;
module_param(net_watch, uint, 0444);

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

/*
 * Sends send_bytes of the pattern with seed 1, shuts down the sending side,
 * then reads until the peer closes and checks what came against the pattern
 * with seed 2 (recv_bytes of it). Shared with the vsock checks.
 */
void ember_stream_exchange(struct socket *sock, u64 send_bytes, u64 recv_bytes,
			   struct ember_xfer *x)
{
	u8 *buf = kmalloc(NET_CHUNK, GFP_KERNEL);
	ktime_t t0;
	int ret;

	memset(x, 0, sizeof(*x));
	x->send_us = 1;
	x->recv_us = 1;
	x->recv_ok = true;
	if (!buf) {
		x->errors++;
		x->recv_ok = false;
		return;
	}
	t0 = ktime_get();
	while (x->sent < send_bytes) {
		size_t n = min_t(u64, send_bytes - x->sent, NET_CHUNK);
		struct kvec v = { .iov_base = buf, .iov_len = n };
		struct msghdr msg = { .msg_flags = MSG_NOSIGNAL };

		pattern(buf, n, 1, x->sent / 8);
		ret = kernel_sendmsg(sock, &msg, &v, 1, n);
		if (ret != (int)n) {
			x->errors++;
			break;
		}
		x->sent += n;
	}
	x->send_us = max_t(u64, 1, ktime_us_delta(ktime_get(), t0));
	kernel_sock_shutdown(sock, SHUT_WR);

	t0 = ktime_get();
	for (;;) {
		struct kvec v = { .iov_base = buf, .iov_len = NET_CHUNK };
		struct msghdr msg = { 0 };
		u64 word = 0;
		int i;

		ret = kernel_recvmsg(sock, &msg, &v, 1, NET_CHUNK, 0);
		if (ret <= 0) {
			if (ret < 0)
				x->errors++;
			break;
		}
		/* One pattern word per 8 bytes (this runs emulated). */
		for (i = 0; i < ret; i++) {
			u64 pos = x->recvd + i;

			if (i == 0 || pos % 8 == 0)
				word = mix(2 + pos / 8);
			if (buf[i] != (u8)(word >> (8 * (pos % 8))))
				x->recv_ok = false;
		}
		x->recvd += ret;
	}
	x->recv_us = max_t(u64, 1, ktime_us_delta(ktime_get(), t0));
	if (x->recvd != recv_bytes)
		x->recv_ok = false;
	kfree(buf);
}

static void check_tcp(const char *spec)
{
	unsigned int a, b, c, d, port, send_kib, recv_kib;
	struct sockaddr_in addr = { .sin_family = AF_INET };
	struct socket *sock = NULL;
	struct ember_xfer x = { .recv_ok = false, .send_us = 1, .recv_us = 1 };
	unsigned int attempt;
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
	/*
	 * Connect, retrying like a real client: right after an interface comes
	 * up, ARP may time out behind a backlog of received frames.
	 */
	for (attempt = 0; attempt < 10; attempt++) {
		if (attempt)
			msleep(1000);
		ret = sock_create_kern(&init_net, AF_INET, SOCK_STREAM, IPPROTO_TCP, &sock);
		if (ret) {
			AGENT_LINE("net_tcp peer=%u.%u.%u.%u:%u error=socket:%d", a, b, c, d, port, ret);
			ember_checks_failed++;
			return;
		}
		ret = kernel_connect(sock, (struct sockaddr *)&addr, sizeof(addr), 0);
		if (!ret || (ret != -EHOSTUNREACH && ret != -ETIMEDOUT && ret != -ECONNREFUSED))
			break;
		sock_release(sock);
		sock = NULL;
	}
	if (ret) {
		AGENT_LINE("net_tcp peer=%u.%u.%u.%u:%u error=connect:%d", a, b, c, d, port, ret);
		x.errors++;
	} else {
		ember_stream_exchange(sock, (u64)send_kib * 1024, (u64)recv_kib * 1024, &x);
	}
	if (sock)
		sock_release(sock);
	AGENT_LINE("net_tcp peer=%u.%u.%u.%u:%u sent=%llu recv=%llu recv_ok=%d send_kib_per_s=%llu recv_kib_per_s=%llu errors=%u",
		   a, b, c, d, port, x.sent, x.recvd, x.recv_ok, x.sent * 1000000 / 1024 / x.send_us,
		   x.recvd * 1000000 / 1024 / x.recv_us, x.errors);
	if (x.errors || !x.recv_ok || x.sent != (u64)send_kib * 1024)
		ember_checks_failed++;
}

static void set_addr(const char *spec)
{
	char name[IFNAMSIZ];
	unsigned int a, b, c, d, prefix;
	struct sockaddr_in *sin;
	struct net_device *dev;
	struct ifreq ifr;
	int ret;

	ember_checks_run++;
	if (sscanf(spec, "%15[^:]:%u.%u.%u.%u:%u", name, &a, &b, &c, &d, &prefix) != 6 ||
	    a > 255 || b > 255 || c > 255 || d > 255 || prefix < 1 || prefix > 30) {
		AGENT_LINE("net_addr spec=%s error=bad-spec", spec);
		ember_checks_failed++;
		return;
	}
	memset(&ifr, 0, sizeof(ifr));
	strscpy(ifr.ifr_name, name, IFNAMSIZ);
	sin = (struct sockaddr_in *)&ifr.ifr_addr;
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = htonl((a << 24) | (b << 16) | (c << 8) | d);
	ret = devinet_ioctl(&init_net, SIOCSIFADDR, &ifr);
	if (!ret) {
		sin->sin_addr.s_addr = htonl(~0U << (32 - prefix));
		ret = devinet_ioctl(&init_net, SIOCSIFNETMASK, &ifr);
	}
	if (!ret) {
		dev = dev_get_by_name(&init_net, name);
		if (!dev) {
			ret = -ENODEV;
		} else {
			rtnl_lock();
			ret = dev_change_flags(dev, dev->flags | IFF_UP, NULL);
			rtnl_unlock();
			dev_put(dev);
		}
	}
	AGENT_LINE("net_addr dev=%s addr=%u.%u.%u.%u/%u ret=%d", name, a, b, c, d, prefix, ret);
	if (ret)
		ember_checks_failed++;
}

static int set_up(const char *name, bool up)
{
	struct net_device *dev = dev_get_by_name(&init_net, name);
	int ret;

	if (!dev)
		return -ENODEV;
	rtnl_lock();
	ret = dev_change_flags(dev, up ? dev->flags | IFF_UP : dev->flags & ~IFF_UP, NULL);
	rtnl_unlock();
	dev_put(dev);
	return ret;
}

static void pause_iface(const char *spec)
{
	char name[IFNAMSIZ];
	unsigned int secs;
	int ret;

	ember_checks_run++;
	if (sscanf(spec, "%15[^:]:%u", name, &secs) != 2 || secs > 3600) {
		AGENT_LINE("net_pause spec=%s error=bad-spec", spec);
		ember_checks_failed++;
		return;
	}
	ret = set_up(name, false);
	AGENT_LINE("net_pause dev=%s state=down ret=%d", name, ret);
	msleep(secs * 1000);
	ret = ret ?: set_up(name, true);
	AGENT_LINE("net_pause dev=%s state=up ret=%d", name, ret);
	if (ret)
		ember_checks_failed++;
}

static void send_udp(const char *spec)
{
	unsigned int a, b, c, d, port, count, i, sent = 0;
	struct sockaddr_in addr = { .sin_family = AF_INET };
	struct socket *sock;
	static u8 payload[1000];
	int ret;

	ember_checks_run++;
	if (sscanf(spec, "%u.%u.%u.%u:%u:%u", &a, &b, &c, &d, &port, &count) != 6 ||
	    a > 255 || b > 255 || c > 255 || d > 255 || port > 65535) {
		AGENT_LINE("net_udp spec=%s error=bad-spec", spec);
		ember_checks_failed++;
		return;
	}
	addr.sin_addr.s_addr = htonl((a << 24) | (b << 16) | (c << 8) | d);
	addr.sin_port = htons(port);
	ret = sock_create_kern(&init_net, AF_INET, SOCK_DGRAM, IPPROTO_UDP, &sock);
	if (ret) {
		AGENT_LINE("net_udp error=socket:%d", ret);
		ember_checks_failed++;
		return;
	}
	/* A broadcast address needs no ARP: every datagram becomes a frame. */
	sock_set_flag(sock->sk, SOCK_BROADCAST);
	for (i = 0; i < count; i++) {
		struct kvec v = { .iov_base = payload, .iov_len = sizeof(payload) };
		struct msghdr msg = { .msg_name = &addr, .msg_namelen = sizeof(addr),
				      .msg_flags = MSG_DONTWAIT };

		if (kernel_sendmsg(sock, &msg, &v, 1, sizeof(payload)) > 0)
			sent++;
		msleep(10);
	}
	sock_release(sock);
	/* Whether the host got them is the host's to say: no failure here. */
	AGENT_LINE("net_udp peer=%u.%u.%u.%u:%u count=%u sent=%u", a, b, c, d, port, count, sent);
}

static void set_mac(const char *spec)
{
	char name[IFNAMSIZ];
	unsigned int m[ETH_ALEN];
	struct sockaddr sa = { .sa_family = ARPHRD_ETHER };
	struct net_device *dev;
	int i, ret;

	ember_checks_run++;
	if (sscanf(spec, "%15[^:]:%x:%x:%x:%x:%x:%x", name, &m[0], &m[1], &m[2], &m[3],
		   &m[4], &m[5]) != 7) {
		AGENT_LINE("net_mac spec=%s error=bad-spec", spec);
		ember_checks_failed++;
		return;
	}
	for (i = 0; i < ETH_ALEN; i++)
		sa.sa_data[i] = (char)m[i];
	dev = dev_get_by_name(&init_net, name);
	if (!dev) {
		ret = -ENODEV;
	} else {
		rtnl_lock();
		ret = dev_set_mac_address(dev, &sa, NULL);
		rtnl_unlock();
		dev_put(dev);
	}
	AGENT_LINE("net_mac dev=%s mac=%02x:%02x:%02x:%02x:%02x:%02x ret=%d", name, m[0], m[1],
		   m[2], m[3], m[4], m[5], ret);
	if (ret)
		ember_checks_failed++;
}

static void add_vlan(const char *spec)
{
	char name[IFNAMSIZ];
	unsigned int vid;
	struct net_device *dev;
	int ret;

	ember_checks_run++;
	if (sscanf(spec, "%15[^:]:%u", name, &vid) != 2 || vid > 4095) {
		AGENT_LINE("net_vlan spec=%s error=bad-spec", spec);
		ember_checks_failed++;
		return;
	}
	dev = dev_get_by_name(&init_net, name);
	if (!dev) {
		ret = -ENODEV;
	} else {
		rtnl_lock();
		ret = dev->netdev_ops->ndo_vlan_rx_add_vid ?
			dev->netdev_ops->ndo_vlan_rx_add_vid(dev, htons(ETH_P_8021Q), vid) :
			-EOPNOTSUPP;
		rtnl_unlock();
		dev_put(dev);
	}
	AGENT_LINE("net_vlan dev=%s vid=%u ret=%d", name, vid, ret);
	if (ret)
		ember_checks_failed++;
}

static void set_channels(const char *spec)
{
	char name[IFNAMSIZ];
	unsigned int n, real_rx = 0, real_tx = 0;
	struct ethtool_channels ch = { .cmd = ETHTOOL_GCHANNELS };
	struct net_device *dev;
	int ret;

	ember_checks_run++;
	if (sscanf(spec, "%15[^:]:%u", name, &n) != 2 || n < 1 || n > 256) {
		AGENT_LINE("net_channels spec=%s error=bad-spec", spec);
		ember_checks_failed++;
		return;
	}
	dev = dev_get_by_name(&init_net, name);
	if (!dev) {
		ret = -ENODEV;
	} else {
		rtnl_lock();
		if (!dev->ethtool_ops->get_channels || !dev->ethtool_ops->set_channels) {
			ret = -EOPNOTSUPP;
		} else {
			dev->ethtool_ops->get_channels(dev, &ch);
			ch.cmd = ETHTOOL_SCHANNELS;
			ch.combined_count = n;
			ret = dev->ethtool_ops->set_channels(dev, &ch);
		}
		real_rx = dev->real_num_rx_queues;
		real_tx = dev->real_num_tx_queues;
		rtnl_unlock();
		dev_put(dev);
	}
	AGENT_LINE("net_channels dev=%s combined=%u ret=%d real_rx=%u real_tx=%u", name, n, ret,
		   real_rx, real_tx);
	if (ret)
		ember_checks_failed++;
}

static void watch_tcp(unsigned int secs)
{
	unsigned long rsts, opens, segs, last[3] = { ~0UL, ~0UL, ~0UL };
	unsigned int i;

	AGENT_LINE("net_watch seconds=%u", secs);
	for (i = 0; i < secs * 5; i++) {
		rsts = snmp_fold_field(init_net.mib.tcp_statistics, TCP_MIB_OUTRSTS);
		opens = snmp_fold_field(init_net.mib.tcp_statistics, TCP_MIB_PASSIVEOPENS);
		segs = snmp_fold_field(init_net.mib.tcp_statistics, TCP_MIB_INSEGS);
		if (rsts != last[0] || opens != last[1] || segs != last[2])
			AGENT_LINE("net_watch tcp_out_rsts=%lu tcp_passive_opens=%lu tcp_in_segs=%lu",
				   rsts, opens, segs);
		last[0] = rsts;
		last[1] = opens;
		last[2] = segs;
		msleep(200);
	}
}

void ember_each_item(const char *list, void (*fn)(const char *))
{
	char *copy, *cur, *item;

	if (!list[0])
		return;
	copy = kstrdup(list, GFP_KERNEL);
	if (!copy) {
		ember_checks_failed++;
		return;
	}
	cur = copy;
	while ((item = strsep(&cur, ",")) != NULL)
		if (item[0])
			fn(item);
	kfree(copy);
}

void __init ember_net_checks(void)
{
	ember_each_item(net_addr, set_addr);
	ember_each_item(net_mac, set_mac);
	ember_each_item(net_vlan, add_vlan);
	ember_each_item(net_channels, set_channels);
	if (net_wait) {
		AGENT_LINE("net_wait seconds=%u", net_wait);
		msleep(net_wait * 1000);
	}
	ember_each_item(net_pause, pause_iface);
	ember_each_item(net_tcp, check_tcp);
	ember_each_item(net_udp, send_udp);
	if (net_watch)
		watch_tcp(net_watch);
}
