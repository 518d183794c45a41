"""Training batches assembled on the device (GPU), from the same plan as the numpy pipeline.

The whole training set moves to the device once, as uint8; each step gathers its images
there, augments them with :mod:`specforge_torch.augment` using the parameters the
numpy pipeline draws, and normalises them. Same indices, same parameters, same formulas:
the batches equal the numpy pipeline's within float tolerance (bit for bit on CPU).
"""

from __future__ import annotations

import numpy as np
import torch

from specforge.data.pipeline import Batch, DataPipeline
from specforge_torch.augment import apply_augmentation
from specforge_torch.transfer import to_device

#: Training sets up to this size (uint8 bytes) are moved to a GPU by `data_on_device: auto`.
AUTO_LIMIT_BYTES = 2 << 30


def fits_on_device(pipeline: DataPipeline) -> bool:
    images = pipeline.train.images
    return isinstance(images, np.ndarray) and images.nbytes <= AUTO_LIMIT_BYTES


class DeviceBatches:
    """A drop-in for :meth:`DataPipeline.train_batch` whose images live on ``device``."""

    def __init__(self, pipeline: DataPipeline, device: torch.device) -> None:
        self.pipeline = pipeline
        self.images = torch.from_numpy(np.asarray(pipeline.train.images)).to(device)
        norm = pipeline.data.normalize
        self.scale = torch.tensor(norm.scale, dtype=torch.float32, device=device)
        self.mean = torch.as_tensor(np.asarray(norm.mean, np.float32), device=device)
        self.std = torch.as_tensor(np.asarray(norm.std, np.float32), device=device)

    def train_batch(self, step: int, part: slice = slice(None)) -> Batch:
        indices, params = self.pipeline.batch_plan(step, part)
        index = to_device(indices, self.images.device)
        images = self.images.index_select(0, index).float()
        if params is not None:
            images = apply_augmentation(images, params, self.pipeline.data.augment)
        x = (images * self.scale - self.mean) / self.std
        return Batch(x, self.pipeline.train.labels[indices])  # type: ignore[arg-type]
