"""Sweeps (dit_jax/sweeps.py, launch/sweep.py): grids, run names, dry runs of every launcher, bad
keys caught before anything starts, a real local sweep with a failing run, re-runs and --status."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dit_jax import config_files, sweeps

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
SWEEP = str(ROOT / "launch" / "sweep.py")


def load_launcher():
    spec = importlib.util.spec_from_file_location("launch_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_config(path: Path, runs: str) -> str:
    """A config file: configs/scaling.py's smoke config, and a sweep() returning `runs` (Python code);
    with arg "typo" the sweep gets a third run with a misspelt key."""
    path.write_text(
        "from dit_jax.configs import scaling\n\n\n"
        "def get_config(arg=''):\n    return scaling.get_config('smoke')\n\n\n"
        f"def sweep(arg=''):\n    runs = {runs}\n"
        "    return runs + [{'model.hiden_size': 8}] if arg == 'typo' else runs\n"
    )
    return str(path)


# ----------------------------------------------------------------------------- grids and names


def test_product_and_zip():
    grid = sweeps.product({"model.hidden_size": [32, 64]}, {"optim.lr": [1e-3, 2e-3], "seed": 0})
    assert grid == [
        {"model.hidden_size": 32, "optim.lr": 1e-3, "seed": 0},
        {"model.hidden_size": 32, "optim.lr": 2e-3, "seed": 0},
        {"model.hidden_size": 64, "optim.lr": 1e-3, "seed": 0},
        {"model.hidden_size": 64, "optim.lr": 2e-3, "seed": 0},
    ]
    assert sweeps.product({"a": [1, 2], "b": [3, 4]}) == sweeps.product({"a": [1, 2]}, {"b": [3, 4]})
    paired = sweeps.zip_({"model.hidden_size": [32, 64], "optim.lr": [2e-3, 1e-3]})
    assert paired == [
        {"model.hidden_size": 32, "optim.lr": 2e-3},
        {"model.hidden_size": 64, "optim.lr": 1e-3},
    ]
    nested = sweeps.product(paired, {"total_steps": range(100, 300, 100)})
    assert len(nested) == 4 and nested[1] == {"model.hidden_size": 32, "optim.lr": 2e-3, "total_steps": 200}
    assert sweeps.zip_({"a": [1, 2]}, [{"b": 3}, {"b": 4}]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    assert sweeps.product() == [{}]
    with pytest.raises(sweeps.SweepError, match="one length"):
        sweeps.zip_({"a": [1, 2], "b": [1, 2, 3]})
    with pytest.raises(sweeps.SweepError, match="'a' is set by two axes"):
        sweeps.product({"a": [1]}, {"a": [2]})


def test_run_names_are_readable_unique_stable_and_safe():
    name = sweeps.run_name({"optim.lr": 1e-3, "model.hidden_size": 64})
    assert name == "model.hidden_size=64,optim.lr=0.001"
    assert sweeps.run_name({"model.hidden_size": 64, "optim.lr": 0.001}) == name  # order does not matter
    assert sweeps.run_name({}) == "base"
    assert sweeps.run_name({"data.source": "digits", "model.learn_sigma": True}) == (
        "data.source=digits,model.learn_sigma=True"
    )
    # Characters a file name or shell would trip over are replaced; a hash keeps the name unique.
    slash, underscore = sweeps.run_name({"data.path": "/a/b"}), sweeps.run_name({"data.path": "_a_b"})
    assert slash.startswith("data.path=_a_b-") and underscore == "data.path=_a_b" and slash != underscore
    assert sweeps.run_name({"data.path": "/a/b"}) == slash  # stable
    # Long names: the last part of each key, cut, plus a hash of the whole.
    long = {f"model.key_{i}": "x" * 30 for i in range(6)}
    short = sweeps.run_name(long)
    assert len(short) <= sweeps.MAX_NAME and short.startswith("key_0=xxx") and "/" not in short
    assert short != sweeps.run_name({**long, "model.key_5": "y" * 30})
    # Values round-trip through --config.KEY=VALUE.
    for value in (64, 1e-5, True, None, "digits", "1", (1, 2), -1):
        [arg] = sweeps.override_args({"k": value})
        assert config_files.parse_value(arg.partition("=")[2]) == value
    assert sweeps.override_args({"k": "1"}) == ["--config.k='1'"]
    np = pytest.importorskip("numpy")
    assert sweeps.run_name({"optim.lr": np.float64(0.5)}) == "optim.lr=0.5"


def test_scaling_config_expands_into_checked_runs(tmp_path):
    runs = sweeps.expand("scaling:smoke", str(tmp_path))
    assert [r.name for r in runs] == [
        "model.hidden_size=16,optim.lr=0.004,total_steps=2",
        "model.hidden_size=16,optim.lr=0.004,total_steps=4",
        "model.hidden_size=32,optim.lr=0.002,total_steps=2",
        "model.hidden_size=32,optim.lr=0.002,total_steps=4",
    ]
    assert [r.total_steps for r in runs] == [2, 4, 2, 4]
    assert runs[3].workdir == str(tmp_path / runs[3].name)
    assert [r.name for r in sweeps.expand("configs/scaling.py:smoke", str(tmp_path))] == [
        r.name for r in runs
    ]
    assert len(sweeps.expand("scaling", str(tmp_path))) == 6  # the full study: 3 widths × 2 lengths
    # A swept point equals the config of the same arguments.
    cfg = config_files.load("scaling:width=32,steps=4,smoke")
    assert config_files.load("scaling:smoke", sweeps.override_args(runs[3].overrides)) == cfg
    with pytest.raises(sweeps.SweepError, match="sets 'total_steps', which the sweep sets per run"):
        sweeps.expand("scaling:smoke", str(tmp_path), ["--config.total_steps=9"])
    with pytest.raises(sweeps.SweepError, match="arguments for every run: unknown config key 'model.nope'"):
        sweeps.expand("scaling:smoke", str(tmp_path), ["--coordinator=auto", "--config.model.nope=1"])
    with pytest.raises(sweeps.SweepError, match="unrecognised argument '--confg.seed=1'"):
        sweeps.expand("scaling:smoke", str(tmp_path), ["--confg.seed=1"])


# ----------------------------------------------------------------------------- dry runs


def dry_run(capsys, monkeypatch, *argv: str) -> list[str]:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    assert load_launcher().main(["--dry_run", *argv]) == 0
    return capsys.readouterr().out.splitlines()


def test_local_dry_run_prints_workdir_and_command(tmp_path, capsys, monkeypatch):
    lines = dry_run(
        capsys, monkeypatch, "--config=scaling:smoke", f"--root={tmp_path}", "--", "--config.seed=3"
    )
    assert len(lines) == 4
    workdir, command = lines[1].split("  ", 1)
    name = "model.hidden_size=16,optim.lr=0.004,total_steps=4"
    assert workdir == str(tmp_path / name)
    assert shlex.split(command) == [
        "dit-jax",
        "train",
        "--config=scaling:smoke",
        f"--workdir={tmp_path / name}",
        "--config.model.hidden_size=16",
        "--config.optim.lr=0.004",
        "--config.total_steps=4",
        "--config.seed=3",
    ]
    assert not any(tmp_path.iterdir())  # a dry run creates nothing


def test_cluster_dry_runs_print_the_submit_commands(tmp_path, capsys, monkeypatch):
    name = "model.hidden_size=16,optim.lr=0.004,total_steps=2"
    common = ["--config=scaling:smoke", f"--root={tmp_path}", "--parallel=2"]
    extra = ["--", "--config.data.data_dir=/shared/datasets"]
    train = [
        "--config=scaling:smoke",
        f"--workdir={tmp_path / name}",
        "--config.model.hidden_size=16",
        "--config.optim.lr=0.004",
        "--config.total_steps=2",
        "--config.data.data_dir=/shared/datasets",
    ]

    lines = dry_run(capsys, monkeypatch, *common, "--launcher=slurm", "--launcher_args=--nodes=2", *extra)
    assert len(lines) == 4 and lines[0].startswith(f"{tmp_path / name}  sbatch ")
    assert shlex.split(lines[0].split("  ", 1)[1]) == [
        "sbatch",
        f"--job-name={name}",
        f"--output={tmp_path / name}/train.log",
        "--open-mode=append",
        "--nodes=2",
        "launch/slurm.sbatch",
        *train,
    ]

    tpu = "--launcher_args=--name=sw --zone=us-east5-a --accelerator=v5p-8"
    lines = dry_run(capsys, monkeypatch, *common, "--launcher=tpu_vm", tpu, *extra)
    commands = [shlex.split(line.split("  ", 1)[1]) for line in lines]
    assert commands[0] == [
        "launch/tpu_vm.sh",
        "--name=sw-0",
        "--zone=us-east5-a",
        "--accelerator=v5p-8",
        "--",
        *train,
    ]
    assert [c[1] for c in commands] == ["--name=sw-0", "--name=sw-1", "--name=sw-0", "--name=sw-1"]
    # The command is tpu_vm.sh's own CLI: its dry run trains the run on the slice.
    proc = subprocess.run(
        ["bash", *commands[0][:4], "--dry_run", *commands[0][4:]], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert f"dit-jax train {shlex.join(train)} --coordinator=auto" in proc.stdout.replace("\\,", ",")

    gke = "--launcher_args=--image=IMG --tpu=v5p --topology=2x2x1 --hosts=1"
    lines = dry_run(capsys, monkeypatch, *common, "--launcher=gke", gke, *extra)
    command = shlex.split(lines[0].split("  ", 1)[1])
    jobset = f"dit-sweep-{sweeps.short_hash(name)}"
    assert command[1:] == ["launch/gke/render.py", f"--name={jobset}", "--image=IMG", "--tpu=v5p",
                           "--topology=2x2x1", "--hosts=1", "--", *train]  # fmt: skip
    assert len({line.split("--name=")[1].split()[0] for line in lines}) == 4  # one JobSet per run
    proc = subprocess.run([*command[:7], "--dry_run", *command[7:]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"name: {jobset}" in proc.stdout and f"--workdir={tmp_path / name}" in proc.stdout


def test_launcher_arguments_are_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    launcher = load_launcher()
    assert (
        launcher.main(["--config=scaling:smoke", f"--root={tmp_path}", "--launcher=tpu_vm", "--dry_run"]) == 2
    )
    assert "--launcher=tpu_vm needs --launcher_args='--name=SLICE" in capsys.readouterr().err


def test_slurm_submission_skips_running_jobs_and_resubmits_the_rest(tmp_path, capsys, monkeypatch):
    """With stand-ins for sbatch and squeue: every run is submitted (one submission fails, named at
    the end); --status asks squeue which jobs still run; a re-run resubmits only the others."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    failing = "--config.model.hidden_size=32 --config.optim.lr=0.002 --config.total_steps=4"
    (bin_dir / "sbatch").write_text(
        "#!/bin/bash\n"
        'echo "$*" >> "$SBATCH_CALLS"\n'
        f'if [[ "$*" == *"{failing}"* ]]; then\n'
        '  echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1\n'
        "fi\n"
        'echo "Submitted batch job $(wc -l < "$SBATCH_CALLS")"\n'
    )
    (bin_dir / "squeue").write_text(  # squeue -h -j ID -o %T
        '#!/bin/bash\n[[ " $SQUEUE_RUNNING " == *" $3 "* ]] && echo RUNNING\nexit 0\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    calls = tmp_path / "sbatch_calls"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_CALLS", str(calls))
    monkeypatch.setenv("SQUEUE_RUNNING", "1 2")
    monkeypatch.chdir(ROOT)
    launcher = load_launcher()
    argv = ["--config=scaling:smoke", f"--root={tmp_path / 'sweep'}", "--launcher=slurm"]

    assert launcher.main(argv) == 1
    out, err = capsys.readouterr()
    assert "3 submitted, 1 failed, 0 skipped" in out
    name = "model.hidden_size=32,optim.lr=0.002,total_steps=4"
    [line] = err.strip().splitlines()
    assert line == (
        f"launch/sweep.py: run {name} was not submitted (sbatch exit code 1: sbatch: error: Batch job "
        f"submission failed: Invalid account); workdir {tmp_path / 'sweep' / name}"
    )
    assert len(calls.read_text().splitlines()) == 4

    assert launcher.main([*argv, "--status"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[1] for r in rows] == ["running", "running", "failed", "failed"]
    assert rows[0].endswith("slurm job 1") and rows[2].endswith("slurm job 3 ended before total_steps")
    assert rows[3].endswith("not submitted: sbatch exit code 1: sbatch: error: Batch job submission failed: "
                            "Invalid account")  # fmt: skip

    assert launcher.main(argv) == 1  # jobs 1 and 2 still run: only the other two are submitted again
    assert "2 to start; skipped: 2 running" in capsys.readouterr().out
    assert len(calls.read_text().splitlines()) == 6


# ----------------------------------------------------------------------------- bad input


def sweep_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SWEEP, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )


def test_a_config_without_sweep_is_one_line(tmp_path):
    proc = sweep_cli("--config=quickstart:smoke", f"--root={tmp_path}")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("launch/sweep.py: error: config file ") and "has no sweep(arg) function" in line


# ----------------------------------------------------------------------------- a real sweep


def child_env() -> dict:
    """One CPU device per run (faster), and the venv's dit-jax first on PATH."""
    return dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    )


def snapshot(workdir: Path) -> dict[str, float]:
    return {str(p.relative_to(workdir)): p.stat().st_mtime for p in workdir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_local_sweep_with_a_failing_run_then_skip_status_and_a_bad_key(tmp_path, data_dir):
    """Two tiny runs, two at a time: `mesh.data=2` fails at run time on 1 device (the other run
    completes); re-running starts only the failed one; --status shows both; a sweep with a
    misspelt key stops before anything starts, naming the key and the run, and leaves the runs alone."""
    config = write_config(tmp_path / "tiny.py", "[{'optim.lr': 0.002}, {'mesh.data': 2}]")
    root = tmp_path / "sweep"
    args = [
        f"--config={config}",
        f"--root={root}",
        "--parallel=2",
        "--",
        f"--config.data.data_dir={data_dir}",
    ]
    good, bad = root / "optim.lr=0.002", root / "mesh.data=2"

    t0 = time.monotonic()
    proc = sweep_cli(*args, env=child_env())
    first_s = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    started = [i for i, line in enumerate(out) if " started " in line]
    ended = [i for i, line in enumerate(out) if " finished " in line or " FAILED " in line]
    assert len(started) == 2 and max(started) < min(ended), proc.stdout  # both ran at once
    [failure] = [line for line in proc.stderr.splitlines() if line.startswith("launch/sweep.py:")]
    assert failure.startswith(f"launch/sweep.py: run mesh.data=2 failed (exit code 2); workdir {bad}, ")
    assert f"log {bad}/train.log: dit-jax train: error: config key 'mesh'" in failure
    assert "Traceback" not in proc.stderr
    assert sweeps.checkpoint_steps(str(good)) == [4]
    assert "dit-jax train --config=" in (good / "train.log").read_text()
    assert json.loads((bad / sweeps.MARKER).read_text())["state"] == "failed"

    proc = sweep_cli(f"--config={config}", f"--root={root}", "--status")
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.strip().splitlines()
    assert header.split() == ["run", "state", "step", "loss", "eval", "note"]
    row = {line.split()[0]: line.split() for line in rows}
    assert row["optim.lr=0.002"][1:3] == ["done", "4/4"] and float(row["optim.lr=0.002"][3]) > 0
    assert row["mesh.data=2"][1:3] == ["failed", "-/4"] and row["mesh.data=2"][-3:] == ["exit", "code", "2"]

    before = snapshot(good)
    t0 = time.monotonic()
    proc = sweep_cli(*args, env=child_env())
    rerun_s = time.monotonic() - t0
    assert (
        proc.returncode == 1
        and "2 runs under" in proc.stdout
        and "1 to start; skipped: 1 done" in proc.stdout
    )
    assert snapshot(good) == before  # the finished run was not touched
    assert (bad / "train.log").read_text().count("=== launch/sweep.py ") == 2  # its log is appended to
    print(f"sweep {first_s:.1f} s, re-run {rerun_s:.1f} s")

    proc = sweep_cli(f"--config={config}:typo", f"--root={root}", "--", f"--config.data.data_dir={data_dir}")
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("launch/sweep.py: error: run 3/3 (model.hiden_size=8): unknown config key "
                           "'model.hiden_size'")  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == ["mesh.data=2", "optim.lr=0.002"]
    assert snapshot(good) == before


# ----------------------------------------------------------------------------- state and status


def test_run_state_and_status_table(tmp_path):
    def workdir(name: str, steps: list[int], records: list[dict], marker: dict | None = None) -> str:
        path = tmp_path / name
        for s in steps:
            (path / "checkpoints" / str(s)).mkdir(parents=True)
        (path / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a save cut short
        lines = [json.dumps(r) for r in records] + ['{"step": 7, "lo']  # a line cut by a kill
        (path / "metrics.jsonl").write_text("\n".join(lines))
        if marker:
            sweeps.write_marker(str(path), **marker)
        return str(path)

    records = [
        {"step": 0, "num_params": 10},
        {"step": 5, "loss": 0.5},
        {"step": 5, "eval/class_accuracy": 0.75, "eval/fd_classifier": 3.25},
        {"step": 6, "loss": 0.25},
    ]
    done = workdir("done", [5, 10], records)
    assert sweeps.run_state(done, 10).state == "done"
    state = sweeps.run_state(done, 20)
    assert (state.state, state.step, state.loss) == ("pending", 10, 0.25)
    assert state.eval == {"class_accuracy": 0.75, "fd_classifier": 3.25}
    failed = workdir("failed", [5], records, dict(state="failed", reason="exit code 2"))
    assert (sweeps.run_state(failed, 10).state, sweeps.run_state(failed, 10).note) == (
        "failed",
        "exit code 2",
    )
    running = workdir("running", [], [], dict(state="running", pid=os.getpid()))
    assert sweeps.run_state(running, 10).state == "running"
    gone = workdir("gone", [], [], dict(state="running", pid=2**22 + 12345))  # no such process
    assert sweeps.run_state(gone, 10).state == "pending"
    assert sweeps.run_state(str(tmp_path / "absent"), 10) == sweeps.RunState("pending")

    runs = [sweeps.Run(i, n, str(tmp_path / n), {}, 10) for i, n in enumerate(["done", "failed", "absent"])]
    table = sweeps.status_table(runs, [sweeps.run_state(r.workdir, 10) for r in runs]).splitlines()
    assert table[0].split() == ["run", "state", "step", "loss", "eval", "note"]
    assert table[1].split() == ["done", "done", "10/10", "0.25", "class_accuracy=0.75", "fd_classifier=3.25"]
    assert table[2].split()[:4] == ["failed", "failed", "6/10", "0.25"] and table[2].endswith("exit code 2")
    assert table[3].split() == ["absent", "pending", "-/10", "-", "-"]
