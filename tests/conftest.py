"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"

#: Layers (a YAML flow list, without its closing head) that together use every forward op
#: and option of the IR (a squeeze-and-excitation gate among them) up to a concat: the
#: forward reference and the backward reference each end it with their own head.
#: Input (9, 10, 2).
EVERY_OP_LAYERS = (
    "[{type: conv2d, filters: 4, kernel: [2, 3], strides: 2, padding: same,"
    " padding_mode: reflect, activation: {fn: leaky_relu, negative_slope: 0.2}},"
    " {type: conv2d, filters: 4, kernel: 3, dilation: 2, groups: 2, padding: 2,"
    " padding_mode: replicate, activation: gelu},"
    " {type: avg_pool2d, pool: 2, strides: 1, padding: same},"
    " {type: depthwise_conv2d, kernel: 3, depth_multiplier: 2, padding: same,"
    " activation: elu},"
    " {type: max_pool2d, pool: 3, strides: 2, padding: same},"
    " {type: pad2d, padding: {top: 1, bottom: 0, left: 0, right: 2}, mode: reflect},"
    " {type: cropping2d, cropping: {top: 1, bottom: 0, left: 1, right: 1}},"
    " {type: channel_shuffle, groups: 4},"
    " {type: rescaling, scale: 0.5, offset: [0.1, -0.2, 0.3, 0, 1, -1, 2, 0.5]},"
    " {type: batch_norm, name: bn}, {type: activation, fn: hard_swish, name: hs},"
    " {type: global_avg_pool2d, name: squeeze, inputs: bn},"
    " {type: dense, units: 8, activation: sigmoid, name: excite},"
    " {type: multiply, inputs: [hs, excite], name: gated},"
    " {type: layer_norm, epsilon: 0.01, name: ln, inputs: bn}, {type: prelu, name: pr},"
    " {type: group_norm, groups: 4, epsilon: 0.01, name: gn},"
    " {type: activation, fn: silu, name: branch},"
    " {type: concat, inputs: [gated, branch]}, {type: channel_slice, start: 3, stop: 13},")


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m specforge ARGS` in a fresh interpreter."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "specforge", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=full_env, timeout=timeout)


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write YAML text to a file in tmp_path and return its path."""
    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path
    return write


MINIMAL = """\
model:
  input: [8, 8, 1]
  layers:
    - {type: conv2d, filters: 4, kernel: 3}
    - {type: flatten}
    - {type: dense, units: 3, activation: softmax}
loss: {type: cross_entropy}
optimizer: {type: sgd}
"""


def run_in_process(*args: str) -> tuple[int, str, str]:
    """`specforge ARGS` through the CLI's own entry point (`main`), in this process: no
    interpreter start-up. Returns (exit code, stdout, stderr); an exception that `main` lets
    through propagates, as the traceback a user would see."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from specforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["specforge", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


# Under CI a missing framework fails instead of skipping (see tests/ci.py).
pytest_plugins = ["tests.ci"]
