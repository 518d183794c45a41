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
import re
from collections.abc import Collection, Mapping
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
    and the evaluation, each with what it uses, the dispatch tables cut to the spec's kinds."""
    data = program.spec.data
    augmented = data is not None and not augment.is_identity(data.augment)
    chosen = kinds(program)
    roots: list[tuple[ModuleType, list[str]]] = [
        (weights, ["draw"]), (sources, ["Dataset", "SourceData"]),
        (pipeline, ["split_indices", "Batch", "DataPipeline", "assemble_pipeline"]
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


#: Modules the copied code may use, imported by the script only when it does.
OPTIONAL_IMPORTS = ["codecs", "concurrent.futures.process", "gc", "hashlib", "io",
                    "multiprocessing", "os", "pickle", "signal", "tarfile", "urllib.error",
                    "urllib.request", "warnings", "zlib"]


def import_block(code: str) -> str:
    """The script's standard-library imports: always the loop's, and the rest as used."""
    modules = ["argparse", "contextlib", "json", "math", "sys", "time"] + [
        m for m in OPTIONAL_IMPORTS if re.search(rf"\b{re.escape(m)}\.", code)]
    names = ["dataclass", *(n for n in ("field", "fields") if re.search(rf"\b{n}\(", code))]
    return "".join(f"import {m}\n" for m in sorted(modules)) + \
        f"from dataclasses import {', '.join(names)}\n"


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
    return body.replace("# {imports}\n", import_block(body))
