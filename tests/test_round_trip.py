"""Round trip: spec -> `specforge export` (ONNX) -> `specforge import` gives the spec's IR
back up to names (dropout, which an inference model drops, aside) and the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specforge.compiler import compile_spec, compile_text
from specforge.conformance.compare import Tolerance, difference
from specforge.conformance.suite import CASES
from specforge.ir.graph import Graph
from specforge.ir.program import Program
from specforge.reference.forward import reference_forward
from specforge.weights import load_weights
from tests.conftest import SPECS

onnx = pytest.importorskip("onnx")
from specforge.importers import import_model  # noqa: E402
from specforge.importers.write import write_import  # noqa: E402
from specforge.onnx_export import to_onnx  # noqa: E402
from tests.test_onnx_export import random_weights, reference  # noqa: E402

#: Attributes that set only a parameter's initial value: no part of a trained model's file.
INITIAL_VALUES = {"alpha_init"}


def structure(graph: Graph) -> list[tuple[str, dict, tuple]]:
    """The graph up to names: op, attributes and parameter shapes of each node, in order,
    without what an inference model does not compute (dropout, a linear activation) or
    hold (an initial value)."""
    return [(n.op, {k: v for k, v in n.attrs.items() if k not in INITIAL_VALUES},
             tuple(tuple(p.shape) for p in n.params)) for n in graph
            if n.op != "dropout" and not (n.op == "activation" and n.attrs["fn"] == "linear")]


def inference(program: Program) -> list[tuple[str, dict, tuple]]:
    """What the exported model computes: the graph, then the softmax or sigmoid the loss
    folded in (re-applied by the export)."""
    squash = program.output_activation
    return structure(program.graph) + ([("activation", {"fn": squash}, ())] if squash else [])


#: ONNX holds no loss: the import starts from cross-entropy, whose predictions apply a
#: softmax that these losses' do not (their graphs still come back, and are checked).
NO_SOFTMAX_LOSSES = ("mse", "mae")


def graph_output(program: Program, weights: dict[str, np.ndarray], x: np.ndarray
                 ) -> np.ndarray:
    return reference_forward(program.graph, weights, x)[program.graph.output]


def round_trip(program: Program, tmp_path: Path, layout: str, same_ir: bool = True) -> None:
    """Export ``program`` with random weights, import it back: the same IR up to names
    (unless not ``same_ir``) and the same outputs."""
    weights = random_weights(program)
    path = tmp_path / f"{program.name}.onnx"
    path.write_bytes(to_onnx(program, weights, layout=layout).SerializeToString())
    spec, npz = write_import(import_model(path), tmp_path / "imported.yaml")
    back = compile_spec(spec)
    if program.loss.kind in NO_SOFTMAX_LOSSES:
        assert structure(back.graph) == structure(program.graph) or not same_ir
        outputs = graph_output
    else:  # what both predict: the graph, then the softmax (sigmoid) a loss folded
        assert inference(back) == inference(program) or not same_ir
        outputs = reference
    x = np.random.default_rng(3).normal(0, 1, (2, *program.graph.input.shape))
    x = x.astype(np.float32)
    again = outputs(back, load_weights(npz), x)
    assert difference(again, outputs(program, weights, x)).max_rel <= Tolerance().forward_rtol


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("spec", ["cifar.yaml", "digits.yaml", "resnet18.yaml"])
def test_a_spec_comes_back_from_onnx(spec, layout, tmp_path):
    overrides = ["model.input=[64, 64, 3]"] if spec == "resnet18.yaml" else []
    round_trip(compile_spec(SPECS / spec, overrides), tmp_path, layout)


#: Suite cases whose ONNX graph the importer reads back as a different but equal IR: a pad2d
#: with zeros becomes the next layer's padding, and the like. Each is named with why.
DIFFERENT_BUT_EQUAL: dict[str, str] = {
    "batch-norm-without-scale-and-center": "ONNX's BatchNormalization always has a scale and "
    "a bias: they come back as trainable parameters holding 1 and 0 (the same outputs)",
    **{f"padding-{mode}-k2-s2": f"`same` needs no pads here, so no Pad says {mode}: the "
       "mode comes back as zeros (the same outputs)" for mode in ("reflect", "replicate")},
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_conformance_case_comes_back_from_onnx(case, tmp_path):
    round_trip(compile_text(case.spec_text(), case.name), tmp_path, "nhwc",
               same_ir=case.name not in DIFFERENT_BUT_EQUAL)


def test_the_cases_that_come_back_different_do(tmp_path):
    """Each DIFFERENT_BUT_EQUAL entry names a case whose IR really differs after the round
    trip (one that no longer does belongs back among the others)."""
    assert DIFFERENT_BUT_EQUAL.keys() <= {case.name for case in CASES}
    for case in CASES:
        if case.name in DIFFERENT_BUT_EQUAL:
            with pytest.raises(AssertionError):
                round_trip(compile_text(case.spec_text(), case.name), tmp_path, "nhwc")
