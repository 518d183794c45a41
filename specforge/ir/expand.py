"""Expanding `blocks:` and `repeat:` into a flat list of placed layers.

Names are hierarchical like torchvision's: a block instance `layer1` repeated twice holds
`layer1.0.conv1`, `layer1.1.conv1`, ...; a repeated layer `conv` becomes `conv.0`, `conv.1`.
Inside a block, `input` names the block's input and other names refer to the block's layers.
A reference to a repeated layer or a block instance means its last output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from specforge.errors import DataPath, Location, Problem, valid_choices_hint
from specforge.spec.layers import BlockUse, Layer, Merge
from specforge.spec.schema import Spec, problems_from_validation
from specforge.spec.source import LoadedSpec, SourceMap

MAX_BLOCK_DEPTH = 16
#: Most layers a model may expand to: `repeat` and nested blocks multiply, and a few lines can
#: ask for a billion. Expansion stops at once past this (README, "Limits").
MAX_LAYERS = 10_000
#: Expansion also stops after this many problems (a broken block repeated a million times).
MAX_EXPANSION_PROBLEMS = 100
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_layer_adapter: TypeAdapter[Any] | None = None


def _adapter() -> TypeAdapter[Any]:
    global _layer_adapter
    if _layer_adapter is None:  # built lazily: only specs with blocks need it
        _layer_adapter = TypeAdapter(Layer)
    return _layer_adapter


@dataclass(frozen=True)
class Placed:
    """One spec layer at its final place in the model."""

    layer: Any
    name: str
    #: References (full names, possibly of repeated layers or blocks) this layer reads.
    inputs: tuple[str, ...]
    path: DataPath
    location: Location | None
    via: Location | None = None


@dataclass
class Expansion:
    layers: list[Placed] = field(default_factory=list)
    #: A block instance's or repeated layer's name -> the name of its last output.
    aliases: dict[str, str] = field(default_factory=dict)
    output: str = "input"
    problems: list[Problem] = field(default_factory=list)


def canonical_type(layer: Any) -> str:
    """The first spelling a layer type accepts, e.g. `max_pool2d` for `max_pooling2d`."""
    return type(layer).model_fields["type"].annotation.__args__[0]


def expand(spec: Spec, loaded: LoadedSpec) -> Expansion:
    """Flatten the model's layers, instantiating blocks and repeats."""
    result = Expansion()
    expander = _Expander(spec, loaded, result)
    paths = [("model", "layers", i) for i in range(len(spec.model.layers))]
    located = [(layer, p, loaded.sources.locate(p), None)
               for layer, p in zip(spec.model.layers, paths, strict=True)]
    try:
        result.output = expander.sequence(located, scope="", scope_input="input", depth=0)
    except _Stopped:
        if len(result.layers) > MAX_LAYERS:
            path, location = expander.top
            result.problems.append(Problem(
                f"the model expands to more than {MAX_LAYERS:,} layers", location, path,
                "`repeat` and blocks inside blocks multiply: lower a repeat count"))
    return result


class _Stopped(Exception):
    """Expansion went past MAX_LAYERS or MAX_EXPANSION_PROBLEMS."""


class _Expander:
    def __init__(self, spec: Spec, loaded: LoadedSpec, result: Expansion) -> None:
        self.spec = spec
        self.loaded = loaded
        self.result = result
        #: Every name given to a layer, repeated layer or block instance, with its place.
        self.claimed: dict[str, Location | None] = {}
        #: The model's layer being expanded (where a layer limit is reported).
        self.top: tuple[DataPath, Location | None] = ((), None)

    def sequence(self, layers: list[tuple[Any, DataPath, Location | None, Location | None]],
                 *, scope: str, scope_input: str, depth: int) -> str:
        """Place ``layers`` one after another; returns the name of the last output."""
        previous = scope_input
        counters: dict[str, int] = {}
        for layer, path, location, via in layers:
            if depth == 0:
                self.top = (path, location)
            kind = canonical_type(layer)
            if layer.name is None:
                counters[kind] = counters.get(kind, 0) + 1
                base = f"{kind}_{counters[kind]}"
            else:
                base = layer.name
            full = scope + base
            if full in self.claimed:
                first = self.claimed[full]
                self.result.problems.append(Problem(
                    f"duplicate layer name '{base}'"
                    + (f" (first used at line {first.line})" if first else ""),
                    self.loaded.sources.locate((*path, "name")), (*path, "name"),
                    "layer and block names must be unique", via))
            self.claimed.setdefault(full, location)
            if layer.inputs is None:
                first_inputs: tuple[str, ...] = (previous,)
            else:
                refs = [layer.inputs] if isinstance(layer.inputs, str) else layer.inputs
                first_inputs = tuple(scope_input if r == "input" else scope + r for r in refs)
            if isinstance(layer, Merge) and layer.repeat > 1:
                self.result.problems.append(Problem(
                    f"{kind} cannot repeat: its inputs are fixed", location,
                    (*path, "repeat"), "remove `repeat`", via))
            previous = self._place_repeated(layer, full, first_inputs, path, location, via,
                                            depth)
        return previous

    def _place_repeated(self, layer: Any, full: str, first_inputs: tuple[str, ...],
                        path: DataPath, location: Location | None, via: Location | None,
                        depth: int) -> str:
        inputs = first_inputs
        last = full
        for r in range(layer.repeat):
            if (len(self.result.layers) > MAX_LAYERS
                    or len(self.result.problems) > MAX_EXPANSION_PROBLEMS):
                raise _Stopped
            name = full if layer.repeat == 1 else f"{full}.{r}"
            if isinstance(layer, BlockUse):
                last = self.block(layer, name, inputs[0], path, location, depth)
                if len(inputs) > 1:
                    self.result.problems.append(Problem(
                        "a block takes one input", location, (*path, "inputs"), None, via))
            else:
                self.result.layers.append(Placed(layer, name, inputs, path, location, via))
                last = name
            if name != last:
                self.result.aliases[name] = last
            inputs = (last,)
        if full != last:
            self.result.aliases[full] = last
        return last

    def block(self, use: BlockUse, instance: str, input_name: str, use_path: DataPath,
              use_location: Location | None, depth: int) -> str:
        """Instantiate block ``use.block`` as ``instance``; returns its output name."""
        problems = self.result.problems
        if depth >= MAX_BLOCK_DEPTH:
            problems.append(Problem(f"blocks nest deeper than {MAX_BLOCK_DEPTH} (recursive "
                                    "block?)", use_location, use_path))
            return input_name
        definition = self.spec.blocks.get(use.block)
        if definition is None:
            problems.append(Problem(
                f"unknown block '{use.block}'", self.loaded.sources.locate((*use_path, "block")),
                (*use_path, "block"),
                valid_choices_hint(use.block, list(self.spec.blocks), "defined blocks")
                if self.spec.blocks else "define it under `blocks:` at the top level"))
            return input_name
        values = self._arguments(use, definition.params, use_path)
        if values is None:
            return input_name
        layers = []
        for i, raw in enumerate(definition.layers):
            tpl_path = ("blocks", use.block, "layers", i)
            layer = self._instantiate(raw, values, tpl_path, use_path, use_location)
            if layer is not None:
                layers.append((layer, tpl_path, self.loaded.sources.locate(tpl_path),
                               use_location))
        if len(layers) != len(definition.layers):
            return input_name
        return self.sequence(layers, scope=instance + ".", scope_input=input_name,
                             depth=depth + 1)

    def _arguments(self, use: BlockUse, params: dict[str, Any],
                   use_path: DataPath) -> dict[str, tuple[Any, DataPath]] | None:
        """Each parameter's value and the data path it came from, or None on errors."""
        problems = []
        for arg in use.args:
            if arg not in params:
                problems.append(Problem(
                    f"block '{use.block}' has no parameter '{arg}'",
                    self.loaded.sources.locate((*use_path, "args", arg), key=True),
                    (*use_path, "args", arg),
                    valid_choices_hint(arg, list(params), "its parameters")
                    if params else "it takes no parameters"))
        values: dict[str, tuple[Any, DataPath]] = {}
        for name, default in params.items():
            if name in use.args:
                values[name] = (use.args[name], (*use_path, "args", name))
            elif default is None:
                problems.append(Problem(
                    f"block '{use.block}' needs a value for parameter '{name}'",
                    self.loaded.sources.locate(use_path), (*use_path, "args"),
                    f"add args: {{{name}: ...}}"))
            else:
                values[name] = (default, ("blocks", use.block, "params", name))
        self.result.problems.extend(problems)
        return None if problems else values

    def _instantiate(self, raw: dict[str, Any], values: dict[str, tuple[Any, DataPath]],
                     tpl_path: DataPath, use_path: DataPath,
                     use_location: Location | None) -> Any:
        """Substitute parameters into one template layer and validate it."""
        sources = SourceMap()
        sources.copy_subtree(self.loaded.sources, tpl_path, ())
        problems: list[Problem] = []
        data = _substitute(raw, values, (), sources, self.loaded.sources, problems, tpl_path)
        if not problems:
            try:
                return _adapter().validate_python(data)
            except ValidationError as exc:
                view = LoadedSpec(data if isinstance(data, dict) else {}, sources, "")
                problems = problems_from_validation(exc, view, Layer, ())
        for p in problems:
            self.result.problems.append(Problem(p.message, p.location, tpl_path + p.path,
                                                p.hint, use_location))
        return None


def _substitute(value: Any, values: dict[str, tuple[Any, DataPath]], path: DataPath,
                sources: SourceMap, spec_sources: SourceMap, problems: list[Problem],
                tpl_path: DataPath) -> Any:
    """Replace `${param}` references; a whole-value reference keeps the argument's type
    and takes the argument's location, so errors in it point at the block's use site."""
    if isinstance(value, dict):
        return {k: _substitute(v, values, (*path, k), sources, spec_sources, problems, tpl_path)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values, (*path, i), sources, spec_sources, problems, tpl_path)
                for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    for name in _REFERENCE.findall(value):
        if name not in values:
            problems.append(Problem(
                f"unknown block parameter '${{{name}}}'", sources.locate(path), path,
                valid_choices_hint(name, list(values), "parameters") if values
                else "declare it under the block's `params:`"))
            return value
    whole = _REFERENCE.fullmatch(value)
    if whole:
        arg, arg_path = values[whole.group(1)]
        sources.drop_under(path)
        sources.copy_subtree(spec_sources, arg_path, path)
        return arg
    return _REFERENCE.sub(lambda m: str(values[m.group(1)][0]), value)

