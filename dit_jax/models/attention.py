"""Multi-head self-attention: fused QKV projection, optional qk-norm and 2-D RoPE, kernel from
`pallas_kernels.attention`, run under `shard_map` on a mesh."""

from __future__ import annotations

import jax
from flax import nnx

import pallas_kernels
from dit_jax.models.layers import AffineLayerNorm, RMSNorm, apply_rope, xavier_uniform, zeros
from dit_jax.parallel.rules import ACTIVATION_RULES, constrain, spec_for

QK_NORMS = (None, "layernorm", "rmsnorm")


class SelfAttention(nnx.Module):
    """q, k, v = x W_qkv + b; q, k normalised per head (qk_norm) and rotated (rope); softmax(q k^T /
    sqrt(d)) v; out W_o + b_o. `scale` replaces 1/sqrt(d) on the logits (μP: models.mup).

    W_qkv is stored as [embed, 3, heads, head_dim] so that heads can be sharded over `tensor`.
    qk_norm: None, "layernorm" (affine, eps 1e-5: timm's, as REPA's SiT) or "rmsnorm" (with scale,
    eps 1e-6: LightningDiT's), each over head_dim with parameters shared by all heads.
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        *,
        impl: str,
        mask=None,
        qk_norm: str | None = None,
        context_impl: str = "ring",
        scale: float | None = None,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
    ):
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        head_dim = hidden // num_heads
        self.impl = impl
        self.context_impl = context_impl  # "ring" or "all_to_all" when a mesh splits the sequence
        self.mask = mask  # a static pallas_kernels.masks.Mask, or None for full attention
        self.scale = scale  # logit scale; None = head_dim ** -0.5
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
        norm_cls = {None: None, "layernorm": AffineLayerNorm, "rmsnorm": RMSNorm}[qk_norm]
        norm_kw = dict(axis="head_dim", param_dtype=param_dtype)
        self.q_norm = norm_cls(head_dim, **norm_kw) if norm_cls else None
        self.k_norm = norm_cls(head_dim, **norm_kw) if norm_cls else None

    def __call__(self, x_BLD: jax.Array, rope_LK: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """`rope_LK`: (cos, sin) tables [L, head_dim] (see layers.rope_2d_tables), or None."""
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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope_LK is not None:
            q, k = apply_rope(q, *rope_LK), apply_rope(k, *rope_LK)
        out_BLHK = attend(
            q, k, v, mask=self.mask, implementation=self.impl, context_impl=self.context_impl,
            scale=self.scale,
        )  # fmt: skip
        out = out_BLHK.reshape(b * length, -1) @ w_out.reshape(-1, w_out.shape[-1])
        return out.reshape(b, length, -1) + self.b_out[...].astype(dtype)


def attend(
    q_BLHK, k_BLHK, v_BLHK, *, mask, implementation: str, context_impl: str = "ring", scale=None
) -> jax.Array:
    """`pallas_kernels.attention`, per device under `jax.shard_map` when a mesh is in context.
    `scale` multiplies the logits (None: head_dim ** -0.5).

    Kernels are custom calls that XLA cannot partition (Mosaic refuses; Triton / cuDNN calls get
    their inputs all-gathered to the full global batch). Attention needs no communication across
    batch or heads, so each device attends over its own slice: batch over the data-parallel axes
    and heads over `tensor` (as the activation rules shard them; a dimension they do not divide
    stays whole). The same holds for the XLA implementations, so every one runs this way. When the
    rules split the sequence over `context` (mesh.context > 1), attention is context-parallel:
    `pallas_kernels.context_attention` with `context_impl` ("ring" or "all_to_all").
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return pallas_kernels.attention(
            q_BLHK, k_BLHK, v_BLHK, mask=mask, scale=scale, implementation=implementation
        )
    shape = dict(mesh.shape)
    batch_axes = spec_for(("act_batch",), q_BLHK.shape[:1], ACTIVATION_RULES, shape)[0]
    head_axes = spec_for(("act_heads",), (k_BLHK.shape[2],), ACTIVATION_RULES, shape)[0]
    if q_BLHK.shape[2] % k_BLHK.shape[2]:
        head_axes = None  # invalid grouping: let attention() report it
    context = spec_for(("act_seq",), q_BLHK.shape[1:2], ACTIVATION_RULES, shape)[0]
    if context is not None:  # the sequence is split over `context`: ring or all-to-all attention
        return pallas_kernels.context_attention(
            q_BLHK, k_BLHK, v_BLHK, mesh=mesh, context_axis=context, batch_axis=batch_axes,
            head_axis=head_axes, mask=mask, scale=scale, implementation=implementation, method=context_impl,
        )  # fmt: skip
    return pallas_kernels.sharded_attention(
        q_BLHK, k_BLHK, v_BLHK, mesh=mesh, batch_axis=batch_axes, head_axis=head_axes, mask=mask,
        scale=scale, implementation=implementation,
    )  # fmt: skip
