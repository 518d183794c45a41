"""specforge's PyTorch backend.

Registered as the ``torch`` entry point of ``specforge.backends``. Importing this package
does not import torch: `specforge build` works without it; `run` and the model API import
it when called.
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


class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch: trains on CPU or CUDA; builds standalone PyTorch scripts"
    capabilities = Capabilities(build_styles=BUILD_STYLES, data_parallel='torchrun',
                                devices=("cpu", "cuda"))
    checkpoint_name = "checkpoint.pt"

    def build(self, program: Program, style: str | None = None,
              distributed: bool = False) -> str:
        if (style or "idiomatic") == "idiomatic":
            from specforge_torch.idiomatic import render_idiomatic

            return render_idiomatic(program, distributed)
        from specforge_torch.build import render_script

        return render_script(program, distributed)

    def create_trainer(self, program: Program, device: str | None = None,
                       weights: Mapping[str, np.ndarray] | None = None) -> Trainer:
        from specforge_torch.trainer import TorchTrainer

        return TorchTrainer(program, device, weights)

    def create_probe(self, program: Program, device: str | None = None,
                     weights: Mapping[str, np.ndarray] | None = None) -> Probe:
        from specforge_torch.probe import TorchProbe

        return TorchProbe(program, device, weights)

    def create_model(self, program: Program, weights: Mapping[str, np.ndarray] | None = None
                     ) -> Any:
        from specforge_torch.model import create_model

        return create_model(program.graph, program.seed, weights)

    def export_weights(self, model: Any, program: Program) -> dict[str, np.ndarray]:
        from specforge_torch.model import export_weights

        return export_weights(model)

    def import_weights(self, model: Any, program: Program,
                       weights: Mapping[str, np.ndarray]) -> None:
        from specforge_torch.model import import_weights

        import_weights(model, weights)


def load_model(spec: str | Path, overrides: tuple[str, ...] = (),
               weights: Mapping[str, np.ndarray] | None = None) -> Any:
    """An ``nn.Module`` for a spec file, with specforge's initial weights (or ``weights``).

    It takes (N, C, H, W) float32 and returns the spec's output; where the spec's final
    softmax is folded into the loss, that output is the logits.
    """
    from specforge.compiler import compile_spec

    program = compile_spec(spec, overrides)
    return TorchBackend().create_model(program, weights)
