"""2-D / 3-D neighbourhood masks (NATTEN semantics, no window shifting) and token permutations.

In raster order a block of tokens is a strip of rows, and a window touches every block in a band of
rows. `permute` reorders tokens tile-major (each `tile` of the grid becomes contiguous): with blocks
of whole tiles, a query block visits only the tiles around it, far fewer when the grid is large
relative to the window (e.g. 64x64 tokens, 13x13 window, 8x8 tiles: 12% of tiles instead of 19%).
Pass the same `tile` to the mask and `unpermute` the output. Tiles stay partial unless the window
is strided to the tile (GNA), which these masks' semantics do not do.

Block classification decomposes each block's token range into at most 2N-1 boxes of the grid (N
axes) and compares boxes by their per-axis interval distances: exact in raster order, conservative
(partial instead of empty/full) for tile-major ranges that are not whole tiles. Only key blocks in
the band allowed by the outermost axis are examined, so the cost grows with the number of blocks.
"""

from __future__ import annotations

import math

import jax
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


def _radix_boxes(a: int, b: int, radix: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """Boxes (inclusive per-digit intervals) whose union is the index range [a, b) in mixed radix."""
    if a >= b:
        return []
    if len(radix) == 1:
        return [[(a, b - 1)]]
    inner = math.prod(radix[1:])
    ha, la = divmod(a, inner)
    hb, lb = divmod(b, inner)
    if ha == hb:
        return [[(ha, ha), *box] for box in _radix_boxes(la, lb, radix[1:])]
    out = []
    if la:
        out += [[(ha, ha), *box] for box in _radix_boxes(la, inner, radix[1:])]
        ha += 1
    if ha < hb:
        out.append([(ha, hb - 1)] + [(0, n - 1) for n in radix[1:]])
    if lb:
        out += [[(hb, hb), *box] for box in _radix_boxes(0, lb, radix[1:])]
    return out


def _decode(idx, sizes: tuple[int, ...]):
    """Row-major digits of `idx` over `sizes` (works on numpy and jax arrays)."""
    digits, stride = [], math.prod(sizes)
    for n in sizes:
        stride //= n
        digits.append((idx // stride) % n)
    return digits


def coords(idx, grid: tuple[int, ...], tile: tuple[int, ...] | None = None):
    """Grid coordinates of token `idx` (raster order, or tile-major when `tile` is set)."""
    if tile is None:
        return _decode(idx, grid)
    per_tile = math.prod(tile)
    outer = _decode(idx // per_tile, tuple(g // t for g, t in zip(grid, tile, strict=True)))
    inner = _decode(idx % per_tile, tile)
    return [o * t + i for o, i, t in zip(outer, inner, tile, strict=True)]


def _box_templates(offsets, lengths, radix) -> tuple[list[list[list[tuple[int, int]]]], np.ndarray]:
    """Box lists of the ranges [offset, offset + length) for the distinct (offset, length) pairs."""
    pairs, inverse = np.unique(np.stack([offsets, lengths], 1), axis=0, return_inverse=True)
    lists = [_radix_boxes(int(a), int(a + n), radix) for a, n in pairs]
    return lists, inverse.reshape(-1)


def _boxes(starts, stops, grid, tile) -> np.ndarray:
    """Per-axis coordinate intervals [n, max_boxes, ndim, 2] (int32) of each token range.

    Padding boxes are empty intervals (lo = +BIG, hi = -BIG), which no key is near and every key is
    within. A range [a, b) is the range [a mod inner, a mod inner + b - a) shifted by a // inner
    along the outermost radix digit (inner = the product of the other digits), so only the distinct
    (a mod inner, b - a) pairs (few, for equal blocks) are decomposed in Python.
    """
    nd = len(grid)
    radix = grid if tile is None else tuple(g // t for g, t in zip(grid, tile, strict=True)) + tile
    inner = math.prod(radix[1:])
    starts, stops = np.asarray(starts, np.int64), np.asarray(stops, np.int64)
    high, low = np.divmod(starts, inner)
    lists, which = _box_templates(low, stops - starts, radix)
    most = max(1, max(len(b) for b in lists))
    templates = np.empty((len(lists), most, nd, 2), np.int64)
    templates[..., 0], templates[..., 1] = _BIG, -_BIG
    for i, blist in enumerate(lists):
        for j, box in enumerate(blist):
            if tile is None:
                templates[i, j] = box
            else:
                for d, t in enumerate(tile):
                    (o0, o1), (i0, i1) = box[d], box[nd + d]
                    templates[i, j, d] = (o0 * t + i0, o1 * t + i1)
    boxes = templates[which]
    valid = boxes[..., 0, 0] <= boxes[..., 0, 1]
    boxes[..., 0, :] += np.where(valid, (high * (tile[0] if tile else 1))[:, None], 0)[..., None]
    return boxes.astype(np.int32)


_BIG = 1 << 30


#: Elements per broadcast comparison in `classify` (keeps temporaries in cache).
_CHUNK = 1 << 17


def classify(grid, window, tile, q_start, q_stop, kv_start, kv_stop) -> np.ndarray:
    """Block kinds [nq, nk] of a neighbourhood mask (see the module docstring).

    A query box and a key box have a visible pair iff on every axis the intervals are within half
    the window of each other (kb0 <= qb1 + h and kb1 >= qb0 - h), and all pairs are visible iff on
    every axis kb1 <= qb0 + h and kb0 >= qb1 - h. Rows are processed in chunks, each over the
    contiguous range of key blocks that the band of its rows allows.
    """
    nq, nk = len(q_start), len(kv_start)
    half = np.asarray([w // 2 for w in window], np.int32)
    qbox = _boxes(q_start, q_stop, grid, tile)
    same = nq == nk and np.array_equal(q_start, kv_start) and np.array_equal(q_stop, kv_stop)
    kbox = qbox if same else _boxes(kv_start, kv_stop, grid, tile)
    qvalid = qbox[:, :, 0, 0] <= qbox[:, :, 0, 1]
    # Band of candidate key blocks allowed by the outermost axis.
    lo = np.where(qvalid, qbox[:, :, 0, 0], _BIG).min(1) - half[0]
    hi = np.where(qvalid, qbox[:, :, 0, 1], -1).max(1) + half[0]
    unit = tile[0] if tile else 1
    stride = math.prod(grid) // (grid[0] // unit)
    tok_lo = np.maximum(lo, 0) // unit * stride
    tok_hi = (np.minimum(hi, grid[0] - 1) // unit + 1) * stride
    blk_lo = np.searchsorted(kv_stop, tok_lo, side="right")
    blk_hi = np.maximum(np.searchsorted(kv_start, tok_hi, side="left"), blk_lo)
    # Thresholds of the four comparisons per query box and axis ([nq, 1] each) and key intervals
    # per key box and axis ([1, nk] each): every operation below is a 2-D broadcast comparison.
    q_thr = []  # per query box, per axis: (near_hi, near_lo, within_hi, within_lo), each [nq, 1]
    for i in range(qbox.shape[1]):
        q_thr.append([])
        for d, h in enumerate(half.tolist()):
            q0, q1 = qbox[:, i, d, 0, None], qbox[:, i, d, 1, None]
            q_thr[-1].append((q1 + h, q0 - h, q0 + h, q1 - h))
    k_int = [  # per key box, per axis: (lo, hi), each [1, nk]
        [(kbox[None, :, j, d, 0], kbox[None, :, j, d, 1]) for d in range(len(grid))]
        for j in range(kbox.shape[1])
    ]
    kinds = np.zeros((nq, nk), np.int8)
    width = max(int((blk_hi - blk_lo).max(initial=0)), 1)
    step = int(np.clip(_CHUNK // width, 1, 64))
    for r0 in range(0, nq, step):
        r1 = min(nq, r0 + step)
        c0, c1 = int(blk_lo[r0:r1].min()), int(blk_hi[r0:r1].max())
        if c0 >= c1:
            continue
        rs, cs = slice(r0, r1), slice(c0, c1)
        nonempty = full = None  # some pair of boxes near / every pair within
        for q_axes in q_thr:
            for k_axes in k_int:
                near = within = None
                for (near_hi, near_lo, within_hi, within_lo), (k0, k1) in zip(q_axes, k_axes, strict=True):
                    k0, k1 = k0[:, cs], k1[:, cs]
                    n_d = (k0 <= near_hi[rs]) & (k1 >= near_lo[rs])
                    w_d = (k1 <= within_hi[rs]) & (k0 >= within_lo[rs])
                    near = n_d if near is None else np.logical_and(near, n_d, out=near)
                    within = w_d if within is None else np.logical_and(within, w_d, out=within)
                nonempty = near if nonempty is None else np.logical_or(nonempty, near, out=nonempty)
                full = within if full is None else np.logical_and(full, within, out=full)
        out = kinds[rs, cs]  # a view: EMPTY 0, PARTIAL 1, FULL 2 = nonempty + full
        out[...] = nonempty
        out += full
    return kinds


def _perm(grid: tuple[int, ...], tile: tuple[int, ...]) -> np.ndarray:
    """perm[i] = raster index of the token at tile-major position i."""
    return np.ravel_multi_index(tuple(coords(np.arange(math.prod(grid)), grid, tile)), grid)


def permute(x: jax.Array, grid: tuple[int, ...], tile: tuple[int, ...], axis: int = 1) -> jax.Array:
    """Reorders the token axis from raster order to tile-major order."""
    return x.take(_perm(tuple(grid), tuple(tile)), axis=axis)


def unpermute(x: jax.Array, grid: tuple[int, ...], tile: tuple[int, ...], axis: int = 1) -> jax.Array:
    """Inverse of `permute`."""
    return x.take(np.argsort(_perm(tuple(grid), tuple(tile))), axis=axis)
