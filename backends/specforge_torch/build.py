"""`specforge build --backend torch`: one standalone, readable PyTorch training script.

The script's model is written out node by node; the torch layers and the update step are
copied from this backend's own files (see :mod:`specforge.scriptgen`), so the script's
per-step losses equal `specforge run`'s. Building imports no torch.
"""

from __future__ import annotations

import re
from pathlib import Path

from specforge.ir.graph import Graph, Node
from specforge.ir.program import Program
from specforge.scriptgen import IDENTIFIER, assignment, copied, module_body, render
from specforge_torch.naming import TORCH_PARAM_NAMES, attribute_names
from specforge_torch.recipes import module_recipe

HERE = Path(__file__).parent
LAYERS, MODEL, TRAINER = HERE / "layers.py", HERE / "model.py", HERE / "trainer.py"


DISTRIBUTED = HERE / "distributed.py"
TRANSFER = HERE / "transfer.py"  # read by path, as the others: importing it imports torch


def torch_helpers() -> str:
    return copied([(TRAINER, ["autocast_dtype", "compile_mode", "make_optimizer",
                              "clip_gradients", "model_inputs", "loss_value", "forward_pass",
                              "optimizer_step",
                              "shard_step", "whole_batch", "evaluation_step"]),
                   (TRANSFER, ["to_device"]),
                   (MODEL, ["to_torch_layout"]),
                   (DISTRIBUTED, ["Ranks", "ranks_from_environment", "join", "leave",
                                  "ShardedBatches", "all_sum", "gather_rows",
                                  "gather_same_shape"])])


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
        if len(call) + len(attribute) + 16 > 100:  # wrap the arguments, one a line
            head, _, args = call.partition("(")
            parts = [a.strip() for a in re.split(r",\s(?![^()]*\))", args[:-1])]
            call = head + "(\n" + "".join(f"            {a},\n" for a in parts) + "        )"
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
    return render(program, "torch", HERE / "templates", "train.py.j2",
                  framework="PyTorch", requirement="torch", modules=modules, forward=forward,
                  params=assignment("PARAMETERS", params),
                  torch_names=assignment("TORCH_NAMES", TORCH_PARAM_NAMES),
                  layers=module_body(LAYERS, "_PAD_MODES"), helpers=torch_helpers())
