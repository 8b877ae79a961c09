"""Requests the kernels cannot serve fail with one clear ValueError before anything compiles, and
blocks over the on-chip memory budget are rejected twice: by the front end's own check
(`pallas_attention.check_hardware`, from `blocks.py`'s estimates) and, with that check bypassed,
by the real compiler (Mosaic's scoped-VMEM limit, Triton's shared-memory limit) — so neither check
is decorative, and both use the same budget.
"""

from __future__ import annotations

import re

import kernel_cases
import pytest
from kernel_cases import case

from pallas_kernels import platform

# (case, front-end message, compiler message). Forward only: the forward kernel is over budget.
OVER_BUDGET = {
    # 2048x2048 bf16, d 128 on v5e: ~25 MiB by the estimate, 22.9 MiB by Mosaic, budget 16 MiB.
    "v5e": (
        case(
            "tpu:v5e:2x2",
            head_dim=128,
            seq=2048,
            implementation="pallas_tpu",
            blocks=[2048, 2048, 512, 512],
            grad=False,
        ),
        rf"VMEM \(limit {platform.TPU_VMEM_BYTES['v5e']}\)",
        r"RESOURCE_EXHAUSTED.*vmem.*limit 16\.00M",
    ),
    # 128x256 bf16, d 128 on H100: K and V double-buffered alone take 256 KiB of 227.
    "h100": (
        case(
            "gpu:h100:1x8", head_dim=128, implementation="pallas_gpu", blocks=[128, 256, 64, 64], grad=False
        ),
        rf"shared memory \(limit {platform.GPU_SMEM_BYTES[9, 0]}\)",
        rf"Shared memory size limit exceeded: requested \d+, available: {platform.GPU_SMEM_BYTES[9, 0]}",
    ),
    # 128x128 d 256 on A100: 320 KiB estimated, 224 KiB requested by Triton, 163 available.
    "a100": (
        case(
            "gpu:a100:1x8", head_dim=256, implementation="pallas_gpu", blocks=[128, 128, 32, 32], grad=False
        ),
        rf"shared memory \(limit {platform.GPU_SMEM_BYTES[8, 0]}\)",
        rf"Shared memory size limit exceeded: requested \d+, available: {platform.GPU_SMEM_BYTES[8, 0]}",
    ),
}


def lowered(c: dict) -> dict:
    """Lower only: front-end checks run, nothing compiles (so GPU cases are safe in this process)."""
    return kernel_cases.compile_case({**c, "lower_only": True})


def assert_front_end_error(result: dict, message: str) -> None:
    assert result["phase"] == "lower", f"not rejected before compiling: {result}"
    assert result["error_type"] == "ValueError", result
    assert re.search(message, result["error"]), result["error"]
    assert "\n" not in result["error"], "one line"


@pytest.mark.parametrize("name", sorted(OVER_BUDGET))
def test_over_budget_blocks_fail_in_the_front_end(aot_target, name):
    c, front_end, _ = OVER_BUDGET[name]
    aot_target(c["target"])
    assert_front_end_error(lowered(c), front_end)
    assert lowered({**c, "skip_check": True})["ok"], "the bypass must reach the compiler"


def assert_compiler_error(result: dict, message: str) -> None:
    assert not result["ok"] and result["phase"] == "compile", result
    assert re.search(message, result["error"], re.S), result["error"]


def test_tpu_compiler_rejects_over_budget_blocks_without_the_front_end(aot_target):
    c, _, compiler = OVER_BUDGET["v5e"]
    aot_target(c["target"])
    assert_compiler_error(kernel_cases.compile_case({**c, "skip_check": True}), compiler)


def test_gpu_compiler_rejects_over_budget_blocks_without_the_front_end(aot_target, gpu_child):
    names = ("h100", "a100")
    for name in names:
        aot_target(OVER_BUDGET[name][0]["target"])
    cases = [{**OVER_BUDGET[n][0], "skip_check": True} for n in names]
    for name, result in zip(names, gpu_child("kernel_cases:compile_cases", cases), strict=True):
        assert_compiler_error(result, OVER_BUDGET[name][2])


BAD_REQUESTS = {  # name: (case, message)
    "tpu-head_dim-512": (case("tpu:v5e:2x2", head_dim=512), r"TPU kernel supports head_dim <= 256, got 512"),
    "tpu-float16": (
        case("tpu:v5e:2x2", dtype="float16"),
        r"TPU Pallas kernel takes float32 / bfloat16, got float16",
    ),
    "gpu-head_dim-512": (case("gpu:h100:1x8", head_dim=512), r"GPU kernel supports head_dim <= 256, got 512"),
    "gpu-fp8": (
        case("gpu:h100:1x8", dtype="float8_e4m3fn"),
        r"GPU Pallas kernel takes float32 / bfloat16 / float16, got float8_e4m3fn",
    ),
    "tpu-kernel-on-gpu": (
        case("gpu:h100:1x8", implementation="pallas_tpu"),
        r"TPU kernel cannot be compiled for GPU devices \(NVIDIA H100",
    ),
    "gpu-kernel-on-tpu": (
        case("tpu:v5p:2x2x1", implementation="pallas_gpu"),
        r"GPU kernel cannot be compiled for TPU",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_requests_a_target_cannot_serve_fail_before_compiling(aot_target, name):
    c, message = BAD_REQUESTS[name]
    aot_target(c["target"])
    assert_front_end_error(lowered(c), message)


def test_checks_catch_a_dense_fallback(aot_target):
    """The compile tests' assertions fail for plain XLA attention (no kernel, [seq, seq] scores)."""
    from test_kernels_compile import problems

    aot_target("tpu:v5e:2x2")
    found = problems(kernel_cases.compile_case(case("tpu:v5e:2x2", seq=512, implementation="xla")))
    assert any("no kernel custom call" in p for p in found), found
    assert any("dense [seq, seq] arrays" in p for p in found), found
