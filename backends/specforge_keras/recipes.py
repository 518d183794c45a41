"""Which Keras layer each IR op becomes (no keras import here: `build` uses it too)."""

from __future__ import annotations

from typing import Any

from specforge.ir.graph import Node
from specforge.ir.ops import pad_value, pool_options


def layer_recipe(node: Node, in_shape: tuple[int, ...]) -> tuple[str, list[Any], dict[str, Any]]:
    """How to make a node's layer (whose first input has ``in_shape``): (class, positional
    args, keyword args). Both the model builder here and the script builder use this, so the
    two cannot drift apart."""
    a, op = node.attrs, node.op
    if op == "conv2d":
        keys = ("filters", "kernel", "strides", "dilation", "groups", "pads", "pad_mode", "bias")
        return "Conv2D", [], {**{k: a[k] for k in keys}, **pad_value(a)}
    if op == "dense":
        return "keras.layers.Dense", [a["units"]], {"use_bias": a["bias"]}
    if op in ("max_pool2d", "avg_pool2d"):
        cls = "MaxPool2D" if op == "max_pool2d" else "AvgPool2D"
        return cls, [], pool_options(a, in_shape)
    if op == "pad2d":
        return "Pad2D", [a["pads"], a["mode"]], pad_value(a)
    if op in ("global_avg_pool2d", "global_max_pool2d"):
        return "GlobalPool", ["avg" if op == "global_avg_pool2d" else "max"], {}
    if op == "flatten":  # NHWC: already height, width, channel order
        return "keras.layers.Flatten", [], {}
    if op == "batch_norm":
        return "BatchNorm", [], {k: a[k] for k in ("decay", "epsilon", "scale", "center")}
    if op == "dropout":  # specforge's masks (layers.Dropout), the same in every backend
        return "Dropout", [a["rate"], a["spatial"], node.name], {}
    if op == "activation":
        return "Activation", [a["fn"]], {k: v for k, v in a.items() if k != "fn"}
    if op == "add":
        return "keras.layers.Add", [], {}
    if op == "concat":
        return "keras.layers.Concatenate", [], {"axis": -1}
    raise ValueError(f"the keras backend has no lowering for op {op!r}")
