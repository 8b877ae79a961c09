"""REPA (Yu et al., "Representation Alignment for Generation", 2025): representation alignment loss.

The hidden states after `model.repa_depth` blocks go through the model's projector MLP and are
pulled towards a frozen encoder's patch features of the clean image, token by token:

    loss = denoising loss + repa.weight * mean_tokens(-cos(projector(h_l), encoder(x0)))

as REPA's `proj_loss` (both sides L2-normalised, negative cosine averaged over tokens, then over
the batch). Encoders: "digits_classifier" — the project's digits classifier (dit_jax.eval.proxy,
trained and cached on first use), whose second-convolution activations are a patch-level feature
map; it is resized to the model's token grid by average pooling. REPA's DINOv2 encoder for
ImageNet latents is not available in dit_jax yet (it needs the raw images next to the latents).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dit_jax import config as config_lib

EncoderFn = Callable[[jax.Array], jax.Array]  # clean images [B, H, W, C] -> features [B, L, Z]


class RepaError(ValueError):
    """A REPA configuration that cannot work; the message says what to change."""


def alignment_loss(z_pred_BLZ: jax.Array, z_target_BLZ: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Per-example negative cosine similarity averaged over tokens, f32 [B] (REPA's proj_loss).

    Normalisation as torch.nn.functional.normalize: x / max(||x||, eps).
    """
    normalize = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), eps)
    z_pred = normalize(z_pred_BLZ.astype(jnp.float32))
    z_target = normalize(jax.lax.stop_gradient(z_target_BLZ).astype(jnp.float32))
    return -jnp.mean(jnp.sum(z_pred * z_target, axis=-1), axis=-1)


def _pool_to_grid(f_BHWZ: jax.Array, grid: int) -> jax.Array:
    """Average-pools a feature map to grid x grid tokens in row-major order: [B, grid * grid, Z]."""
    b, h, w, z = f_BHWZ.shape
    if h % grid or w % grid:
        raise RepaError(
            f"the encoder's {h}x{w} feature map cannot be pooled to the model's {grid}x{grid} token "
            "grid; choose model.patch_size so that the token grid divides the feature map"
        )
    f = f_BHWZ.reshape(b, grid, h // grid, grid, w // grid, z).mean(axis=(2, 4))
    return f.reshape(b, grid * grid, z)


def encoder_dim(cfg: config_lib.Config) -> int:
    """Feature width of the configured encoder (the projector's output width must equal it)."""
    if cfg.repa.encoder == "digits_classifier":
        from dit_jax.eval import proxy

        return 2 * proxy.CLASSIFIER_WIDTH
    raise RepaError(f"unknown REPA encoder {cfg.repa.encoder!r}")


def make_encoder(cfg: config_lib.Config) -> EncoderFn:
    """The frozen encoder as a jax function of clean images in [-1, 1], token features [B, L, Z]."""
    if cfg.data.source != "digits":
        raise RepaError(
            f"repa.encoder={cfg.repa.encoder!r} needs the clean images of data.source='digits'; "
            f"data.source={cfg.data.source!r} has no encoder in dit_jax yet"
        )
    from dit_jax.eval import proxy

    spatial = proxy.load_or_train_classifier(cfg.data).spatial_features_fn()
    grid = cfg.model.image_size // cfg.model.patch_size
    return lambda x_BHWC: _pool_to_grid(spatial(x_BHWC), grid)
