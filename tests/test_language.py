"""The spec language's reuse features: `${...}` expressions, `when:`, the block input's
shape, computed parameter defaults, `defaults:` by layer type and `extends:` replacing."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from specforge.compiler import compile_spec, compile_text, load_spec
from specforge.errors import SpecError
from specforge.spec.expressions import ExpressionError, Scope, evaluate
from tests.conftest import SPECS, run_cli

HEAD = """\
loss: {type: cross_entropy}
optimizer: {type: sgd}
"""


def spec(body: str) -> str:
    return textwrap.dedent(body) + HEAD


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        compile_text(text, "spec.yaml")
    return [p.render(with_source=False) for p in caught.value.problems]


# --- the expression grammar ----------------------------------------------------------------

SCOPE = Scope({"filters": 64, "strides": 2, "act": "relu", "rate": 0.5},
              lambda: (56, 28, 32))


@pytest.mark.parametrize(("text", "value"), [
    ("4 * filters", 256), ("filters / 3", 64 / 3), ("filters // 3", 21), ("-filters % 5", 1),
    ("(filters + 2) * -1", -66), ("min(filters, 3, 2.5)", 2.5), ("max(1, strides)", 2),
    ("strides > 1", True), ("1 < strides <= 4", True), ("strides != 2 or false", False),
    ("not (strides == 2 and true)", False), ("act == 'relu'", True), ("rate * 2", 1.0),
    ("input.height + input.width + input.channels", 116), ("1e-3 * 2", 0.002),
])
def test_expressions_compute_with_numbers_parameters_and_the_input_shape(text, value):
    result = evaluate(text, SCOPE)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize(("text", "column", "words"), [
    ("filters ** 2", 0, "operator"),
    ("__import__('os').system('true')", 0, "only min(...) and max(...)"),
    ("filters.real", 0, "only the block input's shape"),
    ("[filters][0]", 0, "not allowed"),
    ("filters if true else 1", 0, "not allowed"),
    ("filters + filtres", 10, "unknown name 'filtres'"),
    ("filters / (strides - 2)", 11, "division by zero"),
    ("filters +", 9, "invalid expression"),
    ("act * 2", 0, "expected a number"),
    ("strides < 'a'", 0, "cannot compare"),
    ("not filters", 4, "expected true or false"),
    ("True", 0, "lower case"),
    ("input", 0, "input.height"),
    ("input.depth", 6, "no 'depth'"), ("1 + input .depth", 11, "no 'depth'"),
    ("lambda: 1", 0, "not allowed"),
    ("9" * 30, 0, "larger than"),
])
def test_anything_outside_the_grammar_is_an_error_at_its_column(text, column, words):
    with pytest.raises(ExpressionError) as caught:
        evaluate(text, SCOPE)
    assert caught.value.column == column, caught.value.message
    assert words in caught.value.message + str(caught.value.hint)


# --- expressions, when: and the input's shape in blocks ------------------------------------

INVERTED = spec("""\
    blocks:
      inverted:
        params:
          filters: null
          stride: 1
          expansion: 6
          residual: "${stride == 1 and input.channels == filters}"
        layers:
          - {type: conv2d, name: expand, filters: "${expansion * input.channels}", kernel: 1,
             when: "${expansion != 1}"}
          - {type: pad2d, name: pad, when: "${stride == 2}",
             padding: {top: "${input.height % 2}", bottom: 1, left: 0, right: 1}}
          - {type: depthwise_conv2d, name: dw, kernel: 3, strides: "${stride}",
             padding: "${2 - stride}"}
          - {type: conv2d, name: "p${filters}", filters: "${filters}", kernel: 1}
          - {type: add, name: add, inputs: [input, "p${filters}"], when: "${residual}"}
    model:
      input: [15, 16, 8]
      layers:
        - {type: block, name: b0, block: inverted, args: {filters: 8, expansion: 1}}
        - {type: block, name: b1, block: inverted, args: {filters: 12, stride: 2}}
        - {type: block, name: b2, block: inverted, args: {filters: 12}}
        - {type: global_avg_pool2d}
        - {type: dense, units: 3}
    """)


def test_blocks_compute_arguments_skip_layers_and_read_their_inputs_shape():
    graph = compile_text(INVERTED, "inverted.yaml").graph
    names = [n.name for n in graph if n.name.startswith("b")]
    # b0: no expansion (expansion 1), a residual add; b1: strided, no add; b2: both
    assert names == ["b0.dw", "b0.p8", "b0.add", "b1.expand", "b1.pad", "b1.dw", "b1.p12",
                     "b2.expand", "b2.dw", "b2.p12", "b2.add"]
    assert graph["b1.expand"].shape == (15, 16, 48)           # 6 * input.channels (8)
    assert graph["b1.pad"].attrs["pads"] == (1, 1, 0, 1)      # input.height 15 is odd
    assert graph["b2.expand"].shape[-1] == 72                 # 6 * 12
    assert graph["b2.add"].inputs == ("b1.p12", "b2.p12")
    assert graph["b1.dw"].attrs["strides"] == (2, 2)
    assert isinstance(graph["b1.expand"].attrs["filters"], int)


def test_computed_defaults_see_the_ones_before_them_and_a_use_can_override_them():
    text = spec("""\
        blocks:
          unit:
            params: {filters: null, wide: "${filters * 2}", widest: "${wide + filters}"}
            layers: [{type: conv2d, name: a, filters: "${wide}", kernel: 1},
                     {type: conv2d, name: b, filters: "${widest}", kernel: 1}]
        model:
          input: [4, 4, 1]
          layers:
            - {type: block, name: u, block: unit, args: {filters: 3}}
            - {type: block, name: v, block: unit, args: {filters: 3, wide: 4}}
            - {type: flatten}
            - {type: dense, units: 2}
        """)
    graph = compile_text(text, "computed.yaml").graph
    assert [graph[n].shape[-1] for n in ("u.a", "u.b", "v.a", "v.b")] == [6, 9, 4, 7]


def test_an_expression_error_names_the_file_line_and_column_of_the_character():
    text = INVERTED.replace('"${expansion * input.channels}"',
                            '"${expansion * input.chanels}"')
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "chanels" in t)
    column = text.splitlines()[line - 1].index("chanels") + 1
    problem, *others = problems(text)  # once per use that expands (b1 and b2)
    assert len(others) == 1 and others[0].split("\n")[0] == problem.split("\n")[0]
    assert problem.startswith(f"spec.yaml:{line}:{column}: error: "
                              "blocks.inverted.layers[0].filters: the input has no 'chanels'")
    assert "column 19 of the expression 'expansion * input.chanels'" in problem
    assert "did you mean 'channels'" in problem
    assert "reached through spec.yaml:" in problem  # the block's use


def test_a_reference_to_a_skipped_layer_is_a_located_error():
    text = INVERTED.replace("name: dw, kernel: 3", "name: dw, inputs: expand, kernel: 3")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "inputs: expand" in t)
    column = text.splitlines()[line - 1].index("expand") + 1
    use = next(i for i, t in enumerate(text.splitlines(), 1) if "name: b0" in t)
    [problem] = problems(text)  # b0 has no expansion; b1 and b2 have theirs
    assert problem.startswith(f"spec.yaml:{line}:{column}: error: blocks.inverted.layers[2]."
                              "inputs: layer 'expand' is skipped here: its `when:` (line ")
    assert f"reached through spec.yaml:{use}:" in problem


def test_when_must_be_true_or_false():
    problem, *_ = problems(INVERTED.replace('when: "${residual}"', 'when: "${filters}"'))
    line = next(i for i, t in enumerate(INVERTED.splitlines(), 1) if "${residual}\"}" in t)
    assert problem.startswith(f"spec.yaml:{line}:")
    assert "`when:` must be true or false, got 8" in problem


def test_an_expression_outside_a_block_says_so_once():
    text = spec("""\
        model:
          input: [8, 8, 1]
          layers: [{type: conv2d, filters: "${4 * 4}", kernel: 3}, {type: flatten},
                   {type: dense, units: 2}]
        """)
    [problem] = problems(text)
    column = text.splitlines()[2].index("\"$") + 1
    assert problem.startswith(f"spec.yaml:3:{column}: error: model.layers[0].filters: "
                              "\"${4 * 4}\": "
                              "`${...}` expressions are computed inside a block's layers only")


def test_a_block_parameter_cannot_shadow_the_input():
    text = INVERTED.replace("      stride: 1\n", "      stride: 1\n      input: 2\n")
    assert "      input: 2\n" in text
    assert any("cannot be called 'input'" in p for p in problems(text))


# --- defaults: --------------------------------------------------------------------------------

DEFAULTS = spec("""\
    defaults:
      batch_norm: {epsilon: 0.001, running_decay: 0.99}
      conv2d: {bias: false, kernel: 3}
    blocks:
      unit:
        params: {filters: null}
        defaults: {conv2d: {kernel: 1}, batch_normalization: {epsilon: 0.01}}
        layers:
          - {type: conv2d, name: conv, filters: "${filters}"}
          - {type: batch_norm, name: bn}
    model:
      input: [8, 8, 2]
      layers:
        - {type: conv2d, name: conv, filters: 4}
        - {type: batch_norm, name: bn, running_decay: 0.5}
        - {type: block, name: unit, block: unit, args: {filters: 6}}
        - {type: flatten}
        - {type: dense, units: 3}
    """)


def test_defaults_fill_what_a_layer_leaves_out_and_the_block_level_wins():
    graph = compile_text(DEFAULTS, "defaults.yaml").graph
    assert (graph["conv"].attrs["kernel"], graph["conv"].attrs["bias"]) == ((3, 3), False)
    assert (graph["bn"].attrs["epsilon"], graph["bn"].attrs["decay"]) == (0.001, 0.5)
    assert (graph["unit.conv"].attrs["kernel"], graph["unit.conv"].attrs["bias"]) == (
        (1, 1), False)
    assert (graph["unit.bn"].attrs["epsilon"], graph["unit.bn"].attrs["decay"]) == (0.01, 0.99)


def test_resolve_shows_the_defaults_filled_in(write_spec):
    result = run_cli("resolve", str(write_spec(DEFAULTS)))
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["blocks"]["unit"]["layers"] == [
        {"type": "conv2d", "name": "conv", "filters": "${filters}", "kernel": 1,
         "bias": False},
        {"type": "batch_norm", "name": "bn", "epsilon": 0.01, "running_decay": 0.99}]
    assert resolved["model"]["layers"][1]["epsilon"] == 0.001


def test_a_bad_default_is_reported_once_at_the_default():
    text = DEFAULTS.replace("epsilon: 0.001", "epsilon: -1").replace(
        "kernel: 3}", "kernel: 3, filter: 2}").replace("conv2d: {kernel: 1}",
                                                      "conv2d: {kernel: 1}, block: {}")
    found = problems(text)
    lines = text.splitlines()
    assert len(found) == 3, found
    assert found[0].startswith(f"spec.yaml:2:{lines[1].index('-1') + 1}: error: "
                               "defaults.batch_norm.epsilon: should be greater than 0")
    assert found[1].startswith(f"spec.yaml:3:{lines[2].index('filter:') + 1}: ")
    assert "did you mean 'filters'" in found[1]
    assert "unknown layer type 'block'" in found[2]


# --- extends: ---------------------------------------------------------------------------------

def test_extends_replaces_a_mapping_whose_type_changes_or_that_is_tagged(write_spec):
    write_spec((SPECS / "cifar.yaml").read_text(), "cifar.yaml")
    child = write_spec(textwrap.dedent("""\
        extends: cifar.yaml
        data:
          source: {type: cifar10, path: cifar}
          augment: !replace {horizontal_flip: true}
        optimizer: {learning_rate: 0.01}
        """))
    _, merged = load_spec(child)
    assert merged.data.source.type == "cifar10"          # not merged with image_folder's
    assert merged.data.augment.rotation == 0              # the base's 15 is gone
    assert merged.data.augment.horizontal_flip is True
    assert merged.optimizer.type == "adam"                # same type: merged
    assert merged.optimizer.learning_rate == 0.01


def test_an_unknown_yaml_tag_is_a_located_error():
    text = spec("""\
        model:
          input: [8, 8, 1]
          layers: [{type: flatten, name: !name x}, {type: dense, units: 2}]
        """)
    [problem] = problems(text)
    column = text.splitlines()[2].index("!name") + 1
    assert problem.startswith(f"spec.yaml:3:{column}: error: model.layers[0].name: "
                              "unsupported YAML tag '!name'")
    assert "the one tag a spec may use is !replace" in problem


def test_the_real_models_use_the_new_features():
    for stem in ("resnet50", "mobilenetv2"):
        text = (SPECS / f"{stem}.yaml").read_text()
        assert "defaults:" in text and "when:" in text and "input.channels" in text
        compile_spec(SPECS / f"{stem}.yaml")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.e+-*/%()<>=! _,'abcdfilmnorstwxpu\n", max_size=40))
def test_any_text_gives_a_value_or_an_expression_error(text):
    """The walker never lets Python's own errors (or a value outside the grammar) through."""
    try:
        value = evaluate(text, SCOPE)
    except ExpressionError as exc:
        assert 0 <= exc.column <= len(text)
    else:
        assert isinstance(value, bool | int | float | str)
