"""ONNX import rules that the round trip (tests/test_round_trip.py) does not reach alone:
GELU as torch.onnx.export and ONNX's own Gelu op write it, look-alikes refused, and where a
Pad stays a layer of its own rather than the next layer's padding."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from specforge.compiler import compile_spec
from specforge.conformance.compare import Tolerance, difference
from specforge.importers import ImportRefused, import_model
from specforge.importers.write import write_import
from specforge.reference.forward import reference_forward
from specforge.weights import load_weights
from tests.test_import import (
    assert_matches,
    export_torch,
    images,
    imported,
    onnx_model,
    torch_output,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
helper = onnx.helper


def constant(name: str, value: Any) -> Any:
    return onnx.numpy_helper.from_array(np.asarray(value, np.float32), name)


def kinds(path: Path) -> list[tuple[str, Any]]:
    """Each imported layer's type and activation (or fn)."""
    return [(item["type"], item.get("activation", item.get("fn")))
            for item in import_model(path).layers]


# --- GELU ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_torch_gelu_imports_as_one_activation(tmp_path, approximate):
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GELU(approximate),
                                 torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    path = export_torch(source, (6, 6, 3), tmp_path / "gelu.onnx", opset_version=17)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Erf" if approximate == "none" else "Tanh", "Mul", "Add"} <= ops  # written out
    fn = "gelu" if approximate == "none" else "gelu_tanh"
    assert kinds(path) == [("conv2d", fn), ("flatten", None), ("dense", None)]
    spec, _, weights = imported(path, tmp_path)
    batch = images((6, 6, 3)) * 3  # the tails, where the two approximations part
    assert_matches(spec, weights, batch, torch_output(source, batch))


def conv_then(nodes: list[Any], initializers: list[Any], path: Path, opset: int = 17
              ) -> Path:
    """``x`` -> Conv -> ``nodes`` (reading `c`, writing `a`) -> global pool: a model file."""
    graph = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), *nodes,
             helper.make_node("GlobalAveragePool", ["a"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    weight = constant("w", np.random.default_rng(0).normal(0, 1, (4, 3, 3, 3)))
    onnx.save(onnx_model(graph, [weight, *initializers], [1, 3, 6, 6], opset=opset), path)
    return path


@pytest.mark.parametrize("approximate, fn", [("none", "gelu"), ("tanh", "gelu_tanh")])
def test_onnx_gelu_op_of_opset_20(tmp_path, approximate, fn):
    node = helper.make_node("Gelu", ["c"], ["a"], name="gelu", approximate=approximate)
    path = conv_then([node], [], tmp_path / "gelu.onnx", opset=20)
    assert kinds(path)[0] == ("conv2d", fn)


def erf_gelu(sqrt2: float = math.sqrt(2), one: float = 1.0, half: float = 0.5
             ) -> tuple[list[Any], list[Any]]:
    """torch's GELU: Div by sqrt 2, Erf, Add 1, Mul x, Mul 0.5 (constants as given)."""
    nodes = [helper.make_node("Div", ["c", "sqrt2"], ["d"], name="div"),
             helper.make_node("Erf", ["d"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["s"], name="plus_one"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="times_x"),
             helper.make_node("Mul", ["m", "half"], ["a"], name="half")]
    return nodes, [constant("sqrt2", sqrt2), constant("one", one), constant("half", half)]


def test_the_erf_pattern_by_hand_is_gelu(tmp_path):
    path = conv_then(*erf_gelu(), tmp_path / "gelu.onnx")
    assert kinds(path)[0] == ("conv2d", "gelu")


@pytest.mark.parametrize("changed", [{"sqrt2": 1.5}, {"one": 2.0}, {"half": 0.25}])
def test_a_gelu_look_alike_is_refused(tmp_path, changed):
    path = conv_then(*erf_gelu(**changed), tmp_path / "almost.onnx")
    with pytest.raises(ImportRefused) as caught:
        import_model(path)
    assert any("(Erf)" in line for line in caught.value.lines), caught.value.lines


def test_a_gelu_whose_inner_value_is_read_elsewhere_is_not_one(tmp_path):
    nodes, constants = erf_gelu()
    nodes[-1] = helper.make_node("Mul", ["m", "half"], ["g"], name="half")
    nodes.append(helper.make_node("Sum", ["g", "e"], ["a"], name="reads_erf_too"))
    with pytest.raises(ImportRefused) as caught:
        import_model(conv_then(nodes, constants, tmp_path / "shared.onnx"))
    # not one GELU: its Div by a constant is a rescaling, its Erf has no equivalent
    assert any("(Erf)" in line for line in caught.value.lines), caught.value.lines


# --- a Pad: the next layer's padding, or a layer of its own ---------------------------------------

def padded_model(path: Path, pad_mode: str, pads: list[int], *after: Any,
                 value: float | None = None) -> Path:
    """``x`` (1, 3, 4, 4) -> Pad -> ``after`` (reading `q`, writing `a`) -> NHWC flatten."""
    pad_inputs = ["x", "pads", *(["value"] if value is not None else [])]
    nodes = [helper.make_node("Pad", pad_inputs, ["q"], name="pad", mode=pad_mode), *after,
             helper.make_node("Transpose", ["a"], ["t"], name="nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Flatten", ["t"], ["y"], name="flat")]
    initializers = [onnx.numpy_helper.from_array(np.array(pads, np.int64), "pads"),
                    constant("w", np.random.default_rng(1).normal(0, 1, (2, 3, 3, 3)))]
    if value is not None:
        initializers.append(constant("value", value))
    onnx.save(onnx_model(nodes, initializers, [1, 3, 4, 4]), path)
    return path


def assert_imports_exactly(path: Path, tmp_path: Path) -> list[str]:
    """The imported spec computes what onnxruntime does; its layer types."""
    spec, npz = write_import(import_model(path), tmp_path / "imported.yaml")
    x = np.random.default_rng(2).normal(0, 1, (1, 4, 4, 3)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x.transpose(0, 3, 1, 2)})[0]
    graph = compile_spec(spec).graph
    actual = reference_forward(graph, load_weights(npz), x)[graph.output]
    assert difference(actual, expected).max_rel <= Tolerance().forward_rtol
    return [item["type"] for item in import_model(path).layers]


def test_a_reflect_pad_before_a_conv_that_pads_too_stays_a_layer(tmp_path):
    conv = helper.make_node("Conv", ["q", "w"], ["a"], name="conv", pads=[1, 1, 1, 1])
    path = padded_model(tmp_path / "m.onnx", "reflect", [0, 0, 1, 1, 0, 0, 1, 1], conv)
    assert assert_imports_exactly(path, tmp_path) == ["pad2d", "conv2d", "flatten"]


def test_a_reflect_pad_before_a_conv_is_its_padding(tmp_path):
    conv = helper.make_node("Conv", ["q", "w"], ["a"], name="conv")
    path = padded_model(tmp_path / "m.onnx", "reflect", [0, 0, 1, 0, 0, 0, 0, 2], conv)
    assert assert_imports_exactly(path, tmp_path) == ["conv2d", "flatten"]
    layer = import_model(path).layers[0]
    assert layer["padding"] == {"top": 1, "bottom": 0, "left": 0, "right": 2}
    assert layer["padding_mode"] == "reflect"


@pytest.mark.parametrize("value", [0.5, 0.0])
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_a_constant_pad_before_a_pool_is_its_pad_value(tmp_path, op, value):
    pool = helper.make_node(op, ["q"], ["a"], name="pool", kernel_shape=[2, 2], strides=[1, 1])
    path = padded_model(tmp_path / "m.onnx", "constant", [0, 0, 1, 1, 0, 0, 0, 1], pool,
                        value=value)
    assert assert_imports_exactly(path, tmp_path) == [
        "max_pool2d" if op == "MaxPool" else "avg_pool2d", "flatten"]
    layer = import_model(path).layers[0]
    assert layer["padding"] == {"top": 1, "bottom": 0, "left": 1, "right": 1}
    if op == "MaxPool" or value:  # zeros in an average: counted, nothing added to the sum
        assert layer["pad_value"] == value
    else:
        assert layer["count_include_pad"] is True and "pad_value" not in layer


def test_a_constant_pad_before_a_ceil_mode_pool_of_another_size_stays_a_layer(tmp_path):
    # padded 5 rows, stride 2, ceil: 3 windows; the same pads as the pool's own: 2 (the
    # last window would start in its padding)
    pool = helper.make_node("MaxPool", ["q"], ["a"], name="pool", kernel_shape=[2, 2],
                            strides=[2, 2], ceil_mode=1)
    path = padded_model(tmp_path / "m.onnx", "constant", [0, 0, 0, 0, 0, 0, 1, 1], pool,
                        value=0.5)
    assert assert_imports_exactly(path, tmp_path) == ["pad2d", "max_pool2d", "flatten"]


def test_a_pad_read_twice_stays_a_layer(tmp_path):
    both = [helper.make_node("Conv", ["q", "w"], ["c"], name="conv"),
            helper.make_node("MaxPool", ["q"], ["m"], name="pool", kernel_shape=[3, 3],
                             strides=[1, 1]),
            helper.make_node("Concat", ["c", "m"], ["a"], name="both", axis=1)]
    path = padded_model(tmp_path / "m.onnx", "edge", [0, 0, 1, 1, 0, 0, 1, 1], *both)
    assert assert_imports_exactly(path, tmp_path) == ["pad2d", "conv2d", "max_pool2d", "concat",
                                                      "flatten"]


# --- a Slice of height and width: cropping2d ----------------------------------------------------

INT64_MAX = 2**63 - 1


def sliced_model(path: Path, starts: list[int], ends: list[int], axes: list[int],
                 steps: list[int] | None = None, opset: int = 17) -> Path:
    """``x`` (1, 3, 4, 4) -> Slice -> NHWC flatten; before opset 10 the Slice's starts,
    ends and axes are attributes."""
    named = {"starts": starts, "ends": ends, "axes": axes, **({"steps": steps} if steps else {})}
    if opset < 10:
        crop = helper.make_node("Slice", ["x"], ["a"], name="crop", **named)
        initializers = []
    else:
        crop = helper.make_node("Slice", ["x", *named], ["a"], name="crop")
        initializers = [onnx.numpy_helper.from_array(np.array(v, np.int64), k)
                        for k, v in named.items()]
    nodes = [crop, helper.make_node("Transpose", ["a"], ["t"], name="nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Flatten", ["t"], ["y"], name="flat")]
    onnx.save(onnx_model(nodes, initializers, [1, 3, 4, 4], opset=opset), path)
    return path


@pytest.mark.parametrize("starts, ends, axes, cropping", [
    # negative ends and axes count from the end; a bottom crop of 0 written as the axis size
    ([1, 0], [-1, 3], [2, -1], {"top": 1, "bottom": 1, "left": 0, "right": 1}),
    ([2], [INT64_MAX], [3], {"top": 0, "bottom": 0, "left": 2, "right": 0}),
    # the batch and the channels kept whole
    ([0, 0, 1, 1], [INT64_MAX, 3, 3, 3], [0, 1, 2, 3], 1),
    ([1, 0], [3, 4], [2, 3], [1, 0])])
def test_a_slice_of_height_and_width_is_a_cropping2d(tmp_path, starts, ends, axes, cropping):
    path = sliced_model(tmp_path / "m.onnx", starts, ends, axes)
    assert assert_imports_exactly(path, tmp_path) == ["cropping2d", "flatten"]
    assert import_model(path).layers[0]["cropping"] == cropping


def test_a_slice_of_opset_9_is_a_cropping2d(tmp_path):
    path = sliced_model(tmp_path / "m.onnx", [1, 0], [4, -1], [3, 2], opset=9)
    assert assert_imports_exactly(path, tmp_path) == ["cropping2d", "flatten"]
    assert import_model(path).layers[0]["cropping"] == {"top": 0, "bottom": 1, "left": 1,
                                                        "right": 0}


@pytest.mark.parametrize("starts, ends, axes, fields", [
    ([1], [2], [1], {"start": 1, "stop": 2}), ([0], [2], [-3], {"stop": 2}),
    ([1], [INT64_MAX], [1], {"start": 1}),
    ([0, 1, 0], [INT64_MAX, -1, 4], [0, 1, 3], {"start": 1, "stop": 2})])
def test_a_slice_of_the_channels_is_a_channel_slice(tmp_path, starts, ends, axes, fields):
    path = sliced_model(tmp_path / "m.onnx", starts, ends, axes)
    assert assert_imports_exactly(path, tmp_path) == ["channel_slice", "flatten"]
    layer = import_model(path).layers[0]
    assert {k: layer[k] for k in ("start", "stop") if k in layer} == fields


@pytest.mark.parametrize("starts, ends, axes, steps, reason", [
    ([1, 1], [3, 3], [1, 2], None, "a slice of axis 1 (1:3) of ONNX shape [1, 3, 4, 4]: only "
                                   "height and width can be cropped, or the channels alone"),
    ([0], [1], [0], None, "a slice of axis 0 (0:1) of ONNX shape [1, 3, 4, 4]"),
    ([0], [4], [2], [2], "by steps [2]: only height and width of an image, or the channels, "
                         "by steps of 1"),
    ([2], [1], [1], None, "a slice that leaves no channel of ONNX shape [1, 3, 4, 4]"),
    ([3], [-2], [3], None, "a slice that leaves no pixel of ONNX shape [1, 3, 4, 4]")])
def test_other_slices_are_refused_with_the_reason(tmp_path, starts, ends, axes, steps, reason):
    path = sliced_model(tmp_path / "m.onnx", starts, ends, axes, steps)
    with pytest.raises(ImportRefused) as caught:
        import_model(path)
    assert any(reason in line and "(Slice)" in line for line in caught.value.lines), \
        caught.value.lines


def test_a_slice_read_twice_stays_a_layer(tmp_path):
    def crop(source: str, out: str, start: int, end: int, axis: int) -> Any:
        for k, v in (("start", start), ("end", end), ("axis", axis)):
            initializers.append(onnx.numpy_helper.from_array(np.array([v], np.int64),
                                                             f"{out}_{k}"))
        return helper.make_node("Slice", [source, f"{out}_start", f"{out}_end", f"{out}_axis"],
                                [out], name=out)

    initializers: list[Any] = []
    nodes = [crop("x", "rows", 0, 3, 2), crop("rows", "left", 0, 3, 3),
             crop("rows", "right", 1, 4, 3),
             helper.make_node("Concat", ["left", "right"], ["a"], name="both", axis=1),
             helper.make_node("Transpose", ["a"], ["t"], name="nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Flatten", ["t"], ["y"], name="flat")]
    path = tmp_path / "m.onnx"
    onnx.save(onnx_model(nodes, initializers, [1, 3, 4, 4]), path)
    assert assert_imports_exactly(path, tmp_path) == ["cropping2d"] * 3 + ["concat", "flatten"]


def test_torch_slicing_imports_as_one_cropping2d(tmp_path):
    class Cropped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 5, 3))

        def forward(self, x: Any) -> Any:
            return self.head(self.conv(x)[:, :, 1:-1, 2:])

    torch.manual_seed(0)
    source = Cropped()
    path = export_torch(source, (7, 9, 3), tmp_path / "cropped.onnx", opset_version=17)
    assert [n.op_type for n in onnx.load(path).graph.node].count("Slice") == 2  # one an axis
    crops = [item for item in import_model(path).layers if item["type"] == "cropping2d"]
    assert [item["cropping"] for item in crops] == [{"top": 1, "bottom": 1, "left": 2,
                                                     "right": 0}]
    spec, _, weights = imported(path, tmp_path)
    batch = images((7, 9, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))


# --- a Mul and an Add by constants: rescaling ---------------------------------------------------

def onnx_runtime_output(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.transpose(0, 3, 1, 2)})[0]


def rescalings(path: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """The imported spec's rescaling layers; the spec computes what onnxruntime does."""
    spec, npz = write_import(import_model(path), tmp_path / "imported.yaml")
    x = np.random.default_rng(2).normal(0, 1, (1, 6, 6, 3)).astype(np.float32)
    graph = compile_spec(spec).graph
    actual = reference_forward(graph, load_weights(npz), x)[graph.output]
    assert difference(actual, onnx_runtime_output(path, x)).max_rel <= Tolerance().forward_rtol
    return [item for item in import_model(path).layers if item["type"] == "rescaling"]


def test_a_mul_then_an_add_of_constants_is_one_rescaling(tmp_path):
    nodes = [helper.make_node("Mul", ["c", "s"], ["m"], name="scale"),
             helper.make_node("Add", ["o", "m"], ["a"], name="offset")]
    path = conv_then(nodes, [constant("s", 0.5), constant("o", [[[[1.0]], [[-2.0]], [[0.25]],
                                                                   [[3.0]]]])],
                     tmp_path / "m.onnx")
    assert [{k: v for k, v in r.items() if k != "name"} for r in rescalings(path, tmp_path)] \
        == [{"type": "rescaling", "inputs": ["conv"], "scale": 0.5,
             "offset": [1.0, -2.0, 0.25, 3.0]}]


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1)])
def test_a_mul_by_one_number_per_channel_is_a_rescaling(tmp_path, shape):
    scale = np.array([1.5, -1.0, 0.5, 2.0]).reshape(shape)
    path = conv_then([helper.make_node("Mul", ["c", "s"], ["a"], name="scale")],
                     [constant("s", scale)], tmp_path / "m.onnx")
    found = rescalings(path, tmp_path)
    assert [(r["scale"], r.get("offset")) for r in found] == [([1.5, -1.0, 0.5, 2.0], None)]


def test_an_add_of_a_constant_alone_is_a_rescaling_with_scale_1(tmp_path):
    path = conv_then([helper.make_node("Add", ["c", "o"], ["a"], name="shift")],
                     [constant("o", [0.75])], tmp_path / "m.onnx")
    found = rescalings(path, tmp_path)
    assert [(r.get("scale"), r["offset"]) for r in found] == [(None, 0.75)]


def test_a_scaled_value_read_twice_keeps_its_own_rescaling(tmp_path):
    nodes = [helper.make_node("Mul", ["c", "s"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "o"], ["b"], name="offset"),
             helper.make_node("Sum", ["m", "b"], ["a"], name="sum")]
    path = conv_then(nodes, [constant("s", 2.0), constant("o", 1.0)], tmp_path / "m.onnx")
    found = rescalings(path, tmp_path)
    assert [(r.get("scale"), r.get("offset")) for r in found] == [(2.0, None), (None, 1.0)]


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (1, 1, 1, 1, 1)], ids=["image", "rank-5"])
def test_a_mul_by_a_constant_image_is_refused(tmp_path, shape):
    """A constant per pixel, or one number that would broadcast the image to rank 5."""
    path = conv_then([helper.make_node("Mul", ["c", "s"], ["a"], name="scale")],
                     [constant("s", np.ones(shape))], tmp_path / "m.onnx")
    with pytest.raises(ImportRefused) as caught:
        import_model(path)
    assert f"'scale' (Mul): multiplying by a constant of shape {list(shape)}: specforge's " \
        "rescaling takes one number or one per channel (4)" in caught.value.lines, \
        caught.value.lines


def test_torch_normalisation_in_forward_imports_as_rescaling(tmp_path):
    """x * std + mean written in a module's forward, as torch.onnx.export writes it."""

    class Normalised(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.tensor([2.0, 0.5, -1.0]).reshape(1, 3, 1, 1))
            self.register_buffer("offset", torch.tensor([0.1, -0.2, 0.3]).reshape(1, 3, 1, 1))
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x * self.scale + self.offset)
            return self.head(torch.sigmoid(y).mean(dim=(2, 3)) * 3.0)

    torch.manual_seed(0)
    source = Normalised()
    path = export_torch(source, (6, 6, 3), tmp_path / "norm.onnx", opset_version=17)
    spec, _, weights = imported(path, tmp_path)
    layers = import_model(path).layers
    assert [(r.get("scale"), r.get("offset")) for r in layers if r["type"] == "rescaling"] \
        == [([2.0, 0.5, -1.0], [0.1, -0.2, 0.3]), (3.0, None)]
    batch = images((6, 6, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))


def test_torch_mean_std_normalisation_imports_as_one_rescaling(tmp_path):
    """(x - mean) / std, as torchvision's Normalize writes it in a forward: a Sub and a Div
    of constants, one rescaling with scale 1 / std and offset -mean / std."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    class Normalised(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1))
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv((x - self.mean) / self.std)
            return self.head(y.mean(dim=(2, 3)) / 2.0)

    torch.manual_seed(0)
    source = Normalised()
    path = export_torch(source, (6, 6, 3), tmp_path / "norm.onnx", opset_version=17)
    assert {"Sub", "Div"} <= {n.op_type for n in onnx.load(path).graph.node}
    spec, _, weights = imported(path, tmp_path)
    found = [r for r in import_model(path).layers if r["type"] == "rescaling"]
    assert len(found) == 2 and found[1]["scale"] == 0.5 and "offset" not in found[1]
    std32 = np.float32(std).astype(np.float64)
    np.testing.assert_allclose(found[0]["scale"], 1 / std32, rtol=1e-7)
    np.testing.assert_allclose(found[0]["offset"], -np.float32(mean) / std32, rtol=1e-6)
    batch = images((6, 6, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))


@pytest.mark.parametrize("op", ["Sub", "Div"])
def test_a_constant_minus_or_over_a_layer_is_refused(tmp_path, op):
    path = conv_then([helper.make_node(op, ["k", "c"], ["a"], name="reversed")],
                     [constant("k", 2.0)], tmp_path / "m.onnx")
    with pytest.raises(ImportRefused) as caught:
        import_model(path)
    assert any(line.startswith(f"'reversed' ({op}): specforge ") and "a constant" in line
               for line in caught.value.lines), caught.value.lines


# --- a Split of the channels: channel_slice; a Reshape / Transpose / Reshape: channel_shuffle ---

def nhwc_flatten(source: str) -> list[Any]:
    return [helper.make_node("Transpose", [source], ["t"], name="nhwc", perm=[0, 2, 3, 1]),
            helper.make_node("Flatten", ["t"], ["y"], name="flat")]


@pytest.mark.parametrize("opset, sizes, how", [
    (11, [1, 2], "attribute"), (13, [2, 1], "input"), (18, [2, 1], "num_outputs"),
    (18, [1, 1, 1], "num_outputs"), (13, [1, 1, 1], "none")])
def test_a_split_of_the_channels_is_a_channel_slice_per_output(tmp_path, opset, sizes, how):
    """The split sizes as opset 11 and 13 write them, opset 18's equal pieces (the last one
    smaller), or none (equal pieces); the pieces concatenated in reverse order."""
    outputs = [f"s{k}" for k in range(len(sizes))]
    options: dict[str, Any] = {"axis": 1}
    inputs, initializers = ["x"], []
    if how == "attribute":
        options["split"] = sizes
    elif how == "input":
        inputs.append("sizes")
        initializers.append(onnx.numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
    elif how == "num_outputs":
        options["num_outputs"] = len(sizes)
    nodes = [helper.make_node("Split", inputs, outputs, name="chunk", **options),
             helper.make_node("Concat", outputs[::-1], ["a"], name="again", axis=1),
             *nhwc_flatten("a")]
    path = tmp_path / "m.onnx"
    onnx.save(onnx_model(nodes, initializers, [1, 3, 4, 4], opset=opset), path)
    assert assert_imports_exactly(path, tmp_path) == ["channel_slice"] * len(sizes) + [
        "concat", "flatten"]
    bounds = [(item.get("start", 0), item.get("stop", 3)) for item in import_model(path).layers
              if item["type"] == "channel_slice"]
    ends = list(np.cumsum(sizes))
    assert bounds == list(zip([0, *ends[:-1]], ends, strict=True))


def test_an_unread_piece_of_a_split_writes_no_layer(tmp_path):
    nodes = [helper.make_node("Split", ["x"], ["a", "b", "c"], name="chunk", axis=1,
                              num_outputs=3),
             helper.make_node("Concat", ["c", "a"], ["d"], name="again", axis=1),
             *nhwc_flatten("d")]
    path = tmp_path / "m.onnx"
    onnx.save(onnx_model(nodes, [], [1, 3, 4, 4], opset=18), path)
    assert assert_imports_exactly(path, tmp_path) == ["channel_slice"] * 2 + ["concat",
                                                                              "flatten"]


def test_a_split_of_height_is_refused_with_the_reason(tmp_path):
    nodes = [helper.make_node("Split", ["x"], ["a", "b"], name="rows", axis=2, num_outputs=2),
             helper.make_node("Concat", ["a", "b"], ["d"], name="again", axis=1),
             *nhwc_flatten("d")]
    path = tmp_path / "m.onnx"
    onnx.save(onnx_model(nodes, [], [1, 3, 4, 4], opset=18), path)
    with pytest.raises(ImportRefused) as caught:
        import_model(path)
    assert any("a split of axis 2 of ONNX shape [1, 3, 4, 4]: only the channels" in line
               for line in caught.value.lines), caught.value.lines


def shuffled_model(path: Path, grouped: list[int], perm: list[int], whole: list[int],
                   extra: list[Any] = ()) -> Path:
    """``x`` -> a 1x1 conv to 6 channels -> Reshape -> Transpose -> Reshape -> NHWC flatten."""
    weight = np.random.default_rng(5).normal(size=(6, 3, 1, 1)).astype(np.float32)
    initializers = [onnx.numpy_helper.from_array(weight, "w"),
                    onnx.numpy_helper.from_array(np.array(grouped, np.int64), "grouped"),
                    onnx.numpy_helper.from_array(np.array(whole, np.int64), "whole")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "grouped"], ["g"], name="view"),
             helper.make_node("Transpose", ["g"], ["p"], name="transpose", perm=perm),
             helper.make_node("Reshape", ["p", "whole"], ["a"], name="view_back"),
             *extra, *nhwc_flatten("a")]
    onnx.save(onnx_model(nodes, initializers, [1, 3, 4, 4]), path)
    return path


@pytest.mark.parametrize("grouped, whole, groups", [
    ([1, 2, 3, 4, 4], [1, 6, 4, 4], 2), ([-1, 3, 2, 4, 4], [0, -1, 4, 4], 3),
    ([0, 2, -1, 4, 4], [-1, 6, 4, 4], 2)])
def test_torchs_channel_shuffle_is_a_channel_shuffle(tmp_path, grouped, whole, groups):
    path = shuffled_model(tmp_path / "m.onnx", grouped, [0, 2, 1, 3, 4], whole)
    assert assert_imports_exactly(path, tmp_path) == ["conv2d", "channel_shuffle", "flatten"]
    assert import_model(path).layers[1]["groups"] == groups


@pytest.mark.parametrize("grouped, perm, whole, extra, where", [
    ([1, 2, 3, 4, 4], [0, 2, 1, 4, 3], [1, 6, 4, 4], [], "view"),  # height and width swapped
    ([1, 2, 3, 16, 1], [0, 2, 1, 3, 4], [1, 6, 4, 4], [], "view"),  # not (N, g, C/g, H, W)
    ([1, 2, 3, 4, 4], [0, 2, 1, 3, 4], [1, 6, 16], [], "view_back"),  # not back to NCHW
    ([1, 2, 3, 4, 4], [0, 2, 1, 3, 4], [1, 6, 4, 4],  # the grouped view read twice
     [helper.make_node("Relu", ["g"], ["unused"], name="other")], "view")])
def test_other_five_axis_reshapes_are_refused_with_the_reason(tmp_path, grouped, perm, whole,
                                                              extra, where):
    path = shuffled_model(tmp_path / "m.onnx", grouped, perm, whole, extra)
    with pytest.raises(ImportRefused) as caught:
        import_model(path)
    assert any(line.lstrip().startswith(f"'{where}'") and "(Reshape)" in line and
               "only a channel shuffle reshapes to 5 axes" in line
               for line in caught.value.lines), caught.value.lines


# --- PRelu --------------------------------------------------------------------------------------

def test_torch_prelus_import_as_prelu(tmp_path):
    """nn.PReLU(C) on an image ((C, 1, 1) slopes), nn.PReLU() (one slope) on features."""
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.PReLU(4),
                                 torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5),
                                 torch.nn.PReLU(), torch.nn.Linear(5, 3))
    with torch.no_grad():  # slopes of both signs, each channel its own
        source[1].weight.copy_(torch.tensor([0.5, -0.3, 0.0, 1.7]))
        source[4].weight.fill_(-0.2)
    path = export_torch(source, (6, 6, 3), tmp_path / "prelu.onnx", opset_version=17)
    assert "PRelu" in {n.op_type for n in onnx.load(path).graph.node}
    spec, graph, weights = imported(path, tmp_path)
    batch = images((6, 6, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))
    prelus = [n for n in graph if n.op == "prelu"]
    assert [n.shape for n in prelus] == [(4, 4, 4), (5,)]
    assert weights[f"{prelus[0].name}.alpha"].tolist() == pytest.approx([0.5, -0.3, 0.0, 1.7])
    assert weights[f"{prelus[1].name}.alpha"].tolist() == pytest.approx([-0.2] * 5)


def test_a_prelu_slope_per_pixel_is_refused(tmp_path):
    slope = np.random.default_rng(1).normal(0, 1, (4, 4, 4))  # (C, H, W): one per element
    path = conv_then([helper.make_node("PRelu", ["c", "s"], ["a"], name="prelu")],
                     [constant("s", slope)], tmp_path / "m.onnx")
    with pytest.raises(ImportRefused) as refusal:
        import_model(path)
    assert "a slope of shape [4, 4, 4] that differs along more than the channels of a NCHW " \
        "tensor of ONNX shape [1, 4, 4, 4]: specforge's prelu learns one slope per channel" \
        in str(refusal.value)


# --- InstanceNormalization ----------------------------------------------------------------------

def test_an_instance_norm_then_a_scale_and_offset_is_one_group_norm(tmp_path):
    """A group per channel; the Mul and Add after it fold into its gamma and beta (its
    own bias scaled too)."""
    nodes = [helper.make_node("InstanceNormalization", ["c", "s", "b"], ["n"], name="norm"),
             helper.make_node("Mul", ["n", "k"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "o"], ["a"], name="offset")]
    rng = np.random.default_rng(4)
    constants = [constant("s", rng.uniform(0.5, 1.5, 4)), constant("b", rng.normal(0, 1, 4)),
                 constant("k", rng.uniform(0.5, 1.5, (4, 1, 1))),
                 constant("o", rng.normal(0, 1, (4, 1, 1)))]
    path = conv_then(nodes, constants, tmp_path / "m.onnx")
    assert rescalings(path, tmp_path) == []  # and the outputs are onnxruntime's
    assert [(item["type"], item.get("groups")) for item in import_model(path).layers] == [
        ("conv2d", None), ("group_norm", 4), ("global_avg_pool2d", None)]


@pytest.mark.parametrize("opset, size", [(18, 2), (21, 4)], ids=["per-group", "per-channel"])
def test_onnx_group_normalization_is_a_group_norm(tmp_path, opset, size):
    """Opset 18's scale and bias hold one number per group, opset 21's one per channel."""
    node = helper.make_node("GroupNormalization", ["c", "s", "b"], ["a"], name="norm",
                            num_groups=2, epsilon=1e-5)
    rng = np.random.default_rng(5)
    path = conv_then([node], [constant("s", rng.uniform(0.5, 1.5, size)),
                              constant("b", rng.normal(0, 1, size))],
                     tmp_path / "m.onnx", opset=opset)
    assert rescalings(path, tmp_path) == []  # and the outputs are onnxruntime's
    norm = import_model(path).layers[1]
    assert (norm["type"], norm["groups"], norm["epsilon"]) == ("group_norm", 2, 1e-5)
