"""Training end to end on tiny configs: exact resume, sharding, non-finite stop, damaged checkpoints."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from dit_jax import sampling
from dit_jax.parallel import mesh as mesh_lib
from dit_jax.train import loop
from dit_jax.train.checkpoint import CheckpointError


def losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def samples(cfg, workdir, n=10):
    trainer = loop.Trainer(cfg, workdir)
    _, state, _ = trainer.checkpointer.restore(trainer.abstract_state())
    trainer.checkpointer.close()
    labels = sampling.balanced_labels(n, cfg.model.num_classes)
    return sampling.generate(cfg, trainer.spec, state.ema, labels, mesh=trainer.mesh, batch_size=16)


def test_resume_is_exact(tiny_config, tmp_path):
    """40 steps straight == 20 steps, restart, 20 more: same losses and the same samples."""
    optim = dict(lr=1e-3, warmup_steps=5, schedule="constant", ema_decay=0.9)
    cfg20 = tiny_config(total_steps=20, checkpoint_every=20, log_every=1, optim=optim)
    cfg40 = tiny_config(total_steps=40, checkpoint_every=20, log_every=1, optim=optim)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train(cfg40, straight)
    loop.train(cfg20, resumed)
    assert sorted(losses(resumed)) == list(range(1, 21))
    loop.train(cfg40, resumed)  # same command again: resumes from step 20
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 41))
    assert [a[s] for s in range(1, 41)] == [b[s] for s in range(1, 41)]
    np.testing.assert_array_equal(samples(cfg40, straight), samples(cfg40, resumed))
    with open(os.path.join(straight, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["num_devices"] == jax.device_count() == 8 and first["num_params"] > 0


def test_sharded_run_matches_single_device_and_is_sharded(tiny_config, tmp_path):
    cfg = tiny_config(total_steps=6, checkpoint_every=0, log_every=1, mesh=dict(data=2, fsdp=4))
    single = mesh_lib.make_mesh(cfg.mesh.__class__(data=-1, fsdp=1), devices=jax.devices()[:1])
    state8 = loop.train(cfg, str(tmp_path / "eight"))
    state1 = loop.train(cfg, str(tmp_path / "one"), mesh=single)
    a, b = losses(str(tmp_path / "eight")), losses(str(tmp_path / "one"))
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-5)
    for x, y in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    # The MLP kernel [embed, mlp] is split over fsdp: each device holds a quarter of it.
    kernel = state8.params["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp"
    assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // 4
    adam_mu = jax.tree.leaves(state8.opt_state)
    assert any(
        getattr(leaf, "sharding", None) is not None and "fsdp" in str(leaf.sharding.spec) for leaf in adam_mu
    )


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config(
        total_steps=30, checkpoint_every=1, log_every=1, optim=dict(lr=1e30, warmup_steps=0, grad_clip=0.0)
    )
    workdir = str(tmp_path / "nan")
    with pytest.raises(loop.NonFiniteLoss) as info:
        loop.train(cfg, workdir)
    # Every step before the bad one was finite, logged and checkpointed; the bad one was not saved.
    logged = losses(workdir)
    bad = max(logged) + 1
    assert sorted(logged) == list(range(1, bad)) and all(np.isfinite(v) for v in logged.values())
    assert bad <= cfg.total_steps
    message = str(info.value)
    reported_loss = message[len("loss became non-finite (") : message.find(")")]
    assert not np.isfinite(float(reported_loss)), message
    assert message == (
        f"loss became non-finite ({reported_loss}) at step {bad}; stopped without saving it "
        f"(last good checkpoint: step {bad - 1}). Lower optim.lr, enable optim.grad_clip, or use float32."
    )
    checkpoints = sorted(
        int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()
    )
    assert checkpoints[-1] == bad - 1
    trainer = loop.Trainer(cfg, workdir)
    step, state, _ = trainer.checkpointer.restore(trainer.abstract_state())
    trainer.checkpointer.close()
    assert step == bad - 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_damaged_newest_checkpoint_falls_back_then_fails_clearly(tiny_config, tmp_path, caplog):
    cfg = tiny_config(total_steps=20, checkpoint_every=10)
    workdir = str(tmp_path / "damaged")
    loop.train(cfg, workdir)
    ckpt = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["10", "20"]
    # An interrupted save leaves only a temporary directory: it is never taken for a checkpoint.
    os.makedirs(os.path.join(ckpt, "30.orbax-checkpoint-tmp-1234", "state"))
    for root, _, files in os.walk(os.path.join(ckpt, "20", "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    trainer = loop.Trainer(cfg, workdir)
    assert trainer.checkpointer.latest_step() == 20
    step, _, _ = trainer.checkpointer.restore(trainer.abstract_state())
    assert step == 10 and "step 20" in caplog.text
    shutil.rmtree(os.path.join(ckpt, "10", "state"))
    with pytest.raises(CheckpointError, match="could be restored"):
        trainer.checkpointer.restore(trainer.abstract_state())
    trainer.checkpointer.close()


def test_restore_onto_a_different_mesh(tiny_config, tmp_path):
    cfg = tiny_config(total_steps=4, checkpoint_every=4, mesh=dict(data=1, fsdp=8))
    workdir = str(tmp_path / "remesh")
    trained = loop.train(cfg, workdir)
    other = tiny_config(
        total_steps=4, checkpoint_every=4, mesh=dict(data=2, fsdp=1, tensor=4, rules="fsdp_tp")
    )
    trainer = loop.Trainer(other, workdir, mesh_lib.make_mesh(other.mesh, devices=jax.devices()))
    _, state, _ = trainer.checkpointer.restore(trainer.abstract_state())
    trainer.checkpointer.close()
    fc1 = state.params["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    for x, y in zip(jax.tree.leaves(trained), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bfloat16_compute_trains(tiny_config, tmp_path):
    cfg = tiny_config(total_steps=4, checkpoint_every=0, log_every=1, model=dict(dtype="bfloat16"))
    state = loop.train(cfg, str(tmp_path / "bf16"))
    assert all(np.isfinite(v) for v in losses(str(tmp_path / "bf16")).values())
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))  # storage stays f32
