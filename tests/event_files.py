"""Reading a run folder's TensorBoard event files back with TensorBoard's own reader, and
checking them against the run folder's logs (shared by the backend and tracking tests)."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import yaml

# TensorBoard's reader imports TensorFlow when it can (seconds); its stub reads event files.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


def read_events(run_dir: Path) -> Any:
    """An EventAccumulator over ``run_dir``'s event files, every event kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def close(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Same steps, same values to float32 (event files hold float32)."""
    return len(logged) == len(expected) and all(
        s == t and math.isclose(v, w, rel_tol=1e-6, abs_tol=1e-7)
        for (s, v), (t, w) in zip(logged, expected, strict=True))


def check_event_files(run_dir: Path) -> Any:
    """The event files hold steps.jsonl, metrics.jsonl, summary.json and the spec; returns
    the reader for more checks."""
    events = read_events(run_dir)
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert close(scalars(events, "step/loss"), [(s["step"], s["loss"]) for s in steps])
    assert close(scalars(events, "step/learning_rate"), [(s["step"], s["lr"]) for s in steps])
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in history[0]:
        if key in ("epoch", "step"):
            continue
        tag = f"validation/{key[4:]}" if key.startswith("val_") else f"train/{key}"
        assert close(scalars(events, tag), [(r["step"], r[key]) for r in history]), tag
    test = json.loads((run_dir / "summary.json").read_text())["test"]
    for key, value in test.items():
        assert close(scalars(events, f"test/{key}"), [(len(steps), value)]), key
    text = events.Tensors("spec/text_summary")[0].tensor_proto.string_val[0].decode()
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert yaml.safe_load(textwrap.dedent(text)) == spec
    assert hparams(events)["optimizer.learning_rate"] == spec["optimizer"]["learning_rate"]
    return events


def hparams(events: Any) -> dict[str, Any]:
    """The hyperparameters a run's event files give TensorBoard's HParams dashboard."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    metadata = events.SummaryMetadata("_hparams_/session_start_info")
    assert metadata.plugin_data.plugin_name == "hparams"
    data = HParamsPluginData.FromString(metadata.plugin_data.content)
    return {name: getattr(value, value.WhichOneof("kind"))
            for name, value in data.session_start_info.hparams.items()}
