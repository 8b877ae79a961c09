"""Train state (params, EMA, optimizer state, step) built abstractly, then initialised sharded."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dit_jax import config as config_lib
from dit_jax.models import mup
from dit_jax.models.build import ModelSpec, build_model, model_spec
from dit_jax.parallel import mesh as mesh_lib


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # pure dict of arrays
    ema: Any
    opt_state: Any


def learning_rate(cfg: config_lib.Optim, total_steps: int) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, max(total_steps - cfg.warmup_steps, 1))
    else:
        after = optax.constant_schedule(cfg.lr)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def optimizer(cfg: config_lib.Config, spec: ModelSpec | None = None) -> optax.GradientTransformation:
    """AdamW (after global-norm clipping when optim.grad_clip > 0); under model.parametrization="mup"
    with μP's per-parameter learning rates (`mup_adamw`). `spec`: the model's, if already built."""
    o = cfg.optim
    lr = learning_rate(o, cfg.total_steps)
    if mup.enabled(cfg.model):
        adamw = mup_adamw(cfg, lr, spec)
    else:
        adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw


def lr_multipliers(cfg: config_lib.Config, spec: ModelSpec | None = None) -> Any:
    """μP's per-parameter learning-rate multipliers (models.mup.lr_multipliers) of cfg's model,
    from its parameter shapes and its base model's: a tree of floats like the params."""
    spec = spec or model_spec(cfg)
    base = model_spec(dataclasses.replace(cfg, model=mup.base_config(cfg.model)))
    return mup.lr_multipliers(spec.abstract_params, base.abstract_params)


def scale_updates(inner: optax.GradientTransformation, multipliers: Any) -> optax.GradientTransformation:
    """`inner` with each update leaf times its multiplier (a tree of floats like the params); the
    state is inner's own, so the optimizer state keeps its tree."""

    def update(updates, state, params=None):
        updates, state = inner.update(updates, state, params)
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

    return optax.GradientTransformation(inner.init, update)


def mup_adamw(
    cfg: config_lib.Config, lr: optax.Schedule, spec: ModelSpec | None = None, multipliers: Any = None
) -> optax.GradientTransformation:
    """optax.adamw with μP's per-parameter learning rates, as the `mup` package's MuAdamW: the Adam
    direction of each parameter is multiplied by its multiplier (base/width for hidden weights)
    before the decoupled weight decay is added, so the decay step lr x weight_decay x param is the
    same at every width (MuAdamW divides lr and multiplies weight_decay by the width multiplier).
    The same chain as optax.adamw, so the optimizer state has the same tree as under SP.
    `multipliers`: a tree like the params (floats or arrays), default `lr_multipliers(cfg, spec)`."""
    o = cfg.optim
    adam = optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)
    if multipliers is None:
        multipliers = lr_multipliers(cfg, spec)
    return optax.chain(
        scale_updates(adam, multipliers),
        optax.add_decayed_weights(o.weight_decay),
        optax.scale_by_learning_rate(lr),
    )


def state_shardings(cfg: config_lib.Config, spec: ModelSpec, tx, mesh: jax.sharding.Mesh) -> TrainState:
    """NamedShardings for every leaf of the train state; optimizer moments follow their params."""
    params = mesh_lib.param_shardings(spec.logical_axes, spec.abstract_params, mesh, cfg.mesh.rules)
    abstract_opt = jax.eval_shape(tx.init, spec.abstract_params)
    opt = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt,
        params,
        transform_non_params=lambda _: mesh_lib.replicated(mesh),
    )
    return TrainState(step=mesh_lib.replicated(mesh), params=params, ema=params, opt_state=opt)


def abstract_state(cfg: config_lib.Config, spec: ModelSpec, tx) -> TrainState:
    def init():
        return TrainState(
            jnp.zeros((), jnp.int32),
            spec.abstract_params,
            spec.abstract_params,
            tx.init(spec.abstract_params),
        )

    return jax.eval_shape(init)


def init_state(cfg: config_lib.Config, spec: ModelSpec, tx, shardings: TrainState) -> TrainState:
    """Initialises parameters directly into their target shardings (no full host copy)."""

    def init():
        params = nnx.split(build_model(cfg))[1].to_pure_dict()
        return TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params))

    return jax.jit(init, out_shardings=shardings)()
