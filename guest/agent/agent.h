/* SPDX-License-Identifier: GPL-2.0 */
/*
 * pyvmm in-kernel test agent: shared declarations.
 *
 * Why in the kernel: on the kvm_pvm /dev/kvm guest user space cannot enter
 * the kernel (its first syscall faults), so the agent that drives file
 * system tests is a built-in initcall instead of an init program. Guest
 * kernel code runs ~1000x slower than native there, so everything here is
 * plain C with as little per-byte work as possible. All of it is __init:
 * the agent runs once, before free_initmem(), and ends with a machine reset.
 *
 * The script language and the console protocol are specified in the
 * project's spec ("Guest agent protocol"); guest/script.py and
 * guest/console.py are the host-side halves.
 */
#ifndef PYVMM_AGENT_H
#define PYVMM_AGENT_H

#include <linux/types.h>
#include <linux/init.h>
#include <linux/compiler.h>

#define PYV_MAX_ARGS	16		/* tokens after the op name */
#define PYV_MAX_STEPS	4096
#define PYV_SCRIPT_MAX	(256 * 1024)
#define PYV_OUT_MAX	480		/* extra "key=value" text per step line */
/*
 * I/O chunk for write/append/read. Its buffer is kmalloc'd, never vmalloc'd: on a share with
 * cache=never (FOPEN_DIRECT_IO) FUSE hands a kernel buffer to virtio-fs as one scatterlist entry
 * by its linear address, which must be physically contiguous.
 */
#define PYV_CHUNK	(128 * 1024)
#define PYV_BLOCK	4096		/* pattern block, see guest/script.py */
#define PYV_MAX_REPEAT	1000000		/* stat xN / probe N*ROUNDS */
#define PYV_MAX_COPIES	8		/* parallel K: at most one copy per possible vCPU */

struct pyv_step;
struct pyv_out;

/*
 * One entry per op: the only place an op is declared. parse() checks and
 * converts st->argv into st->num/st->flags (or is NULL when the argument
 * count is all there is to check) and returns 0 or a static error message;
 * run() returns 0 or -errno and may add extra keys to *out.
 */
struct pyv_op {
	const char *name;
	u8 min_args;
	u8 max_args;
	const char *(*parse)(struct pyv_step *st);
	int (*run)(struct pyv_step *st, struct pyv_out *out);
};

struct pyv_step {
	const struct pyv_op *op;
	int line;			/* 1-based line in the script */
	int expect;			/* expected errno (positive), 0 = success */
	int argc;
	char *argv[PYV_MAX_ARGS];	/* NUL-terminated tokens inside the script buffer */
	u64 num[4];
	unsigned int flags;
	struct pyv_step *inner;		/* parallel: the step each copy runs */
};

struct pyv_out {
	char extra[PYV_OUT_MAX];
	int len;
	bool mismatch;	/* a repeated op (stat xN, probe) saw an unexpected outcome */
	bool exit;	/* exit/poweroff ran: stop with status */
	bool poweroff;	/* ... and power off (ACPI S5) instead of resetting */
	int status;
	bool echo;	/* print the joined arguments on their own line first */
};

struct pyv_errno {
	const char *name;
	int num;
};

extern const struct pyv_op pyv_ops[];
extern const struct pyv_errno pyv_errnos[];

/* parse.c */
int pyv_parse_script(char *text, size_t len, struct pyv_step *steps, int max_steps);
const char *pyv_parse_u64(const char *tok, u64 *val, u64 max);
int pyv_errno_lookup(const char *name);
const struct pyv_op *pyv_find_op(const char *name);

/* agent.c */
void pyv_extra(struct pyv_out *out, const char *fmt, ...) __printf(2, 3);
void pyv_extra_escaped(struct pyv_out *out, const char *key, const char *val, size_t len);
void pyv_emit(const char *fmt, ...) __printf(1, 2);
void pyv_error(int line, const char *msg, const char *detail);

#endif
