"""Keras models (.keras, .h5) to specforge layers and neutral weights.

The file's configuration is read as plain JSON first: a Lambda layer (Python code inside the
file) is refused before Keras sees the file. The model is then loaded with Keras's safe mode
(``safe_mode=True``, ``compile=False``), which deserialises no code. Keras's layouts are the
neutral ones (NHWC, HWIO kernels), so weights cross without transposes.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

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

#: Layer classes that hold Python code in the file.
CODE_LAYERS = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda"})
#: A config larger than this is not a model description (a .keras archive's config.json).
MAX_CONFIG_BYTES = 64 * 2**20

#: Keras activation names -> specforge's (None: no activation).
ACTIVATIONS: dict[str, Any] = {
    "linear": None, "relu": "relu", "relu6": "relu6", "elu": "elu", "selu": "selu",
    "gelu": "gelu", "silu": "silu", "swish": "silu", "sigmoid": "sigmoid",
    "hard_sigmoid": "hard_sigmoid", "hard_silu": "hard_swish", "hard_swish": "hard_swish",
    "tanh": "tanh", "softplus": "softplus", "softsign": "softsign", "softmax": "softmax",
    # keras.activations.leaky_relu's default slope
    "leaky_relu": {"fn": "leaky_relu", "negative_slope": 0.2},
}


def import_keras(source: Path) -> ImportedModel:
    """Translate a saved Keras model; raises ImportRefused listing what cannot be."""
    config = _raw_config(source)
    code = sorted(_code_layers(config))
    if code:
        raise ImportRefused(source, [
            f"{name!r} ({cls}): a layer of Python code; specforge imports no code, and the "
            "file was not loaded" for name, cls in code], "refused")
    model = _load(source)
    return _Translator(source, model).translate()


def _raw_config(source: Path) -> Any:
    """The model's configuration as JSON, read without Keras, after checking that the file
    declares no more data than it holds (Keras would allocate what it declares)."""
    try:
        import h5py
    except ImportError:
        raise needs_package(source, "keras") from None
    try:
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as archive:
                for info in archive.infolist():
                    if info.file_size > max(MAX_CONFIG_BYTES, 100 * info.compress_size):
                        raise ImportRefused(source, [
                            f"{info.filename!r} would expand from {info.compress_size:,} to "
                            f"{info.file_size:,} bytes: a zip bomb"], "refused")
                if "model.weights.h5" in archive.namelist():
                    with archive.open("model.weights.h5") as f, h5py.File(f, "r") as h5:
                        _check_declared_sizes(source, h5,
                                              archive.getinfo("model.weights.h5").file_size)
                return json.loads(archive.read("config.json"))
        with h5py.File(source, "r") as h5:
            _check_declared_sizes(source, h5, source.stat().st_size)
            text = h5.attrs.get("model_config")
            if text is None:
                raise ImportRefused(source, ["the file holds weights only, no model "
                                             "configuration: save the whole model"])
            return json.loads(text.decode() if isinstance(text, bytes) else text)
    except ImportRefused:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ImportRefused(source, [f"not a readable Keras model file: {exc}"]) from None


def _check_declared_sizes(source: Path, h5: Any, real_size: int) -> None:
    """Refuse an HDF5 file whose arrays declare more bytes than the file has: HDF5 lets a
    dataset of any shape exist without storage, and reading it would allocate it all."""
    import h5py

    declared: list[int] = []
    h5.visititems(lambda _, item: declared.append(math.prod(item.shape) * item.dtype.itemsize)
                  if isinstance(item, h5py.Dataset) and item.shape else None)
    if sum(declared) > real_size:
        raise ImportRefused(source, [f"its arrays declare {sum(declared):,} bytes in "
                                     f"{real_size:,} bytes of file"], "refused")


def _code_layers(config: Any) -> set[tuple[str, str]]:
    """(name, class) of every code-holding layer anywhere in the configuration."""
    found: set[tuple[str, str]] = set()
    if isinstance(config, dict):
        if config.get("class_name") in CODE_LAYERS:
            inner = config.get("config")
            name = inner.get("name", "?") if isinstance(inner, dict) else "?"
            found.add((str(name), str(config["class_name"])))
        for value in config.values():
            found |= _code_layers(value)
    elif isinstance(config, list):
        for value in config:
            found |= _code_layers(value)
    return found


def _load(source: Path) -> Any:
    try:
        import keras
    except ImportError:
        raise needs_package(source, "keras") from None

    try:
        return keras.saving.load_model(source, safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises many types for files it cannot rebuild
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportRefused(source, [f"Keras could not load the model in safe mode: "
                                     f"{first[:300]}"]) from None


def _size(value: Any) -> int | list[int]:
    """Keras's (h, w) as a spec writes it: one int when both are equal."""
    pair = [int(v) for v in (value if isinstance(value, list | tuple) else (value, value))]
    return pair[0] if pair[0] == pair[1] else pair


def _array(variable: Any) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable), np.float32)


class _Translator:
    """Walks a loaded model's layers in order, writing spec layers and weights."""

    def __init__(self, source: Path, model: Any) -> None:
        self.source, self.model = source, model
        self.names = NameTable()
        #: Keras operation (by identity: nested models may repeat names) -> spec layer name
        self.spec_name: dict[int, str] = {}
        self.problems: list[Unsupported] = []
        #: spec layers whose Keras tensor is one pixel, (1, 1, C), where the spec's is (C,):
        #: what global pooling with keepdims=True gives (squeeze-excite heads, MobileNet's top)
        self.pixels: set[str] = set()
        #: the call of each Keras op (``x + 3.0``) in the model: its arguments, numbers too
        self.calls: dict[int, Any] = {}
        self.out = ImportedModel(source, f"Keras {type(model).__name__} model", (1, 1, 1))

    def translate(self) -> ImportedModel:
        if len(self.model.inputs) != 1 or len(self.model.outputs) != 1:
            raise ImportRefused(self.source, [
                f"the model has {len(self.model.inputs)} inputs and {len(self.model.outputs)} "
                "outputs: specforge models have one of each"])
        shape = tuple(self.model.inputs[0].shape)
        if len(shape) != 4 or any(d is None for d in shape[1:]):
            raise ImportRefused(self.source, [
                f"input shape {list(shape)}: specforge needs (batch, height, width, channels) "
                "with fixed height, width and channels"])
        self.out.input_shape = (int(shape[1]), int(shape[2]), int(shape[3]))
        self.out.output = self._translate_model(self.model, "input")
        if self.problems:
            raise ImportRefused(self.source, self.problems)
        return self.out

    def _translate_model(self, model: Any, input_name: str) -> str:
        """Translate ``model``'s layers, its input being the spec layer ``input_name``; the
        spec name of its output. A model used as a layer (a pretrained base inside a
        Sequential, say) is translated in place, layer by layer."""
        import keras

        self.spec_name[id(_source_of(model.inputs[0]))] = input_name
        for op, inputs in self._operations(model):
            reads = [self.spec_name.get(id(i), "input") for i in inputs]
            if isinstance(op, keras.Model):
                if len(op.inputs) != 1 or len(op.outputs) != 1:
                    self._unsupported(op, "a nested model with several inputs or outputs")
                    continue
                self.spec_name[id(op)] = self._translate_model(op, reads[0])
            elif not isinstance(op, keras.layers.Layer):
                self._translate_op(op)
            elif type(op).__name__ == "InputLayer":
                self.spec_name[id(op)] = input_name
            else:
                self._translate_layer(op, reads)
        return self.spec_name.get(id(_source_of(model.outputs[0])), "input")

    def _operations(self, model: Any) -> list[tuple[Any, list[Any]]]:
        """Each operation of ``model`` with the operations it reads."""
        if not hasattr(model, "operations"):  # Sequential: a chain
            chain, previous = [], _source_of(model.inputs[0])
            for op in model.layers:
                chain.append((op, [previous]))
                previous = op
            return chain
        result = []
        for op in model.operations:
            nodes = [n for i, n in enumerate(op._inbound_nodes) if _in_model(op, i, model)]
            if len(nodes) > 1:
                self._unsupported(op, f"shared layer (called {len(nodes)} times): specforge "
                                      "layers own their weights")
                continue
            tensors = nodes[0].input_tensors if nodes else []
            if nodes:
                self.calls[id(op)] = nodes[0]
            result.append((op, [_source_of(t) for t in tensors]))
        return result

    def _translate_op(self, op: Any) -> None:
        """Arithmetic written with keras.ops in a functional model (MobileNetV3's hard
        sigmoid is ``relu6(x + 3.0) * (1 / 6)``): with a number, a `rescaling`; of two
        tensors, `add` or `multiply`, as the layers."""
        kind, call = type(op).__name__, self.calls.get(id(op))
        args = list(call.arguments.args) if call is not None else []
        tensors = [a for a in args if hasattr(a, "_keras_history")]
        numbers = [a for a in args if isinstance(a, int | float) and not isinstance(a, bool)]
        if (kind not in ARITHMETIC or call.arguments.kwargs or len(args) != 2
                or len(tensors) + len(numbers) != 2 or not tensors):
            self._unsupported(op, f"Keras op {kind} in a functional model is not a specforge "
                                  "layer (+, -, *, / of a tensor and a number, or + and * of "
                                  "two tensors, are)")
            return
        inputs = [self.spec_name.get(id(_source_of(x)), "input") for x in tensors]
        on_pixels = [name in self.pixels for name in inputs]
        try:
            if numbers:
                name = self._arithmetic(op, kind, inputs[0], int(tensors[0].shape[-1]),
                                        float(numbers[0]), tensor_first=args[0] is tensors[0])
            elif any(on_pixels) and not all(on_pixels) and kind != "Multiply":
                raise _NotExpressible("a (1, 1, channels) pixel and an image: only a product "
                                      "(a squeeze-excite gate) is translated")
            elif kind == "Multiply":
                name = _product(self, op, inputs, [tuple(x.shape)[1:] for x in tensors])
            elif kind == "Add" and tensors[0].shape == tensors[1].shape:
                name = self.add(op, "add", inputs)
            else:
                raise _NotExpressible(f"{kind} of shapes {list(tensors[0].shape)} and "
                                      f"{list(tensors[1].shape)}: only + and * of two tensors "
                                      "of one shape (or a gate) are translated")
        except _NotExpressible as exc:
            self._unsupported(op, str(exc))
            return
        if all(on_pixels):
            self.pixels.add(name)

    def _arithmetic(self, op: Any, kind: str, x: str, channels: int, number: float,
                    tensor_first: bool) -> str:
        """``x + c``, ``x - c``, ``x * c`` or ``x / c`` (or ``c + x``, ``c * x``) as a
        `rescaling`."""
        if kind in ("Subtract", "TrueDivide") and not tensor_first:
            raise _NotExpressible(f"{kind} of a number by a tensor: x * scale + offset "
                                  "cannot say it")
        if kind == "TrueDivide" and number == 0:
            raise _NotExpressible("division by 0")
        if kind == "Add":
            scale, offset = 1.0, number
        elif kind == "Subtract":
            scale, offset = 1.0, -number
        else:
            scale, offset = (number if kind == "Multiply" else 1.0 / number), 0.0
        return _rescale(self, op, [x], scale, offset, channels)

    def _unsupported(self, op: Any, reason: str) -> None:
        self.problems.append(Unsupported(op.name, type(op).__name__, reason))

    def _translate_layer(self, op: Any, inputs: list[str]) -> None:
        kind = type(op).__name__
        handler = HANDLERS.get(kind)
        if handler is None:
            self._unsupported(op, f"layer type {kind} has no specforge equivalent")
            return
        config = op.get_config()
        fmt = config.get("data_format")
        if fmt not in (None, "channels_last"):
            self._unsupported(op, f"data_format {fmt!r}: specforge is channels_last")
            return
        on_pixels = [name in self.pixels for name in inputs]
        mixed = any(on_pixels) and not all(on_pixels)
        if any(on_pixels) and (kind not in ON_PIXELS or (mixed and kind not in GATES)):
            self._unsupported(op, "a (1, 1, channels) tensor from keepdims=True pooling is "
                                  f"read here; specforge holds it as (channels,), and {kind} "
                                  "is not translated on it")
            return
        try:
            handler(self, op, config, inputs)
        except _NotExpressible as exc:
            self._unsupported(op, str(exc))
            return
        if all(on_pixels) and kind in ELEMENTWISE:
            self.pixels.add(self.spec_name[id(op)])

    def add(self, op: Any, type_: str, inputs: list[str], weights: dict[str, Any] | None = None,
            *, suffix: str = "", **fields: Any) -> str:
        """Write one spec layer for ``op`` (with ``suffix`` when ``op`` needs several)."""
        name = self.names.claim(op.name + suffix)
        self.out.layers.append(layer(type_, name, inputs, **fields))
        for param, value in (weights or {}).items():
            self.out.weights[f"{name}.{param}"] = _array(value)
        self.spec_name[id(op)] = name
        return name


def _source_of(tensor: Any) -> Any:
    """The operation that computed a Keras tensor."""
    return tensor._keras_history.operation


def _in_model(op: Any, index: int, model: Any) -> bool:
    """Whether ``op``'s call number ``index`` belongs to ``model``'s graph (a nested model
    also has the calls that use it as a layer). Keras keys its graph's calls this way."""
    keys = getattr(model, "_nodes", None)
    return keys is None or f"{id(op)}_ib-{index}" in keys


class _NotExpressible(Exception):
    """An attribute of a layer that specforge cannot express (the message says which)."""


def _activation(config: dict[str, Any]) -> dict[str, Any]:
    """`activation: ...` for a layer's config, or nothing for linear."""
    value = config.get("activation", "linear")
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise _NotExpressible(f"activation {value!r} is not one of specforge's")
    fn = ACTIVATIONS[value]
    return {} if fn is None else {"activation": fn}


def _common_conv(config: dict[str, Any]) -> dict[str, Any]:
    padding = config.get("padding", "valid")
    if padding not in ("valid", "same"):
        raise _NotExpressible(f"padding {padding!r} (valid or same only)")
    fields: dict[str, Any] = {}
    if _size(config.get("strides", 1)) != 1:
        fields["strides"] = _size(config["strides"])
    if _size(config.get("dilation_rate", 1)) != 1:
        fields["dilation"] = _size(config["dilation_rate"])
    if padding != "valid":
        fields["padding"] = padding
    if not config.get("use_bias", True):
        fields["bias"] = False
    return fields


def _conv2d(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    if inputs[0] in t.pixels:
        _pixel_conv2d(t, op, config, inputs)
        return
    fields = {"filters": int(config["filters"]), "kernel": _size(config["kernel_size"])}
    if int(config.get("groups", 1)) != 1:
        fields["groups"] = int(config["groups"])
    values = op.get_weights()
    weights = {"kernel": values[0], **({"bias": values[1]} if len(values) > 1 else {})}
    t.add(op, "conv2d", inputs, weights, **fields, **_common_conv(config), **_activation(config))


def _pixel_conv2d(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]
                  ) -> None:
    """A 1x1 convolution of one pixel, (1, 1, C): a dense layer on (C,), as specforge holds
    the pixel (the squeeze-excite and MobileNet heads that follow keepdims pooling)."""
    if _size(config["kernel_size"]) != 1 or int(config.get("groups", 1)) != 1:
        raise _NotExpressible(f"kernel {config['kernel_size']} with groups "
                              f"{config.get('groups', 1)} on a (1, 1, channels) tensor: only a "
                              "1x1 convolution without groups is translated (as a dense layer)")
    values = op.get_weights()
    kernel = np.asarray(values[0]).reshape(values[0].shape[2], values[0].shape[3])
    weights = {"kernel": kernel, **({"bias": values[1]} if len(values) > 1 else {})}
    extra = {} if config.get("use_bias", True) else {"bias": False}
    name = t.add(op, "dense", inputs, weights, units=int(config["filters"]), **extra,
                 **_activation(config))
    t.pixels.add(name)


def _depthwise_kernel(kernel: np.ndarray) -> np.ndarray:
    """Keras's (kh, kw, channels, multiplier) -> neutral grouped (kh, kw, 1, channels *
    multiplier): output channel c * multiplier + m, as Keras orders them."""
    kh, kw, channels, multiplier = kernel.shape
    return np.asarray(kernel).reshape(kh, kw, 1, channels * multiplier)


def _depthwise(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    fields: dict[str, Any] = {"kernel": _size(config["kernel_size"])}
    if int(config.get("depth_multiplier", 1)) != 1:
        fields["depth_multiplier"] = int(config["depth_multiplier"])
    values = op.get_weights()
    weights = {"kernel": _depthwise_kernel(values[0]),
               **({"bias": values[1]} if len(values) > 1 else {})}
    t.add(op, "depthwise_conv2d", inputs, weights, **fields, **_common_conv(config),
          **_activation(config))


def _separable(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    """A depthwise convolution (no bias) then a 1x1 convolution, as Keras computes it."""
    values = op.get_weights()
    common = _common_conv(config)
    common.pop("bias", None)
    fields: dict[str, Any] = {"kernel": _size(config["kernel_size"]), **common, "bias": False}
    if int(config.get("depth_multiplier", 1)) != 1:
        fields["depth_multiplier"] = int(config["depth_multiplier"])
    first = t.add(op, "depthwise_conv2d", inputs, {"kernel": _depthwise_kernel(values[0])},
                  suffix="_depthwise", **fields)
    pointwise = {"kernel": values[1], **({"bias": values[2]} if len(values) > 2 else {})}
    extra = {} if config.get("use_bias", True) else {"bias": False}
    t.add(op, "conv2d", [first], pointwise, filters=int(config["filters"]), kernel=1, **extra,
          **_activation(config))


def _dense(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    pixel = inputs[0] in t.pixels  # on (1, 1, C) Keras's dense maps C, as on (C,)
    rank = len(op.input.shape)
    if rank == 4 and not pixel:
        _pointwise_dense(t, op, config, inputs)
        return
    if rank != 2 and not pixel:
        raise _NotExpressible(f"input of shape {list(op.input.shape)}: specforge's dense "
                              "takes a flat vector (add a Flatten first)")
    values = op.get_weights()
    weights = {"kernel": values[0], **({"bias": values[1]} if len(values) > 1 else {})}
    extra = {} if config.get("use_bias", True) else {"bias": False}
    name = t.add(op, "dense", inputs, weights, units=int(config["units"]), **extra,
                 **_activation(config))
    if pixel:
        t.pixels.add(name)


def _pointwise_dense(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]
                     ) -> None:
    """A Dense layer on an image maps each pixel's channels (ConvNeXt's pointwise layers):
    a 1x1 convolution, its (C, units) kernel as (1, 1, C, units)."""
    values = op.get_weights()
    kernel = np.asarray(values[0])
    weights = {"kernel": kernel.reshape(1, 1, *kernel.shape),
               **({"bias": values[1]} if len(values) > 1 else {})}
    extra = {} if config.get("use_bias", True) else {"bias": False}
    t.add(op, "conv2d", inputs, weights, filters=int(config["units"]), kernel=1, **extra,
          **_activation(config))


def _pool(type_: str) -> Callable[[_Translator, Any, dict[str, Any], list[str]], None]:
    def translate(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
        pool = _size(config["pool_size"])
        fields: dict[str, Any] = {} if pool == 2 else {"pool": pool}
        strides = config.get("strides")
        if strides is not None and _size(strides) != pool:
            fields["strides"] = _size(strides)
        if config.get("padding", "valid") != "valid":
            fields["padding"] = config["padding"]
        t.add(op, type_, inputs, **fields)
    return translate


def _global_pool(type_: str) -> Callable[[_Translator, Any, dict[str, Any], list[str]], None]:
    def translate(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
        name = t.add(op, type_, inputs)
        if config.get("keepdims"):  # (1, 1, C) in Keras: held as (C,), see _Translator.pixels
            t.pixels.add(name)
    return translate


def _flatten(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    if inputs[0] in t.pixels:  # (1, 1, C) -> (C,): specforge holds it as (C,) already
        t.spec_name[id(op)] = inputs[0]
        return
    t.add(op, "flatten", inputs)


def _reshape(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    """Between one pixel, (1, 1, C), and a vector, (C,), as Keras models write around
    keepdims pooling and 1x1 convolutions: nothing to do, specforge holds both as (C,)."""
    before, after = tuple(op.input.shape)[1:], tuple(op.output.shape)[1:]
    channels = before[-1]
    if {before, after} <= {(channels,), (1, 1, channels)}:
        t.spec_name[id(op)] = inputs[0]
        if after == (1, 1, channels):
            t.pixels.add(inputs[0])
        return
    raise _NotExpressible(f"reshape {list(before)} -> {list(after)}: only between (C,) and "
                          "(1, 1, C) is translated")


def _check_last_axis(op: Any, config: dict[str, Any], what: str) -> None:
    """A normalisation's ``axis`` (an int or a list of one) must be the last, the channels'."""
    axis = config.get("axis", -1)
    axis = axis[0] if isinstance(axis, list | tuple) and len(axis) == 1 else axis
    if axis not in (-1, len(op.input.shape) - 1):
        raise _NotExpressible(f"axis {config.get('axis')!r}: {what} the last (channel) axis")


def _batch_norm(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    _check_last_axis(op, config, "specforge normalises")
    for unsupported in ("renorm", "synchronized"):
        if config.get(unsupported):
            raise _NotExpressible(f"{unsupported}=True is not supported")
    fields: dict[str, Any] = {}
    if float(config["momentum"]) != 0.9:
        fields["running_decay"] = float(config["momentum"])
    if float(config["epsilon"]) != 1e-5:
        fields["epsilon"] = float(config["epsilon"])
    for flag in ("scale", "center"):
        if not config.get(flag, True):
            fields[flag] = False
    values = list(op.get_weights())
    weights: dict[str, Any] = {}
    if config.get("scale", True):
        weights["gamma"] = values.pop(0)
    if config.get("center", True):
        weights["beta"] = values.pop(0)
    weights["moving_mean"], weights["moving_var"] = values
    t.add(op, "batch_norm", inputs, weights, **fields)


def _layer_norm(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    """LayerNormalization over the last (channel) axis, with its gamma and beta."""
    if config.get("rms_scaling"):
        raise _NotExpressible("rms_scaling=True: specforge's layer_norm subtracts the mean")
    _learned_norm(t, op, config, inputs, "layer_norm", "normalises only")


def _group_norm(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    """GroupNormalization over the last (channel) axis (groups -1: one per channel), with
    its gamma and beta."""
    channels = tuple(op.input.shape)[-1]
    groups = channels if int(config["groups"]) == -1 else int(config["groups"])
    _learned_norm(t, op, config, inputs, "group_norm", "groups", groups=groups)


def _learned_norm(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str],
                  type_: str, verb: str, **fields: Any) -> None:
    """A normalisation over the last axis that learns both gamma and beta (`layer_norm`,
    `group_norm`), its epsilon written only where it is not specforge's 1e-3."""
    _check_last_axis(op, config, f"specforge's {type_} {verb}")
    for flag in ("scale", "center"):
        if not config.get(flag, True):
            raise _NotExpressible(f"{flag}=False: specforge's {type_} learns both gamma "
                                  "and beta")
    gamma, beta = op.get_weights()
    epsilon = float(config["epsilon"])
    t.add(op, type_, inputs, {"gamma": gamma, "beta": beta}, **fields,
          **({} if epsilon == 1e-3 else {"epsilon": epsilon}))


def _prelu(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    """PReLU with one slope per channel (``shared_axes=[1, 2]`` on an image; a vector's or a
    pixel's own per feature) or one for all; a slope per pixel (Keras's default on an
    image) refused."""
    (alpha,) = op.get_weights()
    channels = tuple(op.input.shape)[-1]
    if alpha.size == 1:  # shared by every axis
        alpha = np.full(channels, alpha.reshape(-1)[0], alpha.dtype)
    elif alpha.size != channels or alpha.shape[-1] != channels:
        raise _NotExpressible(
            f"alpha of shape {list(alpha.shape)} (shared_axes {config.get('shared_axes')!r}):"
            " specforge's prelu learns one slope per channel, shared by height and width "
            "(PReLU(shared_axes=[1, 2]))")
    t.add(op, "prelu", inputs, {"alpha": alpha.reshape(channels)})


def _layer_scale(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    """keras.applications' LayerScale (ConvNeXt's), ``x * gamma`` with a learned gamma per
    channel: a depthwise 1x1 convolution without bias, one product per element as Keras's,
    learned as Keras learns gamma. Another library's layer of this name is not assumed to
    compute the same."""
    if not type(op).__module__.startswith("keras."):
        raise _NotExpressible(f"a LayerScale of {type(op).__module__}, not keras.applications'")
    if len(op.input.shape) != 4 or inputs[0] in t.pixels:
        raise _NotExpressible(f"input of shape {list(op.input.shape)}: only an image's "
                              "channels are scaled (as a depthwise 1x1 convolution)")
    (gamma,) = op.get_weights()
    t.add(op, "depthwise_conv2d", inputs, {"kernel": np.asarray(gamma).reshape(1, 1, 1, -1)},
          kernel=1, bias=False)


def _dropout(spatial: bool) -> Callable[[_Translator, Any, dict[str, Any], list[str]], None]:
    def translate(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
        unit = "spatial" if spatial else _noise_unit(op, config.get("noise_shape"))
        if unit == "spatial" and inputs[0] in t.pixels:
            unit = None  # on one pixel, dropping whole channels is what plain dropout of (C,) does
        extra = {unit: True} if unit else {}
        t.add(op, "dropout", inputs, rate=float(config["rate"]), **extra)
    return translate


def _noise_unit(op: Any, noise_shape: Any) -> str | None:
    """What Dropout's ``noise_shape`` drops, as the spec's dropout says it: None for single
    values (no noise_shape, or the input's shape), ``spatial`` for whole channels of an image
    (1 over height and width: SpatialDropout2D's masks), ``per_sample`` for whole samples (1
    on every axis but the batch: EfficientNet's drop-connect). Other shapes (a mask shared by
    the batch, rows dropped) are refused."""
    if noise_shape is None:
        return None
    shape = tuple(op.input.shape)
    if len(noise_shape) != len(shape) or noise_shape[0] is not None:
        _refuse_noise(noise_shape)
    noise = tuple(s if n is None else n for n, s in zip(noise_shape, shape, strict=True))
    if noise == shape:  # one mask value per value: plain dropout
        return None
    if all(n == 1 for n in noise[1:]):
        return "per_sample"
    if len(shape) == 4 and noise[1:3] == (1, 1) and noise[3] == shape[3]:
        return "spatial"
    _refuse_noise(noise_shape)


def _refuse_noise(noise_shape: Any) -> NoReturn:
    raise _NotExpressible(f"noise_shape {list(noise_shape)}: specforge's dropout drops single "
                          "values, (spatial) whole channels or (per_sample) whole samples, not "
                          "rows, nor one mask for the whole batch")


def _activation_layer(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]
                      ) -> None:
    fn = _activation(config).get("activation", "linear")
    fields = fn if isinstance(fn, dict) else {"fn": fn}
    t.add(op, "activation", inputs, **fields)


def _relu(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    top, slope = config.get("max_value"), float(config.get("negative_slope") or 0.0)
    if float(config.get("threshold") or 0.0) != 0.0:
        raise _NotExpressible(f"threshold {config['threshold']} (0 only)")
    if top is not None and (float(top) != 6.0 or slope != 0.0):
        raise _NotExpressible(f"max_value {top} with negative_slope {slope} (relu6 is "
                              "max_value 6, slope 0)")
    if top is not None:
        t.add(op, "activation", inputs, fn="relu6")
    elif slope:
        t.add(op, "activation", inputs, fn="leaky_relu", negative_slope=slope)
    else:
        t.add(op, "activation", inputs, fn="relu")


def _leaky_relu(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    slope = config.get("negative_slope", config.get("alpha", 0.3))
    t.add(op, "activation", inputs, fn="leaky_relu", negative_slope=float(slope))


def _elu(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    alpha = float(config.get("alpha", 1.0))
    t.add(op, "activation", inputs, fn="elu", **({} if alpha == 1.0 else {"alpha": alpha}))


def _softmax(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    axis = config.get("axis", -1)
    if axis not in (-1, len(op.output.shape) - 1):
        raise _NotExpressible(f"axis {axis}: specforge's softmax is over the last axis")
    t.add(op, "activation", inputs, fn="softmax")


def _merge(type_: str) -> Callable[[_Translator, Any, dict[str, Any], list[str]], None]:
    def translate(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
        axis = config.get("axis", -1)
        if type_ == "concat" and axis not in (-1, len(op.output.shape) - 1):
            raise _NotExpressible(f"axis {axis}: specforge concatenates the last axis")
        t.add(op, type_, inputs)
    return translate


def _multiply(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    _product(t, op, inputs, [tuple(x.shape)[1:] for x in op.input])


def _product(t: _Translator, op: Any, inputs: list[str], shapes: list[tuple[Any, ...]]
             ) -> str:
    """Two tensors of one shape, or a channel gate, (C,) or one pixel (1, 1, C), and an
    image (H, W, C): the squeeze-excite product. Its spec name."""
    if len(shapes) != 2:
        raise _NotExpressible(f"a product of {len(shapes)} tensors: specforge's multiply "
                              "takes two")
    held = [s[-1:] if name in t.pixels else s for name, s in zip(inputs, shapes, strict=True)]
    gate, image = sorted(held, key=len)
    if gate != image and (len(gate), len(image), gate[-1]) != (1, 3, image[-1]):
        raise _NotExpressible(f"shapes {list(shapes[0])} and {list(shapes[1])}: specforge "
                              "multiplies equal shapes, or a (C,) or (1, 1, C) gate and an "
                              "(H, W, C) image")
    name = t.add(op, "multiply", inputs)
    if len(image) == 1 and max(len(s) for s in shapes) == 3:  # a gate of a pixel: a pixel
        t.pixels.add(name)
    return name


def _zero_padding(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    (top, bottom), (left, right) = config["padding"]
    padding = four_sides((top, bottom, left, right))
    t.add(op, "pad2d", inputs, **({} if padding == 1 else {"padding": padding}))


def _cropping(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    """Keras's Cropping2D slices as cropping2d does; its config holds
    ((top, bottom), (left, right))."""
    (top, bottom), (left, right) = config["cropping"]
    t.add(op, "cropping2d", inputs, cropping=four_sides((top, bottom, left, right)))


def _per_channel(value: Any, channels: int, what: str) -> float | list[float]:
    """A value that broadcasts over a (..., channels) tensor as one number or one number
    per channel (the last axis): that number or list; anything else is refused."""
    array = np.asarray(value, np.float64)
    if array.size == 1:
        return float(array.reshape(-1)[0])
    if array.shape[-1:] != (channels,) or array.size != channels:
        raise _NotExpressible(f"{what} of shape {list(array.shape)}: specforge's rescaling "
                              f"takes one number or one per channel ({channels})")
    return [float(v) for v in array.reshape(-1)]


def _rescale(t: _Translator, op: Any, inputs: list[str], scale: Any, offset: Any,
             channels: int, suffix: str = "") -> str:
    """A `rescaling` layer, x * scale + offset (of an input with ``channels`` channels),
    leaving out the defaults (1 and 0); its spec name."""
    fields = {k: v for k, v, default in (
        ("scale", _per_channel(scale, channels, "scale"), 1.0),
        ("offset", _per_channel(offset, channels, "offset"), 0.0)) if v != default}
    return t.add(op, "rescaling", inputs, suffix=suffix, **fields)


def _rescaling(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]) -> None:
    """Keras's Rescaling computes x * scale + offset, as specforge's rescaling."""
    _rescale(t, op, inputs, _array_of(op.scale), _array_of(op.offset),
             int(op.input.shape[-1]))


def _normalization(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]
                   ) -> None:
    """(x - mean) / max(sqrt(variance), epsilon), Keras's Normalization with its mean and
    variance fixed (given or adapted): x * scale + offset with scale = 1 / that divisor and
    offset = -mean * scale."""
    import keras

    if config.get("invert"):
        raise _NotExpressible("invert=True (x * std + mean): only the normalisation itself "
                              "is translated")
    rank = len(op.input.shape)
    axes = tuple(a + rank if a < 0 else a for a in op.axis)
    mean, variance = _array_of(op.mean), _array_of(op.variance)
    if axes not in ((), (rank - 1,)) and mean.size != 1:
        raise _NotExpressible(f"axis {config.get('axis')!r}: specforge's rescaling is per "
                              "channel (the last axis) or one number")
    scale = 1.0 / np.maximum(np.sqrt(variance), keras.backend.epsilon())
    _rescale(t, op, inputs, scale, -mean * scale, int(op.input.shape[-1]))


def _custom_scale(t: _Translator, op: Any, config: dict[str, Any], inputs: list[str]
                  ) -> None:
    """keras.applications.InceptionResNetV2's residual, ``inputs[0] + inputs[1] * scale``:
    a `rescaling` of the residual branch, then an `add`."""
    shapes = [tuple(x.shape)[1:] for x in op.input]
    if len(shapes) != 2 or shapes[0] != shapes[1]:
        raise _NotExpressible(f"inputs of shapes {[list(s) for s in shapes]}: translated for "
                              "two of one shape (x + r * scale)")
    scale = _array_of(config["scale"])
    residual = _rescale(t, op, [inputs[1]], scale, 0.0, int(shapes[1][-1]), suffix="_scaled")
    t.add(op, "add", [inputs[0], residual])


def _array_of(value: Any) -> np.ndarray:
    """A layer attribute (a number, a list, a tensor or variable) as a float64 array."""
    import keras

    if isinstance(value, int | float | list | tuple):
        return np.asarray(value, np.float64)
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64)


HANDLERS: dict[str, Callable[[_Translator, Any, dict[str, Any], list[str]], None]] = {
    "Conv2D": _conv2d, "DepthwiseConv2D": _depthwise, "SeparableConv2D": _separable,
    "Dense": _dense, "MaxPooling2D": _pool("max_pool2d"),
    "AveragePooling2D": _pool("avg_pool2d"),
    "GlobalAveragePooling2D": _global_pool("global_avg_pool2d"),
    "GlobalMaxPooling2D": _global_pool("global_max_pool2d"), "Flatten": _flatten,
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "Dropout": _dropout(False),
    "SpatialDropout2D": _dropout(True), "Activation": _activation_layer, "ReLU": _relu,
    "LeakyReLU": _leaky_relu, "ELU": _elu, "Softmax": _softmax, "Add": _merge("add"),
    "Concatenate": _merge("concat"), "ZeroPadding2D": _zero_padding, "Reshape": _reshape,
    "Rescaling": _rescaling, "Normalization": _normalization, "Multiply": _multiply,
    "CustomScaleLayer": _custom_scale, "LayerScale": _layer_scale, "Cropping2D": _cropping,
    "PReLU": _prelu, "GroupNormalization": _group_norm,
}
#: Layers that compute each channel of a pixel as they do a (C,) vector's (their output is a
#: pixel when their inputs are).
ELEMENTWISE = {"BatchNormalization", "LayerNormalization", "Dropout", "SpatialDropout2D",
               "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Add", "Concatenate",
               "Rescaling", "Normalization", "Multiply", "PReLU", "GroupNormalization"}
#: keras.ops arithmetic translated in a functional model (see _Translator._translate_op).
ARITHMETIC = {"Add", "Subtract", "Multiply", "TrueDivide"}
#: Layers translated on one pixel (see _Translator.pixels).
ON_PIXELS = ELEMENTWISE | {"Conv2D", "Flatten", "Reshape", "Dense"}
#: Layers that also take one pixel and an image together (a squeeze-excite gate and the
#: image it scales); their handlers say whether the result is a pixel.
GATES = {"Multiply"}
