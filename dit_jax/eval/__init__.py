"""Evaluation: Fréchet distance, improved precision/recall, ADM sample/reference files, digits proxy metrics.

    from dit_jax import eval as dit_eval
    images, labels = dit_eval.load_samples("samples.npz")          # uint8 [N, H, W, C], int32 [N] | None
    fid = dit_eval.fid_from_features(sample_feats, ref_feats)        # float64, robust to n < d
    precision, recall = dit_eval.precision_recall(ref_feats, sample_feats)
    classifier = dit_eval.load_or_train_classifier(cfg.data)        # digits: trained once, cached
    metrics = dit_eval.digits_metrics(images, labels, cfg.data, classifier)

Importing has no side effects. User errors raise `EvalError` (a ValueError) with a one-line message.
"""

from dit_jax.eval.fid import feature_statistics, fid_from_features, frechet_distance
from dit_jax.eval.precision_recall import manifold_radii, precision_recall
from dit_jax.eval.proxy import (
    DigitsClassifier,
    digits_metrics,
    load_or_train_classifier,
    train_digits_classifier,
)
from dit_jax.eval.samples_io import EvalError, check_enough_samples, load_reference, load_samples

__all__ = [
    "DigitsClassifier",
    "EvalError",
    "check_enough_samples",
    "digits_metrics",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "load_or_train_classifier",
    "load_reference",
    "load_samples",
    "manifold_radii",
    "precision_recall",
    "train_digits_classifier",
]
