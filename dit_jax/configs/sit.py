"""SiT (Ma et al., "Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant
Transformers") on ImageNet-256 SD-VAE latents (32×32×4): DiT's backbone trained as a linear
interpolant with velocity prediction.

  dit-jax encode --data=/data/imagenet/train --vae=/weights/sd-vae-ft-ema --output=/data/in256_latents \
      --image_size=256 --hflip
  dit-jax train --config=configs/sit.py:variant=XL/2,data=/data/in256_latents --workdir=runs/sit_xl2

Published run (SiT-XL/2): AdamW lr 1e-4, no weight decay, batch 256, EMA 0.9999, uniform t,
7M steps. Expected FID-50K 2.06 with CFG 1.5 and the SDE sampler (250 steps); 2.15 with the
ODE sampler (dopri5). dit_jax samples the ODE (Heun, 125 steps = 250 evaluations). The network
sees time in SiT's convention (1 at data, predicting data − noise), so `dit-jax convert --from=sit`
checkpoints and runs trained here are interchangeable.

Args: variant (default XL/2), data=DIR (latents from `dit-jax encode`; default: synthetic), smoke.
"""

from dit_jax import recipes
from dit_jax.config import dit_variant


def get_config(arg: str = ""):
    args = {"variant": "XL/2", **recipes.parse_arg(arg)}
    recipes.check_args(args, ("variant", "data", "smoke"), "sit")
    c = recipes.base(total_steps=7_000_000, batch_size=256)
    c.data = recipes.latent_data(args, image_size=32, channels=4)
    c.model = dict(
        image_size=32,
        in_channels=4,
        num_classes=1000,
        class_dropout=0.1,
        learn_sigma=True,
        **dit_variant(args["variant"]),
    )
    c.objective = dict(kind="flow", t_sampling="uniform", time_scale=1.0, time_direction="noise_to_data")
    c.sampler = dict(kind="heun", num_steps=125, cfg_scale=1.5)
    c.optim = dict(lr=1e-4, weight_decay=0.0, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False)
    return recipes.shrink_for_smoke(c) if "smoke" in args else c
