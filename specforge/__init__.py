"""specforge: a declarative model-spec compiler for vision models.

One YAML spec describes a CNN and its training; specforge validates it, lowers it to a small
typed IR with shape inference, and hands it to a backend plugin (PyTorch, Keras 3, ...) that
runs it or emits a standalone training script.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Program", "SpecError", "__version__", "compile_spec", "load_spec"]

if TYPE_CHECKING:
    from specforge.compiler import compile_spec, load_spec
    from specforge.errors import SpecError
    from specforge.ir.program import Program


def __getattr__(name: str) -> Any:
    # Lazy, so that `import specforge` (and the CLI's start-up) stays cheap.
    if name in ("compile_spec", "load_spec"):
        from specforge import compiler
        return getattr(compiler, name)
    if name == "SpecError":
        from specforge.errors import SpecError
        return SpecError
    if name == "Program":
        from specforge.ir.program import Program
        return Program
    raise AttributeError(f"module 'specforge' has no attribute {name!r}")
