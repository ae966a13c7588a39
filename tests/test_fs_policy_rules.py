"""The rules of devices/virtio/fs/policy.py on their own, and the log throttle guests meet."""

from __future__ import annotations

import logging
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.virtio.fs.options import FsOptions
from devices.virtio.fs.policy import (PRIVATE_PREFIX, XattrMap, decode_rdev, kill_bits,
                                      permitted_mode)
from fuse.logthrottle import FULL_WARNINGS, LogThrottle
from vmm.config import ConfigError, parse_config, parse_shared_dir


@pytest.mark.parametrize("mode,is_dir,allow,want", [
    (0o6777, False, False, 0o0777),
    (0o7777, False, False, 0o1777),      # sticky is not a set-id bit
    (0o6777, True, False, 0o2777),       # directory set-gid: group inheritance, kept
    (0o6777, False, True, 0o6777),
    (0o106755, False, False, 0o755),     # the file type never passes
])
def test_permitted_mode(mode, is_dir, allow, want):
    assert permitted_mode(mode, is_dir, allow) == want


@pytest.mark.parametrize("mode,want", [
    (stat.S_IFREG | 0o6755, stat.S_ISUID | stat.S_ISGID),
    (stat.S_IFREG | 0o6745, stat.S_ISUID),       # set-gid without group execute: kept
    (stat.S_IFREG | 0o2711, stat.S_ISGID),
    (stat.S_IFREG | 0o0755, 0),
    (stat.S_IFDIR | 0o6755, 0),                  # directories keep theirs
])
def test_kill_bits(mode, want):
    assert kill_bits(mode) == want


@given(st.integers(0, 0xFFF), st.integers(0, 0xFFFFF))
def test_decode_rdev_inverts_new_encode_dev(major, minor):
    encoded = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    dev = decode_rdev(encoded)
    assert (os.major(dev), os.minor(dev)) == (major, minor)


def test_decode_rdev_refuses_more_than_32_bits():
    with pytest.raises(OSError):
        decode_rdev(1 << 32)


NAMES = st.one_of(
    st.binary(min_size=1, max_size=40),
    st.builds(lambda p, rest: p + rest,
              st.sampled_from([b"user.", b"security.", b"trusted.", b"system.", PRIVATE_PREFIX,
                               PRIVATE_PREFIX + b"security.", PRIVATE_PREFIX + PRIVATE_PREFIX,
                               b"security.selinux", b"security.capability"]),
              st.binary(max_size=12)))


@pytest.mark.parametrize("policy", ["remap", "refuse", "passthrough"])
@pytest.mark.parametrize("selinux", [False, True])
@given(name=NAMES)
def test_xattr_map_is_a_bijection_that_never_exposes_a_reserved_host_name(policy, selinux, name):
    m = XattrMap(policy, selinux)
    try:
        host = m.to_host(name)
    except OSError:
        assert name in (b"security.", b"trusted.", b"system.")
        return
    if host is not None:
        assert m.to_guest(host) == name                  # the guest reads back what it set
        if policy != "passthrough":
            # no guest name reaches a name the host kernel enforces
            assert not host.startswith((b"security.", b"trusted.", b"system.")) \
                or (selinux and host == b"security.selinux")
    else:
        assert policy == "refuse" and m.reserved(name)
    guest = m.to_guest(name)                             # `name` as a host name this time
    if guest is not None:
        assert m.to_host(guest) == name                  # one host name per guest name


def test_xattr_policy_names():
    m = XattrMap("remap")
    assert m.to_host(b"user.x") == b"user.x"
    assert m.to_host(b"security.capability") == b"user.virtiofs.security.capability"
    assert m.to_host(b"user.virtiofs.a") == b"user.virtiofs.user.virtiofs.a"
    assert m.to_guest(b"trusted.overlay.opaque") is None
    assert m.remapped_capability == b"user.virtiofs.security.capability"
    assert XattrMap("refuse").to_host(b"system.posix_acl_access") is None
    assert XattrMap("refuse").remapped_capability is None
    assert XattrMap("remap", True).to_host(b"security.selinux") == b"security.selinux"


def test_options_everywhere_options_go(tmp_path):
    fo = FsOptions(source=str(tmp_path), tag="t")
    assert (fo.allow_setid, fo.allow_mknod, fo.xattr_policy, fo.allow_selinux_xattr) \
        == (False, False, "remap", False)
    with pytest.raises(ValueError, match="xattr_policy"):
        FsOptions(source=str(tmp_path), tag="t", xattr_policy="sometimes")
    with pytest.raises(ValueError, match="allow_mknod"):
        FsOptions(source=str(tmp_path), tag="t", allow_mknod="yes")
    sd = parse_shared_dir(f"{tmp_path}:t:allow_setid=true:allow_mknod=true:"
                          "xattr_policy=refuse:allow_selinux_xattr=true")
    assert (sd.allow_setid, sd.allow_mknod, sd.xattr_policy, sd.allow_selinux_xattr) \
        == (True, True, "refuse", True)
    with pytest.raises(ConfigError, match="xattr_policy"):
        parse_shared_dir(f"{tmp_path}:t:xattr_policy=maybe")
    cfg = parse_config({"devices": [{"type": "fs", "source": str(tmp_path), "tag": "t",
                                     "allow_mknod": True, "xattr_policy": "passthrough"}]},
                       "c.yaml", tmp_path)
    assert cfg.devices[0].allow_mknod and cfg.devices[0].xattr_policy == "passthrough"
    with pytest.raises(ConfigError, match="allow_setid"):
        parse_config({"devices": [{"type": "fs", "source": str(tmp_path), "tag": "t",
                                   "allow_setid": "yes"}]}, "c.yaml", tmp_path)


def test_log_throttle_samples_every_level(caplog):
    log = LogThrottle(logging.getLogger("t.throttle"))
    caplog.set_level(logging.DEBUG, logger="t.throttle")
    for i in range(1000):
        log.log(logging.INFO if i % 2 else logging.ERROR, "event %d", i)
    # 1..50, then 64, 128, 256, 512
    assert len(caplog.records) == FULL_WARNINGS + 4
    assert "1000" not in caplog.records[-1].getMessage()
    assert "(512 guest-caused events" in caplog.records[-1].getMessage()


def test_log_throttle_samples_repeated_bugs(caplog):
    log = LogThrottle(logging.getLogger("t.bugs"))
    caplog.set_level(logging.DEBUG, logger="t.bugs")
    for _ in range(1000):
        log.bug("lookup", RuntimeError("boom"))
    assert sum(1 for r in caplog.records if r.exc_info) == 1
    assert len(caplog.records) == FULL_WARNINGS + 4


def test_log_throttle_once_per_key(caplog):
    """once(): the first event of each key is logged (at the caller's line), later ones dropped."""
    log = LogThrottle(logging.getLogger("t.once"))
    caplog.set_level(logging.DEBUG, logger="t.once")
    firsts = [log.once(f"kind-{i % 3}", logging.ERROR if i % 3 else logging.DEBUG, "event %d", i)
              for i in range(300)]
    assert firsts == [True, True, True] + [False] * 297
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "event 0"), (logging.ERROR, "event 1"), (logging.ERROR, "event 2")]
    assert all(r.pathname == __file__ for r in caplog.records)


def test_log_throttle_once_remembers_a_bounded_set_of_keys(caplog):
    """Keys from guest data (each address a guest probes on a bus) cannot grow the set without
    bound: past ONCE_KEYS_MAX one line says logging stopped, and nothing more is kept."""
    from fuse.logthrottle import ONCE_KEYS_MAX
    log = LogThrottle(logging.getLogger("t.once.cap"))
    caplog.set_level(logging.DEBUG, logger="t.once.cap")
    logged = sum(log.once(addr, logging.DEBUG, "probe %#x", addr) for addr in range(3 * ONCE_KEYS_MAX))
    assert logged == ONCE_KEYS_MAX
    assert len(log._once) == ONCE_KEYS_MAX
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{ONCE_KEYS_MAX} distinct events logged once; not logging further new ones"]
