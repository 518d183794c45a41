"""Under CI a missing framework fails the tests instead of skipping them.

``pytest.importorskip`` lets a machine without torch or Keras skip their tests, which is
right on a developer's laptop and wrong in CI: CI installs every backend
(``.ci/run``), so a skip there means a backend went untested while CI passed. When the
environment variable ``CI`` is set (as ``.ci/run`` and hosted CI services set it), a skip
caused by a failed import is turned into a failure that names the module.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

#: The start of the reason pytest.importorskip gives when the import fails.
IMPORT_SKIP = "could not import"


def in_ci() -> bool:
    """Whether the tests run under CI (``CI`` set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail_import_skip(report: Any) -> None:
    """Turn ``report`` (a skip) into a failure if an import caused the skip, under CI."""
    if not (report.skipped and in_ci()):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if IMPORT_SKIP in reason:
        report.outcome = "failed"
        report.longrepr = (f"{reason}\nCI is set: every backend's framework must be installed "
                           "(.ci/run installs them), so this skip fails the run")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: Any) -> Generator[None, Any, None]:
    """A module-level importorskip skips the whole module while it is collected."""
    outcome = yield
    _fail_import_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Generator[None, Any, None]:
    """An importorskip inside a test skips that test."""
    outcome = yield
    _fail_import_skip(outcome.get_result())
