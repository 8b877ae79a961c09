"""The Hopper Mosaic GPU attention forward (`pallas_kernels.pallas_mgpu`), on this CPU machine.

Numerics: the kernel runs in JAX's Mosaic GPU interpreter (JAX >= 0.11: threads, barriers, TMA copies
and wgmma simulated on CPU) against the f32 reference. The interpreted kernel differs from the
compiled one in one place only: P reaches the PV wgmma through shared memory instead of registers
(the interpreter takes neither register operands nor `run_state` accumulators), so the in-place
register-operand PV product is checked by compilation, not by numerics. No test here times anything.

Compilation: deviceless for H100 (sm_90a: XLA:GPU -> Mosaic GPU -> PTX -> ptxas) in subprocesses,
since asking for wgmma on the wrong architecture aborts the process instead of raising.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch, masks, pallas_mgpu, reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOSAIC_CALL = "mosaic_gpu_v2"  # custom_call_target of a Mosaic GPU kernel in JAX 0.12's HLO
TRITON_CALL = "__gpu$xla.gpu.triton"

if not pallas_mgpu.interpretable():
    pytest.skip(
        f"JAX {jax.__version__}'s Mosaic GPU interpreter cannot run this kernel: use .venv-aot",
        allow_module_level=True,
    )


def _inputs(shape_q, heads_kv, dtype, seed=0):
    b, length, _, d = shape_q
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, shape_q, jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, length, heads_kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, length, heads_kv, d), jnp.float32).astype(dtype)
    return q, k, v


def _reference(q, k, v, mask):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return reference.attention(*f32, mask=mask)


BLOCKS_WITH_EMPTY_ROW = masks.BlockSparse(
    np.array([[True, False, True], [False, False, False], [True, True, True]]), (128, 128)
)
CASES = {  # name: (q shape, kv heads, dtype, mask)
    # 300 tokens: query and key padding; head_dim 72 pads to 128; grouped-query heads; queries from
    # 240 on see no key although their plan rows hold PARTIAL tiles.
    "local1d_keypad_gqa_d72": (
        (1, 300, 4, 72),
        2,
        jnp.bfloat16,
        masks.Local1D(40, 100) & masks.KeyPadding(200),
    ),
    "neighborhood2d_fp16_d32": ((1, 256, 2, 32), 2, jnp.float16, masks.Neighborhood2D((16, 16), (5, 5))),
    # The middle 128-query block sees no key: no tile is loaded, out 0, LSE -inf.
    "blocksparse_empty_row_d64": ((2, 384, 1, 64), 1, jnp.bfloat16, BLOCKS_WITH_EMPTY_ROW),
    # Several KV tiles per row: the K/V ring wraps around (2 slots for head_dim 128).
    "full_d128": ((1, 640, 1, 128), 1, jnp.bfloat16, masks.Full()),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreted_forward_matches_reference(name):
    shape_q, heads_kv, dtype, mask = CASES[name]
    q, k, v = _inputs(shape_q, heads_kv, dtype)
    out, lse = dispatch.attention_with_lse(q, k, v, mask=mask, implementation="pallas_mgpu", interpret=True)
    ref_out, ref_lse = _reference(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == jnp.float32
    err = float(jnp.abs(out.astype(jnp.float32) - ref_out).max())
    assert err <= 1e-2, err
    seen = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
    np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(ref_lse)[seen], atol=1e-3)
    if not seen.all():
        assert float(jnp.abs(out.astype(jnp.float32)[~np.moveaxis(seen, 1, 2)]).max()) == 0.0


def test_interpreted_gradients_match_reference():
    """Mosaic GPU forward + Triton backward (both interpreted) under one custom VJP."""
    mask = masks.Local1D(100, 30)
    q, k, v = _inputs((1, 200, 2, 64), 1, jnp.bfloat16, seed=1)
    do = jax.random.normal(jax.random.key(2), q.shape, jnp.float32)

    def loss(impl):
        def f(q, k, v):
            if impl == "xla":
                out, lse = _reference(q, k, v, mask)
            else:
                out, lse = dispatch.attention_with_lse(
                    q, k, v, mask=mask, implementation=impl, interpret=True
                )
            return (out.astype(jnp.float32) * do).sum() + lse.sum()

        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(loss("pallas_mgpu"), loss("xla"), strict=True):
        assert got.dtype == jnp.bfloat16
        err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
        assert err <= 2e-2 * max(1.0, float(jnp.abs(want).max())), err


def test_requests_outside_hopper_raise_before_compiling():
    q, k, v = _inputs((1, 128, 1, 64), 1, jnp.bfloat16)
    with pytest.raises(ValueError, match="only for Hopper"):  # CPU without interpret=True
        dispatch.attention(q, k, v, implementation="pallas_mgpu")
    with pytest.raises(ValueError, match="bfloat16 / float16"):
        dispatch.attention(q.astype(jnp.float32), k, v, implementation="pallas_mgpu", interpret=True)
    with pytest.raises(ValueError, match="segment ids"):
        ids = jnp.zeros((1, 128), jnp.int32)
        dispatch.attention(q, k, v, mask=masks.SegmentIds(ids), implementation="pallas_mgpu", interpret=True)


# One subprocess compiles every case for one target and prints one JSON line per case.
COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import jax, jax.numpy as jnp
    from dit_jax.parallel import targets
    from pallas_kernels import dispatch, masks, pallas_mgpu

    P = jax.sharding.PartitionSpec
    target = targets.get(sys.argv[1])
    mesh = target.mesh((1,), ("data",))

    def compile_case(name, shape_q, heads_kv, dtype, mask, impl, grad=False):
        b, length, heads, d = shape_q
        def f(q, k, v):
            out, lse = dispatch.attention_with_lse(q, k, v, mask=mask, implementation=impl)
            return out, lse
        def g(q, k, v):
            return jax.grad(lambda *a: f(*a)[0].astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
        fun = g if grad else f
        sq = jax.ShapeDtypeStruct(shape_q, dtype)
        skv = jax.ShapeDtypeStruct((b, length, heads_kv, d), dtype)
        row = {"name": name, "impl": impl}
        try:
            with jax.set_mesh(mesh):
                mapped = jax.shard_map(fun, mesh=mesh, in_specs=(P(),) * 3, out_specs=P(), check_vma=False)
                lowered = jax.jit(mapped).lower(sq, skv, skv)
                compiled = lowered.compile()
            row["calls"] = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))
            row["outs"] = [[list(o.shape), str(o.dtype)] for o in jax.tree.leaves(lowered.out_info)]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        print(json.dumps(row), flush=True)

    for case in json.loads(sys.argv[2]):
        name, shape_q, heads_kv, dtype, mask, impl, grad = case
        compile_case(name, tuple(shape_q), heads_kv, jnp.dtype(dtype), eval(mask), impl, grad)
    """
)


def _compile(target: str, cases: list, env_extra=None) -> dict:
    """{(name, impl): row}; a row holds the ptxas "N bytes spill stores" figures printed before it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    cmd = [sys.executable, "-c", COMPILE_SCRIPT, target, json.dumps(cases)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows, chunk = {}, []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            text = "\n".join(chunk)
            row["ptxas_sm90a"] = "for 'sm_90a'" in text
            row["spills"] = [int(n) for n in re.findall(r"(\d+) bytes spill stores", text)]
            rows[row["name"], row["impl"]] = row
            chunk = []
        else:
            chunk.append(line)
    return rows


H100_CASES = [  # name, q shape, kv heads, dtype, mask, grad
    ("full_d64", [2, 1024, 4, 64], 4, "bfloat16", "masks.Full()", False),
    ("local1d_d128_padded", [1, 1000, 2, 128], 2, "bfloat16", "masks.Local1D(100, 100)", False),
    ("nbhd2d_fp16_gqa_d72", [1, 4096, 4, 72], 2, "float16",
     "masks.Neighborhood2D((64, 64), (13, 13))", False),
    ("frametile_d64", [1, 4096, 2, 64], 2, "bfloat16", "masks.FrameTile(16, 256, 1, 1)", False),
    ("local1d_grad", [1, 512, 2, 128], 2, "bfloat16", "masks.Local1D(64, 64)", True),
]  # fmt: skip


@pytest.fixture(scope="module")
def h100():
    cases = [
        (n, s, h, d, m, impl, g) for n, s, h, d, m, g in H100_CASES for impl in ("pallas_mgpu", "pallas_gpu")
    ]
    cases.append(
        ("local1d_d128_padded", [1, 1000, 2, 128], 2, "bfloat16", "masks.Local1D(100, 100)", "pallas", False)
    )
    cases.append(("fp32_falls_back", [1, 512, 2, 64], 2, "float32", "masks.Local1D(64, 64)", "pallas", False))
    return _compile("gpu:h100:1x1", cases, {"MOSAIC_GPU_DUMP_PTXAS": "1"})


@pytest.mark.parametrize("name", [c[0] for c in H100_CASES])
def test_compiles_for_h100_as_mosaic_gpu(h100, name):
    rows = h100
    mgpu, triton = rows[(name, "pallas_mgpu")], rows[(name, "pallas_gpu")]
    assert "error" not in mgpu, mgpu.get("error")
    assert "error" not in triton, triton.get("error")
    # The forward is the Mosaic GPU kernel (no Triton forward); with a gradient, the backward is Triton.
    assert MOSAIC_CALL in mgpu["calls"]
    assert (TRITON_CALL in mgpu["calls"]) == name.endswith("_grad")
    assert MOSAIC_CALL not in triton["calls"] and TRITON_CALL in triton["calls"]
    assert mgpu["outs"] == triton["outs"]  # same out / LSE (or gradient) shapes and dtypes


def test_pallas_picks_mosaic_gpu_on_h100_when_supported(h100):
    rows = h100
    assert MOSAIC_CALL in rows[("local1d_d128_padded", "pallas")]["calls"]
    fallback = rows[("fp32_falls_back", "pallas")]["calls"]
    assert TRITON_CALL in fallback and MOSAIC_CALL not in fallback


def test_ptxas_compiles_for_sm90a_and_dense_or_banded_tiles_do_not_spill(h100):
    for name, *_ in H100_CASES:
        row = h100[name, "pallas_mgpu"]
        assert row["ptxas_sm90a"] and row["spills"], row
        # The Neighborhood2D mask arithmetic (coordinates of both tiles) costs 12 spilled bytes.
        limit = 64 if name.startswith("nbhd") else 0
        assert max(row["spills"]) <= limit, (name, row["spills"])


def test_a100_request_is_a_value_error_and_pallas_stays_triton():
    cases = [
        ("full_d64", [1, 256, 1, 64], 1, "bfloat16", "masks.Full()", "pallas_mgpu", False),
        ("local_d64", [1, 256, 1, 64], 1, "bfloat16", "masks.Local1D(32, 32)", "pallas", False),
    ]
    rows = _compile("gpu:a100:1x1", cases)
    assert "ValueError" in rows[("full_d64", "pallas_mgpu")]["error"]
    assert "only for Hopper" in rows[("full_d64", "pallas_mgpu")]["error"]
    calls = rows[("local_d64", "pallas")]["calls"]
    assert TRITON_CALL in calls and MOSAIC_CALL not in calls


def test_oversized_kv_ring_fails_to_compile():
    """Proof that the compile checks shared memory: 4 slots of 128x128 K and V (d=128) do not fit."""
    script = COMPILE_SCRIPT.replace("for case in", "pallas_mgpu.stages = lambda *a: 4\nfor case in")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    case = [("ring3", [1, 1024, 1, 128], 1, "bfloat16", "masks.Full()", "pallas_mgpu", False)]
    proc = subprocess.run([sys.executable, "-c", script, "gpu:h100:1x1", json.dumps(case)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)  # fmt: skip
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "exceeds available shared memory" in row.get("error", ""), row
