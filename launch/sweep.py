"""Runs the sweep of a config file: one `dit-jax train` per run, each in its own workdir under --root.

  python launch/sweep.py --config=configs/scaling.py --parallel=2         # here, 2 runs at a time
  python launch/sweep.py --config=configs/scaling.py --status             # a table of the runs
  python launch/sweep.py --config=scaling:smoke --dry_run -- --config.data.data_dir=/tmp/datasets
  python launch/sweep.py --config=dit:variant=B/2 --root=/shared/sweeps/b2 --launcher=slurm \
      --launcher_args='--nodes=2'
  python launch/sweep.py --config=... --root=/mnt/shared/sweeps/s --launcher=tpu_vm \
      --launcher_args='--name=sweep --zone=us-east5-a --accelerator=v5p-8'
  python launch/sweep.py --config=... --root=/mnt/shared/sweeps/s --launcher=gke \
      --launcher_args='--image=IMAGE --tpu=v5p --topology=2x2x1 --hosts=1'

The config file's `sweep(arg)` lists the runs (dit_jax/sweeps.py); every run is checked against the
config before anything starts. Each run's workdir is ROOT/NAME, NAME its overrides
(`model.hidden_size=64,total_steps=300`); arguments after `--` go to every `dit-jax train`.

Launchers: `local` runs `dit-jax train` --parallel at a time on this machine, output appended to
WORKDIR/train.log. `slurm` submits `sbatch [--launcher_args] launch/slurm.sbatch TRAIN_ARGS` per run
(output to WORKDIR/train.log). `tpu_vm` runs launch/tpu_vm.sh per run, --parallel at a time, on
slices NAME-0 … NAME-(parallel-1) (one slice NAME when --parallel=1); run i uses slice i mod
parallel. `gke` applies launch/gke/render.py's JobSet per run, named NAME-<hash of the run>.
--dry_run prints one line per run, `WORKDIR  COMMAND`, and starts nothing.

Re-running the same command skips finished runs (a checkpoint at total_steps) and runs that are
running, and starts the others again: `dit-jax train` resumes each from its newest checkpoint.
A failed run does not stop the others; each is named at the end, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque

from dit_jax import sweeps

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
PROG = "launch/sweep.py"
INTERRUPT_GRACE_S = 60.0  # a run stopped by Ctrl-C finishes its checkpoint save within this


@dataclasses.dataclass(eq=False)
class Job:
    run: sweeps.Run
    command: list[str]
    slot: int = 0

    @property
    def log(self) -> str:
        return os.path.join(self.run.workdir, sweeps.LOG)


def script(relative: str) -> str:
    """A launcher script's path, relative to the current directory when it lies below it."""
    path = os.path.join(LAUNCH_DIR, relative)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def dit_jax_command() -> list[str]:
    """`dit-jax` when the one on PATH belongs to this Python, else `python -m dit_jax`."""
    found = shutil.which("dit-jax")
    if found and os.path.dirname(found) == os.path.dirname(sys.executable):
        return ["dit-jax"]
    return [sys.executable, "-m", "dit_jax"]


def _pop_flag(args: list[str], flag: str) -> str | None:
    """The value of `--flag=VALUE` in `args` (removed from it), or None."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            del args[i]
            return a.partition("=")[2]
    return None


def build_jobs(args: argparse.Namespace, runs: list[sweeps.Run], extra: list[str]) -> list[Job]:
    """The launch command of every run in `runs` (run i on slot i mod --parallel); ValueError for
    launcher arguments that cannot work."""
    largs = shlex.split(args.launcher_args)
    jobs = []
    if args.launcher == "tpu_vm":
        name = _pop_flag(largs, "--name")
        if not name:
            raise ValueError(
                "--launcher=tpu_vm needs --launcher_args='--name=SLICE --zone=ZONE --accelerator=TYPE' "
                "(see launch/tpu_vm.sh)"
            )
    if args.launcher == "gke":
        prefix = _pop_flag(largs, "--name") or "dit-sweep"
        if not re.fullmatch(r"[a-z]([a-z0-9-]{0,28}[a-z0-9])?", prefix):
            raise ValueError(f"--name={prefix}: a JobSet name prefix is 1-30 of a-z, 0-9 and '-'")
    for i, run in enumerate(runs):
        train = [f"--config={args.config}", f"--workdir={run.workdir}", *sweeps.override_args(run.overrides)]
        train += extra
        slot = i % args.parallel
        if args.launcher == "local":
            command = [*dit_jax_command(), "train", *train]
        elif args.launcher == "slurm":
            log = os.path.join(run.workdir, sweeps.LOG)
            opts = [f"--job-name={run.name}", f"--output={log}", "--open-mode=append"]
            command = ["sbatch", *opts, *largs, script("slurm.sbatch"), *train]
        elif args.launcher == "tpu_vm":
            slice_name = f"{name}-{slot}" if args.parallel > 1 else name
            command = [script("tpu_vm.sh"), f"--name={slice_name}", *largs, "--", *train]
        else:
            jobset = f"{prefix}-{sweeps.short_hash(run.name)}"
            command = [sys.executable, script("gke/render.py"), f"--name={jobset}", *largs, "--", *train]
        jobs.append(Job(run, command, slot))
    return jobs


# ----------------------------------------------------------------------------- scheduler state


def _query(command: list[str]) -> subprocess.CompletedProcess | None:
    if not shutil.which(command[0]):
        return None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def refine(state: sweeps.RunState, workdir: str) -> sweeps.RunState:
    """A run submitted to SLURM or GKE: running while the scheduler still has its job, else failed
    (it ended before total_steps); stays `submitted` when the scheduler cannot be asked from here."""
    if state.state != "submitted":
        return state
    marker = sweeps.read_marker(workdir)
    job = str(marker.get("job_id", ""))
    if marker.get("launcher") == "slurm":
        out = _query(["squeue", "-h", "-j", job, "-o", "%T"])
        active = None if out is None else out.returncode == 0 and bool(out.stdout.strip())
    elif marker.get("launcher") == "gke":
        out = _query(["kubectl", "get", "jobset", job, "-o", "jsonpath={.status.terminalState}"])
        active = None if out is None else out.returncode == 0 and not out.stdout.strip()
    else:
        active = None
    if active is None:
        return state
    note = state.note if active else f"{state.note} ended before total_steps"
    return dataclasses.replace(state, state="running" if active else "failed", note=note)


# ----------------------------------------------------------------------------- running


def last_line(path: str) -> str:
    """The last non-empty line of a log (progress bars included), at most 200 characters."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1][:200] if lines else ""


def describe(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class Pool:
    """Runs blocking jobs (local, tpu_vm) `parallel` at a time; with `by_slot`, job i on worker i mod N."""

    def __init__(self, jobs: list[Job], parallel: int, by_slot: bool, count: int):
        self.queues = [deque(j for j in jobs if j.slot == k) for k in range(parallel)] if by_slot else None
        self.shared = deque(jobs)
        self.parallel, self.count = parallel, count
        self.lock = threading.Lock()
        self.stopping = False
        self.procs: dict[Job, subprocess.Popen] = {}
        self.failed: list[tuple[Job, str]] = []
        self.finished = 0

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)

    def _next(self, k: int) -> Job | None:
        with self.lock:
            queue = self.queues[k] if self.queues is not None else self.shared
            return None if self.stopping or not queue else queue.popleft()

    def _run(self, job: Job) -> None:
        run, tag = job.run, f"[{job.run.index + 1}/{self.count}]"
        os.makedirs(run.workdir, exist_ok=True)
        with open(job.log, "a") as log:
            log.write(f"\n=== {PROG} {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(job.command)}\n")
            log.flush()
            proc = subprocess.Popen(
                job.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        with self.lock:
            self.procs[job] = proc
            if self.stopping:
                proc.send_signal(signal.SIGINT)
        sweeps.write_marker(run.workdir, "running", pid=proc.pid, command=job.command)
        self.say(f"{tag} started {run.name} (log: {job.log})")
        t0 = time.monotonic()
        code = proc.wait()
        if code == 0:
            sweeps.write_marker(run.workdir, "finished")
            self.say(f"{tag} finished {run.name} in {time.monotonic() - t0:.0f} s")
            with self.lock:
                self.finished += 1
        elif self.stopping:
            sweeps.write_marker(run.workdir, "interrupted", reason=describe(code))
        else:
            sweeps.write_marker(run.workdir, "failed", reason=describe(code))
            self.say(f"{tag} FAILED {run.name} ({describe(code)})")
            with self.lock:
                self.failed.append((job, describe(code)))

    def _worker(self, k: int) -> None:
        while (job := self._next(k)) is not None:
            self._run(job)

    def run(self) -> bool:
        """Runs every job; False when interrupted (the running jobs were stopped)."""
        workers = [
            threading.Thread(target=self._worker, args=(k,), daemon=True) for k in range(self.parallel)
        ]
        for w in workers:
            w.start()
        try:
            while any(w.is_alive() for w in workers):
                for w in workers:
                    w.join(0.2)
            return True
        except KeyboardInterrupt:
            with self.lock:
                self.stopping = True
                running = [(job, p) for job, p in self.procs.items() if p.poll() is None]
            print(f"{PROG}: interrupted; stopping {len(running)} running run(s) (their checkpoints are kept)")
            for _, p in running:
                p.send_signal(signal.SIGINT)  # dit-jax train finishes a save in flight, then exits
            deadline = time.monotonic() + INTERRUPT_GRACE_S
            for job, p in running:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                sweeps.write_marker(job.run.workdir, "interrupted", reason=describe(p.returncode))
            for w in workers:
                w.join(10)
            return False


def submit(jobs: list[Job], launcher: str, count: int) -> tuple[list[tuple[Job, str]], int]:
    """Submits non-blocking jobs (slurm, gke) one after another: (failed submissions, submitted)."""
    failed, submitted = [], 0
    for job in jobs:
        run, tag = job.run, f"[{job.run.index + 1}/{count}]"
        os.makedirs(run.workdir, exist_ok=True)  # sbatch writes --output there
        proc = subprocess.run(job.command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            tool = "sbatch" if launcher == "slurm" else "render.py | kubectl apply"
            reason = f"{tool} {describe(proc.returncode)}: {last_line_of(proc.stderr or proc.stdout)}"
            sweeps.write_marker(run.workdir, "failed", reason=f"not submitted: {reason}")
            print(f"{tag} FAILED to submit {run.name} ({reason})", flush=True)
            failed.append((job, reason))
            continue
        if launcher == "slurm":
            found = re.search(r"Submitted batch job (\d+)", proc.stdout)
            job_id = found[1] if found else ""
            label = f"slurm job {job_id}"
        else:
            job_id = _pop_flag(list(job.command), "--name") or ""
            label = f"jobset {job_id}"
        sweeps.write_marker(run.workdir, "submitted", launcher=launcher, job_id=job_id, job=label)
        print(f"{tag} submitted {run.name}: {label}", flush=True)
        submitted += 1
    return failed, submitted


def last_line_of(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


# ----------------------------------------------------------------------------- main

TOOLS = {"slurm": "sbatch", "tpu_vm": "gcloud", "gke": "kubectl"}
SKIP = ("done", "running", "submitted")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--config", required=True, help="PATH.py[:arg] or NAME[:arg] of a config with sweep()"
    )
    parser.add_argument("--launcher", choices=["local", "slurm", "tpu_vm", "gke"], default="local")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (local, tpu_vm)")
    parser.add_argument("--root", help="the runs' parent folder (default runs/sweeps/<config>[_<arg>])")
    parser.add_argument(
        "--dry_run", action="store_true", help="print `WORKDIR  COMMAND` per run; start nothing"
    )
    parser.add_argument("--status", action="store_true", help="print a table of the runs' states")
    parser.add_argument("--launcher_args", default="", help="options for the launcher script, one string")
    parser.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="-- then arguments for every dit-jax train"
    )
    args = parser.parse_args(argv)
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    for a in extra:
        if a.startswith(("--workdir", "--config=")):
            parser.error(
                f"{a}: the sweep sets --config and --workdir of every run; pass --config/--root instead"
            )
    args.root = args.root or sweeps.default_root(args.config)
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    try:
        runs = sweeps.expand(args.config, args.root, extra)
        states = [refine(sweeps.run_state(r.workdir, r.total_steps), r.workdir) for r in runs]
        if args.status:
            print(sweeps.status_table(runs, states))
            return 0
        # Done, running, and submitted to a scheduler that cannot be asked: not started again.
        todo = build_jobs(args, [r for r, s in zip(runs, states, strict=True) if s.state not in SKIP], extra)
    except (ValueError, FileNotFoundError) as e:  # SweepError, ConfigError, a config's own arg check
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        commands = {job.run.index: job.command for job in todo}
        for run, s in zip(runs, states, strict=True):
            if run.index in commands:
                print(f"{shlex.quote(run.workdir)}  {shlex.join(commands[run.index])}")
            else:
                print(f"# {shlex.quote(run.workdir)}  {s.state} ({s.note or f'step {s.step}'}): skipped")
        return 0

    skipped = [s.state for s in states if s.state in SKIP]
    counts = ", ".join(f"{skipped.count(k)} {k}" for k in SKIP if k in skipped)
    print(
        f"{PROG}: {len(runs)} runs under {args.root}: {len(todo)} to start"
        + (f"; skipped: {counts}" if counts else ""),
        flush=True,
    )
    tool = TOOLS.get(args.launcher)
    if todo and tool and not shutil.which(tool):
        print(
            f"{PROG}: error: --launcher={args.launcher} needs {tool} on PATH; nothing started",
            file=sys.stderr,
        )
        return 2
    if args.launcher in ("local", "tpu_vm"):
        pool = Pool(todo, args.parallel, by_slot=args.launcher == "tpu_vm", count=len(runs))
        # Ctrl-C and SIGTERM stop the runs gently. A SIGINT that a non-interactive shell told this
        # process to ignore would also be ignored by the runs (they inherit it): handle it here.
        previous = [signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)]
        try:
            completed = pool.run()
        finally:
            for s, handler in zip((signal.SIGINT, signal.SIGTERM), previous, strict=True):
                signal.signal(s, handler)
        failed, started = pool.failed, pool.finished
        if not completed:
            print(
                f"{PROG}: interrupted; re-run the same command to resume the unfinished runs", file=sys.stderr
            )
            return 130
    else:
        failed, started = submit(todo, args.launcher, len(runs))
    blocking = args.launcher in ("local", "tpu_vm")
    for job, reason in sorted(failed, key=lambda f: f[0].run.index):
        if blocking:
            tail = last_line(job.log)
            where = f"workdir {job.run.workdir}, log {job.log}" + (f": {tail}" if tail else "")
            print(f"{PROG}: run {job.run.name} failed ({reason}); {where}", file=sys.stderr)
        else:
            print(f"{PROG}: run {job.run.name} was not submitted ({reason}); workdir {job.run.workdir}",
                  file=sys.stderr)  # fmt: skip
    verb = "finished" if blocking else "submitted"
    print(f"{PROG}: {started} {verb}, {len(failed)} failed, {len(skipped)} skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
