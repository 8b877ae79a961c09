"""LightningDiT (Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent
Diffusion Models") on ImageNet-256 VA-VAE latents (16×16×32, patch 1).

  dit-jax train --config=configs/lightningdit.py:data=/data/in256_vavae_latents --workdir=runs/ldit_xl1

Published run (LightningDiT-XL/1): SwiGLU, RMSNorm, 2-D RoPE, QK-norm; rectified flow with
logit-normal t and the velocity direction (cosine) loss; AdamW lr 2e-4, β2 0.95, no weight decay,
grad clip 1.0, batch 1024, EMA 0.9999. Expected FID-50K 2.11 after 64 epochs (80k steps) and 1.35
after 800 epochs (1M steps), with CFG 6.7 applied for t ≤ 0.875 (their cfg_interval_start 0.125)
and their timestep shift, 250 Euler steps.

The VA-VAE tokenizer is not ported: `dit-jax encode` writes SD-VAE latents (4 channels), so for
the published numbers encode with VA-VAE elsewhere; `model.in_channels`/`data.channels` follow
the latents. Args: data=DIR, smoke (default data: synthetic 16×16×32 latents).
"""

from dit_jax import recipes


def get_config(arg: str = ""):
    args = recipes.parse_arg(arg)
    recipes.check_args(args, ("data", "smoke"), "lightningdit")
    c = recipes.base(total_steps=1_000_000, batch_size=1024)
    c.data = recipes.latent_data(args, image_size=16, channels=32)
    c.model = dict(
        image_size=16,
        in_channels=32,
        patch_size=1,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        num_classes=1000,
        class_dropout=0.1,
        learn_sigma=False,
        mlp="swiglu",
        norm="rmsnorm",
        qk_norm=True,
        rope=True,
    )
    c.objective = dict(
        kind="flow",
        t_sampling="logit_normal",
        time_scale=1.0,
        time_direction="noise_to_data",
        velocity_cosine_weight=1.0,
    )
    c.sampler = dict(kind="euler", num_steps=250, cfg_scale=6.7, guidance_high=0.875)
    c.optim = dict(lr=2e-4, b2=0.95, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, ema_warmup=False)
    return recipes.shrink_for_smoke(c) if "smoke" in args else c
