"""Random augmentation, vectorised over a batch, with parameters from specforge's generator.

The transform of one image, in this order (every backend gets these exact pixels):

1. affine: output pixel (i, j) samples the input at
   ``sy = cy + (cos a * dy + sin a * dx) / zy`` and ``sx = cx + (-sin a * dy + cos a * dx) / zx``
   where ``dy = i - cy - ty``, ``dx = j - cx - tx``, (cy, cx) is the image centre, ``a`` the
   rotation (positive turns the content counter-clockwise), ``ty, tx`` the shifts in pixels
   and ``zy, zx`` the zoom (above 1 enlarges). Sampling is bilinear; outside the image,
   ``fill_mode`` decides: ``nearest`` repeats the edge, ``reflect`` mirrors about it
   including the edge pixel (dcba|abcd|dcba, as Keras's ImageDataGenerator),
   ``constant`` uses ``fill_value``;
2. flips (horizontal, vertical), each with probability 1/2;
3. random crop with padding p: shift by integers in [-p, p], zeros outside.

Parameters are drawn for every image, always all of them and in a fixed order, so that
switching one option on does not change the others' draws.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AugmentParams:
    """Per-image parameters of one batch (arrays of length N)."""

    angle: np.ndarray      # radians
    shift_y: np.ndarray    # pixels
    shift_x: np.ndarray
    zoom_y: np.ndarray
    zoom_x: np.ndarray
    flip_h: np.ndarray     # bool
    flip_v: np.ndarray
    crop_y: np.ndarray     # int
    crop_x: np.ndarray

    def take(self, part: slice) -> AugmentParams:
        """The parameters of the images in ``part`` of the batch."""
        return AugmentParams(*(getattr(self, f.name)[part] for f in fields(self)))


def is_identity(aug: Any) -> bool:
    return not (aug.rotation or aug.width_shift or aug.height_shift or aug.zoom
                or aug.horizontal_flip or aug.vertical_flip or aug.crop_padding)


def has_affine(aug: Any) -> bool:
    return bool(aug.rotation or aug.width_shift or aug.height_shift or aug.zoom)


def draw_params(aug: Any, n: int, height: int, width: int,
                rng: np.random.Generator) -> AugmentParams:
    """Draw one batch's parameters; uniform ranges as in Keras's ImageDataGenerator."""
    u = rng.uniform(-1.0, 1.0, (5, n))
    coins = rng.random((2, n)) < 0.5
    p = aug.crop_padding
    crops = rng.integers(-p, p + 1, (2, n))
    return AugmentParams(
        angle=np.deg2rad(aug.rotation * u[0]),
        shift_x=aug.width_shift * width * u[1],
        shift_y=aug.height_shift * height * u[2],
        zoom_x=1.0 + aug.zoom * u[3],
        zoom_y=1.0 + aug.zoom * u[4],
        flip_h=coins[0] & bool(aug.horizontal_flip),
        flip_v=coins[1] & bool(aug.vertical_flip),
        crop_y=crops[0], crop_x=crops[1],
    )


def source_coordinates(params: AugmentParams, height: int, width: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Where each output pixel samples the input: two (N, H, W) float64 arrays."""
    cy, cx = (height - 1) / 2, (width - 1) / 2
    i = np.arange(height, dtype=np.float64)[None, :, None]
    j = np.arange(width, dtype=np.float64)[None, None, :]
    col = (slice(None), None, None)
    dy = i - cy - params.shift_y[col]
    dx = j - cx - params.shift_x[col]
    cos, sin = np.cos(params.angle)[col], np.sin(params.angle)[col]
    sy = cy + (cos * dy + sin * dx) / params.zoom_y[col]
    sx = cx + (-sin * dy + cos * dx) / params.zoom_x[col]
    return sy, sx


def _fold(index: np.ndarray, size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Map possibly-outside integer indices inside; returns (index, inside mask)."""
    inside = (index >= 0) & (index < size)
    if mode == "reflect":
        period = index % (2 * size)
        return np.where(period >= size, 2 * size - 1 - period, period), inside
    return np.clip(index, 0, size - 1), inside


#: Pixels sampled at a time. Each step's temporaries (8 bytes x channels x this) then stay
#: small enough to be reused from the heap and the cache instead of being mapped fresh from
#: the system on every call: that page faulting was most of the time (a CIFAR batch of 32
#: took 4 ms in one pass, 1 ms in chunks, with the same bits).
CHUNK_PIXELS = 4096


def _neighbours(coordinate: np.ndarray, size: int, mode: str
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The pixels below and above each coordinate along one axis: (index folded inside,
    whether it was inside, bilinear weight) for each."""
    lower = np.floor(coordinate)
    weight = coordinate - lower
    index = lower.astype(np.intp)
    return [(*_fold(index + d, size, mode), w) for d, w in ((0, 1 - weight), (1, weight))]


def _sample_pixels(planes: np.ndarray, first: np.ndarray, sy: np.ndarray, sx: np.ndarray,
                   size: tuple[int, int], mode: str, fill: float) -> np.ndarray:
    """Bilinear samples of (C, N*H*W) ``planes`` at flat coordinates, as (C, pixels) float64;
    ``first`` is the flat index of each output pixel's image's first pixel."""
    height, width = size
    out = np.zeros((planes.shape[0], sy.size), np.float64)
    cols = _neighbours(sx, width, mode)
    for yi, y_in, wgt_y in _neighbours(sy, height, mode):
        row = first + yi * width
        for xi, x_in, wgt_x in cols:  # the corners add up in this order, in float64
            value = planes.take(row + xi, axis=1)
            if mode == "constant":
                value = np.where(y_in & x_in, value, fill)
            out += wgt_y * wgt_x * value
    return out


def sample_bilinear(images: np.ndarray, sy: np.ndarray, sx: np.ndarray, mode: str,
                    fill: float) -> np.ndarray:
    """Bilinear sampling of (N, H, W, C) float32 images at (N, H, W) coordinates."""
    _, height, width, channels = images.shape
    # Channels first and pixels flat, so that every operation runs along long rows.
    planes = np.ascontiguousarray(images.reshape(-1, channels).T)
    sy, sx = sy.ravel(), sx.ravel()
    out = np.empty((channels, sy.size), np.float32)
    for start in range(0, sy.size, CHUNK_PIXELS):
        part = slice(start, start + CHUNK_PIXELS)
        pixel = np.arange(start, min(start + CHUNK_PIXELS, sy.size), dtype=np.intp)
        first = pixel - pixel % (height * width)
        out[:, part] = _sample_pixels(planes, first, sy[part], sx[part], (height, width),
                                      mode, fill)
    return np.ascontiguousarray(out.T).reshape(images.shape)


def shift_with_zeros(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """out[n, i, j] = images[n, i + dy[n], j + dx[n]], zero outside (crop after padding)."""
    n, height, width, _ = images.shape
    rows = np.arange(height)[None, :] + dy[:, None]
    cols = np.arange(width)[None, :] + dx[:, None]
    valid = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None]
    batch = np.arange(n)[:, None, None]
    out = images[batch, np.clip(rows, 0, height - 1)[:, :, None],
                 np.clip(cols, 0, width - 1)[:, None, :]]
    return np.where(valid[..., None], out, 0).astype(images.dtype)


def affine(images: np.ndarray, params: AugmentParams, aug: Any) -> np.ndarray:
    """Rotation, shifts and zoom, sampled bilinearly; ``fill_mode`` outside the image."""
    _, height, width, _ = images.shape
    sy, sx = source_coordinates(params, height, width)
    return sample_bilinear(images, sy, sx, aug.fill_mode, aug.fill_value)


def flip_horizontally(images: np.ndarray, params: AugmentParams, aug: Any) -> np.ndarray:
    flipped = images.copy()  # only the flipped images move (np.where would copy every pixel)
    flipped[params.flip_h] = images[params.flip_h, :, ::-1]
    return flipped


def flip_vertically(images: np.ndarray, params: AugmentParams, aug: Any) -> np.ndarray:
    flipped = images.copy()
    flipped[params.flip_v] = images[params.flip_v, ::-1]
    return flipped


def crop(images: np.ndarray, params: AugmentParams, aug: Any) -> np.ndarray:
    return shift_with_zeros(images, params.crop_y, params.crop_x)


#: The transforms, in the order they apply (a built script keeps only its spec's).
AUGMENTATIONS = {"affine": affine, "horizontal_flip": flip_horizontally,
                 "vertical_flip": flip_vertically, "crop": crop}


def enabled(aug: Any) -> set[str]:
    """The names of the transforms ``aug`` switches on."""
    on = {"affine": has_affine(aug), "horizontal_flip": aug.horizontal_flip,
          "vertical_flip": aug.vertical_flip, "crop": aug.crop_padding}
    return {name for name, value in on.items() if value}


def apply_augmentation(images: np.ndarray, params: AugmentParams, aug: Any) -> np.ndarray:
    """Augment a float32 (N, H, W, C) batch with ``params``."""
    on = enabled(aug)
    for name, transform in AUGMENTATIONS.items():
        if name in on:
            images = transform(images, params, aug)
    return np.ascontiguousarray(images, dtype=np.float32)
