"""specforge's training loop without a framework: a trainer that records what the loop asks
of it, to check that the next step starts before the last one's results are read, and never
across an epoch's end, an evaluation or a checkpoint."""

from __future__ import annotations

import csv
import json
import multiprocessing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from specforge.backends import PendingStep, RunOptions, Trainer
from specforge.compiler import compile_spec
from specforge.data import build_pipeline
from specforge.runfolder import RunFolder
from specforge.runner import Interrupted, Loop
from tests.conftest import SPECS


class RecordingTrainer(Trainer):
    """Counts started and finished steps; every other call notes how many are in flight."""

    def __init__(self, classes: int, stop_when_starting: int | None = None) -> None:
        self.classes = classes
        self.stop_when_starting = stop_when_starting
        self.loop: Loop | None = None
        self.started = self.finished = 0
        self.events: list[tuple[str, int]] = []

    def start_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> PendingStep:
        step = self.started
        self.started += 1
        self.events.append(("start", step))
        if step == self.stop_when_starting and self.loop is not None:
            self.loop.stop_requested = "SIGTERM"  # as the signal handler does

        def results() -> tuple[float, np.ndarray]:
            self.finished += 1
            self.events.append(("finish", step))
            return 1.0 / (step + 1), np.eye(self.classes)[y]
        return results

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        return self.start_step(x, y, lr)()

    def _in_flight(self, what: str) -> None:
        self.events.append((what, self.started - self.finished))

    def evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        self._in_flight("evaluate")
        return 0.5, np.eye(self.classes)[y]

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def export_weights(self) -> dict[str, np.ndarray]:
        self._in_flight("export")
        return {}

    def save_checkpoint(self, path: Path, loop_state: Mapping[str, Any]) -> None:
        self._in_flight("checkpoint")
        self.events.append(("checkpoint_step", loop_state["step"]))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        raise NotImplementedError


def make_loop(tmp_path: Path, stop_when_starting: int | None = None
              ) -> tuple[Loop, RecordingTrainer, RunFolder]:
    program = compile_spec(SPECS / "digits.yaml", [
        "training.epochs=2", "training.steps_per_epoch=3", "data.batch_size=8",
        "data.workers=2"])  # the batches come from worker processes
    pipeline = build_pipeline(program, SPECS)
    trainer = RecordingTrainer(program.loss.classes, stop_when_starting)
    folder = RunFolder(tmp_path / "run", "checkpoint.bin")
    folder.start(program, "recording", SPECS, pipeline.train.class_names)
    options = RunOptions(run_dir=folder.path, spec_dir=SPECS, quiet=True)
    loop = Loop(program, pipeline, trainer, folder, options)
    trainer.loop = loop
    return loop, trainer, folder


def step_log(folder: RunFolder) -> list[int]:
    folder.close()
    lines = (folder.path / "steps.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_the_next_step_starts_before_the_last_ones_results_are_read(tmp_path: Path) -> None:
    loop, trainer, folder = make_loop(tmp_path)
    loop.run()
    events = trainer.events
    order = [e for e in events if e[0] in ("start", "finish")]
    # within an epoch step s+1 starts before s is read; at its end the epoch's last step is
    # read before anything else happens
    assert order == [("start", 0), ("start", 1), ("finish", 0), ("start", 2), ("finish", 1),
                     ("finish", 2), ("start", 3), ("start", 4), ("finish", 3), ("start", 5),
                     ("finish", 4), ("finish", 5)]
    waits = {what: n for what, n in events if what in ("evaluate", "checkpoint", "export")}
    assert waits == {"evaluate": 0, "checkpoint": 0, "export": 0}  # no step in flight
    assert step_log(folder) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("stop_when_starting", [1, 2])
def test_a_stop_finishes_every_started_step_before_the_checkpoint(
        tmp_path: Path, stop_when_starting: int) -> None:
    loop, trainer, folder = make_loop(tmp_path, stop_when_starting)
    with pytest.raises(Interrupted, match=f"after step {stop_when_starting + 1}"):
        loop.run()
    assert ("checkpoint", 0) in trainer.events
    assert ("checkpoint_step", trainer.started) in trainer.events
    assert trainer.started == trainer.finished == stop_when_starting + 1
    assert step_log(folder) == list(range(trainer.started))
    assert not multiprocessing.active_children()  # the data workers stopped with the loop


# --- logs that stay true through a crash ---------------------------------------------------------

class Crash(Exception):
    """Stands for kill -9: the process ends where it is, with no checkpoint."""


class CrashingTrainer(RecordingTrainer):
    """Keeps its checkpoints in memory; crashes while writing the one at ``crash_at_save``
    (its epoch is logged already) or while finishing step ``crash_at_step`` (the steps after
    the last checkpoint are logged)."""

    def __init__(self, classes: int, crash_at_save: int | None = None,
                 crash_at_step: int | None = None) -> None:
        super().__init__(classes)
        self.crash_at_save, self.crash_at_step = crash_at_save, crash_at_step
        self.saved: dict[str, Any] | None = None

    def start_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> PendingStep:
        step, results = self.started, super().start_step(x, y, lr)

        def crashing() -> tuple[float, np.ndarray]:
            if step == self.crash_at_step:
                raise Crash
            return results()
        return crashing

    def save_checkpoint(self, path: Path, loop_state: Mapping[str, Any]) -> None:
        if loop_state["step"] == self.crash_at_save:
            raise Crash
        self.saved = json.loads(json.dumps(loop_state))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        assert self.saved is not None
        return self.saved


@pytest.mark.parametrize(("crash", "steps_logged", "epochs_logged"), [
    ({"crash_at_save": 6}, [0, 1, 2, 3, 4, 5], [1, 2]),
    ({"crash_at_step": 4}, [0, 1, 2, 3], [1]),
], ids=["epoch-logged-before-its-checkpoint", "steps-logged-after-the-checkpoint"])
def test_a_resumed_run_logs_each_step_and_epoch_once(tmp_path: Path, crash: dict,
                                                      steps_logged: list[int],
                                                      epochs_logged: list[int]) -> None:
    loop, _, folder = make_loop(tmp_path)
    trainer = CrashingTrainer(loop.program.loss.classes, **crash)
    loop = Loop(loop.program, loop.pipeline, trainer, folder, loop.options)
    with pytest.raises(Crash):
        loop.run()
    folder.close()  # what a killed process's buffer held may or may not be on disk
    # the crash left logs that the checkpoint (written at step 3) does not hold
    assert step_log(folder) == steps_logged
    assert [json.loads(line)["epoch"] for line in
            (folder.path / "metrics.jsonl").read_text().splitlines()] == epochs_logged
    assert trainer.saved is not None and trainer.saved["step"] == 3

    resumed_folder = RunFolder(folder.path, "checkpoint.bin")
    trainer.crash_at_save = trainer.crash_at_step = None
    resumed = Loop(loop.program, loop.pipeline, trainer, resumed_folder, loop.options)
    resumed.resume(trainer.load_checkpoint(resumed_folder.checkpoint))
    resumed.run()
    assert step_log(resumed_folder) == [0, 1, 2, 3, 4, 5]
    records = [json.loads(line) for line in
               (folder.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    with open(folder.path / "metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]


def test_a_torn_step_log_line_is_dropped_on_resume(tmp_path: Path) -> None:
    loop, _, folder = make_loop(tmp_path)
    loop.run()
    folder.close()
    with open(folder.path / "steps.jsonl", "a") as f:
        f.write('{"step": 6, "ep')  # a kill in the middle of a write
    folder.rewind(6, loop.history)
    assert step_log(folder) == [0, 1, 2, 3, 4, 5]
