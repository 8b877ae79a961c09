"""Official DINOv2 torch-hub checkpoints (dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth, plain state
dicts) -> a dit_jax.models.dinov2.DinoV2 built for one input resolution.

Nothing is downloaded: get the files from https://dl.fbaipublicfiles.com/dinov2/ (see
`checkpoint_url`). Layout changes (PyTorch -> ours):

  patch_embed.proj weight [D, C, p, q]   -> patch_embed.proj.kernel [(p q c), D]
  cls_token [1, 1, D], register_tokens [1, R, D] -> cls_token [D], register_tokens [R, D]
  pos_embed [1, 1 + 37*37, D]            -> pos_embed [1 + g*g, D], interpolated to the input grid g
  nn.Linear weight [out, in]             -> kernel [in, out]
  attn.qkv weight [3 D, D]               -> attn.w_qkv [D, 3, heads, head_dim]
  attn.proj weight [D, D]                -> attn.w_out [heads, head_dim, D]
  mlp.w12 [2 F, D], mlp.w3 (ViT-g)       -> mlp.w_in [D, 2, F], mlp.fc2
  ls1.gamma / ls2.gamma, LayerNorm weight -> ls1 / ls2, norm scale

`mask_token` (used only by DINOv2's masked training) is accepted and dropped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.interop.dit_official import strip_wrapper_prefix
from dit_jax.interop.layout import Entry, add_attention, describe_keys, identity, set_path
from dit_jax.interop.torch_checkpoint import CheckpointFormatError, read_torch_checkpoint, to_numpy
from dit_jax.models.dinov2 import HEADS_BY_WIDTH, DinoV2, DinoV2Config, interpolate_pos_embed

BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
IGNORED_KEYS = ("mask_token",)


def checkpoint_url(name: str = "dinov2_vitb14") -> str:
    """Download address of a backbone's weights: "dinov2_vitb14" or "dinov2_vitb14_reg4" (s, b, l, g)."""
    base = name.removesuffix("_reg4")
    return f"{BASE_URL}/{base}/{name}_pretrain.pth"


def _layout(cfg: DinoV2Config) -> dict[str, Entry]:
    """PyTorch key -> entry for every tensor of the backbone but pos_embed (interpolated apart)."""
    d, p, c, h = cfg.embed_dim, cfg.patch_size, cfg.in_channels, cfg.num_heads
    f = cfg.mlp_hidden
    table: dict[str, Entry] = {}

    def linear(prefix: str, path: tuple, d_in: int, d_out: int) -> None:
        table[f"{prefix}.weight"] = Entry((d_out, d_in), (*path, "kernel"), lambda w: w.T)
        table[f"{prefix}.bias"] = Entry((d_out,), (*path, "bias"), identity)

    def norm(prefix: str, path: tuple) -> None:
        table[f"{prefix}.weight"] = Entry((d,), (*path, "scale"), identity)
        table[f"{prefix}.bias"] = Entry((d,), (*path, "bias"), identity)

    table["cls_token"] = Entry((1, 1, d), ("cls_token",), lambda w: w.reshape(d))
    if cfg.num_register_tokens:
        r = cfg.num_register_tokens
        table["register_tokens"] = Entry((1, r, d), ("register_tokens",), lambda w: w.reshape(r, d))
    table["patch_embed.proj.weight"] = Entry(
        (d, c, p, p),
        ("patch_embed", "proj", "kernel"),
        lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
    )
    table["patch_embed.proj.bias"] = Entry((d,), ("patch_embed", "proj", "bias"), identity)
    for i in range(cfg.depth):
        b, path = f"blocks.{i}", ("blocks", i)
        norm(f"{b}.norm1", (*path, "norm1"))
        norm(f"{b}.norm2", (*path, "norm2"))
        add_attention(table, f"{b}.attn", (*path, "attn"), d, h)
        if cfg.layerscale:
            table[f"{b}.ls1.gamma"] = Entry((d,), (*path, "ls1"), identity)
            table[f"{b}.ls2.gamma"] = Entry((d,), (*path, "ls2"), identity)
        if cfg.ffn == "swiglu":
            table[f"{b}.mlp.w12.weight"] = Entry(
                (2 * f, d), (*path, "mlp", "w_in"), lambda w: w.T.reshape(d, 2, f)
            )
            table[f"{b}.mlp.w12.bias"] = Entry((2 * f,), (*path, "mlp", "b_in"), lambda w: w.reshape(2, f))
            linear(f"{b}.mlp.w3", (*path, "mlp", "fc2"), f, d)
        else:
            linear(f"{b}.mlp.fc1", (*path, "mlp", "fc1"), d, f)
            linear(f"{b}.mlp.fc2", (*path, "mlp", "fc2"), f, d)
    norm("norm", ("norm",))
    return table


def infer_dinov2_config(
    state_dict: Mapping[str, Any], *, image_size: int = 224, num_heads: int | None = None, **overrides: Any
) -> DinoV2Config:
    """The DinoV2Config of a DINOv2 state dict, built for image_size x image_size inputs.

    Width, patch, channels, depth, FFN kind and width, LayerScale, registers and the stored
    position grid come from the tensors; the head count from the published widths
    (384/768/1024/1536 -> 6/12/16/24 heads), else from `num_heads`. Checkpoints with registers get
    the register backbones' interpolation (antialias, no offset). `overrides` are applied last.
    """
    sd = strip_wrapper_prefix(state_dict)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            first = ", ".join(sorted(sd)[:5]) or "none"
            raise CheckpointFormatError(
                f"cannot infer the DINOv2 config: the state dict has no {key!r} (keys: {first}, ...); "
                "is it a DINOv2 backbone checkpoint?"
            )
        return tuple(np.shape(sd[key]))

    width, channels, patch, _ = shape("patch_embed.proj.weight")
    tokens = shape("pos_embed")[1] - 1
    pos_grid = math.isqrt(tokens)
    if pos_grid * pos_grid != tokens:
        raise CheckpointFormatError(f"'pos_embed' has {tokens} patch positions, not a square grid")
    depth = len({int(m.group(1)) for key in sd if (m := re.match(r"blocks\.(\d+)\.", key))})
    swiglu = "blocks.0.mlp.w12.weight" in sd
    mlp_hidden = shape("blocks.0.mlp.w12.weight")[0] // 2 if swiglu else shape("blocks.0.mlp.fc1.weight")[0]
    registers = shape("register_tokens")[1] if "register_tokens" in sd else 0
    if num_heads is None:
        if width not in HEADS_BY_WIDTH:
            raise CheckpointFormatError(
                f"DINOv2 width {width} is not a published one ({sorted(HEADS_BY_WIDTH)}): pass num_heads"
            )
        num_heads = HEADS_BY_WIDTH[width]
    cfg = DinoV2Config(
        image_size=image_size,
        patch_size=patch,
        in_channels=channels,
        embed_dim=width,
        depth=depth,
        num_heads=num_heads,
        mlp_hidden=mlp_hidden,
        ffn="swiglu" if swiglu else "mlp",
        layerscale="blocks.0.ls1.gamma" in sd,
        num_register_tokens=registers,
        pos_grid=pos_grid,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
    )
    return dataclasses.replace(cfg, **overrides)


def _describe(cfg: DinoV2Config) -> str:
    return (
        f"embed_dim={cfg.embed_dim}, depth={cfg.depth}, num_heads={cfg.num_heads}, "
        f"patch_size={cfg.patch_size}, ffn={cfg.ffn!r}, mlp_hidden={cfg.mlp_hidden}, "
        f"layerscale={cfg.layerscale}, num_register_tokens={cfg.num_register_tokens}, pos_grid={cfg.pos_grid}"
    )


def convert_dinov2(state_dict: Mapping[str, Any], cfg: DinoV2Config) -> dict:
    """A DINOv2 state dict (numpy arrays or torch tensors) -> the params pure dict of DinoV2(cfg)
    (numpy float32), the position table interpolated to cfg.grid.

    Raises CheckpointFormatError naming missing/unexpected keys or mismatched shapes.
    """
    sd = strip_wrapper_prefix(state_dict)
    table = _layout(cfg)
    header = f"DINOv2 checkpoint does not match the config ({_describe(cfg)}): "
    expected = set(table) | {"pos_embed"}
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected - set(IGNORED_KEYS))
    if missing or unexpected:
        parts = [f"missing keys: {describe_keys(missing)}"] if missing else []
        parts += [f"unexpected keys: {describe_keys(unexpected)}"] if unexpected else []
        raise CheckpointFormatError(
            header
            + "; ".join(parts)
            + " (infer_dinov2_config(state_dict) derives the config from the weights)"
        )
    pos_shape = (1, 1 + cfg.pos_grid**2, cfg.embed_dim)
    entries = {**table, "pos_embed": Entry(pos_shape, ("pos_embed",), identity)}
    params: dict = {}
    bad = []
    for key, entry in entries.items():
        value = to_numpy(sd[key])
        if value.shape != entry.shape:
            where = "/".join(map(str, entry.path))
            bad.append(f"{key} (-> {where}): checkpoint shape {value.shape}, expected {entry.shape}")
            continue
        set_path(params, entry.path, np.ascontiguousarray(entry.transform(value), dtype=np.float32))
    if bad:
        raise CheckpointFormatError(header + "; ".join(bad))
    params["pos_embed"] = interpolate_pos_embed(
        params["pos_embed"], cfg.grid, offset=cfg.interpolate_offset, antialias=cfg.interpolate_antialias
    )
    return params


def load_dinov2(
    path: str | os.PathLike,
    *,
    image_size: int = 224,
    num_heads: int | None = None,
    attention_impl: str = "auto",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> DinoV2:
    """A DinoV2 for image_size x image_size inputs with the weights of a local torch-hub file
    (e.g. dinov2_vitb14_pretrain.pth); its config is inferred from the weights."""
    if not os.path.isfile(path):
        name = os.path.basename(os.fspath(path)).removesuffix("_pretrain.pth")
        known = re.fullmatch(r"dinov2_vit[sblg]14(_reg4)?", name)
        url = checkpoint_url(name if known else "dinov2_vitb14")
        raise FileNotFoundError(
            f"DINOv2 checkpoint not found: {os.fspath(path)!r}. dit_jax downloads nothing; get the "
            f"official weights from {url}"
            + ("" if known else " (ViT-B/14; vits14 / vitl14 / vitg14 for the other sizes)")
            + " and pass their local path"
        )
    state_dict = read_torch_checkpoint(path)
    cfg = infer_dinov2_config(state_dict, image_size=image_size, num_heads=num_heads)
    params = convert_dinov2(state_dict, cfg)
    abstract = nnx.eval_shape(
        lambda: DinoV2(cfg, attention_impl, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params))
    return nnx.merge(graphdef, state)
