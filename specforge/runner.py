"""specforge's training loop, shared by every backend.

The loop owns what must be identical across backends: which batch each step sees
(:mod:`specforge.data.pipeline`), the learning rate of each step (:func:`lr_at`), metrics over
whole epochs, the run folder, checkpoints, resume, NaN detection and clean stops on Ctrl-C or
SIGTERM. A backend's :class:`~specforge.backends.Trainer` only computes.

Run folder: ``spec.yaml`` (resolved), ``run.json``, ``steps.jsonl`` (loss and learning rate
per step), ``metrics.jsonl`` and ``metrics.csv`` (per epoch), ``plot.png``, the backend's
checkpoint, ``weights.npz`` (final weights, neutral format), ``summary.json``, and TensorBoard
event files (with the other trackers of :mod:`specforge.tracking`, from rank 0 only).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from specforge.data import DataPipeline, build_pipeline
from specforge.data.prefetch import PrefetchedBatches, resolve_workers
from specforge.errors import UsageError
from specforge.ir.program import Program, lr_at
from specforge.metrics import MetricAccumulator
from specforge.runfolder import DamagedFile, RunFolder, check_loop_state
from specforge.weights import read_weights_for, save_weights

if TYPE_CHECKING:
    from specforge.backends import Backend, PendingStep, RunOptions, RunResult, Trainer
    from specforge.tracking import Tracker


#: Steps of each process left out of the images/s in summary.json.
WARMUP_STEPS = 5


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite (exit code 2: the spec's settings caused it)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint was written and the run can be resumed."""


class Pruned(Exception):
    """``RunOptions.after_epoch`` asked to stop (a sweep pruned the trial) after an epoch's
    checkpoint; the run folder holds that epoch's results."""


def run_training(backend: Backend, program: Program, options: RunOptions) -> RunResult:
    """Train ``program`` with ``backend``, writing ``options.run_dir``."""
    from specforge.backends import RunResult

    pipeline = build_pipeline(program, options.spec_dir)
    device = options.device or program.spec.training.device
    # only what was asked for is passed: a backend written before these options still runs
    extra: dict[str, Any] = {"data_parallel": True} if options.data_parallel else {}
    if options.init_weights is not None and not options.resume:
        extra["weights"] = read_weights_for(program.graph, options.init_weights,
                                            "--init-weights")
    trainer = backend.create_trainer(program, device=device, **extra)
    try:
        folder = RunFolder(options.run_dir, backend.checkpoint_name,
                           writes=trainer.writes_run_folder)
        if options.resume:
            if not folder.checkpoint.exists():
                raise UsageError(f"nothing to resume: {folder.checkpoint} does not exist")
        else:
            folder.start(program, backend.name, options.spec_dir, pipeline.train.class_names,
                         options.init_weights)
        loop = Loop(program, pipeline, trainer, folder, options)
        if options.resume:
            loop.resume(trainer.load_checkpoint(folder.checkpoint))
        if folder.writes:
            folder.track(_open_trackers(program, folder, options, loop.step))
        try:
            with _stop_on_signals(loop):
                metrics = loop.run()
        finally:
            folder.close()
    finally:
        trainer.close()
    return RunResult(folder.path, metrics, trainer.writes_run_folder)


def _open_trackers(program: Program, folder: RunFolder, options: RunOptions,
                   step: int) -> Tracker:
    """TensorBoard, and the trackers of `--track` and the spec's ``training.track``."""
    from specforge.tracking import open_trackers

    track = set(options.track)
    if program.spec.training.track:
        track.add(program.spec.training.track)
    spec = program.spec.model_dump(mode="json", exclude_none=True)
    metric_names = ["loss", *(m.label for m in program.spec.metrics)]
    return open_trackers(folder.path, spec, metric_names, tuple(sorted(track)),
                         step if options.resume else None)


@contextlib.contextmanager
def _stop_on_signals(loop: Loop) -> Iterator[None]:
    """Ctrl-C and SIGTERM ask the loop to stop after the current step."""
    def ask_to_stop(signum: int, frame: Any) -> None:
        loop.stop_requested = signal.Signals(signum).name

    previous = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Tally:
    """The loss (the mean over images, batches weighted by their size) and the metrics of
    an epoch's training steps or of an evaluation, batch by batch."""

    def __init__(self, metrics: Any, classes: int) -> None:
        self.metrics = MetricAccumulator(metrics, classes)
        self.loss_sum, self.seen = 0.0, 0

    def add(self, loss: float, logits: np.ndarray, labels: np.ndarray) -> None:
        """Count a batch: its mean loss, its logits and its labels."""
        self.metrics.update(logits, labels)
        self.loss_sum += loss * len(labels)
        self.seen += len(labels)

    def result(self) -> dict[str, float]:
        return {"loss": self.loss_sum / max(self.seen, 1), **self.metrics.result()}


@dataclass(frozen=True)
class StartedStep:
    """A training step the trainer has started, with what the loop logs once it ends."""

    step: int
    labels: np.ndarray
    lr: float
    results: PendingStep
    #: Seconds spent getting the batch (preparing it, or waiting for a worker's).
    data_seconds: float


class TrainingLoop:
    """The steps and epochs of training, as `specforge run` and every exact built script run
    them (a script copies this class): step s takes batch s of ``batches`` and ``lr_at(s)``;
    the next step starts before this one's loss is read, so that a GPU computes while the
    host logs, except across an epoch's end, whose validation needs this step's weights; a
    loss that is not finite stops training; each epoch's loss and metrics are tallied and
    the validation split evaluated. What happens after a step, after an epoch and on a stop
    request is a subclass's (:meth:`step_done`, :meth:`epoch_done`, :meth:`stopped`).

    ``trainer``: ``start_step(x, y, lr)`` starts a step and returns what waits for its loss
    and logits; ``evaluate_batch(x, y)`` gives a batch's loss and logits; and
    ``agree_to_stop(wanted)`` whether the data-parallel processes all stop now."""

    def __init__(self, pipeline: DataPipeline, batches: Any, trainer: Any, optimizer: Any,
                 metrics: Any, classes: int, epochs: int, steps_per_epoch: int,
                 validation_steps: int | None) -> None:
        self.pipeline, self.batches, self.trainer = pipeline, batches, trainer
        self.optimizer, self.metrics, self.classes = optimizer, metrics, classes
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.validation_steps = validation_steps
        self.tally = Tally(metrics, classes)  # this epoch's
        self.step = 0  # global optimizer steps done
        self.stop_requested: str | None = None
        #: Time in training steps (batch, forward, backward, update), for images/s.
        self.train_seconds = 0.0
        self.train_images = 0
        self.data_seconds = 0.0  # of it, getting batches
        self.steps_timed = 0
        self.clock = time.perf_counter()  # when the last step finished

    def train(self) -> None:
        """Train from step :attr:`step` to the last step of the last epoch."""
        total = self.epochs * self.steps_per_epoch
        self.clock = time.perf_counter()
        started: StartedStep | None = None
        while self.step < total:
            started = started or self._start(self.step)
            # Agreed before the next step starts: data-parallel processes must all start
            # (and so all-reduce) the same steps.
            stop = self.trainer.agree_to_stop(self.stop_requested is not None)
            following = None
            if not stop and (self.step + 1) % self.steps_per_epoch:
                following = self._start(self.step + 1)
            self._finish(started)
            started = following
            if self.step % self.steps_per_epoch == 0:
                self._end_epoch()
            if stop:
                self.stopped()

    def _start(self, step: int) -> StartedStep:
        asked = time.perf_counter()
        batch = self.batches.train_batch(step)
        data_seconds = time.perf_counter() - asked
        lr = lr_at(self.optimizer, step, self.steps_per_epoch)
        return StartedStep(step, batch.y, lr, self.trainer.start_step(batch.x, batch.y, lr),
                           data_seconds)

    def _finish(self, started: StartedStep) -> None:
        """Wait for a started step's results and count them in the metrics."""
        loss, logits = started.results()
        epoch = started.step // self.steps_per_epoch
        if not math.isfinite(loss):
            self.step_done(started, loss, 0.0)
            raise TrainingDiverged(
                f"the loss became {loss} at step {started.step} (epoch {epoch + 1}, "
                f"learning rate {started.lr:.3g}); lower the learning rate or add clip_norm")
        self.tally.add(loss, logits, started.labels)
        self.step += 1
        # Steps overlap, so a step's time is the time since the last one finished.
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        self.steps_timed += 1
        if self.steps_timed > WARMUP_STEPS:  # first steps allocate and tune: not throughput
            self.train_seconds += seconds
            self.train_images += len(started.labels)
            self.data_seconds += started.data_seconds
        self.step_done(started, loss, seconds)

    @property
    def epoch(self) -> int:
        """The 0-based epoch of the last step done (at an epoch's end: the one ending)."""
        return max(self.step - 1, 0) // self.steps_per_epoch

    def _end_epoch(self) -> None:
        record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step,
                                  **self.tally.result()}
        validation = self.evaluate("validation")
        record.update({f"val_{k}": v for k, v in validation.items()})
        self.tally = Tally(self.metrics, self.classes)  # before a checkpoint saves it
        self.epoch_done(record)
        self.clock = time.perf_counter()  # evaluation is not training time

    def evaluate(self, split: str) -> dict[str, float]:
        limit = self.validation_steps if split == "validation" else None
        return evaluate_split(self.pipeline, split, self.trainer.evaluate_batch, self.metrics,
                              self.classes, limit)

    def step_done(self, started: StartedStep, loss: float, seconds: float) -> None:
        """After each step (and before stopping on a loss that is not finite)."""

    def epoch_done(self, record: dict[str, Any]) -> None:
        """After each epoch: ``record`` holds its loss, metrics and validation results."""

    def stopped(self) -> None:
        """A stop was asked for (:attr:`stop_requested`) and agreed; the last step is done."""
        raise KeyboardInterrupt(self.stop_requested)


class Loop(TrainingLoop):
    """The training loop of `specforge run`: a run folder's logs, progress output,
    checkpoints and resume; its state is what a checkpoint must hold."""

    def __init__(self, program: Program, pipeline: DataPipeline, trainer: Trainer,
                 folder: RunFolder, options: RunOptions) -> None:
        training = program.spec.training
        super().__init__(pipeline, trainer.batch_source(pipeline), trainer, program.optimizer,
                         program.metrics, program.loss.classes, training.epochs,
                         pipeline.steps_per_epoch(training.steps_per_epoch),
                         training.validation_steps)
        self.program, self.folder, self.options = program, folder, options
        self.history: list[dict[str, Any]] = []
        self.progress: Any = None  # while training

    # --- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        metrics = self.tally.metrics
        return {"step": self.step, "loss_sum": self.tally.loss_sum, "seen": self.tally.seen,
                "confusion": metrics.confusion.tolist(),
                "top_k_hits": {str(k): v for k, v in metrics.top_k_hits.items()},
                "count": metrics.count, "history": self.history}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's loop state (checked by :func:`check_loop_state`)."""
        metrics = self.tally.metrics
        try:
            confusion = np.asarray(state["confusion"], np.int64)
            top_k_hits = {int(k): int(v) for k, v in state["top_k_hits"].items()}
        except (ValueError, TypeError, OverflowError):
            confusion = top_k_hits = None
        if confusion is None or confusion.shape != metrics.confusion.shape or \
                top_k_hits is None or top_k_hits.keys() != metrics.top_k_hits.keys() or \
                state["step"] > self.epochs * self.steps_per_epoch:
            raise DamagedFile(self.folder.checkpoint, "its loop state does not fit this "
                              "spec's classes and steps")
        self.step, self.history = state["step"], state["history"]
        self.tally.loss_sum, self.tally.seen = state["loss_sum"], state["seen"]
        metrics.confusion = confusion
        metrics.top_k_hits = top_k_hits
        metrics.count = state["count"]

    def resume(self, state: Any) -> None:
        """Continue from the loop state of the checkpoint the trainer just loaded, the logs
        cut back to it (they may hold steps and epochs logged after it was written)."""
        self.restore(check_loop_state(state, self.folder.checkpoint))
        self.folder.rewind(self.step, self.history)

    def checkpoint(self) -> None:
        self.folder.flush()
        self.trainer.save_checkpoint(self.folder.checkpoint, self.state())

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        total = self.epochs * self.steps_per_epoch
        source = self.batches
        self.batches = prefetched(source, self.pipeline, total, self.trainer.accelerated)
        try:
            with self.folder.progress(self.options, total, self.step) as self.progress:
                self.train()
        finally:
            if isinstance(self.batches, PrefetchedBatches):
                self.batches.close()  # now: no worker outlives the loop, whatever stopped it
            self.batches = source
        test = self.evaluate("test")
        speed = {"train_seconds": self.train_seconds,
                 "train_images_per_second": self.train_images / max(self.train_seconds, 1e-9),
                 "data_wait_share": self.data_seconds / max(self.train_seconds, 1e-9)}
        self.folder.finish(test, self.trainer.device, self.options, speed)
        if self.folder.writes:
            save_weights(self.folder.path / "weights.npz", self.trainer.export_weights())
        return test

    def step_done(self, started: StartedStep, loss: float, seconds: float) -> None:
        epoch = started.step // self.steps_per_epoch
        self.folder.log_step(started.step, epoch, loss, started.lr)
        if math.isfinite(loss):
            self.progress.advance(len(started.labels), seconds, epoch,
                                  self.tally.loss_sum / self.tally.seen, self.tally.metrics,
                                  started.data_seconds)

    def epoch_done(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.folder.log_epoch(record, self.history, self.options)
        self.progress.epoch_done(record)
        due = (self.epoch + 1) % self.program.spec.training.checkpoint_every == 0 or \
            self.step == self.epochs * self.steps_per_epoch
        if due:
            self.checkpoint()
        if self.options.after_epoch is not None and self.options.after_epoch(record):
            if not due:  # stopped here: as resumable as a run stopped by a signal
                self.checkpoint()
            raise Pruned(f"stopped after epoch {record['epoch']} (step {self.step})")

    def stopped(self) -> None:
        self.stop_requested = self.stop_requested or "another process's signal"
        self.checkpoint()
        raise Interrupted(f"stopped by {self.stop_requested} after step {self.step}; "
                          f"checkpoint written to {self.folder.checkpoint}; continue with "
                          f"--resume {self.folder.path}")


def prefetched(source: Any, pipeline: DataPipeline, end: int, accelerated: bool) -> Any:
    """``source`` with its batches prepared ahead in `data.workers` processes (how many
    `auto` means depends on whether an accelerator trains), when it prepares them on the
    host (a backend's device-side source does its own work)."""
    if source is not pipeline and not getattr(source, "host_side", False):
        return source
    workers = resolve_workers(pipeline.data.workers, accelerated)
    if workers == 0:
        return source
    return PrefetchedBatches(source, workers, pipeline.data.prefetch, end)


def evaluate_split(pipeline: Any, split: str, evaluate_batch: Any, metrics: Any,
                   classes: int, limit: int | None = None) -> dict[str, float]:
    """Loss and metrics over a whole split (an empty dict when the split is empty).
    ``evaluate_batch(x, y)`` returns a batch's mean loss and its logits."""
    tally = Tally(metrics, classes)
    for batch in pipeline.eval_batches(split, limit):
        tally.add(*evaluate_batch(batch.x, batch.y), batch.y)
    return tally.result() if tally.seen else {}


def open_trainer(backend: Backend, program: Program, run_dir: Path | None,
                 weights: Mapping[str, np.ndarray] | None = None) -> Trainer:
    """A trainer to evaluate or predict with: from ``weights`` when given, else from the
    last checkpoint of ``run_dir``, else with specforge's initial weights."""
    extra = {"weights": weights} if weights is not None else {}
    trainer = backend.create_trainer(program, device=program.spec.training.device, **extra)
    if weights is None and run_dir is not None:
        trainer.load_checkpoint(RunFolder(run_dir, backend.checkpoint_name).checkpoint)
    return trainer


def evaluate_run(backend: Backend, program: Program, run_dir: Path | None, spec_dir: Path,
                 weights: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """Test metrics of a run's last checkpoint (or of ``weights``: see open_trainer)."""
    trainer = open_trainer(backend, program, run_dir, weights)
    pipeline = build_pipeline(program, spec_dir)
    return evaluate_split(pipeline, "test", trainer.evaluate_batch, program.metrics,
                          program.loss.classes)


def predict_images(backend: Backend, program: Program, run_dir: Path | None,
                   paths: list[Path], weights: Mapping[str, np.ndarray] | None = None,
                   class_names: list[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """(class name, probabilities) per image file, with the run's last checkpoint (or
    ``weights``: see open_trainer); a class without a name is given its number."""
    from specforge.data.folders import decode

    trainer = open_trainer(backend, program, run_dir, weights)
    shape = tuple(program.graph.input.shape)
    images = np.stack([decode(Path(p), shape) for p in paths]).astype(np.float32)
    norm = program.spec.data.normalize if program.spec.data else None
    if norm is not None:
        images = (images * np.float32(norm.scale) - np.asarray(norm.mean, np.float32)) / \
            np.asarray(norm.std, np.float32)
    outputs = trainer.predict(images.astype(np.float32))
    names = class_names or []
    result = []
    for row in outputs:
        k = int(row.argmax()) if len(row) > 1 else int(row[0] > 0.5)
        result.append((names[k] if k < len(names) else str(k), row))
    return result
