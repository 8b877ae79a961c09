"""The report of a scaling analysis (`dit_jax.scaling.Analysis`): a markdown table, a log-log plot
(PNG) and the JSON of `Analysis.to_dict()`, written together into one folder.

    written = scaling_report.write_report(result, "runs/sweep/scaling")  # {"png": path, "md": .., "json": ..}
    print(scaling_report.markdown(result))
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import numpy as np

from dit_jax.scaling import Analysis, RunCurve


def _fmt_params(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def markdown(result: Analysis) -> str:
    """The fit parameters, the prediction, N_opt and a per-run table."""
    d = result.to_dict()
    pct = f"{100 * result.level:g}%"
    lines = [
        f"# Scaling fit: {result.metric} vs training compute",
        "",
        f"L(C) = a·C^(−b) + c, C in FLOPs, fitted to {d['n_points']} frontier points of {d['n_runs']} runs "
        f"(soft-L1 in log space; std over {d['n_boot']} bootstrap resamples of the frontier)"
        + (f"; {result.metric} smoothed over the last {result.smooth:g} of compute" if result.smooth else "")
        + (f"; frontier from {result.min_flops:.3g} FLOPs on" if result.min_flops else "")
        + ".",
        "",
        "| parameter | value | bootstrap std |",
        "|---|---|---|",
        *(f"| {k} | {d[k]:.4g} | {d[k + '_std']:.3g} |" for k in ("a", "b", "c")),
        "",
        f"Prediction at C = {result.predict_flops:.3g} FLOPs: {result.metric} = {result.prediction:.4g} "
        f"({pct} bootstrap interval {result.interval[0]:.4g} – {result.interval[1]:.4g}).",
        "",
    ]
    if result.n_opt is not None:
        n = result.n_opt
        lines += [
            f"Compute-optimal size: N_opt(C) = {n.k:.3g}·C^{n.alpha:.3f} ({result.n_opt_note}); "
            f"N_opt({result.predict_flops:.3g}) = {_fmt_params(float(n(result.predict_flops)))} parameters.",
            "",
        ]
    else:
        lines += [f"Compute-optimal size: not fitted ({result.n_opt_note}).", ""]
    lines += [
        f"| run | parameters | final FLOPs | images seen | final {result.metric} | on frontier |",
        "|---|---|---|---|---|---|",
    ]
    for run in d["runs"]:
        images = "" if run["images_seen"] is None else f"{run['images_seen']:.4g}"
        on = f"yes ({run['frontier_points']})" if run["frontier_points"] else "no"
        lines.append(
            f"| {run['name']} | {_fmt_params(run['num_params'])} | {run['final_flops']:.4g} | {images} | "
            f"{run['final_value']:.4g} | {on} |"
        )
    if result.skipped:
        lines += ["", f"Runs without {result.metric}, left out: {', '.join(result.skipped)}."]
    return "\n".join(lines) + "\n"


def plot_png(result: Analysis) -> bytes | None:
    """Log-log plot: runs coloured by size, the frontier, the law with its band and the prediction.
    None when matplotlib is not installed."""
    try:
        from matplotlib import cm, colors, ticker
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    sizes = [c.num_params for c in result.curves]
    norm = colors.LogNorm(min(sizes), max(sizes) * (1.0001 if min(sizes) == max(sizes) else 1.0))
    cmap = cm.viridis
    for curve in result.curves:
        ax.plot(curve.flops, curve.values, color=cmap(norm(curve.num_params)), lw=1, alpha=0.8)
    f = result.frontier
    ax.scatter(f.flops, f.values, s=12, color="black", zorder=3, label="frontier")
    grid = np.geomspace(f.flops.min(), max(result.predict_flops, f.flops.max()), 200)
    lo, hi = result.boot.interval(grid, result.level)
    law = result.law
    ax.fill_between(
        grid, lo, hi, color="tab:red", alpha=0.2, lw=0, label=f"{100 * result.level:g}% bootstrap"
    )
    ax.plot(grid, law(grid), color="tab:red", lw=1.5, label=f"{law.a:.3g}·C^(−{law.b:.3g}) + {law.c:.3g}")
    ax.errorbar(
        [result.predict_flops],
        [result.prediction],
        yerr=[[result.prediction - result.interval[0]], [result.interval[1] - result.prediction]],
        fmt="*",
        ms=12,
        color="tab:red",
        label=f"prediction at {result.predict_flops:.3g}",
    )
    if result.min_flops > 0:
        ax.axvline(result.min_flops, color="gray", ls=":", lw=1, label="--min_flops")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / low < 10:  # within a decade the minor ticks are the only labels
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel(result.metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="parameters")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def default_output(curves: Sequence[RunCurve]) -> str:
    """`scaling/` beside the runs: in the folder holding them (their deepest common parent)."""
    return os.path.join(
        os.path.commonpath([os.path.abspath(os.path.dirname(c.workdir)) for c in curves]), "scaling"
    )


def report_paths(output: str, metric: str) -> dict[str, str]:
    stem = "scaling_" + metric.replace("/", "_")
    return {ext: os.path.join(output, f"{stem}.{ext}") for ext in ("png", "md", "json")}


def write_report(result: Analysis, output: str) -> dict[str, str]:
    """Writes scaling_<metric>.{png,md,json} into `output` (created if missing); returns the paths
    written (no png without matplotlib). Everything is rendered before the first file is written."""
    png = plot_png(result)
    contents = {"md": markdown(result), "json": json.dumps(result.to_dict(), indent=2) + "\n"}
    if png is not None:
        contents["png"] = png
    paths = report_paths(output, result.metric)
    os.makedirs(output, exist_ok=True)
    written = {}
    for ext, data in contents.items():
        tmp = paths[ext] + ".tmp"
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, paths[ext])
        written[ext] = paths[ext]
    return written
