"""The torch (GPU-capable) augmentation gives the numpy pipeline's images."""

from __future__ import annotations

import numpy as np
import pytest

from specforge.data import augment
from specforge.spec.data import Augment

torch = pytest.importorskip("torch")
augment_torch = pytest.importorskip("specforge_torch.augment")


@pytest.mark.parametrize("fill_mode", ["nearest", "constant", "reflect"])
def test_same_parameters_give_the_same_images(fill_mode):
    aug = Augment(rotation=30, width_shift=0.2, height_shift=0.1, zoom=0.3,
                  horizontal_flip=True, vertical_flip=True, crop_padding=3,
                  fill_mode=fill_mode, fill_value=17.0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 20, 24, 3)).astype(np.float32)
    params = augment.draw_params(aug, 64, 20, 24, np.random.default_rng(1))
    expected = augment.apply_augmentation(images, params, aug)
    actual = augment_torch.apply_augmentation(torch.from_numpy(images), params, aug).numpy()
    assert actual.dtype == np.float32
    # Same float64 coordinates and float64 accumulation: equal up to the last float32 bit.
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)
    assert not np.array_equal(expected, images)  # the augmentation did something


def test_identity_parameters_leave_images_unchanged():
    aug = Augment(rotation=10)
    images = np.random.default_rng(2).random((4, 8, 8, 1), dtype=np.float32)
    params = augment.draw_params(Augment(), 4, 8, 8, np.random.default_rng(3))
    out = augment_torch.apply_augmentation(torch.from_numpy(images), params, aug).numpy()
    np.testing.assert_array_equal(out, images)
