"""Code generated from proto/lockstep/v1/execd.proto; do not edit.

Regenerate with ``python -m lockstep.rpc.gen``; ``--check`` tells if it is stale.
"""
