"""The PyTorch backend end to end: runs, run folders, built scripts, resume, NaN stops,
evaluate/predict, the Python API, checkpoint safety and layer semantics against numpy."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from specforge.compiler import compile_spec
from specforge.ir.graph import Node
from specforge.weights import initial_weights, load_weights
from tests.conftest import ROOT, SPECS

torch = pytest.importorskip("torch")

from specforge_torch import TorchBackend, layers, load_model  # noqa: E402 - needs torch
from specforge_torch.model import create_model, export_weights, module_for  # noqa: E402
from specforge_torch.recipes import TORCH_ACTIVATIONS  # noqa: E402

from tests.processes import (  # noqa: E402
    ENV,
    PNG_SIGNATURE,
    check_both_styles_alone_on_image_folders,
    check_evaluate_and_predict,
    cli,
    idiomatic_digits_accuracy,
    ok,
    read_jsonl,
    refused,
    run_all,
    sets,
    specforge,
    stop_after_steps,
)

DIGITS = str(SPECS / "digits.yaml")
SYNTHETIC = "data.source={type: synthetic, samples: 256}"
REGENERATE = ("for s in specs/*.yaml; do specforge build $s -b torch --style exact "
              "-o generated/$(basename $s .yaml)_torch_exact.py; done")


# --- 1. a full run of the digits spec ------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """specs/digits.yaml as written (20 epochs), with --quiet and --json."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    result = ok(cli("run", DIGITS, "--backend", "torch", "--run-dir", str(run_dir), "--quiet",
                    "--json"))
    return run_dir, result


def test_digits_run_reaches_accuracy_and_fills_the_run_folder(digits_run):
    run_dir, _ = digits_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.95, summary
    assert summary["device"] == "cpu"

    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert spec["name"] == "digits" and spec["training"]["epochs"] == 20
    info = json.loads((run_dir / "run.json").read_text())
    assert info["backend"] == "torch" and info["name"] == "digits"
    assert info["class_names"] == [str(i) for i in range(10)]

    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in history] == list(range(1, 21))
    steps_per_epoch = history[0]["step"]
    assert [r["step"] for r in history] == [steps_per_epoch * e for e in range(1, 21)]
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    for row, record in zip(rows, history, strict=True):
        assert set(row) == set(record)
        # csv holds repr(float): the very same numbers
        assert {k: float(v) for k, v in row.items()} == record

    steps = read_jsonl(run_dir / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(20 * steps_per_epoch))
    assert all(math.isfinite(s["loss"]) and s["lr"] == 0.002 for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]

    assert (run_dir / "plot.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (run_dir / "checkpoint.pt").stat().st_size > 0
    weights = load_weights(run_dir / "weights.npz")
    program = compile_spec(SPECS / "digits.yaml")
    initial = initial_weights(program.graph, program.seed)
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in initial.items()}
    assert not np.array_equal(weights["dense_1.kernel"], initial["dense_1.kernel"])


def test_json_prints_one_line_per_epoch_and_the_test_result(digits_run):
    run_dir, result = digits_run
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert len(lines) == len(history) + 1
    assert [{k: v for k, v in e.items() if k != "event"} for e in lines[:-1]] == history
    assert all(e["event"] == "epoch" for e in lines[:-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert lines[-1] == {"event": "test", **summary["test"]}


def test_steps_log_numbers_epochs_from_the_step(digits_run):
    run_dir, _ = digits_run
    steps_per_epoch = read_jsonl(run_dir / "metrics.jsonl")[0]["step"]
    wrong = [s for s in read_jsonl(run_dir / "steps.jsonl")
             if s["epoch"] != s["step"] // steps_per_epoch + 1]
    assert not wrong, wrong[:3]



def test_digits_run_writes_tensorboard_event_files(digits_run):
    """One event file, read back with TensorBoard's reader: every step's loss and learning
    rate, every epoch's metrics, the test metrics, the spec and its hyperparameters."""
    pytest.importorskip("tensorboard")
    from tests.event_files import check_event_files

    run_dir = digits_run[0]
    check_event_files(run_dir)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1

# --- 2. the built script computes the run's losses -----------------------------------------------

HEAVY = [
    "optimizer={type: sgd, learning_rate: 0.05, momentum: 0.9, nesterov: true, "
    "weight_decay: 0.001, clip_norm: 1.0, schedule: {type: cosine, t_max: 2, warmup: 1, "
    "warmup_start_factor: 0.1, unit: epoch}}",
    "data.augment={rotation: 10, width_shift: 0.1, zoom: 0.1, crop_padding: 1}",
    "model.layers.5.rate=0.5",
    "loss.label_smoothing=0.1",
    "training.steps_per_epoch=10",
    "training.precision=bf16",  # the script autocasts and lays out memory as run does
    "training.channels_last=true",
]


@pytest.mark.parametrize(("overrides", "epochs"), [([], 2), (HEAVY, 3)],
                         ids=["defaults", "sgd-cosine-augment-dropout"])
def test_built_script_gives_the_runs_losses(tmp_path, overrides, epochs):
    script = tmp_path / "S.py"
    ok(cli("build", DIGITS, "-b", "torch", "--style", "exact", "-o", str(script),
           *sets(*overrides)))
    run_dir = tmp_path / "run"
    run, built = run_all(
        specforge("run", DIGITS, "--backend", "torch", "--run-dir", str(run_dir), "--quiet",
                  *sets(*overrides, f"training.epochs={epochs}")),
        [sys.executable, str(script), "--epochs", str(epochs), "--log-steps", "L.jsonl"],
        cwd=tmp_path)
    ok(run)
    ok(built)
    ran = read_jsonl(run_dir / "steps.jsonl")
    logged = read_jsonl(tmp_path / "L.jsonl")
    assert len(ran) == len(logged) > 0
    # Same code in the same order on the same CPU: equal to the last bit, every step.
    assert [(s["step"], s["loss"], s["lr"]) for s in ran] == \
        [(s["step"], s["loss"], s["lr"]) for s in logged]
    if overrides:
        assert len({s["lr"] for s in ran}) == 3  # warmup, then the cosine moved the rate
    test = json.loads((run_dir / "summary.json").read_text())["test"]
    assert "test: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()) in built.stdout


# --- 3. generated/ is up to date -----------------------------------------------------------------

SPEC_STEMS = sorted(p.stem for p in SPECS.glob("*.yaml"))
# Two hash seeds that order a set differently: a build must not depend on either.
HASH_SEEDS = ("0", "1")
_BUILD_ALL = textwrap.dedent("""\
    import sys
    from specforge.cli import app
    out = sys.argv[1]
    for spec in sys.argv[2:]:
        stem = spec.rsplit('/', 1)[-1][:-len('.yaml')]
        app(['build', spec, '-b', 'torch', '--style', 'exact',
             '-o', f'{out}/{stem}_torch_exact.py'],
            standalone_mode=False)
    """)


@pytest.fixture(scope="module")
def fresh_builds(tmp_path_factory) -> dict[str, Path]:
    """`specforge build -b torch` of every spec, once per hash seed (in one process each)."""
    folders = {h: tmp_path_factory.mktemp(f"build_hashseed_{h}") for h in HASH_SEEDS}
    specs = [f"specs/{stem}.yaml" for stem in SPEC_STEMS]
    results = [run_all([sys.executable, "-c", _BUILD_ALL, str(folder), *specs],
                       env={**ENV, "PYTHONHASHSEED": h}) for h, folder in folders.items()]
    for r in results:
        ok(r[0])
    return folders


@pytest.mark.parametrize("stem", SPEC_STEMS)
def test_generated_scripts_are_up_to_date(fresh_builds, stem):
    committed = (ROOT / "generated" / f"{stem}_torch_exact.py").read_text(encoding="utf-8")
    for seed, folder in fresh_builds.items():
        built = (folder / f"{stem}_torch_exact.py").read_text(encoding="utf-8")
        assert built == committed, (
            f"generated/{stem}_torch_exact.py differs from a fresh build (PYTHONHASHSEED={seed}); "
            f"regenerate with: {REGENERATE}")


def test_built_scripts_do_not_import_specforge(fresh_builds):
    texts = {p: p.read_text(encoding="utf-8")
             for p in (ROOT / "generated").glob("*_torch_exact.py")}
    texts.update({p: p.read_text(encoding="utf-8") for folder in fresh_builds.values()
                  for p in folder.glob("*.py")})
    assert len(texts) == 3 * len(SPEC_STEMS)
    for path, text in texts.items():
        imports = re.findall(r"^\s*(?:import|from)\s+specforge\b.*$", text, re.MULTILINE)
        assert not imports, (path, imports)


# Fails if build imports torch (the probe is the first finder on sys.meta_path).
_NO_TORCH = textwrap.dedent("""\
    import sys
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] == 'torch':
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None
    sys.meta_path.insert(0, NoTorch())
    sys.argv = ['specforge'] + sys.argv[1:]
    from specforge.cli import main
    main()
    """)


def test_build_works_without_torch(tmp_path):
    out = tmp_path / "digits_torch.py"
    result = run_all([sys.executable, "-c", _NO_TORCH, "build", DIGITS, "-b", "torch",
                      "--style", "exact", "-o", str(out)])[0]
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_text() == (ROOT / "generated" / "digits_torch_exact.py").read_text()


# --- 4. resume -----------------------------------------------------------------------------------

# 450 steps: steps.jsonl's buffer first reaches the disk mid-epoch (about line 126), and
# enough steps remain after that for the signal to land before the end.
RESUME_SETS = sets(SYNTHETIC, "training.epochs=3", "training.steps_per_epoch=150")


def test_resume_after_sigterm_gives_the_uninterrupted_weights(tmp_path):
    """Also: the batches do not depend on the number of data workers (A prepares them in
    the training process, B in two workers)."""
    a, b = tmp_path / "A", tmp_path / "B"
    steps_b = b / "steps.jsonl"
    full = subprocess.Popen(specforge("run", DIGITS, "-b", "torch", "--run-dir", str(a),
                                      "--quiet", *RESUME_SETS, *sets("data.workers=0")),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    part = subprocess.Popen(specforge("run", DIGITS, "-b", "torch", "--run-dir", str(b),
                                      "--quiet", *RESUME_SETS, *sets("data.workers=2")),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        err = stop_after_steps(part, steps_b)
        _, err_a = full.communicate(timeout=240)
    finally:
        for p in (full, part):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert full.returncode == 0, err_a[-3000:]
    assert part.returncode == 130, (
        f"exit {part.returncode}: run B was not interrupted (if it finished first, make it "
        f"longer with more epochs)\n{err[-3000:]}")
    assert f"--resume {b}" in err and str(b / "checkpoint.pt") in err, err
    assert not (b / "summary.json").exists()
    stopped_at = len(read_jsonl(steps_b))
    assert 10 <= stopped_at < 450

    ok(cli("run", DIGITS, "-b", "torch", "--resume", str(b), "--quiet", *RESUME_SETS,
           *sets("data.workers=2")))
    weights_a = load_weights(a / "weights.npz")
    weights_b = load_weights(b / "weights.npz")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert np.array_equal(weights_a[name], weights_b[name]), name
    ran_a, ran_b = read_jsonl(a / "steps.jsonl"), read_jsonl(b / "steps.jsonl")
    assert [s["step"] for s in ran_b] == list(range(450))
    assert [(s["loss"], s["lr"]) for s in ran_a] == [(s["loss"], s["lr"]) for s in ran_b]
    # the epoch that was cut holds the same metrics (loss sum and confusion restored)
    assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")
    summaries = [json.loads((run / "summary.json").read_text()) for run in (a, b)]
    assert summaries[0]["test"] == summaries[1]["test"]
    for summary in summaries:  # the share of step time spent waiting for a batch
        assert 0 < summary["data_wait_share"] < 1


def test_ctrl_c_writes_a_checkpoint_and_exits_130(tmp_path):
    """SIGINT (what Ctrl-C sends) stops the run as SIGTERM does: after the current step,
    with a checkpoint of that step, exit code 130 and no KeyboardInterrupt traceback."""
    run_dir = tmp_path / "run"
    # 2,000 short steps: a checkpoint every 5 makes the step log reach the disk early
    process = subprocess.Popen(specforge("run", DIGITS, "-b", "torch", "--run-dir",
                                         str(run_dir), "--quiet",
                                         *sets("training.epochs=400",
                                               "training.steps_per_epoch=5")),
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        err = stop_after_steps(process, run_dir / "steps.jsonl", count=5,
                               signal_number=signal.SIGINT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, (process.returncode, err[-3000:])
    assert "stopped by SIGINT" in err and f"--resume {run_dir}" in err, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    loop = json.loads(torch.load(run_dir / "checkpoint.pt", weights_only=True)["loop"])
    logged = read_jsonl(run_dir / "steps.jsonl")
    assert 5 <= loop["step"] == len(logged) < 2000
    assert [s["step"] for s in logged] == list(range(loop["step"]))


def test_resume_and_run_dir_misuse_are_refused(tmp_path):
    run_dir, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    small = sets(SYNTHETIC, "training.epochs=1", "training.steps_per_epoch=2")
    ok(cli("run", DIGITS, "-b", "torch", "--run-dir", str(run_dir), "--quiet", *small))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    other_spec, no_run, again, two_folders = run_all(
        specforge("run", DIGITS, "-b", "torch", "--resume", str(run_dir), "--quiet", *small,
                  "--set", "seed=1"),
        specforge("run", DIGITS, "-b", "torch", "--resume", str(empty), "--quiet", *small),
        specforge("run", DIGITS, "-b", "torch", "--run-dir", str(run_dir), "--quiet", *small),
        specforge("run", DIGITS, "-b", "torch", "--resume", str(run_dir), "--run-dir",
                  str(empty), "--quiet", *small))
    refused(other_spec, "spec differs", "--set")
    refused(no_run, "nothing to resume", str(empty))
    refused(again, "already holds a run", "--resume")
    refused(two_folders, "--resume names the run folder")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert list(empty.iterdir()) == []


def test_a_checkpoint_keeps_the_resuming_devices_optimizer_kernels(tmp_path):
    """A GPU writes fused optimizer groups; the CPU resumes them with its own kernels (and
    the other way round), the optimizer's state unchanged."""
    from specforge_torch.trainer import TorchTrainer

    program = compile_spec(DIGITS)
    writer = TorchTrainer(program, "cpu")
    x = np.random.default_rng(0).random((8, 8, 8, 1), dtype=np.float32)
    y = np.arange(8) % 10
    writer.train_step(x, y, 1e-3)
    for group in writer.optimizer.param_groups:
        group.update(fused=True, foreach=False)  # as make_optimizer chooses on a GPU
    loop = {"step": 1, "loss_sum": 0.0, "seen": 0, "confusion": [], "top_k_hits": {},
            "count": 0, "history": []}  # what the training loop's state holds
    writer.save_checkpoint(tmp_path / "checkpoint.pt", loop)
    reader = TorchTrainer(program, "cpu")
    chosen = [(g["fused"], g["foreach"]) for g in reader.optimizer.param_groups]
    reader.load_checkpoint(tmp_path / "checkpoint.pt")
    assert [(g["fused"], g["foreach"]) for g in reader.optimizer.param_groups] == chosen
    assert chosen[0] != (True, False)
    for p_w, p_r in zip(writer.params, reader.params, strict=True):
        for slot in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(writer.optimizer.state[p_w][slot],
                               reader.optimizer.state[p_r][slot])
    reader.train_step(x, y, 1e-3)


# --- 5. divergence -------------------------------------------------------------------------------

def test_nan_loss_stops_with_the_step(tmp_path):
    run_dir = tmp_path / "run"
    # Inputs 1000x larger and SGD at lr 100 (the maximum allowed): the loss overflows in steps
    # (at 100x it did with one run of dropout masks and stayed finite with another).
    result = cli("run", DIGITS, "-b", "torch", "--run-dir", str(run_dir), "--quiet",
                 *sets("optimizer.type=sgd", "optimizer.learning_rate=100",
                       "data.normalize.scale=1000", "training.epochs=2",
                       "training.steps_per_epoch=20"))
    message = refused(result, "at step", "lower the learning rate")
    step = int(re.search(r"at step (\d+)", message).group(1))
    logged = read_jsonl(run_dir / "steps.jsonl")
    assert logged[-1]["step"] == step and not math.isfinite(logged[-1]["loss"])
    assert all(math.isfinite(s["loss"]) for s in logged[:-1])
    assert not (run_dir / "summary.json").exists()


# --- 6. evaluate and predict ---------------------------------------------------------------------

def test_evaluate_and_predict_use_the_runs_checkpoint(digits_run, tmp_path):
    run_dir, _ = digits_run
    check_evaluate_and_predict(run_dir, tmp_path)


# --- 7. the Python API ---------------------------------------------------------------------------

def test_load_model_and_weights_round_trip():
    model = load_model(SPECS / "cifar.yaml")
    assert isinstance(model, torch.nn.Module)
    model.eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32),
                                                                  dtype=np.float32))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)

    program = compile_spec(SPECS / "cifar.yaml")
    backend = TorchBackend()
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
    with torch.no_grad():
        assert not torch.allclose(model(x), out)  # the imported weights are the ones used


# --- 8. checkpoints never run code ---------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_a_checkpoint_that_would_run_code_is_refused(digits_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(digits_run[0], run_dir)
    marker = tmp_path / "code-ran"
    torch.save({"model": _RunsCode(marker)}, run_dir / "checkpoint.pt")
    # the payload is live: an unrestricted load runs it
    torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    refused(cli("evaluate", str(run_dir)), f"{run_dir / 'checkpoint.pt'} is damaged")
    assert not marker.exists()


# --- 9. layer semantics against numpy ------------------------------------------------------------

# The model computes in float32 and numpy in float64 with another summation order: they agree
# to about 1e-6 relative on these small sums of O(1) terms; 1e-5 leaves room without hiding a
# wrong pad, window or order (those change results by O(0.1)).
TOL = {"rtol": 1e-5, "atol": 1e-5}


def tiny_model(tmp_path: Path, input_shape: tuple[int, ...], *layers: str
               ) -> tuple[Any, torch.nn.Module, dict[str, np.ndarray]]:
    """A compiled one-off spec and its torch model with random (positive-variance) weights,
    in evaluation mode."""
    path = tmp_path / "tiny.yaml"
    path.write_text(f"model:\n  input: {list(input_shape)}\n  layers:\n"
                    + "".join(f"    - {layer}\n" for layer in layers)
                    + "loss: {type: mse}\noptimizer: {type: sgd}\n", encoding="utf-8")
    program = compile_spec(path)
    rng = np.random.default_rng(42)
    weights = {}
    for name, value in initial_weights(program.graph, program.seed).items():
        low, high = (0.5, 1.5) if name.endswith("moving_var") else (-1.0, 1.0)
        weights[name] = rng.uniform(low, high, value.shape).astype(np.float32)
    model = create_model(program.graph, program.seed, weights).eval()
    return program, model, weights


def forward(model: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def node(program: Any, op: str) -> Any:
    return next(n for n in program.graph if n.op == op)


def same(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """docs/semantics.md: out = ceil(n / s), total = max((out - 1) s + k - n, 0), the odd
    pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def windows(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """(N, OH, OW, k, k, C) sliding windows of an NHWC array."""
    oh, ow = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    return np.stack([np.stack([x[:, i * s:i * s + k, j * s:j * s + k]
                               for j in range(ow)], axis=1) for i in range(oh)], axis=1)


@pytest.mark.parametrize(("mode", "kernel", "stride", "groups"), [
    ("zeros", 4, 2, 1), ("reflect", 4, 2, 1), ("replicate", 4, 2, 1),
    ("zeros", 3, 1, 2), ("reflect", 3, 1, 1)])
def test_conv2d_same_padding_and_modes(tmp_path, mode, kernel, stride, groups):
    program, model, w = tiny_model(
        tmp_path, (7, 7, 2),
        f"{{type: conv2d, filters: 4, kernel: {kernel}, strides: {stride}, padding: same, "
        f"padding_mode: {mode}, groups: {groups}}}", "{type: flatten}")
    pads = (*same(7, kernel, stride), *same(7, kernel, stride))
    assert node(program, "conv2d").attrs["pads"] == pads
    x = np.random.default_rng(0).standard_normal((3, 7, 7, 2)).astype(np.float32)
    np_mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
    padded = np.pad(x.astype(np.float64), ((0, 0), pads[:2], pads[2:], (0, 0)), np_mode)
    win = windows(padded, kernel, stride)  # (N, OH, OW, kh, kw, C)
    k, b = w["conv2d_1.kernel"].astype(np.float64), w["conv2d_1.bias"]
    cg, fg = 2 // groups, 4 // groups
    expected = np.concatenate(
        [np.einsum("nijabc,abcf->nijf", win[..., g * cg:(g + 1) * cg],
                   k[..., g * fg:(g + 1) * fg]) for g in range(groups)], axis=-1) + b
    out_size = -(-7 // stride)
    assert expected.shape == (3, out_size, out_size, 4)
    np.testing.assert_allclose(forward(model, x), expected.reshape(3, -1), **TOL)


def test_avg_pool_same_leaves_padding_out_of_the_divisor(tmp_path):
    program, model, _ = tiny_model(
        tmp_path, (7, 6, 3), "{type: avg_pool2d, pool: 3, strides: 2, padding: same}",
        "{type: flatten}")
    pads = (*same(7, 3, 2), *same(6, 3, 2))
    assert pads == (1, 1, 0, 1) and node(program, "avg_pool2d").attrs["pads"] == pads
    x = np.random.default_rng(1).uniform(1, 2, (2, 7, 6, 3))
    padded = np.pad(x, ((0, 0), pads[:2], pads[2:], (0, 0)), constant_values=np.nan)
    expected = np.nanmean(windows(padded, 3, 2), axis=(3, 4))
    actual = forward(model, x.astype(np.float32))
    np.testing.assert_allclose(actual, expected.reshape(2, -1), **TOL)
    zero_counted = windows(np.nan_to_num(padded), 3, 2).mean(axis=(3, 4))
    assert not np.allclose(actual, zero_counted.reshape(2, -1), atol=1e-2)


def test_max_pool_padding_never_wins(tmp_path):
    _, model, _ = tiny_model(
        tmp_path, (7, 6, 3), "{type: max_pool2d, pool: 3, strides: 2, padding: same}",
        "{type: flatten}")
    pads = (*same(7, 3, 2), *same(6, 3, 2))
    x = -np.random.default_rng(2).uniform(1, 2, (2, 7, 6, 3))  # every value negative
    padded = np.pad(x, ((0, 0), pads[:2], pads[2:], (0, 0)), constant_values=-np.inf)
    expected = windows(padded, 3, 2).max(axis=(3, 4))
    actual = forward(model, x.astype(np.float32))
    assert (actual < 0).all()
    np.testing.assert_allclose(actual, expected.reshape(2, -1), **TOL)


def test_flatten_is_height_width_channel(tmp_path):
    _, model, w = tiny_model(tmp_path, (3, 4, 2), "{type: flatten}",
                             "{type: dense, units: 5}")
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 2)).astype(np.float32)
    kernel, bias = w["dense_1.kernel"], w["dense_1.bias"]
    assert kernel.shape == (24, 5)  # neutral layout (in, units)
    expected = x.reshape(2, -1).astype(np.float64) @ kernel + bias
    actual = forward(model, x)
    np.testing.assert_allclose(actual, expected, **TOL)
    chw = x.transpose(0, 3, 1, 2).reshape(2, -1).astype(np.float64) @ kernel + bias
    assert not np.allclose(actual, chw, atol=1e-2)


def test_batch_norm_training_updates_with_unbiased_variance(tmp_path):
    program, model, w = tiny_model(tmp_path, (4, 5, 3), "{type: batch_norm}",
                                   "{type: flatten}")
    name = node(program, "batch_norm").name
    assert node(program, "batch_norm").attrs["decay"] == 0.9
    x = np.random.default_rng(4).normal(2.0, 3.0, (6, 4, 5, 3))
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    n = 6 * 4 * 5
    gamma, beta = w[f"{name}.gamma"], w[f"{name}.beta"]
    model.train()
    actual = forward(model, x.astype(np.float32))
    expected = gamma * (x - mean) / np.sqrt(var + 1e-5) + beta
    np.testing.assert_allclose(actual, expected.reshape(6, -1), **TOL)
    after = export_weights(model)
    np.testing.assert_allclose(after[f"{name}.moving_mean"],
                               0.9 * w[f"{name}.moving_mean"] + 0.1 * mean, **TOL)
    np.testing.assert_allclose(after[f"{name}.moving_var"],
                               0.9 * w[f"{name}.moving_var"] + 0.1 * var * n / (n - 1), **TOL)
    model.eval()
    moving_mean, moving_var = after[f"{name}.moving_mean"], after[f"{name}.moving_var"]
    expected_eval = gamma * (x - moving_mean) / np.sqrt(moving_var + 1e-5) + beta
    np.testing.assert_allclose(forward(model, x.astype(np.float32)),
                               expected_eval.reshape(6, -1), **TOL)


def test_leaky_relu_default_slope(tmp_path):
    program, model, _ = tiny_model(tmp_path, (3, 3, 2), "{type: flatten}",
                                   "{type: activation, fn: leaky_relu}")
    assert node(program, "activation").attrs["negative_slope"] == 0.01
    x = np.random.default_rng(5).standard_normal((4, 3, 3, 2)).astype(np.float32)
    flat = x.reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(forward(model, x), np.where(flat >= 0, flat, 0.01 * flat),
                               **TOL)


def test_gelu_is_exact_and_gelu_tanh_approximates(tmp_path):
    x = np.linspace(-4, 4, 3 * 3 * 2 * 8).reshape(8, 3, 3, 2).astype(np.float32)
    flat = x.reshape(8, -1).astype(np.float64)
    erf = np.vectorize(math.erf)
    exact = flat * (1 + erf(flat / math.sqrt(2))) / 2
    approx = flat * (1 + np.tanh(math.sqrt(2 / math.pi) * (flat + 0.044715 * flat ** 3))) / 2
    outputs = {}
    for fn in ("gelu", "gelu_tanh"):
        _, model, _ = tiny_model(tmp_path, (3, 3, 2), "{type: flatten}",
                                 f"{{type: activation, fn: {fn}}}")
        outputs[fn] = forward(model, x)
    np.testing.assert_allclose(outputs["gelu"], exact, **TOL)
    np.testing.assert_allclose(outputs["gelu_tanh"], approx, **TOL)
    assert np.abs(outputs["gelu"] - outputs["gelu_tanh"]).max() > 1e-4


# --- 10. bf16 and channels_last on CPU -----------------------------------------------------------

def test_bf16_and_channels_last_train_on_cpu(tmp_path):
    base = sets(SYNTHETIC, "training.epochs=1", "training.steps_per_epoch=5",
                "training.device=cpu")
    variants = {"fp32": [], "bf16": ["training.precision=bf16"],
                "channels_last": ["training.channels_last=true"]}
    results = run_all(*(specforge("run", DIGITS, "-b", "torch", "--run-dir",
                                  str(tmp_path / name), "--quiet", *base, *sets(*extra))
                        for name, extra in variants.items()))
    losses = {}
    for name, result in zip(variants, results, strict=True):
        ok(result)
        losses[name] = np.array([s["loss"] for s in read_jsonl(tmp_path / name / "steps.jsonl")])
        assert len(losses[name]) == 5 and np.isfinite(losses[name]).all(), name
    # another memory format may pick another kernel and summation order, not other numbers
    np.testing.assert_allclose(losses["channels_last"], losses["fp32"], rtol=0, atol=1e-5)
    assert not np.array_equal(losses["bf16"], losses["fp32"])  # autocast took effect
    # bf16 keeps 8 significant bits (~0.4% per rounding): a few steps stay within 5%
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.05)


@pytest.mark.parametrize(("setting", "mode"), [("true", "default"),
                                                ("reduce-overhead", "reduce-overhead"),
                                                ("max-autotune", "max-autotune"),
                                                ("false", None)])
def test_compile_modes_reach_torch_compile(monkeypatch, setting, mode):
    import torch
    from specforge_torch.trainer import TorchTrainer

    from specforge.compiler import compile_spec

    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    TorchTrainer(compile_spec(DIGITS, [f"training.compile={setting}"]), "cpu")
    assert modes == ([mode] if mode else [])


# --- idiomatic style: standalone, and trains digits as `specforge run` does ----------------------

def test_idiomatic_digits_script_alone_reaches_the_runs_accuracy(digits_run):
    run_dir, _ = digits_run
    accuracy = idiomatic_digits_accuracy("torch", SPECS)
    run = json.loads((run_dir / "summary.json").read_text())["test"]["accuracy"]
    assert abs(accuracy - run) <= 0.02, (accuracy, run)
    assert accuracy >= 0.95, accuracy


def test_both_styles_run_alone_on_image_folders(tmp_path):
    check_both_styles_alone_on_image_folders("torch", tmp_path)


# --- torch's own modules where they compute what specforge's layers do -----------------------
def _forward_and_gradient(module: Any, x: Any) -> tuple[Any, Any]:
    x = x.clone().requires_grad_(True)
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad


def _test_input() -> Any:
    x = torch.randn(3, 5, 9, 8, generator=torch.Generator().manual_seed(0)) * 4
    x[0, 0, 0, :3] = torch.tensor([0.0, 6.0, -0.0])  # the kinks of relu, relu6 and others
    return x


ACTIVATION_ATTRS = {"leaky_relu": {"negative_slope": 0.2}, "elu": {"alpha": 1.3},
                    "hard_sigmoid": {"alpha": 1 / 6, "beta": 0.5}}


@pytest.mark.parametrize("fn", sorted({*TORCH_ACTIVATIONS, "hard_sigmoid"}))
def test_torch_activation_modules_give_specforge_layers_bits(fn):
    """The recipe's torch module gives the bits of specforge's Activation layer, forward and
    backward (the model and built scripts use it in its place)."""
    attrs = {"fn": fn, **ACTIVATION_ATTRS.get(fn, {})}
    node = Node("a", "activation", ("x",), attrs, (9, 8, 5))
    module = module_for(node, (9, 8, 5))
    assert type(module).__module__.startswith("torch.nn")
    own = layers.Activation(fn, **ACTIVATION_ATTRS.get(fn, {}))
    for mine, theirs in zip(_forward_and_gradient(own, _test_input()),
                            _forward_and_gradient(module, _test_input()), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize(("op", "attrs"), [
    ("conv2d", {"pads": (1, 1, 1, 1)}), ("conv2d", {"pads": (2, 2, 0, 0), "strides": (2, 1)}),
    ("conv2d", {"pads": (2, 2, 2, 2), "dilation": (2, 2), "bias": False}),
    ("max_pool2d", {}), ("max_pool2d", {"pool": (3, 3), "strides": (1, 2), "dilation": (2, 1)}),
])
def test_torch_conv_and_pool_modules_give_specforge_layers_bits(op, attrs):
    if op == "conv2d":
        a = {"filters": 4, "kernel": (3, 3), "strides": (1, 1), "dilation": (1, 1),
             "groups": 1, "pad_mode": "zeros", "bias": True, **attrs}
        module = module_for(Node("c", op, ("x",), a, (1, 1, 4)), (9, 8, 5))
        own = layers.Conv2d(5, 4, a["kernel"], a["strides"], a["dilation"], 1, a["pads"],
                            "zeros", a["bias"])
        own.load_state_dict(module.state_dict())
    else:
        a = {"pool": (2, 2), "strides": (2, 2), "dilation": (1, 1), "pads": (0, 0, 0, 0),
             "ceil_mode": False, **attrs}
        module = module_for(Node("p", op, ("x",), a, (1, 1, 5)), (9, 8, 5))
        own = layers.MaxPool2d(a["pool"], a["strides"], a["pads"], a["dilation"])
    assert type(module).__module__.startswith("torch.nn")
    for mine, theirs in zip(_forward_and_gradient(own, _test_input()),
                            _forward_and_gradient(module, _test_input()), strict=True):
        assert torch.equal(mine, theirs)
