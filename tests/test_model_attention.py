"""The DiT with every attention implementation and with a neighbourhood-window mask."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.models.attention import attend
from dit_jax.models.build import apply_model, attention_mask, build_model, model_spec
from dit_jax.train import loop
from pallas_kernels import masks


def perturbed_params(cfg, key=0):
    """Init params with the zero-initialised layers made non-zero, so attention matters."""
    params = nnx.split(build_model(cfg))[1].to_pure_dict()
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    noisy = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return tree.unflatten(noisy)


def forward(cfg, params):
    spec = model_spec(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    return apply_model(spec.graphdef, params, x, jnp.array([10.0, 700.0]), jnp.array([3, 10]))


@pytest.mark.parametrize("mask", ["full", "neighborhood:3"])
@pytest.mark.parametrize("impl", ["auto", "chunked", "pallas"])
def test_implementations_agree_with_xla(tiny_config, impl, mask):
    ref_cfg = tiny_config(attention=dict(impl="xla", mask=mask))
    params = perturbed_params(ref_cfg)
    want = forward(ref_cfg, params)
    got = forward(dataclasses.replace(ref_cfg, attention=config_lib.Attention(impl=impl, mask=mask)), params)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_neighbourhood_mask_changes_the_model_and_is_local(tiny_config):
    cfg = tiny_config(attention=dict(impl="xla", mask="neighborhood:3"))
    assert attention_mask(cfg) == masks.Neighborhood2D(grid=(4, 4), window=(3, 3))
    params = perturbed_params(cfg)
    full = forward(dataclasses.replace(cfg, attention=config_lib.Attention(impl="xla")), params)
    local = forward(cfg, params)
    assert np.abs(np.asarray(full) - np.asarray(local)).max() > 1e-3
    # A one-block model with a 3×3 window: perturbing the top-left patch leaves the far corner alone.
    one = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, depth=1))
    p1 = perturbed_params(one)
    spec = model_spec(one)
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 1))
    f = lambda x: apply_model(spec.graphdef, p1, x, jnp.array([10.0]), jnp.array([3]))
    delta = f(x.at[:, :2, :2].add(1.0)) - f(x)
    assert np.abs(delta[:, :2, :2]).max() > 1e-4 and np.abs(delta[:, 6:, 6:]).max() == 0


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_quickstart_trains_with_each_implementation(tiny_config, tmp_path, impl):
    cfg = tiny_config(total_steps=2, checkpoint_every=0, attention=dict(impl=impl, mask="neighborhood:3"))
    state = loop.train(cfg, str(tmp_path / impl))
    assert int(state.step) == 2


def test_bad_mask_names_the_key():
    with pytest.raises(config_lib.ConfigError, match="'attention.mask'"):
        config_lib.Attention(mask="neighborhood:4")
    with pytest.raises(config_lib.ConfigError, match="'attention.mask'"):
        config_lib.Attention(mask="sliding")


@pytest.mark.parametrize("impl", ["pallas", "dense"])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_attention_runs_per_device_under_shard_map_on_a_mesh(impl, kv_heads):
    """On a (data, fsdp, tensor) mesh the model's attention is one shard_map: batch over data×fsdp,
    heads over tensor (replicated when tensor does not divide the KV heads), no communication; the
    result equals the unsharded call."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (8, 16, 4, 8))
    k, v = (jax.random.normal(key, (8, 16, kv_heads, 8)) for key in keys[1:])
    mask = masks.Local1D(3, 3)
    want = attend(q, k, v, mask=mask, implementation=impl)  # no mesh in context: a plain call
    fn = jax.jit(functools.partial(attend, mask=mask, implementation=impl))
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(fn)(q, k, v)
        got = fn(q, k, v)
        hlo = fn.lower(q, k, v).compile().as_text()
    (eqn,) = [e for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "shard_map"]
    heads = "tensor" if kv_heads % 2 == 0 else None
    qkv_specs = eqn.params["in_specs"][-3:]  # (closed-over constants come first, replicated)
    assert [tuple(s) for s in qkv_specs] == [(("data", "fsdp"), None, heads, None)] * 3
    assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("context_impl", ["ring", "all_to_all"])
@pytest.mark.parametrize("mask", ["full", "neighborhood:3"])
def test_context_parallel_model_matches_one_device(tiny_config, context_impl, mask):
    """The sequence of patch tokens split over mesh.context=4 (ring or all-to-all attention), the
    batch over data=2: the loss and every parameter gradient equal the unsharded model's."""
    cfg = tiny_config(attention=dict(impl="dense", mask=mask, context_impl=context_impl))
    params = perturbed_params(cfg)
    spec = model_spec(cfg)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t, y = jnp.array([10.0, 700.0, 300.0, 999.0]), jnp.array([3, 10, 0, 7])

    def loss(params):
        return (apply_model(spec.graphdef, params, x, t, y) ** 2).mean()

    want_loss, want_grads = jax.value_and_grad(loss)(params)
    mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(loss))
        jaxpr = str(jax.make_jaxpr(fn)(params))
        got_loss, got_grads = fn(params)
    assert ("ppermute" if context_impl == "ring" else "all_to_all") in jaxpr
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6 * max(1.0, float(np.abs(w).max())), rtol=1e-5)
