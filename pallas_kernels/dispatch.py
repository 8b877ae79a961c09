"""The entry point: validates inputs, resolves the mask and picks an implementation.

Implementations: "xla" (dense reference, plain autodiff), "dense" (the same math with a hand-written
backward, the CPU default for short sequences), "chunked" (XLA blockwise, O(seq) memory), "cudnn"
(dense, `jax.nn.dot_product_attention`), "pallas" (the GPU or TPU kernel by backend; on CPU the GPU
kernel in interpret mode), "pallas_gpu" / "pallas_tpu" to force one kernel family (for tests
in interpret mode), and "pallas_mgpu" (the Hopper Mosaic GPU forward + Triton backward). On Hopper
(sm_90), "pallas" (and "auto" where it picks "pallas") runs "pallas_mgpu" whenever that kernel
supports the case, else the Triton kernel. "auto" picks per backend and shape; an unsupported
explicit request raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import chunked, dense, reference
from pallas_kernels import masks as masks_lib
from pallas_kernels import platform as platform_lib

IMPLEMENTATIONS = ("auto", "xla", "dense", "chunked", "cudnn", "pallas", "pallas_gpu", "pallas_tpu",
                   "pallas_mgpu")  # fmt: skip

#: On CPU, "auto" uses the dense path while B * H * Lq * Lk f32 scores stay below this size.
DENSE_SCORE_BYTES = 64 * 2**20


def validate_inputs(q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects q, k, v as [batch, seq, heads, head_dim]; "
            f"got shapes {q.shape}, {k.shape}, {v.shape}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v disagree on batch / kv seq / kv heads: {q.shape}, {k.shape}, {v.shape}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k need the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got {x.dtype}")


def choose(
    q_shape, k_shape, dtype, mask: masks_lib.Mask, has_segments: bool, target: platform_lib.Platform
) -> str:
    """The implementation "auto" resolves to on `target`."""
    batch, seq_q, heads, _ = q_shape
    seq_kv = k_shape[1]
    if target.name in ("gpu", "tpu"):
        from pallas_kernels import pallas_attention

        if _cudnn_problem(q_shape, k_shape, dtype, mask, has_segments, target) is None:
            return "cudnn"
        cfg = pallas_attention.default_config(
            target.family, mask, 1.0, seq_q, seq_kv, q_shape[3], dtype, False, target
        )
        if pallas_attention.unsupported(dtype, mask, cfg) is None:
            return "pallas"
        return "chunked"
    if batch * heads * seq_q * seq_kv * 4 <= DENSE_SCORE_BYTES:
        return "dense"
    return "chunked"


def _cudnn_problem(q_shape, k_shape, dtype, mask, has_segments, target) -> str | None:
    if target.name != "gpu":
        return f"implementation='cudnn' needs a CUDA GPU, but the computation is compiled for {target.name!r}"
    if not isinstance(mask, masks_lib.Full) or has_segments:
        return "implementation='cudnn' supports dense attention only; use 'pallas' or 'chunked' for masks"
    if dtype not in (jnp.bfloat16, jnp.float16):
        return f"implementation='cudnn' needs bfloat16 or float16 inputs, got {dtype}"
    if q_shape[-1] % 8 or q_shape[-1] > 256:
        return f"implementation='cudnn' needs head_dim a multiple of 8 and <= 256, got {q_shape[-1]}"
    return None


def attention_with_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask=None,
    scale: float | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Like `attention`, also returning the log-sum-exp [B, H, Lq] (f32; None for "cudnn")."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"expected one of {', '.join(IMPLEMENTATIONS)}"
        )
    validate_inputs(q, k, v)
    static, q_ids, kv_ids = masks_lib.resolve(mask, q.shape[0], q.shape[1], k.shape[1])
    return resolved_attention(q, k, v, static, q_ids, kv_ids, scale, implementation, interpret)


def resolved_attention(
    q, k, v, static: masks_lib.Mask, q_ids, kv_ids, scale, implementation: str, interpret
) -> tuple[jax.Array, jax.Array | None]:
    """`attention_with_lse` after `masks.resolve`: a static mask plus per-example segment ids (or
    None). `sharded_attention` calls this per shard, since a per-example mask (KeyPadding with one
    length per batch element) cannot be resolved again against a shard's smaller batch."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    has_seg = q_ids is not None
    target = platform_lib.current()
    if implementation == "auto":
        implementation = choose(q.shape, k.shape, q.dtype, static, has_seg, target)
    if implementation == "xla":
        return reference.attention(q, k, v, mask=static, q_ids=q_ids, kv_ids=kv_ids, scale=scale)
    if implementation == "dense":
        return dense.attention(q, k, v, mask=static, q_ids=q_ids, kv_ids=kv_ids, scale=scale)
    if implementation == "chunked":
        return chunked.attention(q, k, v, mask=static, scale=scale, q_ids=q_ids, kv_ids=kv_ids)
    if implementation == "cudnn":
        problem = _cudnn_problem(q.shape, k.shape, q.dtype, static, has_seg, target)
        if problem is not None:
            raise ValueError(problem)
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        return out, None
    if implementation == "pallas_mgpu" or (implementation == "pallas" and target.is_hopper and not interpret):
        from pallas_kernels import pallas_mgpu

        problem = pallas_mgpu.problem(q.shape, k.shape, q.dtype, static, has_seg, target, interpret)
        if problem is None:
            return pallas_mgpu.attention(
                q, k, v, mask=static, scale=scale, interpret=interpret, target=target
            )
        if implementation == "pallas_mgpu":
            raise ValueError(f"implementation 'pallas_mgpu' cannot run this case: {problem}")
    from pallas_kernels import pallas_attention

    family = target.family if implementation == "pallas" else implementation.removeprefix("pallas_")
    if interpret is None:
        interpret = target.interpret
    return pallas_attention.attention(
        q, k, v, mask=static, scale=scale, q_ids=q_ids, kv_ids=kv_ids, family=family, interpret=interpret,
        target=target,
    )  # fmt: skip


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask=None,
    scale: float | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Multi-head attention, layout [batch, seq, heads, head_dim]; returns [batch, seq_q, heads, head_dim].

    `mask`: None (full), a `pallas_kernels.masks` mask, `SegmentIds`, or `mask & SegmentIds(...)`.
    `k`, `v` may have fewer heads than `q` (grouped-query attention). `scale` defaults to
    head_dim ** -0.5. `interpret` runs Pallas kernels in interpret mode (default: on CPU).
    """
    out, _ = attention_with_lse(
        q, k, v, mask=mask, scale=scale, implementation=implementation, interpret=interpret
    )
    return out
