"""Two processes × 4 CPU devices (gloo collectives on localhost) train like one process × 8."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dit_jax.train import loop

pytestmark = pytest.mark.slow


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_two_processes_match_one(tiny_config, tmp_path, data_dir):
    overrides = dict(total_steps=6, checkpoint_every=3, log_every=1, mesh=dict(data=2, fsdp=4))
    multi = str(tmp_path / "multi")
    proc = subprocess.run(
        [
            sys.executable,
            "launch/local.py",
            "--num_processes=2",
            "--devices_per_process=4",
            "--",
            "train",
            "--config=configs/quickstart.py:smoke",
            f"--workdir={multi}",
            f"--config.data.data_dir='{data_dir}'",
            "--config.total_steps=6",
            "--config.checkpoint_every=3",
            "--config.log_every=1",
            "--config.mesh.data=2",
            "--config.mesh.fsdp=4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = str(tmp_path / "single")
    loop.train(tiny_config(**overrides), single)
    a, b = losses(multi), losses(single)
    assert sorted(a) == list(range(1, 7))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], rtol=2e-5)
    with open(os.path.join(multi, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["num_processes"] == 2 and first["num_devices"] == 8
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["3", "6"]
