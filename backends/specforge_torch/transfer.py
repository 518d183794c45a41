"""Copies between the host and a GPU that do not wait for the GPU's queued work.

The training loop starts a step before it reads the last one's results (see
:class:`specforge.runner.Loop`), so the GPU has work queued. A plain copy from numpy memory
(``torch.as_tensor(array, device=...)``, ``.to(device)``) synchronises the stream: the host
would wait for the queued step, and the GPU would then idle while the host prepares the
next. Imported only by code that already uses torch.
"""

from __future__ import annotations

from collections.abc import Callable
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


def to_host_later(*tensors: torch.Tensor) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Start copying ``tensors`` to the host; what it returns waits for those copies (for the
    work queued before them, not after) and gives the host's tensors. From a GPU the copies
    go to pinned memory, queued behind the work that computes them, before any later work
    can overwrite them (as CUDA graphs do to their outputs)."""
    if not tensors[0].is_cuda:
        return lambda: tensors
    copies = tuple(t.to("cpu", non_blocking=True) for t in tensors)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> tuple[torch.Tensor, ...]:
        copied.synchronize()
        return copies
    return wait
