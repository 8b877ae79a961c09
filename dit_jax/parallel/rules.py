"""Logical axis names -> mesh axes.

Weights and activations use separate vocabularies (as in MaxText). Weight rules come in named
presets; activation rules are fixed: the batch is split over every data-parallel axis (`data`,
`fsdp`, `expert`), the token sequence over `context`, and heads / MLP features over `tensor`. A
logical axis maps to the mesh axes of its rule that have more than one device, and only where the
dimension divides evenly by their product; otherwise that dimension stays replicated. A mesh axis
shards at most one dimension of an array (the first that claims it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

# Outermost (slowest links) to innermost (fastest): devices adjacent in the mesh share the axes that
# communicate most. `data` also holds the DCN factor (mesh.dcn_data) as its outer part.
MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
# The batch is split over these. `expert` is one of them: outside the experts' layers its devices
# work on different examples (as MaxText's activation_batch); `context` splits the sequence instead.
DATA_AXES = ("data", "fsdp", "expert")

# Weight presets: logical axis -> mesh axes (tuple) or None (replicated). `embed` (present in every
# large DiT weight) is sharded ZeRO-3 style over the axes whose devices hold different data.
PRESETS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "ddp": {},
    "fsdp": {"embed": ("fsdp",)},
    "fsdp_tp": {"embed": ("fsdp",), "mlp": ("tensor",), "heads": ("tensor",)},
    "fsdp_tp_cp": {"embed": ("fsdp", "context"), "mlp": ("tensor",), "heads": ("tensor",)},
    "fsdp_tp_ep": {
        "expert": ("expert",),
        "embed": ("fsdp", "expert"),
        "mlp": ("tensor",),
        "heads": ("tensor",),
    },
    "fsdp_tp_cp_ep": {
        "expert": ("expert",),
        "embed": ("fsdp", "context", "expert"),
        "mlp": ("tensor",),
        "heads": ("tensor",),
    },
}

ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "act_batch": DATA_AXES,
    "act_seq": ("context",),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_expert": ("expert",),
}

# A parameter at least this large (1 MiB, e.g. a 512 x 512 float32 matrix) must not stay fully
# replicated under a sharding preset: in DiT-XL/2 every weight matrix is larger, every bias and norm
# scale smaller, so the replicated remainder costs a few MiB per device at most.
MIN_SHARDED_BYTES = 1 << 20


class ShardingError(ValueError):
    """A sharding preset leaves large parameters replicated on a mesh where it could split them."""


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
        axes = tuple(a for a in (rules.get(name) or ()) if mesh_shape.get(a, 1) > 1 and a not in used)
        n = math.prod(mesh_shape[a] for a in axes)
        if axes and size % n == 0:
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


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def replicated_params(
    specs, shapes, *, min_bytes: int = MIN_SHARDED_BYTES
) -> list[tuple[str, tuple[int, ...], int]]:
    """(path, shape, bytes) of every parameter of at least `min_bytes` that no mesh axis splits.

    `specs`: a tree of PartitionSpecs or NamedShardings; `shapes`: the same tree of arrays or
    ShapeDtypeStructs."""
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0]
    flat_shapes = jax.tree.leaves(shapes)
    if len(flat_specs) != len(flat_shapes):
        raise ValueError(f"{len(flat_specs)} shardings for {len(flat_shapes)} parameters")
    found = []
    for (keys, spec), x in zip(flat_specs, flat_shapes, strict=True):
        spec = getattr(spec, "spec", spec)
        nbytes = math.prod(x.shape) * x.dtype.itemsize
        if nbytes >= min_bytes and all(s is None for s in spec):
            found.append((_path(keys), tuple(x.shape), nbytes))
    return found


def check_sufficiently_sharded(
    specs, shapes, rules_name: str, mesh_shape: dict[str, int], *, min_bytes: int = MIN_SHARDED_BYTES
) -> None:
    """Raises ShardingError naming every parameter of at least `min_bytes` (1 MiB by default) that
    preset `rules_name` leaves fully replicated although one of its mesh axes has several devices.

    "ddp" (replication by design) and a mesh where none of the preset's axes exceeds one device pass
    trivially. A parameter is replicated either because its logical axes have no rule in the preset
    or because no dimension divides by the mesh axes of its rule."""
    axes = {a for rule in PRESETS[rules_name].values() for a in (rule or ())}
    if not any(mesh_shape.get(a, 1) > 1 for a in axes):
        return
    found = replicated_params(specs, shapes, min_bytes=min_bytes)
    if found:
        listed = "; ".join(
            f"{path} {list(shape)} ({nbytes / 2**20:.1f} MiB)" for path, shape, nbytes in found
        )
        mesh = " x ".join(f"{a}={mesh_shape[a]}" for a in MESH_AXES if a in mesh_shape)
        raise ShardingError(
            f"config key 'mesh.rules': preset {rules_name!r} on mesh {mesh} leaves {len(found)} "
            f"parameter(s) of >= {min_bytes / 2**20:g} MiB replicated on every device: {listed}"
        )


def describe(specs: Any) -> Any:
    """A tree of PartitionSpecs as JSON-able lists (None, an axis name, or a list of names per dim)."""
    return jax.tree.map(
        lambda s: [list(d) if isinstance(d, tuple) else d for d in getattr(s, "spec", s)],
        specs,
        is_leaf=lambda s: isinstance(s, P | jax.sharding.NamedSharding),
    )
