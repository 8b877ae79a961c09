"""Shared pieces of the published-recipe configs (configs/dit.py, sit.py, repa.py, lightningdit.py).

A recipe config takes `:key=value,...` arguments:
  variant=XL/2     the model size (DiT table; LightningDiT uses patch 1)
  data=DIR         a latent data set written by `dit-jax encode` (default: the synthetic source
                   with the same element spec, for dry runs and throughput measurements)
  smoke            a tiny model, batch and step count on the same code path (tests, laptops)
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str) -> dict[str, str]:
    """ "variant=XL/2,data=/x,smoke" -> {"variant": "XL/2", "data": "/x", "smoke": ""}."""
    out = {}
    for item in filter(None, (part.strip() for part in arg.split(","))):
        key, _, value = item.partition("=")
        out[key] = value
    return out


def check_args(args: dict[str, str], known: tuple[str, ...], recipe: str) -> None:
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)} for {recipe}; known: {', '.join(known)} "
            f"(e.g. --config=configs/{recipe}.py:variant=XL/2,data=DIR)"
        )


def latent_data(args: dict[str, str], image_size: int, channels: int, num_classes: int = 1000) -> dict:
    """`data=DIR` -> the encoded latents there; otherwise the synthetic source of the same shape."""
    shape = dict(image_size=image_size, channels=channels, num_classes=num_classes)
    if args.get("data"):
        return dict(source="latents", path=args["data"], **shape)
    return dict(source="synthetic", **shape)


def base(total_steps: int, batch_size: int) -> ml_collections.ConfigDict:
    """The schedule keys every ImageNet recipe shares."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = total_steps
    c.batch_size = batch_size
    c.log_every = 100
    c.checkpoint_every = 50_000
    c.sample_every = 50_000
    c.eval_every = 0
    c.keep_checkpoints = 3
    c.grid_samples_per_class = 1
    c.mesh = dict(data=-1, fsdp=1, tensor=1, rules="fsdp")
    c.attention = dict(impl="auto")
    return c


def shrink_for_smoke(c: ml_collections.ConfigDict, *, image_size: int = 8) -> ml_collections.ConfigDict:
    """Same recipe, tiny: 2 blocks of width 32, 10 classes, a few steps (seconds on a CPU)."""
    c.total_steps = 4
    c.batch_size = 8
    c.log_every = 1
    c.checkpoint_every = 2
    c.sample_every = 0
    c.grid_samples_per_class = 1
    c.model.update(image_size=image_size, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    c.data.update(image_size=image_size, num_classes=10)
    c.sampler.num_steps = 4
    return c
