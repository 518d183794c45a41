"""ONNX export: an IR graph and its neutral weights lowered to an ONNX model.

The model is written with the ``onnx`` package alone (``onnx.helper``), from the IR, never
through a framework's exporter: it needs neither torch nor TensorFlow. Every IR op has one
small function below that reads all of its attributes; an attribute it does not know, or a
value it cannot express, stops the export with :class:`ExportError` rather than writing a
model that computes something else.

Inside the ONNX graph images are NCHW (ONNX's Conv, pooling and BatchNormalization need
channels first); with ``layout="nhwc"`` (the spec's layout, the default) a Transpose takes
the NHWC input to it, and an image-shaped output goes back to NHWC. ``flatten`` transposes to
NHWC before flattening, so that features keep specforge's (height, width, channel) order and
a dense layer's neutral kernel is used as it is.

Meaning of the export: the model in evaluation form. Batch norm uses its moving statistics
(``BatchNormalization`` in inference mode), dropout is gone, and the softmax (sigmoid) that
the spec folded into the loss is applied again (``logits=True`` leaves it out): the output is
what ``specforge predict`` returns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import TensorProto, checker, helper, numpy_helper

from specforge import __version__
from specforge.ir.graph import Graph, Node
from specforge.ir.program import Program

#: The ONNX opset of every exported model (onnxruntime supports it fully): the first with
#: AveragePool's dilations. Gelu has no operator before opset 20: it is written out with
#: Erf / Tanh.
OPSET = 19
#: The IR version that opset 19 came with, so that older runtimes read the file too.
IR_VERSION = 9
#: Names of the graph's input and output.
INPUT_NAME, OUTPUT_NAME = "input", "output"
#: The input and output's first dimension: any batch size.
BATCH_DIM = "batch"
LAYOUTS = ("nhwc", "nchw")
#: A protobuf message (an ONNX file without external data) is smaller than 2 GiB.
PROTOBUF_LIMIT = 2**31 - 2**24  # bytes of float32 weights, leaving room for the graph


class ExportError(Exception):
    """What the exporter cannot express; the message names the node, its op and why."""


@dataclass
class OnnxGraphBuilder:
    """The ONNX nodes and initializers written so far, with unique tensor names."""

    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)

    def fresh(self, base: str) -> str:
        """An unused tensor name starting with ``base``."""
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def add(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        """Append one ONNX node computing a tensor named after ``name``; its output's name."""
        output = self.fresh(name)
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=output,
                                           **attrs))
        return output

    def constant(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        """An initializer holding ``value``; its name."""
        tensor_name = self.fresh(name)
        array = np.ascontiguousarray(np.asarray(value, dtype))
        self.initializers.append(numpy_helper.from_array(array, tensor_name))
        return tensor_name


@dataclass(frozen=True)
class OpContext:
    """What an op's export function gets: the builder, the node, its inputs' ONNX tensor
    names, its own parameters (neutral layout, by parameter name) and its inputs' IR shapes
    (per sample, NHWC)."""

    builder: OnnxGraphBuilder
    node: Node
    inputs: list[str]
    params: Mapping[str, np.ndarray]
    in_shapes: Sequence[tuple[int, ...]] = ()

    def constant(self, param: str, value: Any) -> str:
        return self.builder.constant(f"{self.node.name}.{param}", value)

    def add(self, op_type: str, inputs: Sequence[str], step: str = "", **attrs: Any) -> str:
        name = f"{self.node.name}/{step}" if step else self.node.name
        return self.builder.add(op_type, inputs, name, **attrs)


ExportFn = Callable[[OpContext], str]


@dataclass(frozen=True)
class OpExport:
    """How one IR op is exported: the function, and every attribute it reads."""

    fn: ExportFn
    attrs: frozenset[str]


EXPORTS: dict[str, OpExport] = {}


def exports(op_name: str, *attrs: str) -> Callable[[ExportFn], ExportFn]:
    """Register ``fn`` as the export of ``op_name``, which reads exactly ``attrs``: a node
    with another attribute is refused (a new attribute must be handled here first)."""
    def register(fn: ExportFn) -> ExportFn:
        EXPORTS[op_name] = OpExport(fn, frozenset(attrs))
        return fn
    return register


def unsupported(node: Node, attr: str, value: Any, valid: str) -> ExportError:
    return ExportError(f"node '{node.name}' ({node.op}): {attr}={value!r} has no ONNX export "
                       f"(supported: {valid})")


def onnx_pads(pads: tuple[int, int, int, int]) -> list[int]:
    """specforge's (top, bottom, left, right) as ONNX's [top, left, bottom, right]."""
    top, bottom, left, right = pads
    return [top, left, bottom, right]


#: specforge's pad modes as ONNX Pad's modes.
PAD_MODES = {"zeros": "constant", "constant": "constant", "reflect": "reflect",
             "replicate": "edge"}


def spatial_pad(ctx: OpContext, x: str, pads: tuple[int, int, int, int], mode: str,
                attr: str, value: float = 0.0) -> str:
    """``x`` (NCHW) padded by a Pad node (modes zeros and constant: with ``value``); ``x``
    itself when every pad is 0."""
    if mode not in PAD_MODES:
        raise unsupported(ctx.node, attr, mode, ", ".join(PAD_MODES))
    if not any(pads):
        return x
    top, bottom, left, right = pads
    inputs = [x, ctx.builder.constant(f"{ctx.node.name}.pads",
                                      [0, 0, top, left, 0, 0, bottom, right], np.int64)]
    if PAD_MODES[mode] == "constant" and value != 0:
        inputs.append(ctx.builder.constant(f"{ctx.node.name}.pad_value", value))
    return ctx.add("Pad", inputs, "pad", mode=PAD_MODES[mode])


@exports("conv2d", "filters", "kernel", "strides", "dilation", "groups", "pads", "pad_mode",
         "pad_value", "bias")
def export_conv2d(ctx: OpContext) -> str:
    a = ctx.node.attrs
    kernel = ctx.params["kernel"].transpose(3, 2, 0, 1)  # (kh, kw, C/g, F) -> (F, C/g, kh, kw)
    if kernel.shape[:1] != (a["filters"],) or kernel.shape[2:] != tuple(a["kernel"]):
        raise ExportError(f"node '{ctx.node.name}': kernel {ctx.params['kernel'].shape} does "
                          f"not match filters {a['filters']} and kernel {a['kernel']}")
    pads = a["pads"]
    x = ctx.inputs[0]
    if a["pad_mode"] != "zeros":  # Conv pads with zeros only: the other modes pad first
        x = spatial_pad(ctx, x, pads, a["pad_mode"], "pad_mode", a.get("pad_value", 0.0))
        pads = (0, 0, 0, 0)
    inputs = [x, ctx.constant("kernel", kernel)]
    if a["bias"]:
        inputs.append(ctx.constant("bias", ctx.params["bias"]))
    return ctx.add("Conv", inputs, kernel_shape=list(a["kernel"]), strides=list(a["strides"]),
                   dilations=list(a["dilation"]), group=a["groups"], pads=onnx_pads(pads))


@exports("pad2d", "pads", "mode", "pad_value")
def export_pad2d(ctx: OpContext) -> str:
    a = ctx.node.attrs
    out = spatial_pad(ctx, ctx.inputs[0], a["pads"], a["mode"], "mode", a.get("pad_value", 0.0))
    return out if out != ctx.inputs[0] else ctx.add("Identity", [out])


@exports("cropping2d", "crops")
def export_cropping2d(ctx: OpContext) -> str:
    """Slice of height and width (NCHW axes 2 and 3), ends counted from the start (an end
    of -0 would cut everything)."""
    top, bottom, left, right = ctx.node.attrs["crops"]
    h, w, _ = ctx.in_shapes[0]
    inputs = [ctx.inputs[0]] + [
        ctx.builder.constant(f"{ctx.node.name}.{key}", value, np.int64) for key, value in (
            ("starts", [top, left]), ("ends", [h - bottom, w - right]), ("axes", [2, 3]))]
    return ctx.add("Slice", inputs)


@exports("channel_slice", "start", "stop")
def export_channel_slice(ctx: OpContext) -> str:
    """Slice of axis 1: the channels of an NCHW image, the features of an (N, F) vector."""
    inputs = [ctx.inputs[0]] + [
        ctx.builder.constant(f"{ctx.node.name}.{key}", [value], np.int64) for key, value in (
            ("starts", ctx.node.attrs["start"]), ("ends", ctx.node.attrs["stop"]),
            ("axes", 1))]
    return ctx.add("Slice", inputs)


@exports("channel_shuffle", "groups")
def export_channel_shuffle(ctx: OpContext) -> str:
    """torch's view / transpose / view: Reshape to (N, g, C / g, H, W), Transpose of axes 1
    and 2, Reshape back (a 0 keeps the batch, whatever its size)."""
    h, w, c = ctx.in_shapes[0]
    g = ctx.node.attrs["groups"]
    grouped = ctx.builder.constant(f"{ctx.node.name}.grouped", [0, g, c // g, h, w], np.int64)
    whole = ctx.builder.constant(f"{ctx.node.name}.whole", [0, c, h, w], np.int64)
    x = ctx.add("Reshape", [ctx.inputs[0], grouped], "grouped")
    x = ctx.add("Transpose", [x], "interleaved", perm=[0, 2, 1, 3, 4])
    return ctx.add("Reshape", [x, whole])


def _pool(ctx: OpContext, op_type: str, padded_value: float | None, **attrs: Any) -> str:
    """A pool over ``ctx``'s input. ``padded_value``: the value padded cells hold (None:
    the pool's own padding); then the input is padded with it first, since ONNX's pools
    pad with nothing that takes part in a max or (by default) an average."""
    a = ctx.node.attrs
    x, pads = ctx.inputs[0], a["pads"]
    if padded_value is not None and any(pads):
        if a["ceil_mode"]:  # ceil_mode's last window is measured from the unpadded edge
            raise unsupported(ctx.node, "pad_value", padded_value,
                              "a pad value without ceil_mode")
        x, pads = spatial_pad(ctx, x, pads, "constant", "pad_value", padded_value), (0,) * 4
    return ctx.add(op_type, [x], kernel_shape=list(a["pool"]), strides=list(a["strides"]),
                   dilations=list(a["dilation"]), pads=onnx_pads(pads),
                   ceil_mode=int(a["ceil_mode"]), **attrs)


@exports("max_pool2d", "pool", "strides", "pads", "dilation", "ceil_mode", "pad_value")
def export_max_pool2d(ctx: OpContext) -> str:
    # ONNX's MaxPool never lets a padded cell win, as specforge's default -inf padding
    return _pool(ctx, "MaxPool", ctx.node.attrs.get("pad_value"))


@exports("avg_pool2d", "pool", "strides", "pads", "dilation", "ceil_mode", "count_include_pad",
         "pad_value")
def export_avg_pool2d(ctx: OpContext) -> str:
    # count_include_pad: padded cells (zeros) in the divisor; another value is padded first
    a = ctx.node.attrs
    value = a.get("pad_value")
    return _pool(ctx, "AveragePool", value if value else None,
                 count_include_pad=int(a["count_include_pad"]))


def _global_pool(ctx: OpContext, op_type: str) -> str:
    pooled = ctx.add(op_type, ctx.inputs, "pool")  # (N, C, 1, 1)
    return ctx.add("Flatten", [pooled], axis=1)


@exports("global_avg_pool2d")
def export_global_avg_pool2d(ctx: OpContext) -> str:
    return _global_pool(ctx, "GlobalAveragePool")


@exports("global_max_pool2d")
def export_global_max_pool2d(ctx: OpContext) -> str:
    return _global_pool(ctx, "GlobalMaxPool")


@exports("flatten")
def export_flatten(ctx: OpContext) -> str:
    # specforge flattens in (height, width, channel) order: back to NHWC first
    nhwc = ctx.add("Transpose", ctx.inputs, "to_nhwc", perm=[0, 2, 3, 1])
    return ctx.add("Flatten", [nhwc], axis=1)


@exports("dense", "units", "bias")
def export_dense(ctx: OpContext) -> str:
    a = ctx.node.attrs
    kernel = ctx.params["kernel"]  # (in, units): Gemm's B as it is
    if kernel.shape[1] != a["units"]:
        raise ExportError(f"node '{ctx.node.name}': kernel {kernel.shape} does not match "
                          f"units {a['units']}")
    inputs = [ctx.inputs[0], ctx.constant("kernel", kernel)]
    if a["bias"]:
        inputs.append(ctx.constant("bias", ctx.params["bias"]))
    return ctx.add("Gemm", inputs)


@exports("batch_norm", "decay", "epsilon", "scale", "center")
def export_batch_norm(ctx: OpContext) -> str:
    """Inference form: the moving statistics. ONNX's momentum has specforge's decay meaning
    (it only matters when training, which an exported model does not)."""
    a = ctx.node.attrs
    channels = ctx.node.shape[-1]
    gamma = ctx.params["gamma"] if a["scale"] else np.ones(channels, np.float32)
    beta = ctx.params["beta"] if a["center"] else np.zeros(channels, np.float32)
    inputs = [ctx.inputs[0], ctx.constant("gamma", gamma), ctx.constant("beta", beta),
              ctx.constant("moving_mean", ctx.params["moving_mean"]),
              ctx.constant("moving_var", ctx.params["moving_var"])]
    return ctx.add("BatchNormalization", inputs, epsilon=float(a["epsilon"]),
                   momentum=float(a["decay"]))


@exports("layer_norm", "epsilon")
def export_layer_norm(ctx: OpContext) -> str:
    """LayerNormalization over the last axis. It normalises every axis from ``axis`` on: on
    an NCHW image that would take in height and width too, so the channels are moved last
    for it and back (as torchvision's ConvNeXt exports)."""
    image = len(ctx.node.shape) == 3
    x = ctx.add("Transpose", ctx.inputs, "to_nhwc", perm=[0, 2, 3, 1]) if image \
        else ctx.inputs[0]
    y = ctx.add("LayerNormalization", [x, ctx.constant("gamma", ctx.params["gamma"]),
                                       ctx.constant("beta", ctx.params["beta"])],
                "nhwc" if image else "", axis=-1, epsilon=float(ctx.node.attrs["epsilon"]))
    return ctx.add("Transpose", [y], perm=[0, 3, 1, 2]) if image else y


@exports("group_norm", "groups", "epsilon")
def export_group_norm(ctx: OpContext) -> str:
    """Opset 19's GroupNormalization scales each group, not each channel, so the norm is
    written out as torch's exporter writes nn.GroupNorm: a Reshape to (N, groups, rest), an
    InstanceNormalization of each group (scale 1, bias 0), a Reshape back, then a Mul by
    gamma and an Add of beta per channel ((C, 1, 1) on an NCHW image)."""
    shape, groups = ctx.node.shape, ctx.node.attrs["groups"]
    c = shape[-1]
    back = [0, c, shape[0], shape[1]] if len(shape) == 3 else [0, c]  # 0: the batch, kept

    def ints(name: str, value: list[int]) -> str:
        return ctx.builder.constant(f"{ctx.node.name}.{name}", value, np.int64)

    x = ctx.add("Reshape", [ctx.inputs[0], ints("groups_shape", [0, groups, -1])], "groups")
    x = ctx.add("InstanceNormalization", [x, ctx.constant("ones", np.ones(groups)),
                                          ctx.constant("zeros", np.zeros(groups))],
                "normalised", epsilon=float(ctx.node.attrs["epsilon"]))
    x = ctx.add("Reshape", [x, ints("shape", back)], "ungrouped")
    per_channel = (-1, 1, 1) if len(shape) == 3 else (-1,)
    x = ctx.add("Mul", [x, ctx.constant("gamma", ctx.params["gamma"].reshape(per_channel))],
                "scaled")
    return ctx.add("Add", [x, ctx.constant("beta", ctx.params["beta"].reshape(per_channel))])


@exports("prelu", "alpha_init")  # the initial slope: no part of a trained model
def export_prelu(ctx: OpContext) -> str:
    """PRelu with the slopes as (C, 1, 1) on an NCHW image (as torch exports nn.PReLU), so
    that they broadcast over height and width; (C,) on features."""
    alpha = ctx.params["alpha"]
    slope = alpha.reshape(-1, 1, 1) if len(ctx.node.shape) == 3 else alpha
    return ctx.add("PRelu", [*ctx.inputs, ctx.constant("alpha", slope)])


@exports("dropout", "rate", "spatial", "per_sample")
def export_dropout(ctx: OpContext) -> str:
    return ctx.inputs[0]  # the identity in evaluation: no node at all


def _per_channel(value: float | tuple[float, ...], shape: tuple[int, ...]) -> np.ndarray:
    """A rescaling value as a constant that broadcasts over ONNX's layout: a number as a
    scalar, per-channel values as (1, C, 1, 1) on an NCHW image, (C,) on features."""
    if not isinstance(value, tuple):
        return np.asarray(value, np.float32)
    array = np.asarray(value, np.float32)
    return array.reshape(1, -1, 1, 1) if len(shape) == 3 else array


@exports("rescaling", "scale", "offset")
def export_rescaling(ctx: OpContext) -> str:
    """Mul by the scale, then Add of the offset; the Add is left out for an offset of 0,
    the Mul for a scale of 1 with an offset (the importer reads each form back)."""
    a, shape, x = ctx.node.attrs, ctx.node.shape, ctx.inputs[0]
    has_offset = a["offset"] != 0.0
    if a["scale"] != 1.0 or not has_offset:
        x = ctx.add("Mul", [x, ctx.constant("scale", _per_channel(a["scale"], shape))],
                    "scale" if has_offset else "")
    if has_offset:
        x = ctx.add("Add", [x, ctx.constant("offset", _per_channel(a["offset"], shape))])
    return x


@exports("add")
def export_add(ctx: OpContext) -> str:
    return ctx.add("Sum", ctx.inputs)


@exports("multiply")
def export_multiply(ctx: OpContext) -> str:
    """Mul; a (N, C) channel gate is unsqueezed to (N, C, 1, 1) first, to scale every pixel
    of the (N, C, H, W) other input (the graph is NCHW inside, whatever the layout)."""
    factors = list(ctx.inputs)
    for k, shape in enumerate(ctx.in_shapes):
        if len(shape) < len(ctx.node.shape):
            axes = ctx.builder.constant(f"{ctx.node.name}.gate_axes", [2, 3], np.int64)
            factors[k] = ctx.add("Unsqueeze", [factors[k], axes], "gate")
    return ctx.add("Mul", factors)


@exports("concat")
def export_concat(ctx: OpContext) -> str:
    return ctx.add("Concat", ctx.inputs, axis=1)  # channels (NCHW) or features (N, F)


# --- activations -------------------------------------------------------------------------
#: Attributes each activation function reads besides ``fn``.
ACTIVATION_ATTRS: dict[str, frozenset[str]] = {"leaky_relu": frozenset({"negative_slope"}),
                                               "elu": frozenset({"alpha"}),
                                               "hard_sigmoid": frozenset({"alpha", "beta"})}
#: selu's constants, as ops.ACTIVATION_FORMULAS writes them (ONNX's defaults are float32).
SELU_ALPHA, SELU_GAMMA = 1.6732632423543772, 1.0507009873554805


def _gelu(ctx: OpContext, x: str) -> str:
    """x * (1 + erf(x / sqrt(2))) / 2."""
    scaled = ctx.add("Mul", [x, ctx.constant("inv_sqrt2", 1 / math.sqrt(2))], "scaled")
    return _half_x_times_one_plus(ctx, x, ctx.add("Erf", [scaled], "erf"))


def _gelu_tanh(ctx: OpContext, x: str) -> str:
    """x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) / 2."""
    cube = ctx.add("Mul", [ctx.add("Mul", [x, x], "square"), x], "cube")
    inner = ctx.add("Add", [x, ctx.add("Mul", [cube, ctx.constant("c", 0.044715)], "cubic")],
                    "inner")
    scaled = ctx.add("Mul", [inner, ctx.constant("sqrt_2_over_pi", math.sqrt(2 / math.pi))],
                     "scaled")
    return _half_x_times_one_plus(ctx, x, ctx.add("Tanh", [scaled], "tanh"))


def _half_x_times_one_plus(ctx: OpContext, x: str, t: str) -> str:
    one_plus = ctx.add("Add", [t, ctx.constant("one", 1.0)], "one_plus")
    return ctx.add("Mul", [ctx.add("Mul", [x, one_plus], "product"),
                           ctx.constant("half", 0.5)])


def _single(op_type: str, **attrs: Any) -> Callable[[OpContext, str], str]:
    return lambda ctx, x: ctx.add(op_type, [x], **attrs)


#: Each activation function as ONNX nodes on the tensor ``x``.
ACTIVATION_EXPORTS: dict[str, Callable[[OpContext, str], str]] = {
    "linear": _single("Identity"),
    "relu": _single("Relu"),
    "relu6": lambda ctx, x: ctx.add("Clip", [x, ctx.constant("min", 0.0),
                                             ctx.constant("max", 6.0)]),
    "leaky_relu": lambda ctx, x: ctx.add(
        "LeakyRelu", [x], alpha=float(ctx.node.attrs["negative_slope"])),
    "elu": lambda ctx, x: ctx.add("Elu", [x], alpha=float(ctx.node.attrs["alpha"])),
    "selu": _single("Selu", alpha=SELU_ALPHA, gamma=SELU_GAMMA),
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": lambda ctx, x: ctx.add("Mul", [x, ctx.add("Sigmoid", [x], "sigmoid")]),
    "sigmoid": _single("Sigmoid"),
    "hard_sigmoid": lambda ctx, x: ctx.add("HardSigmoid", [x],
                                           alpha=float(ctx.node.attrs["alpha"]),
                                           beta=float(ctx.node.attrs["beta"])),
    "hard_swish": _single("HardSwish"),  # x * relu6(x + 3) / 6: ONNX's own constants
    "tanh": _single("Tanh"),
    "softplus": _single("Softplus"),
    "softsign": _single("Softsign"),
    "softmax": _single("Softmax", axis=1),  # channels (NCHW) or features (N, F)
}


@exports("activation", "fn", "negative_slope", "alpha", "beta")
def export_activation(ctx: OpContext) -> str:
    a = ctx.node.attrs
    fn = a["fn"]
    if fn not in ACTIVATION_EXPORTS:
        raise unsupported(ctx.node, "fn", fn, ", ".join(ACTIVATION_EXPORTS))
    extra = set(a) - {"fn"} - ACTIVATION_ATTRS.get(fn, frozenset())
    if extra:
        raise ExportError(f"node '{ctx.node.name}' (activation {fn}): attribute "
                          f"{sorted(extra)[0]!r} has no ONNX export")
    return ACTIVATION_EXPORTS[fn](ctx, ctx.inputs[0])


# --- the whole model ---------------------------------------------------------------------
def check_exportable(graph: Graph) -> None:
    """Raise ExportError for every node whose op or attributes the exporter cannot write
    (all of them in one message)."""
    problems = []
    for node in graph:
        if node.op == "input":
            continue
        spec = EXPORTS.get(node.op)
        if spec is None:
            problems.append(f"node '{node.name}': op {node.op!r} has no ONNX export")
            continue
        unknown = sorted(set(node.attrs) - spec.attrs)
        if unknown:
            problems.append(f"node '{node.name}' ({node.op}): attribute "
                            f"{', '.join(map(repr, unknown))} has no ONNX export")
    if problems:
        raise ExportError("; ".join(problems))


def _node_params(node: Node, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(weights[f"{node.name}.{p.name}"], np.float32)
            for p in node.params}


def _lower_nodes(graph: Graph, weights: Mapping[str, np.ndarray], builder: OnnxGraphBuilder,
                 first: str) -> str:
    """Every node of ``graph`` as ONNX nodes; the ONNX name of the graph's output."""
    tensors = {graph.input.name: first}
    for node in graph:
        if node.op == "input":
            continue
        ctx = OpContext(builder, node, [tensors[i] for i in node.inputs],
                        _node_params(node, weights), [graph[i].shape for i in node.inputs])
        tensors[node.name] = EXPORTS[node.op].fn(ctx)
    return tensors[graph.output]


def _value_info(name: str, shape: tuple[int, ...], layout: str) -> Any:
    if len(shape) == 3:
        h, w, c = shape
        shape = (h, w, c) if layout == "nhwc" else (c, h, w)
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIM, *shape])


def _write_output(builder: OnnxGraphBuilder, out: str, squash: str | None,
                  shape: tuple[int, ...], layout: str) -> None:
    """The graph's output ``output``: ``out`` with the folded softmax (sigmoid) ``squash``
    applied again, an image back in the input's layout."""
    if squash == "softmax":
        out = builder.add("Softmax", [out], squash, axis=1)  # channels or features
    elif squash == "sigmoid":
        out = builder.add("Sigmoid", [out], squash)
    elif squash is not None:
        raise ExportError(f"output activation {squash!r} has no ONNX export")
    perm = [0, 2, 3, 1] if len(shape) == 3 and layout == "nhwc" else None
    builder.nodes.append(helper.make_node("Transpose" if perm else "Identity", [out],
                                          [OUTPUT_NAME], name=OUTPUT_NAME,
                                          **({"perm": perm} if perm else {})))


def to_onnx(program: Program, weights: Mapping[str, np.ndarray], *, layout: str = "nhwc",
            logits: bool = False, class_names: Sequence[str] | None = None) -> Any:
    """The ONNX ``ModelProto`` of ``program``'s graph with ``weights`` (neutral format,
    already checked against the graph): input ``input`` in ``layout`` with any batch size,
    output ``output`` (probabilities, or logits with ``logits``)."""
    if layout not in LAYOUTS:
        raise ExportError(f"layout {layout!r}: use {' or '.join(LAYOUTS)}")
    graph = program.graph
    check_exportable(graph)
    size = 4 * (graph.trainable_params + graph.non_trainable_params)
    if size >= PROTOBUF_LIMIT:
        raise ExportError(f"the weights take {size / 2**30:.1f} GiB: a single ONNX file holds "
                          "less than 2 GiB (external data is not written)")
    builder = OnnxGraphBuilder(taken={INPUT_NAME, OUTPUT_NAME})
    image_input = len(graph.input.shape) == 3
    first = INPUT_NAME
    if image_input and layout == "nhwc":
        first = builder.add("Transpose", [INPUT_NAME], "input_to_nchw", perm=[0, 3, 1, 2])
    squash = None if logits else program.output_activation
    out_shape = graph[graph.output].shape
    _write_output(builder, _lower_nodes(graph, weights, builder, first), squash, out_shape,
                  layout)
    onnx_graph = helper.make_graph(
        builder.nodes, program.name, [_value_info(INPUT_NAME, graph.input.shape, layout)],
        [_value_info(OUTPUT_NAME, out_shape, layout)], builder.initializers)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="specforge",
                              producer_version=__version__,
                              doc_string=f"{program.name}, exported by specforge")
    helper.set_model_props(model, metadata(program, layout, squash, class_names))
    checker.check_model(model, full_check=True)
    return model


def metadata(program: Program, layout: str, squash: str | None,
             class_names: Sequence[str] | None) -> dict[str, str]:
    """The model's metadata_props: what a user of the file needs to feed and read it."""
    if squash is not None:
        output = f"probabilities ({squash})"
    else:  # --logits, or a model whose loss takes its outputs as they are (mse, ...)
        output = "logits" if program.output_activation else "outputs"
    props = {"name": program.name, "layout": layout, "output": output}
    if class_names:
        props["class_names"] = json.dumps(list(class_names))
    norm = program.spec.data.normalize if program.spec.data else None
    if norm is not None:  # the images the model expects: (pixels * scale - mean) / std
        props["normalize"] = json.dumps(norm.model_dump(mode="json"))
    return props
