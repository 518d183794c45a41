"""Expanding `blocks:` and `repeat:` into a flat list of placed layers.

A block is used as `{type: block, block: NAME, args: {...}}`. Its `params:` give each
parameter's default (null: the use must give it); a default may be an expression over the
parameters written before it and the input's shape, computed for each use:

```yaml
blocks:
  bottleneck:
    params:
      filters: null
      strides: 1
      project: "${strides > 1 or input.channels != 4 * filters}"
    layers:
      - {type: conv2d, name: c0_conv, filters: "${4 * filters}", kernel: 1,
         strides: "${strides}", when: "${project}"}
      - ...
      - {type: add, name: add, inputs: [c0_bn, c3_bn], when: "${project}"}
      - {type: add, name: add, inputs: [input, c3_bn], when: "${not project}"}
```

Inside a block, `input` names the block's input and other names refer to the block's
layers; `input.height`, `input.width` and `input.channels` in an expression are the input's
shape. A layer with `when: "${...}"` (true or false) is left out of the uses where it is
false: a layer without `inputs:` then reads the last layer present before it, and naming a
left-out layer in `inputs:` is an error. Two layers may share a name when their conditions
never hold together (one `add` or the other above). The block's output is its last present
layer.

Names are hierarchical like torchvision's: a block instance `layer1` repeated twice holds
`layer1.0.conv1`, `layer1.1.conv1`, ...; a repeated layer `conv` becomes `conv.0`, `conv.1`.
A reference to a repeated layer or a block instance means its last output.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from specforge.errors import DataPath, Location, Problem, source_line, valid_choices_hint
from specforge.spec.expressions import ExpressionError, Scope, evaluate
from specforge.spec.layers import BlockUse, Layer, Merge
from specforge.spec.schema import Spec, problems_from_validation
from specforge.spec.source import LoadedSpec, SourceMap

MAX_BLOCK_DEPTH = 16
#: Most layers a model may expand to: `repeat` and nested blocks multiply, and a few lines can
#: ask for a billion. Expansion stops at once past this (README, "Limits").
MAX_LAYERS = 10_000
#: Expansion also stops after this many problems (a broken block repeated a million times).
MAX_EXPANSION_PROBLEMS = 100
#: `${...}`: an expression runs to the first `}` (the grammar has no braces).
_EXPRESSION = re.compile(r"\$\{([^}]*)\}")
_PLAIN_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*")
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


#: The shape of a layer placed so far (a full name or alias), or why it has none.
ShapeOf = Callable[[str, Expansion], tuple[int, ...] | str]
#: A block's layers skipped by `when:`, by name, with where their condition is.
Skipped = dict[str, Location | None]


def expand(spec: Spec, loaded: LoadedSpec, shape_of: ShapeOf | None = None) -> Expansion:
    """Flatten the model's layers, instantiating blocks and repeats. ``shape_of`` gives
    expressions the shape of a block's input (`input.channels`)."""
    result = Expansion()
    expander = _Expander(spec, loaded, result, shape_of)
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
    causes = [p for p in result.problems if id(p) not in expander.follow_ups]
    if causes:
        result.problems = causes
    return result


class _Stopped(Exception):
    """Expansion went past MAX_LAYERS or MAX_EXPANSION_PROBLEMS."""


class _UnknownShape(ExpressionError):
    """A block input's shape that is unknown because an earlier problem left it so."""


class _Expander:
    def __init__(self, spec: Spec, loaded: LoadedSpec, result: Expansion,
                 shape_of: ShapeOf | None) -> None:
        self.spec = spec
        self.loaded = loaded
        self.result = result
        self.shape_of = shape_of
        #: Every name given to a layer, repeated layer or block instance, with its place.
        self.claimed: dict[str, Location | None] = {}
        #: The problems that only follow from others (dropped when those are shown), by id;
        #: holding them keeps their ids unique.
        self.follow_ups: dict[int, Problem] = {}
        #: The model's layer being expanded (where a layer limit is reported).
        self.top: tuple[DataPath, Location | None] = ((), None)

    def sequence(self, layers: list[tuple[Any, DataPath, Location | None, Location | None]],
                 *, scope: str, scope_input: str, depth: int, skipped: Skipped | None = None
                 ) -> str:
        """Place ``layers`` one after another; returns the name of the last output.
        ``skipped`` names a block's layers that its `when:` conditions left out."""
        previous = scope_input
        counters: dict[str, int] = {}
        present = {layer.name for layer, *_ in layers}
        gone = {name: at for name, at in (skipped or {}).items() if name not in present}
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
                self._check_not_skipped(layer.inputs, gone, path, via)
            if isinstance(layer, Merge) and layer.repeat > 1:
                self.result.problems.append(Problem(
                    f"{kind} cannot repeat: its inputs are fixed", location,
                    (*path, "repeat"), "remove `repeat`", via))
            previous = self._place_repeated(layer, full, first_inputs, path, location, via,
                                            depth)
        return previous

    def _check_not_skipped(self, inputs: str | list[str], gone: Skipped, path: DataPath,
                           via: Location | None) -> None:
        listed = [((*path, "inputs"), inputs)] if isinstance(inputs, str) else [
            ((*path, "inputs", i), ref) for i, ref in enumerate(inputs)]
        for where, ref in listed:
            if ref in gone:
                at = gone[ref]
                self.result.problems.append(Problem(
                    f"layer '{ref}' is skipped here: its `when:`"
                    + (f" (line {at.line})" if at else "") + " is false for this use",
                    self.loaded.sources.locate(where), where,
                    "give this layer a `when:` that excludes it too, or give another layer "
                    f"the name '{ref}' under the opposite condition", via))

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
        scope = Scope({k: v for k, (v, _) in values.items()},
                      lambda: self._input_shape(input_name))
        if not self._computed_defaults(values, scope, use.block, use_location):
            return input_name
        layers, skipped, failed = [], {}, False
        for i, raw in enumerate(definition.layers):
            tpl_path = ("blocks", use.block, "layers", i)
            context = self._context(values, scope, tpl_path)
            present = self._condition(raw, context, tpl_path, use_location)
            if present is False and isinstance(raw.get("name"), str):
                skipped[raw["name"]] = self.loaded.sources.locate((*tpl_path, "when"))
            if not present:
                failed |= present is None
                continue
            template = {k: v for k, v in raw.items() if k != "when"}
            layer = self._instantiate(template, context, tpl_path, use_location)
            if layer is not None:
                layers.append((layer, tpl_path, self.loaded.sources.locate(tpl_path),
                               use_location))
            failed |= layer is None
        if failed:
            return input_name
        return self.sequence(layers, scope=instance + ".", scope_input=input_name,
                             depth=depth + 1, skipped=skipped)

    def _computed_defaults(self, values: dict[str, tuple[Any, DataPath]], scope: Scope,
                           block: str, use_location: Location | None) -> bool:
        """Evaluate, in the order written, the parameter defaults that are expressions
        (`project: "${strides > 1}"`); each sees the other parameters, the computed ones
        before it, and the input's shape. False after an error."""
        def is_expression(value: Any, path: DataPath) -> bool:
            return (path[:3] == ("blocks", block, "params") and isinstance(value, str)
                    and "${" in value)

        params = {k: v for k, (v, path) in values.items() if not is_expression(v, path)}
        for name, (value, path) in values.items():
            if not is_expression(value, path):
                continue
            context = self._context(values, Scope(params, scope.input_shape), path)
            result = _substitute(value, (), context)
            self._report(context.problems, path, use_location)
            if context.problems:
                return False
            values[name] = (result, path)
            params[name] = result
        scope.params.update(params)
        return True

    def _input_shape(self, input_name: str) -> tuple[int, ...]:
        """The shape of a block's input, for `input.channels` and its kin."""
        shape = self.shape_of(input_name, self.result) if self.shape_of else "no shapes"
        if isinstance(shape, str):
            raise (_UnknownShape if self.result.problems else ExpressionError)(
                f"the shape of the block's input is not known here ({shape})", 0,
                "the input must come from earlier layers whose shapes are valid")
        return shape

    def _context(self, values: dict[str, tuple[Any, DataPath]], scope: Scope,
                 tpl_path: DataPath) -> _Substitution:
        sources = SourceMap()
        sources.copy_subtree(self.loaded.sources, tpl_path, ())
        return _Substitution(values, scope, sources, self.loaded.sources, [], self.follow_ups)

    def _condition(self, raw: dict[str, Any], context: _Substitution, tpl_path: DataPath,
                   use_location: Location | None) -> bool | None:
        """Whether a template layer is present in this use (None: its `when:` is wrong)."""
        if "when" not in raw:
            return True
        value = _substitute(raw["when"], ("when",), context)
        if not context.problems and not isinstance(value, bool):
            context.problems.append(Problem(
                f"`when:` must be true or false, got {value!r}",
                self.loaded.sources.locate((*tpl_path, "when")), ("when",),
                "e.g. when: \"${strides > 1}\""))
        self._report(context.problems, tpl_path, use_location)
        return None if context.problems else value

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
        if "input" in params:
            problems.append(Problem(
                "a block parameter cannot be called 'input'",
                self.loaded.sources.locate(("blocks", use.block, "params", "input"), key=True),
                ("blocks", use.block, "params", "input"),
                "inside a block, `input` is the block's input (input.channels is its "
                "channel count); choose another name"))
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

    def _instantiate(self, raw: dict[str, Any], context: _Substitution, tpl_path: DataPath,
                     use_location: Location | None) -> Any:
        """Substitute parameters into one template layer and validate it."""
        data = _substitute(raw, (), context)
        problems = context.problems
        if not problems:
            try:
                return _adapter().validate_python(data)
            except ValidationError as exc:
                view = LoadedSpec(data if isinstance(data, dict) else {}, context.sources, "")
                problems = problems_from_validation(exc, view, Layer, ())
        self._report(problems, tpl_path, use_location)
        return None

    def _report(self, problems: list[Problem], tpl_path: DataPath,
                use_location: Location | None) -> None:
        """Record a template layer's problems at their place in the spec, with the use."""
        for p in problems:
            placed = Problem(p.message, p.location, tpl_path + p.path, p.hint, use_location)
            self.result.problems.append(placed)
            if id(p) in self.follow_ups:
                self.follow_ups[id(placed)] = placed


def _substitute(value: Any, path: DataPath, context: _Substitution) -> Any:
    """Replace `${...}` expressions; a value that is only `${param}` keeps the argument's type
    and takes the argument's location, so errors in it point at the block's use site."""
    if isinstance(value, dict):
        return {k: _substitute(v, (*path, k), context) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, (*path, i), context) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    found = list(_EXPRESSION.finditer(value))
    if len(found) != value.count("${"):
        context.problems.append(Problem(
            "'${' without its closing '}'", context.locate_text(path, value, value.rindex("${")),
            path, "write ${expression}, e.g. ${filters * 4}"))
        return value
    whole = _EXPRESSION.fullmatch(value)
    if whole:
        plain = _PLAIN_NAME.fullmatch(whole.group(1))
        if plain and plain.group(1) in context.values:
            arg, arg_path = context.values[plain.group(1)]
            context.sources.drop_under(path)
            context.sources.copy_subtree(context.spec_sources, arg_path, path)
            return arg
        return context.evaluate(whole, value, path)
    return _EXPRESSION.sub(lambda m: _as_text(context.evaluate(m, value, path)), value)


def _as_text(value: Any) -> str:
    """An expression's value written into a longer string, in YAML's spelling."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class _Substitution:
    """One template layer being filled in: the use's values and where errors go."""

    values: dict[str, tuple[Any, DataPath]]
    scope: Scope
    #: Locations of the layer being built (a copy of the template's), updated as values move.
    sources: SourceMap
    spec_sources: SourceMap
    problems: list[Problem]
    follow_ups: dict[int, Problem]

    def evaluate(self, match: re.Match[str], text: str, path: DataPath) -> Any:
        """The value of the expression ``match`` found in ``text`` (None after an error)."""
        expression = match.group(1)
        try:
            return evaluate(expression, self.scope)
        except ExpressionError as exc:
            at = match.start(1) + exc.column
            message = exc.message
            if message.startswith("unknown name") and _PLAIN_NAME.fullmatch(expression):
                message = f"unknown block parameter '${{{expression.strip()}}}'"
            problem = Problem(
                f"{message} (column {exc.column + 1} of the expression '{expression.strip()}')",
                self.locate_text(path, text, at), path, exc.hint)
            self.problems.append(problem)
            if isinstance(exc, _UnknownShape):
                self.follow_ups[id(problem)] = problem
            return None

    def locate_text(self, path: DataPath, text: str, offset: int) -> Location | None:
        """The location of character ``offset`` of string value ``text`` at ``path``: exact
        when the value is written on one line as it reads, else the value's start."""
        start = self.sources.locate(path)
        line = source_line(start.file, start.line) if start else None
        if start is None or line is None:
            return start
        column = start.column - 1
        if line[column:column + 1] in ("'", '"'):
            column += 1
        if line[column:column + len(text)] != text:
            return start
        return Location(start.file, start.line, column + offset + 1)
