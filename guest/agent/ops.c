// SPDX-License-Identifier: GPL-2.0
/*
 * pyvmm agent: the ops. pyv_ops[] at the end is the single table of ops;
 * adding an op means writing its run() (and parse() if its arguments are
 * more than strings) and adding one line there.
 *
 * Each run() does what the matching system call would do, through the
 * in-kernel VFS API (fs/init.c helpers, filp_open + kernel_read/write,
 * vfs_*), so the FUSE requests the host sees are the ones a user-space
 * program would cause. Return value: 0 or -errno.
 */
#include <linux/kernel.h>
#include <linux/fs.h>
#include <linux/file.h>
#include <linux/init_syscalls.h>
#include <linux/namei.h>
#include <linux/mount.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/statfs.h>
#include <linux/xattr.h>
#include <linux/crc32.h>
#include <linux/delay.h>
#include <linux/cpumask.h>
#include <linux/timekeeping.h>
#include <linux/delayed_call.h>
#include <linux/kthread.h>
#include <linux/completion.h>
#include <linux/syscalls.h>
#include <asm/unaligned.h>
#include <uapi/linux/falloc.h>
#include "../internal.h"	/* do_renameat2 */
#include "agent.h"

/* ---- argument parsers ---------------------------------------------------- */

/* SIZE [SEED] for write/append; also truncate's SIZE. */
static const char *__init parse_size_seed(struct pyv_step *st)
{
	const char *err = pyv_parse_u64(st->argv[1], &st->num[0], 1ULL << 40);

	if (!err && st->argc > 2)
		err = pyv_parse_u64(st->argv[2], &st->num[1], U64_MAX);
	return err;
}

static const char *__init parse_stat(struct pyv_step *st)
{
	st->num[0] = 1;
	if (st->argc < 2)
		return NULL;
	if (st->argv[1][0] != 'x')
		return "repeat must look like x100";
	if (pyv_parse_u64(st->argv[1] + 1, &st->num[0], PYV_MAX_REPEAT) || !st->num[0])
		return "bad repeat count";
	return NULL;
}

static const char *__init parse_probe(struct pyv_step *st)
{
	if (pyv_parse_u64(st->argv[1], &st->num[0], 10000) || !st->num[0])
		return "bad name count";
	if (pyv_parse_u64(st->argv[2], &st->num[1], PYV_MAX_REPEAT) || !st->num[1])
		return "bad round count";
	if (st->num[0] * st->num[1] > PYV_MAX_REPEAT)
		return "too many lookups";
	return NULL;
}

static const char *__init parse_exit(struct pyv_step *st)
{
	if (!st->argc)
		return NULL;
	return pyv_parse_u64(st->argv[0], &st->num[0], 255);
}

static const char *__init parse_sleep(struct pyv_step *st)
{
	return pyv_parse_u64(st->argv[0], &st->num[0], 3600 * 1000);
}

/* ttyread N MS: N bytes, waiting at most MS milliseconds in all. */
static const char *__init parse_ttyread(struct pyv_step *st)
{
	const char *err = pyv_parse_u64(st->argv[0], &st->num[0], 64);

	if (!err && !st->num[0])
		err = "count must be 1..64";
	return err ? err : pyv_parse_u64(st->argv[1], &st->num[1], 3600 * 1000);
}

static const char *__init parse_fallocate(struct pyv_step *st)
{
	const char *err = pyv_parse_u64(st->argv[1], &st->num[0], 1ULL << 40);

	if (!err)
		err = pyv_parse_u64(st->argv[2], &st->num[1], 1ULL << 40);
	if (err || st->argc < 4)
		return err;
	if (!strcmp(st->argv[3], "keep"))
		st->flags = FALLOC_FL_KEEP_SIZE;
	else if (!strcmp(st->argv[3], "punch"))
		st->flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
	else
		return "mode must be keep or punch";
	return NULL;
}

static const char *__init parse_rename(struct pyv_step *st)
{
	if (st->argc < 3)
		return NULL;
	if (!strcmp(st->argv[2], "noreplace"))
		st->flags = RENAME_NOREPLACE;
	else if (!strcmp(st->argv[2], "exchange"))
		st->flags = RENAME_EXCHANGE;
	else
		return "flag must be noreplace or exchange";
	return NULL;
}

static const char *__init parse_chmod(struct pyv_step *st)
{
	unsigned int mode;

	if (kstrtouint(st->argv[1], 8, &mode) || mode > 07777)
		return "mode must be octal <= 7777";
	st->num[0] = mode;
	return NULL;
}

/* now | omit | SECONDS[.FRACTION] -> (sec, nsec) */
static const char *__init parse_time(const char *tok, u64 *sec, u64 *nsec)
{
	char buf[24];
	char *dot;
	size_t n;

	if (!strcmp(tok, "now")) {
		*sec = 0;
		*nsec = UTIME_NOW;
		return NULL;
	}
	if (!strcmp(tok, "omit")) {
		*sec = 0;
		*nsec = UTIME_OMIT;
		return NULL;
	}
	n = strlen(tok);
	if (n >= sizeof(buf))
		return "bad time";
	memcpy(buf, tok, n + 1);
	*nsec = 0;
	dot = strchr(buf, '.');
	if (dot) {
		size_t digits = strlen(dot + 1), i;

		*dot = '\0';
		if (digits < 1 || digits > 9 || kstrtoull(dot + 1, 10, nsec))
			return "bad time fraction";
		for (i = digits; i < 9; i++)
			*nsec *= 10;
	}
	if (kstrtoull(buf, 10, sec) || *sec > S64_MAX / 2)
		return "bad time";
	return NULL;
}

static const char *__init parse_utime(struct pyv_step *st)
{
	const char *err = parse_time(st->argv[1], &st->num[0], &st->num[1]);

	return err ? err : parse_time(st->argv[2], &st->num[2], &st->num[3]);
}

static const char *__init parse_setxattr(struct pyv_step *st)
{
	if (st->argc < 4)
		return NULL;
	if (!strcmp(st->argv[3], "create"))
		st->flags = XATTR_CREATE;
	else if (!strcmp(st->argv[3], "replace"))
		st->flags = XATTR_REPLACE;
	else
		return "flag must be create or replace";
	return NULL;
}

/* ---- the data pattern (mirrors guest/script.py:pattern) ------------------ */

#define PYV_GOLDEN 0x9E3779B97F4A7C15ULL

static u64 __init pyv_splitmix(u64 *state)
{
	u64 z = (*state += PYV_GOLDEN);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

/*
 * Fill buf (PYV_CHUNK bytes) with copies of the seed's base block; returns
 * the base block's first word, which pyv_pattern_place() mixes per block.
 * The per-byte cost is one memcpy, paid once per op.
 */
static u64 __init pyv_pattern_init(u8 *buf, u64 seed)
{
	u64 state = seed, v;
	int i;

	for (i = 0; i < PYV_BLOCK / 8; i++) {
		v = pyv_splitmix(&state);
		memcpy(buf + 8 * i, &v, 8);	/* x86: little-endian */
	}
	for (i = 1; i < PYV_CHUNK / PYV_BLOCK; i++)
		memcpy(buf + i * PYV_BLOCK, buf, PYV_BLOCK);
	memcpy(&v, buf, 8);
	return v;
}

/* Make buf hold the pattern's blocks first_block .. first_block+31. */
static void __init pyv_pattern_place(u8 *buf, u64 word0, u64 first_block)
{
	int i;

	for (i = 0; i < PYV_CHUNK / PYV_BLOCK; i++) {
		u64 v = word0 ^ ((first_block + i) * PYV_GOLDEN);

		memcpy(buf + i * PYV_BLOCK, &v, 8);
	}
}

/* ---- helpers ------------------------------------------------------------- */

static int __init pyv_close(struct file *f, int ret)
{
	int err = filp_close(f, NULL);

	return ret ? ret : err;
}

static int __init pyv_getattr(const char *path, struct kstat *ks)
{
	struct path p;
	int err = kern_path(path, LOOKUP_FOLLOW, &p);

	if (err)
		return err;
	err = vfs_getattr(&p, ks, STATX_BASIC_STATS, AT_STATX_SYNC_AS_STAT);
	path_put(&p);
	return err;
}

/* mkdir -p: the initramfs has no mount points of its own. */
static int __init pyv_mkdir_p(char *path)
{
	char *s;
	int err;

	for (s = path + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = '\0';
		err = init_mkdir(path, 0755);
		*s = '/';
		if (err && err != -EEXIST)
			return err;
	}
	err = init_mkdir(path, 0755);
	return err == -EEXIST ? 0 : err;
}

/* ---- ops ----------------------------------------------------------------- */

static int __init run_echo(struct pyv_step *st, struct pyv_out *out)
{
	char buf[PYV_OUT_MAX];
	int i, len = 0;

	buf[0] = '\0';
	for (i = 0; i < st->argc; i++)
		len += scnprintf(buf + len, sizeof(buf) - len, "%s%s",
				 i ? " " : "", st->argv[i]);
	pyv_emit("echo %s", buf);
	return 0;
}

static int __init run_exit(struct pyv_step *st, struct pyv_out *out)
{
	out->exit = true;
	out->status = st->num[0];
	return 0;
}

static int __init run_poweroff(struct pyv_step *st, struct pyv_out *out)
{
	out->exit = true;
	out->poweroff = true;
	out->status = st->argc ? st->num[0] : 0;
	return 0;
}

static int __init run_sleep(struct pyv_step *st, struct pyv_out *out)
{
	msleep(st->num[0]);
	return 0;
}

static int __init run_uptime(struct pyv_step *st, struct pyv_out *out)
{
	pyv_extra(out, "uptime_ns=%llu", ktime_get_boottime_ns());
	return 0;
}

static int __init run_cpus(struct pyv_step *st, struct pyv_out *out)
{
	pyv_extra(out, "cpus=%u", num_online_cpus());
	return 0;
}

static int __init run_meminfo(struct pyv_step *st, struct pyv_out *out)
{
	struct sysinfo si;

	si_meminfo(&si);
	pyv_extra(out, "total_kb=%llu free_kb=%llu",
		 (u64)si.totalram * si.mem_unit >> 10,
		 (u64)si.freeram * si.mem_unit >> 10);
	return 0;
}

static int __init run_mark(struct pyv_step *st, struct pyv_out *out)
{
	pyv_extra(out, "name=%s", st->argv[0]);
	return 0;
}

/* mount TAG DIR [OPTIONS]: OPTIONS (e.g. dax=always) is virtiofs's comma-separated mount data. */
static int __init run_mount(struct pyv_step *st, struct pyv_out *out)
{
	int err = pyv_mkdir_p(st->argv[1]);

	return err ? err : init_mount(st->argv[0], st->argv[1], "virtiofs", 0,
				      st->argc > 2 ? st->argv[2] : NULL);
}

/* Time `count` lookups+getattrs of the paths (round robin). */
static int __init pyv_stat_loop(char **paths, int npaths, u64 count,
			       struct pyv_step *st, struct pyv_out *out)
{
	struct kstat ks, last = {};
	u64 i, ok = 0, total = 0, t0;
	int err = 0;

	for (i = 0; i < count; i++) {
		t0 = ktime_get_ns();
		err = pyv_getattr(paths[i % npaths], &ks);
		total += ktime_get_ns() - t0;
		if (!err) {
			ok++;
			last = ks;
		}
		if (-err != st->expect)
			out->mismatch = true;
	}
	pyv_extra(out, "count=%llu ok=%llu ns_per_op=%llu", count, ok,
		 div64_u64(total, count));
	if (ok && npaths == 1)
		pyv_extra(out, "size=%lld mode=0%o nlink=%u mtime=%lld",
			 last.size, last.mode, last.nlink, last.mtime.tv_sec);
	return err;
}

static int __init run_stat(struct pyv_step *st, struct pyv_out *out)
{
	return pyv_stat_loop(&st->argv[0], 1, st->num[0], st, out);
}

static int __init run_probe(struct pyv_step *st, struct pyv_out *out)
{
	int n = st->num[0], i, err;
	char **paths = kcalloc(n, sizeof(*paths), GFP_KERNEL);

	if (!paths)
		return -ENOMEM;
	for (i = 0; i < n; i++) {
		paths[i] = kasprintf(GFP_KERNEL, "%s/p%d", st->argv[0], i);
		if (!paths[i]) {
			err = -ENOMEM;
			goto out;
		}
	}
	err = pyv_stat_loop(paths, n, st->num[0] * st->num[1], st, out);
out:
	for (i = 0; i < n; i++)
		kfree(paths[i]);
	kfree(paths);
	return err;
}

static int __init run_create(struct pyv_step *st, struct pyv_out *out)
{
	struct file *f = filp_open(st->argv[0], O_CREAT | O_EXCL | O_WRONLY, 0644);

	return IS_ERR(f) ? PTR_ERR(f) : pyv_close(f, 0);
}

static int __init pyv_write(struct pyv_step *st, struct pyv_out *out, int oflags)
{
	u64 size = st->num[0], done = 0;
	struct file *f;
	loff_t pos = 0;
	u64 word0;
	u8 *buf;
	int ret = 0;

	f = filp_open(st->argv[0], oflags | O_WRONLY | O_CREAT | O_LARGEFILE, 0644);
	if (IS_ERR(f))
		return PTR_ERR(f);
	buf = kmalloc(PYV_CHUNK, GFP_KERNEL);
	if (!buf)
		return pyv_close(f, -ENOMEM);
	word0 = pyv_pattern_init(buf, st->num[1]);
	while (done < size) {
		u64 first = done / PYV_BLOCK, skip = done % PYV_BLOCK;
		size_t n = min_t(u64, size - done, PYV_CHUNK - skip);
		ssize_t w;

		pyv_pattern_place(buf, word0, first);
		w = kernel_write(f, buf + skip, n, &pos);
		if (w < 0) {
			ret = w;
			break;
		}
		if (w == 0) {
			ret = -EIO;
			break;
		}
		done += w;
	}
	kfree(buf);
	pyv_extra(out, "size=%llu", done);
	return pyv_close(f, ret);
}

static int __init run_write(struct pyv_step *st, struct pyv_out *out)
{
	return pyv_write(st, out, O_TRUNC);
}

static int __init run_append(struct pyv_step *st, struct pyv_out *out)
{
	return pyv_write(st, out, O_APPEND);
}

/* overwrite: write's bytes from offset 0 without O_TRUNC (in place: a DAX file's writes go
 * through its mapping only while they do not extend it). */
static int __init run_overwrite(struct pyv_step *st, struct pyv_out *out)
{
	return pyv_write(st, out, 0);
}

/* read's checksum: CRC-32 (zlib's), or "sum64", about 5x cheaper in an emulated guest. */
#define PYV_SUM_CRC32	0
#define PYV_SUM_SUM64	1

static const char *__init parse_read(struct pyv_step *st)
{
	st->num[0] = PYV_SUM_CRC32;
	if (st->argc < 2 || !strcmp(st->argv[1], "crc32"))
		return NULL;
	if (!strcmp(st->argv[1], "sum64")) {
		st->num[0] = PYV_SUM_SUM64;
		return NULL;
	}
	return "checksum must be crc32 or sum64";
}

/*
 * sum64: for each 4 KiB block b (numbered from 0, the last one possibly
 * short), (b + 1) * (sum of its little-endian u64 words, a short tail
 * zero-padded), all mod 2^64. The block weight catches data served at the
 * wrong offset; guest/script.py's sum64() is the host's copy.
 */
static u64 __init pyv_sum64(u64 acc, const u8 *buf, size_t n, u64 first_byte)
{
	size_t i = 0;

	while (i < n) {
		u64 block = (first_byte + i) / PYV_BLOCK;
		size_t end = min_t(size_t, n, i + PYV_BLOCK - (first_byte + i) % PYV_BLOCK);
		u64 sum = 0, word;

		/* Eight words a pass: in the emulator every instruction costs about the same, so
		 * the loop's own increment, compare and branch are paid once per 64 bytes. */
		for (; i + 64 <= end; i += 64) {
			const u8 *p = buf + i;

			sum += get_unaligned_le64(p) + get_unaligned_le64(p + 8) +
			       get_unaligned_le64(p + 16) + get_unaligned_le64(p + 24) +
			       get_unaligned_le64(p + 32) + get_unaligned_le64(p + 40) +
			       get_unaligned_le64(p + 48) + get_unaligned_le64(p + 56);
		}
		for (; i + 8 <= end; i += 8)
			sum += get_unaligned_le64(buf + i);
		if (i < end) {
			word = 0;
			memcpy(&word, buf + i, end - i);
			sum += le64_to_cpu(word);
			i = end;
		}
		acc += (block + 1) * sum;
	}
	return acc;
}

static int __init run_read(struct pyv_step *st, struct pyv_out *out)
{
	struct file *f = filp_open(st->argv[0], O_RDONLY | O_LARGEFILE, 0);
	u32 crc = ~0U;
	u64 sum = 0;
	loff_t pos = 0;
	u8 *buf;
	int ret = 0;

	if (IS_ERR(f))
		return PTR_ERR(f);
	buf = kmalloc(PYV_CHUNK, GFP_KERNEL);
	if (!buf)
		return pyv_close(f, -ENOMEM);
	for (;;) {
		loff_t at = pos;
		ssize_t n = kernel_read(f, buf, PYV_CHUNK, &pos);

		if (n < 0) {
			ret = n;
			break;
		}
		if (n == 0)
			break;
		if (st->num[0] == PYV_SUM_SUM64)
			sum = pyv_sum64(sum, buf, n, at);
		else
			crc = crc32_le(crc, buf, n);
	}
	kfree(buf);
	if (st->num[0] == PYV_SUM_SUM64)
		pyv_extra(out, "size=%lld sum64=0x%016llx", pos, sum);
	else
		pyv_extra(out, "size=%lld crc32=0x%08x", pos, crc ^ ~0U);
	return pyv_close(f, ret);
}

static int __init run_truncate(struct pyv_step *st, struct pyv_out *out)
{
	struct path p;
	int err = kern_path(st->argv[0], LOOKUP_FOLLOW, &p);

	if (err)
		return err;
	err = vfs_truncate(&p, st->num[0]);
	path_put(&p);
	return err;
}

static int __init run_fallocate(struct pyv_step *st, struct pyv_out *out)
{
	struct file *f = filp_open(st->argv[0], O_WRONLY | O_LARGEFILE, 0);

	if (IS_ERR(f))
		return PTR_ERR(f);
	return pyv_close(f, vfs_fallocate(f, st->flags, st->num[0], st->num[1]));
}

static int __init run_mkdir(struct pyv_step *st, struct pyv_out *out)
{
	return init_mkdir(st->argv[0], 0755);
}

static int __init run_rmdir(struct pyv_step *st, struct pyv_out *out)
{
	return init_rmdir(st->argv[0]);
}

static int __init run_unlink(struct pyv_step *st, struct pyv_out *out)
{
	return init_unlink(st->argv[0]);
}

static int __init run_rename(struct pyv_step *st, struct pyv_out *out)
{
	return do_renameat2(AT_FDCWD, getname_kernel(st->argv[0]),
			    AT_FDCWD, getname_kernel(st->argv[1]), st->flags);
}

static int __init run_symlink(struct pyv_step *st, struct pyv_out *out)
{
	return init_symlink(st->argv[0], st->argv[1]);
}

static int __init run_readlink(struct pyv_step *st, struct pyv_out *out)
{
	DEFINE_DELAYED_CALL(done);
	const char *target;
	struct path p;
	int err = kern_path(st->argv[0], 0, &p);

	if (err)
		return err;
	target = vfs_get_link(p.dentry, &done);
	if (IS_ERR(target)) {
		err = PTR_ERR(target);
	} else {
		pyv_extra_escaped(out, "target", target, strlen(target));
		do_delayed_call(&done);
	}
	path_put(&p);
	return err;
}

static int __init run_link(struct pyv_step *st, struct pyv_out *out)
{
	return init_link(st->argv[0], st->argv[1]);
}

static int __init run_chmod(struct pyv_step *st, struct pyv_out *out)
{
	return init_chmod(st->argv[0], st->num[0]);
}

static int __init run_utime(struct pyv_step *st, struct pyv_out *out)
{
	struct timespec64 ts[2] = {
		{ .tv_sec = st->num[0], .tv_nsec = st->num[1] },
		{ .tv_sec = st->num[2], .tv_nsec = st->num[3] },
	};

	return init_utimes(st->argv[0], ts);
}

struct pyv_dirctx {
	struct dir_context ctx;
	u64 entries;
	bool any;
};

static bool __init pyv_filldir(struct dir_context *ctx, const char *name, int len,
			      loff_t off, u64 ino, unsigned int type)
{
	struct pyv_dirctx *d = container_of(ctx, struct pyv_dirctx, ctx);

	d->any = true;
	if (!(len == 1 && name[0] == '.') &&
	    !(len == 2 && name[0] == '.' && name[1] == '.'))
		d->entries++;
	return true;
}

static int __init run_readdir(struct pyv_step *st, struct pyv_out *out)
{
	struct pyv_dirctx d = { .ctx.actor = pyv_filldir };
	struct file *f = filp_open(st->argv[0], O_RDONLY | O_DIRECTORY, 0);
	int err;

	if (IS_ERR(f))
		return PTR_ERR(f);
	do {
		d.any = false;
		err = iterate_dir(f, &d.ctx);
	} while (!err && d.any);
	pyv_extra(out, "entries=%llu", d.entries);
	return pyv_close(f, err);
}

static int __init run_setxattr(struct pyv_step *st, struct pyv_out *out)
{
	struct path p;
	int err = kern_path(st->argv[0], LOOKUP_FOLLOW, &p);

	if (err)
		return err;
	err = mnt_want_write(p.mnt);
	if (!err) {
		err = vfs_setxattr(mnt_user_ns(p.mnt), p.dentry, st->argv[1],
				   st->argv[2], strlen(st->argv[2]), st->flags);
		mnt_drop_write(p.mnt);
	}
	path_put(&p);
	return err;
}

static int __init run_getxattr(struct pyv_step *st, struct pyv_out *out)
{
	struct path p;
	ssize_t n;
	char *buf;
	int err = kern_path(st->argv[0], LOOKUP_FOLLOW, &p);

	if (err)
		return err;
	buf = kvmalloc(XATTR_SIZE_MAX, GFP_KERNEL);
	if (!buf) {
		path_put(&p);
		return -ENOMEM;
	}
	n = vfs_getxattr(mnt_user_ns(p.mnt), p.dentry, st->argv[1], buf, XATTR_SIZE_MAX);
	if (n >= 0) {
		pyv_extra_escaped(out, "value", buf, min_t(size_t, n, 128));
		pyv_extra(out, "size=%zd", n);
	}
	kvfree(buf);
	path_put(&p);
	return n < 0 ? n : 0;
}

static int __init run_listxattr(struct pyv_step *st, struct pyv_out *out)
{
	struct path p;
	ssize_t n, i;
	u64 count = 0;
	char *buf;
	int err = kern_path(st->argv[0], LOOKUP_FOLLOW, &p);

	if (err)
		return err;
	buf = kvmalloc(XATTR_LIST_MAX, GFP_KERNEL);
	if (!buf) {
		path_put(&p);
		return -ENOMEM;
	}
	n = vfs_listxattr(p.dentry, buf, XATTR_LIST_MAX);
	for (i = 0; i < n; i++)
		if (buf[i] == '\0')
			count++;
	if (n >= 0)
		pyv_extra(out, "count=%llu", count);
	kvfree(buf);
	path_put(&p);
	return n < 0 ? n : 0;
}

static int __init run_statfs(struct pyv_step *st, struct pyv_out *out)
{
	struct kstatfs s;
	struct path p;
	int err = kern_path(st->argv[0], LOOKUP_FOLLOW, &p);

	if (err)
		return err;
	err = vfs_statfs(&p, &s);
	path_put(&p);
	if (!err)
		pyv_extra(out, "bsize=%ld blocks=%llu bfree=%llu",
			 s.f_bsize, s.f_blocks, s.f_bfree);
	return err;
}

static int __init run_fsync(struct pyv_step *st, struct pyv_out *out)
{
	struct file *f = filp_open(st->argv[0], O_RDONLY | O_LARGEFILE, 0);

	if (IS_ERR(f))
		return PTR_ERR(f);
	return pyv_close(f, vfs_fsync(f, 0));
}

/*
 * Read what was typed on the console: /dev/console (the serial console,
 * ttyS0) opened like a program would, so the 8250 driver enables its
 * receive interrupt and the line discipline delivers the bytes. Opening
 * the port flushes its receive FIFO (as on real hardware), so the step
 * announces "echo ttyread open" once it is open: type after that line.
 * Polled with O_NONBLOCK so the step gives up after its time limit
 * (ETIMEDOUT).
 */
static int __init run_ttyread(struct pyv_step *st, struct pyv_out *out)
{
	struct file *f = filp_open("/dev/console", O_RDONLY | O_NOCTTY | O_NONBLOCK, 0);
	u64 want = st->num[0], waited = 0;
	char buf[64];
	size_t got = 0;
	int ret = 0;

	if (IS_ERR(f))
		return PTR_ERR(f);
	pyv_emit("echo ttyread open");
	while (got < want) {
		loff_t pos = 0;
		ssize_t n = kernel_read(f, buf + got, want - got, &pos);

		if (n > 0) {
			got += n;
			continue;
		}
		if (n < 0 && n != -EAGAIN) {
			ret = n;
			break;
		}
		if (waited >= st->num[1]) {
			ret = -ETIMEDOUT;
			break;
		}
		msleep(10);
		waited += 10;
	}
	pyv_extra(out, "bytes=%zu", got);
	pyv_extra_escaped(out, "text", buf, got);
	return pyv_close(f, ret);
}

static int __init run_sync(struct pyv_step *st, struct pyv_out *out)
{
	ksys_sync();	/* every mounted file system: SYNCFS on each virtio-fs mount */
	return 0;
}

/*
 * parallel K OP ARGS...: K copies of one step at once, each on its own
 * kernel thread bound to CPU (copy mod online CPUs), so several guest
 * threads keep FUSE requests in flight together. The step succeeds when
 * every copy meets the expectation (written once, after everything); it
 * reports copies=K, each copy's errno and ns, and copy 0's own keys.
 */
static const char *__init parse_parallel(struct pyv_step *st)
{
	struct pyv_step *in;
	const char *err;
	int i;

	if (pyv_parse_u64(st->argv[0], &st->num[0], PYV_MAX_COPIES) || !st->num[0])
		return "copies must be 1..8";
	in = kzalloc(sizeof(*in), GFP_KERNEL);
	if (!in)
		return "out of memory";
	in->line = st->line;
	in->expect = st->expect;	/* repeated ops (probe, stat xN) judge each try by it */
	in->op = pyv_find_op(st->argv[1]);
	if (!in->op || in->op->run == run_exit || in->op->run == run_poweroff)
		return "parallel needs an op that returns (not exit/poweroff)";
	if (in->op->parse == parse_parallel)
		return "parallel cannot nest";
	in->argc = st->argc - 2;
	if (in->argc < in->op->min_args || in->argc > in->op->max_args)
		return "wrong number of arguments for the parallel op";
	for (i = 0; i < in->argc; i++)
		in->argv[i] = st->argv[i + 2];
	if (in->op->parse) {
		err = in->op->parse(in);
		if (err)
			return err;
	}
	st->inner = in;
	return NULL;
}

struct pyv_copy {
	struct pyv_step step;
	struct pyv_out out;
	struct completion done;
	int ret;
	u64 ns;
};

static int __init pyv_copy_main(void *arg)
{
	struct pyv_copy *c = arg;
	u64 t0 = ktime_get_ns();

	c->ret = c->step.op->run(&c->step, &c->out);
	c->ns = ktime_get_ns() - t0;
	complete(&c->done);
	return 0;
}

static int __init run_parallel(struct pyv_step *st, struct pyv_out *out)
{
	int k = st->num[0], i, cpus = num_online_cpus(), first_err = 0;
	struct pyv_copy *c = kcalloc(k, sizeof(*c), GFP_KERNEL);

	if (!c)
		return -ENOMEM;
	for (i = 0; i < k; i++) {
		struct task_struct *t;

		c[i].step = *st->inner;
		init_completion(&c[i].done);
		t = kthread_create(pyv_copy_main, &c[i], "pyvmm-par%d", i);
		if (IS_ERR(t)) {
			c[i].ret = PTR_ERR(t);
			complete(&c[i].done);
			continue;
		}
		kthread_bind(t, cpumask_nth(i % cpus, cpu_online_mask));
		wake_up_process(t);
	}
	pyv_extra(out, "copies=%d", k);
	for (i = 0; i < k; i++) {
		wait_for_completion(&c[i].done);
		pyv_extra(out, "errno%d=%d ns%d=%llu", i, c[i].ret < 0 ? -c[i].ret : 0, i, c[i].ns);
		if (c[i].out.mismatch || (c[i].ret < 0 ? -c[i].ret : 0) != st->expect)
			out->mismatch = true;
		if (c[i].ret < 0 && !first_err)
			first_err = c[i].ret;
	}
	c[0].out.extra[c[0].out.len] = '\0';
	if (c[0].out.len)
		pyv_extra(out, "%s", c[0].out.extra + 1);	/* its keys, without the space */
	kfree(c);
	/* the copies were judged one by one; the step's own errno is the expectation met */
	return out->mismatch ? first_err : -st->expect;
}

/* ---- the op table -------------------------------------------------------- */

const struct pyv_op pyv_ops[] __initconst = {
	/* name		min max	parse			run */
	{ "echo",	0, PYV_MAX_ARGS, NULL,		run_echo },
	{ "exit",	1, 1,	parse_exit,		run_exit },
	{ "poweroff",	0, 1,	parse_exit,		run_poweroff },
	{ "sleep",	1, 1,	parse_sleep,		run_sleep },
	{ "uptime",	0, 0,	NULL,			run_uptime },
	{ "cpus",	0, 0,	NULL,			run_cpus },
	{ "meminfo",	0, 0,	NULL,			run_meminfo },
	{ "mark",	1, 1,	NULL,			run_mark },
	{ "mount",	2, 3,	NULL,			run_mount },
	{ "stat",	1, 2,	parse_stat,		run_stat },
	{ "probe",	3, 3,	parse_probe,		run_probe },
	{ "create",	1, 1,	NULL,			run_create },
	{ "write",	2, 3,	parse_size_seed,	run_write },
	{ "append",	2, 3,	parse_size_seed,	run_append },
	{ "overwrite",	2, 3,	parse_size_seed,	run_overwrite },
	{ "read",	1, 2,	parse_read,		run_read },
	{ "truncate",	2, 2,	parse_size_seed,	run_truncate },
	{ "fallocate",	3, 4,	parse_fallocate,	run_fallocate },
	{ "mkdir",	1, 1,	NULL,			run_mkdir },
	{ "rmdir",	1, 1,	NULL,			run_rmdir },
	{ "unlink",	1, 1,	NULL,			run_unlink },
	{ "rename",	2, 3,	parse_rename,		run_rename },
	{ "symlink",	2, 2,	NULL,			run_symlink },
	{ "readlink",	1, 1,	NULL,			run_readlink },
	{ "link",	2, 2,	NULL,			run_link },
	{ "chmod",	2, 2,	parse_chmod,		run_chmod },
	{ "utime",	3, 3,	parse_utime,		run_utime },
	{ "readdir",	1, 1,	NULL,			run_readdir },
	{ "setxattr",	3, 4,	parse_setxattr,		run_setxattr },
	{ "getxattr",	2, 2,	NULL,			run_getxattr },
	{ "listxattr",	1, 1,	NULL,			run_listxattr },
	{ "statfs",	1, 1,	NULL,			run_statfs },
	{ "fsync",	1, 1,	NULL,			run_fsync },
	{ "sync",	0, 0,	NULL,			run_sync },
	{ "ttyread",	2, 2,	parse_ttyread,		run_ttyread },
	{ "parallel",	2, PYV_MAX_ARGS, parse_parallel,	run_parallel },
	{ NULL }
};
