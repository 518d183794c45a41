"""Tracking: a run's TensorBoard event files and its MLflow run hold what its run folder logs
(read back with TensorBoard's reader and MLflow's client)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from specforge.cli import main
from specforge.runner import Pruned
from specforge.tracking import flat_fields, mlflow_tracking_uri, open_trackers
from tests.conftest import ROOT
from tests.event_files import check_event_files, read_events, scalars
from tests.processes import read_jsonl, sets
from tests.test_runner import make_loop

pytest.importorskip("torch")
pytest.importorskip("mlflow")

DIGITS = str(ROOT / "specs" / "digits.yaml")
TINY = sets("training.epochs=2", "training.steps_per_epoch=3", "data.batch_size=16")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    """A tiny torch run with `training.track: mlflow`, from a folder without MLflow settings
    (it logs to ./mlruns); in this process, which has imported torch already."""
    cwd = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            patch.delenv(name)
        cli(patch, "run", DIGITS, "-b", "torch", "--run-dir", "run", "--quiet", *TINY,
            "--set", "training.track=mlflow")
    return cwd


def cli(patch: pytest.MonkeyPatch, *args: str) -> None:
    """`specforge ARGS` in this process, as its script runs it (SystemExit on errors)."""
    patch.setattr(sys, "argv", ["specforge", *args])
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise


def test_event_files_hold_the_run_folders_logs(tracked_run: Path) -> None:
    events = check_event_files(tracked_run / "run")
    assert len(scalars(events, "step/loss")) == 6
    assert len(list((tracked_run / "run").glob("events.out.tfevents.*"))) == 1


def _client(store: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=store.as_uri())


def test_mlflow_run_holds_the_spec_metrics_and_run_folder(
        tracked_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tracked_run / "run"
    client = _client(tracked_run / "mlruns", monkeypatch)
    (experiment,) = [e for e in client.search_experiments() if e.name == "digits"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    assert run.info.status == "FINISHED"
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert run.data.params == {k: str(v) for k, v in flat_fields(spec).items()}
    assert run.data.params["optimizer.learning_rate"] == "0.002"

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    steps = read_jsonl(run_dir / "steps.jsonl")
    assert history("step/loss") == [(s["step"], s["loss"]) for s in steps]
    assert history("step/learning_rate") == [(s["step"], s["lr"]) for s in steps]
    epochs = read_jsonl(run_dir / "metrics.jsonl")
    assert history("validation/accuracy") == [(r["step"], r["val_accuracy"]) for r in epochs]
    assert history("train/f1_macro") == [(r["step"], r["f1_macro"]) for r in epochs]
    test = json.loads((run_dir / "summary.json").read_text())["test"]
    assert history("test/accuracy") == [(6, test["accuracy"])]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "steps.jsonl", "metrics.jsonl", "summary.json", "weights.npz",
            "checkpoint.pt"} <= artifacts
    assert any(a.startswith("events.out.tfevents.") for a in artifacts)


def test_mlflow_logs_to_its_tracking_uri_or_to_mlruns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_tracking_uri() == (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert mlflow_tracking_uri() == "sqlite:///elsewhere.db"


def test_track_names_and_a_missing_mlflow_are_refused_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    for track, message in (("mlflow", "--track mlflow needs MLflow: pip install "
                                      "'specforge[mlflow]'"),
                           ("mlfow", "--track 'mlfow': did you mean 'mlflow'")):
        with pytest.raises(SystemExit) as stopped:
            cli(monkeypatch, "run", DIGITS, "-b", "torch", "--track", track,
                "--run-dir", str(tmp_path / "run"))
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _resumable_loop(tmp_path: Path, crash_at: int | None) -> Any:
    """A digits loop (2 epochs of 3 steps) whose trainer keeps its checkpoints' loop states
    and can fail when starting a step, as a killed process would stop."""
    loop, trainer, folder = make_loop(tmp_path)
    states: dict[int, Any] = {}
    trainer.save_checkpoint = lambda path, state: states.update({state["step"]: dict(state)})
    if crash_at is not None:
        start = trainer.start_step

        def start_or_crash(x: Any, y: Any, lr: float) -> Any:
            if trainer.started == crash_at:
                raise RuntimeError("killed")
            return start(x, y, lr)
        trainer.start_step = start_or_crash
    return loop, trainer, folder, states


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path: Path) -> None:
    """Killed after logging step 3, resumed from the checkpoint at step 3 (the end of epoch
    1): TensorBoard drops what the first process logged from step 3 on (the resumed
    process's losses differ)."""
    loop, _, folder, states = _resumable_loop(tmp_path, crash_at=5)
    spec = loop.program.spec.model_dump(mode="json", exclude_none=True)
    folder.track(open_trackers(folder.path, spec, ["loss", "accuracy"], (), None))
    with pytest.raises(RuntimeError, match="killed"):
        loop.run()
    folder.close()
    assert [s for s, _ in scalars(read_events(folder.path), "step/loss")] == [0, 1, 2, 3]

    resumed, _, again, _ = _resumable_loop(tmp_path / "second", crash_at=None)
    resumed.folder = again = type(folder)(folder.path, "checkpoint.bin")
    resumed.restore(states[3])
    again.track(open_trackers(folder.path, spec, ["loss", "accuracy"], (), resumed.step))
    resumed.run()
    again.close()
    logged = scalars(read_events(folder.path), "step/loss")
    # the recording trainer's loss is 1 / (steps this process started): the second
    # process's steps 3, 4, 5 are its 1st, 2nd and 3rd
    expected = [(0, 1.0), (1, 1 / 2), (2, 1 / 3), (3, 1.0), (4, 1 / 2), (5, 1 / 3)]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert all(abs(v - w) < 1e-6 for (_, v), (_, w) in zip(logged, expected, strict=True))


def test_after_epoch_stops_the_run_after_that_epochs_checkpoint(tmp_path: Path) -> None:
    loop, trainer, folder = make_loop(tmp_path)
    seen: list[int] = []
    loop.options = type(loop.options)(run_dir=folder.path, quiet=True,
                                      after_epoch=lambda r: seen.append(r["epoch"]) or True)
    with pytest.raises(Pruned, match="after epoch 1"):
        loop.run()
    assert seen == [1]
    assert ("checkpoint_step", 3) in trainer.events and trainer.started == 3
    assert len(read_jsonl(folder.path / "metrics.jsonl")) == 1
