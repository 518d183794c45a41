"""`specforge build --backend torch`: one standalone, readable PyTorch training script.

The script's model is written out node by node; the torch layers and the update step are
copied from this backend's own files (see :mod:`specforge.scriptgen`), so the script's
per-step losses equal `specforge run`'s. Building imports no torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

from specforge.data import pipeline
from specforge.ir.graph import Graph, Node
from specforge.ir.program import Program
from specforge.scriptgen import (
    IDENTIFIER,
    assignment,
    copied,
    kinds,
    layer_parts,
    render,
    top_level_names,
    used,
)
from specforge_torch.naming import TORCH_PARAM_NAMES, attribute_names
from specforge_torch.recipes import module_recipe

HERE = Path(__file__).parent
LAYERS, MODEL, TRAINER = HERE / "layers.py", HERE / "model.py", HERE / "trainer.py"


DISTRIBUTED = HERE / "distributed.py"
RANDOMNESS = HERE / "randomness.py"
TRANSFER = HERE / "transfer.py"  # read by path, as the others: importing it imports torch


def torch_helpers(program: Program, distributed: bool) -> str:
    """The train and evaluation steps (TorchTrainer's :class:`Steps`) and what they use
    (the program's kinds of loss and optimizer only); with ``distributed``, DDP's too
    (:class:`ShardedSteps`, torchrun's process group). Without `data:`, only the layout of
    the initial weights."""
    if program.spec.data is None:  # nothing to train: the initial weights only
        return copied([(MODEL, ["to_torch_layout"])])
    chosen = kinds(program)
    steps = ["Steps"] + (["ShardedSteps"] if distributed else [])
    parts: list[tuple[ModuleType | Path, list[str]]] = [
        (TRAINER, used(TRAINER, steps, chosen)), (TRANSFER, ["to_device", "to_host_later"]),
        (MODEL, ["to_torch_layout"])]
    if distributed:
        parts.append((pipeline, ["shard"]))
        parts.append((DISTRIBUTED, used(DISTRIBUTED, [
            "ranks_from_environment", "join", "leave", "ShardedBatches", "all_sum",
            "gather_rows", "any_rank"])))
    return copied(parts, chosen)


def layer_names(graph: Graph) -> list[str]:
    """What the script copies from layers.py: the classes of the graph's modules defined
    there, and what they use."""
    defined = set(top_level_names(LAYERS))
    shapes = {n.name: n.shape for n in graph}
    classes = {module_recipe(n, shapes[n.inputs[0]])[0] for n in graph if n.op != "input"}
    return used(LAYERS, sorted(classes & defined))


def module_call(node: Node, in_shape: tuple[int, ...]) -> str:
    """The constructor expression of a node's module (every argument a literal)."""
    cls, args, kwargs = module_recipe(node, in_shape)
    arguments = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{cls}({', '.join(arguments)})"


def model_lines(graph: Graph) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(attribute, constructor, comment) per module and the forward's lines."""
    names = attribute_names(graph)
    shapes = {n.name: n.shape for n in graph}
    variables = {graph.input.name: "x"}
    modules, forward = [], []
    for node in graph:
        if node.op == "input":
            continue
        attribute = names[node.name]
        assert IDENTIFIER.match(attribute)  # names are validated; this guards the template
        call = module_call(node, shapes[node.inputs[0]])
        if len(call) + len(attribute) + 16 > 100:  # wrap the arguments, packed in lines
            head, _, args = call.partition("(")
            parts = [a.strip() for a in re.split(r",\s(?![^()]*\))", args[:-1])]
            lines = [""]
            for part in parts:
                if lines[-1] and len(lines[-1]) + len(part) + 14 > 100:
                    lines.append("")
                lines[-1] += f"{' ' if lines[-1] else ''}{part},"
            call = head + "(\n" + "".join(f"            {line}\n" for line in lines) + "        )"
        modules.append((attribute, call, f"{node.name!r}: output {tuple(node.shape)}"))
        args = ", ".join(variables[i] for i in node.inputs)
        forward.append(f"{attribute} = self.{attribute}({args})")
        variables[node.name] = attribute
    forward.append(f"return {variables[graph.output]}")
    return modules, forward


def render_script(program: Program, distributed: bool = False) -> str:
    modules, forward = model_lines(program.graph)
    names = attribute_names(program.graph)
    params = [(f"{n.name}.{p.name}", names[n.name], p.name, n.op, tuple(p.shape), p.init)
              for n in program.graph for p in n.params]
    torch_names = {k: v for k, v in TORCH_PARAM_NAMES.items() if k in {p[2] for p in params}}
    return render(program, "torch", HERE / "templates", "train.py.j2", distributed=distributed,
                  framework="PyTorch", requirement="torch", modules=modules, forward=forward,
                  params=assignment("PARAMETERS", params),
                  torch_names=assignment("TORCH_NAMES", torch_names),
                  layers=copied(layer_parts(LAYERS, RANDOMNESS, layer_names(program.graph))),
                  helpers=torch_helpers(program, distributed))
