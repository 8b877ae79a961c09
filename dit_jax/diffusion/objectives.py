"""Training objectives: what to noise, what to predict, and the per-example loss.

kind="flow" (rectified flow): x_t = (1 - t) x0 + t eps, target v = eps - x0, t in [0, 1], the
network sees time_scale * t (1000 by default). With time_direction "noise_to_data" (SiT's
convention) the network sees time_scale * (1 - t) and its target is x0 - eps = -v. With
learn_sigma the extra output channels are ignored by the loss (a flow model has no variance to
learn; they are kept only so that one backbone serves both objectives).

kind="ddpm": integer t in [0, T), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps, the
network sees t as a float. With learn_sigma the loss is ADM's hybrid objective (LossType.MSE with
ModelVarType.LEARNED_RANGE): MSE on eps plus the variational bound term in bits per dimension,
whose gradient reaches only the variance channels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import config
from dit_jax.diffusion import timesteps
from dit_jax.diffusion.timesteps import DDPMSchedule, extract

_LOG2 = float(np.log(2.0))
_LOG_CDF_FLOOR = float(np.log(1e-12))


def _batch_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _bcast(t_B: jax.Array, ndim: int) -> jax.Array:
    return t_B.reshape(t_B.shape + (1,) * (ndim - t_B.ndim))


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (ADM `normal_kl`).

    Written with expm1 so that nearly equal variances do not cancel catastrophically in float32.
    """
    dlogvar = logvar1 - logvar2
    return 0.5 * (jnp.expm1(dlogvar) - dlogvar + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_sigmoid_2(a: jax.Array) -> jax.Array:
    """log(0.5 (1 + tanh(a))) = log sigmoid(2a), without cancellation."""
    return -jax.nn.softplus(-2.0 * a)


def _log_cosh(a: jax.Array) -> jax.Array:
    a = jnp.abs(a)
    return a + jnp.log1p(jnp.exp(-2.0 * a)) - _LOG2


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """Elementwise log-likelihood (nats) of data in [-1, 1] quantised to 8 bits (ADM, same formula).

    ADM's tanh approximation of the normal CDF, Phi(z) ~ 0.5 (1 + tanh(u(z))), evaluated in log
    space: Phi(b) - Phi(a) = 0.5 sinh(u_b - u_a) / (cosh u_a cosh u_b), so bins far in the tails
    keep float32 precision. Log-probabilities are floored at log(1e-12) as ADM's clamp does.
    """
    u = lambda z: np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    u_plus = u(inv_std * (centered + 1.0 / 255.0))
    u_min = u(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = _log_sigmoid_2(u_plus)
    log_one_minus_cdf_min = _log_sigmoid_2(-u_min)
    d = u_plus - u_min  # > 0: u is increasing
    log_sinh_d = d + jnp.log(-jnp.expm1(-2.0 * d)) - _LOG2
    log_delta = np.log(0.5) + log_sinh_d - _log_cosh(u_plus) - _log_cosh(u_min)
    log_probs = jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return jnp.maximum(log_probs, _LOG_CDF_FLOOR)


def ddpm_mean_logvar(
    schedule: DDPMSchedule, model_out: jax.Array, x_t: jax.Array, t: jax.Array, *, clip_x0: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """ADM `p_mean_variance` for an eps-predicting model: (mean, log_variance, pred_x0, eps), float32.

    `t` (scalar or [B]) indexes `schedule`. If `model_out` has twice the channels of `x_t`, the
    extra channels v in [-1, 1] interpolate the log variance between the clipped posterior
    variance (v = -1) and beta (v = 1) (LEARNED_RANGE); otherwise the variance is the fixed
    posterior variance (ADM's FIXED_SMALL).
    """
    num_channels = x_t.shape[-1]
    model_out = model_out.astype(jnp.float32)
    x_t = x_t.astype(jnp.float32)
    eps = model_out[..., :num_channels]
    min_log = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
    if model_out.shape[-1] == 2 * num_channels:
        max_log = extract(schedule.log_betas, t, x_t.ndim)
        frac = (model_out[..., num_channels:] + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
    elif model_out.shape[-1] == num_channels:
        log_var = jnp.broadcast_to(min_log, x_t.shape)
    else:
        raise ValueError(f"model output has {model_out.shape[-1]} channels; expected {num_channels} or 2x")
    pred_x0 = (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        eps = (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_x0) / extract(
            schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
        )
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t.ndim) * pred_x0
        + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    return mean, log_var, pred_x0, eps


def vlb_bits_per_dim(
    schedule: DDPMSchedule, model_out: jax.Array, x0: jax.Array, x_t: jax.Array, t_B: jax.Array
) -> jax.Array:
    """ADM `_vb_terms_bpd` with the model mean frozen (stop_gradient): f32 [B], bits per dimension.

    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, decoder NLL of x0 at t = 0.
    """
    num_channels = x0.shape[-1]
    model_out = model_out.astype(jnp.float32)
    x0 = x0.astype(jnp.float32)
    frozen = jnp.concatenate(
        [jax.lax.stop_gradient(model_out[..., :num_channels]), model_out[..., num_channels:]], axis=-1
    )
    mean, log_var, pred_x0, _ = ddpm_mean_logvar(schedule, frozen, x_t, t_B)
    true_log_var = extract(schedule.posterior_log_variance_clipped, t_B, x0.ndim)
    # true_mean - mean = coef1 (x0 - pred_x0): the coef2 x_t parts cancel exactly.
    mean_diff = extract(schedule.posterior_mean_coef1, t_B, x0.ndim) * (x0 - pred_x0)
    kl = normal_kl(mean_diff, true_log_var, 0.0, log_var)
    nll = -discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_var)
    return jnp.where(t_B == 0, _batch_mean(nll), _batch_mean(kl)) / _LOG2


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Cosine similarity over the last axis, as torch.nn.functional.cosine_similarity:
    a.b / max(|a| |b|, eps). Written without a norm's square root at 0, so that the gradient of
    a zero prediction (a zero-initialised output layer) is finite."""
    squared = jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1)
    return jnp.sum(a * b, axis=-1) * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective; hashable, so it can be a static argument of jit."""

    cfg: config.Objective
    learn_sigma: bool = False

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def schedule(self) -> DDPMSchedule:
        """The float64 DDPM schedule (kind "ddpm" only); cheap, recomputed on each use."""
        if self.kind != "ddpm":
            raise ValueError("only the 'ddpm' objective has a beta schedule")
        return timesteps.ddpm_schedule_from_config(self.cfg)

    def sample(self, key: jax.Array, x0: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(x_t, t_B, target) for clean data x0 [B, ...]; float32 except ddpm's int32 t_B."""
        x0 = x0.astype(jnp.float32)
        batch_size = x0.shape[0]
        key_t, key_eps = jax.random.split(key)
        eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
        if self.kind == "flow":
            t_B = timesteps.sample_flow_time(key_t, batch_size, self.cfg)
            t = _bcast(t_B, x0.ndim)
            return (1.0 - t) * x0 + t * eps, t_B, self._velocity_sign * (eps - x0)
        schedule = self.schedule
        t_B = jax.random.randint(key_t, (batch_size,), 0, schedule.num_timesteps, jnp.int32)
        x_t = (
            extract(schedule.sqrt_alphas_cumprod, t_B, x0.ndim) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t_B, x0.ndim) * eps
        )
        return x_t, t_B, eps

    @property
    def _velocity_sign(self) -> float:
        """+1 if the network predicts dx_t/dt = eps - x0, -1 if it predicts x0 - eps (noise_to_data)."""
        return -1.0 if self.cfg.time_direction == "noise_to_data" else 1.0

    def model_time(self, t_B: jax.Array) -> jax.Array:
        """The timestep the network's embedder receives, f32 [B].

        flow: time_scale * t, or time_scale * (1 - t) for "noise_to_data"; ddpm: the integer t.
        """
        t_B = t_B.astype(jnp.float32)
        if self.kind == "flow":
            if self.cfg.time_direction == "noise_to_data":
                t_B = 1.0 - t_B
            return self.cfg.time_scale * t_B
        return t_B

    def velocity(self, model_out: jax.Array) -> jax.Array:
        """Flow only: dx_t/dt (t = 0 data, t = 1 noise) from the network's first C output channels."""
        return self._velocity_sign * model_out.astype(jnp.float32)

    def loss(
        self, model_out: jax.Array, x0: jax.Array, x_t: jax.Array, t_B: jax.Array, target: jax.Array
    ) -> jax.Array:
        """Per-example loss, f32 [B]: MSE of the first C output channels (+ ddpm VLB with learn_sigma)."""
        num_channels = x0.shape[-1]
        if model_out.shape[-1] != (2 if self.learn_sigma else 1) * num_channels:
            raise ValueError(
                f"model output has {model_out.shape[-1]} channels; expected "
                f"{(2 if self.learn_sigma else 1) * num_channels} (learn_sigma={self.learn_sigma})"
            )
        model_out = model_out.astype(jnp.float32)
        pred, target = model_out[..., :num_channels], target.astype(jnp.float32)
        mse = _batch_mean(jnp.square(target - pred))
        if self.kind == "flow" and self.cfg.velocity_cosine_weight > 0:
            return mse + self.cfg.velocity_cosine_weight * _batch_mean(1.0 - cosine_similarity(pred, target))
        if self.kind == "ddpm" and self.learn_sigma:
            return mse + vlb_bits_per_dim(self.schedule, model_out, x0, x_t.astype(jnp.float32), t_B)
        return mse


def make_objective(cfg: config.Objective, learn_sigma: bool) -> Objective:
    if cfg.kind not in ("flow", "ddpm"):
        raise ValueError(f"unknown objective kind {cfg.kind!r}; expected 'flow' or 'ddpm'")
    return Objective(cfg=cfg, learn_sigma=bool(learn_sigma))
