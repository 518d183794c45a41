"""`specforge import`: Keras and ONNX models in, a spec and neutral weights out.

Every import is checked by running the imported spec in both backends with the imported
weights against the source framework's own output, within the conformance forward tolerance.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from specforge.compiler import compile_spec, load_spec
from specforge.conformance.compare import Tolerance, difference
from specforge.errors import UsageError
from specforge.importers import ImportRefused, import_model
from specforge.importers.write import write_import
from specforge.ir.graph import Graph
from specforge.ir.lower import lower_model
from specforge.spec import layers as L
from specforge.weights import load_weights
from tests.conftest import ROOT, SPECS
from tests.processes import ENV, cli, ok, refused

keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")


# --- helpers -------------------------------------------------------------------------------------

def imported(source: Path, folder: Path) -> tuple[Path, Graph, dict[str, np.ndarray]]:
    """Import ``source``; the spec written, its (unfolded) graph and its weights."""
    spec, npz = write_import(import_model(source), folder / f"{source.stem}_imported.yaml")
    loaded, model = load_spec(spec)
    return spec, lower_model(model, loaded), load_weights(npz)


def backend_outputs(spec: Path, weights: dict[str, np.ndarray], images: np.ndarray
                    ) -> dict[str, np.ndarray]:
    """The imported spec's output for NHWC ``images`` in each backend (evaluation mode),
    through the backends' `load_model`; a softmax folded into the loss is applied again."""
    import specforge_keras
    import specforge_torch

    with torch.no_grad():
        module = specforge_torch.load_model(spec, weights=weights).eval()
        by_torch = module(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    by_keras = np.asarray(specforge_keras.load_model(spec, weights=weights)(images,
                                                                            training=False))
    loaded, model = load_spec(spec)
    if compile_spec(spec).graph.output != lower_model(model, loaded).output:  # folded
        by_torch, by_keras = softmax(by_torch), softmax(by_keras)
    return {"torch": by_torch, "keras": by_keras}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def assert_matches(spec: Path, weights: dict[str, np.ndarray], images: np.ndarray,
                   expected: np.ndarray) -> None:
    """Both backends reproduce the source's output within the conformance tolerance."""
    assert np.ptp(expected) > 0, "a constant output would compare nothing"
    for backend, actual in backend_outputs(spec, weights, images).items():
        gap = difference(actual, expected)
        assert gap.max_rel <= Tolerance().forward_rtol, (backend, gap)


def images(shape: tuple[int, int, int], count: int = 3) -> np.ndarray:
    return np.random.default_rng(7).uniform(-1, 1, (count, *shape)).astype(np.float32)


def main_in_process(capsys: Any, *args: str) -> tuple[int, str]:
    """Run the CLI in this process (Keras is imported already): exit code and stderr."""
    from specforge.cli import main

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["specforge", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, capsys.readouterr().err


def randomize_keras(model: Any, seed: int = 1) -> None:
    """Weights that make every layer matter: Keras's own initial ones leave batch norm an
    identity and can make the output constant."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape, path = tuple(variable.shape), variable.path
        if "gamma" in path or "moving_variance" in path:
            value = rng.uniform(0.5, 1.5, shape)
        elif "beta" in path or "moving_mean" in path or "bias" in path:
            value = rng.uniform(-0.2, 0.2, shape)
        else:
            fan_in = shape[0] * shape[1] if "depthwise" in path else int(np.prod(shape[:-1]))
            value = rng.uniform(-1, 1, shape) * np.sqrt(3 / fan_in)
        variable.assign(value.astype(np.float32))


def randomize_torch(module: Any) -> None:
    """Batch norm statistics that matter (torch's start as an identity)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.BatchNorm2d):
                sub.running_mean.uniform_(-0.2, 0.2, generator=generator)
                sub.running_var.uniform_(0.5, 1.5, generator=generator)
                sub.weight.uniform_(0.5, 1.5, generator=generator)
                sub.bias.uniform_(-0.2, 0.2, generator=generator)


def export_torch(module: Any, shape: tuple[int, int, int], path: Path, **options: Any) -> Path:
    """``module`` (eval mode) exported by torch's TorchScript-based exporter."""
    import warnings

    h, w, c = shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, c, h, w),), str(path), dynamo=False,
                          input_names=["image"], output_names=["out"], **options)
    return path


def torch_output(module: Any, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())).numpy()


def seed_keras_model() -> Any:
    """The seed document's Keras CIFAR-10 model, as specs/cifar.yaml describes it."""
    k = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        k.Conv2D(32, (3, 3), activation="relu"), k.MaxPooling2D((2, 2)),
        k.Conv2D(64, (3, 3), activation="relu"), k.MaxPooling2D((2, 2)),
        k.Conv2D(128, (3, 3), activation="relu"), k.MaxPooling2D((2, 2)),
        k.Flatten(), k.Dense(128, activation="relu"), k.Dense(10, activation="softmax")])


def structure(graph: Graph) -> list[tuple[str, dict[str, Any], tuple[Any, ...]]]:
    """A graph up to names: each node's op, attrs and parameter shapes, in order."""
    return [(n.op, dict(n.attrs), tuple(p.shape for p in n.params)) for n in graph]


def readme_section() -> str:
    """The README's "Bring your own model" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Bring your own model\n")[1].split("\n## ")[0]


# --- Keras ---------------------------------------------------------------------------------------

def test_the_seed_keras_model_imports_as_the_seed_spec(tmp_path):
    source = seed_keras_model()
    randomize_keras(source)
    source.save(tmp_path / "seed.keras")
    spec, graph, weights = imported(tmp_path / "seed.keras", tmp_path)
    seed = compile_spec(SPECS / "cifar.yaml")
    loaded, model = load_spec(SPECS / "cifar.yaml")
    assert structure(graph) == structure(lower_model(model, loaded))
    assert graph.trainable_params == seed.graph.trainable_params == source.count_params()
    batch = images((32, 32, 3))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))
    text = spec.read_text()
    assert "from seed.keras (Keras Sequential model)" in text
    layers = yaml.safe_load(text)["model"]["layers"]
    assert [item["name"] for item in layers] == [layer.name for layer in source.layers]


def test_the_readme_import_command_runs_as_written(tmp_path, capsys, monkeypatch):
    command = readme_section().split("```sh\n")[1].split("\n")[0]
    args = shlex.split(command.split("#")[0])
    assert args == ["specforge", "import", "model.keras", "-o", "model.yaml"]
    monkeypatch.chdir(tmp_path)
    seed_keras_model().save(tmp_path / "model.keras")
    code, message = main_in_process(capsys, *args[1:])
    assert code == 0, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras", "model.npz",
                                                          "model.yaml"]
    text = (tmp_path / "model.yaml").read_text()
    assert "from model.keras" in text and "Weights: model.npz" in text
    export = readme_section().split("```sh\n")[1].split("\n")[1]  # the second command
    args = shlex.split(export.split("#")[0])
    assert args[:2] == ["specforge", "export"]
    code, message = main_in_process(capsys, *args[1:])
    assert code == 0, message
    assert (tmp_path / "model.onnx").stat().st_size > 160_202 * 4  # the seed's weights
    for count in APPLICATION_PARAMS.values():
        assert f"{count:,}" in " ".join(readme_section().split())


def functional_keras_model() -> Any:
    """Branches, merges and most layer types Keras applications use."""
    k = keras.layers
    inputs = keras.Input((13, 12, 3), name="image")
    x = k.ZeroPadding2D(((1, 0), (2, 1)), name="pad")(inputs)
    x = k.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = k.BatchNormalization(momentum=0.99, epsilon=1e-3, name="stem_bn")(x)
    x = k.ReLU(6.0, name="stem_relu6")(x)
    a = k.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="swish",
                          name="dw")(x)
    a = k.Conv2D(8, 1, name="project")(a)
    b = k.SeparableConv2D(8, 3, padding="same", activation="gelu", name="separable")(x)
    s = k.Add(name="residual")([a, b])
    s = k.LeakyReLU(0.1, name="leaky")(s)
    c = k.Concatenate(name="both")([s, x])
    c = k.AveragePooling2D(3, strides=2, padding="same", name="avg")(c)
    c = k.SpatialDropout2D(0.2, name="drop")(c)
    c = k.Activation("hard_sigmoid", name="hsig")(c)
    v = k.GlobalMaxPooling2D(name="gmp")(c)
    v = k.Dropout(0.5, name="dropout")(v)
    out = k.Dense(5, activation="softmax", name="head")(v)
    return keras.Model(inputs, out, name="functional_test")


def test_a_functional_keras_model_from_h5_imports_layer_for_layer(tmp_path):
    source = functional_keras_model()
    randomize_keras(source)
    source.save(tmp_path / "functional.h5")
    spec, graph, weights = imported(tmp_path / "functional.h5", tmp_path)
    batch = images((13, 12, 3))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))
    assert graph.trainable_params + graph.non_trainable_params == source.count_params()
    layers = {item["name"]: item for item in yaml.safe_load(spec.read_text())["model"]["layers"]}
    assert layers["stem_bn"] == {"type": "batch_norm", "name": "stem_bn",
                                 "running_decay": 0.99, "epsilon": 0.001}
    assert layers["pad"]["padding"] == {"top": 1, "bottom": 0, "left": 2, "right": 1}
    assert layers["both"]["inputs"] == ["leaky", "stem_relu6"]


def test_keras_mobilenet_with_its_keepdims_head_imports(tmp_path):
    """keras.applications.MobileNet ends in keepdims pooling, a reshape to (1, 1, C), a 1x1
    convolution and a reshape back: one pixel, held as (C,), the convolution a dense."""
    source = keras.applications.MobileNet(weights=None, input_shape=(32, 32, 3), alpha=0.25,
                                          classes=7)
    randomize_keras(source)
    source.save(tmp_path / "mobilenet.keras")
    spec, graph, weights = imported(tmp_path / "mobilenet.keras", tmp_path)
    batch = images((32, 32, 3))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))
    assert graph.trainable_params + graph.non_trainable_params == source.count_params()
    head = [(item["type"], item["name"]) for item in
            yaml.safe_load(spec.read_text())["model"]["layers"][-4:]]
    assert head == [("global_avg_pool2d", "global_average_pooling2d"), ("dropout", "dropout"),
                    ("dense", "conv_preds"), ("activation", "predictions")]


def squeeze_excite_head() -> Any:
    """keepdims pooling, 1x1 convolutions, batch norm, a sum and a concatenation of pixels,
    then a flatten and a dense: every layer translated on one pixel."""
    inputs = keras.Input((6, 5, 4))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="features")(inputs)
    pixel = keras.layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    a = keras.layers.Conv2D(6, 1, activation="relu", name="reduce")(pixel)
    a = keras.layers.BatchNormalization(name="bn")(a)
    b = keras.layers.Conv2D(6, 1, use_bias=False, name="other")(pixel)
    both = keras.layers.Add(name="sum")([a, b])
    joined = keras.layers.Concatenate(name="joined")([both, a])
    flat = keras.layers.Flatten(name="flat")(keras.layers.Activation("sigmoid")(joined))
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(flat))


def test_layers_on_a_keepdims_pixel_import_as_layers_on_a_vector(tmp_path):
    source = squeeze_excite_head()
    randomize_keras(source)
    source.save(tmp_path / "se.keras")
    spec, _, weights = imported(tmp_path / "se.keras", tmp_path)
    batch = images((6, 5, 4))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))
    types = {item["name"]: item["type"] for item in
             yaml.safe_load(spec.read_text())["model"]["layers"]}
    assert types["reduce"] == types["other"] == "dense" and "flat" not in types


def test_inception_resnets_scaled_residual_imports_as_rescaling_and_add(tmp_path):
    """keras.applications.InceptionResNetV2 adds each block's residual scaled by a constant
    with its own CustomScaleLayer (x + r * scale): a rescaling of r, then an add."""
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    inputs = keras.Input((6, 5, 4))
    residual = keras.layers.Conv2D(4, 3, padding="same", name="residual")(inputs)
    added = CustomScaleLayer(0.17, name="block")([inputs, residual])
    features = keras.layers.Conv2D(3, 1, activation="relu", name="features")(added)
    outputs = keras.layers.Dense(2, name="out")(keras.layers.Flatten(name="flat")(features))
    source = keras.Model(inputs, outputs)
    randomize_keras(source)
    source.save(tmp_path / "scaled.keras")
    spec, _, weights = imported(tmp_path / "scaled.keras", tmp_path)
    layers = {item["name"]: item for item in yaml.safe_load(spec.read_text())["model"]["layers"]}
    assert layers["block_scaled"]["type"] == "rescaling"
    assert layers["block_scaled"]["scale"] == pytest.approx(0.17)
    assert layers["block"]["type"] == "add"
    batch = images((6, 5, 4))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))


@pytest.mark.slow
def test_keras_inception_resnet_v2_imports_with_its_outputs(tmp_path):
    """All of InceptionResNetV2 (54 million parameters, 75x75: 50 s) with Keras's outputs."""
    source = keras.applications.InceptionResNetV2(weights=None, input_shape=(75, 75, 3),
                                                  classes=10)
    randomize_keras(source)
    source.save(tmp_path / "irv2.keras")
    spec, graph, weights = imported(tmp_path / "irv2.keras", tmp_path)
    assert graph.trainable_params + graph.non_trainable_params == source.count_params()
    batch = images((75, 75, 3), 2)
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))


@pytest.mark.parametrize("gate_first", [False, True], ids=["image-gate", "gate-image"])
def test_a_squeeze_excite_block_imports_as_a_multiply_by_a_channel_gate(tmp_path, gate_first):
    """Keras's squeeze-excite (EfficientNet's, MobileNetV3's): keepdims pooling, two 1x1
    convolutions, then Multiply of the feature map and the (1, 1, C) gate: a multiply of
    the image and the (C,) gate; a product of two pixels stays a pixel."""
    k = keras.layers
    inputs = keras.Input((6, 5, 4))
    x = k.Conv2D(8, 3, padding="same", activation="relu", name="features")(inputs)
    pixel = k.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    reduced = k.Conv2D(3, 1, activation="relu", name="reduce")(pixel)
    gate = k.Conv2D(8, 1, activation="sigmoid", name="expand")(reduced)
    gate = k.Multiply(name="gate_squared")([gate, gate])
    scaled = k.Multiply(name="excite")([gate, x] if gate_first else [x, gate])
    outputs = k.Dense(3, name="out")(k.GlobalAveragePooling2D(name="pool")(scaled))
    source = keras.Model(inputs, outputs)
    randomize_keras(source)
    source.save(tmp_path / "se.keras")
    spec, graph, weights = imported(tmp_path / "se.keras", tmp_path)
    batch = images((6, 5, 4))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))
    assert graph["excite"].op == graph["gate_squared"].op == "multiply"
    assert graph["gate_squared"].shape == (8,) and graph["excite"].shape == (6, 5, 8)
    assert graph["expand"].op == "dense"


def test_a_product_of_three_tensors_is_refused(tmp_path):
    inputs = keras.Input((4, 4, 2))
    product = keras.layers.Multiply(name="triple")([inputs, inputs, inputs])
    source = keras.Model(inputs, keras.layers.Flatten()(product))
    source.save(tmp_path / "triple.keras")
    with pytest.raises(ImportRefused) as refusal:
        import_model(tmp_path / "triple.keras")
    assert "'triple' (Multiply): a product of 3 tensors: specforge's multiply takes two" in \
        str(refusal.value)


def test_a_pixel_read_by_a_layer_that_needs_an_image_is_refused(tmp_path):
    inputs = keras.Input((6, 6, 4))
    pixel = keras.layers.GlobalMaxPooling2D(keepdims=True, name="squeeze")(inputs)
    padded = keras.layers.ZeroPadding2D(1, name="pad")(pixel)
    source = keras.Model(inputs, keras.layers.Flatten()(padded))
    source.save(tmp_path / "pixel.keras")
    with pytest.raises(ImportRefused) as refusal:
        import_model(tmp_path / "pixel.keras")
    assert "'pad' (ZeroPadding2D): a (1, 1, channels) tensor from keepdims=True pooling" in \
        str(refusal.value)


def test_keras_rescaling_and_normalization_import_as_rescaling(tmp_path):
    """A model carrying its preprocessing, as keras.applications' EfficientNet does: pixels
    scaled to [0, 1], normalised per channel by a fixed mean and variance."""
    k = keras.layers
    mean, variance = [0.485, 0.456, 0.406], [0.229**2, 0.224**2, 0.225**2]
    inputs = keras.Input((7, 6, 3))
    x = k.Rescaling(1 / 255, name="scale")(inputs)
    x = k.Normalization(mean=mean, variance=variance, name="norm")(x)
    x = k.Conv2D(5, 3, activation="relu", name="conv")(x)
    x = k.Rescaling([0.5, 2.0, -1.0, 1.0, 3.0], offset=0.25, name="per_channel")(x)
    x = k.GlobalAveragePooling2D(name="gap")(x)
    source = keras.Model(inputs, k.Dense(4, name="out")(x))
    randomize_keras(source)
    source.save(tmp_path / "preprocessing.keras")
    spec, _, weights = imported(tmp_path / "preprocessing.keras", tmp_path)
    layers = yaml.safe_load(spec.read_text())["model"]["layers"]
    found = {item["name"]: item for item in layers if item["type"] == "rescaling"}
    assert found["scale"] == {"type": "rescaling", "name": "scale", "scale": 1 / 255}
    std = np.sqrt(np.float32(variance)).astype(np.float64)
    np.testing.assert_allclose(found["norm"]["scale"], 1 / std, rtol=1e-6)
    np.testing.assert_allclose(found["norm"]["offset"], -np.float32(mean) / std, rtol=1e-6)
    assert (found["per_channel"]["scale"], found["per_channel"]["offset"]) == \
        ([0.5, 2.0, -1.0, 1.0, 3.0], 0.25)
    batch = np.random.default_rng(7).uniform(0, 255, (3, 7, 6, 3)).astype(np.float32)
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))


def test_a_convnext_block_imports_with_layer_norm_and_pointwise_dense(tmp_path):
    """ConvNeXt's block: a depthwise 7x7 convolution, LayerNormalization over each pixel's
    channels, Dense layers on the image (1x1 convolutions), its LayerScale (a depthwise 1x1
    convolution), a residual sum; then a layer norm of the pooled features."""
    from keras.src.applications.convnext import LayerScale

    k = keras.layers
    inputs = keras.Input((9, 8, 4))
    x = k.DepthwiseConv2D(7, padding="same", name="dw")(inputs)
    x = k.LayerNormalization(epsilon=1e-6, name="norm")(x)
    x = k.Dense(16, activation="gelu", name="expand")(x)
    x = k.Dense(4, name="project")(x)
    x = LayerScale(1e-6, 4, name="scale")(x)
    x = k.Add(name="residual")([inputs, x])
    x = k.GlobalAveragePooling2D(name="gap")(x)
    x = k.LayerNormalization(name="head_norm")(x)
    source = keras.Model(inputs, k.Dense(3, name="out")(x))
    randomize_keras(source)
    source.save(tmp_path / "convnext_block.keras")
    spec, graph, weights = imported(tmp_path / "convnext_block.keras", tmp_path)
    batch = images((9, 8, 4))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))
    ops = {n.name: n for n in graph}
    assert [ops[n].op for n in ("norm", "expand", "project", "head_norm")] == [
        "layer_norm", "conv2d", "conv2d", "layer_norm"]
    assert (ops["norm"].attrs["epsilon"], ops["head_norm"].attrs["epsilon"]) == (1e-6, 1e-3)
    assert ops["expand"].attrs["kernel"] == (1, 1) and weights["expand.kernel"].shape == (
        1, 1, 4, 16)
    assert (ops["scale"].op, ops["scale"].attrs["groups"], ops["scale"].attrs["bias"]) == (
        "conv2d", 4, False)
    np.testing.assert_array_equal(weights["scale.kernel"].reshape(-1),
                                  np.asarray(source.get_layer("scale").gamma))


@pytest.mark.parametrize("layer, reason", [
    (lambda: keras.layers.LayerNormalization(axis=[1, 2, 3], name="norm"),
     "'norm' (LayerNormalization): axis [1, 2, 3]: specforge's layer_norm normalises only "
     "the last (channel) axis"),
    (lambda: keras.layers.LayerNormalization(axis=1, name="norm"),
     "'norm' (LayerNormalization): axis [1]: specforge's layer_norm normalises only the "
     "last (channel) axis"),
    (lambda: keras.layers.LayerNormalization(center=False, name="norm"),
     "'norm' (LayerNormalization): center=False: specforge's layer_norm learns both gamma "
     "and beta")], ids=["all-axes", "height", "no-center"])
def test_keras_layer_norm_over_other_axes_is_refused(tmp_path, layer, reason):
    inputs = keras.Input((4, 5, 3))
    source = keras.Model(inputs, keras.layers.Flatten()(layer()(inputs)))
    source.save(tmp_path / "norm.keras")
    with pytest.raises(ImportRefused) as refusal:
        import_model(tmp_path / "norm.keras")
    assert reason in str(refusal.value)


def test_keras_prelus_import_as_prelu(tmp_path):
    """A slope per channel of an image (shared_axes=[1, 2]), one for all (every axis
    shared), one per feature of a vector (Keras's default there)."""
    k = keras.layers
    inputs = keras.Input((6, 5, 3))
    x = k.PReLU(shared_axes=[1, 2], name="channels")(k.Conv2D(4, 3, name="conv")(inputs))
    x = k.PReLU(shared_axes=[1, 2, 3], name="one")(x)
    x = k.PReLU(name="features")(k.Dense(5, name="fc")(k.Flatten()(x)))
    source = keras.Model(inputs, k.Dense(3, name="out")(x))
    randomize_keras(source)
    source.save(tmp_path / "prelu.keras")
    spec, graph, weights = imported(tmp_path / "prelu.keras", tmp_path)
    batch = images((6, 5, 3))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))
    ops = {n.name: n for n in graph}
    assert [(ops[n].op, ops[n].shape) for n in ("channels", "one", "features")] == [
        ("prelu", (4, 3, 4)), ("prelu", (4, 3, 4)), ("prelu", (5,))]
    one = float(np.asarray(source.get_layer("one").get_weights()[0]).reshape(-1)[0])
    assert weights["one.alpha"].tolist() == [one] * 4
    np.testing.assert_array_equal(weights["channels.alpha"],
                                  source.get_layer("channels").get_weights()[0].reshape(4))


def test_a_keras_prelu_with_a_slope_per_pixel_is_refused(tmp_path):
    inputs = keras.Input((4, 5, 3))  # Keras's default: alpha of shape (4, 5, 3)
    source = keras.Model(inputs, keras.layers.Flatten()(keras.layers.PReLU(name="pr")(inputs)))
    source.save(tmp_path / "prelu.keras")
    with pytest.raises(ImportRefused) as refusal:
        import_model(tmp_path / "prelu.keras")
    assert "'pr' (PReLU): alpha of shape [4, 5, 3] (shared_axes None): specforge's prelu " \
        "learns one slope per channel, shared by height and width (PReLU(shared_axes=[1, 2]))" \
        in str(refusal.value)


def test_keras_group_norms_import_as_group_norm(tmp_path):
    """Groups of an image's channels, one group per channel (groups=-1), groups of
    features; Keras's epsilon and another."""
    k = keras.layers
    inputs = keras.Input((6, 5, 3))
    x = k.GroupNormalization(2, name="groups")(k.Conv2D(4, 3, name="conv")(inputs))
    x = k.GroupNormalization(-1, epsilon=1e-5, name="instance")(x)
    x = k.GroupNormalization(3, name="features")(k.Dense(6, name="fc")(k.Flatten()(x)))
    source = keras.Model(inputs, k.Dense(3, name="out")(x))
    randomize_keras(source)
    source.save(tmp_path / "grouped.keras")
    spec, graph, weights = imported(tmp_path / "grouped.keras", tmp_path)
    batch = images((6, 5, 3))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))
    ops = {n.name: n for n in graph}
    assert [(ops[n].op, ops[n].attrs["groups"], ops[n].attrs["epsilon"])
            for n in ("groups", "instance", "features")] == [
        ("group_norm", 2, 1e-3), ("group_norm", 4, 1e-5), ("group_norm", 3, 1e-3)]


def test_a_keras_group_norm_without_scale_is_refused(tmp_path):
    inputs = keras.Input((4, 5, 4))
    norm = keras.layers.GroupNormalization(2, scale=False, name="gn")
    source = keras.Model(inputs, keras.layers.Flatten()(norm(inputs)))
    source.save(tmp_path / "gn.keras")
    with pytest.raises(ImportRefused) as refusal:
        import_model(tmp_path / "gn.keras")
    assert "'gn' (GroupNormalization): scale=False: specforge's group_norm learns both " \
        "gamma and beta" in str(refusal.value)


def test_keras_cropping2d_imports_as_cropping2d(tmp_path):
    """Each way Keras writes a crop, NASNet's one-pixel crop of a branch beside a valid
    convolution among them; the spec writes pad2d's forms."""
    k = keras.layers
    inputs = keras.Input((9, 8, 3))
    x = k.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = k.Cropping2D(((2, 0), (1, 3)), name="uneven")(x)
    centre = k.Cropping2D(1, name="centre")(x)
    side = k.Conv2D(4, 3, name="side")(x)
    x = k.Add(name="sum")([centre, side])
    x = k.Cropping2D((1, 0), name="rows")(x)
    source = keras.Model(inputs, k.Dense(3, name="out")(k.Flatten()(x)))
    randomize_keras(source)
    source.save(tmp_path / "cropped.keras")
    spec, _, weights = imported(tmp_path / "cropped.keras", tmp_path)
    layers = yaml.safe_load(spec.read_text())["model"]["layers"]
    assert {item["name"]: item["cropping"] for item in layers
            if item["type"] == "cropping2d"} == {
        "uneven": {"top": 2, "bottom": 0, "left": 1, "right": 3}, "centre": 1, "rows": [1, 0]}
    batch = images((9, 8, 3))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))


@pytest.mark.parametrize("layer, reason", [
    (lambda: keras.layers.Normalization(mean=[1.0, 2, 3], variance=[1.0, 4, 9], invert=True,
                                        name="norm"),
     "'norm' (Normalization): invert=True (x * std + mean): only the normalisation itself "
     "is translated"),
    (lambda: keras.layers.Normalization(axis=1, mean=[1.0] * 4, variance=[2.0] * 4,
                                        name="norm"),
     "'norm' (Normalization): axis (1,): specforge's rescaling is per channel (the last "
     "axis) or one number")], ids=["invert", "axis"])
def test_keras_normalization_that_is_no_rescaling_is_refused(tmp_path, layer, reason):
    inputs = keras.Input((4, 5, 3))
    x = keras.layers.Flatten()(layer()(inputs))
    keras.Model(inputs, keras.layers.Dense(2)(x)).save(tmp_path / "norm.keras")
    with pytest.raises(ImportRefused) as refusal:
        import_model(tmp_path / "norm.keras")
    assert reason in refusal.value.lines, refusal.value.lines


def test_a_pretrained_base_inside_a_sequential_model_is_imported_layer_by_layer(tmp_path):
    """Transfer learning's usual shape: a functional model used as the first layer."""
    k = keras.layers
    inputs = keras.Input((10, 10, 3), name="image")
    x = k.Conv2D(6, 3, padding="same", name="conv")(inputs)
    x = k.BatchNormalization(name="bn")(x)
    x = k.Add(name="skip")([x, k.Conv2D(6, 1, name="shortcut")(inputs)])
    base = keras.Model(inputs, k.ReLU(name="relu")(x), name="base")
    source = keras.Sequential([keras.Input((10, 10, 3)), base,
                               k.GlobalAveragePooling2D(name="gap"),
                               k.Dense(4, activation="softmax", name="head")])
    randomize_keras(source)
    source.save(tmp_path / "transfer.keras")
    spec, _, weights = imported(tmp_path / "transfer.keras", tmp_path)
    batch = images((10, 10, 3))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))
    layers = yaml.safe_load(spec.read_text())["model"]["layers"]
    assert [item["name"] for item in layers] == ["conv", "bn", "shortcut", "skip", "relu",
                                                 "gap", "head"]
    assert layers[2]["inputs"] == "input"


def test_imported_specs_leave_defaults_out_and_validate(tmp_path):
    source = functional_keras_model()
    source.save(tmp_path / "functional.keras")
    spec, _, _ = imported(tmp_path / "functional.keras", tmp_path)
    classes = {canonical: cls for cls in L.Layer.__origin__.__args__  # type: ignore[attr-defined]
               for canonical in cls.model_fields["type"].annotation.__args__}
    for item in yaml.safe_load(spec.read_text())["model"]["layers"]:
        fields = classes[item["type"]].model_fields
        for key, value in item.items():
            default = fields[key].default
            assert key in ("type", "name") or value != default, (item, key)
    result = ok(cli("validate", str(spec)))
    assert "ok:" in result.stdout


def test_a_keras_lambda_layer_is_refused_before_loading(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    k = keras.layers
    inputs = keras.Input((4, 4, 1))
    x = k.Lambda(lambda t: t * 2, name="doubler")(inputs)
    model = keras.Model(inputs, k.Dense(2)(k.Flatten()(x)))
    for suffix in (".keras", ".h5"):
        model.save(tmp_path / f"lambda{suffix}")
    monkeypatch.setattr(keras.saving, "load_model",
                        lambda *a, **k: marker.write_text("loaded"))
    for suffix in (".keras", ".h5"):
        with pytest.raises(ImportRefused) as caught:
            import_model(tmp_path / f"lambda{suffix}")
        assert "'doubler' (Lambda): a layer of Python code" in str(caught.value)
    assert not marker.exists()


def test_keras_files_declaring_more_data_than_they_hold_are_refused(tmp_path):
    """An HDF5 dataset may declare any shape without storage, and a zip entry any size:
    Keras would allocate what they declare, so the import refuses before loading."""
    import zipfile

    import h5py

    model = seed_keras_model()
    model.save(tmp_path / "model.h5")
    with h5py.File(tmp_path / "model.h5", "a") as h5:
        h5["model_weights"].create_dataset("huge", shape=(1_000_000, 1_000_000), dtype="f4")
    assert (tmp_path / "model.h5").stat().st_size < 10_000_000
    with pytest.raises(ImportRefused, match=r"its arrays declare 4,000,00\d,\d{3},\d{3} bytes"):
        import_model(tmp_path / "model.h5")
    with zipfile.ZipFile(tmp_path / "bomb.keras", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.weights.h5", bytes(80 << 20))
    with pytest.raises(ImportRefused, match=r"'model\.weights\.h5' would expand from"):
        import_model(tmp_path / "bomb.keras")


def test_unsupported_keras_layers_are_listed_one_per_line_and_nothing_is_written(tmp_path,
                                                                                 capsys):
    k = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = k.Conv2D(4, 3, data_format="channels_last", padding="valid", name="ok_conv")(inputs)
    x = k.Conv2DTranspose(4, 3, name="up")(x)
    x = k.MaxPooling2D(2, name="pool")(x)
    x = k.Conv2D(4, 3, activation="exponential", name="exp_conv")(x)
    x = k.BatchNormalization(axis=1, name="bn_axis1")(x)
    out = k.LayerNormalization(axis=[1, 2], name="ln_axes")(x)
    keras.Model(inputs, out).save(tmp_path / "bad.keras")
    code, message = main_in_process(capsys, "import", str(tmp_path / "bad.keras"), "-o",
                                    str(tmp_path / "out" / "bad.yaml"))
    assert code == 2
    assert message.startswith(f"error: cannot import {tmp_path / 'bad.keras'}:\n")
    lines = [line.strip() for line in message.splitlines()[1:]]
    assert lines == [
        "'up' (Conv2DTranspose): layer type Conv2DTranspose has no specforge equivalent",
        "'exp_conv' (Conv2D): activation 'exponential' is not one of specforge's",
        "'bn_axis1' (BatchNormalization): axis 1: specforge normalises the last (channel) axis",
        "'ln_axes' (LayerNormalization): axis [1, 2]: specforge's layer_norm normalises "
        "only the last (channel) axis",
    ], message
    assert not (tmp_path / "out").exists()
    shown = readme_section().split("```text\n")[1].split("```")[0].splitlines()
    assert shown[0] == "error: cannot import bad.keras:"
    assert {line.strip() for line in shown[1:]} <= set(lines)


# --- ONNX from PyTorch ---------------------------------------------------------------------------

class _Residual(torch.nn.Module):
    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(channels // stride, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.down = None if stride == 1 else nn.Sequential(
            nn.Conv2d(channels // stride, channels, 1, stride, bias=False),
            nn.BatchNorm2d(channels))

    def forward(self, x: Any) -> Any:
        shortcut = x if self.down is None else self.down(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + shortcut)


class _ResNetStyle(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 8, 5, 2, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(_Residual(8, 1), _Residual(8, 1))
        self.layer2 = nn.Sequential(_Residual(16, 2), _Residual(16, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Any) -> Any:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1))


@pytest.mark.parametrize("training", ["EVAL", "PRESERVE"])
def test_a_resnet_style_torch_model_exported_to_onnx(tmp_path, training):
    """EVAL folds batch norm into the convolutions; PRESERVE keeps it as its own op."""
    torch.manual_seed(0)
    source = _ResNetStyle()
    randomize_torch(source)
    path = export_torch(source, (20, 20, 3), tmp_path / "resnet.onnx",
                        training=getattr(torch.onnx.TrainingMode, training))
    spec, graph, weights = imported(path, tmp_path)
    batch = images((20, 20, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))
    ops = [node.op for node in graph]
    assert ops.count("add") == 4
    assert ops.count("batch_norm") == (10 if training == "PRESERVE" else 0)
    assert max(len(line) for line in spec.read_text().splitlines()) <= 100
    names = [item["name"] for item in yaml.safe_load(spec.read_text())["model"]["layers"]]
    assert "layer2_0_down_0" in names and "fc" in names, names
    if training == "PRESERVE":
        assert graph.trainable_params + graph.non_trainable_params == sum(
            t.numel() for t in [*source.parameters(), *source.buffers()] if t.dim() > 0)


class _SeedCNN(torch.nn.Module):
    """The seed CNN written in PyTorch: torch flattens channel-first."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(128 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: Any) -> Any:
        x = self.features(x)
        x = x.view(x.size(0), -1)  # shape arithmetic in the graph with a dynamic batch
        return torch.softmax(self.fc2(torch.relu(self.fc1(x))), dim=1)


def test_the_seed_cnn_from_torch_gets_its_flatten_order_right(tmp_path):
    torch.manual_seed(0)
    source = _SeedCNN()
    path = export_torch(source, (32, 32, 3), tmp_path / "seed_cnn.onnx",
                        dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}})
    spec, graph, weights = imported(path, tmp_path)
    batch = images((32, 32, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))
    seed = compile_spec(SPECS / "cifar.yaml").graph
    assert graph.trainable_params == seed.trainable_params
    loaded, model = load_spec(SPECS / "cifar.yaml")
    assert structure(graph) == structure(lower_model(model, loaded))


class _Mobile(torch.nn.Module):
    """Depthwise convolutions, relu6 (Clip), explicit pads, hardswish, silu (Sigmoid and
    Mul), concat, avg pool."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 8, 3, 2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.dw = nn.Conv2d(8, 16, 3, 1, 1, groups=8)
        self.pw = nn.Conv2d(16, 8, 1)
        self.hs = nn.Hardswish()
        self.silu = nn.SiLU()
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(16 * 3 * 3, 4)

    def forward(self, x: Any) -> Any:
        x = self.act(self.bn(self.stem(torch.nn.functional.pad(x, (0, 1, 0, 1)))))
        y = self.hs(self.pw(self.silu(self.dw(x))))
        x = self.pool(torch.cat([x, y], 1))
        return self.head(torch.flatten(x, 1))


def test_depthwise_relu6_pads_and_concat_from_torch(tmp_path):
    torch.manual_seed(0)
    source = _Mobile()
    randomize_torch(source)
    path = export_torch(source, (13, 13, 3), tmp_path / "mobile.onnx",
                        training=torch.onnx.TrainingMode.PRESERVE)
    spec, _, weights = imported(path, tmp_path)
    batch = images((13, 13, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))
    layers = yaml.safe_load(spec.read_text())["model"]["layers"]
    types = {item["type"] for item in layers}
    assert {"depthwise_conv2d", "concat", "avg_pool2d"} <= types
    # F.pad before a conv is the conv's own padding, as a person writes it
    assert "pad2d" not in types
    assert layers[0]["padding"] == {"top": 0, "bottom": 1, "left": 0, "right": 1}
    activations = {item.get("activation", item.get("fn")) for item in layers}
    assert {"relu6", "silu", "hard_swish"} <= activations, activations


class _Gated(torch.nn.Module):
    """A squeeze-excite gate without weights (mean, sigmoid, product), a product of two
    feature maps, silu written out (x * sigmoid(x)), and a gate of linear layers viewed as
    (N, C, 1, 1), as torch code writes squeeze-excite."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.other = torch.nn.Conv2d(3, 6, 3)
        self.fc = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x: Any) -> Any:
        a = self.conv(x)
        gate = torch.sigmoid(a.mean((2, 3), keepdim=True))
        y = gate * a * self.other(x)
        y = y * torch.sigmoid(y)
        n, c = y.shape[:2]
        y = y * torch.sigmoid(self.fc(y.mean((2, 3)))).view(n, c, 1, 1)
        return self.head(y.mean((2, 3)))


def test_products_from_torch_import_as_multiply_and_silu(tmp_path):
    torch.manual_seed(0)
    source = _Gated()
    path = export_torch(source, (7, 6, 3), tmp_path / "gated.onnx")
    spec, graph, weights = imported(path, tmp_path)
    batch = images((7, 6, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))
    products = [n for n in graph if n.op == "multiply"]
    # the gate on the left, two maps, a gate from view (an Unsqueeze: tests/test_round_trip)
    assert [[len(graph[i].shape) for i in n.inputs] for n in products] == [
        [1, 3], [3, 3], [3, 1]]
    assert [n.attrs["fn"] for n in graph if n.op == "activation"] == [
        "sigmoid", "silu", "sigmoid"]


class _LayerNormed(torch.nn.Module):
    """torch's layer norms: over each pixel's channels as torchvision's ConvNeXt writes it
    (channels moved last, nn.LayerNorm, moved back), and over features (or, with
    ``whole``, over (C, H, W) of an NCHW image: not specforge's layer_norm)."""

    def __init__(self, whole: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.norm = torch.nn.LayerNorm([6, 5, 4] if whole else 6, eps=1e-6)
        self.fc = torch.nn.Linear(6, 5)
        self.features = torch.nn.LayerNorm(5)
        self.head = torch.nn.Linear(5, 4)
        self.whole = whole

    def forward(self, x: Any) -> Any:
        x = self.conv(x)
        x = self.norm(x) if self.whole else self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(self.features(self.fc(x.mean((2, 3)))))


def test_layer_norms_from_torch_import_as_layer_norm(tmp_path):
    torch.manual_seed(0)
    source = _LayerNormed()
    with torch.no_grad():  # gamma and beta that matter (torch's start as ones and zeros)
        for norm in (source.norm, source.features):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    path = export_torch(source, (7, 6, 3), tmp_path / "normed.onnx", opset_version=17)
    spec, graph, weights = imported(path, tmp_path)
    batch = images((7, 6, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))
    norms = [n for n in graph if n.op == "layer_norm"]
    assert [(n.shape, n.attrs["epsilon"]) for n in norms] == [((5, 4, 6), 1e-6), ((5,), 1e-5)]
    assert np.array_equal(weights[f"{norms[0].name}.gamma"], source.norm.weight.detach().numpy())


def test_a_layer_norm_over_more_than_the_channels_is_refused(tmp_path):
    path = export_torch(_LayerNormed(whole=True), (7, 6, 3), tmp_path / "whole.onnx",
                        opset_version=17)
    with pytest.raises(ImportRefused) as refusal:
        import_model(path)
    assert "normalising axes [1, 2, 3] of a NCHW tensor of ONNX shape [1, 6, 5, 4]: " \
        "specforge's layer_norm normalises the channels alone" in str(refusal.value)


class _TorchvisionSqueezeExcite(torch.nn.Module):
    """torchvision's MobileNetV3 block: hard-swish, a depthwise convolution, and its
    squeeze-excite written with 1x1 Conv2d layers on the (N, C, 1, 1) pooled tensor
    (AdaptiveAvgPool2d(1), Conv2d, ReLU, Conv2d, Hardsigmoid, times the image); ``groups``:
    the first 1x1 conv's (then not a dense layer)."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        nn = torch.nn
        self.expand = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8),
                                    nn.Hardswish(), nn.Conv2d(8, 8, 3, padding=1, groups=8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1, groups=groups), nn.Conv2d(4, 8, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: Any) -> Any:
        x = self.expand(x)
        gate = torch.nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        return self.head(x * gate)


def test_torchvisions_squeeze_excite_imports_with_dense_layers_on_the_pooled_tensor(tmp_path):
    torch.manual_seed(0)
    source = _TorchvisionSqueezeExcite()
    randomize_torch(source)
    path = export_torch(source, (7, 6, 3), tmp_path / "se.onnx")
    spec, graph, weights = imported(path, tmp_path)
    batch = images((7, 6, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))
    dense = [n for n in graph if n.op == "dense"]
    readers = {i: n for n in graph for i in n.inputs}
    assert [(n.shape, readers[n.name].attrs.get("fn")) for n in dense[:2]] == [
        ((4,), "relu"), ((8,), "hard_sigmoid")]
    assert np.array_equal(weights[f"{dense[0].name}.kernel"],
                          source.fc1.weight.detach().numpy()[:, :, 0, 0].T)
    product = next(n for n in graph if n.op == "multiply")
    assert [graph[i].shape for i in product.inputs] == [(7, 6, 8), (8,)]


def test_a_grouped_conv_of_the_pooled_tensor_is_refused(tmp_path):
    path = export_torch(_TorchvisionSqueezeExcite(groups=2), (7, 6, 3), tmp_path / "g.onnx")
    with pytest.raises(ImportRefused) as refusal:
        import_model(path)
    assert "a 1x1 Conv (group 2, pads [0, 0, 0, 0]) of a POOLED (N, C, 1, 1) tensor: only a " \
        "1x1 Conv without groups or pads is translated" in str(refusal.value)


class _TorchvisionConvNeXtBlock(torch.nn.Module):
    """torchvision's ConvNeXt CNBlock: a depthwise 7x7 convolution, the channels moved last,
    LayerNorm, nn.Linear on each pixel (a MatMul of the NHWC image), GELU, nn.Linear, moved
    back, its layer scale (a learned (C, 1, 1) tensor times the image) and the residual;
    then ConvNeXt's head: pooled, layer-normed channels-last (LayerNorm2d), flattened."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, channels, 2, 2)
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.up, self.down = nn.Linear(channels, 4 * channels), nn.Linear(4 * channels, channels)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels).reshape(channels, 1, 1))
        self.pool, self.head_norm = nn.AdaptiveAvgPool2d(1), nn.LayerNorm(channels, eps=1e-6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels, 3))

    def forward(self, x: Any) -> Any:
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.down(torch.nn.functional.gelu(self.up(y))).permute(0, 3, 1, 2)
        pooled = self.pool(x + self.scale * y)
        return self.head(self.head_norm(pooled.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_torchvisions_convnext_block_imports_with_pointwise_convolutions(tmp_path):
    torch.manual_seed(0)
    source = _TorchvisionConvNeXtBlock()
    path = export_torch(source, (10, 8, 3), tmp_path / "cnblock.onnx", opset_version=17)
    spec, graph, weights = imported(path, tmp_path)
    batch = images((10, 8, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))
    pointwise = [n for n in graph if n.op == "conv2d" and n.attrs["kernel"] == (1, 1)]
    assert [(n.shape, n.attrs["bias"]) for n in pointwise] == [((5, 4, 24), True),
                                                               ((5, 4, 6), True)]
    assert np.array_equal(weights[f"{pointwise[0].name}.kernel"][0, 0],
                          source.up.weight.detach().numpy().T)
    assert np.array_equal(weights[f"{pointwise[0].name}.bias"], source.up.bias.detach().numpy())
    assert any(n.op == "rescaling" for n in graph)  # the layer scale: a constant here
    assert [n.shape for n in graph if n.op == "layer_norm"] == [(5, 4, 6), (6,)]


def _channel_shuffle(x: Any, groups: int) -> Any:
    """torchvision's shufflenetv2.channel_shuffle, as it writes it."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


class _ShuffleUnit(torch.nn.Module):
    """torchvision's ShuffleNetV2 InvertedResidual: at stride 1 half the channels pass
    (``x.chunk(2, dim=1)``) and half go through the branch; at stride 2 two branches read
    the whole input; concatenated, then shuffled in two groups."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        nn, half = torch.nn, oup // 2
        self.stride = stride

        def depthwise(channels: int) -> list[Any]:
            return [nn.Conv2d(channels, channels, 3, stride, 1, bias=False, groups=channels),
                    nn.BatchNorm2d(channels)]

        def pointwise(i: int, o: int) -> list[Any]:
            return [nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.branch1 = nn.Sequential(*depthwise(inp), *pointwise(inp, half)) \
            if stride > 1 else nn.Sequential()
        self.branch2 = nn.Sequential(*pointwise(inp if stride > 1 else half, half),
                                     *depthwise(half), *pointwise(half, half))

    def forward(self, x: Any) -> Any:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out, 2)


class _TorchvisionShuffleNetUnits(torch.nn.Module):
    """A stem, ShuffleNetV2's stride-2 unit and two stride-1 units, and a head."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.stage = nn.Sequential(_ShuffleUnit(8, 16, 2), _ShuffleUnit(16, 16, 1),
                                   _ShuffleUnit(16, 16, 1))
        self.head = nn.Sequential(nn.Conv2d(16, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(12, 3))

    def forward(self, x: Any) -> Any:
        return self.head(self.stage(self.stem(x)))


def test_torchvisions_shufflenet_v2_units_import_with_channel_slices_and_shuffles(tmp_path):
    """The TorchScript exporter writes ``x.chunk(2, dim=1)`` as two Slices whose ends are
    shape arithmetic; torch's default exporter's Split is in the dynamo test below."""
    torch.manual_seed(0)
    source = _TorchvisionShuffleNetUnits()
    randomize_torch(source)
    path = export_torch(source, (12, 10, 3), tmp_path / "shufflenet.onnx", opset_version=17)
    assert {"Slice", "Reshape", "Transpose"} <= {n.op_type for n in onnx.load(path).graph.node}
    spec, graph, weights = imported(path, tmp_path)
    batch = images((12, 10, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))
    assert [n.attrs["groups"] for n in graph if n.op == "channel_shuffle"] == [2, 2, 2]
    assert [(n.attrs["start"], n.attrs["stop"]) for n in graph if n.op == "channel_slice"] \
        == [(0, 8), (8, 16)] * 2


class _GroupNormed(torch.nn.Module):
    """torch's group norms: nn.GroupNorm of an image (torch's default epsilon) and of
    features, and nn.InstanceNorm2d with its affine parameters (a group per channel)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv = nn.Conv2d(3, 6, 3)
        self.groups, self.instance = nn.GroupNorm(2, 6), nn.InstanceNorm2d(6, affine=True)
        self.fc, self.features = nn.Linear(6, 8), nn.GroupNorm(2, 8, eps=1e-3)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():  # gamma and beta that matter (torch's start as ones and zeros)
            for norm in (self.groups, self.instance, self.features):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: Any) -> Any:
        x = self.instance(torch.relu(self.groups(self.conv(x))))
        return self.head(self.features(self.fc(x.mean((2, 3)))))


def test_group_norms_from_torch_import_as_group_norm(tmp_path):
    """Reshape to (N, groups, -1), InstanceNormalization, Reshape back, Mul by gamma, Add
    of beta: one group_norm, gamma and beta in it."""
    torch.manual_seed(0)
    source = _GroupNormed()
    randomize_torch(source)
    path = export_torch(source, (7, 6, 3), tmp_path / "grouped.onnx", opset_version=17)
    spec, graph, weights = imported(path, tmp_path)
    batch = images((7, 6, 3))
    assert_matches(spec, weights, batch, torch_output(source, batch))
    norms = [n for n in graph if n.op == "group_norm"]
    assert [(n.shape, n.attrs["groups"], n.attrs["epsilon"]) for n in norms] == [
        ((5, 4, 6), 2, 1e-5), ((5, 4, 6), 6, 1e-5), ((8,), 2, 1e-3)]
    assert not any(n.op == "rescaling" for n in graph)  # gamma and beta went into the norms
    np.testing.assert_allclose(weights[f"{norms[0].name}.gamma"],
                               source.groups.weight.detach().numpy(), rtol=1e-6)


def test_a_reshape_to_groups_read_by_another_op_is_refused(tmp_path):
    class Grouped(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return torch.relu(x.reshape(x.shape[0], 3, -1)).reshape(x.shape[0], -1)

    path = export_torch(Grouped(), (4, 4, 6), tmp_path / "grouped.onnx", opset_version=17)
    with pytest.raises(ImportRefused) as refusal:
        import_model(path)
    assert "only (batch, groups, -1) read by an InstanceNormalization alone (torch's " \
        "GroupNorm)" in str(refusal.value)


@pytest.mark.parametrize("source", [_ResNetStyle, _TorchvisionSqueezeExcite,
                                    _TorchvisionConvNeXtBlock, _TorchvisionShuffleNetUnits,
                                    _GroupNormed],
                         ids=["resnet", "squeeze-excite", "convnext", "shufflenet", "group-norm"])
def test_torchs_default_dynamo_exporter_graphs_import(tmp_path, source):
    """torch.onnx.export's default since torch 2.9 (dynamo=True, through torch.export and
    onnxscript) writes other graphs than the TorchScript exporter: opset 18, its own names
    and decompositions. They import with torch's outputs too."""
    import warnings

    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    module = source()
    randomize_torch(module)
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, 20, 20),), str(path), dynamo=True,
                          verbose=False)
    spec, _, weights = imported(path, tmp_path)
    batch = images((20, 20, 3))
    assert_matches(spec, weights, batch, torch_output(module, batch))


def test_the_import_command_writes_a_spec_that_validates(tmp_path):
    torch.manual_seed(0)
    path = export_torch(_ResNetStyle(), (20, 20, 3), tmp_path / "resnet.onnx")
    out = tmp_path / "specs" / "resnet.yaml"
    out.parent.mkdir()
    result = ok(cli("import", str(path), "-o", str(out)))
    assert f"wrote {out} and {out.with_suffix('.npz')}" in result.stderr
    assert out.read_text().startswith("# Imported by `specforge import` from resnet.onnx")
    assert "ok:" in ok(cli("validate", str(out))).stdout


def test_an_nhwc_graph_as_keras_exporters_write_it(tmp_path):
    """tf2onnx's layout: NHWC input transposed to NCHW around the convolutions, then back
    (so the flatten is already height, width, channel), MatMul + Add, softmax on axis -1."""
    onnxruntime = pytest.importorskip("onnxruntime")
    helper, rng = onnx.helper, np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.normal(size=(6, 2, 3, 3)).astype(np.float32),
                                          "conv_w")
    kernel = onnx.numpy_helper.from_array(rng.normal(size=(120, 5)).astype(np.float32), "fc_w")
    bias = onnx.numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "fc_b")
    shape = onnx.numpy_helper.from_array(np.array([-1, 120], np.int64), "flat_shape")
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "conv_w"], ["c"], name="model/conv2d/Conv2D",
                         pads=[1, 0, 1, 1], strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="model/conv2d/Relu"),
        helper.make_node("Transpose", ["r"], ["n"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["n", "flat_shape"], ["f"], name="model/flatten/Reshape"),
        helper.make_node("MatMul", ["f", "fc_w"], ["m"], name="model/dense/MatMul"),
        helper.make_node("Add", ["m", "fc_b"], ["a"], name="model/dense/BiasAdd"),
        helper.make_node("Softmax", ["a"], ["y"], name="model/dense/Softmax", axis=-1)]
    path = tmp_path / "keras_style.onnx"
    onnx.save(onnx_model(nodes, [weight, kernel, bias, shape], ["N", 9, 8, 2]), path)
    spec, _, weights = imported(path, tmp_path)
    batch = images((9, 8, 2))
    expected = onnxruntime.InferenceSession(str(path)).run(None, {"x": batch})[0]
    assert_matches(spec, weights, batch, expected)
    layers = yaml.safe_load(spec.read_text())["model"]["layers"]
    assert [item["type"] for item in layers] == ["conv2d", "flatten", "dense"]
    assert layers[0]["padding"] == "same" and layers[0]["activation"] == "relu"
    assert layers[2]["activation"] == "softmax" and "bias" not in layers[2]


# --- ONNX: what cannot be expressed, and hostile files -------------------------------------------

def onnx_model(nodes: list[Any], initializers: list[Any], shape: list[int],
               output: str = "y", opset: int = 17) -> Any:
    helper = onnx.helper
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def conv_weight(name: str = "w") -> Any:
    return onnx.numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), name)


def test_unsupported_onnx_ops_are_listed_with_name_type_and_attribute(tmp_path):
    helper = onnx.helper
    scale = onnx.numpy_helper.from_array(np.full((1, 1, 4, 4), 2.0, np.float32), "two")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "two"], ["m"], name="scale"),
             helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2],
                              storage_order=1),
             helper.make_node("Relu", ["m"], ["r"], name="after_scale"),
             helper.make_node("Add", ["r", "p"], ["y"], name="sum")]
    path = tmp_path / "bad.onnx"
    onnx.save(onnx_model(nodes, [conv_weight(), scale], [1, 1, 4, 4]), path)
    result = refused(cli("import", str(path), "-o", str(tmp_path / "bad.yaml")))
    assert [line.strip() for line in result.splitlines()[1:]] == [
        "'scale' (Mul): multiplying by a constant of shape [1, 1, 4, 4]: specforge's "
        "rescaling takes one number or one per channel (2)",
        "'pool' (MaxPool): storage_order=1"], result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_a_broadcasting_product_is_refused_with_both_shapes(tmp_path):
    helper = onnx.helper
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Mul", ["c", "f"], ["y"], name="scale")]
    path = tmp_path / "broadcast.onnx"
    onnx.save(onnx_model(nodes, [conv_weight()], [1, 1, 4, 4]), path)
    with pytest.raises(ImportRefused) as refusal:
        import_model(path)
    assert "'scale' (Mul): a product of ONNX shapes [1, 2, 4, 4] and [1, 2]: specforge " \
        "multiplies equal shapes, or an (N, C, H, W) image and an (N, C, 1, 1) gate" in \
        str(refusal.value)


def external(tensor: Any, location: str, length: int | None = None) -> Any:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    entries = {"location": location, **({"length": str(length)} if length else {})}
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "link.bin",
                                      "sub/../../secret.bin"])
def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(2, np.float32).tobytes())
    (folder / "link.bin").symlink_to(secret)
    weight = external(conv_weight(), location, 8)
    path = folder / "m.onnx"
    onnx.save(onnx_model([onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                         [weight], [1, 1, 4, 4]), path)
    with pytest.raises(ImportRefused) as caught:
        import_model(path)
    assert f"names external data {location!r}" in str(caught.value)
    assert "outside the model's folder" in str(caught.value) or "leads outside" in str(
        caught.value)


def test_onnx_external_data_inside_the_folder_is_read(tmp_path):
    (tmp_path / "w.bin").write_bytes(np.full(2, 3.0, np.float32).tobytes())
    weight = external(conv_weight(), "w.bin", 8)
    path = tmp_path / "m.onnx"
    onnx.save(onnx_model([onnx.helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                          onnx.helper.make_node("GlobalAveragePool", ["c"], ["g"]),
                          onnx.helper.make_node("Flatten", ["g"], ["y"])],
                         [weight], [1, 1, 4, 4]), path)
    model = import_model(path)
    assert model.weights["conv.kernel"].tolist() == [[[[3.0, 3.0]]]]


def test_a_huge_declared_tensor_is_refused_without_allocating_it(tmp_path):
    huge = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT,
                            dims=[1_000_000, 1_000_000, 1, 1])  # and no data
    path = tmp_path / "huge.onnx"
    onnx.save(onnx_model([onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                         [huge], [1, 1, 4, 4]), path)
    assert path.stat().st_size < 1000
    # a limit on the address space makes any attempt to allocate the 4 TB fail loudly
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30));"
              " from specforge.cli import main; sys.argv = ['specforge', 'import', "
              f"{str(path)!r}, '-o', {str(tmp_path / 'huge.yaml')!r}]; main()")
    import subprocess

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**ENV, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "tensor 'w' declares dims [1000000, 1000000, 1, 1] (4,000,000,000,000 bytes) but " \
           "holds 0 bytes of data" in result.stderr
    assert not (tmp_path / "huge.yaml").exists()
    short = external(conv_weight(), "w.bin", 8)
    (tmp_path / "w.bin").write_bytes(b"\0" * 4)
    onnx.save(onnx_model([onnx.helper.make_node("Conv", ["x", "w"], ["y"])], [short],
                         [1, 1, 4, 4]), path)
    with pytest.raises(ImportRefused, match=r"external data 'w\.bin' holds 4"):
        import_model(path)


def test_unknown_formats_missing_files_and_bad_output_names_are_usage_errors(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(UsageError, match=r"unknown model format '\.pt'"):
        import_model(tmp_path / "model.pt")
    with pytest.raises(UsageError, match="no such file"):
        import_model(tmp_path / "missing.onnx")
    torch.manual_seed(0)
    path = export_torch(_SeedCNN(), (32, 32, 3), tmp_path / "cnn.onnx")
    with pytest.raises(UsageError, match=r"name a \.yaml file"):
        write_import(import_model(path), tmp_path / "cnn.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "model.pt"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "onnx", None)  # as if not installed
        with pytest.raises(UsageError, match=r"needs the onnx package: pip install "
                                             r"'specforge\[onnx\]'"):
            import_model(path)


# --- keras.applications (slow: each builds, saves and loads a large model) ----------------------

#: Parameters of each application with its classifier, as Keras counts them (and the issue).
APPLICATION_PARAMS = {"VGG16": 138_357_544, "ResNet50": 25_636_712, "MobileNetV2": 3_538_984}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["VGG16", "ResNet50", "MobileNetV2"])
def test_keras_applications_import_with_their_outputs_and_parameter_counts(tmp_path, name):
    """32x32 inputs: VGG16's classifier then reads a 512-vector instead of 25,088, so its
    count is compared with Keras's for that configuration (224x224 is the next test)."""
    source = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3))
    randomize_keras(source)
    source.save(tmp_path / f"{name}.keras")
    spec, graph, weights = imported(tmp_path / f"{name}.keras", tmp_path)
    count = graph.trainable_params + graph.non_trainable_params
    assert count == source.count_params()
    if name != "VGG16":
        assert count == APPLICATION_PARAMS[name]
    batch = images((32, 32, 3), count=2)
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))


@pytest.mark.parametrize(("name", "size"), [
    ("DenseNet121", 32), ("InceptionV3", 75), ("Xception", 71), ("ResNet50V2", 32),
    # about 30 s: 4.3 million parameters in 770 layers
    pytest.param("NASNetMobile", 32, marks=pytest.mark.slow),
    # drop-connect (per-sample dropout) and fused MBConv blocks
    pytest.param("EfficientNetV2B0", 32, marks=pytest.mark.slow),
    pytest.param("MobileNetV3Large", 32, marks=pytest.mark.slow)])
def test_more_keras_applications_import_with_their_outputs(tmp_path, name, size):
    """Concatenations (DenseNet, Inception), separable convolutions (Xception, NASNet), batch
    norm without scale (Inception), pre-activation blocks (ResNetV2) and NASNet's padded and
    cropped strided average pools, at their smallest input."""
    source = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                               classes=10)
    randomize_keras(source)
    source.save(tmp_path / f"{name}.keras")
    spec, graph, weights = imported(tmp_path / f"{name}.keras", tmp_path)
    assert graph.trainable_params + graph.non_trainable_params == source.count_params()
    batch = images((size, size, 3), 2)
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))


@pytest.mark.slow
def test_keras_convnext_imports_with_its_outputs(tmp_path):
    """ConvNeXtTiny (27,827,818 parameters at 10 classes): patchify stem, LayerNormalization
    over channels, Dense layers on images, LayerScale, GELU, residual sums."""
    source = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3),
                                             classes=10, include_preprocessing=False)
    randomize_keras(source)
    source.save(tmp_path / "convnext.keras")
    spec, graph, weights = imported(tmp_path / "convnext.keras", tmp_path)
    assert graph.trainable_params + graph.non_trainable_params == source.count_params() == \
        27_827_818
    batch = images((32, 32, 3), 2)
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))


@pytest.mark.slow
def test_vgg16_at_224_imports_with_its_138_million_parameters(tmp_path):
    source = keras.applications.VGG16(weights=None)
    source.save(tmp_path / "vgg16.keras")
    del source
    spec, npz = write_import(import_model(tmp_path / "vgg16.keras"), tmp_path / "vgg16.yaml")
    graph = compile_spec(spec).graph
    assert graph.trainable_params + graph.non_trainable_params == APPLICATION_PARAMS["VGG16"]
    assert sum(a.size for a in load_weights(npz).values()) == APPLICATION_PARAMS["VGG16"]


def test_onnx_imports_and_lambda_refusals_import_no_framework(tmp_path):
    """An ONNX model needs no framework to import; a Keras file with a Lambda layer is
    refused before Keras (which could run its code) is imported at all."""
    import subprocess

    from tests.test_cli import _PROBE

    torch.manual_seed(0)
    onnx_path = export_torch(_SeedCNN(), (32, 32, 3), tmp_path / "cnn.onnx")
    inputs = keras.Input((4, 4, 1))
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(
        keras.layers.Lambda(lambda t: t + 1, name="plus_one")(inputs)))
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    for source, code in ((onnx_path, 0), (tmp_path / "lambda.keras", 2)):
        result = subprocess.run([sys.executable, "-c", _PROBE, "import", str(source), "-o",
                                 str(tmp_path / f"{source.stem}.yaml")], capture_output=True,
                                text=True, cwd=ROOT, env=ENV)
        assert f"ATTEMPTS [] CODE {code}" in result.stderr, result.stderr[-2000:]
    assert "'plus_one' (Lambda)" in result.stderr
    assert (tmp_path / "cnn.yaml").exists() and not (tmp_path / "lambda.yaml").exists()


NOISE_REFUSAL = ("specforge's dropout drops single values, (spatial) whole channels or "
                 "(per_sample) whole samples, not rows, nor one mask for the whole batch")


@pytest.mark.parametrize(("on_vector", "noise_shape", "expected"), [
    (False, (None, 1, 1, 4), {"spatial": True}), (False, (None, 6, 6, 4), {}),
    (False, (None, 1, 1, 1), {"per_sample": True}),
    (False, (None, 1, 1, None), {"spatial": True}), (True, (None, 1), {"per_sample": True}),
    (True, (None, 144), {}),
    (False, (None, 6, 1, 4), f"noise_shape [None, 6, 1, 4]: {NOISE_REFUSAL}"),
    (False, (1, 1, 1, 1), f"noise_shape [1, 1, 1, 1]: {NOISE_REFUSAL}")])
def test_keras_dropout_noise_shapes(tmp_path, on_vector, noise_shape, expected):
    """Channels dropped per image (SpatialDropout2D's masks) is spatial dropout; whole
    samples (1 on every axis but the batch: EfficientNet's drop-connect) per-sample dropout,
    on images and vectors; rows, or one mask for the batch, are refused with the shape."""
    inputs = keras.Input((6, 6, 4))
    x = keras.layers.Flatten()(inputs) if on_vector else inputs
    dropped = keras.layers.Dropout(0.2, noise_shape=noise_shape, name="drop")(x)
    flat = dropped if on_vector else keras.layers.Flatten()(dropped)
    source = keras.Model(inputs, keras.layers.Dense(2)(flat))
    source.save(tmp_path / "drop.keras")
    if isinstance(expected, str):
        with pytest.raises(ImportRefused) as refusal:
            import_model(tmp_path / "drop.keras")
        assert f"'drop' (Dropout): {expected}" in str(refusal.value)
        return
    layers = {item["name"]: item for item in import_model(tmp_path / "drop.keras").layers}
    assert {k: v for k, v in layers["drop"].items() if k in ("spatial", "per_sample")} == \
        expected


def drop_connect_model() -> Any:
    """EfficientNet's residual block in small: a branch whose whole samples are dropped
    (Dropout with noise_shape (None, 1, 1, 1)) before the Add, then a vector's samples."""
    inputs = keras.Input((6, 6, 3))
    stem = keras.layers.Conv2D(4, 3, padding="same", activation="swish", name="stem")(inputs)
    branch = keras.layers.Conv2D(4, 3, padding="same", name="branch")(stem)
    dropped = keras.layers.Dropout(0.3, noise_shape=(None, 1, 1, 1), name="drop_connect")(
        branch)
    summed = keras.layers.Add(name="sum")([stem, dropped])
    pooled = keras.layers.GlobalAveragePooling2D()(summed)
    features = keras.layers.Dropout(0.2, noise_shape=(None, 1), name="drop_features")(pooled)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(features))


def test_keras_drop_connect_imports_as_per_sample_dropout(tmp_path):
    source = drop_connect_model()
    randomize_keras(source)
    source.save(tmp_path / "drop_connect.keras")
    spec, graph, weights = imported(tmp_path / "drop_connect.keras", tmp_path)
    nodes = {node.name: node for node in graph}
    for name in ("drop_connect", "drop_features"):
        assert nodes[name].attrs["per_sample"] and not nodes[name].attrs["spatial"], name
    batch = images((6, 6, 3))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))


def test_keras_mobilenet_v3_with_its_arithmetic_imports(tmp_path):
    """MobileNetV3 writes hard sigmoid as keras.ops arithmetic, relu6(x + 3.0) * (1 / 6),
    carries its preprocessing (Rescaling) and gates with squeeze-excite blocks."""
    source = keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3),
                                                 classes=10)
    randomize_keras(source)
    source.save(tmp_path / "v3.keras")
    spec, graph, weights = imported(tmp_path / "v3.keras", tmp_path)
    assert graph.trainable_params + graph.non_trainable_params == source.count_params()
    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))


def keras_arithmetic_model() -> Any:
    inputs = keras.Input((5, 4, 3))
    x = keras.layers.Conv2D(3, 1, name="conv")(inputs)
    scaled = (3.0 + x * 2.0 - 1.0) / 4.0
    y = keras.layers.Conv2D(3, 1, name="other")(inputs)
    both = keras.ops.multiply(keras.ops.add(scaled, y), y)
    return keras.Model(inputs, keras.layers.Flatten()(both))


def test_keras_ops_arithmetic_imports_as_rescaling_add_and_multiply(tmp_path):
    source = keras_arithmetic_model()
    randomize_keras(source)
    source.save(tmp_path / "ops.keras")
    spec, _, weights = imported(tmp_path / "ops.keras", tmp_path)
    batch = images((5, 4, 3))
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))
    kinds = [item["type"] for item in yaml.safe_load(spec.read_text())["model"]["layers"]]
    assert kinds.count("rescaling") == 4 and "add" in kinds and "multiply" in kinds


def test_keras_ops_a_rescaling_cannot_say_are_refused(tmp_path):
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(2, 1, name="conv")(inputs)
    source = keras.Model(inputs, keras.layers.Flatten()(keras.ops.exp(1.0 - x)))
    source.save(tmp_path / "bad_ops.keras")
    with pytest.raises(ImportRefused) as refusal:
        import_model(tmp_path / "bad_ops.keras")
    text = str(refusal.value)
    assert "(Subtract): Subtract of a number by a tensor" in text
    assert "(Exp): Keras op Exp in a functional model is not a specforge layer" in text


def test_keras_efficientnet_imports_with_its_outputs(tmp_path):
    """EfficientNetB0: its preprocessing (Rescaling, Normalization), squeeze-excite blocks on
    keepdims pixels, swish, and the nine drop-connect Dropouts of its residual blocks (whole
    samples: noise_shape (None, 1, 1, 1)) as per-sample dropout."""
    source = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3),
                                               classes=10)
    randomize_keras(source)
    # ImageNet's pixel statistics (on [0, 1]) for its Normalization: random ones could be
    # negative variances
    normalization = source.get_layer("normalization")
    normalization.set_weights([np.array([0.485, 0.456, 0.406], np.float32),
                               np.array([0.229, 0.224, 0.225], np.float32) ** 2,
                               np.array(1000, np.int64)])
    normalization.finalize_state()
    source.save(tmp_path / "efficientnet.keras")
    spec, graph, weights = imported(tmp_path / "efficientnet.keras", tmp_path)
    # the Normalization's mean, variance and count become a rescaling's constants
    assert graph.trainable_params + graph.non_trainable_params == \
        source.count_params() - normalization.count_params()
    dropouts = [node for node in graph if node.op == "dropout"]
    assert sum(node.attrs["per_sample"] for node in dropouts) == 9  # each after a stage's first
    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    assert_matches(spec, weights, batch, np.asarray(source(batch, training=False)))


#: One tested model of each keras.applications family (its test): the README says every
#: family imports with Keras's outputs.
TESTED_FAMILIES = {
    "ConvNeXt": "ConvNeXtTiny", "DenseNet": "DenseNet121", "EfficientNet": "EfficientNetB0",
    "EfficientNetV2": "EfficientNetV2B0", "InceptionResNetV2": "InceptionResNetV2",
    "InceptionV3": "InceptionV3", "MobileNet": "MobileNet", "MobileNetV2": "MobileNetV2",
    "MobileNetV3": "MobileNetV3Small", "NASNet": "NASNetMobile", "ResNet": "ResNet50",
    "ResNetV2": "ResNet50V2", "VGG": "VGG16", "Xception": "Xception"}


def _family(name: str) -> str:
    """keras.applications' family of a model name: ResNet101V2 -> ResNetV2, VGG19 -> VGG."""
    for pattern, family in ((r"ResNet\d+V2", "ResNetV2"), (r"ResNet\d+", "ResNet"),
                            (r"EfficientNetV2\w+", "EfficientNetV2"),
                            (r"EfficientNetB\d", "EfficientNet"), (r"DenseNet\d+", "DenseNet"),
                            (r"VGG\d+", "VGG"), (r"NASNet\w+", "NASNet"),
                            (r"ConvNeXt\w+", "ConvNeXt"), (r"MobileNetV3\w+", "MobileNetV3")):
        if re.fullmatch(pattern, name):
            return family
    return name


def test_every_keras_applications_family_has_an_import_test():
    """A family that a new Keras adds (or a test that goes) fails here, and so the README's
    claim that every family imports."""
    names = [n for n in dir(keras.applications) if n[0].isupper()]
    assert {_family(n) for n in names} == set(TESTED_FAMILIES), sorted(
        {_family(n) for n in names} ^ set(TESTED_FAMILIES))
    text = Path(__file__).read_text(encoding="utf-8")
    table = text.index("TESTED_FAMILIES = {")
    tests = text[:table] + text[text.index("}", table):]  # every test, without this table
    for family, model in TESTED_FAMILIES.items():
        assert f'"{model}"' in tests or f"keras.applications.{model}(" in tests, (family, model)
    assert "every family of `keras.applications` in Keras 3.15 imports" in \
        " ".join(readme_section().split())
