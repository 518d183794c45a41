"""The whole spec file as one pydantic model, and validation with located errors."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, ValidationError

from specforge.errors import DataPath, Problem, SpecError, valid_choices_hint
from specforge.spec.data import Data
from specforge.spec.layers import BlockDef, ModelSpec, Name, SpecModel
from specforge.spec.source import LoadedSpec
from specforge.spec.training import Loss, Metric, Optimizer, Training


class Spec(SpecModel):
    """A specforge spec: one model, its training and its data, in one file."""

    name: str | None = Field(None, max_length=200, description="A title for logs and reports.")
    description: str | None = Field(None, max_length=10_000)
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="Seeds weights, shuffling, augmentation and dropout.")
    blocks: dict[Name, BlockDef] = Field(default_factory=dict,
                                         description="Reusable groups of layers.")
    model: ModelSpec
    loss: Loss
    optimizer: Optimizer
    metrics: list[Metric] = Field(default_factory=lambda: [Metric(type="accuracy")])
    data: Data | None = None
    training: Training = Field(default_factory=Training)


def validate_spec(loaded: LoadedSpec) -> Spec:
    """Validate raw spec data against :class:`Spec`, reporting every error with its place."""
    try:
        return Spec.model_validate(loaded.data)
    except ValidationError as exc:
        raise SpecError(problems_from_validation(exc, loaded, Spec, ())) from None


def problems_from_validation(exc: ValidationError, loaded: LoadedSpec, model: Any,
                             prefix: DataPath) -> list[Problem]:
    """Turn pydantic errors into located problems with did-you-mean hints.

    ``model`` is the type validated at ``prefix`` within the spec data.
    """
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        data_path = prefix + _data_path(loaded.data, prefix, loc)
        problems.append(_problem(err, data_path, loaded, model, loc))
    return _dedupe(problems)


def _data_path(data: Any, prefix: DataPath, loc: tuple[Any, ...]) -> DataPath:
    """Drop the union tags and validator names that pydantic adds to ``loc``."""
    node = data
    for part in prefix:
        node = node[part] if _has(node, part) else None
    path: list[str | int] = []
    for part in loc:
        if _has(node, part):
            path.append(part)
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and _is_field_name(part) and (
                node.get("type") != part):
            # A field that is missing from the data: keep it, it is the field named.
            path.append(part)
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


def _problem(err: Any, path: DataPath, loaded: LoadedSpec, model: Any,
             loc: tuple[Any, ...]) -> Problem:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        return Problem(f"unknown field '{path[-1]}'", loaded.sources.locate(path, key=True),
                       path, valid_choices_hint(str(path[-1]), fields, "valid fields")
                       if fields else None)
    if kind == "missing":
        fields = _fields_at(model, loc[:-1])
        hint = None
        if fields:
            hint = f"this mapping takes: {', '.join(sorted(fields))}"
        return Problem(f"missing required field '{path[-1]}'",
                       loaded.sources.locate(path[:-1]), path, hint)
    if kind == "union_tag_invalid":
        tags = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
        tag = ctx.get("tag")
        return Problem(f"unknown type '{tag}'", loaded.sources.locate((*path, "type")),
                       (*path, "type"), valid_choices_hint(str(tag), tags, "valid types"))
    if kind == "union_tag_not_found":
        return Problem("missing 'type'", loaded.sources.locate(path), path,
                       f"add `type:`, one of: {_tags_at(model, loc)}")
    if len(loc) > 1 and not _is_field_name(str(loc[-1])) and isinstance(loc[-2], str):
        # A plain union member failed: the field's description says what is accepted.
        description = _description_at(model, _field_loc(loc))
        if description:
            return Problem(f"{err['msg']} (got {_short(value)})",
                           loaded.sources.locate(path), path, description)
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if kind not in ("value_error", "assertion_error"):
        message += f" (got {_short(value)})"
    return Problem(message, loaded.sources.locate(path), path)


def _short(value: Any) -> str:
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dedupe(problems: list[Problem]) -> list[Problem]:
    """A value that fits no member of a plain union yields one error per member; keep the
    first per (path, message) and collapse multiple messages on one path into one problem."""
    by_path: dict[DataPath, list[Problem]] = {}
    for p in problems:
        by_path.setdefault(p.path, []).append(p)
    out = []
    for path, group in by_path.items():
        if len(group) == 1:
            out.append(group[0])
            continue
        messages = list(dict.fromkeys(p.message for p in group))
        if len(messages) == 1:
            out.append(group[0])
        else:
            first = group[0]
            out.append(Problem(f"{first.message.rpartition('(got ')[2].rstrip(')')} is not "
                               "an accepted value", first.location, path,
                               first.hint or "accepted: " + "; or ".join(
                                   m.rpartition(" (got ")[0] or m for m in messages)))
    return out


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
        tp = _strip(tp)
        if _is_model(tp) and isinstance(part, str) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
            continue
        origin = getattr(tp, "__origin__", None)
        args = getattr(tp, "__args__", ())
        if origin in (list, tuple) and isinstance(part, int) and args:
            tp = args[0]
        elif origin is dict and args:
            tp = args[1]
        else:
            members = [m for m in _union_members(tp) if _is_model(m)]
            chosen = [m for m in members if "type" in m.model_fields
                      and part in _literal_values(m.model_fields["type"].annotation)]
            named = [m for m in members if m.__name__ == part]
            if chosen or named:
                tp = (chosen or named)[0]
            elif len(members) == 1:
                tp = members[0]
    if stop_at_union:
        return _strip(tp)
    members = [m for m in _union_members(_strip(tp)) if _is_model(m)]
    return members[0] if len(members) == 1 else _strip(tp)


def _strip(tp: Any) -> Any:
    while getattr(tp, "__metadata__", None) is not None:  # Annotated[...]
        tp = tp.__origin__
    return tp


def _union_members(tp: Any) -> list[Any]:
    args = getattr(tp, "__args__", None)
    if args is None or getattr(tp, "__origin__", None) in (list, dict, tuple):
        return [tp]
    if _is_model(tp):
        return [tp]
    return [_strip(a) for a in args]


def _literal_values(tp: Any) -> list[str]:
    return [str(v) for v in getattr(tp, "__args__", ())]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, SpecModel)
