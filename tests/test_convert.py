"""`dit-jax convert`: published checkpoints -> workdirs whose EMA weights reproduce the PyTorch model
and that `dit-jax sample` uses directly; bad input is one line and exit code 2."""

from __future__ import annotations

import numpy as np
import parity
import pytest

from dit_jax import cli
from dit_jax import workdir as workdir_lib

torch = pytest.importorskip("torch")
import torch_dit_reference as dit_ref  # noqa: E402  (needs torch)
import torch_lightningdit_reference as ldit_ref  # noqa: E402
from test_sit_lightningdit_vs_torch import T_B, Y_B, randomize  # noqa: E402

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def restored_output(workdir: str, x_BCHW: np.ndarray, t_B: np.ndarray) -> tuple[np.ndarray, object]:
    """The converted workdir's EMA model on NCHW inputs at network times t_B, and its config."""
    run = workdir_lib.load(workdir)
    out = run.model()(x_BCHW.transpose(0, 2, 3, 1), t_B, Y_B)
    return np.asarray(out).transpose(0, 3, 1, 2), run.config


def reference_runs(model, x_BCHW: np.ndarray, t_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch model's output in float32, and from a float64 copy in float64 (tests/parity.py)."""

    def run(module, dtype):
        with torch.no_grad():
            x, t = torch.from_numpy(x_BCHW).to(dtype), torch.from_numpy(t_B).to(dtype)
            return module(x, t, torch.as_tensor(Y_B)).numpy()

    return run(model, torch.float32), run(parity.float64(model), torch.float64)


def run_cli(*argv: str) -> int:
    return cli.main(list(argv))


def test_convert_official_dit_then_sample(tmp_path, capsys, tiny_vae_dir):
    """DiT on 8x8x4 latents with an SD-VAE-layout decoder: samples are decoded 64x64 RGB images."""
    model = randomize(dit_ref.DiT(in_channels=4, learn_sigma=True, **TINY))
    path = tmp_path / "dit.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict()}, path)
    workdir = str(tmp_path / "wd")
    args = ("--from=dit", f"--input={path}", f"--output={workdir}", "--num_heads=2", f"--vae={tiny_vae_dir}")
    assert run_cli("convert", *args) == 0
    assert "sampler ddpm 250 steps" in capsys.readouterr().out

    x = np.random.default_rng(0).standard_normal((len(T_B), 4, 8, 8)).astype(np.float32)
    ref32, ref64 = reference_runs(model, x, T_B * 1000)
    got, cfg = restored_output(workdir, x, T_B * 1000)
    assert cfg.objective.kind == "ddpm" and cfg.model.learn_sigma and cfg.model.num_heads == 2
    parity.assert_parity("converted DiT", got, ref32, ref64)

    out = tmp_path / "s.npz"
    assert (
        run_cli("sample", f"--workdir={workdir}", "--num_samples=4", f"--output={out}", "--num_steps=3") == 0
    )
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, 64, 64, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [0, 1, 2, 3]


def test_convert_lightningdit_infers_architecture_and_time_convention(tmp_path):
    model = randomize(
        ldit_ref.LightningDiT(
            in_channels=4, use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, **TINY
        )
    )
    path = tmp_path / "lightningdit.pt"
    torch.save(model.state_dict(), path)
    workdir = str(tmp_path / "wd")
    assert run_cli("convert", "--from=lightningdit", f"--input={path}", f"--output={workdir}") == 0
    cfg = workdir_lib.load_config(workdir)
    m = cfg.model
    assert (m.mlp, m.norm, m.qk_norm, m.rope, m.num_heads) == ("swiglu", "rmsnorm", True, True, 2)
    assert (cfg.objective.time_scale, cfg.objective.time_direction) == (1.0, "noise_to_data")
    assert (cfg.sampler.kind, cfg.sampler.cfg_scale) == ("euler", 6.7)
    x = np.random.default_rng(1).standard_normal((len(T_B), 4, 8, 8)).astype(np.float32)
    ref32, ref64 = reference_runs(model, x, T_B)
    got, _ = restored_output(workdir, x, T_B)
    parity.assert_parity("converted LightningDiT", got, ref32, ref64, multiple=2.5)


def test_convert_bad_input_is_one_line(tmp_path, capsys):
    model = randomize(ldit_ref.LightningDiT(in_channels=4, use_swiglu=True, use_rmsnorm=True, **TINY))
    path = tmp_path / "lightningdit.pt"
    torch.save(model.state_dict(), path)
    cases = [
        (("--from=dit", f"--input={path}", "--num_heads=2"), "lightningdit"),  # wrong family
        (("--from=sit", f"--input={tmp_path / 'missing.pt'}"), "not found"),
        (("--from=lightningdit", f"--input={path}", f"--vae={tmp_path / 'no_vae'}"), "VAE folder"),
    ]
    for args, expected in cases:
        assert run_cli("convert", *args, f"--output={tmp_path / 'wd'}") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    workdir = str(tmp_path / "done")
    args = ("convert", "--from=lightningdit", f"--input={path}", f"--output={workdir}", "--num_heads=2")
    assert run_cli(*args) == 0
    assert run_cli(*args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
