"""SiT, REPA and LightningDiT against PyTorch transcriptions of their code, through the converters.

Every parameter is re-randomised on the PyTorch side (zero-initialised adaLN and final layers,
biases and norm weights included), so a wrong layout anywhere changes the output.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.interop import (
    CheckpointFormatError,
    convert_lightningdit,
    convert_official_dit,
    convert_repa,
    convert_sit,
    infer_model_config,
    load_lightningdit,
)
from dit_jax.models import DiT
from dit_jax.models.layers import rope_2d_tables

torch = parity.optional("torch")
dit_ref = parity.optional("torch_dit_reference")  # needs torch
ref = parity.optional("torch_lightningdit_reference")  # needs torch
needs_torch = parity.requires("torch")

NUM_CLASSES = 10
T_B = np.array([0.0, 0.25, 0.999, 0.5], np.float32)
Y_B = np.array([0, 3, NUM_CLASSES, 9])  # NUM_CLASSES is the null (CFG) class
BASE = dict(num_classes=NUM_CLASSES, class_dropout=0.1)
LIGHTNING = dict(mlp="swiglu", norm="rmsnorm", rope=True)

LIGHTNINGDIT_CONFIGS = {
    "p1_c8_swiglu_rms_rope": dict(
        image_size=8, patch_size=1, in_channels=8, hidden_size=64, depth=2, num_heads=4, **LIGHTNING
    ),
    "p2_c4_all_qknorm_sigma": dict(
        image_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        learn_sigma=True,
        qk_norm=True,
        **LIGHTNING,
    ),
    "p2_c4_rope_layernorm_qknorm_gelu": dict(
        image_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=48,
        depth=1,
        num_heads=3,
        rope=True,
        qk_norm=True,
    ),
    "p1_c2_swiglu_ratio2.5_rms_sigma": dict(
        image_size=4,
        patch_size=1,
        in_channels=2,
        hidden_size=32,
        depth=2,
        num_heads=4,
        mlp_ratio=2.5,  # SwiGLU width int(2/3 * int(32 * 2.5)) = 53
        learn_sigma=True,
        mlp="swiglu",
        norm="rmsnorm",
    ),
}
REPA_CONFIGS = {
    "p2_depth1_of_2": dict(
        image_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, repa_depth=1
    ),
    "p4_depth2_of_2_qknorm": dict(
        image_size=16,
        patch_size=4,
        in_channels=4,
        hidden_size=48,
        depth=2,
        num_heads=3,
        repa_depth=2,
        qk_norm=True,
    ),
}
REPA_WIDTHS = dict(repa_projector_dim=40, repa_feature_dim=24)
# max |ours - ref64| / max |torch32 - ref64| measured up to 1.63 over 42 random LightningDiT weights
# and inputs (AMD EPYC; errors ~1e-6): 2.5 instead of tests/parity.py's 2.
MULTIPLE = 2.5


def model_config(**fields) -> config_lib.Model:
    return config_lib.Model(**{**BASE, **fields})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replaces every parameter but pos_embed: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.01)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "pos_embed":
                continue
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                fan_in = int(np.prod(param.shape[1:])) if param.ndim > 1 else 100
                param.copy_(torch.randn_like(param) * fan_in**-0.5)
    return model.eval()


def torch_lightningdit(cfg: config_lib.Model) -> ref.LightningDiT:
    return randomize(
        ref.LightningDiT(
            input_size=cfg.image_size,
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels,
            hidden_size=cfg.hidden_size,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            class_dropout_prob=cfg.class_dropout,
            num_classes=cfg.num_classes,
            learn_sigma=cfg.learn_sigma,
            use_qknorm=cfg.qk_norm,
            use_swiglu=cfg.mlp == "swiglu",
            use_rope=cfg.rope,
            use_rmsnorm=cfg.norm == "rmsnorm",
        )
    )


def torch_repa(cfg: config_lib.Model, z_dims=None) -> ref.REPASiT:
    return randomize(
        ref.REPASiT(
            input_size=cfg.image_size,
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels,
            hidden_size=cfg.hidden_size,
            encoder_depth=cfg.repa_depth,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            class_dropout_prob=cfg.class_dropout,
            num_classes=cfg.num_classes,
            z_dims=z_dims or [cfg.repa_feature_dim],
            projector_dim=cfg.repa_projector_dim,
            qk_norm=cfg.qk_norm,
        )
    )


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def inputs(cfg: config_lib.Model) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((len(T_B), cfg.in_channels, cfg.image_size, cfg.image_size), np.float32)


def jax_forward(cfg: config_lib.Model, params: dict, x_BCHW: np.ndarray, *, features: bool = False):
    """Our model (XLA attention, jit) on NCHW inputs; returns NCHW outputs (and features)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(cfg, "xla", rngs=nnx.Rngs(0))))

    def apply(p, x, t, y):
        model = nnx.merge(graphdef, p)
        return model.forward_with_features(x, t, y) if features else (model(x, t, y), None)

    out, z = jax.jit(apply)(params, x_BCHW.transpose(0, 2, 3, 1), T_B, jnp.asarray(Y_B))
    return np.asarray(out).transpose(0, 3, 1, 2), None if z is None else np.asarray(z)


def reference_runs(model: torch.nn.Module, x_BCHW: np.ndarray) -> tuple:
    """The reference's outputs on (x, T_B, Y_B) in float32, and from a float64 copy in float64
    (REPA: {"output", "features"})."""

    def run(module, dtype):
        with torch.no_grad():
            out = module(
                torch.from_numpy(x_BCHW).to(dtype), torch.from_numpy(T_B).to(dtype), torch.as_tensor(Y_B)
            )
        if isinstance(out, tuple):  # REPA: (output, [projected features])
            return {"output": out[0].numpy(), "features": out[1][0].numpy()}
        return out.numpy()

    return run(model, torch.float32), run(parity.float64(model), torch.float64)


# --- numerical parity (tests/parity.py) -----------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("scan", [False, True], ids=["per_block", "scanned"])
@pytest.mark.parametrize("name", list(LIGHTNINGDIT_CONFIGS))
def test_lightningdit_matches_reference(name, scan):
    cfg = model_config(**LIGHTNINGDIT_CONFIGS[name], scan_blocks=scan)
    model = torch_lightningdit(cfg)
    x = inputs(cfg)
    ref32, ref64 = reference_runs(model, x)
    got, _ = jax_forward(cfg, convert_lightningdit(model.state_dict(), cfg), x)
    assert np.abs(ref64).mean() > 0.1  # the comparison is not between near-zero outputs
    parity.assert_parity(name, got, ref32, ref64, multiple=MULTIPLE)


@needs_torch
@pytest.mark.parametrize("scan", [False, True], ids=["per_block", "scanned"])
@pytest.mark.parametrize("name", list(REPA_CONFIGS))
def test_repa_output_and_projector_features_match_reference(name, scan):
    cfg = model_config(**REPA_CONFIGS[name], **REPA_WIDTHS, scan_blocks=scan)
    model = torch_repa(cfg)
    x = inputs(cfg)
    ref32, ref64 = reference_runs(model, x)
    got, z = jax_forward(cfg, convert_repa(model.state_dict(), cfg), x, features=True)
    assert z.shape == (len(T_B), cfg.num_patches, cfg.repa_feature_dim)
    assert np.abs(ref64["output"]).mean() > 0.1 and np.abs(ref64["features"]).mean() > 0.1
    parity.assert_parity(name, {"output": got, "features": z}, ref32, ref64, multiple=MULTIPLE)


@needs_torch
@pytest.mark.parametrize("scan", [False, True], ids=["per_block", "scanned"])
def test_sit_matches_reference(scan):
    """SiT has DiT's architecture with learned sigma (its sampler keeps the first half)."""
    cfg = model_config(image_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4)
    cfg = dataclasses.replace(cfg, learn_sigma=True, scan_blocks=scan)
    model = randomize(
        dit_ref.DiT(
            input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10
        )
    )
    x = inputs(cfg)
    ref32, ref64 = reference_runs(model, x)
    got, _ = jax_forward(cfg, convert_sit(model.state_dict(), cfg), x)
    assert np.abs(ref64).mean() > 0.1
    parity.assert_parity("sit", got, ref32, ref64, multiple=MULTIPLE)


def rope_tables_float64(head_dim: int, grid: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid)'s buffers, in float64 NumPy."""
    dim = head_dim // 2
    freqs = 1.0 / theta ** (np.arange(0, dim, 2)[: dim // 2] / dim)
    angles = np.repeat((np.arange(grid) / grid * grid)[:, None] * freqs[None], 2, axis=-1)
    rows = np.broadcast_to(angles[:, None, :], (grid, grid, dim))
    cols = np.broadcast_to(angles[None, :, :], (grid, grid, dim))
    table = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, head_dim)
    return np.cos(table), np.sin(table)


@needs_torch
def test_rope_tables_match_reference_buffers():
    for head_dim, grid in ((16, 8), (72, 16), (8, 7)):
        rope = ref.VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid)
        cos64, sin64 = rope_tables_float64(head_dim, grid)
        cos, sin = rope_2d_tables(head_dim, grid)
        parity.assert_parity(
            f"rope {head_dim} {grid}",
            {"cos": cos, "sin": sin},
            {"cos": rope.freqs_cos.numpy(), "sin": rope.freqs_sin.numpy()},
            {"cos": cos64, "sin": sin64},
        )


# --- model: features, remat, dtypes, axes ----------------------------------------------------------------


def abstract_model(cfg: config_lib.Model) -> DiT:
    return nnx.eval_shape(lambda: DiT(cfg, "xla", rngs=nnx.Rngs(0)))


def test_forward_with_features_needs_projector():
    model = abstract_model(model_config(image_size=4, hidden_size=16, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="set model.repa_depth"):
        model.forward_with_features(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))


def test_remat_bf16_and_logical_axes_with_all_options():
    fields = dict(LIGHTNINGDIT_CONFIGS["p2_c4_all_qknorm_sigma"], depth=1, repa_depth=1, **REPA_WIDTHS)
    cfg = model_config(**fields)
    abstract = abstract_model(cfg)
    for path, param in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = param.get_metadata().get("logical_axes")
        assert isinstance(axes, tuple) and len(axes) == len(param.get_value().shape), path
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(2)  # every parameter non-zero, so that all paths carry gradient
    params = jax.tree.map(lambda a: 0.05 * rng.standard_normal(a.shape, np.float32), nnx.to_pure_dict(state))
    graphdef_r = nnx.split(abstract_model(dataclasses.replace(cfg, remat="full")))[0]
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    t, y = jnp.array([0.1, 0.9]), jnp.array([0, 10])

    def loss(p, g):
        out, z = nnx.merge(g, p).forward_with_features(x, t, y)
        return jnp.sum(out**2) + jnp.sum(z**2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l1, g1), (l2, g2) = value_and_grad(params, graphdef), value_and_grad(params, graphdef_r)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        assert np.any(np.asarray(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    graphdef_bf16 = nnx.split(abstract_model(dataclasses.replace(cfg, dtype="bfloat16")))[0]
    out, z = jax.jit(lambda p: nnx.merge(graphdef_bf16, p).forward_with_features(x, t, y))(params)
    assert out.shape == (2, 8, 8, 8) and out.dtype == jnp.bfloat16 and z.shape == (2, 16, 24)
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(z)))


@needs_torch
def test_lightningdit_xl1_parameter_count():
    """LightningDiT-XL/1 on VA-VAE f16d32 latents (16x16x32): the same count as the PyTorch model
    (its fixed pos_embed included), about the 675M the paper states."""
    cfg = config_lib.Model(
        image_size=16, in_channels=32, learn_sigma=False, **config_lib.dit_variant("XL/2"), **LIGHTNING
    )
    cfg = dataclasses.replace(cfg, patch_size=1)
    abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) + cfg.num_patches * 1152
    with torch.device("meta"):
        theirs = ref.LightningDiT(
            input_size=16, patch_size=1, use_swiglu=True, use_rope=True, use_rmsnorm=True
        )
    assert ours == sum(p.numel() for p in theirs.parameters())
    assert abs(ours / 1e6 - 675) < 1


# --- infer_model_config ------------------------------------------------------------------------------


def _dit_state_dict(cfg: config_lib.Model) -> dict[str, np.ndarray]:
    return state_dict(
        dit_ref.DiT(
            input_size=cfg.image_size,
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels,
            hidden_size=cfg.hidden_size,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            num_classes=cfg.num_classes,
            learn_sigma=cfg.learn_sigma,
        )
    )


@needs_torch
def test_infer_model_config_round_trips():
    # The published sizes, shrunk in depth where the variant table is not needed.
    dit = config_lib.Model(
        image_size=16, in_channels=4, num_classes=10, learn_sigma=True, **config_lib.dit_variant("S/4")
    )
    assert infer_model_config(_dit_state_dict(dit), "dit") == dit
    assert infer_model_config(_dit_state_dict(dit), "sit") == dit
    for name, fields in LIGHTNINGDIT_CONFIGS.items():
        cfg = model_config(**fields)
        # The head count comes from the RoPE table or qk-norm weights; without either, it is given.
        heads = None if cfg.rope or cfg.qk_norm else cfg.num_heads
        sd = state_dict(torch_lightningdit(cfg))
        assert infer_model_config(sd, "lightningdit", num_heads=heads) == cfg, name
    cfg = model_config(**REPA_CONFIGS["p4_depth2_of_2_qknorm"], **REPA_WIDTHS)
    assert infer_model_config(state_dict(torch_repa(cfg)), "repa", repa_depth=2) == cfg
    # REPA's encoder_depth is not in the weights: REPA's default 8 unless given.
    deep = model_config(image_size=4, hidden_size=16, depth=8, num_heads=2, repa_depth=8, **REPA_WIDTHS)
    inferred = infer_model_config(state_dict(torch_repa(deep)), "repa", num_heads=2, dtype="bfloat16")
    assert inferred == dataclasses.replace(deep, dtype="bfloat16")


@needs_torch
def test_infer_model_config_errors():
    cfg = model_config(**REPA_CONFIGS["p2_depth1_of_2"], **REPA_WIDTHS)
    sd = state_dict(torch_repa(cfg))
    with pytest.raises(CheckpointFormatError, match="not a published variant .* pass num_heads"):
        infer_model_config(sd, "repa", repa_depth=1)
    with pytest.raises(
        CheckpointFormatError, match="default 8 exceeds this model's depth 2: pass repa_depth"
    ):
        infer_model_config(sd, "repa", num_heads=4)
    assert infer_model_config(sd, "repa", repa_depth=1, num_heads=4) == cfg
    with pytest.raises(CheckpointFormatError, match=r"a REPA projector \(projectors\.0\.0\.weight\).*'repa'"):
        infer_model_config(sd, "sit", num_heads=4)
    lightning = state_dict(torch_lightningdit(model_config(**LIGHTNINGDIT_CONFIGS["p1_c8_swiglu_rms_rope"])))
    with pytest.raises(CheckpointFormatError, match=r"a SwiGLU MLP .*'lightningdit' checkpoint"):
        infer_model_config(lightning, "dit")
    with pytest.raises(CheckpointFormatError, match="has no projector .* load it as family 'sit'"):
        infer_model_config(_dit_state_dict(dataclasses.replace(cfg, repa_depth=0)), "repa")
    with pytest.raises(CheckpointFormatError, match="num_heads=8, but .* imply 4 heads"):
        infer_model_config(lightning, "lightningdit", num_heads=8)
    with pytest.raises(CheckpointFormatError, match="has no 'x_embedder.proj.weight'"):
        infer_model_config({"foo": np.zeros(1)}, "dit")
    with pytest.raises(ValueError, match="unknown model family"):
        infer_model_config(lightning, "mmdit")


# --- converter errors ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_small():
    cfg = model_config(**LIGHTNINGDIT_CONFIGS["p2_c4_all_qknorm_sigma"])
    return cfg, state_dict(torch_lightningdit(cfg))


@needs_torch
def test_dit_checkpoint_given_to_lightningdit_names_the_keys(lightning_small):
    cfg, _ = lightning_small
    plain = dataclasses.replace(cfg, mlp="gelu", norm="layernorm", rope=False, qk_norm=False)
    with pytest.raises(CheckpointFormatError) as err:
        convert_lightningdit(_dit_state_dict(plain), cfg)
    message = str(err.value)
    assert message.startswith("LightningDiT checkpoint does not match the model config (")
    for name in (
        "missing keys: blocks.{0..1}.attn.k_norm.weight",
        "blocks.{0..1}.mlp.w12.weight",
        "blocks.{0..1}.norm1.weight",
        "feat_rope.freqs_cos",
        "final_layer.norm_final.weight",
        "unexpected keys: blocks.{0..1}.mlp.fc1.bias",
        "lacks RoPE tables",
    ):
        assert name in message, (name, message)


@needs_torch
def test_lightningdit_shape_mismatch_names_parameter(lightning_small):
    cfg, sd = lightning_small
    sd = dict(sd, **{"blocks.1.mlp.w12.weight": np.zeros((8, 32), np.float32)})
    message = "blocks.1.mlp.w12.weight (-> blocks/1/mlp/w_in): checkpoint shape (8, 32), expected (170, 32)"
    with pytest.raises(CheckpointFormatError, match=re.escape(message)):
        convert_lightningdit(sd, cfg)


@needs_torch
def test_lightningdit_rope_table_and_wo_shift_are_checked(lightning_small):
    cfg, sd = lightning_small
    with pytest.raises(
        CheckpointFormatError, match="'feat_rope.freqs_sin' differs from LightningDiT's 2-D RoPE"
    ):
        convert_lightningdit(dict(sd, **{"feat_rope.freqs_sin": sd["feat_rope.freqs_sin"] + 0.1}), cfg)
    no_shift = {k: v[: 4 * 32] if "blocks" in k and "adaLN" in k else v for k, v in sd.items()}
    with pytest.raises(CheckpointFormatError, match="wo_shift=True is not supported"):
        convert_lightningdit(no_shift, cfg)


@needs_torch
def test_repa_projector_needs_repa_depth():
    cfg = model_config(**REPA_CONFIGS["p2_depth1_of_2"], **REPA_WIDTHS)
    sd = state_dict(torch_repa(cfg, z_dims=[24, 16]))
    with pytest.raises(CheckpointFormatError, match=r"set model\.repa_depth") as err:
        convert_repa(sd, dataclasses.replace(cfg, repa_depth=0))
    assert "unexpected keys: projectors.0.0.bias" in str(err.value)
    with pytest.raises(CheckpointFormatError, match="dit_jax supports one"):
        convert_repa(sd, cfg)
    # A plain DiT/SiT converter rejects a REPA checkpoint the same way.
    with pytest.raises(CheckpointFormatError, match="official DiT checkpoint does not match"):
        convert_official_dit(sd, dataclasses.replace(cfg, repa_depth=0))


@needs_torch
def test_load_lightningdit_training_checkpoint_with_ddp_prefix(lightning_small, tmp_path):
    cfg, sd = lightning_small
    path = tmp_path / "0080000.pt"
    ema = {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}
    torch.save({"model": {k: v + 1 for k, v in ema.items()}, "ema": ema}, path)
    got = load_lightningdit(path, cfg)
    want = convert_lightningdit(sd, cfg)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))


# --- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, key",
    [
        (dict(mlp="geglu"), "model.mlp"),
        (dict(norm="batchnorm"), "model.norm"),
        (dict(rope=True, hidden_size=24, num_heads=4), "model.rope"),  # head_dim 6
        (dict(repa_depth=13), "model.repa_depth"),
        (dict(repa_depth=1, repa_feature_dim=0), "model.repa_feature_dim"),
    ],
)
def test_config_validation_names_the_key(fields, key):
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"config key '{key}'")):
        config_lib.Model(**fields)
