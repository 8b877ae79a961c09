"""GPU flash attention in Pallas (Triton lowering), FlashAttention-2 style, block-sparse.

Forward: grid (q_blocks, batch, heads); each program keeps (m, l, acc) in registers and loops over
its row of the plan: first the FULL KV tiles (no mask arithmetic), then the PARTIAL ones (mask_fn,
key padding, segment ids). EMPTY tiles are never loaded. Backward: dQ with the same grid and loops;
dK/dV with grid (kv_blocks, batch, heads) over the transposed plan, one output per query head
(summed per KV group outside), so there are no atomics and results are deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import tiles


def _compiler_params(cfg):
    if cfg.interpret:
        return None
    try:  # Triton is the lowering this kernel is written for; keep the choice here.
        from jax.experimental.pallas import triton as plgpu
    except ImportError:  # pragma: no cover - future JAX without the Triton backend
        return None
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _iota(n: int, axis: int) -> jax.Array:
    shape = (n, 1) if axis == 0 else (1, n)
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _seg_specs(bq: int, lk: int, q_blocked: bool, bk: int):
    """Segment-id specs: the query side blocked (forward/dQ) or whole (dK/dV)."""
    if q_blocked:
        return [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, lk), lambda i, b, h: (b, 0)),
        ]
    return [
        pl.BlockSpec((None, bq), lambda j, b, h: (b, 0)),
        pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
    ]


def _fwd_kernel(table_ref, *refs, cfg, tm, has_seg):
    if has_seg:
        qseg_ref, kvseg_ref, *refs = refs
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    bq, bk = cfg.block_q, cfg.block_kv
    q = q_ref[...]
    q_pos = pl.program_id(0) * bq + _iota(bq, 0)
    q_seg = qseg_ref[...][:, None] if has_seg else None
    c = cfg.scale * tiles.LOG2E

    def body(t, carry, masked):
        start = pl.multiple_of(table_ref[2 + t] * bk, bk)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        s = tiles.dot_nt(q, k) * c
        kv_seg = kvseg_ref[pl.ds(start, bk)][None, :] if has_seg else None
        vis = tiles.visible(tm, q_pos, start + _iota(bk, 1), q_seg, kv_seg, masked)
        return tiles.online_update(s, vis, v, *carry, keepdims=False)

    n_full, count = table_ref[0], table_ref[1]
    carry = tiles.init_state(bq, q.shape[-1], keepdims=False)
    carry = jax.lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    carry = jax.lax.fori_loop(n_full, count, functools.partial(body, masked=True), carry)
    out, lse = tiles.finalize(*carry, keepdims=False)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def forward(cfg, q, k, v, segs):
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (padded) -> (out [B, Lq, H, D], lse [B, H, Lq])."""
    plan = cfg.plan(backward=False)
    b, lq, h, dp = q.shape
    lk, g = k.shape[1], h // k.shape[2]
    bq, table = cfg.block_q, jnp.asarray(plan.rows.table())
    specs = [pl.BlockSpec((None, table.shape[1]), lambda i, b, h: (i, 0))]
    args = [table]
    if segs is not None:
        specs += _seg_specs(bq, lk, True, cfg.block_kv)
        args += list(segs)
    specs += [
        pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, lk, None, dp), lambda i, b, h: (b, 0, h // g, 0)),
        pl.BlockSpec((None, lk, None, dp), lambda i, b, h: (b, 0, h // g, 0)),
    ]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, tm=cfg.tile_mask(plan), has_seg=segs is not None)
    return pl.pallas_call(
        kernel,
        grid=(plan.num_q_blocks, b, h),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="flash_fwd_gpu",
    )(*args, q, k, v)


def _dq_kernel(table_ref, *refs, cfg, tm, has_seg):
    if has_seg:
        qseg_ref, kvseg_ref, *refs = refs
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...] * tiles.LOG2E, delta_ref[...]
    q_pos = pl.program_id(0) * bq + _iota(bq, 0)
    q_seg = qseg_ref[...][:, None] if has_seg else None
    c = cfg.scale * tiles.LOG2E

    def body(t, dq, masked):
        start = pl.multiple_of(table_ref[2 + t] * bk, bk)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        kv_seg = kvseg_ref[pl.ds(start, bk)][None, :] if has_seg else None
        vis = tiles.visible(tm, q_pos, start + _iota(bk, 1), q_seg, kv_seg, masked)
        p = tiles.probs(tiles.dot_nt(q, k) * c, lse2, vis, keepdims=False)
        ds = p * (tiles.dot_nt(do, v) - delta[:, None])
        return dq + tiles.dot_nn(ds.astype(k.dtype), k)

    n_full, count = table_ref[0], table_ref[1]
    dq = jnp.zeros(q.shape, jnp.float32)
    dq = jax.lax.fori_loop(0, n_full, functools.partial(body, masked=False), dq)
    dq = jax.lax.fori_loop(n_full, count, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, *refs, cfg, tm, has_seg):
    if has_seg:
        qseg_ref, kvseg_ref, *refs = refs
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    k, v = k_ref[...], v_ref[...]
    kv_pos = pl.program_id(0) * bk + _iota(bk, 1)
    kv_seg = kvseg_ref[...][None, :] if has_seg else None
    c = cfg.scale * tiles.LOG2E

    def body(t, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(table_ref[2 + t] * bq, bq)
        q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
        lse2 = lse_ref[pl.ds(start, bq)] * tiles.LOG2E
        delta = delta_ref[pl.ds(start, bq)]
        q_seg = qseg_ref[pl.ds(start, bq)][:, None] if has_seg else None
        vis = tiles.visible(tm, start + _iota(bq, 0), kv_pos, q_seg, kv_seg, masked)
        p = tiles.probs(tiles.dot_nt(q, k) * c, lse2, vis, keepdims=False)
        dv = dv + tiles.dot_tn(p.astype(do.dtype), do)
        ds = p * (tiles.dot_nt(do, v) - delta[:, None])
        return dk + tiles.dot_tn(ds.astype(q.dtype), q), dv

    n_full, count = table_ref[0], table_ref[1]
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    carry = jax.lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    dk, dv = jax.lax.fori_loop(n_full, count, functools.partial(body, masked=True), carry)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(cfg, q, k, v, segs, do, lse, delta):
    """Returns dq [B, Lq, H, D] and per-query-head dk, dv [B, Lk, H, D] (padded shapes)."""
    plan = cfg.plan(backward=True)
    tm, has_seg = cfg.tile_mask(plan), segs is not None
    b, lq, h, dp = q.shape
    lk, g = k.shape[1], h // k.shape[2]
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    seg_args = list(segs) if has_seg else []
    common = dict(compiler_params=_compiler_params(cfg), interpret=cfg.interpret)

    rows = jnp.asarray(plan.rows.table())
    q_blk = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
    kv_all = pl.BlockSpec((None, lk, None, dp), lambda i, b, h: (b, 0, h // g, 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, tm=tm, has_seg=has_seg),
        grid=(plan.num_q_blocks, b, h),
        in_specs=[pl.BlockSpec((None, rows.shape[1]), lambda i, b, h: (i, 0))]
        + (_seg_specs(bq, lk, True, bk) if has_seg else [])
        + [q_blk, kv_all, kv_all, q_blk, row_blk, row_blk],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_dq_gpu",
        **common,
    )(rows, *seg_args, q, k, v, do, lse, delta)

    cols = jnp.asarray(plan.cols.table())
    q_all = pl.BlockSpec((None, lq, None, dp), lambda j, b, h: (b, 0, h, 0))
    kv_blk = pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h // g, 0))
    row_all = pl.BlockSpec((None, None, lq), lambda j, b, h: (b, h, 0))
    out_blk = pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h, 0))
    grad_shape = jax.ShapeDtypeStruct((b, lk, h, dp), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, tm=tm, has_seg=has_seg),
        grid=(plan.num_kv_blocks, b, h),
        in_specs=[pl.BlockSpec((None, cols.shape[1]), lambda j, b, h: (j, 0))]
        + (_seg_specs(lq, lk, False, bk) if has_seg else [])
        + [q_all, kv_blk, kv_blk, q_all, row_all, row_all],
        out_specs=[out_blk, out_blk],
        out_shape=[grad_shape, grad_shape],
        name="flash_dkv_gpu",
        **common,
    )(cols, *seg_args, q, k, v, do, lse, delta)
    return dq, dk, dv
