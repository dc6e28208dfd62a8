"""Fixtures of the protocol tests: stub QEMU processes with their Machines."""

from tests.helpers.stub_qemu import qemu

__all__ = ["qemu"]
