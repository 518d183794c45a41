"""`specforge build --style idiomatic` (the default): scripts a person would keep.

What proves an idiomatic script right (the exact style has its own tests in the backend
files): it is short and ruff-clean; its model, loaded with specforge's neutral weights,
computes the float64 reference's output; one training step from those weights gives
`specforge run`'s first-step weights; and it trains digits as well as `specforge run`
(tests/test_torch_backend.py and tests/test_keras_backend.py, next to their digits runs).
"""

from __future__ import annotations

import importlib.util
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from specforge.backends import load_backend
from specforge.compiler import compile_spec, compile_text
from specforge.conformance.compare import GROUP_SHARE, Tolerance, difference, magnitude
from specforge.conformance.suite import CASES, HEAD, Case
from specforge.data.pipeline import build_pipeline
from specforge.ir.program import Program, lr_at
from specforge.reference.forward import reference_forward
from specforge.weights import initial_weights, save_weights
from tests.conftest import ROOT, SPECS

STEMS = sorted(p.stem for p in SPECS.glob("*.yaml"))
BACKENDS = ["torch", "keras"]
#: The issue's size targets (lines), per spec and backend.
SIZE_LIMITS = {("cifar", "torch"): 150, ("cifar", "keras"): 100, ("digits", "torch"): 150,
               ("digits", "keras"): 100, ("resnet18", "torch"): 250,
               ("resnet18", "keras"): 250}
REGENERATE = ("for b in torch keras; do for s in specs/*.yaml; do specforge build $s -b $b "
              "-o generated/$(basename $s .yaml)_$b.py; done; done")


def built(program: Program, backend: str) -> str:
    return load_backend(backend).build(program, style="idiomatic")


# --- 1. generated/, size and style -----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stem", STEMS)
def test_generated_idiomatic_scripts_are_up_to_date(stem, backend):
    committed = (ROOT / "generated" / f"{stem}_{backend}.py").read_text(encoding="utf-8")
    fresh = built(compile_spec(SPECS / f"{stem}.yaml"), backend)
    assert fresh == committed, f"generated/{stem}_{backend}.py is stale; run: {REGENERATE}"


def test_the_cli_builds_idiomatic_by_default(tmp_path):
    out = tmp_path / "digits.py"
    result = subprocess.run([sys.executable, "-m", "specforge", "build", "specs/digits.yaml",
                             "-b", "keras", "-o", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == (ROOT / "generated" / "digits_keras.py").read_text()


@pytest.mark.parametrize(("stem", "backend"), sorted(SIZE_LIMITS))
def test_idiomatic_scripts_meet_their_size_targets(stem, backend):
    lines = (ROOT / "generated" / f"{stem}_{backend}.py").read_text().count("\n")
    assert lines <= SIZE_LIMITS[stem, backend], (stem, backend, lines)


def test_idiomatic_scripts_pass_ruff_check_and_format():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    scripts = [str(p) for p in sorted((ROOT / "generated").glob("*.py"))
               if not p.stem.endswith("_exact")]
    assert len(scripts) == 2 * len(STEMS)
    for command in (["check"], ["format", "--check"]):
        result = subprocess.run([sys.executable, "-m", "ruff", *command, *scripts], cwd=ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-2000:])


def test_the_seed_keras_script_reads_like_the_seed_code():
    text = (ROOT / "generated" / "cifar_keras.py").read_text()
    # the seed document: model.add(Conv2D(32, (3, 3), activation='relu')) ... compile(...)
    for line in ['model.add(layers.Conv2D(32, 3, activation="relu", name="conv2d_1"))',
                 'model.add(layers.MaxPooling2D(2, name="max_pool2d_1"))',
                 'model.add(layers.Flatten(name="flatten_1"))',
                 'model.add(layers.Dense(10, activation="softmax", name="dense_2"))',
                 'loss="categorical_crossentropy"', 'metrics=["accuracy"]',
                 "model.fit(", "model.evaluate("]:
        assert line in text, line
    assert "layers.RandomRotation" in text and "layers.RandomFlip(\"horizontal\")" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_idiomatic_scripts_carry_only_what_the_spec_uses(backend):
    digits = (ROOT / "generated" / f"digits_{backend}.py").read_text()
    cifar = (ROOT / "generated" / f"cifar_{backend}.py").read_text()
    for absent in ("BatchNorm", "AvgPool", "Pad2D", "augment", "Random", "distributed",
                   "DataLoader(" if backend == "keras" else "model.fit", "SGD", "RMSprop"):
        assert absent not in digits, absent
    assert ("augment(" in cifar) if backend == "torch" else ("RandomRotation" in cifar)
    assert "Image.open" in cifar and "Image.open" not in digits


# --- 2. same model: the neutral weights give the reference's output --------------------------

def import_script(text: str, folder: Path, name: str) -> ModuleType:
    path = folder / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"built_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only: nothing runs
    return module


def model_output(module: ModuleType, backend: str, weights: Path, x: np.ndarray) -> np.ndarray:
    model = module.build_model()
    module.load_weights(model, weights)
    if backend == "torch":
        import torch

        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    return np.asarray(model(x, training=False))


def expected_output(program: Program, weights: dict[str, np.ndarray], x: np.ndarray,
                    backend: str) -> np.ndarray:
    out = reference_forward(program.graph, weights, x)[program.graph.output]
    if backend == "keras" and program.output_activation == "softmax":  # on the model there
        shifted = np.exp(out - out.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    if backend == "keras" and program.output_activation == "sigmoid":
        return 1 / (1 + np.exp(-out))
    return out


def check_same_model(program: Program, backend: str, folder: Path) -> None:
    module = import_script(built(program, backend), folder, f"{backend}_model")
    weights = initial_weights(program.graph, program.seed)
    path = folder / "weights.npz"
    save_weights(path, weights)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (2, *program.graph.input.shape)).astype(np.float32)
    actual = model_output(module, backend, path, x)
    expected = expected_output(program, weights, x, backend)
    diff = difference(actual, expected)
    tolerance = Tolerance().forward_rtol * (1 + GROUP_SHARE) * diff.scale
    assert diff.max_abs <= tolerance, (program.name, backend, diff)


#: The big models at a smaller input, so that the float64 reference stays quick.
SMALL_INPUTS = {"vgg16": "[32, 32, 3]", "resnet18": "[64, 64, 3]", "resnet50": "[32, 32, 3]",
                "mobilenetv2": "[32, 32, 3]"}
LAYER_CASES = [c for c in CASES if not c.name.startswith(("optimizer-", "metrics"))]


#: The real models (3.5M and 25.6M weights through the float64 reference: about 10 s per
#: backend each) run with -m slow. Each op and option they use is a layer case below, their
#: shapes and parameters are Keras's own (tests/test_specs.py), and resnet18 goes through
#: this check by default.
HEAVY = {"resnet50", "mobilenetv2"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stem", [pytest.param(s, marks=[pytest.mark.slow] * (s in HEAVY))
                                  for s in STEMS])
def test_every_spec_loads_the_neutral_weights_and_gives_the_reference_output(
        stem, backend, tmp_path):
    pytest.importorskip(backend)
    sets = [f"model.input={SMALL_INPUTS[stem]}"] if stem in SMALL_INPUTS else []
    check_same_model(compile_spec(SPECS / f"{stem}.yaml", sets), backend, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.name for c in LAYER_CASES])
def test_every_layer_case_gives_the_reference_output(case, backend, tmp_path):
    pytest.importorskip(backend)
    check_same_model(compile_text(case.spec_text(), f"<case {case.name}>"), backend, tmp_path)


def test_a_branch_that_passes_its_value_on_keeps_the_input_for_the_next_branch(tmp_path):
    """Keras's functional script hands a value to the next layer in `x`: the model's input,
    read by two branches, must not be `x` then (the option matrix found this)."""
    pytest.importorskip("keras")
    layers = [{"type": "conv2d", "filters": 2, "kernel": 3, "name": "a", "inputs": "input",
               "activation": {"fn": "leaky_relu", "negative_slope": 0.3}},
              {"type": "conv2d", "filters": 2, "kernel": 3, "name": "b", "inputs": "input"},
              {"type": "concat", "inputs": ["a", "b"]}, {"type": "flatten"},
              {"type": "dense", "units": 2}]
    case = Case("input-read-twice", layers)
    check_same_model(compile_text(case.spec_text(), "<input read twice>"), "keras", tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_product_of_sums_and_a_gate_keeps_its_grouping(backend, tmp_path):
    """torch's script inlines a sum read once into the expression that reads it: a product
    of it must keep the sum in parentheses; the gate on the left is broadcast too."""
    pytest.importorskip(backend)
    layers = [{"type": "conv2d", "filters": 3, "kernel": 3, "name": "a"},
              {"type": "conv2d", "filters": 3, "kernel": 1, "name": "b", "inputs": "a"},
              {"type": "add", "inputs": ["a", "b"], "name": "sum"},
              {"type": "global_max_pool2d", "inputs": "a", "name": "pooled"},
              {"type": "multiply", "inputs": ["pooled", "sum"]},
              {"type": "add", "inputs": ["a", "b"], "name": "again"},
              {"type": "multiply", "inputs": ["again", "multiply_1"]}, *HEAD]
    case = Case("product-of-sums", layers)
    check_same_model(compile_text(case.spec_text(), "<product of sums>"), backend, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_dropout_drops_whole_samples_with_the_frameworks_stream(backend, tmp_path):
    """Drop-connect as a user writes it: Keras's Dropout with noise_shape (None, 1, 1, 1)
    ((None, 1) on features), a small nn.Dropout over one value per sample in torch; in
    training each sample is zeroed whole or scaled whole."""
    pytest.importorskip(backend)
    layers = [{"type": "conv2d", "filters": 3, "kernel": 3, "name": "branch"},
              {"type": "dropout", "rate": 0.5, "per_sample": True, "name": "image_drop"},
              {"type": "add", "inputs": ["branch", "image_drop"]}, HEAD[0],
              {"type": "dense", "units": 5},
              {"type": "dropout", "rate": 0.5, "per_sample": True, "name": "feature_drop"},
              HEAD[1]]
    program = compile_text(Case("per-sample", layers).spec_text(), "<per-sample dropout>")
    text = built(program, backend)
    module = import_script(text, tmp_path, f"{backend}_per_sample")
    model = module.build_model()
    batch = 64
    if backend == "keras":
        assert 'layers.Dropout(0.5, noise_shape=(None, 1, 1, 1), name="image_drop")' in text
        assert 'layers.Dropout(0.5, noise_shape=(None, 1), name="feature_drop")' in text
        drops = [(model.get_layer(name), (batch, *shape)) for name, shape in
                 (("image_drop", (6, 6, 3)), ("feature_drop", (5,)))]
        outputs = [np.asarray(layer(np.ones(shape, np.float32), training=True))
                   for layer, shape in drops]
    else:
        import torch

        assert "class SampleDropout(nn.Dropout):" in text and text.count("SampleDropout(0.5)") == 2
        drops = [m for m in model.modules() if type(m).__name__ == "SampleDropout"]
        outputs = [m.train()(torch.ones(shape)).numpy() for m, shape in
                   zip(drops, ((batch, 3, 6, 6), (batch, 5)), strict=True)]
    for out in outputs:
        per_sample = out.reshape(batch, -1)
        assert (per_sample == per_sample[:, :1]).all()  # one draw per sample
        assert set(np.unique(per_sample).tolist()) == {0.0, 2.0}


# --- 3. same update rule: one step from the same weights on the same batch -------------------

class Stop(Exception):
    """Ends the script's main() after its first step."""


def _epoch_schedule(kind: str, **params: Any) -> Case:
    schedule = {"type": kind, "warmup": 1, "warmup_start_factor": 0.25, **params}
    return Case(f"schedule-{kind}-epoch-warmup", CASES[0].layers,
                optimizer={"type": "sgd", "learning_rate": 0.1, "momentum": 0.9,
                           "schedule": schedule})


UPDATE_CASES = [c for c in CASES if c.name.startswith(("optimizer-", "loss-", "batch-norm",
                                                      "layer-norm", "prelu",
                                                      "group-norm"))
                and "one-image" not in c.name] + [
    _epoch_schedule("cosine", t_max=3, min_lr=0.01), _epoch_schedule("step", step_size=2),
    _epoch_schedule("multistep", milestones=[1, 2]), _epoch_schedule("exponential", gamma=0.5),
    _epoch_schedule("constant")]


def first_step_torch(module: ModuleType, batch: Any, monkeypatch: Any, program: Program
                     ) -> dict[str, Any]:
    import torch

    original, captured = module.train_step, {}

    def step(model: Any, optimizer: Any, x: Any, y: Any) -> Any:
        original(model, optimizer, torch.from_numpy(batch.x).permute(0, 3, 1, 2),
                 torch.from_numpy(batch.y))
        captured["model"] = model
        raise Stop

    monkeypatch.setattr(module, "train_step", step)
    with pytest.raises(Stop):
        module.main()
    return {k: v.numpy() for k, v in captured["model"].state_dict().items()
            if not k.endswith("num_batches_tracked")}


def first_step_keras(module: ModuleType, batch: Any, monkeypatch: Any, program: Program
                     ) -> dict[str, Any]:
    import keras

    captured = {}

    def fit(model: Any, *args: Any, callbacks: Any = (), **kwargs: Any) -> Any:
        targets = (batch.y[:, None].astype("float32")
                   if program.loss.kind == "binary_cross_entropy" else
                   keras.utils.to_categorical(batch.y, program.loss.classes))
        for callback in callbacks:  # the learning-rate schedule
            callback.set_model(model)
            callback.on_train_batch_begin(0)
        model.train_on_batch(batch.x, targets)
        captured["model"] = model
        raise Stop

    monkeypatch.setattr(keras.Model, "fit", fit)
    with pytest.raises(Stop):
        module.main()
    return {str(i): np.asarray(w) for i, w in enumerate(captured["model"].get_weights())}


def as_script_weights(module: ModuleType, backend: str, path: Path) -> dict[str, np.ndarray]:
    """Neutral weights in the script's own terms: loaded into a fresh model of it."""
    model = module.build_model()
    module.load_weights(model, path)
    if backend == "torch":
        return {k: v.numpy() for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    return {str(i): np.asarray(w) for i, w in enumerate(model.get_weights())}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", UPDATE_CASES, ids=[c.name for c in UPDATE_CASES])
def test_one_step_gives_specforge_runs_first_step_weights(case, backend, tmp_path,
                                                         monkeypatch):
    pytest.importorskip(backend)
    program = compile_text(case.spec_text(), f"<case {case.name}>")
    pipeline = build_pipeline(program)
    batch = pipeline.train_batch(0)
    weights = initial_weights(program.graph, program.seed)
    start = tmp_path / "start.npz"
    save_weights(start, weights)
    # specforge run's first step: its trainer, this backend, the schedule's first rate
    trainer = load_backend(backend).create_trainer(program, "cpu", weights)
    trainer.train_step(batch.x, batch.y, lr_at(program.optimizer, 0,
                                               pipeline.batches_per_pass))
    after = tmp_path / "after.npz"
    save_weights(after, trainer.export_weights())
    trainer.close()

    module = import_script(built(program, backend), tmp_path, f"{backend}_step")
    monkeypatch.setattr(sys, "argv", ["script", "--weights", str(start), "--epochs", "1"])
    stepped = (first_step_torch if backend == "torch" else first_step_keras)(
        module, batch, monkeypatch, program)
    expected = as_script_weights(module, backend, after)
    initial = as_script_weights(module, backend, start)
    assert stepped.keys() == expected.keys()
    group = max(magnitude(v) for v in expected.values())
    moved = 0
    for name, value in expected.items():
        diff = difference(stepped[name], value)
        tolerance = Tolerance().steps_rtol * (diff.scale + GROUP_SHARE * group)
        assert diff.max_abs <= tolerance, (case.name, backend, name, diff)
        moved += not np.array_equal(value, initial[name])
    assert moved, "the step changed nothing: the comparison would prove nothing"


def test_the_readme_shows_the_generated_seed_model():
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "def build_model" in shown
    assert shown in (ROOT / "generated" / "cifar_keras.py").read_text()
    lines = (ROOT / "generated" / "cifar_keras.py").read_text().count("\n")
    assert f"`generated/cifar_keras.py`, {lines} lines in all" in readme


@pytest.mark.parametrize(("overrides", "stratify"), [([], True), (["data.split.stratify=false",
                                                                  "data.split.validation=0.3"],
                                                                 False)])
def test_idiomatic_scripts_hold_out_specforges_images(overrides, stratify, tmp_path):
    from specforge.data.pipeline import split_indices

    program = compile_spec(SPECS / "digits.yaml", overrides)
    module = import_script(built(program, "torch"), tmp_path, "split")
    parts = module.load_data(tmp_path)
    x, y = __import__("sklearn.datasets").datasets.load_digits(return_X_y=True)
    split = program.spec.data.split
    indices = split_indices(y, split.validation, split.test, stratify, program.seed)
    for name, index in zip(("train", "validation", "test"), indices, strict=True):
        images = parts[name][0].permute(0, 2, 3, 1).reshape(len(index), -1).numpy()
        expected = (x[index] * program.spec.data.normalize.scale).astype(np.float32)
        assert sorted(map(bytes, images)) == sorted(map(bytes, expected)), name


HOSTILE_NAMES = """\
name: "100% %s {name}"
seed: 3
model:
  input: [8, 8, 2]
  layers:
    - {type: conv2d, name: class, filters: 2, kernel: 3}
    - {type: conv2d, name: self, filters: 2, kernel: 3, padding: same, inputs: class}
    - {type: add, name: keras, inputs: [self, class]}
    - {type: layer_norm, name: LayerNorm}
    - {type: layer_norm, name: LayerNorm2d}
    - {type: prelu, name: PReLU}
    - {type: group_norm, name: GroupNorm, groups: 2}
    - {type: batch_norm, name: forward}
    - {type: flatten, name: inputs}
    - {type: dense, name: None, units: 3}
loss: {type: cross_entropy}
optimizer: {type: adam}
data: {source: {type: synthetic, samples: 24, classes: 3}, batch_size: 8}
training: {epochs: 1}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_name_a_spec_accepts_gives_a_working_script(backend, tmp_path):
    """Layer names that are keywords, the script's own names or nn.Module's attributes."""
    pytest.importorskip(backend)
    program = compile_text(HOSTILE_NAMES, "<hostile names>")
    check_same_model(program, backend, tmp_path)  # builds, imports, loads weights by name
    for style in ("idiomatic", "exact"):
        path = tmp_path / f"{style}.py"
        path.write_text(load_backend(backend).build(program, style=style))
        for args in (["--help"], ["--epochs", "1"]):
            result = subprocess.run([sys.executable, str(path), *args], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, (style, args, result.stderr[-2000:])


# --- 5. user errors in built scripts: a message and exit code 2, as `specforge run` ----------

DIVERGES = ["optimizer.type=sgd", "optimizer.learning_rate=100", "data.normalize.scale=1000"]


def check_user_errors_in_scripts(tmp_path: Path, cases: list[tuple[str, str, str]]) -> None:
    """Built scripts (backend, style) run alone on CIFAR batches whose labels are not
    integers ("data": a DataError) or on a loss that overflows ("nan"); each prints the
    message and exits with code 2, with no traceback."""
    from tests.processes import run_all, without_specforge
    from tests.test_data import make_cifar

    folder, raw = make_cifar(tmp_path / "data")
    (folder / "data_batch_3").write_bytes(pickle.dumps(
        {b"labels": [1.5] * len(raw["data_batch_3"]), b"data": raw["data_batch_3"]}))
    runs = []
    for backend, style, error in cases:
        pytest.importorskip(backend)
        program = compile_spec(SPECS / "cifar.yaml", [
            f"data.source={{type: cifar10, path: {folder}}}"]) if error == "data" else \
            compile_spec(SPECS / "digits.yaml", DIVERGES)
        script = tmp_path / f"{error}_{backend}_{style}.py"
        script.write_text(load_backend(backend).build(program, style=style))
        runs.append(without_specforge(script, "--epochs", "2", *(
            ["--steps-per-epoch", "20"] if style == "exact" else [])))
    for (backend, style, error), result in zip(cases, run_all(*runs), strict=True):
        where = (backend, style, error, result.returncode, result.stderr[-2000:])
        assert result.returncode == 2 and "Traceback" not in result.stderr, where
        if error == "nan" and style == "idiomatic":  # after the framework's own epoch lines
            assert re.search(r"error: the loss became (nan|inf|-inf)", result.stdout), where
        elif error == "nan":
            assert re.search(r"error: the loss became (nan|inf|-inf) at step \d+ .*lower the "
                             "learning rate", result.stderr), where
        else:
            assert f"error: {folder / 'data_batch_3'}: the labels must be" in \
                result.stderr, where


def test_exact_scripts_report_bad_data_and_a_nan_loss_with_exit_code_2(tmp_path):
    check_user_errors_in_scripts(tmp_path, [("torch", "exact", "data"),
                                            ("keras", "exact", "nan"),
                                            ("torch", "idiomatic", "nan")])


@pytest.mark.slow
def test_every_built_script_reports_bad_data_and_a_nan_loss_with_exit_code_2(tmp_path):
    check_user_errors_in_scripts(tmp_path, [
        ("torch", "idiomatic", "data"), ("keras", "idiomatic", "data"),
        ("keras", "exact", "data"), ("torch", "exact", "nan"), ("keras", "idiomatic", "nan")])


LONG_LINES = """name: long-lines
model:
  input: [12, 12, 3]
  layers:
    - {type: conv2d, filters: 16, kernel: 3, strides: 2, padding: same, bias: false,
       activation: relu, name: a_rather_long_convolution_layer_name}
    - {type: prelu, alpha_init: 0.1, name: a_rather_long_parametric_relu_name_x}
    - {type: group_norm, groups: 4, epsilon: 0.00001, name: a_rather_long_group_norm_name}
%s    - {type: flatten}
    - {type: dense, units: 3}
loss: {type: cross_entropy, from_logits: true}
optimizer: {type: sgd}
data: {source: {type: synthetic, samples: 16, classes: 3}, batch_size: 4}
"""


@pytest.mark.parametrize("graph", ["chain", "branching"])
def test_idiomatic_scripts_of_long_layer_calls_pass_ruff_format(tmp_path, graph):
    """Layer calls too long for a line (long names, many options) are written as ruff
    formats them: the arguments on a line of their own, or one a line, in a Sequential's
    model.add and in a functional graph alike."""
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    merge = "    - {type: add, inputs: [a_rather_long_group_norm_name, " \
        "a_rather_long_parametric_relu_name_x]}\n" if graph == "branching" else ""
    program = compile_text(LONG_LINES % merge, "long.yaml")
    scripts = []
    for backend in ("torch", "keras"):
        scripts.append(tmp_path / f"{backend}.py")
        scripts[-1].write_text(load_backend(backend).build(program), encoding="utf-8")
    config = ["--config", str(ROOT / "pyproject.toml")]  # the rules generated/ is held to
    for command in (["check", *config], ["format", "--check", *config]):
        result = subprocess.run([sys.executable, "-m", "ruff", *command, *map(str, scripts)],
                                capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stdout[-3000:])
