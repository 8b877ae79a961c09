"""2-D / 3-D neighbourhood masks (NATTEN semantics, no window shifting) and token permutations.

In raster order a window cuts most tiles into partial blocks. `permute` reorders tokens tile-major
(each `tile` of the grid becomes contiguous), so that with block sizes equal to whole tiles most
blocks are fully dense or empty; pass the same `tile` to the mask and `unpermute` the output.

Block classification decomposes each block's token range into at most 2N-1 boxes of the grid (N
axes) and compares boxes by their per-axis interval distances: exact in raster order, conservative
(partial instead of empty/full) for tile-major ranges that are not whole tiles. Only key blocks in
the band allowed by the outermost axis are examined, so the cost grows with the number of blocks.
"""

from __future__ import annotations

import dataclasses
import functools
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


@dataclasses.dataclass(frozen=True)
class _Neighborhood:
    grid: tuple[int, ...]
    window: tuple[int, ...]
    tile: tuple[int, ...] | None = None

    def __post_init__(self):
        name, n = type(self).__name__, self._ndim
        grid, window = tuple(int(g) for g in self.grid), tuple(int(w) for w in self.window)
        if len(grid) != n or len(window) != n:
            raise ValueError(f"{name} needs {n}-D grid and window, got {grid} and {window}")
        if any(w % 2 == 0 or w < 1 for w in window):
            raise ValueError(f"{name} window sizes must be odd and positive, got {window}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "window", window)
        if self.tile is not None:
            tile = tuple(int(t) for t in self.tile)
            if len(tile) != n or any(g % t for g, t in zip(grid, tile, strict=True)):
                raise ValueError(f"{name} tile {tile} must have {n} entries dividing grid {grid}")
            object.__setattr__(self, "tile", tile)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def coords(self, idx):
        """Grid coordinates of token `idx` (raster order, or tile-major when `tile` is set)."""
        if self.tile is None:
            return _decode(idx, self.grid)
        per_tile = math.prod(self.tile)
        outer = _decode(idx // per_tile, tuple(g // t for g, t in zip(self.grid, self.tile, strict=True)))
        inner = _decode(idx % per_tile, self.tile)
        return [o * t + i for o, i, t in zip(outer, inner, self.tile, strict=True)]

    def mask_fn(self, q_idx, kv_idx):
        out = None
        for cq, ck, w in zip(self.coords(q_idx), self.coords(kv_idx), self.window, strict=True):
            term = abs(cq - ck) <= w // 2
            out = term if out is None else out & term
        return out

    def check_shape(self, seq_q: int, seq_kv: int) -> None:
        if seq_q != self.num_tokens or seq_kv != self.num_tokens:
            raise ValueError(
                f"{type(self).__name__} over grid {self.grid} covers {self.num_tokens} tokens, "
                f"but the sequences are ({seq_q}, {seq_kv})"
            )

    def batch_segments(self, batch, seq_q, seq_kv):
        return None

    @functools.cached_property
    def _radix(self) -> tuple[int, ...]:
        if self.tile is None:
            return self.grid
        return tuple(g // t for g, t in zip(self.grid, self.tile, strict=True)) + self.tile

    def _boxes(self, starts, stops) -> tuple[np.ndarray, np.ndarray]:
        """Per-axis coordinate intervals [n, max_boxes, ndim, 2] and validity [n, max_boxes]."""
        n, nd = self._ndim, len(starts)
        per = [_radix_boxes(int(a), int(b), self._radix) for a, b in zip(starts, stops, strict=True)]
        most = max(len(p) for p in per)
        boxes = np.zeros((nd, most, n, 2), np.int64)
        valid = np.zeros((nd, most), bool)
        for i, blist in enumerate(per):
            for j, box in enumerate(blist):
                if self.tile is None:
                    boxes[i, j] = box
                else:
                    for d, t in enumerate(self.tile):
                        (o0, o1), (i0, i1) = box[d], box[n + d]
                        boxes[i, j, d] = (o0 * t + i0, o1 * t + i1)
                valid[i, j] = True
        return boxes, valid

    def classify(self, q_start, q_stop, kv_start, kv_stop) -> np.ndarray:
        nq, nk = len(q_start), len(kv_start)
        half = np.asarray([w // 2 for w in self.window])
        qbox, qvalid = self._boxes(q_start, q_stop)
        kbox, kvalid = self._boxes(kv_start, kv_stop)
        # Band of candidate key blocks from the outermost radix digit.
        lo = np.where(qvalid, qbox[:, :, 0, 0], np.iinfo(np.int64).max).min(1) - half[0]
        hi = np.where(qvalid, qbox[:, :, 0, 1], -1).max(1) + half[0]
        unit = self.tile[0] if self.tile else 1
        stride = self.num_tokens // self._radix[0]
        tok_lo = np.maximum(lo, 0) // unit * stride
        tok_hi = (np.minimum(hi, self.grid[0] - 1) // unit + 1) * stride
        blk_lo = np.searchsorted(kv_stop, tok_lo, side="right")
        blk_hi = np.searchsorted(kv_start, tok_hi, side="left")
        width = max(int((blk_hi - blk_lo).max()), 1)
        cand = blk_lo[:, None] + np.arange(width)[None, :]  # [nq, width]
        in_band = cand < blk_hi[:, None]
        cand = np.minimum(cand, nk - 1)
        kb, kv_ok = kbox[cand], kvalid[cand]  # [nq, width, mb, nd, 2]
        qb = qbox[:, None, :, None]  # [nq, 1, mbq, 1, nd, 2]
        kb = kb[:, :, None, :]  # [nq, width, 1, mbk, nd, 2]
        min_dist = np.maximum(0, np.maximum(kb[..., 0] - qb[..., 1], qb[..., 0] - kb[..., 1]))
        max_dist = np.maximum(kb[..., 1] - qb[..., 0], qb[..., 1] - kb[..., 0])
        pair_ok = qvalid[:, None, :, None] & kv_ok[:, :, None, :]
        any_pair = ((min_dist <= half).all(-1) & pair_ok).any((2, 3))
        all_pair = ((max_dist <= half).all(-1) | ~pair_ok).all((2, 3))
        band_kinds = np.where(all_pair, FULL, np.where(any_pair, PARTIAL, EMPTY))
        band_kinds = np.where(in_band, band_kinds, EMPTY).astype(np.int8)
        kinds = np.zeros((nq, nk), np.int8)
        rows = np.broadcast_to(np.arange(nq)[:, None], cand.shape)
        kinds[rows[in_band], cand[in_band]] = band_kinds[in_band]
        return kinds


def _mask_base():
    from pallas_kernels.masks import Mask  # masks imports this module; resolve the base lazily

    return Mask


class _Bind:
    """Operators shared with masks.Mask (defined there; bound here to avoid an import cycle)."""

    in_kernel = True

    def __and__(self, other):
        return _mask_base().__and__(self, other)

    def __or__(self, other):
        return _mask_base().__or__(self, other)


@dataclasses.dataclass(frozen=True)
class Neighborhood2D(_Bind, _Neighborhood):
    """Query (r, c) sees key (r', c') iff |r' - r| <= kh // 2 and |c' - c| <= kw // 2."""

    _ndim = 2


@dataclasses.dataclass(frozen=True)
class Neighborhood3D(_Bind, _Neighborhood):
    """Query (t, r, c) sees key (t', r', c') iff every axis is within half its window."""

    _ndim = 3


def _perm(grid: tuple[int, ...], tile: tuple[int, ...]) -> np.ndarray:
    """perm[i] = raster index of the token at tile-major position i."""
    proxy = Neighborhood2D if len(grid) == 2 else Neighborhood3D
    coords = proxy(grid, (1,) * len(grid), tile).coords(np.arange(math.prod(grid)))
    return np.ravel_multi_index(tuple(coords), grid)


def permute(x: jax.Array, grid: tuple[int, ...], tile: tuple[int, ...], axis: int = 1) -> jax.Array:
    """Reorders the token axis from raster order to tile-major order."""
    return x.take(_perm(tuple(grid), tuple(tile)), axis=axis)


def unpermute(x: jax.Array, grid: tuple[int, ...], tile: tuple[int, ...], axis: int = 1) -> jax.Array:
    """Inverse of `permute`."""
    return x.take(np.argsort(_perm(tuple(grid), tuple(tile))), axis=axis)
