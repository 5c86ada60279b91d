/* SPDX-License-Identifier: GPL-2.0 */
/* Ember guest test agent: shared between its files. */
#ifndef EMBER_AGENT_BLOCK_H
#define EMBER_AGENT_BLOCK_H

#include <linux/printk.h>

#define AGENT_LINE(fmt, ...) pr_emerg("EMBER-AGENT " fmt "\n", ##__VA_ARGS__)

extern unsigned int ember_checks_run;
extern unsigned int ember_checks_failed;

/* Runs the PCI and block checks the command line asks for. */
void ember_block_checks(void);

/* Runs the network checks the command line asks for. */
void ember_net_checks(void);

/* Starts the heartbeat thread if the command line asks for one (beat.c). */
void ember_beat_start(void);

#endif
