"""A PNG grid of augmented training images, to see what the model will be shown."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from specforge.atomic import atomic_path
from specforge.data.folders import _pil
from specforge.data.pipeline import DataPipeline


def write_grid(pipeline: DataPipeline, path: Path, step: int = 0, scale: int = 4) -> None:
    """Write training batch ``step`` as a grid, undoing the normalisation, atomically."""
    batch = pipeline.train_batch(step)
    norm = pipeline.data.normalize
    pixels = (batch.x * np.asarray(norm.std, np.float32) + np.asarray(norm.mean, np.float32)
              ) / np.float32(norm.scale)
    peak = 255.0 if pixels.max() > 16.5 else 16.0  # digits are 0..16
    images = np.clip(pixels * (255.0 / peak), 0, 255).astype(np.uint8)
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + 1), cols * (w + 1), c), np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = images[k]
    image_module = _pil()
    image = image_module.fromarray(grid[..., 0] if c == 1 else grid)
    image = image.resize((image.width * scale, image.height * scale),
                         image_module.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
