"""The IR graph as a `keras.Model`, and weights to and from specforge's neutral format.

Keras's layouts are the neutral ones (NHWC tensors, HWIO conv kernels, (in, units) dense
kernels): weights cross without transposes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import keras
import numpy as np

from specforge.ir.graph import Graph, Node, identifier_names
from specforge.weights import check_weights, initial_weights
from specforge_keras import layers as L
from specforge_keras.recipes import MERGE_OPS, layer_recipe


def layer_for(node: Node, name: str, in_shape: tuple[int, ...]) -> keras.layers.Layer:
    cls, args, kwargs = layer_recipe(node, in_shape)
    factory = getattr(keras.layers, cls.rpartition(".")[2]) if cls.startswith("keras.") \
        else getattr(L, cls)
    return factory(*args, **kwargs, name=name)


def build_model(graph: Graph,
                replacements: Mapping[str, Callable[[Node, str], Any]] | None = None
                ) -> keras.Model:
    """A functional keras.Model of the graph (input NHWC float32, output the logits).
    ``replacements`` maps an op to a factory ``(node, name) -> layer`` used instead of the
    op's usual layer (the conformance probe's dropout)."""
    names = identifier_names(graph)
    replacements = replacements or {}
    inputs = keras.Input(shape=graph.input.shape, name=names[graph.input.name])
    values = {graph.input.name: inputs}
    for node in graph:
        if node.op == "input":
            continue
        args = [values[i] for i in node.inputs]
        make = replacements.get(node.op)
        layer = make(node, names[node.name]) if make else \
            layer_for(node, names[node.name], graph[node.inputs[0]].shape)
        values[node.name] = layer(args if node.op in MERGE_OPS else args[0])
    return keras.Model(inputs, values[graph.output], name="specforge_model")


_KERAS_PARAM = {"kernel": "kernel", "bias": "bias", "gamma": "gamma", "beta": "beta",
                "moving_mean": "moving_mean", "moving_var": "moving_var", "alpha": "alpha"}


def variable_of(model: keras.Model, names: dict[str, str], node: Node, param: str) -> object:
    return getattr(model.get_layer(names[node.name]), _KERAS_PARAM[param])


def import_weights(model: keras.Model, graph: Graph, weights: Mapping[str, np.ndarray]) -> None:
    """Assign neutral-format weights to ``model``'s variables; ``WeightsError`` (naming every
    missing, unexpected and misshapen array) before anything is assigned."""
    check_weights(graph, weights)
    names = identifier_names(graph)
    for node in graph:
        for p in node.params:
            variable_of(model, names, node, p.name).assign(
                np.asarray(weights[f"{node.name}.{p.name}"], np.float32))


def export_weights(model: keras.Model, graph: Graph) -> dict[str, np.ndarray]:
    names = identifier_names(graph)
    return {f"{n.name}.{p.name}": np.array(keras.ops.convert_to_numpy(
        variable_of(model, names, n, p.name))) for n in graph for p in n.params}


@contextmanager
def python_random_kept() -> Iterator[None]:
    """Give Python's `random` back as it was: Keras draws a default seed from it for each
    layer made without one (the initializers of Dense, say), though specforge's initial
    weights replace what they draw."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


def create_model(graph: Graph, seed: int, weights: Mapping[str, np.ndarray] | None = None,
                 replacements: Mapping[str, Callable[[Node, str], Any]] | None = None
                 ) -> keras.Model:
    """The model with ``weights`` (default: specforge's initial weights for ``seed``). No
    global random state is read or changed: specforge's dropout draws no random numbers."""
    with python_random_kept():
        model = build_model(graph, replacements)
    import_weights(model, graph, weights if weights is not None else
                   initial_weights(graph, seed))
    return model
