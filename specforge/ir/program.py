"""The whole compiled program: graph, loss, optimizer, schedule, metrics and settings.

Here the training-side implicit choices are settled: a final softmax (sigmoid) feeding
cross-entropy is folded into cross-entropy-from-logits, every optimizer hyper-parameter gets
its explicit value, and the schedule becomes a pure function of the step (:func:`lr_at`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from specforge.errors import Problem, SpecError
from specforge.ir.graph import Graph, freeze
from specforge.spec import training as T
from specforge.spec.schema import Spec
from specforge.spec.source import LoadedSpec

#: Probabilities are clipped to [EPS, 1 - EPS] when cross-entropy is taken of probabilities.
PROBABILITY_EPSILON = 1e-7


@dataclass(frozen=True)
class LossIR:
    """``kind``: cross_entropy | binary_cross_entropy | mse | mae; mean over the batch."""

    kind: str
    from_logits: bool
    label_smoothing: float
    classes: int


@dataclass(frozen=True)
class ScheduleIR:
    kind: str  # constant | step | multistep | exponential | cosine
    unit: str  # epoch | step
    warmup: int
    warmup_start_factor: float
    params: Mapping[str, Any]


@dataclass(frozen=True)
class OptimizerIR:
    """``kind``: sgd | rmsprop | adam | adamw; ``hyper`` holds every value explicitly."""

    kind: str
    learning_rate: float
    hyper: Mapping[str, Any]
    weight_decay: float
    clip_norm: float | None
    clip_value: float | None
    schedule: ScheduleIR | None


def optimizer_slots(opt: OptimizerIR) -> tuple[str, ...]:
    """The names of the state tensors the optimizer keeps per parameter, each of the
    parameter's shape: SGD's momentum buffer, RMSprop's mean square, Adam's two moments."""
    if opt.kind == "sgd":
        return ("momentum",) if opt.hyper["momentum"] else ()
    return ("mean_square",) if opt.kind == "rmsprop" else ("m", "v")


@dataclass(frozen=True)
class MetricIR:
    kind: str  # accuracy | precision | recall | f1 | top_k_accuracy
    label: str
    average: str | None = None
    k: int | None = None


@dataclass(frozen=True)
class Program:
    """What a backend receives: everything it must do, with nothing left to decide."""

    name: str
    seed: int
    graph: Graph
    #: Applied to the graph's output for predictions only (the loss takes logits).
    output_activation: str | None
    loss: LossIR
    optimizer: OptimizerIR
    metrics: tuple[MetricIR, ...]
    spec: Spec

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "input": list(self.graph.input.shape),
            "output": self.graph.output,
            "output_activation": self.output_activation,
            "nodes": [n.to_json() for n in self.graph],
            "loss": _plain(self.loss),
            "optimizer": _plain(self.optimizer),
            "metrics": [_plain(m) for m in self.metrics],
            "data": self.spec.data.model_dump(mode="json") if self.spec.data else None,
            "training": self.spec.training.model_dump(mode="json"),
            "totals": {"trainable_params": self.graph.trainable_params,
                       "non_trainable_params": self.graph.non_trainable_params,
                       "flops": self.graph.flops},
        }


def _plain(value: Any) -> Any:
    """JSON-ready data from IR dataclasses (``asdict`` cannot copy their frozen mappings)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def lower_training(spec: Spec, graph: Graph, loaded: LoadedSpec) -> Program:
    """Attach loss, optimizer and metrics to ``graph``, folding a final softmax/sigmoid."""
    problems: list[Problem] = []
    graph, loss, output_activation = _lower_loss(spec.loss, graph, loaded, problems)
    if not problems:
        _check_metrics(spec, loss.classes, loaded, problems)
    _check_normalize(spec, loaded, problems)
    if problems:
        raise SpecError(problems)
    return Program(
        name=spec.name or "model",
        seed=spec.seed,
        graph=graph,
        output_activation=output_activation,
        loss=loss,
        optimizer=_lower_optimizer(spec.optimizer),
        metrics=tuple(MetricIR(m.type, m.label,
                               (m.average or "macro") if m.type in ("precision", "recall", "f1")
                               else None,
                               (m.k or 5) if m.type == "top_k_accuracy" else None)
                      for m in spec.metrics),
        spec=spec,
    )


def _check_metrics(spec: Spec, classes: int, loaded: LoadedSpec,
                   problems: list[Problem]) -> None:
    """top_k_accuracy with k >= the number of classes is 1.0 whatever the model does."""
    for i, metric in enumerate(spec.metrics):
        k = metric.k or 5
        if metric.type == "top_k_accuracy" and k >= classes:
            path = ("metrics", i, "k") if metric.k is not None else ("metrics", i)
            problems.append(Problem(
                f"top_k_accuracy with k = {k} for a model with {classes} classes is always 1",
                loaded.sources.locate(path), path,
                f"k must be below the number of classes: 1 to {classes - 1}" if classes > 1
                else "use accuracy"))


def _check_normalize(spec: Spec, loaded: LoadedSpec, problems: list[Problem]) -> None:
    """A per-channel mean or std has one value per input channel."""
    if spec.data is None:
        return
    channels = spec.model.input[2]
    for name in ("mean", "std"):
        value = getattr(spec.data.normalize, name)
        if isinstance(value, list) and len(value) not in (1, channels):
            path = ("data", "normalize", name)
            problems.append(Problem(
                f"{len(value)} values for a model input with {channels} channel"
                f"{'s' if channels != 1 else ''} (model.input: {list(spec.model.input)})",
                loaded.sources.locate(path), path,
                f"give one value, or one per channel ({channels})"))


def _lower_loss(loss: Any, graph: Graph, loaded: LoadedSpec, problems: list[Problem]
                ) -> tuple[Graph, LossIR, str | None]:
    out = graph[graph.output]
    where = loaded.sources.locate(("loss",))
    if isinstance(loss, T.Regression):
        kind = "mse" if loss.type in ("mse", "mean_squared_error") else "mae"
        if len(out.shape) != 1:
            problems.append(Problem(f"{kind} needs a flat model output, got {out.shape}",
                                    where, ("loss",), "end the model with a dense layer"))
        return graph, LossIR(kind, False, 0.0, out.shape[-1]), None
    binary = isinstance(loss, T.BinaryCrossEntropy)
    kind, squash = ("binary_cross_entropy", "sigmoid") if binary else ("cross_entropy",
                                                                      "softmax")
    if len(out.shape) != 1 or (binary and out.shape != (1,)) or (not binary
                                                                 and out.shape[0] < 2):
        wanted = "one unit" if binary else "one unit per class (at least 2)"
        problems.append(Problem(f"{kind} needs a flat output with {wanted}, got {out.shape}",
                                where, ("loss",), "end the model with a dense layer of that "
                                                  "many units"))
        return graph, LossIR(kind, True, loss.label_smoothing, 0), None
    ends_in_squash = out.op == "activation" and out.attrs["fn"] == squash
    if ends_in_squash and loss.from_logits is True:
        problems.append(Problem(
            f"the model ends in {squash} but the loss says from_logits: true",
            loaded.sources.locate(("loss", "from_logits")), ("loss", "from_logits"),
            f"use from_logits: auto (the {squash} is folded into the loss), or remove the "
            f"final {squash}"))
    classes = out.shape[0] if not binary else 2
    if ends_in_squash:
        logits = out.inputs[0]
        nodes = tuple(n for n in graph if n.name != out.name)
        folded = Graph(nodes, logits)
        return folded, LossIR(kind, True, loss.label_smoothing, classes), squash
    from_logits = loss.from_logits is not False
    return graph, LossIR(kind, from_logits, loss.label_smoothing, classes), (
        squash if from_logits else None)


def _lower_optimizer(opt: Any) -> OptimizerIR:
    schedule = _lower_schedule(opt.schedule) if opt.schedule is not None else None
    if isinstance(opt, T.SGD):
        kind = "sgd"
        hyper: dict[str, Any] = {"momentum": opt.effective_momentum, "nesterov": opt.nesterov}
        decay = opt.weight_decay
    elif isinstance(opt, T.RMSprop):
        kind, hyper, decay = "rmsprop", {"rho": opt.rho, "epsilon": opt.epsilon}, opt.weight_decay
    else:
        kind = opt.type
        hyper = {"beta1": opt.beta1, "beta2": opt.beta2, "epsilon": opt.epsilon}
        decay = opt.effective_weight_decay
    return OptimizerIR(kind, opt.learning_rate, freeze(hyper), decay, opt.clip_norm,
                       opt.clip_value, schedule)


def _lower_schedule(s: Any) -> ScheduleIR:
    params = {k: v for k, v in s.model_dump().items()
              if k not in ("type", "unit", "warmup", "warmup_start_factor")}
    if "milestones" in params:
        params["milestones"] = tuple(params["milestones"])
    return ScheduleIR(s.type, s.unit, s.warmup, s.warmup_start_factor, freeze(params))


def step_decay(base: float, t: int, p: Any) -> float:
    return base * p["gamma"] ** (t // p["step_size"])


def multistep(base: float, t: int, p: Any) -> float:
    return base * p["gamma"] ** sum(1 for m in p["milestones"] if m <= t)


def exponential(base: float, t: int, p: Any) -> float:
    return base * p["gamma"] ** t


def cosine(base: float, t: int, p: Any) -> float:
    progress = min(t, p["t_max"]) / p["t_max"]
    return p["min_lr"] + (base - p["min_lr"]) * (1 + math.cos(math.pi * progress)) / 2


def constant(base: float, t: int, p: Any) -> float:
    return base


#: The rate at time t after warmup, per schedule kind (a built script keeps only its spec's).
SCHEDULES = {"step": step_decay, "multistep": multistep, "exponential": exponential,
             "cosine": cosine, "constant": constant}


def lr_at(optimizer: OptimizerIR, step: int, steps_per_epoch: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based). Every backend calls this.

    With ``unit: epoch`` the schedule's time is ``t = step // steps_per_epoch``. During the
    first ``warmup`` units the rate rises linearly from ``warmup_start_factor * lr`` towards
    ``lr``; the schedule proper then starts at t = 0.
    """
    base = optimizer.learning_rate
    s = optimizer.schedule
    if s is None:
        return base
    t = step // steps_per_epoch if s.unit == "epoch" else step
    if t < s.warmup:
        return base * (s.warmup_start_factor + (1 - s.warmup_start_factor) * t / s.warmup)
    return SCHEDULES[s.kind](base, t - s.warmup, s.params)
