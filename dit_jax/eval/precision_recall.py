"""Improved precision and recall (Kynkäänniemi et al., 2019) as in the ADM evaluator.

Each feature set spans a manifold: the union of balls around its points whose radius is the distance
to the point's k-th nearest neighbour in the same set (k = 3, the point itself excluded). Precision
is the fraction of samples inside the reference manifold; recall the fraction of reference points
inside the sample manifold. As in ADM's `ManifoldEstimator` / `DistanceBlock`, distances are squared
Euclidean distances |u|^2 - 2 u.v + |v|^2 clamped at 0, and a point is inside when its distance is
<= some radius.

Distances are computed block by block (jitted, so they run on an accelerator when there is one), so
memory stays O(row_block * col_block) for any number of points. ADM first tries float16 distances and
falls back to float32 when those overflow; here they are always float32 at full matmul precision, so
results can differ from ADM's only for points within float16 rounding of a ball's boundary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.eval.samples_io import EvalError

DEFAULT_K = 3
ROW_BLOCK = 1024
COL_BLOCK = 8192


def _squared_distances(u_RD: jax.Array, v_CD: jax.Array) -> jax.Array:
    norm_u = jnp.sum(u_RD * u_RD, axis=1)[:, None]
    norm_v = jnp.sum(v_CD * v_CD, axis=1)[None, :]
    cross = jnp.matmul(u_RD, v_CD.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(norm_u - 2 * cross + norm_v, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _merge_smallest(best_RK: jax.Array, u_RD: jax.Array, v_CD: jax.Array, valid_C: jax.Array, k: int):
    """The k + 1 smallest squared distances per row among `best_RK` and this column block."""
    dist_RC = jnp.where(valid_C[None, :], _squared_distances(u_RD, v_CD), jnp.inf)
    merged = jnp.concatenate([best_RK, dist_RC], axis=1)
    return -jax.lax.top_k(-merged, k + 1)[0]


@jax.jit
def _inside(u_RD, radii_u_R, v_CD, radii_v_C):
    """(u inside v's manifold [R], v inside u's manifold [C]) within this block."""
    dist_RC = _squared_distances(u_RD, v_CD)
    return jnp.any(dist_RC <= radii_v_C[None, :], axis=1), jnp.any(dist_RC <= radii_u_R[:, None], axis=0)


def _blocks(num: int, size: int) -> tuple[int, list[int]]:
    """Block size (no larger than needed) and block starts covering `num` rows."""
    size = min(size, num)
    return size, list(range(0, num, size))


def _padded(x: np.ndarray, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows start:start+size of x, zero-padded to `size` rows, and the validity mask."""
    block = x[start : start + size]
    valid = np.zeros(size, bool)
    valid[: len(block)] = True
    if len(block) < size:
        block = np.concatenate([block, np.zeros((size - len(block), x.shape[1]), x.dtype)])
    return block, valid


def _check(features: np.ndarray, what: str, k: int) -> np.ndarray:
    features = np.asarray(features, np.float32)
    if features.ndim != 2:
        raise EvalError(f"{what} must be a 2-D array [num_samples, dim], got shape {features.shape}")
    if len(features) <= k:
        raise EvalError(
            f"precision/recall with k={k} neighbours needs more than {k} {what}, got {len(features)}; "
            "use more samples"
        )
    if not np.isfinite(features).all():
        raise EvalError(f"{what} contain NaN or infinite values; check the images and the feature extractor")
    return features


def manifold_radii(
    features: np.ndarray, k: int = DEFAULT_K, row_block: int = ROW_BLOCK, col_block: int = COL_BLOCK
) -> np.ndarray:
    """Squared distance [N] of each point to its k-th nearest other point (ADM `manifold_radii`)."""
    features = _check(features, "features", k)
    num = len(features)
    row_size, row_starts = _blocks(num, row_block)
    col_size, col_starts = _blocks(num, col_block)
    cols = [_padded(features, start, col_size) for start in col_starts]
    radii = np.empty(num, np.float32)
    for start in row_starts:
        rows, _ = _padded(features, start, row_size)
        best = jnp.full((row_size, k + 1), jnp.inf, jnp.float32)
        for col, valid in cols:
            best = _merge_smallest(best, rows, col, valid, k)
        # Index 0 is the point itself (distance 0), so index k is the k-th nearest other point.
        radii[start : start + row_size] = np.asarray(best[:, k])[: num - start]
    return radii


def precision_recall(
    ref_features: np.ndarray,
    sample_features: np.ndarray,
    k: int = DEFAULT_K,
    row_block: int = ROW_BLOCK,
    col_block: int = COL_BLOCK,
) -> tuple[float, float]:
    """(precision, recall) of sample features [M, d] against reference features [N, d], as in ADM."""
    ref = _check(ref_features, "reference features", k)
    samples = _check(sample_features, "sample features", k)
    if ref.shape[1] != samples.shape[1]:
        raise EvalError(
            f"feature dimensions differ: {ref.shape[1]} (reference) vs {samples.shape[1]} (samples); "
            "both must come from the same feature extractor"
        )
    ref_radii = manifold_radii(ref, k, row_block, col_block)
    sample_radii = manifold_radii(samples, k, row_block, col_block)
    ref_size, ref_starts = _blocks(len(ref), row_block)
    sample_size, sample_starts = _blocks(len(samples), col_block)
    ref_inside = np.zeros(len(ref), bool)  # reference point inside the sample manifold -> recall
    sample_inside = np.zeros(len(samples), bool)  # sample inside the reference manifold -> precision
    # Padding rows get radius -inf: they contain nothing; whatever they "are inside" is dropped.
    sample_blocks = []
    for start in sample_starts:
        block, valid = _padded(samples, start, sample_size)
        sample_blocks.append((start, block, _padded_radii(sample_radii, start, valid)))
    for ref_start in ref_starts:
        ref_block, ref_valid = _padded(ref, ref_start, ref_size)
        ref_block_radii = _padded_radii(ref_radii, ref_start, ref_valid)
        count = int(ref_valid.sum())
        for start, block, radii in sample_blocks:
            ref_in, sample_in = _inside(ref_block, ref_block_radii, block, radii)
            ref_inside[ref_start : ref_start + count] |= np.asarray(ref_in)[:count]
            stop = min(start + sample_size, len(samples))
            sample_inside[start:stop] |= np.asarray(sample_in)[: stop - start]
    return float(sample_inside.mean()), float(ref_inside.mean())


def _padded_radii(radii: np.ndarray, start: int, valid: np.ndarray) -> np.ndarray:
    """radii[start:...] for the valid rows of a block, -inf (a ball containing nothing) for padding."""
    out = np.full(len(valid), -np.inf, np.float32)
    count = int(valid.sum())
    out[:count] = radii[start : start + count]
    return out
