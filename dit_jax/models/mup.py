"""μP, the maximal update parametrization (Yang et al., "Tensor Programs V: Tuning Large Neural
Networks via Zero-Shot Hyperparameter Transfer"), for the DiT family, as "Scaling Diffusion
Transformers Efficiently via μP" (Zheng et al. 2025) applies it: DiT's μP is the Transformer's.

`model.parametrization="mup"` parametrises a model relative to its *base model*: the same config at
hidden_size = `model.mup_base_width` (same num_heads, so head_dim grows with width, as in TP5). With
m = hidden_size / mup_base_width (the width multiplier) and AdamW, following the `mup` package
(MuReadout, MuAdamW, mup.init, 1/d attention):

  class (dims that differ     init                            AdamW lr    forward
  from the base model's)
  hidden: two                 the base model's std x m^-1/2   lr / m      -
    (attention, MLP, MoE        (var ~ 1/fan_in: Xavier's
    experts, adaLN, t-MLP fc2)  already, fc2's N(0, 0.02) not)
  vector-like: one            the base model's                lr          -
    (patch / timestep / label   (width-independent)
    embeddings, biases, norms)
  readout: width -> fixed     the base model's                lr          input x 1/m
    (final projection, MoE      (the final layer stays 0)                 (MuReadout)
    router, REPA projector's
    first layer)
  fixed: none                 SP's                            lr          -
  attention logits                                                        q.k d_base^1/2 / d
                                                                          (SP: d^-1/2)

The init column is mup.init's rule: every parameter starts as its counterpart in the base model
would (same std), except hidden weights, whose std shrinks as fan_in^-1/2. `init_rescales` lists the
parameters whose SP init breaks it (Xavier over a width dim of an input or readout layer, a fixed
std on a hidden weight, a fan-in init on a readout) with their factors. A readout keeps the base
model's init and gets 1/m in the forward pass, so its effective weight has var ~ 1/fan_in^2
(MuReadout's rescaling). The REPA projector's widths (repa_projector_dim, repa_feature_dim) do not
scale, so its first layer is the readout and the rest is fixed.

Weight decay follows MuAdamW (lr / m and weight_decay x m): only the Adam direction is scaled, the
decay step lr x weight_decay x param stays as under SP (train.state applies `lr_multipliers` to the
Adam update and adds the decay after them). At hidden_size == mup_base_width everything above is the
identity: μP equals SP there, so learning rates tuned on the base model transfer. Global-norm
clipping (optim.grad_clip) stays global, as in the `mup` package.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx

from dit_jax import config as config_lib

HIDDEN, VECTOR, FIXED = "hidden", "vector", "fixed"


def enabled(cfg: config_lib.Model) -> bool:
    return cfg.parametrization == "mup"


def width_mult(cfg: config_lib.Model) -> float:
    """hidden_size / mup_base_width under μP, 1 under SP."""
    return cfg.hidden_size / cfg.mup_base_width if enabled(cfg) else 1.0


def base_config(cfg: config_lib.Model) -> config_lib.Model:
    """The base model: `cfg` at hidden_size = mup_base_width (μP equals SP there)."""
    return dataclasses.replace(cfg, hidden_size=cfg.mup_base_width)


def attention_scale(cfg: config_lib.Model) -> float | None:
    """The attention logit scale: None (the kernel's 1/sqrt(d)) under SP; sqrt(d_base) / d under
    μP, 1/d up to the constant that makes it 1/sqrt(d) at the base width (the `mup` package's
    8/d for d_base = 64)."""
    if not enabled(cfg):
        return None
    # head_dim^-1/2 (d_base / d)^1/2: exactly the kernel's default head_dim ** -0.5 at the base width.
    head_dim = cfg.hidden_size // cfg.num_heads
    return head_dim**-0.5 * (cfg.mup_base_width / cfg.hidden_size) ** 0.5


def output_multiplier(cfg: config_lib.Model) -> float | None:
    """MuReadout's multiplier base / width on the input of each readout layer; None under SP."""
    return cfg.mup_base_width / cfg.hidden_size if enabled(cfg) else None


def init_rescales(cfg: config_lib.Model) -> dict[tuple[str, ...], float]:
    """Parameter path suffix -> factor on its SP init that gives the μP init (see the module
    docstring); the other parameters' SP inits are μP inits already. All factors are 1 at the base
    width."""
    d, base = cfg.hidden_size, cfg.mup_base_width
    patch_fan_in = cfg.patch_size**2 * cfg.in_channels
    return {
        # Xavier over [patch, D]: an input layer's std must not depend on D.
        ("patch_embed", "proj", "kernel"): math.sqrt((patch_fan_in + d) / (patch_fan_in + base)),
        # N(0, 0.02) on a hidden [D, D] weight: std ~ fan_in^-1/2.
        ("t_embedder", "fc2", "kernel"): math.sqrt(base / d),
        # Readouts keep the base model's init (the forward multiplies their input by base / D):
        # the router's U(+-1/sqrt(D)), the projector's Xavier over [D, repa_projector_dim].
        ("mlp", "router", "kernel"): math.sqrt(d / base),
        ("projector", "fc1", "kernel"): math.sqrt(
            (d + cfg.repa_projector_dim) / (base + cfg.repa_projector_dim)
        ),
    }


def rescale_init(model: nnx.Module, cfg: config_lib.Model) -> None:
    """Turns a freshly initialised SP model into the μP model of `cfg` in place (`init_rescales`);
    either block layout (the suffixes skip the block index)."""
    rescales = init_rescales(cfg)
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Param):
            continue
        names = tuple(p for p in path if isinstance(p, str))
        factor = next((f for suffix, f in rescales.items() if names[-len(suffix) :] == suffix), None)
        if factor is not None and factor != 1.0:
            node[...] = node[...] * factor


def _infinite_dims(shape: tuple[int, ...], base_shape: tuple[int, ...]) -> list[int]:
    if len(shape) != len(base_shape):
        raise ValueError(f"parameter of shape {shape} has base shape {base_shape} of another rank")
    return [i for i, (n, b) in enumerate(zip(shape, base_shape, strict=True)) if n != b]


def param_classes(params: Any, base_params: Any) -> Any:
    """HIDDEN / VECTOR / FIXED per parameter: how many of its dims differ from the base model's
    (2 / 1 / 0), as `mup.set_base_shapes` infers them. `params` and `base_params` are trees of
    arrays or ShapeDtypeStructs of the same structure (either block layout). At the base width
    every parameter is FIXED (compare with a wider model to see the classes)."""
    names = {0: FIXED, 1: VECTOR, 2: HIDDEN}

    def classify(p, b):
        n = len(_infinite_dims(p.shape, b.shape))
        if n > 2:
            raise NotImplementedError(f"parameter of shape {p.shape} has {n} > 2 width dims (base {b.shape})")
        return names[n]

    return jax.tree.map(classify, params, base_params)


def lr_multipliers(params: Any, base_params: Any) -> Any:
    """Per-parameter AdamW learning-rate multipliers (floats, a tree like `params`): base_fan_in /
    fan_in for hidden weights, 1 for everything else. The fan-in multiplier is the ratio of the
    weight's first width dim: parameters store input dims first ([in, out], [embed, 3, heads,
    head_dim], [heads, head_dim, embed], [expert, in, out], with a leading "layers" axis when
    stacked). All 1 at the base width."""

    def multiplier(p, b):
        dims = _infinite_dims(p.shape, b.shape)
        if len(dims) < 2:
            return 1.0
        return b.shape[dims[0]] / p.shape[dims[0]]

    param_classes(params, base_params)  # rejects > 2 width dims
    return jax.tree.map(multiplier, params, base_params)
