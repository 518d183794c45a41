"""The README's two fresh-machine commands are the ones that CI and users run."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)


def test_readme_starts_with_setup_and_test_commands():
    main_job, tests = _readme_commands()[:2]
    assert "specforge" in main_job and "pip install" in main_job
    assert "pytest" in tests and "pip install" in tests


def test_ci_runs_the_readme_test_command():
    tests = _readme_commands()[1]
    assert tests in (ROOT / ".ci" / "run").read_text()
