"""Damaged run folders: every file specforge reads back from a run folder is checked, and a
damaged one is refused by name with what is wrong with it (exit code 2, no traceback), by
`evaluate`, `predict` and `run --resume` alike. Checkpoints and weights files carry their
sha256, so that changed numbers are found too."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from specforge.cli import main
from specforge.weights import load_weights, save_weights
from tests.conftest import SPECS
from tests.processes import cli_here, refused, run_all, sets, specforge

torch = pytest.importorskip("torch")
pytest.importorskip("keras")

DIGITS = str(SPECS / "digits.yaml")
TINY = sets("training.epochs=1", "training.steps_per_epoch=3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished three-step digits run of each backend (in this process: seconds less)."""
    root = tmp_path_factory.mktemp("runs")
    folders = {b: root / b for b in ("torch", "keras")}
    with pytest.MonkeyPatch.context() as patch:
        for backend, folder in folders.items():
            patch.setattr(sys, "argv", ["specforge", "run", DIGITS, "-b", backend,
                                        "--run-dir", str(folder), "--quiet", *TINY])
            with pytest.raises(SystemExit) as exited:
                main()
                raise SystemExit(0)
            assert exited.value.code in (0, None), backend
    return folders


def copy_of(runs: dict[str, Path], backend: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs[backend], tmp_path / backend))


def check_refused(capsys, run_dir: Path, damaged: Path, *phrases: str) -> None:
    """`evaluate`, `predict` and `run --resume` each refuse ``run_dir``, naming ``damaged``."""
    image = run_dir.parent / "digit.png"
    if not image.exists():
        from PIL import Image

        Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(image)
    backend = json.loads((run_dir / "run.json").read_text())["backend"] \
        if damaged.name != "run.json" else "torch"
    for args in (["evaluate", str(run_dir)], ["predict", str(run_dir), str(image)],
                 ["run", DIGITS, "-b", backend, "--resume", str(run_dir), "--quiet", *TINY]):
        code, err = cli_here(capsys, *args)
        assert code == 2, (args, err)
        assert f"{damaged} is damaged" in err, (args, err)
        for phrase in phrases:
            assert phrase in err, (args, err)


# --- torch checkpoints -------------------------------------------------------------------

def rewrite_checkpoint(path: Path, change: Callable[[dict], object], digest: bool = True
                       ) -> None:
    """checkpoint.pt with its contents changed, and (``digest``) the sha256 recomputed, as
    a writer that meant it would: the checks after the digest's must find it."""
    from specforge_torch.trainer import checkpoint_digest

    state = torch.load(path, weights_only=True)
    new = change(state)
    if isinstance(new, dict) and digest:
        new["sha256"] = checkpoint_digest(new)
    torch.save(new, path)


def other_models_weights(state: dict) -> dict:
    from specforge_torch.model import create_model

    from specforge.compiler import compile_spec

    other = compile_spec(DIGITS, ["model.layers.0.filters=3"])
    return {**state, "model": create_model(other.graph, 0).state_dict()}


TORCH_DAMAGE = {
    "a tensor": (lambda s: torch.zeros(3), ["holds a Tensor", "not a specforge checkpoint"]),
    "a list": (lambda s: [1, 2], ["holds a list"]),
    "an empty model": (lambda s: {**s, "model": {}}, ["not this spec's model's", "missing"]),
    "another model's weights": (other_models_weights, ["not this spec's model's",
                                                       "wrong shapes"]),
    "loop state that is not JSON": (lambda s: {**s, "loop": "{step: 3"},
                                    ["loop state is not JSON"]),
    "loop state without its step": (lambda s: {**s, "loop": json.dumps({"history": []})},
                                    ["loop state lacks 'step'"]),
}


@pytest.mark.parametrize("damage", TORCH_DAMAGE, ids=lambda d: d.replace(" ", "-"))
def test_a_damaged_torch_checkpoint_is_refused_by_name(runs, tmp_path, capsys, damage):
    run_dir = copy_of(runs, "torch", tmp_path)
    change, phrases = TORCH_DAMAGE[damage]
    rewrite_checkpoint(run_dir / "checkpoint.pt", change)
    check_refused(capsys, run_dir, run_dir / "checkpoint.pt", *phrases)


def test_changed_floats_in_a_torch_checkpoint_are_found_by_its_sha256(runs, tmp_path, capsys):
    """Every float of one tensor overwritten in the file's bytes (torch.load notices
    nothing): evaluate used to report accuracy 0.100 instead of refusing."""
    run_dir = copy_of(runs, "torch", tmp_path)
    path = run_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    kernel = next(v for k, v in state["model"].items() if k.endswith("weight"))
    data, original = path.read_bytes(), kernel.numpy().tobytes()
    assert data.count(original) == 1
    path.write_bytes(data.replace(original, np.full(kernel.numel(), 0.5, np.float32).tobytes()))
    # the file still loads, with the changed numbers
    assert torch.load(path, weights_only=True)["model"] is not None
    check_refused(capsys, run_dir, path, "sha256")


# --- Keras checkpoints -------------------------------------------------------------------

def keras_files(run_dir: Path) -> dict[str, Path]:
    pointer = json.loads((run_dir / "checkpoint.json").read_text())
    return {"pointer": run_dir / "checkpoint.json", "weights": run_dir / pointer["weights"],
            "state": run_dir / pointer["state"]}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def edit_pointer(path: Path, change: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def without(key: str) -> Callable[[dict], dict]:
    return lambda pointer: {k: v for k, v in pointer.items() if k != key}


KERAS_DAMAGE = {
    # (which file is damaged, how, what the message says)
    "a truncated state file": ("state", truncate, ["sha256"]),
    "a truncated state file, no digests": (
        "state", lambda p: (truncate(p), edit_pointer(p.parent / "checkpoint.json",
                                                     without("sha256"))),
        ["not a readable .npz archive"]),
    "a changed weights file": ("weights", lambda p: p.write_bytes(p.read_bytes()[:-1] + b"x"),
                               ["sha256"]),
    "a pointer that is a list": ("pointer", lambda p: p.write_text("[1, 2]"),
                                 ["JSON list"]),
    "a pointer without the loop state": ("pointer", lambda p: edit_pointer(p, without("loop")),
                                         ["lacks the loop state"]),
    "a pointer that is not JSON": ("pointer", lambda p: p.write_text("{weights: "),
                                   ["not JSON"]),
    "a pointer out of its folder": (
        "pointer", lambda p: edit_pointer(p, lambda d: {**d, "state": "../x.npz"}),
        ["not the name of a file in its folder"]),
}


@pytest.mark.parametrize("damage", KERAS_DAMAGE, ids=lambda d: d.replace(" ", "-"))
def test_a_damaged_keras_checkpoint_is_refused_by_name(runs, tmp_path, capsys, damage):
    run_dir = copy_of(runs, "keras", tmp_path)
    which, change, phrases = KERAS_DAMAGE[damage]
    path = keras_files(run_dir)[which]
    change(path)
    check_refused(capsys, run_dir, path, *phrases)


# --- run.json and spec.yaml --------------------------------------------------------------

FOLDER_DAMAGE = {
    "run.json that is not JSON": ("run.json", '{"backend": ', ["not JSON"]),
    "run.json that is a list": ("run.json", '["torch"]', ["JSON list"]),
    "run.json without the backend": ("run.json", '{"name": "digits"}', ["'backend'"]),
    "spec.yaml with a python tag": ("spec.yaml", "name: !!python/name:os.system\n",
                                    ["not the plain YAML", "python/name"]),
}


@pytest.mark.parametrize("damage", FOLDER_DAMAGE, ids=lambda d: d.replace(" ", "-"))
def test_a_damaged_run_json_or_spec_is_refused_by_name(runs, tmp_path, capsys, damage):
    run_dir = copy_of(runs, "torch", tmp_path)
    name, text, phrases = FOLDER_DAMAGE[damage]
    (run_dir / name).write_text(text)
    check_refused(capsys, run_dir, run_dir / name, *phrases)


@pytest.mark.slow
def test_the_command_line_refuses_a_damaged_folder_without_a_traceback(runs, tmp_path):
    """The same through the `specforge` process for one damage of each backend."""
    torch_run, keras_run = copy_of(runs, "torch", tmp_path), copy_of(runs, "keras", tmp_path)
    torch.save([1, 2], torch_run / "checkpoint.pt")
    truncate(keras_files(keras_run)["state"])
    results = run_all(specforge("evaluate", str(torch_run)),
                      specforge("evaluate", str(keras_run)))
    refused(results[0], f"{torch_run / 'checkpoint.pt'} is damaged")
    refused(results[1], f"{keras_files(keras_run)['state']} is damaged")


# --- weights files -----------------------------------------------------------------------

def test_a_weights_file_carries_its_sha256(runs, tmp_path):
    """weights.npz rewritten with one changed tensor and the old comment (its zip CRCs
    are right: only the sha256 can tell) is refused by name; the intact one loads."""
    path = copy_of(runs, "torch", tmp_path) / "weights.npz"
    weights = load_weights(path)
    with zipfile.ZipFile(path) as archive:
        comment = archive.comment
    assert comment.startswith(b"specforge-sha256:")
    name = sorted(weights)[0]
    changed = tmp_path / "changed.npz"
    np.savez(changed, **{**weights, name: weights[name] + 1})
    with zipfile.ZipFile(changed, "a") as archive:
        archive.comment = comment
    from specforge.runfolder import DamagedFile

    with pytest.raises(DamagedFile, match=f"{changed} is damaged: .*sha256"):
        load_weights(changed)
    # a file written elsewhere, without a digest, loads; and a round trip keeps every bit
    plain = tmp_path / "plain.npz"
    np.savez(plain, **weights)
    save_weights(tmp_path / "again.npz", load_weights(plain))
    again = load_weights(tmp_path / "again.npz")
    assert all(np.array_equal(again[k], weights[k]) for k in weights)


def test_predict_refuses_a_decompression_bomb_by_name(runs, capsys, tmp_path):
    from tests.test_data import png_declaring

    bomb = png_declaring(tmp_path / "huge.png", 20000, 20000)
    code, err = cli_here(capsys, "predict", str(runs["torch"]), str(bomb))
    assert code == 2 and f"cannot read image {bomb}" in err, err
