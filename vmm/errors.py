"""Turn the exceptions a user can act on into one-line messages for the CLI.

Anything not recognised here is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

from .exit_status import EXIT_FAILURE, EXIT_USAGE


def user_error(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for errors the user can act on; None for bugs."""
    from kvm_sys import KvmError
    from .boot import BootError
    build_errors: tuple[type[BaseException], ...]
    try:
        from guest.build import BuildError
        build_errors = (BuildError,)
    except ImportError:        # pragma: no cover - the builder is optional at import time
        build_errors = ()

    from devices.virtio.vhost_user.frontend import VhostUserFrontendError
    if isinstance(exc, VhostUserFrontendError):  # missing, refusing or broken back-end
        return str(exc), EXIT_FAILURE
    if isinstance(exc, BootError):     # a kernel we cannot load is a configuration problem
        return f"cannot load the kernel: {exc}", EXIT_USAGE
    if isinstance(exc, build_errors):
        return f"guest kernel build failed: {exc}", EXIT_FAILURE
    if isinstance(exc, KvmError):
        return f"KVM: {exc}", EXIT_FAILURE
    if isinstance(exc, FileNotFoundError) and exc.filename == "/dev/kvm":
        return ("/dev/kvm does not exist: load the kvm module (modprobe kvm_intel or kvm_amd)",
                EXIT_FAILURE)
    if isinstance(exc, PermissionError) and exc.filename == "/dev/kvm":
        return ("no permission to open /dev/kvm: add yourself to the 'kvm' group or run as root",
                EXIT_FAILURE)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOMEM, errno.ENOSPC):
        return str(exc), EXIT_FAILURE
    return None
