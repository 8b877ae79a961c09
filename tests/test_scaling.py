"""Scaling-law fits (dit_jax.scaling, `dit-jax scaling`) on synthetic runs written here.

Laws used below: L(C) = a·C^(−b) + c and Chinchilla's L(N, D) = E + A·N^(−α) + B·D^(−β) with
C = 6·N·D, whose compute-optimal size is N_opt ∝ C^(β / (α + β)).
"""

import json
import math
import os

import numpy as np
import pytest

from dit_jax import config as config_lib
from dit_jax import scaling, scaling_report
from dit_jax.cli import main

A_TRUE, B_TRUE, C_TRUE = 2 * 1e15**0.3, 0.3, 0.5  # the power term is 4x c at the smallest compute
CHINCHILLA = dict(E=1.7, A=400.0, B=400.0, alpha=0.34, beta=0.28)
N_OPT_EXPONENT = CHINCHILLA["beta"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])  # 0.4516
N_OPT_K = (CHINCHILLA["alpha"] / CHINCHILLA["beta"]) ** (1 / 0.62) / 6**N_OPT_EXPONENT  # N_opt = k·C^exp


def power_law_points(n: int, noise: float, seed: int = 0):
    flops = np.geomspace(1e15, 1e19, n)
    rng = np.random.default_rng(seed)
    return flops, (A_TRUE * flops**-B_TRUE + C_TRUE) * np.exp(noise * rng.standard_normal(n))


def chinchilla_loss(num_params, images):
    k = CHINCHILLA
    return k["E"] + k["A"] * num_params ** -k["alpha"] + k["B"] * images ** -k["beta"]


def curve(name, num_params, flops, values):
    flops, values = np.asarray(flops, float), np.asarray(values, float)
    return scaling.RunCurve(name, "", int(num_params), flops, values, values)


# ----------------------------------------------------------------------------- fit


def test_fit_recovers_known_law():
    # 1% multiplicative noise on 60 points over 4 decades. Over 30 noise draws the fitted b scatters
    # with std 0.003 and c with std 0.005 (about the bootstrap std below), so 0.015 and 0.025 are 5σ;
    # a is degenerate with b (d log a = ln(C) db, ln C ~ 39 here), so it is checked as the amplitude
    # at the geometric-mean compute, which the data pin to ~1%.
    flops, values = power_law_points(60, 0.01)
    law = scaling.fit_power_law(flops, values)
    assert law.b == pytest.approx(B_TRUE, abs=0.015)
    assert law.c == pytest.approx(C_TRUE, abs=0.025)
    ref = math.sqrt(1e15 * 1e19)
    assert law.a * ref**-law.b == pytest.approx(A_TRUE * ref**-B_TRUE, rel=0.05)
    assert math.log(law.a / A_TRUE) == pytest.approx(0, abs=0.6)
    boot = scaling.bootstrap(flops, values, n_boot=100)
    assert abs(law.b - B_TRUE) < 5 * boot.std()[1]
    # Without noise the fit is exact.
    exact = scaling.fit_power_law(*power_law_points(20, 0.0))
    assert (exact.a, exact.b, exact.c) == pytest.approx((A_TRUE, B_TRUE, C_TRUE), rel=1e-4)


def test_robust_fit_ignores_an_outlier():
    flops, values = power_law_points(30, 0.01, seed=1)
    clean = scaling.fit_power_law(flops, values)
    for i, factor in ((15, 1.5), (20, 0.6)):
        bad = values.copy()
        bad[i] *= factor
        law = scaling.fit_power_law(flops, bad)
        assert law.b == pytest.approx(clean.b, abs=0.005)
        assert law.c == pytest.approx(clean.c, abs=0.01)
        # The fit passes the outlier by: it is still 30-40% off the fitted curve.
        assert abs(law(flops[i]) / bad[i] - 1) > 0.3


def test_bootstrap_std_is_positive_and_shrinks_with_more_points():
    # Over noise draws the std of b is 0.007 with 10 points and 0.002 with 160 (1/sqrt(n)).
    few = scaling.bootstrap(*power_law_points(12, 0.01), n_boot=100).std()
    many = scaling.bootstrap(*power_law_points(160, 0.01), n_boot=100).std()
    assert all(s > 0 for s in few + many)
    assert many[1] < few[1] / 2 and many[2] < few[2] / 2


def test_fit_needs_three_points():
    with pytest.raises(scaling.ScalingError, match="only 2 frontier point"):
        scaling.fit_power_law([1e15, 1e16, 1e16], [3.0, 2.0, 1.9])


# ----------------------------------------------------------------------------- frontier, smoothing


def test_frontier_is_the_lower_envelope():
    runs = [
        curve("a", 10, [1, 2, 4, 8], [10, 6, 5, 4.5]),
        curve("b", 20, [2, 4, 8, 16], [12, 5.5, 3, 3.5]),
    ]
    # By compute: (1, 10 a) (2, 6 a) (2, 12 b) (4, 5 a) (4, 5.5 b) (8, 3 b) (8, 4.5 a) (16, 3.5 b):
    # on it are the points below everything at less or equal compute.
    f = scaling.frontier(runs)
    assert f.flops.tolist() == [1, 2, 4, 8]
    assert f.values.tolist() == [10, 6, 5, 3]
    assert f.run.tolist() == [0, 0, 0, 1]
    f = scaling.frontier(runs, min_flops=3)
    assert (f.flops.tolist(), f.values.tolist()) == ([4, 8], [5, 3])
    # The cut comes after the envelope: (3, 7) is beaten by (2, 6), below min_flops, so it is not on it.
    f = scaling.frontier([*runs, curve("c", 30, [3], [7])], min_flops=2.5)
    assert (f.flops.tolist(), f.values.tolist()) == ([4, 8], [5, 3])
    # One point per decade: the lowest (last) of 1, 2, 4, 8.
    f = scaling.frontier(runs, bins_per_decade=1)
    assert (f.flops.tolist(), f.values.tolist()) == ([8], [3])


def test_smoothing_is_a_trailing_mean_over_a_fraction_of_compute():
    flops = np.array([1.0, 2, 3, 9, 10])
    values = np.array([5.0, 4, 3, 2, 1])
    # Windows [0.5C, C]: {1}, {1, 2}, {2, 3}, {9}, {9, 10}.
    assert scaling.smooth_trailing(flops, values, 0.5).tolist() == [5, 4.5, 3.5, 2, 1.5]
    assert scaling.smooth_trailing(flops, values, 0.0).tolist() == values.tolist()


# ----------------------------------------------------------------------------- N_opt


def chinchilla_runs(sizes, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    runs = []
    for n in sizes:
        images = np.geomspace(1e8, 1e12, 60)
        values = chinchilla_loss(n, images) * np.exp(noise * rng.standard_normal(len(images)))
        runs.append(curve(f"n{n:.0e}", n, 6 * n * images, values))
    return runs


def test_n_opt_recovers_the_chinchilla_exponent():
    fit, note = scaling.fit_n_opt(chinchilla_runs(np.geomspace(1e7, 1e9, 6)))
    assert fit is not None, note
    assert fit.alpha == pytest.approx(N_OPT_EXPONENT, abs=0.005)
    assert fit.k == pytest.approx(N_OPT_K, rel=0.05)
    # With 0.5% noise on every point the exponent moved by <= 0.015 in trials: 0.03 is twice that.
    noisy, note = scaling.fit_n_opt(chinchilla_runs(np.geomspace(1e7, 1e9, 6), noise=0.005, seed=3))
    assert noisy is not None, note
    assert noisy.alpha == pytest.approx(N_OPT_EXPONENT, abs=0.03)


def test_n_opt_needs_several_sizes():
    fit, note = scaling.fit_n_opt(chinchilla_runs([1e8, 1e8]))
    assert fit is None and "same model size" in note


# ----------------------------------------------------------------------------- workdirs and the CLI


def write_workdir(path, hidden_size, rows):
    """A synthetic workdir: config.json of a digits-sized DiT and the given metrics.jsonl rows."""
    os.makedirs(path, exist_ok=True)
    model = dict(image_size=8, in_channels=1, num_classes=10, hidden_size=hidden_size, depth=2, num_heads=4)
    cfg = config_lib.from_dict({"model": model, "data": dict(image_size=8, channels=1, num_classes=10)})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_lib.to_dict(cfg), f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def chinchilla_workdir(path, hidden_size, noise=0.005, seed=0):
    """Rows every 10 steps with loss, flops = 6·N·images and images_seen; an eval/fid row every
    50 steps without flops (as the trainer logs evals); the last line cut short by a kill."""
    write_workdir(path, hidden_size, [])
    n = scaling.param_count(str(path))
    rng = np.random.default_rng(seed)
    images_per_step = 1e4 / 10
    rows = [{"step": 0, "num_params": n}]
    for step in [m * 10**e for e in range(1, 6) for m in range(1, 10)] + [10**6]:  # 9 rows a decade
        images = step * images_per_step
        loss = chinchilla_loss(n, images) * math.exp(noise * rng.standard_normal())
        rows.append({"step": step, "loss": loss, "flops": 6 * n * images, "images_seen": images, "lr": 1e-4})
        if step % 50 == 0:
            rows.append({"step": step, "eval/fid": 20 * loss})
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.write('{"step": 1000010, "lo')
    return n


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    sizes = {}
    for i, hidden in enumerate((16, 32, 64, 128, 256)):
        sizes[hidden] = chinchilla_workdir(root / f"h{hidden}", hidden, seed=i)
    return root, sizes


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


def test_collect_reads_runs_and_interpolates_eval_flops(sweep, tmp_path):
    root, sizes = sweep
    curves, skipped = scaling.collect([str(root)], "eval/fid")
    assert skipped == [] and [c.name for c in curves] == [f"h{h}" for h in sorted(sizes)]  # by size
    run = next(c for c in curves if c.name == "h64")
    assert run.num_params == sizes[64]
    # eval rows carry no flops: those of the train rows at the same step.
    steps = [50, 100, 200, 300]
    assert run.flops[:4].tolist() == pytest.approx([6 * sizes[64] * s * 1e3 for s in steps])
    assert run.images_seen == 1e9
    # Between train rows, linear in step; past the last row that logs flops, dropped.
    train = [{"step": s, "loss": 1.0, "flops": 1e8 * s} for s in (10, 20, 40)]
    evals = [{"step": s, "eval/fid": 100.0 / s} for s in (15, 30, 40, 50)]
    between = write_workdir(tmp_path / "between", 16, train + evals)
    (run,), _ = scaling.collect([between], "eval/fid")
    assert run.flops.tolist() == pytest.approx([1.5e9, 3e9, 4e9])
    assert run.raw.tolist() == pytest.approx([100 / 15, 100 / 30, 100 / 40])
    # A run that never evaluated is left out, and said so.
    no_eval = write_workdir(tmp_path / "no_eval", 16, [{"step": 1, "loss": 1.0, "flops": 1e9}])
    curves, skipped = scaling.collect([str(root), no_eval], "eval/fid")
    assert len(curves) == 5 and len(skipped) == 1 and skipped[0].endswith("no_eval")


def test_cli_end_to_end(sweep, capsys, tmp_path):
    root, sizes = sweep
    code, out, err = run_cli(capsys, "scaling", f"--runs={root}", "--json", "--num_bootstrap=50")
    assert code == 0, err
    result = json.loads(out[-1])
    for key in ("a", "b", "c", "a_std", "b_std", "c_std", "n_points", "n_runs", "prediction", "n_opt"):
        assert key in result
    assert result["n_runs"] == 5 and result["n_points"] >= 3 and result["b_std"] > 0
    assert result["n_opt"]["alpha"] == pytest.approx(N_OPT_EXPONENT, abs=0.1)
    largest = max(r["final_flops"] for r in result["runs"])
    prediction = result["prediction"]
    assert prediction["flops"] == pytest.approx(10 * largest)
    assert prediction["lo"] <= prediction["value"] <= prediction["hi"]
    paths = scaling_report.report_paths(str(root / "scaling"), "loss")  # default: beside the runs
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(paths["png"]) as image:
        assert image.size[0] > 400 and image.size[1] > 300
    with open(paths["md"]) as f:
        table = f.read()
    assert "| run | parameters | final FLOPs |" in table
    assert all(f"| h{h} |" in table for h in sizes) and "| b |" in table
    with open(paths["json"]) as f:
        assert json.load(f)["b"] == result["b"]

    # Two workdirs named directly, an eval metric, an explicit output folder and prediction point.
    out_dir = tmp_path / "report"
    code, out, err = run_cli(
        capsys,
        "scaling",
        "--runs",
        str(root / "h16"),
        str(root / "h256"),
        "--metric=eval/fid",
        f"--output={out_dir}",
        "--predict_flops=1e20",
        "--num_bootstrap=20",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out[-1])
    assert result["n_runs"] == 2 and result["prediction"]["flops"] == 1e20 and result["n_opt"] is None
    assert sorted(os.listdir(out_dir)) == [
        "scaling_eval_fid.json",
        "scaling_eval_fid.md",
        "scaling_eval_fid.png",
    ]


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no runs found under"),
        ("missing", "is not a folder"),
        ("no_flops", "run old logged no 'flops' in metrics.jsonl"),
        ("two_points", "only 2 frontier point(s) at distinct compute; fitting a·C^(−b) + c needs at least 3"),
        ("unknown_metric", "unknown metric 'eval/nope': no run logged it; available: eval/fid, loss"),
    ],
)
def test_cli_bad_input_one_line(capsys, tmp_path, case, message):
    root = tmp_path / "runs"
    root.mkdir()
    metric = "loss"
    if case == "no_flops":
        write_workdir(root / "ok", 16, [{"step": s, "loss": 1.0 / s, "flops": 1e9 * s} for s in (1, 2, 3, 4)])
        write_workdir(root / "old", 16, [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)])
    elif case == "two_points":
        write_workdir(root / "short", 16, [{"step": s, "loss": 1.0 / s, "flops": 1e9 * s} for s in (1, 2)])
    elif case == "unknown_metric":
        rows = [{"step": s, "loss": 1.0 / s, "flops": 1e9 * s, "eval/fid": 9.0} for s in (1, 2, 3)]
        write_workdir(root / "r", 16, rows)
        metric = "eval/nope"
    runs = str(tmp_path / "nope") if case == "missing" else str(root)
    output = tmp_path / "out"
    before = sorted(p for p in root.rglob("*"))
    code, out, err = run_cli(capsys, "scaling", f"--runs={runs}", f"--metric={metric}", f"--output={output}")
    assert code == 2
    assert len(err) == 1 and err[0].startswith("dit-jax scaling: error: ") and message in err[0], err
    assert "Traceback" not in "\n".join(out + err)
    assert not output.exists() and sorted(p for p in root.rglob("*")) == before
