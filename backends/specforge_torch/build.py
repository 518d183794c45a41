"""`specforge build --backend torch`: one standalone, readable PyTorch training script.

The script does not import specforge. Everything that must compute exactly as
`specforge run` does (initial weights, data split and order, augmentation, layers, loss,
optimizer, clipping, schedule, metrics) is copied into it from the very functions that
`specforge run` uses, read from their source files: one piece of code serves both, so the
script's per-step losses equal the run's. The spec's values reach the template only as
``repr`` literals or validated names, so no spec can inject code. Building imports
neither torch nor the torch modules it copies from: it reads their text.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2

from specforge import __version__, metrics, runner, weights
from specforge.data import augment, cifar, folders, pipeline, sources
from specforge.ir import program as program_module
from specforge.ir.graph import Graph, Node
from specforge.ir.program import Program
from specforge_torch.naming import TORCH_PARAM_NAMES, attribute_names

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
LAYERS, MODEL, TRAINER = HERE / "layers.py", HERE / "model.py", HERE / "trainer.py"

# (module, names) copied into every script, in this order.
SHARED: list[tuple[ModuleType, list[str]]] = [
    (weights, ["_fans", "draw"]),
    (sources, ["Dataset", "SourceData"]),
    (pipeline, ["split_indices", "Batch", "DataPipeline", "assemble_pipeline"]),
    (augment, ["AugmentParams", "is_identity", "has_affine", "draw_params",
               "source_coordinates", "_fold", "sample_bilinear", "shift_with_zeros",
               "apply_augmentation"]),
    (program_module, ["lr_at"]),
    (metrics, ["MetricAccumulator", "_ratio", "_averaged"]),
    (runner, ["evaluate_split"]),
]
# What each data source needs on top.
LOADERS: dict[str, list[tuple[ModuleType, list[str]]]] = {
    "digits": [(sources, ["_load_digits"])],
    "synthetic": [(sources, ["_synthetic"])],
    "npz": [(sources, ["_load_npz", "_npz_dataset"])],
    "cifar10": [(cifar, ["_reconstruct", "RestrictedUnpickler", "cache_dir", "read_batch",
                         "_from_folder", "_from_archive", "_assemble", "md5sum", "download",
                         "load_cifar10"])],
    "image_folder": [(folders, ["_pil", "ImageFiles", "decode", "_scan", "_check_modes",
                                "_dataset", "load_image_folders"])],
}
CONSTANTS: dict[str, list[tuple[ModuleType, list[str]]]] = {
    "cifar10": [(cifar, ["URL", "ARCHIVE", "FOLDER", "MD5", "TRAIN_BATCHES", "TEST_BATCH",
                         "CLASSES", "OFFLINE_HINT"])],
    "image_folder": [(folders, ["EXTENSIONS", "IN_MEMORY_BYTES"])],
}


def copied(parts: list[tuple[ModuleType | Path, list[str]]]) -> str:
    """The source text of the named top-level functions and classes, as in their files."""
    blocks = []
    for module, names in parts:
        path = Path(module.__file__) if isinstance(module, ModuleType) else module
        text = path.read_text(encoding="utf-8")
        definitions = {n.name: n for n in ast.parse(text).body
                       if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        lines = text.splitlines()
        for name in names:
            node = definitions[name]
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            blocks.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n\n\n".join(blocks)


def constants(parts: list[tuple[ModuleType, list[str]]]) -> str:
    return "\n".join(f"{name} = {getattr(module, name)!r}" for module, names in parts
                     for name in names)


def layers_source() -> str:
    """specforge_torch/layers.py without its module docstring and imports."""
    text = LAYERS.read_text(encoding="utf-8")
    return text[text.index("_PAD_MODES"):].rstrip()


def torch_helpers() -> str:
    return copied([(TRAINER, ["make_optimizer", "clip_gradients", "loss_value", "forward_pass",
                              "optimizer_step"]),
                   (MODEL, ["_to_torch"])])


def namespace(value: Any, indent: int = 0, width: int = 100, used: int = 0) -> str:
    """A Python expression for a spec or IR value, wrapped black-style to ``width`` columns
    (``indent``: the line's indentation, ``used``: columns taken before the value on its
    first line). Models and dataclasses become SimpleNamespace (attribute access, as in
    specforge), mappings dicts, the rest ``repr`` literals."""
    if hasattr(value, "model_fields"):
        items = [(f"{k}=", getattr(value, k)) for k in type(value).model_fields]
        return _wrapped("SimpleNamespace(", items, ")", indent, width, used)
    if hasattr(value, "__dataclass_fields__"):
        items = [(f"{k}=", getattr(value, k)) for k in value.__dataclass_fields__]
        return _wrapped("SimpleNamespace(", items, ")", indent, width, used)
    if isinstance(value, Mapping):
        return _wrapped("{", [(f"{k!r}: ", v) for k, v in value.items()], "}", indent, width,
                        used)
    if isinstance(value, list):
        return _wrapped("[", [("", v) for v in value], "]", indent, width, used)
    if isinstance(value, tuple):
        close = ",)" if len(value) == 1 else ")"
        return _wrapped("(", [("", v) for v in value], close, indent, width, used)
    if isinstance(value, str | int | float | bool) or value is None:
        return repr(value)
    raise TypeError(f"cannot emit {type(value).__name__} into a script")


def assignment(name: str, value: Any) -> str:
    """``NAME = <value>`` as a top-level statement, wrapped to 100 columns."""
    return f"{name} = {namespace(value, 0, 100, len(name) + 3)}"


def _wrapped(open_: str, items: list[tuple[str, Any]], close: str, indent: int, width: int,
             used: int) -> str:
    """One line if it fits, else one item a line, indented by four more columns."""
    flat = open_ + ", ".join(k + namespace(v, 0, 10**6) for k, v in items) + close
    if indent + used + len(flat) <= width or not items:
        return flat
    inner = indent + 4
    lines = [f"{' ' * inner}{k}{namespace(v, inner, width - 1, len(k))}," for k, v in items]
    return open_ + "\n" + "\n".join(lines) + "\n" + " " * indent + close.lstrip(",")


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def module_call(node: Node, in_shape: tuple[int, ...]) -> str:
    """The constructor expression of a node's module (every argument a literal)."""
    a = node.attrs
    op = node.op
    r = repr
    if op == "conv2d":
        return (f"Conv2d({in_shape[-1]}, {a['filters']}, kernel={r(a['kernel'])}, "
                f"strides={r(a['strides'])}, dilation={r(a['dilation'])}, "
                f"groups={a['groups']}, pads={r(a['pads'])}, pad_mode={r(a['pad_mode'])}, "
                f"bias={a['bias']})")
    if op == "dense":
        return f"nn.Linear({in_shape[-1]}, {a['units']}, bias={a['bias']})"
    if op in ("max_pool2d", "avg_pool2d"):
        cls = "MaxPool2d" if op == "max_pool2d" else "AvgPool2d"
        return f"{cls}(pool={r(a['pool'])}, strides={r(a['strides'])}, pads={r(a['pads'])})"
    if op == "pad2d":
        return f"Pad2d({r(a['pads'])}, {r(a['mode'])})"
    if op in ("global_avg_pool2d", "global_max_pool2d"):
        return f"GlobalPool({'avg' if 'avg' in op else 'max'!r})"
    if op == "flatten":
        return "FlattenHWC()"
    if op == "batch_norm":
        return (f"BatchNorm({in_shape[-1]}, decay={r(a['decay'])}, epsilon={r(a['epsilon'])}, "
                f"scale={a['scale']}, center={a['center']})")
    if op == "dropout":
        return f"nn.{'Dropout2d' if a['spatial'] else 'Dropout'}({r(a['rate'])})"
    if op == "activation":
        extra = "".join(f", {k}={r(v)}" for k, v in a.items() if k != "fn")
        return f"Activation({r(a['fn'])}{extra})"
    return {"add": "Add()", "concat": "Concat()"}[op]


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
        assert _IDENTIFIER.match(attribute)  # names are validated; this guards the template
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


#: Modules the copied code may use, imported by the script only when it does.
OPTIONAL_IMPORTS = ["codecs", "hashlib", "io", "os", "pickle", "tarfile", "urllib.error",
                    "urllib.request", "zlib"]


def import_block(code: str) -> str:
    """The script's standard-library imports: always the loop's, and the rest as used."""
    modules = ["argparse", "contextlib", "json", "math", "time"] + [
        m for m in OPTIONAL_IMPORTS if re.search(rf"\b{re.escape(m)}\.", code)]
    names = ["dataclass", "field"] if re.search(r"\bfield\(", code) else ["dataclass"]
    return "".join(f"import {m}\n" for m in sorted(modules)) + \
        f"from dataclasses import {', '.join(names)}\n"


def render_script(program: Program) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True,
                             autoescape=False)
    env.filters["py"] = repr
    spec = program.spec
    source_kind = spec.data.source.type if spec.data else None
    modules, forward = model_lines(program.graph)
    names = attribute_names(program.graph)
    params = [(f"{n.name}.{p.name}", names[n.name], p.name, n.op, tuple(p.shape), p.init)
              for n in program.graph for p in n.params]
    template = env.get_template("train.py.j2")
    body = template.render(
        version=__version__, program=program, spec=spec, source_kind=source_kind,
        modules=modules, forward=forward, params=assignment("PARAMETERS", params),
        layers=layers_source(), helpers=torch_helpers(), shared=copied(SHARED),
        loaders=copied(LOADERS.get(source_kind, [])),
        loader_constants=constants(CONSTANTS.get(source_kind, [])),
        data=assignment("DATA", spec.data), loss=assignment("LOSS", program.loss),
        optimizer=assignment("OPTIMIZER", program.optimizer),
        metrics=assignment("METRICS", list(program.metrics)),
        training=assignment("TRAINING", spec.training),
        torch_names=assignment("TORCH_NAMES", TORCH_PARAM_NAMES),
        input_shape=tuple(program.graph.input.shape), torch_param=TORCH_PARAM_NAMES,
    )
    return body.replace("# {imports}\n", import_block(body))
