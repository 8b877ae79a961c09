"""Whole sampling runs: `dit_jax.diffusion.samplers.sample` with a DiT loaded from a diffusers folder
against PyTorch sampling loops driving diffusers' own DiTTransformer2DModel.

Same initial noise and labels on both sides, float32, classifier-free guidance on the doubled batch
[labels; null class] as in diffusers' DiTPipeline. The PyTorch references never call dit_jax:

  * DDIM (eta 0), 1000 steps, against diffusers' `DDIMScheduler` configured with DiT's linear betas.
    With fewer steps no DDIMScheduler spacing is ours: it always steps from t to
    t - num_train_timesteps // num_inference_steps, while ADM/DiT respacing (ours) steps between
    consecutive kept timesteps ~ round(i * 999 / (K - 1)); the two coincide only for K = 1000.
  * DDIM (eta 0) respaced to 25 steps, against a loop written from the DDIM update (Song et al.,
    eq. 12 with sigma = 0) on the timesteps of DDIMScheduler's "linspace" spacing (the same grid as
    ADM's respacing for this K, checked), with the guidance interval.
  * rectified-flow Euler and Heun loops written from the ODE x' = v(x, t), t from 1 (noise) to 0.

Each PyTorch loop runs twice, in float32 and in float64 (a float64 copy of the model, float64
schedule constants), and our float32 samples are judged by the float32 loop's own error
(tests/parity.py). The samplers carry the per-call float32 rounding forward, amplified alike on
both sides (DDIM's 1000 steps with an untrained eps model push samples to ~900).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.diffusion import make_objective, sample
from dit_jax.interop.diffusers_dit import load_diffusers_dit

torch = parity.optional("torch")
diffusers = parity.optional("diffusers")
pytestmark = parity.requires("torch", "diffusers")  # every test here runs PyTorch

NUM_CLASSES = 10
BATCH = 4
# As in test_diffusers_dit.py (the same model, whose float32 error is dominated by the timestep
# sinusoids at t ~ 1000): max |ours - ref64| / max |torch32 - ref64| measured up to 2.1 (Euler with
# time_scale 1000; at most 1.5 over 16 other random models and noises), hence 2.5.
MULTIPLE = 2.5
DIT_BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)


def _randomize(model, seed: int) -> None:
    """Every parameter (zero-initialised ones too) random, then all block embedders := block 0's."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            fan_in = int(np.prod(param.shape[1:])) if param.ndim > 1 else 100
            param.copy_(torch.randn(param.shape, generator=gen) * fan_in**-0.5)
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            for mine, theirs in zip(block.norm1.emb.parameters(), first.parameters(), strict=True):
                mine.copy_(theirs)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Thousands of tiny PyTorch calls: intra-op threads only add overhead (100x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """({float32: diffusers model, float64: a float64 copy}, our DiT loaded from the model's
    save_pretrained folder): learned sigma, 2 blocks."""
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_embeds_ada_norm=NUM_CLASSES,
    ).eval()
    _randomize(ref, seed=0)
    folder = tmp_path_factory.mktemp("diffusers_dit")
    ref.save_pretrained(folder)
    return {torch.float32: ref, torch.float64: parity.float64(ref)}, load_diffusers_dit(
        folder, attention_impl="xla"
    )


@pytest.fixture(scope="module")
def start():
    """(noise NCHW float32, labels): the same x_T and classes for both implementations."""
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((BATCH, 4, 8, 8)).astype(np.float32)
    return noise, np.array([0, 3, 7, 9])


def ours(model, objective_cfg: config_lib.Objective, sampler: config_lib.Sampler, noise_NCHW, y):
    """dit_jax's sampler, jitted, on NCHW noise; returns NCHW numpy."""
    graphdef, state = nnx.split(model)
    objective = make_objective(objective_cfg, model.cfg.learn_sigma)

    @jax.jit
    def run(state, noise, y):
        net = nnx.merge(graphdef, state)
        return sample(net, objective, sampler, jax.random.key(0), noise, y, null_label=model.cfg.num_classes)

    out = run(state, jnp.asarray(noise_NCHW.transpose(0, 2, 3, 1)), jnp.asarray(y, jnp.int32))
    return np.asarray(out).transpose(0, 3, 1, 2)


def torch_guided(ref, x, t_model: float, y, scale: float, guided: bool = True) -> torch.Tensor:
    """First-C-channel model output with classifier-free guidance (DiTPipeline's doubled batch)."""
    c = x.shape[1]
    with torch.no_grad():
        if not guided or scale == 1.0:
            t = torch.full((x.shape[0],), t_model, dtype=x.dtype)
            return ref(x, t, y).sample[:, :c]
        t = torch.full((2 * x.shape[0],), t_model, dtype=x.dtype)
        out = ref(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, NUM_CLASSES)])).sample[:, :c]
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)


def torch_runs(loop, refs: dict, noise_NCHW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32, float64) results of a PyTorch sampling loop `loop(model, x_T) -> x_0`."""
    return tuple(loop(refs[dtype], torch.from_numpy(noise_NCHW).to(dtype)).numpy() for dtype in refs)


def ddim_scheduler(dtype) -> diffusers.DDIMScheduler:
    """DiTPipeline-style DDIMScheduler (linear betas, eta 0, 1000 steps). diffusers keeps the
    schedule in float32; for the float64 run it is recomputed in float64 from the same formula."""
    sched = diffusers.DDIMScheduler(
        **DIT_BETAS,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    if dtype == torch.float64:
        sched.betas = torch.linspace(DIT_BETAS["beta_start"], DIT_BETAS["beta_end"], 1000, dtype=dtype)
        sched.alphas = 1.0 - sched.betas
        sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=dtype)
    sched.set_timesteps(1000)
    return sched


def test_ddim_cfg_1000_steps_matches_diffusers_ddim_scheduler(models, start):
    refs, model = models
    noise, y = start
    cfg_scale = 4.0
    y_t = torch.from_numpy(y)
    np.testing.assert_array_equal(ddim_scheduler(torch.float32).timesteps.numpy(), np.arange(999, -1, -1))

    def loop(ref, x):
        sched = ddim_scheduler(x.dtype)
        for t in sched.timesteps:
            eps = torch_guided(ref, x, float(t), y_t, cfg_scale)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x

    ref32, ref64 = torch_runs(loop, refs, noise)

    got = ours(
        model,
        config_lib.Objective(kind="ddpm", num_timesteps=1000, beta_start=1e-4, beta_end=0.02),
        config_lib.Sampler(kind="ddim", num_steps=1000, cfg_scale=cfg_scale, ddim_eta=0.0),
        noise,
        y,
    )
    parity.assert_parity("ddim 1000 steps vs DDIMScheduler", got, ref32, ref64, multiple=MULTIPLE)


def test_ddim_respaced_cfg_interval_matches_torch_ddim_loop(models, start):
    refs, model = models
    noise, y = start
    num_steps, cfg_scale, guidance_high = 25, 3.0, 0.6
    grid = diffusers.DDIMScheduler(**DIT_BETAS, timestep_spacing="linspace")
    grid.set_timesteps(num_steps)
    timesteps = grid.timesteps.numpy()  # 999, ..., 0
    # ADM's space_timesteps(1000, "25") keeps round(i * 999 / 24): the same grid.
    np.testing.assert_array_equal(timesteps[::-1], [round(i * 999 / 24) for i in range(num_steps)])

    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, 0).tolist()
    y_t = torch.from_numpy(y)

    def loop(ref, x):
        for i, t in enumerate(timesteps):
            a_t = abar[t]
            a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            eps = torch_guided(ref, x, float(t), y_t, cfg_scale, guided=t / 1000 <= guidance_high)
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return x

    ref32, ref64 = torch_runs(loop, refs, noise)

    got = ours(
        model,
        config_lib.Objective(kind="ddpm"),
        config_lib.Sampler(
            kind="ddim", num_steps=num_steps, cfg_scale=cfg_scale, guidance_high=guidance_high, ddim_eta=0.0
        ),
        noise,
        y,
    )
    parity.assert_parity(
        "ddim 25 steps, guidance t<=0.6, vs torch DDIM loop", got, ref32, ref64, multiple=MULTIPLE
    )


def _flow_grid(num_steps: int, shift: float) -> list[float]:
    s = np.linspace(1.0, 0.0, num_steps + 1)
    return list(shift * s / (1 + (shift - 1) * s))


@pytest.mark.parametrize(
    "kind,num_steps,shift,time_scale,direction,cfg_scale,guidance_high",
    [
        ("euler", 20, 1.0, 1000.0, "data_to_noise", 4.0, 1.0),
        ("heun", 8, 3.0, 1.0, "noise_to_data", 2.5, 0.7),
    ],
)
def test_flow_matches_torch_ode_loop(
    models, start, kind, num_steps, shift, time_scale, direction, cfg_scale, guidance_high
):
    """Euler; Heun (its last step, to t = 0, is Euler as in EDM) with SiT's time convention."""
    refs, model = models
    noise, y = start
    y_t = torch.from_numpy(y)
    sign = -1.0 if direction == "noise_to_data" else 1.0  # the network predicts data - noise
    grid = _flow_grid(num_steps, shift)

    def loop(ref, x):
        def velocity(x, t):
            t_model = time_scale * ((1.0 - t) if direction == "noise_to_data" else t)
            return sign * torch_guided(ref, x, t_model, y_t, cfg_scale, guided=t <= guidance_high)

        for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
            dt = t_next - t
            v = velocity(x, t)
            if kind == "euler" or i == num_steps - 1:
                x = x + dt * v
            else:
                x = x + dt * 0.5 * (v + velocity(x + dt * v, t_next))
        return x

    ref32, ref64 = torch_runs(loop, refs, noise)

    got = ours(
        model,
        config_lib.Objective(kind="flow", shift=shift, time_scale=time_scale, time_direction=direction),
        config_lib.Sampler(kind=kind, num_steps=num_steps, cfg_scale=cfg_scale, guidance_high=guidance_high),
        noise,
        y,
    )
    parity.assert_parity(f"flow {kind} {num_steps} steps vs torch loop", got, ref32, ref64, multiple=MULTIPLE)
