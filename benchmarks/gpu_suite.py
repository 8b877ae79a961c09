"""The GPU benchmark suite: one run on a lent H100/H200 (<= 8 minutes), one JSON file of results.

1. Attention kernels: forward and backward TF/s of every kernel (`pallas_gpu` = the Triton kernel,
   `pallas_mgpu` = the Mosaic GPU Hopper kernel, `cudnn`) at head_dim 64/128, seq 4k-16k, bf16, on
   dense attention, Neighborhood2D (~10 % density) and FrameTile (~20 %); each row also holds the
   ratio to cuDNN on the same shape and to the KERNELS.md target of its tier.
2. DiT-XL/2 bf16 train step on one GPU at the largest per-GPU batch that `dit-jax plan` says fits
   (deviceless compile for this GPU's target, so the search allocates nothing), with remat when
   even the smallest batch needs it; step time, img/s and MFU.

    bash benchmarks/gpu_suite.sh                     # on the GPU machine
    bash benchmarks/gpu_suite.sh --dry_run           # on CPU: tiny shapes, same code paths and JSON

Every case has a time budget share; a case that fails or is unsupported is recorded with its reason
(never dropped), and cases past the budget are recorded as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as attention_bench  # noqa: E402  (benchmarks/attention.py: timing and masks)
import train_step as train_bench  # noqa: E402  (benchmarks/train_step.py: the timed train step)

# KERNELS.md targets on H100 SXM, bf16, non-causal, seq 4k-16k (TF/s): (tier, direction, head_dim).
TARGETS = {
    ("pallas_gpu", "fwd", 128): 330, ("pallas_gpu", "fwd", 64): 280, ("pallas_gpu", "bwd", 128): 220,
    ("pallas_mgpu", "fwd", 128): 550, ("pallas_mgpu", "fwd", 64): 420, ("pallas_mgpu", "bwd", 128): 400,
}  # fmt: skip
GPU_CASES = dict(impls=["cudnn", "pallas_gpu", "pallas_mgpu"], head_dims=[64, 128], seqs=[4096, 16384],
                 masks=["full", "neighborhood2d", "frametile"], heads=16, iters=10)  # fmt: skip
DRY_CASES = dict(impls=["dense", "pallas_gpu"], head_dims=[64], seqs=[256], masks=["full", "neighborhood2d"],
                 heads=2, iters=2)  # fmt: skip
# FrameTile at ~20 % density: 16 frames, radius 1 (3/16 = 19 % of the keys per query).


def kernel_rows(cases: dict, dtype: str, deadline: float) -> list[dict]:
    rows = []
    for impl in cases["impls"]:
        for head_dim in cases["head_dims"]:
            for seq in cases["seqs"]:
                for mask in cases["masks"]:
                    row = dict(impl=impl, seq=seq, head_dim=head_dim, mask=mask, heads=cases["heads"])
                    if time.time() > deadline:
                        rows.append(row | dict(skipped="time budget spent"))
                        continue
                    try:
                        row = attention_bench.bench(
                            impl, seq, cases["heads"], head_dim, dtype, mask, iters=cases["iters"]
                        )
                    except Exception as e:  # a kernel that fails on this chip is a result, not a crash
                        row |= dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    _compare(rows)
    return rows


def _compare(rows: list[dict]) -> None:
    """Adds tflops ratios to cuDNN (same shape, dense) and to the KERNELS.md target of the tier."""
    cudnn = {(r["seq"], r["head_dim"]): r for r in rows if r["impl"] == "cudnn" and "fwd_tflops" in r}
    for r in rows:
        if "fwd_tflops" not in r:
            continue
        ref = cudnn.get((r["seq"], r["head_dim"]))
        if ref is not None and r["impl"] != "cudnn":
            r["fwd_vs_cudnn"] = round(r["fwd_tflops"] / ref["fwd_tflops"], 3)
            r["bwd_vs_cudnn"] = round(r["bwd_tflops"] / ref["bwd_tflops"], 3)
        for direction in ("fwd", "bwd"):
            target = TARGETS.get((r["impl"], direction, r["head_dim"]))
            if target and r["mask"] == "full":
                r[f"{direction}_vs_target"] = round(r[f"{direction}_tflops"] / target, 3)


def plan(config: str, target: str, batch: int, overrides: list[str]) -> dict:
    """`dit-jax plan --json` in a subprocess (deviceless: JAX_PLATFORMS=cpu, nothing allocated)."""
    cmd = [sys.executable, "-m", "dit_jax", "plan", f"--config={config}", f"--target={target}", "--json",
           f"--config.batch_size={batch}", *overrides]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_batch(config: str, target: str, candidates: list[int], overrides: list[str]) -> tuple[int, dict]:
    """The largest candidate batch whose plan fits (binary search over the sorted candidates)."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        report = plan(config, target, candidates[mid], overrides)
        print(f"plan batch {candidates[mid]}: fits={report['fits']}", flush=True)
        if report["fits"] is not False:  # None: no device memory to compare (CPU targets)
            best, lo = (candidates[mid], report), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise RuntimeError(f"no batch in {candidates} fits {target}")
    return best


def gpu_target(device_kind: str) -> str:
    for name in ("H200", "H100", "B200", "A100"):
        if name in device_kind:
            return f"gpu:{name.lower()}:1x1"
    raise ValueError(f"no dit-jax plan target for {device_kind!r}")


def train_row(dry_run: bool) -> dict:
    if dry_run:
        config, target, candidates = "configs/quickstart.py:smoke", "cpu:1", [2, 4, 8]
        extra = ["--config.model.dtype=float32"]
    else:
        config, target = "configs/dit.py:variant=XL/2", gpu_target(jax.devices()[0].device_kind)
        candidates, extra = [8, 16, 32, 64, 96, 128, 192, 256], ["--config.model.dtype=bfloat16"]
    overrides = [*extra, "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
    try:
        batch, report = largest_batch(config, target, candidates, overrides)
    except RuntimeError:  # not even the smallest batch: recompute activations in the backward pass
        overrides.append("--config.model.remat=full")
        batch, report = largest_batch(config, target, candidates, overrides)
    steps, rounds, warmup = ("3", "1", "1") if dry_run else ("10", "3", "3")
    args = ["--config", config, "--batch_size", str(batch), "--steps", steps, "--rounds", rounds,
            "--warmup", warmup, "--json", *overrides]  # fmt: skip
    result = _last_json_line(train_bench.main, args)
    keep = ("fits", "state_bytes_per_device", "temp_bytes_per_device", "device_memory_bytes", "compile_s")
    return result | dict(plan_target=target, batch=batch, plan={k: report.get(k) for k in keep})


def _last_json_line(main, argv: list[str]) -> dict:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    print(buffer.getvalue(), end="")
    if code:
        raise RuntimeError(f"train_step.py exited with {code}")
    return json.loads(buffer.getvalue().strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry_run", action="store_true", help="CPU: tiny shapes, same code paths")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget_s", type=float, default=420, help="stop starting kernel cases after this")
    args = parser.parse_args(argv)
    start = time.time()
    if not args.dry_run and jax.default_backend() != "gpu":
        print(f"gpu_suite: no GPU (backend {jax.default_backend()!r}); use --dry_run on CPU", file=sys.stderr)
        return 2
    meta = dict(
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]),
        dry_run=args.dry_run,
    )
    cases = DRY_CASES if args.dry_run else GPU_CASES
    dtype = "float32" if args.dry_run else "bfloat16"
    kernels = kernel_rows(cases, dtype, start + args.budget_s * 0.6)
    try:
        train = train_row(args.dry_run)
    except Exception as e:
        train = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    result = meta | dict(kernels=kernels, train_step=train, wall_s=round(time.time() - start, 1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({len(kernels)} kernel cases, {result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
