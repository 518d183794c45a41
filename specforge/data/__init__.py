"""The data pipeline every backend shares: sources, splits, shuffling, augmentation, batches.

Everything random here comes from specforge's own generators seeded by the spec's seed, so
that the same spec gives the same batches, pixel for pixel, in every backend. Images are
``uint8`` ``(N, height, width, channels)`` until a batch is drawn; batches are ``float32``.
"""

from specforge.data.pipeline import Batch, DataPipeline, build_pipeline
from specforge.data.sources import DataError, Dataset

__all__ = ["Batch", "DataError", "DataPipeline", "Dataset", "build_pipeline"]
