"""lockstep: save and restore a group of QEMU/KVM VMs across hosts as one consistent state."""

__version__ = "0.1.0"
