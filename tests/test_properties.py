"""Property tests: random valid specs compile to graphs whose shapes, pads, parameter counts
and FLOPs match an independent recomputation from the spec itself.

Each example builds a spec as a Python dict while tracking the expected result of every layer
with the textbook formulas below (no specforge code is used for the expectations), writes it
as YAML and compiles it with :func:`specforge.compiler.compile_spec`. Only layers that fit
their input are emitted, so every generated spec is valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specforge.compiler import compile_spec

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)

Shape = tuple[int, ...]
Pads = tuple[int, int, int, int]

#: Other spellings of a layer type -> the op it stands for, which also prefixes generated
#: names (`avg_pool2d_1`, `concat_1`, ...).
CANONICAL = {
    "max_pooling2d": "max_pool2d", "average_pooling2d": "avg_pool2d",
    "zero_padding2d": "pad2d", "batch_normalization": "batch_norm", "linear": "dense",
    "layer_normalization": "layer_norm", "group_normalization": "group_norm",
    "concatenate": "concat", "global_average_pooling2d": "global_avg_pool2d",
    "global_max_pooling2d": "global_max_pool2d",
}
ACTIVATIONS = ["linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "gelu_tanh",
               "silu", "sigmoid", "hard_sigmoid", "hard_swish", "tanh", "softplus", "softsign"]


# --- the independent shape model --------------------------------------------------------------

def window_out(n: int, before: int, after: int, k: int, s: int, d: int = 1) -> int:
    """out = floor((n + pad_before + pad_after - ((k - 1) * d + 1)) / s) + 1."""
    return math.floor((n + before + after - ((k - 1) * d + 1)) / s) + 1


def same_split(n: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """`same`: out = ceil(n / s); total = max((out-1)*s + (k-1)*d + 1 - n, 0), before = //2."""
    out = math.ceil(n / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


def as_pair(value: int | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def spec_pads(padding: Any, h: int, w: int, kernel: tuple[int, int],
              strides: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> Pads:
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        return (*same_split(h, kernel[0], strides[0], dilation[0]),
                *same_split(w, kernel[1], strides[1], dilation[1]))
    if isinstance(padding, int):
        return (padding, padding, padding, padding)
    if isinstance(padding, list):
        return (padding[0], padding[0], padding[1], padding[1])
    return (padding.get("top", 0), padding.get("bottom", 0), padding.get("left", 0),
            padding.get("right", 0))


def numel(shape: Shape) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class NodeExp:
    """What one IR node should be; ``suffix`` is appended to its layer instance's name."""

    suffix: str
    op: str
    shape: Shape
    trainable: int = 0
    frozen: int = 0
    flops: int = 0
    pads: Pads | None = None
    keeps_hw: bool = False  # `same` padding with stride 1
    fn: str | None = None


def kind_of(layer: dict[str, Any]) -> str:
    return CANONICAL.get(layer["type"], layer["type"])


def fused_activation(layer: dict[str, Any], shape: Shape) -> list[NodeExp]:
    act = layer.get("activation")
    if act is None:
        return []
    fn = act if isinstance(act, str) else act["fn"]
    return [NodeExp("." + fn, "activation", shape, flops=numel(shape), fn=fn)]


def model_layer(layer: dict[str, Any], shapes: list[Shape]) -> list[NodeExp] | None:
    """The nodes one instance of ``layer`` lowers to, or None when it does not fit."""
    kind, shape = kind_of(layer), shapes[0]
    if kind in ("conv2d", "depthwise_conv2d"):
        h, w, c = shape
        (kh, kw), (sh, sw) = as_pair(layer["kernel"]), as_pair(layer.get("strides", 1))
        dh, dw = as_pair(layer.get("dilation", 1))
        if kind == "conv2d":
            filters, groups = layer["filters"], layer.get("groups", 1)
        else:
            filters, groups = c * layer.get("depth_multiplier", 1), c
        if c % groups or filters % groups:
            return None
        padding = layer.get("padding", "valid")
        pads = spec_pads(padding, h, w, (kh, kw), (sh, sw), (dh, dw))
        oh, ow = window_out(h, *pads[:2], kh, sh, dh), window_out(w, *pads[2:], kw, sw, dw)
        if oh < 1 or ow < 1:
            return None
        if layer.get("padding_mode") == "reflect" and (max(pads[:2]) >= h
                                                        or max(pads[2:]) >= w):
            return None
        bias = layer.get("bias", True)
        cin = c // groups
        params = kh * kw * cin * filters + (filters if bias else 0)
        flops = 2 * oh * ow * filters * kh * kw * cin + (oh * ow * filters if bias else 0)
        out = (oh, ow, filters)
        main = NodeExp("", "conv2d", out, params, 0, flops, pads,
                       padding == "same" and (sh, sw) == (1, 1))
        return [main, *fused_activation(layer, out)]
    if kind in ("max_pool2d", "avg_pool2d"):
        h, w, c = shape
        ph, pw = as_pair(layer.get("pool", 2))
        sh, sw = as_pair(layer["strides"]) if layer.get("strides") is not None else (ph, pw)
        padding = layer.get("padding", "valid")
        pads = spec_pads(padding, h, w, (ph, pw), (sh, sw))
        oh, ow = window_out(h, *pads[:2], ph, sh), window_out(w, *pads[2:], pw, sw)
        if oh < 1 or ow < 1 or max(pads[:2]) >= ph or max(pads[2:]) >= pw:
            return None
        return [NodeExp("", kind, (oh, ow, c), flops=oh * ow * c * ph * pw, pads=pads,
                        keeps_hw=padding == "same" and (sh, sw) == (1, 1))]
    if kind == "pad2d":
        h, w, c = shape
        pads = spec_pads(layer.get("padding", 1), h, w, (1, 1), (1, 1))
        if layer.get("mode") == "reflect" and (max(pads[:2]) >= h or max(pads[2:]) >= w):
            return None
        return [NodeExp("", "pad2d", (h + pads[0] + pads[1], w + pads[2] + pads[3], c),
                        pads=pads)]
    if kind == "cropping2d":  # the crops (top, bottom, left, right) must leave a pixel
        h, w, c = shape
        crops = spec_pads(layer["cropping"], h, w, (1, 1), (1, 1))
        if crops[0] + crops[1] >= h or crops[2] + crops[3] >= w:
            return None
        return [NodeExp("", "cropping2d", (h - crops[0] - crops[1], w - crops[2] - crops[3], c))]
    if kind == "channel_slice":  # [start, stop) of the channels, stop by default all
        start, stop = layer.get("start", 0), layer.get("stop", shape[-1])
        if not start < stop <= shape[-1]:
            return None
        return [NodeExp("", "channel_slice", (*shape[:-1], stop - start))]
    if kind == "channel_shuffle":  # an image whose channels the groups divide
        if len(shape) != 3 or shape[-1] % layer["groups"]:
            return None
        return [NodeExp("", "channel_shuffle", shape)]
    if kind == "batch_norm":
        c = shape[-1]
        learned = c * (int(layer.get("scale", True)) + int(layer.get("center", True)))
        return [NodeExp("", "batch_norm", shape, learned, 2 * c, 4 * numel(shape))]
    if kind == "layer_norm":  # gamma and beta; a mean, a variance and the affine per element
        return [NodeExp("", "layer_norm", shape, 2 * shape[-1], 0, 7 * numel(shape))]
    if kind == "group_norm":  # gamma and beta; as layer_norm's, per group
        return [NodeExp("", "group_norm", shape, 2 * shape[-1], 0, 7 * numel(shape))]
    if kind == "prelu":  # a slope per channel; a compare, a product and a select per element
        return [NodeExp("", "prelu", shape, shape[-1], 0, 3 * numel(shape))]
    if kind == "dropout":
        return [NodeExp("", "dropout", shape, flops=numel(shape))]
    if kind == "activation":
        return [NodeExp("", "activation", shape, flops=numel(shape), fn=layer["fn"])]
    if kind == "rescaling":
        for value in (layer.get("scale"), layer.get("offset")):
            if isinstance(value, list) and len(value) != shape[-1]:
                return None
        return [NodeExp("", "rescaling", shape, flops=2 * numel(shape))]
    if kind == "flatten":
        return [NodeExp("", "flatten", (numel(shape),))]
    if kind in ("global_avg_pool2d", "global_max_pool2d"):
        h, w, c = shape
        return [NodeExp("", kind, (c,), flops=h * w * c)]
    if kind == "dense":
        (n,), units, bias = shape, layer["units"], layer.get("bias", True)
        out = (units,)
        main = NodeExp("", "dense", out, n * units + (units if bias else 0), 0,
                       2 * n * units + (units if bias else 0))
        return [main, *fused_activation(layer, out)]
    if kind == "add":
        if len(set(shapes)) != 1:
            return None
        return [NodeExp("", "add", shape, flops=numel(shape) * (len(shapes) - 1))]
    if kind == "multiply":  # equal shapes, or a (C,) gate of an (H, W, C) image
        small, large = sorted(shapes, key=len)
        if small != large and (len(small), len(large), small[-1]) != (1, 3, large[-1]):
            return None
        return [NodeExp("", "multiply", large, flops=numel(large))]
    if kind == "concat":
        if len({s[:-1] for s in shapes}) != 1:
            return None
        return [NodeExp("", "concat", (*shape[:-1], sum(s[-1] for s in shapes)))]
    raise AssertionError(f"no model for {kind}")


# --- building random valid specs --------------------------------------------------------------

@dataclass
class PlacedLayer:
    layer: dict[str, Any]
    sources: list[int]  # indices of the layers read; -1 is the model input
    instances: list[list[NodeExp]]  # one node list per repeat


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Builder:
    """A spec under construction, with the expected nodes of every layer placed so far."""

    def __init__(self, draw: Any, input_shape: Shape) -> None:
        self.draw = draw
        self.input_shape = input_shape
        self.placed: list[PlacedLayer] = []

    def __repr__(self) -> str:  # hypothesis shows the falsifying spec as YAML
        return "\n" + yaml.safe_dump(self.spec(0), sort_keys=False)

    # -- bookkeeping

    @property
    def tip(self) -> int:
        return len(self.placed) - 1

    def shape_of(self, index: int) -> Shape:
        return self.input_shape if index < 0 else self.placed[index].instances[-1][-1].shape

    @property
    def shape(self) -> Shape:
        return self.shape_of(self.tip)

    def ref(self, index: int) -> str:
        """The name by which later layers read layer ``index`` (named on demand)."""
        if index < 0:
            return "input"
        return self.placed[index].layer.setdefault("name", f"n{index}")

    def emit(self, layer: dict[str, Any], sources: list[int] | None = None) -> bool:
        """Place ``layer`` if it fits its input(s); ``sources`` None: the previous layer."""
        explicit = sources is not None
        sources = sources if sources is not None else [self.tip]
        if self.draw(st.booleans()):
            layer["name"] = f"n{len(self.placed)}"
        shapes = [self.shape_of(i) for i in sources]
        instances = []
        for _ in range(layer.get("repeat", 1)):
            nodes = model_layer(layer, shapes)
            if nodes is None:
                return False
            instances.append(nodes)
            shapes = [nodes[-1].shape]
        if explicit:
            refs = [self.ref(i) for i in sources]
            layer["inputs"] = refs[0] if len(refs) == 1 and self.draw(st.booleans()) else refs
        self.placed.append(PlacedLayer(layer, sources, instances))
        return True

    def emit_or_same(self, layer: dict[str, Any], sources: list[int] | None = None) -> None:
        """Place ``layer``; when it does not fit, with `same` zero padding (always fits)."""
        if not self.emit(layer, sources):
            layer.update(padding="same")
            layer.pop("padding_mode", None)
            layer.pop("name", None)
            assert self.emit(layer, sources), layer

    # -- drawing values

    def int_or_pair(self, low: int, high: int, key: str, layer: dict[str, Any]) -> None:
        """Set ``layer[key]`` to an int, an [h, w] pair, or leave it at its default of 1."""
        form = self.draw(st.sampled_from(["int", "pair", "default"] if low == 1
                                         else ["int", "pair"]))
        if form == "int":
            layer[key] = self.draw(st.integers(low, high))
        elif form == "pair":
            layer[key] = [self.draw(st.integers(low, high)), self.draw(st.integers(low, high))]

    def padding(self, max_h: int, max_w: int) -> Any:
        form = self.draw(st.sampled_from(["valid", "same", "int", "pair", "sides", None]))
        if form == "int":
            return self.draw(st.integers(0, min(max_h, max_w)))
        if form == "pair":
            return [self.draw(st.integers(0, max_h)), self.draw(st.integers(0, max_w))]
        if form == "sides":
            limits = {"top": max_h, "bottom": max_h, "left": max_w, "right": max_w}
            keys = self.draw(st.lists(st.sampled_from(list(limits)), unique=True))
            return {k: self.draw(st.integers(0, limits[k])) for k in keys}
        return form

    def activation(self) -> Any:
        fn = self.draw(st.sampled_from(ACTIVATIONS))
        if fn == "leaky_relu" and self.draw(st.booleans()):
            return {"fn": fn, "negative_slope": 0.2}
        if fn == "elu" and self.draw(st.booleans()):
            return {"fn": fn, "alpha": 0.5}
        return fn

    def conv(self, *, filters: int | None = None, keep_hw: bool = False,
             stride: int | None = None) -> dict[str, Any]:
        """A conv2d (or depthwise) layer for the current tip's channels."""
        d, c = self.draw, self.shape[2]
        layer: dict[str, Any] = {"type": "conv2d"}
        self.int_or_pair(1, 5, "kernel", layer)
        layer.setdefault("kernel", 1)
        self.int_or_pair(1, 2, "dilation", layer)
        if keep_hw or stride is not None:
            layer["padding"] = "same"
            if stride is not None:
                layer["strides"] = stride
        else:
            self.int_or_pair(1, 3, "strides", layer)
            padding = self.padding(3, 3)
            if padding is not None:
                layer["padding"] = padding
        if filters is None and d(st.integers(0, 5)) == 0:
            layer["type"] = "depthwise_conv2d"
            if d(st.booleans()):
                layer["depth_multiplier"] = d(st.integers(1, 2))
        else:
            groups = d(st.sampled_from([g for g in divisors(c)
                                        if filters is None or filters % g == 0]))
            if groups > 1 or d(st.booleans()):
                layer["groups"] = groups
            layer["filters"] = filters if filters is not None else groups * d(st.integers(1, 4))
        mode = d(st.sampled_from(["zeros", "reflect", "replicate", None]))
        if mode is not None:
            layer["padding_mode"] = mode
        if d(st.booleans()):
            layer["bias"] = d(st.booleans())
        if d(st.booleans()):
            layer["activation"] = self.activation()
        if not keep_hw and stride is None and d(st.integers(0, 4)) == 0:
            layer["repeat"] = d(st.integers(2, 3))
        return layer

    def pool(self, *, keep_hw: bool = False) -> dict[str, Any]:
        d = self.draw
        kind = d(st.sampled_from(["max_pool2d", "max_pooling2d", "avg_pool2d",
                                  "average_pooling2d"]))
        layer: dict[str, Any] = {"type": kind}
        ph, pw = d(st.integers(1, 3)), d(st.integers(1, 3))
        if ph == pw and d(st.booleans()):
            if ph != 2 or d(st.booleans()):  # 2 is the default
                layer["pool"] = ph
        else:
            layer["pool"] = [ph, pw]
        if keep_hw:
            layer.update(strides=1, padding="same")
            return layer
        strides = d(st.sampled_from(["int", "pair", None]))
        if strides == "int":
            layer["strides"] = d(st.integers(1, 3))
        elif strides == "pair":
            layer["strides"] = [d(st.integers(1, 3)), d(st.integers(1, 3))]
        ph, pw = as_pair(layer.get("pool", 2))
        padding = self.padding(ph - 1, pw - 1)
        if padding is not None:
            layer["padding"] = padding
        return layer

    def shape_keeping(self) -> dict[str, Any]:
        """A layer that keeps the tip's shape exactly (for residual branches)."""
        d, c = self.draw, self.shape[2]
        kind = d(st.sampled_from(["conv", "batch_norm", "layer_norm", "group_norm", "prelu",
                                  "activation", "dropout", "rescaling"]))
        if kind == "conv":
            return self.conv(filters=c, keep_hw=True)
        if kind == "batch_norm":
            return self.batch_norm()
        if kind == "layer_norm":
            return self.layer_norm()
        if kind == "prelu":
            return self.prelu()
        if kind == "group_norm":
            return self.group_norm()
        if kind == "rescaling":
            return self.rescaling()
        if kind == "activation":
            return self.activation_layer()
        unit = d(st.sampled_from([{}, {"spatial": True}, {"per_sample": True}]))
        return {"type": "dropout", "rate": d(st.sampled_from([0.0, 0.1, 0.5])), **unit}

    def batch_norm(self) -> dict[str, Any]:
        d = self.draw
        layer: dict[str, Any] = {"type": d(st.sampled_from(["batch_norm",
                                                            "batch_normalization"]))}
        for key in ("scale", "center"):
            if d(st.booleans()):
                layer[key] = d(st.booleans())
        return layer

    def layer_norm(self) -> dict[str, Any]:
        d = self.draw
        layer: dict[str, Any] = {"type": d(st.sampled_from(["layer_norm",
                                                            "layer_normalization"]))}
        if d(st.booleans()):
            layer["epsilon"] = d(st.sampled_from([1e-5, 0.01]))
        return layer

    def group_norm(self) -> dict[str, Any]:
        """A group norm whose groups divide the tip's channels (its last axis)."""
        d, c = self.draw, self.shape[-1]
        layer: dict[str, Any] = {
            "type": d(st.sampled_from(["group_norm", "group_normalization"])),
            "groups": d(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))}
        if d(st.booleans()):
            layer["epsilon"] = d(st.sampled_from([1e-5, 0.01]))
        return layer

    def prelu(self) -> dict[str, Any]:
        layer: dict[str, Any] = {"type": "prelu"}
        if self.draw(st.booleans()):
            layer["alpha_init"] = self.draw(st.sampled_from([0.0, -0.5]))
        return layer

    def rescaling(self) -> dict[str, Any]:
        """A rescaling whose scale and offset are each left out, a number, or one number
        per channel of the tip."""
        layer: dict[str, Any] = {"type": "rescaling"}
        for key in ("scale", "offset"):
            form = self.draw(st.sampled_from(["default", "number", "list"]))
            if form == "number":
                layer[key] = self.draw(st.sampled_from([0.5, -2.0, 3]))
            elif form == "list":
                layer[key] = [float(i % 3) - 0.5 for i in range(self.shape[-1])]
        return layer

    def activation_layer(self) -> dict[str, Any]:
        act = self.activation()
        return {"type": "activation", **(act if isinstance(act, dict) else {"fn": act})}

    # -- steps on an image tip

    def step_conv(self) -> None:
        self.emit_or_same(self.conv())

    def step_pool(self) -> None:
        self.emit_or_same(self.pool())

    def step_pad(self) -> None:
        d = self.draw
        layer: dict[str, Any] = {"type": d(st.sampled_from(["pad2d", "zero_padding2d"]))}
        padding = self.padding(2, 2)
        if padding not in ("valid", "same", None):
            layer["padding"] = padding
        mode = d(st.sampled_from(["zeros", "reflect", "replicate", None]))
        if mode is not None:
            layer["mode"] = mode
        if not self.emit(layer):
            layer["mode"] = "replicate"
            assert self.emit(layer), layer

    def step_crop(self) -> None:
        """A crop in any of its forms; where it would leave no pixel, one that keeps it all
        (a crop of 0)."""
        cropping = self.padding(3, 3)
        if cropping in ("valid", "same", None):
            cropping = self.draw(st.integers(0, 1))
        if not self.emit({"type": "cropping2d", "cropping": cropping}):
            assert self.emit({"type": "cropping2d", "cropping": 0})

    def step_channels(self) -> None:
        """A shuffle of groups that divide the channels, or a slice of them (its start and
        stop each drawn or left at the default)."""
        d, channels = self.draw, self.shape[-1]
        if d(st.booleans()):
            divisors = [g for g in range(1, channels + 1) if channels % g == 0]
            assert self.emit({"type": "channel_shuffle", "groups": d(st.sampled_from(divisors))})
            return
        layer: dict[str, Any] = {"type": "channel_slice"}
        start = d(st.integers(0, channels - 1))
        if start or d(st.booleans()):
            layer["start"] = start
        if d(st.booleans()):
            layer["stop"] = d(st.integers(start + 1, channels))
        assert self.emit(layer)

    def step_simple(self) -> None:
        self.emit_or_same(self.shape_keeping())

    def step_residual(self) -> None:
        """conv branch + identity shortcut, or strided branch + strided 1x1 projection."""
        d, src = self.draw, self.tip
        if d(st.booleans()):
            for _ in range(d(st.integers(1, 3))):
                self.emit_or_same(self.shape_keeping())
            inputs = [self.tip, src]
        else:
            filters, stride = d(st.integers(1, 8)), d(st.integers(1, 3))
            self.emit_or_same(self.conv(filters=filters, stride=stride))
            if d(st.booleans()):
                assert self.emit(self.batch_norm())
            branch = self.tip
            assert self.emit({"type": "conv2d", "filters": filters, "kernel": 1,
                              "strides": stride, "bias": d(st.booleans())}, [src])
            inputs = [branch, self.tip]
        assert self.emit({"type": "add"}, d(st.permutations(inputs)))

    def step_concat(self) -> None:
        """Concatenate a branch with the shortcut and possibly a second branch."""
        d, src = self.draw, self.tip
        self.emit_or_same(self.conv(filters=d(st.integers(1, 6)), keep_hw=True))
        if d(st.booleans()):
            self.emit_or_same(self.shape_keeping())
        inputs = [self.tip, src]
        if d(st.booleans()):
            second = (self.pool(keep_hw=True) if d(st.booleans())
                      else {"type": "conv2d", "filters": d(st.integers(1, 4)), "kernel": 1})
            assert self.emit(second, [src])
            inputs.append(self.tip)
        kind = d(st.sampled_from(["concat", "concatenate"]))
        assert self.emit({"type": kind}, d(st.permutations(inputs)))

    def step_gate(self) -> None:
        """A squeeze-and-excitation gate (global pooling, a dense layer, a product with the
        image), or the image times itself."""
        d, src = self.draw, self.tip
        if d(st.booleans()):
            assert self.emit({"type": "multiply"}, [src, src])
            return
        assert self.emit({"type": d(st.sampled_from(["global_avg_pool2d", "global_max_pool2d"]))})
        assert self.emit({"type": "dense", "units": self.shape_of(src)[-1],
                          "activation": "sigmoid"})
        assert self.emit({"type": "multiply"}, d(st.permutations([src, self.tip])))

    # -- the result

    def spec(self, seed: int) -> dict[str, Any]:
        return {
            "name": "random",
            "seed": seed,
            "model": {"input": list(self.input_shape),
                      "layers": [p.layer for p in self.placed]},
            "loss": {"type": "cross_entropy"},
            "optimizer": {"type": "adam"},
        }

    def expected(self) -> list[tuple[str, NodeExp, tuple[str, ...]]]:
        """(name, expectation, inputs) of every node but `input`, in spec order."""
        counters: dict[str, int] = {}
        out_name = {-1: "input"}
        result = []
        for i, p in enumerate(self.placed):
            base = p.layer.get("name")
            if base is None:
                kind = kind_of(p.layer)
                counters[kind] = counters.get(kind, 0) + 1
                base = f"{kind}_{counters[kind]}"
            inputs = tuple(out_name[j] for j in p.sources)
            for r, nodes in enumerate(p.instances):
                instance = base if len(p.instances) == 1 else f"{base}.{r}"
                for node in nodes:
                    result.append((instance + node.suffix, node, inputs))
                    inputs = (instance + node.suffix,)
            out_name[i] = inputs[0]
        return result


@st.composite
def random_models(draw: Any) -> Builder:
    shape = (draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(1, 8)))
    b = Builder(draw, shape)
    steps = [b.step_conv, b.step_conv, b.step_pool, b.step_pool, b.step_pad, b.step_crop,
             b.step_channels, b.step_simple, b.step_residual, b.step_concat, b.step_gate]
    for _ in range(draw(st.integers(0, 6))):
        draw(st.sampled_from(steps))()
    end = draw(st.sampled_from(["flatten", "global_avg_pool2d", "global_average_pooling2d",
                                "global_max_pool2d", "global_max_pooling2d"]))
    assert b.emit({"type": end})
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["dense", "batch_norm", "layer_norm", "group_norm", "prelu",
                                     "dropout", "activation", "rescaling"]))
        if kind == "dense":
            layer: dict[str, Any] = {"type": draw(st.sampled_from(["dense", "linear"])),
                                     "units": draw(st.integers(1, 16))}
            if draw(st.booleans()):
                layer["activation"] = b.activation()
        elif kind == "batch_norm":
            layer = b.batch_norm()
        elif kind == "layer_norm":
            layer = b.layer_norm()
        elif kind == "prelu":
            layer = b.prelu()
        elif kind == "group_norm":
            layer = b.group_norm()
        elif kind == "dropout":
            layer = {"type": "dropout", "rate": 0.25}
        elif kind == "rescaling":
            layer = b.rescaling()
        else:
            layer = b.activation_layer()
        assert b.emit(layer)
    final: dict[str, Any] = {"type": "dense", "units": draw(st.integers(2, 10))}
    ending = draw(st.sampled_from(["logits", "fused_softmax", "softmax_layer", "relu"]))
    if ending == "fused_softmax":
        final["activation"] = "softmax"
    elif ending == "relu":
        final["activation"] = "relu"
    assert b.emit(final)
    if ending == "softmax_layer":
        assert b.emit({"type": "activation", "fn": "softmax"})
    return b


def write(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


# --- the properties ---------------------------------------------------------------------------

@settings(SETTINGS, max_examples=300)
@given(model=random_models(), seed=st.integers(0, 2**32 - 1))
def test_random_specs_match_independent_shape_param_and_flop_model(
        tmp_path: Path, model: Builder, seed: int) -> None:
    path = write(tmp_path, model.spec(seed))
    program = compile_spec(path)
    graph = program.graph
    expected = model.expected()

    # A final softmax is folded into the loss: the graph ends at the logits.
    name, last, inputs = expected[-1]
    if last.op == "activation" and last.fn == "softmax":
        expected, output = expected[:-1], inputs[0]
    else:
        output = name
    assert graph.output == output
    assert program.output_activation == "softmax"
    assert program.loss.from_logits is True
    assert program.loss.classes == graph[output].shape[0]

    # (e) unique names, inputs before their readers, exactly the expected nodes.
    names = [n.name for n in graph]
    assert names[0] == "input" and graph.input.shape == model.input_shape
    assert len(names) == len(set(names))
    seen: set[str] = set()
    for node in graph:
        assert set(node.inputs) <= seen, (node.name, node.inputs)
        seen.add(node.name)
    assert sorted(names[1:]) == sorted(n for n, _, _ in expected)

    # (a) shapes and pads, (c) parameters, (f) FLOPs, node by node.
    for name, exp, inputs in expected:
        node = graph[name]
        assert (node.op, node.inputs, node.shape) == (exp.op, inputs, exp.shape), name
        if exp.pads is not None:
            assert tuple(node.attrs["pads"]) == exp.pads, name
        trainable = sum(p.size for p in node.params if p.trainable)
        frozen = sum(p.size for p in node.params if not p.trainable)
        assert (trainable, frozen) == (exp.trainable, exp.frozen), name
        assert node.flops == exp.flops >= 0, name
        if exp.keeps_hw:  # (b) `same` with stride 1 keeps height and width
            assert node.shape[:2] == graph[node.inputs[0]].shape[:2], name
    assert graph.trainable_params == sum(e.trainable for _, e, _ in expected)
    assert graph.non_trainable_params == sum(e.frozen for _, e, _ in expected)
    assert graph.flops == sum(e.flops for _, e, _ in expected)

    # (d) compiling is deterministic.
    assert compile_spec(path).to_json() == program.to_json()


@SETTINGS
@given(h=st.integers(1, 40), w=st.integers(1, 40), c=st.integers(1, 8),
       kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       pool=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_same_padding_with_stride_one_keeps_height_and_width(
        tmp_path: Path, h: int, w: int, c: int, kernel: tuple[int, int],
        dilation: tuple[int, int], pool: tuple[int, int]) -> None:
    layers = [
        {"type": "conv2d", "name": "conv", "filters": 3, "kernel": list(kernel),
         "dilation": list(dilation), "padding": "same"},
        {"type": "depthwise_conv2d", "name": "dw", "kernel": list(kernel), "strides": 1,
         "padding": "same", "padding_mode": "replicate"},
        {"type": "max_pool2d", "name": "maxp", "pool": list(pool), "strides": 1,
         "padding": "same"},
        {"type": "avg_pool2d", "name": "avgp", "pool": list(pool), "strides": 1,
         "padding": "same"},
        {"type": "flatten"},
        {"type": "dense", "units": 2},
    ]
    spec = {"model": {"input": [h, w, c], "layers": layers},
            "loss": {"type": "cross_entropy"}, "optimizer": {"type": "sgd"}}
    graph = compile_spec(write(tmp_path, spec)).graph
    assert graph["conv"].shape == (h, w, 3)
    for name in ("dw", "maxp", "avgp"):
        assert graph[name].shape == (h, w, 3), name
    assert graph["flatten_1"].shape == (h * w * 3,)
