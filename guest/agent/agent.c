// SPDX-License-Identifier: GPL-2.0
/*
 * pyvmm agent: entry point, step runner and console output.
 *
 * Runs from late_initcall_sync, i.e. after every driver (virtio-mmio,
 * virtio-fs) has probed and after the initramfs is unpacked, but before
 * the kernel looks for an init program (which could not run here anyway).
 * If /pyvmm/script is absent the agent does nothing and boot continues.
 *
 * Output goes through printk at KERN_EMERG so it shows with "quiet"; every
 * console byte is a VM exit on kvm_pvm, so lines are short and numbers are
 * printed without padding.
 */
#include <linux/kernel.h>
#include <linux/printk.h>
#include <linux/fs.h>
#include <linux/file.h>
#include <linux/initrd.h>
#include <linux/reboot.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/syscalls.h>
#include <linux/timekeeping.h>
#include "agent.h"

#define PYV_SCRIPT_PATH "/pyvmm/script"

void __init pyv_emit(const char *fmt, ...)
{
	char buf[640];
	va_list ap;

	va_start(ap, fmt);
	vscnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	printk(KERN_EMERG "@@pyvmm %s\n", buf);
}

/*
 * Escape bytes that would break "key=value" splitting or the console line:
 * space, controls, quotes, backslash and non-ASCII become \xHH.
 * console.py's unescape() reverses this.
 */
static size_t __init pyv_escape(char *dst, size_t room, const char *src, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	size_t o = 0, i;

	if (!room)
		return 0;
	for (i = 0; i < len; i++) {
		unsigned char c = src[i];

		if (c > 0x20 && c < 0x7f && c != '\\' && c != '"') {
			if (o + 1 >= room)
				break;
			dst[o++] = c;
		} else {
			if (o + 4 >= room)
				break;
			dst[o++] = '\\';
			dst[o++] = 'x';
			dst[o++] = hex[c >> 4];
			dst[o++] = hex[c & 15];
		}
	}
	dst[o] = '\0';
	return o;
}

void __init pyv_extra(struct pyv_out *out, const char *fmt, ...)
{
	va_list ap;

	if (out->len >= PYV_OUT_MAX - 2)
		return;
	out->extra[out->len++] = ' ';
	va_start(ap, fmt);
	out->len += vscnprintf(out->extra + out->len, PYV_OUT_MAX - out->len, fmt, ap);
	va_end(ap);
}

void __init pyv_extra_escaped(struct pyv_out *out, const char *key, const char *val, size_t len)
{
	size_t klen = strlen(key);

	if (out->len + klen + 3 >= PYV_OUT_MAX)
		return;
	out->extra[out->len++] = ' ';
	memcpy(out->extra + out->len, key, klen);
	out->len += klen;
	out->extra[out->len++] = '=';
	out->len += pyv_escape(out->extra + out->len, PYV_OUT_MAX - out->len, val, len);
}

void __init pyv_error(int line, const char *msg, const char *detail)
{
	char esc[96];

	if (detail) {
		pyv_escape(esc, sizeof(esc), detail, strlen(detail));
		pyv_emit("error line=%d msg=\"%s: %s\"", line, msg, esc);
	} else {
		pyv_emit("error line=%d msg=\"%s\"", line, msg);
	}
}

/* Run the steps in order; returns the exit status. */
static int __init pyv_run(struct pyv_step *steps, int nsteps, bool *poweroff)
{
	struct pyv_out *out;
	int i, status = 0;

	out = kmalloc(sizeof(*out), GFP_KERNEL);
	if (!out) {
		pyv_error(0, "out of memory", NULL);
		return 2;
	}
	for (i = 0; i < nsteps; i++) {
		struct pyv_step *st = &steps[i];
		u64 t0, ns;
		int ret, err;
		bool ok;

		memset(out, 0, sizeof(*out));
		t0 = ktime_get_ns();
		ret = st->op->run(st, out);
		ns = ktime_get_ns() - t0;
		err = ret < 0 ? -ret : 0;
		ok = err == st->expect && !out->mismatch;
		out->extra[out->len] = '\0';
		pyv_emit("step=%d op=%s result=%s errno=%d ns=%llu%s", i + 1,
			st->op->name, ok ? "ok" : "fail", err, ns, out->extra);
		if (!ok) {
			status = 1;
			break;
		}
		if (out->exit) {
			status = out->status;
			*poweroff = out->poweroff;
			break;
		}
	}
	kfree(out);
	return status;
}

/*
 * Flush what the steps wrote (writeback cache), report, then reset (or
 * power off: ACPI S5 when the VMM gave ACPI tables; without them there is
 * no power-off method and kernel_power_off() returns, so reset anyway).
 */
static void __init pyv_finish(int status, bool poweroff)
{
	ksys_sync();
	pyv_emit("exit status=%d", status);
	if (poweroff)
		kernel_power_off();
	kernel_restart(NULL);
}

/* Read the whole script; returns its length or -errno. */
static ssize_t __init pyv_read_script(struct file *f, char *buf)
{
	loff_t pos = 0;
	ssize_t n;

	for (;;) {
		if (pos > PYV_SCRIPT_MAX)
			return -EFBIG;
		n = kernel_read(f, buf + pos, PYV_SCRIPT_MAX + 1 - pos, &pos);
		if (n < 0)
			return n;
		if (n == 0)
			return pos;
	}
}

static int __init pyv_agent_init(void)
{
	struct pyv_step *steps;
	struct file *f;
	ssize_t len;
	bool poweroff = false;
	char *text;
	int nsteps, status;

	wait_for_initramfs();
	f = filp_open(PYV_SCRIPT_PATH, O_RDONLY, 0);
	if (IS_ERR(f)) {
		if (PTR_ERR(f) == -ENOENT)
			return 0;	/* no script: an ordinary boot */
		pyv_error(0, "cannot open", PYV_SCRIPT_PATH);
		pyv_finish(2, false);
	}
	text = kvmalloc(PYV_SCRIPT_MAX + 2, GFP_KERNEL);
	steps = kvcalloc(PYV_MAX_STEPS, sizeof(*steps), GFP_KERNEL);
	if (!text || !steps) {
		pyv_error(0, "out of memory", NULL);
		pyv_finish(2, false);
	}
	len = pyv_read_script(f, text);
	fput(f);
	if (len < 0) {
		pyv_error(0, len == -EFBIG ? "script too large" : "cannot read",
			 PYV_SCRIPT_PATH);
		pyv_finish(2, false);
	}
	nsteps = pyv_parse_script(text, len, steps, PYV_MAX_STEPS);
	if (nsteps < 0)
		pyv_finish(2, false);
	pyv_emit("start steps=%d uptime_ns=%llu", nsteps, ktime_get_boottime_ns());
	status = pyv_run(steps, nsteps, &poweroff);
	pyv_finish(status, poweroff);
	return 0;
}
late_initcall_sync(pyv_agent_init);
