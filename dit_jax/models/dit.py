"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"), in Flax NNX.

Images are NHWC. `DiT(x_BHWC, t_B, y_B)` returns [B, H, W, C_out] with C_out = 2C when the model
learns sigma. Initialisation follows the reference: Xavier-uniform linears (the patch bias keeps
PyTorch's default uniform), N(0, 0.02) embeddings and timestep MLP, zero-initialised adaLN
modulations and final projection (adaLN-Zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.models.attention import SelfAttention
from dit_jax.models.layers import (
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    cpu_fusion_barrier,
    dense,
    layer_norm,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
    zeros,
)
from dit_jax.parallel.rules import constrain

ACT_BLD = ("act_batch", "act_seq", "act_embed")


def dtype_of(name: str):
    return jnp.dtype(name)


class DiTBlock(nnx.Module):
    """adaLN-Zero transformer block: modulated attention and MLP, each with a learned gate."""

    def __init__(self, cfg: config_lib.Model, attention_impl: str, attention_mask=None, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        d = cfg.hidden_size
        self.attn = SelfAttention(d, cfg.num_heads, impl=attention_impl, mask=attention_mask, **kw)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), **kw)
        self.adaln = dense(d, 6 * d, ("embed", "adaln"), kernel_init=zeros, **kw)
        self.mlp_norm_eps = cfg.mlp_norm_eps

    def __call__(self, x_BLD: jax.Array, c_BD: jax.Array) -> jax.Array:
        mod = self.adaln(jax.nn.silu(c_BD))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = self.attn(modulate(layer_norm(x_BLD), shift_msa, scale_msa))
        x_BLD = x_BLD + gate_msa[:, None, :] * h
        h = self.mlp(modulate(layer_norm(x_BLD, self.mlp_norm_eps), shift_mlp, scale_mlp))
        x_BLD = x_BLD + gate_mlp[:, None, :] * h
        return cpu_fusion_barrier(constrain(x_BLD, ACT_BLD))


class FinalLayer(nnx.Module):
    def __init__(self, cfg: config_lib.Model, *, rngs: nnx.Rngs):
        kw = dict(
            rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), kernel_init=zeros
        )
        d, p = cfg.hidden_size, cfg.patch_size
        self.adaln = dense(d, 2 * d, ("embed", "adaln"), **kw)
        self.proj = dense(d, p * p * cfg.out_channels, ("embed", "patch"), **kw)

    def __call__(self, x_BLD: jax.Array, c_BD: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaln(jax.nn.silu(c_BD)), 2, axis=-1)
        return self.proj(modulate(layer_norm(x_BLD), shift, scale))


def _apply_block(block: DiTBlock, x_BLD: jax.Array, c_BD: jax.Array) -> jax.Array:
    return block(x_BLD, c_BD)


class DiT(nnx.Module):
    def __init__(
        self, cfg: config_lib.Model, attention_impl: str = "auto", attention_mask=None, *, rngs: nnx.Rngs
    ):
        """`attention_mask`: a pallas_kernels.masks.Mask over the patch tokens (None = full)."""
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        d = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, d, **kw)
        self.t_embedder = TimestepEmbedder(d, freq_shift=cfg.timestep_freq_shift, **kw)
        self.y_embedder = (
            LabelEmbedder(cfg.num_classes, d, cfg.class_dropout, rngs=rngs, param_dtype=kw["param_dtype"])
            if cfg.num_classes
            else None
        )
        self.blocks = nnx.List(
            [DiTBlock(cfg, attention_impl, attention_mask, rngs=rngs) for _ in range(cfg.depth)]
        )
        self.final = FinalLayer(cfg, rngs=rngs)

    def __call__(
        self,
        x_BHWC: jax.Array,
        t_B: jax.Array,
        y_B: jax.Array | None = None,
        *,
        drop_key: jax.Array | None = None,
    ) -> jax.Array:
        """`t_B` is what the timestep embedder sees (see Objective.model_time); `drop_key` enables
        label dropout for classifier-free guidance training."""
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        grid = cfg.image_size // cfg.patch_size
        # Fixed positions: a trace-time constant, not a parameter.
        pos_LD = jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, grid), dtype)
        x = constrain(self.patch_embed(x_BHWC.astype(dtype)) + pos_LD, ACT_BLD)
        c = self.t_embedder(t_B)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y_B, drop_key).astype(c.dtype)
        for block in self.blocks:
            x = nnx.remat(_apply_block)(block, x, c) if cfg.remat else block(x, c)
        x = self.final(x, c)
        return unpatchify(x, cfg.patch_size, cfg.out_channels, grid)
