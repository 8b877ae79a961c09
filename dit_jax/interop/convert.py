"""`dit-jax convert`: a published checkpoint -> a dit_jax workdir that `sample`, `eval` and `train` use.

The model config is inferred from the weights; the objective and the sampler follow the family's
own code base (how its network sees time, what it predicts, its published sampling settings),
so sampling from the converted workdir runs the model as its authors did:

  family        objective (dit_jax terms)                         default sampler
  dit           ddpm eps, DiT's linear betas, learned sigma         ddpm 250 steps, CFG 1.5
  diffusers     as dit (diffusers' DiTTransformer2DModel)           ddpm 250 steps, CFG 1.5
  sit           flow, network time 1 - t in [0, 1], predicts x0-ε    heun 125 steps (250 evals), CFG 1.5
  repa          flow, network time t in [0, 1], predicts ε - x0      heun 125 steps, CFG 1.8 for t ≤ 0.7
  lightningdit  as sit                                              euler 250 steps, CFG 6.7 for t ≤ 0.875

Every sampler setting can be overridden at `dit-jax sample` time (--sampler, --num_steps, --cfg_scale).
The step-0 train state holds the converted weights as both params and EMA, with a fresh optimizer
state, so `dit-jax train --workdir=...` fine-tunes from it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import config as config_lib
from dit_jax.interop.torch_checkpoint import CheckpointFormatError, read_torch_checkpoint

FAMILIES = ("dit", "diffusers", "sit", "repa", "lightningdit")

_SIT_TIME = dict(kind="flow", time_scale=1.0, time_direction="noise_to_data")
_FAMILY_DEFAULTS: dict[str, tuple[dict, dict]] = {
    # family -> (objective fields, sampler fields)
    "dit": (dict(kind="ddpm"), dict(kind="ddpm", num_steps=250, cfg_scale=1.5)),
    "diffusers": (dict(kind="ddpm"), dict(kind="ddpm", num_steps=250, cfg_scale=1.5)),
    "sit": (_SIT_TIME, dict(kind="heun", num_steps=125, cfg_scale=1.5)),
    "repa": (
        dict(kind="flow", time_scale=1.0, time_direction="data_to_noise"),
        dict(kind="heun", num_steps=125, cfg_scale=1.8, guidance_high=0.7),
    ),
    "lightningdit": (_SIT_TIME, dict(kind="euler", num_steps=250, cfg_scale=6.7, guidance_high=0.875)),
}


def family_config(family: str, model: config_lib.Model, *, vae: str = "") -> config_lib.Config:
    """The run config of a converted `family` checkpoint whose network is `model`."""
    if family not in FAMILIES:
        raise config_lib.ConfigError(
            f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}"
        )
    objective, sampler = _FAMILY_DEFAULTS[family]
    data = dict(
        source="synthetic",
        image_size=model.image_size,
        channels=model.in_channels,
        num_classes=model.num_classes,
    )
    if vae:
        data["vae"] = vae
    return config_lib.Config(
        total_steps=1,
        model=model,
        objective=config_lib.Objective(**objective),
        sampler=config_lib.Sampler(**sampler),
        optim=config_lib.Optim(ema_warmup=False),
        data=config_lib.Data(**data),
    )


def read_checkpoint(family: str, path: str, num_heads: int | None = None) -> tuple[config_lib.Model, dict]:
    """(inferred model config, params pure dict) of a checkpoint file (or a diffusers folder).

    `num_heads` is needed only for sizes outside the published variant tables."""
    from dit_jax import interop

    if family == "diffusers":
        return interop.read_diffusers_dit(path)
    state_dict = read_torch_checkpoint(path)
    model = interop.infer_model_config(state_dict, family, num_heads=num_heads)
    convert = {
        "dit": interop.convert_official_dit,
        "sit": interop.convert_sit,
        "repa": interop.convert_repa,
        "lightningdit": interop.convert_lightningdit,
    }[family]
    return model, convert(state_dict, model)


def _check_tree(params: dict, abstract: dict, prefix: str = "") -> None:
    """Same keys and shapes as the model's parameter tree, naming the first difference."""
    if set(params) != set(abstract):
        missing, extra = sorted(set(abstract) - set(params)), sorted(set(params) - set(abstract))
        raise CheckpointFormatError(
            f"converted parameters do not fit the model at '{prefix or '/'}': missing {missing}, "
            f"unexpected {extra}"
        )
    for key, value in abstract.items():
        path = f"{prefix}/{key}"
        if isinstance(value, dict):
            _check_tree(params[key], value, path)
        elif tuple(np.shape(params[key])) != tuple(value.shape):
            raise CheckpointFormatError(
                f"parameter {path}: converted shape {tuple(np.shape(params[key]))}, model expects "
                f"{tuple(value.shape)}"
            )


def write_workdir(cfg: config_lib.Config, params: dict, workdir: str) -> None:
    """Writes config.json and a step-0 checkpoint (params = EMA = `params`, fresh optimizer), from
    which `dit-jax sample` / `eval` read the EMA and `dit-jax train` resumes (fine-tuning)."""
    from dit_jax import workdir as workdir_lib
    from dit_jax.models import layout
    from dit_jax.models.build import model_spec
    from dit_jax.train import state as state_lib
    from dit_jax.train.checkpoint import Checkpointer

    checkpoints = workdir_lib.checkpoint_dir(workdir)
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        raise FileExistsError(f"{workdir} already holds checkpoints; convert into a new, empty workdir")
    spec = model_spec(cfg)
    tx = state_lib.optimizer(cfg, spec)
    params = layout.for_model(params, cfg.model)  # converters give one subtree per block
    _check_tree(params, spec.abstract_params)
    dtypes = jax.tree.map(lambda a: a.dtype, spec.abstract_params)
    params = jax.tree.map(lambda p, d: np.asarray(p, d), params, dtypes)
    shardings = state_lib.state_shardings(cfg, spec, tx, workdir_lib.inference_mesh())

    def init(params: Any) -> state_lib.TrainState:
        return state_lib.TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params))

    state = jax.jit(init, out_shardings=shardings)(params)
    checkpointer = Checkpointer(checkpoints, keep=cfg.keep_checkpoints)
    checkpointer.save(0, state, None, config_lib.to_dict(cfg))
    checkpointer.close()
    workdir_lib.write_config(workdir, cfg)


def convert(
    family: str, input_path: str, workdir: str, *, vae: str = "", num_heads: int | None = None
) -> config_lib.Config:
    """Reads a `family` checkpoint and writes a ready-to-sample workdir; returns its config."""
    if family not in FAMILIES:
        raise config_lib.ConfigError(f"unknown --from={family!r}; expected one of {', '.join(FAMILIES)}")
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"checkpoint {input_path!r} not found")
    if vae and not os.path.isdir(vae):
        raise FileNotFoundError(f"VAE folder {vae!r} not found (a diffusers AutoencoderKL folder)")
    model, params = read_checkpoint(family, input_path, num_heads)
    cfg = family_config(family, model, vae=vae)
    write_workdir(cfg, params, workdir)
    return cfg
