"""The conformance suite: small cases that together cover every op and option of the spec
language, each checked for forward, gradients and N training steps.

Like ONNX's backend test suite, the cases are code and ship with the package, so a
third-party backend runs the same suite against itself (``specforge conform --suite
--backends mine``). A backend lists what it cannot do in ``Backend.conformance_excludes``
(case name pattern -> reason); excluded cases are reported with their reasons, never
silently dropped. A case may carry its own tolerance, with the reason written next to it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from specforge.conformance.check import Report, conform
from specforge.conformance.compare import Tolerance

INPUT = [8, 8, 3]
HEAD = [{"type": "flatten"}, {"type": "dense", "units": 4}]


@dataclass(frozen=True)
class Case:
    """One spec of the suite. ``layers`` end in the model's output; the loss, optimizer and
    metrics default to cross-entropy, Adam and accuracy."""

    name: str
    layers: list[dict[str, Any]]
    loss: dict[str, Any] = field(default_factory=lambda: {"type": "cross_entropy"})
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"type": "adam", "learning_rate": 0.01})
    metrics: list[Any] = field(default_factory=lambda: ["accuracy"])
    input: list[int] = field(default_factory=lambda: list(INPUT))
    #: classes of the synthetic data (64 images of ``input``'s shape)
    classes: int = 4
    batch_size: int = 8
    #: pixels (0..255) are multiplied by this
    pixel_scale: float = 1 / 255
    steps: int = 20
    tolerance: Tolerance = field(default_factory=Tolerance)

    def spec_text(self) -> str:
        spec = {"name": self.name, "seed": 11, "model": {"input": self.input,
                                                          "layers": self.layers},
                "loss": self.loss, "optimizer": self.optimizer, "metrics": self.metrics,
                "data": {"source": {"type": "synthetic", "samples": 64,
                                    "classes": self.classes},
                         "normalize": {"scale": self.pixel_scale},
                         "batch_size": self.batch_size},
                "training": {"epochs": 1}}
        return yaml.safe_dump(spec, sort_keys=False)


SGD_MOMENTUM = {"type": "sgd", "learning_rate": 0.01, "momentum": 0.9}


def _conv(filters: int = 4, kernel: Any = 3, **options: Any) -> dict[str, Any]:
    return {"type": "conv2d", "filters": filters, "kernel": kernel, **options}


def _padding_cases() -> list[Case]:
    """Each padding mode with odd and even kernels at strides 1 and 2."""
    cases = []
    for mode in ("zeros", "reflect", "replicate"):
        for kernel in (3, 2):
            for stride in (1, 2):
                conv = _conv(kernel=kernel, strides=stride, padding="same", padding_mode=mode,
                             activation="tanh")
                cases.append(Case(f"padding-{mode}-k{kernel}-s{stride}", [conv, *HEAD]))
    cases.append(Case("padding-explicit-per-side", [
        _conv(kernel=[2, 3], padding={"top": 2, "bottom": 0, "left": 1, "right": 3},
              padding_mode="reflect", activation="tanh"),
        {"type": "pad2d", "padding": [1, 2], "mode": "replicate"}, *HEAD]))
    cases.append(Case("padding-constant-same-lower", [
        _conv(kernel=2, padding="same_lower", padding_mode="constant", pad_value=0.5,
              activation="tanh"),
        {"type": "depthwise_conv2d", "kernel": 3, "strides": 2, "padding": "same_lower",
         "padding_mode": "constant", "pad_value": -1.0},
        {"type": "pad2d", "padding": {"top": 0, "bottom": 1, "left": 2, "right": 0},
         "mode": "constant", "pad_value": 0.25}, *HEAD]))
    # Keras refuses strides with dilation in its own conv layers; hard_sigmoid with ONNX's
    # alpha (its kinks at -2 and 3 are inside the conv's outputs at this pixel scale)
    cases.append(Case("conv-strides-with-dilation-hard-sigmoid-alpha-beta", [
        _conv(6, 3, strides=2, dilation=2, padding="same", activation="relu"),
        {"type": "depthwise_conv2d", "kernel": 2, "strides": [2, 1], "dilation": [1, 2],
         "padding": 1, "activation": {"fn": "hard_sigmoid", "alpha": 0.2, "beta": 0.4}},
        *HEAD], pixel_scale=0.05, optimizer=SGD_MOMENTUM))
    cases.append(Case("conv-dilation-groups-depthwise", [
        _conv(8, 3, dilation=2, padding="same", activation="relu"),
        _conv(8, 3, groups=2, padding="valid", activation="elu"),
        {"type": "depthwise_conv2d", "kernel": 3, "depth_multiplier": 2, "padding": "same",
         "activation": "silu"}, *HEAD]))
    return cases


def _pooling_cases() -> list[Case]:
    cases = []
    for kind in ("max_pool2d", "avg_pool2d"):
        for padding, pool, stride in (("valid", 2, 2), ("same", 3, 2), ("same", 2, 1)):
            cases.append(Case(f"{kind}-{padding}-p{pool}-s{stride}", [
                _conv(activation="relu", padding="same"),
                {"type": kind, "pool": pool, "strides": stride, "padding": padding}, *HEAD]))
    relu = _conv(activation="relu", padding="same")
    cases += [
        Case("max_pool2d-ceil-dilation-pad-value", [
            relu, {"type": "max_pool2d", "pool": 3, "strides": 2, "dilation": 2, "padding": 1,
                   "ceil_mode": True},
            {"type": "max_pool2d", "pool": 2, "strides": 1, "padding": "same_lower",
             "pad_value": 0.5}, *HEAD]),
        Case("avg_pool2d-ceil-count-include-pad-dilation-pad-value", [
            relu, {"type": "avg_pool2d", "pool": 3, "strides": 2, "padding": 1,
                   "ceil_mode": True, "count_include_pad": True},
            {"type": "avg_pool2d", "pool": 2, "strides": 1, "dilation": 2,
             "padding": [1, 0], "pad_value": 0.25}, *HEAD]),
    ]
    for kind in ("global_avg_pool2d", "global_max_pool2d"):
        cases.append(Case(kind, [_conv(8, activation="relu"), {"type": kind},
                                 {"type": "dense", "units": 4}]))
    return cases


ACTIVATIONS = ["linear", "relu", "relu6", {"fn": "leaky_relu", "negative_slope": 0.2},
               {"fn": "elu", "alpha": 0.7}, "selu", "gelu", "gelu_tanh", "silu", "sigmoid",
               "hard_sigmoid", "hard_swish", "tanh", "softplus", "softsign", "softmax"]


def _activation_cases() -> list[Case]:
    cases = []
    for act in ACTIVATIONS:
        fn = act if isinstance(act, str) else act["fn"]
        layer = {"type": "activation", **({"fn": act} if isinstance(act, str) else act)}
        # pixels in [0, 12.75] put the conv's outputs (glorot weights) in about [-10, 10],
        # across every kink and bend: relu6's 6, hard sigmoid's +-3, softsign's curve
        # SGD with momentum: the activation is under test here. Adam turns the rounding
        # noise of near-zero gradients into steps of size lr (its update is g / |g|), which
        # the optimizer cases cover on their own.
        cases.append(Case(f"activation-{fn}", [_conv(6, 3, padding="same"), layer, *HEAD],
                          pixel_scale=0.05, optimizer=SGD_MOMENTUM))
    return cases


def _layer_cases() -> list[Case]:
    residual = [
        _conv(4, 3, padding="same", name="stem", activation="relu"),
        _conv(4, 3, padding="same", name="branch", bias=False),
        {"type": "batch_norm", "name": "bn"},
        {"type": "add", "inputs": ["stem", "bn"], "name": "sum"},
        _conv(2, 1, name="side", inputs="stem"),
        {"type": "concat", "inputs": ["sum", "side"]}, *HEAD]
    # a channel gate (the (C,) form of multiply), then a product of two feature maps
    squeeze_excite = [
        _conv(6, 3, padding="same", name="stem", activation="relu"),
        {"type": "global_avg_pool2d", "name": "squeeze"},
        {"type": "dense", "units": 3, "activation": "relu"},
        {"type": "dense", "units": 6, "activation": "sigmoid", "name": "excite"},
        {"type": "multiply", "inputs": ["stem", "excite"], "name": "scaled"},
        _conv(6, 1, name="side", inputs="stem", activation="tanh"),
        {"type": "multiply", "inputs": ["side", "scaled"]}, *HEAD]
    # a crop of one pixel a side matches a valid 3x3 conv's output (NASNet's pattern), then
    # an uneven crop of the sum
    cropping = [
        _conv(4, 3, padding="same", name="stem", activation="relu"),
        {"type": "cropping2d", "cropping": 1, "name": "centre"},
        _conv(4, 3, name="side", inputs="stem"),
        {"type": "add", "inputs": ["centre", "side"]},
        {"type": "cropping2d", "cropping": {"top": 1, "bottom": 0, "left": 2, "right": 1}},
        *HEAD]
    # ShuffleNetV2's stride-1 unit: half the channels pass, half go through the branch,
    # then the two are interleaved; a shuffle of three groups after it
    shuffle = [
        _conv(8, 3, padding="same", name="stem", activation="relu"),
        {"type": "channel_slice", "stop": 4, "name": "kept"},
        {"type": "channel_slice", "start": 4, "inputs": "stem"},
        _conv(4, 1, activation="relu"),
        {"type": "depthwise_conv2d", "kernel": 3, "padding": "same"},
        _conv(4, 1, activation="relu", name="branch"),
        {"type": "concat", "inputs": ["kept", "branch"]},
        {"type": "channel_shuffle", "groups": 2},
        _conv(6, 3), {"type": "channel_shuffle", "groups": 3}, *HEAD]
    return [
        Case("batch-norm", [_conv(6, 3, bias=False),
                            {"type": "batch_norm", "running_decay": 0.8, "epsilon": 1e-3},
                            {"type": "activation", "fn": "relu"}, *HEAD]),
        Case("batch-norm-without-scale-and-center", [
            _conv(6, 3, bias=False),
            {"type": "batch_norm", "scale": False, "center": False}, *HEAD]),
        # no bias before a batch norm: its true gradient is zero, and Adam would turn the
        # rounding noise of that zero into steps of size lr
        # each pixel's channels, then each sample's features; Keras's epsilon, then torch's
        Case("layer-norm", [_conv(6, 3, activation="relu"), {"type": "layer_norm"},
                            *HEAD[:1], {"type": "dense", "units": 8},
                            {"type": "layer_norm", "epsilon": 1e-5},
                            {"type": "activation", "fn": "gelu"},
                            {"type": "dense", "units": 4}]),
        # groups of an image's channels over their pixels (and instance norm, one channel a
        # group, of a conv without relu, whose zeros would be all rounding, and without bias,
        # which the norm cancels: Adam would step on their rounding noise),
        # then groups of four features (two would normalise to +-1, of true gradient 0);
        # Keras's epsilon, then torch's
        Case("group-norm", [_conv(6, 3, bias=False), {"type": "group_norm", "groups": 6},
                            _conv(6, 3, activation="relu"), {"type": "group_norm", "groups": 2},
                            *HEAD[:1], {"type": "dense", "units": 8},
                            {"type": "group_norm", "groups": 2, "epsilon": 1e-5},
                            {"type": "activation", "fn": "gelu"},
                            {"type": "dense", "units": 4}]),
        # a learned slope per channel of an image (torch's init), then per feature (Keras's 0)
        Case("prelu", [_conv(6, 3), {"type": "prelu"}, *HEAD[:1],
                       {"type": "dense", "units": 8}, {"type": "prelu", "alpha_init": 0.0},
                       {"type": "dense", "units": 4}]),
        Case("batch-norm-on-features", [*HEAD[:1], {"type": "dense", "units": 16,
                                                    "bias": False},
                                         {"type": "batch_norm"},
                                         {"type": "dense", "units": 4}]),
        # batches of one image: one value per channel, a batch variance of 0
        Case("batch-norm-on-features-one-image-batches",
             [*HEAD[:1], {"type": "dense", "units": 16, "bias": False},
              {"type": "batch_norm"}, {"type": "dense", "units": 4}], batch_size=1),
        Case("dropout", [_conv(6, 3, activation="relu"), {"type": "dropout", "rate": 0.3},
                         *HEAD]),
        Case("dropout-spatial", [_conv(6, 3, activation="relu"),
                                 {"type": "dropout", "rate": 0.3, "spatial": True}, *HEAD]),
        # drop-connect: whole samples of a residual branch, then of a feature vector
        Case("dropout-per-sample", [
            _conv(6, 3, activation="relu", name="stem"),
            _conv(6, 3, padding="same", activation="relu", name="branch"),
            {"type": "dropout", "rate": 0.5, "per_sample": True, "name": "drop_connect"},
            {"type": "add", "inputs": ["stem", "drop_connect"]}, *HEAD[:1],
            {"type": "dense", "units": 8, "activation": "tanh"},
            {"type": "dropout", "rate": 0.3, "per_sample": True},
            {"type": "dense", "units": 4}]),
        # after a flatten, the mask is in (height, width, channel) order on every backend
        Case("dropout-after-flatten", [_conv(3, 3, activation="relu"), *HEAD[:1],
                                       {"type": "dropout", "rate": 0.5},
                                       {"type": "dense", "units": 4}]),
        # a scalar and a per-channel rescaling on the image (as a model's own
        # preprocessing), a per-feature one between dense layers
        Case("rescaling", [
            {"type": "rescaling", "scale": 2.0, "offset": -1.0},
            {"type": "rescaling", "scale": [1.0, 0.5, 2.0], "offset": [0.1, -0.2, 0.3]},
            _conv(4, 3, activation="relu"), *HEAD[:1],
            {"type": "dense", "units": 6, "activation": "tanh"},
            {"type": "rescaling", "scale": [1.5, -1.0, 0.5, 2.0, 1.0, -0.5]},
            {"type": "dense", "units": 4}]),
        Case("add-concat-residual", residual),
        Case("multiply-squeeze-excite", squeeze_excite),
        Case("cropping2d", cropping),
        Case("channel-shuffle", shuffle),
        # channels from the middle of an image, then features from a vector
        Case("channel-slice", [_conv(6, 3, activation="tanh"),
                               {"type": "channel_slice", "start": 1, "stop": 5}, *HEAD[:1],
                               {"type": "dense", "units": 12, "activation": "relu"},
                               {"type": "channel_slice", "start": 2},
                               {"type": "dense", "units": 4}]),
        Case("dense-stack", [*HEAD[:1], {"type": "dense", "units": 12, "activation": "relu"},
                             {"type": "dense", "units": 4, "bias": False}]),
    ]


SMALL = [_conv(4, 3, strides=2, activation="relu"), *HEAD]


def _loss_cases() -> list[Case]:
    body = SMALL[:-1]
    # an op between the softmax (sigmoid) and the loss keeps it from being folded, so the
    # loss really takes probabilities
    probabilities = [*body, {"type": "dense", "units": 4, "activation": "softmax"},
                     {"type": "activation", "fn": "linear"}]
    binary_probabilities = [*body, {"type": "dense", "units": 1, "activation": "sigmoid"},
                            {"type": "activation", "fn": "linear"}]
    return [
        Case("loss-cross-entropy-folded-softmax",
             [*body, {"type": "dense", "units": 4, "activation": "softmax"}]),
        Case("loss-cross-entropy-label-smoothing", SMALL,
             loss={"type": "cross_entropy", "label_smoothing": 0.1}),
        Case("loss-cross-entropy-on-probabilities", probabilities,
             loss={"type": "cross_entropy", "from_logits": False}),
        Case("loss-binary-cross-entropy", [*body, {"type": "dense", "units": 1}], classes=2,
             loss={"type": "binary_cross_entropy", "label_smoothing": 0.05}),
        Case("loss-binary-cross-entropy-on-probabilities", binary_probabilities, classes=2,
             loss={"type": "binary_cross_entropy", "from_logits": False}),
        Case("loss-mse", SMALL, loss={"type": "mse"}),
        Case("loss-mae", SMALL, loss={"type": "mae"}),
    ]


def _optimizer_cases() -> list[Case]:
    cosine = {"type": "cosine", "t_max": 12, "min_lr": 0.001, "unit": "step", "warmup": 3,
              "warmup_start_factor": 0.2}
    optimizers = {
        "sgd": {"type": "sgd", "learning_rate": 0.1},
        "sgd-momentum-step": {"type": "sgd", "learning_rate": 0.05, "momentum": 0.9,
                              "schedule": {"type": "step", "step_size": 5, "gamma": 0.5,
                                           "unit": "step"}},
        "sgd-nesterov-cosine-weight-decay": {"type": "sgd", "learning_rate": 0.05,
                                             "momentum": 0.9, "nesterov": True,
                                             "weight_decay": 1e-3, "schedule": cosine},
        "rmsprop": {"type": "rmsprop", "learning_rate": 0.003},
        "rmsprop-multistep-clip-value": {
            "type": "rmsprop", "learning_rate": 0.003, "clip_value": 0.05,
            "schedule": {"type": "multistep", "milestones": [5, 12], "unit": "step"}},
        "adam-exponential-clip-norm": {
            "type": "adam", "learning_rate": 0.01, "clip_norm": 0.5,
            "schedule": {"type": "exponential", "gamma": 0.9, "unit": "step"}},
        "adam-weight-decay": {"type": "adam", "learning_rate": 0.01, "weight_decay": 1e-2},
        "adamw": {"type": "adamw", "learning_rate": 0.01, "weight_decay": 0.05},
    }
    return [Case(f"optimizer-{name}", SMALL, optimizer=opt) for name, opt in
            optimizers.items()]


def _metric_cases() -> list[Case]:
    metrics = ["accuracy", {"type": "precision", "average": "macro"},
               {"type": "recall", "average": "micro"}, {"type": "f1", "average": "macro"},
               {"type": "top_k_accuracy", "k": 2}]
    return [Case("metrics", SMALL, metrics=metrics)]


CASES: list[Case] = [*_padding_cases(), *_pooling_cases(), *_activation_cases(),
                     *_layer_cases(), *_loss_cases(), *_optimizer_cases(), *_metric_cases()]


def select(patterns: Sequence[str] = ()) -> list[Case]:
    """The cases whose names match any of the glob ``patterns`` (all without patterns)."""
    return [c for c in CASES if not patterns or any(fnmatch.fnmatch(c.name, p)
                                                     for p in patterns)]


def exclusion(case: Case, backend: Any) -> str | None:
    """Why ``backend`` skips ``case``, or None."""
    for pattern, reason in getattr(backend, "conformance_excludes", {}).items():
        if fnmatch.fnmatch(case.name, pattern):
            return reason
    return None


def run_case(case: Case, backends: Sequence[str], device: str | None = None,
             reference: bool = True, log: Callable[[str], None] = lambda m: None) -> Report:
    """Compile ``case`` and compare ``backends`` (and the reference) on it."""
    from specforge.compiler import compile_text
    from specforge.data.pipeline import build_pipeline

    program = compile_text(case.spec_text(), f"<conformance case {case.name}>")
    return conform(program, build_pipeline(program), backends, case.steps, device,
                   case.tolerance, reference, case.name, log)


@dataclass(frozen=True)
class CaseResult:
    case: Case
    #: backend -> why it skipped the case
    excluded: dict[str, str]
    #: None when too few backends were left to compare
    report: Report | None

    @property
    def passed(self) -> bool:
        """Nothing compared failed (an excluded case passes)."""
        return self.report is None or self.report.passed


def run_suite(cases: Sequence[Case], backends: dict[str, Any], device: str | None = None,
              reference: bool = True, log: Callable[[str], None] = lambda m: None
              ) -> list[CaseResult]:
    """Every case through every backend that does not exclude it."""
    results = []
    for case in cases:
        excluded = {name: reason for name, impl in backends.items()
                    if (reason := exclusion(case, impl)) is not None}
        running = [name for name in backends if name not in excluded]
        enough = len(running) >= (1 if reference else 2)
        log(f"case {case.name}: {', '.join(running) or 'no backend'}")
        report = run_case(case, running, device, reference) if enough else None
        results.append(CaseResult(case, excluded, report))
    return results
