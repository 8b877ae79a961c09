"""Hopper flash attention forward in Pallas Mosaic GPU, FlashAttention-3 style, block-sparse.

One CTA per (128-query block, head, batch) runs three warpgroups. Warpgroup 2, the producer (40
registers), streams the K/V tiles of the block's plan row by TMA into a ring of `stages` shared-memory
slots. Warpgroups 0 and 1, the consumers (232 registers), own 64 query rows each and run QK^T and PV
on the tensor cores (wgmma), with the online softmax in registers in between; a shared "schedule"
barrier staggers them so that one's softmax overlaps the other's matmuls (ping-pong). Both consumers
walk the same plan row (the plan's query block is the CTA's 128 rows): the FULL tiles first, without
mask arithmetic, then the PARTIAL ones (mask_fn, key padding); EMPTY tiles are never loaded. A slot is
refilled once both consumers have arrived on its "consumed" barrier.

Backward: the Triton kernels (`pallas_gpu.backward`) under the same custom VJP as `pallas_attention`;
both forwards return the LSE as natural log, f32, [B, H, Lq]. Rows that see no key output 0 with
LSE = -inf. Segment ids (packed sequences) are not served here: the dispatcher falls back to Triton.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import pallas_attention, residuals, tiles
from pallas_kernels import platform as platform_lib
from pallas_kernels.masks import Mask

WG_ROWS = 64  # query rows per consumer warpgroup (one wgmma M tile)
CONSUMERS = 2
BLOCK_Q = WG_ROWS * CONSUMERS  # query rows per CTA = the plan's query block
BLOCK_KV = 128
MAX_STAGES = 4
SMEM_MARGIN = 8 * 1024  # barriers, LSE staging and whatever Mosaic GPU reserves
CONSUMER_REGISTERS, PRODUCER_REGISTERS = 232, 40  # 2 x 232 + 40 warps' worth fits 64K registers
KERNEL_NAME = "flash_fwd_mgpu"


def _plgpu():
    """The Mosaic GPU Pallas module (imported lazily: it needs absl and the GPU lowering)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu


def interpretable() -> bool:
    """Whether this JAX's Mosaic GPU interpreter runs the kernel (JAX >= 0.11; 0.10's takes no
    transposed wgmma operands and no layout casts)."""
    return hasattr(_plgpu(), "InterpretGPUParams")


def padded_head_dim(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def stages(head_dim_padded: int, itemsize: int, smem_bytes: int) -> int:
    """K/V ring depth: as many slots (2..MAX_STAGES) as the shared memory holds."""
    q_bytes = BLOCK_Q * head_dim_padded * itemsize
    slot_bytes = 2 * BLOCK_KV * head_dim_padded * itemsize
    return max(0, min(MAX_STAGES, (smem_bytes - SMEM_MARGIN - q_bytes) // slot_bytes))


def default_config(mask, scale, seq_q, seq_kv, head_dim, dtype, interpret, target) -> pallas_attention.Config:
    """The Triton config (its backward blocks serve the VJP) with this kernel's forward tiles."""
    base = pallas_attention.default_config(
        "gpu", mask, scale, seq_q, seq_kv, head_dim, dtype, interpret, target
    )
    return dataclasses.replace(
        base, block_q=BLOCK_Q, block_kv=BLOCK_KV, head_dim_padded=padded_head_dim(head_dim)
    )


def problem(q_shape, k_shape, dtype, mask: Mask, has_segments: bool, target, interpret) -> str | None:
    """Why this kernel (forward) plus the Triton backward cannot serve the case, or None.

    Checked before any compilation: asking Mosaic GPU for wgmma on a pre-Hopper GPU aborts the process.
    """
    if not interpret and not target.is_hopper:
        return (
            "the Mosaic GPU kernel (TMA + wgmma) compiles only for Hopper GPUs (sm_90), but the computation "
            f"is compiled for {target.name} ({target.device_kind}, compute capability "
            f"{target.compute_capability}); use 'pallas' (Triton) there, or interpret=True"
        )
    head_dim = q_shape[3]
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"it takes bfloat16 / float16, got {jnp.dtype(dtype)}"
    if head_dim > 128:
        return f"it supports head_dim <= 128 (padded to 64 or 128), got {head_dim}"
    if has_segments:
        return "it does not take segment ids (packed sequences / per-example key padding)"
    cfg = default_config(mask, 1.0, q_shape[1], k_shape[1], head_dim, dtype, bool(interpret), target)
    if interpret and not interpretable():
        return f"JAX {jax.__version__}'s Mosaic GPU interpreter cannot run it (JAX >= 0.11 can)"
    if stages(cfg.head_dim_padded, jnp.dtype(dtype).itemsize, cfg.smem_bytes) < 2:
        return f"{cfg.smem_bytes} bytes of shared memory hold fewer than two K/V slots"
    # Also the Triton backward's limits, and masks that cannot be evaluated in a kernel (BlockSparse)
    # cutting the forward (128 x 128) or backward tiles.
    return pallas_attention.unsupported(dtype, mask, cfg)


def _pv(plgpu, acc, p16, v_tile, p_smem):
    """acc + P @ V on the tensor cores.

    Compiled: P is wgmma's register operand and accumulates into `acc` in place (FA3). Interpreted
    (`p_smem` given): the Mosaic GPU interpreter takes neither register operands nor `run_state`
    accumulators, so P goes through shared memory into a fresh accumulator that is added.
    """
    if p_smem is None:

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_tile)

        return pl.run_state(pv)(plgpu.ACC.init(acc))
    p_smem[...] = p16
    plgpu.commit_smem()

    def pv_fresh(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_tile)
        return acc_ref[...]

    return acc + pl.run_scoped(pv_fresh, plgpu.ACC(acc.shape, jnp.float32))


def _kernel(table_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, smem, bars, *, cfg, tm, group, n_stages):
    plgpu = _plgpu()
    qo_smem, k_smem, v_smem, lse_smem, p_smem = smem
    k_ready, v_ready, q_ready, k_free, v_free, schedule = bars
    qi, head, batch = lax.axis_index("q"), lax.axis_index("heads"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    n_full, count = table_ref[qi, 0], table_ref[qi, 1]
    bk, dp, dtype = BLOCK_KV, cfg.head_dim_padded, q_ref.dtype

    def kv_start(t):  # first key of the t-th tile of this query block's plan row
        return pl.multiple_of(table_ref[qi, 2 + t] * bk, bk)

    def slot_of(t):
        return lax.rem(t, jnp.asarray(n_stages, t.dtype))

    def sync():  # ping-pong: each consumer waits for the other between its matmul phases
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
        kv_head = lax.div(head, jnp.asarray(group, head.dtype))

        def fetch(t, slot, wait: bool):
            rows = pl.ds(kv_start(t), bk)
            if wait:
                plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem.at[slot], k_ready.at[slot])
            if wait:
                plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[slot], v_ready.at[slot])

        for t in range(n_stages):
            pl.when(t < count)(functools.partial(fetch, jnp.int32(t), t, False))

        def refill(t, _):
            fetch(t, slot_of(t), True)

        lax.fori_loop(jnp.int32(n_stages), count, refill, None)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        qo = qo_smem.at[wg]
        q_base = qi * BLOCK_Q + wg * WG_ROWS
        q_rows = pl.ds(q_base, WG_ROWS)
        plgpu.copy_gmem_to_smem(q_ref.at[batch, q_rows, head], qo, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        rows_layout, tile_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA
        m = plgpu.layout_cast(jnp.full((WG_ROWS,), tiles.MASK_VALUE, jnp.float32), rows_layout)
        l_sum = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), rows_layout)
        acc = plgpu.layout_cast(jnp.zeros((WG_ROWS, dp), jnp.float32), tile_layout)
        c = cfg.scale * tiles.LOG2E

        def rows(x, shape):
            return lax.broadcast_in_dim(x, shape, [0])

        def step(t, carry, masked: bool):
            acc, m, l_sum = carry
            slot = slot_of(t)
            plgpu.barrier_wait(k_ready.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, qo, k_smem.at[slot].transpose((1, 0)))
                sync()
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = s * c
            vis = None
            if masked:
                shape = (WG_ROWS, bk)
                q_pos = q_base + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=tile_layout)
                kv_pos = kv_start(t) + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=tile_layout)
                vis = tiles.visible(tm, q_pos, kv_pos, None, None, masked=True)
                if vis is not None:
                    s = jnp.where(vis, s, tiles.MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - rows(m_new, s.shape))
            if vis is not None:
                p = jnp.where(vis, p, 0.0)
            acc = acc * rows(alpha, acc.shape)
            l_sum = l_sum * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_sum, m_new, p16 = lax.optimization_barrier((acc, l_sum, m_new, p16))
            plgpu.barrier_arrive(schedule)  # softmax done
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(schedule)  # the other consumer's QK^T has been issued

            acc = _pv(plgpu, acc, p16, v_smem.at[slot], None if p_smem is None else p_smem.at[wg])
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_sum

        pl.when(wg == 1)(sync)
        carry = (acc, m, l_sum)
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
        acc, m, l_sum = lax.fori_loop(n_full, count, functools.partial(step, masked=True), carry)
        pl.when(wg == 0)(sync)

        seen = l_sum > 0
        safe = jnp.where(seen, l_sum, 1.0)
        qo[...] = (acc * rows(1.0 / safe, acc.shape)).astype(dtype)
        lse_smem.at[wg][...] = jnp.where(seen, m * tiles.LN2 + jnp.log(safe), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo, out_ref.at[batch, q_rows, head])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, q_rows])
        plgpu.wait_smem_to_gmem(0)


def forward(cfg: pallas_attention.Config, q, k, v):
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (padded) -> (out [B, Lq, H, D], lse [B, H, Lq] f32)."""
    plgpu = _plgpu()
    plan = cfg.plan(backward=False)
    b, lq, h, dp = q.shape
    n_stages = stages(dp, q.dtype.itemsize, cfg.smem_bytes)
    tile = plgpu.TilingTransform((8, 128 // q.dtype.itemsize))
    swizzle = plgpu.SwizzleTransform(128)
    smem = (
        plgpu.SMEM((CONSUMERS, WG_ROWS, dp), q.dtype, transforms=(tile, swizzle)),
        plgpu.SMEM((n_stages, BLOCK_KV, dp), q.dtype, transforms=(tile, swizzle)),
        plgpu.SMEM((n_stages, BLOCK_KV, dp), q.dtype, transforms=(tile, swizzle)),
        plgpu.SMEM((CONSUMERS, WG_ROWS), jnp.float32),
        plgpu.SMEM((CONSUMERS, WG_ROWS, BLOCK_KV), q.dtype, transforms=(tile, swizzle))
        if cfg.interpret
        else None,
    )
    bars = (
        plgpu.Barrier(num_barriers=n_stages),  # K slot filled
        plgpu.Barrier(num_barriers=n_stages),  # V slot filled
        plgpu.Barrier(num_barriers=CONSUMERS),  # Q tile of each consumer
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=n_stages),  # K slot consumed
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=n_stages),  # V slot consumed
        plgpu.Barrier(num_arrivals=CONSUMERS),  # ping-pong schedule
    )
    body = functools.partial(
        _kernel, cfg=cfg, tm=cfg.tile_mask(plan), group=h // k.shape[2], n_stages=n_stages
    )
    body.__name__ = KERNEL_NAME
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)),
        scratch_types=(smem, bars),
        grid=(plan.num_q_blocks, h, b),
        grid_names=("q", "heads", "batch"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
    )(jnp.asarray(plan.rows.table()), q, k, v)


def _forward(cfg, q, k, v):
    qp, kp, vp, _ = pallas_attention.padded_inputs(cfg, q, k, v, None, None)
    out, lse = forward(cfg, qp, kp, vp)
    return out[:, : cfg.seq_q, :, : cfg.head_dim].astype(q.dtype), lse[:, :, : cfg.seq_q]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend(q, k, v, cfg: pallas_attention.Config):
    return _forward(cfg, q, k, v)


def _attend_fwd(q, k, v, cfg):
    out, lse = _forward(cfg, q, k, v)
    out, lse = residuals.named(out, lse)  # the outputs are the residuals: one value, saved once
    return (out, lse), (q, k, v, out, lse)


def _attend_bwd(cfg, res, cotangents):
    q, k, v, out, lse = res
    dq, dk, dv, _, _ = pallas_attention.flash_backward(cfg, (q, k, v, None, None, out, lse), cotangents)
    return dq, dk, dv


_attend.defvjp(_attend_fwd, _attend_bwd)


def attention(
    q, k, v, *, mask: Mask, scale: float, interpret: bool | None = None,
    target: platform_lib.Platform | None = None,
):  # fmt: skip
    """Flash attention, Mosaic GPU forward + Triton backward: (out [B, Lq, H, D], lse [B, H, Lq]).

    Compiles only for Hopper (sm_90); elsewhere it raises ValueError before any compilation unless
    `interpret=True` (the Mosaic GPU interpreter, JAX >= 0.11, e.g. on CPU for tests).
    """
    target = target or platform_lib.current()
    why = problem(q.shape, k.shape, q.dtype, mask, False, target, interpret)
    if why is None and v.shape[-1] != q.shape[-1]:
        why = "v's head_dim must equal q's"
    if why is not None:
        raise ValueError(f"implementation 'pallas_mgpu' cannot run this case: {why}")
    cfg = default_config(mask, scale, q.shape[1], k.shape[1], q.shape[3], q.dtype, bool(interpret), target)
    return _attend(q, k, v, cfg)
