"""The torch backend as the conformance suite drives it (:class:`specforge.backends.Probe`).

It trains with the backend's own code (:class:`~specforge_torch.trainer.TorchTrainer`), in
float32 and eagerly: autocast and torch.compile are what a conformance run must not
measure. Dropout multiplies by specforge's masks instead of drawing from torch's generator.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from specforge.backends import Probe
from specforge.ir.program import Program, optimizer_slots
from specforge_torch.model import export_weights, from_torch_layout, tensor_of
from specforge_torch.trainer import TorchTrainer, forward_pass, loss_value

#: torch's optimizer state key for each of specforge's slots.
TORCH_SLOTS = {"momentum": "momentum_buffer", "mean_square": "square_avg", "m": "exp_avg",
               "v": "exp_avg_sq"}


class MaskedDropout(nn.Module):
    """Dropout that multiplies by the mask it is given; the identity in evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask if self.training and self.mask is not None else x


def full_precision() -> list[str]:
    """Turn off TF32 and reduced-precision reductions; say what was turned off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.set_float32_matmul_precision("highest")
    return ["torch: TF32 off for matmul and cuDNN convolutions, reduced-precision "
            "reductions off, float32 matmul precision 'highest'"]


class TorchProbe(Probe):
    def __init__(self, program: Program, device: str | None = None,
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        self.notes = full_precision()
        self.trainer = TorchTrainer(program, device, weights)
        steps = self.trainer.steps  # full precision, no torch.compile
        steps.autocast, steps.forward = None, steps.model
        self.device = self.trainer.device
        model = self.trainer.model
        self.dropouts: dict[str, MaskedDropout] = {}
        for node in program.graph:
            if node.op == "dropout":
                self.dropouts[node.name] = MaskedDropout()
                setattr(model, model.names[node.name], self.dropouts[node.name])
        self.names: dict[int, tuple[str, str, str]] = {
            id(tensor_of(model, node, p.name)): (f"{node.name}.{p.name}", node.op, p.name)
            for node in program.graph for p in node.params}
        self.slots = optimizer_slots(program.optimizer)

    def _set_masks(self, masks: Mapping[str, np.ndarray]) -> None:
        for name, layer in self.dropouts.items():
            mask = masks.get(name)
            if mask is not None and mask.ndim == 4:  # (N, H, W, C) -> (N, C, H, W)
                mask = mask.transpose(0, 3, 1, 2)
            layer.mask = None if mask is None else torch.from_numpy(
                np.ascontiguousarray(mask)).to(self.trainer.torch_device)

    def _neutral(self, tensor: torch.Tensor, value: torch.Tensor) -> tuple[str, np.ndarray]:
        name, op, param = self.names[id(tensor)]
        value = value.detach().cpu().numpy()
        return name, np.ascontiguousarray(from_torch_layout(op, param, value))

    def output(self, x: np.ndarray, training: bool,
               masks: Mapping[str, np.ndarray]) -> np.ndarray:
        self._set_masks(masks)
        images, _ = self.trainer.tensors(x, np.zeros(len(x), np.int64))
        self.trainer.model.train(training)
        with torch.no_grad():
            return forward_pass(self.trainer.model, images, None).cpu().numpy()

    def gradients(self, x: np.ndarray, y: np.ndarray, masks: Mapping[str, np.ndarray]
                  ) -> tuple[float, dict[str, np.ndarray]]:
        self._set_masks(masks)
        images, labels = self.trainer.tensors(x, y)
        model = self.trainer.model.train()
        model.zero_grad(set_to_none=True)
        value = loss_value(self.trainer.program.loss, model(images), labels)
        value.backward()
        grads = dict(self._neutral(p, p.grad) for p in self.trainer.params)
        model.zero_grad(set_to_none=True)
        return value.item(), grads

    def step(self, x: np.ndarray, y: np.ndarray, lr: float,
             masks: Mapping[str, np.ndarray]) -> float:
        self._set_masks(masks)
        return self.trainer.train_step(x, y, lr)[0]

    def state(self) -> dict[str, np.ndarray]:
        out = export_weights(self.trainer.model)
        for p in self.trainer.params:
            kept = self.trainer.optimizer.state.get(p, {})
            for slot in self.slots:
                value = kept.get(TORCH_SLOTS[slot])
                name, array = self._neutral(p, value if value is not None else
                                            torch.zeros_like(p))
                out[f"{name}:{slot}"] = array
        return out
