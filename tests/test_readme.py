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


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_export_commands_work(tmp_path, monkeypatch, capsys):
    """Both commands of "Export to ONNX", run as written (in a folder holding `specs/` and
    a finished run's folder `runs/digits`), write models that onnxruntime runs: the run's
    final weights with its class names, and the spec's initial weights in NCHW."""
    import json
    import shlex

    import numpy as np
    import pytest

    ort = pytest.importorskip("onnxruntime")
    from specforge.compiler import compile_spec
    from specforge.conformance.compare import difference
    from specforge.onnx_export import OPSET
    from specforge.reference.forward import ACTIVATIONS, reference_forward
    from specforge.runfolder import RunFolder
    from specforge.weights import initial_weights, save_weights
    from tests.test_onnx_export import FORWARD_RTOL, cli_in_process, random_weights

    program = compile_spec(ROOT / "specs" / "digits.yaml")
    (tmp_path / "specs").symlink_to(ROOT / "specs")
    run = RunFolder(tmp_path / "runs" / "digits", "checkpoint.pt")
    run.start(program, "torch", ROOT / "specs", [f"class {i}" for i in range(10)])
    trained = random_weights(program)
    save_weights(run.path / "weights.npz", trained)
    monkeypatch.chdir(tmp_path)
    block = _section("Export to ONNX").split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["specforge", "export"]] * 2
    for command in commands:
        code, _, err = cli_in_process(monkeypatch, capsys, *command[1:])
        assert code == 0, err

    x = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
    for name, weights, fed in (("digits.onnx", trained, x),
                               ("digits_nchw.onnx", initial_weights(program.graph, 0),
                                x.transpose(0, 3, 1, 2))):
        session = ort.InferenceSession(str(tmp_path / name),
                                       providers=["CPUExecutionProvider"])
        logits = reference_forward(program.graph, weights, x)[program.graph.output]
        expected = ACTIVATIONS["softmax"](logits, {})
        got = session.run(None, {"input": fed})[0]
        assert difference(got, expected).max_rel <= FORWARD_RTOL, name
        props = session.get_modelmeta().custom_metadata_map
        assert ("class_names" in props) == (name == "digits.onnx")
    props = ort.InferenceSession(str(tmp_path / "digits.onnx")).get_modelmeta()
    assert json.loads(props.custom_metadata_map["class_names"])[3] == "class 3"
    # the section's other claims: opset, tolerance, metadata keys, the input's shape
    section = " ".join(_section("Export to ONNX").split())
    assert f"opset {OPSET} " in section
    claimed = re.search(r"\(([0-9.e-]+) of the output's scale\)", section)
    assert claimed and float(claimed.group(1)) == FORWARD_RTOL
    keys = sorted(props.custom_metadata_map)
    assert keys == ["class_names", "layout", "name", "normalize", "output"]
    assert "metadata holds `name`, `layout`, `output`, `normalize` and, from a run folder, " \
           "`class_names`" in section
    dims = [d if isinstance(d, str) else int(d) for d in session.get_inputs()[0].shape]
    assert dims == ["batch", 1, 8, 8]  # the second file: nchw


def test_the_readme_names_every_layer_type():
    """The "Layers" item of the README's feature list names every layer type the schema has
    (by its first spelling), so a new layer type is listed there."""
    import typing

    from specforge.spec import layers as L

    text = (ROOT / "README.md").read_text()
    item = text.split("- **Layers**:", 1)[1].split("\n- **", 1)[0]
    named = set(re.findall(r"`([a-z0-9_]+)`", item))
    union = typing.get_args(typing.get_args(L.Layer)[0])
    types = {typing.get_args(cls.model_fields["type"].annotation)[0] for cls in union
             if cls is not L.BlockUse}
    assert types - named == set()
