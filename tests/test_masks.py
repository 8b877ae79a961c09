"""Mask semantics (as written in KERNELS.md), block classification and plans, permutations."""

import itertools
import time

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from pallas_kernels import build_plan, masks, permute, unpermute
from pallas_kernels import plan as plan_lib
from pallas_kernels.masks import EMPTY, FULL, PARTIAL
from pallas_kernels.plan import tile_visible


def brute(rule, seq_q, seq_kv):
    return np.array([[bool(rule(i, j)) for j in range(seq_kv)] for i in range(seq_q)])


def test_semantics_match_the_brief():
    n = 30
    cases = [
        (masks.Full(), lambda i, j: True, n, n),
        (masks.Local1D(2, 5), lambda i, j: i - 2 <= j <= i + 5, 20, 27),
        (masks.KeyPadding(7), lambda i, j: j < 7, 9, 12),
        (
            masks.Neighborhood2D(grid=(5, 6), window=(3, 5)),
            lambda i, j: abs(i // 6 - j // 6) <= 1 and abs(i % 6 - j % 6) <= 2,
            n,
            n,
        ),
        (
            masks.Neighborhood3D(grid=(2, 3, 5), window=(1, 3, 3)),
            lambda i, j: i // 15 == j // 15 and abs(i // 5 % 3 - j // 5 % 3) <= 1 and abs(i % 5 - j % 5) <= 1,
            n,
            n,
        ),
        (
            masks.FrameTile(frames=6, tokens_per_frame=5, radius=1, global_frames=2),
            lambda i, j: abs(i // 5 - j // 5) <= 1 or j // 5 < 2,
            n,
            n,
        ),
        (
            masks.BlockSparse(np.array([[1, 0, 1], [0, 1, 0]], bool), block_shape=(4, 5)),
            lambda i, j: [[1, 0, 1], [0, 1, 0]][i // 4][j // 5],
            8,
            15,
        ),
    ]
    for mask, rule, sq, sk in cases:
        np.testing.assert_array_equal(masks.dense_mask(mask, sq, sk), brute(rule, sq, sk), err_msg=repr(mask))
    a, b = masks.Local1D(1, 1), masks.KeyPadding(4)
    np.testing.assert_array_equal(
        masks.dense_mask(a & b, 8, 8), masks.dense_mask(a, 8, 8) & masks.dense_mask(b, 8, 8)
    )
    np.testing.assert_array_equal(
        masks.dense_mask(a | b, 8, 8), masks.dense_mask(a, 8, 8) | masks.dense_mask(b, 8, 8)
    )


def test_masks_are_hashable_and_compare_by_value():
    bm = np.eye(3, dtype=bool)
    assert masks.BlockSparse(bm, (2, 2)) == masks.BlockSparse(bm.copy(), (2, 2))
    assert hash(masks.BlockSparse(bm, (2, 2))) == hash(masks.BlockSparse(bm.copy(), (2, 2)))
    assert masks.Neighborhood2D((4, 4), (3, 3)) & masks.Local1D(1, 2) == masks.And(
        (masks.Neighborhood2D((4, 4), (3, 3)), masks.Local1D(1, 2))
    )
    assert len({masks.Local1D(1, 2), masks.Local1D(1, 2), masks.Local1D(2, 1)}) == 2
    assert build_plan(masks.Local1D(3, 3), 64, 64, 16, 16) is build_plan(masks.Local1D(3, 3), 64, 64, 16, 16)


def test_bad_masks_raise_clear_errors():
    with pytest.raises(ValueError, match="odd"):
        masks.Neighborhood2D((4, 4), (2, 3))
    with pytest.raises(ValueError, match="covers 16 tokens"):
        masks.resolve(masks.Neighborhood2D((4, 4), (3, 3)), 1, 15, 15)
    with pytest.raises(ValueError, match="only through `&`"):
        masks.Local1D(1, 1) | masks.SegmentIds(np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="lengths for a batch"):
        masks.resolve(masks.KeyPadding((3, 4, 5)), 2, 8, 8)


MASKS = [
    lambda n: masks.Local1D(left=n // 7, right=n // 11),
    lambda n: masks.KeyPadding(max(1, n - 5)),
    lambda n: masks.FrameTile(frames=n // 4, tokens_per_frame=4, radius=1, global_frames=1),
    lambda n: masks.Neighborhood2D(grid=(n // 4, 4), window=(3, 3)),
    lambda n: masks.Neighborhood3D(grid=(n // 8, 2, 4), window=(3, 1, 3)),
    lambda n: masks.BlockSparse(np.random.RandomState(n).rand(-(-n // 8), -(-n // 6)) < 0.4, (8, 6)),
    lambda n: masks.Local1D(2, 0) | masks.FrameTile(frames=n // 4, tokens_per_frame=4, radius=0),
    lambda n: masks.Neighborhood2D(grid=(n // 4, 4), window=(3, 1)) & masks.KeyPadding(n - 3),
]


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    which=st.integers(0, len(MASKS) - 1),
    blocks=st.integers(2, 12),
    block_q=st.sampled_from([4, 8, 16]),
    block_kv=st.sampled_from([4, 8, 16, 32]),
)
def test_plan_reproduces_the_dense_mask(which, blocks, block_q, block_kv):
    n = 8 * blocks
    mask = MASKS[which](n)
    dense = masks.dense_mask(mask, n, n)
    plan = build_plan(mask, n, n, block_q, block_kv)
    rebuilt = np.zeros_like(dense)
    for i, j in itertools.product(range(plan.num_q_blocks), range(plan.num_kv_blocks)):
        tile = tile_visible(mask, plan, i, j)
        rebuilt[i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv] = tile
        truth = dense[i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv]
        if plan.kinds[i, j] == EMPTY:
            assert not truth.any()
        if plan.kinds[i, j] == FULL:
            assert truth.all()
    np.testing.assert_array_equal(rebuilt, dense)
    # Leaf masks in raster order are classified exactly (no needless PARTIAL tiles), except that
    # a KV block holding padding is never FULL.
    if which < 6:
        for i, j in zip(*np.nonzero(plan.kinds == PARTIAL), strict=True):
            if j == plan.num_kv_blocks - 1 and n % block_kv:
                continue
            truth = dense[i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv]
            assert truth.any() and not truth.all()


def test_compacted_lists_and_transposed_plan():
    mask = masks.Local1D(5, 20) | masks.FrameTile(frames=8, tokens_per_frame=12, radius=0, global_frames=1)
    plan = build_plan(mask, 96, 90, 16, 8)
    for part, kinds in ((plan.rows, plan.kinds), (plan.cols, plan.kinds.T)):
        for r in range(kinds.shape[0]):
            n, nf = part.count[r], part.n_full[r]
            listed = part.index[r, :n]
            assert sorted(listed) == list(np.nonzero(kinds[r])[0])
            assert (kinds[r, listed[:nf]] == FULL).all() and (kinds[r, listed[nf:]] == PARTIAL).all()
            assert (part.index[r, n:] == (listed[-1] if n else 0)).all()  # padding repeats the last block
        assert part.steps == part.count.max()
    assert plan.kinds[:, -1].max() <= PARTIAL  # 90 keys: the last block holds padding


def _reference_compaction(kinds):
    """Per row: FULL blocks then PARTIAL ones, ascending, padded with the last (a plain stable sort)."""
    order = np.argsort(-kinds.astype(np.int64), axis=1, kind="stable")
    count = (kinds != EMPTY).sum(1)
    steps = max(int(count.max(initial=0)), 1)
    index = order[:, :steps].copy()
    for r, n in enumerate(count):
        index[r, n:] = index[r, n - 1] if n else 0
    kind = np.take_along_axis(kinds, index, axis=1) * (np.arange(steps) < count[:, None])
    return index, kind, (kinds == FULL).sum(1), count


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 17])
def test_plans_built_in_row_chunks_match_a_direct_construction(monkeypatch, chunk):
    """Plans are built over chunks of block rows (with a uniform-rows shortcut); any chunk size
    gives the kinds of the dense mask and the compacted lists of a plain sort."""
    monkeypatch.setattr(plan_lib, "CHUNK", chunk)
    n = 96
    cases = [make(n) for make in MASKS] + [masks.Full(), masks.KeyPadding(50)]
    for mask, (bq, bk) in itertools.product(cases, [(8, 8), (16, 12), (32, 5)]):
        plan = plan_lib.build_plan.__wrapped__(mask, n, n, bq, bk)  # bypass the cache
        dense = masks.dense_mask(mask, n, n)
        for i, j in itertools.product(range(plan.num_q_blocks), range(plan.num_kv_blocks)):
            tile = dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            assert plan.kinds[i, j] != EMPTY or not tile.any()
            assert plan.kinds[i, j] != FULL or tile.all()
        for part, kinds in ((plan.rows, plan.kinds), (plan.cols, plan.kinds.T)):
            index, kind, n_full, count = _reference_compaction(np.asarray(kinds))
            np.testing.assert_array_equal(part.index, index, err_msg=repr(mask))
            np.testing.assert_array_equal(part.kind, kind, err_msg=repr(mask))
            np.testing.assert_array_equal(part.n_full, n_full)
            np.testing.assert_array_equal(part.count, count)


def test_classification_cost_grows_with_blocks_not_tokens():
    start = time.perf_counter()
    plan = build_plan(masks.Neighborhood2D(grid=(256, 256), window=(13, 13)), 65536, 65536, 128, 128)
    local = build_plan(masks.Local1D(1000, 1000), 2**20, 2**20, 2048, 2048)
    assert time.perf_counter() - start < 10.0
    assert 0 < plan.density < 0.1 and local.kinds.shape == (512, 512)


def test_tile_major_permutation():
    grid, tile, window = (8, 12), (4, 4), (3, 5)
    x = np.arange(2 * 96).reshape(2, 96)
    np.testing.assert_array_equal(unpermute(permute(x, grid, tile), grid, tile), x)
    perm = np.asarray(permute(np.arange(96)[None], grid, tile))[0]
    raster = masks.dense_mask(masks.Neighborhood2D(grid, window), 96, 96)
    tiled_mask = masks.Neighborhood2D(grid, window, tile=tile)
    np.testing.assert_array_equal(masks.dense_mask(tiled_mask, 96, 96), raster[np.ix_(perm, perm)])
    # With tile-sized blocks, tile-major order visits fewer tiles than raster order.
    big, win, big_tile = (64, 64), (13, 13), (8, 8)
    raster_plan = build_plan(masks.Neighborhood2D(big, win), 4096, 4096, 64, 64)
    tiled_plan = build_plan(masks.Neighborhood2D(big, win, tile=big_tile), 4096, 4096, 64, 64)
    assert tiled_plan.density < 0.7 * raster_plan.density
    grid3, tile3 = (4, 4, 6), (2, 2, 3)
    perm3 = np.asarray(permute(np.arange(96)[None], grid3, tile3))[0]
    raster3 = masks.dense_mask(masks.Neighborhood3D(grid3, (3, 1, 3)), 96, 96)
    tiled3 = masks.dense_mask(masks.Neighborhood3D(grid3, (3, 1, 3), tile=tile3), 96, 96)
    np.testing.assert_array_equal(tiled3, raster3[np.ix_(perm3, perm3)])
