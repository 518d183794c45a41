"""`defaults:` by layer type, at the spec's top level and in each block.

```yaml
defaults:                         # every layer of the spec, blocks' layers included
  batch_norm: {epsilon: 1.001e-5, running_decay: 0.99}
blocks:
  bottleneck:
    defaults: {conv2d: {bias: false}}   # this block's layers only; wins over the top level
```

A field a layer writes itself always wins. The defaults are filled into the spec's layers
before validation, so `specforge resolve` shows every layer with them, and an error in a
default is reported once, at the default.
"""

from __future__ import annotations

import copy
import typing
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from specforge.errors import DataPath, Problem, valid_choices_hint
from specforge.spec.layers import BlockUse, Layer
from specforge.spec.source import LoadedSpec, SourceMap

#: Fields that say where a layer is and what it reads: never defaulted.
PLACE_FIELDS = ("type", "name", "inputs", "repeat")

#: Each layer type's spellings -> its model class (blocks take no defaults).
LAYER_TYPES: dict[str, Any] = {
    spelling: member for member in typing.get_args(typing.get_args(Layer)[0])
    if member is not BlockUse
    for spelling in typing.get_args(member.model_fields["type"].annotation)
}

#: (type, field) -> (value, where the value was written)
Table = dict[tuple[str, str], tuple[Any, DataPath]]


def apply_defaults(loaded: LoadedSpec) -> list[Problem]:
    """Fill `defaults:` into the model's and the blocks' layers, in place (sources too);
    returns the problems found in the `defaults:` sections themselves."""
    data = loaded.data
    problems: list[Problem] = []
    top = _table(data.get("defaults"), ("defaults",), loaded, problems)
    model = data.get("model")
    if isinstance(model, dict):
        _fill(model.get("layers"), ("model", "layers"), [top], loaded)
    blocks = data.get("blocks")
    for name, block in (blocks.items() if isinstance(blocks, dict) else ()):
        if isinstance(block, dict):
            own = _table(block.get("defaults"), ("blocks", name, "defaults"), loaded, problems)
            _fill(block.get("layers"), ("blocks", name, "layers"), [own, top], loaded)
    return problems


def _canonical(spelling: str) -> str:
    return typing.get_args(LAYER_TYPES[spelling].model_fields["type"].annotation)[0]


def _table(section: Any, path: DataPath, loaded: LoadedSpec, problems: list[Problem]) -> Table:
    """The valid entries of one `defaults:` mapping; the rest become problems. (A section
    that is not a mapping of mappings is left to schema validation.)"""
    table: Table = {}
    for spelling, fields in (section.items() if isinstance(section, dict) else ()):
        at = (*path, spelling)
        if spelling not in LAYER_TYPES:
            problems.append(Problem(
                f"unknown layer type '{spelling}'", loaded.sources.locate(at, key=True), at,
                valid_choices_hint(str(spelling), sorted(LAYER_TYPES), "layer types")))
            continue
        model = LAYER_TYPES[spelling]
        settable = [f for f in model.model_fields if f not in PLACE_FIELDS]
        for field, value in (fields.items() if isinstance(fields, dict) else ()):
            problem = _check(model, field, value, settable, (*at, field), loaded)
            if problem is None and (_canonical(spelling), field) in table:
                problem = Problem(f"a second default for {_canonical(spelling)}'s '{field}'",
                                  loaded.sources.locate((*at, field), key=True), (*at, field),
                                  "give each field one default per layer type")
            if problem:
                problems.append(problem)
            else:
                table[_canonical(spelling), field] = (value, (*at, field))
    return table


def _check(model: Any, field: str, value: Any, settable: list[str], at: DataPath,
           loaded: LoadedSpec) -> Problem | None:
    """A problem with one default, or None. Values holding `${...}` are checked where a
    block's use fills them in."""
    if field not in settable:
        hint = (f"`{field}` says where a layer is; it cannot have a default"
                if field in PLACE_FIELDS else
                valid_choices_hint(field, settable, "fields that take defaults"))
        return Problem(f"unknown field '{field}'", loaded.sources.locate(at, key=True), at,
                       hint)
    if isinstance(value, str) and "${" in value:
        return None
    info = model.model_fields[field]
    try:
        TypeAdapter(Annotated[info.annotation, info]).validate_python(value)
    except ValidationError as exc:
        from specforge.spec.schema import _yaml_words  # schema imports this module

        first = exc.errors(include_url=False)[0]
        return Problem(f"{_yaml_words(first['msg'])} (got {value!r})",
                       loaded.sources.locate(at), at, info.description)
    return None


def _fill(layers: Any, path: DataPath, tables: list[Table], loaded: LoadedSpec) -> None:
    """Give each layer, for each field it does not write, the first table's default."""
    merged: Table = {}
    for table in tables:
        for key, entry in table.items():
            merged.setdefault(key, entry)
    for i, layer in enumerate(layers if isinstance(layers, list) else ()):
        kind = layer.get("type") if isinstance(layer, dict) else None
        if not isinstance(kind, str) or kind not in LAYER_TYPES:
            continue
        kind = _canonical(kind)
        for (of_type, field), (value, source) in merged.items():
            if of_type == kind and field not in layer:
                layer[field] = copy.deepcopy(value)
                _copy_locations(loaded.sources, source, (*path, i, field))


def _copy_locations(sources: SourceMap, source: DataPath, target: DataPath) -> None:
    """``target`` now holds the value written at ``source``: errors in it point there."""
    n = len(source)
    values = [(p, loc) for p, loc in sources.values.items() if p[:n] == source]
    keys = [(p, loc) for p, loc in sources.keys.items() if p[:n] == source]
    sources.drop_under(target)
    sources.values.update((target + p[n:], loc) for p, loc in values)
    sources.keys.update((target + p[n:], loc) for p, loc in keys)
