"""DiT shapes, published parameter counts (without allocating), logical axes, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.models import DiT
from dit_jax.models.build import model_spec
from dit_jax.models.layers import sincos_pos_embed_2d

# Parameter counts printed by the official DiT train.py for ImageNet-256 latents (32×32×4,
# learned sigma, 1000 classes); they include the fixed pos_embed table (tokens × hidden).
PUBLISHED = {"XL/2": 675_129_632}
# Table 1 of the paper, in millions.
PUBLISHED_M = {"S/2": 33, "B/2": 130, "L/2": 458, "XL/2": 675}


def counted(variant: str) -> int:
    m = config_lib.Model(image_size=32, in_channels=4, learn_sigma=True, **config_lib.dit_variant(variant))
    abstract = nnx.eval_shape(lambda: DiT(m, rngs=nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    return params + m.num_patches * m.hidden_size


@pytest.mark.parametrize("variant", list(PUBLISHED_M))
def test_parameter_counts_match_paper(variant):
    n = counted(variant)
    assert abs(n / 1e6 - PUBLISHED_M[variant]) < 0.6  # the table rounds to whole millions
    if variant in PUBLISHED:
        assert n == PUBLISHED[variant]


def test_every_parameter_has_logical_axes(tiny_config):
    spec = model_spec(tiny_config())
    axes = jax.tree.leaves(spec.logical_axes, is_leaf=lambda a: isinstance(a, tuple))
    shapes = jax.tree.leaves(spec.abstract_params)
    assert len(axes) == len(shapes)
    for a, s in zip(axes, shapes, strict=True):
        assert isinstance(a, tuple) and len(a) == len(s.shape)


def test_pos_embed_matches_reference_formula():
    table = sincos_pos_embed_2d(8, 3)  # 9 tokens in row-major order
    r, c = 1, 2
    omega = 1.0 / 10_000 ** (np.arange(2) / 2.0)
    expected = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
    np.testing.assert_allclose(table[r * 3 + c], expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_shapes_and_dtypes(dtype):
    m = config_lib.Model(
        image_size=8,
        in_channels=3,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=4,
        num_classes=5,
        learn_sigma=True,
        dtype=dtype,
    )
    model = DiT(m, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 8, 8, 3))
    out = model(x, jnp.array([0.0, 999.0]), jnp.array([0, 5]), drop_key=jax.random.key(0))
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.dtype(dtype)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_zero_init_output_and_remat_equivalence():
    m = config_lib.Model(
        image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3
    )
    model = DiT(m, rngs=nnx.Rngs(0))
    x, t, y = jax.random.normal(jax.random.key(1), (2, 8, 8, 1)), jnp.array([3.0, 500.0]), jnp.array([0, 2])
    assert not np.any(np.asarray(model(x, t, y)))  # adaLN-Zero: the untrained model outputs 0
    # Perturb the zero-initialised layers, then remat must not change values or gradients.
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    remat = DiT(dataclasses.replace(m, remat="full"), rngs=nnx.Rngs(0))
    graphdef_r = nnx.split(remat)[0]

    def loss(p, g):
        return jnp.sum(nnx.merge(g, p)(x, t, y) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l1, g1), (l2, g2) = value_and_grad(params, graphdef), value_and_grad(params, graphdef_r)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_label_dropout_uses_null_class():
    m = config_lib.Model(
        image_size=4,
        in_channels=1,
        patch_size=2,
        hidden_size=16,
        depth=1,
        num_heads=2,
        num_classes=3,
        class_dropout=0.5,
    )
    emb = DiT(m, rngs=nnx.Rngs(0)).y_embedder
    y = jnp.zeros((1000,), jnp.int32)
    dropped = emb(y, jax.random.key(0))
    is_null = np.all(np.isclose(dropped, emb.table[...][3]), axis=-1)
    assert 0.45 < is_null.mean() < 0.55
    assert np.array_equal(emb(y), jnp.broadcast_to(emb.table[...][0], (1000, 16)))
