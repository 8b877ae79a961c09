"""Digits proxy metrics: the classifier trained here, its cache, and what real / copied / noise images get."""

import dataclasses

import numpy as np
import pytest

from dit_jax import config, data
from dit_jax.data.pixels import to_uint8
from dit_jax.eval import EvalError, digits_metrics, load_or_train_classifier, proxy


@pytest.fixture(scope="module")
def digits_cfg(data_dir):
    return config.Data(source="digits", image_size=8, channels=1, num_classes=10, data_dir=data_dir)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("classifier_cache"))


@pytest.fixture(scope="module")
def classifier(digits_cfg, cache_dir):
    return load_or_train_classifier(digits_cfg, cache_dir)


@pytest.fixture(scope="module")
def splits(digits_cfg):
    return {split: data.load_split_arrays(digits_cfg, split) for split in ("train", "test")}


def test_classifier_accuracy(classifier, splits):
    images, labels = splits["test"]
    accuracy = (classifier.logits(images).argmax(axis=1) == labels).mean()
    assert accuracy >= 0.95
    assert classifier.test_accuracy == pytest.approx(accuracy)
    assert classifier.features(images).shape == (200, proxy.FEATURE_DIM)
    # uint8 input (ADM convention) is scaled exactly as the data pipeline scales stored pixels.
    np.testing.assert_array_equal(classifier.logits(to_uint8(images)), classifier.logits(images))


def test_cache_reloads_identical_logits_without_training(
    classifier, digits_cfg, cache_dir, splits, monkeypatch
):
    def fail(*args, **kwargs):
        raise AssertionError("retrained although a cached classifier exists")

    monkeypatch.setattr(proxy, "train_digits_classifier", fail)
    reloaded = load_or_train_classifier(digits_cfg, cache_dir)
    images = splits["test"][0]
    np.testing.assert_array_equal(reloaded.logits(images), classifier.logits(images))
    assert reloaded.test_accuracy == classifier.test_accuracy


def test_cache_from_another_version_or_corrupt_is_retrained(classifier, digits_cfg, tmp_path, monkeypatch):
    calls = []

    def fake_train(data_cfg, seed=0):
        calls.append(seed)
        return classifier.params

    monkeypatch.setattr(proxy, "train_digits_classifier", fake_train)
    monkeypatch.setattr(proxy, "CLASSIFIER_VERSION", "old")
    load_or_train_classifier(digits_cfg, str(tmp_path))
    monkeypatch.setattr(proxy, "CLASSIFIER_VERSION", "new")
    load_or_train_classifier(digits_cfg, str(tmp_path))
    load_or_train_classifier(digits_cfg, str(tmp_path))
    assert calls == [0, 0]
    with open(proxy._cache_path(digits_cfg, str(tmp_path)), "wb") as f:
        f.write(b"not an npz")  # a corrupt cache is replaced, not an error
    load_or_train_classifier(digits_cfg, str(tmp_path))
    assert calls == [0, 0, 0]


def test_real_test_images(classifier, digits_cfg, splits):
    images, labels = splits["test"]
    metrics = digits_metrics(to_uint8(images), labels, digits_cfg, classifier)
    assert set(metrics) >= {"class_accuracy", "fd_classifier", "precision", "recall", "memorisation"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["class_accuracy"] >= 0.95
    assert metrics["fd_classifier"] < 1e-6  # the test split is the reference
    assert metrics["memorisation"] == pytest.approx(1.0)
    assert metrics["copy_fraction"] == 0.0
    assert metrics["precision"] > 0.5 and metrics["recall"] > 0.4


def test_training_images_noise_and_labels(classifier, digits_cfg, splits):
    train_images, train_labels = splits["train"]
    subset = np.random.default_rng(0).choice(len(train_images), 200, replace=False)
    copies = digits_metrics(to_uint8(train_images[subset]), train_labels[subset], digits_cfg, classifier)
    assert copies["copy_fraction"] == 1.0 and copies["memorisation"] < 1e-6
    assert copies["class_accuracy"] >= 0.95 and copies["precision"] == 1.0

    noise = np.random.default_rng(1).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    noisy = digits_metrics(noise, np.arange(200) % 10, digits_cfg, classifier)
    assert noisy["class_accuracy"] < 0.3  # chance is 0.1
    assert noisy["fd_classifier"] > 4 * copies["fd_classifier"]
    assert noisy["precision"] < 0.1 and noisy["memorisation"] > 2 and noisy["copy_fraction"] == 0.0

    unlabelled = digits_metrics(to_uint8(splits["test"][0]), None, digits_cfg, classifier)
    assert "class_accuracy" not in unlabelled


def test_bad_input(classifier, digits_cfg, splits):
    images = to_uint8(splits["test"][0])
    with pytest.raises(EvalError, match="uint8"):
        digits_metrics(splits["test"][0], None, digits_cfg, classifier)
    with pytest.raises(EvalError, match=r"\[N, 8, 8, 1\]"):
        digits_metrics(np.repeat(images, 3, axis=-1), None, digits_cfg, classifier)
    with pytest.raises(EvalError, match="at least 4"):
        digits_metrics(images[:3], None, digits_cfg, classifier)
    with pytest.raises(EvalError, match="one label per sample"):
        digits_metrics(images, np.zeros(5, int), digits_cfg, classifier)
    with pytest.raises(EvalError, match="data.source='digits'"):
        load_or_train_classifier(dataclasses.replace(digits_cfg, source="synthetic"))
