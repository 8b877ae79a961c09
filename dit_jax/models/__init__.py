"""Model definitions (Flax NNX)."""

from dit_jax.models.dit import DiT

__all__ = ["DiT"]
