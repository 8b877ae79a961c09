"""Labelled sample grids: one row per class, written as PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def grid_by_class(
    images_NHWC: np.ndarray,
    labels_N: np.ndarray,
    num_classes: int,
    per_class: int,
    *,
    scale: int = 1,
    gap: int = 0,
) -> np.ndarray:
    """Arranges uint8 images into a grid, row k holding class k: cells upscaled `scale`× and
    separated by `gap` white pixels (right and below each cell).

    Missing cells stay black. With num_classes == 0 (unconditional) the images fill rows in order.
    """
    if scale > 1:
        images_NHWC = images_NHWC.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images_NHWC.shape
    rows = max(num_classes, 1) if num_classes else int(np.ceil(n / per_class))
    grid = np.full((rows, per_class, h + gap, w + gap, c), 255, np.uint8)
    grid[:, :, :h, :w] = 0
    filled = np.zeros(rows, int)
    for i, (image, label) in enumerate(zip(images_NHWC, labels_N, strict=True)):
        row = int(label) if num_classes else i // per_class
        if row < rows and filled[row] < per_class:
            grid[row, filled[row], :h, :w] = image
            filled[row] += 1
    return grid.transpose(0, 2, 1, 3, 4).reshape(rows * (h + gap), per_class * (w + gap), c)


def save_grid_png(
    path: str,
    images_NHWC: np.ndarray,
    labels_N: np.ndarray,
    num_classes: int,
    per_class: int = 8,
    *,
    class_names: list[str] | None = None,
    min_cell: int = 32,
) -> np.ndarray:
    """Writes a labelled grid (class name left of each row, cells upscaled to >= min_cell px).

    Returns the grid as uint8 [H, W, C] (unlabelled), e.g. for TensorBoard."""
    h = images_NHWC.shape[1]
    scale = max(1, int(np.ceil(min_cell / h)))
    grid = grid_by_class(images_NHWC, labels_N, num_classes, per_class, scale=scale, gap=2)
    mode = "L" if grid.shape[-1] == 1 else "RGB"
    body = Image.fromarray(grid[..., 0] if mode == "L" else grid, mode)
    margin = 40 if num_classes else 0
    canvas = Image.new(mode, (body.width + margin, body.height), 255 if mode == "L" else (255, 255, 255))
    canvas.paste(body, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    cell = h * scale + 2
    for k in range(num_classes):
        name = class_names[k] if class_names else str(k)
        draw.text((4, k * cell + cell // 2 - 5), name[:6], fill=0 if mode == "L" else (0, 0, 0))
    canvas.save(path)
    return grid
