"""Scanned blocks (model.scan_blocks) and remat policies: the same model as the per-block one, in
values, gradients and initialisation; layouts convert both ways, also through checkpoints (an older
per-block run samples and resumes in the stacked layout)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax import config as config_lib
from dit_jax import workdir as workdir_lib
from dit_jax.models import layout
from dit_jax.models.dit import DiT
from dit_jax.train import loop

BASE = dict(
    image_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=4, num_heads=4, num_classes=10,
    repa_depth=2, repa_projector_dim=16, repa_feature_dim=8,
)  # fmt: skip
X = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
T, Y = jnp.array([3.0, 500.0]), jnp.array([1, 10])


def split(cfg: config_lib.Model, seed: int = 0):
    graphdef, state = nnx.split(DiT(cfg, "xla", rngs=nnx.Rngs(params=seed)))
    return graphdef, state


def random_params(cfg: config_lib.Model) -> dict:
    """Per-block params with every entry random (the zero-initialised layers too)."""
    _, state = split(dataclasses.replace(cfg, scan_blocks=False))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: 0.1 * rng.standard_normal(a.shape, np.float32), nnx.to_pure_dict(state))


def loss_and_grads(cfg: config_lib.Model, params_per_block: dict):
    graphdef, _ = split(cfg)
    params = layout.for_model(params_per_block, cfg)

    def loss(p):
        out, z = nnx.merge(graphdef, p).forward_with_features(X, T, Y)
        return jnp.sum(out**2) + jnp.sum(z**2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, layout.convert(grads, stacked=False)


def test_default_scans_deep_models_only():
    assert not config_lib.Model(depth=4).scanned
    assert config_lib.Model(depth=8).scanned
    assert not config_lib.Model(depth=8, scan_blocks=False).scanned
    assert config_lib.Model(depth=2, scan_blocks=True).scanned
    # MoE every 3rd block: groups of 3 must tile the depth, else the default does not scan...
    assert not config_lib.Model(depth=8, num_experts=4, moe_every=3).scanned
    assert config_lib.Model(depth=9, num_experts=4, moe_every=3).scanned
    # ... and asking for it is one config error.
    with pytest.raises(config_lib.ConfigError, match="'model.scan_blocks'.*divisible by 3"):
        config_lib.Model(depth=8, num_experts=4, moe_every=3, scan_blocks=True)


def test_scanned_init_is_the_stacked_per_block_init_with_a_layers_axis():
    cfg = config_lib.Model(**BASE)
    _, per_block = split(dataclasses.replace(cfg, scan_blocks=False), seed=3)
    _, stacked = split(dataclasses.replace(cfg, scan_blocks=True), seed=3)
    want = layout.convert(nnx.to_pure_dict(per_block), stacked=True)
    got = nnx.to_pure_dict(stacked)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    kernel = stacked["block_stack"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.shape == (4, 32, 128)
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "mlp")


@pytest.mark.parametrize("remat", ["none", "full", "save_dots", "offload"])
@pytest.mark.parametrize("options", [{}, dict(mlp="swiglu", norm="rmsnorm", qk_norm=True, rope=True)])
def test_scanned_equals_per_block_in_values_and_gradients(remat, options):
    cfg = config_lib.Model(**BASE, **options)
    params = random_params(cfg)
    want_loss, want_grads = loss_and_grads(dataclasses.replace(cfg, scan_blocks=False), params)
    got_loss, got_grads = loss_and_grads(dataclasses.replace(cfg, scan_blocks=True, remat=remat), params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert np.any(np.asarray(b))
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * float(np.abs(b).max()))
    # The comparison can fail: another block order changes the loss.
    swapped = dict(params, blocks={0: params["blocks"][1], 1: params["blocks"][0], **{
        i: params["blocks"][i] for i in (2, 3)}})  # fmt: skip
    _, other = loss_and_grads(dataclasses.replace(cfg, scan_blocks=True), swapped)
    assert not all(
        np.allclose(a, b, rtol=1e-3)
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(want_grads), strict=True)
    )


def test_layout_round_trip_with_a_period_and_abstract_shardings():
    blocks = {i: {"w": np.full((2, 3), i, np.float32)} for i in range(6)}
    tree = {"opt": ({"blocks": blocks, "x": np.ones(1)},), "blocks": blocks}
    stacked = layout.convert(tree, stacked=True, period=2)
    assert layout.is_stacked(stacked) and layout.period_of(stacked) == 2
    # entry j holds blocks j, j + 2, j + 4
    np.testing.assert_array_equal(stacked["block_stack"][1]["w"][:, 0, 0], [1, 3, 5])
    np.testing.assert_array_equal(stacked["opt"][0]["block_stack"][0]["w"][:, 0, 0], [0, 2, 4])
    back = layout.convert(stacked, stacked=False)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(a, b)
    mesh = jax.make_mesh((8,), ("fsdp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    abstract = {"blocks": {i: jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=sharding) for i in range(2)}}
    s = layout.convert(abstract, stacked=True)["block_stack"][0]
    assert s.shape == (2, 8, 3) and s.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert layout.convert({"block_stack": {0: s}}, stacked=False)["blocks"][1].sharding == sharding


def test_a_per_block_run_samples_and_resumes_scanned(tiny_config, tmp_path, caplog):
    """A run trained before scanning (per-block checkpoints, config.json without scan_blocks) loads
    stacked, and resuming it scanned continues the same trajectory as the unscanned run."""
    per_block = tiny_config(total_steps=4, checkpoint_every=2, log_every=1, model=dict(scan_blocks=False))
    straight = str(tmp_path / "straight")
    loop.train(per_block, straight)
    resumed = str(tmp_path / "resumed")
    loop.train(dataclasses.replace(per_block, total_steps=2), resumed)

    # An older config.json: no scan_blocks key, remat as a bool.
    path = os.path.join(resumed, "config.json")
    with open(path) as f:
        old = json.load(f)
    del old["model"]["scan_blocks"]
    old["model"]["remat"] = False
    with open(path, "w") as f:
        json.dump(old, f)
    cfg = workdir_lib.load_config(resumed)
    assert cfg.model.remat == "none" and cfg.model.scan_blocks is None and not cfg.model.scanned
    run = workdir_lib.load(resumed)

    # The same checkpoint into a scanned model (as the default does for depth >= 8).
    old["model"]["scan_blocks"] = True
    with open(path, "w") as f:
        json.dump(old, f)
    stacked_run = workdir_lib.load(resumed)
    assert layout.is_stacked(stacked_run.params) and not layout.is_stacked(run.params)
    unstacked = layout.convert(stacked_run.params, stacked=False)
    assert jax.tree.structure(unstacked) == jax.tree.structure(run.params)
    for a, b in zip(jax.tree.leaves(unstacked), jax.tree.leaves(run.params), strict=True):
        np.testing.assert_array_equal(a, b)

    del old["model"]["scan_blocks"]  # back to the older run's config.json
    with open(path, "w") as f:
        json.dump(old, f)
    caplog.set_level("INFO", logger="dit_jax")
    loop.train(
        tiny_config(total_steps=4, checkpoint_every=2, log_every=1, model=dict(scan_blocks=True)), resumed
    )
    assert "resuming with a changed model.scan_blocks: None → True" in caplog.text
    with open(os.path.join(straight, "metrics.jsonl")) as f:
        want = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    with open(os.path.join(resumed, "metrics.jsonl")) as f:
        got = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    assert sorted(got) == sorted(want)
    for step in want:
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5)
