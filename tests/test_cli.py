"""The CLI end to end, and bad input: one line on stderr, exit code 2, nothing lost."""

import os
import subprocess
import sys

import numpy as np
import pytest

from dit_jax.cli import main

SMOKE = "configs/quickstart.py:smoke"


def run_main(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.model.patch_size=3"], "patch size 3 does not divide image size 8"),
        (["--config.batch_size=12"], "not divisible by the data-parallel size 8"),
        (["--config.mesh.data=16"], "needs 16 devices but 8 are available"),
        (["--config.model.depht=2"], "unknown config key 'model.depht'"),
        (["--config.data.channels=3"], "data.channels=3 but model.in_channels=1"),
    ],
)
def test_train_rejects_bad_config_in_one_line(capsys, tmp_path, data_dir, extra, message):
    code, err = run_main(
        capsys,
        "train",
        f"--config={SMOKE}",
        f"--workdir={tmp_path}",
        f"--config.data.data_dir='{data_dir}'",
        *extra,
    )
    assert code == 2
    assert len(err) == 1 and message in err[0] and err[0].startswith("dit-jax train: error:")


def test_missing_config_file(capsys, tmp_path):
    code, err = run_main(capsys, "train", "--config=configs/nope.py", f"--workdir={tmp_path}")
    assert code == 2 and len(err) == 1 and "configs/nope.py" in err[0]


def test_sample_without_checkpoints(capsys, tmp_path):
    code, err = run_main(capsys, "sample", f"--workdir={tmp_path}", "--num_samples=4", "--output=x.npz")
    assert code == 2 and len(err) == 1 and "config.json" in err[0]


def test_train_then_sample_then_damaged_checkpoints(capsys, tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    args = [
        "train",
        f"--config={SMOKE}",
        f"--workdir={workdir}",
        f"--config.data.data_dir='{data_dir}'",
        "--config.total_steps=10",
        "--config.checkpoint_every=5",
    ]
    assert main(args) == 0
    out = str(tmp_path / "s.npz")
    code = main(
        [
            "sample",
            f"--workdir={workdir}",
            "--num_samples=20",
            f"--output={out}",
            f"--grid={tmp_path / 'g.png'}",
            "--num_steps=2",
        ]
    )
    assert code == 0
    with np.load(out) as f:
        assert f["arr_0"].shape == (20, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        assert np.array_equal(f["arr_1"], np.arange(20) % 10)
    assert os.path.getsize(tmp_path / "g.png") > 0
    capsys.readouterr()
    # Damage every checkpoint: sampling stops with one clear line, and nothing is deleted.
    ckpt = os.path.join(workdir, "checkpoints")
    for step in os.listdir(ckpt):
        for root, _, files in os.walk(os.path.join(ckpt, step, "state")):
            for name in files:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"\0")
    code = main(["sample", f"--workdir={workdir}", "--num_samples=4", f"--output={out}"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("WARNING")]
    assert code == 2 and len(err) == 1 and "could be restored" in err[0]
    assert sorted(os.listdir(ckpt)) == ["10", "5"]


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dit_jax",
            "train",
            f"--config={SMOKE}",
            f"--workdir={tmp_path}",
            "--config.model.patch_size=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("dit-jax train: error: config key 'model.patch_size'")
    )


def _config_only_workdir(path, *overrides) -> str:
    """A workdir holding only config.json: enough for every check that must come before loading."""
    import json

    from dit_jax import config as config_lib
    from dit_jax import config_files

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_lib.to_dict(config_files.load(SMOKE, list(overrides))), f)
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--workdir=WD", "--num_samples=0", "--output=x.npz"], "--num_samples and --batch_size"),
        (["sample", "--workdir=WD", "--num_samples=4", "--output=/no/such/dir/x.npz"], "/no/such/dir does"),
        (["sample", "--workdir=WD", "--num_samples=4", "--output=x.npz", "--sampler=ddpm"],
         "sampler 'ddpm' does not fit objective 'flow'"),
        (["eval", "--workdir=WD", "--output=/no/such/dir/e.json"], "/no/such/dir does not exist"),
        (["eval", "--workdir=IMAGES"], "no metrics for data source 'image_folder' without a reference"),
    ],
)  # fmt: skip
def test_sample_and_eval_reject_bad_input_before_any_work(capsys, tmp_path, argv, message):
    """All of these fail in well under a second: the workdirs have no checkpoint to load."""
    wd = _config_only_workdir(tmp_path / "wd")
    images = _config_only_workdir(
        tmp_path / "img", "--config.data.source=image_folder", f"--config.data.path={tmp_path}"
    )
    argv = [a.replace("WD", wd).replace("IMAGES", images) for a in argv]
    code, err = run_main(capsys, *argv)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_convert_a_pickled_checkpoint_without_torch_is_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "model.pt").write_bytes(b"not really a checkpoint")
    monkeypatch.setitem(sys.modules, "torch", None)  # what a base install without the extra sees
    code, err = run_main(
        capsys, "convert", "--from=dit", f"--input={tmp_path / 'model.pt'}", f"--output={tmp_path / 'o'}"
    )
    assert code == 2 and len(err) == 1 and "needs PyTorch" in err[0] and "dit_jax[torch]" in err[0], err


def test_reference_names_a_corrupt_image_in_one_line(capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (12, 10), (200, 30, 30)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"\x89PNG truncated")
    code, err = run_main(capsys, "reference", f"--images={folder}", f"--output={tmp_path / 'ref.npz'}")
    assert code == 2 and len(err) == 1 and "bad.png" in err[0] and "fix or delete the file" in err[0], err
