"""TFDS builder for scikit-learn's handwritten digits (8x8 grey images, 10 classes), in ArrayRecord.

The 1,797 images ship inside scikit-learn (`sklearn.datasets.load_digits`), so preparation needs no
network and takes well under a second. Pixels are stored as uint8: round(value * 255 / 16), shape
[8, 8, 1].

Splits (fixed, stratified by index): for each class, the last `TEST_PER_CLASS` = 20 images of that
class in scikit-learn's order go to "test" (200 images); the other 1,597 go to "train".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
IMAGE_SIZE = 8
TEST_PER_CLASS = 20
SPLIT_SIZES = {"train": 1_597, "test": 200}


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices into `load_digits()` of one split: the last TEST_PER_CLASS per class are "test"."""
    labels = np.asarray(labels)
    is_test = np.zeros(len(labels), dtype=bool)
    for label in range(NUM_CLASSES):
        (members,) = np.nonzero(labels == label)
        is_test[members[-TEST_PER_CLASS:]] = True
    if split == "test":
        return np.nonzero(is_test)[0]
    if split == "train":
        return np.nonzero(~is_test)[0]
    raise ValueError(f"unknown digits split {split!r}; expected 'train' or 'test'")


def sklearn_to_uint8(images: np.ndarray) -> np.ndarray:
    """scikit-learn's 0..16 float pixels -> uint8 0..255 with a trailing channel axis (the stored
    pixels; dit_jax.data.pixels converts them to and from the model's [-1, 1])."""
    scaled = np.round(np.asarray(images, dtype=np.float64) * 255.0 / 16.0)
    return np.clip(scaled, 0, 255).astype(np.uint8)[..., None]


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn handwritten digits as a TFDS data set (ArrayRecord, readable without TensorFlow)."""

    name = "dit_digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "uint8 8x8x1 images, stratified 1,597 / 200 train / test split."}
    # No checksums / metadata files beside the code; also avoids TFDS needing `importlib_resources`.
    code_path = None

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn handwritten digits (UCI optdigits test set), 8x8, 10 classes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        from sklearn.datasets import load_digits  # heavy import, only needed while preparing

        digits = load_digits()
        images, labels = sklearn_to_uint8(digits.images), digits.target.astype(np.int64)
        return {
            split: self._generate_examples(images, labels, split_indices(labels, split))
            for split in SPLIT_SIZES
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: Sequence[int]
    ) -> Iterator[tuple[int, dict]]:
        for index in indices:
            yield int(index), {"image": images[index], "label": int(labels[index])}
