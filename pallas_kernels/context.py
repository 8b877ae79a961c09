"""Context parallelism: attention over a sequence split across the devices of one mesh axis.

`context_attention(q, k, v, mesh=..., context_axis="context")` takes [B, L, H, D] arrays whose
sequence is (to be) sharded over `context_axis` (batch and heads optionally over two other axes)
and runs under `jax.shard_map`. Two methods:

- "ring": every device keeps its Q shard while the K/V shards travel around the ring with
  `lax.ppermute` (n steps; the next shard is sent before the current one is used, so transfer and
  compute can overlap). At step s device i holds KV shard (i - s) mod n and runs the existing
  kernels (`resolved_attention`) on the (Q shard, KV shard) pair. Masks are defined on global token
  indices, so each pair gets the `Shifted` view of the mask: its `mask_fn` / `classify` add the
  shard offsets, and block plans keep their sparsity per step. Which pair a device sees is dynamic
  under shard_map (`axis_index`), so the pair masks of all (step, device) are built statically,
  deduplicated into branches (entirely visible pairs become `Full()`, so full attention compiles a
  single unmasked branch and no switch), and each step runs `lax.switch(table[s, device])`; an
  entirely masked pair is a branch that computes nothing, a step uniform over devices calls its
  branch directly, and steps after the last useful one are dropped with their transfers. The steps
  run in a `fori_loop` (unrolled, XLA hoists every transfer: n shards live at once). Partial outputs
  are merged by their log-sum-exp in f32; rows that see no key output 0.
  The ring has its own `custom_vjp`: the residuals are the local q, k, v, output and LSE only, and
  the backward is a second ring pass with the same schedule, switch table and skipped steps. K/V
  travel again, now with f32 dK / dV accumulators; at each step the pair's flash-attention backward
  (`_pair_backward`: the kernel the forward ran, fed the *global* output and LSE, so p = exp(s - lse)
  is the pair's slice of the full softmax and ds = p (dp - δ), δ = rowsum(dO · O)) adds to dQ
  locally and to the visiting dK / dV, which one last ppermute sends home. Per-device memory of
  forward and backward is O(L / n): scores exist only per pair, K/V (and dK / dV) one shard at a
  time plus the one in flight. (Plain autodiff of the loop kept every visiting K/V shard and partial
  output as residuals: O(L).)
- "all_to_all" (Ulysses): `lax.all_to_all` turns sequence-sharded Q/K/V into head-sharded full
  sequences (heads must divide by the context size; grouped KV heads too few to split are repeated),
  attention runs on local heads with the unshifted mask, and a second all_to_all restores the
  sequence sharding. Two collectives of the activations per call, but each device holds
  full-length scores for H / n heads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels import chunked, dispatch, reference, residuals
from pallas_kernels import masks as masks_lib
from pallas_kernels import platform as platform_lib
from pallas_kernels.sharding import AxisName, axis_size

METHODS = ("ring", "all_to_all")


@dataclasses.dataclass(frozen=True)
class Shifted(masks_lib.Mask):
    """`mask` seen from a (q shard, kv shard) pair: local query i / key j are global
    i + q_offset / j + kv_offset; `seq_q`, `seq_kv` are the shard lengths."""

    mask: masks_lib.Mask
    q_offset: int
    kv_offset: int
    seq_q: int
    seq_kv: int

    @property
    def in_kernel(self) -> bool:
        return self.mask.in_kernel

    @property
    def classify_in_chunks(self) -> bool:
        return self.mask.classify_in_chunks

    def mask_fn(self, q_idx, kv_idx):
        return self.mask.mask_fn(q_idx + self.q_offset, kv_idx + self.kv_offset)

    def classify(self, q_start, q_stop, kv_start, kv_stop):
        q0, k0 = self.q_offset, self.kv_offset
        return self.mask.classify(q_start + q0, q_stop + q0, kv_start + k0, kv_stop + k0)

    def check_shape(self, seq_q, seq_kv):
        if (seq_q, seq_kv) != (self.seq_q, self.seq_kv):
            raise ValueError(
                f"Shifted mask is for shards of ({self.seq_q}, {self.seq_kv}) tokens, got ({seq_q}, {seq_kv})"
            )

    def pair_kind(self) -> int:
        """EMPTY / PARTIAL / FULL of the whole (q shard, kv shard) pair."""
        one = lambda n: np.array([n], np.int64)  # noqa: E731
        return int(self.classify(one(0), one(self.seq_q), one(0), one(self.seq_kv))[0, 0])


def pair_mask(mask: masks_lib.Mask, q_shard: int, kv_shard: int, seq_q: int, seq_kv: int):
    """The static mask of one ring pair: None when entirely masked, `Full()` when entirely visible,
    else the `Shifted` view (shard lengths `seq_q`, `seq_kv`)."""
    if isinstance(mask, masks_lib.Full):
        return mask
    shifted = Shifted(mask, q_shard * seq_q, kv_shard * seq_kv, seq_q, seq_kv)
    kind = shifted.pair_kind()
    if kind == masks_lib.EMPTY:
        return None
    return masks_lib.Full() if kind == masks_lib.FULL else shifted


def merge(out, lse, out_s, lse_s):
    """Merges two normalised partial attentions by their log-sum-exp (f32).

    out [B, L, H, D] f32, lse [B, H, L] f32 (-inf where a row saw nothing). The shift by the max is
    a constant of the result, so it carries no gradient; the double `where` keeps gradients finite
    on rows that see nothing in both parts (they stay out = 0, lse = -inf)."""
    lse_s = lse_s.astype(jnp.float32)
    m = jax.lax.stop_gradient(jnp.maximum(lse, lse_s))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w, w_s = jnp.exp(lse - m), jnp.exp(lse_s - m)
    total = w + w_s
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    new_lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
    to_rows = lambda x: (x / safe).transpose(0, 2, 1)[..., None]  # noqa: E731 - [B, H, L] -> [B, L, H, 1]
    return to_rows(w) * out + to_rows(w_s) * out_s.astype(jnp.float32), new_lse


def _ring_implementation(implementation: str, q_shape, k_shape, dtype, mask) -> str:
    """The ring needs the LSE: "auto" never resolves to cuDNN there, and "cudnn" is refused."""
    if implementation == "cudnn":
        raise ValueError("method='ring' merges partial outputs by their LSE, which 'cudnn' does not return")
    if implementation != "auto":
        return implementation
    target = platform_lib.current()
    choice = dispatch.choose(q_shape, k_shape, dtype, mask, False, target)
    return "pallas" if choice == "cudnn" else choice


def _dense_pair_backward(mask, scale, q, k, v, q_ids, kv_ids, out, lse, dout, dlse):
    """Flash-attention backward of one pair on dense f32 scores ("dense" / "xla" pairs, whose own
    backward saves the pair's probabilities instead of taking an LSE): p = exp(s - lse) from the
    given (global) LSE, ds = p (dp - δ), δ = rowsum(dout · out) - dlse. Returns f32 (dq, dk, dv)."""
    b, seq_q, heads, _ = q.shape
    seq_kv, kv_heads = k.shape[1], k.shape[2]
    g = heads // kv_heads
    hi = jax.lax.Precision.HIGHEST
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    qg, dog = (f32(reference.group_heads(x, kv_heads)) for x in (q, dout))  # [B, Lq, Hkv, G, D]
    delta = jnp.einsum("bqhd,bqhd->bhq", f32(out), f32(dout)) - f32(dlse)
    rows = lambda x: x.reshape(b, kv_heads, g, seq_q)[..., None]  # noqa: E731 - [B, H, Lq] -> [B, Hkv, G, Lq, 1]
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, f32(k), precision=hi) * scale
    p = jnp.exp(s - rows(jnp.where(jnp.isfinite(lse), lse, 0.0)))
    if not isinstance(mask, masks_lib.Full) or q_ids is not None:
        p = jnp.where(reference.visible(mask, q_ids, kv_ids, seq_q, seq_kv)[:, None, None], p, 0.0)
    dv = jnp.einsum("bhgqk,bqhgd->bkhd", p, dog, precision=hi)
    dp = jnp.einsum("bqhgd,bkhd->bhgqk", dog, f32(v), precision=hi)
    ds = p * (dp - rows(delta))
    dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, f32(k), precision=hi).reshape(q.shape) * scale
    dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qg, precision=hi) * scale
    return dq, dk, dv


def _pair_backward(implementation: str, mask, scale: float, interpret, q, k, v, q_ids, kv_ids):
    """The backward of one ring pair as fn(q, k, v, q_ids, kv_ids, out, lse, dout, dlse) -> (dq, dk,
    dv): the flash-attention backward of the kernel the forward ran on that pair (`implementation`
    as resolved by `dispatch.resolved_attention`), fed the *global* output and LSE of the local
    queries, so its p = exp(s - lse) are the pair's slice of the full softmax and its dq / dk / dv
    the pair's contributions to the full gradients (in the kernels' output dtypes; the ring sums
    them in f32). `q`, `k`, `v` give shapes and dtypes only. "dense" / "xla" pairs use a dense
    backward from the LSE, "chunked" its `backward`, the Pallas kernels `flash_backward` (with the
    config the forward's dispatch would pick, Mosaic GPU's included)."""
    seq_q, seq_kv, head_dim = q.shape[1], k.shape[1], q.shape[3]
    has_seg = q_ids is not None
    if implementation in ("xla", "dense"):
        return functools.partial(_dense_pair_backward, mask, scale)
    if implementation == "chunked":
        st = chunked.static(mask, scale, seq_q, seq_kv)
        return lambda q, k, v, q_ids, kv_ids, out, lse, dout, dlse: chunked.backward(
            st, (q, k, v, q_ids, kv_ids, out, lse), dout, dlse
        )
    from pallas_kernels import pallas_attention

    target = platform_lib.current()
    cfg = None
    if implementation == "pallas_mgpu" or (implementation == "pallas" and target.is_hopper and not interpret):
        from pallas_kernels import pallas_mgpu

        if pallas_mgpu.problem(q.shape, k.shape, q.dtype, mask, has_seg, target, interpret) is None:
            # The Mosaic GPU forward's VJP is the Triton backward with this config.
            cfg = pallas_mgpu.default_config(
                mask, scale, seq_q, seq_kv, head_dim, q.dtype, bool(interpret), target
            )
    if cfg is None:
        family = target.family if implementation == "pallas" else implementation.removeprefix("pallas_")
        interp = target.interpret if interpret is None else interpret
        cfg = pallas_attention.default_config(
            family, mask, scale, seq_q, seq_kv, head_dim, q.dtype, interp, target
        )

    def backward(q, k, v, q_ids, kv_ids, out, lse, dout, dlse):
        res = (q, k, v, q_ids, kv_ids, out, lse)
        return pallas_attention.flash_backward(cfg, res, (dout, dlse))[:3]

    return backward


def _ring(q, k, v, q_ids, kv_ids, *, static, axis, n, scale, implementation, interpret):
    """Per-device body of the ring (inside shard_map): local shards in, local (out, lse) out, with a
    custom VJP whose backward is a second ring pass."""
    b, seq_q, heads, _ = q.shape
    seq_kv = k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # Static: the pair mask of device i at step s (KV shard (i - s) mod n), deduplicated over all
    # steps and devices into switch branches; table[s, i] is the branch.
    pairs = [[pair_mask(static, i, (i - s) % n, seq_q, seq_kv) for i in range(n)] for s in range(n)]
    unique = list(dict.fromkeys(p for row in pairs for p in row))
    table = np.asarray([[unique.index(p) for p in row] for row in pairs], np.int32)
    busy = [s for s in range(n) if any(p is not None for p in pairs[s])]
    last = max(busy, default=-1)  # steps after the last useful one are dropped, transfers too
    forward_shift = [(j, (j + 1) % n) for j in range(n)]

    def dispatch_step(s, branches, *args):
        """Runs step s's branch: directly when one branch serves every device, else a switch on
        (s, this device)."""
        if len(branches) == 1 or (isinstance(s, int) and (table[s] == table[s, 0]).all()):
            return branches[table[s, 0] if isinstance(s, int) else 0](*args)
        me = jax.lax.axis_index(axis)
        return jax.lax.switch(jnp.asarray(table)[s, me], branches, *args)

    run = functools.partial(
        dispatch.resolved_attention, scale=scale, implementation=implementation, interpret=interpret
    )

    def fwd_branch(mask):
        if mask is None:

            def skip(q, k, v, q_ids, kv_ids):
                out = jnp.zeros((b, seq_q, heads, v.shape[-1]), q.dtype)
                return out, jnp.full((b, heads, seq_q), -jnp.inf, jnp.float32)

            return skip
        return lambda q, k, v, q_ids, kv_ids: run(q, k, v, mask, q_ids, kv_ids)

    def bwd_branch(mask):
        f32 = lambda xs: tuple(x.astype(jnp.float32) for x in xs)  # noqa: E731
        if mask is None:
            return lambda q, k, v, *_: f32((jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)))
        pair = _pair_backward(implementation, mask, scale, interpret, q, k, v, q_ids, kv_ids)
        return lambda *args: f32(pair(*args))

    def forward(q, k, v, q_ids, kv_ids):
        branches = [fwd_branch(m) for m in unique]

        def step(s, out, lse, k, v, kv_ids):
            out_s, lse_s = dispatch_step(s, branches, q, k, v, q_ids, kv_ids)
            return merge(out, lse, out_s, lse_s)

        def body(s, carry):
            out, lse, kv = carry
            # Send the next shard before using this one: the transfer can overlap the compute.
            nxt = jax.lax.ppermute(kv, axis, forward_shift)
            out, lse = step(s, out, lse, *kv)
            return out, lse, nxt

        if last < 0:
            out = jnp.zeros((b, seq_q, heads, v.shape[-1]), q.dtype)
            return out, jnp.full((b, heads, seq_q), -jnp.inf, jnp.float32)
        # Step 0 (the device's own KV shard) starts the accumulators (no zero-filled init to merge).
        nxt = jax.lax.ppermute((k, v, kv_ids), axis, forward_shift) if last > 0 else None
        out, lse = dispatch_step(0, branches, q, k, v, q_ids, kv_ids)
        out = out.astype(jnp.float32)
        if last > 0:
            # A loop, not an unrolled Python ring: unrolled, XLA hoists every transfer and loop
            # buffer to the start (n KV shards live at once, O(L) memory); the loop keeps one
            # shard in flight.
            if last > 1:
                out, lse, nxt = jax.lax.fori_loop(1, last, body, (out, lse, nxt))
            out, lse = step(last, out, lse, *nxt)
        return out.astype(q.dtype), lse

    def backward(res, cotangents):
        q, k, v, q_ids, kv_ids, out, lse = res
        dout, dlse = cotangents
        if last < 0:
            return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), None, None
        branches = [bwd_branch(m) for m in unique]

        def grads(s, k, v, kv_ids):
            return dispatch_step(s, branches, q, k, v, q_ids, kv_ids, out, lse, dout, dlse)

        def step(s, dq, dkv, k, v, kv_ids):
            g_q, g_k, g_v = grads(s, k, v, kv_ids)
            return dq + g_q, (dkv[0] + g_k, dkv[1] + g_v)

        def body(s, carry):
            dq, kv, dkv = carry
            nxt = jax.lax.ppermute(kv, axis, forward_shift)  # before the compute, as in the forward
            dq, dkv = step(s, dq, dkv, *kv)
            # The accumulators travel with their K/V shard (after this step's contribution).
            return dq, nxt, jax.lax.ppermute(dkv, axis, forward_shift)

        # Step 0 (own KV shard) starts the f32 accumulators, as in the forward.
        nxt = jax.lax.ppermute((k, v, kv_ids), axis, forward_shift) if last > 0 else None
        dq, dk, dv = grads(0, k, v, kv_ids)
        if last > 0:
            dkv = jax.lax.ppermute((dk, dv), axis, forward_shift)
            if last > 1:
                dq, nxt, dkv = jax.lax.fori_loop(1, last, body, (dq, nxt, dkv))
            dq, (dk, dv) = step(last, dq, dkv, *nxt)
            # Device j now holds the gradients of KV shard (j - last) mod n: send them home.
            dk, dv = jax.lax.ppermute((dk, dv), axis, [(j, (j - last) % n) for j in range(n)])
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    @jax.custom_vjp
    def ring(q, k, v, q_ids, kv_ids):
        return forward(q, k, v, q_ids, kv_ids)

    def ring_fwd(q, k, v, q_ids, kv_ids):
        out, lse = forward(q, k, v, q_ids, kv_ids)
        out, lse = residuals.named(out, lse)  # the outputs are the residuals: one value, saved once
        return (out, lse), (q, k, v, q_ids, kv_ids, out, lse)

    ring.defvjp(ring_fwd, backward)
    return ring(q, k, v, q_ids, kv_ids)


def _ulysses(q, k, v, q_ids, kv_ids, *, static, axis, scale, implementation, interpret):
    """Per-device body of all_to_all: sequence-sharded in, full sequence on H / n heads inside."""
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=2, concat_axis=1, tiled=True)
    out, _ = dispatch.resolved_attention(
        to_heads(q), to_heads(k), to_heads(v), static, q_ids, kv_ids, scale, implementation, interpret
    )
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def context_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    context_axis: str = "context",
    batch_axis: AxisName = None,
    head_axis: AxisName = None,
    mask=None,
    scale: float | None = None,
    implementation: str = "auto",
    method: str = "ring",
    interpret: bool | None = None,
) -> jax.Array:
    """`attention` with the sequence split over mesh axis `context_axis` (ring or all-to-all).

    Layout [batch, seq, heads, head_dim]; both sequence lengths must divide by the context size.
    `batch_axis` / `head_axis` optionally split batch / heads as in `sharded_attention`. `mask` is
    any mask `attention` accepts, defined on global token indices. Returns [B, Lq, H, Dv], sharded
    like q.
    """
    if method not in METHODS:
        raise ValueError(f"unknown context-parallel method {method!r}; expected one of {', '.join(METHODS)}")
    if implementation not in dispatch.IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"expected one of {', '.join(dispatch.IMPLEMENTATIONS)}"
        )
    dispatch.validate_inputs(q, k, v)
    if not isinstance(context_axis, str) or context_axis not in mesh.axis_names:
        raise ValueError(f"context_axis {context_axis!r} is not an axis of the mesh {mesh.axis_names}")
    others = [
        a for ax in (batch_axis, head_axis) if ax is not None for a in ((ax,) if isinstance(ax, str) else ax)
    ]
    if context_axis in others:
        raise ValueError(f"context_axis {context_axis!r} is also used as a batch or head axis")
    batch, seq_q, heads, _ = q.shape
    seq_kv, kv_heads = k.shape[1], k.shape[2]
    n = mesh.shape[context_axis]
    if seq_q % n or seq_kv % n:
        raise ValueError(
            f"sequence lengths ({seq_q}, {seq_kv}) must be divisible by the size of mesh axis "
            f"{context_axis!r} ({n}) for context parallelism"
        )
    head_split = axis_size(mesh, head_axis)
    for what, count, axis, size in (
        ("batch", batch, batch_axis, axis_size(mesh, batch_axis)),
        ("heads", heads, head_axis, head_split),
        ("kv heads", kv_heads, head_axis, head_split),
    ):
        if count % size:
            raise ValueError(f"{what} ({count}) must be divisible by the size of mesh axis {axis!r} ({size})")
    if method == "all_to_all":
        split = head_split * n
        if heads % split:
            raise ValueError(
                f"method='all_to_all' splits heads over mesh axis {context_axis!r} ({n}): heads ({heads}) "
                f"per head shard ({head_split}) must be divisible by it; use method='ring'"
            )
        # Grouped-query K/V with too few heads to split: repeat each KV head (the smallest factor
        # that divides the query group and makes the KV heads divisible by the split).
        repeat = next(r for r in range(1, heads // kv_heads + 1) if (heads // kv_heads) % r == 0
                      and (kv_heads * r) % split == 0)  # fmt: skip
        if repeat > 1:
            k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    static, q_ids, kv_ids = masks_lib.resolve(mask, batch, seq_q, seq_kv)

    spec = PartitionSpec(batch_axis, context_axis, head_axis, None)
    if method == "ring":
        local_shape = lambda x: (batch, x.shape[1] // n, heads, x.shape[3])  # noqa: E731
        impl = _ring_implementation(implementation, local_shape(q), local_shape(k), q.dtype, static)
        body = functools.partial(
            _ring,
            static=static,
            axis=context_axis,
            n=n,
            scale=scale,
            implementation=impl,
            interpret=interpret,
        )
        seg_spec = PartitionSpec(batch_axis, context_axis)
    else:
        body = functools.partial(
            _ulysses, static=static, axis=context_axis, scale=scale,
            implementation=implementation, interpret=interpret,
        )  # fmt: skip
        seg_spec = PartitionSpec(batch_axis, None)  # every device sees the full sequence

    def local(q, k, v, *segments):
        q_ids, kv_ids = segments or (None, None)
        res = body(q, k, v, q_ids, kv_ids)
        return res[0] if method == "ring" else res

    args, in_specs = (q, k, v), (spec, spec, spec)
    if q_ids is not None:
        args, in_specs = (*args, q_ids, kv_ids), (*in_specs, seg_spec, seg_spec)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
    return mapped(*args)
