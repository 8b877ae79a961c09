"""Multi-device attention: `pallas_call` has no sharding rule, so kernels run under `jax.shard_map`.

Batch and heads are independent in attention, so each device runs the kernel on its own slice and
no communication is needed. Context parallelism over long sequences (ring or all-to-all) is not
implemented here yet.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels import masks as masks_lib
from pallas_kernels.dispatch import IMPLEMENTATIONS, resolved_attention, validate_inputs

AxisName = str | tuple[str, ...] | None


def axis_size(mesh: Mesh, axis: AxisName) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[n] for n in names)


def sharded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    batch_axis: AxisName = "data",
    head_axis: AxisName = "tensor",
    mask=None,
    scale: float | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """`attention` with batch split over mesh axis `batch_axis` and heads over `head_axis`."""
    validate_inputs(q, k, v)
    batch, seq_q, heads, _ = q.shape
    static, q_ids, kv_ids = masks_lib.resolve(mask, batch, seq_q, k.shape[1])
    for what, n, axis in (
        ("batch", batch, batch_axis),
        ("heads", heads, head_axis),
        ("kv heads", k.shape[2], head_axis),
    ):
        size = axis_size(mesh, axis)
        if n % size:
            raise ValueError(f"{what} ({n}) must be divisible by the size of mesh axis {axis!r} ({size})")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}"
        )
    spec = PartitionSpec(batch_axis, None, head_axis, None)
    seg_spec = PartitionSpec(batch_axis, None)
    run = functools.partial(
        resolved_attention, scale=scale, implementation=implementation, interpret=interpret
    )

    if q_ids is None:

        def local(q, k, v):
            return run(q, k, v, static, None, None)[0]

        args, in_specs = (q, k, v), (spec, spec, spec)
    else:

        def local(q, k, v, q_ids, kv_ids):
            return run(q, k, v, static, q_ids, kv_ids)[0]

        args, in_specs = (q, k, v, q_ids, kv_ids), (spec, spec, spec, seg_spec, seg_spec)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
    return mapped(*args)
