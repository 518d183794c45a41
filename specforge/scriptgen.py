"""Standalone training scripts: the machinery every backend's `build` shares.

A script does not import specforge. What must compute exactly as `specforge run` does
(initial weights, data split and order, augmentation, schedule, metrics, and each backend's
layers and update rules) is copied into it from the very functions `specforge run` uses,
read from their source files (so building imports no framework): one piece of code serves
both. Only what the spec uses is copied (:func:`used`): where the code differs by kind (loss,
optimizer, schedule, metric, augmentation transform), it has one function per kind and a
dispatch table, a dict literal from kind to function, of which a script keeps only the
spec's entries (:func:`kinds`). The spec's values reach a script only as ``repr`` literals,
SimpleNamespace expressions of them, or validated names: no spec can inject code.

Each backend has a template that extends ``templates/script.py.j2`` (settings, data,
training loop) with its imports, layers, model and train step.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2
from pydantic import BaseModel

from specforge import __version__, metrics, runner, weights
from specforge.data import augment, cifar, folders, pipeline, prefetch, sources
from specforge.ir import program as program_module
from specforge.ir.program import Program

CORE_TEMPLATES = Path(__file__).parent / "templates"
#: What a name must look like before it is written into a script as an identifier.
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def shared(program: Program) -> str:
    """What every script copies from specforge's core: the initial weights, the dataset,
    split and batches (augmentation only when the spec augments), the schedule, the metrics
    and the evaluation, each with what it uses, the dispatch tables cut to the spec's kinds.
    Without `data:`, only the initial weights."""
    data = program.spec.data
    if data is None:  # nothing to train on: the script builds the model, nothing more
        return copied([(weights, used(weights, ["draw"]))])
    augmented = not augment.is_identity(data.augment)
    chosen = kinds(program)
    roots: list[tuple[ModuleType, list[str]]] = [
        (weights, ["draw"]), (sources, ["Dataset", "SourceData"]),
        (pipeline, ["split_indices", "Batch", "DataPipeline", "check_source",
                    "assemble_pipeline"]
         + (["AugmentedPipeline"] if augmented else [])),
        *([(augment, ["AugmentParams", "draw_params", "apply_augmentation"])]
          if augmented else []),
        (program_module, ["lr_at"]), (metrics, ["MetricAccumulator"]),
        (runner, ["Tally", "evaluate_split", "TrainingLoop"]),
        *([(prefetch, ["PrefetchedBatches", "resolve_workers"])] if prefetches(program)
          else [])]
    return copied([(m, used(m, names, chosen)) for m, names in roots], chosen)


def prefetches(program: Program) -> bool:
    """Whether the program's training batches may be prepared in worker processes."""
    return program.spec.data is not None and program.spec.data.workers != 0


def kinds(program: Program) -> dict[str, set[str]]:
    """The entries of each dispatch table (a dict from kind to function) the program uses."""
    opt, data = program.optimizer, program.spec.data
    return {"LOSSES": {program.loss.kind}, "OPTIMIZERS": {opt.kind}, "UPDATES": {opt.kind},
            "SCHEDULES": {opt.schedule.kind} if opt.schedule else set(),
            "METRIC_VALUES": {m.kind for m in program.metrics},
            "AUGMENTATIONS": augment.enabled(data.augment) if data else set()}


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


def copied(parts: list[tuple[ModuleType | Path, list[str]]],
           kinds: Mapping[str, Collection[str]] | None = None) -> str:
    """The source text of the named top-level functions, classes and assignments, as in
    their files; a dispatch table named in ``kinds`` (a dict literal keyed by kind) keeps
    only the entries of those kinds."""
    blocks = []
    for module, names in parts:
        path = Path(module.__file__) if isinstance(module, ModuleType) else module
        text = path.read_text(encoding="utf-8")
        definitions = _top_level(ast.parse(text))
        lines = text.splitlines()
        for name in names:
            node = definitions[name]
            if kinds is not None and name in kinds:
                blocks.append(_table(text, node, kinds[name]))
                continue
            first = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
            blocks.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n\n\n".join(blocks)


def _entries(node: ast.stmt, kept: Collection[str] | None) -> list[tuple[ast.expr, ast.expr]]:
    """A dispatch table's (key, value) nodes, only those whose key is in ``kept``."""
    value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
    if not isinstance(value, ast.Dict):
        raise TypeError("a dispatch table must be a dict literal")
    return [(k, v) for k, v in zip(value.keys, value.values, strict=True)
            if kept is None or (isinstance(k, ast.Constant) and k.value in kept)]


def _table(text: str, node: ast.stmt, kept: Collection[str]) -> str:
    """A dispatch table's assignment with only the entries of the ``kept`` kinds."""
    head = ast.get_source_segment(text, node.target if isinstance(node, ast.AnnAssign)
                                  else node.targets[0])  # type: ignore[attr-defined]
    if isinstance(node, ast.AnnAssign):
        head += ": " + ast.get_source_segment(text, node.annotation)
    items = [f"{ast.get_source_segment(text, k)}: {ast.get_source_segment(text, v)}"
             for k, v in _entries(node, kept)]
    flat = f"{head} = {{{', '.join(items)}}}"
    if len(flat) <= 100 or not items:
        return flat
    return f"{head} = {{\n" + "".join(f"    {item},\n" for item in items) + "}"


def _top_level(tree: ast.Module) -> dict[str, ast.stmt]:
    """A module's top-level functions, classes and single-name assignments, by name."""
    found: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            found[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) == 1 and isinstance(targets[0], ast.Name):
                found[targets[0].id] = node
    return found


def top_level_names(module: ModuleType | Path) -> list[str]:
    path = Path(module.__file__) if isinstance(module, ModuleType) else module
    return list(_top_level(ast.parse(path.read_text(encoding="utf-8"))))


def used(module: ModuleType | Path, roots: list[str],
         kinds: Mapping[str, Collection[str]] | None = None) -> list[str]:
    """``roots`` and the module's top-level definitions they use, directly or through one
    another, in the module's order: what to copy so that ``roots`` work. Of a dispatch
    table named in ``kinds``, only the entries of those kinds count."""
    path = Path(module.__file__) if isinstance(module, ModuleType) else module
    definitions = _top_level(ast.parse(path.read_text(encoding="utf-8")))
    wanted, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        node = definitions[name]
        within: list[ast.AST] = [node]
        if kinds is not None and name in kinds:
            within = [part for entry in _entries(node, kinds[name]) for part in entry]
        todo += [n for part in within for n in _names(part)
                 if n in definitions and n != name]
    return [name for name in definitions if name in wanted]


def _names(node: ast.AST) -> list[str]:
    """The names ``node`` uses, leaving out annotations (which a script never evaluates)."""
    if isinstance(node, ast.Name):
        return [node.id]
    skipped = ("annotation", "returns")
    return [n for field, value in ast.iter_fields(node) if field not in skipped
            for child in (value if isinstance(value, list) else [value])
            if isinstance(child, ast.AST) for n in _names(child)]


def layer_parts(layers: Path, randomness: Path, names: list[str]
                ) -> list[tuple[ModuleType | Path, list[str]]]:
    """What a script copies for a backend's layers ``names`` (from its ``layers`` file): with
    specforge's dropout, its generator too, the node's key (:mod:`specforge.ir.randomness`)
    and the backend's masks on the device (its ``randomness`` file)."""
    if "Dropout" not in names:
        return [(layers, names)]
    from specforge.ir import randomness as reference

    return [(reference, used(reference, ["node_key", "as_int32", "mask_shape"])),
            (randomness, used(randomness, ["dropout_mask"])), (layers, names)]


def constants(parts: list[tuple[ModuleType, list[str]]]) -> str:
    return "\n".join(f"{name} = {getattr(module, name)!r}" for module, names in parts
                     for name in names)


def namespace(value: Any, indent: int = 0, width: int = 100, used: int = 0) -> str:
    """A Python expression for a spec or IR value, wrapped black-style to ``width`` columns
    (``indent``: the line's indentation, ``used``: columns taken before the value on its
    first line). Models and dataclasses become SimpleNamespace (attribute access, as in
    specforge), mappings dicts, the rest ``repr`` literals."""
    if isinstance(value, BaseModel):
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


#: Standard-library modules a script's code may use, imported by the script when it does.
STANDARD_MODULES = ["argparse", "codecs", "concurrent.futures.process", "contextlib", "gc",
                    "hashlib", "io", "json", "math", "multiprocessing", "os", "pickle",
                    "signal", "sys", "tarfile", "time", "urllib.error", "urllib.request",
                    "warnings", "zlib"]


def import_block(code: str) -> str:
    """The script's standard-library imports: the modules and dataclass helpers its code
    uses."""
    modules = [m for m in STANDARD_MODULES if re.search(rf"\b{re.escape(m)}\.", code)]
    names = [n for n in ("dataclass", "field", "fields") if re.search(rf"@{n}\b|\b{n}\(", code)]
    lines = [f"import {m}\n" for m in modules]
    if names:
        lines.append(f"from dataclasses import {', '.join(names)}\n")
    return "".join(lines)


def render(program: Program, backend: str, template_folder: Path, template: str,
           **context: Any) -> str:
    """A backend's script for ``program``: its template (extending the core one), the core
    context (settings, data, shared code) and the backend's ``context``."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([template_folder, CORE_TEMPLATES]),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True,
                             autoescape=False)
    env.filters["py"] = repr
    spec = program.spec
    data = spec.data
    source_kind = spec.data.source.type if spec.data else None
    body = env.get_template(template).render(
        version=__version__, backend=backend, program=program, spec=spec,
        source_kind=source_kind, shared=shared(program), prefetch=prefetches(program),
        augmented=data is not None and not augment.is_identity(data.augment),
        loaders=copied(LOADERS.get(source_kind, [])),
        loader_constants=constants(CONSTANTS.get(source_kind, [])),
        data=assignment("DATA", spec.data), loss=assignment("LOSS", program.loss),
        optimizer=assignment("OPTIMIZER", program.optimizer),
        metrics=assignment("METRICS", list(program.metrics)),
        training=assignment("TRAINING", spec.training),
        input_shape=tuple(program.graph.input.shape), **context)
    return finished(body)


def finished(body: str) -> str:
    """A rendered script without what its code does not use (methods of copied classes and
    top-level definitions that nothing calls, settings nothing reads, imports), with its
    standard-library imports and the type names and constants of specforge's it uses."""
    body = _without(body, _unused_definitions)
    body = body.replace("# {imports}\n", import_block(body))
    body = body.replace("# {definitions}\n", definitions(body))
    body = _without(body, _unused_imports)
    return re.sub(r"\n{4,}", "\n\n\n", body)  # what a left-out part leaves: 2 blank lines


#: Methods a framework calls (never the script's own code), kept though no code names them.
FRAMEWORK_HOOKS = frozenset({
    "forward", "extra_repr", "build", "call", "compute_output_shape", "get_config",
    "from_config", "update_step", "update_state", "reset_state", "result",
    "on_train_batch_begin", "on_epoch_end"})
#: Constants of specforge's that copied code may use, defined when it does: (module, names,
#: comment).
ON_DEMAND: list[tuple[ModuleType, list[str], str]] = [
    (program_module, ["PROBABILITY_EPSILON"], ""),
    (pipeline, ["SPLIT", "SHUFFLE", "AUGMENT"], "  # purposes of specforge's random streams"),
]


def _referenced(tree: ast.AST) -> set[str]:
    """Every name the code loads, every attribute it reads and every string it holds (a
    method may be looked up by name)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found


def _unused_definitions(tree: ast.Module) -> list[ast.stmt]:
    """Top-level definitions and methods of top-level classes that no code names (a
    framework's hooks and ``main`` aside)."""
    used_names = _referenced(tree) | {"main"}
    methods = [method for cls in tree.body if isinstance(cls, ast.ClassDef)
               for method in cls.body if isinstance(method, ast.FunctionDef)
               and not method.name.startswith("__") and method.name not in FRAMEWORK_HOOKS
               and method.name not in used_names]
    return methods + [node for node in tree.body
                      if _defined(node) and not _defined(node) & used_names]


def _unused_imports(tree: ast.Module) -> list[ast.stmt]:
    used_names = _referenced(tree)
    return [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)
            and getattr(node, "module", None) != "__future__" and not _bound(node) & used_names]


def _defined(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.ClassDef | ast.FunctionDef):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {n.id for target in node.targets for n in ast.walk(target)
                if isinstance(n, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _without(body: str, unused: Callable[[ast.Module], list[ast.stmt]]) -> str:
    """``body`` without the statements ``unused(tree)`` finds, until it finds none (taking
    one out may leave another unused); the blank lines before each go with it."""
    while found := unused(ast.parse(body)):
        lines = body.split("\n")
        for node in sorted(found, key=lambda n: n.lineno, reverse=True):
            first = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
            # comments right above a statement are about it
            while first > 1 and lines[first - 2].lstrip().startswith("#"):
                first -= 1
            while first > 1 and not lines[first - 2].strip():
                first -= 1
            del lines[first - 1:node.end_lineno]
        body = "\n".join(lines)
    return body


def definitions(body: str) -> str:
    """The script's type names (Any: annotations are not evaluated, but name what the code
    copied from specforge expects) and the constants of specforge's that its code uses."""
    tree = ast.parse(body)
    bound = {name for node in tree.body for name in _bound(node)} | set(dir(builtins))
    annotations = [node.annotation for node in ast.walk(tree)
                   if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation] + \
        [node.returns for node in ast.walk(tree)
         if isinstance(node, ast.FunctionDef) and node.returns]
    aliases = sorted({n.id for a in annotations for n in ast.walk(a)
                      if isinstance(n, ast.Name)} - bound)
    used_names = _referenced(tree)
    lines = []
    if aliases:
        lines.append("# Type names in the annotations of the code copied from specforge.")
        line = ""
        for name in [*aliases, "Any"]:
            if line and len(line) + len(name) > 97:
                lines.append(line + "Any")
                line = ""
            line += f"{name}{'' if name == 'Any' else ' = '}"
        lines.append(line)
    for module, names, comment in ON_DEMAND:
        if needed := [n for n in names if n in used_names]:
            values = ", ".join(repr(getattr(module, n)) for n in needed)
            lines.append(f"{', '.join(needed)} = {values}{comment}")
    return "".join(line + "\n" for line in lines)


def _bound(node: ast.stmt) -> set[str]:
    """The names a top-level statement binds (imports included)."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return _defined(node)
