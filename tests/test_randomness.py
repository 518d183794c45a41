"""specforge's dropout generator (specforge.ir.randomness): known values, bit identity of
numpy, torch and keras.ops (TensorFlow, JAX, torch) eager and compiled, shards that add up
to the batch, and the statistics of the masks, with weak generators the tests must reject."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from specforge.compiler import compile_spec
from specforge.conformance.masks import dropout_masks
from specforge.ir import randomness as R
from tests.conftest import ROOT, SPECS

#: (IR shape, rate, seed, step, first_sample, options): odd sizes, one image, vectors,
#: spatial and per-sample dropout (on images and vectors, one sample past 2^32), a seed
#: above 2^32, rate 0, and counters that pass 2^32 (5e6 * 1000)
CASES: list[tuple[tuple[int, ...], float, int, int, int, dict[str, bool]]] = [
    ((3, 5, 7, 3), 0.3, 42, 0, 0, {}),
    ((3, 5, 7, 3), 0.5, 2**32 + 5, 7, 11, {}),
    ((1, 8, 8, 4), 0.1, 0, 1, 0, {}),
    ((5, 37), 0.25, 123, 2, 3, {}),
    ((4, 6, 6, 5), 0.4, 42, 3, 9, {"spatial": True}),
    ((9, 6, 6, 5), 0.4, 42, 3, 9, {"per_sample": True}),
    ((7, 37), 0.5, 2**32 + 5, 1, 2**32 - 3, {"per_sample": True}),
    ((2, 3, 3, 2), 0.0, 7, 0, 0, {}),
    ((2, 1000), 0.5, 2**63 + 1, 2**32 + 3, 5_000_000, {}),
]
NODE = "dropout_1"


def reference_masks() -> list[np.ndarray]:
    return [R.dropout_mask(shape, rate, R.node_key(seed, step, NODE), first, **options)
            for shape, rate, seed, step, first, options in CASES]


# --- known values ---------------------------------------------------------------------------

def naive_mix32(x: int) -> int:
    """lowbias32 written independently: division for shifts, remainders for wrap-around."""
    m = 2**32
    x %= m
    x ^= x // 2**16
    x = x * 2146121005 % m
    x ^= x // 2**15
    x = x * 2221713035 % m
    return x ^ x // 2**16


def test_known_values():
    golden = {0: 0, 1: 0x688990C0, 2: 0xD1132181, 0xDEADBEEF: 0xE628C683,
              0xFFFFFFFF: 0x6768824A}
    for x, y in golden.items():
        assert R.mix32(x) == naive_mix32(x) == y
    assert R.node_key(42, 0, "dropout") == 0xA17DBABD
    assert R.node_key(42, 1, "dropout") == 0xE4E63EDA
    assert R.node_key(2**32 + 5, 7, "drop_1") == 0xFFB2377C
    assert R.uniform24((1, 6), 0xA17DBABD).tolist() == [
        [12502847, 15656761, 11478434, 4181720, 12126847, 9705527]]


def test_key_and_bits_follow_the_definition():
    for seed, step, name in [(0, 0, ""), (2**40 + 3, 2**33 + 1, "dropout_é"), (5, 9, "d")]:
        lo, hi = seed % 2**32, seed // 2**32 % 2**32
        inner = naive_mix32(naive_mix32(lo) ^ hi) ^ step % 2**32
        expected = naive_mix32(naive_mix32(inner) ^ zlib.crc32(name.encode("utf-8")))
        assert R.node_key(seed, step, name) == expected
    key = R.node_key(3, 4, "x")
    r = R.uniform24((2, 3, 2, 5), key, first_sample=7)
    for n, h, w, c in np.ndindex(r.shape):
        i = (((7 + n) * 3 + h) * 2 + w) * 5 + c
        assert r[n, h, w, c] == naive_mix32(naive_mix32(i ^ key) + 0x9E3779B9) >> 8
    spatial = R.uniform24((2, 3, 2, 5), key, first_sample=7, spatial=True)
    assert spatial.shape == (2, 1, 1, 5)
    assert spatial[1, 0, 0, 4] == naive_mix32(naive_mix32((8 * 5 + 4) ^ key) + 0x9E3779B9) >> 8
    for shape in ((2, 3, 2, 5), (2, 11)):  # per sample: i = n, on images and vectors
        per_sample = R.uniform24(shape, key, first_sample=7, per_sample=True)
        assert per_sample.shape == (2, *[1] * (len(shape) - 1))
        assert per_sample.ravel().tolist() == [
            naive_mix32(naive_mix32(n ^ key) + 0x9E3779B9) >> 8 for n in (7, 8)]


#: rates whose thresholds every implementation must agree on (Keras's: in KERAS_SCRIPT)
RATES = [0.0, 5e-324, 2**-30, 0.1, 1 / 3, 0.5, 0.7, 1 - 2**-53,
         *np.random.default_rng(0).random(200).tolist()]


def test_threshold_is_exact_and_ranges_are_checked():
    from specforge_torch.randomness import keep_threshold as torch_threshold

    assert R.keep_threshold(0.0) == 0
    assert R.keep_threshold(0.5) == 2**23
    assert R.keep_threshold(0.1) == 1677722  # 0.1 is a little above 1/10
    assert R.keep_threshold(1 - 2**-24) == 2**24 - 1
    assert R.keep_threshold(5e-324) == 1
    for rate in RATES:
        assert torch_threshold(rate) == R.keep_threshold(rate)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            R.keep_threshold(bad)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError):
            R.node_key(seed, 0, NODE)


def test_masks_are_zero_or_the_scale_in_float32():
    mask = R.dropout_mask((4, 5, 5, 3), 0.3, 1234)
    assert mask.dtype == np.float32 and mask.shape == (4, 5, 5, 3)
    assert set(np.unique(mask).tolist()) == {0.0, float(np.float32(1 / 0.7))}
    assert (R.dropout_mask((4, 7), 0.0, 99) == 1).all()


def test_two_halves_make_the_batch():
    for shape, options in [((6, 5, 7, 3), {}), ((6, 4, 4, 5), {"spatial": True}),
                            ((6, 11), {}), ((6, 4, 4, 5), {"per_sample": True}),
                            ((6, 11), {"per_sample": True})]:
        whole = R.dropout_mask(shape, 0.4, 77, first_sample=10, **options)
        halves = [R.dropout_mask((3, *shape[1:]), 0.4, 77, first_sample=first, **options)
                  for first in (10, 13)]
        np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_mask_shapes_and_the_one_unit_rule():
    assert R.mask_shape((4, 5, 6, 3)) == (4, 5, 6, 3)
    assert R.mask_shape((4, 5, 6, 3), spatial=True) == (4, 1, 1, 3)
    assert R.mask_shape((4, 5, 6, 3), per_sample=True) == (4, 1, 1, 1)
    assert R.mask_shape((4, 9), per_sample=True) == (4, 1)
    with pytest.raises(ValueError, match="spatial dropout needs"):
        R.mask_shape((4, 9), spatial=True)
    with pytest.raises(ValueError, match="spatial or per_sample, not both"):
        R.mask_shape((4, 5, 6, 3), spatial=True, per_sample=True)
    # one draw per sample: half the samples kept whole at rate 0.5, the rest zeroed whole
    mask = R.dropout_mask((2000, 3, 3, 2), 0.5, 5, per_sample=True)
    assert mask.shape == (2000, 1, 1, 1) and abs((mask > 0).mean() - 0.5) < 0.05


def test_conformance_masks_are_the_reference():
    program = compile_spec(SPECS / "digits.yaml", [
        "model.input=[4, 4, 2]", "data=null",
        "model.layers=[{type: conv2d, filters: 4, kernel: 2},"
        " {type: dropout, rate: 0.4, spatial: true, name: sp},"
        " {type: conv2d, filters: 3, kernel: 2}, {type: dropout, rate: 0.25, name: el},"
        " {type: dropout, rate: 0, name: idle}, {type: flatten}, {type: dense, units: 3}]"])
    masks = dropout_masks(program.graph, 42, 5, 6)
    assert set(masks) == {"sp", "el"}
    nodes = {node.name: node for node in program.graph}
    np.testing.assert_array_equal(
        masks["sp"], R.dropout_mask((6, *nodes["sp"].shape), 0.4, R.node_key(42, 5, "sp"),
                                    spatial=True))
    np.testing.assert_array_equal(
        masks["el"], R.dropout_mask((6, *nodes["el"].shape), 0.25, R.node_key(42, 5, "el")))
    assert masks["sp"].shape == (6, 1, 1, 4) and masks["el"].shape == (6, 2, 2, 3)


# --- torch ----------------------------------------------------------------------------------

def to_ir(mask: Any) -> np.ndarray:
    """A torch mask in the IR's layout: NCHW back to NHWC."""
    array = mask.cpu().numpy()
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def test_torch_masks_are_the_reference():
    pytest.importorskip("torch")
    from specforge_torch.randomness import dropout_mask, key_tensor

    for (shape, rate, seed, step, first, options), ref in zip(CASES, reference_masks(),
                                                             strict=True):
        mask = dropout_mask(shape, rate, key_tensor(R.node_key(seed, step, NODE)), first,
                            **options)
        if len(shape) == 4:  # torch's layout: (N, C, H, W), (N, C, 1, 1) or (N, 1, 1, 1)
            assert mask.shape == (ref.shape[0], ref.shape[3], *ref.shape[1:3])
        np.testing.assert_array_equal(to_ir(mask).view(np.uint32), ref.view(np.uint32))


def test_torch_first_sample_may_be_a_tensor_and_halves_make_the_batch():
    torch = pytest.importorskip("torch")
    from specforge_torch.randomness import dropout_mask, key_tensor

    key = key_tensor(R.node_key(1, 2, NODE))
    for options in ({}, {"per_sample": True}):
        whole = dropout_mask((6, 5, 7, 3), 0.4, key, 10, **options)
        halves = [dropout_mask((3, 5, 7, 3), 0.4, key, torch.tensor(first), **options)
                  for first in (10, 13)]
        assert torch.equal(torch.cat(halves), whole)


def test_torch_compiled_step_equals_eager_without_recompiling():
    torch = pytest.importorskip("torch")
    dynamo = pytest.importorskip("torch._dynamo")
    from specforge_torch.randomness import dropout_mask, key_tensor

    def masks(key: torch.Tensor, first: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (dropout_mask((3, 5, 7, 3), 0.3, key, first),
                dropout_mask((3, 5, 7, 3), 0.3, key, first, spatial=True),
                dropout_mask((3, 5, 7, 3), 0.3, key, first, per_sample=True))

    dynamo.reset()
    compiled = torch.compile(masks, fullgraph=True)  # fullgraph: no graph break, no .item()
    first = torch.tensor(4)
    keys = [key_tensor(R.node_key(42, step, NODE)) for step in range(3)]
    compiled(keys[0], first)
    with dynamo.config.patch(error_on_recompile=True):  # the key is data, not code
        for key in keys:
            for got, want in zip(compiled(key, first), masks(key, first), strict=True):
                assert torch.equal(got, want)


# --- keras.ops on TensorFlow, JAX and torch -------------------------------------------------

#: Run with KERAS_BACKEND set (Keras picks its backend at import): checks the thresholds of
#: RATES, writes every case's eager mask, and checks that a compiled step (tf.function, with
#: and without XLA; jax.jit; torch.compile) equals eager for several keys without tracing
#: again.
KERAS_SCRIPT = r"""
import contextlib, json, sys
import numpy as np
import keras
from keras import ops
from specforge.ir.randomness import keep_threshold as reference_threshold, node_key
from specforge_keras.randomness import dropout_mask, keep_threshold, key_tensor

cases, rates, node, out = (json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3],
                           sys.argv[4])
assert all(keep_threshold(rate) == reference_threshold(rate) for rate in rates)
masks = {}
for n, (shape, rate, seed, step, first, options) in enumerate(cases):
    key = key_tensor(node_key(seed, step, node))
    masks[str(n)] = ops.convert_to_numpy(dropout_mask(shape, rate, key, first, **options))

def step_masks(key, first):
    return (dropout_mask((3, 5, 7, 3), 0.3, key, first),
            dropout_mask((4, 6, 6, 5), 0.4, key, first, spatial=True),
            dropout_mask((4, 6, 6, 5), 0.4, key, first, per_sample=True))

traces = []
def counted(key, first):  # tf.function and jax.jit run its Python once a trace
    traces.append(1)
    return step_masks(key, first)

backend = keras.backend.backend()
if backend == "tensorflow":
    import tensorflow as tf
    compiled = {"tf.function": tf.function(counted),
                "tf.function(jit_compile)": tf.function(counted, jit_compile=True)}
elif backend == "jax":
    import jax
    compiled = {"jax.jit": jax.jit(counted)}
else:
    import torch, torch._dynamo
    # aot_eager: traced whole, but no C++ build (the torch test checks inductor's code)
    compiled = {"torch.compile": torch.compile(step_masks, fullgraph=True,
                                               backend="aot_eager")}
first = ops.convert_to_tensor(4, dtype="int32")
for name, fn in compiled.items():
    traces.clear()
    for step in range(3):
        key = key_tensor(node_key(42, step, node))
        with torch._dynamo.config.patch(error_on_recompile=step > 0) if backend == "torch" \
                else contextlib.nullcontext():
            got = [ops.convert_to_numpy(m) for m in fn(key, first)]
        want = [ops.convert_to_numpy(m) for m in step_masks(key, first)]
        assert all(np.array_equal(g, w) for g, w in zip(got, want)), (name, step)
    # traced once for three keys (under torch, error_on_recompile checks it)
    assert backend == "torch" or len(traces) == 1, (name, len(traces))
    print("compiled:", name)
np.savez(out, **masks)
"""

KERAS_BACKENDS = ["tensorflow", "jax", "torch"]


@pytest.fixture(scope="module")
def keras_runs(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[dict[str, tuple[subprocess.Popen[str], Path]]]:
    """One subprocess per Keras backend, all started at once (each spends seconds importing)."""
    folder = tmp_path_factory.mktemp("keras_masks")
    runs = {}
    for backend in KERAS_BACKENDS:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        out = folder / f"{backend}.npz"
        process = subprocess.Popen(
            [sys.executable, "-c", KERAS_SCRIPT, json.dumps(CASES), json.dumps(RATES), NODE,
             str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs[backend] = (process, out)
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("backend", KERAS_BACKENDS)
def test_keras_masks_are_the_reference_eager_and_compiled(backend: str, keras_runs):
    process, out = keras_runs[backend]
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "compiled:" in output
    got = np.load(out)
    for n, ref in enumerate(reference_masks()):
        mask = got[str(n)]
        assert mask.dtype == np.float32 and mask.shape == ref.shape
        np.testing.assert_array_equal(mask.view(np.uint32), ref.view(np.uint32))


# --- statistics over 10^6 draws -------------------------------------------------------------

DRAWS = 10**6
UniformFn = Callable[[tuple[int, ...], int], np.ndarray]  # (shape, key) -> r in [0, 2^24)


def chi2_critical(dof: int, z: float = 3.719) -> float:
    """The chi-square quantile of ``dof`` degrees of freedom at the normal quantile ``z``
    (3.719: p = 1e-4), by Wilson and Hilferty's cube approximation."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


def independence(a: np.ndarray, b: np.ndarray, bins: int) -> float:
    """Pearson's chi-square of the contingency table of paired bin indices, divided by its
    critical value at p = 1e-4: above 1 rejects independence."""
    table = np.bincount(a.ravel() * bins + b.ravel(), minlength=bins * bins)
    table = table.reshape(bins, bins).astype(np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    return stat / chi2_critical((bins - 1) ** 2)


def binnings(r: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    """What pairs are compared by: keep at rate 0.5 and 0.1, and r's top 4 bits."""
    yield (r >= R.keep_threshold(0.5)).astype(np.int64), 2
    yield (r >= R.keep_threshold(0.1)).astype(np.int64), 2
    yield (r >> 20).astype(np.int64), 16


def worst(a: np.ndarray, b: np.ndarray) -> float:
    return max(independence(x, y, k) for (x, k), (y, _) in zip(binnings(a), binnings(b),
                                                                 strict=True))


def weak_multiplicative(shape: tuple[int, ...], key: int) -> np.ndarray:
    """Knuth's multiplicative hash without mixing: bits(i) = (i ^ key) * 2654435761."""
    i = np.arange(math.prod(shape), dtype=np.uint32).reshape(shape)
    return ((i ^ np.uint32(key)) * np.uint32(2654435761)) >> np.uint32(8)


def weak_per_pixel(shape: tuple[int, ...], key: int) -> np.ndarray:
    """The right hash of a counter that ignores the channel: one draw per pixel."""
    i = (np.arange(math.prod(shape), dtype=np.uint32) // np.uint32(shape[-1])).reshape(shape)
    return R.mix32_array(R.mix32_array(i ^ np.uint32(key)) + np.uint32(R.GOLDEN)) >> 8


def specforge_r(shape: tuple[int, ...], key: int) -> np.ndarray:
    return R.uniform24(shape, key)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.9])
def test_kept_fraction_is_one_minus_rate(rate: float):
    mask = R.dropout_mask((DRAWS,), rate, R.node_key(42, 3, NODE))
    kept = (mask > 0).mean()
    sigma = math.sqrt(rate * (1 - rate) / DRAWS)
    assert abs(kept - (1 - rate)) < 4 * sigma, (kept, sigma)


def test_r_is_uniform():
    r = R.uniform24((DRAWS,), R.node_key(7, 0, NODE))
    counts = np.bincount(r >> 16, minlength=256)
    expected = DRAWS / 256
    assert ((counts - expected) ** 2 / expected).sum() < chi2_critical(255)


@pytest.mark.parametrize("uniform, independent", [(specforge_r, True),
                                                  (weak_multiplicative, False)],
                         ids=["specforge", "multiplicative"])
def test_neighbouring_elements_are_independent(uniform: UniformFn, independent: bool):
    r = uniform((DRAWS,), R.node_key(42, 0, NODE))
    odd_pairs = worst(r[1:-1:2], r[2::2])  # (1, 2), (3, 4), ...
    assert (max(worst(r[0::2], r[1::2]), odd_pairs) < 1) == independent


@pytest.mark.parametrize("uniform, independent", [(specforge_r, True),
                                                  (weak_multiplicative, False),
                                                  (weak_per_pixel, False)],
                         ids=["specforge", "multiplicative", "per-pixel"])
def test_neighbouring_channels_are_independent(uniform: UniformFn, independent: bool):
    r = uniform((1000, 10, 10, 10), R.node_key(42, 0, NODE))  # NHWC, 10^6 elements
    # every channel c with c + 1, over the 10^5 pixels: the pairs (1, 2), (3, 4), ... too,
    # which the element test's (0, 1), (2, 3), ... pairs do not cover within a pixel
    assert (max(worst(r[..., c], r[..., c + 1]) for c in range(9)) < 1) == independent


@pytest.mark.parametrize("key_fn, independent", [
    (R.node_key, True),
    (lambda seed, step, name: R.node_key(seed, 0, name), False)],  # ignores the step
    ids=["specforge", "no-step"])
def test_steps_are_independent(key_fn: Callable[[int, int, str], int], independent: bool):
    shape = (DRAWS,)
    scores = [worst(R.uniform24(shape, key_fn(42, step, NODE)),
                    R.uniform24(shape, key_fn(42, step + 1, NODE))) for step in (0, 1, 2)]
    assert (max(scores) < 1) == independent


# --- the backends' dropout layers draw the reference's masks ---------------------------------

DROPOUT_SPECS = {"features": "[{type: flatten}, {type: dense, units: 6},"
                             " {type: dropout, rate: 0.3}, {type: dense, units: 2}]",
                 "spatial": "[{type: conv2d, filters: 4, kernel: 3},"
                            " {type: dropout, rate: 0.5, spatial: true}, {type: flatten},"
                            " {type: dense, units: 2}]",
                 "images": "[{type: conv2d, filters: 4, kernel: 3}, {type: dropout, rate: 0.25},"
                           " {type: flatten}, {type: dense, units: 2}]",
                 "per-sample": "[{type: conv2d, filters: 4, kernel: 3},"
                               " {type: dropout, rate: 0.5, per_sample: true}, {type: flatten},"
                               " {type: dense, units: 2}]",
                 "per-sample-features": "[{type: flatten}, {type: dense, units: 6},"
                                        " {type: dropout, rate: 0.5, per_sample: true},"
                                        " {type: dense, units: 2}]"}


def _dropout_program(layers: str) -> Any:
    """A program with these layers, and data to train on (an exact script of a spec without
    data carries no training, so no dropout keys)."""
    from specforge.compiler import compile_text

    return compile_text(f"name: d\nseed: 7\nmodel: {{input: [5, 6, 3], layers: {layers}}}\n"
                        "loss: {type: cross_entropy}\noptimizer: {type: sgd}\n"
                        "data: {source: {type: synthetic, samples: 12, classes: 3}}\n",
                        "<dropout>")


@pytest.mark.parametrize("kind", sorted(DROPOUT_SPECS))
def test_the_torch_trainers_dropout_draws_the_reference_masks(kind):
    torch = pytest.importorskip("torch")
    from specforge_torch.layers import Dropout
    from specforge_torch.model import create_model

    from specforge.conformance.masks import dropout_masks

    program = _dropout_program(DROPOUT_SPECS[kind])
    node = next(n for n in program.graph if n.op == "dropout")
    layer = next(m for m in create_model(program.graph, program.seed).modules()
                 if isinstance(m, Dropout))
    for step, first in ((0, 0), (3, 0), (5, 4)):
        layer.set_key(program.seed, step, first)
        shape = (3, *node.shape)
        ones = torch.ones((3, node.shape[2], *node.shape[:2]) if len(node.shape) == 3 else shape)
        mask = layer.train()(ones).numpy()
        if mask.ndim == 4:
            mask = mask.transpose(0, 2, 3, 1)
        expected = dropout_masks(program.graph, program.seed, step, first + 3)[node.name][first:]
        np.testing.assert_array_equal(mask, np.broadcast_to(expected, mask.shape))


#: per-sample dropout on an image (before an add, as drop-connect) and on features
PER_SAMPLE_LAYERS = ("[{type: conv2d, filters: 4, kernel: 3, name: branch},"
                     " {type: dropout, rate: 0.5, per_sample: true, name: image_drop},"
                     " {type: add, inputs: [branch, image_drop]}, {type: flatten},"
                     " {type: dense, units: 6},"
                     " {type: dropout, rate: 0.5, per_sample: true, name: feature_drop},"
                     " {type: dense, units: 2}]")


def _import_built(text: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    import importlib.util

    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"built_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look it up
    spec.loader.exec_module(module)  # defines functions and classes only: nothing runs
    return module


@pytest.mark.parametrize("backend", ["torch", "keras"])
def test_exact_scripts_draw_the_reference_per_sample_masks(backend, tmp_path, monkeypatch):
    """An exact built script carries the generator (mask_shape included, copied from the
    reference) and its dropout layers draw the reference's per-sample masks: (N, 1, 1, 1)
    on the image, (N, 1) on the features."""
    pytest.importorskip(backend)
    from specforge.backends import load_backend

    program = _dropout_program(PER_SAMPLE_LAYERS)
    text = load_backend(backend).build(program, style="exact")
    assert "\ndef mask_shape(" in text and "_mask_shape" not in text
    module = _import_built(text, tmp_path / f"exact_{backend}.py", monkeypatch)
    model = module.Model() if backend == "torch" else module.build_model()
    layers = {layer.node: layer for layer in (
        model.modules() if backend == "torch" else module.dropout_layers(model))
        if hasattr(layer, "set_key")}
    nodes = {node.name: node for node in program.graph}
    batch, step = 6, 3
    masks = dropout_masks(program.graph, program.seed, step, batch)
    assert set(layers) == set(masks) == {"image_drop", "feature_drop"}
    for name, layer in layers.items():
        shape = (batch, *nodes[name].shape)
        assert masks[name].shape == (batch, *[1] * len(nodes[name].shape))
        layer.set_key(program.seed, step)
        ones = np.ones(shape, np.float32)
        if backend == "torch":
            import torch

            image = ones.ndim == 4
            out = layer.train()(torch.from_numpy(ones.transpose(0, 3, 1, 2) if image
                                                 else ones)).numpy()
            out = out.transpose(0, 2, 3, 1) if image else out
        else:
            out = np.asarray(layer(ones, training=True))
        np.testing.assert_array_equal(out, np.broadcast_to(masks[name], shape))
        assert 0 < (out == 0).all(axis=tuple(range(1, out.ndim))).sum() < batch, name
