"""Which Keras layer each IR op becomes (no keras import here: `build` uses it too)."""

from __future__ import annotations

from typing import Any

from specforge.ir.graph import Node
from specforge.ir.randomness import node_key


def dropout_seed(seed: int, node: str) -> int:
    """The seed of dropout node ``node``'s own Keras SeedGenerator: from specforge's key of
    the node (:func:`specforge.ir.randomness.node_key` at step 0), so that its masks depend
    on neither global random state (`keras.utils.set_random_seed`, which a library must not
    call) nor the order in which the layers were made."""
    return node_key(seed, 0, node) % (2**31 - 1) + 1


def layer_recipe(node: Node, seed: int) -> tuple[str, list[Any], dict[str, Any]]:
    """How to make a node's layer: (class, positional args, keyword args). Both the model
    builder here and the script builder use this, so the two cannot drift apart. ``seed``:
    the spec's (dropout layers get their own seeds from it)."""
    a, op = node.attrs, node.op
    if op == "conv2d":
        keys = ("filters", "kernel", "strides", "dilation", "groups", "pads", "pad_mode", "bias")
        return "Conv2D", [], {k: a[k] for k in keys}
    if op == "dense":
        return "keras.layers.Dense", [a["units"]], {"use_bias": a["bias"]}
    if op in ("max_pool2d", "avg_pool2d"):
        cls = "MaxPool2D" if op == "max_pool2d" else "AvgPool2D"
        return cls, [], {"pool": a["pool"], "strides": a["strides"], "pads": a["pads"]}
    if op == "pad2d":
        return "Pad2D", [a["pads"], a["mode"]], {}
    if op in ("global_avg_pool2d", "global_max_pool2d"):
        return "GlobalPool", ["avg" if op == "global_avg_pool2d" else "max"], {}
    if op == "flatten":  # NHWC: already height, width, channel order
        return "keras.layers.Flatten", [], {}
    if op == "batch_norm":
        return "BatchNorm", [], {k: a[k] for k in ("decay", "epsilon", "scale", "center")}
    if op == "dropout":
        cls = "keras.layers.SpatialDropout2D" if a["spatial"] else "keras.layers.Dropout"
        return cls, [a["rate"]], {"seed": dropout_seed(seed, node.name)}
    if op == "activation":
        return "Activation", [a["fn"]], {k: v for k, v in a.items() if k != "fn"}
    if op == "add":
        return "keras.layers.Add", [], {}
    if op == "concat":
        return "keras.layers.Concatenate", [], {"axis": -1}
    raise ValueError(f"the keras backend has no lowering for op {op!r}")
