"""Resume that cannot break a run: config changes on resume, unreadable vs mismatched checkpoints,
Ctrl-C before and after the first checkpoint, and logs that read as one uninterrupted run."""

import hashlib
import json
import os
import re
import struct

import pytest

from dit_jax import config as config_lib
from dit_jax import workdir as workdir_lib
from dit_jax.cli import main
from dit_jax.train import loop
from dit_jax.train.checkpoint import Checkpointer, CheckpointError

SMOKE = "configs/quickstart.py:smoke"


def steps(workdir: str) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def losses(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def snapshot(root: str) -> dict[str, tuple]:
    """Every directory and file under `root`: (sha256, size, mtime) of each file."""
    out = {}
    for path, _, files in os.walk(root):
        out[os.path.relpath(path, root) + "/"] = ()
        for name in files:
            full = os.path.join(path, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = (
                    hashlib.sha256(f.read()).hexdigest(),
                    os.stat(full).st_mtime_ns,
                )
    return out


def purge_steps(workdir: str) -> list[int]:
    """Steps of the SessionLog.START events (TensorBoard's purge marks) in workdir's event files."""
    from tensorboardX.proto import event_pb2

    found = []
    for name in sorted(n for n in os.listdir(workdir) if n.startswith("events.out.tfevents.")):
        with open(os.path.join(workdir, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):  # TFRecord: uint64 length, uint32 crc, payload, uint32 crc
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                found.append(event.step)
    return found


class StopAt:
    """The data iterator, raising KeyboardInterrupt (Ctrl-C) instead of its n-th batch: the
    first batch is fetched for step start + 1, so steps up to start + n - 1 have been dispatched."""

    def __init__(self, iterator, n: int):
        self.iterator, self.n, self.calls = iterator, n, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def interrupt_at(monkeypatch, n: int) -> None:
    make = loop.data_lib.make_iterator
    monkeypatch.setattr(loop.data_lib, "make_iterator", lambda *a, **k: StopAt(make(*a, **k), n))


def test_resumable_keys_and_config_diff():
    old = {"total_steps": 4, "model": {"depth": 2, "remat": False}, "mesh": {"data": -1}}
    new = {"total_steps": 8, "model": {"depth": 1, "remat": False}, "mesh": {"data": 2}, "extra": 1}
    assert config_lib.diff(old, new) == [
        ("total_steps", 4, 8),
        ("model.depth", 2, 1),
        ("mesh.data", -1, 2),
        ("extra", config_lib.MISSING, 1),
    ]
    assert config_lib.diff(new, new) == []
    resumable = ["total_steps", "mesh.fsdp", "eval.num_samples", "sampler.kind", "optim.lr", "model.remat"]
    fixed = ["seed", "model.depth", "optim.grad_clip", "data.num_workers", "data.path", "model.param_dtype"]
    assert all(config_lib.is_resumable(k) for k in resumable)
    assert not any(config_lib.is_resumable(k) for k in fixed + ["meshes", "mesh"])
    # Every entry names a key or a group of the config: a renamed key cannot linger here.
    flat = {k for k, _, _ in config_lib.diff({}, config_lib.to_dict(config_lib.Config()))}
    for entry in config_lib.RESUMABLE_KEYS:
        assert entry in flat or (entry.endswith(".*") and any(k.startswith(entry[:-1]) for k in flat)), entry


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> tuple[str, list[str]]:
    """A 4-step smoke run with checkpoints at steps 2 and 4, trained by the CLI: (workdir, argv)."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    argv = [
        "train",
        f"--config={SMOKE}",
        f"--workdir={workdir}",
        f"--config.data.data_dir='{data_dir}'",
        "--config.total_steps=4",
        "--config.checkpoint_every=2",
    ]
    assert main(argv) == 0
    return workdir, argv


def test_changed_model_stops_in_one_line_touching_nothing(trained, capsys, tmp_path):
    workdir, argv = trained
    before = snapshot(workdir)
    capsys.readouterr()
    code = main([*argv, "--config.model.depth=1", "--config.optim.grad_clip=0.0", "--config.total_steps=6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (
        f"dit-jax train: error: cannot resume {workdir} from its checkpoint of step 4 with a different "
        "model.depth (2 → 1), optim.grad_clip (1.0 → 0.0): these keys define the train state or what is "
        "trained and cannot change on resume; set them back to the values in "
        f"{workdir}/config.json, or train in a new workdir"
    )
    assert snapshot(workdir) == before
    out = str(tmp_path / "samples.npz")
    assert main(["sample", f"--workdir={workdir}", "--num_samples=4", f"--output={out}"]) == 0
    assert os.path.exists(out)


def test_structure_mismatch_is_not_damage(trained, tiny_config, caplog):
    workdir, _ = trained
    for change, detail in [
        (dict(model=dict(depth=1)), r"\(the trees differ at ema\.blocks\.1, .* and \d+ more\)"),
        (dict(optim=dict(grad_clip=0.0)), r"\(the trees differ at opt_state\)"),
        (dict(model=dict(hidden_size=64)), r"\(an array stored as \([\d, ]+\) is \([\d, ]+\) here\)"),
    ]:
        trainer = loop.Trainer(tiny_config(**change), workdir)
        with pytest.raises(CheckpointError) as info:
            trainer.checkpointer.restore(trainer.abstract_state())
        trainer.close()
        message = str(info.value)
        assert message.startswith(
            f"the checkpoint at step 4 in {workdir}/checkpoints was written for a different model or "
            "optimizer than this config builds"
        )
        assert re.search(detail, message) and "\n" not in message and "delete" not in message
        assert "cannot be read" not in caplog.text  # not taken for damage: no fallback to step 2


def test_changed_resumable_keys_resume_and_are_logged(tiny_config, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    loop.train(tiny_config(total_steps=4, checkpoint_every=2, log_every=1), workdir)
    caplog.set_level("INFO", logger="dit_jax")
    longer = tiny_config(total_steps=6, checkpoint_every=2, log_every=1, optim=dict(lr=5e-4))
    loop.train(longer, workdir)
    assert "resuming with a changed total_steps: 4 → 6" in caplog.text
    assert "resuming with a changed optim.lr: 0.001 → 0.0005" in caplog.text
    assert "resumed from step 4" in caplog.text
    assert steps(workdir) == list(range(7))
    assert workdir_lib.load_config(workdir) == longer


def test_unreadable_newest_checkpoint_falls_back_saying_which_and_why(tiny_config, tmp_path, caplog):
    cfg = tiny_config(total_steps=4, checkpoint_every=2, log_every=1)
    workdir = str(tmp_path / "run")
    loop.train(cfg, workdir)
    ckpt = os.path.join(workdir, "checkpoints")
    with open(os.path.join(ckpt, "4", "state", "_METADATA"), "w") as f:
        f.write("garbage")
    loop.train(cfg, workdir)  # the same command again
    assert (
        f"checkpoint at step 4 in {ckpt} cannot be read (JSONDecodeError: Expecting value: line 1 column 1 "
        "(char 0)); trying step 2"
    ) in caplog.text
    # Set aside (not deleted), so that step 4 was trained and saved again instead of being skipped.
    assert os.listdir(ckpt + "_unreadable") == ["4"] and sorted(os.listdir(ckpt)) == ["2", "4"]
    assert steps(workdir) == [0, 1, 2, 3, 4]
    trainer = loop.Trainer(cfg, workdir)
    assert trainer.checkpointer.restore(trainer.abstract_state())[0] == 4
    for step in (2, 4):
        with open(os.path.join(ckpt, str(step), "state", "_METADATA"), "w") as f:
            f.write("garbage")
    with pytest.raises(CheckpointError) as info:
        Checkpointer(ckpt).restore(trainer.abstract_state())
    trainer.close()
    assert str(info.value) == (
        f"no checkpoint in {ckpt} could be restored: none of them can be read (step 4: JSONDecodeError: "
        "Expecting value: line 1 column 1 (char 0); step 2: JSONDecodeError: Expecting value: line 1 column "
        "1 (char 0)); copy their files back from a backup, or train again in a new workdir"
    )


def test_interrupt_before_first_checkpoint_then_fresh_start(tiny_config, tmp_path, monkeypatch, caplog):
    cfg = tiny_config(total_steps=6, checkpoint_every=4, log_every=1)
    workdir = str(tmp_path / "run")
    interrupt_at(monkeypatch, 3)
    with pytest.raises(loop.Interrupted) as info:
        loop.train(cfg, workdir)
    assert isinstance(info.value, KeyboardInterrupt) and info.value.step is None
    assert str(info.value) == (
        "interrupted; no checkpoint was written yet; re-running the same command starts from step 0"
    )
    assert steps(workdir) == [0, 1] and not os.listdir(os.path.join(workdir, "checkpoints"))
    monkeypatch.undo()
    caplog.set_level("INFO", logger="dit_jax")
    loop.train(cfg, workdir)
    assert f"no checkpoint in {workdir} (an earlier run stopped before its first): starting from step 0" in (
        caplog.text
    )
    assert "removed metrics.jsonl (2 records) and 1 TensorBoard event files" in caplog.text
    assert steps(workdir) == list(range(7))
    assert len([n for n in os.listdir(workdir) if n.startswith("events.out")]) == 1


def test_interrupt_after_checkpoint_resumes_as_one_run(tiny_config, tmp_path, monkeypatch, caplog):
    cfg = tiny_config(total_steps=6, checkpoint_every=3, log_every=1)
    straight, workdir = str(tmp_path / "straight"), str(tmp_path / "run")
    loop.train(cfg, straight)
    interrupt_at(monkeypatch, 6)  # steps 1-5 dispatched, checkpoint 3 saved, records 0-4 written
    with pytest.raises(loop.Interrupted) as info:
        loop.train(cfg, workdir)
    assert (
        str(info.value) == "interrupted; the checkpoint of step 3 is kept; re-run the same command to resume"
    )
    assert info.value.step == 3 and steps(workdir) == [0, 1, 2, 3, 4]
    monkeypatch.undo()
    caplog.set_level("INFO", logger="dit_jax")
    loop.train(cfg, workdir)
    assert "dropped 1 records of metrics.jsonl written after that checkpoint" in caplog.text
    assert steps(workdir) == steps(straight) == list(range(7))
    assert losses(workdir) == losses(straight)
    assert purge_steps(workdir) == [4]  # TensorBoard hides the interrupted run's step 4
