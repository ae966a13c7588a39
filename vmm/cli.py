"""Command line: `python -m vmm run|device|fuse-mount|guest|ctl|demo|sweep ...` (also installed as `pyvmm`).

Errors a user can fix (bad config, missing kernel, no /dev/kvm) are one line on stderr and a
non-zero status, never a traceback; `-v` shows debug logging for the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from devices.virtio.fs.options import FsOptions
from devices.virtio.vhost_user.frontend import VhostUserFsOptions

from .config import (ConfigError, exec_to_script, load_config, parse_shared_dir, parse_vhost_user_fs,
                     with_overrides)
from .errors import EXIT_FAILURE, EXIT_USAGE


def _progress(message: str) -> None:
    print(f"pyvmm: {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvmm", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="boot a VM from a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m vmm run configs/default.yaml --exec 'echo hello; exit 3'\n"
               "  python -m vmm run configs/default.yaml --shared-dir /srv/data:data:"
               "negative_timeout=60 \\\n"
               "      --exec 'stat /mnt/data/missing x100 expect=ENOENT' --metrics m.json\n"
               "  python -m vmm run configs/default.yaml --vhost-user-fs /tmp/fs.sock:share \\\n"
               "      --exec 'readdir /mnt/share'   # back-end: python -m vmm device fs, or virtiofsd\n"
               "agent ops: guest/README.md; config keys: README.md (Configuration)")
    run.add_argument("config", help="YAML VM config (see configs/)")
    script = run.add_mutually_exclusive_group()
    script.add_argument("--exec", dest="exec_", metavar="'OP; OP; ...'",
                        help="agent script inline, steps separated by ';'")
    script.add_argument("--script", type=Path, help="agent script file")
    run.add_argument("--vcpus", type=int, help="override vm.vcpus")
    run.add_argument("--memory", type=int, metavar="MIB", help="override vm.memory_mib")
    run.add_argument("--kernel", help="override kernel.path (a vmlinux/bzImage, or 'auto')")
    run.add_argument("--cmdline", help="extra kernel command line")
    run.add_argument("--discovery", choices=("cmdline", "acpi", "both"),
                     help="override vm.discovery")
    run.add_argument("--shared-dir", action="append", default=[], metavar="PATH:TAG[:k=v...]",
                     help="add a virtio-fs share (crosvm syntax; keys: cache, timeout, "
                          "negative_timeout, writeback, num_request_queues, trace, trace_path, "
                          "allow_setid, allow_mknod, xattr_policy, allow_selinux_xattr, "
                          "max_inodes, max_handles, readdir_buffer, max_write, "
                          "ascii_casefold, posix_acl, uidmap, gidmap, idmap, security_ctx)")
    run.add_argument("--vhost-user-fs", action="append", default=[],
                     metavar="SOCKET:TAG[:num_request_queues=N]",
                     help="add a virtio-fs device served by a vhost-user back-end on SOCKET "
                          "(`python -m vmm device fs` or virtiofsd)")
    run.add_argument("--metrics", type=Path, metavar="FILE", help="write device counters as JSON on exit")
    run.add_argument("--control", metavar="PATH", help="open a control socket (stats/reset/stop)")

    device = sub.add_parser("device", help="run a device as a vhost-user back-end process")
    dsub = device.add_subparsers(dest="device_type", required=True)
    fs = dsub.add_parser("fs", help="virtio-fs back-end for a vhost-user front-end (e.g. QEMU's "
                                    "vhost-user-fs-device), like virtiofsd")
    conn = fs.add_mutually_exclusive_group(required=True)
    conn.add_argument("--socket", metavar="PATH", help="Unix socket to listen on")
    conn.add_argument("--fd", type=int, metavar="N",
                      help="serve the already-connected vhost-user socket inherited as fd N")
    share = fs.add_mutually_exclusive_group(required=True)
    share.add_argument("--shared-dir", metavar="PATH:TAG[:k=v...]",
                       help="the share, with the same keys as `run --shared-dir`")
    share.add_argument("--config", type=Path, metavar="FILE", help="YAML config with one fs device")
    share.add_argument("--options-json", metavar="JSON",
                       help="the share as JSON FsOptions fields (how the VMM starts its child)")
    fs.add_argument("--sandbox", choices=("namespace", "chroot", "none"),
                    help="jail this process before serving (default: the share's `sandbox`, "
                         "namespace); a jailed back-end serves one front-end")
    fs.add_argument("--stats-fd", type=int, metavar="N",
                    help="answer counter requests on the socket inherited as fd N (the VMM's)")
    fs.add_argument("--once", action="store_true", help="exit when the first front-end disconnects")
    fs.add_argument("--metrics", type=Path, metavar="FILE", help="write device counters as JSON on exit")
    fs.add_argument("--control", metavar="PATH", help="open a control socket (stats/reset/stop)")

    fm = sub.add_parser("fuse-mount", help="serve a directory on the host through /dev/fuse "
                        "(the virtio-fs server without a VM)")
    fm.add_argument("source", help="host directory to share")
    fm.add_argument("mountpoint", help="empty directory to mount on")
    fm.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                    help="device option as in --shared-dir (cache, timeout, negative_timeout, "
                         "writeback, num_request_queues = serving threads, trace, trace_path, "
                         "allow_setid, allow_mknod, xattr_policy, allow_selinux_xattr, "
                         "max_inodes, max_handles, readdir_buffer, max_write, "
                         "ascii_casefold, posix_acl, uidmap, gidmap, security_ctx)")
    fm.add_argument("--metrics", type=Path, metavar="FILE",
                    help="write the device counters as JSON on exit")
    fm.add_argument("--trace", metavar="FILE", help="JSON line per FUSE request "
                    "(same as -o trace=true -o trace_path=FILE)")

    guest = sub.add_parser("guest", help="guest kernel tools")
    gsub = guest.add_subparsers(dest="guest_command", required=True)
    build = gsub.add_parser("build", help="build (or find cached) the project guest kernel")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")

    ctl = sub.add_parser("ctl", help="talk to a running VMM's control socket")
    ctl.add_argument("path")
    ctl.add_argument("cmd", choices=("stats", "reset", "stop"))

    demo = sub.add_parser("demo", help="negative_timeout demo: the same probe workload with 0 and N")
    demo.add_argument("--negative-timeout", type=float, default=60.0)
    demo.add_argument("--names", type=int, default=50, help="missing names probed")
    demo.add_argument("--rounds", type=int, default=20, help="probes of each name")
    demo.add_argument("--json", type=Path, help="also write the figures as JSON")

    from .sweep import add_parser as add_sweep_parser
    add_sweep_parser(sub)
    return p


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_run(args: argparse.Namespace) -> int:
    from .machine import Machine   # imports KVM bindings; keep `--help` and config errors light

    config = load_config(args.config)
    script = None
    if args.exec_ is not None:
        script = exec_to_script(args.exec_)
    elif args.script is not None:
        if not args.script.is_file():
            raise ConfigError(f"--script: {args.script} does not exist")
        script = args.script.read_text()
    shares: list[FsOptions | VhostUserFsOptions] = [parse_shared_dir(s) for s in args.shared_dir]
    shares += [parse_vhost_user_fs(s) for s in args.vhost_user_fs]
    config = with_overrides(config, vcpus=args.vcpus, memory_mib=args.memory, script=script,
                            shared_dirs=shares, kernel=args.kernel, cmdline=args.cmdline,
                            discovery=args.discovery)
    machine = Machine(config, control_path=args.control, kernel_progress=_progress)
    result = machine.run()
    if result.message:
        print(f"pyvmm: {result.message}", file=sys.stderr)
    t = result.timings
    to_agent = f"{t['to_agent_s']:.2f} s" if "to_agent_s" in t else "never"
    to_exit = f"{t['to_exit_line_s']:.2f} s" if "to_exit_line_s" in t else "never"
    print(f"pyvmm: exit status {result.exit_status} ({result.stop.reason.value}); "
          f"agent first line at {to_agent}, exit line at {to_exit}, total {t['total_s']:.2f} s, "
          f"{t.get('exits', 0)} vCPU exits, "
          f"vCPU CPU {t.get('vcpu_cpu_s', 0.0):.2f} s", file=sys.stderr)
    if args.metrics:
        args.metrics.write_text(json.dumps({
            "exit_status": result.exit_status, "stop": result.stop.reason.name,
            "timings": t, "devices": result.metrics}, indent=2, sort_keys=True) + "\n")
    return result.exit_status


def cmd_device(args: argparse.Namespace) -> int:
    from .device_backend import run_fs_backend
    return run_fs_backend(args.socket, shared_dir=args.shared_dir, config=args.config,
                          options_json=args.options_json, fd=args.fd, stats_fd=args.stats_fd,
                          sandbox=args.sandbox, once=args.once, metrics=args.metrics,
                          control=args.control, progress=_progress)


def cmd_fuse_mount(args: argparse.Namespace) -> int:
    from .fuse_mount import run_fuse_mount
    return run_fuse_mount(args.source, args.mountpoint, option_items=args.option, trace=args.trace,
                          metrics=args.metrics, progress=_progress)


def cmd_guest(args: argparse.Namespace) -> int:
    from guest.build import ensure_kernel
    path = ensure_kernel(progress=_progress, force=args.force)
    print(path)
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    from .control import request
    try:
        reply = request(args.path, args.cmd)
    except OSError as exc:
        print(f"pyvmm: cannot reach control socket {args.path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("ok") else EXIT_FAILURE


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(negative_timeout=args.negative_timeout, names=args.names, rounds=args.rounds,
                    json_path=args.json, progress=_progress)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import main as sweep_main
    return sweep_main(args, progress=_progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    handlers = {"run": cmd_run, "device": cmd_device, "fuse-mount": cmd_fuse_mount,
                "guest": cmd_guest, "ctl": cmd_ctl, "demo": cmd_demo, "sweep": cmd_sweep}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"pyvmm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - user-facing errors below; others get a traceback with -v
        from .errors import user_error
        known = user_error(exc)
        if known is None:
            raise
        message, status = known
        print(f"pyvmm: error: {message}", file=sys.stderr)
        return status
