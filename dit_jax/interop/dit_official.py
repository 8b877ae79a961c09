"""Official DiT checkpoints (facebookresearch/DiT, e.g. DiT-XL-2-256x256.pt) -> dit_jax DiT params,
and the state-dict layout shared with its descendants (SiT, REPA, LightningDiT; see interop.sit).

The result is the pure dict of `nnx.split(DiT(cfg, ...))[1].to_pure_dict()`, so it is used as
`nnx.merge(graphdef, params)(x_BHWC, t_B, y_B)`. Layout changes (PyTorch -> ours):

  nn.Linear weight [out, in]            -> kernel [in, out]
  x_embedder conv weight [D, C, p, q]   -> patch_embed kernel [(p q c), D]
  attn.qkv weight [3 D, D]              -> w_qkv [D, 3, heads, head_dim]
  attn.proj weight [D, D]               -> w_out [heads, head_dim, D]
  attn.q_norm / k_norm weight (, bias)  -> attn.q_norm / k_norm scale (, bias)      (qk_norm)
  mlp.w12 weight [2 F, D] (SwiGLU)      -> mlp.w_in [D, 2, F]; mlp.w3 -> mlp.fc2     (mlp="swiglu")
  norm1 / norm2 / norm_final weight     -> norm1 / norm2 / final.norm scale          (norm="rmsnorm")
  projectors.0.{0,2,4} (REPA)           -> projector.fc1 / fc2 / fc3                (repa_depth > 0)

`pos_embed` (and LightningDiT's RoPE buffers `feat_rope.freqs_cos/sin`) are checked against the
tables we compute and dropped. Note that the official model is NCHW and ours NHWC: transpose
images, not weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dit_jax import config as config_lib
from dit_jax.interop.layout import (
    MAX_NAMED,
    Entry,
    add_attention,
    describe_keys,
    identity,
    linear_kernel,
    set_path,
)
from dit_jax.interop.torch_checkpoint import CheckpointFormatError, read_torch_checkpoint, to_numpy
from dit_jax.models import layout
from dit_jax.models.layers import rope_2d_tables, sincos_pos_embed_2d

FREQ_DIM = 256  # TimestepEmbedder frequency_embedding_size (the same in both implementations)
POS_EMBED_ATOL = 1e-5
# Prefixes that wrappers add to every key (DistributedDataParallel, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _linear(table: dict, prefix: str, path: tuple, d_in: int, d_out: int) -> None:
    table[f"{prefix}.weight"] = Entry((d_out, d_in), (*path, "kernel"), linear_kernel)
    table[f"{prefix}.bias"] = Entry((d_out,), (*path, "bias"), identity)


def _norm(table: dict, prefix: str, path: tuple, dim: int, *, bias: bool) -> None:
    table[f"{prefix}.weight"] = Entry((dim,), (*path, "scale"), identity)
    if bias:
        table[f"{prefix}.bias"] = Entry((dim,), (*path, "bias"), identity)


def _layout(cfg: config_lib.Model) -> dict[str, Entry]:
    """PyTorch key -> entry, for every parameter of a DiT-family model with this config (the fixed
    pos_embed and RoPE buffers aside). Key names are shared by DiT, SiT, REPA and LightningDiT."""
    d, p, c, h = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.num_heads
    k = d // h
    mlp = cfg.mlp_hidden_size
    table: dict[str, Entry] = {}
    # Conv [D, C, p, q] -> per-patch features in (p, q, c) order, as PatchEmbed flattens them.
    table["x_embedder.proj.weight"] = Entry(
        (d, c, p, p),
        ("patch_embed", "proj", "kernel"),
        lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
    )
    table["x_embedder.proj.bias"] = Entry((d,), ("patch_embed", "proj", "bias"), identity)
    _linear(table, "t_embedder.mlp.0", ("t_embedder", "fc1"), FREQ_DIM, d)
    _linear(table, "t_embedder.mlp.2", ("t_embedder", "fc2"), d, d)
    # The official model always has a label table: num_classes rows plus the null (CFG) class. With
    # num_classes == 0 its single row is a constant added to c, folded into t_embedder.fc2.bias.
    table["y_embedder.embedding_table.weight"] = Entry(
        (cfg.num_classes + 1, d), ("y_embedder", "table"), identity
    )
    rms = cfg.norm == "rmsnorm"
    for i in range(cfg.depth):
        b, path = f"blocks.{i}", ("blocks", i)
        add_attention(table, f"{b}.attn", (*path, "attn"), d, h)
        if cfg.qk_norm:
            for name in ("q_norm", "k_norm"):
                _norm(table, f"{b}.attn.{name}", (*path, "attn", name), k, bias=not rms)
        if cfg.mlp == "swiglu":
            table[f"{b}.mlp.w12.weight"] = Entry(
                (2 * mlp, d), (*path, "mlp", "w_in"), lambda w: w.T.reshape(d, 2, mlp)
            )
            table[f"{b}.mlp.w12.bias"] = Entry(
                (2 * mlp,), (*path, "mlp", "b_in"), lambda w: w.reshape(2, mlp)
            )
            _linear(table, f"{b}.mlp.w3", (*path, "mlp", "fc2"), mlp, d)
        else:
            _linear(table, f"{b}.mlp.fc1", (*path, "mlp", "fc1"), d, mlp)
            _linear(table, f"{b}.mlp.fc2", (*path, "mlp", "fc2"), mlp, d)
        if rms:
            _norm(table, f"{b}.norm1", (*path, "norm1"), d, bias=False)
            _norm(table, f"{b}.norm2", (*path, "norm2"), d, bias=False)
        _linear(table, f"{b}.adaLN_modulation.1", (*path, "adaln"), d, 6 * d)
    _linear(table, "final_layer.adaLN_modulation.1", ("final", "adaln"), d, 2 * d)
    _linear(table, "final_layer.linear", ("final", "proj"), d, p * p * cfg.out_channels)
    if rms:
        _norm(table, "final_layer.norm_final", ("final", "norm"), d, bias=False)
    if cfg.repa_depth:
        width, features = cfg.repa_projector_dim, cfg.repa_feature_dim
        _linear(table, "projectors.0.0", ("projector", "fc1"), d, width)
        _linear(table, "projectors.0.2", ("projector", "fc2"), width, width)
        _linear(table, "projectors.0.4", ("projector", "fc3"), width, features)
    return table


def _fixed_tables(cfg: config_lib.Model) -> dict[str, Callable[[], np.ndarray]]:
    """Non-trainable tensors the checkpoint stores and we compute: key -> expected value (lazy)."""
    grid = cfg.image_size // cfg.patch_size
    tables = {"pos_embed": lambda: sincos_pos_embed_2d(cfg.hidden_size, grid)[None]}
    if cfg.rope:
        head_dim = cfg.hidden_size // cfg.num_heads
        tables["feat_rope.freqs_cos"] = lambda: rope_2d_tables(head_dim, grid)[0]
        tables["feat_rope.freqs_sin"] = lambda: rope_2d_tables(head_dim, grid)[1]
    return tables


def _describe_config(cfg: config_lib.Model) -> str:
    text = (
        f"image_size={cfg.image_size}, patch_size={cfg.patch_size}, in_channels={cfg.in_channels}, "
        f"hidden_size={cfg.hidden_size}, depth={cfg.depth}, num_heads={cfg.num_heads}, "
        f"num_classes={cfg.num_classes}, learn_sigma={cfg.learn_sigma}"
    )
    defaults = config_lib.Model()
    for key in ("mlp_ratio", "mlp", "norm", "qk_norm", "rope", "repa_depth"):
        if getattr(cfg, key) != getattr(defaults, key):
            text += f", {key}={getattr(cfg, key)!r}"
    if cfg.repa_depth:
        text += f", repa_projector_dim={cfg.repa_projector_dim}, repa_feature_dim={cfg.repa_feature_dim}"
    return text


def strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Removes a prefix that every key carries ("module." from DDP, "_orig_mod." from torch.compile)."""
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            return strip_wrapper_prefix({key[len(prefix) :]: v for key, v in state_dict.items()})
    return state_dict


def _check_fixed(key: str, value: np.ndarray, expected: np.ndarray, cfg: config_lib.Model) -> None:
    grid = cfg.image_size // cfg.patch_size
    what = "DiT's fixed 2-D sin-cos table" if key == "pos_embed" else "LightningDiT's 2-D RoPE table"
    if value.shape != expected.shape:
        raise CheckpointFormatError(
            f"parameter {key!r}: checkpoint shape {value.shape}, expected {expected.shape} "
            f"({grid}x{grid} patches of width {cfg.hidden_size}, {cfg.num_heads} heads); "
            "check image_size, patch_size and num_heads"
        )
    err = float(np.max(np.abs(value - expected)))
    if err > POS_EMBED_ATOL:
        raise CheckpointFormatError(
            f"parameter {key!r} differs from {what} (max abs diff {err:.3g}); "
            "this checkpoint was not trained with the fixed positions dit_jax computes"
        )


def _hints(missing: list[str], unexpected: list[str], cfg: config_lib.Model) -> str:
    hints = []
    if any(key.startswith("projectors.0.") for key in unexpected) and not cfg.repa_depth:
        hints.append(
            "the checkpoint has a REPA projector: set model.repa_depth (REPA's encoder_depth, 8 for "
            "the released SiT-XL/2) and the projector widths"
        )
    if any(re.match(r"projectors\.[1-9]", key) for key in unexpected):
        hints.append("the checkpoint has several REPA projectors; dit_jax supports one (one target encoder)")
    if any(key.startswith("feat_rope.") for key in missing + unexpected):
        hints.append(f"model.rope={cfg.rope} but the checkpoint {'lacks' if cfg.rope else 'has'} RoPE tables")
    hints.append("interop.infer_model_config(state_dict, family) derives the model config from the weights")
    return " (" + "; ".join(hints) + ")"


def convert_dit_family(state_dict: Mapping[str, Any], cfg: config_lib.Model, family: str) -> dict:
    """A DiT-family state dict (numpy arrays or torch tensors) -> our params pure dict (numpy float32).

    `family` names the checkpoint kind in error messages. Raises CheckpointFormatError naming
    missing/unexpected keys or mismatched shapes.
    """
    state_dict = strip_wrapper_prefix(state_dict)
    table = _layout(cfg)
    fixed = _fixed_tables(cfg)
    header = f"{family} checkpoint does not match the model config ({_describe_config(cfg)}): "
    expected_keys = set(table) | set(fixed)
    missing = sorted(expected_keys - set(state_dict))
    unexpected = sorted(set(state_dict) - expected_keys)
    if missing or unexpected:
        parts = [f"missing keys: {describe_keys(missing)}"] if missing else []
        parts += [f"unexpected keys: {describe_keys(unexpected)}"] if unexpected else []
        raise CheckpointFormatError(header + "; ".join(parts) + _hints(missing, unexpected, cfg))
    params: dict = {}
    bad_shapes = []
    for key, entry in table.items():
        value = to_numpy(state_dict[key])
        if value.shape != entry.shape:
            bad_shapes.append(
                f"{key} (-> {'/'.join(map(str, entry.path))}): checkpoint shape {tuple(value.shape)}, "
                f"expected {entry.shape}"
            )
            continue
        set_path(params, entry.path, np.ascontiguousarray(entry.transform(value), dtype=np.float32))
    if bad_shapes:
        hint = ""
        rows = np.shape(state_dict["y_embedder.embedding_table.weight"])[0]
        if cfg.num_classes and rows == cfg.num_classes:
            hint = (
                " (the label table has no null-class row: the checkpoint was trained without label "
                "dropout, but dit_jax's DiT always has the classifier-free-guidance class)"
            )
        if np.shape(state_dict["blocks.0.adaLN_modulation.1.weight"])[0] == 4 * cfg.hidden_size:
            hint = " (the blocks' adaLN has no shift terms: LightningDiT's wo_shift=True is not supported)"
        raise CheckpointFormatError(
            header
            + "; ".join(bad_shapes[:MAX_NAMED])
            + (f"; ... ({len(bad_shapes) - MAX_NAMED} more)" if len(bad_shapes) > MAX_NAMED else "")
            + hint
        )
    for key, expected in fixed.items():
        _check_fixed(key, to_numpy(state_dict[key]), expected(), cfg)
    if not cfg.num_classes:
        null_row = params.pop("y_embedder")["table"][0]
        params["t_embedder"]["fc2"]["bias"] = params["t_embedder"]["fc2"]["bias"] + null_row
    return layout.for_model(params, cfg)


def convert_official_dit(state_dict: Mapping[str, Any], cfg: config_lib.Model) -> dict:
    """Official DiT state dict (numpy arrays or torch tensors) -> our params pure dict (numpy float32).

    Raises CheckpointFormatError naming missing/unexpected keys or mismatched shapes.
    """
    return convert_dit_family(state_dict, cfg, "official DiT")


def load_official_dit(path: str | os.PathLike, cfg: config_lib.Model) -> dict:
    """Read an official DiT `.pt` file (plain, or {"model", "ema"} training checkpoint: EMA preferred)."""
    return convert_official_dit(read_torch_checkpoint(path), cfg)
