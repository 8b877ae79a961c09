"""Loading the FID Inception weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or the
`.npz` that `convert_to_npz` writes from it, so PyTorch is needed only once) -> `InceptionV3`.

Where to get the file (nothing is downloaded at run time):
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
and where it is looked for when no path is given: $DIT_JAX_INCEPTION_WEIGHTS, else
~/.cache/dit_jax/pt_inception-2015-12-05-6726825d.npz, else the `.pth` beside it.

Layout changes (PyTorch -> ours): conv weight [O, I, kh, kw] -> kernel [kh, kw, I, O]; fc weight
[1008, 2048] -> kernel [2048, 1008]; BatchNorm weight/bias/running_mean/running_var ->
scale/bias/mean/var. `num_batches_tracked` entries are ignored; any other extra or missing key, or a
shape that differs, is an error that names the parameters.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from dit_jax.interop.torch_checkpoint import CheckpointFormatError, read_torch_checkpoint, to_numpy
from dit_jax.models.inception import InceptionV3, Preprocess

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILENAME}"
WEIGHTS_ENV = "DIT_JAX_INCEPTION_WEIGHTS"
MAX_NAMED = 8

# our leaf name -> PyTorch leaf name (the module path above the leaf is the same in both)
_TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def default_weights_path() -> Path:
    """$DIT_JAX_INCEPTION_WEIGHTS if set, else the converted `.npz` in ~/.cache/dit_jax if present,
    else the `.pth` there."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    pth = Path("~/.cache/dit_jax").expanduser() / WEIGHTS_FILENAME
    npz = pth.with_suffix(".npz")
    return npz if npz.is_file() else pth


def _missing_file_message(path: Path) -> str:
    return (
        f"FID Inception weights not found at {str(path)!r}: download {WEIGHTS_URL} and pass its path "
        f"(default location: ~/.cache/dit_jax/{WEIGHTS_FILENAME}, or set ${WEIGHTS_ENV})"
    )


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED])
    return shown + (f", ... ({len(keys) - MAX_NAMED} more)" if len(keys) > MAX_NAMED else "")


def _abstract_model(preprocess: Preprocess = "tf1") -> InceptionV3:
    return nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), preprocess=preprocess))


@functools.cache
def _layout() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """PyTorch key -> (our path, the PyTorch shape), for every parameter (built once: ~2 s on CPU)."""
    table = {}
    for path, leaf in nnx.to_flat_state(nnx.state(_abstract_model())):
        path = tuple(str(p) for p in path)
        shape = tuple(leaf.shape)
        if len(shape) == 4:  # conv kernel HWIO -> OIHW
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:  # linear kernel [in, out] -> [out, in]
            shape = shape[::-1]
        table[".".join((*path[:-1], _TORCH_LEAF[path[-1]]))] = (path, shape)
    return table


def _to_ours(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
        value = value.T
    return np.ascontiguousarray(value, dtype=np.float32)


def convert_fid_inception(state_dict: Mapping[str, Any]) -> dict:
    """pytorch-fid FIDInceptionV3 state dict (numpy arrays or torch tensors) -> our pure params dict.

    Raises CheckpointFormatError naming missing/unexpected keys or mismatched shapes.
    """
    table = _layout()
    provided = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)}
    missing, unexpected = sorted(set(table) - provided), sorted(provided - set(table))
    if missing or unexpected:
        parts = [f"missing keys: {_names(missing)}"] if missing else []
        parts += [f"unexpected keys: {_names(unexpected)}"] if unexpected else []
        raise CheckpointFormatError(
            "not the pytorch-fid FID Inception-v3 weights (pt_inception-2015-12-05): " + "; ".join(parts)
        )
    params: dict = {}
    bad_shapes = []
    for key, (path, shape) in table.items():
        value = to_numpy(state_dict[key])
        if value.shape != shape:
            bad_shapes.append(f"{key}: file shape {tuple(value.shape)}, expected {shape}")
            continue
        tree = params
        for part in path[:-1]:
            tree = tree.setdefault(part, {})
        tree[path[-1]] = _to_ours(value)
    if bad_shapes:
        raise CheckpointFormatError(
            "not the pytorch-fid FID Inception-v3 weights (pt_inception-2015-12-05): "
            + "; ".join(bad_shapes[:MAX_NAMED])
            + (f"; ... ({len(bad_shapes) - MAX_NAMED} more)" if len(bad_shapes) > MAX_NAMED else "")
        )
    return params


def read_weights(path: str | os.PathLike | None = None) -> Mapping[str, np.ndarray]:
    """The PyTorch-named weights from a `.pth` (needs torch) or a `.npz` written by `convert_to_npz`."""
    path = Path(path).expanduser() if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(_missing_file_message(path))
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointFormatError(f"could not read {str(path)!r} as an .npz file: {e}") from e
    return read_torch_checkpoint(path)


def convert_to_npz(pth: str | os.PathLike, npz: str | os.PathLike) -> Path:
    """Validate a `.pth` and store its tensors (PyTorch names, float32) as `.npz`; returns the path.

    Written to a temporary name first, so an interrupted conversion never leaves a truncated file.
    """
    state_dict = read_weights(pth)
    convert_fid_inception(state_dict)  # fail here, not at the first evaluation
    arrays = {k: to_numpy(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    npz = Path(npz).expanduser()
    npz.parent.mkdir(parents=True, exist_ok=True)
    tmp = npz.with_name(npz.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, npz)
    return npz


def load_fid_inception(
    path: str | os.PathLike | None = None, *, preprocess: Preprocess = "tf1"
) -> InceptionV3:
    """The FID Inception-v3 with weights from `path` (`.pth` or `.npz`; default: see module doc).

    Raises FileNotFoundError (saying where to get the file) or CheckpointFormatError.
    """
    params = convert_fid_inception(read_weights(path))
    graphdef, state = nnx.split(_abstract_model(preprocess))
    nnx.replace_by_pure_dict(state, jax.device_put(params))
    return nnx.merge(graphdef, state)
