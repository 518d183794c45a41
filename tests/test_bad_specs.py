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
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import Strict

from specforge.cli import DEFAULT_MAX_MEMORY, DEFAULT_MAX_PARAMS
from specforge.compiler import compile_spec
from specforge.ir import expand, memory
from specforge.ir.memory import SYNTHETIC_BYTES_PER_VALUE, estimate_memory, parse_size
from specforge.spec import source
from specforge.spec.layers import SpecModel
from tests.conftest import run_in_process

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
def test_bad_spec_is_rejected_with_a_located_message(path: Path, monkeypatch):
    case = _parse(path)
    # in this process, through the CLI's entry point: a subprocess per case cost ~0.5 s each
    # (test_the_real_command_refuses_a_python_tag runs one)
    monkeypatch.chdir(ROOT)
    code, stdout, stderr = run_in_process("validate", str(path.relative_to(ROOT)), *case.args)
    result = subprocess.CompletedProcess([], code, stdout, stderr)
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


def test_the_real_command_refuses_a_python_tag():
    result = _validate(BAD_SPECS / "yaml_tag_python_name.yaml", [])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.startswith("tests/bad_specs/yaml_tag_python_name.yaml:5:7: error: name: "
                                    "unsupported YAML tag '!!python/name:os.system'"), result.stderr


def test_alias_bomb_fails_fast():
    path = BAD_SPECS / "yaml_alias_bomb.yaml"
    start = time.perf_counter()
    result = _validate(path, [])
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert "expands to more than" in result.stderr
    assert elapsed < 5, f"took {elapsed:.1f} s"


# --- cases a text file in bad_specs/ cannot hold, run in-process (no interpreter start-up) ---

#: A valid spec whose line 4 is `name: digits` (column 7 starts the value).
SMALL_SPEC = """\
# a valid spec
seed: 1
description: small
name: digits
model:
  input: [8, 8, 1]
  layers: [{type: conv2d, filters: 4, kernel: 3}, {type: flatten}, {type: dense, units: 10}]
loss: {type: cross_entropy}
optimizer: {type: adam}
"""


@pytest.mark.parametrize("character, name", [
    ("\x00", "NUL"), ("\x0c", "form feed"), ("\x1b", "escape"), ("\x0b", "vertical tab"),
    ("\uffff", "noncharacter")], ids=["nul", "form_feed", "escape", "vertical_tab", "uffff"])
def test_control_character_is_located_by_line_and_column(tmp_path, character, name):
    text = SMALL_SPEC.replace("name: digits", f"name: dig{character}its")
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    code, out, err = run_in_process("validate", str(path))
    assert code == 2 and out == "", err
    assert err.startswith(f"{path}:4:10: error: the file holds the character "
                          f"U+{ord(character):04X} ({name})"), err
    assert "    4 | name: dig?its\n" in err  # quoted without the character itself
    assert "\x1b" not in err and "\x00" not in err


def test_a_date_is_text_not_a_traceback(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SMALL_SPEC.replace("name: digits", "name: 2024-02-30"), encoding="utf-8")
    assert compile_spec(path).name == "2024-02-30"


@pytest.mark.parametrize("override, message", [
    ("training.epochs=2024-02-30", 'training.epochs: expected a whole number (got "2024-02-30")'),
    ("name=!!python/name:os.system", "unsupported YAML tag '!!python/name:os.system'"),
    ("seed=!!int abc", "'abc' is not a valid int"),
    ("training.epochs='5'", 'training.epochs: expected a whole number (got "5")'),
    ("data={source: {type: synthetic}, batch_size: true}",
     "data.batch_size: true is not an accepted value"),
    ("optimizer.learning_rate=true", "optimizer.learning_rate: expected a number (got true)"),
    ("model.layers.0.bias=1", "model.layers[0].bias: expected true or false (got 1)"),
    ("data={source: {type: synthetic, samples: '64'}}",
     'data.source.samples: expected a whole number (got "64")'),
], ids=["date_as_epochs", "python_tag", "int_tag", "quoted_count", "boolean_count",
        "boolean_float", "integer_flag", "quoted_samples"])
def test_set_values_are_read_strictly_and_located(tmp_path, override, message):
    path = tmp_path / "spec.yaml"
    path.write_text(SMALL_SPEC, encoding="utf-8")
    code, out, err = run_in_process("validate", str(path), "--set", override)
    assert code == 2 and out == "", err
    assert err.startswith(f"--set {override}: error: "), err
    assert message in err, err


def test_nested_repeat_explosion_stops_in_well_under_a_second():
    path = BAD_SPECS / "blocks_nested_repeat_explosion.yaml"
    start = time.process_time()
    code, _, err = run_in_process("validate", str(path))
    elapsed = time.process_time() - start
    assert code == 2 and "expands to more than 10,000 layers" in err, err
    assert elapsed < 0.5, f"{elapsed:.2f} s of CPU"


def test_a_spec_that_never_ends_is_read_only_to_the_size_limit(tmp_path):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")  # st_size 0, endless
    path = tmp_path / "spec.yaml"
    path.write_text("extends: zero.yaml\n", encoding="utf-8")
    code, _, err = run_in_process("validate", str(path))
    assert code == 2, err
    assert "/dev/zero: error: spec file is over 1,000,000 bytes, the limit" in err, err
    assert f"reached through {path}:1:10" in err, err


def test_max_memory_raises_the_limit_and_rejects_a_non_size():
    path = BAD_SPECS / "memory_cli_limit.yaml"
    assert run_in_process("validate", str(path), "--max-memory", "16MiB")[0] == 0
    assert run_in_process("validate", str(path), "--max-memory", "8MiB")[0] == 2
    code, _, err = run_in_process("validate", str(path), "--max-memory", "lots")
    assert code == 2 and "--max-memory 'lots' is not a size" in err, err


def test_the_memory_estimate_adds_up_its_parts():
    program = compile_spec(BAD_SPECS / "memory_cli_limit.yaml", max_memory=2**40)
    estimate = estimate_memory(program)
    # input 32*32*1, conv 30*30*64, pool 64, dense 10 values per sample; batch 32; float32
    assert estimate.activations == 32 * 4 * (32 * 32 + 30 * 30 * 64 + 64 + 10)
    # 1,290 weights: value, gradient and Adam's two moments
    assert estimate.parameters == 1_290 * 4 * 4
    assert estimate.data == 64 * 32 * 32 * SYNTHETIC_BYTES_PER_VALUE
    assert estimate.total == estimate.activations + estimate.parameters + estimate.data


def test_readme_states_the_limits_the_code_enforces():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Limits"):]
    section = section[: section.index("\n## ", 1)]
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|", section, re.MULTILINE))
    assert rows["spec file"] == f"{source.MAX_FILE_BYTES:,} bytes"
    assert rows["YAML nodes, aliases expanded"] == f"{source.MAX_NODES:,}"
    assert rows["nesting of mappings and lists"] == f"{source.MAX_DEPTH} levels"
    assert rows["`extends:` chain"] == f"{source.MAX_EXTENDS_DEPTH} files"
    assert rows["a whole number"] == f"{source.MAX_NUMBER_CHARS} characters"
    assert rows["blocks inside blocks"] == f"{expand.MAX_BLOCK_DEPTH} levels"
    assert rows["layers, blocks and `repeat` expanded"] == f"{expand.MAX_LAYERS:,}"
    assert rows["parameters (`--max-params`)"] == f"{DEFAULT_MAX_PARAMS:,}"
    assert rows["training memory, estimated (`--max-memory`)"] == DEFAULT_MAX_MEMORY
    assert parse_size(DEFAULT_MAX_MEMORY) == memory.DEFAULT_MAX_MEMORY


def _tuples_without_lists(tp: object, lax: bool = False) -> list[object]:
    """The tuple types inside annotation ``tp`` that strict validation would refuse a list
    for (not wrapped in ``FromList``)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        lax = lax or any(isinstance(m, Strict) and m.strict is False for m in meta)
        return _tuples_without_lists(base, lax)
    found = [tp] if origin is tuple and not lax else []
    return found + [t for arg in typing.get_args(tp) for t in _tuples_without_lists(arg)]


def _spec_models(cls: type = SpecModel) -> list[type]:
    return [cls] + [m for sub in cls.__subclasses__() for m in _spec_models(sub)]


def test_every_tuple_field_takes_the_list_yaml_gives():
    """Spec models validate strictly, which takes only tuples for a tuple: each tuple field
    must be wrapped in FromList (a new field without it would refuse `kernel: [3, 3]`)."""
    unwrapped = []
    for model in _spec_models():
        for name, info in model.model_fields.items():
            lax = any(isinstance(m, Strict) and m.strict is False for m in info.metadata)
            unwrapped += [f"{model.__name__}.{name}: {t}"
                          for t in _tuples_without_lists(info.annotation, lax)]
    assert unwrapped == []
    assert len(_spec_models()) > 30  # the walk does reach the layer and data models


@pytest.mark.parametrize("command", ["validate", "summary", "ir", "build", "run", "conform"])
def test_the_commands_the_readme_names_take_both_limits(command):
    code, out, _ = run_in_process(command, "--help")
    assert code == 0
    assert "--max-memory" in out and "--max-params" in out
