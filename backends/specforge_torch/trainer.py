"""Training a SpecModule: loss, optimizer, clipping and checkpoints, per specforge's formulas.

torch's own SGD, RMSprop, Adam and AdamW implement exactly specforge's update rules (coupled
L2 weight decay, epsilon outside the square root, the paper's Adam), so they are used with
every hyper-parameter passed explicitly. Gradient clipping and the losses are written out,
since torch's differ (clip_grad_norm_ adds 1e-6 to the norm; CE on probabilities needs the
clipping specforge defines).
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from specforge.atomic import atomic_path
from specforge.backends import PendingStep, Trainer
from specforge.data.pipeline import shard
from specforge.errors import UsageError
from specforge.ir.program import PROBABILITY_EPSILON, LossIR, OptimizerIR, Program
from specforge.runfolder import DamagedFile, check_loop_state
from specforge.weights import shape_mismatch
from specforge_torch.distributed import (
    Ranks,
    ShardedBatches,
    all_sum,
    any_rank,
    gather_rows,
    join,
    leave,
    ranks_from_environment,
)
from specforge_torch.model import SpecModule, create_model, export_weights
from specforge_torch.transfer import to_device, to_host_later


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype `training.precision` autocasts the forward pass to (None: float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def compile_mode(setting: bool | str) -> str | None:
    """torch.compile's mode for `training.compile` (None: do not compile)."""
    return "default" if setting is True else (setting or None)


def resolve_device(requested: str | None) -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {requested!r} asked for, but torch sees no CUDA GPU; "
                         "use --device cpu")
    return torch.device(requested)


def _fused(params: list[torch.Tensor]) -> dict[str, bool]:
    """On a GPU, torch's fused kernel (one launch per step instead of one per formula)."""
    return {"fused": True} if params and params[0].is_cuda else {}


def sgd(opt: OptimizerIR, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    h = opt.hyper
    return torch.optim.SGD(params, lr=opt.learning_rate, momentum=h["momentum"],
                           nesterov=h["nesterov"], weight_decay=opt.weight_decay,
                           **_fused(params))


def rmsprop(opt: OptimizerIR, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    h = opt.hyper  # RMSprop has no fused kernel
    return torch.optim.RMSprop(params, lr=opt.learning_rate, alpha=h["rho"], eps=h["epsilon"],
                               weight_decay=opt.weight_decay)


def adam(opt: OptimizerIR, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    h = opt.hyper
    cls = torch.optim.AdamW if opt.kind == "adamw" else torch.optim.Adam
    return cls(params, lr=opt.learning_rate, betas=(h["beta1"], h["beta2"]), eps=h["epsilon"],
               weight_decay=opt.weight_decay, **_fused(params))


#: torch's optimizer per kind (a built script keeps only its spec's).
OPTIMIZERS = {"sgd": sgd, "rmsprop": rmsprop, "adam": adam, "adamw": adam}


def make_optimizer(opt: OptimizerIR, params: Any) -> torch.optim.Optimizer:
    """torch's optimizer for ``opt`` over ``params``."""
    return OPTIMIZERS[opt.kind](opt, list(params))


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


def model_inputs(x: np.ndarray | torch.Tensor, y: np.ndarray, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC images (numpy or a tensor) and labels as the model takes them: NCHW, on
    ``device``, in ``memory_format``."""
    images = to_device(x, device).permute(0, 3, 1, 2)
    return images.contiguous(memory_format=memory_format), to_device(y, device)


def fetch_later(loss: torch.Tensor, logits: torch.Tensor) -> PendingStep:
    """Start copying a step's loss and logits to the host (see :func:`to_host_later`); what
    it returns waits for them."""
    copies = to_host_later(loss.detach(), logits.detach())

    def results() -> tuple[float, np.ndarray]:
        host_loss, host_logits = copies()
        return host_loss.item(), host_logits.numpy()
    return results


def cross_entropy(loss: LossIR, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    e = loss.label_smoothing
    if loss.from_logits:
        return F.cross_entropy(output, labels, label_smoothing=e)
    target = F.one_hot(labels, output.shape[1]).to(output.dtype) * (1 - e) + e / output.shape[1]
    p = output.clamp(PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
    return -(target * torch.log(p)).sum(dim=1).mean()


def binary_cross_entropy(loss: LossIR, output: torch.Tensor, labels: torch.Tensor
                         ) -> torch.Tensor:
    e = loss.label_smoothing
    target = labels.to(output.dtype) * (1 - e) + e / 2
    if loss.from_logits:
        return F.binary_cross_entropy_with_logits(output[:, 0], target)
    p = output[:, 0].clamp(PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()


def mse(loss: LossIR, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, F.one_hot(labels, output.shape[1]).to(output.dtype))


def mae(loss: LossIR, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(output, F.one_hot(labels, output.shape[1]).to(output.dtype))


#: The batch-mean loss per kind (a built script keeps only its spec's).
LOSSES = {"cross_entropy": cross_entropy, "binary_cross_entropy": binary_cross_entropy,
          "mse": mse, "mae": mae}


def loss_value(loss: LossIR, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss of ``output`` (logits, or probabilities when not from_logits)."""
    return LOSSES[loss.kind](loss, output, labels)


def forward_pass(model: Any, images: torch.Tensor, autocast: torch.dtype | None
                 ) -> torch.Tensor:
    """The model's float32 output, the forward pass autocast to ``autocast`` if set."""
    if autocast is None:
        return model(images)
    with torch.autocast(images.device.type, dtype=autocast):
        return model(images).float()


def optimizer_step(model: Any, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                   loss: LossIR, opt: OptimizerIR, images: torch.Tensor,
                   labels: torch.Tensor, lr: float, autocast: torch.dtype | None = None,
                   share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step at learning rate ``lr``: the batch's loss and its logits (still
    on the device). ``share``: the weight of this batch's mean loss in the gradient (a
    data-parallel shard's size times the number of processes over the whole batch's size;
    DDP averages the processes' gradients)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    output = forward_pass(model, images, autocast)
    value = loss_value(loss, output, labels)
    (value * share if share != 1.0 else value).backward()
    clip_gradients(params, opt.clip_value, opt.clip_norm)
    optimizer.step()
    return value.detach(), output.detach()


def whole_batch(loss: torch.Tensor, output: torch.Tensor, size: int, ranks: Ranks
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean loss and the outputs of a whole batch of ``size``, from this process's shard
    of it (``loss`` its mean, ``output`` its rows) and every other process's."""
    # summed in float64, as one process sums its batch's losses; an empty shard (a last
    # batch smaller than the processes) has a NaN mean and no weight
    mine = loss.detach().double() * len(output) if len(output) else \
        loss.new_zeros((), dtype=torch.float64)
    return all_sum(mine) / size, gather_rows(output, size, ranks)


class Steps:
    """The training and evaluation steps of a model in one process, set up as `training:`
    asks (memory format, autocast, torch.compile), with torch's optimizer for ``opt``:
    what the training loop (:class:`specforge.runner.TrainingLoop`) asks of a trainer.
    TorchTrainer and the built script both use it."""

    def __init__(self, model: torch.nn.Module, device: torch.device, seed: int,
                 loss: LossIR, opt: OptimizerIR, training: Any) -> None:
        self.torch_device, self.loss, self.opt, self.seed = device, loss, opt, seed
        self.memory_format = torch.channels_last if training.channels_last else \
            torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        # specforge's dropout draws no random numbers of torch's: it hashes (seed, step, node,
        # element), so nothing here seeds or reads torch's generators
        self.dropouts = [m for m in self.model.modules() if hasattr(m, "set_key")]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(opt, self.params)
        self.autocast = autocast_dtype(training.precision)
        mode = compile_mode(training.compile)
        wrapped = self.wrap(self.model)
        self.forward = torch.compile(wrapped, mode=mode) if mode else wrapped
        #: training steps started: the next one's number (dropout's keys depend on it)
        self.step_count = 0

    def wrap(self, model: torch.nn.Module) -> Any:
        return model

    def tensors(self, x: np.ndarray | torch.Tensor, y: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`model_inputs` on this device, in this memory format."""
        return model_inputs(x, y, self.torch_device, self.memory_format)

    def set_keys(self, step: int, first_sample: int = 0) -> None:
        """Dropout's keys for training step ``step``."""
        for dropout in self.dropouts:
            dropout.set_key(self.seed, step, first_sample)

    def train(self, x: Any, y: np.ndarray, lr: float, step: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training step ``step`` at learning rate ``lr``: the batch's loss and logits."""
        self.set_keys(step)
        self.model.train()
        images, labels = self.tensors(x, y)
        return optimizer_step(self.forward, self.optimizer, self.params, self.loss, self.opt,
                              images, labels, lr, self.autocast)

    def evaluate(self, x: Any, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's loss and logits in evaluation mode, without gradients."""
        self.model.eval()
        images, labels = self.tensors(x, y)
        with torch.no_grad():
            output = forward_pass(self.forward, images, self.autocast)
            return loss_value(self.loss, output, labels), output

    def start_step(self, x: Any, y: np.ndarray, lr: float) -> PendingStep:
        """Start the next training step; what it returns waits for its loss and logits."""
        step, self.step_count = self.step_count, self.step_count + 1
        return fetch_later(*self.train(x, y, lr, step))

    def evaluate_batch(self, x: Any, y: np.ndarray) -> tuple[float, np.ndarray]:
        loss, output = self.evaluate(x, y)
        return loss.item(), output.cpu().numpy()

    def agree_to_stop(self, wanted: bool) -> bool:
        return wanted


class ShardedSteps(Steps):
    """The steps of one of torchrun's processes, the model wrapped in DDP: each process
    computes its shard of every batch, and the loss and logits are the whole batch's, the
    same in every process."""

    def __init__(self, ranks: Ranks, *args: Any) -> None:
        self.ranks = ranks
        #: the processes' last vote on stopping, not read yet (see agree_to_stop)
        self.vote: Callable[[], bool] | None = None
        super().__init__(*args)

    def wrap(self, model: torch.nn.Module) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.torch_device.type == "cuda"
        # No buffer broadcast: batch norm's statistics are the whole batch's in every process
        # already, and dropout's buffers (its key, this process's first sample) are each
        # process's own; DDP's broadcast from rank 0 would give every shard rank 0's masks.
        return DistributedDataParallel(model, device_ids=[self.torch_device] if cuda else None,
                                       broadcast_buffers=False)

    def train(self, x: Any, y: np.ndarray, lr: float, step: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: this process's shard of the batch (see :class:`ShardedBatches`), ``y``: the
        whole batch's labels. Each shard's loss weighs its share of the batch (DDP averages
        the processes' gradients); dropout masks the shard's part of the batch's masks."""
        part = shard(len(y), self.ranks.rank, self.ranks.world)
        self.set_keys(step, part.start)
        self.model.train()
        mine = y[part]
        images, labels = self.tensors(x, mine)
        value, output = optimizer_step(self.forward, self.optimizer, self.params, self.loss,
                                       self.opt, images, labels, lr, self.autocast,
                                       share=len(mine) * self.ranks.world / len(y))
        return whole_batch(value, output, len(y), self.ranks)

    def evaluate(self, x: Any, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Each process evaluates its shard of the whole batch ``x``, ``y``."""
        part = shard(len(y), self.ranks.rank, self.ranks.world)
        value, output = super().evaluate(x[part], y[part])
        return whole_batch(value, output, len(y), self.ranks)

    def agree_to_stop(self, wanted: bool) -> bool:
        """The answer is the last step's vote, and this step's is sent off: reading it at
        once would wait for the step queued before it. A stop comes a step later."""
        last, self.vote = self.vote, any_rank(wanted, self.torch_device)
        return last is not None and last()

    def leave(self) -> None:
        """Drop DDP, then leave the process group with the others (:func:`leave`). A DDP
        left for the interpreter's exit keeps the group alive past its destruction, and its
        threads then die with the process ("terminate called without an active exception",
        2 of 8 two-process runs of the built script)."""
        self.forward = self.model
        gc.collect()
        leave()


def kernels_of(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved optimizer state with ``optimizer``'s kernel choice (fused, foreach) instead of
    the writer's: a checkpoint written on a GPU resumes on the CPU and the other way round,
    and torch places the step counts by that choice as it loads them."""
    for group, mine in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        group.update({k: mine[k] for k in ("fused", "foreach") if k in mine})
    return saved


class TorchTrainer(Trainer):
    def __init__(self, program: Program, device: str | None = None,
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        training = program.spec.training
        self.program = program
        self.torch_device = resolve_device(device)
        #: this process's place under torchrun (None: the only process)
        self.ranks = ranks_from_environment()
        if self.ranks is not None:
            self.torch_device = join(self.ranks, self.torch_device)
            self.writes_run_folder = self.ranks.rank == 0
        self.device = str(self.torch_device)
        self.accelerated = self.torch_device.type != "cpu"
        if self.torch_device.type == "cuda":
            self.device += f" ({torch.cuda.get_device_name(self.torch_device)})"
        if self.ranks is not None:
            self.device += f" x {self.ranks.world} processes"
        model = create_model(program.graph, program.seed, weights)
        setup = (model, self.torch_device, program.seed, program.loss, program.optimizer,
                 training)
        self.steps = Steps(*setup) if self.ranks is None else ShardedSteps(self.ranks, *setup)
        self.model: SpecModule = model
        self.params, self.optimizer = self.steps.params, self.steps.optimizer

    def batch_source(self, pipeline: Any) -> Any:
        from specforge_torch.device_data import DeviceBatches, fits_on_device

        wanted = self.program.spec.training.data_on_device
        source = pipeline
        if wanted is True or (wanted == "auto" and self.torch_device.type == "cuda"
                              and fits_on_device(pipeline)):
            source = DeviceBatches(pipeline, self.torch_device)
        return source if self.ranks is None else ShardedBatches(source, pipeline, self.ranks)

    def tensors(self, x: np.ndarray | torch.Tensor, y: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.steps.tensors(x, y)

    def _output(self, images: torch.Tensor) -> torch.Tensor:
        return forward_pass(self.steps.forward, images, self.steps.autocast)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        return self.start_step(x, y, lr)()

    def start_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> PendingStep:
        """Under torchrun ``x`` is this process's shard (see :class:`ShardedBatches`); the
        loss and logits are the whole batch's, gathered from every process."""
        return self.steps.start_step(x, y, lr)

    def agree_to_stop(self, wanted: bool) -> bool:
        return self.steps.agree_to_stop(wanted)

    def evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Under torchrun each process evaluates its shard of the batch."""
        return self.steps.evaluate_batch(x, y)

    def close(self) -> None:
        if isinstance(self.steps, ShardedSteps):
            self.steps.leave()

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (the folded softmax/sigmoid applied)."""
        images, _ = self.tensors(x, np.zeros(len(x), np.int64))
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
        if self.ranks is not None and self.ranks.rank != 0:
            return  # every process holds the same state; rank 0 writes it
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "steps": self.steps.step_count,
                 "processes": self.ranks.world if self.ranks else 1,
                 "loop": json.dumps(loop_state)}
        state["sha256"] = checkpoint_digest(state)
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        state = read_checkpoint(path, self.torch_device)
        found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else ("not a tensor",)
                 for k, v in state["model"].items()}
        problem = shape_mismatch({k: tuple(v.shape) for k, v in self.model.state_dict().items()},
                                 found)
        if problem:
            raise DamagedFile(path, f"its weights are not this spec's model's: {problem}")
        self.model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(kernels_of(self.optimizer, state["optimizer"]))
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise DamagedFile(path, f"its optimizer state is not this spec's optimizer's "
                                    f"({exc})") from None
        world, saved = self.ranks.world if self.ranks else 1, int(state.get("processes", 1))
        if saved != world:  # the same reductions, so that a resumed run is the same bits
            raise UsageError(f"{path} was written by {saved} process(es); resume it with "
                             f"as many (--nproc-per-node), not {world}")
        loop = state["loop"]
        self.steps.step_count = int(state.get("steps", loop.get("step", 0)))
        return loop


#: What a checkpoint holds besides "steps", "processes" and "sha256".
CHECKPOINT_PARTS = ("model", "optimizer", "loop")


def checkpoint_digest(state: Mapping[str, Any]) -> str:
    """The sha256 of a checkpoint's contents (every tensor's bytes, every other value's
    repr), leaving out its "sha256" entry."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(value, Mapping):
            for key in sorted(value, key=repr):
                digest.update(f"key {key!r}:".encode())
                add(value[key])
        elif isinstance(value, list | tuple):
            digest.update(f"{type(value).__name__} {len(value)}:".encode())
            for item in value:
                add(item)
        else:
            digest.update(f"{value!r};".encode())
    add({k: v for k, v in state.items() if k != "sha256"})
    return digest.hexdigest()


def read_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint's contents, checked, its loop state parsed; a file that is not what
    :meth:`TorchTrainer.save_checkpoint` wrote is refused by name (DamagedFile)."""
    if not path.exists():
        raise UsageError(f"no checkpoint at {path}")
    try:  # weights_only: tensors and plain containers, never code
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DamagedFile(path, f"torch cannot read it as a checkpoint with weights_only=True "
                                f"({type(exc).__name__}: {reason})") from None
    lacking = [k for k in CHECKPOINT_PARTS if k not in state] if isinstance(state, dict) \
        else list(CHECKPOINT_PARTS)
    if lacking or not isinstance(state["model"], dict):
        raise DamagedFile(path, f"it holds a {type(state).__name__} without "
                                f"{' and '.join(lacking) or 'a model'}, not a specforge "
                                "checkpoint (the model's weights, the optimizer's state and "
                                "the loop's)")
    if "sha256" in state and state["sha256"] != checkpoint_digest(state):
        raise DamagedFile(path, "its contents do not match the sha256 they were saved with "
                                "(the file changed after it was written)")
    try:
        state["loop"] = json.loads(state["loop"])
    except (TypeError, ValueError) as exc:
        raise DamagedFile(path, f"its loop state is not JSON ({exc})") from None
    check_loop_state(state["loop"], path)
    return state
