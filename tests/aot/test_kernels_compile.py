"""The attention kernels compile for TPU v5e / v5p / v6e, A100 and H100, forward and backward.

Each case compiles `jax.grad` of `sharded_attention(implementation="pallas")` on a (data, tensor)
mesh of the target's deviceless devices, and the compiled program must hold the kernel itself (its
custom call and all three of its kernels: forward, dQ, dK/dV) rather than a fallback, keep only
its shard of q, k, v per device, stay under the chip's memory, and hold no [seq, seq] array
(the scores of a dense fallback). TPU programs compile in this process; GPU ones in one child process per test
(`gpu_compile`), since a GPU architecture mismatch aborts the process.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import kernel_cases
import pytest
from kernel_cases import case

from pallas_kernels import blocks, masks, pallas_attention, platform

# (mask, head_dim, dtype, kv_heads, seq): both head dims in both dtypes, GQA thrice. 512 tokens keep
# TPU compiles short (Mosaic's time grows with the tile area; the table test compiles the full tiles);
# BlockSparse's 1024-token blocks must be multiples of every target's tiles.
MASK_CASES = [
    ("full", 64, "bfloat16", 4, 512),
    ("full", 128, "float32", 4, 512),
    ("neighborhood2d", 128, "bfloat16", 2, 512),
    ("frametile", 64, "float32", 2, 512),
    ("blocksparse", 128, "bfloat16", 4, 2048),
    ("keypadding", 64, "bfloat16", 4, 512),
    ("segments", 128, "float32", 2, 512),
]
TPUS = ("tpu:v5e:2x2", "tpu:v5p:2x2x1")
GPU = "gpu:h100:1x8"
# Block-table rows: a target per TABLE key (A100 for sm_80, H100 for sm_90).
TABLE_TARGETS = {"v5e": "tpu:v5e:2x2", "v5p": "tpu:v5p:2x2x1", "v6e": "tpu:v6e:2x2",
                 "sm_80": "gpu:a100:1x8", "sm_90": "gpu:h100:1x8"}  # fmt: skip


def mask_case(target: str, mask: str, head_dim: int, dtype: str, kv_heads: int, seq: int) -> dict:
    return case(target, mask, head_dim, dtype, kv_heads=kv_heads, seq=seq)


def problems(result: dict) -> list[str]:
    """What is wrong with one compiled case (empty when it is right)."""
    c = result["case"]
    if not result["ok"]:
        return [f"{c}: {result['phase']} failed: {result.get('error_type')}: {result.get('error')}"]
    out = []
    if not set(result["custom_calls"]) & set(kernel_cases.KERNEL_CALLS):
        out.append(f"no kernel custom call, only {result['custom_calls']}")
    kinds = {name.split("_")[1] for name in result["kernels"]}
    if kinds != {"fwd", "dq", "dkv"}:
        out.append(f"kernels {result['kernels']}: want a forward, a dQ and a dK/dV kernel")
    if result["argument_bytes"] != result["local_argument_bytes"]:
        out.append(
            f"{result['argument_bytes']} argument bytes per device, want {result['local_argument_bytes']}"
        )
    if result["device_bytes"] > result["device_memory_bytes"]:
        out.append(f"{result['device_bytes']} bytes per device > {result['device_memory_bytes']}")
    if result["square_shapes"]:
        out.append(f"dense [seq, seq] arrays {result['square_shapes']}: a fallback, not flash attention")
    return [f"{c['target']} {c['mask']} d{c['head_dim']} {c['dtype']}: {p}" for p in out]


@pytest.mark.parametrize("target", TPUS)
@pytest.mark.parametrize("spec", MASK_CASES, ids=lambda s: f"{s[0]}-d{s[1]}-{s[2]}-kv{s[3]}")
def test_tpu_kernel_compiles_fwd_bwd(aot_target, target, spec):
    aot_target(target)
    result = kernel_cases.compile_case(mask_case(target, *spec))
    assert not problems(result)
    assert result["custom_calls"] == ["tpu_custom_call"]


def test_h100_kernels_compile_fwd_bwd(aot_target, gpu_child):
    """Every mask case in one child; bf16 may run the Mosaic GPU forward, f32 and segments Triton."""
    aot_target(GPU)
    results = gpu_child("kernel_cases:compile_cases", [mask_case(GPU, *spec) for spec in MASK_CASES])
    assert [p for r in results for p in problems(r)] == []
    f32 = [r for r in results if r["case"]["dtype"] == "float32"]
    assert all("flash_fwd_gpu" in r["kernels"] for r in f32), "f32 must run the Triton forward"


def table_case(key: str, head_dim: int) -> dict:
    """The entry's blocks at a sequence long enough for the largest of them (none is clamped)."""
    entry = blocks.TABLE[key, head_dim]
    family = "tpu" if key.startswith("v") else "gpu"
    seq = max(1024, entry.block_q, entry.block_kv)
    return case(TABLE_TARGETS[key], "full", head_dim, "bfloat16", seq=seq, implementation=f"pallas_{family}")


def assert_table_blocks_chosen(target, key: str, head_dim: int) -> None:
    """The default config for the target is this table entry, unchanged (fits its budget in bf16)."""
    family = "tpu" if key.startswith("v") else "gpu"
    plat = platform.of_device(target.devices[0])
    assert blocks.target_key(family, plat) == key
    c = table_case(key, head_dim)
    cfg = pallas_attention.default_config(
        family, masks.Full(), 1.0, c["seq"], c["seq"], head_dim, jnp.bfloat16, False, plat
    )
    assert cfg.blocks == blocks.TABLE[key, head_dim]


TPU_ROWS = sorted(k for k in blocks.TABLE if k[0].startswith("v"))
GPU_ROWS = sorted(k for k in blocks.TABLE if k[0].startswith("sm"))


def test_table_covers_the_targets():
    assert {k for k, _ in blocks.TABLE} == set(TABLE_TARGETS)
    for family, dims in (("tpu", TPU_ROWS), ("gpu", GPU_ROWS)):
        keys = {k for k, _ in dims}
        assert {(k, d) for k in keys for d in blocks.head_dims(family)} == set(dims)


@pytest.mark.parametrize("key, head_dim", TPU_ROWS, ids=lambda x: str(x))
def test_tpu_block_table_entry_compiles(aot_target, key, head_dim):
    target = aot_target(TABLE_TARGETS[key])
    assert_table_blocks_chosen(target, key, head_dim)
    assert not problems(kernel_cases.compile_case(table_case(key, head_dim)))


def test_gpu_block_table_entries_compile(aot_target, gpu_child, tmp_path):
    """Also: the front end's shared-memory estimates bound what XLA reports for each Triton kernel."""
    for key, head_dim in GPU_ROWS:
        assert_table_blocks_chosen(aot_target(TABLE_TARGETS[key]), key, head_dim)
    env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={tmp_path}"}
    results = gpu_child("kernel_cases:compile_cases", [table_case(*row) for row in GPU_ROWS], env=env)
    assert [p for r in results for p in problems(r)] == []
    for (key, head_dim), r in zip(GPU_ROWS, results, strict=True):
        assert r["custom_calls"] == ["__gpu$xla.gpu.triton"]
        used = r["shared_memory"]
        assert set(used) == {"flash_fwd_gpu", "flash_dq_gpu", "flash_dkv_gpu"}, used
        fwd, bwd = blocks.kernel_bytes("gpu", blocks.TABLE[key, head_dim], head_dim, jnp.bfloat16)
        assert used["flash_fwd_gpu"] <= fwd and max(used["flash_dq_gpu"], used["flash_dkv_gpu"]) <= bwd, (
            key,
            head_dim,
            used,
            (fwd, bwd),
        )
