"""Loading published PyTorch checkpoints into dit_jax parameter dicts (PyTorch itself is optional)."""

from dit_jax.interop.diffusers_vae import convert_diffusers_vae, load_diffusers_vae
from dit_jax.interop.dit_official import convert_official_dit, load_official_dit
from dit_jax.interop.torch_checkpoint import CheckpointFormatError, read_torch_checkpoint

__all__ = [
    "CheckpointFormatError",
    "convert_diffusers_vae",
    "convert_official_dit",
    "load_diffusers_vae",
    "load_official_dit",
    "read_torch_checkpoint",
]
