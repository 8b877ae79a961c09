"""A model from a config: its static spec (graph, parameter shapes, logical axes), construction and
application. Training, sampling, planning and the workdir loader all build models here."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.models.dit import DiT
from pallas_kernels import masks


class ModelSpec(NamedTuple):
    """What is static about a model: its graph, parameter shapes and logical axes."""

    graphdef: nnx.GraphDef
    abstract_params: Any
    logical_axes: Any


def _logical_axes(abstract_state: nnx.State) -> Any:
    axes = jax.tree.map(
        lambda v: v.get_metadata().get("logical_axes"),
        abstract_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return axes.to_pure_dict()


def attention_mask(cfg: config_lib.Config) -> masks.Mask | None:
    """The configured attention mask over the patch-token grid (None = full attention)."""
    window = cfg.attention.window()
    if window is None:
        return None
    grid = cfg.model.image_size // cfg.model.patch_size
    return masks.Neighborhood2D(grid=(grid, grid), window=window)


def build_model(cfg: config_lib.Config, seed: int | None = None) -> DiT:
    seed = cfg.seed if seed is None else seed
    return DiT(
        cfg.model,
        cfg.attention.impl,
        attention_mask(cfg),
        context_impl=cfg.attention.context_impl,
        rngs=nnx.Rngs(params=seed),
    )


def model_spec(cfg: config_lib.Config) -> ModelSpec:
    """Model shapes without allocating (nnx.eval_shape)."""
    abstract = nnx.eval_shape(lambda: build_model(cfg))
    graphdef, state = nnx.split(abstract)
    return ModelSpec(graphdef, state.to_pure_dict(), _logical_axes(state))


def apply_model(graphdef: nnx.GraphDef, params: Any, *args, **kwargs) -> jax.Array:
    return nnx.merge(graphdef, params)(*args, **kwargs)
