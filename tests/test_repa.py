"""REPA: the alignment loss against PyTorch (REPA's own formula), the digits encoder, and training."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest

from dit_jax import config as config_lib
from dit_jax.config_files import apply_overrides, load_config_file
from dit_jax.train import loop, repa

torch = parity.optional("torch")
needs_torch = parity.requires("torch")


@needs_torch
def test_alignment_loss_matches_repa_formula():
    """REPA's train loss: F.normalize both sides, -(z * z_tilde).sum(-1), mean over tokens."""
    rng = np.random.default_rng(0)
    z_pred = rng.normal(size=(3, 16, 24)).astype(np.float32)
    z_target = rng.normal(size=(3, 16, 24)).astype(np.float32)
    z_target[1, 2] = 0.0  # a zero feature vector: normalize() leaves it zero

    def reference(dtype):
        zp = torch.nn.functional.normalize(torch.tensor(z_pred, dtype=dtype), dim=-1)
        zt = torch.nn.functional.normalize(torch.tensor(z_target, dtype=dtype), dim=-1)
        return (-(zp * zt).sum(dim=-1)).mean(dim=-1).numpy()

    got = np.asarray(jax.jit(repa.alignment_loss)(z_pred, z_target))
    # Floor 1e-7 (~7 float32 ulp of these losses of ~0.2): the errors are ~1e-8.
    parity.assert_parity(
        "alignment loss", got, reference(torch.float32), reference(torch.float64), floor=1e-7
    )
    zero = jnp.zeros((1, 4, 24))
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda z: repa.alignment_loss(z, zero + 1).sum())(zero))))
    # No gradient reaches the (frozen) target features.
    grad = jax.grad(lambda t: repa.alignment_loss(jnp.asarray(z_pred), t).sum())(jnp.asarray(z_target))
    assert not np.any(np.asarray(grad))


def test_pool_to_grid_is_block_average():
    f = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    got = np.asarray(repa.pool_to_grid(jnp.asarray(f), 2))
    ref = f.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)).reshape(2, 4, 3)
    np.testing.assert_allclose(got, ref)
    with pytest.raises(repa.RepaError, match="token grid"):
        repa.pool_to_grid(jnp.asarray(f), 3)


def repa_config(tiny_config, weight, **repa_fields):
    return tiny_config(
        total_steps=30,
        log_every=1,
        checkpoint_every=30,
        optim=dict(lr=1e-3, warmup_steps=0, schedule="constant"),
        model=dict(repa_depth=1, repa_projector_dim=64, repa_feature_dim=32),
        repa=config_lib.Repa(weight=weight, encoder="digits_classifier", **repa_fields),
    )


def repa_losses(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"repa_loss"' in line]


def test_repa_recipe_trains_and_aligns_the_projector(tmp_path, data_dir):
    """configs/repa.py:smoke (digits, aligned to the digits classifier's patch features) end to end:
    the projector learns to predict the features, so the alignment loss (negative cosine) falls
    well below its initial value; `loss` stays finite."""
    overrides = [
        f"--config.data.data_dir='{data_dir}'",
        "--config.total_steps=30",
        "--config.log_every=1",
        "--config.checkpoint_every=30",
        "--config.optim.lr=1e-3",
    ]
    cfg = config_lib.from_dict(apply_overrides(load_config_file("configs/repa.py:smoke"), overrides))
    encoder = repa.make_encoder(cfg)
    x = jnp.zeros((2, 8, 8, 1)) - 1.0
    assert encoder.apply(encoder.params, x).shape == (2, 16, 32)  # 4x4 tokens for patch 2 on 8x8
    loop.train(cfg, str(tmp_path / "repa"))
    records = repa_losses(tmp_path / "repa")
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[0]["repa_loss"], records[-1]["repa_loss"]
    assert -1.0 <= last < first - 0.3, (first, last)
    assert all(np.isfinite(r["loss"]) for r in records)


def tiny_dinov2_checkpoint(path) -> "torch.nn.Module":
    """A random DINOv2 with ViT-S's width (so the head count is inferred) and one block."""
    import torch_dinov2_reference as ref  # needs torch

    torch.manual_seed(0)
    model = ref.DinoVisionTransformer(img_size=70, patch_size=14, embed_dim=384, depth=1, num_heads=6).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
                param.copy_(torch.randn_like(param) * (param.shape[-1] if param.ndim == 2 else 100) ** -0.5)
    torch.save(model.state_dict(), path)
    return model


@needs_torch
def test_dinov2_encoder_matches_repa_preprocessing_and_torch_vit(tiny_config, tmp_path):
    """Encoder.apply on uint8 RGB images == REPA's preprocess_raw_image + the PyTorch ViT's
    normalised patch tokens (here 28 px -> a 2x2 grid, the model's 8 px / patch 4 token grid)."""
    import torch_dinov2_reference as ref  # needs torch

    weights = tmp_path / "dinov2_tiny.pth"
    model = tiny_dinov2_checkpoint(weights)
    base = tiny_config()
    cfg = dataclasses.replace(
        base,
        model=dataclasses.replace(
            base.model, in_channels=3, patch_size=4, repa_depth=1, repa_projector_dim=32, repa_feature_dim=384
        ),
        data=dataclasses.replace(base.data, channels=3),
        repa=config_lib.Repa(weight=0.5, encoder_weights=str(weights), encoder_image_size=28),
    )
    encoder = repa.make_encoder(cfg)
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)

    def reference(module, dtype):
        with torch.no_grad(), parity.float32_resize_positions():
            x = ref.preprocess_raw_image(torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype), 28)
            return module.forward_features(x)["x_norm_patchtokens"].numpy()

    ref32, ref64 = reference(model, torch.float32), reference(parity.float64(model), torch.float64)
    got = np.asarray(jax.jit(encoder.apply)(encoder.params, images))
    assert got.shape == (3, 4, 384)
    # [-1, 1] float images give the same features as their uint8 originals.
    as_float = images.astype(np.float32) * (2 / 255) - 1
    got_from_float = np.asarray(encoder.apply(encoder.params, as_float))
    parity.assert_parity(
        "dinov2 encoder",
        {"uint8": got, "[-1, 1]": got_from_float},
        {"uint8": ref32, "[-1, 1]": ref32},
        {"uint8": ref64, "[-1, 1]": ref64},
    )


def test_repa_config_errors(tiny_config, tmp_path):
    with pytest.raises(config_lib.ConfigError, match="model.repa_depth"):
        tiny_config(repa=config_lib.Repa(weight=0.5))
    with pytest.raises(config_lib.ConfigError, match="repa.encoder"):
        config_lib.Repa(encoder="clip")
    cfg = repa_config(tiny_config, 0.5)
    synthetic = dataclasses.replace(cfg.data, source="synthetic")
    with pytest.raises(repa.RepaError, match="data.source"):
        repa.make_encoder(dataclasses.replace(cfg, data=synthetic))
    with pytest.raises(repa.RepaError, match="repa_feature_dim=32"):
        repa.make_encoder(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, repa_feature_dim=768))
        )
    dino = dataclasses.replace(cfg, repa=config_lib.Repa(weight=0.5))
    with pytest.raises(repa.RepaError, match="encoder_weights"):
        repa.make_encoder(dino)
