"""Generating images from a trained model: jitted, sharded over the data-parallel axes.

A model trained on VAE latents (data.source = "latents") has its samples decoded to pixels by the
VAE (z / scaling_factor + shift_factor -> decode -> [-1, 1]), sharded like the sampling, so the
images returned (and written to samples.npz) are always uint8 pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dit_jax import config as config_lib
from dit_jax.data import latents as latents_lib
from dit_jax.data.errors import DataError
from dit_jax.data.pixels import to_uint8
from dit_jax.diffusion import make_objective, sample
from dit_jax.models.build import ModelSpec, apply_model
from dit_jax.parallel import mesh as mesh_lib


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """0, 1, ..., K-1, 0, 1, ... : every class equally often (up to one)."""
    return (np.arange(num_samples) % max(num_classes, 1)).astype(np.int32)


class LatentDecoder:
    """jit(z_BHWC diffusion latents) -> images [B, H', W', C'] in [-1, 1], batch split over the
    data-parallel axes, VAE weights replicated. Scaling and shift come from the latents data set
    (`info`), else from the VAE's own config (e.g. a workdir from `dit-jax convert --vae`)."""

    def __init__(self, vae_path: str, mesh, info: latents_lib.LatentsInfo | None = None, *, channels: int):
        from flax import nnx

        from dit_jax.interop import load_diffusers_vae

        vae = load_diffusers_vae(vae_path)
        if vae.cfg.latent_channels != channels:
            raise DataError(
                f"the VAE {vae_path!r} has {vae.cfg.latent_channels} latent channels but the model's "
                f"latents have {channels}; set data.vae to the VAE the latents were encoded with"
            )
        graphdef, params = nnx.split(vae)
        self.params = jax.device_put(params, mesh_lib.replicated(mesh))
        if info is not None:
            scale, shift = info.scaling_factor, info.shift_factor
        else:
            scale, shift = vae.cfg.scaling_factor, vae.cfg.shift_factor or 0.0

        def run(params, z_BHWC):
            model = nnx.merge(graphdef, params)
            return jnp.clip(model.decode(z_BHWC.astype(jnp.float32) / scale + shift), -1.0, 1.0)

        batch = mesh_lib.batch_sharding(mesh)
        self._fn = jax.jit(run, in_shardings=(mesh_lib.replicated(mesh), batch), out_shardings=batch)

    def __call__(self, z_BHWC: jax.Array) -> jax.Array:
        return self._fn(self.params, z_BHWC)


def make_decoder(cfg: config_lib.Config, mesh) -> LatentDecoder | None:
    """The VAE decoder of a latents run (data.vae, else the data set's VAE), or of any run with
    data.vae set (a converted checkpoint); None in pixel space."""
    channels = cfg.model.in_channels
    if cfg.data.source == "latents":
        info = latents_lib.load_info(cfg.data.path)
        return LatentDecoder(latents_lib.vae_path(cfg.data, info), mesh, info, channels=channels)
    if cfg.data.vae:
        return LatentDecoder(cfg.data.vae, mesh, channels=channels)
    return None


def make_sample_fn(cfg: config_lib.Config, spec: ModelSpec, sampler: config_lib.Sampler, mesh):
    """jit(params, noise_key, step_key, index_B, y_B) -> images [B, H, W, C] in model space, batch
    split over the data-parallel axes.

    Sample i starts from the noise `normal(fold_in(noise_key, i))`, whatever batch or device it
    lands on, so the deterministic samplers (Euler, Heun, DDIM with eta 0) give the same images for
    any batch size and device count; DDPM's per-step noise comes from `step_key`, one per batch.
    """
    objective = make_objective(cfg.objective, cfg.model.learn_sigma)
    m = cfg.model
    shape = (m.image_size, m.image_size, m.in_channels)

    def run(params, noise_key, step_key, index_B, y_B):
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), shape))(index_B)
        noise = jax.lax.with_sharding_constraint(noise, mesh_lib.batch_sharding(mesh))
        model_fn = functools.partial(apply_model, spec.graphdef, params)
        return sample(model_fn, objective, sampler, step_key, noise, y_B, null_label=m.num_classes)

    batch = mesh_lib.batch_sharding(mesh)
    return jax.jit(run, in_shardings=(None, None, None, batch, batch), out_shardings=batch)


def batch_plan(num_samples: int, batch_size: int, mesh) -> tuple[int, int]:
    """(batch, number of batches): batches no larger than needed, a multiple of the data-parallel
    size (the last one padded at most to that multiple, never to `batch_size`)."""
    if num_samples < 1:
        raise ValueError(f"need at least one sample, got {num_samples}")
    dp = mesh_lib.data_parallel_size(mesh)
    batch = min(max(batch_size, 1), num_samples)
    batch = -(-batch // dp) * dp
    return batch, math.ceil(num_samples / batch)


def _global(x: np.ndarray, mesh) -> jax.Array:
    """A host array that every process holds whole, as a global array split over the batch axes."""
    return jax.make_array_from_callback(x.shape, mesh_lib.batch_sharding(mesh), lambda idx: x[idx])


def generate(
    cfg: config_lib.Config,
    spec: ModelSpec,
    params: Any,
    labels: np.ndarray,
    *,
    mesh,
    seed: int = 0,
    batch_size: int = 256,
    sampler: config_lib.Sampler | None = None,
    progress: bool = True,
    decoder: LatentDecoder | None = None,
    sample_fn=None,
) -> np.ndarray:
    """Samples one image per label; returns uint8 [N, H, W, C].

    Batches hold at most `batch_size` images and no more than the request needs (rounded up to the
    data-parallel size); sample i's starting noise depends on (seed, i) only (see make_sample_fn).
    A latents run's samples are decoded by `decoder` (default: `make_decoder(cfg, mesh)`, which
    loads the VAE). `sample_fn`: a `make_sample_fn(cfg, spec, sampler, mesh)` to reuse (and its
    compilation) across calls. `progress`: a progress bar over images (process 0).
    """
    sampler = sampler or cfg.sampler
    batch, num_batches = batch_plan(len(labels), batch_size, mesh)
    decoder = decoder or make_decoder(cfg, mesh)
    fn = sample_fn or make_sample_fn(cfg, spec, sampler, mesh)
    noise_key, step_keys = (jax.random.fold_in(jax.random.key(seed), i) for i in range(2))
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(labels), unit="img", desc="sampling")
    out = []
    with jax.set_mesh(mesh):
        for b in range(num_batches):
            index = np.arange(b * batch, (b + 1) * batch, dtype=np.int32)
            y = np.pad(labels[b * batch : (b + 1) * batch], (0, max(0, index[-1] + 1 - len(labels))))
            step_key = jax.random.fold_in(step_keys, b)
            index, y = (_global(x.astype(np.int32), mesh) for x in (index, y))
            images = fn(params, noise_key, step_key, index, y)
            if decoder is not None:
                images = decoder(images)
            if jax.process_count() > 1:  # every process gets the whole batch
                images = multihost_utils.process_allgather(images, tiled=True)
            images = to_uint8(jax.device_get(images))[: len(labels) - b * batch]
            out.append(images)
            if bar is not None:
                bar.update(len(images))
    if bar is not None:
        bar.close()
    return np.concatenate(out)


def with_overrides(sampler: config_lib.Sampler, **overrides) -> config_lib.Sampler:
    """The sampler config with non-None overrides applied (validated again)."""
    return dataclasses.replace(sampler, **{k: v for k, v in overrides.items() if v is not None})


def save_npz(path: str, images_NHWC: np.ndarray, labels_N: np.ndarray) -> None:
    """ADM convention: arr_0 uint8 N×H×W×C, arr_1 int labels."""
    np.savez(path, arr_0=images_NHWC.astype(np.uint8), arr_1=labels_N.astype(np.int64))
