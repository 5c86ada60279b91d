/* SPDX-License-Identifier: GPL-2.0 */
/* Ember guest test agent: shared between its files. */
#ifndef EMBER_AGENT_BLOCK_H
#define EMBER_AGENT_BLOCK_H

#include <linux/printk.h>
#include <linux/types.h>

struct socket;

#define AGENT_LINE(fmt, ...) pr_emerg("EMBER-AGENT " fmt "\n", ##__VA_ARGS__)

extern unsigned int ember_checks_run;
extern unsigned int ember_checks_failed;

/* Runs the PCI and block checks the command line asks for. */
void ember_block_checks(void);

/* Runs the network checks the command line asks for. */
void ember_net_checks(void);

/* Runs the vsock and hwrng checks the command line asks for (vsock.c). */
void ember_vsock_checks(void);

/* Calls fn on each item of a comma-separated list (net.c). */
void ember_each_item(const char *list, void (*fn)(const char *));

/* Reads the current hwrng (the kernel patch's hw_random/core.c). */
int ember_hwrng_read(u8 *buf, size_t size, char *name, size_t name_len);

/* What ember_stream_exchange() did. */
struct ember_xfer {
	u64 sent, recvd, send_us, recv_us;
	unsigned int errors;
	bool recv_ok;
};

/*
 * On a connected stream socket: send send_bytes of the pattern with seed 1,
 * shut down sending, read until the peer closes and check recv_bytes of the
 * pattern with seed 2 (net.c).
 */
void ember_stream_exchange(struct socket *sock, u64 send_bytes, u64 recv_bytes,
			   struct ember_xfer *x);

/* Starts the heartbeat thread if the command line asks for one (beat.c). */
void ember_beat_start(void);

#endif
