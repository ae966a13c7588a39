"""Fixtures that boot real guests on /dev/kvm with the project kernel and an agent script.

The project's own end-to-end tests use the same pytest plugin users get (vmm/testing.py: the
``guest``, ``guest_kernel`` and ``vm_share`` fixtures). ``boot(script, shares=..., ...)`` is
``guest.run``: it runs a Machine in this process (so tests can also check threads and file
descriptors afterwards) and returns a GuestResult.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

KVM = Path(os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm"))   # tests of this skip path set it

NO_KVM = ("/dev/kvm is absent: end-to-end guest tests NOT RUN on this machine "
          "(they need KVM; load kvm_intel/kvm_amd or run on a KVM host)")


def pytest_collection_modifyitems(config, items):
    """The only allowed skip: a machine without KVM at all, said loudly for every e2e test."""
    if KVM.exists():
        return
    marker = pytest.mark.skip(reason="!!! " + NO_KVM)
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def kernel(guest_kernel) -> Path:
    """The project kernel, from the pyvmm pytest plugin (vmm/testing.py): built once per machine
    (about 5 minutes), cached outside the repo; PYVMM_TEST_KERNEL=/path/to/vmlinux overrides."""
    return guest_kernel


@pytest.fixture
def boot(guest):
    """``boot(script, shares=(...), ...)``: the plugin's ``guest.run`` (a GuestResult with
    steps, exit_status, metrics, console, output and ``device(tag)``)."""
    return guest.run
