"""specforge's Keras 3 backend (TensorFlow, JAX or PyTorch underneath: `KERAS_BACKEND`).

Registered as the ``keras`` entry point of ``specforge.backends``. Importing this package
does not import keras: `specforge build` works without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specforge.backends import BUILD_STYLES, Backend, Capabilities

if TYPE_CHECKING:
    import numpy as np

    from specforge.backends import Probe, Trainer
    from specforge.ir.program import Program


class KerasBackend(Backend):
    name = "keras"
    description = "Keras 3 (TensorFlow, JAX or PyTorch); builds standalone Keras scripts"
    capabilities = Capabilities(build_styles=BUILD_STYLES, data_parallel='in-process',
                                devices=("cpu", "cuda"))
    checkpoint_name = "checkpoint.json"

    def build(self, program: Program, style: str | None = None,
              distributed: bool = False) -> str:
        if (style or "idiomatic") == "idiomatic":
            from specforge_keras.idiomatic import render_idiomatic

            return render_idiomatic(program, distributed)
        from specforge_keras.build import render_script

        return render_script(program, distributed)

    def create_trainer(self, program: Program, device: str | None = None,
                       weights: Mapping[str, np.ndarray] | None = None,
                       data_parallel: bool = False) -> Trainer:
        from specforge_keras.trainer import KerasTrainer

        return KerasTrainer(program, device, weights, data_parallel)

    def create_probe(self, program: Program, device: str | None = None,
                     weights: Mapping[str, np.ndarray] | None = None) -> Probe:
        from specforge_keras.probe import KerasProbe

        return KerasProbe(program, device, weights)

    def create_model(self, program: Program, weights: Mapping[str, np.ndarray] | None = None
                     ) -> Any:
        from specforge_keras.model import create_model

        return create_model(program.graph, program.seed, weights)

    def export_weights(self, model: Any, program: Program) -> dict[str, np.ndarray]:
        from specforge_keras.model import export_weights

        return export_weights(model, program.graph)

    def import_weights(self, model: Any, program: Program,
                       weights: Mapping[str, np.ndarray]) -> None:
        from specforge_keras.model import import_weights

        import_weights(model, program.graph, weights)


def load_model(spec: str | Path, overrides: tuple[str, ...] = (),
               weights: Mapping[str, np.ndarray] | None = None) -> Any:
    """A ``keras.Model`` for a spec file with specforge's initial weights (or ``weights``).

    It takes (N, H, W, C) float32 and returns the spec's output; where the spec's final
    softmax is folded into the loss, that output is the logits.
    """
    from specforge.compiler import compile_spec

    program = compile_spec(spec, overrides)
    return KerasBackend().create_model(program, weights)
