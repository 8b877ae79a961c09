"""Loading published PyTorch checkpoints into dit_jax parameter dicts (PyTorch itself is optional)."""

from dit_jax.interop.diffusers_dit import (
    convert_diffusers_dit,
    load_diffusers_dit,
    model_config_from_diffusers,
    read_diffusers_dit,
)
from dit_jax.interop.diffusers_vae import convert_diffusers_vae, load_diffusers_vae
from dit_jax.interop.dinov2 import convert_dinov2, infer_dinov2_config, load_dinov2
from dit_jax.interop.dit_official import convert_official_dit, load_official_dit
from dit_jax.interop.sit import (
    convert_lightningdit,
    convert_repa,
    convert_sit,
    infer_model_config,
    load_lightningdit,
    load_repa,
    load_sit,
)
from dit_jax.interop.torch_checkpoint import CheckpointFormatError, read_torch_checkpoint

__all__ = [
    "CheckpointFormatError",
    "convert_diffusers_dit",
    "convert_diffusers_vae",
    "convert_dinov2",
    "convert_lightningdit",
    "convert_official_dit",
    "convert_repa",
    "convert_sit",
    "infer_dinov2_config",
    "infer_model_config",
    "load_diffusers_dit",
    "load_diffusers_vae",
    "load_dinov2",
    "load_lightningdit",
    "load_official_dit",
    "load_repa",
    "load_sit",
    "model_config_from_diffusers",
    "read_diffusers_dit",
    "read_torch_checkpoint",
]
