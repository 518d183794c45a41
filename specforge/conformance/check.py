"""`specforge conform`: run one program through every backend and the reference, compare.

Every backend starts from specforge's initial weights and sees the same batches, the same
learning rates and the same dropout masks (:mod:`specforge.conformance.masks`). Three
phases, each compared quantity by quantity (:mod:`specforge.conformance.compare`):

1. **forward**: the output of the first training batch in evaluation and in training mode,
   and the loss;
2. **gradients** of every trainable parameter on that batch;
3. **after N steps**: the per-step losses, every parameter and statistic, the optimizer
   state, the output in evaluation mode and the spec's metrics on the first batch, against
   the chaos floor of a perturbed run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from specforge.backends import Probe, load_backend
from specforge.conformance.compare import (
    GROUP_SHARE,
    Difference,
    Tolerance,
    difference,
    magnitude,
    move_one_ulp,
)
from specforge.conformance.masks import dropout_masks
from specforge.ir.program import Program, lr_at
from specforge.metrics import MetricAccumulator
from specforge.weights import initial_weights

REFERENCE = "reference"
#: the purpose of the chaos floor's random stream (the data pipeline's are 1 to 3; 4 was
#: dropout masks', which now come from specforge.ir.randomness)
PERTURB = 5
PHASES = ("forward", "gradients", "after N steps")
Quantities = dict[str, np.ndarray]


@dataclass(frozen=True)
class Row:
    """One quantity compared across backends: ``pairs`` maps "keras vs torch" or
    "torch vs reference" to the difference; the ``decisive`` pairs decide pass or fail."""

    phase: str
    quantity: str
    pairs: Mapping[str, Difference]
    tolerance: float
    floor: float | None = None
    decisive: tuple[str, ...] = ()
    #: after N steps: the most the tolerance could be, whatever the floor
    ceiling: float | None = None

    @property
    def passed(self) -> bool:
        return all(self.pairs[p].max_abs <= self.tolerance
                   for p in self.decisive or tuple(self.pairs))

    @property
    def off(self) -> list[str]:
        """Which backends are wrong: those further than the tolerance from the reference,
        or, failing that, the one furthest from it."""
        distance = {pair.split(" vs ")[0]: d.max_abs for pair, d in self.pairs.items()
                    if pair.endswith(f" vs {REFERENCE}")}
        beyond = [b for b, d in distance.items() if d > self.tolerance]
        if beyond or self.passed or not distance:
            return beyond
        return [max(distance, key=lambda b: distance[b])]


@dataclass
class Report:
    spec: str
    steps: int
    backends: list[str]
    reference: bool
    tolerance: Tolerance
    devices: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    #: per-step losses by run: each backend, the reference, and each perturbed run
    losses: dict[str, list[float]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]


def _masks(program: Program, step: int, batch: int) -> dict[str, np.ndarray]:
    return dropout_masks(program.graph, program.seed, step, batch)


def first_look(probe: Probe, program: Program, x: np.ndarray, y: np.ndarray
               ) -> dict[str, Quantities]:
    """Forward outputs, loss and gradients on the first batch (no update)."""
    masks = _masks(program, 0, len(x))
    forward = {"output (evaluation)": probe.output(x, False, {}),
               "output (training)": probe.output(x, True, masks)}
    loss, grads = probe.gradients(x, y, masks)
    forward["loss"] = np.float64(loss)
    return {"forward": forward, "gradients": grads}


def train(probe: Probe, program: Program, pipeline: Any, steps: int,
          jitter: Callable[[np.ndarray, int], np.ndarray] | None = None
          ) -> tuple[list[float], Quantities]:
    """``steps`` training steps: the per-step losses, and what to compare afterwards (the
    losses, the final state, the evaluation-mode output of the first batch and the metrics
    on it)."""
    per_epoch = pipeline.steps_per_epoch(program.spec.training.steps_per_epoch)
    losses = []
    for step in range(steps):
        batch = pipeline.train_batch(step)
        x = batch.x if jitter is None else jitter(batch.x, step)
        lr = lr_at(program.optimizer, step, per_epoch)
        losses.append(probe.step(x, batch.y, lr, _masks(program, step, len(x))))
    first = pipeline.train_batch(0)
    state = {"loss per step": np.asarray(losses), **probe.state()}
    state["output (evaluation)"] = output = probe.output(first.x, False, {})
    metrics = MetricAccumulator(program.metrics, program.loss.classes)
    metrics.update(output, first.y)
    state.update({f"metric {k}": np.float64(v) for k, v in metrics.result().items()})
    return losses, state


def conform(program: Program, pipeline: Any, backends: Sequence[str], steps: int = 20,
            device: str | None = None, tolerance: Tolerance | None = None,
            reference: bool = True, spec_name: str = "",
            log: Callable[[str], None] = lambda message: None) -> Report:
    """Run ``program`` through ``backends`` (and the numpy reference) and compare."""
    tolerance = tolerance or Tolerance()
    impls = {name: load_backend(name) for name in backends}
    start = initial_weights(program.graph, program.seed)
    report = Report(spec_name or program.name, steps, list(backends), reference, tolerance)

    def fresh(name: str, weights: Mapping[str, np.ndarray] = start) -> Probe:
        from specforge.reference.probe import ReferenceProbe

        probe = ReferenceProbe(program, weights) if name == REFERENCE else \
            impls[name].create_probe(program, device, weights)
        report.devices[name] = probe.device
        report.notes.extend(n for n in probe.notes if n not in report.notes)
        return probe

    names = [*backends, REFERENCE] if reference else list(backends)
    batch = pipeline.train_batch(0)
    looks, finals = {}, {}
    for name in names:
        log(f"{name}: forward and gradients on the first batch")
        looks[name] = first_look(fresh(name), program, batch.x, batch.y)
        log(f"{name}: {steps} training steps")
        report.losses[name], finals[name] = train(fresh(name), program, pipeline, steps)
    floors = chaos_floors(program, pipeline, backends, steps, start, finals, fresh, report,
                          log)

    for phase in ("forward", "gradients"):
        rtol = tolerance.forward_rtol if phase == "forward" else tolerance.gradient_rtol
        report.rows += compare_phase(phase, {n: looks[n][phase] for n in names}, backends,
                                     reference, lambda q, scale, group, rtol=rtol:
                                     rtol * (scale + GROUP_SHARE * group))

    def after_steps(q: str, scale: float, group: float) -> float:
        return tolerance.after_steps(scale, group, floors[q])

    report.rows += compare_phase("after N steps", finals, backends, reference, after_steps,
                                 floors, tolerance.steps_ceiling)
    return report


def chaos_floors(program: Program, pipeline: Any, backends: Sequence[str], steps: int,
                 start: Mapping[str, np.ndarray], finals: Mapping[str, Quantities],
                 fresh: Callable[..., Probe], report: Report, log: Callable[[str], None]
                 ) -> dict[str, float]:
    """Each backend's own sensitivity, per quantity: the same backend trained again with its
    initial weights and every batch's pixels moved by one ulp (rounding enters at every
    step, not only at the start). The largest over the backends: their roundings amplify
    differently. ``start``: the initial weights the other runs began from."""
    rng = np.random.default_rng([program.seed, PERTURB])
    moved = {name: move_one_ulp(start[name], rng) for name in sorted(start)}

    def jitter(x: np.ndarray, step: int) -> np.ndarray:
        return move_one_ulp(x, np.random.default_rng([program.seed, PERTURB, step]))

    floors: dict[str, float] = {}
    for name in backends:
        perturbed = f"{name} (moved 1 ulp)"
        log(f"{perturbed}: {steps} training steps for the chaos floor")
        report.losses[perturbed], run = train(fresh(name, moved), program, pipeline, steps,
                                              jitter)
        for q, value in run.items():
            floors[q] = max(floors.get(q, 0.0), difference(value, finals[name][q]).max_abs)
    return floors


def _group(quantity: str) -> str:
    """Quantities whose magnitudes are comparable: outputs, parameters, each optimizer
    slot (Adam's v is the square of a gradient)."""
    if quantity.startswith(("output", "loss", "metric")):
        return quantity.split(" ")[0]
    return quantity.rpartition(":")[2] if ":" in quantity else "parameters"


def compare_phase(phase: str, results: Mapping[str, Quantities], backends: Sequence[str],
                  reference: bool, tolerance_of: Callable[[str, float, float], float],
                  floors: Mapping[str, float] | None = None,
                  ceiling_of: Callable[[float, float], float] | None = None) -> list[Row]:
    """A row per quantity: each backend against the first, and against the reference.

    After N steps (``floors`` given) the backends against each other decide: a float64 run
    is not a float32 run without its rounding noise, so its distance only tells which
    backend strays when they disagree. With one backend, the reference decides."""
    expected = results[REFERENCE] if reference else results[backends[0]]
    groups: dict[str, float] = {}
    for q, value in expected.items():
        groups[_group(q)] = max(groups.get(_group(q), 0.0), magnitude(value))
    rows = []
    for q, value in expected.items():
        pairs = {f"{b} vs {backends[0]}": difference(results[b][q], results[backends[0]][q])
                 for b in backends[1:]}
        if reference:
            pairs.update({f"{b} vs {REFERENCE}": difference(results[b][q], value)
                          for b in backends})
        scale = magnitude(value)
        cross = tuple(p for p in pairs if not p.endswith(f" vs {REFERENCE}"))
        group = groups[_group(q)]
        rows.append(Row(phase, q, pairs, tolerance_of(q, scale, group),
                        None if floors is None else floors[q],
                        cross if floors is not None and cross else tuple(pairs),
                        None if ceiling_of is None else ceiling_of(scale, group)))
    return rows


__all__ = ["PHASES", "REFERENCE", "Report", "Row", "conform"]
