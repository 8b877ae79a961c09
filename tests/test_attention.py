"""Every implementation against the dense f32 reference: output, LSE and gradients, every mask.

Pallas kernels run in interpret mode on CPU with small blocks, so plans have EMPTY, PARTIAL and
FULL tiles. Tolerances (KERNELS.md): f32 <= 1e-5 forward, <= 5e-5 gradients; bf16 <= 1e-2 / 2e-2
and never worse than 2x the plain XLA bf16 path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention, attention_with_lse, chunked, dense, masks, pallas_attention, reference

IMPLS = ("dense", "chunked", "pallas_gpu", "pallas_tpu")


def run_impl(impl, q, k, v, mask=None, q_ids=None, kv_ids=None, scale=None):
    """(out, lse) of one implementation with small blocks; `mask` is a static Mask."""
    mask = mask or masks.Full()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kw = dict(mask=mask, scale=scale, q_ids=q_ids, kv_ids=kv_ids)
    if impl == "xla":
        return reference.attention(q, k, v, **kw)
    if impl == "dense":
        return dense.attention(q, k, v, **kw)
    if impl == "chunked":
        return chunked.attention(q, k, v, block_q=16, block_kv=32, **kw)
    if impl == "pallas_gpu":
        return pallas_attention.attention(
            q, k, v, family="gpu", interpret=True, blocks=(32, 32, 32, 32), **kw
        )
    return pallas_attention.attention(q, k, v, family="tpu", interpret=True, blocks=(64, 128, 64, 128), **kw)


def inputs(batch, seq_q, seq_kv, heads, kv_heads, dim, dtype=jnp.float32, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, seq_q, heads, dim), dtype)
    k = jax.random.normal(kk, (batch, seq_kv, kv_heads, dim), dtype)
    v = jax.random.normal(kv, (batch, seq_kv, kv_heads, dim), dtype)
    return q, k, v, jax.random.normal(kd, (batch, seq_q, heads, dim), dtype)


def value_and_grads(impl, q, k, v, dout, **kw):
    """Output, LSE and (dq, dk, dv) of <out, dout> + 0.1 * sum(finite LSE)."""

    def loss(q, k, v):
        out, lse = run_impl(impl, q, k, v, **kw)
        lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0).sum()
        return (out.astype(jnp.float32) * dout).sum() + 0.1 * lse_term, (out, lse)

    grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, lse, grads


def assert_close(got, want, fwd_tol=1e-5, grad_tol=5e-5):
    (out, lse, grads), (out_r, lse_r, grads_r) = got, want
    np.testing.assert_allclose(out, out_r, atol=fwd_tol, rtol=0)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_r))
    finite = np.isfinite(lse_r)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(lse_r)[finite], atol=fwd_tol, rtol=0)
    for name, g, g_r in zip("qkv", grads, grads_r, strict=True):
        np.testing.assert_allclose(g, g_r, atol=grad_tol, rtol=0, err_msg=f"d{name}")


def _segments(batch, seq):
    rng = np.random.RandomState(seq)
    ids = np.sort(rng.randint(0, 3, (batch, seq)), axis=1).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(ids)


def _block_sparse():
    pattern = np.random.RandomState(0).rand(4, 2) < 0.5
    pattern[0, 0] = True
    return masks.BlockSparse(pattern, (64, 128))  # aligned with every implementation's tiles


# name: (batch, seq_q, seq_kv, heads, kv_heads, head_dim, mask); 120 tokens leave a padded tail.
CASES = {
    "local1d": (1, 120, 120, 4, 2, 16, lambda: masks.Local1D(17, 5)),
    "neighborhood2d": (1, 120, 120, 4, 2, 16, lambda: masks.Neighborhood2D(grid=(12, 10), window=(5, 3))),
    "neighborhood3d": (1, 120, 120, 4, 2, 16, lambda: masks.Neighborhood3D(grid=(3, 5, 8), window=(3, 3, 5))),
    "frametile": (1, 120, 120, 4, 2, 16, lambda: masks.FrameTile(6, 20, radius=1, global_frames=1)),
    "composed": (
        1, 120, 120, 4, 2, 16,
        lambda: (masks.Neighborhood2D((12, 10), (3, 3)) | masks.Local1D(0, 40)) & masks.KeyPadding(100),
    ),
    "segments": (2, 120, 120, 4, 2, 16, lambda: masks.Local1D(30, 30) & masks.SegmentIds(*_segments(2, 120))),
    "blocksparse": (1, 256, 256, 2, 1, 8, _block_sparse),
    "odd_1000_tokens_head_dim_72": (1, 1000, 1000, 2, 1, 72, lambda: None),
    "cross_attention_50x77": (1, 50, 77, 3, 1, 8, lambda: masks.Local1D(10, 30)),
}  # fmt: skip


@functools.cache
def _case(name):
    batch, seq_q, seq_kv, heads, kv_heads, dim, make_mask = CASES[name]
    q, k, v, dout = inputs(batch, seq_q, seq_kv, heads, kv_heads, dim)
    static, q_ids, kv_ids = masks.resolve(make_mask(), batch, seq_q, seq_kv)
    kw = dict(mask=static, q_ids=q_ids, kv_ids=kv_ids)
    return (q, k, v, dout), kw, value_and_grads("xla", q, k, v, dout, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(impl, case):
    args, kw, want = _case(case)
    assert_close(value_and_grads(impl, *args, **kw), want)


@pytest.mark.parametrize("impl", ("xla", *IMPLS))
def test_fully_masked_rows_output_zero_with_zero_gradient(impl):
    q, k, v, dout = inputs(1, 40, 40, heads=2, kv_heads=2, dim=8)
    q_ids = jnp.asarray(np.r_[np.zeros(30), np.full(10, 7)][None].astype(np.int32))  # segment 7: no keys
    kv_ids = jnp.zeros((1, 40), jnp.int32)
    out, lse, (dq, dk, dv) = value_and_grads(impl, q, k, v, dout, q_ids=q_ids, kv_ids=kv_ids)
    assert np.all(np.asarray(out)[:, 30:] == 0) and np.all(np.asarray(dq)[:, 30:] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, 30:])) and np.all(np.isfinite(np.asarray(lse)[:, :, :30]))
    assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("impl", IMPLS)
def test_reruns_are_bitwise_equal(impl):
    q, k, v, dout = inputs(1, 64, 64, heads=2, kv_heads=1, dim=8)
    mask = masks.Local1D(9, 9)

    def loss(q, k, v):
        return (run_impl(impl, q, k, v, mask=mask)[0] * dout).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    first, second = jax.tree.leaves(step(q, k, v)), jax.tree.leaves(step(q, k, v))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@functools.cache
def _bf16_baselines():
    q, k, v, dout = inputs(1, 96, 96, heads=2, kv_heads=1, dim=32, dtype=jnp.bfloat16)
    dout = dout.astype(jnp.float32)
    out_r, _, grads_r = value_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)), dout)

    def plain_bf16(q, k, v):  # the XLA bf16 path: bf16 matmuls at default precision
        return jax.nn.dot_product_attention(q, k, v, implementation="xla").astype(jnp.float32)

    base_out, pullback = jax.vjp(plain_bf16, q, k, v)
    errors = [float(jnp.abs(base_out - out_r).max())]
    errors += [
        float(jnp.abs(g.astype(jnp.float32) - r).max()) for g, r in zip(pullback(dout), grads_r, strict=True)
    ]
    return (q, k, v, dout), (out_r, grads_r), errors


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_tolerance(impl):
    (q, k, v, dout), (out_r, grads_r), base = _bf16_baselines()
    out, _, grads = value_and_grads(impl, q, k, v, dout)
    errors = [float(jnp.abs(out.astype(jnp.float32) - out_r).max())]
    errors += [float(jnp.abs(g.astype(jnp.float32) - r).max()) for g, r in zip(grads, grads_r, strict=True)]
    assert errors[0] <= 1e-2 and errors[0] <= 2 * base[0], (errors, base)
    for err, ref in zip(errors[1:], base[1:], strict=True):
        assert err <= 2e-2 and err <= 2 * ref, (errors, base)


def test_public_entry_point_with_segment_ids_and_gqa():
    q, k, v, _ = inputs(2, 48, 48, heads=4, kv_heads=1, dim=8)
    q_ids, kv_ids = _segments(2, 48)
    mask = masks.Local1D(4, 4) & masks.SegmentIds(q_ids, kv_ids)
    want, lse_want = reference.attention(q, k, v, mask=masks.Local1D(4, 4), q_ids=q_ids, kv_ids=kv_ids)
    padded = masks.KeyPadding((20, 48))  # per-example key padding becomes segment ids
    want_pad = reference.attention(
        q,
        k,
        v,
        q_ids=jnp.zeros((2, 48), jnp.int32),
        kv_ids=(jnp.arange(48) >= jnp.array([[20], [48]])).astype(jnp.int32),
    )[0]
    for impl in ("xla", "dense", "chunked", "pallas_gpu"):
        out, lse = attention_with_lse(q, k, v, mask=mask, implementation=impl)
        np.testing.assert_allclose(out, want, atol=1e-5)
        np.testing.assert_allclose(lse, lse_want, atol=1e-5)
        np.testing.assert_allclose(attention(q, k, v, mask=padded, implementation=impl), want_pad, atol=1e-5)


@pytest.mark.parametrize("scale", [0.05, 1.0, -0.3])
@pytest.mark.parametrize("mask", [None, masks.Local1D(7, 2)], ids=["full", "local1d"])
def test_dense_scale_argument(scale, mask):
    """The hand-written backward of "dense" with a non-default (even negative) scale."""
    q, k, v, dout = inputs(2, 48, 40, heads=4, kv_heads=2, dim=24, seed=3)
    got = value_and_grads("dense", q, k, v, dout, mask=mask, scale=scale)
    want = value_and_grads("xla", q, k, v, dout, mask=mask, scale=scale)
    assert_close(got, want)


def test_auto_on_cpu_is_dense_with_the_reference_gradients():
    """What the model calls on CPU: "auto" routes to "dense" and matches the plain-autodiff reference."""
    q, k, v, dout = inputs(2, 64, 64, heads=6, kv_heads=6, dim=16, seed=5)

    def grads(impl):
        def loss(q, k, v):
            return (attention(q, k, v, implementation=impl) * dout).sum()

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    (val, got), (val_r, want) = grads("auto"), grads("xla")
    np.testing.assert_allclose(val, val_r, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=0)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, implementation="auto"))(q, k, v))
    assert "custom_vjp_call" in jaxpr
