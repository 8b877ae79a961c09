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


def _boxes(starts, stops, grid, tile) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis coordinate intervals [n, max_boxes, ndim, 2] and validity [n, max_boxes]."""
    nd = len(grid)
    radix = grid if tile is None else tuple(g // t for g, t in zip(grid, tile, strict=True)) + tile
    per = [_radix_boxes(int(a), int(b), radix) for a, b in zip(starts, stops, strict=True)]
    most = max(len(p) for p in per)
    boxes = np.zeros((len(per), most, nd, 2), np.int32)
    valid = np.zeros((len(per), most), bool)
    for i, blist in enumerate(per):
        for j, box in enumerate(blist):
            if tile is None:
                boxes[i, j] = box
            else:
                for d, t in enumerate(tile):
                    (o0, o1), (i0, i1) = box[d], box[nd + d]
                    boxes[i, j, d] = (o0 * t + i0, o1 * t + i1)
            valid[i, j] = True
    return boxes, valid


def classify(grid, window, tile, q_start, q_stop, kv_start, kv_stop) -> np.ndarray:
    """Block kinds [nq, nk] of a neighbourhood mask (see the module docstring)."""
    nq, nk = len(q_start), len(kv_start)
    half = np.asarray([w // 2 for w in window])
    qbox, qvalid = _boxes(q_start, q_stop, grid, tile)
    kbox, kvalid = _boxes(kv_start, kv_stop, grid, tile)
    # Band of candidate key blocks allowed by the outermost axis.
    lo = np.where(qvalid, qbox[:, :, 0, 0], np.iinfo(np.int32).max).min(1) - half[0]
    hi = np.where(qvalid, qbox[:, :, 0, 1], -1).max(1) + half[0]
    unit = tile[0] if tile else 1
    stride = math.prod(grid) // (grid[0] // unit)
    tok_lo = np.maximum(lo, 0) // unit * stride
    tok_hi = (np.minimum(hi, grid[0] - 1) // unit + 1) * stride
    blk_lo = np.searchsorted(kv_stop, tok_lo, side="right")
    blk_hi = np.searchsorted(kv_start, tok_hi, side="left")
    width = max(int((blk_hi - blk_lo).max()), 1)
    kinds = np.zeros((nq, nk), np.int8)
    pairs = width * qbox.shape[1] * kbox.shape[1] * len(grid)
    step = max(1, (1 << 21) // pairs)
    for r0 in range(0, nq, step):
        rs = slice(r0, min(nq, r0 + step))
        cand = blk_lo[rs, None] + np.arange(width)[None, :]  # [rows, width]
        in_band = cand < blk_hi[rs, None]
        cand = np.minimum(cand, nk - 1)
        qb = qbox[rs, None, :, None]  # [rows, 1, mbq, 1, nd, 2]
        kb = kbox[cand][:, :, None]  # [rows, width, 1, mbk, nd, 2]
        min_dist = np.maximum(kb[..., 0] - qb[..., 1], qb[..., 0] - kb[..., 1])
        max_dist = np.maximum(kb[..., 1] - qb[..., 0], qb[..., 1] - kb[..., 0])
        pair_ok = qvalid[rs, None, :, None] & kvalid[cand][:, :, None, :]
        any_pair = ((min_dist <= half).all(-1) & pair_ok).any((2, 3))
        all_pair = ((max_dist <= half).all(-1) | ~pair_ok).all((2, 3))
        band = np.where(all_pair, FULL, np.where(any_pair, PARTIAL, EMPTY)).astype(np.int8)
        rows = np.broadcast_to(np.arange(rs.start, rs.stop)[:, None], cand.shape)
        kinds[rows[in_band], cand[in_band]] = band[in_band]
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
