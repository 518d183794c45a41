"""The CI rule of tests/ci.py: with CI set, a test that importorskip would skip fails."""

from __future__ import annotations

import os
import sys

from tests.conftest import ROOT
from tests.processes import run_all

MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_framework_for_specforge")\n\n' \
    "def test_module():\n    pass\n"
TEST_SKIP = 'import pytest\n\n\ndef test_inside():\n    pytest.importorskip("no_such_framework_' \
    'for_specforge")\n\n\ndef test_present():\n    pytest.importorskip("numpy")\n'


def test_a_missing_framework_fails_under_ci_and_skips_elsewhere(tmp_path):
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    (tmp_path / "test_inside_skip.py").write_text(TEST_SKIP)
    # (without the last option a collection error stops the run: a failure too)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.ci",
               "--rootdir", str(tmp_path), str(tmp_path), "--continue-on-collection-errors"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    laptop, ci = run_all(command, command, cwd=tmp_path,
                         envs=[{**environment, "CI": ""}, {**environment, "CI": "true"}])
    assert laptop.returncode == 0, laptop.stdout[-2000:]
    assert "1 passed, 2 skipped" in laptop.stdout, laptop.stdout[-2000:]
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "1 failed, 1 passed, 1 error" in ci.stdout, ci.stdout[-2000:]
    assert "ERROR test_module_skip.py" in ci.stdout, ci.stdout[-2000:]
    assert "FAILED test_inside_skip.py::test_inside" in ci.stdout, ci.stdout[-2000:]
    assert "CI is set: every backend's framework must be installed" in ci.stdout


def test_ci_sets_ci():
    """.ci/run sets CI, so that the rule above holds on any machine that runs it."""
    script = (ROOT / ".ci" / "run").read_text()
    assert "export CI=true" in script
