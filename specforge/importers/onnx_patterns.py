"""Activations that ONNX graphs spell as several ops, recognised as one spec activation.

Before opset 20 ONNX has no Gelu op: exporters write GELU out element-wise, as specforge's
own exporter and ``torch.onnx.export`` do:

- ``gelu``: ``x * (1 + erf(x / sqrt(2))) * 0.5`` (``x / sqrt(2)`` as a Div or as a Mul by
  ``1 / sqrt(2)``);
- ``gelu_tanh``: ``x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x * x * x))) * 0.5``.

Only these exact graphs match (any operand order of Add and Mul): every constant is
checked, and every intermediate value must feed the next step alone. Anything that merely
looks similar is left to the per-op translation, which refuses it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Gelu:
    """A matched pattern: the activation ``fn`` of ``x``, computed by ``nodes`` (their
    outputs); the last of them is ``output``."""

    fn: str
    x: str
    output: str
    nodes: frozenset[str]
    #: how many times the pattern reads ``x`` (all of x's readers when it may be fused)
    x_reads: int


class _Graph:
    """Producers, readers and scalar constants of an ONNX graph, for matching."""

    def __init__(self, graph: Any, read: Callable[[Any], np.ndarray], uses: Counter[str]
                 ) -> None:
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.initializers = {t.name: t for t in graph.initializer}
        self.read = read
        self.uses = uses

    def scalar(self, name: str) -> float | None:
        """The number an initializer or a Constant node of one element holds, else None."""
        tensor = self.initializers.get(name)
        node = self.node(name, "Constant")
        if tensor is None and node is not None:
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
        if tensor is None or int(np.prod(tensor.dims, dtype=np.int64)) != 1:
            return None
        array = self.read(tensor)
        return float(array.reshape(-1)[0]) if array.size == 1 else None

    def node(self, name: str, op_type: str) -> Any | None:
        """The node of ``op_type`` computing ``name``, if that is what computes it."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def is_scalar(self, name: str, wanted: float) -> bool:
        value = self.scalar(name)
        return value is not None and bool(np.isclose(value, wanted, rtol=1e-6, atol=0))

    def with_constant(self, node: Any, wanted: float) -> str | None:
        """The other input of a two-input ``node`` whose one input is the constant
        ``wanted`` (a Div's constant must be its divisor)."""
        inputs = list(node.input)
        if len(inputs) != 2:
            return None
        orders = [inputs] if node.op_type == "Div" else [inputs, inputs[::-1]]
        for value, constant in orders:
            if self.is_scalar(constant, wanted) and self.scalar(value) is None:
                return value
        return None


def find_gelus(graph: Any, read: Callable[[Any], np.ndarray], uses: Counter[str]
               ) -> dict[str, Gelu]:
    """Every GELU pattern of ``graph``, by the name of its output. ``read``: a tensor's
    array (the safe reader); ``uses``: how many inputs read each value."""
    g = _Graph(graph, read, uses)
    found = {}
    for node in graph.node:
        if node.op_type == "Mul" and len(node.output) == 1:
            match = _match(g, node)
            if match is not None:
                found[match.output] = match
    return found


def _match(g: _Graph, last: Any) -> Gelu | None:
    """``last`` = (x * (1 + t)) * 0.5 with t = erf(x / sqrt 2) or tanh(...) of the same x."""
    product_name = g.with_constant(last, 0.5)
    product = product_name and g.node(product_name, "Mul")
    if not product:
        return None
    for x, one_plus_name in (product.input, product.input[::-1]):
        one_plus = g.node(one_plus_name, "Add")
        t_name = one_plus and g.with_constant(one_plus, 1.0)
        if not t_name:
            continue
        inner = _erf_of(g, t_name, x) or _tanh_of(g, t_name, x)
        if inner is None:
            continue
        fn, steps, x_reads = inner
        nodes = [last, product, one_plus, *steps]
        # each step's value feeds the next step alone; x feeds nothing else in the pattern
        if any(g.uses[n.output[0]] != 1 for n in nodes[1:]):
            return None
        return Gelu(fn, x, last.output[0], frozenset(n.output[0] for n in nodes),
                    x_reads + 1)
    return None


def _erf_of(g: _Graph, name: str, x: str) -> tuple[str, list[Any], int] | None:
    """erf(x / sqrt 2): its nodes and how often they read x."""
    erf = g.node(name, "Erf")
    if erf is None:
        return None
    scaled = g.node(erf.input[0], "Div") or g.node(erf.input[0], "Mul")
    if scaled is None:
        return None
    wanted = math.sqrt(2) if scaled.op_type == "Div" else 1 / math.sqrt(2)
    if g.with_constant(scaled, wanted) != x:
        return None
    return "gelu", [erf, scaled], 1


def _tanh_of(g: _Graph, name: str, x: str) -> tuple[str, list[Any], int] | None:
    """tanh(sqrt(2 / pi) * (x + 0.044715 * x * x * x)): its nodes and how often they read x."""
    tanh = g.node(name, "Tanh")
    scaled = tanh and g.node(tanh.input[0], "Mul")
    inner_name = scaled and g.with_constant(scaled, math.sqrt(2 / math.pi))
    inner = inner_name and g.node(inner_name, "Add")
    if not inner or x not in inner.input:
        return None
    cubic = g.node(inner.input[1 - list(inner.input).index(x)], "Mul")
    cube_name = cubic and g.with_constant(cubic, 0.044715)
    cube = cube_name and g.node(cube_name, "Mul")
    if not cube or x not in cube.input:
        return None
    square = g.node(cube.input[1 - list(cube.input).index(x)], "Mul")
    if square is None or list(square.input) != [x, x]:
        return None
    return "gelu_tanh", [tanh, scaled, inner, cubic, cube, square], 4
