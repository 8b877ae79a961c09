"""Chooses an attention implementation."""

from __future__ import annotations

import jax

from pallas_kernels import reference

IMPLEMENTATIONS = ("auto", "xla")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask=None,
    scale: float | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Multi-head attention, layout [batch, seq, heads, head_dim]; returns [batch, seq_q, heads, head_dim]."""
    del interpret
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; expected one of {', '.join(IMPLEMENTATIONS)}"
        )
    if mask is not None:
        raise ValueError("masks are not supported yet; pass mask=None")
    out, _ = reference.attention(q, k, v, scale=scale)
    return out
