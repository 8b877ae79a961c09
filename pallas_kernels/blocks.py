"""Block sizes per compile target and padded head dim, and the on-chip memory each choice needs.

`TABLE` holds the largest tiles per target. tests/aot compiles every entry for its chip, and
`tpu_vmem_bytes` / `gpu_smem_bytes` bound what the compilers really allocate (figures below and in
their docstrings; the GPU bound is also checked live against XLA's report). `choose` halves blocks
of the kernel (forward or backward) whose estimate does not fit the target's budget for the dtype:
f32 on some entries, and chips without a row of their own (TPU v4 takes v5e's; GPUs with 99 KiB of
shared memory such as sm_86 / sm_89 / sm_120 take sm_80's, shrunk).

Why these entries (bf16, d = 128 unless said):
- TPU: a grid step costs ~0.35 us of fixed overhead (Pallas TPU docs), so a step should hold over
  1 us of MXU work: a forward step is 4 * bq * bk * d flops, 1.4 us at 1024x512 on v5e (197 TF/s),
  1.2 us at 1024x1024 on v5p (459 TF/s) and at 2048x1024 on v6e (918 TF/s). VMEM bounds the tiles:
  Mosaic needs 5.0 MiB for a 1024x512 forward and 1.75 MiB for a 512x512 backward of v5e's 16 MiB
  scoped budget; 7.5 MiB for 1024x1024 and 15.3 MiB for 2048x1024 (v5p and v6e: 32 MiB). The
  backward kernels do 2.5x the forward's work per tile and hold more state (dQ or dK/dV, dO, LSE,
  delta), so their tiles are at most as large. head_dim pads to 128 lanes (64 costs as much as
  128: the MXU is 128 deep); d = 256 halves block_q. Mosaic's compile time grows with the tile
  area: 3-5 s for v5e's and v5p's forward + backward, 13 s for v6e's.
- GPU (Triton, FlashAttention-2 style): the f32 accumulator [block_q, d] lives in registers:
  [128, 64] is 64 registers per thread with 4 warps; [128, 128] and [128, 256] need 8 warps (64
  and 128 registers). Forward 128x128 for d <= 64 and 128x64 for d = 128 are FlashAttention-2's
  A100/H100 tiles; the backward keeps two accumulators (dK and dV) and recomputes P: 64x64, and
  64x32 / 32x32 at d = 256. Two stages: the K/V loads follow the block table (data-dependent), and
  Triton allocates two buffers whatever num_stages says (the same shared memory for 2, 3 and 4 on
  sm_80 and sm_90). d = 256 forward: 128x64 on H100 (192 KiB of 227), 64x64 on A100 (104 KiB used,
  160 estimated, of 163).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels import platform as platform_lib

LANES = 128  # TPU vector lanes: a [rows, 1] f32 block occupies [rows, 128] of VMEM


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes of the forward and the two backward kernels, and Triton launch parameters."""

    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    num_warps: int = 4  # GPU only
    num_stages: int = 2  # GPU only

    def halved(self, backward: bool, min_kv: int = 16) -> Blocks | None:
        """These blocks with the forward (or backward) kernel's larger block halved, KV first on
        ties; None when neither can shrink. KV blocks stop at `min_kv` (TPU: 128 lanes), Q at 16."""
        names = ("block_kv_bwd", "block_q_bwd") if backward else ("block_kv", "block_q")
        floors = dict(zip(names, (min_kv, 16), strict=True))
        shrinkable = [n for n in names if getattr(self, n) // 2 >= floors[n]]
        if not shrinkable:
            return None
        name = max(shrinkable, key=lambda n: getattr(self, n))
        return dataclasses.replace(self, **{name: getattr(self, name) // 2})


#: (target, padded head_dim) -> largest blocks. Targets: TPU generation, GPU "sm_<major><minor>".
TABLE: dict[tuple[str, int], Blocks] = {
    ("v5e", 128): Blocks(1024, 512, 512, 512),
    ("v5e", 256): Blocks(512, 512, 256, 512),
    ("v5p", 128): Blocks(1024, 1024, 1024, 512),
    ("v5p", 256): Blocks(512, 1024, 512, 512),
    ("v6e", 128): Blocks(2048, 1024, 1024, 1024),
    ("v6e", 256): Blocks(1024, 1024, 512, 1024),
    ("sm_80", 64): Blocks(128, 128, 64, 64, num_warps=4),
    ("sm_80", 128): Blocks(128, 64, 64, 64, num_warps=8),
    ("sm_80", 256): Blocks(64, 64, 32, 32, num_warps=8),
    ("sm_90", 64): Blocks(128, 128, 64, 64, num_warps=4),
    ("sm_90", 128): Blocks(128, 64, 64, 64, num_warps=8),
    ("sm_90", 256): Blocks(128, 64, 64, 32, num_warps=8),
}


def target_key(family: str, target: platform_lib.Platform) -> str:
    """The TABLE row for `target`: its own when listed, else the nearest smaller chip of the family.

    CPU (interpret mode) uses v5e for the TPU kernel and sm_90 for the GPU kernel, the budgets
    `Platform` reports there.
    """
    if family == "tpu":
        gen = target.tpu_generation
        return gen if any(k == gen for k, _ in TABLE) else "v5e"
    cc = target.compute_capability
    return "sm_90" if cc is None or cc >= (9, 0) else "sm_80"


def head_dims(family: str) -> tuple[int, ...]:
    """Padded head dims the table covers for a family (TPU pads to lanes, GPU to powers of two)."""
    return (128, 256) if family == "tpu" else (64, 128, 256)


def tpu_vmem_bytes(blocks: Blocks, head_dim: int, itemsize: int) -> tuple[int, int]:
    """Upper bounds on the scoped VMEM of the TPU forward kernel and of the larger backward one.

    Counts double-buffered input / output blocks, [rows, 1] blocks padded to 128 lanes, the f32
    scratch and one [bq, bk] f32 logits tile. Mosaic's needs on v5e, d = 128, bf16 (the smallest
    vmem_limit_bytes that compiles), MiB, this bound in brackets, forward / dQ / dK,dV:
    512x512: 2.5 [3.25] / 1.25 [3.5] / 1.75 [4.5]; 1024x512: 5.0 [6.0] / 3.1 [6.5] / 2.9 [7.0];
    1024x1024: 7.5 [8.5] / 5.6 [9.0] / 6.1 [11.0]; 2048x1024: 15.25 [16.0] / 11.4 [17.0] / 11.6
    [18.0]; 2048x2048 forward: 22.9 [25.0].
    """
    d, row, b = head_dim, LANES * 4, blocks
    bq, bk = b.block_q, b.block_kv
    fwd = 2 * (2 * bq + 2 * bk) * d * itemsize + 4 * bq * row + bq * d * 4 + bq * bk * 4
    bq, bk = b.block_q_bwd, b.block_kv_bwd
    dq = 2 * (3 * bq + 2 * bk) * d * itemsize + 4 * bq * row + bq * d * 4 + bq * bk * 4
    dkv = 2 * (2 * bq + 2 * bk) * d * itemsize + 4 * bq * row + 6 * bk * d * 4 + bq * bk * 4
    return fwd, max(dq, dkv)


def gpu_smem_bytes(blocks: Blocks, head_dim: int, itemsize: int) -> tuple[int, int]:
    """Upper bounds on the shared memory of the GPU (Triton) forward kernel and of the larger
    backward one.

    The tile held for the whole loop, `stages` (at most 2, see the module docstring) buffers of each
    tile the loop streams, the transposed P / dS tile of dK/dV, and 2 KiB of barriers and row
    statistics. Equal to what XLA reports for bf16 on H100 (thunk dump `shared_memory:`), e.g. 96
    KiB for a 128x64 forward at d = 128, 105 for a 64x64 dK/dV; above it for f32 and on A100,
    whose Triton pipeline buffers less (64 KiB for the same forward).
    """
    b, d, s = blocks, head_dim, min(max(blocks.num_stages, 1), 2)
    fwd = (b.block_q + 2 * s * b.block_kv) * d * itemsize
    dq = (2 * b.block_q_bwd + 2 * s * b.block_kv_bwd) * d * itemsize
    dkv = (
        2 * b.block_kv_bwd + 2 * s * b.block_q_bwd
    ) * d * itemsize + b.block_q_bwd * b.block_kv_bwd * itemsize
    return fwd + 2048, max(dq, dkv) + 2048


def kernel_bytes(family: str, blocks: Blocks, head_dim: int, dtype) -> tuple[int, int]:
    """On-chip bytes (VMEM on TPU, shared memory on GPU) of the forward and the backward kernels."""
    item = jnp.dtype(dtype).itemsize
    return (tpu_vmem_bytes if family == "tpu" else gpu_smem_bytes)(blocks, head_dim, item)


def budget_bytes(family: str, target: platform_lib.Platform) -> int:
    return target.vmem_bytes if family == "tpu" else target.smem_bytes


def choose(family: str, target: platform_lib.Platform, head_dim: int, dtype) -> Blocks:
    """The largest table blocks for `target` and padded `head_dim` that fit its budget for `dtype`.

    Never raises: a head_dim beyond the table gets the largest entry, and blocks that cannot shrink
    into the budget are returned as they are, for `pallas_attention.check_hardware` to report.
    """
    dims = [d for d in head_dims(family) if d >= head_dim] or [head_dims(family)[-1]]
    blocks = TABLE[target_key(family, target), dims[0]]
    budget, min_kv = budget_bytes(family, target), (LANES if family == "tpu" else 16)
    while True:
        fwd, bwd = kernel_bytes(family, blocks, head_dim, dtype)
        smaller = blocks.halved(fwd <= budget, min_kv) if max(fwd, bwd) > budget else None
        if smaller is None:
            return blocks
        blocks = smaller


def fit_to_sequence(fwd: int, bwd: int, whole: int) -> tuple[int, int]:
    """Forward and backward blocks along one axis for a sequence that `whole` tokens cover.

    `whole`: the sequence rounded up to the hardware tile. Blocks never exceed it (a short sequence
    is one block), and the larger block is a multiple of the smaller, so one padded length serves
    the forward and the backward plans.
    """
    small = min(fwd, bwd, whole)
    large = min(max(fwd, bwd), -(-whole // small) * small)
    return (large, small) if fwd >= bwd else (small, large)
