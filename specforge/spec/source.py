"""Reading YAML with a location for every node, `extends:` and `--set` overrides.

PyYAML's composer gives nodes with start marks; we convert them to plain Python data ourselves
so that we can (a) remember where every key and value came from, (b) refuse duplicate keys,
which PyYAML silently overwrites, and (c) stop alias bombs: every node visited, aliases
included, counts towards a budget, so a billion-laughs document fails fast instead of eating
memory.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from specforge.errors import DataPath, Location, Problem, SpecError, remember_source

#: Largest spec file read, in bytes. Specs are small; anything bigger is a mistake.
MAX_FILE_BYTES = 1_000_000
#: Largest number of YAML nodes after expanding aliases.
MAX_NODES = 100_000
#: Deepest nesting of mappings and lists.
MAX_DEPTH = 64
#: Deepest `extends:` chain.
MAX_EXTENDS_DEPTH = 16
#: The YAML tag that makes a mapping replace the base spec's instead of merging into it.
REPLACE_TAG = "!replace"
#: What `extends:` does, for the reference (docs/spec-reference.md).
EXTENDS_HELP = f"""\
`extends: base.yaml` (a path relative to the spec) starts from the base spec and merges this
one into it: a mapping merges key by key, anything else (a list, a number, a string)
replaces the base's value. A mapping whose `type` differs from the base's replaces it whole,
since the fields belong to the other type:

```yaml
extends: cifar.yaml                          # source: {{type: image_folder, train: ...}}
data:
  source: {{type: cifar10, path: data/cifar}}  # no `train:` inherited
  augment: {REPLACE_TAG} {{horizontal_flip: true}}  # only this; the base's rotation is gone
```

`{REPLACE_TAG}` before a mapping makes it replace the base's in any case. `--set` overrides
apply after `extends:`, and `specforge resolve` prints the result."""

class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and every spec writer) does:
    `1e-3` is a float, not the text YAML 1.1 makes of an exponent without a dot."""


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


#: Longest whole number written, in characters (Python refuses to read 4,300 digits).
MAX_NUMBER_CHARS = 100

_CORE = "tag:yaml.org,2002:"
#: The tags a scalar may carry: plain data only. Anything else (`!!python/name:...`,
#: `!!binary`, `!custom`) is refused by name instead of being constructed.
_SCALAR_TAGS = {_CORE + kind for kind in ("str", "int", "float", "bool", "null")}
#: YAML 1.1 reads `2024-02-30` as a date (and fails on it); YAML 1.2 and every spec field
#: read it as the text it is.
_TIMESTAMP = _CORE + "timestamp"


@dataclass
class SourceMap:
    """Where each value (and each mapping key) of a loaded document came from."""

    values: dict[DataPath, Location] = field(default_factory=dict)
    keys: dict[DataPath, Location] = field(default_factory=dict)
    #: Mappings tagged `!replace`: under `extends:` they replace the base's, not merge.
    replace: set[DataPath] = field(default_factory=set)

    def locate(self, path: DataPath, *, key: bool = False) -> Location | None:
        """The location of ``path``, or of its nearest ancestor that has one."""
        if key and path in self.keys:
            return self.keys[path]
        probe = tuple(path)
        while True:
            if probe in self.values:
                return self.values[probe]
            if not probe:
                return None
            probe = probe[:-1]

    def drop_under(self, prefix: DataPath) -> None:
        """Forget every location at or below ``prefix`` (the value there was replaced)."""
        n = len(prefix)
        for table in (self.values, self.keys):
            for path in [p for p in table if p[:n] == prefix]:
                del table[path]

    def copy_subtree(self, other: SourceMap, src: DataPath, dst: DataPath) -> None:
        """Copy ``other``'s locations under ``src`` to this map under ``dst``."""
        n = len(src)
        for mine, theirs in ((self.values, other.values), (self.keys, other.keys)):
            for path, loc in theirs.items():
                if path[:n] == src:
                    mine[dst + path[n:]] = loc


@dataclass
class LoadedSpec:
    """Raw spec data (after `extends:` and `--set`) with its source map."""

    data: dict[str, Any]
    sources: SourceMap
    file: str


def _location(file: str, node: yaml.Node) -> Location:
    mark = node.start_mark
    return Location(file, mark.line + 1, mark.column + 1)


class _Converter:
    """Turns a composed YAML node tree into Python data plus a SourceMap."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.sources = SourceMap()
        self.problems: list[Problem] = []
        self.budget = MAX_NODES
        self._scalars = yaml.constructor.SafeConstructor()
        self._active: set[int] = set()

    def convert(self, node: yaml.Node, path: DataPath) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise SpecError([Problem(
                f"the document expands to more than {MAX_NODES:,} YAML nodes",
                _location(self.file, node), path,
                "this looks like an alias bomb: write the values out, or use blocks/repeat",
            )])
        self.sources.values[path] = _location(self.file, node)
        replaced = node.tag == REPLACE_TAG and isinstance(node, yaml.MappingNode)
        if replaced:
            self.sources.replace.add(path)
        if len(path) > MAX_DEPTH:
            raise SpecError([Problem(f"the document nests deeper than {MAX_DEPTH} levels",
                                     _location(self.file, node), path[:3])])
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        expected = _CORE + ("seq" if isinstance(node, yaml.SequenceNode) else "map")
        if node.tag != expected and not replaced:
            self.problems.append(_tag_problem(node, self.file, path))
            return None
        if id(node) in self._active:
            raise SpecError([Problem("recursive YAML alias", _location(self.file, node), path)])
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self._active.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, path: DataPath) -> Any:
        """A plain value; a problem (and None) for a foreign tag or a value its tag refuses."""
        if node.tag == _TIMESTAMP:
            return node.value
        if node.tag not in _SCALAR_TAGS:
            self.problems.append(_tag_problem(node, self.file, path))
            return None
        kind = node.tag[len(_CORE):]
        if kind == "int" and len(node.value) > MAX_NUMBER_CHARS:
            self.problems.append(Problem(
                f"a number of {len(node.value):,} characters; numbers in a spec have at most "
                f"{MAX_NUMBER_CHARS}", _location(self.file, node), path))
            return None
        try:
            return self._scalars.construct_object(node)
        except (ValueError, yaml.YAMLError):
            self.problems.append(Problem(
                f"{_short_text(node.value)} is not a valid {kind} (tag !!{kind})",
                _location(self.file, node), path, f"write a plain {kind}, or drop the tag"))
            return None

    def _mapping(self, node: yaml.MappingNode, path: DataPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            loc = _location(self.file, key_node)
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.problems.append(Problem(
                    "YAML merge keys (<<) are not supported", loc, path,
                    "use `extends:` for whole specs, or `blocks:` for repeated layers",
                ))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(Problem("mapping keys must be plain strings", loc, path))
                continue
            problems_before = len(self.problems)
            key = str(self._scalar(key_node, path))
            if len(self.problems) > problems_before:
                continue
            if key in out:
                first = self.sources.keys[(*path, key)]
                self.problems.append(Problem(
                    f"duplicate key '{key}' (first defined at line {first.line})", loc, path,
                    "each key may appear once in a mapping",
                ))
                continue
            self.sources.keys[(*path, key)] = loc
            out[key] = self.convert(value_node, (*path, key))
        return out


def _tag_problem(node: yaml.Node, file: str, path: DataPath) -> Problem:
    tag = node.tag.replace(_CORE, "!!", 1) if node.tag.startswith(_CORE) else node.tag
    return Problem(f"unsupported YAML tag {_short_text(tag)}", _location(file, node), path,
                   "a spec holds plain values (text, numbers, true/false, null, lists and "
                   f"mappings): remove the tag (the one tag a spec may use is {REPLACE_TAG}, "
                   "before a mapping: see `extends:`)")


def _short_text(text: str) -> str:
    """``text`` quoted for a message, cut to a readable length."""
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:56] + "...'"


#: YAML's line breaks (Python's str.splitlines also breaks at \x0b, \x0c and \x1c-\x1e).
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
#: What the YAML reader refuses, for naming in messages.
_CHARACTER_NAMES = {0x00: "NUL", 0x0B: "vertical tab", 0x0C: "form feed", 0x1B: "escape",
                    0x7F: "delete", 0xFFFE: "noncharacter", 0xFFFF: "noncharacter"}


def _position_location(text: str, position: int, file: str) -> Location:
    """The line and column of character ``position`` of ``text``, counted as YAML does."""
    line, start = 1, 0
    for match in _LINE_BREAK.finditer(text, 0, position):
        line, start = line + 1, match.end()
    return Location(file, line, position - start + 1)


def _reader_problem(exc: yaml.reader.ReaderError, text: str, file: str) -> Problem:
    code = exc.character if isinstance(exc.character, int) else ord(exc.character)
    name = _CHARACTER_NAMES.get(code) or unicodedata.name(chr(code), "control character")
    return Problem(
        f"the file holds the character U+{code:04X} ({name}), which YAML does not allow",
        _position_location(text, exc.position, file), (),
        "delete it (editors often show it as nothing or a box); inside a double-quoted "
        f"string it can be written as \\u{code:04x}")


def parse_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document, returning its data and where each node came from."""
    remember_source(file, text)
    try:
        nodes = list(yaml.compose_all(text, Loader=SpecLoader))
    except yaml.MarkedYAMLError as exc:
        raise SpecError([_yaml_problem(exc, file)]) from None
    except yaml.reader.ReaderError as exc:
        raise SpecError([_reader_problem(exc, text, file)]) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem(f"invalid YAML: {exc}", Location(file))]) from None
    except RecursionError:
        raise SpecError([Problem(f"the document nests deeper than {MAX_DEPTH} levels",
                                 _too_deep(text, file))]) from None
    if not nodes:
        raise SpecError([Problem("the spec is empty", Location(file, 1, 1), (),
                                 "a spec is a mapping with at least model, loss and optimizer; "
                                 "see specs/cifar.yaml")])
    if len(nodes) > 1:
        raise SpecError([Problem(
            f"expected exactly one YAML document, found {len(nodes)}",
            _location(file, nodes[1]), (), "a spec is one mapping; remove extra `---` separators",
        )])
    converter = _Converter(file)
    data = converter.convert(nodes[0], ())
    if converter.problems:
        raise SpecError(converter.problems)
    return data, converter.sources


def _yaml_problem(exc: yaml.MarkedYAMLError, file: str) -> Problem:
    """Point at where the broken construct starts (an unclosed `[` say), and name where the
    parser gave up in the message."""
    context, problem = exc.context_mark, exc.problem_mark
    # A flow collection or a scalar is short: its start is the useful place. A block
    # mapping's start can be the top of the file: there the place it broke is better.
    opener = exc.context and ("flow" in exc.context or "scanning" in exc.context)
    mark = (context if opener else problem) or context or problem
    loc = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
    what = " ".join(filter(None, [exc.context, exc.problem]))
    other = problem if mark is context else context
    if other and mark and (other.line, other.column) != (mark.line, mark.column):
        what += f" (see also line {other.line + 1}, column {other.column + 1})"
    return Problem(f"invalid YAML: {what}", loc, (), "check indentation, colons, quotes "
                                                    "and closing brackets")


def _too_deep(text: str, file: str) -> Location:
    """Where nesting first exceeds MAX_DEPTH, found from the token stream (no recursion)."""
    depth = 0
    opening = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken,
               yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
    closing = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    try:
        for token in yaml.scan(text, Loader=SpecLoader):
            depth += isinstance(token, opening) - isinstance(token, closing)
            if depth > MAX_DEPTH:
                mark = token.start_mark
                return Location(file, mark.line + 1, mark.column + 1)
    except yaml.YAMLError:
        pass
    return Location(file)


def _read_text(path: Path, display: str, referenced_at: Location | None) -> str:
    """The file's text. At most MAX_FILE_BYTES + 1 bytes are read, whatever size the file
    claims: /dev/zero and other devices claim 0."""
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SpecError([Problem(f"spec file not found: {display}", referenced_at)]) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise SpecError([Problem(f"cannot read spec file {display}: {reason}",
                                 referenced_at)]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError([Problem(
            f"spec file is over {MAX_FILE_BYTES:,} bytes, the limit", Location(display),
            hint="a spec describes a model; data belongs in data files", via=referenced_at)])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise SpecError([Problem(f"the file is not UTF-8 text (byte 0x{raw[exc.start]:02x})",
                                 Location(display, line, column), (),
                                 "save the spec as UTF-8")]) from None


def load_file(path: str | Path, *, _chain: Sequence[Path] = (),
              _referenced_at: Location | None = None) -> LoadedSpec:
    """Load a spec file and, recursively, the base spec it `extends:`."""
    path = Path(path)
    display = str(path)
    text = _read_text(path, display, _referenced_at)
    data, sources = parse_yaml(text, display)
    if not isinstance(data, dict):
        raise SpecError([Problem("a spec must be a YAML mapping (key: value pairs)",
                                 sources.locate(()), ())])
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return LoadedSpec(data, sources, display)
    at = sources.locate(("extends",))
    if not isinstance(base_ref, str):
        raise SpecError([Problem("`extends` must be a path to a base spec", at, ("extends",),
                                 "e.g. extends: cifar.yaml (relative to this file)")])
    if "\0" in base_ref:
        raise SpecError([Problem("`extends` holds a NUL character", at, ("extends",),
                                 "write the base spec's path as plain text")])
    try:
        base_path = (path.parent / base_ref).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a bad name
        raise SpecError([Problem(f"cannot follow `extends`: {exc}", at, ("extends",))]) \
            from None
    chain = (*_chain, path.resolve())
    if base_path in chain:
        raise SpecError([Problem(f"`extends` cycle: {' -> '.join(p.name for p in chain)} -> "
                                 f"{base_path.name}", at, ("extends",))])
    if len(chain) > MAX_EXTENDS_DEPTH:
        raise SpecError([Problem(f"`extends` chain deeper than {MAX_EXTENDS_DEPTH}", at)])
    base = load_file(base_path, _chain=chain, _referenced_at=at)
    merged = _deep_merge(base.data, base.sources, data, sources, ())
    return LoadedSpec(merged, base.sources, display)


def _deep_merge(base: dict[str, Any], base_src: SourceMap, child: dict[str, Any],
                child_src: SourceMap, path: DataPath) -> dict[str, Any]:
    """Merge ``child`` into ``base``: mappings recursively, unless the child's mapping names
    another `type` than the base's or is tagged `!replace`; anything else is replaced.

    ``base_src`` is updated in place to describe the merged result.
    """
    out = dict(base)
    for key, value in child.items():
        sub = (*path, key)
        if (isinstance(value, dict) and isinstance(out.get(key), dict)
                and not _replaces(value, out[key], sub in child_src.replace)):
            out[key] = _deep_merge(out[key], base_src, value, child_src, sub)
        else:
            base_src.drop_under(sub)
            base_src.copy_subtree(child_src, sub, sub)
            out[key] = value
        if sub in child_src.keys:
            base_src.keys[sub] = child_src.keys[sub]
    return out


def _replaces(child: dict[str, Any], base: dict[str, Any], tagged: bool) -> bool:
    """Whether a child spec's mapping replaces the base's whole: a changed `type` means
    other fields (a cifar10 source has no `train:` folder), and `!replace` says so."""
    changed_type = "type" in child and "type" in base and child["type"] != base["type"]
    return tagged or changed_type


def apply_overrides(spec: LoadedSpec, overrides: Sequence[str]) -> None:
    """Apply ``--set a.b.0.c=value`` overrides in place; values are parsed as YAML."""
    problems: list[Problem] = []
    for raw in overrides:
        try:
            _apply_one(spec, raw)
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)


def _apply_one(spec: LoadedSpec, raw: str) -> None:
    where = Location(f"--set {raw}")
    dotted, sep, text = raw.partition("=")
    if not sep or not dotted.strip():
        raise SpecError([Problem("an override must look like path.to.field=value", where,
                                 hint="e.g. --set optimizer.learning_rate=0.01")])
    value = _override_value(text, where) if text.strip() else None
    parts: list[str | int] = [int(p) if p.lstrip("-").isdigit() else p
                              for p in dotted.strip().split(".")]
    node: Any = spec.data
    for i, part in enumerate(parts[:-1]):
        node = _step(node, part, parts[: i + 1], where, create=True)
    last = parts[-1]
    if isinstance(node, list):
        _step(node, last, parts, where, create=False)
    elif not isinstance(node, dict):
        raise SpecError([Problem(f"cannot set a field inside a {type(node).__name__}", where)])
    node[last] = value
    path = tuple(parts)
    for i in range(1, len(path)):  # mappings the override created come from it too
        spec.sources.values.setdefault(path[:i], where)
    spec.sources.drop_under(path)
    spec.sources.values[path] = where
    spec.sources.keys[path] = where


def _override_value(text: str, where: Location) -> Any:
    """An override's value, read by the same rules as a spec file's values."""
    try:
        node = yaml.compose(text, Loader=SpecLoader)
    except yaml.YAMLError as exc:
        raise SpecError([Problem(f"cannot parse the value: {' '.join(str(exc).split())}",
                                 where)]) from None
    converter = _Converter(where.file)
    value = converter.convert(node, ()) if node is not None else None
    if converter.problems:
        raise SpecError([Problem(p.message, where, (), p.hint) for p in converter.problems])
    return value


def _step(node: Any, part: str | int, so_far: list[str | int], where: Location,
          *, create: bool) -> Any:
    if isinstance(node, list):
        if not isinstance(part, int) or not -len(node) <= part < len(node):
            raise SpecError([Problem(
                f"'{'.'.join(map(str, so_far))}' is not an index of a list of {len(node)} items",
                where)])
        return node[part]
    if isinstance(node, dict):
        if part not in node:
            if not create:
                return None
            node[part] = {}
        return node[part]
    raise SpecError([Problem(f"'{'.'.join(map(str, so_far[:-1]))}' is a "
                             f"{type(node).__name__}, not a mapping or list", where)])
