"""Data package: TFDS builders, synthetic source, Grain pipeline (determinism, resume, sharding)."""

import collections
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dit_jax import config, data
from dit_jax.data import digits, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """One prepared digits data set shared by the tests of this module."""
    path = str(tmp_path_factory.mktemp("tfds"))
    data.num_examples(_digits(path), "train")
    return path


def _digits(data_dir, **overrides):
    fields = dict(source="digits", data_dir=data_dir, image_size=8, channels=1, num_classes=10)
    return config.Data(**{**fields, **overrides})


def _synthetic(**overrides):
    fields = dict(source="synthetic", image_size=8, channels=3, num_classes=10)
    return config.Data(**{**fields, **overrides})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["x"], y["x"])
        np.testing.assert_array_equal(x["y"], y["y"])


def _keys(images, labels):
    return collections.Counter((int(y), x.tobytes()) for x, y in zip(images, labels, strict=True))


# --- digits -------------------------------------------------------------------------------------


def test_digits_splits_hold_all_images_with_exact_pixels(digits_dir):
    from sklearn.datasets import load_digits

    cfg = _digits(digits_dir)
    assert data.num_examples(cfg, "train") == 1_597
    assert data.num_examples(cfg, "test") == 200
    train_x, train_y = data.load_split_arrays(cfg, "train")
    test_x, test_y = data.load_split_arrays(cfg, "test")
    assert train_x.shape == (1_597, 8, 8, 1) and train_x.dtype == np.float32
    assert train_y.dtype == np.int32 and test_x.shape == (200, 8, 8, 1)
    assert train_x.min() == -1.0 and train_x.max() == 1.0
    assert np.bincount(test_y).tolist() == [20] * 10
    assert set(train_y.tolist()) == set(range(10))
    # Every scikit-learn image is stored exactly once, as round(v * 255 / 16), in one of the splits.
    sk = load_digits()
    expected = digits.sklearn_to_uint8(sk.images).astype(np.float32) * (2.0 / 255.0) - 1.0
    ours = _keys(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y]))
    assert ours == _keys(expected, sk.target)
    test_idx = digits.split_indices(sk.target, "test")
    assert _keys(test_x, test_y) == _keys(expected[test_idx], sk.target[test_idx])


def test_digits_prepared_twice_is_a_no_op(digits_dir):
    before = sorted(os.listdir(os.path.join(digits_dir, "dit_digits", "1.0.0")))
    assert data.num_examples(_digits(digits_dir), "test") == 200
    assert sorted(os.listdir(os.path.join(digits_dir, "dit_digits", "1.0.0"))) == before


def test_digits_rejects_mismatched_config(digits_dir):
    with pytest.raises(data.DataError, match=r"data.channels=3 but the digits data set has 1 channel"):
        data.make_source(_digits(digits_dir, channels=3))
    with pytest.raises(data.DataError, match=r"data.num_classes=1000 .* 10 classes"):
        data.make_source(_digits(digits_dir, num_classes=1000))
    with pytest.raises(data.DataError, match=r"split 'validation' does not exist"):
        data.make_source(_digits(digits_dir), "validation")
    assert len(data.make_source(_digits(digits_dir, num_classes=0))) == 1_597  # unconditional


def test_corrupt_prepared_files_raise_data_error(tmp_path):
    cfg = _digits(str(tmp_path))
    data.num_examples(cfg, "test")
    folder = tmp_path / "dit_digits" / "1.0.0"
    next(folder.glob("*test.array_record*")).write_bytes(b"not an array record")
    with pytest.raises(data.DataError, match=r"missing or corrupt .* delete that folder"):
        data.make_source(cfg, "test")


# --- image folder ---------------------------------------------------------------------------------


def _write_folder(root, sizes=((30, 20), (16, 16), (20, 40))):
    """Two classes of solid-colour images whose centre differs from their border."""
    for label, name in enumerate(["b_squares", "a_circles"]):
        os.makedirs(root / name)
        for i, (width, height) in enumerate(sizes):
            pixels = np.zeros((height, width, 3), np.uint8)
            side = min(width, height)
            top, left = (height - side) // 2, (width - side) // 2
            pixels[top : top + side, left : left + side] = (255, 0, 0) if label else (0, 0, 255)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_builder_crops_resizes_and_labels(tmp_path):
    _write_folder(tmp_path / "images")
    cfg = config.Data(
        source="image_folder",
        path=str(tmp_path / "images"),
        data_dir=str(tmp_path / "tfds"),
        image_size=8,
        channels=3,
        num_classes=2,
    )
    images, labels = data.load_split_arrays(cfg)
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.float32
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # Sorted folder names: a_circles (red) -> 0, b_squares (blue) -> 1; the centre crop is all colour.
    colours = {0: [1.0, -1.0, -1.0], 1: [-1.0, -1.0, 1.0]}
    for image, label in zip(images, labels, strict=True):
        np.testing.assert_allclose(image, np.broadcast_to(colours[int(label)], image.shape), atol=1e-6)
    # Grayscale at another size is another config: it does not collide with the first one.
    grey = dataclasses.replace(cfg, channels=1, image_size=4)
    grey_images, _ = data.load_split_arrays(grey)
    assert grey_images.shape == (6, 4, 4, 1)
    assert len(os.listdir(tmp_path / "tfds" / "dit_image_folder")) == 2


def test_image_folder_bad_input_raises_data_error(tmp_path):
    def make(path, **overrides):
        fields = dict(source="image_folder", path=str(path), data_dir=str(tmp_path / "tfds"))
        fields.update(image_size=8, channels=3, num_classes=0)
        fields.update(overrides)
        return config.Data(**fields)

    with pytest.raises(data.DataError, match=r"does not exist; point data.path"):
        data.make_source(make(tmp_path / "missing"))
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"is a file, not a folder"):
        data.make_source(make(tmp_path / "file.png"))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "0.png")
    with pytest.raises(data.DataError, match=r"has no class sub-folders"):
        data.make_source(make(tmp_path / "flat"))
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(data.DataError, match=r"empty_class' holds no images"):
        data.make_source(make(tmp_path / "flat"))
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "empty_class" / "0.png")
    (tmp_path / "flat" / "empty_class" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(data.DataError, match=r"cannot read image .*broken.jpg.*fix or delete"):
        data.make_source(make(tmp_path / "flat"))
    with pytest.raises(data.DataError, match=r"data.channels=4 .* set data.channels to 1 or 3"):
        data.make_source(make(tmp_path / "flat", channels=4))


# --- synthetic ------------------------------------------------------------------------------------


def test_synthetic_source_is_deterministic_per_index():
    a, b = data.make_source(_synthetic()), data.make_source(_synthetic())
    assert len(a) == 10_000 and len(data.make_source(_synthetic(), "test")) == 1_000
    assert a.element_spec["x"].shape == (8, 8, 3) and a.element_spec["y"].dtype == np.int32
    for index in (0, 7, 9_999):
        np.testing.assert_array_equal(a[index]["x"], b[index]["x"])
        assert a[index]["y"] == index % 10 and a[index]["x"].dtype == np.float32
    assert not np.array_equal(a[0]["x"], a[10]["x"])  # same class, different element
    assert not np.array_equal(a[0]["x"], data.make_source(_synthetic(), "test")[0]["x"])
    xs = np.stack([a[i]["x"] for i in range(50)])
    assert xs.min() >= -1.0 and xs.max() <= 1.0


# --- pipeline -------------------------------------------------------------------------------------


def test_iterator_shapes_dtypes_and_determinism():
    cfg = _synthetic()
    first = _take(data.make_iterator(cfg, global_batch_size=16, seed=3, process_index=0, process_count=1), 3)
    again = _take(data.make_iterator(cfg, global_batch_size=16, seed=3, process_index=0, process_count=1), 3)
    other = _take(data.make_iterator(cfg, global_batch_size=16, seed=4, process_index=0, process_count=1), 1)
    _assert_same_batches(first, again)
    assert not np.array_equal(first[0]["x"], other[0]["x"])
    batch = first[0]
    assert batch["x"].shape == (16, 8, 8, 3) and batch["x"].dtype == np.float32
    assert batch["y"].shape == (16,) and batch["y"].dtype == np.int32
    assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0


def test_iterator_resumes_from_state(digits_dir):
    cfg = _digits(digits_dir, hflip=True)
    iterator = data.make_iterator(cfg, global_batch_size=32, seed=0, process_index=1, process_count=2)
    _take(iterator, 5)
    state = json.loads(json.dumps(iterator.get_state()))  # survives a JSON round trip
    expected = _take(iterator, 5)
    resumed = data.make_iterator(cfg, global_batch_size=32, seed=0, process_index=1, process_count=2)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 5), expected)


def test_processes_read_disjoint_shards_that_cover_each_epoch(digits_dir):
    cfg = _digits(digits_dir)
    whole = data.make_iterator(
        cfg, global_batch_size=40, seed=1, split="test", process_index=0, process_count=1
    )
    shards = [
        data.make_iterator(cfg, global_batch_size=40, seed=1, split="test", process_index=p, process_count=2)
        for p in range(2)
    ]
    epoch = []
    for _ in range(5):  # 200 test images / 40 per global batch
        global_batch, parts = next(whole), [next(s) for s in shards]
        assert parts[0]["x"].shape == (20, 8, 8, 1)
        np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), global_batch["x"])
        np.testing.assert_array_equal(np.concatenate([p["y"] for p in parts]), global_batch["y"])
        epoch.append(global_batch)
    images, labels = data.load_split_arrays(cfg, "test")
    seen_x = np.concatenate([b["x"] for b in epoch])
    seen_y = np.concatenate([b["y"] for b in epoch])
    assert _keys(seen_x, seen_y) == _keys(images, labels)
    # The next epoch visits the same images in another order.
    next_epoch = np.concatenate([next(whole)["x"] for _ in range(5)])
    assert collections.Counter(x.tobytes() for x in next_epoch) == collections.Counter(
        x.tobytes() for x in seen_x
    )
    assert not np.array_equal(next_epoch, seen_x)


def test_iterator_resizes_and_flips(digits_dir):
    plain = _digits(digits_dir, image_size=16)
    batch = next(data.make_iterator(plain, global_batch_size=64, seed=0, process_index=0, process_count=1))
    assert batch["x"].shape == (64, 16, 16, 1)
    assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0
    # A constant image stays constant through the bilinear resize.
    np.testing.assert_allclose(sources.resize_bilinear(np.full((8, 8, 2), 0.25, np.float32), 13), 0.25)
    flipped = _digits(digits_dir, image_size=16, hflip=True)
    flips = next(data.make_iterator(flipped, global_batch_size=64, seed=0, process_index=0, process_count=1))
    mirrored = [not np.array_equal(a, b) for a, b in zip(batch["x"], flips["x"], strict=True)]
    for a, b, is_mirrored in zip(batch["x"], flips["x"], mirrored, strict=True):
        np.testing.assert_array_equal(b, a[:, ::-1] if is_mirrored else a)
    assert 10 < sum(mirrored) < 54
    np.testing.assert_array_equal(batch["y"], flips["y"])


def test_batch_must_divide_over_processes():
    with pytest.raises(data.DataError, match=r"batch_size=10 is not divisible by the 4 processes"):
        data.make_iterator(_synthetic(), global_batch_size=10, seed=0, process_index=0, process_count=4)
    with pytest.raises(data.DataError, match=r"process_index=2 is not in"):
        data.make_iterator(_synthetic(), global_batch_size=8, seed=0, process_index=2, process_count=2)


def test_default_process_layout_comes_from_jax():
    batch = next(data.make_iterator(_synthetic(), global_batch_size=4, seed=0))
    assert batch["x"].shape[0] == 4


def test_worker_processes_give_the_same_batches_and_resume(digits_dir):
    serial = data.make_iterator(
        _digits(digits_dir), global_batch_size=8, seed=5, process_index=0, process_count=1
    )
    workers = _digits(digits_dir, num_workers=1)
    parallel = data.make_iterator(workers, global_batch_size=8, seed=5, process_index=0, process_count=1)
    expected = _take(serial, 6)
    _assert_same_batches(_take(parallel, 3), expected[:3])
    state = json.loads(json.dumps(parallel.get_state()))
    resumed = data.make_iterator(workers, global_batch_size=8, seed=5, process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 3), expected[3:])
    for iterator in (parallel, resumed):
        iterator.close()


def test_import_has_no_side_effects(tmp_path):
    code = (
        "import sys, dit_jax.data; "
        "assert 'tensorflow' not in sys.modules; "
        "import jax; assert not jax.config.jax_enable_x64"
    )
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    assert not (tmp_path / ".cache").exists()
