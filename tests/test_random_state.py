"""specforge's library code leaves the caller's random generators alone.

A program that seeds NumPy, Python's `random`, torch, TensorFlow or Keras and then calls
specforge (loads a model, trains in-process, runs a conformance case) draws afterwards what
it would have drawn without the call: specforge seeds only generators it owns. Each test
seeds every global generator, draws a reference, seeds again, calls specforge and draws
again. (Built scripts are programs, not libraries: they seed globals, and are not tested
here.)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The same Keras backend as the other tests (tests/processes.py): TensorFlow when installed.
if importlib.util.find_spec("tensorflow") is None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

from specforge.backends import RunOptions, load_backend  # noqa: E402
from specforge.compiler import compile_text  # noqa: E402
from tests.conftest import SPECS  # noqa: E402

HAS_TF = importlib.util.find_spec("tensorflow") is not None
SEED = 123

#: A tiny spec on synthetic data with a dropout (dropout is what draws while training).
TINY = """\
name: tiny
seed: 5
model:
  input: [8, 8, 1]
  layers:
    - {type: conv2d, filters: 4, kernel: 3, activation: relu}
    - {type: flatten}
    - {type: dropout, rate: 0.5}
    - {type: dense, units: 3, activation: softmax}
loss: {type: cross_entropy}
optimizer: {type: sgd, learning_rate: 0.01}
data:
  source: {type: synthetic, samples: 48, classes: 3}
  batch_size: 8
training: {epochs: 1, steps_per_epoch: 3}
"""


def seed_everything() -> None:
    """What a calling program does: seed every global generator it uses."""
    keras.utils.set_random_seed(SEED)  # random, NumPy, TensorFlow, Keras's SeedGenerator
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    if HAS_TF:
        import tensorflow as tf

        tf.random.set_seed(SEED)


def draws() -> dict[str, Any]:
    """The next values of each global generator (and torch's state before drawing)."""
    out: dict[str, Any] = {"torch state": torch.random.get_rng_state().tolist()[:64]}
    out["numpy"] = np.random.rand(3).tolist()
    out["random"] = [random.random() for _ in range(3)]
    out["torch"] = torch.rand(3).tolist()
    if HAS_TF:
        import tensorflow as tf

        out["tensorflow"] = tf.random.uniform([3]).numpy().tolist()
    out["keras"] = keras.ops.convert_to_numpy(keras.random.uniform((3,))).tolist()
    return out


def check_untouched(call: Callable[[], object]) -> None:
    """The global generators draw the same after ``call()`` as without it."""
    seed_everything()
    reference = draws()
    seed_everything()
    call()
    after = draws()
    changed = sorted(k for k in reference if reference[k] != after[k])
    assert not changed, f"specforge changed the caller's random state: {changed}"


def test_keras_load_model_leaves_global_random_state_alone():
    from specforge_keras import load_model

    check_untouched(lambda: load_model(SPECS / "cifar.yaml"))


def test_torch_load_model_leaves_global_random_state_alone():
    from specforge_torch import load_model

    check_untouched(lambda: load_model(SPECS / "cifar.yaml"))


@pytest.mark.parametrize("backend", ["torch", "keras"])
def test_an_in_process_run_leaves_global_random_state_alone(backend: str, tmp_path: Path):
    program = compile_text(TINY, "<tiny>")
    runs = iter(range(2))

    def run() -> None:
        options = RunOptions(run_dir=tmp_path / f"run{next(runs)}", quiet=True)
        load_backend(backend).run(program, options)

    check_untouched(run)


def test_a_conformance_case_leaves_global_random_state_alone():
    from specforge.conformance.suite import CASES, run_case

    case = dataclasses.replace(next(c for c in CASES if c.name == "dropout"), steps=2)
    check_untouched(lambda: run_case(case, ["torch", "keras"]))
