"""dit_jax.workdir: a trained run loads for inference on any device count, without a trainer."""

import jax
import numpy as np
import pytest

from dit_jax import sampling, workdir
from dit_jax.parallel import mesh as mesh_lib
from dit_jax.train import loop
from dit_jax.train import state as state_lib
from dit_jax.train.checkpoint import CheckpointError


def sample(run, n=12, batch_size=256):
    labels = sampling.balanced_labels(n, run.config.model.num_classes)
    return sampling.generate(
        run.config, run.spec, run.params, labels, mesh=run.mesh, batch_size=batch_size, progress=False
    )


@pytest.fixture(scope="module")
def trained_2x4(tmp_path_factory, data_dir):
    """A tiny run trained on a data=2 × fsdp=4 mesh of the 8 devices."""
    import dataclasses

    from dit_jax import config_files

    cfg = config_files.load("quickstart:smoke", ["--config.total_steps=4", "--config.checkpoint_every=4"])
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, data_dir=data_dir),
        mesh=dataclasses.replace(cfg.mesh, data=2, fsdp=4),
    )
    path = str(tmp_path_factory.mktemp("run2x4"))
    final = loop.train(cfg, path)
    return path, final


def test_a_2x4_run_samples_the_same_images_on_1_and_8_devices(trained_2x4, monkeypatch):
    path, final = trained_2x4

    def refuse(*args, **kwargs):
        raise AssertionError("loading for inference must not build a trainer or an optimizer")

    monkeypatch.setattr(loop.Trainer, "__init__", refuse)
    monkeypatch.setattr(state_lib, "optimizer", refuse)
    one = workdir.load(path, mesh=workdir.inference_mesh(jax.devices()[:1]))
    eight = workdir.load(path)
    assert one.step == eight.step == 4 and eight.mesh.size == 8 and one.mesh.size == 1
    for x, y, e in zip(*(jax.tree.leaves(p) for p in (one.params, eight.params, final.ema)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(e))  # the EMA, bit for bit
        assert y.sharding.is_fully_replicated
    a, b = sample(one), sample(eight)  # batch 12 on one device, 16 (padded) on eight
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    c = sample(eight, batch_size=4)  # three batches of 8 (the data-parallel size)
    assert np.abs(b.astype(int) - c.astype(int)).max() <= 1


def test_a_1_device_run_samples_on_8(tiny_config, tmp_path):
    cfg = tiny_config(total_steps=3, checkpoint_every=3)
    single = mesh_lib.make_mesh(cfg.mesh.__class__(data=-1, fsdp=1), devices=jax.devices()[:1])
    loop.train(cfg, str(tmp_path), mesh=single)
    eight, one = workdir.load(str(tmp_path)), workdir.load(str(tmp_path), mesh=single)
    raw = workdir.load(str(tmp_path), ema=False)
    pairs = zip(jax.tree.leaves(raw.params), jax.tree.leaves(eight.params), strict=True)
    assert any(not np.array_equal(x, y) for x, y in pairs)  # ema=False: the raw parameters, not the EMA
    assert np.abs(sample(eight).astype(int) - sample(one).astype(int)).max() <= 1


def test_missing_checkpoints_and_steps_are_one_line_errors(trained_2x4, tmp_path):
    path, _ = trained_2x4
    with pytest.raises(CheckpointError, match="no checkpoint of step 7 .* holds steps \\[4\\]"):
        workdir.load(path, step=7)
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        workdir.load(path, best=True)
    with pytest.raises(FileNotFoundError, match="is .* a dit-jax training workdir"):
        workdir.load(str(tmp_path))


def test_batch_plan_never_pads_past_the_request():
    mesh8 = workdir.inference_mesh()
    mesh1 = workdir.inference_mesh(jax.devices()[:1])
    assert sampling.batch_plan(30, 256, mesh1) == (30, 1)
    assert sampling.batch_plan(30, 256, mesh8) == (32, 1)
    assert sampling.batch_plan(30, 10, mesh8) == (16, 2)
    assert sampling.batch_plan(1, 256, mesh8) == (8, 1)
    with pytest.raises(ValueError, match="at least one sample"):
        sampling.batch_plan(0, 256, mesh8)
