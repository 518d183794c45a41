"""`specforge sweep`: parameters checked before any trial, processes sharing one study,
pruning, the best trial's spec, and resuming."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from specforge.backends import RunOptions, load_backend
from specforge.errors import SpecError
from specforge.spec.sweep import parse_expression
from specforge.sweep import Sweeper, make_plan, open_study, write_results, yaml_scalar
from tests.conftest import ROOT
from tests.event_files import check_event_files
from tests.processes import PNG_SIGNATURE, ok, read_jsonl, refused, run_all, sets, specforge

optuna = pytest.importorskip("optuna")

DIGITS = str(ROOT / "specs" / "digits.yaml")
#: 2 epochs of 3 steps
TINY = ["training.epochs=2", "training.steps_per_epoch=3", "data.batch_size=32"]


# --- expressions and checks before any trial -------------------------------------------------

def test_expressions_parse_and_values_round_trip_through_set() -> None:
    assert parse_expression("loguniform(1e-4, 1e-1)").values == (1e-4, 0.1)
    assert parse_expression("int(1, 3)").grid == (1, 2, 3)
    assert parse_expression("choice(32, adam, true)").values == (32, "adam", True)
    assert parse_expression("uniform(0, 1)").grid is None
    for bad in ("loguniform(0, 1)", "uniform(2, 1)", "int(1.5, 3)", "gauss(0, 1)",
                "choice()", "choice([1, 2])"):
        with pytest.raises(ValueError):
            parse_expression(bad)
    for value in (1e-5, 2.5e20, 0.001, 3, "sgd", True):
        assert yaml.safe_load(yaml_scalar(value)) == value


def test_bad_parameters_are_located_errors_before_any_trial(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    fields = run_all(specforge("sweep", DIGITS, "-b", "torch", "--sweep-dir", str(folder),
                               "--param", "optimizer.lr=loguniform(1e-4,1e-1)",
                               "--param", "optimizer.learning_rate=uniform(0.1, 200)",
                               "--param", "data.batch_size=choice(16, 32)"))[0]
    refused(fields, "--param optimizer.lr=loguniform(1e-4,1e-1): error: optimizer.lr: "
                    "unknown field 'lr'", "did you mean 'learning_rate'",
            "--param optimizer.learning_rate=uniform(0.1, 200): error: "
            "optimizer.learning_rate:", "(value 200.0 of uniform(0.1, 200))")
    assert "batch_size" not in fields.stderr
    assert not folder.exists()  # nothing was started


def _plan_problems(spec: str | Path, params: list[str], **options: Any) -> str:
    with pytest.raises(SpecError) as caught:
        make_plan(Path(spec), [], params, options, 2_000_000_000)
    return caught.value.render()


def test_a_sweep_sections_parameters_are_checked_where_they_are_written(
        tmp_path: Path) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"extends: {DIGITS}\n"
                          "sweep:\n"
                          "  params:\n"
                          "    training.epochs: int(1, 200000)\n"
                          "    optimizer.beta1: gauss(0, 1)\n")
    assert f"{sweep_file}:5:22: error: sweep.params.optimizer.beta1: 'gauss(0, 1)' is not " \
        "a search space" in _plan_problems(sweep_file, [])
    sweep_file.write_text(sweep_file.read_text().replace("gauss", "uniform"))
    problems = _plan_problems(sweep_file, [])
    assert f"{sweep_file}:4:22: error: training.epochs:" in problems
    assert "(value 200000 of int(1, 200000))" in problems
    assert "--param optimizer.learning_rate=loguniform(1e-4): error:" in _plan_problems(
        DIGITS, ["optimizer.learning_rate=loguniform(1e-4)"])
    assert "grid search takes choice() and int() values" in _plan_problems(
        DIGITS, ["optimizer.learning_rate=uniform(0.1, 0.2)"], sampler="grid")


# --- several processes on one study ----------------------------------------------------------

def test_two_processes_share_the_trials_of_one_study(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    command = specforge("sweep", DIGITS, "-b", "torch", "--sweep-dir", str(folder),
                        "--trials", "4", "--sampler", "random", "--pruner", "none",
                        "--param", "optimizer.learning_rate=loguniform(1e-3,1e-2)",
                        *sets("training.epochs=1", "training.steps_per_epoch=2",
                              "data.batch_size=16"))
    first, second = run_all(command, command, timeout=600)
    started = [int(n) for r in (ok(first), ok(second))
               for n in re.findall(r"^trial (\d+): optimizer", r.stderr, re.MULTILINE)]
    assert sorted(started) == [0, 1, 2, 3]  # each trial once, between the two processes
    results = json.loads((folder / "results.json").read_text())
    assert [(t["number"], t["state"]) for t in results["trials"]] == \
        [(n, "COMPLETE") for n in range(4)]
    for trial in results["trials"]:
        run_dir = folder / "trials" / f"{trial['number']:04d}"
        assert len(read_jsonl(run_dir / "steps.jsonl")) == 2  # trained once
        spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
        assert spec["optimizer"]["learning_rate"] == trial["params"][
            "optimizer.learning_rate"]
        assert read_jsonl(run_dir / "metrics.jsonl")[-1]["val_accuracy"] == \
            trial["val_accuracy"]
    assert "sweep" not in spec  # a trial's spec is an ordinary spec
    check_event_files(run_dir)  # tracked like any run


# --- a grid in one process: pruning and the best spec ----------------------------------------

def run_sweep(spec: Path, folder: Path, overrides: list[str], params: list[str],
              **options: Any) -> tuple[Any, Any]:
    """What `specforge sweep` does, in this process (torch is imported once)."""
    from rich.console import Console

    plan, program = make_plan(spec, overrides, params, {"sweep_dir": folder, **options},
                              2_000_000_000)
    folder.mkdir(parents=True)
    study = open_study(plan, program.spec.seed)
    run = RunOptions(run_dir=folder, spec_dir=spec.parent, quiet=True)
    Sweeper(plan, load_backend("torch"), run, 2_000_000_000, log=lambda m: None).run(
        study, False)
    write_results(plan, study, 2_000_000_000, Console(file=open(os.devnull, "w")))  # noqa: SIM115
    return plan, study


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> Path:
    """Two useful learning rates, then a hopeless one (1e-9), from a sweep file."""
    tmp = tmp_path_factory.mktemp("grid")
    spec = tmp / "digits_lr.yaml"
    spec.write_text(f"extends: {DIGITS}\n"
                    "sweep:\n"
                    "  params: {optimizer.learning_rate: 'choice(0.01, 0.003, 1e-9)'}\n"
                    "  sampler: grid\n"
                    "  startup_trials: 2\n")
    run_sweep(spec, tmp / "sweep", TINY, [])
    return tmp / "sweep"


def test_a_hopeless_trial_is_pruned_after_its_first_epoch(grid_sweep: Path) -> None:
    results = json.loads((grid_sweep / "results.json").read_text())
    assert [(t["params"]["optimizer.learning_rate"], t["state"]) for t in results["trials"]] \
        == [(0.01, "COMPLETE"), (0.003, "COMPLETE"), (1e-9, "PRUNED")]
    pruned = grid_sweep / "trials" / "0002"
    assert [r["epoch"] for r in read_jsonl(pruned / "metrics.jsonl")] == [1]
    assert len(read_jsonl(pruned / "steps.jsonl")) == 3
    assert not (pruned / "summary.json").exists()
    assert (grid_sweep / "plot.png").read_bytes().startswith(PNG_SIGNATURE)


def test_the_best_spec_reruns_to_the_best_trials_metric(grid_sweep: Path) -> None:
    results = json.loads((grid_sweep / "results.json").read_text())
    best = results["best"]
    assert best["value"] == max(t["val_accuracy"] for t in results["trials"]
                                if t["state"] == "COMPLETE")
    spec = yaml.safe_load((grid_sweep / "best.yaml").read_text())
    assert spec["optimizer"]["learning_rate"] == best["params"]["optimizer.learning_rate"]
    assert "sweep" not in spec
    from specforge.compiler import compile_spec

    run_dir = grid_sweep.parent / "rerun"
    load_backend("torch").run(compile_spec(grid_sweep / "best.yaml"),
                              RunOptions(run_dir=run_dir, spec_dir=grid_sweep, quiet=True))
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["val_accuracy"] == best["value"]


# --- resume ----------------------------------------------------------------------------------

class RecordingBackend:
    """Stands for a backend: each run logs one epoch, and the calls are kept."""

    checkpoint_name = "checkpoint.bin"

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def run(self, program: Any, options: RunOptions) -> None:
        self.calls.append((options.run_dir.name, options.resume))
        options.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"epoch": 1, "step": 1, "val_accuracy": 0.5}
        (options.run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        assert options.after_epoch is not None and not options.after_epoch(record)


def test_resume_continues_this_machines_interrupted_trials(tmp_path: Path) -> None:
    from specforge.sweep import _owner, _take_waiting

    plan, program = make_plan(Path(DIGITS), [], ["optimizer.learning_rate=uniform(0.001, 0.01)"],
                              {"sweep_dir": tmp_path, "trials": 4, "sampler": "random"},
                              2_000_000_000)
    study = open_study(plan, program.spec.seed)
    gone = subprocess.Popen(["true"])
    gone.wait()
    killed, elsewhere, live = (_take_waiting(study) for _ in range(3))
    killed.set_user_attr("owner", f"{_owner().rpartition(':')[0]}:{gone.pid}")
    (tmp_path / "trials" / "0000").mkdir(parents=True)
    (tmp_path / "trials" / "0000" / "checkpoint.bin").write_bytes(b"")
    elsewhere.set_user_attr("owner", "another-machine:1")
    live.set_user_attr("owner", _owner())  # this process: still running
    backend = RecordingBackend()
    sweeper = Sweeper(plan, backend, RunOptions(run_dir=tmp_path), 2_000_000_000,
                      log=lambda m: None)
    sweeper.run(study, resume=False)
    assert backend.calls == [("0003", False)]  # the waiting trial only
    sweeper.run(study, resume=True)
    assert backend.calls == [("0003", False), ("0000", True)]  # from its checkpoint
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "RUNNING", "RUNNING", "COMPLETE"]
    # the same trial, with the values drawn for it when the study was made
    assert study.trials[0].params == study.trials[0].system_attrs["fixed_params"]


# --- the README's commands -------------------------------------------------------------------

def readme_commands() -> list[str]:
    """The command block of the README's "Tracking and sweeps" section."""
    section = (ROOT / "README.md").read_text().split("## Tracking and sweeps")[1]
    return re.findall(r"```sh\n(.+?)\n```", section.split("\n## ")[0], re.DOTALL)[0] \
        .splitlines()


def test_the_readmes_tracking_and_sweep_commands_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `specforge` command as written (shortened: 1 epoch of 2 steps, 2 trials), from
    a fresh folder; then what `tensorboard --logdir runs/` would load."""
    import shlex

    from typer.testing import CliRunner

    from specforge.cli import app

    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    commands = readme_commands()
    shorter = sets("training.epochs=1", "training.steps_per_epoch=2")
    for command in commands:
        words = shlex.split(command)
        if words[0] != "specforge":
            continue
        args = [str(ROOT / w) if w.startswith("specs/") else w for w in words[1:]]
        extra = ["--quiet"] if args[0] == "run" else ["--trials", "2"]
        result = CliRunner().invoke(app, [*args, *shorter, *extra])
        assert result.exit_code == 0, (command, result.output, result.exception)
    assert commands[1] == "tensorboard --logdir runs/"
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    found = EventMultiplexer().AddRunsFromDirectory("runs/")
    found.Reload()
    assert len(found.Tensors("digits", "step/loss")) == 2
    assert (tmp_path / "mlruns").is_dir()
    for folder, params in (("digits", {"optimizer.learning_rate", "data.batch_size"}),
                           ("digits_lr", {"optimizer.learning_rate", "data.batch_size"})):
        results = json.loads((tmp_path / "sweeps" / folder / "results.json").read_text())
        assert [t["state"] for t in results["trials"]] == ["COMPLETE", "COMPLETE"]
        assert set(results["trials"][0]["params"]) == params
        assert (tmp_path / "sweeps" / folder / "best.yaml").exists()


@pytest.mark.slow
def test_an_interrupted_sweep_continues_with_resume(tmp_path: Path) -> None:
    """SIGTERM in trial 1's second epoch: exit code 130; `--resume` continues trial 1 from
    its checkpoint to the metric an uninterrupted run of its spec reaches, then trial 2."""
    from tests.processes import ENV, stop_after_steps

    folder = tmp_path / "sweep"
    command = specforge("sweep", DIGITS, "-b", "torch", "--sweep-dir", str(folder),
                        "--trials", "3", "--sampler", "random", "--pruner", "none",
                        "--param", "optimizer.learning_rate=loguniform(1e-3,1e-2)",
                        *sets("training.epochs=3", "training.steps_per_epoch=5",
                              "data.batch_size=16"))
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    stderr = stop_after_steps(process, folder / "trials" / "0001" / "steps.jsonl", count=7)
    assert process.returncode == 130, stderr
    assert "continue the sweep with the same command and --resume" in stderr
    assert not (folder / "trials" / "0002").exists()
    resumed = ok(run_all([*command, "--resume"], timeout=600)[0])
    assert "trial 1: continuing" in resumed.stderr
    results = json.loads((folder / "results.json").read_text())
    assert [t["state"] for t in results["trials"]] == ["COMPLETE"] * 3
    trial = folder / "trials" / "0001"
    assert [r["epoch"] for r in read_jsonl(trial / "metrics.jsonl")] == [1, 2, 3]
    fresh = tmp_path / "fresh"
    ok(run_all(specforge("run", str(trial / "spec.yaml"), "-b", "torch", "--run-dir",
                         str(fresh), "--quiet"))[0])
    assert read_jsonl(fresh / "metrics.jsonl")[-1]["val_accuracy"] == \
        results["trials"][1]["val_accuracy"]


def test_best_yaml_reads_the_sweeps_data_from_the_sweep_folder(tmp_path: Path) -> None:
    """best.yaml lives in the sweep folder: its relative data paths are rebased there, so
    that `specforge run sweep/best.yaml` reads the images the sweep's spec read."""
    from specforge.sweep import rebase_data_paths

    spec_dir, folder = tmp_path / "project", tmp_path / "sweeps" / "s1"
    (spec_dir / "images" / "train").mkdir(parents=True)
    folder.mkdir(parents=True)
    spec = {"data": {"source": {"type": "image_folder", "train": "images/train",
                                "test": str(tmp_path / "elsewhere")}}}
    rebased = rebase_data_paths(spec, spec_dir, folder)["data"]["source"]
    assert (folder / rebased["train"]).resolve() == (spec_dir / "images" / "train").resolve()
    assert rebased["train"] != "images/train"
    assert rebased["test"] == str(tmp_path / "elsewhere")  # absolute: as written
    assert rebase_data_paths({"data": {"source": {"type": "digits"}}}, spec_dir, folder) == \
        {"data": {"source": {"type": "digits"}}}
