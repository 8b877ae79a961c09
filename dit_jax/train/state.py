"""Train state (params, EMA, optimizer state, step) built abstractly, then initialised sharded."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dit_jax import config as config_lib
from dit_jax.models.build import ModelSpec, build_model
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


def optimizer(cfg: config_lib.Config) -> optax.GradientTransformation:
    o = cfg.optim
    adamw = optax.adamw(
        learning_rate(o, cfg.total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay
    )
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw


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
