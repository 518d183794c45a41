"""Training a SpecModule: loss, optimizer, clipping and checkpoints, per specforge's formulas.

torch's own SGD, RMSprop, Adam and AdamW implement exactly specforge's update rules (coupled
L2 weight decay, epsilon outside the square root, the paper's Adam), so they are used with
every hyper-parameter passed explicitly. Gradient clipping and the losses are written out,
since torch's differ (clip_grad_norm_ adds 1e-6 to the norm; CE on probabilities needs the
clipping specforge defines).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from specforge.backends import Trainer
from specforge.errors import UsageError
from specforge.ir.program import PROBABILITY_EPSILON, LossIR, OptimizerIR, Program
from specforge_torch.model import SpecModule, create_model, export_weights

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str | None) -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {requested!r} asked for, but torch sees no CUDA GPU; "
                         "use --device cpu")
    return torch.device(requested)


def make_optimizer(opt: OptimizerIR, params: Any) -> torch.optim.Optimizer:
    h = opt.hyper
    if opt.kind == "sgd":
        return torch.optim.SGD(params, lr=opt.learning_rate, momentum=h["momentum"],
                               nesterov=h["nesterov"], weight_decay=opt.weight_decay)
    if opt.kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=opt.learning_rate, alpha=h["rho"],
                                   eps=h["epsilon"], weight_decay=opt.weight_decay)
    betas = (h["beta1"], h["beta2"])
    cls = torch.optim.AdamW if opt.kind == "adamw" else torch.optim.Adam
    return cls(params, lr=opt.learning_rate, betas=betas, eps=h["epsilon"],
               weight_decay=opt.weight_decay)


def clip_gradients(params: list[torch.Tensor], clip_value: float | None,
                   clip_norm: float | None) -> None:
    """Clamp each element to +-clip_value, then scale all gradients together by
    clip_norm / max(global norm, clip_norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    if clip_value is not None:
        for g in grads:
            g.clamp_(-clip_value, clip_value)
    if clip_norm is not None and grads:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                     for g in grads]))
        scale = clip_norm / torch.clamp(norm, min=clip_norm)
        torch._foreach_mul_(grads, scale)


def loss_value(loss: LossIR, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss of ``output`` (logits, or probabilities when not from_logits)."""
    e = loss.label_smoothing
    if loss.kind == "cross_entropy":
        if loss.from_logits:
            return F.cross_entropy(output, labels, label_smoothing=e)
        target = F.one_hot(labels, output.shape[1]).to(output.dtype) * (1 - e) + \
            e / output.shape[1]
        p = output.clamp(PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
        return -(target * torch.log(p)).sum(dim=1).mean()
    if loss.kind == "binary_cross_entropy":
        target = labels.to(output.dtype) * (1 - e) + e / 2
        if loss.from_logits:
            return F.binary_cross_entropy_with_logits(output[:, 0], target)
        p = output[:, 0].clamp(PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
        return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    target = F.one_hot(labels, output.shape[1]).to(output.dtype)
    if loss.kind == "mse":
        return F.mse_loss(output, target)
    return F.l1_loss(output, target)


def forward_pass(model: Any, images: torch.Tensor, autocast: torch.dtype | None
                 ) -> torch.Tensor:
    """The model's float32 output, the forward pass autocast to ``autocast`` if set."""
    if autocast is None:
        return model(images)
    with torch.autocast(images.device.type, dtype=autocast):
        return model(images).float()


def optimizer_step(model: Any, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                   loss: LossIR, opt: OptimizerIR, images: torch.Tensor,
                   labels: torch.Tensor, lr: float, autocast: torch.dtype | None = None
                   ) -> tuple[float, np.ndarray]:
    """One training step at learning rate ``lr``: the batch's loss and its logits."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    output = forward_pass(model, images, autocast)
    value = loss_value(loss, output, labels)
    value.backward()
    clip_gradients(params, opt.clip_value, opt.clip_norm)
    optimizer.step()
    return value.item(), output.detach().cpu().numpy()


class TorchTrainer(Trainer):
    def __init__(self, program: Program, device: str | None = None,
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        training = program.spec.training
        self.program = program
        self.torch_device = resolve_device(device)
        self.device = str(self.torch_device)
        if self.torch_device.type == "cuda":
            self.device += f" ({torch.cuda.get_device_name(self.torch_device)})"
        self.model: SpecModule = create_model(program.graph, program.seed, weights).to(
            self.torch_device)
        # Dropout draws from torch's generator: seed it once the model exists.
        torch.manual_seed(program.seed)
        self.memory_format = torch.channels_last if training.channels_last else \
            torch.contiguous_format
        if training.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(program.optimizer, self.params)
        self.autocast = _AUTOCAST.get(training.precision)
        self.forward = torch.compile(self.model) if training.compile else self.model

    def batch_source(self, pipeline: Any) -> Any:
        from specforge_torch.device_data import DeviceBatches, fits_on_device

        wanted = self.program.spec.training.data_on_device
        if wanted is True or (wanted == "auto" and self.torch_device.type == "cuda"
                              and fits_on_device(pipeline)):
            return DeviceBatches(pipeline, self.torch_device)
        return pipeline

    def _inputs(self, x: np.ndarray | torch.Tensor, y: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor]:
        images = x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
        images = images.to(self.torch_device, non_blocking=True)
        images = images.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)
        return images, torch.from_numpy(y).to(self.torch_device, non_blocking=True)

    def _output(self, images: torch.Tensor) -> torch.Tensor:
        return forward_pass(self.forward, images, self.autocast)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        images, labels = self._inputs(x, y)
        self.model.train()
        return optimizer_step(self.forward, self.optimizer, self.params, self.program.loss,
                              self.program.optimizer, images, labels, lr, self.autocast)

    @torch.no_grad()
    def evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        images, labels = self._inputs(x, y)
        self.model.eval()
        output = self._output(images)
        return loss_value(self.program.loss, output, labels).item(), output.cpu().numpy()

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (the folded softmax/sigmoid applied)."""
        images, _ = self._inputs(x, np.zeros(len(x), np.int64))
        self.model.eval()
        output = self._output(images)
        if self.program.output_activation == "softmax":
            output = torch.softmax(output, dim=1)
        elif self.program.output_activation == "sigmoid":
            output = torch.sigmoid(output)
        return output.cpu().numpy()

    def export_weights(self) -> dict[str, np.ndarray]:
        return export_weights(self.model)

    def save_checkpoint(self, path: Path, loop_state: Mapping[str, Any]) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state(), "loop": json.dumps(loop_state)}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        try:
            state = torch.load(path, map_location=self.torch_device, weights_only=True)
        except FileNotFoundError:
            raise UsageError(f"no checkpoint at {path}") from None
        except Exception as exc:
            raise UsageError(f"cannot read checkpoint {path}: {exc}") from None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return json.loads(state["loop"])
