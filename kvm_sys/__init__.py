"""KVM ioctl bindings: generated ctypes structs/constants (``kvm_sys.bindings``) and a thin wrapper."""

from . import bindings
from .exits import (FailEntryExit, InternalErrorExit, IoExit, MmioExit, SimpleExit, SystemEventExit,
                    VcpuExit, exit_name)
from .flex import flex_type, make_flex
from .kvm import Kvm, KvmError, KvmInterrupted, Vcpu, Vm, ioctl_name

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "KvmInterrupted", "bindings", "flex_type", "make_flex",
           "ioctl_name", "VcpuExit", "IoExit", "MmioExit", "SystemEventExit", "InternalErrorExit",
           "FailEntryExit", "SimpleExit", "exit_name"]
