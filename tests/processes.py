"""Running the CLI in subprocesses, shared by the backend tests."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

# One intra-op thread per process: exact loss comparisons need both processes to reduce in
# the same order (which depends on the thread count), and on a 2-core machine two
# single-threaded processes run side by side instead of fighting over the cores.
# Every subprocess gets the same KERAS_BACKEND, so that "equal" compares the same kernels.
KERAS_BACKEND = "tensorflow" if importlib.util.find_spec("tensorflow") else "torch"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
       "KERAS_BACKEND": KERAS_BACKEND}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def specforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "specforge", *args]


def run_all(*commands: list[str], cwd: Path = ROOT, timeout: float = 300,
            env: dict[str, str] | None = None,
            envs: list[dict[str, str]] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands side by side (``envs``: one environment each); results in order."""
    envs = envs or [env or ENV] * len(commands)
    procs = [subprocess.Popen(c, cwd=cwd, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for c, e in zip(commands, envs, strict=True)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def cli(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_all(specforge(*args), cwd=cwd, timeout=timeout)[0]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}\n{result.stdout[-2000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result


def refused(result: subprocess.CompletedProcess[str], *phrases: str) -> str:
    """A user error: exit code 2, a message with every phrase, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    return result.stderr


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def stop_after_steps(process: subprocess.Popen[str], steps: Path, count: int = 10,
                     wait: float = 120, signal_number: int = signal.SIGTERM) -> str:
    """SIGTERM (or ``signal_number``) to a `specforge run` ``process`` once its run folder's
    ``steps`` log holds ``count`` lines (within 240 s); its stderr, once it has exited."""
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if steps.exists() and steps.read_text().count("\n") >= count:
            process.send_signal(signal_number)
            break
        time.sleep(0.005)
    return process.communicate(timeout=wait)[1]


def check_evaluate_and_predict(run_dir: Path, images_dir: Path) -> None:
    """`specforge evaluate` gives the run's test metrics, and `predict` classifies five
    digits images (the run trained on digits) as a ~98% model does."""
    import numpy as np
    import pytest
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in range(5):
        path = images_dir / f"digit{i}.png"
        # the digits source uses these very pixel values (0..16) as uint8
        Image.fromarray(digits.images[i].astype(np.uint8), "L").save(path)
        paths.append(path)
    evaluated, predicted = run_all(specforge("evaluate", str(run_dir)),
                                   specforge("predict", str(run_dir), *map(str, paths)))
    summary = json.loads((run_dir / "summary.json").read_text())
    # the final checkpoint holds the weights the run was tested with; same code and data
    assert json.loads(ok(evaluated).stdout) == summary["test"]

    lines = [json.loads(line) for line in ok(predicted).stdout.splitlines()]
    assert [line["image"] for line in lines] == list(map(str, paths))
    for line in lines:
        probabilities = line["probabilities"]
        assert len(probabilities) == 10 and min(probabilities) >= 0
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)  # each rounded to 6 places
        assert line["class"] == str(int(np.argmax(probabilities)))
    correct = sum(line["class"] == str(digits.target[i]) for i, line in enumerate(lines))
    assert correct >= 4  # a ~98% model


# Runs a script (argv[1]) in a process where specforge cannot be imported: a built script
# must stand alone.
_WITHOUT_SPECFORGE = """\
import runpy, sys
class NoSpecforge:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('specforge', 'specforge_torch', 'specforge_keras'):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoSpecforge())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def without_specforge(script: Path | str, *args: str) -> list[str]:
    """The command that runs ``script`` with ``args`` where specforge cannot be imported."""
    return [sys.executable, "-c", _WITHOUT_SPECFORGE, str(script), *args]


def image_folders(root: Path, classes: int = 3, per_class: int = 8, size: int = 36) -> Path:
    """train/ and test/ folders of random PNGs, one subfolder per class; returns ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, count in (("train", per_class), ("test", 2)):
        for c in range(classes):
            folder = root / part / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def idiomatic_digits_accuracy(backend: str, specs: Path) -> float:
    """The test accuracy that generated/digits_BACKEND.py (as committed) reaches, run where
    specforge cannot be imported. torch prints "test: loss 0.07  accuracy 0.98 ...", Keras
    "test: {'accuracy': 0.97, ...}"."""
    script = ROOT / "generated" / f"digits_{backend}.py"
    result = ok(run_all(without_specforge(script, "--data-dir", str(specs)), timeout=600)[0])
    found = re.search(r"accuracy'?:? ([0-9.]+)", result.stdout.splitlines()[-1])
    assert found, result.stdout[-500:]
    return float(found.group(1))


def check_both_styles_alone_on_image_folders(backend: str, folder: Path) -> None:
    """The seed spec (image folders, augmentation, steps_per_epoch), shortened, built in
    both styles and run where specforge cannot be imported."""
    folders = image_folders(folder)
    short = sets("training.epochs=2", "training.steps_per_epoch=3", "data.batch_size=4")
    scripts = {style: folder / f"cifar_{style}.py" for style in ("idiomatic", "exact")}
    for result in run_all(*(specforge("build", "specs/cifar.yaml", "-b", backend, "--style",
                                      style, "-o", str(path), *short)
                            for style, path in scripts.items())):
        ok(result)
    results = run_all(*(without_specforge(path, "--data-dir", str(folders))
                        for path in scripts.values()), timeout=600)
    for result in results:
        ok(result)
        assert "test" in result.stdout.splitlines()[-1], result.stdout[-500:]


def cli_here(capsys: Any, *args: str) -> tuple[int, str]:
    """`specforge ARGS` in this process (a fraction of a second where a fresh interpreter
    takes seconds to import torch or Keras): its exit code and stderr. An exception other
    than SystemExit escapes and fails the test, as a traceback would."""
    from specforge.cli import main

    argv = sys.argv
    sys.argv = ["specforge", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


#: The largest N-step tolerance the short digits runs of the tests may get from `specforge
#: conform`, whatever its chaos floor: the loss, and any other quantity. Measured: the loss's
#: is 2.5e-5 (its rounding allowance), the others' at most 2.9e-4 (an Adam slot after 20
#: steps); an inflated floor (a broken perturbed run) would exceed these.
LOSS_TOLERANCE_CEILING, TOLERANCE_CEILING = 1e-4, 1e-3


def n_step_tolerances(conform: Path) -> dict[str, float]:
    """Each quantity's N-step tolerance from a `specforge conform` report (folder
    ``conform``), each checked against the report's own ceiling and the absolute ones
    above: an inflated chaos floor cannot let a wrong result pass a test."""
    report = json.loads((conform / "report.json").read_text())
    rows = [r for r in report["rows"] if r["phase"] == "after N steps"]
    for row in rows:
        limit = LOSS_TOLERANCE_CEILING if row["quantity"] == "loss per step" else \
            TOLERANCE_CEILING
        assert row["tolerance"] <= min(row["ceiling"], limit), row
    return {r["quantity"]: r["tolerance"] for r in rows}
