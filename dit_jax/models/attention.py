"""Multi-head self-attention: fused QKV projection, kernel from `pallas_kernels.attention`."""

from __future__ import annotations

import jax
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
        b, length, d = x_BLD.shape
        w_qkv = self.w_qkv[...].astype(dtype)
        w_out = self.w_out[...].astype(dtype)
        # Both projections as 2-D matmuls over the flattened tokens (the parameters are only viewed
        # as [D, 3D] and [D, D]): the same math as the per-head einsums, but XLA:CPU then computes
        # the weight gradients without transposed copies (see layers.Dense).
        qkv = x_BLD.astype(dtype).reshape(b * length, d) @ w_qkv.reshape(d, -1)
        qkv_BL3HK = qkv.reshape(b, length, *w_qkv.shape[1:]) + self.b_qkv[...].astype(dtype)
        qkv_BL3HK = constrain(qkv_BL3HK, ("act_batch", "act_seq", None, "act_heads", None))
        q, k, v = (qkv_BL3HK[:, :, i] for i in range(3))
        out_BLHK = pallas_kernels.attention(q, k, v, mask=self.mask, implementation=self.impl)
        out = out_BLHK.reshape(b * length, -1) @ w_out.reshape(-1, w_out.shape[-1])
        return out.reshape(b, length, -1) + self.b_out[...].astype(dtype)
