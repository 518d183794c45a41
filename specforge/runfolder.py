"""A run's folder (logs, metrics, plot, summary) and its progress display."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from specforge import __version__
from specforge.atomic import write_atomically
from specforge.errors import UsageError

if TYPE_CHECKING:
    from specforge.backends import RunOptions
    from specforge.ir.program import Program
    from specforge.tracking import Tracker


class DamagedFile(UsageError):
    """A file of a run folder that is not what specforge wrote there (exit code 2): the
    message names the file and how it is damaged."""

    def __init__(self, path: Path, how: str) -> None:
        super().__init__(f"{path} is damaged: {how}")


#: What a checkpoint's loop state holds (see runner.Loop.state), and the JSON type of each.
LOOP_STATE_FIELDS = {"step": int, "loss_sum": (int, float), "seen": int, "confusion": list,
                     "top_k_hits": dict, "count": int, "history": list}


def check_loop_state(state: Any, path: Path) -> dict[str, Any]:
    """``state`` if it is a loop state as the training loop wrote it into the checkpoint at
    ``path``; else :class:`DamagedFile`."""
    if not isinstance(state, dict):
        raise DamagedFile(path, f"its loop state is a {type(state).__name__}, not a mapping")
    for name, kind in LOOP_STATE_FIELDS.items():
        if name not in state:
            raise DamagedFile(path, f"its loop state lacks {name!r}")
        if not isinstance(state[name], kind) or isinstance(state[name], bool):
            raise DamagedFile(path, f"its loop state's {name!r} is "
                                    f"{type(state[name]).__name__} {state[name]!r:.40}")
    if state["step"] < 0 or not all(isinstance(r, dict) and isinstance(r.get("step"), int)
                                    for r in state["history"]):
        raise DamagedFile(path, "its loop state's step or history is not a training loop's")
    return state


def read_json(path: Path, what: str = "a JSON object") -> dict[str, Any]:
    """A run folder's JSON file, which must hold an object; else :class:`DamagedFile`."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:  # not damage: the caller says what a missing file means
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedFile(path, f"cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DamagedFile(path, f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DamagedFile(path, f"it holds a JSON {type(value).__name__}, not {what}")
    return value


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run folder, checked: the backend's name and the class names."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise UsageError(f"{run_dir} is not a run folder (no run.json)")
    info = read_json(path, "an object with the run's backend")
    if not isinstance(info.get("backend"), str):
        raise DamagedFile(path, "it lacks the backend's name ('backend')")
    names = info.get("class_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DamagedFile(path, "its 'class_names' is not a list of names")
    if not isinstance(info.get("spec_dir", "."), str):
        raise DamagedFile(path, "its 'spec_dir' is not a folder's name")
    return info


def read_saved_spec(run_dir: Path) -> Any:
    """The resolved spec a run folder was started with (plain YAML data)."""
    path = Path(run_dir) / "spec.yaml"
    if not path.exists():
        raise UsageError(f"nothing to resume or evaluate in {run_dir}: it has no spec.yaml")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        # specforge writes it with safe_dump: tags, bad bytes or broken syntax are damage
        raise DamagedFile(path, f"not the plain YAML specforge writes "
                                f"({' '.join(str(exc).split())})") from None


class RunFolder:
    def __init__(self, path: Path, checkpoint_name: str, writes: bool = True) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / checkpoint_name
        #: False in data-parallel processes other than rank 0: they write nothing here
        self.writes = writes
        self._steps: Any = None
        #: TensorBoard, MLflow, ...: told what this folder logs (see :meth:`track`)
        self.trackers: Tracker | None = None
        self._last_step = -1
        self._finished = False

    def start(self, program: Program, backend: str, spec_dir: Path,
              class_names: list[str], init_weights: Path | None = None) -> None:
        """A fresh run: refuses to overwrite an earlier run's results. ``init_weights``:
        the weights file it started from, when not specforge's initial weights."""
        if not self.writes:
            return
        if (self.path / "run.json").exists():
            raise UsageError(f"{self.path} already holds a run: continue it with "
                             f"--resume {self.path}, or choose another --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        spec = program.spec.model_dump(mode="json", exclude_none=True)
        write_atomically(self.path / "spec.yaml", yaml.safe_dump(spec, sort_keys=False))
        write_atomically(self.path / "run.json", json.dumps({
            "backend": backend, "name": program.name, "specforge": __version__,
            "spec_dir": str(Path(spec_dir).resolve()), "class_names": class_names,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"init_weights": str(Path(init_weights).resolve())} if init_weights else {}),
        }, indent=2))
        for name in ("steps.jsonl", "metrics.jsonl", "metrics.csv"):
            (self.path / name).unlink(missing_ok=True)

    def track(self, trackers: Tracker) -> None:
        """Send what this folder logs to ``trackers`` as well (a writing folder only)."""
        if self.writes:
            self.trackers = trackers

    def info(self) -> dict[str, Any]:
        return read_run_info(self.path)

    def log_step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        if not self.writes:
            return
        if self._steps is None:  # kept open: reopening it every step costs throughput
            self._steps = open(self.path / "steps.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._steps.write(json.dumps({"step": step, "epoch": epoch + 1, "loss": loss,
                                      "lr": lr}) + "\n")
        self._last_step = step
        if self.trackers is not None:
            self.trackers.log_step(step, loss, lr)

    def flush(self) -> None:
        """Make the step log durable (before a checkpoint, so the two agree)."""
        if self._steps is not None:
            self._steps.flush()
            os.fsync(self._steps.fileno())
        if self.trackers is not None:
            self.trackers.flush()

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self.trackers is not None:
            trackers, self.trackers = self.trackers, None
            trackers.close(self._finished)

    def log_epoch(self, record: dict[str, Any], history: list[dict[str, Any]],
                  options: RunOptions) -> None:
        if not self.writes:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log_epoch(record)
        self._write_tables(history)
        if options.log_json:
            print(json.dumps({"event": "epoch", **record}), flush=True)

    def _write_tables(self, history: list[dict[str, Any]]) -> None:
        """metrics.csv and plot.png, whole, from every epoch's record (none: no files)."""
        if not history:
            for name in ("metrics.csv", "plot.png"):
                (self.path / name).unlink(missing_ok=True)
            return
        columns = list(dict.fromkeys(k for r in history for k in r))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows(history)
        write_atomically(self.path / "metrics.csv", text.getvalue())
        write_plot(self.path / "plot.png", history)

    def rewind(self, step: int, history: list[dict[str, Any]]) -> None:
        """Cut the logs back to a checkpoint's ``step`` and ``history`` before a resume: a
        run killed after it logged steps or an epoch that its last checkpoint does not hold
        would otherwise log them twice. The checkpoint's history is the truth."""
        if not self.writes:
            return
        steps = self.path / "steps.jsonl"
        kept: list[str] = []
        if steps.exists():
            for line in steps.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    logged = json.loads(line)
                except json.JSONDecodeError:  # the torn last line of a killed run
                    continue
                if isinstance(logged, dict) and isinstance(logged.get("step"), int) and \
                        logged["step"] < step:
                    kept.append(line + "\n")
        write_atomically(steps, "".join(kept))
        write_atomically(self.path / "metrics.jsonl",
                         "".join(json.dumps(record) + "\n" for record in history))
        self._write_tables(history)

    def finish(self, test: dict[str, float], device: str, options: RunOptions,
               speed: dict[str, float]) -> None:
        """Write summary.json; ``speed`` covers this process's steps (after a resume, the
        resumed part only)."""
        if not self.writes:
            return
        summary = {"test": test, "device": device, **speed,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_atomically(self.path / "summary.json", json.dumps(summary, indent=2))
        if self.trackers is not None:
            self.trackers.log_test(test, self._last_step + 1)
        self._finished = True
        if options.log_json:
            print(json.dumps({"event": "test", **test}), flush=True)

    @contextlib.contextmanager
    def progress(self, options: RunOptions, total_steps: int, done: int) -> Iterator[Any]:
        if options.quiet or options.log_json or not self.writes:
            yield _Silent()
            return
        bar = _Bar(total_steps, done)
        with bar.live:
            yield bar


def write_plot(path: Path, history: list[dict[str, Any]]) -> None:
    """Loss and metric curves per epoch (training and validation) as a PNG."""
    try:
        import matplotlib
    except ImportError:  # plotting is optional: the numbers are in metrics.csv
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[0] if k not in ("epoch", "step") and not k.startswith("val_")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    epochs = [r["epoch"] for r in history]
    for ax, key in zip(axes[0], keys, strict=True):
        ax.plot(epochs, [r.get(key) for r in history], marker="o", label="train")
        if any(f"val_{key}" in r for r in history):
            ax.plot(epochs, [r.get(f"val_{key}") for r in history], marker="o",
                    label="validation")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())


class _Silent:
    def advance(self, images: int, seconds: float, epoch: int, loss: float,
                metrics: Any = None, data_seconds: float = 0.0) -> None:
        pass

    def epoch_done(self, record: dict[str, Any]) -> None:
        pass


class _Bar:
    """A rich progress bar: epoch, step, loss, images/s and time left."""

    def __init__(self, total: int, done: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=sys.stderr)
        self.live = Progress(TextColumn("{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                             TimeRemainingColumn(), console=self.console, transient=False)
        self.task = self.live.add_task("training", total=total, completed=done, info="")
        self.images, self.seconds, self.data_seconds = 0, 0.0, 0.0
        self.last_refresh = 0.0

    def advance(self, images: int, seconds: float, epoch: int, loss: float,
                metrics: Any = None, data_seconds: float = 0.0) -> None:
        """Count a finished step of ``seconds``, ``data_seconds`` of which the step waited
        for its batch."""
        self.images += images
        self.seconds += seconds
        self.data_seconds += data_seconds
        now = time.perf_counter()
        info = None
        if now - self.last_refresh > 0.25:  # formatting every step would cost throughput
            rate = self.images / self.seconds if self.seconds else 0.0
            shown = "".join(f"  {k} {v:.4f}" for k, v in (metrics.result() if metrics
                                                           else {}).items())
            waiting = self.data_seconds / self.seconds if self.seconds else 0.0
            info = f"loss {loss:.4f}{shown}  {rate:,.0f} img/s  data wait {waiting:.0%}"
            self.last_refresh = now
        self.live.update(self.task, advance=1, description=f"epoch {epoch + 1}",
                         **({"info": info} if info else {}))

    def epoch_done(self, record: dict[str, Any]) -> None:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in record.items()
                          if k not in ("epoch", "step"))
        self.live.console.print(f"epoch {record['epoch']}: {shown}", highlight=False)
