"""Reference documentation generated from the models and the IR ops (never by hand).

`specforge docs` rewrites docs/spec-reference.md, docs/ir-ops.md and docs/spec.schema.json
(which the specs name for editor completion); a test fails when the committed files differ
from what the code generates.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from specforge.ir import expand, randomness
from specforge.ir.ops import ACTIVATION_FORMULAS, OPS
from specforge.spec import data as D
from specforge.spec import defaults, expressions, source
from specforge.spec import layers as L
from specforge.spec import sweep as S
from specforge.spec import training as T
from specforge.spec.schema import Spec

SCHEMA_ID = "https://specforge.dev/schema/spec.json"

SECTIONS: list[tuple[str, list[type[BaseModel]]]] = [
    ("Top level", [Spec]),
    ("Model", [L.ModelSpec, L.BlockDef]),
    ("Layers", [L.Conv2D, L.DepthwiseConv2D, L.Pad2D, L.Cropping2D, L.ChannelSlice,
                L.ChannelShuffle, L.MaxPool2D, L.AvgPool2D,
                L.GlobalAvgPool2D, L.GlobalMaxPool2D, L.Flatten, L.Dense, L.BatchNorm,
                L.LayerNorm, L.GroupNorm, L.Dropout, L.ActivationLayer, L.PReLU, L.Rescaling, L.Add,
                L.Multiply, L.Concat, L.BlockUse]),
    ("Layer options", [L.ActivationConfig, L.PerSidePadding, L.PerSideCropping]),
    ("Loss", [T.CrossEntropy, T.BinaryCrossEntropy, T.Regression]),
    ("Optimizer", [T.SGD, T.RMSprop, T.Adam]),
    ("Learning-rate schedule", [T.ConstantSchedule, T.StepSchedule, T.MultiStepSchedule,
                                T.ExponentialSchedule, T.CosineSchedule]),
    ("Metrics and training", [T.Metric, T.Training]),
    ("Data", [D.Data, D.Cifar10Source, D.ImageFolderSource, D.NpzSource, D.DigitsSource,
              D.SyntheticSource, D.Split, D.Normalize, D.Augment]),
    ("Sweep", [S.Sweep]),
]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec file."""
    schema = Spec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            **schema}


def type_name(tp: Any) -> str:
    """A short, readable rendering of a field's type annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" if not isinstance(a, bool) else f"`{str(a).lower()}`"
                            for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args if a is not type(None))
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict:
        return f"map[{type_name(args[0])}, {type_name(args[1])}]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    if tp is typing.Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(all defaults)"
        return f"`{value}`" if value not in ({}, []) else "empty"
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "-"
    value = field.default
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def model_section(model: type[BaseModel]) -> str:
    doc = " ".join((model.__doc__ or "").split())
    lines = [f"### {model.__name__}", "", doc, "", "| field | type | default | meaning |",
             "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {type_name(field.annotation)} | {_default(field)} | "
                     f"{description} |")
    return "\n".join(lines) + "\n"


def reuse_section() -> str:
    """Blocks, expressions, `when:`, defaults and `extends:`, from their modules' docstrings."""
    parts = ["## Blocks, expressions and defaults\n"]
    for title, text in (("Blocks", expand.__doc__), ("Expressions", expressions.__doc__),
                        ("Defaults by layer type", defaults.__doc__),
                        ("`extends:`", source.EXTENDS_HELP)):
        parts.append(f"### {title}\n\n{inspect.cleandoc(text or '')}\n")
    return "\n".join(parts)


def spec_reference() -> str:
    parts = ["# Spec reference", "",
             "Generated from `specforge/spec/*.py` by `specforge docs`; do not edit by hand.",
             "Every default below is specforge's own and means the same in every backend.", ""]
    for title, models in SECTIONS:
        parts.append(f"## {title}\n")
        parts.extend(model_section(m) for m in models)
    parts.append(reuse_section())
    return "\n".join(parts)


def dropout_generator_section() -> str:
    """The dropout masks' generator, from specforge/ir/randomness.py's docstring."""
    return f"### The dropout generator\n\n{inspect.cleandoc(randomness.__doc__ or '')}\n"


def ops_reference() -> str:
    parts = ["# IR ops", "",
             "Generated from `specforge/ir/ops.py` by `specforge docs`; do not edit by hand.",
             "Each op's formula is the definition every backend and the numpy reference follow.",
             "Tensors are per sample and channels-last: (height, width, channels).", ""]
    for name, definition in OPS.items():
        body = "\n".join(line.strip() for line in definition.doc.splitlines())
        parts.append(f"## `{name}`\n\n{body}\n")
        if name == "dropout":
            parts.append(dropout_generator_section())
    parts.append("## Activation formulas\n\n| fn | formula |\n|---|---|")
    parts.extend(f"| `{fn}` | {formula} |" for fn, formula in ACTIVATION_FORMULAS.items())
    return "\n".join(parts) + "\n"


def write_reference(folder: Path, *, check: bool = False) -> list[Path]:
    """Write (or with ``check``, only compare) the generated docs; returns the stale files."""
    stale = []
    schema_text = json.dumps(json_schema(), indent=2) + "\n"
    for path, text in ((folder / "spec-reference.md", spec_reference()),
                       (folder / "ir-ops.md", ops_reference()),
                       (folder / "spec.schema.json", schema_text)):
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            stale.append(path)
            if not check:
                folder.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    return stale
