"""Per-device compiled memory of context-parallel (ring) attention, forward + backward, by context size.

Compiles (never runs) the attention of one DiT-like layer, q, k, v [1, L, heads, head_dim] -> out,
and the gradients of all three, on a CPU mesh of 8 fake devices with the sequence split over a
`context` axis of 1, 2, 4 or 8 devices (the other devices idle), and reads XLA's memory analysis of
the compiled program: temp bytes are per device (the shard_map body is one SPMD program), arguments
and outputs are the local shards. The ring's pair kernel is "chunked" (what it runs on CPU for
these lengths); its scores are [L / n, heads, block_kv] per step, so everything should shrink ~1/n.

    python benchmarks/context_memory.py [--seq 16384 32768 65536 131072 262144] [--context 1 2 4 8] \
        [--heads 16] [--head_dim 72] [--dtype bfloat16] [--method ring] \
        [--baseline_rev REV] [--out benchmarks/results/context_memory_<date>.json]

`--baseline_rev REV` also measures `pallas_kernels/context.py` as of git revision REV (loaded from
`git show`, the rest of the package as checked out): before / after figures in one JSON.

The 8 fake devices are set up here (XLA_FLAGS) before JAX starts.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import pallas_kernels  # noqa: E402

MIB = 2**20
NOTES = (
    "temp bytes exclude the arguments and outputs (the local shards of q, k, v and of their gradients); "
    "XLA:CPU runs bf16 matmuls on f32 copies of their operands, so bf16 figures include f32 copies that "
    "GPU / TPU programs would not make; at context 1 the ring is the pair kernel alone (one step, no "
    "transfers), so the step from context 1 to 2 includes the ring's own shard-sized buffers (visiting "
    "and in-flight K/V, f32 dQ / dK / dV accumulators); from context 3 on the ring steps run in a while "
    "loop, out of which XLA hoists the chunked kernel's zero-filled scan accumulators (a few more "
    "shard-sized buffers live for the whole program)"
)


def measure(
    seq: int, context: int, heads: int, head_dim: int, dtype, *, method: str = "ring",
    implementation: str = "chunked", attention_fn=None,
) -> dict:  # fmt: skip
    """Per-device bytes of the compiled forward + backward of context-parallel attention.

    `attention_fn`: a `context_attention`-like callable (default `pallas_kernels.context_attention`),
    to measure another version of it."""
    attention_fn = attention_fn or pallas_kernels.context_attention
    mesh = Mesh(np.array(jax.devices()[:context]), ("context",))
    spec = jax.ShapeDtypeStruct((1, seq, heads, head_dim), dtype)
    fn = functools.partial(attention_fn, mesh=mesh, implementation=implementation, method=method)

    def fwd_bwd(q, k, v):
        loss = lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    start = time.perf_counter()
    stats = jax.jit(fwd_bwd).lower(spec, spec, spec).compile().memory_analysis()
    seconds = time.perf_counter() - start
    return dict(
        seq=seq,
        context=context,
        tokens_per_device=seq // context,
        temp_mib=round(stats.temp_size_in_bytes / MIB, 2),
        temp_bytes=int(stats.temp_size_in_bytes),
        argument_mib=round(stats.argument_size_in_bytes / MIB, 2),
        output_mib=round(stats.output_size_in_bytes / MIB, 2),
        compile_s=round(seconds, 1),
    )


def context_attention_at(rev: str):
    """`context_attention` from pallas_kernels/context.py as of git revision `rev`."""
    source = subprocess.run(
        ["git", "show", f"{rev}:pallas_kernels/context.py"], capture_output=True, text=True, check=True
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    name = f"context_at_{rev}"
    spec = importlib.util.spec_from_file_location(name, f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.context_attention


def table(rows: list[dict], contexts: list[int]) -> str:
    """Temp MiB per device: one line per sequence length, one column per context size, then the
    ratio of the largest context to context 1."""
    by = {(r["seq"], r["context"]): r["temp_mib"] for r in rows}
    seqs = sorted({r["seq"] for r in rows})
    head = f"{'tokens':>8} | " + " | ".join(f"ctx {n:>2} MiB" for n in contexts)
    lines = [head + f" | ctx {contexts[-1]} / ctx {contexts[0]}", "-" * (len(head) + 18)]
    for s in seqs:
        cells = [f"{by.get((s, n), float('nan')):>10.1f}" for n in contexts]
        ratio = by.get((s, contexts[-1]), float("nan")) / by.get((s, contexts[0]), float("nan"))
        lines.append(f"{s:>8} | " + " | ".join(cells) + f" | {ratio:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 32768, 65536, 131072, 262144])
    parser.add_argument("--context", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head_dim", type=int, default=72)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--method", default="ring", choices=pallas_kernels.context.METHODS)
    parser.add_argument("--impl", default="chunked", help="the pair kernel (attention implementation)")
    parser.add_argument("--baseline_rev", help="also measure pallas_kernels/context.py at this git revision")
    parser.add_argument("--out", help="also write the rows (with date, command, JAX version) to this JSON")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    versions = {"current": None}
    if args.baseline_rev:
        versions["baseline"] = context_attention_at(args.baseline_rev)
    results = {}
    for version, fn in versions.items():
        rows = results[version] = []
        for seq in args.seq:
            for n in args.context:
                row = measure(seq, n, args.heads, args.head_dim, dtype, method=args.method,
                              implementation=args.impl, attention_fn=fn)  # fmt: skip
                rows.append(row)
                print(json.dumps(dict(version=version) | row), flush=True)
    for version, rows in results.items():
        print()
        rev = f" at {args.baseline_rev}" if version == "baseline" else ""
        print(f"{version}{rev}: fwd+bwd temp MiB per device ({args.method}, {args.impl}, heads {args.heads}, "
              f"head_dim {args.head_dim}, {dtype.name}, batch 1)")  # fmt: skip
        print(table(rows, args.context))
    if args.out:
        meta = dict(
            date=datetime.date.today().isoformat(),
            command=" ".join(["python", *sys.argv]),
            jax=jax.__version__,
            backend=jax.default_backend(),
            devices=len(jax.devices()),
            what="compiled (not run) attention forward + backward (grads of q, k, v), per-device bytes "
            "from compiled.memory_analysis(); the sequence split over a context mesh axis",
            method=args.method,
            implementation=args.impl,
            batch=1,
            heads=args.heads,
            head_dim=args.head_dim,
            dtype=dtype.name,
            notes=NOTES,
        )
        if args.baseline_rev:
            meta["baseline_rev"] = args.baseline_rev
            meta["baseline_rows"] = results["baseline"]
        with open(args.out, "w") as f:
            json.dump(meta | dict(rows=results["current"]), f, indent=1)


if __name__ == "__main__":
    main()
