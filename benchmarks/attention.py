"""Attention speed: forward and backward time and TF/s per implementation, dense and sparse masks.

Prints one JSON object per case (device, versions and date included); `--out FILE` also writes
them as a JSON list (record GPU/TPU runs in benchmarks/results/). TF/s count useful FLOPs: dense
4 * B * H * Lq * Lk * D forward (x2.5 backward) times the mask density, so a block-sparse kernel
that skips work scores like a dense one. `speedup_vs_dense` compares the same implementation on
the full mask. On CPU the defaults run the XLA paths at small sizes; on GPU the sweep is
seq 1k-32k, head_dim 64/72/128, bf16, implementations cudnn / pallas / xla / chunked.

    python benchmarks/attention.py                         # backend defaults
    python benchmarks/attention.py --seq 4096 8192 --head_dim 128 --impl pallas cudnn --out FILE
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import masks

DEFAULTS = {
    "cpu": dict(seq=[512, 1024], head_dim=[64], impl=["dense", "xla", "chunked"], dtype="float32", heads=4),
    "gpu": dict(
        seq=[1024, 2048, 4096, 8192, 16384, 32768],
        head_dim=[64, 72, 128],
        impl=["cudnn", "pallas", "xla", "chunked"],
        dtype="bfloat16",
        heads=16,
    ),
    "tpu": dict(seq=[1024, 4096, 16384], head_dim=[128], impl=["pallas", "xla"], dtype="bfloat16", heads=16),
}
MASKS = ["full", "local1d", "neighborhood2d", "frametile", "blocksparse10", "blocksparse25", "blocksparse50"]


def _digits(x: float, n: int = 4) -> float:
    """`x` rounded to n significant digits."""
    return float(f"{x:.{n}g}")


def make_mask(name: str, seq: int) -> masks.Mask | None:
    """Named masks near typical densities (local1d / neighborhood2d ~10%, frametile ~20%)."""
    if name == "full":
        return None
    if name == "local1d":
        return masks.Local1D(seq // 20, seq // 20)
    if name == "neighborhood2d":
        side = math.isqrt(seq)
        if side * side != seq:
            return "skip"
        w = int(side * math.sqrt(0.1)) | 1
        return masks.Neighborhood2D((side, side), (w, w))
    if name == "frametile":
        return masks.FrameTile(frames=16, tokens_per_frame=seq // 16, radius=1) if seq % 16 == 0 else "skip"
    if name.startswith("blocksparse"):
        density, block = int(name.removeprefix("blocksparse")) / 100, 128
        n = -(-seq // block)
        pattern = np.random.RandomState(0).rand(n, n) < density
        return masks.BlockSparse(pattern | np.eye(n, dtype=bool), (block, block))
    raise ValueError(f"unknown mask {name!r}; choose from {MASKS}")


def _time(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench(impl, seq, heads, head_dim, dtype, mask_name, batch=1, iters=5) -> dict:
    """Times forward and forward+backward of one case."""
    mask = make_mask(mask_name, seq)
    row = dict(impl=impl, seq=seq, heads=heads, head_dim=head_dim, batch=batch, dtype=dtype, mask=mask_name)
    if isinstance(mask, str):
        return row | dict(skipped="mask needs another sequence length")
    density = pallas_kernels.build_plan(mask, seq, seq, 128, 128).density if mask is not None else 1.0
    if mask is not None:
        dense = masks.dense_mask(mask, seq, seq) if seq <= 8192 else None
        density = float(dense.mean()) if dense is not None else density
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (batch, seq, heads, head_dim), dtype) for key in keys)

    def fwd(q, k, v):
        return pallas_kernels.attention(q, k, v, mask=mask, implementation=impl)

    def fwd_bwd(q, k, v):
        return jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    try:
        t_fwd = _time(jax.jit(fwd), (q, k, v), iters)
        t_all = _time(jax.jit(fwd_bwd), (q, k, v), iters)
    except (ValueError, NotImplementedError) as e:  # unsupported case: report, do not crash the sweep
        return row | dict(skipped=str(e).splitlines()[0])
    flops = 4 * batch * heads * seq * seq * head_dim * density
    t_bwd = max(t_all - t_fwd, 1e-9)
    return row | dict(
        density=round(density, 4),
        fwd_ms=_digits(t_fwd * 1e3),
        bwd_ms=_digits(t_bwd * 1e3),
        fwd_tflops=_digits(flops / t_fwd / 1e12),  # 4 significant digits: CPU figures are tiny
        bwd_tflops=_digits(2.5 * flops / t_bwd / 1e12),
    )


def main() -> None:
    backend = jax.default_backend()
    defaults = DEFAULTS.get(backend, DEFAULTS["cpu"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=defaults["seq"])
    parser.add_argument("--head_dim", type=int, nargs="+", default=defaults["head_dim"])
    parser.add_argument("--impl", nargs="+", default=defaults["impl"])
    parser.add_argument("--mask", nargs="+", default=MASKS)
    parser.add_argument("--heads", type=int, default=defaults["heads"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default=defaults["dtype"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", help="also write all rows to this JSON file")
    args = parser.parse_args()
    meta = dict(
        device=jax.devices()[0].device_kind,
        backend=backend,
        jax=jax.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    rows = []
    for impl in args.impl:
        for head_dim in args.head_dim:
            for seq in args.seq:
                dense_ms = None
                for mask_name in args.mask:
                    row = bench(
                        impl, seq, args.heads, head_dim, args.dtype, mask_name, args.batch, args.iters
                    )
                    if mask_name == "full":
                        dense_ms = row.get("fwd_ms")
                    elif dense_ms and "fwd_ms" in row:
                        row["speedup_vs_dense"] = round(dense_ms / row["fwd_ms"], 2)
                    rows.append(meta | row)
                    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
