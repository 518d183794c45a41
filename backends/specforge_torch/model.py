"""The IR graph as a torch `nn.Module`, and weights to and from specforge's neutral format."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from specforge.ir.graph import Graph, Node
from specforge.weights import check_weights, initial_weights
from specforge_torch import layers as L
from specforge_torch.naming import TORCH_PARAM_NAMES, attribute_names
from specforge_torch.recipes import module_recipe


def module_for(node: Node, in_shape: tuple[int, ...]) -> nn.Module | None:
    """The module that computes ``node`` (None for the input)."""
    if node.op == "input":
        return None
    cls, args, kwargs = module_recipe(node, in_shape)
    factory = getattr(nn, cls[3:]) if cls.startswith("nn.") else getattr(L, cls)
    return factory(*args, **kwargs)


class SpecModule(nn.Module):
    """Runs an IR graph. Input (N, C, H, W) float32; output the graph's output (logits
    where the spec's final softmax was folded into the loss)."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph
        self.names = attribute_names(graph)
        shapes = {n.name: n.shape for n in graph}
        self.steps: list[tuple[str, str, tuple[str, ...]]] = []
        for node in graph:
            module = module_for(node, shapes[node.inputs[0]] if node.inputs else ())
            if module is not None:
                self.add_module(self.names[node.name], module)
                self.steps.append((node.name, self.names[node.name], node.inputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.graph.input.name: x}
        for name, attribute, inputs in self.steps:
            values[name] = getattr(self, attribute)(*(values[i] for i in inputs))
        return values[self.graph.output]


# --- neutral weights <-> torch tensors ------------------------------------------------------

def to_torch_layout(op: str, param: str, value: np.ndarray) -> np.ndarray:
    if op == "conv2d" and param == "kernel":
        return value.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    if op == "dense" and param == "kernel":
        return value.T
    return value


def from_torch_layout(op: str, param: str, value: np.ndarray) -> np.ndarray:
    if op == "conv2d" and param == "kernel":
        return value.transpose(2, 3, 1, 0)
    if op == "dense" and param == "kernel":
        return value.T
    return value


def tensor_of(module: SpecModule, node: Node, param: str) -> torch.Tensor:
    return getattr(getattr(module, module.names[node.name]), TORCH_PARAM_NAMES[param])


def import_weights(module: SpecModule, weights: Mapping[str, np.ndarray]) -> None:
    """Copy neutral-format weights into ``module`` in place; ``WeightsError`` (naming every
    missing, unexpected and misshapen array) before anything is copied."""
    check_weights(module.graph, weights)
    with torch.no_grad():
        for node in module.graph:
            for p in node.params:
                value = to_torch_layout(node.op, p.name,
                                        np.asarray(weights[f"{node.name}.{p.name}"]))
                target = tensor_of(module, node, p.name)
                target.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype))


def export_weights(module: SpecModule) -> dict[str, np.ndarray]:
    """The module's parameters and statistics in the neutral format."""
    out = {}
    for node in module.graph:
        for p in node.params:
            value = tensor_of(module, node, p.name).detach().cpu().numpy()
            out[f"{node.name}.{p.name}"] = np.ascontiguousarray(from_torch_layout(node.op, p.name,
                                                                            value))
    return out


def create_model(graph: Graph, seed: int, weights: Mapping[str, np.ndarray] | None = None
                 ) -> SpecModule:
    """The module with ``weights`` (default: specforge's initial weights for ``seed``).
    torch's layers initialise themselves from torch's global generator as they are made;
    specforge's weights replace what they draw, so the caller's generator is given back as
    it was (the modules are made on the CPU)."""
    with torch.random.fork_rng(devices=[]):
        module = SpecModule(graph)
    import_weights(module, weights if weights is not None else initial_weights(graph, seed))
    return module
