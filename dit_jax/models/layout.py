"""The two layouts of a DiT's block parameters, and conversion between them.

Per block ("blocks"): `{"blocks": {0: {...}, 1: {...}, ...}}`, one subtree per block, as published
weights, converters and runs before block scanning store them.

Stacked ("block_stack"): `{"block_stack": {j: {...}}}` for j < period, each leaf with a leading
axis of depth // period (logical axis "layers"): entry j holds blocks j, j + period, j + 2 period, ...
(period > 1 when the blocks repeat a pattern, e.g. experts in every k-th block). This is what
`model.scan_blocks` builds and `lax.scan` runs over.

The conversions apply to every dict in a tree that holds one of the two keys, so a whole train state
(params, EMA and the optimizer's moments, which mirror the params) converts in one call. Leaves may
be arrays (numpy or jax) or `jax.ShapeDtypeStruct`s, whose `NamedSharding`s gain or lose a
replicated leading axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PER_BLOCK, STACKED = "blocks", "block_stack"


def _holds_blocks(node: Any) -> bool:
    return isinstance(node, dict) and (PER_BLOCK in node or STACKED in node)


def _stack_leaves(leaves: list[Any]) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
    if isinstance(first, np.ndarray | np.generic):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _unstack_leaf(x: Any, i: int) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
    return x[i]


def _keyed(blocks: dict) -> dict[int, Any]:
    """Block subtrees by integer index (checkpoints on disk may hold the indices as strings)."""
    return {int(k): v for k, v in blocks.items()}


def _to_stacked(node: dict, period: int) -> dict:
    if STACKED in node:
        return node
    blocks = _keyed(node[PER_BLOCK])
    depth = len(blocks)
    if sorted(blocks) != list(range(depth)) or depth % period:
        raise ValueError(f"cannot stack blocks {sorted(blocks)} in groups of {period}")
    stack = {
        j: jax.tree.map(lambda *xs: _stack_leaves(list(xs)), *[blocks[i] for i in range(j, depth, period)])
        for j in range(period)
    }
    return {(STACKED if k == PER_BLOCK else k): (stack if k == PER_BLOCK else v) for k, v in node.items()}


def _to_per_block(node: dict) -> dict:
    if PER_BLOCK in node:
        return node
    stack = _keyed(node[STACKED])
    period = len(stack)
    groups = jax.tree.leaves(stack[0])[0].shape[0]
    blocks = {
        g * period + j: jax.tree.map(lambda x, g=g: _unstack_leaf(x, g), stack[j])
        for g in range(groups)
        for j in range(period)
    }
    blocks = dict(sorted(blocks.items()))
    return {(PER_BLOCK if k == STACKED else k): (blocks if k == STACKED else v) for k, v in node.items()}


def convert(tree: Any, *, stacked: bool, period: int = 1) -> Any:
    """`tree` with every block collection in the stacked (or the per-block) layout."""
    fn = (lambda n: _to_stacked(n, period)) if stacked else _to_per_block

    def visit(node: Any) -> Any:
        if not _holds_blocks(node):
            return node
        return {k: v if k in (PER_BLOCK, STACKED) else convert(v, stacked=stacked, period=period)
                for k, v in fn(node).items()}  # fmt: skip

    return jax.tree.map(visit, tree, is_leaf=_holds_blocks)


def is_stacked(tree: Any) -> bool | None:
    """Whether the first block collection found in `tree` is stacked; None if there is none."""
    found = [n for n in jax.tree.leaves(tree, is_leaf=_holds_blocks) if _holds_blocks(n)]
    return (STACKED in found[0]) if found else None


def period_of(tree: Any) -> int:
    """The period of the first stacked block collection in `tree` (1 if none is stacked)."""
    found = [n for n in jax.tree.leaves(tree, is_leaf=_holds_blocks) if _holds_blocks(n)]
    return len(found[0][STACKED]) if found and STACKED in found[0] else 1


def for_model(params: Any, cfg) -> Any:
    """`params` (either layout) in the layout that the model of `cfg` (a config.Model) builds."""
    return convert(params, stacked=cfg.scanned, period=cfg.block_period)
