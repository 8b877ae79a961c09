"""Host-side block plans: which KV blocks each Q block visits (and the transpose, for dK/dV).

A plan is built once per (mask, lengths, block sizes) with numpy and cached; every layer and every
sampling step reuses it. Rows list their non-empty blocks compacted, FULL blocks first and then
PARTIAL ones, so a kernel runs two loops (unmasked, then masked) with no per-tile branch. Entries
past a row's count repeat its last block, so a TPU pipeline that follows the table fetches nothing
new for them (the "shrunken grid": only as many steps as the busiest row needs).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from pallas_kernels.masks import EMPTY, FULL, PARTIAL, Full, Mask, block_bounds


@dataclasses.dataclass(frozen=True, eq=False)
class Compacted:
    """Per-row compacted block lists: index/kind [rows, steps]; n_full/count [rows]."""

    index: np.ndarray
    kind: np.ndarray
    n_full: np.ndarray
    count: np.ndarray

    @property
    def steps(self) -> int:
        return self.index.shape[1]

    def table(self) -> np.ndarray:
        """[rows, 2 + steps] int32: (n_full, count, block indices...) for kernels."""
        return np.concatenate([self.n_full[:, None], self.count[:, None], self.index], axis=1)


def _compact(kinds: np.ndarray) -> Compacted:
    order = np.argsort(-kinds, axis=1, kind="stable")  # FULL, then PARTIAL, then EMPTY
    sorted_kinds = np.take_along_axis(kinds, order, axis=1)
    count = (sorted_kinds != EMPTY).sum(1).astype(np.int32)
    n_full = (sorted_kinds == FULL).sum(1).astype(np.int32)
    steps = max(int(count.max(initial=0)), 1)
    index, kind = order[:, :steps].astype(np.int32), sorted_kinds[:, :steps].astype(np.int8)
    last = np.take_along_axis(index, np.maximum(count - 1, 0)[:, None].astype(np.int64), axis=1)
    pad = np.arange(steps)[None, :] >= count[:, None]
    index = np.where(pad, last, index).astype(np.int32)
    for a in (index, kind, count, n_full):
        a.setflags(write=False)
    return Compacted(index, kind, n_full, count)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockPlan:
    """Block kinds [nq, nk] for a mask at given lengths and block sizes, plus compacted lists."""

    seq_q: int
    seq_kv: int
    block_q: int
    block_kv: int
    kinds: np.ndarray
    rows: Compacted  # per Q block: KV blocks (forward, dQ)
    cols: Compacted  # per KV block: Q blocks (dK, dV)
    mask_partial: bool  # some tile needs mask_fn (not only key padding)

    @property
    def num_q_blocks(self) -> int:
        return self.kinds.shape[0]

    @property
    def num_kv_blocks(self) -> int:
        return self.kinds.shape[1]

    @property
    def kv_padded(self) -> bool:
        return self.seq_kv % self.block_kv != 0

    @property
    def density(self) -> float:
        """Fraction of tiles visited."""
        return float((self.kinds != EMPTY).mean())

    @functools.cached_property
    def uniform(self) -> bool:
        """Whether every Q block visits the same KV blocks in the same order."""
        rows = self.rows
        return bool((rows.index == rows.index[:1]).all() and (rows.kind == rows.kind[:1]).all())


@functools.lru_cache(maxsize=256)
def build_plan(mask: Mask | None, seq_q: int, seq_kv: int, block_q: int, block_kv: int) -> BlockPlan:
    """The block plan of `mask` (None = full) for these lengths; cached per shape."""
    mask = Full() if mask is None else mask
    q_start, q_stop = block_bounds(seq_q, block_q)
    kv_start, kv_stop = block_bounds(seq_kv, block_kv)
    kinds = np.asarray(mask.classify(q_start, q_stop, kv_start, kv_stop), np.int8)
    expect = (math.ceil(seq_q / block_q), math.ceil(seq_kv / block_kv))
    if kinds.shape != expect:
        raise AssertionError(f"{type(mask).__name__}.classify returned {kinds.shape}, expected {expect}")
    mask_partial = bool((kinds == PARTIAL).any())
    if seq_kv % block_kv:  # the last KV block holds padding: never FULL
        kinds[:, -1] = np.minimum(kinds[:, -1], PARTIAL)
    kinds.setflags(write=False)
    return BlockPlan(
        seq_q=seq_q,
        seq_kv=seq_kv,
        block_q=block_q,
        block_kv=block_kv,
        kinds=kinds,
        rows=_compact(kinds),
        cols=_compact(np.ascontiguousarray(kinds.T)),
        mask_partial=mask_partial,
    )


def tile_visible(mask: Mask, plan: BlockPlan, q_block: int, kv_block: int) -> np.ndarray:
    """Host evaluation of one tile as a kernel sees it (kind + mask_fn + key padding); tests use it."""
    kind = plan.kinds[q_block, kv_block]
    qs, ks = q_block * plan.block_q, kv_block * plan.block_kv
    q_idx = np.arange(qs, min(qs + plan.block_q, plan.seq_q))[:, None]
    kv_idx = np.arange(ks, min(ks + plan.block_kv, plan.seq_kv))[None, :]
    shape = (q_idx.shape[0], kv_idx.shape[1])
    if kind == EMPTY:
        return np.zeros(shape, bool)
    if kind == FULL:
        return np.ones(shape, bool)
    return np.broadcast_to(np.asarray(mask.mask_fn(q_idx, kv_idx), bool), shape)
