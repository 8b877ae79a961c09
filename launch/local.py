"""Runs a dit-jax command as N processes on this machine (multi-process JAX over localhost).

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      train --config=configs/quickstart.py --workdir=runs/mp

Each process sees `devices_per_process` CPU devices (fake ones on a CPU-only machine) and joins
the job through a coordinator on 127.0.0.1. Output of process 0 is shown; the other processes
write to log files in a temporary directory whose path is printed at start.

Failure: the launcher watches the processes. When one exits non-zero or is killed, it stops the
others (SIGTERM, SIGKILL after 10 s), prints one line naming the lost process and exits with its
code (128 + signal number for a signal). Running the same command again resumes from the last
checkpoint. Ctrl-C or SIGTERM to the launcher stops all processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(code: int) -> str:
    """Popen's returncode in words: 'exit code 3' or 'signal SIGKILL'."""
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM to the processes still running, SIGKILL to those still running after `grace_s`."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def watch(procs: list[subprocess.Popen], logs: str, poll_s: float = 0.2) -> int:
    """Waits until all processes exit 0 (returns 0) or one fails (stops the rest, returns non-zero)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = next((i for i, c in enumerate(codes) if c), None)
        if failed is not None:
            stop(procs)
            code = codes[failed]
            log = f" (its log: {os.path.join(logs, f'process_{failed}.log')})" if failed else ""
            print(
                f"launch/local.py: process {failed} exited with {describe(code)}; "
                f"stopped the other processes{log}",
                file=sys.stderr,
                flush=True,
            )
            return 128 - code if code < 0 else code
        if all(c == 0 for c in codes):
            return 0
        time.sleep(poll_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the dit-jax arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    coordinator = f"127.0.0.1:{free_port()}"
    logs = tempfile.mkdtemp(prefix="dit_jax_launch_")
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}",
    )
    procs = []
    for i in range(args.num_processes):
        argv = [
            sys.executable,
            "-m",
            "dit_jax",
            *command[:1],
            f"--coordinator={coordinator}",
            f"--num_processes={args.num_processes}",
            f"--process_id={i}",
            *command[1:],
        ]
        out = None if i == 0 else open(os.path.join(logs, f"process_{i}.log"), "w")  # noqa: SIM115
        procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
    print(
        f"{args.num_processes} processes, coordinator {coordinator}, logs of processes > 0 in {logs}",
        file=sys.stderr,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return watch(procs, logs)
    except (KeyboardInterrupt, SystemExit) as e:
        stop(procs)
        print("launch/local.py: interrupted; stopped all processes", file=sys.stderr)
        return e.code if isinstance(e, SystemExit) else 130


if __name__ == "__main__":
    sys.exit(main())
