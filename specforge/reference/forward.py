"""Forward pass of an IR graph in numpy float64, one function per op."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from math import erf, sqrt
from typing import Any

import numpy as np

from specforge.ir.graph import Graph, Node
from specforge.ir.ops import pool_extension

Array = np.ndarray


def pad(x: Array, pads: tuple[int, int, int, int], mode: str = "zeros",
        value: float = 0.0) -> Array:
    """(N, H, W, C) padded (top, bottom, left, right): zeros or constant (``value``), reflect
    (edge not repeated) or replicate (edge repeated)."""
    top, bottom, left, right = pads
    widths = ((0, 0), (top, bottom), (left, right), (0, 0))
    if mode in ("zeros", "constant"):
        return np.pad(x, widths, mode="constant", constant_values=value)
    return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")


def crop(x: Array, crops: tuple[int, int, int, int]) -> Array:
    """(N, H, W, C) with (top, bottom, left, right) pixels cut off its sides."""
    top, bottom, left, right = crops
    _, h, w, _ = x.shape
    return x[:, top:h - bottom, left:w - right, :]


def shuffle_channels(x: Array, groups: int) -> Array:
    """(..., C) with channel ``i * groups + j`` taken from ``j * (C / groups) + i``."""
    c = x.shape[-1]
    return x.reshape(*x.shape[:-1], groups, c // groups).swapaxes(-1, -2).reshape(x.shape)


def windows(x: Array, kernel: tuple[int, int], strides: tuple[int, int],
            dilation: tuple[int, int] = (1, 1)) -> Array:
    """(N, OH, OW, kh, kw, C): every window of an already padded input."""
    _, h, w, _ = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    oh = (h - (kh - 1) * dh - 1) // sh + 1
    ow = (w - (kw - 1) * dw - 1) // sw + 1
    rows = (np.arange(oh) * sh)[:, None] + np.arange(kh) * dh     # (OH, kh)
    cols = (np.arange(ow) * sw)[:, None] + np.arange(kw) * dw     # (OW, kw)
    return x[:, rows[:, None, :, None], cols[None, :, None, :], :]


def conv2d(node: Node, xs: list[Array], w: Mapping[str, Array], training: bool) -> Array:
    a = node.attrs
    x = pad(xs[0], a["pads"], a["pad_mode"], a.get("pad_value", 0.0))
    patches = windows(x, a["kernel"], a["strides"], a["dilation"])  # (N, OH, OW, kh, kw, C)
    kernel = w["kernel"]                                             # (kh, kw, C/g, F)
    groups, c = a["groups"], x.shape[-1]
    cg, fg = c // groups, a["filters"] // groups
    outs = [np.tensordot(patches[..., g * cg:(g + 1) * cg], kernel[..., g * fg:(g + 1) * fg],
                         axes=([3, 4, 5], [0, 1, 2])) for g in range(groups)]
    y = np.concatenate(outs, axis=-1)
    return y + w["bias"] if a["bias"] else y


def pool_pads(a: Mapping[str, Any], x: Array) -> tuple[int, int, int, int]:
    """A pool's pads with the cells its ceil_mode adds at the bottom and right."""
    bottom, right = pool_extension(a, x.shape[1:3])
    top, below, left, beside = a["pads"]
    return top, below + bottom, left, beside + right


def pool_padded(x: Array, a: Mapping[str, Any], pad_value: float, beyond: float) -> Array:
    """``x`` padded for a pool: its pads hold ``pad_value``, the ceil_mode cells ``beyond``."""
    bottom, right = pool_extension(a, x.shape[1:3])
    return pad(pad(x, a["pads"], value=pad_value), (0, bottom, 0, right), value=beyond)


def pool_windows(x: Array, a: Mapping[str, Any]) -> Array:
    """(N, OH, OW, ph, pw, C): every window of a pool's padded input."""
    return windows(x, a["pool"], a["strides"], a["dilation"])


def max_pool2d(node: Node, xs: list[Array], w: Mapping[str, Array], training: bool) -> Array:
    a = node.attrs
    x = pool_padded(xs[0], a, a.get("pad_value", -np.inf), -np.inf)
    return pool_windows(x, a).max(axis=(3, 4))


def pool_counts(a: Mapping[str, Any], x: Array) -> Array:
    """(1, OH, OW, 1): how many cells each window of an average pool divides by."""
    counted = pool_padded(np.ones((1, *x.shape[1:3], 1)), a,
                          1.0 if a["count_include_pad"] else 0.0, 0.0)
    return pool_windows(counted, a).sum(axis=(3, 4))


def avg_pool2d(node: Node, xs: list[Array], w: Mapping[str, Array], training: bool) -> Array:
    a = node.attrs
    summed = pool_windows(pool_padded(xs[0], a, a.get("pad_value", 0.0), 0.0), a)
    return summed.sum(axis=(3, 4)) / pool_counts(a, xs[0])


def batch_statistics(x: Array, w: Mapping[str, Array], training: bool
                     ) -> tuple[Array, Array, tuple[int, ...]]:
    """Batch norm's mean and (biased) variance: the batch's in training, the running ones
    in evaluation; and the axes they reduce."""
    axes = tuple(range(x.ndim - 1))
    if training:
        return x.mean(axis=axes), x.var(axis=axes), axes
    return w["moving_mean"], w["moving_var"], axes


def batch_norm(node: Node, xs: list[Array], w: Mapping[str, Array], training: bool) -> Array:
    a = node.attrs
    mean, var, _ = batch_statistics(xs[0], w, training)
    y = (xs[0] - mean) / np.sqrt(var + a["epsilon"])
    if a["scale"]:
        y = y * w["gamma"]
    return y + w["beta"] if a["center"] else y


def layer_statistics(x: Array, epsilon: float) -> tuple[Array, Array]:
    """Layer norm's normalised input and 1 / sqrt(variance + epsilon), each sample's (each
    pixel's) mean and biased variance taken over the channel axis."""
    inv_std = 1 / np.sqrt(x.var(axis=-1, keepdims=True) + epsilon)
    return (x - x.mean(axis=-1, keepdims=True)) * inv_std, inv_std


def layer_norm(node: Node, xs: list[Array], w: Mapping[str, Array], training: bool) -> Array:
    x_hat, _ = layer_statistics(xs[0], node.attrs["epsilon"])
    return x_hat * w["gamma"] + w["beta"]


def group_statistics(x: Array, groups: int, epsilon: float) -> tuple[Array, Array]:
    """Group norm's normalised input and 1 / sqrt(variance + epsilon), each shaped
    (N, pixels, groups, C / groups): each group's mean and biased variance taken over its
    channels and pixels."""
    grouped = x.reshape(len(x), -1, groups, x.shape[-1] // groups)
    inv_std = 1 / np.sqrt(grouped.var(axis=(1, 3), keepdims=True) + epsilon)
    return (grouped - grouped.mean(axis=(1, 3), keepdims=True)) * inv_std, inv_std


def group_norm(node: Node, xs: list[Array], w: Mapping[str, Array], training: bool) -> Array:
    x_hat, _ = group_statistics(xs[0], node.attrs["groups"], node.attrs["epsilon"])
    return x_hat.reshape(xs[0].shape) * w["gamma"] + w["beta"]


def prelu(node: Node, xs: list[Array], w: Mapping[str, Array], training: bool) -> Array:
    return np.where(xs[0] > 0, xs[0], w["alpha"] * xs[0])


erf_elementwise = np.vectorize(erf)


def _softmax(x: Array) -> Array:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


ACTIVATIONS: dict[str, Callable[[Array, Mapping[str, Any]], Array]] = {
    "linear": lambda x, a: x,
    "relu": lambda x, a: np.maximum(x, 0),
    "relu6": lambda x, a: np.clip(x, 0, 6),
    "leaky_relu": lambda x, a: np.where(x >= 0, x, a["negative_slope"] * x),
    "elu": lambda x, a: np.where(x > 0, x, a["alpha"] * np.expm1(np.minimum(x, 0))),
    "selu": lambda x, a: 1.0507009873554805 * np.where(
        x > 0, x, 1.6732632423543772 * np.expm1(np.minimum(x, 0))),
    "gelu": lambda x, a: x * (1 + erf_elementwise(x / sqrt(2))) / 2,
    "gelu_tanh": lambda x, a: x * (1 + np.tanh(sqrt(2 / np.pi) * (x + 0.044715 * x**3))) / 2,
    "silu": lambda x, a: x / (1 + np.exp(-x)),
    "sigmoid": lambda x, a: 1 / (1 + np.exp(-x)),
    "hard_sigmoid": lambda x, a: np.clip(a["alpha"] * x + a["beta"], 0, 1),
    "hard_swish": lambda x, a: x * np.clip(x + 3, 0, 6) / 6,
    "tanh": lambda x, a: np.tanh(x),
    "softplus": lambda x, a: np.logaddexp(0, x),
    "softsign": lambda x, a: x / (1 + np.abs(x)),
    "softmax": lambda x, a: _softmax(x),
}


def as_image(x: Array, ndim: int) -> Array:
    """A batch of channel gates (N, C) as (N, 1, 1, C), broadcasting over an image batch of
    ``ndim`` axes; anything else unchanged."""
    return x[:, None, None, :] if x.ndim < ndim else x


def multiply(node: Node, xs: list[Array], w: Mapping[str, Array], training: bool) -> Array:
    ndim = max(x.ndim for x in xs)
    return as_image(xs[0], ndim) * as_image(xs[1], ndim)


OPS: dict[str, Callable[[Node, list[Array], Mapping[str, Array], bool], Array]] = {
    "conv2d": conv2d,
    "max_pool2d": max_pool2d,
    "avg_pool2d": avg_pool2d,
    "batch_norm": batch_norm,
    "layer_norm": layer_norm,
    "prelu": prelu,
    "group_norm": group_norm,
    "pad2d": lambda n, xs, w, t: pad(xs[0], n.attrs["pads"], n.attrs["mode"],
                                     n.attrs.get("pad_value", 0.0)),
    "cropping2d": lambda n, xs, w, t: crop(xs[0], n.attrs["crops"]),
    "channel_slice": lambda n, xs, w, t: xs[0][..., n.attrs["start"]:n.attrs["stop"]],
    "channel_shuffle": lambda n, xs, w, t: shuffle_channels(xs[0], n.attrs["groups"]),
    "global_avg_pool2d": lambda n, xs, w, t: xs[0].mean(axis=(1, 2)),
    "global_max_pool2d": lambda n, xs, w, t: xs[0].max(axis=(1, 2)),
    "flatten": lambda n, xs, w, t: xs[0].reshape(len(xs[0]), -1),  # NHWC: H, W, C order
    "dense": lambda n, xs, w, t: xs[0] @ w["kernel"] + (w["bias"] if n.attrs["bias"] else 0),
    # Training with a mask (scaled: 0 or 1 / (1 - rate)) multiplies by it; otherwise identity.
    "dropout": lambda n, xs, w, t: xs[0] * w["mask"] if t and "mask" in w else xs[0],
    "activation": lambda n, xs, w, t: ACTIVATIONS[n.attrs["fn"]](xs[0], n.attrs),
    "rescaling": lambda n, xs, w, t: (xs[0] * np.asarray(n.attrs["scale"])
                                      + np.asarray(n.attrs["offset"])),
    "add": lambda n, xs, w, t: sum(xs[1:], xs[0]),
    "multiply": multiply,
    "concat": lambda n, xs, w, t: np.concatenate(xs, axis=-1),
}


def reference_forward(graph: Graph, weights: Mapping[str, Array], x: Array,
                      training: bool = False, masks: Mapping[str, Array] | None = None
                      ) -> dict[str, Array]:
    """Every node's output for NHWC input ``x``, in float64. With ``training``, batch norm
    uses the batch's statistics and each dropout node multiplies by its mask in ``masks``
    (:mod:`specforge.conformance.masks`); a dropout without a mask is the identity."""
    masks = masks or {}
    values: dict[str, Array] = {graph.input.name: np.asarray(x, np.float64)}
    for node in graph:
        if node.op == "input":
            continue
        own = {p.name: np.asarray(weights[f"{node.name}.{p.name}"], np.float64)
               for p in node.params}
        if node.name in masks:
            own["mask"] = np.asarray(masks[node.name], np.float64)
        values[node.name] = OPS[node.op](node, [values[i] for i in node.inputs], own,
                                         training)
    return values
