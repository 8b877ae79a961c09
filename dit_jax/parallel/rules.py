"""Logical axis names -> mesh axes.

Weights and activations use separate vocabularies (as in MaxText). Weight rules come in named
presets; activation rules are fixed: the batch is split over every data-parallel axis and heads /
MLP features over `tensor`. A logical axis maps to mesh axes only where the dimension divides
evenly; otherwise that dimension stays replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")

# Weight presets: logical axis -> mesh axes (tuple) or None (replicated).
PRESETS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "ddp": {},
    "fsdp": {"embed": ("fsdp",)},
    "fsdp_tp": {"embed": ("fsdp",), "mlp": ("tensor",), "heads": ("tensor",)},
}

ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "act_batch": DATA_AXES,
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
}


def spec_for(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    rules: dict[str, tuple[str, ...] | None],
    mesh_shape: dict[str, int],
) -> P:
    """PartitionSpec for an array of `shape` with the given logical axes under `rules`."""
    if not logical_axes:
        return P()
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape, strict=True):
        axes = tuple(a for a in (rules.get(name) or ()) if a in mesh_shape and a not in used)
        n = int(np.prod([mesh_shape[a] for a in axes])) if axes else 1
        if axes and n > 1 and size % n == 0:
            used.update(axes)
            spec.append(axes if len(axes) > 1 else axes[0])
        else:
            spec.append(None)
    return P(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint for an activation, by logical name; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(
        x, spec_for(logical_axes, x.shape, ACTIVATION_RULES, dict(mesh.shape))
    )
