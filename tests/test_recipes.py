"""The published recipes (configs/dit.py, sit.py, repa.py, lightningdit.py): their full configs hold the
papers' settings, and each trains end to end (`:smoke`) and samples on this machine."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dit_jax import config as config_lib
from dit_jax import sampling
from dit_jax.config_files import apply_overrides, load_config_file
from dit_jax.models import build
from dit_jax.train import loop


def recipe(name: str, arg: str = "", overrides: tuple[str, ...] = ()) -> config_lib.Config:
    spec = f"configs/{name}.py" + (f":{arg}" if arg else "")
    return config_lib.from_dict(apply_overrides(load_config_file(spec), list(overrides)))


def num_params(cfg: config_lib.Config) -> int:
    """Parameters counted as the PyTorch repos do: including the fixed pos_embed buffer-parameter."""
    spec = build.model_spec(cfg)
    m = cfg.model
    pos_embed = (m.image_size // m.patch_size) ** 2 * m.hidden_size
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(spec.abstract_params))) + pos_embed


def test_full_recipes_hold_the_published_settings():
    dit, sit = recipe("dit"), recipe("sit")
    repa, ldit = recipe("repa", "dinov2=/weights/dinov2_vitb14_pretrain.pth"), recipe("lightningdit")
    # DiT-XL/2 and SiT-XL/2: the same 675M backbone (DiT paper, Table 1); SiT differs in the objective.
    assert num_params(dit) == num_params(sit) == 675_129_632
    assert (dit.objective.kind, dit.sampler.kind, dit.sampler.cfg_scale) == ("ddpm", "ddpm", 1.5)
    assert (sit.objective.time_scale, sit.objective.time_direction) == (1.0, "noise_to_data")
    # REPA: SiT-XL/2 without learned sigma plus the projector; alignment weight 0.5 at depth 8.
    assert (repa.model.repa_depth, repa.repa.weight, repa.repa.encoder) == (8, 0.5, "dinov2")
    assert (repa.sampler.cfg_scale, repa.sampler.guidance_high, repa.optim.grad_clip) == (1.8, 0.7, 1.0)
    projector = 1152 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 768 + 768
    no_sigma = 1152 * 2 * 2 * 4 + 2 * 2 * 4  # the final projection's sigma half
    assert num_params(repa) == 675_129_632 + projector - no_sigma
    # LightningDiT-XL/1: patch 1 on 16x16x32 latents, the modern block, ~675M like DiT-XL.
    m = ldit.model
    assert (m.patch_size, m.in_channels, m.mlp, m.norm, m.qk_norm, m.rope) == (
        1,
        32,
        "swiglu",
        "rmsnorm",
        True,
        True,
    )
    assert (ldit.objective.t_sampling, ldit.objective.velocity_cosine_weight, ldit.optim.b2) == (
        "logit_normal",
        1.0,
        0.95,
    )
    assert abs(num_params(ldit) - 675e6) < 10e6


def test_recipe_args_are_checked():
    with pytest.raises(ValueError, match="unknown argument"):
        load_config_file("configs/sit.py:variant=XL/2,steps=3")


@pytest.mark.parametrize("name", ["dit", "sit", "lightningdit"])  # repa: tests/test_repa.py
def test_recipe_smoke_trains_and_samples(name, tmp_path):
    cfg = recipe(name, "smoke")
    workdir = str(tmp_path / name)
    final = loop.train(cfg, workdir)
    trainer = loop.Trainer(cfg, workdir)
    labels = sampling.balanced_labels(2, cfg.model.num_classes)
    images = sampling.generate(cfg, trainer.spec, final.ema, labels, mesh=trainer.mesh, batch_size=8)
    trainer.close()
    assert images.shape[0] == 2 and images.dtype == np.uint8
    with open(f"{workdir}/metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, cfg.total_steps + 1))
    assert all(np.isfinite(r["loss"]) for r in records)
