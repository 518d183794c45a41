"""Dropout masks that belong to specforge, so that every backend drops the same units.

The mask of dropout node ``node`` at training step ``step`` comes from
``default_rng([seed, DROPOUT, step, crc32(node)])`` (the data pipeline's streams use the
purposes 1 to 3; outside conformance runs, the Keras backend seeds each dropout layer's own
generator from ``[seed, DROPOUT, crc32(node)]``). A mask is laid out like the node's output
in the IR, (N, H, W, C) or (N, features), so a mask after a flatten is in (height, width,
channel) order on every backend: the torch backend flattens in that order too. Spatial
dropout draws one value per (sample, channel): shape (N, 1, 1, C). Kept units are scaled by
1 / (1 - rate).
"""

from __future__ import annotations

import zlib

import numpy as np

from specforge.ir.graph import Graph

DROPOUT = 4


def dropout_masks(graph: Graph, seed: int, step: int, batch: int) -> dict[str, np.ndarray]:
    """float32 masks of every dropout node with a non-zero rate, for a batch of ``batch``."""
    masks = {}
    for node in graph:
        if node.op != "dropout" or node.attrs["rate"] == 0:
            continue
        rate = node.attrs["rate"]
        shape = (batch, 1, 1, node.shape[-1]) if node.attrs["spatial"] else (batch,
                                                                             *node.shape)
        rng = np.random.default_rng([seed, DROPOUT, step, zlib.crc32(node.name.encode())])
        keep = rng.random(shape) >= rate
        masks[node.name] = (keep / (1 - rate)).astype(np.float32)
    return masks
