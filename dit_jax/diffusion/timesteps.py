"""Training-time distributions and noise schedules.

Flow matching: t in [0, 1] (t = 0 is data), drawn uniform or logit-normal (SD3), then shifted with
t' = shift t / (1 + (shift - 1) t); the sampling grid uses the same shift.

DDPM: DiT's linear beta schedule and the derived quantities of ADM's `GaussianDiffusion`, computed
in float64 numpy on the host (they become float32 constants when indexed under jit), plus ADM's
`space_timesteps` respacing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import config


def shift_time(t, shift: float):
    """SD3 time shift; maps [0, 1] onto itself (0 -> 0, 1 -> 1), shift > 1 moves mass towards noise.

    Works on numpy and jax arrays alike (plain arithmetic, keeps the input dtype).
    """
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_flow_time(key: jax.Array, batch_size: int, cfg: config.Objective) -> jax.Array:
    """Draws flow times t_B (float32, in [0, 1]) according to `cfg.t_sampling` and `cfg.shift`."""
    if cfg.t_sampling == "uniform":
        t_B = jax.random.uniform(key, (batch_size,), jnp.float32)
    elif cfg.t_sampling == "logit_normal":
        z_B = jax.random.normal(key, (batch_size,), jnp.float32)
        t_B = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * z_B)
    else:
        raise ValueError(f"unknown t_sampling {cfg.t_sampling!r}; expected 'uniform' or 'logit_normal'")
    return shift_time(t_B, cfg.shift)


def flow_time_grid(num_steps: int, shift: float) -> np.ndarray:
    """Sampling grid, float64 [num_steps + 1], from t = 1 (noise) down to t = 0 (data), shifted."""
    return shift_time(np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64), shift)


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """DiT's `get_beta_schedule("linear", ...)`: float64 linspace, no rescaling by 1000 / T."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


class DDPMSchedule(NamedTuple):
    """ADM's per-timestep quantities, float64 numpy arrays of shape [T]."""

    betas: np.ndarray
    log_betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)


def ddpm_schedule(betas: np.ndarray) -> DDPMSchedule:
    """Derived quantities of ADM `GaussianDiffusion.__init__` for the given betas (float64)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must be a 1-D array with values in (0, 1]")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    if len(betas) > 1:
        # The posterior variance is 0 at t = 0; ADM clips the log by repeating the t = 1 value.
        log_var_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    else:
        # A single (respaced) step only ever runs at t = 0, where no noise is added.
        log_var_clipped = np.log(betas)
    return DDPMSchedule(
        betas=betas,
        log_betas=np.log(betas),
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=log_var_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )


def ddpm_schedule_from_config(cfg: config.Objective) -> DDPMSchedule:
    return ddpm_schedule(linear_betas(cfg.num_timesteps, cfg.beta_start, cfg.beta_end))


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """ADM `space_timesteps(num_timesteps, [num_steps])`: the kept original timesteps, ascending.

    Reproduces ADM exactly, including its float accumulation of the stride and Python's rounding.
    """
    if not 0 < num_steps <= num_timesteps:
        raise ValueError(
            f"cannot respace {num_timesteps} diffusion steps into {num_steps}; "
            f"choose 1 <= sampler.num_steps <= {num_timesteps}"
        )
    frac_stride = 1 if num_steps <= 1 else (num_timesteps - 1) / (num_steps - 1)
    cur_idx, taken = 0.0, []
    for _ in range(num_steps):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return np.array(sorted(set(taken)), dtype=np.int64)


def respaced_betas(alphas_cumprod: np.ndarray, use_timesteps: np.ndarray) -> np.ndarray:
    """ADM `SpacedDiffusion`: betas of the sub-chain that keeps only `use_timesteps` (ascending)."""
    kept = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(use_timesteps)]
    prev = np.append(1.0, kept[:-1])
    return 1.0 - kept / prev


def extract(values: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """values[t] as float32, reshaped to broadcast against an array of rank `ndim` (t scalar or [B])."""
    v = jnp.asarray(values, jnp.float32)[t]
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))
