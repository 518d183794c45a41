"""Experiment tracking: what a run folder logs is also written for TensorBoard and MLflow.

A :class:`Tracker` receives the same calls as the run folder (each step, each epoch, the
test result, a flush before every checkpoint, the end). :class:`~specforge.runfolder.RunFolder`
forwards them to its trackers, so every backend gets tracking through the shared loop, and a
data-parallel run tracks from rank 0 only (the one process whose run folder writes).

Names, the same in TensorBoard and MLflow: ``step/loss`` and ``step/learning_rate`` per step;
``train/<metric>`` and ``validation/<metric>`` (``loss`` included) per epoch, at the global
step the epoch ended on; ``test/<metric>`` once, at the last step.

Steps are sent at flushes, and a run folder flushes right before each checkpoint: a run
resumed from its checkpoint logs every step once. TensorBoard's own purge (``purge_step``)
hides whatever an earlier, killed process wrote after that checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from specforge.atomic import write_atomically
from specforge.errors import UsageError

#: Trackers besides TensorBoard (which every run folder gets), by `--track` name.
TRACKERS = ("mlflow",)
#: MLflow's limits on a parameter's name and value; longer ones are cut.
MLFLOW_KEY_CHARS, MLFLOW_VALUE_CHARS = 250, 6000
#: Entries in one MLflow log_batch call (its documented maximum for metrics is 1000).
MLFLOW_BATCH = 1000
#: The file in a run folder naming its MLflow run, so that a resumed run logs to the same one.
MLFLOW_RUN_FILE = "mlflow.json"


class Tracker:
    """Receives a run's numbers as the loop produces them; every method does nothing here."""

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """One training step's loss and learning rate (``step`` is 0-based)."""

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """An epoch's row of metrics.jsonl."""

    def log_test(self, test: Mapping[str, float], step: int) -> None:
        """The final test metrics, after ``step`` steps."""

    def flush(self) -> None:
        """Make everything logged so far durable (called before each checkpoint)."""

    def close(self, finished: bool) -> None:
        """The run ends: ``finished`` when it wrote its test result, not when stopped."""


def epoch_scalars(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """An epoch's metrics as (``train/<name>`` or ``validation/<name>``, value)."""
    for key, value in record.items():
        if key in ("epoch", "step"):
            continue
        if key.startswith("val_"):
            yield f"validation/{key[4:]}", float(value)
        else:
            yield f"train/{key}", float(value)


def flat_fields(data: Any, prefix: str = "") -> dict[str, Any]:
    """A resolved spec as ``{"optimizer.learning_rate": 0.002, "model.layers.0.type": ...}``:
    every scalar under its dotted path."""
    if isinstance(data, Mapping):
        items: Iterator[tuple[Any, Any]] = iter(data.items())
    elif isinstance(data, list):
        items = iter(enumerate(data))
    else:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flat_fields(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


#: Sections left out of TensorBoard's HParams table: the model's layers would fill it with
#: columns that never change (spec.yaml and the `spec` text hold them).
NOT_HPARAMS = ("model", "blocks", "name", "description")


def hyperparameters(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's training settings, flattened, for TensorBoard's HParams dashboard."""
    return flat_fields({k: v for k, v in spec.items() if k not in NOT_HPARAMS})


class TensorBoardTracker(Tracker):
    """Event files in the run folder, through tensorboardX (which needs no framework)."""

    def __init__(self, run_dir: Path, spec: Mapping[str, Any], metric_names: list[str],
                 resumed_step: int | None) -> None:
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        # On resume, TensorBoard drops what an earlier process logged from this step on.
        # Event files are named by the second they were opened in; the step they start
        # from keeps a quick resume from overwriting the first file, and sorts after it.
        self.writer = SummaryWriter(str(run_dir), purge_step=resumed_step, flush_secs=30,
                                    filename_suffix=f".{resumed_step or 0:010d}")
        if resumed_step is not None:
            return  # the spec and hyperparameters are in the first process's event file
        self.writer.add_text("spec", _as_markdown_code(spec), 0)
        tags = [f"{split}/{name}" for split in ("validation", "test") for name in metric_names]
        experiment, start, self._end = hparams(hyperparameters(spec), dict.fromkeys(tags, 0))
        for summary in (experiment, start):
            # tensorboardX's add_hparams would write them to a second run folder
            self.writer._get_file_writer().add_summary(summary)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("step/loss", loss, step)
        self.writer.add_scalar("step/learning_rate", lr, step)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        for tag, value in epoch_scalars(record):
            self.writer.add_scalar(tag, value, record["step"])

    def log_test(self, test: Mapping[str, float], step: int) -> None:
        for name, value in test.items():
            self.writer.add_scalar(f"test/{name}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, finished: bool) -> None:
        if finished and hasattr(self, "_end"):
            self.writer._get_file_writer().add_summary(self._end)
        self.writer.close()


def _as_markdown_code(spec: Mapping[str, Any]) -> str:
    """TensorBoard renders text as markdown: indent the YAML so that it shows verbatim."""
    import yaml

    text = yaml.safe_dump(dict(spec), sort_keys=False)
    return "\n".join("    " + line for line in text.splitlines())


def require_mlflow() -> None:
    """Exit with a clear message (code 2) before training when MLflow is missing."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UsageError("--track mlflow needs MLflow: pip install 'specforge[mlflow]'"
                         ) from None


def mlflow_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or a local ``mlruns/`` folder (MLflow's file store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    # MLflow 3 keeps its file store but refuses it unless asked: mlruns/ is what
    # `mlflow ui` reads by default and needs no database.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path("mlruns").resolve().as_uri()


class MLflowTracker(Tracker):
    """One MLflow run per run folder: the spec's fields as params, the metrics, and at the end
    the run folder as artifacts. Steps are sent in batches, at each flush."""

    def __init__(self, run_dir: Path, spec: Mapping[str, Any], experiment: str,
                 resumed: bool) -> None:
        require_mlflow()
        from mlflow.tracking import MlflowClient

        self.run_dir = run_dir
        self.pending: list[Any] = []
        saved = run_dir / MLFLOW_RUN_FILE
        if resumed and saved.exists():
            known = json.loads(saved.read_text(encoding="utf-8"))
            self.client = MlflowClient(tracking_uri=known["tracking_uri"])
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        uri = mlflow_tracking_uri()
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else \
            self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name,
                                             tags={"specforge.run_dir": str(run_dir.resolve())}
                                             ).info.run_id
        write_atomically(saved, json.dumps({"tracking_uri": uri, "run_id": self.run_id}))
        self._log_params(spec)

    def _log_params(self, spec: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key[:MLFLOW_KEY_CHARS], str(value)[:MLFLOW_VALUE_CHARS])
                  for key, value in flat_fields(spec).items()]
        for start in range(0, len(params), 100):  # log_batch takes 100 params at a time
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def _metric(self, key: str, value: float, step: int) -> None:
        import time

        from mlflow.entities import Metric

        self.pending.append(Metric(key, float(value), int(time.time() * 1000), step))

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self._metric("step/loss", loss, step)
        self._metric("step/learning_rate", lr, step)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        for tag, value in epoch_scalars(record):
            self._metric(tag, value, record["step"])

    def log_test(self, test: Mapping[str, float], step: int) -> None:
        for name, value in test.items():
            self._metric(f"test/{name}", value, step)

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:MLFLOW_BATCH], self.pending[MLFLOW_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, finished: bool) -> None:
        self.flush()
        if finished:
            self.client.log_artifacts(self.run_id, str(self.run_dir))
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


class Trackers(Tracker):
    """Several trackers as one."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_step(self, step: int, loss: float, lr: float) -> None:
        for t in self.trackers:
            t.log_step(step, loss, lr)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_epoch(record)

    def log_test(self, test: Mapping[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_test(test, step)

    def flush(self) -> None:
        for t in self.trackers:
            t.flush()

    def close(self, finished: bool) -> None:
        for t in self.trackers:
            t.close(finished)


def open_trackers(run_dir: Path, spec: Mapping[str, Any], metric_names: list[str],
                  track: tuple[str, ...], resumed_step: int | None) -> Trackers:
    """TensorBoard, and the trackers named in ``track`` (`--track` and ``training.track``)."""
    trackers: list[Tracker] = [TensorBoardTracker(run_dir, spec, metric_names, resumed_step)]
    resumed_in_mlflow = resumed_step is not None and (run_dir / MLFLOW_RUN_FILE).exists()
    if "mlflow" in track or resumed_in_mlflow:
        experiment = str(spec.get("name") or run_dir.name)
        trackers.append(MLflowTracker(run_dir, spec, experiment, resumed_step is not None))
    return Trackers(trackers)
