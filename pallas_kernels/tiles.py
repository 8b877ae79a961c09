"""Per-tile math shared by the GPU and TPU kernels (traced inside `pallas_call` bodies).

Logits are pre-scaled by log2(e) so the kernels use exp2; masked logits take a large finite
negative value (never -inf) and their probabilities are zeroed explicitly, so a row that sees no
key ends with l = 0, output 0 and LSE = -inf. Row statistics are [bq] on GPU and [bq, 1] on TPU.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.masks import Mask

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
TRANS_B = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class TileMask:
    """What a kernel needs to evaluate visibility inside a PARTIAL tile."""

    mask: Mask
    use_mask_fn: bool  # False when partial tiles come only from key padding
    seq_kv: int
    kv_padded: bool


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T in f32."""
    return jax.lax.dot_general(a, b, TRANS_B, preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a.T @ b in f32."""
    return jax.lax.dot(a.T, b, preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b in f32."""
    return jax.lax.dot(a, b, preferred_element_type=jnp.float32)


def visible(tm: TileMask, q_pos, kv_pos, q_seg, kv_seg, masked: bool):
    """Visibility of a tile ([bq, 1] and [1, bk] positions / segment ids), or None if all visible."""
    vis = None

    def conj(a, b):
        return b if a is None else a & b

    if masked and tm.use_mask_fn:
        vis = conj(vis, tm.mask.mask_fn(q_pos, kv_pos))
    if masked and tm.kv_padded:
        vis = conj(vis, kv_pos < tm.seq_kv)
    if q_seg is not None:
        vis = conj(vis, q_seg == kv_seg)
    if vis is not None:
        vis = jnp.broadcast_to(vis, (q_pos.shape[0], kv_pos.shape[1]))
    return vis


def _rows(x: jax.Array, keepdims: bool) -> jax.Array:
    """Row statistics as a column that broadcasts against a [bq, n] tile."""
    return x if keepdims else x[:, None]


def online_update(s, vis, v, m, l_sum, acc, keepdims: bool):
    """One online-softmax step on log2-scaled logits s [bq, bk]; returns the new (m, l, acc)."""
    if vis is not None:
        s = jnp.where(vis, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=keepdims))
    p = jnp.exp2(s - _rows(m_new, keepdims))
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    alpha = jnp.exp2(m - m_new)
    l_new = alpha * l_sum + p.sum(axis=1, keepdims=keepdims)
    acc = _rows(alpha, keepdims) * acc + dot_nn(p.astype(v.dtype), v)
    return m_new, l_new, acc


def finalize(m, l_sum, acc, keepdims: bool):
    """Output tile (f32) and natural-log LSE from the online-softmax state."""
    safe = jnp.where(l_sum > 0, l_sum, 1.0)
    out = acc / _rows(safe, keepdims)
    lse = jnp.where(l_sum > 0, (m + jnp.log2(safe)) * LN2, -jnp.inf)
    return out, lse


def probs(s, lse2, vis, keepdims: bool):
    """Recomputed probabilities from log2-scaled logits and the log2 LSE of each row."""
    p = jnp.exp2(s - _rows(lse2, keepdims))
    return p if vis is None else jnp.where(vis, p, 0.0)


def init_state(block_q: int, head_dim: int, keepdims: bool):
    """Initial (m, l, acc) of the online softmax."""
    shape = (block_q, 1) if keepdims else (block_q,)
    return (
        jnp.full(shape, MASK_VALUE, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((block_q, head_dim), jnp.float32),
    )
