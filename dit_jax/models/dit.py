"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") and its descendants, in Flax NNX.

One backbone, configured by `config.Model`:
  DiT / SiT      the defaults (SiT has DiT's architecture; only the objective differs);
  REPA           + a projector of the hidden states after `repa_depth` blocks (`forward_with_features`),
                   optionally qk_norm;
  LightningDiT   mlp="swiglu", norm="rmsnorm", rope=True (and optionally qk_norm), usually patch 1.

Images are NHWC. `DiT(x_BHWC, t_B, y_B)` returns [B, H, W, C_out] with C_out = 2C when the model
learns sigma (SiT and LightningDiT drop the second half when sampling; we return all of it).
Initialisation follows the reference: Xavier-uniform linears (the patch bias keeps PyTorch's default
uniform), N(0, 0.02) embeddings and timestep MLP, zero-initialised adaLN modulations and final
projection (adaLN-Zero), norm scales 1. model.parametrization="mup" rescales a few of these inits,
multiplies the readouts' inputs and scales the attention logits as models.mup describes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.models import mup
from dit_jax.models.attention import SelfAttention
from dit_jax.models.layers import (
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    Projector,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    cpu_fusion_barrier,
    dense,
    layer_norm,
    modulate,
    rope_2d_tables,
    sincos_pos_embed_2d,
    unpatchify,
    zeros,
)
from dit_jax.models.moe import EXPERT_MATMULS, MoE
from dit_jax.parallel.rules import constrain
from pallas_kernels import residuals

ACT_BLD = ("act_batch", "act_seq", "act_embed")
Rope = tuple[jax.Array, jax.Array] | None
Aux = dict[str, jax.Array]


def dtype_of(name: str):
    return jnp.dtype(name)


def _rms_norm_or_none(cfg: config_lib.Model) -> RMSNorm | None:
    """The learned-scale RMSNorm of norm="rmsnorm"; None for DiT's parameter-free LayerNorm."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, param_dtype=dtype_of(cfg.param_dtype))
    return None


class DiTBlock(nnx.Module):
    """adaLN-Zero transformer block: modulated attention and MLP, each with a learned gate."""

    def __init__(
        self,
        cfg: config_lib.Model,
        attention_impl: str,
        attention_mask=None,
        *,
        context_impl: str = "ring",
        moe: bool = False,
        rngs: nnx.Rngs,
    ):
        """`moe`: the MLP is a mixture of experts (models.moe, sized by cfg.num_experts etc.)."""
        kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        d = cfg.hidden_size
        qk_norm = cfg.norm if cfg.qk_norm else None
        self.attn = SelfAttention(
            d, cfg.num_heads, impl=attention_impl, mask=attention_mask, qk_norm=qk_norm,
            context_impl=context_impl, scale=mup.attention_scale(cfg), **kw,
        )  # fmt: skip
        if moe:
            self.mlp = MoE(
                d, cfg.mlp_hidden_size, num_experts=cfg.num_experts, experts_per_token=cfg.experts_per_token,
                shared_experts=cfg.shared_experts, capacity_factor=cfg.moe_capacity, mlp=cfg.mlp,
                router_mult=mup.output_multiplier(cfg), **kw,
            )  # fmt: skip
        else:
            self.mlp = (SwiGLU if cfg.mlp == "swiglu" else Mlp)(d, cfg.mlp_hidden_size, **kw)
        self.moe = moe
        self.adaln = dense(d, 6 * d, ("embed", "adaln"), kernel_init=zeros, **kw)
        self.norm1 = _rms_norm_or_none(cfg)
        self.norm2 = _rms_norm_or_none(cfg)
        self.mlp_norm_eps = cfg.mlp_norm_eps

    def __call__(self, x_BLD: jax.Array, c_BD: jax.Array, rope_LK: Rope = None) -> tuple[jax.Array, Aux]:
        """(output, aux): aux holds the MoE layer's statistics (models.moe), empty for a dense MLP."""
        mod = self.adaln(jax.nn.silu(c_BD))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = self.norm1(x_BLD) if self.norm1 is not None else layer_norm(x_BLD)
        h = self.attn(modulate(h, shift_msa, scale_msa), rope_LK)
        x_BLD = x_BLD + gate_msa[:, None, :] * h
        h = self.norm2(x_BLD) if self.norm2 is not None else layer_norm(x_BLD, self.mlp_norm_eps)
        h, aux = self.mlp(modulate(h, shift_mlp, scale_mlp)) if self.moe else (
            self.mlp(modulate(h, shift_mlp, scale_mlp)), {})  # fmt: skip
        x_BLD = x_BLD + gate_mlp[:, None, :] * h
        return cpu_fusion_barrier(constrain(x_BLD, ACT_BLD)), aux


class FinalLayer(nnx.Module):
    def __init__(self, cfg: config_lib.Model, *, rngs: nnx.Rngs):
        kw = dict(
            rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), kernel_init=zeros
        )
        d, p = cfg.hidden_size, cfg.patch_size
        self.adaln = dense(d, 2 * d, ("embed", "adaln"), **kw)
        self.proj = dense(d, p * p * cfg.out_channels, ("embed", "patch"), **kw)
        self.norm = _rms_norm_or_none(cfg)
        self.output_mult = mup.output_multiplier(cfg)  # μP's readout multiplier (None under SP)

    def __call__(self, x_BLD: jax.Array, c_BD: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaln(jax.nn.silu(c_BD)), 2, axis=-1)
        h = self.norm(x_BLD) if self.norm is not None else layer_norm(x_BLD)
        h = modulate(h, shift, scale)
        return self.proj(h if self.output_mult is None else h * self.output_mult)


# Outputs that are matmuls in all but primitive: the experts' grouped matmuls and the attention
# kernels' output and LSE (O(seq), pallas_kernels.residuals). Named so that the policies below keep
# them with the dot_general outputs; without the names the backward pass would run them again.
NAMED_MATMULS = (*EXPERT_MATMULS, *residuals.NAMES)


def _offload_matmuls(src: str, dst: str):
    """A policy moving dot_general outputs and NAMED_MATMULS from `src` to `dst` memory."""
    dots = jax.checkpoint_policies.offload_dot_with_no_batch_dims(src, dst)
    named = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=NAMED_MATMULS,
        offload_src=src,
        offload_dst=dst,
    )

    def policy(prim, *args, **params):
        is_named = prim.name == "name" and params.get("name") in NAMED_MATMULS  # a checkpoint_name
        return (named if is_named else dots)(prim, *args, **params)

    return policy


# model.remat -> what jax.checkpoint keeps of a block's forward for the backward pass.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*NAMED_MATMULS),
    ),
    "offload": _offload_matmuls("device", "pinned_host"),
}


def _apply_block(block: DiTBlock, x_BLD: jax.Array, c_BD: jax.Array, rope_LK: Rope) -> tuple[jax.Array, Aux]:
    return block(x_BLD, c_BD, rope_LK)


def _mean_over_blocks(spans: list[Aux]) -> Aux:
    """The MoE statistics of block spans (each leaf with a leading block axis), averaged over blocks."""
    spans = [a for a in spans if a]
    if not spans:
        return {}
    return jax.tree.map(lambda *xs: jnp.mean(jnp.concatenate(xs), axis=0), *spans)


def _remat(fn, policy: str):
    return fn if policy == "none" else jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


def _stack_blocks(blocks: list[DiTBlock], period: int) -> nnx.List:
    """Block modules whose parameters are those of `blocks` stacked, as models.layout.STACKED: entry
    j holds blocks j, j + period, ... with a leading "layers" axis. Built from the per-block modules,
    so a scanned model initialises exactly as the unscanned one of the same seed."""
    groups = []
    for j in range(period):
        members = [nnx.split(b) for b in blocks[j::period]]
        graphdef = members[0][0]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in members])
        for var in jax.tree.leaves(stacked, is_leaf=lambda v: isinstance(v, nnx.Variable)):
            var.set_metadata(logical_axes=("layers", *var.get_metadata()["logical_axes"]))
        groups.append(nnx.merge(graphdef, stacked))
    return nnx.List(groups)


class DiT(nnx.Module):
    def __init__(
        self,
        cfg: config_lib.Model,
        attention_impl: str = "auto",
        attention_mask=None,
        *,
        context_impl: str = "ring",
        rngs: nnx.Rngs,
    ):
        """`attention_mask`: a pallas_kernels.masks.Mask over the patch tokens (None = full).
        `context_impl`: how attention splits the sequence over a `context` mesh axis ("ring" or
        "all_to_all"; see pallas_kernels.context_attention)."""
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
        blocks = [
            DiTBlock(
                cfg,
                attention_impl,
                attention_mask,
                context_impl=context_impl,
                moe=cfg.is_moe_block(i),
                rngs=rngs,
            )
            for i in range(cfg.depth)
        ]
        # One layout or the other (see models.layout): per-block modules, or stacked and scanned.
        if cfg.scanned:
            self.block_stack = _stack_blocks(blocks, cfg.block_period)
        else:
            self.blocks = nnx.List(blocks)
        self.final = FinalLayer(cfg, rngs=rngs)
        self.projector = (
            Projector(
                d, cfg.repa_projector_dim, cfg.repa_feature_dim, input_mult=mup.output_multiplier(cfg), **kw
            )
            if cfg.repa_depth
            else None
        )
        if mup.enabled(cfg):
            mup.rescale_init(self, cfg)

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
        return self._forward(x_BHWC, t_B, y_B, drop_key, with_features=False)[0]

    def forward_with_aux(
        self,
        x_BHWC: jax.Array,
        t_B: jax.Array,
        y_B: jax.Array | None = None,
        *,
        drop_key: jax.Array | None = None,
        with_features: bool = False,
    ) -> tuple[jax.Array, jax.Array | None, Aux]:
        """(output, REPA features or None, aux): aux averages the MoE blocks' statistics
        (balance_loss, z_loss, expert_load [E], dropped_fraction; see models.moe), {} when dense."""
        return self._forward(x_BHWC, t_B, y_B, drop_key, with_features=with_features)

    def forward_with_features(
        self,
        x_BHWC: jax.Array,
        t_B: jax.Array,
        y_B: jax.Array | None = None,
        *,
        drop_key: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(output as `__call__`, REPA features z [B, L, repa_feature_dim]): the projector applied to
        the hidden states after `repa_depth` blocks, for REPA's alignment loss."""
        return self._forward(x_BHWC, t_B, y_B, drop_key, with_features=True)[:2]

    def _forward(
        self,
        x_BHWC: jax.Array,
        t_B: jax.Array,
        y_B: jax.Array | None,
        drop_key: jax.Array | None,
        *,
        with_features: bool,
    ) -> tuple[jax.Array, jax.Array | None, Aux]:
        if with_features and self.projector is None:
            raise ValueError(
                "forward_with_features needs a REPA projector: set model.repa_depth > 0 "
                "(the number of blocks whose output is projected)"
            )
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        grid = cfg.image_size // cfg.patch_size
        # Fixed positions (and RoPE tables): trace-time constants, not parameters.
        pos_LD = jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, grid), dtype)
        rope_LK = None
        if cfg.rope:
            rope_LK = tuple(jnp.asarray(a) for a in rope_2d_tables(cfg.hidden_size // cfg.num_heads, grid))
        x = constrain(self.patch_embed(x_BHWC.astype(dtype)) + pos_LD, ACT_BLD)
        c = self.t_embedder(t_B)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y_B, drop_key).astype(c.dtype)
        # REPA projects the hidden states after repa_depth blocks: run the blocks in two spans.
        split = cfg.repa_depth if with_features else cfg.depth
        x, aux_head = self._run_blocks(x, c, rope_LK, 0, split)
        z_BLZ = self.projector(x) if with_features else None
        x, aux_tail = self._run_blocks(x, c, rope_LK, split, cfg.depth)
        x = self.final(x, c)
        aux = _mean_over_blocks([aux_head, aux_tail])
        return unpatchify(x, cfg.patch_size, cfg.out_channels, grid), z_BLZ, aux

    def _run_blocks(
        self, x_BLD: jax.Array, c_BD: jax.Array, rope_LK: Rope, start: int, stop: int
    ) -> tuple[jax.Array, Aux]:
        """Blocks [start, stop): one after the other, or as a lax.scan over the stacked groups.
        Returns the output and the MoE blocks' statistics, each with a leading block axis."""
        if start == stop:
            return x_BLD, {}
        policy = self.cfg.remat_policy
        if not self.cfg.scanned:
            block = (
                _apply_block if policy == "none" else nnx.remat(_apply_block, policy=REMAT_POLICIES[policy])
            )
            auxes = []
            for i in range(start, stop):
                x_BLD, aux = block(self.blocks[i], x_BLD, c_BD, rope_LK)
                auxes.append(aux)
            auxes = [a for a in auxes if a]
            return x_BLD, jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes else {}
        period = self.cfg.block_period
        graphdefs, states = zip(*(nnx.split(group) for group in self.block_stack), strict=True)
        span = jax.tree.map(lambda a: a[start // period : stop // period], list(states))

        def group_step(x, group_states):
            auxes = []
            for graphdef, state in zip(graphdefs, group_states, strict=True):
                x, aux = nnx.merge(graphdef, state)(x, c_BD, rope_LK)
                auxes.append(aux)
            return x, [a for a in auxes if a]  # at most one MoE block per group

        x_BLD, auxes = jax.lax.scan(_remat(group_step, policy), x_BLD, span)
        return x_BLD, auxes[0] if auxes else {}
