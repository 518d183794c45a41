"""The backend interface and the plugin registry.

A backend is found through the entry-point group ``specforge.backends``: the entry point
names a :class:`Backend` subclass (or a factory returning an instance). Plugins are imported
only when asked for, and a backend's module must not import its framework at import time,
so that `specforge build` stays free of torch and tensorflow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from specforge.errors import UsageError, valid_choices_hint

if TYPE_CHECKING:
    import numpy as np

    from specforge.ir.program import Program

ENTRY_POINT_GROUP = "specforge.backends"


@dataclass(frozen=True)
class RunOptions:
    """How `specforge run` was asked to train."""

    run_dir: Path
    device: str = "auto"
    quiet: bool = False
    resume: Path | None = None
    #: Backend-specific settings from the command line (`--opt key=value`).
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    #: Final test metrics, e.g. {"loss": 0.41, "accuracy": 0.87}.
    metrics: Mapping[str, float]


class Backend(ABC):
    """What every backend plugin provides. Weights cross backends in specforge's neutral
    format: a mapping ``"{node}.{param}" -> numpy array`` in the layouts of
    :mod:`specforge.ir.ops` (see :mod:`specforge.weights`)."""

    #: The name users pass to `--backend`.
    name: ClassVar[str]
    #: One line for `specforge backends`.
    description: ClassVar[str] = ""

    @abstractmethod
    def build(self, program: Program) -> str:
        """The text of a standalone training script for ``program``."""

    @abstractmethod
    def run(self, program: Program, options: RunOptions) -> RunResult:
        """Train and evaluate ``program``, writing a run folder."""

    @abstractmethod
    def create_model(self, program: Program, weights: Mapping[str, np.ndarray] | None = None
                     ) -> Any:
        """The framework's model object, with ``weights`` (default: specforge's initial
        weights for the program's seed) loaded."""

    @abstractmethod
    def export_weights(self, model: Any, program: Program) -> dict[str, np.ndarray]:
        """The model's parameters in the neutral format."""

    @abstractmethod
    def import_weights(self, model: Any, program: Program,
                       weights: Mapping[str, np.ndarray]) -> None:
        """Load neutral-format weights into ``model`` in place."""


def installed_backends() -> dict[str, Any]:
    """Entry points of the installed backends, by name (nothing is imported)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_backend(name: str) -> Backend:
    """Import and instantiate the backend called ``name``, with a clear error if missing."""
    available = installed_backends()
    if name not in available:
        if available:
            hint = valid_choices_hint(name, list(available), "installed backends")
        else:
            hint = f"no backend is installed (none registers the '{ENTRY_POINT_GROUP}' group)"
        raise UsageError(f"unknown backend '{name}': {hint}")
    try:
        target = available[name].load()
        backend = target() if callable(target) else target
    except Exception as exc:  # a broken plugin must not crash the CLI with a traceback
        raise UsageError(f"backend '{name}' is installed but failed to load: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(backend, Backend):
        raise UsageError(f"backend '{name}' ({available[name].value}) does not provide a "
                         "specforge.backends.Backend")
    return backend
