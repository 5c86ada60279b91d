// SPDX-License-Identifier: GPL-2.0
/*
 * Ctrl-Alt-Del without a virtual terminal.
 *
 * On a distribution kernel the VT keyboard handler turns Ctrl-Alt-Del into
 * ctrl_alt_del() (a reboot, or SIGINT to init if init asked for that). Ember's
 * guest kernel has no VT: registering its 63 consoles costs 4 s of emulated
 * boot on the project's software hypervisor. This input handler does the
 * same thing for any keyboard: Ctrl and Alt held, Delete pressed, and it
 * calls ctrl_alt_del(). It is always on (not only with ember.agent=on), as
 * the VT handler would be; the keyboard itself is the real i8042 and atkbd.
 *
 * The power button: the ACPI button driver (PNP0C0C, notified by ember's
 * Generic Event Device) reports KEY_POWER, and on a distribution that is
 * systemd-logind's cue to shut down. With no user space, this handler
 * does it: it logs `EMBER-AGENT power_button pressed=1` and powers the
 * machine off (through ACPI's sleep register) from a work item, as the
 * input event arrives in atomic context.
 */

#include <linux/init.h>
#include <linux/input.h>
#include <linux/reboot.h>
#include <linux/slab.h>
#include <linux/workqueue.h>

static bool ctrl_down;
static bool alt_down;

static void ember_power_off(struct work_struct *work)
{
	kernel_power_off();
}
static DECLARE_WORK(ember_power_work, ember_power_off);

static void ember_cad_event(struct input_handle *handle, unsigned int type,
			    unsigned int code, int value)
{
	if (type != EV_KEY)
		return;
	switch (code) {
	case KEY_LEFTCTRL:
	case KEY_RIGHTCTRL:
		ctrl_down = value != 0;
		break;
	case KEY_LEFTALT:
	case KEY_RIGHTALT:
		alt_down = value != 0;
		break;
	case KEY_DELETE:
		/* A press (1), not a release (0) or autorepeat (2). */
		if (value == 1 && ctrl_down && alt_down)
			ctrl_alt_del();
		break;
	case KEY_POWER:
		if (value == 1) {
			pr_emerg("EMBER-AGENT power_button pressed=1\n");
			schedule_work(&ember_power_work);
		}
		break;
	}
}

static int ember_cad_connect(struct input_handler *handler,
			     struct input_dev *dev,
			     const struct input_device_id *id)
{
	struct input_handle *handle;
	int error;

	handle = kzalloc(sizeof(*handle), GFP_KERNEL);
	if (!handle)
		return -ENOMEM;
	handle->dev = dev;
	handle->handler = handler;
	handle->name = "ember_cad";
	error = input_register_handle(handle);
	if (error)
		goto err_free;
	error = input_open_device(handle);
	if (error)
		goto err_unregister;
	return 0;

err_unregister:
	input_unregister_handle(handle);
err_free:
	kfree(handle);
	return error;
}

static void ember_cad_disconnect(struct input_handle *handle)
{
	input_close_device(handle);
	input_unregister_handle(handle);
	kfree(handle);
}

static const struct input_device_id ember_cad_ids[] = {
	{
		.flags = INPUT_DEVICE_ID_MATCH_EVBIT | INPUT_DEVICE_ID_MATCH_KEYBIT,
		.evbit = { BIT_MASK(EV_KEY) },
		.keybit = { [BIT_WORD(KEY_DELETE)] = BIT_MASK(KEY_DELETE) },
	},
	{
		.flags = INPUT_DEVICE_ID_MATCH_EVBIT | INPUT_DEVICE_ID_MATCH_KEYBIT,
		.evbit = { BIT_MASK(EV_KEY) },
		.keybit = { [BIT_WORD(KEY_POWER)] = BIT_MASK(KEY_POWER) },
	},
	{ },
};

static struct input_handler ember_cad_handler = {
	.event = ember_cad_event,
	.connect = ember_cad_connect,
	.disconnect = ember_cad_disconnect,
	.name = "ember_cad",
	.id_table = ember_cad_ids,
};

static int __init ember_cad_init(void)
{
	return input_register_handler(&ember_cad_handler);
}
device_initcall(ember_cad_init);
