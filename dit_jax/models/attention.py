"""Multi-head self-attention: fused QKV projection, kernel from `pallas_kernels.attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from dit_jax.models.layers import xavier_uniform, zeros
from dit_jax.parallel.rules import constrain


class SelfAttention(nnx.Module):
    """q, k, v = x W_qkv + b; softmax(q k^T / sqrt(d)) v; out W_o + b_o.

    W_qkv is stored as [embed, 3, heads, head_dim] so that heads can be sharded over `tensor`.
    """

    def __init__(
        self, hidden: int, num_heads: int, *, impl: str, mask=None, rngs: nnx.Rngs, dtype, param_dtype
    ):
        head_dim = hidden // num_heads
        self.impl = impl
        self.mask = mask  # a static pallas_kernels.masks.Mask, or None for full attention
        self.dtype = dtype
        # Xavier-uniform over the fused [hidden, 3*hidden] matrix, exactly as nn.Linear(hidden, 3*hidden).
        w_qkv = xavier_uniform(rngs.params(), (hidden, 3 * hidden), param_dtype)
        self.w_qkv = nnx.Param(
            w_qkv.reshape(hidden, 3, num_heads, head_dim), logical_axes=("embed", None, "heads", "head_dim")
        )
        self.b_qkv = nnx.Param(
            zeros(rngs.params(), (3, num_heads, head_dim), param_dtype),
            logical_axes=(None, "heads", "head_dim"),
        )
        w_out = xavier_uniform(rngs.params(), (hidden, hidden), param_dtype)
        self.w_out = nnx.Param(
            w_out.reshape(num_heads, head_dim, hidden), logical_axes=("heads", "head_dim", "embed")
        )
        self.b_out = nnx.Param(zeros(rngs.params(), (hidden,), param_dtype), logical_axes=("embed",))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        dtype = self.dtype or x_BLD.dtype
        x = x_BLD.astype(dtype)
        qkv_BL3HK = jnp.einsum("bld,dthk->blthk", x, self.w_qkv[...].astype(dtype))
        qkv_BL3HK = qkv_BL3HK + self.b_qkv[...].astype(dtype)
        qkv_BL3HK = constrain(qkv_BL3HK, ("act_batch", "act_seq", None, "act_heads", None))
        q, k, v = (qkv_BL3HK[:, :, i] for i in range(3))
        out_BLHK = pallas_kernels.attention(q, k, v, mask=self.mask, implementation=self.impl)
        out = jnp.einsum("blhk,hkd->bld", out_BLHK, self.w_out[...].astype(dtype))
        return out + self.b_out[...].astype(dtype)
