"""Dropout masks that belong to specforge, so that every backend drops the same units.

The mask of dropout node ``node`` at training step ``step`` comes from specforge's counter
-based generator (:mod:`specforge.ir.randomness`, docs/ir-ops.md), keyed by
``node_key(seed, step, node)``: the same bits the torch and Keras backends compute on their
devices. A mask is laid out like the node's output in the IR, (N, H, W, C) or
(N, features), so a mask after a flatten is in (height, width, channel) order on every
backend: the torch backend flattens in that order too. Spatial dropout draws one value per
(sample, channel): shape (N, 1, 1, C); per-sample dropout one per sample: (N, 1, 1, 1) or
(N, 1). Kept units are scaled by 1 / (1 - rate).
"""

from __future__ import annotations

import numpy as np

from specforge.ir.graph import Graph
from specforge.ir.randomness import dropout_mask, node_key


def dropout_masks(graph: Graph, seed: int, step: int, batch: int) -> dict[str, np.ndarray]:
    """float32 masks of every dropout node with a non-zero rate, for a batch of ``batch``
    (samples 0 to batch - 1 of the step)."""
    masks = {}
    for node in graph:
        if node.op != "dropout" or node.attrs["rate"] == 0:
            continue
        masks[node.name] = dropout_mask((batch, *node.shape), node.attrs["rate"],
                                        node_key(seed, step, node.name),
                                        spatial=node.attrs["spatial"],
                                        per_sample=node.attrs["per_sample"])
    return masks
