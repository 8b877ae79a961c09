"""Compiled memory of attention: forward and forward+backward temp bytes (XLA memory analysis).

Deterministic on CPU, so tests assert on it. Dense f32 scores for 16k tokens x 4 heads would be
4 GiB; the chunked path (and "auto", which picks it on CPU) stays linear in sequence length.

    python benchmarks/attention_memory.py [--seq 16384] [--heads 4] [--head_dim 64] [--impl auto chunked] \
        [--out benchmarks/results/cpu_attention_memory_<date>.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import jax
import jax.numpy as jnp

import pallas_kernels

MIB = 2**20


def measure(
    implementation: str, seq: int, heads: int, head_dim: int, dtype=jnp.float32, batch: int = 1
) -> dict:
    """Temp / argument / output bytes of the compiled forward and forward+backward programs."""
    spec = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype)

    def fwd(q, k, v):
        return pallas_kernels.attention(q, k, v, implementation=implementation)

    def fwd_bwd(q, k, v):
        return jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    result = dict(
        implementation=implementation, seq=seq, heads=heads, head_dim=head_dim, dtype=str(spec.dtype)
    )
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        stats = jax.jit(fn).lower(spec, spec, spec).compile().memory_analysis()
        result[f"{name}_temp_mib"] = round(stats.temp_size_in_bytes / MIB, 2)
        result[f"{name}_output_mib"] = round(stats.output_size_in_bytes / MIB, 2)
    result["dense_scores_mib"] = batch * heads * seq * seq * 4 / MIB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--impl", nargs="+", default=["auto", "chunked"])
    parser.add_argument("--out", help="also write the rows (with date and command) to this JSON file")
    args = parser.parse_args()
    rows = []
    for impl in args.impl:
        row = measure(impl, args.seq, args.heads, args.head_dim)
        row.update(backend=jax.default_backend(), jax=jax.__version__)
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        meta = dict(date=datetime.date.today().isoformat(), command=" ".join(["python", *sys.argv]))
        with open(args.out, "w") as f:
            json.dump(meta | dict(rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
