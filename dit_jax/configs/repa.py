"""REPA (Yu et al., "Representation Alignment for Generation: Training Diffusion Transformers Is
Easier Than You Think"): SiT trained with its hidden states after 8 blocks aligned, through a
projector MLP, to DINOv2-B/14 patch features of the clean image.

  dit-jax encode --data=/data/imagenet/train --vae=/weights/sd-vae-ft-ema --output=/data/in256_latents \
      --image_size=256 --hflip --store_images
  dit-jax train --config=configs/repa.py:data=/data/in256_latents,dinov2=/weights/dinov2_vitb14_pretrain.pth \
      --workdir=runs/repa_sit_xl2

Published run (SiT-XL/2 + REPA): AdamW lr 1e-4, no weight decay, grad clip 1.0, batch 256, EMA
0.9999, linear interpolant with velocity prediction (t = 0 data, t = 1 noise, network time in
[0, 1]), alignment weight 0.5 at depth 8, projector 2048 wide, 4M steps (800 epochs). Expected
FID-50K 1.42 with CFG 1.8 applied for t ≤ 0.7 and the SDE sampler (250 steps); dit_jax samples
the ODE (Heun, 125 steps). DINOv2 weights: https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/
dinov2_vitb14_pretrain.pth (no download at run time).

Args: variant (default XL/2), data=DIR (latents written with --store_images), dinov2=PATH, smoke
(a tiny model on the digits, aligned to the project's digits classifier: runs in seconds).
"""

from dit_jax import recipes
from dit_jax.config import dit_variant


def get_config(arg: str = ""):
    args = {"variant": "XL/2", **recipes.parse_arg(arg)}
    recipes.check_args(args, ("variant", "data", "dinov2", "smoke"), "repa")
    c = recipes.base(total_steps=4_000_000, batch_size=256)
    c.data = recipes.latent_data(args, image_size=32, channels=4)
    if args.get("data"):
        c.data.with_images = True
    c.model = dict(
        image_size=32,
        in_channels=4,
        num_classes=1000,
        class_dropout=0.1,
        learn_sigma=False,
        repa_depth=8,
        repa_projector_dim=2048,
        repa_feature_dim=768,
        **dit_variant(args["variant"]),
    )
    c.repa = dict(
        weight=0.5, encoder="dinov2", encoder_weights=args.get("dinov2", ""), encoder_image_size=224
    )
    c.objective = dict(kind="flow", t_sampling="uniform", time_scale=1.0, time_direction="data_to_noise")
    c.sampler = dict(kind="heun", num_steps=125, cfg_scale=1.8, guidance_high=0.7)
    c.optim = dict(lr=1e-4, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, ema_warmup=False)
    if "smoke" not in args:
        return c
    c = recipes.shrink_for_smoke(c)
    c.data = dict(source="digits", image_size=8, channels=1, num_classes=10)
    c.model.update(in_channels=1, repa_depth=1, repa_projector_dim=64, repa_feature_dim=32)
    c.repa.encoder = "digits_classifier"
    return c
