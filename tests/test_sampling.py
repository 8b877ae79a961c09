"""Sample-file conventions and grids."""

import numpy as np

from dit_jax import grids, sampling


def test_balanced_labels_and_uint8_conversion():
    assert np.bincount(sampling.balanced_labels(500, 10)).tolist() == [50] * 10
    x = np.array([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 2.0])
    assert sampling.to_uint8(x).tolist() == [0, 0, 0, 128, 255, 255, 255]


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
