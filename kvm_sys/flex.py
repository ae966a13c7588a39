"""Variable-size instances of structs that end in a flexible array member.

KVM passes lists (CPUID entries, MSRs, MSR indices) as ``struct { __u32 n; ...; T entries[]; }``:
the caller allocates the header plus room for ``n`` elements.  The generated bindings mark such
structs with ``_flex_ = (field name, element type)`` and declare the member as ``T * 0``; here we
derive a subclass whose ``entries`` (or ``indices``) member is a real ``T * n`` array at the same
offset, so ``obj.nent`` and ``obj.entries[i]`` both work and ``ctypes.sizeof(obj)`` is what the
kernel will read or write.
"""

from __future__ import annotations

import functools


@functools.cache
def flex_type(cls: type, n: int) -> type:
    """Subclass of ``cls`` with room for exactly ``n`` trailing elements."""
    flex = getattr(cls, "_flex_", None)
    if flex is None:
        raise TypeError(f"{cls.__name__} has no flexible array member")
    if n < 0:
        raise ValueError("element count must be >= 0")
    name, elem = flex
    base_offset = getattr(cls, name).offset
    # `_anonymous_ = ()`: otherwise ctypes re-promotes the base's anonymous members into the
    # subclass and the zero-length `entries` would shadow ours.
    sub = type(f"{cls.__name__}_{n}", (cls,), {"_anonymous_": (), "_fields_": [(name, elem * n)]})
    if getattr(sub, name).offset != base_offset:
        # Only possible if the flexible member sits inside tail padding; none of KVM's do.
        raise TypeError(f"{cls.__name__}.{name}: flexible member not at the end of the struct")
    return sub


def make_flex(cls: type, n: int):
    """A zeroed instance of ``cls`` with ``n`` elements of trailing storage."""
    return flex_type(cls, n)()
