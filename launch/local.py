"""Runs a dit-jax command as N processes on this machine (multi-process JAX over localhost).

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      train --config=configs/quickstart.py --workdir=runs/mp

Each process sees `devices_per_process` CPU devices (fake ones on a CPU-only machine) and joins
the job through a coordinator on 127.0.0.1. Output of process 0 is shown; the other processes
write to log files in a temporary directory whose path is printed at start. Exit code: the
first non-zero exit code of any process.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
