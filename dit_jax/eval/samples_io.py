"""Reading sample files and reference batches in the ADM npz convention, with one-line errors.

Samples: `arr_0` uint8 images [N, H, W, C] in 0..255 with C in {1, 3}; optional `arr_1` int labels [N].
Reference batches (ADM `VIRTUAL_*.npz`): `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial
features, for sFID), and/or `arr_0` reference images.

Headers are checked before the arrays are read, so a wrong file fails fast even when it is large.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable

import numpy as np


class EvalError(ValueError):
    """A user error in evaluation inputs (files, shapes, sample counts); the message says how to fix it."""


# Reference keys each metric needs; any one alternative suffices ("arr_0" = compute from the images).
REFERENCE_NEEDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "fid": (("mu", "sigma"), ("arr_0",)),
    "sfid": (("mu_s", "sigma_s"), ("arr_0",)),
    "prec_recall": (("arr_0",),),
    "is": ((),),
}
# Fewest samples each metric can be computed from (precision/recall: more than k = 3 neighbours).
MIN_SAMPLES = {"fid": 2, "sfid": 2, "prec_recall": 4, "is": 1}

_REFERENCE_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "arr_0")


def _open_npz(path: str, what: str) -> zipfile.ZipFile:
    if not os.path.exists(path):
        raise EvalError(f"{what} file {path!r} does not exist; check the path")
    if os.path.isdir(path):
        raise EvalError(f"{what} path {path!r} is a folder; give the .npz file itself")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise EvalError(
            f"{what} file {path!r} is not an .npz archive ({err}); save it with np.savez(path, arr_0=...)"
        ) from None


def _header(archive: zipfile.ZipFile, key: str, path: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of `key` in the archive, read from the .npy header only."""
    try:
        with archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # rare newer format: read the array itself
                array = _load_array(path, key)
                shape, dtype = array.shape, array.dtype
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise EvalError(f"array {key!r} in {path!r} is corrupt ({err}); write the file again") from None
    return tuple(shape), dtype


def _keys(archive: zipfile.ZipFile) -> list[str]:
    return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]


def _load_array(path: str, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            return data[key]
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise EvalError(f"cannot read {key!r} from {path!r} ({err}); write the file again") from None


def _float_hint(path: str, key: str) -> str:
    values = _load_array(path, key)
    if values.size and np.isfinite(values).all():
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            return "values are in [0, 1]: convert with (x * 255).round().clip(0, 255).astype(np.uint8)"
        if low >= -1.0 and high <= 1.0:
            return (
                "values are in [-1, 1]: convert with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)"
            )
        return f"values span [{low:g}, {high:g}]: rescale to 0..255, round and cast with .astype(np.uint8)"
    return "scale to 0..255, round and cast with .astype(np.uint8)"


def check_images(shape: tuple[int, ...], dtype: np.dtype, path: str, key: str = "arr_0") -> None:
    """Raises EvalError unless (shape, dtype) is uint8 [N, H, W, C] with N >= 1 and C in {1, 3}."""
    where = f"{key} in {path!r}"
    if len(shape) != 4:
        hint = " (add a channel axis: x[..., None])" if len(shape) == 3 else ""
        raise EvalError(f"{where} has shape {shape}; images must be N x H x W x C{hint}")
    if shape[3] not in (1, 3):
        hint = " (looks channels-first: x.transpose(0, 2, 3, 1))" if shape[1] in (1, 3) else ""
        raise EvalError(f"{where} has shape {shape}; the last axis must be 1 or 3 channels{hint}")
    if shape[0] == 0:
        raise EvalError(f"{where} holds no images")
    if dtype != np.uint8:
        if np.issubdtype(dtype, np.floating):
            raise EvalError(
                f"{where} has dtype {dtype}; images must be uint8 0..255 (ADM convention): "
                + _float_hint(path, key)
            )
        raise EvalError(f"{where} has dtype {dtype}; images must be uint8 0..255: use .astype(np.uint8)")


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images uint8 [N, H, W, C] (`arr_0`) and int32 labels [N] (`arr_1`, or None) from an ADM npz."""
    path = os.fspath(path)
    with _open_npz(path, "samples") as archive:
        keys = _keys(archive)
        if "arr_0" not in keys:
            found = ", ".join(keys) or "no arrays"
            raise EvalError(
                f"samples file {path!r} has no 'arr_0' (found: {found}); save images with "
                "np.savez(path, arr_0=images_uint8, arr_1=labels)"
            )
        shape, dtype = _header(archive, "arr_0", path)
        check_images(shape, dtype, path)
        label_header = _header(archive, "arr_1", path) if "arr_1" in keys else None
    labels = None
    if label_header is not None:
        label_shape, label_dtype = label_header
        if label_shape != (shape[0],):
            raise EvalError(
                f"arr_1 (labels) in {path!r} has shape {label_shape} but arr_0 holds {shape[0]} images; "
                "save one integer label per image"
            )
        if not np.issubdtype(label_dtype, np.integer):
            raise EvalError(f"arr_1 (labels) in {path!r} has dtype {label_dtype}; labels must be integers")
        labels = _load_array(path, "arr_1")
        if labels.size and labels.min() < 0:
            raise EvalError(f"arr_1 (labels) in {path!r} has negative values; labels must be 0..K-1")
        labels = labels.astype(np.int32)
    return _load_array(path, "arr_0"), labels


def load_reference(path: str, metrics: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The ADM reference arrays present in `path` (mu, sigma, mu_s, sigma_s, arr_0), checked.

    `metrics` (names from REFERENCE_NEEDS) makes a missing key an EvalError naming what is needed.
    """
    path = os.fspath(path)
    with _open_npz(path, "reference") as archive:
        keys = [k for k in _keys(archive) if k in _REFERENCE_KEYS]
        headers = {key: _header(archive, key, path) for key in keys}
    for metric in metrics:
        needs = REFERENCE_NEEDS.get(metric)
        if needs is None:
            raise EvalError(f"unknown metric {metric!r}; choose from {', '.join(REFERENCE_NEEDS)}")
        if not any(all(k in headers for k in option) for option in needs):
            wanted = " or ".join("+".join(option) for option in needs)
            raise EvalError(
                f"reference {path!r} lacks what metric {metric!r} needs ({wanted}); it has: "
                f"{', '.join(sorted(headers)) or 'none of mu, sigma, mu_s, sigma_s, arr_0'}"
            )
    if "arr_0" in headers:
        check_images(*headers["arr_0"], path)
    for mean_key, cov_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mean_key in headers) != (cov_key in headers):
            raise EvalError(f"reference {path!r} has only one of {mean_key!r} and {cov_key!r}; it needs both")
        if mean_key in headers:
            (mean_shape, _), (cov_shape, _) = headers[mean_key], headers[cov_key]
            if len(mean_shape) != 1 or cov_shape != (*mean_shape, *mean_shape):
                raise EvalError(
                    f"reference {path!r}: {mean_key} has shape {mean_shape} and {cov_key} {cov_shape}; "
                    "expected [d] and [d, d]"
                )
    if not headers:
        raise EvalError(f"reference {path!r} holds none of mu, sigma, mu_s, sigma_s, arr_0")
    return {key: _load_array(path, key) for key in headers}


def check_enough_samples(num_samples: int, metrics: Iterable[str], what: str = "samples") -> None:
    """Raises EvalError when `num_samples` is too few for any of `metrics` (see MIN_SAMPLES)."""
    for metric in metrics:
        needed = MIN_SAMPLES.get(metric, 1)
        if num_samples < needed:
            raise EvalError(
                f"metric {metric!r} needs at least {needed} {what}, got {num_samples}; use more samples "
                "or drop the metric"
            )
