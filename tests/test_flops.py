"""Compute accounting (dit_jax.flops) against XLA's cost analysis of the compiled programs, the
attention mask's density against a closed form, and the FLOPs / images totals in metrics.jsonl
(also across a resume that changes the batch size)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax import flops
from dit_jax.config_files import load
from dit_jax.models import dinov2
from dit_jax.models.build import model_spec
from dit_jax.train import loop
from dit_jax.train.step import build_train_step

BATCH = 4


def cost_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def dit_config(**model):
    base = load("configs/dit.py:variant=S/2,smoke")
    m = dataclasses.replace(base.model, image_size=32, in_channels=4, hidden_size=128, depth=2, num_heads=4)
    return dataclasses.replace(
        base,
        model=dataclasses.replace(m, **model),
        data=dataclasses.replace(base.data, image_size=32),
        attention=dataclasses.replace(base.attention, impl="xla"),
        batch_size=BATCH,
    )


def xla_forward_flops(cfg) -> float:
    spec, m = model_spec(cfg), cfg.model
    x = jax.ShapeDtypeStruct((BATCH, m.image_size, m.image_size, m.in_channels), jnp.float32)
    t, y = jax.ShapeDtypeStruct((BATCH,), jnp.float32), jax.ShapeDtypeStruct((BATCH,), jnp.int32)
    forward = lambda p, x, t, y: nnx.merge(spec.graphdef, p)(x, t, y)
    return cost_flops(forward, spec.abstract_params, x, t, y) / BATCH


@pytest.mark.parametrize(
    "model",
    [{}, dict(mlp="swiglu", norm="rmsnorm", qk_norm=True, rope=True), dict(learn_sigma=True, patch_size=4)],
    ids=["dit", "lightningdit", "sigma_p4"],
)
def test_dense_forward_matches_xla_within_5_percent(model):
    cfg = dit_config(**model)
    analytic, xla = flops.dit_forward_flops(cfg), xla_forward_flops(cfg)
    assert 1.0 <= xla / analytic < 1.05  # XLA adds softmax, norms and activations


def test_moe_counts_active_experts():
    """Analytic: the router and k routed (+ shared) experts per token. On CPU, jax.lax.ragged_dot
    runs every routed row through all E experts (a masked dense matmul), so XLA counts the routed
    experts E times; everything else must agree within 5%."""
    cfg = dit_config(num_experts=4, experts_per_token=2, shared_experts=1, moe_every=2)
    m = cfg.model
    routed = m.experts_per_token * flops.mlp_flops(m.num_patches, m.hidden_size, m.mlp_hidden_size, m.mlp)
    analytic = flops.dit_forward_flops(cfg)
    dense = flops.dit_forward_flops(dit_config())
    assert analytic == pytest.approx(dense + routed + 2 * m.num_patches * m.hidden_size * m.num_experts)
    xla = xla_forward_flops(cfg)
    assert 1.0 <= xla / (analytic + (m.num_experts - 1) * routed) < 1.05


def test_repa_projector_and_train_step_match_xla():
    cfg = dit_config(repa_depth=1, repa_projector_dim=256, repa_feature_dim=64)
    cfg = dataclasses.replace(cfg, repa=dataclasses.replace(cfg.repa, weight=0.5))
    m = cfg.model
    w, z = m.repa_projector_dim, m.repa_feature_dim
    projector = 2 * m.num_patches * (m.hidden_size * w + w * w + w * z)
    assert flops.dit_forward_flops(cfg) == flops.dit_forward_flops(cfg, with_projector=False) + projector
    # The train step without REPA: 3 forward passes (+ optimizer and loss, < 5%).
    plain = dit_config()
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    plain = dataclasses.replace(plain, mesh=dataclasses.replace(plain.mesh, data=1))
    built = build_train_step(plain, mesh)
    from dit_jax import plan

    state = plan.abstract_state(plain, built)
    batch = plan.abstract_batch(plain, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with jax.set_mesh(mesh):
        xla = built.step_fn.lower(state, batch, None).compile().cost_analysis()
    xla = (xla[0] if isinstance(xla, list) else xla)["flops"]
    assert 1.0 <= xla / flops.train_flops(plain) < 1.05


def test_encoders_match_xla():
    cfg = dinov2.DinoV2Config(image_size=224, depth=2)  # ViT-B/14 (REPA's encoder), 2 of its 12 blocks
    module = nnx.eval_shape(lambda: dinov2.DinoV2(cfg, "xla", rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(module)
    x = jax.ShapeDtypeStruct((BATCH, 224, 224, 3), jnp.float32)
    xla = cost_flops(lambda p, x: nnx.merge(graphdef, p)(x).patch_BLD, params, x) / BATCH
    assert 1.0 <= xla / flops.dinov2_forward_flops(cfg) < 1.05

    from dit_jax.models import digits_classifier

    # The digits' 8x8x1 inputs give conv1 9 multiply-adds per bias add: the formula (matmuls only)
    # is checked on 32x32x3 inputs, where the bias adds and padding weigh less.
    net = nnx.eval_shape(lambda: digits_classifier.ClassifierNet(32, 3, 10, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(net)
    x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)
    convs = lambda p, x: (lambda n: n.conv2(n.conv1(x)))(nnx.merge(graphdef, p))
    xla = cost_flops(convs, params, x) / BATCH
    analytic = flops.digits_encoder_flops(32, 3, digits_classifier.CLASSIFIER_WIDTH)
    assert 1.0 <= xla / analytic < 1.05


@pytest.mark.parametrize("grid,window", [(16, (5, 5)), (9, (3, 7)), (8, (15, 15))])
def test_mask_density_is_the_exact_share_of_allowed_pairs(grid, window):
    cfg = dit_config()
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, image_size=2 * grid, patch_size=2),
        data=dataclasses.replace(cfg.data, image_size=2 * grid),
        attention=dataclasses.replace(cfg.attention, mask=f"neighborhood:{window[0]},{window[1]}"),
    )

    def per_axis(n: int, w: int) -> int:  # keys within w // 2 of each query, clipped at the edges
        r = w // 2
        return sum(min(i, r) + min(n - 1 - i, r) + 1 for i in range(n))

    want = per_axis(grid, window[0]) * per_axis(grid, window[1]) / grid**4
    assert flops.attention_density(cfg) == pytest.approx(want, rel=1e-12)
    dense = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, mask="full"))
    tokens, d = cfg.model.num_patches, cfg.model.hidden_size
    saved = cfg.model.depth * 4 * tokens**2 * d * (1 - want)
    assert flops.dit_forward_flops(dense) - flops.dit_forward_flops(cfg) == pytest.approx(saved)


def test_metrics_rows_carry_flops_and_images_seen_across_a_batch_change(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    first = tiny_config(total_steps=4, checkpoint_every=2, log_every=1)
    loop.train(first, workdir)
    second = tiny_config(total_steps=6, checkpoint_every=2, log_every=1, batch_size=16)
    # Resume from step 2 (as after a crash between the checkpoints at 2 and 4): drop the later one.
    import shutil

    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    loop.train(second, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f)}
    per_step = {b: flops.train_flops(dataclasses.replace(first, batch_size=b)) for b in (32, 16)}
    assert rows[0]["flops"] == 0 and rows[0]["flops_per_step"] == per_step[32]
    for step in range(1, 7):
        old, new = min(step, 2), max(step - 2, 0)  # steps at batch 32, then at 16
        assert rows[step]["images_seen"] == 32 * old + 16 * new
        assert rows[step]["flops"] == pytest.approx(old * per_step[32] + new * per_step[16], rel=1e-12)
        assert rows[step]["tflops_per_s_per_device"] > 0 and "mfu" not in rows[step]  # CPU: no known peak
    assert first.batch_size == 32 and np.isfinite(rows[6]["loss"])
