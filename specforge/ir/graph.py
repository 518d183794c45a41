"""The IR: one small immutable node type, and the graph and program built from it.

Tensors are per sample, channels last: images are ``(height, width, channels)``, vectors
``(features,)``; the batch axis is implicit. Every implicit choice of the spec (which pads
`same` means, whether a final softmax is folded into the loss, every default) is already
settled in a node's ``attrs``: a backend translates nodes, it never decides.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from specforge.errors import Location

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Param:
    """A tensor a node owns. Layouts are specforge's neutral ones (see docs/ir.md)."""

    name: str
    shape: Shape
    #: How specforge's own seeded generator draws the initial value.
    init: str
    trainable: bool = True

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def freeze(attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """An immutable view of ``attrs`` (values must be immutable themselves)."""
    return MappingProxyType(dict(attrs))


@dataclass(frozen=True)
class Node:
    """One op applied to the outputs of other nodes."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Any]
    shape: Shape
    params: tuple[Param, ...] = ()
    flops: int = 0
    #: The spec layer this node was lowered from (several nodes may share one).
    layer: str = ""
    location: Location | None = field(default=None, compare=False)
    #: That layer's spec type: `depthwise_conv2d` lowers to op `conv2d`, and a summary says
    #: which the user wrote. Provenance only, like ``layer``: backends never read it.
    layer_type: str = ""

    @property
    def param_count(self) -> int:
        return sum(p.size for p in self.params)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "inputs": list(self.inputs),
            "attrs": {k: _jsonable(v) for k, v in self.attrs.items()},
            "shape": list(self.shape),
            "params": [{"name": p.name, "shape": list(p.shape), "init": p.init,
                        "trainable": p.trainable} for p in self.params],
            "flops": self.flops,
            "layer": self.layer,
            "layer_type": self.layer_type,
            "source": str(self.location) if self.location else None,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return str(value)
    return value


@dataclass(frozen=True)
class Graph:
    """Nodes in topological order; the first is the `input` node."""

    nodes: tuple[Node, ...]
    output: str

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def trainable_params(self) -> int:
        return sum(p.size for n in self.nodes for p in n.params if p.trainable)

    @property
    def non_trainable_params(self) -> int:
        return sum(p.size for n in self.nodes for p in n.params if not p.trainable)

    @property
    def flops(self) -> int:
        return sum(n.flops for n in self.nodes)


#: Names a node's identifier never takes (it gets a trailing underscore): built scripts use
#: identifiers as variables next to these module names, builtins and classes, and torch
#: models hold their modules as attributes beside nn.Module's own (a node named `keras`,
#: `self`, `inputs` or `forward` must not shadow or replace them).
_RESERVED = """
    F Image LambdaLR Model OrderedDict Path TensorDataset DataLoader argparse itertools keras
    layers math nn np ops re torch x y inputs model self args main build_model load_weights
    load_data train_step evaluate augment loss_fn learning_rate gelu_tanh
    Activation Add AvgPool2D AvgPool2d BatchNorm ChannelShuffle ChannelSlice Concat Conv2D
    Conv2d Cropping2d Dropout FlattenHWC GlobalPool GroupNorm LayerNorm LayerNorm2d MaxPool2D
    MaxPool2d Pad2D Pad2d PReLU Rescaling
    print len range zip sum max min float int list dict tuple set sorted enumerate map round
    open isinstance super getattr setattr hasattr any all abs iter next object str bool repr
    type id vars
    T_destination add_module apply bfloat16 buffers call_super_init children compile cpu cuda
    double dump_patches eval extra_repr forward get_buffer get_extra_state get_parameter
    get_submodule half ipu load_state_dict modules mtia named_buffers named_children
    named_modules named_parameters parameters register_backward_hook register_buffer
    register_forward_hook register_forward_pre_hook register_full_backward_hook
    register_full_backward_pre_hook register_load_state_dict_post_hook
    register_load_state_dict_pre_hook register_module register_parameter
    register_state_dict_post_hook register_state_dict_pre_hook requires_grad_ set_extra_state
    set_submodule share_memory state_dict to to_empty train training xpu zero_grad names steps
    """
RESERVED_NAMES = frozenset(_RESERVED.split())


def identifier_names(graph: Graph) -> dict[str, str]:
    """A valid, unique Python identifier for every node (`layer1.0.conv1` ->
    `layer1_0_conv1`), for backends whose names cannot hold dots: never a keyword, nor one
    of :data:`RESERVED_NAMES` (`class` -> `class_`), so that any name a spec accepts gives
    working code."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for node in graph:
        base = re.sub(r"\W", "_", node.name)
        if base[:1].isdigit():
            base = f"_{base}"
        if keyword.iskeyword(base) or keyword.issoftkeyword(base) or base in RESERVED_NAMES \
                or base.startswith("__"):
            base += "_"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        names[node.name] = name
    return names
