"""Quickstart: a tiny class-conditional DiT on scikit-learn's handwritten digits (8×8, pixel space).

Trains in a few minutes on a 2-core CPU:

  dit-jax train --config=configs/quickstart.py --workdir=runs/quickstart
  dit-jax sample --workdir=runs/quickstart --num_samples=500 --output=runs/quickstart/samples.npz \
      --grid=runs/quickstart/samples.png

`make quickstart` runs both. Arg "smoke" shrinks it to seconds (used by tests and the notebook);
"moe" makes every second block a DiT-MoE layer (4 experts, 2 per token; models.moe) with MLPs of half
width, same schedule.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 64
    c.log_every = 50
    c.checkpoint_every = 500
    c.sample_every = 500
    c.eval_every = 0
    c.keep_checkpoints = 2
    c.grid_samples_per_class = 10

    c.data = dict(source="digits", image_size=8, channels=1, num_classes=10)
    c.model = dict(
        image_size=8,
        in_channels=1,
        patch_size=2,
        hidden_size=128,
        depth=4,
        num_heads=4,
        mlp_ratio=4.0,
        num_classes=10,
        class_dropout=0.1,
        learn_sigma=False,
    )
    c.objective = dict(kind="flow", t_sampling="logit_normal")
    c.sampler = dict(kind="heun", num_steps=16, cfg_scale=2.0)
    c.optim = dict(lr=1e-3, warmup_steps=200, schedule="cosine", grad_clip=1.0, ema_decay=0.999)
    c.mesh = dict(data=-1, fsdp=1, tensor=1, rules="fsdp")
    c.attention = dict(impl="auto")

    if arg == "smoke":
        c.total_steps = 20
        c.batch_size = 32
        c.log_every = 5
        c.checkpoint_every = 10
        c.sample_every = 0
        c.model.hidden_size = 32
        c.model.depth = 2
        c.sampler.num_steps = 4
    elif arg == "moe":
        # MLPs of half width (mlp_ratio 2): 2 experts per token then match the dense quickstart's
        # active MLP compute, and CPU runs (where every expert sees every routed row) stay short.
        c.model.update(
            num_experts=4, experts_per_token=2, moe_every=2, moe_balance_weight=0.01, mlp_ratio=2.0
        )
    elif arg:
        raise ValueError(f"unknown quickstart arg {arg!r}; use '', 'smoke' or 'moe'")
    return ml_collections.ConfigDict(c)
