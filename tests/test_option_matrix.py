"""Every layer type's options, combined, in every backend: the option values come from the
schema (each Literal's values, both booleans) or, for numbers, from VALUES; the cases cover
every pair of two options' values that some valid spec has (all-pairs). Each layer type's
cases run side by side as branches of one model, forward, in the numpy reference, the torch
backend and the Keras backend, so that a spec that validates but does not run (or computes
something else) in a backend is found here, not by a user. The slow variant tries more
values and both idiomatic build styles."""

from __future__ import annotations

import random
import types
import typing
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import BaseModel

from specforge.compiler import compile_text
from specforge.errors import SpecError, UsageError
from specforge.ir.program import Program
from specforge.reference import reference_forward
from specforge.spec import layers as L
from specforge.weights import initial_weights

torch = pytest.importorskip("torch")
pytest.importorskip("keras")

INPUT = (7, 6, 4)
PER_SIDE = {"top": 0, "bottom": 1, "left": 1, "right": 0}
#: Values to try for options whose type does not list them ("type.field" for one type).
VALUES: dict[str, list[Any]] = {
    "filters": [4], "kernel": [1, 2, 3, [3, 2]], "strides": [1, 2, [2, 1]],
    "dilation": [1, 2, [1, 2]], "groups": [1, 2], "depth_multiplier": [1, 2],
    "pool": [2, 3, [3, 2]], "max_pool2d.strides": [None, 1, 2, [2, 1]],
    "avg_pool2d.strides": [None, 1, 2, [2, 1]],
    "padding": ["valid", "same", "same_lower", 1, [1, 0], PER_SIDE],
    "pad2d.padding": [1, [1, 0], PER_SIDE], "pad_value": [None, 0.5],
    "cropping2d.cropping": [1, [2, 0], PER_SIDE],
    # of INPUT's 4 channels: a start at or past the stop does not validate
    "channel_slice.start": [0, 1, 3], "channel_slice.stop": [None, 2, 4],
    "channel_shuffle.groups": [1, 2, 4],
    "count_include_pad": [None, False, True], "units": [3], "running_decay": [0.9],
    "epsilon": [1e-3], "layer_norm.epsilon": [1e-3, 1e-5], "rate": [0.0, 0.5],
    "alpha_init": [0.25, -0.5], "group_norm.groups": [1, 2, 4],
    "group_norm.epsilon": [1e-3, 1e-5],
    "negative_slope": [None, 0.2], "alpha": [None, 0.7], "beta": [None, 0.3],
    "activation": [None, "relu", {"fn": "hard_sigmoid", "alpha": 0.2}],
    # a number or one per channel of INPUT's 4
    "rescaling.scale": [1.0, -0.5, [0.5, -1.0, 2.0, 1.0]],
    "rescaling.offset": [0.0, 0.25, [1.0, 0.0, -1.0, 0.5]],
}
#: The slow variant's further values.
MORE: dict[str, list[Any]] = {
    "kernel": [1, 2, 3, 4, [3, 2], [1, 3]], "strides": [1, 2, 3, [2, 1]],
    "dilation": [1, 2, 3, [1, 2]], "pool": [2, 3, 4, [3, 2]],
    "max_pool2d.strides": [None, 1, 2, 3, [2, 1]], "pad_value": [None, 0.0, 0.5, -2.0],
    "padding": ["valid", "same", "same_lower", 1, 2, [1, 0], [0, 2], PER_SIDE],
    "activation": [None, "relu", "softmax", {"fn": "hard_sigmoid", "alpha": 0.2},
                   {"fn": "leaky_relu", "negative_slope": 0.3}],
}
#: Fields that wire layers together or name them: not options.
NOT_OPTIONS = {"name", "inputs", "repeat", "type"}


def layer_types() -> list[type[BaseModel]]:
    """Every layer class of the schema but block uses (whose layers are these)."""
    union = typing.get_args(L.Layer)[0]
    return [cls for cls in typing.get_args(union) if cls is not L.BlockUse]


def type_name(cls: type[BaseModel]) -> str:
    return typing.get_args(cls.model_fields["type"].annotation)[0]


def option_values(cls: type[BaseModel], values: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Each option of a layer type with the values to try: from VALUES (by type and field,
    then by field), else from its annotation (Literal values, booleans)."""
    options = {}
    for field, info in cls.model_fields.items():
        if field in NOT_OPTIONS:
            continue
        key = next((k for k in (f"{type_name(cls)}.{field}", field) if k in values), None)
        options[field] = values[key] if key else from_annotation(info.annotation)
        assert options[field], (f"{type_name(cls)}.{field} has no values to try: add it to "
                                "VALUES in tests/test_option_matrix.py")
    return options


def from_annotation(annotation: Any) -> list[Any]:
    if annotation is bool:
        return [False, True]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType) or origin is typing.Annotated:
        args = typing.get_args(annotation)
        found = [v for a in args for v in from_annotation(a)]
        return [*found, None] if type(None) in args and found else found
    return []


def layer_spec(kind: str, options: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The spec layers of one case: the layer (merges read two convs of the input)."""
    layer = {"type": kind, "name": name, **{k: v for k, v in options.items() if v is not None}}
    if kind in ("add", "multiply", "concat"):
        sides = [{"type": "conv2d", "filters": 4, "kernel": k, "padding": "same",
                  "name": f"{name}_{k}", "inputs": "input"} for k in (1, 3)]
        return [*sides, {**layer, "inputs": [s["name"] for s in sides]}]
    if kind == "dense":  # on a flat vector
        return [{"type": "flatten", "name": f"{name}_in", "inputs": "input"},
                {**layer, "inputs": f"{name}_in"}]
    return [{**layer, "inputs": "input"}]


def spec_text(cases: list[list[dict[str, Any]]], outputs: list[tuple[str, bool]]) -> str:
    """One model: every case a branch of the input, flattened and concatenated."""
    layers = [layer for case in cases for layer in case]
    flat = []
    for name, image in outputs:
        if image:
            layers.append({"type": "flatten", "name": f"{name}_flat", "inputs": name})
        flat.append(f"{name}_flat" if image else name)
    if len(flat) > 1:
        layers.append({"type": "concat", "inputs": flat, "name": "everything"})
    else:
        layers.append({"type": "activation", "fn": "linear", "inputs": flat[0]})
    spec = {"name": "option-matrix", "seed": 2, "model": {"input": list(INPUT),
                                                          "layers": layers},
            "loss": {"type": "mse"}, "optimizer": {"type": "sgd"}}
    return yaml.safe_dump(spec, sort_keys=False)


def valid_output(kind: str, options: dict[str, Any]) -> tuple[int, ...] | None:
    """The layer's output shape, or None when the combination does not validate."""
    case = layer_spec(kind, options, "t")
    try:
        program = compile_text(spec_text([case], [("t", True)]), "<option case>")
    except SpecError:
        return None
    return program.graph["t"].shape


def all_pairs(kind: str, options: dict[str, list[Any]], seed: int = 0
              ) -> list[tuple[dict[str, Any], tuple[int, ...]]]:
    """Valid cases in which every pair of two options' values that some valid case has
    appears; each case is the best of a few random completions of a pair not yet seen."""
    names = list(options)
    rng = random.Random(seed)

    def pairs(case: dict[str, int]) -> set[tuple[Any, ...]]:
        return {(a, case[a], b, case[b]) for i, a in enumerate(names) for b in names[i + 1:]}

    left = {(a, i, b, j) for n, a in enumerate(names) for b in names[n + 1:]
            for i in range(len(options[a])) for j in range(len(options[b]))}
    if len(names) < 2:  # no pairs: each value once
        left = {(names[0], i, names[0], i) for i in range(len(options[names[0]]))} \
            if names else {()}
    cases = []
    while left:
        target = min(left)
        best, best_gain = None, 0
        for _ in range(12):
            case = {n: rng.randrange(len(options[n])) for n in names}
            if target:
                case[target[0]], case[target[2]] = target[1], target[3]
            chosen = {n: options[n][i] for n, i in case.items()}
            gain = len((pairs(case) | {target}) & left)
            if gain > best_gain and (shape := valid_output(kind, chosen)) is not None:
                best, best_gain = (chosen, shape, case), gain
        if best is None:
            left.discard(target)  # no valid spec found with this pair
            continue
        chosen, shape, case = best
        cases.append((chosen, shape))
        left -= pairs(case) | {target}
    return cases


def combined_program(kind: str, cases: list[tuple[dict[str, Any], tuple[int, ...]]]
                     ) -> tuple[Program, list[str]]:
    names = [f"c{k}" for k in range(len(cases))]
    text = spec_text([layer_spec(kind, options, name) for (options, _), name in
                      zip(cases, names, strict=True)],
                     [(name, len(shape) == 3) for (_, shape), name in
                      zip(cases, names, strict=True)])
    return compile_text(text, f"<{kind} options>"), names


def backend_outputs(program: Program, x: np.ndarray) -> dict[str, np.ndarray]:
    from specforge_keras.model import create_model as keras_model
    from specforge_torch.model import create_model as torch_model

    model = torch_model(program.graph, program.seed).eval()
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy()
    keras_out = np.asarray(keras_model(program.graph, program.seed)(x, training=False),
                           np.float64)
    return {"torch": torch_out, "keras": keras_out}


def check_layer_type(cls: type[BaseModel], values: dict[str, list[Any]]) -> int:
    """Every case of a layer type in both backends against the reference; the count."""
    kind, options = type_name(cls), option_values(cls, values)
    cases = all_pairs(kind, options)
    for field, tried in options.items():  # every value validates in some case
        seen = [c[field] for c, _ in cases]
        assert all(v in seen for v in tried), (kind, field, tried, seen)
    program, names = combined_program(kind, cases)
    x = np.random.default_rng(1).normal(size=(2, *INPUT)).astype(np.float32)
    expected = reference_forward(program.graph, initial_weights(program.graph, program.seed),
                                 x)
    sizes = [int(np.prod(shape)) for _, shape in cases]
    bounds = np.cumsum([0, *sizes])
    for backend, actual in backend_outputs(program, x).items():
        full = expected[program.graph.output]
        assert actual.shape == full.shape, (kind, backend)
        for k in range(len(names)):
            part, want = actual[:, bounds[k]:bounds[k + 1]], full[:, bounds[k]:bounds[k + 1]]
            assert np.allclose(part, want, rtol=1e-4, atol=1e-5), (
                f"{backend} differs from the reference on {kind} {cases[k][0]}: "
                f"{np.abs(part - want).max():.3g}")
    return len(cases)


@pytest.mark.parametrize("cls", layer_types(), ids=type_name)
def test_every_option_pair_of_every_layer_type_runs_in_both_backends(cls):
    assert check_layer_type(cls, VALUES) >= 1


def test_the_matrix_knows_every_option_of_the_schema():
    """A new option with no values to try fails here, not silently."""
    for cls in layer_types():
        for field, tried in option_values(cls, VALUES).items():
            assert len(tried) >= 1, (cls, field)
    assert len(layer_types()) == len(typing.get_args(typing.get_args(L.Layer)[0])) - 1


def expressible(kind: str, case: tuple[dict[str, Any], tuple[int, ...]], backend: str) -> bool:
    """Whether the idiomatic style can write the case (it refuses a few, with a UsageError
    that names --style exact, e.g. torch's batch norm with only one of scale and center)."""
    from tests.test_build_styles import built

    try:
        built(combined_program(kind, [case])[0], backend)
    except UsageError as error:
        assert "--style exact" in str(error)
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("cls", layer_types(), ids=type_name)
def test_more_option_values_run_in_both_backends_and_both_build_styles(cls, tmp_path):
    from tests.test_build_styles import check_same_model

    kind, values = type_name(cls), {**VALUES, **MORE}
    check_layer_type(cls, values)
    cases = all_pairs(kind, option_values(cls, values))
    for backend in ("torch", "keras"):
        written = [case for case in cases if expressible(kind, case, backend)]
        assert len(written) >= len(cases) / 2, (kind, backend)
        (tmp_path / backend).mkdir()
        check_same_model(combined_program(kind, written)[0], backend, tmp_path / backend)
