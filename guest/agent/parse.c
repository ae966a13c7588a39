// SPDX-License-Identifier: GPL-2.0
/*
 * pyvmm agent: script tokenizer and validator.
 *
 * The whole script is parsed and checked before any step runs, so a typo
 * on the last line cannot leave a half-done test behind: the first bad
 * line prints "@@pyvmm error line=N msg=..." and nothing runs (status 2).
 * Tokens stay in the script buffer (separators are overwritten with NULs),
 * so steps cost no allocation per argument.
 */
#include <linux/kernel.h>
#include <linux/string.h>
#include "agent.h"

static bool __init pyv_is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\r';
}

int __init pyv_errno_lookup(const char *name)
{
	const struct pyv_errno *e;

	if (!strcmp(name, "0") || !strcmp(name, "OK") || !strcmp(name, "ok"))
		return 0;
	for (e = pyv_errnos; e->name; e++)
		if (!strcmp(e->name, name))
			return e->num;
	return -1;
}

/*
 * Parse an unsigned integer: decimal, 0x hex or 0 octal (kstrtoull base 0),
 * with an optional binary K/M/G suffix so scripts can say "write f 1M".
 */
const char *__init pyv_parse_u64(const char *tok, u64 *val, u64 max)
{
	char buf[24];
	size_t len = strlen(tok);
	unsigned int shift = 0;
	u64 v;

	if (len == 0 || len >= sizeof(buf))
		return "bad number";
	memcpy(buf, tok, len + 1);
	switch (buf[len - 1]) {
	case 'K': shift = 10; break;
	case 'M': shift = 20; break;
	case 'G': shift = 30; break;
	}
	if (shift) {
		if (len == 1)
			return "bad number";
		buf[len - 1] = '\0';
	}
	if (kstrtoull(buf, 0, &v))
		return "bad number";
	if (v > (max >> shift))
		return "number too large";
	*val = v << shift;
	return NULL;
}

const struct pyv_op *__init pyv_find_op(const char *name)
{
	const struct pyv_op *op;

	for (op = pyv_ops; op->name; op++)
		if (!strcmp(op->name, name))
			return op;
	return NULL;
}

/* Split one line (NUL-terminated, in place). Returns the token count or -1. */
static int __init pyv_tokenize(char *s, char **tok, int max)
{
	int n = 0;

	for (;;) {
		while (pyv_is_space(*s))
			*s++ = '\0';
		if (!*s)
			return n;
		if (n == max)
			return -1;
		tok[n++] = s;
		while (*s && !pyv_is_space(*s))
			s++;
	}
}

/*
 * Parse text[0..len) (the buffer must have room for text[len] = NUL) into
 * steps[]. Returns the number of steps, or -1 after printing the error line.
 */
int __init pyv_parse_script(char *text, size_t len, struct pyv_step *steps, int max_steps)
{
	char *p = text, *end = text + len;
	char *tok[PYV_MAX_ARGS + 2];
	int line = 0, nsteps = 0;

	*end = '\0';
	while (p < end) {
		char *eol = memchr(p, '\n', end - p);
		struct pyv_step *st;
		const char *err;
		char *c;
		int ntok, nargs, i;

		if (!eol)
			eol = end;
		*eol = '\0';
		line++;
		for (c = p; c < eol; c++) {
			/* also catches NUL bytes, which would cut the line short */
			if ((unsigned char)*c < 0x20 && *c != '\t' && *c != '\r') {
				pyv_error(line, "control character in line", NULL);
				return -1;
			}
		}
		ntok = pyv_tokenize(p, tok, ARRAY_SIZE(tok));
		p = eol + 1;
		if (ntok < 0) {
			pyv_error(line, "too many arguments", NULL);
			return -1;
		}
		if (ntok == 0 || tok[0][0] == '#')
			continue;
		if (nsteps == max_steps) {
			pyv_error(line, "too many steps", NULL);
			return -1;
		}
		st = &steps[nsteps];
		memset(st, 0, sizeof(*st));
		st->line = line;
		st->op = pyv_find_op(tok[0]);
		if (!st->op) {
			pyv_error(line, "unknown op", tok[0]);
			return -1;
		}
		nargs = ntok - 1;
		if (nargs > 0 && !strncmp(tok[ntok - 1], "expect=", 7)) {
			st->expect = pyv_errno_lookup(tok[ntok - 1] + 7);
			if (st->expect < 0) {
				pyv_error(line, "unknown errno name", tok[ntok - 1] + 7);
				return -1;
			}
			nargs--;
		}
		if (nargs < st->op->min_args) {
			pyv_error(line, "too few arguments for", st->op->name);
			return -1;
		}
		if (nargs > st->op->max_args || nargs > PYV_MAX_ARGS) {
			pyv_error(line, "too many arguments for", st->op->name);
			return -1;
		}
		st->argc = nargs;
		for (i = 0; i < nargs; i++)
			st->argv[i] = tok[i + 1];
		if (st->op->parse) {
			err = st->op->parse(st);
			if (err) {
				pyv_error(line, err, st->op->name);
				return -1;
			}
		}
		nsteps++;
	}
	return nsteps;
}
