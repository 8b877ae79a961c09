"""uint8 pixels <-> model space (float32 in [-1, 1]): the one place that converts between them.

Data sets store uint8 pixels and the model sees x * 2 / 255 - 1; samples become uint8 again by
rounding (x + 1) * 127.5 to nearest (ties to even, as in the DiT/ADM sample scripts), so every
uint8 image survives the round trip unchanged. Both are computed in float32.

Not these conversions: Inception's and DINOv2's own input scalings (dit_jax.models.inception,
dit_jax.models.dinov2), which follow their reference implementations on resized images.
"""

from __future__ import annotations

import jax
import numpy as np


def from_uint8(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """uint8 0..255 -> float32 [-1, 1]: x * (2 / 255) - 1 in float32. NumPy in, NumPy out; a JAX
    array (or a tracer inside jit) in, a JAX array out."""
    x = images if isinstance(images, jax.Array) else np.asarray(images)
    return x.astype(np.float32) * (2.0 / 255.0) - 1.0


def as_model_space(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """Images as the model sees them, float32 [-1, 1]: uint8 pixels through `from_uint8`, any
    other dtype taken to be in [-1, 1] already and only cast to float32."""
    x = images if isinstance(images, jax.Array) else np.asarray(images)
    return from_uint8(x) if x.dtype == np.uint8 else x.astype(np.float32)


def to_uint8(x: np.ndarray | jax.Array) -> np.ndarray:
    """[-1, 1] -> uint8 0..255 (NumPy): round((x + 1) * 127.5) in float32, ties to even, clipped.
    Exact inverse of `from_uint8` on every uint8 value."""
    scaled = np.round((np.asarray(x, np.float32) + 1.0) * 127.5)
    return np.clip(scaled, 0, 255).astype(np.uint8)
