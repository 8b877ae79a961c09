"""diffusers `AutoencoderKL` checkpoints (the SD-VAE) -> dit_jax.models.vae.AutoencoderKL.

Our parameter tree uses diffusers' module names, so the mapping is mechanical (PyTorch -> ours):

  conv weight [O, I, kh, kw]         -> kernel [kh, kw, I, O]
  nn.Linear weight [out, in]         -> kernel [in, out]
  GroupNorm weight                   -> scale
  legacy attention query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0 (also as 1x1 conv weights)

Images are NHWC here and NCHW in diffusers: transpose images, not weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.interop.layout import MAX_NAMED, describe_keys, set_path
from dit_jax.interop.torch_checkpoint import CheckpointFormatError, read_torch_checkpoint, to_numpy
from dit_jax.models.vae import AutoencoderKL, VAEConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_name(path: tuple[Any, ...]) -> str:
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join([*map(str, path[:-1]), leaf])


def _expected(cfg: VAEConfig) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
    """diffusers key -> (our path, our shape), from the abstract model (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))[0]
    out = {}
    for keypath, leaf in flat:
        path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keypath)
        out[_torch_name(path)] = (path, tuple(leaf.shape))
    return out


def _rename_legacy(key: str) -> str:
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION and "attentions" in parts:
        return ".".join([*parts[:-2], LEGACY_ATTENTION[parts[-2]], parts[-1]])
    return key


def _to_ours(value: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    if len(our_shape) == 4:  # conv OIHW -> HWIO
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    if len(our_shape) == 2:  # linear [out, in] (or legacy 1x1 conv [out, in, 1, 1]) -> [in, out]
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        return value.T if value.ndim == 2 else value
    return value


def convert_diffusers_vae(state_dict: Mapping[str, Any], cfg: VAEConfig) -> dict:
    """diffusers AutoencoderKL state dict (numpy arrays or torch tensors) -> our params pure dict.

    Raises CheckpointFormatError naming missing/unexpected keys, or each mismatched parameter with both
    shapes.
    """
    renamed: dict[str, Any] = {}
    for key, value in state_dict.items():
        renamed[_rename_legacy(key)] = value
    expected = _expected(cfg)
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        parts = [f"missing keys: {describe_keys(missing)}"] if missing else []
        parts += [f"unexpected keys: {describe_keys(unexpected)}"] if unexpected else []
        raise CheckpointFormatError(
            f"diffusers AutoencoderKL checkpoint does not match the config ({cfg}): " + "; ".join(parts)
        )
    params: dict = {}
    bad = []
    for key, (path, shape) in expected.items():
        value = _to_ours(to_numpy(renamed[key]), shape)
        if value.shape != shape:
            bad.append(
                f"{key} (-> {'/'.join(map(str, path))}): checkpoint shape {tuple(np.shape(renamed[key]))} "
                f"gives {value.shape}, expected {shape}"
            )
            continue
        set_path(params, path, np.ascontiguousarray(value, dtype=np.float32))
    if bad:
        more = f"; ... ({len(bad) - MAX_NAMED} more)" if len(bad) > MAX_NAMED else ""
        raise CheckpointFormatError(
            f"diffusers AutoencoderKL checkpoint has mismatched shapes ({cfg}): "
            + "; ".join(bad[:MAX_NAMED])
            + more
        )
    return params


def read_weights(path: str) -> Mapping[str, Any]:
    """A weights file as a dict of arrays: safetensors without PyTorch (as JAX arrays, so bfloat16
    files load too), `.bin` / `.pt` through `read_torch_checkpoint` (needs the torch extra)."""
    if path.endswith(".safetensors"):
        from safetensors.flax import load_file

        try:
            return load_file(path)
        except Exception as e:  # truncated or not a safetensors file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointFormatError(f"could not read {path!r} as a safetensors file: {reason}") from e
    return read_torch_checkpoint(path)


def resolve_weights(path: str, config: Mapping[str, Any] | str | os.PathLike | None) -> tuple[str, Mapping]:
    """(weights file, config dict) for a diffusers folder, a pipeline folder (its vae/), or a file."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae")):
            path = os.path.join(path, "vae")
        weights = [os.path.join(path, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
        if not weights:
            raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {path!r}")
        weights_file, folder = weights[0], path
    elif os.path.isfile(path):
        weights_file, folder = path, os.path.dirname(path)
    else:
        raise FileNotFoundError(f"VAE checkpoint not found: {path!r}")
    if config is None:
        config = os.path.join(folder, "config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"no config.json next to {weights_file!r}; pass config=")
    if not isinstance(config, Mapping):
        with open(config) as f:
            config = json.load(f)
    return weights_file, config


def load_diffusers_vae(
    path: str | os.PathLike,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    precision=None,
) -> AutoencoderKL:
    """An AutoencoderKL with the weights of a local diffusers VAE.

    `path`: a folder with config.json and diffusion_pytorch_model.{safetensors,bin} (or a pipeline folder
    with vae/), or a single weights file with `config` (dict or config.json path; default: the
    config.json beside the file). The result has `encode(x_NHWC) -> (mean, std)`, `decode(z_NHWC)` and
    `scaling_factor`.
    """
    weights_file, config_dict = resolve_weights(os.fspath(path), config)
    try:
        cfg = VAEConfig.from_diffusers(config_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{weights_file!r}: {e}") from e
    params = convert_diffusers_vae(read_weights(weights_file), cfg)
    abstract = nnx.eval_shape(
        lambda: AutoencoderKL(
            cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, precision=precision
        )
    )
    graphdef, state = nnx.split(abstract)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=param_dtype), params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
