"""`python -m vmm device fs` as a real process: start-up errors, control socket, signals, --once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices.virtio.vhost_user.protocol import Request
from tests.vhost_user_support import WAIT_S, Frontend
from vmm.control import request

ROOT = Path(__file__).resolve().parent.parent


def start(*args: str, sandbox: str = "none", **kw) -> subprocess.Popen:
    """Most tests here are about the listening back-end (control socket, one front-end after
    another), which only an unjailed process serves: `--sandbox none` unless asked otherwise;
    tests/test_sandbox.py covers the jailed modes."""
    return subprocess.Popen([sys.executable, "-m", "vmm", "device", "fs", *args,
                             "--sandbox", sandbox], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def connect(path: Path) -> Frontend:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return Frontend(sock)


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


def test_serves_reports_and_stops_on_sigterm(share, tmp_path):
    sock, ctl, metrics = tmp_path / "fs.sock", tmp_path / "ctl.sock", tmp_path / "m.json"
    proc = start("--socket", str(sock), "--shared-dir", f"{share}:share:negative_timeout=5",
                 "--control", str(ctl), "--metrics", str(metrics))
    try:
        wait_for(ctl, proc)
        wait_for(sock, proc)
        for _ in range(2):  # one front-end after another
            fe = connect(sock)
            assert fe.u64(Request.GET_QUEUE_NUM) == 2
            fe.close()
        deadline = time.monotonic() + WAIT_S
        while True:
            stats = request(str(ctl), "stats")
            vu = stats["devices"]["fs:share"]["vhost_user"]
            if vu["connections"] == 2 and not vu["active"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert vu["messages"] == 2 and vu["refused"] == 0
        assert stats["devices"]["fs:share"]["host_cpu"]["process_s"] > 0
        assert request(str(ctl), "reset") == {"ok": True}
        assert request(str(ctl), "stats")["devices"]["fs:share"]["vhost_user"]["messages"] == 0
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"{share} as tag 'share' on {sock}" in err
    data = json.loads(metrics.read_text())
    assert data["exit_status"] == 0 and "vhost_user" in data["devices"]["fs:share"]
    assert not sock.exists() and not ctl.exists()


def test_sigint_and_control_stop(share, tmp_path):
    for how in ("SIGINT", "stop"):
        sock, ctl = tmp_path / f"{how}.sock", tmp_path / f"{how}-ctl.sock"
        proc = start("--socket", str(sock), "--shared-dir", f"{share}:share", "--control", str(ctl))
        wait_for(sock, proc)
        wait_for(ctl, proc)
        fe = connect(sock)  # a connected front-end does not keep the back-end alive
        assert fe.u64(Request.GET_FEATURES)
        if how == "SIGINT":
            proc.send_signal(signal.SIGINT)
        else:
            assert request(str(ctl), "stop") == {"ok": True}
        proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0
        assert fe.closed_by_peer()
        fe.close()


def test_once_exits_after_the_first_frontend(share, tmp_path):
    sock = tmp_path / "fs.sock"
    proc = start("--socket", str(sock), "--shared-dir", f"{share}:share", "--once")
    wait_for(sock, proc)
    fe = connect(sock)
    fe.send(12345)  # a malformed message ends the session too
    assert fe.closed_by_peer()
    fe.close()
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err
    assert not sock.exists()


def test_config_file_with_one_fs_device(share, tmp_path):
    cfg = tmp_path / "vm.yaml"
    cfg.write_text(f"devices:\n  - type: fs\n    source: {share}\n    tag: cfgtag\n    negative_timeout: 60\n")
    sock = tmp_path / "fs.sock"
    proc = start("--socket", str(sock), "--config", str(cfg), "--once")
    wait_for(sock, proc)
    fe = connect(sock)
    from devices.virtio.vhost_user.protocol import ConfigSpace
    cfgspace = ConfigSpace.decode(fe.call(Request.GET_CONFIG, ConfigSpace(0, 36, 0, bytes(36)).encode()).payload)
    assert cfgspace.data.rstrip(b"\0") == b"cfgtag"
    fe.close()
    proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0


@pytest.mark.parametrize("args, status, message", [
    (["--shared-dir", "{share}"], 2, "expected PATH:TAG"),
    (["--shared-dir", "{share}:share:bogus=1"], 2, "bogus: unknown option"),
    (["--shared-dir", "{tmp}/missing:share"], 2, "does not exist"),
    (["--config", "{tmp}/two.yaml"], 2, "exactly one `type: fs` device, found 2"),
    (["--config", "{tmp}/none.yaml"], 2, "config file does not exist"),
])
def test_bad_share_is_a_one_line_error(share, tmp_path, args, status, message):
    (tmp_path / "two.yaml").write_text(f"devices:\n  - {{type: fs, source: {share}, tag: a}}\n"
                                       f"  - {{type: fs, source: {share}, tag: b}}\n")
    args = [a.format(share=share, tmp=tmp_path) for a in args]
    proc = start("--socket", str(tmp_path / "fs.sock"), *args)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == status
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_socket_path_taken(share, tmp_path):
    taken = tmp_path / "file"
    taken.write_text("not a socket")
    proc = start("--socket", str(taken), "--shared-dir", f"{share}:share")
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 1 and "not a socket" in err
    assert taken.read_text() == "not a socket"
    assert os.path.exists(taken)
