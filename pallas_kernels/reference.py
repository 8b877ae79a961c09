"""Dense XLA attention: the reference every other implementation is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q, k, v, *, scale=None):
    """Returns (out [B, Lq, H, D] in q.dtype, lse [B, H, Lq] f32)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), lse
