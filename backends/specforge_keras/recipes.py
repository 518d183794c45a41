"""Which Keras layer each IR op becomes (no keras import here: `build` uses it too).

Where one of Keras's own layers calls the very op specforge's layer would (an unpadded
convolution or max pool, most activations), the recipe is Keras's layer: the same numbers,
and a built script that needs no layer of its own for it.
"""

from __future__ import annotations

from typing import Any

from specforge.ir.graph import Node
from specforge.ir.ops import dropout_options, pad_value, pool_options

#: Ops whose Keras layer is called on the list of its inputs.
MERGE_OPS = ("add", "multiply", "concat")


def layer_recipe(node: Node, in_shape: tuple[int, ...]) -> tuple[str, list[Any], dict[str, Any]]:
    """How to make a node's layer (whose first input has ``in_shape``): (class, positional
    args, keyword args). Both the model builder here and the script builder use this, so the
    two cannot drift apart."""
    a, op = node.attrs, node.op
    if op == "conv2d" and not any(a["pads"]) and \
            (max(a["strides"]) == 1 or max(a["dilation"]) == 1):
        return "keras.layers.Conv2D", [a["filters"], a["kernel"]], _keras_conv(a)
    if op == "conv2d":
        keys = ("filters", "kernel", "strides", "dilation", "groups", "pads", "pad_mode", "bias")
        return "Conv2D", [], {**{k: a[k] for k in keys}, **pad_value(a)}
    if op == "dense":
        return "keras.layers.Dense", [a["units"]], {"use_bias": a["bias"]}
    if op in ("max_pool2d", "avg_pool2d"):
        options = pool_options(a, in_shape)
        if op == "max_pool2d" and not any(a["pads"]) and set(options) <= {"pool", "strides",
                                                                         "pads"}:
            return "keras.layers.MaxPooling2D", [a["pool"]], {"strides": a["strides"]}
        return "MaxPool2D" if op == "max_pool2d" else "AvgPool2D", [], options
    if op == "pad2d":
        return "Pad2D", [a["pads"], a["mode"]], pad_value(a)
    if op == "cropping2d":  # Keras's Cropping2D slices the same pixels away
        top, bottom, left, right = a["crops"]
        return "keras.layers.Cropping2D", [], {"cropping": ((top, bottom), (left, right))}
    if op == "channel_slice":
        return "ChannelSlice", [a["start"], a["stop"]], {}
    if op == "channel_shuffle":
        return "ChannelShuffle", [a["groups"]], {}
    if op in ("global_avg_pool2d", "global_max_pool2d"):
        return "GlobalPool", ["avg" if op == "global_avg_pool2d" else "max"], {}
    if op == "flatten":  # NHWC: already height, width, channel order
        return "keras.layers.Flatten", [], {}
    if op == "batch_norm":
        return "BatchNorm", [], {k: a[k] for k in ("decay", "epsilon", "scale", "center")}
    if op == "layer_norm":  # Keras's computes the IR's formula (rounding aside)
        return "keras.layers.LayerNormalization", [], {"axis": -1, "epsilon": a["epsilon"]}
    if op == "group_norm":  # Keras's computes the IR's formula (rounding aside)
        return "keras.layers.GroupNormalization", [], {
            "groups": a["groups"], "axis": -1, "epsilon": a["epsilon"]}
    if op == "prelu":  # Keras's PReLU keeps an image's slopes as (1, 1, C): PReLU keeps (C,)
        return "PReLU", [], {}
    if op == "dropout":  # specforge's masks (layers.Dropout), the same in every backend
        return "Dropout", [a["rate"], a["spatial"], node.name], dropout_options(a)
    if op == "activation":
        return _activation(a)
    if op == "rescaling":  # Keras's Rescaling computes x * scale + offset, in this order
        return "keras.layers.Rescaling", [], {k: _plain(a[k]) for k in ("scale", "offset")}
    if op == "add":
        return "keras.layers.Add", [], {}
    if op == "multiply":  # a (N, C) gate: Keras's merge layers expand it to (N, 1, 1, C)
        return "keras.layers.Multiply", [], {}
    if op == "concat":
        return "keras.layers.Concatenate", [], {"axis": -1}
    raise ValueError(f"the keras backend has no lowering for op {op!r}")


def _plain(value: float | tuple[float, ...]) -> float | list[float]:
    """A number, or a per-channel tuple as the list Keras's layer configs hold."""
    return list(value) if isinstance(value, tuple) else value


def _keras_conv(a: Any) -> dict[str, Any]:
    """keras.layers.Conv2D's keyword arguments for an unpadded convolution."""
    options: dict[str, Any] = {"strides": a["strides"]}
    if tuple(a["dilation"]) != (1, 1):
        options["dilation_rate"] = a["dilation"]
    if a["groups"] != 1:
        options["groups"] = a["groups"]
    if not a["bias"]:
        options["use_bias"] = False
    return options


#: Activations that Keras's layers compute with the keras.ops function specforge's
#: Activation layer calls: name -> (layer, its positional arguments: IR attribute names,
#: or for keras.layers.Activation Keras's name of the function).
KERAS_ACTIVATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{fn: ("keras.layers.Activation", (fn,)) for fn in (
        "relu", "relu6", "selu", "silu", "sigmoid", "tanh", "softplus", "softsign", "gelu",
        "hard_sigmoid", "linear")},
    "hard_swish": ("keras.layers.Activation", ("hard_silu",)),
    "leaky_relu": ("keras.layers.LeakyReLU", ("negative_slope",)),
    "elu": ("keras.layers.ELU", ("alpha",)),
}


def _activation(a: Any) -> tuple[str, list[Any], dict[str, Any]]:
    """Keras's layer for the activation, or specforge's Activation where Keras's would
    differ (softmax's marks its output for the losses; gelu_tanh and a hard_sigmoid with
    its own alpha and beta have none)."""
    fn = a["fn"]
    custom = fn == "hard_sigmoid" and (a["alpha"], a["beta"]) != (1 / 6, 0.5)
    if fn not in KERAS_ACTIVATIONS or custom:
        return "Activation", [fn], {k: v for k, v in a.items() if k != "fn"}
    cls, taken = KERAS_ACTIVATIONS[fn]
    if cls == "keras.layers.Activation":
        return cls, list(taken), {}
    return cls, [a[k] for k in taken], {}
