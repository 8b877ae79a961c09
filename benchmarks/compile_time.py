"""Compile time of the train step with scanned vs per-block (unrolled) DiT blocks, one run.

Each variant is planned (`dit-jax plan`: trace, lower and compile the real train step for the
target, deviceless) in its own fresh process with JAX's compilation cache off, alternating variants
`--repeats` times; prints a table and writes one JSON file:

    .venv/bin/python benchmarks/compile_time.py --out=benchmarks/results/compile_time_<date>.json

Default: DiT-XL/2 (28 blocks), float32, `fsdp` over 8 fake CPU devices (`cpu:8`), 2 images per
device, XLA attention.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from record import record


def plan_once(config: str, target: str, scan: bool, extra: list[str]) -> dict:
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "dit_jax", "plan", f"--config={config}", f"--target={target}", "--json",
           f"--config.model.scan_blocks={scan}", *extra]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="dit:variant=XL/2")
    parser.add_argument("--target", default="cpu:8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="")
    parser.add_argument("overrides", nargs="*", help="extra --config.key=value overrides")
    args = parser.parse_args()
    extra = ["--config.batch_size=16", "--config.attention.impl=xla", *args.overrides]
    runs = {"unrolled": [], "scanned": []}
    for i in range(args.repeats):
        for name in ("unrolled", "scanned"):
            p = plan_once(args.config, args.target, name == "scanned", extra)
            runs[name].append({"compile_s": p["compile_s"], "lower_s": p["lower_s"],
                               "temp_bytes_per_device": p["temp_bytes_per_device"]})  # fmt: skip
            print(f"repeat {i}: {name:9s} compile {p['compile_s']:6.1f} s (lowering {p['lower_s']:5.1f} s), "
                  f"temporaries {p['temp_bytes_per_device'] / 2**30:.2f} GiB/device", flush=True)  # fmt: skip
    median = {k: statistics.median(r["compile_s"] for r in v) for k, v in runs.items()}
    ratio = median["scanned"] / median["unrolled"]
    print(f"median compile: unrolled {median['unrolled']:.1f} s, scanned {median['scanned']:.1f} s, "
          f"scanned / unrolled = {ratio:.3f}")  # fmt: skip
    record("compile_time", args.out, config=args.config, target=args.target, overrides=extra, runs=runs,
           median_compile_s=median, scanned_over_unrolled=ratio)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
