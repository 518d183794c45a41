"""`specforge summary`: parameter counts (trainable apart), JSON, layer types, and a table
that keeps every name whole at any terminal width."""

from __future__ import annotations

import json
import re

import pytest

from specforge.compiler import compile_spec
from specforge.summary import summary_json
from tests.conftest import ROOT, SPECS, run_cli

#: A ResNet50-like projection block and a MobileNetV2-like depthwise one: names that differ
#: only after a long common prefix, a merge whose inputs are long names, and a depthwise conv.
LONG_NAMES = """\
name: long_names
blocks:
  projection:
    params: {filters: null}
    layers:
      - {type: conv2d, name: c0_conv, inputs: input, filters: "${filters}", kernel: 1}
      - {type: batch_norm, name: c0_bn}
      - {type: conv2d, name: c1_conv, inputs: input, filters: "${filters}", kernel: 3,
         padding: same}
      - {type: batch_norm, name: c1_bn}
      - {type: depthwise_conv2d, name: c2_depthwise, kernel: 3, padding: same,
         activation: relu6}
      - {type: add, name: c3_add, inputs: [c0_bn, c2_depthwise]}
model:
  input: [8, 8, 3]
  layers:
    - {type: block, name: conv2_block1, block: projection, args: {filters: 4}}
    - {type: block, name: conv5_block3_expanded, block: projection,
       args: {filters: 6}}
    - {type: global_avg_pool2d, name: pool}
    - {type: dense, name: predictions, units: 3}
loss: {type: cross_entropy}
optimizer: {type: sgd}
"""


def test_summary_counts_batch_norm_statistics_as_non_trainable():
    result = run_cli("summary", "specs/resnet18.yaml")
    assert result.returncode == 0, result.stderr
    assert "Total params: 11,699,112 " in result.stdout
    assert "Trainable params: 11,689,512\n" in result.stdout
    assert "Non-trainable params: 9,600 (batch norm's moving mean and variance)\n" \
        in result.stdout


def test_summary_json_gives_every_count_per_layer_and_in_total():
    result = run_cli("summary", "specs/resnet18.yaml", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["trainable_params"], data["non_trainable_params"],
            data["total_params"]) == (11_689_512, 9_600, 11_699_112)
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert layers["bn1"] == {
        "name": "bn1", "type": "batch_norm", "output_shape": [112, 112, 64], "params": 256,
        "trainable_params": 128, "non_trainable_params": 128,
        "flops": layers["bn1"]["flops"], "inputs": ["conv1"]}
    assert layers["layer1.0.add"]["inputs"] == ["layer1.0.bn2", "maxpool"]
    for key in ("trainable_params", "non_trainable_params", "flops"):
        assert sum(layer[key] for layer in data["layers"]) == data[key], key
    graph = compile_spec(SPECS / "resnet18.yaml").graph
    assert data["flops"] == graph.flops


def test_summary_names_the_spec_type_of_a_depthwise_conv(write_spec):
    path = write_spec(LONG_NAMES)
    rows = {r["name"]: r for r in summary_json(compile_spec(path))["layers"]}
    assert rows["conv2_block1.c2_depthwise"]["type"] == "depthwise_conv2d + relu6"
    assert rows["conv2_block1.c0_conv"]["type"] == "conv2d"
    table = run_cli("summary", str(path), env={"COLUMNS": "200"}).stdout
    assert "conv2_block1.c2_depthwise (depthwise_conv2d + relu6)" in table
    assert "(conv2d)" in table


def _cells(table: str) -> list[str]:
    """The words of every table cell (between the box-drawing borders)."""
    return [word for line in table.splitlines() for cell in re.split(r"[│┃]", line)
            for word in re.split(r"[\s,]+", cell) if word]


@pytest.mark.parametrize("columns", [80, 200])
def test_summary_keeps_every_name_whole_at_any_width(write_spec, columns):
    path = write_spec(LONG_NAMES)
    result = run_cli("summary", str(path), env={"COLUMNS": str(columns)})
    assert result.returncode == 0, result.stderr
    table = result.stdout
    words = _cells(table)
    graph = compile_spec(path).graph
    names = {n.layer or n.name for n in graph}
    assert len(names) > 10
    for name in names:
        assert name in words, (name, table)
    assert "…" not in table
    assert max(len(line.rstrip()) for line in table.splitlines()) <= columns
    # At 80 columns the merge's inputs move under its name; wide, they have a column.
    narrow = columns == 80
    assert ("<- conv2_block1.c0_bn," in table) == narrow
    assert ("│ conv2_block1.c0_bn, conv2_block1.c2_depthwise " in table) == (not narrow)


def test_readme_parameter_counts_are_the_summary_s():
    readme = " ".join((ROOT / "README.md").read_text().split())

    def counts(spec: str) -> dict[str, int]:
        return summary_json(compile_spec(SPECS / spec))

    def number(pattern: str) -> int:
        match = re.search(pattern, readme)
        assert match, pattern
        return int(match.group(1).replace(",", ""))

    cifar = counts("cifar.yaml")
    assert number(r"`specforge summary specs/cifar.yaml` prints .*?: ([\d,]+) in total") == \
        cifar["total_params"]
    vgg = counts("vgg16.yaml")
    assert number(r"`specs/vgg16.yaml` \(([\d,]+) parameters") == vgg["total_params"] == \
        vgg["trainable_params"]
    resnet = counts("resnet18.yaml")
    assert number(r"`specs/resnet18.yaml` \(([\d,]+) trainable") == resnet["trainable_params"]
    assert number(r"`specs/resnet18.yaml` \([^)]*?([\d,]+) non-trainable") == \
        resnet["non_trainable_params"]
    for spec in ("resnet50", "mobilenetv2"):
        assert number(rf"`specs/{spec}.yaml`\s*\(([\d,]+) in total") == \
            counts(f"{spec}.yaml")["total_params"]


def test_summary_too_narrow_for_the_names_wraps_them_and_cuts_nothing(write_spec):
    from io import StringIO

    from rich.console import Console

    from specforge.summary import print_summary

    out = StringIO()
    print_summary(compile_spec(write_spec(LONG_NAMES)), Console(width=50, file=out))
    table = out.getvalue()
    assert "…" not in table
    assert max(len(line.rstrip()) for line in table.splitlines()) <= 50
    # numbers stay whole; a name longer than its column continues on the next line
    assert {"222", "7.68K", "(None"} <= set(_cells(table))
    assert "│ conv5_block3_expand" in table and "│ ed.c1_conv" in table


def test_summary_without_merges_has_no_inputs_column():
    from io import StringIO

    from rich.console import Console

    from specforge.summary import print_summary

    out = StringIO()
    print_summary(compile_spec(SPECS / "vgg16.yaml"), Console(width=200, file=out))
    assert "Inputs" not in out.getvalue() and "<-" not in out.getvalue()
    assert "│ stage1.conv.0 (conv2d + relu) " in out.getvalue()
