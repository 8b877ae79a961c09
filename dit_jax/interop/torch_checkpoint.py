"""Reading PyTorch `.pt` checkpoints as dicts of numpy arrays; torch is imported only when reading."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

# Keys under which training scripts (DiT, SiT, REPA, ...) nest the weights; the first present wins.
WRAPPER_KEYS = ("ema", "model", "state_dict")


class CheckpointFormatError(ValueError):
    """A checkpoint that does not match the requested model; the message names the offending keys."""


class TorchRequired(CheckpointFormatError, ImportError):
    """A pickled PyTorch file (.pt / .pth / .bin) and no PyTorch installed."""


def to_numpy(value: Any) -> np.ndarray:
    """A float32 numpy copy of a numpy/JAX array or a torch tensor (any device, bf16/fp16 included)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # numpy has no bfloat16
        value = value.numpy()
    return np.array(value, dtype=np.float32)


def read_torch_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """The state dict stored in a `.pt` file, unwrapped from {"ema": ..., "model": ...} (EMA preferred).

    Uses `torch.load(weights_only=True)`: no code from the file is executed.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(path)!r}")
    try:
        import torch
    except ImportError as e:
        raise TorchRequired(
            f"reading {os.fspath(path)!r} (a pickled PyTorch file) needs PyTorch, which is not installed; "
            "install the extra with `pip install 'dit_jax[torch]'`, or use the model's .safetensors "
            "weights, which need no PyTorch"
        ) from e
    # Official training checkpoints also pickle the argparse.Namespace of the run ("args").
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with safe([argparse.Namespace]) if safe else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code objects, not a torch file, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFormatError(
            f"could not read {os.fspath(path)!r} as a PyTorch checkpoint: {reason}"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"{os.fspath(path)!r} holds a {type(obj).__name__}, expected a state dict"
        )
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj
