"""dit_jax: Diffusion Transformers in JAX/Flax NNX, from a laptop CPU to accelerator pods."""

__version__ = "0.1.0"
