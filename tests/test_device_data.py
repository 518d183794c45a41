"""Batches built on the device equal the numpy pipeline's (here the device is the CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from specforge.compiler import compile_spec
from specforge.data import build_pipeline
from tests.conftest import SPECS

torch = pytest.importorskip("torch")
device_data = pytest.importorskip("specforge_torch.device_data")


@pytest.mark.parametrize("augment", ["{}", "{rotation: 20, zoom: 0.2, horizontal_flip: true, "
                                           "crop_padding: 2, fill_mode: reflect}"])
def test_device_batches_equal_numpy_batches(augment):
    program = compile_spec(SPECS / "digits.yaml", [f"data.augment={augment}"])
    pipeline = build_pipeline(program, SPECS)
    on_device = device_data.DeviceBatches(pipeline, torch.device("cpu"))
    for step in (0, 1, pipeline.batches_per_pass + 3):
        expected = pipeline.train_batch(step)
        actual = on_device.train_batch(step)
        assert isinstance(actual.x, torch.Tensor)
        # float64 coordinates and the same float32 normalisation on both sides
        np.testing.assert_allclose(actual.x.numpy(), expected.x, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(actual.y, expected.y)


def test_auto_moves_only_in_memory_data_within_the_limit(monkeypatch):
    program = compile_spec(SPECS / "digits.yaml")
    pipeline = build_pipeline(program, SPECS)
    assert device_data.fits_on_device(pipeline)
    monkeypatch.setattr(device_data, "AUTO_LIMIT_BYTES", 10)
    assert not device_data.fits_on_device(pipeline)
