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
from dit_jax.cli import main  # noqa: E402
from dit_jax.data import encode, latents  # noqa: E402
from dit_jax.parallel import mesh as mesh_lib  # noqa: E402
from dit_jax.train import loop  # noqa: E402

IMAGE_SIZE = 32  # 4-level VAE: 4x4x4 latents
NUM_EXAMPLES = 40
SHARD_SIZE = 16  # shards of 16, 16, 8
KEYS = ("mean", "std", "mean_flipped", "std_flipped")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    """A tiny random diffusers AutoencoderKL (downsampling 8) saved with save_pretrained."""
    path = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        mid_block_add_attention=False,  # fewer ops to compile
        sample_size=IMAGE_SIZE,
    )
    vae.eval().save_pretrained(path)
    return str(path)


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
    )
    return encode.EncodeOptions(**{**fields, **overrides})


@pytest.fixture(scope="module")
def encoded(vae_dir, data_dir, tmp_path_factory) -> str:
    """Digits (first 40 training images, 32 px) with flipped latents, encoded over the 8 devices."""
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


def test_one_device_gives_the_same_latents(encoded, vae_dir, data_dir, tmp_path):
    """Bitwise, as the per-device batch is the same; also without --hflip (plain latents do not
    depend on it)."""
    output = tmp_path / "one_device"
    options = _options(vae_dir, data_dir, output, hflip=False)
    encode.encode(options, devices=jax.local_devices()[:1], progress=False)
    for mine, ref in zip(_records(str(output)), _records(encoded), strict=True):
        assert set(mine) == {"mean", "std", "label"}
        np.testing.assert_array_equal(mine["mean"], ref["mean"])
        np.testing.assert_array_equal(mine["std"], ref["std"])
        assert mine["label"] == ref["label"]
    # A flip-less data set cannot serve data.hflip=True.
    with pytest.raises(data.DataError, match=r"data.hflip=True .* no flipped latents"):
        data.make_source(_latents_cfg(str(output), hflip=True))


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
        (["--data=digits", "--image_size=16", "--limit=40", "--hflip"], "holds a different latents data set"),
    ]
    for extra, message in cases:
        output = encoded if "holds a different" in message else str(tmp_path / "out")
        code = main([*base, *extra, f"--output={output}"])
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "WARNING" not in line]
        assert code == 2 and len(err) == 1, (extra, err)
        assert err[0].startswith("dit-jax encode: error:") and message in err[0], err
    assert "image_size: 32 there, 16 here" in err[0]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("x")
    assert main([*base, "--data=digits", f"--output={tmp_path / 'full'}"]) == 2
    assert "already holds other files" in capsys.readouterr().err


def test_image_folder_through_the_cli(capsys, vae_dir, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    output = tmp_path / "out"
    args = ["encode", f"--data={tmp_path / 'images'}", f"--vae={vae_dir}", f"--output={output}"]
    # Same shapes as the `encoded` fixture: its compilation is reused.
    assert main([*args, f"--image_size={IMAGE_SIZE}", "--hflip", "--batch_size=2"]) == 0
    assert "6 examples, latents 4x4x4" in capsys.readouterr().out
    info = latents.load_info(str(output))
    assert info.class_names == ("cat", "dog") and info.latent_shape == (4, 4, 4) and info.hflip
    assert [int(r["label"]) for r in _records(str(output))] == [0, 0, 0, 1, 1, 1]


def test_latent_pipeline_draws_deterministic_samples_and_resumes(encoded):
    cfg = _latents_cfg(encoded)
    records = _records(encoded)
    with pytest.raises(
        data.DataError, match=r"data.image_size=32 .* set data.image_size and model.image_size to 4"
    ):
        data.make_source(dataclasses.replace(cfg, image_size=32))
    with pytest.raises(data.DataError, match=r"data.channels=3 .* 4 latent channels"):
        data.make_source(dataclasses.replace(cfg, channels=3))
    with pytest.raises(data.DataError, match=r"data.num_classes=5 .* 10 classes"):
        data.make_source(dataclasses.replace(cfg, num_classes=5))

    it = data.make_iterator(cfg, global_batch_size=8, seed=3, process_index=0, process_count=1)
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    after = [next(it) for _ in range(6)]  # 72 draws: beyond the first epoch of 40
    resumed = data.make_iterator(cfg, global_batch_size=8, seed=3, process_index=0, process_count=1)
    resumed.set_state(state)
    for a, b in zip(after, [next(resumed) for _ in range(6)], strict=True):
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


def test_train_and_sample_on_latents(capsys, encoded, tmp_path):
    workdir = str(tmp_path / "run")
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
    assert main([*args, "--config.total_steps=4", "--config.batch_size=16"]) == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert json.loads(f.readlines()[-1])["step"] == 4
    out = str(tmp_path / "samples.npz")
    args = ["sample", f"--workdir={workdir}", "--num_samples=12", f"--output={out}", "--num_steps=2"]
    assert main([*args, "--batch_size=8", "--sampler=euler", "--cfg_scale=1.0"]) == 0
    with np.load(out) as f:
        assert f["arr_0"].shape == (12, IMAGE_SIZE, IMAGE_SIZE, 3) and f["arr_0"].dtype == np.uint8
        assert np.array_equal(f["arr_1"], np.arange(12) % 10)
        assert f["arr_0"].std() > 0
    # Sample grids and `dit-jax eval` decode through the same `sampling.generate`; the VAE must exist.
    cfg = loop.load_config(workdir)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, vae=str(tmp_path / "missing_vae")))
    with pytest.raises(data.DataError, match=r"data.vae: .*missing_vae.* does not exist"):
        sampling.make_decoder(cfg, mesh_lib.make_mesh(cfg.mesh))
