"""Testing with kvmguest: the pytest plugin (plugin.py: boot_guest, machine_factory, KVM
checks) and snapshots as fixtures (fixtures.py: guest_fixture, guest_snapshot)."""

from kvmguest.front.testing.fixtures import guest_fixture, guest_snapshot

__all__ = ["guest_fixture", "guest_snapshot"]
