"""`load_model(weights=...)` and `import_weights` in every backend check the weights first:
every missing, unexpected and misshapen array is named in one error (a UsageError, so exit
code 2 from the CLI, and a ValueError), and a model is never left half-loaded."""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np
import pytest

from specforge.compiler import compile_spec
from specforge.errors import UsageError
from specforge.weights import WeightsError, initial_weights
from tests.conftest import SPECS

# Without TensorFlow, Keras runs on torch here (its default backend would fail to import).
if importlib.util.find_spec("tensorflow") is None:
    os.environ.setdefault("KERAS_BACKEND", "torch")

BACKENDS = ["torch", "keras"]
SPEC = SPECS / "cifar.yaml"


def backend_module(name: str):
    pytest.importorskip(name)  # the framework itself: the plugin imports without it
    return importlib.import_module(f"specforge_{name}")


def mismatched_weights() -> dict[str, np.ndarray]:
    """cifar's initial weights with one array left out, one misspelt and a dense kernel in
    torch's layout, (units, in) instead of (in, units)."""
    program = compile_spec(SPEC)
    weights = initial_weights(program.graph, program.seed)
    del weights["conv2d_1.kernel"]
    weights["dense_2.biass"] = weights.pop("dense_2.bias")
    weights["dense_1.kernel"] = np.ascontiguousarray(weights["dense_1.kernel"].T)
    return weights


def check_names_every_problem(exc: WeightsError) -> None:
    message = str(exc)
    assert isinstance(exc, UsageError) and isinstance(exc, ValueError)
    assert "missing ['conv2d_1.kernel', 'dense_2.bias']" in message
    assert "unexpected ['dense_2.biass']" in message
    assert "wrong shapes ['dense_1.kernel: (128, 512) != (512, 128)']" in message
    assert "the transpose of torch's Linear.weight" in message


@pytest.mark.parametrize("name", BACKENDS)
def test_load_model_names_every_missing_extra_and_misshapen_array(name):
    module = backend_module(name)
    with pytest.raises(WeightsError) as info:
        module.load_model(SPEC, weights=mismatched_weights())
    check_names_every_problem(info.value)


@pytest.mark.parametrize("name", BACKENDS)
def test_import_weights_refuses_before_changing_the_model(name):
    module = backend_module(name)
    backend = getattr(module, f"{name.capitalize()}Backend")()
    program = compile_spec(SPEC)
    model = backend.create_model(program)
    before = backend.export_weights(model, program)
    bad = mismatched_weights()
    bad["conv2d_2.kernel"] = bad["conv2d_2.kernel"] + 1  # a good array that must not land
    with pytest.raises(WeightsError) as info:
        backend.import_weights(model, program, bad)
    check_names_every_problem(info.value)
    after = backend.export_weights(model, program)
    assert all(np.array_equal(after[k], v) for k, v in before.items())
