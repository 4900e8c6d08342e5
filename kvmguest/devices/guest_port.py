"""The kvmguest port (I/O port 0xf8, 32 bits): how a guest asks kvmguest for a snapshot.

A guest writes:

- ``READY`` (1): "snapshot here". The guest has reached the point tests want to start
  from (``kvmguest.front.testing`` saves it there once and resets every test to it).
- ``MIGRATE`` (2): "migrate me now". ``kvmguest run/restore --guest-migrate`` live-saves
  the guest and carries it on in a new ``kvmguest restore`` process.

When something listens (``Machine.guest_requests`` is consumed), the vCPU that wrote is
held right after its OUT until the request has been handled, so the snapshot is taken
exactly there; when nothing listens the write is ignored and the guest runs on.

A read returns how many times this guest has been restored along its history (by a
restore, a reset to a snapshot, or a migration): 0 in the run that booted it. A guest
reads it after a request to learn whether it was honoured.
"""

from __future__ import annotations

from .fields import uint

READY = 1
MIGRATE = 2
REQUESTS = {READY: "ready", MIGRATE: "migrate"}


class GuestPort:
    STATE_FIELDS = {"restores": uint(63)}

    def __init__(self):
        self.restores = 0
        self.request: int | None = None       # the last write, until the machine takes it

    def read(self, offset: int, size: int) -> int:
        return (self.restores >> (8 * offset)) & ((1 << (8 * size)) - 1) if offset < 4 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and value in REQUESTS:
            self.request = value

    def take(self) -> int | None:
        req, self.request = self.request, None
        return req

    def save_state(self) -> dict:
        return {"restores": self.restores}

    def restore_state(self, state: dict) -> None:
        # Restored: one more restore along this guest's history than when it was saved.
        restores = state.get("restores", 0)
        self.restores = (restores if isinstance(restores, int) and restores >= 0 else 0) + 1
