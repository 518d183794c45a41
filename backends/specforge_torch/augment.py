"""The augmentation of :mod:`specforge.data.augment`, on torch tensors (for a GPU).

Same parameters (drawn in numpy from specforge's generator), same formulas; only the array
library differs, so the images agree with the numpy path within float tolerance. Imported
only by code that already uses torch.
"""

from __future__ import annotations

from typing import Any

import torch

from specforge.data.augment import AugmentParams, has_affine
from specforge_torch.transfer import to_device


def _tensor(values: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return to_device(values, device, dtype)


def _fold(index: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    inside = (index >= 0) & (index < size)
    if mode == "reflect":
        period = torch.remainder(index, 2 * size)
        return torch.where(period >= size, 2 * size - 1 - period, period), inside
    return index.clamp(0, size - 1), inside


def sample_bilinear(images: torch.Tensor, sy: torch.Tensor, sx: torch.Tensor, mode: str,
                    fill: float) -> torch.Tensor:
    """Bilinear sampling of (N, H, W, C) images at (N, H, W) coordinates."""
    n, height, width, channels = images.shape
    y0f, x0f = torch.floor(sy), torch.floor(sx)
    wy, wx = (sy - y0f).unsqueeze(-1), (sx - x0f).unsqueeze(-1)
    y0, x0 = y0f.long(), x0f.long()
    flat = images.reshape(n * height * width, channels).to(sy.dtype)
    base = (torch.arange(n, device=images.device) * height * width).view(n, 1, 1)
    out = torch.zeros((n, height, width, channels), dtype=sy.dtype, device=images.device)
    for ddy, wgt_y in ((0, 1 - wy), (1, wy)):
        yi, y_in = _fold(y0 + ddy, height, mode)
        for ddx, wgt_x in ((0, 1 - wx), (1, wx)):
            xi, x_in = _fold(x0 + ddx, width, mode)
            value = flat[(base + yi * width + xi).reshape(-1)].view(n, height, width, channels)
            if mode == "constant":
                value = torch.where((y_in & x_in).unsqueeze(-1), value,
                                    torch.full_like(value, fill))
            out += wgt_y * wgt_x * value
    return out


def source_coordinates(params: AugmentParams, height: int, width: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    f64 = torch.float64
    cy, cx = (height - 1) / 2, (width - 1) / 2
    i = torch.arange(height, device=device, dtype=f64).view(1, height, 1)
    j = torch.arange(width, device=device, dtype=f64).view(1, 1, width)

    def col(values: Any) -> torch.Tensor:
        return _tensor(values, device, f64).view(-1, 1, 1)

    dy, dx = i - cy - col(params.shift_y), j - cx - col(params.shift_x)
    cos, sin = torch.cos(col(params.angle)), torch.sin(col(params.angle))
    return (cy + (cos * dy + sin * dx) / col(params.zoom_y),
            cx + (-sin * dy + cos * dx) / col(params.zoom_x))


def shift_with_zeros(images: torch.Tensor, dy: Any, dx: Any) -> torch.Tensor:
    n, height, width, _ = images.shape
    device = images.device
    rows = torch.arange(height, device=device).view(1, -1) + _tensor(dy, device,
                                                                      torch.long).view(-1, 1)
    cols = torch.arange(width, device=device).view(1, -1) + _tensor(dx, device,
                                                                    torch.long).view(-1, 1)
    valid = ((rows >= 0) & (rows < height)).unsqueeze(2) & ((cols >= 0) & (cols < width)
                                                            ).unsqueeze(1)
    batch = torch.arange(n, device=device).view(n, 1, 1)
    out = images[batch, rows.clamp(0, height - 1).unsqueeze(2),
                 cols.clamp(0, width - 1).unsqueeze(1)]
    return torch.where(valid.unsqueeze(-1), out, torch.zeros_like(out))


def apply_augmentation(images: torch.Tensor, params: AugmentParams, aug: Any) -> torch.Tensor:
    """Augment a float (N, H, W, C) batch on its device; returns float32."""
    _, height, width, _ = images.shape
    device = images.device
    out = images
    if has_affine(aug):
        # float64 coordinates, as numpy: float32 would move pixels by rounding.
        sy, sx = source_coordinates(params, height, width, device)
        out = sample_bilinear(out, sy, sx, aug.fill_mode, aug.fill_value)
    out = out.float()
    if aug.horizontal_flip:
        flip = _tensor(params.flip_h, device, torch.bool).view(-1, 1, 1, 1)
        out = torch.where(flip, out.flip(2), out)
    if aug.vertical_flip:
        flip = _tensor(params.flip_v, device, torch.bool).view(-1, 1, 1, 1)
        out = torch.where(flip, out.flip(1), out)
    if aug.crop_padding:
        out = shift_with_zeros(out, params.crop_y, params.crop_x)
    return out
