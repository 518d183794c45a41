"""The command line: outputs, overrides, `extends:`, exit codes and start-up imports."""

from __future__ import annotations

import json
import textwrap

import jsonschema
import pytest
import yaml

from specforge.cli import DEFAULT_MAX_PARAMS
from specforge.ir.lower import DEFAULT_MAX_PARAMS as COMPILER_DEFAULT
from tests.conftest import MINIMAL, ROOT, SPECS, run_cli


def test_ir_dumps_json_with_explicit_attrs():
    result = run_cli("ir", "specs/cifar.yaml")
    assert result.returncode == 0, result.stderr
    ir = json.loads(result.stdout)
    conv = next(n for n in ir["nodes"] if n["name"] == "conv2d_1")
    assert conv["attrs"]["pads"] == [0, 0, 0, 0]
    assert conv["attrs"]["kernel"] == [3, 3]
    assert conv["params"][0] == {"name": "kernel", "shape": [3, 3, 3, 32],
                                 "init": "glorot_uniform", "trainable": True}
    assert conv["source"].startswith("specs/cifar.yaml:10:7")
    assert ir["output_activation"] == "softmax"
    assert ir["optimizer"]["hyper"] == {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-07}
    assert ir["totals"]["trainable_params"] == 160_202


def test_set_overrides_fields_and_reports_bad_paths(write_spec):
    path = write_spec(MINIMAL)
    ok = run_cli("ir", str(path), "--set", "optimizer.learning_rate=0.5",
                 "--set", "model.layers.0.filters=7", "-s", "optimizer.momentum=0.9")
    assert ok.returncode == 0, ok.stderr
    ir = json.loads(ok.stdout)
    assert ir["optimizer"]["learning_rate"] == 0.5
    assert ir["optimizer"]["hyper"]["momentum"] == 0.9
    assert ir["nodes"][1]["attrs"]["filters"] == 7
    bad = run_cli("validate", str(path), "--set", "model.layers.9.filters=3",
                  "--set", "optimizer.learning_rate=-1")
    assert bad.returncode == 2
    assert "--set model.layers.9.filters=3" in bad.stderr
    assert "not an index of a list of 3 items" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_set_errors_name_the_override(write_spec):
    path = write_spec(MINIMAL)
    bad = run_cli("validate", str(path), "--set", "optimizer.learning_rate=-1")
    assert bad.returncode == 2
    assert bad.stderr.startswith("--set optimizer.learning_rate=-1: error: "
                                 "optimizer.learning_rate: should be greater than 0")


def test_extends_merges_and_errors_point_into_the_right_file(tmp_path):
    (tmp_path / "base.yaml").write_text(MINIMAL)
    child = tmp_path / "child.yaml"
    child.write_text(textwrap.dedent("""\
        extends: base.yaml
        optimizer: {type: adam, learning_rate: 0.003}
        """))
    result = run_cli("ir", str(child))
    assert result.returncode == 0, result.stderr
    ir = json.loads(result.stdout)
    assert ir["optimizer"]["kind"] == "adam" and ir["optimizer"]["learning_rate"] == 0.003
    assert ir["nodes"][1]["source"].startswith(f"{tmp_path / 'base.yaml'}:4:")
    child.write_text("extends: base.yaml\noptimizer: {type: adam, learning_rat: 1}\n")
    bad = run_cli("validate", str(child))
    assert bad.returncode == 2
    assert f"{child}:2:25: error: optimizer.learning_rat: unknown field" in bad.stderr


def test_resolve_prints_a_complete_spec_that_validates_again(tmp_path):
    result = run_cli("resolve", "specs/cifar_sgd.yaml", "--set", "seed=7")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["seed"] == 7
    assert resolved["optimizer"]["nesterov"] is True
    assert resolved["optimizer"]["schedule"]["unit"] == "epoch"  # a default, filled in
    assert resolved["model"]["layers"][0]["padding"] == "valid"
    assert next(iter(resolved["loss"])) == "type"
    again = tmp_path / "resolved.yaml"
    again.write_text(result.stdout)
    check = run_cli("ir", str(again))
    original = run_cli("ir", "specs/cifar_sgd.yaml", "--set", "seed=7")
    strip = lambda ir: {k: v for k, v in json.loads(ir).items() if k != "nodes"}  # noqa: E731
    assert strip(check.stdout) == strip(original.stdout)


def test_schema_is_valid_json_schema_and_accepts_every_example():
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in SPECS.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        data.pop("extends", None)
        if path.name == "cifar_sgd.yaml":
            continue  # partial by design: it extends cifar.yaml
        errors = list(validator.iter_errors(data))
        assert not errors, (path.name, errors[:1])
    bad = {"model": {"input": [8, 8, 1], "layers": [{"type": "conv2d"}]}}
    assert list(validator.iter_errors(bad))


def test_docs_are_generated_from_the_code_and_not_stale():
    result = run_cli("docs", "--check")
    assert result.returncode == 0, result.stderr + "\nrun `specforge docs` and commit docs/"
    reference = (ROOT / "docs" / "spec-reference.md").read_text()
    assert "| `running_decay` |" in reference
    assert "## `conv2d`" in (ROOT / "docs" / "ir-ops.md").read_text()


def test_docs_check_fails_when_stale(tmp_path):
    (tmp_path / "spec-reference.md").write_text("old\n")
    result = run_cli("docs", "--check", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "out of date" in result.stderr


def test_cli_default_parameter_limit_matches_the_compiler():
    assert DEFAULT_MAX_PARAMS == COMPILER_DEFAULT


@pytest.mark.parametrize("args", [["validate", "missing.yaml"], ["nope"],
                                  ["build", "specs/cifar.yaml", "-b", "nosuch"],
                                  ["validate", "specs/cifar.yaml", "--max-params", "many"]])
def test_user_errors_exit_2_without_traceback(args):
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip()


def test_missing_spec_file_is_named():
    result = run_cli("validate", "missing.yaml")
    assert "spec file not found: missing.yaml" in result.stderr


def test_python_m_and_console_script_agree():
    import shutil
    import subprocess

    exe = shutil.which("specforge")
    if exe is None:
        pytest.skip("console script not on PATH")
    script = subprocess.run([exe, "validate", "specs/digits.yaml"], capture_output=True,
                            text=True, cwd=ROOT)
    assert script.returncode == 0
    assert script.stdout == run_cli("validate", "specs/digits.yaml").stdout


# Imports that fail loudly if a light command pulls in a framework: a finder placed first on
# sys.meta_path records every attempt, whether or not the framework is installed here.
_PROBE = textwrap.dedent("""\
    import sys
    attempts = []
    class Probe:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'tensorflow', 'keras', 'jax'):
                attempts.append(name)
            return None
    sys.meta_path.insert(0, Probe())
    sys.argv = ['specforge'] + sys.argv[1:]
    from specforge.cli import main
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    print('ATTEMPTS', sorted(set(attempts)), 'CODE', code, file=sys.stderr)
    """)


@pytest.mark.parametrize("args", [["validate", "specs/cifar.yaml"],
                                  ["summary", "specs/resnet18.yaml"],
                                  ["ir", "specs/vgg16.yaml"], ["schema"],
                                  ["resolve", "specs/cifar.yaml"], ["backends"]])
def test_light_commands_import_no_framework(args):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True,
                            text=True, cwd=ROOT)
    assert "ATTEMPTS [] CODE 0" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(("args", "message"), [
    (["-b", "keras", "--nproc-per-node", "2"],
     "--nproc-per-node/--nnodes: the keras backend trains data-parallel with --data-parallel"),
    (["-b", "keras", "--nnodes", "2"], "the keras backend trains data-parallel with "
                                       "--data-parallel"),
    (["-b", "torch", "--data-parallel"],
     "--data-parallel: the torch backend trains data-parallel with --nproc-per-node/--nnodes"),
    (["-b", "torch", "--device", "xla"],
     "--device 'xla': the torch backend does not train on it; valid: auto, cpu, cuda"),
    (["-b", "keras", "--device", "cudaa"], "did you mean 'cuda'?"),
])
def test_run_options_are_checked_against_the_backends_capabilities(args, message):
    """Refused before any framework is imported, with what the backend supports instead."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _PROBE, "run", "specs/digits.yaml", *args],
                            capture_output=True, text=True, cwd=ROOT)
    assert "ATTEMPTS [] CODE 2" in result.stderr, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_conform_checks_the_device_of_every_backend():
    result = run_cli("conform", "specs/digits.yaml", "--backends", "torch", "--device", "xla")
    assert result.returncode == 2
    assert "--device 'xla': the torch backend does not train on it" in result.stderr
