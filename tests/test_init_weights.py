"""`specforge run --init-weights`, and `evaluate`/`predict`/`export` with given weights, in
both backends: tiny digits runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specforge.compiler import compile_spec
from specforge.weights import initial_weights, load_weights, save_weights
from tests.conftest import SPECS
from tests.processes import KERAS_BACKEND, ok, run_all, sets, specforge
from tests.test_onnx_export import cli_in_process

DIGITS = SPECS / "digits.yaml"
#: Two steps at a learning rate that leaves the weights where they started (within 1e-6).
TINY = sets("training.epochs=1", "training.steps_per_epoch=2",
            "optimizer.learning_rate=1e-9")


def test_runs_start_from_init_weights_and_evaluate_predict_export_take_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    program = compile_spec(DIGITS)
    start = initial_weights(program.graph, 123)  # not the spec's seed (0)
    save_weights(tmp_path / "start.npz", start)
    backends = ("torch", "keras")
    runs = {b: tmp_path / b for b in backends}
    for result in run_all(*(specforge("run", str(DIGITS), "-b", b, "--run-dir", str(runs[b]),
                                      "--init-weights", str(tmp_path / "start.npz"), "--quiet",
                                      *TINY) for b in backends)):
        ok(result)
    spec_seed = initial_weights(program.graph, program.seed)
    for b in backends:
        final = load_weights(runs[b] / "weights.npz")
        for name, value in start.items():
            assert np.abs(final[name] - value).max() < 1e-6, (b, name)
            assert np.abs(final[name] - spec_seed[name]).max() > 1e-2 or \
                not spec_seed[name].any(), (b, name)  # biases start at zero either way
        info = json.loads((runs[b] / "run.json").read_text())
        assert info["init_weights"] == str((tmp_path / "start.npz").resolve())

    # a spec with weights: the metrics the run reported for the same weights (in this
    # process: two more interpreters would double the test's time)
    monkeypatch.setenv("KERAS_BACKEND", KERAS_BACKEND)
    for b in backends:
        code, out, err = cli_in_process(monkeypatch, capsys, "evaluate", str(DIGITS), "-b", b,
                                        "--weights", str(runs[b] / "weights.npz"))
        summary = json.loads((runs[b] / "summary.json").read_text())["test"]
        assert code == 0, err
        assert json.loads(out) == pytest.approx(summary, rel=1e-6), b

    # export of the run folder: its final weights and class names
    code, _, err = cli_in_process(monkeypatch, capsys, "export", str(runs["torch"]), "-o",
                               str(tmp_path / "run.onnx"))
    assert code == 0, err
    import onnx

    from tests.test_onnx_export import FORWARD_RTOL, difference, onnx_outputs, reference

    model = onnx.load(str(tmp_path / "run.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == [str(i) for i in range(10)]
    final = load_weights(runs["torch"] / "weights.npz")
    pixels = np.random.default_rng(0).integers(0, 17, (3, 8, 8, 1)).astype(np.uint8)
    x = pixels.astype(np.float32) * np.float32(1 / 16)  # digits' normalize: scale 1/16
    exported = onnx_outputs(model, x)
    assert difference(exported, reference(program, final, x)).max_rel <= FORWARD_RTOL

    # predict with a spec and weights: the exported model's probabilities
    paths = []
    for i, image in enumerate(pixels):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image[..., 0], "L").save(paths[-1])
    code, out, err = cli_in_process(monkeypatch, capsys, "predict", str(DIGITS),
                                    *map(str, paths), "-b", "torch", "--weights",
                                    str(runs["torch"] / "weights.npz"))
    assert code == 0, err
    predicted = [json.loads(line) for line in out.splitlines()]
    assert np.allclose([p["probabilities"] for p in predicted], exported, atol=2e-6)
    assert [p["class"] for p in predicted] == [str(k) for k in exported.argmax(axis=1)]


def test_bad_init_weights_are_refused_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    program = compile_spec(DIGITS)
    wrong = initial_weights(program.graph, 1)
    del wrong["conv2d_1.bias"]
    save_weights(tmp_path / "wrong.npz", wrong)
    run_dir = tmp_path / "run"
    code, _, err = cli_in_process(monkeypatch, capsys, "run", str(DIGITS), "-b", "torch",
                               "--run-dir", str(run_dir), "--init-weights",
                               str(tmp_path / "wrong.npz"))
    assert code == 2 and "--init-weights" in err and "missing ['conv2d_1.bias']" in err, err
    assert not run_dir.exists()
    save_weights(tmp_path / "right.npz", initial_weights(program.graph, 1))
    code, _, err = cli_in_process(monkeypatch, capsys, "run", str(DIGITS), "-b", "torch",
                               "--resume", str(run_dir), "--init-weights",
                               str(tmp_path / "right.npz"))
    assert code == 2 and "--init-weights starts a new run" in err, err
    code, _, err = cli_in_process(monkeypatch, capsys, "evaluate", str(DIGITS), "--weights",
                               str(tmp_path / "right.npz"))
    assert code == 2 and "name the backend with --backend" in err, err
