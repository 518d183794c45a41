"""The example specs compile to the shapes and parameter counts their sources report."""

from __future__ import annotations

import re

import pytest

from specforge.compiler import compile_spec
from tests.conftest import SPECS, run_cli


def test_cifar_matches_the_seed_keras_model():
    program = compile_spec(SPECS / "cifar.yaml")
    graph = program.graph
    # Output shapes and parameters of the seed's Keras model (model.summary()).
    expected = {
        "conv2d_1": ((30, 30, 32), 896), "max_pool2d_1": ((15, 15, 32), 0),
        "conv2d_2": ((13, 13, 64), 18_496), "max_pool2d_2": ((6, 6, 64), 0),
        "conv2d_3": ((4, 4, 128), 73_856), "max_pool2d_3": ((2, 2, 128), 0),
        "flatten_1": ((512,), 0), "dense_1": ((128,), 65_664), "dense_2": ((10,), 1_290),
    }
    for name, (shape, params) in expected.items():
        assert graph[name].shape == shape, name
        assert graph[name].param_count == params, name
    assert graph.trainable_params == 160_202
    assert graph.non_trainable_params == 0
    # The final softmax is folded into the loss: the graph outputs logits.
    assert graph.output == "dense_2"
    assert program.output_activation == "softmax"
    assert program.loss.from_logits is True


@pytest.mark.parametrize(("spec", "trainable", "non_trainable"), [
    ("vgg16.yaml", 138_357_544, 0),          # torchvision.models.vgg16, keras VGG16
    ("resnet18.yaml", 11_689_512, 9_600),    # torchvision.models.resnet18 (+ BN buffers)
    # keras.applications.ResNet50 / MobileNetV2: 25,636,712 and 3,538,984 in all
    ("resnet50.yaml", 25_583_592, 53_120),
    ("mobilenetv2.yaml", 3_504_872, 34_112),
])
def test_reference_architectures_have_their_published_parameter_counts(
        spec, trainable, non_trainable):
    graph = compile_spec(SPECS / spec).graph
    assert graph.trainable_params == trainable
    assert graph.non_trainable_params == non_trainable


def test_resnet18_has_torchvision_shapes_and_names():
    graph = compile_spec(SPECS / "resnet18.yaml").graph
    assert graph["maxpool"].shape == (56, 56, 64)
    assert graph["layer1.1.relu2"].shape == (56, 56, 64)
    assert graph["layer2_0.downsample"].shape == (28, 28, 128)
    assert graph["layer4_1.relu2"].shape == (7, 7, 512)
    assert graph["layer2_0.add"].inputs == ("layer2_0.bn2", "layer2_0.downsample_bn")
    # the shortcut of an identity block reads the block's input
    assert graph["layer1.1.add"].inputs == ("layer1.1.bn2", "layer1.0.relu2")
    # about 1.82 G multiply-adds, as commonly reported for ResNet-18 at 224x224
    assert 3.6e9 < graph.flops < 3.7e9


def _keras_name(name: str) -> str:
    """specforge's hierarchical name -> keras.applications' flat one: `conv2_block1.c0_conv`
    -> `conv2_block1_0_conv` (a spec name cannot start with a digit), `block_1.pad` ->
    `block_1_pad`."""
    return re.sub(r"\.c(\d)_", r"_\1_", name).replace(".", "_")


@pytest.mark.parametrize(("stem", "application"), [("resnet50", "ResNet50"),
                                                   ("mobilenetv2", "MobileNetV2")])
def test_real_models_have_keras_applications_layers_shapes_and_parameters(stem, application):
    """Every layer of keras.applications' model (weights=None: nothing is downloaded) has
    a node of that name in the spec's graph, with its output shape and parameter count
    (batch-norm statistics included, as Keras counts them), and no node is left over."""
    keras = pytest.importorskip("keras")
    keras.backend.clear_session()  # Keras's unnamed layers get their first names
    theirs = {layer.name: (tuple(layer.output.shape)[1:], layer.count_params())
              for layer in getattr(keras.applications, application)(weights=None).layers
              if not isinstance(layer, keras.layers.InputLayer)}
    graph = compile_spec(SPECS / f"{stem}.yaml").graph
    ours = {_keras_name(node.name): (node.shape, node.param_count) for node in graph
            if node.op != "input"}
    assert len(theirs) > 100
    assert ours == theirs


def test_vgg16_repeat_inside_block_expands_to_numbered_layers():
    graph = compile_spec(SPECS / "vgg16.yaml").graph
    assert [n.name for n in graph if n.op == "conv2d"][:4] == [
        "stage1.conv.0", "stage1.conv.1", "stage2.conv.0", "stage2.conv.1"]
    assert graph["stage5.pool"].shape == (7, 7, 512)


@pytest.mark.parametrize("spec", sorted(p.name for p in SPECS.glob("*.yaml")))
def test_every_example_spec_validates(spec):
    result = run_cli("validate", f"specs/{spec}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: specs/{spec}")


def test_summary_prints_keras_like_table_with_totals():
    result = run_cli("summary", "specs/cifar.yaml")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(None, 30, 30, 32)" in out and "(None, 2, 2, 128)" in out
    assert "Total params: 160,202" in out
    assert "Trainable params: 160,202" in out
    assert "Non-trainable params: 0" in out
    assert "FLOPs per sample" in out


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-3` as text; every spec writer means a float."""
    spec = tmp_path / "lr.yaml"
    spec.write_text(f"extends: {SPECS / 'digits.yaml'}\n"
                    "optimizer: {type: adam, learning_rate: 1e-3, epsilon: 1E-07}\n")
    program = compile_spec(spec, ["optimizer.beta2=9.99e-1"])
    assert program.optimizer.learning_rate == 0.001
    assert program.optimizer.hyper["epsilon"] == 1e-7 and program.optimizer.hyper["beta2"] == 0.999
