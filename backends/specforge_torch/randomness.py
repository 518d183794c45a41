"""specforge's dropout masks in torch: the generator of ``specforge.ir.randomness``, bit for
bit (docs/ir-ops.md, "The dropout generator").

Besides torch this file imports only ``as_int32`` and ``mask_shape`` from the reference
(pure Python), so a built script can carry it verbatim. torch has no shifts
on uint32, so the words are int32 with two's-complement wrap-around (the same bits), and a
logical shift is an arithmetic one followed by a mask. Everything stays on the device and
is traceable: the per-step key is a tensor argument (a new key is new data, not a new
graph), nothing reads a value back to the host, so a trainer can call :func:`dropout_mask`
inside a ``torch.compile``-d step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from specforge.ir.randomness import as_int32, mask_shape

_UNIFORM_BITS = 24

# lowbias32's multipliers and the golden-ratio constant, as int32 values
_MUL1 = as_int32(0x7FEB352D)
_MUL2 = as_int32(0x846CA68B)
_GOLDEN = as_int32(0x9E3779B9)


def key_tensor(key: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A 32-bit key (``specforge.ir.randomness.node_key``) as an int32 scalar tensor."""
    return torch.tensor(as_int32(key), dtype=torch.int32, device=device)


def keep_threshold(rate: float) -> int:
    """ceil(rate * 2^24), exactly (``specforge.ir.randomness.keep_threshold``): scaling a
    float by a power of two is exact, and plain float arithmetic stays traceable."""
    if not 0 <= rate < 1:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return math.ceil(rate * 2.0**_UNIFORM_BITS)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int32 words: arithmetic shift, then clear the copied signs."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 element-wise on int32 words."""
    x = x ^ _shr(x, 16)
    x = x * _MUL1
    x = x ^ _shr(x, 15)
    x = x * _MUL2
    return x ^ _shr(x, 16)


def _first_counter(first_sample: int | torch.Tensor, draws_per_sample: int
                   ) -> int | torch.Tensor:
    if isinstance(first_sample, torch.Tensor):
        return first_sample.to(torch.int32) * as_int32(draws_per_sample)  # wraps like uint32
    return as_int32(first_sample * draws_per_sample)


def uniform24(shape: Sequence[int], key: torch.Tensor, first_sample: int | torch.Tensor = 0,
              spatial: bool = False, per_sample: bool = False,
              device: torch.device | str | None = None) -> torch.Tensor:
    """r(i) of every mask element (int32 in [0, 2^24)) in the mask's IR (channels-last)
    shape (``mask_shape``); ``shape`` is the node output's IR shape, batch first."""
    shape = mask_shape(shape, spatial, per_sample)
    counters = torch.arange(math.prod(shape), dtype=torch.int32,
                            device=key.device if device is None else device)
    counters = counters + _first_counter(first_sample, math.prod(shape[1:]))
    bits = mix32_tensor(mix32_tensor(counters ^ key.to(torch.int32)) + _GOLDEN)
    return _shr(bits, 32 - _UNIFORM_BITS).reshape(shape)


def dropout_mask(shape: Sequence[int], rate: float, key: torch.Tensor,
                 first_sample: int | torch.Tensor = 0, spatial: bool = False,
                 per_sample: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dropout mask (0 or 1 / (1 - rate)) of a node output whose IR shape is ``shape``:
    (N, H, W, C) or (N, F), N being the samples computed here.

    ``key``: the node's key at this step (:func:`key_tensor`), an int32 scalar tensor.
    ``first_sample``: the global index of the first of the N samples (a data-parallel
    shard's offset). Images come back in torch's layout, (N, C, H, W), or (N, C, 1, 1) when
    ``spatial``, (N, 1, 1, 1) when ``per_sample`` ((N, 1) on features); the draws are
    counted in the IR's (N, H, W, C) order and permuted. The result is on ``device`` (by
    default the key's), in ``dtype``.
    """
    r = uniform24(shape, key, first_sample, spatial, per_sample, device)
    mask = (r >= keep_threshold(rate)).to(dtype) * (1 / (1 - rate))
    return mask.permute(0, 3, 1, 2) if mask.dim() == 4 else mask
