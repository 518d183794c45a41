"""Every IR op: its meaning (docstring), shape rule, parameters and FLOP count.

This is the one place where an op's semantics are defined. Backends translate these ops and
the numpy reference implements them; neither adds meaning of its own. FLOPs count a
multiply-add as 2 and an element-wise operation as 1, per sample.

Neutral parameter layouts: conv kernel ``(kh, kw, in_channels / groups, filters)`` (a
depthwise conv is the conv with ``groups = C``: kernel ``(kh, kw, 1, C * m)``, output channel
``c * m + j`` is input channel ``c``'s ``j``-th filter), dense kernel ``(in_features,
units)``, vectors ``(channels,)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from specforge.ir.graph import Param, Shape

Attrs = Mapping[str, Any]
Pads = tuple[int, int, int, int]  # top, bottom, left, right


class ShapeError(Exception):
    """An op cannot apply to its input shapes; ``hint`` says what would work."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class OpResult:
    shape: Shape
    params: tuple[Param, ...] = ()
    flops: int = 0


@dataclass(frozen=True)
class OpDef:
    name: str
    doc: str
    infer: Callable[[Attrs, list[Shape]], OpResult]
    arity: int | None = 1  # None: two or more inputs


OPS: dict[str, OpDef] = {}


def op(name: str, arity: int | None = 1) -> Callable[[Callable[..., OpResult]], Any]:
    def register(fn: Callable[[Attrs, list[Shape]], OpResult]) -> Callable[..., OpResult]:
        OPS[name] = OpDef(name, (fn.__doc__ or "").strip(), fn, arity)
        return fn
    return register


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _image(op_name: str, shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ShapeError(f"{op_name} needs an image input (height, width, channels), "
                         f"got shape {shape}",
                         "it cannot follow flatten, dense or global pooling")
    return shape  # type: ignore[return-value]


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1,
              lower: bool = False) -> tuple[int, int]:
    """Pads (before, after) that make ``out = ceil(size / stride)``; the odd pixel goes after
    (`same`, ONNX's SAME_UPPER), or before with ``lower`` (`same_lower`, ONNX's SAME_LOWER)."""
    out = -(-size // stride)
    effective = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective - size, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if lower else (small, big)


def window_output(size: int, before: int, after: int, kernel: int, stride: int,
                  dilation: int = 1, ceil_mode: bool = False) -> int:
    """Output length of a sliding window: floor((size + pads - effective) / stride) + 1, or
    with ``ceil_mode`` ceil instead of floor, less a last window that would start in the
    right padding or beyond (ONNX's and torch's rule)."""
    effective = (kernel - 1) * dilation + 1
    span = size + before + after - effective
    if not ceil_mode or span < 0:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + before else out


def ceil_extension(size: int, before: int, after: int, kernel: int, stride: int,
                   dilation: int = 1, ceil_mode: bool = False) -> int:
    """Cells a ``ceil_mode`` pool's last window reaches past the padded input (at the end):
    they belong to no window's maximum and to no average's sum or divisor."""
    out = window_output(size, before, after, kernel, stride, dilation, ceil_mode)
    effective = (kernel - 1) * dilation + 1
    return max((out - 1) * stride + effective - (size + before + after), 0)


def pool_extension(attrs: Attrs, shape: Shape) -> tuple[int, int]:
    """(bottom, right) cells a pool's ``ceil_mode`` adds past its padded input."""
    h, w = shape[0], shape[1]
    top, bottom, left, right = attrs["pads"]
    (ph, pw), (sh, sw), (dh, dw) = attrs["pool"], attrs["strides"], attrs["dilation"]
    return (ceil_extension(h, top, bottom, ph, sh, dh, attrs["ceil_mode"]),
            ceil_extension(w, left, right, pw, sw, dw, attrs["ceil_mode"]))


def _windowed(op_name: str, shape: Shape, kernel: tuple[int, int], strides: tuple[int, int],
              dilation: tuple[int, int], pads: Pads, ceil_mode: bool = False
              ) -> tuple[int, int]:
    h, w, _ = _image(op_name, shape)
    out = []
    for axis, size, before, after, k, s, d in (("height", h, pads[0], pads[1], kernel[0],
                                               strides[0], dilation[0]),
                                              ("width", w, pads[2], pads[3], kernel[1],
                                               strides[1], dilation[1])):
        n = window_output(size, before, after, k, s, d, ceil_mode)
        if n < 1:
            effective = (k - 1) * d + 1
            raise ShapeError(
                f"{op_name} window of {effective} is larger than the padded input {axis} "
                f"{size + before + after} (input {shape}, pads {before}+{after})",
                "use padding: same, a smaller kernel/pool, or fewer downsampling layers "
                "before this one")
        out.append(n)
    return out[0], out[1]


@op("input", arity=0)
def input_op(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """The model's input, one sample of shape ``attrs.shape`` (height, width, channels)."""
    return OpResult(tuple(attrs["shape"]))


@op("conv2d")
def conv2d(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Grouped 2-D cross-correlation.

    ``y[i, j, f] = bias[f] + sum_{a, b, c} x_pad[i*sh + a*dh, j*sw + b*dw, g*Cg + c] *
    kernel[a, b, c, f]``, where group ``g = f // (filters / groups)`` and ``x_pad`` is the
    input padded by ``pads`` (top, bottom, left, right) with ``pad_mode``: zeros, constant
    (every padded cell holds ``pad_value``, an attr present only with this mode), reflect
    (mirror without repeating the edge) or replicate (repeat the edge).
    Kernel layout ``(kh, kw, in_channels / groups, filters)``; init glorot_uniform, bias zeros.
    A depthwise conv is ``groups = C`` with ``filters = C * m``: kernel ``(kh, kw, 1, C * m)``,
    output channel ``c * m + j`` is input channel ``c`` convolved with filter ``j``.
    """
    h, w, c = _image("conv2d", shapes[0])
    groups, filters = attrs["groups"], attrs["filters"]
    if c % groups or filters % groups:
        raise ShapeError(f"conv2d groups={groups} must divide input channels {c} and "
                         f"filters {filters}")
    _check_reflect_pads(attrs, h, w)
    oh, ow = _windowed("conv2d", shapes[0], attrs["kernel"], attrs["strides"],
                       attrs["dilation"], attrs["pads"])
    kh, kw = attrs["kernel"]
    params = [Param("kernel", (kh, kw, c // groups, filters), "glorot_uniform")]
    if attrs["bias"]:
        params.append(Param("bias", (filters,), "zeros"))
    macs = oh * ow * filters * kh * kw * (c // groups)
    return OpResult((oh, ow, filters), tuple(params), 2 * macs + (oh * ow * filters
                                                                  if attrs["bias"] else 0))


def _check_reflect_pads(attrs: Attrs, h: int, w: int) -> None:
    top, bottom, left, right = attrs["pads"]
    if attrs.get("pad_mode", attrs.get("mode")) == "reflect" and (
            max(top, bottom) >= h or max(left, right) >= w):
        raise ShapeError(f"reflect padding {attrs['pads']} needs pads smaller than the input "
                         f"({h}x{w})", "use zeros or replicate padding, or smaller pads")


@op("pad2d")
def pad2d(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Spatial padding by ``pads`` (top, bottom, left, right) with ``mode`` zeros, constant
    (with ``pad_value``), reflect or replicate, as conv2d's ``pad_mode``."""
    h, w, c = _image("pad2d", shapes[0])
    _check_reflect_pads(attrs, h, w)
    top, bottom, left, right = attrs["pads"]
    return OpResult((h + top + bottom, w + left + right, c))


@op("cropping2d")
def cropping2d(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Cut ``crops`` (top, bottom, left, right) pixels off the sides of an image:
    ``out[h, w, c] = x[top + h, left + w, c]``, of shape ``(H - top - bottom, W - left -
    right, C)`` (Keras's Cropping2D). At least one row and one column must remain. No
    parameters, no arithmetic."""
    h, w, c = _image("cropping2d", shapes[0])
    top, bottom, left, right = attrs["crops"]
    if top + bottom >= h or left + right >= w:
        raise ShapeError(f"cropping2d's cropping {tuple(attrs['crops'])} (top, bottom, left, "
                         f"right) leaves no pixel of the {h}x{w} input",
                         f"crop less than {h} rows (top + bottom) and {w} columns "
                         f"(left + right) in all")
    return OpResult((h - top - bottom, w - left - right, c))


@op("channel_slice")
def channel_slice(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Channels ``start`` to ``stop - 1`` (the last axis) of an image or a vector:
    ``out[..., k] = x[..., start + k]``, of ``stop - start`` channels (torch's
    ``x[:, start:stop]``; ``x.chunk(2, dim=1)`` is two of them). ``stop`` is always explicit
    and at most the input's channels; at least one channel remains. No parameters, no
    arithmetic."""
    channels = shapes[0][-1]
    start, stop = attrs["start"], attrs["stop"]
    if not start < stop <= channels:
        raise ShapeError(f"channel_slice's channels [{start}, {stop}) are not within the "
                         f"{channels} channels of its input (shape {shapes[0]})",
                         f"take channels from 0 to at most {channels}, start below stop")
    return OpResult((*shapes[0][:-1], stop - start))


@op("channel_shuffle")
def channel_shuffle(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """ShuffleNet's channel shuffle of an image (H, W, C): the C channels seen as ``groups``
    groups of ``C / groups``, interleaved: output channel ``i * groups + j`` is input channel
    ``j * (C / groups) + i``, for ``j < groups`` and ``i < C / groups``. This is torch's
    ``x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)`` (and
    ``nn.ChannelShuffle``). ``groups`` must divide C. No parameters, no arithmetic."""
    h, w, c = _image("channel_shuffle", shapes[0])
    if c % attrs["groups"]:
        raise ShapeError(f"channel_shuffle's {attrs['groups']} groups do not divide the {c} "
                         f"channels of its input", "use a number of groups that divides "
                         f"{c}")
    return OpResult((h, w, c))


@op("max_pool2d")
def max_pool2d(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Maximum over each window. Padded cells never win (they are -inf), unless the attr
    ``pad_value`` is present: then they hold that value and take part like any cell.

    Window: ``pool``, ``strides``, ``dilation`` (window cell ``(a, b)`` of output ``(i, j)``
    reads ``x_pad[i*sh + a*dh, j*sw + b*dw]``), ``pads`` (top, bottom, left, right) and
    ``ceil_mode``: the output length is ``floor((n + pads - effective) / s) + 1`` with
    ``effective = (pool - 1) * dilation + 1``; with ``ceil_mode`` ceil instead of floor,
    less a last window that would start in the right padding (ONNX's and torch's rule).
    Cells such a last window reaches past the padded input take part in nothing.
    """
    return _pool("max_pool2d", attrs, shapes)


@op("avg_pool2d")
def avg_pool2d(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Mean over each window; the window, ``pads`` and ``ceil_mode`` as in max_pool2d.
    ``count_include_pad`` false (specforge's default, as ONNX's and Keras's `same`; torch's
    default is true): padded cells are in neither the sum nor the divisor. True: they count
    in the divisor and add ``pad_value`` (an attr present only then; 0 when absent) to the
    sum. Cells past the padded input (ceil_mode) are never counted."""
    return _pool("avg_pool2d", attrs, shapes)


def _pool(op_name: str, attrs: Attrs, shapes: list[Shape]) -> OpResult:
    oh, ow = _windowed(op_name, shapes[0], attrs["pool"], attrs["strides"], attrs["dilation"],
                       attrs["pads"], attrs["ceil_mode"])
    _check_pool_pads(op_name, attrs, shapes[0])
    c = shapes[0][2]
    return OpResult((oh, ow, c), (), oh * ow * c * attrs["pool"][0] * attrs["pool"][1])


def _check_pool_pads(op_name: str, attrs: Attrs, shape: Shape) -> None:
    top, bottom, left, right = attrs["pads"]
    ph, pw = attrs["pool"]
    if max(top, bottom) >= ph or max(left, right) >= pw:
        raise ShapeError(f"{op_name} pads {attrs['pads']} must each be smaller than the pool "
                         f"{attrs['pool']}, or a window could hold only padding")
    for axis, size, before, after, k, s, d in (
            ("height", shape[0], top, bottom, ph, attrs["strides"][0], attrs["dilation"][0]),
            ("width", shape[1], left, right, pw, attrs["strides"][1], attrs["dilation"][1])):
        if d > 1 and not all(_reads_input(i * s, before, size, k, d) for i in range(
                window_output(size, before, after, k, s, d, attrs["ceil_mode"]))):
            raise ShapeError(f"{op_name}: a window of dilation {d} along the {axis} skips "
                             f"every input cell (input {size}, pads {before}+{after})",
                             "use a smaller dilation or less padding")


def _reads_input(start: int, before: int, size: int, kernel: int, dilation: int) -> bool:
    """Whether the dilated window starting at padded position ``start`` reads an input cell
    (positions ``before`` to ``before + size - 1``), not only padding."""
    first = max(-(-(before - start) // dilation), 0)  # first cell at or after the input
    return first < kernel and start + first * dilation < before + size


def pad_value(attrs: Attrs) -> dict[str, Any]:
    """``{"pad_value": v}`` where the node has one (constant padding), else ``{}``."""
    return {"pad_value": attrs["pad_value"]} if "pad_value" in attrs else {}


def dropout_options(attrs: Attrs) -> dict[str, Any]:
    """A dropout's keyword arguments for a backend's layer besides its rate and ``spatial``:
    ``{"per_sample": True}`` where it draws once per sample, else ``{}`` (so that the
    scripts of other dropouts read as before)."""
    return {"per_sample": True} if attrs["per_sample"] else {}


#: Pool options at the value that leaves them out of a backend's recipe.
POOL_DEFAULTS = {"dilation": (1, 1), "count_include_pad": False}


def pool_options(attrs: Attrs, in_shape: Shape) -> dict[str, Any]:
    """A pool's arguments for a backend's constructor: the window and pads, the options
    that differ from their defaults, and for ``ceil_mode`` the cells it adds at the bottom
    and the right (``extra``), so that a backend pads and then pools without a rule of its
    own."""
    options = {"pool": attrs["pool"], "strides": attrs["strides"], "pads": attrs["pads"]}
    options.update((k, attrs[k]) for k, default in POOL_DEFAULTS.items()
                   if attrs.get(k, default) != default)
    if attrs["ceil_mode"]:
        options["extra"] = pool_extension(attrs, in_shape)
    return {**options, **pad_value(attrs)}


@op("global_avg_pool2d")
def global_avg_pool2d(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Mean over height and width: (H, W, C) -> (C,)."""
    h, w, c = _image("global_avg_pool2d", shapes[0])
    return OpResult((c,), (), h * w * c)


@op("global_max_pool2d")
def global_max_pool2d(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Maximum over height and width: (H, W, C) -> (C,)."""
    h, w, c = _image("global_max_pool2d", shapes[0])
    return OpResult((c,), (), h * w * c)


@op("flatten")
def flatten(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """(H, W, C) -> (H*W*C,) in height, width, channel order (row-major channels-last).
    Channels-first backends permute to this order before flattening."""
    return OpResult((_numel(shapes[0]),))


@op("dense")
def dense(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """``y = x @ kernel + bias``; kernel ``(in_features, units)`` glorot_uniform, bias zeros."""
    if len(shapes[0]) != 1:
        raise ShapeError(f"dense needs a flat input, got shape {shapes[0]}",
                         "insert {type: flatten} or {type: global_avg_pool2d} before it")
    (n,), units = shapes[0], attrs["units"]
    params = [Param("kernel", (n, units), "glorot_uniform")]
    if attrs["bias"]:
        params.append(Param("bias", (units,), "zeros"))
    return OpResult((units,), tuple(params), 2 * n * units + (units if attrs["bias"] else 0))


@op("batch_norm")
def batch_norm(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Per-channel (last axis) normalisation.

    Training: ``y = gamma * (x - mean_b) / sqrt(var_b + epsilon) + beta`` with the batch's
    mean and *biased* variance over every axis but the channel; then
    ``moving_mean = decay * moving_mean + (1 - decay) * mean_b`` and
    ``moving_var = decay * moving_var + (1 - decay) * var_b * n / (n - 1)`` (the *unbiased*
    variance, n = elements per channel). Evaluation uses the moving statistics.
    gamma init ones, beta zeros, moving_mean zeros, moving_var ones.
    """
    c = shapes[0][-1]
    params = []
    if attrs["scale"]:
        params.append(Param("gamma", (c,), "ones"))
    if attrs["center"]:
        params.append(Param("beta", (c,), "zeros"))
    params += [Param("moving_mean", (c,), "zeros", trainable=False),
               Param("moving_var", (c,), "ones", trainable=False)]
    return OpResult(shapes[0], tuple(params), 4 * _numel(shapes[0]))


@op("layer_norm")
def layer_norm(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Normalisation of each sample over its channel (last) axis: for an image (H, W, C)
    each pixel's C values, for a vector (C,) the whole vector.

    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta`` with the mean and *biased*
    variance of the C values (Keras's ``LayerNormalization(axis=-1)``; torch's
    ``F.layer_norm`` over the channels, channels-last). The same in training and
    evaluation: no running statistics. gamma (C,) init ones, beta (C,) zeros.
    """
    c = shapes[0][-1]
    params = (Param("gamma", (c,), "ones"), Param("beta", (c,), "zeros"))
    return OpResult(shapes[0], params, 7 * _numel(shapes[0]))


@op("group_norm")
def group_norm(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Normalisation of each sample's channels (last axis) in ``groups`` groups of
    ``C / groups`` consecutive channels: each group over its channels and, on an image
    (H, W, C), every pixel (H * W * C / groups values); on a vector (C,) its channels.

    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta`` with the group's mean and
    *biased* variance (torch's ``nn.GroupNorm``, Keras's ``GroupNormalization``; groups=1
    normalises the whole sample, groups=C each channel: instance norm). The same in training
    and evaluation: no running statistics. gamma (C,) init ones, beta (C,) zeros.
    """
    c, groups = shapes[0][-1], attrs["groups"]
    if c % groups:
        raise ShapeError(f"group_norm groups={groups} must divide the input's {c} channels",
                         "groups that divide them: "
                         + ", ".join(str(d) for d in range(1, c + 1) if c % d == 0)[:200])
    params = (Param("gamma", (c,), "ones"), Param("beta", (c,), "zeros"))
    return OpResult(shapes[0], params, 7 * _numel(shapes[0]))


@op("prelu")
def prelu(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Parametric ReLU: ``y = x`` where ``x > 0``, else ``alpha * x``, with one learned slope
    per channel (last axis), shared by every pixel of an image (torch's
    ``nn.PReLU(num_parameters=C)``; Keras's ``PReLU(shared_axes=[1, 2])``; on a vector each
    feature's). At ``x == 0`` the gradient to x is ``alpha`` (torch's side). alpha (C,)
    init ``alpha_init`` (``constant:<alpha_init>``: 0.25 by default, torch's).
    """
    c = shapes[0][-1]
    alpha = Param("alpha", (c,), f"constant:{float(attrs['alpha_init'])!r}")
    return OpResult(shapes[0], (alpha,), 3 * _numel(shapes[0]))


@op("dropout")
def dropout(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Training only: zero each element with probability ``rate`` and scale the others by
    1 / (1 - rate). ``spatial``: one draw per (sample, channel) on images; ``per_sample``:
    one draw per sample, which zeroes or scales the sample's whole output (drop-connect,
    stochastic depth); not both. Identity in evaluation. Masks come from specforge's
    generator in conformance runs: the counter-based generator of
    ``specforge/ir/randomness.py``, defined just below."""
    if attrs["spatial"]:
        _image("spatial dropout", shapes[0])
    return OpResult(shapes[0], (), _numel(shapes[0]))


ACTIVATION_FORMULAS = {
    "linear": "x",
    "relu": "max(x, 0)",
    "relu6": "min(max(x, 0), 6)",
    "leaky_relu": "x if x >= 0 else negative_slope * x",
    "elu": "x if x > 0 else alpha * (exp(x) - 1)",
    "selu": "1.0507009873554805 * (x if x > 0 else 1.6732632423543772 * (exp(x) - 1))",
    "gelu": "x * (1 + erf(x / sqrt(2))) / 2 (exact)",
    "gelu_tanh": "x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) / 2",
    "silu": "x * sigmoid(x)",
    "sigmoid": "1 / (1 + exp(-x))",
    "hard_sigmoid": "max(0, min(1, alpha * x + beta)); alpha 1/6 and beta 0.5 by default "
                    "(= relu6(x + 3) / 6; ONNX's defaults are 0.2 and 0.5)",
    "hard_swish": "x * relu6(x + 3) / 6",
    "tanh": "tanh(x)",
    "softplus": "log(1 + exp(x))",
    "softsign": "x / (1 + |x|)",
    "softmax": "exp(x) / sum(exp(x)) over the last (channel/feature) axis",
}


@op("activation")
def activation(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Element-wise function ``fn`` (softmax: over the last axis); see ACTIVATION_FORMULAS.
    ``negative_slope`` (leaky_relu), ``alpha`` (elu) and ``alpha``, ``beta`` (hard_sigmoid)
    are always explicit."""
    return OpResult(shapes[0], (), _numel(shapes[0]))


@op("rescaling")
def rescaling(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """``y = x * scale + offset``, element-wise, on any input shape. ``scale`` and ``offset``
    (defaults 1.0 and 0.0) are each a number or a tuple of one number per channel (the last
    axis), broadcast over the other axes; they are attributes, not parameters (nothing is
    trained). The multiply comes first, then the add, each rounded in the compute dtype.
    This is Keras's ``Rescaling``; a Keras ``Normalization`` with fixed mean and variance,
    ``(x - mean) / max(sqrt(variance), epsilon)``, is scale ``1 / max(sqrt(variance),
    epsilon)`` and offset ``-mean * scale``."""
    channels = shapes[0][-1]
    for field in ("scale", "offset"):
        value = attrs[field]
        if isinstance(value, tuple) and len(value) != channels:
            raise ShapeError(f"rescaling's {field} has {len(value)} values but its input has "
                             f"{channels} channels (shape {shapes[0]})",
                             f"give one number, or a list of {channels} (one per channel)")
    return OpResult(shapes[0], (), 2 * _numel(shapes[0]))


@op("add", arity=None)
def add(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Element-wise sum of inputs of identical shape."""
    if len(set(shapes)) != 1:
        raise ShapeError(f"add needs inputs of one shape, got {', '.join(map(str, shapes))}",
                         "match them with a 1x1 conv2d (channels) or strides/pooling (size)")
    return OpResult(shapes[0], (), _numel(shapes[0]) * (len(shapes) - 1))


@op("multiply", arity=2)
def multiply(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Element-wise product of two inputs. Of identical shape: ``out = a * b``. Or one is a
    vector ``g`` of shape ``(C,)`` and the other an image ``x`` of shape ``(H, W, C)`` (either
    order): ``out[h, w, c] = x[h, w, c] * g[c]``, the vector scales each channel at every
    pixel (a squeeze-and-excitation gate). The output has the larger shape. No parameters."""
    out = _product_shape(shapes[0], shapes[1])
    return OpResult(out, (), _numel(out))


def _product_shape(a: Shape, b: Shape) -> Shape:
    if a == b:
        return a
    gate, image = sorted((a, b), key=len)
    if len(gate) == 1 and len(image) == 3 and gate[0] == image[2]:
        return image
    raise ShapeError(f"multiply needs inputs of one shape, or a (C,) vector and an (H, W, C) "
                     f"image with the same C, got {a}, {b}",
                     "match the channels with a 1x1 conv2d or a dense layer of C units")


@op("concat", arity=None)
def concat(attrs: Attrs, shapes: list[Shape]) -> OpResult:
    """Concatenation along the last (channel/feature) axis; other axes must match."""
    if len({s[:-1] for s in shapes}) != 1 or len({len(s) for s in shapes}) != 1:
        raise ShapeError("concat needs inputs that differ only in the last axis, got "
                         f"{', '.join(map(str, shapes))}")
    return OpResult((*shapes[0][:-1], sum(s[-1] for s in shapes)))
