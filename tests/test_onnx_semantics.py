"""The numpy reference against onnxruntime, op by op, for the options whose meaning is
ONNX's: pools' ceil_mode, dilation and count_include_pad, constant pad values, `same_lower`
(SAME_LOWER), hard_sigmoid's alpha and beta, and the depthwise kernel's layout. Each case
is one spec layer and a one-node (or pad-then-op) ONNX model built with onnx.helper, run in
float32 (onnxruntime's CPU AveragePool has no float64)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import yaml

from specforge.compiler import compile_text
from specforge.ir.program import Program
from specforge.reference import reference_forward
from specforge.weights import initial_weights

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

OPSET = 22
RTOL, ATOL = 1e-5, 1e-6  # float32 against float64


def compiled(layer: dict[str, Any], shape: tuple[int, int, int]) -> Program:
    spec = {"name": "onnx-case", "seed": 5,
            "model": {"input": list(shape), "layers": [{**layer, "name": "under_test"},
                                                       {"type": "flatten"},
                                                       {"type": "dense", "units": 2}]},
            "loss": {"type": "cross_entropy"}, "optimizer": {"type": "adam"}}
    return compile_text(yaml.safe_dump(spec), "<onnx case>")


def reference(program: Program, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The layer's output (NCHW, like ONNX's) and its weights."""
    weights = initial_weights(program.graph, program.seed)
    out = reference_forward(program.graph, weights, x)["under_test"]
    return out.transpose(0, 3, 1, 2), weights


def run_onnx(nodes: list[Any], x_nchw: np.ndarray, initializers: list[Any] = ()) -> np.ndarray:
    graph = helper.make_graph(
        nodes, "case", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_nchw.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x_nchw.astype(np.float32)})[0].astype(np.float64)


def onnx_pads(pads: tuple[int, int, int, int]) -> list[int]:
    top, bottom, left, right = pads
    return [top, left, bottom, right]


def pad_node(pads: tuple[int, int, int, int], value: float, out: str = "padded") -> list[Any]:
    """A constant Pad of the spatial axes (NCHW) to ``out``."""
    top, bottom, left, right = pads
    return [helper.make_node("Constant", [], ["pads"], value=helper.make_tensor(
                "p", TensorProto.INT64, [8], [0, 0, top, left, 0, 0, bottom, right])),
            helper.make_node("Constant", [], ["value"], value=helper.make_tensor(
                "v", TensorProto.FLOAT, [], [value])),
            helper.make_node("Pad", ["x", "pads", "value"], [out], mode="constant")]


def sample(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, *shape))


POOLS = [  # (pool, strides, dilation, padding, ceil_mode), on a 7x8 input
    (3, 2, 1, "valid", True),
    (2, 2, 1, {"top": 1, "bottom": 0, "left": 1, "right": 1}, True),
    (3, 2, 2, 1, False),
    (3, 2, 2, 1, True),
    ([2, 3], [3, 2], [2, 1], [1, 2], True),
    (2, 2, 1, "same_lower", False),
    (3, 1, 1, "same_lower", False),
]


def pool_layer(kind: str, pool: Any, strides: Any, dilation: Any, padding: Any,
               ceil_mode: bool, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "pool": pool, "strides": strides, "dilation": dilation,
            "padding": padding, "ceil_mode": ceil_mode, **extra}


def pool_node(op: str, a: Any, inputs: list[str], **extra: Any) -> Any:
    return helper.make_node(op, inputs, ["y"], kernel_shape=list(a["pool"]),
                            strides=list(a["strides"]), dilations=list(a["dilation"]),
                            pads=onnx_pads(a["pads"]), ceil_mode=int(a["ceil_mode"]), **extra)


@pytest.mark.parametrize("options", POOLS, ids=str)
def test_max_pool_is_onnx_max_pool(options):
    program = compiled(pool_layer("max_pool2d", *options), (7, 8, 3))
    x = sample((7, 8, 3))
    expected, _ = reference(program, x)
    a = program.graph["under_test"].attrs
    actual = run_onnx([pool_node("MaxPool", a, ["x"])], x.transpose(0, 3, 1, 2))
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("options", POOLS, ids=str)
def test_avg_pool_is_onnx_average_pool(options, count_include_pad):
    layer = pool_layer("avg_pool2d", *options, count_include_pad=count_include_pad)
    program = compiled(layer, (7, 8, 3))
    x = sample((7, 8, 3))
    expected, _ = reference(program, x)
    a = program.graph["under_test"].attrs
    node = pool_node("AveragePool", a, ["x"], count_include_pad=int(count_include_pad))
    actual = run_onnx([node], x.transpose(0, 3, 1, 2))
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind, op", [("max_pool2d", "MaxPool"), ("avg_pool2d", "AveragePool")])
def test_a_pools_pad_value_is_a_constant_pad_before_it(kind, op):
    """Padded cells holding a value take part like input cells: ONNX's Pad, then the pool."""
    program = compiled(pool_layer(kind, 3, 2, [1, 2], [1, 2], False, pad_value=5.0),
                       (7, 8, 3))
    x = sample((7, 8, 3))
    expected, _ = reference(program, x)
    a = program.graph["under_test"].attrs
    pool = helper.make_node(op, ["padded"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                            dilations=[1, 2])
    actual = run_onnx([*pad_node(a["pads"], 5.0), pool], x.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)
    assert (expected == 5.0).any() if kind == "max_pool2d" else True  # the pad value wins


def onnx_kernel(weights: dict[str, np.ndarray]) -> list[Any]:
    """The layer's kernel (kh, kw, in / groups, filters) and bias as ONNX's W (OIHW) and B."""
    kernel = weights["under_test.kernel"].transpose(3, 2, 0, 1)
    bias = np.random.default_rng(1).normal(size=kernel.shape[0])
    return [helper.make_tensor("W", TensorProto.FLOAT, kernel.shape, kernel.ravel()),
            helper.make_tensor("B", TensorProto.FLOAT, bias.shape, bias)], bias


def reference_with_bias(program: Program, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    weights = initial_weights(program.graph, program.seed)
    weights["under_test.bias"] = bias
    return reference_forward(program.graph, weights, x)["under_test"].transpose(0, 3, 1, 2)


@pytest.mark.parametrize("kernel, strides", [(2, 1), (2, 2), (4, 3), ([3, 2], [2, 1])])
def test_same_lower_is_onnx_same_lower(kernel, strides):
    program = compiled({"type": "conv2d", "filters": 3, "kernel": kernel, "strides": strides,
                        "padding": "same_lower"}, (7, 8, 2))
    x = sample((7, 8, 2))
    weights = initial_weights(program.graph, program.seed)
    tensors, bias = onnx_kernel(weights)
    a = program.graph["under_test"].attrs
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], kernel_shape=list(a["kernel"]),
                            strides=list(a["strides"]), auto_pad="SAME_LOWER")
    expected = reference_with_bias(program, x, bias)
    np.testing.assert_allclose(run_onnx([node], x.transpose(0, 3, 1, 2), tensors), expected,
                               rtol=RTOL, atol=ATOL)
    top, bottom, left, right = a["pads"]
    assert top >= bottom and left >= right and (top, left) != (bottom, right)


@pytest.mark.parametrize("layer", [
    {"type": "conv2d", "filters": 4, "kernel": 3, "strides": 2, "dilation": 2,
     "padding": {"top": 2, "bottom": 1, "left": 0, "right": 3}},
    {"type": "depthwise_conv2d", "kernel": [3, 2], "depth_multiplier": 2, "strides": [1, 2],
     "padding": "same"}], ids=["conv", "depthwise"])
def test_constant_padding_is_onnx_pad_then_conv(layer):
    """Also the depthwise kernel's layout: (kh, kw, 1, C * m), output channel c * m + j,
    which is ONNX's group conv with group = C."""
    program = compiled({**layer, "padding_mode": "constant", "pad_value": -1.5}, (7, 8, 3))
    x = sample((7, 8, 3))
    weights = initial_weights(program.graph, program.seed)
    tensors, bias = onnx_kernel(weights)
    a = program.graph["under_test"].attrs
    conv = helper.make_node("Conv", ["padded", "W", "B"], ["y"], kernel_shape=list(a["kernel"]),
                            strides=list(a["strides"]), dilations=list(a["dilation"]),
                            group=a["groups"])
    actual = run_onnx([*pad_node(a["pads"], -1.5), conv], x.transpose(0, 3, 1, 2), tensors)
    np.testing.assert_allclose(actual, reference_with_bias(program, x, bias), rtol=RTOL,
                               atol=ATOL)


def test_pad2d_constant_is_onnx_pad():
    program = compiled({"type": "pad2d", "padding": {"top": 0, "bottom": 2, "left": 3,
                                                     "right": 1},
                        "mode": "constant", "pad_value": 0.25}, (4, 5, 2))
    x = sample((4, 5, 2))
    expected, _ = reference(program, x)
    actual = run_onnx(pad_node((0, 2, 3, 1), 0.25, "y"), x.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("params", [{}, {"alpha": 0.2}, {"alpha": 0.3, "beta": 0.4}], ids=str)
def test_hard_sigmoid_is_onnx_hard_sigmoid(params):
    program = compiled({"type": "activation", "fn": "hard_sigmoid", **params}, (4, 4, 2))
    x = sample((4, 4, 2)) * 4
    expected, _ = reference(program, x)
    a = program.graph["under_test"].attrs
    node = helper.make_node("HardSigmoid", ["x"], ["y"], alpha=a["alpha"], beta=a["beta"])
    np.testing.assert_allclose(run_onnx([node], x.transpose(0, 3, 1, 2)), expected,
                               rtol=RTOL, atol=ATOL)
    if not params:  # specforge's default is relu6(x + 3) / 6, not ONNX's alpha of 0.2
        np.testing.assert_allclose(expected, np.clip(x + 3, 0, 6).transpose(0, 3, 1, 2) / 6)
