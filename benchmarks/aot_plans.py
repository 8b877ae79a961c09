"""`dit-jax plan` of one config on several targets, recorded as one JSON file (README "Hardware").

Each target compiles in its own process (a GPU architecture mismatch aborts a process), deviceless,
in the ahead-of-time environment:

    JAX_PLATFORMS=cpu .venv-aot/bin/python benchmarks/aot_plans.py \
        --out=benchmarks/results/aot_plan_dit_xl2_<date>.json

Defaults: DiT-XL/2, bf16 compute, `fsdp` preset over every device of the target (`--expert=E`: mesh
expert=E, fsdp = devices / E, preset `fsdp_tp_ep`; trailing `--config.*` overrides pass through), 2 images per
device, `attention.impl=pallas`; targets v5e (2x2), v5p (2x2x1), v6e (2x2), H100 and H200 (1x8).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import jax

TARGETS = ("tpu:v5e:2x2", "tpu:v5p:2x2x1", "tpu:v6e:2x2", "gpu:h100:1x8", "gpu:h200:1x8")
KEEP = ("target", "device_kind", "num_devices", "batch_size", "num_params", "state_bytes_total",
        "state_bytes_per_device", "temp_bytes_per_device", "total_bytes_per_device", "device_memory_bytes",
        "fits", "flops_per_step", "model_flops_per_step", "custom_calls", "kernels", "compile_s",
        "compile_error")  # fmt: skip


def devices(target: str) -> int:
    """Device count from the target name (tpu:v5p:2x2x1 -> 4 chips; v5p counts megacore chips)."""
    shape = [int(n) for n in target.rsplit(":", 1)[1].split("x")]
    return shape[0] * shape[1] * (shape[2] if len(shape) > 2 else 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="dit:variant=XL/2")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--per_device_batch", type=int, default=2)
    parser.add_argument("--attention", default="pallas")
    parser.add_argument("--expert", type=int, default=1, help="mesh.expert (with the fsdp_tp_ep preset)")
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", help="more --config.key=value overrides")
    args = parser.parse_args()
    rows = []
    for target in args.targets:
        n = devices(target)
        overrides = ["--config.model.dtype=bfloat16", "--config.mesh.data=1",
                     f"--config.mesh.fsdp={n // args.expert}", f"--config.mesh.expert={args.expert}",
                     f"--config.batch_size={n * args.per_device_batch}",
                     f"--config.attention.impl={args.attention}", *args.overrides]  # fmt: skip
        if args.expert > 1:
            overrides.append("--config.mesh.rules=fsdp_tp_ep")
        cmd = [
            sys.executable,
            "-m",
            "dit_jax",
            "plan",
            f"--config={args.config}",
            f"--target={target}",
            "--json",
        ]
        cmd += overrides
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        lines = proc.stdout.strip().splitlines()
        if lines and lines[-1].startswith("{"):  # the report (also of a plan that does not fit: exit 2)
            row = {k: json.loads(lines[-1]).get(k) for k in KEEP}
        else:
            row = dict(target=target, error=(proc.stderr or proc.stdout).strip().splitlines()[-1])
        row["command"] = " ".join(["dit-jax", *cmd[3:]])
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(
        jax=jax.__version__, date=datetime.date.today().isoformat(), host="2-core CPU, deviceless AOT"
    )
    with open(args.out, "w") as f:
        json.dump(meta | dict(config=args.config, overrides=args.overrides, plans=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
