"""Dense XLA attention: the reference every other implementation is tested against.

f32 scores at HIGHEST precision, the mask applied densely, softmax, f32 weighted sum. A query row
that sees no key outputs 0, has LSE = -inf and receives zero gradient. Plain autodiff (no custom
rule): the reference must be obviously right, not fast. Memory is O(seq^2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import masks as masks_lib


def group_heads(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, L, H, D] -> [B, L, Hkv, G, D] (query head h uses KV head h // G)."""
    b, length, h, d = q.shape
    return q.reshape(b, length, num_kv_heads, h // num_kv_heads, d)


def visible(mask: masks_lib.Mask, q_ids, kv_ids, seq_q: int, seq_kv: int) -> jax.Array:
    """Dense visibility [B or 1, Lq, Lk] from a static mask and optional segment ids."""
    vis = jnp.asarray(masks_lib.dense_mask(mask, seq_q, seq_kv))[None]
    if q_ids is not None:
        vis = vis & (q_ids[:, :, None] == kv_ids[:, None, :])
    return vis


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: masks_lib.Mask | None = None,
    q_ids: jax.Array | None = None,
    kv_ids: jax.Array | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Returns (out [B, Lq, H, D] in q.dtype, lse [B, H, Lq] f32); k, v may have fewer heads (GQA)."""
    batch, seq_q, heads, dim = q.shape
    seq_kv, kv_heads = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    hi = jax.lax.Precision.HIGHEST
    qg = group_heads(q, kv_heads).astype(jnp.float32)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32), precision=hi) * scale
    vis = visible(mask or masks_lib.Full(), q_ids, kv_ids, seq_q, seq_kv)[:, None, None]
    s_masked = jnp.where(vis, s, -jnp.inf)
    m = jax.lax.stop_gradient(s_masked.max(-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s_masked - m)
    denom = e.sum(-1, keepdims=True)
    p = e / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=hi)
    lse = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)[..., 0]
    out = out.reshape(batch, seq_q, heads, v.shape[-1]).astype(q.dtype)
    return out, lse.reshape(batch, heads, seq_q)
