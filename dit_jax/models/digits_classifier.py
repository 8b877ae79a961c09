"""The digits classifier network behind the small-data metrics (dit_jax.eval.proxy trains, caches and
applies it): two 3x3 convolutions, a FEATURE_DIM-d feature layer and a linear head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FEATURE_DIM = 64
CLASSIFIER_WIDTH = 16  # channels of the first convolution; the second has twice as many


def _patches(x_BHWC: jax.Array, stride: int) -> jax.Array:
    """3x3 neighbourhoods (zero padded) at every `stride`-th pixel: [B, H/stride, W/stride, 9 C]."""
    _, height, width, _ = x_BHWC.shape
    padded = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    views = [padded[:, i : i + height : stride, j : j + width : stride] for i in range(3) for j in range(3)]
    return jnp.concatenate(views, axis=-1)


class Conv3x3(nnx.Module):
    """A 3x3 'SAME' convolution written as patches @ kernel: XLA's CPU convolution gradients are ~10x
    slower at these sizes, and this keeps training to seconds."""

    def __init__(self, in_features: int, out_features: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.stride = stride
        self.linear = nnx.Linear(9 * in_features, out_features, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.linear(_patches(x_BHWC, self.stride))


class ClassifierNet(nnx.Module):
    """Two 3x3 convolutions (the second with stride 2), a FEATURE_DIM-d feature layer and a linear head."""

    def __init__(
        self,
        image_size: int,
        channels: int,
        num_classes: int,
        width: int = CLASSIFIER_WIDTH,
        *,
        rngs: nnx.Rngs,
    ):
        self.conv1 = Conv3x3(channels, width, rngs=rngs)
        self.conv2 = Conv3x3(width, 2 * width, stride=2, rngs=rngs)
        reduced = -(-image_size // 2)
        self.dense = nnx.Linear(reduced * reduced * 2 * width, FEATURE_DIM, rngs=rngs)
        self.head = nnx.Linear(FEATURE_DIM, num_classes, rngs=rngs)

    def features(self, x_BHWC: jax.Array) -> jax.Array:
        """Penultimate-layer activations [B, FEATURE_DIM]."""
        h = nnx.gelu(self.conv1(x_BHWC))
        h = nnx.gelu(self.conv2(h))
        return nnx.gelu(self.dense(h.reshape(h.shape[0], -1)))

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.head(self.features(x_BHWC))
