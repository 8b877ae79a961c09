"""Host-side block plans: which KV blocks each Q block visits (and the transpose, for dK/dV).

A plan is built once per (mask, lengths, block sizes) with numpy and cached; every layer and every
sampling step reuses it. Rows list their non-empty blocks compacted, FULL blocks first and then
PARTIAL ones, so a kernel runs two loops (unmasked, then masked) with no per-tile branch. Entries
past a row's count repeat its last block, so a TPU pipeline that follows the table fetches nothing
new for them (the "shrunken grid": only as many steps as the busiest row needs).

Construction is vectorised numpy over chunks of block rows (`CHUNK` blocks at a time): the cost
grows with the number of blocks, and every temporary stays small. Whole-plan temporaries (1 MiB
and more for 128k tokens in 128-token blocks) would each be fresh memory from the OS, and their
page faults, not the arithmetic, would dominate (3-5x slower).
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


#: Blocks per row chunk during construction (temporaries of at most a few hundred KiB).
CHUNK = 1 << 17


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK // max(n_cols, 1))
    return [slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def _repeats_previous(parts: list[np.ndarray]) -> np.ndarray:
    """[rows] bool: whether each row equals the row before it (`parts`: contiguous row chunks)."""
    out, prev = [], None
    for k in parts:
        first = np.array([prev is not None and np.array_equal(k[0], prev)])
        out += [first, (k[1:] == k[:-1]).all(axis=1)]
        prev = k[-1]
    return np.concatenate(out)


def _compact(kinds: np.ndarray) -> Compacted:
    """FULL blocks, then PARTIAL ones, each in ascending order; padded with the row's last block.

    `kinds` may be a transposed view. Runs of identical consecutive rows (full attention, key
    padding, the rows of one frame in FrameTile) are compacted once and repeated; the rest is, per
    row chunk, boolean passes and a scatter of the non-empty blocks (no per-row sort).
    """
    n_rows, n_cols = kinds.shape
    chunks = _row_chunks(n_rows, n_cols)
    parts = [np.ascontiguousarray(kinds[rs]) for rs in chunks]  # one pass over a transposed view
    repeats = _repeats_previous(parts) if n_rows > 1 else np.zeros(1, bool)
    if repeats.any():
        one = _compact(np.concatenate([k[~repeats[rs]] for rs, k in zip(chunks, parts, strict=True)]))
        run = np.cumsum(~repeats) - 1  # the run (= row of `one`) of every row
        index, kind, count, n_full = (a[run] for a in (one.index, one.kind, one.count, one.n_full))
    else:
        n_full, count = np.empty(n_rows, np.int32), np.empty(n_rows, np.int32)
        for rs, k in zip(chunks, parts, strict=True):
            n_full[rs] = np.count_nonzero(k == FULL, axis=1)
            count[rs] = np.count_nonzero(k, axis=1)  # EMPTY is 0
        steps = max(int(count.max(initial=0)), 1)  # <= n_cols: the same chunks fit the outputs
        index, kind = np.empty((n_rows, steps), np.int32), np.empty((n_rows, steps), np.int8)
        step = np.arange(steps, dtype=np.int32)[None, :]
        for rs, k in zip(chunks, parts, strict=True):
            _compact_rows(k, n_full[rs], count[rs], step, index[rs], kind[rs])
    for a in (index, kind, count, n_full):
        a.setflags(write=False)
    return Compacted(index, kind, n_full, count)


def _compact_rows(kinds, n_full, count, step, index_out, kind_out) -> None:
    """`_compact` of a few contiguous rows, written into `index_out` / `kind_out` [rows, steps]."""
    n_rows, n_cols = kinds.shape
    steps = index_out.shape[1]
    flat = np.zeros(n_rows * steps, np.int32)
    row = np.arange(n_rows, dtype=np.int64)
    for value, per_row, offset in ((FULL, n_full, 0), (PARTIAL, count - n_full, n_full)):
        where = np.flatnonzero(kinds == value)  # row-major: each row's blocks in ascending order
        first = np.cumsum(per_row, dtype=np.int64) - per_row  # rank of each row's first entry
        cols = where - np.repeat(row * n_cols, per_row)
        flat[np.arange(len(where), dtype=np.int64) + np.repeat(row * steps + offset - first, per_row)] = cols
    index = flat.reshape(n_rows, steps)
    last = index[row, np.maximum(count - 1, 0)]
    np.copyto(index_out, np.where(step >= count[:, None], last[:, None], index))
    np.add((step < count[:, None]), (step < n_full[:, None]), out=kind_out, dtype=np.int8)


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
    expect = (math.ceil(seq_q / block_q), math.ceil(seq_kv / block_kv))
    if mask.classify_in_chunks:
        kinds = np.empty(expect, np.int8)
        for rs in _row_chunks(*expect):
            part = np.asarray(mask.classify(q_start[rs], q_stop[rs], kv_start, kv_stop))
            if part.shape != (rs.stop - rs.start, expect[1]):
                raise AssertionError(f"{type(mask).__name__}.classify returned {part.shape} for {rs}")
            kinds[rs] = part
    else:
        kinds = np.asarray(mask.classify(q_start, q_stop, kv_start, kv_stop), np.int8)
    if kinds.shape != expect:
        raise AssertionError(f"{type(mask).__name__}.classify returned {kinds.shape}, expected {expect}")
    mask_partial = bool(np.count_nonzero(kinds == PARTIAL))
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
        cols=_compact(kinds.T),
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
