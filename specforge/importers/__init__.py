"""`specforge import`: a spec and neutral weights from a Keras or ONNX model file.

Each importer translates the source model into an :class:`ImportedModel` (the layers as a
person writes them, in order, plus the weights in specforge's neutral layouts) or collects
one :class:`Unsupported` line per layer or op that the spec language cannot express.
Nothing is written unless the whole model translates and the written spec compiles with
weights of exactly its shapes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from specforge.errors import UsageError

#: The suffixes `specforge import` reads, and the importer module of each.
FORMATS = {".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".onnx": "onnx"}


@dataclass(frozen=True)
class Unsupported:
    """One layer or op of the source model that specforge cannot express."""

    name: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name!r} ({self.kind}): {self.reason}"


class ImportRefused(UsageError):
    """The source model cannot be imported (exit code 2); ``lines`` says why, one per item."""

    def __init__(self, source: Path, lines: Iterable[object], what: str = "cannot import") -> None:
        self.lines = [str(line) for line in lines]
        body = "\n".join(f"  {line}" for line in self.lines)
        super().__init__(f"{what} {source}:\n{body}")


@dataclass
class ImportedModel:
    """A translated model: spec layers in writing order and their neutral weights."""

    source: Path
    #: e.g. "Keras Functional model" or "ONNX model (opset 17, producer pytorch)"
    description: str
    input_shape: tuple[int, int, int]
    layers: list[dict[str, Any]] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    #: the output layer when it is not the last one written
    output: str | None = None


class NameTable:
    """Spec names for source names: valid (``^[A-Za-z_][A-Za-z0-9_]{0,63}$``), unique, never
    `input` (the model's input)."""

    def __init__(self) -> None:
        self._taken: set[str] = {"input"}

    def claim(self, source_name: str, fallback: str = "layer") -> str:
        base = re.sub(r"[^A-Za-z0-9_]+", "_", source_name).strip("_") or fallback
        if base[0].isdigit():
            base = f"{fallback}_{base}"
        base = base[:60]
        name, k = base, 1
        while name in self._taken:
            k += 1
            name = f"{base[:56]}_{k}"
        self._taken.add(name)
        return name


def layer(type_: str, name: str, inputs: list[str] | None = None, **fields: Any
          ) -> dict[str, Any]:
    """A spec layer mapping in the order people write it: type, name, inputs, then fields.
    ``inputs=None`` means the previous layer (the writer leaves it out where it can)."""
    out: dict[str, Any] = {"type": type_, "name": name}
    if inputs is not None:
        out["inputs"] = inputs
    out.update(fields)
    return out


def four_sides(pads: tuple[int, int, int, int]) -> Any:
    """(top, bottom, left, right) pads or crops as a spec writes them: an int where all four
    are alike, [height, width] where both sides of each axis are, else the four by name."""
    top, bottom, left, right = pads
    if top == bottom and left == right:
        return top if top == left else [top, left]
    return {"top": top, "bottom": bottom, "left": left, "right": right}


def needs_package(source: Path, package: str) -> UsageError:
    """The error for a reader whose framework is not installed."""
    return UsageError(f"{source}: reading {source.suffix} models needs the {package} package: "
                      f"pip install 'specforge[{package}]'")


def import_model(source: Path) -> ImportedModel:
    """Translate ``source`` (.keras, .h5, .onnx); raises ImportRefused or UsageError."""
    kind = FORMATS.get(source.suffix.lower())
    if kind is None:
        raise UsageError(f"{source}: unknown model format {source.suffix!r}; "
                         f"specforge imports {', '.join(sorted(FORMATS))}")
    if not source.is_file():
        raise UsageError(f"{source}: no such file")
    from specforge.importers.keras import import_keras
    from specforge.importers.onnx import import_onnx

    try:
        return import_keras(source) if kind == "keras" else import_onnx(source)
    except UsageError:
        raise
    except Exception as exc:  # a model shape the importer did not foresee: say so, no traceback
        raise UsageError(f"{source}: specforge could not translate this model "
                         f"({type(exc).__name__}: {exc}); please report it") from exc
