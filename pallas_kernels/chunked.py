"""XLA blockwise attention: online softmax over the block plan, O(seq) memory, custom VJP.

All Q blocks advance together; step t of a `lax.scan` visits the t-th non-empty KV block of every
Q block (gathered from the plan), so the work is proportional to the plan's busiest row and empty
tiles are never computed. Scores live only as [B, Lq, H, block_kv] per step. The backward pass
recomputes scores from the saved LSE: one scan over KV blocks for dQ, one over the transposed plan
for dK/dV (each KV head sums its query group), deterministic and free of atomics.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import residuals
from pallas_kernels.masks import FULL, PARTIAL, Mask
from pallas_kernels.plan import BlockPlan, Compacted, build_plan

DEFAULT_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Static:
    """Hashable call description (the non-array arguments of the custom VJP)."""

    mask: Mask
    scale: float
    seq_q: int
    seq_kv: int
    block_q: int
    block_kv: int

    @property
    def plan(self) -> BlockPlan:
        return build_plan(self.mask, self.seq_q, self.seq_kv, self.block_q, self.block_kv)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_to(x: jax.Array, length: int, axis: int = 1, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value) if length != x.shape[axis] else x


def _ein(spec: str, a: jax.Array, b: jax.Array, shared: tuple[bool, bool], precision):
    """einsum in which an operand flagged `shared` lacks the block axis `n` (one block for all rows)."""
    ins, out = spec.split("->")
    ins = [s.replace("n", "") if sh else s for s, sh in zip(ins.split(","), shared, strict=True)]
    spec = f"{ins[0]},{ins[1]}->{out}"
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)


def _take(x: jax.Array, idx: jax.Array, uniform: bool) -> jax.Array:
    """Blocks `idx` of x [B, n, ...] along axis 1; one block (axis dropped) when `uniform`."""
    if uniform:
        return jax.lax.dynamic_index_in_dim(x, idx[0], axis=1, keepdims=False)
    return jnp.take(x, idx, axis=1)


def _seg_take(seg: jax.Array, idx: jax.Array, uniform: bool) -> jax.Array:
    """Segment-id blocks [B, n or 1, block] for block indices `idx`."""
    out = _take(seg, idx, uniform)
    return out[:, None] if uniform else out


def _visible(st: Static, plan: BlockPlan, q_blk, kv_blk, kind, q_seg, kv_seg):
    """Tile visibility [B or 1, n, bq, bk], or None when every visited tile is fully visible."""
    if q_seg is None and bool((plan.kinds == FULL).all()):
        return None
    q_pos = q_blk[:, None] * st.block_q + jnp.arange(st.block_q)[None, :]
    kv_pos = kv_blk[:, None] * st.block_kv + jnp.arange(st.block_kv)[None, :]
    q_pos, kv_pos = q_pos[:, :, None], kv_pos[:, None, :]
    partial = jnp.asarray(True)
    if plan.mask_partial:
        partial = partial & st.mask.mask_fn(q_pos, kv_pos)
    if plan.kv_padded:
        partial = partial & (kv_pos < st.seq_kv)
    kind = kind[:, None, None]
    vis = (kind == FULL) | ((kind == PARTIAL) & partial)
    vis = vis[None]
    if q_seg is not None:
        vis = vis & (q_seg[..., :, None] == kv_seg[..., None, :])
    return vis


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _prepare(st: Static, q, k, v, q_ids, kv_ids):
    """Pads and blocks the inputs: q [B, nq, bq, Hkv, G, D], k/v [B, nk, bk, Hkv, D]."""
    plan = st.plan
    b, _, h, d = q.shape
    hkv = k.shape[2]
    nq, nk = plan.num_q_blocks, plan.num_kv_blocks
    qb = _pad_to(q, nq * st.block_q).reshape(b, nq, st.block_q, hkv, h // hkv, d)
    kb = _pad_to(k, nk * st.block_kv).reshape(b, nk, st.block_kv, hkv, d)
    vb = _pad_to(v, nk * st.block_kv).reshape(b, nk, st.block_kv, hkv, v.shape[-1])
    segs = None
    if q_ids is not None:
        segs = (
            _pad_to(q_ids.astype(jnp.int32), nq * st.block_q, value=-1).reshape(b, nq, st.block_q),
            _pad_to(kv_ids.astype(jnp.int32), nk * st.block_kv, value=-2).reshape(b, nk, st.block_kv),
        )
    return qb, kb, vb, segs


def _scan_rows(plan_part: Compacted):
    return jnp.asarray(plan_part.index.T), jnp.asarray(plan_part.kind.T)


def _uniform(part: Compacted) -> bool:
    return bool((part.index == part.index[:1]).all() and (part.kind == part.kind[:1]).all())


def forward(st: Static, q, k, v, q_ids=None, kv_ids=None):
    """Returns (out [B, Lq, H, Dv], lse [B, H, Lq])."""
    plan = st.plan
    qb, kb, vb, segs = _prepare(st, q, k, v, q_ids, kv_ids)
    b, nq, bq, hkv, g, _ = qb.shape
    uni, prec = _uniform(plan.rows), _precision(q.dtype)
    q_blk = jnp.arange(nq)

    def step(carry, xs):
        m, denom, acc = carry
        idx, kind = xs
        kt, vt = _take(kb, idx, uni), _take(vb, idx, uni)
        s = _ein("bnqhgd,bnkhd->bnhgqk", qb, kt, (False, uni), prec) * st.scale
        seg = (None, None) if segs is None else (segs[0], _seg_take(segs[1], idx, uni))
        vis = _visible(st, plan, q_blk, idx, kind, *seg)
        if vis is not None:
            s = jnp.where(vis[:, :, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l_new = alpha * denom + p.sum(-1)
        pv = _ein("bnhgqk,bnkhd->bnhgqd", p.astype(v.dtype), vt, (False, uni), prec)
        return (m_new, l_new, alpha[..., None] * acc + pv), None

    init = (
        jnp.full((b, nq, hkv, g, bq), -jnp.inf, jnp.float32),
        jnp.zeros((b, nq, hkv, g, bq), jnp.float32),
        jnp.zeros((b, nq, hkv, g, bq, v.shape[-1]), jnp.float32),
    )
    (m, denom, acc), _ = jax.lax.scan(step, init, _scan_rows(plan.rows))
    safe = jnp.where(denom > 0, denom, 1.0)
    out = acc / safe[..., None]
    lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)
    out = out.transpose(0, 1, 4, 2, 3, 5).reshape(b, nq * bq, hkv * g, v.shape[-1])[:, : st.seq_q]
    lse = lse.transpose(0, 2, 3, 1, 4).reshape(b, hkv * g, nq * bq)[:, :, : st.seq_q]
    return out.astype(q.dtype), lse


def backward(st: Static, res, dout, dlse):
    """Gradients (dq, dk, dv) by recomputation from the saved LSE."""
    q, k, v, q_ids, kv_ids, out, lse = res
    plan = st.plan
    qb, kb, vb, segs = _prepare(st, q, k, v, q_ids, kv_ids)
    b, nq, bq, hkv, g, d = qb.shape
    nk, bk = kb.shape[1], kb.shape[2]
    prec = _precision(q.dtype)
    dob = _pad_to(dout, nq * bq).reshape(b, nq, bq, hkv, g, v.shape[-1])
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def per_block(x):  # [B, H, Lq] -> [B, nq, Hkv, G, bq]
        x = _pad_to(x, nq * bq, axis=2).reshape(b, hkv, g, nq, bq)
        return x.transpose(0, 3, 1, 2, 4)

    lse_b, delta_b = per_block(lse), per_block(delta)

    def probs(qt, kt, lse_t, vis, shared):
        s = _ein("bnqhgd,bnkhd->bnhgqk", qt, kt, shared, prec) * st.scale
        p = jnp.exp(s - lse_t[..., None])
        return p if vis is None else jnp.where(vis[:, :, None, None], p, 0.0)

    uni = _uniform(plan.rows)

    def dq_step(dq, xs):
        idx, kind = xs
        kt, vt = _take(kb, idx, uni), _take(vb, idx, uni)
        seg = (None, None) if segs is None else (segs[0], _seg_take(segs[1], idx, uni))
        vis = _visible(st, plan, jnp.arange(nq), idx, kind, *seg)
        p = probs(qb, kt, lse_b, vis, (False, uni))
        dp = _ein("bnqhgd,bnkhd->bnhgqk", dob, vt, (False, uni), prec)
        ds = (p * (dp - delta_b[..., None])).astype(q.dtype)
        return dq + _ein("bnhgqk,bnkhd->bnqhgd", ds, kt, (False, uni), prec), None

    dq, _ = jax.lax.scan(dq_step, jnp.zeros(qb.shape, jnp.float32), _scan_rows(plan.rows))
    dq = (dq * st.scale).reshape(b, nq * bq, hkv * g, d)[:, : st.seq_q]

    uni_t = _uniform(plan.cols)

    def dkv_step(carry, xs):
        dk, dv = carry
        idx, kind = xs
        qt, dot = _take(qb, idx, uni_t), _take(dob, idx, uni_t)
        lse_t, delta_t = _take(lse_b, idx, uni_t), _take(delta_b, idx, uni_t)
        if uni_t:
            lse_t, delta_t = lse_t[:, None], delta_t[:, None]
        seg = (None, None) if segs is None else (_seg_take(segs[0], idx, uni_t), segs[1])
        vis = _visible(st, plan, idx, jnp.arange(nk), kind, *seg)
        p = probs(qt, kb, lse_t, vis, (uni_t, False))
        dv = dv + _ein("bnhgqk,bnqhgd->bnkhd", p.astype(v.dtype), dot, (False, uni_t), prec)
        dp = _ein("bnqhgd,bnkhd->bnhgqk", dot, vb, (uni_t, False), prec)
        ds = (p * (dp - delta_t[..., None])).astype(q.dtype)
        dk = dk + _ein("bnhgqk,bnqhgd->bnkhd", ds, qt, (False, uni_t), prec)
        return (dk, dv), None

    init = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
    (dk, dv), _ = jax.lax.scan(dkv_step, init, _scan_rows(plan.cols))
    dk = (dk * st.scale).reshape(b, nk * bk, hkv, d)[:, : st.seq_kv]
    dv = dv.reshape(b, nk * bk, hkv, v.shape[-1])[:, : st.seq_kv]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, q_ids, kv_ids, st: Static):
    return forward(st, q, k, v, q_ids, kv_ids)


def _attend_fwd(q, k, v, q_ids, kv_ids, st):
    out, lse = forward(st, q, k, v, q_ids, kv_ids)
    out, lse = residuals.named(out, lse)  # the outputs are the residuals: one value, saved once
    return (out, lse), (q, k, v, q_ids, kv_ids, out, lse)


def _attend_bwd(st, res, cotangents):
    dout, dlse = cotangents
    dq, dk, dv = backward(st, res, dout, dlse)
    return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def static(mask: Mask, scale: float, seq_q: int, seq_kv: int, block_q=None, block_kv=None) -> Static:
    """The call description `attention` uses (default blocks fitted to the sequence lengths); with
    `backward` it also serves callers that supply their own output and LSE (the context ring)."""
    block_q = block_q or min(DEFAULT_BLOCK, _round_up(seq_q, 8))
    block_kv = block_kv or min(DEFAULT_BLOCK, _round_up(seq_kv, 8))
    return Static(mask, float(scale), seq_q, seq_kv, int(block_q), int(block_kv))


def attention(q, k, v, *, mask: Mask, scale: float, q_ids=None, kv_ids=None, block_q=None, block_kv=None):
    """Blockwise attention; returns (out [B, Lq, H, Dv], lse [B, H, Lq] f32)."""
    st = static(mask, scale, q.shape[1], k.shape[1], block_q, block_kv)
    return _attend(q, k, v, q_ids, kv_ids, st)
