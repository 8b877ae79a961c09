"""dit_jax.diffusion against independent float64 numpy references (ADM / DiT formulas, closed forms)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from dit_jax import config
from dit_jax.diffusion import make_objective, objectives, sample, timesteps

SHAPE = (4, 4, 4, 3)  # B, H, W, C
NUM_CLASSES = 5  # labels 0..4, null label 5


def f64(a):
    return np.asarray(a, np.float64)


# ----------------------------------------------------------------------------- references (numpy float64)


def adm_schedule(betas):
    """ADM GaussianDiffusion.__init__, with alphas_cumprod as an explicit running product."""
    betas = f64(betas)
    ac, running = [], 1.0
    for b in betas:
        running *= 1.0 - b
        ac.append(running)
    ac = np.array(ac)
    acp = np.append(1.0, ac[:-1])
    pv = betas * (1.0 - acp) / (1.0 - ac)
    return dict(
        betas=betas,
        ac=ac,
        acp=acp,
        pv=pv,
        plvc=np.log(np.append(pv[1], pv[1:])),
        recip=np.sqrt(1.0 / ac),
        recipm1=np.sqrt(1.0 / ac - 1.0),
        c1=betas * np.sqrt(acp) / (1.0 - ac),
        c2=(1.0 - acp) * np.sqrt(1.0 - betas) / (1.0 - ac),
    )


def adm_space_timesteps(num_timesteps, section_counts):
    size_per, extra = num_timesteps // len(section_counts), num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken = 0.0, []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return set(all_steps)


def adm_spaced_betas(ac, use_timesteps):
    last, new_betas, timestep_map = 1.0, [], []
    for i, a in enumerate(ac):
        if i in use_timesteps:
            new_betas.append(1 - a / last)
            last = a
            timestep_map.append(i)
    return np.array(new_betas), np.array(timestep_map)


def adm_normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * np.exp(-logvar2)
    )


def adm_discretized_ll(x, means, log_scales):
    cdf = lambda z: 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))
    centered, inv = x - means, np.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv * (centered + 1 / 255)), cdf(inv * (centered - 1 / 255))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    log_delta = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    return np.where(x < -0.999, log_cdf_plus, np.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def adm_p_mean_variance(s, out, x, t, num_channels, clip=False):
    """ADM p_mean_variance (eps model, LEARNED_RANGE if 2C channels else FIXED_SMALL), t scalar or [B]."""
    e = lambda a: np.reshape(a[t], np.shape(t) + (1,) * (x.ndim - np.ndim(t)))
    eps = out[..., :num_channels]
    if out.shape[-1] == 2 * num_channels:
        frac = (out[..., num_channels:] + 1) / 2
        log_var = frac * e(np.log(s["betas"])) + (1 - frac) * e(s["plvc"])
    else:
        log_var = np.broadcast_to(e(s["plvc"]), x.shape)
    pred_x0 = e(s["recip"]) * x - e(s["recipm1"]) * eps
    pred_x0 = np.clip(pred_x0, -1, 1) if clip else pred_x0
    return e(s["c1"]) * pred_x0 + e(s["c2"]) * x, log_var, pred_x0


def adm_vb_bpd(s, out, x0, x_t, t, num_channels):
    e = lambda a: a[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    true_mean = e(s["c1"]) * x0 + e(s["c2"]) * x_t
    mean, log_var, _ = adm_p_mean_variance(s, out, x_t, t, num_channels)
    kl = adm_normal_kl(true_mean, e(s["plvc"]), mean, log_var).mean(axis=(1, 2, 3)) / np.log(2.0)
    nll = -adm_discretized_ll(x0, mean, 0.5 * log_var).mean(axis=(1, 2, 3)) / np.log(2.0)
    return np.where(t == 0, nll, kl)


def toy_model(xp, out_channels):
    """A nonlinear, label- and time-dependent network stand-in, in numpy or jax.numpy."""

    def model_fn(x, t_model, y):
        b = x.shape[0]
        reps = out_channels // x.shape[-1]
        xx = xp.concatenate([x] * reps, axis=-1)
        w = xp.asarray(np.linspace(0.5, 1.5, out_channels))
        t = xp.reshape(t_model, (b, 1, 1, 1)) / 1000.0
        yy = xp.reshape(y, (b, 1, 1, 1)) * 1.0
        return xp.tanh(w * xx + 0.7 * t - 0.3 * yy * w + 0.1)

    return model_fn


def guided_np(model_fn, x, t_model, y, w, use, num_channels, null_label=NUM_CLASSES):
    cond = model_fn(x, t_model, y)
    if w == 1.0 or not use:
        return cond
    uncond = model_fn(x, t_model, np.full_like(y, null_label))
    mixed = uncond[..., :num_channels] + w * (cond[..., :num_channels] - uncond[..., :num_channels])
    return np.concatenate([mixed, cond[..., num_channels:]], axis=-1)


def inputs(seed=0, shape=SHAPE):
    k1, k2 = jax.random.split(jax.random.key(seed))
    noise = jax.random.normal(k1, shape, jnp.float32)
    y = jax.random.randint(k2, (shape[0],), 0, NUM_CLASSES)
    return noise, y


# ----------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("t_sampling,shift", [("uniform", 1.0), ("uniform", 3.0), ("logit_normal", 2.0)])
def test_flow_time_distribution_matches_scipy(t_sampling, shift):
    cfg = config.Objective(t_sampling=t_sampling, logit_mean=0.3, logit_std=0.8, shift=shift)
    t = f64(jax.jit(timesteps.sample_flow_time, static_argnums=(1, 2))(jax.random.key(3), 20000, cfg))
    assert t.dtype == np.float64 and t.min() >= 0 and t.max() <= 1

    def cdf(t_shifted):  # invert the shift, then the base distribution's CDF
        t_base = t_shifted / (shift - (shift - 1.0) * t_shifted)
        if t_sampling == "uniform":
            return t_base
        return stats.norm.cdf((special.logit(t_base) - 0.3) / 0.8)

    assert stats.kstest(t, cdf).pvalue > 1e-3
    if shift != 1.0:  # the test has power: the unshifted distribution is rejected
        unshifted = functools.partial(lambda u, c: c(u / (shift + (1.0 - shift) * u)), c=cdf)
        assert stats.kstest(t, unshifted).pvalue < 1e-6


def test_shift_and_time_grid():
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(timesteps.shift_time(t, 3.0), 3 * t / (1 + 2 * t), rtol=1e-15)
    grid = timesteps.flow_time_grid(4, 3.0)
    np.testing.assert_allclose(grid, [1.0, 0.9, 0.75, 0.5, 0.0], rtol=1e-15, atol=1e-15)


def test_ddpm_schedule_matches_adm_and_bayes():
    betas = timesteps.linear_betas(1000, 1e-4, 0.02)
    np.testing.assert_allclose(betas[[0, 1, -1]], [1e-4, 1e-4 + 0.0199 / 999, 0.02], rtol=1e-14)
    s, ref = timesteps.ddpm_schedule(betas), adm_schedule(betas)
    pairs = dict(
        alphas_cumprod="ac",
        alphas_cumprod_prev="acp",
        posterior_variance="pv",
        posterior_log_variance_clipped="plvc",
        sqrt_recip_alphas_cumprod="recip",
        sqrt_recipm1_alphas_cumprod="recipm1",
        posterior_mean_coef1="c1",
        posterior_mean_coef2="c2",
    )
    for name, key in pairs.items():
        np.testing.assert_allclose(getattr(s, name), ref[key], rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(s.alphas_cumprod[-1], 4.0358e-5, rtol=1e-4)  # DiT's abar_T
    # q(x_{t-1} | x_t, x0) by Gaussian conditioning, for t >= 1.
    ab_prev, alpha = s.alphas_cumprod_prev[1:], 1 - betas[1:]
    var = 1 / (1 / (1 - ab_prev) + alpha / betas[1:])
    np.testing.assert_allclose(s.posterior_variance[1:], var, rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef1[1:], var * np.sqrt(ab_prev) / (1 - ab_prev), rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef2[1:], var * np.sqrt(alpha) / betas[1:], rtol=1e-10)


@pytest.mark.parametrize("num_timesteps,num_steps", [(1000, 250), (1000, 50), (1000, 7), (100, 100), (10, 1)])
def test_space_timesteps_and_respacing_match_adm(num_timesteps, num_steps):
    kept = timesteps.space_timesteps(num_timesteps, num_steps)
    ref_kept = adm_space_timesteps(num_timesteps, [num_steps])
    assert list(kept) == sorted(ref_kept)
    ac = adm_schedule(timesteps.linear_betas(num_timesteps, 1e-4, 0.02))["ac"]
    ref_betas, ref_map = adm_spaced_betas(ac, ref_kept)
    np.testing.assert_allclose(timesteps.respaced_betas(ac, kept), ref_betas, rtol=1e-12)
    np.testing.assert_array_equal(kept, ref_map)
    with pytest.raises(ValueError, match="num_steps"):
        timesteps.space_timesteps(num_timesteps, num_timesteps + 1)


# ----------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("t_sampling", ["uniform", "logit_normal"])
def test_flow_objective_identities(t_sampling):
    obj = make_objective(config.Objective(kind="flow", t_sampling=t_sampling, shift=2.0), learn_sigma=True)
    x0 = jax.random.uniform(jax.random.key(1), SHAPE, minval=-1, maxval=1)
    x_t, t, target = jax.jit(obj.sample)(jax.random.key(2), x0)
    assert t.shape == (SHAPE[0],) and t.dtype == jnp.float32 and x_t.dtype == jnp.float32
    eps = f64(target) + f64(x0)
    tb = f64(t)[:, None, None, None]
    np.testing.assert_allclose(f64(x_t), (1 - tb) * f64(x0) + tb * eps, atol=1e-6)
    np.testing.assert_allclose(f64(obj.model_time(t)), 1000 * f64(t), rtol=1e-6)
    # learn_sigma: the extra channels do not enter the flow loss.
    out = jax.random.normal(jax.random.key(3), SHAPE[:-1] + (6,), jnp.bfloat16)
    loss = jax.jit(obj.loss)(out, x0, x_t, t, target)
    assert loss.dtype == jnp.float32 and loss.shape == (SHAPE[0],)
    ref = ((f64(out.astype(jnp.float32))[..., :3] - f64(target)) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(f64(loss), ref, rtol=1e-5)
    np.testing.assert_array_equal(loss, jax.jit(obj.loss)(out.at[..., 3:].set(7.0), x0, x_t, t, target))


def test_noise_to_data_convention_objective():
    """SiT/LightningDiT: the network sees 1 - t (scaled) and regresses x0 - eps."""
    cfg = config.Objective(kind="flow", time_scale=1.0, time_direction="noise_to_data")
    obj = make_objective(cfg, learn_sigma=False)
    x0 = jax.random.uniform(jax.random.key(1), SHAPE, minval=-1, maxval=1)
    x_t, t, target = jax.jit(obj.sample)(jax.random.key(2), x0)
    eps = f64(x0) - f64(target)
    tb = f64(t)[:, None, None, None]
    np.testing.assert_allclose(f64(x_t), (1 - tb) * f64(x0) + tb * eps, atol=1e-6)
    np.testing.assert_allclose(f64(obj.model_time(t)), 1 - f64(t), atol=1e-7)
    np.testing.assert_allclose(f64(obj.velocity(target)), eps - f64(x0), atol=1e-6)


def test_velocity_cosine_loss_matches_numpy():
    cfg = config.Objective(kind="flow", velocity_cosine_weight=0.5)
    obj = make_objective(cfg, learn_sigma=False)
    x0 = jax.random.uniform(jax.random.key(1), SHAPE, minval=-1, maxval=1)
    x_t, t, target = obj.sample(jax.random.key(2), x0)
    out = jax.random.normal(jax.random.key(3), SHAPE)
    pred, tgt = f64(out), f64(target)
    cos = (pred * tgt).sum(-1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(tgt, axis=-1))
    ref = ((pred - tgt) ** 2).mean(axis=(1, 2, 3)) + 0.5 * (1 - cos).mean(axis=(1, 2))
    np.testing.assert_allclose(f64(jax.jit(obj.loss)(out, x0, x_t, t, target)), ref, rtol=1e-5)
    # A zero prediction (the zero-initialised final layer at step 0) has a finite gradient.
    grad = jax.grad(lambda o: obj.loss(o, x0, x_t, t, target).sum())(jnp.zeros(SHAPE))
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("kind", ["euler", "heun"])
def test_noise_to_data_sampler_matches_sit_ode(kind):
    """An independent loop in SiT's own convention: s = 0 noise -> s = 1 data, dx/ds = net(x, s)."""
    noise, y = inputs(3)
    w, num_steps = 2.0, 10
    cfg_obj = config.Objective(kind="flow", time_scale=1.0, time_direction="noise_to_data")
    got = run_sampler(
        make_objective(cfg_obj, learn_sigma=False),
        config.Sampler(kind=kind, num_steps=num_steps, cfg_scale=w),
        toy_model(jnp, 3),
        noise,
        y,
    )
    net = lambda x, s: guided_np(toy_model(np, 3), x, np.full(len(x), s), np.asarray(y), w, True, 3)
    x, grid = f64(noise), np.linspace(0.0, 1.0, num_steps + 1)
    for i in range(num_steps):
        h, d = grid[i + 1] - grid[i], net(x, grid[i])
        x = x + (
            h * 0.5 * (d + net(x + h * d, grid[i + 1])) if kind == "heun" and i < num_steps - 1 else h * d
        )
    np.testing.assert_allclose(got, x, atol=2e-5)


def test_ddpm_objective_identities():
    cfg = config.Objective(kind="ddpm", num_timesteps=10)
    obj, ref = make_objective(cfg, learn_sigma=False), adm_schedule(np.linspace(1e-4, 0.02, 10))
    x0 = jax.random.uniform(jax.random.key(1), (4000, 1, 1, 1), minval=-1, maxval=1)
    x_t, t, target = jax.jit(obj.sample)(jax.random.key(2), x0)
    assert t.dtype == jnp.int32 and obj.model_time(t).dtype == jnp.float32
    ab = ref["ac"][np.asarray(t)][:, None, None, None]
    np.testing.assert_allclose(f64(x_t), np.sqrt(ab) * f64(x0) + np.sqrt(1 - ab) * f64(target), atol=1e-6)
    counts = np.bincount(np.asarray(t), minlength=10)
    assert counts.sum() == 4000 and len(counts) == 10 and stats.chisquare(counts).pvalue > 1e-3
    loss = jax.jit(obj.loss)(jnp.zeros_like(x0), x0, x_t, t, target)
    np.testing.assert_allclose(f64(loss), (f64(target) ** 2).mean(axis=(1, 2, 3)), rtol=1e-6)


def test_kl_and_discretized_likelihood_match_adm():
    rng = np.random.default_rng(0)
    n = 4096
    x = np.concatenate([rng.integers(0, 256, n) / 127.5 - 1, rng.uniform(-1, 1, n)]).astype(np.float32)
    means = (x + rng.normal(0, 0.05, 2 * n)).astype(np.float32)
    log_scales = rng.uniform(np.log(1e-3), np.log(0.5), 2 * n).astype(np.float32)
    got = f64(objectives.discretized_gaussian_log_likelihood(x, means, log_scales))
    np.testing.assert_allclose(
        got, adm_discretized_ll(f64(x), f64(means), f64(log_scales)), rtol=2e-5, atol=1e-6
    )
    m1, m2, lv1, lv2 = rng.normal(size=(4, n)).astype(np.float32)
    got = f64(objectives.normal_kl(m1, lv1, m2, lv2))
    np.testing.assert_allclose(got, adm_normal_kl(f64(m1), f64(lv1), f64(m2), f64(lv2)), rtol=1e-5, atol=1e-7)


def test_hybrid_loss_matches_adm_vlb():
    num_t = 1000
    obj = make_objective(config.Objective(kind="ddpm", num_timesteps=num_t), learn_sigma=True)
    s = adm_schedule(np.linspace(1e-4, 0.02, num_t))
    k = jax.random.split(jax.random.key(0), 4)
    batch = 12
    x0 = jnp.round(jax.random.uniform(k[0], (batch, 4, 4, 3), minval=-1, maxval=1) * 127.5) / 127.5
    t = jnp.concatenate(
        [jnp.zeros(4, jnp.int32), jnp.array([1, 2, 10, 999]), jax.random.randint(k[1], (4,), 0, 1000)]
    )
    eps = jax.random.normal(k[2], x0.shape)
    ab = jnp.asarray(s["ac"], jnp.float32)[t][:, None, None, None]
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
    # Predictions near the truth at t = 0 (as a trained model), random elsewhere; v in [-1, 1].
    eps_pred = eps + 0.3 * jax.random.normal(k[3], x0.shape)
    v = jnp.tanh(jax.random.normal(k[1], x0.shape))
    out = jnp.concatenate([eps_pred, v], axis=-1)
    loss = jax.jit(obj.loss)(out, x0, x_t, t, eps)
    t_np = np.asarray(t)
    ref_vb = adm_vb_bpd(s, f64(out), f64(x0), f64(x_t), t_np, 3)
    ref_mse = ((f64(eps_pred) - f64(eps)) ** 2).mean(axis=(1, 2, 3))
    got_vb = f64(jax.jit(functools.partial(objectives.vlb_bits_per_dim, obj.schedule))(out, x0, x_t, t))
    np.testing.assert_allclose(got_vb, ref_vb, rtol=1e-5)
    np.testing.assert_allclose(f64(loss), ref_mse + ref_vb, rtol=1e-5)

    # The VLB term's gradient reaches only the variance channels (the mean part is stop_gradient).
    grad = jax.jit(jax.grad(lambda o: obj.loss(o, x0, x_t, t, eps).sum()))(out)
    grad_mse = jax.jit(jax.grad(lambda o: ((o[..., :3] - eps) ** 2).mean(axis=(1, 2, 3)).sum()))(out)
    np.testing.assert_allclose(f64(grad[..., :3]), f64(grad_mse[..., :3]), rtol=1e-6, atol=1e-9)
    assert np.abs(f64(grad[..., 3:])).min() > 0


# ----------------------------------------------------------------------------- samplers


def run_sampler(objective, cfg, model_fn, noise, y, key=None, **kw):
    key = jax.random.key(7) if key is None else key
    fn = jax.jit(sample, static_argnums=(0, 1, 2), static_argnames=("null_label", "clip_x0"))
    return f64(fn(model_fn, objective, cfg, key, noise, y, null_label=NUM_CLASSES, **kw))


def gaussian_velocity(mu, s):
    """Exact rectified-flow velocity for data ~ N(mu, s^2); its ODE maps noise z to mu + s z."""

    def model_fn(x, t_model, y):
        t = (t_model / 1000.0)[:, None, None, None]
        return -mu + (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * (x - (1 - t) * mu)

    return model_fn


def test_euler_and_heun_converge_with_orders_one_and_two():
    mu, s = 0.7, 0.5
    obj = make_objective(config.Objective(kind="flow"), learn_sigma=False)
    noise, y = inputs()
    exact = mu + s * f64(noise)
    steps = [8, 16, 32, 64]
    for kind, order in [("euler", 1.0), ("heun", 2.0)]:
        errors = []
        for k in steps:
            x0 = run_sampler(obj, config.Sampler(kind=kind, num_steps=k), gaussian_velocity(mu, s), noise, y)
            errors.append(np.abs(x0 - exact).max())
        observed = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
        np.testing.assert_allclose(observed, order, atol=0.15, err_msg=f"{kind}: errors {errors}")
    assert errors[-1] < 1e-3


def flow_reference(model_fn, kind, num_steps, shift, noise, y, w=1.0, low=0.0, high=1.0):
    x, c = f64(noise), noise.shape[-1]
    y = np.asarray(y)
    ts = np.linspace(1, 0, num_steps + 1)
    ts = shift * ts / (1 + (shift - 1) * ts)
    vel = lambda x, t: guided_np(model_fn, x, np.full(len(x), 1000 * t), y, w, low <= t <= high, c)[..., :c]
    for i in range(num_steps):
        h = ts[i + 1] - ts[i]
        d = vel(x, ts[i])
        if kind == "heun" and i < num_steps - 1:
            x = x + h * 0.5 * (d + vel(x + h * d, ts[i + 1]))
        else:
            x = x + h * d
    return x


@pytest.mark.parametrize(
    "kind,out_channels,w,low,high",
    [
        ("euler", 3, 1.0, 0.0, 1.0),
        ("heun", 6, 1.0, 0.0, 1.0),
        ("euler", 3, 4.0, 0.0, 1.0),
        ("heun", 3, 2.5, 0.2, 0.7),
    ],
)
def test_flow_samplers_match_numpy_loop(kind, out_channels, w, low, high):
    noise, y = inputs(1)
    obj = make_objective(config.Objective(kind="flow", shift=3.0), learn_sigma=out_channels == 6)
    cfg = config.Sampler(kind=kind, num_steps=12, cfg_scale=w, guidance_low=low, guidance_high=high)
    got = run_sampler(obj, cfg, toy_model(jnp, out_channels), noise, y)
    ref = flow_reference(toy_model(np, out_channels), kind, 12, 3.0, noise, y, w, low, high)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    if (low, high) != (0.0, 1.0):  # the interval matters: neither all-guided nor unguided
        for w_ref, lo_ref, hi_ref in [(w, 0.0, 1.0), (1.0, 0.0, 1.0)]:
            other = flow_reference(
                toy_model(np, out_channels), kind, 12, 3.0, noise, y, w_ref, lo_ref, hi_ref
            )
            assert np.abs(got - other).max() > 1e-2


def ddpm_reference(model_fn, kind, num_t, num_steps, noise, y, key, eta, w, low, high, clip):
    """ADM SpacedDiffusion p_sample_loop / ddim_sample_loop with the sampler's documented noise draws."""
    base = adm_schedule(np.linspace(1e-4, 0.02, num_t))
    betas, timestep_map = adm_spaced_betas(base["ac"], adm_space_timesteps(num_t, [num_steps]))
    s = adm_schedule(betas)
    x, c, y = f64(noise), noise.shape[-1], np.asarray(y)
    keys = jax.random.split(key, len(betas))
    for i, t in enumerate(range(len(betas) - 1, -1, -1)):
        orig_t = timestep_map[t]
        out = guided_np(model_fn, x, np.full(len(x), float(orig_t)), y, w, low <= orig_t / num_t <= high, c)
        mean, log_var, pred_x0 = adm_p_mean_variance(s, out, x, t, c, clip)
        z = f64(jax.random.normal(keys[i], x.shape, jnp.float32))
        if kind == "ddpm":
            x = mean + (t != 0) * np.exp(0.5 * log_var) * z
        else:
            eps = (s["recip"][t] * x - pred_x0) / s["recipm1"][t]
            ab, ab_prev = s["ac"][t], s["acp"][t]
            sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
            x = pred_x0 * np.sqrt(ab_prev) + np.sqrt(1 - ab_prev - sigma**2) * eps + (t != 0) * sigma * z
    return x


@pytest.mark.parametrize(
    "kind,out_channels,eta,w,low,high,clip",
    [
        ("ddpm", 3, 0.0, 1.0, 0.0, 1.0, False),
        ("ddpm", 6, 0.0, 3.0, 0.0, 1.0, False),
        ("ddpm", 6, 0.0, 3.0, 0.3, 0.8, True),
        ("ddim", 3, 0.0, 1.0, 0.0, 1.0, False),
        ("ddim", 3, 0.0, 1.0, 0.0, 1.0, True),
        ("ddim", 6, 0.5, 2.0, 0.0, 0.5, False),
    ],
)
def test_ddpm_samplers_match_numpy_loop(kind, out_channels, eta, w, low, high, clip):
    noise, y = inputs(2)
    key = jax.random.key(11)
    obj = make_objective(config.Objective(kind="ddpm", num_timesteps=200), learn_sigma=out_channels == 6)
    cfg = config.Sampler(
        kind=kind, num_steps=20, ddim_eta=eta, cfg_scale=w, guidance_low=low, guidance_high=high
    )
    got = run_sampler(obj, cfg, toy_model(jnp, out_channels), noise, y, key=key, clip_x0=clip)
    ref = ddpm_reference(toy_model(np, out_channels), kind, 200, 20, noise, y, key, eta, w, low, high, clip)
    if clip:  # clipping is active, and changes the result
        unclipped = ddpm_reference(
            toy_model(np, out_channels), kind, 200, 20, noise, y, key, eta, w, low, high, False
        )
        assert np.abs(ref - unclipped).max() > 1e-2
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)


def gaussian_eps_oracle(mu, s, num_t):
    """Exact E[eps | x_t] for data ~ N(mu, s^2) under DiT's linear schedule (model time = original t)."""
    ac = jnp.asarray(adm_schedule(np.linspace(1e-4, 0.02, num_t))["ac"], jnp.float32)

    def model_fn(x, t_model, y):
        ab = ac[t_model.astype(jnp.int32)][:, None, None, None]
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * s**2 + 1 - ab)

    return model_fn


def test_ddim_is_deterministic_and_converges_to_data_distribution():
    mu, s = 0.5, 0.4
    noise, y = inputs(3, shape=(16, 16, 16, 1))
    z = f64(noise).ravel()
    obj = make_objective(config.Objective(kind="ddpm"), learn_sigma=False)
    fits = {}
    for num_steps in [50, 250]:
        cfg = config.Sampler(kind="ddim", num_steps=num_steps)
        x0 = run_sampler(obj, cfg, gaussian_eps_oracle(mu, s, 1000), noise, y)
        # Deterministic: the output is an affine map of the noise, ideally mu + s z.
        again = run_sampler(obj, cfg, gaussian_eps_oracle(mu, s, 1000), noise, y, key=jax.random.key(99))
        np.testing.assert_array_equal(x0, again)
        (slope, intercept), residual, *_ = np.polyfit(z, x0.ravel(), 1, full=True)
        assert residual[0] < 1e-6 * len(z)
        fits[num_steps] = slope, intercept
    assert abs(fits[250][0] - s) < 0.01 and abs(fits[250][1] - mu) < 3e-3
    ratio = (fits[50][0] - s) / (fits[250][0] - s)  # first-order convergence in the number of steps
    assert 3.5 < ratio < 6.5, fits
    n = x0.size  # 4096 draws: standard errors s / 64 (mean), 1.1% (std)
    assert abs(x0.mean() - mu) < 4 * s / np.sqrt(n) and abs(x0.std() / s - 1) < 4 / np.sqrt(2 * n)


def test_ddpm_with_exact_reverse_kernel_samples_data_distribution_exactly():
    """For Gaussian data the exact reverse conditional q(x_{t-1} | x_t) is Gaussian: an oracle for the
    mean (eps) and the learned-range variance makes ancestral sampling exact for any number of steps."""
    mu, s, num_t, num_steps = 0.5, 0.4, 1000, 20
    base = adm_schedule(np.linspace(1e-4, 0.02, num_t))
    betas, timestep_map = adm_spaced_betas(base["ac"], adm_space_timesteps(num_t, [num_steps]))
    sp = adm_schedule(betas)
    ab = base["ac"][timestep_map]
    var_x0 = s**2 * (1 - ab) / (ab * s**2 + 1 - ab)  # Var[x0 | x_t]
    log_var = np.log(sp["pv"] + sp["c1"] ** 2 * var_x0)
    min_log, max_log = sp["plvc"], np.log(betas)
    v = 2 * (log_var - min_log) / (max_log - min_log) - 1
    assert np.all(np.abs(v[1:]) <= 1)  # inside the learned range (t = 0 adds no noise)
    v_table = np.zeros(num_t)
    v_table[timestep_map] = np.clip(v, -1, 1)
    eps_oracle, v_table = gaussian_eps_oracle(mu, s, num_t), jnp.asarray(v_table, jnp.float32)

    def model_fn(x, t_model, y):
        v_B = v_table[t_model.astype(jnp.int32)][:, None, None, None]
        return jnp.concatenate([eps_oracle(x, t_model, y), jnp.broadcast_to(v_B, x.shape)], axis=-1)

    noise, y = inputs(3, shape=(32, 32, 32, 1))
    obj = make_objective(config.Objective(kind="ddpm", num_timesteps=num_t), learn_sigma=True)
    cfg = config.Sampler(kind="ddpm", num_steps=num_steps)
    x0 = run_sampler(obj, cfg, model_fn, noise, y)
    n = x0.size  # 32768 draws: standard errors s / 181 (mean), 0.4% (std)
    assert abs(x0.mean() - mu) < 4 * s / np.sqrt(n) and abs(x0.std() / s - 1) < 4 / np.sqrt(2 * n)
    assert stats.kstest((x0.ravel() - mu) / s, "norm").pvalue > 1e-3
    # The fixed (posterior) variance drops coef1^2 Var[x0 | x_t]: visibly under-dispersed at 20 steps.
    x0_fixed = run_sampler(make_objective(obj.cfg, False), cfg, eps_oracle, noise, y)
    assert x0_fixed.std() / s < 0.95


def test_cfg_combines_model_halves_exactly():
    """One Euler step from t = 1 exposes the guided output: x0 = noise - v."""
    noise, y = inputs(4)
    obj = make_objective(config.Objective(kind="flow"), learn_sigma=False)
    model = toy_model(np, 3)
    t_model = np.full(len(y), 1000.0)
    cond, uncond = model(f64(noise), t_model, np.asarray(y)), model(f64(noise), t_model, np.full(len(y), 5))
    for w in [1.0, 0.0, 4.0]:
        cfg = config.Sampler(kind="euler", num_steps=1, cfg_scale=w)
        got = run_sampler(obj, cfg, toy_model(jnp, 3), noise, y)
        np.testing.assert_allclose(f64(noise) - got, uncond + w * (cond - uncond), atol=1e-6)
    # Guidance interval excluding t = 1: the conditional model only, even at w = 4.
    cfg = config.Sampler(kind="euler", num_steps=1, cfg_scale=4.0, guidance_high=0.9)
    np.testing.assert_allclose(
        f64(noise) - run_sampler(obj, cfg, toy_model(jnp, 3), noise, y), cond, atol=1e-6
    )


def test_jit_traces_once_and_mismatches_raise():
    noise, y = inputs(5)
    obj = make_objective(config.Objective(kind="ddpm", num_timesteps=50), learn_sigma=True)
    cfg = config.Sampler(kind="ddpm", num_steps=5, cfg_scale=2.0, guidance_high=0.5)
    traces = []

    @jax.jit
    def draw(key, noise, y):
        traces.append(1)
        return sample(toy_model(jnp, 6), obj, cfg, key, noise, y, null_label=NUM_CLASSES)

    a = draw(jax.random.key(0), noise, y)
    b = draw(jax.random.key(1), noise + 1, (y + 1) % NUM_CLASSES)
    assert len(traces) == 1 and a.shape == noise.shape and not np.allclose(a, b)
    bad = functools.partial(sample, toy_model(jnp, 3), key=jax.random.key(0), noise=noise, y=y, null_label=5)
    with pytest.raises(ValueError, match="flow objective"):
        bad(obj, config.Sampler(kind="euler"))
    with pytest.raises(ValueError, match="num_steps"):
        bad(obj, config.Sampler(kind="ddim", num_steps=51))
    with pytest.raises(ValueError, match="ddpm objective"):
        bad(make_objective(config.Objective(), False), config.Sampler(kind="ddpm"))
