"""Backward pass of an IR graph in numpy float64: one vector-Jacobian product per op.

Each function takes the node, its inputs ``xs``, its output ``y``, the gradient ``gy`` of
the loss with respect to ``y``, the node's own parameters ``w`` (and a dropout node's
``mask``) and the mode, and returns the gradients of the inputs and of the parameters. They
mirror :mod:`specforge.reference.forward` name for name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from math import pi, sqrt

import numpy as np

from specforge.ir.graph import Graph, Node
from specforge.reference.forward import (
    ACTIVATIONS,
    as_image,
    batch_statistics,
    erf_elementwise,
    group_statistics,
    layer_statistics,
    pad,
    pool_counts,
    pool_padded,
    pool_pads,
    pool_windows,
    shuffle_channels,
    windows,
)

Array = np.ndarray
Grads = tuple[list[Array], dict[str, Array]]


# --- padding and windows: their adjoints scatter back what the forward gathered ------------

def unpad(g: Array, shape: tuple[int, ...], pads: tuple[int, int, int, int],
          mode: str = "zeros") -> Array:
    """Adjoint of :func:`~specforge.reference.forward.pad`: the gradient of the unpadded
    input of ``shape`` from the gradient ``g`` of the padded one."""
    top, bottom, left, right = pads
    for axis, (before, after) in ((1, (top, bottom)), (2, (left, right))):
        n = shape[axis]
        if mode in ("zeros", "constant"):  # padded cells are constants: no gradient
            g = np.take(g, np.arange(before, before + n), axis=axis)
            continue
        # np.pad of the positions says which input cell each padded cell copies
        source = np.pad(np.arange(n), (before, after),
                        mode="reflect" if mode == "reflect" else "edge")
        out = np.zeros((*g.shape[:axis], n, *g.shape[axis + 1:]))
        index = (slice(None),) * axis + (source,)
        np.add.at(out, index, g)
        g = out
    return g


def channel_slice_grad(g: Array, shape: tuple[int, ...], node: Node) -> Array:
    """A channel slice's adjoint: ``g`` in the taken channels, zeros in the others."""
    out = np.zeros(shape, g.dtype)
    out[..., node.attrs["start"]:node.attrs["stop"]] = g
    return out


def unwindow(g: Array, padded_shape: tuple[int, ...], kernel: tuple[int, int],
             strides: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> Array:
    """Adjoint of :func:`~specforge.reference.forward.windows`: sums each window cell's
    gradient (N, OH, OW, kh, kw, C) back into the padded input."""
    out = np.zeros(padded_shape)
    _, oh, ow = g.shape[:3]
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    for i in range(kh):
        for j in range(kw):
            out[:, i * dh:i * dh + (oh - 1) * sh + 1:sh,
                j * dw:j * dw + (ow - 1) * sw + 1:sw] += g[:, :, :, i, j]
    return out


# --- ops ------------------------------------------------------------------------------------

def conv2d(node: Node, xs: list[Array], y: Array, gy: Array, w: Mapping[str, Array],
           training: bool) -> Grads:
    a = node.attrs
    x = pad(xs[0], a["pads"], a["pad_mode"], a.get("pad_value", 0.0))
    patches = windows(x, a["kernel"], a["strides"], a["dilation"])  # (N, OH, OW, kh, kw, C)
    kernel = w["kernel"]
    groups, c = a["groups"], x.shape[-1]
    cg, fg = c // groups, a["filters"] // groups
    g_kernel = np.zeros_like(kernel)
    g_patches = np.zeros_like(patches)
    for g in range(groups):
        cs, fs = slice(g * cg, (g + 1) * cg), slice(g * fg, (g + 1) * fg)
        g_kernel[..., fs] = np.tensordot(patches[..., cs], gy[..., fs],
                                         axes=([0, 1, 2], [0, 1, 2]))
        g_patches[..., cs] = np.tensordot(gy[..., fs], kernel[..., fs], axes=([3], [3]))
    g_x = unwindow(g_patches, x.shape, a["kernel"], a["strides"], a["dilation"])
    grads = {"kernel": g_kernel}
    if a["bias"]:
        grads["bias"] = gy.sum(axis=(0, 1, 2))
    return [unpad(g_x, xs[0].shape, a["pads"], a["pad_mode"])], grads


def max_pool2d(node: Node, xs: list[Array], y: Array, gy: Array, w: Mapping[str, Array],
               training: bool) -> Grads:
    a = node.attrs
    x = pool_padded(xs[0], a, a.get("pad_value", -np.inf), -np.inf)
    patches = pool_windows(x, a)                             # (N, OH, OW, ph, pw, C)
    n, oh, ow, ph, pw, c = patches.shape
    flat = patches.reshape(n, oh, ow, ph * pw, c)
    # the gradient goes to the first maximum of each window (ties have measure zero)
    winner = flat.argmax(axis=3)[:, :, :, None, :] == np.arange(ph * pw)[None, None, None,
                                                                         :, None]
    g_patches = (winner * gy[:, :, :, None, :]).reshape(patches.shape)
    g_x = unwindow(g_patches, x.shape, a["pool"], a["strides"], a["dilation"])
    return [unpad(g_x, xs[0].shape, pool_pads(a, xs[0]))], {}


def avg_pool2d(node: Node, xs: list[Array], y: Array, gy: Array, w: Mapping[str, Array],
               training: bool) -> Grads:
    a = node.attrs
    share = (gy / pool_counts(a, xs[0]))[:, :, :, None, None, :]
    g_patches = np.broadcast_to(share, (*gy.shape[:3], *a["pool"], gy.shape[3]))
    padded_shape = pool_padded(xs[0][:1], a, 0.0, 0.0).shape
    g_x = unwindow(g_patches, (len(gy), *padded_shape[1:]), a["pool"], a["strides"],
                   a["dilation"])
    return [unpad(g_x, xs[0].shape, pool_pads(a, xs[0]))], {}


def batch_norm(node: Node, xs: list[Array], y: Array, gy: Array, w: Mapping[str, Array],
               training: bool) -> Grads:
    a, x = node.attrs, xs[0]
    mean, var, axes = batch_statistics(x, w, training)
    inv_std = 1 / np.sqrt(var + a["epsilon"])
    x_hat = (x - mean) * inv_std
    grads: dict[str, Array] = {}
    if a["scale"]:
        grads["gamma"] = (gy * x_hat).sum(axis=axes)
    if a["center"]:
        grads["beta"] = gy.sum(axis=axes)
    g_hat = gy * w["gamma"] if a["scale"] else gy
    if not training:  # the statistics are constants
        return [g_hat * inv_std], grads
    # the batch's mean and variance depend on x too
    g_x = inv_std * (g_hat - g_hat.mean(axis=axes) - x_hat * (g_hat * x_hat).mean(axis=axes))
    return [g_x], grads


def layer_norm(node: Node, xs: list[Array], y: Array, gy: Array, w: Mapping[str, Array],
               training: bool) -> Grads:
    x_hat, inv_std = layer_statistics(xs[0], node.attrs["epsilon"])
    others = tuple(range(gy.ndim - 1))  # gamma and beta are shared by every sample and pixel
    grads = {"gamma": (gy * x_hat).sum(axis=others), "beta": gy.sum(axis=others)}
    g_hat = gy * w["gamma"]
    # each pixel's mean and variance depend on its own channels
    g_x = inv_std * (g_hat - g_hat.mean(axis=-1, keepdims=True)
                     - x_hat * (g_hat * x_hat).mean(axis=-1, keepdims=True))
    return [g_x], grads


def group_norm(node: Node, xs: list[Array], y: Array, gy: Array, w: Mapping[str, Array],
               training: bool) -> Grads:
    x_hat, inv_std = group_statistics(xs[0], node.attrs["groups"], node.attrs["epsilon"])
    others = tuple(range(gy.ndim - 1))  # gamma and beta are shared by every sample and pixel
    flat_hat = x_hat.reshape(gy.shape)
    grads = {"gamma": (gy * flat_hat).sum(axis=others), "beta": gy.sum(axis=others)}
    g_hat = (gy * w["gamma"]).reshape(x_hat.shape)
    # each group's mean and variance depend on its own channels and pixels (axes 1 and 3)
    g_x = inv_std * (g_hat - g_hat.mean(axis=(1, 3), keepdims=True)
                     - x_hat * (g_hat * x_hat).mean(axis=(1, 3), keepdims=True))
    return [g_x.reshape(gy.shape)], grads


def prelu(node: Node, xs: list[Array], y: Array, gy: Array, w: Mapping[str, Array],
          training: bool) -> Grads:
    positive = xs[0] > 0
    others = tuple(range(gy.ndim - 1))  # alpha is shared by every sample and pixel
    grads = {"alpha": np.where(positive, 0, gy * xs[0]).sum(axis=others)}
    return [np.where(positive, gy, gy * w["alpha"])], grads


def _sigmoid(x: Array) -> Array:
    return 1 / (1 + np.exp(-x))


#: d activation / dx at x, element-wise (``softmax`` is handled by :func:`activation`).
DERIVATIVES: dict[str, Callable[[Array, Mapping], Array]] = {
    "linear": lambda x, a: np.ones_like(x),
    "relu": lambda x, a: (x > 0).astype(float),
    "relu6": lambda x, a: ((x > 0) & (x < 6)).astype(float),
    "leaky_relu": lambda x, a: np.where(x >= 0, 1.0, a["negative_slope"]),
    "elu": lambda x, a: np.where(x > 0, 1.0, a["alpha"] * np.exp(np.minimum(x, 0))),
    "selu": lambda x, a: 1.0507009873554805 * np.where(
        x > 0, 1.0, 1.6732632423543772 * np.exp(np.minimum(x, 0))),
    "gelu": lambda x, a: (1 + erf_elementwise(x / sqrt(2))) / 2
    + x * np.exp(-x**2 / 2) / sqrt(2 * pi),
    "gelu_tanh": lambda x, a: _gelu_tanh_derivative(x),
    "silu": lambda x, a: _sigmoid(x) * (1 + x * (1 - _sigmoid(x))),
    "sigmoid": lambda x, a: _sigmoid(x) * (1 - _sigmoid(x)),
    "hard_sigmoid": lambda x, a: np.where(
        (a["alpha"] * x + a["beta"] > 0) & (a["alpha"] * x + a["beta"] < 1), a["alpha"], 0.0),
    "hard_swish": lambda x, a: np.where(x >= 3, 1.0, np.where(x > -3, (2 * x + 3) / 6, 0.0)),
    "tanh": lambda x, a: 1 - np.tanh(x) ** 2,
    "softplus": lambda x, a: _sigmoid(x),
    "softsign": lambda x, a: 1 / (1 + np.abs(x)) ** 2,
}


def _gelu_tanh_derivative(x: Array) -> Array:
    c = sqrt(2 / pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return (1 + t) / 2 + x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2) / 2


def activation(node: Node, xs: list[Array], y: Array, gy: Array, w: Mapping[str, Array],
               training: bool) -> Grads:
    fn, x = node.attrs["fn"], xs[0]
    if fn == "softmax":
        return [y * (gy - (gy * y).sum(axis=-1, keepdims=True))], {}
    assert fn in ACTIVATIONS, fn
    return [gy * DERIVATIVES[fn](x, node.attrs)], {}


def dense(node: Node, xs: list[Array], y: Array, gy: Array, w: Mapping[str, Array],
          training: bool) -> Grads:
    grads = {"kernel": xs[0].T @ gy}
    if node.attrs["bias"]:
        grads["bias"] = gy.sum(axis=0)
    return [gy @ w["kernel"].T], grads


def global_max_pool2d(node: Node, xs: list[Array], y: Array, gy: Array,
                      w: Mapping[str, Array], training: bool) -> Grads:
    x = xs[0]
    n, h, wd, c = x.shape
    first = x.reshape(n, h * wd, c).argmax(axis=1)                    # (N, C)
    winner = np.arange(h * wd)[None, :, None] == first[:, None, :]    # (N, H*W, C)
    return [(winner * gy[:, None, :]).reshape(x.shape)], {}


def multiply(node: Node, xs: list[Array], y: Array, gy: Array, w: Mapping[str, Array],
             training: bool) -> Grads:
    a, b = (as_image(x, gy.ndim) for x in xs)
    # A gate's gradient sums over the pixels it scaled (height and width).
    return [_reduce_to(gy * b, xs[0]), _reduce_to(gy * a, xs[1])], {}


def _reduce_to(g: Array, x: Array) -> Array:
    return g.sum(axis=(1, 2)) if x.ndim < g.ndim else g


BACKWARD: dict[str, Callable[..., Grads]] = {
    "conv2d": conv2d,
    "max_pool2d": max_pool2d,
    "avg_pool2d": avg_pool2d,
    "batch_norm": batch_norm,
    "layer_norm": layer_norm,
    "prelu": prelu,
    "group_norm": group_norm,
    "activation": activation,
    "dense": dense,
    "global_max_pool2d": global_max_pool2d,
    "pad2d": lambda n, xs, y, gy, w, t: (
        [unpad(gy, xs[0].shape, n.attrs["pads"], n.attrs["mode"])], {}),
    # the cut pixels take no part in the output: zero gradient, the kept ones pass theirs
    "cropping2d": lambda n, xs, y, gy, w, t: ([pad(gy, n.attrs["crops"])], {}),
    "channel_slice": lambda n, xs, y, gy, w, t: ([channel_slice_grad(gy, xs[0].shape, n)], {}),
    # the shuffle's inverse is the shuffle of C / groups groups
    "channel_shuffle": lambda n, xs, y, gy, w, t: (
        [shuffle_channels(gy, gy.shape[-1] // n.attrs["groups"])], {}),
    "global_avg_pool2d": lambda n, xs, y, gy, w, t: (
        [np.broadcast_to(gy[:, None, None, :] / (xs[0].shape[1] * xs[0].shape[2]),
                         xs[0].shape)], {}),
    "flatten": lambda n, xs, y, gy, w, t: ([gy.reshape(xs[0].shape)], {}),
    "dropout": lambda n, xs, y, gy, w, t: ([gy * w["mask"] if t and "mask" in w else gy], {}),
    "rescaling": lambda n, xs, y, gy, w, t: ([gy * np.asarray(n.attrs["scale"])], {}),
    "add": lambda n, xs, y, gy, w, t: ([gy] * len(xs), {}),
    "multiply": multiply,
    "concat": lambda n, xs, y, gy, w, t: (
        np.split(gy, np.cumsum([x.shape[-1] for x in xs[:-1]]), axis=-1), {}),
}


def reference_backward(graph: Graph, weights: Mapping[str, Array], values: Mapping[str, Array],
                       grad_output: Array, training: bool = False,
                       masks: Mapping[str, Array] | None = None) -> dict[str, Array]:
    """Gradients of every trainable parameter (neutral names), given the node ``values`` of
    :func:`~specforge.reference.forward.reference_forward` with the same arguments and the
    gradient of the loss with respect to the graph's output."""
    masks = masks or {}
    grads_of: dict[str, Array] = {graph.output: np.asarray(grad_output, np.float64)}
    param_grads: dict[str, Array] = {}
    for node in reversed(graph.nodes):
        if node.op == "input" or node.name not in grads_of:
            continue
        own = {p.name: np.asarray(weights[f"{node.name}.{p.name}"], np.float64)
               for p in node.params}
        if node.name in masks:
            own["mask"] = np.asarray(masks[node.name], np.float64)
        xs = [values[i] for i in node.inputs]
        g_inputs, g_params = BACKWARD[node.op](node, xs, values[node.name],
                                               grads_of[node.name], own, training)
        for name, g in zip(node.inputs, g_inputs, strict=True):
            grads_of[name] = grads_of[name] + g if name in grads_of else g
        for p in node.params:
            if p.trainable:
                param_grads[f"{node.name}.{p.name}"] = g_params[p.name]
    for node in graph:  # parameters the output does not depend on get a zero gradient
        for p in node.params:
            name = f"{node.name}.{p.name}"
            if p.trainable and name not in param_grads:
                param_grads[name] = np.zeros(p.shape)
    return param_grads
