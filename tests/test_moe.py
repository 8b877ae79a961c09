"""The DiT-MoE layer (dit_jax.models.moe): routing, combine, capacity and auxiliary losses against a
per-token float64 numpy reference; expert parallelism on 8 fake devices against the unsharded layer."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax.models.moe import MoE
from dit_jax.parallel import mesh as mesh_lib
from dit_jax.parallel.rules import MESH_AXES

D, F, E, K = 16, 32, 8, 2
TOL = 1e-5  # f32: max abs error <= TOL * max(1, max |reference|)


def build(mlp="gelu", shared=0, capacity_factor=0.0, seed=0):
    """A layer and its parameters with every leaf random (biases too), so that each one matters."""
    layer = MoE(
        D, F, num_experts=E, experts_per_token=K, shared_experts=shared, capacity_factor=capacity_factor,
        mlp=mlp, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32,
    )  # fmt: skip
    graphdef, state = nnx.split(layer)
    leaves, tree = jax.tree.flatten(state.to_pure_dict())
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = tree.unflatten([0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)])
    return graphdef, params, state


@functools.partial(jax.jit, static_argnums=0)
def apply(graphdef, params, x):
    return nnx.merge(graphdef, params)(x)


def inputs(batch=4, length=8, seed=2):
    return jax.random.normal(jax.random.key(seed), (batch, length, D))


def gelu_tanh(h):
    return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))


def silu(h):
    return h / (1 + np.exp(-h))


def reference(params, x, *, mlp, capacity_factor=0.0):
    """The layer one token at a time in float64: softmax over all experts, top-k (no renormalising),
    capacity per example in priority order "all first choices, in token order, then all second
    choices", sum of the kept experts' outputs times their gate, plus the shared MLP."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    b, length, _ = x.shape
    cap = math.ceil(capacity_factor * length * K / E) if capacity_factor > 0 else math.inf

    def expert(v, e):
        if mlp == "gelu":
            h = gelu_tanh(v @ p["w_in"][e] + p["b_in"][e])
        else:
            h = np.einsum("d,dgf->gf", v, p["w_in"][e]) + p["b_in"][e]
            h = silu(h[0]) * h[1]
        return h @ p["w_out"][e] + p["b_out"][e]

    def shared(v):
        s = p["shared"]
        if mlp == "gelu":
            h = gelu_tanh(v @ s["fc1"]["kernel"] + s["fc1"]["bias"])
        else:
            h = np.einsum("d,dgf->gf", v, s["w_in"]) + s["b_in"]
            h = silu(h[0]) * h[1]
        return h @ s["fc2"]["kernel"] + s["fc2"]["bias"]

    y, logits, chosen, dropped = np.zeros_like(x), [], [], 0
    for i in range(b):
        probs, tops = [], []
        for t in range(length):
            z = x[i, t] @ p["router"]["kernel"]
            logits.append(z)
            pr = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            top = np.argsort(-pr, kind="stable")[:K]
            gap = np.sort(pr)[::-1][: K + 1]
            assert np.min(-np.diff(gap)) > 1e-6, "near-tie in the top k: pick another seed"
            probs.append(pr)
            tops.append(top)
            chosen.extend(top)
        used = np.zeros(E)
        for j in range(K):
            for t in range(length):
                e = tops[t][j]
                if used[e] < cap:
                    y[i, t] += probs[t][e] * expert(x[i, t], e)
                else:
                    dropped += 1
                used[e] += 1
        if "shared" in p:
            for t in range(length):
                y[i, t] += shared(x[i, t])
    return y, np.array(logits), np.array(chosen), dropped / (b * length * K)


def assert_close(got, want, name=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err, tol = np.abs(got - want).max(), TOL * max(1.0, np.abs(want).max())
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("shared", [0, 2])
def test_matches_per_token_reference(mlp, shared):
    graphdef, params, _ = build(mlp, shared)
    x = inputs()
    y, aux = apply(graphdef, params, x)
    want, _, chosen, dropped = reference(params, x, mlp=mlp)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert_close(y, want, "y")
    assert dropped == 0 and float(aux["dropped_fraction"]) == 0
    np.testing.assert_allclose(aux["expert_load"], np.bincount(chosen, minlength=E) / chosen.size, rtol=1e-6)
    # The comparison is sensitive: one expert's output weight perturbed moves the result past TOL.
    used = int(np.bincount(chosen).argmax())
    params["w_out"] = params["w_out"].at[used].add(1e-3)
    moved = apply(graphdef, params, x)[0]
    assert np.abs(np.asarray(moved) - want).max() > 10 * TOL * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("mlp, capacity_factor", [("gelu", 0.5), ("swiglu", 1.0)])
def test_capacity_drops_over_capacity_assignments(mlp, capacity_factor):
    graphdef, params, _ = build(mlp, shared=1, capacity_factor=capacity_factor, seed=3)
    x = inputs(seed=4)
    y, aux = apply(graphdef, params, x)
    want, _, chosen, dropped = reference(params, x, mlp=mlp, capacity_factor=capacity_factor)
    dropless, *_ = reference(params, x, mlp=mlp)
    assert 0 < dropped < 1
    assert np.abs(want - dropless).max() > 0.1  # the drops matter
    assert_close(y, want, "y")
    np.testing.assert_allclose(float(aux["dropped_fraction"]), dropped, rtol=1e-6)
    # expert_load counts the router's choices before dropping.
    np.testing.assert_allclose(aux["expert_load"], np.bincount(chosen, minlength=E) / chosen.size, rtol=1e-6)


def test_balance_and_z_loss_follow_the_formulas():
    """balance = E sum_i f_i P_i (f_i: fraction of the T k assignments, P_i: mean router
    probability), z = mean logsumexp(logits)^2, over all tokens of the batch."""
    graphdef, params, _ = build(seed=5)
    x = inputs(batch=3, length=16, seed=6)
    _, aux = apply(graphdef, params, x)
    _, logits, chosen, _ = reference(params, x, mlp="gelu")
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    f = np.bincount(chosen, minlength=E) / chosen.size
    balance = E * np.sum(f * probs.mean(0))
    lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(float(aux["balance_loss"]), balance, rtol=1e-5)
    np.testing.assert_allclose(float(aux["z_loss"]), np.mean(lse**2), rtol=1e-5)
    assert abs(balance - 1) > 1e-3 and abs(float(aux["z_loss"]) - np.mean(logits.sum(-1) ** 2)) > 1e-2
    # A zero router is uniform: balance exactly 1 whatever top_k picks, z = log(E)^2.
    params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])
    _, aux = apply(graphdef, params, x)
    np.testing.assert_allclose(float(aux["balance_loss"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(aux["z_loss"]), math.log(E) ** 2, rtol=1e-6)


def loss_fn(graphdef, ct):
    def loss(params, x):
        y, aux = apply(graphdef, params, x)
        return jnp.sum(y * ct) + aux["balance_loss"] + aux["z_loss"], (y, aux)

    return loss


def test_gradients_reach_router_and_experts():
    graphdef, params, _ = build("swiglu", shared=1)
    x = inputs()
    ct = jax.random.normal(jax.random.key(7), x.shape)
    grads = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(graphdef, p, x)[0] * ct)))(params, x)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-4, jax.tree_util.keystr(path)
    # The router reaches y only through the gates, so its gradient above proves them differentiable.
    # The auxiliary losses alone reach the router and nothing else.
    aux_loss = lambda p: sum(apply(graphdef, p, x)[1][n] for n in ("balance_loss", "z_loss"))  # noqa: E731
    aux_grad = jax.jit(jax.grad(aux_loss))(params)
    assert np.abs(aux_grad["router"]["kernel"]).max() > 1e-4
    assert not np.any(aux_grad["w_in"]) and not np.any(aux_grad["shared"]["w_in"])


@pytest.mark.parametrize(
    "sizes, rules, mlp, shared, capacity_factor, batch",
    [
        (dict(data=2, expert=4), "fsdp_tp_ep", "gelu", 1, 0.0, 8),
        (dict(expert=2, context=2, tensor=2), "fsdp_tp_cp_ep", "swiglu", 0, 1.0, 4),
    ],
)
def test_expert_parallel_matches_one_device(sizes, rules, mlp, shared, capacity_factor, batch):
    """Experts split over mesh `expert` (all-gather of the tokens, psum_scatter of the outputs), the
    MLP dim over `tensor`, the sequence over `context`: outputs, aux and the gradients w.r.t. every
    parameter and the input equal the unsharded layer."""
    graphdef, params, state = build(mlp, shared, capacity_factor, seed=8)
    x = inputs(batch=batch, seed=9)
    ct = jax.random.normal(jax.random.key(10), x.shape)
    fn = jax.value_and_grad(loss_fn(graphdef, ct), argnums=(0, 1), has_aux=True)
    (want_loss, (want_y, want_aux)), want_grads = jax.jit(fn)(params, x)
    if capacity_factor:
        assert float(want_aux["dropped_fraction"]) > 0

    mesh = jax.make_mesh(
        tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 5
    )
    logical = jax.tree.map(
        lambda v: v.get_metadata()["logical_axes"], state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    ).to_pure_dict()
    shardings = mesh_lib.param_shardings(logical, params, mesh, rules)
    assert shardings["w_in"].spec[0] == "expert" and shardings["w_out"].spec[0] == "expert"
    sharded = jax.device_put(params, shardings)
    xs = jax.device_put(
        x, NamedSharding(mesh, P(mesh_lib.DATA_AXES, "context" if "context" in sizes else None))
    )
    with jax.set_mesh(mesh):
        jitted = jax.jit(fn)
        jaxpr = str(jax.make_jaxpr(jitted)(sharded, xs))
        (loss, (y, aux)), grads = jitted(sharded, xs)
    assert "all_gather" in jaxpr and "reduce_scatter" in jaxpr  # the expert-parallel path ran
    assert_close(y, want_y, "y")
    for name in want_aux:
        assert_close(aux[name], want_aux[name], name)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, g), w in zip(flat, jax.tree.leaves(want_grads), strict=True):
        assert_close(g, w, "grad " + jax.tree_util.keystr(path))


# --- the DiT with experts (model.num_experts): training, expert parallelism, scanning -------------


def _losses(workdir: str) -> dict[int, dict]:
    import json
    import os

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_dit_moe_trains_expert_parallel_as_on_one_device(tiny_config, tmp_path):
    """A DiT-MoE train run on data=2 x expert=4 (fsdp_tp_ep) equals the same run on one device:
    losses, expert loads and parameters; the experts' weights are split over `expert`."""
    from dit_jax.parallel import mesh as mesh_lib
    from dit_jax.train import loop

    moe = dict(depth=2, num_experts=4, experts_per_token=2, moe_every=2, shared_experts=1)
    cfg = tiny_config(
        total_steps=3,
        checkpoint_every=0,
        log_every=1,
        model=moe,
        mesh=dict(data=2, expert=4, rules="fsdp_tp_ep"),
    )
    single = mesh_lib.make_mesh(cfg.mesh.__class__(data=-1), devices=jax.devices()[:1])
    state8 = loop.train(cfg, str(tmp_path / "ep4"))
    state1 = loop.train(cfg, str(tmp_path / "one"), mesh=single)
    a, b = _losses(str(tmp_path / "ep4")), _losses(str(tmp_path / "one"))
    for step in (1, 2, 3):
        np.testing.assert_allclose(a[step]["loss"], b[step]["loss"], rtol=2e-5)
        np.testing.assert_allclose(a[step]["moe/expert_load"], b[step]["moe/expert_load"], atol=1e-6)
        assert len(a[step]["moe/expert_load"]) == 4 and a[step]["moe/balance_loss"] >= 1.0 - 1e-6
    for x, y in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    w_in = state8.params["blocks"][1]["mlp"]["w_in"]  # [expert, embed, mlp]: block 1 has the experts
    assert w_in.sharding.spec[0] == "expert" and w_in.addressable_shards[0].data.shape[0] == 1
    assert "w_in" not in state8.params["blocks"][0]["mlp"]  # block 0 is dense


def test_dit_moe_scanned_equals_per_block():
    """MoE every 2nd block, scanned in groups of 2, equals the per-block model (values, gradients,
    the averaged statistics)."""
    import dataclasses

    from dit_jax import config as config_lib
    from dit_jax.models import layout
    from dit_jax.models.dit import DiT

    base = config_lib.Model(
        image_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=4, num_heads=4, num_classes=10,
        num_experts=4, experts_per_token=2, moe_every=2,
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    t, y = jnp.array([3.0, 500.0]), jnp.array([1, 10])
    graphdef, state = nnx.split(DiT(dataclasses.replace(base, scan_blocks=False), "xla", rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: 0.1 * rng.standard_normal(a.shape, np.float32), nnx.to_pure_dict(state))

    def run(cfg):
        g = nnx.split(nnx.eval_shape(lambda: DiT(cfg, "xla", rngs=nnx.Rngs(0))))[0]

        def loss(p):
            out, _, aux = nnx.merge(g, p).forward_with_aux(x, t, y)
            return jnp.sum(out**2) + aux["balance_loss"] + aux["z_loss"], aux

        (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(layout.for_model(params, cfg))
        return value, aux, layout.convert(grads, stacked=False)

    want = run(dataclasses.replace(base, scan_blocks=False))
    got = run(dataclasses.replace(base, scan_blocks=True))
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for key in ("balance_loss", "z_loss", "expert_load", "dropped_fraction"):
        np.testing.assert_allclose(got[1][key], want[1][key], rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * float(np.abs(b).max()))


def test_expert_count_not_divisible_by_mesh_expert_is_one_config_error():
    from dit_jax import config as config_lib
    from dit_jax.config_files import load

    with pytest.raises(
        config_lib.ConfigError, match=r"'model.num_experts': 6 experts do not split over mesh.expert=4"
    ):
        load("configs/quickstart.py:moe", ["--config.model.num_experts=6", "--config.mesh.expert=4"])
