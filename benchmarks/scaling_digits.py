"""A scaling study on the digits, end to end on this CPU: a width × steps sweep, the law fitted to its
frontier, and the law's prediction checked against a held-out run with more compute than any fitted.

    python benchmarks/scaling_digits.py            # ~30 min on a 2-core CPU; re-running resumes
    python benchmarks/scaling_digits.py --quick    # the same pipeline, tiny: a smoke check (2-3 min)
    python benchmarks/scaling_digits.py [--root=runs/bench/scaling_digits] [--parallel=2] \
        [--out_dir=benchmarks/results] [--date=YYYY-MM-DD] [-- ARGS FOR EVERY dit-jax train]

1. `launch/sweep.py --config=scaling:study --root=ROOT/fit` trains the grid of configs/scaling.py's
   `sweep("study")` (widths 32, 48, 64, 96 × 250, 500, 1000 steps; loss every 10 steps, the digits
   proxy metrics every 250).
2. `launch/sweep.py --config=scaling:study,heldout --root=ROOT/heldout` trains the held-out run
   (width 128, 1500 steps: ~2.6× the compute of the largest fitted run), never part of the fit.
3. For `loss` and `eval/fd_classifier`: `dit_jax.scaling` collects ROOT/fit, fits L(C) = a·C^(−b) + c
   to the frontier (from the end of the smallest model's warm-up on, `--min_flops`) with bootstrap
   stds, and predicts the metric at the held-out run's final compute; the measured value is the
   held-out run's own (the loss smoothed over its last 10% of compute exactly as the fitted runs').

Re-running skips finished runs and resumes interrupted ones (launch/sweep.py); the analysis is
always redone. Writes into --out_dir (default benchmarks/results/, --quick: ROOT/results/):
scaling_digits_<date>.json (figures, grid, provenance, wall time), scaling_digits_<date>.md (the
tables) and scaling_digits_<date>_<metric>.png (dit_jax.scaling's plot; its star is the prediction
at the held-out compute). `wall_s` is this invocation's; ROOT/invocations.jsonl keeps every
invocation's, so that a resumed study's total is `wall_s_all_invocations`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

from record import record

from dit_jax import config_files, scaling, scaling_report, sweeps
from dit_jax.configs import scaling as study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("loss", "eval/fd_classifier")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="the tiny grid (scaling:study,smoke)")
    parser.add_argument("--root", help="runs folder (default runs/bench/scaling_digits[_quick])")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (launch/sweep.py)")
    parser.add_argument(
        "--out_dir", help="results folder (default benchmarks/results, --quick: ROOT/results)"
    )
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="for the file names")
    parser.add_argument(
        "--min_flops", type=float, default=None, help="fit from here (default: the end of warm-up)"
    )
    parser.add_argument("--num_bootstrap", type=int, default=200)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then args for every dit-jax train")
    args = parser.parse_args(argv)
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    args.root = args.root or os.path.join(
        "runs", "bench", "scaling_digits" + ("_quick" if args.quick else "")
    )
    args.out_dir = args.out_dir or (
        os.path.join(args.root, "results") if args.quick else os.path.join(REPO, "benchmarks", "results")
    )
    return args, extra


def sweep_phase(spec: str, root: str, parallel: int, extra: list[str]) -> dict:
    """Trains the sweep of `spec` under `root` through launch/sweep.py (skipping finished runs)."""
    try:
        runs = sweeps.expand(spec, root, extra)
    except sweeps.SweepError as e:
        raise SystemExit(f"{spec}: {e}") from None
    todo = [r.name for r in runs if sweeps.run_state(r.workdir, r.total_steps).state != "done"]
    command = [sys.executable, os.path.join(REPO, "launch", "sweep.py"), f"--config={spec}",
               f"--root={root}", f"--parallel={parallel}", "--", *extra]  # fmt: skip
    print(f"$ {shlex.join(command)}", flush=True)
    start = time.monotonic()
    code = subprocess.run(command, check=False).returncode
    wall = time.monotonic() - start
    if code != 0:
        raise SystemExit(f"{spec}: launch/sweep.py exited with {code} after {wall:.0f} s; re-run to resume")
    return {"config": spec, "root": root, "runs": len(runs), "trained": todo, "wall_s": round(wall, 1)}


def warmup_flops(workdir: str) -> float:
    """Training FLOPs of the run at the end of its learning-rate warm-up."""
    with open(os.path.join(workdir, "config.json")) as f:
        warmup = json.load(f)["optim"]["warmup_steps"]
    first = scaling.read_metrics(workdir)[0]
    return warmup * first["flops_per_step"]


def analyse(args, metric: str, min_flops: float) -> tuple[dict, scaling.Analysis]:
    """The fit over ROOT/fit and its check against the held-out run."""
    curves, skipped = scaling.collect([os.path.join(args.root, "fit")], metric)
    (held,), _ = scaling.collect([os.path.join(args.root, "heldout")], metric)
    result = scaling.analyse(
        curves,
        metric,
        skipped=skipped,
        predict_flops=float(held.flops[-1]),
        min_flops=min_flops,
        n_boot=args.num_bootstrap,
        smooth=scaling.default_smoothing(metric),
    )
    measured = float(held.values[-1])
    lo, hi = result.interval
    fitted_max = max(float(c.flops[-1]) for c in curves)
    check = {
        "run": held.name,
        "num_params": held.num_params,
        "flops": float(held.flops[-1]),
        "flops_over_largest_fitted": float(held.flops[-1]) / fitted_max,
        "predicted": result.prediction,
        "interval": [lo, hi],
        "measured": measured,
        "relative_error": (measured - result.prediction) / result.prediction,
        "in_interval": bool(lo <= measured <= hi),
        "largest_fitted_flops": fitted_max,
    }
    return {**result.to_dict(), "heldout": check}, result


def markdown_section(metric: str, figures: dict, result: scaling.Analysis) -> str:
    h = figures["heldout"]
    verdict = "inside" if h["in_interval"] else "outside"
    return (
        scaling_report.markdown(result).replace("# Scaling fit", "## Scaling fit", 1)
        + f"\nHeld-out run `{h['run']}` ({h['num_params']:,} parameters, {h['flops']:.4g} FLOPs, "
        f"{h['flops_over_largest_fitted']:.2f}× the largest fitted run): predicted {metric} = "
        f"{h['predicted']:.4g} (95% bootstrap interval {h['interval'][0]:.4g} – {h['interval'][1]:.4g}), "
        f"measured {h['measured']:.4g} ({100 * h['relative_error']:+.1f}%, {verdict} the interval).\n"
    )


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    t0, load_before = time.monotonic(), os.getloadavg()
    spec = "scaling:study" + (",smoke" if args.quick else "")
    phases = [
        sweep_phase(spec, os.path.join(args.root, "fit"), args.parallel, extra),
        sweep_phase(spec + ",heldout", os.path.join(args.root, "heldout"), args.parallel, extra),
    ]
    fit_dirs = scaling.find_workdirs([os.path.join(args.root, "fit")])
    min_flops = args.min_flops if args.min_flops is not None else min(map(warmup_flops, fit_dirs))
    fits, sections, written = {}, [], []
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"scaling_digits_{args.date}" + ("_quick" if args.quick else ""))
    for metric in METRICS:
        try:
            figures, result = analyse(args, metric, min_flops)
        except scaling.ScalingError as e:
            print(f"{metric}: not fitted: {e}", flush=True)
            fits[metric] = {"error": str(e)}
            continue
        fits[metric] = figures
        sections.append(markdown_section(metric, figures, result))
        png = scaling_report.plot_png(result)
        if png is not None:
            path = f"{stem}_{metric.replace('eval/', '').replace('/', '_')}.png"
            with open(path, "wb") as f:
                f.write(png)
            written.append(path)
    wall = round(time.monotonic() - t0, 1)

    log_path = os.path.join(args.root, "invocations.jsonl")
    with open(log_path, "a") as f:
        trained = [name for p in phases for name in p["trained"]]
        f.write(json.dumps({"date": args.date, "wall_s": wall, "trained": trained}) + "\n")
    with open(log_path) as f:
        wall_all = sum(json.loads(line)["wall_s"] for line in f if line.strip())

    base = config_files.load(spec)
    grid = {
        "widths": list(study.STUDY_SMOKE_WIDTHS if args.quick else study.STUDY_WIDTHS),
        "steps": list(study.STUDY_SMOKE_STEPS if args.quick else study.STUDY_STEPS),
        "heldout_width_steps": list(study.STUDY_SMOKE_HELDOUT if args.quick else study.STUDY_HELDOUT),
        "lr": f"1e-3 * 64 / width, cosine, warm-up {base.optim.warmup_steps} steps",
        "depth": base.model.depth,
        "num_heads": base.model.num_heads,
        "patch_size": base.model.patch_size,
        "batch_size": base.batch_size,
        "log_every": base.log_every,
        "eval_every": base.eval_every,
        "eval_num_samples": base.eval.num_samples,
        "train_args": extra,
    }
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    provenance = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu": cpu or platform.processor(),
            "python": platform.python_version(),
        },
        "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "wall_s": wall,
        "wall_s_all_invocations": round(wall_all, 1),
        "root": args.root,
        "phases": phases,
        "min_flops": min_flops,
    }
    written.insert(0, f"{stem}.json")
    header = [
        f"# Scaling study on the digits ({args.date}{', --quick' if args.quick else ''})",
        "",
        f"`{shlex.join(['python', 'benchmarks/scaling_digits.py', *sys.argv[1:]])}`",
        "",
        f"Grid: widths {grid['widths']} × steps {grid['steps']} (depth {grid['depth']}, batch "
        f"{grid['batch_size']}, {grid['lr']}); held out: width {grid['heldout_width_steps'][0]}, "
        f"{grid['heldout_width_steps'][1]} steps. {provenance['machine']['cpu_count']} CPUs "
        f"({provenance['machine']['cpu']}), load {provenance['loadavg_1min'][0]} → "
        f"{provenance['loadavg_1min'][1]}; wall time {wall / 60:.1f} min this invocation, "
        f"{wall_all / 60:.1f} min over all.",
        "",
    ]
    with open(f"{stem}.md", "w") as f:
        f.write("\n".join(header) + "\n" + "\n".join(sections))
    written.insert(1, f"{stem}.md")
    files = [
        os.path.relpath(p, REPO) if not os.path.relpath(p, REPO).startswith("..") else p for p in written
    ]
    record("scaling_digits", f"{stem}.json", grid=grid, fits=fits, files=files, **provenance)

    print(f"\nscaling study on the digits: wall {wall:.0f} s (all invocations {wall_all:.0f} s)")
    for metric, figures in fits.items():
        if "error" in figures:
            continue
        h = figures["heldout"]
        a, b, c = (f"{figures[k]:.4g} ± {figures[k + '_std']:.3g}" for k in "abc")
        print(
            f"{metric}: L(C) = a·C^(-b) + c, a = {a}, b = {b}, c = {c} "
            f"({figures['n_points']} frontier points, {figures['n_runs']} runs)\n"
            f"  held out {h['run']} at {h['flops']:.3g} FLOPs "
            f"({h['flops_over_largest_fitted']:.2f}× the largest fitted run): "
            f"predicted {h['predicted']:.4g} [{h['interval'][0]:.4g}, {h['interval'][1]:.4g}], "
            f"measured {h['measured']:.4g} ({100 * h['relative_error']:+.1f}%, "
            f"{'inside' if h['in_interval'] else 'OUTSIDE'} the 95% interval)"
        )
    for path in written:
        print(f"wrote {path}")
    return 0 if all("error" not in f for f in fits.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
