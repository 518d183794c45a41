"""Names shared by the model builder and the script builder (no torch import here)."""

from __future__ import annotations

import re

from specforge.ir.graph import Graph

#: Neutral parameter name -> the attribute of the torch module that holds it.
TORCH_PARAM_NAMES = {"kernel": "weight", "bias": "bias", "gamma": "gamma", "beta": "beta",
                     "moving_mean": "moving_mean", "moving_var": "moving_var"}


def attribute_names(graph: Graph) -> dict[str, str]:
    """A valid, unique Python/torch attribute name for every node (`layer1.0.conv1` ->
    `layer1_0_conv1`)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for node in graph:
        base = re.sub(r"\W", "_", node.name)
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        names[node.name] = name
    return names
