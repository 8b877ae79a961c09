"""Training throughput of one process against a job of several processes on this machine.

The same config and global batch train once as 1 process holding all devices and once through
`launch/local.py` as N processes (gloo collectives over localhost), with the same devices in all.
Images per second are the median of the logged `img_per_s` after the first `--skip` records
(compilation and warm-up); prints a table and writes one JSON file:

    .venv/bin/python benchmarks/multiprocess_throughput.py \
        --out=benchmarks/results/multiprocess_throughput_<date>.json

Default: configs/quickstart.py, 2 devices in all (1 process × 2 devices vs 2 processes × 1 device),
300 steps, fsdp over the devices. On a 2-core CPU the processes share the cores, so the figure is
the cost of the multi-process machinery (coordination, gloo all-reduces), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from record import record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def img_per_s(workdir: str, skip: int) -> tuple[float, list[float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["img_per_s"] for r in map(json.loads, f) if "img_per_s" in r]
    return statistics.median(rates[skip:]), rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.py")
    parser.add_argument("--devices", type=int, default=2, help="devices in all")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=2, help="logged records left out (warm-up)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="mp_throughput_")
    train = [f"--config={args.config}", f"--config.total_steps={args.steps}", "--config.log_every=20",
             "--config.checkpoint_every=0", "--config.sample_every=0", "--config.eval_every=0",
             "--config.mesh.data=1", f"--config.mesh.fsdp={args.devices}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    one = os.path.join(root, "one")
    subprocess.run(
        [sys.executable, "-m", "dit_jax", "train", f"--workdir={one}", *train],
        env=dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}"),
        check=True, capture_output=True,
    )  # fmt: skip
    many = os.path.join(root, "many")
    per = args.devices // args.num_processes
    subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "local.py"), f"--num_processes={args.num_processes}",
         f"--devices_per_process={per}", "--", "train", f"--workdir={many}", *train],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    (a, rates_one), (b, rates_many) = img_per_s(one, args.skip), img_per_s(many, args.skip)
    print(f"1 process x {args.devices} devices: {a:8.1f} img/s")
    print(f"{args.num_processes} processes x {per} devices: {b:8.1f} img/s ({b / a:.2f}x)")
    record("multiprocess_throughput", args.out, config=args.config, train_overrides=train,
           one_process_img_per_s=a, many_processes_img_per_s=b, num_processes=args.num_processes,
           ratio=b / a, records={"one": rates_one, "many": rates_many})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
