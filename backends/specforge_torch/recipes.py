"""Which torch module each IR op becomes (no torch import here: `build` uses it too).

A recipe is (class, positional args, keyword args); the model builder instantiates it and
the script builder writes it out, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from specforge.ir.graph import Node
from specforge.ir.ops import pad_value, pool_options


def module_recipe(node: Node, in_shape: tuple[int, ...]) -> tuple[str, list[Any], dict[str, Any]]:
    a, op = node.attrs, node.op
    if op == "conv2d":
        keys = ("kernel", "strides", "dilation", "groups", "pads", "pad_mode", "bias")
        return "Conv2d", [in_shape[-1], a["filters"]], {**{k: a[k] for k in keys},
                                                         **pad_value(a)}
    if op == "dense":
        return "nn.Linear", [in_shape[-1], a["units"]], {"bias": a["bias"]}
    if op in ("max_pool2d", "avg_pool2d"):
        cls = "MaxPool2d" if op == "max_pool2d" else "AvgPool2d"
        return cls, [], pool_options(a, in_shape)
    if op == "pad2d":
        return "Pad2d", [a["pads"], a["mode"]], pad_value(a)
    if op in ("global_avg_pool2d", "global_max_pool2d"):
        return "GlobalPool", ["avg" if op == "global_avg_pool2d" else "max"], {}
    if op == "flatten":
        return "FlattenHWC", [], {}
    if op == "batch_norm":
        keys = ("decay", "epsilon", "scale", "center")
        return "BatchNorm", [in_shape[-1]], {k: a[k] for k in keys}
    if op == "dropout":
        return "Dropout", [a["rate"], a["spatial"], tuple(node.shape), node.name], {}
    if op == "activation":
        return "Activation", [a["fn"]], {k: v for k, v in a.items() if k != "fn"}
    if op in ("add", "concat"):
        return op.capitalize(), [], {}
    raise ValueError(f"the torch backend has no lowering for op {op!r}")

