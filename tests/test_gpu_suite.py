"""benchmarks/gpu_suite.sh's CPU dry run: the code paths and the JSON a GPU run will produce."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_dry_run_writes_every_kernel_case_and_the_planned_train_step(tmp_path):
    out = tmp_path / "suite.json"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--dry_run", f"--out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["backend"] == "cpu"
    kernels = result["kernels"]
    cases = {(r["impl"], r["mask"]) for r in kernels}
    assert cases == {(i, m) for i in ("dense", "pallas_gpu") for m in ("full", "neighborhood2d")}
    for row in kernels:
        assert row["fwd_tflops"] > 0 and row["bwd_tflops"] > 0, row
    sparse = next(r for r in kernels if r["mask"] == "neighborhood2d")
    assert 0.05 < sparse["density"] < 0.15  # ~10 % as the suite promises
    train = result["train_step"]
    assert "error" not in train, train
    assert train["plan_target"] == "cpu:1" and train["batch"] == 8  # nothing limits a CPU target
    assert train["plan"]["fits"] is None and train["plan"]["state_bytes_per_device"] > 0
    assert train["step_s"] > 0 and train["img_per_s"] > 0 and train["mfu"] is None
