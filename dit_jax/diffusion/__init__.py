"""Diffusion objectives, time schedules and samplers (pure, jit-safe functions)."""

from dit_jax.diffusion.objectives import Objective, make_objective
from dit_jax.diffusion.samplers import sample

__all__ = ["Objective", "make_objective", "sample"]
