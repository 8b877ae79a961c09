"""Launchers (launch/): SLURM through an srun shim, launch/local.py losing a process and resuming,
the dry runs of the TPU VM and GKE launchers, and the environment detection of --coordinator=auto."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from dit_jax.parallel import distributed

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


def checkpoint_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def first_metrics(workdir: Path) -> dict:
    with open(workdir / "metrics.jsonl") as f:
        return json.loads(f.readline())


@pytest.mark.slow
def test_slurm_sbatch_runs_a_two_process_job(tmp_path, data_dir, unused_port):
    """`bash launch/slurm.sbatch ARGS` with the srun shim first on PATH: two dit-jax processes
    join one job through --coordinator=auto and the SLURM_* variables, and train on 2 × 4 devices."""
    workdir = tmp_path / "run"
    env = dict(
        os.environ,
        PATH=f"{ROOT / 'tests' / 'slurm_shim'}:{VENV_BIN}:{os.environ['PATH']}",
        JAX_COORDINATOR_PORT=str(unused_port),
        SRUN_SHIM_NTASKS="2",
        SRUN_SHIM_DEVICES="4",
    )
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "slurm.sbatch"),
            "train",
            "--config=quickstart:smoke",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            "--config.total_steps=4",
            "--config.checkpoint_every=2",
            "--config.log_every=1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"srun {VENV_BIN}/dit-jax train " in proc.stderr and "--coordinator=auto" in proc.stderr
    first = first_metrics(workdir)
    assert first["num_processes"] == 2 and first["num_devices"] == 8
    assert checkpoint_steps(workdir) == [2, 4]


def launch_local(workdir: Path, data_dir: str, num_processes: int, devices: int, total_steps: int):
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "launch" / "local.py"),
            f"--num_processes={num_processes}",
            f"--devices_per_process={devices}",
            "--",
            "train",
            "--config=quickstart:smoke",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            f"--config.total_steps={total_steps}",
            "--config.checkpoint_every=2",
            "--config.log_every=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_local_launcher_reports_a_lost_process_and_the_rerun_resumes(tmp_path, data_dir):
    """SIGKILL process 1 of a 2-process job after its first checkpoint: the launcher stops
    process 0 at once and says in one line which process was lost; the same command on another
    layout (1 process × 4 devices) resumes from the newest checkpoint, data position included."""
    workdir = tmp_path / "run"
    launcher = launch_local(workdir, data_dir, num_processes=2, devices=4, total_steps=10_000)
    try:
        wait_for(lambda: checkpoint_steps(workdir) or launcher.poll() is not None, 240, "a checkpoint")
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        [process_1] = [p for p in psutil.Process(launcher.pid).children() if "--process_id=1" in p.cmdline()]
        process_1.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert time.monotonic() - killed < 120
    assert launcher.returncode == 128 + signal.SIGKILL
    lines = [line for line in stderr.splitlines() if line.startswith("launch/local.py:")]
    assert len(lines) == 1 and lines[0].startswith(
        "launch/local.py: process 1 exited with signal SIGKILL; stopped the other processes"
    ), stderr[-3000:]
    assert "Check failure" not in stderr and "Fatal Python error" not in stderr, stderr[-3000:]

    newest = checkpoint_steps(workdir)[-1]
    rerun = launch_local(workdir, data_dir, num_processes=1, devices=4, total_steps=newest + 2)
    _, stderr = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, stderr[-3000:]
    assert f"resumed from step {newest} " in stderr
    assert checkpoint_steps(workdir)[-1] == newest + 2
    data_state = (workdir / "checkpoints" / str(newest + 2) / "data" / "metadata").read_text()
    assert json.loads(data_state)["next_index"] == newest + 2  # the data stream continued


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "tpu_vm.sh"),
            "--dry_run",
            "--name=dit-v5p",
            "--zone=us-east5-a",
            "--accelerator=v5p-32",
            "--version=v2-alpha-tpuv5",
            "--",
            "--config=configs/imagenet256.py",
            "--workdir=gs://bucket/runs/xl2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    create = next(line for line in lines if " tpu-vm create " in line)
    assert "--accelerator-type=v5p-32" in create and "--version=v2-alpha-tpuv5" in create
    assert "--zone=us-east5-a" in create and "dit-v5p" in create
    ssh = [line for line in lines if " tpu-vm ssh " in line]
    assert len(ssh) == 2 and all("--worker=all" in line and "dit-v5p" in line for line in ssh)
    assert "pip install" in ssh[0]
    assert re.search(
        r"dit-jax train --config=configs/imagenet256.py --workdir=gs://bucket/runs/xl2 "
        r"--coordinator=auto",
        ssh[1],
    ), ssh[1]


@pytest.mark.parametrize("accelerator", ["tpu", "gpu"])
def test_gke_render_fills_the_jobset(accelerator):
    flags = {
        "tpu": ["--tpu=v5p", "--topology=4x4x4", "--hosts=16", "--chips_per_host=4"],
        "gpu": ["--gpu=nvidia-h100-80gb", "--hosts=4", "--chips_per_host=8"],
    }[accelerator]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "gke" / "render.py"),
            "--name=xl2",
            "--image=us-docker.pkg.dev/p/r/dit-jax:1",
            *flags,
            "--dry_run",
            "--",
            "--config=configs/imagenet256.py",
            "--workdir=gs://bucket/runs/xl2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = yaml.safe_load(proc.stdout)
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    [rjob] = manifest["spec"]["replicatedJobs"]
    hosts = 16 if accelerator == "tpu" else 4
    job = rjob["template"]["spec"]
    assert job["parallelism"] == job["completions"] == hosts and job["completionMode"] == "Indexed"
    pod = job["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "us-docker.pkg.dev/p/r/dit-jax:1"
    assert container["command"] == [
        "dit-jax",
        "train",
        "--config=configs/imagenet256.py",
        "--workdir=gs://bucket/runs/xl2",
        "--coordinator=auto",
    ]
    limits = container["resources"]["limits"]
    if accelerator == "tpu":
        assert limits == {"google.com/tpu": 4}
        assert pod["nodeSelector"] == {
            "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
            "cloud.google.com/gke-tpu-topology": "4x4x4",
        }
    else:
        assert limits == {"nvidia.com/gpu": 8}
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        env = {e["name"]: e for e in container["env"]}
        assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "xl2-workers-0-0.xl2:8476"
        assert env["JAX_NUM_PROCESSES"]["value"] == "4"
        assert "job-completion-index" in env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]


def test_gke_render_rejects_a_tpu_topology_that_does_not_match_the_hosts():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "gke" / "render.py"),
            "--name=xl2",
            "--image=img",
            "--tpu=v5p",
            "--topology=4x4x4",
            "--hosts=8",
            "--chips_per_host=4",
            "--dry_run",
            "--",
            "--workdir=w",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("render.py: error: topology 4x4x4 has 64 chips")


SLURM = dict(
    SLURM_JOB_ID="4242",
    SLURM_NTASKS="16",
    SLURM_PROCID="9",
    SLURM_LOCALID="1",
    SLURM_NODEID="1",
    SLURM_STEP_NODELIST="gpu[003-004,9]",
    SLURM_STEP_TASKS_PER_NODE="8(x2)",
)


def test_auto_detects_slurm_one_task_per_gpu():
    join = distributed.detect("auto", None, None, SLURM)
    assert join.coordinator == f"gpu003:{61440 + 4242 % 4096}"
    assert (join.num_processes, join.process_id, join.local_device_ids) == (16, 9, [1])


def test_auto_detects_slurm_one_task_per_node_and_bound_gpus():
    per_node = dict(SLURM, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_STEP_TASKS_PER_NODE="1(x2)")
    assert distributed.detect("auto", None, None, per_node).local_device_ids == []  # all GPUs
    bound = dict(SLURM, CUDA_VISIBLE_DEVICES="5", JAX_COORDINATOR_PORT="1234", SLURM_NODELIST="x")
    join = distributed.detect("auto", None, None, bound)
    assert join.local_device_ids == [] and join.coordinator == "gpu003:1234"


def test_auto_detects_a_launcher_environment_then_leaves_the_rest_to_jax():
    env = dict(
        JAX_COORDINATOR_ADDRESS="xl2-workers-0-0.xl2:8476", JAX_NUM_PROCESSES="4", JOB_COMPLETION_INDEX="3"
    )
    join = distributed.detect("auto", None, None, env)
    assert (join.coordinator, join.num_processes, join.process_id) == ("xl2-workers-0-0.xl2:8476", 4, 3)
    assert distributed.detect("auto", None, None, {"TPU_WORKER_ID": "0"}) == distributed.Join(
        "JAX cluster detection"
    )
    assert distributed.detect(None, None, None, SLURM) is None
    with pytest.raises(distributed.DistributedError, match="needs --num_processes"):
        distributed.detect("10.0.0.1:1234", 2, None)


def test_slurm_node_lists():
    assert distributed.first_host("node001") == "node001"
    assert distributed.first_host("node001,host2") == "node001"
    assert distributed.first_host("node[001,007-015],host2") == "node001"
    assert distributed.first_host("rack[2-3]-n[07-09]") == "rack2-n07"
    assert distributed.tasks_on_node("4(x2),1", 2) == 1
