"""Dirty tracking: clients (tracker.py) over a KVM backend, the bitmap log
(bitmap_log.py) or the dirty ring (ring_log.py)."""

from .bitmap_log import BitmapLog
from .ring_log import RingLog
from .tracker import DirtyClient, DirtyTracker, merge_pages

__all__ = ["BitmapLog", "RingLog", "DirtyClient", "DirtyTracker", "merge_pages"]
