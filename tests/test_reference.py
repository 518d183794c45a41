"""The numpy reference (float64, from the formulas) against both backends' forward passes."""

from __future__ import annotations

import numpy as np
import pytest

from specforge.compiler import compile_spec
from specforge.reference import reference_forward
from specforge.weights import initial_weights
from tests.conftest import EVERY_OP_LAYERS, SPECS

torch = pytest.importorskip("torch")

# Specs whose layers together exercise every forward op and option of the IR.
CASES = {
    "cifar": ("cifar.yaml", []),
    "resnet18_small": ("resnet18.yaml", ["model.input=[32, 32, 3]"]),
    "padding_and_pooling": ("digits.yaml", [
        "model.input=[9, 10, 2]", "data=null",
        "model.layers=" + EVERY_OP_LAYERS + " {type: global_max_pool2d},"
        " {type: dense, units: 10, activation: softmax}]"]),
}


def _case(name: str):
    spec, overrides = CASES[name]
    program = compile_spec(SPECS / spec, overrides)
    x = np.random.default_rng(7).normal(size=(3, *program.graph.input.shape))
    return program, x.astype(np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_forward_matches_the_reference(name):
    from specforge_torch.model import create_model

    program, x = _case(name)
    expected = reference_forward(program.graph, initial_weights(program.graph, program.seed),
                                 x)[program.graph.output]
    model = create_model(program.graph, program.seed).eval()
    with torch.no_grad():
        actual = model(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy()
    # float32 against float64: a handful of layers accumulate about 1e-6 relative error
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_keras_forward_matches_the_reference(name):
    pytest.importorskip("keras")
    from specforge_keras.model import create_model

    program, x = _case(name)
    expected = reference_forward(program.graph, initial_weights(program.graph, program.seed),
                                 x)[program.graph.output]
    model = create_model(program.graph, program.seed)
    actual = np.asarray(model(x, training=False), np.float64)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_reference_batch_norm_uses_batch_statistics_in_training():
    program, x = _case("padding_and_pooling")
    weights = initial_weights(program.graph, program.seed)
    values = reference_forward(program.graph, weights, x, training=True)
    out, inp = values["bn"], values[program.graph["bn"].inputs[0]]
    axes = (0, 1, 2)
    var = inp.var(axis=axes)
    np.testing.assert_allclose(out.mean(axis=axes), 0, atol=1e-9)
    # gamma 1, beta 0: the output's variance is var / (var + epsilon)
    np.testing.assert_allclose(out.var(axis=axes), var / (var + 1e-5), rtol=1e-9)


@pytest.mark.parametrize(("groups", "channels"), [(2, 6), (3, 6), (4, 8), (2, 116)])
def test_channel_shuffle_is_torchs_view_transpose_view(groups: int, channels: int) -> None:
    """The IR's channel order is what ShuffleNetV2's code computes, written as torchvision
    writes it (not nn.ChannelShuffle, which the backend uses)."""
    from specforge.ir.graph import Node
    from specforge.reference.forward import OPS

    x = np.random.default_rng(3).normal(size=(2, channels, 3, 4)).astype(np.float32)
    t = torch.from_numpy(x)
    n, c, h, w = t.shape
    expected = t.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(
        n, c, h, w).permute(0, 2, 3, 1).numpy()
    node = Node("shuffle", "channel_shuffle", ("input",), {"groups": groups}, (3, 4, c))
    actual = OPS["channel_shuffle"](node, [x.transpose(0, 2, 3, 1)], {}, False)
    assert np.array_equal(actual, expected)


def test_channel_slices_are_torchs_chunk() -> None:
    from specforge.ir.graph import Node
    from specforge.reference.forward import OPS

    x = np.random.default_rng(4).normal(size=(2, 10, 3, 4)).astype(np.float32)
    nhwc = x.transpose(0, 2, 3, 1)
    for piece, (start, stop) in zip(torch.from_numpy(x).chunk(2, dim=1), [(0, 5), (5, 10)],
                                    strict=True):
        node = Node("half", "channel_slice", ("input",), {"start": start, "stop": stop},
                    (3, 4, 5))
        assert np.array_equal(OPS["channel_slice"](node, [nhwc], {}, False),
                              piece.permute(0, 2, 3, 1).numpy())
