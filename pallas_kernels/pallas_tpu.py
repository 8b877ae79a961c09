"""TPU flash attention in Pallas (Mosaic), splash-attention style, block-sparse.

Layout [B, H, L, D] (heads outside, so tiles are (block, head_dim) with lanes on head_dim). The KV
(or, for dK/dV, the Q) block is the last, "arbitrary" grid axis; m / l / acc live in VMEM scratch,
initialised and finalised with `pl.when`. The plan table is scalar-prefetched and drives the
index_maps, so EMPTY blocks are never copied in, and the grid has only as many steps as the
busiest row has non-empty blocks (steps past a row's count repeat its last block: no new DMA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tiles


def _iota(n: int, axis: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (n, 1) if axis == 0 else (1, n), axis)


def _heads_first(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, scratch, name):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=cfg.vmem_bytes,  # the budget `check_hardware` planned for, enforced by Mosaic
        ),
        interpret=cfg.interpret,
        name=name,
    )


def _fwd_kernel(tbl, *refs, cfg, tm, has_seg, width, steps):
    if has_seg:
        qseg_ref, kvseg_ref, *refs = refs
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    i, t = pl.program_id(2), pl.program_id(3)
    bq, bk = cfg.block_q, cfg.block_kv
    base = i * width
    n_full, count = tbl[base], tbl[base + 1]

    @pl.when(t == 0)
    def _init():
        m_sc[...], l_sc[...], acc_sc[...] = tiles.init_state(bq, acc_sc.shape[-1], keepdims=True)

    def step(masked):
        start = tbl[base + 2 + t] * bk
        s = tiles.dot_nt(q_ref[...], k_ref[...]) * (cfg.scale * tiles.LOG2E)
        q_seg, kv_seg = (qseg_ref[...], kvseg_ref[...]) if has_seg else (None, None)
        vis = tiles.visible(tm, i * bq + _iota(bq, 0), start + _iota(bk, 1), q_seg, kv_seg, masked)
        state = tiles.online_update(s, vis, v_ref[...], m_sc[...], l_sc[...], acc_sc[...], keepdims=True)
        m_sc[...], l_sc[...], acc_sc[...] = state

    pl.when(t < n_full)(functools.partial(step, False))
    pl.when((t >= n_full) & (t < count))(functools.partial(step, True))

    @pl.when(t == steps - 1)
    def _finish():
        out, lse = tiles.finalize(m_sc[...], l_sc[...], acc_sc[...], keepdims=True)
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _seg_inputs(segs):
    return [segs[0][:, :, None], segs[1][:, None, :]] if segs is not None else []


def forward(cfg, q, k, v, segs):
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (padded) -> (out [B, Lq, H, D], lse [B, H, Lq])."""
    plan = cfg.plan(backward=False)
    b, lq, h, dp = q.shape
    g = h // k.shape[2]
    bq, bk = cfg.block_q, cfg.block_kv
    width, steps = 2 + plan.rows.steps, plan.rows.steps
    table = jnp.asarray(plan.rows.table().reshape(-1))

    def kv_index(b, h, i, t, tbl):
        return (b, h // g, tbl[i * width + 2 + t], 0)

    specs = []
    if segs is not None:
        specs += [
            pl.BlockSpec((None, bq, 1), lambda b, h, i, t, tbl: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, h, i, t, tbl: (b, 0, tbl[i * width + 2 + t])),
        ]
    q_spec = pl.BlockSpec((None, None, bq, dp), lambda b, h, i, t, tbl: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, dp), kv_index)
    lse_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, t, tbl: (b, h, i, 0))
    kernel = functools.partial(
        _fwd_kernel, cfg=cfg, tm=cfg.tile_mask(plan), has_seg=segs is not None, width=width, steps=steps
    )
    scratch = [
        pltpu.VMEM((bq, 1), jnp.float32),
        pltpu.VMEM((bq, 1), jnp.float32),
        pltpu.VMEM((bq, dp), jnp.float32),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, h, lq, dp), q.dtype),
        jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32),
    ]
    out, lse = _call(
        kernel, cfg, (b, h, plan.num_q_blocks, steps), specs + [q_spec, kv_spec, kv_spec],
        [q_spec, lse_spec], out_shape, scratch, "flash_fwd_tpu",
    )(table, *_seg_inputs(segs), _heads_first(q), _heads_first(k), _heads_first(v))  # fmt: skip
    return _heads_first(out), lse[..., 0]


def _dq_kernel(tbl, *refs, cfg, tm, has_seg, width, steps):
    if has_seg:
        qseg_ref, kvseg_ref, *refs = refs
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
    i, t = pl.program_id(2), pl.program_id(3)
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    base = i * width
    n_full, count = tbl[base], tbl[base + 1]

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        start = tbl[base + 2 + t] * bk
        k = k_ref[...]
        q_seg, kv_seg = (qseg_ref[...], kvseg_ref[...]) if has_seg else (None, None)
        vis = tiles.visible(tm, i * bq + _iota(bq, 0), start + _iota(bk, 1), q_seg, kv_seg, masked)
        s = tiles.dot_nt(q_ref[...], k) * (cfg.scale * tiles.LOG2E)
        p = tiles.probs(s, lse_ref[...] * tiles.LOG2E, vis, keepdims=True)
        ds = p * (tiles.dot_nt(do_ref[...], v_ref[...]) - delta_ref[...])
        dq_sc[...] += tiles.dot_nn(ds.astype(k.dtype), k)

    pl.when(t < n_full)(functools.partial(step, False))
    pl.when((t >= n_full) & (t < count))(functools.partial(step, True))

    @pl.when(t == steps - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(tbl, *refs, cfg, tm, has_seg, width, steps):
    if has_seg:
        qseg_ref, kvseg_ref, *refs = refs
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    j, t = pl.program_id(2), pl.program_id(3)
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    base = j * width
    n_full, count = tbl[base], tbl[base + 1]

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        start = tbl[base + 2 + t] * bq
        q, do = q_ref[...], do_ref[...]
        q_seg, kv_seg = (qseg_ref[...], kvseg_ref[...]) if has_seg else (None, None)
        vis = tiles.visible(tm, start + _iota(bq, 0), j * bk + _iota(bk, 1), q_seg, kv_seg, masked)
        s = tiles.dot_nt(q, k_ref[...]) * (cfg.scale * tiles.LOG2E)
        p = tiles.probs(s, lse_ref[...] * tiles.LOG2E, vis, keepdims=True)
        dv_sc[...] += tiles.dot_tn(p.astype(do.dtype), do)
        ds = p * (tiles.dot_nt(do, v_ref[...]) - delta_ref[...])
        dk_sc[...] += tiles.dot_tn(ds.astype(q.dtype), q)

    pl.when(t < n_full)(functools.partial(step, False))
    pl.when((t >= n_full) & (t < count))(functools.partial(step, True))

    @pl.when(t == steps - 1)
    def _finish():
        dk_ref[...] = dk_sc[...] * cfg.scale
        dv_ref[...] = dv_sc[...]


def backward(cfg, q, k, v, segs, do, lse, delta):
    """Returns dq [B, Lq, H, D] and per-query-head dk, dv [B, Lk, H, D] (padded shapes)."""
    plan = cfg.plan(backward=True)
    tm, has_seg = cfg.tile_mask(plan), segs is not None
    b, lq, h, dp = q.shape
    lk, g = k.shape[1], h // k.shape[2]
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    qh, kh, vh, doh = (_heads_first(x) for x in (q, k, v, do))
    lse, delta, segs_in = lse[..., None], delta[..., None], _seg_inputs(segs)

    width, steps = 2 + plan.rows.steps, plan.rows.steps
    table = jnp.asarray(plan.rows.table().reshape(-1))
    q_blk = pl.BlockSpec((None, None, bq, dp), lambda b, h, i, t, tbl: (b, h, i, 0))
    row_blk = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, t, tbl: (b, h, i, 0))
    kv_blk = pl.BlockSpec(
        (None, None, bk, dp), lambda b, h, i, t, tbl: (b, h // g, tbl[i * width + 2 + t], 0)
    )
    seg_specs = [
        pl.BlockSpec((None, bq, 1), lambda b, h, i, t, tbl: (b, i, 0)),
        pl.BlockSpec((None, 1, bk), lambda b, h, i, t, tbl: (b, 0, tbl[i * width + 2 + t])),
    ]
    kernel = functools.partial(_dq_kernel, cfg=cfg, tm=tm, has_seg=has_seg, width=width, steps=steps)
    dq = _call(
        kernel, cfg, (b, h, plan.num_q_blocks, steps),
        (seg_specs if has_seg else []) + [q_blk, kv_blk, kv_blk, q_blk, row_blk, row_blk],
        q_blk, jax.ShapeDtypeStruct(qh.shape, q.dtype), [pltpu.VMEM((bq, dp), jnp.float32)], "flash_dq_tpu",
    )(table, *segs_in, qh, kh, vh, doh, lse, delta)  # fmt: skip

    width, steps = 2 + plan.cols.steps, plan.cols.steps
    table = jnp.asarray(plan.cols.table().reshape(-1))

    def q_index(b, h, j, t, tbl):
        return (b, h, tbl[j * width + 2 + t], 0)

    q_by = pl.BlockSpec((None, None, bq, dp), q_index)
    row_by = pl.BlockSpec((None, None, bq, 1), q_index)
    kv_own = pl.BlockSpec((None, None, bk, dp), lambda b, h, j, t, tbl: (b, h // g, j, 0))
    out_blk = pl.BlockSpec((None, None, bk, dp), lambda b, h, j, t, tbl: (b, h, j, 0))
    seg_specs = [
        pl.BlockSpec((None, bq, 1), lambda b, h, j, t, tbl: (b, tbl[j * width + 2 + t], 0)),
        pl.BlockSpec((None, 1, bk), lambda b, h, j, t, tbl: (b, 0, j)),
    ]
    grad_shape = jax.ShapeDtypeStruct((b, h, lk, dp), jnp.float32)
    kernel = functools.partial(_dkv_kernel, cfg=cfg, tm=tm, has_seg=has_seg, width=width, steps=steps)
    dk, dv = _call(
        kernel, cfg, (b, h, plan.num_kv_blocks, steps),
        (seg_specs if has_seg else []) + [q_by, kv_own, kv_own, q_by, row_by, row_by],
        [out_blk, out_blk], [grad_shape, grad_shape],
        [pltpu.VMEM((bk, dp), jnp.float32), pltpu.VMEM((bk, dp), jnp.float32)], "flash_dkv_tpu",
    )(table, *segs_in, qh, kh, vh, doh, lse, delta)  # fmt: skip
    return _heads_first(dq), _heads_first(dk), _heads_first(dv)
