"""The pipeline in one place: YAML -> spec -> IR graph -> program."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from specforge.ir.lower import DEFAULT_MAX_PARAMS, lower_model
from specforge.ir.memory import DEFAULT_MAX_MEMORY, check_memory
from specforge.ir.program import Program, lower_training
from specforge.spec.schema import Spec, validate_spec
from specforge.spec.source import LoadedSpec, apply_overrides, load_file, parse_yaml


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> tuple[LoadedSpec, Spec]:
    """Read, merge (`extends:`), override (`--set`) and validate a spec file."""
    loaded = load_file(path)
    apply_overrides(loaded, overrides)
    return loaded, validate_spec(loaded)


def compile_spec(path: str | Path, overrides: Sequence[str] = (), *,
                 max_params: int = DEFAULT_MAX_PARAMS,
                 max_memory: int = DEFAULT_MAX_MEMORY) -> Program:
    """Compile a spec file to a :class:`Program`; raises ``SpecError`` listing every problem,
    or when training would need more than ``max_memory`` bytes (specforge.ir.memory)."""
    loaded, spec = load_spec(path, overrides)
    graph = lower_model(spec, loaded, max_params=max_params)
    program = lower_training(spec, graph, loaded)
    check_memory(program, loaded, max_memory)
    return program


def compile_text(text: str, name: str, overrides: Sequence[str] = ()) -> Program:
    """Compile a spec given as YAML text; ``name`` stands for the file in error messages.
    (`extends:` needs a file: it is not available here.)"""
    data, sources = parse_yaml(text, name)
    loaded = LoadedSpec(data, sources, name)
    apply_overrides(loaded, overrides)
    spec = validate_spec(loaded)
    return lower_training(spec, lower_model(spec, loaded), loaded)
