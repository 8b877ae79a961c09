"""Scaling-law fits over training runs: the metric-vs-compute frontier, L(C) = a·C^(−b) + c with
bootstrap uncertainty, and the compute-optimal model size N_opt(C) = k·C^alpha.

    curves = scaling.collect(["runs/sweep"], metric="loss")   # one RunCurve per workdir found
    result = scaling.analyse(curves, metric="loss")           # frontier, fit, bootstrap, N_opt
    result.law(1e21), result.interval, result.to_dict()
    scaling_report.write_report(result, "runs/sweep/scaling")  # PNG + markdown + JSON (scaling_report.py)

Method (each choice is a parameter of `analyse` / `collect`):

- Compute C is each metrics.jsonl row's `flops` (cumulative training FLOPs, 2 per multiply-add).
  A row with the metric but no `flops` (an eval row) gets it interpolated linearly in `step`
  between the rows that have it (step 0 counts as 0 FLOPs); rows outside that range are dropped.
- Smoothing: the per-step training loss is one batch's loss and noisy, so each value becomes the
  mean over the trailing window of rows with flops in [(1 − smooth)·C, C] (default smooth=0.1 for
  `loss`: the last 10% of compute; 0, no smoothing, for eval metrics, already averaged over samples).
  The window is scale-free: dense late in training, a single row early on. It lags slightly (biased
  up by about b·smooth/2 of the reducible part), which errs against an optimistic frontier.
- Frontier: the lower envelope of all runs' (C, metric) points — a point is on it when no point
  at less or equal compute has a lower metric (the best metric reachable with at most C). It is
  thinned to at most one point per 1/`bins_per_decade` decade of compute (the lowest), so that
  every decade weighs alike in the fit however densely a run was logged.
- Fit: least squares in log space, residual log(a·C^(−b) + c) − log L, with scipy's soft-L1 loss
  (robust to outliers), C normalised by the geometric mean of the frontier's compute for
  conditioning; bounds b in [0, 5], 0 <= c <= max L (not min L: one low outlier must not cap c).
  Initialised from a grid over c (linear fits of log(L − c) on log C, the best three refined); the
  soft-L1 scale is then re-estimated as 1.4826·MAD of the residuals and the fit repeated.
  Bootstrap: refit on frontier points resampled with replacement (`n_boot`, seed fixed); the std
  of a, b, c and the 2.5–97.5 percentiles of predictions are reported.
- N_opt (runs of at least two model sizes): Chinchilla's approach 1 — at each of 100 log-spaced
  compute values, the per-size lower envelopes (interpolated in log C, only where a size's runs
  cover C) are compared and the size with the lowest metric wins; the winner is refined like
  approach 2, the vertex of a parabola in log N through it and its two neighbouring sizes. Only
  bracketed optima (a smaller and a larger covering size both lose) are kept, and log N_opt is
  fitted linearly on log C. No uncertainty is given for it (the grid points are not independent).

The metric is taken as lower-is-better (loss, FD, FID). Nothing here imports the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np

# Keys of metrics.jsonl rows that describe progress rather than quality.
PROGRESS_KEYS = ("step", "flops", "images_seen")
MIN_POINTS = 3  # parameters of a·C^(−b) + c


class ScalingError(ValueError):
    """Bad input for a scaling fit (no runs, no FLOPs logged, unknown metric, too few points)."""


@dataclasses.dataclass(frozen=True)
class RunCurve:
    """One run's metric against its cumulative training compute."""

    name: str
    workdir: str
    num_params: int
    flops: np.ndarray  # increasing, > 0
    values: np.ndarray  # the metric at `flops`, smoothed
    raw: np.ndarray  # the metric as logged
    images_seen: float | None = None  # at the last row that logs it


@dataclasses.dataclass(frozen=True)
class Frontier:
    flops: np.ndarray
    values: np.ndarray
    run: np.ndarray  # index into the curves


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(C) = a·C^(−b) + c."""

    a: float
    b: float
    c: float

    def __call__(self, flops) -> np.ndarray:
        return self.a * np.power(np.asarray(flops, dtype=np.float64), -self.b) + self.c


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    samples: np.ndarray  # [n, 3]: a, b, c of each resample's fit

    def std(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.samples.std(axis=0, ddof=1))

    def predict(self, flops) -> np.ndarray:
        """[n, len(flops)]: every resample's law at `flops`."""
        a, b, c = (self.samples[:, i : i + 1] for i in range(3))
        return a * np.power(np.atleast_1d(np.asarray(flops, np.float64))[None], -b) + c

    def interval(self, flops, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        tail = 50 * (1 - level)
        return tuple(np.percentile(self.predict(flops), [tail, 100 - tail], axis=0))


@dataclasses.dataclass(frozen=True)
class NOptFit:
    """N_opt(C) = k·C^alpha, fitted to per-compute optima `flops`, `num_params`."""

    k: float
    alpha: float
    flops: np.ndarray
    num_params: np.ndarray

    def __call__(self, flops) -> np.ndarray:
        return self.k * np.power(np.asarray(flops, dtype=np.float64), self.alpha)


# ----------------------------------------------------------------------------- collecting runs


def find_workdirs(paths: Sequence[str]) -> list[str]:
    """Every folder at or under `paths` that holds a metrics.jsonl (not descending into one)."""
    found: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            raise ScalingError(f"{path} is not a folder; pass training workdirs or a folder containing them")
        for root, dirs, files in os.walk(path):
            if "metrics.jsonl" in files:
                found.append(os.path.normpath(root))
                dirs.clear()
            else:
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "checkpoints")
    seen: dict[str, str] = {}
    for w in found:
        seen.setdefault(os.path.realpath(w), w)
    unique = list(seen.values())
    if not unique:
        raise ScalingError(
            f"no runs found under {', '.join(paths)}: no folder there holds a metrics.jsonl; pass "
            "training workdirs or a folder containing them"
        )
    return unique


def read_metrics(workdir: str) -> list[dict]:
    """The rows of workdir/metrics.jsonl (a line cut short by a kill is skipped)."""
    rows = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and _number(row.get("step")) is not None:
                rows.append(row)
    return rows


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def metric_keys(rows: Sequence[dict]) -> set[str]:
    return {k for row in rows for k, v in row.items() if k not in PROGRESS_KEYS and _number(v) is not None}


_PARAM_COUNTS: dict[str, int] = {}


def param_count(workdir: str) -> int:
    """Parameters of the run's model, from its config.json with abstract shapes (nothing allocated);
    cached per model config (a sweep's runs of one size cost one count)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ScalingError(f"run {workdir} has a metrics.jsonl but no config.json: its model size is unknown")
    try:
        with open(path) as f:
            key = json.dumps(json.load(f).get("model"), sort_keys=True)
        if key not in _PARAM_COUNTS:
            import jax

            from dit_jax.models.build import model_spec
            from dit_jax.workdir import load_config

            spec = model_spec(load_config(workdir))
            leaves = jax.tree.leaves(spec.abstract_params)
            _PARAM_COUNTS[key] = int(sum(math.prod(x.shape) for x in leaves))
    except (ValueError, AttributeError) as e:  # ConfigError, bad JSON, not a JSON object
        raise ScalingError(f"{path}: {e}") from None
    return _PARAM_COUNTS[key]


def smooth_trailing(flops: np.ndarray, values: np.ndarray, fraction: float) -> np.ndarray:
    """Mean of `values` over the rows with flops in [(1 − fraction)·C, C] at each C (sorted flops)."""
    if fraction <= 0:
        return values.copy()
    csum = np.concatenate([[0.0], np.cumsum(values)])
    start = np.searchsorted(flops, (1 - fraction) * flops, side="left")
    end = np.arange(1, len(values) + 1)
    return (csum[end] - csum[start]) / (end - start)


def default_smoothing(metric: str) -> float:
    return 0.1 if metric == "loss" else 0.0


def run_curve(workdir: str, rows: Sequence[dict], metric: str, smooth: float, name: str) -> RunCurve | None:
    """The run's metric against compute; None when no row has the metric."""
    known = sorted((int(r["step"]), f) for r in rows if (f := _number(r.get("flops"))) is not None and f >= 0)
    steps_f = np.array([0] + [s for s, _ in known if s > 0], dtype=np.float64)
    flops_f = np.array([0.0] + [f for s, f in known if s > 0])
    at_step: dict[int, tuple[float, float]] = {}  # step -> (flops, value); a later row wins
    for r in rows:
        value = _number(r.get(metric))
        if value is None:
            continue
        step = int(r["step"])
        flops = _number(r.get("flops"))
        if flops is None:
            if step > steps_f[-1]:
                continue
            flops = float(np.interp(step, steps_f, flops_f))
        at_step[step] = (flops, value)
    points = sorted(p for p in at_step.values() if p[0] > 0)
    if not points:
        return None
    flops, raw = (np.array(x, dtype=np.float64) for x in zip(*points, strict=True))
    if np.any(raw <= 0):
        raise ScalingError(f"run {name}: {metric} has values <= 0; a log-space fit needs a positive metric")
    images = [v for r in rows if (v := _number(r.get("images_seen"))) is not None]
    return RunCurve(
        name=name,
        workdir=workdir,
        num_params=param_count(workdir),
        flops=flops,
        values=smooth_trailing(flops, raw, smooth),
        raw=raw,
        images_seen=images[-1] if images else None,
    )


def collect(
    paths: Sequence[str], metric: str = "loss", smooth: float | None = None
) -> tuple[list[RunCurve], list[str]]:
    """The runs at or under `paths` with `metric` against compute, and the names of runs skipped for
    not logging `metric`. Raises ScalingError for no runs, runs without `flops`, an unknown metric."""
    workdirs = find_workdirs(paths)
    base = os.path.commonpath([os.path.abspath(os.path.dirname(w)) for w in workdirs])
    names = {w: os.path.relpath(os.path.abspath(w), base) for w in workdirs}
    rows = {w: read_metrics(w) for w in workdirs}
    no_flops = [names[w] for w in workdirs if not any(_number(r.get("flops")) is not None for r in rows[w])]
    if no_flops:
        shown = ", ".join(no_flops[:5]) + (f" and {len(no_flops) - 5} more" if len(no_flops) > 5 else "")
        raise ScalingError(
            f"run {shown} logged no 'flops' in metrics.jsonl (written by a trainer before FLOP "
            "counting); train it again, or leave it out of --runs"
        )
    available = set().union(*(metric_keys(r) for r in rows.values()))
    if metric not in available:
        raise ScalingError(
            f"unknown metric {metric!r}: no run logged it; available: {', '.join(sorted(available))}"
        )
    smooth = default_smoothing(metric) if smooth is None else smooth
    curves, skipped = [], []
    for w in workdirs:
        curve = run_curve(w, rows[w], metric, smooth, names[w])
        if curve is None:
            skipped.append(names[w])
        else:
            curves.append(curve)
    curves.sort(key=lambda c: (c.num_params, c.name))
    if not curves:
        raise ScalingError(
            f"no run logged {metric} at a step with training compute > 0 (within the steps that log "
            "'flops'); nothing to fit"
        )
    return curves, skipped


# ----------------------------------------------------------------------------- frontier and fits


def frontier(curves: Sequence[RunCurve], min_flops: float = 0.0, bins_per_decade: int = 0) -> Frontier:
    """The lower envelope of all points (those below every point at less or equal compute), from
    min_flops on; with bins_per_decade > 0, the lowest of them per 1/bins_per_decade decade."""
    flops = np.concatenate([c.flops for c in curves])
    values = np.concatenate([c.values for c in curves])
    run = np.concatenate([np.full(len(c.flops), i) for i, c in enumerate(curves)])
    on, best = [], np.inf
    for i in np.lexsort((values, flops)):
        if values[i] < best:
            on.append(i)
            best = values[i]
    on = np.array(on, dtype=np.int64)
    # The envelope over all points, then cut: a point beaten by one with less compute is not on it,
    # even when that one lies below min_flops.
    on = on[flops[on] >= min_flops]
    if bins_per_decade > 0 and len(on):
        bins = np.floor(np.log10(flops[on]) * bins_per_decade)
        last = np.append(bins[1:] != bins[:-1], True)  # the last (lowest) point of each bin
        on = on[last]
    return Frontier(flops[on], values[on], run[on])


def _residuals(theta, log_x, log_y):
    log_amp, b, c = theta
    return np.log(np.exp(log_amp - b * log_x) + c) - log_y


def _least_squares(theta0, log_x, log_y, upper_c: float, f_scale: float):
    from scipy.optimize import least_squares

    lower, upper = [-np.inf, 0.0, 0.0], [np.inf, 5.0, upper_c]
    theta0 = np.clip(theta0, np.array(lower) + [0, 1e-9, 0], np.array(upper) - [0, 1e-9, upper_c * 1e-9])
    return least_squares(
        _residuals,
        theta0,
        args=(log_x, log_y),
        bounds=(lower, upper),
        loss="soft_l1",
        f_scale=f_scale,
        x_scale="jac",
    )


def _initial_guesses(log_x, values) -> list[np.ndarray]:
    """Linear fits of log(L − c) on log x for c on a grid below min L."""
    guesses = []
    for frac in (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99):
        c = frac * values.min()
        slope, intercept = np.polyfit(log_x, np.log(values - c), 1)
        guesses.append(np.array([intercept, min(max(-slope, 1e-3), 4.0), c]))
    return guesses


@dataclasses.dataclass(frozen=True)
class _Fit:
    theta: np.ndarray  # log amplitude at the reference compute, b, c
    log_ref: float
    f_scale: float

    def law(self) -> PowerLaw:
        return _law(self.theta, self.log_ref)


def _law(theta, log_ref: float) -> PowerLaw:
    log_amp, b, c = (float(t) for t in theta)
    return PowerLaw(a=math.exp(log_amp + b * log_ref), b=b, c=c)


def _check_points(flops: np.ndarray, values: np.ndarray) -> None:
    distinct = len(np.unique(flops))
    if distinct < MIN_POINTS:
        raise ScalingError(
            f"only {distinct} frontier point(s) at distinct compute; fitting a·C^(−b) + c needs at least "
            f"{MIN_POINTS}: log metrics more often, add runs, or lower --min_flops"
        )
    if np.any(values <= 0) or np.any(flops <= 0):
        raise ScalingError("a log-space fit needs positive compute and metric values")


def _fit(flops: np.ndarray, values: np.ndarray) -> _Fit:
    flops, values = np.asarray(flops, np.float64), np.asarray(values, np.float64)
    _check_points(flops, values)
    log_ref = float(np.mean(np.log(flops)))
    log_x, log_y = np.log(flops) - log_ref, np.log(values)
    upper_c = float(values.max())
    guesses = sorted(_initial_guesses(log_x, values), key=lambda t: np.sum(_residuals(t, log_x, log_y) ** 2))
    best = min((_least_squares(t, log_x, log_y, upper_c, 0.1) for t in guesses[:3]), key=lambda r: r.cost)
    mad = float(np.median(np.abs(best.fun - np.median(best.fun))))
    f_scale = max(1.4826 * mad, 1e-4)
    second = _least_squares(best.x, log_x, log_y, upper_c, f_scale)
    return _Fit(second.x, log_ref, f_scale)


def fit_power_law(flops, values) -> PowerLaw:
    """Robust fit of L(C) = a·C^(−b) + c (soft-L1 in log space; see the module docstring)."""
    return _fit(flops, values).law()


def bootstrap(flops, values, n_boot: int = 200, seed: int = 0) -> Bootstrap:
    """Fits on `n_boot` resamples (with replacement) of the points; resamples with fewer than 3
    distinct compute values are drawn again."""
    flops, values = np.asarray(flops, np.float64), np.asarray(values, np.float64)
    full = _fit(flops, values)
    log_x, log_y = np.log(flops) - full.log_ref, np.log(values)
    rng = np.random.default_rng(seed)
    samples = []
    while len(samples) < n_boot:
        idx = rng.integers(0, len(flops), len(flops))
        if len(np.unique(flops[idx])) < MIN_POINTS:
            continue
        fit = _least_squares(full.theta, log_x[idx], log_y[idx], float(values[idx].max()), full.f_scale)
        law = _law(fit.x, full.log_ref)
        samples.append((law.a, law.b, law.c))
    return Bootstrap(np.array(samples))


def fit_n_opt(curves: Sequence[RunCurve], grid_size: int = 100) -> tuple[NOptFit | None, str]:
    """Compute-optimal model size (Chinchilla approach 1 with a parabola refinement; see the module
    docstring), or None with the reason it cannot be fitted."""
    sizes = sorted({c.num_params for c in curves})
    if len(sizes) < 2:
        return None, "all runs have the same model size"
    envelopes = []
    for size in sizes:
        flops = np.concatenate([c.flops for c in curves if c.num_params == size])
        values = np.concatenate([c.values for c in curves if c.num_params == size])
        order = np.argsort(flops, kind="stable")
        envelopes.append((np.log(flops[order]), np.minimum.accumulate(values[order])))
    lo = min(e[0][0] for e in envelopes)
    hi = max(e[0][-1] for e in envelopes)
    log_n = np.log(np.array(sizes, dtype=np.float64))
    opt_c, opt_n, winners = [], [], set()
    for log_c in np.linspace(lo, hi, grid_size):
        covering = [i for i, (lc, _) in enumerate(envelopes) if lc[0] <= log_c <= lc[-1]]
        if len(covering) < 3:
            continue
        vals = np.array([np.interp(log_c, *envelopes[i]) for i in covering])
        j = int(np.argmin(vals))
        if j == 0 or j == len(covering) - 1:
            continue  # the optimum is not bracketed by a smaller and a larger size
        x = log_n[covering[j - 1 : j + 2]]
        p2, p1, _ = np.polyfit(x, vals[j - 1 : j + 2], 2)
        vertex = -p1 / (2 * p2) if p2 > 0 else x[1]
        opt_c.append(log_c)
        opt_n.append(float(np.clip(vertex, x[0], x[2])))
        winners.add(covering[j])
    if len(opt_c) < 3 or len(winners) < 2:
        return None, (
            "over the compute the runs cover, the best size is never bracketed by a smaller and a larger "
            "run or never changes; this needs at least three sizes trained to overlapping compute"
        )
    alpha, log_k = np.polyfit(opt_c, opt_n, 1)
    fit = NOptFit(float(math.exp(log_k)), float(alpha), np.exp(opt_c), np.exp(opt_n))
    return fit, f"{len(opt_c)} bracketed optima, {len(winners)} winning sizes"


# ----------------------------------------------------------------------------- the whole analysis


@dataclasses.dataclass(frozen=True)
class Analysis:
    metric: str
    curves: list[RunCurve]
    skipped: list[str]
    frontier: Frontier
    law: PowerLaw
    boot: Bootstrap
    predict_flops: float
    prediction: float
    interval: tuple[float, float]
    n_opt: NOptFit | None
    n_opt_note: str
    min_flops: float
    smooth: float | None = None  # as given to `collect` (recorded, not applied here)
    level: float = 0.95

    def on_frontier(self) -> np.ndarray:
        """Frontier points per run."""
        return np.bincount(self.frontier.run, minlength=len(self.curves))

    def to_dict(self) -> dict:
        a_std, b_std, c_std = self.boot.std()
        on = self.on_frontier()
        n_opt = None
        if self.n_opt is not None:
            n_opt = {
                "k": self.n_opt.k,
                "alpha": self.n_opt.alpha,
                "n_points": len(self.n_opt.flops),
                "prediction": float(self.n_opt(self.predict_flops)),
                "note": self.n_opt_note,
            }
        return {
            "metric": self.metric,
            "a": self.law.a,
            "b": self.law.b,
            "c": self.law.c,
            "a_std": a_std,
            "b_std": b_std,
            "c_std": c_std,
            "n_points": len(self.frontier.flops),
            "n_runs": len(self.curves),
            "n_boot": len(self.boot.samples),
            "min_flops": self.min_flops,
            "smooth": self.smooth,
            "prediction": {
                "flops": self.predict_flops,
                "value": self.prediction,
                "lo": self.interval[0],
                "hi": self.interval[1],
                "level": self.level,
            },
            "n_opt": n_opt,
            "n_opt_note": None if self.n_opt is not None else self.n_opt_note,
            "runs": [
                {
                    "name": c.name,
                    "num_params": c.num_params,
                    "final_flops": float(c.flops[-1]),
                    "final_value": float(c.values[-1]),
                    "images_seen": c.images_seen,
                    "frontier_points": int(on[i]),
                }
                for i, c in enumerate(self.curves)
            ],
            "skipped": self.skipped,
        }


def analyse(
    curves: Sequence[RunCurve],
    metric: str,
    *,
    skipped: Sequence[str] = (),
    predict_flops: float | None = None,
    min_flops: float = 0.0,
    bins_per_decade: int = 20,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    smooth: float | None = None,
) -> Analysis:
    """Frontier, fit, bootstrap, prediction (default: 10× the largest run's compute) and N_opt."""
    front = frontier(curves, min_flops, bins_per_decade)
    law = fit_power_law(front.flops, front.values)
    boot = bootstrap(front.flops, front.values, n_boot, seed)
    if predict_flops is None:
        predict_flops = 10 * max(float(c.flops[-1]) for c in curves)
    lo, hi = boot.interval([predict_flops], level)
    n_opt, note = fit_n_opt(curves)
    return Analysis(
        metric=metric,
        curves=list(curves),
        skipped=list(skipped),
        frontier=front,
        law=law,
        boot=boot,
        predict_flops=float(predict_flops),
        prediction=float(law(predict_flops)),
        interval=(float(lo[0]), float(hi[0])),
        n_opt=n_opt,
        n_opt_note=note,
        min_flops=min_flops,
        smooth=smooth,
        level=level,
    )
