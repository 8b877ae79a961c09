"""REPA: the alignment loss against PyTorch (REPA's own formula), the digits encoder, and training."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import config as config_lib
from dit_jax.train import loop, repa

torch = pytest.importorskip("torch")


def test_alignment_loss_matches_repa_formula():
    """REPA's train loss: F.normalize both sides, -(z * z_tilde).sum(-1), mean over tokens."""
    rng = np.random.default_rng(0)
    z_pred = rng.normal(size=(3, 16, 24)).astype(np.float32)
    z_target = rng.normal(size=(3, 16, 24)).astype(np.float32)
    z_target[1, 2] = 0.0  # a zero feature vector: normalize() leaves it zero
    zp, zt = (
        torch.nn.functional.normalize(torch.tensor(z_pred), dim=-1),
        torch.nn.functional.normalize(torch.tensor(z_target), dim=-1),
    )
    ref = (-(zp * zt).sum(dim=-1)).mean(dim=-1).numpy()
    got = np.asarray(jax.jit(repa.alignment_loss)(z_pred, z_target))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    # No gradient reaches the (frozen) target features.
    grad = jax.grad(lambda t: repa.alignment_loss(jnp.asarray(z_pred), t).sum())(jnp.asarray(z_target))
    assert not np.any(np.asarray(grad))


def test_pool_to_grid_is_block_average():
    f = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    got = np.asarray(repa._pool_to_grid(jnp.asarray(f), 2))
    ref = f.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)).reshape(2, 4, 3)
    np.testing.assert_allclose(got, ref)
    with pytest.raises(repa.RepaError, match="token grid"):
        repa._pool_to_grid(jnp.asarray(f), 3)


def repa_config(tiny_config, weight):
    return tiny_config(
        total_steps=30,
        log_every=1,
        checkpoint_every=30,
        optim=dict(lr=1e-3, warmup_steps=0, schedule="constant"),
        model=dict(repa_depth=1, repa_projector_dim=64, repa_feature_dim=repa.encoder_dim(tiny_config())),
        repa=config_lib.Repa(weight=weight),
    )


def test_repa_training_aligns_the_projector(tiny_config, tmp_path):
    """On digits, the projector learns to predict the classifier's patch features: the alignment
    loss (negative cosine) falls well below its initial value, and `loss` = denoising + weight x it."""
    cfg = repa_config(tiny_config, weight=0.5)
    encoder = repa.make_encoder(cfg)
    x = jnp.zeros((2, 8, 8, 1)) - 1.0
    assert encoder(x).shape == (2, 16, repa.encoder_dim(cfg))  # 4x4 tokens for patch 2 on 8x8
    loop.train(cfg, str(tmp_path / "repa"))
    with open(tmp_path / "repa" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if '"repa_loss"' in line]
    first, last = records[0]["repa_loss"], records[-1]["repa_loss"]
    assert -1.0 <= last < first - 0.3, (first, last)
    assert all(np.isfinite(r["loss"]) for r in records)


def test_repa_config_errors(tiny_config):
    with pytest.raises(config_lib.ConfigError, match="model.repa_depth"):
        tiny_config(repa=config_lib.Repa(weight=0.5))
    with pytest.raises(config_lib.ConfigError, match="repa.encoder"):
        config_lib.Repa(encoder="dinov2")
    cfg = repa_config(tiny_config, 0.5)
    synthetic = dataclasses.replace(cfg.data, source="synthetic")
    with pytest.raises(repa.RepaError, match="data.source"):
        repa.make_encoder(dataclasses.replace(cfg, data=synthetic))
