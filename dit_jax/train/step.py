"""The pure train step and the one jit factory that shards and donates it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.diffusion import make_objective
from dit_jax.models.build import ModelSpec, model_spec
from dit_jax.parallel import mesh as mesh_lib
from dit_jax.train import repa
from dit_jax.train import state as state_lib
from dit_jax.train.state import TrainState, learning_rate


def ema_decay(cfg: config_lib.Optim, step: jax.Array) -> jax.Array:
    """The EMA decay used for the update made at `step` (0-based)."""
    if not cfg.ema_warmup:
        return jnp.asarray(cfg.ema_decay, jnp.float32)
    n = step.astype(jnp.float32)
    return jnp.minimum(cfg.ema_decay, (1 + n) / (10 + n))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    encoder_params: Any = None,
    *,
    cfg: config_lib.Config,
    spec: ModelSpec,
    tx: optax.GradientTransformation,
    encoder_apply: Callable[[Any, jax.Array], jax.Array] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update. Randomness is `fold_in(seed, step)`, so resuming needs no RNG state.

    With cfg.repa.weight > 0, `encoder_apply(encoder_params, images)` gives the target features
    of the clean images (repa.Encoder) and REPA's alignment loss is added (reported as
    `repa_loss`; `loss` is the total). With experts (model.num_experts > 0) the weighted load-balance
    and router z-losses are added, and the MoE statistics reported as `moe/<name>`
    (`moe/expert_load`: the fraction of routed assignments per expert, averaged over MoE blocks).
    A non-finite loss or gradient leaves the state unchanged and reports `nonfinite=1`; the loop
    stops on it, so a bad step never reaches a checkpoint.
    """
    objective = make_objective(cfg.objective, cfg.model.learn_sigma)
    key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
    noise_key, drop_key = jax.random.split(key)
    x0 = batch["x"]

    use_repa = cfg.repa.weight > 0
    if use_repa and encoder_apply is None:
        raise ValueError("cfg.repa.weight > 0 needs a REPA encoder (see dit_jax.train.repa.make_encoder)")

    def loss_fn(params):
        x_t, t, target = objective.sample(noise_key, x0)
        model = nnx.merge(spec.graphdef, params)
        out, z_BLZ, moe = model.forward_with_aux(
            x_t, objective.model_time(t), batch["y"], drop_key=drop_key, with_features=use_repa
        )
        loss = jnp.mean(objective.loss(out, x0, x_t, t, target))
        aux = {}
        if use_repa:
            z_target = encoder_apply(encoder_params, repa.clean_images(batch, x0))
            aux["repa_loss"] = jnp.mean(repa.alignment_loss(z_BLZ, z_target))
            loss = loss + cfg.repa.weight * aux["repa_loss"]
        if moe:  # DiT-MoE: load balance and router z-loss, averaged over the MoE blocks
            m = cfg.model
            loss = loss + m.moe_balance_weight * moe["balance_loss"] + m.moe_z_loss_weight * moe["z_loss"]
            aux.update({f"moe/{k}": v for k, v in moe.items()})
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(cfg.optim, state.step)
    ema = jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), state.ema, params)
    new = TrainState(state.step + 1, params, ema, opt_state)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": learning_rate(cfg.optim, cfg.total_steps)(state.step),
        "nonfinite": (~finite).astype(jnp.int32),
        **aux,
    }
    return new, metrics


def make_train_step(
    cfg: config_lib.Config,
    spec: ModelSpec,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    state_shardings: TrainState,
    encoder: repa.Encoder | None = None,
):
    """jit(train_step) with state sharded per the rules preset, the batch split over the
    data-parallel axes, metrics replicated, and the input state donated.

    Called as step(state, batch, encoder_params); encoder_params (REPA's frozen encoder, else
    None) are replicated."""
    apply = encoder.apply if encoder is not None else None
    step = functools.partial(train_step, cfg=cfg, spec=spec, tx=tx, encoder_apply=apply)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, mesh_lib.replicated(mesh)),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


class BuiltStep(NamedTuple):
    """What the train step is made of: model spec, optimizer, state shardings, the jitted step."""

    spec: ModelSpec
    tx: optax.GradientTransformation
    shardings: TrainState
    step_fn: Any


def build_train_step(
    cfg: config_lib.Config, mesh: jax.sharding.Mesh, encoder: repa.Encoder | None = None
) -> BuiltStep:
    """The train step for (config, mesh), built one way for the Trainer and for `dit_jax.plan`."""
    spec = model_spec(cfg)
    tx = state_lib.optimizer(cfg, spec)
    shardings = state_lib.state_shardings(cfg, spec, tx, mesh)
    return BuiltStep(spec, tx, shardings, make_train_step(cfg, spec, tx, mesh, shardings, encoder))


def global_batch(local_batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assembles process-local numpy batches into one global array per key, split over the
    data-parallel axes (each process contributes its own rows)."""
    sharding = mesh_lib.batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
