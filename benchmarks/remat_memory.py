"""Per-device temporaries of the train step by block layout and remat policy, compiled deviceless.

Plans (`dit-jax plan`, in a fresh process each) the train step of one config with per-block blocks
and `remat=none`, then with scanned blocks under each remat policy, and prints per variant the
temporaries and total bytes per device, the compile time and how many times the compiled program
calls the forward attention kernel and the backward's dQ kernel (a scanned program holds each loop
body once: forward 1 / dQ 1 = the forward loop's call and the backward loop's; forward 2 / dQ 1 =
the backward loop runs the forward kernel again):

    .venv-aot/bin/python benchmarks/remat_memory.py --out=benchmarks/results/remat_memory_v5p_<date>.json

Default: DiT-XL/2, bf16, Pallas attention, fsdp over a TPU v5p 2x2x1 slice (4 chips), 2 images
per chip. A scan keeps every residual of a block as a stacked loop output, where XLA would fuse the
elementwise ones of per-block blocks into their consumers; `save_dots` (the scanned default) keeps
only matmul outputs (also the experts') and the attention kernel's output and LSE; `offload` moves
them to host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from record import record

# Attention kernel calls in compiled HLO: the forward (Mosaic TPU by kernel name; on sm_90 the Mosaic
# GPU forward, the only Mosaic GPU call beside the Triton backward; else the Triton forward by name)
# and the backward's dQ kernel. XLA may peel a loop iteration (host offloading does), which doubles
# both counts; more forward than dQ calls means the backward pass runs the forward kernel again.
FORWARD_KERNEL = re.compile(r"flash_fwd_tpu|custom_call_target=\"mosaic_gpu(?:_v2)?\"|flash_fwd_gpu")
DQ_KERNEL = re.compile(r"flash_dq_(?:tpu|gpu)")
VARIANTS = (("per-block", False, "none"), ("scanned", True, "none"), ("scanned", True, "save_dots"),
            ("scanned", True, "offload"), ("scanned", True, "full"))  # fmt: skip


def plan_once(config: str, target: str, scan: bool, remat: str, extra: list[str]) -> dict:
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false", JAX_PLATFORMS="cpu",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_SKIP_MDS_QUERY="1")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        hlo_path = os.path.join(tmp, "step.hlo")
        cmd = [sys.executable, "-m", "dit_jax", "plan", f"--config={config}", f"--target={target}", "--json",
               f"--dump_hlo={hlo_path}", f"--config.model.scan_blocks={scan}",
               f"--config.model.remat={remat}", *extra]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}")
        with open(hlo_path) as f:
            calls = [line for line in f if "custom-call(" in line]
    forward = sum(1 for line in calls if FORWARD_KERNEL.search(line))
    dq = sum(1 for line in calls if DQ_KERNEL.search(line))
    p = json.loads(out.stdout.strip().splitlines()[-1])
    keys = ("temp_bytes_per_device", "total_bytes_per_device")
    return {**{k: p[k] for k in keys}, "compile_s": round(p["compile_s"], 1), "forward_kernel_calls": forward,
            "dq_kernel_calls": dq}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="dit:variant=XL/2")
    parser.add_argument("--target", default="tpu:v5p:2x2x1")
    parser.add_argument("--devices", type=int, default=4, help="mesh.fsdp (the target's device count)")
    parser.add_argument("--out", default="")
    parser.add_argument("overrides", nargs="*", help="extra --config.key=value overrides")
    args = parser.parse_args()
    extra = ["--config.model.dtype=bfloat16", "--config.attention.impl=pallas", "--config.mesh.data=1",
             f"--config.mesh.fsdp={args.devices}", f"--config.batch_size={2 * args.devices}",
             *args.overrides]  # fmt: skip
    runs = []
    for layout, scan, remat in VARIANTS:
        r = {"layout": layout, "remat": remat, **plan_once(args.config, args.target, scan, remat, extra)}
        runs.append(r)
        print(f"{layout:9s} remat={remat:9s} temporaries {r['temp_bytes_per_device'] / 2**30:5.2f} GiB/dev, "
              f"total {r['total_bytes_per_device'] / 2**30:5.2f} GiB, compile {r['compile_s']:6.1f} s, "
              f"attention kernel calls forward {r['forward_kernel_calls']} / dQ {r['dq_kernel_calls']}",
              flush=True)  # fmt: skip
    record("remat_memory", args.out, config=args.config, target=args.target, overrides=extra, runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
