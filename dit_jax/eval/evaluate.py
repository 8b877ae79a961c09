"""Evaluation entry points: samples vs ADM reference batches (Inception metrics), digits proxy
metrics for a training run, and building reference statistics.

Inception metrics follow the ADM evaluator: FID on pool3 features, sFID on the first 7 channels
of mixed_6/conv, Inception Score on the 1008-way logits (split size 5000), improved
precision/recall (k = 3) on pool3 features of the reference images.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from dit_jax import config as config_lib
from dit_jax.eval.fid import feature_statistics, frechet_distance
from dit_jax.eval.precision_recall import precision_recall
from dit_jax.eval.proxy import digits_metrics, load_or_train_classifier
from dit_jax.eval.samples_io import EvalError, check_enough_samples, load_reference

INCEPTION_METRICS = ("fid", "sfid", "is", "prec_recall")
LOWER_IS_BETTER = ("fid", "sfid", "fd_classifier", "copy_fraction")


@functools.lru_cache(maxsize=2)
def _inception(weights: str | None):
    """The jitted Inception feature function for a weights file, loaded and compiled once."""
    from dit_jax.eval.inception_convert import load_fid_inception
    from dit_jax.models.inception import jit_features

    return jit_features(load_fid_inception(weights))


def inception_features(images_uint8: np.ndarray, weights: str | None, batch_size: int = 100) -> dict:
    """pool [N, 2048], spatial [N, 2023] and logits [N, 1008] (float64) of uint8 NHWC images."""
    images = np.asarray(images_uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)  # grey -> RGB, as image loaders do
    features = _inception(weights)
    out: dict[str, list] = {"pool": [], "spatial": [], "logits": []}
    for start in range(0, len(images), batch_size):
        batch = jax.device_get(features(images[start : start + batch_size]))
        for key in out:
            out[key].append(np.asarray(batch[key], np.float64))
    return {key: np.concatenate(value) for key, value in out.items()}


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over splits of `split_size` (ADM's convention)."""
    scores = []
    for start in range(0, len(logits), split_size):
        z = logits[start : start + split_size]
        log_p = z - z.max(axis=1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        log_marginal = np.log(p.mean(axis=0) + 1e-30)
        scores.append(np.exp(np.mean(np.sum(p * (log_p - log_marginal), axis=1))))
    return float(np.mean(scores))


def compare_to_reference(
    images_uint8: np.ndarray, reference_path: str, metrics: Sequence[str], weights: str | None = None
) -> dict[str, float]:
    """Inception metrics of samples against an ADM reference batch."""
    unknown = [m for m in metrics if m not in INCEPTION_METRICS]
    if unknown:
        raise EvalError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(INCEPTION_METRICS)}")
    check_enough_samples(len(images_uint8), metrics)
    ref = load_reference(reference_path, metrics)
    feats = inception_features(images_uint8, weights)
    out: dict[str, float] = {"num_samples": float(len(images_uint8))}
    if "fid" in metrics:
        out["fid"] = frechet_distance(*feature_statistics(feats["pool"]), ref["mu"], ref["sigma"])
    if "sfid" in metrics:
        out["sfid"] = frechet_distance(*feature_statistics(feats["spatial"]), ref["mu_s"], ref["sigma_s"])
    if "is" in metrics:
        out["inception_score"] = inception_score(feats["logits"])
    if "prec_recall" in metrics:
        check_enough_samples(len(ref["arr_0"]), ["prec_recall"], what="reference images")
        ref_pool = inception_features(ref["arr_0"], weights)["pool"]
        out["precision"], out["recall"] = precision_recall(ref_pool, feats["pool"])
    return out


def build_reference(images_uint8: np.ndarray, output: str, weights: str | None = None) -> dict[str, tuple]:
    """Writes an ADM-format reference batch: mu, sigma, mu_s, sigma_s and the images (arr_0)."""
    check_enough_samples(len(images_uint8), ["fid"], what="reference images")
    feats = inception_features(images_uint8, weights)
    mu, sigma = feature_statistics(feats["pool"])
    mu_s, sigma_s = feature_statistics(feats["spatial"])
    np.savez(output, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=np.asarray(images_uint8))
    return {"mu": mu.shape, "sigma": sigma.shape, "arr_0": np.shape(images_uint8)}


def check_run_metrics(cfg: config_lib.Config) -> None:
    """Raises EvalError when a run has no metrics to compute (cheap: call it before sampling)."""
    if cfg.data.source == "digits":
        return
    if not cfg.eval.reference:
        raise EvalError(
            f"no metrics for data source {cfg.data.source!r} without a reference: set "
            "eval.reference to an ADM reference batch (build one with `dit-jax reference`)"
        )
    if not os.path.isfile(cfg.eval.reference):
        raise EvalError(f"eval.reference {cfg.eval.reference!r} not found (an ADM reference batch .npz)")


def run_metrics(
    cfg: config_lib.Config, images_uint8: np.ndarray, labels: np.ndarray | None
) -> dict[str, float]:
    """The metrics configured for a training run: digits proxy metrics for the digits data set,
    Inception metrics against `eval.reference` otherwise."""
    check_run_metrics(cfg)
    if cfg.data.source == "digits":
        classifier = load_or_train_classifier(cfg.data)
        return digits_metrics(images_uint8, labels, cfg.data, classifier)
    return compare_to_reference(
        images_uint8, cfg.eval.reference, ("fid",), cfg.eval.inception_weights or None
    )


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


def write_result(path: str, result: dict) -> str:
    """Writes the result JSON (creating the folder) and returns the one-line JSON string."""
    line = json.dumps({k: (float(v) if isinstance(v, np.floating | float) else v) for k, v in result.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(line + "\n")
    return line
