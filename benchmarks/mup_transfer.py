"""μTransfer on the digits: does the best learning rate stay put as the width grows, under μP and SP?

For widths w, 4w, 8w (model.mup_base_width = w) and parametrizations SP and μP, trains the
quickstart DiT (depth 2, 4 heads; `--config` and `--config.*` overrides change it) on the digits
for `--steps` steps at every learning rate of a log2 grid, and evaluates the flow-matching loss on
the test split (200 images x `--eval_draws` fixed noise / time draws). The learning rates of one
(width, parametrization) train side by side: one compiled program, vmapped over the grid, the same
batches and noise for all of them (the optimizer is the trainer's, `dit_jax.train.state.optimizer`,
built with lr 1 and each run's updates multiplied by its learning rate; the loss is the train
step's, without the EMA). A run that diverges (non-finite loss) scores +inf.

Reports, per parametrization, the best learning rate per width and `*_best_lr_shift_steps`: the
signed number of grid steps from w's best to 8w's (0 = the optimum transfers; SP's optimum is
expected to move to smaller learning rates), and `*_transfer_regret`: 8w's loss at w's best
learning rate over 8w's best loss. Prints a table, writes a PNG (loss vs learning rate per width,
SP and μP panels) and a JSON file to --out_dir, and with --json ends with the JSON object.

  python benchmarks/mup_transfer.py --json                 # the real run: 17 LRs (half octaves), 600 steps
  python benchmarks/mup_transfer.py --quick --json         # 9 LRs (octaves), 300 steps: ~11 min on 2 CPUs
  python benchmarks/mup_transfer.py --smoke --out_dir /tmp # 2 LRs, widths w and 4w, 10 steps: end to end
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart", help="config name or file (dit_jax.config_files)")
    parser.add_argument("--width", type=int, default=32, help="w: the base width; also 4w and 8w are trained")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--log2_lr", type=float, nargs=2, default=(-12.0, -4.0), metavar=("LO", "HI"))
    parser.add_argument("--lr_step", type=float, default=0.5, help="grid spacing in octaves")
    parser.add_argument("--eval_draws", type=int, default=5, help="noise/time draws per test image")
    parser.add_argument("--lr_chunk", type=int, default=0, help="learning rates per program (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="octave grid 2^-12..2^-4, 300 steps")
    parser.add_argument("--smoke", action="store_true", help="2 LRs, widths w and 4w, 10 steps (w=16)")
    parser.add_argument("--out_dir", default=DEFAULT_OUT, help="where the PNG and JSON go")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args, overrides = parser.parse_known_args(argv)
    args.multiples = (1, 4, 8)
    if args.quick:
        args.steps, args.log2_lr, args.lr_step = 300, (-12.0, -4.0), 1.0
    if args.smoke:
        args.width, args.steps, args.log2_lr, args.lr_step, args.multiples = (
            16,
            10,
            (-10.0, -8.0),
            2.0,
            (1, 4),
        )
        args.eval_draws = 1
    return args, overrides


def lr_grid(args) -> np.ndarray:
    lo, hi = args.log2_lr
    n = int(round((hi - lo) / args.lr_step)) + 1
    return 2.0 ** (lo + args.lr_step * np.arange(n))


def load_config(args, overrides: list[str], width: int, parametrization: str):
    from dit_jax import config_files

    return config_files.load(
        args.config,
        [
            f"--config.model.hidden_size={width}",
            f"--config.model.depth={args.depth}",
            f"--config.model.parametrization={parametrization}",
            f"--config.model.mup_base_width={args.width}",
            f"--config.total_steps={args.steps}",
            f"--config.batch_size={args.batch_size}",
            f"--config.seed={args.seed}",
            "--config.optim.lr=1.0",  # each run's learning rate multiplies its updates
            f"--config.optim.warmup_steps={max(1, args.steps // 10)}",
            *overrides,
        ],
    )


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits' train and test splits as model-space images [N, 8, 8, 1] and labels."""
    from sklearn.datasets import load_digits

    from dit_jax.data import digits, pixels

    raw = load_digits()
    images = pixels.from_uint8(digits.sklearn_to_uint8(raw.images))
    labels = raw.target.astype(np.int32)
    splits = {s: digits.split_indices(labels, s) for s in ("train", "test")}
    return {s: (images[i], labels[i]) for s, i in splits.items()}


def sweep(cfg, lrs: np.ndarray, data: dict, args) -> tuple[np.ndarray, np.ndarray]:
    """(test loss [n_lr], train loss [n_lr, steps]) of one (width, parametrization) over the grid."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dit_jax.diffusion import make_objective
    from dit_jax.models.build import build_model, model_spec
    from dit_jax.train import state as state_lib

    spec = model_spec(cfg)
    tx = state_lib.optimizer(cfg, spec)
    objective = make_objective(cfg.objective, cfg.model.learn_sigma)
    x_train, y_train = (jnp.asarray(a) for a in data["train"])
    x_test, y_test = (jnp.asarray(np.repeat(a, args.eval_draws, axis=0)) for a in data["test"])
    params0 = jax.jit(lambda: nnx.split(build_model(cfg))[1].to_pure_dict())()

    def flow_loss(params, x0, y, key, drop_key):
        x_t, t, target = objective.sample(key, x0)
        out = nnx.merge(spec.graphdef, params)(x_t, objective.model_time(t), y, drop_key=drop_key)
        return jnp.mean(objective.loss(out, x0, x_t, t, target))

    def run(lr, params):
        def step(carry, i):
            params, opt_state = carry
            key = jax.random.fold_in(jax.random.key(cfg.seed), i)
            pick, noise, drop = jax.random.split(key, 3)
            idx = jax.random.randint(pick, (cfg.batch_size,), 0, x_train.shape[0])
            loss, grads = jax.value_and_grad(flow_loss)(params, x_train[idx], y_train[idx], noise, drop)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
            return (params, opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(cfg.total_steps))
        test = flow_loss(params, x_test, y_test, jax.random.key(cfg.seed + 1), None)
        return test, losses

    train = jax.jit(jax.vmap(run, in_axes=(0, None)))
    chunk = args.lr_chunk or len(lrs)
    tests, curves = [], []
    for start in range(0, len(lrs), chunk):
        test, losses = jax.device_get(train(jnp.asarray(lrs[start : start + chunk], jnp.float32), params0))
        tests.append(test)
        curves.append(losses)
    test, curves = np.concatenate(tests), np.concatenate(curves)
    finite = np.isfinite(test) & np.all(np.isfinite(curves), axis=1)
    return np.where(finite, test, np.inf), curves


def summarise(losses: dict, lrs: np.ndarray, widths: list[int]) -> dict:
    out = {}
    for p, per_width in losses.items():
        best = {w: int(np.argmin(per_width[w])) for w in widths}
        first, last = widths[0], widths[-1]
        name = p
        out[f"{name}_best_lr"] = {str(w): float(lrs[best[w]]) for w in widths}
        out[f"{name}_best_loss"] = {str(w): float(per_width[w][best[w]]) for w in widths}
        out[f"{name}_best_lr_shift_steps"] = best[last] - best[first]
        regret = per_width[last][best[first]] / per_width[last][best[last]]
        out[f"{name}_transfer_regret"] = float(regret) if math.isfinite(regret) else None
    return out


def plot(path: str, losses: dict, lrs: np.ndarray, widths: list[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    finite = [v for per_width in losses.values() for w in widths for v in per_width[w] if np.isfinite(v)]
    top = min(max(finite), 3 * min(finite)) if finite else 1.0
    for ax, p, name in zip(axes, ("sp", "mup"), ("SP", "μP"), strict=True):
        for w in widths:
            y = np.minimum(losses[p][w], top * 1.5)  # diverged runs drawn at the top
            (line,) = ax.plot(np.log2(lrs), y, "o-", ms=3, label=f"width {w}")
            i = int(np.argmin(losses[p][w]))
            ax.plot(np.log2(lrs[i]), losses[p][w][i], "*", ms=12, color=line.get_color())
        ax.set_title(name)
        ax.set_xlabel("log2 learning rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test flow-matching loss")
    axes[0].set_ylim(top=top * 1.5)
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    import jax

    began = time.perf_counter()
    lrs = lr_grid(args)
    widths = [args.width * m for m in args.multiples]
    data = digits_arrays()
    losses: dict[str, dict[int, np.ndarray]] = {"sp": {}, "mup": {}}
    runs = []
    for p in ("sp", "mup"):
        for w in widths:
            cfg = load_config(args, overrides, w, p)
            t0 = time.perf_counter()
            test, curves = sweep(cfg, lrs, data, args)
            seconds = time.perf_counter() - t0
            losses[p][w] = test
            runs.append(
                dict(
                    parametrization=p, width=w, seconds=round(seconds, 1), test_loss=test.tolist(),
                    final_train_loss=np.mean(curves[:, -max(1, args.steps // 10) :], axis=1).tolist(),
                )
            )  # fmt: skip
            cells = " ".join("   inf" if not np.isfinite(v) else f"{v:6.3f}" for v in test)
            print(f"{p:3s} width {w:4d} ({seconds:6.1f} s): {cells}", flush=True)
    print("log2 lr:              " + " ".join(f"{np.log2(lr):6.1f}" for lr in lrs))
    summary = summarise(losses, lrs, widths)
    for name in ("sp", "mup"):
        best = ", ".join(f"{w}: 2^{np.log2(lr):.1f}" for w, lr in summary[f"{name}_best_lr"].items())
        shift, regret = summary[f"{name}_best_lr_shift_steps"], summary[f"{name}_transfer_regret"]
        print(
            f"{name}: best lr per width {best}; w -> {widths[-1] // args.width}w: {shift:+d} grid steps, "
            f"loss at w's best / best: {regret}"
        )
    date = datetime.date.today().isoformat()
    tag = "_smoke" if args.smoke else "_quick" if args.quick else ""
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"mup_transfer{tag}_{date}")
    title = f"digits, depth {args.depth}, {args.steps} steps, base width {args.width}"
    plot(stem + ".png", losses, lrs, widths, title)
    result = dict(
        **summary, date=date, command=" ".join(["python", *sys.argv]), jax=jax.__version__,
        backend=jax.default_backend(), device=jax.devices()[0].device_kind, machine=platform.machine(),
        config=args.config, overrides=overrides, widths=widths, base_width=args.width, depth=args.depth,
        steps=args.steps, batch_size=args.batch_size, lrs=lrs.tolist(), lr_step_octaves=args.lr_step,
        eval_draws=args.eval_draws, seed=args.seed, seconds=round(time.perf_counter() - began, 1), runs=runs,
        png=os.path.basename(stem) + ".png",
    )  # fmt: skip
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {stem}.png and {stem}.json")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
