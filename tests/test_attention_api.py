"""The public entry point: dispatch, errors, transformations, shard_map, memory, block skipping."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import pallas_kernels
from pallas_kernels import (
    attention,
    blocks,
    build_plan,
    dispatch,
    masks,
    pallas_attention,
    permute,
    reference,
    unpermute,
)
from pallas_kernels.platform import Platform


def qkv(batch=2, seq=32, heads=4, kv_heads=2, dim=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (batch, seq, heads, dim)),
        jax.random.normal(keys[1], (batch, seq, kv_heads, dim)),
        jax.random.normal(keys[2], (batch, seq, kv_heads, dim)),
    )


def test_auto_picks_per_target_and_shape():
    full = masks.Full()
    cpu, tpu = Platform("cpu", "cpu"), Platform("tpu", "TPU v5 lite")
    h100 = Platform("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
    assert dispatch.choose((2, 256, 4, 64), (2, 256, 4, 64), jnp.float32, full, False, cpu) == "dense"
    assert dispatch.choose((1, 16384, 4, 64), (1, 16384, 4, 64), jnp.float32, full, False, cpu) == "chunked"
    assert dispatch.choose((1, 4096, 8, 128), (1, 4096, 8, 128), jnp.bfloat16, full, False, tpu) == "pallas"
    assert dispatch.choose((1, 4096, 8, 128), (1, 4096, 8, 128), jnp.bfloat16, full, False, h100) == "cudnn"
    nbhd = masks.Neighborhood2D(grid=(64, 64), window=(9, 9))
    assert dispatch.choose((1, 4096, 8, 128), (1, 4096, 8, 128), jnp.bfloat16, nbhd, False, h100) == "pallas"
    misaligned = masks.BlockSparse(np.eye(4, dtype=bool), (100, 100))
    assert dispatch.choose((1, 400, 8, 64), (1, 400, 8, 64), jnp.float32, misaligned, False, tpu) == "chunked"
    q, k, v = qkv()
    assert attention(q, k, v).shape == q.shape  # what the model code calls


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(implementation="cudnn"), "needs a CUDA GPU"),
        (dict(implementation="flash"), "unknown attention implementation"),
        (
            dict(implementation="pallas_gpu", mask=masks.BlockSparse(np.eye(2, dtype=bool), (20, 20))),
            "chunked",
        ),
        (dict(mask=masks.Neighborhood2D((4, 4), (3, 3))), "covers 16 tokens"),
        (dict(mask=masks.SegmentIds(jnp.zeros((2, 31), jnp.int32))), "segment ids must have shapes"),
        (dict(implementation="pallas_tpu", interpret=False), "TPU kernel cannot be compiled for CPU"),
    ],
)
def test_unsupported_requests_raise_clear_errors(kwargs, message):
    q, k, v = qkv(seq=40 if "mask" in kwargs and isinstance(kwargs["mask"], masks.BlockSparse) else 32)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, **kwargs)


def test_block_sizes_are_checked_against_hardware_limits():
    cfg = pallas_attention.default_config("gpu", masks.Full(), 1.0, 1000, 1000, 72, jnp.bfloat16, False)
    assert cfg.head_dim_padded == 128 and cfg.padded_q == 1024
    pallas_attention.check_hardware(cfg, jnp.bfloat16)
    with pytest.raises(ValueError, match="powers of two"):
        pallas_attention.check_hardware(dataclasses.replace(cfg, block_q=48), jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        pallas_attention.check_hardware(dataclasses.replace(cfg, block_kv=256, num_stages=4), jnp.float32)
    tpu = pallas_attention.default_config("tpu", masks.Full(), 1.0, 1000, 1000, 72, jnp.bfloat16, False)
    assert tpu.head_dim_padded == 128
    pallas_attention.check_hardware(tpu, jnp.bfloat16)
    with pytest.raises(ValueError, match="block_kv % 128"):
        pallas_attention.check_hardware(dataclasses.replace(tpu, block_kv=64), jnp.bfloat16)
    with pytest.raises(ValueError, match="VMEM"):
        pallas_attention.check_hardware(dataclasses.replace(tpu, block_q=4096, block_kv=4096), jnp.float32)


# A platform per block-table row, as `platform.current()` reports them for deviceless targets.
TABLE_PLATFORMS = {
    "v5e": Platform("tpu", "TPU v5 lite"),
    "v5p": Platform("tpu", "TPU v5"),
    "v6e": Platform("tpu", "TPU v6 lite"),
    "sm_80": Platform("gpu", "NVIDIA A100-SXM4-80GB", (8, 0)),
    "sm_90": Platform("gpu", "NVIDIA H100 80GB HBM3", (9, 0)),
}


@pytest.mark.parametrize("key, head_dim", sorted(blocks.TABLE))
def test_block_table_entries_fit_their_budget(key, head_dim):
    """bf16 gets the entry as it is; f32 gets it or smaller blocks, always within the budget."""
    plat = TABLE_PLATFORMS[key]
    family = plat.family
    assert blocks.target_key(family, plat) == key
    assert blocks.choose(family, plat, head_dim, jnp.bfloat16) == blocks.TABLE[key, head_dim]
    for dtype in (jnp.bfloat16, jnp.float32):
        chosen = blocks.choose(family, plat, head_dim, dtype)
        assert max(blocks.kernel_bytes(family, chosen, head_dim, dtype)) <= blocks.budget_bytes(family, plat)
        cfg = pallas_attention.default_config(
            family, masks.Full(), 1.0, 8192, 8192, head_dim, dtype, False, plat
        )
        pallas_attention.check_hardware(cfg, dtype)  # what the kernel checks before compiling


def test_blocks_for_chips_without_a_table_row():
    l4 = Platform("gpu", "NVIDIA L4", (8, 9))  # 99 KiB of shared memory: sm_80's row, shrunk
    assert blocks.target_key("gpu", l4) == "sm_80"
    for head_dim in (64, 128, 256):
        chosen = blocks.choose("gpu", l4, head_dim, jnp.bfloat16)
        assert max(blocks.kernel_bytes("gpu", chosen, head_dim, jnp.bfloat16)) <= 99 * 1024
        assert chosen.block_kv <= blocks.TABLE["sm_80", head_dim].block_kv
    v4 = Platform("tpu", "TPU v4")  # v5e's budget (16 MiB): v5e's row as it is
    assert blocks.choose("tpu", v4, 128, jnp.bfloat16) == blocks.TABLE["v5e", 128]
    cpu = Platform("cpu", "cpu")  # interpret mode: H100's and v5e's rows
    assert blocks.choose("gpu", cpu, 64, jnp.float32) == blocks.TABLE["sm_90", 64]
    assert blocks.choose("tpu", cpu, 128, jnp.float32) == blocks.TABLE["v5e", 128]


@pytest.mark.parametrize("family", ["gpu", "tpu"])
@pytest.mark.parametrize("seq", [1, 24, 256, 300, 640, 1000, 1536, 4097])
def test_blocks_fit_the_sequence_and_one_padding_serves_both_passes(family, seq):
    plat = TABLE_PLATFORMS["v6e" if family == "tpu" else "sm_90"]
    cfg = pallas_attention.default_config(family, masks.Full(), 1.0, seq, seq, 64, jnp.bfloat16, False, plat)
    table = blocks.TABLE[("v6e", 128) if family == "tpu" else ("sm_90", 64)]
    for fwd, bwd, padded, limit in (
        (cfg.block_q, cfg.block_q_bwd, cfg.padded_q, (table.block_q, table.block_q_bwd)),
        (cfg.block_kv, cfg.block_kv_bwd, cfg.padded_kv, (table.block_kv, table.block_kv_bwd)),
    ):
        assert fwd <= limit[0] and bwd <= limit[1]
        assert max(fwd, bwd) % min(fwd, bwd) == 0 and padded % max(fwd, bwd) == 0
        assert padded - seq < max(fwd, bwd)  # no block of padding only
    pallas_attention.check_hardware(cfg, jnp.bfloat16)


def test_bad_shapes_raise_clear_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="same head_dim"):
        attention(q, k[..., :4], v)


@pytest.mark.parametrize("impl", ["dense", "chunked", "pallas_gpu"])
def test_composes_with_jit_vmap_grad_and_remat(impl):
    q, k, v = (x.reshape(2, 1, 24, *x.shape[2:]) for x in qkv(batch=2, seq=24, heads=2, kv_heads=1))
    mask = masks.Local1D(3, 3)

    def loss(fn, q, k, v):
        out = jax.vmap(jax.checkpoint(lambda q, k, v: fn(q, k, v)))(q, k, v)
        return (out * jnp.sin(out)).sum()

    def ours(q, k, v):
        return attention(q, k, v, mask=mask, implementation=impl, interpret=True)

    def ref(q, k, v):
        return reference.attention(q, k, v, mask=mask)[0]

    got = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5)


# pallas_call has no sharding rule: the reason for shard_map; "dense" is what auto runs on CPU.
@pytest.mark.parametrize("impl", ["pallas_gpu", "dense"])
def test_shard_map_over_batch_and_heads_on_8_devices(impl):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
    q, k, v = qkv(batch=4, seq=24, heads=4, kv_heads=2)
    ids = jnp.asarray(np.repeat(np.arange(3), 8)[None].repeat(4, 0).astype(np.int32))
    mask = masks.Local1D(5, 5) & masks.SegmentIds(ids)

    def loss(q, k, v):
        out = pallas_kernels.sharded_attention(q, k, v, mesh=mesh, mask=mask, implementation=impl)
        return (out**2).sum(), out

    (grads, out) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    def ref_loss(q, k, v):
        out = reference.attention(q, k, v, mask=masks.Local1D(5, 5), q_ids=ids, kv_ids=ids)[0]
        return (out**2).sum(), out

    want_grads, want = jax.grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5)


def test_tile_major_permutation_round_trip_through_attention():
    grid, tile, window = (8, 8), (4, 4), (3, 5)
    q, k, v = qkv(batch=1, seq=64, heads=2, kv_heads=2)
    raster = attention(q, k, v, mask=masks.Neighborhood2D(grid, window), implementation="xla")
    pq, pk, pv = (permute(x, grid, tile) for x in (q, k, v))
    tiled = attention(
        pq, pk, pv, mask=masks.Neighborhood2D(grid, window, tile=tile), implementation="chunked"
    )
    np.testing.assert_allclose(unpermute(tiled, grid, tile), raster, atol=1e-5)


def test_chunked_skips_empty_blocks():
    mask = masks.Local1D(100, 100)
    q, k, v = qkv(batch=1, seq=1024, heads=1, kv_heads=1)
    plan = build_plan(mask, 1024, 1024, 128, 128)
    assert plan.rows.steps == 3 < plan.num_kv_blocks  # the busiest row visits 3 of 8 KV blocks

    def scan_lengths(fn):
        return sorted(
            int(n) for n in re.findall(r"scan\[[^\]]*?length=(\d+)", str(jax.make_jaxpr(fn)(q, k, v)))
        )

    fwd = scan_lengths(lambda q, k, v: attention(q, k, v, mask=mask, implementation="chunked"))
    assert fwd == [plan.rows.steps]
    bwd = scan_lengths(
        jax.grad(
            lambda q, k, v: attention(q, k, v, mask=mask, implementation="chunked").sum(), argnums=(0, 1, 2)
        )
    )
    assert bwd == sorted([plan.rows.steps, plan.rows.steps, plan.cols.steps])


@pytest.mark.parametrize("impl", ["auto", "chunked"])
def test_memory_is_linear_in_sequence_16k_tokens(impl, benchmark_module):
    stats = benchmark_module("attention_memory").measure(impl, seq=16384, heads=4, head_dim=64)
    assert stats["dense_scores_mib"] == 4096
    assert stats["fwd_temp_mib"] <= 256, stats
    assert stats["fwd_bwd_temp_mib"] <= 512, stats


@pytest.mark.parametrize("impl", ["pallas_gpu", "dense"])
def test_shard_map_with_per_example_key_padding(impl):
    """KeyPadding with one length per example, batch split over 4 devices: each shard keeps its
    own examples' lengths (the mask is resolved once, globally)."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
    q, k, v = qkv(batch=4, seq=24, heads=4, kv_heads=2)
    lengths = (24, 5, 17, 1)
    out = jax.jit(
        lambda q, k, v: pallas_kernels.sharded_attention(
            q, k, v, mesh=mesh, mask=masks.KeyPadding(lengths), implementation=impl
        )
    )(q, k, v)
    for b, n in enumerate(lengths):
        want = reference.attention(q[b : b + 1, :], k[b : b + 1, :n], v[b : b + 1, :n])[0]
        np.testing.assert_allclose(out[b : b + 1], want, atol=1e-5)
