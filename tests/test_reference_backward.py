"""The numpy reference's backward pass and training formulas, checked from first principles.

Gradients of the float64 reference (:mod:`specforge.reference.backward`, the loss gradients
of :mod:`specforge.reference.training`) against central finite differences of the float64
forward pass; clipping, optimizer updates and moving statistics against one-line formulas
written out here from docs/semantics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pytest

from specforge.compiler import compile_spec
from specforge.conformance.masks import dropout_masks
from specforge.ir.program import LossIR, OptimizerIR, Program, optimizer_slots
from specforge.reference.backward import reference_backward, unpad, unwindow
from specforge.reference.forward import ACTIVATIONS, pad, reference_forward, windows
from specforge.reference.probe import ReferenceProbe
from specforge.reference.training import (
    clip_gradients,
    loss_and_gradient,
    moving_statistics,
    optimizer_update,
)
from specforge.weights import initial_weights, parameter_table
from tests.conftest import EVERY_OP_LAYERS, SPECS

Array = np.ndarray

# Central differences with step H have a truncation error of about H**2 * f''' ~ 1e-12 and a
# rounding error of about 1e-16 * |loss| / H ~ 1e-10, both far below 1e-6 of the gradient's
# largest element; a wrong formula (a missing term, a misplaced window, a wrong constant) is
# off by 1e-3 or much more. The tolerance is relative to the largest |numeric gradient| of
# each tensor, so that tiny elements (where relative error is meaningless) do not matter.
H = 1e-6
RTOL = 1e-6


# --- helpers --------------------------------------------------------------------------------

def numeric_gradient(f: Callable[[Array], float], at: Array) -> Array:
    """d f / d at by central differences, one element at a time."""
    at = np.asarray(at, np.float64)
    flat = at.ravel()
    out = np.zeros(flat.size)
    for i in range(flat.size):
        for sign in (1, -1):
            moved = flat.copy()
            moved[i] += sign * H
            out[i] += sign * f(moved.reshape(at.shape)) / (2 * H)
    return out.reshape(at.shape)


def assert_gradient(analytic: Array, numeric: Array, what: str) -> None:
    analytic = np.asarray(analytic)
    assert analytic.shape == numeric.shape, (what, analytic.shape, numeric.shape)
    scale = np.abs(numeric).max()
    # a check of a gradient that is all zero would prove nothing
    assert scale > 1e-6, f"{what}: the numeric gradient is ~0; the case tests nothing"
    error = np.abs(analytic - numeric).max() / max(scale, 1e-12)
    assert error < RTOL, (f"{what}: relative error {error:.2e} (max |numeric| {scale:.2e})\n"
                          f"analytic {analytic.ravel()[:8]}\nnumeric  {numeric.ravel()[:8]}")


def build(layers: str, shape: tuple[int, int, int] = (5, 6, 2), *extra: str) -> Program:
    """A program from digits.yaml with these layers (a YAML flow list) and input shape."""
    return compile_spec(SPECS / "digits.yaml", [f"model.input={list(shape)}", "data=null",
                                                f"model.layers={layers}", *extra])


def random_weights(program: Program, seed: int = 0) -> dict[str, Array]:
    """Initial float64 weights with biases, gammas, betas and moving statistics drawn at
    random too: their initial zeros and ones would hide a missing factor or term."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in initial_weights(program.graph, 0).items():
        w = np.asarray(w, np.float64)
        param = name.rsplit(".", 1)[1]
        if param in ("gamma", "moving_var"):
            w = rng.uniform(0.5, 1.5, w.shape)
        elif param != "kernel":
            w = rng.normal(0, 0.3, w.shape)
        out[name] = w
    return out


def model_loss(program: Program, weights: Mapping[str, Array], x: Array, y: Array,
               training: bool, masks: Mapping[str, Array] | None) -> float:
    values = reference_forward(program.graph, weights, x, training, masks)
    return loss_and_gradient(program.loss, values[program.graph.output], y)[0]


def check_parameter_gradients(program: Program, x: Array, y: Array, *, training: bool = True,
                              masks: Mapping[str, Array] | None = None,
                              weights: Mapping[str, Array] | None = None,
                              only: tuple[str, ...] | None = None,
                              zero: tuple[str, ...] = ()) -> dict[str, Array]:
    """reference_backward's gradient of every trainable parameter (or of the nodes in
    ``only``) against finite differences of the loss; returns the forward's node values.
    The parameters in ``zero`` must have a zero gradient; every other one a non-zero one."""
    graph = program.graph
    weights = dict(weights) if weights is not None else random_weights(program)
    values = reference_forward(graph, weights, x, training, masks)
    _, g_out = loss_and_gradient(program.loss, values[graph.output], y)
    grads = reference_backward(graph, weights, values, g_out, training, masks)
    trainable = {k for k, p in parameter_table(graph).items() if p.trainable}
    assert set(grads) == trainable
    checked = [k for k in sorted(grads) if only is None or k.split(".")[0] in only]
    assert checked, "no parameter to check"
    for name in checked:
        numeric = numeric_gradient(
            lambda w, name=name: model_loss(program, {**weights, name: w}, x, y, training,
                                            masks), weights[name])
        if name in zero:  # both ~0: the analytic exactly, up to rounding; numeric up to noise
            assert np.abs(grads[name]).max() < 1e-12, (name, grads[name])
            assert np.abs(numeric).max() < 1e-8, (name, numeric)
        else:
            assert_gradient(grads[name], numeric, name)
    return values


def data(program: Program, batch: int = 3, scale: float = 1.0, seed: int = 7
         ) -> tuple[Array, Array]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, scale, (batch, *program.graph.input.shape))
    y = rng.integers(0, program.loss.classes, batch)
    return x, y


# --- activations ----------------------------------------------------------------------------

#: Each activation function, with non-default parameters where it has any, and its kinks.
ACTIVATION_CASES = {
    "linear": ("linear", ()),
    "relu": ("relu", (0,)),
    "relu6": ("relu6", (0, 6)),
    "leaky_relu": ("leaky_relu", (0,)),
    "leaky_relu_0.2": ("leaky_relu, negative_slope: 0.2", (0,)),
    "elu": ("elu", (0,)),
    "elu_0.7": ("elu, alpha: 0.7", (0,)),
    "selu": ("selu", (0,)),
    "gelu": ("gelu", ()),
    "gelu_tanh": ("gelu_tanh", ()),
    "silu": ("silu", ()),
    "sigmoid": ("sigmoid", ()),
    "hard_sigmoid": ("hard_sigmoid", (-3, 3)),
    "hard_sigmoid_onnx": ("hard_sigmoid, alpha: 0.2, beta: 0.4", (-2, 3)),
    "hard_swish": ("hard_swish", (-3, 3)),
    "tanh": ("tanh", ()),
    "softplus": ("softplus", ()),
    "softsign": ("softsign", ()),
    "softmax": ("softmax", ()),  # over the channels, followed by more layers
}


def test_every_activation_has_a_case() -> None:
    assert {fn.split(",")[0] for fn, _ in ACTIVATION_CASES.values()} == set(ACTIVATIONS)


@pytest.mark.parametrize("case", ACTIVATION_CASES)
def test_activation_gradients(case: str) -> None:
    fn, kinks = ACTIVATION_CASES[case]
    program = build("[{type: conv2d, filters: 3, kernel: 2, name: c},"
                    f" {{type: activation, fn: {fn}, name: act}},"
                    " {type: flatten}, {type: dense, units: 3}]", (4, 4, 2))
    x, y = data(program, scale=4.0)  # pre-activations spread over every piece of each fn
    values = check_parameter_gradients(program, x, y)
    pre = values["c"]
    for kink in kinks:  # both sides of each kink are exercised, and no input is near one
        assert (pre < kink).any() and (pre > kink).any(), (kink, pre.min(), pre.max())
        assert np.abs(pre - kink).min() > 1e-4


# --- convolution ----------------------------------------------------------------------------

def _conv_cases() -> dict[str, str]:
    cases = {}
    for mode in ("zeros", "reflect", "replicate"):
        for kernel in ("3", "2", "[2, 3]"):
            for strides in (1, 2):
                for padding in ("same", "{top: 2, bottom: 0, left: 1, right: 1}"):
                    label = "same" if padding == "same" else "explicit"
                    cases[f"{mode}-k{kernel}-s{strides}-{label}"] = (
                        f"kernel: {kernel}, strides: {strides}, padding: {padding},"
                        f" padding_mode: {mode}")
        cases[f"{mode}-dilation2-same"] = (
            f"kernel: 3, dilation: 2, padding: same, padding_mode: {mode}")
        cases[f"{mode}-dilation[2,1]-s2-pad[2,1]"] = (
            f"kernel: [2, 3], dilation: [2, 1], strides: 2, padding: [2, 1],"
            f" padding_mode: {mode}")
        cases[f"{mode}-groups2-dilation2-s2"] = (
            f"kernel: 3, groups: 2, dilation: 2, strides: 2, padding: 2, padding_mode: {mode}")
    cases["constant-same-lower-s2"] = (
        "kernel: 2, strides: 2, padding: same_lower, padding_mode: constant, pad_value: 0.7")
    cases["constant-explicit-dilation2"] = (
        "kernel: 3, dilation: 2, padding: {top: 2, bottom: 0, left: 1, right: 1},"
        " padding_mode: constant, pad_value: -1.5")
    cases["valid-s2"] = "kernel: 3, strides: 2"
    cases["groups2-valid"] = "kernel: 2, groups: 2"
    cases["no-bias"] = "kernel: 3, padding: same, bias: false"
    return cases


CONV_CASES = _conv_cases()


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_gradients(case: str) -> None:
    # A 1x1 conv before the tested one: its gradients go through the tested conv's input
    # gradient (the adjoint of its padding and windows), which a first layer never needs.
    program = build("[{type: conv2d, filters: 2, kernel: 1, name: before},"
                    f" {{type: conv2d, filters: 4, {CONV_CASES[case]}, name: tested}},"
                    " {type: flatten}, {type: dense, units: 3, name: after}]")
    x, y = data(program)
    check_parameter_gradients(program, x, y, only=("before", "tested"))


@pytest.mark.parametrize("padding", ["valid", "same", "1"])
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv2d_gradients(multiplier: int, padding: str) -> None:
    program = build("[{type: conv2d, filters: 2, kernel: 1, name: before},"
                    f" {{type: depthwise_conv2d, kernel: [3, 2], strides: [1, 2],"
                    f" depth_multiplier: {multiplier}, padding: {padding},"
                    " padding_mode: reflect, name: tested},"
                    " {type: flatten}, {type: dense, units: 3}]")
    x, y = data(program)
    check_parameter_gradients(program, x, y, only=("before", "tested"))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
def test_pad_and_windows_adjoints(mode: str) -> None:
    # <pad(x), g> == <x, unpad(g)> and <windows(x), g> == <x, unwindow(g)> for random x, g:
    # the defining property of the adjoints that the backward pass builds on.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 4, 3))
    pads = (2, 0, 1, 3)
    padded = pad(x, pads, mode)
    g = rng.normal(size=padded.shape)
    assert np.isclose((padded * g).sum(), (x * unpad(g, x.shape, pads, mode)).sum())
    for kernel, strides, dilation in (((3, 2), (1, 2), (1, 1)), ((2, 2), (2, 1), (2, 1))):
        w = windows(padded, kernel, strides, dilation)
        gw = rng.normal(size=w.shape)
        back = unwindow(gw, padded.shape, kernel, strides, dilation)
        assert np.isclose((w * gw).sum(), (padded * back).sum())


# --- pooling and padding layers -------------------------------------------------------------

POOL_CASES = {
    f"{op}-p{pool}-s{strides}-{padding}": f"{{type: {op}, pool: {pool}, strides: {strides},"
                                          f" padding: {padding}}}"
    for op in ("max_pool2d", "avg_pool2d") for pool in ("2", "3", "[2, 3]")
    for strides in (1, 2) for padding in ("valid", "same")
}
POOL_CASES["max_pool2d-default-strides"] = "{type: max_pool2d, pool: 2}"
for _op in ("max_pool2d", "avg_pool2d"):
    POOL_CASES[f"{_op}-explicit-padding"] = (
        f"{{type: {_op}, pool: 3, strides: 2, padding: {{top: 1, bottom: 0, left: 2,"
        " right: 1}}")
POOL_CASES["global_avg_pool2d"] = "{type: global_avg_pool2d}"
POOL_CASES["global_max_pool2d"] = "{type: global_max_pool2d}"
for _op in ("max_pool2d", "avg_pool2d"):  # the options from ONNX, alone and together
    _options = {"ceil": "ceil_mode: true", "dilation": "dilation: [2, 1]",
                "pad-value": "pad_value: 0.4", "all": "ceil_mode: true, dilation: 2,"
                                                      " pad_value: -0.3"}
    for _label, _option in _options.items():
        POOL_CASES[f"{_op}-{_label}"] = (f"{{type: {_op}, pool: 3, strides: 2, padding: 1,"
                                         f" {_option}}}")
    POOL_CASES[f"{_op}-same-lower"] = f"{{type: {_op}, pool: 2, strides: 1, padding: same_lower}}"
# rescaling: its input gradient is the output's times scale (the offset adds nothing)
POOL_CASES["rescaling-scalar"] = "{type: rescaling, scale: -1.7, offset: 0.4}"
POOL_CASES["rescaling-per-channel"] = "{type: rescaling, scale: [0.5, -2.0], offset: [1, -3]}"
POOL_CASES["avg_pool2d-ceil-count-include-pad"] = (
    "{type: avg_pool2d, pool: [3, 2], strides: 2, padding: [1, 0], ceil_mode: true,"
    " count_include_pad: true}")
for _mode in ("zeros", "reflect", "replicate", "constant"):
    POOL_CASES[f"pad2d-{_mode}"] = ("{type: pad2d, padding: {top: 2, bottom: 0, left: 1,"
                                    f" right: 3}}, mode: {_mode}}}")
    POOL_CASES[f"pad2d-{_mode}-symmetric"] = f"{{type: pad2d, padding: 1, mode: {_mode}}}"

# cropping2d: the cut pixels get no gradient (the conv before it reads a 4x5 image)
POOL_CASES["cropping2d-per-side"] = ("{type: cropping2d, cropping: {top: 1, bottom: 0,"
                                     " left: 2, right: 1}}")
POOL_CASES["cropping2d-symmetric"] = "{type: cropping2d, cropping: 1}"
POOL_CASES["cropping2d-pair"] = "{type: cropping2d, cropping: [0, 1]}"


@pytest.mark.parametrize("case", POOL_CASES)
def test_pooling_and_padding_gradients(case: str) -> None:
    # These layers have no parameters: the conv before them sees their input gradient.
    # Its kernel 2 mixes neighbouring pixels, so a gradient sent to the wrong cell shows.
    layer = POOL_CASES[case]
    tail = "" if "global" in case else " {type: flatten},"
    program = build(f"[{{type: conv2d, filters: 2, kernel: 2, name: before}}, {layer},"
                    f"{tail} {{type: dense, units: 3}}]")
    x, y = data(program)
    check_parameter_gradients(program, x, y, only=("before",))


# --- batch norm -----------------------------------------------------------------------------

BN_CASES = {
    "default": "{type: batch_norm, name: bn}",
    "no-scale": "{type: batch_norm, scale: false, name: bn}",
    "no-center": "{type: batch_norm, center: false, name: bn}",
    "neither": "{type: batch_norm, scale: false, center: false, epsilon: 0.1, name: bn}",
}


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("case", BN_CASES)
def test_batch_norm_gradients(case: str, training: bool) -> None:
    # Training: the batch's mean and variance depend on the conv's output, and their
    # gradient terms matter. Evaluation: the moving statistics (random here) are constants.
    program = build("[{type: conv2d, filters: 3, kernel: 2, name: before},"
                    f" {BN_CASES[case]}, {{type: activation, fn: tanh}},"
                    " {type: flatten}, {type: dense, units: 3}]", (4, 4, 2))
    x, y = data(program)
    # in training, the batch mean cancels the bias before the batch norm
    check_parameter_gradients(program, x, y, training=training,
                              zero=("before.bias",) if training else ())


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_batch_norm_on_flat_features(training: bool) -> None:
    program = build("[{type: flatten, name: flat}, {type: dense, units: 4},"
                    " {type: batch_norm, epsilon: 0.01}, {type: activation, fn: silu},"
                    " {type: dense, units: 3}]", (2, 2, 2))
    x, y = data(program, batch=4)
    check_parameter_gradients(program, x, y, training=training,
                              zero=("dense_1.bias",) if training else ())


# --- layer norm -----------------------------------------------------------------------------

LN_CASES = {
    # each pixel's channels: the conv's bias differs per channel, so it does not cancel
    "image": ("[{type: conv2d, filters: 3, kernel: 2, name: before},"
              " {type: layer_norm, name: ln}, {type: activation, fn: tanh},"
              " {type: flatten}, {type: dense, units: 3}]"),
    "vector": ("[{type: flatten, name: flat}, {type: dense, units: 4, name: before},"
               " {type: layer_norm, epsilon: 0.1}, {type: activation, fn: silu},"
               " {type: dense, units: 3}]"),
}


@pytest.mark.parametrize("case", LN_CASES)
def test_layer_norm_gradients(case: str) -> None:
    program = build(LN_CASES[case], (3, 4, 2))
    x, y = data(program)
    check_parameter_gradients(program, x, y)


# --- group norm ----------------------------------------------------------------------------

GN_CASES = {
    # two groups of two channels, each over its channels and pixels
    "image": ("[{type: conv2d, filters: 4, kernel: 2, name: before},"
              " {type: group_norm, groups: 2, name: gn}, {type: activation, fn: tanh},"
              " {type: flatten}, {type: dense, units: 3}]"),
    # one group per channel: instance norm
    "instance": ("[{type: conv2d, filters: 3, kernel: 2, name: before},"
                 " {type: group_norm, groups: 3, epsilon: 0.01},"
                 " {type: activation, fn: silu}, {type: flatten}, {type: dense, units: 3}]"),
    "vector": ("[{type: flatten, name: flat}, {type: dense, units: 6, name: before},"
               " {type: group_norm, groups: 2, epsilon: 0.1}, {type: activation, fn: silu},"
               " {type: dense, units: 3}]"),
}


@pytest.mark.parametrize("case", GN_CASES)
def test_group_norm_gradients(case: str) -> None:
    program = build(GN_CASES[case], (3, 4, 2))
    x, y = data(program)
    # a channel normalised alone over its pixels: the conv's bias before it cancels out
    check_parameter_gradients(program, x, y,
                              zero=("before.bias",) if case == "instance" else ())


# --- prelu ---------------------------------------------------------------------------------

PRELU_CASES = {
    # one slope per channel, shared by the pixels; the conv's outputs straddle 0
    "image": ("[{type: conv2d, filters: 3, kernel: 2, name: before},"
              " {type: prelu, name: pr}, {type: flatten}, {type: dense, units: 3}]"),
    "vector": ("[{type: flatten, name: flat}, {type: dense, units: 4, name: before},"
               " {type: prelu, alpha_init: -0.5}, {type: dense, units: 3}]"),
}


@pytest.mark.parametrize("case", PRELU_CASES)
def test_prelu_gradients(case: str) -> None:
    program = build(PRELU_CASES[case], (3, 4, 2))
    x, y = data(program)
    check_parameter_gradients(program, x, y)


def test_batch_norm_training_and_evaluation_differ() -> None:
    # Guards the two tests above: the modes must really take different paths.
    program = build("[{type: conv2d, filters: 3, kernel: 2}, {type: batch_norm},"
                    " {type: flatten}, {type: dense, units: 3}]", (4, 4, 2))
    weights = random_weights(program)
    x, y = data(program)
    graph = program.graph
    grads = {}
    for training in (True, False):
        values = reference_forward(graph, weights, x, training)
        _, g_out = loss_and_gradient(program.loss, values[graph.output], y)
        grads[training] = reference_backward(graph, weights, values, g_out, training)
    assert not np.allclose(grads[True]["conv2d_1.kernel"], grads[False]["conv2d_1.kernel"])


# --- dropout, add, multiply, concat ------------------------------------------------------------

DROPOUT_CASES = {
    "normal": "[{type: conv2d, filters: 3, kernel: 2, name: before},"
              " {type: dropout, rate: 0.5}, {type: flatten}, {type: dense, units: 3}]",
    "spatial": "[{type: conv2d, filters: 4, kernel: 2, name: before},"
               " {type: dropout, rate: 0.5, spatial: true}, {type: flatten},"
               " {type: dense, units: 3}]",
    "flat": "[{type: conv2d, filters: 3, kernel: 2, name: before}, {type: flatten},"
            " {type: dense, units: 6}, {type: dropout, rate: 0.3}, {type: dense, units: 3}]",
    "two": "[{type: conv2d, filters: 4, kernel: 2, name: before},"
           " {type: dropout, rate: 0.4, spatial: true},"
           " {type: conv2d, filters: 3, kernel: 2},"
           " {type: dropout, rate: 0.25}, {type: flatten}, {type: dense, units: 3}]",
    # whole samples of a residual branch (drop-connect), then of the features
    "per-sample": "[{type: conv2d, filters: 2, kernel: 3, padding: same, name: before},"
                  " {type: dropout, rate: 0.5, per_sample: true, name: dropped},"
                  " {type: add, inputs: [before, dropped]}, {type: flatten},"
                  " {type: dense, units: 6}, {type: dropout, rate: 0.3, per_sample: true},"
                  " {type: dense, units: 3}]",
}


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_dropout_gradients(case: str, training: bool) -> None:
    program = build(DROPOUT_CASES[case], (4, 4, 2))
    x, y = data(program)
    masks = dropout_masks(program.graph, 0, 0, len(x))
    assert masks and all((m == 0).any() and (m > 1).any() for m in masks.values())
    check_parameter_gradients(program, x, y, training=training, masks=masks)
    if not training:  # evaluation ignores the masks
        graph, weights = program.graph, random_weights(program)
        values = reference_forward(graph, weights, x, False, masks)
        assert np.array_equal(values[graph.output],
                              reference_forward(graph, weights, x, False)[graph.output])


MERGE_CASES = {
    "add": "[{type: conv2d, filters: 2, kernel: 1, name: a},"
           " {type: conv2d, filters: 2, kernel: 3, padding: same, name: b, inputs: a},"
           " {type: add, inputs: [a, b]}, {type: flatten}, {type: dense, units: 3}]",
    "add-twice-and-input": "[{type: conv2d, filters: 2, kernel: 1, name: a},"
                           " {type: conv2d, filters: 2, kernel: 3, padding: same, name: b,"
                           " activation: tanh},"
                           " {type: add, inputs: [a, b, a, input]}, {type: flatten},"
                           " {type: dense, units: 3}]",
    "concat": "[{type: conv2d, filters: 2, kernel: 1, name: a},"
              " {type: conv2d, filters: 3, kernel: 3, padding: same, name: b, inputs: a},"
              " {type: concat, inputs: [b, a]}, {type: conv2d, filters: 2, kernel: 2},"
              " {type: flatten}, {type: dense, units: 3}]",
    "concat-with-input": "[{type: conv2d, filters: 1, kernel: 2, padding: same, name: a},"
                         " {type: activation, fn: sigmoid, name: b, inputs: input},"
                         " {type: concat, inputs: [input, a, b, a]},"
                         " {type: conv2d, filters: 2, kernel: 1}, {type: global_avg_pool2d},"
                         " {type: dense, units: 3}]",
    "residual-block": "[{type: conv2d, filters: 2, kernel: 3, padding: same, name: a,"
                      " activation: relu},"
                      " {type: conv2d, filters: 2, kernel: 3, padding: same, name: b},"
                      " {type: batch_norm, name: bn},"
                      " {type: add, inputs: [bn, a], name: sum},"
                      " {type: activation, fn: relu}, {type: global_max_pool2d},"
                      " {type: dense, units: 3}]",
    "multiply": "[{type: conv2d, filters: 2, kernel: 1, name: a},"
                " {type: conv2d, filters: 2, kernel: 3, padding: same, name: b, inputs: a},"
                " {type: multiply, inputs: [a, b]}, {type: flatten}, {type: dense, units: 3}]",
    "multiply-square": "[{type: conv2d, filters: 2, kernel: 2, name: a},"
                       " {type: multiply, inputs: [a, a]}, {type: flatten},"
                       " {type: dense, units: 3}]",
    # a squeeze-and-excitation gate, on either side: its gradient sums over the pixels
    "multiply-gate": "[{type: conv2d, filters: 3, kernel: 2, name: a},"
                     " {type: global_avg_pool2d}, {type: dense, units: 3, activation: sigmoid,"
                     " name: gate}, {type: multiply, inputs: [a, gate]}, {type: flatten},"
                     " {type: dense, units: 3}]",
    "gate-multiply": "[{type: conv2d, filters: 3, kernel: 2, name: a},"
                     " {type: global_max_pool2d}, {type: dense, units: 3, activation: tanh,"
                     " name: gate}, {type: multiply, inputs: [gate, a]},"
                     " {type: global_avg_pool2d}, {type: dense, units: 3}]",
    # ShuffleNet's unit: half the channels pass, half are convolved, then interleaved; the
    # dense reads every pixel's channels, so a gradient sent to the wrong channel shows
    "channel-slice-shuffle": "[{type: conv2d, filters: 6, kernel: 1, name: a},"
                             " {type: channel_slice, stop: 3, name: kept},"
                             " {type: channel_slice, start: 3, inputs: a, name: rest},"
                             " {type: conv2d, filters: 3, kernel: 3, padding: same,"
                             " activation: tanh, name: b},"
                             " {type: concat, inputs: [kept, b]},"
                             " {type: channel_shuffle, groups: 2}, {type: flatten},"
                             " {type: dense, units: 3}]",
    "channel-shuffle-three-groups": "[{type: conv2d, filters: 6, kernel: 2, name: a},"
                                    " {type: channel_shuffle, groups: 3},"
                                    " {type: channel_slice, start: 1, stop: 5},"
                                    " {type: flatten}, {type: dense, units: 3}]",
    "channel-slice-of-a-vector": "[{type: conv2d, filters: 4, kernel: 2, name: a},"
                                 " {type: flatten}, {type: channel_slice, start: 5, stop: 17},"
                                 " {type: dense, units: 3}]",
}


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_gradients(case: str) -> None:
    program = build(MERGE_CASES[case], (4, 5, 2))
    x, y = data(program)
    # the batch norm's batch mean cancels the bias of the conv before it
    zero = ("b.bias",) if "batch_norm" in MERGE_CASES[case] else ()
    check_parameter_gradients(program, x, y, zero=zero)


def test_composite_graph_through_the_probe() -> None:
    # Every op in one graph, through ReferenceProbe.gradients as the conformance suite uses
    # it (training mode, dropout masks).
    program = build(
        EVERY_OP_LAYERS + " {type: dropout, rate: 0.3, spatial: true},"
        " {type: global_max_pool2d}, {type: dense, units: 5, activation: softmax}]",
        (9, 10, 2))
    x, y = data(program)
    weights = random_weights(program)
    masks = dropout_masks(program.graph, 0, 0, len(x))
    value, grads = ReferenceProbe(program, weights).gradients(x, y, masks)
    assert np.isclose(value, model_loss(program, weights, x, y, True, masks))
    for name in ("conv2d_1.kernel", "conv2d_1.bias", "bn.gamma", "ln.beta", "pr.alpha", "gn.gamma",
                 "dense_1.bias"):
        numeric = numeric_gradient(
            lambda w, name=name: ReferenceProbe(program, {**weights, name: w}).gradients(
                x, y, masks)[0], weights[name])
        assert_gradient(grads[name], numeric, name)


# --- losses ---------------------------------------------------------------------------------

def _softmax(z: Array) -> Array:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _expected_loss(loss: LossIR, out: Array, labels: Array) -> float:
    """Each loss written out the plain way (docs/semantics.md)."""
    e = loss.label_smoothing
    if loss.kind == "cross_entropy":
        target = np.eye(out.shape[1])[labels] * (1 - e) + e / out.shape[1]
        p = _softmax(out) if loss.from_logits else out
        return float(-(target * np.log(p)).sum(axis=1).mean())
    if loss.kind == "binary_cross_entropy":
        t = labels[:, None] * (1 - e) + e / 2
        p = 1 / (1 + np.exp(-out)) if loss.from_logits else out
        return float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean())
    diff = out - np.eye(out.shape[1])[labels]
    return float((diff ** 2).mean() if loss.kind == "mse" else np.abs(diff).mean())


LOSS_CASES = {
    "ce-logits": (LossIR("cross_entropy", True, 0.0, 4), "logits"),
    "ce-logits-smoothing": (LossIR("cross_entropy", True, 0.1, 4), "logits"),
    "ce-probabilities": (LossIR("cross_entropy", False, 0.0, 4), "probabilities"),
    "ce-probabilities-smoothing": (LossIR("cross_entropy", False, 0.2, 4), "probabilities"),
    "bce-logits": (LossIR("binary_cross_entropy", True, 0.0, 2), "logits"),
    "bce-logits-smoothing": (LossIR("binary_cross_entropy", True, 0.1, 2), "logits"),
    "bce-probabilities": (LossIR("binary_cross_entropy", False, 0.0, 2), "probabilities"),
    "bce-probabilities-smoothing": (LossIR("binary_cross_entropy", False, 0.1, 2),
                                    "probabilities"),
    "mse": (LossIR("mse", False, 0.0, 4), "logits"),
    "mae": (LossIR("mae", False, 0.0, 4), "logits"),
}


@pytest.mark.parametrize("case", LOSS_CASES)
def test_loss_value_and_gradient(case: str) -> None:
    loss, kind = LOSS_CASES[case]
    rng = np.random.default_rng(5)
    n, units = 5, 1 if loss.kind == "binary_cross_entropy" else loss.classes
    out = (rng.uniform(0.02, 0.98, (n, units)) if kind == "probabilities"
           else rng.normal(0, 2, (n, units)))
    labels = rng.integers(0, 2 if units == 1 else units, n)
    labels[:2] = [0, 1]  # both classes, for the binary losses
    if loss.kind == "mae":  # no difference near 0, where |.| has its kink
        assert np.abs(out - np.eye(units)[labels]).min() > 1e-3
    value, gradient = loss_and_gradient(loss, out, labels)
    assert np.isclose(value, _expected_loss(loss, out, labels), rtol=1e-12)
    numeric = numeric_gradient(lambda o: loss_and_gradient(loss, o, labels)[0], out)
    assert_gradient(gradient, numeric, case)


@pytest.mark.parametrize("kind", ["cross_entropy", "binary_cross_entropy"])
def test_probability_loss_is_clipped(kind: str) -> None:
    # Probabilities are clipped to [1e-7, 1 - 1e-7]: finite loss, no gradient outside.
    loss = LossIR(kind, False, 0.0, 2)
    if kind == "cross_entropy":
        out, labels = np.array([[0.0, 1.0], [1e-9, 0.5]]), np.array([0, 0])
    else:
        out, labels = np.array([[0.0], [1.0]]), np.array([1, 0])
    value, gradient = loss_and_gradient(loss, out, labels)
    assert np.isclose(value, -np.log(1e-7), rtol=1e-6)  # every target sits on a clipped p
    clipped = (out < 1e-7) | (out > 1 - 1e-7)
    assert np.all(gradient[clipped] == 0)


def test_folded_softmax_trains_on_logits() -> None:
    # A final softmax is folded into cross-entropy from logits: the graph ends at the
    # logits, and gradients still match finite differences of the loss.
    program = build("[{type: conv2d, filters: 2, kernel: 2}, {type: flatten},"
                    " {type: dense, units: 3, activation: softmax}]", (3, 3, 2),
                    "loss={type: cross_entropy, from_logits: false, label_smoothing: 0.1}")
    assert program.loss.from_logits and program.output_activation == "softmax"
    assert program.graph[program.graph.output].op == "dense"
    x, y = data(program)
    check_parameter_gradients(program, x, y)


@pytest.mark.parametrize("loss", ["{type: mse}", "{type: mae}",
                                  "{type: binary_cross_entropy, label_smoothing: 0.1}",
                                  "{type: binary_cross_entropy, from_logits: false}"])
def test_model_gradients_for_each_loss(loss: str) -> None:
    binary = "binary" in loss
    act = ", activation: sigmoid" if "from_logits: false" in loss else ""
    program = build("[{type: conv2d, filters: 2, kernel: 2}, {type: flatten},"
                    f" {{type: dense, units: {1 if binary else 3}{act}}}]", (3, 3, 2),
                    f"loss={loss}")
    x, y = data(program)
    if binary:
        y = np.array([0, 1, 1])
    check_parameter_gradients(program, x, y)


# --- gradient clipping ----------------------------------------------------------------------

def _grads() -> dict[str, Array]:
    return {"a.kernel": np.array([[3.0, -4.0], [0.5, 0.0]]), "b.bias": np.array([-12.0])}


def test_clip_norm_scales_all_gradients_together() -> None:
    grads = _grads()
    norm = np.sqrt(9 + 16 + 0.25 + 144)
    clipped = clip_gradients(grads, None, 5.0)
    for k, g in grads.items():
        assert np.allclose(clipped[k], g * 5.0 / norm, rtol=1e-14)
    assert np.isclose(np.sqrt(sum((g ** 2).sum() for g in clipped.values())), 5.0)


def test_clip_norm_leaves_small_gradients_alone() -> None:
    grads = _grads()
    clipped = clip_gradients(grads, None, 100.0)
    assert all(np.array_equal(clipped[k], g) for k, g in grads.items())
    assert all(np.array_equal(clip_gradients(grads, None, None)[k], g)
               for k, g in grads.items())


def test_clip_value_clamps_elements() -> None:
    grads = _grads()
    clipped = clip_gradients(grads, 1.0, None)
    assert np.array_equal(clipped["a.kernel"], [[1.0, -1.0], [0.5, 0.0]])
    assert np.array_equal(clipped["b.bias"], [-1.0])


def test_clip_value_then_clip_norm() -> None:
    clipped = clip_gradients(_grads(), 1.0, 1.0)  # clamped first: norm sqrt(3.25)
    scale = 1.0 / np.sqrt(3.25)
    assert np.allclose(clipped["a.kernel"], np.array([[1.0, -1.0], [0.5, 0.0]]) * scale)
    assert np.allclose(clipped["b.bias"], [-scale])


# --- optimizers -----------------------------------------------------------------------------

P0 = np.array([0.5, -1.0, 2.0])
GRADS = (np.array([0.02, -0.3, 0.001]), np.array([-0.05, 0.1, 0.004]))
LR = 0.1


def _run(opt: OptimizerIR) -> tuple[Array, dict[str, Array]]:
    params, slots = {"w": P0.copy()}, {f"w:{s}": np.zeros(3) for s in optimizer_slots(opt)}
    for step, g in enumerate(GRADS, start=1):
        params, new_slots = optimizer_update(opt, params, {"w": g}, slots, step, LR)
        assert set(new_slots) == set(slots)
        slots = new_slots
    return params["w"], slots


def _sgd(momentum: float, nesterov: bool, wd: float = 0.0) -> Array:
    p, b = P0.copy(), np.zeros(3)
    for g in GRADS:
        g = g + wd * p
        b = momentum * b + g
        p = p - LR * ((g + momentum * b) if nesterov else b)
    return p


def _adam(b1: float, b2: float, eps: float, wd: float = 0.0, decoupled: bool = False
          ) -> Array:
    p, m, v = P0.copy(), np.zeros(3), np.zeros(3)
    for t, g in enumerate(GRADS, start=1):
        if decoupled:
            p = p - LR * wd * p
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - LR * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


def _rmsprop(rho: float, eps: float, wd: float = 0.0) -> Array:
    p, v = P0.copy(), np.zeros(3)
    for g in GRADS:
        g = g + wd * p
        v = rho * v + (1 - rho) * g * g
        p = p - LR * g / (np.sqrt(v) + eps)
    return p


SGD = {"momentum": 0.0, "nesterov": False}
ADAM = {"beta1": 0.8, "beta2": 0.9, "epsilon": 0.01}  # a large epsilon: its placement shows
OPTIMIZER_CASES = {
    "sgd": (OptimizerIR("sgd", LR, SGD, 0.0, None, None, None), _sgd(0.0, False)),
    "sgd-momentum": (OptimizerIR("sgd", LR, {**SGD, "momentum": 0.9}, 0.0, None, None, None),
                     _sgd(0.9, False)),
    "sgd-nesterov": (OptimizerIR("sgd", LR, {"momentum": 0.9, "nesterov": True}, 0.0, None,
                                 None, None), _sgd(0.9, True)),
    "sgd-weight-decay": (OptimizerIR("sgd", LR, SGD, 0.1, None, None, None),
                         _sgd(0.0, False, 0.1)),
    "sgd-momentum-weight-decay": (OptimizerIR("sgd", LR, {**SGD, "momentum": 0.5}, 0.1, None,
                                              None, None), _sgd(0.5, False, 0.1)),
    "rmsprop": (OptimizerIR("rmsprop", LR, {"rho": 0.8, "epsilon": 0.01}, 0.0, None, None,
                            None), _rmsprop(0.8, 0.01)),
    "rmsprop-weight-decay": (OptimizerIR("rmsprop", LR, {"rho": 0.8, "epsilon": 0.01}, 0.05,
                                         None, None, None), _rmsprop(0.8, 0.01, 0.05)),
    "adam": (OptimizerIR("adam", LR, ADAM, 0.0, None, None, None), _adam(0.8, 0.9, 0.01)),
    "adam-weight-decay": (OptimizerIR("adam", LR, ADAM, 0.1, None, None, None),
                          _adam(0.8, 0.9, 0.01, 0.1)),
    "adamw": (OptimizerIR("adamw", LR, ADAM, 0.1, None, None, None),
              _adam(0.8, 0.9, 0.01, 0.1, decoupled=True)),
    "adamw-no-decay": (OptimizerIR("adamw", LR, ADAM, 0.0, None, None, None),
                       _adam(0.8, 0.9, 0.01)),
}


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_optimizer_update(case: str) -> None:
    opt, expected = OPTIMIZER_CASES[case]
    got, _ = _run(opt)
    assert np.allclose(got, expected, rtol=1e-13, atol=0), (got, expected)


def test_optimizer_variants_differ() -> None:
    # The hand-written formulas above must tell the variants apart for these numbers.
    distinct = [_sgd(0.9, False), _sgd(0.9, True), _adam(0.8, 0.9, 0.01),
                _adam(0.8, 0.9, 0.01, 0.1), _adam(0.8, 0.9, 0.01, 0.1, decoupled=True)]
    for i, a in enumerate(distinct):
        for b in distinct[i + 1:]:
            assert not np.allclose(a, b, rtol=1e-6)
    # so must epsilon's placement (outside the sqrt) after Adam's first bias-corrected step
    g = GRADS[0]
    inside = P0 - LR * g / np.sqrt(g * g + 0.01)
    outside = P0 - LR * g / (np.abs(g) + 0.01)
    assert not np.allclose(inside, outside, rtol=1e-3)


def test_optimizer_slots_after_one_step() -> None:
    g = GRADS[0]
    _, slots = optimizer_update(
        OptimizerIR("adam", LR, ADAM, 0.0, None, None, None), {"w": P0},
        {"w": g}, {"w:m": np.zeros(3), "w:v": np.zeros(3)}, 1, LR)
    assert np.allclose(slots["w:m"], 0.2 * g) and np.allclose(slots["w:v"], 0.1 * g * g)
    _, slots = optimizer_update(
        OptimizerIR("sgd", LR, {"momentum": 0.9, "nesterov": False}, 0.0, None, None, None),
        {"w": P0}, {"w": g}, {"w:momentum": np.ones(3)}, 1, LR)
    assert np.allclose(slots["w:momentum"], 0.9 + g)
    _, slots = optimizer_update(
        OptimizerIR("rmsprop", LR, {"rho": 0.8, "epsilon": 0.01}, 0.0, None, None, None),
        {"w": P0}, {"w": g}, {"w:mean_square": np.ones(3)}, 1, LR)
    assert np.allclose(slots["w:mean_square"], 0.8 + 0.2 * g * g)
    _, slots = optimizer_update(OptimizerIR("sgd", LR, SGD, 0.0, None, None, None),
                                {"w": P0}, {"w": g}, {}, 1, LR)
    assert slots == {}


# --- batch-norm moving statistics -----------------------------------------------------------

@pytest.mark.parametrize("flat", [False, True], ids=["spatial", "flat"])
def test_moving_statistics(flat: bool) -> None:
    layers = ("[{type: conv2d, filters: 3, kernel: 2, name: c},"
              + (" {type: flatten, name: f}," if flat else "")
              + " {type: batch_norm, running_decay: 0.7, name: bn},"
              " {type: flatten}, {type: dense, units: 3}]")
    program = build(layers, (4, 4, 2))
    weights = random_weights(program)
    x, _ = data(program)
    values = reference_forward(program.graph, weights, x, training=True)
    stats = moving_statistics(program.graph, weights, values)
    assert set(stats) == {"bn.moving_mean", "bn.moving_var"}
    before = values["f" if flat else "c"]
    rows = before.reshape(-1, before.shape[-1])
    assert np.allclose(stats["bn.moving_mean"],
                       0.7 * weights["bn.moving_mean"] + 0.3 * rows.mean(axis=0), rtol=1e-13)
    assert np.allclose(stats["bn.moving_var"],
                       0.7 * weights["bn.moving_var"] + 0.3 * rows.var(axis=0, ddof=1),
                       rtol=1e-13)
