"""Which torch module each IR op becomes (no torch import here: `build` uses it too).

A recipe is (class, positional args, keyword args); the model builder instantiates it and
the script builder writes it out, so the two cannot drift apart. Where one of torch's own
modules calls the very kernel specforge's layer would (a convolution padded the same on
both sides with zeros, an unpadded max pool, most activations), the recipe is torch's
module: the same numbers, and a built script that needs no layer of its own for it.
"""

from __future__ import annotations

from typing import Any

from specforge.ir.graph import Node
from specforge.ir.ops import dropout_options, pad_value, pool_options


def module_recipe(node: Node, in_shape: tuple[int, ...]) -> tuple[str, list[Any], dict[str, Any]]:
    a, op = node.attrs, node.op
    if op == "conv2d":
        top, bottom, left, right = a["pads"]
        if a["pad_mode"] == "zeros" and top == bottom and left == right:
            return "nn.Conv2d", [in_shape[-1], a["filters"], a["kernel"]], _torch_conv(a)
        keys = ("kernel", "strides", "dilation", "groups", "pads", "pad_mode", "bias")
        return "Conv2d", [in_shape[-1], a["filters"]], {**{k: a[k] for k in keys},
                                                         **pad_value(a)}
    if op == "dense":
        return "nn.Linear", [in_shape[-1], a["units"]], {"bias": a["bias"]}
    if op in ("max_pool2d", "avg_pool2d"):
        options = pool_options(a, in_shape)
        if op == "max_pool2d" and not any(a["pads"]) and \
                set(options) <= {"pool", "strides", "pads", "dilation"}:
            return "nn.MaxPool2d", [a["pool"]], {"stride": a["strides"], **(
                {"dilation": a["dilation"]} if "dilation" in options else {})}
        return "MaxPool2d" if op == "max_pool2d" else "AvgPool2d", [], options
    if op == "pad2d":
        return "Pad2d", [a["pads"], a["mode"]], pad_value(a)
    if op == "cropping2d":
        return "Cropping2d", [a["crops"]], {}
    if op == "channel_slice":
        return "ChannelSlice", [a["start"], a["stop"]], {}
    if op == "channel_shuffle":  # torch's view(n, g, c // g, h, w).transpose(1, 2).view(...)
        return "nn.ChannelShuffle", [a["groups"]], {}
    if op in ("global_avg_pool2d", "global_max_pool2d"):
        return "GlobalPool", ["avg" if op == "global_avg_pool2d" else "max"], {}
    if op == "flatten":
        return "FlattenHWC", [], {}
    if op == "batch_norm":
        keys = ("decay", "epsilon", "scale", "center")
        return "BatchNorm", [in_shape[-1]], {k: a[k] for k in keys}
    if op == "layer_norm":
        return "LayerNorm", [in_shape[-1], a["epsilon"]], {}
    if op == "group_norm":
        return "GroupNorm", [in_shape[-1], a["groups"], a["epsilon"]], {}
    if op == "prelu":  # torch's: one slope per channel (dim 1) of an NCHW image or a vector
        return "nn.PReLU", [in_shape[-1]], {"init": a["alpha_init"]}
    if op == "dropout":
        return "Dropout", [a["rate"], a["spatial"], tuple(node.shape), node.name], \
            dropout_options(a)
    if op == "activation":
        return _activation(a)
    if op == "rescaling":
        return "Rescaling", [a["scale"], a["offset"], len(in_shape) == 3], {}
    if op in ("add", "multiply", "concat"):
        return op.capitalize(), [], {}
    raise ValueError(f"the torch backend has no lowering for op {op!r}")



def _torch_conv(a: Any) -> dict[str, Any]:
    """nn.Conv2d's keyword arguments for a convolution padded alike on opposite sides."""
    top, _, left, _ = a["pads"]
    options: dict[str, Any] = {"stride": a["strides"], "padding": (top, left)}
    if tuple(a["dilation"]) != (1, 1):
        options["dilation"] = a["dilation"]
    if a["groups"] != 1:
        options["groups"] = a["groups"]
    if not a["bias"]:
        options["bias"] = False
    return options


#: Activations torch's own module computes with the kernel specforge's Activation layer
#: calls: name -> (module, the IR attributes it takes, positionally), and fixed arguments.
TORCH_ACTIVATIONS: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "relu": ("nn.ReLU", (), {}), "relu6": ("nn.ReLU6", (), {}), "selu": ("nn.SELU", (), {}),
    "silu": ("nn.SiLU", (), {}), "sigmoid": ("nn.Sigmoid", (), {}),
    "hard_swish": ("nn.Hardswish", (), {}), "tanh": ("nn.Tanh", (), {}),
    "softsign": ("nn.Softsign", (), {}), "softplus": ("nn.Softplus", (), {}),
    "gelu": ("nn.GELU", (), {}), "gelu_tanh": ("nn.GELU", (), {"approximate": "tanh"}),
    "softmax": ("nn.Softmax", (), {"dim": 1}), "linear": ("nn.Identity", (), {}),
    "leaky_relu": ("nn.LeakyReLU", ("negative_slope",), {}), "elu": ("nn.ELU", ("alpha",), {}),
}


def _activation(a: Any) -> tuple[str, list[Any], dict[str, Any]]:
    """torch's module for the activation, or specforge's Activation where torch has none
    (hard_sigmoid with other than torch's alpha 1/6 and beta 0.5)."""
    fn = a["fn"]
    if fn == "hard_sigmoid" and (a.get("alpha", 1 / 6), a.get("beta", 0.5)) == (1 / 6, 0.5):
        return "nn.Hardsigmoid", [], {}
    if fn in TORCH_ACTIVATIONS:
        cls, taken, fixed = TORCH_ACTIVATIONS[fn]
        return cls, [a[k] for k in taken], fixed
    return "Activation", [fn], {k: v for k, v in a.items() if k != "fn"}
