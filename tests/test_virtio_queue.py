"""Split virtqueue tests: a fake driver builds rings in fake guest memory, the real Queue consumes them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from devices.memory import GuestMemory
from devices.virtio.queue import (
    InvalidChain,
    Queue,
    QueueBroken,
    QueueConfigError,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from tests.fakes import FakeDriverQueue

MEM = 1 << 20
RING_BASE = 0x1000
HEAP = 0x10000


def make(size: int = 16, *, event_idx: bool = False, indirect: bool = True):
    mem = GuestMemory.from_ranges([(0, MEM)])
    drv = FakeDriverQueue(mem, size, RING_BASE, HEAP)
    q = Queue(mem, size, drv.desc, drv.avail, drv.used, event_idx, indirect=indirect)
    return mem, drv, q


def test_empty_queue_pops_none():
    _, _, q = make()
    assert q.pop() is None


def test_direct_chain_split_into_readable_and_writable():
    _, drv, q = make()
    head, outs = drv.add_chain([b"hello", b" world"], [8, 4])
    chain = q.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"hello", b" world"]
    assert [len(v) for v in chain.writable] == [8, 4]
    assert chain.readable_len == 11 and chain.writable_len == 12
    chain.writable[0][:3] = b"abc"  # views are guest memory itself, not copies
    assert drv.memory.read(outs[0], 3) == b"abc"
    assert q.pop() is None


def test_indirect_chain():
    _, drv, q = make()
    head, _ = drv.add_chain([b"req"], [16, 32], indirect=True)
    chain = q.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"req"]
    assert [len(v) for v in chain.writable] == [16, 32]


def test_direct_descriptors_followed_by_indirect_table():
    # virtio 1.2 2.7.5.3.2: zero or more direct descriptors, then one indirect one.
    mem, drv, q = make()
    a = drv.alloc(b"head")
    b = drv.alloc(b"tail")
    c = drv.alloc(10)
    table = drv.alloc(32)
    drv.write_desc(table, 0, b, 4, VRING_DESC_F_NEXT, 1)
    drv.write_desc(table, 1, c, 10, VRING_DESC_F_WRITE, 0)
    drv.add_raw({3: (a, 4, VRING_DESC_F_NEXT, 5), 5: (table, 32, VRING_DESC_F_INDIRECT, 0)}, head=3)
    chain = q.pop()
    assert chain.head == 3
    assert [bytes(v) for v in chain.readable] == [b"head", b"tail"]
    assert [len(v) for v in chain.writable] == [10]


def test_zero_length_descriptors_are_dropped():
    _, drv, q = make()
    drv.add_chain([b"", b"x"], [0, 4])
    chain = q.pop()
    assert [bytes(v) for v in chain.readable] == [b"x"]
    assert [len(v) for v in chain.writable] == [4]


def test_used_ring_contents_and_order():
    _, drv, q = make()
    heads = [drv.add_chain([b"r%d" % i], [4])[0] for i in range(3)]
    chains = [q.pop() for _ in range(3)]
    assert [c.head for c in chains] == heads
    # complete out of order: the used ring records completion order, not submission order
    q.add_used(chains[2].head, 4)
    q.add_used(chains[0].head, 0)
    q.add_used(chains[1].head, 3)
    assert drv.used_idx() == 3
    assert drv.used_elems() == [(heads[2], 4), (heads[0], 0), (heads[1], 3)]


def test_indices_wrap_at_16_bits():
    _, drv, q = make(size=4)
    drv.avail_idx = q.next_avail = 0xFFFE
    drv.memory.write_u16(drv.avail + 2, drv.avail_idx)
    q.next_used = 0xFFFE
    for i in range(4):
        drv.add_chain([b"x%d" % i], [2])
    seen = []
    while (chain := q.pop()) is not None:
        seen.append(chain.head)
        q.add_used(chain.head, 1)
    assert len(seen) == 4
    assert q.next_avail == 2 and drv.used_idx() == 2


def test_avail_index_jump_breaks_queue():
    mem, drv, q = make(size=8)
    mem.write_u16(drv.avail + 2, 9)
    with pytest.raises(QueueBroken):
        q.pop()


def test_event_idx_rearms_avail_event_when_drained():
    _, drv, q = make(event_idx=True)
    for _ in range(3):
        drv.add_chain([b"a"], [1])
    while q.pop() is not None:
        pass
    assert drv.avail_event() == 3  # "kick me when you publish entry 3"


def test_event_idx_notification_suppression():
    _, drv, q = make(event_idx=True)
    for _ in range(4):
        drv.add_chain([b"a"], [1])
    chains = [q.pop() for _ in range(4)]
    drv.set_used_event(2)  # driver wants an interrupt once used entry 2 is published
    q.add_used(chains[0].head, 1)
    q.add_used(chains[1].head, 1)
    assert not q.needs_notification()  # used idx 2: entry 2 not yet published
    q.add_used(chains[2].head, 1)
    assert q.needs_notification()  # entry 2 (idx 2 -> 3) crossed
    q.add_used(chains[3].head, 1)
    assert not q.needs_notification()  # event already passed
    assert not q.needs_notification()  # nothing new


def test_no_interrupt_flag_without_event_idx():
    _, drv, q = make()
    drv.add_chain([b"a"], [1])
    drv.add_chain([b"a"], [1])
    c = q.pop()
    q.add_used(c.head, 1)
    drv.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    assert not q.needs_notification()
    drv.set_avail_flags(0)
    c = q.pop()
    q.add_used(c.head, 1)
    assert q.needs_notification()
    assert not q.needs_notification()  # nothing added since


# -- malformed chains: each raises InvalidChain with its head, the queue goes on ---------------------

def _malformed_cases(drv: FakeDriverQueue) -> dict[str, tuple[dict, int, str]]:
    """name -> (descriptors to write, head to publish, expected reason substring)."""
    buf = drv.alloc(64)
    table = drv.alloc(64)
    nested = drv.alloc(16)
    drv.write_desc(table, 0, buf, 8, VRING_DESC_F_NEXT, 1)
    drv.write_desc(table, 1, nested, 16, VRING_DESC_F_INDIRECT, 0)
    loop_table = drv.alloc(32)
    drv.write_desc(loop_table, 0, buf, 8, VRING_DESC_F_NEXT, 1)
    drv.write_desc(loop_table, 1, buf, 8, VRING_DESC_F_NEXT, 0)
    return {
        "loop": ({4: (buf, 8, VRING_DESC_F_NEXT, 5), 5: (buf, 8, VRING_DESC_F_NEXT, 4)}, 4, "loop"),
        "self loop": ({4: (buf, 8, VRING_DESC_F_NEXT, 4)}, 4, "loop"),
        "next out of range": ({4: (buf, 8, VRING_DESC_F_NEXT, 16)}, 4, "next index"),
        "address out of memory": ({4: (MEM - 4, 8, 0, 0)}, 4, "outside guest memory"),
        "huge address": ({4: ((1 << 64) - 4, 8, 0, 0)}, 4, "outside guest memory"),
        "huge length": ({4: (buf, 0xFFFFFFFF, 0, 0)}, 4, "outside guest memory"),
        "writable before readable": ({4: (buf, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 5),
                                      5: (buf, 8, 0, 0)}, 4, "after a writable"),
        "nested indirect": ({4: (table, 32, VRING_DESC_F_INDIRECT, 0)}, 4, "nested"),
        "zero-length indirect": ({4: (table, 0, VRING_DESC_F_INDIRECT, 0)}, 4, "indirect table length"),
        "indirect length not multiple of 16": ({4: (table, 24, VRING_DESC_F_INDIRECT, 0)}, 4,
                                               "indirect table length"),
        "indirect table out of memory": ({4: (MEM - 16, 32, VRING_DESC_F_INDIRECT, 0)}, 4,
                                         "indirect table outside"),
        "indirect with next": ({4: (table, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 5),
                                5: (buf, 8, 0, 0)}, 4, "NEXT"),
        "loop inside indirect table": ({4: (loop_table, 32, VRING_DESC_F_INDIRECT, 0)}, 4, "loop"),
        "head out of range": ({}, 100, "head index"),
    }


_CASES = list(_malformed_cases(FakeDriverQueue(GuestMemory.from_ranges([(0, MEM)]), 16, RING_BASE, HEAP)))


@pytest.mark.parametrize("case", _CASES)
def test_malformed_chain_raises_invalid_chain_and_queue_continues(case):
    _, drv, q = make()
    descs, head, reason = _malformed_cases(drv)[case]
    drv.next_desc = 8  # keep the good chain's descriptors away from the malformed ones
    drv.add_raw(descs, head)
    good_head, _ = drv.add_chain([b"good"], [4])
    with pytest.raises(InvalidChain, match=reason) as exc:
        q.pop()
    assert exc.value.head == head
    q.add_used(exc.value.head, 0)
    chain = q.pop()
    assert chain.head == good_head and [bytes(v) for v in chain.readable] == [b"good"]
    q.add_used(chain.head, 4)
    assert drv.used_elems() == [(head, 0), (good_head, 4)]


def test_total_length_overflowing_32_bits_is_invalid():
    # 1024 in-memory descriptors of 4 MiB each add up to exactly 2**32 bytes.
    mem = GuestMemory.from_ranges([(0, 6 << 20)])
    drv = FakeDriverQueue(mem, 16, RING_BASE, 5 << 20)
    q = Queue(mem, 16, drv.desc, drv.avail, drv.used, False, indirect=True)
    table = drv.alloc(16 * 1024)
    for i in range(1024):
        drv.write_desc(table, i, 0, 4 << 20, VRING_DESC_F_NEXT if i < 1023 else 0, i + 1)
    drv.add_raw({0: (table, 16 * 1024, VRING_DESC_F_INDIRECT, 0)}, 0)
    with pytest.raises(InvalidChain, match="overflows"):
        q.pop()


def test_indirect_rejected_when_not_negotiated():
    _, drv, q = make(indirect=False)
    drv.add_chain([b"x"], [4], indirect=True)
    with pytest.raises(InvalidChain, match="INDIRECT_DESC"):
        q.pop()


def test_descriptor_crossing_region_boundary_is_invalid():
    mem = GuestMemory.from_ranges([(0, 0x20000), (0x20000, 0x10000)])
    drv = FakeDriverQueue(mem, 8, RING_BASE, HEAP)
    q = Queue(mem, 8, drv.desc, drv.avail, drv.used, False)
    drv.add_raw({0: (0x20000 - 4, 8, 0, 0)}, 0)
    with pytest.raises(InvalidChain, match="outside guest memory"):
        q.pop()


@pytest.mark.parametrize("size,desc,avail,used", [
    (0, 0x1000, 0x2000, 0x3000),
    (3, 0x1000, 0x2000, 0x3000),
    (65536, 0x1000, 0x2000, 0x3000),
    (16, 0x1008, 0x2000, 0x3000),  # descriptor table must be 16-byte aligned
    (16, 0x1000, 0x2001, 0x3000),
    (16, 0x1000, 0x2000, 0x3002),
    (16, MEM - 64, 0x2000, 0x3000),  # table runs past the end of memory
    (16, 0x1000, 0x2000, MEM),
])
def test_queue_layout_validation(size, desc, avail, used):
    mem = GuestMemory.from_ranges([(0, MEM)])
    with pytest.raises(QueueConfigError):
        Queue(mem, size, desc, avail, used, False)


# -- hostile rings: whatever the guest writes, pop() returns a chain or raises one of our errors ------

_desc = st.tuples(
    st.one_of(st.integers(0, MEM + 64), st.integers(0, (1 << 64) - 1)),  # addr
    st.one_of(st.integers(0, 256), st.integers(0, 0xFFFFFFFF)),  # len
    st.integers(0, 7),  # flags
    st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF)),  # next
)


@settings(max_examples=300, deadline=None)
@given(table=st.lists(_desc, min_size=16, max_size=16), heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8),
       indirect_tables=st.lists(st.lists(_desc, min_size=1, max_size=6), max_size=3))
def test_random_rings_never_crash_the_device(table, heads, indirect_tables):
    mem, drv, q = make()
    # some descriptors point at real indirect tables in memory
    for i, itable in enumerate(indirect_tables):
        addr = drv.alloc(16 * len(itable))
        for j, d in enumerate(itable):
            drv.write_desc(addr, j, *d)
        table[i] = (addr, 16 * len(itable), table[i][2] | VRING_DESC_F_INDIRECT, table[i][3])
    for i, d in enumerate(table):
        drv.write_desc(drv.desc, i, *d)
    for h in heads:
        drv.publish(h)
    for _ in heads:
        try:
            chain = q.pop()
        except InvalidChain as e:
            q.add_used(e.head, 0)
            continue
        assert chain is not None
        for v in chain.readable + chain.writable:
            assert len(v) > 0
        assert chain.readable_len + chain.writable_len <= 0xFFFFFFFF
        q.add_used(chain.head, 0)
    assert q.pop() is None
    assert drv.used_idx() == len(heads)
