"""Attention kernel cases compiled ahead of time for a named target (used by test_kernels_*.py).

A case is a JSON-able dict, so the same function compiles TPU cases in the test process and GPU
cases in a child process (`gpu_compile.run`). `compile_case` lowers, then compiles, forward and
backward of `sharded_attention` on a (data, tensor) mesh of the target, and reports what the
compiled program holds instead of raising, so that a test can assert on failures too.
"""

from __future__ import annotations

import glob
import math
import os
import re
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import pallas_kernels
from dit_jax.parallel import targets
from pallas_kernels import masks, pallas_attention

#: Custom-call targets of the Pallas kernels: TPU (Mosaic), GPU (Triton), Hopper (Mosaic GPU).
KERNEL_CALLS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu_v2")
SPEC = PartitionSpec("data", None, "tensor", None)


def case(target: str, mask: str = "full", head_dim: int = 64, dtype: str = "bfloat16", **kw) -> dict:
    """A case with defaults: 1024 tokens, 4 query heads, GQA off, forward + backward, table blocks.

    `blocks`: explicit (block_q, block_kv, block_q_bwd, block_kv_bwd) for the kernel family of
    `implementation` ("pallas_gpu" / "pallas_tpu"); `skip_check`: bypass the front end's hardware
    check; `lower_only`: stop before compiling.
    """
    out = dict(target=target, mask=mask, head_dim=head_dim, dtype=dtype, seq=1024, heads=4, kv_heads=4)
    out.update(implementation="pallas", grad=True, blocks=None, skip_check=False, lower_only=False)
    unknown = set(kw) - set(out)
    if unknown:
        raise TypeError(f"unknown case fields {unknown}")
    return {**out, **kw}


def build_mask(name: str, seq: int, batch: int):
    """The mask `name` for `seq` tokens; "segments" gives SegmentIds, whose arrays become jit arguments.

    Per-example key lengths go through segment ids: under shard_map each device sees other examples,
    so they cannot be a static `KeyPadding(lengths)` (and `sharded_attention` rejects that one).
    """
    if name == "full":
        return masks.Full()
    if name == "neighborhood2d":  # seq a power of two: rows = 2 ** (log2(seq) // 2)
        rows = 1 << (seq.bit_length() - 1) // 2
        return masks.Neighborhood2D(grid=(rows, seq // rows), window=(7, 7))
    if name == "frametile":
        return masks.FrameTile(frames=4, tokens_per_frame=seq // 4, radius=1, global_frames=1)
    if name == "blocksparse":  # 1024-token blocks: multiples of every target's tiles
        n = seq // 1024
        return masks.BlockSparse(np.tril(np.ones((n, n), bool)), (1024, 1024))
    if name == "keypadding":  # the last 100 keys are padding (a partial last KV tile)
        return masks.KeyPadding(seq - 100)
    if name == "segments":  # a key length per example, as runtime segment ids (jit arguments)
        lengths = seq - 100 * (1 + np.arange(batch))[:, None]
        kv_ids = (np.arange(seq)[None, :] >= lengths).astype(np.int32)
        return masks.SegmentIds(jnp.zeros((batch, seq), jnp.int32), jnp.asarray(kv_ids))
    raise ValueError(f"unknown mask {name!r}")


def _mesh(target: targets.Target) -> jax.sharding.Mesh:
    return target.mesh((target.num_devices // 2, 2), ("data", "tensor"))


def _function(c: dict, mesh):
    """(f, abstract args, their shardings): loss gradient (or output) of sharded attention."""
    batch = mesh.shape["data"]
    dtype = jnp.dtype(c["dtype"])
    q = jax.ShapeDtypeStruct((batch, c["seq"], c["heads"], c["head_dim"]), dtype)
    kv = jax.ShapeDtypeStruct((batch, c["seq"], c["kv_heads"], c["head_dim"]), dtype)
    mask = build_mask(c["mask"], c["seq"], batch)
    args, specs = [q, kv, kv], [SPEC] * 3
    if isinstance(mask, masks.SegmentIds):
        args += [jax.ShapeDtypeStruct(mask.q.shape, jnp.int32)] * 2
        specs += [PartitionSpec("data", None)] * 2

    def attend(q, k, v, *ids):
        m = masks.SegmentIds(*ids) if ids else mask
        if c["blocks"] is None:
            return pallas_kernels.sharded_attention(
                q, k, v, mesh=mesh, mask=m, implementation=c["implementation"], interpret=False
            )
        if ids or m.batch_segments(batch, c["seq"], c["seq"]) is not None:
            raise ValueError("explicit blocks take static masks only")
        family = c["implementation"].removeprefix("pallas_")  # explicit blocks: one kernel family

        def local(q, k, v):
            out, _ = pallas_attention.attention(
                q, k, v, mask=m, scale=0.125, family=family, interpret=False, blocks=tuple(c["blocks"])
            )
            return out

        return jax.shard_map(local, mesh=mesh, in_specs=(SPEC,) * 3, out_specs=SPEC, check_vma=False)(q, k, v)

    if c["grad"]:

        def f(q, k, v, *ids):
            return jax.grad(
                lambda q, k, v: (attend(q, k, v, *ids).astype(jnp.float32) ** 2).sum(), (0, 1, 2)
            )(q, k, v)
    else:
        f = attend
    return f, args, [NamedSharding(mesh, s) for s in specs]


def _thunk_dumps() -> set[str]:
    """XLA's thunk-sequence dumps so far (GPU; only when XLA_FLAGS has --xla_dump_to)."""
    m = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
    return set(glob.glob(os.path.join(m.group(1), "*thunk_sequence.txt"))) if m else set()


def _shared_memory(new_dumps: set[str]) -> dict[str, int]:
    """Shared memory per GPU kernel launch that XLA reports ("shared_memory: N bytes")."""
    out: dict[str, int] = {}
    for path in new_dumps:
        with open(path) as f:
            for name, size in re.findall(r"(flash_\w+?_gpu)\b.*?shared_memory: (\d+)", f.read()):
                out[name] = max(out.get(name, 0), int(size))
    return out


def _local_bytes(args, shardings) -> int:
    return sum(
        math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
        for a, s in zip(args, shardings, strict=True)
    )


def compile_case(c: dict) -> dict:
    """Lower and compile one case; the result says where it failed (phase) or what it compiled."""
    target = targets.get(c["target"])
    mesh = _mesh(target)
    result = dict(case=c, ok=False, phase="lower")
    saved = pallas_attention.check_hardware
    if c["skip_check"]:  # prove that the compiler itself rejects what the front end would
        pallas_attention.check_hardware = lambda cfg, dtype: None
    try:
        f, args, shardings = _function(c, mesh)
        dumps = _thunk_dumps()
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            lowered = jax.jit(f, in_shardings=shardings).lower(*args)
            if c["lower_only"]:  # front-end checks only: never compiles (safe in-process for GPUs)
                return dict(result, ok=True, phase="lowered")
            result["phase"] = "compile"
            compiled = lowered.compile()
        result["compile_s"] = round(time.perf_counter() - start, 2)
    except Exception as e:  # noqa: BLE001 - reported to the test, which asserts on it
        result.update(error_type=type(e).__name__, error=str(e)[-3000:], trace=traceback.format_exc()[-2000:])
        return result
    finally:
        pallas_attention.check_hardware = saved
    text = compiled.as_text()
    mem = compiled.memory_analysis()
    result.update(
        ok=True,
        custom_calls=sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
        kernels=sorted(set(re.findall(r"flash_(?:fwd|dq|dkv)_(?:gpu|tpu|mgpu)", text))),
        # arrays with two sequence-long dims: the [.., seq, seq] scores of a dense fallback
        square_shapes=sorted(set(re.findall(rf"\w+\[[\d,]*\b{c['seq']},{c['seq']}\b[\d,]*\]", text))),
        argument_bytes=mem.argument_size_in_bytes,
        device_bytes=mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        local_argument_bytes=_local_bytes(args, shardings),
        device_memory_bytes=target.device_memory_bytes,
        shared_memory=_shared_memory(_thunk_dumps() - dumps),
    )  # fmt: skip
    return result


def compile_cases(cases: list[dict]) -> list[dict]:
    """Every case in turn (the entry point of one GPU child process)."""
    return [compile_case(c) for c in cases]
