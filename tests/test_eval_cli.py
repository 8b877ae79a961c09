"""`dit-jax eval` / `reference` / in-training evaluation, end to end on tiny inputs."""

import json
import os

import numpy as np
import pytest
import scipy.spatial
import scipy.special

from dit_jax.cli import main
from dit_jax.eval import evaluate, proxy
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

    # `eval --best` with the training run's eval seed reproduces the in-training evaluation of the
    # best step: the same weights, labels and noise, so the same samples and metrics.
    capsys.readouterr()
    assert main(["eval", f"--workdir={workdir}", "--num_samples=20", "--best", f"--seed={cfg.seed + 1}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recorded = next(r for r in evals if r["step"] == best["step"])
    assert result["step"] == best["step"]
    for key, value in result.items():
        if key != "step":
            assert value == pytest.approx(recorded[f"eval/{key}"], rel=1e-6), key
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f) == result

    # Given samples whose labels agree with the classifier on exactly 15 of 20: accuracy 0.75.
    images = np.random.default_rng(0).integers(
        0, 256, (20, cfg.data.image_size, cfg.data.image_size, cfg.data.channels), np.uint8
    )
    predicted = proxy.load_or_train_classifier(cfg.data).logits(proxy.to_model_space(images)).argmax(axis=1)
    labels = np.where(np.arange(20) < 15, predicted, (predicted + 1) % cfg.model.num_classes)
    np.savez(tmp_path / "constructed.npz", arr_0=images, arr_1=labels)
    capsys.readouterr()
    assert main(["eval", f"--workdir={workdir}", f"--samples={tmp_path / 'constructed.npz'}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["class_accuracy"] == 0.75


def test_eval_rejects_bad_sample_files(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((4, 8, 8, 1), np.float32))
    code = main(["eval", f"--samples={bad}", f"--reference={bad}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "uint8" in err[0]
    code = main(["eval", f"--samples={tmp_path / 'missing.npz'}", f"--reference={bad}"])
    assert code == 2 and "missing.npz" in capsys.readouterr().err


def fid64(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """The Fréchet distance |mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr (S_a S_b)^(1/2) of Gaussians fitted
    to two feature sets, in float64. With centred features X_a [n, d], X_b [m, d] and fewer samples
    than dimensions, S_a S_b = X_a^T C X_b / sqrt((n-1)(m-1)) with C = X_a X_b^T / sqrt((n-1)(m-1)):
    its non-zero eigenvalues are the squared singular values of C, so the trace term is their sum."""
    n, m = len(feats_a), len(feats_b)
    x_a, x_b = feats_a - feats_a.mean(axis=0), feats_b - feats_b.mean(axis=0)
    cross = x_a @ x_b.T / np.sqrt((n - 1) * (m - 1))
    diff = feats_a.mean(axis=0) - feats_b.mean(axis=0)
    traces = np.sum(x_a**2) / (n - 1) + np.sum(x_b**2) / (m - 1)
    return float(diff @ diff + traces - 2 * np.linalg.svd(cross, compute_uv=False).sum())


def inception_score64(logits: np.ndarray) -> float:
    """exp(mean KL(p(y|x) || p(y))), one split."""
    p = scipy.special.softmax(logits, axis=1)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(axis=0))), axis=1))))


def precision_recall64(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. (ADM's k = 3): a point is inside a set's manifold when it is within the
    distance from some member of the set to that member's k-th nearest other member."""

    def radii(feats):
        return np.sort(scipy.spatial.distance.cdist(feats, feats), axis=1)[:, k]  # column 0: itself

    dist = scipy.spatial.distance.cdist(ref, samples)
    precision = np.mean(np.any(dist <= radii(ref)[:, None], axis=0))
    recall = np.mean(np.any(dist <= radii(samples)[None, :], axis=1))
    return float(precision), float(recall)


@pytest.mark.slow
def test_reference_and_eval_with_inception(tmp_path, capsys):
    """Random-weight Inception (no downloads): reference stats + FID/IS/precision-recall via the CLI,
    against float64 computations from the definitions on the same (fixed) Inception features; the
    features themselves are checked against PyTorch in test_inception.py."""
    torch = pytest.importorskip("torch")
    import torch_inception_reference as ref

    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(ref.randomize_(ref.FIDInceptionV3(), seed=0).state_dict(), weights)
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fake = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fake[3:] = np.array([0, 128, 255], np.uint8)[:, None, None, None]  # flat images: off the manifold
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
    real_feats = evaluate.inception_features(real, str(weights))
    fake_feats = evaluate.inception_features(fake, str(weights))
    with np.load(tmp_path / "ref.npz") as r:
        for name, key in (("mu", "pool"), ("mu_s", "spatial")):
            np.testing.assert_allclose(r[name], real_feats[key].mean(axis=0), rtol=1e-12, atol=1e-12)
        centred = real_feats["pool"] - real_feats["pool"].mean(axis=0)
        np.testing.assert_allclose(r["sigma"], centred.T @ centred / (len(real) - 1), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(r["arr_0"], real)

    def evaluate_cli(samples: str, **expected: float) -> None:
        capsys.readouterr()
        argv = [f"--samples={tmp_path / samples}", f"--reference={tmp_path / 'ref.npz'}"]
        assert main(["eval", *argv, f"--inception_weights={weights}", "--metrics=fid,is,prec_recall"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert {k: result[k] for k in expected} == pytest.approx(expected, rel=1e-6, abs=1e-6)

    precision, recall = precision_recall64(real_feats["pool"], fake_feats["pool"])
    evaluate_cli(
        "fake.npz",
        fid=fid64(fake_feats["pool"], real_feats["pool"]),
        inception_score=inception_score64(fake_feats["logits"]),
        precision=precision,
        recall=recall,
    )
    # The reference images as samples: the same Gaussian, every sample on the reference manifold.
    evaluate_cli(
        "real.npz",
        fid=0.0,
        inception_score=inception_score64(real_feats["logits"]),
        precision=1.0,
        recall=1.0,
    )
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
