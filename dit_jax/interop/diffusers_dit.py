"""diffusers `DiTTransformer2DModel` folders (e.g. facebook/DiT-XL-2-256's transformer/) -> dit_jax DiT.

The result is the pure dict of `nnx.split(DiT(cfg, ...))[1].to_pure_dict()` together with the
`config.Model` inferred from diffusers' config.json. Layout changes (PyTorch -> ours):

  nn.Linear weight [out, in]                    -> kernel [in, out]
  pos_embed.proj conv weight [D, C, p, q]       -> patch_embed kernel [(p q c), D]
  attn1.to_q / to_k / to_v weights [D, D] each  -> w_qkv [D, 3, heads, head_dim] (biases likewise;
                                                   zeros when attention_bias is false)
  attn1.to_out.0 weight [D, D]                  -> w_out [heads, head_dim, D]
  transformer_blocks.i.norm1.linear             -> blocks.i.adaln (same chunk order)
  transformer_blocks.i.ff.net.0.proj / ff.net.2 -> blocks.i.mlp.fc1 / fc2
  proj_out_1 / proj_out_2                       -> final.adaln / final.proj

Two numerical conventions differ from the official DiT and are carried by the config:
diffusers' timestep sinusoids use `Timesteps(downscale_freq_shift=1)` (`timestep_freq_shift=1`),
and the LayerNorm before the MLP uses `norm_eps` (`mlp_norm_eps`; the attention and final norms
use 1e-6 in both).

diffusers gives every block its own `CombinedTimestepLabelEmbeddings`
(`transformer_blocks.i.norm1.emb`); the final layer uses block 0's. Converted official checkpoints
hold identical copies, which map onto our single shared embedder: the converter checks that every
copy equals block 0's and refuses the checkpoint otherwise.

Position embeddings: `DiTTransformer2DModel` builds its `PatchEmbed` with the defaults
(pos_embed_type "sincos", interpolation_scale 1, base_size = grid size), so positions are the integer
patch coordinates: exactly the fixed 2-D sin-cos table dit_jax computes (a non-persistent buffer,
absent from the weights). Legacy `Transformer2DModel` configs with norm_type "ada_norm_zero" are
loaded by diffusers as `DiTTransformer2DModel` (its config defaults apply to missing keys, and
`interpolation_scale` is ignored); an explicit interpolation_scale other than 1 is refused because
the un-remapped class would then use other positions.

Images are NHWC here and NCHW in diffusers: transpose images, not weights.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.interop.diffusers_vae import read_weights, resolve_weights
from dit_jax.interop.layout import MAX_NAMED, Entry, describe_keys, set_path
from dit_jax.interop.torch_checkpoint import CheckpointFormatError, to_numpy
from dit_jax.models import layout
from dit_jax.models.dit import DiT

FREQ_DIM = 256  # CombinedTimestepLabelEmbeddings: Timesteps(num_channels=256)
EMBEDDER_RTOL, EMBEDDER_ATOL = 1e-5, 1e-6  # per-block embedder copies must agree this closely
CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")

# DiTTransformer2DModel.__init__ defaults: diffusers fills keys missing from config.json with these
# (also for legacy Transformer2DModel configs, which it remaps to DiTTransformer2DModel).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}
# Legacy Transformer2DModel keys and the only values a DiT has for them.
LEGACY_DIT_VALUES: dict[str, Any] = {
    "cross_attention_dim": None,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "double_self_attention": False,
    "attention_type": "default",
    "caption_channels": None,
    "use_additional_conditions": None,
}


def _unsupported(what: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"diffusers DiT config: {what}")


def model_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> config_lib.Model:
    """The `config.Model` equivalent to a diffusers DiT config.json (dict); raises
    CheckpointFormatError with one line naming the first unsupported setting."""
    cls = diffusers_config.get("_class_name", "DiTTransformer2DModel")
    if cls not in CLASS_NAMES:
        raise _unsupported(f"_class_name {cls!r} is not a DiT; expected one of {', '.join(CLASS_NAMES)}")
    if cls == "Transformer2DModel" and "norm_type" not in diffusers_config:
        raise _unsupported(
            "a Transformer2DModel config without norm_type is not a DiT (diffusers loads it as a DiT "
            "only with norm_type 'ada_norm_zero')"
        )
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in diffusers_config.items() if not k.startswith("_")}}
    if c["norm_type"] != "ada_norm_zero":
        raise _unsupported(
            f"norm_type {c['norm_type']!r} is not supported; dit_jax loads DiT's adaLN-Zero ('ada_norm_zero')"
        )
    if cls == "Transformer2DModel":
        for key, value in LEGACY_DIT_VALUES.items():
            if c.get(key, value) != value:
                raise _unsupported(f"{key}={c[key]!r} is not supported (a DiT has {key}={value!r})")
        if c.get("interpolation_scale") not in (None, 1, 1.0):
            raise _unsupported(
                f"interpolation_scale={c['interpolation_scale']!r} is not supported; dit_jax's fixed "
                "sin-cos position table has interpolation_scale 1"
            )
    if c["activation_fn"] != "gelu-approximate":
        raise _unsupported(
            f"activation_fn {c['activation_fn']!r} is not supported; DiT's MLP uses 'gelu-approximate'"
        )
    if c["norm_elementwise_affine"]:
        raise _unsupported(
            "norm_elementwise_affine=True is not supported; DiT's norms have no affine parameters"
        )
    if c["num_embeds_ada_norm"] is None:
        raise _unsupported("num_embeds_ada_norm is null; ada_norm_zero needs the number of classes")
    sample_size = c["sample_size"]
    if isinstance(sample_size, list | tuple):
        if len(sample_size) != 2 or sample_size[0] != sample_size[1]:
            raise _unsupported(f"sample_size {list(sample_size)} is not supported; only square sizes are")
        sample_size = sample_size[0]
    in_channels = c["in_channels"]
    out_channels = in_channels if c["out_channels"] is None else c["out_channels"]
    if out_channels not in (in_channels, 2 * in_channels):
        raise _unsupported(
            f"out_channels={out_channels} with in_channels={in_channels} is not supported; expected "
            f"{in_channels} (epsilon only) or {2 * in_channels} (learned sigma)"
        )
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    if hidden % 4:
        raise _unsupported(
            f"width {hidden} (num_attention_heads x attention_head_dim) is not a multiple of 4, "
            "which the 2-D sin-cos position table needs"
        )
    try:
        return config_lib.Model(
            image_size=int(sample_size),
            in_channels=int(in_channels),
            patch_size=int(c["patch_size"]),
            hidden_size=int(hidden),
            depth=int(c["num_layers"]),
            num_heads=int(c["num_attention_heads"]),
            mlp_ratio=4.0,  # FeedForward(mult=4)
            num_classes=int(c["num_embeds_ada_norm"]),
            class_dropout=0.1,  # CombinedTimestepLabelEmbeddings(class_dropout_prob=0.1): null row kept
            learn_sigma=out_channels == 2 * in_channels,
            timestep_freq_shift=1,
            mlp_norm_eps=float(c["norm_eps"]),
        )
    except config_lib.ConfigError as e:
        raise _unsupported(str(e)) from e


def _linear(table: dict, prefix: str, path: tuple, d_in: int, d_out: int, bias: bool = True) -> None:
    table[f"{prefix}.weight"] = Entry((d_out, d_in), (*path, "kernel"), lambda w: w.T)
    if bias:
        table[f"{prefix}.bias"] = Entry((d_out,), (*path, "bias"), lambda w: w)


def _embedder_keys(cfg: config_lib.Model, block: int) -> dict[str, Entry]:
    """Block `block`'s CombinedTimestepLabelEmbeddings, mapped onto our shared embedders."""
    d, e = cfg.hidden_size, f"transformer_blocks.{block}.norm1.emb"
    table: dict[str, Entry] = {}
    _linear(table, f"{e}.timestep_embedder.linear_1", ("t_embedder", "fc1"), FREQ_DIM, d)
    _linear(table, f"{e}.timestep_embedder.linear_2", ("t_embedder", "fc2"), d, d)
    table[f"{e}.class_embedder.embedding_table.weight"] = Entry(
        (cfg.num_classes + 1, d), ("y_embedder", "table"), lambda w: w
    )
    return table


def _layout(cfg: config_lib.Model, attention_bias: bool) -> dict[str, Entry]:
    """diffusers key -> entry for every parameter but the embedder copies of blocks 1.. (checked apart).

    q, k and v land in slot 0, 1, 2 of the fused projection: path (..., "w_qkv", slot).
    """
    d, p, c, h = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.num_heads
    k = d // h
    mlp = int(d * cfg.mlp_ratio)
    table: dict[str, Entry] = {
        "pos_embed.proj.weight": Entry(
            (d, c, p, p),
            ("patch_embed", "proj", "kernel"),
            lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
        ),
        "pos_embed.proj.bias": Entry((d,), ("patch_embed", "proj", "bias"), lambda w: w),
    }
    table.update(_embedder_keys(cfg, 0))
    for i in range(cfg.depth):
        b, ours = f"transformer_blocks.{i}", ("blocks", i)
        _linear(table, f"{b}.norm1.linear", (*ours, "adaln"), d, 6 * d)
        for slot, name in enumerate(("to_q", "to_k", "to_v")):
            table[f"{b}.attn1.{name}.weight"] = Entry(
                (d, d), (*ours, "attn", "w_qkv", slot), lambda w: w.T.reshape(d, h, k)
            )
            if attention_bias:
                table[f"{b}.attn1.{name}.bias"] = Entry(
                    (d,), (*ours, "attn", "b_qkv", slot), lambda w: w.reshape(h, k)
                )
        table[f"{b}.attn1.to_out.0.weight"] = Entry(
            (d, d), (*ours, "attn", "w_out"), lambda w: w.T.reshape(h, k, d)
        )
        table[f"{b}.attn1.to_out.0.bias"] = Entry((d,), (*ours, "attn", "b_out"), lambda w: w)
        _linear(table, f"{b}.ff.net.0.proj", (*ours, "mlp", "fc1"), d, mlp)
        _linear(table, f"{b}.ff.net.2", (*ours, "mlp", "fc2"), mlp, d)
    _linear(table, "proj_out_1", ("final", "adaln"), d, 2 * d)
    _linear(table, "proj_out_2", ("final", "proj"), d, p * p * cfg.out_channels)
    return table


def _describe(cfg: config_lib.Model) -> str:
    return (
        f"sample_size={cfg.image_size}, patch_size={cfg.patch_size}, in_channels={cfg.in_channels}, "
        f"width={cfg.hidden_size}, num_layers={cfg.depth}, num_attention_heads={cfg.num_heads}, "
        f"num_embeds_ada_norm={cfg.num_classes}, learn_sigma={cfg.learn_sigma}"
    )


def _check_embedder_copies(state_dict: Mapping[str, Any], cfg: config_lib.Model) -> None:
    """Every block's timestep/label embedder must equal block 0's (dit_jax shares one)."""
    first = _embedder_keys(cfg, 0)
    differing = []
    for i in range(1, cfg.depth):
        for key0, key in zip(first, _embedder_keys(cfg, i), strict=True):
            a, b = to_numpy(state_dict[key0]), to_numpy(state_dict[key])
            if not np.allclose(b, a, rtol=EMBEDDER_RTOL, atol=EMBEDDER_ATOL):
                differing.append(f"{key} (max abs diff {float(np.max(np.abs(a - b))):.3g})")
    if differing:
        more = f", ... ({len(differing) - MAX_NAMED} more)" if len(differing) > MAX_NAMED else ""
        raise CheckpointFormatError(
            "diffusers DiT checkpoint has per-block timestep/label embedders that differ from block 0's: "
            + ", ".join(differing[:MAX_NAMED])
            + more
            + "; dit_jax's DiT shares one embedder across blocks, so it cannot represent this model"
        )


def convert_diffusers_dit(
    state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any]
) -> tuple[config_lib.Model, dict]:
    """diffusers DiTTransformer2DModel state dict (numpy arrays or torch tensors) and its config dict
    -> (config.Model, our params pure dict of float32 numpy arrays).

    Raises CheckpointFormatError for unsupported configs, missing/unexpected keys, mismatched shapes
    (each named) or per-block embedder copies that differ.
    """
    cfg = model_config_from_diffusers(diffusers_config)
    attention_bias = bool({**DIFFUSERS_DEFAULTS, **diffusers_config}["attention_bias"])
    table = _layout(cfg, attention_bias)
    copies = {key for i in range(1, cfg.depth) for key in _embedder_keys(cfg, i)}
    expected_keys = set(table) | copies
    missing = sorted(expected_keys - set(state_dict))
    unexpected = sorted(set(state_dict) - expected_keys)
    if missing or unexpected:
        parts = [f"missing keys: {describe_keys(missing)}"] if missing else []
        parts += [f"unexpected keys: {describe_keys(unexpected)}"] if unexpected else []
        raise CheckpointFormatError(
            f"diffusers DiT checkpoint does not match its config ({_describe(cfg)}): " + "; ".join(parts)
        )
    bad = []
    shapes = dict(table)
    for i in range(1, cfg.depth):  # the copies must have block 0's shapes
        shapes.update(_embedder_keys(cfg, i))
    for key, entry in shapes.items():
        if tuple(np.shape(state_dict[key])) != entry.shape:
            bad.append(f"{key}: checkpoint shape {tuple(np.shape(state_dict[key]))}, expected {entry.shape}")
    if bad:
        more = f"; ... ({len(bad) - MAX_NAMED} more)" if len(bad) > MAX_NAMED else ""
        raise CheckpointFormatError(
            f"diffusers DiT checkpoint does not match its config ({_describe(cfg)}): "
            + "; ".join(bad[:MAX_NAMED])
            + more
        )
    _check_embedder_copies(state_dict, cfg)

    params: dict = {}
    fused: dict[tuple, list] = {}  # (..., "w_qkv" | "b_qkv") -> [q, k, v]
    for key, entry in table.items():
        value = entry.transform(to_numpy(state_dict[key]))
        if isinstance(entry.path[-1], int):
            fused.setdefault(entry.path[:-1], [None] * 3)[entry.path[-1]] = value
        else:
            set_path(params, entry.path, np.ascontiguousarray(value, dtype=np.float32))
    for path, (q, k, v) in fused.items():
        set_path(params, path, np.ascontiguousarray(np.stack([q, k, v], axis=-3), dtype=np.float32))
    if not attention_bias:
        for block in params["blocks"].values():
            block["attn"]["b_qkv"] = np.zeros(
                (3, cfg.num_heads, cfg.hidden_size // cfg.num_heads), np.float32
            )
    if not cfg.num_classes:
        # A single (null) label row, always looked up: a constant added to c, folded into the bias.
        null_row = params.pop("y_embedder")["table"][0]
        params["t_embedder"]["fc2"]["bias"] = params["t_embedder"]["fc2"]["bias"] + null_row
    return cfg, layout.for_model(params, cfg)


def _resolve_folder(path: str | os.PathLike) -> str:
    """A pipeline folder (model_index.json + transformer/) -> its transformer/ folder."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"diffusers DiT checkpoint not found: {path!r}")
    sub = os.path.join(path, "transformer")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(sub):
        return sub
    return path


def read_diffusers_dit(
    path: str | os.PathLike, config: Mapping[str, Any] | str | os.PathLike | None = None
) -> tuple[config_lib.Model, dict]:
    """(config.Model, params pure dict) of a local diffusers DiT.

    `path`: a folder with config.json and diffusion_pytorch_model.{safetensors,bin}, a pipeline folder
    with transformer/, or a single weights file with `config` (dict or config.json path; default: the
    config.json beside the file).
    """
    weights_file, config_dict = resolve_weights(_resolve_folder(path), config)
    try:
        return convert_diffusers_dit(read_weights(weights_file), config_dict)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{weights_file!r}: {e}") from e


def load_diffusers_dit(
    path: str | os.PathLike,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    attention_impl: str = "auto",
    dtype: str = "float32",
    param_dtype: str = "float32",
) -> DiT:
    """A dit_jax DiT with the weights of a local diffusers DiT (see `read_diffusers_dit` for `path`).

    `model(x_NHWC, t_B, y_B)` equals the PyTorch `DiTTransformer2DModel(x_NCHW, t_B, y_B).sample`
    transposed to NHWC. `model.cfg` is the inferred config.Model (with `dtype`/`param_dtype`);
    `nnx.to_pure_dict(nnx.state(model, nnx.Param))` gives the parameters.
    """
    cfg, params = read_diffusers_dit(path, config)
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype)
    abstract = nnx.eval_shape(lambda: DiT(cfg, attention_impl, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.dtype(param_dtype)), params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
