"""Scaling study on the digits (the quickstart's task): model width × training steps.

  python launch/sweep.py --config=configs/scaling.py --parallel=2     # 3 widths × 2 lengths, CPU
  python launch/sweep.py --config=configs/scaling.py --status         # loss and eval metrics per run
  dit-jax train --config=configs/scaling.py:width=64,steps=1000 --workdir=runs/w64   # one point

Every length is its own run with its own cosine schedule (reading a longer run's early checkpoints
would measure a schedule that has not decayed). The learning rate shrinks as 1/width (1e-3 at width
64; `sweeps.zip_` pairs them), and every 250 steps the run logs the digits proxy metrics
(eval/class_accuracy, eval/fd_classifier, ...), which `--status` shows.

Args: width=W (model.hidden_size, and optim.lr = 1e-3 · 64 / W), depth=D (default 4), steps=S
(total_steps), smoke (seconds per run: width 16, depth 1, 4 steps, no eval; `sweep("smoke")`: widths
16, 32 × 2, 4 steps).

study: the recorded study of benchmarks/scaling_digits.py. `sweep("study")`: widths 32, 48, 64, 96 ×
250, 500, 1000 steps, logging the loss every 10 steps and the proxy metrics every 250; `sweep(
"study,heldout")`: the one run kept out of the fit to check its prediction (width 128, 1500 steps:
~2.6× the compute of the largest fitted run). With smoke too ("study,smoke"): the same shape in
seconds (widths 16, 32 × 10, 20 steps; held out: width 48, 40 steps; eval every 5 steps, 100
samples).
"""

import ml_collections

from dit_jax import recipes, sweeps
from dit_jax.configs import quickstart

WIDTHS, STEPS = (32, 64, 128), (250, 1000)
SMOKE_WIDTHS, SMOKE_STEPS = (16, 32), (2, 4)
# The study (arg "study"): the fitted grid and the held-out (width, steps); "study,smoke": tiny.
STUDY_WIDTHS, STUDY_STEPS, STUDY_HELDOUT = (32, 48, 64, 96), (250, 500, 1000), (128, 1500)
STUDY_SMOKE_WIDTHS, STUDY_SMOKE_STEPS, STUDY_SMOKE_HELDOUT = (16, 32), (10, 20), (48, 40)


def lr_for(width: int) -> float:
    return 1e-3 * 64 / width


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = recipes.parse_arg(arg)
    recipes.check_args(args, ("width", "depth", "steps", "smoke", "study", "heldout"), "scaling")
    smoke = "smoke" in args
    width = int(args.get("width", 16 if smoke else 64))
    c = quickstart.get_config()
    c.total_steps = int(args.get("steps", 4 if smoke else 1000))
    c.model.hidden_size = width
    c.model.depth = int(args.get("depth", 1 if smoke else 4))
    c.model.num_heads = 2  # divides every width of the sweep
    c.optim.lr = lr_for(width)
    c.optim.warmup_steps = 50
    # Independent of total_steps, so that a swept total_steps needs nothing else changed (the last
    # step is always logged and checkpointed).
    c.log_every, c.checkpoint_every, c.sample_every, c.eval_every = 25, 250, 0, 250
    if smoke:
        c.batch_size = 16
        c.log_every, c.checkpoint_every, c.eval_every = 1, 0, 0
        c.optim.warmup_steps = 1
        c.sampler.num_steps = 4
    if "study" in args or "heldout" in args:
        # Every step count of the study is a multiple of its shortest: every run is evaluated at the
        # same steps, its last included.
        c.log_every = 1 if smoke else 10
        c.checkpoint_every = (STUDY_SMOKE_STEPS if smoke else STUDY_STEPS)[0]
        c.eval_every = c.checkpoint_every // 2 if smoke else c.checkpoint_every
        if smoke:
            c.eval = dict(num_samples=100)
    return c


def sweep(arg: str = "") -> list[dict]:
    """Widths (with their learning rates) × lengths: 6 runs, or 4 tiny ones with arg "smoke"; with
    "study" the study's 12 runs (or 4 tiny ones), with "heldout" its held-out run."""
    args = recipes.parse_arg(arg)
    smoke = "smoke" in args
    widths, steps = (SMOKE_WIDTHS, SMOKE_STEPS) if smoke else (WIDTHS, STEPS)
    if "heldout" in args:
        width, total = STUDY_SMOKE_HELDOUT if smoke else STUDY_HELDOUT
        return [{"model.hidden_size": width, "optim.lr": lr_for(width), "total_steps": total}]
    if "study" in args:
        widths, steps = (STUDY_SMOKE_WIDTHS, STUDY_SMOKE_STEPS) if smoke else (STUDY_WIDTHS, STUDY_STEPS)
    return sweeps.product(
        sweeps.zip_({"model.hidden_size": list(widths), "optim.lr": [lr_for(w) for w in widths]}),
        {"total_steps": list(steps)},
    )
