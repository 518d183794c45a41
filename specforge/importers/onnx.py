"""ONNX models to specforge layers and neutral weights.

Graphs as `torch.onnx.export` and the Keras exporters write them: NCHW images (or NHWC ones
transposed to NCHW first), torch's CHW flatten order, Gemm or MatMul + Add for dense layers,
Clip(0, 6) for relu6, explicit pads, GELU written out element-wise (see
:mod:`specforge.importers.onnx_patterns`). A Pad read by one Conv or pool alone becomes that
layer's padding (mode, value), as a person writes it and as specforge's exporter writes the
padding modes ONNX's Conv lacks; ONNX's float32 attributes read as the shortest decimal that
rounds to them. Every ONNX value is tracked as the spec layer that computes it and the
*layout* in which ONNX sees that layer's channels-last tensor:

- ``nchw`` / ``nhwc``: an image, ONNX axes (N, C, H, W) or (N, H, W, C);
- ``flat``: a vector in the spec's order (height, width, channel for a flattened image);
- ``chw``: a vector flattened in ONNX's channel, height, width order: a dense layer that
  reads it gets its kernel rows permuted to the spec's order;
- ``pooled``: a globally pooled vector that ONNX still sees as (N, C, 1, 1) (or a vector
  unsqueezed or reshaped to it: a squeeze-and-excitation gate, which a Mul with an NCHW
  image reads as a (C,) gate);
- ``pooled_nhwc``: the same moved channels-last, (N, 1, 1, C) (torchvision's ConvNeXt
  head normalises its pooled features so, between two Transposes);
- ``grouped`` / ``grouped_t``: inside a channel shuffle (torch's ``x.view(n, g, c // g, h,
  w).transpose(1, 2).view(n, c, h, w)``), an NCHW image seen as (N, g, C/g, H, W) and then as
  (N, C/g, g, H, W); only the Transpose and the Reshape of that pattern read them, checked
  at its first Reshape, and the last Reshape writes the `channel_shuffle` layer.

A Split of the channels (torch's ``x.chunk(2, dim=1)``) has one value per output, each a
`channel_slice` layer; so does a Slice of the channel axis alone.

The file is read by :mod:`specforge.importers.onnx_safety` first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specforge.importers import (
    ImportedModel,
    ImportRefused,
    NameTable,
    Unsupported,
    four_sides,
    layer,
    needs_package,
)
from specforge.importers.onnx_patterns import Gelu, find_gelus
from specforge.importers.onnx_safety import UnsafeModel, load_checked, tensor_array
from specforge.ir.ops import Pads, same_pads, window_output

#: Layers whose `activation:` field can take a following activation op.
FUSES_ACTIVATION = ("conv2d", "depthwise_conv2d", "dense")


@dataclass(frozen=True)
class Value:
    """An ONNX value computed by a spec layer, as ONNX lays it out (see the module doc)."""

    layer: str
    shape: tuple[int, ...]  # the spec's per-sample shape: (H, W, C) or (features,)
    layout: str
    chw: tuple[int, int, int] | None = None  # (C, H, W) of a `chw` vector
    groups: int = 1  # a channel shuffle's groups, in the `grouped` layouts

    @property
    def onnx_shape(self) -> tuple[int, ...]:
        """The shape ONNX sees, batch 1 (what Shape ops compute)."""
        if self.layout == "nchw":
            h, w, c = self.shape
            return (1, c, h, w)
        if self.layout == "nhwc":
            return (1, *self.shape)
        if self.layout == "pooled":
            return (1, self.shape[0], 1, 1)
        if self.layout == "pooled_nhwc":
            return (1, 1, 1, self.shape[0])
        if self.layout in ("grouped", "grouped_t"):
            h, w, c = self.shape
            g, rest = self.groups, c // self.groups
            return (1, g, rest, h, w) if self.layout == "grouped" else (1, rest, g, h, w)
        return (1, self.shape[0])


class _NotExpressible(Exception):
    """An attribute of an op that specforge cannot express (the message says which)."""


def import_onnx(source: Path) -> ImportedModel:
    """Translate an ONNX model; raises ImportRefused listing what cannot be."""
    try:
        model = load_checked(source)
    except ImportError:
        raise needs_package(source, "onnx") from None
    except UnsafeModel as exc:
        raise ImportRefused(source, [exc], "refused") from None
    return _Translator(source, model).translate()


def scope_name(node: Any) -> str:
    """A readable name from torch's scoped node names, whose scopes repeat their parent's
    last part: `/layer2/layer2.0/down/down.0/Conv` -> `layer2.0.down.0`;
    `/layer1/layer1.0/Add` -> `layer1.0.add`; `/Flatten` -> `flatten`."""
    *scopes, last = [p for p in node.name.split("/") if p] or [node.op_type]
    path: list[str] = []
    for scope in scopes:
        if path and scope.startswith(path[-1] + "."):
            path.append(scope[len(path[-1]) + 1:])
        else:
            path.append(scope)
    op_named = last.split("_")[0] == node.op_type  # `Conv`, `Relu_1`: not a scope
    if not op_named:
        return ".".join([*path, last])
    # a module's own op is named by the module; a functional op by the module and the op
    functional = node.op_type in ("Add", "Mul", "Concat", "Flatten", "Reshape", "Sum", "Pad",
                                  "Slice", "Transpose", "Squeeze")
    if not path or functional:
        path.append(node.op_type.lower())
    return ".".join(path)


class _Translator:
    """Walks the graph's nodes in order, writing spec layers and weights."""

    def __init__(self, source: Path, model: Any) -> None:
        self.source, self.model, self.graph = source, model, model.graph
        self.folder = source.parent
        self.names = NameTable()
        self.problems: list[Unsupported] = []
        self.values: dict[str, Value | None] = {}
        self.constants: dict[str, Any] = {t.name: t for t in self.graph.initializer}
        self.arrays: dict[str, np.ndarray] = {}
        self.layers: dict[str, dict[str, Any]] = {}
        self.pad_layers: dict[str, PadLayer] = {}
        #: cropping2d layers: what each crops, its Slice's ONNX output and its crops
        self.crop_layers: dict[str, tuple[Value, str, Pads]] = {}
        #: torch's nn.GroupNorm as it exports it: each (N, groups, -1) Reshape's value and
        #: each InstanceNormalization of one, by ONNX output: the value and the groups
        self.groupings: dict[str, tuple[Value, int]] = {}
        self.grouped_norms: dict[str, Value] = {}
        self.uses = Counter(i for n in self.graph.node for i in n.input if i)
        self.uses.update(o.name for o in self.graph.output)
        self.readers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        #: GELUs written out element-wise, by their output; the nodes inside them
        self.gelus = find_gelus(self.graph, self._read_tensor, self.uses)
        self.inside_gelus = {n for g in self.gelus.values() for n in g.nodes} - set(self.gelus)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.opset = opset
        producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
        self.out = ImportedModel(source, f"ONNX opset {opset}"
                                 + (f", from {producer}" if producer else ""), (1, 1, 1))

    # --- the walk ----------------------------------------------------------------------------

    def translate(self) -> ImportedModel:
        self._input()
        for node in self.graph.node:
            self._node(node)
        outputs = list(self.graph.output)
        if len(outputs) != 1:
            self.problems.append(Unsupported(self.source.name, "graph", f"{len(outputs)} "
                                             "outputs: specforge models have one"))
        elif outputs[0].name not in self.values:
            self.problems.append(Unsupported(outputs[0].name, "output", "a constant: the "
                                             "output must be computed from the image"))
        elif self.values.get(outputs[0].name) is not None:
            value = self.values[outputs[0].name]
            assert value is not None
            if value.layout == "chw" and value.chw and value.chw[1:] != (1, 1):
                self.problems.append(Unsupported(outputs[0].name, "output", "a flattened "
                                                 "image in CHW order: specforge's is HWC"))
            self.out.output = value.layer
        if self.problems:
            raise ImportRefused(self.source, self.problems)
        return self.out

    def _input(self) -> None:
        inputs = [i for i in self.graph.input if i.name not in self.constants]
        if len(inputs) != 1:
            raise ImportRefused(self.source, [f"{len(inputs)} graph inputs: specforge models "
                                              "have one image input"])
        tensor = inputs[0].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if tensor.elem_type != 1 or len(dims) != 4 or any(not d for d in dims[1:]):
            raise ImportRefused(self.source, [
                f"input {inputs[0].name!r}: specforge needs one float32 image input of shape "
                f"(batch, channels, height, width) with fixed sizes, got {dims}"])
        consumers = [n for n in self.graph.node if inputs[0].name in n.input]
        nhwc = bool(consumers) and all(
            n.op_type == "Transpose" and list(_attrs(n).get("perm", [])) == [0, 3, 1, 2]
            for n in consumers)
        _, a, b, c = dims
        shape = (a, b, c) if nhwc else (b, c, a)
        self.out.input_shape = shape  # type: ignore[assignment]
        self.values[inputs[0].name] = Value("input", shape, "nhwc" if nhwc else "nchw")

    def _node(self, node: Any) -> None:
        outputs = [o for o in node.output if o]
        if node.domain not in ("", "ai.onnx"):
            self._fail(node, f"op {node.domain}.{node.op_type} of a custom domain")
            return
        if outputs and outputs[0] in self.inside_gelus:
            return  # computed as part of the GELU its last node becomes
        try:
            if outputs and outputs[0] in self.gelus:
                self.values[outputs[0]] = self._gelu(node, self.gelus[outputs[0]])
                return
            if any(i in self.values and self.values[i] is None for i in node.input if i):
                raise _Skip
            if node.op_type == "Shape" and node.input[0] in self.values:
                self.arrays[outputs[0]] = self._shape_of(node)
            elif node.op_type in CONSTANT_OPS and all(
                    self._is_constant(i) for i in node.input if i):
                for name, array in zip(outputs, evaluate_constant_op(self, node),
                                       strict=False):
                    self.arrays[name] = array
            elif node.op_type not in HANDLERS:
                self._fail(node, f"op {node.op_type} has no specforge equivalent")
            else:
                result = HANDLERS[node.op_type](self, node, _attrs(node))
                if isinstance(result, list):  # one value per output (Split)
                    self.values.update(zip(outputs, result, strict=True))
                    return
                self.values[outputs[0]] = result
                for extra in outputs[1:]:  # e.g. MaxPool's indices: usable by nothing
                    self.values[extra] = None
        except _Skip:
            self._mark_unknown(outputs)  # an earlier op failed; its problem is reported
        except _NotExpressible as exc:
            self._fail(node, str(exc))

    def _gelu(self, node: Any, gelu: Gelu) -> Value:
        """The activation a GELU pattern ending at ``node`` computes from its x."""
        value = self.value_of(gelu.x)
        fusable = self.uses[gelu.x] == gelu.x_reads and value.layer != "input"
        return _emit_activation(self, node, value, {"fn": gelu.fn}, fusable)

    def _read_tensor(self, tensor: Any) -> np.ndarray:
        """A tensor's array, or an empty one where the safe reader refuses it (the op that
        reads it says why)."""
        try:
            return tensor_array(tensor, self.folder)
        except UnsafeModel:
            return np.zeros(0, np.float32)

    def _shape_of(self, node: Any) -> np.ndarray:
        """What a Shape op computes (batch 1), for reshapes written as shape arithmetic."""
        value = self.value(node)
        attrs = _attrs(node)
        shape = value.onnx_shape[attrs.get("start", 0):attrs.get("end")]
        return np.array(shape, np.int64)

    def _fail(self, node: Any, reason: str) -> None:
        self.problems.append(Unsupported(node.name or node.output[0], node.op_type, reason))
        self._mark_unknown(list(node.output))

    def _mark_unknown(self, outputs: list[str]) -> None:
        for name in outputs:
            self.values[name] = None

    # --- helpers for handlers ----------------------------------------------------------------

    def _is_constant(self, name: str) -> bool:
        return name in self.constants or name in self.arrays

    def constant(self, name: str) -> np.ndarray:
        """The value of a constant input (initializer or computed from constants)."""
        if name not in self.arrays:
            if name not in self.constants:
                raise _NotExpressible(f"input {name!r} must be a constant (a weight)")
            try:
                self.arrays[name] = tensor_array(self.constants[name], self.folder)
            except UnsafeModel as exc:
                raise _NotExpressible(str(exc)) from None
        return self.arrays[name]

    def scalar(self, name: str) -> float:
        """A constant input holding one number (a scalar or a 1-element tensor), as written
        (see :func:`float32_value`)."""
        array = self.constant(name)
        if array.size != 1:
            raise _NotExpressible(f"input {name!r} of shape {list(array.shape)}: one number "
                                  "expected")
        return float32_value(array.reshape(-1)[0])

    def optional_constant(self, node: Any, index: int) -> np.ndarray | None:
        return self.constant(node.input[index]) if len(node.input) > index and \
            node.input[index] else None

    def value(self, node: Any, index: int = 0) -> Value:
        """The layer computing ``node``'s input ``index``."""
        return self.value_of(node.input[index])

    def value_of(self, name: str) -> Value:
        """The layer computing the ONNX value ``name``."""
        found = self.values.get(name)
        if found is None:
            if name in self.values:
                raise _Skip
            raise _NotExpressible(f"input {name!r} is a constant: specforge layers read "
                                  "the image or other layers")
        return found

    def add(self, node: Any, type_: str, inputs: list[Value], weights: dict[str, np.ndarray]
            | None = None, **fields: Any) -> str:
        """Write one spec layer for ``node``; its name."""
        name = self.names.claim(scope_name(node), node.op_type.lower())
        spec_layer = layer(type_, name, [v.layer for v in inputs], **fields)
        self.out.layers.append(spec_layer)
        self.layers[name] = spec_layer
        for param, value in (weights or {}).items():
            self.out.weights[f"{name}.{param}"] = np.asarray(value, np.float32)
        return name

    def drop_layer(self, name: str) -> None:
        """Take back layer ``name`` (only its one reader read it: that reader takes it in)."""
        self.out.layers.remove(self.layers.pop(name))
        self.pad_layers.pop(name, None)
        self.crop_layers.pop(name, None)

    def single_use(self, node: Any, value: Value) -> bool:
        """Whether ``node`` is the only reader of its first input (so it may be fused)."""
        return self.uses[node.input[0]] == 1 and value.layer != "input"


class _Skip(Exception):
    """An input failed earlier (its problem is already reported)."""


def _attrs(node: Any) -> dict[str, Any]:
    """The node's attributes; floats as written (see :func:`float32_value`)."""
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    for a in node.attribute:
        if a.type == onnx.AttributeProto.FLOAT:
            attrs[a.name] = float32_value(a.f)
        elif a.type == onnx.AttributeProto.FLOATS:
            attrs[a.name] = [float32_value(v) for v in a.floats]
    return attrs


def float32_value(value: Any) -> float:
    """An ONNX float (float32) as the shortest decimal that rounds to it: 0.2, not the
    0.20000000298023224 it holds, so that a spec reads as its author wrote it."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="0"))


def _text(value: str | bytes) -> str:
    """A string attribute (onnx gives bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def _pair_or_int(values: tuple[int, int]) -> int | list[int]:
    return values[0] if values[0] == values[1] else list(values)


def _image(t: _Translator, node: Any, what: str) -> Value:
    value = t.value(node)
    if value.layout != "nchw":
        raise _NotExpressible(f"{what} on a {value.layout.upper()} tensor: ONNX reads "
                              "axis 1 as channels, so it must be NCHW")
    return value


def _onnx_pads(attrs: dict[str, Any], shape: tuple[int, ...], kernel: tuple[int, int],
               strides: tuple[int, int], dilation: tuple[int, int]
               ) -> tuple[int, int, int, int]:
    """A window op's own pads as specforge's (top, bottom, left, right)."""
    h, w, _ = shape
    auto = _text(attrs.get("auto_pad", "NOTSET"))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        lower = auto == "SAME_LOWER"
        top, bottom = same_pads(h, kernel[0], strides[0], dilation[0], lower)
        left, right = same_pads(w, kernel[1], strides[1], dilation[1], lower)
    elif auto == "VALID":
        top = bottom = left = right = 0
    else:
        top, left, bottom, right = (list(attrs.get("pads", [0, 0, 0, 0])) + [0] * 4)[:4]
    if min(top, bottom, left, right) < 0:
        raise _NotExpressible(f"negative pads {[top, left, bottom, right]}")
    return top, bottom, left, right


def _padding_field(pads: tuple[int, int, int, int], shape: tuple[int, ...],
                   kernel: tuple[int, int], strides: tuple[int, int],
                   dilation: tuple[int, int], auto: str = "NOTSET") -> Any:
    """``pads`` as a person writes a layer's padding: `same` (`same_lower`) where they are
    its pads and ONNX said so or they are uneven, else an int, a pair or per side; None for
    none."""
    h, w, _ = shape
    for name, lower, onnx_name in (("same", False, "SAME_UPPER"),
                                   ("same_lower", True, "SAME_LOWER")):
        same = (*same_pads(h, kernel[0], strides[0], dilation[0], lower),
                *same_pads(w, kernel[1], strides[1], dilation[1], lower))
        if pads == same and (auto == onnx_name or (pads[0], pads[2]) != (pads[1], pads[3])):
            return name  # uneven pads are `same` as people write it
    top, bottom, left, right = pads
    if top == bottom and left == right:
        return None if top == left == 0 else _pair_or_int((top, left))
    return {"top": top, "bottom": bottom, "left": left, "right": right}


def _output_size(shape: tuple[int, ...], pads: tuple[int, int, int, int],
                 kernel: tuple[int, int], strides: tuple[int, int],
                 dilation: tuple[int, int], ceil_mode: bool = False) -> tuple[int, int]:
    """A window op's output height and width."""
    return (window_output(shape[0], pads[0], pads[1], kernel[0], strides[0], dilation[0],
                          ceil_mode),
            window_output(shape[1], pads[2], pads[3], kernel[1], strides[1], dilation[1],
                          ceil_mode))


@dataclass(frozen=True)
class PadLayer:
    """A Pad op's `pad2d` layer, which a conv or pool reading it alone takes in as its own
    padding (as people write it, and as the exporter writes the padding modes Conv lacks)."""

    source: Value  # what the Pad pads
    output: str  # the Pad's ONNX output
    pads: tuple[int, int, int, int]  # top, bottom, left, right
    mode: str  # zeros (a constant 0), constant, reflect or replicate
    value: float  # what constant padding holds (0 for zeros)


def _pad_before(t: _Translator, node: Any, value: Value) -> PadLayer | None:
    """The pad2d layer that ``node`` alone reads (as its first input), if there is one."""
    pad = t.pad_layers.get(value.layer)
    if pad is None or pad.output != node.input[0] or t.uses[pad.output] != 1:
        return None
    return pad


def _conv(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    if t.value(node).layout == "pooled":
        return _pooled_conv(t, node, attrs)
    value = _image(t, node, "Conv")
    weight = t.constant(node.input[1])
    bias = t.optional_constant(node, 2)
    filters, per_group, kh, kw = weight.shape
    groups = int(attrs.get("group", 1))
    strides = tuple(attrs.get("strides", [1, 1]))
    dilation = tuple(attrs.get("dilations", [1, 1]))
    pads = _onnx_pads(attrs, value.shape, (kh, kw), strides, dilation)
    auto = _text(attrs.get("auto_pad", "NOTSET"))
    pad_fields: dict[str, Any] = {}
    pad = _pad_before(t, node, value)
    if pad is not None and (pad.mode == "zeros" or not any(pads)):
        # Conv's own pads are zeros: outside a reflect (constant) Pad they would not be
        t.drop_layer(value.layer)
        value, auto = pad.source, "NOTSET"
        pads = tuple(a + b for a, b in zip(pads, pad.pads, strict=True))  # type: ignore
        if pad.mode != "zeros":
            pad_fields["padding_mode"] = pad.mode
        if pad.mode == "constant":
            pad_fields["pad_value"] = pad.value
    fields: dict[str, Any] = {}
    channels = value.shape[2]
    padding = _padding_field(pads, value.shape, (kh, kw), strides, dilation, auto)
    oh, ow = _output_size(value.shape, pads, (kh, kw), strides, dilation)
    if groups == channels and groups > 1 and per_group == 1:
        type_ = "depthwise_conv2d"
        fields["kernel"] = _pair_or_int((kh, kw))
        if filters != channels:
            fields["depth_multiplier"] = filters // channels
    else:
        type_ = "conv2d"
        fields.update(filters=int(filters), kernel=_pair_or_int((kh, kw)))
        if groups != 1:
            fields["groups"] = groups
    if strides != (1, 1):
        fields["strides"] = _pair_or_int(strides)
    if dilation != (1, 1):
        fields["dilation"] = _pair_or_int(dilation)
    if padding is not None:
        fields.update(padding=padding, **pad_fields)
    weights = {"kernel": weight.transpose(2, 3, 1, 0)}
    if bias is None:
        fields["bias"] = False
    else:
        weights["bias"] = bias
    name = t.add(node, type_, [value], weights, **fields)
    return Value(name, (oh, ow, int(filters)), "nchw")


def _pooled_conv(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """A 1x1 Conv of a globally pooled (N, C, 1, 1) tensor (torchvision's squeeze-excite:
    AdaptiveAvgPool2d(1), then Conv2d(C, R, 1)) maps its channels as a dense layer does on
    the (C,) vector the spec holds; its output stays pooled."""
    value = t.value(node)
    weight = t.constant(node.input[1])
    kh, kw = weight.shape[2:]
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    auto = _text(attrs.get("auto_pad", "NOTSET"))
    if (kh, kw) != (1, 1) or int(attrs.get("group", 1)) != 1 or any(pads) or \
            auto not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise _NotExpressible(
            f"a {kh}x{kw} Conv (group {attrs.get('group', 1)}, pads {pads}) of a POOLED "
            "(N, C, 1, 1) tensor: only a 1x1 Conv without groups or pads is translated (as a "
            "dense layer)")
    return _dense_of(t, node, value, weight[:, :, 0, 0].T, t.optional_constant(node, 2),
                     "pooled")


def _flat_input(t: _Translator, node: Any) -> Value:
    value = t.value(node)
    if value.layout not in ("flat", "chw"):
        raise _NotExpressible(f"input of ONNX shape {list(value.onnx_shape)}: specforge's "
                              "dense takes a flat vector (flatten first)")
    return value


def _dense_kernel(value: Value, kernel: np.ndarray) -> np.ndarray:
    """Rows in the spec's order: a CHW-flattened input has its rows moved to HWC."""
    if kernel.shape[0] != value.shape[0]:
        raise _NotExpressible(f"kernel of {kernel.shape[0]} rows for {value.shape[0]} inputs")
    if value.layout != "chw" or value.chw is None:
        return kernel
    c, h, w = value.chw
    return kernel.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)


def _dense(t: _Translator, node: Any, kernel: np.ndarray, bias: np.ndarray | None) -> Value:
    return _dense_of(t, node, _flat_input(t, node), kernel, bias, "flat")


def _dense_of(t: _Translator, node: Any, value: Value, kernel: np.ndarray,
              bias: np.ndarray | None, layout: str) -> Value:
    """A `dense` layer of ``value`` with an (inputs, units) ``kernel``; its output in
    ``layout`` (a flat vector, or still ONNX's pooled (N, C, 1, 1))."""
    weights = {"kernel": _dense_kernel(value, kernel)}
    fields: dict[str, Any] = {"units": int(kernel.shape[1])}
    if bias is None:
        fields["bias"] = False
    else:
        weights["bias"] = np.broadcast_to(bias, (kernel.shape[1],))
    name = t.add(node, "dense", [value], weights, **fields)
    return Value(name, (int(kernel.shape[1]),), layout)


def _gemm(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    for key, wanted in (("alpha", 1.0), ("beta", 1.0), ("transA", 0)):
        if attrs.get(key, wanted) != wanted:
            raise _NotExpressible(f"{key}={attrs[key]} ({key}={wanted} only)")
    kernel = t.constant(node.input[1])
    kernel = kernel.T if attrs.get("transB", 0) else kernel
    bias = t.optional_constant(node, 2)
    if bias is not None and bias.size not in (1, kernel.shape[1]):
        raise _NotExpressible(f"bias of shape {list(bias.shape)}")
    return _dense(t, node, kernel, bias.reshape(-1) if bias is not None else None)


def _matmul(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    kernel = t.constant(node.input[1])
    if kernel.ndim != 2:
        raise _NotExpressible(f"a weight of {kernel.ndim} dims (2 only)")
    value = t.value(node)
    if value.layout == "nhwc":  # torch's nn.Linear on (N, H, W, C): a 1x1 convolution
        return _pointwise_conv(t, node, value, kernel)
    return _dense(t, node, kernel, None)


def _pointwise_conv(t: _Translator, node: Any, value: Value, kernel: np.ndarray) -> Value:
    """A MatMul of an NHWC image by a (C, units) weight, as torchvision's ConvNeXt applies
    nn.Linear to each pixel's channels: a 1x1 `conv2d` without bias (a following Add of a
    (units,) constant becomes its bias); the output stays NHWC."""
    h, w, channels = value.shape
    if kernel.shape[0] != channels:
        raise _NotExpressible(f"kernel of {kernel.shape[0]} rows for {channels} channels")
    units = int(kernel.shape[1])
    name = t.add(node, "conv2d", [value], {"kernel": kernel.reshape(1, 1, channels, units)},
                 filters=units, kernel=1, bias=False)
    return Value(name, (h, w, units), "nhwc")


def _add(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """Two layers' sum (`add`), a MatMul's bias (folded into its dense layer), or a
    constant's (the offset of a `rescaling`)."""
    inputs = [i for i in node.input if i]
    constants = [i for i in inputs if t._is_constant(i)]
    if node.op_type == "Add" and len(constants) == 1 and len(inputs) == 2:
        return _bias_add(t, node, inputs[1 - inputs.index(constants[0])], constants[0])
    if constants:
        raise _NotExpressible("adding a constant: specforge adds layers' outputs only")
    values = [t.value(node, i) for i in range(len(node.input))]
    first = values[0]
    if any(v.layout != first.layout or v.shape != first.shape for v in values):
        raise _NotExpressible("inputs of different shapes or layouts (broadcasting)")
    name = t.add(node, "add", values)
    return Value(name, first.shape, first.layout, first.chw)


def _bias_add(t: _Translator, node: Any, value_name: str, bias_name: str) -> Value:
    value = t.values.get(value_name)
    if value is None:
        raise _Skip if value_name in t.values else _NotExpressible("adds two constants")
    producer = t.layers.get(value.layer)
    bias = t.constant(bias_name)
    # a dense layer's bias, or a pointwise conv's on an NHWC image (the constant's last axis,
    # which broadcasts over the channels there)
    biased = {"dense": ("flat", "chw", "pooled"), "conv2d": ("nhwc",)}
    if (producer is None or value.layout not in biased.get(producer["type"], ())
            or producer.get("bias") is not False or t.uses[value_name] != 1
            or bias.size != value.shape[-1] or bias.shape[-1:] != (value.shape[-1],)):
        return _offset_add(t, node, value, value_name, bias_name)
    del producer["bias"]
    t.out.weights[f"{value.layer}.bias"] = bias.reshape(-1).astype(np.float32)
    return value


def _offset_add(t: _Translator, node: Any, value: Value, value_name: str,
                constant_name: str) -> Value:
    """``x + constant`` (a number or one per channel): the offset of the `rescaling` that
    computes x alone (x * scale + offset), or a `rescaling` of its own with scale 1."""
    return _with_offset(t, node, value, value_name,
                        _channel_constant(t, constant_name, value, "adding"))


def _sub(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """``x - constant``: ``x + (-constant)``, a `rescaling`'s offset (as torch writes a
    normalisation's ``x - mean``)."""
    if not t._is_constant(node.input[1]) or t._is_constant(node.input[0]):
        raise _NotExpressible("specforge subtracts only a constant from a layer's output "
                              "(x - c, a rescaling's offset)")
    value = t.value(node)
    offset = _channel_constant(t, node.input[1], value, "subtracting")
    negated = [-v for v in offset] if isinstance(offset, list) else -offset
    return _with_offset(t, node, value, node.input[0], negated)


def _div(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """``x / constant``: a `rescaling` by ``1 / constant``; after a `rescaling` with an
    offset alone that nothing else reads (torch's ``(x - mean) / std``), that one's scale:
    (x + o) / c = x * (1 / c) + o / c."""
    if not t._is_constant(node.input[1]) or t._is_constant(node.input[0]):
        raise _NotExpressible("specforge divides only a layer's output by a constant "
                              "(x / c, a rescaling)")
    value = t.value(node)
    divisor = np.atleast_1d(np.asarray(_channel_constant(t, node.input[1], value,
                                                         "dividing by"), np.float64))
    if not np.all(divisor):
        raise _NotExpressible("dividing by a constant that holds 0")
    scale = 1 / divisor
    producer = t.layers.get(value.layer)
    if (producer is not None and producer["type"] == "rescaling" and "scale" not in producer
            and t.uses[node.input[0]] == 1):
        producer["scale"] = _number_or_list(scale)
        producer["offset"] = _number_or_list(np.asarray(producer["offset"]) * scale)
        return value
    return _new_rescaling(t, node, value, scale=_number_or_list(scale))


def _number_or_list(values: np.ndarray) -> float | list[float]:
    """One number for a single value, else a list (one per channel)."""
    flat = [float(v) for v in np.asarray(values).reshape(-1)]
    return flat[0] if len(flat) == 1 else flat


def _with_offset(t: _Translator, node: Any, value: Value, value_name: str,
                 offset: float | list[float]) -> Value:
    """``value + offset``: the offset of the `rescaling` with a scale alone that computes
    ``value`` and nothing else reads, or a `rescaling` of its own."""
    producer = t.layers.get(value.layer)
    if (producer is not None and producer["type"] == "rescaling" and "offset" not in producer
            and t.uses[value_name] == 1):
        producer["offset"] = offset
        return value
    if _folds_into_group_norm(t, value, value_name):  # beta + offset
        t.out.weights[f"{value.layer}.beta"] += np.asarray(offset, np.float32)
        return value
    return _new_rescaling(t, node, value, offset=offset)


def _folds_into_group_norm(t: _Translator, value: Value, value_name: str) -> bool:
    """Whether ``value`` is a group_norm's output read by one node alone, so that a
    per-channel scale or offset after it (torch's gamma and beta) goes into its own."""
    producer = t.layers.get(value.layer)
    return producer is not None and producer["type"] == "group_norm" and \
        t.uses[value_name] == 1


def _new_rescaling(t: _Translator, node: Any, value: Value, **fields: Any) -> Value:
    """A `rescaling` layer of ``value`` for ``node``: its value, in ``value``'s layout."""
    name = t.add(node, "rescaling", [value], **fields)
    return Value(name, value.shape, value.layout, value.chw)


#: The axis of ONNX's tensor that holds the channels (features), by layout.
CHANNEL_AXIS = {"nchw": 1, "nhwc": 3, "pooled": 1, "pooled_nhwc": 3, "flat": 1}


def _channel_constant(t: _Translator, name: str, value: Value, what: str
                      ) -> float | list[float]:
    """A constant that broadcasts over ``value`` as a number or one number per channel:
    that number or list (floats as written); anything else cannot be a `rescaling`."""
    array = t.constant(name)
    rank, channels = len(value.onnx_shape), value.shape[-1]
    if array.size == 1 and array.ndim <= rank:  # (more axes would broadcast the value up)
        return float32_value(array.reshape(-1)[0])
    axis = CHANNEL_AXIS.get(value.layout)
    shape = (1,) * (rank - array.ndim) + array.shape if array.ndim <= rank else array.shape
    wanted = tuple(channels if i == axis else 1 for i in range(rank))
    if axis is None or shape != wanted:
        raise _NotExpressible(
            f"{what} a constant of shape {list(array.shape)}: specforge's rescaling takes "
            f"one number or one per channel ({channels})"
            + (" of an image flattened in CHW order" if value.layout == "chw" else ""))
    return [float32_value(v) for v in array.reshape(-1)]


def _batch_norm(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    value = t.value(node)
    if value.layout not in ("nchw", "flat", "pooled"):
        raise _NotExpressible(f"normalising axis 1 of a {value.layout.upper()} tensor: "
                              "specforge normalises the channel axis")
    if attrs.get("training_mode", 0):
        raise _NotExpressible("training_mode=1 (export the model in eval mode)")
    gamma, beta, mean, var = (t.constant(node.input[i]) for i in range(1, 5))
    fields: dict[str, Any] = {}
    momentum, epsilon = float(attrs.get("momentum", 0.9)), float(attrs.get("epsilon", 1e-5))
    if not np.isclose(momentum, 0.9, rtol=0, atol=1e-7):
        fields["running_decay"] = momentum
    if not np.isclose(epsilon, 1e-5, rtol=1e-6, atol=0):
        fields["epsilon"] = epsilon
    weights = {"gamma": gamma, "beta": beta, "moving_mean": mean, "moving_var": var}
    name = t.add(node, "batch_norm", [value], weights, **fields)
    return Value(name, value.shape, value.layout, value.chw)


def _prelu(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """PRelu with one slope, or one per channel (torch's nn.PReLU(C): (C, 1, 1) on an NCHW
    image), as prelu; a slope that differs along any other axis refused."""
    value = t.value(node)
    slope, shape = t.constant(node.input[1]), value.onnx_shape
    try:
        full = np.broadcast_to(slope, shape)
    except ValueError:
        raise _NotExpressible(f"a slope of shape {list(slope.shape)} for a tensor of ONNX "
                              f"shape {list(shape)}") from None
    channels = value.shape[-1]
    if (full == full.flat[0]).all():  # one slope (nn.PReLU()'s default) for every channel
        alpha = np.full(channels, full.flat[0], np.float32)
    else:
        axis = CHANNEL_AXIS.get(value.layout)
        rows = None if axis is None else np.moveaxis(full, axis, -1).reshape(-1, channels)
        if rows is None or not (rows == rows[0]).all():
            raise _NotExpressible(
                f"a slope of shape {list(slope.shape)} that differs along more than the "
                f"channels of a {value.layout.upper()} tensor of ONNX shape {list(shape)}: "
                "specforge's prelu learns one slope per channel")
        alpha = rows[0]
    name = t.add(node, "prelu", [value], {"alpha": alpha})
    return Value(name, value.shape, value.layout, value.chw)


#: The ONNX axis from which LayerNormalization normalises only the channels, by layout.
LAST_AXIS = {"nhwc": 3, "flat": 1, "pooled": 1, "pooled_nhwc": 3}


def _layer_norm(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """LayerNormalization over the channels: from the last axis of an NHWC image (torch's
    channels-last F.layer_norm, moved there by a Transpose) or of features."""
    value = t.value(node)
    rank = len(value.onnx_shape)
    axis = int(attrs.get("axis", -1)) % rank
    if LAST_AXIS.get(value.layout) != axis:
        raise _NotExpressible(
            f"normalising axes {list(range(axis, rank))} of a {value.layout.upper()} tensor "
            f"of ONNX shape {list(value.onnx_shape)}: specforge's layer_norm normalises the "
            "channels alone (move them last with a Transpose first)")
    if any(t.uses.get(o) for o in node.output[1:] if o):
        raise _NotExpressible("its Mean or InvStdDev output is read: specforge's layer_norm "
                              "gives the normalised tensor only")
    channels = value.shape[-1]
    gamma, beta = t.constant(node.input[1]), t.optional_constant(node, 2)
    beta = np.zeros(channels, np.float32) if beta is None else beta
    for what, array in (("Scale", gamma), ("B", beta)):
        if array.size not in (1, channels) or array.ndim > 1:
            raise _NotExpressible(f"{what} of shape {list(array.shape)}: one number per "
                                  f"channel ({channels}) expected")
    gamma, beta = (np.broadcast_to(a.reshape(-1), (channels,)) for a in (gamma, beta))
    name = t.add(node, "layer_norm", [value], {"gamma": gamma, "beta": beta},
                 **_norm_epsilon(attrs))
    return Value(name, value.shape, value.layout, value.chw)


def _norm_epsilon(attrs: dict[str, Any]) -> dict[str, float]:
    """A layer or group norm's `epsilon` field: ONNX's (1e-5 unless given), left out where it
    is specforge's default, 1e-3."""
    epsilon = float32_value(attrs.get("epsilon", 1e-5))
    return {} if np.isclose(epsilon, 1e-3, rtol=1e-6, atol=0) else {"epsilon": epsilon}


def _activation(fn: str | Callable[[dict[str, Any]], dict[str, Any]]
                ) -> Callable[[_Translator, Any, dict[str, Any]], Value]:
    """An element-wise op: fused into the conv or dense layer before it where that layer
    has no activation yet and nothing else reads it; an `activation` layer otherwise."""
    def translate(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
        value = t.value(node)
        config = {"fn": fn} if isinstance(fn, str) else fn(attrs)
        return _emit_activation(t, node, value, config)
    return translate


def _emit_activation(t: _Translator, node: Any, value: Value, config: dict[str, Any],
                     fusable: bool | None = None) -> Value:
    """``config``'s activation of ``value``: the `activation` field of the layer computing
    ``value`` where it may be (``fusable``: nothing else reads ``value``; by default, when
    ``node`` is its only reader), an `activation` layer otherwise."""
    if value.layout == "chw" and config["fn"] == "softmax":
        raise _NotExpressible("softmax over a CHW-flattened image")
    producer = t.layers.get(value.layer)
    if fusable is None:
        fusable = t.single_use(node, value)
    if (producer is not None and producer["type"] in FUSES_ACTIVATION
            and "activation" not in producer and fusable):
        producer["activation"] = config["fn"] if len(config) == 1 else config
        return value
    name = t.add(node, "activation", [value], **config)
    return Value(name, value.shape, value.layout, value.chw)


def _leaky(attrs: dict[str, Any]) -> dict[str, Any]:
    return {"fn": "leaky_relu", "negative_slope": float(attrs.get("alpha", 0.01))}


def _elu(attrs: dict[str, Any]) -> dict[str, Any]:
    alpha = float(attrs.get("alpha", 1.0))
    return {"fn": "elu", **({} if alpha == 1.0 else {"alpha": alpha})}


def _selu(attrs: dict[str, Any]) -> dict[str, Any]:
    if not (np.isclose(attrs.get("alpha", 1.6732632), 1.6732632)
            and np.isclose(attrs.get("gamma", 1.0507010), 1.0507010)):
        raise _NotExpressible("alpha and gamma other than SELU's constants")
    return {"fn": "selu"}


def _hard_sigmoid(attrs: dict[str, Any]) -> dict[str, Any]:
    """max(0, min(1, alpha x + beta)); ONNX's default alpha is 0.2, specforge's 1/6."""
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    if alpha <= 0:
        raise _NotExpressible(f"alpha={alpha:g}: specforge's hard_sigmoid rises (alpha > 0)")
    config: dict[str, Any] = {"fn": "hard_sigmoid"}
    if np.float32(alpha) != np.float32(1 / 6):  # 1/6 as float32: specforge's default
        config["alpha"] = alpha
    if beta != 0.5:
        config["beta"] = beta
    return config


def _gelu(attrs: dict[str, Any]) -> dict[str, Any]:
    approximate = _text(attrs.get("approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise _NotExpressible(f"approximate={approximate!r} (none or tanh)")
    return {"fn": "gelu_tanh" if approximate == "tanh" else "gelu"}


def _clip(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    low, high = attrs.get("min"), attrs.get("max")
    if len(node.input) > 1 and node.input[1]:
        low = t.scalar(node.input[1])
    if len(node.input) > 2 and node.input[2]:
        high = t.scalar(node.input[2])
    if low == 0 and high == 6:
        fn = "relu6"
    elif low == 0 and (high is None or high == np.inf or high >= np.finfo(np.float32).max):
        fn = "relu"
    else:
        raise _NotExpressible(f"min={low}, max={high}: specforge clips as relu (0, inf) or "
                              "relu6 (0, 6) only")
    return _emit_activation(t, node, t.value(node), {"fn": fn})


def _softmax(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    value = t.value(node)
    rank = len(value.onnx_shape)
    axis = int(attrs.get("axis", -1 if t.opset >= 13 else 1))
    axis = axis + rank if axis < 0 else axis
    channel = {"nchw": 1, "nhwc": 3, "pooled": 1, "pooled_nhwc": 3, "flat": 1,
               "chw": 1}[value.layout]
    if axis != channel or (t.opset < 13 and rank == 4 and value.layout != "pooled"):
        raise _NotExpressible(f"axis {attrs.get('axis')}: specforge's softmax is over the "
                              "channels")
    return _emit_activation(t, node, value, {"fn": "softmax"})


#: x * gate(x) as one activation: what exporters write for silu (swish) and hard_swish.
GATED = {"sigmoid": "silu", "hard_sigmoid": "hard_swish"}


def _mul(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """``x * sigmoid(x)`` (and ``x * hard_sigmoid(x)``): the gate's activation layer becomes
    silu (hard_swish); ``x * constant`` (a number or one per channel): a `rescaling`. Any
    other product of two layers' outputs is a `multiply`: of one shape and layout, or an
    NCHW image and a (N, C, 1, 1) pooled gate (squeeze-excite)."""
    constants = [i for i in node.input if t._is_constant(i)]
    if len(constants) == 1 and len(node.input) == 2:
        x_name = node.input[1 - list(node.input).index(constants[0])]
        x = t.value_of(x_name)
        scale = _channel_constant(t, constants[0], x, "multiplying by")
        if _folds_into_group_norm(t, x, x_name):  # gamma * scale, beta * scale
            for param in ("gamma", "beta"):
                t.out.weights[f"{x.layer}.{param}"] *= np.asarray(scale, np.float32)
            return x
        return _new_rescaling(t, node, x, scale=scale)
    if constants:
        raise _NotExpressible("multiplying constants: specforge multiplies layers' outputs")
    values = [t.value(node, i) for i in range(2)]
    for x, gated in (values, values[::-1]):
        gate = t.layers.get(gated.layer)
        if (gate is not None and gate["type"] == "activation" and gate["fn"] in GATED
                and not gate.keys() - {"type", "name", "inputs", "fn"}  # hard_sigmoid's own
                and gate["inputs"] == [x.layer] and gated.layout == x.layout
                and t.uses[node.input[values.index(gated)]] == 1):
            gate["fn"] = GATED[gate["fn"]]
            return gated
    first, second = values
    if first.layout == second.layout and first.shape == second.shape:
        return Value(t.add(node, "multiply", values), first.shape, first.layout, first.chw)
    by_layout = {v.layout: v for v in values}
    gate, image = by_layout.get("pooled"), by_layout.get("nchw")
    if gate is not None and image is not None and gate.shape[0] == image.shape[2]:
        return Value(t.add(node, "multiply", values), image.shape, "nchw")
    raise _NotExpressible(f"a product of ONNX shapes {list(first.onnx_shape)} and "
                          f"{list(second.onnx_shape)}: specforge multiplies equal shapes, or "
                          "an (N, C, H, W) image and an (N, C, 1, 1) gate")


def _dropout(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    value = t.value(node)
    rate = float(attrs.get("ratio", 0.5))
    if len(node.input) > 1 and node.input[1]:
        rate = t.scalar(node.input[1])
    name = t.add(node, "dropout", [value], rate=rate)
    return Value(name, value.shape, value.layout, value.chw)


def _identity(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    return t.value(node)


def _pool(type_: str) -> Callable[[_Translator, Any, dict[str, Any]], Value]:
    def translate(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
        value = _image(t, node, node.op_type)
        kernel = tuple(attrs["kernel_shape"])
        strides = tuple(attrs.get("strides", [1, 1]))
        dilation = tuple(attrs.get("dilations", [1, 1]))
        if attrs.get("storage_order", 0):
            raise _NotExpressible("storage_order=1")
        ceil_mode = bool(attrs.get("ceil_mode", 0))
        pads = _onnx_pads(attrs, value.shape, kernel, strides, dilation)
        auto = _text(attrs.get("auto_pad", "NOTSET"))
        window = (kernel, strides, dilation)
        counted = type_ == "avg_pool2d" and bool(attrs.get("count_include_pad", 0))
        pad_value: float | None = None
        pad = _pad_before(t, node, value)
        if (pad is not None and pad.mode in ("zeros", "constant") and not any(pads)
                and _output_size(pad.source.shape, pad.pads, *window, ceil_mode)
                == _output_size(value.shape, pads, *window, ceil_mode)):
            # the Pad's cells take part in the pool: its pad_value (counted, in an average)
            t.drop_layer(value.layer)
            value, pads, auto, counted = pad.source, pad.pads, "NOTSET", True
            pad_value = pad.value if type_ == "max_pool2d" or pad.value else None
        fields: dict[str, Any] = {}
        if kernel != (2, 2):
            fields["pool"] = _pair_or_int(kernel)
        if strides != kernel:
            fields["strides"] = _pair_or_int(strides)
        if dilation != (1, 1):
            fields["dilation"] = _pair_or_int(dilation)
        padding = _padding_field(pads, value.shape, *window, auto)
        if padding is not None:
            fields["padding"] = padding
        if ceil_mode:
            fields["ceil_mode"] = True
        if pad_value is not None:
            fields["pad_value"] = pad_value
        elif counted and any(pads):  # without padding, nothing to count
            fields["count_include_pad"] = True
        out = _output_size(value.shape, pads, *window, ceil_mode)
        name = t.add(node, type_, [value], **fields)
        return Value(name, (*out, value.shape[2]), "nchw")
    return translate


def _global_pool(type_: str) -> Callable[[_Translator, Any, dict[str, Any]], Value]:
    def translate(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
        value = _image(t, node, node.op_type)
        keep = True
        if node.op_type.startswith("Reduce"):
            axes = attrs.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                axes = t.constant(node.input[1]).tolist()
            if sorted(a % 4 for a in (axes or [])) != [2, 3]:
                raise _NotExpressible(f"axes {axes}: only the spatial axes [2, 3]")
            keep = bool(attrs.get("keepdims", 1))
        name = t.add(node, type_, [value])
        return Value(name, (value.shape[2],), "pooled" if keep else "flat")
    return translate


def _flatten(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    value = t.value(node)
    if int(attrs.get("axis", 1)) != 1:
        raise _NotExpressible(f"axis {attrs['axis']} (1 only: keep the batch axis)")
    return _flattened(t, node, value)


def _flattened(t: _Translator, node: Any, value: Value) -> Value:
    if value.layout in ("flat", "chw"):
        return value
    if value.layout in ("pooled", "pooled_nhwc"):
        return Value(value.layer, value.shape, "flat")
    h, w, c = value.shape
    name = t.add(node, "flatten", [value])
    if value.layout == "nhwc" or (h, w) == (1, 1):
        return Value(name, (h * w * c,), "flat")
    return Value(name, (h * w * c,), "chw", (c, h, w))


def _reshape(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """A reshape to (batch, features): a flatten; the two of a channel shuffle; the two
    reshapes around a group norm's InstanceNormalization (see _grouping); others have no
    specforge equivalent."""
    value = t.value(node)
    target = [int(d) for d in t.constant(node.input[1]).reshape(-1)]
    normalised = t.grouped_norms.get(node.input[0])
    if normalised is not None:
        if target[0] in (-1, 0, 1) and target[1:] == list(normalised.onnx_shape[1:]):
            return normalised
        raise _NotExpressible(f"reshape of a group norm's groups to {target}: only back to "
                              f"ONNX shape {list(normalised.onnx_shape)}")
    if len(target) == 5 or value.layout == "grouped_t":
        return _shuffle_reshape(t, node, value, target)
    if len(target) == 3 and value.layout in ("nchw", "flat"):
        return _grouping(t, node, value, target)
    features = value.shape[0] if len(value.shape) == 1 else int(np.prod(value.shape))
    if len(target) == 2 and target[0] in (-1, 0, 1) and target[1] in (-1, features):
        return _flattened(t, node, value)
    if value.layout in ("flat", "pooled") and len(target) == 4 and \
            target[0] in (-1, 0, 1) and target[1:] in ([-1, 1, 1], [features, 1, 1]):
        return Value(value.layer, value.shape, "pooled")  # a gate, torch's view(b, c, 1, 1)
    raise _NotExpressible(f"reshape to {target}: only to (batch, {features}) (a flatten) "
                          f"or a vector to (batch, {features}, 1, 1)")


#: torch's channel shuffle, as its exporters write it, for the refusals' reason.
SHUFFLE_PATTERN = ("only a channel shuffle reshapes to 5 axes: Reshape to (N, g, C/g, H, W), "
                   "Transpose [0, 2, 1, 3, 4] and Reshape to (N, C, H, W), each read by the "
                   "next alone")


def _shuffle_reshape(t: _Translator, node: Any, value: Value, target: list[int]) -> Value:
    """The first Reshape of a channel shuffle (the whole pattern checked here: it is seen
    as ``grouped``) or its last (the `channel_shuffle` layer)."""
    resolved = _reshaped(target, value.onnx_shape)
    if value.layout == "grouped_t":
        h, w, c = value.shape
        if resolved != (1, c, h, w):
            raise _NotExpressible(f"reshape of ONNX shape {list(value.onnx_shape)} to "
                                  f"{target}: {SHUFFLE_PATTERN}")
        name = t.add(node, "channel_shuffle", [value], groups=value.groups)
        return Value(name, value.shape, "nchw")
    if value.layout != "nchw" or resolved is None or len(resolved) != 5:
        raise _NotExpressible(f"reshape of ONNX shape {list(value.onnx_shape)} to {target}: "
                              f"{SHUFFLE_PATTERN}")
    h, w, c = value.shape
    groups = resolved[1]
    transpose = _only_reader(t, node.output[0], "Transpose")
    if resolved != (1, groups, c // groups, h, w) or transpose is None or \
            list(_attrs(transpose).get("perm", [])) != [0, 2, 1, 3, 4] or \
            _only_reader(t, transpose.output[0], "Reshape") is None:
        raise _NotExpressible(f"reshape of ONNX shape {list(value.onnx_shape)} to {target}: "
                              f"{SHUFFLE_PATTERN}")
    return Value(value.layer, value.shape, "grouped", groups=groups)


def _only_reader(t: _Translator, output: str, op_type: str) -> Any | None:
    """The one node reading ``output`` if it is an ``op_type`` (and not a graph output)."""
    readers = t.readers.get(output, [])
    if t.uses[output] != 1 or len(readers) != 1 or readers[0].op_type != op_type:
        return None
    return readers[0]


def _reshaped(target: list[int], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape a Reshape (allowzero 0) to ``target`` gives ``shape``; None if none."""
    dims = [shape[i] if d == 0 and i < len(shape) else d for i, d in enumerate(target)]
    total, known = int(np.prod(shape)), int(np.prod([d for d in dims if d != -1]))
    if dims.count(-1) > 1 or min(dims, default=0) < -1 or known == 0:
        return None
    if -1 in dims:
        if total % known:
            return None
        dims[dims.index(-1)] = total // known
    return tuple(dims) if int(np.prod(dims)) == total else None


def _split(t: _Translator, node: Any, attrs: dict[str, Any]) -> list[Value | None]:
    """A Split of the channels (torch's ``x.chunk(2, dim=1)``): a `channel_slice` per output
    that something reads (None for the others)."""
    value = t.value(node)
    channels = value.shape[-1]
    axis = int(attrs.get("axis", 0)) % len(value.onnx_shape)
    if axis != CHANNEL_AXIS.get(value.layout):
        raise _NotExpressible(f"a split of axis {axis} of ONNX shape {list(value.onnx_shape)}:"
                              " only the channels")
    given = t.optional_constant(node, 1) if t.opset >= 13 else None
    sizes = [int(n) for n in (given.tolist() if given is not None else attrs.get("split", []))]
    count = len(node.output)
    if not sizes:  # equal pieces; opset 18's num_outputs makes the last one smaller
        piece = -(-channels // count)
        sizes = [min(piece, channels - k * piece) for k in range(count)]
    if len(sizes) != count or sum(sizes) != channels or min(sizes) < 1:
        raise _NotExpressible(f"split sizes {sizes} of {channels} channels into {count} "
                              "outputs: each takes at least one")
    values: list[Value | None] = []
    start = 0
    for output, size in zip(node.output, sizes, strict=True):
        values.append(_channel_slice(t, node, value, start, start + size)
                      if t.uses[output] else None)
        start += size
    return values


def _channel_slice(t: _Translator, node: Any, value: Value, start: int, stop: int) -> Value:
    """Channels [start, stop) of ``value`` as a `channel_slice` layer (the defaults left
    out)."""
    fields = {k: v for k, v, default in (("start", start, 0), ("stop", stop, value.shape[-1]))
              if v != default}
    name = t.add(node, "channel_slice", [value], **fields)
    return Value(name, (*value.shape[:-1], stop - start), value.layout)


def _grouping(t: _Translator, node: Any, value: Value, target: list[int]) -> Value:
    """(N, C, ...) -> (N, groups, -1), read by an InstanceNormalization alone: torch's
    nn.GroupNorm exported (then a Reshape back, a Mul by gamma and an Add of beta)."""
    groups, channels = target[1], value.shape[-1]
    size = int(np.prod(value.onnx_shape[1:])) // max(groups, 1)
    readers = [n.op_type for n in t.graph.node if node.output[0] in n.input]
    if (target[0] not in (-1, 0, 1) or groups < 1 or channels % groups
            or target[2] not in (-1, size) or readers != ["InstanceNormalization"]):
        raise _NotExpressible(f"reshape to {target}: only (batch, groups, -1) read by an "
                              "InstanceNormalization alone (torch's GroupNorm), with groups "
                              f"dividing the {channels} channels")
    t.groupings[node.output[0]] = (value, groups)
    return Value(value.layer, value.shape, "groups")


def _instance_norm(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """InstanceNormalization of an NCHW image (each channel over its pixels: a group_norm
    with a group per channel) or of the (N, groups, -1) reshape of one, or of features
    (torch's nn.GroupNorm): a group_norm, its scale and bias per group repeated for each
    channel of the group."""
    value = t.value(node)
    if value.layout == "groups":
        source, groups = t.groupings[node.input[0]]
    elif value.layout == "nchw":
        source, groups = value, value.shape[-1]
    else:
        raise _NotExpressible(f"normalising a {value.layout.upper()} tensor of ONNX shape "
                              f"{list(value.onnx_shape)}: specforge's group_norm normalises "
                              "groups of an NCHW image's channels, or of features")
    result = _new_group_norm(t, node, source, groups, attrs, per_channel=False)
    if value.layout != "groups":
        return result
    t.grouped_norms[node.output[0]] = result
    return Value(result.layer, source.shape, "groups")


def _group_normalization(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """GroupNormalization of an NCHW image or of features: opset 21's scale and bias per
    channel, opset 18's per group."""
    value = t.value(node)
    groups = int(attrs["num_groups"])
    if value.layout not in ("nchw", "flat") or groups < 1 or value.shape[-1] % groups:
        raise _NotExpressible(f"{groups} groups of a {value.layout.upper()} tensor of ONNX "
                              f"shape {list(value.onnx_shape)}: specforge's group_norm groups "
                              "the channels of an NCHW image or of features, evenly")
    return _new_group_norm(t, node, value, groups, attrs, per_channel=t.opset >= 21)


def _new_group_norm(t: _Translator, node: Any, value: Value, groups: int,
                    attrs: dict[str, Any], per_channel: bool) -> Value:
    """A `group_norm` of ``value`` with ``node``'s epsilon and its inputs 1 and 2 as gamma
    and beta: one number per channel, or (not ``per_channel``) per group, repeated."""
    channels = value.shape[-1]
    expected = channels if per_channel else groups
    weights = {}
    for param, index in (("gamma", 1), ("beta", 2)):
        array = t.constant(node.input[index])
        if array.size != expected:
            raise _NotExpressible(f"input {index} of shape {list(array.shape)}: one number "
                                  f"per {'channel' if per_channel else 'group'} ({expected}) "
                                  "expected")
        weights[param] = np.repeat(array.reshape(-1), channels // expected)
    name = t.add(node, "group_norm", [value], weights, groups=groups, **_norm_epsilon(attrs))
    return Value(name, value.shape, value.layout, value.chw)


def _squeeze(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    value = t.value(node)
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = t.constant(node.input[1]).tolist()
    if value.layout != "pooled" or sorted(a % 4 for a in axes or [2, 3]) != [2, 3]:
        raise _NotExpressible(f"squeezing axes {axes} of ONNX shape {list(value.onnx_shape)}")
    return Value(value.layer, value.shape, "flat")


def _unsqueeze(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """(N, C) -> (N, C, 1, 1): a vector as a pooled gate (for a product with an image)."""
    value = t.value(node)
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = t.constant(node.input[1]).tolist()
    if value.layout not in ("flat", "pooled") or sorted(a % 4 for a in axes or []) != [2, 3]:
        raise _NotExpressible(f"unsqueezing axes {axes} of ONNX shape "
                              f"{list(value.onnx_shape)}: only (N, C) to (N, C, 1, 1)")
    return Value(value.layer, value.shape, "pooled")


def _transpose(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    value = t.value(node)
    perm = list(attrs.get("perm", []))
    if value.layout == "grouped":  # a channel shuffle's (checked by its first Reshape)
        return Value(value.layer, value.shape, "grouped_t", groups=value.groups)
    moves = {("nchw", (0, 2, 3, 1)): "nhwc", ("nhwc", (0, 3, 1, 2)): "nchw",
             ("pooled", (0, 2, 3, 1)): "pooled_nhwc", ("pooled_nhwc", (0, 3, 1, 2)): "pooled"}
    moves |= {(layout, (0, 1, 2, 3)): layout for layout in ("nchw", "nhwc", "pooled",
                                                            "pooled_nhwc")}
    layout = moves.get((value.layout, tuple(perm)))
    if layout is None:
        raise _NotExpressible(f"perm {perm} of ONNX shape {list(value.onnx_shape)}: only "
                              "between NCHW and NHWC")
    return Value(value.layer, value.shape, layout)


def _concat(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    values = [t.value(node, i) for i in range(len(node.input))]
    first = values[0]
    rank = len(first.onnx_shape)
    axis = int(attrs["axis"]) % rank
    channel = {"nchw": 1, "nhwc": 3, "flat": 1, "pooled": 1, "pooled_nhwc": 3,
               "chw": -1}[first.layout]
    if axis != channel or any(v.layout != first.layout for v in values):
        raise _NotExpressible(f"axis {attrs['axis']} of {first.layout.upper()} tensors: "
                              "specforge concatenates channels")
    if any(v.shape[:-1] != first.shape[:-1] for v in values):
        raise _NotExpressible("inputs of different heights or widths")
    name = t.add(node, "concat", values)
    return Value(name, (*first.shape[:-1], sum(v.shape[-1] for v in values)), first.layout)


#: ONNX Pad's modes as specforge's (a constant other than 0 is `constant`).
PAD_MODES = {"constant": "zeros", "reflect": "reflect", "edge": "replicate"}


def _pad(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    value = t.value(node)
    mode = _text(attrs.get("mode", "constant"))
    pads = attrs.get("pads")
    if pads is None:
        pads = t.constant(node.input[1]).tolist()
    constant = t.scalar(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
    if len(node.input) > 3 and node.input[3]:
        raise _NotExpressible("the axes input")
    spatial = {"nchw": (2, 3), "nhwc": (1, 2)}.get(value.layout)
    if spatial is None or len(pads) != 8 or mode not in PAD_MODES:
        raise _NotExpressible(f"mode {mode!r} with pads {pads} on ONNX shape "
                              f"{list(value.onnx_shape)}")
    hy, wx = spatial
    if any(pads[i] for i in range(8) if i % 4 not in (hy, wx)) or min(pads) < 0:
        raise _NotExpressible(f"pads {pads}: only non-negative pads of height and width")
    top, bottom, left, right = pads[hy], pads[hy + 4], pads[wx], pads[wx + 4]
    padding = four_sides((top, bottom, left, right))
    fields: dict[str, Any] = {} if padding == 1 else {"padding": padding}
    spec_mode = "constant" if mode == "constant" and constant != 0 else PAD_MODES[mode]
    if spec_mode != "zeros":
        fields["mode"] = spec_mode
    if spec_mode == "constant":
        fields["pad_value"] = constant
    name = t.add(node, "pad2d", [value], **fields)
    t.pad_layers[name] = PadLayer(value, node.output[0], (top, bottom, left, right),
                                  spec_mode, constant)
    h, w, c = value.shape
    return Value(name, (h + top + bottom, w + left + right, c), value.layout)


def _slice(t: _Translator, node: Any, attrs: dict[str, Any]) -> Value:
    """A Slice of height and width by steps of 1 is a cropping2d, one of the channel axis
    alone a channel_slice; the batch axis may only be kept whole."""
    value = t.value(node)
    spatial = {"nchw": (2, 3), "nhwc": (1, 2)}.get(value.layout)
    channel = CHANNEL_AXIS.get(value.layout)
    shape = value.onnx_shape
    if t.opset < 10:  # starts, ends and axes were attributes then
        starts, ends, axes, steps = (attrs.get(k) for k in ("starts", "ends", "axes", "steps"))
    else:
        starts, ends, axes, steps = (None if a is None else a.tolist() for a in (
            t.optional_constant(node, k) for k in (1, 2, 3, 4)))
    axes = list(range(len(starts))) if axes is None else [a % len(shape) for a in axes]
    if not len(starts) == len(ends) == len(axes):
        raise _NotExpressible(f"starts {starts}, ends {ends} and axes {axes} of different "
                              "lengths")
    if (spatial is None and channel is None) or any(step != 1 for step in steps or []):
        raise _NotExpressible(f"a slice of ONNX shape {list(shape)} by steps {steps}: only "
                              "height and width of an image, or the channels, by steps of 1")
    kept = {a: (0, shape[a]) for a in range(len(shape))}
    cut: list[int] = []
    for axis, start, end in zip(axes, starts, ends, strict=True):
        kept[axis] = (_slice_bound(start, shape[axis]), _slice_bound(end, shape[axis]))
        whole = start == 0 and (end >= 2**31 - 1 if axis == 0 else kept[axis][1] == shape[axis])
        if not whole:
            cut.append(axis)
    if cut and set(cut) == {channel}:
        first, last = kept[channel]
        if last <= first:
            raise _NotExpressible(f"a slice that leaves no channel of ONNX shape {list(shape)}")
        return _channel_slice(t, node, value, first, last)
    for axis in cut:
        if spatial is None or axis not in spatial:
            start, end = kept[axis]
            raise _NotExpressible(f"a slice of axis {axis} ({start}:{end}) of ONNX shape "
                                  f"{list(shape)}: only height and width can be cropped, or "
                                  "the channels alone taken")
    if spatial is None:
        raise _NotExpressible(f"a slice of ONNX shape {list(shape)} that keeps it whole")
    (top, h_end), (left, w_end) = kept[spatial[0]], kept[spatial[1]]
    if h_end <= top or w_end <= left:
        raise _NotExpressible(f"a slice that leaves no pixel of ONNX shape {list(shape)}")
    h, w, _ = value.shape
    value, crops = _crop_before(t, node, value, (top, h - h_end, left, w - w_end))
    name = t.add(node, "cropping2d", [value], cropping=four_sides(crops))
    t.crop_layers[name] = (value, node.output[0], crops)
    h, w, c = value.shape
    return Value(name, (h - crops[0] - crops[1], w - crops[2] - crops[3], c), value.layout)


def _crop_before(t: _Translator, node: Any, value: Value, crops: Pads) -> tuple[Value, Pads]:
    """(what to crop, by how much): a cropping2d read by this Slice alone is taken in (torch
    writes ``x[:, :, 1:-1, 2:]`` as a Slice of each axis), else ``value`` and ``crops``."""
    earlier = t.crop_layers.get(value.layer)
    if earlier is None or earlier[1] != node.input[0] or t.uses[earlier[1]] != 1:
        return value, crops
    t.drop_layer(value.layer)
    source, _, (top, bottom, left, right) = earlier
    return source, (top + crops[0], bottom + crops[1], left + crops[2], right + crops[3])


def _slice_bound(index: int, size: int) -> int:
    """A Slice start or end as ONNX reads it (step 1): from the end when negative, clamped
    to the axis."""
    return min(max(index + size if index < 0 else index, 0), size)


HANDLERS: dict[str, Callable[[_Translator, Any, dict[str, Any]], Any]] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _matmul, "Add": _add, "Sum": _add,
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "PRelu": _prelu, "InstanceNormalization": _instance_norm,
    "GroupNormalization": _group_normalization,
    "Relu": _activation("relu"),
    "LeakyRelu": _activation(_leaky), "Elu": _activation(_elu), "Selu": _activation(_selu),
    "Sigmoid": _activation("sigmoid"), "Tanh": _activation("tanh"),
    "Softplus": _activation("softplus"), "Softsign": _activation("softsign"),
    "HardSigmoid": _activation(_hard_sigmoid), "HardSwish": _activation("hard_swish"),
    "Gelu": _activation(_gelu), "Clip": _clip, "Softmax": _softmax, "Dropout": _dropout,
    "Identity": _identity, "MaxPool": _pool("max_pool2d"),
    "AveragePool": _pool("avg_pool2d"),
    "GlobalAveragePool": _global_pool("global_avg_pool2d"),
    "GlobalMaxPool": _global_pool("global_max_pool2d"),
    "ReduceMean": _global_pool("global_avg_pool2d"),
    "ReduceMax": _global_pool("global_max_pool2d"), "Flatten": _flatten,
    "Reshape": _reshape, "Squeeze": _squeeze, "Transpose": _transpose, "Concat": _concat,
    "Pad": _pad, "Mul": _mul, "Sub": _sub, "Div": _div, "Unsqueeze": _unsqueeze,
    "Slice": _slice, "Split": _split,
}


# --- shape arithmetic on constants (torch's `x.view(x.size(0), -1)`, `F.pad`) -------------------

#: Ops evaluated when all their inputs are constants (shape and pad arithmetic), and the
#: largest constant they may make: they never allocate more than that.
CONSTANT_OPS = frozenset({
    "Constant", "Identity", "Cast", "Shape", "Reshape", "Transpose", "Slice", "Gather",
    "Concat", "Unsqueeze", "Squeeze", "ConstantOfShape", "Add", "Sub", "Mul", "Div", "Neg"})
MAX_CONSTANT_ELEMENTS = 1 << 16


def evaluate_constant_op(t: _Translator, node: Any) -> list[np.ndarray]:
    """``node`` computed by onnx's reference evaluator on small constant inputs."""
    from onnx.reference import ReferenceEvaluator

    if node.op_type == "Constant":
        attrs = {a.name: a for a in node.attribute}
        if "value" not in attrs:
            raise _NotExpressible(f"a Constant given by {', '.join(attrs)}")
        try:
            return [tensor_array(attrs["value"].t, t.folder)]
        except UnsafeModel as exc:
            raise _NotExpressible(str(exc)) from None
    feeds = {name: t.constant(name) for name in node.input if name}
    sizes = [a.size for a in feeds.values()]
    if node.op_type == "ConstantOfShape":
        sizes.append(int(np.prod(feeds[node.input[0]], dtype=object)))
    elif node.op_type in ("Add", "Sub", "Mul", "Div"):
        sizes.append(int(np.prod(np.broadcast_shapes(*(a.shape for a in feeds.values())),
                                 dtype=object)))
    if max(sizes, default=0) > MAX_CONSTANT_ELEMENTS:
        raise _NotExpressible(f"constant arithmetic on more than {MAX_CONSTANT_ELEMENTS:,} "
                              "elements")
    evaluator = ReferenceEvaluator(node, opsets={"": t.opset})
    return [np.asarray(v) for v in evaluator.run(None, feeds)]
