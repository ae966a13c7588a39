"""Mount helpers of the /dev/fuse transport that need no mount: the fusermount3 fd-passing
protocol (against a stand-in helper, since an unprivileged mount needs a world-accessible
/dev/fuse that this machine does not have), option checks and the nesting rule."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from devices.fusedev.mount import MountError, _fsname_option, _fusermount, check_mountpoint
from devices.fusedev.share import check_not_nested

# A stand-in for fusermount3 speaking its protocol: the fd number of a Unix socket in
# $_FUSE_COMMFD, one byte with the /dev/fuse fd attached (SCM_RIGHTS).  It records its argv and
# hands over a file of its own instead of /dev/fuse.
FAKE_HELPER = """#!{python}
import os, socket, sys
out = os.environ["FAKE_OUT"]
open(out + ".argv", "w").write("\\0".join(sys.argv[1:]))
if os.environ.get("FAKE_FAIL"):
    sys.stderr.write("fusermount3: mount failed: Operation not permitted\\n")
    sys.exit(1)
sock = socket.socket(fileno=int(os.environ["_FUSE_COMMFD"]))
fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
socket.send_fds(sock, [b"\\0"], [fd])
"""


@pytest.fixture
def helper(tmp_path: Path) -> Path:
    path = tmp_path / "fusermount3"
    path.write_text(FAKE_HELPER.format(python=sys.executable))
    path.chmod(0o755)
    return path


def test_fusermount_protocol_passes_the_fd_back(helper, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_OUT", str(tmp_path / "devfuse"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = _fusermount(str(helper), str(mnt), "/srv/a,b", allow_other=False)
    try:
        assert m.method == "fusermount3" and m.mountpoint == str(mnt)
        assert os.fstat(m.fd).st_ino == os.stat(tmp_path / "devfuse").st_ino
        assert not os.get_inheritable(m.fd) and not os.get_blocking(m.fd)
    finally:
        m.close()
    argv = (tmp_path / "devfuse.argv").read_text().split("\0")
    assert argv[0] == "-o" and argv[2:] == ["--", str(mnt)]
    opts = argv[1].split(",")
    assert {"default_permissions", "fsname=/srv/a_b", "subtype=pyvmm", "nosuid",
            "nodev"} == set(opts)                       # no allow_other without fuse.conf's say
    assert m.fd == -1


def test_fusermount_failure_is_a_mount_error_with_its_message(helper, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_OUT", str(tmp_path / "devfuse"))
    monkeypatch.setenv("FAKE_FAIL", "1")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(MountError, match="Operation not permitted"):
        _fusermount(str(helper), str(tmp_path), "src", allow_other=True)
    assert set(os.listdir("/proc/self/fd")) == before   # the socket pair is closed


def test_mountpoint_and_nesting_checks(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(MountError, match="not a directory"):
        check_mountpoint(str(tmp_path / "file"))
    with pytest.raises(MountError, match="No such file"):
        check_mountpoint(str(tmp_path / "absent"))
    assert check_mountpoint(str(tmp_path)) == str(tmp_path)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "ab").mkdir()
    for src, mnt in (("a", "a/b"), ("a/b", "a"), ("a", "a")):
        with pytest.raises(MountError, match="must not contain each other"):
            check_not_nested(str(tmp_path / src), str(tmp_path / mnt))
    check_not_nested(str(tmp_path / "a"), str(tmp_path / "ab"))   # a prefix is not a parent
    os.symlink(tmp_path / "a", tmp_path / "link")
    with pytest.raises(MountError):
        check_not_nested(str(tmp_path / "link"), str(tmp_path / "a" / "b"))


def test_fsname_option_has_no_separators():
    assert _fsname_option("/a,b\\c") == "fsname=/a_b_c"
