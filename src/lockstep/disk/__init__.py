"""lockstep.disk: qcow2 layers (chain planning, overlays made and read with qemu-img).

Imports only ``errors``, ``proc`` and ``group``; the execd composes it with ``store``.
"""

from lockstep.disk.layers import (
    LAYER_SUFFIX,
    OverlayPlan,
    backing_chain,
    create_overlay,
    dependents,
    image_format,
    layer_id_of,
    layer_path,
    new_layer_id,
    plan_fresh_overlay,
    remove_layer,
    split_chain,
    unreachable_layers,
    validate_layer_id,
)

__all__ = [
    "LAYER_SUFFIX",
    "OverlayPlan",
    "backing_chain",
    "create_overlay",
    "dependents",
    "image_format",
    "layer_id_of",
    "layer_path",
    "new_layer_id",
    "plan_fresh_overlay",
    "remove_layer",
    "split_chain",
    "unreachable_layers",
    "validate_layer_id",
]
