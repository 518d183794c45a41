"""Everything the seed document describes is expressible and lowers to explicit IR."""

from __future__ import annotations

import pytest
import yaml

from specforge.compiler import compile_spec
from specforge.ir.ops import ACTIVATION_FORMULAS
from specforge.spec.layers import ActivationName


def _compile(tmp_path, layers, loss=None, optimizer=None, input_shape=(12, 12, 3)):
    spec = {
        "model": {"input": list(input_shape), "layers": layers},
        "loss": loss or {"type": "cross_entropy"},
        "optimizer": optimizer or {"type": "sgd"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return compile_spec(path)


HEAD = [{"type": "flatten"}, {"type": "dense", "units": 4}]


@pytest.mark.parametrize("fn", list(ActivationName.__args__))
def test_every_activation_is_a_layer_and_an_inline_option(tmp_path, fn):
    program = _compile(tmp_path, [{"type": "conv2d", "filters": 2, "kernel": 3,
                                   "activation": fn}, {"type": "activation", "fn": fn}, *HEAD])
    acts = [n for n in program.graph if n.op == "activation"]
    assert [n.attrs["fn"] for n in acts] == [fn, fn]
    assert fn in ACTIVATION_FORMULAS


def test_activation_parameters_are_explicit_in_the_ir(tmp_path):
    program = _compile(tmp_path, [
        {"type": "activation", "fn": "leaky_relu"},
        {"type": "activation", "fn": "leaky_relu", "negative_slope": 0.3},
        {"type": "conv2d", "filters": 2, "kernel": 1, "activation": {"fn": "elu", "alpha": 0.5}},
        {"type": "activation", "fn": "elu"}, *HEAD])
    acts = [dict(n.attrs) for n in program.graph if n.op == "activation"]
    assert acts == [{"fn": "leaky_relu", "negative_slope": 0.01},
                    {"fn": "leaky_relu", "negative_slope": 0.3},
                    {"fn": "elu", "alpha": 0.5}, {"fn": "elu", "alpha": 1.0}]


@pytest.mark.parametrize(("padding", "pads", "shape"), [
    ("valid", (0, 0, 0, 0), (10, 10, 2)),   # no padding
    ("same", (1, 1, 1, 1), (12, 12, 2)),    # zero padding that keeps the size
    (2, (2, 2, 2, 2), (14, 14, 2)),
    ([1, 0], (1, 1, 0, 0), (12, 10, 2)),
    ({"top": 0, "bottom": 2, "left": 1, "right": 0}, (0, 2, 1, 0), (12, 11, 2)),
])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
def test_padding_forms_and_modes(tmp_path, padding, pads, shape, mode):
    program = _compile(tmp_path, [{"type": "conv2d", "filters": 2, "kernel": 3,
                                   "padding": padding, "padding_mode": mode}, *HEAD])
    conv = program.graph["conv2d_1"]
    assert conv.attrs["pads"] == pads and conv.attrs["pad_mode"] == mode
    assert conv.shape == shape


def test_same_padding_with_stride_two_puts_the_odd_pixel_after(tmp_path):
    program = _compile(tmp_path, [{"type": "conv2d", "filters": 2, "kernel": 3, "strides": 2,
                                   "padding": "same"}, *HEAD], input_shape=(8, 8, 1))
    conv = program.graph["conv2d_1"]
    assert conv.attrs["pads"] == (0, 1, 0, 1)   # Keras/TF convention, explicit in the IR
    assert conv.shape == (4, 4, 2)


@pytest.mark.parametrize("pool", ["max_pool2d", "avg_pool2d", "max_pooling2d",
                                  "average_pooling2d"])
def test_pooling_kinds(tmp_path, pool):
    program = _compile(tmp_path, [{"type": pool, "pool": 3, "strides": 2, "padding": "same"},
                                  *HEAD], input_shape=(7, 7, 2))
    node = program.graph["max_pool2d_1" if "max" in pool else "avg_pool2d_1"]
    assert node.shape == (4, 4, 2) and node.attrs["pads"] == (1, 1, 1, 1)


@pytest.mark.parametrize(("loss", "kind", "fold"), [
    ({"type": "categorical_crossentropy"}, "cross_entropy", "softmax"),
    ({"type": "cross_entropy", "label_smoothing": 0.1}, "cross_entropy", "softmax"),
    ({"type": "mae"}, "mae", None),
    ({"type": "mean_squared_error"}, "mse", None),
])
def test_losses_of_the_seed(tmp_path, loss, kind, fold):
    program = _compile(tmp_path, [*HEAD[:1], {"type": "dense", "units": 4,
                                              "activation": "softmax"}], loss=loss)
    assert program.loss.kind == kind
    assert program.output_activation == fold
    # regression losses compare the softmax output itself, so it stays in the graph
    assert (program.graph[program.graph.output].op == "activation") == (fold is None)


@pytest.mark.parametrize(("optimizer", "kind", "hyper"), [
    ({"type": "gradient_descent", "learning_rate": 0.1}, "sgd",
     {"momentum": 0.0, "nesterov": False}),
    ({"type": "sgd"}, "sgd", {"momentum": 0.0, "nesterov": False}),
    ({"type": "momentum"}, "sgd", {"momentum": 0.9, "nesterov": False}),
    ({"type": "sgd", "momentum": 0.8, "nesterov": True}, "sgd",
     {"momentum": 0.8, "nesterov": True}),
    ({"type": "rmsprop"}, "rmsprop", {"rho": 0.9, "epsilon": 1e-7}),
    ({"type": "adam"}, "adam", {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-7}),
    ({"type": "adamw"}, "adamw", {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-7}),
])
def test_optimizers_of_the_seed_have_every_value_explicit(tmp_path, optimizer, kind, hyper):
    program = _compile(tmp_path, HEAD, optimizer=optimizer)
    assert program.optimizer.kind == kind
    assert dict(program.optimizer.hyper) == hyper
    assert program.optimizer.weight_decay == (0.01 if kind == "adamw" else 0.0)


def test_metrics_of_the_seed(tmp_path):
    spec = {"model": {"input": [4, 4, 1], "layers": HEAD}, "loss": {"type": "cross_entropy"},
            "optimizer": {"type": "sgd"},
            "metrics": ["accuracy", "recall", "precision", {"type": "f1", "average": "micro"},
                        {"type": "top_k_accuracy", "k": 3}]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(spec))
    labels = [m.label for m in compile_spec(path).metrics]
    assert labels == ["accuracy", "recall_macro", "precision_macro", "f1_micro",
                      "top_3_accuracy"]
