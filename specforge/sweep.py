"""`specforge sweep`: hyperparameter search on Optuna.

Optuna does the searching: its samplers (TPE by default, random, or a grid enqueued trial by
trial), its median pruner fed by the loop after each epoch, and its storage, a SQLite file in
the sweep folder by default or any RDB URL (``--storage``), through which several `specforge
sweep` processes on several machines share one study. When a study is created, its N trials
are enqueued at once; each process takes the next waiting one, in a transaction, so no trial
runs twice and the processes stop together after N.

Each trial is an ordinary run folder, ``<sweep folder>/trials/<number>``, made from the spec
with its parameters set as by ``--set``. A trial whose process died stays RUNNING in the
study; ``--resume`` continues those of this machine from their last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from specforge.atomic import write_atomically
from specforge.errors import Location, Problem, SpecError, UsageError, valid_choices_hint
from specforge.spec.sweep import SearchSpace, Sweep, parse_expression

if TYPE_CHECKING:
    from specforge.backends import Backend, RunOptions
    from specforge.ir.program import Program

#: Trials when neither the spec nor --trials says (grid search: every combination).
DEFAULT_TRIALS = 20
#: How long a process joining a study waits for the process creating it to enqueue its trials.
JOIN_SECONDS = 120.0
#: Study attribute holding the sweep's definition: processes must agree on it to share.
DEFINITION_ATTR = "specforge.sweep"


@dataclass(frozen=True)
class Param:
    """One searched field: its path, its expression, its space and where it was written."""

    path: str
    expression: str
    space: SearchSpace
    origin: Location


@dataclass
class Plan:
    """A sweep, resolved from the spec's `sweep:` section and the command line."""

    spec: Path
    overrides: list[str]
    params: list[Param]
    trials: int
    metric: str
    direction: str
    sampler: str
    pruner: str
    startup_trials: int
    warmup_epochs: int
    folder: Path
    storage: str
    study_name: str
    extra: dict[str, Any] = field(default_factory=dict)

    def definition(self) -> dict[str, Any]:
        """What processes sharing the study must agree on."""
        return {"params": {p.path: p.expression for p in self.params}, "trials": self.trials,
                "metric": self.metric, "direction": self.direction, "sampler": self.sampler,
                "overrides": self.overrides}


def yaml_scalar(value: Any) -> str:
    """A value as `--set` reads it back (YAML 1.1 reads ``1e-05`` as a string)."""
    if isinstance(value, float) and "e" in repr(value):
        mantissa, exponent = repr(value).split("e")
        mantissa += "" if "." in mantissa else ".0"
        return f"{mantissa}e{exponent if exponent[0] in '+-' else '+' + exponent}"
    return json.dumps(value)


def cli_params(raw: Sequence[str]) -> list[Param]:
    """``--param path=expression`` options; a located error for each malformed one."""
    params, problems = [], []
    for text in raw:
        where = Location(f"--param {text}")
        path, sep, expression = text.partition("=")
        if not sep or not path.strip():
            problems.append(Problem("a parameter must look like path.to.field=EXPRESSION",
                                    where, hint="e.g. --param "
                                                "optimizer.learning_rate='loguniform(1e-4,1e-1)'"))
            continue
        try:
            params.append(Param(path.strip(), expression, parse_expression(expression), where))
        except ValueError as exc:
            problems.append(Problem(str(exc), where))
    if problems:
        raise SpecError(problems)
    return params


def spec_params(section: Sweep, loaded: Any) -> list[Param]:
    """The `sweep.params` of a spec, each located at its line."""
    return [Param(path, expression, parse_expression(expression),
                  loaded.sources.locate(("sweep", "params", path)) or Location(loaded.file))
            for path, expression in section.params.items()]


def trial_overrides(plan: Plan, values: dict[str, Any]) -> list[str]:
    """The `--set` options of a trial: the sweep's own, no `sweep:` section, the values."""
    return [*plan.overrides, "sweep=", *(f"{path}={yaml_scalar(v)}" for path, v in
                                         values.items())]


def check_params(plan: Plan, max_params: int) -> None:
    """Compile the spec with every value that stands for each parameter's space (its bounds,
    its choices), so that a bad field or value is a located error before any trial."""
    from specforge.compiler import compile_spec

    problems: list[Problem] = []
    for param in plan.params:
        for value in param.space.values:
            override = f"{param.path}={yaml_scalar(value)}"
            try:
                compile_spec(plan.spec, trial_overrides(plan, {param.path: value}),
                             max_params=max_params)
            except SpecError as exc:
                for problem in exc.problems:
                    if problem.location == Location(f"--set {override}"):
                        problem = replace(problem, location=param.origin,
                                          message=f"{problem.message} (value {value!r} of "
                                                  f"{param.expression})")
                    if problem not in problems:
                        problems.append(problem)
    if problems:
        raise SpecError(problems)


def metric_names(program: Program) -> list[str]:
    """The names an epoch's record can hold: loss and each metric, train and validation."""
    names = ["loss", *(m.label for m in program.spec.metrics)]
    return [*names, *(f"val_{n}" for n in names)]


def check_metric(plan: Plan, program: Program) -> None:
    names = metric_names(program)
    if plan.metric not in names:
        raise UsageError(f"--metric {plan.metric!r}: "
                         f"{valid_choices_hint(plan.metric, names, 'this spec logs')}")


# --- the study -------------------------------------------------------------------------------

#: Attempts at opening the storage: processes starting together race to create its tables.
STORAGE_ATTEMPTS = 5


def _storage(url: str) -> Any:
    import optuna
    import sqlalchemy.exc

    # SQLite locks the whole file while one process writes: wait for it rather than fail
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except sqlalchemy.exc.SQLAlchemyError:
            # another process created the tables first (its version row clashes with
            # ours): they exist now
            if attempt == STORAGE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _sampler_and_pruner(plan: Plan) -> tuple[Any, Any]:
    import optuna

    # random and grid trials are drawn when the study is made (and enqueued): any sampler
    # then only returns the enqueued values
    sampler = optuna.samplers.TPESampler() if plan.sampler == "tpe" else \
        optuna.samplers.RandomSampler()
    pruner = optuna.pruners.MedianPruner(n_startup_trials=plan.startup_trials,
                                         n_warmup_steps=plan.warmup_epochs) \
        if plan.pruner == "median" else optuna.pruners.NopPruner()
    return sampler, pruner


def planned_trials(plan: Plan, seed: int) -> list[dict[str, Any]]:
    """The enqueued parameters of each trial: every combination (grid), values drawn with the
    spec's seed (random), or none, left to TPE when the trial starts."""
    import itertools

    import numpy as np

    if plan.sampler == "grid":
        grids = [p.space.grid or () for p in plan.params]
        combos = [dict(zip((p.path for p in plan.params), c, strict=True))
                  for c in itertools.product(*grids)]
        return combos[:plan.trials]
    if plan.sampler == "tpe":
        return [{} for _ in range(plan.trials)]
    rng = np.random.default_rng(seed)
    return [{p.path: _draw(p.space, rng) for p in plan.params} for _ in range(plan.trials)]


def _draw(space: SearchSpace, rng: Any) -> Any:
    import math

    low, high = space.values[0], space.values[-1]
    if space.kind == "uniform":
        return float(rng.uniform(low, high))
    if space.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if space.kind == "int":
        return int(rng.integers(low, high + 1))
    return space.values[int(rng.integers(len(space.values)))]


def open_study(plan: Plan, seed: int) -> Any:
    """Create the study with its trials enqueued, or join the one of the same definition."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(plan.storage)
    sampler, pruner = _sampler_and_pruner(plan)
    try:
        study = optuna.create_study(storage=storage, study_name=plan.study_name,
                                    sampler=sampler, pruner=pruner, direction=plan.direction)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=plan.study_name, storage=storage,
                                  sampler=sampler, pruner=pruner)
        _check_definition(study, plan)
        return study
    for params in planned_trials(plan, seed):
        study.enqueue_trial(params)
    study.set_user_attr(DEFINITION_ATTR, plan.definition())  # last: the study is ready
    return study


def _check_definition(study: Any, plan: Plan) -> None:
    deadline = time.monotonic() + JOIN_SECONDS
    while DEFINITION_ATTR not in study.user_attrs:  # its creator is enqueuing the trials
        if time.monotonic() > deadline:
            raise UsageError(f"the study {plan.study_name!r} in {plan.storage} has no "
                             "specforge sweep definition: choose another --study-name")
        time.sleep(0.2)
    theirs = study.user_attrs[DEFINITION_ATTR]
    if theirs != plan.definition():
        differ = sorted(k for k in theirs if theirs[k] != plan.definition().get(k))
        raise UsageError(f"the study {plan.study_name!r} in {plan.storage} is another sweep "
                         f"(it differs in {', '.join(differ)}): use its definition, or another "
                         "--sweep-dir / --study-name")


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _orphaned(frozen: Any) -> bool:
    """A RUNNING trial of this machine whose process is gone."""
    host, _, pid = str(frozen.user_attrs.get("owner", ":")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process
        return False
    return False


def _take_waiting(study: Any) -> Any:
    """The next enqueued trial, made RUNNING by this process, or None when none is left.
    (What `Study.ask` does first; ask would go on to create a trial beyond the N.)"""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return optuna.trial.Trial(study, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process took it and finished it already
    return None


# --- trials ----------------------------------------------------------------------------------

def _suggest(trial: Any, param: Param) -> Any:
    low, high = param.space.values[0], param.space.values[-1]
    if param.space.kind == "choice":
        return trial.suggest_categorical(param.path, list(param.space.values))
    if param.space.kind == "int":
        return trial.suggest_int(param.path, low, high)
    return trial.suggest_float(param.path, low, high, log=param.space.kind == "loguniform")


@dataclass
class Sweeper:
    """Runs a plan's trials in this process, with a backend and `specforge run`'s options."""

    plan: Plan
    backend: Backend
    options: RunOptions
    max_params: int
    log: Any = print

    def run(self, study: Any, resume: bool) -> None:
        """Continue this machine's orphaned trials (with ``resume``), then take waiting trials
        until none is left."""
        from optuna.trial import TrialState

        if resume:
            for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if _orphaned(frozen):
                    import optuna

                    self.log(f"trial {frozen.number}: continuing")
                    self.run_trial(study, optuna.trial.Trial(study, frozen._trial_id), True)
        while (trial := _take_waiting(study)) is not None:
            self.run_trial(study, trial, False)

    def run_dir(self, number: int) -> Path:
        return self.plan.folder / "trials" / f"{number:04d}"

    def run_trial(self, study: Any, trial: Any, resume: bool) -> None:
        from optuna.trial import TrialState

        from specforge.compiler import compile_spec
        from specforge.runner import Pruned, TrainingDiverged

        plan = self.plan
        trial.set_user_attr("owner", _owner())
        values = {p.path: _suggest(trial, p) for p in plan.params}
        run_dir = self.run_dir(trial.number)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        if resume and not (run_dir / self.backend.checkpoint_name).exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # died before its first checkpoint
            resume = False
        options = replace(self.options, run_dir=run_dir, resume=resume,
                          after_epoch=lambda record: self._report(trial, record))
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in values.items())
        self.log(f"trial {trial.number}: {shown}")
        try:
            # each value was checked alone; a combination can still fail (shapes, say)
            program = compile_spec(plan.spec, trial_overrides(plan, values),
                                   max_params=self.max_params)
            self.backend.run(program, options)
        except Pruned as stopped:
            study.tell(trial, state=TrialState.PRUNED)
            self.log(f"trial {trial.number}: pruned, {stopped}")
            return
        except (TrainingDiverged, SpecError) as exc:  # a bad corner of the space
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=TrialState.FAIL)
            self.log(f"trial {trial.number}: failed: {exc}")
            return
        value = _last_epoch(run_dir)[plan.metric]
        study.tell(trial, value)
        self.log(f"trial {trial.number}: {plan.metric} {value:.4f}")

    def _report(self, trial: Any, record: dict[str, Any]) -> bool:
        """After each epoch: give the pruner the metric; True stops the trial."""
        if self.plan.metric not in record:
            raise UsageError(f"--metric {self.plan.metric}: the epochs log "
                             f"{', '.join(k for k in record if k not in ('epoch', 'step'))} "
                             "(no validation split gives no val_ metrics)")
        trial.report(float(record[self.plan.metric]), record["epoch"])
        return bool(trial.should_prune())


def _last_epoch(run_dir: Path) -> dict[str, Any]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return json.loads(lines[-1])


# --- results ---------------------------------------------------------------------------------

def trial_rows(plan: Plan, study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, metric, params, seconds, run folder."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.value is not None else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values
            else None)
        rows.append({"number": t.number, "state": t.state.name, plan.metric: value,
                     "params": dict(t.params),
                     "seconds": t.duration.total_seconds() if t.duration else None,
                     "run_dir": t.user_attrs.get("run_dir")})
    return rows


def print_table(plan: Plan, rows: list[dict[str, Any]], best: int | None, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"sweep {plan.study_name}: {plan.direction} {plan.metric}")
    for column in ("trial", *(p.path for p in plan.params), plan.metric, "state", "time"):
        table.add_column(column, justify="left" if column == "state" else "right")
    for row in rows:
        params = [_shown(row["params"].get(p.path)) for p in plan.params]
        value = row[plan.metric]
        seconds = row["seconds"]
        table.add_row(f"{row['number']}{' *' if row['number'] == best else ''}", *params,
                      "" if value is None else f"{value:.4f}", row["state"].lower(),
                      "" if seconds is None else f"{seconds:.1f} s")
    console.print(table)


def _shown(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_results(plan: Plan, study: Any, max_params: int, console: Any) -> list[Path]:
    """Print the table of trials; write results.json, best.yaml (the best trial's resolved
    spec) and plot.png into the sweep folder. Returns the files written."""
    from optuna.trial import TrialState

    from specforge.compiler import load_spec

    rows = trial_rows(plan, study)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = study.best_trial if complete else None
    print_table(plan, rows, best.number if best else None, console)
    written = [plan.folder / "results.json"]
    summary = {"metric": plan.metric, "direction": plan.direction, "trials": rows,
               "best": None if best is None else {"number": best.number, "value": best.value,
                                                   "params": best.params}}
    write_atomically(written[0], json.dumps(summary, indent=2))
    if best is not None:
        _, spec = load_spec(plan.spec, trial_overrides(plan, best.params))
        dumped = rebase_data_paths(spec.model_dump(mode="json", exclude_none=True),
                                   plan.spec.parent, plan.folder)
        text = (f"# the best trial ({best.number}) of sweep {plan.study_name}: {plan.metric} "
                f"{best.value:.6g}\n" + yaml.safe_dump(dumped, sort_keys=False))
        write_atomically(plan.folder / "best.yaml", text)
        written.append(plan.folder / "best.yaml")
    if any(r[plan.metric] is not None for r in rows):
        write_plot(plan.folder / "plot.png", plan, rows)
        written.append(plan.folder / "plot.png")
    return written


#: The fields of a data source that hold paths, read relative to the spec's folder.
SOURCE_PATHS = ("path", "train", "test")


def rebase_data_paths(spec: dict[str, Any], spec_dir: Path, folder: Path) -> dict[str, Any]:
    """``spec`` (a dumped spec) with its data source's relative paths made relative to
    ``folder`` instead of ``spec_dir``: best.yaml, written in the sweep folder, then reads
    the data the sweep's spec reads."""
    source = (spec.get("data") or {}).get("source") or {}
    for key in SOURCE_PATHS:
        value = source.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            source[key] = os.path.relpath(Path(spec_dir).resolve() / value,
                                          Path(folder).resolve())
    return spec


def write_plot(path: Path, plan: Plan, rows: list[dict[str, Any]]) -> None:
    """The metric of each trial against its number (with the best so far) and against each
    parameter, as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r[plan.metric] is not None]
    fig, axes = plt.subplots(1, 1 + len(plan.params), figsize=(4 * (1 + len(plan.params)), 3.2),
                             squeeze=False)
    history = axes[0][0]
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        points = [(r["number"], r[plan.metric]) for r in scored if r["state"] == state]
        if points:
            history.scatter(*zip(*points, strict=True), marker=marker, label=state.lower())
    done = sorted((r["number"], r[plan.metric]) for r in scored if r["state"] == "COMPLETE")
    better = max if plan.direction == "maximize" else min
    best_so_far = [better(v for _, v in done[:i + 1]) for i in range(len(done))]
    if done:
        history.step([n for n, _ in done], best_so_far, where="post", label="best so far")
    history.set_xlabel("trial")
    history.set_ylabel(plan.metric)
    history.set_title("optimisation history")
    history.legend()
    for ax, param in zip(axes[0][1:], plan.params, strict=True):
        xs = [r["params"].get(param.path) for r in scored]
        if param.space.kind == "choice":
            labels = [str(v) for v in param.space.values]
            xs = [labels.index(str(x)) if str(x) in labels else None for x in xs]
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.scatter(xs, [r[plan.metric] for r in scored],
                   c=["tab:blue" if r["state"] == "COMPLETE" else "tab:red" for r in scored])
        if param.space.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(param.path)
        ax.set_title(param.path)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())


# --- the plan --------------------------------------------------------------------------------

def make_plan(spec: Path, overrides: list[str], raw_params: list[str],
              options: dict[str, Any], max_params: int) -> tuple[Plan, Program]:
    """Resolve the sweep from the spec's `sweep:` section and the command line (which wins),
    and check every parameter against the spec: all before any trial starts."""
    from specforge.compiler import compile_spec, load_spec

    loaded, model = load_spec(spec, overrides)
    section = model.sweep
    params = {p.path: p for p in (spec_params(section, loaded) if section else [])}
    params.update({p.path: p for p in cli_params(raw_params)})
    if not params:
        raise UsageError(f"nothing to sweep in {spec}: add --param PATH=EXPRESSION, or a "
                         "`sweep:` section with params")
    program = compile_spec(spec, [*overrides, "sweep="], max_params=max_params)

    def setting(name: str, default: Any) -> Any:
        given = options.get(name)
        if given is not None:
            return given
        return getattr(section, name) if section and getattr(section, name) is not None \
            else default

    metric = setting("metric", "val_accuracy" if any(
        m.type == "accuracy" for m in model.metrics) else "val_loss")
    sampler = setting("sampler", "tpe")
    folder = Path(options.get("sweep_dir") or Path("sweeps") / spec.stem)
    plan = Plan(spec=spec, overrides=list(overrides), params=list(params.values()),
                trials=0, metric=metric,
                direction=setting("direction", "minimize" if metric.endswith("loss")
                                  else "maximize"),
                sampler=sampler, pruner=setting("pruner", "median"),
                startup_trials=setting("startup_trials", 5),
                warmup_epochs=setting("warmup_epochs", 0), folder=folder,
                storage=options.get("storage") or
                f"sqlite:///{(folder / 'study.db').resolve()}",
                study_name=options.get("study_name") or spec.stem)
    _check_grid(plan)
    plan.trials = setting("trials", _grid_size(plan) if sampler == "grid" else DEFAULT_TRIALS)
    check_metric(plan, program)
    check_params(plan, max_params)
    return plan, program


def _check_grid(plan: Plan) -> None:
    if plan.sampler != "grid":
        return
    problems = [Problem(f"grid search takes choice() and int() values: {p.expression} is a "
                        "continuous range", p.origin, hint="use --sampler tpe or random, or "
                                                           "list the values with choice()")
                for p in plan.params if p.space.grid is None]
    if problems:
        raise SpecError(problems)


def _grid_size(plan: Plan) -> int:
    import math

    return math.prod(len(p.space.grid or ()) for p in plan.params)
