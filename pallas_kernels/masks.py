"""Lazy, hashable, composable attention masks (tokens in row-major raster order).

A mask never materialises a seq x seq array outside the reference. Each mask offers
`mask_fn(q_idx, kv_idx)` (broadcasting, works on numpy and jax integer arrays, so kernels can evaluate
it tile by tile) and `classify(q_start, q_stop, kv_start, kv_stop)`, which labels every (q block,
kv block) pair EMPTY / PARTIAL / FULL at a cost that grows with the number of blocks. Kinds are
ordered so that `&` is the elementwise minimum and `|` the maximum.

Per-batch masks (packed sequences, per-example key padding) are runtime data: `SegmentIds`, or
`KeyPadding` with one length per batch element; they combine with static masks through `&` only.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import numpy as np

from pallas_kernels import neighborhood

EMPTY, PARTIAL, FULL = 0, 1, 2

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "And",
    "BlockSparse",
    "FrameTile",
    "Full",
    "KeyPadding",
    "Local1D",
    "Mask",
    "Neighborhood2D",
    "Neighborhood3D",
    "Or",
    "SegmentIds",
    "SegmentedMask",
    "dense_mask",
    "resolve",
]


def _kinds(nonempty: np.ndarray, full: np.ndarray) -> np.ndarray:
    """EMPTY / PARTIAL / FULL (0 / 1 / 2) from two boolean arrays: (nonempty | full) + full."""
    nonempty, full = np.broadcast_arrays(nonempty, full)
    kinds = (nonempty | full).astype(np.int8)
    kinds += full
    return kinds


class Mask(abc.ABC):
    """Base class: subclasses are frozen dataclasses (hashable, usable as static jit arguments)."""

    #: whether `mask_fn` is pure index arithmetic (evaluable inside a Pallas kernel).
    in_kernel: bool = True

    #: whether plans call `classify` on chunks of query-block rows (keeps temporaries small); False
    #: for masks that chunk internally and share work across all rows (neighbourhoods).
    classify_in_chunks: bool = True

    @abc.abstractmethod
    def mask_fn(self, q_idx, kv_idx):
        """True where query `q_idx` may attend to key `kv_idx` (broadcasting)."""

    @abc.abstractmethod
    def classify(self, q_start, q_stop, kv_start, kv_stop) -> np.ndarray:
        """Block kinds [nq, nk] for 1-D block bounds (stops exclusive, clipped to the sequence)."""

    def check_shape(self, seq_q: int, seq_kv: int) -> None:  # noqa: B027 - optional hook: fits any length
        """Raises ValueError when the mask does not fit these sequence lengths."""

    def batch_segments(self, batch: int, seq_q: int, seq_kv: int):
        """Per-batch (q_ids [B, Lq], kv_ids [B, Lk]) this mask needs on top of `mask_fn`, or None."""
        return None

    def __and__(self, other):
        if isinstance(other, SegmentIds | SegmentedMask):
            return other & self
        return And((self, other))

    def __or__(self, other):
        if isinstance(other, SegmentIds | SegmentedMask):
            raise ValueError("segment ids combine with other masks only through `&`")
        return Or((self, other))


@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every query sees every key."""

    def mask_fn(self, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)

    def classify(self, q_start, q_stop, kv_start, kv_stop):
        return np.full((len(q_start), len(kv_start)), FULL, np.int8)


@dataclasses.dataclass(frozen=True)
class Local1D(Mask):
    """Query i sees key j iff i - left <= j <= i + right."""

    left: int
    right: int

    def __post_init__(self):
        if self.left < 0 or self.right < 0:
            raise ValueError(f"Local1D needs left, right >= 0, got ({self.left}, {self.right})")

    def mask_fn(self, q_idx, kv_idx):
        return (kv_idx >= q_idx - self.left) & (kv_idx <= q_idx + self.right)

    def classify(self, q_start, q_stop, kv_start, kv_stop):
        qs, ql = q_start[:, None], q_stop[:, None] - 1
        ks, kl = kv_start[None, :], kv_stop[None, :] - 1
        nonempty = (kl >= qs - self.left) & (ks <= ql + self.right)
        full = (ks >= ql - self.left) & (kl <= qs + self.right)
        return _kinds(nonempty, full)


@dataclasses.dataclass(frozen=True)
class _Neighborhood(Mask):
    grid: tuple[int, ...]
    window: tuple[int, ...]
    tile: tuple[int, ...] | None = None  # tokens are tile-major (see neighborhood.permute)

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

    def mask_fn(self, q_idx, kv_idx):
        out = None
        cq = neighborhood.coords(q_idx, self.grid, self.tile)
        ck = neighborhood.coords(kv_idx, self.grid, self.tile)
        for a, b, w in zip(cq, ck, self.window, strict=True):
            term = abs(a - b) <= w // 2
            out = term if out is None else out & term
        return out

    classify_in_chunks = False

    def classify(self, q_start, q_stop, kv_start, kv_stop):
        return neighborhood.classify(self.grid, self.window, self.tile, q_start, q_stop, kv_start, kv_stop)

    def check_shape(self, seq_q, seq_kv):
        n = math.prod(self.grid)
        if seq_q != n or seq_kv != n:
            raise ValueError(
                f"{type(self).__name__} over grid {self.grid} covers {n} tokens, "
                f"but the sequences are ({seq_q}, {seq_kv})"
            )


@dataclasses.dataclass(frozen=True)
class Neighborhood2D(_Neighborhood):
    """Query (r, c) sees key (r', c') iff |r' - r| <= kh // 2 and |c' - c| <= kw // 2."""

    _ndim = 2


@dataclasses.dataclass(frozen=True)
class Neighborhood3D(_Neighborhood):
    """Query (t, r, c) sees key (t', r', c') iff each axis is within half its window."""

    _ndim = 3


@dataclasses.dataclass(frozen=True)
class FrameTile(Mask):
    """A query in frame f sees a key in frame f' iff |f - f'| <= radius or f' < global_frames."""

    frames: int
    tokens_per_frame: int
    radius: int
    global_frames: int = 0

    def mask_fn(self, q_idx, kv_idx):
        fq, fk = q_idx // self.tokens_per_frame, kv_idx // self.tokens_per_frame
        return (abs(fq - fk) <= self.radius) | (fk < self.global_frames)

    def classify(self, q_start, q_stop, kv_start, kv_stop):
        # Frame ranges [f0, f1] of each block; per-block thresholds first, so that every [nq, nk]
        # operation is one broadcast comparison or logical op.
        n, r, g = self.tokens_per_frame, self.radius, self.global_frames
        qf0, qf1 = q_start // n, (q_stop - 1) // n
        kf0, kf1 = kv_start // n, (kv_stop - 1) // n
        # Some pair within the radius: kf0 - qf1 <= r and qf0 - kf1 <= r; or a global key frame.
        nonempty = (kf0[None, :] <= (qf1 + r)[:, None]) & (kf1[None, :] >= (qf0 - r)[:, None])
        if r < 0:  # no frame is within a negative radius
            nonempty[...] = False
        nonempty |= (kf0 < g)[None, :]
        # Every pair visible: the non-global key frames [max(kf0, g), kf1] (maybe none) are all
        # within the radius of every query frame.
        local0 = np.maximum(kf0, g)
        full = (kf1[None, :] <= (qf0 + r)[:, None]) & (local0[None, :] >= (qf1 - r)[:, None])
        full |= (local0 > kf1)[None, :]
        return _kinds(nonempty, full)

    def check_shape(self, seq_q, seq_kv):
        n = self.frames * self.tokens_per_frame
        if seq_q != n or seq_kv != n:
            raise ValueError(f"FrameTile covers {n} tokens but the sequences are ({seq_q}, {seq_kv})")


@dataclasses.dataclass(frozen=True)
class KeyPadding(Mask):
    """Keys at positions >= length are invisible. One int, or one length per batch element."""

    lengths: int | tuple[int, ...]

    def __post_init__(self):
        lengths = self.lengths
        if not isinstance(lengths, int | np.integer):
            lengths = tuple(int(n) for n in lengths)
            if not lengths:
                raise ValueError("KeyPadding needs at least one length")
            object.__setattr__(self, "lengths", lengths[0] if len(lengths) == 1 else lengths)
        else:
            object.__setattr__(self, "lengths", int(lengths))

    @property
    def max_length(self) -> int:
        return self.lengths if isinstance(self.lengths, int) else max(self.lengths)

    @property
    def min_length(self) -> int:
        return self.lengths if isinstance(self.lengths, int) else min(self.lengths)

    def mask_fn(self, q_idx, kv_idx):
        return (kv_idx < self.max_length) & (q_idx >= 0)

    def classify(self, q_start, q_stop, kv_start, kv_stop):
        nonempty = np.broadcast_to(kv_start[None, :] < self.max_length, (len(q_start), len(kv_start)))
        full = np.broadcast_to(kv_stop[None, :] <= self.min_length, nonempty.shape)
        kinds = _kinds(nonempty, full)
        return kinds

    def batch_segments(self, batch, seq_q, seq_kv):
        if isinstance(self.lengths, int):
            return None
        if len(self.lengths) != batch:
            raise ValueError(f"KeyPadding has {len(self.lengths)} lengths for a batch of {batch}")
        kv_ids = (np.arange(seq_kv)[None, :] >= np.asarray(self.lengths)[:, None]).astype(np.int32)
        return np.zeros((batch, seq_q), np.int32), kv_ids


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparse(Mask):
    """An explicit boolean pattern: query i sees key j iff block_mask[i // bq, j // bk]."""

    block_mask: np.ndarray
    block_shape: tuple[int, int]
    in_kernel = False

    def __post_init__(self):
        bm = np.array(self.block_mask, dtype=bool)
        if bm.ndim != 2:
            raise ValueError(f"BlockSparse needs a 2-D block mask, got shape {bm.shape}")
        bm.setflags(write=False)
        object.__setattr__(self, "block_mask", bm)
        object.__setattr__(self, "block_shape", tuple(int(b) for b in self.block_shape))
        counts = np.zeros((bm.shape[0] + 1, bm.shape[1] + 1), np.int32)
        counts[1:, 1:] = bm.astype(np.int32).cumsum(0).cumsum(1)
        object.__setattr__(self, "_counts", counts)
        object.__setattr__(self, "_hash", hash((self.block_shape, bm.shape, bm.tobytes())))

    def __eq__(self, other):
        return (
            isinstance(other, BlockSparse)
            and self.block_shape == other.block_shape
            and self.block_mask.shape == other.block_mask.shape
            and bool(np.array_equal(self.block_mask, other.block_mask))
        )

    def __hash__(self):
        return self._hash

    def mask_fn(self, q_idx, kv_idx):
        bq, bk = self.block_shape
        rows, cols = self.block_mask.shape
        if isinstance(q_idx, jax.Array) or isinstance(kv_idx, jax.Array):
            import jax.numpy as jnp

            table, clip = jnp.asarray(self.block_mask), jnp.clip
        else:
            table, clip = self.block_mask, np.clip
        return table[clip(q_idx // bq, 0, rows - 1), clip(kv_idx // bk, 0, cols - 1)]

    def classify(self, q_start, q_stop, kv_start, kv_stop):
        bq, bk = self.block_shape
        r0, r1 = q_start // bq, (q_stop - 1) // bq + 1
        c0, c1 = kv_start // bk, (kv_stop - 1) // bk + 1
        rows = self._counts[r1] - self._counts[r0]  # [nq, cols + 1]: set blocks per column prefix
        count = rows.take(c1, axis=1) - rows.take(c0, axis=1)
        return _kinds(count > 0, count == (r1 - r0)[:, None] * (c1 - c0)[None, :])

    def check_shape(self, seq_q, seq_kv):
        need = (math.ceil(seq_q / self.block_shape[0]), math.ceil(seq_kv / self.block_shape[1]))
        if self.block_mask.shape != need:
            raise ValueError(
                f"BlockSparse block_mask has shape {self.block_mask.shape}, but sequences "
                f"({seq_q}, {seq_kv}) with block_shape {self.block_shape} need {need}"
            )


@dataclasses.dataclass(frozen=True)
class And(Mask):
    """Visible iff visible in every child."""

    children: tuple[Mask, ...]

    def __post_init__(self):
        flat = []
        for child in self.children:
            if not isinstance(child, Mask):
                raise TypeError(f"cannot combine a mask with {type(child).__name__}")
            flat.extend(child.children if type(child) is type(self) else (child,))
        object.__setattr__(self, "children", tuple(flat))

    @property
    def in_kernel(self) -> bool:
        return all(c.in_kernel for c in self.children)

    @property
    def classify_in_chunks(self) -> bool:
        return all(c.classify_in_chunks for c in self.children)

    def mask_fn(self, q_idx, kv_idx):
        out = self.children[0].mask_fn(q_idx, kv_idx)
        for child in self.children[1:]:
            out = out & child.mask_fn(q_idx, kv_idx)
        return out

    def classify(self, q_start, q_stop, kv_start, kv_stop):
        return self._combine(np.minimum, q_start, q_stop, kv_start, kv_stop)

    def _combine(self, op, *bounds) -> np.ndarray:
        kinds = np.array(self.children[0].classify(*bounds), np.int8)  # a fresh, writable copy
        for child in self.children[1:]:
            op(kinds, child.classify(*bounds), out=kinds)
        return kinds

    def check_shape(self, seq_q, seq_kv):
        for child in self.children:
            child.check_shape(seq_q, seq_kv)

    def batch_segments(self, batch, seq_q, seq_kv):
        found = [s for c in self.children if (s := c.batch_segments(batch, seq_q, seq_kv)) is not None]
        if len(found) > 1:
            raise ValueError("at most one per-batch mask (segment ids / per-example key padding) per call")
        return found[0] if found else None


@dataclasses.dataclass(frozen=True)
class Or(And):
    """Visible iff visible in some child."""

    def mask_fn(self, q_idx, kv_idx):
        out = self.children[0].mask_fn(q_idx, kv_idx)
        for child in self.children[1:]:
            out = out | child.mask_fn(q_idx, kv_idx)
        return out

    def classify(self, q_start, q_stop, kv_start, kv_stop):
        return self._combine(np.maximum, q_start, q_stop, kv_start, kv_stop)

    def batch_segments(self, batch, seq_q, seq_kv):
        if any(c.batch_segments(batch, seq_q, seq_kv) is not None for c in self.children):
            raise ValueError("per-batch masks (segment ids / per-example key padding) combine only with `&`")
        return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class SegmentIds:
    """Packed sequences: query i sees key j iff q[b, i] == kv[b, j]. Arrays [B, L] (may be traced)."""

    q: jax.Array
    kv: jax.Array

    def __init__(self, q, kv=None):
        object.__setattr__(self, "q", q)
        object.__setattr__(self, "kv", q if kv is None else kv)

    def __and__(self, other):
        if isinstance(other, SegmentIds | SegmentedMask):
            raise ValueError("at most one set of segment ids per call")
        return SegmentedMask(other, self)

    __rand__ = __and__

    def __or__(self, other):
        raise ValueError("segment ids combine with other masks only through `&`")

    __ror__ = __or__


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class SegmentedMask:
    """A static mask AND runtime segment ids."""

    mask: Mask = dataclasses.field(metadata=dict(static=True))
    segments: SegmentIds

    def __and__(self, other):
        if isinstance(other, SegmentIds | SegmentedMask):
            raise ValueError("at most one set of segment ids per call")
        return SegmentedMask(self.mask & other, self.segments)

    __rand__ = __and__

    def __or__(self, other):
        raise ValueError("segment ids combine with other masks only through `&`")

    __ror__ = __or__


def resolve(mask, batch: int, seq_q: int, seq_kv: int):
    """Splits any accepted `mask` argument into (static Mask, q_ids | None, kv_ids | None)."""
    if mask is None:
        return Full(), None, None
    if isinstance(mask, SegmentIds):
        mask = SegmentedMask(Full(), mask)
    if isinstance(mask, SegmentedMask):
        static, seg = mask.mask, mask.segments
        if static.batch_segments(batch, seq_q, seq_kv) is not None:
            raise ValueError("at most one per-batch mask (segment ids / per-example key padding) per call")
        if tuple(seg.q.shape) != (batch, seq_q) or tuple(seg.kv.shape) != (batch, seq_kv):
            raise ValueError(
                f"segment ids must have shapes ({batch}, {seq_q}) and ({batch}, {seq_kv}), "
                f"got {tuple(seg.q.shape)} and {tuple(seg.kv.shape)}"
            )
        static.check_shape(seq_q, seq_kv)
        return static, seg.q, seg.kv
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a pallas_kernels.masks.Mask or SegmentIds, got {type(mask).__name__}")
    mask.check_shape(seq_q, seq_kv)
    seg = mask.batch_segments(batch, seq_q, seq_kv)
    return (mask, None, None) if seg is None else (mask, seg[0], seg[1])


def dense_mask(mask: Mask, seq_q: int, seq_kv: int) -> np.ndarray:
    """The full [seq_q, seq_kv] boolean mask (reference and tests only)."""
    m = mask.mask_fn(np.arange(seq_q)[:, None], np.arange(seq_kv)[None, :])
    return np.broadcast_to(np.asarray(m, dtype=bool), (seq_q, seq_kv))


def block_bounds(seq: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts and (clipped, exclusive) stops of the blocks covering `seq` tokens."""
    starts = np.arange(0, seq, block, dtype=np.int64)
    return starts, np.minimum(starts + block, seq)
