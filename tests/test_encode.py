"""`dit-jax encode` (VAE latents data sets) and training / sampling on latents, with a tiny random VAE."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tensorflow_datasets as tfds  # noqa: E402

from dit_jax import config, data, sampling  # noqa: E402
from dit_jax import workdir as workdir_lib  # noqa: E402
from dit_jax.cli import main  # noqa: E402
from dit_jax.data import encode, latents  # noqa: E402
from dit_jax.parallel import mesh as mesh_lib  # noqa: E402

IMAGE_SIZE = 32  # 4-level VAE: 4x4x4 latents
NUM_EXAMPLES = 40
SHARD_SIZE = 16  # shards of 16, 16, 8
KEYS = ("mean", "std", "mean_flipped", "std_flipped")


@pytest.fixture(scope="module")
def vae_dir(tiny_vae_dir) -> str:
    return tiny_vae_dir


def _options(vae_dir, data_dir, output, **overrides) -> encode.EncodeOptions:
    fields = dict(
        data="digits",
        vae=vae_dir,
        output=str(output),
        image_size=IMAGE_SIZE,
        hflip=True,
        batch_size=2,  # per device: 16 per step on the 8 devices
        data_dir=data_dir,
        shard_size=SHARD_SIZE,
        limit=NUM_EXAMPLES,
        num_workers=2,
        store_images=True,
    )
    return encode.EncodeOptions(**{**fields, **overrides})


@pytest.fixture(scope="module")
def encoded(vae_dir, data_dir, tmp_path_factory) -> str:
    """Digits (first 40 training images, 32 px) with flipped latents and the images, encoded over
    the 8 devices."""
    output = tmp_path_factory.mktemp("latents") / "digits32"
    info, written = encode.encode(_options(vae_dir, data_dir, output), progress=False)
    assert written == 3 and info.num_shards == 3
    return str(output)


def _records(directory: str) -> list[dict]:
    source = tfds.builder_from_directory(directory).as_data_source("train")
    return [source[i] for i in range(len(source))]


def _files(directory: str) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def _latents_cfg(path: str, **overrides) -> config.Data:
    fields = dict(source="latents", path=path, image_size=4, channels=4, num_classes=10)
    return config.Data(**{**fields, **overrides})


def test_latents_match_a_direct_per_image_encode(encoded, vae_dir, data_dir):
    from dit_jax.interop import load_diffusers_vae

    info = latents.load_info(encoded)
    assert info.latent_shape == (4, 4, 4) and info.image_size == IMAGE_SIZE and info.num_classes == 10
    assert info.vae == vae_dir and info.scaling_factor == pytest.approx(0.18215) and info.hflip
    assert info.store_images and info.image_shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    builder = tfds.builder_from_directory(encoded)
    assert builder.info.splits["train"].shard_lengths == [16, 16, 8]
    assert builder.info.metadata["latent_shape"] == [4, 4, 4]
    records = _records(encoded)

    images, labels = data.load_split_arrays(
        config.Data(source="digits", data_dir=data_dir, image_size=IMAGE_SIZE, channels=1, num_classes=10)
    )
    x = jnp.asarray(np.repeat(images[:NUM_EXAMPLES], 3, axis=-1))
    vae = load_diffusers_vae(vae_dir)
    one = jax.jit(lambda x: tuple(vae.encode(x[None])))
    for i, record in enumerate(records):
        mean, std = one(x[i])
        mean_f, std_f = one(x[i, :, ::-1])
        want = dict(mean=mean[0], std=std[0], mean_flipped=mean_f[0], std_flipped=std_f[0])
        for key in KEYS:
            assert record[key].dtype == np.float32 and record[key].shape == (4, 4, 4)
            np.testing.assert_allclose(record[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        assert record["label"] == labels[i]
    assert not np.allclose(records[0]["mean"], records[0]["mean_flipped"])
    # The stored images are the digits pixels at 32 px (grey repeated to the VAE's 3 channels), as uint8.
    stored = np.stack([r["image"] for r in records])
    assert stored.dtype == np.uint8 and stored.shape == (NUM_EXAMPLES, IMAGE_SIZE, IMAGE_SIZE, 3)
    want = np.clip(np.round((images[:NUM_EXAMPLES] + 1) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(stored, np.repeat(want, 3, axis=-1))
    assert np.abs(stored / 127.5 - 1 - np.asarray(x)).max() <= 0.5 / 127.5 + 1e-6


def test_one_device_gives_the_same_latents(encoded, vae_dir, data_dir, tmp_path):
    """Bitwise, as the per-device batch is the same; also without --hflip and --store_images (plain
    latents do not depend on them)."""
    output = tmp_path / "one_device"
    options = _options(vae_dir, data_dir, output, hflip=False, store_images=False)
    encode.encode(options, devices=jax.local_devices()[:1], progress=False)
    for mine, ref in zip(_records(str(output)), _records(encoded), strict=True):
        assert set(mine) == {"mean", "std", "label"}
        np.testing.assert_array_equal(mine["mean"], ref["mean"])
        np.testing.assert_array_equal(mine["std"], ref["std"])
        assert mine["label"] == ref["label"]
    # A flip-less data set cannot serve data.hflip=True.
    with pytest.raises(data.DataError, match=r"data.hflip=True .* no flipped latents"):
        data.make_source(_latents_cfg(str(output), hflip=True))
    # Nor images, where it stores none; pixel sources have no separate image.
    with pytest.raises(data.DataError, match=r"data.with_images=True .* stores no images.*--store_images"):
        data.make_iterator(_latents_cfg(str(output)), global_batch_size=8, seed=0, with_images=True)
    digits = config.Data(source="digits", data_dir=data_dir, image_size=8, channels=1, num_classes=10)
    with pytest.raises(data.DataError, match=r"data.with_images=True is for data.source='latents'"):
        data.make_iterator(digits, global_batch_size=8, seed=0, with_images=True)


def test_resume_after_interruption_gives_the_identical_data_set(encoded, vae_dir, data_dir, tmp_path):
    complete = _files(encoded)
    copy = tmp_path / "copy"
    shutil.copytree(encoded, copy)
    shards = latents.shard_paths(str(copy), latents.load_info(str(copy)))
    # Nothing to do on a complete data set.
    assert encode.encode(_options(vae_dir, data_dir, copy), progress=False)[1] == 0
    assert _files(str(copy)) == complete
    # Interrupted: one shard lost, one half-written (corrupt), a temp file left, no completion marker.
    os.remove(shards[0])
    with open(shards[1], "r+b") as f:
        f.truncate(os.path.getsize(shards[1]) // 2)
    with open(shards[0] + ".tmp-deadbeef", "wb") as f:
        f.write(b"partial")
    os.remove(copy / latents.COMPLETE_FILE)
    with pytest.raises(data.DataError, match="unfinished latents data set"):
        data.make_source(_latents_cfg(str(copy)))
    assert encode.encode(_options(vae_dir, data_dir, copy), progress=False)[1] == 2
    assert _files(str(copy)) == complete


def test_float16_storage_halves_the_bytes_within_rounding(encoded, vae_dir, data_dir, tmp_path):
    output = tmp_path / "half"
    encode.encode(_options(vae_dir, data_dir, output, dtype="float16", limit=16), progress=False)
    for mine, ref in zip(_records(str(output)), _records(encoded)[:16], strict=True):
        for key in KEYS:
            assert mine[key].dtype == np.float16
            np.testing.assert_allclose(mine[key], ref[key], rtol=2**-11, atol=1e-7, err_msg=key)
    batch = next(
        data.make_iterator(
            _latents_cfg(str(output)), global_batch_size=8, seed=0, process_count=1, process_index=0
        )
    )
    assert batch["x"].dtype == np.float32 and batch["x"].shape == (8, 4, 4, 4)


def test_bad_input_is_one_line(capsys, encoded, vae_dir, data_dir, tmp_path):
    base = ["encode", f"--vae={vae_dir}", f"--data_dir={data_dir}", "--limit=8"]
    cases = [
        ([f"--vae={tmp_path / 'nope'}", "--data=digits"], "--vae="),
        (["--data=" + str(tmp_path / "no_images")], "is not a folder"),
        (["--data=digits", "--image_size=30"], "--image_size=30 is not divisible by 8"),
        (["--data=digits", "--image_size=16", "--limit=40", "--hflip"], "image_size: 32 there, 16 here"),
        # The same job as the fixture's but without --store_images: refused, not mixed.
        (
            ["--data=digits", "--image_size=32", "--limit=40", "--hflip", "--shard_size=16"],
            "(store_images: True there, False here); choose another --output",
        ),
    ]
    for extra, message in cases:
        output = encoded if "there" in message else str(tmp_path / "out")
        code = main([*base, *extra, f"--output={output}"])
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "WARNING" not in line]
        assert code == 2 and len(err) == 1, (extra, err)
        assert err[0].startswith("dit-jax encode: error:") and message in err[0], err
        assert "there" not in message or "holds a different latents data set" in err[0]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("x")
    assert main([*base, "--data=digits", f"--output={tmp_path / 'full'}"]) == 2
    assert "already holds other files" in capsys.readouterr().err


def test_image_folder_through_the_cli(capsys, vae_dir, tmp_path):
    from dit_jax.data import image_folder

    rng = np.random.default_rng(0)
    files = []
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            files.append(str(tmp_path / "images" / name / f"{i}.png"))
            Image.fromarray(pixels).save(files[-1])
    output = tmp_path / "out"
    args = ["encode", f"--data={tmp_path / 'images'}", f"--vae={vae_dir}", f"--output={output}"]
    # Same shapes as the `encoded` fixture: its compilation is reused.
    assert main([*args, f"--image_size={IMAGE_SIZE}", "--hflip", "--batch_size=2", "--store_images"]) == 0
    assert "6 examples, latents 4x4x4 (float32, with flipped, with images)" in capsys.readouterr().out
    info = latents.load_info(str(output))
    assert info.class_names == ("cat", "dog") and info.latent_shape == (4, 4, 4) and info.hflip
    records = _records(str(output))
    assert [int(r["label"]) for r in records] == [0, 0, 0, 1, 1, 1]
    # Exactly the pixels the image-folder source reads at that size (center crop + bicubic resize).
    for record, file in zip(records, files, strict=True):
        np.testing.assert_array_equal(record["image"], image_folder.load_image(file, IMAGE_SIZE, 3))


def test_latent_pipeline_draws_deterministic_samples_and_resumes(encoded):
    from dit_jax.data import pipeline

    cfg = _latents_cfg(encoded)
    records = _records(encoded)
    labels = np.array([r["label"] for r in records])
    assert latents.load_info(encoded).shift_factor == 0.0
    with pytest.raises(
        data.DataError, match=r"data.image_size=32 .* set data.image_size and model.image_size to 4"
    ):
        data.make_source(dataclasses.replace(cfg, image_size=32))
    with pytest.raises(data.DataError, match=r"data.channels=3 .* 4 latent channels"):
        data.make_source(dataclasses.replace(cfg, channels=3))
    with pytest.raises(data.DataError, match=r"data.num_classes=5 .* 10 classes"):
        data.make_source(dataclasses.replace(cfg, num_classes=5))

    layout = dict(global_batch_size=8, seed=3, process_index=0, process_count=1)
    it = data.make_iterator(cfg, **layout, with_images=True)
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    after = [next(it) for _ in range(6)]  # 72 draws: beyond the first epoch of 40
    resumed = data.make_iterator(cfg, **layout, with_images=True)
    resumed.set_state(state)
    for a, b in zip(after, [next(resumed) for _ in range(6)], strict=True):
        assert set(a) == set(b) == {"x", "y", "image"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Asking for the images changes no draw.
    plain = data.make_iterator(cfg, **layout)
    for a in batches + after:
        b = next(plain)
        assert set(b) == {"x", "y"}
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])
    x = np.concatenate([b["x"] for b in batches + after])
    assert x.dtype == np.float32 and x.shape == (72, 4, 4, 4)
    # Every draw is a posterior sample (scaled) of a stored plain or flipped latent: its nearest one.
    scale = latents.load_info(encoded).scaling_factor
    means = {k: np.stack([r[k] for r in records]) * scale for k in ("mean", "mean_flipped")}
    stds = np.stack([r["std"] for r in records] + [r["std_flipped"] for r in records]) * scale
    both = np.concatenate([means["mean"], means["mean_flipped"]])
    nearest = np.argmin(((x[:, None] - both[None]) ** 2).sum(axis=(2, 3, 4)), axis=1)
    z = (x - both[nearest]) / stds[nearest]
    assert 0.7 < z.std() < 1.3
    assert 10 < (nearest >= NUM_EXAMPLES).sum() < 62  # both plain and flipped are drawn
    # Two epochs draw different noise for the same example.
    assert len({x[i].tobytes() for i in range(72)}) == 72
    # Each image is its example's stored image, mirrored exactly where the flipped latent was drawn.
    # Replay the draws: stream position j (one process) -> Philox(latent seed, j): flip bit, then eps.
    image = np.concatenate([b["image"] for b in batches + after])
    assert image.dtype == np.uint8 and image.shape == (72, IMAGE_SIZE, IMAGE_SIZE, 3)
    stored = np.stack([r["image"] for r in records])
    hits = (image[:, None] == stored[None]).all(axis=(2, 3, 4))
    hits |= (image[:, None] == stored[None, :, :, ::-1]).all(axis=(2, 3, 4))
    assert (hits.sum(axis=1) == 1).all()  # each image is one example's (maybe mirrored)
    index = np.argmax(hits, axis=1)
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches + after]), labels[index])
    seed, mirrored = pipeline._derived_seed(3, pipeline._LATENT_STREAM), 0
    for j, record in enumerate(records[i] for i in index):
        rng = np.random.Generator(np.random.Philox(key=[seed, j]))
        flipped = bool(rng.integers(2))
        suffix = "_flipped" if flipped else ""
        eps = rng.standard_normal((4, 4, 4), dtype=np.float32)
        want = (record["mean" + suffix] + record["std" + suffix] * eps) * scale
        np.testing.assert_allclose(x[j], want, rtol=1e-5, atol=1e-6, err_msg=str(j))
        np.testing.assert_array_equal(image[j], record["image"][:, ::-1] if flipped else record["image"])
        mirrored += flipped
    assert 10 < mirrored < 62


def test_train_and_sample_on_latents(capsys, encoded, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    decoders = []

    def make_decoder(*args):
        decoders.append(real_make_decoder(*args))
        return decoders[-1]

    real_make_decoder = sampling.make_decoder
    monkeypatch.setattr(sampling, "make_decoder", make_decoder)
    latent_keys = [
        "--config.data.source=latents",
        f"--config.data.path='{encoded}'",
        "--config.data.image_size=4",
        "--config.data.channels=4",
        "--config.model.image_size=4",
        "--config.model.in_channels=4",
        "--config.model.depth=1",
    ]
    args = ["train", "--config=configs/quickstart.py:smoke", f"--workdir={workdir}", *latent_keys]
    grids = ["--config.sample_every=2", "--config.grid_samples_per_class=1"]
    assert main([*args, "--config.total_steps=4", "--config.batch_size=16", *grids]) == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert json.loads(f.readlines()[-1])["step"] == 4
    # Both sample grids decoded their latents with one VAE decoder, built at the first grid.
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_0000002.png", "step_0000004.png"]
    assert len(decoders) == 1 and isinstance(decoders[0], sampling.LatentDecoder)
    out = str(tmp_path / "samples.npz")
    args = ["sample", f"--workdir={workdir}", "--num_samples=12", f"--output={out}", "--num_steps=2"]
    assert main([*args, "--batch_size=8", "--sampler=euler", "--cfg_scale=1.0"]) == 0
    with np.load(out) as f:
        assert f["arr_0"].shape == (12, IMAGE_SIZE, IMAGE_SIZE, 3) and f["arr_0"].dtype == np.uint8
        assert np.array_equal(f["arr_1"], np.arange(12) % 10)
        assert f["arr_0"].std() > 0
    # Sample grids and `dit-jax eval` decode through the same `sampling.generate`; the VAE must exist.
    cfg = workdir_lib.load_config(workdir)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, vae=str(tmp_path / "missing_vae")))
    with pytest.raises(data.DataError, match=r"data.vae: .*missing_vae.* does not exist"):
        sampling.make_decoder(cfg, mesh_lib.make_mesh(cfg.mesh))


def test_repa_with_dinov2_on_latents_with_stored_images(encoded, tmp_path):
    """REPA's real setting: latents for the model, the stored clean images for the DINOv2 encoder
    (a tiny random one at 28 px -> a 2x2 patch grid = the model's 4x4 latents / patch 2)."""
    from test_repa import tiny_dinov2_checkpoint

    weights = tmp_path / "dinov2.pth"
    tiny_dinov2_checkpoint(weights)
    workdir = str(tmp_path / "repa")
    keys = [
        "--config.data.source=latents",
        f"--config.data.path='{encoded}'",
        "--config.data.with_images=True",
        "--config.data.image_size=4",
        "--config.data.channels=4",
        "--config.model.image_size=4",
        "--config.model.in_channels=4",
        "--config.model.depth=1",
        "--config.model.repa_depth=1",
        "--config.model.repa_projector_dim=32",
        "--config.model.repa_feature_dim=384",
        "--config.repa.weight=0.5",
        f"--config.repa.encoder_weights='{weights}'",
        "--config.repa.encoder_image_size=28",
        "--config.total_steps=3",
        "--config.batch_size=16",
        "--config.log_every=1",
    ]
    assert main(["train", "--config=configs/quickstart.py:smoke", f"--workdir={workdir}", *keys]) == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"repa_loss"' in line]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(-1.0 <= r["repa_loss"] <= 1.0 for r in records)
    # Without the stored images REPA would align to the latents themselves: refused.
    no_images = [k for k in keys if "with_images" not in k]
    assert main(["train", "--config=configs/quickstart.py:smoke", f"--workdir={workdir}_x", *no_images]) == 2


def test_latent_source_pickles_without_its_reader_and_names_unreadable_files(encoded, tmp_path):
    import pickle

    source = data.make_source(_latents_cfg(encoded))
    first = source[0]
    assert source._records is not None  # opened by the read
    copy = pickle.loads(pickle.dumps(source))
    assert copy._records is None and len(copy) == NUM_EXAMPLES
    for key, value in copy.__getitems__([0])[0].items():
        np.testing.assert_array_equal(value, first[key])
    # A lost last shard is found before training starts (the first and the last record are read).
    broken = tmp_path / "broken"
    shutil.copytree(encoded, broken)
    os.remove(latents.shard_paths(str(broken), latents.load_info(str(broken)))[-1])
    with pytest.raises(data.DataError, match=r"missing shards or is corrupt .*finished shards are kept"):
        data.make_source(_latents_cfg(str(broken)))
    # A folder TFDS cannot open says so once (not wrapped again as a corrupt shard).
    os.remove(broken / "features.json")
    with pytest.raises(data.DataError, match=r"^data.path=.*cannot open split 'train'") as err:
        data.make_source(_latents_cfg(str(broken)))
    assert "corrupt" not in str(err.value)
