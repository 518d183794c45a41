"""Copies from the host to a GPU that do not wait for it.

The training loop starts a step before it reads the last one's results (see
:class:`specforge.runner.Loop`), so the GPU has work queued. A plain copy from numpy memory
(``torch.as_tensor(array, device=...)``, ``.to(device)``) synchronises the stream: the host
would wait for the queued step, and the GPU would then idle while the host prepares the
next. Imported only by code that already uses torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_device(array: Any, device: torch.device, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """``array`` (numpy, a tensor or a list) on ``device`` (as ``dtype`` if given), copied to a
    GPU through pinned memory (torch's cache of it) without synchronising."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    if dtype is not None:
        tensor = tensor.to(dtype)
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
