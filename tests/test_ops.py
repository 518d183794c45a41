"""Unit tests of the IR's building blocks: padding, shape errors, loss folding, learning-rate
schedules and the neutral weights format."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from specforge.compiler import compile_spec
from specforge.errors import SpecError, UsageError
from specforge.ir.lower import resolve_pads
from specforge.ir.ops import OPS, ShapeError, same_pads, window_output
from specforge.ir.program import lr_at
from specforge.spec.layers import PerSidePadding
from specforge.weights import (
    check_weights,
    initial_weights,
    load_weights,
    save_weights,
)

SPECS = Path(__file__).resolve().parent.parent / "specs"


def write_spec(tmp_path: Path, layers: list[dict[str, Any]], *, input_shape: Any = (8, 8, 3),
               loss: dict[str, Any] | None = None, name: str = "spec.yaml",
               **extra: Any) -> Path:
    spec = {"model": {"input": list(input_shape), "layers": layers},
            "loss": loss or {"type": "cross_entropy"}, "optimizer": {"type": "adam"}, **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def compile_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(SpecError) as info:
        compile_spec(path, overrides or [])
    return str(info.value)


# --- same_pads and resolve_pads ---------------------------------------------------------------

def brute_force_same(n: int, k: int, s: int, d: int) -> tuple[int, int]:
    """The smallest total pad giving out == ceil(n / s), the odd pixel after."""
    target = -(-n // s)
    effective = (k - 1) * d + 1
    total = 0
    while n + total < effective or (n + total - effective) // s + 1 != target:
        total += 1
        assert total < 100, (n, k, s, d)
    return total // 2, total - total // 2


def test_same_pads_is_the_minimal_pad_for_ceil_n_over_s() -> None:
    for n in range(1, 21):
        for k in range(1, 8):
            for s in range(1, 5):
                for d in range(1, 4):
                    before, after = same_pads(n, k, s, d)
                    assert (before, after) == brute_force_same(n, k, s, d), (n, k, s, d)
                    assert window_output(n, before, after, k, s, d) == math.ceil(n / s)


def test_same_pads_default_dilation_and_known_values() -> None:
    assert same_pads(5, 3, 1) == (1, 1)
    assert same_pads(4, 2, 1) == (0, 1)  # the odd pixel goes after
    assert same_pads(224, 7, 2) == (2, 3)
    assert same_pads(7, 2, 4) == (0, 0)  # the stride alone reaches ceil(7 / 4)


@pytest.mark.parametrize(("padding", "expected"), [
    ("valid", (0, 0, 0, 0)),
    (0, (0, 0, 0, 0)),
    (2, (2, 2, 2, 2)),
    ((1, 3), (1, 1, 3, 3)),
    (PerSidePadding(top=1, bottom=2, left=3, right=4), (1, 2, 3, 4)),
    (PerSidePadding(left=2), (0, 0, 2, 0)),
])
def test_resolve_explicit_pads(padding: Any, expected: tuple[int, int, int, int]) -> None:
    assert resolve_pads(padding, (5, 7, 3), (3, 3), (2, 2), (1, 1)) == expected


def test_resolve_same_pads_per_axis() -> None:
    # height: n=5, k=3, s=2, d=2: effective 5, out 3, total (3-1)*2 + 5 - 5 = 4 -> 2 and 2
    # width:  n=7, k=4, s=1, d=1: effective 4, out 7, total 6 + 4 - 7 = 3 -> 1 before, 2 after
    assert resolve_pads("same", (5, 7, 3), (3, 4), (2, 1), (2, 1)) == (2, 2, 1, 2)
    # default dilation; stride 3 on 10: out 4, total 9 + 2 - 10 = 1 -> the pixel goes after
    assert resolve_pads("same", (10, 10, 1), (2, 2), (3, 3)) == (0, 1, 0, 1)
    # on a flat input `same` resolves to nothing; the op reports the real problem
    assert resolve_pads("same", (12,), (3, 3), (1, 1)) == (0, 0, 0, 0)


def test_spec_padding_forms_reach_the_node(tmp_path: Path) -> None:
    layers = [
        {"type": "conv2d", "name": "a", "filters": 2, "kernel": 3, "padding": "valid"},
        {"type": "conv2d", "name": "b", "filters": 2, "kernel": 3, "padding": "same",
         "strides": 2},
        {"type": "conv2d", "name": "c", "filters": 2, "kernel": 3, "padding": 1},
        {"type": "conv2d", "name": "e", "filters": 2, "kernel": 3, "padding": [2, 0]},
        {"type": "conv2d", "name": "f", "filters": 2, "kernel": 1,
         "padding": {"top": 1, "right": 3}},
        {"type": "flatten"}, {"type": "dense", "units": 2},
    ]
    graph = compile_spec(write_spec(tmp_path, layers, input_shape=(9, 9, 1))).graph
    assert graph["a"].attrs["pads"] == (0, 0, 0, 0) and graph["a"].shape == (7, 7, 2)
    assert graph["b"].attrs["pads"] == (1, 1, 1, 1) and graph["b"].shape == (4, 4, 2)
    assert graph["c"].attrs["pads"] == (1, 1, 1, 1) and graph["c"].shape == (4, 4, 2)
    assert graph["e"].attrs["pads"] == (2, 2, 0, 0) and graph["e"].shape == (6, 2, 2)
    assert graph["f"].attrs["pads"] == (1, 0, 0, 3) and graph["f"].shape == (7, 5, 2)


# --- shape errors -----------------------------------------------------------------------------

CONV = {"filters": 4, "kernel": (3, 3), "strides": (1, 1), "dilation": (1, 1), "groups": 1,
        "pads": (0, 0, 0, 0), "pad_mode": "zeros", "bias": True}


@pytest.mark.parametrize("shape", [(4, 4, 3), (2, 4, 4, 3)])
def test_dense_on_an_image_says_flatten(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError, match=r"dense needs a flat input, got shape") as info:
        OPS["dense"].infer({"units": 3, "bias": True}, [shape])
    assert info.value.hint is not None and "flatten" in info.value.hint


def test_dense_on_an_image_in_a_spec(tmp_path: Path) -> None:
    path = write_spec(tmp_path, [{"type": "conv2d", "filters": 2, "kernel": 3},
                                 {"type": "dense", "name": "fc", "units": 3}])
    message = compile_error(path)
    assert "layer 'fc': dense needs a flat input, got shape (6, 6, 2)" in message
    assert "flatten" in message
    assert "spec.yaml:" in message  # located


def test_add_of_different_shapes() -> None:
    with pytest.raises(ShapeError, match=r"add needs inputs of one shape, got "
                                         r"\(4, 4, 3\), \(4, 4, 5\)"):
        OPS["add"].infer({}, [(4, 4, 3), (4, 4, 5)])


def test_add_of_different_shapes_in_a_spec(tmp_path: Path) -> None:
    path = write_spec(tmp_path, [
        {"type": "conv2d", "name": "c", "filters": 5, "kernel": 1},
        {"type": "add", "name": "sum", "inputs": ["c", "input"]},
        {"type": "flatten"}, {"type": "dense", "units": 2}])
    message = compile_error(path)
    assert "layer 'sum': add needs inputs of one shape, got (8, 8, 5), (8, 8, 3)" in message


@pytest.mark.parametrize(("shapes", "out"), [
    ([(4, 4, 3), (4, 4, 3)], (4, 4, 3)), ([(7,), (7,)], (7,)),
    ([(4, 5, 3), (3,)], (4, 5, 3)), ([(3,), (4, 5, 3)], (4, 5, 3))])
def test_multiply_shapes(shapes: list[tuple[int, ...]], out: tuple[int, ...]) -> None:
    result = OPS["multiply"].infer({}, shapes)
    assert (result.shape, result.params, result.flops) == (out, (), math.prod(out))


@pytest.mark.parametrize("shapes", [[(4, 4, 3), (4, 4, 5)], [(4, 4, 3), (4,)],
                                    [(3,), (4,)], [(4, 4, 3), (4, 3)], [(12,), (2, 2, 3)]])
def test_multiply_of_other_shapes(shapes: list[tuple[int, ...]]) -> None:
    a, b = shapes
    with pytest.raises(ShapeError, match=rf"multiply needs inputs of one shape, or a \(C,\) "
                                         rf"vector .* got {re.escape(str(a))}, "
                                         rf"{re.escape(str(b))}$"):
        OPS["multiply"].infer({}, shapes)


@pytest.mark.parametrize("shape", [(4, 5, 3), (7,)])
def test_layer_norm_shape_and_parameters(shape: tuple[int, ...]) -> None:
    result = OPS["layer_norm"].infer({"epsilon": 1e-3}, [shape])
    assert result.shape == shape
    assert [(p.name, p.shape, p.init, p.trainable) for p in result.params] == [
        ("gamma", (shape[-1],), "ones", True), ("beta", (shape[-1],), "zeros", True)]


@pytest.mark.parametrize("shape", [(4, 5, 6), (6,)])
def test_group_norm_shape_and_parameters(shape: tuple[int, ...]) -> None:
    result = OPS["group_norm"].infer({"groups": 3, "epsilon": 1e-3}, [shape])
    assert result.shape == shape
    assert [(p.name, p.shape, p.init, p.trainable) for p in result.params] == [
        ("gamma", (6,), "ones", True), ("beta", (6,), "zeros", True)]
    with pytest.raises(ShapeError, match="groups=4 must divide the input's 6 channels"):
        OPS["group_norm"].infer({"groups": 4, "epsilon": 1e-3}, [shape])


@pytest.mark.parametrize("shape", [(4, 5, 3), (7,)])
def test_prelu_shape_and_parameters(shape: tuple[int, ...]) -> None:
    result = OPS["prelu"].infer({"alpha_init": -0.5}, [shape])
    assert result.shape == shape
    assert [(p.name, p.shape, p.init, p.trainable) for p in result.params] == [
        ("alpha", (shape[-1],), "constant:-0.5", True)]


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_pool_larger_than_input(op: str) -> None:
    attrs = {"pool": (3, 3), "strides": (1, 1), "dilation": (1, 1), "pads": (0, 0, 0, 0),
             "ceil_mode": False, "count_include_pad": False}
    with pytest.raises(ShapeError, match=rf"{op} window of 3 is larger than the padded "
                                         r"input height 2") as info:
        OPS[op].infer(attrs, [(2, 5, 1)])
    assert info.value.hint is not None and "padding: same" in info.value.hint


def test_pool_larger_than_input_in_a_spec(tmp_path: Path) -> None:
    path = write_spec(tmp_path, [{"type": "max_pool2d", "name": "p", "pool": [2, 5]},
                                 {"type": "flatten"}, {"type": "dense", "units": 2}],
                      input_shape=(4, 4, 1))
    assert ("layer 'p': max_pool2d window of 5 is larger than the padded input width 4"
            in compile_error(path))


def test_conv_groups_must_divide_channels() -> None:
    with pytest.raises(ShapeError, match=r"conv2d groups=2 must divide input channels 3 and "
                                         r"filters 4"):
        OPS["conv2d"].infer({**CONV, "groups": 2}, [(8, 8, 3)])
    with pytest.raises(ShapeError, match=r"groups=2 must divide input channels 4 and "
                                         r"filters 5"):
        OPS["conv2d"].infer({**CONV, "groups": 2, "filters": 5}, [(8, 8, 4)])


def test_conv_groups_in_a_spec(tmp_path: Path) -> None:
    path = write_spec(tmp_path, [{"type": "conv2d", "name": "g", "filters": 4, "kernel": 1,
                                  "groups": 2},
                                 {"type": "flatten"}, {"type": "dense", "units": 2}])
    assert "layer 'g': conv2d groups=2 must divide input channels 3" in compile_error(path)


def test_reflect_pads_must_be_smaller_than_the_input() -> None:
    with pytest.raises(ShapeError, match=r"reflect padding \(2, 2, 2, 2\) needs pads smaller "
                                         r"than the input \(2x2\)"):
        OPS["pad2d"].infer({"pads": (2, 2, 2, 2), "mode": "reflect"}, [(2, 2, 1)])
    with pytest.raises(ShapeError, match=r"reflect padding \(0, 0, 0, 3\)"):
        OPS["conv2d"].infer({**CONV, "pads": (0, 0, 0, 3), "pad_mode": "reflect"},
                            [(8, 3, 3)])
    # one less is fine, and zeros/replicate have no such limit
    assert OPS["pad2d"].infer({"pads": (1, 1, 1, 1), "mode": "reflect"},
                              [(2, 2, 1)]).shape == (4, 4, 1)
    assert OPS["pad2d"].infer({"pads": (5, 5, 5, 5), "mode": "replicate"},
                              [(2, 2, 1)]).shape == (12, 12, 1)


@pytest.mark.parametrize(("crops", "out"), [
    ((0, 0, 0, 0), (5, 7, 3)), ((1, 2, 0, 3), (2, 4, 3)), ((4, 0, 0, 6), (1, 1, 3))])
def test_cropping2d_shapes(crops: tuple[int, int, int, int], out: tuple[int, ...]) -> None:
    assert OPS["cropping2d"].infer({"crops": crops}, [(5, 7, 3)]).shape == out


@pytest.mark.parametrize("crops", [(3, 2, 0, 0), (0, 0, 7, 0), (0, 5, 3, 4)])
def test_cropping2d_must_leave_a_pixel(crops: tuple[int, int, int, int]) -> None:
    with pytest.raises(ShapeError, match=r"cropping2d's cropping .* leaves no pixel of the "
                                         r"5x7 input"):
        OPS["cropping2d"].infer({"crops": crops}, [(5, 7, 3)])


def test_cropping2d_in_a_spec(tmp_path: Path) -> None:
    path = write_spec(tmp_path, [{"type": "cropping2d", "name": "crop", "cropping": [1, 2]},
                                 {"type": "flatten"}, {"type": "dense", "units": 2}],
                      input_shape=(3, 4, 1))
    message = compile_error(path)
    assert "layer 'crop': cropping2d's cropping (1, 1, 2, 2) (top, bottom, left, right) " \
        "leaves no pixel of the 3x4 input" in message
    assert "crop less than 3 rows (top + bottom) and 4 columns" in message  # the hint


@pytest.mark.parametrize(("attrs", "shape", "out"), [
    ({"start": 0, "stop": 3}, (5, 7, 6), (5, 7, 3)), ({"start": 5, "stop": 6}, (5, 7, 6),
                                                      (5, 7, 1)),
    ({"start": 2, "stop": 10}, (12,), (8,))])
def test_channel_slice_shapes(attrs: dict[str, int], shape: tuple[int, ...],
                              out: tuple[int, ...]) -> None:
    assert OPS["channel_slice"].infer(attrs, [shape]).shape == out


@pytest.mark.parametrize("attrs", [{"start": 0, "stop": 7}, {"start": 6, "stop": 6},
                                   {"start": 4, "stop": 2}])
def test_channel_slice_must_take_channels_of_its_input(attrs: dict[str, int]) -> None:
    with pytest.raises(ShapeError, match=r"channel_slice's channels \[\d, \d\) are not "
                                         r"within the 6 channels of its input"):
        OPS["channel_slice"].infer(attrs, [(5, 7, 6)])


def test_a_channel_slice_stops_at_the_last_channel_by_default(tmp_path: Path) -> None:
    path = write_spec(tmp_path, [{"type": "conv2d", "filters": 6, "kernel": 1},
                                 {"type": "channel_slice", "start": 2, "name": "tail"},
                                 {"type": "flatten"}, {"type": "dense", "units": 2}])
    node = compile_spec(path).graph["tail"]
    assert (node.attrs["start"], node.attrs["stop"], node.shape) == (2, 6, (8, 8, 4))


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_channel_shuffle_keeps_the_shape(groups: int) -> None:
    assert OPS["channel_shuffle"].infer({"groups": groups}, [(5, 7, 6)]).shape == (5, 7, 6)


@pytest.mark.parametrize(("groups", "shape", "message"), [
    (4, (5, 7, 6), "channel_shuffle's 4 groups do not divide the 6 channels"),
    (2, (6,), "channel_shuffle needs an image input")])
def test_channel_shuffle_refusals(groups: int, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ShapeError, match=re.escape(message)):
        OPS["channel_shuffle"].infer({"groups": groups}, [shape])


def test_reflect_pads_in_a_spec(tmp_path: Path) -> None:
    path = write_spec(tmp_path, [{"type": "pad2d", "name": "pad", "padding": 3,
                                  "mode": "reflect"},
                                 {"type": "flatten"}, {"type": "dense", "units": 2}],
                      input_shape=(3, 3, 1))
    message = compile_error(path)
    assert "layer 'pad': reflect padding (3, 3, 3, 3) needs pads smaller than the input (3x3)" \
        in message
    assert "replicate" in message  # the hint


# --- folding a final softmax / sigmoid into the loss ------------------------------------------

def test_cifar_softmax_is_folded_into_the_loss() -> None:
    program = compile_spec(SPECS / "cifar.yaml")
    out = program.graph[program.graph.output]
    assert out.op == "dense" and out.shape == (10,)
    assert "activation" not in {n.op for n in program.graph if n.name.startswith(out.name)}
    assert program.output_activation == "softmax"
    assert program.loss.kind == "cross_entropy"
    assert program.loss.from_logits is True
    assert program.loss.classes == 10


def test_from_logits_true_with_a_final_softmax_is_an_error() -> None:
    with pytest.raises(SpecError) as info:
        compile_spec(SPECS / "cifar.yaml", ["loss.from_logits=true"])
    [problem] = info.value.problems
    assert problem.message == "the model ends in softmax but the loss says from_logits: true"
    assert problem.path == ("loss", "from_logits")
    assert "--set loss.from_logits=true" in str(problem.location)
    assert problem.hint is not None and "from_logits: auto" in problem.hint


def test_from_logits_false_with_a_final_softmax_still_folds() -> None:
    program = compile_spec(SPECS / "cifar.yaml", ["loss.from_logits=false"])
    assert program.graph.output == "dense_2"
    assert program.output_activation == "softmax"
    assert program.loss.from_logits is True


@pytest.mark.parametrize(("from_logits", "output_activation"), [("auto", "softmax"),
                                                                 (False, None)])
def test_no_final_softmax(tmp_path: Path, from_logits: Any,
                          output_activation: str | None) -> None:
    path = write_spec(tmp_path, [{"type": "flatten"}, {"type": "dense", "units": 4}],
                      loss={"type": "cross_entropy", "from_logits": from_logits})
    program = compile_spec(path)
    assert program.graph.output == "dense_1"
    assert program.output_activation == output_activation
    assert program.loss.from_logits is (from_logits == "auto")


@pytest.mark.parametrize("ending", ["fused", "layer"])
def test_binary_cross_entropy_folds_a_final_sigmoid(tmp_path: Path, ending: str) -> None:
    layers: list[dict[str, Any]] = [{"type": "global_avg_pool2d"},
                                    {"type": "dense", "name": "logit", "units": 1}]
    if ending == "fused":
        layers[-1]["activation"] = "sigmoid"
    else:
        layers.append({"type": "activation", "name": "prob", "fn": "sigmoid"})
    program = compile_spec(write_spec(tmp_path, layers,
                                      loss={"type": "binary_cross_entropy"}))
    assert program.graph.output == "logit"
    assert [n.name for n in program.graph] == ["input", "global_avg_pool2d_1", "logit"]
    assert program.output_activation == "sigmoid"
    assert program.loss.kind == "binary_cross_entropy"
    assert program.loss.from_logits is True
    assert program.loss.classes == 2


def test_binary_cross_entropy_needs_one_unit(tmp_path: Path) -> None:
    path = write_spec(tmp_path, [{"type": "flatten"},
                                 {"type": "dense", "units": 2, "activation": "sigmoid"}],
                      loss={"type": "binary_crossentropy"})
    assert ("binary_cross_entropy needs a flat output with one unit, got (2,)"
            in compile_error(path))


# --- learning-rate schedules ------------------------------------------------------------------

def optimizer_with(schedule: str | None, lr: float = 0.1) -> Any:
    overrides = [f"optimizer.learning_rate={lr}"]
    if schedule is not None:
        overrides.append(f"optimizer.schedule={schedule}")
    return compile_spec(SPECS / "cifar.yaml", overrides).optimizer


def check_rates(optimizer: Any, steps_per_epoch: int, expected: dict[int, float]) -> None:
    got = {step: lr_at(optimizer, step, steps_per_epoch) for step in expected}
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_no_schedule_is_the_base_rate() -> None:
    check_rates(optimizer_with(None, 0.003), 7, {0: 0.003, 1: 0.003, 10_000: 0.003})


def test_constant_schedule() -> None:
    check_rates(optimizer_with("{type: constant}"), 5, {0: 0.1, 4: 0.1, 5: 0.1, 999: 0.1})


def test_step_schedule_per_epoch() -> None:
    opt = optimizer_with("{type: step, step_size: 3, gamma: 0.5}")
    check_rates(opt, 10, {0: 0.1, 29: 0.1, 30: 0.05, 59: 0.05, 60: 0.025, 95: 0.0125})


def test_step_schedule_default_gamma() -> None:
    check_rates(optimizer_with("{type: step, step_size: 1, unit: step}"), 1,
                {0: 0.1, 1: 0.01, 2: 0.001})


def test_multistep_schedule() -> None:
    opt = optimizer_with("{type: multistep, milestones: [2, 5], gamma: 0.1, unit: step}")
    check_rates(opt, 3, {0: 0.1, 1: 0.1, 2: 0.01, 4: 0.01, 5: 0.001, 100: 0.001})


def test_exponential_schedule() -> None:
    check_rates(optimizer_with("{type: exponential, gamma: 0.9, unit: step}"), 4,
                {0: 0.1, 1: 0.09, 3: 0.0729})
    check_rates(optimizer_with("{type: exponential, gamma: 0.9}"), 4,
                {0: 0.1, 3: 0.1, 4: 0.09, 7: 0.09, 8: 0.081})


def test_cosine_schedule_is_flat_after_t_max() -> None:
    opt = optimizer_with("{type: cosine, t_max: 4, min_lr: 0.01, unit: step}")
    check_rates(opt, 1, {
        0: 0.1,
        1: 0.01 + 0.09 * (1 + math.sqrt(0.5)) / 2,  # 0.0868198...
        2: 0.055,
        3: 0.01 + 0.09 * (1 - math.sqrt(0.5)) / 2,  # 0.0231801...
        4: 0.01,
        5: 0.01,
        1000: 0.01,
    })


def test_warmup_with_start_factor() -> None:
    opt = optimizer_with("{type: constant, warmup: 4, warmup_start_factor: 0.2, unit: step}")
    check_rates(opt, 100, {0: 0.02, 1: 0.04, 2: 0.06, 3: 0.08, 4: 0.1, 50: 0.1})


def test_warmup_then_cosine_per_epoch() -> None:
    # warmup 2 epochs from 0, then the cosine counts from 0 at epoch 2
    opt = optimizer_with("{type: cosine, t_max: 10, warmup: 2}")
    check_rates(opt, 10, {0: 0.0, 9: 0.0, 10: 0.05, 19: 0.05, 20: 0.1, 29: 0.1,
                          70: 0.05, 119: 0.1 * (1 + math.cos(math.pi * 0.9)) / 2,
                          120: 0.0, 500: 0.0})


def test_warmup_then_step_schedule() -> None:
    opt = optimizer_with("{type: step, step_size: 2, gamma: 0.5, warmup: 2, "
                         "warmup_start_factor: 0.5, unit: step}")
    check_rates(opt, 1, {0: 0.05, 1: 0.075, 2: 0.1, 3: 0.1, 4: 0.05, 6: 0.025})


def test_unit_epoch_versus_step() -> None:
    per_step = optimizer_with("{type: step, step_size: 2, gamma: 0.5, unit: step}")
    per_epoch = optimizer_with("{type: step, step_size: 2, gamma: 0.5, unit: epoch}")
    check_rates(per_step, 5, {0: 0.1, 1: 0.1, 2: 0.05, 7: 0.0125, 10: 0.003125})
    check_rates(per_epoch, 5, {0: 0.1, 7: 0.1, 9: 0.1, 10: 0.05, 19: 0.05, 20: 0.025})


def test_schedule_is_lowered_explicitly() -> None:
    schedule = optimizer_with("{type: multistep, milestones: [3, 6]}").schedule
    assert schedule is not None
    assert (schedule.kind, schedule.unit, schedule.warmup, schedule.warmup_start_factor) == (
        "multistep", "epoch", 0, 0.0)
    assert dict(schedule.params) == {"milestones": (3, 6), "gamma": 0.1}


# --- weights ----------------------------------------------------------------------------------

WEIGHTS_LAYERS: list[dict[str, Any]] = [
    {"type": "conv2d", "name": "c1", "filters": 4, "kernel": 3},
    {"type": "batch_norm", "name": "bn"},
    {"type": "conv2d", "name": "g", "filters": 6, "kernel": [3, 2], "groups": 2,
     "padding": "same"},
    {"type": "layer_norm", "name": "ln"},
    {"type": "prelu", "name": "pr"},
    {"type": "flatten", "name": "flat"},
    {"type": "dense", "name": "fc", "units": 5},
]


def weights_graph(tmp_path: Path, layers: list[dict[str, Any]] = WEIGHTS_LAYERS) -> Any:
    return compile_spec(write_spec(tmp_path, layers)).graph


def glorot_limit(shape: tuple[int, ...]) -> float:
    if len(shape) == 2:
        fan_in, fan_out = shape
    else:
        kh, kw, cin, filters = shape
        fan_in, fan_out = kh * kw * cin, kh * kw * filters
    return math.sqrt(6 / (fan_in + fan_out))


def test_initial_weights_names_shapes_and_constants(tmp_path: Path) -> None:
    weights = initial_weights(weights_graph(tmp_path), seed=3)
    assert {k: v.shape for k, v in weights.items()} == {
        "c1.kernel": (3, 3, 3, 4), "c1.bias": (4,),
        "bn.gamma": (4,), "bn.beta": (4,), "bn.moving_mean": (4,), "bn.moving_var": (4,),
        "g.kernel": (3, 2, 2, 6), "g.bias": (6,), "ln.gamma": (6,), "ln.beta": (6,),
        "pr.alpha": (6,),
        "fc.kernel": (6 * 6 * 6, 5), "fc.bias": (5,),
    }
    assert all(v.dtype == np.float32 for v in weights.values())
    for name in ("c1.bias", "bn.beta", "bn.moving_mean", "g.bias", "ln.beta", "fc.bias"):
        assert not weights[name].any(), name
    for name in ("bn.gamma", "bn.moving_var", "ln.gamma"):
        assert (weights[name] == 1).all(), name
    assert (weights["pr.alpha"] == np.float32(0.25)).all()  # torch's initial slope


def test_initial_weights_are_deterministic_per_seed(tmp_path: Path) -> None:
    graph = weights_graph(tmp_path)
    first, again, other = (initial_weights(graph, 7), initial_weights(graph, 7),
                           initial_weights(graph, 8))
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        assert np.array_equal(first[name], again[name]), name
    for name in ("c1.kernel", "g.kernel", "fc.kernel"):
        assert not np.array_equal(first[name], other[name]), name
    # each tensor has its own stream: two kernels of one shape still differ
    assert not np.array_equal(first["c1.kernel"].ravel()[:20], first["g.kernel"].ravel()[:20])


def test_adding_a_layer_keeps_the_other_initial_weights(tmp_path: Path) -> None:
    before = initial_weights(weights_graph(tmp_path), 0)
    layers = [*WEIGHTS_LAYERS[:3],
              {"type": "conv2d", "name": "extra", "filters": 6, "kernel": 1},
              *WEIGHTS_LAYERS[3:]]
    after = initial_weights(compile_spec(write_spec(tmp_path, layers, name="b.yaml")).graph, 0)
    assert set(after) - set(before) == {"extra.kernel", "extra.bias"}
    for name, value in before.items():
        assert np.array_equal(value, after[name]), name


def test_glorot_limits(tmp_path: Path) -> None:
    graph = weights_graph(tmp_path)
    weights = initial_weights(graph, 11)
    for node in graph:
        for param in node.params:
            if param.init != "glorot_uniform":
                continue
            value = weights[f"{node.name}.{param.name}"]
            limit = glorot_limit(param.shape)
            assert np.abs(value).max() <= np.float32(limit), node.name
            assert np.abs(value).max() > 0.5 * limit, node.name  # really spread over it
            assert value.min() < 0 < value.max(), node.name


def test_save_and_load_round_trip_exactly(tmp_path: Path) -> None:
    weights = initial_weights(weights_graph(tmp_path), 5)
    weights["extra.float64"] = np.linspace(0, 1, 7)
    path = tmp_path / "w.npz"
    save_weights(path, weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml", "w.npz"]  # no .tmp
    loaded = load_weights(path)
    assert loaded.keys() == weights.keys()
    for name, value in weights.items():
        assert loaded[name].dtype == value.dtype, name
        assert np.array_equal(loaded[name], value), name


def test_load_weights_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, **{"fc.kernel": np.zeros((2, 2), np.float32),
                      "fc.bias": np.array([{"x": 1}, None], dtype=object)})
    with pytest.raises(UsageError, match=r"evil\.npz is damaged: .*allow_pickle"):
        load_weights(path)  # refused by name (exit code 2), nothing unpickled


def test_check_weights_reports_missing_extra_and_wrong_shapes(tmp_path: Path) -> None:
    graph = weights_graph(tmp_path)
    weights = initial_weights(graph, 0)
    check_weights(graph, weights)  # exact match: no error

    missing = {k: v for k, v in weights.items() if k != "fc.bias"}
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\]$"):
        check_weights(graph, missing)

    extra = {**weights, "ghost.kernel": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected \['ghost.kernel'\]$"):
        check_weights(graph, extra)

    wrong = {**weights, "fc.kernel": np.zeros((5, 216), np.float32)}
    # a transposed kernel (torch's layout) is named, with the layouts specforge expects
    with pytest.raises(ValueError, match=r"wrong shapes \['fc.kernel: \(5, 216\) != "
                                         r"\(216, 5\)'\]; specforge's layouts: dense kernel "
                                         r"\(in, units\), the transpose of torch's"):
        check_weights(graph, wrong)

    everything = {**missing, "ghost.kernel": np.zeros(3, np.float32),
                  "fc.kernel": np.zeros((1,), np.float32)}
    with pytest.raises(ValueError) as info:
        check_weights(graph, everything)
    message = str(info.value)
    assert message.startswith("weights do not match the model: ")
    assert "missing ['fc.bias']" in message
    assert "unexpected ['ghost.kernel']" in message
    assert message.endswith("wrong shapes ['fc.kernel: (1,) != (216, 5)']")


# --- layer names ------------------------------------------------------------------------------

@pytest.mark.parametrize(("layer", "name", "op"), [
    ({"type": "max_pooling2d"}, "max_pool2d_1", "max_pool2d"),
    ({"type": "avg_pool2d"}, "avg_pool2d_1", "avg_pool2d"),
    ({"type": "average_pooling2d"}, "avg_pool2d_1", "avg_pool2d"),
    ({"type": "zero_padding2d"}, "pad2d_1", "pad2d"),
    ({"type": "batch_normalization"}, "batch_norm_1", "batch_norm"),
    ({"type": "layer_normalization"}, "layer_norm_1", "layer_norm"),
    ({"type": "prelu"}, "prelu_1", "prelu"),
    ({"type": "group_normalization", "groups": 1}, "group_norm_1", "group_norm"),
    ({"type": "add", "inputs": ["c", "input"]}, "add_1", "add"),
    ({"type": "multiply", "inputs": ["c", "input"]}, "multiply_1", "multiply"),
    ({"type": "concatenate", "inputs": ["c", "input"]}, "concat_1", "concat"),
])
def test_generated_names_follow_the_type(tmp_path: Path, layer: dict[str, Any], name: str,
                                         op: str) -> None:
    layers = [{"type": "conv2d", "name": "c", "filters": 3, "kernel": 1}, layer,
              {"type": "global_max_pooling2d"}, {"type": "linear", "units": 2}]
    graph = compile_spec(write_spec(tmp_path, layers)).graph
    assert graph[name].op == op
    assert graph["global_max_pool2d_1"].op == "global_max_pool2d"
    assert graph.output == "dense_1"


@pytest.mark.parametrize("kind", ["repeat", "block"])
def test_a_name_taken_by_a_repeat_or_block_is_a_duplicate(tmp_path: Path, kind: str) -> None:
    first: dict[str, Any] = {"type": "conv2d", "name": "x", "filters": 3, "kernel": 1}
    if kind == "repeat":
        first["repeat"] = 2
        second: dict[str, Any] = {"type": "conv2d", "name": "x", "filters": 3, "kernel": 1}
        extra: dict[str, Any] = {}
    else:
        second = {"type": "block", "name": "x", "block": "b"}
        extra = {"blocks": {"b": {"layers": [{"type": "activation", "name": "y",
                                              "fn": "relu"}]}}}
    path = write_spec(tmp_path, [first, second, {"type": "flatten"},
                                 {"type": "dense", "units": 2}], **extra)
    assert "duplicate layer name 'x'" in compile_error(path)
