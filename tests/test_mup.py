"""μP (model.parametrization="mup", models.mup): SP is unchanged; μP equals SP at the base width; the
coordinate check (activation sizes after a few AdamW steps stay flat in width under μP and grow
under SP); the per-parameter learning rates in both block layouts and with experts; the init rule;
a μP train step on an 8-device fsdp mesh against one device."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.diffusion import make_objective
from dit_jax.models import mup
from dit_jax.models.build import build_model, model_spec
from dit_jax.models.dit import DiT
from dit_jax.models.layers import layer_norm, modulate, sincos_pos_embed_2d, unpatchify
from dit_jax.parallel import mesh as mesh_lib
from dit_jax.train import state as state_lib
from dit_jax.train.step import build_train_step, global_batch

TINY = dict(image_size=8, in_channels=1, patch_size=2, depth=2, num_heads=4, num_classes=10)
EXTRAS = dict(num_experts=4, moe_every=2, repa_depth=1, repa_projector_dim=24, repa_feature_dim=8)
# Compile fast (XLA:CPU's LLVM at -O0 halves compile time here; the numbers are the same).
FAST = {"xla_backend_optimization_level": 0}
WIDTHS = (64, 128, 256, 512)  # the coordinate check's, base 64
BATCH = 16  # the coordinate check's batch (training and evaluation)


def make_config(width: int, parametrization: str = "mup", base: int = 64, lr: float = 1e-2, **model):
    m = config_lib.Model(
        **{**TINY, **model}, hidden_size=width, parametrization=parametrization, mup_base_width=base
    )
    data = config_lib.Data(source="digits", image_size=8, channels=1, num_classes=10)
    optim = config_lib.Optim(lr=lr, grad_clip=0.0, weight_decay=0.01)
    return config_lib.Config(
        model=m, data=data, optim=optim, batch_size=16, attention=config_lib.Attention("xla")
    )


def with_model(cfg: config_lib.Config, **changes) -> config_lib.Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))


def init_params(cfg: config_lib.Config) -> dict:
    init = jax.jit(lambda: nnx.split(build_model(cfg))[1].to_pure_dict())
    return init.lower().compile(compiler_options=FAST)()


def batch(n: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(rng.uniform(-1, 1, (n, 8, 8, 1)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 10, n), jnp.int32),
    }


def flow_loss(cfg: config_lib.Config, graphdef, params, b: dict, key) -> jax.Array:
    """The train step's flow-matching loss (without label dropout) with noise and t from `key`."""
    objective = make_objective(cfg.objective, cfg.model.learn_sigma)
    x_t, t, target = objective.sample(key, b["x"])
    out = nnx.merge(graphdef, params)(x_t, objective.model_time(t), b["y"])
    return jnp.mean(objective.loss(out, b["x"], x_t, t, target))


def lean_step(cfg: config_lib.Config, graphdef, tx):
    """(params, opt_state, batch, key) -> (params, opt_state, loss): the train step's model,
    objective and optimizer without its EMA and guards (half the compile time)."""

    def step_fn(params, opt_state, b, key):
        loss, grads = jax.value_and_grad(lambda p: flow_loss(cfg, graphdef, p, b, key))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step_fn


def loss_and_grads(cfg: config_lib.Config, params: dict):
    """Loss and gradients of the model's output and REPA features (MSE) on a fixed batch."""
    graphdef = model_spec(cfg).graphdef

    def loss(p):
        b = batch()
        t = jnp.linspace(0, 999, len(b["y"]))
        out, z, _ = nnx.merge(graphdef, p).forward_with_aux(b["x"], t, b["y"], with_features=True)
        return jnp.mean(out**2) + jnp.mean(z**2)

    return jax.jit(jax.value_and_grad(loss)).lower(params).compile(compiler_options=FAST)(params)


def random_like(tree, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), tree)


def first_update(tx, params, grads):
    update = jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])
    return update.lower(params, grads).compile(compiler_options=FAST)(params, grads)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sp_is_the_model_and_optimizer_of_before():
    """A config without the new keys (an older config.json) builds SP, and mup_base_width does not
    matter under SP: same params, loss and gradients; the optimizer is plain optax.adamw. (Against
    the code before μP: params, gradients and updates were compared bit for bit once, by hand.)"""
    cfg = make_config(64, "sp", **EXTRAS)  # the next test's SP program: compiled once
    older = config_lib.to_dict(cfg)
    for key in ("parametrization", "mup_base_width"):
        del older["model"][key]
    before = config_lib.from_dict(older)
    assert before.model.parametrization == "sp"
    other_base = with_model(cfg, mup_base_width=32)
    assert mup.attention_scale(cfg.model) is None and mup.output_multiplier(cfg.model) is None

    params = init_params(before)
    assert_trees_equal(params, init_params(other_base))
    assert_trees_equal(loss_and_grads(before, params), loss_and_grads(other_base, params))
    o = cfg.optim
    lr = state_lib.learning_rate(o, cfg.total_steps)
    today = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    grads = random_like(params)
    assert_trees_equal(
        first_update(today, params, grads), first_update(state_lib.optimizer(other_base), params, grads)
    )


def test_mup_at_the_base_width_is_sp():
    sp, mp = make_config(64, "sp", **EXTRAS), make_config(64, "mup", **EXTRAS)
    params = init_params(sp)
    assert_trees_equal(params, init_params(mp))
    assert mup.attention_scale(mp.model) == 16**-0.5 and mup.output_multiplier(mp.model) == 1.0
    assert_trees_equal(loss_and_grads(sp, params), loss_and_grads(mp, params))
    assert set(jax.tree.leaves(state_lib.lr_multipliers(mp))) == {1.0}
    grads = random_like(params)
    assert_trees_equal(
        first_update(state_lib.optimizer(sp), params, grads),
        first_update(state_lib.optimizer(mp), params, grads),
    )


def _activations(model, x, t, y) -> dict[str, jax.Array]:
    """The DiT forward pass (per-block layout) recording what the coordinate check measures."""
    cfg = model.cfg
    acts = {"embed": model.patch_embed(x)}
    h = acts["embed"] + jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, cfg.image_size // cfg.patch_size))
    c = model.t_embedder(t) + model.y_embedder(y)
    acts["cond"] = c
    for i, block in enumerate(model.blocks):
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(block.adaln(jax.nn.silu(c)), 6, axis=-1)
        acts[f"attn{i}"] = block.attn(modulate(layer_norm(h), shift1, scale1))
        h = h + gate1[:, None] * acts[f"attn{i}"]
        acts[f"mlp{i}"] = block.mlp(modulate(layer_norm(h, block.mlp_norm_eps), shift2, scale2))
        h = h + gate2[:, None] * acts[f"mlp{i}"]
        acts[f"hidden{i}"] = h
    acts["output"] = model.final(h, c)
    return acts


def coordinate_sizes(
    width: int, parametrization: str, *, unscaled: bool = False, steps: int = 5, seeds: int = 4
):
    """RMS of each recorded activation after `steps` AdamW steps (lr 1e-2) on digits-size inputs,
    and RMS of its change from initialisation, on a fixed evaluation batch, pooled over `seeds`
    initialisations and noise draws (vmapped: one compiled program). Under μP the learning-rate
    multipliers are an argument: `unscaled` also runs the μP model with all of them 1 (SP's
    learning rates), from the same compilation."""
    cfg = make_config(width, parametrization)
    spec = model_spec(cfg)
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *[batch(BATCH, seed=s) for s in range(steps)])
    x, y = batch(BATCH, seed=99)["x"], batch(BATCH, seed=99)["y"]
    t = jnp.linspace(0, 999, BATCH)

    def experiment(key, multipliers):
        if multipliers is None:
            tx = state_lib.optimizer(cfg, spec)
        else:
            lr = state_lib.learning_rate(cfg.optim, cfg.total_steps)
            tx = state_lib.mup_adamw(cfg, lr, multipliers=multipliers)
        step_fn = lean_step(cfg, spec.graphdef, tx)
        init_key, noise_key = jax.random.split(key)
        params = nnx.split(DiT(cfg.model, "xla", rngs=nnx.Rngs(params=init_key)))[1].to_pure_dict()
        # A barrier: with the zero-initialised layers as in-program constants, XLA:CPU computed
        # mean((after - before)^2) of the output as inf under vmap (jax 0.10.2).
        params = jax.lax.optimization_barrier(params)
        before = _activations(nnx.merge(spec.graphdef, params), x, t, y)

        def body(carry, step_batch):
            params, opt_state = carry
            step, b = step_batch
            params, opt_state, loss = step_fn(params, opt_state, b, jax.random.fold_in(noise_key, step))
            return (params, opt_state), loss

        (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), (jnp.arange(steps), batches))
        model = nnx.merge(spec.graphdef, params)
        after = _activations(model, x, t, y)
        ms = lambda a: jnp.mean(jnp.square(a))  # noqa: E731
        sizes = {k: ms(a) for k, a in after.items()}
        changes = {k: ms(after[k] - before[k]) for k in after}
        mismatch = 0.0
        if width == WIDTHS[0]:  # the recording is the model: its output is the model's
            out = unpatchify(after["output"], cfg.model.patch_size, cfg.model.out_channels, 4)
            mismatch = jnp.max(jnp.abs(out - model(x, t, y))) / jnp.sqrt(sizes["output"])
        return sizes, changes, mismatch, jnp.all(jnp.isfinite(losses))

    keys = jax.random.split(jax.random.key(0), seeds)
    multipliers = None
    if parametrization == "mup":
        multipliers = jax.tree.map(jnp.float32, state_lib.lr_multipliers(cfg, spec))
    run = jax.jit(jax.vmap(experiment, in_axes=(0, None)))
    compiled = run.lower(keys, multipliers).compile(compiler_options=FAST)
    rms = lambda ms: {k: float(np.sqrt(np.mean(v))) for k, v in ms.items()}  # noqa: E731
    results = []
    for m in [multipliers, *([jax.tree.map(jnp.ones_like, multipliers)] if unscaled else [])]:
        sizes, changes, mismatch, finite = jax.device_get(compiled(keys, m))
        assert np.all(finite) and np.max(mismatch) < 1e-5
        results.append((rms(sizes), rms(changes)))
    return results if unscaled else results[0]


def slopes(widths, results) -> dict[str, float]:
    """Least-squares slope of log(size) against log(width), per activation."""
    return {k: float(np.polyfit(np.log(widths), np.log([r[k] for r in results]), 1)[0]) for k in results[0]}


@pytest.fixture(scope="module")
def coordinate_check():
    """Widths 64..512 (base 64) under μP and SP (width 64 is the base, where both are one model),
    and width 512 under μP with SP's learning rates."""
    mup_runs = [coordinate_sizes(w, "mup") for w in WIDTHS[:-1]]
    widest, unscaled = coordinate_sizes(WIDTHS[-1], "mup", unscaled=True)
    sp_runs = [mup_runs[0], *(coordinate_sizes(w, "sp") for w in WIDTHS[1:])]
    return [*mup_runs, widest], sp_runs, unscaled


def test_coordinate_check_mup_is_flat_sp_grows(coordinate_check):
    """Measured (lr 1e-2, 5 steps, batch 16, 4 seeds pooled): under μP every slope, of the sizes
    and of their changes, is within ±0.06; under SP the blocks' changes grow with slopes 1.7
    (attention) to 4.3 (hidden states), 40-10000x over the 3 octaves. The bound 0.1 (a factor 1.23
    over the 8x range) is well above μP's largest drift (single seeds drift up to ±0.2, hence the
    pooling) and far below SP's smallest growth (0.5: a factor 2.8)."""
    mup_runs, sp_runs, _ = coordinate_check
    for i in (0, 1):  # sizes and changes from init
        mup_slopes = slopes(WIDTHS, [r[i] for r in mup_runs])
        assert all(abs(s) < 0.1 for s in mup_slopes.values()), mup_slopes
    sp_slopes = slopes(WIDTHS, [r[1] for r in sp_runs])
    grown = [k for k in sp_slopes if k.startswith(("attn", "mlp", "hidden", "output"))]
    assert len(grown) == 7 and all(sp_slopes[k] > 0.5 for k in grown), sp_slopes


def test_coordinate_check_fails_without_the_lr_scaling(coordinate_check):
    """The check can fail: the μP model with SP's learning rates (no base/width on hidden weights)
    grows with width as SP does (measured slope of the last hidden state's change: 3.3)."""
    mup_runs, _, unscaled = coordinate_check
    assert slopes((WIDTHS[0], WIDTHS[-1]), [mup_runs[0][1], unscaled[1]])["hidden1"] > 0.5


def test_lr_multipliers_per_parameter_class():
    cfg = make_config(256, base=64, **EXTRAS)  # depth 2: block 1 has experts
    mults = state_lib.lr_multipliers(cfg)
    blocks = mults["blocks"]
    for hidden in (
        blocks[0]["attn"]["w_qkv"], blocks[0]["attn"]["w_out"], blocks[0]["mlp"]["fc1"]["kernel"],
        blocks[0]["mlp"]["fc2"]["kernel"], blocks[0]["adaln"]["kernel"], blocks[1]["mlp"]["w_in"],
        blocks[1]["mlp"]["w_out"], mults["t_embedder"]["fc2"]["kernel"], mults["final"]["adaln"]["kernel"],
    ):  # fmt: skip
        assert hidden == 0.25
    for vector in (
        mults["patch_embed"]["proj"]["kernel"], mults["patch_embed"]["proj"]["bias"],
        mults["t_embedder"]["fc1"]["kernel"], mults["y_embedder"]["table"], blocks[0]["attn"]["b_qkv"],
        blocks[0]["mlp"]["fc1"]["bias"], blocks[1]["mlp"]["b_in"], blocks[1]["mlp"]["router"]["kernel"],
        mults["final"]["proj"]["kernel"], mults["projector"]["fc1"]["kernel"],
        mults["projector"]["fc3"]["kernel"],
    ):  # fmt: skip
        assert vector == 1.0
    # Readouts get their 1/m in the forward pass instead (MuReadout), attention 1/d.
    model = nnx.eval_shape(lambda: build_model(cfg))
    assert model.final.output_mult == 0.25 and model.projector.input_mult == 0.25
    assert model.blocks[1].mlp.router_mult == 0.25
    assert model.blocks[0].attn.scale == pytest.approx(16**0.5 / 64)  # sqrt(d_base) / d
    spec = model_spec(cfg)
    base = model_spec(with_model(cfg, hidden_size=64)).abstract_params
    classes = mup.param_classes(spec.abstract_params, base)
    assert classes["blocks"][0]["attn"]["w_out"] == mup.HIDDEN
    assert classes["final"]["proj"]["kernel"] == classes["blocks"][1]["mlp"]["router"]["kernel"] == mup.VECTOR
    assert classes["projector"]["fc2"]["kernel"] == mup.FIXED  # repa_projector_dim does not scale

    # Scanned: stacked leaves (leading "layers" axis) get their per-block value; SwiGLU's fused
    # [embed, 2, mlp] input weight is hidden with fan-in embed.
    scanned = with_model(cfg, scan_blocks=True, mlp="swiglu", repa_depth=2)
    stack = state_lib.lr_multipliers(scanned)["block_stack"]
    assert stack[0]["mlp"]["w_in"] == stack[0]["attn"]["w_qkv"] == stack[1]["mlp"]["w_in"] == 0.25
    assert stack[1]["mlp"]["router"]["kernel"] == stack[1]["mlp"]["b_out"] == stack[0]["mlp"]["b_in"] == 1.0
    # The optimizer state has the same tree as SP's: checkpoints keep their shape.
    for c in (cfg, scanned):
        params = model_spec(c).abstract_params
        trees = [
            jax.eval_shape(state_lib.optimizer(x).init, params)
            for x in (c, with_model(c, parametrization="sp"))
        ]
        assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])


def test_hidden_updates_shrink_as_base_over_width():
    """The Adam direction of a hidden weight is multiplied by base/width; the weight decay is not
    (MuAdamW: lr / m, weight_decay x m); vector-like parameters' updates are SP's."""
    cfg = make_config(256, base=64, lr=1e-3)
    params = random_like(model_spec(cfg).abstract_params, seed=1)
    grads = random_like(params, seed=2)
    update = first_update(state_lib.optimizer(cfg), params, grads)
    unscaled = first_update(state_lib.optimizer(with_model(cfg, parametrization="sp")), params, grads)
    w, bias = ("blocks", 0, "mlp", "fc1", "kernel"), ("blocks", 0, "mlp", "fc1", "bias")
    get = lambda tree, path: functools.reduce(lambda t, k: t[k], path, tree)  # noqa: E731
    decay = -1e-3 * 0.01 * get(params, w)  # lr x weight_decay x param, the same under both
    np.testing.assert_allclose(
        get(update, w) - decay, 0.25 * (get(unscaled, w) - decay), rtol=1e-5, atol=1e-9
    )
    np.testing.assert_array_equal(get(update, bias), get(unscaled, bias))


def test_init_keeps_the_base_models_scale_except_hidden_weights():
    """mup.init's rule on every parameter: the RMS at width 4x base is the base model's, except
    hidden weights, whose RMS is halved (std ~ fan_in^-1/2); covers the patch embedding (Xavier over
    a width dim), the timestep MLP's N(0, 0.02) hidden weight, the router and the projector."""
    cfg = make_config(128, base=32, **EXTRAS, mlp="swiglu", norm="rmsnorm", qk_norm=True)
    wide, base = init_params(cfg), init_params(with_model(cfg, hidden_size=32))
    classes = mup.param_classes(wide, base)
    rms = lambda a: float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64)))))  # noqa: E731
    checked = 0
    for (path, w), b, cls in zip(
        jax.tree_util.tree_flatten_with_path(wide)[0],
        jax.tree.leaves(base),
        jax.tree.leaves(classes),
        strict=True,
    ):
        if rms(b) == 0:  # zero-initialised
            assert rms(w) == 0, path
            continue
        want = 0.5 if cls == mup.HIDDEN else 1.0
        assert rms(w) / rms(b) == pytest.approx(want, rel=0.2), (jax.tree_util.keystr(path), rms(w) / rms(b))
        checked += 1
    assert checked >= 15
    # Without the rescaling, SP's inits break the rule (e.g. Xavier on the patch embedding).
    sp_wide = init_params(with_model(cfg, parametrization="sp"))
    ratio = rms(sp_wide["patch_embed"]["proj"]["kernel"]) / rms(base["patch_embed"]["proj"]["kernel"])
    assert ratio < 0.7


def test_fsdp_train_step_matches_one_device():
    cfg = dataclasses.replace(
        make_config(64, base=32, lr=1e-3, scan_blocks=True), mesh=config_lib.Mesh(data=1, fsdp=8)
    )
    losses = []
    for mesh in (
        mesh_lib.make_mesh(cfg.mesh),
        mesh_lib.make_mesh(config_lib.Mesh(), devices=jax.devices()[:1]),
    ):
        built = build_train_step(cfg, mesh)
        with jax.set_mesh(mesh):
            state = state_lib.init_state(cfg, built.spec, built.tx, built.shardings)
            b = global_batch(jax.tree.map(np.asarray, batch()), mesh)
            step = built.step_fn.lower(state, b, None).compile(compiler_options=FAST)
            run = []
            for _ in range(2):
                state, metrics = step(state, b, None)
                run.append(float(metrics["loss"]))
        losses.append(run)
        if mesh.size == 8:
            kernel = state.params["block_stack"][0]["mlp"]["fc1"]["kernel"]  # [layers, embed, mlp]
            assert "fsdp" in str(kernel.sharding.spec)
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-5)
    assert losses[0][1] != losses[0][0]


def test_config_validation():
    with pytest.raises(config_lib.ConfigError, match="'model.parametrization'"):
        config_lib.Model(parametrization="ntk")
    with pytest.raises(config_lib.ConfigError, match="'model.mup_base_width'.*divisible by num_heads"):
        config_lib.Model(hidden_size=384, num_heads=6, parametrization="mup", mup_base_width=128)
    with pytest.raises(config_lib.ConfigError, match="'model.mup_base_width'.*RoPE"):
        config_lib.Model(hidden_size=128, num_heads=4, rope=True, parametrization="mup", mup_base_width=8)
    config_lib.Model(hidden_size=384, num_heads=6, parametrization="sp", mup_base_width=128)  # unused
    assert not config_lib.is_resumable("model.parametrization")
    assert not config_lib.is_resumable("model.mup_base_width")


def test_transfer_benchmark_summary(benchmark_module):
    """benchmarks/mup_transfer.py's verdict on made-up loss grids: signed shift, regret, divergence."""
    summarise = benchmark_module("mup_transfer").summarise

    lrs = 2.0 ** np.arange(-8, -3)
    losses = {
        "sp": {32: np.array([0.9, 0.8, 0.7, 0.6, 0.5]), 256: np.array([0.8, 0.4, 0.6, np.inf, np.inf])},
        "mup": {32: np.array([0.9, 0.8, 0.5, 0.6, 0.7]), 256: np.array([0.9, 0.7, 0.6, 0.4, 0.5])},
    }
    out = summarise(losses, lrs, [32, 256])
    assert out["sp_best_lr_shift_steps"] == -3 and out["mup_best_lr_shift_steps"] == 1
    assert out["sp_best_lr"] == {"32": 2.0**-4, "256": 2.0**-7}
    assert out["sp_transfer_regret"] is None  # 256 diverged at 32's best learning rate
    assert out["mup_transfer_regret"] == pytest.approx(0.6 / 0.4)
    assert out["mup_best_loss"] == {"32": 0.5, "256": 0.4}
