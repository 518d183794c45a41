"""The backend interface and the plugin registry.

A backend is found through the entry-point group ``specforge.backends``: the entry point
names a :class:`Backend` subclass (or a factory returning an instance). Plugins are imported
only when asked for, and a backend's module must not import its framework at import time,
so that `specforge build` stays free of torch and tensorflow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
    spec_dir: Path = Path(".")
    device: str | None = None
    quiet: bool = False
    log_json: bool = False
    resume: bool = False
    #: Keras: train over every device the backend sees (Keras's distribution API)
    data_parallel: bool = False
    #: Neutral weights (.npz) to start from instead of specforge's initial weights
    init_weights: Path | None = None
    #: Trackers besides TensorBoard (`--track`, added to the spec's ``training.track``)
    track: tuple[str, ...] = ()
    #: Called with each epoch's record after its checkpoint; True stops the run there with
    #: :class:`specforge.runner.Pruned` (a sweep's pruner; one process only)
    after_epoch: Callable[[dict[str, Any]], bool] | None = None


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    #: Final test metrics, e.g. {"loss": 0.41, "accuracy": 0.87}.
    metrics: Mapping[str, float]
    #: False in all but one of several data-parallel processes (that one reports)
    main_process: bool = True


#: The styles of `specforge build` (see docs/build.md): a script a person would write with
#: the framework's own building blocks, or one that reproduces `specforge run` step for step.
BUILD_STYLES = ("idiomatic", "exact")


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the abstract methods; the CLI asks, it never assumes."""

    #: `specforge build --style` values it accepts; the first is the default.
    build_styles: tuple[str, ...] = ("exact",)
    #: How it trains data-parallel: "torchrun" (`--nproc-per-node`, one process per device),
    #: "in-process" (`--data-parallel`, every device of one process), or None.
    data_parallel: str | None = None
    #: `--device` values it takes.
    devices: tuple[str, ...] = ("cpu",)


#: The `specforge run` options of each way of training data-parallel.
DATA_PARALLEL_OPTIONS = {"torchrun": "--nproc-per-node/--nnodes", "in-process": "--data-parallel"}


def describe_data_parallel(how: str | None) -> str:
    """How a backend trains data-parallel, in words for a user ("with --data-parallel")."""
    if how is None:
        return "does not train data-parallel"
    option = DATA_PARALLEL_OPTIONS.get(how)
    return f"trains data-parallel with {option}" if option else f"trains data-parallel ({how})"


#: A started training step: calling it waits for the step's (loss, logits).
PendingStep = Callable[[], "tuple[float, np.ndarray]"]


class Trainer(ABC):
    """One model being trained by a backend: the framework-specific half of the loop.

    specforge's own loop (:mod:`specforge.runner`) owns epochs, batches, the learning-rate
    schedule, metrics, logging, checkpoints and signals; a trainer only computes.
    """

    #: Where it computes, in words ("cpu", "cuda:0 (NVIDIA H100)").
    device: str = "cpu"
    #: Whether it computes on an accelerator (a GPU): host work on the batches then runs in
    #: data workers by default (`data.workers: auto`), since no core is busy training.
    accelerated: bool = False
    #: False in all but one of several data-parallel processes: only that one writes the
    #: run folder and shows progress.
    writes_run_folder: bool = True

    def agree_to_stop(self, wanted: bool) -> bool:
        """Whether the run stops after this step, given whether this process was asked to;
        data-parallel processes must agree, and may answer with an earlier step's votes (by
        default: there is one process)."""
        return wanted

    def close(self) -> None:  # noqa: B027 - an optional hook: most trainers hold nothing
        """Release what the trainer holds beyond memory (a process group, say)."""

    def batch_source(self, pipeline: Any) -> Any:
        """What gives the training batches (``.train_batch(step)``): by default the numpy
        pipeline itself; a backend may assemble the same batches on its device."""
        return pipeline

    @abstractmethod
    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        """One optimizer step on a batch (NHWC float32, int64 labels) at learning rate
        ``lr``; returns the batch's loss and its logits (for the training metrics)."""

    def start_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> PendingStep:
        """:meth:`train_step`, without waiting for its results: call what it returns for the
        loss and logits. The loop starts the next step before it reads this one's, so that
        a GPU computes while the host logs. By default the step runs to its end here."""
        result = self.train_step(x, y, lr)
        return lambda: result

    @abstractmethod
    def evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and logits in evaluation mode, without updating anything."""

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Model outputs for NHWC float32 images, with the folded softmax/sigmoid applied
        (class probabilities for classifiers)."""

    @abstractmethod
    def export_weights(self) -> dict[str, np.ndarray]:
        """Current parameters and statistics in the neutral format."""

    @abstractmethod
    def save_checkpoint(self, path: Path, loop_state: Mapping[str, Any]) -> None:
        """Write model, optimizer, RNG and ``loop_state`` (JSON-able) to ``path``
        atomically, in a format that loads without running code."""

    @abstractmethod
    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore what :meth:`save_checkpoint` wrote; returns the loop state."""


class Probe(ABC):
    """A backend's model and optimizer as the conformance suite drives them (see
    :mod:`specforge.conformance`): one call per computation, everything in specforge's
    neutral layouts (NHWC images, the weights format of :mod:`specforge.weights`).

    ``masks`` maps each dropout node to its mask in the node's output layout (N, H, W, C) or
    (N, features) (spatial dropout: (N, 1, 1, C); per-sample: (N, 1, 1, 1) or (N, 1)),
    already scaled (0 or 1 / (1 - rate)). In training mode a dropout multiplies by its mask
    instead of drawing one, so that every backend drops the same units.
    """

    #: Where it computes, in words.
    device: str = "cpu"
    #: What the probe changed so as to compute in full float32 (e.g. TF32 turned off).
    notes: Sequence[str] = ()

    @abstractmethod
    def output(self, x: np.ndarray, training: bool,
               masks: Mapping[str, np.ndarray]) -> np.ndarray:
        """The graph's output (logits where the softmax was folded into the loss). May
        update batch norm's running statistics in training mode."""

    @abstractmethod
    def gradients(self, x: np.ndarray, y: np.ndarray, masks: Mapping[str, np.ndarray]
                  ) -> tuple[float, dict[str, np.ndarray]]:
        """The batch's loss in training mode and its gradient with respect to every
        trainable parameter, before clipping. The parameters are not changed (batch norm's
        running statistics may be)."""

    @abstractmethod
    def step(self, x: np.ndarray, y: np.ndarray, lr: float,
             masks: Mapping[str, np.ndarray]) -> float:
        """One training step at learning rate ``lr`` (the Nth call is optimizer step N);
        returns the batch's loss."""

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Every parameter and statistic (neutral names) and the optimizer's state, as
        ``"{parameter}:{slot}"`` with the slots of
        :func:`specforge.ir.program.optimizer_slots`."""


class Backend(ABC):
    """What every backend plugin provides. Weights cross backends in specforge's neutral
    format: a mapping ``"{node}.{param}" -> numpy array`` in the layouts of
    :mod:`specforge.ir.ops` (see :mod:`specforge.weights`)."""

    #: The name users pass to `--backend`.
    name: ClassVar[str]
    #: One line for `specforge backends`.
    description: ClassVar[str] = ""
    #: The checkpoint file name in a run folder.
    checkpoint_name: ClassVar[str] = "checkpoint"
    #: Conformance cases this backend skips: case name pattern (glob) -> the reason, which
    #: the suite reports (see :mod:`specforge.conformance.suite`).
    conformance_excludes: ClassVar[Mapping[str, str]] = {}
    #: What it can do (build styles, data-parallel launch, devices).
    capabilities: ClassVar[Capabilities] = Capabilities()

    @abstractmethod
    def build(self, program: Program, style: str | None = None,
              distributed: bool = False) -> str:
        """The text of a standalone training script for ``program`` in ``style`` (one of
        ``capabilities.build_styles``; None: the first), with multi-process training code
        only when ``distributed``."""

    @abstractmethod
    def create_trainer(self, program: Program, device: str | None = None,
                       weights: Mapping[str, np.ndarray] | None = None) -> Trainer:
        """A trainer for ``program`` starting from ``weights`` (default: specforge's initial
        weights for the program's seed). A backend that trains data-parallel within one
        process also takes ``data_parallel=True`` (passed only when asked for)."""

    @abstractmethod
    def create_model(self, program: Program, weights: Mapping[str, np.ndarray] | None = None
                     ) -> Any:
        """The framework's model object, with ``weights`` loaded."""

    @abstractmethod
    def export_weights(self, model: Any, program: Program) -> dict[str, np.ndarray]:
        """The model's parameters in the neutral format."""

    @abstractmethod
    def import_weights(self, model: Any, program: Program,
                       weights: Mapping[str, np.ndarray]) -> None:
        """Load neutral-format weights into ``model`` in place."""

    def create_probe(self, program: Program, device: str | None = None,
                     weights: Mapping[str, np.ndarray] | None = None) -> Probe:
        """The conformance suite's handle on this backend (see :class:`Probe`)."""
        raise UsageError(f"backend '{self.name}' does not support conformance checks "
                         "(it provides no Backend.create_probe)")

    def run(self, program: Program, options: RunOptions) -> RunResult:
        """Train and evaluate ``program`` with specforge's loop, writing a run folder."""
        from specforge.runner import run_training

        return run_training(self, program, options)


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


def check_data_parallel(backend: Backend, how: str, option: str) -> None:
    """Refuse ``option`` (a way ``how`` of training data-parallel) unless ``backend`` trains
    that way; the message says what the backend supports instead."""
    supported = backend.capabilities.data_parallel
    if supported != how:
        raise UsageError(f"{option}: the {backend.name} backend "
                         f"{describe_data_parallel(supported)}")


def check_device(backend: Backend, device: str | None, option: str = "--device") -> None:
    """Refuse a device ``backend`` does not declare in ``capabilities.devices``; "auto" (the
    backend's choice) always, and "kind:N" (one device of a declared kind) pass."""
    if device is None or device == "auto":
        return
    devices = backend.capabilities.devices
    kind, _, index = device.partition(":")
    if device in devices or (kind in devices and index.isdigit()):
        return
    hint = valid_choices_hint(device, ["auto", *devices], "valid")
    raise UsageError(f"{option} {device!r}: the {backend.name} backend does not train on "
                     f"it; {hint}")
