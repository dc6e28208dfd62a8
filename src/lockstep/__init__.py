"""lockstep: save and restore a group of QEMU/KVM VMs across hosts as one consistent state.

``from lockstep import Group`` is the scripting interface (:mod:`lockstep.api`);
it is imported on first use, so that the daemons, which import this package
too, do not load the caller's side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Group", "__version__"]

if TYPE_CHECKING:
    from lockstep.api import Group


def __getattr__(name: str) -> Any:
    if name == "Group":
        from lockstep.api import Group

        return Group
    raise AttributeError(f"module 'lockstep' has no attribute {name!r}")
