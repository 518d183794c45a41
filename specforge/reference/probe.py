"""The numpy reference as a :class:`~specforge.backends.Probe`: the conformance suite runs it
beside the backends, in float64, to say which backend is wrong when they disagree."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from specforge.backends import Probe
from specforge.ir.program import Program
from specforge.reference.backward import reference_backward
from specforge.reference.forward import reference_forward
from specforge.reference.training import (
    clip_gradients,
    initial_slots,
    loss_and_gradient,
    moving_statistics,
    optimizer_update,
)
from specforge.weights import initial_weights, parameter_table

Array = np.ndarray


class ReferenceProbe(Probe):
    device = "numpy float64"

    def __init__(self, program: Program, weights: Mapping[str, Array] | None = None) -> None:
        self.program = program
        start = weights if weights is not None else initial_weights(program.graph,
                                                                    program.seed)
        self.weights = {k: np.asarray(v, np.float64) for k, v in start.items()}
        table = parameter_table(program.graph)
        self.trainable = [name for name, p in table.items() if p.trainable]
        self.slots = initial_slots(program.optimizer,
                                   {k: self.weights[k] for k in self.trainable})
        self.steps = 0

    def output(self, x: Array, training: bool, masks: Mapping[str, Array]) -> Array:
        values = reference_forward(self.program.graph, self.weights, x, training, masks)
        if training:
            self.weights.update(moving_statistics(self.program.graph, self.weights, values))
        return values[self.program.graph.output]

    def _loss_and_grads(self, x: Array, y: Array, masks: Mapping[str, Array]
                        ) -> tuple[float, dict[str, Array], dict[str, Array]]:
        graph = self.program.graph
        values = reference_forward(graph, self.weights, x, True, masks)
        value, g_out = loss_and_gradient(self.program.loss, values[graph.output], y)
        grads = reference_backward(graph, self.weights, values, g_out, True, masks)
        return float(value), grads, values

    def gradients(self, x: Array, y: Array, masks: Mapping[str, Array]
                  ) -> tuple[float, dict[str, Array]]:
        value, grads, values = self._loss_and_grads(x, y, masks)
        # like any training-mode forward pass in the frameworks
        self.weights.update(moving_statistics(self.program.graph, self.weights, values))
        return value, grads

    def step(self, x: Array, y: Array, lr: float, masks: Mapping[str, Array]) -> float:
        opt = self.program.optimizer
        value, grads, values = self._loss_and_grads(x, y, masks)
        grads = clip_gradients(grads, opt.clip_value, opt.clip_norm)
        self.steps += 1
        params, self.slots = optimizer_update(
            opt, {k: self.weights[k] for k in self.trainable}, grads, self.slots,
            self.steps, lr)
        self.weights.update(moving_statistics(self.program.graph, self.weights, values))
        self.weights.update(params)
        return value

    def state(self) -> dict[str, Array]:
        return {**self.weights, **self.slots}
