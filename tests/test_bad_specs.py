"""A corpus of malformed specs: each must fail with exit code 2, a located message, no traceback.

Every ``tests/bad_specs/*.yaml`` starts with comment lines stating what `specforge validate`
must report for it:

    # expect-line: 7                    the FIRST error names FILE:7:COL
    # expect: unknown field 'activaton' a substring of stderr (repeatable)
    # args: --max-params 1000           extra command-line arguments (optional)
    # expect-file: support/base.yaml    the first error is in this file, relative to the
                                        spec's folder (optional; default: the spec itself)

Files under ``tests/bad_specs/support/`` are helpers that other specs refer to, not cases.
A case whose expectation the compiler does not meet yet is listed in ``KNOWN_BUGS``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BAD_SPECS = Path(__file__).resolve().parent / "bad_specs"

#: Cases the compiler gets wrong today, with what goes wrong. strict: a fix makes them XPASS.
KNOWN_BUGS: dict[str, str] = {}


@dataclass
class Case:
    path: Path
    line: int
    expects: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    error_file: str = ""


def _parse(path: Path) -> Case:
    """Read the `# expect...` header (the file's leading comment lines)."""
    case = Case(path, 0)
    # latin-1 reads any bytes: one case is deliberately not valid UTF-8.
    for line in path.read_text(encoding="latin-1").splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].strip().partition(":")
        value = value.strip()
        if not sep:
            continue
        if key == "expect-line":
            case.line = int(value)
        elif key == "expect":
            case.expects.append(value)
        elif key == "args":
            case.args = shlex.split(value)
        elif key == "expect-file":
            case.error_file = str((path.parent / value).resolve())
    assert case.line > 0, f"{path.name}: no `# expect-line:` header"
    assert case.expects, f"{path.name}: no `# expect:` header"
    return case


def _case_files() -> list[Path]:
    return sorted(BAD_SPECS.glob("*.yaml"))  # not recursive: support/ holds helpers


def _params() -> list[object]:
    params = []
    for path in _case_files():
        marks = []
        if path.stem in KNOWN_BUGS:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[path.stem]))
        params.append(pytest.param(path, id=path.stem, marks=marks))
    return params


def _validate(path: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    rel = path.relative_to(ROOT)
    return subprocess.run([sys.executable, "-m", "specforge", "validate", str(rel), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_the_corpus_is_large_enough():
    assert len(_case_files()) >= 25


def test_every_known_bug_names_a_case():
    assert set(KNOWN_BUGS) <= {p.stem for p in _case_files()}


@pytest.mark.parametrize("path", _params())
def test_bad_spec_is_rejected_with_a_located_message(path: Path):
    case = _parse(path)
    result = _validate(path, case.args)
    report = f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, report
    assert "Traceback" not in result.stderr, report
    assert result.stdout == "", report
    where = case.error_file or str(path.relative_to(ROOT))
    # The files' names describe their mistakes: they must not satisfy an expectation.
    text = result.stderr.replace(str(path.relative_to(ROOT)), "<spec>").replace(where, "<spec>")
    for expected in case.expects:
        assert expected in text, f"missing {expected!r}\n{report}"
    first = next((line for line in result.stderr.splitlines() if "error: " in line), "")
    assert first.startswith(f"{where}:{case.line}:"), f"first error: {first!r}\n{report}"
    assert re.match(rf"{re.escape(where)}:{case.line}:\d+: error: ", first), report


def test_alias_bomb_fails_fast():
    path = BAD_SPECS / "yaml_alias_bomb.yaml"
    start = time.perf_counter()
    result = _validate(path, [])
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert "expands to more than" in result.stderr
    assert elapsed < 5, f"took {elapsed:.1f} s"
