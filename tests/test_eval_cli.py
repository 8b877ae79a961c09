"""`dit-jax eval` / `reference` / in-training evaluation, end to end on tiny inputs."""

import json
import os

import numpy as np
import pytest

from dit_jax.cli import main
from dit_jax.eval import evaluate, feature_statistics, frechet_distance
from dit_jax.train import loop


def test_inception_score_matches_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 7))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.exp(np.mean([np.sum(q * (np.log(q) - np.log(p.mean(0)))) for q in p]))
    assert evaluate.inception_score(logits, split_size=40) == pytest.approx(expected, rel=1e-10)
    assert evaluate.inception_score(np.zeros((10, 5))) == pytest.approx(1.0)


def test_training_logs_eval_metrics_and_keeps_the_best_checkpoint(tiny_config, tmp_path, capsys):
    cfg = tiny_config(
        total_steps=4,
        checkpoint_every=4,
        eval_every=2,
        eval=dict(num_samples=20, best_metric="class_accuracy"),
    )
    workdir = str(tmp_path / "run")
    loop.train(cfg, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/class_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval/fd_classifier", "eval/precision", "eval/recall", "eval/copy_fraction"} <= set(evals[0])
    with open(os.path.join(workdir, "best", "best.json")) as f:
        best = json.load(f)
    values = {r["step"]: r["eval/class_accuracy"] for r in evals}
    assert best["value"] == max(values.values()) and values[best["step"]] == best["value"]
    assert os.listdir(os.path.join(workdir, "best")).count(str(best["step"])) == 1

    capsys.readouterr()
    assert main(["eval", f"--workdir={workdir}", "--num_samples=20", "--best"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == best["step"] and 0 <= result["class_accuracy"] <= 1
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f) == result


def test_eval_rejects_bad_sample_files(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((4, 8, 8, 1), np.float32))
    code = main(["eval", f"--samples={bad}", f"--reference={bad}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "uint8" in err[0]
    code = main(["eval", f"--samples={tmp_path / 'missing.npz'}", f"--reference={bad}"])
    assert code == 2 and "missing.npz" in capsys.readouterr().err


@pytest.mark.slow
def test_reference_and_eval_with_inception(tmp_path, capsys):
    """Random-weight Inception (no downloads): reference stats + FID/IS/precision-recall via the CLI."""
    torch = pytest.importorskip("torch")
    import torch_inception_reference as ref

    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(ref.randomize_(ref.FIDInceptionV3(), seed=0).state_dict(), weights)
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fake = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", arr_0=real)
    np.savez(tmp_path / "fake.npz", arr_0=fake)
    assert (
        main(
            [
                "reference",
                f"--images={tmp_path / 'real.npz'}",
                f"--output={tmp_path / 'ref.npz'}",
                f"--inception_weights={weights}",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                f"--samples={tmp_path / 'fake.npz'}",
                f"--reference={tmp_path / 'ref.npz'}",
                f"--inception_weights={weights}",
                "--metrics=fid,is,prec_recall",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    feats = evaluate.inception_features(fake, str(weights))
    with np.load(tmp_path / "ref.npz") as r:
        expected = frechet_distance(*feature_statistics(feats["pool"]), r["mu"], r["sigma"])
    assert result["fid"] == pytest.approx(expected, rel=1e-9) and result["fid"] > 0
    assert result["inception_score"] >= 1.0 and 0 <= result["precision"] <= 1
    assert (
        main(
            [
                "eval",
                f"--samples={tmp_path / 'fake.npz'}",
                f"--reference={tmp_path / 'ref.npz'}",
                f"--inception_weights={tmp_path / 'nope.pth'}",
                "--metrics=fid",
            ]
        )
        == 2
    )
    assert "nope.pth" in capsys.readouterr().err
