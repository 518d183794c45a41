"""ONNX export: onnxruntime's output equals the float64 reference within the conformance
forward tolerance, for every spec in specs/ and every conformance case; layouts, logits,
dynamic batch, metadata, refusals, and no framework needed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from specforge.compiler import compile_spec, compile_text
from specforge.conformance.compare import Tolerance, difference
from specforge.conformance.suite import CASES
from specforge.ir.graph import Graph, freeze
from specforge.ir.program import Program
from specforge.reference.forward import ACTIVATIONS, reference_forward
from specforge.weights import initial_weights, parameter_table, save_weights
from tests.conftest import ROOT, SPECS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from specforge.onnx_export import OPSET, ExportError, to_onnx  # noqa: E402

FORWARD_RTOL = Tolerance().forward_rtol


def random_weights(program: Program, seed: int = 1) -> dict[str, np.ndarray]:
    """Weights unlike the initial ones: biases, batch-norm scales, shifts and moving
    statistics all away from 0 and 1, so that each one's export is seen."""
    rng = np.random.default_rng(seed)
    weights = initial_weights(program.graph, seed + 1000)
    for name, param in parameter_table(program.graph).items():
        if param.name == "moving_var" or param.name == "gamma":
            weights[name] = rng.uniform(0.5, 2.0, param.shape).astype(np.float32)
        elif param.name in ("bias", "beta", "moving_mean"):
            weights[name] = rng.normal(0, 0.3, param.shape).astype(np.float32)
    return weights


def onnx_outputs(model: Any, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.astype(np.float32)})[0]


def reference(program: Program, weights: dict[str, np.ndarray], x: np.ndarray,
              logits: bool = False) -> np.ndarray:
    out = reference_forward(program.graph, weights, x)[program.graph.output]
    squash = program.output_activation
    return out if logits or squash is None else ACTIVATIONS[squash](out, {})


def check_against_reference(program: Program, batch: int = 2, layout: str = "nhwc",
                            logits: bool = False, scale: float = 2.0) -> float:
    """Export with random weights; the largest relative difference from the reference."""
    weights = random_weights(program)
    x = np.random.default_rng(5).normal(0, scale, (batch, *program.graph.input.shape))
    x = x.astype(np.float32)  # the reference computes on the very numbers ONNX gets
    model = to_onnx(program, weights, layout=layout, logits=logits)
    expected = reference(program, weights, x, logits)
    fed = x.transpose(0, 3, 1, 2) if layout == "nchw" else x
    got = onnx_outputs(model, fed)
    if layout == "nchw" and got.ndim == 4:  # an image output in the input's layout
        got = got.transpose(0, 2, 3, 1)
    rel = difference(got, expected).max_rel
    assert rel <= FORWARD_RTOL, (program.name, layout, rel)
    return rel


#: vgg16 at full size costs ~10 s (553 MB of weights): the default suite exports it at 32x32
#: (the same layers; a smaller first dense layer), the slow test at 224x224.
SMALLER = {"vgg16.yaml": ["model.input=[32, 32, 3]"]}


@pytest.mark.parametrize("spec", sorted(p.name for p in SPECS.glob("*.yaml")))
def test_every_spec_matches_the_reference(spec: str) -> None:
    program = compile_spec(SPECS / spec, SMALLER.get(spec, []))
    check_against_reference(program, batch=1 if "resnet" in spec else 2)


@pytest.mark.slow
def test_vgg16_at_full_size_matches_the_reference() -> None:
    check_against_reference(compile_spec(SPECS / "vgg16.yaml"), batch=1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_conformance_case_matches_the_reference(case: Any) -> None:
    # every case is expressible for inference: dropout is the identity, batch norm reads
    # its moving statistics; cases differing only in training share a graph, all run
    program = compile_text(case.spec_text(), case.name)
    check_against_reference(program, batch=3)


#: cases between them using every op, each tried in the other layout and with logits
LAYOUT_CASES = ["padding-explicit-per-side", "conv-dilation-groups-depthwise",
                "add-concat-residual", "multiply-squeeze-excite", "batch-norm",
                "global_avg_pool2d", "global_max_pool2d",
                "activation-softmax", "avg_pool2d-same-p3-s2", "max_pool2d-same-p3-s2",
                "dropout-spatial", "dropout-per-sample", "loss-binary-cross-entropy",
                "rescaling", "layer-norm", "cropping2d", "prelu", "group-norm",
                "channel-shuffle", "channel-slice"]


@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_nchw_layout_and_logits(name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    program = compile_text(case.spec_text(), case.name)
    check_against_reference(program, layout="nchw")
    check_against_reference(program, layout="nchw", logits=True)
    check_against_reference(program, logits=True)


def test_rescaling_is_a_mul_then_an_add_of_constants() -> None:
    """Per-channel values broadcast over NCHW images as (1, C, 1, 1), over features as (C,);
    an offset of 0 writes no Add, a scale of 1 with an offset no Mul."""
    layers = ("[{type: rescaling, scale: 2, offset: [1, 2, 3], name: both},"
              " {type: rescaling, offset: -0.5, name: shift}, {type: flatten},"
              " {type: dense, units: 2}, {type: rescaling, scale: [3, 4], name: features}]")
    program = compile_spec(SPECS / "digits.yaml", [f"model.layers={layers}",
                                                    "model.input=[4, 4, 3]", "data=null"])
    for layout in ("nhwc", "nchw"):
        check_against_reference(program, layout=layout)
    model = to_onnx(program, random_weights(program))
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    written = [(n.op_type, [shapes.get(i) for i in n.input[1:]]) for n in model.graph.node
               if n.op_type in ("Mul", "Add")]
    assert written == [("Mul", [[1]]), ("Add", [[1, 3, 1, 1]]), ("Add", [[1]]),
                       ("Mul", [[2]])], written


def test_cropping2d_is_a_slice_of_height_and_width() -> None:
    """Ends counted from the start: a bottom or right crop of 0 keeps the last row."""
    layers = ("[{type: cropping2d, cropping: {top: 2, bottom: 0, left: 1, right: 3}},"
              " {type: flatten}, {type: dense, units: 2}]")
    program = compile_spec(SPECS / "digits.yaml", [f"model.layers={layers}",
                                                    "model.input=[5, 6, 3]", "data=null"])
    check_against_reference(program)
    model = to_onnx(program, random_weights(program))
    values = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.op_type == "Slice"]
    assert [values[i] for i in node.input[1:]] == [[2, 1], [5, 3], [2, 3]]


def test_an_image_output_comes_back_in_the_inputs_layout() -> None:
    # no loss takes an image, but the exporter does not rely on it: a graph cut after its
    # first conv
    program = compile_spec(SPECS / "digits.yaml")
    conv = program.graph["conv2d_1.relu"]
    cut = Graph(tuple(n for n in program.graph if n.name in ("input", "conv2d_1",
                                                             conv.name)), conv.name)
    program = dataclasses.replace(program, graph=cut, output_activation=None)
    for layout in ("nhwc", "nchw"):
        check_against_reference(program, layout=layout)
    declared = to_onnx(program, random_weights(program), layout="nchw").graph.output[0]
    assert [d.dim_value or d.dim_param for d in declared.type.tensor_type.shape.dim] == \
        ["batch", 16, 8, 8]


def test_the_model_is_checked_has_a_dynamic_batch_and_documented_opset() -> None:
    program = compile_spec(SPECS / "digits.yaml")
    weights = random_weights(program)
    model = to_onnx(program, weights, class_names=[f"digit {i}" for i in range(10)])
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 8, 8, 1]
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(0, 2, (5, 8, 8, 1)).astype(np.float32)
    for batch in (1, 5):  # one model, any batch size
        got = session.run(None, {"input": x[:batch]})[0]
        assert difference(got, reference(program, weights, x[:batch])).max_rel <= FORWARD_RTOL
    props = {p.key: p.value for p in model.metadata_props}
    assert props["name"] == "digits" and props["layout"] == "nhwc"
    assert json.loads(props["class_names"]) == [f"digit {i}" for i in range(10)]
    assert props["output"] == "probabilities (softmax)"
    logits = to_onnx(program, weights, logits=True).metadata_props
    assert {p.key: p.value for p in logits}["output"] == "logits"
    # dropout is gone, batch norm would be inference BatchNormalization: no training ops
    assert not {n.op_type for n in model.graph.node} & {"Dropout", "RandomUniformLike"}


def _with_attrs(program: Program, op: str, **changes: Any) -> Program:
    """``program`` with the first ``op`` node's attrs changed (or extended)."""
    nodes = list(program.graph.nodes)
    i = next(k for k, n in enumerate(nodes) if n.op == op)
    nodes[i] = dataclasses.replace(nodes[i], attrs=freeze({**nodes[i].attrs, **changes}))
    return dataclasses.replace(program, graph=Graph(tuple(nodes), program.graph.output))


@pytest.mark.parametrize(("op", "changes", "phrase"), [
    ("conv2d", {"fill": 1.0}, "attribute 'fill' has no ONNX export"),
    ("max_pool2d", {"pad_value": 1.0, "ceil_mode": True, "pads": (1, 1, 1, 1)},
     "pad_value=1.0 has no ONNX export (supported: a pad value without ceil_mode)"),
    ("conv2d", {"pad_mode": "circular"}, "pad_mode='circular' has no ONNX export"),
    ("activation", {"fn": "mish"}, "fn='mish' has no ONNX export"),
    ("activation", {"alpha": 0.5}, "(activation relu): attribute 'alpha'"),
])
def test_unknown_attributes_and_values_are_refused(op: str, changes: dict[str, Any],
                                                   phrase: str) -> None:
    program = compile_text("""
model:
  input: [8, 8, 1]
  layers:
    - {type: conv2d, filters: 4, kernel: 3, padding: same, padding_mode: reflect,
       activation: relu}
    - {type: max_pool2d, pool: 2}
    - {type: flatten}
    - {type: dense, units: 3}
loss: {type: cross_entropy}
optimizer: {type: sgd}
""", "refusals")
    changed = _with_attrs(program, op, **changes)
    with pytest.raises(ExportError) as info:
        to_onnx(changed, random_weights(program))
    assert phrase in str(info.value) and "node '" in str(info.value)


# Runs specforge's CLI where torch, TensorFlow, Keras and JAX cannot be imported.
_WITHOUT_FRAMEWORKS = """\
import sys
class NoFrameworks:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'tensorflow', 'keras', 'jax', 'jaxlib'):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoFrameworks())
sys.argv = ['specforge', *sys.argv[1:]]
from specforge.cli import main
main()
"""


def test_the_cli_exports_without_any_framework(tmp_path: Path) -> None:
    program = compile_spec(SPECS / "cifar.yaml")
    weights = random_weights(program)
    save_weights(tmp_path / "w.npz", weights)
    out = tmp_path / "cifar.onnx"
    result = subprocess.run([sys.executable, "-c", _WITHOUT_FRAMEWORKS, "export",
                             str(SPECS / "cifar.yaml"), "--weights", str(tmp_path / "w.npz"),
                             "--layout", "nchw", "-o", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(2).normal(0, 2, (2, 32, 32, 3)).astype(np.float32)
    got = onnx_outputs(model, x.transpose(0, 3, 1, 2))
    assert difference(got, reference(program, weights, x)).max_rel <= FORWARD_RTOL


def test_bad_weights_and_options_are_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    program = compile_spec(SPECS / "digits.yaml")
    weights = random_weights(program)
    weights["dense_1.kernel"] = weights["dense_1.kernel"][:-1]
    save_weights(tmp_path / "wrong.npz", weights)
    out = tmp_path / "m.onnx"
    cases = [(["--weights", str(tmp_path / "wrong.npz")], "wrong shapes"),
             (["--weights", str(tmp_path / "missing.npz")], "cannot read neutral weights"),
             (["--layout", "nchx"], "use nhwc or nchw")]
    for extra, phrase in cases:
        code, _, err = cli_in_process(monkeypatch, capsys, "export", str(SPECS / "digits.yaml"),
                                   "-o", str(out), *extra)
        assert code == 2 and phrase in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def cli_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                   *args: str) -> tuple[int, str, str]:
    """`specforge ARGS` in this process (a subprocess costs a second): exit code, stdout,
    stderr."""
    from specforge.cli import main

    monkeypatch.setattr(sys, "argv", ["specforge", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_model_beyond_one_onnx_file_is_refused() -> None:
    program = compile_text("""
model:
  input: [200, 200, 20]
  layers: [{type: flatten}, {type: dense, units: 1000}]
loss: {type: mse}
optimizer: {type: sgd}
""", "huge")
    with pytest.raises(ExportError, match=r"the weights take 3\.0 GiB"):
        to_onnx(program, {})  # refused before any weight is looked at


def test_spatial_pad_pads_with_a_constant_value() -> None:
    # the helper that a constant pad value of conv2d/pad2d is exported with
    from onnx import TensorProto, helper

    from specforge.onnx_export import OnnxGraphBuilder, OpContext, spatial_pad
    from specforge.reference.forward import pad

    node = compile_spec(SPECS / "digits.yaml").graph["conv2d_1"]
    builder = OnnxGraphBuilder()
    out = spatial_pad(OpContext(builder, node, ["x"], {}), "x", (1, 0, 2, 3), "zeros",
                      "pad_mode", value=2.5)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", out)]
    model = helper.make_model(helper.make_graph(builder.nodes, "pad", io[:1], io[1:],
                                                builder.initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)  # NCHW
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    expected = pad(x.transpose(0, 2, 3, 1), (1, 0, 2, 3), value=2.5).transpose(0, 3, 1, 2)
    assert np.array_equal(got, expected)
