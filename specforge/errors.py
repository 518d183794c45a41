"""User-facing errors: every problem names a file, line, column and field path.

specforge never shows a traceback for a bad spec. Each stage (YAML, schema, graph, shapes)
collects :class:`Problem` objects and raises one :class:`SpecError` holding all of them, so a
user sees every mistake in a spec at once. The CLI renders them and exits with code 2.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: A path into the spec's data: mapping keys and list indices, e.g. ("model", "layers", 3).
DataPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Location:
    """Where a YAML node starts. ``line`` and ``column`` are 1-based; 0 means unknown."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec, with where it is and what would be valid."""

    message: str
    location: Location | None = None
    path: DataPath = ()
    hint: str | None = None
    #: A second place worth showing, e.g. the use site of a block whose template failed.
    via: Location | None = None

    def render(self, *, with_source: bool = True) -> str:
        where = f"{self.location}: " if self.location else ""
        field_path = f"{format_path(self.path)}: " if self.path else ""
        lines = [f"{where}error: {field_path}{self.message}"]
        if with_source and self.location is not None:
            lines.extend(_source_excerpt(self.location))
        if self.via is not None:
            lines.append(f"  note: reached through {self.via}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


@dataclass
class SpecError(Exception):
    """One or more problems in a spec. ``str()`` gives the full report."""

    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.render(with_source=False))

    def render(self, *, with_source: bool = True) -> str:
        body = "\n".join(p.render(with_source=with_source) for p in self.problems)
        count = len(self.problems)
        return f"{body}\n{count} error{'s' if count != 1 else ''} found."

    def __str__(self) -> str:
        return self.render(with_source=False)


class UsageError(Exception):
    """A bad command-line request that is not about a spec's contents (exit code 2)."""


def format_path(path: DataPath) -> str:
    """Render ("model", "layers", 3, "filters") as ``model.layers[3].filters``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


#: Words other tools use for specforge's fields, so that a hint can translate them.
SYNONYMS = {
    "lr": "learning_rate", "eps": "epsilon", "kernel_size": "kernel", "stride": "strides",
    "pool_size": "pool", "out_channels": "filters", "out_features": "units",
    "momentum": "running_decay", "dilation_rate": "dilation", "use_bias": "bias",
    "padding_type": "padding", "p": "rate", "num_classes": "units", "input_shape": "input",
    "alpha": "negative_slope", "max_norm": "clip_norm", "clipnorm": "clip_norm",
    "clipvalue": "clip_value", "beta_1": "beta1", "beta_2": "beta2", "decay": "weight_decay",
}


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid choice to a misspelt word, or None when nothing is close."""
    choices = list(choices)
    if SYNONYMS.get(word) in choices:
        return SYNONYMS[word]
    matches = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def valid_choices_hint(word: str, choices: Sequence[str], what: str = "valid") -> str:
    """'did you mean X? valid: a, b, c' in one string."""
    suggestion = did_you_mean(word, choices)
    listed = ", ".join(sorted(choices))
    if suggestion:
        return f"did you mean '{suggestion}'? {what}: {listed}"
    return f"{what}: {listed}"


_source_cache: dict[str, list[str]] = {}
#: Longest part of a source line quoted under a problem.
EXCERPT_WIDTH = 120
#: Most bytes read from a file that was not remembered, to quote from it.
EXCERPT_READ_BYTES = 2_000_000
#: Lines as YAML counts them (str.splitlines would also break at form feeds and the like).
_YAML_LINES = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
#: Characters not to send to a terminal when quoting a line (an escape could drive it).
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffe\uffff]")


def remember_source(file: str, text: str) -> None:
    """Keep a file's text so that problems can quote the offending line."""
    _source_cache[file] = _YAML_LINES.split(text)


def source_line(file: str, line: int) -> str | None:
    """Line ``line`` (1-based) of a spec file, or None when it cannot be read."""
    lines = _source_cache.get(file)
    if lines is None:
        try:  # bounded: the file may be a device that never ends
            with Path(file).open("rb") as stream:
                raw = stream.read(EXCERPT_READ_BYTES)
            lines = _YAML_LINES.split(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            lines = []
        _source_cache[file] = lines
    return lines[line - 1] if 1 <= line <= len(lines) else None


def _source_excerpt(location: Location) -> list[str]:
    text = source_line(location.file, location.line)
    if text is None:
        return []
    # one character for one, so that the caret stays under its column
    text = _UNPRINTABLE.sub("?", text)
    column = max(location.column - 1, 0)
    if len(text) > EXCERPT_WIDTH:  # a window around the column, marked as cut
        start = max(0, min(column - EXCERPT_WIDTH // 2, len(text) - EXCERPT_WIDTH))
        head = "..." if start else ""
        tail = "..." if start + EXCERPT_WIDTH < len(text) else ""
        text = head + text[start:start + EXCERPT_WIDTH] + tail
        column += len(head) - start
    gutter = f"{location.line:>5} | "
    caret = " " * (len(gutter) - 2) + "| " + " " * column + "^"
    return [gutter + text, caret]
