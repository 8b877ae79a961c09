"""Sample-file conventions and grids."""

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import grids, sampling
from dit_jax.data import pixels


def test_balanced_labels_and_uint8_conversion():
    assert np.bincount(sampling.balanced_labels(500, 10)).tolist() == [50] * 10
    x = np.array([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 2.0])
    assert pixels.to_uint8(x).tolist() == [0, 0, 0, 128, 255, 255, 255]
    # Ties round to even: (x + 1) * 127.5 = 128.5, 129.5, 254.5 exactly in float32.
    ties = np.array([257, 259, 509], np.float32) / np.float32(255) - np.float32(1)
    assert ((ties + np.float32(1)) * np.float32(127.5)).tolist() == [128.5, 129.5, 254.5]
    assert pixels.to_uint8(ties).tolist() == [128, 130, 254]


def test_uint8_round_trip_and_jax_inputs():
    u = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    x = pixels.from_uint8(u)
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    np.testing.assert_array_equal(x, u.astype(np.float32) * np.float32(2 / 255) - np.float32(1))
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(pixels.to_uint8(x), u)
    np.testing.assert_array_equal(pixels.to_uint8(jnp.asarray(x)), u)
    # JAX arrays stay JAX arrays (and trace under jit); float images pass through as float32.
    jitted = jax.jit(pixels.as_model_space)(jnp.asarray(u))
    assert isinstance(jitted, jax.Array) and jitted.dtype == jnp.float32
    np.testing.assert_array_equal(pixels.to_uint8(jitted), u)
    np.testing.assert_array_equal(pixels.as_model_space(x.astype(np.float64)), x)
    assert pixels.as_model_space(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32


def test_grid_rows_are_classes(tmp_path):
    images = np.stack([np.full((2, 2, 1), 10 * k, np.uint8) for k in range(6)])
    labels = np.array([2, 0, 1, 2, 0, 1])
    grid = grids.grid_by_class(images, labels, num_classes=3, per_class=2, scale=2, gap=1)
    assert grid.shape == (3 * 5, 2 * 5, 1)
    cell = lambda r, c: grid[r * 5 : r * 5 + 4, c * 5 : c * 5 + 4, 0]
    assert (cell(0, 0) == 10).all() and (cell(0, 1) == 40).all()  # class 0: images 1 and 4
    assert (cell(2, 0) == 0).all() and (cell(2, 1) == 30).all()  # class 2: images 0 and 3
    assert (grid[4, :, 0] == 255).all()  # the gap row
    grids.save_grid_png(str(tmp_path / "g.png"), images, labels, 3, 2)
    assert (tmp_path / "g.png").stat().st_size > 0
