"""Our DiT against a transcription of the official PyTorch DiT, through the checkpoint converter.

Every parameter is re-randomised on the PyTorch side (the zero-initialised adaLN and final layers
included, biases too), so a wrong layout anywhere changes the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.interop import CheckpointFormatError, convert_official_dit, load_official_dit
from dit_jax.models import DiT

torch = parity.optional("torch")
ref = parity.optional("torch_dit_reference")  # needs torch
needs_torch = parity.requires("torch")

NUM_CLASSES = 10
T_B = np.array([0.0, 17.5, 999.0, 500.25], np.float32)
Y_B = np.array([0, 3, NUM_CLASSES, 9])  # NUM_CLASSES is the null (CFG) class

CONFIGS = {
    "p2_d1_c4_sigma": dict(
        image_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=4, learn_sigma=True
    ),
    "p4_d2_c1": dict(
        image_size=16, patch_size=4, in_channels=1, hidden_size=48, depth=2, num_heads=3, learn_sigma=False
    ),
    "p2_d3_c4_sigma_img16": dict(
        image_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=2, learn_sigma=True
    ),
    "p4_d2_c1_sigma_mlp2": dict(
        image_size=8,
        patch_size=4,
        in_channels=1,
        hidden_size=32,
        depth=2,
        num_heads=8,
        learn_sigma=True,
        mlp_ratio=2.0,
    ),
}


def model_config(**overrides) -> config_lib.Model:
    return config_lib.Model(**{"num_classes": NUM_CLASSES, "class_dropout": 0.1, **overrides})


def torch_dit(cfg: config_lib.Model, *, randomize: bool = True, seed: int = 0) -> ref.DiT:
    """The official model for `cfg` (eval mode); `randomize` replaces every weight but pos_embed."""
    torch.manual_seed(seed)
    model = ref.DiT(
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
    ).eval()
    if randomize:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name != "pos_embed":
                    fan_in = int(np.prod(param.shape[1:])) if param.ndim > 1 else 100
                    param.copy_(torch.randn_like(param) * fan_in**-0.5)
    return model


def official_state_dict(model: ref.DiT) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def jax_apply(cfg: config_lib.Model):
    """jit-compiled (params, x_BHWC, t_B, y_B) -> out_BHWC for `cfg` (XLA reference attention)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(cfg, "xla", rngs=nnx.Rngs(0))))
    return jax.jit(lambda params, x, t, y: nnx.merge(graphdef, params)(x, t, y))


def assert_matches_torch(name: str, cfg: config_lib.Model, model: ref.DiT, y_B: np.ndarray | None) -> None:
    """Our float32 output against the official model's in float32 and float64 (tests/parity.py)."""
    rng = np.random.default_rng(0)
    x_BCHW = rng.standard_normal((len(T_B), cfg.in_channels, cfg.image_size, cfg.image_size), np.float32)
    y_torch = torch.as_tensor(np.zeros(len(T_B), np.int64) if y_B is None else y_B)

    def run(module, dtype):
        with torch.no_grad():
            return module(
                torch.from_numpy(x_BCHW).to(dtype), torch.from_numpy(T_B).to(dtype), y_torch
            ).numpy()

    ref32, ref64 = run(model, torch.float32), run(parity.float64(model), torch.float64)
    params = convert_official_dit(model.state_dict(), cfg)  # torch tensors accepted directly
    got = jax_apply(cfg)(params, x_BCHW.transpose(0, 2, 3, 1), T_B, None if y_B is None else jnp.asarray(y_B))
    got = np.asarray(got).transpose(0, 3, 1, 2)
    assert got.shape == (len(T_B), cfg.out_channels, cfg.image_size, cfg.image_size)
    assert np.abs(ref64).mean() > 0.1  # the comparison is not between near-zero outputs
    parity.assert_parity(name, got, ref32, ref64)


@needs_torch
@pytest.mark.parametrize("scan", [False, True], ids=["per_block", "scanned"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_official_dit(name, scan):
    cfg = model_config(**CONFIGS[name], scan_blocks=scan)
    assert_matches_torch(name, cfg, torch_dit(cfg), Y_B)


@needs_torch
def test_unconditional_official_dit_folds_null_class_into_timestep_bias():
    """An official DiT with num_classes=0 adds its single (null) label row to c: we fold it away."""
    cfg = dataclasses.replace(model_config(**CONFIGS["p2_d1_c4_sigma"]), num_classes=0)
    model = torch_dit(cfg)
    params = convert_official_dit(official_state_dict(model), cfg)
    assert "y_embedder" not in params
    assert_matches_torch("unconditional", cfg, model, None)


@needs_torch
def test_params_tree_matches_model():
    cfg = model_config(**CONFIGS["p4_d2_c1"])
    params = convert_official_dit(official_state_dict(torch_dit(cfg)), cfg)
    _, state = nnx.split(nnx.eval_shape(lambda: DiT(cfg, "xla", rngs=nnx.Rngs(0))))
    want = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), nnx.to_pure_dict(state))
    got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    assert got == want


# --- initialisation and gradients -------------------------------------------------------------------


@needs_torch
def test_init_matches_official_scheme():
    """Per-parameter statistics of our init against the official init (converted to our layout)."""
    cfg = model_config(image_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=4)
    ours = nnx.to_pure_dict(nnx.split(DiT(cfg, "xla", rngs=nnx.Rngs(params=1)))[1])
    theirs = convert_official_dit(official_state_dict(torch_dit(cfg, randomize=False)), cfg)
    paths = jax.tree_util.tree_flatten_with_path(theirs)[0]
    assert len(paths) == len(jax.tree.leaves(ours))
    for path, want in paths:
        got = np.asarray(_get(ours, path))
        label = jax.tree_util.keystr(path)
        if path[0].key == "patch_embed" and path[-1].key == "bias":
            # PyTorch's default conv bias init, U(±1/sqrt(fan_in)), which _basic_init leaves alone.
            bound = 1 / np.sqrt(cfg.in_channels * cfg.patch_size**2)
            assert np.abs(got).max() <= bound and got.std() > 0.4 * bound, label
            continue
        if not np.any(want):
            assert not np.any(got), f"{label} should be exactly zero"
            continue
        assert abs(got.std() / want.std() - 1) < 0.1, f"{label}: std {got.std():.4g} vs {want.std():.4g}"
        assert np.abs(got).max() <= np.abs(want).max() * 1.2 + 1e-2, label
    assert abs(ours["y_embedder"]["table"].std() - 0.02) < 0.002
    for block in ours["blocks"].values():
        assert not np.any(block["adaln"]["kernel"]) and not np.any(block["adaln"]["bias"])


def _get(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return tree


def test_gradients_reach_zero_initialised_layers():
    cfg = model_config(**CONFIGS["p2_d1_c4_sigma"])
    model = DiT(cfg, "xla", rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(1)
    x = jnp.asarray(
        rng.standard_normal((len(T_B), cfg.image_size, cfg.image_size, cfg.in_channels)), jnp.float32
    )
    target = jnp.asarray(rng.standard_normal((*x.shape[:3], cfg.out_channels)), jnp.float32)

    def loss(p):
        return jnp.mean((nnx.merge(graphdef, p)(x, T_B, Y_B) - target) ** 2)

    @jax.jit
    def sgd_step(p):
        """(params after one SGD step with learning rate 1, gradients at p)."""
        g = jax.grad(loss)(p)
        return jax.tree.map(lambda a, b: a - b, p, g), g

    def norms(g):
        return {
            "final.proj": float(jnp.abs(g["final"]["proj"]["kernel"]).max()),
            "final.adaln": float(jnp.abs(g["final"]["adaln"]["kernel"]).max()),
            "block.adaln": float(jnp.abs(g["blocks"][0]["adaln"]["kernel"]).max()),
            "y_table": float(jnp.abs(g["y_embedder"]["table"]).max()),
        }

    params, grads = sgd_step(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # adaLN-Zero at init: the network is the zero function and only the final projection gets gradient.
    first = norms(grads)
    assert first["final.proj"] > 0
    assert first["final.adaln"] == first["block.adaln"] == first["y_table"] == 0
    # SGD opens the path: step 1 moves final.proj (then the adaLN layers get gradient), step 2 moves the
    # adaLN layers (then the conditioning embeddings get gradient).
    params, _ = sgd_step(params)
    _, grads = sgd_step(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert all(v > 0 for v in norms(grads).values()), norms(grads)


# --- converter errors -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    cfg = model_config(**CONFIGS["p2_d1_c4_sigma"])
    return cfg, official_state_dict(torch_dit(cfg))


@needs_torch
def test_missing_and_unexpected_keys_are_named(small):
    cfg, sd = small
    sd = dict(sd)
    del sd["blocks.0.attn.qkv.bias"]
    sd["blocks.7.mlp.fc1.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(CheckpointFormatError, match=r"missing keys: blocks\.0\.attn\.qkv\.bias") as err:
        convert_official_dit(sd, cfg)
    assert "unexpected keys: blocks.7.mlp.fc1.weight" in str(err.value)
    assert isinstance(err.value, ValueError)


@needs_torch
def test_depth_mismatch_names_extra_blocks(small):
    cfg, sd = small
    deeper = dataclasses.replace(cfg, depth=2)
    with pytest.raises(CheckpointFormatError, match=r"missing keys: blocks\.1\.adaLN_modulation\.1\.bias"):
        convert_official_dit(sd, deeper)


@needs_torch
def test_shape_mismatch_names_parameter_and_shapes(small):
    cfg, sd = small
    sd = dict(sd, **{"final_layer.linear.weight": np.zeros((16, 32), np.float32)})
    message = "final_layer.linear.weight (-> final/proj/kernel): checkpoint shape (16, 32), expected (32, 32)"
    with pytest.raises(CheckpointFormatError, match=re.escape(message)):
        convert_official_dit(sd, cfg)


@needs_torch
def test_label_table_without_null_class_is_explained():
    cfg = model_config(**CONFIGS["p2_d1_c4_sigma"])
    sd = official_state_dict(torch_dit(dataclasses.replace(cfg, class_dropout=0.0)))
    with pytest.raises(CheckpointFormatError, match="no null-class row"):
        convert_official_dit(sd, cfg)


@needs_torch
def test_pos_embed_is_checked(small):
    cfg, sd = small
    bad = dict(sd, pos_embed=sd["pos_embed"] + 0.1)
    with pytest.raises(CheckpointFormatError, match="'pos_embed' differs from DiT's fixed 2-D sin-cos"):
        convert_official_dit(bad, cfg)
    bigger = dataclasses.replace(cfg, image_size=16)
    with pytest.raises(CheckpointFormatError, match=r"'pos_embed': checkpoint shape \(1, 16, 32\)"):
        convert_official_dit(sd, bigger)


# --- .pt files ------------------------------------------------------------------------------------


@needs_torch
def test_load_official_dit_prefers_ema(small, tmp_path):
    cfg, sd = small
    ema = {k: torch.from_numpy(v + 1.0 if k != "pos_embed" else v) for k, v in sd.items()}
    path = tmp_path / "0001000.pt"
    torch.save(
        {
            "model": {k: torch.from_numpy(v) for k, v in sd.items()},
            "ema": ema,
            "opt": {"step": 3},
            "args": argparse.Namespace(model="DiT-S/2", image_size=256),
        },
        path,
    )
    got = load_official_dit(path, cfg)
    want = convert_official_dit(ema, cfg)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))

    plain = tmp_path / "plain.pt"
    torch.save(
        {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items() if k != "pos_embed"}
        | {"pos_embed": torch.from_numpy(sd["pos_embed"])},
        plain,
    )
    got = load_official_dit(plain, cfg)
    assert got["final"]["proj"]["kernel"].dtype == np.float32


@needs_torch
def test_load_official_dit_bad_files(small, tmp_path):
    cfg, _ = small
    with pytest.raises(FileNotFoundError, match="not found"):
        load_official_dit(tmp_path / "nope.pt", cfg)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="could not read"):
        load_official_dit(corrupt, cfg)
