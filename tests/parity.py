"""Float32 parity against a float64 run of the reference, and optional test dependencies.

The rule, used by every parity test (DiT, diffusers DiT, SiT / REPA / LightningDiT, DINOv2, VAE,
Inception, sampling loops). A float32 result has rounding error that depends on the order of its
reductions, which differs between libraries and between CPUs, so a tolerance on |ours - PyTorch|
tuned on one machine fails on another. Instead each test runs the reference twice, in float32 and
in float64 (PyTorch: a float64 copy of the module on float64 inputs, see `float64`; or NumPy in
float64), and judges our float32 output by the reference's own float32 error:

    max |ours - ref64|  <=  max(multiple * max |ref32 - ref64|, floor)

multiple = 2 and floor = 1e-6 unless a test says why it needs otherwise (measured: a few model
families' ratio max |ours - ref64| / max |ref32 - ref64| reaches 1.6 - 2.5 over many random draws,
so they use 2.5 or 3). Both float32 results are about equally far from the float64 one on any
machine, so the check passes anywhere, while a real error (one weight off by 1e-4 relative, a
wrong constant) moves ours by tens of times the float32 noise. As a guard, the two reference runs
must agree to float32 noise (NOISE relative to the largest output): if they do not, the float64
run is not the same function and the bound would mean nothing.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import math
from collections.abc import Mapping
from types import ModuleType

import numpy as np
import pytest

MULTIPLE = 2.0
FLOOR = 1e-6
NOISE = 1e-4  # the most the two reference runs may differ, relative to the largest output (seen: 6e-6)


def optional(name: str) -> ModuleType | None:
    """The module `name`, or None when it (or something it imports) is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def requires(*names: str) -> pytest.MarkDecorator:
    """Skip a test unless all of `names` import (torch, diffusers, ... are optional extras)."""
    missing = [name for name in names if optional(name) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (make install-dev)")


def float64(module):
    """A float64 copy of a PyTorch module (the float32 original is left alone).

    diffusers' `Timesteps` computes its sinusoids in float32 whatever the model's dtype
    (get_timestep_embedding casts with .float()), which at t ~ 1000 leaves errors of ~5e-5 in a
    float64 run; in the copy they are computed from the same formula in float64.
    """
    copy64 = copy.deepcopy(module).double()
    for sub in copy64.modules():
        if type(sub).__name__ == "Timesteps" and type(sub).__module__.startswith("diffusers."):
            sub.forward = functools.partial(_diffusers_timesteps_float64, sub)
    return copy64


def _diffusers_timesteps_float64(self, timesteps):
    """diffusers.models.embeddings.Timesteps.forward (get_timestep_embedding), in float64."""
    import torch

    half = self.num_channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - self.downscale_freq_shift)
    args = self.scale * timesteps[:, None].double() * torch.exp(exponent)[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if self.flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, self.num_channels % 2))


@contextlib.contextmanager
def float32_resize_positions():
    """Within: torch.nn.functional.interpolate on float64 inputs (bilinear or bicubic, without
    antialias or align_corners) samples where PyTorch's CPU kernel samples float32 inputs.

    That kernel computes the source positions (scale * (i + 0.5) - 0.5) and the interpolation
    fractions in the input's dtype, so a plain float64 run samples up to ~1e-5 px elsewhere, which
    on noise images moves outputs by 1e-4: another function, not rounding noise. REPA's and
    pytorch-fid's preprocessing (and our ports of them) sample at the float32 positions, so here
    they are kept, and the weights and sums are computed in float64. A machine whose PyTorch rounds
    the positions differently only makes the float32 run's error, and so the bound, larger.
    """
    import torch

    original = torch.nn.functional.interpolate

    def interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None, **kwargs):
        plain = not kwargs.get("antialias") and not align_corners and not kwargs.get("recompute_scale_factor")
        if x.dtype != torch.float64 or x.ndim != 4 or mode not in ("bilinear", "bicubic") or not plain:
            return original(x, size, scale_factor, mode, align_corners, **kwargs)
        in_hw = x.shape[-2:]
        factors = (None, None) if scale_factor is None else _pair(scale_factor)
        if size is None:
            size = [math.floor(n * f) for n, f in zip(in_hw, factors, strict=True)]
        rows, cols = (
            _resize_matrix(n, m, f, mode) for n, m, f in zip(in_hw, _pair(size), factors, strict=True)
        )
        return torch.from_numpy(rows @ x.numpy() @ cols.T)

    torch.nn.functional.interpolate = interpolate
    try:
        yield
    finally:
        torch.nn.functional.interpolate = original


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _resize_matrix(in_size: int, out_size: int, scale_factor: float | None, mode: str) -> np.ndarray:
    """[out_size, in_size] float64 weights of PyTorch's CPU bilinear / bicubic (A = -0.75) upsample
    kernel (aten/src/ATen/native/UpSample.h, area_pixel_compute_source_index and
    guard_index_and_lambda) with its float32 positions and fractions."""
    f32 = np.float32
    scale = f32(1.0 / scale_factor) if scale_factor else f32(in_size) / f32(out_size)
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        if mode == "bilinear":  # its multiply-add rounds once (FMA) in the AVX512 kernel
            source = max(f32(float(scale) * (i + 0.5) - 0.5), f32(0))
        else:
            source = scale * (f32(i) + f32(0.5)) - f32(0.5)
        first = min(math.floor(source), in_size - 1)
        t = float(min(max(source - f32(first), f32(0)), f32(1)))
        if mode == "bilinear":
            taps, weights = (first, min(first + 1, in_size - 1)), (1 - t, t)
        else:
            taps = [min(max(first - 1 + j, 0), in_size - 1) for j in range(4)]
            weights = (_cubic(t + 1), _cubic(t), _cubic(1 - t), _cubic(2 - t))
        for tap, weight in zip(taps, weights, strict=True):
            matrix[i, tap] += weight
    return matrix


def _cubic(x: float, a: float = -0.75) -> float:
    """PyTorch's cubic convolution kernel (cubic_convolution1 / 2), for 0 <= x < 2."""
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_parity(
    name: str,
    ours,
    ref32,
    ref64,
    *,
    multiple: float = MULTIPLE,
    floor: float = FLOOR,
) -> None:
    """Asserts the rule above for one array, or for each key of dicts of arrays (each key judged by
    the reference's error on that key), and prints the errors (pytest -s shows the margins)."""
    if not isinstance(ref64, Mapping):
        ours, ref32, ref64 = {"": ours}, {"": ref32}, {"": ref64}
    assert set(ours) == set(ref32) == set(ref64), (sorted(ours), sorted(ref32), sorted(ref64))
    failures = []
    for key in ref64:
        got, r32, r64 = (np.asarray(a) for a in (ours[key], ref32[key], ref64[key]))
        assert got.shape == r32.shape == r64.shape, (name, key, got.shape, r32.shape, r64.shape)
        assert r64.dtype == np.float64, f"{name} {key}: the reference run is {r64.dtype}, not float64"
        assert np.all(np.isfinite(r64)), f"{name} {key}: the float64 reference is not finite"
        ours_err, ref_err = max_abs(got, r64), max_abs(r32, r64)
        # Float32 noise, not a different computation (else the bound would mean nothing).
        assert ref_err <= NOISE * np.max(np.abs(r64)), (
            f"{name} {key}: the float32 and float64 reference runs differ by {ref_err:.3g} "
            f"(outputs up to {np.max(np.abs(r64)):.3g}): they do not compute the same function"
        )
        bound = max(multiple * ref_err, floor)
        label = f"{name} {key}".strip()
        print(
            f"{label}: |ours - ref64| {ours_err:.3g}, |ref32 - ref64| {ref_err:.3g}, "
            f"ratio {ours_err / ref_err if ref_err else math.inf:.2f}, bound {bound:.3g}"
        )
        if not ours_err <= bound:
            failures.append(
                f"{label}: max |ours - float64 reference| {ours_err:.3g} > {bound:.3g} "
                f"(max({multiple:g} x the float32 reference's own error {ref_err:.3g}, {floor:g}))"
            )
    assert not failures, "; ".join(failures)
