"""REPA (Yu et al., "Representation Alignment for Generation", 2025): representation alignment loss.

The hidden states after `model.repa_depth` blocks go through the model's projector MLP and are
pulled towards a frozen encoder's patch features of the clean image, token by token:

    loss = denoising loss + repa.weight * mean_tokens(-cos(projector(h_l), encoder(image)))

as REPA's `proj_loss` (both sides L2-normalised, negative cosine averaged over tokens, then over
the batch). Encoders (`repa.encoder`):

- "dinov2": DINOv2 (REPA's choice, ViT-B/14 for its SiT-XL/2 runs) from the torch-hub file at
  `repa.encoder_weights`, on the clean RGB image preprocessed as REPA does (ImageNet
  normalisation, bicubic resize to `repa.encoder_image_size`, 224 for 256-px images). For a
  latent data set the images must be stored next to the latents (`dit-jax encode --store_images`).
- "digits_classifier": the project's digits classifier (dit_jax.eval.proxy, trained and cached on
  first use), whose second-convolution activations are a patch-level feature map of the digit.

Encoder features are average-pooled to the model's token grid when their grid is a multiple of it.
The encoder's parameters are an argument of the jitted train step (replicated), not constants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dit_jax import config as config_lib
from dit_jax import flops
from dit_jax.data import pixels
from dit_jax.models import digits_classifier


class RepaError(ValueError):
    """A REPA configuration that cannot work; the message says what to change."""


class Encoder(NamedTuple):
    """A frozen target encoder: apply(params, images [B, H, W, C]) -> token features [B, L, Z].

    Images are uint8 in 0..255 or float in [-1, 1]."""

    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any
    feature_dim: int
    flops_per_image: float  # analytic, one forward pass (dit_jax.flops)


def alignment_loss(z_pred_BLZ: jax.Array, z_target_BLZ: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Per-example negative cosine similarity averaged over tokens, f32 [B] (REPA's proj_loss).

    Normalisation as torch.nn.functional.normalize: x / max(||x||, eps).
    """
    # z * rsqrt(max(|z|^2, eps^2)) == z / max(|z|, eps), with a finite gradient at z = 0.
    normalize = lambda z: z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), eps * eps))
    z_pred = normalize(z_pred_BLZ.astype(jnp.float32))
    z_target = normalize(jax.lax.stop_gradient(z_target_BLZ).astype(jnp.float32))
    return -jnp.mean(jnp.sum(z_pred * z_target, axis=-1), axis=-1)


def pool_to_grid(f_BHWZ: jax.Array, grid: int) -> jax.Array:
    """Average-pools a feature map to grid x grid tokens in row-major order: [B, grid * grid, Z]."""
    b, h, w, z = f_BHWZ.shape
    if h % grid or w % grid:
        raise RepaError(
            f"the encoder's {h}x{w} feature map cannot be pooled to the model's {grid}x{grid} token "
            "grid; choose model.patch_size (or repa.encoder_image_size) so that the grids divide"
        )
    f = f_BHWZ.reshape(b, grid, h // grid, grid, w // grid, z).mean(axis=(2, 4))
    return f.reshape(b, grid * grid, z)


def _digits_encoder(cfg: config_lib.Config, grid: int) -> Encoder:
    from dit_jax.eval import proxy

    if cfg.data.source != "digits":
        raise RepaError(
            f"repa.encoder='digits_classifier' needs data.source='digits', not {cfg.data.source!r}; "
            "use repa.encoder='dinov2' for other data"
        )
    spatial, params = proxy.load_or_train_classifier(cfg.data).spatial_encoder()
    apply = lambda params, images: pool_to_grid(spatial(params, pixels.as_model_space(images)), grid)
    width = digits_classifier.CLASSIFIER_WIDTH
    encoder_flops = flops.digits_encoder_flops(cfg.data.image_size, cfg.data.channels, width)
    return Encoder(apply, params, 2 * width, encoder_flops)


def _dinov2_encoder(cfg: config_lib.Config, grid: int) -> Encoder:
    from flax import nnx

    from dit_jax.interop.dinov2 import load_dinov2
    from dit_jax.models.dinov2 import preprocess

    if not cfg.repa.encoder_weights:
        raise RepaError(
            "repa.encoder='dinov2' needs repa.encoder_weights, the torch-hub file "
            "dinov2_vitb14_pretrain.pth (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/)"
        )
    size = cfg.repa.encoder_image_size
    module = load_dinov2(cfg.repa.encoder_weights, image_size=size)
    graphdef, params = nnx.split(module)
    patch = module.cfg.patch_size
    side = size // patch

    def apply(params: Any, images: jax.Array) -> jax.Array:
        if images.shape[-1] != 3:
            raise RepaError(f"DINOv2 encodes RGB images; the clean images have {images.shape[-1]} channels")
        patch_BLD = nnx.merge(graphdef, params)(preprocess(images, size)).patch_BLD
        return pool_to_grid(patch_BLD.reshape(patch_BLD.shape[0], side, side, -1), grid)

    return Encoder(apply, params, module.cfg.embed_dim, flops.dinov2_forward_flops(module.cfg))


def make_encoder(cfg: config_lib.Config) -> Encoder:
    """The configured frozen encoder, checked against the model's projector width."""
    if cfg.data.source == "latents" and not cfg.data.with_images:
        raise RepaError(
            "REPA on latents needs the clean images for its encoder: encode with "
            "`dit-jax encode --store_images` and set data.with_images=True"
        )
    grid = cfg.model.image_size // cfg.model.patch_size
    build = {"digits_classifier": _digits_encoder, "dinov2": _dinov2_encoder}[cfg.repa.encoder]
    encoder = build(cfg, grid)
    if encoder.feature_dim != cfg.model.repa_feature_dim:
        raise RepaError(
            f"model.repa_feature_dim={cfg.model.repa_feature_dim} but the {cfg.repa.encoder} encoder "
            f"gives {encoder.feature_dim}-d features; set model.repa_feature_dim={encoder.feature_dim}"
        )
    return encoder


def clean_images(batch: dict[str, jax.Array], x0: jax.Array) -> jax.Array:
    """What the encoder sees: the stored images of a latent data set, else the pixel batch itself."""
    return batch["image"] if "image" in batch else x0
