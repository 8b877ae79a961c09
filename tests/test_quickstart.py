"""The quickstart's promise: `make quickstart` learns real digits.

Trains configs/quickstart.py (and its mixture-of-experts version, `:moe`) as `make quickstart`
does (the CLI in a fresh process, on the machine's real devices, full length), samples 500
images, and checks them with a classifier trained here on the real digits: >= 90% must be
labelled as the class they were conditioned on, and they must not be copies of training images.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from dit_jax import config as config_lib
from dit_jax import data as data_lib

pytestmark = pytest.mark.slow


def dit_jax(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no fake devices, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "dit_jax", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def nearest_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    d2 = (queries**2).sum(1)[:, None] + (references**2).sum(1)[None] - 2 * queries @ references.T
    return np.sqrt(np.maximum(d2.min(axis=1), 0))


@pytest.mark.parametrize("arg", ["", ":moe"], ids=["dense", "moe"])
def test_quickstart_samples_are_recognisable_new_digits(arg, tmp_path, data_dir):
    """The dense quickstart, and its DiT-MoE version (configs/quickstart.py:moe), at full length."""
    workdir = str(tmp_path / "quickstart")
    dit_jax(
        "train",
        f"--config=configs/quickstart.py{arg}",
        f"--workdir={workdir}",
        f"--config.data.data_dir='{data_dir}'",
    )
    out = os.path.join(workdir, "samples.npz")
    dit_jax(
        "sample",
        f"--workdir={workdir}",
        "--num_samples=500",
        f"--output={out}",
        f"--grid={workdir}/samples.png",
    )
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (500, 8, 8, 1) and np.bincount(labels).tolist() == [50] * 10
    samples = images.reshape(500, 64).astype(np.float64) * 16 / 255  # back to the 0..16 digit scale

    # Classifier on scikit-learn's copy of the data (an independent path from our TFDS builder).
    digits = load_digits()
    classifier = SVC(gamma=0.001, C=10).fit(digits.data, digits.target)
    accuracy = (classifier.predict(samples) == labels).mean()
    print(f"class accuracy of samples: {accuracy:.3f}")
    assert accuracy >= 0.90

    # Novelty: samples sit no closer to the training set than held-out real digits do.
    cfg = config_lib.Data(source="digits", image_size=8, channels=1, num_classes=10, data_dir=data_dir)
    train_x, _ = data_lib.load_split_arrays(cfg, "train")
    test_x, _ = data_lib.load_split_arrays(cfg, "test")
    to_scale = lambda x: (x.reshape(len(x), 64).astype(np.float64) + 1) * 8  # [-1, 1] -> 0..16
    d_samples = nearest_distances(samples, to_scale(train_x))
    d_heldout = nearest_distances(to_scale(test_x), to_scale(train_x))
    print(
        f"median distance to nearest training image: samples {np.median(d_samples):.2f}, "
        f"held-out {np.median(d_heldout):.2f}"
    )
    assert np.mean(d_samples < 1.0) < 0.01  # (near-)copies: < 1 grey level over all 64 pixels
    assert np.median(d_samples) > 0.5 * np.median(d_heldout)
