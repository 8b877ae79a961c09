"""Pallas flash attention front end: block sizes, hardware checks, padding and the custom VJP.

The GPU family (`pallas_gpu`, Triton lowering) and the TPU family (`pallas_tpu`, Mosaic) share
this front end. Sequence lengths are padded to whole blocks (the plan masks padded keys) and the
head dim to the hardware tile: 16..256 powers of two on GPU, multiples of 128 on TPU. head_dim 72
thus pays 128/72 = 1.78x the matmul work of an unpadded kernel. Block sizes come from the table
in `blocks.py` (per target and head dim) and are checked against the hardware limits before any
compilation (`check_hardware`), also in interpret mode (which does not check them).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import blocks as blocks_lib
from pallas_kernels import platform as platform_lib
from pallas_kernels import residuals, tiles
from pallas_kernels.masks import Mask
from pallas_kernels.plan import BlockPlan, build_plan


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call (hashable; custom-VJP non-differentiable argument)."""

    family: str  # "gpu" or "tpu"
    mask: Mask
    scale: float
    seq_q: int
    seq_kv: int
    head_dim: int
    head_dim_padded: int
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2
    smem_bytes: int = platform_lib.GPU_SMEM_BYTES[(9, 0)]  # the GPU's shared memory per block
    vmem_bytes: int = platform_lib.TPU_VMEM_BYTES["v5e"]  # the TPU's scoped VMEM budget

    def plan(self, backward: bool = False) -> BlockPlan:
        bq, bk = (self.block_q_bwd, self.block_kv_bwd) if backward else (self.block_q, self.block_kv)
        return build_plan(self.mask, self.seq_q, self.seq_kv, bq, bk)

    def tile_mask(self, plan: BlockPlan) -> tiles.TileMask:
        return tiles.TileMask(self.mask, plan.mask_partial, self.seq_kv, plan.kv_padded)

    @property
    def blocks(self) -> blocks_lib.Blocks:
        return blocks_lib.Blocks(self.block_q, self.block_kv, self.block_q_bwd, self.block_kv_bwd,
                                 self.num_warps, self.num_stages)  # fmt: skip

    @property
    def padded_q(self) -> int:  # a multiple of both Q blocks (the default ones divide each other)
        return _round_up(self.seq_q, math.lcm(self.block_q, self.block_q_bwd))

    @property
    def padded_kv(self) -> int:
        return _round_up(self.seq_kv, math.lcm(self.block_kv, self.block_kv_bwd))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_config(family, mask, scale, seq_q, seq_kv, head_dim, dtype, interpret, target=None) -> Config:
    """The block table's sizes for `target` (`blocks.py`), fitted to the sequence lengths."""
    if family not in ("gpu", "tpu"):
        raise ValueError(f"unknown Pallas kernel family {family!r}; expected 'gpu' or 'tpu'")
    target = target or platform_lib.current()
    if family == "gpu":
        dp = max(16, _next_pow2(head_dim))

        def whole(n):
            return max(16, _next_pow2(n))
    else:
        dp = _round_up(head_dim, blocks_lib.LANES)

        def whole(n):
            return _round_up(n, blocks_lib.LANES)

    b = blocks_lib.choose(family, target, dp, dtype)
    bq, bq_b = blocks_lib.fit_to_sequence(b.block_q, b.block_q_bwd, whole(seq_q))
    bk, bk_b = blocks_lib.fit_to_sequence(b.block_kv, b.block_kv_bwd, whole(seq_kv))
    return Config(family, mask, float(scale), seq_q, seq_kv, head_dim, dp, bq, bk, bq_b, bk_b,
                  bool(interpret), b.num_warps, b.num_stages, target.smem_bytes,
                  target.vmem_bytes)  # fmt: skip


def check_hardware(cfg: Config, dtype) -> None:
    """Raises ValueError when block sizes break the target hardware's limits (before compiling)."""
    blocks = (cfg.block_q, cfg.block_kv, cfg.block_q_bwd, cfg.block_kv_bwd)
    dp = cfg.head_dim_padded
    top = blocks_lib.head_dims(cfg.family)[-1]
    if dp > top:
        raise ValueError(f"the {cfg.family.upper()} kernel supports head_dim <= {top}, got {cfg.head_dim}")
    if cfg.family == "gpu":
        for b in (*blocks, dp):
            if b < 16 or b & (b - 1):
                raise ValueError(f"GPU (Triton) tiles need powers of two >= 16, got {b} in {blocks}, d={dp}")
        limit, memory = cfg.smem_bytes, "shared memory"
    else:
        if any(b % 8 for b in (cfg.block_q, cfg.block_q_bwd)) or any(
            b % 128 for b in (cfg.block_kv, cfg.block_kv_bwd)
        ):
            raise ValueError(f"TPU tiles need block_q % 8 == 0 and block_kv % 128 == 0, got {blocks}")
        if dp % 128:
            raise ValueError(f"TPU tiles need head_dim padded to a multiple of 128, got {dp}")
        limit, memory = cfg.vmem_bytes, "VMEM"
    need = max(blocks_lib.kernel_bytes(cfg.family, cfg.blocks, dp, dtype))
    if need > limit:
        raise ValueError(
            f"blocks {blocks} with head_dim {dp} and {jnp.dtype(dtype).name} need ~{need} bytes of "
            f"{memory} (limit {limit}); use smaller blocks"
        )


def unsupported(dtype, mask: Mask, cfg: Config) -> str | None:
    """Why the Pallas kernel cannot run this case, or None."""
    dtypes = (jnp.float32, jnp.bfloat16) if cfg.family == "tpu" else (jnp.float32, jnp.bfloat16, jnp.float16)
    if jnp.dtype(dtype) not in dtypes:
        names = " / ".join(jnp.dtype(d).name for d in dtypes)
        return f"the {cfg.family.upper()} Pallas kernel takes {names}, got {jnp.dtype(dtype).name}"
    try:
        check_hardware(cfg, dtype)
    except ValueError as e:
        return str(e)
    if not mask.in_kernel:
        for backward in (False, True):
            if cfg.plan(backward).mask_partial:
                return (
                    f"{type(mask).__name__} cuts the kernel's tiles ({cfg.block_q}x{cfg.block_kv}) "
                    "into partial blocks, which the Pallas kernels cannot evaluate; align its "
                    "block_shape to multiples of the tiles or use implementation='chunked'"
                )
    return None


_BLOCK_FIELDS = ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd")


def _family(cfg: Config):
    if cfg.family == "gpu":
        from pallas_kernels import pallas_gpu as module
    else:
        from pallas_kernels import pallas_tpu as module
    return module


def _pad(x: jax.Array, length: int, dim: int, value=0) -> jax.Array:
    pads = [(0, 0)] * x.ndim
    pads[1] = (0, length - x.shape[1])
    if x.ndim == 4:
        pads[3] = (0, dim - x.shape[3])
    return jnp.pad(x, pads, constant_values=value)


def padded_inputs(cfg: Config, q, k, v, q_ids, kv_ids):
    dp = cfg.head_dim_padded
    qp, kp, vp = _pad(q, cfg.padded_q, dp), _pad(k, cfg.padded_kv, dp), _pad(v, cfg.padded_kv, dp)
    segs = None
    if q_ids is not None:
        segs = (_pad(q_ids.astype(jnp.int32), cfg.padded_q, 0, -1),
                _pad(kv_ids.astype(jnp.int32), cfg.padded_kv, 0, -2))  # fmt: skip
    return qp, kp, vp, segs


def _forward(cfg: Config, q, k, v, q_ids, kv_ids):
    qp, kp, vp, segs = padded_inputs(cfg, q, k, v, q_ids, kv_ids)
    out, lse = _family(cfg).forward(cfg, qp, kp, vp, segs)
    return out[:, : cfg.seq_q, :, : cfg.head_dim].astype(q.dtype), lse[:, :, : cfg.seq_q]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, q_ids, kv_ids, cfg: Config):
    return _forward(cfg, q, k, v, q_ids, kv_ids)


def _attend_fwd(q, k, v, q_ids, kv_ids, cfg):
    out, lse = _forward(cfg, q, k, v, q_ids, kv_ids)
    out, lse = residuals.named(out, lse)  # the outputs are the residuals: one value, saved once
    return (out, lse), (q, k, v, q_ids, kv_ids, out, lse)


def flash_backward(cfg, res, cotangents):
    """The custom-VJP backward of the flash kernels (also under the Mosaic GPU forward, whose LSE
    convention is the same): dq, dk, dv from the saved inputs, output and LSE."""
    q, k, v, q_ids, kv_ids, out, lse = res
    dout, dlse = cotangents
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see nothing get p = 0 from the mask
    qp, kp, vp, segs = padded_inputs(cfg, q, k, v, q_ids, kv_ids)
    dop = _pad(dout, cfg.padded_q, cfg.head_dim_padded)
    lse, delta = (jnp.pad(x, ((0, 0), (0, 0), (0, cfg.padded_q - cfg.seq_q))) for x in (lse, delta))
    dq, dk, dv = _family(cfg).backward(cfg, qp, kp, vp, segs, dop, lse, delta)
    b, lk, h, dp = dk.shape
    hkv = k.shape[2]
    dk = dk.reshape(b, lk, hkv, h // hkv, dp).sum(3)  # each KV head sums its query group
    dv = dv.reshape(b, lk, hkv, h // hkv, dp).sum(3)
    sl_q, sl_k, d = slice(0, cfg.seq_q), slice(0, cfg.seq_kv), cfg.head_dim
    return (dq[:, sl_q, :, :d].astype(q.dtype), dk[:, sl_k, :, :d].astype(k.dtype),
            dv[:, sl_k, :, :d].astype(v.dtype), None, None)  # fmt: skip


_attend.defvjp(_attend_fwd, flash_backward)


def attention(
    q, k, v, *, mask: Mask, scale: float, q_ids=None, kv_ids=None, family: str, interpret: bool, blocks=None,
    target: platform_lib.Platform | None = None,
):  # fmt: skip
    """Flash attention with a Pallas kernel; returns (out [B, Lq, H, D], lse [B, H, Lq]).

    `blocks`: a `blocks.Blocks`, or (block_q, block_kv, block_q_bwd, block_kv_bwd), overrides the
    table. `target`: the platform compiled for (default: `platform.current()`).
    """
    target = target or platform_lib.current()
    cfg = default_config(family, mask, scale, q.shape[1], k.shape[1], q.shape[3], q.dtype, interpret, target)
    if blocks is not None:
        if not isinstance(blocks, blocks_lib.Blocks):
            blocks = dataclasses.replace(cfg.blocks, **dict(zip(_BLOCK_FIELDS, blocks, strict=True)))
        cfg = dataclasses.replace(cfg, **dataclasses.asdict(blocks))
    problem = unsupported(q.dtype, mask, cfg)
    if problem is not None:
        raise ValueError(f"implementation 'pallas_{family}' cannot run this case: {problem}")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError("the Pallas kernels need v's head_dim equal to q's")
    if not interpret and target.name != family:
        raise ValueError(
            f"the {family.upper()} kernel cannot be compiled for {target.name.upper()} devices "
            f"({target.device_kind}); pass interpret=True to run it elsewhere, or compile under "
            f"jax.set_mesh of a {family.upper()} mesh"
        )
    return _attend(q, k, v, q_ids, kv_ids, cfg)
