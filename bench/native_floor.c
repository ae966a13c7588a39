/* The request loop of bench/fuse_worker_floor.py's "native" configuration, in C.
 *
 * The same twenty lines as its MinimalLoop (missing-name LOOKUPs in the share's root answered with
 * ENOENT from one fstatat), but the waiting too: the worker thread calls floor_serve() once
 * through ctypes (which releases the GIL) and stays here, in poll() on the queue's kick eventfd
 * and the worker's stop eventfd, until it stops or meets a request it does not answer; then it
 * returns 1 without consuming that request and the Python device serves it.
 *
 * Benchmark code, not device code: it measures what a native request path would cost inside our
 * VMM's process. Lengths and addresses are still checked (a bad one makes it hand the request to
 * the Python device), but nothing else a hostile guest could send is. Built by the benchmark with
 * the system's cc; needs nothing but libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_REGIONS 8
#define F_NEXT 1
#define F_INDIRECT 4

struct floor_state {
    uint8_t *desc, *avail, *used;
    uint8_t *region_host[MAX_REGIONS];
    uint64_t region_gpa[MAX_REGIONS], region_size[MAX_REGIONS];
    uint32_t regions, size;
    int32_t kick_fd, stop_fd, irq_fd, root_fd;
    uint32_t next_avail, next_used, signalled, event_idx;
    uint64_t answered;
};

struct buf { uint8_t *p; uint32_t len; };

static uint8_t *host(struct floor_state *s, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < s->regions; i++) {
        uint64_t off = gpa - s->region_gpa[i];
        if (gpa >= s->region_gpa[i] && off <= s->region_size[i] && len <= s->region_size[i] - off)
            return s->region_host[i] + off;
    }
    return NULL;
}

static uint16_t load16(const uint8_t *p) { return *(volatile const uint16_t *)p; }
static void store16(uint8_t *p, uint16_t v) { *(volatile uint16_t *)p = v; }

/* vring_need_event() of virtio_ring.h, after publishing the used index */
static void notify(struct floor_state *s)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t new = s->next_used, old = s->signalled;
    s->signalled = new;
    if (new == old)
        return;
    if (s->event_idx) {
        uint16_t event = load16(s->avail + 4 + 2 * s->size);
        if ((uint16_t)(new - event - 1) >= (uint16_t)(new - old))
            return;
    } else if (load16(s->avail) & 1) {
        return;
    }
    uint64_t one = 1;
    if (write(s->irq_fd, &one, 8) < 0) { /* the VMM is going away */ }
}

/* 0: stop requested; 1: the next available request is for the Python device */
int floor_serve(struct floor_state *s)
{
    for (;;) {
        uint16_t nxt = s->next_avail;
        if (load16(s->avail + 2) == nxt) {
            notify(s);
            store16(s->used + 4 + 8 * s->size, nxt);          /* avail_event: kick me next */
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (load16(s->avail + 2) == nxt) {
                struct pollfd p[2] = {{s->kick_fd, POLLIN, 0}, {s->stop_fd, POLLIN, 0}};
                if (poll(p, 2, -1) < 0 && errno != EINTR)
                    return 0;
                if (p[1].revents)
                    return 0;
                uint64_t v;
                if (p[0].revents && read(s->kick_fd, &v, 8) < 0) { /* raced: nothing to read */ }
                continue;
            }
        }
        uint16_t head = load16(s->avail + 4 + 2 * (nxt % s->size));
        struct buf b[4];
        uint32_t n = 0, index = head, table_len = s->size;
        uint8_t *table = s->desc;
        int ok = head < s->size;
        while (ok) {
            uint8_t *d = table + 16 * (uint64_t)index;
            uint64_t addr; uint32_t len; uint16_t flags, next;
            memcpy(&addr, d, 8); memcpy(&len, d + 8, 4); memcpy(&flags, d + 12, 2); memcpy(&next, d + 14, 2);
            if (flags & F_INDIRECT) {
                if (table != s->desc || len % 16 || !(table = host(s, addr, len))) { ok = 0; break; }
                table_len = len / 16; index = 0;
                continue;
            }
            if (n == 4 || !(b[n].p = host(s, addr, len))) { ok = 0; break; }
            b[n++].len = len;
            if (!(flags & F_NEXT))
                break;
            if (next >= table_len) { ok = 0; break; }
            index = next;
        }
        uint32_t opcode = 0; uint64_t unique = 0, nodeid = 0;
        if (ok && n == 4 && b[0].len >= 40 && b[2].len >= 16) {
            memcpy(&opcode, b[0].p + 4, 4); memcpy(&unique, b[0].p + 8, 8); memcpy(&nodeid, b[0].p + 16, 8);
        }
        char name[256];
        if (opcode != 1 || nodeid != 1 || b[1].len == 0 || b[1].len > sizeof name) {
            notify(s);
            return 1;                                            /* the Python device's */
        }
        memcpy(name, b[1].p, b[1].len);
        name[b[1].len - 1] = 0;
        struct stat st;
        int32_t error = fstatat(s->root_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 && errno == ENOENT
                        ? -ENOENT : -EIO;
        uint32_t out_len = 16;
        memcpy(b[2].p, &out_len, 4); memcpy(b[2].p + 4, &error, 4); memcpy(b[2].p + 8, &unique, 8);
        uint8_t *elem = s->used + 4 + 8 * (s->next_used % s->size);
        uint32_t id = head;
        memcpy(elem, &id, 4); memcpy(elem + 4, &out_len, 4);
        s->next_used = (uint16_t)(s->next_used + 1);
        __atomic_thread_fence(__ATOMIC_RELEASE);
        store16(s->used + 2, s->next_used);
        s->next_avail = (uint16_t)(nxt + 1);
        s->answered++;
    }
}
