"""SiT, REPA and LightningDiT checkpoints -> dit_jax DiT params, and model configs inferred from weights.

All three descend from the official DiT code and keep its key names (layout: interop.dit_official):

  SiT (willisma/SiT, SiT-XL-2-256x256.pt)        DiT's architecture, learn_sigma=True (its sampler
                                                  drops the sigma half; our model returns it).
  REPA (sihyun-yu/REPA, models/sit.py)            SiT without learned sigma, optional timm qk-norm
                                                  (affine LayerNorm, eps 1e-5), plus `projectors.0`:
                                                  Linear-SiLU-Linear-SiLU-Linear of the hidden states
                                                  after `encoder_depth` blocks (our repa_depth).
  LightningDiT (hustvl/LightningDiT)              SwiGLU MLP (w12, w3), RMSNorm with scale (eps 1e-6)
                                                  for the block and final norms (and qk-norm), 2-D
                                                  RoPE (buffers feat_rope.freqs_cos/sin), usually
                                                  patch 1 on 32-channel VA-VAE latents, no learned sigma.

Every family has the null class for classifier-free guidance and the fixed sin-cos `pos_embed`.
Timestep conventions differ and live in the Objective (time_scale / time_direction), not here: all
three feed the network a time in [0, 1]; SiT and LightningDiT (which uses SiT's transport code)
count it from noise (1 = data, predicting data - noise), REPA from data (0 = data, predicting
noise - data). See dit_jax/interop/convert.py for the settings each family gets.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dit_jax import config as config_lib
from dit_jax.interop.dit_official import convert_dit_family, strip_wrapper_prefix
from dit_jax.interop.torch_checkpoint import CheckpointFormatError, read_torch_checkpoint

FAMILIES = ("dit", "sit", "repa", "lightningdit")
FAMILY_NAMES = {"dit": "official DiT", "sit": "SiT", "repa": "REPA SiT", "lightningdit": "LightningDiT"}
# (depth, hidden_size) -> num_heads: DiT's table plus LightningDiT's larger models (1p0B, 1p6B).
HEADS_BY_SIZE = {(depth, hidden): heads for depth, hidden, heads in config_lib.DIT_VARIANTS.values()} | {
    (24, 1536): 24,
    (28, 1792): 28,
}
REPA_DEFAULT_DEPTH = 8  # REPA's --encoder-depth default, used by its released SiT-XL/2
# Keys that only some families have: key (in block 0 or top level) -> (feature, families allowing it).
_FEATURE_KEYS = {
    "blocks.0.mlp.w12.weight": ("a SwiGLU MLP", ("lightningdit",)),
    "blocks.0.norm1.weight": ("RMSNorm", ("lightningdit",)),
    "feat_rope.freqs_cos": ("RoPE", ("lightningdit",)),
    "blocks.0.attn.q_norm.weight": ("qk-norm", ("repa", "lightningdit")),
    "projectors.0.0.weight": ("a REPA projector", ("repa",)),
}


def convert_sit(state_dict: Mapping[str, Any], cfg: config_lib.Model) -> dict:
    """SiT state dict -> our params pure dict (numpy float32); errors name the offending keys."""
    return convert_dit_family(state_dict, cfg, FAMILY_NAMES["sit"])


def convert_repa(state_dict: Mapping[str, Any], cfg: config_lib.Model) -> dict:
    """REPA SiT state dict (projector included when cfg.repa_depth > 0) -> our params pure dict."""
    return convert_dit_family(state_dict, cfg, FAMILY_NAMES["repa"])


def convert_lightningdit(state_dict: Mapping[str, Any], cfg: config_lib.Model) -> dict:
    """LightningDiT state dict -> our params pure dict (numpy float32); errors name the offending keys."""
    return convert_dit_family(state_dict, cfg, FAMILY_NAMES["lightningdit"])


def load_sit(path: str | os.PathLike, cfg: config_lib.Model) -> dict:
    """Read a SiT `.pt` file (plain, or a {"model", "ema"} training checkpoint: EMA preferred)."""
    return convert_sit(read_torch_checkpoint(path), cfg)


def load_repa(path: str | os.PathLike, cfg: config_lib.Model) -> dict:
    """Read a REPA `.pt` file (plain, or a {"model", "ema"} training checkpoint: EMA preferred)."""
    return convert_repa(read_torch_checkpoint(path), cfg)


def load_lightningdit(path: str | os.PathLike, cfg: config_lib.Model) -> dict:
    """Read a LightningDiT `.pt` file (plain, or a {"model", "ema"} training checkpoint: EMA preferred)."""
    return convert_lightningdit(read_torch_checkpoint(path), cfg)


def infer_model_config(
    state_dict: Mapping[str, Any],
    family: str,
    *,
    num_heads: int | None = None,
    repa_depth: int | None = None,
    **overrides: Any,
) -> config_lib.Model:
    """The `config.Model` of a `family` checkpoint ("dit", "sit", "repa", "lightningdit"), from its weights.

    Sizes, patch, channels, classes, learned sigma, image size (from pos_embed), MLP kind and ratio,
    norms, qk-norm, RoPE and the REPA projector widths come from the tensors. The head count comes
    from the RoPE table or qk-norm weights when present, else from the published variants by
    (depth, hidden_size); pass `num_heads` for other sizes. REPA's `encoder_depth` is not stored in
    the weights: `repa_depth` defaults to REPA's 8. `overrides` (e.g. dtype="bfloat16") are
    applied last.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    name = FAMILY_NAMES[family]
    sd = strip_wrapper_prefix(state_dict)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise CheckpointFormatError(
                f"cannot infer the model config: the {name} checkpoint has no {key!r}; "
                f"is it a {name} checkpoint? (keys start with {_first_keys(sd)})"
            )
        return tuple(np.shape(sd[key]))

    _check_family_features(sd, family)
    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    depth = _depth(sd, name)
    tokens = shape("pos_embed")[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointFormatError(f"'pos_embed' has {tokens} tokens, not a square grid of patches")
    out = shape("final_layer.linear.weight")[0]
    if out not in (patch * patch * in_channels, 2 * patch * patch * in_channels):
        raise CheckpointFormatError(
            f"'final_layer.linear.weight' has {out} outputs; expected {patch}x{patch} patches of "
            f"{in_channels} (or {2 * in_channels} with learned sigma) channels"
        )
    swiglu = "blocks.0.mlp.w12.weight" in sd
    mlp_hidden = shape("blocks.0.mlp.w12.weight")[0] // 2 if swiglu else shape("blocks.0.mlp.fc1.weight")[0]
    fields: dict[str, Any] = dict(
        image_size=grid * patch,
        in_channels=in_channels,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=_num_heads(sd, name, depth, hidden, num_heads),
        mlp_ratio=_mlp_ratio(hidden, mlp_hidden, "swiglu" if swiglu else "gelu"),
        num_classes=shape("y_embedder.embedding_table.weight")[0] - 1,
        learn_sigma=out == 2 * patch * patch * in_channels,
        mlp="swiglu" if swiglu else "gelu",
        norm="rmsnorm" if "blocks.0.norm1.weight" in sd else "layernorm",
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        rope="feat_rope.freqs_cos" in sd,
    )
    if "projectors.0.0.weight" in sd:
        if repa_depth is None and depth < REPA_DEFAULT_DEPTH:
            raise CheckpointFormatError(
                f"REPA's encoder_depth is not stored in the weights, and its default {REPA_DEFAULT_DEPTH} "
                f"exceeds this model's depth {depth}: pass repa_depth"
            )
        fields.update(
            repa_depth=REPA_DEFAULT_DEPTH if repa_depth is None else repa_depth,
            repa_projector_dim=shape("projectors.0.0.weight")[0],
            repa_feature_dim=shape("projectors.0.4.weight")[0],
        )
    elif repa_depth:
        raise CheckpointFormatError(
            f"repa_depth={repa_depth} given, but the {name} checkpoint has no projector"
        )
    return config_lib.Model(**{**fields, **overrides})


def _first_keys(sd: Mapping[str, Any]) -> str:
    keys = sorted(sd)[:4]
    return ", ".join(keys) + (", ..." if len(sd) > 4 else "") if keys else "(none: it is empty)"


def _check_family_features(sd: Mapping[str, Any], family: str) -> None:
    for key, (feature, families) in _FEATURE_KEYS.items():
        if key in sd and family not in families:
            likely = " or ".join(f"'{f}'" for f in families)
            raise CheckpointFormatError(
                f"the checkpoint has {feature} ({key}), which {FAMILY_NAMES[family]} models do not have; "
                f"is it a {likely} checkpoint?"
            )
    if family == "repa" and "projectors.0.0.weight" not in sd:
        raise CheckpointFormatError(
            "the REPA SiT checkpoint has no projector (projectors.0.*); without it, load it as family 'sit'"
        )


def _depth(sd: Mapping[str, Any], name: str) -> int:
    indices = {int(m.group(1)) for key in sd if (m := re.match(r"blocks\.(\d+)\.", key))}
    if not indices or indices != set(range(max(indices) + 1)):
        raise CheckpointFormatError(
            f"the {name} checkpoint's blocks are not numbered 0..N-1 (found {sorted(indices)[:8]})"
        )
    return max(indices) + 1


def _num_heads(sd: Mapping[str, Any], name: str, depth: int, hidden: int, given: int | None) -> int:
    head_dims = [
        np.shape(sd[k])[-1] for k in ("feat_rope.freqs_cos", "blocks.0.attn.q_norm.weight") if k in sd
    ]
    from_weights = {hidden // k for k in head_dims if k and hidden % k == 0}
    if len(from_weights) > 1:
        raise CheckpointFormatError(
            f"the {name} checkpoint's RoPE table and qk-norm disagree on the head size"
        )
    if given is not None:
        if from_weights and given not in from_weights:
            raise CheckpointFormatError(
                f"num_heads={given}, but the {name} checkpoint's weights imply {from_weights.pop()} heads"
            )
        return given
    if from_weights:
        return from_weights.pop()
    if (depth, hidden) not in HEADS_BY_SIZE:
        known = ", ".join(f"depth {d} x width {h}" for d, h in HEADS_BY_SIZE)
        raise CheckpointFormatError(
            f"the {name} checkpoint (depth {depth}, hidden size {hidden}) is not a published variant "
            f"({known}), and its weights do not determine the head count: pass num_heads"
        )
    return HEADS_BY_SIZE[(depth, hidden)]


def _mlp_ratio(hidden: int, mlp_hidden: int, mlp: str) -> float:
    """An mlp_ratio for which config.Model computes exactly this MLP width (4.0 when it fits)."""
    base = math.ceil(mlp_hidden * 1.5) if mlp == "swiglu" else mlp_hidden
    for ratio in (4.0, *(m / hidden for m in range(max(base - 2, 1), base + 3))):
        model = config_lib.Model(hidden_size=hidden, num_heads=1, mlp=mlp, mlp_ratio=ratio)
        if model.mlp_hidden_size == mlp_hidden:
            return ratio
    raise CheckpointFormatError(
        f"no mlp_ratio gives a {mlp} MLP of width {mlp_hidden} at hidden size {hidden}"
    )
