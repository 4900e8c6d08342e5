"""kvmguest: tiny PVH guests on /dev/kvm, driven from Python."""

from .kvm import Kvm, KvmError, KvmUnavailable
from .machine import GuestCrashed, GuestError, GuestResult, GuestTimeout, Machine

__all__ = ["Kvm", "KvmError", "KvmUnavailable", "Machine", "GuestResult", "GuestError",
           "GuestCrashed", "GuestTimeout"]
__version__ = "0.1.0"
