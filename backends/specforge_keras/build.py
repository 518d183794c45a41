"""`specforge build --backend keras`: one standalone, readable Keras 3 training script.

The model is written out layer by layer from the same recipes the backend builds its model
from (:func:`specforge_keras.recipes.layer_recipe`); the layers and the train step are copied
from this backend's own files (see :mod:`specforge.scriptgen`), so the script's per-step
losses equal `specforge run --backend keras`'s. Building imports no keras.
"""

from __future__ import annotations

from pathlib import Path

from specforge.ir import program as program_module
from specforge.ir.graph import Graph, identifier_names
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
from specforge_keras.recipes import MERGE_OPS, layer_recipe

HERE = Path(__file__).parent
LAYERS, MODEL, TRAINER = HERE / "layers.py", HERE / "model.py", HERE / "trainer.py"
PROBE = HERE / "probe.py"  # read by path, as the others: importing it imports keras
#: What the script's main() calls; the script copies these and what they use.
HELPERS = ["KerasSteps"]
RANDOMNESS = HERE / "randomness.py"


def model_lines(graph: Graph) -> list[str]:
    """The body of the script's ``build_model()``: one layer call per node."""
    names = identifier_names(graph)
    lines = [f"inputs = keras.Input(shape={tuple(graph.input.shape)!r}, name='input')"]
    variables = {graph.input.name: "inputs"}
    for node in graph:
        if node.op == "input":
            continue
        name = names[node.name]
        assert IDENTIFIER.match(name)  # names are validated; this guards the template
        cls, args, kwargs = layer_recipe(node, graph[node.inputs[0]].shape)
        arguments = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        arguments.append(f"name={name!r}")
        inputs = [variables[i] for i in node.inputs]
        operand = f"[{', '.join(inputs)}]" if node.op in MERGE_OPS else inputs[0]
        lines.append(f"# {node.name!r}: output {tuple(node.shape)}")
        call = f"{name} = {cls}({', '.join(arguments)})({operand})"
        if len(call) > 96:
            call = (f"{name} = {cls}(\n" + "".join(f"    {a},\n" for a in arguments)
                    + f")({operand})")
        lines.append(call)
        variables[node.name] = name
    lines.append(f"return keras.Model(inputs, {variables[graph.output]})")
    return lines


def layer_names(graph: Graph) -> list[str]:
    """What the script copies from layers.py: the classes of the graph's layers defined
    there, and what they use."""
    classes = {layer_recipe(n, graph[n.inputs[0]].shape)[0] for n in graph if n.op != "input"}
    return used(LAYERS, sorted(classes & set(top_level_names(LAYERS))))


def render_script(program: Program, distributed: bool = False) -> str:
    names = identifier_names(program.graph)
    chosen = kinds(program)
    params = [(f"{n.name}.{p.name}", names[n.name], p.name, tuple(p.shape), p.init)
              for n in program.graph for p in n.params]
    return render(program, "keras", HERE / "templates", "train.py.j2",
                  framework="Keras 3", requirement="keras (with TensorFlow or PyTorch)",
                  model_lines=model_lines(program.graph),
                  params=assignment("PARAMETERS", params),
                  layers=copied(layer_parts(LAYERS, RANDOMNESS, layer_names(program.graph))),
                  helpers=copied([(program_module, ["optimizer_slots"]),
                                  (TRAINER, used(TRAINER, HELPERS, chosen)),
                                  (PROBE, ["where_keras_computes"])], chosen))
