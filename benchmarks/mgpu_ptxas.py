"""Registers, spills and shared memory of the Mosaic GPU attention forward, compiled deviceless for H100.

    JAX_PLATFORMS=cpu .venv-aot/bin/python benchmarks/mgpu_ptxas.py [--out benchmarks/results/...json]

Each case compiles in its own subprocess (`--case NAME`) with MOSAIC_GPU_DUMP_PTXAS=1, so that ptxas'
report belongs to one kernel. ptxas sees the whole kernel at the launch's register budget (65536 /
384 threads = 168); the warpgroups then re-balance with setmaxnreg (consumers 232, producer 40).
Shared memory is what Mosaic GPU allocates dynamically (ptxas reports only static shared memory):
read from Mosaic's own check by lowering once under an artificial 0-byte limit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = "gpu:h100:1x1"
SEQ, HEADS = 4096, 16
CASES = {  # name: (head_dim, mask expression)
    "full_d64": (64, "masks.Full()"),
    "full_d128": (128, "masks.Full()"),
    "local1d_d64": (64, "masks.Local1D(256, 256)"),
    "local1d_d128": (128, "masks.Local1D(256, 256)"),
    "neighborhood2d_d128": (128, "masks.Neighborhood2D((64, 64), (13, 13))"),
    "frametile_d128": (128, "masks.FrameTile(16, 256, 1, 1)"),
}


def compile_case(name: str) -> dict:
    """Lowers and compiles one case (in this process); returns shapes, stages and shared memory."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.mosaic import gpu as mosaic_gpu

    sys.path.insert(0, REPO)
    from dit_jax.parallel import targets
    from pallas_kernels import masks, pallas_mgpu  # noqa: F401 - masks is used by eval

    head_dim, mask_text = CASES[name]
    mask = eval(mask_text)
    mesh = targets.get(TARGET).mesh((1,), ("data",))
    spec = jax.sharding.PartitionSpec()
    sds = jax.ShapeDtypeStruct((1, SEQ, HEADS, head_dim), jnp.bfloat16)

    def f(q, k, v):
        return pallas_mgpu.attention(q, k, v, mask=mask, scale=head_dim**-0.5)

    def lower():
        mapped = jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
        return jax.jit(mapped).lower(sds, sds, sds)

    with jax.set_mesh(mesh):
        smem = None
        with mosaic_gpu.core.artificial_shared_memory_limit(0):
            try:
                lower()
            except ValueError as e:
                found = re.search(r"smem_bytes=(\d+)", str(e))
                smem = int(found.group(1)) if found else None
        lower().compile()
    plan = pallas_mgpu.default_config(mask, 1.0, SEQ, SEQ, head_dim, jnp.bfloat16, False, None).plan()
    return {
        "shape_q_k_v": [1, SEQ, HEADS, head_dim],
        "dtype": "bfloat16",
        "mask": mask_text,
        "tile_density": round(plan.density, 4),
        "kv_stages": pallas_mgpu.stages(pallas_mgpu.padded_head_dim(head_dim), 2, 227 * 1024),
        "blocks": {
            "q_per_cta": pallas_mgpu.BLOCK_Q,
            "q_per_warpgroup": pallas_mgpu.WG_ROWS,
            "kv": pallas_mgpu.BLOCK_KV,
        },  # fmt: skip
        "dynamic_smem_bytes": smem,
    }


def parse_ptxas(text: str) -> dict:
    def ints(pattern):
        return [int(x) for x in re.findall(pattern, text)]

    return {
        "arch": sorted(set(re.findall(r"for '(sm_\w+)'", text))),
        "kernels": sorted(set(re.findall(r"Compiling entry function '(\w+)'", text))),
        "registers": ints(r"Used (\d+) registers"),
        "barriers": ints(r"used (\d+) barriers"),
        "spill_store_bytes": ints(r"(\d+) bytes spill stores"),
        "spill_load_bytes": ints(r"(\d+) bytes spill loads"),
        "stack_frame_bytes": ints(r"(\d+) bytes stack frame"),
        "static_smem_bytes": ints(r"(\d+) bytes smem"),
    }


def run_case(name: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MOSAIC_GPU_DUMP_PTXAS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stdout[-2000:]}
    row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    row["ptxas"] = parse_ptxas(proc.stdout)
    row["ptxas_lines"] = [
        line.strip() for line in proc.stdout.splitlines() if "ptxas" in line or "bytes" in line
    ]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="compile one case in this process (internal)")
    parser.add_argument("--out", help="write the JSON here as well as to stdout")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(compile_case(args.case)), flush=True)
        return
    import jax

    result = {
        "date": datetime.date.today().isoformat(),
        "benchmark": "ptxas report of pallas_kernels.pallas_mgpu's forward kernel (flash_fwd_mgpu), "
        f"compiled deviceless for {TARGET} (sm_90a) on a CPU host; no timing",
        "command": "JAX_PLATFORMS=cpu .venv-aot/bin/python benchmarks/mgpu_ptxas.py "
        + (f"--out {args.out}" if args.out else ""),
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "kernel": {
            "warpgroups": "2 consumers (setmaxnreg 232) + 1 TMA producer (setmaxnreg 40)",
            "launch_register_budget": "65536 / 384 threads = 168 per thread at launch",
        },  # fmt: skip
        "cases": {name: run_case(name) for name in CASES},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
