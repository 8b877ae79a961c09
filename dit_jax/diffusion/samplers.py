"""Samplers: Euler / Heun (flow ODE), DDPM ancestral and DDIM (respaced), with classifier-free guidance.

Everything runs under jit: the step loop is a `lax.scan`, the time grid, the respaced schedule and
the per-step guidance switch are computed on the host in float64 from the static `cfg`/`objective`.

Randomness: the flow samplers are deterministic (`key` unused). DDPM (and DDIM with eta > 0) draw
the noise of step i (i = 0 is the noisiest step) as
`jax.random.normal(jax.random.split(key, num_steps)[i], noise.shape, jnp.float32)`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import config
from dit_jax.diffusion import timesteps
from dit_jax.diffusion.objectives import Objective, ddpm_mean_logvar

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# (x, t_model [B], guided?) -> model output, float32, guidance already applied.
_GuidedFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _in_interval(s: np.ndarray, cfg: config.Sampler) -> np.ndarray:
    """Host-side guidance switch per noise level s in [0, 1] (float64 comparisons)."""
    return (s >= cfg.guidance_low) & (s <= cfg.guidance_high)


def _guided_model(model_fn: ModelFn, cfg: config.Sampler, y: jax.Array, null_label: int, num_channels: int):
    """Wraps model_fn with classifier-free guidance; returns fn(x, t_model_B, use_guidance)."""
    cond_only = lambda x, t_model: model_fn(x, t_model, y).astype(jnp.float32)
    if cfg.cfg_scale == 1.0:
        return lambda x, t_model, use_guidance: cond_only(x, t_model)
    y_2B = jnp.concatenate([y, jnp.full_like(y, null_label)], axis=0)

    def guided(x, t_model):
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t_model, t_model]), y_2B)
        cond, uncond = jnp.split(out.astype(jnp.float32), 2, axis=0)
        mixed = uncond[..., :num_channels] + cfg.cfg_scale * (
            cond[..., :num_channels] - uncond[..., :num_channels]
        )
        return jnp.concatenate([mixed, cond[..., num_channels:]], axis=-1)

    if cfg.guidance_low <= 0.0 and cfg.guidance_high >= 1.0:
        return lambda x, t_model, use_guidance: guided(x, t_model)
    # lax.cond, not a select: outside the interval only the conditional half is evaluated.
    return lambda x, t_model, use_guidance: jax.lax.cond(use_guidance, guided, cond_only, x, t_model)


def _flow_sample(guided_fn: _GuidedFn, objective: Objective, cfg: config.Sampler, x: jax.Array) -> jax.Array:
    grid = timesteps.flow_time_grid(cfg.num_steps, objective.cfg.shift)  # 1 -> 0, float64
    use_guidance = _in_interval(grid, cfg)
    num_channels, batch_size = x.shape[-1], x.shape[0]

    def velocity(x, t, use):
        t_model = objective.model_time(jnp.full((batch_size,), t, jnp.float32))
        return objective.velocity(guided_fn(x, t_model, use)[..., :num_channels])

    def euler_step(x, step):
        t_cur, t_next, use_cur = step[:3]
        return x + (t_next - t_cur) * velocity(x, t_cur, use_cur), None

    def heun_step(x, step):
        t_cur, t_next, use_cur, use_next = step
        v_cur = velocity(x, t_cur, use_cur)
        x_euler = x + (t_next - t_cur) * v_cur
        v_next = velocity(x_euler, t_next, use_next)
        return x + (t_next - t_cur) * 0.5 * (v_cur + v_next), None

    f32 = lambda a: jnp.asarray(a, jnp.float32)
    steps = (f32(grid[:-1]), f32(grid[1:]), jnp.asarray(use_guidance[:-1]), jnp.asarray(use_guidance[1:]))
    if cfg.kind == "euler":
        return jax.lax.scan(euler_step, x, steps)[0]
    # Heun for all but the last step; the last one (to t = 0) is Euler, as in EDM.
    x = jax.lax.scan(heun_step, x, tuple(s[:-1] for s in steps))[0]
    return euler_step(x, tuple(s[-1] for s in steps))[0]


def _ddpm_sample(
    guided_fn: _GuidedFn,
    objective: Objective,
    cfg: config.Sampler,
    key: jax.Array,
    x: jax.Array,
    clip_x0: bool,
) -> jax.Array:
    base = objective.schedule
    use_timesteps = timesteps.space_timesteps(base.num_timesteps, cfg.num_steps)
    schedule = timesteps.ddpm_schedule(timesteps.respaced_betas(base.alphas_cumprod, use_timesteps))
    num_steps = schedule.num_timesteps
    t_idx = np.arange(num_steps)[::-1]  # respaced indices, noisiest first
    use_guidance = _in_interval(use_timesteps[t_idx] / base.num_timesteps, cfg)
    # DDIM sigma and direction coefficient, per respaced index (ADM `ddim_sample`), in float64.
    abar, abar_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    sigma = cfg.ddim_eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    dir_coef = np.sqrt(np.maximum(1 - abar_prev - sigma**2, 0.0))
    draws_noise = cfg.kind == "ddpm" or cfg.ddim_eta > 0
    batch_size = x.shape[0]

    def step(x, inputs):
        t, step_key, use = inputs
        t_model = objective.model_time(jnp.full((batch_size,), jnp.asarray(use_timesteps)[t]))
        out = guided_fn(x, t_model, use)
        mean, log_var, pred_x0, eps = ddpm_mean_logvar(schedule, out, x, t, clip_x0=clip_x0)
        noise = jax.random.normal(step_key, x.shape, jnp.float32) if draws_noise else 0.0
        if cfg.kind == "ddpm":
            std = jnp.exp(0.5 * log_var)
        else:
            mean = pred_x0 * timesteps.extract(np.sqrt(abar_prev), t, x.ndim) + eps * timesteps.extract(
                dir_coef, t, x.ndim
            )
            std = timesteps.extract(sigma, t, x.ndim)
        return (mean + jnp.where(t > 0, std * noise, 0.0) if draws_noise else mean), None

    inputs = (jnp.asarray(t_idx, jnp.int32), jax.random.split(key, num_steps), jnp.asarray(use_guidance))
    return jax.lax.scan(step, x, inputs)[0]


def sample(
    model_fn: ModelFn,
    objective: Objective,
    cfg: config.Sampler,
    key: jax.Array,
    noise: jax.Array,
    y: jax.Array,
    *,
    null_label: int,
    clip_x0: bool = False,
) -> jax.Array:
    """Draws x0 (float32, shape of `noise`) starting from x_T = `noise` ~ N(0, 1).

    model_fn(x, t_model_B, y) -> raw network output with C or 2C channels (C = noise channels);
    t_model is `objective.model_time(...)`. With cfg.cfg_scale != 1 the model is called on the
    doubled batch [y; null_label] and the first C channels are guided while the noise level
    (flow: t; ddpm: t / num_timesteps) lies in [guidance_low, guidance_high]. `clip_x0` clips the
    predicted x0 to [-1, 1] in the ddpm/ddim samplers (off by default: latents are unbounded).
    `model_fn`, `objective`, `cfg`, `null_label` and `clip_x0` must be static under jit.
    """
    x = noise.astype(jnp.float32)
    guided_fn = _guided_model(model_fn, cfg, y, null_label, x.shape[-1])
    if cfg.kind in ("euler", "heun"):
        if objective.kind != "flow":
            raise ValueError(f"sampler {cfg.kind!r} needs the flow objective; use ddpm or ddim")
        return _flow_sample(guided_fn, objective, cfg, x)
    if cfg.kind in ("ddpm", "ddim"):
        if objective.kind != "ddpm":
            raise ValueError(f"sampler {cfg.kind!r} needs the ddpm objective; use euler or heun")
        return _ddpm_sample(guided_fn, objective, cfg, key, x, clip_x0)
    raise ValueError(f"unknown sampler {cfg.kind!r}; expected euler, heun, ddpm or ddim")
