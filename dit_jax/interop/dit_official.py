"""Official DiT checkpoints (facebookresearch/DiT, e.g. DiT-XL-2-256x256.pt) -> dit_jax DiT params.

The result is the pure dict of `nnx.split(DiT(cfg, ...))[1].to_pure_dict()`, so it is used as
`nnx.merge(graphdef, params)(x_BHWC, t_B, y_B)`. Layout changes (PyTorch -> ours):

  nn.Linear weight [out, in]            -> kernel [in, out]
  x_embedder conv weight [D, C, p, q]   -> patch_embed kernel [(p q c), D]
  attn.qkv weight [3 D, D]              -> w_qkv [D, 3, heads, head_dim]
  attn.proj weight [D, D]               -> w_out [heads, head_dim, D]

`pos_embed` is checked against our fixed sin-cos table and dropped (we compute it). Note that the
official model is NCHW and ours NHWC: transpose images, not weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from dit_jax import config as config_lib
from dit_jax.interop.torch_checkpoint import CheckpointFormatError, read_torch_checkpoint, to_numpy
from dit_jax.models.layers import sincos_pos_embed_2d

FREQ_DIM = 256  # TimestepEmbedder frequency_embedding_size (the same in both implementations)
POS_EMBED_ATOL = 1e-5
MAX_NAMED = 8

Transform = Callable[[np.ndarray], np.ndarray]


class _Entry(NamedTuple):
    """One official tensor: its expected shape, where it goes in our tree, and how to re-lay it out."""

    shape: tuple[int, ...]
    path: tuple[Any, ...]
    transform: Transform


def _linear_kernel(w: np.ndarray) -> np.ndarray:
    return w.T


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _linear(table: dict, prefix: str, path: tuple, d_in: int, d_out: int) -> None:
    table[f"{prefix}.weight"] = _Entry((d_out, d_in), (*path, "kernel"), _linear_kernel)
    table[f"{prefix}.bias"] = _Entry((d_out,), (*path, "bias"), _identity)


def _layout(cfg: config_lib.Model) -> dict[str, _Entry]:
    """Official key -> entry, for every parameter of an official DiT with these sizes (pos_embed aside)."""
    d, p, c, h = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.num_heads
    k = d // h
    mlp = int(d * cfg.mlp_ratio)
    table: dict[str, _Entry] = {}
    # Conv [D, C, p, q] -> per-patch features in (p, q, c) order, as PatchEmbed flattens them.
    table["x_embedder.proj.weight"] = _Entry(
        (d, c, p, p),
        ("patch_embed", "proj", "kernel"),
        lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
    )
    table["x_embedder.proj.bias"] = _Entry((d,), ("patch_embed", "proj", "bias"), _identity)
    _linear(table, "t_embedder.mlp.0", ("t_embedder", "fc1"), FREQ_DIM, d)
    _linear(table, "t_embedder.mlp.2", ("t_embedder", "fc2"), d, d)
    # The official model always has a label table: num_classes rows plus the null (CFG) class. With
    # num_classes == 0 its single row is a constant added to c, folded into t_embedder.fc2.bias.
    table["y_embedder.embedding_table.weight"] = _Entry(
        (cfg.num_classes + 1, d), ("y_embedder", "table"), _identity
    )
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        table[f"{b}.attn.qkv.weight"] = _Entry(
            (3 * d, d), ("blocks", i, "attn", "w_qkv"), lambda w: w.T.reshape(d, 3, h, k)
        )
        table[f"{b}.attn.qkv.bias"] = _Entry(
            (3 * d,), ("blocks", i, "attn", "b_qkv"), lambda w: w.reshape(3, h, k)
        )
        table[f"{b}.attn.proj.weight"] = _Entry(
            (d, d), ("blocks", i, "attn", "w_out"), lambda w: w.T.reshape(h, k, d)
        )
        table[f"{b}.attn.proj.bias"] = _Entry((d,), ("blocks", i, "attn", "b_out"), _identity)
        _linear(table, f"{b}.mlp.fc1", ("blocks", i, "mlp", "fc1"), d, mlp)
        _linear(table, f"{b}.mlp.fc2", ("blocks", i, "mlp", "fc2"), mlp, d)
        _linear(table, f"{b}.adaLN_modulation.1", ("blocks", i, "adaln"), d, 6 * d)
    _linear(table, "final_layer.adaLN_modulation.1", ("final", "adaln"), d, 2 * d)
    _linear(table, "final_layer.linear", ("final", "proj"), d, p * p * cfg.out_channels)
    return table


def _names(keys: list[str]) -> str:
    keys = sorted(keys, key=_natural_key)
    shown = ", ".join(keys[:MAX_NAMED])
    return shown + (f", ... ({len(keys) - MAX_NAMED} more)" if len(keys) > MAX_NAMED else "")


def _natural_key(key: str) -> tuple:
    """blocks.2 before blocks.10; numbers and names never compared with each other."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split("."))


def _describe_config(cfg: config_lib.Model) -> str:
    return (
        f"image_size={cfg.image_size}, patch_size={cfg.patch_size}, in_channels={cfg.in_channels}, "
        f"hidden_size={cfg.hidden_size}, depth={cfg.depth}, num_heads={cfg.num_heads}, "
        f"num_classes={cfg.num_classes}, learn_sigma={cfg.learn_sigma}"
    )


def _set(tree: dict, path: tuple, value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_pos_embed(value: np.ndarray, cfg: config_lib.Model) -> None:
    grid = cfg.image_size // cfg.patch_size
    expected = sincos_pos_embed_2d(cfg.hidden_size, grid)[None]
    if value.shape != expected.shape:
        raise CheckpointFormatError(
            f"parameter 'pos_embed': checkpoint shape {value.shape}, expected {expected.shape} "
            f"({grid}x{grid} patches of width {cfg.hidden_size}); check image_size and patch_size"
        )
    err = float(np.max(np.abs(value - expected)))
    if err > POS_EMBED_ATOL:
        raise CheckpointFormatError(
            f"parameter 'pos_embed' differs from DiT's fixed 2-D sin-cos table (max abs diff {err:.3g}); "
            "this checkpoint was not trained with the fixed position embedding dit_jax computes"
        )


def convert_official_dit(state_dict: Mapping[str, Any], cfg: config_lib.Model) -> dict:
    """Official DiT state dict (numpy arrays or torch tensors) -> our params pure dict (numpy float32).

    Raises CheckpointFormatError naming missing/unexpected keys or mismatched shapes.
    """
    table = _layout(cfg)
    expected_keys = set(table) | {"pos_embed"}
    missing = sorted(expected_keys - set(state_dict))
    unexpected = sorted(set(state_dict) - expected_keys)
    if missing or unexpected:
        parts = [f"missing keys: {_names(missing)}"] if missing else []
        parts += [f"unexpected keys: {_names(unexpected)}"] if unexpected else []
        raise CheckpointFormatError(
            f"official DiT checkpoint does not match the model config ({_describe_config(cfg)}): "
            + "; ".join(parts)
        )
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
        _set(params, entry.path, np.ascontiguousarray(entry.transform(value), dtype=np.float32))
    if bad_shapes:
        hint = ""
        rows = np.shape(state_dict["y_embedder.embedding_table.weight"])[0]
        if cfg.num_classes and rows == cfg.num_classes:
            hint = (
                " (the label table has no null-class row: the checkpoint was trained without label "
                "dropout, but dit_jax's DiT always has the classifier-free-guidance class)"
            )
        raise CheckpointFormatError(
            f"official DiT checkpoint does not match the model config ({_describe_config(cfg)}): "
            + "; ".join(bad_shapes[:MAX_NAMED])
            + (f"; ... ({len(bad_shapes) - MAX_NAMED} more)" if len(bad_shapes) > MAX_NAMED else "")
            + hint
        )
    _check_pos_embed(to_numpy(state_dict["pos_embed"]), cfg)
    if not cfg.num_classes:
        null_row = params.pop("y_embedder")["table"][0]
        params["t_embedder"]["fc2"]["bias"] = params["t_embedder"]["fc2"]["bias"] + null_row
    return params


def load_official_dit(path: str | os.PathLike, cfg: config_lib.Model) -> dict:
    """Read an official DiT `.pt` file (plain, or {"model", "ema"} training checkpoint: EMA preferred)."""
    return convert_official_dit(read_torch_checkpoint(path), cfg)
