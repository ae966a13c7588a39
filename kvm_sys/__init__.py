"""KVM ioctl bindings: generated ctypes structs/constants (``kvm_sys.bindings``) and a thin wrapper."""

from . import bindings
from .flex import flex_type, make_flex
from .kvm import Kvm, KvmError, KvmInterrupted, Vcpu, Vm

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "KvmInterrupted", "bindings", "flex_type", "make_flex"]
