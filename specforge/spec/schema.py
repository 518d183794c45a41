"""The whole spec file as one pydantic model, and validation with located errors."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import Field, ValidationError

from specforge.errors import DataPath, Problem, SpecError, valid_choices_hint
from specforge.spec.data import Data
from specforge.spec.defaults import apply_defaults
from specforge.spec.layers import BlockDef, LayerDefaults, ModelSpec, Name, SpecModel
from specforge.spec.source import LoadedSpec
from specforge.spec.sweep import Sweep
from specforge.spec.training import Loss, Metric, Optimizer, Training


class Spec(SpecModel):
    """A specforge spec: one model, its training and its data, in one file."""

    name: str | None = Field(None, max_length=200, description="A title for logs and reports.")
    description: str | None = Field(None, max_length=10_000)
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="Seeds weights, shuffling, augmentation and dropout.")
    defaults: LayerDefaults = Field(default_factory=dict)
    blocks: dict[Name, BlockDef] = Field(default_factory=dict,
                                         description="Reusable groups of layers.")
    model: ModelSpec
    loss: Loss
    optimizer: Optimizer
    metrics: list[Metric] = Field(default_factory=lambda: [Metric(type="accuracy")])
    data: Data | None = None
    training: Training = Field(default_factory=Training)
    sweep: Sweep | None = Field(None, description="A hyperparameter search over this spec "
                                                  "(`specforge sweep`; `run` ignores it).")


def validate_spec(loaded: LoadedSpec) -> Spec:
    """Fill in `defaults:` and validate raw spec data against :class:`Spec`, reporting every
    error with its place."""
    problems = apply_defaults(loaded) if isinstance(loaded.data, dict) else []
    if isinstance(loaded.data, dict):
        problems.extend(_expressions_outside_blocks(loaded.data.get("model"), ("model",),
                                                    loaded))
    try:
        spec = Spec.model_validate(loaded.data)
    except ValidationError as exc:
        known = {p.path for p in problems}  # e.g. an expression: not also "expected a number"
        problems.extend(p for p in problems_from_validation(exc, loaded, Spec, ())
                        if p.path not in known)
        raise SpecError(_sorted(problems)) from None
    if problems:
        raise SpecError(_sorted(problems))
    return spec


def _expressions_outside_blocks(value: Any, path: DataPath, loaded: LoadedSpec
                                ) -> list[Problem]:
    """`${...}` in the model's own layers: there are no parameters there to compute with."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return [Problem(f"{_short(value)}: `${{...}}` expressions are computed inside a "
                        "block's layers only", loaded.sources.locate(path), path,
                        "write the value itself here, or move the layers into a block under "
                        "`blocks:` and pass what varies as its parameters")
                ] if isinstance(value, str) and "${" in value else []
    return [p for key, item in items
            for p in _expressions_outside_blocks(item, (*path, key), loaded)]


def problems_from_validation(exc: ValidationError, loaded: LoadedSpec, model: Any,
                             prefix: DataPath) -> list[Problem]:
    """Turn pydantic errors into located problems with did-you-mean hints, in file order.

    ``model`` is the type validated at ``prefix`` within the spec data.
    """
    groups: dict[DataPath, list[tuple[dict[str, Any], tuple[Any, ...]]]] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        groups.setdefault(prefix + _data_path(loaded.data, prefix, loc), []).append((err, loc))
    problems = []
    for path, errors in groups.items():
        err, loc = _most_specific(errors)
        problem = _problem(err, path, loaded, model, loc)
        if len(errors) > 1 and err["type"] == "literal_error" and problem.hint:
            # a name that fits none of a union's names: the union's other kinds count too
            others = _other_kinds(errors)
            if others:
                problem = Problem(problem.message, problem.location, path,
                                  f"{problem.hint}, or {' or '.join(others)}")
        if len(errors) > 1 and err["type"] not in ("literal_error", "value_error", *_BOUNDS):
            # A value that fits no member of a plain union: say what the field accepts.
            description = _description_at(model, _field_loc(loc))
            problem = Problem(f"{_short(err.get('input'))} is not an accepted value",
                              problem.location, path, description or problem.hint)
        problems.append(problem)
    return _sorted(_merge_misspelt_required(problems))


#: pydantic's errors for a value of the right type out of its range (a number, a length).
_BOUNDS = ("finite_number", "greater_than", "greater_than_equal", "less_than",
           "less_than_equal", "too_short", "too_long")


#: What a union member of a scalar type takes, by the first word of its error's type.
_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true/false"}


def _other_kinds(errors: list[tuple[dict[str, Any], tuple[Any, ...]]]) -> list[str]:
    """The scalar kinds (integer, number, true/false) the members of a union take."""
    words = [_KIND_WORDS.get(err["type"].split("_")[0]) for err, _ in errors]
    return list(dict.fromkeys(w for w in words if w))


def _most_specific(errors: list[tuple[dict[str, Any], tuple[Any, ...]]]
                   ) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """Of the errors one union member each gave, the one that speaks to the value written:
    a failed check of a mapping's contents for a mapping, a choice among names for a name,
    a bound for a number."""
    if len(errors) == 1:
        return errors[0]
    value = errors[0][0].get("input")
    kinds = ("value_error",) if isinstance(value, dict) else (
        ("literal_error",) if isinstance(value, str) else _BOUNDS)
    for kind in kinds:
        for err, loc in errors:
            if err["type"] == kind:
                return err, loc
    return errors[0]


def _merge_misspelt_required(problems: list[Problem]) -> list[Problem]:
    """`optimiser:` makes `optimizer` both unknown and missing: report it once, as a typo."""
    suggested = {(p.path[:-1], p.hint.split("'")[1]) for p in problems
                 if p.message.startswith("unknown field") and p.hint
                 and p.hint.startswith("did you mean")}
    return [p for p in problems if not (p.message.startswith("missing required field")
                                        and (p.path[:-1], p.path[-1]) in suggested)]


def _sorted(problems: list[Problem]) -> list[Problem]:
    def key(p: Problem) -> tuple[str, int, int]:
        loc = p.location
        return (loc.file, loc.line, loc.column) if loc else ("", 0, 0)
    return sorted(problems, key=key)


def _data_path(data: Any, prefix: DataPath, loc: tuple[Any, ...]) -> DataPath:
    """Drop the union tags and validator names that pydantic adds to ``loc``."""
    node = data
    for part in prefix:
        node = node[part] if _has(node, part) else None
    path: list[str | int] = []
    tagged: Any = None  # the mapping whose union tag `loc` has passed
    for part in loc:
        if isinstance(node, dict) and node is not tagged and node.get("type") == part:
            tagged = node  # the tag comes first, even where a field has its name (`block`)
        elif _has(node, part):
            path.append(part)
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and _is_field_name(part) and (
                node.get("type") != part):
            # A field that is missing from the data: keep it, it is the field named.
            path.append(part)
            node = None
        elif isinstance(part, int) and isinstance(node, list):
            path.append(part)  # an item missing from a fixed-length list
            node = None
    return tuple(path)


def _is_field_name(part: str) -> bool:
    """pydantic also puts union members ('PerSidePadding', 'literal[...]') into ``loc``."""
    return part.isidentifier() and not part[0].isupper()


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    if isinstance(node, list):
        return isinstance(part, int) and 0 <= part < len(node)
    return False


#: pydantic's words for a type, and what a YAML author calls it.
_YAML_WORDS = [
    ("Input should be a valid dictionary or object to extract fields from",
     "expected a mapping (key: value pairs)"),
    ("Input should be a valid dictionary", "expected a mapping (key: value pairs)"),
    ("Input should be a valid tuple", "expected a list"),
    ("Input should be a valid list", "expected a list"),
    ("Input should be a valid integer, unable to parse string as an integer",
     "expected a whole number"),
    ("Input should be a valid integer, got a number with a fractional part",
     "expected a whole number"),
    ("Input should be a valid integer", "expected a whole number"),
    ("Input should be a valid number, unable to parse string as a number", "expected a number"),
    ("Input should be a valid number", "expected a number"),
    ("Input should be a valid boolean, unable to interpret input",
     "expected true or false"),
    ("Input should be a valid boolean", "expected true or false"),
    ("Input should be a valid string", "expected a string"),
    ("Input should be", "should be"),
    ("List should have", "should have"),
]


def _yaml_words(message: str) -> str:
    message = message.replace(" after validation", "")
    if message.startswith("Value error, "):
        return message[len("Value error, "):]
    for pydantic_words, yaml_words in _YAML_WORDS:
        if message.startswith(pydantic_words):
            rest = message[len(pydantic_words):]
            if " or instance of " in rest:  # "... or instance of ModelSpec": a class name
                rest = ""
            return yaml_words + rest
    return message


def _problem(err: Any, path: DataPath, loaded: LoadedSpec, model: Any,
             loc: tuple[Any, ...]) -> Problem:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    where = loaded.sources.locate(path)
    if kind == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        hint = valid_choices_hint(str(path[-1]), fields, "valid fields") if fields else None
        home = _empty_section_taking(loaded, model, loc[:-1], path[:-1], str(path[-1]))
        if home:
            hint = f"it belongs to `{home}:`, which is empty here: indent it under `{home}:`"
        return Problem(f"unknown field '{path[-1]}'", loaded.sources.locate(path, key=True),
                       path, hint)
    if kind == "missing" and path and isinstance(path[-1], int):
        return Problem(f"item [{path[-1]}] is missing from the list",
                       loaded.sources.locate(path[:-1]), path,
                       _description_at(model, _field_loc(loc)))
    if kind == "missing":
        fields = _fields_at(model, loc[:-1])
        hint = f"this mapping takes: {', '.join(sorted(fields))}" if fields else None
        return Problem(f"missing required field '{path[-1]}'",
                       loaded.sources.locate(path[:-1]), path, hint)
    if kind == "union_tag_invalid":
        tags = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
        tag = ctx.get("tag")
        return Problem(f"unknown type '{tag}'", loaded.sources.locate((*path, "type")),
                       (*path, "type"), valid_choices_hint(str(tag), tags, "valid types"))
    if kind == "union_tag_not_found":
        return Problem("missing 'type'", where, path,
                       f"add `type:`, one of: {_tags_at(model, loc)}")
    if kind == "literal_error" and isinstance(value, str):
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return Problem(f"unknown value '{value}'", where, path,
                       valid_choices_hint(value, choices, "valid values"))
    message = _yaml_words(err["msg"])
    if kind not in ("value_error", "assertion_error"):
        message += f" (got {_short(value)})"
    return Problem(message, where, path)


def _short(value: Any) -> str:
    if value is None:
        return "null"
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- walking the model types along a pydantic error location -----------------------------------

def _field_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` up to and including its last field name."""
    for i in range(len(loc) - 1, -1, -1):
        if isinstance(loc[i], str) and _is_field_name(loc[i]):
            return loc[: i + 1]
    return ()


def _description_at(model: Any, loc: tuple[Any, ...]) -> str | None:
    if not loc:
        return None
    parent = _type_at(model, loc[:-1])
    if _is_model(parent) and loc[-1] in parent.model_fields:
        return parent.model_fields[loc[-1]].description
    return None


def _empty_section_taking(loaded: LoadedSpec, model: Any, loc: tuple[Any, ...],
                          path: DataPath, key: str) -> str | None:
    """The sibling section, left empty (null), that has a field called ``key``."""
    parent = _type_at(model, loc)
    node: Any = loaded.data
    for part in path:
        node = node[part] if _has(node, part) else None
    if not _is_model(parent) or not isinstance(node, dict):
        return None
    for name, info in parent.model_fields.items():
        if node.get(name, 0) is None and key in _fields_at(info.annotation, ()):
            return name
    return None


def _fields_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    target = _type_at(model, loc)
    return list(target.model_fields) if _is_model(target) else []


def _tags_at(model: Any, loc: tuple[Any, ...]) -> str:
    target = _type_at(model, loc, stop_at_union=True)
    tags: list[str] = []
    for member in _union_members(target):
        if _is_model(member) and "type" in member.model_fields:
            tags.extend(_literal_values(member.model_fields["type"].annotation))
    return ", ".join(tags)


def _type_at(tp: Any, loc: tuple[Any, ...], *, stop_at_union: bool = False) -> Any:
    for part in loc:
        tp = _only_model(_strip(tp))
        origin = getattr(tp, "__origin__", None)
        args = getattr(tp, "__args__", ())
        if _is_model(tp):
            if isinstance(part, str) and part in tp.model_fields:
                tp = tp.model_fields[part].annotation
        elif origin in (list, tuple) and isinstance(part, int) and args:
            tp = args[0]
        elif origin is dict and args:
            tp = args[1]
        else:  # a union: ``part`` names the member (its `type` tag or its class name)
            members = [m for m in _union_members(tp) if _is_model(m)]
            chosen = [m for m in members if m.__name__ == part or (
                "type" in m.model_fields
                and part in _literal_values(m.model_fields["type"].annotation))]
            if chosen:
                tp = chosen[0]
    return _strip(tp) if stop_at_union else _only_model(_strip(tp))


def _only_model(tp: Any) -> Any:
    """``X | None`` (or any union with one model member) -> X; anything else unchanged."""
    if _is_model(tp) or getattr(tp, "__origin__", None) in (list, tuple, dict):
        return tp
    members = [m for m in _union_members(tp) if _is_model(m)]
    others = [m for m in _union_members(tp) if not _is_model(m) and m is not type(None)]
    return members[0] if len(members) == 1 and not others else tp


def _strip(tp: Any) -> Any:
    while getattr(tp, "__metadata__", None) is not None:  # Annotated[...]
        tp = tp.__origin__
    return tp


def _union_members(tp: Any) -> list[Any]:
    """The members of a (possibly nested, possibly Annotated) union, flattened."""
    tp = _strip(tp)
    args = getattr(tp, "__args__", None)
    if args is None or _is_model(tp) or getattr(tp, "__origin__", None) in (
            list, dict, tuple, Literal):
        return [tp]
    return [m for a in args for m in _union_members(a)]


def _literal_values(tp: Any) -> list[str]:
    return [str(v) for v in getattr(tp, "__args__", ())]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, SpecModel)
