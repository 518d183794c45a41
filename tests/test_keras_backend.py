"""The Keras 3 backend end to end: runs and run folders, two Keras backends against the
PyTorch backend, built scripts, generated/ up to date, resume, evaluate/predict, the Python
API, layer semantics against the PyTorch backend and unreadable checkpoints."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

# Without TensorFlow, Keras runs on torch here (its default backend would fail to import).
if importlib.util.find_spec("tensorflow") is None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from specforge_keras import KerasBackend, load_model  # noqa: E402

from specforge.compiler import compile_spec  # noqa: E402
from specforge.weights import initial_weights, load_weights  # noqa: E402
from tests.conftest import ROOT, SPECS  # noqa: E402
from tests.processes import (  # noqa: E402
    ENV,
    KERAS_BACKEND,
    PNG_SIGNATURE,
    check_both_styles_alone_on_image_folders,
    check_evaluate_and_predict,
    cli,
    cli_here,
    idiomatic_digits_accuracy,
    ok,
    read_jsonl,
    refused,
    run_all,
    sets,
    specforge,
    stop_after_steps,
)

HAS_TF = importlib.util.find_spec("tensorflow") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="tensorflow is not installed")
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

DIGITS = str(SPECS / "digits.yaml")
REGENERATE = ("for s in specs/*.yaml; do specforge build $s -b keras --style exact "
              "-o generated/$(basename $s .yaml)_keras_exact.py; done")


def checkpoint_files(run_dir: Path) -> tuple[set[str], set[str]]:
    """(the files checkpoint.json names, the checkpoint files in the folder)."""
    pointer = json.loads((run_dir / "checkpoint.json").read_text())
    named = {pointer["weights"], pointer["state"]}
    present = {p.name for p in run_dir.iterdir()
               if p.name.lstrip(".").startswith("checkpoint") and p.name != "checkpoint.json"}
    return named, present


# --- 1. a full run of the digits spec ------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """specs/digits.yaml as written (20 epochs), with --quiet."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    ok(cli("run", DIGITS, "--backend", "keras", "--run-dir", str(run_dir), "--quiet"))
    return run_dir


def test_digits_run_reaches_accuracy_and_fills_the_run_folder(digits_run):
    run_dir = digits_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.95, summary
    assert f"keras on {KERAS_BACKEND}" in summary["device"]

    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert spec["name"] == "digits" and spec["training"]["epochs"] == 20
    info = json.loads((run_dir / "run.json").read_text())
    assert info["backend"] == "keras" and info["name"] == "digits"

    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in history] == list(range(1, 21))
    steps_per_epoch = history[0]["step"]
    assert (run_dir / "metrics.csv").read_text().count("\n") == 21  # header and 20 epochs
    steps = read_jsonl(run_dir / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(20 * steps_per_epoch))
    assert all(math.isfinite(s["loss"]) and s["lr"] == 0.002 for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (run_dir / "plot.png").read_bytes().startswith(PNG_SIGNATURE)

    named, present = checkpoint_files(run_dir)
    assert present == named, "only the files checkpoint.json names may remain"
    assert {n.split(".", 1)[1] for n in named} == {"weights.h5", "state.npz"}
    assert all((run_dir / n).stat().st_size > 0 for n in named)

    weights = load_weights(run_dir / "weights.npz")
    program = compile_spec(SPECS / "digits.yaml")
    initial = initial_weights(program.graph, program.seed)
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in initial.items()}
    assert not np.array_equal(weights["dense_1.kernel"], initial["dense_1.kernel"])



def test_digits_run_writes_tensorboard_event_files(digits_run):
    """One event file, read back with TensorBoard's reader: every step's loss and learning
    rate, every epoch's metrics, the test metrics, the spec and its hyperparameters."""
    pytest.importorskip("tensorboard")
    from tests.event_files import check_event_files

    run_dir = digits_run
    check_event_files(run_dir)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1

# --- 2. two Keras backends and the PyTorch backend compute the same losses -----------------------

@needs_tf
@needs_torch
def test_tensorflow_and_torch_keras_backends_agree_with_the_torch_backend(tmp_path):
    short = sets("training.epochs=1", "training.steps_per_epoch=10", "model.layers.5.rate=0")
    runs = {"keras-tensorflow": ("keras", "tensorflow"), "keras-torch": ("keras", "torch"),
            "torch": ("torch", KERAS_BACKEND)}
    results = run_all(*(specforge("run", DIGITS, "-b", backend, "--run-dir",
                                  str(tmp_path / name), "--quiet", *short)
                        for name, (backend, _) in runs.items()),
                      envs=[{**ENV, "KERAS_BACKEND": kb} for _, kb in runs.values()])
    losses = {}
    for name, result in zip(runs, results, strict=True):
        ok(result)
        steps = read_jsonl(tmp_path / name / "steps.jsonl")
        assert [s["step"] for s in steps] == list(range(10)), name
        assert (tmp_path / name / "summary.json").exists(), name
        losses[name] = np.array([s["loss"] for s in steps[:5]])
    info = json.loads((tmp_path / "keras-torch" / "summary.json").read_text())
    assert "keras on torch" in info["device"]
    # Same weights, batches and update rule, but TensorFlow's and torch's kernels round in
    # other orders: the losses agree to float32 noise, not to the last bit.
    np.testing.assert_allclose(losses["keras-tensorflow"], losses["keras-torch"],
                               rtol=0, atol=1e-5)
    for name in ("keras-tensorflow", "keras-torch"):
        np.testing.assert_allclose(losses[name], losses["torch"], rtol=0, atol=1e-5,
                                   err_msg=name)


# --- 3. the built script computes the run's losses -----------------------------------------------

HEAVY = [
    "optimizer={type: rmsprop, learning_rate: 0.002, weight_decay: 0.001, clip_norm: 1.0, "
    "schedule: {type: step, step_size: 1, gamma: 0.5}}",
    "data.augment={rotation: 10, zoom: 0.1}",
    "training.steps_per_epoch=10",
]


@needs_tf
@pytest.mark.parametrize("overrides", [[], HEAVY], ids=["defaults", "rmsprop-step-augment"])
def test_built_script_gives_the_runs_losses(tmp_path, overrides):
    env = {**ENV, "KERAS_BACKEND": "tensorflow"}
    script = tmp_path / "S.py"
    ok(run_all(specforge("build", DIGITS, "-b", "keras", "--style", "exact", "-o", str(script),
                         *sets(*overrides)),
               env=env)[0])
    run_dir = tmp_path / "run"
    run, built = run_all(
        specforge("run", DIGITS, "--backend", "keras", "--run-dir", str(run_dir), "--quiet",
                  *sets(*overrides, "training.epochs=2")),
        [sys.executable, str(script), "--epochs", "2", "--log-steps", "L.jsonl"],
        cwd=tmp_path, env=env)
    ok(run)
    ok(built)
    ran = read_jsonl(run_dir / "steps.jsonl")
    logged = read_jsonl(tmp_path / "L.jsonl")
    assert len(ran) == len(logged) == 2 * read_jsonl(run_dir / "metrics.jsonl")[0]["step"]
    # Same code in the same order on the same CPU and Keras backend: equal to the last bit.
    assert [(s["step"], s["loss"], s["lr"]) for s in ran] == \
        [(s["step"], s["loss"], s["lr"]) for s in logged]
    if overrides:
        assert len(ran) == 20 and {s["lr"] for s in ran} == {0.002, 0.001}
    test = json.loads((run_dir / "summary.json").read_text())["test"]
    assert "test: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()) in built.stdout


# --- 4. generated/ is up to date, and building needs no keras ------------------------------------

SPEC_STEMS = sorted(p.stem for p in SPECS.glob("*.yaml"))
# Two hash seeds that order a set differently: a build must not depend on either.
HASH_SEEDS = ("0", "1")
# The first finder on sys.meta_path: importing keras or tensorflow fails.
_NO_KERAS = textwrap.dedent("""\
    import sys
    class NoKeras:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('keras', 'tensorflow'):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None
    sys.meta_path.insert(0, NoKeras())
    """)
_BUILD_ALL = _NO_KERAS + textwrap.dedent("""\
    from specforge.cli import app
    out = sys.argv[1]
    for spec in sys.argv[2:]:
        stem = spec.rsplit('/', 1)[-1][:-len('.yaml')]
        app(['build', spec, '-b', 'keras', '--style', 'exact',
             '-o', f'{out}/{stem}_keras_exact.py'],
            standalone_mode=False)
    assert not any(m.split('.')[0] in ('keras', 'tensorflow') for m in sys.modules)
    """)


@pytest.fixture(scope="module")
def fresh_builds(tmp_path_factory) -> dict[str, Path]:
    """`specforge build -b keras` of every spec, once per hash seed (in one process each),
    with keras and tensorflow made unimportable."""
    folders = {h: tmp_path_factory.mktemp(f"build_hashseed_{h}") for h in HASH_SEEDS}
    specs = [f"specs/{stem}.yaml" for stem in SPEC_STEMS]
    results = run_all(*([sys.executable, "-c", _BUILD_ALL, str(folder), *specs]
                        for folder in folders.values()),
                      envs=[{**ENV, "PYTHONHASHSEED": h} for h in folders])
    for r in results:
        ok(r)
    return folders


@pytest.mark.parametrize("stem", SPEC_STEMS)
def test_generated_scripts_are_up_to_date(fresh_builds, stem):
    committed = (ROOT / "generated" / f"{stem}_keras_exact.py").read_text(encoding="utf-8")
    for seed, folder in fresh_builds.items():
        built = (folder / f"{stem}_keras_exact.py").read_text(encoding="utf-8")
        assert built == committed, (
            f"generated/{stem}_keras_exact.py differs from a fresh build "
            f"(PYTHONHASHSEED={seed}); "
            f"regenerate with: {REGENERATE}")


def test_built_scripts_do_not_import_specforge(fresh_builds):

    texts = {p: p.read_text(encoding="utf-8") for folder in fresh_builds.values()
             for p in folder.glob("*.py")}
    texts.update({p: p.read_text(encoding="utf-8")
                  for p in (ROOT / "generated").glob("*_keras_exact.py")})
    assert len(texts) == 3 * len(SPEC_STEMS)
    for path, text in texts.items():
        imports = re.findall(r"^\s*(?:import|from)\s+specforge\b.*$", text, re.MULTILINE)
        assert not imports, (path, imports)


def test_built_scripts_define_every_name_they_use(fresh_builds):
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    # pyflakes' undefined-name check: a copied helper that calls one left behind
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache",
                             "--select", "F821", "--output-format", "concise",
                             str(fresh_builds[HASH_SEEDS[0]])],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_build_works_without_keras(tmp_path):
    out = tmp_path / "digits_keras.py"
    main = _NO_KERAS + "sys.argv = ['specforge'] + sys.argv[1:]\n" \
        "from specforge.cli import main\nmain()\n"
    result = run_all([sys.executable, "-c", main, "build", DIGITS, "-b", "keras",
                      "--style", "exact", "-o", str(out)])[0]
    assert result.returncode == 0, result.stderr[-2000:]
    # the same text as a build in a process that has keras
    assert out.read_text() == KerasBackend().build(compile_spec(DIGITS), "exact")


# --- 5. resume -----------------------------------------------------------------------------------

# 2 epochs x 300 steps of digits: steps.jsonl's buffer first reaches the disk mid-epoch
# (about line 120), and enough steps remain for the signal to land first.
RESUME_STEPS = 600


@pytest.mark.parametrize("dropout", ["0.2", "0"], ids=["dropout", "no-dropout"])
def test_resume_after_sigterm_gives_the_uninterrupted_weights(tmp_path, dropout):
    resume_sets = sets("training.epochs=2", "training.steps_per_epoch=300",
                       f"model.layers.5.rate={dropout}")
    a, b = tmp_path / "A", tmp_path / "B"
    steps_b = b / "steps.jsonl"
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        procs.append(subprocess.Popen(specforge("run", DIGITS, "-b", "keras", "--quiet",
                                                *resume_sets, *args),
                                      cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        return procs[-1]

    try:
        full, part = start("--run-dir", str(a)), start("--run-dir", str(b))
        err = stop_after_steps(part, steps_b)
        assert part.returncode == 130, (
            f"exit {part.returncode}: run B was not interrupted (if it finished first, make "
            f"it longer with more steps)\n{err[-3000:]}")
        assert f"--resume {b}" in err and str(b / "checkpoint.json") in err, err
        assert not (b / "summary.json").exists()
        stopped_at = len(read_jsonl(steps_b))
        assert 10 <= stopped_at < RESUME_STEPS
        named_at_stop, present = checkpoint_files(b)
        assert present == named_at_stop

        resumed = start("--resume", str(b))  # while A still runs: both are single-threaded
        _, err_a = full.communicate(timeout=240)
        assert full.returncode == 0, err_a[-3000:]
        _, err_b = resumed.communicate(timeout=240)
        assert resumed.returncode == 0, err_b[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    ran_a, ran_b = read_jsonl(a / "steps.jsonl"), read_jsonl(b / "steps.jsonl")
    assert [s["step"] for s in ran_b] == list(range(RESUME_STEPS))
    differ = [s["step"] for s, t in zip(ran_a, ran_b, strict=True)
              if (s["loss"], s["lr"]) != (t["loss"], t["lr"])]
    assert not differ, f"losses differ from step {differ[0]} on (stopped at {stopped_at})"
    weights_a = load_weights(a / "weights.npz")
    weights_b = load_weights(b / "weights.npz")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert np.array_equal(weights_a[name], weights_b[name]), name
    assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")
    assert json.loads((a / "summary.json").read_text())["test"] == \
        json.loads((b / "summary.json").read_text())["test"]

    # Each checkpoint replaces the one before: only the files checkpoint.json names remain
    # (A wrote checkpoints at steps 300 and 600; B at the stop, 300 and 600).
    for run_dir in (a, b):
        named, present = checkpoint_files(run_dir)
        assert present == named, (run_dir.name, sorted(present), sorted(named))
    assert not named_at_stop & checkpoint_files(b)[1]


# --- 6. evaluate and predict ---------------------------------------------------------------------

def test_evaluate_and_predict_use_the_runs_checkpoint(digits_run, tmp_path):
    run_dir = digits_run
    check_evaluate_and_predict(run_dir, tmp_path)


# --- 7. the Python API ---------------------------------------------------------------------------

def keras_forward(model: Any, x_nhwc: np.ndarray) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model(x_nhwc, training=False)))


def torch_forward(model: Any, x_nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def test_load_model_and_weights_round_trip():
    model = load_model(SPECS / "cifar.yaml")
    assert isinstance(model, keras.Model)
    assert model.count_params() == 160_202
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32)
    out = keras_forward(model, x)
    assert out.shape == (2, 10)

    program = compile_spec(SPECS / "cifar.yaml")
    backend = KerasBackend()
    exported = backend.export_weights(model, program)
    initial = initial_weights(program.graph, program.seed)
    assert exported.keys() == initial.keys()
    for name, value in initial.items():
        assert exported[name].dtype == np.float32
        assert np.array_equal(exported[name], value), name

    rng = np.random.default_rng(1)
    other = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in initial.items()}
    backend.import_weights(model, program, other)
    again = backend.export_weights(model, program)
    for name, value in other.items():
        assert np.array_equal(again[name], value), name
    assert not np.allclose(keras_forward(model, x), out)  # the imported weights are used


@needs_torch
def test_resnet18_forward_matches_the_torch_backend():
    from specforge_torch.model import create_model as create_torch_model

    program = compile_spec(SPECS / "resnet18.yaml", ["model.input=[32, 32, 3]"])
    rng = np.random.default_rng(0)
    weights = initial_weights(program.graph, program.seed)
    for name, value in weights.items():  # batch norm that is not the identity
        if name.endswith("moving_var"):
            weights[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif name.rpartition(".")[2] in ("gamma", "beta", "moving_mean"):
            weights[name] = (value + rng.uniform(-0.2, 0.2, value.shape)).astype(np.float32)
    keras_model = KerasBackend().create_model(program, weights)
    torch_model = create_torch_model(program.graph, program.seed, weights).eval()
    x = rng.standard_normal((2, 32, 32, 3), dtype=np.float32)
    expected = torch_forward(torch_model, x)
    assert expected.shape == (2, 1000)
    np.testing.assert_allclose(keras_forward(keras_model, x), expected, rtol=1e-5, atol=1e-5)


# --- 8. layer semantics against the PyTorch backend ----------------------------------------------

# Both compute in float32, with other kernels and summation orders: they agree to about 1e-6
# relative on these small sums of O(1) terms; 1e-5 leaves room without hiding a wrong pad,
# window or divisor (those change results by O(0.1)).
TOL = {"rtol": 1e-5, "atol": 1e-5}


def tiny_spec(tmp_path: Path, input_shape: tuple[int, ...], *layers: str) -> Any:
    path = tmp_path / "tiny.yaml"
    path.write_text(f"model:\n  input: {list(input_shape)}\n  layers:\n"
                    + "".join(f"    - {layer}\n" for layer in layers)
                    + "loss: {type: mse}\noptimizer: {type: sgd}\n", encoding="utf-8")
    return compile_spec(path)


def random_weights(program: Any) -> dict[str, np.ndarray]:
    """Uniform weights (positive variances), so that no parameter is the identity."""
    rng = np.random.default_rng(42)
    weights = {}
    for name, value in initial_weights(program.graph, program.seed).items():
        low, high = (0.5, 1.5) if name.endswith("moving_var") else (-1.0, 1.0)
        weights[name] = rng.uniform(low, high, value.shape).astype(np.float32)
    return weights


def both_outputs(tmp_path: Path, x: np.ndarray, *layers: str) -> tuple[Any, np.ndarray,
                                                                        np.ndarray]:
    """(program, Keras output, torch output) in evaluation mode, same random weights."""
    from specforge_torch.model import create_model as create_torch_model

    program = tiny_spec(tmp_path, x.shape[1:], *layers)
    weights = random_weights(program)
    keras_model = KerasBackend().create_model(program, weights)
    torch_model = create_torch_model(program.graph, program.seed, weights).eval()
    return program, keras_forward(keras_model, x), torch_forward(torch_model, x)


def node(program: Any, op: str) -> Any:
    return next(n for n in program.graph if n.op == op)


@needs_torch
@pytest.mark.parametrize(("mode", "kernel", "stride", "groups"), [
    ("zeros", 4, 2, 1), ("reflect", 4, 2, 1), ("replicate", 4, 2, 1),
    ("reflect", 3, 1, 1), ("replicate", 3, 1, 2), ("zeros", 2, 1, 2)])
def test_conv2d_same_padding_and_modes_match_torch(tmp_path, mode, kernel, stride, groups):
    x = np.random.default_rng(0).standard_normal((3, 7, 7, 2)).astype(np.float32)
    program, actual, expected = both_outputs(
        tmp_path, x,
        f"{{type: conv2d, filters: 4, kernel: {kernel}, strides: {stride}, padding: same, "
        f"padding_mode: {mode}, groups: {groups}}}", "{type: flatten}")
    pads = node(program, "conv2d").attrs["pads"]
    if kernel % 2 == 0:
        assert pads[0] != pads[1] and pads[2] != pads[3]  # the odd pixel goes after
    out = -(-7 // stride)
    assert actual.shape == (3, out * out * 4)
    np.testing.assert_allclose(actual, expected, **TOL)


@needs_torch
def test_avg_pool_same_leaves_padding_out_of_the_divisor_as_torch(tmp_path):
    x = np.random.default_rng(1).uniform(1, 2, (2, 7, 6, 3)).astype(np.float32)
    program, actual, expected = both_outputs(
        tmp_path, x, "{type: avg_pool2d, pool: 3, strides: 2, padding: same}",
        "{type: flatten}")
    assert node(program, "avg_pool2d").attrs["pads"] == (1, 1, 0, 1)
    np.testing.assert_allclose(actual, expected, **TOL)
    # with zeros counted, a window over the border would average lower (inputs are >= 1)
    assert actual.min() >= 1 - 1e-6


@needs_torch
@pytest.mark.parametrize("padding", ["same", "1"])
def test_max_pool_padding_never_wins_as_torch(tmp_path, padding):
    x = -np.random.default_rng(2).uniform(1, 2, (2, 7, 6, 3)).astype(np.float32)
    program, actual, expected = both_outputs(
        tmp_path, x, f"{{type: max_pool2d, pool: 3, strides: 2, padding: {padding}}}",
        "{type: flatten}")
    assert any(node(program, "max_pool2d").attrs["pads"])
    assert (actual <= -1).all()  # every value negative: a zero pad would win at the border
    np.testing.assert_allclose(actual, expected, **TOL)


@needs_torch
def test_batch_norm_training_updates_the_statistics_as_torch(tmp_path):
    from specforge_torch import TorchBackend

    program = tiny_spec(tmp_path, (4, 5, 3), "{type: batch_norm}", "{type: flatten}",
                        "{type: dense, units: 3}")
    name = node(program, "batch_norm").name
    weights = random_weights(program)
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, (6, 4, 5, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2], np.int64)
    trainers = {"keras": KerasBackend().create_trainer(program, weights=weights),
                "torch": TorchBackend().create_trainer(program, device="cpu",
                                                       weights=weights)}
    # Learning rate 0: one training step changes the moving statistics and nothing else.
    losses = {k: t.train_step(x, y, 0.0)[0] for k, t in trainers.items()}
    after = {k: t.export_weights() for k, t in trainers.items()}
    assert losses["keras"] == pytest.approx(losses["torch"], rel=1e-5)
    for stat in ("moving_mean", "moving_var"):
        key = f"{name}.{stat}"
        assert not np.allclose(after["keras"][key], weights[key]), key
        np.testing.assert_allclose(after["keras"][key], after["torch"][key], rtol=0,
                                   atol=1e-6, err_msg=key)
    for key, value in weights.items():
        if not key.endswith(("moving_mean", "moving_var")):
            assert np.array_equal(after["keras"][key], value), key


# --- NaN: the loop stops the Keras backend as it stops torch ------------------------------------

def test_nan_loss_stops_with_the_step(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # as torch's test: inputs 1000x larger and SGD at lr 100 overflow the loss in steps
    code, err = cli_here(capsys, "run", DIGITS, "-b", "keras", "--run-dir", str(run_dir),
                         "--quiet", *sets("optimizer.type=sgd", "optimizer.learning_rate=100",
                                          "data.normalize.scale=1000", "training.epochs=2",
                                          "training.steps_per_epoch=20"))
    assert code == 2, err[-3000:]
    found = re.search(r"the loss became (\S+) at step (\d+) .*lower the learning rate", err)
    assert found, err[-3000:]
    logged = read_jsonl(run_dir / "steps.jsonl")
    assert logged[-1]["step"] == int(found.group(2)) and not math.isfinite(logged[-1]["loss"])
    assert all(math.isfinite(s["loss"]) for s in logged[:-1])
    assert not (run_dir / "summary.json").exists()


# --- 9. unreadable checkpoints -------------------------------------------------------------------

def test_a_checkpoint_that_is_not_hdf5_is_refused(digits_run, tmp_path):
    garbage, truncated = tmp_path / "garbage", tmp_path / "truncated"
    for run_dir in (garbage, truncated):
        shutil.copytree(digits_run, run_dir)
    name = json.loads((digits_run / "checkpoint.json").read_text())["weights"]
    (garbage / name).write_bytes(b"not an HDF5 file\n" * 100)
    data = (truncated / name).read_bytes()
    (truncated / name).write_bytes(data[:len(data) // 2])
    for result in run_all(specforge("evaluate", str(garbage)),
                          specforge("evaluate", str(truncated))):
        refused(result, "is damaged", name)


# --- idiomatic style: standalone, and trains digits as `specforge run` does ----------------------

def test_idiomatic_digits_script_alone_reaches_the_runs_accuracy(digits_run):
    run_dir = digits_run
    accuracy = idiomatic_digits_accuracy("keras", SPECS)
    run = json.loads((run_dir / "summary.json").read_text())["test"]["accuracy"]
    assert abs(accuracy - run) <= 0.02, (accuracy, run)
    assert accuracy >= 0.95, accuracy


def test_both_styles_run_alone_on_image_folders(tmp_path):
    check_both_styles_alone_on_image_folders("keras", tmp_path)


# --- dropout: specforge's masks in both backends -------------------------------------------------

@needs_torch
def test_torch_and_keras_runs_of_digits_drop_the_same_units(tmp_path):
    """specs/digits.yaml as written (dropout 0.2): every one of 50 steps' losses agrees
    between the backends within the conformance tolerance (with each framework's own dropout
    they differed from the first step, by 1.3e-3 to 4.2e-2)."""
    runs = {b: tmp_path / b for b in ("torch", "keras")}
    ok_all = run_all(*(specforge("run", DIGITS, "-b", b, "--run-dir", str(folder), "--quiet",
                                 *sets("training.epochs=2")) for b, folder in runs.items()),
                     timeout=600)
    for result in ok_all:
        ok(result)
    losses = {b: np.array([s["loss"] for s in read_jsonl(folder / "steps.jsonl")][:50])
              for b, folder in runs.items()}
    assert len(losses["torch"]) == len(losses["keras"]) == 50
    from specforge.conformance.compare import Tolerance

    tolerance = Tolerance().steps_rtol * np.abs(losses["torch"]).max()
    gap = np.abs(losses["torch"] - losses["keras"]).max()
    assert gap <= tolerance, (gap, tolerance)


@needs_torch
def test_torch_and_keras_trainers_drop_the_same_whole_samples():
    """Per-sample dropout (rate 0.5 on a residual branch, 0.3 on features; the conformance
    case) in both trainers: 20 steps' losses agree within the conformance tolerance, which
    they would not if one backend drew its masks per value or for other samples."""
    from specforge.backends import load_backend
    from specforge.compiler import compile_text
    from specforge.conformance.compare import Tolerance
    from specforge.conformance.suite import CASES
    from specforge.data.pipeline import build_pipeline
    from specforge.ir.program import lr_at

    case = next(c for c in CASES if c.name == "dropout-per-sample")
    program = compile_text(case.spec_text(), case.name)
    pipeline = build_pipeline(program)
    weights = initial_weights(program.graph, program.seed)
    losses: dict[str, list[float]] = {"torch": [], "keras": []}
    for backend, curve in losses.items():
        trainer = load_backend(backend).create_trainer(program, "cpu", weights)
        for step in range(case.steps):
            batch = pipeline.train_batch(step)
            lr = lr_at(program.optimizer, step, pipeline.batches_per_pass)
            curve.append(trainer.train_step(batch.x, batch.y, lr)[0])
        trainer.close()
    assert len(losses["torch"]) == len(losses["keras"]) == 20
    tolerance = Tolerance().steps_rtol * np.abs(losses["torch"]).max()
    gap = np.abs(np.subtract(losses["torch"], losses["keras"])).max()
    assert gap <= tolerance, (gap, tolerance)


# --- Keras's own layers where they compute what specforge's layers do -----------------------
KERAS_ATTRS = {"leaky_relu": {"negative_slope": 0.2}, "elu": {"alpha": 1.3},
               "hard_sigmoid": {"alpha": 1 / 6, "beta": 0.5}}


def _keras_outputs(layer: Any, x: np.ndarray) -> list[bytes]:
    """The layer's output bits, and on TensorFlow its input gradient's."""
    if keras.backend.backend() != "tensorflow":
        return [np.asarray(layer(x)).tobytes()]
    import tensorflow as tf

    variable = tf.Variable(x)
    with tf.GradientTape() as tape:
        y = layer(variable)
        weighted = tf.reduce_sum(y * tf.reshape(tf.linspace(-1.0, 1.0, tf.size(y)), y.shape))
    return [y.numpy().tobytes(), tape.gradient(weighted, variable).numpy().tobytes()]


def _keras_input() -> np.ndarray:
    x = (np.random.default_rng(0).standard_normal((3, 9, 8, 5)) * 4).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, 6.0, -0.0]  # the kinks of relu, relu6 and others
    return x


def _recipe_layer(op: str, attrs: dict[str, Any]) -> Any:
    from specforge_keras.model import layer_for

    from specforge.ir.graph import Node

    layer = layer_for(Node("n", op, ("x",), attrs, (1, 1, 1)), "n", (9, 8, 5))
    assert type(layer).__module__.startswith("keras.src.layers")  # Keras's own
    return layer


@pytest.mark.parametrize("fn", ["elu", "gelu", "hard_sigmoid", "hard_swish", "leaky_relu",
                                "linear", "relu", "relu6", "selu", "sigmoid", "silu",
                                "softplus", "softsign", "tanh"])
def test_keras_activation_layers_give_specforge_layers_bits(fn):
    """The recipe's Keras layer gives the bits of specforge's Activation layer (the model
    and built scripts use it in its place)."""
    from specforge_keras import layers

    layer = _recipe_layer("activation", {"fn": fn, **KERAS_ATTRS.get(fn, {})})
    own = layers.Activation(fn, **KERAS_ATTRS.get(fn, {}))
    assert _keras_outputs(layer, _keras_input()) == _keras_outputs(own, _keras_input())


@pytest.mark.parametrize("strides", [(1, 1), (2, 1)])
def test_keras_conv_and_pool_layers_give_specforge_layers_bits(strides):
    from specforge_keras import layers

    conv = {"filters": 4, "kernel": (3, 3), "strides": strides, "dilation": (1, 1),
            "groups": 1, "pads": (0, 0, 0, 0), "pad_mode": "zeros", "bias": True}
    layer = _recipe_layer("conv2d", conv)
    layer.build((None, 9, 8, 5))
    own = layers.Conv2D(4, (3, 3), strides, (1, 1), 1, (0, 0, 0, 0), "zeros", True)
    own.build((None, 9, 8, 5))
    own.set_weights(layer.get_weights())
    assert _keras_outputs(layer, _keras_input()) == _keras_outputs(own, _keras_input())
    pool = {"pool": (2, 2), "strides": strides, "dilation": (1, 1), "pads": (0, 0, 0, 0),
            "ceil_mode": False}
    own_pool = layers.MaxPool2D((2, 2), strides, (0, 0, 0, 0))
    assert _keras_outputs(_recipe_layer("max_pool2d", pool), _keras_input()) == \
        _keras_outputs(own_pool, _keras_input())
