"""Small-data metrics that need no downloaded weights: a digits classifier trained here, and what it measures.

    classifier = load_or_train_classifier(cfg.data)          # trains once (seconds), then cached
    metrics = digits_metrics(images_uint8, labels, cfg.data, classifier)

Metrics (all floats):
- `class_accuracy`: fraction of samples the classifier assigns to their conditioning label (only when
  labels are given).
- `fd_classifier`: Fréchet distance between sample features and test-split features, in the
  classifier's penultimate (FEATURE_DIM-d) feature space. Lower is better; it is biased upwards for
  small sets, so compare runs at the same number of samples.
- `precision`, `recall`: improved precision/recall (k = 3) in the same feature space against the
  train split (1,597 images).
- `memorisation`: median over samples of the distance to the nearest training image, divided by the
  same median over the held-out test images. Distances are RMS pixel differences with pixels in
  [0, 1]. About 1: samples are as far from the training set as unseen real digits; well below 1:
  samples crowd onto training images (copying); above 1: samples are off the data manifold.
- `copy_fraction`: fraction of samples whose nearest training image is closer than COPY_DISTANCE
  (0.02 RMS, under half the smallest test-to-train distance, 0.042, in this data set).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dit_jax import config, data
from dit_jax.data import pixels
from dit_jax.eval.fid import fid_from_features
from dit_jax.eval.precision_recall import precision_recall
from dit_jax.eval.samples_io import EvalError, check_enough_samples
from dit_jax.models.digits_classifier import FEATURE_DIM, ClassifierNet

CLASSIFIER_VERSION = "digits-cnn-v1"  # bump when the architecture or the training recipe changes
COPY_DISTANCE = 0.02
TRAIN_STEPS = 800
BATCH_SIZE = 128
_APPLY_CHUNK = 512


to_model_space = pixels.from_uint8  # the former name (tests/test_eval_cli.py); use pixels.from_uint8


def _check_digits(data_cfg: config.Data) -> None:
    if data_cfg.source != "digits":
        raise EvalError(
            f"the proxy classifier metrics are for data.source='digits', not {data_cfg.source!r}; "
            "use Inception metrics (FID, precision/recall) with a reference batch instead"
        )


def _shift_augment(key: jax.Array, x_BHWC: jax.Array) -> jax.Array:
    """Shifts each image by up to one pixel in each direction, filling with the background (-1)."""
    size = x_BHWC.shape[1]
    padded = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (x_BHWC.shape[0], 2), 0, 3)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (size, size, img.shape[-1]))
    return jax.vmap(crop)(padded, offsets)


def _new_model(data_cfg: config.Data, seed: int = 0) -> ClassifierNet:
    num_classes = data_cfg.num_classes or 10
    return ClassifierNet(data_cfg.image_size, data_cfg.channels, num_classes, rngs=nnx.Rngs(seed))


def train_digits_classifier(data_cfg: config.Data, seed: int = 0) -> dict[str, np.ndarray]:
    """Trains the classifier on the train split (deterministic given `seed`); flat params {path: array}.

    AdamW with warm-up + cosine decay, TRAIN_STEPS steps of BATCH_SIZE, random one-pixel shifts; the
    whole run is one jitted `lax.scan` (a few seconds on a CPU).
    """
    _check_digits(data_cfg)
    images, labels = data.load_split_arrays(data_cfg, "train")
    graphdef, params = nnx.split(_new_model(data_cfg, seed), nnx.Param)
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, TRAIN_STEPS), weight_decay=1e-4)

    def loss_fn(params, x_BHWC, y_B):
        logits = nnx.merge(graphdef, params)(x_BHWC)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_B).mean()

    @jax.jit
    def train(params, key, images_NHWC, labels_N):
        def step(carry, index):
            params, opt_state = carry
            batch_key, shift_key = jax.random.split(jax.random.fold_in(key, index))
            batch = jax.random.choice(batch_key, len(labels_N), (BATCH_SIZE,), replace=False)
            x_BHWC = _shift_augment(shift_key, images_NHWC[batch])
            grads = jax.grad(loss_fn)(params, x_BHWC, labels_N[batch])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(TRAIN_STEPS))
        return params

    params = train(params, jax.random.key(seed), jnp.asarray(images), jnp.asarray(labels))
    return {path: np.asarray(value) for path, value in _flatten(nnx.to_pure_dict(params)).items()}


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value)
    return tree


class DigitsClassifier:
    """The trained classifier: `logits(images)` [N, K] and `features(images)` [N, FEATURE_DIM].

    Images are uint8 [N, H, W, C] in 0..255 or float [N, H, W, C] in [-1, 1] (model space).
    """

    def __init__(
        self, params: dict[str, np.ndarray], data_cfg: config.Data, test_accuracy: float = float("nan")
    ):
        _check_digits(data_cfg)
        self.data_cfg = data_cfg
        self.params = params
        self.test_accuracy = test_accuracy
        abstract = nnx.eval_shape(lambda: _new_model(data_cfg))
        graphdef, state = nnx.split(abstract, nnx.Param)
        expected = {path: tuple(leaf.shape) for path, leaf in _flatten(nnx.to_pure_dict(state)).items()}
        given = {path: tuple(np.shape(value)) for path, value in params.items()}
        if given != expected:
            raise ValueError(f"classifier parameters do not fit the network: {given} vs {expected}")
        nnx.replace_by_pure_dict(state, _unflatten(params))
        self._state = state
        self._apply = jax.jit(lambda state, x: _logits_and_features(nnx.merge(graphdef, state), x))
        self._reference: dict | None = None  # train/test arrays and features, built on first use

    def spatial_encoder(self) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
        """(apply, params): apply(params, images [B, H, W, C] in [-1, 1]) is the second
        convolution's activations [B, ceil(H/2), ceil(W/2), 2 * CLASSIFIER_WIDTH], the
        classifier's patch-level features (REPA's target in the digits recipes)."""
        graphdef, state = nnx.split(nnx.eval_shape(lambda: _new_model(self.data_cfg)), nnx.Param)
        nnx.replace_by_pure_dict(state, _unflatten(self.params))

        def apply(params: Any, x_BHWC: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, params)
            return nnx.gelu(model.conv2(nnx.gelu(model.conv1(x_BHWC.astype(jnp.float32)))))

        return apply, state

    def logits_and_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits [N, K] and penultimate features [N, FEATURE_DIM], in jitted chunks."""
        x = pixels.as_model_space(np.asarray(images))
        expected = (self.data_cfg.image_size, self.data_cfg.image_size, self.data_cfg.channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise EvalError(
                f"the digits classifier takes images of shape [N, {', '.join(map(str, expected))}], "
                f"got {x.shape}"
            )
        logits, features = [], []
        for start in range(0, len(x), _APPLY_CHUNK):  # fixed chunk shape: compiles once
            chunk = x[start : start + _APPLY_CHUNK]
            padded = np.concatenate([chunk, np.zeros((_APPLY_CHUNK - len(chunk), *expected), np.float32)])
            out_logits, out_features = self._apply(self._state, padded)
            logits.append(np.asarray(out_logits)[: len(chunk)])
            features.append(np.asarray(out_features)[: len(chunk)])
        if not logits:
            return np.zeros((0, self.num_classes), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
        return np.concatenate(logits), np.concatenate(features)

    @property
    def num_classes(self) -> int:
        return self.data_cfg.num_classes or 10

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.logits_and_features(images)[0]

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.logits_and_features(images)[1]

    def reference(self) -> dict[str, np.ndarray]:
        """Train/test images (model space), labels and features, loaded once per classifier."""
        if self._reference is None:
            ref = {}
            for split in ("train", "test"):
                images, labels = data.load_split_arrays(self.data_cfg, split)
                ref[f"{split}_images"], ref[f"{split}_labels"] = images, labels
                ref[f"{split}_features"] = self.features(images)
            ref["test_nn_distance"] = nearest_distances(ref["test_images"], ref["train_images"])
            self._reference = ref
        return self._reference


def _logits_and_features(model: ClassifierNet, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = model.features(x_BHWC)
    return model.head(features), features


def accuracy(classifier: DigitsClassifier, split: str = "test") -> float:
    """Top-1 accuracy of the classifier on a split of its data set."""
    images, labels = data.load_split_arrays(classifier.data_cfg, split)
    return float((classifier.logits(images).argmax(axis=1) == labels).mean())


def default_cache_dir(data_cfg: config.Data) -> str:
    """Where the classifier is cached by default: <data dir>/classifiers."""
    return os.path.join(data.data_dir(data_cfg), "classifiers")


def _cache_path(data_cfg: config.Data, cache_dir: str) -> str:
    size, channels = data_cfg.image_size, data_cfg.channels
    return os.path.join(cache_dir, f"digits_classifier_{size}x{size}x{channels}.npz")


def _read_cache(path: str, data_cfg: config.Data) -> DigitsClassifier | None:
    """The cached classifier, or None when missing, unreadable or from another version."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored["__meta__"]))
            params = {k: stored[k] for k in stored.files if k != "__meta__"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if meta.get("version") != CLASSIFIER_VERSION:
        return None
    try:
        return DigitsClassifier(params, data_cfg, meta.get("test_accuracy", float("nan")))
    except (ValueError, KeyError, TypeError):
        return None


def load_or_train_classifier(data_cfg: config.Data, cache_dir: str | None = None) -> DigitsClassifier:
    """The classifier cached in `cache_dir` (default: <data dir>/classifiers); trained and saved if absent."""
    _check_digits(data_cfg)
    cache_dir = os.path.expanduser(cache_dir or default_cache_dir(data_cfg))
    path = _cache_path(data_cfg, cache_dir)
    cached = _read_cache(path, data_cfg)
    if cached is not None:
        return cached
    classifier = DigitsClassifier(train_digits_classifier(data_cfg), data_cfg)
    classifier.test_accuracy = accuracy(classifier, "test")
    meta = {"version": CLASSIFIER_VERSION, "test_accuracy": classifier.test_accuracy, "seed": 0}
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as f:
            np.savez(f, __meta__=np.asarray(json.dumps(meta)), **classifier.params)
        os.replace(f.name, path)  # atomic: concurrent readers see the old file or the new one
    except OSError as err:
        raise EvalError(
            f"cannot write the classifier cache {path!r} ({err}); pass a writable cache_dir"
        ) from err
    return classifier


def nearest_distances(images: np.ndarray, pool: np.ndarray, block: int = 4096) -> np.ndarray:
    """RMS pixel distance [N] (pixels in [0, 1]) from each image to its nearest image in `pool`.

    Both arguments are float images in [-1, 1] of the same shape; computed in float64, in row blocks.
    """
    a = images.reshape(len(images), -1).astype(np.float64) / 2  # [-1, 1] -> unit range differences
    b = pool.reshape(len(pool), -1).astype(np.float64) / 2
    norms_b = np.sum(b * b, axis=1)
    nearest = np.empty(len(a))
    for start in range(0, len(a), block):
        rows = a[start : start + block]
        squared = np.sum(rows * rows, axis=1)[:, None] - 2 * rows @ b.T + norms_b[None, :]
        nearest[start : start + block] = np.maximum(squared.min(axis=1), 0.0)
    return np.sqrt(nearest / a.shape[1])


def digits_metrics(
    samples_uint8: np.ndarray, labels: np.ndarray | None, data_cfg: config.Data, classifier: DigitsClassifier
) -> dict[str, float]:
    """class_accuracy (with labels), fd_classifier, precision, recall, memorisation, copy_fraction.

    `samples_uint8`: uint8 [N, H, W, C] in 0..255 (ADM convention); `labels`: int [N] or None.
    Definitions in the module docstring. Needs N >= 4 (precision/recall use k = 3 neighbours).
    """
    _check_digits(data_cfg)
    samples = np.asarray(samples_uint8)
    expected = (data_cfg.image_size, data_cfg.image_size, data_cfg.channels)
    if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[1:] != expected:
        raise EvalError(
            f"samples must be uint8 [N, {', '.join(map(str, expected))}] in 0..255, got {samples.dtype} "
            f"{samples.shape}"
        )
    check_enough_samples(len(samples), ("fid", "prec_recall"))
    ref = classifier.reference()
    x = pixels.from_uint8(samples)
    logits, features = classifier.logits_and_features(x)
    metrics: dict[str, float] = {"num_samples": float(len(samples))}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(samples),):
            raise EvalError(
                f"labels have shape {labels.shape}; expected one label per sample ({len(samples)},)"
            )
        metrics["class_accuracy"] = float((logits.argmax(axis=1) == labels).mean())
    metrics["fd_classifier"] = fid_from_features(features, ref["test_features"])
    metrics["precision"], metrics["recall"] = precision_recall(ref["train_features"], features)
    sample_nn = nearest_distances(x, ref["train_images"])
    metrics["memorisation"] = float(np.median(sample_nn) / np.median(ref["test_nn_distance"]))
    metrics["copy_fraction"] = float((sample_nn < COPY_DISTANCE).mean())
    return metrics
